"""Tokenizers, next-token windows and the TextDataModule (Shakespeare, local folders, hub-format parquet)."""

import math
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qmamba.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    HFTokenizer,
    TextDataModule,
    TokenWindows,
    get_tokenizer,
    load_corpus,
)

# ---------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.name == "bytes"
    text = "Hark! héllo — 世界 🎉\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)  # multi-byte characters are several tokens
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    t = tok.encode_to_tensor(text)
    assert t.dtype == torch.long and t.tolist() == ids
    assert tok.decode(t) == text
    assert tok.encode_to_tensor("").shape == (0,)
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a truncated character decodes without raising
    tb = tok.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (256,) and bool((tb == 1).all())


def test_hf_tokenizer_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="pip install transformers"):
        get_tokenizer("gpt2")


class _FakeHFTokenizer:
    vocab = ["<s>", "a", "é", "hello", " "]

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=True):
        ids = [self.vocab.index(w) for w in text.split("|")]
        return ([0] if add_special_tokens else []) + ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_hf_tokenizer_interface(monkeypatch):
    calls = []

    class AutoTokenizer:
        @staticmethod
        def from_pretrained(name):
            calls.append(name)
            return _FakeHFTokenizer()

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoTokenizer=AutoTokenizer))
    tok = get_tokenizer("some/model")
    assert isinstance(tok, HFTokenizer) and calls == ["some/model"] and tok.name == "some/model"
    assert tok.vocab_size == 5
    assert tok.encode("hello| |é") == [3, 4, 2]  # no special tokens added
    assert tok.encode_to_tensor("a|a").tolist() == [1, 1]
    assert tok.decode(torch.tensor([3, 4, 2])) == "hello é"
    assert tok.token_bytes().tolist() == [3, 1, 2, 5, 1]
    assert tok.token_bytes() is tok.token_bytes()  # cached


# ---------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("num_tokens,seq_len", [(2, 4), (9, 4), (10, 3), (100, 7), (33, 32), (33, 33)])
def test_token_windows_cover_every_target_once(num_tokens, seq_len):
    tokens = torch.randint(0, 256, (num_tokens,), generator=torch.Generator().manual_seed(num_tokens))
    ds = TokenWindows(tokens, seq_len)
    assert len(ds) == math.ceil((num_tokens - 1) / seq_len)
    xs, ys, nbytes = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.cat(xs), torch.cat(ys)  # (len(ds) * seq_len,)
    assert all(t.shape == (seq_len,) and t.dtype == torch.long for t in xs + ys)
    valid = y != IGNORE_INDEX
    assert int(valid.sum()) == num_tokens - 1
    assert torch.equal(y[valid], tokens[1:])  # every target, in order, once
    assert torch.equal(x[valid], tokens[:-1])  # x is y shifted right by one
    # Padding only at the very end: x with 0, y with IGNORE_INDEX.
    pad = num_tokens - 1
    assert bool((~valid[:pad]).sum() == 0) and bool((~valid[pad:]).all())
    assert bool((x[pad:] == 0).all())
    # Byte tokenizer: one byte per non-ignored target.
    assert [float(n) for n in nbytes] == [float((yy != IGNORE_INDEX).sum()) for yy in ys]
    assert all(n.dtype == torch.float32 and n.dim() == 0 for n in nbytes)


def test_token_windows_nbytes_uses_token_bytes():
    tokens = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    token_bytes = torch.tensor([5, 1, 2, 3, 4])
    ds = TokenWindows(tokens, 4, token_bytes)
    assert len(ds) == 2
    x, y, nb = ds[1]
    assert x.tolist() == [4, 0, 0, 0] and y.tolist() == [0, 1, IGNORE_INDEX, IGNORE_INDEX]
    assert float(nb) == 5 + 1
    assert float(ds[0][2]) == 1 + 2 + 3 + 4
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        TokenWindows(torch.tensor([1]), 4)


# ---------------------------------------------------------------------------------------------- datamodule


@pytest.fixture(scope="module")
def shakespeare_dm():
    dm = TextDataModule(seq_len=64, batch_size=8, eval_batch_size=32, calibration_samples=10, calibration_seq_len=48)
    dm.setup("fit")
    return dm


def test_datamodule_shakespeare(shakespeare_dm):
    dm = shakespeare_dm
    assert dm.vocab_size == 256 and dm.hparams.corpus == "shakespeare"
    texts = load_corpus("shakespeare")
    for split in ("train", "validation", "test"):
        tokens = dm.split_tokens(split)
        assert tokens.dtype == torch.long and tokens.dim() == 1
        assert len(tokens) == len(texts[split].encode("utf-8"))
    assert dm.tokenizer.decode(dm.split_tokens("test")[:2000]) == texts["test"].encode()[:2000].decode()

    x, y, nbytes = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 64) and nbytes.shape == (8,)
    assert torch.equal(x[:, 1:], y[:, :-1])

    # The validation loader covers every validation target exactly once, and nbytes adds up.
    targets, total_bytes, batches = 0, 0.0, 0
    for x, y, nbytes in dm.val_dataloader():
        assert x.shape[0] <= 32
        targets += int((y != IGNORE_INDEX).sum())
        total_bytes += float(nbytes.sum())
        batches += 1
    assert targets == len(dm.split_tokens("validation")) - 1 == total_bytes
    assert batches == math.ceil(len(dm._dataset("validation")) / 32)
    assert sum(len(b[0]) for b in dm.test_dataloader()) == math.ceil((len(dm.split_tokens("test")) - 1) / 64)


def test_calibration_loader_is_deterministic(shakespeare_dm):
    dm = shakespeare_dm
    first = [torch.cat(t) for t in zip(*dm.calibration_dataloader(batch_size=4))]
    second = [torch.cat(t) for t in zip(*dm.calibration_dataloader(batch_size=3))]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    x, y, nbytes = first
    assert x.shape == y.shape == (10, 48)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(nbytes, torch.full((10,), 48.0))
    x2 = torch.cat([b[0] for b in dm.calibration_dataloader(samples=5, seq_len=16)])
    assert x2.shape == (5, 16)
    other_seed = TextDataModule(calibration_seed=1, calibration_samples=10, calibration_seq_len=48)
    assert not torch.equal(torch.cat([b[0] for b in other_seed.calibration_dataloader()]), x)


def _write_letters_corpus(folder):
    """Six works, each one letter repeated, so any window tells which file it came from."""
    folder.mkdir()
    for letter in "abcdef":
        (folder / f"{letter}.txt").write_text(letter * 3000)
    return folder


def test_datamodule_local_folder_and_calibration_from_train(tmp_path):
    folder = _write_letters_corpus(tmp_path / "letters")
    dm = TextDataModule(
        corpus=str(folder),
        seq_len=32,
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.2,
        calibration_samples=50,
        calibration_seq_len=100,
    )
    dm.setup()
    letters = {
        split: set(dm.tokenizer.decode(dm.split_tokens(split))) - {"\n"} for split in ("train", "validation", "test")
    }
    assert all(letters.values())
    assert not (letters["train"] & letters["validation"]) and not (letters["train"] & letters["test"])

    batches = list(dm.calibration_dataloader())
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (50, 100)
    seen = set(dm.tokenizer.decode(x.flatten())) - {"\n"}
    assert seen <= letters["train"]

    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32) and set(dm.tokenizer.decode(x.flatten())) - {"\n"} <= letters["train"]


def test_datamodule_hf_parquet(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    root = tmp_path / "wikitext"
    rows = {}
    for split in ("train", "validation", "test"):
        rows[split] = [line for i in range(40) for line in ("", f" = {split} {i} = \n", f" body {i} .\n")]
        (root / "wikitext-2-raw-v1").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": rows[split]}), root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    dm = TextDataModule(corpus=f"hf:{root}:wikitext-2-raw-v1", seq_len=16, batch_size=2)
    dm.setup()
    assert dm.tokenizer.decode(dm.split_tokens("validation")) == "".join(rows["validation"])
    x, y, nbytes = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 16) and float(nbytes.sum()) == 32


def test_datamodule_errors(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(seq_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        TextDataModule(batch_size=-1)
    with pytest.raises(ValueError, match="test_fraction"):
        TextDataModule(test_fraction=1.5)
    with pytest.raises(ValueError, match="num_workers"):
        TextDataModule(num_workers=-1)

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextDataModule(corpus=str(missing)).setup()

    folder = _write_letters_corpus(tmp_path / "letters")
    with pytest.raises(ValueError, match=r"seq_len=512.*batch_size=100"):
        TextDataModule(corpus=str(folder), seq_len=512, batch_size=100).train_dataloader()
    with pytest.raises(ValueError, match="calibration_seq_len"):
        TextDataModule(corpus=str(folder), calibration_seq_len=100_000).calibration_dataloader()
    with pytest.raises(ValueError, match="unknown split"):
        TextDataModule(corpus=str(folder)).split_tokens("val")
