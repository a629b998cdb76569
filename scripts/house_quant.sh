#!/usr/bin/env bash
# On the device: pretrain a house model, then PTQ and QAT it, evaluating every checkpoint in every mode it runs in,
# with the fakequant-vs-int8 agreement report. Usage: bash scripts/house_quant.sh "" | _mamba2
set -euo pipefail
sfx=${1:-}
out=${OUT:-runs}
export PYTHONUNBUFFERED=1
# evaluate.py; the whole output (with every agreement row) goes to $out/eval-<n>.log, the summary to stdout
n=0
ev() { n=$((n + 1)); python3 evaluate.py --no-wandb "$@" > "$out/eval$sfx-$n.log" 2>&1
       grep -E "^(mode|int8|fp|fakequant) |agreement:|block drift|breaks" "$out/eval$sfx-$n.log"; }
[ -f "runs/pretrain_gpu$sfx/checkpoints/best.ckpt" ] || bash scripts/house_train.sh "pretrain_gpu$sfx" >/dev/null
echo "== fp"; ev --checkpoint "runs/pretrain_gpu$sfx/checkpoints/best.ckpt" --mode fp
for kind in ptq qat; do
  cfg="${kind}_gpu$sfx"; start=$(date +%s)
  python3 train.py --config "configs/$cfg.yaml" --trainer.enable_progress_bar false 2>&1 | tee "$out/$cfg.log" \
    | grep -E "^step|val ppl|calibrated|checkpoint \(" || true
  echo "== $cfg (train.py wall $(( $(date +%s) - start )) s)"
  ev --checkpoint "runs/$cfg/checkpoints/int8.ckpt" --mode all --agreement
done
