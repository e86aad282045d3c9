"""CUDA `bcq` tensors (DeviceLinear, csrc/cuda/bcq_gpu.cu: a LUT GEMM, and tensor cores at 2-16
columns where an exponent covers whole units) against float64 and the CPU backend. Skipped
cleanly where there is no libpumice_cuda or no GPU (as tests/test_cuda.py).

Tolerances:
  * decode kernels, per output, against the float64 product of the reconstructed W with the
    f16-rounded activations (what the GPU sees): |y - y64| <= 2e-5 * |x16| @ |W|^T. The LUT
    kernel sums f32 tables of 4 inputs (3 roundings), segment sums (<= 32 terms), and per-slot
    partial sums (< 200 terms for these shapes): a worst case below 1.2e-5. The tensor-core path
    sums each unit's 128 signed f16 inputs per plane in the mma's f32 accumulator, then < 100
    unit sums scaled exactly by 2^e. One wrong sign bit among K inputs moves y by about 2/K of
    that scale, far above the bound.
  * against the float64 product with the unrounded f32 activations: f16 activations carry a
    relative error of 2^-11 each, so max|y - y64| / max|y64| < 3e-3 (as tests/test_cuda.py).
  * against the CPU backend's exact LUT mode (PUMICE_BCQ_LUT=exact4) on the same f16-rounded
    inputs: both are f32 computations within 2e-5 of the product, so 4e-5.
  * whole tiny model: logits' max-abs error over their max-abs value < 2e-2 (prefill runs the
    f16-dequantized weights through cuBLAS; as tests/test_cuda.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pumice.format.kind_bcq import bcq_reconstruct, pack_bcq
from pumice.format.writer import PumiceWriter
from pumice.runtime.native import NativeModel, PumiceFormatError, decode_batch

from bcq_gpu_model import random_bcq
from tiny_model import relative_error, tensor_names, tensor_shape, tiny_config, tiny_metadata

from cuda_support import assert_greedy_agrees, assert_matches_reference, greedy_on, skip_module_without_cuda

pytestmark = pytest.mark.cuda


skip_module_without_cuda()


# ---- the decode kernel on single tensors ----------------------------------------------------

# (name, N, K, q, g): ragged rows (N % 16), ragged inputs (K % 128, K % g, K % 8), every exponent
# segment size gcd(g, 128) in {128, 64, 32, 16, 8}, 1..8 planes, more than one slab (K > 1024),
# and the two shapes the grid is sized for.
MATRICES = [
    ("a", 33, 40, 3, 16), ("b", 70, 200, 2, 64), ("c", 64, 576, 4, 128), ("d", 5, 13, 1, 8),
    ("e", 100, 1000, 8, 1024), ("f", 31, 300, 3, 96), ("g", 48, 1100, 2, 48), ("h", 17, 2300, 3, 24),
    ("i", 250, 1500, 5, 200), ("j", 40, 256, 2, 256),
    ("llama_4096", 4096, 4096, 3, 128), ("llama_11008", 11008, 4096, 2, 128),
]
BATCHES = [1, 3, 8, 16, 21]  # 21: two launches (16 + 5) through linear_apply


@pytest.fixture(scope="module")
def bcq_tensors(tmp_path_factory):
    rng = np.random.default_rng(2024)
    path = tmp_path_factory.mktemp("cuda_bcq") / "bcq.pumice"
    refs = {}
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        for name, n, k, q, g in MATRICES:
            signs, exponents, row_scales = random_bcq(rng, n, k, q, g)
            writer.add_tensor(name, "bcq", [n, k], {"bits": q, "group_size": g},
                              pack_bcq(signs, exponents, row_scales, g))
            refs[name] = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), g)
    return path, refs


@pytest.fixture(scope="module")
def gpu_model(bcq_tensors):
    path, refs = bcq_tensors
    with NativeModel(path, device="cuda") as model:
        yield model, refs


def _inputs(name, batch, k):
    rng = np.random.default_rng(batch * 7919 + sum(map(ord, name)))  # fresh inputs per case
    x = rng.standard_normal((batch, k)).astype(np.float32)
    if batch >= 3:
        x[1, : k // 2] = 0.0  # exact zeros: zero segment sums must survive the 2^e step
    return x


@pytest.mark.parametrize("name", [m[0] for m in MATRICES])
@pytest.mark.parametrize("batch", BATCHES)
def test_lut_gemm_matches_float64(gpu_model, name, batch):
    model, refs = gpu_model
    w = refs[name]
    x = _inputs(name, batch, w.shape[1])
    y = model.linear_apply(name, x)
    assert y.shape == (batch, w.shape[0])
    assert np.all(np.isfinite(y)), "unwritten or non-finite outputs"
    x16 = x.astype(np.float16).astype(np.float64)
    ref16 = x16 @ w.T
    bound = 2e-5 * (np.abs(x16) @ np.abs(w).T)
    worst = np.abs(y - ref16) / np.maximum(bound, 1e-300)
    assert np.all(np.abs(y - ref16) <= bound), (name, batch, np.unravel_index(worst.argmax(), worst.shape))
    assert relative_error(y, x.astype(np.float64) @ w.T) < 3e-3


@pytest.mark.parametrize("name", ["c", "j", "llama_4096"])  # exponents per whole unit
def test_lut_gemm_without_tensor_cores(gpu_model, name, monkeypatch):
    # Where the tensor-core path takes 2-16 columns, the LUT kernel still answers when it is off.
    monkeypatch.setenv("PUMICE_CUDA_BCQ_MMA", "0")
    model, refs = gpu_model
    w = refs[name]
    x16 = _inputs(name, 16, w.shape[1]).astype(np.float16).astype(np.float64)
    y = model.linear_apply(name, x16.astype(np.float32))
    bound = 2e-5 * (np.abs(x16) @ np.abs(w).T)
    assert np.all(np.abs(y - x16 @ w.T) <= bound), name


def test_lut_gemm_matches_cpu_backend(bcq_tensors, gpu_model, monkeypatch):
    monkeypatch.setenv("PUMICE_BCQ_LUT", "exact4")  # the CPU's exact f32 tables
    path, refs = bcq_tensors
    gpu, _ = gpu_model
    with NativeModel(path, device="cpu") as cpu:
        for name, n, k, _, _ in MATRICES:
            w = refs[name]
            for batch in (1, 3, 16):
                x16 = _inputs(name, batch, k).astype(np.float16).astype(np.float32)
                y_gpu, y_cpu = gpu.linear_apply(name, x16), cpu.linear_apply(name, x16)
                bound = 4e-5 * (np.abs(x16.astype(np.float64)) @ np.abs(w).T)
                assert np.all(np.abs(y_gpu - y_cpu) <= bound), (name, batch, np.abs(y_gpu - y_cpu).max())


def test_lut_gemm_is_deterministic(gpu_model):
    model, refs = gpu_model
    x = _inputs("c", 5, refs["c"].shape[1])
    np.testing.assert_array_equal(model.linear_apply("c", x), model.linear_apply("c", x))


# ---- corrupt tensors are format errors on the GPU too ----------------------------------------

def _write_raw(path, shape, params, parts):
    with PumiceWriter(path, {"architecture": "tensors"}, check_kinds=False) as writer:
        writer.add_tensor("bad", "bcq", shape, params, parts)


def test_corrupt_tensors_are_format_errors(tmp_path):
    rng = np.random.default_rng(3)
    signs, exponents, row_scales = random_bcq(rng, 40, 64, 2, 32)
    good = pack_bcq(signs, exponents, row_scales, 32)
    params = {"bits": 2, "group_size": 32}
    bad_exponents = good["exponents"].copy()
    bad_exponents[1, 1, 1, 7] = 100
    bad_scales = good["row_scales"].copy()
    bad_scales[5] = np.inf
    cases = {
        "shape": ([40, 64], params, dict(good, planes=good["planes"][:, :-1]), "planes"),
        "bits": ([40, 64], {"bits": 9, "group_size": 32}, good, "bits"),
        "group": ([40, 64], {"bits": 2, "group_size": 12}, good, "group_size"),
        "missing": ([40, 64], params, {k: v for k, v in good.items() if k != "exponents"}, "exponents"),
        "exponent": ([40, 64], params, dict(good, exponents=bad_exponents), "exponent 100"),
        "scale": ([40, 64], params, dict(good, row_scales=bad_scales), "row scale"),
    }
    for label, (shape, p, parts, match) in cases.items():
        path = tmp_path / f"{label}.pumice"
        _write_raw(path, shape, p, parts)
        with pytest.raises(PumiceFormatError, match=match):
            with NativeModel(path, device="cuda") as model:
                model.linear_apply("bad", np.zeros((1, 64), np.float32))


# ---- a tiny Llama whose linear layers are all bcq ---------------------------------------------

CUDA_TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=344, vocab_size=500, max_position_embeddings=1024)
# (q, g) per projection: every exponent segment size, ragged groups (K % g) and, for down_proj
# (K = 344) and lm_head (N = 500), ragged inputs and rows.
PROJ_BCQ = {"q_proj": (3, 128), "k_proj": (2, 64), "v_proj": (4, 96), "o_proj": (3, 32),
            "gate_proj": (2, 48), "up_proj": (3, 24), "down_proj": (4, 64), "lm_head": (3, 128)}


def fit_bcq_greedy(w: np.ndarray, q: int, g: int):
    """A quick BCQ fit (greedy, power-of-two alphas): (signs [q, N, K], exponents [N, G, q],
    f16 row scales). Quality only needs to keep activations sane; tests compare runtimes."""
    n, k = w.shape
    groups = -(-k // g)
    row_scales = np.maximum(np.abs(w).max(axis=1), 1e-3).astype(np.float16)
    residual = w / row_scales.astype(np.float64)[:, None]
    signs = np.zeros((q, n, k), bool)
    exponents = np.zeros((n, groups, q), np.int64)
    for i in range(q):
        for grp in range(groups):
            block = residual[:, grp * g:(grp + 1) * g]
            e = np.clip(np.round(np.log2(np.maximum(np.abs(block).mean(axis=1), 2.0 ** -60))), -64, 63)
            exponents[:, grp, i] = e
            positive = block >= 0
            signs[i, :, grp * g:(grp + 1) * g] = positive
            block -= np.where(positive, 1.0, -1.0) * np.ldexp(1.0, e.astype(np.int64))[:, None]
    return signs, exponents, row_scales


def write_tiny_bcq_llama(path, seed=0, **overrides):
    """A random tiny Llama with every projection and the head in bcq (embeddings and norms dense
    f32); returns ({name: float64 tensor as stored}, config)."""
    config = tiny_config(**{**CUDA_TINY, **overrides})
    rng = np.random.default_rng(seed)
    weights = {}
    with PumiceWriter(path, tiny_metadata(config)) as writer:
        for name in tensor_names(config):
            shape = tensor_shape(name, config)
            if len(shape) == 1:
                w = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
                writer.add_tensor(name, "dense", list(shape), {}, {"weight": w})
                weights[name] = torch.from_numpy(w.astype(np.float64))
            elif name == "model.embed_tokens.weight":
                w = rng.standard_normal(shape).astype(np.float32)
                writer.add_tensor(name, "dense", list(shape), {}, {"weight": w})
                weights[name] = torch.from_numpy(w.astype(np.float64))
            else:
                proj = "lm_head" if name == "lm_head.weight" else name.split(".")[-2]
                q, g = PROJ_BCQ[proj]
                w = rng.standard_normal(shape) / math.sqrt(shape[1])
                signs, exponents, row_scales = fit_bcq_greedy(w, q, g)
                writer.add_tensor(name, "bcq", list(shape), {"bits": q, "group_size": g},
                                  pack_bcq(signs, exponents, row_scales, g))
                stored = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), g)
                weights[name] = torch.from_numpy(stored)
    return weights, config


@pytest.fixture(scope="module")
def tiny_bcq(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda_bcq_tiny") / "tiny-bcq.pumice"
    weights, config = write_tiny_bcq_llama(path)
    return path, weights, config


def test_tiny_bcq_llama_matches_reference(tiny_bcq):
    path, weights, config = tiny_bcq
    assert_matches_reference(path, weights, config, 2e-2)  # prefill: dequantize_f16 + GEMM


def test_tiny_bcq_llama_greedy_equals_cpu_backend(tiny_bcq, monkeypatch):
    monkeypatch.setenv("PUMICE_BCQ_LUT", "exact4")
    path, _, _ = tiny_bcq
    cpu, gpu = greedy_on(path, "cpu"), greedy_on(path, "cuda")  # a 20-token prompt: prefill
    assert relative_error(gpu[2], cpu[2]) < 2e-2
    assert_greedy_agrees(cpu, gpu)


def test_tiny_bcq_llama_batched_decode_and_graphs(tiny_bcq, monkeypatch):
    path, _, _ = tiny_bcq
    prompts = [[5, 6, 7], list(range(20, 45)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
    nexts = [10, 11, 12]
    out = {}
    for mode in ("1", "0"):  # captured graphs and direct launches give identical results
        monkeypatch.setenv("PUMICE_CUDA_GRAPHS", mode)
        with NativeModel(path, device="cuda") as model:
            single = []
            for p, t in zip(prompts, nexts):
                s = model.new_session(64)
                s.forward(p)
                single.append(s.forward([t]))
            sessions = []
            for p in prompts:
                s = model.new_session(64)
                s.forward(p)
                sessions.append(s)
            batched = decode_batch(sessions, nexts)  # three columns in one step
            for i in range(len(prompts)):
                assert relative_error(batched[i], single[i]) < 5e-3, i
            out[mode] = np.stack(single)
    np.testing.assert_array_equal(out["1"], out["0"])
