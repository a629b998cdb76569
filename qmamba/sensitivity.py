"""Where precision goes: per quantization point, the SQNR of its fakequant tensor against the fp one, and the
perplexity change when that point alone is quantized (every other point left in floating point).

    python -m qmamba.sensitivity --checkpoint runs/pretrain/checkpoints/best.ckpt --recipe quamba_w8a8 \\
        --limit-batches 4 --out runs/sensitivity

prints the points ranked by perplexity change, writes ``sensitivity.csv`` and ``sensitivity.png`` (heatmaps: layer x
point, perplexity change and SQNR) to ``--out``, and logs both to W&B (offline unless WANDB_MODE says otherwise).

SQNR (dB) = 10 log10(sum x^2 / sum (x - fakequant(x))^2) over the scored batches (activations) or the weight
itself (weights; a rotated linear's weight in its rotated frame, as it is quantized).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from qmamba.lightning.metrics import LMMetrics
from qmamba.qnn import calibrate, current_mode, is_calibrated, is_converted, prepare, quant_points, set_mode, twins
from qmamba.qnn.point import QuantPoint
from qmamba.quant.dual_scale import dual_fake_quantize
from qmamba.quant.numerics import fake_quantize


def layer_of(point: str) -> int | None:
    """The layer index in a point name (``backbone.layers.3.mixer.scan.u`` -> 3), None outside the layers."""
    m = re.search(r"layers\.(\d+)\.", point)
    return int(m.group(1)) if m else None


@dataclass
class PointSensitivity:
    point: str
    kind: str  # "activation" | "weight"
    sqnr_db: float
    ppl: float
    delta_ppl: float  # relative change against fp, e.g. 0.012 = +1.2 %

    @property
    def layer(self) -> int | None:
        return layer_of(self.point)

    @property
    def tensor(self) -> str:
        """The point's name inside its mixer (``in_proj.input``, ``scan.u`` ...)."""
        return self.point.split("mixer.", 1)[-1]


# ---- scoring ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity_and_bpb(model: nn.Module, batches: list, device) -> dict[str, float]:
    """Token-weighted perplexity and bits per byte of ``model`` (in its current mode) over ``batches``."""
    metrics = LMMetrics(model.config.vocab_size).to(device)
    for x, y, nbytes in batches:
        metrics.update(model(x.to(device)), y.to(device), nbytes.to(device))
    return {k: float(v) for k, v in metrics.compute().items()}


def perplexity(model: nn.Module, batches: list, device) -> float:
    return perplexity_and_bpb(model, batches, device)["ppl"]


@contextlib.contextmanager
def only_points(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Inside this block, fakequant quantizes only the points named (the others pass their tensors through)."""
    keep = set(names)
    points = list(quant_points(model))
    unknown = keep - {p.name for p in points}
    if unknown:
        raise ValueError(f"no quantization point named {sorted(unknown)[0]!r} in this model")
    try:
        for p in points:
            p.enabled = p.name in keep
        yield
    finally:
        for p in points:
            p.enabled = True


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


@torch.no_grad()
def activation_sqnr(model: nn.Module, batches: list, device) -> dict[str, float]:
    """SQNR of every activation point over ``batches``, the model running in fp (each tensor as fp produces it)."""
    energy: dict[str, list[float]] = {}

    def probe(point: QuantPoint, x: torch.Tensor) -> None:
        scale = point.spec.granularity.broadcast(point.scale.detach(), x.dim())
        if point.dual is not None:  # dual-scale SSM input: its own two-scale fakequant
            s_out = point.spec.granularity.broadcast(point.outlier_scale.detach(), x.dim())
            fq = dual_fake_quantize(x.float(), scale, s_out, point.dual.encoding, point.dual.knee)
        else:
            fq = fake_quantize(x.float(), scale, point.spec.bits)
        noise = (x.float() - fq).double().pow(2).sum()
        e = energy.setdefault(point.name, [0.0, 0.0])
        e[0] += float(x.double().pow(2).sum())
        e[1] += float(noise)

    points = [p for p in quant_points(model) if not p.is_weight]
    mode = current_mode(model)
    set_mode(model, "fp")
    try:
        for p in points:
            p.probe = probe
        for x, _, _ in batches:
            model(x.to(device))
    finally:
        for p in points:
            p.probe = None
        set_mode(model, mode if mode != "mixed" else "fp")
    return {name: _sqnr_db(s, n) for name, (s, n) in energy.items()}


@torch.no_grad()
def weight_sqnr(model: nn.Module) -> dict[str, float]:
    out = {}
    for twin in twins(model):
        qw = twin.q("weight") if "weight" in twin.POINTS else None
        if qw is None:
            continue
        w = twin.weight_to_quantize().float()
        scale = qw.scale_for(w).detach()
        noise = (w - fake_quantize(w, scale, qw.spec.bits)).double().pow(2).sum()
        out[qw.name] = _sqnr_db(float(w.double().pow(2).sum()), float(noise))
    return out


def sensitivity(model: nn.Module, batches: list, device=None, progress: bool = True) -> tuple[float,
                                                                                                list[PointSensitivity]]:
    """(fp perplexity, one row per quantization point) on ``batches`` ((x, y, nbytes) tuples) for a calibrated,
    not yet converted model. Each row's perplexity has that point alone in fakequant."""
    if is_converted(model):
        raise ValueError("sensitivity needs the calibrated (prepared) model, not a converted int8 one: use the "
                         "calibrated checkpoint (Finalize's prepared_path) or an fp checkpoint with --recipe")
    if not is_calibrated(model):
        raise ValueError("sensitivity needs a calibrated model: calibrate it first (or pass an fp checkpoint and a "
                         "recipe to the command line)")
    device = device or next(model.parameters()).device
    mode = current_mode(model)
    points = list(quant_points(model))
    iterator = points
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(points, desc="one point at a time", leave=False)
    rows = []
    try:
        set_mode(model, "fp")
        fp = perplexity(model, batches, device)
        sqnr = activation_sqnr(model, batches, device) | weight_sqnr(model)
        set_mode(model, "fakequant")
        for p in iterator:
            with only_points(model, [p.name]):
                ppl = perplexity(model, batches, device)
            rows.append(PointSensitivity(p.name, "weight" if p.is_weight else "activation",
                                         sqnr.get(p.name, math.nan), ppl, ppl / fp - 1))
    finally:
        set_mode(model, mode if mode != "mixed" else "fp")
    return fp, rows


# ---- reporting -------------------------------------------------------------------------------------------------------
def format_rows(fp: float, rows: list[PointSensitivity], top: int | None = None) -> str:
    ranked = sorted(rows, key=lambda r: -r.delta_ppl)[:top]
    lines = [f"fp perplexity {fp:.4f}; points ranked by the perplexity change when quantized alone",
             f"{'#':>3s} {'quantization point':58s} {'kind':10s} {'SQNR dB':>8s} {'ppl':>9s} {'Δ ppl':>8s}"]
    for i, r in enumerate(ranked, 1):
        lines.append(f"{i:3d} {r.point:58s} {r.kind:10s} {r.sqnr_db:8.2f} {r.ppl:9.4f} {100 * r.delta_ppl:+7.3f}%")
    return "\n".join(lines)


def write_csv(rows: list[PointSensitivity], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["point", "kind", "sqnr_db", "ppl", "delta_ppl"])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot(fp: float, rows: list[PointSensitivity], path: Path, title: str = "") -> Path:
    """Two heatmaps, layer (rows) x point (columns): perplexity change (%) and SQNR (dB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tensors = list(dict.fromkeys(r.tensor for r in rows))
    layers = sorted({r.layer for r in rows if r.layer is not None})
    grid = {k: np.full((len(layers), len(tensors)), np.nan) for k in ("delta", "sqnr")}
    for r in rows:
        if r.layer is None:
            continue
        i, j = layers.index(r.layer), tensors.index(r.tensor)
        grid["delta"][i, j] = 100 * r.delta_ppl
        grid["sqnr"][i, j] = r.sqnr_db if math.isfinite(r.sqnr_db) else np.nan
    height = max(4.0, 0.3 * len(layers) + 2.8)
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 0.45 * len(tensors) * 2 + 3), height), constrained_layout=True)
    delta = grid["delta"][np.isfinite(grid["delta"])]
    lo, hi = (float(delta.min()), float(delta.max())) if delta.size else (0.0, 1.0)
    norm = (matplotlib.colors.TwoSlopeNorm(vmin=lo, vcenter=0.0, vmax=hi) if lo < 0 < hi else None)
    panels = (("delta", "perplexity change when quantized alone (%)", "%", "RdBu_r" if norm else "Reds", norm),
              ("sqnr", "SQNR of fakequant vs fp (dB)", "dB", "viridis", None))
    for ax, (key, label, unit, cmap, nrm) in zip(axes, panels):
        im = ax.imshow(grid[key], aspect="auto", cmap=cmap, norm=nrm, interpolation="nearest")
        ax.set_xticks(range(len(tensors)), tensors, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=8)
        ax.set_xlabel("quantization point")
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, label=unit)
    fig.suptitle(f"{title} — fp perplexity {fp:.4f}" if title else f"fp perplexity {fp:.4f}", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- command line ------------------------------------------------------------------------------------------------
def _load(checkpoint: str, recipe: str | None, device, batches_for_calibration):
    from qmamba.lightning.checkpoint import load_checkpoint_model
    from qmamba.qnn import is_prepared

    model = load_checkpoint_model(checkpoint).to(device).eval()
    if is_prepared(model):
        if recipe:
            raise ValueError(f"{checkpoint} is already prepared with recipe {model.quant_recipe.name!r}; drop "
                             "--recipe, or give the fp checkpoint to try another recipe")
    else:
        if not recipe:
            raise ValueError(f"{checkpoint} is an fp model: give --recipe (a preset such as quamba_w8a8, or a .yaml)")
        prepare(model, recipe)
    if not is_calibrated(model):
        calibrate(model, batches_for_calibration(), progress=False)
    return model


def main(argv=None) -> int:
    from qmamba.evaluation import scoring_batches

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an fp checkpoint (with --recipe) or a calibrated one")
    ap.add_argument("--recipe", default=None, help="preset name or .yaml, for an fp checkpoint")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--limit-batches", type=int, default=4, help="batches of the split to score (default 4)")
    ap.add_argument("--top", type=int, default=20, help="rows to print (all go to the CSV)")
    ap.add_argument("--out", default="runs/sensitivity", help="folder for sensitivity.csv / sensitivity.png")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--wandb-project", default="qmamba")
    args = ap.parse_args(argv)
    if args.limit_batches < 1:
        raise ValueError(f"--limit-batches must be >= 1, got {args.limit_batches}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm, batches = scoring_batches(args.checkpoint, args.split, args.limit_batches)
    start = time.perf_counter()
    model = _load(args.checkpoint, args.recipe, device, dm.calibration_dataloader)
    fp, rows = sensitivity(model, batches, device)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sensitivity.csv")
    title = f"{Path(args.checkpoint).name}, recipe {model.quant_recipe.name}, {args.split} x {len(batches)} batches"
    png = plot(fp, rows, out / "sensitivity.png", title)
    print(format_rows(fp, rows, args.top))
    print(f"{len(rows)} points in {seconds:.1f} s; wrote {out / 'sensitivity.csv'} and {png}")
    if not args.no_wandb:
        from qmamba.tracking import wandb_run

        with wandb_run(args.wandb_project, name=f"sensitivity-{model.quant_recipe.name}", group="sensitivity",
                       job_type="sensitivity", config={"checkpoint": args.checkpoint, "split": args.split,
                                                      "recipe": model.quant_recipe.to_dict(),
                                                      "batches": len(batches)}) as run:
            import wandb

            table = wandb.Table(columns=["point", "kind", "sqnr_db", "ppl", "delta_ppl"],
                                data=[[r.point, r.kind, r.sqnr_db, r.ppl, r.delta_ppl] for r in rows])
            run.log({"sensitivity/table": table, "sensitivity/plot": wandb.Image(str(png))})
            top = max(rows, key=lambda r: r.delta_ppl)
            run.summary.update({"sensitivity/fp_ppl": fp, "sensitivity/top_point": top.point,
                                "sensitivity/top_delta_ppl": top.delta_ppl, "sensitivity/seconds": seconds})
    return 0


if __name__ == "__main__":
    from qmamba.lightning.cli import run_with_clear_errors

    run_with_clear_errors(main)
