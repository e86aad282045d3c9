"""The `caldera` and `lplr` conversion methods (registered with pumice.converter.methods).

    pumice convert HF_DIR -o out.pumice --method caldera --bits 2.5 [--calib TEXT_FILE]

1. Calibration: H = E[x xᵀ] per linear layer (converter/calibration.py, cached on disk).
2. Every decoder linear weight is decomposed under each candidate configuration
   (Q bits × Q group size × rank); each candidate's exact stored bits and calibration error
   tr(E H Eᵀ) are recorded, with its packed parts.
3. budget.allocate picks one candidate per matrix so that the total stored bits of the linear
   layers meet `bits` (bits per weight) with the least total calibration error.
4. The file is written in the usual order (ctx.run) from the chosen candidates.
"""
from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pumice.format.packing import pack_codes

from ..hf import is_decoder_linear
from ..methods import ConversionContext, register_method
from .budget import Candidate, allocate, part_bits
from .decompose import CalderaConfig, Decomposition, RotatedProblem, decompose
from .ldlq import Quantized

DEFAULT_BITS = 2.5
DEFAULT_Q_BITS = (2, 3, 4)
DEFAULT_RANKS = (16,)
DEFAULT_LR_BITS = 4
DEFAULT_ITERS = 1
DEFAULT_SEQUENCES = 32
DEFAULT_SEQ_LEN = 512
OPTIONS = ("calib", "n_sequences", "seq_len", "calib_cache", "ranks", "q_bits", "lr_bits",
           "iters", "seed", "device", "hessians", "q_group_sizes", "candidates_cache", "rounding")


def _round32(x: int) -> int:
    return -(-x // 32) * 32


def row_group_size(k: int) -> int:
    """The largest `rtn` group (≤ 4096, multiple of 32) that splits a row of k evenly-ish."""
    pieces = -(-k // 4096)
    return min(4096, _round32(-(-k // pieces)))


def input_group(name: str) -> str:
    """Weights that read the same input share a name here (q/k/v, gate/up)."""
    name = re.sub(r"self_attn\.[qkv]_proj", "self_attn.qkv", name)
    return re.sub(r"mlp\.(gate|up)_proj", "mlp.gate_up", name)


def rtn_parts(q: Quantized) -> dict[str, np.ndarray]:
    return {"codes": pack_codes(np.ascontiguousarray(q.codes.contiguous().numpy()), q.grid.bits),
            "scales": np.ascontiguousarray(q.grid.scales.numpy().astype(np.float16)),
            "mins": np.ascontiguousarray(q.grid.mins.numpy().astype(np.float16))}


def rtn_params(q: Quantized) -> dict:
    return {"kind": "rtn", "bits": q.grid.bits, "group_size": q.grid.group_size}


def encode(result: Decomposition, with_q: bool = True) -> tuple[str, dict, dict]:
    """(kind, params, parts) of a decomposition, as docs/FORMAT.md `caldera` / `lplr`."""
    params: dict = {"rank": result.config.rank,
                    "transform": "hadamard" if result.t_in is not None else "none"}
    parts: dict = {}
    if with_q:
        params["q"] = rtn_params(result.q)
        parts.update({"q." + k: v for k, v in rtn_parts(result.q).items()})
    if result.config.rank > 0:
        params["l"] = rtn_params(result.low_rank.left)
        params["r"] = rtn_params(result.low_rank.right)
        parts.update({"l." + k: v for k, v in rtn_parts(result.low_rank.left).items()})
        parts.update({"r." + k: v for k, v in rtn_parts(result.low_rank.right).items()})
    if result.t_in is not None:
        parts["hadamard.in_signs"] = result.t_in.packed_signs()
        parts["hadamard.out_signs"] = result.t_out.packed_signs()
    return ("caldera" if with_q else "lplr"), params, parts


def candidate_configs(shape, q_bits, ranks, lr_bits, q_group_sizes=None, with_q=True
                      ) -> list[CalderaConfig]:
    n, k = shape
    row = row_group_size(k)
    groups = sorted({row if g in (None, "row") else int(g) for g in (q_group_sizes or ["row"])})
    configs = []
    for rank in ((0,) if with_q else ()) + tuple(r for r in ranks if 0 < r <= min(n, k)):
        # Q + L·R only on the smallest Q width: that is where the low-rank part pays for its
        # bits (at 3-4 bits a wider Q is cheaper per unit of error removed on small models).
        for bits in (q_bits if (with_q and rank == 0) else q_bits[:1] if with_q else (2,)):
            for g in (groups if rank == 0 else [row]):
                configs.append(CalderaConfig(q_bits=bits, q_group_size=g, rank=rank,
                                             l_bits=lr_bits, r_bits=lr_bits,
                                             l_group_size=_round32(rank) if rank else 32,
                                             r_group_size=row))
    return configs


def config_label(config: CalderaConfig, with_q: bool = True) -> str:
    text = f"Q{config.q_bits}g{config.q_group_size}" if with_q else ""
    if config.rank:
        text += ("+" if text else "") + f"L{config.l_bits}R{config.r_bits}k{config.rank}"
    return text


def evaluate_matrix(weight: torch.Tensor, hessian: torch.Tensor, configs, seed: int,
                    iters: int, with_q: bool = True, input_seed: int | None = None,
                    shared: dict | None = None, ldlq_right: bool = False,
                    hessian_rounding: bool = True) -> list[Candidate]:
    """Every candidate configuration of one matrix: exact bits, calibration error, parts."""
    problem = RotatedProblem(weight, hessian, seed, input_seed=input_seed, shared=shared)
    out = []
    q_only = {}  # (bits, group) -> Q of the rank-0 candidate, the first iterate of the others
    for config in configs:
        grid = (config.q_bits, config.q_group_size)
        result = decompose(problem, config, iters=iters, quantize_q=with_q,
                           first_q=q_only.get(grid), ldlq_right=ldlq_right,
                           hessian_rounding=hessian_rounding)
        if config.rank == 0:
            q_only[grid] = result.q
        kind, params, parts = encode(result, with_q)
        bits = part_bits(kind, tuple(weight.shape), params)
        out.append(Candidate(config_label(config, with_q), bits, result.error,
                             (kind, params, parts, result.relative_error)))
    problem.remember()
    return out


def _load_candidates(path, settings):
    """Candidates evaluated earlier with the same settings (one evaluation, many budgets)."""
    if not path or not Path(path).is_file():
        return None
    import pickle
    with open(path, "rb") as f:
        blob = pickle.load(f)
    return blob["choices"] if blob.get("settings") == settings else None


def _save_candidates(path, settings, choices):
    if not path:
        return
    import os
    import pickle
    partial = Path(str(path) + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as f:
        pickle.dump({"settings": settings, "choices": choices}, f, protocol=4)
    os.replace(partial, path)


def _calibration_texts(option):
    if option is None:
        return None
    path = Path(option)
    if not path.is_file():
        raise ValueError(f"calibration text file {option!r} not found")
    return path.read_text(encoding="utf-8", errors="replace")


def _tuple_option(value, default):
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _convert(ctx: ConversionContext, with_q: bool) -> None:
    from ..calibration import collect_hessians

    ctx.check_options(OPTIONS)
    opts = ctx.options
    budget = float(ctx.bits if ctx.bits is not None else DEFAULT_BITS)
    q_bits = _tuple_option(opts.get("q_bits"), DEFAULT_Q_BITS)
    ranks = _tuple_option(opts.get("ranks"), DEFAULT_RANKS if with_q else (8, 16, 32, 64))
    lr_bits = int(opts.get("lr_bits") or DEFAULT_LR_BITS)
    iters = int(opts.get("iters") or DEFAULT_ITERS)
    seed = int(opts.get("seed") or 0)
    q_group_sizes = opts.get("q_group_sizes")
    if isinstance(q_group_sizes, str):
        q_group_sizes = [g.strip() for g in q_group_sizes.split(",")]
    if ctx.group_size is not None:
        q_group_sizes = [ctx.group_size]
    rounding = opts.get("rounding") or "ldlq"
    if rounding not in ("ldlq", "nearest"):
        raise ValueError(f"rounding must be 'ldlq' or 'nearest', got {rounding!r}")
    started = time.time()


    names = [name for layer in range(ctx.config["num_hidden_layers"])
             for name in ctx.checkpoint.layer_names(layer) if is_decoder_linear(name)]
    settings = repr((ctx.method.name, q_bits, ranks, lr_bits, iters, seed, q_group_sizes,
                     opts.get("calib"), opts.get("n_sequences"), opts.get("seq_len"),
                     str(ctx.checkpoint.directory))) + ("" if rounding == "ldlq" else rounding)
    choices = _load_candidates(opts.get("candidates_cache"), settings)
    calib_seconds = 0.0
    if choices is None:
        hessians = opts.get("hessians")
        if hessians is None:
            cache = opts.get("calib_cache")
            hessians = collect_hessians(
                ctx.checkpoint.directory, _calibration_texts(opts.get("calib")),
                n_sequences=int(opts.get("n_sequences") or DEFAULT_SEQUENCES),
                seq_len=int(opts.get("seq_len") or DEFAULT_SEQ_LEN),
                device=opts.get("device"), cache_path=cache, progress=ctx.progress is not None
                and not getattr(ctx.progress, "disable", False))
        calib_seconds = time.time() - started
        choices = []
        shared: dict = {}
        from tqdm.auto import tqdm
        for index, name in enumerate(tqdm(names, desc=f"{ctx.method.name} candidates",
                                          leave=False,
                                          disable=getattr(ctx.progress, "disable", False))):
            weight = ctx.checkpoint.get(name).to(torch.float32)
            configs = candidate_configs(tuple(weight.shape), q_bits, ranks, lr_bits,
                                        q_group_sizes, with_q)
            # One T_in per layer input (q/k/v and gate/up share theirs, and so H' and U).
            input_seed = seed + zlib.crc32(input_group(name).encode())
            choices.append(evaluate_matrix(weight, hessians[name], configs,
                                           seed + 7919 * index, iters, with_q,
                                           input_seed=input_seed, shared=shared,
                                           hessian_rounding=rounding == "ldlq"))
        _save_candidates(opts.get("candidates_cache"), settings, choices)
    total_weights = sum(int(np.prod(ctx.shape_of(name))) for name in names)
    selection = allocate(choices, budget * total_weights)
    chosen = {name: choices[i][selection[i]] for i, name in enumerate(names)}
    total_bits = sum(c.bits for c in chosen.values())

    def quantize(ctx, name, weight):
        kind, params, parts, _ = chosen[name].payload
        return kind, params, parts

    ctx.run(quantize)
    ctx.provenance[ctx.method.name] = {
        "budget_bits_per_weight": budget,
        "linear_bits_per_weight": total_bits / total_weights,
        "linear_weights": total_weights,
        "calibration_seconds": round(calib_seconds, 1),
        "seconds": round(time.time() - started, 1),
        "iters": iters,
        "choices": {name: c.label for name, c in chosen.items()},
        "relative_errors": {name: float(f"{c.payload[3]:.4g}") for name, c in chosen.items()},
    }


def convert_caldera(ctx: ConversionContext) -> None:
    _convert(ctx, with_q=True)


def convert_lplr(ctx: ConversionContext) -> None:
    _convert(ctx, with_q=False)


register_method("caldera", convert_caldera, defaults={"bits": DEFAULT_BITS, "group_size": None},
                description="CALDERA: W ≈ Q + L·R in a randomized Hadamard basis, LDLQ-rounded, "
                            "calibration-aware, per-layer bit allocation to a total budget")
register_method("lplr", convert_lplr, defaults={"bits": 4.0, "group_size": None},
                description="LPLR: W ≈ L·R with quantized factors (for matrices that are "
                            "close to low rank)")
