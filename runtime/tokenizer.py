"""Tokenizers stored inside .pumice files, and incremental (streaming) detokenisation.

Two tokenizer kinds (docs/FORMAT.md, ``metadata.tokenizer.type``):

- ``hf_tokenizers``: a ``tokenizer.json``, run by the ``tokenizers`` library. BOS/EOS are added
  as transformers adds them: when ``tokenizer_config`` sets ``add_bos_token``/``add_eos_token``
  explicitly the post-processor is rebuilt from those flags, otherwise the one in
  ``tokenizer.json`` is used as is.
- ``sentencepiece``: a ``tokenizer.model`` protobuf, run by ``sentencepiece``; special tokens
  written in the text are matched first, BOS is added per ``add_bos_token`` (default true).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence


class TokenizerError(ValueError):
    """The file's tokenizer is missing, of an unknown type, or unreadable."""


def _token_text(value) -> str | None:
    """A special token from tokenizer_config: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text ↔ token ids for one model, plus the special-token facts generation needs."""

    def __init__(self, backend, kind: str, config: dict | None = None, special_tokens: dict | None = None):
        self.kind = kind
        self.config = dict(config or {})
        special = dict(special_tokens or {})
        self._backend = backend
        self.bos_token: str | None = special.get("bos_token") or _token_text(self.config.get("bos_token"))
        self.eos_token: str | None = special.get("eos_token") or _token_text(self.config.get("eos_token"))
        self.bos_token_id: int | None = special.get("bos_token_id")
        if self.bos_token_id is None and self.bos_token is not None:
            self.bos_token_id = self.token_to_id(self.bos_token)
        eos_ids = special.get("eos_token_ids")
        if not eos_ids:
            eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
            eos_ids = [] if eos_id is None else [eos_id]
        self.eos_token_ids: list[int] = [int(i) for i in eos_ids]
        self.pad_token_id: int | None = special.get("pad_token_id")

    # -- construction

    @classmethod
    def from_blob(cls, kind: str, blob: bytes, config: dict | None = None,
                  special_tokens: dict | None = None) -> "Tokenizer":
        config = dict(config or {})
        if kind == "hf_tokenizers":
            return cls(_HFBackend(blob, config, special_tokens or {}), kind, config, special_tokens)
        if kind == "sentencepiece":
            return cls(_SentencePieceBackend(blob, config), kind, config, special_tokens)
        raise TokenizerError(f"unknown tokenizer type {kind!r} (expected 'hf_tokenizers' or 'sentencepiece')")

    @classmethod
    def from_pumice(cls, pumice_file) -> "Tokenizer":
        """From an open ``pumice.format.reader.PumiceFile``."""
        metadata = pumice_file.metadata
        spec = metadata.get("tokenizer")
        if not isinstance(spec, dict) or "type" not in spec or "blob" not in spec:
            raise TokenizerError("the file has no tokenizer (metadata.tokenizer is missing)")
        blob = pumice_file.blob(spec["blob"])
        return cls.from_blob(spec["type"], blob, spec.get("config") or {}, metadata.get("special_tokens") or {})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        from pumice.format.reader import PumiceFile
        with PumiceFile(path, verify=False) as pumice_file:
            return cls.from_pumice(pumice_file)

    # -- the API

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def special_token_ids(self) -> set[int]:
        return self._backend.special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def stream_decoder(self, context_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, context_ids, skip_special_tokens)


class _HFBackend:
    def __init__(self, blob: bytes, config: dict, special_tokens: dict):
        from tokenizers import Tokenizer as HFTokenizer, processors
        try:
            self.tokenizer = HFTokenizer.from_str(blob.decode("utf-8"))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(f"cannot read the stored tokenizer.json: {exc}") from exc
        # Truncation/padding settings in tokenizer.json are for training pipelines, not us.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        if "add_bos_token" in config or "add_eos_token" in config:
            self._rebuild_post_processor(config, special_tokens, processors)
        self.special_ids = {token_id for token_id, token in self.tokenizer.get_added_tokens_decoder().items()
                            if token.special}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _rebuild_post_processor(self, config: dict, special_tokens: dict, processors) -> None:
        # As transformers does for explicit flags: "<bos> $A <eos>" with the flagged tokens.
        bos = special_tokens.get("bos_token") or _token_text(config.get("bos_token"))
        eos = special_tokens.get("eos_token") or _token_text(config.get("eos_token"))
        add_bos = bool(config.get("add_bos_token")) and bos is not None
        add_eos = bool(config.get("add_eos_token")) and eos is not None
        single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
        pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        specials = []
        for flag, token in ((add_bos, bos), (add_eos, eos)):
            if flag:
                token_id = self.tokenizer.token_to_id(token)
                if token_id is None:
                    raise TokenizerError(f"special token {token!r} is not in the vocabulary")
                specials.append((token, token_id))
        self.tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
    def __init__(self, blob: bytes, config: dict):
        import sentencepiece
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(blob)
        except Exception as exc:
            raise TokenizerError(f"cannot read the stored tokenizer.model: {exc}") from exc
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.vocab_size = self.processor.GetPieceSize()
        # Control tokens (<s>, </s>) and tokens added in tokenizer_config are "special": they are
        # matched verbatim in input text and skipped on decode when asked.
        self.special_ids = {i for i in range(self.vocab_size)
                            if self.processor.IsControl(i) or self.processor.IsUnknown(i)}
        added = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = _token_text(entry)
            if content is not None and str(key).isdigit():
                added[content] = int(key)
                if not isinstance(entry, dict) or entry.get("special", True):
                    self.special_ids.add(int(key))
        for i in self.special_ids:
            if i < self.vocab_size and not self.processor.IsUnknown(i):
                added.setdefault(self.processor.IdToPiece(i), i)
        self.added = added
        self._added_pattern = (re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
                               if added else None)
        self._id_to_added = {i: t for t, i in added.items()}

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        token_id = self.processor.PieceToId(token)
        return None if token_id == self.processor.unk_id() and token != self.processor.IdToPiece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._id_to_added:
            return self._id_to_added[token_id]
        return self.processor.IdToPiece(token_id) if 0 <= token_id < self.vocab_size else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.processor.bos_id() >= 0:
            ids.append(self.processor.bos_id())
        pieces = self._added_pattern.split(text) if self._added_pattern else [text]
        for index, piece in enumerate(pieces):
            if not piece:
                continue
            if index % 2 == 1:  # a special token written out in the text
                ids.append(self.added[piece])
            else:
                ids.extend(self.processor.EncodeAsIds(piece))
        if add_special_tokens and self.add_eos and self.processor.eos_id() >= 0:
            ids.append(self.processor.eos_id())
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self.special_ids or token_id in self._id_to_added:
                if run:
                    out.append(self.processor.DecodeIds(run))
                    run = []
                if not (skip_special_tokens and token_id in self.special_ids):
                    out.append(self.id_to_token(token_id) or "")
            else:
                run.append(token_id)
        if run:
            out.append(self.processor.DecodeIds(run))
        return "".join(out)


class StreamDecoder:
    """Turns a stream of token ids into text pieces that are always complete UTF-8 text.

    Decoding one token at a time is wrong twice over: byte-level tokens may hold part of a
    character, and SentencePiece drops the leading space of the first token of a decode. So we
    decode a short window of recent tokens together with the new ones and emit only the new
    suffix; a trailing U+FFFD means the character is not complete yet and is held back.
    ``context_ids`` (the end of the prompt) gives the first generated token its left context.
    """

    _REPLACEMENT = "\ufffd"

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in list(context_ids)[-4:]]
        self._prefix_offset = 0            # start of the decode window
        self._read_offset = len(self._ids)  # tokens before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(self._REPLACEMENT):
            piece = full_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end of generation)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
