"""CUDA `caldera` / `lplr` tensors (csrc/cuda/caldera_gpu.cu): W = T_outᵀ (Q + L·R) T_in applied
without forming W (decode), and W rebuilt as f16 rows for the prefill GEMM.

Skipped cleanly where there is no libpumice_cuda or no GPU. Tensors are random (Q, L, R through
their sub-kinds' packers, random sign vectors; tests/caldera_tensors.py), so every sub-kind,
both transforms, lplr, odd DCT factors and unaligned shapes are covered in seconds.

References: a float64 product that never forms W (`factored_apply`, itself checked against the
format's explicit transform matrices and the Python reader in tests/test_caldera_gpu_model.py),
the Python reader's reconstruction, and the CPU backend (exact f32 kernel paths).

Tolerances (max |error| / max |reference|): activations are f16 on the GPU, and so are the
rotated input x' = T_in x and the rank-k intermediate R x' (the GEMV's operand type); weights are
f16 after dequantization; accumulation and the transforms are f32. Each f16 rounding is
≤ 2^-11 relative, and they add up over a handful of stages, so 5e-3 per linear (3e-3 for the
plain rtn kinds in test_cuda.py, which have two f16 stages fewer) and 2e-2 for the logits of a
2-layer model, as in test_cuda.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pumice.runtime.native import NativeModel

from caldera_tensors import (BIG_CASE, KERNEL_CASES, factored_apply, file_weights, write_caldera_llama,
                             write_tensors)
from tiny_model import relative_error

from cuda_support import (assert_greedy_agrees, assert_matches_reference, graph_and_direct_logits, greedy_on,
                          skip_module_without_cuda)

pytestmark = pytest.mark.cuda


skip_module_without_cuda()

LINEAR_TOL = 5e-3
MODEL_TOL = 2e-2
CASES = {**KERNEL_CASES, **BIG_CASE}


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda_caldera") / "cases.pumice"
    return path, write_tensors(path, CASES, seed=11)


@pytest.fixture(scope="module")
def cuda_model(cases_file):
    with NativeModel(cases_file[0], device="cuda") as model:
        yield model


@pytest.fixture(scope="module")
def cpu_model(cases_file):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUMICE_RTN_ACTIVATIONS", "f32")  # the CPU kernels' exact paths
        mp.setenv("PUMICE_BCQ_LUT", "exact4")
        with NativeModel(cases_file[0], device="cpu") as model:
            yield model


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch", [1, 5, 16, 21])
def test_apply_matches_float64(cases_file, cuda_model, name, batch):
    _, factors = cases_file
    rng = np.random.default_rng(batch * 7919 + len(name))  # fresh inputs per case
    k = CASES[name]["shape"][1]
    x = rng.standard_normal((batch, k)).astype(np.float32)
    y = cuda_model.linear_apply(name, x)
    assert np.all(np.isfinite(y)), "unwritten or non-finite outputs"
    err = relative_error(y, factored_apply(factors[name], x))
    assert err < LINEAR_TOL, (name, batch, err)


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_apply_matches_reader_reconstruction_and_cpu_backend(cases_file, cuda_model, cpu_model, name):
    from pumice.format.reader import PumiceFile
    rng = np.random.default_rng(len(name))
    with PumiceFile(cases_file[0]) as f:
        w = f.dequantize(name).astype(np.float64)
    for batch in (1, 5, 16):
        x = rng.standard_normal((batch, w.shape[1])).astype(np.float32)
        y = cuda_model.linear_apply(name, x)
        assert relative_error(y, x.astype(np.float64) @ w.T) < LINEAR_TOL, (name, batch)
        assert relative_error(y, cpu_model.linear_apply(name, x)) < LINEAR_TOL, (name, batch)


def test_big_tensor_matches_cpu_backend(cuda_model, cpu_model):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4096)).astype(np.float32)
    assert relative_error(cuda_model.linear_apply("cal_big", x), cpu_model.linear_apply("cal_big", x)) < LINEAR_TOL


def test_repeated_calls_are_identical(cuda_model):
    """No state leaks between calls (scratch padding, accumulation into stale rows)."""
    rng = np.random.default_rng(9)
    for name in ("cal_q2_r16", "lplr_had", "cal_none"):
        k = CASES[name]["shape"][1]
        x16 = rng.standard_normal((16, k)).astype(np.float32)
        x1 = rng.standard_normal((1, k)).astype(np.float32)
        first = cuda_model.linear_apply(name, x1)
        cuda_model.linear_apply(name, x16)
        np.testing.assert_array_equal(cuda_model.linear_apply(name, x1), first)


# ---- a tiny Llama made of caldera / lplr projections ------------------------------------------

LLAMA = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=344, vocab_size=500, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda_caldera_llama") / "llama.pumice"
    config = write_caldera_llama(path, seed=3, **LLAMA)
    return path, config, file_weights(path)


@pytest.mark.parametrize("cublas", ["on", "off"])
def test_llama_prefill_and_decode_match_reference(llama, cublas, monkeypatch):
    """A 40-token prompt (prefill: dequantize_f16 + cuBLAS; with cuBLAS off, 16-token steps
    through apply), then decode steps (apply inside CUDA graphs), then short prompts."""
    if cublas == "off":
        monkeypatch.setenv("PUMICE_CUBLAS", "off")
    path, config, weights = llama
    assert_matches_reference(path, weights, config, MODEL_TOL)


def test_llama_greedy_tokens_equal_cpu_backend(llama, monkeypatch):
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", "f32")
    monkeypatch.setenv("PUMICE_BCQ_LUT", "exact4")
    path, _, _ = llama
    cpu, gpu = greedy_on(path, "cpu"), greedy_on(path, "cuda")  # a 20-token prompt: prefill
    assert relative_error(gpu[2], cpu[2]) < MODEL_TOL
    assert_greedy_agrees(cpu, gpu)


def test_llama_native_form_matches_host_f16_fallback(llama, monkeypatch):
    """PUMICE_CALDERA_GPU=0 keeps the old path (W dequantized on the host, stored as f16 tiles)."""
    path, _, _ = llama
    tokens = list(range(3, 43))
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("PUMICE_CALDERA_GPU", mode)
        with NativeModel(path, device="cuda") as model:
            s = model.new_session(64)
            prefill = s.forward(tokens[:30], logits_all=True)
            decode = np.stack([s.forward([t]) for t in tokens[30:]])
            out[mode] = (prefill, decode)
    assert relative_error(out["1"][0], out["0"][0]) < MODEL_TOL
    assert relative_error(out["1"][1], out["0"][1]) < MODEL_TOL


def test_llama_graphs_and_direct_launches_agree(llama, monkeypatch):
    path, _, _ = llama
    out = graph_and_direct_logits(path, monkeypatch)
    np.testing.assert_array_equal(out["1"], out["0"])
