"""Pumice: run language models compressed below 3 bits per weight.

    from pumice import Generator
    with Generator("model.pumice") as generator:
        print(generator.generate("The capital of France is", max_tokens=16).text)

This file is installed as ``pumice/__init__.py``; it only re-exports the public API (imported
on first use, so ``import pumice.format`` stays light).
"""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _distribution_version
    __version__ = _distribution_version("pumice")
except PackageNotFoundError:  # a bare source tree
    __version__ = "0.0.0+unknown"

_PUBLIC = ("Generator", "GenerationResult", "ContextLengthError", "SamplingParams", "PumiceError")

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import pumice.runtime
        value = getattr(pumice.runtime, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pumice' has no attribute {name!r}")
