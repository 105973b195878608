"""Byte-level BPE for the subword baseline, trained with the ``tokenizers`` library.

Ids keep the byte vocabulary of :mod:`unetlm.core.tokens` (0-255 the bytes, 256 BOS, 257
PAD) and number the merged tokens from 258 in merge order, so a BPE model differs from a
byte model only in its larger vocabulary. Text is split with GPT-2's pre-tokenizer regex.
Bytes that are not valid UTF-8 are data: they become single-byte tokens, so decoding any
encoding gives back the exact input bytes.

``tokenizers`` is an optional dependency (``pip install 'unetlm[bpe]'``), imported only here.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

import numpy as np
import regex

from unetlm.core.tokens import BOS, PAD, VOCAB

_ESCAPED = re.compile("([\udc80-\udcff]+)")  # bytes that were not valid UTF-8, after surrogateescape
# a space between two printable ASCII characters: GPT-2's pre-tokenizer ends a piece before it and
# starts the next piece with it, whatever follows, so text cut there encodes as the whole does
_SAFE_CUT = regex.compile(rb"(?r)[!-~](?= [!-~])")  # searched from the end


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("model.tokenizer = 'bpe' needs the tokenizers package: pip install 'unetlm[bpe]'") from None
    return tokenizers


def byte_level_chars() -> list[str]:
    """The printable character that stands for each byte value in GPT-2 style byte-level BPE."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _pieces(data: bytes) -> Iterator[tuple[bool, str]]:
    """(is_text, piece) runs of ``data``: valid UTF-8 text, or escaped invalid bytes."""
    for i, piece in enumerate(_ESCAPED.split(bytes(data).decode("utf-8", errors="surrogateescape"))):
        if piece:
            yield i % 2 == 0, piece


class BpeTokenizer:
    """Encode bytes to ids and back; ``bytes_per_token`` was measured on the training text."""

    name = "bpe"

    def __init__(self, tokenizer, vocab_size: int, bytes_per_token: float) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.bytes_per_token = bytes_per_token
        chars = {c: b for b, c in enumerate(byte_level_chars())}
        table: list[bytes] = [bytes([b]) for b in range(256)] + [b"", b""]
        for text, token in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if token >= VOCAB:
                table.append(bytes(chars[c] for c in text))
        if len(table) > vocab_size:
            raise ValueError(f"the tokenizer holds {len(table)} ids, more than model.tokenizer.vocab_size = {vocab_size}")
        self.table = table
        self.lengths = np.zeros(vocab_size, dtype=np.int64)  # bytes each id stands for: BOS 1, PAD 0
        self.lengths[: len(table)] = [len(p) for p in table]
        self.lengths[BOS] = 1

    @classmethod
    def train(cls, documents: Iterable[bytes], vocab_size: int) -> "BpeTokenizer":
        """Learn ``vocab_size - 258`` merges from ``documents`` (fewer if the text runs out of pairs)."""
        tk = _tokenizers()
        if vocab_size <= VOCAB:
            raise ValueError(f"a BPE vocabulary needs more than the {VOCAB} byte ids (got {vocab_size})")
        documents = list(documents)
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size - 2,  # the 256 byte characters and the merges; BOS and PAD are ours
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        learner = _new_tokenizer(tk, tk.models.BPE())
        learner.train_from_iterator((p for d in documents for ok, p in _pieces(d) if ok), trainer)
        model = json.loads(learner.to_str())["model"]
        chars = byte_level_chars()
        vocab = {c: b for b, c in enumerate(chars)}
        for text, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
            if text not in vocab:
                vocab[text] = VOCAB + len(vocab) - 256
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        out = cls(_new_tokenizer(tk, tk.models.BPE(vocab=vocab, merges=merges)), vocab_size, 1.0)
        tokens = sum(len(out.encode(d)) + 1 for d in documents)  # + 1: each document's BOS
        out.bytes_per_token = sum(len(d) + 1 for d in documents) / max(tokens, 1)
        return out

    def encode(self, data: bytes) -> np.ndarray:
        """(n,) int64 ids of ``data``, no BOS."""
        ids: list[int] = []
        for is_text, piece in _pieces(data):
            if is_text:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False).ids)
            else:
                ids.extend(ord(c) - 0xDC00 for c in piece)
        return np.asarray(ids, dtype=np.int64)

    def safe_cut(self, data: bytes) -> int:
        """The last offset of ``data`` where ``encode(data[:n]) + encode(rest) == encode(data + rest)``
        for any ``rest`` (0 if none): before the last space that sits between two printable ASCII
        characters. Encoding a long document piece by piece cuts there."""
        last = _SAFE_CUT.search(data)
        return 0 if last is None else last.end()

    def piece(self, token: int) -> bytes:
        """The bytes of one id (BOS and PAD: none)."""
        return self.table[token] if token != PAD and 0 <= token < len(self.table) else b""

    def decode(self, ids) -> bytes:
        return b"".join(self.piece(int(t)) for t in ids)

    def to_json(self) -> str:
        return json.dumps(
            {"vocab_size": self.vocab_size, "bytes_per_token": self.bytes_per_token, "tokenizer": self.tokenizer.to_str()}
        )

    @classmethod
    def from_json(cls, text: str) -> "BpeTokenizer":
        data = json.loads(text)
        tokenizer = _tokenizers().Tokenizer.from_str(data["tokenizer"])
        return cls(tokenizer, data["vocab_size"], data["bytes_per_token"])


def _new_tokenizer(tk, model):
    tokenizer = tk.Tokenizer(model)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tokenizer
