#!/usr/bin/env bash
# On a GPU device machine: build causal-conv1d from its sdist in .whl/ for this GPU only (~3 min, once per machine).
# It gives mamba_ssm its fused conv1d / decode-update kernels, so the latency baseline is mamba_ssm at its fastest.
# Called by scripts/device_setup.sh --with-causal-conv1d, or alone (scripts/device_prefill_check.sh bench, WITH_CONV=1).
set -uo pipefail
root=$PWD
compgen -G ".whl/causal_conv1d-*.tar.gz" >/dev/null || { echo "build_causal_conv1d: no causal_conv1d sdist in .whl (see scripts/device_setup.sh)"; exit 1; }
python3 -c "import causal_conv1d_cuda" 2>/dev/null && { echo "causal-conv1d already built"; exit 0; }
b=$(mktemp -d) && tar xzf .whl/causal_conv1d-*.tar.gz -C "$b" && cd "$b"/causal_conv1d-* &&
  cc=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))") &&
  python3 "$root/.whl/only_sm90.py" setup.py "$cc" >/dev/null &&
  MAX_JOBS=${MAX_JOBS:-8} CAUSAL_CONV1D_FORCE_BUILD=TRUE python3 -m pip install -q --no-deps --no-build-isolation \
    --no-index . > "$b/build.log" 2>&1 && echo "causal-conv1d built" || { echo "causal-conv1d build failed:"; tail -20 "$b/build.log"; exit 1; }
