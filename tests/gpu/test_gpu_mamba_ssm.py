"""On a CUDA GPU: our LM against mamba_ssm's MambaLMHeadModel with the same weights, our reference ops against the
mamba_ssm / causal_conv1d kernels (outputs and input gradients), and one bf16-autocast training step.

Every test here is marked ``gpu`` (skipped without CUDA by tests/conftest.py) and imports mamba_ssm inside the test
(skipped when it is not installed), so collecting this file on a CPU machine imports nothing from mamba_ssm.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from qmamba import MambaConfig, MambaLM, set_backend
from qmamba.ops import (causal_conv1d_ref, gated_rms_norm_ref, rms_norm_ref, selective_scan_ref, ssd_chunk_scan_ref,
                        ssd_loop_ref)
from qmamba.ops.backend import try_import

pytestmark = pytest.mark.gpu

# All errors are max|ours - theirs| / max|theirs| (relative to the largest magnitude of the kernel's tensor); for
# gradients the denominator is at least GRAD_ABS_FLOOR, because a gradient that is zero in exact arithmetic (dA of the
# selective scan at L = 1: there is no previous state) comes back from the bf16 kernel as ~1e-7 rounding noise.
LOGITS_RTOL_FP32 = 1e-3  # whole LM, fp32, 4 layers, L = 300
SCAN_RTOL_FP32 = 1e-3  # selective scan outputs, last states and input gradients, fp32 inputs (measured: <= 2e-5)
SCAN_RTOL_BF16 = 3e-2  # bf16 inputs and outputs (measured: <= 7e-3)
SCAN_GRAD_RTOL_BF16 = 6e-2
# SSD, fp32: mamba_ssm's Triton kernel computes its fp32 tl.dot products in TF32 by default: it differs from the fp32
# sequential loop by ~2e-3 (outputs, states and gradients) where our reference differs by < 1e-6 (H200, 2026-11-21).
SSD_RTOL_FP32 = 5e-3
SSD_REF_VS_LOOP_RTOL = 1e-5  # our chunked reference vs the sequential loop, same GPU inputs
NORM_RTOL_FP32 = 1e-4  # (gated) RMSNorm, fp32
NORM_RTOL_BF16 = 2e-2
CONV_RTOL_FP32 = 1e-4
TRAIN_LOSS_ATOL = 2e-2  # one bf16-autocast step: loss with kernels vs loss with the references
GRAD_ABS_FLOOR = 1e-4

DEVICE = "cuda"

MAMBA1 = MambaConfig(d_model=256, n_layer=4, vocab_size=256)
MAMBA2 = MambaConfig(d_model=256, n_layer=4, vocab_size=256, layer="Mamba2", d_state=64, headdim=64, ngroups=2)


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 1e-30) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp_min(floor)).item()


def _leaves(tensors: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
            for k, v in tensors.items()}


def _grads(leaves: dict) -> dict:
    return {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def _assert_norm_matches_kernel(ref, kernel, inputs: dict, dtype, rtol: float) -> None:
    """Outputs and input gradients (under a fixed linear loss) of ``ref`` and ``kernel`` agree within ``rtol``."""
    results = []
    for fn in (ref, kernel):
        leaves = _leaves(inputs)
        out = fn(**leaves)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape)).sum().backward()
        results.append((out, _grads(leaves)))
    (out, grads), (out_k, grads_k) = results
    assert out.dtype == out_k.dtype == dtype
    assert _rel_err(out, out_k) <= rtol
    for name in grads:
        assert _rel_err(grads[name], grads_k[name], GRAD_ABS_FLOOR) <= rtol, name


def _torch_causal_conv1d_fn(x, weight, bias=None, activation=None, **_):
    return causal_conv1d_ref(x, weight, bias, activation)


def _mamba_ssm_model(cfg: MambaConfig, monkeypatch) -> torch.nn.Module:
    """mamba_ssm's MambaLMHeadModel for ``cfg`` (fp32, on the GPU).

    Without the causal_conv1d package, mamba_ssm's Mamba2 cannot run its fused path (it calls causal_conv1d's CUDA
    op), so it runs its unfused path (use_mem_eff_path=False) with a torch conv in place of causal_conv1d_fn; the
    conv itself is checked against its definition in tests/ops/test_ops_conv_norm.py. Mamba1 falls back by itself.
    """
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    from mamba_ssm.models.config_mamba import MambaConfig as MambaSsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    config = cfg.to_mamba_ssm()
    if cfg.layer == "Mamba2" and try_import("causal_conv1d") is None:
        import mamba_ssm.modules.mamba2 as mamba2_module

        config["ssm_cfg"]["use_mem_eff_path"] = False
        monkeypatch.setattr(mamba2_module, "causal_conv1d_fn", _torch_causal_conv1d_fn)
    return MambaLMHeadModel(MambaSsmConfig(**config), device=DEVICE, dtype=torch.float32)


# ---------------------------------------------------------------------------------------- (a) whole LM vs mamba_ssm


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("cfg", [MAMBA1, MAMBA2], ids=["Mamba1", "Mamba2"])
def test_lm_matches_mamba_ssm(cfg, backend, monkeypatch):
    theirs = _mamba_ssm_model(cfg, monkeypatch).eval()
    ours = MambaLM(cfg).to(DEVICE).eval()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_state.items()} == {k: tuple(v.shape) for k, v in theirs_state.items()}
    theirs.load_state_dict(ours_state, strict=True)
    set_backend(ours, backend)
    ids = torch.randint(0, cfg.vocab_size, (2, 300), device=DEVICE)
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (2, 300, cfg.padded_vocab_size)
    assert _rel_err(got, want) <= LOGITS_RTOL_FP32


@pytest.mark.parametrize("cfg", [MAMBA1, MAMBA2], ids=["Mamba1", "Mamba2"])
def test_auto_backend_calls_the_kernels(cfg, monkeypatch):
    """On CUDA, backend "auto" goes through mamba_ssm's kernels and "torch" through none of them."""
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    targets = {"mamba_ssm.ops.triton.layer_norm": "rms_norm_fn"}
    if cfg.layer == "Mamba1":
        targets["mamba_ssm.ops.selective_scan_interface"] = "selective_scan_fn"
    else:
        targets["mamba_ssm.ops.triton.ssd_combined"] = "mamba_chunk_scan_combined"
        targets["mamba_ssm.ops.triton.layernorm_gated"] = "rmsnorm_fn"
    calls = {}
    for module_name, fn_name in targets.items():
        module = try_import(module_name)
        assert module is not None, module_name

        def counted(*args, _fn=getattr(module, fn_name), _name=fn_name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, counted)
    model = MambaLM(cfg).to(DEVICE).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device=DEVICE)
    with torch.no_grad():
        set_backend(model, "torch")(ids)
        assert calls == {}
        set_backend(model, "auto")(ids)
    assert set(calls) == set(targets.values())


# ------------------------------------------------------------------------------------------- (b) ops vs kernels


def _selective_scan_inputs(L, dtype, groups=None, batch=2, dim=64, dstate=16):
    bc = (batch, dstate, L) if groups is None else (batch, groups, dstate, L)
    return dict(
        u=torch.randn(batch, dim, L, device=DEVICE, dtype=dtype),
        delta=0.5 * torch.rand(batch, dim, L, device=DEVICE, dtype=dtype),
        A=-0.5 * torch.rand(dim, dstate, device=DEVICE),  # weights stay fp32, as in the model
        B=torch.randn(bc, device=DEVICE, dtype=dtype),
        C=torch.randn(bc, device=DEVICE, dtype=dtype),
        D=torch.randn(dim, device=DEVICE),
        z=torch.randn(batch, dim, L, device=DEVICE, dtype=dtype),
        delta_bias=0.5 * torch.rand(dim, device=DEVICE),
    )


@pytest.mark.parametrize("L", [1, 33, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [None, 2], ids=["B3d", "B4d-g2"])
def test_selective_scan_matches_kernel(groups, dtype, L):
    ssi = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    inputs = _selective_scan_inputs(L, dtype, groups)
    rtol = SCAN_RTOL_FP32 if dtype == torch.float32 else SCAN_RTOL_BF16
    grad_rtol = SCAN_RTOL_FP32 if dtype == torch.float32 else SCAN_GRAD_RTOL_BF16
    results = []
    for fn in (selective_scan_ref, ssi.selective_scan_fn):
        leaves = _leaves(inputs)
        y, last = fn(**leaves, delta_softplus=True, return_last_state=True)
        # mamba_ssm's backward takes no gradient through the last state, so the loss uses y only
        (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum().backward()
        results.append((y, last, _grads(leaves)))
    (y, last, grads), (y_k, last_k, grads_k) = results
    assert y.dtype == y_k.dtype == dtype
    assert _rel_err(y, y_k) <= rtol
    assert _rel_err(last, last_k) <= rtol
    assert grads.keys() == grads_k.keys() == inputs.keys()
    for name in grads:
        assert grads[name].dtype == grads_k[name].dtype, name
        assert _rel_err(grads[name], grads_k[name], GRAD_ABS_FLOOR) <= grad_rtol, name


def _ssd_inputs(L, batch=2, nheads=8, headdim=32, ngroups=2, dstate=32):
    return dict(
        x=torch.randn(batch, L, nheads, headdim, device=DEVICE),
        dt=torch.randn(batch, L, nheads, device=DEVICE) - 1.0,  # raw: softplus(dt + dt_bias) applied inside
        A=-torch.exp(torch.rand(nheads, device=DEVICE) * 2.7),  # -(1 .. 16), as A_log's init range
        B=torch.randn(batch, L, ngroups, dstate, device=DEVICE),
        C=torch.randn(batch, L, ngroups, dstate, device=DEVICE),
        D=torch.randn(nheads, device=DEVICE),
        z=torch.randn(batch, L, nheads, headdim, device=DEVICE),
        dt_bias=0.5 * torch.rand(nheads, device=DEVICE),
        initial_states=torch.randn(batch, nheads, headdim, dstate, device=DEVICE),
    )


@pytest.mark.parametrize("L", [1, 100, 512])
def test_ssd_matches_kernel(L):
    ssd = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined")
    inputs = _ssd_inputs(L)
    results = []
    for fn in (ssd_chunk_scan_ref, ssd.mamba_chunk_scan_combined):
        leaves = _leaves(inputs)
        y, final = fn(chunk_size=64, dt_softplus=True, return_final_states=True, **leaves)
        w = torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)
        ((y * w).sum() + final.pow(2).sum() * 1e-2).backward()
        results.append((y, final, _grads(leaves)))
    (y, final, grads), (y_k, final_k, grads_k) = results
    assert y.shape == y_k.shape and final.shape == final_k.shape
    assert _rel_err(y, y_k) <= SSD_RTOL_FP32
    assert _rel_err(final, final_k) <= SSD_RTOL_FP32
    assert grads.keys() == grads_k.keys() == inputs.keys()
    for name in grads:
        assert _rel_err(grads[name], grads_k[name], GRAD_ABS_FLOOR) <= SSD_RTOL_FP32, name
    # the looser tolerance is the kernel's: our reference agrees with the sequential loop far more closely
    no_init = {k: v for k, v in inputs.items() if k != "initial_states"}
    y0 = ssd_chunk_scan_ref(chunk_size=64, dt_softplus=True, **no_init)
    assert _rel_err(y0, ssd_loop_ref(dt_softplus=True, **no_init)) <= SSD_REF_VS_LOOP_RTOL


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_kernel(activation):
    cc = pytest.importorskip("causal_conv1d")  # an optional extra: often absent on the device
    inputs = dict(x=torch.randn(2, 64, 100, device=DEVICE), weight=torch.randn(64, 4, device=DEVICE),
                  bias=torch.randn(64, device=DEVICE))
    results = []
    for fn in (causal_conv1d_ref, cc.causal_conv1d_fn):
        leaves = _leaves(inputs)
        out = fn(leaves["x"], leaves["weight"], leaves["bias"], activation=activation)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape)).sum().backward()
        results.append((out, _grads(leaves)))
    (out, grads), (out_k, grads_k) = results
    assert _rel_err(out, out_k) <= CONV_RTOL_FP32
    for name in grads:
        assert _rel_err(grads[name], grads_k[name], GRAD_ABS_FLOOR) <= CONV_RTOL_FP32, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_matches_kernel(dtype):
    ln = pytest.importorskip("mamba_ssm.ops.triton.layer_norm")
    inputs = dict(x=3 * torch.randn(4, 100, 256, device=DEVICE, dtype=dtype),
                  weight=1 + 0.1 * torch.randn(256, device=DEVICE))
    rtol = NORM_RTOL_FP32 if dtype == torch.float32 else NORM_RTOL_BF16
    _assert_norm_matches_kernel(lambda x, weight: rms_norm_ref(x, weight, eps=1e-5),
                                lambda x, weight: ln.rms_norm_fn(x, weight, None, eps=1e-5), inputs, dtype, rtol)


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_rms_norm_matches_kernel(group_size, norm_before_gate, dtype):
    lng = pytest.importorskip("mamba_ssm.ops.triton.layernorm_gated")
    inputs = dict(x=2 * torch.randn(4, 100, 256, device=DEVICE, dtype=dtype),
                  z=torch.randn(4, 100, 256, device=DEVICE, dtype=dtype),
                  weight=1 + 0.1 * torch.randn(256, device=DEVICE))
    rtol = NORM_RTOL_FP32 if dtype == torch.float32 else NORM_RTOL_BF16
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    _assert_norm_matches_kernel(lambda x, z, weight: gated_rms_norm_ref(x, weight, z, **kw),
                                lambda x, z, weight: lng.rmsnorm_fn(x, weight, None, z=z, **kw), inputs, dtype, rtol)


# ------------------------------------------------------------------------------------ (c) one bf16 training step


@pytest.mark.parametrize("cfg", [MAMBA1, MAMBA2], ids=["Mamba1", "Mamba2"])
def test_bf16_autocast_train_step_kernels_vs_references(cfg):
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    base = MambaLM(cfg).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 257), device=DEVICE)
    losses = {}
    for backend in ("auto", "torch"):
        model = set_backend(copy.deepcopy(base), backend).train()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (backend, name)
        opt.step()
        assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters()), backend
        assert torch.isfinite(loss), backend
        losses[backend] = loss.item()
    assert abs(losses["auto"] - losses["torch"]) <= TRAIN_LOSS_ATOL
    # a fresh model predicts roughly uniformly over the padded vocabulary
    assert abs(losses["torch"] - torch.log(torch.tensor(float(cfg.padded_vocab_size))).item()) < 1.0
