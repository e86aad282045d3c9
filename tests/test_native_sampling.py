"""The runtime's sampler (pumice_sample_logits / pumice_forward_sample / pumice_decode_batch_sample).

Checked three ways: token for token against a Python model of the documented rules (integer
masses, Philox4x32-10 keyed by (seed, position)); statistically against exact probabilities
(chi-square over many draws from fixed logits, support of top-k/top-p/min-p exactly right); and
end to end (Generator and the server engine reproduce a seed whatever the batching). The CUDA
section (skipped without a GPU) checks that the device kernel picks the host's tokens.
"""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from scipy import stats

from pumice import Generator, SamplingParams
from pumice.runtime import sampling as sampling_module
from pumice.runtime.native import (InvalidArgumentError, NativeModel, NativeSampling, decode_batch_sample,
                                   load_library)

from cuda_support import cuda_unavailable_reason
from tiny_model import write_tiny_llama

M32 = 0xFFFFFFFF
CUT = np.float32(-27.8)


# ---- a Python model of the rules (docs/RUNTIME.md, "Native sampling") -----------------------


def philox4x32_10(counter, key):
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def draw_bits(seed: int, position: int) -> int:
    c = philox4x32_10([position & M32, position >> 32, 0x73616D70, 0], [seed & M32, (seed >> 32) & M32])
    return (c[0] << 32) | c[1]


def reference_token(logits, s: NativeSampling, position: int) -> int:
    x = np.asarray(logits, dtype=np.float32).copy()
    x[np.isnan(x)] = -np.inf
    x[x == 0] = 0.0
    best = int(np.argmax(x))
    if s.temperature == 0:
        return best
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        inv_t = np.float32(1.0) / np.float32(s.temperature)
        if not (np.isfinite(x[best]) and np.isfinite(inv_t)):
            return best
        lw = (x - x[best]) * inv_t
    cand = np.flatnonzero(lw >= CUT)
    w = {int(i): np.float32(np.exp(np.float64(lw[i]))) for i in cand}
    q = {i: int(w[i] * np.float32(2.0 ** 40)) for i in w}
    order = sorted(w, key=lambda i: (-float(x[i]), i))
    vocab = x.size
    use_top_k = 0 < s.top_k < vocab and s.top_k < len(order)
    n_k = s.top_k if use_top_k else len(order)
    last = n_k - 1
    if s.top_p < 1:
        total = sum(q[i] for i in order[:n_k])
        need = min(max(math.ceil(float(np.float32(s.top_p)) * float(total)), 1), total)
        cumulative = 0
        for j, i in enumerate(order[:n_k]):
            cumulative += q[i]
            if cumulative >= need:
                last = j
                break
    kept = set(order[:last + 1]) if (use_top_k or s.top_p < 1) else set(order)
    kept = [i for i in sorted(kept) if w[i] >= np.float32(s.min_p)]
    total = sum(q[i] for i in kept)
    offset = (draw_bits(s.seed, position) * total) >> 64
    for i in kept:
        if offset < q[i]:
            return i
        offset -= q[i]
    raise AssertionError("offset beyond the total")


def exact_probabilities(logits, s: NativeSampling) -> np.ndarray:
    """float64 probabilities the rules define (the 2^-40 mass floor is negligible here)."""
    x = np.asarray(logits, dtype=np.float64)
    weights = np.exp((x - x.max()) / s.temperature)
    order = sorted(range(x.size), key=lambda i: (-x[i], i))
    keep = order[:s.top_k] if 0 < s.top_k < x.size else order
    if s.top_p < 1:
        mass = weights[keep].sum()
        cumulative = np.cumsum(weights[keep])
        keep = keep[:int(np.searchsorted(cumulative, s.top_p * mass * (1 - 1e-12), side="left")) + 1]
    keep = [i for i in keep if weights[i] >= s.min_p]
    p = np.zeros(x.size)
    p[keep] = weights[keep]
    return p / p.sum()


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("native-sampling") / "tiny.pumice"
    write_tiny_llama(path, seed=11, max_position_embeddings=256)
    return path


@pytest.fixture(scope="module")
def model(tiny_path):
    with NativeModel(tiny_path, n_threads=1) as m:
        yield m


def _draws(model, logits, s: NativeSampling, n: int) -> np.ndarray:
    rows = np.broadcast_to(np.asarray(logits, dtype=np.float32), (n, model.vocab_size))
    return model.sample_logits(rows, s, np.arange(n))


def _peaked_logits(vocab: int, rng, n_live: int = 8) -> np.ndarray:
    """A few plausible tokens; the rest far below (mass 0 under the 2^-40 rule)."""
    logits = np.full(vocab, -60.0, dtype=np.float32)
    live = rng.choice(vocab, n_live, replace=False)
    logits[live] = rng.normal(0, 1.2, n_live).astype(np.float32)
    return logits


# ---- the rules, token for token -------------------------------------------------------------

SETTINGS = [
    NativeSampling(temperature=1.0),
    NativeSampling(temperature=0.7, top_k=5),
    NativeSampling(temperature=1.3, top_p=0.9),
    NativeSampling(temperature=0.8, min_p=0.05),
    NativeSampling(temperature=1.0, top_k=40, top_p=0.95, min_p=0.02),
    NativeSampling(temperature=2.0, top_k=1),
    NativeSampling(temperature=0.5, top_p=0.3),
    NativeSampling(temperature=1.0, top_k=500),  # >= vocab: off
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}")
def test_matches_the_python_model_of_the_rules(model, setting):
    rng = np.random.default_rng(1)
    vocab = model.vocab_size
    rows = rng.normal(0, 3, (60, vocab)).astype(np.float32)
    rows[::7, :20] = rows[::7, :1]  # exact ties in the head
    rows[1::9, 5] = np.nan
    rows[2::9, :] = np.round(rows[2::9, :])  # many ties everywhere
    seeds = rng.integers(0, 2**63, 60)
    params = [NativeSampling(setting.temperature, setting.top_k, setting.top_p, setting.min_p, int(seed))
              for seed in seeds]
    positions = rng.integers(0, 2**40, 60)
    got = model.sample_logits(rows, params, positions)
    expected = [reference_token(row, p, int(pos)) for row, p, pos in zip(rows, params, positions)]
    assert got.tolist() == expected


def test_greedy_is_argmax_with_ties_to_the_lower_id(model):
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(50, model.vocab_size)).astype(np.float32)
    rows[:10, 30] = rows[:10, 70] = 50.0
    rows[10:20, 3] = np.nan  # NaN never wins
    got = model.sample_logits(rows, NativeSampling.greedy(), 0)
    clean = np.where(np.isnan(rows), -np.inf, rows)
    assert got.tolist() == np.argmax(clean, axis=1).tolist()
    assert (got[:10] == 30).all()


# ---- statistics against exact probabilities -------------------------------------------------

STAT_SETTINGS = [
    NativeSampling(temperature=1.0, seed=3),
    NativeSampling(temperature=0.6, seed=4),
    NativeSampling(temperature=1.0, top_k=3, seed=5),
    NativeSampling(temperature=1.0, top_p=0.7, seed=6),
    NativeSampling(temperature=1.5, min_p=0.2, seed=7),
    NativeSampling(temperature=1.2, top_k=6, top_p=0.9, min_p=0.05, seed=8),
]


@pytest.mark.parametrize("setting", STAT_SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}")
def test_frequencies_follow_the_exact_probabilities(model, setting):
    rng = np.random.default_rng(setting.seed)
    logits = _peaked_logits(model.vocab_size, rng)
    p = exact_probabilities(logits, setting)
    n = 20000
    counts = np.bincount(_draws(model, logits, setting, n), minlength=model.vocab_size)
    support = p > 0
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(support))  # never outside the kept set
    if support.sum() > 1:
        result = stats.chisquare(counts[support], n * p[support])
        assert result.pvalue > 1e-4, (counts[support], n * p[support])
    total_variation = 0.5 * np.abs(counts / n - p).sum()
    assert total_variation < 0.02


def test_truncation_supports_are_exact(model):
    vocab = model.vocab_size
    logits = np.full(vocab, -50.0, dtype=np.float32)
    # probabilities 0.4, 0.2, 0.2 (a tie: ids 7 and 9), 0.1, 0.1
    logits[[12, 9, 7, 40, 41]] = np.log([0.4, 0.2, 0.2, 0.1, 0.1]).astype(np.float32)
    n = 4000

    def support(**kw):
        return set(np.flatnonzero(np.bincount(_draws(model, logits, NativeSampling(seed=1, **kw), n))))

    assert support(top_k=1) == {12}
    assert support(top_k=2) == {12, 7}          # the tie goes to the lower id
    assert support(top_k=3) == {12, 7, 9}
    assert support(top_p=0.39) == {12}
    assert support(top_p=0.41) == {12, 7}
    assert support(top_p=0.75) == {12, 7, 9}
    assert support(top_p=0.85) == {12, 7, 9, 40}
    assert support(min_p=0.5) == {12, 7, 9}     # 0.2 / 0.4 = 0.5 is kept
    assert support(min_p=0.51) == {12}
    assert support(top_k=4, top_p=0.5, min_p=0.0) == {12, 7}  # top-p of the top-4's mass (0.9)


# ---- randomness: keyed by (seed, position) ------------------------------------------------------


def test_same_seed_and_position_same_token_whatever_the_batch(model):
    rng = np.random.default_rng(9)
    rows = rng.normal(0, 2, (16, model.vocab_size)).astype(np.float32)
    params = [NativeSampling(0.9, 0, 1.0, 0.0, seed) for seed in range(100, 116)]
    positions = np.arange(16) * 3
    together = model.sample_logits(rows, params, positions)
    alone = [int(model.sample_logits(rows[i:i + 1], params[i], positions[i])[0]) for i in range(16)]
    reverse = model.sample_logits(rows[::-1], params[::-1], positions[::-1])[::-1]
    assert together.tolist() == alone == reverse.tolist()


def test_seed_and_position_change_the_draw(model):
    logits = np.zeros(model.vocab_size, dtype=np.float32)  # uniform
    by_position = _draws(model, logits, NativeSampling(seed=5), 200)
    assert len(set(by_position.tolist())) > 50
    by_seed = [int(model.sample_logits(logits, NativeSampling(seed=s), 7)[0]) for s in range(200)]
    assert len(set(by_seed)) > 50
    # seeds are 64-bit: the high word matters
    assert (model.sample_logits(np.tile(logits, (50, 1)), NativeSampling(seed=2**40), np.arange(50)).tolist()
            != model.sample_logits(np.tile(logits, (50, 1)), NativeSampling(seed=0), np.arange(50)).tolist())


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, message", [
    (NativeSampling(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (NativeSampling(temperature=-0.5), "temperature must be a finite number >= 0"),
    (NativeSampling(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (NativeSampling(top_k=-1), "top_k must be >= 0"),
    (NativeSampling(top_p=0.0), "top_p must be in (0, 1]"),
    (NativeSampling(top_p=1.5), "top_p must be in (0, 1]"),
    (NativeSampling(top_p=float("nan")), "top_p must be in (0, 1]"),
    (NativeSampling(min_p=-0.1), "min_p must be in [0, 1]"),
    (NativeSampling(min_p=1.01), "min_p must be in [0, 1]"),
    (NativeSampling(min_p=float("nan")), "min_p must be in [0, 1]"),
])
def test_bad_parameters_are_invalid_arguments(model, tiny_path, setting, message):
    logits = np.zeros((2, model.vocab_size), dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match=r"params\[1\]\." + message.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        model.sample_logits(logits, [NativeSampling(), setting], 0)
    session = model.new_session(16)
    with pytest.raises(InvalidArgumentError, match="params"):
        session.forward_sample([1, 2], setting)
    assert session.n_past == 0  # nothing ran
    other = model.new_session(16)
    with pytest.raises(InvalidArgumentError, match=r"params\[0\]"):
        decode_batch_sample([session, other], [1, 2], [setting, NativeSampling()])
    assert session.n_past == other.n_past == 0


def test_bad_positions_and_shapes(model):
    logits = np.zeros((1, model.vocab_size), dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match="positions"):
        model.sample_logits(logits, NativeSampling(), -1)
    with pytest.raises(InvalidArgumentError, match="columns"):
        model.sample_logits(np.zeros((1, 3), dtype=np.float32), NativeSampling(), 0)
    with pytest.raises(InvalidArgumentError, match="sampling parameters"):
        model.sample_logits(np.zeros((2, model.vocab_size)), [NativeSampling()] * 3, 0)


def test_c_abi_rejects_null_params(model):
    library = load_library("cpu")
    ffi = library.ffi
    logits = np.zeros(model.vocab_size, dtype=np.float32)
    positions = np.zeros(1, dtype=np.int64)
    out = np.zeros(1, dtype=np.int32)
    status = library.lib.pumice_sample_logits(model._handle(), ffi.from_buffer("float[]", logits), 1, ffi.NULL,
                                              ffi.from_buffer("int64_t[]", positions),
                                              ffi.from_buffer("int32_t[]", out, require_writable=True))
    assert status == 4 and "params is NULL" in library.last_error()


# ---- the stepping calls ---------------------------------------------------------------------


def test_forward_and_decode_sample_draw_from_their_own_logits(model):
    a, b = model.new_session(64), model.new_session(64)
    sa, sb = NativeSampling(0.9, 10, 0.95, 0.0, 21), NativeSampling(1.1, 0, 1.0, 0.01, 22)
    ta, la = a.forward_sample([1, 5, 9, 14], sa, return_logits=True)
    tb, lb = b.forward_sample([3, 3], sb, return_logits=True)
    assert a.n_past == 4 and b.n_past == 2
    assert ta == int(model.sample_logits(la, sa, 4)[0])  # position = n_past after the call
    assert tb == int(model.sample_logits(lb, sb, 2)[0])
    for _ in range(5):
        ids, logits = decode_batch_sample([a, b], [ta, tb], [sa, sb], return_logits=True)
        assert ids.tolist() == model.sample_logits(logits, [sa, sb], [a.n_past, b.n_past]).tolist()
        plain = decode_batch_sample([a, b], ids.tolist(), [sa, sb])  # without logits: same rules
        ta, tb = (int(t) for t in plain)
    assert a.n_past == 14 and b.n_past == 12


# ---- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    from test_generator import add_tokenizer
    folder = tmp_path_factory.mktemp("native-sampling-generator")
    write_tiny_llama(folder / "bare.pumice", seed=3, max_position_embeddings=256)
    add_tokenizer(folder / "bare.pumice", folder / "tiny.pumice")
    return folder / "tiny.pumice"


def test_generator_is_reproducible_per_seed_streamed_or_not(generator_file, monkeypatch):
    monkeypatch.setenv("PUMICE_NATIVE_SAMPLING", "1")  # on the CPU too
    with Generator(generator_file, n_threads=1) as g:
        params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
        first = g.generate("abc", params=params)
        again = g.generate("abc", params=params)  # (reuses the cached prompt)
        streamed = "".join(g.stream("abc", params=params))
        other = g.generate("abc", params=params.replace(seed=1235))
        assert first.token_ids == again.token_ids and first.text == streamed
        assert other.token_ids != first.token_ids
        # The runtime drew these: replay them with the sampler on the logits, by position.
        sampling = sampling_module.native_sampling(params)
        session = g.model.new_session(64)
        prompt = first.prompt_token_ids
        logits = session.forward(prompt)
        for token in first.token_ids:
            assert token == int(g.model.sample_logits(logits, sampling, session.n_past)[0])
            logits = session.forward([token])


def test_generator_greedy_is_unchanged_by_native_sampling(generator_file, monkeypatch):
    monkeypatch.setenv("PUMICE_NATIVE_SAMPLING", "1")
    with Generator(generator_file, n_threads=1) as g:
        native = g.generate("hello", max_tokens=20, temperature=0, ignore_eos=True)
        monkeypatch.setattr("pumice.runtime.generator.native_sampling", lambda params: None)
        host = g.generate("hello", max_tokens=20, temperature=0, ignore_eos=True)
        assert native.token_ids == host.token_ids


def test_native_sampling_only_when_the_request_allows_it():
    assert sampling_module.native_sampling(SamplingParams(temperature=0.7, seed=1)) is not None
    for blocker in (dict(logprobs=0), dict(repetition_penalty=1.1), dict(presence_penalty=0.5),
                    dict(frequency_penalty=0.1)):
        assert sampling_module.native_sampling(SamplingParams(seed=1, **blocker)) is None
    unseeded = {sampling_module.native_sampling(SamplingParams()).seed for _ in range(4)}
    assert len(unseeded) == 4  # a random seed per request
    assert sampling_module.native_sampling(SamplingParams(top_k=-5)).top_k == 0


def test_engine_batches_reproduce_a_seed(generator_file, monkeypatch):
    pytest.importorskip("fastapi", reason="the server's dependencies are not installed")
    monkeypatch.setenv("PUMICE_NATIVE_SAMPLING", "1")
    from pumice.server.model import ServedModel
    from pumice.server.scheduler import Delta, Engine, GenerationSpec

    served = ServedModel(generator_file, n_threads=1)
    engine = Engine(served, max_batch=4).start()
    try:
        prompt = served.encode("abc")
        params = SamplingParams(max_tokens=16, temperature=0.9, seed=77, ignore_eos=True)

        def run(specs_list):
            async def one(specs):
                texts: dict[int, str] = {}
                async for event in engine.submit(specs).events():
                    if isinstance(event, Delta):
                        texts[event.choice] = texts.get(event.choice, "") + event.text
                return texts

            async def main():
                return await asyncio.gather(*(one(s) for s in specs_list))
            return asyncio.run(main())

        alone = run([[GenerationSpec(prompt, params)]])[0][0]
        crowd = run([[GenerationSpec(prompt, params)],
                     [GenerationSpec(served.encode("xyz"), params.replace(seed=5))],
                     [GenerationSpec(prompt, params, n=2)]])
        assert crowd[0][0] == alone and crowd[2][0] == alone  # choice 0 has seed 77
        with Generator(generator_file, n_threads=1) as g:
            assert g.generate(prompt, params=params).text == alone
    finally:
        engine.stop()
        served.close()


# ---- CUDA: the device kernel picks the host's tokens ------------------------------------------




# head_dim 64 (the CUDA attention's), a vocabulary above the kernel's 4096 candidates so that
# flat rows take the host path.
CUDA_SAMPLING_TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          intermediate_size=344, vocab_size=6000, max_position_embeddings=256)


@pytest.fixture(scope="module")
def cuda_pair(tmp_path_factory):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("native-sampling-cuda") / "tiny.pumice"
    write_tiny_llama(path, dtype="f16", seed=5, **CUDA_SAMPLING_TINY)
    with NativeModel(path, device="cuda") as gpu, NativeModel(path, n_threads=2) as cpu:
        yield gpu, cpu


CUDA_SETTINGS = SETTINGS + [NativeSampling(temperature=0.0), NativeSampling(temperature=1.0, top_k=3000),
                            NativeSampling(temperature=1.0, top_k=7000, top_p=0.99)]


@pytest.mark.cuda
@pytest.mark.parametrize("setting", CUDA_SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}")
def test_cuda_sampler_picks_the_host_tokens(cuda_pair, setting):
    gpu, cpu = cuda_pair
    rng = np.random.default_rng(3)
    vocab = gpu.vocab_size
    peaked = rng.normal(0, 1, (24, vocab)).astype(np.float32) * 6  # few candidates: the kernel ranks them
    flat = rng.normal(0, 0.5, (8, vocab)).astype(np.float32)         # 6000 candidates: the host path
    ties = np.round(rng.normal(0, 2, (8, vocab))).astype(np.float32)
    nan_rows = rng.normal(0, 3, (4, vocab)).astype(np.float32)
    nan_rows[:, ::97] = np.nan
    rows = np.concatenate([peaked, flat, ties, nan_rows])
    params = [NativeSampling(setting.temperature, setting.top_k, setting.top_p, setting.min_p, 1000 + i)
              for i in range(rows.shape[0])]
    positions = rng.integers(0, 2**33, rows.shape[0])
    on_gpu = gpu.sample_logits(rows, params, positions)
    on_cpu = cpu.sample_logits(rows, params, positions)
    assert on_gpu.tolist() == on_cpu.tolist()


@pytest.mark.cuda
def test_cuda_sampler_statistics(cuda_pair):
    gpu, _ = cuda_pair
    rng = np.random.default_rng(4)
    setting = NativeSampling(temperature=1.0, top_k=6, top_p=0.9, seed=12)
    logits = _peaked_logits(gpu.vocab_size, rng)
    p = exact_probabilities(logits, setting)
    n = 20000
    counts = np.bincount(_draws(gpu, logits, setting, n), minlength=gpu.vocab_size)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(p))
    assert stats.chisquare(counts[p > 0], n * p[p > 0]).pvalue > 1e-4


@pytest.mark.cuda
def test_cuda_stepping_calls_sample_their_own_logits(cuda_pair):
    gpu, _ = cuda_pair
    sampling = [NativeSampling(0.8, 50, 0.9, 0.0, 31), NativeSampling(1.0, 0, 1.0, 0.0, 32),
                NativeSampling(0.0)]
    sessions = [gpu.new_session(128) for _ in sampling]
    prompts = [[1, 2, 3], list(range(10, 40)), [7]]  # a step-sized prompt, a long one, one token
    tokens = []
    for session, prompt, s in zip(sessions, prompts, sampling):
        token, logits = session.forward_sample(prompt, s, return_logits=True)
        assert token == int(gpu.sample_logits(logits, s, session.n_past)[0])
        assert session.forward_sample([token], s) >= 0  # the decode path without logits
        tokens.append(int(session.forward_sample([token], s)))
    for _ in range(4):
        ids, logits = decode_batch_sample(sessions, tokens, sampling, return_logits=True)
        assert ids.tolist() == gpu.sample_logits(logits, sampling, [s.n_past for s in sessions]).tolist()
        tokens = [int(t) for t in decode_batch_sample(sessions, ids.tolist(), sampling)]
