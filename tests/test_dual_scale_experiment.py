"""benchmarks/dual_scale_experiment.py end to end on CPU, on tiny fp checkpoints (Mamba1 and Mamba2, random weights,
the tiny Shakespeare corpus of the pipeline tests): PTQ of the four groups for two calibration seeds, QAT of two
steps through train.py's CLI for one seed, and what the files say:

- rows.csv has exactly the expected rows; the control reproduces the baseline bit for bit after PTQ (int8 and
  fakequant, every seed); the treatments differ from it; the calibration seed changes the result, and a row
  recomputed by hand (prepare + calibrate with that seed + score) is the same number;
- QAT: the run's config carries the overrides, its int8 model differs from the PTQ one (it trained), and the control
  reproduces the baseline (the same forward and, by the dual-scale STE's range rule, the same gradients);
- outlier_shares.csv: one row per group and layer, shares in [0, 1], the control's equal to the baseline's;
- summary.md exists and holds the tables, the noise line and the outlier shares;
- ``--qat-repeats 2``: rows and run folders per repeat, the repeats bit for bit on CPU, the tables from repeat 0 only,
  the same-seed rerun noise lines (and their within / OUTSIDE verdict on made-up rows with a nonzero spread);
- ``--qat-deterministic``: the run's config has trainer.deterministic and the torch backend, the control still
  reproduces the baseline, and torch's deterministic flag is restored after the runs;
- bad input is one clear error naming the fix.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import qmamba
from qmamba.data import TextDataModule
from qmamba.lightning.checkpoint import checkpoint_entry, load_checkpoint_model
from qmamba.models import MambaLM
from qmamba.models.loading import CHECKPOINT_KEY
from qmamba.qnn import calibrate, prepare, set_mode
from qmamba.quant.recipe import load_recipe
from qmamba.sensitivity import perplexity_and_bpb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "pipeline"))
import dual_scale_experiment as dse  # noqa: E402
from test_pipeline import tiny_corpus  # noqa: E402

PRESETS = {"mamba1": "tiny", "mamba2": "tiny-mamba2"}
QAT_GROUPS = {"mamba1": ["baseline", "control", "treatment_piecewise"], "mamba2": ["baseline", "control"]}
SEEDS = [0, 1]
LIMIT = 2  # test batches scored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (fp checkpoint, CPU QAT config)}: configs/qat_gpu*.yaml with the tiny data, fp32, on the CPU."""
    tmp = tmp_path_factory.mktemp("dual_scale")
    data = {"corpus": str(tiny_corpus(tmp / "corpus")), "tokenizer": "bytes", "seq_len": 64, "batch_size": 4,
            "eval_batch_size": 4, "calibration_samples": 8, "calibration_seq_len": 64, "num_workers": 0}
    out = {}
    for family, name in PRESETS.items():
        torch.manual_seed(0)
        model = MambaLM(qmamba.preset(name))
        ckpt = tmp / f"{family}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    CHECKPOINT_KEY: checkpoint_entry(model), "datamodule_hyper_parameters": data}, ckpt)
        cfg = yaml.safe_load((ROOT / dse.FAMILIES[family].qat_config).read_text())
        cfg["trainer"].update(accelerator="cpu", precision="32-true")
        cfg["data"]["init_args"] = dict(data)
        qat = tmp / f"qat_{family}.yaml"
        qat.write_text(yaml.safe_dump(cfg))
        out[family] = (ckpt, qat)
    return tmp, data, out


@pytest.fixture(scope="module")
def runs(tiny):
    tmp, _, made = tiny
    outs = {}
    for family, (ckpt, qat) in made.items():
        out = tmp / f"out_{family}"
        assert dse.main(["--checkpoint", str(ckpt), "--family", family, "--seeds", ",".join(map(str, SEEDS)),
                         "--qat-seeds", "0", "--qat-steps", "2", "--qat-groups", ",".join(QAT_GROUPS[family]),
                         "--qat-config", str(qat), "--limit-batches", str(LIMIT), "--out", str(out)]) == 0
        outs[family] = out
    return outs


@pytest.fixture(scope="module")
def repeated(tiny):
    """Mamba1, QAT only: baseline and control, seed 0, each run twice (--qat-repeats 2), not deterministic."""
    tmp, _, made = tiny
    ckpt, qat = made["mamba1"]
    out = tmp / "out_repeats"
    assert dse.main(["--checkpoint", str(ckpt), "--family", "mamba1", "--skip-ptq", "--qat-seeds", "0",
                     "--qat-steps", "2", "--qat-groups", "baseline,control", "--qat-repeats", "2",
                     "--qat-config", str(qat), "--limit-batches", str(LIMIT), "--out", str(out)]) == 0
    return out


def _rows(out: Path) -> dict[tuple, dict]:
    """rows.csv of repeat 0 by (phase, group, seed, mode)."""
    rows = list(csv.DictReader(open(out / "rows.csv")))
    table = {(r["phase"], r["group"], r["seed"], r["mode"]): r for r in rows if r["repeat"] == "0"}
    assert len(table) == sum(r["repeat"] == "0" for r in rows)  # no duplicate rows
    return table


@pytest.mark.parametrize("family", PRESETS)
def test_rows(runs, family):
    table = _rows(runs[family])
    expected = {("fp", "fp", "", "fp")}
    expected |= {("ptq", g, str(s), m) for g in dse.GROUPS for s in SEEDS for m in ("int8", "fakequant")}
    expected |= {("qat", g, "0", "int8") for g in QAT_GROUPS[family]}
    assert set(table) == expected
    assert [r["repeat"] for r in csv.DictReader(open(runs[family] / "rows.csv"))] == ["0"] * len(expected)
    encodings = {"baseline": "single", "control": "mask", "treatment": "mask", "treatment_piecewise": "piecewise"}
    for (phase, group, _, _), r in table.items():
        assert r["family"] == family
        if phase != "fp":
            assert r["encoding"] == encodings[group] and r["recipe"] == f"dual_scale_{group}_{family}.yaml"
        ppl, bpb = float(r["ppl"]), float(r["bpb"])
        assert math.isfinite(ppl) and ppl > 1 and float(r["seconds"]) > 0
        assert bpb == pytest.approx(math.log2(ppl), rel=1e-5)  # bytes tokenizer: one byte per target
    for s in SEEDS:
        for mode in ("int8", "fakequant"):
            base, ctrl = table["ptq", "baseline", str(s), mode], table["ptq", "control", str(s), mode]
            assert (ctrl["ppl"], ctrl["bpb"]) == (base["ppl"], base["bpb"]), (s, mode)  # bit for bit
    for g in ("treatment", "treatment_piecewise"):  # the dual-scale path did something
        assert any(table["ptq", g, str(s), "int8"]["ppl"] != table["ptq", "baseline", str(s), "int8"]["ppl"]
                   for s in SEEDS), g
    assert table["ptq", "baseline", "0", "int8"]["ppl"] != table["ptq", "baseline", "1", "int8"]["ppl"]  # seeds


@pytest.mark.parametrize("family, group, seed", [("mamba1", "treatment", 1), ("mamba2", "treatment_piecewise", 1)])
def test_a_ptq_row_recomputed_by_hand(tiny, runs, family, group, seed):
    """prepare + calibrate on the calibration set drawn with calibration_seed = seed + score: the CSV's number."""
    _, data, made = tiny
    ckpt = made[family][0]
    dm = TextDataModule(**{**data, "calibration_seed": seed})
    dm.setup("fit")
    dm.setup("test")
    batches = [b for _, b in zip(range(LIMIT), dm.test_dataloader())]
    model = prepare(load_checkpoint_model(ckpt).eval(), load_recipe(str(dse.recipe_path(family, group))))
    calibrate(model, dm.calibration_dataloader(), progress=False)
    set_mode(model, "int8")
    r = perplexity_and_bpb(model, batches, "cpu")
    row = _rows(runs[family])["ptq", group, str(seed), "int8"]
    assert float(row["ppl"]) == r["ppl"] and float(row["bpb"]) == r["bpb"]


@pytest.mark.parametrize("family", PRESETS)
def test_qat_runs(runs, family):
    table = _rows(runs[family])
    for g in QAT_GROUPS[family]:
        run_dir = runs[family] / "qat" / f"{g}_seed0"
        cfg = yaml.safe_load((run_dir / "qat_config.yaml").read_text())
        assert cfg["seed_everything"] == 0 and cfg["data"]["init_args"]["calibration_seed"] == 0
        t = cfg["trainer"]
        assert t["max_steps"] == 2 and t["logger"] is False and t["limit_val_batches"] == 0
        assert [c["class_path"] for c in t["callbacks"]] == ["callbacks.Calibration", "callbacks.QAT",
                                                             "callbacks.Finalize"]
        assert t["callbacks"][0]["init_args"]["recipe"] == str(dse.recipe_path(family, g))
        assert cfg["model"]["init_args"]["init_from"].endswith(f"{family}.ckpt")
        assert "deterministic" not in t and "backend" not in cfg["model"]["init_args"]  # the QAT config's own
        assert not (run_dir / "int8.ckpt").exists()  # scored, then deleted (--keep-checkpoints keeps it)
    # QAT trained: its int8 model is not the PTQ one of the same calibration seed
    assert table["qat", "baseline", "0", "int8"]["ppl"] != table["ptq", "baseline", "0", "int8"]["ppl"]


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_qat_control_reproduces_baseline(runs, family):
    table = _rows(runs[family])
    base, ctrl = table["qat", "baseline", "0", "int8"], table["qat", "control", "0", "int8"]
    assert (ctrl["ppl"], ctrl["bpb"]) == (base["ppl"], base["bpb"])


@pytest.mark.parametrize("family", PRESETS)
def test_outlier_shares_and_summary(runs, family):
    out = runs[family]
    shares = list(csv.DictReader(open(out / "outlier_shares.csv")))
    point = dse.FAMILIES[family].point
    assert {(r["group"], r["layer"]) for r in shares} == {(g, str(i)) for g in dse.GROUPS for i in range(2)}
    assert all(r["seed"] == "0" and r["point"] == f"backbone.layers.{r['layer']}.mixer.{point}" for r in shares)
    value = {(r["group"], r["layer"]): float(r["share"]) for r in shares}
    assert all(0 <= v <= 1 for v in value.values())
    for layer in ("0", "1"):
        assert value["control", layer] == value["baseline", layer]  # same scale, same clipping
    assert sum(value["treatment", i] for i in ("0", "1")) > 0
    text = (out / "summary.md").read_text()
    for part in ("## PTQ, int8", "## PTQ, fakequant", "## QAT, int8", "Noise: baseline seed-to-seed ppl std",
                 "|control − baseline| ppl per seed: s0 0.00e+00, s1 0.00e+00 (bit for bit)",
                 "treatment_piecewise vs baseline", "## Outlier share of the SSM input per layer", f"| 1 | {point} |"):
        assert part in text, part


def test_qat_repeats(repeated):
    rows = list(csv.DictReader(open(repeated / "rows.csv")))
    assert [(r["phase"], r["group"], r["seed"], r["repeat"]) for r in rows] == [
        ("fp", "fp", "", "0"), ("qat", "baseline", "0", "0"), ("qat", "control", "0", "0"),
        ("qat", "baseline", "0", "1"), ("qat", "control", "0", "1")]  # repeat 0 of every run first
    qat = {(r["group"], r["repeat"]): r for r in rows if r["phase"] == "qat"}
    for g in ("baseline", "control"):
        assert (qat[g, "1"]["ppl"], qat[g, "1"]["bpb"]) == (qat[g, "0"]["ppl"], qat[g, "0"]["bpb"]), g  # CPU: exact
    assert qat["control", "0"]["ppl"] == qat["baseline", "0"]["ppl"]
    assert sorted(p.name for p in (repeated / "qat").iterdir()) == [
        "baseline_seed0_r0", "baseline_seed0_r1", "control_seed0_r0", "control_seed0_r1"]
    cfgs = [yaml.safe_load((repeated / "qat" / f"baseline_seed0_r{k}" / "qat_config.yaml").read_text())
            for k in (0, 1)]
    for k, cfg in enumerate(cfgs):  # identical settings but for the run's own folder
        assert cfg["trainer"].pop("default_root_dir").endswith(f"baseline_seed0_r{k}")
        assert cfg["trainer"]["callbacks"][-1].pop("init_args")["path"].endswith(f"baseline_seed0_r{k}/int8.ckpt")
    assert cfgs[0] == cfgs[1]
    text = (repeated / "summary.md").read_text()
    for part in ("2 run(s) per group and seed, not deterministic",
                 "| baseline | single | 1 |",  # the table reads repeat 0 only: one row per seed
                 "Same-seed rerun noise",
                 "- baseline: max |ppl(repeat k) − ppl(repeat 0)| 0.00e+00 (0.000 %) over 1 seed(s), 1 rerun(s) "
                 "(every rerun bit for bit)",
                 "- control: max |ppl(repeat k) − ppl(repeat 0)| 0.00e+00",
                 "- control vs baseline (repeat 0): |Δ ppl| within the baseline's same-seed rerun spread on 1/1 "
                 "seed(s): s0 0.00e+00 vs 0.00e+00"):
        assert part in text, part


def test_summary_rerun_noise_verdict():
    """Made-up QAT rows with a nonzero rerun spread: the numbers and the within / OUTSIDE verdict per seed."""
    def row(group, seed, repeat, ppl):
        return dse.Row("mamba1", "qat", group, "single", seed, repeat, "int8", ppl, math.log2(ppl), 1.0, 1.0, "r")

    rows = [row("baseline", 0, 0, 10.0), row("baseline", 0, 1, 10.01), row("baseline", 0, 2, 9.995),
            row("baseline", 1, 0, 11.0), row("baseline", 1, 1, 11.0),
            row("control", 0, 0, 10.005), row("control", 1, 0, 11.001)]
    meta = dict(family="mamba1", checkpoint="x.ckpt", batches=1, tokens=1, backend="torch", device="cpu",
                seeds="—", qat_seeds="0,1", qat_steps=2, qat_config="q.yaml", qat_repeats=3, qat_deterministic=True)
    text = dse.summarize(rows, [], meta)
    assert "3 run(s) per group and seed, deterministic (trainer.deterministic, torch op backend)" in text
    assert "| baseline | single | 2 | 10.5000 ± 0.7071 |" in text  # repeat 0 of seeds 0 and 1
    assert "- baseline: max |ppl(repeat k) − ppl(repeat 0)| 1.00e-02 (0.100 %) over 2 seed(s), 3 rerun(s)\n" in text
    assert ("- control vs baseline (repeat 0): |Δ ppl| within the baseline's same-seed rerun spread on 1/2 seed(s) "
            "(OUTSIDE on s1): s0 5.00e-03 vs 1.00e-02, s1 1.00e-03 vs 0.00e+00") in text
    assert "- control: max" not in text  # the control has no reruns here


def test_qat_deterministic(tiny, tmp_path, monkeypatch):
    _, _, made = tiny
    ckpt, qat = made["mamba1"]
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored after the test, whatever main sets
    assert dse.main(["--checkpoint", str(ckpt), "--family", "mamba1", "--skip-ptq", "--qat-seeds", "0",
                     "--qat-steps", "2", "--qat-groups", "baseline,control", "--qat-deterministic",
                     "--qat-config", str(qat), "--limit-batches", "1", "--out", str(tmp_path)]) == 0
    for g in ("baseline", "control"):
        cfg = yaml.safe_load((tmp_path / "qat" / f"{g}_seed0" / "qat_config.yaml").read_text())
        assert cfg["trainer"]["deterministic"] is True and cfg["model"]["init_args"]["backend"] == "torch", g
    table = _rows(tmp_path)
    assert table["qat", "control", "0", "int8"]["ppl"] == table["qat", "baseline", "0", "int8"]["ppl"]
    assert "1 run(s) per group and seed, deterministic (trainer.deterministic, torch op backend)" in \
        (tmp_path / "summary.md").read_text()
    assert "Same-seed rerun noise" not in (tmp_path / "summary.md").read_text()  # one run each: no reruns
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()  # Lightning's global flag, restored after each run


def test_clear_errors(tiny, tmp_path):
    _, data, made = tiny
    ckpt1, qat1 = made["mamba1"]
    common = ["--out", str(tmp_path / "o"), "--skip-qat"]
    with pytest.raises(FileNotFoundError, match="train.py --config configs/pretrain_gpu_mamba2.yaml"):
        dse.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--family", "mamba2", *common])
    with pytest.raises(ValueError, match="holds a Mamba1 model but --family is mamba2: use --family mamba1"):
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba2", *common])
    with pytest.raises(ValueError, match="unknown group.*choose from baseline, control"):
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba1", "--groups", "baseline,treatmnt", *common])
    with pytest.raises(ValueError, match="--seeds must be a comma list of integers"):
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba1", "--seeds", "0,a", *common])
    with pytest.raises(ValueError, match=r"--qat-repeats must be >= 1 \(1 = each QAT run once\), got 0"):
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba1", "--qat-repeats", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--qat-steps must be >= 1.*--skip-qat"):
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba1", "--qat-steps", "0", "--out", str(tmp_path)])
    other = yaml.safe_load(qat1.read_text())
    other["data"]["init_args"]["corpus"] = "shakespeare"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match="splits other data.*corpus"):
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba1", "--qat-config", str(tmp_path / "other.yaml"),
                  "--out", str(tmp_path)])
    bad = copy.deepcopy(yaml.safe_load(qat1.read_text()))
    bad["trainer"]["callbacks"] = [c for c in bad["trainer"]["callbacks"] if c["class_path"] != "callbacks.QAT"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="no callbacks.QAT"):
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba1", "--qat-config", str(tmp_path / "bad.yaml"),
                  "--qat-steps", "1", "--limit-batches", "1", "--skip-ptq", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):  # argparse: invalid choice, lists mamba1 / mamba2
        dse.main(["--checkpoint", str(ckpt1), "--family", "mamba3", *common])
    # the command line prints one line, no traceback, and exits 2
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dual_scale_experiment.py"), "--checkpoint",
                        str(tmp_path / "nope.ckpt"), "--family", "mamba1", *common], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --checkpoint") and "Traceback" not in r.stderr


@pytest.mark.parametrize("family", PRESETS)
def test_piecewise_recipe_is_the_treatment_with_the_other_encoding(family):
    mask = load_recipe(str(dse.recipe_path(family, "treatment"))).to_dict()
    piecewise = load_recipe(str(dse.recipe_path(family, "treatment_piecewise"))).to_dict()
    point = f"*.mixer.{dse.FAMILIES[family].point}"
    spec = piecewise["targets"][point]["dual_scale"]
    assert spec["encoding"] == "piecewise" and mask["targets"][point]["dual_scale"]["encoding"] == "mask"
    spec["encoding"] = "mask"
    assert piecewise["name"] == mask["name"].replace("treatment", "treatment_piecewise")
    assert piecewise["targets"] == mask["targets"] and piecewise["ignores"] == mask["ignores"]
