"""Shared fixtures: the real test model (SmolLM2-135M-Instruct, see smollm2.py) and real text."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from smollm2 import CACHE_DIR, smollm2_checkpoint  # noqa: E402


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
        key = "-".join([method] + [f"{k}={options[k]}" for k in sorted(options)])
        out = CACHE_DIR / "converted" / f"smollm2-{key}-{_source_stamp()}.pumice"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            for stale in out.parent.glob(f"smollm2-{key}-{'?' * 12}.pumice"):  # older converter versions
                stale.unlink(missing_ok=True)
            partial = out.with_suffix(".partial")
            convert(smollm2_dir, partial, method=method, **options)
            partial.rename(out)
        return out

    return make


@pytest.fixture
def native_model_class():
    """NativeModel, or a skip when no native library is built (tests that need only the CPU one)."""
    try:
        from pumice.runtime.native import NativeModel, load_library
        load_library()
    except Exception as exc:  # no native library built
        pytest.skip(f"native library unavailable: {exc}")
    return NativeModel
