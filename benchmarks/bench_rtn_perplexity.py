"""Perplexity of SmolLM2 (or any checkpoint) after RTN conversion with various options.

    python benchmarks/bench_rtn_perplexity.py CHECKPOINT_DIR '{"method": "dense"}' \
        '{"bits": 3}' '{"bits": 3, "grid": 1, "refine_steps": 0}' --windows 4 --window 512

Each JSON argument is one conversion (`method` defaults to "rtn"; the rest goes to
pumice.converter.convert). Scores the first 60 000 characters of the pydoc topics text with the
native runtime and prints a table row per variant. The files go to a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pumice.converter import convert
from pumice.format import PumiceFile
from pumice.format.inspect import bits_per_weight, is_decoder_linear
from pumice.runtime.native import NativeModel
from pumice.runtime.perplexity import perplexity
from pumice.runtime.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("variants", nargs="+", help="JSON objects of convert() options")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--chars", type=int, default=60000)
    args = parser.parse_args()

    from pydoc_data.topics import topics
    text = "\n\n".join(topics[key] for key in sorted(topics))[:args.chars]
    print(f"| variant | linear bits/weight | all bits/weight | convert s | perplexity |")
    print(f"|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        ids = None
        for index, variant in enumerate(args.variants):
            options = json.loads(variant)
            method = options.pop("method", "rtn")
            path = Path(tmp) / f"v{index}.pumice"
            start = time.perf_counter()
            convert(args.checkpoint, path, method=method, progress=False, **options)
            seconds = time.perf_counter() - start
            with PumiceFile(path, verify=False) as f:
                weights = [t for t in f.tensors.values() if t.kind != "blob"]
                linear = [t for t in weights if is_decoder_linear(t.name)]
                bpw_linear, bpw_all = bits_per_weight(linear), bits_per_weight(weights)
            if ids is None:
                ids = Tokenizer.from_file(path).encode(text, add_special_tokens=True)
            result = perplexity(NativeModel(path), ids, window=args.window,
                                max_windows=args.windows)
            label = method + "".join(f" {k}={v}" for k, v in options.items())
            print(f"| {label} | {bpw_linear:.3f} | {bpw_all:.3f} | {seconds:.0f} | "
                  f"{result.perplexity:.3f} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
