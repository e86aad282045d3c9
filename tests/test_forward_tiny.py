"""The native Llama forward pass on tiny random models against a float64 reference.

Covers RoPE (plain, llama3, linear), grouped-query attention (MHA, GQA, MQA), biases, tied
embeddings, storage dtypes and kinds, the KV cache across forward calls, long prefills that run
as several passes, truncation, and batched decode against sequential decoding.
"""
from __future__ import annotations

import numpy as np
import pytest

from pumice.runtime.native import NativeModel, decode_batch

from tiny_model import LLAMA3_SCALING, reference_logits, relative_error, tiny_config, write_tiny_llama

PROMPT = [5, 17, 99, 3, 64, 1, 127, 0, 42, 42, 7, 88]


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(**options) -> (NativeModel, weights, config)."""
    opened = []

    def make(kind="dense", dtype="f32", seed=0, **overrides):
        path = tmp_path / f"tiny-{len(opened)}.pumice"
        weights = write_tiny_llama(path, kind=kind, dtype=dtype, seed=seed, **overrides)
        model = NativeModel(path)
        opened.append(model)
        return model, weights, tiny_config(**overrides)

    yield make
    for model in opened:
        model.close()


def random_tokens(n, seed=1, vocab=128):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 4},                     # plain multi-head attention
    {"num_key_value_heads": 1},                     # multi-query attention
    {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0},
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"attention_bias": True, "mlp_bias": True},
    {"tie_word_embeddings": True},
    {"head_dim": 32},                               # head_dim != hidden / heads
], ids=["gqa", "mha", "mqa", "llama3-rope", "linear-rope", "biases", "tied", "wide-heads"])
def test_prefill_matches_float64_reference(tiny, overrides):
    model, weights, config = tiny(**overrides)
    tokens = random_tokens(40)
    logits = model.new_session().forward(tokens, logits_all=True)
    assert logits.shape == (40, 128)
    assert relative_error(logits, reference_logits(weights, config, tokens)) < 1e-4


@pytest.mark.parametrize("kind,dtype", [("dense", "f16"), ("dense", "bf16"), ("rtn", "f32")])
def test_storage_kinds_match_reference(tiny, kind, dtype):
    # The reference uses the weights as stored (rounded or quantized), so the bound stays tight.
    model, weights, config = tiny(kind=kind, dtype=dtype)
    logits = model.new_session().forward(PROMPT, logits_all=True)
    assert relative_error(logits, reference_logits(weights, config, PROMPT)) < 1e-4


def test_prefill_equals_token_by_token(tiny):
    model, _, _ = tiny(rope_scaling=LLAMA3_SCALING)
    prefill = model.new_session().forward(PROMPT, logits_all=True)
    session = model.new_session()
    steps = np.stack([session.forward([t]) for t in PROMPT])
    assert session.n_past == len(PROMPT)
    assert relative_error(steps, prefill) < 1e-5


def test_cache_across_uneven_forward_calls(tiny):
    model, weights, config = tiny()
    tokens = random_tokens(30, seed=3)
    session = model.new_session()
    rows, start = [], 0
    for size in (7, 1, 12, 1, 9):
        rows.append(session.forward(tokens[start:start + size], logits_all=True))
        start += size
    assert relative_error(np.concatenate(rows), reference_logits(weights, config, tokens)) < 1e-4


def test_last_row_logits_and_cache_only(tiny):
    model, _, _ = tiny()
    full = model.new_session().forward(PROMPT, logits_all=True)
    assert relative_error(model.new_session().forward(PROMPT), full[-1]) < 1e-6
    session = model.new_session()
    assert session.forward(PROMPT[:-1], return_logits=False) is None
    assert relative_error(session.forward(PROMPT[-1:]), full[-1]) < 1e-5


def test_long_prefill_runs_in_several_passes(tiny):
    # Longer than the rows the backend runs per pass (256): the passes chain through the cache.
    model, weights, config = tiny(max_position_embeddings=1024)
    tokens = random_tokens(600, seed=4)
    logits = model.new_session().forward(tokens, logits_all=True)
    assert relative_error(logits, reference_logits(weights, config, tokens)) < 1e-4
    last = model.new_session().forward(tokens)
    assert relative_error(last, logits[-1]) < 1e-5


def test_decode_at_long_context(tiny):
    # Few sessions and many cached keys: attention splits the keys into ranges and merges them.
    model, weights, config = tiny(max_position_embeddings=1024)
    tokens = random_tokens(700, seed=8)
    expected = reference_logits(weights, config, tokens)
    a, b = model.new_session(), model.new_session()
    a.forward(tokens[:690])
    b.forward(tokens[:600])
    steps = np.stack([a.forward([t]) for t in tokens[690:695]])
    assert relative_error(steps, expected[690:695]) < 1e-4
    for i in range(5):
        both = decode_batch([a, b], [tokens[695 + i], tokens[600 + i]])
        assert relative_error(both[0], expected[695 + i]) < 1e-4
        assert relative_error(both[1], expected[600 + i]) < 1e-4


def test_truncate_then_forward_equals_fresh(tiny):
    model, _, _ = tiny()
    session = model.new_session()
    session.forward(PROMPT)
    session.truncate(5)
    assert session.n_past == 5
    again = session.forward([9, 8, 7], logits_all=True)
    fresh = model.new_session().forward(PROMPT[:5] + [9, 8, 7], logits_all=True)[5:]
    assert relative_error(again, fresh) < 1e-6
    session.reset()
    assert session.n_past == 0
    assert relative_error(session.forward(PROMPT), model.new_session().forward(PROMPT)) < 1e-6


@pytest.mark.parametrize("kind", ["dense", "rtn"])
def test_decode_batch_equals_sequential(tiny, kind, monkeypatch):
    # rtn's single-token kernel quantizes activations to int8 by default while batches run in
    # f32; compare like with like (the env var is read when the model is opened).
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", "f32")
    model, _, _ = tiny(kind=kind)
    prompts = [PROMPT[:3], random_tokens(9, seed=5), PROMPT, [77]]
    steps = [random_tokens(4, seed=10 + i) for i in range(len(prompts))]

    sequential = []
    for prompt, continuation in zip(prompts, steps):
        session = model.new_session()
        session.forward(prompt)
        sequential.append(np.stack([session.forward([t]) for t in continuation]))
    sequential = np.stack(sequential, axis=1)  # [step, session, vocab]

    sessions = [model.new_session() for _ in prompts]
    for session, prompt in zip(sessions, prompts):
        session.forward(prompt)
    for step in range(4):
        batched = decode_batch(sessions, [s[step] for s in steps])
        assert batched.shape == (len(prompts), 128)
        assert relative_error(batched, sequential[step]) < 1e-5
    assert [s.n_past for s in sessions] == [len(p) + 4 for p in prompts]


def test_sessions_are_independent(tiny):
    model, weights, config = tiny()
    a, b = model.new_session(), model.new_session()
    a.forward(PROMPT[:4])
    b.forward([1, 2, 3])
    a_logits = a.forward(PROMPT[4:], logits_all=True)
    assert relative_error(a_logits, reference_logits(weights, config, PROMPT)[4:]) < 1e-4


def test_context_can_be_filled_exactly(tiny):
    model, weights, config = tiny(max_position_embeddings=16)
    session = model.new_session()
    assert session.n_ctx == 16
    tokens = random_tokens(16, seed=6)
    session.forward(tokens[:10])
    logits = session.forward(tokens[10:], logits_all=True)
    assert session.n_past == 16
    assert relative_error(logits, reference_logits(weights, config, tokens)[10:]) < 1e-4


def test_threads_give_the_same_logits(tmp_path):
    path = tmp_path / "tiny.pumice"
    write_tiny_llama(path)
    results = []
    for n_threads in (1, 2, 3):
        with NativeModel(path, n_threads=n_threads) as model:
            results.append(model.new_session().forward(PROMPT, logits_all=True))
    assert relative_error(results[1], results[0]) < 1e-6
    assert relative_error(results[2], results[0]) < 1e-6


def test_model_info(tiny):
    model, weights, config = tiny()
    info = model.info
    assert (info["vocab_size"], info["hidden_size"], info["intermediate_size"]) == (128, 64, 160)
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (2, 4, 2, 16)
    assert info["max_context"] == config["max_position_embeddings"]
    assert info["n_params"] == sum(w.numel() for w in weights.values() if w.dim() == 2)
    assert info["weight_bytes"] == 4 * sum(w.numel() for w in weights.values())


def test_linear_apply_and_dequantize_on_a_llama_file(tiny, monkeypatch):
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", "f32")  # exact products (see decode_batch test)
    model, weights, _ = tiny(kind="rtn")
    name = "model.layers.1.mlp.down_proj.weight"
    w = weights[name].numpy()
    assert np.abs(model.dequantize(name) - w).max() < 1e-6
    x = np.random.default_rng(0).standard_normal((3, w.shape[1])).astype(np.float32)
    assert relative_error(model.linear_apply(name, x), x.astype(np.float64) @ w.T) < 1e-5
    norm = model.dequantize("model.norm.weight")
    assert np.array_equal(norm, weights["model.norm.weight"].numpy().astype(np.float32))
