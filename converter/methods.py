"""Conversion methods and what they are given: the registry behind `convert(method=...)`.

A method is a function ``fn(ctx: ConversionContext) -> None`` that writes every weight tensor of
the model through ``ctx``; `convert` has already opened the checkpoint and the writer and, after
the method returns, writes the tokenizer blob and metadata (with ``ctx.provenance``) and closes
the file. Register it once, at import time of its module:

    from pumice.converter.methods import register_method

    def convert_mymethod(ctx):
        def quantize(ctx, name, weight):          # weight: float32 torch tensor [out, in]
            parts = ...                           # arrays per the kind's FORMAT.md section
            return "mykind", {"bits": ctx.bits}, parts
        ctx.run(quantize)                         # FORMAT.md order; embeddings/norms by policy

    register_method("mymethod", convert_mymethod, defaults={"bits": 2, "group_size": None},
                    description="...")

and add its module to `PLUGIN_MODULES` below (one line). `ctx.run(quantize, on_layer=hook)` calls
``hook(ctx, layer)`` before each decoder layer (calibration-driven methods run their activations
there); methods that need their own loop use ``ctx.write_tensor`` / ``ctx.write_passthrough``
directly and keep the order of docs/FORMAT.md section 4. Method-specific options passed to
`convert(**method_options)` (e.g. ``calib=...``) are in ``ctx.options``; a method should reject
options it does not know (``ctx.check_options({...})``).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pumice.format import PumiceWriter

from .hf import Checkpoint, is_decoder_linear
from .rtn import DEFAULT_GROUP_SIZE, quantize_rtn

# Modules that register methods when imported (one line per method family).
PLUGIN_MODULES: list[str] = [
    "pumice.converter.caldera.method",
    "pumice.converter.bcq",
]

_TORCH_DTYPES = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# Embeddings (and an untied head) of quantized methods: 8-bit codes in groups of 32 keep them
# near-lossless at a quarter of bf16's size.
DEFAULT_EMBEDDING = "rtn8g32"
GENERIC_OPTIONS = ("bits", "group_size", "dtype", "embedding")


def parse_dtype(value: Any) -> torch.dtype | None:
    """'f32' / 'f16' / 'bf16' (or their torch names) -> torch dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return _TORCH_DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"dtype {value!r} is not one of f32, f16, bf16") from None


@dataclass(frozen=True)
class EmbeddingPolicy:
    """How embeddings and an untied head are stored: dense (dtype None = source) or rtn."""
    kind: str                     # "dense" or "rtn"
    dtype: torch.dtype | None = None
    bits: int | None = None
    group_size: int | None = None

    @classmethod
    def parse(cls, value: str | None, quantized: bool, dtype: torch.dtype | None
              ) -> "EmbeddingPolicy":
        """None -> the default (dense in `dtype` or the source dtype for dense conversions,
        rtn8g32 for quantized ones); 'dense'; 'f32'/'f16'/'bf16'; 'rtnB' or 'rtnBgG'."""
        if value is None:
            value = DEFAULT_EMBEDDING if quantized else "dense"
        text = str(value).lower()
        if text == "dense":
            return cls("dense", dtype)
        if text in _TORCH_DTYPES:
            return cls("dense", _TORCH_DTYPES[text])
        match = re.fullmatch(r"rtn(\d+)(?:g(\d+))?", text)
        if match:
            from .rtn import RTN_BITS
            bits, group_size = int(match.group(1)), int(match.group(2) or 32)
            if bits not in RTN_BITS or group_size % 32 or not 32 <= group_size <= 4096:
                raise ValueError(f"embedding {value!r}: rtn needs bits in {RTN_BITS} and a group "
                                 f"size that is a multiple of 32 in [32, 4096]")
            return cls("rtn", None, bits, group_size)
        raise ValueError(f"embedding {value!r}: expected 'dense', 'f32', 'f16', 'bf16', 'rtnB' or "
                         f"'rtnBgG' (e.g. rtn8g32)")

    def describe(self) -> str:
        if self.kind == "rtn":
            return f"rtn{self.bits}g{self.group_size}"
        return "dense" if self.dtype is None else f"dense-{str(self.dtype).split('.')[-1]}"


@dataclass
class Method:
    name: str
    fn: Callable[["ConversionContext"], None]
    quantized: bool = True
    defaults: dict = field(default_factory=dict)
    description: str = ""


_METHODS: dict[str, Method] = {}
_plugins_loaded = False


def register_method(name: str, fn: Callable[["ConversionContext"], None], *,
                    quantized: bool = True, defaults: dict | None = None,
                    description: str = "") -> None:
    """Make `convert(method=name)` call fn(ctx). `defaults` fill convert's bits/group_size/...
    when the caller leaves them None; `quantized` selects the embedding default."""
    _METHODS[name] = Method(name, fn, quantized, dict(defaults or {}), description)


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for module in PLUGIN_MODULES:
            importlib.import_module(module)


def get_method(name: str) -> Method:
    _load_plugins()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown conversion method {name!r} (available: "
                         f"{', '.join(sorted(_METHODS))})") from None


def available_methods() -> dict[str, Method]:
    _load_plugins()
    return dict(sorted(_METHODS.items()))


class ConversionContext:
    """Everything a method needs: the checkpoint, the writer, options, progress, provenance."""

    def __init__(self, checkpoint: Checkpoint, writer: PumiceWriter, method: Method,
                 options: dict, progress):
        self.checkpoint = checkpoint
        self.writer = writer
        self.method = method
        self.options = options
        self.progress = progress
        self.provenance: dict[str, Any] = {}
        self.bits = options.get("bits")
        self.group_size = options.get("group_size")
        self.dtype = parse_dtype(options.get("dtype"))
        self.embedding = EmbeddingPolicy.parse(options.get("embedding"), method.quantized,
                                               self.dtype)

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    def check_options(self, known: set[str] | tuple[str, ...]) -> None:
        """Reject method options this method does not understand (typos, wrong method)."""
        unknown = sorted(set(self.options) - set(known) - set(GENERIC_OPTIONS))
        if unknown:
            raise ValueError(f"method {self.method.name!r} does not take option(s) {unknown}")

    # -- writing -----------------------------------------------------------------------------
    def shape_of(self, name: str) -> list[int]:
        return self.checkpoint.shape(name)

    def write_tensor(self, name: str, kind: str, params: dict, parts: dict,
                     shape: list[int] | None = None) -> None:
        """Write one tensor (shape defaults to the checkpoint's) and advance the progress bar."""
        if shape is None:
            shape = self.shape_of(name)
        self.writer.add_tensor(name, kind, shape, params, parts)
        self.progress.update(1)

    def write_dense(self, name: str, tensor: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Dense in `dtype` (None: keep f32/f16/bf16 sources as they are, others -> f32)."""
        tensor = self.checkpoint.get(name) if tensor is None else tensor
        if dtype is None and tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32
        if dtype is not None:
            tensor = tensor.to(dtype)
        self.write_tensor(name, "dense", {}, {"weight": tensor}, shape=list(tensor.shape))

    def write_rtn(self, name: str, tensor: torch.Tensor | None, bits: int,
                  group_size: int) -> None:
        tensor = self.checkpoint.get(name) if tensor is None else tensor
        parts = quantize_rtn(tensor.to(torch.float32), bits, group_size)
        self.write_tensor(name, "rtn", {"bits": bits, "group_size": group_size}, parts,
                          shape=list(tensor.shape))

    def write_passthrough(self, name: str) -> None:
        """A tensor the method does not compress: embeddings and head by the embedding policy;
        norms and biases dense (f32 for quantized methods, `dtype` or source dtype otherwise)."""
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            policy = self.embedding
            if policy.kind == "rtn":
                self.write_rtn(name, None, policy.bits, policy.group_size)
            else:
                self.write_dense(name, None, policy.dtype)
        else:
            self.write_dense(name, None, torch.float32 if self.method.quantized else self.dtype)

    def run(self, quantize_linear: Callable[["ConversionContext", str, torch.Tensor],
                                            tuple[str, dict, dict]],
            on_layer: Callable[["ConversionContext", int], None] | None = None) -> None:
        """Write every tensor in file order: decoder linear weights through quantize_linear
        (given float32 weights, returns (kind, params, parts)), the rest by write_passthrough."""
        self.write_passthrough("model.embed_tokens.weight")
        for layer in range(self.config["num_hidden_layers"]):
            if on_layer is not None:
                on_layer(self, layer)
            for name in self.checkpoint.layer_names(layer):
                if is_decoder_linear(name):
                    weight = self.checkpoint.get(name)
                    kind, params, parts = quantize_linear(self, name, weight.to(torch.float32))
                    self.write_tensor(name, kind, params, parts, shape=list(weight.shape))
                else:
                    self.write_passthrough(name)
        self.write_passthrough("model.norm.weight")
        if not self.config["tie_word_embeddings"]:
            self.write_passthrough("lm_head.weight")


# ---------------------------------------------------------------------------------------------
# Built-in methods

def _convert_dense(ctx: ConversionContext) -> None:
    ctx.check_options(())
    if ctx.bits is not None or ctx.group_size is not None:
        raise ValueError("method 'dense' takes no bits or group_size (use --dtype to change "
                         "the stored precision)")
    if ctx.dtype is not None:
        ctx.provenance["dtype"] = str(ctx.dtype).split(".")[-1]

    for name in ctx.checkpoint.tensor_names():
        if is_decoder_linear(name):
            ctx.write_dense(name, None, ctx.dtype)
        else:
            ctx.write_passthrough(name)


def _convert_rtn(ctx: ConversionContext) -> None:
    ctx.check_options(("grid", "refine_steps", "min_shrink", "weighting"))
    from .rtn import RTN_BITS
    if ctx.bits not in RTN_BITS or isinstance(ctx.bits, bool):
        raise ValueError(f"method 'rtn' needs bits in {RTN_BITS}, got {ctx.bits}")
    ctx.bits = int(ctx.bits)
    if not isinstance(ctx.group_size, int) or ctx.group_size % 32 or \
            not 32 <= ctx.group_size <= 4096:
        raise ValueError(f"method 'rtn' needs a group size that is a multiple of 32 in "
                         f"[32, 4096], got {ctx.group_size}")
    grid = ctx.options.get("grid")
    refine = ctx.options.get("refine_steps")
    search = {k: ctx.options[k] for k in ("min_shrink", "weighting")
              if k in ctx.options}

    def quantize(ctx, name, weight):
        parts = quantize_rtn(weight, ctx.bits, ctx.group_size, grid=grid, refine_steps=refine,
                             **search)
        return "rtn", {"bits": ctx.bits, "group_size": ctx.group_size}, parts

    ctx.run(quantize)


register_method("dense", _convert_dense, quantized=False,
                description="every tensor dense, in the checkpoint's dtype (or --dtype)")
register_method("rtn", _convert_rtn, defaults={"bits": 4, "group_size": DEFAULT_GROUP_SIZE},
                description="per-group asymmetric round-to-nearest with clipping search")
