"""Whether the CUDA tests can run here: a libpumice_cuda to load and a GPU that torch sees."""
from __future__ import annotations

import pytest

from pumice.runtime.native import load_library


def cuda_unavailable_reason() -> str | None:
    """Why CUDA tests cannot run, or None when they can."""
    try:
        load_library("cuda")
    except Exception as exc:  # library missing: CPU-only build
        return f"no libpumice_cuda ({exc})"
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA GPU"
    except Exception as exc:
        return f"no CUDA GPU ({exc})"
    return None


def skip_module_without_cuda() -> None:
    """Call at import time of a CUDA-only test module."""
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)
