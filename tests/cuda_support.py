"""Whether the CUDA tests can run here: a libpumice_cuda to load and a GPU that torch sees."""
from __future__ import annotations

import pytest

from pumice.runtime.native import load_library


def cuda_unavailable_reason() -> str | None:
    """Why CUDA tests cannot run, or None when they can."""
    try:
        load_library("cuda")
    except Exception as exc:  # library missing: CPU-only build
        return f"no libpumice_cuda ({exc})"
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA GPU"
    except Exception as exc:
        return f"no CUDA GPU ({exc})"
    return None


def skip_module_without_cuda() -> None:
    """Call at import time of a CUDA-only test module."""
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)


# A prompt longer than one 16-column decode step, so the CUDA backend prefills it.
LONG_PROMPT = [1, 17, 42, 99, 3, 250, 7, 8, 301, 64, 12, 5, 77, 400, 31, 2, 90, 11, 123, 45]


def greedy_on(path, device: str, prompt=LONG_PROMPT, steps: int = 12):
    """Greedy tokens after `prompt`, each step's top-2 margin (relative), and the first logits."""
    import numpy as np
    from pumice.runtime.native import NativeModel
    with NativeModel(path, device=device) as model:
        s = model.new_session(128)
        logits = s.forward(prompt)
        first = logits.copy()
        tokens, margins = [], []
        for _ in range(steps):
            top2 = np.sort(logits)[-2:]
            margins.append(float(top2[1] - top2[0]) / float(np.abs(logits).max()))
            token = int(np.argmax(logits))
            tokens.append(token)
            logits = s.forward([token])
    return tokens, margins, first


def assert_greedy_agrees(cpu, gpu) -> None:
    """The CUDA run's greedy tokens equal the CPU's up to the first near-tie (fp16 tolerance)."""
    cpu_tokens, cpu_margins, _ = cpu
    gpu_tokens = gpu[0]
    for i, (a, b) in enumerate(zip(cpu_tokens, gpu_tokens)):
        if a != b:
            # Only a near-tie (within fp16 tolerance) may flip a greedy choice.
            assert cpu_margins[i] < 1e-2, (i, cpu_tokens, gpu_tokens)
            break


def graph_and_direct_logits(path, monkeypatch, tokens=(5, 6, 7, 8, 9, 10)):
    """Decode logits with captured graphs ("1") and with direct launches ("0")."""
    import numpy as np
    from pumice.runtime.native import NativeModel
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("PUMICE_CUDA_GRAPHS", mode)
        with NativeModel(path, device="cuda") as model:
            s = model.new_session(32)
            s.forward(list(tokens[:3]))
            out[mode] = np.stack([s.forward([t]) for t in tokens[3:]])
    return out


def assert_matches_reference(path, weights, config, tol: float) -> None:
    """The CUDA backend against the float64 reference (tiny_model.reference_logits) on 60 random
    tokens: a 40-token prompt (more than 16 tokens: the prefill path), 20 single-token decode
    steps (CUDA graphs), then prompts of 13 and 16 tokens, each one multi-column decode step."""
    import numpy as np
    from pumice.runtime.native import NativeModel
    from tiny_model import reference_logits, relative_error
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, config["vocab_size"], size=60).tolist()
    ref = reference_logits(weights, config, tokens)
    with NativeModel(path, device="cuda") as model:
        s = model.new_session(256)
        assert relative_error(s.forward(tokens[:40], logits_all=True), ref[:40]) < tol
        for i in range(40, 60):
            assert relative_error(s.forward([tokens[i]]), ref[i]) < tol, i
        assert s.n_past == 60
        s2 = model.new_session(64)
        assert relative_error(s2.forward(tokens[:13], logits_all=True), ref[:13]) < tol
        assert relative_error(s2.forward(tokens[13:29], logits_all=True), ref[13:29]) < tol
