#!/usr/bin/env bash
# On a GPU device machine (see ../shared/device/README.md): install the carried wheels, build mamba_ssm's CUDA scan
# and (when its sdist is in .whl/) causal-conv1d for this GPU (once per machine), and install qmamba itself without
# touching the machine's torch. causal-conv1d gives mamba_ssm its fused conv1d / decode-update kernels: the
# latency baseline (benchmarks/latency.py) is mamba_ssm at its fastest: pass --with-causal-conv1d there (~3 min more).
# Fetch its sdist here with:  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: \
#                               --no-build-isolation -d .whl causal-conv1d==1.7.0
# train.py (LightningCLI) needs jsonargparse[signatures], which the device image lacks; fetch its wheels here with:
#   pip download --no-deps -d .whl --python-version 3.12 --only-binary=:all: jsonargparse==4.53.0 docstring-parser \
#     typeshed-client
set -euo pipefail
root=$PWD
# qmamba first, so its CUDA extension builds (~2.5 min on a fresh machine) beside mamba_ssm's instead of after it
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v 'is ignored' | tail -2 || true
bash scripts/kernels_cache.sh restore
MAX_JOBS=8 python3 -c "import qmamba.kernels as k; k.load()" > /tmp/qmamba_kernels_build.log 2>&1 &
kernels_pid=$!
if [ "${1:-}" = "--with-causal-conv1d" ]; then
  bash scripts/build_causal_conv1d.sh &
  conv_pid=$!
fi
MAX_JOBS=8 bash .whl/on_device.sh
[ -n "${conv_pid:-}" ] && { wait "$conv_pid" || true; }
wait "$kernels_pid" || { echo "device_setup: qmamba's CUDA kernels did not build:"; tail -20 /tmp/qmamba_kernels_build.log; }
python3 -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null ||
  echo "device_setup: jsonargparse[signatures] is missing, so train.py cannot run here: download its wheels into .whl (see the top of this script)"
python3 -c "
import qmamba, mamba_ssm, torch
from qmamba.ops.backend import try_import
conv = try_import('causal_conv1d')
print('qmamba', qmamba.__version__, '| mamba_ssm', mamba_ssm.__version__, '| causal_conv1d',
      getattr(conv, '__version__', 'missing'), '| torch', torch.__version__, '|', torch.cuda.get_device_name())"
