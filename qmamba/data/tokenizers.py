"""Tokenizers: raw UTF-8 bytes (the default, nothing to download) and Hugging Face tokenizers.

Every tokenizer has the same small interface, which is all the datamodule relies on:

- ``name``: the string ``get_tokenizer`` was given.
- ``vocab_size``: number of token ids; every id is in ``[0, vocab_size)``.
- ``encode(text) -> list[int]`` and ``encode_to_tensor(text) -> LongTensor (N,)``.
- ``decode(ids) -> str`` (undecodable bytes become U+FFFD, never an exception).
- ``token_bytes() -> LongTensor (vocab_size,)``: how many UTF-8 bytes each token stands for, so that
  bits per byte = total NLL / ln 2 / total bytes is comparable across tokenizers.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["ByteTokenizer", "HFTokenizer", "get_tokenizer"]


class ByteTokenizer:
    """One token per UTF-8 byte: ids are the byte values 0..255.

    Lossless for any text (``decode(encode(t)) == t``); a non-ASCII character becomes 2-4 tokens.
    """

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Fast path of ``encode``: a 1-D int64 tensor, without a Python list in between."""
        data = bytearray(text.encode("utf-8"))
        if not data:  # torch.frombuffer refuses an empty buffer
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.uint8).long()  # (N,)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """(256,) int64 of ones: every token is exactly one byte."""
        return torch.ones(self.vocab_size, dtype=torch.long)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``transformers`` tokenizer (``AutoTokenizer.from_pretrained(name_or_path)``) behind the common interface.

    ``encode`` adds no special tokens (the corpus is one running text). ``vocab_size`` is ``len(tokenizer)``,
    which counts added tokens. ``token_bytes`` is the UTF-8 length of each id decoded on its own; for tokens that
    are a fragment of a multi-byte character (byte-level BPE) or that drop a leading space when decoded alone
    (SentencePiece), this is an approximation, close enough for bits per byte over a whole split.
    """

    def __init__(self, name_or_path: str):
        try:
            import transformers
        except ImportError as e:
            raise ImportError(
                f"tokenizer={name_or_path!r} needs the `transformers` package: pip install transformers "
                "(or use tokenizer='bytes', which needs nothing)"
            ) from e
        self.name = name_or_path
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        self.vocab_size = len(self._tokenizer)
        self._token_bytes: torch.Tensor | None = None

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)  # (N,)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(list(ids))

    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int64: UTF-8 length of each id decoded alone (computed once, then cached)."""
        if self._token_bytes is None:
            lengths = [len(self._tokenizer.decode([i]).encode("utf-8")) for i in range(self.vocab_size)]
            self._token_bytes = torch.tensor(lengths, dtype=torch.long)
        return self._token_bytes

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def get_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` -> ``ByteTokenizer``; anything else is a Hugging Face tokenizer name or local folder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tokenizer must be 'bytes' or a Hugging Face tokenizer name/path, got {name!r}")
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)
