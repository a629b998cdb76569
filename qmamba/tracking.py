"""W&B conventions shared by every qmamba command: runs go under ``runs/wandb`` (offline unless WANDB_MODE says
otherwise), named ``<job>-<what>``, grouped by job (pretrain / ptq / qat / evaluate / sensitivity / sweep), with
summary metrics defined so the W&B run table compares runs directly (perplexity and bits per byte: min; agreement
share: min, LSB: max)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_MODES = ("fp", "fakequant", "int8")
SUMMARY_METRICS = ({f"{split}/{m}": "min" for split in ("val", "test") for m in ("loss", "ppl", "bpb")}
                   | {f"val_{mode}/{m}": "min" for mode in _MODES for m in ("ppl", "bpb")}
                   | {f"eval/{mode}/{m}": "min" for mode in _MODES for m in ("perplexity", "bits_per_byte")}
                   | {"train/loss": "min", "agreement/min_identical": "min", "agreement/max_lsb": "max"})


def default_wandb_offline() -> None:
    """W&B runs offline unless the user set WANDB_MODE (sync later with `wandb sync runs/wandb/offline-run-*`)."""
    os.environ.setdefault("WANDB_MODE", "offline")


def run_label(checkpoint: str) -> str:
    """A short, readable name for a checkpoint: ``runs/ptq/checkpoints/int8.ckpt`` -> ``ptq/int8``."""
    path = Path(checkpoint)
    if path.suffix != ".ckpt":
        return str(checkpoint)
    parent = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{parent.name}/{path.stem}" if parent.name else path.stem


def define_summary_metrics(run) -> None:
    """Tell W&B how to summarize qmamba's metrics (lower perplexity is better, and so on)."""
    for pattern, summary in SUMMARY_METRICS.items():
        run.define_metric(pattern, summary=summary)


@contextlib.contextmanager
def wandb_run(project: str, name: str, group: str, job_type: str, config: dict[str, Any],
              save_dir: str | os.PathLike = "runs") -> Iterator[Any]:
    """A W&B run for a command that is not a Lightning fit (sensitivity, sweeps, compare), finished on exit."""
    default_wandb_offline()
    import wandb

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name, group=group, job_type=job_type, config=config, dir=str(save_dir))
    define_summary_metrics(run)
    try:
        yield run
    finally:
        run.finish()
