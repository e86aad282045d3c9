"""Quality table: perplexity of SmolLM2-135M-Instruct per method and bit budget → docs/QUALITY.md.

    python benchmarks/quality.py [--methods caldera,rtn,dense] [--budgets 2.25,2.5,3,4]
                                 [--windows 8] [--out docs/QUALITY.md]

Text: the pydoc topics (sorted by key, joined with blank lines). Its first half is scored
(1024-token windows, pumice.runtime.perplexity); its second half is the calibration text of the
calibration-aware methods, so no scored token was seen during calibration.

Methods are entries of METHODS: a function (budget, ctx) -> (path, note) that converts the
checkpoint for one budget. `dense` ignores the budget. A method not listed there is converted
generically with pumice.converter.convert(method=name, bits=budget, calib=<calibration file>),
so a newly registered calibration-aware method (e.g. `bcq`) is one more name in --methods.
Converted files and calibration statistics are cached under $PUMICE_BENCH_CACHE
(default ~/.cache/pumice-bench); CALDERA's per-matrix candidates are evaluated once and reused
for every budget.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PUMICE_BENCH_CACHE", Path.home() / ".cache" / "pumice-bench"))
CALDERA_SEQUENCES = 16
CALDERA_SEQ_LEN = 256
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence explaining what a Python list is.",
    "Give me three tips for staying focused while studying.",
]


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def checkpoint_dir() -> Path:
    override = os.environ.get("PUMICE_TEST_MODEL_DIR")
    if override:
        return Path(override)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import smollm2_checkpoint  # builds the checkpoint offline if missing
    return smollm2_checkpoint()


class Context:
    def __init__(self, checkpoint: Path, calib_file: Path, rebuild: bool):
        self.checkpoint = checkpoint
        self.calib_file = calib_file
        self.rebuild = rebuild

    def convert(self, name: str, **options):
        """Convert (or reuse the cached file); returns (path, seconds or None if cached)."""
        from pumice.converter import convert
        path = CACHE / f"smollm2-{name}.pumice"
        timing = path.with_suffix(".seconds")  # the conversion time, kept beside the file
        if path.exists() and not self.rebuild:
            return path, float(timing.read_text()) if timing.exists() else None
        started = time.time()
        partial = path.with_suffix(".partial")
        convert(self.checkpoint, partial, progress=False, **options)
        partial.rename(path)
        seconds = time.time() - started
        timing.write_text(f"{seconds:.1f}")
        return path, seconds


def linear_shapes(checkpoint: Path) -> list[tuple[int, int]]:
    """[out, in] of one decoder layer's seven linear weights."""
    c = json.loads((checkpoint / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    return [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd),
            (inter, h), (inter, h), (h, inter)]


def rtn_bits_per_weight(shapes, bits: int, group: int) -> float:
    """Exact stored bits per weight of `rtn` on these shapes: codes padded to 32 per row plus an
    f16 scale and min per (row, group), the last group of a row possibly short."""
    stored = sum(n * (-(-k // 32) * 32 * bits + 32 * -(-k // group)) for n, k in shapes)
    return stored / sum(n * k for n, k in shapes)


def rtn_config(budget: float, shapes) -> tuple[int, int]:
    """The widest rtn codes that fit the budget, with the smallest group that still fits (all
    overhead counted on the model's real shapes)."""
    for bits in (4, 3, 2):
        for group in range(32, 4097, 32):
            if rtn_bits_per_weight(shapes, bits, group) <= budget + 1e-9:
                return bits, group
    raise ValueError(f"no rtn configuration fits {budget} bits per weight")


def run_dense(budget, ctx):
    path, seconds = ctx.convert("dense", method="dense")
    return path, seconds, "bf16"


def run_rtn(budget, ctx):
    bits, group = rtn_config(budget, linear_shapes(ctx.checkpoint))
    path, seconds = ctx.convert(f"rtn-b{bits}g{group}", method="rtn", bits=bits, group_size=group)
    return path, seconds, f"b={bits} g={group}"


def run_caldera(budget, ctx):
    path, seconds = ctx.convert(
        f"caldera-{budget}", method="caldera", bits=budget, calib=str(ctx.calib_file),
        n_sequences=CALDERA_SEQUENCES, seq_len=CALDERA_SEQ_LEN,
        calib_cache=str(CACHE / "smollm2-hessians.pt"),
        candidates_cache=str(CACHE / "smollm2-caldera-candidates.pkl"))
    return path, seconds, None


def run_generic(method):
    def run(budget, ctx):
        path, seconds = ctx.convert(f"{method}-{budget}", method=method, bits=budget,
                                    calib=str(ctx.calib_file))
        return path, seconds, None
    return run


def run_bcq(budget, ctx):
    # Every layer is fitted once per candidate q (fits_cache); each budget only re-allocates.
    path, seconds = ctx.convert(
        f"bcq-{budget}", method="bcq", bits=budget, calib=str(ctx.calib_file),
        candidates="2,3,4", calib_cache=str(CACHE / "smollm2-bcq-hessians.pt"),
        fits_cache=str(CACHE / "smollm2-bcq-fits"))
    return path, seconds, None


METHODS = {"dense": run_dense, "rtn": run_rtn, "caldera": run_caldera, "bcq": run_bcq}


def linear_bits_per_weight(path: Path) -> float:
    """Σ stored bits of the decoder linear weights / Σ their weights (everything counted)."""
    from pumice.format.reader import PumiceFile
    bits = weights = 0
    with PumiceFile(path, verify=False) as f:
        for name, info in f.tensors.items():
            if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                bits += 8 * info.stored_bytes
                weights += info.shape[0] * info.shape[1]
    return bits / weights


def provenance(path: Path) -> dict:
    from pumice.format.reader import PumiceFile
    with PumiceFile(path, verify=False) as f:
        return f.metadata.get("provenance", {})


def score(path: Path, text: str, windows: int | None) -> tuple[float, int]:
    """Perplexity, remembered per (file, its mtime, windows) so reruns only score new files."""
    results = CACHE / "perplexities.json"
    table = json.loads(results.read_text()) if results.exists() else {}
    key = f"{path}:{path.stat().st_mtime_ns}:{windows}"
    if key not in table:
        table = dict(json.loads(results.read_text()) if results.exists() else {},
                     **{key: _score(path, text, windows)})
        results.write_text(json.dumps(table, indent=1))
    ppl, count = table[key]
    return ppl, count


def _score(path: Path, text: str, windows: int | None) -> tuple[float, int]:
    from pumice.runtime.native import NativeModel
    from pumice.runtime.perplexity import text_perplexity
    from pumice.runtime.tokenizer import Tokenizer
    with NativeModel(path) as model:
        result = text_perplexity(model, Tokenizer.from_file(path), text, window=1024,
                                 max_windows=windows)
    return result.perplexity, result.windows


def chat_answers(path: Path, max_tokens: int) -> list[str]:
    from pumice import Generator
    generator = Generator(path, n_ctx=512)
    try:
        return [generator.chat([{"role": "user", "content": prompt}], temperature=0.0,
                               max_tokens=max_tokens).text.strip() for prompt in CHAT_PROMPTS]
    finally:
        generator.model.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="caldera,rtn,dense")
    parser.add_argument("--budgets", default="2.25,2.5,3.0,4.0")
    parser.add_argument("--windows", type=int, default=None,
                        help="score at most this many 1024-token windows (default: all)")
    parser.add_argument("--chat-budget", type=float, default=2.5)
    parser.add_argument("--chat-tokens", type=int, default=48)
    parser.add_argument("--no-chat", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="reconvert cached files")
    parser.add_argument("--out", default=str(ROOT / "docs" / "QUALITY.md"))
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = [float(b) for b in args.budgets.split(",")]
    CACHE.mkdir(parents=True, exist_ok=True)
    text = pydoc_text()
    half = len(text) // 2
    scored_text, calib_text = text[:half], text[half:]
    calib_file = CACHE / "pydoc-calib.txt"
    if not calib_file.exists() or calib_file.read_text() != calib_text:
        calib_file.write_text(calib_text)
    ctx = Context(checkpoint_dir(), calib_file, args.rebuild)

    rows = []
    dense_ppl = None
    for method in methods:
        run = METHODS.get(method) or run_generic(method)
        for budget in ([None] if method == "dense" else budgets):
            path, seconds, note = run(budget, ctx)
            prov = provenance(path)
            info = prov.get(method, {})
            if note is None and info:
                note = f"allocated {info.get('linear_bits_per_weight', 0):.3f}"
            ppl, windows = score(path, scored_text, args.windows)
            if method == "dense":
                dense_ppl = ppl
            row = {"method": method, "budget": budget, "bpw": linear_bits_per_weight(path),
                   "ppl": ppl, "windows": windows, "size_mb": path.stat().st_size / 1e6,
                   "seconds": seconds, "method_seconds": info.get("seconds"), "note": note,
                   "path": str(path)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    answers = {}
    if not args.no_chat:
        for row in rows:
            if row["method"] == "dense" or (row["method"] == "caldera"
                                            and row["budget"] == args.chat_budget):
                answers[row["method"]] = chat_answers(Path(row["path"]), args.chat_tokens)
    write_report(Path(args.out), rows, dense_ppl, answers, args)
    return 0


def write_report(out: Path, rows, dense_ppl, answers, args) -> None:
    def fmt_seconds(row):
        s = row["seconds"] if row["seconds"] is not None else row["method_seconds"]
        return "cached" if s is None else f"{s:.0f}"

    lines = [
        "# Quality: SmolLM2-135M-Instruct",
        "",
        f"Generated by `python benchmarks/quality.py --methods {args.methods} --budgets "
        f"{args.budgets}" + (f" --windows {args.windows}" if args.windows else "") + "` on "
        f"{datetime.date.today().isoformat()}.",
        "",
        "Perplexity: first half of the pydoc text (topics sorted by key), 1024-token windows, "
        "`pumice.runtime.perplexity`, native CPU runtime. Calibration-aware methods calibrate on "
        "the second half (no scored token is seen in calibration). `bpw` counts everything "
        "stored for the decoder linear layers (codes, scales, mins, L/R and their scales, sign "
        "vectors, padding); embeddings are rtn8g32 for every quantized method (bf16 for dense).",
        "",
    ]
    windows = {r["windows"] for r in rows}
    if args.windows:
        lines += [f"**Reduced evaluation:** {', '.join(map(str, sorted(windows)))} windows "
                  f"(--windows {args.windows}) instead of the whole first half, to fit the "
                  "shared 2-core machine's time.", ""]
    if any(r["method"] == "caldera" for r in rows):
        lines += ["`convert s` of caldera: calibration statistics and the per-matrix candidates "
                  "are computed once and cached, then each budget only allocates and writes; the "
                  "row that evaluated the candidates shows that time (the calibration itself is "
                  "in docs/CALDERA.md). Times were taken on the shared 2-core machine under load "
                  "from other jobs.", ""]
    lines += ["| method | budget | linear bpw | perplexity | Δ vs dense | config | file MB | "
              "convert s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if dense_ppl is None else f"{r['ppl'] - dense_ppl:+.3f}"
        budget = "—" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {r['method']} | {budget} | {r['bpw']:.3f} | {r['ppl']:.3f} | {delta} | "
                     f"{r['note'] or ''} | {r['size_mb']:.1f} | {fmt_seconds(r)} |")
    if answers:
        lines += ["", f"## Chat answers (greedy, {args.chat_tokens} tokens at most)", ""]
        for i, prompt in enumerate(CHAT_PROMPTS):
            lines.append(f"**{prompt}**")
            lines.append("")
            for method, replies in answers.items():
                label = method if method == "dense" else f"{method} {args.chat_budget:g} bpw"
                lines.append(f"- *{label}*: {replies[i]!r}")
            lines.append("")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
