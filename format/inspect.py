"""`pumice inspect FILE`: what a .pumice file holds and how many bits each weight costs."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .kinds import stored_bits, summarize
from .reader import PumiceFile, TensorInfo

_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings")
_LINEAR_PARTS = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.",
                 ".self_attn.o_proj.", ".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


def is_decoder_linear(name: str) -> bool:
    return (name.startswith("model.layers.") and name.endswith(".weight")
            and any(part in name for part in _LINEAR_PARTS))


def bits_per_weight(tensors: list[TensorInfo]) -> float:
    """Stored bits (all parts) over logical weights; nan when there are none."""
    weights = sum(t.numel for t in tensors)
    return sum(stored_bits(t) for t in tensors) / weights if weights else math.nan


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _params_text(info: TensorInfo) -> str:
    try:
        text = summarize(info.kind, info.shape, info.params)
    except Exception:
        text = ""
    if info.kind == "dense":
        text = info.parts["weight"].dtype
    return text


def inspect_file(path: str | Path, verify: bool = True, tensors: bool = True) -> str:
    """The report `pumice inspect` prints."""
    lines: list[str] = []
    with PumiceFile(path, verify=verify) as f:
        meta = f.metadata
        lines.append(f"file: {f.path}  ({_size(f.path.stat().st_size)}, format version {f.version}, "
                     f"alignment {f.alignment}, checksums {'verified' if verify else 'not checked'})")
        lines.append(f"architecture: {meta.get('architecture')}")
        config = meta.get("config") or {}
        for key in _CONFIG_KEYS:
            if key in config:
                lines.append(f"  {key}: {config[key]}")
        provenance = meta.get("provenance") or {}
        if provenance:
            lines.append("provenance:")
            for key, value in provenance.items():
                lines.append(f"  {key}: {value}")
        tokenizer = meta.get("tokenizer") or {}
        special = meta.get("special_tokens") or {}
        lines.append(f"tokenizer: {tokenizer.get('type')} (blob {tokenizer.get('blob')!r}); "
                     f"bos {special.get('bos_token_id')}, eos {special.get('eos_token_ids')}, "
                     f"add_bos {special.get('add_bos_token')}")
        template = meta.get("chat_template")
        lines.append(f"chat template: {'present (%d chars)' % len(template) if template else 'none'}")
        if meta.get("generation"):
            lines.append(f"generation defaults: {meta['generation']}")

        infos = list(f.tensors.values())
        if tensors:
            name_width = max([len(t.name) for t in infos] + [4])
            header = (f"{'name':<{name_width}}  {'kind':<8} {'shape':<14} {'params':<14} "
                      f"{'stored':>10} {'bits/w':>7}")
            lines += ["", header, "-" * len(header)]
            for t in infos:
                bpw = stored_bits(t) / t.numel if t.numel and t.kind != "blob" else math.nan
                shape = "x".join(str(s) for s in t.shape)
                lines.append(f"{t.name:<{name_width}}  {t.kind:<8} {shape:<14} "
                             f"{_params_text(t):<14} {_size(t.stored_bytes):>10} "
                             f"{'' if math.isnan(bpw) else f'{bpw:.3f}':>7}")
        linear = [t for t in infos if is_decoder_linear(t.name)]
        weights = [t for t in infos if t.kind != "blob"]
        kinds = sorted({t.kind for t in linear})
        lines.append("")
        lines.append(f"decoder linear layers: {len(linear)} tensors, "
                     f"{sum(t.numel for t in linear):,} weights, kinds {kinds}: "
                     f"{bits_per_weight(linear):.3f} bits per weight")
        lines.append(f"all weights: {len(weights)} tensors, {sum(t.numel for t in weights):,} "
                     f"weights, {_size(sum(t.stored_bytes for t in weights))}: "
                     f"{bits_per_weight(weights):.3f} bits per weight")
    return "\n".join(lines)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help=".pumice file")
    parser.add_argument("--no-verify", action="store_true", help="skip the CRC-32 checks")
    parser.add_argument("--summary", action="store_true", help="omit the per-tensor table")


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report; a bad or missing file prints one error line and returns 1."""
    from .errors import FormatError
    try:
        report = inspect_file(args.file, verify=not args.no_verify, tensors=not args.summary)
    except (FormatError, OSError) as err:
        print(f"pumice inspect: error: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pumice inspect", description=__doc__)
    add_inspect_arguments(parser)
    return run_inspect(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
