#!/usr/bin/env bash
# On a GPU device machine (carry .whl, see scripts/device_setup.sh): the int8 prefill with codes from the GEMMs, the
# Mamba2 fused norm / SSD kernels, in stages that each fit one device call (600 s; a fresh machine spent 330 s of
# the first on setup on 2026-12-04, mamba_ssm's and qmamba's CUDA builds one after the other, now side by side;
# carry $OUT/qmamba_kernels_cache.tgz in .whl/ to skip qmamba's build in later calls, scripts/kernels_cache.sh):
#   tests    the models' GPU tests: overlapped launches vs serial ones, Mamba1 / Mamba2 hand-offs of codes
#            (test_gpu_codes.py), eager and graphed generation, no host sync; the Mamba1 scan kernels; the fused
#            norm + rotate + quantize and the SSD float_in kernel tests
#   kernels  the kernel files whole: gated norm, SSD, linear (GEMM / GEMV incl. per-column and segment out_scales),
#            norm (passed at b5b2c02's tree, 2026-12-04: linear, norm; not yet whole: gated norm, SSD)
#   bench    the int8 prefill's host work counted on the GPU, then benchmarks/latency.py: mamba_ssm fp16, qmamba int8
#            and an ablation of it (ABLATION=serial|unfused, below), with the host syncs of one prefill per engine;
#            WITH_CONV=1 first builds causal-conv1d (~3 min, its sdist in .whl) for the fp16 baseline at its fastest
#   quick    the C++ checks, the Mamba1 scan update (dt_proj and the rotation fused), the conv update (also fused
#            into in_proj's GEMV), norm, Hadamard and overlap tests, then latency.py on mamba-2.8b (fp16, int8, int8
#            with the rotation in the scan update; PROFILE_ROWS=n adds the decode profile): one call
#   decode   every decode kernel's GPU tests (GEMV, conv update and the GEMV that fuses it, scan update with its
#            fused dt_proj and rotation, norm, Hadamard, overlapped launches, the C++ checks, the codes hand-offs);
#            then, in the next call on the warm machine:
#   latency  latency.py on mamba-2.8b (fp16, int8, int8 with the rotation in the scan update) with the decode
#            profile, then mamba2-2.7b (fp16, int8)
#   profile  the Mamba1 scan kernels' tests (and the decode mends'), the prefill scan timed against mamba_ssm's
#            (benchmarks/scan_prefill.py), then one Mamba1-2.8b prefill profiled (GPU kernels, cProfile of the host)
# Logs go to $OUT. Usage: bash scripts/device_prefill_check.sh tests|kernels|bench|quick|decode|latency|profile|hash
# (the machine is given back ~30 s after a call: start the next one at once to find it warm)
set -uo pipefail
stage=${1:-tests}
source_hash() {
  find csrc qmamba benchmarks -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) |
    LC_ALL=C sort | xargs cat | sha256sum | cut -c1-12
}
[ "$stage" = hash ] && { source_hash; exit 0; }
out=${OUT:-runs}
mkdir -p "$out"
bash scripts/device_setup.sh 2>&1 | tail -3  # also builds qmamba's CUDA kernels (says so if they did not build)
bash scripts/kernels_cache.sh save "$out"  # carry it in .whl/ to the next call (see that script)
g=tests/gpu
if [ "$stage" = tests ]; then
  timeout 420 python3 -m pytest -q -m gpu --tb=short -rf $g/test_gpu_launch_overlap.py $g/test_gpu_codes.py \
    $g/test_gpu_generation.py $g/test_gpu_no_host_sync.py $g/test_gpu_kernel_selective_scan.py \
    $g/test_gpu_kernel_gated_norm.py::test_norm_hadamard_quantize_agrees_with_the_unfused_kernels \
    $g/test_gpu_kernel_ssd.py -k "not test_gpu_kernel_ssd or from_float" > "$out/prefill_gpu_tests.log" 2>&1
  tail -25 "$out/prefill_gpu_tests.log"
elif [ "$stage" = quick ]; then  # one call when device time is short: the decode kernels' checks, then 2.8b latency
  timeout $((400 - SECONDS > 60 ? 400 - SECONDS : 60)) python3 -m pytest -q -m gpu --tb=short -rf -x \
    $g/test_gpu_cpp_checks.py $g/test_gpu_kernel_selective_scan.py $g/test_gpu_kernel_conv1d.py \
    $g/test_gpu_kernel_norm.py $g/test_gpu_kernel_hadamard.py $g/test_gpu_launch_overlap.py \
    -k "not test_gpu_kernel_selective_scan and not test_gpu_kernel_conv1d or update or gemv or rotated" \
    > "$out/quick_gpu_tests.log" 2>&1
  tail -15 "$out/quick_gpu_tests.log"
  timeout $((590 - SECONDS)) python3 benchmarks/latency.py --configs mamba-2.8b --reps 3 \
    --profile-decode ${PROFILE_ROWS:-0} --engines "mamba_ssm fp16" "qmamba int8" "qmamba int8 rotated" \
    --json "$out/latency.json" > "$out/latency.log" 2>&1
  grep -E "TTFT|speedup|FAILED|copy bandwidth|^    " "$out/latency.log" | head -40
elif [ "$stage" = decode ]; then
  timeout $((585 - SECONDS)) python3 -m pytest -q -m gpu --tb=short -rf $g/test_gpu_kernel_linear.py \
    $g/test_gpu_kernel_norm.py $g/test_gpu_kernel_hadamard.py $g/test_gpu_launch_overlap.py $g/test_gpu_cpp_checks.py \
    $g/test_gpu_codes.py $g/test_gpu_kernel_selective_scan.py $g/test_gpu_kernel_conv1d.py \
    -k "not test_gpu_kernel_selective_scan and not test_gpu_kernel_conv1d or update or gemv" \
    > "$out/decode_gpu_tests.log" 2>&1
  tail -25 "$out/decode_gpu_tests.log"
elif [ "$stage" = latency ]; then
  timeout 330 python3 benchmarks/latency.py --configs mamba-2.8b --reps 3 --profile-decode ${PROFILE_ROWS:-8} \
    --engines "mamba_ssm fp16" "qmamba int8" "qmamba int8 rotated" --json "$out/latency.json" > "$out/latency.log" 2>&1
  grep -E "TTFT|speedup|FAILED|copy bandwidth|^    " "$out/latency.log" | head -50
  timeout $((585 - SECONDS)) python3 benchmarks/latency.py --configs mamba2-2.7b --reps 3 \
    --engines "mamba_ssm fp16" "qmamba int8" --json "$out/latency_mamba2.json" > "$out/latency_mamba2.log" 2>&1
  grep -E "TTFT|speedup|FAILED|copy bandwidth" "$out/latency_mamba2.log" | head -20
elif [ "$stage" = profile ]; then  # the prefill scan rewrite's tests and timings, then where a prefill's time goes
  timeout 230 python3 -m pytest -q -m gpu --tb=short -rf $g/test_gpu_kernel_selective_scan.py \
    $g/test_gpu_kernel_hadamard.py $g/test_gpu_cpp_checks.py $g/test_gpu_kernel_conv1d.py \
    -k "not test_gpu_kernel_conv1d or update or gemv" > "$out/profile_gpu_tests.log" 2>&1
  tail -8 "$out/profile_gpu_tests.log"
  timeout 90 python3 benchmarks/scan_prefill.py --batch 1 8 --lengths 1024 2048 --reps 10 \
    --json "$out/scan_prefill.json" 2>&1 | tee "$out/scan_prefill.log" | grep -v USDT
  timeout $((560 - SECONDS)) python3 benchmarks/latency.py --configs mamba-2.8b --reps 3 --profile ${PROFILE_ROWS:-25} \
    --engines "mamba_ssm fp16" "qmamba int8" > "$out/latency_profile.log" 2>&1
  grep -E "TTFT|speedup|FAILED" "$out/latency_profile.log" | head -20
elif [ "$stage" = kernels ]; then
  timeout 480 python3 -m pytest -q -m gpu --tb=short -rf $g/test_gpu_kernel_gated_norm.py $g/test_gpu_kernel_ssd.py \
    $g/test_gpu_kernel_linear.py $g/test_gpu_kernel_norm.py > "$out/kernel_gpu_tests.log" 2>&1
  tail -25 "$out/kernel_gpu_tests.log"
else
  [ "${WITH_CONV:-0}" = 1 ] && bash scripts/build_causal_conv1d.sh
  for p in "mamba-130m quamba_w8a8" "mamba2-130m quamba2_w8a8"; do
    set -- $p
    timeout 60 python3 benchmarks/host_ops.py --preset "$1" --recipe "$2" --int8 --seq-len 1024 2>&1 | grep -v USDT \
      | tail -3
  done
  # an ablation beside the default, measured in the same run: ABLATION=serial (default; qmamba's kernels launched one
  # after the other: what the overlapped launches bring) or unfused (no codes handed between parts)
  # --profile-decode: each kernel's time in the graphed decode step (e.g. the fused norm + rotate + quantize, one
  # program per row at batch 1, against its place in the step)
  timeout 480 python3 benchmarks/latency.py --configs mamba2-2.7b mamba-2.8b --reps 5 --sync-check --profile-decode 12 \
    --engines "mamba_ssm fp16" "qmamba int8" "qmamba int8 ${ABLATION:-serial}" --json "$out/latency.json" > "$out/latency.log" 2>&1
  grep -E "TTFT|speedup|FAILED|copy bandwidth|host syncs|^    " "$out/latency.log" | head -60
fi
# the device's copy of .git may be older than the tree it was given (seen 2026-12-06: it named f0f8ad1 for fe0a0a9's
# tree), so also print a hash of the sources: `bash scripts/device_prefill_check.sh hash` here, at a commit, gives the
# same hash for the same tree
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') (sources $(source_hash))  $(date -u +%F)"
