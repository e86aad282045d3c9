"""Load metrics of the server in the Prometheus text exposition format (version 0.0.4).

A handful of gauges and counters, written out by hand: the format is a few lines of text, and a
per-server object (rather than prometheus_client's process-wide registry) lets several servers
live in one process, as tests start them. Counters only grow; rates (tokens/s) are
`rate(pumice_generation_tokens_total[1m])` in Prometheus, and the `*_tokens_per_second` gauges give
the same over the last few seconds for a quick look with curl.
"""
from __future__ import annotations

import collections
import threading
import time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_WINDOW_S = 10.0


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.slots_total = 0
        self.queue_length = 0
        self.running_requests = 0
        self.running_sequences = 0
        self.slots_free = 0
        self.requests_total = 0
        self.rejected = collections.Counter()
        self.finished = collections.Counter()      # sequences, by finish reason
        self.cancelled_total = 0
        self.failed_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefill_seconds_total = 0.0
        self.decode_seconds_total = 0.0
        self.decode_steps_total = 0
        self.batch_size_sum = 0
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()

    # -- updates (engine thread, event loop thread)

    def set_load(self, *, queue_length: int, running_requests: int, running_sequences: int,
                 slots_free: int) -> None:
        with self._lock:
            self.queue_length = queue_length
            self.running_requests = running_requests
            self.running_sequences = running_sequences
            self.slots_free = slots_free

    def count_request(self) -> None:
        with self._lock:
            self.requests_total += 1

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled_total += 1

    def count_failed(self) -> None:
        with self._lock:
            self.failed_total += 1

    def add_prefill(self, n_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens_total += n_tokens
            self.prefill_seconds_total += seconds
            self._note(n_prompt=n_tokens, n_generated=0)

    def add_decode(self, batch: int, seconds: float) -> None:
        with self._lock:
            self.generation_tokens_total += batch
            self.decode_seconds_total += seconds
            self.decode_steps_total += 1
            self.batch_size_sum += batch
            self._note(n_prompt=0, n_generated=batch)

    def _note(self, n_prompt: int, n_generated: int) -> None:
        now = time.monotonic()
        self._recent.append((now, n_prompt, n_generated))
        while self._recent and self._recent[0][0] < now - _WINDOW_S:
            self._recent.popleft()

    def recent_rates(self) -> tuple[float, float]:
        """(prompt tokens/s, generated tokens/s) over the last few seconds."""
        now = time.monotonic()
        with self._lock:
            items = [r for r in self._recent if r[0] >= now - _WINDOW_S]
        span = min(_WINDOW_S, max(1e-9, now - self.started_monotonic())) if items else 1.0
        return (sum(r[1] for r in items) / span, sum(r[2] for r in items) / span)

    def started_monotonic(self) -> float:
        return time.monotonic() - (time.time() - self.started)

    # -- exposition

    def render(self) -> str:
        prompt_rate, generation_rate = self.recent_rates()
        with self._lock:
            lines: list[str] = []

            def metric(name, kind, help_text, samples):
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in samples:
                    label_text = ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                                  if labels else "")
                    lines.append(f"{name}{label_text} {_number(value)}")

            metric("pumice_queue_length", "gauge", "Requests waiting for a batch slot.",
                   [({}, self.queue_length)])
            metric("pumice_running_requests", "gauge", "Requests with sequences in the batch.",
                   [({}, self.running_requests)])
            metric("pumice_running_sequences", "gauge",
                   "Sequences (choices) in the running batch.", [({}, self.running_sequences)])
            metric("pumice_batch_slots", "gauge", "Session slots (--max-batch).",
                   [({}, self.slots_total)])
            metric("pumice_batch_slots_free", "gauge", "Session slots not in use.",
                   [({}, self.slots_free)])
            metric("pumice_requests_total", "counter", "Requests accepted into the queue.",
                   [({}, self.requests_total)])
            metric("pumice_requests_rejected_total", "counter", "Requests refused, by reason.",
                   [({"reason": r}, c) for r, c in sorted(self.rejected.items())]
                   or [({"reason": "queue_full"}, 0)])
            metric("pumice_requests_cancelled_total", "counter",
                   "Requests dropped because the client disconnected.",
                   [({}, self.cancelled_total)])
            metric("pumice_requests_failed_total", "counter", "Requests that failed with an error.",
                   [({}, self.failed_total)])
            metric("pumice_sequences_finished_total", "counter",
                   "Completed sequences (choices), by finish reason.",
                   [({"finish_reason": r}, self.finished.get(r, 0)) for r in ("stop", "length")])
            metric("pumice_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                   [({}, self.prompt_tokens_total)])
            metric("pumice_generation_tokens_total", "counter",
                   "Tokens produced by decode steps.", [({}, self.generation_tokens_total)])
            metric("pumice_prefill_seconds_total", "counter", "Time spent in prefill.",
                   [({}, self.prefill_seconds_total)])
            metric("pumice_decode_seconds_total", "counter", "Time spent in decode steps.",
                   [({}, self.decode_seconds_total)])
            metric("pumice_decode_steps_total", "counter", "Decode steps run.",
                   [({}, self.decode_steps_total)])
            metric("pumice_decode_batch_size_sum", "counter",
                   "Sum of batch sizes over decode steps (divide by steps for the mean).",
                   [({}, self.batch_size_sum)])
            metric("pumice_prompt_tokens_per_second", "gauge",
                   f"Prefill throughput over the last {_WINDOW_S:g} s.", [({}, prompt_rate)])
            metric("pumice_generation_tokens_per_second", "gauge",
                   f"Generation throughput over the last {_WINDOW_S:g} s.",
                   [({}, generation_rate)])
            return "\n".join(lines) + "\n"


def _number(value) -> str:
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with labels) → value; for tests and the load benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
