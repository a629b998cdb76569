"""Train a Mamba LM: `python train.py --config configs/pretrain.yaml` (see README.md, configs/)."""

from qmamba.lightning.cli import train_main

if __name__ == "__main__":
    train_main()
