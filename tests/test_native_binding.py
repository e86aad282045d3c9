"""The cffi binding itself: header parsing, library lookup, object lifetimes, argument checks."""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from pumice.runtime import native
from pumice.runtime.native import (InvalidArgumentError, LibraryNotFoundError, NativeModel,
                                   PumiceError, cdef_source, decode_batch)

from tiny_model import write_tiny_llama

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "include" / "pumice.h"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("binding") / "tiny.pumice"
    write_tiny_llama(path, max_position_embeddings=64)
    return path


def test_cdef_from_the_header_declares_every_function():
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(cdef_source(HEADER.read_text()))
    source = cdef_source(HEADER.read_text())
    assert "extern" not in source and "#" not in source
    for function in ("pumice_version", "pumice_last_error", "pumice_model_open", "pumice_forward",
                     "pumice_decode_batch", "pumice_linear_apply", "pumice_tensor_dequantize"):
        assert function in source
    assert ffi.sizeof("pumice_model_info") == 8 * 4 + 2 * 8


def test_missing_library_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PUMICE_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(LibraryNotFoundError, match="does not name a file"):
        native.load_library()
    monkeypatch.delenv("PUMICE_LIBRARY")
    monkeypatch.setattr(native, "_package_dirs", lambda: [tmp_path])
    with pytest.raises(LibraryNotFoundError, match="pip install"):
        native.load_library()
    with pytest.raises(LibraryNotFoundError, match="CUDA"):
        native.load_library("cuda")


def test_library_version():
    assert native.library_version().count(".") == 2


def test_bad_device_and_threads(tiny_path):
    with pytest.raises(ValueError, match="device"):
        NativeModel(tiny_path, device="tpu")
    with pytest.raises(ValueError, match="n_threads"):
        NativeModel(tiny_path, n_threads=-1)


def test_closing_the_model_closes_its_sessions(tiny_path):
    model = NativeModel(tiny_path, n_threads=1)
    session = model.new_session(16)
    session.forward([1, 2, 3])
    model.close()
    assert model.closed and session.closed
    with pytest.raises(PumiceError, match="closed"):
        session.forward([4])
    with pytest.raises(PumiceError, match="closed"):
        model.new_session()
    model.close()  # idempotent
    session.close()


def test_a_session_keeps_its_model_alive(tiny_path):
    session = NativeModel(tiny_path, n_threads=1).new_session(16)
    gc.collect()
    assert session.forward([1, 2, 3]).shape == (128,)
    assert session.n_past == 3 and session.n_ctx == 16
    del session
    gc.collect()


def test_context_manager_and_forward_variants(tiny_path):
    with NativeModel(tiny_path, n_threads=1) as model:
        with model.new_session() as session:
            assert session.n_ctx == 64  # the model's maximum
            all_rows = session.forward(np.array([5, 6, 7], dtype=np.int64), logits_all=True)
            assert all_rows.shape == (3, 128) and all_rows.dtype == np.float32
            assert session.forward(8, return_logits=False) is None
            assert session.n_past == 4
            session.truncate(3)
            assert session.n_past == 3
    assert session.closed


def test_python_side_argument_checks(tiny_path):
    with NativeModel(tiny_path, n_threads=1) as model:
        session = model.new_session(8)
        with pytest.raises(InvalidArgumentError, match="at least one token"):
            session.forward([])
        with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
            session.forward([1, 128])
        with pytest.raises(InvalidArgumentError, match="integer"):
            session.forward([1.5])
        with pytest.raises(InvalidArgumentError, match="distinct"):
            decode_batch([session, session], [1, 2])
        with pytest.raises(InvalidArgumentError, match="2 sessions but 1 tokens"):
            decode_batch([session, model.new_session(8)], [1])
        with pytest.raises(InvalidArgumentError, match="input features"):
            model.linear_apply("model.layers.0.mlp.up_proj.weight", np.zeros((2, 5), np.float32))
        with pytest.raises(InvalidArgumentError, match="no tensor"):
            model.linear_apply("nope", np.zeros((1, 64), np.float32))
        y = model.linear_apply("model.layers.0.mlp.up_proj.weight", np.ones(64, np.float32))
        w = model.dequantize("model.layers.0.mlp.up_proj.weight")
        np.testing.assert_allclose(y[0], w.sum(axis=1), rtol=1e-4, atol=1e-5)
