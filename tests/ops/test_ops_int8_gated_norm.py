"""The gated RMSNorm reading its gate as int8 codes (``qmamba.ops.int8_gated_norm``): the reference is the float
path's ops (z dequantized to its dtype, then ``gated_rms_norm_ref``) bit for bit, the argument checks name the fix,
and the Triton kernel under the interpreter agrees with the reference within float tolerance (its sum of squares
runs in another order; the dequantized gate itself is exact).

Tolerance (kernel vs reference): fp32 rtol 1e-5 / atol 1e-6; fp16 rtol / atol 1e-3 (one unit in the last place;
measured: 0); bf16 rtol 2^-6 / atol 1e-3, two units in the last place: Triton's interpreter casts fp32 to bf16 by
truncation (numpy has no bf16; measured: every one of 4096 random casts truncated), here twice (the gate, the
output), where a GPU rounds to nearest even."""

import pytest
import torch

from qmamba.ops.int8_gated_norm import gated_rms_norm_from_codes, gated_rms_norm_from_codes_ref
from qmamba.ops.norm import gated_rms_norm_ref
from qmamba.quant.numerics import dequantize, quantize


def _case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2).to(dtype)
    z = torch.randn(*shape, generator=g).to(dtype)
    s = z.float().abs().amax() / 127
    return x, quantize(z, s), s, (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ref_is_the_float_path_bit_for_bit(dtype, group_size, norm_before_gate):
    x, qz, s, w = _case((2, 5, 32), dtype)
    z = dequantize(qz, s).to(dtype)  # what QuantPoint.roundtrip hands the float norm
    want = gated_rms_norm_ref(x, w, z, 1e-5, group_size, norm_before_gate)
    got = gated_rms_norm_from_codes_ref(x, w, qz, s, dtype, 1e-5, group_size, norm_before_gate)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(gated_rms_norm_from_codes(x, w, qz, s, dtype, 1e-5, group_size, norm_before_gate), want)


def test_bad_arguments_name_the_fix():
    x, qz, s, w = _case((2, 3, 16), torch.float32)
    with pytest.raises(TypeError, match="int8 codes"):
        gated_rms_norm_from_codes_ref(x, w, qz.float(), s, torch.float32)
    with pytest.raises(TypeError, match="int8 codes of x's shape"):
        gated_rms_norm_from_codes_ref(x, w, qz[..., :8], s, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        gated_rms_norm_from_codes_ref(x, w[:8], qz, s, torch.float32)
    with pytest.raises(ValueError, match="one-element"):
        gated_rms_norm_from_codes_ref(x, w, qz, torch.ones(3), torch.float32)
    with pytest.raises(ValueError, match="group_size 5 must divide"):
        gated_rms_norm_from_codes_ref(x, w, qz, s, torch.float32, group_size=5)
    with pytest.raises(TypeError, match="z_dtype"):
        gated_rms_norm_from_codes_ref(x, w, qz, s, torch.int8)
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        gated_rms_norm_from_codes(x, w, qz, s, torch.float32, backend="cuda")


_INTERPRETER_SCRIPT = """
import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
from qmamba.kernels.triton.gated_norm import gated_rms_norm_from_codes
from qmamba.ops.int8_gated_norm import gated_rms_norm_from_codes_ref
from qmamba.quant.numerics import quantize

TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (2 ** -6, 1e-3)}
failures, n_cases = [], 0
# (rows, d, group_size): one group (Mamba2 with ngroups 1), two groups, a group that is not a power of two, and z's
# codes as a column slice of a wider projection (in_proj's [z | xBC | dt])
for lead, d, gs, sliced in [((3,), 16, None, False), ((2, 3), 32, 16, True), ((5,), 48, 24, True),
                            ((1,), 640, None, False)]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for nbg in (False, True):
            g = torch.Generator().manual_seed(n_cases)
            x = (torch.randn(*lead, d, generator=g) * 2).to(dtype)
            wide = torch.randn(*lead, d + 7, generator=g).to(dtype)
            z = wide[..., :d] if sliced else wide[..., :d].contiguous()
            s = z.float().abs().amax() / 127
            qz = quantize(z, s)
            if sliced:
                qz = torch.cat([qz, torch.zeros(*lead, 7, dtype=torch.int8)], -1)[..., :d]
                assert not qz.is_contiguous()
            w = (torch.rand(d, generator=g) + 0.5).to(dtype)
            want = gated_rms_norm_from_codes_ref(x, w, qz, s, dtype, 1e-5, gs, nbg)
            got = gated_rms_norm_from_codes(x, w, qz, s, dtype, 1e-5, gs, nbg)
            n_cases += 1
            rtol, atol = TOL[dtype]
            if got.dtype != dtype or got.shape != want.shape or not torch.allclose(got.float(), want.float(),
                                                                                   rtol=rtol, atol=atol):
                failures.append((lead, d, gs, str(dtype), nbg, float((got.float() - want.float()).abs().max())))
print("cases", n_cases, "failures", failures)
assert not failures, failures
"""


def test_triton_kernel_under_interpreter_agrees_with_ref(interpret):
    assert "failures []" in interpret(_INTERPRETER_SCRIPT)


def test_norm_hadamard_quantize_ref_is_the_unfused_ops():
    from qmamba.ops.int8_gated_norm import gated_rms_norm_hadamard_quantize, gated_rms_norm_hadamard_quantize_ref
    from qmamba.ops.int8_hadamard import hadamard_quantize_ref

    x, qz, s, w = _case((2, 5, 96), torch.float16)  # 96 = 3 x 32: block-diagonal rotation
    s_out = torch.tensor(0.02)
    y = gated_rms_norm_from_codes_ref(x, w, qz, s, torch.float16, 1e-5, None, False)
    want = hadamard_quantize_ref(y, s_out)
    assert torch.equal(gated_rms_norm_hadamard_quantize_ref(x, w, qz, s, torch.float16, 1e-5, False, s_out), want)
    assert torch.equal(gated_rms_norm_hadamard_quantize(x, w, qz, s, torch.float16, 1e-5, False, s_out), want)


_INTERPRETER_FUSED_SCRIPT = """
import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
from qmamba.kernels.triton.gated_norm import gated_rms_norm_hadamard_quantize
from qmamba.ops.int8_gated_norm import gated_rms_norm_hadamard_quantize_ref
from qmamba.quant.numerics import quantize

failures, n_cases = [], 0
# widths: a power of two, block-diagonal ones (96 = 3 x 32, 640 = 5 x 128), z's codes a column slice
for rows, d, sliced in [(5, 64, False), (7, 96, True), (4, 640, True)]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for nbg in (False, True):
            g = torch.Generator().manual_seed(n_cases)
            x = (torch.randn(rows, d, generator=g) * 2).to(dtype)
            wide = torch.randn(rows, d + 5, generator=g).to(dtype)
            s = wide[:, :d].float().abs().amax() / 127
            qz = quantize(wide, s)[:, :d] if sliced else quantize(wide[:, :d].contiguous(), s)
            w = (torch.rand(d, generator=g) + 0.5).to(dtype)
            s_out = torch.tensor(0.015)
            want = gated_rms_norm_hadamard_quantize_ref(x, w, qz, s, dtype, 1e-5, nbg, s_out)
            got = gated_rms_norm_hadamard_quantize(x, w, qz, s, dtype, 1e-5, nbg, s_out)
            n_cases += 1
            diff = (got.int() - want.int()).abs()
            # the norm's output may round 1 ulp off the reference's (2 in bf16: the interpreter truncates), which
            # moves a rotated value across a rounding boundary now and then
            limit = 2 if dtype == torch.bfloat16 else 1
            if got.dtype != torch.int8 or got.shape != want.shape or int(diff.max()) > limit or (
                    dtype != torch.bfloat16 and float((diff == 0).double().mean()) < 0.99):
                failures.append((rows, d, str(dtype), nbg, int(diff.max()), float((diff == 0).double().mean())))
print("cases", n_cases, "failures", failures)
assert not failures, failures
"""


def test_triton_norm_hadamard_quantize_under_interpreter_agrees_with_ref(interpret):
    """The fused norm + rotate + quantize kernel: codes at most 1 LSB from the unfused reference (2 in bf16 under
    the interpreter) and >= 99 % identical (fp32 / fp16)."""
    assert "failures []" in interpret(_INTERPRETER_FUSED_SCRIPT)
