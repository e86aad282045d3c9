"""Calibration statistics for calibration-aware quantizers (CALDERA, BCQ, ...).

`collect_hessians` runs a Llama-family checkpoint in torch over calibration sequences and returns,
for every linear weight, H = E[x xᵀ] of that layer's input x (the proxy Hessian of the layer-wise
objective ‖(W − Ŵ) X‖²). Layers that read the same input share one tensor object: q/k/v share the
attention input's H, gate/up share the MLP input's H.

The forward pass is our own small torch implementation (no transformers at run time), run one
decoder layer at a time: memory holds one layer's weights, the hidden states of the calibration
set, and the H's collected so far. It runs on CUDA when torch sees a GPU, else on the CPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "collect_hessians",
    "calibration_tokens",
    "default_calibration_text",
    "LlamaShape",
    "SafetensorsCheckpoint",
    "decoder_layer_forward",
    "rope_tables",
]

ATTN_INPUT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_INPUT = ("mlp.gate_proj", "mlp.up_proj")
CACHE_FORMAT = 1


def default_calibration_text() -> str:
    """Real English prose that ships with every CPython (the pydoc topics, sorted by key)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


# ----------------------------------------------------------------------------------------------
# Checkpoint access


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters the forward pass needs, read from a Hugging Face config.json."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    vocab_size: int
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config: dict) -> "LlamaShape":
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        # transformers >= 5 moves rope_theta/rope_scaling into "rope_parameters".
        rope = dict(config.get("rope_parameters") or {})
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        return cls(
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            vocab_size=int(config["vocab_size"]),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )


class SafetensorsCheckpoint:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.directory} has no config.json")
        self.config = json.loads(config_path.read_text())
        self.shape = LlamaShape.from_config(self.config)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
            if not (self.directory / files[0]).is_file():
                raise FileNotFoundError(f"{self.directory} has no model.safetensors")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            handle = safe_open(str(self.directory / name), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.directory}: no tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name).to(device=device, dtype=dtype)

    def layer(self, index: int, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
        """All tensors of decoder layer `index`, keyed by their name inside the layer."""
        prefix = f"model.layers.{index}."
        return {key[len(prefix):]: self.get(key, device, dtype)
                for key in self._where if key.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# The forward pass (Llama / Mistral / SmolLM2 decoder layers)


def rope_tables(shape: LlamaShape, seq_len: int, device, dtype=torch.float32):
    """cos, sin tables [seq_len, head_dim] for rotate-half RoPE, with llama3/linear scaling."""
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = shape.rope_scaling
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        factor = float(scaling["factor"])
        if kind == "linear":
            inv_freq = inv_freq / factor
        elif kind == "llama3":
            low = float(scaling["low_freq_factor"])
            high = float(scaling["high_freq_factor"])
            original = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv_freq
            low_wavelen, high_wavelen = original / low, original / high
            smooth = (original / wavelen - low) / (high - low)
            blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
            inv_freq = torch.where(wavelen > low_wavelen, inv_freq / factor,
                                   torch.where(wavelen < high_wavelen, inv_freq, blended))
        else:
            raise ValueError(f"unsupported rope scaling {kind!r}")
    positions = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _linear(x, weights, name):
    bias = weights.get(name + ".bias")
    return F.linear(x, weights[name + ".weight"], bias)


def decoder_layer_forward(hidden: torch.Tensor, weights: dict[str, torch.Tensor],
                          shape: LlamaShape, rope, observe=None) -> torch.Tensor:
    """One decoder layer on hidden [batch, seq, d] with a causal mask; returns the new hidden.

    `observe(group, x)` is called with the input of each group of linear layers: "attn" (q/k/v),
    "o" (o_proj), "mlp" (gate/up) and "down" (down_proj).
    """
    batch, seq, _ = hidden.shape
    cos, sin = rope
    cos, sin = cos[:seq], sin[:seq]
    x = _rms_norm(hidden, weights["input_layernorm.weight"], shape.rms_norm_eps)
    if observe:
        observe("attn", x)
    q = _linear(x, weights, "self_attn.q_proj").view(batch, seq, shape.num_heads, shape.head_dim)
    k = _linear(x, weights, "self_attn.k_proj").view(batch, seq, shape.num_kv_heads, shape.head_dim)
    v = _linear(x, weights, "self_attn.v_proj").view(batch, seq, shape.num_kv_heads, shape.head_dim)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    repeat = shape.num_heads // shape.num_kv_heads
    if repeat > 1:
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attn = attn.transpose(1, 2).reshape(batch, seq, shape.num_heads * shape.head_dim)
    if observe:
        observe("o", attn)
    hidden = hidden + _linear(attn, weights, "self_attn.o_proj")
    x = _rms_norm(hidden, weights["post_attention_layernorm.weight"], shape.rms_norm_eps)
    if observe:
        observe("mlp", x)
    act = F.silu(_linear(x, weights, "mlp.gate_proj")) * _linear(x, weights, "mlp.up_proj")
    if observe:
        observe("down", act)
    return hidden + _linear(act, weights, "mlp.down_proj")


# ----------------------------------------------------------------------------------------------
# Calibration data


def _tokenizer(checkpoint_dir: Path):
    from tokenizers import Tokenizer
    path = checkpoint_dir / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    raise FileNotFoundError(f"{checkpoint_dir} has no tokenizer.json (needed to tokenize the "
                            "calibration text)")


def calibration_tokens(checkpoint_dir, texts: list[str] | str, n_sequences: int,
                       seq_len: int) -> torch.Tensor:
    """Token windows [n, seq_len] (int64) spread evenly over the tokenized calibration text.

    A list of texts is joined with blank lines. If the text is shorter than n_sequences windows,
    windows overlap; if it is shorter than one window, seq_len shrinks to the text's length.
    """
    if isinstance(texts, str):
        text = texts
    else:
        text = "\n\n".join(texts)
    if not text:
        raise ValueError("calibration text is empty")
    ids = _tokenizer(Path(checkpoint_dir)).encode(text, add_special_tokens=False).ids
    if n_sequences < 1 or seq_len < 2:
        raise ValueError("need n_sequences >= 1 and seq_len >= 2")
    stream = torch.tensor(ids, dtype=torch.int64)
    seq_len = min(seq_len, len(ids))
    span = len(ids) - seq_len
    starts = [round(i * span / max(n_sequences - 1, 1)) for i in range(n_sequences)]
    return torch.stack([stream[s:s + seq_len] for s in starts])


# ----------------------------------------------------------------------------------------------
# Hessian collection


def _cache_key(checkpoint_dir: Path, tokens: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(CACHE_FORMAT).encode())
    digest.update((checkpoint_dir / "config.json").read_bytes())
    for name in sorted(os.listdir(checkpoint_dir)):
        if name.endswith(".safetensors"):
            stat = (checkpoint_dir / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(tokens.numpy().tobytes())
    return digest.hexdigest()


def _load_cache(path: Path, key: str):
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a partial or foreign file: recompute
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        return None
    groups = blob["groups"]
    return {name: groups[group] for name, group in blob["names"].items()}


def _save_cache(path: Path, key: str, hessians: dict[str, torch.Tensor]) -> None:
    groups, names, seen = {}, {}, {}
    for name, tensor in hessians.items():
        group = seen.setdefault(id(tensor), name)
        groups[group] = tensor
        names[name] = group
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"key": key, "groups": groups, "names": names}, partial)
    os.replace(partial, path)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def collect_hessians(checkpoint_dir, texts: list[str] | str | None = None, n_sequences: int = 64,
                     seq_len: int = 512, device=None, cache_path=None, progress: bool = True,
                     batch_size: int | None = None, layers: Iterable[int] | None = None
                     ) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] (float32, [K, K]) of the input of every linear layer of a Llama checkpoint.

    Keys are weight names ("model.layers.0.self_attn.q_proj.weight"). q/k/v share one tensor
    object, gate/up share one. The expectation is over all calibration tokens (n_sequences ×
    seq_len). `texts` defaults to the pydoc text. `cache_path`: a file where the result is stored
    and reused when the checkpoint and calibration tokens are the same. `layers`: only these
    decoder layers (the forward still runs through all earlier ones).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if texts is None:
        texts = default_calibration_text()
    tokens = calibration_tokens(checkpoint_dir, texts, n_sequences, seq_len)
    wanted = None if layers is None else sorted(set(int(i) for i in layers))

    key = None
    if cache_path is not None:
        cache_path = Path(cache_path)
        key = _cache_key(checkpoint_dir, tokens) + f":{wanted}"
        cached = _load_cache(cache_path, key)
        if cached is not None:
            return cached

    checkpoint = SafetensorsCheckpoint(checkpoint_dir)
    shape = checkpoint.shape
    device = _resolve_device(device)
    n_seq, seq = tokens.shape
    if batch_size is None:
        # Keep one batch's activations (mostly the MLP's [b, seq, intermediate]) near 256 MiB.
        per_seq = seq * (4 * shape.intermediate_size + 6 * shape.hidden_size) * 4
        batch_size = max(1, min(n_seq, (256 << 20) // max(per_seq, 1)))

    embed = checkpoint.get("model.embed_tokens.weight", "cpu", torch.float32)
    # Hidden states of the whole calibration set live on the host between layers (they are
    # what a layer-at-a-time pass must keep); each batch moves to the device for its layer.
    hidden = embed[tokens]
    del embed
    rope = rope_tables(shape, seq, device)
    last = shape.num_layers - 1 if wanted is None else wanted[-1]
    hessians: dict[str, torch.Tensor] = {}

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=(last + 1) * n_seq, desc="calibration", unit="seq", leave=False)
    with torch.inference_mode():
        for index in range(last + 1):
            weights = checkpoint.layer(index, device, torch.float32)
            keep = wanted is None or index in wanted
            sums = {}

            def observe(group, x):
                if not keep:
                    return
                flat = x.reshape(-1, x.shape[-1])
                product = (flat.T @ flat).double()
                if group in sums:
                    sums[group] += product
                else:
                    sums[group] = product

            for begin in range(0, n_seq, batch_size):
                batch = hidden[begin:begin + batch_size].to(device)
                out = decoder_layer_forward(batch, weights, shape, rope, observe)
                hidden[begin:begin + batch_size] = out.to("cpu")
                if bar is not None:
                    bar.update(batch.shape[0])
            del weights
            if keep:
                count = float(n_seq * seq)
                shared = {group: (total / count).float().cpu() for group, total in sums.items()}
                prefix = f"model.layers.{index}."
                for name in ATTN_INPUT:
                    hessians[prefix + name + ".weight"] = shared["attn"]
                hessians[prefix + "self_attn.o_proj.weight"] = shared["o"]
                for name in MLP_INPUT:
                    hessians[prefix + name + ".weight"] = shared["mlp"]
                hessians[prefix + "mlp.down_proj.weight"] = shared["down"]
    if bar is not None:
        bar.close()
    if cache_path is not None:
        _save_cache(cache_path, key, hessians)
    return hessians
