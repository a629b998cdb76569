#!/usr/bin/env bash
# Registers, stack frame and spills of every kernel in csrc/ files, from ptxas (-O3, sm_90 unless ARCH is set), on a
# machine without a GPU: the check that a kernel change added no spills or local-memory frames (a runtime index into a
# kernel's parameter struct shows up as a stack frame). Needs nvcc and torch's headers, as scripts/check_csrc.sh.
# Usage: bash scripts/ptxas_report.sh FILE.cu [FILTER]   (FILTER: a grep -E pattern on the kernel's mangled name)
set -euo pipefail
cd "$(dirname "$0")/.."
file=${1:?usage: bash scripts/ptxas_report.sh FILE.cu [FILTER]}
source scripts/nvcc_env.sh  # $shim, $includes
nvcc -c -std=c++17 -arch="${ARCH:-sm_90}" -O3 -Xptxas -v -diag-suppress 3306 -I"$shim" -Icsrc $includes "$file" \
  -o "$shim/out.o" 2>&1 |
  awk '/Compiling entry function/ { name = $0; sub(/.*function .?/, "", name); sub(/.? for .*/, "", name) }
       /bytes stack frame/ { frame = $0; sub(/^ +/, "", frame) }
       /Used [0-9]+ registers/ { regs = $0; sub(/.*Used /, "", regs); sub(/,.*/, "", regs);
                                 print regs " | " frame " | " name }' |
  grep -E "${2:-.}" || true
