"""Hadamard-rotated linear inputs (``rotation: hadamard``, Quamba's out_proj treatment) and the teacher-forced
agreement report.

- fp mode is the float layer untouched; calibration observes the rotated input H x;
- fakequant / int8 compute (H x)(W H)^T from the quantized H x and W H; converted weights are the codes of W H;
- on an input with outlier channels the rotation cuts the quantization error of the layer's output;
- a rotation anywhere but a linear input is refused, naming the point;
- agreement_report(forcing="op") isolates ops: a broken op shows on its own output only, while "block" lets the
  difference flow downstream.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qmamba
from qmamba.models import MambaLM
from qmamba.ops import hadamard_transform
from qmamba.qnn import agreement_report, calibrate, convert, prepare, quant_points, set_mode
from qmamba.quant.recipe import QuantSpec, Recipe, load_recipe


def _ids(batch=2, L=24, seed=1):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


def _linear_recipe(rotation, weight=True):
    targets = [("lin.input", QuantSpec(rotation=rotation))] + ([("lin.weight", QuantSpec())] if weight else [])
    return Recipe("r", tuple(targets))


class Net(nn.Module):
    def __init__(self, k=64, n=16):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=True)


def _outlier_batch(seed, k=64):
    x = torch.randn(8, 32, k, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 60.0  # outlier channels, as in Mamba's out_proj input
    x[..., 40] *= -35.0
    return x


def _prepared(rotation, weight=True):
    torch.manual_seed(0)
    net = Net()
    prepare(net, _linear_recipe(rotation, weight))
    return net, net.lin


def _calibrate_linear(net, batches):
    from qmamba.qnn import freeze_scales_, observing

    with torch.no_grad(), observing(net):
        for x in batches:
            net.lin(x)
    freeze_scales_(net)


def test_fp_mode_is_untouched_and_calibration_sees_the_rotated_input():
    net, lin = _prepared("hadamard")
    x = _outlier_batch(1)
    ref = F.linear(x, lin.weight, lin.bias)
    assert torch.equal(lin(x), ref)
    _calibrate_linear(net, [x])
    expected = hadamard_transform(x).abs().max() / 127  # min-max observer on H x, not on x
    torch.testing.assert_close(lin.quant_points["input"].scale, expected, rtol=0, atol=0)
    assert lin.quant_points["input"].scale < x.abs().max() / 127 / 2


def test_fakequant_int8_and_convert_use_rotated_operands():
    net, lin = _prepared("hadamard")
    x = _outlier_batch(2)
    _calibrate_linear(net, [x])
    hx, wh = hadamard_transform(x), hadamard_transform(lin.weight.detach())
    sx = lin.quant_points["input"].scale.detach()
    sw = wh.abs().max() / 127
    q = lambda t, s: torch.clamp(torch.round(t * (1.0 / s)), -128, 127)  # noqa: E731
    with torch.no_grad():
        set_mode(net, "fakequant")
        fq = lin(x)
        torch.testing.assert_close(fq, F.linear(q(hx, sx) * sx, q(wh, sw) * sw, lin.bias), rtol=0, atol=0)
        set_mode(net, "int8")
        i8 = lin(x)
        acc = (q(hx, sx).double() @ q(wh, sw).double().T).float()
        assert torch.equal(i8, acc * (sx * sw) + lin.bias)
        convert(net)
        assert lin.weight.dtype == torch.int8 and torch.equal(lin.weight.float(), q(wh, sw))
        assert torch.equal(lin(x), i8)  # converted == int8 mode before converting
        set_mode(net, "fakequant")
        torch.testing.assert_close(lin(x), fq, rtol=1e-6, atol=1e-5)


def test_rotation_cuts_the_quantization_error_on_outlier_inputs():
    x = _outlier_batch(3)
    errors = {}
    for rotation in (None, "hadamard"):
        net, lin = _prepared(rotation)
        _calibrate_linear(net, [_outlier_batch(4)])
        with torch.no_grad():
            ref = F.linear(x, lin.weight, lin.bias)
            set_mode(net, "int8")
            errors[rotation] = (lin(x) - ref).pow(2).mean().item()
    assert errors["hadamard"] < 0.25 * errors[None], errors


def test_rotated_input_without_a_weight_point_keeps_W_x():
    net, lin = _prepared("hadamard", weight=False)
    x = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(5))
    _calibrate_linear(net, [x])
    with torch.no_grad():
        set_mode(net, "fakequant")
        got = lin(x)
    hx = hadamard_transform(x)
    sx = lin.quant_points["input"].scale
    expected = F.linear(torch.clamp(torch.round(hx * (1.0 / sx)), -128, 127) * sx, hadamard_transform(lin.weight),
                        lin.bias)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("point", ["*.mixer.conv1d.input", "*.mixer.scan.u", "*.mixer.out_proj.weight"])
def test_rotation_only_on_linear_inputs(point):
    base = load_recipe("quamba_w8a8")
    targets = ((point, dataclasses.replace(QuantSpec(), rotation="hadamard")),) + base.targets
    with pytest.raises(ValueError, match="rotation"):
        prepare(MambaLM(qmamba.preset("tiny")), Recipe("bad", targets))


def test_presets_rotate_out_proj_and_every_mode_runs():
    for name, recipe in (("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8"), ("tiny", "qat_w8a8")):
        torch.manual_seed(0)
        model = prepare(MambaLM(qmamba.preset(name)).eval(), recipe)
        assert model.backbone.layers[0].mixer.out_proj.rotated
        assert not model.backbone.layers[0].mixer.in_proj.rotated
        calibrate(model, [_ids(seed=s) for s in (10, 11)], progress=False)
        with torch.no_grad():
            set_mode(model, "fp")
            fp = model(_ids(seed=3))
            set_mode(model, "fakequant")
            fq = model(_ids(seed=3))
        assert (fq - fp).norm() / fp.norm() < 0.05


# ---- teacher forcing in the agreement report --------------------------------------------------------------------
def _tiny_calibrated():
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset("tiny")).eval(), "quamba_w8a8")
    calibrate(model, [_ids(seed=s) for s in (10, 11, 12)], progress=False)
    return model


def test_op_forcing_confines_a_broken_op_to_its_own_output():
    model = _tiny_calibrated()
    conv = model.backbone.layers[0].mixer.conv1d
    model.backbone.layers[0].mixer.in_proj.emit_codes = False  # the conv gets in_proj's float output, to scale
    # an int8 path that feeds conv1d a scaled input: conv1d.input's codes differ a lot between the modes
    conv.register_forward_pre_hook(lambda m, args: (args[0] * 1.5,) if m.qmode == "int8" else None)
    op = {r.point: r for r in agreement_report(model, _ids(seed=7), forcing="op")}
    block = {r.point: r for r in agreement_report(model, _ids(seed=7), forcing="block")}
    bad = "backbone.layers.0.mixer.conv1d.input"
    assert op[bad].max_lsb > 1 and block[bad].max_lsb > 1
    downstream = "backbone.layers.0.mixer.scan.u"  # conv1d's output
    assert op[downstream].meets_contract  # each op ran on the int8 run's inputs
    assert not block[downstream].meets_contract  # the broken conv input flowed into it
    assert all(r.meets_contract for n, r in op.items() if n != bad)
    assert not any(p.forced is not None or p.recording for p in quant_points(model))


def test_bad_forcing_name():
    with pytest.raises(ValueError, match="forcing"):
        agreement_report(_tiny_calibrated(), _ids(), forcing="layer")
