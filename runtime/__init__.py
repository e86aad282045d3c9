"""Pumice's Python runtime: cffi binding, tokenizer, sampling, chat templates, Generator, CLI.

Names are imported on first use (PEP 562) so that ``import pumice.format`` and the converter
never pay for numpy/cffi/tokenizers imports they do not need.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Generator": "generator",
    "GenerationResult": "generator",
    "ContextLengthError": "generator",
    "SamplingParams": "sampling",
    "Sampler": "sampling",
    "Tokenizer": "tokenizer",
    "StreamDecoder": "tokenizer",
    "render_chat": "chat",
    "NativeModel": "native",
    "NativeSession": "native",
    "decode_batch": "native",
    "PumiceError": "native",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
