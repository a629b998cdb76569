"""Every csrc/ source compiles for sm_90 with nvcc on a CPU machine: ``scripts/check_csrc.sh`` (compile only, nothing
linked or run) run by CI, so a kernel change that does not build fails here, not in a GPU session's first minutes.
Skipped where nvcc is missing."""

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qmamba.kernels.build import CSRC

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
def test_every_csrc_source_compiles_for_sm90():
    sources = sorted(CSRC.rglob("*.cu"))
    assert sources, f"no .cu files under {CSRC}"

    def check(source: Path) -> subprocess.CompletedProcess:  # one file a call: two nvcc at once on 2 cores
        return subprocess.run(["bash", str(ROOT / "scripts" / "check_csrc.sh"), str(source)], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(check, sources))
    failures = [p.stdout[-3000:] + p.stderr[-1000:] for p in results if p.returncode]
    assert not failures, "nvcc refuses csrc sources (scripts/check_csrc.sh):\n" + "\n".join(failures)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
def test_decode_gemv_kernels_keep_no_stack_frame():
    """Every W8A8 GEMV kernel (the decode step's largest) compiles at -O3 with no stack frame and no spills
    (``scripts/ptxas_report.sh``): a runtime index into its parameter struct (as the segment out_scale once was) puts
    the struct in local memory, a stack frame and a load in every epilogue."""
    p = subprocess.run(["bash", str(ROOT / "scripts" / "ptxas_report.sh"), "csrc/linear/gemv_int8.cu",
                        "w8a8_gemv_kernel"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [r for r in p.stdout.splitlines() if r.strip()]
    assert len(rows) == 36, p.stdout[-2000:]  # 4 row counts x 3 dtypes x (float, requant, requant + conv)
    framed = [r for r in rows if "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" not in r]
    assert not framed, "\n".join(framed)
