"""A quick check on the device before long runs: the quantization pipeline on a small model on CUDA, every mode,
one bf16-autocast fake-quant training step, and the agreement report."""

import sys

import torch

from qmamba import MambaLM, preset
from qmamba.qnn import agreement_report, calibrate, convert, set_mode

name, recipe = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else ("tiny", "quamba_w8a8")
m = MambaLM(preset(name, d_model=128, n_layer=2)).cuda()
x = torch.randint(0, 256, (4, 128), device="cuda")
from qmamba.qnn import prepare

prepare(m, recipe)
calibrate(m, [x], progress=False)
for mode in ("fp", "fakequant", "int8"):
    set_mode(m, mode)
    print(mode, m(x).float().abs().mean().item())
set_mode(m, "fakequant")
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
loss.backward()
print("qat step loss", loss.item())
rows = agreement_report(m, x)
print("agreement min", min(r.identical for r in rows), "max lsb", max(r.max_lsb for r in rows))
convert(m)
print("converted int8", m(x).float().abs().mean().item())
