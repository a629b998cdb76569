"""Decoding with the recurrent cache: every part's one-token ``step``, ``prefill`` filling the cache, ``generate`` and
``DecodeGraph`` (eager here; the CUDA graph is tested in tests/gpu/test_gpu_generation.py), and the generate.py CLI.

The invariant: ``prefill(prompt)`` then ``step(token)`` per token gives the logits ``forward(prompt + tokens)`` gives
at those positions, for Mamba1 and Mamba2, in every mode.

Tolerances:
- fp (fp32): rtol 1e-4, atol 1e-5. The chunked scans of forward and the step's recurrence sum in different orders
  (measured: ~2e-7 of the largest logit).
- fakequant and int8: relative L2 of the logit difference <= 5e-3. The step's scan sums in another order than the
  chunked forward, so a code at a rounding boundary may flip by 1 LSB (DESIGN §3 allows it); one flip moved the
  logits of a d_model-128 Mamba2 by 2e-3, while quantization itself moves them by ~3e-2 (asserted > 3x the tolerance).
  On CPU the tiny models' int8 logits come out bit-identical in practice (the integer GEMMs and convs are exact and
  the conv state holds the codes the prefill summed), fakequant within ~4e-7.
- The int8 conv step and the int8 linear step are integer-exact: torch.equal with forward.
"""

from __future__ import annotations

import copy
import functools
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qmamba
from qmamba.generation import DecodeGraph, InferenceCache, generate, sample
from qmamba.lightning.checkpoint import checkpoint_entry
from qmamba.models import MambaLM
from qmamba.models.parts import CausalConv1d, SelectiveScan, SSDScan
from qmamba.ops import selective_scan_loop_ref
from qmamba.qnn import QuantLinear, QuantTwin, calibrate, convert, prepare, set_mode
from qmamba.quant.numerics import quantize

ROOT = Path(__file__).resolve().parents[1]
FP_RTOL, FP_ATOL = 1e-4, 1e-5
# prefill + steps vs forward, relative to the logits: int8 runs integer sums (exact: 0 measured); fakequant's steps
# sum the conv window in another order than the forward's float conv, so a code can flip downstream (tiny qat_w8a8
# measured 0.0049-0.0050 on one CPU, 0 on others); either stays well below what quantization changes (>= 0.026)
QUANT_REL = {"int8": 5e-3, "converted": 5e-3, "fakequant": 1e-2}

# (preset, overrides, recipe): Mamba1 per-tensor (rotated out_proj), Mamba2 per-head x and per-group B / C with two
# groups, and the QAT recipe (per-channel weights, learnable scales) on both mixers
CASES = [("tiny", {}, "quamba_w8a8"), ("tiny-mamba2", {"ngroups": 2}, "quamba2_w8a8"), ("tiny", {}, "qat_w8a8"),
         ("tiny-mamba2", {}, "qat_w8a8")]


def _ids(batch=2, L=24, seed=1):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _calibrated_model(name: str, overrides: tuple, recipe: str) -> MambaLM:
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset(name, **dict(overrides))).eval(), recipe)
    calibrate(model, [_ids(seed=s) for s in (10, 11, 12)], progress=False)
    return model


def _model(name, overrides, recipe, mode) -> MambaLM:
    """A fresh copy of a calibrated model in ``mode``; "converted" = int8 weights (qmamba.qnn.convert)."""
    model = copy.deepcopy(_calibrated_model(name, tuple(sorted(overrides.items())), recipe))
    return convert(model) if mode == "converted" else set_mode(model, mode)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _prefill_then_steps(model, ids, P):
    cache = model.allocate_cache(ids.shape[0])
    pre = model.prefill(ids[:, :P], cache)
    return pre, torch.stack([model.step(ids[:, t], cache) for t in range(P, ids.shape[1])], 1)


# ---- parts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [1, 2, 7])
def test_conv_prefill_then_step_is_forward(P):
    conv = CausalConv1d(6, 4)
    x = torch.randn(2, 6, 12)
    state = conv.allocate_state(2, dtype=torch.float32)
    with torch.no_grad():
        full = conv(x)
        pre = conv.prefill(x[..., :P], state)
        k = 4
        expected_state = torch.nn.functional.pad(x[..., :P], (k, 0))[..., -k:]  # zeros before t = 0
        assert torch.equal(state, expected_state)
        steps = torch.stack([conv.step(x[..., t], state) for t in range(P, 12)], -1)
    torch.testing.assert_close(pre, full[..., :P], rtol=FP_RTOL, atol=FP_ATOL)
    torch.testing.assert_close(steps, full[..., P:], rtol=FP_RTOL, atol=FP_ATOL)


def test_selective_scan_prefill_state_and_steps():
    b, d, n, L, P = 2, 8, 4, 20, 9
    scan = SelectiveScan(d, n)
    u, delta, z = torch.randn(b, d, L), torch.randn(b, d, L) - 1, torch.randn(b, d, L)
    B, C = torch.randn(b, n, L), torch.randn(b, n, L)
    A_log, D = torch.rand(d, n).log1p(), torch.randn(d)
    full = scan(u, delta, A_log, B, C, D, z)
    state = torch.zeros(b, d, n)
    pre = scan.prefill(state, u[..., :P], delta[..., :P], A_log, B[..., :P], C[..., :P], D, z[..., :P])
    _, last = selective_scan_loop_ref(u[..., :P], delta[..., :P], -torch.exp(A_log), B[..., :P], C[..., :P], D=D,
                                      z=z[..., :P], delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(state, last, rtol=FP_RTOL, atol=FP_ATOL)
    steps = torch.stack([scan.step(state, u[..., t], delta[..., t], A_log, B[..., t], C[..., t], D, z[..., t])
                         for t in range(P, L)], -1)
    torch.testing.assert_close(pre, full[..., :P], rtol=FP_RTOL, atol=FP_ATOL)
    torch.testing.assert_close(steps, full[..., P:], rtol=FP_RTOL, atol=FP_ATOL)


def test_ssd_scan_prefill_then_steps_across_chunks():
    b, L, h, p, g, n, P = 2, 19, 4, 3, 2, 5, 10  # chunk 4: the prefill ends inside a chunk
    scan = SSDScan(4, h, g)
    x, dt = torch.randn(b, L, h, p), torch.randn(b, L, h) - 1
    B, C = torch.randn(b, L, g, n), torch.randn(b, L, g, n)
    A_log, D, dt_bias = torch.rand(h).log1p(), torch.randn(h), torch.randn(h) * 0.1
    full = scan(x, dt, A_log, B, C, D, dt_bias)
    state = torch.zeros(b, h, p, n)
    pre = scan.prefill(state, x[:, :P], dt[:, :P], A_log, B[:, :P], C[:, :P], D, dt_bias)
    steps = torch.stack([scan.step(state, x[:, t], dt[:, t], A_log, B[:, t], C[:, t], D, dt_bias)
                         for t in range(P, L)], 1)
    torch.testing.assert_close(pre, full[:, :P], rtol=FP_RTOL, atol=FP_ATOL)
    torch.testing.assert_close(steps, full[:, P:], rtol=FP_RTOL, atol=FP_ATOL)


def _conv_inputs(model, ids):
    """The first conv1d twin and the input it sees in a forward of ``ids``."""
    conv = model.backbone.layers[0].mixer.conv1d
    model.backbone.layers[0].mixer.in_proj.emit_codes = False  # in_proj hands the conv its float output, to see
    seen = []
    handle = conv.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return conv, seen[0]


@pytest.mark.parametrize("name, overrides, recipe", CASES[:2])
def test_int8_conv_state_holds_codes_and_step_is_integer_exact(name, overrides, recipe):
    model = _model(name, overrides, recipe, "int8")
    conv, x = _conv_inputs(model, _ids(L=16, seed=7))  # (B, D, L) float inputs at the real scale
    state = conv.allocate_state(2, dtype=x.dtype)
    assert state.dtype == torch.int8
    with torch.no_grad():
        full = conv(x)
        conv.prefill(x[..., :5], state)
        codes = quantize(x, conv.quant_points["input"].scale)
        assert torch.equal(state, codes[..., 1:5])
        for t in range(5, 16):
            assert torch.equal(conv.step(x[..., t], state), full[..., t]), t
    assert torch.equal(state, codes[..., -4:])


@pytest.mark.parametrize("name, overrides, recipe", CASES[:2])
def test_int8_linear_step_is_forward_on_one_token(name, overrides, recipe):
    model = _model(name, overrides, recipe, "converted")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and any(m.rotated for m in linears)
    for lin in linears:
        x = torch.randn(3, lin.in_features)
        with torch.no_grad():
            assert torch.equal(lin.step(x), lin(x.unsqueeze(1)).squeeze(1))


# ---- the model: prefill + steps == forward ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fp", "fakequant", "int8", "converted"])
@pytest.mark.parametrize("name, overrides, recipe", CASES)
def test_prefill_then_step_matches_forward(name, overrides, recipe, mode):
    model = _model(name, overrides, recipe, mode)
    ids = _ids(L=30, seed=3)
    with torch.no_grad():
        ref = model(ids)
    for P in (1, 3, 17):  # shorter than d_conv (the conv state is zero-padded), and longer
        pre, steps = _prefill_then_steps(model, ids, P)
        assert pre.shape == (2, P, ref.shape[-1]) and steps.shape == (2, 30 - P, ref.shape[-1])
        if mode == "fp":
            torch.testing.assert_close(pre, ref[:, :P], rtol=FP_RTOL, atol=FP_ATOL)
            torch.testing.assert_close(steps, ref[:, P:], rtol=FP_RTOL, atol=FP_ATOL)
        else:
            tol = QUANT_REL[mode]
            assert _rel(pre, ref[:, :P]) <= tol and _rel(steps, ref[:, P:]) <= tol, (P, mode)
    if mode in ("fakequant", "int8"):  # the tolerance is well below what quantization changes
        assert _rel(_prefill_then_steps(set_mode(model, "fp"), ids, 17)[1], steps) > 2.5 * QUANT_REL[mode]


def test_prefill_replaces_what_the_cache_held():
    model = _model("tiny", {}, "quamba_w8a8", "int8")
    ids = _ids(L=12, seed=4)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model.prefill(_ids(L=9, seed=5), cache)
        model.step(ids[:, 0], cache)
        model.prefill(ids[:, :6], cache)
        again = model.step(ids[:, 6], cache)
        fresh = _prefill_then_steps(model, ids[:, :7], 6)[1][:, 0]
    assert torch.equal(again, fresh)


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (``.item()``, ``bool(t)``): not allowed in a CUDA graph."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["fp", "fakequant", "int8", "converted"])
@pytest.mark.parametrize("name, overrides, recipe", CASES[:2])
def test_step_reads_no_tensor_on_the_host_on_a_gpu(name, overrides, recipe, mode, monkeypatch):
    """The step a CUDA graph captures must not read tensors on the host. Here on CPU, with the two CPU-only checks
    switched to what a GPU runs (the scale readiness check, ``QuantTwin._step_scale``; the scale value check,
    ``numerics._cheap_check``), a step must read none."""
    from qmamba.qnn import modules
    from qmamba.quant import numerics

    model = _model(name, overrides, recipe, mode)
    cache = model.allocate_cache(2)
    token = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        model.prefill(_ids(L=5), cache)
        if mode != "fp":
            with HostReads() as reads:  # the detector works: on CPU the checks do read
                model.step(token, cache)
            assert reads.count > 0
        monkeypatch.setattr(QuantTwin, "_step_scale", lambda self, qp, x: modules.scale_without_sync(qp, x))
        monkeypatch.setattr(numerics, "_cheap_check", lambda scale: None)
        with HostReads() as reads:
            model.step(token, cache)
    assert reads.count == 0


def test_cache_errors_name_the_fix():
    model = _model("tiny", {}, "quamba_w8a8", "fp")
    cache = model.allocate_cache(2)
    assert isinstance(cache, InferenceCache) and cache.batch_size == 2
    assert [t.dtype for t in cache.tensors()] == [torch.float32] * 4
    with torch.no_grad():
        model.prefill(_ids(L=4), cache)
        set_mode(model, "int8")  # the int8 conv keeps codes: this float cache no longer fits
        with pytest.raises(ValueError, match="allocate the cache after set_mode"):
            model.step(torch.zeros(2, dtype=torch.long), cache)
        int8_cache = model.allocate_cache(2)
        assert int8_cache.layers[0].conv_state.dtype == torch.int8
        assert int8_cache.layers[0].ssm_state.dtype == torch.float32
        with pytest.raises(ValueError, match=r"allocate_cache\(3\)"):
            model.prefill(_ids(batch=3, L=4), int8_cache)
        with pytest.raises(ValueError, match=r"allocate_cache\(1\)"):
            model.step(torch.zeros(1, 1, dtype=torch.long), int8_cache)


def test_cache_layout_is_mamba_ssm_s():
    m1 = MambaLM(qmamba.preset("tiny"))
    m2 = MambaLM(qmamba.preset("tiny-mamba2", ngroups=2))
    c1, c2 = m1.allocate_cache(3), InferenceCache.allocate(m2, 3)
    cfg1, cfg2 = m1.config, m2.config
    assert c1.layers[0].conv_state.shape == (3, cfg1.d_inner, cfg1.d_conv)
    assert c1.layers[0].ssm_state.shape == (3, cfg1.d_inner, cfg1.d_state)
    conv_dim = cfg2.d_inner + 2 * cfg2.ngroups * cfg2.d_state
    assert c2.layers[0].conv_state.shape == (3, conv_dim, cfg2.d_conv)
    assert c2.layers[0].ssm_state.shape == (3, cfg2.nheads, cfg2.headdim, cfg2.d_state)
    assert len(c1.layers) == cfg1.n_layer


# ---- generate ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def _rerun_greedy(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1, :model.config.vocab_size].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("mode", ["fp", "fakequant", "int8"])
@pytest.mark.parametrize("name, overrides, recipe", CASES[:2])
def test_greedy_generate_matches_rerunning_the_model(name, overrides, recipe, mode):
    model = _model(name, overrides, recipe, mode)
    prompt = _ids(batch=3, L=5, seed=8)
    out = generate(model, prompt, 10)
    assert out.shape == (3, 15) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, _rerun_greedy(model, prompt, 10))


def test_sampling_is_reproducible_and_respects_the_cuts():
    model = _model("tiny", {}, "quamba_w8a8", "fp")
    prompt = _ids(batch=4, L=3, seed=9)

    def run(seed, **kw):
        return generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert torch.equal(run(3, top_k=1), generate(model, prompt, 12))  # one candidate: greedy
    assert torch.equal(run(3, top_p=1e-6), generate(model, prompt, 12))  # nucleus of one: greedy
    assert torch.equal(run(3, top_p=1.0), run(3))  # no cut


def test_sample_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]))  # column 4: padding beyond vocab 4
    seen = {int(sample(logits, 4, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: the rest is cut
    seen = {int(sample(logits, 4, 1.0, top_p=0.81, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1, 2}
    assert int(sample(logits + torch.tensor([[0, 0, 0, 0, 100.0]]), 4)) == 0  # padding never wins


def test_eos_pads_finished_rows_and_stops_when_all_are_done():
    model = _model("tiny", {}, "quamba_w8a8", "fp")
    prompt = _ids(batch=2, L=4, seed=11)
    free = generate(model, prompt, 8)
    eos = int(free[0, 6])  # row 0 emits it at its 3rd new token
    out = generate(model, prompt, 8, eos_id=eos)
    first = [int((row[4:] == eos).nonzero()[0]) if (row[4:] == eos).any() else None for row in free]
    for r, f in enumerate(first):
        if f is None:
            assert torch.equal(out[r], free[r])
        else:
            assert torch.equal(out[r, :5 + f], free[r, :5 + f]) and (out[r, 5 + f:] == eos).all()
    single = generate(model, prompt[:1], 8, eos_id=eos)
    assert single.shape[1] == 4 + first[0] + 1  # stopped at its eos


def test_generate_argument_errors():
    model = _model("tiny", {}, "quamba_w8a8", "fp")
    prompt = _ids(batch=1, L=3)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(model, prompt, 4, cuda_graph=True)
    for kw, match in ((dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                      (dict(eos_id=256), "eos_id")):
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, 4, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match=r"\(batch, L\)"):
        generate(model, prompt[:, :0], 4)
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_timings_and_decode_graph_on_cpu():
    model = _model("tiny-mamba2", {}, "qat_w8a8", "int8")
    timings = {}
    out = generate(model, _ids(batch=2, L=4), 6, cuda_graph=False, timings=timings)
    assert out.shape == (2, 10) and timings["new_tokens"] == 6
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0
    decoder = DecodeGraph(model, 2)
    with pytest.raises(ValueError, match="cuda_graph=False"):
        decoder.capture()
    with pytest.raises(RuntimeError, match="capture"):
        decoder.replay()
    with torch.no_grad():
        ref = model(out)
    last = decoder.prefill(out[:, :4])
    assert last.shape == (2, ref.shape[-1]) and _rel(last, ref[:, 3]) <= QUANT_REL["int8"]
    assert _rel(decoder.step(out[:, 4]), ref[:, 4]) <= QUANT_REL["int8"]


def test_model_generate_uses_the_cache_unless_the_context_window_cuts():
    model = _model("tiny", {}, "quamba_w8a8", "fp")
    calls = []
    handle = model.backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    prompt = _ids(batch=2, L=5, seed=12)
    cached = model.generate(prompt, 6, temperature=0)
    assert calls == [5]  # one prefill, then steps (not forward)
    calls.clear()
    assert torch.equal(model.generate(prompt, 6, temperature=0, context=10), cached)  # the window never cuts
    assert calls == [5]
    calls.clear()
    model.generate(prompt, 6, temperature=0, context=8)  # it would: the old windowed rerun
    handle.remove()
    assert calls == [5, 6, 7, 8, 8, 8]


# ---- generate.py ------------------------------------------------------------------------------------------------
def _save(model, path, **extra):
    ckpt = {"state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
            "qmamba": checkpoint_entry(model), **extra}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    fp = MambaLM(qmamba.preset("tiny-mamba2"))
    int8 = _model("tiny", {}, "quamba_w8a8", "converted")
    data = {"datamodule_hyper_parameters": {"tokenizer": "bytes", "seq_len": 64}}
    return {"fp": _save(fp, tmp / "fp.ckpt", **data), "int8": _save(int8, tmp / "int8.ckpt", **data),
            "model": int8}


def _cli():
    return runpy.run_path(str(ROOT / "generate.py"), run_name="generate_cli")["main"]


def test_cli_end_to_end_int8_greedy(checkpoints):
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(checkpoints["int8"]),
                        "--prompt", "ROMEO.", "--max-new-tokens", "12", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    from qmamba.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    expected = generate(checkpoints["model"], tok.encode_to_tensor("ROMEO.").unsqueeze(0), 12)
    assert r.stdout == tok.decode(expected[0]) + "\n"  # the int8 checkpoint, in int8 mode, greedy
    assert "tokens/s" in r.stderr and "int8" in r.stderr and "12 new tokens" in r.stderr


def test_cli_sampling_is_seeded_and_batched(checkpoints, capsys):
    main = _cli()
    argv = ["--checkpoint", str(checkpoints["fp"]), "--prompt", "To be", "--max-new-tokens", "20",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--batch", "2", "--mode", "1"]
    outs = []
    for seed in ("3", "3", "4"):
        main(argv + ["--seed", seed])
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out != outs[2].out
    assert outs[0].out.count("--- sequence") == 2 and "x 2 sequence(s)" in outs[0].err and "fp" in outs[0].err


@pytest.mark.parametrize("argv, error, match", [
    (["--mode", "int8"], ValueError, "--mode int8: .* runs in fp only"),
    (["--mode", "int4"], ValueError, "unknown mode"),
    (["--top-p", "0"], ValueError, "--top-p"),
    (["--batch", "0"], ValueError, "--batch"),
    (["--max-new-tokens", "-2"], ValueError, "--max-new-tokens"),
    (["--prompt", ""], ValueError, "--prompt"),
])
def test_cli_errors_name_the_flag(checkpoints, argv, error, match):
    base = {"--checkpoint": str(checkpoints["fp"]), "--prompt": "hi"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    with pytest.raises(error, match=match):
        _cli()([x for kv in base.items() for x in kv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cli_cuda_without_gpu_and_missing_checkpoint_exit_with_a_message(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="--device cuda"):
        _cli()(["--checkpoint", str(checkpoints["fp"]), "--prompt", "hi", "--device", "cuda"])
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tmp_path / "none.ckpt"),
                        "--prompt", "hi"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
