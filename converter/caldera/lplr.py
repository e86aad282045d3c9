"""Low-precision low-rank factorisation A ≈ L R with quantized L [N, k] and R [k, K].

The objective is calibration-weighted: tr((A − L R) H (A − L R)ᵀ) = E‖(A − L R) x‖².

- Initialisation (LPLR, Saha et al. 2023): a Gaussian sketch of the H-weighted matrix
  B = A S (H = S Sᵀ) gives the left factor's range; here the sketch is oversampled and refined by
  two power iterations (a randomized SVD), so for the matrix sizes of real models it lands on the
  best rank-k fit up to rounding. L and R are the balanced factors U_k Σ_k^½ and Σ_k^½ V_kᵀ S⁻¹.
- Then alternating least squares with quantization (CALDERA's LPLRFactorize): R is quantized with
  LDLQ under H; L is refitted to the quantized R (L = A H R̂ᵀ (R̂ H R̂ᵀ)⁻¹) and quantized with LDLQ
  under R̂ H R̂ᵀ, which is exactly the Hessian of the objective as a function of L. Then R is
  refitted to the quantized L (R = L̂⁺ A) and so on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ldlq import Quantized, damped, ldlq, weighted_error


@dataclass
class FactorConfig:
    bits: int         # 4 or 8 (any rtn width works)
    group_size: int   # along the factor's rows: k for L, K for R


@dataclass
class LowRank:
    left: Quantized    # L [N, k]
    right: Quantized   # R [k, K]

    @property
    def product(self) -> torch.Tensor:
        return self.left.dequantized @ self.right.dequantized


def sketch_factors(b: torch.Tensor, rank: int, generator: torch.Generator,
                   oversample: int = 8, power_iters: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of b [N, M]: (U_k, σ_k, V_k) from a Gaussian sketch b Ω."""
    n, m = b.shape
    width = min(rank + oversample, n, m)
    omega = torch.randn(m, width, generator=generator, dtype=b.dtype).to(b.device)
    y = b @ omega
    for _ in range(power_iters):
        y, _ = torch.linalg.qr(y)
        y = b @ (b.T @ y)
    basis, _ = torch.linalg.qr(y)
    u_small, sigma, vt = torch.linalg.svd(basis.T @ b, full_matrices=False)
    return (basis @ u_small)[:, :rank], sigma[:rank], vt[:rank].T


def weighted_low_rank(a: torch.Tensor, h: torch.Tensor, rank: int, generator: torch.Generator,
                      chol: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unquantized (L, R), float64, minimising tr((A − LR) H (A − LR)ᵀ) (balanced factors)."""
    a = a.double()
    if chol is None:
        chol = torch.linalg.cholesky(damped(h))
    b = a @ chol
    u, sigma, v = sketch_factors(b, rank, generator)
    root = sigma.clamp_min(0).sqrt()
    left = u * root
    # R = Σ^½ Vᵀ S⁻¹  ⇔  R S = Σ^½ Vᵀ
    right = torch.linalg.solve_triangular(chol, (v * root).T, upper=False, left=False)
    return left, right


def lplr(a: torch.Tensor, h: torch.Tensor, rank: int, left_cfg: FactorConfig,
         right_cfg: FactorConfig, generator: torch.Generator, iters: int = 2,
         chol: torch.Tensor | None = None, u_right: torch.Tensor | None = None,
         exact: bool = True) -> LowRank:
    """Quantized L R ≈ a under H; keeps the best of the alternating iterates."""
    a64 = a.double()
    hd = damped(h)
    left, right = weighted_low_rank(a64, h, rank, generator, chol)
    best, best_err = None, float("inf")
    for step in range(iters):
        # R with LDLQ under H when the factorisation is at hand, else plain rounding.
        rq = ldlq(right.float(), None if u_right is None and not exact else h,
                  right_cfg.bits, right_cfg.group_size, u=u_right)
        r = rq.dequantized.double()
        # L = A H Rᵀ (R H Rᵀ)⁻¹, then LDLQ under the k×k Hessian R H Rᵀ.
        h_left = r @ hd @ r.T
        rhs = a64 @ hd @ r.T
        left = torch.linalg.solve(damped(h_left, 1e-6), rhs.T).T
        lq = ldlq(left.float(), h_left, left_cfg.bits, left_cfg.group_size)
        candidate = LowRank(lq, rq)
        err = weighted_error(a64 - candidate.product.double(), h)
        if err < best_err:
            best, best_err = candidate, err
        if step + 1 < iters:
            l = lq.dequantized.double()
            right = torch.linalg.lstsq(l, a64).solution
    return best
