# Sourced by scripts/check_csrc.sh and scripts/ptxas_report.sh: what compiling csrc/ with nvcc on a machine without a
# GPU needs. Sets $shim (a temporary folder, removed on exit, holding a stub of the one generated CUDA header a CPU
# torch lacks; the compiler's scratch output goes there too) and $includes (torch's and Python's include flags).
command -v nvcc >/dev/null || { echo "$(basename "$0"): nvcc not found (install the CUDA toolkit)"; exit 2; }
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
includes=$(python -c "import torch.utils.cpp_extension as c, sysconfig; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
