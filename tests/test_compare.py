"""Run comparison on hand-made run records (the offline W&B reading itself is tested in test_wandb_runs.py, and the
whole path from evaluate.py's runs in tests/pipeline/test_quant_pipeline.py): rows, deltas against the fp result of
the same base and data, the latest evaluation winning, W&B aggregate summaries, notes, the table and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmamba.compare import compare, format_rows, plot, rows_of
from qmamba.tracking import run_label
from qmamba.wandb_runs import RunRecord

BASE = "runs/pretrain/checkpoints/best.ckpt"


def _run(name, checkpoint, results, started="2026-11-21T10:00:00.000000Z", base=BASE, kind="fp", recipe=None,
         split="test", job_type="evaluate", seq_len=256):
    summary = {}
    for mode, (ppl, bpb) in results.items():
        summary |= {f"eval/{mode}/perplexity": ppl, f"eval/{mode}/bits_per_byte": bpb, f"eval/{mode}/tokens": 1000}
    cfg = {"checkpoint": checkpoint, "base": base, "kind": kind, "recipe": recipe, "split": split, "seq_len": seq_len}
    return RunRecord(id=name, name=name, group="evaluate", job_type=job_type, project="qmamba", path=Path(name),
                     config=cfg, summary=summary, started=started, finished=True)


def test_run_label():
    assert run_label("runs/ptq/checkpoints/int8.ckpt") == "ptq/int8"
    assert run_label("/x/y/model.ckpt") == "y/model"
    assert run_label("state-spaces/mamba-130m") == "state-spaces/mamba-130m"


def test_deltas_against_fp_of_the_same_base_and_data():
    runs = [_run("e-fp", BASE, {"fp": (5.0, 2.0)}),
            _run("e-ptq", "runs/ptq/checkpoints/calibrated.ckpt", {"fp": (5.0, 2.0), "fakequant": (5.1, 2.02),
                                                                  "int8": (5.1005, 2.0201)},
                 kind="prepared", recipe="quamba_w8a8"),
            _run("e-other-data", "runs/ptq/checkpoints/int8.ckpt", {"int8": (7.0, 3.0)}, kind="int8", seq_len=32),
            _run("train", "", {}, job_type="pretrain")]
    rows, notes = compare(runs)
    by = {(r.label, r.mode, r.data.split()[1] if len(r.data.split()) > 1 else ""): r for r in rows}
    assert len(rows) == 5
    i8 = next(r for r in rows if r.label == "ptq/calibrated" and r.mode == "int8")
    assert i8.delta_ppl == pytest.approx(5.1005 / 5.0 - 1) and i8.delta_bpb == pytest.approx(2.0201 / 2.0 - 1)
    fp = next(r for r in rows if r.label == "pretrain/best")
    assert fp.delta_ppl == 0 and fp.kind == "fp"
    other = next(r for r in rows if r.label == "ptq/int8")
    assert other.delta_ppl is None  # seq_len 32: other data, no fp result for it
    assert any("no fp result" in n and "seq_len=32" in n for n in notes)
    assert any("without evaluation results" in n for n in notes)
    text = format_rows(rows)
    assert "+2.01%" in text and "—" in text and by


def test_latest_evaluation_wins_and_aggregates_are_read():
    old = _run("old", BASE, {"fp": (6.0, 2.5)}, started="2026-11-21T09:00:00.000000Z")
    new = _run("new", BASE, {"fp": (5.0, 2.0)}, started="2026-11-21T11:00:00.000000Z")
    new.summary["eval/fp/perplexity"] = {"min": 5.0, "last": 5.0}  # a defined summary metric
    rows, notes = compare([new, old])
    assert len(rows) == 1 and rows[0].ppl == 5.0 and rows[0].run == "new"
    assert any("more than once" in n and "(new)" in n for n in notes)  # names the run that counts
    assert rows_of(_run("none", BASE, {})) == []


def test_plot_is_written_and_refuses_nothing_to_compare(tmp_path):
    rows, _ = compare([_run("e-fp", BASE, {"fp": (5.0, 2.0)}),
                       _run("e-q", "runs/qat/checkpoints/int8.ckpt", {"int8": (5.05, 2.01)}, kind="int8")])
    png = plot(rows, tmp_path / "c.png")
    assert png.stat().st_size > 5_000
    lonely, _ = compare([_run("q", "runs/qat/checkpoints/int8.ckpt", {"int8": (5.05, 2.01)}, kind="int8")])
    with pytest.raises(ValueError, match="no evaluation has an fp result"):
        plot(lonely, tmp_path / "d.png")
