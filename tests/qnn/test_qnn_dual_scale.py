"""Dual-scale SSM input inside the model (tiny Mamba1 / Mamba2, the configs/recipes/dual_scale_* recipes):

- control (both scales = the baseline's scale) gives logits == the baseline's exactly (torch.equal), in fakequant
  and int8 (torch backend), forward and decode steps;
- treatment differs from the baseline, and fakequant vs int8 agreement meets the contract (>= 99.9 % identical
  codes and flags, <= 1 LSB) on every activation point;
- int8 decode steps reproduce the int8 forward (within fp32 scan noise, as the existing generation tests);
- the int8 kernel dispatch never gets dual-scale codes (single-scale quantize / codes refuse them);
- dual_scale anywhere but scan.u / scan.x is an error naming the point;
- outlier_scale travels in checkpoints (prepared and converted); a recipe without dual_scale has no such buffer.
"""

from pathlib import Path

import pytest
import torch

import qmamba
from qmamba.lightning.checkpoint import checkpoint_entry, load_checkpoint_model
from qmamba.models import MambaLM
from qmamba.outlier_share import format_outlier_shares, outlier_shares
from qmamba.qnn import agreement_report, calibrate, convert, format_agreement, prepare, quant_points, set_mode
from qmamba.quant.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
MODELS = [("tiny", "mamba1", "scan.u"), ("tiny-mamba2", "mamba2", "scan.x")]


def _ids(batch=2, L=24, seed=1):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


def _recipe(group, m):
    return load_recipe(str(RECIPES / f"dual_scale_{group}_{m}.yaml"))


def _calibrated(name, recipe):
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset(name)).eval(), recipe)
    with torch.no_grad():  # an SSM input with real outliers, so the treatment has something to do
        for layer in model.backbone.layers:
            layer.mixer.conv1d.weight[::7] *= 8
    calibrate(model, [_ids(seed=s) for s in (10, 11, 12)], progress=False)
    return model


def _logits(model, mode, x):
    set_mode(model, mode)
    with torch.no_grad():
        return model(x)


def _dual_points(model):
    return [p for p in quant_points(model) if not p.is_weight and p.dual is not None]


@pytest.mark.parametrize("name, m, point", MODELS)
def test_control_equals_baseline_exactly(name, m, point):
    base, ctrl = _calibrated(name, _recipe("baseline", m)), _calibrated(name, _recipe("control", m))
    duals = _dual_points(ctrl)
    assert duals and all(p.name.endswith(point) for p in duals)
    bpoints = {p.name: p for p in quant_points(base)}
    for p in duals:
        assert torch.equal(p.scale, bpoints[p.name].scale) and torch.equal(p.outlier_scale, p.scale)
    x = _ids(seed=5)
    for mode in ("fakequant", "int8", "fp"):
        assert torch.equal(_logits(ctrl, mode, x), _logits(base, mode, x)), mode


@pytest.mark.parametrize("name, m, point", MODELS)
def test_treatment(name, m, point):
    base, treat = _calibrated(name, _recipe("baseline", m)), _calibrated(name, _recipe("treatment", m))
    duals = _dual_points(treat)
    assert duals
    for p in duals:
        assert bool((p.outlier_scale > p.scale).all()), p.name  # absmax vs the 99.9th percentile
    x = _ids(seed=5)
    fq, i8 = _logits(treat, "fakequant", x), _logits(treat, "int8", x)
    assert not torch.equal(fq, _logits(base, "fakequant", x))
    assert not torch.equal(i8, _logits(base, "int8", x))
    assert float((fq - i8).norm() / i8.norm()) < 1e-3
    rows = agreement_report(treat, x)
    assert all(r.meets_contract for r in rows), format_agreement(rows)
    assert {p.name for p in duals} <= {r.point for r in rows}
    shares = outlier_shares(treat, [_ids(seed=s) for s in (20, 21)])
    assert set(shares) == {p.name for p in duals}
    assert all(0 < s < 0.05 for s in shares.values()), format_outlier_shares(shares)
    base_shares = outlier_shares(base, [_ids(seed=s) for s in (20, 21)])  # what the baseline's one scale clips
    assert set(base_shares) == set(shares)


@torch.no_grad()
def _prefill_then_steps(model, ids, P):
    cache = model.allocate_cache(ids.shape[0])
    pre = model.prefill(ids[:, :P], cache)
    return pre, torch.stack([model.step(ids[:, t], cache) for t in range(P, ids.shape[1])], 1)


@pytest.mark.parametrize("name, m, point", MODELS)
def test_decode_steps(name, m, point):
    """prefill + steps follow forward (relative L2 <= 5e-3, as tests/test_generation.py: the step's scan sums in
    another order); the control's decode equals the baseline's exactly."""
    x = _ids(batch=2, L=12, seed=7)
    models = {g: _calibrated(name, _recipe(g, m)) for g in ("baseline", "control", "treatment")}
    out = {}
    for g, model in models.items():
        for mode in ("int8", "fakequant"):
            full = _logits(model, mode, x)
            pre, steps = _prefill_then_steps(model, x, 8)
            got = torch.cat([pre, steps], 1)
            assert float((got - full).norm() / full.norm()) <= 5e-3, (g, mode)
            out[g, mode] = got
    for mode in ("int8", "fakequant"):
        assert torch.equal(out["control", mode], out["baseline", mode]), mode
        assert not torch.equal(out["treatment", mode], out["baseline", mode]), mode


def test_single_scale_quantizers_refuse_a_dual_point():
    model = _calibrated("tiny", _recipe("treatment", "mamba1"))
    p = _dual_points(model)[0]
    u = torch.randn(2, p.observer.channels, 5)
    with pytest.raises(RuntimeError, match="dual-scale point"):
        p.quantize(u)
    with pytest.raises(RuntimeError, match="dual-scale point"):
        p.codes(u, p.scale_for(u))
    scan = model.backbone.layers[0].mixer.scan
    set_mode(model, "int8")
    assert scan._integer()  # the int8 scan takes the dual-scale codes with their outlier scale and flags


@pytest.mark.parametrize("target", ["x_proj.input", "scan.delta", "in_proj.input", "norm.z", "scan.B"])
def test_dual_scale_only_on_the_ssm_input(target):
    name = "tiny-mamba2" if target == "norm.z" else "tiny"
    recipe = {"name": "bad", "targets": {f"*.mixer.{target}": {"dual_scale": {}}}}
    with pytest.raises(ValueError, match=f"dual_scale on .*{target.replace('.', '[.]')}"):
        prepare(MambaLM(qmamba.preset(name)), recipe)


@pytest.mark.parametrize("name, m, point", MODELS)
def test_checkpoint_round_trip_keeps_outlier_scale(name, m, point, tmp_path):
    model = _calibrated(name, _recipe("treatment", m))
    x = _ids(seed=5)
    ref = {mode: _logits(model, mode, x) for mode in ("int8", "fakequant")}
    for stage in ("prepared", "converted"):
        if stage == "converted":
            convert(model)
        sd = model.state_dict()
        keys = [k for k in sd if k.endswith("outlier_scale")]
        assert keys and all(k.rsplit(".", 2)[-2] == point.split(".")[1] for k in keys)
        path = tmp_path / f"{stage}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v.clone() for k, v in sd.items()},
                    "qmamba": checkpoint_entry(model)}, path)
        loaded = load_checkpoint_model(path)
        lsd = loaded.state_dict()
        for k in keys:
            assert torch.equal(lsd[k], sd[k]) and not torch.equal(lsd[k], torch.ones_like(lsd[k])), k
        assert torch.equal(_logits(loaded, "int8", x), ref["int8"]), stage
    # a recipe without dual_scale: no outlier_scale buffer (old checkpoints load as before)
    base = _calibrated(name, _recipe("baseline", m))
    assert not any(k.endswith("outlier_scale") for k in base.state_dict())


@pytest.mark.parametrize("name, m, point", MODELS)
def test_piecewise_encoding_in_the_model(name, m, point):
    """The treatment with the piecewise encoding (knee 112): scales s_in = T / 112, s_out = (A - T) / 15; fakequant
    vs int8 agreement meets the contract; logits differ from the mask treatment's."""
    data = _recipe("treatment", m).to_dict()
    spec = data["targets"][f"*.mixer.{point}"]
    spec["dual_scale"] = dict(spec["dual_scale"], encoding="piecewise", knee=112)
    model, mask = _calibrated(name, data), _calibrated(name, _recipe("treatment", m))
    x = _ids(seed=5)
    rows = agreement_report(model, x)
    assert all(r.meets_contract for r in rows), format_agreement(rows)
    thr = {p.name: p.observer.threshold.absmax() for p in _dual_points(model)}
    for p in _dual_points(model):
        assert torch.equal(p.scale, thr[p.name].clamp_min(1e-8) / 112)
    fq, i8 = _logits(model, "fakequant", x), _logits(model, "int8", x)
    assert float((fq - i8).norm() / i8.norm()) < 1e-3
    assert not torch.equal(i8, _logits(mask, "int8", x))
