"""Sampling parameters and the per-request sampler (numpy, CPU-side).

The order of logit processing follows what the common servers do, so that the same parameters
mean the same thing here: penalties → temperature → top-k → top-p → min-p → draw. Temperature 0
is greedy (argmax after penalties). Reported log-probabilities are those of the model's
distribution after penalties, before temperature and truncation (what OpenAI-style clients
expect).
"""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .native import NativeSampling

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens. ``top_k <= 0``, ``top_p == 1`` and ``min_p == 0`` disable truncation."""

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        def integer(name: str, value) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            return int(value)

        if self.max_tokens is not None and integer("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if number("temperature") < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        integer("top_k", self.top_k)
        if not 0.0 < number("top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if number("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= number("presence_penalty") <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= number("frequency_penalty") <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None:
            integer("seed", self.seed)
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        for token in self.stop_token_ids:
            if integer("stop_token_ids entries", token) < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {token}")
        if self.logprobs is not None and not 0 <= integer("logprobs", self.logprobs) <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, defaults: dict | None = None, **kwargs) -> "SamplingParams":
        """Build from keyword arguments; ``defaults`` fill what the caller left out (or None).

        Unknown names are an error (a typo must not silently change sampling).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        values = {k: v for k, v in (defaults or {}).items() if k in names and v is not None}
        values.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(**values)


@dataclass
class TokenLogprob:
    """Log-probability of the chosen token and the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(logits.max())
    return shifted - np.log(np.exp(shifted.astype(np.float32)).sum(dtype=np.float64))


class Sampler:
    """Per-request sampling state: the RNG and the counts of tokens generated so far."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int] = ()):
        self.params = params
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(params.seed)
        # Repetition penalty looks at the prompt and the output; presence/frequency at the output.
        prompt = np.asarray(list(prompt_ids), dtype=np.int64)
        self._prompt_ids = np.unique(prompt[(prompt >= 0) & (prompt < self.vocab_size)])
        self._counts: dict[int, int] = {}
        self._counted = 0
        # Index arrays of the penalised tokens, rebuilt only when a new distinct token appears
        # (penalties then touch a few hundred logits, not the whole vocabulary).
        self._seen_ids: np.ndarray | None = None
        self._output_ids: np.ndarray | None = None

    def _update_counts(self, generated_ids: Sequence[int]) -> None:
        # generated_ids normally grows by one token per call; recount if the caller restarted.
        if len(generated_ids) < self._counted:
            self._counts = {}
            self._counted = 0
            self._seen_ids = self._output_ids = None
        for token in generated_ids[self._counted:]:
            token = int(token)
            if 0 <= token < self.vocab_size:
                if token not in self._counts:
                    self._seen_ids = self._output_ids = None
                self._counts[token] = self._counts.get(token, 0) + 1
        self._counted = len(generated_ids)

    def apply_penalties(self, logits: np.ndarray, generated_ids: Sequence[int]) -> np.ndarray:
        p = self.params
        self._update_counts(generated_ids)
        if p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            return logits
        logits = np.array(logits, dtype=np.float32, copy=True)
        if self._output_ids is None:
            self._output_ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            self._seen_ids = np.union1d(self._prompt_ids, self._output_ids)
        if p.repetition_penalty != 1.0 and self._seen_ids.size:
            values = logits[self._seen_ids]
            logits[self._seen_ids] = np.where(values > 0, values / p.repetition_penalty,
                                              values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._output_ids.size:
            counts = np.fromiter((self._counts[t] for t in self._output_ids.tolist()), dtype=np.float32,
                                 count=self._output_ids.size)
            logits[self._output_ids] -= np.float32(p.frequency_penalty) * counts + np.float32(p.presence_penalty)
        return logits

    def sample(self, logits: np.ndarray, generated_ids: Sequence[int] = ()) -> tuple[int, TokenLogprob | None]:
        """Pick the next token from one row of logits ``[vocab]``."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"expected logits of shape ({self.vocab_size},), got {logits.shape}")
        logits = self.apply_penalties(logits, generated_ids)
        token = self._choose(logits)
        return token, self._logprob_info(logits, token)

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        # Unnormalised probabilities, the best token at 1.0 (float32: exp over the whole
        # vocabulary is the sampler's main cost, and float64 is five times slower).
        scaled = logits * np.float32(1.0 / p.temperature)
        weights = np.exp(scaled - scaled.max())
        use_top_k = 0 < p.top_k < self.vocab_size
        if not (use_top_k or p.top_p < 1.0 or p.min_p > 0.0):
            return _draw(weights, self.rng)
        pool = _likely_pool(weights, p.top_k if use_top_k else 0, p.top_p, p.min_p)
        kept = weights[pool]
        mass = float(weights.sum(dtype=np.float64))  # top-p is relative to the whole vocabulary...
        if use_top_k:
            best = np.argpartition(-kept, p.top_k - 1)[:p.top_k]
            pool, kept = pool[best], kept[best]
            mass = float(kept.sum(dtype=np.float64))  # ...or to the top-k survivors
        if p.top_p < 1.0:
            order = _top_p_prefix(kept, p.top_p, mass)
            pool, kept = pool[order], kept[order]
        if p.min_p > 0.0:
            # Relative to the best token, so unaffected by the renormalisations above.
            keep = kept >= p.min_p * kept.max()
            pool, kept = pool[keep], kept[keep]
        return int(pool[_draw(kept, self.rng)])

    def _logprob_info(self, logits: np.ndarray, token: int) -> TokenLogprob | None:
        n_top = self.params.logprobs
        if n_top is None:
            return None
        logprobs = log_softmax(logits)
        top: list[tuple[int, float]] = []
        if n_top > 0:
            best = np.argpartition(-logprobs, n_top - 1)[:n_top]
            best = best[np.lexsort((best, -logprobs[best]))]
            top = [(int(i), float(logprobs[i])) for i in best]
        return TokenLogprob(token, float(logprobs[token]), top)


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to ``weights``, by inverse CDF.

    numpy's ``choice(p=...)`` re-validates ``p`` and is several times slower; a float32 running
    sum is exact enough for sampling and 3x faster than float64 over a whole vocabulary.
    """
    cumulative = np.cumsum(weights, dtype=np.float32)
    index = int(np.searchsorted(cumulative, rng.random() * float(cumulative[-1]), side="right"))
    return min(index, weights.size - 1)


def _top_p_prefix(weights: np.ndarray, top_p: float, mass: float) -> np.ndarray:
    """Indices (best first) of the fewest tokens whose weight reaches ``top_p * mass`` (at least one).

    Sorting everything is slow when the tail is heavy; the prefix usually lies within the best
    few hundred, so sort those (found by a linear-time partition), widening only if needed.
    """
    head = 256
    while True:
        if head >= weights.size:
            order = np.argsort(-weights, kind="stable")
        else:
            best = np.argpartition(-weights, head - 1)[:head]
            order = best[np.argsort(-weights[best], kind="stable")]
        cumulative = np.cumsum(weights[order], dtype=np.float64)
        if cumulative[-1] >= top_p * mass or head >= weights.size:
            keep = int(np.searchsorted(cumulative, top_p * mass, side="left")) + 1
            return order[:min(keep, order.size)]
        head *= 8


def _likely_pool(weights: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Indices of a small set of tokens that provably holds every token truncation can keep.

    Selecting and sorting over the whole vocabulary costs milliseconds per token; nearly all of
    the mass sits in few tokens. Taking the tokens above a weight threshold is exact when the set
    holds the top_k best (top-k), or mass >= top_p of the whole (top-p), because every token left
    out weighs less than every token kept. min_p alone is a threshold itself.
    """
    if top_k == 0 and top_p >= 1.0:
        return np.flatnonzero(weights >= min_p)  # the best token weighs 1.0
    total = None
    for threshold in (1e-3, 1e-6):
        pool = np.flatnonzero(weights >= threshold)
        if top_k:
            if pool.size >= top_k:
                return pool
        else:
            if total is None:
                total = float(weights.sum(dtype=np.float64))
            if float(weights[pool].sum(dtype=np.float64)) >= top_p * total:
                return pool
    return np.arange(weights.size)


def samples_natively_on(device: str) -> bool:
    """Whether the Generator and the server let the runtime sample on this device by default.

    On CUDA it saves the logits copy and the numpy pass. On the CPU the C++ sampler is about as
    fast as the numpy Sampler (docs/RUNTIME.md) but draws other tokens for the same seed, so it
    is used there only with PUMICE_NATIVE_SAMPLING=1 (which makes a seed give the same tokens
    on CPU and GPU).
    """
    if not device.startswith("cpu"):
        return True
    return os.environ.get("PUMICE_NATIVE_SAMPLING", "") == "1"


def native_sampling(params: SamplingParams) -> NativeSampling | None:
    """The runtime sampler's parameters for a request, or None if only ``Sampler`` can honour it.

    The runtime samples inside the step (on CUDA only token ids leave the GPU) but knows
    nothing of logprobs or penalties: those requests keep host logits and the numpy Sampler.
    Greedy requests pick the same argmax either way. A request without a seed gets a random one
    here, once, so that its tokens are still a deterministic function of (seed, position).
    """
    if (params.logprobs is not None or params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(64)
    return NativeSampling(temperature=float(params.temperature),
                          top_k=min(max(int(params.top_k), 0), 2**31 - 1),
                          top_p=float(params.top_p), min_p=float(params.min_p),
                          seed=int(seed) % 2**64)


def stop_token_set(params: SamplingParams, eos_token_ids: Iterable[int]) -> set[int]:
    """Token ids that end generation: the stop ids, plus EOS unless ``ignore_eos``."""
    stops = set(int(t) for t in params.stop_token_ids)
    if not params.ignore_eos:
        stops.update(int(t) for t in eos_token_ids)
    return stops
