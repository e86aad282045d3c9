"""Exceptions of the format layer."""


class FormatError(ValueError):
    """A .pumice file (or a tensor about to be written) breaks docs/FORMAT.md.

    The message names the file and, where it applies, the tensor and part.
    """
