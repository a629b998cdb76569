"""On a CUDA GPU: the quantization pipeline on small Mamba1 / Mamba2 models — points created on the model's device,
every mode, int8 vs fakequant agreement, a bf16-autocast fake-quant training step, and convert.

Tolerances: logits of int8 vs fakequant within LOGITS_RTOL relative (L2 norm of the difference over the norm of the
fakequant logits, as in the CPU tests: a single code that flips by 1 LSB at a rounding boundary, which the contract
allows, moves a few logits by more than 1e-3 of the largest); agreement per DESIGN §3."""

import pytest
import torch
import torch.nn.functional as F

from qmamba import MambaLM, preset, set_backend
from qmamba.qnn import agreement_report, calibrate, convert, prepare, quant_points, set_mode

pytestmark = pytest.mark.gpu

LOGITS_RTOL = 1e-3
CASES = [("tiny", "quamba_w8a8"), ("tiny-mamba2", "quamba2_w8a8"), ("tiny", "qat_w8a8")]


def _model(name: str, recipe: str):
    torch.manual_seed(0)
    model = MambaLM(preset(name, d_model=128, n_layer=2)).cuda().eval()
    prepare(model, recipe)
    x = torch.randint(0, 256, (4, 128), device="cuda")
    calibrate(model, [x, torch.randint(0, 256, (4, 128), device="cuda")], progress=False)
    return model, x


@pytest.mark.parametrize("name, recipe", CASES)
def test_modes_agree_on_gpu(name, recipe):
    model, x = _model(name, recipe)
    assert all(p.scale.is_cuda for p in quant_points(model))  # prepared after .cuda(): points follow the model
    out = {}
    for mode in ("fp", "fakequant", "int8"):
        set_mode(model, mode)
        # fakequant on the fp32 torch ops (mamba_ssm's SSD kernel computes its dots in TF32, ~1e-2 off), int8 on
        # qmamba's int8 kernels: this compares the kernels with the float simulation they must agree with
        set_backend(model, "torch" if mode == "fakequant" else "auto")
        out[mode] = model(x).float()
    set_backend(model, "auto")
    rel = (out["int8"] - out["fakequant"]).norm() / out["fakequant"].norm()
    assert rel.item() <= LOGITS_RTOL
    assert not torch.equal(out["fp"], out["fakequant"])
    rows = agreement_report(model, x)
    assert rows and all(r.meets_contract for r in rows), [r for r in rows if not r.meets_contract]
    set_mode(model, "int8")
    before = model(x)
    convert(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_fakequant_training_step_bf16():
    model, x = _model("tiny", "qat_w8a8")
    model.train()
    set_mode(model, "fakequant")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    scales = [p.scale for p in quant_points(model) if isinstance(p.scale, torch.nn.Parameter)]
    assert scales and all(s.grad is not None and torch.isfinite(s.grad).all() for s in scales)
