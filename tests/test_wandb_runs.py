"""qmamba.wandb_runs: reading local W&B run folders written by the installed wandb, offline.

The runs are real: one subprocess runs wandb (offline, every wandb directory under the test's tmp folder) and writes
run A and run B once for the module. wandb runs in a subprocess, not in pytest's process, so that its global state
(``wandb.run``, its console capture, exit hooks and the wandb-core service) cannot leak into other tests. The broken
runs are made from copies of those files: a run killed mid-write is simulated by cutting a copy of a finished run's
``.wandb`` file short (inside a record header, inside a payload, or between the fragments of a record that spans a
32 KiB block), and corruption by flipping bytes or by writing garbage / nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmamba.wandb_runs import (BLOCK_LEN, FILE_HEADER, RunReadError, RunRecord, _records, fetch_api_runs, find_runs,
                               read_run)

LONG_NOTE = "n" * 40_000  # a summary value longer than a 32 KiB block: its record is split into fragments

WRITE_RUNS = textwrap.dedent(f"""
    import wandb

    a = wandb.init(project="proj", dir=".", name="run-a", group="g1", job_type="eval",
                   config={{"lr": 0.01, "tag": "a", "model": {{"d_model": 64, "layers": [1, 2], "opt": {{"b": 0.9}}}}}})
    for step, ppl in enumerate([9.0, 7.5, 6.25]):  # no step=: with it, wandb holds the row back until the next step
        a.log({{"val/ppl": ppl, "train/loss": 2.0 - step, "nested": {{"x": step}}}})
    a.summary["val/ppl"] = 5.0                # an explicit summary update after the history: it wins
    a.summary["eval/fp/perplexity"] = 4.5
    a.summary["train/loss"] = 100.0           # ... but a row logged after it wins over it
    a.config.update({{"lr": 0.02}}, allow_val_change=True)
    a.log({{"train/loss": 0.5}})
    a.finish()

    b = wandb.init(project="proj", dir=".", name="run-b", group="g2", job_type="train",
                   config={{"lr": 0.1, "mode": "int8"}})
    b.define_metric("val/loss", summary="min")
    for loss in (3.0, 1.0, 2.0):
        b.log({{"val/loss": loss}})
    b.summary["note"] = "n" * {len(LONG_NOTE)}
    b.finish(exit_code=1)
""")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    """Runs A and B in ``<tmp>/proj/wandb/``, written by the installed wandb: ``tmp``, ``proj`` and the run folders."""
    tmp = tmp_path_factory.mktemp("wandb_runs")
    proj = tmp / "proj"
    proj.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
           "WANDB_DIR": str(proj), "WANDB_CONFIG_DIR": str(tmp / "config"), "WANDB_CACHE_DIR": str(tmp / "cache"),
           "WANDB_DATA_DIR": str(tmp / "data"), "WANDB_ARTIFACT_DIR": str(tmp / "artifacts")}
    result = subprocess.run([sys.executable, "-c", WRITE_RUNS], cwd=proj, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = {}
    for folder in (proj / "wandb").glob("offline-run-*"):
        folders[read_run(folder).name] = folder
    assert sorted(folders) == ["run-a", "run-b"]
    return SimpleNamespace(tmp=tmp, proj=proj, a=folders["run-a"], b=folders["run-b"])


def log_of(folder: Path) -> Path:
    (log,) = folder.glob("*.wandb")
    return log


def records(folder: Path) -> list[tuple[int, str]]:
    """(byte offset, record type) of each record of a run's log."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = log_of(folder).read_bytes()
    return [(offset, pb.Record.FromString(payload).WhichOneof("record_type")) for offset, payload in _records(data, "")]


def copy_run(folder: Path, dest_root: Path) -> Path:
    """A copy of the run folder under ``dest_root/wandb/``."""
    dest = dest_root / "wandb" / folder.name
    shutil.copytree(folder, dest)
    return dest


def make_folder(root: Path, name: str, content: bytes | None) -> Path:
    """A run folder ``root/wandb/<name>`` with ``run-<id>.wandb`` holding ``content`` (no file for ``None``)."""
    folder = root / "wandb" / name
    (folder / "files").mkdir(parents=True)
    if content is not None:
        (folder / f"run-{name.rsplit('-', 1)[1]}.wandb").write_bytes(content)
    return folder


# ------------------------------------------------------------------------------------------------------ good runs


def test_format_is_what_the_reader_expects(made):
    data = log_of(made.a).read_bytes()
    assert data[:7] == FILE_HEADER == b":W&B\xe1\xbe\x00"
    crc, length, kind = struct.unpack_from("<IHB", data, 7)  # the first record: plain CRC-32 of type byte + payload
    assert kind == 1 and crc == zlib.crc32(data[13:14 + length])
    kinds = [kind for _, kind in records(made.a)]
    assert kinds[0] == "header" and kinds[1] == "run" and kinds[-1] == "exit"


def test_run_a_fields(made):
    run = read_run(made.a)
    assert (run.name, run.group, run.job_type, run.project) == ("run-a", "g1", "eval", "proj")
    assert made.a.name.endswith("-" + run.id) and run.path == made.a
    assert run.finished and run.exit_code == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", run.started)


def test_run_a_config(made):
    config = read_run(made.a).config
    assert config == {"lr": 0.02, "tag": "a", "model": {"d_model": 64, "layers": [1, 2], "opt": {"b": 0.9}}}


def test_run_a_history(made):
    history = read_run(made.a).history
    assert [row["_step"] for row in history] == [0, 1, 2, 3]
    assert [row.get("val/ppl") for row in history] == [9.0, 7.5, 6.25, None]
    assert history[1] == {"_step": 1, "val/ppl": 7.5, "train/loss": 1.0, "nested": {"x": 1}}
    assert history[3] == {"_step": 3, "train/loss": 0.5}  # _runtime / _timestamp dropped


def test_run_a_summary(made):
    summary = read_run(made.a).summary
    assert summary == {"val/ppl": 5.0, "eval/fp/perplexity": 4.5, "train/loss": 0.5, "nested": {"x": 2}}


def test_run_b_aggregate_summary_fragments_and_exit_code(made):
    run = read_run(made.b)
    assert (run.name, run.group, run.job_type) == ("run-b", "g2", "train")
    assert run.config == {"lr": 0.1, "mode": "int8"}
    assert run.summary["val/loss"] == {"min": 1.0}  # define_metric(summary="min"): not the last value (2.0)
    assert run.summary["note"] == LONG_NOTE  # reassembled from FIRST / LAST fragments across a block boundary
    assert [row["val/loss"] for row in run.history] == [3.0, 1.0, 2.0]
    assert run.finished and run.exit_code == 1


@pytest.mark.parametrize("root, expected", [("proj", ["run-a", "run-b"]), ("proj/wandb", ["run-a", "run-b"]),
                                            ("run", ["run-a"]), ("proj/wandb/latest-run", ["run-b"])])
def test_find_runs_from_any_root(made, root, expected):
    path = made.a if root == "run" else made.tmp / root
    runs, problems = find_runs(path)
    assert problems == []
    assert (made.proj / "wandb" / "latest-run").is_symlink()  # and it is not read as a second copy of run B
    assert [r.name for r in runs] == expected
    assert [r.started for r in runs] == sorted(r.started for r in runs)


def test_find_runs_same_run_twice_is_read_once(made):
    runs, problems = find_runs(made.proj, made.proj / "wandb", made.a)
    assert problems == [] and sorted(r.name for r in runs) == ["run-a", "run-b"]


def test_find_runs_empty_and_missing_roots(tmp_path):
    (tmp_path / "empty" / "wandb").mkdir(parents=True)
    assert find_runs(tmp_path / "empty") == ([], [])
    assert find_runs() == ([], [])
    missing = tmp_path / "nope"
    runs, problems = find_runs(missing)
    assert runs == [] and len(problems) == 1 and str(missing) in problems[0] and "no such" in problems[0]


# ------------------------------------------------------------------------------------------------------ cut-off runs


def test_run_cut_off_inside_a_history_record_is_read_up_to_the_cut(made, tmp_path):
    run_c = copy_run(made.a, tmp_path)
    third_row = [offset for offset, kind in records(made.a) if kind == "history"][2]
    log = log_of(run_c)
    log.write_bytes(log.read_bytes()[:third_row + 7 + 5])  # killed while writing the payload of row 3
    run = read_run(run_c)
    assert not run.finished and run.exit_code is None
    assert [row["val/ppl"] for row in run.history] == [9.0, 7.5]
    assert run.config["lr"] == 0.01  # the later config update was never written
    assert run.name == "run-a" and "eval/fp/perplexity" not in run.summary


@pytest.mark.parametrize("cut", ["in_header", "before_exit", "zero_tail"])
def test_run_cut_off_at_the_end_is_not_finished(made, tmp_path, cut):
    run_c = copy_run(made.a, tmp_path)
    exit_at = records(made.a)[-1][0]
    log = log_of(run_c)
    data = log.read_bytes()
    data = {"in_header": data[:exit_at + 3], "before_exit": data[:exit_at],
            "zero_tail": data[:exit_at] + bytes(100)}[cut]
    log.write_bytes(data)
    runs, problems = find_runs(tmp_path)
    assert problems == [] and len(runs) == 1
    assert not runs[0].finished and runs[0].summary == read_run(made.a).summary


def test_run_cut_off_between_fragments(made, tmp_path):
    run_c = copy_run(made.b, tmp_path)
    offsets = [offset for offset, _ in records(made.b)]
    first = max(o for o in offsets if o < BLOCK_LEN)
    assert offsets[offsets.index(first) + 1] > BLOCK_LEN + 7  # that record is split over blocks 0 and 1
    log = log_of(run_c)
    log.write_bytes(log.read_bytes()[:BLOCK_LEN])  # the note's FIRST fragment fills block 0; the rest is lost
    run = read_run(run_c)
    assert not run.finished and "note" not in run.summary and run.summary["val/loss"] == {"min": 1.0}


@pytest.mark.parametrize("keep, message", [("header", "holds only its header"), ("header_record", "has no run record")])
def test_log_without_run_record_is_an_error(made, tmp_path, keep, message):
    # What a run killed early really leaves with wandb 0.31: the 7-byte header, nothing else.
    run_at = [offset for offset, kind in records(made.a) if kind == "run"][0]
    data = log_of(made.a).read_bytes()[:7 if keep == "header" else run_at]
    folder = make_folder(tmp_path, "offline-run-20240101_000000-killed1", data)
    with pytest.raises(RunReadError, match=message) as e:
        read_run(folder)
    assert str(e.value).startswith(f"{folder}: ")


# ---------------------------------------------------------------------------------------------------- corrupt runs


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize("where, damage, message", [
    ("history", lambda d, o: flipped(d, o + 7 + 3), "checksum mismatch"),  # a payload byte
    ("history", lambda d, o: flipped(d, o + 6), "unknown record type"),  # the type byte
    ("history", lambda d, o: d[:o + 4] + b"\xff\xff" + d[o + 6:], "length 65535 runs past the end"),  # length
    ("exit", lambda d, o: flipped(d, len(d) - 1), "checksum mismatch"),  # even the last record
])
def test_corrupt_record_names_its_offset(made, tmp_path, where, damage, message):
    folder = copy_run(made.a, tmp_path)
    offset = [o for o, kind in records(made.a) if kind == where][-1]
    log = log_of(folder)
    log.write_bytes(damage(log.read_bytes(), offset))
    with pytest.raises(RunReadError) as e:
        read_run(folder)
    assert str(e.value).startswith(f"{folder}: corrupt record at byte offset {offset}: {message}")


def test_broken_folders_are_reported_and_good_runs_still_returned(made, tmp_path):
    copy_run(made.a, tmp_path)
    copy_run(made.b, tmp_path)
    broken = {
        make_folder(tmp_path, "offline-run-20240101_000000-garbage1", b"not a wandb log at all"): "not a W&B log",
        make_folder(tmp_path, "offline-run-20240101_000001-empty1", b""): "is empty",
        make_folder(tmp_path, "offline-run-20240101_000002-nolog1", None): "no .wandb file",
        make_folder(tmp_path, "run-20240101_000003-version1", FILE_HEADER[:6] + b"\x07"): "format version 7",
    }
    runs, problems = find_runs(tmp_path)
    assert sorted(r.name for r in runs) == ["run-a", "run-b"]
    assert len(problems) == len(broken)
    for folder, what in broken.items():
        (line,) = [p for p in problems if p.startswith(f"{folder}: ")]
        assert what in line and "\n" not in line
    with pytest.raises(ValueError, match="not a W&B log"):  # RunReadError is a ValueError
        read_run(next(iter(broken)))


def test_read_run_on_a_missing_folder(tmp_path):
    with pytest.raises(RunReadError, match="no such directory"):
        read_run(tmp_path / "offline-run-20240101_000000-gone")


# ------------------------------------------------------------------------------------------------------ online API


def test_fetch_api_runs_maps_api_runs(monkeypatch):
    import wandb

    class FakeApi:
        def runs(self, path):
            assert path == "ent/proj"
            return [SimpleNamespace(id="abc", name="run-x", group="g", job_type="eval", project="proj",
                                    config={"lr": 0.1, "_wandb": {"t": 1}, "model": {"d": 2}},
                                    summary_metrics={"val/ppl": 3.0, "_step": 9, "_runtime": 1.0},
                                    created_at="2024-05-01T12:00:00Z", state="finished"),
                    SimpleNamespace(id="def", name=None, group=None, job_type=None, project="proj", config={},
                                    summary_metrics={}, created_at="2024-05-02T12:00:00Z", state="crashed")]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    first, second = fetch_api_runs("ent/proj")
    assert first == RunRecord(id="abc", name="run-x", group="g", job_type="eval", project="proj", path=Path(),
                              config={"lr": 0.1, "model": {"d": 2}}, summary={"val/ppl": 3.0}, history=[],
                              started="2024-05-01T12:00:00Z", finished=True)
    assert (second.name, second.group, second.job_type, second.finished) == ("", "", "", False)
