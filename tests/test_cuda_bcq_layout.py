"""The CUDA bcq layout and LUT GEMM indexing, modelled in numpy (tests/bcq_gpu_model.py), against
the file's reconstruction. Runs on the CPU: it checks the arithmetic that csrc/cuda/bcq_gpu.cu
implements before any GPU sees it.

Tolerances: the layout round trip is exact (float64, every weight a sum of powers of two times an
f16). The kernel model uses f32 tables and sums like the kernel: |y - y64| <= 1e-5 * |x| @ |W|^T.
"""
from __future__ import annotations

import numpy as np
import pytest

from pumice.format.kind_bcq import bcq_reconstruct, pack_bcq

from bcq_gpu_model import (TILE_ROWS, UNIT, device_layout, layout_dims, lut_gemm_model,
                           random_bcq, reconstruct_from_device, word_index)

# (N, K, q, g): every exponent-segment size (gcd(g, 128) = 128, 64, 32, 16, 8), ragged rows
# (N % 16, N % 32), ragged inputs (K % 128, K % g, K % 8), more units than one slab (K > 1024).
SHAPES = [(33, 40, 3, 16), (70, 200, 2, 64), (64, 576, 4, 128), (5, 13, 1, 8), (100, 1000, 8, 1024),
          (31, 300, 3, 96), (48, 1100, 2, 48), (17, 2300, 3, 24), (40, 256, 2, 256), (7, 130, 5, 200)]


def _case(index, shape):
    n, k, q, g = shape
    rng = np.random.default_rng(100 + index)
    signs, exponents, row_scales = random_bcq(rng, n, k, q, g)
    parts = pack_bcq(signs, exponents, row_scales, g)
    w = bcq_reconstruct(signs, exponents, row_scales.astype(np.float64), g)
    return rng, parts, w


@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_device_layout_round_trips_to_the_reconstruction(index):
    n, k, q, g = SHAPES[index]
    _, parts, w = _case(index, SHAPES[index])
    dev = device_layout(parts["planes"], parts["exponents"], parts["row_scales"], n, k, q, g)
    assert dev["planes"].shape == (dev["tiles"], dev["units"], q, TILE_ROWS, 16)
    assert dev["exps"].shape == (dev["tiles"], dev["units"], q, TILE_ROWS, dev["spu"])
    np.testing.assert_array_equal(reconstruct_from_device(dev), w)
    # Padding rows hold nothing; padding inputs have zero sign bits.
    rows = dev["planes"].transpose(0, 3, 1, 2, 4).reshape(dev["tiles"] * TILE_ROWS, -1)
    assert not rows[n:].any() and not dev["scales"][n:].any()
    bits = np.unpackbits(dev["planes"], axis=-1, bitorder="little")
    bits = bits.transpose(2, 0, 3, 1, 4).reshape(q, dev["tiles"] * TILE_ROWS, dev["units"] * UNIT)
    assert not bits[:, :, k:].any()


def test_word_index_matches_the_array_order():
    n, k, q, g = 40, 300, 3, 96
    _, parts, _ = _case(0, (n, k, q, g))
    dev = device_layout(parts["planes"], parts["exponents"], parts["row_scales"], n, k, q, g)
    flat_planes = dev["planes"].reshape(-1, 16)
    flat_exps = dev["exps"].reshape(-1)
    for tile, unit, plane, row in [(0, 0, 0, 0), (1, 2, 2, 15), (2, 1, 1, 7), (0, 2, 0, 3)]:
        w = word_index(dev, tile, unit, plane, row)
        np.testing.assert_array_equal(flat_planes[w], dev["planes"][tile, unit, plane, row])
        spu = dev["spu"]
        np.testing.assert_array_equal(flat_exps[w * spu:(w + 1) * spu], dev["exps"][tile, unit, plane, row])


def test_segments_never_straddle_groups():
    for g in range(8, 1025, 8):
        d = layout_dims(64, 4096, g)
        assert g % d["seg"] == 0 and UNIT % d["seg"] == 0 and d["spu"] in (1, 2, 4, 8, 16)


@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_lut_gemm_model_matches_float64_product(index):
    n, k, q, g = SHAPES[index]
    rng, parts, w = _case(index, SHAPES[index])
    dev = device_layout(parts["planes"], parts["exponents"], parts["row_scales"], n, k, q, g)
    batch = 3
    ldx = dev["units"] * UNIT
    x16 = np.zeros((batch, ldx), np.float16)
    x16[:, :k] = rng.standard_normal((batch, k)).astype(np.float16)
    x16[1, : k // 2] = 0  # exact zeros: segment sums of 0 must stay 0 after 2^e
    y = lut_gemm_model(dev, x16)
    x64 = x16[:, :k].astype(np.float64)
    ref = x64 @ w.T
    bound = 1e-5 * (np.abs(x64) @ np.abs(w).T) + 1e-30
    assert np.all(np.abs(y - ref) <= bound), np.abs(y - ref).max()
