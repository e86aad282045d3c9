"""The HTTP layer: OpenAI-compatible routes over the continuous-batching engine.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(JSON or, with "stream": true, server-sent events ending in `data: [DONE]`), GET /health and
GET /metrics (Prometheus text). Every error is OpenAI's error object with a fitting status.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.sampling import SamplingParams
from . import metrics as metrics_module
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, invalid,
                       parse_request)
from .scheduler import Delta, Engine, Finished, GenerationSpec, RequestHandle, TokenLogprob

log = logging.getLogger("pumice.server")

_DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI application serving `engine` under the model id `model_name`.

    With `api_key`, every /v1 route wants `Authorization: Bearer <api_key>`; /health and
    /metrics stay open (they reveal load, not data).
    """
    app = FastAPI(title="Pumice", docs_url=None, redoc_url=None, openapi_url=None)
    model = engine.model
    defaults = dict(getattr(model, "sampling_defaults", {}))
    created = int(time.time())

    # -- errors ----------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                         type=kind)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        error = APIError(500, f"Internal server error: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "Incorrect or missing API key. Send it as "
                           "'Authorization: Bearer <key>'.", code="invalid_api_key")

    def check_model(requested: Optional[str]) -> None:
        if requested is not None and requested != model_name:
            raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                           f"'{model_name}'.", param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "pumice",
                "max_model_len": model.n_ctx}

    # -- plain routes ----------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "message": "the inference engine stopped"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type=metrics_module.CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        check_model(model_id)
        return model_card()

    # -- completions -----------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        body = parse_request(CompletionRequest, await request.body())
        check_model(body.model)
        prompts = body.prompts()
        token_prompts = await run_in_threadpool(
            lambda: [model.encode(p) if isinstance(p, str) else _checked_ids(p, model.vocab_size)
                     for p in prompts])
        specs = [_spec(body, ids, model.n_ctx, defaults) for ids in token_prompts]
        echoes = None
        if body.echo:
            echoes = [p if isinstance(p, str) else model.decode(p) for p in prompts]
        handle = engine.submit(specs)
        shape = _CompletionShape(model_name, body, echoes, [len(ids) for ids in token_prompts])
        return await _respond(request, body, handle, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = parse_request(ChatCompletionRequest, await request.body())
        check_model(body.model)
        messages = [m.template_dict() for m in body.messages]
        ids = await run_in_threadpool(model.chat_prompt_tokens, messages)
        handle = engine.submit([_spec(body, ids, model.n_ctx, defaults)])
        shape = _ChatShape(model_name, body, [len(ids)])
        return await _respond(request, body, handle, shape)

    return app


def _checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                      param="prompt")
    return list(ids)


def _spec(body: Union[ChatCompletionRequest, CompletionRequest], prompt: list[int],
          n_ctx: int, defaults: dict) -> GenerationSpec:
    """What to generate; sampling fields the request leaves out take the model's defaults."""
    if not prompt:
        raise invalid("The prompt is empty.", param="prompt" if isinstance(
            body, CompletionRequest) else "messages")
    limit = body.token_limit()
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) \
        else "max_tokens"
    if len(prompt) >= n_ctx:
        raise invalid(f"This model's maximum context length is {n_ctx} tokens. However, your "
                      f"prompt has {len(prompt)} tokens, which leaves no room for a completion. "
                      "Please shorten the prompt.",
                      param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                      code="context_length_exceeded")
    if limit is not None and len(prompt) + limit > n_ctx:
        raise invalid(f"This model's maximum context length is {n_ctx} tokens. However, you "
                      f"requested {len(prompt) + limit} tokens ({len(prompt)} in the prompt, "
                      f"{limit} for the completion). Please reduce the prompt or {param}.",
                      param=param, code="context_length_exceeded")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options is only allowed when stream is true",
                      param="stream_options")
    try:
        params = SamplingParams.from_kwargs(
            defaults,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=body.ignore_eos,
            logprobs=body.logprob_count(),
        ).replace(max_tokens=limit)  # None (to the context's end) must not become a default
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return GenerationSpec(prompt_tokens=list(prompt), params=params, n=body.n)


# --------------------------------------------------------------------------------------------
# Response shapes


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class _Shape:
    object_full: str
    object_chunk: str
    id_prefix: str

    def __init__(self, model_name: str, body, prompt_lengths: list[int]):
        self.model_name = model_name
        self.body = body
        self.n = body.n
        self.prompt_tokens = sum(prompt_lengths)
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "system_fingerprint": None}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


class _ChatShape(_Shape):
    id_prefix = "chatcmpl-"

    def __init__(self, model_name, body, prompt_lengths):
        super().__init__(model_name, body, prompt_lengths)
        self.n_choices = body.n

    @staticmethod
    def logprobs(entries: list[TokenLogprob]) -> dict:
        return {"content": [
            {"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)}
                              for t, lp in e.top]} for e in entries], "refusal": None}

    def full(self, texts, entries, reasons, completion_tokens) -> dict:
        want_logprobs = self.body.logprobs
        choices = [{"index": i,
                    "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": self.logprobs(entries[i]) if want_logprobs else None,
                    "finish_reason": reasons[i]} for i in range(self.n_choices)]
        return {**self.envelope("chat.completion"), "choices": choices,
                "usage": self.usage(completion_tokens)}

    def opening_chunks(self) -> list[dict]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
                for i in range(self.n_choices)]

    def chunk(self, choices: list[dict]) -> dict:
        return {**self.envelope("chat.completion.chunk"), "choices": choices}

    def delta_chunk(self, event: Delta) -> dict:
        return self.chunk([{"index": event.choice, "delta": {"content": event.text},
                            "logprobs": self.logprobs(event.logprobs) if self.body.logprobs
                            else None, "finish_reason": None}])

    def finish_chunk(self, event: Finished) -> dict:
        return self.chunk([{"index": event.choice, "delta": {}, "logprobs": None,
                            "finish_reason": event.finish_reason}])


class _CompletionShape(_Shape):
    id_prefix = "cmpl-"

    def __init__(self, model_name, body, echoes, prompt_lengths):
        super().__init__(model_name, body, prompt_lengths)
        self.echoes = echoes
        self.n_choices = body.n * len(prompt_lengths)
        self.offsets = [0] * self.n_choices

    def echo(self, choice: int) -> str:
        return self.echoes[choice // self.n] if self.echoes else ""

    def logprobs(self, choice: int, entries: list[TokenLogprob]) -> dict:
        offsets = []
        for e in entries:
            offsets.append(self.offsets[choice])
            self.offsets[choice] += len(e.token)
        return {"tokens": [e.token for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t: lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def full(self, texts, entries, reasons, completion_tokens) -> dict:
        want = self.body.logprobs is not None
        choices = [{"index": i, "text": self.echo(i) + texts[i],
                    "logprobs": self.logprobs(i, entries[i]) if want else None,
                    "finish_reason": reasons[i]} for i in range(self.n_choices)]
        return {**self.envelope("text_completion"), "choices": choices,
                "usage": self.usage(completion_tokens)}

    def opening_chunks(self) -> list[dict]:
        if not self.echoes:
            return []
        return [self.chunk([{"index": i, "text": self.echo(i), "logprobs": None,
                             "finish_reason": None}]) for i in range(self.n_choices)]

    def chunk(self, choices: list[dict]) -> dict:
        return {**self.envelope("text_completion"), "choices": choices}

    def delta_chunk(self, event: Delta) -> dict:
        want = self.body.logprobs is not None
        return self.chunk([{"index": event.choice, "text": event.text,
                            "logprobs": self.logprobs(event.choice, event.logprobs) if want
                            else None, "finish_reason": None}])

    def finish_chunk(self, event: Finished) -> dict:
        return self.chunk([{"index": event.choice, "text": "", "logprobs": None,
                            "finish_reason": event.finish_reason}])


# --------------------------------------------------------------------------------------------
# Answering


async def _respond(request: Request, body, handle: RequestHandle, shape: _Shape) -> Response:
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(handle, shape, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collected = asyncio.ensure_future(_collect(handle, shape))
    try:
        while True:
            done, _ = await asyncio.wait({collected}, timeout=_DISCONNECT_POLL_S)
            if done:
                return JSONResponse(collected.result())
            if await request.is_disconnected():
                handle.cancel()  # frees the batch slots before the engine's next step
                collected.cancel()
                return Response(status_code=499)
    finally:
        if not collected.done():
            collected.cancel()
        handle.cancel()  # no-op when the request completed


async def _collect(handle: RequestHandle, shape: _Shape) -> dict:
    n = shape.n_choices
    texts = [[] for _ in range(n)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(n)]
    reasons: list[Optional[str]] = [None] * n
    completion_tokens = 0
    async for event in handle.events():
        if isinstance(event, Delta):
            texts[event.choice].append(event.text)
            entries[event.choice].extend(event.logprobs)
        elif isinstance(event, Finished):
            reasons[event.choice] = event.finish_reason
            completion_tokens += event.completion_tokens
    return shape.full(["".join(t) for t in texts], entries, reasons, completion_tokens)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(handle: RequestHandle, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels this generator, and so the request."""
    def with_usage(chunk: dict) -> dict:
        if include_usage:
            chunk["usage"] = None
        return chunk

    completion_tokens = 0
    try:
        for chunk in shape.opening_chunks():
            yield _event(with_usage(chunk))
        try:
            async for event in handle.events():
                if isinstance(event, Delta):
                    yield _event(with_usage(shape.delta_chunk(event)))
                elif isinstance(event, Finished):
                    completion_tokens += event.completion_tokens
                    yield _event(with_usage(shape.finish_chunk(event)))
        except APIError as error:
            # Headers are gone already: report the failure in the stream, as OpenAI does.
            yield _event(error.body())
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _event({**shape.chunk([]), "usage": shape.usage(completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()
