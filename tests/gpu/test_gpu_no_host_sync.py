"""On a CUDA GPU: a calibrated model's forward (int8 prefill, fakequant training step with its backward) makes no
host sync once warmed up. A sync (a device -> host read such as ``bool(tensor)``, ``.item()``, a boolean-mask index)
stalls the CPU until the GPU queue drains, so launches stop overlapping with GPU work: QuantPoint used to read its
``ready`` flag that way at every forward. ``torch.cuda.set_sync_debug_mode("error")`` turns any sync into an error."""

import pytest
import torch
import torch.nn.functional as F

from qmamba import MambaLM, preset
from qmamba.qnn import calibrate, prepare, set_mode

pytestmark = pytest.mark.gpu

CASES = [("tiny", "quamba_w8a8"), ("tiny", "qat_w8a8"), ("tiny-mamba2", "quamba2_w8a8")]


def _model(name, recipe):
    torch.manual_seed(0)
    model = MambaLM(preset(name, d_model=128, n_layer=2)).cuda()
    prepare(model, recipe)
    ids = torch.randint(0, 256, (2, 65), device="cuda")
    calibrate(model, [ids[:, :-1]], progress=False)
    return model, ids


def _run_without_sync(run):
    """``run`` once to warm up (kernel builds, Triton compiles and autotuning, the first reads of each point's flag),
    then again with any host sync an error."""
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name, recipe", CASES)
@pytest.mark.parametrize("mode", ["int8", "fakequant"])
def test_forward_makes_no_host_sync(name, recipe, mode):
    model, ids = _model(name, recipe)
    set_mode(model, mode)
    model.train(mode == "fakequant")

    def run():
        if mode == "int8":
            with torch.no_grad():
                model(ids[:, :-1])
            return
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

    _run_without_sync(run)


@pytest.mark.parametrize("name, recipe", CASES)
def test_int8_prefill_and_step_make_no_host_sync(name, recipe):
    """The int8 prefill (filling the decode cache: the conv state's codes, the scan's state) and a decode step, the
    calls behind TTFT and TPOT (benchmarks/latency.py --sync-check times the same question at 2.8b)."""
    from qmamba.qnn import convert

    model, ids = _model(name, recipe)
    convert(model)
    set_mode(model, "int8")
    cache = model.allocate_cache(2, device="cuda")

    @torch.no_grad()
    def run():
        model.prefill(ids[:, :-1], cache)
        model.step(ids[:, -1], cache)

    _run_without_sync(run)
