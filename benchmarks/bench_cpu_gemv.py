"""CPU GEMV/GEMM throughput of the storage kinds, in GB/s of stored weight bytes.

    PUMICE_LIBRARY=/path/to/libpumice.so python benchmarks/bench_cpu_gemv.py [--threads 2]

Writes a tensors-only .pumice file with dense f32/f16 and rtn 2/3/4/8-bit matrices of
4096×4096 and 11008×4096, times `linear_apply` (median of repeated runs) for batch 1 and 8, and
compares with the memory bandwidth measured in the same run (a large numpy copy: bytes read +
bytes written per second). For rtn, batch 1 is timed with int8 activations (default) and with
exact f32 activations (PUMICE_RTN_ACTIVATIONS=f32).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pumice.format.writer import PumiceWriter
from pumice.runtime.native import NativeModel

SHAPES = [(4096, 4096), (11008, 4096)]
KINDS = [("dense", "f32"), ("dense", "f16"), ("rtn", 2), ("rtn", 3), ("rtn", 4), ("rtn", 8)]
GROUP_SIZE = 64


def tensor_name(kind, variant, n, k):
    return f"{kind}.{variant}.{n}x{k}"


def write_file(path: Path, rng) -> dict[str, int]:
    """Returns stored bytes per tensor."""
    stored = {}
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        for n, k in SHAPES:
            for kind, variant in KINDS:
                name = tensor_name(kind, variant, n, k)
                if kind == "dense":
                    dtype = np.float32 if variant == "f32" else np.float16
                    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(dtype)
                    writer.add_tensor(name, "dense", [n, k], {}, {"weight": w})
                    stored[name] = w.nbytes
                else:
                    bits, groups = variant, k // GROUP_SIZE
                    # Any byte pattern is a valid set of codes when K is a multiple of 32.
                    codes = rng.integers(0, 256, size=(n, k * bits // 8), dtype=np.uint8)
                    scales = rng.uniform(1e-3, 1e-2, size=(n, groups)).astype(np.float16)
                    mins = rng.uniform(-0.05, 0.0, size=(n, groups)).astype(np.float16)
                    writer.add_tensor(name, "rtn", [n, k], {"bits": bits, "group_size": GROUP_SIZE},
                                      {"codes": codes, "scales": scales, "mins": mins})
                    stored[name] = codes.nbytes + scales.nbytes + mins.nbytes
    return stored


def median_seconds(fn, repeats: int, min_time: float = 0.3) -> float:
    fn()  # warm up (page in the mapping, grow scratch buffers)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def memory_bandwidth(repeats: int) -> float:
    """GB/s of a large copy, counting bytes read + bytes written."""
    src = np.ones(256 * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    seconds = median_seconds(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--file", type=Path, default=None,
                        help="reuse / keep the benchmark file here (default: a temporary file)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    tmp = None
    path = args.file
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "bench.pumice"
    stored = write_file(path, rng)

    old = os.environ.get("PUMICE_RTN_ACTIVATIONS")
    os.environ["PUMICE_RTN_ACTIVATIONS"] = "int8"
    model = NativeModel(path, n_threads=args.threads)
    os.environ["PUMICE_RTN_ACTIVATIONS"] = "f32"
    exact = NativeModel(path, n_threads=args.threads)
    if old is None:
        os.environ.pop("PUMICE_RTN_ACTIVATIONS")
    else:
        os.environ["PUMICE_RTN_ACTIVATIONS"] = old

    bandwidth = memory_bandwidth(args.repeats)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{args.threads} threads, library {model.info['library']}")
    print(f"# memory bandwidth (numpy copy, read+write): {bandwidth:.1f} GB/s")
    print()
    print("| kind | shape | batch | activations | ms | weight GB/s | % of copy bandwidth | GFLOP/s |")
    print("|------|-------|------:|-------------|---:|------------:|--------------------:|--------:|")
    for n, k in SHAPES:
        for kind, variant in KINDS:
            name = tensor_name(kind, variant, n, k)
            label = f"dense {variant}" if kind == "dense" else f"rtn {variant}-bit g{GROUP_SIZE}"
            runs = [(1, "f32", model)] if kind == "dense" else [(1, "int8", model), (1, "f32", exact)]
            runs.append((8, "f32", model))
            for batch, activations, m in runs:
                x = rng.standard_normal((batch, k), dtype=np.float32)
                seconds = median_seconds(lambda: m.linear_apply(name, x), args.repeats)
                gbs = stored[name] / seconds / 1e9
                gflops = 2 * n * k * batch / seconds / 1e9
                print(f"| {label} | {n}×{k} | {batch} | {activations} | {seconds * 1e3:.2f} | "
                      f"{gbs:.1f} | {100 * gbs / bandwidth:.0f}% | {gflops:.1f} |", flush=True)
    model.close()
    exact.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
