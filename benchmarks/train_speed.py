"""Training step time of a preset on the current device: forward + backward + AdamW step, timed after warm-up.

    python benchmarks/train_speed.py --preset house-mamba1 --batch 64 --seq-len 512 [--precision bf16] [--backend auto]
    python benchmarks/train_speed.py --preset house-mamba1 --recipe qat_w8a8     # fp step vs fake-quant (QAT) step
    python benchmarks/train_speed.py --preset house-mamba1 --recipe qat_w8a8 --torch-fake-quant  # + torch fake-quant

Prints ms per step, tokens per second and peak GPU memory. With ``--recipe``, the same model, batch and sequence
length is timed twice in one run — as is (fp) and prepared with the recipe, calibrated on one batch and in fakequant
mode (the QAT step) — and the ratio is printed; ``--torch-fake-quant`` adds a third run of the same QAT model with
fake-quant in torch ops instead of the fused Triton kernels (what the fusion buys). Used to size max_steps of the GPU
configs and for the QAT step-time goal.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from qmamba import MambaLM, preset, set_backend
from qmamba.quant import numerics


def time_steps(model, ids, args, device, label: str = "") -> tuple[float, float]:
    """(ms per step, peak GiB) of forward + backward + AdamW on ``model``; with ``--profile``, then the costliest ops
    of one more (untimed) step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=args.precision == "bf16"):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if args.profile and device == "cuda":
        from latency import print_profile  # benchmarks/ is this script's directory

        print_profile(step, f"one training step, {label}", args.profile)
    return ms, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="house-mamba1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--recipe", default=None, help="also time the fake-quant (QAT) step with this recipe")
    ap.add_argument("--torch-fake-quant", action="store_true",
                    help="with --recipe: also time the fake-quant step with fake-quant in torch ops (the fused "
                         "Triton kernels off, every other op as --backend), side by side in the same run")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also print torch.profiler's ROWS costliest ops of one (untimed) step of each run (GPU)")
    args = ap.parse_args()
    if args.torch_fake_quant and not args.recipe:
        ap.error("--torch-fake-quant needs --recipe")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    torch.manual_seed(0)
    model = set_backend(MambaLM(preset(args.preset)).to(device), args.backend)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len + 1), device=device)
    runs = [("fp", model)]
    if args.recipe:
        from qmamba.qnn import calibrate, prepare, set_mode

        qat = prepare(copy.deepcopy(model), args.recipe)
        calibrate(qat, [ids[:, :-1]], progress=False)
        runs.append((f"fakequant {args.recipe}", set_mode(qat, "fakequant").train()))
        if args.torch_fake_quant:
            runs.append((f"fakequant {args.recipe}, fake-quant in torch ops", qat))
    times = {}
    for label, m in runs:
        # the torch fake-quant variant: the fused-kernel dispatch answers "no" for this run only
        fused_dispatch = numerics.use_fused_fake_quant
        if label.endswith("in torch ops"):
            numerics.use_fused_fake_quant = lambda backend, x, op, layout_problem: False
        try:
            ms, peak = time_steps(m.train(), ids, args, device, label)
        finally:
            numerics.use_fused_fake_quant = fused_dispatch
        times[label] = ms
        print(f"{args.preset} ({model.num_parameters() / 1e6:.1f}M) {label} {args.precision} backend={args.backend} "
              f"batch {args.batch}x{args.seq_len} on {where}: {ms:.1f} ms/step, "
              f"{args.batch * args.seq_len / ms * 1e3:,.0f} tokens/s, peak {peak:.2f} GiB", flush=True)
    fp_ms = times["fp"]
    for label, ms in times.items():
        if label != "fp":
            print(f"{label} / fp step time: {ms / fp_ms:.2f}x")


if __name__ == "__main__":
    main()
