#!/usr/bin/env bash
# On a GPU device machine (carry .whl, see scripts/device_setup.sh): the int8 prefill with codes from the GEMMs, the
# Mamba2 fused norm / SSD kernels, in two stages that each fit one device call (600 s):
#   tests  GPU tests of the hand-offs (Mamba1 in_proj / x_proj / dt_proj and Mamba2 in_proj emitting their consumers'
#          codes: GEMM per-column and GEMV segment out_scales; the Mamba2 norm handing out_proj rotated codes; eager
#          and graphed generation) and of the kernels they feed (gated norm, SSD incl. float_in, linear, norm)
#   bench  the int8 prefill's host work counted on the GPU, then benchmarks/latency.py: mamba_ssm fp16, qmamba int8
#          and qmamba int8 with no codes handed between parts, with the host syncs of one prefill per engine
# Logs go to $OUT. Usage: bash scripts/device_prefill_check.sh tests|bench   (the machine stays warm in between)
set -uo pipefail
stage=${1:-tests}
out=${OUT:-runs}
mkdir -p "$out"
bash scripts/device_setup.sh 2>&1 | tail -2
python3 -c "import qmamba.kernels as k; k.load()" 2>&1 | tail -2
if [ "$stage" = tests ]; then
  # causal-conv1d (the fp16 baseline's conv kernels) builds on spare cores while the tests run, for the bench stage
  MAX_JOBS=6 bash scripts/build_causal_conv1d.sh > "$out/causal_conv1d_build.log" 2>&1 &
  conv_pid=$!
  timeout 400 python3 -m pytest -q -m gpu tests/gpu/test_gpu_codes.py tests/gpu/test_gpu_kernel_gated_norm.py \
    tests/gpu/test_gpu_kernel_ssd.py tests/gpu/test_gpu_kernel_linear.py tests/gpu/test_gpu_kernel_norm.py \
    tests/gpu/test_gpu_generation.py tests/gpu/test_gpu_no_host_sync.py > "$out/prefill_gpu_tests.log" 2>&1
  tail -25 "$out/prefill_gpu_tests.log"
  wait "$conv_pid"; tail -3 "$out/causal_conv1d_build.log"
else
  for p in "mamba-130m quamba_w8a8" "mamba2-130m quamba2_w8a8"; do
    set -- $p
    timeout 60 python3 benchmarks/host_ops.py --preset "$1" --recipe "$2" --int8 --seq-len 1024 2>&1 | grep -v USDT \
      | tail -3
  done
  # the unfused engine beside the default: what the hand-offs of codes bring, measured in the same run
  timeout 480 python3 benchmarks/latency.py --configs mamba2-2.7b mamba-2.8b --reps 5 --sync-check \
    --engines "mamba_ssm fp16" "qmamba int8" "qmamba int8 unfused" --json "$out/latency.json" > "$out/latency.log" 2>&1
  grep -E "TTFT|speedup|FAILED|copy bandwidth|host syncs|^    " "$out/latency.log" | head -60
fi
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')  $(date -u +%F)"
