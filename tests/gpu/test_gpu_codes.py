"""On a CUDA GPU, the int8 Mamba1 mixer with its conv1d kernel handing x_proj and the scan their codes, and
in_proj / x_proj / dt_proj handing the conv, dt_proj and the scan theirs (one GEMM each on a sequence, one GEMV each
in decode steps), the int8 Mamba2 in_proj handing the gated norm, the conv and the scan theirs (z, xBC, dt),
(``qmamba.qnn.codes``; single-scale u, dual-scale u in the mask and piecewise encodings) against the same model with
each consumer quantizing the conv's float output itself (``emit_codes = False``): forward, prefill and decode steps,
eager and captured in a CUDA graph. The conv kernel's codes are the quantize kernel's codes of its float output
(tests/gpu/test_gpu_kernel_conv1d.py, test_gpu_kernel_dual_scale.py), so the logits must be identical (torch.equal),
and greedy tokens too.
"""

from pathlib import Path

import pytest
import torch

from qmamba import MambaLM, preset
from qmamba.generation import DecodeGraph, generate
from qmamba.qnn import calibrate, prepare, set_mode
from qmamba.qnn.codes import Codes
from qmamba.qnn.modules import QuantCausalConv1d, QuantLinear, QuantSelectiveScan
from qmamba.quant.recipe import load_recipe

pytestmark = pytest.mark.gpu

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
GROUPS = ["baseline", "treatment", "treatment_piecewise"]


def _ids(batch, L, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 256, (batch, L), device="cuda", generator=g)


def _model(group: str, dtype: torch.dtype) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(preset("tiny", d_model=128, n_layer=2)).cuda().eval()
    prepare(model, load_recipe(str(RECIPES / f"dual_scale_{group}_mamba1.yaml")))
    with torch.no_grad():  # outliers in u, so the dual-scale groups use their outlier scale
        for layer in model.backbone.layers:
            layer.mixer.conv1d.weight[::7] *= 8
        calibrate(model, [_ids(4, 128, 1), _ids(4, 128, 2)], progress=False)
    return set_mode(model.to(dtype), "int8")


def _emit(model, on: bool) -> None:
    """The conv and the decode step's linears (in_proj, x_proj, dt_proj: GEMV segment out_scales) hand codes, or
    not. The blocks' fused pre-norm stays on in both: its kernel's mean may round 1 LSB off the unfused norm's
    (tests/gpu/test_gpu_kernel_norm.py), so it is not part of this bit-for-bit comparison. The scan's update makes
    out_proj's rotated input codes, or not (``emit_rotated``)."""
    for m in model.modules():
        if isinstance(m, (QuantCausalConv1d, QuantLinear)):
            m.emit_codes = on
        if isinstance(m, QuantSelectiveScan):
            m.emit_rotated = on


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", GROUPS)
def test_codes_handoff_equals_float_handoff(group, dtype):
    model = _model(group, dtype)
    x = _ids(3, 77, 5)
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        handed = mixer.conv1d(torch.randn(2, mixer.d_inner, 9, device="cuda", dtype=dtype),
                              consumers=mixer.conv_consumers())
        assert all(isinstance(c, Codes) for c in handed)
        assert handed[0].q.stride(1) == 1  # the kernel's channel-last codes: x_proj reads (B, L, D) rows
        _emit(model, False)
        plain = model(x)
        plain_tokens = generate(model, x[:, :12], 16, cuda_graph=False)
        _emit(model, True)
        fused = model(x)
        assert torch.equal(fused, plain)
        assert torch.equal(generate(model, x[:, :12], 16, cuda_graph=False), plain_tokens)
        assert torch.equal(generate(model, x[:, :12], 16, cuda_graph=True), plain_tokens)


@pytest.mark.parametrize("group", GROUPS)
def test_graph_steps_equal_eager_steps_with_codes(group):
    model = _model(group, torch.float16)
    prompt = _ids(2, 10, 7)
    graphed, eager = DecodeGraph(model, 2).capture(), DecodeGraph(model, 2)
    assert torch.equal(graphed.prefill(prompt), eager.prefill(prompt))
    tok = prompt[:, -1]
    for _ in range(5):
        a, b = graphed.step(tok), eager.step(tok)
        assert torch.equal(a, b)
        tok = a.argmax(-1)


@pytest.mark.parametrize("recipe", ["quamba2_w8a8", "dual_scale_treatment_mamba2.yaml"])
def test_mamba2_in_proj_codes_equal_float_handoff(recipe):
    """Mamba2: in_proj's GEMM (prefill) and GEMV (decode) emit z, xBC and dt codes in three segment scales; the
    same logits and tokens as each consumer quantizing its float slice, eager and graphed."""
    torch.manual_seed(0)
    model = MambaLM(preset("tiny-mamba2", d_model=128, n_layer=2, ngroups=2)).cuda().eval()
    prepare(model, load_recipe(str(RECIPES / recipe)) if recipe.endswith(".yaml") else recipe)
    with torch.no_grad():
        calibrate(model, [_ids(4, 128, 1), _ids(4, 128, 2)], progress=False)
    set_mode(model.half(), "int8")
    x = _ids(3, 77, 5)
    # in_proj's codes and the norm's fused rotate + quantize for out_proj (its kernel makes the codes the unfused
    # kernels make, tests/gpu/test_gpu_kernel_gated_norm.py)
    producers = [m for layer in model.backbone.layers for m in (layer.mixer.in_proj, layer.mixer.norm)]
    with torch.no_grad():
        for m in producers:
            m.emit_codes = False
        plain = model(x)
        plain_tokens = generate(model, x[:, :12], 16, cuda_graph=False)
        for m in producers:
            m.emit_codes = True
        assert torch.equal(model(x), plain)
        assert torch.equal(generate(model, x[:, :12], 16, cuda_graph=False), plain_tokens)
        assert torch.equal(generate(model, x[:, :12], 16, cuda_graph=True), plain_tokens)
