"""The .pumice writer, reader, bit packing and reference dequantizers (docs/FORMAT.md)."""
from __future__ import annotations

import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch

from pumice.format import FormatError, PumiceFile, PumiceWriter, dequantize, stored_bits
from pumice.format.kinds import dequantize_parts, expected_parts, register_kind
from pumice.format.packing import pack_codes, packed_row_bytes, unpack_codes

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ helpers

def reference_pack(codes: np.ndarray, bits: int, pad_to: int = 32) -> np.ndarray:
    """Bit-by-bit packing, written straight from the FORMAT.md wording (independent of
    pumice.format.packing): bit i of a row's stream is bit i % 8 of byte i // 8."""
    rows, k = codes.shape
    kp = -(-k // pad_to) * pad_to
    out = np.zeros((rows, kp * bits // 8), np.uint8)
    for r in range(rows):
        for j in range(k):
            for t in range(bits):
                if (int(codes[r, j]) >> t) & 1:
                    i = j * bits + t
                    out[r, i // 8] |= 1 << (i % 8)
    return out


def write_small_file(path, extra_metadata=None):
    """A small file with every dtype, an rtn tensor and a blob."""
    arrays = {
        "f32": RNG.standard_normal((3, 5)).astype(np.float32),
        "f16": RNG.standard_normal((7,)).astype(np.float16),
        "i8": RNG.integers(-128, 128, (4, 4), dtype=np.int8),
        "u8": RNG.integers(0, 256, (33,), dtype=np.uint8),
        "i16": RNG.integers(-2**15, 2**15, (2, 3), dtype=np.int16),
        "u16": RNG.integers(0, 2**16, (5,), dtype=np.uint16),
        "i32": RNG.integers(-2**31, 2**31, (6,), dtype=np.int32),
        "u32": RNG.integers(0, 2**32, (3, 1), dtype=np.uint32),
    }
    metadata = {"architecture": "llama", "config": {"hidden_size": 8}, "note": "ünïcode ✓"}
    metadata.update(extra_metadata or {})
    codes = RNG.integers(0, 8, (6, 70))
    rtn_parts = {"codes": pack_codes(codes, 3),
                 "scales": RNG.random((6, 2)).astype(np.float16),
                 "mins": RNG.standard_normal((6, 2)).astype(np.float16)}
    bf16 = torch.randn(4, 3, dtype=torch.bfloat16)
    with PumiceWriter(path, metadata) as writer:
        writer.add_tensor("dense.f32", "dense", [3, 5], {}, {"weight": arrays["f32"]})
        writer.add_tensor("dense.f16", "dense", [7], {}, {"weight": arrays["f16"]})
        writer.add_tensor("dense.bf16", "dense", [4, 3], {}, {"weight": bf16})
        writer.add_tensor("layer.rtn", "rtn", [6, 70], {"bits": 3, "group_size": 64}, rtn_parts)
        writer.add_blob("tokenizer.json", b'{"hello": "world"}')
        writer.add_blob("empty", b"")
    return arrays, bf16, codes, rtn_parts


def register_test_kind():
    """A kind holding one raw part of any dtype, to round-trip every dtype through the format."""
    def describe(shape, params):
        return {"data": (params["dtype"], shape)}
    register_kind("test_raw", lambda view: view.part("data").astype(np.float32), describe,
                  replace=True)


def split_file(raw: bytes):
    header_len = struct.unpack_from("<Q", raw, 24)[0]
    data_offset = struct.unpack_from("<Q", raw, 32)[0]
    return json.loads(raw[64:64 + header_len]), raw[data_offset:], struct.unpack_from("<I", raw, 12)[0]


def build_file(document, data: bytes, alignment: int = 64, version: int = 1) -> bytes:
    """Assemble a file with consistent CRCs around an arbitrary header JSON document."""
    header = json.dumps(document).encode() if not isinstance(document, bytes) else document
    data_offset = -(-(64 + len(header)) // alignment) * alignment
    fixed = struct.pack("<8sIIQQQQQI", b"PUMICE\x00\x1a", version, alignment, 64, len(header),
                        data_offset, len(data), data_offset + len(data), zlib.crc32(header))
    fixed += struct.pack("<I", zlib.crc32(fixed))
    return fixed + header + b"\x00" * (data_offset - 64 - len(header)) + data


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.pumice"
    write_small_file(path)
    return path


# ------------------------------------------------------------------ packing

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 31, 32, 77, 128])
def test_packing_matches_bit_by_bit_reference(bits, k):
    codes = RNG.integers(0, 2 ** bits, (5, k))
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (5, packed_row_bytes(k, bits))
    np.testing.assert_array_equal(packed, reference_pack(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, k), codes)


def test_packing_three_bits_block_is_twelve_bytes():
    assert packed_row_bytes(32, 3) == 12
    codes = np.arange(32).reshape(1, 32) % 8
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, 3), 3, 32), codes)


def test_packing_keeps_leading_axes_and_rejects_bad_input():
    codes = RNG.integers(0, 4, (2, 3, 40))
    packed = pack_codes(codes, 2)
    assert packed.shape == (2, 3, 16)
    np.testing.assert_array_equal(unpack_codes(packed, 2, 40), codes)
    with pytest.raises(ValueError):
        pack_codes(np.array([[4]]), 2)
    with pytest.raises(ValueError):
        pack_codes(np.array([[1]]), 5)
    with pytest.raises(ValueError):
        unpack_codes(np.zeros((1, 8), np.uint8), 2, 33)


# ------------------------------------------------------------------ round trip

def test_round_trip_exact(small_file):
    path = small_file.parent / "again.pumice"
    arrays, bf16, codes, rtn_parts = write_small_file(path)
    with PumiceFile(path) as f:
        assert f.version == 1 and f.alignment == 64
        assert f.metadata["note"] == "ünïcode ✓"
        np.testing.assert_array_equal(f.part("dense.f32", "weight"), arrays["f32"])
        np.testing.assert_array_equal(f.part("dense.f16", "weight"), arrays["f16"])
        assert f.tensors["dense.bf16"].parts["weight"].dtype == "bf16"
        np.testing.assert_array_equal(f.part("dense.bf16", "weight"),
                                      bf16.view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(dequantize(f, "dense.bf16"), bf16.float().numpy())
        for part, array in rtn_parts.items():
            np.testing.assert_array_equal(f.part("layer.rtn", part), array)
        assert f.blob("tokenizer.json") == b'{"hello": "world"}'
        assert f.blob("empty") == b""
        # Alignment of every part, and the order of the file.
        for info in f.tensors.values():
            for part in info.parts.values():
                assert part.offset % 64 == 0
                assert (f.header.data_offset + part.offset) % 64 == 0
        assert list(f.tensors) == ["dense.f32", "dense.f16", "dense.bf16", "layer.rtn",
                                   "tokenizer.json", "empty"]
        # rtn reference dequantizer.
        group = np.arange(70) // 64
        expected = (rtn_parts["scales"].astype(np.float32)[:, group] * codes
                    + rtn_parts["mins"].astype(np.float32)[:, group])
        np.testing.assert_allclose(dequantize(f, "layer.rtn"), expected, rtol=1e-6, atol=1e-6)
        assert stored_bits(f.tensors["layer.rtn"]) == 8 * (6 * 36 + 2 * 6 * 2 * 2)


def test_every_dtype_round_trips(tmp_path):
    register_test_kind()
    path = tmp_path / "dtypes.pumice"
    values = {
        "f32": np.float32, "f16": np.float16, "i8": np.int8, "u8": np.uint8, "i16": np.int16,
        "u16": np.uint16, "i32": np.int32, "u32": np.uint32}
    arrays = {}
    with PumiceWriter(path, {}) as writer:
        for dtype, np_type in values.items():
            info = np.iinfo(np_type) if np.dtype(np_type).kind in "iu" else None
            array = (RNG.integers(info.min, info.max, (3, 4), dtype=np_type, endpoint=True)
                     if info else RNG.standard_normal((3, 4)).astype(np_type))
            arrays[dtype] = array
            writer.add_tensor(f"t.{dtype}", "test_raw", [3, 4], {"dtype": dtype}, {"data": array})
        bits = RNG.integers(0, 2**16, (3, 4), dtype=np.uint16)
        writer.add_tensor("t.bf16", "test_raw", [3, 4], {"dtype": "bf16"}, {"data": ("bf16", bits)})
    with PumiceFile(path) as f:
        for dtype, array in arrays.items():
            assert f.tensors[f"t.{dtype}"].parts["data"].dtype == dtype
            np.testing.assert_array_equal(f.part(f"t.{dtype}", "data"), array)
        np.testing.assert_array_equal(f.part("t.bf16", "data"), bits)


def test_fixed_header_layout(small_file):
    raw = small_file.read_bytes()
    magic, version, alignment, json_offset, json_len, data_offset, data_len, file_len, json_crc = \
        struct.unpack_from("<8sIIQQQQQI", raw)
    assert magic == b"PUMICE\x00\x1a" and version == 1 and alignment == 64 and json_offset == 64
    assert file_len == len(raw) == data_offset + data_len
    assert data_offset % 64 == 0 and data_offset >= 64 + json_len
    assert json_crc == zlib.crc32(raw[64:64 + json_len])
    assert struct.unpack_from("<I", raw, 60)[0] == zlib.crc32(raw[:60])
    document = json.loads(raw[64:64 + json_len])
    assert set(document) == {"metadata", "tensors"}
    assert all(b == 0 for b in raw[64 + json_len:data_offset])


def test_writer_rejects_bad_tensors(tmp_path):
    with PumiceWriter(tmp_path / "bad.pumice", {}) as writer:
        weight = np.zeros((2, 2), np.float32)
        writer.add_tensor("w", "dense", [2, 2], {}, {"weight": weight})
        cases = [
            ("w", "dense", [2, 2], {}, {"weight": weight}),                    # duplicate name
            ("x", "nope", [2, 2], {}, {"weight": weight}),                     # unknown kind
            ("x", "dense", [2, 3], {}, {"weight": weight}),                    # shape mismatch
            ("x", "dense", [2, 2], {}, {"weight": weight.astype(np.int32)}),   # dtype
            ("x", "dense", [2, 2], {}, {"weight": weight, "extra": weight}),   # extra part
            ("x", "dense", [2, 2], {}, {"weight": weight.astype(np.float64)}),  # f64
            ("x", "rtn", [2, 64], {"bits": 5, "group_size": 64}, {}),          # bad bits
            ("x", "rtn", [2, 64], {"bits": 4, "group_size": 48}, {}),          # bad group
        ]
        for case in cases:
            with pytest.raises(FormatError, match="'[wx]'"):
                writer.add_tensor(*case)
    assert PumiceFile(tmp_path / "bad.pumice").tensors.keys() == {"w"}


def test_writer_cleans_up_after_an_exception(tmp_path):
    path = tmp_path / "aborted.pumice"
    with pytest.raises(RuntimeError):
        with PumiceWriter(path, {}) as writer:
            writer.add_blob("b", b"x" * 100)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_dequantize_parts_matches_file(small_file):
    with PumiceFile(small_file) as f:
        info = f.tensors["layer.rtn"]
        parts = {name: np.array(f.part(info.name, name)) for name in info.parts}
        np.testing.assert_array_equal(
            dequantize_parts("rtn", info.shape, info.params, parts), dequantize(f, "layer.rtn"))


def test_close_with_live_views(small_file):
    f = PumiceFile(small_file)
    view = f.part("dense.f32", "weight")
    f.close()
    assert view.sum() == view.sum()  # the mapping stays valid while the view lives
    with pytest.raises(FormatError, match="closed"):
        f.part("dense.f32", "weight")


# ------------------------------------------------------------------ rejection

def test_rejects_wrong_magic_truncation_and_flips(small_file, tmp_path):
    raw = small_file.read_bytes()
    bad = tmp_path / "bad.pumice"

    def expect(data: bytes, pattern: str):
        bad.write_bytes(data)
        with pytest.raises(FormatError, match=pattern) as info:
            PumiceFile(bad)
        assert str(bad) in str(info.value)

    expect(b"GGUF" + raw[4:], "not a .pumice file")
    expect(raw[:40], "shorter than")
    expect(raw[:-1], "truncated")
    expect(raw + b"\x00", "trailing")
    expect(raw[:12] + b"\x41" + raw[13:], "fixed header CRC")
    flipped = bytearray(raw)
    flipped[70] ^= 0x10
    expect(bytes(flipped), "header JSON CRC")
    document, data, _ = split_file(raw)
    last = max(((p["offset"], t["name"], n) for t in document["tensors"]
                for n, p in t["parts"].items() if p["length"]), key=lambda x: x[0])
    flipped = bytearray(raw)
    flipped[len(raw) - len(data) + last[0]] ^= 0x01
    expect(bytes(flipped), f"CRC-32 mismatch.*{last[1]}|{last[1]}.*CRC-32 mismatch")
    bad.write_bytes(bytes(flipped))
    PumiceFile(bad, verify=False).close()  # the CRC check is the only thing that fails


def test_rejects_newer_version_naming_both(small_file, tmp_path):
    document, data, _ = split_file(small_file.read_bytes())
    bad = tmp_path / "v2.pumice"
    bad.write_bytes(build_file(document, data, version=2))
    with pytest.raises(FormatError, match="version 2.*version 1"):
        PumiceFile(bad)


STRUCTURAL_MUTATIONS = {
    "not an object": lambda d: [d],
    "extra top-level key": lambda d: {**d, "extra": 1},
    "metadata not object": lambda d: {**d, "metadata": []},
    "tensors not array": lambda d: {**d, "tensors": {}},
    "unknown kind": lambda d: _edit(d, 0, kind="mystery"),
    "missing part": lambda d: _edit(d, 3, parts=_drop(d["tensors"][3]["parts"], "mins")),
    "extra part": lambda d: _edit(d, 0, parts={**d["tensors"][0]["parts"],
                                               "more": d["tensors"][0]["parts"]["weight"]}),
    "bad dtype": lambda d: _edit_part(d, 0, "weight", dtype="f64"),
    "wrong dtype for kind": lambda d: _edit_part(d, 3, "scales", dtype="u16"),
    "shape mismatch": lambda d: _edit(d, 0, shape=[5, 3]),
    "length mismatch": lambda d: _edit_part(d, 0, "weight", length=12),
    "unaligned offset": lambda d: _edit_part(d, 1, "weight", offset=65),
    "region outside": lambda d: _edit_part(d, 0, "weight", offset=1 << 40),
    "overlap": lambda d: _edit_part(d, 1, "weight",
                                    offset=d["tensors"][0]["parts"]["weight"]["offset"]),
    "bad rtn bits": lambda d: _edit(d, 3, params={"bits": 5, "group_size": 64}),
    "bool bits": lambda d: _edit(d, 3, params={"bits": True, "group_size": 64}),
    "duplicate name": lambda d: {**d, "tensors": d["tensors"] + [d["tensors"][0]]},
    "negative shape": lambda d: _edit(d, 1, shape=[-7]),
    "float offset": lambda d: _edit_part(d, 0, "weight", offset=0.5),
    "tokenizer blob missing": lambda d: {**d, "metadata": {**d["metadata"],
                                                           "tokenizer": {"blob": "nope"}}},
    "no name": lambda d: _edit(d, 0, name=None),
    "unknown entry key": lambda d: _edit(d, 0, extra=1),
    "unknown part key": lambda d: _edit_part(d, 0, "weight", extra=1),
}


def _drop(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


def _edit(document, index, **changes):
    document = json.loads(json.dumps(document))
    document["tensors"][index].update(changes)
    return document


def _edit_part(document, index, part, **changes):
    document = json.loads(json.dumps(document))
    document["tensors"][index]["parts"][part].update(changes)
    return document


@pytest.mark.parametrize("mutation", sorted(STRUCTURAL_MUTATIONS))
def test_rejects_structurally_invalid_headers(small_file, tmp_path, mutation):
    """Headers with valid CRCs but contents that break the spec."""
    document, data, alignment = split_file(small_file.read_bytes())
    bad = tmp_path / "bad.pumice"
    bad.write_bytes(build_file(STRUCTURAL_MUTATIONS[mutation](document), data, alignment))
    with pytest.raises(FormatError) as info:
        PumiceFile(bad)
    assert str(bad) in str(info.value)


def test_fuzzing_raises_only_format_errors(small_file, tmp_path):
    """Random corruptions of a small file: always FormatError with a message, nothing else."""
    raw = small_file.read_bytes()
    document, data, alignment = split_file(raw)
    header = json.dumps(document).encode()
    rand = random.Random(20251123)
    bad = tmp_path / "fuzz.pumice"
    outcomes = {"rejected": 0, "accepted": 0}
    for trial in range(300):
        choice = trial % 4
        if choice == 0:    # flip random bits anywhere
            blob = bytearray(raw)
            for _ in range(rand.randint(1, 8)):
                blob[rand.randrange(len(blob))] ^= 1 << rand.randrange(8)
        elif choice == 1:  # truncate or extend
            cut = rand.randrange(len(raw) + 64)
            blob = bytearray(raw[:cut] if cut < len(raw) else raw + bytes(cut - len(raw)))
        elif choice == 2:  # corrupt the header JSON but keep its CRCs consistent
            text = bytearray(header)
            for _ in range(rand.randint(1, 4)):
                text[rand.randrange(len(text))] = rand.randrange(256)
            blob = bytearray(build_file(bytes(text), data, alignment))
        else:              # overwrite a fixed-header field with random bytes, fix the CRC
            blob = bytearray(raw)
            offset = rand.choice([8, 12, 16, 24, 32, 40, 48, 56])
            blob[offset:offset + 4] = rand.randbytes(4)
            blob[60:64] = struct.pack("<I", zlib.crc32(bytes(blob[:60])))
        bad.write_bytes(bytes(blob))
        try:
            PumiceFile(bad).close()
            outcomes["accepted"] += 1
        except FormatError as err:
            assert str(err)
            outcomes["rejected"] += 1
    print("fuzz outcomes:", outcomes)
    assert outcomes["rejected"] >= 250, outcomes


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pumice"):
        PumiceFile(tmp_path / "missing.pumice")


def test_directory_and_empty_file_are_rejected(tmp_path):
    with pytest.raises(FormatError, match="directory"):
        PumiceFile(tmp_path)
    (tmp_path / "empty.pumice").write_bytes(b"")
    with pytest.raises(FormatError, match="0 bytes"):
        PumiceFile(tmp_path / "empty.pumice")


def test_expected_parts_for_rtn():
    parts = expected_parts("rtn", (10, 100), {"bits": 3, "group_size": 32})
    assert parts == {"codes": (("u8",), (10, 48)), "scales": (("f16",), (10, 4)),
                     "mins": (("f16",), (10, 4))}
