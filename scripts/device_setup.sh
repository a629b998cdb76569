#!/usr/bin/env bash
# On a GPU device machine (see ../shared/device/README.md): install the carried wheels, build mamba_ssm's CUDA scan
# for this GPU (once per machine), and install qmamba itself without touching the machine's torch.
set -euo pipefail
bash .whl/on_device.sh
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v 'is ignored' | tail -2 || true
python3 -c "import qmamba, mamba_ssm, torch; print('qmamba', qmamba.__version__, '| mamba_ssm', mamba_ssm.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name())"
