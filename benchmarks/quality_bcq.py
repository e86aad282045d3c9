"""Perplexity of SmolLM2-135M-Instruct converted with bcq (and rtn for comparison).

    python benchmarks/quality_bcq.py [--hf DIR] [--out DIR] [--windows 16] [--window 512]
           [--bcq-budgets 2,3,4] [--bcq-uniform 2,3,4] [--rtn 2,3,4] [--dense]

Text: the pydoc topics (tests/conftest.py `pydoc_text`), scored in non-overlapping windows of
`--window` tokens, the first `--windows` of them, by pumice.runtime.perplexity on the native
runtime (default BCQ kernel, int8 tables; `--lut exact4` for f32 tables). Calibration (bcq):
32 sequences × 512 tokens of the same text, spread over all of it (as CALDERA's default).
bits/w is the stored bits per weight of the decoder's linear layers, all overhead counted.
The per-layer fits are cached (`--out`/bcq-fits), so every budget reuses them.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def linear_bits_per_weight(path: Path) -> float:
    from pumice.format import PumiceFile
    bits = numel = 0
    with PumiceFile(path, verify=False) as f:
        for name, info in f.tensors.items():
            if ".layers." in name and name.endswith("proj.weight"):
                bits += 8 * sum(p.length for p in info.parts.values())
                numel += info.shape[0] * info.shape[1]
    return bits / numel


def evaluate(path: Path, windows: int, window: int) -> tuple[float, float]:
    from pumice.runtime.native import NativeModel
    from pumice.runtime.perplexity import text_perplexity
    from pumice.runtime.tokenizer import Tokenizer

    model = NativeModel(path)
    try:
        result = text_perplexity(model, Tokenizer.from_file(path), pydoc_text(), window=window,
                                 max_windows=windows)
    finally:
        model.close()
    return result.perplexity, result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", default=os.environ.get("PUMICE_TEST_MODEL_DIR", "/work/cache/smollm2"))
    parser.add_argument("--out", default="/tmp/pumice-quality-bcq")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--bcq-budgets", default="2,3,4")
    parser.add_argument("--bcq-uniform", default="2,3,4")
    parser.add_argument("--candidates", default="1,2,3,4")
    parser.add_argument("--rtn", default="2,3,4")
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--lut", default=None, help="PUMICE_BCQ_LUT for the evaluation")
    args = parser.parse_args()
    if args.lut:
        os.environ["PUMICE_BCQ_LUT"] = args.lut

    from pumice.converter import convert
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"calib_cache": str(out / "hessians.pt"), "fits_cache": str(out / "bcq-fits"),
              "progress": False}
    jobs = []
    if args.dense:
        jobs.append(("dense", "-", {}))
    for b in [int(v) for v in args.rtn.split(",") if v]:
        jobs.append((f"rtn{b}g64", f"{b}", {"method": "rtn", "bits": b, "group_size": 64}))
    for q in [int(v) for v in args.bcq_uniform.split(",") if v]:
        jobs.append((f"bcq-q{q}", f"{q} (uniform)", {"method": "bcq", "bits": q, "mixed": False, **common}))
    for b in [float(v) for v in args.bcq_budgets.split(",") if v]:
        jobs.append((f"bcq-b{b:g}", f"{b:g} (mixed)", {"method": "bcq", "bits": b, "mixed": True,
                                                     "candidates": args.candidates, **common}))
    print(f"| method | bits | bits/w (linear, all overhead) | perplexity | convert s | eval s |")
    print(f"|--------|------|------------------|------------|-----------|--------|")
    for label, bits, options in jobs:
        path = out / f"smollm2-{label}.pumice"
        started = time.time()
        if not path.exists():
            options = dict(options)
            method = options.pop("method", "dense")
            partial = path.with_suffix(".partial")
            convert(args.hf, partial, method=method, progress=False, **{k: v for k, v in options.items() if k != "progress"})
            partial.rename(path)
        converted = time.time() - started
        ppl, seconds = evaluate(path, args.windows, args.window)
        print(f"| {label.split('-')[0].rstrip('0123456789g')} | {bits} | {linear_bits_per_weight(path):.3f} | "
              f"{ppl:.3f} | {converted:.0f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
