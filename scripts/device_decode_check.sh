#!/usr/bin/env bash
# On a GPU device machine (carry .whl, see scripts/device_setup.sh): the fused decode work in one call — GPU tests of
# the kernels and hand-offs it uses (GEMV segment out_scales, the fused pre-norm, codes between parts, CUDA-graph
# generation, the fused absmax fake-quant), then benchmarks/latency.py (qmamba int8 vs mamba_ssm fp16, with a
# profile of 10 un-graphed decode steps per engine). Logs go to $OUT. Usage: bash scripts/device_decode_check.sh
set -uo pipefail
out=${OUT:-runs}
mkdir -p "$out"
bash scripts/device_setup.sh 2>&1 | tail -2
python3 -c "import qmamba.kernels as k; k.load()" 2>&1 | tail -2
timeout 240 python3 -m pytest -q -m gpu tests/gpu/test_gpu_codes.py tests/gpu/test_gpu_kernel_norm.py \
  tests/gpu/test_gpu_generation.py "tests/gpu/test_gpu_kernel_linear.py::test_gemv_segment_out_scales" \
  "tests/gpu/test_gpu_fake_quant.py::test_fused_absmax_fake_quant_equals_torch" \
  "tests/gpu/test_gpu_fake_quant.py::test_qat_step_fused_equals_torch" > "$out/decode_gpu_tests.log" 2>&1
tail -25 "$out/decode_gpu_tests.log"
timeout 280 python3 benchmarks/latency.py --configs mamba-2.8b mamba2-2.7b mamba-130m --reps 5 --profile-decode 30 \
  --json "$out/latency.json" > "$out/latency.log" 2>&1
grep -E "TTFT|speedup|FAILED|copy bandwidth" "$out/latency.log"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')  $(date -u +%F)"
