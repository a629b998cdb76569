"""qmamba's C++ argument checks (csrc/common/check.h, ``QMAMBA_CHECK``) raise RuntimeError with the whole message, and
every check in csrc/ goes through it: TORCH_CHECK's own formatting of a non-string message part segfaulted the device
machines' torch 2.11 build (see check.h), so a bad argument crashed the process instead of raising.

The header is pure C++: built here on the CPU into a tiny extension with torch's cpp_extension (about 40 s; skipped
where no C++ compiler is installed)."""

import re
import shutil

import pytest
import torch

from qmamba.kernels.build import CSRC

PROBE = r"""
#include <torch/extension.h>
#include "common/check.h"

void check_sizes(const at::Tensor& t, int64_t want) {
  QMAMBA_CHECK(t.dim() == want, "probe: t must be ", want, "-D, got ", t.scalar_type(), " ", t.sizes(), " on ",
               t.device(), " (", 0.5, ", ", true, ", ", std::string("s"), ")");
}
void check_plain(int64_t v) { QMAMBA_CHECK(v == 0, "probe: v must be 0"); }
void check_ints(int64_t v) { QMAMBA_CHECK(v == 0, "probe: v = ", v, ", ", static_cast<int>(-3), ", ", size_t{7}); }

TORCH_LIBRARY(qmamba_check_probe, m) {
  m.def("check_sizes(Tensor t, int want) -> ()", &check_sizes);
  m.def("check_plain(int v) -> ()", &check_plain);
  m.def("check_ints(int v) -> ()", &check_ints);
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here to build csrc/common/check.h")
    from torch.utils import cpp_extension

    cpp_extension.load_inline("qmamba_check_probe", cpp_sources=[PROBE], extra_include_paths=[str(CSRC)],
                              build_directory=str(tmp_path_factory.mktemp("check_probe")), is_python_module=False,
                              verbose=False)
    return torch.ops.qmamba_check_probe


def test_check_messages_name_every_part(probe):
    with pytest.raises(RuntimeError, match=re.escape("probe: t must be 3-D, got Char [2, 5] on cpu (0.5, true, s)")):
        probe.check_sizes(torch.zeros(2, 5, dtype=torch.int8), 3)
    with pytest.raises(RuntimeError, match="probe: v must be 0"):
        probe.check_plain(4)
    with pytest.raises(RuntimeError, match=re.escape("probe: v = -9, -3, 7")):
        probe.check_ints(-9)


def test_passing_checks_raise_nothing(probe):
    probe.check_sizes(torch.zeros(2, 5), 2)
    probe.check_plain(0)
    probe.check_ints(0)


def test_every_csrc_check_is_qmamba_check():
    """No bare TORCH_CHECK (nor c10::str, AT_ERROR) in csrc/ outside check.h, which wraps it."""
    bare = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in {".cu", ".cuh", ".h", ".cpp"} or path.name == "check.h":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(TORCH_CHECK|AT_ERROR|c10::str)\b", line):
                bare.append(f"{path.relative_to(CSRC)}:{n}: {line.strip()}")
    assert not bare, "use QMAMBA_CHECK (csrc/common/check.h):\n" + "\n".join(bare)
