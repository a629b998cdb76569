"""Data: corpora (Shakespeare by default), tokenizers (raw bytes by default) and the Lightning datamodule."""

from .corpus import (
    SPLITS,
    contiguous_split,
    corpus_documents,
    describe_split,
    load_corpus,
    shakespeare_dir,
    split_by_work,
    work_key,
)
from .datamodule import IGNORE_INDEX, TextDataModule, TokenWindows
from .tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = [
    "SPLITS",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "HFTokenizer",
    "TextDataModule",
    "TokenWindows",
    "contiguous_split",
    "corpus_documents",
    "describe_split",
    "get_tokenizer",
    "load_corpus",
    "shakespeare_dir",
    "split_by_work",
    "work_key",
]
