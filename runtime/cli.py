"""The ``pumice`` command.

    pumice convert HF_DIR -o model.pumice [--method rtn --bits 4 ...]
    pumice inspect model.pumice
    pumice generate model.pumice "Once upon a time" [--max-tokens 64 --temperature 0 --stream]
    pumice chat model.pumice [--system "..."]
    pumice perplexity model.pumice --text FILE [--window 1024 --max-windows 4]
    pumice serve model.pumice [--port 8000]

User errors (missing files, bad arguments, corrupt models) print one line to stderr and exit
with status 1 (2 for usage errors); set PUMICE_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

# Subcommands implemented by other packages: (module, add-arguments function, run function).
# They are imported only when chosen, so `pumice generate` never imports the server or torch.
_DELEGATED = {
    "convert": ("pumice.converter.cli", "add_convert_arguments", "run_convert",
                "convert a Hugging Face checkpoint to a .pumice file"),
    "inspect": ("pumice.format.inspect", "add_inspect_arguments", "run_inspect",
                "show a .pumice file's metadata and tensors"),
    "serve": ("pumice.server.cli", "add_serve_arguments", "run_serve",
              "OpenAI-compatible HTTP server"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .pumice file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the weights at load")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config)")
    group.add_argument("--max-tokens", type=_positive_int, default=None, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--min-p", type=float, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--presence-penalty", type=float, default=None)
    group.add_argument("--frequency-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past EOS")
    parser.add_argument("--n-ctx", type=_positive_int, default=None, help="context length (default: the model's)")


_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _SAMPLING_FIELDS if getattr(args, name) is not None}


def _open_generator(args: argparse.Namespace):
    from .generator import Generator
    return Generator(args.model, device=args.device, n_ctx=args.n_ctx, n_threads=args.threads,
                     verify_checksums=not args.no_verify)


# -- generate


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    parser.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    parser.add_argument("--chat", action="store_true", help="send the prompt as one user message through the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    _add_sampling_arguments(parser)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as handle:
            return handle.read()
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        raise ValueError("no prompt: pass it as an argument, with --prompt-file, or on stdin")
    return sys.stdin.read()


def _run_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    sampling = _sampling_kwargs(args)
    with _open_generator(args) as generator:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": prompt})
            prompt_ids = generator.chat_prompt(messages)
        else:
            prompt_ids = generator.encode_prompt(prompt)
        params = generator.sampling_params(**sampling)
        started = time.perf_counter()
        if args.stream:
            completion = 0
            finish = None
            for event in generator.stream_events(prompt_ids, params):
                completion += event.token_id is not None
                finish = event.finish_reason or finish
                if event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            if args.stats:
                elapsed = time.perf_counter() - started
                print(f"[{len(prompt_ids)} prompt + {completion} generated tokens in {elapsed:.2f} s; "
                      f"finish: {finish}]", file=sys.stderr)
        else:
            result = generator.generate(prompt_ids, params)
            print(result.text)
            if args.stats:
                print(f"[{result.prompt_tokens} prompt tokens ({result.cached_tokens} cached), "
                      f"prefill {result.prefill_tokens_per_second:.1f} tok/s; {result.completion_tokens} "
                      f"generated, decode {result.decode_tokens_per_second:.1f} tok/s; "
                      f"finish: {result.finish_reason}]", file=sys.stderr)
    return 0


# -- chat


def _add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system message")
    _add_sampling_arguments(parser)


_CHAT_HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D)"


def _run_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    sampling = _sampling_kwargs(args)
    with _open_generator(args) as generator:
        if not generator.chat_template:
            raise ValueError(f"{args.model} has no chat template; use `pumice generate` instead")
        params = generator.sampling_params(**sampling)
        system = [{"role": "system", "content": args.system}] if args.system else []
        history: list[dict] = list(system)
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            print(f"pumice chat: {os.path.basename(args.model)}. {_CHAT_HELP}", file=sys.stderr)
        while True:
            if interactive:
                try:
                    line = input("> ")
                except EOFError:
                    print(file=sys.stderr)
                    break
            else:
                line = sys.stdin.readline()
                if not line:
                    break
                line = line.rstrip("\n")
            command = line.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = list(system)
                print("(conversation cleared)", file=sys.stderr)
                continue
            if command.startswith("/") and command.split()[0] in ("/help", "/?"):
                print(_CHAT_HELP, file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            pieces = []
            try:
                for piece in generator.chat(history, stream=True, params=params):
                    pieces.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                if not interactive:
                    raise
                print(" [interrupted]", file=sys.stderr)
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(pieces)})
    return 0


# -- perplexity


def _add_perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--text", required=True, help="a UTF-8 text file ('-' for stdin)")
    parser.add_argument("--window", type=_positive_int, default=1024, help="tokens per window (default 1024)")
    parser.add_argument("--stride", type=_positive_int, default=None,
                        help="tokens between window starts (default: the window, no overlap)")
    parser.add_argument("--max-windows", type=_positive_int, default=None, help="score at most this many windows")
    parser.add_argument("--quiet", action="store_true", help="no per-window progress on stderr")


def _run_perplexity(args: argparse.Namespace) -> int:
    from pumice.format.reader import PumiceFile

    from .native import NativeModel
    from .perplexity import text_perplexity
    from .tokenizer import Tokenizer

    if args.text == "-":
        text = sys.stdin.read()
    else:
        with open(args.text, encoding="utf-8") as handle:
            text = handle.read()
    with NativeModel(args.model, device=args.device, n_threads=args.threads,
                     verify_checksums=not args.no_verify) as model:
        with PumiceFile(args.model, verify=False) as pumice_file:
            tokenizer = Tokenizer.from_pumice(pumice_file)

        def progress(done: int, total: int, running: float) -> None:
            if not args.quiet:
                print(f"  window {done}/{total}: running perplexity {running:.4f}", file=sys.stderr)

        result = text_perplexity(model, tokenizer, text, window=args.window, stride=args.stride,
                                 max_windows=args.max_windows, progress=progress)
    print(f"perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens "
          f"({result.windows} windows of {args.window}, stride {args.stride or args.window}); "
          f"{result.tokens_per_second:.1f} tokens/s")
    return 0


# -- entry point


_LOCAL: dict[str, tuple[Callable, Callable, str]] = {
    "generate": (_add_generate_arguments, _run_generate, "generate text from a prompt"),
    "chat": (_add_chat_arguments, _run_chat, "chat with a model (interactive, or lines on stdin)"),
    "perplexity": (_add_perplexity_arguments, _run_perplexity, "perplexity of a model over a text"),
}


def _build_parser(chosen: str | None) -> argparse.ArgumentParser:
    from pumice import __version__

    parser = argparse.ArgumentParser(prog="pumice", description="Run language models compressed below 3 bits per weight.")
    parser.add_argument("--version", action="version", version=f"pumice {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ("convert", "inspect", "generate", "chat", "perplexity", "serve"):
        if name in _LOCAL:
            add_arguments, run, summary = _LOCAL[name]
            sub = commands.add_parser(name, help=summary, description=summary)
            add_arguments(sub)
            sub.set_defaults(run=run)
        else:
            module_name, add_name, run_name, summary = _DELEGATED[name]
            sub = commands.add_parser(name, help=summary, description=summary)
            if name == chosen:  # import the implementation only when it is used
                import importlib
                try:
                    module = importlib.import_module(module_name)
                except ImportError as exc:
                    raise SystemExit(f"pumice: error: `pumice {name}` is unavailable: {exc}") from None
                getattr(module, add_name)(sub)
                sub.set_defaults(run=getattr(module, run_name))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, OSError]
    from .native import PumiceError
    errors.append(PumiceError)
    try:
        from pumice.format.errors import FormatError
        errors.append(FormatError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    debug = bool(os.environ.get("PUMICE_DEBUG"))
    try:
        parser = _build_parser(chosen)
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a message.
        sys.stderr.close()
        return 1
    except _user_errors() as exc:
        if debug:
            raise
        message = str(exc) or type(exc).__name__
        print(f"pumice: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
