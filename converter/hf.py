"""Loading a Hugging Face Llama-family checkpoint: config, weights (lazily), tokenizer, templates.

`load_checkpoint(hf_dir)` validates everything a conversion needs up front — architecture,
config values, presence of weights and tokenizer — and raises a `CheckpointError` (missing or
broken files) or `UnsupportedCheckpointError` (a model Pumice cannot run) whose message names the
file or the value at fault. Weights are read one tensor at a time (safetensors `safe_open`, or
`torch.load(mmap=True)` for `pytorch_model*.bin`), so memory stays near the largest tensor.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class CheckpointError(ValueError):
    """The checkpoint directory is missing something or holds a broken file."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file the conversion needs is absent."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint is a model (or a model variant) that Pumice does not run."""


LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORM_SUFFIXES = ("input_layernorm", "post_attention_layernorm")
# Buffers some older checkpoints saved with the weights; they carry nothing we need.
_IGNORED_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def layer_tensor_names(layer: int, config: dict) -> list[str]:
    """The tensors of decoder layer `layer` in file order: attention, MLP, norms (FORMAT.md 4)."""
    prefix = f"model.layers.{layer}."
    names = []
    for suffix in LINEAR_SUFFIXES:
        names.append(f"{prefix}{suffix}.weight")
        # Llama's attention_bias puts a bias on q, k, v and o; mlp_bias on gate, up and down.
        if config["attention_bias" if suffix.startswith("self_attn") else "mlp_bias"]:
            names.append(f"{prefix}{suffix}.bias")
    names += [f"{prefix}{suffix}.weight" for suffix in NORM_SUFFIXES]
    return names


def is_decoder_linear(name: str) -> bool:
    """A weight matrix of a decoder layer's attention or MLP (what quantizers compress)."""
    return (name.startswith("model.layers.") and name.endswith(".weight")
            and any(f".{suffix}." in name for suffix in LINEAR_SUFFIXES))


# ---------------------------------------------------------------------------------------------
# Files

def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON: {err}") from None


def _read_optional_json(path: Path, what: str) -> dict:
    if not path.exists():
        return {}
    value = _read_json(path, what)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# Config

def model_config_from_hf(hf_config: dict, source: str = "config.json") -> dict:
    """HF config.json -> the metadata "config" object of docs/FORMAT.md 2.1, validated."""
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{source}: must be a JSON object")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if architectures:
        unknown = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if unknown:
            raise UnsupportedCheckpointError(
                f"{source}: architecture {', '.join(unknown)} is not supported "
                f"(supported: {supported}; model_type {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedCheckpointError(
            f"{source}: model_type {model_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}, i.e. {supported})")

    def need(key: str, kind=int) -> Any:
        if key not in hf_config or hf_config[key] is None:
            raise CheckpointError(f"{source}: missing required key {key!r}")
        value = hf_config[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise CheckpointError(f"{source}: {key!r} must be a positive integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
            raise CheckpointError(f"{source}: {key!r} must be a positive number, got {value!r}")
        return value

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise CheckpointError(f"{source}: num_key_value_heads {kv_heads} does not divide "
                              f"num_attention_heads {heads}")
    head_dim = hf_config.get("head_dim") or hidden // heads
    max_positions = need("max_position_embeddings")

    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise UnsupportedCheckpointError(f"{source}: hidden_act {activation!r} is not supported "
                                         f"(Llama-family models use 'silu')")
    sliding_window = hf_config.get("sliding_window")
    if sliding_window is not None and hf_config.get("use_sliding_window", True) is not False:
        if not isinstance(sliding_window, int) or sliding_window < max_positions:
            raise UnsupportedCheckpointError(
                f"{source}: sliding-window attention (sliding_window={sliding_window}, shorter "
                f"than max_position_embeddings={max_positions}) is not supported; Mistral "
                f"checkpoints with sliding_window null (v0.2 and later) are")
    if hf_config.get("pretraining_tp", 1) not in (1, None):
        # Only changes how the original training sliced matmuls; the weights are ordinary.
        pass

    # transformers >= 5 nests RoPE settings in "rope_parameters"; older ones use rope_theta +
    # rope_scaling at the top level.
    rope = hf_config.get("rope_parameters")
    if isinstance(rope, dict):
        rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        scaling = dict(rope)
    else:
        rope_theta = hf_config.get("rope_theta", 10000.0)
        scaling = hf_config.get("rope_scaling")
        scaling = dict(scaling) if isinstance(scaling, dict) else scaling
    rope_scaling = _rope_scaling(scaling, source)

    config = {
        "vocab_size": need("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": need("intermediate_size"),
        "num_hidden_layers": need("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope_theta),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf_config.get("attention_bias", False)),
        "mlp_bias": bool(hf_config.get("mlp_bias", False)),
    }
    if not (isinstance(config["rope_theta"], float) and config["rope_theta"] > 0):
        raise CheckpointError(f"{source}: rope_theta must be positive")
    return config


def _rope_scaling(scaling: Any, source: str) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: rope scaling must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedCheckpointError(
            f"{source}: rope scaling type {rope_type!r} is not supported (supported: none, "
            f"'llama3', 'linear')")
    if rope_type == "default":
        return None

    def number(key: str) -> float:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{source}: rope scaling {rope_type!r} needs a positive "
                                  f"{key!r}, got {value!r}")
        return value

    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(number("factor"))}
    return {"rope_type": "llama3", "factor": float(number("factor")),
            "low_freq_factor": float(number("low_freq_factor")),
            "high_freq_factor": float(number("high_freq_factor")),
            "original_max_position_embeddings": int(number("original_max_position_embeddings"))}


# ---------------------------------------------------------------------------------------------
# Weights

class _SafetensorsSource:
    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open
        self._files = files  # tensor name -> file
        self._handles: dict[Path, Any] = {}
        self._safe_open = safe_open

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = self._safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot read safetensors file: {err}") from None
            self._handles[path] = handle
        return handle.get_tensor(name)

    _DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
               "F64": torch.float64}

    def dtype(self, name: str) -> torch.dtype:
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = self._safe_open(str(path), framework="pt")
        text = self._handles[path].get_slice(name).get_dtype()
        return self._DTYPES.get(text) or self.get(name).dtype

    def shape(self, name: str) -> list[int]:
        self.dtype(name)  # opens the file's handle
        return list(self._handles[self._files[name]].get_slice(name).get_shape())

    def close(self) -> None:
        self._handles.clear()


class _TorchBinSource:
    def __init__(self, files: dict[str, Path]):
        self._files = files
        self._loaded: dict[Path, dict] = {}

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        if path not in self._loaded:
            self._loaded.clear()  # one mmapped shard at a time
            self._loaded[path] = _torch_load(path)
        return self._loaded[path][name]

    def close(self) -> None:
        self._loaded.clear()


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load PyTorch weights: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _index_files(directory: Path, index_name: str) -> dict[str, Path] | None:
    index_path = directory / index_name
    if not index_path.exists():
        return None
    index = _read_json(index_path, "weight index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no 'weight_map'")
    files = {name: directory / file for name, file in weight_map.items()}
    for path in sorted(set(files.values())):
        if not path.exists():
            raise MissingFileError(f"{path}: weight shard listed in {index_name} not found")
    return files


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read safetensors file: {err}") from None


def _weight_files(directory: Path, index_name: str, pattern: str, list_names) -> dict[str, Path] | None:
    """{tensor name: file} from the sharding index if present, else by listing each matching file."""
    files = _index_files(directory, index_name)
    if files is None:
        shards = sorted(directory.glob(pattern))
        if shards:
            files = {name: shard for shard in shards for name in list_names(shard)}
    return files


def _open_weights(directory: Path):
    """-> (source with .get(name), {name: file}, format name)."""
    files = _weight_files(directory, "model.safetensors.index.json", "*.safetensors", _safetensors_names)
    if files is not None:
        return _SafetensorsSource(files), files, "safetensors"
    files = _weight_files(directory, "pytorch_model.bin.index.json", "pytorch_model*.bin", _torch_load)
    if files is not None:
        return _TorchBinSource(files), files, "pytorch"
    raise MissingFileError(f"{directory}: no weights found (expected model.safetensors, sharded "
                           f"*.safetensors with model.safetensors.index.json, or pytorch_model*.bin)")


# ---------------------------------------------------------------------------------------------
# Tokenizer and templates

def _infer_add_bos(tokenizer_json: bytes, bos_token: str | None) -> bool:
    """Whether the HF tokenizer's post-processor prepends BOS (when tokenizer_config is silent)."""
    try:
        post = json.loads(tokenizer_json).get("post_processor") or {}
    except (ValueError, AttributeError):
        return False
    processors = post.get("processors", [post]) if isinstance(post, dict) else []
    for processor in processors:
        single = processor.get("single") if isinstance(processor, dict) else None
        if isinstance(single, list) and single and isinstance(single[0], dict) \
                and "SpecialToken" in single[0]:
            return bos_token is None or single[0]["SpecialToken"].get("id") == bos_token
    return False


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]  # AddedToken serialised as an object
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


@dataclass
class Checkpoint:
    """A validated Hugging Face checkpoint directory, read lazily."""

    directory: Path
    hf_config: dict
    config: dict                      # FORMAT.md 2.1
    tokenizer_type: str               # "hf_tokenizers" or "sentencepiece"
    tokenizer_blob_name: str          # "tokenizer.json" or "tokenizer.model"
    tokenizer_bytes: bytes
    tokenizer_config: dict            # tokenizer_config.json minus chat_template
    chat_template: str | None
    special_tokens: dict
    generation: dict
    weight_format: str                # "safetensors" or "pytorch"
    weight_files: dict[str, Path] = field(repr=False)
    _source: Any = field(repr=False, default=None)

    architecture = "llama"

    def get(self, name: str) -> torch.Tensor:
        """One weight tensor in its source dtype (read now, not cached)."""
        if name == "lm_head.weight" and name not in self.weight_files \
                and self.config["tie_word_embeddings"]:
            name = "model.embed_tokens.weight"
        if name not in self.weight_files:
            raise CheckpointError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        return self._source.get(name)

    @property
    def source_dtype(self) -> torch.dtype:
        return self.get_dtype("model.embed_tokens.weight")

    def shape(self, name: str) -> list[int]:
        """Shape of a checkpoint tensor without reading its data where the format allows."""
        if name == "lm_head.weight" and name not in self.weight_files:
            name = "model.embed_tokens.weight"
        if hasattr(self._source, "shape") and name in self.weight_files:
            return self._source.shape(name)
        return list(self.get(name).shape)

    def get_dtype(self, name: str) -> torch.dtype:
        if hasattr(self._source, "dtype") and name in self.weight_files:
            return self._source.dtype(name)
        return self.get(name).dtype

    def tensor_names(self) -> list[str]:
        """Every tensor the .pumice file will hold, in file order (FORMAT.md 4), blobs excluded."""
        names = ["model.embed_tokens.weight"]
        for layer in range(self.config["num_hidden_layers"]):
            names += layer_tensor_names(layer, self.config)
        names.append("model.norm.weight")
        if not self.config["tie_word_embeddings"]:
            names.append("lm_head.weight")
        return names

    def layer_names(self, layer: int) -> list[str]:
        return layer_tensor_names(layer, self.config)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_checkpoint(hf_dir: str | Path) -> Checkpoint:
    """Open and validate a Hugging Face checkpoint directory (see the module docstring)."""
    directory = Path(hf_dir)
    if not directory.is_dir():
        raise MissingFileError(f"{directory}: checkpoint directory not found")
    hf_config = _read_json(directory / "config.json", "model config (config.json)")
    config = model_config_from_hf(hf_config, str(directory / "config.json"))

    # Tokenizer: the fast tokenizer's JSON is preferred; SentencePiece models otherwise.
    if (directory / "tokenizer.json").exists():
        tokenizer_type, blob_name = "hf_tokenizers", "tokenizer.json"
    elif (directory / "tokenizer.model").exists():
        tokenizer_type, blob_name = "sentencepiece", "tokenizer.model"
    else:
        raise MissingFileError(f"{directory}: no tokenizer found (expected tokenizer.json or "
                               f"tokenizer.model)")
    tokenizer_bytes = (directory / blob_name).read_bytes()
    tokenizer_config = _read_optional_json(directory / "tokenizer_config.json",
                                           "tokenizer config")
    chat_template = None
    template_file = directory / "chat_template.jinja"
    if template_file.exists():
        chat_template = template_file.read_text(encoding="utf-8")
    template_in_config = tokenizer_config.pop("chat_template", None)
    if chat_template is None and isinstance(template_in_config, str):
        chat_template = template_in_config
    elif chat_template is None and isinstance(template_in_config, list):
        # Named templates [{"name": ..., "template": ...}]: the default one is what chat uses.
        named = {t.get("name"): t.get("template") for t in template_in_config
                 if isinstance(t, dict)}
        chat_template = named.get("default")
    if chat_template is None and (directory / "chat_template.json").exists():
        value = _read_json(directory / "chat_template.json", "chat template").get("chat_template")
        chat_template = value if isinstance(value, str) else None

    generation = _read_optional_json(directory / "generation_config.json", "generation config")
    special_tokens = _special_tokens(hf_config, generation, tokenizer_config, tokenizer_type,
                                     tokenizer_bytes)
    generation = {k: v for k, v in generation.items()
                  if k not in ("transformers_version", "_from_model_config", "bos_token_id",
                               "eos_token_id", "pad_token_id")}

    source, files, weight_format = _open_weights(directory)
    checkpoint = Checkpoint(directory, hf_config, config, tokenizer_type, blob_name,
                            tokenizer_bytes, tokenizer_config, chat_template, special_tokens,
                            generation, weight_format, files, source)
    _check_tensors(checkpoint)
    return checkpoint


def _special_tokens(hf_config: dict, generation: dict, tokenizer_config: dict,
                    tokenizer_type: str, tokenizer_bytes: bytes) -> dict:
    bos_id = generation.get("bos_token_id", hf_config.get("bos_token_id"))
    bos_id = bos_id if isinstance(bos_id, int) and not isinstance(bos_id, bool) else None
    # generation_config's eos list (e.g. Llama 3 instruct: end_of_text and eot_id) wins.
    eos_ids = _as_id_list(generation.get("eos_token_id")) or _as_id_list(hf_config.get("eos_token_id"))
    pad_id = generation.get("pad_token_id", hf_config.get("pad_token_id"))
    pad_id = pad_id if isinstance(pad_id, int) and not isinstance(pad_id, bool) else None
    bos_token = _token_text(tokenizer_config.get("bos_token"))
    eos_token = _token_text(tokenizer_config.get("eos_token"))
    add_bos = tokenizer_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = True if tokenizer_type == "sentencepiece" else _infer_add_bos(tokenizer_bytes,
                                                                                bos_token)
    return {"bos_token_id": bos_id, "eos_token_ids": list(dict.fromkeys(eos_ids)),
            "pad_token_id": pad_id, "bos_token": bos_token, "eos_token": eos_token,
            "add_bos_token": add_bos}


def _check_tensors(checkpoint: Checkpoint) -> None:
    expected = checkpoint.tensor_names()
    present = set(checkpoint.weight_files)
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"{checkpoint.directory}: weights lack {len(missing)} expected "
                              f"tensor(s), e.g. {missing[:3]}")
    allowed = set(expected) | {"lm_head.weight"}
    unexpected = sorted(n for n in present if n not in allowed and not _IGNORED_TENSORS.match(n))
    if unexpected:
        raise UnsupportedCheckpointError(
            f"{checkpoint.directory}: the weights hold tensors a Llama-family model does not "
            f"have ({len(unexpected)}, e.g. {unexpected[:3]}); this checkpoint is not supported")


def iter_tensor_names(checkpoint: Checkpoint) -> Iterator[str]:
    yield from checkpoint.tensor_names()
