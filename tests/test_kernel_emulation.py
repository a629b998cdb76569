"""The int8 model through qmamba's GPU code path on a CPU (tests/kernel_emulation.py): the kernel wrappers as on a
GPU, csrc's ops computed by their torch references from the arguments the wrappers hand them (checked against
csrc's schemas), the Triton kernels (GEMM, SSD chunk scan and step, gated norm) in Triton's interpreter. Its
logits and greedy tokens must be the torch int8 backend's: measured equal bit for bit (max |diff| 0) on every case
here; the bound below leaves room for an interpreter's fp32 summation order only. A wrapper that passes an op an
argument in the wrong place or a scale of the wrong point moves the logits by tens of percent (an exchange of u's
and delta's scales in the scan: 0.74 of max |logit|)."""

import json

import pytest

CASES = [("tiny", "quamba_w8a8", "fp32"), ("tiny", "quamba_w8a8", "fp16"),
         ("tiny", "configs/recipes/dual_scale_treatment_mamba1.yaml", "fp32"),
         ("tiny", "configs/recipes/dual_scale_treatment_piecewise_mamba1.yaml", "fp32"),
         ("tiny", "configs/recipes/quamba_w8a8_no_rotation.yaml", "fp32"),
         ("tiny-mamba2", "quamba2_w8a8", "fp32"), ("tiny-mamba2", "quamba2_w8a8", "fp16"),
         ("tiny-mamba2", "configs/recipes/dual_scale_treatment_mamba2.yaml", "fp32")]

_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, "benchmarks")
from latency import fp16_float_leftovers_
from tests.kernel_emulation import emulated_kernels
from qmamba import MambaLM, preset
from qmamba.generation import generate
from qmamba.qnn import calibrate, convert, prepare, set_mode

out = {}
for preset_name, recipe, precision in CASES:
    torch.manual_seed(0)
    model = MambaLM(preset(preset_name)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    prepare(model, recipe)
    with torch.no_grad():
        calibrate(model, [ids], progress=False)
    convert(model)
    set_mode(model, "int8")
    if precision == "fp16":
        fp16_float_leftovers_(model)
    with torch.no_grad():
        want, want_tokens = model(ids).float(), generate(model, ids[:, :9], 6, cuda_graph=False)
        calls = {}
        with emulated_kernels(calls):
            got, got_tokens = model(ids).float(), generate(model, ids[:, :9], 6, cuda_graph=False)
    out[f"{preset_name} {recipe} {precision}"] = dict(
        rel=((got - want).abs().max() / want.abs().max()).item(), tokens=torch.equal(got_tokens, want_tokens),
        calls=calls)
print("RESULT " + json.dumps(out))
"""


def test_int8_model_on_the_kernel_path_equals_the_torch_backend(interpret):
    out = interpret(f"CASES = {CASES!r}\n" + _SCRIPT)
    results = json.loads(out.split("RESULT ", 1)[1])
    assert len(results) == len(CASES)
    for case, r in results.items():
        assert r["rel"] <= 1e-5 and r["tokens"], (case, r)
        # the csrc ops the GPU path calls were called: the norm, conv and GEMV, and Mamba1's scan
        assert {"add_rmsnorm_quant", "conv1d_int8", "conv1d_int8_update", "w8a8_gemv"} <= set(r["calls"]), case
        if case.startswith("tiny "):
            assert {"selective_scan_int8", "selective_scan_int8_update"} <= set(r["calls"]), case
