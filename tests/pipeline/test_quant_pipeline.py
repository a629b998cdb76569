"""The quantization pipeline end to end on CPU with the tiny model, through the real entry points: pretrain ->
PTQ (calibrate + finalize) -> QAT (fake-quant training, resumable) -> evaluate.py in every mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from test_pipeline import ROOT, run, tiny_corpus, write_config  # noqa: E402  (tests/pipeline is on sys.path under pytest)


def rows(output: str) -> dict[str, list[str]]:
    """evaluate.py's table: mode -> its row."""
    table = {}
    for line in output.strip().splitlines():
        parts = line.split()
        if parts and parts[0] in ("int8", "fp", "fakequant") and len(parts) == 6:
            table[parts[0]] = parts
    return table


def quant_config(tmp: Path, base: Path, name: str, callbacks: list, **trainer) -> Path:
    cfg = yaml.safe_load(base.read_text())
    cfg["trainer"].update(trainer)
    cfg["trainer"]["default_root_dir"] = str(tmp / name)
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"dirpath": str(tmp / name), "filename": "best",
                                                  "monitor": "val/loss", "save_last": True,
                                                  "enable_version_counter": False}}] + callbacks
    cfg["model"]["init_args"] = {"model": None, "init_from": str(tmp / "ckpt" / "best.ckpt"), "lr": 1e-3,
                                 "warmup_steps": 1, "sample_tokens": 0}
    cfg["data"]["init_args"].update(calibration_samples=8, calibration_seq_len=64)
    cfg["test"] = False
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    config = write_config(tmp, tiny_corpus(tmp / "corpus"))
    r = run(str(ROOT / "train.py"), "--config", str(config), "--test", "false", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, config


def test_ptq_then_evaluate_all_modes(pretrained):
    tmp, base = pretrained
    cfg = quant_config(tmp, base, "ptq", [
        {"class_path": "callbacks.Calibration", "init_args": {"recipe": "quamba_w8a8"}},
        {"class_path": "callbacks.Finalize", "init_args": {"path": str(tmp / "ptq" / "int8.ckpt"),
                                                           "prepared_path": str(tmp / "ptq" / "calibrated.ckpt")}}],
        max_steps=0)
    r = run(str(ROOT / "train.py"), "--config", str(cfg), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    calibrated = run(str(ROOT / "evaluate.py"), "--checkpoint", str(tmp / "ptq" / "calibrated.ckpt"), "--mode", "all",
                     "--no-wandb", cwd=tmp)
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    table = rows(calibrated.stdout)
    assert set(table) == {"int8", "fp", "fakequant"}
    fp, fq, i8 = (float(table[m][3]) for m in ("fp", "fakequant", "int8"))
    assert fq != fp and i8 == pytest.approx(fq, rel=1e-3)  # quantization changes the model; int8 agrees with fakequant
    int8 = run(str(ROOT / "evaluate.py"), "--checkpoint", str(tmp / "ptq" / "int8.ckpt"), "--mode", "0", "--no-wandb",
               cwd=tmp)
    assert int8.returncode == 0, int8.stderr[-3000:]
    assert rows(int8.stdout)["int8"][:5] == table["int8"][:5]  # the finalized checkpoint scores like the prepared one
    fp_of_int8 = run(str(ROOT / "evaluate.py"), "--checkpoint", str(tmp / "ptq" / "int8.ckpt"), "--mode", "fp",
                     "--no-wandb", cwd=tmp)
    assert fp_of_int8.returncode == 2 and "int8 model" in fp_of_int8.stderr


def qat_callbacks(tmp: Path, name: str) -> list:
    return [{"class_path": "callbacks.Calibration", "init_args": {"recipe": "qat_w8a8"}},
            {"class_path": "callbacks.QAT", "init_args": {"scale_lr": 1e-3, "distill": 0.5}},
            {"class_path": "callbacks.ModeValidation", "init_args": {"modes": ["fp", "int8"]}},
            {"class_path": "callbacks.Finalize", "init_args": {"path": str(tmp / name / "int8.ckpt")}}]


def scales(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.endswith(".scale")}


def test_qat_resume_matches_uninterrupted_run(pretrained):
    tmp, base = pretrained
    steps = dict(limit_train_batches=3, val_check_interval=3, limit_val_batches=2, max_epochs=-1)
    whole = quant_config(tmp, base, "qat_whole", qat_callbacks(tmp, "qat_whole"), max_steps=6, **steps)
    r = run(str(ROOT / "train.py"), "--config", str(whole), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "int8" in r.stdout and "val ppl" in r.stdout  # ModeValidation reported the other modes

    # the same run, killed hard (no clean-up) right after its step-3 checkpoint, then resumed from it
    (tmp / "killer").mkdir(exist_ok=True)
    (tmp / "killer" / "killer.py").write_text(
        "import os\nimport lightning as L\n\n\nclass KillAt(L.Callback):\n"
        "    def __init__(self, step: int):\n        self.step = step\n\n"
        "    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):\n"
        "        if trainer.global_step == self.step:\n            os._exit(9)\n")
    killed_callbacks = qat_callbacks(tmp, "qat_half") + [{"class_path": "killer.KillAt", "init_args": {"step": 4}}]
    half = quant_config(tmp, base, "qat_half", killed_callbacks, max_steps=6, **steps)
    r = run(str(ROOT / "train.py"), "--config", str(half), cwd=tmp, fake_modules=tmp / "killer")
    assert r.returncode == 9 and (tmp / "qat_half" / "last.ckpt").exists()
    assert torch.load(tmp / "qat_half" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    resumed = quant_config(tmp, base, "qat_half", qat_callbacks(tmp, "qat_half"), max_steps=6, **steps)
    r = run(str(ROOT / "train.py"), "--config", str(resumed), "--ckpt_path", str(tmp / "qat_half" / "last.ckpt"),
            cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = scales(tmp / "qat_whole" / "last.ckpt"), scales(tmp / "qat_half" / "last.ckpt")
    assert a.keys() == b.keys() and any("input.scale" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"scale {k} differs after resume")
    evals = [run(str(ROOT / "evaluate.py"), "--checkpoint", str(tmp / name / "int8.ckpt"), "--mode", "int8",
                 "--no-wandb", cwd=tmp) for name in ("qat_whole", "qat_half")]
    for e in evals:
        assert e.returncode == 0, e.stderr[-3000:]
    assert rows(evals[0].stdout)["int8"][:5] == rows(evals[1].stdout)["int8"][:5]


def test_compare_evaluation_runs(pretrained):
    """Real offline W&B runs of evaluate.py, compared by `python -m qmamba.compare`: deltas against fp, a plot, a
    corrupt run folder skipped by name, a run on other data kept apart, an empty folder refused."""
    tmp, base = pretrained
    calibrated = tmp / "ptq" / "calibrated.ckpt"
    if not calibrated.exists():  # this test run alone: make the PTQ checkpoint as test_ptq_then_evaluate_all_modes does
        test_ptq_then_evaluate_all_modes(pretrained)
    work = tmp / "compare"
    work.mkdir(exist_ok=True)
    fp_run = run(str(ROOT / "evaluate.py"), "--checkpoint", str(tmp / "ckpt" / "best.ckpt"), "--mode", "fp",
                 "--limit-batches", "2", cwd=work)
    q_run = run(str(ROOT / "evaluate.py"), "--checkpoint", str(calibrated), "--mode", "fakequant,int8",
                "--limit-batches", "2", cwd=work)
    other = run(str(ROOT / "evaluate.py"), "--checkpoint", str(calibrated), "--mode", "int8", "--limit-batches", "2",
                "--seq-len", "32", cwd=work)
    for r in (fp_run, q_run, other):
        assert r.returncode == 0, r.stderr[-3000:]
    fp, fq, i8 = float(rows(fp_run.stdout)["fp"][3]), float(rows(q_run.stdout)["fakequant"][3]), \
        float(rows(q_run.stdout)["int8"][3])
    broken = work / "runs" / "wandb" / "offline-run-20260101_000000-broken"
    broken.mkdir(parents=True)
    (broken / "run-broken.wandb").write_bytes(b"not a wandb log at all")
    c = run("-m", "qmamba.compare", "runs", "--no-wandb", "--plot", "compare.png", cwd=work)
    assert c.returncode == 0, c.stderr[-3000:]
    out = c.stdout
    assert "skipped:" in out and "broken" in out  # named, and the good runs are still compared
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[2] in ("fp", "fakequant", "int8"):
            table.setdefault((parts[0], parts[2]), []).append(parts)
    assert float(table["ckpt/best", "fp"][0][3]) == pytest.approx(fp, abs=1e-4)
    assert table["ckpt/best", "fp"][0][5] == "+0.00%"
    for mode, value in (("fakequant", fq), ("int8", i8)):
        got = [p for p in table["ptq/calibrated", mode] if p[5] != "—"]
        assert len(got) == 1 and float(got[0][3]) == pytest.approx(value, abs=1e-4)
        assert float(got[0][5].rstrip("%")) == pytest.approx(100 * (value / fp - 1), abs=0.006)
    # the seq_len 32 run is other data: no fp result for it, so no delta, and a note that says which command gives one
    assert any(p[5] == "—" for p in table["ptq/calibrated", "int8"])
    assert "no fp result for" in out and "python evaluate.py --checkpoint" in out
    assert (work / "compare.png").stat().st_size > 10_000
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    e = run("-m", "qmamba.compare", str(empty), "--no-wandb", cwd=work)
    assert e.returncode == 2 and "no W&B runs found" in e.stderr
