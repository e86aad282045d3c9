"""CALDERA (W ≈ Q + L·R) and LPLR (W ≈ L·R): decomposition, rounding, transforms, bit budgets.

Modules: hadamard (randomized Hadamard ⊗ DCT transforms), grid (f16 group grids), ldlq
(Hessian-aware rounding), lplr (quantized low-rank factors), decompose (the alternating
minimisation), budget (exact bits and the per-matrix allocation), method (the converter methods).
"""
