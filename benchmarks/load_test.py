"""Load test of `pumice serve`: concurrent streaming clients against a server it starts itself.

    python benchmarks/load_test.py MODEL.pumice [--clients 1 8] [--duration 30] [--max-tokens 64]
    python benchmarks/load_test.py --random-like HF_DIR [...]   # random weights, HF_DIR's shape

For each client count the server is started afresh (on a free loopback port, --max-batch at
least the client count), warmed up with one request, then every client runs a loop of streamed
chat completions for `--duration` seconds (no new request after that; each request has a
timeout, and the loop is capped by `--max-requests-per-client`). Each request asks for exactly
`--max-tokens` tokens (`ignore_eos`), so every phase does comparable work.

Reported per phase: completed and cleanly failed requests (an HTTP error or an error event;
anything else counts as broken), requests/s, aggregate generated tokens/s, p50/p99 time to first
token, and the mean decode batch size from /metrics. Then the throughput ratio of the largest to
the smallest client count (target: 8 clients ≥ 3× one client).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pumice.server.metrics import parse_metrics

QUESTIONS = [
    "Explain how a refrigerator works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a child.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the history of the printing press.",
    "How do vaccines train the immune system?",
]


@dataclass
class Phase:
    clients: int
    seconds: float = 0.0
    completed: int = 0
    failed: int = 0
    broken: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    mean_batch: float = 0.0

    def row(self) -> list[str]:
        ttft = sorted(self.ttft)

        def pct(q):
            if not ttft:
                return float("nan")
            return ttft[min(len(ttft) - 1, int(round(q * (len(ttft) - 1))))] * 1000
        return [str(self.clients), f"{self.seconds:.1f}", str(self.completed), str(self.failed),
                str(self.broken), f"{self.completed / self.seconds:.2f}",
                f"{self.tokens / self.seconds:.1f}", f"{pct(0.5):.0f}", f"{pct(0.99):.0f}",
                f"{self.mean_batch:.2f}"]


HEADER = ["clients", "seconds", "completed", "failed", "broken", "req/s", "tokens/s",
          "TTFT p50 ms", "TTFT p99 ms", "mean batch"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "pumice.server", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(max_batch),
               "--max-queue", str(max(64, 2 * max_batch)), "--n-ctx", str(args.n_ctx),
               "--device", args.device, "--model-name", "bench", "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not start within 300 s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def one_request(http: httpx.AsyncClient, base: str, index: int, args, phase: Phase,
                      record: bool) -> None:
    body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": index,
            "ignore_eos": True}
    started = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with http.stream("POST", f"{base}/v1/chat/completions", json=body,
                               timeout=args.request_timeout) as response:
            if response.status_code != 200:
                await response.aread()
                if record:
                    phase.failed += 1
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    if record:
                        phase.failed += 1
                    return
                if first is None and any(c.get("delta", {}).get("content")
                                         for c in chunk.get("choices", [])):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if not record:
                return
            if done and first is not None:
                phase.completed += 1
                phase.tokens += tokens
                phase.ttft.append(first)
            else:
                phase.broken += 1
    except (httpx.HTTPError, json.JSONDecodeError, asyncio.TimeoutError):
        if record:
            phase.broken += 1


async def run_phase(base: str, clients: int, args) -> Phase:
    phase = Phase(clients)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as http:
        await one_request(http, base, 0, args, phase, record=False)  # warm-up
        before = parse_metrics((await http.get(f"{base}/metrics")).text)
        started = time.perf_counter()
        deadline = started + args.duration

        async def client_loop(client: int):
            for i in range(args.max_requests_per_client):
                if time.perf_counter() >= deadline:
                    break
                await one_request(http, base, client * 1000 + i, args, phase, record=True)
        await asyncio.gather(*(client_loop(c) for c in range(clients)))
        phase.seconds = time.perf_counter() - started
        after = parse_metrics((await http.get(f"{base}/metrics")).text)
        steps = after["pumice_decode_steps_total"] - before["pumice_decode_steps_total"]
        summed = after["pumice_decode_batch_size_sum"] - before["pumice_decode_batch_size_sum"]
        phase.mean_batch = summed / steps if steps else 0.0
    return phase


def random_model(hf_dir: Path) -> str:
    """A .pumice file shaped like hf_dir's model, with random weights (seed 0)."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pumice.converter import convert

    folder = Path(tempfile.mkdtemp(prefix="pumice-load-test-"))
    checkpoint = folder / "checkpoint"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
    model.to(torch.bfloat16).save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, checkpoint / name)
    output = folder / "random.pumice"
    convert(checkpoint, output, method="dense")
    return str(output)


def gpu_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return f" ({names[0].strip()})" if names and names[0].strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="the .pumice file to serve")
    parser.add_argument("--random-like", metavar="HF_DIR",
                        help="instead of MODEL, serve a model with HF_DIR's config and tokenizer "
                             "and random weights (converted dense into a temporary folder): "
                             "throughput does not depend on the weights' values, and machines "
                             "that cannot hold the real checkpoint can still be measured")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds of load per phase (default 30)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of every request (0: greedy)")
    parser.add_argument("--max-requests-per-client", type=int, default=1000)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.clients) or args.duration <= 0 or args.max_tokens < 1:
        parser.error("client counts, --duration and --max-tokens must be positive")
    if (args.model is None) == (args.random_like is None):
        parser.error("give either MODEL or --random-like HF_DIR")
    if args.random_like:
        args.model = random_model(Path(args.random_like))
    if not Path(args.model).is_file():
        parser.error(f"no such file: {args.model}")

    phases = []
    for clients in args.clients:
        process, base = start_server(args.model, max(clients, 1), args)
        try:
            phases.append(asyncio.run(run_phase(base, clients, args)))
        except httpx.HTTPError as exc:
            if process.poll() is not None:
                raise SystemExit(f"the server died during the {clients}-client phase "
                                 f"(exit status {process.returncode})") from None
            raise SystemExit(f"the {clients}-client phase failed: {exc}") from None
        finally:
            stop_server(process)
        print(f"{clients} client(s): done", file=sys.stderr, flush=True)

    print(f"command: python benchmarks/load_test.py {' '.join(argv or sys.argv[1:])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"device {args.device}{gpu_name() if args.device.startswith('cuda') else ''}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"model {Path(args.model).name}; {args.max_tokens} tokens per request, "
          f"temperature {args.temperature}")
    print()
    print(markdown_table([p.row() for p in phases]))
    low, high = min(phases, key=lambda p: p.clients), max(phases, key=lambda p: p.clients)
    if low is not high and low.tokens:
        ratio = (high.tokens / high.seconds) / (low.tokens / low.seconds)
        print(f"\naggregate tokens/s, {high.clients} clients / {low.clients} client(s): "
              f"{ratio:.2f}x (target >= 3x for 8 vs 1)")
    return 0 if all(p.broken == 0 for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
