"""On a CUDA GPU: the kernels' own C++ argument checks (reached by calling ``torch.ops.qmamba`` directly, past the
Python wrappers' checks) raise RuntimeError naming the bad argument with its sizes, never crash the process. Each bad
call runs in a fresh Python process: TORCH_CHECK's formatting of such a message segfaulted on the device's torch 2.11
build (csrc/common/check.h), and a crash must fail one test, not end the run."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]

SETUP = """
import torch
from qmamba.kernels import load
load()
i8 = lambda *s: torch.randint(-128, 128, s, dtype=torch.int8, device="cuda")
one = lambda v=0.02: torch.tensor([v], device="cuda")
"""

CASES = {
    # x 1-D: the GEMV's shape check
    "w8a8_gemv": ("torch.ops.qmamba.w8a8_gemv(i8(64), one(), i8(32, 64), one(), None, torch.float16, [], [])",
                  "w8a8_gemv: x must be (M, K) and w (N, K), got [64] and [32, 64]"),
    # conv_state of 1 row for 2: check_conv_state (csrc/conv1d/conv1d_update.cuh)
    "conv1d_int8_update": ("torch.ops.qmamba.conv1d_int8_update(i8(2, 32), i8(1, 32, 4), one(), i8(32, 4), one(), "
                           "None, True, torch.float16, [], -1, 0, 0, None)",
                           "conv1d_int8_update: conv_state must be int8 CUDA codes (B, D, K) = (2, 32, 4), got Char "
                           "[1, 32, 4]"),
    # B of 3 rows for a batch of 2
    "selective_scan_int8_update": (
        "torch.ops.qmamba.selective_scan_int8_update(torch.zeros(2, 32, 16, device='cuda'), i8(2, 32), one(), "
        "i8(2, 32), one(), -torch.ones(32, 16, device='cuda'), i8(3, 16), one(), i8(3, 16), one(), "
        "torch.ones(32, device='cuda'), None, None, None, True, torch.float16, 0, 0, None, None, None, None, None, "
        "None, None, None, 8, None)",
        "selective_scan_int8_update: B and C must be (batch, N) with batch 2, got [3, 16] and [3, 16]"),
    # a rotated output with counters of the wrong size (D 32 is one Hadamard block: batch 2 -> 2 counters)
    "selective_scan_int8_update rotated": (
        "torch.ops.qmamba.selective_scan_int8_update(torch.zeros(2, 32, 16, device='cuda'), i8(2, 32), one(), "
        "i8(2, 32), one(), -torch.ones(32, 16, device='cuda'), i8(2, 16), one(), i8(2, 16), one(), "
        "torch.ones(32, device='cuda'), None, None, None, True, torch.float16, 0, 0, None, None, None, None, None, "
        "None, None, one(), 8, torch.zeros(3, dtype=torch.int32, device='cuda'))",
        "selective_scan_int8_update: out_counters must be a contiguous int32 tensor of batch * D / block = 2 zeros on "
        "the device of u (the update leaves them zero), got Int [3]"),
}


@pytest.mark.parametrize("op", list(CASES))
def test_a_bad_argument_raises_a_message_with_its_sizes(op):
    call, message = CASES[op]
    script = SETUP + f"""
try:
    {call}
except RuntimeError as err:
    print("RAISED", str(err).splitlines()[0])
else:
    print("NO ERROR")
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{op}: the process died (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert f"RAISED {message}" in p.stdout, f"{op}: want {message!r}, got:\n{p.stdout[-2000:]}"
