"""Cost of dual-scale SSM input (issue 5) in the kernels, side by side with single scale in one run: the Mamba1 conv1d
(emitting u for its two consumers, x_proj single-scale and scan.u in the encoding) and selective scan (reading u) at
the mamba-2.8b shapes, prefill and one-token update; the Mamba2 SSD Triton chunk scan and step (reading x) at the
mamba2-2.7b shapes. Goal: dual-scale at most 10 % slower than single scale. Also the extra memory of the encoding:
the bytes of u's codes and of its packed flags, and the peak memory of the conv + scan prefill.

    python benchmarks/dual_scale_kernels.py [--batch 1 8] [--lengths 1024 2048] [--reps 30] [--json out.json]

Variants, each timed on the same inputs: ``single`` (one scale, the existing kernels), ``mask`` (codes + 1-bit flags),
``piecewise`` (codes above the knee hold the outliers). Timing: CUDA events around each call, L2 flushed before every
repetition, the variants interleaved within each repetition (drift hits all alike), median over ``--reps`` after
warm-up; the one-token ops (updates, SSD step) each captured in a CUDA graph and timed by replay, as a decode step
runs them (no Python launch overhead in the figure). The Mamba1 prefill ops are timed both ways: as called from
Python ("conv1d prefill": wrapper, checks and launch included, which is what a model sees) and as graph replays
("(graph)": the GPU work alone, the kernels' own cost). ``--outlier-share`` (default 0.001) sets the threshold
quantile of the inputs: 0.1 % of u above it is what the recipes calibrate (threshold_alpha 0.999) and what the house
models showed (0.094-0.102 % per layer); 0.005 is a stress setting (the outlier code is computed in a branch only
rows holding an outlier take, so its cost grows with the share). Needs a CUDA GPU (the kernels build on first use).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmamba.quant.dual_scale import DualScale, dual_quantize  # noqa: E402
from qmamba.quant.numerics import quantize  # noqa: E402
from latency import capture  # noqa: E402  (benchmarks/latency.py: the decode-step graph capture)

VARIANTS = ("single", "mask", "piecewise")
KNEE = 112
OUTLIER_SHARE = 0.001  # default share of u above the threshold (--outlier-share): the recipes' threshold_alpha 0.999
D_INNER, D_STATE, DT_RANK = 5120, 16, 160           # mamba-2.8b
HEADS, HEADDIM, GROUPS, SSD_STATE, CHUNK = 80, 64, 1, 128, 256  # mamba2-2.7b


def _time_all(fns: dict, reps: int, flush: torch.Tensor) -> dict:
    """Median microseconds of each callable, interleaved per repetition, L2 flushed before each call."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _graphed(fns: dict) -> dict:
    """Each one-token op captured in a CUDA graph (as a decode step runs it), timed by replay: launch overhead off."""
    return {k: capture(fn).replay for k, fn in fns.items()}


def _scales(v: torch.Tensor, encoding: str, share: float):
    """(s_in, s_out) as the DualScaleObserver sets them, threshold at the (1 - share) quantile of |v|."""
    a = v.float().abs().flatten()
    a = a[torch.randperm(a.numel(), device=a.device)[:1 << 20]]
    T, A = torch.quantile(a, 1 - share), v.float().abs().max()
    if encoding == "mask":
        return (T / 127).reshape(()), (A / 127).reshape(())
    return (T / KNEE).reshape(()), ((A - T) / (127 - KNEE)).reshape(())


def _codes(x):
    s = (x.abs().max().float() / 127).clamp_min(1e-8)
    return quantize(x, s), s


def conv_inputs(batch: int, L: int, g: torch.Generator):
    """The mamba-2.8b conv's inputs, drawn from g: x as Mamba1 passes it (a view of the in_proj output), int8 taps,
    scales, bias, and its float output y (what the consumers' scales are set from): (qx, sx, qw, sw, bias, y)."""
    from qmamba.kernels import conv1d as kconv

    proj = torch.randint(-128, 128, (batch, L, 2 * D_INNER), dtype=torch.int8, device="cuda", generator=g)
    qx = proj[..., :D_INNER].transpose(1, 2)
    qw = torch.randint(-16, 17, (D_INNER, 1, 4), dtype=torch.int8, device="cuda", generator=g)
    sx, sw = torch.tensor(0.02, device="cuda"), (torch.rand(D_INNER, device="cuda", generator=g) + 0.5) * 0.003
    bias = torch.randn(D_INNER, device="cuda", generator=g) * 0.3
    return qx, sx, qw, sw, bias, kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16)


def bench_mamba1(batch: int, L: int, reps: int, flush, share: float) -> list[dict]:
    from qmamba.kernels import conv1d as kconv
    from qmamba.kernels import selective_scan as kscan

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    # conv: two int8 consumers
    qx, sx, qw, sw, bias, y = conv_inputs(batch, L, g)
    s_xproj = (y.float().abs().max() / 127).reshape(())
    enc = {}
    for e in ("mask", "piecewise"):
        s_in, s_out = _scales(y, e, share)
        enc[e] = (s_in, DualScale(s_out, e, KNEE))
    s_single = (y.float().abs().max() / 127).reshape(())  # single scale: u's absmax (the clipping is the percentile's)
    conv = {"single": lambda: kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, [s_xproj, s_single])}
    for e, (s_in, dual) in enc.items():
        conv[e] = (lambda s_in=s_in, dual=dual: kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16,
                                                                  [s_xproj, s_in], [None, dual]))
    rows.append(dict(op="conv1d prefill", shape=f"b{batch} L{L} D{D_INNER}", **_time_all(conv, reps, flush)))
    rows.append(dict(op="conv1d prefill (graph)", shape=f"b{batch} L{L} D{D_INNER}",
                     **_time_all(_graphed(conv), reps, flush)))

    # scan inputs: u from the conv (channel-last), the rest as the mixer passes them
    u_single = conv["single"]()[1]
    u_dual = {e: kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, [s_xproj, enc[e][0]],
                                   [None, enc[e][1]]) for e in enc}
    qdelta, sdelta = _codes(1.5 * torch.randn(batch, L, D_INNER, device="cuda", generator=g) - 3.0)
    qz, sz = _codes(torch.randn(batch, L, D_INNER, device="cuda", generator=g))
    qbc, sbc = _codes(torch.randn(batch, L, DT_RANK + 2 * D_STATE, device="cuda", generator=g))
    qB, qC = (t.transpose(1, 2) for t in qbc[..., DT_RANK:].split([D_STATE, D_STATE], dim=-1))
    A = -torch.exp(torch.log(torch.arange(1, D_STATE + 1, device="cuda", dtype=torch.float32)).repeat(D_INNER, 1))
    D = torch.ones(D_INNER, device="cuda")
    common = dict(qdelta=qdelta.transpose(1, 2), delta_scale=sdelta, A=A, qB=qB, B_scale=sbc, qC=qC, C_scale=sbc,
                  D=D, qz=qz.transpose(1, 2), z_scale=sz, out_dtype=torch.float16)
    scan = {"single": lambda: kscan.selective_scan_int8(u_single, s_single, **common)}
    for e in enc:
        (_, qu), (_, mu) = u_dual[e]
        scan[e] = (lambda qu=qu, mu=mu, e=e: kscan.selective_scan_int8(qu, enc[e][0], **common, u_dual=enc[e][1],
                                                                       u_mask=mu))
    rows.append(dict(op="selective scan prefill", shape=f"b{batch} L{L} D{D_INNER} N{D_STATE}",
                     **_time_all(scan, reps, flush)))
    rows.append(dict(op="selective scan prefill (graph)", shape=f"b{batch} L{L} D{D_INNER} N{D_STATE}",
                     **_time_all(_graphed(scan), reps, flush)))

    # memory: u's codes, its flags, and the peak of conv + scan
    nbytes = {"single": u_single.numel(), **{e: u_dual[e][0][1].numel() for e in enc}}  # int8: one byte each
    flag_bytes = {"single": 0, "mask": u_dual["mask"][1][1].numel(), "piecewise": 0}
    peak = {}
    for v in VARIANTS:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if v == "single":
            out = scan["single"]()
            c = conv["single"]()
        else:
            c = conv[v]()
            out = kscan.selective_scan_int8(c[0][1], enc[v][0], **common, u_dual=enc[v][1], u_mask=c[1][1])
        torch.cuda.synchronize()
        peak[v] = torch.cuda.max_memory_allocated() - base
        del out, c
    rows.append(dict(op="u bytes (codes + flags)", shape=f"b{batch} L{L} D{D_INNER}", unit="bytes",
                     **{v: nbytes[v] + flag_bytes[v] for v in VARIANTS}))
    rows.append(dict(op="peak conv + scan", shape=f"b{batch} L{L} D{D_INNER}", unit="bytes", **peak))
    return rows


def bench_mamba1_update(batch: int, reps: int, flush, share: float) -> list[dict]:
    from qmamba.kernels import conv1d as kconv
    from qmamba.kernels import selective_scan as kscan

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(-128, 128, (batch, D_INNER), dtype=torch.int8, device="cuda", generator=g)
    state = torch.randint(-128, 128, (batch, D_INNER, 4), dtype=torch.int8, device="cuda", generator=g)
    qw = torch.randint(-16, 17, (D_INNER, 1, 4), dtype=torch.int8, device="cuda", generator=g)
    sx, sw = torch.tensor(0.02, device="cuda"), (torch.rand(D_INNER, device="cuda", generator=g) + 0.5) * 0.003
    bias = torch.randn(D_INNER, device="cuda", generator=g) * 0.3
    s = torch.tensor(0.01, device="cuda")
    duals = {e: DualScale(torch.tensor(0.05, device="cuda"), e, KNEE) for e in ("mask", "piecewise")}
    conv = {"single": lambda: kconv.conv1d_int8_update(x, state, sx, qw, sw, bias, True, torch.float16, [s, s])}
    for e, d in duals.items():
        conv[e] = lambda d=d: kconv.conv1d_int8_update(x, state, sx, qw, sw, bias, True, torch.float16, [s, s],
                                                       [None, d])
    rows = [dict(op="conv1d update (graph)", shape=f"b{batch} D{D_INNER}", **_time_all(_graphed(conv), reps, flush))]

    u = F.silu(2 * torch.randn(batch, D_INNER, 1, device="cuda", generator=g))
    qd, sd = _codes(torch.randn(batch, D_INNER, device="cuda", generator=g) - 3)
    qz, sz = _codes(torch.randn(batch, D_INNER, device="cuda", generator=g))
    qB, sB = _codes(torch.randn(batch, D_STATE, device="cuda", generator=g))
    qC, sC = _codes(torch.randn(batch, D_STATE, device="cuda", generator=g))
    A = -torch.exp(torch.log(torch.arange(1, D_STATE + 1, device="cuda", dtype=torch.float32)).repeat(D_INNER, 1))
    D = torch.ones(D_INNER, device="cuda")
    st = torch.zeros(batch, D_INNER, D_STATE, device="cuda")
    common = dict(qdelta=qd, delta_scale=sd, A=A, qB=qB, B_scale=sB, qC=qC, C_scale=sC, D=D, qz=qz, z_scale=sz,
                  out_dtype=torch.float16)
    su = (u.abs().max() / 127).reshape(())
    qu1 = quantize(u, su)[..., 0].contiguous()
    scan = {"single": lambda: kscan.selective_scan_int8_update(st, qu1, su, **common)}
    for e in ("mask", "piecewise"):
        s_in, s_out = _scales(u, e, share)
        q, m = dual_quantize(u, s_in, s_out, e, KNEE)
        q, m = q[..., 0].contiguous(), None if m is None else m[..., 0].contiguous()
        d = DualScale(s_out, e, KNEE)
        scan[e] = lambda q=q, m=m, s_in=s_in, d=d: kscan.selective_scan_int8_update(st, q, s_in, **common, u_dual=d,
                                                                                    u_mask=m)
    rows.append(dict(op="selective scan update (graph)", shape=f"b{batch} D{D_INNER} N{D_STATE}",
                     **_time_all(_graphed(scan), reps, flush)))
    return rows


def bench_ssd(batch: int, L: int | None, reps: int, flush, share: float) -> list[dict]:
    """The Mamba2 Triton SSD chunk scan (L given) or decode step (L None) reading x single / dual."""
    from qmamba.ops.int8_ssd import ssd_chunk_scan_int8, ssd_step_int8

    g = torch.Generator(device="cuda").manual_seed(2)
    T = L or 1
    spikes = (torch.rand(batch, T, HEADS, HEADDIM, device="cuda", generator=g) < share) * 8
    x = torch.randn(batch, T, HEADS, HEADDIM, device="cuda", generator=g) * (1 + spikes)
    sx = (x.abs().amax(dim=(0, 1, 3)) / 127)  # per head
    qdt, sdt = _codes(torch.randn(batch, T, HEADS, device="cuda", generator=g) - 2)
    qB, sB = _codes(torch.randn(batch, T, GROUPS, SSD_STATE, device="cuda", generator=g))
    qC, sC = _codes(torch.randn(batch, T, GROUPS, SSD_STATE, device="cuda", generator=g))
    A = -torch.rand(HEADS, device="cuda", generator=g) - 0.5
    Dp = torch.ones(HEADS, device="cuda")
    dt_bias = torch.zeros(HEADS, device="cuda")
    inputs = {"single": (quantize(x, sx[:, None]), sx, None, None)}
    for e in ("mask", "piecewise"):
        a = x.abs()
        T_h = torch.quantile(a.permute(2, 0, 1, 3).reshape(HEADS, -1)[:, :1 << 16], 1 - share, dim=1)
        A_h = a.amax(dim=(0, 1, 3))
        s_in, s_out = (T_h / 127, A_h / 127) if e == "mask" else (T_h / KNEE, (A_h - T_h) / (127 - KNEE))
        q, m = dual_quantize(x, s_in[:, None], s_out[:, None], e, KNEE)
        inputs[e] = (q, s_in, DualScale(s_out, e, KNEE), m)
    fns = {}
    for v, (q, s, d, m) in inputs.items():
        if L is not None:
            fns[v] = (lambda q=q, s=s, d=d, m=m: ssd_chunk_scan_int8(
                q, s, qdt, sdt, A, qB, sB, qC, sC, CHUNK, D=Dp, dt_bias=dt_bias, out_dtype=torch.float16,
                backend="cuda", x_dual=d, x_mask=m))
        else:
            st = torch.zeros(batch, HEADS, HEADDIM, SSD_STATE, device="cuda")
            q1, m1 = q[:, 0], None if m is None else m[:, 0]
            fns[v] = (lambda q1=q1, s=s, d=d, m1=m1, st=st: ssd_step_int8(
                st, q1, s, qdt[:, 0], sdt, A, qB[:, 0], sB, qC[:, 0], sC, D=Dp, dt_bias=dt_bias,
                out_dtype=torch.float16, backend="cuda", x_dual=d, x_mask=m1))
    name = "SSD chunk scan (Triton)" if L is not None else "SSD step (Triton, graph)"
    shape = f"b{batch} L{L} H{HEADS} P{HEADDIM} N{SSD_STATE}" if L is not None else f"b{batch} H{HEADS} P{HEADDIM}"
    return [dict(op=name, shape=shape, **_time_all(fns if L is not None else _graphed(fns), reps, flush))]


def _fmt(rows: list[dict]) -> str:
    out = ["| op | shape | single | mask | piecewise | mask / single | piecewise / single |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        unit = r.get("unit", "us")
        f = (lambda v: f"{v / 1e6:.2f} MB") if unit == "bytes" else (lambda v: f"{v:.1f} us")
        out.append(f"| {r['op']} | {r['shape']} | {f(r['single'])} | {f(r['mask'])} | {f(r['piecewise'])} | "
                   f"{r['mask'] / r['single']:.3f} | {r['piecewise'] / r['single']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--outlier-share", type=float, default=OUTLIER_SHARE,
                    help="share of the inputs above the dual-scale threshold (default 0.001, the recipes' 99.9th "
                         "percentile)")
    ap.add_argument("--skip-ssd", action="store_true", help="only the Mamba1 CUDA kernels")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 0 < args.outlier_share < 0.5:
        ap.error(f"--outlier-share must be in (0, 0.5), got {args.outlier_share}")
    if not torch.cuda.is_available():
        print("dual_scale_kernels: needs a CUDA GPU (the kernels are CUDA / Triton)", file=sys.stderr)
        return 2
    from qmamba import kernels

    kernels.load()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    for b in args.batch:
        for L in args.lengths:
            rows += bench_mamba1(b, L, args.reps, flush, args.outlier_share)
            torch.cuda.empty_cache()
        rows += bench_mamba1_update(b, args.reps, flush, args.outlier_share)
        if not args.skip_ssd:
            for L in args.lengths:
                rows += bench_ssd(b, L, args.reps, flush, args.outlier_share)
                torch.cuda.empty_cache()
            rows += bench_ssd(b, None, args.reps, flush, args.outlier_share)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  commit {commit}  "
          f"outlier share {args.outlier_share}")
    print(_fmt(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), commit=commit,
                                               outlier_share=args.outlier_share, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
