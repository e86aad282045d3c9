"""Continuous batching: one engine thread owns the model and serves every request.

Each request becomes one or more *sequences* (one per choice, `n`). A sequence owns a session
(KV cache) from a pool of at most `max_batch`, its own sampler and its own incremental
detokeniser. The engine loop, run by one thread, repeats:

1. drop sequences whose client went away, returning their sessions to the pool;
2. admit waiting sequences while sessions are free;
3. prefill joining sequences (in chunks of `prefill_chunk` tokens while others are decoding,
   so a long prompt delays the running batch by one chunk per step, not by the whole prompt);
4. one decode step: every decoding sequence advances by exactly one token, all in one
   `decode_batch` call that reads the weights once.

Requests therefore join and leave the batch between decode steps. Results travel back to the
asyncio side as events on a per-request `asyncio.Queue` (via `call_soon_threadsafe`).

A freed session keeps its cache: the next sequence takes the free session sharing the longest
token prefix with its prompt and prefills only the rest (chat requests with one system prompt, or
the n choices of one request, share most of their prompt).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence as Seq

import numpy as np

from ..runtime.native import NativeSampling
from ..runtime.sampling import Sampler, SamplingParams, native_sampling, samples_natively_on, stop_token_set
from .metrics import ServerMetrics
from .protocol import APIError

log = logging.getLogger("pumice.server")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


# --------------------------------------------------------------------------------------------
# What the engine needs from a model (server.model.ServedModel implements it on the runtime;
# tests may substitute a small fake).


class Session(Protocol):
    def forward(self, tokens: Seq[int]) -> np.ndarray: ...
    def truncate(self, n_keep: int) -> None: ...
    def close(self) -> None: ...


class StreamDecoderLike(Protocol):
    def add(self, token: int) -> str: ...
    def flush(self) -> str: ...


class EngineModel(Protocol):
    vocab_size: int
    n_ctx: int
    eos_token_ids: frozenset

    def new_session(self) -> Session: ...
    def decode_batch(self, sessions: Seq[Session], tokens: Seq[int]) -> np.ndarray: ...
    # Optional (the runtime's sampler): decode_batch_sample(sessions, tokens, samplings,
    # return_logits) and sessions' forward_sample(tokens, sampling, return_logits); see
    # Engine._native.
    def new_stream_decoder(self, prompt: Seq[int]) -> StreamDecoderLike: ...
    def token_text(self, token: int) -> str: ...


@dataclass
class GenerationSpec:
    """One prompt to complete `n` times with `params` (max_tokens None: to the context's end).

    Choice i samples with seed `params.seed + i`, so choices differ yet a seeded request is
    reproducible.
    """
    prompt_tokens: list[int]
    params: SamplingParams
    n: int = 1


# --------------------------------------------------------------------------------------------
# Events sent to the request's asyncio side


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    choice: int
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Finished:
    choice: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: APIError


# --------------------------------------------------------------------------------------------


class RequestHandle:
    """The asyncio side of one request: iterate its events; cancel it when the client leaves."""

    def __init__(self, engine: "Engine", request_id: int, loop: asyncio.AbstractEventLoop,
                 n_choices: int):
        self.engine = engine
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n_choices = n_choices
        self.cancelled = False
        self.done = False

    def _post(self, event) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True

    def cancel(self) -> None:
        """Mark the request cancelled; the engine drops its sequences before its next step."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self.engine._wake()

    async def events(self):
        """Delta/Finished events until every choice finished; raises APIError on failure."""
        remaining = self.n_choices
        try:
            while remaining:
                event = await self.queue.get()
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    remaining -= 1
                yield event
            self.done = True
        finally:
            if not self.done:
                self.cancel()


class _Request:
    def __init__(self, handle: RequestHandle, n_sequences: int):
        self.handle = handle
        self.unfinished = n_sequences
        self.failed = False


class _Slot:
    """A pooled session and the tokens its cache holds."""

    def __init__(self, session: Session):
        self.session = session
        self.cached: list[int] = []


class _Sequence:
    def __init__(self, request: _Request, choice: int, spec: GenerationSpec,
                 model: EngineModel, seed: Optional[int]):
        self.request = request
        self.choice = choice
        self.spec = spec
        self.prompt = spec.prompt_tokens
        self.model = model
        params = spec.params
        self.params = params if seed == params.seed else params.replace(seed=seed)
        self.stop = list(params.stop)
        self.stop_tokens = frozenset(stop_token_set(params, model.eos_token_ids))
        self.slot: Optional[_Slot] = None
        self.prefilled = 0            # prompt tokens already in the cache
        self.next_input: Optional[int] = None
        self.generated: list[int] = []
        self.sampler: Optional[Sampler] = None
        self.native: Optional[NativeSampling] = None  # set when the runtime samples for it
        self.decoder: Optional[StreamDecoderLike] = None
        self.text = ""                # decoded text not yet sent to the client
        self.pending: list[tuple[int, TokenLogprob]] = []  # (offset in text, entry)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        limit = model.n_ctx - len(self.prompt)
        self.max_tokens = limit if params.max_tokens is None else min(params.max_tokens, limit)

    @property
    def cancelled(self) -> bool:
        return self.request.handle.cancelled or self.request.failed

    # -- text and stop strings

    def accept(self, token: int, logprob: Optional[TokenLogprob]) -> Optional[str]:
        """Take one sampled token; returns a finish reason when the sequence is done."""
        if token in self.stop_tokens:  # (not counted, as Generator counts)
            self._append(self.decoder.flush())  # (a stop string may still complete here)
            if self.text or self.pending:
                self._release(len(self.text), final=True)
            return FINISH_STOP
        self.generated.append(token)
        if logprob is not None:
            self.pending.append((len(self.text), logprob))
        if self._append(self.decoder.add(token)):
            return FINISH_STOP
        if len(self.generated) >= self.max_tokens:
            if self._append(self.decoder.flush()):
                return FINISH_STOP
            self._release(len(self.text), final=True)
            return FINISH_LENGTH
        self._release(len(self.text) - self._held_back())
        self.next_input = token
        return None

    def _append(self, piece: str) -> bool:
        """Add text; on a stop string send the text just before it and return True."""
        if not piece:
            return False
        self.text += piece  # only text not yet sent, so the search stays short
        cut = -1
        for stop in self.stop:
            at = self.text.find(stop)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut < 0:
            return False
        self._release(cut, final=True)
        return True

    def _held_back(self) -> int:
        """Length of the text's tail that could still grow into a stop string."""
        for k in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(stop.startswith(tail) for stop in self.stop):
                return k
        return 0

    def _release(self, upto: int, final: bool = False) -> None:
        """Send text[:upto] and the logprobs of the tokens whose text starts in it.

        `final`: the sequence ends here; whatever lies beyond `upto` (a stop string and what
        followed it) is discarded, and tokens that produced no text yet go with the last delta.
        """
        text = self.text[:upto]
        if final:
            entries = [e for off, e in self.pending if off < upto or
                       (off == upto == len(self.text))]
            self.text, self.pending = "", []
        else:
            entries = [e for off, e in self.pending if off < upto]
            self.pending = [(off - upto, e) for off, e in self.pending if off >= upto]
            self.text = self.text[upto:]
        if text or entries:
            self.request.handle._post(Delta(self.choice, text, entries))


class Engine:
    """Owns the model on one thread; requests join and leave its batch between decode steps."""

    def __init__(self, model: EngineModel, max_batch: int = 8, max_queue: int = 64,
                 prefill_chunk: int = 256, prefix_reuse: bool = True,
                 metrics: Optional[ServerMetrics] = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must be non-negative")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.prefix_reuse = prefix_reuse
        self.metrics = metrics or ServerMetrics()
        self.metrics.slots_total = max_batch
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._free: list[_Slot] = []
        self._n_slots = 0
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        # The runtime samples inside the decode step (only token ids leave it) for requests
        # that need no host logits; models without the native sampler sample on the host.
        self._native = (callable(getattr(model, "decode_batch_sample", None))
                        and samples_natively_on(getattr(model, "device", "cpu")))

    # -- lifetime

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pumice-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for slot in self._free:
            slot.session.close()
        self._free.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- submitting (event loop thread)

    def submit(self, specs: Seq[GenerationSpec], loop: Optional[asyncio.AbstractEventLoop] = None
               ) -> RequestHandle:
        """Queue one request (one or more prompts, n choices each); 429 when the queue is full."""
        if not self.alive:
            raise APIError(503, "The inference engine is not running.", type="server_error",
                           code="engine_unavailable")
        loop = loop or asyncio.get_running_loop()
        n_choices = sum(spec.n for spec in specs)
        handle = RequestHandle(self, next(self._ids), loop, n_choices)
        request = _Request(handle, n_choices)
        choice = 0
        sequences = []
        for spec in specs:
            for i in range(spec.n):
                seed = None if spec.params.seed is None else spec.params.seed + i
                sequences.append(_Sequence(request, choice, spec, self.model, seed))
                choice += 1
        with self._cond:
            queued = self._queued_requests()
            if queued >= self.max_queue:
                self.metrics.count_rejected("queue_full")
                raise APIError(429, f"The server is busy: {queued} requests are already waiting "
                               "for a slot. Retry later.", type="rate_limit_error",
                               code="queue_full")
            self._waiting.extend(sequences)
            self.metrics.count_request()
            self._update_gauges()
            self._cond.notify_all()
        return handle

    # -- the engine thread

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    self._admit()
                    self._update_gauges()
                if self._active:
                    self._step()
        except BaseException as exc:  # a bug: fail everything still waiting, keep the message
            log.exception("engine thread crashed")
            self.error = exc
            with self._cond:
                for seq in list(self._waiting) + self._active:
                    self._fail(seq, APIError(500, f"inference engine failed: {exc}",
                                             type="server_error"))
                self._waiting.clear()
                self._active.clear()
        finally:
            for seq in list(self._active):
                self._retire(seq)

    def _queued_requests(self) -> int:
        """Waiting requests that the free slots cannot take at the next step (under _cond).

        Requests that arrive while the engine is busy with a step, and that free slots will
        take when it ends, are not "queued": they must not use up --max-queue.
        """
        capacity = self.max_batch - len(self._active)
        if len(self._waiting) <= capacity:
            return 0
        queued = {id(seq.request) for seq in itertools.islice(self._waiting, max(capacity, 0),
                                                              None)}
        return len(queued)

    def _update_gauges(self) -> None:
        running = {id(seq.request) for seq in self._active}
        self.metrics.set_load(queue_length=self._queued_requests(), running_requests=len(running),
                              running_sequences=len(self._active),
                              slots_free=self.max_batch - len(self._active))

    def _drop_cancelled(self) -> None:
        kept = []
        for seq in self._active:
            if seq.cancelled:
                self._retire(seq)
                self._note_cancelled(seq)
            else:
                kept.append(seq)
        self._active = kept
        if any(seq.cancelled for seq in self._waiting):
            still = collections.deque()
            for seq in self._waiting:
                if seq.cancelled:
                    self._note_cancelled(seq)
                else:
                    still.append(seq)
            self._waiting = still

    def _note_cancelled(self, seq: _Sequence) -> None:
        request = seq.request
        request.unfinished -= 1
        if request.unfinished == 0 and not request.failed:
            self.metrics.count_cancelled()

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch:
            seq = self._waiting.popleft()
            try:
                seq.slot = self._take_slot(seq.prompt)
            except Exception as exc:
                self._fail(seq, _as_api_error(exc))
                continue
            seq.prefilled = len(seq.slot.cached)
            seq.native = native_sampling(seq.params) if self._native else None
            if seq.native is None:  # the host samples: logprobs, penalties, or a CPU model
                seq.sampler = Sampler(seq.params, self.model.vocab_size, seq.prompt)
            seq.decoder = self.model.new_stream_decoder(seq.prompt)
            self._active.append(seq)

    def _take_slot(self, prompt: list[int]) -> _Slot:
        best, best_len = None, -1
        for slot in self._free:
            shared = _common_prefix(slot.cached, prompt) if self.prefix_reuse else 0
            if shared > best_len:
                best, best_len = slot, shared
        if best is None:
            best = _Slot(self.model.new_session())
            self._n_slots += 1
            best_len = 0
        else:
            self._free.remove(best)
        # At least one prompt token must be fed again: its logits choose the first new token.
        keep = min(best_len, len(prompt) - 1)
        if keep != len(best.cached):
            best.session.truncate(keep)
            del best.cached[keep:]
        return best

    def _retire(self, seq: _Sequence) -> None:
        """Return the sequence's session to the pool (its cache stays, for prefix reuse)."""
        slot, seq.slot = seq.slot, None
        if slot is not None:
            self._free.append(slot)

    def _fail(self, seq: _Sequence, error: APIError) -> None:
        self._retire(seq)
        request = seq.request
        if not request.failed:
            request.failed = True
            self.metrics.count_failed()
            request.handle._post(Failed(error))

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self._retire(seq)
        seq.request.unfinished -= 1
        seq.request.handle._post(Finished(seq.choice, reason, len(seq.prompt),
                                         len(seq.generated)))
        self.metrics.count_finished(reason)

    def _step(self) -> None:
        """One prefill chunk (or more, when nothing decodes) and one decode step."""
        decoding = [seq for seq in self._active if seq.next_input is not None]
        # Alone, prompts go faster in bigger chunks; the cap keeps cancellations and new
        # arrivals noticed between chunks of a very long prompt.
        budget = self.prefill_chunk if decoding else 4 * self.prefill_chunk
        # (sequence, logits to sample from, or the token the runtime drew)
        ready: list[tuple[_Sequence, Optional[np.ndarray], Optional[int]]] = []
        for seq in [s for s in self._active if s.next_input is None]:
            if budget <= 0:
                break
            todo = seq.prompt[seq.prefilled:]
            chunk = todo[:budget]
            started = time.perf_counter()
            completes = seq.prefilled + len(chunk) == len(seq.prompt)
            token = None
            try:
                if completes and seq.native is not None:
                    logits, token = None, seq.slot.session.forward_sample(chunk, seq.native)
                else:
                    logits = seq.slot.session.forward(chunk)
            except Exception as exc:
                self._fail_now(seq, exc)
                continue
            self.metrics.add_prefill(len(chunk), time.perf_counter() - started)
            seq.slot.cached.extend(chunk)
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            if seq.prefilled == len(seq.prompt):
                ready.append((seq, logits, token))
        if decoding:
            started = time.perf_counter()
            tokens = [seq.next_input for seq in decoding]
            try:
                all_logits, drawn = self._decode(decoding, tokens)
            except Exception as exc:
                for seq in decoding:
                    self._fail_now(seq, exc)
                decoding = []
            else:
                self.metrics.add_decode(len(decoding), time.perf_counter() - started)
                for i, seq in enumerate(decoding):
                    seq.slot.cached.append(seq.next_input)
                    if seq.native is not None:
                        ready.append((seq, None, int(drawn[i])))
                    else:
                        ready.append((seq, all_logits[i], None))
        done = self._sample_all(ready)
        for seq, outcome in done:
            if isinstance(outcome, Exception):
                self._fail_now(seq, outcome)
        finished = {id(seq) for seq, outcome in done if isinstance(outcome, str)}
        with self._cond:
            for seq, outcome in done:
                if isinstance(outcome, str):
                    self._finish(seq, outcome)
            if finished:
                self._active = [seq for seq in self._active if id(seq) not in finished]
            self._update_gauges()

    def _decode(self, decoding: list[_Sequence], tokens: list[int]):
        """One decode step: (logits [n, vocab] or None, the runtime's tokens [n] or None).

        Logits come back only when some sequence samples on the host; sequences the runtime
        does not sample for ride along greedily (their drawn token is ignored).
        """
        sessions = [s.slot.session for s in decoding]
        if not any(s.native is not None for s in decoding):
            if len(decoding) == 1:
                # The same call path as Generator, so a lone request reproduces it exactly.
                return sessions[0].forward(tokens)[None, :], None
            return self.model.decode_batch(sessions, tokens), None
        want_logits = any(s.native is None for s in decoding)
        samplings = [s.native if s.native is not None else _GREEDY for s in decoding]
        if len(decoding) == 1:
            out = sessions[0].forward_sample(tokens, samplings[0], return_logits=want_logits)
            return (out[1][None, :], [out[0]]) if want_logits else (None, [out])
        out = self.model.decode_batch_sample(sessions, tokens, samplings, return_logits=want_logits)
        return (out[1], out[0]) if want_logits else (None, out)

    def _fail_now(self, seq: _Sequence, exc: Exception) -> None:
        log.warning("request %d failed: %s", seq.request.handle.request_id, exc)
        with self._cond:
            if seq.slot is not None:  # the cache's state is unknown now: start it afresh
                seq.slot.session.truncate(0)
                seq.slot.cached.clear()
            self._fail(seq, _as_api_error(exc))
            self._active = [s for s in self._active if s is not seq]
            self._update_gauges()

    def _sample_all(self, ready: list[tuple]) -> list[tuple]:
        """Each sequence's next token: (sequence, finish reason or None, or the exception).

        (Sampling the batch in a thread pool was tried: slower, see docs/PERFORMANCE.md.)
        """
        outcomes = []
        for seq, logits, token in ready:
            try:
                if token is not None:  # drawn by the runtime
                    seq.next_input = None
                    outcomes.append((seq, seq.accept(token, None)))
                else:
                    outcomes.append((seq, self._sample(seq, logits)))
            except Exception as exc:  # a broken request must not stop the others
                outcomes.append((seq, exc))
        return outcomes

    def _sample(self, seq: _Sequence, logits: np.ndarray) -> Optional[str]:
        token, info = seq.sampler.sample(logits, seq.generated)
        entry = None
        if info is not None:
            text = self.model.token_text
            entry = TokenLogprob(text(int(token)), info.logprob,
                                 [(text(t), lp) for t, lp in info.top])
        seq.next_input = None
        return seq.accept(int(token), entry)


_GREEDY = NativeSampling.greedy()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    status = getattr(exc, "status", None)
    if status == 6:  # PUMICE_ERR_CONTEXT_FULL
        return APIError(400, f"The request does not fit in the context: {exc}",
                        code="context_length_exceeded")
    return APIError(500, f"Inference failed: {exc}", type="server_error")
