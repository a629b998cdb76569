"""Speed of the fused W8A8 linear routes against fp16 cuBLAS, side by side in one run, at the projection shapes of
mamba-130m, mamba-2.8b and mamba2-2.7b: what picks ``qmamba.ops.int8_linear``'s route (GEMV up to ``GEMV_MAX_M``
rows, Triton GEMM above).

Routes, each timed on the same inputs (fp16 output unless ``--act-dtype bf16``):
    fp16     F.linear(x, w) in the activation dtype (cuBLAS): the baseline every speed-up is relative to
    int_mm   torch._int_mm (cuBLASLt int8, needs M > 16) + the epilogue as separate torch ops
    triton   qmamba.kernels.linear.w8a8_gemm: Triton GEMM, dequant epilogue fused (autotuned on its first call)
    gemv     qmamba.kernels.linear.w8a8_gemv: CUDA GEMV, M <= 8 only; its bandwidth = weight bytes / time

    python benchmarks/int8_gemm.py [--models 130m 2.8b mamba2-2.7b] [--m 1 8 1024 2048 8192] [--reps 20]
                                   [--act-dtype fp16|bf16] [--json results.json]

Timing: CUDA events around each call, L2 flushed before every repetition (a model's layers never find their weight
in L2), median of ``--reps`` after warm-up; the first call of a route (Triton autotuning, building the CUDA
extension) is not timed. Each route's output is also compared with the reference (``exact`` column: all outputs
bit-identical to w8a8_linear_ref). A route that fails prints its error and the run goes on. About a minute on an
H100 with Triton's cache warm; the first run also compiles the autotune candidates (and the CUDA extension).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# (model, layer): (K, N) of nn.Linear(K, N)
SHAPES = {
    ("130m", "in_proj"): (768, 3072),
    ("130m", "x_proj"): (1536, 80),
    ("130m", "dt_proj"): (48, 1536),
    ("130m", "out_proj"): (1536, 768),
    ("2.8b", "in_proj"): (2560, 10240),
    ("2.8b", "x_proj"): (5120, 192),
    ("2.8b", "dt_proj"): (160, 5120),
    ("2.8b", "out_proj"): (5120, 2560),
    ("mamba2-2.7b", "in_proj"): (2560, 10576),
    ("mamba2-2.7b", "out_proj"): (5120, 2560),
}
ROUTES = ("fp16", "int_mm", "triton", "gemv")


def _time_us(fn, reps: int, flush: torch.Tensor) -> float:
    fn()  # first call: compile / autotune / build, not timed
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()  # evicts L2; also keeps the GPU busy, so the timed call is queued ahead of the CPU
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _routes(qx, sx, qw, sw, x, w, act_dtype):
    from qmamba.kernels import linear as klinear

    M = qx.shape[0]

    def int_mm():
        if M <= 16:
            raise RuntimeError("torch._int_mm on CUDA needs M > 16")
        acc = torch._int_mm(qx, qw.t())
        return (acc.float() * (sx * sw)).to(act_dtype)

    def gemv():
        if M > 8:
            raise RuntimeError("the GEMV takes M <= 8")
        return klinear.w8a8_gemv(qx, sx, qw, sw, None, act_dtype)

    return {"fp16": lambda: F.linear(x, w),
            "int_mm": int_mm,
            "triton": lambda: klinear.w8a8_gemm(qx, sx, qw, sw, None, act_dtype),
            "gemv": gemv}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "?"
    except OSError:
        return "?"


def _fmt(r: dict, route: str) -> str:
    v = r["routes"].get(route, {})
    if "us" not in v:
        return "n/a" if v.get("skipped") else "error"
    if route == "fp16":
        return f"{v['us']:.1f}"
    return f"{v['us']:.1f} ({v['speedup']:.2f}x)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["130m", "2.8b", "mamba2-2.7b"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 1024, 2048, 8192], help="rows (tokens)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--act-dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int8_gemm.py measures GPU kernels: no CUDA device here")

    from qmamba.ops.int8_linear import GEMV_MAX_M, w8a8_linear_ref

    act_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.act_dtype]
    dev = torch.device("cuda")
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    results, errors_seen = [], set()
    t_start = time.time()
    for (model, layer), (K, N) in SHAPES.items():
        if model not in args.models:
            continue
        qw = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev, generator=g)
        sw = (torch.rand(N, device=dev, generator=g) + 0.5) * (0.05 / math.sqrt(K))  # per output channel
        w = (qw.float() * sw[:, None]).to(act_dtype)
        sx = torch.tensor(0.02, device=dev)
        for M in args.m:
            qx = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=dev, generator=g)
            x = (qx.float() * sx).to(act_dtype)
            ref = w8a8_linear_ref(qx, sx, qw, sw, None, act_dtype)
            row = {"model": model, "layer": layer, "K": K, "N": N, "M": M,
                   "auto": "gemv" if M <= GEMV_MAX_M and K % 16 == 0 else "triton", "routes": {}}
            routes = _routes(qx, sx, qw, sw, x, w, act_dtype)
            for name in args.routes:
                if (name == "gemv" and M > 8) or (name == "int_mm" and M <= 16):
                    row["routes"][name] = {"skipped": True}
                    continue
                try:
                    out = routes[name]()
                    us = _time_us(routes[name], args.reps, flush)
                    entry = {"us": us}
                    if name in ("triton", "gemv"):
                        entry["exact"] = bool(torch.equal(out, ref))
                    if name == "gemv":
                        entry["tb_per_s"] = N * K / (us * 1e-6) / 1e12
                    row["routes"][name] = entry
                except Exception as err:  # one failing route must not stop the run
                    msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    row["routes"][name] = {"error": msg}
                    if (name, msg) not in errors_seen:
                        errors_seen.add((name, msg))
                        print(f"[{model} {layer} M={M}] {name} failed: {msg}", file=sys.stderr, flush=True)
            base = row["routes"].get("fp16", {}).get("us")
            for v in row["routes"].values():
                if "us" in v and base:
                    v["speedup"] = base / v["us"]
            results.append(row)
            print(f"  {model:12s} {layer:9s} M={M:<5d} " + "  ".join(
                f"{n}={v['us']:.1f}us" for n, v in row["routes"].items() if "us" in v), file=sys.stderr, flush=True)
        del qw, w

    elapsed = time.time() - t_start
    name = torch.cuda.get_device_name()
    print(f"\n### W8A8 linear vs {args.act_dtype} cuBLAS — {name}, torch {torch.__version__}, commit {_commit()}, "
          f"median of {args.reps}, L2 flushed ({elapsed:.0f} s)\n")
    print("| model | layer | K | N | M | fp16 us | int_mm+epilogue us | triton us | gemv us | gemv TB/s | exact | "
          "auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        gv = r["routes"].get("gemv", {})
        bw = f"{gv['tb_per_s']:.2f}" if "tb_per_s" in gv else "-"
        exact = [v["exact"] for v in r["routes"].values() if "exact" in v]
        ok = "-" if not exact else ("yes" if all(exact) else "NO")
        print(f"| {r['model']} | {r['layer']} | {r['K']} | {r['N']} | {r['M']} | {_fmt(r, 'fp16')} | "
              f"{_fmt(r, 'int_mm')} | {_fmt(r, 'triton')} | {_fmt(r, 'gemv')} | {bw} | {ok} | {r['auto']} |")

    # route summary: where the GEMV beats the Triton GEMM, and the GEMM's speed-up over fp16 at prefill
    print()
    for M in sorted({r["M"] for r in results}):
        rows = [r for r in results if r["M"] == M]
        both = [r for r in rows if "us" in r["routes"].get("gemv", {}) and "us" in r["routes"].get("triton", {})]
        if both:
            wins = sum(r["routes"]["gemv"]["us"] < r["routes"]["triton"]["us"] for r in both)
            print(f"M={M}: GEMV faster than the Triton GEMM in {wins}/{len(both)} shapes")
        sp = [r["routes"]["triton"]["speedup"] for r in rows if "speedup" in r["routes"].get("triton", {})]
        if sp:
            print(f"M={M}: Triton GEMM vs fp16, geometric mean {math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x "
                  f"(min {min(sp):.2f}x, max {max(sp):.2f}x over {len(sp)} shapes)")

    if args.json is not None:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                         "triton": __import__("triton").__version__, "commit": _commit(),
                                         "act_dtype": args.act_dtype, "reps": args.reps, "seconds": elapsed,
                                         "results": results}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
