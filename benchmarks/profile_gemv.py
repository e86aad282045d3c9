"""Decode steps of a small Llama-2-7B-shaped model (2 layers, random rtn 2-bit g64 weights by
default) for a profiler: run under Nsight Compute to see what limits the decode GEMV, e.g.

    ncu --kernel-name regex:gemv --launch-skip 40 --launch-count 6 --section SpeedOfLight \\
        --section WarpStateStats --section SchedulerStats --section Occupancy \\
        python3 benchmarks/profile_gemv.py --kind rtn2g64

Kernels are launched directly (no CUDA graph) so the profiler sees each one.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cuda  # noqa: E402  (beside this file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="rtn2g64")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--columns", type=int, default=1, help="tokens per step (1-16: a prompt chunk of that many)")
    args = ap.parse_args()
    os.environ.setdefault("PUMICE_CUDA_GRAPHS", "0")
    bench_cuda.SHAPES["profile"] = dict(bench_cuda.SHAPES["llama2-7b"], num_hidden_layers=args.layers)
    from pumice.runtime.native import NativeModel
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.pumice"
        bench_cuda.write_random_model(path, "profile", args.kind)
        model = NativeModel(str(path), device="cuda")
        s = model.new_session(64 + args.steps * args.columns)
        s.forward(list(range(3, 35)))
        for _ in range(args.steps):
            s.forward([3] * args.columns, return_logits=False)
        s.close()


if __name__ == "__main__":
    main()
