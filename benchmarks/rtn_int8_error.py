"""How far the CPU's default int8-activation rtn GEMV is from the exact product.

    PUMICE_LIBRARY=/path/to/libpumice.so python benchmarks/rtn_int8_error.py

Writes random rtn matrices (2/3/4/8 bits, 512×4096, group 64, codes uniform, each group's min
near minus half its range as a min/max quantizer gives), applies them to Gaussian tokens with
the default int8 activations and with exact f32 activations (PUMICE_RTN_ACTIVATIONS=f32), and
prints ‖y − y_exact‖ / ‖y_exact‖ against the float64 product with the stored weights (the
file's own dequantization).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pumice.format.reader import PumiceFile
from pumice.format.writer import PumiceWriter
from pumice.runtime.native import NativeModel

N, K, GROUP_SIZE, TOKENS = 512, 4096, 64, 8


def write_file(path: Path, rng) -> None:
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        for bits in (2, 3, 4, 8):
            groups, levels = K // GROUP_SIZE, (1 << bits) - 1
            codes = rng.integers(0, 256, size=(N, K * bits // 8), dtype=np.uint8)
            spread = rng.uniform(0.02, 0.2, size=(N, groups))
            scales = (spread / levels).astype(np.float16)
            mins = (-spread / 2 + rng.normal(0, 0.01, size=(N, groups))).astype(np.float16)
            writer.add_tensor(f"rtn{bits}", "rtn", [N, K], {"bits": bits, "group_size": GROUP_SIZE},
                              {"codes": codes, "scales": scales, "mins": mins})


def relative_errors(path: Path, activations: str, x: np.ndarray) -> dict[int, float]:
    os.environ["PUMICE_RTN_ACTIVATIONS"] = activations  # read when the model opens
    out = {}
    with NativeModel(path) as model, PumiceFile(path) as f:
        for bits in (2, 3, 4, 8):
            w = f.dequantize(f"rtn{bits}").astype(np.float64)
            exact = x.astype(np.float64) @ w.T
            y = np.concatenate([model.linear_apply(f"rtn{bits}", x[i:i + 1]) for i in range(len(x))])
            out[bits] = float(np.linalg.norm(y - exact) / np.linalg.norm(exact))
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rtn.pumice"
        write_file(path, rng)
        x = rng.standard_normal((TOKENS, K)).astype(np.float32)
        int8, f32 = relative_errors(path, "int8", x), relative_errors(path, "f32", x)
    print(f"library {os.environ.get('PUMICE_LIBRARY', '(installed)')}; {N}x{K}, group {GROUP_SIZE}, {TOKENS} tokens")
    print("| bits | int8 activations | f32 activations |\n|---|---|---|")
    for bits in (2, 3, 4, 8):
        print(f"| {bits} | {100 * int8[bits]:.2f}% | {100 * f32[bits]:.1e}% |")


if __name__ == "__main__":
    main()
