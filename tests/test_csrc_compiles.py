"""Every csrc/ source compiles for sm_90 with nvcc on a CPU machine (compile only: nothing is linked or run), so a
kernel change that does not build fails here, not in a GPU session's first minutes. Skipped where nvcc is missing.

The flags are the ones torch's cpp_extension gives the extension's build on the GPU machine (``qmamba.kernels.build``;
see its build log), plus one stand-in header: a CPU build of torch ships c10/cuda's headers but not the header its
CUDA build generates (``c10/cuda/impl/cuda_cmake_macros.h``, which only says the c10_cuda library is shared).
"""

import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from torch.utils import cpp_extension

from qmamba.kernels.build import CSRC, EXTENSION, EXTRA_CUDA_CFLAGS

NVCC = shutil.which("nvcc")
SOURCES = sorted(CSRC.rglob("*.cu"))


def _nvcc_command(source: Path, out: Path, stub: Path) -> list[str]:
    inc = Path(torch.__file__).parent / "include"
    return [NVCC, "-c", str(source), "-o", str(out), "-I", str(CSRC), "-isystem", str(stub), "-isystem", str(inc),
            "-isystem", str(inc / "torch" / "csrc" / "api" / "include"), "-isystem", sysconfig.get_paths()["include"],
            f"-DTORCH_EXTENSION_NAME={EXTENSION}", "-DTORCH_API_INCLUDE_EXTENSION_H", *cpp_extension.COMMON_NVCC_FLAGS,
            "-gencode=arch=compute_90,code=sm_90", "--compiler-options", "-fPIC", "-std=c++17", *EXTRA_CUDA_CFLAGS]

@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here")
def test_every_csrc_source_compiles_for_sm90(tmp_path):
    assert SOURCES, f"no .cu files under {CSRC}"
    stub = tmp_path / "include"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
        "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")

    def compile_one(source: Path):
        proc = subprocess.run(_nvcc_command(source, tmp_path / f"{source.stem}.o", stub), capture_output=True,
                              text=True, timeout=900)
        return source, proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failures = [f"{s.relative_to(CSRC)}:\n{(p.stdout + p.stderr)[-3000:]}" for s, p in results if p.returncode]
    assert not failures, "nvcc refuses csrc sources:\n" + "\n".join(failures)
