"""The .pumice file format (docs/FORMAT.md): writer, validating reader, bit packing, kinds."""
from .errors import FormatError
from .kinds import dequantize, register_kind, stored_bits
from .reader import PartInfo, PumiceFile, TensorInfo
from .writer import PumiceWriter

__all__ = ["FormatError", "PumiceFile", "PumiceWriter", "PartInfo", "TensorInfo",
           "dequantize", "register_kind", "stored_bits"]
