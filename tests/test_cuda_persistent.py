"""CUDA: the persistent batch-1 decode step (PUMICE_CUDA_PERSISTENT=1, 2-bit rtn models).

Its activations are int8 (per 16 inputs), so it is held to the float64 reference with the
whole-model tolerance of the other kinds (2e-2), and to the chained step of launches more
loosely than their shared f16 path would be. Skipped without a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from pumice.runtime.native import NativeModel

from tiny_model import reference_logits, relative_error, tiny_config, write_tiny_llama

from cuda_support import assert_matches_reference, graph_and_direct_logits, skip_module_without_cuda

pytestmark = pytest.mark.cuda

skip_module_without_cuda()

TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            intermediate_size=344, vocab_size=500, max_position_embeddings=1024)


def _write(tmp_path, group_size=64, **overrides):
    config = dict(TINY)
    config.update(overrides)
    path = tmp_path / f"tiny-rtn2-g{group_size}.pumice"
    weights = write_tiny_llama(path, kind="rtn", dtype="f16", bits=2, group_size=group_size, **config)
    return path, weights, tiny_config(**config)


def _decode_logits(path, tokens, n_prompt):
    with NativeModel(path, device="cuda") as model:
        s = model.new_session(1024)
        s.forward(tokens[:n_prompt])
        return np.stack([s.forward([t]) for t in tokens[n_prompt:]])


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_matches_reference(tmp_path, monkeypatch, group_size):
    monkeypatch.setenv("PUMICE_CUDA_PERSISTENT", "1")
    path, weights, config = _write(tmp_path, group_size)
    assert_matches_reference(path, weights, config, 2e-2)


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=True),
    dict(num_key_value_heads=1),
    dict(num_key_value_heads=4),
    dict(head_dim=128, num_attention_heads=2, num_key_value_heads=2),
    dict(num_hidden_layers=3, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    dict(vocab_size=60000),  # a head taller than one part's items per SM (132 SMs): two parts
    dict(head_outside=True),
], ids=["tied", "gqa4", "mha", "hd128", "smollm2-shaped", "head-in-parts", "head-outside"])
def test_config_variants(tmp_path, monkeypatch, overrides):
    monkeypatch.setenv("PUMICE_CUDA_PERSISTENT", "1")
    overrides = dict(overrides)
    if overrides.pop("head_outside", False):  # the head as its own launch after the kernel
        monkeypatch.setenv("PUMICE_CUDA_PERSISTENT_HEAD", "0")
    path, weights, config = _write(tmp_path, **overrides)
    tokens = list(range(3, 40))
    ref = reference_logits(weights, config, tokens)
    with NativeModel(path, device="cuda") as model:
        s = model.new_session(64)
        s.forward(tokens[:30])
        for i in range(30, 37):
            assert relative_error(s.forward([tokens[i]]), ref[i]) < 2e-2, i


def test_long_context_splits_attention(tmp_path, monkeypatch):
    """700 tokens of context: each head's keys are split over many warps and merged."""
    monkeypatch.setenv("PUMICE_CUDA_PERSISTENT", "1")
    path, weights, config = _write(tmp_path, num_hidden_layers=1)
    tokens = np.random.default_rng(11).integers(0, config["vocab_size"], size=720).tolist()
    ref = reference_logits(weights, config, tokens)
    got = _decode_logits(path, tokens, 700)
    for i, row in enumerate(got):
        assert relative_error(row, ref[700 + i]) < 2e-2, i


def test_runs_and_is_deterministic(tmp_path, monkeypatch):
    """The step really is the persistent one (its int8 activations give other logits than the
    chained f16 step, within tolerance), and its sums have a fixed order: graph replays and
    direct launches agree bit for bit."""
    path, _, config = _write(tmp_path)
    tokens = list(range(5, 25))
    monkeypatch.setenv("PUMICE_CUDA_PERSISTENT", "0")
    chained = _decode_logits(path, tokens, 10)
    monkeypatch.setenv("PUMICE_CUDA_PERSISTENT", "1")
    persistent = _decode_logits(path, tokens, 10)
    assert not np.array_equal(persistent, chained)
    assert relative_error(persistent, chained) < 2e-2
    out = graph_and_direct_logits(path, monkeypatch)
    np.testing.assert_array_equal(out["1"], out["0"])
