"""Lightning datamodule: a corpus, a tokenizer, and fixed-length next-token windows over each split.

Every batch is ``(x, y, nbytes)``: ``x`` and ``y`` are (B, seq_len) int64 with ``y`` the next token of ``x``
(``IGNORE_INDEX`` where a window was padded), and ``nbytes`` is (B,) float32, the UTF-8 bytes the non-ignored
targets of each window stand for. Summed over a split, ``sum(nll) / ln 2 / sum(nbytes)`` is bits per byte for any
tokenizer.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .corpus import SPLITS, load_corpus
from .tokenizers import get_tokenizer

__all__ = ["IGNORE_INDEX", "TokenWindows", "TextDataModule"]

IGNORE_INDEX = -100  # the default ignore_index of torch.nn.functional.cross_entropy


class TokenWindows(Dataset):
    """Non-overlapping next-token windows over a 1-D token stream, covering every target exactly once.

    With ``T = len(tokens)`` there are ``T - 1`` targets (``tokens[1:]``) and ``ceil((T - 1) / seq_len)`` windows;
    window ``i`` has ``x = tokens[i*L : i*L + L]`` and ``y = tokens[i*L + 1 : i*L + L + 1]``. The last window is
    padded: ``x`` with 0, ``y`` with ``IGNORE_INDEX``. Items are ``(x, y, nbytes)``: (L,) int64, (L,) int64 and a
    float32 scalar, the sum of ``token_bytes[t]`` over the non-ignored targets ``t`` (one byte per token when
    ``token_bytes`` is None).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, token_bytes: torch.Tensor | None = None):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
        if len(tokens) < 2:
            raise ValueError(f"need at least 2 tokens to form one (input, target) pair, got {len(tokens)}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.tokens = tokens.long()
        self.seq_len = seq_len
        self.token_bytes = token_bytes.long() if token_bytes is not None else None
        self.num_targets = len(tokens) - 1

    def __len__(self) -> int:
        return -(-self.num_targets // self.seq_len)  # ceil division

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.seq_len
        n = min(self.seq_len, self.num_targets - start)  # real targets in this window
        x = torch.zeros(self.seq_len, dtype=torch.long)
        y = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        x[:n] = self.tokens[start : start + n]
        y[:n] = self.tokens[start + 1 : start + n + 1]
        if self.token_bytes is None:
            nbytes = torch.tensor(float(n))
        else:
            nbytes = self.token_bytes[y[:n]].sum().float()
        return x, y, nbytes


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation every epoch, drawn from ``seed + epoch`` alone (Lightning calls ``set_epoch``), so a run
    resumed at an epoch boundary sees exactly the batches an uninterrupted run would. The seed is torch's initial
    seed (``seed_everything``) when the loader is made."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class TextDataModule(L.LightningDataModule):
    """Corpus -> tokenizer -> ``TokenWindows`` for train / validation / test, plus a calibration loader.

    Args:
        corpus: ``"shakespeare"``, ``"hf:<dataset>[:<config>]"``, a folder of .txt files, a file, or a list of
            files (see ``qmamba.data.corpus.load_corpus``).
        tokenizer: ``"bytes"`` (vocab 256) or a Hugging Face tokenizer name/path (needs ``transformers``).
        seq_len: tokens per training / evaluation window.
        batch_size: training batch size; ``eval_batch_size`` (default: ``batch_size``) for the other loaders.
        val_fraction, test_fraction, split_seed: how a local corpus is split (by work; see ``split_by_work``).
        calibration_samples, calibration_seq_len, calibration_seed: the default calibration set, windows at
            random offsets of the train split, the same every call.
    """

    def __init__(
        self,
        corpus: str | list[str] = "shakespeare",
        tokenizer: str = "bytes",
        seq_len: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        calibration_samples: int = 128,
        calibration_seq_len: int = 512,
        calibration_seed: int = 0,
    ):
        super().__init__()
        if isinstance(corpus, os.PathLike):
            corpus = os.fspath(corpus)
        elif not isinstance(corpus, str):
            corpus = [os.fspath(c) for c in corpus]
            if not corpus:
                raise ValueError("corpus is an empty list; give .txt files, a folder, 'shakespeare' or 'hf:...'")
        for name, value in (
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("calibration_samples", calibration_samples),
            ("calibration_seq_len", calibration_seq_len),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size <= 0):
            raise ValueError(f"eval_batch_size must be a positive integer or None, got {eval_batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in (0, 1) "
                "and sum to less than 1"
            )
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer must be 'bytes' or a Hugging Face tokenizer name/path, got {tokenizer!r}")
        self.save_hyperparameters()

        self._tokenizer = None
        self._texts: dict[str, str] | None = None
        self._tokens: dict[str, torch.Tensor] = {}
        self._datasets: dict[str, TokenWindows] = {}

    # ------------------------------------------------------------------------------------ tokenizer, tokens

    @property
    def tokenizer(self):
        """The tokenizer, created on first use."""
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split_tokens(self, split: str) -> torch.Tensor:
        """The whole ``split`` ("train", "validation" or "test") as a 1-D int64 tensor (tokenized once)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if split not in self._tokens:
            if self._texts is None:
                h = self.hparams
                self._texts = load_corpus(h.corpus, h.val_fraction, h.test_fraction, h.split_seed)
            self._tokens[split] = self.tokenizer.encode_to_tensor(self._texts[split])  # (T,)
        return self._tokens[split]

    # ------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Nothing to do: the corpus is read (or fetched through the ``datasets`` cache) in ``setup``."""

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenize the corpus (once per instance) and build the window datasets."""
        for split in SPLITS:
            if split not in self._datasets:
                self._datasets[split] = TokenWindows(
                    self.split_tokens(split), self.hparams.seq_len, self.tokenizer.token_bytes()
                )

    def _dataset(self, split: str) -> TokenWindows:
        if split not in self._datasets:
            self.setup()
        return self._datasets[split]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(dataset), torch.initial_seed()) if shuffle else None,
            drop_last=drop_last,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        if len(dataset) < self.hparams.batch_size:
            raise ValueError(
                f"the train split has {len(dataset)} windows of seq_len={self.hparams.seq_len} tokens, fewer than "
                f"batch_size={self.hparams.batch_size}: lower seq_len or batch_size, or use a larger corpus"
            )
        return self._loader(dataset, self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("validation"), self._eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self._eval_batch_size, shuffle=False, drop_last=False)

    # ------------------------------------------------------------------------------------ calibration

    def calibration_dataloader(
        self, samples: int | None = None, seq_len: int | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """``samples`` windows of ``seq_len`` tokens from the train split, at random offsets.

        Offsets come from a ``torch.Generator`` seeded with ``calibration_seed``, so every call with the same
        arguments returns the same windows. Defaults: ``calibration_samples``, ``calibration_seq_len`` and the
        eval batch size. Batches are ``(x, y, nbytes)`` like the other loaders (no padding, nothing ignored).
        """
        h = self.hparams
        samples = h.calibration_samples if samples is None else samples
        seq_len = h.calibration_seq_len if seq_len is None else seq_len
        batch_size = self._eval_batch_size if batch_size is None else batch_size
        for name, value in (("samples", samples), ("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ValueError(f"calibration {name} must be > 0, got {value}")

        tokens = self.split_tokens("train")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the train split has {len(tokens)} tokens, too few for calibration windows of seq_len={seq_len} "
                f"(needs seq_len + 1); lower calibration_seq_len or use a larger corpus"
            )
        generator = torch.Generator().manual_seed(h.calibration_seed)
        offsets = torch.randint(0, len(tokens) - seq_len, (samples,), generator=generator)  # (N,)
        index = offsets[:, None] + torch.arange(seq_len)  # (N, L)
        x = tokens[index]  # (N, L)
        y = tokens[index + 1]  # (N, L)
        nbytes = self.tokenizer.token_bytes()[y].sum(dim=1).float()  # (N,)
        return self._loader(TensorDataset(x, y, nbytes), batch_size, shuffle=False, drop_last=False)
