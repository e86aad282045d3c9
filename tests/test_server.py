"""`pumice serve`: the OpenAI-compatible server.

Two parts:

- The engine and routes on a tiny deterministic stand-in model (fast; checks batching, stop
  strings, cancellation, the queue bound and the response shapes precisely).
- The real server (a subprocess of `python -m pumice.server`, one for the whole module) on
  SmolLM2-135M-Instruct, driven by the official `openai` client and raw httpx.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pumice.server.metrics import parse_metrics
from pumice.server.protocol import APIError
from pumice.server.scheduler import Delta, Engine, Finished, GenerationSpec
from pumice.runtime.sampling import SamplingParams

# ============================================================================================
# A stand-in model: token t is the character ALPHABET[t]; after token t the model is sure the
# next token is t + 1 (wrapping, skipping 0), except that "!" is followed by EOS (id 0).

ALPHABET = "\0abcdefghijklmnopqrstuvwxyz .,!?XYZ"


class _FakeSession:
    def __init__(self, model):
        self.model = model
        self.tokens: list[int] = []

    def forward(self, tokens):
        if len(self.tokens) + len(tokens) > self.model.n_ctx:
            raise RuntimeError("context full")
        self.tokens += list(tokens)
        self.model.forward_sizes.append(len(tokens))
        time.sleep(self.model.delay)
        return self.model.logits_after(self.tokens)

    def truncate(self, n):
        del self.tokens[n:]

    def close(self):
        pass


class _FakeDecoder:
    def add(self, token):
        return ALPHABET[token]

    def flush(self):
        return ""


class FakeModel:
    vocab_size = len(ALPHABET)
    eos_token_ids = frozenset({0})
    sampling_defaults: dict = {}

    def __init__(self, n_ctx=128, delay=0.0):
        self.n_ctx = n_ctx
        self.delay = delay
        self.batch_sizes: list[int] = []
        self.forward_sizes: list[int] = []
        self.sessions: list[_FakeSession] = []

    def logits_after(self, tokens):
        logits = np.zeros(self.vocab_size, np.float32)
        last = tokens[-1]
        logits[0 if ALPHABET[last] == "!" else last % (self.vocab_size - 1) + 1] = 8.0
        return logits

    def new_session(self):
        self.sessions.append(_FakeSession(self))
        return self.sessions[-1]

    def decode_batch(self, sessions, tokens):
        self.batch_sizes.append(len(sessions))
        time.sleep(self.delay)
        rows = []
        for session, token in zip(sessions, tokens):
            session.tokens.append(token)
            rows.append(self.logits_after(session.tokens))
        return np.stack(rows)

    def new_stream_decoder(self, prompt):
        return _FakeDecoder()

    def token_text(self, token):
        return ALPHABET[token]

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids)

    def chat_prompt_tokens(self, messages):
        return self.encode("".join(m["content"] for m in messages))


def _greedy(max_tokens=None, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def _run_engine(engine, specs_list):
    """Submit several requests at once; returns, per request, (texts per choice, finishes)."""
    async def one(specs):
        handle = engine.submit(specs)
        texts: dict[int, str] = {}
        finishes: dict[int, Finished] = {}
        async for event in handle.events():
            if isinstance(event, Delta):
                texts[event.choice] = texts.get(event.choice, "") + event.text
            else:
                finishes[event.choice] = event
        return texts, finishes

    async def main():
        return await asyncio.gather(*(one(specs) for specs in specs_list),
                                    return_exceptions=True)
    return asyncio.run(main())


@pytest.fixture
def fake_engine():
    engines = []

    def make(**kw):
        model_kw = {k: kw.pop(k) for k in ("n_ctx", "delay") if k in kw}
        engine = Engine(FakeModel(**model_kw), **kw).start()
        engines.append(engine)
        return engine
    yield make
    for engine in engines:
        engine.stop()


def _prompt(text):
    return [ALPHABET.index(c) for c in text]


def test_engine_greedy_and_length(fake_engine):
    engine = fake_engine()
    [(texts, finishes)] = _run_engine(engine, [[GenerationSpec(_prompt("abc"), _greedy(5))]])
    assert texts[0] == "defgh"
    assert finishes[0].finish_reason == "length"
    assert (finishes[0].prompt_tokens, finishes[0].completion_tokens) == (3, 5)


def test_engine_eos_is_stop_and_not_counted(fake_engine):
    engine = fake_engine()
    [(texts, finishes)] = _run_engine(engine, [[GenerationSpec(_prompt("x"), _greedy(20))]])
    assert texts[0] == "yz .,!"
    assert finishes[0].finish_reason == "stop"
    assert finishes[0].completion_tokens == 6


@pytest.mark.parametrize("stops, expected", [
    (["fg"], "de"),                 # spans two tokens
    (["e", "xyz"], "d"),            # the earliest match wins
    (["hij", "fgh"], "de"),
    (["zzz"], "defghijklm"),        # never matches: all text is sent, nothing held back
    (["m"], "defghijkl"),           # on the last token
    (["d"], ""),                    # on the first token
])
def test_engine_stop_strings_cut_exactly(fake_engine, stops, expected):
    engine = fake_engine()
    [(texts, finishes)] = _run_engine(engine, [[GenerationSpec(_prompt("abc"),
                                                               _greedy(10, stop=stops))]])
    assert texts.get(0, "") == expected
    assert finishes[0].finish_reason == ("length" if expected == "defghijklm" else "stop")


def test_engine_stop_string_is_held_back_while_it_may_match(fake_engine):
    """A streamed delta never contains text that later turns out to start a stop string."""
    engine = fake_engine()
    sent = []

    async def main():
        handle = engine.submit([GenerationSpec(_prompt("abc"), _greedy(10, stop=["ghX"]))])
        async for event in handle.events():
            if isinstance(event, Delta):
                sent.append(event.text)
    asyncio.run(main())
    # "gh" was held back while "ghX" was possible, then released with "i".
    assert "".join(sent) == "defghijklm"
    assert all(not s.endswith("g") and not s.endswith("gh") for s in sent[:-1])


def test_engine_batches_concurrent_requests(fake_engine):
    engine = fake_engine(max_batch=4, delay=0.002)
    specs = [[GenerationSpec(_prompt(p), _greedy(12))] for p in ("abc", "klm", "uvw", "a")]
    results = _run_engine(engine, specs)
    assert [r[0][0] for r in results] == ["defghijklmno", "nopqrstuvwxy", "xyz .,!", "bcdefghijklm"]
    assert max(engine.model.batch_sizes) == 4  # all four decoded in one step at some point


def test_engine_n_choices_have_seeds_in_order(fake_engine):
    engine = fake_engine()
    spec = GenerationSpec(_prompt("abc"), SamplingParams(temperature=5.0, max_tokens=8, seed=7),
                          n=3)
    [(texts, finishes)] = _run_engine(engine, [[spec]])
    [(again, _)] = _run_engine(engine, [[spec]])
    assert sorted(texts) == [0, 1, 2] and sorted(finishes) == [0, 1, 2]
    assert texts == again  # seeded: reproducible choice by choice
    assert len(set(texts.values())) > 1  # seed + i: the choices differ


def test_engine_prefix_reuse_prefills_only_the_new_suffix(fake_engine):
    engine = fake_engine(max_batch=1)
    _run_engine(engine, [[GenerationSpec(_prompt("abcdefgh"), _greedy(2))]])
    engine.model.forward_sizes.clear()
    [(texts, _)] = _run_engine(engine, [[GenerationSpec(_prompt("abcdefxy"), _greedy(3))]])
    assert texts[0] == "z ."
    assert engine.model.forward_sizes[0] == 2  # "xy": "abcdef" stayed in the cache
    session = engine.model.sessions[0]
    assert session.tokens[:8] == _prompt("abcdefxy")


def test_engine_queue_bound_answers_429(fake_engine):
    engine = fake_engine(max_batch=1, max_queue=1, delay=0.01)

    async def main():
        first = engine.submit([GenerationSpec(_prompt("a"), _greedy(30))])
        await asyncio.sleep(0.1)  # admitted: the queue is empty again
        second = engine.submit([GenerationSpec(_prompt("a"), _greedy(30))])  # waits
        with pytest.raises(APIError) as info:
            engine.submit([GenerationSpec(_prompt("a"), _greedy(30))])
        assert info.value.status == 429
        for handle in (first, second):
            async for _ in handle.events():
                pass
    asyncio.run(main())
    assert parse_metrics(engine.metrics.render())['pumice_requests_rejected_total{reason="queue_full"}'] == 1


def test_engine_cancel_frees_the_slot_before_the_next_step(fake_engine):
    engine = fake_engine(max_batch=1, delay=0.005, n_ctx=4096)

    async def main():
        handle = engine.submit([GenerationSpec(_prompt("a"), _greedy(None, ignore_eos=True))])
        events = handle.events()
        await events.__anext__()
        await events.aclose()  # the consumer went away: the handle is cancelled
        deadline = time.monotonic() + 5
        while engine.metrics.running_sequences and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # The freed slot serves the next request at once.
        other = engine.submit([GenerationSpec(_prompt("abc"), _greedy(3))])
        return "".join([e.text async for e in other.events() if isinstance(e, Delta)])
    assert asyncio.run(main()) == "def"
    assert engine.metrics.cancelled_total == 1
    assert sum(engine.model.batch_sizes) + len(engine.model.forward_sizes) < 1000


def test_engine_failure_reaches_the_request_and_engine_survives(fake_engine):
    engine = fake_engine(n_ctx=8)
    # max_tokens beyond the context is capped, never overflowing the cache.
    [(texts, finishes)] = _run_engine(engine, [[GenerationSpec(_prompt("abc"), _greedy(None))]])
    assert finishes[0].finish_reason == "length" and len(texts[0]) == 5
    engine.model.logits_after = lambda tokens: 1 / 0
    [result] = _run_engine(engine, [[GenerationSpec(_prompt("abc"), _greedy(3))]])
    assert isinstance(result, APIError) and result.status == 500
    assert engine.alive


def test_engine_sampling_failure_fails_only_its_request(fake_engine):
    engine = fake_engine(max_batch=2)
    good = engine.model.logits_after

    def logits_after(tokens):  # a malformed row for prompts starting with "z"
        row = good(tokens)
        return np.append(row, 0.0) if tokens[0] == ALPHABET.index("z") else row
    engine.model.logits_after = logits_after
    bad, ok = _run_engine(engine, [[GenerationSpec(_prompt("zab"), _greedy(3))],
                                   [GenerationSpec(_prompt("abc"), _greedy(3))]])
    assert isinstance(bad, APIError) and bad.status == 500
    assert ok[0][0] == "def"
    assert engine.alive and engine.metrics.failed_total == 1


# -- the routes on the stand-in model (in-process, no sockets) --------------------------------


@pytest.fixture
def fake_client(fake_engine):
    from fastapi.testclient import TestClient
    from pumice.server.app import create_app
    engine = fake_engine(max_batch=2, max_queue=4, n_ctx=64)
    with TestClient(create_app(engine, "fake", api_key="k")) as client:
        client.headers["Authorization"] = "Bearer k"
        yield client


def test_routes_completion_logprobs_and_echo(fake_client):
    r = fake_client.post("/v1/completions", json={
        "model": "fake", "prompt": "abc", "max_tokens": 4, "temperature": 0, "logprobs": 2,
        "echo": False})
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "defg"
    assert choice["logprobs"]["tokens"] == list("defg")
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert all(len(t) == 2 for t in choice["logprobs"]["top_logprobs"])
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    r = fake_client.post("/v1/completions", json={"prompt": ["ab", "xy"], "max_tokens": 2,
                                                  "temperature": 0, "echo": True, "n": 2})
    assert [c["text"] for c in r.json()["choices"]] == ["abcd", "abcd", "xyz ", "xyz "]
    assert r.json()["usage"]["prompt_tokens"] == 4


def test_routes_chat_stream_shape(fake_client):
    with fake_client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "mn"}], "max_tokens": 3, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "opq"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "other", "prompt": "a"}', 404, "model"),
    (b'{"prompt": "a", "temperature": -0.5}', 400, "temperature"),
    (b'{"prompt": "a", "n": 0}', 400, "n"),
    (b'{"prompt": "a", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "a", "stop": 5}', 400, "stop"),
    (b'{"prompt": "a", "logprobs": 99}', 400, "logprobs"),
    (b'{"max_tokens": 3}', 400, "prompt"),
    (b'{"prompt": "' + b"a" * 80 + b'"}', 400, "prompt"),
    (b'{"prompt": "abc", "max_tokens": 62}', 400, "max_tokens"),
    (b'{"prompt": [1, 2, 999]}', 400, "prompt"),
])
def test_routes_errors_are_openai_error_objects(fake_client, body, status, param):
    r = fake_client.post("/v1/completions", content=body,
                         headers={"Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] == param


def test_routes_chat_errors(fake_client):
    def post(payload):
        return fake_client.post("/v1/chat/completions", json=payload)
    assert post({"messages": []}).status_code == 400
    assert post({"messages": [{"role": "wizard", "content": "x"}]}).status_code == 400
    r = post({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = post({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_routes_auth_health_metrics_and_unknown_route(fake_client):
    assert fake_client.get("/v1/models").json()["data"][0]["id"] == "fake"
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        r = fake_client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert fake_client.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}
    metrics = fake_client.get("/metrics", headers={"Authorization": ""})
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "pumice_queue_length 0" in metrics.text
    r = fake_client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert fake_client.get("/v1/models/other").status_code == 404


# ============================================================================================
# The real server on SmolLM2-135M-Instruct

API_KEY = "test-key-123"
MODEL_NAME = "smollm2"
MAX_BATCH = 4
MAX_QUEUE = 4
N_CTX = 1024
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_model_path(convert_smollm2):
    pytest.importorskip("openai")
    try:
        from pumice.runtime.native import load_library
        load_library("cpu")
    except Exception as exc:  # noqa: BLE001 — any failure means: no native runtime here
        pytest.skip(f"the native library is not available: {exc}")
    return convert_smollm2("dense")


@pytest.fixture(scope="module")
def server(served_model_path, tmp_path_factory):
    """`python -m pumice.server` on a free loopback port; yields its base URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pumice.server", str(served_model_path), "--host", "127.0.0.1",
         "--port", str(port), "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
         "--n-ctx", str(N_CTX), "--api-key", API_KEY, "--model-name", MODEL_NAME,
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    import httpx
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def generator(served_model_path):
    from pumice import Generator
    with Generator(served_model_path, n_ctx=N_CTX) as g:
        yield g


def _metrics(server) -> dict[str, float]:
    import httpx
    return parse_metrics(httpx.get(f"{server}/metrics", timeout=10).text)


def _stream_text(stream, chat=True):
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += (choice.delta.content or "") if chat else choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


@pytest.mark.slow
def test_models_and_health(server, client):
    import httpx
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


@pytest.mark.slow
def test_greedy_chat_equals_generator(client, generator):
    expected = generator.chat(QUESTION, temperature=0.0, max_tokens=40)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0,
                                           max_tokens=40)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens == len(generator.chat_prompt(QUESTION))
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.slow
def test_chat_stream_equals_non_stream_for_a_seed(client):
    kw = dict(model=MODEL_NAME, messages=QUESTION, temperature=0.9, top_p=0.95, seed=1234,
              max_tokens=32)
    reply = client.chat.completions.create(**kw)
    text, finish, usage = _stream_text(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    assert text == reply.choices[0].message.content
    assert finish == reply.choices[0].finish_reason
    assert usage.completion_tokens == reply.usage.completion_tokens
    assert usage.prompt_tokens == reply.usage.prompt_tokens


@pytest.mark.slow
def test_completion_stream_equals_non_stream_for_a_seed(client):
    kw = dict(model=MODEL_NAME, prompt="The three most important rivers of Europe are",
              temperature=0.8, seed=99, max_tokens=24, presence_penalty=0.5,
              frequency_penalty=0.3)
    reply = client.completions.create(**kw)
    text, finish, _ = _stream_text(client.completions.create(stream=True, **kw), chat=False)
    assert text == reply.choices[0].text and text
    assert finish == reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 24


@pytest.mark.slow
def test_stop_sequences_cut_exactly(client):
    kw = dict(model=MODEL_NAME, prompt="Count: one, two, three, four, five,", temperature=0,
              max_tokens=24)
    full = client.completions.create(**kw).choices[0].text
    # Stop at a string that starts in the middle of a token and at a later multi-token one.
    word = full.strip().split()[2]
    stop_a = word[1:3]
    stop_b = full[full.index(word) + len(word):][:4]
    assert stop_a and stop_b
    cut = min(i for i in (full.find(stop_a), full.find(stop_b)) if i >= 0)
    for stream in (False, True):
        if stream:
            text, finish, _ = _stream_text(client.completions.create(
                stream=True, stop=[stop_b, stop_a], **kw), chat=False)
        else:
            choice = client.completions.create(stop=[stop_b, stop_a], **kw).choices[0]
            text, finish = choice.text, choice.finish_reason
        assert text == full[:cut]
        assert finish == "stop"
    single = client.completions.create(stop=stop_b, **kw).choices[0]
    assert single.text == full[:full.find(stop_b)]


@pytest.mark.slow
def test_n_choices_and_usage(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, n=3,
                                           temperature=1.0, seed=5, max_tokens=12)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.message.content for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) > 1
    prompt_tokens = reply.usage.prompt_tokens
    again = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, n=1,
                                           temperature=0, max_tokens=1)
    assert again.usage.prompt_tokens == prompt_tokens  # counted once, not per choice
    assert again.usage.completion_tokens == 1 and again.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens <= 3 * 12


@pytest.mark.slow
def test_logprobs(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0,
                                           max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
        assert entry.top_logprobs[0].token == entry.token  # greedy: the best one was taken
    completion = client.completions.create(model=MODEL_NAME, prompt="Hello, my name is",
                                           temperature=0, max_tokens=5, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs)


@pytest.mark.slow
def test_error_cases(server, client):
    import httpx
    import openai
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = f"{server}/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "smollm2", "messages": [', headers=headers)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    for bad in ({"temperature": -1}, {"n": 0}, {"top_p": 0}, {"top_p": 1.01}, {"max_tokens": 0}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, **bad)
        assert info.value.body["param"] == next(iter(bad))
    long_prompt = [{"role": "user", "content": "hello " * (2 * N_CTX)}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=long_prompt, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "context length" in info.value.body["message"]
    for key in (None, "wrong-key"):
        r = httpx.post(url, json={"model": MODEL_NAME, "messages": QUESTION},
                       headers={} if key is None else {"Authorization": f"Bearer {key}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{server}/health").status_code == 200  # the server is unharmed


@pytest.mark.slow
def test_concurrent_requests_all_complete_and_share_batches(server, client):
    before = _metrics(server)
    prompts = [f"Write a sentence about the number {i}." for i in range(MAX_BATCH + MAX_QUEUE)]

    def ask(prompt):
        return client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], temperature=0.7,
            seed=1, max_tokens=16, extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(ask, prompts))
    assert all(r.usage.completion_tokens == 16 and r.choices[0].message.content for r in replies)
    after = _metrics(server)
    steps = after["pumice_decode_steps_total"] - before["pumice_decode_steps_total"]
    tokens = after["pumice_decode_batch_size_sum"] - before["pumice_decode_batch_size_sum"]
    assert tokens / steps > 1.5  # requests really were decoded together
    assert after["pumice_running_sequences"] == 0


@pytest.mark.slow
def test_full_queue_answers_429(server, client):
    import openai
    n = MAX_BATCH + MAX_QUEUE + 4

    def ask(i):
        try:
            client.completions.create(model=MODEL_NAME, prompt=f"Story {i}:", max_tokens=16,
                                      temperature=1.0, extra_body={"ignore_eos": True})
            return 200
        except openai.RateLimitError:
            return 429
    barrier = threading.Barrier(n)

    def ask_together(i):
        barrier.wait()
        return ask(i)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(ask_together, range(n)))
    assert codes.count(429) >= 1 and codes.count(200) >= MAX_BATCH
    assert set(codes) == {200, 429}


@pytest.mark.slow
def test_disconnecting_stream_frees_its_slot(server):
    import httpx
    before = _metrics(server)
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 800, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line]
            assert received and _metrics(server)["pumice_running_sequences"] == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m["pumice_running_sequences"] == 0 and \
                m["pumice_requests_cancelled_total"] > before["pumice_requests_cancelled_total"]:
            break
        time.sleep(0.05)
    assert m["pumice_running_sequences"] == 0
    assert m["pumice_batch_slots_free"] == MAX_BATCH
    assert m["pumice_requests_cancelled_total"] == before["pumice_requests_cancelled_total"] + 1
    generated = m["pumice_generation_tokens_total"] - before["pumice_generation_tokens_total"]
    assert generated < 400  # stopped long before its 800 tokens


@pytest.mark.slow
def test_disconnecting_non_streamed_request_frees_its_slot(server):
    import httpx
    before = _metrics(server)
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 800,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server}/v1/completions", json=body, timeout=2.0,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m["pumice_requests_cancelled_total"] > before["pumice_requests_cancelled_total"]:
            break
        time.sleep(0.05)
    assert m["pumice_requests_cancelled_total"] == before["pumice_requests_cancelled_total"] + 1
    assert m["pumice_running_sequences"] == 0
