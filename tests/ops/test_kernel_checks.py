"""The Python argument checks of the CUDA ops' wrappers (qmamba/kernels/{conv1d,norm,linear,selective_scan}.py and
checks.py), on CPU: each bad shape / dtype / count / size limit that a C++ TORCH_CHECK in csrc/ would reject is
raised in Python first, as a TypeError / ValueError whose message names the fix; valid arguments pass; the checks
read metadata only (they run on meta tensors, which hold no values); and the wrappers check before building or
calling anything (a bad argument is a Python error even where the kernels cannot load).
"""

import re
import types

import pytest
import torch

from qmamba.kernels import checks
from qmamba.kernels import conv1d as kconv
from qmamba.kernels import linear as klinear
from qmamba.kernels import norm as knorm
from qmamba.kernels import selective_scan as kscan
from qmamba.kernels.build import CSRC

META = torch.device("meta")


def i8(*shape, device="cpu"):
    return torch.zeros(*shape, dtype=torch.int8, device=device)


def _raises(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        fn(**kwargs)
    assert type(info.value) is exc  # not a subclass standing in for another (e.g. KernelsUnavailable)


# ---- conv1d --------------------------------------------------------------------------------------------------------
def conv_args(B=2, D=6, L=5, K=4):
    return dict(qx=i8(B, D, L), x_scale=torch.tensor(0.02), qw=i8(D, 1, K), w_scale=torch.rand(D) + 0.1,
                bias=torch.randn(D), out_dtype=torch.float16, out_scales=[torch.tensor(0.1)])


def conv_update_args(B=2, D=6, K=4):
    a = conv_args(B, D, 1, K)
    a["qx"] = i8(B, D)
    return dict(a, conv_state=i8(B, D, K))


CONV_CASES = [  # (overrides, exception, message)
    (dict(qx=torch.zeros(2, 6, 5)), TypeError, "qx must be int8 codes.*quantize the conv input"),
    (dict(qx=i8(2, 6)), ValueError, r"qx must be 3-D \(B, D, L\)"),
    (dict(qw=torch.zeros(6, 1, 4)), TypeError, "qw must be int8 codes.*quantize the conv weight"),
    (dict(qw=i8(6, 2, 4)), ValueError, r"qw must be \(D, K\) or \(D, 1, K\) with D = 6"),
    (dict(qw=i8(5, 4)), ValueError, r"qw must be \(D, K\) or \(D, 1, K\) with D = 6"),
    (dict(qw=i8(6)), ValueError, r"qw must be \(D, K\)"),
    (dict(qw=i8(6, 1, 5)), ValueError, "1 <= K <= 4 taps.*got K = 5.*backend='torch'"),
    (dict(qw=i8(6, 0)), ValueError, "got K = 0"),
    (dict(x_scale=torch.ones(2)), ValueError, "x_scale must be a per-tensor scale"),
    (dict(x_scale="0.1"), TypeError, "x_scale must be a one-element tensor"),
    (dict(w_scale=torch.ones(4)), ValueError, r"w_scale must have 1 \(per-tensor\) or 6 \(per-channel\)"),
    (dict(bias=torch.ones(5)), ValueError, "bias must have D = 6 elements"),
    (dict(out_dtype=torch.int32), ValueError, "out_dtype must be float32, float16 or bfloat16"),
    (dict(out_scales=[torch.tensor(0.1)] * 5), ValueError, "at most 4 out_scales"),
    (dict(out_scales=[torch.tensor(0.1), torch.ones(2)]), ValueError, r"out_scales\[1\] must be a per-tensor"),
    (dict(qx=i8(65536, 1, 1, device=META), qw=i8(1, 4), w_scale=torch.ones(1), bias=None), ValueError,
     "grid limit of 65535; split the batch"),
    (dict(qx=i8(1, 6, 1 << 29, device=META)), ValueError, "D \\* L = .*split the sequence"),
]


@pytest.mark.parametrize("overrides,exc,match", CONV_CASES)
def test_conv1d_check_rejects(overrides, exc, match):
    _raises(kconv.check_conv1d_args, dict(conv_args(), **overrides), exc, match)


CONV_UPDATE_CASES = [
    (dict(qx=i8(2, 6, 1)), ValueError, r"qx must be 2-D \(B, D\)"),
    (dict(conv_state=torch.zeros(2, 6, 4)), TypeError, "conv_state must be int8.*conv1d_int8_initial_state"),
    (dict(conv_state=i8(2, 6, 3)), ValueError,
     r"conv_state must be int8 codes \(B, D, K\) = \(2, 6, 4\), got \(2, 6, 3\).*conv1d_int8_initial_state"),
    (dict(conv_state=i8(1, 6, 4)), ValueError, "conv_state must be"),
    (dict(conv_state=None), TypeError, "conv_state must be int8 codes"),
    (dict(qw=i8(6, 1, 8), conv_state=i8(2, 6, 8)), ValueError, "got K = 8"),
    (dict(bias=torch.ones(7)), ValueError, "bias must have D = 6"),
    (dict(qx=i8(1 << 16, 1 << 15, device=META), conv_state=i8(1 << 16, 1 << 15, 4, device=META), qw=i8(1 << 15, 4),
          w_scale=torch.ones(1), bias=None), ValueError, "B \\* D = .*split the batch"),
]


@pytest.mark.parametrize("overrides,exc,match", CONV_UPDATE_CASES)
def test_conv1d_update_check_rejects(overrides, exc, match):
    _raises(kconv.check_conv1d_update_args, dict(conv_update_args(), **overrides), exc, match)


def test_conv1d_checks_accept_valid_arguments():
    assert kconv.check_conv1d_args(**conv_args()) == 4
    assert kconv.check_conv1d_args(**dict(conv_args(K=1), qw=i8(6, 1), w_scale=0.5, x_scale=0.1, bias=None,
                                          out_scales=())) == 1
    assert kconv.check_conv1d_args(**dict(conv_args(L=0))) == 4  # empty sequences are fine (empty outputs)
    assert kconv.check_conv1d_update_args(**conv_update_args(K=3)) == 3
    # any strides: Mamba1's x is a transposed slice of in_proj's output
    proj = i8(2, 5, 12)
    assert kconv.check_conv1d_args(**dict(conv_args(), qx=proj[..., :6].transpose(1, 2))) == 4


# ---- add + RMSNorm + quantize ----------------------------------------------------------------------------------------
def norm_args(d=32, lead=(3, 4)):
    return dict(hidden=torch.zeros(*lead, d, dtype=torch.float16), residual=torch.zeros(*lead, d),
                weight=torch.ones(d, dtype=torch.float16), in_scale=torch.tensor(0.05))


NORM_CASES = [
    (dict(hidden=torch.zeros(3, 32, dtype=torch.int32)), TypeError, "hidden must be float32, float16 or bfloat16"),
    (dict(hidden=torch.zeros(3, 32, dtype=torch.float64)), TypeError, "hidden must be float32, float16"),
    (dict(hidden=torch.tensor(1.0), residual=None), ValueError, r"hidden must be \(..., d\), got a 0-dim"),
    (norm_args(d=8193), ValueError, r"rows of 1..8192 elements, got d = 8193; use backend='torch'"),
    (norm_args(d=0), ValueError, "rows of 1..8192 elements, got d = 0"),
    (dict(weight=torch.ones(31)), ValueError, r"weight must be a \(32,\) tensor"),
    (dict(weight=torch.ones(1, 32)), ValueError, r"weight must be a \(32,\) tensor"),
    (dict(weight=torch.ones(32, dtype=torch.float64)), TypeError, "weight must be float32, float16 or bfloat16"),
    (dict(weight=None), TypeError, r"weight must be a \(32,\) tensor"),
    (dict(in_scale=torch.ones(2)), ValueError, "in_scale must be a per-tensor scale"),
    (dict(residual=torch.zeros(3, 4, 16)), ValueError, r"residual must have hidden's shape \(3, 4, 32\)"),
    (dict(residual=torch.zeros(3, 4, 32, dtype=torch.bfloat16)), TypeError,
     r"residual must have hidden's dtype \(torch.float16\) or float32"),
    (dict(hidden=torch.zeros(1 << 31, 1, dtype=torch.float16, device=META), residual=None, weight=torch.ones(1)),
     ValueError, "grid limit; split the batch"),
]


@pytest.mark.parametrize("overrides,exc,match", NORM_CASES)
def test_norm_check_rejects(overrides, exc, match):
    _raises(knorm.check_add_rmsnorm_quant_args, dict(norm_args(), **overrides), exc, match)


def test_norm_check_accepts_valid_arguments():
    assert knorm.check_add_rmsnorm_quant_args(**norm_args()) == 32
    a = norm_args(d=8192)
    assert knorm.check_add_rmsnorm_quant_args(**dict(a, residual=None, in_scale=0.1)) == 8192
    bf = dict(hidden=torch.zeros(5, 64, dtype=torch.bfloat16), residual=torch.zeros(5, 64, dtype=torch.bfloat16),
              weight=torch.ones(64, dtype=torch.float32), in_scale=torch.ones(1, 1))
    assert knorm.check_add_rmsnorm_quant_args(**bf) == 64
    assert knorm.check_add_rmsnorm_quant_args(**dict(bf, hidden=bf["hidden"].t().contiguous().t()[:, :64])) == 64


# ---- W8A8 linear ---------------------------------------------------------------------------------------------------
def linear_args(lead=(2, 1), K=64, N=48):
    return dict(qx=i8(*lead, K), x_scale=torch.tensor(0.02), qw=i8(N, K), w_scale=torch.rand(N),
                bias=torch.randn(N), out_dtype=torch.bfloat16, out_scale=torch.rand(N) + 0.1)


LINEAR_CASES = [  # shared by the GEMM and the GEMV
    (dict(qx=torch.zeros(2, 64)), TypeError, "qx must be int8 codes"),
    (dict(qw=torch.zeros(48, 64)), TypeError, "qw must be int8 codes"),
    (dict(qw=i8(48, 32)), ValueError, r"expected qx \(..., K\) and qw \(N, K\)"),
    (dict(qw=i8(48, 1, 64)), ValueError, r"expected qx \(..., K\) and qw \(N, K\)"),
    (dict(x_scale=0.02), TypeError, "x_scale must be a one-element tensor"),
    (dict(x_scale=torch.ones(2)), ValueError, "x_scale must be a per-tensor scale"),
    (dict(w_scale=torch.ones(47)), ValueError, r"w_scale must have 1 \(per-tensor\) or 48 \(per-output-channel\)"),
    (dict(w_scale=None), TypeError, "w_scale must be a tensor of 1"),
    (dict(bias=torch.ones(47)), ValueError, "bias must have N = 48 elements"),
    (dict(out_dtype=torch.int8), ValueError, "out_dtype must be float32, float16 or bfloat16"),
    (dict(out_scale=torch.tensor(0.1)), ValueError, "out_scale must have one scale per output column, N = 48"),
]
GEMV_CASES = LINEAR_CASES + [
    (linear_args(lead=(9,)), ValueError, r"1..8 rows \(tokens\), got 9; use the GEMM"),
    (linear_args(lead=(3, 3)), ValueError, "1..8 rows"),
    (linear_args(lead=(0,)), ValueError, "1..8 rows"),
    (linear_args(K=40), ValueError, "K=40 must be a multiple of 16.*w8a8_gemm.*or pad K"),
    (dict(qx=i8(1, 131072, device=META), qw=i8(48, 131072, device=META)), ValueError,
     "overflow the int32 accumulator"),
]


@pytest.mark.parametrize("overrides,exc,match", GEMV_CASES)
def test_gemv_check_rejects(overrides, exc, match):
    _raises(klinear.check_gemv_args, dict(linear_args(), **overrides), exc, match)


@pytest.mark.parametrize("overrides,exc,match", LINEAR_CASES)
def test_gemm_check_rejects(overrides, exc, match):
    _raises(lambda **kw: klinear.check_w8a8_args("w8a8_gemm", **kw), dict(linear_args(), **overrides), exc, match)


def test_linear_checks_accept_valid_arguments():
    assert klinear.check_gemv_args(**linear_args()) == (2, 48, 64)
    assert klinear.check_gemv_args(**dict(linear_args(lead=(1,)), w_scale=torch.tensor(0.1), bias=None,
                                          out_scale=None, out_dtype=torch.float32)) == (1, 48, 64)
    assert klinear.check_gemv_args(**linear_args(lead=(8,), K=131056)) == (8, 48, 131056)
    # the GEMM takes what the GEMV cannot: many rows, K not a multiple of 16
    assert klinear.check_w8a8_args("w8a8_gemm", **linear_args(lead=(3, 33), K=40)) == (99, 48, 40)


# ---- selective scan ------------------------------------------------------------------------------------------------
def scan_args(batch=2, dim=12, L=7, n=8, device="cpu"):
    return dict(qu=i8(batch, dim, L, device=device), u_scale=torch.tensor(0.1), qdelta=i8(batch, dim, L, device=device),
                delta_scale=torch.tensor(0.05), A=-torch.ones(dim, n, device=device), qB=i8(batch, n, L, device=device),
                B_scale=torch.tensor(0.2), qC=i8(batch, n, L, device=device), C_scale=torch.tensor(0.2),
                D=torch.ones(dim, device=device), qz=i8(batch, dim, L, device=device), z_scale=torch.tensor(0.1),
                delta_bias=torch.zeros(dim, device=device), out_dtype=torch.float16,
                initial_state=torch.zeros(batch, dim, n, device=device))


def scan_update_args(batch=2, dim=12, n=8):
    a = scan_args(batch, dim, 1, n)
    del a["initial_state"]
    for k in ("qu", "qdelta", "qB", "qC", "qz"):
        a[k] = a[k][..., 0]
    return dict(a, state=torch.zeros(batch, dim, n))


def dt_proj_update_args(batch=2, dim=12, n=8, r=48):
    """``scan_update_args`` with dt_proj fused: qdelta None, dt a column slice of an x_proj output (batch, R + 2N)."""
    from qmamba.ops.int8_selective_scan import DtProjection

    proj = DtProjection(i8(batch, r + 2 * n)[:, :r], torch.tensor(0.03), i8(dim, r), torch.rand(dim) + 0.1,
                        torch.randn(dim))
    return dict(scan_update_args(batch, dim, n), qdelta=None, dt_proj=proj)


SCAN_COMMON_CASES = [  # (overrides given as functions of the valid arguments, exception, message)
    (lambda a: dict(qu=a["qu"].float()), TypeError, r"u must be int8 codes.*\(quantize it first\)"),
    (lambda a: dict(qdelta=a["qdelta"].float()), TypeError, "delta must be int8 codes"),
    (lambda a: dict(qdelta=a["qdelta"][:1]), ValueError, "delta must have u's shape"),
    (lambda a: dict(qC=a["qC"].int()), TypeError, "C must be int8 codes"),
    (lambda a: dict(qB=a["qB"][:1], qC=a["qC"][:1]), ValueError, "B and C must be"),
    (lambda a: dict(qC=a["qC"][:, :4]), ValueError, "B and C must be"),
    (lambda a: dict(A=a["A"][:, :4]), ValueError, r"A must have shape \(D, N\) = \(12, 8\), got \(12, 4\)"),
    (lambda a: dict(A=None), TypeError, r"A must be a tensor of shape \(D, N\)"),
    (lambda a: dict(D=a["D"][:, None]), ValueError, r"D must have shape \(D,\) = \(12,\)"),
    (lambda a: dict(delta_bias=a["delta_bias"][:6]), ValueError, "delta_bias must have shape"),
    (lambda a: dict(z_scale=None), ValueError, "give qz and z_scale together"),
    (lambda a: dict(qz=None), ValueError, "give qz and z_scale together"),
    (lambda a: dict(qz=a["qz"].half()), TypeError, "z must be int8 codes"),
    (lambda a: dict(qz=a["qz"][:1]), ValueError, "z must have u's shape"),
    (lambda a: dict(z_scale=torch.ones(2)), ValueError, "z_scale must be a per-tensor scale"),
    (lambda a: dict(u_scale=torch.ones(12, 1)), ValueError, "u_scale must be a per-tensor scale"),
    (lambda a: dict(delta_scale=torch.ones(12)), ValueError, "delta_scale must be a per-tensor scale"),
    (lambda a: dict(B_scale="0.2"), TypeError, "B_scale must be a one-element tensor"),
    (lambda a: dict(C_scale=torch.ones(3)), ValueError, "C_scale must be a per-tensor scale"),
    (lambda a: dict(out_dtype=torch.float64), ValueError, "out_dtype must be float32, float16 or bfloat16"),
]
SCAN_CASES = SCAN_COMMON_CASES + [
    (lambda a: dict(qu=a["qu"][..., 0]), ValueError, r"u must be 3-D \(batch, D, L\)"),
    (lambda a: dict(qB=a["qB"][:, None], qC=a["qC"][:, None]), ValueError, r"\(Mamba1: no groups\)"),
    (lambda a: dict(qB=a["qB"][..., :3], qC=a["qC"][..., :3]), ValueError, r"B and C must be \(batch, N, L\)"),
    (lambda a: dict(scan_args(n=300), initial_state=None), ValueError, r"state size N must be in 1..256, got 300"),
    (lambda a: dict(initial_state=a["initial_state"][..., :3]), ValueError,
     r"initial_state must have shape \(batch, D, N\) = \(2, 12, 8\)"),
    (lambda a: scan_args(batch=65536, dim=1, L=1, device=META), ValueError, "split the batch or the sequence"),
]
SCAN_UPDATE_CASES = SCAN_COMMON_CASES + [
    (lambda a: dict(qu=a["qu"][..., None]), ValueError, r"u must be 2-D \(batch, D\)"),
    (lambda a: dict(qB=a["qB"][:1], qC=a["qC"][:1]), ValueError, r"B and C must be \(batch, N\) with batch 2"),
    (lambda a: dict(scan_update_args(n=300)), ValueError, "state size N must be in 1..256"),
    (lambda a: dict(state=a["state"].half()), TypeError, r"state must be float32 \(updated in place\)"),
    (lambda a: dict(state=a["state"][..., :4]), ValueError, r"state must have shape \(batch, D, N\) = \(2, 12, 8\)"),
    (lambda a: dict(state=a["state"][:1]), ValueError, "state must have shape"),
    (lambda a: scan_update_args(batch=65536, dim=1), ValueError, "batch must be < 65536"),
    (lambda a: dict(dt_proj_update_args(), qdelta=a["qdelta"]), ValueError, "exactly one of qdelta .* got both"),
    (lambda a: dict(qdelta=None), ValueError, "exactly one of qdelta .* got neither"),
    (lambda a: dict(qdelta=None, dt_proj=tuple(dt_proj_update_args()["dt_proj"])), TypeError,
     "dt_proj must be a qmamba.ops.int8_selective_scan.DtProjection"),
]


def _fused(**fields):
    """The fused arguments with some DtProjection fields replaced."""
    a = dt_proj_update_args()
    return dict(dt_proj=a["dt_proj"]._replace(**fields), qdelta=None)


DT_PROJ_CASES = [
    (_fused(q=torch.zeros(2, 48)), TypeError, "dt_proj.q must be int8 codes.*x_proj's output columns"),
    (_fused(q=i8(3, 48)), ValueError, r"dt_proj.q must be the dt codes \(batch, R\) with batch 2"),
    (_fused(q=i8(2, 48, 1)), ValueError, r"dt_proj.q must be 2-D \(batch, R\)"),
    (_fused(q=i8(2, 0), weight=i8(12, 0)), ValueError, "R >= 1"),
    (_fused(scale=torch.ones(2)), ValueError, "dt_proj.scale must be a per-tensor scale"),
    (_fused(weight=torch.zeros(12, 48)), TypeError, "dt_proj.weight must be int8 codes.*dt_proj's int8 weight"),
    (_fused(weight=i8(12, 40)), ValueError, r"dt_proj.weight must be dt_proj's \(D, R\) = \(12, 48\)"),
    (_fused(weight=i8(11, 48)), ValueError, r"dt_proj.weight must be dt_proj's \(D, R\) = \(12, 48\)"),
    (_fused(weight_scale=torch.ones(5)), ValueError, r"dt_proj.weight_scale must have 1 \(per-tensor\) or 12"),
    (_fused(weight_scale=0.1), TypeError, "dt_proj.weight_scale must be a tensor"),
    (_fused(bias=torch.ones(13)), ValueError, r"dt_proj.bias must have shape \(D,\) = \(12,\)"),
    (_fused(q=i8(2, 131072), weight=i8(12, 131072)), ValueError, "dt_rank R=131072 could overflow the int32"),
]


@pytest.mark.parametrize("fields,exc,match", DT_PROJ_CASES)
def test_scan_update_check_rejects_bad_dt_proj(fields, exc, match):
    _raises(kscan.check_selective_scan_update_args, dict(scan_update_args(), **fields), exc, match)


@pytest.mark.parametrize("make,exc,match", SCAN_CASES)
def test_scan_check_rejects(make, exc, match):
    a = scan_args()
    _raises(kscan.check_selective_scan_args, dict(a, **make(a)), exc, match)


@pytest.mark.parametrize("make,exc,match", SCAN_UPDATE_CASES)
def test_scan_update_check_rejects(make, exc, match):
    a = scan_update_args()
    _raises(kscan.check_selective_scan_update_args, dict(a, **make(a)), exc, match)


def test_scan_checks_accept_valid_arguments():
    assert kscan.check_selective_scan_args(**scan_args()) == (2, 12, 7, 8)
    no_gate = dict(scan_args(n=256), qz=None, z_scale=None, D=None, delta_bias=None, initial_state=None,
                   u_scale=0.1, out_dtype=torch.bfloat16)
    assert kscan.check_selective_scan_args(**no_gate) == (2, 12, 7, 256)
    # channel-last views as Mamba1's mixer passes them, fp16 A / D (the wrapper converts them)
    xbc = i8(2, 7, 12 + 16)
    a = dict(scan_args(), qu=i8(2, 7, 12).transpose(1, 2), qB=xbc[..., 12:20].transpose(1, 2),
             qC=xbc[..., 20:].transpose(1, 2), A=-torch.ones(12, 8, dtype=torch.float16))
    assert kscan.check_selective_scan_args(**a) == (2, 12, 7, 8)
    assert kscan.check_selective_scan_update_args(**scan_update_args()) == (2, 12, 8)
    # a strided state (any strides work: it is updated in place through its strides)
    u = scan_update_args()
    assert kscan.check_selective_scan_update_args(**dict(u, state=torch.zeros(2, 8, 12).transpose(1, 2))) == (2, 12, 8)
    # dt_proj fused: strided dt rows, per-channel and per-tensor weight scales, with and without bias
    fused = dt_proj_update_args()
    assert kscan.check_selective_scan_update_args(**fused) == (2, 12, 8)
    proj = fused["dt_proj"]._replace(weight_scale=torch.tensor(0.01), bias=None, scale=0.03)
    assert kscan.check_selective_scan_update_args(**dict(fused, dt_proj=proj)) == (2, 12, 8)


# ---- metadata only -------------------------------------------------------------------------------------------------
def _on_meta(args):
    return {k: (v.to(META) if isinstance(v, torch.Tensor) else
                [s.to(META) for s in v] if isinstance(v, list) else v) for k, v in args.items()}


def test_checks_read_metadata_only():
    """Meta tensors have shapes and dtypes but no values: a check that read one (.item(), a host sync, a value-
    dependent branch) would fail here. So the checks cost no sync in a decode step and keep it graph-capturable."""
    assert kconv.check_conv1d_args(**_on_meta(conv_args())) == 4
    assert kconv.check_conv1d_update_args(**_on_meta(conv_update_args())) == 4
    assert knorm.check_add_rmsnorm_quant_args(**_on_meta(norm_args())) == 32
    assert klinear.check_gemv_args(**_on_meta(linear_args())) == (2, 48, 64)
    assert kscan.check_selective_scan_args(**_on_meta(scan_args())) == (2, 12, 7, 8)
    assert kscan.check_selective_scan_update_args(**_on_meta(scan_update_args())) == (2, 12, 8)
    fused = dt_proj_update_args()
    meta = dict(_on_meta({k: v for k, v in fused.items() if k != "dt_proj"}),
                dt_proj=type(fused["dt_proj"])(*(t.to(META) for t in fused["dt_proj"])))
    assert kscan.check_selective_scan_update_args(**meta) == (2, 12, 8)


# ---- the device check ----------------------------------------------------------------------------------------------
def test_require_cuda():
    with pytest.raises(RuntimeError, match="conv1d_int8: qx must be a CUDA tensor, got one on cpu.*backend='torch'"):
        checks.require_cuda("conv1d_int8", "qx", i8(2, 3, 4))
    # the device comparison, with a stand-in for a CUDA tensor (this machine may have none)
    gpu0 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    checks.require_cuda("op", "x", gpu0, a=gpu0, b=None)
    with pytest.raises(RuntimeError, match=r"op: b is on cpu but x is on cuda:0; move it with .to\(x.device\)"):
        checks.require_cuda("op", "x", gpu0, a=gpu0, b=torch.zeros(1))
    with pytest.raises(RuntimeError, match="a is on cuda:1 but x is on cuda:0"):
        checks.require_cuda("op", "x", gpu0, a=gpu1)


# ---- the wrappers check first ----------------------------------------------------------------------------------------
WRAPPER_CALLS = {
    "conv1d_int8": (kconv.conv1d_int8, conv_args, "qw", i8(6, 1, 5), "K = 5"),
    "conv1d_int8_update": (kconv.conv1d_int8_update, conv_update_args, "conv_state", i8(2, 6, 3), "conv_state"),
    "add_rmsnorm_quant": (lambda **a: knorm.add_rmsnorm_quant(eps=1e-5, residual_in_fp32=True, **a), norm_args,
                          "weight", torch.ones(31, dtype=torch.float16), "weight must be"),
    "w8a8_gemv": (klinear.w8a8_gemv, linear_args, "qw", i8(48, 40), "qw"),
    "selective_scan_int8": (kscan.selective_scan_int8, scan_args, "A", torch.ones(12, 4), "A must have shape"),
    "selective_scan_int8_update": (kscan.selective_scan_int8_update, scan_update_args, "state", torch.zeros(2, 12, 3),
                                   "state must have shape"),
}


@pytest.mark.parametrize("name", list(WRAPPER_CALLS))
def test_wrappers_check_before_loading(name):
    """A bad argument is a Python error before the extension is built or called (here, where it cannot build, it is
    not a KernelsUnavailable); valid CPU arguments get past the checks and stop at the build (no CUDA here) or at
    the device check (on a GPU machine), both RuntimeErrors that point to backend='torch'."""
    fn, make, key, bad, match = WRAPPER_CALLS[name]
    with pytest.raises(ValueError, match=match):
        fn(**dict(make(), **{key: bad}))
    with pytest.raises(RuntimeError, match="backend='torch'"):
        fn(**make())


def test_gemm_wrapper_checks_before_the_device():
    with pytest.raises(ValueError, match="w_scale must have 1"):
        klinear.w8a8_gemm(**dict(linear_args(), w_scale=torch.ones(3)))


# ---- the Python limits are the kernels' -----------------------------------------------------------------------------
@pytest.mark.skipif(not CSRC.is_dir(), reason="csrc/ is not beside the package (non-editable install)")
def test_limits_match_csrc():
    def const(path, name):
        m = re.search(rf"constexpr int {name} = (\d+)", (CSRC / path).read_text())
        assert m, f"{name} not found in {path}"
        return int(m.group(1))

    assert kconv.MAX_TAPS == const("conv1d/conv1d_update.cuh", "kMaxTaps")  # shared by the update and the GEMV
    assert kconv.MAX_OUTS == const("conv1d/conv1d_update.cuh", "kMaxOuts")
    per_thread = const("norm/add_rmsnorm_quant.cu", "kPerThread")
    assert knorm.MAX_D == per_thread * const("norm/add_rmsnorm_quant.cu", "kMaxThreads")
    assert klinear.GEMV_MAX_ROWS == const("linear/gemv_int8.cu", "kMaxM")
    assert kscan.MAX_STATE == const("selective_scan/selective_scan_int8.cu", "kMaxState")


@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scan_wrappers_hand_the_op_A_D_and_biases_as_fp32_tensors(monkeypatch, update, dtype):
    """What the wrappers pass torch.ops.qmamba (the op recorded, not run): A, D, delta_bias and the initial state as
    fp32 tensors of their values, never None (an fp32 A was once passed as None and the op refused it on the GPU)."""
    seen = {}
    monkeypatch.setattr(kscan, "load", lambda: None)
    monkeypatch.setattr(kscan, "require_cuda", lambda *a, **k: None)
    names = ["selective_scan_int8_update" if update else "selective_scan_int8"]
    fake = types.SimpleNamespace(**{n: lambda *args: (seen.setdefault("args", args), None) for n in names})
    monkeypatch.setattr(kscan.torch, "ops", types.SimpleNamespace(qmamba=fake))
    a = scan_update_args() if update else scan_args()
    for k in ("A", "D", "delta_bias") + (() if update else ("initial_state",)):
        a[k] = (a[k] + torch.rand_like(a[k])).to(dtype)
    (kscan.selective_scan_int8_update if update else kscan.selective_scan_int8)(**a)
    args = seen["args"][1:] if update else seen["args"]
    got = {"A": args[4], "D": args[9], "delta_bias": args[12]} | ({} if update else {"initial_state": args[15]})
    for k, t in got.items():
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32, k
        assert torch.equal(t, a[k].float()), k


def test_scan_update_wrapper_hands_the_op_the_fused_dt_proj(monkeypatch):
    """With dt_proj (the op recorded, not run): delta None, then dt, dt_scale, dt_weight, dt_weight_scale, dt_bias
    last, in the op's schema order (qmamba.kernels.schemas); dt as the strided view it is (its last dim contiguous:
    no copy), a transposed dt made contiguous, scales and bias flat fp32; without dt_proj the five are None."""
    from qmamba.kernels.schemas import check_call, op_schemas

    seen = {}
    monkeypatch.setattr(kscan, "load", lambda: None)
    monkeypatch.setattr(kscan, "require_cuda", lambda *a, **k: None)
    fake = types.SimpleNamespace(selective_scan_int8_update=lambda *args: seen.setdefault("args", args))
    monkeypatch.setattr(kscan.torch, "ops", types.SimpleNamespace(qmamba=fake))
    names = [n for _, n in op_schemas()["selective_scan_int8_update"]]
    a = dt_proj_update_args()
    proj = a["dt_proj"]._replace(weight_scale=a["dt_proj"].weight_scale[:, None], bias=a["dt_proj"].bias.half())
    kscan.selective_scan_int8_update(**dict(a, dt_proj=proj))
    args = dict(zip(names, seen["args"]))
    check_call("selective_scan_int8_update", seen["args"])
    assert args["delta"] is None
    assert args["dt"] is proj.q and args["dt_weight"] is proj.weight  # no copies
    assert args["dt_scale"].dtype == torch.float32 and args["dt_scale"].numel() == 1
    assert args["dt_weight_scale"].shape == (12,) and torch.equal(args["dt_weight_scale"], proj.weight_scale[:, 0])
    assert args["dt_bias"].dtype == torch.float32 and torch.equal(args["dt_bias"], proj.bias.float())
    seen.clear()
    transposed = proj._replace(q=i8(48, 2).t())
    kscan.selective_scan_int8_update(**dict(a, dt_proj=transposed))
    assert dict(zip(names, seen["args"]))["dt"].stride() == (48, 1)
    seen.clear()
    kscan.selective_scan_int8_update(**scan_update_args())
    args = dict(zip(names, seen["args"]))
    check_call("selective_scan_int8_update", seen["args"])
    assert isinstance(args["delta"], torch.Tensor)
    assert all(args[k] is None for k in ("dt", "dt_scale", "dt_weight", "dt_weight_scale", "dt_bias"))
