#!/usr/bin/env bash
# Train one house model on the device and evaluate its best checkpoint; logs go to $OUT when set.
# Usage: bash scripts/house_train.sh pretrain_gpu [extra train.py flags]
set -euo pipefail
cfg=$1; shift
out=${OUT:-runs}
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 train.py --config "configs/$cfg.yaml" --trainer.enable_progress_bar false "$@" 2>&1 | tee "$out/$cfg.train.log" | grep -v Warning
echo "train.py wall: $(( $(date +%s) - start )) s"
python3 evaluate.py --checkpoint "runs/$cfg/checkpoints/best.ckpt" --mode fp --no-wandb 2>&1 | tee "$out/$cfg.eval.log" | tail -3
