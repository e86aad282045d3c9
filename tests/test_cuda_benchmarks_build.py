"""The standalone CUDA benchmarks (benchmarks/*.cu) compile wherever nvcc is found.

They are not part of the CMake build (they run only on the GPU machine, built by hand), so this
keeps them from drifting away from the headers they share with the runtime (csrc/cuda/decode.cuh).
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "benchmarks").glob("*.cu"))

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_benchmark_compiles(source, tmp_path):
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "-c", str(source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
