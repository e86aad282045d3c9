"""CUDA backend benchmark: Llama-2-7B- and Llama-3-8B-shaped models with random weights.

    python benchmarks/bench_cuda.py --out DIR [--models llama2-7b,llama3-8b]
                                    [--kinds rtn2g64,rtn3g64,rtn4g64] [--no-hf] [--quick]

For each model shape and storage kind it writes a .pumice file straight from random codes
(pumice.format.writer; no conversion, a dummy tokenizer blob), then, each in its own process so
that GPU memory is measured cleanly. Kinds (every linear layer and the head; see
benchmarks/random_kinds.py): rtn<b>g<g> (rtn2g64), bcq<q>g<g> (bcq2g128, bcq3g128: ShiftAddLLM
binary planes), caldera<b>r<rank> (caldera2r64: Q rtn b-bit g64 + rank-k L·R, 4-bit factors,
Hadamard basis). The measurements:

- pumice: decode tokens/s at batch 1, 4 and 16 (greedy, picked on the device: only ids copied),
  prefill tokens/s of a 2048-token prompt, decode at 2048 context, peak GPU memory, and a kernel
  profile of one batch-1 decode step (per-kernel time), and batch-1 / batch-16 step times under
  each runtime setting (PDL, fused RMSNorm, the GEMVs alone: GEMV bandwidth = linear weight bytes
  / time of a step of the GEMVs alone, `PUMICE_CUDA_STEP=gemv`), one matrix kind at a time;
- transformers fp16 (`generate`, same shapes) as the baseline.

Also measured: device-to-device copy bandwidth (bytes read + written), which sets each decode
step's floor: (weight bytes + KV bytes read) / bandwidth. Results: DIR/bench_cuda.json and a
markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_kinds  # noqa: E402  (beside this file)
from random_kinds import KindSpec  # noqa: E402

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
                      rope_scaling=None, max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      max_position_embeddings=8192),
}
PREFILL = 2048
N_CTX = 4096


def parse_kind(kind: str) -> KindSpec:
    """A kind name (rtn2g64, bcq3g128, caldera2r64, ...: benchmarks/random_kinds.py) -> KindSpec."""
    return random_kinds.parse_kind(kind)


def full_config(shape: dict) -> dict:
    c = dict(shape)
    c.update(rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    return c


def linear_names(c: dict) -> list[tuple[str, tuple[int, int]]]:
    d, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    qd, kvd = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (qd, d)), (p + "self_attn.k_proj.weight", (kvd, d)),
                (p + "self_attn.v_proj.weight", (kvd, d)), (p + "self_attn.o_proj.weight", (d, qd)),
                (p + "mlp.gate_proj.weight", (inter, d)), (p + "mlp.up_proj.weight", (inter, d)),
                (p + "mlp.down_proj.weight", (d, inter))]
    out.append(("lm_head.weight", (c["vocab_size"], d)))
    return out


def write_random_model(path: Path, shape_name: str, kind: str) -> dict:
    """A model of random weights stored as `kind` (every linear layer, the head included),
    written straight from random codes (benchmarks/random_kinds.py). Returns byte counts."""
    from pumice.format.writer import PumiceWriter

    spec = parse_kind(kind)
    c = full_config(SHAPES[shape_name])
    rng = np.random.default_rng(0)
    metadata = {
        "architecture": "llama", "config": c,
        "tokenizer": {"type": "hf_tokenizers", "blob": "tokenizer.json", "config": {}},
        "chat_template": None,
        "special_tokens": {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": None, "bos_token": None,
                           "eos_token": None, "add_bos_token": True},
        "generation": {},
        "provenance": {"method": "random", "bits": spec.bits, "group_size": spec.group_size,
                       "source": "bench_cuda", "kind": kind, "storage": spec.describe(),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pumice_version": "0.1.0"},
    }
    linear_bytes = 0
    untransformed = []  # caldera tensors too wide for the GPU transform (random_kinds.py)
    with PumiceWriter(path, metadata) as w:
        d = c["hidden_size"]
        w.add_tensor("model.embed_tokens.weight", "dense", [c["vocab_size"], d], {},
                     {"weight": random_kinds.random_embedding(rng, c["vocab_size"], d)})
        ones = np.ones(d, dtype=np.float32)
        for name, (n, k) in linear_names(c):
            tensor_kind, params, parts = random_kinds.random_linear(rng, spec, n, k)
            if params.get("transform") == "none":
                untransformed.append(name)
            w.add_tensor(name, tensor_kind, [n, k], params, parts)
            linear_bytes += sum(part.nbytes for part in parts.values())
            del parts
            if name.endswith("down_proj.weight"):
                layer = name.split(".")[2]
                w.add_tensor(f"model.layers.{layer}.input_layernorm.weight", "dense", [d], {}, {"weight": ones})
                w.add_tensor(f"model.layers.{layer}.post_attention_layernorm.weight", "dense", [d], {},
                             {"weight": ones})
        w.add_tensor("model.norm.weight", "dense", [d], {}, {"weight": ones})
        w.add_blob("tokenizer.json", b"{}")
        storage = spec.describe()
        if untransformed:
            storage += (f"; transform none for {', '.join(untransformed)} (wider than the GPU "
                        f"transform's {random_kinds.HADAMARD_GPU_MAX_DIM})")
        w.metadata["provenance"]["storage"] = storage
    n_weights = sum(n * k for _, (n, k) in linear_names(c))
    return {"linear_bytes": linear_bytes, "linear_weights": n_weights,
            "bits_per_weight": 8.0 * linear_bytes / n_weights, "storage": storage}


def gpu_used_bytes() -> int:
    import torch
    free, total = torch.cuda.mem_get_info()
    return total - free


def copy_bandwidth() -> float:
    import torch
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n / float(np.median(times))


# ---- pumice worker ----------------------------------------------------------------------------

def kernel_profile(run_step, steps: int = 3) -> dict:
    """Per-kernel GPU time of `steps` calls of run_step(i) (direct launches, no graph, no PDL:
    under PDL a kernel's time would include its wait for its predecessor)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with _env({"PUMICE_CUDA_GRAPHS": "0", "PUMICE_PDL": "0"}):
        run_step(0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for t in range(steps):
                run_step(1 + t)
            torch.cuda.synchronize()
    by_kernel: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA" or "pumice" not in ev.name:
            continue
        name = ev.name.replace("(anonymous namespace)::", "").replace("void ", "").replace("pumice::cuda::", "")
        key = name.split("(")[0]
        by_kernel.setdefault(key, []).append(ev.time_range.elapsed_us())
    return {k: {"calls_per_step": len(v) / steps, "us_per_step": sum(v) / steps} for k, v in by_kernel.items()}


# Settings compared in one process (each its own captured graph); "gemv_only" keeps only the
# linear layers of the step (wrong results, right timing): the time of the GEMVs alone.
STEP_VARIANTS = {
    "default": {},
    "no_pdl": {"PUMICE_PDL": "0"},
    "no_fused_norm": {"PUMICE_CUDA_FUSED_NORM": "0"},
    "neither": {"PUMICE_PDL": "0", "PUMICE_CUDA_FUSED_NORM": "0"},
    "gemv_only": {"PUMICE_CUDA_STEP": "gemv"},
    # The same, eight steps back to back per call: GPU time per step without the host's turn
    # (Python, launch, synchronisation) between steps, timed like the copy bandwidth.
    "gemv_only_back_to_back": {"PUMICE_CUDA_STEP": "gemv", "PUMICE_CUDA_STEP_REPEAT": "8"},
    "gemv_only_no_pdl": {"PUMICE_CUDA_STEP": "gemv", "PUMICE_PDL": "0"},
    "late_reads": {"PUMICE_CUDA_EARLY_READS": "0"},
    "gemv_only_late_reads": {"PUMICE_CUDA_STEP": "gemv", "PUMICE_CUDA_EARLY_READS": "0"},
    # The chain of launches where the default is the persistent step (2-bit rtn models).
    "chained": {"PUMICE_CUDA_PERSISTENT": "0"},
    "gemv_only_chained": {"PUMICE_CUDA_STEP": "gemv", "PUMICE_CUDA_PERSISTENT": "0"},
    # Batch 9-16: blocks of two tiles instead of four (the activations shared by fewer rows).
    "no_wide_tiles": {"PUMICE_CUDA_WIDE_TILES": "0"},
    # Attention splits of at least 32 or 64 positions instead of 128 (more splits, more merges).
    "attention_slices_32": {"PUMICE_CUDA_ATTENTION_MIN_SLICE": "32"},
    "attention_slices_64": {"PUMICE_CUDA_ATTENTION_MIN_SLICE": "64"},
}
# What the persistent step's parts cost: GEMVs alone with parts left out (PUMICE_CUDA_PERSISTENT_SKIP
# bits: 1 the multiplications, 2 the epilogues, 4 the grid barriers, 8 the image staging, 16 the
# weight stream: the consumers' own pace).
for _bits, _name in ((1, "math"), (2, "epilogues"), (4, "barriers"), (8, "staging"), (10, "epilogues+staging"),
                     (11, "all_but_barriers"), (14, "all_but_math"), (15, "all"), (16, "stream"),
                     (20, "stream+barriers"), (30, "all_but_math+stream")):
    STEP_VARIANTS[f"gemv_only_persistent_skip_{_name}"] = {
        "PUMICE_CUDA_STEP": "gemv", "PUMICE_CUDA_PERSISTENT": "1", "PUMICE_CUDA_PERSISTENT_SKIP": str(_bits)}
# One matrix of every layer (and the head) alone: per-shape bandwidth.
GEMV_PARTS = ("qkv", "o", "gu", "down", "head")
GEMV_MODES = {"default": {}, "late_reads": {"PUMICE_CUDA_EARLY_READS": "0"}}
for _mode, _mode_env in GEMV_MODES.items():
    for _part in GEMV_PARTS:
        STEP_VARIANTS[f"{_mode}:{_part}"] = {"PUMICE_CUDA_STEP": f"gemv:{_part}", **_mode_env}


# The batch-16 step's settings: the full step (also with the fused RMSNorm held to 8 columns as
# it once was, and with PDL at 16), the GEMVs alone, and one matrix kind alone.
BATCH16_VARIANTS = {
    **{name: STEP_VARIANTS[name] for name in ("default", "no_fused_norm", "no_wide_tiles", "late_reads",
                                              "attention_slices_32", "attention_slices_64")},
    "fused_norm_8": {"PUMICE_CUDA_FUSED_NORM_COLS": "8"},
    "pdl_8": {"PUMICE_PDL_COLS": "8"},
    "no_three_tiles": {"PUMICE_CUDA_THREE_TILES": "0"},
    "no_residual_pairs": {"PUMICE_CUDA_RESIDUAL_PAIRS": "0"},
    "gemv_only": STEP_VARIANTS["gemv_only"],
    "gemv_only_no_wide_tiles": {"PUMICE_CUDA_STEP": "gemv", "PUMICE_CUDA_WIDE_TILES": "0"},
    **{f"default:{p}": STEP_VARIANTS[f"default:{p}"] for p in GEMV_PARTS},
}


class _env:
    """Sets environment variables for a block, then restores them."""

    def __init__(self, env: dict):
        self.env = env

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def step_variants(model, vocab: int, steps: int, variants: dict | None = None) -> dict:
    """Batch-1 decode step time (ms, no logits copied) at ~48 tokens of context per setting
    (variants: name -> environment, STEP_VARIANTS by default)."""
    rng = np.random.default_rng(2)
    s = model.new_session(N_CTX)
    s.forward(rng.integers(0, vocab, 32).tolist())
    out = {}
    for name, env in (STEP_VARIANTS if variants is None else variants).items():
        with _env(env):
            times = []
            for _ in range(3):
                s.truncate(32)
                for _ in range(4):
                    s.forward([3], return_logits=False)
                t = time.perf_counter()
                for _ in range(steps):
                    s.forward([3], return_logits=False)
                times.append((time.perf_counter() - t) / (steps * int(env.get("PUMICE_CUDA_STEP_REPEAT", 1))))
            out[name] = float(np.median(times)) * 1e3
    s.close()
    return out


def session_step_s(session, sampling, steps: int, warm: int = 0) -> float:
    """Seconds per decode step of one session sampling on the device (only the token id crosses
    to the host), over `steps` steps after `warm` untimed ones."""
    tok = 3
    for _ in range(warm):
        tok = session.forward_sample([tok], sampling)
    t = time.perf_counter()
    for _ in range(steps):
        tok = session.forward_sample([tok], sampling)
    return (time.perf_counter() - t) / steps


def batch_step_s(sessions, sampling, steps: int, warm: int = 0) -> float:
    """Seconds per decode_batch_sample step of `sessions` (one token each, sampled on the device),
    over `steps` steps after `warm` untimed ones."""
    from pumice.runtime.native import decode_batch_sample
    toks, samplings = [3] * len(sessions), [sampling] * len(sessions)
    for _ in range(warm):
        toks = decode_batch_sample(sessions, toks, samplings)
    t = time.perf_counter()
    for _ in range(steps):
        toks = decode_batch_sample(sessions, toks, samplings)
    return (time.perf_counter() - t) / steps


def batch16_variants(model, vocab: int, steps: int, variants: dict | None = None) -> dict:
    """Batch-16 step time (ms; greedy on the device, only ids copied) per setting
    (BATCH16_VARIANTS by default): the fastest of five runs (settings differ by less than the
    run-to-run spread of a median)."""
    from pumice.runtime.native import NativeSampling
    rng = np.random.default_rng(3)
    sessions = [model.new_session(N_CTX) for _ in range(16)]
    for si in sessions:
        si.forward(rng.integers(0, vocab, 32).tolist())
    greedy = NativeSampling(temperature=0.0)
    batch_step_s(sessions, greedy, 3 * steps)  # warm-up: the first setting is not to pay for it
    out = {}
    for name, env in (BATCH16_VARIANTS if variants is None else variants).items():
        with _env(env):
            times = []
            for _ in range(5):
                for si in sessions:
                    si.truncate(32)
                times.append(batch_step_s(sessions, greedy, steps, warm=3))
            out[name] = float(np.min(times)) * 1e3
    for si in sessions:
        si.close()
    return out


def long_context_steps(model, s2k, vocab: int, greedy, quick: bool) -> dict:
    """Decode steps (ms) where attention is a large part (median of three runs): one session at
    ~2048 positions through the chain of launches (the persistent step has its own attention),
    and 16 sessions at ~1024 positions."""
    rng = np.random.default_rng(4)
    sessions = []
    for _ in range(16):
        si = model.new_session(N_CTX)
        si.forward(rng.integers(0, vocab, 1024).tolist())
        sessions.append(si)
    steps = 8 if quick else 16
    b1, b16 = [], []
    with _env({"PUMICE_CUDA_PERSISTENT": "0"}):
        for _ in range(3):
            s2k.truncate(2048)
            b1.append(session_step_s(s2k, greedy, steps, warm=2))
    for _ in range(3):
        for si in sessions:
            si.truncate(1024)
        b16.append(batch_step_s(sessions, greedy, steps, warm=2))
    for si in sessions:
        si.close()
    return {"b1_chained_ctx2048": float(np.median(b1)) * 1e3, "b16_ctx1024": float(np.median(b16)) * 1e3}


def pumice_worker(path: str, shape_name: str, kind: str, linear_bytes: int, quick: bool) -> dict:
    import torch
    from pumice.runtime.native import NativeModel, NativeSampling, decode_batch
    torch.cuda.init()
    c = full_config(SHAPES[shape_name])
    base = gpu_used_bytes()
    peak = 0

    def sample():
        nonlocal peak
        peak = max(peak, gpu_used_bytes() - base)

    rng = np.random.default_rng(1)
    res: dict = {}
    t0 = time.perf_counter()
    model = NativeModel(path, device="cuda")
    res["load_s"] = time.perf_counter() - t0
    sample()
    n_steps = 32 if quick else 128

    # Greedy, picked on the device: only token ids cross to the host (as in the server, and as
    # transformers' generate, whose argmax also runs on the GPU).
    greedy = NativeSampling(temperature=0.0)

    # batch 1
    s = model.new_session(N_CTX)
    s.forward(rng.integers(0, c["vocab_size"], 32).tolist())
    session_step_s(s, greedy, 8)  # warm-up
    # Each batch size: the median of three runs (single runs of the same build spread by 20%).
    steps_1 = []
    for _ in range(3):
        s.truncate(40)
        steps_1.append(session_step_s(s, greedy, n_steps))
    step = float(np.median(steps_1))
    sample()
    res["decode"] = {"1": {"step_ms": step * 1e3, "tok_s": 1.0 / step, "context": 40 + n_steps // 2}}
    with _env({"PUMICE_CUDA_PERSISTENT": "0"}):
        step_c = session_step_s(s, greedy, n_steps, warm=8)
    res["decode_b1_chained"] = {"step_ms": step_c * 1e3, "tok_s": 1.0 / step_c}
    s.close()
    res["step_variants_ms"] = step_variants(model, c["vocab_size"], 16 if quick else 32)
    res["batch16_variants_ms"] = batch16_variants(model, c["vocab_size"], 16 if quick else 32)
    # batch 4, 16
    for b in (4, 16):
        sessions = []
        for _ in range(b):
            si = model.new_session(N_CTX)
            si.forward(rng.integers(0, c["vocab_size"], 32).tolist())
            sessions.append(si)
        batch_step_s(sessions, greedy, 4)  # warm-up
        steps = n_steps // 2
        runs = []
        for _ in range(3):
            for si in sessions:
                si.truncate(36)
            runs.append(batch_step_s(sessions, greedy, steps))
        dt = float(np.median(runs))
        sample()
        res["decode"][str(b)] = {"step_ms": dt * 1e3, "tok_s": b / dt, "context": 32 + 4 + steps // 2}
        for si in sessions:
            si.close()
    # prefill of a 2048-token prompt, then decode at that context
    prompt = rng.integers(0, c["vocab_size"], PREFILL).tolist()
    s = model.new_session(N_CTX)
    s.forward(prompt)  # warm-up: workspace, cuBLAS heuristics
    times = []
    for _ in range(2 if quick else 3):
        s.truncate(0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        s.forward(prompt)
        times.append(time.perf_counter() - t)
    sample()
    pre = float(np.median(times))
    res["prefill"] = {"tokens": PREFILL, "s": pre, "tok_s": PREFILL / pre}
    step = session_step_s(s, greedy, 32)
    res["decode_ctx2048"] = {"step_ms": step * 1e3, "tok_s": 1.0 / step}
    res["long_context_ms"] = long_context_steps(model, s, c["vocab_size"], greedy, quick)
    s.close()
    # The kernel profiles come last: once the profiler has run, the same process measures the
    # batch-1 GEMVs ~1% and the batch-16 step ~5% slower (benchmarks/profiler_effect.py).
    s = model.new_session(N_CTX)
    s.forward(rng.integers(0, c["vocab_size"], 32).tolist())
    res["profile_b1"] = kernel_profile(lambda t: s.forward([5 + t]))
    s.close()
    batch = [model.new_session(N_CTX) for _ in range(16)]
    for si in batch:
        si.forward(rng.integers(0, c["vocab_size"], 32).tolist())
    res["profile_b16"] = kernel_profile(lambda t: decode_batch(batch, [5 + t] * 16))
    for si in batch:
        si.close()
    res["peak_gpu_bytes"] = peak
    res["weight_bytes"] = model.info["weight_bytes"]
    model.close()
    return res


# ---- transformers worker ------------------------------------------------------------------------

def hf_worker(shape_name: str, quick: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    c = full_config(SHAPES[shape_name])
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                      intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                      num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                      head_dim=c["head_dim"], max_position_embeddings=c["max_position_embeddings"],
                      rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    # RoPE base and scaling change no timing; they are left at the defaults.
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    res: dict = {"decode": {}}
    n_new = 16 if quick else 64
    gen = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for b in (1, 4, 16):
            ids = torch.randint(0, c["vocab_size"], (b, 32), device="cuda")
            model.generate(ids, max_new_tokens=4, **gen)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n_new, **gen)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            new = out.shape[1] - ids.shape[1]
            res["decode"][str(b)] = {"tok_s": b * new / dt, "step_ms": dt / new * 1e3, "new_tokens": new}
        ids = torch.randint(0, c["vocab_size"], (1, PREFILL), device="cuda")
        model(ids)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        pre = float(np.median(times))
        res["prefill"] = {"tokens": PREFILL, "s": pre, "tok_s": PREFILL / pre}
    res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return res


# ---- orchestration ---------------------------------------------------------------------------------

def run_worker(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": "no result: " + proc.stdout[-2000:] + proc.stderr[-2000:]}


def part_weight_shares(c: dict) -> dict:
    """Fraction of the linear weights in each launch kind (q/k/v, o, gate/up, down, head)."""
    d, i, hd, n = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    w = {"qkv": n * d * (q + 2 * kv), "o": n * q * d, "gu": n * 2 * i * d, "down": n * i * d,
         "head": c["vocab_size"] * d}
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def floor_ms(step_bytes: float, bandwidth: float) -> float:
    return step_bytes / bandwidth * 1e3


def kv_bytes(c: dict, batch: int, context: int) -> float:
    return batch * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * context * c["head_dim"] * 2


# Kernels of a decode step's linear layers: tiled GEMV (rtn, dense, caldera's Q/L/R), bcq's LUT
# GEMM, caldera's activation transforms and row scatter.
LINEAR_KERNELS = ("gemv_kernel", "lut_gemm_kernel", "hadamard_kernel", "map_rows_kernel")


def gemv_bandwidth(profile: dict, linear_bytes: int) -> tuple[float, float]:
    # Profile keys keep template arguments and inner namespaces ("bcq_gpu::lut_gemm_kernel<3>").
    us = sum(v["us_per_step"] for k, v in profile.items()
             if k.split("<")[0].rsplit("::", 1)[-1] in LINEAR_KERNELS)
    return us, (linear_bytes / (us * 1e-6) if us else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--kinds", default="rtn2g64,rtn3g64,rtn4g64")
    ap.add_argument("--work", default="/tmp/pumice-bench")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", nargs="*")
    args = ap.parse_args()
    if args.worker is not None:
        w = args.worker
        if w[0] == "pumice":
            out = pumice_worker(w[1], w[2], w[3], int(w[4]), w[5] == "1")
        else:
            out = hf_worker(w[1], w[2] == "1")
        print("RESULT " + json.dumps(out), flush=True)
        return

    for kind in args.kinds.split(","):
        try:  # a bad name fails here, before anything is written or measured
            parse_kind(kind)
        except ValueError as err:
            ap.error(str(err))
    import torch
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "copy_bandwidth_Bps": bw, "models": {}}
    print(f"device {results['device']}, copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    quick = "1" if args.quick else "0"
    for shape_name in args.models.split(","):
        c = full_config(SHAPES[shape_name])
        entry = {"config": c, "kinds": {}}
        results["models"][shape_name] = entry
        for kind in args.kinds.split(","):
            path = work / f"{shape_name}-{kind}.pumice"
            t = time.perf_counter()
            sizes = write_random_model(path, shape_name, kind)
            write_s = time.perf_counter() - t
            t = time.perf_counter()
            r = run_worker(["pumice", str(path), shape_name, kind, str(sizes["linear_bytes"]), quick], 400)
            r.update(sizes)
            r["write_s"] = write_s
            if "error" not in r:
                for b, d in r["decode"].items():
                    ctx = d["context"]
                    step_bytes = sizes["linear_bytes"] + kv_bytes(c, int(b), ctx)
                    d["floor_ms"] = floor_ms(step_bytes, bw)
                    d["step_over_floor"] = d["step_ms"] / d["floor_ms"]
                d = r["decode_ctx2048"]
                d["floor_ms"] = floor_ms(sizes["linear_bytes"] + kv_bytes(c, 1, PREFILL + 16), bw)
                d["step_over_floor"] = d["step_ms"] / d["floor_ms"]
                us, gbw = gemv_bandwidth(r["profile_b1"], sizes["linear_bytes"])
                r["gemv_us_per_step_profiled"] = us
                r["gemv_bandwidth_profiled_Bps"] = gbw
                # The GEMVs alone, in their launch sequence (graph, PDL): weight bytes / step time.
                us = r["step_variants_ms"]["gemv_only"] * 1e3
                r["gemv_us_per_step"] = us
                r["gemv_bandwidth_Bps"] = sizes["linear_bytes"] / (us * 1e-6)
                r["gemv_fraction_of_copy_bw"] = r["gemv_bandwidth_Bps"] / bw
                # The same steps back to back: GPU time, as the copy bandwidth is timed.
                us = r["step_variants_ms"]["gemv_only_back_to_back"] * 1e3
                r["gemv_us_per_step_back_to_back"] = us
                r["gemv_fraction_of_copy_bw_back_to_back"] = sizes["linear_bytes"] / (us * 1e-6) / bw
                dp = r["decode_b1_chained"]
                dp["step_over_floor"] = dp["step_ms"] / r["decode"]["1"]["floor_ms"]
                dp["gemv_fraction_of_copy_bw"] = (sizes["linear_bytes"] / (r["step_variants_ms"]["gemv_only_chained"]
                                                                           * 1e-3)) / bw
                floor = floor_ms(sizes["linear_bytes"], bw)
                r["step_variants_over_floor"] = {k: v / floor for k, v in r["step_variants_ms"].items()}
            entry["kinds"][kind] = r
            print(f"{shape_name} {kind}: {json.dumps(r)[:1500]} ({time.perf_counter() - t:.0f} s)", flush=True)
            path.unlink(missing_ok=True)
            (out_dir / "bench_cuda.json").write_text(json.dumps(results, indent=1))
        if not args.no_hf:
            t = time.perf_counter()
            entry["transformers_fp16"] = run_worker(["hf", shape_name, quick], 400)
            print(f"{shape_name} transformers: {json.dumps(entry['transformers_fp16'])[:400]} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            (out_dir / "bench_cuda.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench_cuda.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    bw = results["copy_bandwidth_Bps"]
    print(f"\n## CUDA ({results['device']}), {results['date']}; copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print("| model | kind | bpw | decode b1 tok/s | b4 | b16 | b16/b1 | step/floor b1 | GEMV BW (% copy) "
          "| GEMVs back to back (% copy) | prefill tok/s | decode@2k tok/s | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, entry in results["models"].items():
        hf = entry.get("transformers_fp16")
        if hf and "error" not in hf:
            d = hf["decode"]
            print(f"| {shape} | transformers fp16 | 16 | {d['1']['tok_s']:.1f} | {d['4']['tok_s']:.1f} | "
                  f"{d['16']['tok_s']:.1f} | {d['16']['tok_s'] / d['1']['tok_s']:.1f} | | | | "
                  f"{hf['prefill']['tok_s']:.0f} | | {hf['peak_gpu_bytes'] / 2**30:.1f} |")
        elif hf:
            print(f"| {shape} | transformers fp16 | error: {hf['error'][-200:]!r} |")
        for kind, r in entry["kinds"].items():
            if "error" in r:
                print(f"| {shape} | {kind} | error: {r['error'][-300:]!r} |")
                continue
            d = r["decode"]
            print(f"| {shape} | {kind} | {r['bits_per_weight']:.2f} | {d['1']['tok_s']:.0f} | {d['4']['tok_s']:.0f} | "
                  f"{d['16']['tok_s']:.0f} | {d['16']['tok_s'] / d['1']['tok_s']:.1f} | "
                  f"{d['1']['step_over_floor']:.2f} | {r['gemv_bandwidth_Bps'] / 1e9:.0f} GB/s "
                  f"({100 * r['gemv_fraction_of_copy_bw']:.1f}%) | "
                  f"{r['gemv_us_per_step_back_to_back'] / 1e3:.3f} ms "
                  f"({100 * r['gemv_fraction_of_copy_bw_back_to_back']:.1f}%) | {r['prefill']['tok_s']:.0f} | "
                  f"{r['decode_ctx2048']['tok_s']:.0f} | {r['peak_gpu_bytes'] / 2**30:.2f} |")
            if hf and "error" not in hf:
                print(f"|   | vs transformers | | {d['1']['tok_s'] / hf['decode']['1']['tok_s']:.1f}x | "
                      f"{d['4']['tok_s'] / hf['decode']['4']['tok_s']:.1f}x | "
                      f"{d['16']['tok_s'] / hf['decode']['16']['tok_s']:.1f}x | | | | | "
                      f"{r['prefill']['tok_s'] / hf['prefill']['tok_s']:.2f}x | | |")
    print("\nbatch 1 with the chain of launches, PUMICE_CUDA_PERSISTENT=0 (greedy loop; GEMVs alone, % of copy "
          "bandwidth):")
    for shape, entry in results["models"].items():
        for kind, r in entry["kinds"].items():
            if "error" not in r:
                dp = r["decode_b1_chained"]
                print(f"| {shape} | {kind} | {dp['tok_s']:.0f} tok/s | {dp['step_over_floor']:.2f}x floor | "
                      f"GEMVs {100 * dp['gemv_fraction_of_copy_bw']:.0f}% |")
    print("\nbatch-1 step (ms, no logits copied; x = over the weight-bytes floor) by setting:")
    names = [n for n in STEP_VARIANTS if ":" not in n]
    print("| model | kind | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for shape, entry in results["models"].items():
        for kind, r in entry["kinds"].items():
            if "error" in r:
                continue
            v, x = r["step_variants_ms"], r["step_variants_over_floor"]
            print(f"| {shape} | {kind} | " + " | ".join(f"{v[n]:.3f} ({x[n]:.2f}x)" for n in names) + " |")
    print("\nbatch-16 step (ms; greedy sampled on the device) by setting:")
    b16names = [n for n in BATCH16_VARIANTS if ":" not in n]
    print("| model | kind | " + " | ".join(b16names) + " |")
    print("|---|---|" + "---|" * len(b16names))
    for shape, entry in results["models"].items():
        for kind, r in entry["kinds"].items():
            if "error" in r or "batch16_variants_ms" not in r:
                continue
            v = r["batch16_variants_ms"]
            print(f"| {shape} | {kind} | " + " | ".join(f"{v[n]:.3f}" for n in b16names) + " |")
    print("\nlong-context decode steps (ms; b1: chain of launches at ~2048 positions; b16: 16 sessions"
          " at ~1024):")
    print("| model | kind | b1 | b16 | b16 tok/s |")
    print("|---|---|---|---|---|")
    for shape, entry in results["models"].items():
        for kind, r in entry["kinds"].items():
            lc = r.get("long_context_ms") if "error" not in r else None
            if lc:
                print(f"| {shape} | {kind} | {lc['b1_chained_ctx2048']:.3f} | {lc['b16_ctx1024']:.3f}"
                      f" | {16e3 / lc['b16_ctx1024']:.0f} |")
    print("\none matrix per layer alone (us per launch, GB/s of its weights), per GEMV mode:")
    print("| model | kind | mode | " + " | ".join(GEMV_PARTS) + " |")
    print("|---|---|---|" + "---|" * len(GEMV_PARTS))
    for shape, entry in results["models"].items():
        c = entry["config"]
        for kind, r in entry["kinds"].items():
            if "error" in r:
                continue
            share = part_weight_shares(c)
            rows = [(f"b1 {mode}", r["step_variants_ms"], mode) for mode in GEMV_MODES]
            rows.append(("b16 default", r.get("batch16_variants_ms", {}), "default"))
            for label, times, mode in rows:
                if f"{mode}:qkv" not in times:
                    continue
                cells = []
                for part in GEMV_PARTS:
                    ms = times[f"{mode}:{part}"]
                    launches = 1 if part == "head" else c["num_hidden_layers"]
                    gbs = r["linear_bytes"] * share[part] / (ms * 1e-3) / 1e9
                    cells.append(f"{ms * 1e3 / launches:.1f} us, {gbs:.0f} GB/s")
                print(f"| {shape} | {kind} | {label} | " + " | ".join(cells) + " |")
    for shape, entry in results["models"].items():
        for kind, r in entry["kinds"].items():
            if "error" in r or kind != next(iter(entry["kinds"])):
                continue
            for columns in (1, 16):
                profile = r.get(f"profile_b{columns}", {})
                print(f"\nkernel time per batch-{columns} decode step, {shape} {kind} (us):")
                for k, v in sorted(profile.items(), key=lambda kv: -kv[1]["us_per_step"]):
                    print(f"  {v['us_per_step']:9.1f}  x{v['calls_per_step']:.0f}  {k}")


if __name__ == "__main__":
    main()
