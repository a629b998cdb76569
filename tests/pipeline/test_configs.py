"""Every YAML in configs/ parses and instantiates through the training CLI (nothing is run or written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmamba.lightning.cli import TrainCLI
from qmamba.lightning.module import LMModule

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"pretrain.yaml", "pretrain_gpu.yaml", "pretrain_gpu_mamba2.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = TrainCLI(args=["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"])
    assert isinstance(cli.model, LMModule)
    assert cli.model.config.vocab_size >= cli.datamodule.vocab_size  # the tokenizer fits the model
    assert not any(tmp_path.iterdir())  # parsing writes nothing
