"""Host work of one training step: the aten ops and Triton launches the host dispatches for forward + backward, fp vs
fakequant (QAT) on the same model and batch. The QAT step on a GPU is launch-bound (benchmarks/RESULTS.md): every op
the host dispatches costs microseconds whether or not it moves data, so this count is what the fused fake-quant path
has to keep small. ``--int8``: the same for the int8 model's prefill (what TTFT waits on: the int8 prefill is
host-bound too) and one decode step, per layer, with the ops that read a tensor on the host (a GPU sync each).

    python benchmarks/host_ops.py --preset house-mamba1 --recipe qat_w8a8            # any machine
    python benchmarks/host_ops.py --preset house-mamba1 --recipe qat_w8a8 --top 30   # + the ops the QAT step adds
    python benchmarks/host_ops.py --preset mamba-130m --recipe quamba_w8a8 --int8 --top 20

On a GPU the step runs as it is (the fused kernels where ``backend`` picks them). On a CPU machine the fused
fake-quant and Hadamard path is forced (the dispatch that would pick it on a GPU answers yes) and each Triton launch
is counted instead of run ("dry": the values are garbage, so the scale checks that read values are off): the counts
are those of the GPU path's host side, without a GPU. Counts, not times: the GPU's per-op cost is in RESULTS.md.
With ``--int8`` on a CPU machine qmamba's CUDA ops (``torch.ops.qmamba.*``) and int8 Triton kernels are dry the
same way: the wrappers run their checks and conversions as on a GPU, then each op is counted and returns an empty
result of its shape (``dry_int8_kernels``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import inspect

import torch
import torch.nn.functional as F

from qmamba.kernels.stand_ins import gpu_path_on_cpu, rebound, use_triton_on_cpu


# keyword options of a Triton launch that are not kernel parameters
_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg", "grid", "warmup",
                   "debug", "launch_cooperative_grid", "launch_pdl"}


def _kernel_params(kernel) -> tuple[inspect.Signature | None, set]:
    """The Python signature of a Triton kernel (a JITFunction, or an Autotuner around one) and the parameters its
    autotune configs and heuristics fill in."""
    fn, tuned = kernel, set()
    while hasattr(fn, "fn") and not inspect.isfunction(fn):
        tuned |= {k for c in getattr(fn, "configs", ()) for k in getattr(c, "kwargs", {})}
        tuned |= set(getattr(fn, "values", {}))  # triton.heuristics
        fn = fn.fn
    return (inspect.signature(fn) if inspect.isfunction(fn) else None), tuned


class _CountedLaunch:
    """Stands in for a Triton kernel on a CPU machine: ``kernel[grid](...)`` counts the launch and runs nothing,
    after checking that the launch's arguments bind to the kernel's parameters (none missing, none unknown) as a
    real launch would need."""

    def __init__(self, name: str, launches: collections.Counter, kernel=None):
        self.name, self.launches = name, launches
        self.signature, self.tuned = _kernel_params(kernel) if kernel is not None else (None, set())

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.signature is not None:
                given = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
                try:
                    bound = self.signature.bind_partial(*args, **given)
                except TypeError as err:
                    raise TypeError(f"Triton kernel {self.name}: {err}") from None
                missing = [p for p, v in self.signature.parameters.items()
                           if p not in bound.arguments and p not in self.tuned and v.default is inspect.Parameter.empty]
                if missing:
                    raise TypeError(f"Triton kernel {self.name}: launched without {', '.join(missing)}")
            self.launches[self.name] += 1

        return launch


def _count_launches(modules, launches: collections.Counter, saved: list, names=()) -> None:
    """Each Triton kernel of ``modules`` (``*_kernel``, and ``names``) counted instead of run; (module, name,
    kernel) appended to ``saved`` for the restore."""
    for mod in modules:
        for k in dir(mod):
            if k.endswith("_kernel") or k in names:
                saved.append((mod, k, getattr(mod, k)))
                setattr(mod, k, _CountedLaunch(k, launches, getattr(mod, k)))


@contextlib.contextmanager
def dry_fused_path(launches: collections.Counter):
    """On CPU tensors: the fused fake-quant / Hadamard dispatch says yes and the Triton kernels only count their
    launches (see the top of this file); everything restored on exit."""
    import qmamba.kernels.triton.fake_quant as tfq
    import qmamba.kernels.triton.hadamard as th
    import qmamba.ops.backend as backend
    from qmamba.quant import numerics

    # _cheap_check: dry launches leave garbage values behind, and on a GPU the check reads nothing (it runs on CPU
    # tensors only), so the dry CPU run skips it too
    with rebound({"use_triton": (backend.use_triton, use_triton_on_cpu),
                  "_cheap_check": (numerics._cheap_check, lambda scale: None)}) as saved:
        _count_launches((tfq, th), launches, saved)
        yield


def _channel_last(b: int, d: int, L: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(b, L, d, dtype=dtype, device=like.device).transpose(1, 2)


def _dry_conv(x, x_scale, w, w_scale, bias, silu, out_dtype, out_scales, dual_index, *dual):
    b, d, L = x.shape
    outs = [_channel_last(b, d, L, torch.int8, x) for _ in out_scales] or [_channel_last(b, d, L, out_dtype, x)]
    return outs + ([_channel_last(b, d, (L + 7) // 8, torch.uint8, x)] if dual_index >= 0 else [])


def _dry_conv_update(x, conv_state, x_scale, w, w_scale, bias, silu, out_dtype, out_scales, dual_index, *dual):
    outs = [torch.empty_like(x) for _ in out_scales] or [torch.empty(x.shape, dtype=out_dtype, device=x.device)]
    return outs + ([torch.empty(x.shape, dtype=torch.uint8, device=x.device)] if dual_index >= 0 else [])


def _dry_gemv_conv_update(x, xs, w, ws, bias, out_dtype, scales, bounds, conv_columns, conv_state, *conv):
    """in_proj's codes (M, N), then the conv update's outputs for its first conv_columns columns."""
    codes = torch.empty(x.shape[0], w.shape[0], dtype=torch.int8, device=x.device)
    conv_in = torch.empty(x.shape[0], conv_columns, dtype=torch.int8, device=x.device)
    return [codes] + _dry_conv_update(conv_in, conv_state, scales[0], conv[0], conv[1], conv[2], conv[3], out_dtype,
                                      *conv[4:])


def _dry_norm(hidden, residual, weight, eps, in_scale, residual_in_fp32):
    rows = (-1, hidden.shape[-1])
    out = torch.float32 if residual_in_fp32 else (
        hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype))
    return [torch.empty(hidden.shape, dtype=torch.int8, device=hidden.device).reshape(rows),
            torch.empty(hidden.shape, dtype=out, device=hidden.device).reshape(rows)]


def _dry_scan(u, *args):  # args[13]: out_dtype; B is args[4] (batch, N, L)
    b, d, L = u.shape
    return [_channel_last(b, d, L, args[13], u), torch.empty(b, d, args[4].shape[1], device=u.device)]


# qmamba's CUDA ops (csrc/, registered as torch.ops.qmamba.*) on a CPU machine: an empty result of the op's shape
DRY_OPS = {
    "quantize_int8": lambda x, scale, axis, bits: torch.empty(x.shape, dtype=torch.int8, device=x.device),
    "hadamard_quantize": lambda x, scale, bits: torch.empty(x.shape, dtype=torch.int8, device=x.device),
    "conv1d_int8": _dry_conv,
    "conv1d_int8_update": _dry_conv_update,
    "add_rmsnorm_quant": _dry_norm,
    "w8a8_gemv": lambda x, xs, w, ws, bias, out_dtype, scales, bounds: torch.empty(
        x.shape[0], w.shape[0], dtype=torch.int8 if len(scales) else out_dtype, device=x.device),
    "w8a8_gemv_conv_update": _dry_gemv_conv_update,
    "selective_scan_int8": _dry_scan,
    # args[13]: out_dtype (op argument 15; delta, args[1], is None when dt_proj is fused: dt etc. come last)
    "selective_scan_int8_update": lambda state, u, *args: [torch.empty(u.shape, dtype=args[13], device=u.device)]
    + ([] if args[23] is None else [torch.empty(u.shape, dtype=torch.int8, device=u.device)]),
}


@contextlib.contextmanager
def dry_int8_kernels(launches: collections.Counter):
    """On CPU tensors: the int8 ops pick qmamba's kernels as on a GPU (``use_kernels`` says yes, ``load`` and
    ``require_cuda`` pass), each ``torch.ops.qmamba`` op and int8 Triton launch is counted and returns an empty result
    of its shape (``DRY_OPS``), so are the float norms' mamba_ssm Triton kernels (``qmamba.ops.norm``), and the fused
    fake-quant / Hadamard path is dry as in ``dry_fused_path``; everything restored on exit."""
    import types

    import qmamba.kernels.triton.gated_norm as tgnorm
    import qmamba.kernels.triton.launch as launch
    import qmamba.kernels.triton.ssd_int8 as tssd
    import qmamba.kernels.triton.w8a8_gemm as tgemm
    import qmamba.ops.backend as backend
    import qmamba.ops.norm as onorm

    # interpreting: the Triton wrappers take CPU tensors as under TRITON_INTERPRET=1 (small blocks; launches counted)
    with gpu_path_on_cpu(DRY_OPS, launches, {"interpreting": (launch.interpreting, lambda: True)}) as saved:
        _count_launches((tssd, tgemm, tgnorm), launches, saved, names=("_gemm_fixed", "_gemm_tuned"))

        # the float norms run mamba_ssm's Triton kernels on a GPU (qmamba.ops.norm): counted and empty here as well
        def norm_launch(name):
            def fn(x, *args, **kwargs):
                launches[name] += 1
                return torch.empty_like(x)
            return fn

        stubs = {"mamba_ssm.ops.triton.layer_norm": types.SimpleNamespace(
                     rms_norm_fn=norm_launch("mamba_ssm rms_norm")),
                 "mamba_ssm.ops.triton.layernorm_gated": types.SimpleNamespace(
                     rmsnorm_fn=norm_launch("mamba_ssm gated rmsnorm"))}
        saved += [(onorm, "use_fast_path", onorm.use_fast_path), (onorm, "try_import", onorm.try_import)]
        onorm.use_fast_path = lambda b, tensor, module, op: backend.validate_backend(b) != "torch"
        onorm.try_import = stubs.get
        with dry_fused_path(launches):
            yield


# ops that read a tensor's value on the host: on a GPU each waits for every kernel queued before it
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def int8_count(preset_name: str, recipe: str, batch: int = 1, prompt: int = 64, device: str | None = None,
               reps: int = 20) -> dict:
    """{"prefill": aten ops of one prefill of ``prompt`` tokens, "step": of one decode step, "prefill_launches" /
    "step_launches": qmamba kernel calls (dry) or None, "prefill_host_ms" / "step_host_ms": the least host time of
    ``reps`` calls of the backbone (the layers, without the lm_head), "layers", "dry"} of the int8 model as
    benchmarks/latency.py builds it (calibrated on random tokens, converted, float leftovers fp16), after a warm-up
    of each."""
    from torch.profiler import ProfilerActivity, profile

    from latency import fp16_float_leftovers_
    from qmamba import MambaLM, preset
    from qmamba.generation import InferenceCache
    from qmamba.qnn import calibrate, convert, prepare, set_mode

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = MambaLM(preset(preset_name)).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    prepare(model, recipe)
    with torch.no_grad():
        calibrate(model, [ids], progress=False)
    convert(model)
    set_mode(model, "int8")
    fp16_float_leftovers_(model)
    cache = InferenceCache.allocate(model, batch=batch, device=device, dtype=torch.float16)
    token = ids[:, -1]
    dry = device == "cpu"
    result = {"layers": model.config.n_layer, "dry": dry}
    launches: collections.Counter = collections.Counter()
    with dry_int8_kernels(launches) if dry else contextlib.nullcontext(), torch.no_grad():
        for what, fn in (("prefill", lambda: model.prefill(ids, cache)), ("step", lambda: model.step(token, cache))):
            fn()  # warm-up: lazy imports, first-call caches, the GEMM's autotuning
            launches.clear()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            result[what] = collections.Counter({e.key: e.count for e in prof.key_averages()
                                                if e.key.startswith("aten::")})
            result[f"{what}_launches"] = collections.Counter(launches) if dry else None
            # the host time of the layers: the backbone without the lm_head (a float GEMM that a dry run computes)
            body = (lambda: model.backbone(ids, cache)) if what == "prefill" else (
                lambda: model.backbone.step(token, cache))
            result[f"{what}_host_ms"] = _min_host_ms(body, reps, device)
    return result


def _min_host_ms(fn, reps: int, device: str) -> float:
    """The least CPU time of this thread over ``reps`` calls of ``fn``, in ms: the host's work to dispatch them (the
    least, and CPU time rather than wall time: a shared machine's scheduling noise only adds; on a GPU the host
    returns before the kernels finish, and time waiting in a sync is not counted)."""
    import time

    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
        if device == "cuda":
            torch.cuda.synchronize()
    return best * 1e3


def step_ops(model, ids, precision: str = "bf16", launches: collections.Counter | None = None) -> collections.Counter:
    """The aten ops (by name, nested ones included) of one forward + backward of ``model`` on ``ids`` (after one
    untimed warm-up step; ``launches``, a dry path's counter, is cleared after it too)."""
    from torch.profiler import ProfilerActivity, profile

    device = ids.device.type

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazy imports, first-call caches
    if launches is not None:
        launches.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return collections.Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def count(preset_name: str, recipe: str, batch: int = 1, seq_len: int = 8, precision: str = "bf16",
          device: str | None = None) -> dict:
    """{"fp": ops, "fakequant": ops, "launches": Triton launches of the fakequant step, "points": quantization
    points, "dry": bool} for one step of each (see the top of this file)."""
    from qmamba import MambaLM, preset
    from qmamba.qnn import calibrate, prepare, quant_points, set_mode

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = MambaLM(preset(preset_name)).to(device)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    qat = prepare(copy.deepcopy(model), recipe)
    calibrate(qat, [ids[:, :-1]], progress=False)
    set_mode(qat, "fakequant").train()
    fp_ops = step_ops(model.train(), ids, precision)
    launches: collections.Counter = collections.Counter()
    with dry_fused_path(launches) if device == "cpu" else contextlib.nullcontext():
        qat_ops = step_ops(qat, ids, precision, launches)
    return {"fp": fp_ops, "fakequant": qat_ops, "launches": launches, "points": sum(1 for _ in quant_points(qat)),
            "dry": device == "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="house-mamba1")
    ap.add_argument("--recipe", default="qat_w8a8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=8, help="the counts do not depend on it (no op loops over time)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--top", type=int, default=0, metavar="N", help="also list the N ops the fakequant step adds most")
    ap.add_argument("--int8", action="store_true",
                    help="count the int8 model's prefill (--seq-len tokens) and one decode step instead")
    args = ap.parse_args()
    if args.int8:
        return print_int8(args)
    r = count(args.preset, args.recipe, args.batch, args.seq_len, args.precision)
    fp, fq = sum(r["fp"].values()), sum(r["fakequant"].values())
    where = "cpu, fused path dry (launches counted, not run)" if r["dry"] else torch.cuda.get_device_name()
    print(f"{args.preset} {args.recipe} {args.precision}, one forward + backward on {where}")
    print(f"aten ops: fp {fp:,}  fakequant {fq:,}  (+{fq - fp:,}; {r['points']} quantization points: "
          f"{(fq - fp) / max(r['points'], 1):.1f} a point)")
    if r["dry"]:
        print(f"Triton launches: {sum(r['launches'].values())} ({dict(r['launches'])})")
    if args.top:
        added = collections.Counter({k: v - r["fp"].get(k, 0) for k, v in r["fakequant"].items()})
        for name, n in added.most_common(args.top):
            print(f"{n:8d}  {name}")


def print_int8(args) -> None:
    r = int8_count(args.preset, args.recipe, args.batch, args.seq_len)
    where = "cpu, qmamba's kernels dry (calls counted, not run)" if r["dry"] else torch.cuda.get_device_name()
    print(f"{args.preset} {args.recipe} int8, batch {args.batch}, on {where}; {r['layers']} layers")
    for what in ("prefill", "step"):
        ops, n = r[what], r["layers"]
        syncs = sum(ops.get(k, 0) for k in SYNC_OPS)
        line = (f"{what:8s} host {r[f'{what}_host_ms'] / n:.3f} ms a layer  aten ops {sum(ops.values()):7,} "
                f"({sum(ops.values()) / n:6.1f} a layer)  host reads {syncs}")
        if r[f"{what}_launches"] is not None:
            k = r[f"{what}_launches"]
            line += f"  kernels {sum(k.values())} ({sum(k.values()) / n:.1f} a layer: {dict(k)})"
        print(line)
        for name, c in ops.most_common(args.top):
            print(f"    {c:7d}  {name}")


if __name__ == "__main__":
    main()
