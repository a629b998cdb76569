"""Percentile sweep: perplexity against the clipping percentile α of chosen quantization points.

    python -m qmamba.percentile_sweep --checkpoint runs/pretrain/checkpoints/best.ckpt --recipe quamba_w8a8 \\
        --alphas 0.999,0.9995,0.9999,0.99999,1 --points "*.x_proj.input,*.scan.u" --points "*.out_proj.input"

Each ``--points`` is one group of point patterns (comma separated, fnmatch on full point names) swept on its own
while every other point keeps the recipe's spec; ``--per-layer`` splits every group into one group per layer. For
each group and α the model is prepared afresh, calibrated with a percentile(α) observer on the group's points (their
granularity kept), and scored in fakequant. Prints a table (group x α), writes ``percentile_sweep.csv`` and
``percentile_sweep.png`` (perplexity vs α, one line per group, fp as a reference line) to ``--out`` and logs both to
W&B (offline unless WANDB_MODE says otherwise).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qmamba.qnn import calibrate, planned_activation_points, prepare, set_mode
from qmamba.quant.recipe import ObserverSpec, Recipe, load_recipe
from qmamba.sensitivity import layer_of, perplexity


@dataclass
class SweepPoint:
    group: str
    alpha: float
    ppl: float
    delta_ppl: float  # relative to fp


def with_percentile(recipe: Recipe, points: list[str], alpha: float) -> Recipe:
    """``recipe`` with a percentile(α) observer on ``points`` (exact names), every other field of their specs kept."""
    overrides = []
    for name in points:
        spec = recipe.spec_for(name)
        if spec is None:
            raise ValueError(f"point {name} is not quantized by recipe {recipe.name!r}: nothing to sweep")
        overrides.append((name, dataclasses.replace(spec, observer=ObserverSpec("percentile", alpha=alpha))))
    return Recipe(f"{recipe.name}+p{alpha}", tuple(overrides) + recipe.targets, recipe.ignores)


def groups_of(names: list[str], patterns: list[str], per_layer: bool) -> dict[str, list[str]]:
    """Group label -> point names. A pattern group that matches nothing is an error naming it."""
    groups: dict[str, list[str]] = {}
    for spec in patterns:
        pats = [p.strip() for p in spec.split(",") if p.strip()]
        hit = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if not hit:
            raise ValueError(f"--points {spec!r} matches no activation point of this recipe; points look like "
                             f"{names[0] if names else '(none)'}")
        if not per_layer:
            groups[spec] = hit
            continue
        for n in hit:
            layer = layer_of(n)
            groups.setdefault(f"{spec} @ layer {'-' if layer is None else layer}", []).append(n)
    return groups


def sweep(model: nn.Module, recipe: Recipe | str, groups: dict[str, list[str]], alphas: list[float],
          calibration_batches: list, batches: list, device) -> tuple[float, list[SweepPoint]]:
    """(fp perplexity, one row per group and α); ``model`` is an fp model, left untouched."""
    recipe = load_recipe(recipe)
    for a in alphas:
        if not 0 < a <= 1:
            raise ValueError(f"alphas must be in (0, 1], got {a}")
    fp = perplexity(model, batches, device)
    rows = []
    for label, names in groups.items():
        for alpha in alphas:
            q = prepare(copy.deepcopy(model), with_percentile(recipe, names, alpha))
            calibrate(q, calibration_batches, progress=False)
            set_mode(q, "fakequant")
            ppl = perplexity(q, batches, device)
            rows.append(SweepPoint(label, alpha, ppl, ppl / fp - 1))
    return fp, rows


def format_rows(fp: float, rows: list[SweepPoint]) -> str:
    alphas = sorted({r.alpha for r in rows})
    groups = list(dict.fromkeys(r.group for r in rows))
    by = {(r.group, r.alpha): r for r in rows}
    width = max([len(g) for g in groups] + [10])
    lines = [f"fakequant perplexity (change against fp {fp:.4f}) by percentile α",
             f"{'points':{width}s} " + " ".join(f"{a:>17g}" for a in alphas)]
    for g in groups:
        cells = [f"{by[g, a].ppl:9.4f} ({100 * by[g, a].delta_ppl:+5.2f}%)" for a in alphas]
        best = min(alphas, key=lambda a: by[g, a].ppl)
        lines.append(f"{g:{width}s} " + " ".join(f"{c:>17s}" for c in cells) + f"   best α {best:g}")
    return "\n".join(lines)


def write_csv(rows: list[SweepPoint], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["group", "alpha", "ppl", "delta_ppl"])
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))


def plot(fp: float, rows: list[SweepPoint], path: Path, title: str = "") -> Path:
    """Perplexity against 1 - α (log axis; α = 1, min-max, drawn at the left edge), one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r.alpha for r in rows})
    tails = [1 - a for a in alphas if a < 1]
    floor = min(tails) / 10 if tails else 1e-6  # where α = 1 (no clipping) sits on the log axis
    x_of = {a: (1 - a if a < 1 else floor) for a in alphas}
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for g in dict.fromkeys(r.group for r in rows):
        pts = sorted((x_of[r.alpha], r.ppl) for r in rows if r.group == g)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=g)
    ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"fp {fp:.4f}")
    ax.set_xscale("log")
    ax.set_xticks([x_of[a] for a in alphas], [("1 (min-max)" if a == 1 else f"{a:g}") for a in alphas],
                  rotation=30, ha="right")
    ax.minorticks_off()
    ax.invert_xaxis()  # more clipping to the right
    ax.set_xlabel("percentile α of the clipping value (log scale of 1 - α)")
    ax.set_ylabel("fakequant perplexity")
    ax.set_title(title or "percentile sweep", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from qmamba.evaluation import scoring_batches
    from qmamba.lightning.checkpoint import load_checkpoint_model
    from qmamba.qnn import is_prepared

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an fp checkpoint")
    ap.add_argument("--recipe", default="quamba_w8a8", help="preset name or .yaml (default quamba_w8a8)")
    ap.add_argument("--alphas", default="0.999,0.9995,0.9999,0.99999,1", help="comma list in (0, 1]")
    ap.add_argument("--points", action="append", help="comma list of point patterns, one group (repeat); default: "
                    "the points the recipe already clips with a percentile")
    ap.add_argument("--per-layer", action="store_true", help="one group per layer of each --points group")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--limit-batches", type=int, default=4)
    ap.add_argument("--out", default="runs/percentile_sweep")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--wandb-project", default="qmamba")
    args = ap.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be a comma list of numbers in (0, 1], got {args.alphas!r}") from None
    if not alphas:
        raise ValueError("--alphas is empty")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm, batches = scoring_batches(args.checkpoint, args.split, max(1, args.limit_batches))
    model = load_checkpoint_model(args.checkpoint).to(device).eval()
    if is_prepared(model):
        raise ValueError(f"{args.checkpoint} is a quantized checkpoint: the sweep recalibrates, give the fp one")
    recipe = load_recipe(args.recipe)
    names = planned_activation_points(model, recipe)
    patterns = args.points
    if not patterns:
        clipped = [n for n in names if recipe.spec_for(n).observer.kind == "percentile"]
        if not clipped:
            raise ValueError(f"recipe {recipe.name!r} clips no point with a percentile: say which with --points")
        patterns = [",".join(sorted({"*." + n.split("mixer.", 1)[-1] for n in clipped}))]
    groups = groups_of(names, patterns, args.per_layer)
    start = time.perf_counter()
    calibration = list(dm.calibration_dataloader())
    fp, rows = sweep(model, recipe, groups, alphas, calibration, batches, device)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "percentile_sweep.csv")
    title = f"{Path(args.checkpoint).name}, recipe {recipe.name}, {args.split} x {len(batches)} batches"
    png = plot(fp, rows, out / "percentile_sweep.png", title)
    print(format_rows(fp, rows))
    print(f"{len(rows)} calibrations in {seconds:.1f} s; wrote {out / 'percentile_sweep.csv'} and {png}")
    if not args.no_wandb:
        from qmamba.tracking import wandb_run

        with wandb_run(args.wandb_project, name=f"sweep-{recipe.name}", group="sweep", job_type="sweep",
                       config={"checkpoint": args.checkpoint, "recipe": recipe.to_dict(), "alphas": alphas,
                               "groups": groups, "split": args.split, "batches": len(batches)}) as run:
            import wandb

            run.log({"sweep/table": wandb.Table(columns=["group", "alpha", "ppl", "delta_ppl"],
                                                data=[[r.group, r.alpha, r.ppl, r.delta_ppl] for r in rows]),
                     "sweep/plot": wandb.Image(str(png))})
            run.summary.update({"sweep/fp_ppl": fp, "sweep/seconds": seconds})
    return 0


if __name__ == "__main__":
    from qmamba.lightning.cli import run_with_clear_errors

    run_with_clear_errors(main)
