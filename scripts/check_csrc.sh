#!/usr/bin/env bash
# Compile-check every csrc/ kernel with nvcc on a machine without a GPU (no linking, nothing loaded): catches syntax
# and type errors before device time is spent. Needs nvcc and torch's headers (a CPU torch lacks one generated CUDA
# header; a stub for it is made in a temporary folder). Usage: bash scripts/check_csrc.sh [file.cu ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvcc_env.sh  # $shim, $includes
files=("$@")
[ ${#files[@]} -eq 0 ] && mapfile -t files < <(find csrc -name '*.cu' | sort)
status=0
for f in "${files[@]}"; do
  if nvcc -c -std=c++17 -arch=sm_90 -O1 -diag-suppress 3306 -I"$shim" -Icsrc $includes "$f" -o "$shim/out.o" 2> "$shim/err"; then
    echo "ok    $f"
  else
    echo "FAIL  $f"; grep -v "^$" "$shim/err" | grep -iv "warning\|remark" | head -40; status=1
  fi
done
exit $status
