"""`pumice convert`: the command-line face of `pumice.converter.convert`.

`add_convert_arguments(parser)` declares the flags and `run_convert(args)` runs a conversion;
pumice.runtime.cli wires them into the `pumice` command. Method-specific flags are added here
by the method's owner (a line in `add_convert_arguments` and a line in `_method_options`).
"""
from __future__ import annotations

import argparse
import sys


def _bits(text: str) -> int | float:
    """An integer where the value is integral (rtn's params must be JSON integers)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value.is_integer() else value


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, weights, "
                                       "tokenizer)")
    parser.add_argument("-o", "--output", required=True, help="output .pumice file")
    parser.add_argument("--method", default="dense",
                        help="dense (default), rtn, or a registered method (caldera, lplr, bcq)")
    parser.add_argument("--bits", type=_bits, default=None,
                        help="bits per weight of the method's codes (rtn: 2, 3, 4 or 8; default 4; "
                             "some methods take fractional budgets)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="columns per quantization group (rtn: multiple of 32; default 64)")
    parser.add_argument("--dtype", choices=("f32", "f16", "bf16"), default=None,
                        help="dense tensors' dtype (default: the checkpoint's)")
    parser.add_argument("--embedding", default=None,
                        help="embedding/lm_head storage: dense, f32, f16, bf16, rtnB or rtnBgG "
                             "(default: dense for --method dense, rtn8g32 otherwise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--calib", default=None, help="calibration text file for calibration-aware methods (caldera, lplr, bcq; default: the pydoc text)")
    parser.add_argument("--calib-sequences", type=int, default=None, help="calibration sequences (default 32)")
    parser.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence")
    parser.add_argument("--calib-cache", default=None, help="file to cache calibration statistics (H = E[x xᵀ]) in")
    parser.add_argument("--ranks", default=None, help="caldera/lplr: candidate ranks of L·R, comma-separated")
    parser.add_argument("--iters", type=int, default=None, help="caldera: alternating-minimisation iterations")


def _method_options(args: argparse.Namespace) -> dict:
    """Method-specific flags -> convert(**options); flags left unset are not passed."""
    options = {}
    options.update(calib=args.calib, n_sequences=args.calib_sequences, seq_len=args.calib_seq_len, calib_cache=args.calib_cache)
    options.update(ranks=args.ranks, iters=args.iters)
    return {k: v for k, v in options.items() if v is not None}


def run_convert(args: argparse.Namespace) -> int:
    from . import convert
    from .hf import CheckpointError
    from pumice.format import FormatError
    try:
        path = convert(args.hf_dir, args.output, method=args.method, bits=args.bits,
                       group_size=args.group_size, dtype=args.dtype, embedding=args.embedding,
                       progress=not args.no_progress, **_method_options(args))
    except (CheckpointError, FormatError, ValueError, OSError) as err:
        print(f"pumice convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pumice convert",
                                     description="Convert a Hugging Face checkpoint to .pumice")
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
