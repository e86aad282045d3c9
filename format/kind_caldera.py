"""Storage kinds `caldera` (W = Q + L·R) and `lplr` (W = L·R), in a randomized Hadamard basis.

See docs/FORMAT.md (sections `caldera` and `lplr`). With T_in, T_out the transforms of the input
and output dimension (random signs, then a Walsh–Hadamard ⊗ DCT mix, orthogonal):

    W = T_outᵀ (Q + L R) T_in          ("transform": "hadamard")
    W = Q + L R                        ("transform": "none")

Q [N, K], L [N, k] and R [k, K] are sub-tensors of any matrix kind (rtn, bcq, dense, ...), stored
under the part prefixes "q.", "l.", "r."; their params objects carry their own "kind".
"""
from __future__ import annotations

import math

import numpy as np

from .kinds import expected_parts, int_param, register_kind, require_matrix

TRANSFORMS = ("hadamard", "none")
MAX_RANK = 4096
_COMPOSITE_KINDS = ("caldera", "lplr")


# ---------------------------------------------------------------------------------------------
# The transform (numpy float64 reference; csrc/src/hadamard_cpu.cpp is the fast one)

def split_size(n: int) -> tuple[int, int]:
    """(m, P): n = m · P, P the largest power of two dividing n, m odd."""
    power = n & -n
    return n // power, power


def dct_matrix(m: int) -> np.ndarray:
    """Orthonormal DCT-II: C[j, i] = √(2/m) cos(π (2i + 1) j / (2m)), row 0 = 1/√m."""
    j = np.arange(m, dtype=np.float64)[:, None]
    i = np.arange(m, dtype=np.float64)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * j / (2 * m)) * math.sqrt(2.0 / m)
    c[0] = 1.0 / math.sqrt(m)
    return c


def sylvester_hadamard(p: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def unpack_signs(packed: np.ndarray, n: int) -> np.ndarray:
    """u8 bits (little-endian within bytes; 1 means −1) → ±1.0 float64 [n]."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


def transform_matrix(packed_signs: np.ndarray, n: int) -> np.ndarray:
    """T = (C_m ⊗ H_P / √P) · diag(s) as an explicit float64 matrix."""
    m, p = split_size(n)
    core = np.kron(dct_matrix(m), sylvester_hadamard(p) / math.sqrt(p))
    return core * unpack_signs(packed_signs, n)[None, :]


# ---------------------------------------------------------------------------------------------
# Params and parts

def _sub_params(params, key: str) -> tuple[str, dict]:
    sub = params.get(key)
    if not isinstance(sub, dict) or not isinstance(sub.get("kind"), str):
        raise ValueError(f"parameter {key!r} must be an object with a string 'kind'")
    if sub["kind"] in _COMPOSITE_KINDS:
        raise ValueError(f"sub-tensor {key!r} cannot itself be {sub['kind']!r}")
    return sub["kind"], {k: v for k, v in sub.items() if k != "kind"}


def caldera_layout(shape, params, with_q: bool) -> dict:
    n, k = require_matrix(shape)
    allowed = {"rank", "transform", "l", "r"} | ({"q"} if with_q else set())
    extra = set(params) - allowed
    if extra:
        raise ValueError(f"unexpected parameters {sorted(extra)}")
    rank = int_param(params, "rank", range(0 if with_q else 1, MAX_RANK + 1))
    if rank > min(n, k):
        raise ValueError(f"rank {rank} exceeds min(out, in) = {min(n, k)}")
    transform = params.get("transform")
    if transform not in TRANSFORMS:
        raise ValueError(f"parameter 'transform' must be one of {TRANSFORMS}, got {transform!r}")
    layout = {"n": n, "k": k, "rank": rank, "transform": transform, "subs": []}
    if with_q:
        kind, sub = _sub_params(params, "q")
        layout["subs"].append(("q.", kind, sub, (n, k)))
    if rank > 0:
        for key, sub_shape in (("l", (n, rank)), ("r", (rank, k))):
            kind, sub = _sub_params(params, key)
            layout["subs"].append((key + ".", kind, sub, sub_shape))
    elif "l" in params or "r" in params:
        raise ValueError("rank 0 takes no 'l' or 'r' parameters")
    return layout


def _describe(shape, params, with_q):
    layout = caldera_layout(shape, params, with_q)
    parts = {}
    for prefix, kind, sub, sub_shape in layout["subs"]:
        parts.update(expected_parts(kind, sub_shape, sub, prefix))
    if layout["transform"] == "hadamard":
        parts["hadamard.in_signs"] = ("u8", ((layout["k"] + 7) // 8,))
        parts["hadamard.out_signs"] = ("u8", ((layout["n"] + 7) // 8,))
    return parts


def rotated_reconstruction(view, with_q: bool) -> np.ndarray:
    """Q + L R (float64), before the transforms are undone."""
    layout = caldera_layout(view.shape, view.params, with_q)
    mats = {}
    for prefix, kind, sub, sub_shape in layout["subs"]:
        mats[prefix] = view.sub(prefix, kind, sub, sub_shape).dequantize().astype(np.float64)
    out = np.zeros((layout["n"], layout["k"]))
    if "q." in mats:
        out += mats["q."]
    if layout["rank"] > 0:
        out += mats["l."] @ mats["r."]
    return out


def _dequantize(view, with_q):
    layout = caldera_layout(view.shape, view.params, with_q)
    w = rotated_reconstruction(view, with_q)
    if layout["transform"] == "hadamard":
        t_in = transform_matrix(view.part("hadamard.in_signs"), layout["k"])
        t_out = transform_matrix(view.part("hadamard.out_signs"), layout["n"])
        w = t_out.T @ w @ t_in
    return w.astype(np.float32)


def _sub_summary(params, key):
    sub = params.get(key) or {}
    text = f"{sub.get('kind')}{sub.get('bits', '')}"
    if "group_size" in sub:
        text += f"g{sub['group_size']}"
    return text


def _summarize(shape, params, with_q):
    pieces = []
    if with_q:
        pieces.append("Q=" + _sub_summary(params, "q"))
    rank = params.get("rank", 0)
    pieces.append(f"k={rank}")
    if rank:
        pieces.append("L=" + _sub_summary(params, "l"))
        pieces.append("R=" + _sub_summary(params, "r"))
    pieces.append(f"T={params.get('transform')}")
    return " ".join(pieces)


register_kind("caldera", lambda v: _dequantize(v, True), lambda s, p: _describe(s, p, True),
              lambda s, p: _summarize(s, p, True))
register_kind("lplr", lambda v: _dequantize(v, False), lambda s, p: _describe(s, p, False),
              lambda s, p: _summarize(s, p, False))
