"""`pumice serve`: arguments and the entry point (runtime/cli.py calls these two functions)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("pumice.server")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="the .pumice file to serve")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--max-batch", type=_positive, default=8,
                        help="sequences decoded together, each with its own KV cache (default 8)")
    parser.add_argument("--max-queue", type=_non_negative, default=64,
                        help="requests waiting for a slot before new ones get 429 (default 64)")
    parser.add_argument("--n-ctx", type=_positive, default=None,
                        help="context length of each KV cache (default: the model's maximum)")
    parser.add_argument("--api-key", default=os.environ.get("PUMICE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes "
                             "(default: $PUMICE_API_KEY, else no key)")
    parser.add_argument("--model-name", default=None,
                        help="model id clients send (default: the file name without .pumice)")
    parser.add_argument("--threads", type=_non_negative, default=None,
                        help="CPU threads for the native runtime (default: all cores)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the CRC-32 check of the weights at load")
    parser.add_argument("--prefill-chunk", type=_positive, default=256,
                        help="prompt tokens prefilled per step while others decode (default 256)")
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="always prefill whole prompts (no reuse of a freed cache's prefix)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine thread, serve HTTP until interrupted. Returns an exit code."""
    import uvicorn

    from ..runtime.native import PumiceError
    from .app import create_app
    from .model import ServedModel
    from .scheduler import Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    path = Path(args.model)
    if not path.is_file():
        print(f"pumice serve: no such file: {path}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("binding to %s without --api-key: anyone who can reach this address can "
                    "use the model", args.host)
    try:
        model = ServedModel(path, device=args.device, n_ctx=args.n_ctx, n_threads=args.threads,
                            verify_checksums=not args.no_verify)
    except Exception as exc:  # noqa: BLE001 — any failure here means: nothing to serve
        kind = "" if isinstance(exc, (PumiceError, ValueError, OSError)) else \
            f" ({type(exc).__name__}; is the native library current?)"
        print(f"pumice serve: cannot load {path}: {exc}{kind}", file=sys.stderr)
        return 1
    name = args.model_name or path.name.removesuffix(".pumice")
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk,
                    prefix_reuse=not args.no_prefix_reuse).start()
    app = create_app(engine, name, api_key=args.api_key)
    log.info("serving %s as '%s' on http://%s:%d (device %s, max batch %d, context %d)",
             path, name, args.host, args.port, args.device, args.max_batch, model.n_ctx)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.stop()
        model.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pumice serve",
                                     description="OpenAI-compatible HTTP server for a .pumice model")
    return run_serve(add_serve_arguments(parser).parse_args(argv))
