"""Command-line entry points shared by train.py and evaluate.py: defaults (W&B offline), clear errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI

from qmamba.data import TextDataModule
from qmamba.lightning.module import LMModule
from qmamba.tracking import default_wandb_offline  # noqa: F401  (train.py / evaluate.py import it from here)

# Errors a user fixes by changing a flag, a file or an install: printed as one message, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, ImportError)


def run_with_clear_errors(main: Callable[[], None]) -> None:
    """Run ``main``; a user error prints ``error: <message>`` and exits with status 2."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class TrainCLI(LightningCLI):
    """``python train.py --config configs/pretrain.yaml [--trainer.max_steps 100 ...]``: fit, then test the best
    checkpoint. No subcommand; ``--ckpt_path`` resumes a run, ``--test false`` skips the test."""

    def __init__(self, args=None):
        super().__init__(LMModule, TextDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                         args=args, seed_everything_default=1234,
                         save_config_kwargs={"overwrite": True}, parser_kwargs={"default_env": False})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from this checkpoint")
        parser.add_argument("--test", type=bool, default=True, help="test the best checkpoint after fit")

    def fit_and_test(self) -> None:
        ckpt = self.config.get("ckpt_path")
        if ckpt and not os.path.exists(ckpt):
            raise FileNotFoundError(f"--ckpt_path {ckpt} does not exist")
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        if self.config.get("test"):
            has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)


def train_main(args=None) -> None:
    default_wandb_offline()
    run_with_clear_errors(lambda: TrainCLI(args).fit_and_test())
