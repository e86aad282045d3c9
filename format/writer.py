"""Streaming writer of .pumice files (docs/FORMAT.md).

    with PumiceWriter("model.pumice", metadata) as writer:
        writer.add_tensor("model.norm.weight", "dense", [576], {}, {"weight": norm_f32})
        writer.add_tensor(name, "rtn", [n, k], {"bits": 4, "group_size": 64},
                          {"codes": codes_u8, "scales": scales_f16, "mins": mins_f16})
        writer.add_blob("tokenizer.json", tokenizer_bytes)

The header JSON comes first in the file but is only known at the end, so tensor data streams
into a temporary file beside the output as it is added (memory stays near one tensor); `close()`
writes the fixed header and the JSON, then copies the data in. Leaving the `with` block through
an exception removes both files.

Part values may be numpy arrays (f32, f16, i8, u8, i16, u16, i32, u32 by their numpy dtype),
torch tensors (those plus bfloat16), or ``(file_dtype, array)`` pairs that name the file dtype
of raw values, e.g. ``("bf16", uint16_bit_patterns)``.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import FormatError
from .kinds import DTYPES, expected_parts

MAGIC = b"PUMICE\x00\x1a"
VERSION = 1
ALIGNMENT = 64
FIXED_HEADER_SIZE = 64
# magic, version, alignment, json offset, json length, data offset, data length, file length,
# json crc32; the fixed-header crc32 (of these 60 bytes) follows.
FIXED_HEADER_STRUCT = struct.Struct("<8sIIQQQQQI")

_NUMPY_TO_FILE = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16",
                  np.dtype(np.int8): "i8", np.dtype(np.uint8): "u8",
                  np.dtype(np.int16): "i16", np.dtype(np.uint16): "u16",
                  np.dtype(np.int32): "i32", np.dtype(np.uint32): "u32"}


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def normalize_part(value: Any) -> tuple[str, np.ndarray]:
    """A part value -> (file dtype name, C-contiguous little-endian numpy array of its values)."""
    if isinstance(value, tuple):
        if len(value) != 2 or value[0] not in DTYPES:
            raise FormatError(f"a part given as a pair must be (file dtype, array), got {value!r:.80}")
        dtype, array = value
        if hasattr(array, "detach"):
            array = _torch_to_numpy(array)[1]
        array = np.asarray(array)
        stored = DTYPES[dtype][0]
        if dtype == "bf16" and array.dtype == np.float32:
            array = float32_to_bf16_bits(array)
        if array.dtype.itemsize != stored.itemsize or array.dtype.kind not in "iuf":
            raise FormatError(f"array of dtype {array.dtype} cannot hold {dtype} values")
        array = np.ascontiguousarray(array)
        if array.dtype.kind == stored.kind:
            return dtype, array.astype(stored, copy=False)
        # Same width, other kind: raw bit patterns (e.g. int16 holding bf16 bits).
        return dtype, array.astype(array.dtype.newbyteorder("<"), copy=False).view(stored)
    if hasattr(value, "detach"):
        return _torch_to_numpy(value)
    array = np.asarray(value)
    native = array.dtype.newbyteorder("=")
    if native not in _NUMPY_TO_FILE:
        raise FormatError(f"numpy dtype {array.dtype} is not a file dtype "
                          f"(use one of {sorted(set(_NUMPY_TO_FILE.values()))} or a (dtype, array) pair)")
    dtype = _NUMPY_TO_FILE[native]
    return dtype, np.ascontiguousarray(array, dtype=DTYPES[dtype][0])


def _torch_to_numpy(tensor) -> tuple[str, np.ndarray]:
    import torch
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        return "bf16", tensor.view(torch.int16).numpy().view(np.uint16)
    table = {torch.float32: "f32", torch.float16: "f16", torch.int8: "i8", torch.uint8: "u8",
             torch.int16: "i16", torch.int32: "i32"}
    if hasattr(torch, "uint16"):
        table[torch.uint16] = "u16"
        table[torch.uint32] = "u32"
    if tensor.dtype not in table:
        raise FormatError(f"torch dtype {tensor.dtype} is not a file dtype")
    dtype = table[tensor.dtype]
    return dtype, np.ascontiguousarray(tensor.numpy(), dtype=DTYPES[dtype][0])


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class PumiceWriter:
    """Writes one .pumice file; see the module docstring."""

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                 *, alignment: int = ALIGNMENT, check_kinds: bool = True):
        if alignment < 64 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= 64, got {alignment}")
        self.path = Path(path)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.alignment = alignment
        self.check_kinds = check_kinds
        self._entries: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._data_length = 0
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
        self._tmp_path = Path(tmp)
        self._data = os.fdopen(fd, "w+b")

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "PumiceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- adding tensors ----------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return [entry["name"] for entry in self._entries]

    @property
    def data_length(self) -> int:
        return self._data_length

    def add_tensor(self, name: str, kind: str, shape, params: Mapping[str, Any] | None,
                   parts: Mapping[str, Any]) -> dict[str, Any]:
        """Append one tensor: check it against its kind, then stream its parts to disk.

        Returns the tensor's header entry (offsets relative to the data section).
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise FormatError(f"{self.path}: tensor names must be non-empty strings, got {name!r}")
        if name in self._names:
            raise FormatError(f"{self.path}: tensor {name!r} was already added")
        shape = [int(s) for s in shape]
        if any(s < 0 for s in shape):
            raise FormatError(f"{self.path}: tensor {name!r}: negative size in shape {shape}")
        params = dict(params or {})
        normalized = {}
        for part_name, value in parts.items():
            try:
                normalized[part_name] = normalize_part(value)
            except FormatError as err:
                raise FormatError(f"{self.path}: tensor {name!r} part {part_name!r}: {err}") from None
        if self.check_kinds:
            self._check_against_kind(name, kind, shape, params, normalized)
        entry_parts = {}
        for part_name, (dtype, array) in normalized.items():
            entry_parts[part_name] = self._write_part(dtype, array)
        entry = {"name": name, "kind": kind, "shape": shape, "params": params, "parts": entry_parts}
        try:
            json.dumps(entry, allow_nan=False, default=_json_default)
        except (TypeError, ValueError) as err:
            raise FormatError(f"{self.path}: tensor {name!r}: params are not valid JSON: {err}") from None
        self._entries.append(entry)
        self._names.add(name)
        return entry

    def add_blob(self, name: str, data: bytes) -> dict[str, Any]:
        """Append opaque bytes (kind `blob`), e.g. the tokenizer file."""
        array = np.frombuffer(bytes(data), dtype=np.uint8)
        return self.add_tensor(name, "blob", [array.size], {}, {"data": array})

    def _check_against_kind(self, name, kind, shape, params, normalized) -> None:
        where = f"{self.path}: tensor {name!r} (kind {kind!r})"
        try:
            expected = expected_parts(kind, tuple(shape), params)
        except FormatError as err:
            raise FormatError(f"{where}: {err}") from None
        except Exception as err:  # a kind's describe_fn may trip over malformed params
            raise FormatError(f"{where}: {err}") from None
        missing = sorted(set(expected) - set(normalized))
        extra = sorted(set(normalized) - set(expected))
        if missing or extra:
            raise FormatError(f"{where}: parts {sorted(normalized)} do not match the kind's "
                              f"{sorted(expected)} (missing {missing}, extra {extra})")
        for part_name, (dtype, array) in normalized.items():
            dtypes, part_shape = expected[part_name]
            if dtype not in dtypes:
                raise FormatError(f"{where}: part {part_name!r} has dtype {dtype}, "
                                  f"expected {' or '.join(dtypes)}")
            if tuple(array.shape) != part_shape:
                raise FormatError(f"{where}: part {part_name!r} has shape {list(array.shape)}, "
                                  f"expected {list(part_shape)}")

    def _write_part(self, dtype: str, array: np.ndarray) -> dict[str, Any]:
        offset = _align(self._data_length, self.alignment)
        if offset > self._data_length:
            self._data.write(b"\x00" * (offset - self._data_length))
        raw = array.reshape(-1).view(np.uint8)
        self._data.write(raw)
        self._data_length = offset + raw.size
        return {"dtype": dtype, "shape": list(array.shape), "offset": offset,
                "length": int(raw.size), "crc32": zlib.crc32(raw) & 0xFFFFFFFF}

    # -- finishing ---------------------------------------------------------------------------
    def header_json(self) -> bytes:
        document = {"metadata": self.metadata, "tensors": self._entries}
        try:
            return json.dumps(document, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":"), default=_json_default).encode("utf-8")
        except (TypeError, ValueError) as err:
            raise FormatError(f"{self.path}: metadata is not valid JSON: {err}") from None

    def close(self) -> Path:
        """Write the header, copy the data section in, and remove the temporary file."""
        if self._closed:
            return self.path
        try:
            header_json = self.header_json()
            data_offset = _align(FIXED_HEADER_SIZE + len(header_json), self.alignment)
            file_length = data_offset + self._data_length
            fixed = FIXED_HEADER_STRUCT.pack(
                MAGIC, VERSION, self.alignment, FIXED_HEADER_SIZE, len(header_json), data_offset,
                self._data_length, file_length, zlib.crc32(header_json) & 0xFFFFFFFF)
            fixed += struct.pack("<I", zlib.crc32(fixed) & 0xFFFFFFFF)
            self._data.flush()
            self._data.seek(0)
            with open(self.path, "wb") as out:
                out.write(fixed)
                out.write(header_json)
                out.write(b"\x00" * (data_offset - FIXED_HEADER_SIZE - len(header_json)))
                shutil.copyfileobj(self._data, out, length=16 << 20)
                if out.tell() != file_length:
                    raise OSError(f"{self.path}: wrote {out.tell()} bytes, expected {file_length}")
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._data.close()
        self._tmp_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Give up: remove the temporary file and any partial output."""
        if self._closed:
            return
        self._closed = True
        self._data.close()
        self._tmp_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self._closed:
            raise FormatError(f"{self.path}: the writer is closed")

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:
                pass
