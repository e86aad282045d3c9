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

from .grid import GroupGrid, fit_grid, quantize_with

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
    if u is None and h is not None:
        u = inverse_cholesky_upper(h, damp)
    importance = None if h is None else h.double().diagonal().float()
    groups = -(-k // group_size)
    scales = torch.zeros(n, groups)
    mins = torch.zeros(n, groups)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    deq = torch.zeros(n, k)
    # Blocks hold whole groups so that a group's grid sees all feedback from earlier columns
    # (a single group spanning the row is fitted before any feedback, so any block works).
    if group_size < k:
        block = max(group_size, (block // group_size) * group_size) if group_size <= block else group_size
    scale = mins_col = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1]
        errors = torch.zeros(n, b1 - b0)
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
            c, q = quantize_with(wb[:, j], scale, mins_col, bits)
            codes[:, col] = c.to(torch.uint8)
            deq[:, col] = q
            if u is None:
                continue
            err = (wb[:, j] - q) / u[col, col]
            wb[:, j + 1:] -= err[:, None] * u[col, col + 1:b1][None, :]
            errors[:, j] = err
        if u is not None and b1 < k:
            w[:, b1:] -= errors @ u[b0:b1, b1:]
    return Quantized(codes, GroupGrid(scales, mins, bits, group_size), deq)


def weighted_error(e: torch.Tensor, h: torch.Tensor) -> float:
    """tr(E H Eᵀ) = E‖E x‖² over the calibration distribution (float64)."""
    e = e.double()
    return float(((e @ h.double()) * e).sum())
