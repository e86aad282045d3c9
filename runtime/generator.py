"""``Generator``: text in, text out, on one .pumice model (the public Python API).

    with Generator("model.pumice") as generator:
        result = generator.generate("Once upon a time", max_tokens=64, temperature=0)
        for piece in generator.stream("Tell me a story", max_tokens=64):
            print(piece, end="", flush=True)
        reply = generator.chat([{"role": "user", "content": "Hi!"}])

One Generator owns one native session (KV cache). A new request whose prompt starts with the
tokens already in the cache reuses them (the usual case for multi-turn chat), so only the new
suffix is prefilled. A Generator serves one request at a time; the server batches many.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .chat import render_chat
from .native import NativeModel, NativeSampling
from .sampling import (Sampler, SamplingParams, TokenLogprob, native_sampling, samples_natively_on,
                       stop_token_set)
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512


class ContextLengthError(ValueError):
    """The prompt does not fit in the context window."""

    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens but the context holds {n_ctx}; "
                         "shorten the prompt or open the model with a larger n_ctx")
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                   # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0               # prompt tokens reused from the KV cache
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0          # from the first to the last generated token

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        fresh = self.prompt_tokens - self.cached_tokens
        return fresh / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclass
class StreamEvent:
    """One generated token: the text it completes (possibly ""), and on the last event why it ended."""

    text: str
    token_id: int | None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class StopStringMatcher:
    """Cuts streamed text at the first stop string, never emitting text past it.

    Text that could be the beginning of a stop string is held back until it is known not to be.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop string matched or None)."""
        if not self.stops:
            return text, None
        self._pending += text
        found: tuple[int, str] | None = None
        for stop in self.stops:
            index = self._pending.find(stop)
            if index >= 0 and (found is None or index < found[0]):
                found = (index, stop)
        if found is not None:
            emitted, self._pending = self._pending[:found[0]], ""
            return emitted, found[1]
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(stop[:length]):
                    hold = length
                    break
        cut = len(self._pending) - hold
        emitted, self._pending = self._pending[:cut], self._pending[cut:]
        return emitted, None

    def finish(self) -> str:
        held, self._pending = self._pending, ""
        return held


def _generation_defaults(generation: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config (metadata.generation)."""
    defaults: dict[str, Any] = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = generation.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[key] = value
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    if isinstance(generation.get("max_new_tokens"), int):
        defaults["max_tokens"] = generation["max_new_tokens"]
    return defaults


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Generator:
    """Generate text with a .pumice model.

    Sampling arguments (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ...; see
    ``SamplingParams``) are keywords of ``generate``/``stream``/``chat``, or a ``params=``
    SamplingParams. Arguments left out take the model's generation defaults (from its
    ``generation_config.json``), then SamplingParams' own.
    """

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu", n_ctx: int | None = None,
                 n_threads: int | None = None, verify_checksums: bool = True):
        from pumice.format.reader import PumiceFile

        self.model = NativeModel(model_path, device=device, n_threads=n_threads,
                                 verify_checksums=verify_checksums)
        try:
            with PumiceFile(model_path, verify=False) as pumice_file:  # native already verified
                self.metadata: dict[str, Any] = pumice_file.metadata
                self.tokenizer = Tokenizer.from_pumice(pumice_file)
            self.session = self.model.new_session(n_ctx)
        except BaseException:
            self.model.close()
            raise
        self.chat_template: str | None = self.metadata.get("chat_template")
        self.sampling_defaults = _generation_defaults(self.metadata.get("generation") or {})
        self._cached: list[int] = []  # the tokens whose keys/values the session holds
        self._busy = threading.Lock()

    # -- properties and lifetime

    @property
    def n_ctx(self) -> int:
        return self.session.n_ctx

    @property
    def info(self) -> dict[str, Any]:
        info = dict(self.model.info)
        info.update(n_ctx=self.n_ctx, architecture=self.metadata.get("architecture"),
                    provenance=self.metadata.get("provenance", {}),
                    has_chat_template=bool(self.chat_template))
        return info

    def close(self) -> None:
        self.model.close()  # closes the session too

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the cached prompt (the next request prefills from scratch)."""
        self.session.truncate(0)
        self._cached = []

    # -- prompts

    def sampling_params(self, params: SamplingParams | None = None, **kwargs) -> SamplingParams:
        if params is not None:
            return params.replace(**kwargs) if kwargs else params
        return SamplingParams.from_kwargs(self.sampling_defaults, **kwargs)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.model.vocab_size})")
        return ids

    def render_chat(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        return render_chat(self.chat_template or "", messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
                           **template_kwargs)

    def chat_prompt(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs) -> list[int]:
        """Token ids of a conversation as the model sees it (the template adds special tokens)."""
        text = self.render_chat(messages, add_generation_prompt, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- generation

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 **sampling) -> GenerationResult:
        return self._collect(self.encode_prompt(prompt), self.sampling_params(params, **sampling))

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **sampling) -> Iterator[str]:
        """Yield the completion as text pieces (complete characters, never past a stop string)."""
        for event in self.stream_events(prompt, params, **sampling):
            if event.text:
                yield event.text

    def stream_events(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                      **sampling) -> Iterator[StreamEvent]:
        """Yield one StreamEvent per generated token; the last one has ``finish_reason`` set."""
        # Validate eagerly (before the first next()), so bad arguments fail at the call site.
        prompt_ids = self.encode_prompt(prompt)
        params = self.sampling_params(params, **sampling)
        self._check_prompt(prompt_ids)
        return self._events(prompt_ids, params, stats={})

    def chat(self, messages: Iterable[Mapping[str, Any]], stream: bool = False,
             params: SamplingParams | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
             **sampling):
        """Reply to a conversation: a GenerationResult, or with ``stream=True`` text pieces."""
        prompt_ids = self.chat_prompt(messages, True, **dict(chat_template_kwargs or {}))
        if stream:
            return self.stream(prompt_ids, params, **sampling)
        return self.generate(prompt_ids, params, **sampling)

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty (and the tokenizer adds no BOS token)")
        if len(prompt_ids) > self.n_ctx:
            raise ContextLengthError(len(prompt_ids), self.n_ctx)

    def _collect(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        self._check_prompt(prompt_ids)
        stats: dict[str, Any] = {}
        pieces: list[str] = []
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        finish_reason, stop_reason = "length", None
        for event in self._events(prompt_ids, params, stats):
            pieces.append(event.text)
            if event.token_id is not None:
                tokens.append(event.token_id)
                if logprobs is not None and event.logprob is not None:
                    logprobs.append(event.logprob)
            if event.finish_reason:
                finish_reason, stop_reason = event.finish_reason, event.stop_reason
        return GenerationResult(
            text="".join(pieces), token_ids=tokens, prompt_tokens=len(prompt_ids),
            completion_tokens=len(tokens), finish_reason=finish_reason, stop_reason=stop_reason,
            logprobs=logprobs, prompt_token_ids=list(prompt_ids), cached_tokens=stats.get("cached", 0),
            prefill_seconds=stats.get("prefill_seconds", 0.0), decode_seconds=stats.get("decode_seconds", 0.0))

    def _prefill(self, prompt_ids: list[int], sampling: NativeSampling | None = None):
        """Bring the cache to ``prompt_ids`` (reusing its common prefix).

        Returns the last token's logits, or with ``sampling`` the next token the runtime drew.
        """
        if len(self._cached) != self.session.n_past:
            self.reset()  # an interrupt landed between a forward call and our bookkeeping
        reuse = _common_prefix_length(self._cached, prompt_ids)
        if reuse == len(prompt_ids):
            reuse -= 1  # the last prompt token must run again: its logits pick the first token
        try:
            if reuse < self.session.n_past:
                self.session.truncate(reuse)
            self._cached = self._cached[:reuse]
            rest = prompt_ids[reuse:]
            logits = None
            for start in range(0, len(rest), PREFILL_CHUNK):
                chunk = rest[start:start + PREFILL_CHUNK]
                last = start + PREFILL_CHUNK >= len(rest)
                if last and sampling is not None:
                    logits = self.session.forward_sample(chunk, sampling)
                else:
                    logits = self.session.forward(chunk, return_logits=last)
                self._cached.extend(chunk)
        except BaseException:
            self.reset()
            raise
        return logits, reuse

    def _events(self, prompt_ids: list[int], params: SamplingParams, stats: dict) -> Iterator[StreamEvent]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Generator is already generating; use one Generator per thread "
                               "(or pumice serve for concurrent requests)")
        try:
            started = time.perf_counter()
            # The runtime samples when the request allows it (only token ids leave the step);
            # logprobs and penalties need the logits here, and the numpy Sampler.
            native = native_sampling(params) if samples_natively_on(self.model.device) else None
            logits, stats["cached"] = self._prefill(prompt_ids, native)
            first_token_at = time.perf_counter()
            stats["prefill_seconds"] = first_token_at - started

            sampler = None if native is not None else Sampler(params, self.model.vocab_size, prompt_ids)
            stop_ids = stop_token_set(params, self.tokenizer.eos_token_ids)
            decoder = self.tokenizer.stream_decoder(prompt_ids)
            stops = StopStringMatcher(params.stop)
            max_tokens = params.max_tokens if params.max_tokens is not None else float("inf")
            generated: list[int] = []
            n_ctx = self.n_ctx
            while True:
                if native is not None:
                    token, logprob = logits, None  # the runtime's choice
                else:
                    token, logprob = sampler.sample(logits, generated)
                stats["decode_seconds"] = time.perf_counter() - first_token_at
                if token in stop_ids:
                    held, _ = stops.push(decoder.flush())
                    yield StreamEvent(held + stops.finish(), None, None, "stop", token)
                    return
                generated.append(token)
                text, matched = stops.push(decoder.add(token))
                if matched is not None:
                    yield StreamEvent(text, token, logprob, "stop", matched)
                    return
                if len(generated) >= max_tokens or self.session.n_past >= n_ctx:
                    tail, matched = stops.push(decoder.flush())
                    text += tail
                    if matched is None:
                        text += stops.finish()
                    yield StreamEvent(text, token, logprob, "stop" if matched else "length", matched)
                    return
                yield StreamEvent(text, token, logprob)
                try:
                    if native is not None:
                        logits = self.session.forward_sample([token], native)
                    else:
                        logits = self.session.forward([token])
                except BaseException:
                    self.reset()
                    raise
                self._cached.append(token)
        finally:
            self._busy.release()
