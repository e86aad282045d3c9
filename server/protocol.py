"""Request models of the OpenAI-compatible API and the errors the server answers with.

Requests are validated here, before they reach the scheduler: a value OpenAI would refuse
(temperature < 0, n < 1, top_p outside (0, 1], max_tokens < 1, ...) becomes an `APIError` with
status 400 that names the offending parameter. Unknown request fields are accepted and ignored,
as clients send fields this server has no use for (e.g. `logit_bias` = {} or `service_tier`).
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16


class APIError(Exception):
    """An error answered as OpenAI's error object: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = None
    user: Optional[str] = None
    # Not in OpenAI's API, accepted as extensions (the openai client sends them via extra_body),
    # with the names other OpenAI-compatible servers use.
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None

    def template_dict(self) -> dict:
        """The message as chat templates expect it: content flattened to one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise invalid(f"content parts of type {part.type!r} are not supported "
                                  "(this model reads text only)", param="messages")
                texts.append(part.text)
            content = "".join(texts)
        out = {"role": "system" if self.role == "developer" else self.role,
               "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def logprob_count(self) -> Optional[int]:
        """None: no logprobs; k >= 0: the sampled token's logprob plus k alternatives."""
        if not self.logprobs:
            if self.top_logprobs:
                raise invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def token_limit(self) -> Optional[int]:
        return self.max_tokens

    def logprob_count(self) -> Optional[int]:
        return self.logprobs

    def prompts(self) -> list[Union[str, list[int]]]:
        """The request's prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise invalid("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


def _param_of(error: dict) -> Optional[str]:
    loc = [str(x) for x in error.get("loc", ()) if not isinstance(x, int)]
    # A union member's type name ('str', 'list[str]') is not a parameter name.
    while len(loc) > 1 and (loc[-1].startswith(("list[", "str", "int", "function-"))):
        loc.pop()
    return loc[0] if loc else None


def parse_request(model_cls: type[BaseModel], raw: bytes) -> Any:
    """Parse and validate a JSON body; every failure is an APIError(400)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}",
                      code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    try:
        request = model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param_of(first)
        message = first.get("msg", "invalid value")
        if first.get("type") == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {message}."
        raise invalid(message, param=param,
                      code="missing_required_parameter" if first.get("type") == "missing"
                      else "invalid_value") from None
    if isinstance(request, CompletionRequest):
        if request.best_of is not None and request.best_of != request.n:
            raise invalid("best_of other than n is not supported", param="best_of")
        if request.suffix:
            raise invalid("suffix is not supported by this model", param="suffix")
        if request.echo and request.logprobs is not None:
            raise invalid("echo together with logprobs is not supported", param="echo")
    if isinstance(request, ChatCompletionRequest):
        request.logprob_count()  # raises on top_logprobs without logprobs
    return request
