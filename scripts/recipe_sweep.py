"""Compare quantization recipes on one fp checkpoint: for each recipe, prepare a fresh copy of the model, calibrate it
on the checkpoint's calibration set, and score it on a split (validation by default, so recipes are chosen without
looking at the test split) in the asked modes.

    python scripts/recipe_sweep.py --checkpoint runs/pretrain/checkpoints/best.ckpt \\
        --recipe quamba_w8a8 --recipe configs/recipes/quamba_w8a8_no_rotation.yaml --limit-batches 8

Prints one row per recipe and mode: perplexity, bits per byte, change against fp.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmamba.evaluation import scoring_batches  # noqa: E402
from qmamba.lightning.checkpoint import load_checkpoint_model  # noqa: E402
from qmamba.modes import parse_mode  # noqa: E402
from qmamba.qnn import calibrate, prepare, set_mode  # noqa: E402
from qmamba.quant.recipe import load_recipe  # noqa: E402
from qmamba.sensitivity import perplexity_and_bpb as score  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an fp checkpoint (qmamba .ckpt or model folder)")
    ap.add_argument("--recipe", action="append", required=True, help="a preset name or a recipe .yaml (repeat)")
    ap.add_argument("--modes", default="fakequant", help="comma list of fakequant / int8")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--limit-batches", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [parse_mode(m) for m in args.modes.split(",")]
    dm, batches = scoring_batches(args.checkpoint, args.split, args.limit_batches)
    base = load_checkpoint_model(args.checkpoint).to(device).eval()
    fp = score(base, batches, device)
    print(f"{'recipe':40s} {'mode':9s} {'ppl':>9s} {'bpb':>8s} {'Δ ppl':>8s} {'s':>6s}", flush=True)
    print(f"{'(none)':40s} {'fp':9s} {fp['ppl']:9.4f} {fp['bpb']:8.4f} {'':>8s}", flush=True)
    for source in args.recipe:
        recipe = load_recipe(source)
        model = prepare(copy.deepcopy(base), recipe)
        start = time.perf_counter()
        calibrate(model, dm.calibration_dataloader(), progress=False)
        for mode in modes:
            set_mode(model, mode)
            r = score(model, batches, device)
            print(f"{Path(source).stem:40s} {mode:9s} {r['ppl']:9.4f} {r['bpb']:8.4f} "
                  f"{100 * (r['ppl'] / fp['ppl'] - 1):+7.2f}% {time.perf_counter() - start:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
