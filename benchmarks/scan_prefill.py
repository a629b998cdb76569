"""The Mamba1 prefill selective scan alone: qmamba's int8 kernel (every states-per-lane variant, and the one it picks)
against mamba_ssm's fp16 selective_scan_fn on the same shapes, side by side in one run.

    python benchmarks/scan_prefill.py [--batch 1 8] [--lengths 1024 2048] [--dim 5120] [--reps 20] [--json out.json]

Inputs as Mamba1's mixer hands them (mamba-2.8b widths by default: d_inner 5120, d_state 16, dt_rank 160): int8
codes in channel-last views for qmamba (u, delta, z; B and C column slices of the x_proj output), fp16 tensors of
the same values for mamba_ssm (its fast path's layout: (b, D, L) contiguous u / delta / z, (b, N, L) B / C), delta
bias and softplus and the z gate on both. Each call captured in a CUDA graph and timed by replay (the GPU work
alone, no Python launch overhead), L2 flushed before every replay, variants interleaved, median microseconds over
``--reps``. Needs a CUDA GPU; mamba_ssm is optional (its column is left out without it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency import capture  # noqa: E402  (benchmarks/latency.py: graph capture after warm-up)
from qmamba.quant.numerics import quantize  # noqa: E402

VARIANTS = (0, 1, 2, 4)  # states_per_lane: 0 = the kernel's own pick


def _codes(x):
    s = (x.abs().max().float() / 127).clamp_min(1e-8)
    return quantize(x, s), s


def inputs(batch: int, dim: int, L: int, n: int = 16, r: int = 160, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    qu, su = _codes(F.silu(2 * rnd(batch, L, dim)))
    qdelta, sdelta = _codes(1.5 * rnd(batch, L, dim) - 3.0)
    qxz, sz = _codes(rnd(batch, L, 2 * dim))
    qdbc, sbc = _codes(rnd(batch, L, r + 2 * n))
    qB, qC = (t.transpose(1, 2) for t in qdbc[..., r:].split([n, n], dim=-1))
    A = -torch.exp(torch.log(torch.arange(1, n + 1, device="cuda", dtype=torch.float32)).repeat(dim, 1))
    return dict(qu=qu.transpose(1, 2), u_scale=su, qdelta=qdelta.transpose(1, 2), delta_scale=sdelta, A=A, qB=qB,
                B_scale=sbc, qC=qC, C_scale=sbc, D=torch.ones(dim, device="cuda"), qz=qxz[..., dim:].transpose(1, 2),
                z_scale=sz, delta_bias=0.1 * rnd(dim), delta_softplus=True, out_dtype=torch.float16)


def fp16_inputs(inp: dict) -> tuple:
    """The same values in fp16 in mamba_ssm's layout: (u, delta, A, B, C, D, z, delta_bias)."""
    def deq(q, s):
        return (q.float() * s).half().contiguous()
    return (deq(inp["qu"], inp["u_scale"]), deq(inp["qdelta"], inp["delta_scale"]), inp["A"],
            deq(inp["qB"], inp["B_scale"]), deq(inp["qC"], inp["C_scale"]), inp["D"],
            deq(inp["qz"], inp["z_scale"]), inp["delta_bias"])


def time_graphs(fns: dict, reps: int) -> dict:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    graphs = {k: capture(fn) for k, fn in fns.items()}
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, graph in graphs.items():
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scan_prefill.py needs a CUDA GPU")
    from qmamba import kernels
    from qmamba.kernels import selective_scan as kscan

    kernels.load()
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        selective_scan_fn = None
        print("mamba_ssm not importable: its column is left out", flush=True)
    print(f"device {torch.cuda.get_device_name()}, D {args.dim}, N 16, fp16 outputs, graph replays, median us")
    rows = []
    for batch in args.batch:
        for L in args.lengths:
            inp = inputs(batch, args.dim, L)
            fns = {f"int8 npl={v or 'auto'}": (lambda v=v: kscan.selective_scan_int8(**inp, states_per_lane=v))
                   for v in VARIANTS}
            if selective_scan_fn is not None:
                u, delta, A, B, C, D, z, bias = fp16_inputs(inp)
                fns["mamba_ssm fp16"] = lambda: selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True,
                                                                  return_last_state=True)
            times = time_graphs(fns, args.reps)
            row = {"batch": batch, "L": L, "dim": args.dim, **times}
            rows.append(row)
            ref = times.get("mamba_ssm fp16")
            print(f"b{batch} L{L}: " + "  ".join(
                f"{k} {t:.1f}" + (f" ({ref / t:.2f}x)" if ref and k != "mamba_ssm fp16" else "")
                for k, t in times.items()), flush=True)
            del inp, fns
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
