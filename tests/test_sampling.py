"""SamplingParams validation and the numpy Sampler, against direct probability computations."""
from __future__ import annotations

import numpy as np
import pytest

from pumice.runtime.sampling import Sampler, SamplingParams, log_softmax, stop_token_set

VOCAB = 64


def random_logits(seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, vocab).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def frequencies(params: SamplingParams, logits: np.ndarray, draws: int = 6000) -> np.ndarray:
    sampler = Sampler(params, logits.size)
    counts = np.zeros(logits.size)
    for _ in range(draws):
        token, _ = sampler.sample(logits)
        counts[token] += 1
    return counts / draws


@pytest.mark.parametrize("changes, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"seed": "x"}, "seed"),
    ({"top_k": 1.5}, "top_k"),
])
def test_invalid_params_are_rejected_with_the_parameter_named(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**changes)


def test_from_kwargs_rejects_unknown_names_and_applies_defaults():
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_kwargs(temprature=0.5)
    params = SamplingParams.from_kwargs({"temperature": 0.6, "top_p": 0.9}, top_p=0.5, stop="END")
    assert params.temperature == 0.6 and params.top_p == 0.5 and params.stop == ["END"]


def test_greedy_is_argmax_and_ignores_the_seed():
    logits = random_logits()
    for seed in (None, 1, 2):
        token, info = Sampler(SamplingParams(temperature=0, seed=seed), VOCAB).sample(logits)
        assert token == int(np.argmax(logits)) and info is None


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(1)
    params = SamplingParams(temperature=1.5, seed=1234)

    def draw(p):
        sampler = Sampler(p, VOCAB)
        return [sampler.sample(logits)[0] for _ in range(50)]

    assert draw(params) == draw(params)
    assert draw(params) != draw(params.replace(seed=4321))


def test_frequencies_follow_the_tempered_softmax():
    logits = random_logits(2, vocab=16)
    for temperature in (0.7, 1.0, 2.0):
        observed = frequencies(SamplingParams(temperature=temperature, seed=7), logits)
        expected = softmax(logits / temperature)
        assert np.abs(observed - expected).max() < 0.03, temperature


def test_top_k_keeps_the_k_most_likely_renormalised():
    logits = random_logits(3, vocab=16)
    observed = frequencies(SamplingParams(top_k=3, seed=3), logits)
    best = np.argsort(-logits)[:3]
    assert set(np.flatnonzero(observed)) <= set(best.tolist())
    expected = np.zeros(16)
    expected[best] = softmax(logits[best])
    assert np.abs(observed - expected).max() < 0.03


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    observed = frequencies(SamplingParams(top_p=0.75, seed=4), logits)
    # 0.5 < 0.75 <= 0.8: the first two tokens survive, renormalised to 0.625 / 0.375.
    assert observed[2] == 0 and observed[3] == 0
    assert abs(observed[0] - 0.625) < 0.03
    # A tiny top_p is greedy.
    token, _ = Sampler(SamplingParams(top_p=1e-6, seed=1), 4).sample(logits)
    assert token == 0


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    observed = frequencies(SamplingParams(min_p=0.25, seed=5), logits, draws=3000)
    # threshold 0.125: tokens 0, 1, 2 survive.
    assert observed[3] == 0 and observed[2] > 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), 4, prompt_ids=[1])
    penalised = sampler.apply_penalties(logits, generated_ids=[0])
    np.testing.assert_allclose(penalised, [1.0, -4.0, 1.0, 0.5])
    # Token 0 (2.0 -> 1.0) now ties with token 2; argmax picks the first.
    assert sampler.sample(logits, [0])[0] == 0
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=3.0), 4)
    assert sampler.sample(logits, [0])[0] == 2


def test_presence_and_frequency_penalties_use_output_counts():
    logits = np.zeros(4, dtype=np.float32)
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 4, prompt_ids=[3])
    penalised = sampler.apply_penalties(logits, generated_ids=[0, 0, 1])
    np.testing.assert_allclose(penalised, [-1.0, -0.75, 0.0, 0.0])
    # Counts are incremental, but a shorter history restarts them.
    np.testing.assert_allclose(sampler.apply_penalties(logits, [0, 0, 1, 1]), [-1.0, -1.0, 0, 0])
    np.testing.assert_allclose(sampler.apply_penalties(logits, [2]), [0, 0, -0.75, 0])


def test_logprobs_are_the_models_log_softmax():
    logits = random_logits(6)
    token, info = Sampler(SamplingParams(temperature=0.5, seed=0, logprobs=5), VOCAB).sample(logits)
    reference = log_softmax(logits)
    assert info.token_id == token
    assert info.logprob == pytest.approx(reference[token], abs=1e-9)
    assert [t for t, _ in info.top] == list(np.argsort(-reference)[:5])
    np.testing.assert_allclose([lp for _, lp in info.top], np.sort(reference)[::-1][:5])
    _, info = Sampler(SamplingParams(logprobs=0), VOCAB).sample(logits)
    assert info.top == []


def test_wrong_logits_shape_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        Sampler(SamplingParams(), VOCAB).sample(np.zeros(VOCAB + 1, dtype=np.float32))


def test_stop_token_set_honours_ignore_eos():
    assert stop_token_set(SamplingParams(stop_token_ids=[7]), [2, 3]) == {2, 3, 7}
    assert stop_token_set(SamplingParams(stop_token_ids=[7], ignore_eos=True), [2, 3]) == {7}


@pytest.mark.parametrize("options", [
    {"top_k": 50}, {"top_p": 0.8}, {"top_k": 100, "top_p": 0.9}, {"min_p": 0.05},
    {"top_k": 30, "min_p": 0.2}, {"top_p": 0.5, "min_p": 0.01},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_truncation_on_a_large_vocabulary_matches_a_full_sort(options):
    # The sampler narrows a large vocabulary to likely tokens before truncating; the kept set
    # must be exactly the one a plain full sort gives.
    vocab = 5000
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 1, vocab).astype(np.float32)
    logits[rng.choice(vocab, 40, replace=False)] += rng.uniform(3, 8, 40).astype(np.float32)
    params = SamplingParams(temperature=0.9, seed=1, **options)
    probs = softmax(logits / 0.9)
    order = np.argsort(-probs, kind="stable")
    kept = order if not params.top_k else order[:params.top_k]
    sorted_probs = probs[kept] / probs[kept].sum()
    if params.top_p < 1:
        kept = kept[:np.searchsorted(np.cumsum(sorted_probs), params.top_p) + 1]
    if params.min_p:
        kept = kept[probs[kept] >= params.min_p * probs[kept].max()]
    expected = np.zeros(vocab)
    expected[kept] = probs[kept] / probs[kept].sum()
    observed = frequencies(params, logits, draws=2000)
    assert set(np.flatnonzero(observed)) <= set(kept.tolist())
    assert np.abs(observed - expected).max() < 0.05


def test_penalties_follow_new_tokens_incrementally():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, VOCAB).astype(np.float32)
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
    sampler = Sampler(params, VOCAB, prompt_ids=[3, 3, 9])
    generated: list[int] = []
    for step in range(30):
        generated.append(int(rng.integers(0, VOCAB)))
        ours = sampler.apply_penalties(logits, generated)
        reference = logits.astype(np.float64).copy()
        seen = sorted(set(generated) | {3, 9})
        reference[seen] = np.where(reference[seen] > 0, reference[seen] / 1.3, reference[seen] * 1.3)
        counts = np.bincount(generated, minlength=VOCAB)
        reference -= 0.2 * counts + 0.4 * (counts > 0)
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
