"""Every YAML in configs/ parses and instantiates through the training CLI (nothing is run or written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from qmamba import MambaLM, preset
from qmamba.lightning.cli import TrainCLI
from qmamba.lightning.module import LMModule

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"pretrain.yaml", "pretrain_gpu.yaml", "pretrain_gpu_mamba2.yaml", "ptq.yaml",
                                         "qat.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    if yaml.safe_load(path.read_text())["model"]["init_args"].get("init_from"):  # a stand-in for the pretrain ckpt
        ckpt = tmp_path.parent / f"{path.stem}-init.ckpt"
        model = MambaLM(preset("tiny"))
        torch.save({"qmamba": {"config": model.config.to_dict()},
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
        args += ["--model.init_args.init_from", str(ckpt)]
    cli = TrainCLI(args=args)
    assert isinstance(cli.model, LMModule)
    assert cli.model.config.vocab_size >= cli.datamodule.vocab_size  # the tokenizer fits the model
    assert not any(tmp_path.iterdir())  # parsing writes nothing
