"""CPU end-to-end speed: SmolLM2-135M-Instruct through `Generator`, beside transformers float32.

For each storage (`dense`, `rtn` 4-bit, `rtn` 2-bit) it converts the checkpoint once (cached),
then measures prefill tokens/s (a fresh cache, the whole prompt in one call) and decode tokens/s
(greedy, EOS ignored, sampling and detokenisation included) through the public API. transformers
runs the same prompt in float32 with its KV cache (use_cache, greedy) in the same process and
thread count. Each figure is the best of --repeats runs (the machine may be shared).

    python benchmarks/bench_cpu.py --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

STORAGES = {
    "dense": ("dense", {}),
    "rtn4": ("rtn", {"bits": 4}),
    "rtn3": ("rtn", {"bits": 3}),
    "rtn2": ("rtn", {"bits": 2}),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def converted(checkpoint: Path, cache: Path, name: str) -> Path:
    from pumice.converter import convert
    method, options = STORAGES[name]
    out = cache / f"smollm2-{name}.pumice"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        convert(checkpoint, partial, method=method, progress=False, **options)
        partial.rename(out)
    return out


def bench_pumice(path: Path, prompt: list[int], decode_tokens: int, threads: int, repeats: int,
                 clock) -> dict:
    from pumice import Generator
    with Generator(path, n_ctx=len(prompt) + decode_tokens + 8, n_threads=threads) as generator:
        best_prefill = best_decode = 0.0
        generator.generate(prompt[:8], max_tokens=4, temperature=0)  # warm-up (page in the weights)
        for _ in range(repeats):
            generator.reset()
            started = clock()
            events = generator.stream_events(prompt, max_tokens=decode_tokens, temperature=0, ignore_eos=True)
            next(events)  # prefill + the first token
            first = clock()
            count = sum(1 for _ in events)
            finished = clock()
            best_prefill = max(best_prefill, len(prompt) / (first - started))
            best_decode = max(best_decode, count / (finished - first))
        info = generator.info
    return {"prefill": best_prefill, "decode": best_decode, "bytes": path.stat().st_size,
            "bits_per_weight": 8 * info["weight_bytes"] / info["n_params"]}


def bench_transformers(checkpoint: Path, prompt: list[int], decode_tokens: int, threads: int, repeats: int,
                       clock) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    best_prefill = best_decode = 0.0
    with torch.inference_mode():
        model(torch.tensor([prompt[:8]]))  # warm-up
        for _ in range(repeats):
            started = clock()
            out = model(torch.tensor([prompt]), use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            first = clock()
            for _ in range(decode_tokens - 1):
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            finished = clock()
            best_prefill = max(best_prefill, len(prompt) / (first - started))
            best_decode = max(best_decode, (decode_tokens - 1) / (finished - first))
    return {"prefill": best_prefill, "decode": best_decode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both runtimes")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--storages", default="dense,rtn4,rtn2", help=f"from {', '.join(STORAGES)}")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="divide by the process's CPU time instead of wall time: what the work "
                             "costs on a machine shared with other jobs (use with --threads 1)")
    parser.add_argument("--checkpoint", default=None, help="SmolLM2 checkpoint dir (default: the test cache)")
    parser.add_argument("--cache", default=None, help="where converted files are kept")
    args = parser.parse_args(argv)

    from smollm2 import CACHE_DIR, smollm2_checkpoint
    from conftest import pydoc_text
    from pumice.runtime.tokenizer import Tokenizer

    checkpoint = Path(args.checkpoint) if args.checkpoint else smollm2_checkpoint()
    cache = Path(args.cache) if args.cache else CACHE_DIR / "bench"
    tokenizer = Tokenizer.from_blob("hf_tokenizers", (checkpoint / "tokenizer.json").read_bytes())
    prompt = tokenizer.encode(pydoc_text()[:20000])[:args.prompt_tokens]

    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = []
    reference = None
    if not args.no_transformers:
        reference = bench_transformers(checkpoint, prompt, args.decode_tokens, args.threads, args.repeats, clock)
    for name in args.storages.split(","):
        path = converted(checkpoint, cache, name)
        rows.append((name, bench_pumice(path, prompt, args.decode_tokens, args.threads, args.repeats, clock)))

    print(f"SmolLM2-135M-Instruct, {args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens, "
          f"{args.threads} threads, best of {args.repeats}, "
          f"{'tokens per CPU-second' if args.cpu_time else 'wall time'}; {cpu_name()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print()
    print("| runtime | storage | bits/weight | file MB | prefill tok/s | decode tok/s | decode vs transformers |")
    print("|---------|---------|------------:|--------:|--------------:|-------------:|-----------------------:|")
    if reference:
        print(f"| transformers f32 | f32 | 32.00 | - | {reference['prefill']:.1f} | {reference['decode']:.1f} | 1.00× |")
    for name, r in rows:
        ratio = f"{r['decode'] / reference['decode']:.2f}×" if reference else "-"
        print(f"| pumice | {name} | {r['bits_per_weight']:.2f} | {r['bytes'] / 2**20:.0f} | "
              f"{r['prefill']:.1f} | {r['decode']:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
