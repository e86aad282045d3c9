"""CALDERA / LPLR: transforms, quantizers, budgets, file format, native kernels, end to end."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pumice.converter.caldera.budget import Candidate, allocate, part_bits
from pumice.converter.caldera.decompose import CalderaConfig, RotatedProblem, decompose
from pumice.converter.caldera.hadamard import RandomizedHadamard
from pumice.converter.caldera.ldlq import ldlq, weighted_error
from pumice.converter.caldera.lplr import FactorConfig, lplr
from pumice.converter.caldera.method import encode
from pumice.format.kind_caldera import transform_matrix


def correlated_problem(n, k, seed=0, tokens=4000):
    """A weight matrix and a realistic (anisotropic, correlated) H = E[x xᵀ]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix
    x = x * torch.linspace(0.2, 3.0, k, dtype=torch.float64)  # uneven channel scales
    return w, x.T @ x / tokens


# ---------------------------------------------------------------------------------------------
# Hadamard transforms

@pytest.mark.parametrize("n", [1, 8, 64, 9, 96, 576, 1536])
def test_hadamard_is_orthogonal_in_float32(n):
    t = RandomizedHadamard.random(n, seed=n)
    m = t.matrix()
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n)
    y = t.forward(x)  # float32 path
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=2e-6)
    assert torch.allclose(t.inverse(y), x, atol=2e-6 * x.abs().max().item() * max(1, n) ** 0.5)
    # The file's reference transform (numpy, from the packed signs) is the same matrix.
    ref = transform_matrix(t.packed_signs(), n)
    np.testing.assert_allclose(ref, m.numpy(), atol=1e-12)


def test_hadamard_large_non_power_of_two():
    n = 11008  # 43 · 256 (Llama-2-7B's MLP width)
    t = RandomizedHadamard.random(n, seed=1)
    x = torch.randn(3, n)
    y = t.forward(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert (t.inverse(y) - x).abs().max() < 1e-5
    # Incoherence: a spike is spread over every coordinate.
    spike = torch.zeros(1, n)
    spike[0, 5] = 1.0
    assert t.forward(spike).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------
# Quantizers

def test_ldlq_beats_plain_rounding_and_improves_with_bits():
    w, h = correlated_problem(64, 256)
    errors = []
    for bits in (2, 3, 4):
        rounded = ldlq(w, None, bits, 64).dequantized.double()
        feedback = ldlq(w, h, bits, 64).dequantized.double()
        e_round = weighted_error(w - rounded, h)
        e_ldlq = weighted_error(w - feedback, h)
        assert e_ldlq < 0.8 * e_round, (bits, e_ldlq, e_round)
        errors.append(e_ldlq)
    assert errors[0] > errors[1] > errors[2]


def test_ldlq_codes_reproduce_its_reconstruction():
    w, h = correlated_problem(32, 96)
    q = ldlq(w, h, 3, 32)
    scales = q.grid.scales.repeat_interleave(32, dim=1)[:, :96]
    mins = q.grid.mins.repeat_interleave(32, dim=1)[:, :96]
    assert torch.equal(q.codes.float() * scales + mins, q.dequantized)
    assert int(q.codes.max()) <= 7
    # f16-representable grids (what the file stores)
    assert torch.equal(q.grid.scales.half().float(), q.grid.scales)


def test_lplr_error_decreases_with_rank_and_bits():
    g = torch.Generator().manual_seed(3)
    # A matrix with a decaying spectrum, as real weight matrices have.
    u = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(128, 96, generator=g, dtype=torch.float64))[0]
    a = (u * (0.8 ** torch.arange(96, dtype=torch.float64))) @ v.T
    _, h = correlated_problem(96, 128, seed=4)
    errors = {}
    for rank in (4, 16, 32):
        for bits in (4, 8):
            fit = lplr(a, h, rank, FactorConfig(bits, 32), FactorConfig(bits, 128),
                       torch.Generator().manual_seed(0), iters=2)
            errors[rank, bits] = weighted_error(a - fit.product.double(), h)
    total = weighted_error(a, h)
    assert errors[4, 8] > errors[16, 8] > errors[32, 8]
    assert errors[16, 4] > errors[16, 8]
    assert errors[32, 8] < 0.01 * total


def test_caldera_error_decreases_with_bits_and_rank():
    w, h = correlated_problem(96, 160, seed=5)
    problem = RotatedProblem(w, h, seed=11)
    e = {}
    for bits in (2, 3):
        for rank in (0, 16, 48):
            config = CalderaConfig(q_bits=bits, q_group_size=160, rank=rank, l_bits=8, r_bits=8,
                                   l_group_size=64, r_group_size=160)
            e[bits, rank] = decompose(problem, config, iters=2).error
    assert e[2, 0] > e[2, 16] > e[2, 48]
    assert e[3, 0] > e[3, 16]
    assert e[2, 0] > e[3, 0]
    # The alternating minimisation keeps its best iterate, so it is never worse than Q alone
    # followed by a low-rank fit of the residual (its first iterate).
    assert e[2, 16] < e[2, 0]


def test_hadamard_helps_with_outlier_columns():
    w, h = correlated_problem(64, 128, seed=6)
    w[:, 7] *= 30.0  # an outlier input channel
    config = CalderaConfig(q_bits=2, q_group_size=128, rank=0)
    rotated = decompose(RotatedProblem(w, h, seed=1, hadamard=True), config).error
    plain = decompose(RotatedProblem(w, h, seed=1, hadamard=False), config).error
    assert rotated < plain


def test_budget_allocation_is_optimal_on_small_instances():
    rng = np.random.default_rng(0)
    choices = []
    for _ in range(5):
        bits = sorted(rng.integers(10, 100, size=4).tolist())
        errs = sorted(rng.random(4).tolist(), reverse=True)
        choices.append([Candidate(str(i), b, e) for i, (b, e) in enumerate(zip(bits, errs))])
    import itertools
    for budget in (150, 220, 300):
        best = None
        for combo in itertools.product(range(4), repeat=5):
            cost = sum(choices[m][i].bits for m, i in enumerate(combo))
            err = sum(choices[m][i].error for m, i in enumerate(combo))
            if cost <= budget and (best is None or err < best):
                best = err
        if best is None:
            with pytest.raises(ValueError):
                allocate(choices, budget)
            continue
        sel = allocate(choices, budget)
        assert sum(choices[m][i].bits for m, i in enumerate(sel)) <= budget
        err = sum(choices[m][i].error for m, i in enumerate(sel))
        assert err <= best * 1.10 + 1e-12  # the Lagrangian + greedy fill is near-optimal


# ---------------------------------------------------------------------------------------------
# File format

def _write_examples(path):
    from pumice.format import PumiceWriter
    cases = {}
    w, h = correlated_problem(96, 160, seed=7)
    problem = RotatedProblem(w, h, seed=2)
    cases["caldera_q_only"] = (decompose(problem, CalderaConfig(2, 160, 0)), True)
    cases["caldera_lr"] = (decompose(problem, CalderaConfig(3, 64, 16, 4, 8, 32, 160), iters=1), True)
    cases["lplr"] = (decompose(problem, CalderaConfig(2, 160, 24, 8, 8, 32, 64), iters=1,
                               quantize_q=False), False)
    w2, h2 = correlated_problem(40, 72, seed=8)
    plain = RotatedProblem(w2, h2, seed=3, hadamard=False)
    cases["caldera_plain"] = (decompose(plain, CalderaConfig(4, 32, 8, 8, 8, 32, 64), iters=1), True)
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        for name, (result, with_q) in cases.items():
            kind, params, parts = encode(result, with_q)
            writer.add_tensor(name, kind, list(result.shape), params, parts)
    return cases


def test_file_round_trip_is_exact(tmp_path):
    from pumice.format.reader import PumiceFile
    path = tmp_path / "c.pumice"
    cases = _write_examples(path)
    with PumiceFile(path) as f:
        for name, (result, with_q) in cases.items():
            kind, params, parts = encode(result, with_q)
            info = f.tensor(name)
            assert info.kind == kind and info.params == params
            for part, array in parts.items():
                assert np.array_equal(f.part(name, part), np.asarray(array)), part
            assert info.stored_bytes * 8 == part_bits(kind, tuple(result.shape), params)
            np.testing.assert_allclose(f.dequantize(name), result.reconstruction().numpy(),
                                       rtol=0, atol=2e-6)


def test_bad_params_are_rejected(tmp_path):
    from pumice.format import PumiceWriter
    w, h = correlated_problem(40, 64, seed=9)
    result = decompose(RotatedProblem(w, h, seed=1), CalderaConfig(2, 64, 8, 8, 8, 32, 64), iters=1)
    kind, params, parts = encode(result)
    for bad in ({**params, "rank": 9}, {**params, "transform": "fourier"},
                {k: v for k, v in params.items() if k != "q"}, {**params, "extra": 1}):
        with pytest.raises(Exception):
            with PumiceWriter(tmp_path / "bad.pumice", {"architecture": "tensors"}) as writer:
                writer.add_tensor("t", kind, [40, 64], bad, parts)


# ---------------------------------------------------------------------------------------------
# Native kernels

@pytest.mark.parametrize("activations", ["f32", "int8"])
def test_native_kernel_matches_float64_reconstruction(tmp_path, monkeypatch, activations, native_model_class):
    NativeModel = native_model_class
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", activations)
    path = tmp_path / "c.pumice"
    cases = _write_examples(path)
    # f32 activations: only float32 rounding; int8: the rtn kernels quantize activations per
    # 32-block (absmax/127); measured up to ~5% of max|y| on these small shapes.
    tol = 1e-5 if activations == "f32" else 1e-1
    rng = np.random.default_rng(1)
    with NativeModel(path) as model:
        for name, (result, _) in cases.items():
            w = result.reconstruction().numpy()
            np.testing.assert_allclose(model.dequantize(name), w, atol=2e-6 * np.abs(w).max())
            for batch in (1, 3, 8):
                x = rng.standard_normal((batch, w.shape[1])).astype(np.float32)
                y = model.linear_apply(name, x)
                ref = x.astype(np.float64) @ w.T
                err = np.abs(y - ref).max() / np.abs(ref).max()
                assert err < tol, (name, batch, err)


# ---------------------------------------------------------------------------------------------
# Calibration

def test_calibration_forward_matches_transformers(smollm2_dir, english_text):
    transformers = pytest.importorskip("transformers")
    from pumice.converter.calibration import calibration_tokens, collect_hessians

    hessians = collect_hessians(smollm2_dir, english_text, n_sequences=2, seq_len=64,
                                progress=False, layers=[0, 2])
    tokens = calibration_tokens(smollm2_dir, english_text, 2, 64)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    sums = {}

    def hook(name):
        def pre(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = x.T @ x / tokens.numel()
        return pre

    for layer in (0, 2):
        for sub in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{sub}.weight"
            model.get_submodule(name[:-len(".weight")]).register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(tokens)
    for name, ref in sums.items():
        rel = (hessians[name].double() - ref).norm() / ref.norm()
        assert rel < 1e-5, (name, float(rel))
    prefix = "model.layers.0."
    assert hessians[prefix + "self_attn.q_proj.weight"] is hessians[prefix + "self_attn.v_proj.weight"]
    assert hessians[prefix + "mlp.gate_proj.weight"] is hessians[prefix + "mlp.up_proj.weight"]


def test_calibration_cache_round_trip(smollm2_dir, tmp_path):
    from pumice.converter.calibration import collect_hessians
    cache = tmp_path / "h.pt"
    text = "The quick brown fox jumps over the lazy dog. " * 40
    first = collect_hessians(smollm2_dir, text, n_sequences=2, seq_len=32, progress=False,
                             layers=[0], cache_path=cache)
    assert cache.is_file()
    second = collect_hessians(smollm2_dir, text, n_sequences=2, seq_len=32, progress=False,
                              layers=[0], cache_path=cache)
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert second[q] is second["model.layers.0.self_attn.k_proj.weight"]


# ---------------------------------------------------------------------------------------------
# End to end on SmolLM2

@pytest.mark.slow
def test_smollm2_caldera_logits_match_torch_reconstruction(convert_smollm2, smollm2_dir,
                                                          monkeypatch, native_model_class):
    transformers = pytest.importorskip("transformers")
    NativeModel = native_model_class
    from pumice.format.reader import PumiceFile

    # A fast configuration (few candidates, tiny calibration): this checks the runtime, not
    # the quality (benchmarks/quality.py does that).
    path = convert_smollm2("caldera", bits=2.5, n_sequences=2, seq_len=64, q_bits="2,3",
                           ranks="16", iters=1, rounding="nearest", progress=False)
    with PumiceFile(path) as f:
        kinds = {f.tensor(n).kind for n in f.tensors}
        assert "caldera" in kinds
        state = {name: torch.from_numpy(f.dequantize(name)) for name in f.tensors
                 if f.tensor(name).kind != "blob"}
        bpw = f.metadata["provenance"]["caldera"]["linear_bits_per_weight"]
    assert bpw <= 2.5
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    missing = model.load_state_dict(state, strict=False)
    assert not [k for k in missing.missing_keys if k != "lm_head.weight"]
    model.tie_weights()
    tokens = [1, 504, 3458, 282, 4109, 314, 253, 1345, 28, 339, 5248, 288, 7734, 30]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].double().numpy()
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", "f32")
    with NativeModel(path) as native:
        session = native.new_session(64)
        logits = session.forward(tokens, logits_all=True).astype(np.float64)
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel < 1e-3, rel
