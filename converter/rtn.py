"""Per-group asymmetric round-to-nearest quantization: the `rtn` kind of docs/FORMAT.md.

Each row is cut into groups of `group_size` columns; a group stores b-bit codes and an f16
(scale, min) pair, W ≈ scale * code + min. Plain min/max scaling wastes most of the code range on
a few outliers, which costs a lot at 2-3 bits, so each group's range is chosen by two cheap,
vectorised steps that only ever lower its squared error:

1. Clipping search: try the range [α·min, α·max] for a grid of shrink factors α ∈ [0.5, 1]
   (min and max of a weight group bracket 0, so shrinking toward 0 clips both tails) and keep,
   per group, the α with the least squared error.
2. Least-squares refit: with the codes fixed, the best (scale, min) is a 1-D linear regression of
   the weights on the codes; refit, round to f16, re-round the codes, and keep the result only
   for groups whose error went down. Alternating these is a monotone (Lloyd-style) descent.

Every error is measured with the f16-rounded scale and min that the file will hold, so what is
optimised is exactly what the runtime reconstructs.
"""
from __future__ import annotations

import numpy as np
import torch

from pumice.format.packing import pack_codes, packed_row_bytes

RTN_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZE = 64
# Shrink factors tried by the clipping search (8-bit codes have no outliers worth clipping).
DEFAULT_GRID = 16
MIN_SHRINK = 0.5
DEFAULT_REFINE_STEPS = 2
# Rows per chunk: bounds temporary memory to a few times chunk_rows * K floats.
_CHUNK_ELEMENTS = 1 << 17
_F16_MAX = 65504.0


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_F16_MAX, _F16_MAX).to(torch.float16).to(torch.float32)


def _codes_for(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, qmax: int) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round((w - low[..., None]) / safe[..., None]), 0, qmax)


def _group_error(w, mask, codes, scale, low) -> torch.Tensor:
    diff = (codes * scale[..., None] + low[..., None] - w) * mask
    return (diff * diff).sum(-1)


def _quantize_groups(w: torch.Tensor, mask: torch.Tensor, bits: int, grid: int,
                     refine_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [R, G, g] float32 (padding anywhere mask is 0) -> codes [R, G, g], scale, min [R, G]."""
    qmax = (1 << bits) - 1
    big = torch.finfo(torch.float32).max
    w_min = torch.where(mask, w, torch.full_like(w, big)).amin(-1)
    w_max = torch.where(mask, w, torch.full_like(w, -big)).amax(-1)
    if w_min.abs().max() > _F16_MAX or w_max.abs().max() > _F16_MAX:
        raise ValueError("weights exceed the f16 range of rtn scales and mins")

    best_err = best_scale = best_low = None
    alphas = torch.linspace(1.0, MIN_SHRINK, grid) if grid > 1 else torch.ones(1)
    for alpha in alphas.tolist():
        low = _f16(w_min * alpha)
        scale = _f16((w_max * alpha - low) / qmax)
        codes = _codes_for(w, scale, low, qmax)
        err = _group_error(w, mask, codes, scale, low)
        if best_err is None:
            best_err, best_scale, best_low = err, scale, low
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_low = torch.where(better, low, best_low)

    count = mask.sum(-1).to(torch.float32).expand_as(best_err)
    for _ in range(refine_steps):
        codes = _codes_for(w, best_scale, best_low, qmax) * mask
        sum_q = codes.sum(-1)
        sum_w = (w * mask).sum(-1)
        sum_qq = (codes * codes).sum(-1)
        sum_qw = (codes * w * mask).sum(-1)
        denom = count * sum_qq - sum_q * sum_q
        ok = denom > 0
        scale = torch.where(ok, (count * sum_qw - sum_q * sum_w) / torch.where(ok, denom, 1.0),
                            best_scale)
        scale = _f16(scale.clamp(min=0.0))
        low = _f16((sum_w - scale * sum_q) / count.clamp(min=1.0))
        codes = _codes_for(w, scale, low, qmax)
        err = _group_error(w, mask, codes, scale, low)
        better = err < best_err
        if not bool(better.any()):
            break
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, low, best_low)

    codes = _codes_for(w, best_scale, best_low, qmax) * mask
    return codes.to(torch.uint8), best_scale, best_low


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 grid: int | None = None, refine_steps: int = DEFAULT_REFINE_STEPS
                 ) -> dict[str, np.ndarray]:
    """Quantize a [N, K] matrix to the parts of the `rtn` kind: packed codes, f16 scales, mins.

    grid: clipping-search points (default 16 below 8 bits, 1 at 8 bits); refine_steps: least-
    squares refits. Works in row chunks, so memory stays a few times one chunk.
    """
    if bits not in RTN_BITS:
        raise ValueError(f"rtn bits must be one of {RTN_BITS}, got {bits}")
    if group_size % 32 or not 32 <= group_size <= 4096:
        raise ValueError(f"rtn group_size must be a multiple of 32 in [32, 4096], got {group_size}")
    if weight.dim() != 2:
        raise ValueError(f"rtn quantizes matrices, got shape {list(weight.shape)}")
    if grid is None:
        grid = 1 if bits == 8 else DEFAULT_GRID
    n, k = weight.shape
    groups = -(-k // group_size)
    padded = groups * group_size
    mask = (torch.arange(padded) < k).reshape(groups, group_size)
    chunk = max(1, _CHUNK_ELEMENTS // padded)
    codes_out = np.empty((n, packed_row_bytes(k, bits)), np.uint8)
    scales_out = np.empty((n, groups), np.float16)
    mins_out = np.empty((n, groups), np.float16)
    with torch.no_grad():
        for start in range(0, n, chunk):
            rows = weight[start:start + chunk].to(torch.float32)
            if padded != k:
                rows = torch.nn.functional.pad(rows, (0, padded - k))
            codes, scale, low = _quantize_groups(rows.reshape(-1, groups, group_size), mask,
                                                 bits, grid, refine_steps)
            codes_out[start:start + chunk] = pack_codes(codes.reshape(-1, padded)[:, :k].numpy(), bits)
            scales_out[start:start + chunk] = scale.to(torch.float16).numpy()
            mins_out[start:start + chunk] = low.to(torch.float16).numpy()
    return {"codes": codes_out, "scales": scales_out, "mins": mins_out}


def dequantize_rtn(parts: dict[str, np.ndarray], shape, bits: int, group_size: int) -> torch.Tensor:
    """Float32 reconstruction of `quantize_rtn`'s parts (the reference in pumice.format.kinds)."""
    from pumice.format.kinds import dequantize_parts
    return torch.from_numpy(dequantize_parts("rtn", tuple(shape),
                                             {"bits": bits, "group_size": group_size}, parts))
