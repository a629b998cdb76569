"""Per-point sensitivity (SQNR and one-point-at-a-time perplexity) and the percentile sweep, on the tiny model:
the numbers against definitions written here, the point switches, the command lines end to end on a tiny corpus
(CSV, PNG), and their bad-input messages."""

from __future__ import annotations

import copy
import csv
import math
import sys
from pathlib import Path

import pytest
import torch

import qmamba
from qmamba.lightning.checkpoint import checkpoint_entry
from qmamba.models import MambaLM
from qmamba.models.loading import CHECKPOINT_KEY
from qmamba.percentile_sweep import groups_of, sweep, with_percentile
from qmamba.qnn import calibrate, convert, planned_activation_points, prepare, quant_points, set_mode
from qmamba.quant.recipe import load_recipe
from qmamba.sensitivity import only_points, perplexity, sensitivity

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
from test_pipeline import tiny_corpus  # noqa: E402


def _batches(n=2, L=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (3, L + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:], torch.full((3,), L)))
    return out


def _calibrated(recipe="quamba_w8a8", name="tiny"):
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset(name)).eval(), recipe)
    calibrate(model, [b[0] for b in _batches(seed=9)], progress=False)
    return model


def test_no_point_enabled_is_fp_and_all_enabled_is_fakequant():
    model = _calibrated("configs/recipes/quamba_w8a8_no_rotation.yaml")  # no rotation: fp equality is exact
    x = _batches()[0][0]
    with torch.no_grad():
        set_mode(model, "fp")
        fp = model(x)
        set_mode(model, "fakequant")
        fq = model(x)
        with only_points(model, []):
            assert torch.equal(model(x), fp)
        with only_points(model, [p.name for p in quant_points(model)]):
            assert torch.equal(model(x), fq)
        assert not torch.equal(fq, fp)
    assert all(p.enabled for p in quant_points(model))  # restored
    with pytest.raises(ValueError, match="no quantization point named"):
        with only_points(model, ["backbone.layers.0.mixer.nope.input"]):
            pass


@pytest.mark.parametrize("recipe, name", [("quamba_w8a8", "tiny"), ("quamba2_w8a8", "tiny-mamba2")])
def test_rows_match_definitions(recipe, name):
    model = _calibrated(recipe, name)
    batches = _batches()
    fp, rows = sensitivity(model, batches, progress=False)
    points = {p.name: p for p in quant_points(model)}
    assert sorted(r.point for r in rows) == sorted(points)
    set_mode(model, "fp")
    assert fp == pytest.approx(perplexity(model, batches, "cpu"), rel=0, abs=0)
    for r in rows:
        assert r.kind == ("weight" if points[r.point].is_weight else "activation")
        assert math.isfinite(r.sqnr_db) and 5 < r.sqnr_db < 80, r
        assert r.delta_ppl == pytest.approx(r.ppl / fp - 1, rel=1e-12)
    # a weight's SQNR by hand: the rotated out_proj weight W H, per-tensor scale absmax / 127
    lin = model.backbone.layers[0].mixer.out_proj
    w = lin.weight_to_quantize().detach().float()
    s = w.abs().max() / 127
    noise = (w - torch.clamp(torch.round(w * (1 / s)), -128, 127) * s).double().pow(2).sum()
    expected = 10 * math.log10(float(w.double().pow(2).sum() / noise))
    row = next(r for r in rows if r.point == lin.quant_points["weight"].name)
    assert row.sqnr_db == pytest.approx(expected, abs=1e-6)
    # one point alone: its row's perplexity is that of fakequant with only it switched on
    one = rows[3]
    set_mode(model, "fakequant")
    with only_points(model, [one.point]):
        assert one.ppl == perplexity(model, batches, "cpu")


def test_a_crippled_point_ranks_first():
    model = _calibrated()
    point = model.backbone.layers[1].mixer.in_proj.quant_points["input"]
    with torch.no_grad():
        point.scale.mul_(0.02)  # clips nearly everything at this point
    fp, rows = sensitivity(model, _batches(), progress=False)
    ranked = sorted(rows, key=lambda r: -r.delta_ppl)
    assert ranked[0].point == point.name and ranked[0].delta_ppl > 3 * ranked[1].delta_ppl
    assert min(rows, key=lambda r: r.sqnr_db).point == point.name


def test_sensitivity_refuses_converted_or_uncalibrated():
    model = _calibrated()
    convert(model)
    with pytest.raises(ValueError, match="not a converted int8"):
        sensitivity(model, _batches(), progress=False)
    fresh = prepare(MambaLM(qmamba.preset("tiny")), "quamba_w8a8")
    with pytest.raises(ValueError, match="calibrated"):
        sensitivity(fresh, _batches(), progress=False)


# ---- percentile sweep --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, recipe", [("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8")])
def test_planned_points_are_the_points_prepare_creates(name, recipe):
    model = MambaLM(qmamba.preset(name))
    planned = planned_activation_points(model, recipe)
    assert not any(True for _ in quant_points(model))  # nothing prepared
    prepared = [p.name for p in quant_points(prepare(model, recipe)) if not p.is_weight]
    assert planned == prepared


def test_with_percentile_changes_only_the_named_points():
    model = MambaLM(qmamba.preset("tiny-mamba2"))
    recipe = load_recipe("quamba2_w8a8")
    names = planned_activation_points(model, recipe)
    x = [n for n in names if n.endswith("scan.x")]
    r = with_percentile(recipe, x[:1], 0.99)
    assert r.spec_for(x[0]).observer.alpha == 0.99 and r.spec_for(x[0]).observer.kind == "percentile"
    assert r.spec_for(x[0]).granularity == recipe.spec_for(x[0]).granularity  # per head kept
    for n in names[1:]:
        if n != x[0]:
            assert r.spec_for(n) == recipe.spec_for(n)
    groups = groups_of(names, ["*.scan.x", "*.in_proj.input,*.conv1d.input"], per_layer=True)
    assert set(groups) == {"*.scan.x @ layer 0", "*.scan.x @ layer 1", "*.in_proj.input,*.conv1d.input @ layer 0",
                           "*.in_proj.input,*.conv1d.input @ layer 1"}
    with pytest.raises(ValueError, match="matches no activation point"):
        groups_of(names, ["*.nothing"], per_layer=False)


def test_sweep_rows_and_alpha_one_is_min_max():
    torch.manual_seed(0)
    model = MambaLM(qmamba.preset("tiny")).eval()
    recipe = load_recipe("quamba_w8a8")
    names = planned_activation_points(model, recipe)
    groups = groups_of(names, ["*.x_proj.input,*.scan.u"], per_layer=False)
    calib, batches = [b[0] for b in _batches(seed=9)], _batches()
    fp, rows = sweep(model, recipe, groups, [0.99, 1.0], calib, batches, "cpu")
    assert [r.alpha for r in rows] == [0.99, 1.0] and not any(True for _ in quant_points(model))  # untouched
    assert all(math.isfinite(r.ppl) and r.delta_ppl == pytest.approx(r.ppl / fp - 1) for r in rows)
    scales = {}
    for alpha in (0.99, 1.0):  # α = 1 keeps the whole range: never a smaller scale than a clipping α
        q = prepare(copy.deepcopy(model), with_percentile(recipe, groups["*.x_proj.input,*.scan.u"], alpha))
        calibrate(q, calib, progress=False)
        scales[alpha] = {p.name: float(p.scale) for p in quant_points(q) if p.name in set(names)}
    swept = groups["*.x_proj.input,*.scan.u"]
    assert all(scales[1.0][n] > scales[0.99][n] for n in swept)
    assert all(scales[1.0][n] == scales[0.99][n] for n in names if n not in swept and n in scales[1.0])
    with pytest.raises(ValueError, match="alphas"):
        sweep(model, recipe, groups, [1.5], calib, batches, "cpu")


# ---- command lines ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sens")
    corpus = tiny_corpus(tmp / "corpus")
    torch.manual_seed(0)
    model = MambaLM(qmamba.preset("tiny"))
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            CHECKPOINT_KEY: checkpoint_entry(model),
            "datamodule_hyper_parameters": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 64,
                                            "batch_size": 4, "eval_batch_size": 4, "calibration_samples": 8,
                                            "calibration_seq_len": 64}}
    path = tmp / "fp.ckpt"
    torch.save(ckpt, path)
    return tmp, path


def test_sensitivity_command(fp_checkpoint, capsys):
    from qmamba.sensitivity import main

    tmp, ckpt = fp_checkpoint
    assert main(["--checkpoint", str(ckpt), "--recipe", "quamba_w8a8", "--limit-batches", "1", "--out",
                 str(tmp / "s"), "--no-wandb", "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "ranked by the perplexity change" in text and "SQNR" in text
    rows = list(csv.DictReader(open(tmp / "s" / "sensitivity.csv")))
    assert len(rows) == 2 * 15  # tiny Mamba1: 2 layers x (10 activation + 5 weight) points
    assert (tmp / "s" / "sensitivity.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="give --recipe"):
        main(["--checkpoint", str(ckpt), "--no-wandb", "--out", str(tmp / "s2")])


def test_percentile_sweep_command(fp_checkpoint, capsys):
    from qmamba.percentile_sweep import main

    tmp, ckpt = fp_checkpoint
    assert main(["--checkpoint", str(ckpt), "--alphas", "0.999,1", "--limit-batches", "1", "--out", str(tmp / "p"),
                 "--no-wandb"]) == 0
    text = capsys.readouterr().out
    assert "*.scan.u,*.x_proj.input" in text and "best α" in text  # default group: the recipe's percentile points
    rows = list(csv.DictReader(open(tmp / "p" / "percentile_sweep.csv")))
    assert [float(r["alpha"]) for r in rows] == [0.999, 1.0]
    assert (tmp / "p" / "percentile_sweep.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="--alphas"):
        main(["--checkpoint", str(ckpt), "--alphas", "a,b", "--no-wandb"])
    with pytest.raises(ValueError, match="matches no activation point"):
        main(["--checkpoint", str(ckpt), "--points", "*.nope", "--no-wandb", "--out", str(tmp / "p2")])
