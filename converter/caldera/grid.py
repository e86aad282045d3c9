"""Per-group asymmetric uniform grids, exactly as the `rtn` storage kind stores them.

A grid maps a group of weights w to codes c ∈ {0 .. 2^b − 1} with w ≈ scale · c + min, where
scale and min are float16 in the file. Grids here are computed, then rounded to float16 *before*
any code is chosen, so that the codes the quantizers pick are optimal for the values the runtime
will actually use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Shrink factors tried for each group's [min, max] range (clipping search): with incoherent
# (near-Gaussian) weights, clipping the extremes lowers the mean squared error at 2–3 bits.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclass
class GroupGrid:
    """Float16-representable scale and min per (row, group): both [N, G] float32."""
    scales: torch.Tensor
    mins: torch.Tensor
    bits: int
    group_size: int


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def grid_for(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) in float16-representable float32 for the range [lo, hi]."""
    levels = (1 << bits) - 1
    scale = _f16(((hi - lo) / levels).clamp_min(1e-8))
    # Guard the float16 range: scales below its smallest normal lose precision, 0 is useless.
    scale = torch.where(scale <= 0, torch.full_like(scale, 6.1e-5), scale)
    return scale, _f16(lo)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bits: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) of w on a grid given per element (broadcast shapes)."""
    levels = (1 << bits) - 1
    codes = torch.clamp(torch.round((w - mins) / scale), 0, levels)
    return codes, codes * scale + mins


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] → [N, G, group_size], zero-padding the last group."""
    n, k = w.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)  # repeat: keeps min/max unchanged
    return w.reshape(n, groups, group_size)


def fit_grid(w: torch.Tensor, bits: int, group_size: int, weights: torch.Tensor | None = None,
             clip: bool = True) -> GroupGrid:
    """Per-group grid for w [N, K] minimising Σ weights_k (w − ŵ)² over the clip ratios.

    weights: optional [K] importance of each column (e.g. diag(H)); None means uniform.
    """
    w = w.float()
    n, k = w.shape
    g = _grouped(w, group_size)
    if weights is None:
        wt = torch.ones(1, 1, group_size, device=w.device)
    else:
        wt = _grouped(weights.float().reshape(1, k).expand(1, k), group_size).reshape(1, -1, group_size)
        if k % group_size:  # padded columns must not count
            mask = torch.ones(k + (-k) % group_size, device=w.device)
            mask[k:] = 0
            wt = wt * mask.reshape(1, -1, group_size)
    lo_all, hi_all = g.amin(dim=2), g.amax(dim=2)
    best_err = best_scale = best_min = None
    for ratio in (CLIP_RATIOS if clip else (1.0,)):
        mid = (lo_all + hi_all) / 2
        half = (hi_all - lo_all) / 2 * ratio
        scale, mins = grid_for(mid - half, mid + half, bits)
        _, deq = quantize_with(g, scale[..., None], mins[..., None], bits)
        err = ((deq - g) ** 2 * wt).sum(dim=2)
        if best_err is None:
            best_err, best_scale, best_min = err, scale, mins
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_min = torch.where(better, mins, best_min)
    return GroupGrid(best_scale, best_min, bits, group_size)


def expand(grid: GroupGrid, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element [N, K] scale and min of a grid."""
    column_group = torch.arange(k, device=grid.scales.device) // grid.group_size
    return grid.scales[:, column_group], grid.mins[:, column_group]


def round_to_grid(w: torch.Tensor, grid: GroupGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain round-to-nearest on a grid: (codes uint8 [N, K], dequantized float32 [N, K])."""
    scale, mins = expand(grid, w.shape[1])
    codes, deq = quantize_with(w.float(), scale, mins, grid.bits)
    return codes.to(torch.uint8), deq
