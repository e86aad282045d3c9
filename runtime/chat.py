"""Chat templates: render a conversation to a prompt string with Jinja2.

The environment matches the one Hugging Face transformers gives chat templates, so that a
template renders to the same text here as under ``apply_chat_template``: a sandbox,
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
keeps non-ASCII characters, and the ``raise_exception`` and ``strftime_now`` globals. The
``{% generation %}`` block tag (used by some templates to mark assistant text) renders its body.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Iterable, Mapping

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template is malformed or raised an error for these messages."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: render the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's own tojson this does not HTML-escape: templates build prompts, not pages.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error (line {exc.lineno}): {exc.message}") from exc


def validate_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict]:
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be a mapping with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} has no 'role' string")
        checked.append(dict(message))
    if not checked:
        raise ValueError("a chat needs at least one message")
    return checked


def render_chat(template: str, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra: Any) -> str:
    """Render ``messages`` (dicts with ``role`` and ``content``) with a chat template.

    ``extra`` is passed to the template as further variables (``tools``, ``documents``,
    ``unk_token``, template-specific switches, ...).
    """
    if not template:
        raise ChatTemplateError("this model has no chat template; use plain generation instead")
    compiled = compile_template(template)
    context = dict(extra)
    context.update(messages=validate_messages(messages), add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token or "", eos_token=eos_token or "")
    try:
        return compiled.render(**context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
