"""Compare evaluation runs side by side: every ``evaluate.py`` run found in local W&B run folders (offline runs
included) and, when asked, in a W&B project online — one row per checkpoint and mode, with perplexity, bits per byte
and the change against the fp result of the same base model on the same data.

    python -m qmamba.compare runs                         # every run under runs/wandb
    python -m qmamba.compare runs --plot runs/compare.png --api entity/project

Prints the table, writes a PNG (change against fp per checkpoint and mode) and logs the table and the plot to a W&B
``compare`` run (offline unless WANDB_MODE says otherwise; ``--no-wandb`` to skip). Run folders that cannot be read are
named and skipped; the others are still compared.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmamba.modes import MODES

ORDER = ("fp", "fakequant", "int8")  # table order of the modes
from qmamba.tracking import run_label
from qmamba.wandb_runs import RunRecord, fetch_api_runs, find_runs


@dataclass
class Row:
    run: str  # W&B run name
    started: str
    checkpoint: str
    label: str  # short checkpoint name: ptq/int8
    kind: str  # fp | prepared | int8 (of the checkpoint)
    recipe: str | None
    base: str  # the fp checkpoint it came from
    data: str  # split and data settings that must match for a comparison
    mode: str
    ppl: float
    bpb: float
    tokens: int
    delta_ppl: float | None = None  # relative change against the fp row of the same base and data
    delta_bpb: float | None = None


def _value(v: Any) -> Any:
    """A summary value: plain, or W&B's aggregate dict ({"min": x, "last": y}) when a summary metric is defined."""
    if isinstance(v, dict):
        for key in ("last", "min", "max", "mean"):
            if key in v:
                return v[key]
        return None
    return v


def rows_of(run: RunRecord) -> list[Row]:
    """The evaluation rows of one run (none if it evaluated nothing)."""
    cfg, rows = run.config, []
    checkpoint = str(cfg.get("checkpoint", ""))
    data = " ".join(f"{k}={cfg[k]}" for k in ("split", "corpus", "tokenizer", "seq_len") if cfg.get(k) is not None)
    for mode in MODES:
        tokens = int(_value(run.summary.get(f"eval/{mode}/tokens")) or 0)
        ppl = _value(run.summary.get(f"eval/{mode}/perplexity"))
        if ppl is None:
            continue
        bpb = _value(run.summary.get(f"eval/{mode}/bits_per_byte"))
        rows.append(Row(run=run.name, started=run.started, checkpoint=checkpoint, label=run_label(checkpoint),
                        kind=str(cfg.get("kind", "fp")), recipe=cfg.get("recipe"),
                        base=os.path.normpath(str(cfg.get("base") or checkpoint)),
                        data=f"{data or 'split=test'} tokens={tokens}",  # a partial evaluation compares with its own
                        mode=mode, ppl=float(ppl), bpb=float(bpb) if bpb is not None else math.nan, tokens=tokens))
    return rows


def compare(runs: list[RunRecord]) -> tuple[list[Row], list[str]]:
    """(rows, notes): the latest row of every (checkpoint, mode, data), with deltas against the fp row of the same
    base and data; notes say what was left out or could not be compared."""
    notes = []
    latest: dict[tuple, Row] = {}
    skipped = 0
    for run in runs:
        rows = rows_of(run)
        skipped += not rows
        for r in rows:
            key = (os.path.normpath(r.checkpoint), r.mode, r.data)
            seen = latest.get(key)
            if seen is None or r.started >= seen.started:
                latest[key] = r
            if seen is not None:
                notes.append(f"{r.label} [{r.mode}] was evaluated more than once: the latest run counts "
                             f"({latest[key].run})")
    if skipped:
        notes.append(f"{skipped} run(s) without evaluation results (training, sweeps, ...) are not in the table")
    rows = sorted(latest.values(), key=lambda r: (r.base, r.data, r.kind != "fp", r.label, ORDER.index(r.mode)))
    fp = {(r.base, r.data): r for r in rows if r.mode == "fp" and r.kind == "fp"}
    fp |= {(r.base, r.data): r for r in rows if r.mode == "fp" and (r.base, r.data) not in fp}
    for r in rows:
        ref = fp.get((r.base, r.data))
        if ref is None:
            continue
        r.delta_ppl = r.ppl / ref.ppl - 1
        r.delta_bpb = r.bpb / ref.bpb - 1 if math.isfinite(r.bpb) and math.isfinite(ref.bpb) else None
    for base, data in sorted({(r.base, r.data) for r in rows if r.delta_ppl is None}):
        notes.append(f"no fp result for {base} ({data}): its rows have no change against fp — run "
                     f"`python evaluate.py --checkpoint {base} --mode fp`")
    return rows, notes


def format_rows(rows: list[Row]) -> str:
    def pct(v):
        return f"{100 * v:+7.2f}%" if v is not None else f"{'—':>8s}"

    width = max([len(r.label) for r in rows] + [10])
    lines = [f"{'checkpoint':{width}s} {'recipe':14s} {'mode':9s} {'ppl':>9s} {'bpb':>8s} {'Δ ppl':>8s} "
             f"{'Δ bpb':>8s} {'tokens':>9s}  fp base, split"]
    previous = None
    for r in rows:
        group = (r.base, r.data)
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        lines.append(f"{r.label:{width}s} {str(r.recipe or '-'):14s} {r.mode:9s} {r.ppl:9.4f} {r.bpb:8.4f} "
                     f"{pct(r.delta_ppl)} {pct(r.delta_bpb)} {r.tokens:9d}  {run_label(r.base)}, "
                     f"{r.data.split()[0].removeprefix('split=')}")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> Path:
    """Horizontal bars: change in perplexity against fp for every checkpoint and mode (fp at 0), the perplexity
    written at each bar; one colour per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.delta_ppl is not None]
    if not shown:
        raise ValueError("nothing to plot: no evaluation has an fp result to compare against")
    colors = {"fp": "#7f7f7f", "fakequant": "#1f77b4", "int8": "#d62728"}
    labels = [f"{r.label} [{r.mode}]" for r in shown]
    values = [100 * r.delta_ppl for r in shown]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.42 * len(shown)), constrained_layout=True)
    y = list(range(len(shown)))[::-1]
    ax.barh(y, values, color=[colors.get(r.mode, "#2ca02c") for r in shown])
    span = max([abs(v) for v in values] + [1e-3])
    for yi, v, r in zip(y, values, shown):
        ax.text(v + (0.02 * span if v >= 0 else -0.02 * span), yi, f"{r.ppl:.4f}", va="center",
                ha="left" if v >= 0 else "right", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-1.35 * span if min(values) < 0 else -0.05 * span, 1.35 * span)
    ax.set_xlabel("perplexity change against fp of the same model (%)")
    ax.set_title("evaluation runs: perplexity against fp (value at each bar)", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), title="mode", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="*", default=["runs"], help="folders holding W&B runs (default: runs)")
    ap.add_argument("--api", action="append", default=[], help="also fetch the runs of a W&B project online "
                    "(entity/project; needs a login)")
    ap.add_argument("--plot", default="runs/compare.png", help="where to write the PNG")
    ap.add_argument("--no-wandb", action="store_true", help="do not log the comparison to W&B")
    ap.add_argument("--wandb-project", default="qmamba")
    args = ap.parse_args(argv)
    runs, problems = find_runs(*args.roots)
    for path in args.api:
        runs += fetch_api_runs(path)
    for p in problems:
        print(f"skipped: {p}")
    if not runs:
        raise ValueError(f"no W&B runs found under {', '.join(args.roots)}: run `python evaluate.py ...` first (runs "
                         "go to runs/wandb), or point at the folder that holds them")
    rows, notes = compare(runs)
    if not rows:
        raise ValueError(f"{len(runs)} W&B run(s) found, but none has evaluation results: run "
                         "`python evaluate.py --checkpoint <ckpt> --mode all`")
    print(format_rows(rows))
    for n in notes:
        print(f"note: {n}")
    png = None
    if any(r.delta_ppl is not None for r in rows):
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        png = plot(rows, Path(args.plot))
        print(f"wrote {png}")
    if not args.no_wandb:
        from qmamba.tracking import wandb_run

        with wandb_run(args.wandb_project, name="compare", group="compare", job_type="compare",
                       config={"roots": args.roots, "api": args.api, "runs": len(runs)}) as run:
            import wandb

            cols = ["checkpoint", "recipe", "mode", "ppl", "bpb", "delta_ppl", "delta_bpb", "tokens", "base", "data",
                    "run"]
            table = wandb.Table(columns=cols, data=[[r.label, r.recipe, r.mode, r.ppl, r.bpb, r.delta_ppl,
                                                     r.delta_bpb, r.tokens, r.base, r.data, r.run] for r in rows])
            run.log({"compare/table": table} | ({"compare/plot": wandb.Image(str(png))} if png else {}))
    return 0


if __name__ == "__main__":
    from qmamba.lightning.cli import run_with_clear_errors

    run_with_clear_errors(main)
