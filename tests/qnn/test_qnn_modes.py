"""The three modes inside the model, against references written out by hand here (not via qmamba.quant.numerics):

- fakequant linear == F.linear(dq(q(x)), dq(q(w))) + bias                          exact (torch.equal)
- int8 linear == int64 matmul of the codes * (s_x * s_w) + bias                    exact (torch.equal)
- int8 conv1d == int64 loop over taps * (s_x * s_w) + bias, then SiLU               exact (torch.equal)
- scan / norm twins: int8 == fakequant == float part on hand-quantized inputs        exact (torch.equal)
- whole model: agreement report meets the contract (>= 99.9 % identical codes, <= 1 LSB) on every activation point;
  int8 vs fakequant logits within 1e-3 relative (L2), both at least 10x further from fp than from each other
- STE: gradients reach weights and learnable scales, finite; zero outside the clamp range
- convert: int8 weights, same keys, bit-identical to int8 mode before converting.

Here q(x) = clamp(round_half_even(x * (1 / s)), -128, 127) and dq(q) = q * s, both in fp32 (DESIGN §3).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qmamba
from qmamba.models import MambaLM
from qmamba.models.parts import RMSNormGated, SelectiveScan, SSDScan
from qmamba.qnn.codes import Codes
from qmamba.qnn import (QuantCausalConv1d, QuantLinear, agreement_report, calibrate, convert, current_mode,
                        format_agreement, is_converted, prepare, quant_points, set_mode, twins)

CASES = [("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8"), ("tiny", "qat_w8a8"), ("tiny-mamba2", "qat_w8a8")]


def _ids(batch=2, L=24, seed=1):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


def _calibrated(name, recipe):
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset(name)).eval(), recipe)
    calibrate(model, [_ids(seed=s) for s in (10, 11, 12)], progress=False)
    return model


# ---- hand-written numerics (the contract, independent of the library) ---------------------------------------------
def hq(x, s):
    """Codes as exact float values."""
    return torch.clamp(torch.round(x.float() * (1.0 / s.float())), -128, 127)


def hfq(x, s):
    return hq(x, s) * s.float()


def weight_scale(w, spec):
    """Absmax weight scale at the spec's granularity, shaped to broadcast against w."""
    if type(spec.granularity).__name__ == "PerTensor":
        return w.detach().abs().max().float().clamp_min(1e-8) / 127
    assert spec.granularity.axis == 0
    s = w.detach().abs().reshape(w.shape[0], -1).amax(1).float().clamp_min(1e-8) / 127
    return s.reshape((-1,) + (1,) * (w.dim() - 1))


def act_scale(point, ndim):
    return point.spec.granularity.broadcast(point.scale.detach(), ndim)


def rot(lin, t):
    """A rotated linear's operands in the rotated frame (the rotation itself is checked in tests/ops)."""
    return qmamba.ops.hadamard_transform(t) if lin.rotated else t


class Capture:
    """The positional inputs and the output of every call of a module."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.calls.append((args, out)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


# ---- linear / conv in situ -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, recipe", CASES)
def test_fakequant_linear_is_linear_of_fake_quantized_operands(name, recipe):
    model = _calibrated(name, recipe)
    set_mode(model, "fakequant")
    linears = _linears(model)
    caps = [Capture(m) for _, m in linears]
    with torch.no_grad():
        model(_ids(seed=3))
    for (lname, lin), cap in zip(linears, caps):
        cap.handle.remove()
        (x,), out = cap.calls[0]
        sx = act_scale(lin.quant_points["input"], x.dim())
        w = rot(lin, lin.weight)
        sw = weight_scale(w, lin.quant_points["weight"].spec)
        expected = F.linear(hfq(rot(lin, x), sx), hfq(w, sw), lin.bias)
        assert torch.equal(out, expected), lname
        assert not torch.equal(out, F.linear(x, lin.weight, lin.bias)), lname  # quantization did something


def _float_handoffs(model):
    """Producers hand their consumers float outputs (``emit_codes`` off): these tests take each part's int8 math from
    a float input; the codes hand-offs (bit for bit the same) are tested in test_qnn_codes.py."""
    for m in model.modules():
        if hasattr(m, "emit_codes"):
            m.emit_codes = False


@pytest.mark.parametrize("name, recipe", CASES)
def test_int8_linear_is_integer_matmul_times_scales(name, recipe):
    model = _calibrated(name, recipe)
    set_mode(model, "int8")
    linears = _linears(model)
    _float_handoffs(model)
    caps = [Capture(m) for _, m in linears]
    with torch.no_grad():
        model(_ids(seed=4))
    has_bias = False
    for (lname, lin), cap in zip(linears, caps):
        cap.handle.remove()
        (x,), out = cap.calls[0]
        w = rot(lin, lin.weight)
        sx = lin.quant_points["input"].scale.detach().float().reshape(())
        sw = weight_scale(w, lin.quant_points["weight"].spec).reshape(-1)
        if sw.numel() == 1:
            sw = sw.reshape(())
        if isinstance(x, Codes):  # x_proj: the conv handed it the codes of its input (qmamba.qnn.codes)
            assert torch.equal(x.scale.reshape(()), sx)
            qx = x.q.long()
        else:
            qx = hq(rot(lin, x), sx).long()
        qw = hq(w, weight_scale(w, lin.quant_points["weight"].spec)).long()
        acc = (qx.unsqueeze(-2) * qw).sum(-1)  # (..., N) int64, exact
        assert acc.abs().max() < 2 ** 24  # so acc.float() is exact too
        expected = acc.float() * (sx * sw)
        if lin.bias is not None:
            has_bias = True
            expected = expected + lin.bias.float()
        assert out.dtype == torch.float32
        assert torch.equal(out, expected), lname
    if name == "tiny":
        assert has_bias  # dt_proj: the bias path was exercised


@pytest.mark.parametrize("name, recipe", CASES)
def test_int8_conv1d_is_an_integer_loop(name, recipe):
    model = _calibrated(name, recipe)
    set_mode(model, "int8")
    _float_handoffs(model)
    convs = [m for m in model.modules() if isinstance(m, QuantCausalConv1d)]
    caps = [Capture(m) for m in convs]
    with torch.no_grad():
        model(_ids(seed=5))
    for conv, cap in zip(convs, caps):
        cap.handle.remove()
        (x,), out = cap.calls[0]  # (B, C, L)
        if isinstance(out, list):  # Mamba1: the codes the conv hands x_proj and the scan; here, the float output
            with torch.no_grad():
                out = conv(x)
        sx = conv.quant_points["input"].scale.detach().float().reshape(())
        sw4 = weight_scale(conv.weight, conv.quant_points["weight"].spec)
        qx = hq(x, sx).long()
        qw = hq(conv.weight, sw4).long().reshape(conv.weight.shape[0], -1)  # (C, k)
        C, k = qw.shape
        L = x.shape[-1]
        acc = torch.zeros(x.shape, dtype=torch.int64)
        for t in range(L):  # y[t] = sum_i w[i] * x[t - (k - 1) + i], causal (x[<0] = 0)
            for i in range(k):
                src = t - (k - 1) + i
                if src >= 0:
                    acc[:, :, t] += qw[:, i] * qx[:, :, src]
        sw = sw4.reshape(-1, 1) if sw4.numel() > 1 else sw4.reshape(())
        pre = acc.float() * (sx * sw) + conv.bias.float()[:, None]
        assert torch.equal(out, F.silu(pre))


@pytest.mark.parametrize("name, recipe", [("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8")])
def test_scan_and_norm_twins_int8_equals_fakequant_equals_hand(name, recipe):
    model = _calibrated(name, recipe)
    mixer = model.backbone.layers[1].mixer
    parts = [(mixer.scan, SelectiveScan if name == "tiny" else SSDScan)]
    if name == "tiny-mamba2":
        parts.append((mixer.norm, RMSNormGated))
    caps = [Capture(p) for p, _ in parts]
    with torch.no_grad():
        model(_ids(seed=6))  # fp: capture the float inputs
    for (part, float_cls), cap in zip(parts, caps):
        cap.handle.remove()
        (args, fp_out), = cap.calls
        outs, codes = {}, {}
        for mode in ("fakequant", "int8"):
            part.qmode = mode
            for p in part.quant_points.values():
                p.recording = True
            with torch.no_grad():
                outs[mode] = part(*args)
            codes[mode] = {k: p.recorded for k, p in part.quant_points.items()}
            for p in part.quant_points.values():
                p.recording, p.recorded = False, None
        part.qmode = "fp"
        assert torch.equal(outs["int8"], outs["fakequant"])
        for k in codes["int8"]:
            assert codes["int8"][k].dtype == torch.int8
            assert torch.equal(codes["int8"][k], codes["fakequant"][k]), k
        # by hand: the float part on hand-fake-quantized inputs (only the recipe's inputs; A_log, D, dt_bias fp32)
        names = {SelectiveScan: ("u", "delta", None, "B", "C", None, "z"),
                 SSDScan: ("x", "dt", None, "B", "C", None, None),
                 RMSNormGated: (None, "z")}[float_cls]
        hand_args = []
        for arg, point in zip(args, names):
            if point is None:
                hand_args.append(arg)
            else:
                qp = part.quant_points[point]
                hand_args.append(hfq(arg, act_scale(qp, arg.dim())).to(arg.dtype))
                assert torch.equal(codes["int8"][point].long(), hq(arg, act_scale(qp, arg.dim())).long()), point
        with torch.no_grad():
            assert torch.equal(outs["int8"], float_cls.forward(part, *hand_args))
        assert not torch.equal(outs["int8"], fp_out)


def test_mamba2_scales_are_per_head_and_per_group():
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset("tiny-mamba2")).eval(), "quamba2_w8a8")
    cfg = model.config
    scan = model.backbone.layers[0].mixer.scan
    with Capture(scan) as cap:
        calibrate(model, [_ids(seed=s) for s in (10, 11, 12)], progress=False)
    assert scan.quant_points["x"].scale.shape == (cfg.nheads,)
    assert scan.quant_points["B"].scale.shape == (cfg.ngroups,)
    assert scan.quant_points["C"].scale.shape == (cfg.ngroups,)
    assert scan.quant_points["dt"].scale.shape == ()
    # B / C (min-max): one scale per SSD group = that group's absmax over all calibration batches / 127
    for point, index in (("B", 3), ("C", 4)):
        seen = torch.cat([args[index] for args, _ in cap.calls])  # (N, L, G, n)
        expected = seen.abs().amax(dim=(0, 1, 3)).clamp_min(1e-8) / 127
        assert torch.equal(scan.quant_points[point].scale, expected), point
    # x (percentile): per head, never above that head's absmax
    x = torch.cat([args[0] for args, _ in cap.calls])  # (N, L, H, P)
    assert (scan.quant_points["x"].scale <= x.abs().amax(dim=(0, 1, 3)) / 127 * (1 + 1e-6)).all()
    assert cfg.nheads > 1


# ---- whole model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, recipe", CASES)
def test_agreement_report_meets_the_contract_on_every_point(name, recipe):
    model = _calibrated(name, recipe)
    set_mode(model, "fakequant")
    rows = agreement_report(model, _ids(seed=21))
    assert current_mode(model) == "fakequant"  # restored
    act_points = [p.name for p in quant_points(model) if not p.is_weight]
    assert sorted(r.point for r in rows) == sorted(act_points)
    for r in rows:
        assert r.elements > 0
        assert r.meets_contract, format_agreement(rows)
        assert r.identical >= 0.999 and r.max_lsb <= 1
    assert not any(p.recording or p.recorded is not None for p in quant_points(model))
    text = format_agreement(rows)
    assert all(r.point in text for r in rows) and "breaks the contract" not in text


def test_agreement_report_flags_a_broken_point():
    model = _calibrated("tiny", "quamba_w8a8")
    rows = agreement_report(model, _ids())
    assert all(r.meets_contract for r in rows)
    lin = model.backbone.layers[0].mixer.out_proj
    point = lin.quant_points["input"]
    lin_forward = lin.forward

    def two_lsb_off(x):  # an int8 path whose codes are 2 LSB off: the report must say so, naming the point
        out = lin_forward(x)
        if lin.qmode == "int8":
            point.recorded = (point.recorded.to(torch.int16) + 2).clamp(-128, 127).to(torch.int8)
        return out

    lin.forward = two_lsb_off
    rows = {r.point: r for r in agreement_report(model, _ids())}
    bad = rows[point.name]
    assert not bad.meets_contract and bad.max_lsb == 2
    assert all(r.meets_contract for n, r in rows.items() if n != point.name)
    assert f"{point.name}" in format_agreement(list(rows.values()))
    assert "breaks the contract" in format_agreement(list(rows.values()))


@pytest.mark.parametrize("name, recipe", CASES)
def test_logits_int8_close_to_fakequant_and_both_differ_from_fp(name, recipe):
    model = _calibrated(name, recipe)
    x = _ids(batch=3, L=32, seed=22)
    out = {}
    with torch.no_grad():
        for mode in ("fp", "fakequant", "int8"):
            set_mode(model, mode)
            out[mode] = model(x)
            assert torch.isfinite(out[mode]).all()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(out["int8"], out["fakequant"]) < 1e-3
    gap = rel(out["fakequant"], out["fp"])
    assert gap > 1e-4  # quantization does something
    assert rel(out["int8"], out["fp"]) > 1e-4
    assert gap > 10 * rel(out["int8"], out["fakequant"])


@pytest.mark.parametrize("name", ["tiny", "tiny-mamba2"])
def test_ste_gradients_reach_weights_and_learnable_scales(name):
    model = _calibrated(name, "qat_w8a8")
    model.train()
    set_mode(model, "fakequant")
    x = _ids(batch=2, L=16, seed=30)
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    scales = [p for p in quant_points(model) if isinstance(p.scale, nn.Parameter)]
    assert len(scales) == sum(not p.is_weight for p in quant_points(model)) > 0
    for p in scales:
        assert p.scale.grad is not None, p.name
        assert torch.isfinite(p.scale.grad).all(), p.name
    assert sum(bool((p.scale.grad != 0).any()) for p in scales) >= 0.9 * len(scales)
    for twin in twins(model):
        if "weight" in twin.quant_points:
            g = twin.weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the same backward in fp mode leaves the scales without gradient
    model.zero_grad(set_to_none=True)
    set_mode(model, "fp")
    model(x).sum().backward()
    assert all(p.scale.grad is None for p in scales)


def test_ste_zero_gradient_outside_the_clamp_range():
    model = _calibrated("tiny", "quamba_w8a8")
    set_mode(model, "fakequant")
    lin = model.backbone.layers[0].mixer.in_proj
    sx = lin.quant_points["input"].scale.detach()
    x = torch.randn(2, 5, lin.in_features) * sx * 60
    # outside the clamp range [-128, 127] (in units of the scale): 200, -200, 127.4, -128.4; inside: 126.6, -127.9
    x[0, 0, :6] = sx * torch.tensor([200.0, -200.0, 127.4, -128.4, 126.6, -127.9])
    x.requires_grad_(True)
    g = torch.randn(2, 5, lin.out_features)
    lin(x).backward(g)
    w_fq = hfq(lin.weight.detach(), weight_scale(lin.weight, lin.quant_points["weight"].spec))
    v = x.detach() * (1.0 / sx)
    inside = (v >= -128) & (v <= 127)
    assert not inside[0, 0, :4].any() and inside[0, 0, 4:6].all()
    expected = torch.where(inside, g @ w_fq, torch.zeros(()))
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
    assert (x.grad[0, 0, :4] == 0).all() and (x.grad[0, 0, 4:6] != 0).all()


# ---- convert -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, recipe", CASES)
def test_convert_stores_int8_weights_and_matches_int8_mode(name, recipe):
    model = _calibrated(name, recipe)
    x = _ids(seed=40)
    with torch.no_grad():
        set_mode(model, "int8")
        before_int8 = model(x)
        set_mode(model, "fakequant")
        before_fq = model(x)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    float_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert convert(model) is model
    assert is_converted(model) and current_mode(model) == "int8"
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    quantized = set()
    for tname, twin in model.named_modules():
        if isinstance(twin, (QuantLinear, QuantCausalConv1d)) and "weight" in twin.quant_points:
            assert isinstance(twin.weight, nn.Parameter) and twin.weight.dtype == torch.int8, tname
            assert not twin.weight.requires_grad
            qp = twin.quant_points["weight"]
            assert bool(qp.ready)
            w = rot(twin, float_before[f"{tname}.weight"]) if isinstance(twin, QuantLinear) else \
                float_before[f"{tname}.weight"]  # a rotated linear stores the codes of W H
            sw = weight_scale(w, qp.spec)
            assert torch.equal(twin.weight.long(), hq(w, sw).long()), tname
            quantized.add(f"{tname}.weight")
    assert quantized
    for n, p in model.named_parameters():  # everything else keeps its float values
        if n not in quantized:
            assert p.dtype == torch.float32 and torch.equal(p, float_before[n]), n
    with torch.no_grad():
        assert torch.equal(model(x), before_int8)
        set_mode(model, "fakequant")  # fakequant from the dequantized int8 weights
        assert torch.equal(model(x), before_fq)
        set_mode(model, "int8")
        convert(model)  # again: nothing changes
        assert torch.equal(model(x), before_int8)


def test_converted_model_refuses_fp():
    model = convert(_calibrated("tiny", "quamba_w8a8"))
    set_mode(model, "fp")
    with pytest.raises(RuntimeError, match="int8 weights") as e:
        with torch.no_grad():
            model(_ids())
    assert "int8 mode" in str(e.value) and "backbone.layers.0.mixer" in str(e.value)


def test_convert_needs_calibration():
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset("tiny")), "quamba_w8a8")
    with pytest.raises(ValueError, match="calibrat"):
        convert(model)
    assert not is_converted(model)
    with pytest.raises(ValueError, match="calibrat"):
        convert(MambaLM(qmamba.preset("tiny")))
