#!/usr/bin/env bash
# On the device: PTQ and / or QAT of a house model (pretrained first if its checkpoint is missing), evaluating every
# checkpoint in every mode it runs in, with the fakequant-vs-int8 agreement report.
# Usage: bash scripts/house_quant.sh "" | _mamba2  [ptq qat]   (extra train.py flags in $QAT_FLAGS for the QAT run)
# Every evaluate.py output (each agreement row) goes to $OUT/eval<sfx>-<kind>.log, the summary to stdout.
set -euo pipefail
sfx=${1:-}; shift || true
kinds=${*:-ptq qat}
out=${OUT:-runs}
export PYTHONUNBUFFERED=1
ev() { local log=$1; shift; python3 evaluate.py --no-wandb "$@" > "$log" 2>&1
       grep -E "^(mode|int8|fp|fakequant) |agreement:|block drift|breaks" "$log"; }
[ -f "runs/pretrain_gpu$sfx/checkpoints/best.ckpt" ] || bash scripts/house_train.sh "pretrain_gpu$sfx" >/dev/null
for kind in $kinds; do
  cfg="${kind}_gpu$sfx"; start=$(date +%s)
  flags=(); [ "$kind" = qat ] && flags=(${QAT_FLAGS:-})
  python3 train.py --config "configs/$cfg.yaml" --trainer.enable_progress_bar false "${flags[@]}" > "$out/$cfg.log" 2>&1
  { echo "== $cfg (train.py wall $(( $(date +%s) - start )) s)"
    grep -E "^step|val ppl|calibrated|checkpoint \(" "$out/$cfg.log" || true
    ev "$out/eval$sfx-$kind.log" --checkpoint "runs/$cfg/checkpoints/int8.ckpt" --mode all --agreement; }
done
