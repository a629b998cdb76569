"""A/B of the int8 conv1d prefill kernel: an earlier revision's csrc/conv1d against the working tree's, built side by
side in one process and timed in the same run on the same inputs (graph replays, interleaved, L2 flushed), with the
dual-scale outputs (mask, piecewise) as ``dual_scale_kernels.py`` builds them. Also checks that both give the same
codes and masks (a kernel change that is meant to be exact).

    python benchmarks/conv1d_ab.py --stage e8543f5 ab_old     # here (needs git): the old sources into ab_old/
    python benchmarks/conv1d_ab.py --old ab_old                 # on the GPU machine (ab_old/ travels untracked)

``--stage`` writes the revision's conv1d_int8.cu and common/qmamba_common.cuh with their namespace and op library
renamed (``qmamba_old`` / ``torch.ops.qold``), so both extensions load into one process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(rev: str, out: Path) -> None:
    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout

    (out / "common").mkdir(parents=True, exist_ok=True)
    header = show("csrc/common/qmamba_common.cuh").replace("namespace qmamba {", "namespace qmamba_old {")
    (out / "common" / "qmamba_common.cuh").write_text(header)
    src = show("csrc/conv1d/conv1d_int8.cu").replace("namespace qmamba {", "namespace qmamba_old {")
    if '#include "conv1d/conv1d_update.cuh"' in src:  # revisions since the update's math moved to a header
        (out / "conv1d").mkdir(exist_ok=True)
        update = show("csrc/conv1d/conv1d_update.cuh").replace("namespace qmamba {", "namespace qmamba_old {")
        (out / "conv1d" / "conv1d_update.cuh").write_text(update)
    src = src[:src.index("TORCH_LIBRARY_FRAGMENT(qmamba, m)")] + """TORCH_LIBRARY(qold, m) {
  m.def("conv1d_int8(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, bool silu, "
        "ScalarType out_dtype, Tensor[] out_scales, int dual_index, int dual_encoding, int dual_knee, "
        "Tensor? dual_outlier_scale) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(qold, CUDA, m) { m.impl("conv1d_int8", &qmamba_old::conv1d_int8); }
"""
    (out / "conv1d_int8.cu").write_text(src)
    (out / "REVISION").write_text(rev + "\n")
    print(f"staged {rev}'s conv1d kernel in {out}")


def run(old: Path, batches, lengths, reps: int, share: float) -> int:
    import torch
    from torch.utils import cpp_extension

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import dual_scale_kernels as dk
    from qmamba import kernels
    from qmamba.kernels import conv1d as kconv
    from qmamba.quant.dual_scale import DualScale

    cc = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cc[0]}.{cc[1]}"
    build = Path("/tmp/qmamba_conv1d_ab")
    build.mkdir(exist_ok=True)
    t0 = time.time()
    cpp_extension.load(name="qold", sources=[str(old / "conv1d_int8.cu")], extra_include_paths=[str(old)],
                       extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo", "-diag-suppress", "3306"],
                       is_python_module=False, build_directory=str(build))
    kernels.load()
    rev = (old / "REVISION").read_text().strip() if (old / "REVISION").exists() else str(old)
    print(f"old kernel ({rev}) built in {time.time() - t0:.0f} s; {torch.cuda.get_device_name()}", flush=True)
    D = dk.D_INNER
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for b in batches:
        for L in lengths:
            qx, sx, qw, sw, bias, y = dk.conv_inputs(b, L, torch.Generator(device="cuda").manual_seed(0))
            s_a = (y.float().abs().max() / 127).reshape(())
            old_op = torch.ops.qold.conv1d_int8
            fns = {"old single": lambda: old_op(qx, sx, qw, sw, bias, True, torch.float16, [s_a, s_a], -1, 0, 0, None),
                   "new single": lambda: kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, [s_a, s_a])}
            for enc, code in (("mask", 1), ("piecewise", 2)):
                s_in, s_out = dk._scales(y, enc, share)
                fns[f"old {enc}"] = (lambda s_in=s_in, s_out=s_out, code=code: old_op(
                    qx, sx, qw, sw, bias, True, torch.float16, [s_a, s_in], 1, code, dk.KNEE, s_out))
                fns[f"new {enc}"] = (lambda s_in=s_in, s_out=s_out, enc=enc: kconv.conv1d_int8(
                    qx, sx, qw, sw, bias, True, torch.float16, [s_a, s_in], [None, DualScale(s_out, enc, dk.KNEE)]))
            same = {}
            for v in ("single", "mask", "piecewise"):
                o, n = fns[f"old {v}"](), fns[f"new {v}"]()
                if v != "single":  # the wrapper returns (codes, masks); the op a flat list with the mask last
                    n = n[0] + [m for m in n[1] if m is not None]
                same[v] = len(o) == len(n) and all(torch.equal(a, c) for a, c in zip(o, n))
            t = dk._time_all(dk._graphed(fns), reps, flush)
            print(f"b{b} L{L} D{D}  us: " + "  ".join(f"{k} {v:.1f}" for k, v in t.items()))
            for gen in ("old", "new"):
                print(f"    {gen}: mask / single {t[gen + ' mask'] / t[gen + ' single']:.3f}  "
                      f"piecewise / single {t[gen + ' piecewise'] / t[gen + ' single']:.3f}")
            print(f"    new / old: single {t['new single'] / t['old single']:.3f}  mask "
                  f"{t['new mask'] / t['old mask']:.3f}  piecewise {t['new piecewise'] / t['old piecewise']:.3f}  "
                  f"| old == new bit for bit: {same}", flush=True)
            del fns
            torch.cuda.empty_cache()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs=2, metavar=("REV", "DIR"), help="write REV's kernel sources into DIR (needs git)")
    ap.add_argument("--old", type=Path, help="a folder --stage wrote: time it against the working tree's kernel")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--outlier-share", type=float, default=0.001)
    args = ap.parse_args(argv)
    if bool(args.stage) == bool(args.old):
        ap.error("give one of --stage REV DIR (here) or --old DIR (on the GPU machine)")
    if args.stage:
        stage(args.stage[0], Path(args.stage[1]))
        return 0
    if not (args.old / "conv1d_int8.cu").exists():
        ap.error(f"--old {args.old}: no conv1d_int8.cu there; stage it first with --stage REV {args.old}")
    import torch

    if not torch.cuda.is_available():
        print("conv1d_ab: needs a CUDA GPU", file=sys.stderr)
        return 2
    return run(args.old, args.batch, args.lengths, args.reps, args.outlier_share)


if __name__ == "__main__":
    raise SystemExit(main())
