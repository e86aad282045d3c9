"""Numpy model of the CUDA `bcq` layout and LUT GEMM (csrc/cuda/bcq_gpu.{cuh,cu}).

The CUDA code cannot run on CPU-only machines, so its index arithmetic is written a second time
here, in the same terms (tile of 16 rows, unit of 128 inputs, exponent segments of gcd(g, 128)
inputs, 8 slots per slab), and checked on the CPU against the file's reconstruction
(tests/test_cuda_bcq_layout.py). The GPU tests then check the kernels themselves.
"""
from __future__ import annotations

import math

import numpy as np

TILE_ROWS = 16      # rows per tile (RowMap's tiles)
UNIT = 128          # inputs per unit: one uint4 per (tile, unit, plane, row)
UNIT_BYTES = 16
FILE_TILE_ROWS = 32
SLOTS = 8           # units per slab: one per half-warp of the kernel's 4 warps
CHUNKS = UNIT // 4  # 4-input tables per unit


def layout_dims(n: int, k: int, g: int) -> dict[str, int]:
    seg = math.gcd(g, UNIT)
    return {"tiles": -(-n // TILE_ROWS), "units": -(-k // UNIT), "seg": seg, "spu": UNIT // seg}


def device_layout(planes: np.ndarray, exponents: np.ndarray, row_scales: np.ndarray,
                  n: int, k: int, q: int, g: int) -> dict[str, np.ndarray]:
    """The file's parts (FORMAT.md `bcq`) in the GPU layout of bcq_gpu.cuh:
    planes u8 [tiles, units, q, 16 rows, 16 bytes], exps i8 [tiles, units, q, 16 rows, spu],
    scales f32 [tiles * 16]."""
    d = layout_dims(n, k, g)
    tiles, units, seg, spu = d["tiles"], d["units"], d["seg"], d["spu"]
    file_tiles, kb, groups = -(-n // FILE_TILE_ROWS), -(-k // 8), -(-k // g)
    rows = np.asarray(planes, np.uint8).reshape(file_tiles, kb, q, FILE_TILE_ROWS)
    rows = rows.transpose(2, 0, 3, 1).reshape(q, file_tiles * FILE_TILE_ROWS, kb)
    padded = np.zeros((q, tiles * TILE_ROWS, units * UNIT_BYTES), np.uint8)
    padded[:, :n, :kb] = rows[:, :n]
    dev_planes = padded.reshape(q, tiles, TILE_ROWS, units, UNIT_BYTES).transpose(1, 3, 0, 2, 4)

    e = np.asarray(exponents, np.int8).reshape(file_tiles, groups, q, FILE_TILE_ROWS)
    e = e.transpose(0, 3, 1, 2).reshape(file_tiles * FILE_TILE_ROWS, groups, q)
    start = np.arange(units * spu) * seg            # first input of every segment
    valid = start < k
    group = np.where(valid, start // g, 0)
    seg_exp = np.zeros((tiles * TILE_ROWS, units * spu, q), np.int8)
    seg_exp[:n] = np.where(valid[None, :, None], e[:n][:, group, :], 0)
    dev_exps = seg_exp.reshape(tiles, TILE_ROWS, units, spu, q).transpose(0, 2, 4, 1, 3)

    scales = np.zeros(tiles * TILE_ROWS, np.float32)
    scales[:n] = np.asarray(row_scales, np.float16).astype(np.float32)
    return {"planes": np.ascontiguousarray(dev_planes), "exps": np.ascontiguousarray(dev_exps),
            "scales": scales, "n": n, "k": k, "q": q, "g": g, **d}


def word_index(dev, tile: int, unit: int, plane: int, row: int) -> int:
    """bcq_gpu::Layout::word: the uint4 (and exponent group) of (tile, unit, plane, row)."""
    return ((tile * dev["units"] + unit) * dev["q"] + plane) * TILE_ROWS + row


def reconstruct_from_device(dev) -> np.ndarray:
    """W [n, k] in float64 read back from the GPU layout, bit by bit."""
    tiles, units, q, spu, seg = dev["tiles"], dev["units"], dev["q"], dev["spu"], dev["seg"]
    bits = np.unpackbits(dev["planes"], axis=-1, bitorder="little").astype(np.float64)  # [..,128]
    signs = 2.0 * bits - 1.0
    alpha = np.ldexp(1.0, np.repeat(dev["exps"].astype(np.int64), seg, axis=-1))        # [..,128]
    w = (signs * alpha).sum(axis=2)                          # over planes: [tiles, units, 16, 128]
    w = w.transpose(0, 2, 1, 3).reshape(tiles * TILE_ROWS, units * UNIT)
    w = w * dev["scales"].astype(np.float64)[:, None]
    return w[:dev["n"], :dev["k"]]


def lut_gemm_model(dev, x16: np.ndarray) -> np.ndarray:
    """y [B, n] as the kernel computes it: f32 tables of 4 inputs, nibble look-ups, segment sums
    scaled by 2^e, per-slot partial sums added in slot order, then the row scale."""
    tiles, units, q, spu = dev["tiles"], dev["units"], dev["q"], dev["spu"]
    batch = x16.shape[0]
    x = np.zeros((batch, units * UNIT), np.float32)
    x[:, :dev["k"]] = x16[:, :dev["k"]].astype(np.float32)
    c = x.reshape(batch, units, CHUNKS, 4)
    x0, x1, x2, x3 = (c[..., i] for i in range(4))
    p01 = np.stack([-x0 - x1, x0 - x1, x1 - x0, x0 + x1], axis=-1)  # index m & 3
    p23 = np.stack([-x2 - x3, x2 - x3, x3 - x2, x2 + x3], axis=-1)  # index m >> 2
    table = (p01[..., None, :] + p23[..., :, None]).reshape(batch, units, CHUNKS, 16)  # [.., 4h+i]

    words = dev["planes"].view("<u4")                               # [tiles, units, q, 16, 4]
    j = np.arange(CHUNKS)
    nib = (words[..., j // 8] >> (4 * (j % 8)).astype(np.uint32)) & 15  # [tiles, units, q, 16, 32]
    unit_idx = np.arange(units)[None, :, None, None, None]
    chunk_idx = j[None, None, None, None, :]
    y = np.zeros((batch, tiles * TILE_ROWS), np.float64)
    for b in range(batch):
        looked = table[b][unit_idx, chunk_idx, nib]                     # [tiles, units, q, 16, 32]
        seg_sum = looked.reshape(tiles, units, q, TILE_ROWS, spu, CHUNKS // spu).sum(-1, dtype=np.float32)
        scaled = np.ldexp(seg_sum, dev["exps"].astype(np.int32))        # exact, like the exponent add
        per_unit = scaled.sum(axis=(2, 4), dtype=np.float32)            # [tiles, units, 16]
        slots = np.zeros((tiles, SLOTS, TILE_ROWS), np.float32)
        for u in range(units):
            slots[:, u % SLOTS] += per_unit[:, u]
        total = np.zeros((tiles, TILE_ROWS), np.float32)
        for s in range(SLOTS):
            total += slots[:, s]
        y[b] = (total.reshape(-1) * dev["scales"]).astype(np.float64)
    return y[:, :dev["n"]]


def random_bcq(rng, n: int, k: int, q: int, g: int, exp_range=(-8, 3)):
    """Random factors (signs bool [q, n, k], exponents [n, G, q], f16 row scales)."""
    groups = -(-k // g)
    signs = rng.random((q, n, k)) < 0.5
    exponents = rng.integers(exp_range[0], exp_range[1], size=(n, groups, q))
    row_scales = rng.uniform(0.25, 2.0, n).astype(np.float16)
    return signs, exponents, row_scales
