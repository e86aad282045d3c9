"""CPU GEMV throughput of BCQ LUT GEMM vs dequant-then-FMA vs rtn vs dense f32, and decode speed.

    python benchmarks/bench_lut_gemm.py [--shapes 4096x4096,11008x4096] [--bits 2,3,4]
                                        [--threads N] [--model smollm2-bcq.pumice ...]

For each shape it writes one "tensors" file holding random weights of every kind (bcq at each q,
rtn at the same q with group 64 and 128, dense f32), then times NativeModel.linear_apply at
batch 1 for each kind and each BCQ kernel (PUMICE_BCQ_LUT: int8, exact4, exact8, dequant).
GB/s counts the stored weight bytes a GEMV reads; "% of bw" relates that to the machine's
memory bandwidth measured in the same run (a large numpy copy: read + write bytes / time).
Weights that fit in the last-level cache can exceed 100%. `--model` files are timed for
end-to-end decode (one token per forward, after a short prompt).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    src = np.ones(size_mb * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def time_call(fn, min_seconds: float = 0.4, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(samples) < 5:
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def write_weights(path: Path, n: int, k: int, bits: list[int], rng) -> dict[str, int]:
    """Random weights of every kind; returns name -> stored bytes."""
    import torch
    from pumice.converter.rtn import quantize_rtn
    from pumice.format.kind_bcq import pack_bcq
    from pumice.format.writer import PumiceWriter

    sizes = {}
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.02)
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        def add(name, kind, params, parts):
            entry = writer.add_tensor(name, kind, [n, k], params, parts)
            sizes[name] = sum(p["length"] for p in entry["parts"].values())
        add("dense", "dense", {}, {"weight": w.numpy()})
        for q in bits:
            groups = -(-k // 128)
            signs = rng.random((q, n, k)) < 0.5
            exps = rng.integers(-9, -3, size=(n, groups, q))
            add(f"bcq{q}", "bcq", {"bits": q, "group_size": 128},
                pack_bcq(signs, exps, np.ones(n, np.float16), 128))
            if q in (2, 3, 4, 8):
                for g in (64, 128):
                    add(f"rtn{q}g{g}", "rtn", {"bits": q, "group_size": g}, quantize_rtn(w, q, g, grid=1, refine_steps=0))
    return sizes


def bench_shapes(shapes, bits, threads, bandwidth, rng) -> list[dict]:
    from pumice.runtime.native import NativeModel

    rows = []
    for n, k in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "weights.pumice"
            sizes = write_weights(path, n, k, bits, rng)
            x = rng.standard_normal((1, k)).astype(np.float32)
            runs = [("dense", None), *[(f"rtn{q}g{g}", None) for q in bits if q in (2, 3, 4, 8)
                                       for g in (64, 128)]]
            for q in bits:
                runs += [(f"bcq{q}", mode) for mode in ("int8", "exact4", "exact8", "dequant")]
            models = {}
            for name, mode in runs:
                key = mode or "-"
                if key not in models:
                    if mode:
                        os.environ["PUMICE_BCQ_LUT"] = mode
                    models[key] = NativeModel(path, n_threads=threads)
                model = models[key]
                seconds = time_call(lambda: model.linear_apply(name, x))
                gbs = sizes[name] / seconds / 1e9
                rows.append({"shape": f"{n}x{k}", "weights": name, "kernel": mode or "default",
                             "bits/w": 8 * sizes[name] / (n * k), "us": seconds * 1e6,
                             "GB/s": gbs, "%bw": 100 * gbs / bandwidth,
                             "Gw/s": n * k / seconds / 1e9})
            for model in models.values():
                model.close()
            os.environ.pop("PUMICE_BCQ_LUT", None)
    return rows


def bench_decode(path: str, threads: int, mode: str | None, tokens: int = 48) -> dict:
    from pumice.runtime.native import NativeModel

    if mode:
        os.environ["PUMICE_BCQ_LUT"] = mode
    model = NativeModel(path, n_threads=threads)
    session = model.new_session(256)
    session.forward(np.arange(1, 17, dtype=np.int32))
    token = 100
    start = time.perf_counter()
    for _ in range(tokens):
        logits = session.forward([token])
        token = int(np.argmax(logits))
    seconds = time.perf_counter() - start
    weight_bytes = model.info["weight_bytes"]
    session.close()
    model.close()
    os.environ.pop("PUMICE_BCQ_LUT", None)
    return {"model": Path(path).name, "kernel": mode or "default", "tok/s": tokens / seconds,
            "weight MB": weight_bytes / 1e6}


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r[c]).rjust(w) for c, w in zip(cols, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", action="append", default=[],
                        help="a .pumice file to time end-to-end decode on (repeatable)")
    parser.add_argument("--decode-kernels", default="int8,exact4",
                        help="BCQ kernels to time decode with")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    bits = [int(b) for b in args.bits.split(",") if b]
    rng = np.random.default_rng(0)

    bandwidth = memory_bandwidth_gbs()
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads {args.threads}")
    print(f"measured memory bandwidth (numpy copy, read+write): {bandwidth:.1f} GB/s\n")
    print_table(bench_shapes(shapes, bits, args.threads, bandwidth, rng))
    decode = []
    for path in args.model:
        for mode in args.decode_kernels.split(","):
            decode.append(bench_decode(path, args.threads, mode))
    if decode:
        print()
        print_table(decode)


if __name__ == "__main__":
    main()
