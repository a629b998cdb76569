"""qmamba.kernels.schemas: csrc's op schemas read from the sources, and the check the dry int8 path of
benchmarks/host_ops.py runs on every call it stands in for."""

import sys
from pathlib import Path

import pytest
import torch

from qmamba.kernels.schemas import check_call, op_schemas

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_ops  # noqa: E402


def test_every_csrc_op_is_read_and_stood_in_for_by_the_dry_path():
    schemas = op_schemas()
    assert schemas["selective_scan_int8"][4] == ("Tensor", "A")
    assert schemas["conv1d_int8_update"][1] == ("Tensor", "conv_state")  # Tensor(a!) read as Tensor
    assert schemas["w8a8_gemv"][-1] == ("int[]", "out_bounds")
    # conv1d_silu is a test helper of the conv kernel, not called by the int8 model
    assert set(schemas) - {"conv1d_silu", "set_launch_overlap"} == set(host_ops.DRY_OPS)


def test_check_call_names_the_argument_that_does_not_fit():
    x, s = torch.zeros(2, 4), torch.ones(1)
    check_call("quantize_int8", (x, s, -1, 8))
    with pytest.raises(TypeError, match=r"quantize_int8: argument scale must be Tensor, got NoneType"):
        check_call("quantize_int8", (x, None, -1, 8))
    with pytest.raises(TypeError, match=r"quantize_int8: argument bits must be int, got float"):
        check_call("quantize_int8", (x, s, -1, 8.0))
    with pytest.raises(TypeError, match=r"hadamard_quantize takes 3 arguments \(x, scale, bits\), got 2"):
        check_call("hadamard_quantize", (x, s))
    with pytest.raises(TypeError, match="w8a8_gemv: argument out_scale must be Tensor\\[\\]"):
        check_call("w8a8_gemv", (x, s, x, s, None, torch.float16, [None], [4]))
    with pytest.raises(TypeError, match="not defined in csrc"):
        check_call("no_such_op", ())


def test_schemas_are_read_from_string_literals_split_over_lines(tmp_path):
    (tmp_path / "k.cu").write_text('TORCH_LIBRARY_FRAGMENT(qmamba, m) {\n  m.def("f(Tensor(a!) x, Tensor? y, "\n'
                                   '        "int[] n, float e) -> Tensor[]");\n}\n')
    assert op_schemas(str(tmp_path)) == {"f": [("Tensor", "x"), ("Tensor?", "y"), ("int[]", "n"), ("float", "e")]}


def test_dry_triton_launches_bind_to_the_kernel_parameters():
    """host_ops' stand-in for a Triton kernel refuses a launch a real one would: a parameter missing or unknown."""
    pytest.importorskip("triton")
    import collections

    from qmamba.kernels.triton import hadamard, w8a8_gemm

    launches = collections.Counter()
    fwht = host_ops._CountedLaunch("_fwht_kernel", launches, hadamard._fwht_kernel)
    x = torch.zeros(4, 8)
    fwht[(1,)](x, x, 4, 0.5, B=8, LOG_B=3, ROWS=4, REVERSE=False, num_warps=1)
    assert launches["_fwht_kernel"] == 1
    with pytest.raises(TypeError, match="_fwht_kernel: launched without REVERSE"):
        fwht[(1,)](x, x, 4, 0.5, B=8, LOG_B=3, ROWS=4)
    with pytest.raises(TypeError, match="_fwht_kernel: .*BLOCK"):
        fwht[(1,)](x, x, 4, 0.5, B=8, LOG_B=3, ROWS=4, REVERSE=False, BLOCK=4)
    # parameters filled by triton.heuristics / autotune configs are not asked of the caller
    signature, filled = host_ops._kernel_params(w8a8_gemm._gemm_fixed)
    assert "EVEN_K" in filled and "EVEN_K" in signature.parameters
