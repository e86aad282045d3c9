"""Random linear-layer tensors of every storage kind, written straight from random codes.

Benchmarks measure speed, not quality, so no weight is ever quantized: codes, sign planes and
sign vectors are random bytes (numpy's bit generator, ~2 GB/s on one core), and the few
floating-point parts (per-group scales, row scales) come from 256-entry tables indexed by random
bytes. Every tensor is valid for the Python reader and the native runtime (padding bits and rows
are zero, exponents in range), and scaled so that unit-variance inputs give outputs of about unit
variance, so a deep random model keeps finite activations.

Kind names (the `--kinds` of bench_cuda.py):

    rtn{b}g{g}          rtn, b-bit codes, groups of g inputs              rtn2g64, rtn4g128
    bcq{q}g{g}          bcq (ShiftAddLLM), q sign planes, groups of g     bcq2g128, bcq3g128
    caldera{b}r{k}      caldera: Q rtn b-bit g64 + rank-k L·R (L rtn4 g32, R rtn4 g64, the
                        converter's defaults), randomized Hadamard basis  caldera2r64
    caldera{b}g{g}r{k}  the same with Q in groups of g                    caldera2g128r32
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from pumice.format.kinds import expected_parts
from pumice.format.packing import packed_row_bytes

# CALDERA's low-rank factors: the converter's defaults (converter/caldera/decompose.py).
CALDERA_L = (4, 32)
CALDERA_R = (4, 64)
CALDERA_Q_GROUP = 64
# Share of W's variance carried by L·R (as tests/caldera_tensors.py: about what real layers show).
LOW_RANK_SHARE = 0.3
# The CUDA transform keeps one vector of the dimension in a block's shared memory
# (csrc/cuda/hadamard_gpu.cuh: 4 bytes per entry, up to the opt-in limit, 227 KiB on H100/H200).
# A larger caldera tensor would fall back to a host-dequantized f16 matrix, which is not the
# path being measured, so such tensors (Llama 3's 128256-row head) are written with
# transform "none": the same Q + L·R kernels without the two transforms.
HADAMARD_GPU_MAX_DIM = (227 << 10) // 4
# bcq exponents are drawn from {0, -1, -2, -3}: E[4^e] over that set.
_BCQ_EXPONENTS = 4
_BCQ_MEAN_POWER = sum(4.0 ** -e for e in range(_BCQ_EXPONENTS)) / _BCQ_EXPONENTS

_NAME = re.compile(r"^(?:(?P<kind>rtn|bcq)(?P<bits>\d+)g(?P<group>\d+)"
                   r"|caldera(?P<qbits>\d+)(?:g(?P<qgroup>\d+))?r(?P<rank>\d+))$")


@dataclass(frozen=True)
class KindSpec:
    name: str
    kind: str          # "rtn" | "bcq" | "caldera"
    bits: int          # rtn/bcq bits; caldera: Q's bits
    group_size: int    # rtn/bcq group; caldera: Q's group
    rank: int = 0      # caldera only

    def describe(self) -> str:
        if self.kind != "caldera":
            return f"{self.kind} {self.bits}-bit, groups of {self.group_size}"
        return (f"caldera: Q rtn{self.bits}g{self.group_size} + rank {self.rank} "
                f"L rtn{CALDERA_L[0]}g{CALDERA_L[1]} R rtn{CALDERA_R[0]}g{CALDERA_R[1]}, hadamard")


def parse_kind(name: str) -> KindSpec:
    """A kind name (module docstring) -> KindSpec; ValueError naming what is wrong."""
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"unknown kind name {name!r}: expected rtn<b>g<g>, bcq<q>g<g>, "
                         f"caldera<b>r<rank> or caldera<b>g<g>r<rank> (e.g. rtn2g64, bcq3g128, caldera2r64)")
    if m["kind"]:
        spec = KindSpec(name, m["kind"], int(m["bits"]), int(m["group"]))
        subs = [(spec.kind, spec.bits, spec.group_size)]
    else:
        spec = KindSpec(name, "caldera", int(m["qbits"]), int(m["qgroup"] or CALDERA_Q_GROUP), int(m["rank"]))
        subs = [("rtn", spec.bits, spec.group_size), ("rtn", *CALDERA_L), ("rtn", *CALDERA_R)]
        if spec.rank < 1:
            raise ValueError(f"kind {name!r}: rank must be at least 1")
    for kind, bits, group in subs:  # the format's own parameter checks (pumice.format.kinds)
        try:
            expected_parts(kind, (32, 32), {"bits": bits, "group_size": group})
        except Exception as err:
            raise ValueError(f"kind {name!r}: {kind} bits={bits} group_size={group}: {err}") from None
    return spec


def random_bytes(rng: np.random.Generator, shape) -> np.ndarray:
    """Uniform random uint8 array of `shape`, straight from the bit generator."""
    n = math.prod(shape)
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(shape)


def _spread_table(value: float) -> np.ndarray:
    """256 values spread evenly over [0.75, 1.25] * value (float32)."""
    return (value * (0.75 + 0.5 * np.arange(256) / 255.0)).astype(np.float32)


def random_embedding(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """f16 [rows, cols], about unit variance (uniform on 256 levels)."""
    table = ((np.arange(256) - 127.5) / 73.9).astype(np.float16)
    return table[random_bytes(rng, (rows, cols))]


def random_rtn(rng: np.random.Generator, n: int, k: int, bits: int, group: int,
               std: float) -> tuple[dict, dict]:
    """(params, parts) of an rtn tensor [n, k] with uniform codes and entries of about `std`."""
    codes = random_bytes(rng, (n, packed_row_bytes(k, bits)))
    used_bits = k * bits  # codes k..Kp-1 are zero padding
    first_pad_byte = -(-used_bits // 8)
    codes[:, first_pad_byte:] = 0
    if used_bits % 8:
        codes[:, used_bits // 8] &= (1 << (used_bits % 8)) - 1
    levels = (1 << bits) - 1
    code_std = math.sqrt(((levels + 1) ** 2 - 1) / 12.0)
    scale = _spread_table(std / code_std)
    pick = random_bytes(rng, (n, -(-k // group)))
    scales = scale.astype(np.float16)[pick]
    mins = (-scale * levels / 2).astype(np.float16)[pick]  # centred codes
    return {"bits": bits, "group_size": group}, {"codes": codes, "scales": scales, "mins": mins}


def random_bcq(rng: np.random.Generator, n: int, k: int, bits: int, group: int) -> tuple[dict, dict]:
    """(params, parts) of a bcq tensor [n, k]: random sign planes, exponents in [-3, 0], row
    scales for unit-variance outputs (about 0.02 at k = 4096, q = 2)."""
    tiles, col_bytes, groups = -(-n // 32), -(-k // 8), -(-k // group)
    planes = random_bytes(rng, (tiles, col_bytes, bits, 32))
    exponents = np.negative((random_bytes(rng, (tiles, groups, bits, 32)) & (_BCQ_EXPONENTS - 1)).view(np.int8))
    if n % 32:  # padding rows are zero
        planes[-1, :, :, n % 32:] = 0
        exponents[-1, :, :, n % 32:] = 0
    if k % 8:  # padding columns are zero
        planes[:, -1] &= (1 << (k % 8)) - 1
    row_scale = 1.0 / math.sqrt(k * bits * _BCQ_MEAN_POWER)
    row_scales = _spread_table(row_scale).astype(np.float16)[random_bytes(rng, (n,))]
    return {"bits": bits, "group_size": group}, {"planes": planes, "exponents": exponents,
                                                  "row_scales": row_scales}


def random_signs(rng: np.random.Generator, n: int) -> np.ndarray:
    """A packed sign vector of length n (bit set = -1), padding bits zero."""
    signs = random_bytes(rng, ((n + 7) // 8,))
    if n % 8:
        signs[-1] &= (1 << (n % 8)) - 1
    return signs


def random_caldera(rng: np.random.Generator, n: int, k: int, q_bits: int, q_group: int, rank: int,
                   transform: str = "hadamard") -> tuple[dict, dict]:
    """(params, parts) of a caldera tensor [n, k]: W = T_outᵀ (Q + L R) T_in with entries of
    about 1/√k, L·R carrying LOW_RANK_SHARE of the output's standard deviation."""
    if rank > min(n, k):
        raise ValueError(f"caldera rank {rank} exceeds min(out, in) = {min(n, k)} of a [{n}, {k}] layer")
    share = LOW_RANK_SHARE
    params: dict = {"rank": rank, "transform": transform}
    parts: dict = {}
    subs = (("q", (n, k), (q_bits, q_group), math.sqrt(1 - share ** 2) / math.sqrt(k)),
            ("l", (n, rank), CALDERA_L, math.sqrt(share / rank)),
            ("r", (rank, k), CALDERA_R, math.sqrt(share / k)))
    for key, (rows, cols), (bits, group), std in subs:
        sub_params, sub_parts = random_rtn(rng, rows, cols, bits, group, std)
        params[key] = {"kind": "rtn", **sub_params}
        parts.update({f"{key}.{part}": value for part, value in sub_parts.items()})
    if transform == "hadamard":
        parts["hadamard.in_signs"] = random_signs(rng, k)
        parts["hadamard.out_signs"] = random_signs(rng, n)
    return params, parts


def random_linear(rng: np.random.Generator, spec: KindSpec, n: int, k: int) -> tuple[str, dict, dict]:
    """(kind, params, parts) of a random [n, k] linear layer stored as `spec`."""
    if spec.kind == "rtn":
        return ("rtn", *random_rtn(rng, n, k, spec.bits, spec.group_size, 1.0 / math.sqrt(k)))
    if spec.kind == "bcq":
        return ("bcq", *random_bcq(rng, n, k, spec.bits, spec.group_size))
    transform = "hadamard" if max(n, k) <= HADAMARD_GPU_MAX_DIM else "none"
    return ("caldera", *random_caldera(rng, n, k, spec.bits, spec.group_size, spec.rank, transform))
