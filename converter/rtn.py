"""Per-group asymmetric round-to-nearest quantization: the `rtn` kind of docs/FORMAT.md.

Each row is cut into groups of `group_size` columns; a group stores b-bit codes and an f16
(scale, min) pair, W ≈ scale * code + min. Plain min/max scaling wastes much of the code range on
a few outliers, which costs a lot at 2-3 bits, so each group's range is chosen by two cheap,
vectorised steps that only ever lower its importance-weighted squared error Σ a (Ŵ - W)²:

1. Clipping search: try the range [α·min, α·max] for a grid of shrink factors α ∈ [0.5, 1]
   (min and max of a weight group bracket 0, so shrinking toward 0 clips both tails) and keep,
   per group, the α with the least error.
2. Weighted least-squares refit: with the codes fixed, the best (scale, min) is a weighted 1-D
   linear regression of the weights on the codes; refit, round to f16, re-round the codes, and
   keep the result only for groups whose error went down (a monotone, Lloyd-style descent).

The importance a = |w| + rms(group) ("magnitude") keeps large weights accurate: with plain
squared error the search clips exactly the weights the model depends on, and perplexity gets
worse even though the weight error drops (docs/CONVERTER.md has the numbers).

Every error is measured with the f16-rounded scale and min that the file will hold, so what is
optimised is exactly what the runtime reconstructs.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pumice.format.packing import pack_codes, packed_row_bytes

RTN_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZE = 64
# Shrink factors tried by the clipping search (8-bit codes have no outliers worth clipping).
DEFAULT_GRID = 8
MIN_SHRINK = 0.5
DEFAULT_WEIGHTING = "magnitude"
DEFAULT_REFINE_STEPS = 2
# Rows per chunk: bounds temporary memory to a few times chunk_rows * K floats.
_CHUNK_ELEMENTS = 1 << 17
_F16_MAX = 65504.0
# Chunks are cache-sized, far below what torch's intra-op threads pay off on (and those threads
# spin badly on a busy machine), so torch runs single-threaded here and chunks go to a pool.
_WORKERS = max(1, min(8, os.cpu_count() or 1))


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_WORKERS, thread_name_prefix="pumice-rtn")
    return _POOL


@contextlib.contextmanager
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_F16_MAX, _F16_MAX).to(torch.float16).to(torch.float32)


def _round_codes(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, qmax: int,
                 out: torch.Tensor) -> torch.Tensor:
    """out = clamp(round((w - low) / scale), 0, qmax), in place (scale 0 gives code 0)."""
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    torch.sub(w, low[..., None], out=out)
    out.mul_(inverse[..., None]).round_().clamp_(0, qmax)
    return out


def _group_error(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 importance: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Importance-weighted squared error per group."""
    torch.mul(codes, scale[..., None], out=scratch)
    scratch.add_(low[..., None]).sub_(w)
    return scratch.square_().mul_(importance).sum(-1)


def _importance(w: torch.Tensor, weighting: str) -> torch.Tensor:
    if weighting == "uniform":
        return torch.ones_like(w)
    if weighting == "magnitude":
        # |w| plus the group's RMS: large weights count more (their errors tend to matter more
        # for the layer's output), yet small ones are never free to be zeroed.
        return w.abs() + w.square().mean(-1, keepdim=True).sqrt()
    if weighting == "square":
        return w.square() + w.square().mean(-1, keepdim=True)
    raise ValueError(f"weighting must be 'magnitude', 'square' or 'uniform', got {weighting!r}")


def _quantize_groups(w: torch.Tensor, bits: int, grid: int, refine_steps: int,
                     min_shrink: float = MIN_SHRINK, weighting: str = DEFAULT_WEIGHTING
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [R, G, g] float32 -> codes [R, G, g] (float), f16-exact scale and min [R, G]."""
    qmax = (1 << bits) - 1
    w_min = w.amin(-1)
    w_max = w.amax(-1)
    if max(w_min.abs().max().item(), w_max.abs().max().item()) > _F16_MAX:
        raise ValueError("weights exceed the f16 range of rtn scales and mins")
    codes = torch.empty_like(w)
    scratch = torch.empty_like(w)
    importance = _importance(w, weighting)

    best_err = best_scale = best_low = None
    alphas = torch.linspace(1.0, min_shrink, grid).tolist() if grid > 1 else [1.0]
    for alpha in alphas:
        low = _f16(w_min * alpha)
        scale = _f16((w_max * alpha - low) / qmax)
        err = _group_error(w, _round_codes(w, scale, low, qmax, codes), scale, low, importance,
                           scratch)
        if best_err is None:
            best_err, best_scale, best_low = err, scale, low
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_low = torch.where(better, low, best_low)

    # Weighted least squares of w on the codes: minimise sum a (s q + m - w)^2 over (s, m).
    sum_a = importance.sum(-1)
    sum_aw = torch.mul(importance, w, out=scratch).sum(-1)
    for _ in range(refine_steps):
        _round_codes(w, best_scale, best_low, qmax, codes)
        aq = torch.mul(codes, importance)
        sum_aq = aq.sum(-1)
        sum_aqq = torch.mul(aq, codes, out=scratch).sum(-1)
        sum_aqw = torch.mul(aq, w, out=scratch).sum(-1)
        denom = sum_a * sum_aqq - sum_aq * sum_aq
        ok = denom > 0
        scale = torch.where(ok, (sum_a * sum_aqw - sum_aq * sum_aw) / torch.where(ok, denom, 1.0),
                            best_scale)
        scale = _f16(scale.clamp(min=0.0))
        low = _f16((sum_aw - scale * sum_aq) / sum_a.clamp(min=torch.finfo(torch.float32).tiny))
        err = _group_error(w, _round_codes(w, scale, low, qmax, codes), scale, low, importance,
                           scratch)
        better = err < best_err
        if not bool(better.any()):
            break
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, low, best_low)

    return _round_codes(w, best_scale, best_low, qmax, codes), best_scale, best_low


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 grid: int | None = None, refine_steps: int | None = None,
                 min_shrink: float = MIN_SHRINK, weighting: str = DEFAULT_WEIGHTING
                 ) -> dict[str, np.ndarray]:
    """Quantize a [N, K] matrix to the parts of the `rtn` kind: packed codes, f16 scales, mins.

    grid: clipping-search points (default DEFAULT_GRID below 8 bits, 1 at 8 bits);
    refine_steps: least-squares refits (default DEFAULT_REFINE_STEPS below 8 bits, 0 at 8).
    Works in row chunks, so memory stays a few times one chunk.
    """
    if bits not in RTN_BITS:
        raise ValueError(f"rtn bits must be one of {RTN_BITS}, got {bits}")
    if group_size % 32 or not 32 <= group_size <= 4096:
        raise ValueError(f"rtn group_size must be a multiple of 32 in [32, 4096], got {group_size}")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"rtn quantizes non-empty matrices, got shape {list(weight.shape)}")
    if grid is None:
        grid = 1 if bits == 8 else DEFAULT_GRID
    if refine_steps is None:
        refine_steps = 0 if bits == 8 else DEFAULT_REFINE_STEPS
    n, k = weight.shape
    groups = -(-k // group_size)
    full = k // group_size * group_size  # columns in whole groups; a short last group is apart
    chunk = max(1, _CHUNK_ELEMENTS // k)
    weight = weight.detach().cpu()
    codes_out = np.empty((n, packed_row_bytes(k, bits)), np.uint8)
    scales_out = np.empty((n, groups), np.float16)
    mins_out = np.empty((n, groups), np.float16)
    def quantize_chunk(start: int) -> None:
        rows = weight[start:start + chunk].to(torch.float32)
        pieces = []
        if full:
            pieces.append(rows[:, :full].reshape(rows.shape[0], -1, group_size))
        if full < k:
            pieces.append(rows[:, full:].reshape(rows.shape[0], 1, k - full))
        codes, scales, mins = [], [], []
        for piece in pieces:
            c, s, m = _quantize_groups(piece.contiguous(), bits, grid, refine_steps,
                                       min_shrink, weighting)
            codes.append(c.reshape(rows.shape[0], -1))
            scales.append(s)
            mins.append(m)
        end = start + rows.shape[0]
        codes_out[start:end] = pack_codes(torch.cat(codes, 1).to(torch.uint8).numpy(), bits)
        scales_out[start:end] = torch.cat(scales, 1).to(torch.float16).numpy()
        mins_out[start:end] = torch.cat(mins, 1).to(torch.float16).numpy()

    starts = range(0, n, chunk)
    with torch.no_grad(), _one_torch_thread():
        if len(starts) == 1 or _WORKERS == 1:
            for start in starts:
                quantize_chunk(start)
        else:
            list(_pool().map(quantize_chunk, starts))
    return {"codes": codes_out, "scales": scales_out, "mins": mins_out}


def dequantize_rtn(parts: dict[str, np.ndarray], shape, bits: int, group_size: int) -> torch.Tensor:
    """Float32 reconstruction of `quantize_rtn`'s parts (the reference in pumice.format.kinds)."""
    from pumice.format.kinds import dequantize_parts
    return torch.from_numpy(dequantize_parts("rtn", tuple(shape),
                                             {"bits": bits, "group_size": group_size}, parts))
