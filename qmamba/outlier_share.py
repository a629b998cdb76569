"""The outlier share per layer of a calibrated model's SSM input (issue 5): the fraction of elements of ``scan.u``
(Mamba1) / ``scan.x`` (Mamba2) that the point's inlier scale cannot hold, over some batches of the fp model.

- a dual-scale point: the share its encoding stores at the outlier scale (``dual_scale.outlier_flags``:
  |rint(x / s_in)| > 127 for "mask", > knee for "piecewise");
- a single-scale point: the share its one scale clips (|rint(x / s)| > 127), the baseline's figure.

    python -m qmamba.outlier_share --checkpoint runs/pretrain/checkpoints/best.ckpt \\
        --recipe configs/recipes/dual_scale_treatment_mamba1.yaml --limit-batches 4
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from qmamba.qnn import current_mode, quant_points, set_mode
from qmamba.qnn.point import QuantPoint
from qmamba.quant.dual_scale import outlier_flags
from qmamba.sensitivity import layer_of

SSM_INPUTS = ("scan.u", "scan.x")


def ssm_input_points(model: nn.Module) -> list[QuantPoint]:
    return [p for p in quant_points(model) if not p.is_weight and p.name.endswith(SSM_INPUTS)]


@torch.no_grad()
def outlier_shares(model: nn.Module, batches, device=None) -> dict[str, float]:
    """{point name: outlier share in [0, 1]} for every quantized SSM input of a calibrated, prepared ``model``, over
    ``batches`` (tensors of token ids or (x, ...) tuples) run through the model in fp mode."""
    points = ssm_input_points(model)
    if not points:
        raise ValueError("this model has no quantized SSM input (scan.u / scan.x): prepare it with a recipe that "
                         "quantizes one, and calibrate it")
    device = device or next(model.parameters()).device
    counts: dict[str, list[int]] = {p.name: [0, 0] for p in points}

    def probe(point: QuantPoint, x: torch.Tensor) -> None:
        s_in = point.scale_for(x).detach()
        d = point.dual
        flags = outlier_flags(x, s_in, d.encoding, d.knee) if d is not None else outlier_flags(x, s_in, "mask")
        c = counts[point.name]
        c[0] += int(flags.sum())
        c[1] += flags.numel()

    mode = current_mode(model)
    set_mode(model, "fp")
    try:
        for p in points:
            p.probe = probe
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
    finally:
        for p in points:
            p.probe = None
        set_mode(model, mode if mode != "mixed" else "fp")
    return {name: (n / total if total else 0.0) for name, (n, total) in counts.items()}


def format_outlier_shares(shares: dict[str, float]) -> str:
    lines = [f"{'layer':>5s} {'point':50s} {'outlier share':>14s}"]
    for name, share in shares.items():
        layer = layer_of(name)
        lines.append(f"{'-' if layer is None else layer:>5} {name:50s} {100 * share:13.4f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    from qmamba.evaluation import scoring_batches
    from qmamba.sensitivity import _load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an fp checkpoint (with --recipe) or a calibrated one")
    ap.add_argument("--recipe", default=None, help="preset name or .yaml, for an fp checkpoint")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--limit-batches", type=int, default=4)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm, batches = scoring_batches(args.checkpoint, args.split, args.limit_batches)
    model = _load(args.checkpoint, args.recipe, device, dm.calibration_dataloader)
    print(format_outlier_shares(outlier_shares(model, batches, device)))
    return 0


if __name__ == "__main__":
    from qmamba.lightning.cli import run_with_clear_errors

    run_with_clear_errors(main)
