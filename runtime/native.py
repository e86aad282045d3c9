"""cffi binding (ABI mode) to the native runtime described by csrc/include/pumice.h.

No compiler is needed at import time: the C declarations are read from the header itself
(installed as pumice/include/pumice.h, or csrc/include/pumice.h in a source checkout) and the
shared library is opened with ``ffi.dlopen``. Library lookup order:

1. ``PUMICE_CUDA_LIBRARY`` (only for ``device="cuda"``), then ``PUMICE_LIBRARY``: a full path;
2. ``lib/libpumice.so`` (``lib/libpumice_cuda.so`` for CUDA) in each ``pumice`` package folder.

Native objects are freed deterministically by ``close()`` (or a ``with`` block) and otherwise
when the Python object is collected; a session keeps its model alive.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "PumiceError", "PumiceIOError", "PumiceFormatError", "UnsupportedError", "InvalidArgumentError",
    "OutOfMemoryError", "ContextFullError", "DeviceError", "InternalError",
    "NativeModel", "NativeSession", "NativeSampling", "decode_batch", "decode_batch_sample",
    "library_version", "load_library",
]


# --------------------------------------------------------------------------------------------
# Errors


class PumiceError(Exception):
    """A failed native call. ``status`` is the pumice_status code (see pumice.h)."""

    status = 8

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class PumiceIOError(PumiceError):
    status = 1


class PumiceFormatError(PumiceError):
    status = 2


class UnsupportedError(PumiceError):
    status = 3


class InvalidArgumentError(PumiceError):
    status = 4


class OutOfMemoryError(PumiceError):
    status = 5


class ContextFullError(PumiceError):
    status = 6


class DeviceError(PumiceError):
    status = 7


class InternalError(PumiceError):
    status = 8


_ERROR_BY_STATUS = {cls.status: cls for cls in (
    PumiceIOError, PumiceFormatError, UnsupportedError, InvalidArgumentError, OutOfMemoryError,
    ContextFullError, DeviceError, InternalError)}


class LibraryNotFoundError(PumiceError, ImportError):
    """The native library (or its header) could not be located."""

    status = 3


# --------------------------------------------------------------------------------------------
# Loading the header and the library

_HEADER_NAME = "pumice.h"
_SOURCE_HEADER = Path(__file__).resolve().parent.parent / "csrc" / "include" / _HEADER_NAME


def _package_dirs() -> list[Path]:
    try:
        import pumice
        return [Path(p) for p in getattr(pumice, "__path__", [])]
    except ImportError:  # imported outside the package (e.g. a bare source tree)
        return []


def _find_header() -> Path:
    candidates = [d / "include" / _HEADER_NAME for d in _package_dirs()] + [_SOURCE_HEADER]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise LibraryNotFoundError(
        "cannot find the C header pumice.h (looked in: "
        + ", ".join(str(c) for c in candidates) + "); reinstall pumice with `pip install .`")


def cdef_source(header_text: str) -> str:
    """The declarations of pumice.h in the form cffi's cdef accepts.

    Drops comments, the include guard and includes, and everything inside ``#ifdef __cplusplus``
    blocks (the ``extern "C"`` wrapper); cffi knows the fixed-width integer types already.
    """
    text = re.sub(r"/\*.*?\*/", "", header_text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    kept: list[str] = []
    cplusplus_depth = 0  # > 0 while inside a #ifdef __cplusplus block
    conditional_depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            directive = stripped[1:].strip()
            if directive.startswith(("if", "ifdef", "ifndef")):
                conditional_depth += 1
                if cplusplus_depth == 0 and "__cplusplus" in directive:
                    cplusplus_depth = conditional_depth
            elif directive.startswith("endif"):
                if cplusplus_depth == conditional_depth:
                    cplusplus_depth = 0
                conditional_depth -= 1
            continue
        if cplusplus_depth:
            continue
        kept.append(line)
    return "\n".join(kept)


def _library_names(device: str) -> list[str]:
    stem = "pumice_cuda" if device == "cuda" else "pumice"
    if sys.platform == "win32":
        return [f"{stem}.dll", f"lib{stem}.dll"]
    if sys.platform == "darwin":
        return [f"lib{stem}.dylib", f"lib{stem}.so"]
    return [f"lib{stem}.so"]


def _find_library(device: str) -> Path:
    env_vars = (["PUMICE_CUDA_LIBRARY"] if device == "cuda" else []) + ["PUMICE_LIBRARY"]
    for var in env_vars:
        value = os.environ.get(var)
        if value:
            path = Path(value)
            if not path.is_file():
                raise LibraryNotFoundError(f"{var}={value} does not name a file")
            return path
    searched = []
    for folder in _package_dirs():
        for name in _library_names(device):
            candidate = folder / "lib" / name
            searched.append(str(candidate))
            if candidate.is_file():
                return candidate
    what = "the CUDA library (libpumice_cuda)" if device == "cuda" else "the native library (libpumice)"
    how = ("build it with `pip install -e .` (nvcc must be on PATH; PUMICE_CUDA=ON makes a "
           "missing nvcc an error)" if device == "cuda" else
           "build it with `pip install -e .` in the source tree, or with `cmake -S . -B build "
           "-DPUMICE_CUDA=OFF && cmake --build build` and set PUMICE_LIBRARY=build/libpumice.so")
    raise LibraryNotFoundError(f"cannot find {what}; searched {', '.join(searched) or 'nothing'}; {how}")


class _Library:
    """One opened shared library with its cffi handle."""

    def __init__(self, ffi, lib, path: Path):
        self.ffi = ffi
        self.lib = lib
        self.path = path

    def last_error(self) -> str:
        message = self.lib.pumice_last_error()
        return self.ffi.string(message).decode("utf-8", "replace") if message != self.ffi.NULL else ""

    def check(self, status: int, what: str) -> None:
        if status == 0:
            return
        message = self.last_error() or f"{what} failed"
        raise _ERROR_BY_STATUS.get(int(status), PumiceError)(message, int(status))


_libraries: dict[str, _Library] = {}
_libraries_lock = threading.Lock()


def load_library(device: str = "cpu") -> _Library:
    """Open (once per path) the library implementing pumice.h for ``device``."""
    path = _find_library(device).resolve()
    key = str(path)
    with _libraries_lock:
        loaded = _libraries.get(key)
        if loaded is None:
            import cffi
            ffi = cffi.FFI()
            ffi.cdef(cdef_source(_find_header().read_text(encoding="utf-8")))
            try:
                lib = ffi.dlopen(key)
            except OSError as exc:
                raise LibraryNotFoundError(f"cannot load {key}: {exc}") from exc
            loaded = _libraries[key] = _Library(ffi, lib, path)
        return loaded


def library_version(device: str = "cpu") -> str:
    library = load_library(device)
    return library.ffi.string(library.lib.pumice_version()).decode()


# --------------------------------------------------------------------------------------------
# Model and session


def _parse_device(device: str) -> tuple[str, int]:
    name, _, index = str(device).strip().lower().partition(":")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if index and (not index.isdigit() or name == "cpu"):
        raise ValueError(f"bad device index in {device!r}")
    return name, int(index or 0)


def _read_tensor_table(path: str) -> dict[str, dict]:
    """Name → {"kind", "shape"} of a file's tensors (the C side already validated the file)."""
    from pumice.format.reader import PumiceFile
    with PumiceFile(path, verify=False) as pumice_file:
        return {name: {"kind": info.kind, "shape": list(info.shape)}
                for name, info in pumice_file.tensors.items()}


def _float32_matrix(x, name: str) -> np.ndarray:
    array = np.ascontiguousarray(x, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidArgumentError(f"{name} must be 1-D or 2-D, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class NativeSampling:
    """pumice_sampling_params: how the runtime picks a token (docs/RUNTIME.md, "Native sampling").

    ``temperature`` 0 is greedy; ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 turn those off. The
    runtime validates the values (InvalidArgumentError); ``seed`` is reduced modulo 2**64.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    @classmethod
    def greedy(cls) -> "NativeSampling":
        return cls(temperature=0.0)


def _sampling_array(library: "_Library", samplings: Sequence[NativeSampling]):
    params = library.ffi.new("pumice_sampling_params[]", len(samplings))
    for slot, sampling in zip(params, samplings):
        slot.temperature = float(sampling.temperature)
        slot.top_k = max(-2**31, min(2**31 - 1, int(sampling.top_k)))
        slot.top_p = float(sampling.top_p)
        slot.min_p = float(sampling.min_p)
        slot.seed = int(sampling.seed) % 2**64
    return params


class NativeModel:
    """A .pumice file opened by the native runtime on one device."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", n_threads: int | None = None,
                 verify_checksums: bool = True):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise PumiceIOError(f"no such file: {path}")
        if os.path.isdir(path):
            raise PumiceIOError(f"{path} is a directory, not a .pumice file "
                                "(convert a Hugging Face checkpoint with `pumice convert`)")
        device_name, device_index = _parse_device(device)
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 0):
            raise ValueError(f"n_threads must be a non-negative integer or None, not {n_threads!r}")
        self.path = path
        self.device = device_name if device_name == "cpu" else f"cuda:{device_index}"
        self._library = library = load_library(device_name)
        ffi, lib = library.ffi, library.lib
        options = ffi.new("pumice_model_options *")
        options.device = 1 if device_name == "cuda" else 0
        options.device_index = device_index
        options.n_threads = n_threads or 0
        options.verify_checksums = 1 if verify_checksums else 0
        out = ffi.new("pumice_model **")
        library.check(lib.pumice_model_open(path.encode("utf-8"), options, out), "pumice_model_open")
        self._ptr = out[0]
        self._finalizer = weakref.finalize(self, lib.pumice_model_free, self._ptr)
        self._sessions: weakref.WeakSet[NativeSession] = weakref.WeakSet()
        self._tensors: dict[str, dict] | None = None

        raw = ffi.new("pumice_model_info *")
        library.check(lib.pumice_model_get_info(self._ptr, raw), "pumice_model_get_info")
        self.info = {field: int(getattr(raw, field)) for field, _ in ffi.typeof("pumice_model_info").fields}
        self.info.update(device=self.device, path=path, library=str(library.path),
                         library_version=ffi.string(lib.pumice_version()).decode())
        self.vocab_size = self.info["vocab_size"]

    # -- lifetime

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _handle(self):
        if not self._finalizer.alive:
            raise PumiceError("the model is closed", 4)
        return self._ptr

    def close(self) -> None:
        """Free the native model; its open sessions are closed first."""
        for session in list(self._sessions):
            session.close()
        self._finalizer()

    def __enter__(self) -> "NativeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.info['num_layers']} layers, vocab {self.vocab_size}"
        return f"NativeModel({self.path!r}, device={self.device!r}, {state})"

    # -- sessions

    def new_session(self, n_ctx: int | None = None) -> "NativeSession":
        return NativeSession(self, n_ctx)

    # -- kernel access (tests and benchmarks)

    def tensor_shape(self, name: str) -> list[int]:
        if self._tensors is None:
            self._tensors = _read_tensor_table(self.path)
        entry = self._tensors.get(name)
        if entry is None:
            raise InvalidArgumentError(f"no tensor named {name!r} in {self.path}")
        return list(entry["shape"])

    def linear_apply(self, name: str, x) -> np.ndarray:
        """y = x Wᵀ for the named linear tensor (any storage kind): x [batch, K] → [batch, N]."""
        shape = self.tensor_shape(name)
        if len(shape) != 2:
            raise InvalidArgumentError(f"{name} is not a matrix (shape {shape})")
        out_features, in_features = shape
        x = _float32_matrix(x, "x")
        if x.shape[1] != in_features:
            raise InvalidArgumentError(f"{name} takes {in_features} input features, x has {x.shape[1]}")
        y = np.empty((x.shape[0], out_features), dtype=np.float32)
        ffi, lib = self._library.ffi, self._library.lib
        self._library.check(lib.pumice_linear_apply(
            self._handle(), name.encode("utf-8"), ffi.from_buffer("float[]", x), x.shape[0],
            ffi.from_buffer("float[]", y, require_writable=True)), "pumice_linear_apply")
        return y

    def sample_logits(self, logits, samplings: NativeSampling | Sequence[NativeSampling],
                      positions: int | Sequence[int] = 0) -> np.ndarray:
        """The runtime's sampler on given logits ``[n, vocab]`` (tests, benchmarks): ``[n]`` int32.

        ``samplings`` and ``positions`` (the RNG counters) are one for all rows or one per row.
        On CUDA the rows are uploaded and sampled by the device kernel.
        """
        rows = _float32_matrix(logits, "logits")
        if rows.shape[1] != self.vocab_size:
            raise InvalidArgumentError(f"logits have {rows.shape[1]} columns, the vocabulary {self.vocab_size}")
        n = rows.shape[0]
        samplings = [samplings] * n if isinstance(samplings, NativeSampling) else list(samplings)
        where = np.asarray(positions)
        if where.ndim > 1 or (where.ndim == 1 and where.size != n) or not np.issubdtype(where.dtype, np.integer):
            raise InvalidArgumentError(f"positions must be one integer or {n} integers, one per row of logits")
        where = np.broadcast_to(where.astype(np.int64), (n,)).copy()
        if len(samplings) != n:
            raise InvalidArgumentError(f"{n} rows of logits but {len(samplings)} sampling parameters")
        out = np.empty(n, dtype=np.int32)
        ffi, lib = self._library.ffi, self._library.lib
        self._library.check(lib.pumice_sample_logits(
            self._handle(), ffi.from_buffer("float[]", rows), n, _sampling_array(self._library, samplings),
            ffi.from_buffer("int64_t[]", where), ffi.from_buffer("int32_t[]", out, require_writable=True)),
            "pumice_sample_logits")
        return out

    def dequantize(self, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
        """The named tensor reconstructed as float32 (shape from the file when not given)."""
        shape = tuple(int(s) for s in (shape if shape is not None else self.tensor_shape(name)))
        out = np.empty(shape, dtype=np.float32)
        ffi, lib = self._library.ffi, self._library.lib
        self._library.check(lib.pumice_tensor_dequantize(
            self._handle(), name.encode("utf-8"), ffi.from_buffer("float[]", out, require_writable=True),
            out.size), "pumice_tensor_dequantize")
        return out


class NativeSession:
    """A KV cache of ``n_ctx`` positions on one model; used by one thread at a time."""

    def __init__(self, model: NativeModel, n_ctx: int | None = None):
        if n_ctx is not None and (not isinstance(n_ctx, (int, np.integer)) or n_ctx < 0):
            raise ValueError(f"n_ctx must be a non-negative integer or None, not {n_ctx!r}")
        self.model = model  # keeps the model alive as long as the session
        library = self._library = model._library
        ffi, lib = library.ffi, library.lib
        out = ffi.new("pumice_session **")
        library.check(lib.pumice_session_create(model._handle(), int(n_ctx or 0), out),
                      "pumice_session_create")
        self._ptr = out[0]
        # The finalizer's arguments hold the model, so the model is freed after its sessions.
        self._finalizer = weakref.finalize(self, _free_session, lib, self._ptr, model)
        model._sessions.add(self)
        self.vocab_size = model.vocab_size

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _handle(self):
        if not self._finalizer.alive:
            raise PumiceError("the session is closed", 4)
        return self._ptr

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "NativeSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_past(self) -> int:
        return int(self._library.lib.pumice_session_n_past(self._handle()))

    @property
    def n_ctx(self) -> int:
        return int(self._library.lib.pumice_session_n_ctx(self._handle()))

    def truncate(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` cached positions (0 resets the session)."""
        self._library.check(self._library.lib.pumice_session_truncate(self._handle(), int(n_keep)),
                            "pumice_session_truncate")

    def reset(self) -> None:
        self.truncate(0)

    def forward(self, tokens, logits_all: bool = False, return_logits: bool = True) -> np.ndarray | None:
        """Append tokens to the cache and return logits.

        Returns float32 ``[vocab]`` (last position) or, with ``logits_all``, ``[n, vocab]`` (every
        new position); ``None`` with ``return_logits=False`` (only fills the cache).
        """
        ids = _token_array(tokens, self.vocab_size)
        if ids.size == 0:
            raise InvalidArgumentError("forward needs at least one token")
        ffi = self._library.ffi
        if not return_logits:
            logits, pointer = None, ffi.NULL
        else:
            logits = np.empty((ids.size, self.vocab_size) if logits_all else (self.vocab_size,),
                              dtype=np.float32)
            pointer = ffi.from_buffer("float[]", logits, require_writable=True)
        self._library.check(self._library.lib.pumice_forward(
            self._handle(), ffi.from_buffer("int32_t[]", ids), ids.size, pointer,
            1 if logits_all else 0), "pumice_forward")
        return logits

    def forward_sample(self, tokens, sampling: NativeSampling, return_logits: bool = False):
        """Append tokens, then let the runtime pick the next token from the last position.

        Returns the token id, or ``(token, logits [vocab])`` with ``return_logits``. The draw is
        keyed by (``sampling.seed``, n_past after the call).
        """
        ids = _token_array(tokens, self.vocab_size)
        if ids.size == 0:
            raise InvalidArgumentError("forward_sample needs at least one token")
        ffi = self._library.ffi
        logits, pointer = None, ffi.NULL
        if return_logits:
            logits = np.empty(self.vocab_size, dtype=np.float32)
            pointer = ffi.from_buffer("float[]", logits, require_writable=True)
        out = ffi.new("int32_t *")
        self._library.check(self._library.lib.pumice_forward_sample(
            self._handle(), ffi.from_buffer("int32_t[]", ids), ids.size,
            _sampling_array(self._library, [sampling]), out, pointer), "pumice_forward_sample")
        return (int(out[0]), logits) if return_logits else int(out[0])

    def __repr__(self) -> str:
        if self.closed:
            return "NativeSession(closed)"
        return f"NativeSession(n_past={self.n_past}, n_ctx={self.n_ctx})"


def _free_session(lib, pointer, model) -> None:
    lib.pumice_session_free(pointer)


def _token_array(tokens, vocab_size: int) -> np.ndarray:
    if isinstance(tokens, (int, np.integer)):
        tokens = [tokens]
    ids = np.asarray(tokens)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise InvalidArgumentError("tokens must be a 1-D sequence of integer ids")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise InvalidArgumentError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return np.ascontiguousarray(ids, dtype=np.int32)


def _check_batch(sessions: Sequence[NativeSession], tokens: Iterable[int], caller: str):
    sessions = list(sessions)
    if not sessions:
        raise InvalidArgumentError(f"{caller} needs at least one session")
    model = sessions[0].model
    if any(s.model is not model for s in sessions):
        raise InvalidArgumentError(f"{caller} sessions must all belong to one model")
    if len({id(s) for s in sessions}) != len(sessions):
        raise InvalidArgumentError(f"{caller} sessions must be distinct")
    ids = _token_array(list(tokens), model.vocab_size)
    if ids.size != len(sessions):
        raise InvalidArgumentError(f"{caller} got {len(sessions)} sessions but {ids.size} tokens")
    return sessions, model, ids


def decode_batch(sessions: Sequence[NativeSession], tokens: Iterable[int]) -> np.ndarray:
    """Advance each session by one token in one pass over the weights; returns ``[n, vocab]``.

    All-or-nothing: if any session is full, ContextFullError is raised and nothing changes.
    """
    sessions, model, ids = _check_batch(sessions, tokens, "decode_batch")
    library = model._library
    ffi = library.ffi
    handles = ffi.new("pumice_session *[]", [s._handle() for s in sessions])
    logits = np.empty((len(sessions), model.vocab_size), dtype=np.float32)
    library.check(library.lib.pumice_decode_batch(
        handles, ffi.from_buffer("int32_t[]", ids), len(sessions),
        ffi.from_buffer("float[]", logits, require_writable=True)), "pumice_decode_batch")
    return logits


def decode_batch_sample(sessions: Sequence[NativeSession], tokens: Iterable[int],
                        samplings: Sequence[NativeSampling], return_logits: bool = False):
    """decode_batch, with the runtime picking each session's next token (``samplings[i]``).

    Returns int32 ``[n]`` token ids, or ``(ids, logits [n, vocab])`` with ``return_logits``.
    Without logits nothing but the ids crosses from the device.
    """
    sessions, model, ids = _check_batch(sessions, tokens, "decode_batch_sample")
    samplings = list(samplings)
    if len(samplings) != len(sessions):
        raise InvalidArgumentError(f"decode_batch_sample got {len(sessions)} sessions but "
                                   f"{len(samplings)} sampling parameters")
    library = model._library
    ffi = library.ffi
    handles = ffi.new("pumice_session *[]", [s._handle() for s in sessions])
    out = np.empty(len(sessions), dtype=np.int32)
    logits, pointer = None, ffi.NULL
    if return_logits:
        logits = np.empty((len(sessions), model.vocab_size), dtype=np.float32)
        pointer = ffi.from_buffer("float[]", logits, require_writable=True)
    library.check(library.lib.pumice_decode_batch_sample(
        handles, ffi.from_buffer("int32_t[]", ids), len(sessions), _sampling_array(library, samplings),
        ffi.from_buffer("int32_t[]", out, require_writable=True), pointer), "pumice_decode_batch_sample")
    return (out, logits) if return_logits else out
