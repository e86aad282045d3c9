"""Memory-mapped, validating reader of .pumice files (docs/FORMAT.md).

    with PumiceFile("model.pumice") as f:
        f.metadata["config"]["hidden_size"]
        info = f.tensors["model.layers.0.mlp.up_proj.weight"]   # TensorInfo
        codes = f.part(info.name, "codes")                       # zero-copy numpy view
        tokenizer_bytes = f.blob("tokenizer.json")

Opening checks everything docs/FORMAT.md asks a reader to check, in its order: magic, fixed
header CRC, version, real size, section bounds, header JSON CRC, the JSON's structure, every
tensor's kind, params and parts (dtype, shape, length, bounds, no overlap) and, unless
``verify=False``, every part's CRC. Any violation raises FormatError naming the file and, where
it applies, the tensor and part. bf16 parts are returned as their uint16 bit patterns
(`part_float32` converts).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError
from .kinds import DTYPES, expected_parts, to_float32
from .writer import FIXED_HEADER_SIZE, FIXED_HEADER_STRUCT, MAGIC, VERSION


@dataclass(frozen=True)
class PartInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # relative to the data section
    length: int
    crc32: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: dict[str, Any]
    parts: dict[str, PartInfo]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        return sum(part.length for part in self.parts.values())


@dataclass(frozen=True)
class FixedHeader:
    version: int
    alignment: int
    header_json_offset: int
    header_json_length: int
    data_offset: int
    data_length: int
    file_length: int
    header_json_crc32: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON value {name}")


class PumiceFile:
    """An open, validated .pumice file. Close it (or use `with`) to release the mapping."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < FIXED_HEADER_SIZE:
                    raise self._error(f"file is {size} bytes, shorter than the "
                                      f"{FIXED_HEADER_SIZE}-byte fixed header (truncated or not a "
                                      f".pumice file)")
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a directory, not a .pumice file") from None
        try:
            self.header = self._read_fixed_header(size)
            document = self._read_header_json()
            self.metadata, self.tensors = self._read_document(document)
            self._check_regions()
            if verify:
                self.verify_checksums()
        except BaseException:
            self.close()
            raise

    # -- public API --------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.header.version

    @property
    def alignment(self) -> int:
        return self.header.alignment

    def __enter__(self) -> "PumiceFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def close(self) -> None:
        """Release the mapping. Arrays returned by `part` keep it alive until they are freed."""
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # views are still alive; the mapping goes when the last one does

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {name!r}") from None

    def part(self, name: str, part: str) -> np.ndarray:
        """Zero-copy read-only view of a part (bf16 as uint16 bit patterns)."""
        info = self.tensor(name)
        if part not in info.parts:
            raise FormatError(f"{self.path}: tensor {name!r} has no part {part!r} "
                              f"(parts: {sorted(info.parts)})")
        if self._mmap is None:
            raise FormatError(f"{self.path}: the file is closed")
        p = info.parts[part]
        dtype = DTYPES[p.dtype][0]
        count = p.length // dtype.itemsize
        array = np.frombuffer(self._mmap, dtype=dtype, count=count,
                              offset=self.header.data_offset + p.offset)
        return array.reshape(p.shape)

    def part_float32(self, name: str, part: str) -> np.ndarray:
        return to_float32(self.part(name, part), self.tensor(name).parts[part].dtype)

    def blob(self, name: str) -> bytes:
        info = self.tensor(name)
        if info.kind != "blob":
            raise FormatError(f"{self.path}: tensor {name!r} is of kind {info.kind!r}, not a blob")
        return self.part(name, "data").tobytes()

    def dequantize(self, name: str) -> np.ndarray:
        from .kinds import dequantize
        return dequantize(self, name)

    def verify_checksums(self) -> None:
        """Check every part's CRC-32; raises FormatError naming the first bad part."""
        data_offset = self.header.data_offset
        view = memoryview(self._mmap)
        try:
            for info in self.tensors.values():
                for part_name, p in info.parts.items():
                    start = data_offset + p.offset
                    actual = zlib.crc32(view[start:start + p.length]) & 0xFFFFFFFF
                    if actual != p.crc32:
                        raise self._error(f"CRC-32 mismatch (stored {p.crc32:#010x}, computed "
                                          f"{actual:#010x}): the data is corrupt",
                                          info.name, part_name)
        finally:
            view.release()

    # -- validation --------------------------------------------------------------------------
    def _error(self, message: str, tensor: str | None = None, part: str | None = None
               ) -> FormatError:
        where = str(self.path)
        if tensor is not None:
            where += f": tensor {tensor!r}"
        if part is not None:
            where += f" part {part!r}"
        return FormatError(f"{where}: {message}")

    def _read_fixed_header(self, size: int) -> FixedHeader:
        raw = self._mmap[:FIXED_HEADER_SIZE]
        (magic, version, alignment, json_offset, json_length, data_offset, data_length,
         file_length, json_crc) = FIXED_HEADER_STRUCT.unpack_from(raw)
        (fixed_crc,) = struct.unpack_from("<I", raw, 60)
        if magic != MAGIC:
            raise self._error(f"not a .pumice file (magic bytes {magic!r}, expected {MAGIC!r})")
        if zlib.crc32(raw[:60]) & 0xFFFFFFFF != fixed_crc:
            raise self._error("fixed header CRC-32 mismatch: the header is corrupt")
        if version != VERSION:
            newer = " (written by a newer Pumice; upgrade to read it)" if version > VERSION else ""
            raise self._error(f"format version {version} is not supported: this reader reads "
                              f"version {VERSION}{newer}")
        if size != file_length:
            raise self._error(f"file is {size} bytes but its header says {file_length} "
                              f"({'truncated' if size < file_length else 'trailing bytes'})")
        if data_offset + data_length != file_length:
            raise self._error(f"data section [{data_offset}, +{data_length}) does not end at the "
                              f"end of the file ({file_length})")
        if alignment < 64 or alignment & (alignment - 1):
            raise self._error(f"alignment {alignment} is not a power of two >= 64")
        if json_offset != FIXED_HEADER_SIZE:
            raise self._error(f"header JSON offset is {json_offset}, expected {FIXED_HEADER_SIZE}")
        if data_offset % alignment or data_offset < FIXED_HEADER_SIZE + json_length:
            raise self._error(f"data offset {data_offset} is not aligned to {alignment} or "
                              f"overlaps the header JSON ({json_length} bytes)")
        return FixedHeader(version, alignment, json_offset, json_length, data_offset,
                           data_length, file_length, json_crc)

    def _read_header_json(self) -> Any:
        h = self.header
        raw = self._mmap[h.header_json_offset:h.header_json_offset + h.header_json_length]
        if zlib.crc32(raw) & 0xFFFFFFFF != h.header_json_crc32:
            raise self._error("header JSON CRC-32 mismatch: the header is corrupt")
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise self._error(f"header JSON is invalid: {err}") from None

    def _read_document(self, document: Any) -> tuple[dict, dict[str, TensorInfo]]:
        if not isinstance(document, dict) or set(document) != {"metadata", "tensors"}:
            keys = sorted(document) if isinstance(document, dict) else type(document).__name__
            raise self._error(f"header JSON must be an object with exactly the keys "
                              f"'metadata' and 'tensors', got {keys}")
        metadata, entries = document["metadata"], document["tensors"]
        if not isinstance(metadata, dict):
            raise self._error("header JSON 'metadata' must be an object")
        if not isinstance(entries, list):
            raise self._error("header JSON 'tensors' must be an array")
        tensors: dict[str, TensorInfo] = {}
        for index, entry in enumerate(entries):
            info = self._read_entry(index, entry)
            if info.name in tensors:
                raise self._error("duplicate tensor name", info.name)
            tensors[info.name] = info
        tokenizer = metadata.get("tokenizer")
        if isinstance(tokenizer, dict) and "blob" in tokenizer:
            blob = tokenizer["blob"]
            if not isinstance(blob, str) or blob not in tensors or tensors[blob].kind != "blob":
                raise self._error(f"metadata.tokenizer.blob {blob!r} does not name a blob tensor")
        return metadata, tensors

    def _read_entry(self, index: int, entry: Any) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._error(f"tensor entry #{index} is not an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise self._error(f"tensor entry #{index} has no valid 'name'")
        missing = {"kind", "shape", "params", "parts"} - set(entry)
        if missing:
            raise self._error(f"entry lacks {sorted(missing)}", name)
        unknown = set(entry) - {"name", "kind", "shape", "params", "parts"}
        if unknown:
            raise self._error(f"entry has unknown keys {sorted(unknown)}", name)
        kind, shape, params, parts = entry["kind"], entry["shape"], entry["params"], entry["parts"]
        if not isinstance(kind, str):
            raise self._error(f"'kind' must be a string, got {kind!r}", name)
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise self._error(f"'shape' must be an array of non-negative integers, got {shape!r}",
                              name)
        if not isinstance(params, dict):
            raise self._error("'params' must be an object", name)
        if not isinstance(parts, dict):
            raise self._error("'parts' must be an object", name)
        try:
            expected = expected_parts(kind, tuple(shape), params)
        except FormatError as err:
            raise self._error(str(err), name) from None
        except Exception as err:  # a kind's describe_fn may trip over any malformed params
            raise self._error(f"kind {kind!r}: {type(err).__name__}: {err}"
                              if not isinstance(err, ValueError) else f"kind {kind!r}: {err}",
                              name) from None
        if set(parts) != set(expected):
            missing = sorted(set(expected) - set(parts))
            extra = sorted(set(parts) - set(expected))
            raise self._error(f"kind {kind!r} prescribes parts {sorted(expected)}; "
                              f"missing {missing}, extra {extra}", name)
        infos = {}
        for part_name, part in parts.items():
            infos[part_name] = self._read_part(name, part_name, part, expected[part_name])
        return TensorInfo(name, kind, tuple(shape), params, infos)

    def _read_part(self, name: str, part_name: str, part: Any, expected) -> PartInfo:
        if not isinstance(part, dict):
            raise self._error("part entry is not an object", name, part_name)
        missing = {"dtype", "shape", "offset", "length", "crc32"} - set(part)
        if missing:
            raise self._error(f"part entry lacks {sorted(missing)}", name, part_name)
        unknown = set(part) - {"dtype", "shape", "offset", "length", "crc32"}
        if unknown:
            raise self._error(f"part entry has unknown keys {sorted(unknown)}", name, part_name)
        dtype, shape = part["dtype"], part["shape"]
        offset, length, crc = part["offset"], part["length"], part["crc32"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._error(f"unknown dtype {dtype!r}", name, part_name)
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise self._error(f"'shape' must be an array of non-negative integers, got {shape!r}",
                              name, part_name)
        for key, value in (("offset", offset), ("length", length), ("crc32", crc)):
            if not _is_int(value) or value < 0:
                raise self._error(f"'{key}' must be a non-negative integer, got {value!r}",
                                  name, part_name)
        if crc > 0xFFFFFFFF:
            raise self._error(f"'crc32' {crc} does not fit in 32 bits", name, part_name)
        allowed, expected_shape = expected
        if dtype not in allowed:
            raise self._error(f"dtype {dtype}, but the kind prescribes {' or '.join(allowed)}",
                              name, part_name)
        if tuple(shape) != expected_shape:
            raise self._error(f"shape {shape}, but the kind prescribes {list(expected_shape)}",
                              name, part_name)
        if length != math.prod(shape) * DTYPES[dtype][1]:
            raise self._error(f"length {length} != product of shape {shape} x "
                              f"{DTYPES[dtype][1]} bytes", name, part_name)
        if offset % self.header.alignment:
            raise self._error(f"offset {offset} is not a multiple of the alignment "
                              f"{self.header.alignment}", name, part_name)
        if offset + length > self.header.data_length:
            raise self._error(f"region [{offset}, {offset + length}) lies outside the data "
                              f"section ({self.header.data_length} bytes)", name, part_name)
        return PartInfo(dtype, tuple(shape), offset, length, crc)

    def _check_regions(self) -> None:
        regions = sorted((p.offset, p.offset + p.length, t.name, part_name)
                         for t in self.tensors.values() for part_name, p in t.parts.items()
                         if p.length > 0)
        for (start_a, end_a, tensor_a, part_a), (start_b, _, tensor_b, part_b) in zip(
                regions, regions[1:]):
            if start_b < end_a:
                raise self._error(f"region [{start_b}, ...) overlaps tensor {tensor_a!r} part "
                                  f"{part_a!r} [{start_a}, {end_a})", tensor_b, part_b)
