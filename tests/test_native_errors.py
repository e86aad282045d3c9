"""Bad input to the native runtime: every corrupt file and every bad call must raise a
PumiceError subclass with a clear message — never crash, hang or succeed silently.
"""
from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from pumice.format.writer import FIXED_HEADER_STRUCT, MAGIC, PumiceWriter
from pumice.runtime.native import (ContextFullError, InternalError, InvalidArgumentError, NativeModel,
                                   PumiceError,
                                   PumiceFormatError, PumiceIOError, UnsupportedError, decode_batch,
                                   load_library)

from tiny_model import tiny_config, tiny_metadata, write_tiny_llama

# Status codes of pumice.h.
OK, ERR_IO, ERR_FORMAT, ERR_UNSUPPORTED, ERR_INVALID, ERR_OOM, ERR_CONTEXT_FULL = range(7)


# ---- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("valid") / "tiny.pumice"
    write_tiny_llama(path, max_position_embeddings=64)
    return path


def split_file(path: Path):
    """(header document, data section bytes, alignment) of a valid file."""
    raw = path.read_bytes()
    (_, _, alignment, json_offset, json_length, data_offset, _, _, _) = FIXED_HEADER_STRUCT.unpack(raw[:60])
    document = json.loads(raw[json_offset:json_offset + json_length])
    return document, raw[data_offset:], alignment


def assemble(path: Path, document, data: bytes, alignment: int = 64, version: int = 1,
             magic: bytes = MAGIC, header_bytes: bytes | None = None) -> Path:
    """Write a file from parts with correct checksums, so that only the chosen flaw remains."""
    header = header_bytes if header_bytes is not None else json.dumps(document).encode()
    data_offset = -(-(64 + len(header)) // alignment) * alignment
    fixed = FIXED_HEADER_STRUCT.pack(magic, version, alignment, 64, len(header), data_offset, len(data),
                                     data_offset + len(data), zlib.crc32(header))
    fixed += struct.pack("<I", zlib.crc32(fixed))
    path.write_bytes(fixed + header + b"\0" * (data_offset - 64 - len(header)) + data)
    return path


def mutated(tmp_path: Path, valid_file: Path, mutate, name="mutated.pumice") -> Path:
    document, data, alignment = split_file(valid_file)
    mutate(document)
    return assemble(tmp_path / name, document, data, alignment)


def tensor(document, name):
    return next(t for t in document["tensors"] if t["name"] == name)


def open_fails(path, error=PumiceFormatError, *words, **options):
    with pytest.raises(error) as info:
        NativeModel(path, **options)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def exercise(path: Path, **options) -> None:
    """Open a file that may be corrupt: either a PumiceError, or a model that runs."""
    try:
        model = NativeModel(path, **options)
    except PumiceError as err:
        assert str(err).strip(), "empty error message"
        assert not isinstance(err, InternalError), str(err)  # a bug, not a bad file
        return
    with model:
        session = model.new_session(16)
        logits = session.forward([1, 2, 3])
        assert logits.shape == (model.vocab_size,)


# ---- the file itself ----------------------------------------------------------------------------

def test_valid_file_opens(valid_file):
    with NativeModel(valid_file) as model:
        assert model.info["num_layers"] == 2


def test_missing_file(tmp_path):
    with pytest.raises(PumiceIOError, match="no such file|No such file"):
        NativeModel(tmp_path / "absent.pumice")


def test_directory(tmp_path):
    with pytest.raises(PumiceIOError, match="directory"):
        NativeModel(tmp_path)


def raw_open(path, verify=1):
    """pumice_model_open straight through cffi (bypassing the Python-side checks)."""
    library = load_library()
    ffi, lib = library.ffi, library.lib
    options = ffi.new("pumice_model_options *")
    options.verify_checksums = verify
    out = ffi.new("pumice_model **")
    status = lib.pumice_model_open(str(path).encode() if path is not None else ffi.NULL, options, out)
    message = ffi.string(lib.pumice_last_error()).decode()
    if status == OK:
        lib.pumice_model_free(out[0])
    else:
        assert out[0] == ffi.NULL
    return status, message


def test_native_open_checks_the_path_itself(tmp_path, valid_file):
    status, message = raw_open(tmp_path)
    assert status == ERR_IO and "directory" in message and str(tmp_path) in message
    status, message = raw_open(tmp_path / "absent.pumice")
    assert status == ERR_IO and "absent.pumice" in message
    status, message = raw_open(Path("/dev/null"))
    assert status == ERR_IO and "not a regular file" in message
    status, message = raw_open(None)
    assert status == ERR_INVALID and "path" in message
    assert raw_open(valid_file) == (OK, raw_open(valid_file)[1])


def test_wrong_magic(tmp_path, valid_file):
    raw = bytearray(valid_file.read_bytes())
    raw[0:8] = b"GGUF\x03\x00\x00\x00"
    path = tmp_path / "magic.pumice"
    path.write_bytes(raw)
    open_fails(path, PumiceFormatError, "magic")
    path.write_bytes(b"hello")
    open_fails(path, PumiceFormatError, "magic")
    path.write_bytes(b"")
    open_fails(path, PumiceFormatError, "empty")


def test_truncated_file_at_many_lengths(tmp_path, valid_file):
    raw = valid_file.read_bytes()
    lengths = sorted(set([1, 7, 8, 9, 32, 59, 60, 63, 64, 65, 100, len(raw) // 2, len(raw) - 64,
                          len(raw) - 1] + random.Random(0).sample(range(1, len(raw)), 40)))
    path = tmp_path / "truncated.pumice"
    for length in lengths:
        path.write_bytes(raw[:length])
        message = open_fails(path, PumiceFormatError)
        assert "truncated" in message or (length < 64 and "magic" in message), message


def test_trailing_garbage(tmp_path, valid_file):
    path = tmp_path / "longer.pumice"
    path.write_bytes(valid_file.read_bytes() + b"\0" * 10)
    open_fails(path, PumiceFormatError, "trailing")


def test_every_fixed_header_byte_is_checked(tmp_path, valid_file):
    raw = valid_file.read_bytes()
    path = tmp_path / "flipped.pumice"
    for i in range(64):
        corrupt = bytearray(raw)
        corrupt[i] ^= 0x10
        path.write_bytes(corrupt)
        message = open_fails(path, PumiceFormatError)
        assert "magic" in message or "fixed header checksum" in message, message


def test_flipped_header_json_bytes(tmp_path, valid_file):
    raw = valid_file.read_bytes()
    json_length = FIXED_HEADER_STRUCT.unpack(raw[:60])[4]
    path = tmp_path / "flipped.pumice"
    for i in random.Random(1).sample(range(64, 64 + json_length), 30):
        corrupt = bytearray(raw)
        corrupt[i] ^= 0x01
        path.write_bytes(corrupt)
        open_fails(path, PumiceFormatError, "header JSON checksum")


def test_flipped_tensor_data_fails_its_crc(tmp_path, valid_file):
    document, data, _ = split_file(valid_file)
    raw = valid_file.read_bytes()
    data_offset = len(raw) - len(data)
    entry = tensor(document, "model.layers.1.mlp.up_proj.weight")
    part = entry["parts"]["weight"]
    corrupt = bytearray(raw)
    corrupt[data_offset + part["offset"] + part["length"] // 2] ^= 0x40
    path = tmp_path / "data.pumice"
    path.write_bytes(corrupt)
    open_fails(path, PumiceFormatError, "CRC-32", "model.layers.1.mlp.up_proj.weight", "'weight'")
    # Skipping the check is the caller's explicit choice: the file then opens.
    NativeModel(path, verify_checksums=False).close()


def test_newer_version_names_both_versions(tmp_path, valid_file):
    document, data, alignment = split_file(valid_file)
    path = assemble(tmp_path / "v2.pumice", document, data, alignment, version=2)
    open_fails(path, UnsupportedError, "version 2", "version 1")
    path = assemble(tmp_path / "v0.pumice", document, data, alignment, version=0)
    open_fails(path, PumiceFormatError, "version 0")


def test_bad_alignment(tmp_path, valid_file):
    document, data, _ = split_file(valid_file)
    path = assemble(tmp_path / "align.pumice", document, data, alignment=96)
    open_fails(path, PumiceFormatError, "alignment")


# ---- the header JSON ----------------------------------------------------------------------------

@pytest.mark.parametrize("header,words", [
    (b"", ["invalid JSON", "byte 0"]),
    (b"[]", ["not an object"]),
    (b'{"metadata": {}, "tensors": []} x', ["after the JSON value"]),
    (b'{"metadata": {}, "tensors": [],}', ["invalid JSON"]),
    (b'{"metadata": {}, "tensors": [], "extra": 1}', ["extra"]),
    (b'{"metadata": {}, "metadata": {}, "tensors": []}', ["duplicate"]),
    (b'{"metadata": {"a": "\\ud800"}, "tensors": []}', ["surrogate"]),
    (b'{"metadata": {"a": "\xff"}, "tensors": []}', ["UTF-8"]),
    (b'{"metadata": {"a": 01}, "tensors": []}', ["leading zero"]),
    (b'{"metadata": {"a": NaN}, "tensors": []}', ["invalid JSON"]),
    (b'{"metadata": ' + b"[" * 100 + b"]" * 100 + b', "tensors": []}', ["nesting"]),
    (b'{"metadata": {"a": "tab\there"}, "tensors": []}', ["control character"]),
], ids=["empty", "array", "trailing", "trailing-comma", "extra-key", "duplicate", "lone-surrogate",
        "bad-utf8", "leading-zero", "nan", "deep", "control-char"])
def test_bad_header_json(tmp_path, header, words):
    path = assemble(tmp_path / "json.pumice", None, b"", header_bytes=header)
    open_fails(path, PumiceFormatError, *words)


def test_json_escapes_and_surrogate_pairs_are_decoded(tmp_path, valid_file):
    # A tensor name with an escaped astral character must round-trip exactly.
    name = "model.\U0001F600.\u00e9\t\"x\"/\\"
    document, data, alignment = split_file(valid_file)
    document["tensors"].append({"name": name, "kind": "blob", "shape": [0], "params": {},
                                "parts": {"data": {"dtype": "u8", "shape": [0], "offset": 0,
                                                   "length": 0, "crc32": 0}}})
    header = json.dumps(document, ensure_ascii=True).encode()
    assert b"\\ud83d\\ude00" in header
    path = assemble(tmp_path / "escapes.pumice", None, data, alignment, header_bytes=header)
    with NativeModel(path) as model:
        with pytest.raises(InvalidArgumentError, match="blob"):
            model.dequantize(name, shape=[0])


def _set(path_in_document, value):
    """A mutation that sets document[tensor named path[0]][path[1]]...[path[-1]] = value."""
    def mutate(document):
        target = tensor(document, path_in_document[0])
        for key in path_in_document[1:-1]:
            target = target[key]
        target[path_in_document[-1]] = value
    return mutate


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("mutate,error,words", [
    (_set([Q, "parts", "weight", "dtype"], "f64"), PumiceFormatError, [Q, "dtype 'f64'"]),
    (_set([Q, "parts", "weight", "length"], 100), PumiceFormatError, [Q, "length 100"]),
    (_set([Q, "parts", "weight", "offset"], 32), PumiceFormatError, [Q, "alignment"]),
    (_set([Q, "parts", "weight", "offset"], 1 << 40), PumiceFormatError, [Q, "outside the data section"]),
    (_set([Q, "parts", "weight", "offset"], (1 << 63) - 64), PumiceFormatError, [Q, "outside"]),
    (_set([Q, "parts", "weight", "shape"], [1 << 40, 1 << 40]), PumiceFormatError, [Q, "overflow"]),
    (_set([Q, "parts", "weight", "shape"], [-1, 64]), PumiceFormatError, [Q, "negative"]),
    (_set([Q, "parts", "weight", "crc32"], 1 << 33), PumiceFormatError, [Q, "crc32"]),
    (_set([Q, "parts", "weight", "crc32"], 1.5), PumiceFormatError, [Q, "crc32"]),
    (_set([Q, "kind"], "gptq"), UnsupportedError, [Q, "gptq"]),
    (_set([Q, "shape"], [64, 32]), PumiceFormatError, [Q, "shape"]),
    (_set([Q, "parts"], {}), PumiceFormatError, [Q, "weight"]),
    (_set([Q, "name"], "model.layers.0.self_attn.k_proj.weight"), PumiceFormatError, ["two tensors"]),
    (lambda d: d["tensors"].remove(tensor(d, Q)), PumiceFormatError, ["missing tensor", Q]),
    (lambda d: d.pop("tensors"), PumiceFormatError, ["tensors"]),
    (lambda d: d["metadata"]["config"].pop("head_dim"), PumiceFormatError, ["head_dim"]),
    (lambda d: d["metadata"]["config"].update(num_key_value_heads=3), PumiceFormatError,
     ["num_key_value_heads 3"]),
    (lambda d: d["metadata"]["config"].update(hidden_size=0), PumiceFormatError, ["hidden_size"]),
    (lambda d: d["metadata"]["config"].update(vocab_size=1 << 40), PumiceFormatError, ["vocab_size"]),
    (lambda d: d["metadata"]["config"].update(rms_norm_eps="small"), PumiceFormatError, ["rms_norm_eps"]),
    (lambda d: d["metadata"]["config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     UnsupportedError, ["yarn"]),
    (lambda d: d["metadata"]["config"].update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     PumiceFormatError, ["low_freq_factor"]),
    (lambda d: d["metadata"].update(architecture="gpt2"), UnsupportedError, ["gpt2"]),
    (lambda d: d["metadata"].pop("architecture"), PumiceFormatError, ["architecture"]),
    (lambda d: d["metadata"].pop("config"), PumiceFormatError, ["config"]),
], ids=["dtype", "length", "misaligned", "outside", "offset-overflow", "shape-overflow",
        "negative-shape", "crc-range", "crc-float", "unknown-kind", "logical-shape", "no-parts",
        "duplicate-name", "missing-tensor", "no-tensors", "no-head-dim", "heads-not-divisible",
        "zero-size", "huge-vocab", "eps-type", "yarn", "llama3-incomplete", "gpt2", "no-architecture",
        "no-config"])
def test_bad_header_content(tmp_path, valid_file, mutate, error, words):
    open_fails(mutated(tmp_path, valid_file, mutate), error, *words)


def test_overlapping_parts(tmp_path, valid_file):
    # Pointing a part at another's bytes also breaks its CRC, which is checked first; without
    # the CRC check the overlap itself must still be caught.
    path = mutated(tmp_path, valid_file, _set([Q, "parts", "weight", "offset"], 0))
    open_fails(path, PumiceFormatError, "overlaps", Q, "model.embed_tokens.weight",
               verify_checksums=False)


def test_unused_tensor_of_unknown_kind(tmp_path, valid_file):
    def add(document):
        document["tensors"].append({"name": "extra.weight", "kind": "mystery", "shape": [4, 4], "params": {},
                                    "parts": {"x": {"dtype": "u8", "shape": [0], "offset": 0, "length": 0,
                                                    "crc32": 0}}})
    open_fails(mutated(tmp_path, valid_file, add), UnsupportedError, "mystery")


def test_unknown_metadata_keys_are_ignored(tmp_path, valid_file):
    path = mutated(tmp_path, valid_file, lambda d: d["metadata"].update(future_feature={"x": [1, 2]}))
    NativeModel(path).close()


# ---- random corruption ----------------------------------------------------------------------------

def test_fuzz_random_corruptions(tmp_path, valid_file):
    """250 random flips, truncations and overwrites; each either fails cleanly or runs."""
    raw = valid_file.read_bytes()
    rng = random.Random(1234)
    path = tmp_path / "fuzz.pumice"
    json_end = 64 + FIXED_HEADER_STRUCT.unpack(raw[:60])[4]
    for case in range(250):
        corrupt = bytearray(raw)
        action = case % 5
        if action == 0:
            for _ in range(rng.randint(1, 8)):
                corrupt[rng.randrange(len(corrupt))] ^= 1 << rng.randrange(8)
        elif action == 1:
            corrupt = corrupt[:rng.randrange(len(corrupt))]
        elif action == 2:
            start = rng.randrange(len(corrupt))
            corrupt[start:start + rng.randint(1, 64)] = bytes(rng.randrange(256) for _ in range(64))
            corrupt = corrupt[:len(raw)] if rng.random() < 0.5 else corrupt
        elif action == 3:
            # Aim at the fixed header and the JSON, where the parser and validator live.
            corrupt[rng.randrange(json_end)] = rng.randrange(256)
        else:
            corrupt += bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
        path.write_bytes(bytes(corrupt))
        exercise(path, verify_checksums=bool(case % 2))


def test_fuzz_header_json_with_valid_checksums(tmp_path, valid_file):
    """Random edits of the header document, re-checksummed so that the validator must catch them."""
    rng = random.Random(99)
    document, data, alignment = split_file(valid_file)
    path = tmp_path / "fuzz-json.pumice"
    values = [None, True, -1, 0, 1, 3, 63, 64, 65, 2 ** 31, 2 ** 63 - 1, 2 ** 64, 1.5, -0.0, 1e308,
              "", "f16", "u8", "dense", "rtn", "blob", "llama", [], [0], [1, 2], [2 ** 40, 2 ** 40], {}]

    def containers(node, out):
        if isinstance(node, (dict, list)):
            out.append(node)
            for child in (node.values() if isinstance(node, dict) else node):
                containers(child, out)
        return out

    for case in range(200):
        doc = json.loads(json.dumps(document))
        for _ in range(rng.randint(1, 3)):
            target = rng.choice(containers(doc, []))
            if not target:
                continue
            key = rng.choice(list(target.keys()) if isinstance(target, dict) else range(len(target)))
            if rng.random() < 0.2:
                del target[key]
            else:
                target[key] = rng.choice(values)
        assemble(path, doc, data, alignment)
        exercise(path, verify_checksums=bool(case % 2))


# ---- bad calls ------------------------------------------------------------------------------------

@pytest.fixture
def model(valid_file):
    with NativeModel(valid_file) as opened:
        yield opened


def test_token_out_of_range(model):
    session = model.new_session()
    for bad in (-1, 128, 10 ** 6):
        with pytest.raises(InvalidArgumentError, match="vocabulary"):
            session.forward([1, bad])
    assert session.n_past == 0
    # The same through the C ABI directly (no Python-side check).
    ffi, lib = model._library.ffi, model._library.lib
    tokens = np.array([1, 128], dtype=np.int32)
    logits = np.empty(128, dtype=np.float32)
    status = lib.pumice_forward(session._handle(), ffi.from_buffer("int32_t[]", tokens), 2,
                                ffi.from_buffer("float[]", logits, require_writable=True), 0)
    assert status == ERR_INVALID
    assert "token id 128 at index 1" in ffi.string(lib.pumice_last_error()).decode()
    status = lib.pumice_forward(session._handle(), ffi.from_buffer("int32_t[]", tokens), 0, ffi.NULL, 0)
    assert status == ERR_INVALID
    status = lib.pumice_forward(ffi.NULL, ffi.from_buffer("int32_t[]", tokens), 1, ffi.NULL, 0)
    assert status == ERR_INVALID
    assert session.n_past == 0


def test_context_full_leaves_the_cache_unchanged(model):
    session = model.new_session(8)
    before = session.forward([1, 2, 3, 4, 5, 6])
    with pytest.raises(ContextFullError) as info:
        session.forward([7, 8, 9])
    message = str(info.value)
    assert "6" in message and "3" in message and "8" in message, message
    assert session.n_past == 6
    session.truncate(5)
    assert np.allclose(session.forward([6]), before, atol=1e-6)
    session.forward([7, 8])
    assert session.n_past == 8
    with pytest.raises(ContextFullError):
        session.forward([1])


def test_n_ctx_larger_than_the_model(model):
    with pytest.raises(InvalidArgumentError, match="n_ctx 65 exceeds"):
        model.new_session(65)
    assert model.new_session(64).n_ctx == 64
    assert model.new_session().n_ctx == 64


def test_truncate_out_of_range(model):
    session = model.new_session()
    session.forward([1, 2, 3])
    for bad in (-1, 4):
        with pytest.raises(InvalidArgumentError, match="n_keep"):
            session.truncate(bad)
    assert session.n_past == 3


def test_decode_batch_bad_calls(model, valid_file):
    a, b = model.new_session(4), model.new_session(4)
    a.forward([1, 2, 3, 4])
    b.forward([1])
    with pytest.raises(ContextFullError):
        decode_batch([b, a], [1, 2])
    assert (a.n_past, b.n_past) == (4, 1)  # all or nothing
    ffi, lib = model._library.ffi, model._library.lib

    def raw(sessions, tokens):
        handles = ffi.new("pumice_session *[]", [s._handle() for s in sessions])
        ids = np.array(tokens, dtype=np.int32)
        logits = np.empty((len(sessions), 128), dtype=np.float32)
        status = lib.pumice_decode_batch(handles, ffi.from_buffer("int32_t[]", ids), len(sessions),
                                         ffi.from_buffer("float[]", logits, require_writable=True))
        return status, ffi.string(lib.pumice_last_error()).decode()

    c = model.new_session(4)
    assert raw([b, b], [1, 2]) == (ERR_INVALID, raw([b, b], [1, 2])[1])
    assert "twice" in raw([b, b], [1, 2])[1]
    assert raw([b, c], [1, 500])[0] == ERR_INVALID
    with NativeModel(valid_file) as other:
        d = other.new_session(4)
        status, message = raw([b, d], [1, 2])
        assert status == ERR_INVALID and "another model" in message
    assert raw([b, c], [1, 2])[0] == OK
    assert (b.n_past, c.n_past) == (2, 1)


def test_linear_and_dequantize_bad_names(model):
    with pytest.raises(InvalidArgumentError, match="no tensor"):
        model.dequantize("nope", shape=[1])
    ffi, lib = model._library.ffi, model._library.lib
    x = np.zeros(64, dtype=np.float32)
    y = np.zeros(128, dtype=np.float32)
    status = lib.pumice_linear_apply(model._handle(), b"model.norm.weight", ffi.from_buffer("float[]", x), 1,
                                     ffi.from_buffer("float[]", y, require_writable=True))
    assert status == ERR_INVALID
    assert "not a linear layer" in ffi.string(lib.pumice_last_error()).decode()
    status = lib.pumice_tensor_dequantize(model._handle(), b"lm_head.weight",
                                          ffi.from_buffer("float[]", y, require_writable=True), 128)
    assert status == ERR_INVALID
    assert "too small" in ffi.string(lib.pumice_last_error()).decode()


# ---- the "tensors" architecture ---------------------------------------------------------------------

def test_tensors_only_file(tmp_path):
    path = tmp_path / "tensors.pumice"
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        writer.add_tensor("w", "dense", [48, 96], {}, {"weight": w})
        writer.add_tensor("v", "dense", [96], {}, {"weight": w[0]})
        writer.add_blob("notes", b"hello")
    with NativeModel(path) as model:
        assert model.info["num_layers"] == 0 and model.info["vocab_size"] == 0
        assert model.info["n_params"] == 48 * 96
        x = rng.standard_normal((3, 96)).astype(np.float32)
        assert np.allclose(model.linear_apply("w", x), x @ w.T, rtol=1e-5, atol=1e-5)
        assert np.array_equal(model.dequantize("w"), w)
        assert np.array_equal(model.dequantize("v"), w[0])
        with pytest.raises(UnsupportedError, match="tensors only"):
            model.new_session()


def test_tensors_only_file_with_unknown_kind(tmp_path):
    path = tmp_path / "tensors.pumice"
    with PumiceWriter(path, {"architecture": "tensors"}, check_kinds=False) as writer:
        writer.add_tensor("w", "mystery", [4, 4], {}, {"weight": np.zeros((4, 4), np.float32)})
    open_fails(path, UnsupportedError, "mystery")


def test_cuda_without_cuda_build(valid_file):
    library = load_library()
    ffi, lib = library.ffi, library.lib
    options = ffi.new("pumice_model_options *")
    options.device = 1
    out = ffi.new("pumice_model **")
    status = lib.pumice_model_open(str(valid_file).encode(), options, out)
    if status == OK:  # a CUDA build with a GPU
        lib.pumice_model_free(out[0])
        return
    message = ffi.string(lib.pumice_last_error()).decode()
    assert status in (ERR_UNSUPPORTED, 7), message
    assert message


def test_tiny_config_fixture_is_consistent():
    assert tiny_config()["head_dim"] * tiny_config()["num_attention_heads"] == tiny_config()["hidden_size"]
    assert tiny_metadata(tiny_config())["architecture"] == "llama"
