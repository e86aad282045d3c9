"""Storage kinds: what parts each kind prescribes, and a float32 reference dequantizer for each.

A kind is registered once, by name, with two functions:

    register_kind(name, dequantize_fn, describe_fn, summarize_fn=None)

- ``describe_fn(shape, params) -> {part_name: (dtypes, part_shape)}`` returns the parts the kind
  prescribes for a tensor of logical ``shape`` with ``params`` (``dtypes`` is a dtype string or a
  tuple of allowed ones). It raises ``ValueError`` with a short reason for bad params or shapes;
  the reader and writer turn that into a ``FormatError`` naming the file and tensor. Composite
  kinds describe their sub-tensors with ``expected_parts(inner_kind, shape, params, prefix)``.
- ``dequantize_fn(view) -> array`` reconstructs the logical matrix as float32 (numpy array or
  torch tensor) from a ``KindView`` (``view.shape``, ``view.params``, ``view.part(name)``,
  ``view.sub(prefix, kind_params, shape)`` for composite kinds). It is the reference the native
  kernels are tested against: keep it simple and obviously right, not fast.
- ``summarize_fn(shape, params) -> str`` (optional) is the short parameter text of
  `pumice inspect` (e.g. ``"b=4 g=64"``).

Kinds defined outside this module register themselves when their module is imported. Modules
named ``pumice.format.kind_*`` (files ``format/kind_*.py``) are imported automatically the first
time a kind is looked up, so every reader knows them; a kind registered elsewhere must be
imported before its files are read.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .errors import FormatError
from .packing import packed_row_bytes, unpack_codes

# File dtype name -> (numpy dtype of the stored bytes, item size). bf16 has no numpy dtype: its
# parts are exposed as their raw uint16 bit patterns (see `to_float32`).
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "f32": (np.dtype("<f4"), 4),
    "f16": (np.dtype("<f2"), 2),
    "bf16": (np.dtype("<u2"), 2),
    "i8": (np.dtype("i1"), 1),
    "u8": (np.dtype("u1"), 1),
    "i16": (np.dtype("<i2"), 2),
    "u16": (np.dtype("<u2"), 2),
    "i32": (np.dtype("<i4"), 4),
    "u32": (np.dtype("<u4"), 4),
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A part's stored values as float32 (`dtype` is the file dtype name)."""
    if dtype == "bf16":
        return bf16_bits_to_float32(array)
    return np.asarray(array).astype(np.float32)


@dataclass(frozen=True)
class KindDef:
    name: str
    dequantize: Callable[["KindView"], Any]
    describe: Callable[[tuple, Mapping], dict]
    summarize: Callable[[tuple, Mapping], str] | None = None


_KINDS: dict[str, KindDef] = {}
_plugins_loaded = False


def register_kind(name: str, dequantize_fn: Callable, describe_fn: Callable,
                  summarize_fn: Callable | None = None, *, replace: bool = False) -> None:
    """Register a storage kind (see the module docstring for the three functions)."""
    if not replace and name in _KINDS and _KINDS[name].describe is not describe_fn:
        raise ValueError(f"storage kind {name!r} is already registered")
    _KINDS[name] = KindDef(name, dequantize_fn, describe_fn, summarize_fn)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from . import __path__ as package_path
    for module in pkgutil.iter_modules(package_path):
        if module.name.startswith("kind_"):
            importlib.import_module(f"{__package__}.{module.name}")


def registered_kinds() -> list[str]:
    _load_plugins()
    return sorted(_KINDS)


def get_kind(name: str) -> KindDef:
    if name not in _KINDS:
        _load_plugins()
    try:
        return _KINDS[name]
    except KeyError:
        raise FormatError(f"unknown storage kind {name!r} (known: {', '.join(sorted(_KINDS))})") \
            from None


def _normalize_spec(spec: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    dtypes, shape = spec
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    return tuple(dtypes), tuple(int(s) for s in shape)


def expected_parts(kind: str, shape: tuple, params: Mapping, prefix: str = ""
                   ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Parts (name -> (allowed dtypes, shape)) that `kind` prescribes; prefix for sub-tensors.

    Raises FormatError (unknown kind) or ValueError (bad params/shape, with the reason).
    """
    kind_def = get_kind(kind)
    if not isinstance(params, Mapping):
        raise ValueError("params must be an object")
    described = kind_def.describe(tuple(shape), params)
    return {prefix + part: _normalize_spec(spec) for part, spec in described.items()}


def summarize(kind: str, shape: tuple, params: Mapping) -> str:
    kind_def = get_kind(kind)
    if kind_def.summarize is not None:
        return kind_def.summarize(tuple(shape), params)
    return " ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, (dict, list)))


# ---------------------------------------------------------------------------------------------
# Parameter helpers shared by kind definitions.

def int_param(params: Mapping, key: str, allowed: Any = None) -> int:
    """params[key] as an int (JSON integer, not a bool), optionally restricted to `allowed`."""
    if key not in params:
        raise ValueError(f"missing parameter {key!r}")
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"parameter {key!r} must be an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"parameter {key!r} = {value} is outside the allowed values")
    return value


def require_matrix(shape: tuple) -> tuple[int, int]:
    if len(shape) != 2 or any(s <= 0 for s in shape):
        raise ValueError(f"logical shape must be [out, in] with positive sizes, got {list(shape)}")
    return int(shape[0]), int(shape[1])


def check_no_params(params: Mapping) -> None:
    if params:
        raise ValueError(f"takes no parameters, got {sorted(params)}")


# ---------------------------------------------------------------------------------------------
# Views: a tensor's parts, from a file or from memory, for the dequantizers.

class KindView:
    """What a dequantizer sees: shape, params and named parts (with a prefix for sub-tensors)."""

    def __init__(self, name: str, kind: str, shape: tuple, params: Mapping,
                 get_part: Callable[[str], tuple[np.ndarray, str]], prefix: str = ""):
        self.name = name
        self.kind = kind
        self.shape = tuple(int(s) for s in shape)
        self.params = params
        self._get_part = get_part
        self.prefix = prefix

    def part(self, name: str) -> np.ndarray:
        """The part's stored array (bf16 as uint16 bits)."""
        return self._get_part(self.prefix + name)[0]

    def part_dtype(self, name: str) -> str:
        return self._get_part(self.prefix + name)[1]

    def part_float32(self, name: str) -> np.ndarray:
        array, dtype = self._get_part(self.prefix + name)
        return to_float32(array, dtype)

    def sub(self, prefix: str, kind: str, params: Mapping, shape: tuple | None = None
            ) -> "KindView":
        """A sub-tensor stored under `prefix` (e.g. CALDERA's backbone under ``"q."``)."""
        return KindView(self.name, kind, self.shape if shape is None else shape, params,
                        self._get_part, self.prefix + prefix)

    def dequantize(self) -> np.ndarray:
        result = get_kind(self.kind).dequantize(self)
        if hasattr(result, "detach"):  # torch tensor
            result = result.detach().to("cpu").float().numpy()
        return np.asarray(result, dtype=np.float32).reshape(self.shape)


def dequantize(file, name: str) -> np.ndarray:
    """Reconstruct tensor `name` of an open PumiceFile as a float32 array of its logical shape."""
    info = file.tensors.get(name)
    if info is None:
        raise FormatError(f"{file.path}: no tensor named {name!r}")

    def get_part(part: str) -> tuple[np.ndarray, str]:
        if part not in info.parts:
            raise FormatError(f"{file.path}: tensor {name!r} has no part {part!r}")
        return file.part(name, part), info.parts[part].dtype

    return KindView(name, info.kind, info.shape, info.params, get_part).dequantize()


def dequantize_parts(kind: str, shape: tuple, params: Mapping,
                     parts: Mapping[str, Any], name: str = "<in memory>") -> np.ndarray:
    """Reconstruct from in-memory parts (as given to PumiceWriter.add_tensor), e.g. to measure a
    quantizer's error before writing."""
    from .writer import normalize_part

    def get_part(part: str) -> tuple[np.ndarray, str]:
        if part not in parts:
            raise FormatError(f"tensor {name!r} has no part {part!r}")
        dtype, array = normalize_part(parts[part])
        return array, dtype

    return KindView(name, kind, shape, params, get_part).dequantize()


def stored_bits(tensor_info) -> int:
    """Bits the tensor occupies in the file: all bytes of all its parts, times 8."""
    return 8 * sum(part.length for part in tensor_info.parts.values())


# ---------------------------------------------------------------------------------------------
# Built-in kinds: blob, dense, rtn (docs/FORMAT.md 3.1).

def _describe_blob(shape, params):
    check_no_params(params)
    if len(shape) != 1:
        raise ValueError(f"a blob is 1-D, got shape {list(shape)}")
    return {"data": ("u8", shape)}


def _dequantize_blob(view):
    raise FormatError(f"tensor {view.name!r} is a blob (bytes), not a matrix")


def _describe_dense(shape, params):
    check_no_params(params)
    if len(shape) not in (1, 2):
        raise ValueError(f"a dense tensor is 1-D or 2-D, got shape {list(shape)}")
    return {"weight": (("f32", "f16", "bf16"), shape)}


def _dequantize_dense(view):
    return view.part_float32("weight")


RTN_BITS = (2, 3, 4, 8)
RTN_GROUP_SIZES = range(32, 4097, 32)


def rtn_layout(shape, params) -> tuple[int, int, int, int, int]:
    """(N, K, bits, group_size, groups per row) of an `rtn` tensor, validated."""
    n, k = require_matrix(shape)
    bits = int_param(params, "bits", RTN_BITS)
    group_size = int_param(params, "group_size", RTN_GROUP_SIZES)
    extra = set(params) - {"bits", "group_size"}
    if extra:
        raise ValueError(f"unexpected parameters {sorted(extra)}")
    return n, k, bits, group_size, -(-k // group_size)


def _describe_rtn(shape, params):
    n, k, bits, _, groups = rtn_layout(shape, params)
    return {"codes": ("u8", (n, packed_row_bytes(k, bits))),
            "scales": ("f16", (n, groups)),
            "mins": ("f16", (n, groups))}


def _dequantize_rtn(view):
    n, k, bits, group_size, _ = rtn_layout(view.shape, view.params)
    codes = unpack_codes(view.part("codes"), bits, k).astype(np.float32)
    group_of_column = np.arange(k) // group_size
    scales = view.part_float32("scales")[:, group_of_column]
    mins = view.part_float32("mins")[:, group_of_column]
    return scales * codes + mins


def _summarize_rtn(shape, params):
    return f"b={params.get('bits')} g={params.get('group_size')}"


register_kind("blob", _dequantize_blob, _describe_blob, lambda s, p: "")
register_kind("dense", _dequantize_dense, _describe_dense, lambda s, p: "")
register_kind("rtn", _dequantize_rtn, _describe_rtn, _summarize_rtn)
