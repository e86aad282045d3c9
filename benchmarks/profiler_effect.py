"""Whether running the kernel profiler (torch.profiler / CUPTI, as bench_cuda.kernel_profile does)
changes the timings a process measures afterwards. Times three steps of a random model twice
before and twice after one batch-1 and one batch-16 kernel profile, in one process:

    python3 benchmarks/profiler_effect.py [--model llama2-7b] [--kind rtn2g64]

Steps (ms, three runs each): the batch-1 GEMVs alone (PUMICE_CUDA_STEP=gemv, 32 steps, no logits),
a batch-1 step sampled on the device (64 steps), a 16-session step (32 steps). On the H100 the
later runs measured the first ~1% and the last ~5% slower, so bench_cuda.py profiles last.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cuda  # noqa: E402  (beside this file)


def measure(session, batch, greedy) -> dict:
    res: dict = {}
    for _ in range(3):
        with bench_cuda._env({"PUMICE_CUDA_STEP": "gemv"}):
            session.truncate(32)
            for _ in range(4):
                session.forward([3], return_logits=False)
            t = time.perf_counter()
            for _ in range(32):
                session.forward([3], return_logits=False)
            res.setdefault("gemvs_b1", []).append((time.perf_counter() - t) / 32 * 1e3)
        session.truncate(40)
        res.setdefault("sampled_b1", []).append(bench_cuda.session_step_s(session, greedy, 64, warm=4) * 1e3)
        for s in batch:
            s.truncate(32)
        res.setdefault("b16", []).append(bench_cuda.batch_step_s(batch, greedy, 32, warm=4) * 1e3)
    return {k: [round(x, 4) for x in v] for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--kind", default="rtn2g64")
    args = ap.parse_args()
    import torch
    from pumice.runtime.native import NativeModel, NativeSampling, decode_batch
    torch.cuda.init()
    vocab = bench_cuda.SHAPES[args.model]["vocab_size"]
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pumice"
        bench_cuda.write_random_model(path, args.model, args.kind)
        model = NativeModel(str(path), device="cuda")
        session = model.new_session(bench_cuda.N_CTX)
        session.forward(rng.integers(0, vocab, 32).tolist())
        batch = [model.new_session(bench_cuda.N_CTX) for _ in range(16)]
        for s in batch:
            s.forward(rng.integers(0, vocab, 32).tolist())
        greedy = NativeSampling(temperature=0.0)
        for tag in ("before", "before, again"):  # the second: drift without the profiler
            print(tag, json.dumps(measure(session, batch, greedy)), flush=True)
        bench_cuda.kernel_profile(lambda t: session.forward([5 + t]))
        bench_cuda.kernel_profile(lambda t: decode_batch(batch, [5 + t] * 16))
        for tag in ("after", "after, again"):
            print(tag, json.dumps(measure(session, batch, greedy)), flush=True)
        model.close()


if __name__ == "__main__":
    main()
