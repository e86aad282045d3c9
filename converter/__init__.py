"""Hugging Face checkpoint -> .pumice file.

    from pumice.converter import convert
    convert("SmolLM2-135M-Instruct/", "smollm2-rtn4.pumice", method="rtn", bits=4)

Methods: ``dense`` (every tensor as stored in the checkpoint, or in ``dtype``) and ``rtn``
(per-group round-to-nearest; bits 2/3/4/8, default 4; group_size default 64) are built in;
others register themselves through `pumice.converter.methods.register_method`.

Defaults of quantized methods: embeddings (and an untied lm_head) rtn 8-bit in groups of 32
(``embedding="rtn8g32"``), norms and biases dense f32. ``embedding`` may also be ``"dense"``
(source dtype), ``"f32"``, ``"f16"``, ``"bf16"`` or ``"rtnB"`` / ``"rtnBgG"``.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from pumice.format import PumiceWriter

from .hf import (CheckpointError, MissingFileError, UnsupportedCheckpointError,
                 load_checkpoint)
from .methods import ConversionContext, available_methods, get_method, register_method

__all__ = ["convert", "register_method", "available_methods", "load_checkpoint",
           "CheckpointError", "MissingFileError", "UnsupportedCheckpointError",
           "ConversionContext"]


def pumice_version() -> str:
    try:
        from importlib.metadata import version
        return version("pumice")
    except Exception:
        return "0.1.0"


def convert(hf_dir: str | Path, output: str | Path, method: str = "dense", bits: int | None = None,
            group_size: int | None = None, dtype: str | None = None,
            embedding: str | None = None, progress: bool = True, **method_options: Any) -> Path:
    """Convert the checkpoint in `hf_dir` to the .pumice file `output`; returns its path.

    Memory stays near the largest tensor (plus what a method itself needs). Raises
    CheckpointError / UnsupportedCheckpointError for bad checkpoints, ValueError for bad options.
    """
    from tqdm.auto import tqdm

    spec = get_method(method)
    options = {key: value for key, value in method_options.items()}
    options["bits"] = bits if bits is not None else spec.defaults.get("bits")
    options["group_size"] = (group_size if group_size is not None
                             else spec.defaults.get("group_size"))
    options["dtype"] = dtype
    options["embedding"] = embedding
    output = Path(output)
    with load_checkpoint(hf_dir) as checkpoint:
        total = len(checkpoint.tensor_names()) + 1
        with tqdm(total=total, desc=f"convert ({method})", unit="tensor",
                  disable=not progress) as bar, \
                PumiceWriter(output, _metadata(checkpoint)) as writer:
            ctx = ConversionContext(checkpoint, writer, spec, options, bar)
            spec.fn(ctx)
            writer.add_blob(checkpoint.tokenizer_blob_name, checkpoint.tokenizer_bytes)
            bar.update(1)
            writer.metadata["provenance"] = _provenance(checkpoint, ctx, method_options)
    return output


def _metadata(checkpoint) -> dict:
    return {
        "architecture": checkpoint.architecture,
        "config": checkpoint.config,
        "tokenizer": {"type": checkpoint.tokenizer_type, "blob": checkpoint.tokenizer_blob_name,
                      "config": checkpoint.tokenizer_config},
        "chat_template": checkpoint.chat_template,
        "special_tokens": checkpoint.special_tokens,
        "generation": checkpoint.generation,
        "provenance": {},
    }


def _provenance(checkpoint, ctx: ConversionContext, method_options: dict) -> dict:
    provenance = {
        "method": ctx.method.name,
        "bits": ctx.bits,
        "group_size": ctx.group_size,
        "source": checkpoint.directory.resolve().name,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "pumice_version": pumice_version(),
        "embedding": ctx.embedding.describe(),
        "options": {k: v for k, v in method_options.items()
                    if isinstance(v, (str, int, float, bool, type(None)))},
    }
    provenance.update(ctx.provenance)
    return provenance
