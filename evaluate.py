"""Evaluate a model: `python evaluate.py --checkpoint runs/pretrain/checkpoints/best.ckpt --mode fp`.

Prints perplexity and bits per byte on the test split (token-weighted over the whole split) and logs them to W&B
(offline unless WANDB_MODE says otherwise). Modes: int8 | fp | fakequant, or their aliases 0 | 1 | 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qmamba.lightning.cli import default_wandb_offline, run_with_clear_errors

DEFAULT_CHECKPOINT = "runs/pretrain/checkpoints/best.ckpt"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                    help="a qmamba .ckpt, a mamba_ssm / Hugging Face model folder, or a hub id "
                         f"(default: {DEFAULT_CHECKPOINT}, written by `python train.py --config configs/pretrain.yaml`)")
    ap.add_argument("--mode", default="fp", help="int8 | fp | fakequant (aliases 0 | 1 | 2), a comma list, or all")
    ap.add_argument("--split", default="test", choices=["test", "validation"])
    ap.add_argument("--corpus", help="override the checkpoint's corpus (shakespeare, a folder, hf:<name>[:<config>])")
    ap.add_argument("--tokenizer", help="override the checkpoint's tokenizer (bytes, or a transformers name)")
    ap.add_argument("--seq-len", type=int, help="override the window length")
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"])
    ap.add_argument("--accelerator", default="auto", help="lightning accelerator: auto | cpu | gpu")
    ap.add_argument("--limit-batches", type=float, default=1.0, help="fraction (<= 1) or number of batches")
    ap.add_argument("--wandb-project", default="qmamba")
    ap.add_argument("--run-name", help="W&B run name (default: eval-<mode>-<checkpoint name>)")
    ap.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    ap.add_argument("--agreement", action="store_true",
                    help="also print the fakequant-vs-int8 agreement of every quantized activation (first test batch)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    default_wandb_offline()
    from qmamba.evaluation import evaluate, format_table
    from qmamba.modes import parse_mode

    modes = "all" if args.mode == "all" else [parse_mode(m) for m in args.mode.split(",")]
    mode = "all" if modes == "all" else "+".join(modes)
    data = {"eval_batch_size": args.batch_size}
    for key, value in (("corpus", args.corpus), ("tokenizer", args.tokenizer), ("seq_len", args.seq_len)):
        if value is not None:
            data[key] = value
    if str(args.checkpoint).endswith(".ckpt") and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist; make it with "
                                "`python train.py --config configs/pretrain.yaml` or pass --checkpoint")
    logger = None
    if not args.no_wandb:
        from lightning.pytorch.loggers import WandbLogger

        from qmamba.evaluation import checkpoint_info
        from qmamba.tracking import define_summary_metrics, run_label

        info = checkpoint_info(str(args.checkpoint))
        name = args.run_name or f"eval-{mode}-{run_label(str(args.checkpoint))}"
        logger = WandbLogger(project=args.wandb_project, name=name, group="evaluate", job_type="evaluate",
                             save_dir="runs", config={**info, "mode": mode, "split": args.split, **data})
        define_summary_metrics(logger.experiment)
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    results = evaluate(args.checkpoint, modes=modes, split=args.split, data=data, backend=args.backend,
                       accelerator=args.accelerator, limit_batches=limit, logger=logger)
    if logger is not None:
        for r in results:
            logger.experiment.summary.update({f"eval/{r.mode}/perplexity": r.perplexity,
                                              f"eval/{r.mode}/bits_per_byte": r.bits_per_byte,
                                              f"eval/{r.mode}/tokens": r.tokens, f"eval/{r.mode}/seconds": r.seconds})
    print(format_table(results))
    if args.agreement:
        from qmamba.evaluation import agreement
        from qmamba.qnn import format_agreement

        reports = agreement(args.checkpoint, data=data, backend=args.backend, forcings=("op", "block"))
        rows, drift = reports["op"], reports["block"]
        print(format_agreement(rows))
        worst = min(rows, key=lambda r: (r.identical, -r.max_lsb))
        ok = all(r.meets_contract for r in rows)
        print(f"agreement: {len(rows)} points, worst {worst.point}: {100 * worst.identical:.3f}% identical, "
              f"max {max(r.max_lsb for r in rows)} LSB -> {'meets' if ok else 'BREAKS'} the contract "
              "(>= 99.9% identical, <= 1 LSB; each op on the int8 run's inputs)")
        dworst = min(drift, key=lambda r: (r.identical, -r.max_lsb))
        print(f"block drift (each block on its int8-run input, differences carried through the block): worst "
              f"{dworst.point}: {100 * dworst.identical:.3f}% identical, max {max(r.max_lsb for r in drift)} LSB")
        if logger is not None:
            logger.experiment.summary.update({"agreement/min_identical": worst.identical,
                                              "agreement/max_lsb": max(r.max_lsb for r in rows)})


if __name__ == "__main__":
    run_with_clear_errors(main)
