"""Sliding-window perplexity of a model over a text.

Windows of ``window`` tokens start every ``stride`` tokens. With ``stride == window`` (the
default) windows do not overlap and every token but each window's first is scored, which is
what ``model(ids, labels=ids)`` computes per window in transformers. With a smaller stride each
window scores only the tokens the previous window did not reach, so every token is scored once
with at least ``window - stride`` tokens of context.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .native import NativeModel, NativeSession

LOGITS_CHUNK = 256  # positions per forward call: bounds the logits buffer (chunk x vocab floats)


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    tokens_processed: int
    windows: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_processed / self.seconds if self.seconds > 0 else 0.0


def window_plan(n_tokens: int, window: int, stride: int | None = None,
                max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for each window."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in [1, window], got {stride}")
    plan = []
    previous_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + window, n_tokens)
        first_scored = max(1, previous_end - begin)
        if end - begin >= 2 and first_scored < end - begin:
            plan.append((begin, end, first_scored))
        previous_end = end
        if end == n_tokens or (max_windows is not None and len(plan) >= max_windows):
            break
    return plan


def _window_nll(session: NativeSession, ids: np.ndarray, first_scored: int) -> float:
    """Sum of -log p(ids[t] | ids[:t]) for t in [first_scored, len(ids))."""
    session.truncate(0)
    total = 0.0
    position = 0
    # Positions before first_scored - 1 only provide context: no logits needed.
    warmup = first_scored - 1
    if warmup > 0:
        for start in range(0, warmup, LOGITS_CHUNK):
            session.forward(ids[start:min(start + LOGITS_CHUNK, warmup)], return_logits=False)
        position = warmup
    # Logits at position p predict token p + 1; the last token predicts nothing we score.
    while position < len(ids) - 1:
        stop = min(position + LOGITS_CHUNK, len(ids) - 1)
        logits = session.forward(ids[position:stop], logits_all=True)
        maxima = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - maxima).sum(axis=1, dtype=np.float64)) + maxima[:, 0]
        targets = ids[position + 1:stop + 1]
        total += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        position = stop
    return total


def perplexity(model: NativeModel, token_ids: Sequence[int], window: int = 1024, stride: int | None = None,
               max_windows: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``model``; ``progress(done, total, running_ppl)`` per window."""
    ids = np.asarray(token_ids, dtype=np.int64)
    plan = window_plan(len(ids), window, stride, max_windows)
    if not plan:
        raise ValueError(f"the text is {len(ids)} tokens: too short to score")
    if window > model.info["max_context"]:
        raise ValueError(f"window {window} is longer than the model's context ({model.info['max_context']})")
    session = model.new_session(window)
    try:
        total_nll, scored, processed = 0.0, 0, 0
        started = time.perf_counter()
        for index, (begin, end, first_scored) in enumerate(plan):
            total_nll += _window_nll(session, ids[begin:end], first_scored)
            scored += end - begin - first_scored
            processed += end - begin - 1
            if progress is not None:
                progress(index + 1, len(plan), math.exp(total_nll / scored))
        seconds = time.perf_counter() - started
    finally:
        session.close()
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, processed, len(plan), seconds)


def text_perplexity(model: NativeModel, tokenizer, text: str, **options) -> PerplexityResult:
    """Tokenize ``text`` as one sequence (``tokenizer(text)`` in transformers) and score it."""
    return perplexity(model, tokenizer.encode(text, add_special_tokens=True), **options)
