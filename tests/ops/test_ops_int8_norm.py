"""Fused residual add + RMSNorm + int8 quantize reference (qmamba.ops.int8_norm) against what the model computes:
Block.forward's add, the norm (rms_norm_ref), and the int8 in_proj quantizing its input.

Tolerances: bit-exact (torch.equal) against the model's own ops, in every dtype combination; against the float64
definition, codes within 1 LSB (fp32 rounding of the mean can move a value across a rounding boundary)."""

import pytest
import torch
from torch import nn

import qmamba
from qmamba.models import MambaLM
from qmamba.models.lm import Block
from qmamba.ops.int8_norm import add_rmsnorm_quant, add_rmsnorm_quant_ref
from qmamba.qnn import calibrate, prepare, set_mode
from qmamba.quant.numerics import quantize


class _Capture(nn.Module):
    """Stands in for the mixer: keeps its input (the norm's output) and passes it on."""

    def forward(self, x):
        self.seen = x
        return x


def _block(d, eps, residual_in_fp32, weight_dtype):
    block = Block(qmamba.preset("tiny", d_model=d, norm_epsilon=eps, residual_in_fp32=residual_in_fp32))
    block.mixer = _Capture()
    with torch.no_grad():
        block.norm.weight.copy_(1 + 0.3 * torch.randn(d))
    return block.to(weight_dtype)


CASES = [  # hidden dtype, residual dtype (None: first layer), residual_in_fp32, norm weight dtype
    (torch.float32, torch.float32, True, torch.float32),
    (torch.float32, None, True, torch.float32),
    (torch.float16, torch.float32, True, torch.float16),   # mamba_ssm's fp16 inference: fp32 residual stream
    (torch.bfloat16, torch.float32, True, torch.bfloat16),
    (torch.bfloat16, None, True, torch.bfloat16),
    (torch.float16, torch.float16, False, torch.float16),
    (torch.bfloat16, torch.bfloat16, False, torch.bfloat16),
    (torch.bfloat16, None, False, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, False, torch.float32),  # fp32 norm weight under a bf16 residual stream
    (torch.float16, torch.float32, False, torch.float16),   # fp32 residual without the flag: promoted add
]


@pytest.mark.parametrize("h_dtype, r_dtype, residual_in_fp32, w_dtype", CASES)
def test_ref_matches_block_and_quantizer(h_dtype, r_dtype, residual_in_fp32, w_dtype):
    d, eps = 64, 1e-5
    block = _block(d, eps, residual_in_fp32, w_dtype)
    hidden = (torch.randn(3, 7, d) * 2).to(h_dtype)
    residual = None if r_dtype is None else (torch.randn(3, 7, d) * 6).to(r_dtype)
    in_scale = torch.tensor(0.021)
    with torch.no_grad():
        _, expected_residual = block(hidden, residual)
    expected_codes = quantize(block.mixer.seen, in_scale)  # what the int8 in_proj does with its input
    codes, residual_out = add_rmsnorm_quant_ref(hidden, residual, block.norm.weight, eps, in_scale, residual_in_fp32)
    assert codes.dtype == torch.int8 and codes.shape == (21, d)
    assert residual_out.dtype == expected_residual.dtype and residual_out.shape == (21, d)
    assert torch.equal(codes, expected_codes.reshape(-1, d))
    assert torch.equal(residual_out, expected_residual.reshape(-1, d))
    assert codes.abs().max() > 50  # the scale is realistic: codes use the range (and some clamp)


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_ref_matches_the_int8_model(residual_in_fp32):
    """In a calibrated int8 model: the codes in_proj records and the residual stream a block hands on."""
    model = prepare(MambaLM(qmamba.preset("tiny", residual_in_fp32=residual_in_fp32)).eval(), "quamba_w8a8")
    ids = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(s)) for s in (10, 11, 3)]
    calibrate(model, ids[:2], progress=False)
    set_mode(model, "int8")
    block = model.backbone.layers[1]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.update(args=args))
    block.register_forward_hook(lambda m, args, out: seen.update(out=out))
    point = block.mixer.in_proj.q("input")
    point.recording = True
    with torch.no_grad():
        model(ids[2])
    hidden, residual = seen["args"]
    codes, residual_out = add_rmsnorm_quant_ref(hidden, residual, block.norm.weight, block.norm.eps, point.scale,
                                                residual_in_fp32)
    d = hidden.shape[-1]
    assert torch.equal(codes, point.recorded.reshape(-1, d))
    assert torch.equal(residual_out, seen["out"][1].reshape(-1, d))


def test_ref_against_float64_definition():
    d, eps = 96, 1e-6
    hidden, residual = torch.randn(40, d), torch.randn(40, d) * 3
    weight, in_scale = 1 + 0.2 * torch.randn(d), torch.tensor(0.02)
    codes, residual_out = add_rmsnorm_quant_ref(hidden, residual, weight, eps, in_scale, True)
    r = hidden.double() + residual.double()
    y = r / torch.sqrt((r * r).mean(-1, keepdim=True) + eps) * weight.double()
    expected = torch.round(y / 0.02).clamp(-128, 127)
    diff = (codes.double() - expected).abs()
    assert diff.max() <= 1 and (diff == 0).double().mean() >= 0.999
    torch.testing.assert_close(residual_out, (hidden + residual), rtol=0, atol=0)


def test_first_layer_residual_is_hidden():
    hidden = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    weight = torch.ones(32, dtype=torch.bfloat16)
    _, res = add_rmsnorm_quant_ref(hidden, None, weight, 1e-5, torch.tensor(0.05), residual_in_fp32=True)
    assert res.dtype == torch.float32 and torch.equal(res, hidden.float().reshape(-1, 32))
    _, res = add_rmsnorm_quant_ref(hidden, None, weight, 1e-5, torch.tensor(0.05), residual_in_fp32=False)
    assert res.dtype == torch.bfloat16 and torch.equal(res, hidden.reshape(-1, 32))


def test_dispatch_on_cpu_is_the_ref():
    hidden, residual, weight = torch.randn(4, 32), torch.randn(4, 32), torch.rand(32) + 0.5
    a = add_rmsnorm_quant(hidden, residual, weight, 1e-5, torch.tensor(0.03), True)
    b = add_rmsnorm_quant_ref(hidden, residual, weight, 1e-5, torch.tensor(0.03), True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_errors_name_the_fix():
    hidden, weight, s = torch.randn(4, 32), torch.ones(32), torch.tensor(0.03)
    with pytest.raises(ValueError, match="residual must have hidden's shape"):
        add_rmsnorm_quant_ref(hidden, torch.randn(4, 31), weight, 1e-5, s, True)
    with pytest.raises(ValueError, match=r"weight must be \(32,\)"):
        add_rmsnorm_quant_ref(hidden, None, torch.ones(16), 1e-5, s, True)
    with pytest.raises(ValueError, match="in_scale must be a one-element"):
        add_rmsnorm_quant_ref(hidden, None, weight, 1e-5, torch.ones(2), True)
    with pytest.raises(TypeError, match="float tensor"):
        add_rmsnorm_quant_ref(hidden.to(torch.int8), None, weight, 1e-5, s, True)
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        add_rmsnorm_quant(hidden, None, weight, 1e-5, s, True, backend="cuda")
