"""benchmarks/host_ops.py on CPU: the host work the fused fake-quant path adds to a training step, counted with its
Triton launches dry (see that file). A regression guard on counts, not times: before the absmax-in-kernel weights,
strided inputs and the leaner LSQ backward, the QAT step of these models added ~37 aten ops per quantization point;
now under 10."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import host_ops  # noqa: E402


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-mamba2"])
def test_fakequant_step_adds_few_host_ops(preset_name):
    r = host_ops.count(preset_name, "qat_w8a8", device="cpu")
    assert r["dry"] and r["points"] > 0
    added = sum(r["fakequant"].values()) - sum(r["fp"].values())
    assert 0 < added <= 12 * r["points"], (added, r["points"])
    # one launch forward and one backward a point (a weight's scale made in its kernel), plus the Hadamard
    # rotations of out_proj's input and weight, each way
    launches = r["launches"]
    assert launches["_absmax_fake_quant_fwd_kernel"] > 0
    assert sum(launches.values()) <= 2 * r["points"] + launches["_fwht_kernel"]
    # no contiguous copy of an activation before its fake-quant: the kernels read it where it lies
    assert r["fakequant"]["aten::clone"] - r["fp"].get("aten::clone", 0) <= 2


def test_dry_path_restores_everything():
    import collections

    import qmamba.kernels.triton.fake_quant as tfq
    import qmamba.ops.backend as backend
    from qmamba.quant import numerics

    before = (backend.use_triton, numerics._cheap_check, tfq._fake_quant_fwd_kernel)
    with host_ops.dry_fused_path(collections.Counter()):
        assert backend.use_triton is not before[0]
    assert (backend.use_triton, numerics._cheap_check, tfq._fake_quant_fwd_kernel) == before


@pytest.mark.parametrize("preset_name, recipe, prefill_kernels, step_kernels",
                         [("tiny", "quamba_w8a8", 8, 6), ("tiny-mamba2", "quamba2_w8a8", 9, 6)])
def test_int8_prefill_and_step_kernels_a_layer(preset_name, recipe, prefill_kernels, step_kernels):
    """The int8 model's host side with qmamba's kernels dry: no op reads a tensor on the host, and the kernels a
    layer launches (Mamba1: pre-norm, 4 linears, conv, scan, out_proj's rotation; no separate quantize: each
    producer emits its consumers' codes; a decode step two fewer: dt_proj fused into the scan's update, the conv's
    update into in_proj's GEMV (out_proj's rotation in the scan's update, ``emit_rotated``, one more, is off by
    default: ``test_int8_step_with_the_rotation_in_the_scan_update``); Mamba2: the SSD kernels quantizing the conv's
    float x / B / C as they load them, and the gated norm reading z's codes and making out_proj's rotated input codes, out_proj's rotation gone). Only the
    final norm is mamba_ssm's."""
    r = host_ops.int8_count(preset_name, recipe, prompt=64, device="cpu")
    assert r["dry"]
    n = r["layers"]
    for what, expected in (("prefill", prefill_kernels), ("step", step_kernels)):
        assert not any(r[what].get(k, 0) for k in host_ops.SYNC_OPS), what
        launches = r[f"{what}_launches"]
        ours = sum(v for k, v in launches.items() if not k.startswith("mamba_ssm"))  # the float norms: mamba_ssm's
        assert ours == expected * n, (what, dict(launches))
        assert sum(launches.values()) - ours == 1, dict(launches)  # norm_f
    if preset_name == "tiny":
        assert "quantize_int8" not in r["prefill_launches"] and "quantize_int8" not in r["step_launches"]


def test_int8_step_with_the_rotation_in_the_scan_update(monkeypatch):
    """Mamba1 with ``emit_rotated`` on: 5 kernels a decode step a layer, no Hadamard kernel in the step."""
    from qmamba.qnn.modules import QuantSelectiveScan

    monkeypatch.setattr(QuantSelectiveScan, "emit_rotated", True)
    r = host_ops.int8_count("tiny", "quamba_w8a8", prompt=64, device="cpu")
    launches = r["step_launches"]
    assert sum(v for k, v in launches.items() if not k.startswith("mamba_ssm")) == 5 * r["layers"], dict(launches)
    assert "hadamard_quantize" not in launches and "hadamard_quantize" in r["prefill_launches"]


def test_dry_int8_kernels_restore_everything():
    """Everything patched is restored, also in a module first imported inside the dry run (a lazy import binds the
    stand-in by name)."""
    import collections
    import importlib
    import sys

    import torch

    import qmamba.kernels.linear as klinear
    import qmamba.ops.backend as backend
    import qmamba.ops.int8_linear as olinear
    from qmamba.kernels.stand_ins import import_wrappers

    before = (olinear.use_kernels, klinear.require_cuda)
    import_wrappers()
    saved = sys.modules["qmamba.ops.int8_norm"]
    try:
        with host_ops.dry_int8_kernels(collections.Counter()):
            assert olinear.use_kernels is not before[0] and "w8a8_gemv" in torch.ops.qmamba.__dict__
            del sys.modules["qmamba.ops.int8_norm"]
            fresh = importlib.import_module("qmamba.ops.int8_norm")  # imported while patched: binds the stand-in
            assert fresh.use_kernels is backend.use_kernels is not before[0]
        assert fresh.use_kernels is backend.use_kernels is before[0]
    finally:
        sys.modules["qmamba.ops.int8_norm"] = saved
    assert (olinear.use_kernels, klinear.require_cuda) == before
    assert "w8a8_gemv" not in torch.ops.qmamba.__dict__


RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"


@pytest.mark.parametrize("preset_name, recipe", [
    ("tiny", "dual_scale_treatment_mamba1.yaml"), ("tiny", "dual_scale_treatment_piecewise_mamba1.yaml"),
    ("tiny", "dual_scale_control_mamba1.yaml"), ("tiny", "quamba_w8a8_no_rotation.yaml"),
    ("tiny", "quamba_w8a8_per_channel_weights.yaml"), ("tiny-mamba2", "dual_scale_treatment_mamba2.yaml"),
    ("tiny-mamba2", "dual_scale_treatment_piecewise_mamba2.yaml"), ("tiny-mamba2", "quamba2_w8a8_no_rotation.yaml")])
def test_int8_recipes_call_the_kernels_as_they_are_declared(preset_name, recipe):
    """Every recipe's int8 prefill and decode step, kernels dry: each call of a csrc op fits its schema
    (qmamba.kernels.schemas) and each Triton launch binds to its kernel's parameters, as on a GPU; no host sync."""
    r = host_ops.int8_count(preset_name, str(RECIPES / recipe), prompt=16, device="cpu")
    assert r["dry"]
    for what in ("prefill", "step"):
        assert not any(r[what].get(k, 0) for k in host_ops.SYNC_OPS), what
        assert sum(r[f"{what}_launches"].values()) >= r["layers"], what
