"""Random `caldera` / `lplr` tensors and tiny Llama models made of them, for runtime tests.

No conversion runs: Q, L and R are random matrices stored through the sub-kinds' own packers
(rtn via tiny_model.quantize_rtn, dense, bcq via pack_bcq) with random sign vectors, so any shape
and sub-kind mix is a line of a table. `factored_apply` is an independent float64 reference that
never forms W (fast transforms, verified against the format's explicit matrices in
tests/test_caldera_gpu_model.py), so large shapes stay cheap to check.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pumice.format.kind_bcq import pack_bcq
from pumice.format.kind_caldera import dct_matrix, split_size, unpack_signs
from pumice.format.writer import PumiceWriter

from tiny_model import _random_weight, quantize_rtn, tensor_shape, tensor_names, tiny_config, tiny_metadata

# A sub-tensor: ("rtn", bits, group_size) | ("dense", dtype) | ("bcq", planes, group_size)
RTN2 = ("rtn", 2, 64)


def random_signs(rng: np.random.Generator, n: int) -> np.ndarray:
    signs = rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
    if n % 8:
        signs[-1] &= (1 << (n % 8)) - 1  # padding bits are zero
    return signs


def fast_transform(x: np.ndarray, signs: np.ndarray, inverse: bool = False) -> np.ndarray:
    """T x (or Tᵀ x) along the last axis in float64, T = (C_m ⊗ H_P / √P) diag(s)."""
    n = x.shape[-1]
    m, p = split_size(n)
    s = unpack_signs(signs, n)
    lead = x.shape[:-1]
    y = np.asarray(x, dtype=np.float64)
    if not inverse:
        y = y * s
    y = y.reshape(*lead, m, p)
    h = 1
    while h < p:  # butterflies of span h: blocks of 2h, first half ± second half
        y = y.reshape(*lead, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2).reshape(*lead, m, p)
        h *= 2
    c = dct_matrix(m)
    y = np.einsum("jq,...qp->...jp", c.T if inverse else c, y) / math.sqrt(p)
    y = y.reshape(*lead, n)
    return y * s if inverse else y


def make_sub(rng: np.random.Generator, spec: tuple, shape: tuple[int, int], scale: float):
    """(params, parts, stored float64 matrix) of a random sub-tensor with entries ~ scale."""
    kind = spec[0]
    w = rng.standard_normal(shape) * scale
    if kind == "rtn":
        _, bits, g = spec
        parts, stored = quantize_rtn(torch.from_numpy(w), bits, g)
        return {"kind": "rtn", "bits": bits, "group_size": g}, parts, stored.numpy()
    if kind == "dense":
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[spec[1]]
        t = torch.from_numpy(w).to(dtype).contiguous()
        return {"kind": "dense"}, {"weight": t}, t.to(torch.float64).numpy()
    if kind == "bcq":
        _, q, g = spec
        n, k = shape
        groups = -(-k // g)
        signs = rng.random((q, n, k)) < 0.5
        exponents = rng.integers(-3, 1, size=(n, groups, q))
        row_scales = (rng.uniform(0.5, 1.0, n) * scale).astype(np.float16)
        parts = pack_bcq(signs, exponents, row_scales, g)
        col_group = np.arange(k) // g
        pm = np.where(signs, 1.0, -1.0)  # [q, n, k]
        powers = np.exp2(exponents[:, col_group, :].astype(np.float64))  # [n, k, q]
        stored = row_scales.astype(np.float64)[:, None] * np.einsum("qnk,nkq->nk", pm, powers)
        return {"kind": "bcq", "bits": q, "group_size": g}, parts, stored
    raise ValueError(f"unknown sub-tensor kind {kind!r}")


def make_caldera(rng: np.random.Generator, n: int, k: int, q: tuple | None = RTN2, rank: int = 16,
                 l: tuple = ("rtn", 4, 32), r: tuple = ("rtn", 4, 64), transform: str = "hadamard"):
    """(kind, params, parts, factors) of a random caldera (q given) or lplr (q None) tensor whose
    W has entries of about 1/√k (unit-variance outputs for unit-variance inputs)."""
    params: dict[str, Any] = {"rank": rank, "transform": transform}
    parts: dict[str, Any] = {}
    factors: dict[str, Any] = {"q": None, "l": None, "r": None, "s_in": None, "s_out": None}
    low_share = 0.3 if q is not None else 1.0
    if q is not None:
        sub, sub_parts, factors["q"] = make_sub(rng, q, (n, k), math.sqrt(1 - low_share ** 2) / math.sqrt(k))
        params["q"] = sub
        parts.update({"q." + name: v for name, v in sub_parts.items()})
    if rank > 0:
        for key, spec, shape, scale in (("l", l, (n, rank), math.sqrt(low_share / rank)),
                                        ("r", r, (rank, k), math.sqrt(low_share / k))):
            sub, sub_parts, factors[key] = make_sub(rng, spec, shape, scale)
            params[key] = sub
            parts.update({key + "." + name: v for name, v in sub_parts.items()})
    if transform == "hadamard":
        factors["s_in"], factors["s_out"] = random_signs(rng, k), random_signs(rng, n)
        parts["hadamard.in_signs"], parts["hadamard.out_signs"] = factors["s_in"], factors["s_out"]
    return ("caldera" if q is not None else "lplr"), params, parts, factors


def factored_apply(factors: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """x Wᵀ in float64 with W = T_outᵀ (Q + L R) T_in, never forming W. x: [batch, K]."""
    x = np.asarray(x, dtype=np.float64)
    xr = fast_transform(x, factors["s_in"]) if factors["s_in"] is not None else x
    y = np.zeros((x.shape[0], (factors["q"] if factors["q"] is not None else factors["l"]).shape[0]))
    if factors["q"] is not None:
        y += xr @ factors["q"].T
    if factors["l"] is not None:
        y += (xr @ factors["r"].T) @ factors["l"].T
    return fast_transform(y, factors["s_out"], inverse=True) if factors["s_out"] is not None else y


def write_tensors(path: Path, cases: dict[str, dict], seed: int = 0) -> dict[str, dict]:
    """A tensors-only file with one caldera/lplr tensor per case (make_caldera's keyword
    arguments plus "shape"); returns each tensor's factors."""
    rng = np.random.default_rng(seed)
    factors = {}
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        for name, case in cases.items():
            args = dict(case)
            n, k = args.pop("shape")
            kind, params, parts, factors[name] = make_caldera(rng, n, k, **args)
            writer.add_tensor(name, kind, [n, k], params, parts)
    return factors


# Per-projection storage of the tiny caldera Llama: every sub-kind mix and both transforms,
# lplr, and (layer 1) a bcq backbone.
LLAMA_LAYERS = [
    {"q_proj": dict(q=("rtn", 2, 64), rank=16),
     "k_proj": dict(q=("rtn", 3, 128), rank=0),
     "v_proj": dict(q=None, rank=32, l=("rtn", 8, 32), r=("rtn", 8, 64)),
     "o_proj": dict(q=("rtn", 4, 64), rank=8, transform="none"),
     "gate_proj": dict(q=("rtn", 2, 64), rank=16),
     "up_proj": dict(q=("dense", "f16"), rank=8, l=("dense", "f32"), r=("rtn", 4, 64)),
     "down_proj": dict(q=("rtn", 3, 64), rank=16)},
    {"q_proj": dict(q=("rtn", 4, 128), rank=24, l=("rtn", 4, 32), r=("rtn", 8, 128)),
     "k_proj": dict(q=("rtn", 2, 64), rank=8, transform="none"),
     "v_proj": dict(q=("rtn", 2, 64), rank=16),
     "o_proj": dict(q=None, rank=48, l=("rtn", 8, 64), r=("rtn", 8, 64)),
     "gate_proj": dict(q=("bcq", 3, 64), rank=16),
     "up_proj": dict(q=("rtn", 2, 32), rank=16, l=("dense", "bf16"), r=("dense", "f16")),
     "down_proj": dict(q=None, rank=64, l=("rtn", 4, 64), r=("rtn", 4, 64))},
]


def write_caldera_llama(path: Path, seed: int = 0, **config_overrides) -> dict[str, Any]:
    """A random tiny Llama whose decoder projections are caldera/lplr (LLAMA_LAYERS, cycled);
    embeddings dense f32, head rtn 4-bit, norms f32. Returns its config."""
    config = tiny_config(**config_overrides)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    with PumiceWriter(Path(path), tiny_metadata(config)) as writer:
        for name in tensor_names(config):
            shape = tensor_shape(name, config)
            parts = name.split(".")
            if len(shape) == 2 and parts[1] == "layers":
                layer, proj = int(parts[2]), parts[-2]
                spec = LLAMA_LAYERS[layer % len(LLAMA_LAYERS)][proj]
                kind, params, tensor_parts, _ = make_caldera(rng, shape[0], shape[1], **spec)
                writer.add_tensor(name, kind, list(shape), params, tensor_parts)
                continue
            w = _random_weight(name, shape, gen)
            if name == "lm_head.weight":
                tensor_parts, _ = quantize_rtn(w, 4, 64)
                writer.add_tensor(name, "rtn", list(shape), {"bits": 4, "group_size": 64}, tensor_parts)
            else:
                writer.add_tensor(name, "dense", list(shape), {}, {"weight": w.to(torch.float32).contiguous()})
    return config


def file_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file reconstructed by the Python reference reader, as float64."""
    from pumice.format.reader import PumiceFile
    with PumiceFile(path) as f:
        return {name: torch.from_numpy(f.dequantize(name).astype(np.float64)) for name in f.tensors
                if f.tensor(name).kind != "blob"}


# The tensors of the kernel tests: shapes with odd factors m (3, 5, 9, 37, 43, 75), dimensions
# that are not multiples of 16 or of the GEMV unit, every sub-kind, both transforms, lplr.
KERNEL_CASES: dict[str, dict] = {
    "cal_q2_r16": dict(shape=(96, 160), q=("rtn", 2, 64), rank=16),
    "cal_q3_r0": dict(shape=(256, 576), q=("rtn", 3, 576), rank=0),
    "cal_q4_r32": dict(shape=(344, 1536), q=("rtn", 4, 128), rank=32, l=("rtn", 8, 32), r=("rtn", 4, 64)),
    "cal_dense": dict(shape=(40, 72), q=("dense", "f16"), rank=8, l=("dense", "f32"), r=("dense", "bf16")),
    "cal_none": dict(shape=(37, 300), q=("rtn", 2, 32), rank=8, l=("rtn", 4, 32), r=("rtn", 8, 64),
                     transform="none"),
    "cal_odd": dict(shape=(37, 300), q=("rtn", 8, 64), rank=4),
    "cal_bcq": dict(shape=(64, 576), q=("bcq", 2, 64), rank=16),
    "lplr_had": dict(shape=(96, 160), q=None, rank=24, l=("rtn", 8, 32), r=("rtn", 8, 64)),
    "lplr_none": dict(shape=(64, 96), q=None, rank=8, transform="none"),
}
# 14336 = 7 · 2048 rows: a transform vector of 56 KiB (above the default 48 KiB of shared
# memory) and enough row tiles for the two-tile GEMV blocks.
BIG_CASE = {"cal_big": dict(shape=(14336, 4096), q=("rtn", 2, 64), rank=64, l=("rtn", 4, 64),
                            r=("rtn", 4, 128))}
