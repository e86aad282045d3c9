"""CPU GEMV/GEMM throughput of the storage kinds, in GB/s of stored weight bytes.

    PUMICE_LIBRARY=/path/to/libpumice.so python benchmarks/bench_cpu_gemv.py [--threads 2]
    PUMICE_LIBRARY=/path/to/libpumice.so python benchmarks/bench_cpu_gemv.py --cpu-time

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


CLOCK = time.perf_counter


def timings(fn, repeats: int, min_time: float = 0.3) -> tuple[float, float]:
    """(median, best) seconds of repeated calls. On a shared machine the best run is the one
    closest to an idle machine; the median says what a user sees under the current load."""
    fn()  # warm up (page in the mapping, grow scratch buffers)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times), min(times)


def memory_bandwidth(repeats: int) -> tuple[float, float]:
    """(median, best) GB/s of a large copy, counting bytes read + bytes written."""
    src = np.ones(256 * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    median, best = timings(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / median / 1e9, 2 * src.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--file", type=Path, default=None,
                        help="reuse / keep the benchmark file here (default: a temporary file)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by the calling thread's CPU time (time.thread_time):"
                             " what a kernel costs on a machine shared with other jobs")
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
        args.threads = 1

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

    bandwidth, best_bandwidth = memory_bandwidth(args.repeats)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{args.threads} threads, {'thread CPU time' if args.cpu_time else 'wall time'}, "
          f"library {model.info['library']}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"# memory bandwidth (numpy copy, read+write): median {bandwidth:.1f} GB/s, "
          f"best {best_bandwidth:.1f} GB/s")
    print()
    print("| kind | shape | batch | path | ms median | ms best | weight GB/s median | "
          "weight GB/s best | best, % of best copy bandwidth | GFLOP/s best |")
    print("|------|-------|------:|------|---:|---:|---:|---:|---:|---:|")
    for n, k in SHAPES:
        for kind, variant in KINDS:
            name = tensor_name(kind, variant, n, k)
            label = f"dense {variant}" if kind == "dense" else f"rtn {variant}-bit g{GROUP_SIZE}"
            if kind == "dense":
                runs = [(1, "GEMV", model), (8, "GEMM", model)]
            else:
                # Batch 8 runs the tiled GEMM except at 2/4 bits with int8 activations, where
                # the GEMV per token is cheaper (kind_rtn.cpp); the exact model shows the GEMM.
                runs = [(1, "GEMV int8 x", model), (1, "GEMV f32 x", exact),
                        (8, "GEMM f32 (dequantized tiles)", exact)]
                if variant in (2, 4):
                    runs.append((8, "GEMV int8 x, per token", model))
            for batch, path_name, m in runs:
                x = rng.standard_normal((batch, k), dtype=np.float32)
                median, best = timings(lambda: m.linear_apply(name, x), args.repeats)
                print(f"| {label} | {n}×{k} | {batch} | {path_name} | {median * 1e3:.2f} | "
                      f"{best * 1e3:.2f} | {stored[name] / median / 1e9:.1f} | "
                      f"{stored[name] / best / 1e9:.1f} | "
                      f"{100 * stored[name] / best / 1e9 / best_bandwidth:.0f}% | "
                      f"{2 * n * k * batch / best / 1e9:.1f} |", flush=True)
    model.close()
    exact.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
