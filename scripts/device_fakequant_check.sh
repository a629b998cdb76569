#!/usr/bin/env bash
# On a GPU device machine (carry .whl, see scripts/device_setup.sh): the fused fakequant path in one call — its GPU
# tests (fused fake-quant and Hadamard vs torch, no host sync in a warmed-up step), then the QAT step time of
# house-mamba1 with fused and with torch fake-quant side by side (benchmarks/train_speed.py, with its profile of one
# step), and the host work of the step on the GPU (benchmarks/host_ops.py). Logs go to $OUT.
# Usage: bash scripts/device_fakequant_check.sh
set -uo pipefail
out=${OUT:-runs}
mkdir -p "$out"
bash scripts/device_setup.sh 2>&1 | tail -2
timeout 300 python3 -m pytest -q -m gpu tests/gpu/test_gpu_fake_quant.py tests/gpu/test_gpu_no_host_sync.py \
  "tests/gpu/test_gpu_kernel_hadamard.py::test_triton_transform_matches_torch" > "$out/fakequant_gpu_tests.log" 2>&1
tail -15 "$out/fakequant_gpu_tests.log"
timeout 240 python3 benchmarks/train_speed.py --preset house-mamba1 --batch 64 --seq-len 512 --steps 15 --warmup 3 \
  --recipe qat_w8a8 --torch-fake-quant --profile 30 2>&1 | grep -v Warning > "$out/train_speed_qat.log"
grep -E "ms/step|/ fp" "$out/train_speed_qat.log"
timeout 120 python3 benchmarks/host_ops.py --preset house-mamba1 --recipe qat_w8a8 --top 20 2>&1 | grep -v Warning |
  tee "$out/host_ops_qat.log"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')  $(date -u +%F)" | tee -a "$out/train_speed_qat.log"
