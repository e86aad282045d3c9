"""Randomized Hadamard transforms for incoherence processing, for any dimension.

For n = m · 2^a with m odd, the transform of a vector x ∈ Rⁿ is

    T x = (C_m ⊗ H_P / √P) (s ∘ x),     P = 2^a,

where s ∈ {±1}ⁿ is a random sign vector, H_P is the Sylvester Hadamard matrix (entries ±1) and
C_m is the orthonormal DCT-II matrix of size m (C_1 = [1]). With the index i = q·P + p (q < m,
p < P) the Kronecker product acts as: a fast Walsh–Hadamard transform on each contiguous block of
P entries, then C_m mixing the m blocks (the same p in every block). T is orthogonal, so
Tᵀ y = s ∘ ((C_mᵀ ⊗ H_P / √P) y).

Why DCT for the odd factor: Hadamard matrices do not exist for odd m > 1 (9 for 576, 3 for 1536,
43 for 11008), C_m is orthogonal, dense (|entries| ≤ √(2/m), so it still spreads outliers), and
is defined by a formula: the runtime rebuilds it instead of reading it from the file. The odd
factors of real model widths are small, so the C_m step costs n·m flops, far below the matmul.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def split_size(n: int) -> tuple[int, int]:
    """(m, P): n = m · P with P the largest power of two dividing n, m odd."""
    if n <= 0:
        raise ValueError(f"transform size must be positive, got {n}")
    power = n & -n
    return n // power, power


def dct_matrix(m: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (C @ Cᵀ = I): C[j, i] = c_j cos(π (2i + 1) j / (2m))."""
    j = torch.arange(m, dtype=torch.float64)[:, None]
    i = torch.arange(m, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * j / (2 * m)) * math.sqrt(2.0 / m)
    c[0] = 1.0 / math.sqrt(m)
    return c.to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform along the last axis (a power of two)."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"FWHT needs a power-of-two length, got {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, p)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """A vector of ±1.0 (float64)."""
    bits = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64)
    return (1 - 2 * bits).to(torch.float64)


def pack_signs(signs: torch.Tensor) -> np.ndarray:
    """±1 vector → u8 bit array (bit i of byte i // 8 is 1 where s_i = −1), little-endian."""
    negative = (signs.detach().cpu().numpy() < 0).astype(np.uint8)
    return np.packbits(negative, bitorder="little")


def unpack_signs(packed: np.ndarray, n: int) -> np.ndarray:
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


class RandomizedHadamard:
    """The orthogonal transform T of one dimension n (see the module docstring)."""

    def __init__(self, signs: torch.Tensor):
        self.signs = signs.to(torch.float64)
        self.n = signs.numel()
        self.m, self.p = split_size(self.n)
        self._dct = dct_matrix(self.m)

    @classmethod
    def random(cls, n: int, seed: int) -> "RandomizedHadamard":
        generator = torch.Generator().manual_seed(int(seed))
        return cls(random_signs(n, generator))

    @classmethod
    def from_packed(cls, packed: np.ndarray, n: int) -> "RandomizedHadamard":
        return cls(torch.from_numpy(unpack_signs(packed, n)))

    def packed_signs(self) -> np.ndarray:
        return pack_signs(self.signs)

    def _mix(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        lead = x.shape[:-1]
        y = fwht(x.reshape(*lead, self.m, self.p)) / math.sqrt(self.p)
        if self.m > 1:
            c = self._dct.to(x.dtype).to(x.device)
            y = torch.matmul(c.T if transpose else c, y)
        return y.reshape(*lead, self.n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """T x along the last axis."""
        return self._mix(x * self.signs.to(x.dtype).to(x.device), transpose=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Tᵀ y along the last axis."""
        return self._mix(y, transpose=True) * self.signs.to(y.dtype).to(y.device)

    def matrix(self) -> torch.Tensor:
        """T as an explicit float64 matrix (for tests and small references)."""
        return self.forward(torch.eye(self.n, dtype=torch.float64)).T

    def to(self, device) -> "RandomizedHadamard":
        """The same transform with its tables on `device`."""
        moved = RandomizedHadamard(self.signs.to(device))
        moved._dct = self._dct.to(device)
        return moved

    def rotate_columns(self, w: torch.Tensor) -> torch.Tensor:
        """W Tᵀ: transforms the input side of W ([N, n])."""
        return self.forward(w)

    def rotate_rows(self, w: torch.Tensor) -> torch.Tensor:
        """T W: transforms the output side of W ([n, K])."""
        return self.forward(w.T).T

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """T H Tᵀ."""
        return self.forward(self.forward(h).T).T
