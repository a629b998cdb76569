"""Dual-scale int8 (qmamba.quant.dual_scale) against a numpy definition written out here, the recipe field, and the
observer. Everything is exact (np.array_equal / torch.equal): the ops are fp32 arithmetic in a fixed order."""

import numpy as np
import pytest
import torch

from qmamba.quant.dual_scale import (dual_dequantize, dual_fake_quantize, dual_quantize, outlier_share, pack_mask,
                                     unpack_mask)
from qmamba.quant.numerics import dequantize, fake_quantize, quantize
from qmamba.quant.observers import DualScaleObserver, PercentileObserver
from qmamba.quant.recipe import DualScaleSpec, ObserverSpec, QuantSpec, Recipe, load_recipe

f32 = np.float32


def np_mask(x, s_in, s_out):
    x = x.astype(f32)
    r = np.rint(x * (f32(1) / f32(s_in)))
    flag = np.abs(r) > 127
    qo = np.clip(np.rint(x * (f32(1) / f32(s_out))), -128, 127)
    q = np.where(flag, qo, r).astype(np.int8)
    val = q.astype(f32) * np.where(flag, f32(s_out), f32(s_in)).astype(f32)
    return q, flag, val


def np_piecewise(x, s_in, s_out, K):
    x = x.astype(f32)
    s_in, s_out = f32(s_in), f32(s_out)
    r = np.rint(x * (f32(1) / s_in))
    knee = f32(K) * s_in
    v = np.abs(x)
    t = np.rint((v - knee) * (f32(1) / s_out))
    top = np.where(x >= 0, 127, 128)
    o = np.minimum(np.maximum(K + t, K), top)
    q = np.where(np.abs(r) <= K, r, np.where(x >= 0, o, -o)).astype(np.int8)
    a = np.abs(q.astype(np.int16)).astype(f32)
    outer = (knee + (a - f32(K)) * s_out).astype(f32)
    val = np.where(a > K, np.where(q < 0, -outer, outer), q.astype(f32) * s_in).astype(f32)
    return q, val


def _x(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n // 4, generator=g)
    x.view(-1)[::97] *= 25  # rare large outliers
    return x


def test_mask_matches_numpy_definition():
    x, s_in, s_out = _x(), 0.02, 0.9
    q, mask = dual_quantize(x, torch.tensor(s_in), torch.tensor(s_out), "mask")
    nq, nflag, nval = np_mask(x.numpy(), s_in, s_out)
    assert np.array_equal(q.numpy(), nq)
    assert np.array_equal(unpack_mask(mask, x.shape[-1]).numpy(), nflag)
    assert 0 < nflag.mean() < 0.5  # both kinds present: the test can fail
    val = dual_dequantize(q, mask, torch.tensor(s_in), torch.tensor(s_out), "mask")
    assert np.array_equal(val.numpy(), nval)
    assert torch.equal(dual_fake_quantize(x, torch.tensor(s_in), torch.tensor(s_out), "mask"), val)


@pytest.mark.parametrize("K", [112, 96])
def test_piecewise_matches_numpy_definition(K):
    x, s_in, s_out = _x(seed=1), 0.02, 0.3
    q, mask = dual_quantize(x, torch.tensor(s_in), torch.tensor(s_out), "piecewise", K)
    assert mask is None
    nq, nval = np_piecewise(x.numpy(), s_in, s_out, K)
    assert np.array_equal(q.numpy(), nq)
    assert (np.abs(nq.astype(int)) > K).any() and (nq == 127).any() and (nq == -128).any()  # clamped ends reached
    val = dual_dequantize(q, None, torch.tensor(s_in), torch.tensor(s_out), "piecewise", K)
    assert np.array_equal(val.numpy(), nval)
    assert torch.equal(dual_fake_quantize(x, torch.tensor(s_in), torch.tensor(s_out), "piecewise", K), val)


def test_piecewise_is_monotone_and_continuous_at_the_knee():
    s_in, s_out, K = torch.tensor(0.01), torch.tensor(0.05), 112
    x = torch.linspace(-8, 8, 20001)
    y = dual_fake_quantize(x, s_in, s_out, "piecewise", K)
    assert bool((y[1:] >= y[:-1]).all())
    q, _ = dual_quantize(x, s_in, s_out, "piecewise", K)
    assert set(torch.unique(q.abs().to(torch.int16)).tolist()) >= set(range(0, 128))  # every code used


def test_mask_control_equals_single_scale_bit_for_bit():
    x = _x(seed=2) * 3
    for s in (torch.tensor(0.013), torch.tensor([0.01, 0.02, 0.05, 0.5]).reshape(4, 1)):  # per-tensor, per-row
        q, mask = dual_quantize(x, s, s, "mask")
        assert torch.equal(q, quantize(x, s))
        assert bool(unpack_mask(mask, x.shape[-1]).any())  # saturating elements took the outlier branch
        assert torch.equal(dual_dequantize(q, mask, s, s, "mask"), dequantize(quantize(x, s), s))


def test_mask_control_gradient_equals_single_scale():
    """With s_in == s_out the STE passes exactly where fake_quantize's does: codes in [-128, 127] before rint (an
    inlier at 127 < x / s <= 127.5 rounds to 127 but gets no gradient, in both)."""
    s = torch.tensor(0.01)
    v = torch.tensor([0.0, 126.9, 127.0, 127.3, 127.5, 127.7, -127.7, -128.0, -128.3, -128.6, 300.0, -300.0])
    grads = []
    for fn in (lambda x: fake_quantize(x, s), lambda x: dual_fake_quantize(x, s, s, "mask")):
        x = (v * s).requires_grad_(True)
        fn(x).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]), (grads[0].tolist(), grads[1].tolist())
    assert grads[1][3] == 0 and grads[1][1] == 1  # 127.3 * s: rounds to 127, beyond the range


def test_per_head_scales_broadcast():
    x = torch.randn(2, 5, 3, 8) * 4  # (B, L, H, P), one scale pair per head as Mamba2's x
    s_in, s_out = torch.tensor([0.01, 0.02, 0.03]).reshape(3, 1), torch.tensor([0.1, 0.2, 0.3]).reshape(3, 1)
    q, mask = dual_quantize(x, s_in, s_out, "mask")
    for h in range(3):
        qh, mh = dual_quantize(x[:, :, h], s_in[h], s_out[h], "mask")
        assert torch.equal(q[:, :, h], qh) and torch.equal(unpack_mask(mask, 8)[:, :, h], unpack_mask(mh, 8))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 33])
def test_mask_packing_round_trip_and_layout(n):
    flags = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_mask(flags)
    assert packed.dtype == torch.uint8 and packed.shape == (3, (n + 7) // 8)
    assert torch.equal(unpack_mask(packed, n), flags)
    # element 8i + j is bit j of byte i
    manual = sum(int(flags[0, j]) << j for j in range(min(n, 8)))
    assert int(packed[0, 0]) == manual


@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
def test_ste_gradient(encoding):
    s_in, s_out = torch.tensor(0.01), torch.tensor(0.02)
    # mask: outer range [-128, 127] * s_out; piecewise: up to K*s_in + 15*s_out (+), K*s_in + 16*s_out (-)
    hi = 127 * 0.02 if encoding == "mask" else 112 * 0.01 + 15 * 0.02
    x = torch.tensor([0.3, -0.5, 1.2, hi * 0.99, hi * 1.5, -hi * 2, 0.0], requires_grad=True)
    dual_fake_quantize(x, s_in, s_out, encoding).sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 0, 0, 1]


def test_outlier_share():
    x = torch.tensor([0.0, 1.0, 1.27, 1.3, -2.0, 0.5, 0.2, 0.1])
    assert outlier_share(x, torch.tensor(0.01)) == 2 / 8  # |x| / 0.01 > 127.5
    assert outlier_share(x, torch.tensor(0.01), "piecewise", 100) == 3 / 8  # rint > 100 (1.0 -> 100 is an inlier)


def test_errors():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="encoding"):
        dual_quantize(x, 0.1, 0.2, "sparse")
    with pytest.raises(ValueError, match="knee"):
        dual_quantize(x, 0.1, 0.2, "piecewise", 127)
    with pytest.raises(ValueError, match="> 0"):
        dual_quantize(x, 0.1, 0.0)
    q, _ = dual_quantize(x, 0.1, 0.2)
    with pytest.raises(ValueError, match="flags"):
        dual_dequantize(q, None, 0.1, 0.2, "mask")


# ---- recipe ------------------------------------------------------------------------------------------------------
def test_recipe_yaml_round_trip():
    spec = QuantSpec(observer=ObserverSpec("percentile", 0.9999),
                     dual_scale=DualScaleSpec("piecewise", 0.995, "percentile", 0.99999, 100))
    r = Recipe("t", (("*.mixer.scan.u", spec), ("*.mixer.in_proj.input", QuantSpec())))
    d = r.to_dict()
    assert "dual_scale" not in d["targets"]["*.mixer.in_proj.input"]  # absent: recipes without it are unchanged
    import yaml

    back = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert back == r and back.spec_for("a.mixer.scan.u").dual_scale.knee == 100
    assert QuantSpec.from_dict({"dual_scale": None}) == QuantSpec()


@pytest.mark.parametrize("data, match", [
    ({"dual_scale": {"encoding": "sparse"}}, "encoding"),
    ({"dual_scale": {"threshold_alpha": 1.0}}, "threshold_alpha"),
    ({"dual_scale": {"outlier": "percentile", "threshold_alpha": 0.999, "outlier_alpha": 0.99}}, "outlier_alpha"),
    ({"dual_scale": {"outlier": "max"}}, "outlier"),
    ({"dual_scale": {"knee": 127}}, "knee"),
    ({"dual_scale": {"equal_scales": True, "encoding": "piecewise"}}, "equal_scales"),
    ({"dual_scale": {"treshold": 0.9}}, "unknown dual_scale field"),
    ({"dual_scale": {}, "bits": 4}, "bits"),
    ({"dual_scale": {}, "learnable_scale": True}, "learnable_scale"),
    ({"dual_scale": {}, "rotation": "hadamard"}, "rotation"),
])
def test_recipe_errors(data, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec.from_dict(data)


def test_recipe_files_parse():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "configs" / "recipes"
    files = sorted(folder.glob("*.yaml"))
    assert {f.name for f in files} >= {f"dual_scale_{g}_mamba{m}.yaml" for g in ("baseline", "control", "treatment")
                                       for m in (1, 2)}
    for f in files:
        load_recipe(str(f))
    # the baselines are the presets written out
    for m, preset, point in ((1, "quamba_w8a8", "scan.u"), (2, "quamba2_w8a8", "scan.x")):
        base, ref = load_recipe(str(folder / f"dual_scale_baseline_mamba{m}.yaml")), load_recipe(preset)
        names = [f"backbone.layers.0.mixer.{p}" for p in ("in_proj.input", "in_proj.weight", "conv1d.input",
                 "conv1d.weight", "x_proj.input", "x_proj.weight", "dt_proj.input", "dt_proj.weight", "scan.u",
                 "scan.delta", "scan.B", "scan.C", "scan.z", "scan.x", "scan.dt", "norm.z", "out_proj.input",
                 "out_proj.weight")] + ["lm_head.weight", "backbone.embedding.weight"]
        for n in names:
            if m == 2 and any(k in n for k in ("x_proj", "dt_proj")):
                continue  # no such parts in Mamba2
            assert base.spec_for(n) == ref.spec_for(n), n
        control = load_recipe(str(folder / f"dual_scale_control_mamba{m}.yaml"))
        treat = load_recipe(str(folder / f"dual_scale_treatment_mamba{m}.yaml"))
        p = f"backbone.layers.0.mixer.{point}"
        assert control.spec_for(p).dual_scale.equal_scales and not treat.spec_for(p).dual_scale.equal_scales
        assert control.spec_for(p).observer == base.spec_for(p).observer  # the control's scale = the baseline's


# ---- observer ----------------------------------------------------------------------------------------------------
def test_dual_scale_observer_scales():
    x = _x(seed=3)
    obs_spec = ObserverSpec("percentile", 0.9999)
    base = PercentileObserver(alpha=0.9999)
    thr = PercentileObserver(alpha=0.999)
    base(x), thr(x)
    mk = lambda ds: DualScaleObserver(baseline_kind="percentile", baseline_kwargs=obs_spec.kwargs(), dual_scale=ds)
    o = mk(DualScaleSpec("mask"))
    o(x)
    s_in, s_out = o.dual_scales()
    assert torch.equal(s_in, thr.absmax() / 127) and torch.equal(s_out, x.abs().max() / 127)
    o = mk(DualScaleSpec("piecewise", knee=100))
    o(x)
    s_in, s_out = o.dual_scales()
    assert torch.equal(s_in, thr.absmax() / 100) and torch.equal(s_out, (x.abs().max() - thr.absmax()) / 27)
    o = mk(DualScaleSpec("mask", equal_scales=True))
    o(x)
    s_in, s_out = o.dual_scales()
    assert torch.equal(s_in, base.scale()) and torch.equal(s_out, base.scale())
    assert {k.split(".")[0] for k in o.state_dict()} == {"num_batches", "baseline", "threshold", "outlier"}
    o.reset_()
    with pytest.raises(RuntimeError, match="no data"):
        o.dual_scales()
