"""Time CALDERA on one Llama-2-7B-shaped decoder layer (random weights, synthetic H).

    python benchmarks/caldera_layer_timing.py [--device cuda] [--rank 64] [--iters 2]

Shapes: q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008. H = E[x xᵀ] is synthetic but
realistic in structure: correlated channels with uneven scales and a few outlier channels, built
from 8192 random tokens. q/k/v share one H (and one input transform), as do gate/up. Prints one
row per matrix (seconds, relative calibration error) and the layer total; multiply by 32 layers
for the whole model. Runs with torch on the given device (default: cuda if available).
"""
from __future__ import annotations

import argparse
import time

import torch

from pumice.converter.caldera.decompose import CalderaConfig, RotatedProblem, decompose

SHAPES = [("q_proj", 4096, 4096, "attn"), ("k_proj", 4096, 4096, "attn"),
          ("v_proj", 4096, 4096, "attn"), ("o_proj", 4096, 4096, "o"),
          ("gate_proj", 11008, 4096, "mlp"), ("up_proj", 11008, 4096, "mlp"),
          ("down_proj", 4096, 11008, "down")]


def synthetic_hessian(k: int, device, tokens: int = 8192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    scales = torch.exp(torch.randn(k, generator=g) * 0.5)
    scales[torch.randperm(k, generator=g)[:8]] *= 20.0  # outlier channels
    mix = torch.randn(k, 64, generator=g) / 8.0
    x = torch.randn(tokens, k, generator=g) + torch.randn(tokens, 64, generator=g) @ mix.T
    x = (x * scales).to(device)
    return x.T @ x / tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--q-bits", type=int, default=2)
    parser.add_argument("--q-group-size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lr-bits", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--matrices", default=",".join(s[0] for s in SHAPES))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    wanted = set(args.matrices.split(","))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"device {device}, Q{args.q_bits} g{args.q_group_size}, rank {args.rank} "
          f"L/R {args.lr_bits}-bit, {args.iters} iterations")
    print("| matrix | shape | seconds | relative error |")
    print("|---|---|---|---|")
    hessians, shared, total = {}, {}, 0.0
    g = torch.Generator().manual_seed(1)
    for name, n, k, group in SHAPES:
        if name not in wanted:
            continue
        if group not in hessians:
            hessians = {group: synthetic_hessian(k, device, seed=len(hessians))}
        w = (torch.randn(n, k, generator=g) * 0.02).to(device)
        config = CalderaConfig(q_bits=args.q_bits, q_group_size=min(args.q_group_size, 4096),
                               rank=args.rank, l_bits=args.lr_bits, r_bits=args.lr_bits,
                               l_group_size=max(32, -(-args.rank // 32) * 32),
                               r_group_size=min(4096, -(-k // 32) * 32) if k <= 4096 else 3680)
        sync()
        started = time.perf_counter()
        problem = RotatedProblem(w, hessians[group], seed=7, input_seed=hash(group) % 1000,
                                 shared=shared)
        result = decompose(problem, config, iters=args.iters)
        problem.remember()
        sync()
        seconds = time.perf_counter() - started
        total += seconds
        print(f"| {name} | {n}×{k} | {seconds:.1f} | {result.relative_error:.4f} |", flush=True)
    print(f"| layer total | | {total:.1f} | |")
    print(f"whole Llama-2-7B (32 layers): about {32 * total / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
