"""BCQ (ShiftAddLLM) quantizer, `bcq` storage kind and LUT GEMM kernels (csrc/src/lut_gemm_cpu.cpp).

Tolerances, per output y[b, n] against y64, the float64 product with the reconstructed matrix:
  * exact LUT modes (exact4, exact8, scalar4) and the dequant baseline, f32 tables and sums:
        |y - y64| <= 1e-5 * sum_k |W[n, k] x[b, k]|
  * int8 tables (the default): each table entry of group G is rounded to a multiple of
    d_G = max_chunk sum|x_chunk| / 127, so it moves by at most d_G / 2; a row reads one entry per
    4 columns and plane, weighted by |rs * 2^e|:
        |y - y64| <= sum_{G, i} |rs_n 2^{E[n,G,i]}| * chunks(G) * d_G / 2 * (1 + 1e-3) + f32 term
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pumice.converter.bcq import allocate_bits, quantize_bcq
from pumice.format import FormatError, PumiceFile
from pumice.format.kind_bcq import (MAX_EXPONENT, MIN_EXPONENT, bcq_reconstruct, pack_bcq,
                                    stored_bits_per_weight, unpack_bcq)
from pumice.format.writer import PumiceWriter
from pumice.runtime.native import NativeModel, PumiceFormatError

EXACT_MODES = ("exact4", "exact8", "scalar4", "dequant")
F32_RTOL = 1e-5
# (N, K, q, g): ragged last tiles (N % 32), ragged last groups (K % g), K not a multiple of 8.
SHAPES = [(33, 40, 3, 16), (70, 200, 2, 64), (64, 576, 4, 128), (5, 13, 1, 8),
          (100, 1000, 8, 1024), (31, 300, 3, 96)]


# ---- independent references ----------------------------------------------------------------

def planes_reference(signs: np.ndarray) -> np.ndarray:
    """FORMAT.md, bit by bit: bit b of planes[t, j, i, r] is plane i's sign of row 32t + r,
    column 8j + b (1 = +1); padding rows and columns are 0."""
    q, n, k = signs.shape
    tiles, col_bytes = -(-n // 32), -(-k // 8)
    out = np.zeros((tiles, col_bytes, q, 32), np.uint8)
    for i in range(q):
        for row in range(n):
            for col in range(k):
                if signs[i, row, col]:
                    out[row // 32, col // 8, i, row % 32] |= np.uint8(1 << (col % 8))
    return out


def random_bcq(rng, n, k, q, g):
    groups = -(-k // g)
    signs = rng.random((q, n, k)) < 0.5
    exponents = rng.integers(-8, 3, size=(n, groups, q))
    row_scales = rng.uniform(0.25, 2.0, n).astype(np.float16)
    return signs, exponents, row_scales


def write_tensors(path, tensors):
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        for name, (shape, params, parts) in tensors.items():
            writer.add_tensor(name, "bcq", shape, params, parts)


@pytest.fixture(scope="module")
def bcq_file(tmp_path_factory):
    rng = np.random.default_rng(1234)
    path = tmp_path_factory.mktemp("bcq") / "random.pumice"
    cases, tensors = {}, {}
    for index, (n, k, q, g) in enumerate(SHAPES):
        signs, exponents, row_scales = random_bcq(rng, n, k, q, g)
        name = f"w{index}"
        tensors[name] = ([n, k], {"bits": q, "group_size": g}, pack_bcq(signs, exponents, row_scales, g))
        cases[name] = (signs, exponents, row_scales, g)
    write_tensors(path, tensors)
    return path, cases


# ---- packing and the reference dequantizer ---------------------------------------------------

def test_pack_matches_format_definition_and_round_trips():
    rng = np.random.default_rng(0)
    for n, k, q, g in [(33, 40, 3, 16), (5, 13, 2, 8), (64, 64, 1, 32)]:
        signs, exponents, row_scales = random_bcq(rng, n, k, q, g)
        parts = pack_bcq(signs, exponents, row_scales, g)
        np.testing.assert_array_equal(parts["planes"], planes_reference(signs))
        back_signs, back_exp = unpack_bcq((n, k), {"bits": q, "group_size": g},
                                          parts["planes"], parts["exponents"])
        np.testing.assert_array_equal(back_signs, signs)
        np.testing.assert_array_equal(back_exp, exponents)
        tiles = -(-n // 32)
        padded_rows = parts["exponents"].transpose(0, 3, 1, 2).reshape(tiles * 32, -1)[n:]
        assert not padded_rows.any()


def test_file_round_trip_is_exact(bcq_file):
    path, cases = bcq_file
    with PumiceFile(path) as f:
        for name, (signs, exponents, row_scales, g) in cases.items():
            info = f.tensor(name)
            assert info.kind == "bcq"
            back_signs, back_exp = unpack_bcq(info.shape, info.params, f.part(name, "planes"),
                                              f.part(name, "exponents"))
            np.testing.assert_array_equal(back_signs, signs)
            np.testing.assert_array_equal(back_exp, exponents)
            np.testing.assert_array_equal(f.part(name, "row_scales"), row_scales)
            expected = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), g)
            np.testing.assert_array_equal(f.dequantize(name), expected.astype(np.float32))
    model = NativeModel(path)
    for name, (signs, exponents, row_scales, g) in cases.items():
        expected = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), g)
        # Each weight is a sum of q signed powers of two times an f16: at most q roundings.
        np.testing.assert_allclose(model.dequantize(name), expected, rtol=1e-6, atol=0)
    model.close()


# ---- LUT GEMM against the dense product ------------------------------------------------------

@pytest.mark.parametrize("mode", EXACT_MODES)
def test_lut_gemm_exact_modes_equal_dense_product(bcq_file, mode, monkeypatch):
    monkeypatch.setenv("PUMICE_BCQ_LUT", mode)
    path, cases = bcq_file
    rng = np.random.default_rng(7)
    model = NativeModel(path, n_threads=2)
    for name, (signs, exponents, row_scales, g) in cases.items():
        w = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), g)
        for batch in (1, 3, 20):
            x = rng.standard_normal((batch, w.shape[1])).astype(np.float32)
            y = model.linear_apply(name, x)
            y64 = x.astype(np.float64) @ w.T
            bound = F32_RTOL * (np.abs(x.astype(np.float64)) @ np.abs(w).T)
            assert np.all(np.abs(y - y64) <= bound), (name, batch, np.abs(y - y64).max())
    model.close()


def test_lut_gemm_int8_tables_within_bound(bcq_file, monkeypatch):
    monkeypatch.delenv("PUMICE_BCQ_LUT", raising=False)  # the default is int8
    path, cases = bcq_file
    rng = np.random.default_rng(8)
    model = NativeModel(path, n_threads=2)
    for name, (signs, exponents, row_scales, g) in cases.items():
        n, k = signs.shape[1:]
        w = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), g)
        groups = -(-k // g)
        x = rng.standard_normal((4, k)).astype(np.float32)
        x[1] *= 1e-3
        x[2, : k // 2] = 0.0
        y = model.linear_apply(name, x)
        y64 = x.astype(np.float64) @ w.T
        xp = np.zeros((4, groups * g))
        xp[:, :k] = np.abs(x)
        chunk_sums = xp.reshape(4, groups, g // 4, 4).sum(-1)  # [b, G, chunks]
        d = chunk_sums.max(-1) / 127.0                           # [b, G]
        chunks = np.array([-(-min(g, k - G * g) // 4) for G in range(groups)])  # per group
        alpha = np.abs(row_scales.astype(np.float64))[:, None, None] * np.ldexp(1.0, exponents)
        weight = alpha.sum(-1) * chunks[None, :]                 # [N, G]
        bound = 0.5 * (1 + 1e-3) * d @ weight.T + F32_RTOL * (np.abs(x) @ np.abs(w).T)
        assert np.all(np.abs(y - y64) <= bound), (name, np.abs(y - y64).max())
    model.close()


def test_bcq_as_caldera_backbone_is_configuration(tmp_path, monkeypatch):
    """CALDERA's Q in bcq: only params and prefixed parts, no bcq-specific code in CALDERA."""
    monkeypatch.setenv("PUMICE_BCQ_LUT", "exact4")
    rng = np.random.default_rng(21)
    n, k, rank = 70, 200, 8
    signs, exponents, row_scales = random_bcq(rng, n, k, 3, 64)
    q_parts = pack_bcq(signs, exponents, row_scales, 64)
    left = rng.standard_normal((n, rank)).astype(np.float32) * 0.1
    right = rng.standard_normal((rank, k)).astype(np.float32) * 0.1
    params = {"rank": rank, "transform": "none",
              "q": {"kind": "bcq", "bits": 3, "group_size": 64},
              "l": {"kind": "dense"}, "r": {"kind": "dense"}}
    parts = {**{f"q.{name}": v for name, v in q_parts.items()},
             "l.weight": left, "r.weight": right}
    path = tmp_path / "caldera.pumice"
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        writer.add_tensor("w", "caldera", [n, k], params, parts)
    w = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), 64) + \
        left.astype(np.float64) @ right.astype(np.float64)
    with PumiceFile(path) as f:
        np.testing.assert_allclose(f.dequantize("w"), w, rtol=1e-5, atol=1e-6)
    model = NativeModel(path)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = model.linear_apply("w", x)
    bound = F32_RTOL * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-6
    assert np.all(np.abs(y - x.astype(np.float64) @ w.T) <= bound)
    model.close()


# ---- corrupt tensors give clear errors -------------------------------------------------------

def _raw_file(path, shape, params, parts):
    with PumiceWriter(path, {"architecture": "tensors"}, check_kinds=False) as writer:
        writer.add_tensor("bad", "bcq", shape, params, parts)


def _expect_native_error(path, match):
    with pytest.raises(PumiceFormatError, match=match):
        model = NativeModel(path)
        try:
            model.linear_apply("bad", np.zeros((1, model.tensor_shape("bad")[1]), np.float32))
        finally:
            model.close()


def test_corrupt_tensors_are_rejected(tmp_path):
    rng = np.random.default_rng(3)
    signs, exponents, row_scales = random_bcq(rng, 40, 64, 2, 32)
    good = pack_bcq(signs, exponents, row_scales, 32)
    params = {"bits": 2, "group_size": 32}

    # The writer checks parts against the kind.
    bad_planes = dict(good, planes=good["planes"][:, :-1])
    with pytest.raises(FormatError, match="planes"):
        write_tensors(tmp_path / "w.pumice", {"bad": ([40, 64], params, bad_planes)})
    with pytest.raises(FormatError, match="group_size"):
        write_tensors(tmp_path / "w.pumice", {"bad": ([40, 64], {"bits": 2, "group_size": 12}, good)})

    # The native reader checks them again (a file need not come from our writer).
    cases = {
        "shape": ([40, 64], params, bad_planes, "planes"),
        "bits": ([40, 64], {"bits": 9, "group_size": 32}, good, "bits"),
        "group": ([40, 64], {"bits": 2, "group_size": 2048}, good, "group_size"),
        "missing": ([40, 64], params, {k: v for k, v in good.items() if k != "row_scales"}, "row_scales"),
        "dtype": ([40, 64], params, dict(good, row_scales=good["row_scales"].astype(np.float32)), "row_scales"),
    }
    bad_exponents = good["exponents"].copy()
    bad_exponents[1, 1, 1, 7] = 100
    cases["exponent"] = ([40, 64], params, dict(good, exponents=bad_exponents), "exponent 100")
    bad_scales = good["row_scales"].copy()
    bad_scales[5] = np.inf
    cases["scale"] = ([40, 64], params, dict(good, row_scales=bad_scales), "row scale")
    for label, (shape, p, parts, match) in cases.items():
        path = tmp_path / f"{label}.pumice"
        _raw_file(path, shape, p, parts)
        _expect_native_error(path, match)
        if label in ("exponent",):
            with PumiceFile(path) as f, pytest.raises((ValueError, FormatError), match="exponent"):
                f.dequantize("bad")


# ---- the quantizer ---------------------------------------------------------------------------

def _weights(rng, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    w[:, :5] *= 8  # a few outlier columns, as in real layers
    return torch.from_numpy(w)


def test_quantizer_matches_definition_and_improves_with_bits():
    rng = np.random.default_rng(5)
    w = _weights(rng, 48, 200)  # ragged: 200 = 128 + 72
    x = torch.from_numpy(rng.standard_normal((512, 200)).astype(np.float32))
    hessian = x.T @ x / 512
    errors = []
    for q in (1, 2, 3, 4):
        fit = quantize_bcq(w, q, 128, hessian)
        e = fit.exponents.numpy()
        assert e.dtype == np.int8 and e.min() >= MIN_EXPONENT and e.max() <= MAX_EXPONENT
        # The definition: every weight is rs_n * sum_i ±2^{e_i} with integral exponents, so the
        # scales αᵢ = 2^{eᵢ} are exact powers of two.
        signs = fit.signs.numpy()
        rs = fit.row_scales.numpy().astype(np.float64)
        alpha = np.ldexp(1.0, e.astype(np.int64))
        assert np.all(np.log2(alpha) == e)
        by_hand = np.zeros(w.shape)
        for i in range(q):
            pm = np.where(signs[i], 1.0, -1.0)
            by_hand += pm * alpha[:, np.arange(200) // 128, i]
        by_hand *= rs[:, None]
        np.testing.assert_allclose(fit.reconstruct().numpy(), by_hand, rtol=1e-6)
        parts = fit.parts()
        from pumice.format.kinds import dequantize_parts
        np.testing.assert_array_equal(dequantize_parts("bcq", w.shape, fit.params(), parts),
                                      by_hand.astype(np.float32))
        errors.append(fit.relative_output_error)
        assert fit.bits_per_weight() == pytest.approx(stored_bits_per_weight(48, 200, q, 128))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05


def test_greedy_nearest_value_equals_search():
    from pumice.converter.bcq import _nearest, _nearest_search, _sign_patterns
    gen = torch.Generator().manual_seed(11)
    for q in (1, 2, 3, 4, 5):
        patterns = _sign_patterns(q)
        w = torch.randn(40, 3, 64, generator=gen)
        for alpha in (torch.exp2(torch.randint(-3, 2, (40, 3, q), generator=gen).float()),
                      torch.rand(40, 3, q, generator=gen)):
            index, value = _nearest(w, alpha, patterns)
            _, best = _nearest_search(w, alpha, patterns)
            torch.testing.assert_close((w - value).abs(), (w - best).abs(), rtol=0, atol=1e-6)
            torch.testing.assert_close(value, (alpha @ patterns.T).gather(-1, index), rtol=0, atol=1e-6)


def test_hessian_objective_lowers_output_error():
    rng = np.random.default_rng(6)
    w = _weights(rng, 64, 256)
    scales = torch.from_numpy(rng.uniform(0.1, 3.0, 256).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((1024, 256)).astype(np.float32)) * scales
    hessian = x.T @ x / 1024
    plain = quantize_bcq(w, 2, 64)
    aware = quantize_bcq(w, 2, 64, hessian)
    d_plain = plain.reconstruct() - w
    plain_out = float(((d_plain @ hessian) * d_plain).sum())
    assert aware.output_error < 0.9 * plain_out


def test_allocation_meets_budget_and_prefers_sensitive_layers():
    shapes = {"a": (64, 256), "b": (64, 256), "c": (128, 256)}
    # "a" is 100x more sensitive than "b".
    costs = {"a": {2: 100.0, 3: 40.0, 4: 15.0}, "b": {2: 1.0, 3: 0.4, 4: 0.15},
             "c": {2: 10.0, 3: 4.0, 4: 1.5}}
    for budget in (2.5, 3.0, 3.4, 4.3):
        choice = allocate_bits(costs, shapes, budget, 128)
        numel = sum(n * k for n, k in shapes.values())
        used = sum(stored_bits_per_weight(*shapes[m], choice[m], 128) * shapes[m][0] * shapes[m][1]
                   for m in shapes) / numel
        assert used <= budget + 1e-9
        assert choice["a"] >= choice["b"]
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_bits(costs, shapes, 1.5, 128)


# ---- the real model --------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_bcq_end_to_end(convert_smollm2, english_text):
    from pumice.runtime.perplexity import text_perplexity
    from pumice.runtime.tokenizer import Tokenizer

    path = convert_smollm2("bcq", bits=3, mixed=False, calib="none")
    with PumiceFile(path) as f:
        kinds = {info.kind for info in f.tensors.values()}
        assert "bcq" in kinds
        assert f.metadata["provenance"]["method"] == "bcq"
    model = NativeModel(path, n_threads=2)
    tokenizer = Tokenizer.from_file(path)
    # Runs end to end through the native runtime with LUT GEMM layers. Quality is measured in
    # docs/QUALITY.md with calibration; this uncalibrated (weight-objective) conversion is only
    # checked to run: it scores far worse on this small model (docs/BCQ.md, known limits).
    result = text_perplexity(model, tokenizer, english_text[:3000], window=256)
    assert np.isfinite(result.perplexity) and result.tokens_scored > 0
    session = model.new_session(64)
    logits = session.forward(tokenizer.encode("The capital of France is"))
    assert logits.shape == (model.vocab_size,) and np.all(np.isfinite(logits))
    with PumiceFile(path) as f:
        name = "model.layers.3.mlp.down_proj.weight"
        assert f.tensor(name).kind == "bcq"
        np.testing.assert_allclose(model.dequantize(name), f.dequantize(name), rtol=1e-6, atol=1e-7)
    model.close()
