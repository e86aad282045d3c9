"""Bit budgets: exact stored bits of a configuration, and the per-matrix choice that meets a total.

`--bits B` is an average over all decoder linear weights of everything stored for them (codes,
scales, mins, L and R with theirs, sign vectors, padding): Σ stored bits ≤ B · Σ weights.

Each matrix has candidate configurations, each with its exact cost in bits and its measured
calibration error tr(E H Eᵀ) (the expected squared error of the layer's output). The choice
minimises the total error under the budget: a Lagrangian search (each matrix takes the candidate
minimising error + λ·bits; bisect λ) gives the convex-hull solution, then the remaining slack is
spent greedily on the upgrades with the largest error drop per extra bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pumice.format.kinds import DTYPES, expected_parts


def part_bits(kind: str, shape: tuple, params: dict) -> int:
    """Exact stored bits of a tensor of `kind` (sum over its parts)."""
    total = 0
    for dtypes, part_shape in expected_parts(kind, shape, params).values():
        count = 1
        for s in part_shape:
            count *= s
        total += count * DTYPES[dtypes[0]][1] * 8
    return total


@dataclass
class Candidate:
    label: str
    bits: int          # stored bits of the whole matrix
    error: float       # tr(E H Eᵀ)
    payload: object = None  # whatever the caller needs to write it


def allocate(choices: Sequence[Sequence[Candidate]], budget_bits: float) -> list[int]:
    """Index of the chosen candidate per matrix, total bits ≤ budget_bits, total error minimal
    on the convex hull plus a greedy fill. Raises ValueError if even the cheapest choice is over.
    """
    cheapest = [min(range(len(c)), key=lambda i: (c[i].bits, c[i].error)) for c in choices]
    floor = sum(c[i].bits for c, i in zip(choices, cheapest))
    if floor > budget_bits:
        raise ValueError(f"bit budget too small: the cheapest configuration needs "
                         f"{floor} bits, the budget is {int(budget_bits)}")

    def pick(lam: float) -> list[int]:
        return [min(range(len(c)), key=lambda i: (c[i].error + lam * c[i].bits, c[i].bits))
                for c in choices]

    def cost(selection):
        return sum(c[i].bits for c, i in zip(choices, selection))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget_bits:
        hi *= 4.0
        if hi > 1e30:
            break
    if cost(pick(lo)) <= budget_bits:
        selection = pick(lo)
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            if cost(pick(mid)) > budget_bits:
                lo = mid
            else:
                hi = mid
        selection = pick(hi)
        if cost(selection) > budget_bits:
            selection = cheapest
    # Greedy fill: best error drop per extra bit that still fits.
    spent = cost(selection)
    while True:
        best = None
        for m, c in enumerate(choices):
            current = c[selection[m]]
            for i, cand in enumerate(c):
                extra = cand.bits - current.bits
                gain = current.error - cand.error
                if gain <= 0 or spent + extra > budget_bits:
                    continue
                ratio = gain / max(extra, 1)
                if best is None or ratio > best[0]:
                    best = (ratio, m, i, extra)
        if best is None:
            break
        _, m, i, extra = best
        selection[m] = i
        spent += extra
    return selection
