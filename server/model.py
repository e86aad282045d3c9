"""The served model: the runtime's layers gathered behind what the engine and the routes need.

The engine (server.scheduler) needs sessions, `decode_batch`, stream decoders and token texts;
the routes need prompts as token ids (plain text, or chat messages through the file's chat
template). Prompts are built exactly as `Generator` builds them, so the server and the Python
API produce the same tokens for the same request.
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import numpy as np

from ..runtime.chat import ChatTemplateError, render_chat
from ..runtime.generator import _generation_defaults
from ..runtime.native import NativeModel, NativeSampling, NativeSession, decode_batch, decode_batch_sample
from ..runtime.tokenizer import Tokenizer
from .protocol import invalid


class ServedModel:
    """One .pumice file opened for serving: native model, tokenizer, chat template."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", n_ctx: Optional[int] = None,
                 n_threads: Optional[int] = None, verify_checksums: bool = True):
        from ..format.reader import PumiceFile

        self.path = os.fspath(path)
        self.native = NativeModel(self.path, device=device, n_threads=n_threads,
                                  verify_checksums=verify_checksums)
        with PumiceFile(self.path, verify=False) as pumice_file:  # the native side verified it
            metadata = pumice_file.metadata
            self.tokenizer = Tokenizer.from_pumice(pumice_file)
        self.chat_template: Optional[str] = metadata.get("chat_template")
        # Sampling settings a request leaves out come from the checkpoint's generation_config,
        # as for Generator; the length limit stays OpenAI's (the rest of the context).
        self.sampling_defaults = {k: v for k, v in _generation_defaults(
            metadata.get("generation") or {}).items() if k != "max_tokens"}
        self.vocab_size = self.native.vocab_size
        self.device = self.native.device
        max_context = self.native.info["max_context"]
        if n_ctx is not None and n_ctx < 2:
            raise ValueError(f"n_ctx must be at least 2, got {n_ctx}")
        self.n_ctx = min(n_ctx, max_context) if n_ctx else max_context
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self._token_texts: dict[int, str] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.native.close()

    # -- prompts (event loop's worker threads)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]:
        if not self.chat_template:
            raise invalid("This model has no chat template; use /v1/completions instead.",
                          param="messages", code="no_chat_template")
        try:
            text = render_chat(self.chat_template, messages, add_generation_prompt=True,
                               bos_token=self.tokenizer.bos_token,
                               eos_token=self.tokenizer.eos_token)
        except (ChatTemplateError, ValueError) as exc:
            raise invalid(str(exc), param="messages") from None
        # The rendered template already holds every special token it wants (as transformers'
        # apply_chat_template, which encodes without adding any).
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- the engine's needs (engine thread)

    def new_session(self) -> NativeSession:
        return self.native.new_session(self.n_ctx)

    def decode_batch(self, sessions: Sequence[NativeSession], tokens: Sequence[int]) -> np.ndarray:
        return decode_batch(sessions, tokens)

    def decode_batch_sample(self, sessions: Sequence[NativeSession], tokens: Sequence[int],
                            samplings: Sequence[NativeSampling], return_logits: bool = False):
        return decode_batch_sample(sessions, tokens, samplings, return_logits=return_logits)

    def new_stream_decoder(self, prompt: Sequence[int]):
        return self.tokenizer.stream_decoder(context_ids=prompt)

    def token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            with self._lock:
                self._token_texts[token] = text
        return text
