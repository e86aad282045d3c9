"""CALDERA (Saha et al., NeurIPS 2024): W ≈ Q + L R, calibration-aware, in a rotated basis.

W [N, K] is first made incoherent with randomized Hadamard transforms on both sides,
W' = T_out W T_inᵀ, and the Hessian follows, H' = T_in H T_inᵀ (the weighted error is invariant:
tr(E H Eᵀ) = tr(E' H' E'ᵀ)). Then alternating minimisation:

    Q  ← LDLQ(W' − L R)             (b_Q bits, per-group grids)
    L, R ← LPLR(W' − Q)            (rank k, b_L / b_R bits)

for T iterations, keeping the iterate with the smallest tr((W' − Q − LR) H' (·)ᵀ). Two starts are
tried: the paper's (L R = 0 first) and "low rank first" (L R = the best unquantized rank-k fit of W'
first), which lets the low-rank part take the dominant singular directions before Q is rounded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grid import GroupGrid
from .hadamard import RandomizedHadamard
from .ldlq import Quantized, damped, inverse_cholesky_upper, ldlq, weighted_error
from .lplr import FactorConfig, LowRank, lplr, weighted_low_rank


@dataclass(frozen=True)
class CalderaConfig:
    q_bits: int = 2
    q_group_size: int = 64
    rank: int = 0
    l_bits: int = 4
    r_bits: int = 4
    l_group_size: int = 32
    r_group_size: int = 64
    hadamard: bool = True

    def factor_configs(self, k_in: int) -> tuple[FactorConfig, FactorConfig]:
        return (FactorConfig(self.l_bits, self.l_group_size),
                FactorConfig(self.r_bits, self.r_group_size))


@dataclass
class Decomposition:
    """The result in the rotated basis, plus the transforms that undo the rotation."""
    config: CalderaConfig
    shape: tuple[int, int]
    q: Quantized | None
    low_rank: LowRank | None
    t_in: RandomizedHadamard | None
    t_out: RandomizedHadamard | None
    error: float                      # tr(E H Eᵀ) in the original basis
    relative_error: float             # error / tr(W H Wᵀ)
    history: list[float] = field(default_factory=list)

    def rotated_reconstruction(self) -> torch.Tensor:
        n, k = self.shape
        out = torch.zeros(n, k, dtype=torch.float64, device=self.q.dequantized.device if self.q is not None else 'cpu')
        if self.q is not None:
            out += self.q.dequantized.double()
        if self.low_rank is not None:
            out += self.low_rank.product.double()
        return out

    def reconstruction(self) -> torch.Tensor:
        """Ŵ = T_outᵀ (Q + L R) T_in, float64."""
        w = self.rotated_reconstruction()
        if self.t_in is not None:
            w = self.t_out.inverse(self.t_in.inverse(w).T.contiguous()).T
        return w


class RotatedProblem:
    """W', H' and the factorisations of H' shared by every configuration tried on one matrix."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor, seed: int, hadamard: bool = True,
                 input_seed: int | None = None, shared: dict | None = None):
        """input_seed: seed of T_in (default `seed`); matrices that read the same input (q/k/v,
        gate/up) can share it, and then share H' and its factorisations through `shared`."""
        n, k = w.shape
        self.shape = (n, k)
        self.seed = seed
        input_seed = seed if input_seed is None else input_seed
        key = (id(h), input_seed, hadamard)
        cached = shared.get(key) if shared is not None else None
        w = w.double()
        if hadamard:
            self.t_in = cached["t_in"] if cached else RandomizedHadamard.random(k, input_seed)
            self.t_out = RandomizedHadamard.random(n, seed + 1)
            self.w = self.t_out.rotate_rows(self.t_in.rotate_columns(w))
        else:
            self.t_in = self.t_out = None
            self.w = w
        if cached:
            self.h, self._u, self._chol = cached["h"], cached["u"], cached["chol"]
        else:
            hr = self.t_in.rotate_hessian(h.double()) if hadamard else h.double()
            self.h = (hr + hr.T) / 2
            self._u = None
            self._chol = None
        self.total = weighted_error(self.w, self.h)
        if shared is not None:
            self._share = (shared, key)

    def remember(self) -> None:
        """Store H' and its factorisations for the next matrix with the same input."""
        if hasattr(self, "_share"):
            shared, key = self._share
            shared.clear()  # one input group at a time: bounded memory
            shared[key] = {"t_in": self.t_in, "h": self.h, "u": self.u, "chol": self.chol}

    @property
    def u(self) -> torch.Tensor:
        if self._u is None:
            self._u = inverse_cholesky_upper(self.h)
        return self._u

    @property
    def chol(self) -> torch.Tensor:
        if self._chol is None:
            self._chol = torch.linalg.cholesky(damped(self.h))
        return self._chol

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000003 + salt)


def decompose(problem: RotatedProblem, config: CalderaConfig, iters: int = 3,
              quantize_q: bool = True, both_starts: bool = False, lplr_iters: int = 1,
              first_q: Quantized | None = None, ldlq_right: bool = True,
              hessian_rounding: bool = True) -> Decomposition:
    """Run CALDERA's alternating minimisation on one (rotated) matrix.

    quantize_q=False gives LPLR alone (W ≈ L R).
    """
    w, h = problem.w, problem.h

    def round_q(target):
        if hessian_rounding:
            return ldlq(target, h, config.q_bits, config.q_group_size, u=problem.u)
        return ldlq(target, None, config.q_bits, config.q_group_size)  # plain rounding

    left_cfg, right_cfg = config.factor_configs(problem.shape[1])
    best: tuple | None = None
    history: list[float] = []

    def consider(q, low_rank):
        nonlocal best
        residual = w.clone()
        if q is not None:
            residual -= q.dequantized.double()
        if low_rank is not None:
            residual -= low_rank.product.double()
        err = weighted_error(residual, h)
        history.append(err)
        if best is None or err < best[0]:
            best = (err, q, low_rank)

    if config.rank == 0:
        consider(first_q if first_q is not None else round_q(w), None)
    elif not quantize_q:
        consider(None, lplr(w, h, config.rank, left_cfg, right_cfg, problem.generator(1),
                            iters=max(iters, 2), chol=problem.chol, u_right=problem.u))
    else:
        starts = ["zero", "low_rank_first"] if both_starts else ["zero"]
        for s, start in enumerate(starts):
            if start == "zero":
                lr = torch.zeros_like(w)
            else:
                left, right = weighted_low_rank(w, h, config.rank, problem.generator(2), problem.chol)
                lr = left @ right
            for t in range(iters):
                if t == 0 and start == "zero" and first_q is not None:
                    q = first_q  # LDLQ(W − 0): the Q-only candidate of the same grid
                else:
                    q = round_q(w - lr)
                low_rank = lplr(w - q.dequantized.double(), h, config.rank, left_cfg, right_cfg,
                                problem.generator(10 + 100 * s + t), iters=lplr_iters,
                                chol=problem.chol,
                                u_right=problem.u if ldlq_right else None, exact=ldlq_right)
                lr = low_rank.product.double()
                consider(q, low_rank)
    err, q, low_rank = best
    return Decomposition(config, problem.shape, q, low_rank, problem.t_in, problem.t_out, err,
                         err / max(problem.total, 1e-30), history)
