"""LDLQ: Hessian-aware rounding with error feedback (the rounding of GPTQ/QuIP/CALDERA).

Minimises tr((W − Ŵ) H (W − Ŵ)ᵀ) column by column: each column is rounded on its grid, and its
rounding error is pushed onto the not-yet-rounded columns through the upper Cholesky factor U of
H⁻¹ (H⁻¹ = Uᵀ U). This is the LDL-feedback form proven equivalent to GPTQ by the QuIP paper;
columns are processed in blocks so that the feedback to later blocks is one matrix product.

Grids are per (row, group of `group_size` columns), fitted (with the clipping search of
grid.fit_grid) when the first column of a group is reached, on the weights as updated by the
feedback so far.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import GroupGrid, expand, fit_grid, round_to_grid

DEFAULT_DAMP = 0.01


@dataclass
class Quantized:
    codes: torch.Tensor      # uint8 [N, K]
    grid: GroupGrid          # scales, mins [N, G]
    dequantized: torch.Tensor  # float32 [N, K]


def damped(h: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """H + damp · mean(diag H) · I in float64 (keeps the Cholesky factorisation well posed)."""
    h = h.double()
    diag_mean = h.diagonal().mean().clamp_min(1e-12)
    return h + damp * diag_mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def inverse_cholesky_upper(h: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Upper U with Uᵀ U = (damped H)⁻¹, float32."""
    hd = damped(h, damp)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(hd)
            break
        except RuntimeError:  # not positive definite in floating point: damp harder
            hd = hd + (10.0 ** attempt) * damp * hd.diagonal().mean() * torch.eye(
                hd.shape[0], dtype=hd.dtype, device=hd.device)
    else:
        raise RuntimeError("LDLQ: Hessian is not positive definite even after damping")
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True).float()


def ldlq(w: torch.Tensor, h: torch.Tensor | None, bits: int, group_size: int,
         damp: float = DEFAULT_DAMP, block: int = 128, u: torch.Tensor | None = None
         ) -> Quantized:
    """Quantize w [N, K] to `bits` with per-group grids, minimising the H-weighted error.

    h=None (or u given as the identity) reduces to plain round-to-nearest on fitted grids.
    `u` may be passed to reuse inverse_cholesky_upper(h) across calls with the same H.
    """
    w = w.float().clone()
    n, k = w.shape
    if u is None and h is None:
        return _round_groups(w, bits, group_size)
    if u is None:
        u = inverse_cholesky_upper(h, damp)
    importance = None if h is None else h.double().diagonal().float()
    groups = -(-k // group_size)
    scales = torch.zeros(n, groups, device=w.device)
    mins = torch.zeros(n, groups, device=w.device)
    levels = (1 << bits) - 1
    deq = torch.zeros(n, k, device=w.device)
    # Blocks hold whole groups so that a group's grid sees all feedback from earlier columns
    # (a single group spanning the row is fitted before any feedback, so any block works).
    if group_size < k:
        block = max(group_size, (block // group_size) * group_size) if group_size <= block else group_size
    scale = mins_col = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1]
        errors = torch.zeros(n, b1 - b0, device=w.device)
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:
                g_end = min(col + group_size, k)
                grid = fit_grid(w[:, col:g_end], bits, g_end - col,
                                None if importance is None else importance[col:g_end])
                gi = col // group_size
                scales[:, gi] = grid.scales[:, 0]
                mins[:, gi] = grid.mins[:, 0]
                scale, mins_col = grid.scales[:, 0], grid.mins[:, 0]
            x = wb[:, j]
            q = torch.clamp(torch.round((x - mins_col) / scale), 0, levels) * scale + mins_col
            deq[:, col] = q
            err = (x - q) / u[col, col]
            if j + 1 < b1 - b0:
                wb[:, j + 1:].addr_(err, u[col, col + 1:b1], alpha=-1.0)
            errors[:, j] = err
        if b1 < k:
            w[:, b1:] -= errors @ u[b0:b1, b1:]
    grid = GroupGrid(scales, mins, bits, group_size)
    scale_full, mins_full = expand(grid, k)
    codes = torch.clamp(torch.round((deq - mins_full) / scale_full), 0, levels).to(torch.uint8)
    return Quantized(codes, grid, codes.float() * scale_full + mins_full)


def _round_groups(w: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """Plain round-to-nearest on fitted grids (no Hessian), vectorised."""
    grid = fit_grid(w, bits, group_size)
    codes, deq = round_to_grid(w, grid)
    return Quantized(codes, grid, deq)


def weighted_error(e: torch.Tensor, h: torch.Tensor) -> float:
    """tr(E H Eᵀ) = E‖E x‖² over the calibration distribution (float32 products, float64 sum)."""
    e = e.float()
    return float(((e @ h.float()) * e).double().sum())
