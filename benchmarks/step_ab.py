"""Decode-step times (batch 1, or 16 with --batch 16) of one random model under several builds
of libpumice_cuda, each build in its own process, the builds alternating for several rounds:
differences between processes on one GPU spread by ~5%, so one process per build cannot tell a
3% change.

    python3 benchmarks/step_ab.py --libs .prebuilt_old .prebuilt --rounds 4 \\
        --model llama2-7b --kind rtn2g64 [--variants default,gemv_only] [--batch 16]

Each folder holds libpumice.so and libpumice_cuda.so. Prints, per build and setting, the median
over rounds of each process's median step time (ms), and writes step_ab.json into $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cuda  # noqa: E402  (beside this file)


def worker(path: str, shape: str, variants: list[str], steps: int, batch: int) -> dict:
    from pumice.runtime.native import NativeModel
    model = NativeModel(path, device="cuda")
    chosen = {name: bench_cuda.STEP_VARIANTS[name] for name in variants}
    vocab = bench_cuda.SHAPES[shape]["vocab_size"]
    if batch == 16:
        return bench_cuda.batch16_variants(model, vocab, steps, chosen)
    return bench_cuda.step_variants(model, vocab, steps, chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--kind", default="rtn2g64")
    ap.add_argument("--variants", default="default,gemv_only")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, choices=(1, 16), default=1)
    ap.add_argument("--worker", nargs=4, metavar=("PATH", "SHAPE", "VARIANTS", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        path, shape, variants, steps = args.worker
        result = worker(path, shape, variants.split(","), int(steps), args.batch)
        print("RESULT " + json.dumps(result), flush=True)
        return
    out_dir = Path(os.environ.get("OUT", "/tmp/pumice-cuda-out"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pumice"
        bench_cuda.write_random_model(path, args.model, args.kind)
        times: dict = {lib: {} for lib in args.libs}
        for r in range(args.rounds):
            # Each round starts with the next build: a fixed order measured the first build of
            # a round up to ~4% faster than the last with identical code.
            order = args.libs[r % len(args.libs):] + args.libs[:r % len(args.libs)]
            for lib in order:
                env = dict(os.environ, PUMICE_LIBRARY=str(Path(lib) / "libpumice.so"),
                           PUMICE_CUDA_LIBRARY=str(Path(lib) / "libpumice_cuda.so"))
                proc = subprocess.run([sys.executable, __file__, "--libs", lib, "--batch", str(args.batch), "--worker",
                                       str(path), args.model, args.variants, str(args.steps)],
                                      capture_output=True, text=True, env=env,
                                      timeout=300)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{lib}: failed\n{proc.stderr[-2000:]}", flush=True)
                    continue
                for name, ms in json.loads(line[7:]).items():
                    times[lib].setdefault(name, []).append(ms)
                print(f"round {r} {lib}: {line[7:]}", flush=True)
    summary = {lib: {name: float(np.median(v)) for name, v in t.items()} for lib, t in times.items()}
    print(f"{'setting':<24}" + "".join(f"{lib:>22}" for lib in args.libs))
    for name in args.variants.split(","):
        print(f"{name:<24}" + "".join(f"{summary[lib].get(name, float('nan')):>22.4f}" for lib in args.libs))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step_ab.json").write_text(json.dumps({"times": times, "median": summary}, indent=1))


if __name__ == "__main__":
    main()
