"""ShiftAddLLM-style binary-coded quantization (BCQ) with power-of-two scales: the `bcq` kind.

Each row n of a weight W [N, K] is cut into groups of g columns; a group is

    W[n, group] ≈ s_n · Σ_{i<q} 2^{e_i} · B_i,      B_i ∈ {−1, +1}^g,  e_i ∈ [−64, 63] integers

with one f16 scale s_n per row (docs/BCQ.md says why it is there and what it costs). With the
exponents fixed, a group's 2^q possible values Σ ±2^{e_i} form a per-row-group grid, and the
multiply by each α becomes a shift (an exponent add) in the LUT GEMM kernel.

Fitting, per layer (docs/BCQ.md has the reasoning and measured numbers):

1. Row scales: a quick float BCQ fit of the whole matrix (greedy, then alternating least
   squares) gives float α's; s_n is the f16 power-of-two offset 2^f (f in [0, 1) on a grid plus
   an integer centring shift) that makes log2(α / s_n) closest to integers, weighted by α².
2. Sequential quantization, group by group along K, under the multi-objective
   ‖ΔW‖²·λ/K + tr(ΔW H ΔWᵀ)/tr(H): both terms are quadratic forms, so their sum is one,
   H_mix = H / mean(diag H) + λ I, and the GPTQ/OBS recipe applies. At each group start, the
   group's α's are refit (greedy + ALS) on the error-compensated weights, rounded to powers of
   two, and the exponents polished by coordinate descent (each e_i ± 1, kept if the group error
   falls); then column by column every weight takes its nearest grid value and the column's
   error is spread over the not yet quantized columns through the Cholesky factor of H_mix⁻¹.
   Without a Hessian, H_mix = I and this is plain per-group ALS (weight objective only).
3. Mixed precision (`allocate_bits`): every layer is fitted at each candidate q; the output
   error tr(ΔW H ΔWᵀ) of each is the cost, and a Lagrangian search over the trade-off picks one
   q per layer so that the average stored bits per weight (planes + exponents + row scales,
   padding included) meets the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from pumice.converter.caldera.budget import Candidate, allocate

from pumice.format.kind_bcq import (MAX_EXPONENT, MIN_EXPONENT, pack_bcq,
                                    stored_bits_per_weight)

DEFAULT_GROUP_SIZE = 128
DEFAULT_CANDIDATE_BITS = (2, 3, 4)
DEFAULT_WEIGHT_OBJECTIVE = 0.1   # λ of the multi-objective (weight error vs output error)
DEFAULT_ALS_STEPS = 3
DEFAULT_EXPONENT_SWEEPS = 1
DAMPING = 0.01                   # relative damping of H, as GPTQ
_F16_MAX = 65504.0
_ROW_SCALE_GRID = 8


@dataclass
class BcqFit:
    """One fitted matrix: signs [q, N, K] bool, exponents [N, G, q] int8, row scales [N] f16."""
    bits: int
    group_size: int
    signs: torch.Tensor
    exponents: torch.Tensor
    row_scales: torch.Tensor
    weight_error: float = 0.0          # ‖W − Ŵ‖²_F / ‖W‖²_F
    output_error: float | None = None  # tr(ΔW H ΔWᵀ) (absolute: comparable across layers)
    relative_output_error: float | None = None  # the same over tr(W H Wᵀ)
    stats: dict = field(default_factory=dict)

    shape: tuple[int, int] = (0, 0)
    _parts: dict | None = None

    def reconstruct(self) -> torch.Tensor:
        return reconstruct(self.signs, self.exponents, self.row_scales, self.group_size)

    def parts(self) -> dict[str, np.ndarray]:
        if self._parts is not None:
            return self._parts
        return pack_bcq(self.signs.numpy(), self.exponents.numpy(),
                        self.row_scales.numpy(), self.group_size)

    def compact(self) -> "BcqFit":
        """Keep only the packed parts (q bits per weight instead of q bytes)."""
        self._parts = self.parts()
        self.signs = None
        return self

    def params(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    def bits_per_weight(self) -> float:
        return stored_bits_per_weight(*self.shape, self.bits, self.group_size)


def reconstruct(signs: torch.Tensor, exponents: torch.Tensor, row_scales: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """Ŵ (float32 [N, K]) from the factors; the definition of docs/FORMAT.md `bcq`."""
    q, n, k = signs.shape
    column_group = torch.arange(k) // group_size
    alpha = torch.ldexp(torch.ones(()), exponents.to(torch.int32).float())  # [N, G, q]
    alpha = alpha * row_scales.float()[:, None, None]
    pm = signs.float() * 2 - 1  # [q, N, K]
    return torch.einsum("qnk,nkq->nk", pm, alpha[:, column_group, :])


# ---------------------------------------------------------------------------------------------
# Small pieces: sign patterns, grids, float BCQ on groups.

def _sign_patterns(q: int) -> torch.Tensor:
    """[2^q, q] of ±1: row m has +1 at plane i iff bit i of m is set."""
    m = torch.arange(1 << q)[:, None]
    return ((m >> torch.arange(q)) & 1).float() * 2 - 1


def _nearest_search(w: torch.Tensor, alpha: torch.Tensor, patterns: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid value by a binary search over the sorted grid (any α)."""
    levels = alpha @ patterns.T  # [..., 2^q]
    sorted_levels, order = levels.sort(-1)
    midpoints = (sorted_levels[..., 1:] + sorted_levels[..., :-1]) * 0.5
    position = torch.searchsorted(midpoints.contiguous(), w.contiguous())
    return order.gather(-1, position), sorted_levels.gather(-1, position)


def _nearest(w: torch.Tensor, alpha: torch.Tensor, patterns: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid value per weight. w [..., g], alpha [..., q] (≥ 0) -> (pattern index
    [..., g], value).

    When the α's sorted in descending order satisfy α_(i) ≥ Σ_{j>i} α_(j) — always true for
    powers of two that are distinct, and for pairs of equal ones — the grid is ordered by the
    sign of the largest α first, so choosing each sign greedily (the sign of the residual) is
    exactly the nearest value: q cheap passes instead of a search. Groups without the property
    (float α during ALS, three equal exponents) take the search."""
    q = alpha.shape[-1]
    a_sorted, perm = alpha.sort(-1, descending=True)
    tails = a_sorted.flip(-1).cumsum(-1).flip(-1)  # Σ_{j>=i}
    greedy_ok = (a_sorted[..., :-1] >= (tails[..., 1:] * (1 - 1e-6))).all(-1)
    residual = w.clone()
    value = torch.zeros_like(w)
    index = torch.zeros(w.shape, dtype=torch.long)
    for rank in range(q):
        a = a_sorted[..., rank:rank + 1]
        positive = residual >= 0
        step = torch.where(positive, a, -a)
        residual -= step
        value += step
        index |= positive.long() << perm[..., rank:rank + 1]
    if not bool(greedy_ok.all()):
        bad = ~greedy_ok
        idx_s, val_s = _nearest_search(w[bad], alpha[bad], patterns)
        index[bad] = idx_s
        value[bad] = val_s
    return index, value


def _float_bcq(w: torch.Tensor, q: int, steps: int, patterns: torch.Tensor) -> torch.Tensor:
    """Float α ([..., q], ≥ 0, descending at init) for groups w [..., g]: greedy, then ALS."""
    residual = w.clone()
    alphas = []
    for _ in range(q):
        a = residual.abs().mean(-1, keepdim=True)
        alphas.append(a)
        residual = residual - a * torch.where(residual >= 0, 1.0, -1.0)
    alpha = torch.cat(alphas, -1)
    eye = torch.eye(q) * 1e-6
    for _ in range(steps):
        index, _ = _nearest(w, alpha, patterns)
        b = patterns[index]  # [..., g, q]
        gram = b.transpose(-1, -2) @ b + eye
        rhs = (b.transpose(-1, -2) @ w[..., None])[..., 0]
        solved = torch.linalg.solve(gram, rhs)
        ok = torch.isfinite(solved).all(-1, keepdim=True)
        alpha = torch.where(ok, solved.abs(), alpha)
    return alpha


def _pow2_exponents(alpha: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """round(log2(α / s)) clamped to the format's range; α = 0 maps to the smallest scale."""
    ratio = alpha / row_scale
    e = torch.round(torch.log2(ratio.clamp_min(2.0 ** (MIN_EXPONENT - 1))))
    return e.clamp(MIN_EXPONENT, MAX_EXPONENT)


def _group_error(w, alpha, patterns):
    _, value = _nearest(w, alpha, patterns)
    return ((w - value) ** 2).sum(-1)


def _uniform_exponents(w: torch.Tensor, row_scale: torch.Tensor, q: int,
                       patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponents of the evenly spaced grid α = c·(2^{q-1}, ..., 2, 1) with the best power-of-two
    c near the group's range (three candidates), and their errors. ALS alone often settles in
    a worse local optimum at q >= 3 (docs/BCQ.md)."""
    shape = -torch.arange(q, dtype=torch.float32)
    peak = w.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    top = torch.round(torch.log2(peak / row_scale * 2.0 ** (q - 1) / (2.0 ** q - 1)))
    best_e = best_err = None
    odd_max = 2.0 ** q - 1
    for shift in (-1.0, 0.0, 1.0):
        e = (top + shift + shape).clamp(MIN_EXPONENT, MAX_EXPONENT)
        # The grid c·{±1, ±3, ..., ±(2^q - 1)} in closed form (c = the smallest α).
        c = row_scale * torch.exp2(e[..., -1:])
        value = c * torch.clamp(2 * torch.floor(w / (2 * c)) + 1, -odd_max, odd_max)
        err = ((w - value) ** 2).sum(-1)
        if best_e is None:
            best_e, best_err = e, err
        else:
            better = err < best_err
            best_e = torch.where(better[..., None], e, best_e)
            best_err = torch.where(better, err, best_err)
    return best_e, best_err


def _fit_exponents(w: torch.Tensor, row_scale: torch.Tensor, q: int, steps: int, sweeps: int,
                   patterns: torch.Tensor) -> torch.Tensor:
    """Power-of-two exponents [..., q] for groups w [..., g] (row_scale broadcast as [..., 1]):
    the better of the rounded ALS fit and the evenly spaced grid, then coordinate descent."""
    alpha = _float_bcq(w, q, steps, patterns)
    e = _pow2_exponents(alpha, row_scale)
    err = _group_error(w, row_scale * torch.exp2(e), patterns)
    e_uniform, err_uniform = _uniform_exponents(w, row_scale, q, patterns)
    better = err_uniform < err
    e = torch.where(better[..., None], e_uniform, e)
    err = torch.where(better, err_uniform, err)
    for _ in range(sweeps):
        for i in range(q):
            for delta in (-1.0, 1.0):
                trial = e.clone()
                trial[..., i] = (trial[..., i] + delta).clamp(MIN_EXPONENT, MAX_EXPONENT)
                trial_err = _group_error(w, row_scale * torch.exp2(trial), patterns)
                better = trial_err < err
                e = torch.where(better[..., None], trial, e)
                err = torch.where(better, trial_err, err)
    return e


def _row_scales(w: torch.Tensor, q: int, group_size: int, steps: int,
                patterns: torch.Tensor) -> torch.Tensor:
    """f16 row scales [N]: per row, the power-of-two offset 2^f (f on a grid in [0, 1)) under
    which the evenly spaced power-of-two grids fit the row's groups best."""
    n, k = w.shape
    groups = -(-k // group_size)
    padded = torch.zeros(n, groups * group_size)
    padded[:, :k] = w
    wg = padded.view(n, groups, group_size)
    peak = w.abs().amax(-1).clamp_min(1e-30)
    base = torch.floor(torch.log2(peak))  # keeps exponents near zero
    best_f = best_err = None
    for f in (torch.arange(_ROW_SCALE_GRID) / _ROW_SCALE_GRID).tolist():
        scale = torch.exp2(base + f).to(torch.float16).float()[:, None, None]
        _, err = _uniform_exponents(wg, scale, q, patterns)
        err = err.sum(-1)
        if best_f is None:
            best_f, best_err = torch.full_like(err, f), err
        else:
            better = err < best_err
            best_f = torch.where(better, f, best_f)
            best_err = torch.where(better, err, best_err)
    scale = torch.exp2(base + best_f).clamp(2.0 ** -14, _F16_MAX).to(torch.float16)
    return torch.where(w.abs().amax(-1) > 0, scale, torch.ones_like(scale))


def _mixed_hessian(hessian: torch.Tensor, weight_objective: float) -> torch.Tensor:
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean = torch.diagonal(h).mean()
    h = h / mean
    h += torch.eye(h.shape[0], dtype=h.dtype) * (weight_objective + DAMPING)
    return h


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with UᵀU = H⁻¹ (what GPTQ's column-by-column update uses)."""
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True).float()
        except RuntimeError:
            h = h + torch.eye(h.shape[0], dtype=h.dtype) * torch.diagonal(h).mean() * 10.0 ** (attempt - 3)
    raise ValueError("the Hessian is not positive definite even after damping")


# ---------------------------------------------------------------------------------------------
# The per-layer fit.

def quantize_bcq(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 hessian: torch.Tensor | None = None,
                 weight_objective: float = DEFAULT_WEIGHT_OBJECTIVE,
                 als_steps: int = DEFAULT_ALS_STEPS,
                 exponent_sweeps: int = DEFAULT_EXPONENT_SWEEPS,
                 row_scales: bool = True, step: int = 8) -> BcqFit:
    """Fit one weight matrix [N, K] (see the module docstring). `hessian`: E[x xᵀ] [K, K];
    `step`: columns quantized together between error updates (1 is column-by-column GPTQ)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bcq bits must be in 1..8, got {bits}")
    # The fit is thousands of small tensor ops: torch's intra-op threads cost more in hand-offs
    # than they return (8x slower on a busy 2-core machine), so it runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _quantize_bcq(weight, bits, group_size, hessian, weight_objective, als_steps,
                             exponent_sweeps, row_scales, step)
    finally:
        torch.set_num_threads(threads)


def _quantize_bcq(weight, bits, group_size, hessian, weight_objective, als_steps,
                  exponent_sweeps, row_scales, step) -> BcqFit:
    if group_size % 8 or not 8 <= group_size <= 1024:
        raise ValueError(f"bcq group_size must be a multiple of 8 in 8..1024, got {group_size}")
    w_orig = weight.detach().float().cpu()
    if w_orig.dim() != 2:
        raise ValueError(f"bcq quantizes matrices, got shape {list(w_orig.shape)}")
    if not torch.isfinite(w_orig).all():
        raise ValueError("weights contain NaN or infinity")
    n, k = w_orig.shape
    groups = -(-k // group_size)
    patterns = _sign_patterns(bits)

    if row_scales:
        scale16 = _row_scales(w_orig, bits, group_size, als_steps, patterns)
    else:
        scale16 = torch.ones(n, dtype=torch.float16)
    scale = scale16.float()[:, None]

    w = w_orig.clone()
    u = None
    if hessian is not None:
        h = hessian.detach().double().cpu()
        if h.shape != (k, k):
            raise ValueError(f"Hessian shape {list(h.shape)} does not match K = {k}")
        u = _upper_inverse_cholesky(_mixed_hessian(h, weight_objective))

    index = torch.zeros(n, k, dtype=torch.long)
    exponents = torch.zeros(n, groups, bits)
    for gi in range(groups):
        c0, c1 = gi * group_size, min(k, (gi + 1) * group_size)
        e = _fit_exponents(w[:, c0:c1], scale, bits, als_steps, exponent_sweeps, patterns)
        exponents[:, gi] = e
        alpha = scale * torch.exp2(e)          # [N, q]
        if u is None:
            idx, _ = _nearest(w[:, c0:c1], alpha, patterns)
            index[:, c0:c1] = idx
            continue
        # GPTQ's update in sub-blocks of `step` columns: the columns of a sub-block take their
        # nearest grid values together, and their error, mapped through the sub-block's
        # triangular factor, is spread over every later column (exact OBS for the block).
        block_err = torch.zeros(n, c1 - c0)
        for s0 in range(c0, c1, step):
            s1 = min(c1, s0 + step)
            idx, value = _nearest(w[:, s0:s1], alpha, patterns)
            index[:, s0:s1] = idx
            err = torch.linalg.solve_triangular(u[s0:s1, s0:s1], (w[:, s0:s1] - value),
                                                upper=True, left=False)
            block_err[:, s0 - c0:s1 - c0] = err
            if s1 < c1:
                w[:, s1:c1] -= err @ u[s0:s1, s1:c1]
        if c1 < k:
            w[:, c1:] -= block_err @ u[c0:c1, c1:]

    signs = ((index[None, :, :] >> torch.arange(bits)[:, None, None]) & 1).bool()  # [q, N, K]
    fit = BcqFit(bits, group_size, signs, exponents.to(torch.int8), scale16, shape=(n, k))
    w_hat = fit.reconstruct()
    delta = w_hat - w_orig
    fit.weight_error = float((delta ** 2).sum() / (w_orig ** 2).sum().clamp_min(1e-30))
    if hessian is not None:
        hf = hessian.float()
        fit.output_error = float(((delta @ hf) * delta).sum())
        fit.relative_output_error = fit.output_error / max(float(((w_orig @ hf) * w_orig).sum()), 1e-30)
    else:
        fit.output_error = float((delta ** 2).sum())
    return fit


# ---------------------------------------------------------------------------------------------
# Mixed precision.

def allocate_bits(costs: Mapping[str, Mapping[int, float]], shapes: Mapping[str, tuple[int, int]],
                  budget: float, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, int]:
    """One q per layer minimising Σ cost[layer][q] with mean stored bits/weight ≤ budget.

    The same Lagrangian search plus greedy fill as CALDERA's allocator (converter/caldera/budget),
    over candidates whose cost is the exact stored bits of a bcq layer with q planes.
    """
    names = list(costs)
    total = sum(shapes[name][0] * shapes[name][1] for name in names)
    choices = [[Candidate(label=str(q), payload=q, error=costs[name][q],
                          bits=stored_bits_per_weight(*shapes[name], q, group_size)
                          * shapes[name][0] * shapes[name][1])
                for q in sorted(costs[name])] for name in names]
    try:
        picked = allocate(choices, budget * total * (1 + 1e-12))
    except ValueError:
        smallest = sum(min(c.bits for c in cands) for cands in choices) / total
        raise ValueError(f"a budget of {budget} bits/weight is below the smallest candidate "
                         f"({smallest:.3f} bits/weight with all overhead)") from None
    return {name: cands[i].payload for name, cands, i in zip(names, choices, picked)}


def quantize_layers(weights: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
                    names: list[str], hessians: Mapping[str, torch.Tensor] | None,
                    bits: float, group_size: int = DEFAULT_GROUP_SIZE,
                    candidates: tuple[int, ...] = DEFAULT_CANDIDATE_BITS, mixed: bool = True,
                    progress: bool = False, cache: "FitCache | None" = None,
                    **options) -> dict[str, BcqFit]:
    """Fit every named layer: mixed=False gives every layer q = bits planes; mixed=True fits
    each at every candidate q and allocates under the budget of `bits` stored bits/weight."""
    get = weights if callable(weights) else weights.__getitem__
    uniform = not mixed
    tried = (int(bits),) if uniform else tuple(candidates)
    fits: dict[str, dict[int, BcqFit]] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names) * len(tried), desc=f"bcq {bits} bits", unit="fit", leave=False)
    for name in names:
        w = get(name)
        h = None if hessians is None else hessians.get(name)
        fits[name] = {}
        for q in tried:
            fit = cache.load(name, q) if cache is not None else None
            if fit is None:
                fit = quantize_bcq(w, q, group_size, h, **options).compact()
                if cache is not None:
                    cache.store(name, fit)
            fits[name][q] = fit
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if uniform:
        return {name: fits[name][int(bits)] for name in names}
    costs = {name: {q: fit.output_error for q, fit in fits[name].items()} for name in names}
    shapes = {name: fits[name][tried[0]].shape for name in names}
    choice = allocate_bits(costs, shapes, bits, group_size)
    return {name: fits[name][choice[name]] for name in names}


class FitCache:
    """Fitted layers on disk, so that several budgets (or a uniform and a mixed run) share the
    expensive per-layer fits. The directory holds key.json (every setting the fits depend on);
    a directory with another key is emptied first."""

    def __init__(self, directory, key: dict):
        import json
        from pathlib import Path
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key.json"
        text = json.dumps(key, sort_keys=True)
        if not key_file.exists() or key_file.read_text() != text:
            for old in self.directory.glob("*.npz"):
                old.unlink()
            key_file.write_text(text)

    def _path(self, name: str, q: int):
        return self.directory / f"{name}.q{q}.npz"

    def load(self, name: str, q: int) -> BcqFit | None:
        path = self._path(name, q)
        if not path.exists():
            return None
        with np.load(path) as data:
            parts = {p: data[p] for p in ("planes", "exponents", "row_scales")}
            meta = data["meta"]
        fit = BcqFit(q, int(meta[0]), None, None, None, shape=(int(meta[1]), int(meta[2])))
        fit.output_error = float(meta[3])
        fit.weight_error = float(meta[4])
        fit._parts = parts
        return fit

    def store(self, name: str, fit: BcqFit) -> None:
        meta = np.array([fit.group_size, fit.shape[0], fit.shape[1], fit.output_error,
                         fit.weight_error], np.float64)
        tmp = self._path(name, fit.bits).with_suffix(".partial.npz")
        np.savez(tmp, meta=meta, **fit.parts())
        tmp.rename(self._path(name, fit.bits))


# ---------------------------------------------------------------------------------------------
# The conversion method.

METHOD_OPTIONS = ("mixed", "candidates", "calib", "n_sequences", "seq_len", "calib_cache",
                  "weight_objective", "row_scales", "fits_cache")


def _parse_candidates(value) -> tuple[int, ...]:
    if value is None:
        return DEFAULT_CANDIDATE_BITS
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    candidates = tuple(sorted({int(v) for v in value}))
    if not candidates or any(not 1 <= q <= 8 for q in candidates):
        raise ValueError(f"bcq candidates must be bit widths in 1..8, got {value!r}")
    return candidates


def convert_bcq(ctx) -> None:
    """`convert(method="bcq", bits=B, group_size=g, ...)`.

    bits: with mixed=True (the default) the budget in stored bits per weight of the decoder's
    linear layers, all overhead counted; each layer gets a q from `candidates` (default 2,3,4).
    With mixed=False every layer gets q = bits planes. calib=True (default) collects E[xxᵀ]
    of every layer input with pumice.converter.calibration (calib_sequences × calib_seq_len
    tokens) for the output-error objective. calib: a text file (default: the pydoc text),
    or "none" for the weight objective alone (no calibration). calib_cache: a file that keeps
    the Hessians between conversions (same format and key as CALDERA's).
    """
    ctx.check_options(METHOD_OPTIONS)
    options = ctx.options
    budget = float(ctx.bits)
    group_size = int(ctx.group_size)
    mixed = bool(options.get("mixed", True))
    candidates = _parse_candidates(options.get("candidates"))
    if not mixed and (not budget.is_integer() or not 1 <= budget <= 8):
        raise ValueError(f"bcq with mixed=False needs integral bits in 1..8, got {ctx.bits}")
    fit_options = {"weight_objective": float(options.get("weight_objective", DEFAULT_WEIGHT_OBJECTIVE)),
                   "row_scales": bool(options.get("row_scales", True))}

    names = [n for n in ctx.checkpoint.tensor_names() if _is_linear(n)]
    hessians = None
    calib = options.get("calib")
    calibrated = str(calib).lower() != "none"
    if calibrated:
        from .calibration import collect_hessians
        text = None
        if calib is not None:
            from pathlib import Path
            if not Path(calib).is_file():
                raise ValueError(f"calibration text file {calib!r} not found")
            text = Path(calib).read_text(encoding="utf-8", errors="replace")
        hessians = collect_hessians(ctx.checkpoint.directory, text,
                                    int(options.get("n_sequences") or 32),
                                    int(options.get("seq_len") or 512),
                                    cache_path=options.get("calib_cache"),
                                    progress=not getattr(ctx.progress, "disable", False))
    cache = None
    if options.get("fits_cache"):
        cache = FitCache(options["fits_cache"], {
            "source": str(ctx.checkpoint.directory.resolve()), "group_size": group_size,
            "calib": str(calib), "n_sequences": options.get("n_sequences"),
            "seq_len": options.get("seq_len"), **fit_options})
    fits = quantize_layers(lambda name: ctx.checkpoint.get(name).to(torch.float32), names,
                           hessians, budget if mixed else int(budget), group_size,
                           candidates if mixed else (int(budget),), mixed=mixed,
                           progress=not getattr(ctx.progress, "disable", False), cache=cache,
                           **fit_options)
    del hessians
    numel = sum(fit.shape[0] * fit.shape[1] for fit in fits.values())
    stored = sum(fit.bits_per_weight() * fit.shape[0] * fit.shape[1] for fit in fits.values())
    histogram: dict[str, int] = {}
    for fit in fits.values():
        histogram[str(fit.bits)] = histogram.get(str(fit.bits), 0) + 1
    ctx.provenance.update({"bcq_bits_per_weight": round(stored / numel, 4),
                           "bcq_layers_per_bits": histogram, "bcq_mixed": mixed,
                           "bcq_calibrated": calibrated})

    def quantize(ctx, name, weight):
        fit = fits.pop(name)
        return "bcq", fit.params(), fit.parts()

    ctx.run(quantize)


def _is_linear(name: str) -> bool:
    from .hf import is_decoder_linear
    return is_decoder_linear(name)


def _register() -> None:
    from .methods import register_method
    register_method("bcq", convert_bcq,
                    defaults={"bits": 3, "group_size": DEFAULT_GROUP_SIZE},
                    description="ShiftAddLLM binary-coded quantization, power-of-two scales, "
                                "LUT GEMM; Hessian-aware, mixed bits under a budget")


_register()
