"""Host work of one training step: the aten ops and Triton launches the host dispatches for forward + backward, fp vs
fakequant (QAT) on the same model and batch. The QAT step on a GPU is launch-bound (benchmarks/RESULTS.md): every op
the host dispatches costs microseconds whether or not it moves data, so this count is what the fused fake-quant path
has to keep small.

    python benchmarks/host_ops.py --preset house-mamba1 --recipe qat_w8a8            # any machine
    python benchmarks/host_ops.py --preset house-mamba1 --recipe qat_w8a8 --top 30   # + the ops the QAT step adds

On a GPU the step runs as it is (the fused kernels where ``backend`` picks them). On a CPU machine the fused
fake-quant and Hadamard path is forced (the dispatch that would pick it on a GPU answers yes) and each Triton launch
is counted instead of run ("dry": the values are garbage, so the scale checks that read values are off): the counts
are those of the GPU path's host side, without a GPU. Counts, not times: the GPU's per-op cost is in RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy

import torch
import torch.nn.functional as F


class _CountedLaunch:
    """Stands in for a Triton kernel on a CPU machine: ``kernel[grid](...)`` counts the launch and runs nothing."""

    def __init__(self, name: str, launches: collections.Counter):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches[self.name] += 1

        return launch


@contextlib.contextmanager
def dry_fused_path(launches: collections.Counter):
    """On CPU tensors: the fused fake-quant / Hadamard dispatch says yes and the Triton kernels only count their
    launches (see the top of this file); everything restored on exit."""
    import qmamba.kernels.triton.fake_quant as tfq
    import qmamba.kernels.triton.hadamard as th
    import qmamba.ops.backend as backend
    import qmamba.ops.hadamard as hadamard
    from qmamba.quant import numerics

    def use_triton(b, tensor, op, problem=None):
        return b != "torch" and (problem() if problem is not None else None) is None

    saved = [(backend, "use_triton", backend.use_triton), (hadamard, "use_triton", hadamard.use_triton),
             (numerics, "_cheap_check", numerics._cheap_check)]
    for mod in (tfq, th):
        saved += [(mod, k, getattr(mod, k)) for k in dir(mod) if k.endswith("_kernel")]
    try:
        backend.use_triton = hadamard.use_triton = use_triton
        numerics._cheap_check = lambda scale: None  # dry launches leave garbage values behind
        for mod in (tfq, th):
            for k in dir(mod):
                if k.endswith("_kernel"):
                    setattr(mod, k, _CountedLaunch(k, launches))
        yield
    finally:
        for mod, k, v in saved:
            setattr(mod, k, v)


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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
