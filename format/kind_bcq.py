"""Storage kind `bcq`: binary-coded weights with power-of-two group scales (docs/FORMAT.md).

    W[n, k] = row_scales[n] * sum_{i < q} 2^E[n, k // g, i] * (+1 if bit(n, i, k) else -1)

Rows are stored in tiles of 32 so that one 32-byte load holds the same eight columns of 32 rows,
which is what the LUT GEMM kernels look up (csrc/src/lut_gemm_cpu.h):

- ``planes``: u8 ``[T, KB, q, 32]`` with ``T = ceil(N / 32)``, ``KB = ceil(K / 8)``; bit ``b`` of
  ``planes[t, j, i, r]`` is plane ``i``'s sign bit of row ``32 t + r`` and column ``8 j + b``.
- ``exponents``: i8 ``[T, G, q, 32]`` with ``G = ceil(K / g)``, values in [-64, 63].
- ``row_scales``: f16 ``[N]``.

Rows past N and columns past K are zero padding.
"""
from __future__ import annotations

import numpy as np

from .kinds import int_param, register_kind, require_matrix

TILE_ROWS = 32
MAX_BITS = 8
MAX_GROUP_SIZE = 1024
MIN_EXPONENT = -64
MAX_EXPONENT = 63


def bcq_layout(shape, params) -> tuple[int, int, int, int, int, int, int]:
    """(N, K, q, g, T, KB, G) of a `bcq` tensor, validated (ValueError with the reason)."""
    n, k = require_matrix(shape)
    bits = int_param(params, "bits", range(1, MAX_BITS + 1))
    group_size = int_param(params, "group_size", range(8, MAX_GROUP_SIZE + 1, 8))
    # "kind" is how a composite kind names a sub-tensor's own kind in its params.
    extra = set(params) - {"bits", "group_size", "kind"}
    if extra:
        raise ValueError(f"unexpected parameters {sorted(extra)}")
    tiles = -(-n // TILE_ROWS)
    return n, k, bits, group_size, tiles, -(-k // 8), -(-k // group_size)


def _describe_bcq(shape, params):
    n, _, bits, _, tiles, col_bytes, groups = bcq_layout(shape, params)
    return {"planes": ("u8", (tiles, col_bytes, bits, TILE_ROWS)),
            "exponents": ("i8", (tiles, groups, bits, TILE_ROWS)),
            "row_scales": ("f16", (n,))}


def pack_bcq(signs: np.ndarray, exponents: np.ndarray, row_scales: np.ndarray,
             group_size: int) -> dict[str, np.ndarray]:
    """Parts of a `bcq` tensor from its factors.

    signs: bool ``[q, N, K]`` (True is +1); exponents: integers ``[N, G, q]``; row_scales: ``[N]``.
    """
    signs = np.asarray(signs, dtype=bool)
    q, n, k = signs.shape
    tiles, col_bytes = -(-n // TILE_ROWS), -(-k // 8)
    groups = -(-k // group_size)
    exponents = np.asarray(exponents)
    if exponents.shape != (n, groups, q):
        raise ValueError(f"exponents must have shape {(n, groups, q)}, got {exponents.shape}")
    if exponents.min() < MIN_EXPONENT or exponents.max() > MAX_EXPONENT:
        raise ValueError(f"exponents must lie in [{MIN_EXPONENT}, {MAX_EXPONENT}]")
    padded = np.zeros((q, tiles * TILE_ROWS, col_bytes * 8), dtype=bool)
    padded[:, :n, :k] = signs
    packed = np.packbits(padded, axis=-1, bitorder="little")  # [q, T*32, KB]
    planes = packed.reshape(q, tiles, TILE_ROWS, col_bytes).transpose(1, 3, 0, 2)
    exp = np.zeros((tiles * TILE_ROWS, groups, q), dtype=np.int8)
    exp[:n] = exponents
    exp = exp.reshape(tiles, TILE_ROWS, groups, q).transpose(0, 2, 3, 1)
    return {"planes": np.ascontiguousarray(planes),
            "exponents": np.ascontiguousarray(exp),
            "row_scales": np.asarray(row_scales, dtype=np.float16).reshape(n)}


def unpack_bcq(shape, params, planes: np.ndarray, exponents: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_bcq's layout: (signs bool [q, N, K], exponents int8 [N, G, q])."""
    n, k, bits, _, tiles, col_bytes, groups = bcq_layout(shape, params)
    planes = np.asarray(planes, dtype=np.uint8).reshape(tiles, col_bytes, bits, TILE_ROWS)
    rows = planes.transpose(2, 0, 3, 1).reshape(bits, tiles * TILE_ROWS, col_bytes)
    signs = np.unpackbits(rows, axis=-1, bitorder="little")[:, :n, :k].astype(bool)
    exp = np.asarray(exponents, dtype=np.int8).reshape(tiles, groups, bits, TILE_ROWS)
    exp = exp.transpose(0, 3, 1, 2).reshape(tiles * TILE_ROWS, groups, bits)[:n]
    return signs, exp


def bcq_reconstruct(signs: np.ndarray, exponents: np.ndarray, row_scales: np.ndarray,
                    group_size: int) -> np.ndarray:
    """The definition, in float64: rs[n] * sum_i 2^E[n, k // g, i] * (±1)."""
    q, n, k = signs.shape
    column_group = np.arange(k) // group_size
    alpha = np.ldexp(1.0, np.asarray(exponents, dtype=np.int64))[:, column_group, :]  # [N, K, q]
    pm = np.where(signs, 1.0, -1.0).transpose(1, 2, 0)  # [N, K, q]
    return np.asarray(row_scales, dtype=np.float64)[:, None] * (alpha * pm).sum(axis=-1)


def _dequantize_bcq(view):
    n, k, bits, group_size, *_ = bcq_layout(view.shape, view.params)
    signs, exp = unpack_bcq(view.shape, view.params, view.part("planes"), view.part("exponents"))
    if exp.size and (exp.min() < MIN_EXPONENT or exp.max() > MAX_EXPONENT):
        raise ValueError(f"tensor {view.name!r}: bcq exponents outside [{MIN_EXPONENT}, {MAX_EXPONENT}]")
    scales = view.part_float32("row_scales")
    return bcq_reconstruct(signs, exp, scales, group_size).astype(np.float32)


def _summarize_bcq(shape, params):
    return f"b={params.get('bits')} g={params.get('group_size')}"


def stored_bits_per_weight(n: int, k: int, bits: int, group_size: int) -> float:
    """Bits the tensor occupies per logical weight, padding and all overhead counted."""
    tiles, col_bytes, groups = -(-n // TILE_ROWS), -(-k // 8), -(-k // group_size)
    stored = tiles * col_bytes * bits * TILE_ROWS + tiles * groups * bits * TILE_ROWS + 2 * n
    return 8.0 * stored / (n * k)


register_kind("bcq", _dequantize_bcq, _describe_bcq, _summarize_bcq)
