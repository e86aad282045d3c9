"""Per-token cost of sampling on the host: the runtime's C++ sampler vs the numpy Sampler.

    python benchmarks/bench_sampling.py [--vocab 49152 131072] [--rows 200] [--model M.pumice]

Logits are those of a real-looking distribution (a few hundred plausible tokens over a normal
background, as an LLM's logits look) or flat (every token plausible: the sampler's worst case).
With --model, the "real" rows are that model's logits over English text (pydoc topics).
The native numbers go through pumice_sample_logits on a tiny CPU model built on the spot, so
they include the cffi call (about 2 us); the decode step's own sampling has no such overhead.
Prints one table; times are medians over rows, in microseconds per token.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pumice.runtime.native import NativeModel, NativeSampling  # noqa: E402
from pumice.runtime.sampling import Sampler, SamplingParams  # noqa: E402
from tiny_model import write_tiny_llama  # noqa: E402

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "T=0.7": dict(temperature=0.7),
    "T=0.7 top_k=40": dict(temperature=0.7, top_k=40),
    "T=0.7 top_p=0.9": dict(temperature=0.7, top_p=0.9),
    "T=1 top_k=50 top_p=0.95 min_p=0.05": dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.05),
}


def make_logits(kind: str, vocab: int, rows: int, rng) -> np.ndarray:
    if kind == "flat":
        return rng.normal(0, 0.5, (rows, vocab)).astype(np.float32)
    logits = rng.normal(-5, 2, (rows, vocab)).astype(np.float32)
    head = rng.integers(0, vocab, (rows, 300))
    np.put_along_axis(logits, head, rng.normal(8, 3, (rows, 300)).astype(np.float32), axis=1)
    return logits


def median_us(fn, rows: np.ndarray) -> float:
    times = []
    for i in range(rows.shape[0]):
        start = time.perf_counter()
        fn(rows[i:i + 1], i)
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 131072])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--model", help="a .pumice file whose logits over real text to sample too")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"| vocab | logits | setting | numpy Sampler (us) | runtime sampler (us) |")
    print(f"|------:|--------|---------|------------------:|--------------------:|")
    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            import pydoc_data.topics
            text = "\n\n".join(v for _, v in sorted(pydoc_data.topics.topics.items()))[:20000]
            from pumice.runtime.tokenizer import Tokenizer
            from pumice.format.reader import PumiceFile
            with PumiceFile(args.model, verify=False) as f:
                ids = Tokenizer.from_pumice(f).encode(text)[:args.rows]
            with NativeModel(args.model) as model:
                rows = model.new_session(len(ids)).forward(ids, logits_all=True)
                run_rows(model, "real", rows)
        for vocab in args.vocab:
            path = Path(folder) / f"v{vocab}.pumice"
            write_tiny_llama(path, vocab_size=vocab, hidden_size=64, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_hidden_layers=1)
            with NativeModel(path, n_threads=1) as model:
                for kind in ("llm-like", "flat"):
                    run_rows(model, kind, make_logits(kind, vocab, args.rows, rng))


def run_rows(model, kind: str, rows: np.ndarray) -> None:
    vocab = rows.shape[1]
    for name, setting in SETTINGS.items():
        sampler = Sampler(SamplingParams(seed=1, **setting), vocab)
        native = NativeSampling(seed=1, **setting)
        host = median_us(lambda row, i: sampler.sample(row[0]), rows)
        runtime = median_us(lambda row, i: model.sample_logits(row, native, i), rows)
        print(f"| {vocab} | {kind} | {name} | {host:.0f} | {runtime:.0f} |")


if __name__ == "__main__":
    main()
