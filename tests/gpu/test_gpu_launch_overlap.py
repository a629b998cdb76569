"""On a CUDA GPU: qmamba's kernels launched overlapped with the kernel before them (programmatic dependent launch,
the default on sm_90+, see ``launch_overlapped`` in csrc/common/qmamba_common.cuh) give what they give launched one
after the other, bit for bit: the int8 model's prefill logits and the logits of 24 decode steps, eager and replayed
from a CUDA graph, Mamba1 and Mamba2 at the mamba-130m widths (d_model 768, 4 layers: grids of hundreds of blocks,
where a kernel reading its input before the kernel that writes it has finished would show), batch 1 and 8.

Tolerance: none (torch.equal). Both runs launch the same kernels on the same inputs; only when each may start
differs, and every kernel waits for the one before it has finished before it reads or writes anything.
"""

import pytest
import torch

from qmamba import MambaLM, preset
from qmamba.generation import DecodeGraph
from qmamba.kernels.launch import launch_overlap, set_launch_overlap
from qmamba.qnn import calibrate, convert, prepare

pytestmark = pytest.mark.gpu

RECIPES = {"mamba-130m": "quamba_w8a8", "mamba2-130m": "quamba2_w8a8"}


def _ids(batch, L, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 50277, (batch, L), device="cuda", generator=g)


@pytest.fixture(scope="module", params=list(RECIPES))
def model(request):
    torch.manual_seed(0)
    m = MambaLM(preset(request.param, n_layer=4)).cuda().eval()
    prepare(m, RECIPES[request.param])
    with torch.no_grad():
        calibrate(m, [_ids(2, 256, 1)], progress=False)
    return convert(m)


def _decode(model, batch, overlap: bool, graphed: bool):
    """Prefill logits and the logits of 24 steps fed fixed tokens, with the launches overlapped or not."""
    with launch_overlap(overlap):
        decoder = DecodeGraph(model, batch)
        if graphed:
            decoder.capture()  # captured with this setting: the graph keeps it
        out = [decoder.prefill(_ids(batch, 33, 2)).clone()]
        tokens = _ids(batch, 24, 3)
        for t in range(24):
            out.append(decoder.step(tokens[:, t]).clone())
    torch.cuda.synchronize()
    return torch.stack(out)


def test_the_switch_returns_the_previous_setting():
    previous = set_launch_overlap(False)
    try:
        assert set_launch_overlap(True) is False
        assert set_launch_overlap(True) is True
    finally:
        set_launch_overlap(previous)


@pytest.mark.parametrize("graphed", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_overlapped_launches_decode_bit_for_bit_as_serial_ones(model, batch, graphed):
    serial = _decode(model, batch, overlap=False, graphed=graphed)
    for _ in range(2):  # a race would not show every time: twice
        overlapped = _decode(model, batch, overlap=True, graphed=graphed)
        assert torch.equal(overlapped, serial), (overlapped.float() - serial.float()).abs().max().item()
