"""prepare (module swap per recipe), calibrate / observing, and set_mode on the tiny Mamba1 / Mamba2 models.

Exact checks throughout: fp mode of a prepared model is bit-identical (torch.equal) to the float model; observer
counts are exact integers.
"""

import copy

import pytest
import torch
from torch import nn

import qmamba
from qmamba.models import MambaLM
from qmamba.models.parts import CausalConv1d, RMSNormGated, SelectiveScan, SSDScan
from qmamba.qnn import (QuantCausalConv1d, QuantLinear, QuantRMSNormGated, QuantSelectiveScan, QuantSSDScan,
                        QuantTwin, calibrate, current_mode, is_calibrated, is_prepared, observing, prepare, quant_points,
                        set_mode, twins)
from qmamba.quant.granularity import PerChannel
from qmamba.quant.recipe import QuantSpec, Recipe, load_recipe

# The twins and quantization points each mixer gets from the default recipes.
EXPECTED = {
    ("tiny", "quamba_w8a8"): {
        "in_proj": (QuantLinear, {"input", "weight"}),
        "conv1d": (QuantCausalConv1d, {"input", "weight"}),
        "x_proj": (QuantLinear, {"input", "weight"}),
        "dt_proj": (QuantLinear, {"input", "weight"}),
        "scan": (QuantSelectiveScan, {"u", "delta", "B", "C", "z"}),
        "out_proj": (QuantLinear, {"input", "weight"}),
    },
    ("tiny-mamba2", "quamba2_w8a8"): {
        "in_proj": (QuantLinear, {"input", "weight"}),
        "conv1d": (QuantCausalConv1d, {"input", "weight"}),
        "scan": (QuantSSDScan, {"x", "dt", "B", "C"}),
        "norm": (QuantRMSNormGated, {"z"}),
        "out_proj": (QuantLinear, {"input", "weight"}),
    },
}
CASES = list(EXPECTED)
FLOAT_OF = {QuantLinear: nn.Linear, QuantCausalConv1d: CausalConv1d, QuantSelectiveScan: SelectiveScan,
            QuantSSDScan: SSDScan, QuantRMSNormGated: RMSNormGated}
ACTIVATION_POINTS = {"tiny": 10, "tiny-mamba2": 8}  # per mixer


def _model(name: str) -> MambaLM:
    torch.manual_seed(0)
    return MambaLM(qmamba.preset(name)).eval()


def _ids(batch=2, L=24, seed=1):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


def _prepared(name, recipe, calibrated=True):
    model = prepare(_model(name), recipe)
    if calibrated:
        calibrate(model, [_ids(seed=s) for s in range(2)], progress=False)
    return model


@pytest.mark.parametrize("name, recipe", CASES)
def test_prepare_swaps_exactly_the_recipe_parts(name, recipe):
    model = prepare(_model(name), recipe)
    assert is_prepared(model) and current_mode(model) == "fp"
    assert model.quant_recipe == load_recipe(recipe)
    found = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantTwin):
            found[mod_name] = (type(module), set(module.quant_points.keys()))
    expected = {f"backbone.layers.{i}.mixer.{part}": v for i in range(model.config.n_layer)
                for part, v in EXPECTED[(name, recipe)].items()}
    assert found == expected
    # Each point carries its full name; the twin is still an instance of its float class.
    for mod_name, (cls, points) in found.items():
        twin = model.get_submodule(mod_name)
        assert isinstance(twin, FLOAT_OF[cls])
        for p in points:
            assert twin.quant_points[p].name == f"{mod_name}.{p}"
            assert twin.quant_points[p].is_weight == (p == "weight")
    # Embedding, lm_head, block norms and the final norm are untouched.
    assert type(model.lm_head) is nn.Linear
    assert type(model.backbone.embedding) is nn.Embedding
    assert not any(isinstance(m, QuantTwin) for m in (model.backbone.norm_f, model.backbone.layers[0].norm))
    assert sum(not p.is_weight for p in quant_points(model)) == ACTIVATION_POINTS[name] * model.config.n_layer


@pytest.mark.parametrize("name, recipe", CASES)
def test_prepare_shares_parameters_and_only_adds_state(name, recipe):
    model = _model(name)
    before_ids = {n: id(p) for n, p in model.named_parameters()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _ids()
    with torch.no_grad():
        ref = model(x)
    prepare(model, recipe)
    after_ids = {n: id(p) for n, p in model.named_parameters()}
    assert after_ids == before_ids  # same names, same objects (nothing copied, nothing re-initialized)
    state = model.state_dict()
    new = set(state) - set(before_state)
    assert set(before_state) <= set(state)
    assert new and all(".quant_points." in k for k in new)
    for k, v in before_state.items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, ref)  # fp mode: bit-identical logits


@pytest.mark.parametrize("name, recipe", CASES)
def test_fp_mode_bit_identical_after_calibration(name, recipe):
    ref_model = _model(name)
    model = _prepared(name, recipe)
    set_mode(model, "fakequant")
    set_mode(model, "fp")
    x = _ids(seed=7)
    with torch.no_grad():
        assert torch.equal(model(x), ref_model(x))


def test_prepare_twice_is_a_no_op():
    model = prepare(_model("tiny"), "quamba_w8a8")
    mods = {n: id(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare(model, "quamba_w8a8") is model
    assert {n: id(m) for n, m in model.named_modules()} == mods
    assert model.state_dict().keys() == state.keys()
    for m in twins(model):  # no twin of a twin
        assert type(m) in (QuantLinear, QuantCausalConv1d, QuantSelectiveScan)


def test_recipe_matching_nothing_is_an_error():
    r = Recipe("none", targets=(("*.attention.q_proj.input", QuantSpec()),))
    model = _model("tiny")
    with pytest.raises(ValueError, match="matches no quantization point"):
        prepare(model, r)
    assert not is_prepared(model)
    # ignores beating every target is the same situation
    r2 = Recipe("ignored", targets=(("*.mixer.in_proj.input", QuantSpec()),), ignores=("backbone.*",))
    with pytest.raises(ValueError, match="matches no quantization point"):
        prepare(model, r2)


def test_per_channel_linear_input_is_rejected_with_the_fix():
    r = Recipe("bad", targets=(("*.mixer.in_proj.input", QuantSpec(granularity=PerChannel(axis=-1))),))
    model = _model("tiny")
    with pytest.raises(ValueError, match="per-tensor") as e:
        prepare(model, r)
    assert "recipe" in str(e.value)
    assert not is_prepared(model)  # nothing half-swapped


def test_lm_head_only_when_targeted_and_not_ignored():
    spec = QuantSpec()
    broad = Recipe("broad", targets=(("*.input", spec), ("*.weight", spec)))
    model = prepare(_model("tiny"), broad)
    assert isinstance(model.lm_head, QuantLinear)  # a broad recipe reaches it ...
    assert model.lm_head.weight is model.backbone.embedding.weight  # ... and keeps the tie
    model = prepare(_model("tiny"), Recipe("b", broad.targets, ignores=("lm_head.*",)))
    assert type(model.lm_head) is nn.Linear


# ---- calibrate / observing ---------------------------------------------------------------------------------------
def _counts(model):
    return {p.name: int(p.observer.num_batches) for p in quant_points(model) if not p.is_weight}


@pytest.mark.parametrize("name, recipe", CASES)
def test_observers_see_data_only_while_observing(name, recipe):
    model = prepare(_model(name), recipe)
    with torch.no_grad():
        model(_ids())
    assert set(_counts(model).values()) == {0}
    with torch.no_grad(), observing(model) as points:
        assert points and all(p.observing for p in points)
        model(_ids(seed=2))
        model(_ids(seed=3))
    assert set(_counts(model).values()) == {2}
    assert not any(p.observing for p in quant_points(model))
    with torch.no_grad():
        model(_ids(seed=4))
    assert set(_counts(model).values()) == {2}
    assert not is_calibrated(model)


@pytest.mark.parametrize("name, recipe", CASES)
def test_calibrate_counts_and_makes_scales_ready(name, recipe):
    model = prepare(_model(name), recipe)
    model.train()
    batches = [(_ids(seed=s), None) for s in range(5)]  # (x, y) tuples like the dataloaders give
    assert calibrate(model, batches, max_batches=3, progress=False) == 3
    assert set(_counts(model).values()) == {3}
    assert is_calibrated(model)
    assert model.training  # restored
    assert current_mode(model) == "fp"
    for p in quant_points(model):
        if not p.is_weight:
            assert bool(p.ready)
            assert torch.isfinite(p.scale).all() and (p.scale > 0).all()
            assert torch.equal(p.scale, p.observer.scale(p.spec.bits))
    with torch.no_grad():  # observers are off again
        model(_ids())
    assert set(_counts(model).values()) == {3}


def test_shared_tensor_points_get_the_same_scale():
    # x_proj.input and scan.u observe the same tensor with the same spec, so they must get the same scale.
    model = _prepared("tiny", "quamba_w8a8")
    for layer in model.backbone.layers:
        mixer = layer.mixer
        assert torch.equal(mixer.x_proj.quant_points["input"].scale, mixer.scan.quant_points["u"].scale)


@pytest.mark.parametrize("name, recipe", CASES)
def test_nan_in_calibration_names_the_point(name, recipe):
    model = prepare(_model(name), recipe)
    with torch.no_grad():
        model.backbone.embedding.weight[5] = float("nan")
    x = _ids()
    x[0, 3] = 5
    with pytest.raises(ValueError, match="NaN") as e:
        calibrate(model, [x], progress=False)
    assert "backbone.layers.0.mixer" in str(e.value)
    assert not any(p.observing for p in quant_points(model))  # observers switched off again
    assert not is_calibrated(model)


def test_empty_calibration_set():
    model = prepare(_model("tiny"), "quamba_w8a8")
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], progress=False)
    assert not is_calibrated(model)


def test_calibrate_unprepared_model():
    with pytest.raises(ValueError, match="prepare"):
        calibrate(_model("tiny"), [_ids()], progress=False)


@pytest.mark.parametrize("mode", ["int8", "fakequant"])
def test_quantized_modes_before_calibration_name_the_point(mode):
    model = prepare(_model("tiny"), "quamba_w8a8")
    set_mode(model, mode)
    with pytest.raises(RuntimeError, match=r"backbone\.layers\.0\.mixer\.in_proj\.input") as e:
        with torch.no_grad():
            model(_ids())
    assert "calibrate" in str(e.value)


# ---- set_mode ----------------------------------------------------------------------------------------------------
def test_set_mode_names_and_aliases():
    model = _prepared("tiny", "quamba_w8a8")
    for value, mode in [("int8", "int8"), ("fp", "fp"), ("fakequant", "fakequant"), (0, "int8"), (1, "fp"),
                        (2, "fakequant"), ("0", "int8"), ("2", "fakequant"), ("INT8", "int8")]:
        assert set_mode(model, value) is model
        assert current_mode(model) == mode
        assert {t.qmode for t in twins(model)} == {mode}


def test_set_mode_switches_the_numerics():
    model = _prepared("tiny", "quamba_w8a8")
    x = _ids(seed=9)
    outs = {}
    with torch.no_grad():
        for alias in (1, 2, 0):
            set_mode(model, alias)
            outs[alias] = model(x)
    assert not torch.equal(outs[1], outs[2]) and not torch.equal(outs[1], outs[0])


def test_set_mode_errors():
    model = _prepared("tiny", "quamba_w8a8")
    set_mode(model, "fakequant")
    for bad in ("int4", 3, "", "fake"):
        with pytest.raises(ValueError, match="unknown mode"):
            set_mode(model, bad)
    assert current_mode(model) == "fakequant"  # unchanged by the failed calls
    fp_model = _model("tiny")
    for mode in ("int8", 0, "fakequant"):
        with pytest.raises(ValueError, match="prepare"):
            set_mode(fp_model, mode)
    assert set_mode(fp_model, "fp") is fp_model  # fp is always fine


def test_float_parts_are_the_swappable_ones():
    # Guard for the mapping prepare relies on: the parts it knows are the ones the mixers are built from.
    model = _model("tiny-mamba2")
    kinds = {type(m) for m in model.modules()}
    assert {CausalConv1d, SSDScan, RMSNormGated} <= kinds
    assert SelectiveScan in {type(m) for m in _model("tiny").modules()}
    copy.deepcopy(prepare(model, "quamba2_w8a8"))  # twins survive a deepcopy (the Finalize callback does one)
