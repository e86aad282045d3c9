"""Tiny random Llama models written as .pumice files, and a float64 reference forward pass.

`write_tiny_llama` builds a 2-layer, 64-wide model (4 heads, 2 KV heads, vocab 128) in well under
a second, so forward-pass tests (RoPE, GQA, KV cache, batched decode, storage kinds) run without
transformers and without the real checkpoint. `reference_logits` recomputes the same model in
float64 with Hugging Face's Llama math, from the weights the file actually holds (after f16/bf16
rounding or quantization), so any difference is the runtime's own.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pumice.format.packing import pack_codes
from pumice.format.writer import PumiceWriter

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(**overrides) -> dict[str, Any]:
    """TINY_CONFIG with overrides; head_dim follows hidden_size / heads unless given."""
    config = dict(TINY_CONFIG)
    config.update(overrides)
    if "head_dim" not in overrides:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def tiny_metadata(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "architecture": "llama",
        "config": config,
        "chat_template": None,
        "special_tokens": {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": None,
                           "bos_token": None, "eos_token": None, "add_bos_token": True},
        "generation": {},
        "provenance": {"method": "random", "bits": None, "group_size": None, "source": "tests",
                       "date": "2026-01-01T00:00:00Z", "pumice_version": "0.1.0"},
    }


def tensor_names(config: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if config["attention_bias"]:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if config["mlp_bias"]:
            names += [p + f"mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not config["tie_word_embeddings"]:
        names.append("lm_head.weight")
    return names


def tensor_shape(name: str, c: dict[str, Any]) -> tuple[int, ...]:
    """The shape of a Llama tensor (weights and biases) under config c."""
    d, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    qd, kvd = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    table = {"q_proj": (qd, d), "k_proj": (kvd, d), "v_proj": (kvd, d), "o_proj": (d, qd),
             "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c["vocab_size"], d)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return (d,)
    proj = name.split(".")[-2]
    return table[proj][:1] if name.endswith(".bias") else table[proj]


def _random_weight(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        if name.endswith(".bias"):
            return 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    # Unit-variance outputs for unit-variance inputs, so activations stay O(1) through layers.
    return torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[1])


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int):
    """Plain min/max per-group RTN: (parts for the `rtn` kind, the dequantized float64 matrix)."""
    n, k = w.shape
    groups = -(-k // group_size)
    qmax = (1 << bits) - 1
    w32 = w.to(torch.float32).numpy()
    codes = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, groups), dtype=np.float16)
    mins = np.zeros((n, groups), dtype=np.float16)
    for g in range(groups):
        block = w32[:, g * group_size:(g + 1) * group_size]
        lo, hi = block.min(axis=1), block.max(axis=1)
        scale = ((hi - lo) / qmax).astype(np.float16)
        low = lo.astype(np.float16)
        s32, l32 = scale.astype(np.float32), low.astype(np.float32)
        safe = np.where(s32 == 0, 1.0, s32)
        q = np.clip(np.rint((block - l32[:, None]) / safe[:, None]), 0, qmax).astype(np.uint8)
        codes[:, g * group_size:(g + 1) * group_size] = q
        scales[:, g], mins[:, g] = scale, low
    group_of_column = np.arange(k) // group_size
    # The runtime reconstructs scale * code + min in float32; so does the reference.
    deq32 = (scales.astype(np.float32)[:, group_of_column] * codes.astype(np.float32)
             + mins.astype(np.float32)[:, group_of_column])
    parts = {"codes": pack_codes(codes, bits), "scales": scales, "mins": mins}
    return parts, torch.from_numpy(deq32.astype(np.float64))


def _stored_dense(w: torch.Tensor, dtype: str):
    """(part value for the writer, float64 tensor of what the file holds)."""
    if dtype == "f32":
        t = w.to(torch.float32)
    elif dtype == "f16":
        t = w.to(torch.float16)
    elif dtype == "bf16":
        t = w.to(torch.bfloat16)
    else:
        raise ValueError(f"unknown dense dtype {dtype!r}")
    return t.contiguous(), t.to(torch.float64)


def write_tiny_llama(path, kind: str = "dense", dtype: str = "f32", seed: int = 0, bits: int = 4,
                     group_size: int = 32, **config_overrides) -> dict[str, torch.Tensor]:
    """Write a random tiny Llama to `path`; returns {name: float64 tensor as stored}.

    `kind` is the storage of every 2-D weight ("dense" in `dtype`, or "rtn" with `bits` and
    `group_size`); 1-D tensors (norms, biases) are dense in `dtype`. Config overrides go into
    the file's metadata (see tiny_config).
    """
    config = tiny_config(**config_overrides)
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    with PumiceWriter(Path(path), tiny_metadata(config)) as writer:
        for name in tensor_names(config):
            shape = tensor_shape(name, config)
            w = _random_weight(name, shape, gen)
            if len(shape) == 2 and kind == "rtn":
                parts, stored = quantize_rtn(w, bits, group_size)
                writer.add_tensor(name, "rtn", list(shape), {"bits": bits, "group_size": group_size}, parts)
            elif len(shape) == 2 and kind != "dense":
                raise ValueError(f"write_tiny_llama cannot write kind {kind!r}")
            else:
                value, stored = _stored_dense(w, dtype)
                writer.add_tensor(name, "dense", list(shape), {}, {"weight": value})
            weights[name] = stored
    return weights


# ---- reference forward ----------------------------------------------------------------------

def rope_inv_freq(config: dict[str, Any]) -> torch.Tensor:
    """RoPE inverse frequencies in float64 with transformers' default / linear / llama3 rules."""
    hd = config["head_dim"]
    inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = config.get("rope_scaling")
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"reference has no rope_scaling {kind!r}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(weights: dict[str, torch.Tensor], config: dict[str, Any], tokens) -> np.ndarray:
    """Logits [len(tokens), vocab] (float64) of a causal forward pass over `tokens` from position 0."""
    # Tiny matrices: torch's thread pool only adds overhead (badly so on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_logits(weights, config, tokens)
    finally:
        torch.set_num_threads(threads)


def _reference_logits(weights, config, tokens) -> np.ndarray:
    c = config
    w = weights
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    n = ids.numel()
    H, KV, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][ids]
    pos = torch.arange(n, dtype=torch.float64)
    freqs = pos[:, None] * rope_inv_freq(c)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]  # [1, n, hd]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)

    def linear(name: str, v: torch.Tensor) -> torch.Tensor:
        y = v @ w[name + ".weight"].T
        bias = w.get(name + ".bias")
        return y if bias is None else y + bias

    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(p + "self_attn.q_proj", h).view(n, H, hd).transpose(0, 1)
        k = linear(p + "self_attn.k_proj", h).view(n, KV, hd).transpose(0, 1)
        v = linear(p + "self_attn.v_proj", h).view(n, KV, hd).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(H // KV, dim=0)
        v = v.repeat_interleave(H // KV, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(hd) + mask
        attn = torch.softmax(scores, dim=-1) @ v  # [H, n, hd]
        x = x + linear(p + "self_attn.o_proj", attn.transpose(0, 1).reshape(n, H * hd))
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = linear(p + "mlp.gate_proj", h)
        up = linear(p + "mlp.up_proj", h)
        x = x + linear(p + "mlp.down_proj", torch.nn.functional.silu(gate) * up)
    x = _rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return (x @ head.T).numpy()


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))
