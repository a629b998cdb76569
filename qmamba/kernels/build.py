"""Building and loading the ``csrc/`` CUDA extension: one extension (``qmamba_kernels``), every ``csrc/**/*.cu``,
compiled with torch's cpp_extension for the compute capability of the current GPU only, cached on disk.

A machine without CUDA, nvcc or the sources gets one ``KernelsUnavailable`` error that says what is missing and how
to get it (or to use ``backend="torch"``).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
EXTENSION = "qmamba_kernels"


class KernelsUnavailable(RuntimeError):
    """qmamba's CUDA kernels cannot be built or loaded here; the message says why and what to do."""


def _sources() -> list[str]:
    if not CSRC.is_dir():
        raise KernelsUnavailable(f"qmamba's CUDA sources are not at {CSRC}: install qmamba from its repository "
                                 "(pip install -e .), which keeps csrc/ beside the package, or use backend='torch'")
    sources = sorted(str(p) for p in CSRC.rglob("*.cu"))
    if not sources:
        raise KernelsUnavailable(f"no .cu files under {CSRC}")
    return sources


def _check_toolchain() -> str:
    """The ``sm_XY`` architecture to build for; raises KernelsUnavailable when CUDA or nvcc is missing."""
    if not torch.cuda.is_available():
        raise KernelsUnavailable("qmamba's int8 CUDA kernels need a CUDA GPU and a CUDA build of torch "
                                 f"(torch {torch.__version__} sees no GPU); use backend='torch' on this machine")
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    if nvcc is None or not nvcc.exists():
        nvcc_on_path = shutil.which("nvcc")
        if nvcc_on_path is None:
            raise KernelsUnavailable("building qmamba's CUDA kernels needs nvcc, which was not found (CUDA_HOME="
                                     f"{home!r}): install the CUDA toolkit matching torch's CUDA {torch.version.cuda} "
                                     "and set CUDA_HOME, or use backend='torch'")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def cache_dir_for(arch: str, root: str | os.PathLike | None = None) -> Path:
    """One build folder per (torch, CUDA, architecture): a new torch or GPU never reuses a stale build."""
    root = Path(root) if root is not None else Path.home() / ".cache" / "qmamba" / "kernels"
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-sm{arch.replace('.', '')}"
    return root / tag


@functools.lru_cache(maxsize=None)
def load(verbose: bool | None = None, cache_dir: str | None = None) -> None:
    """Build (first time: about a minute, progress printed) and load the extension; registers ``torch.ops.qmamba``.

    Later calls in the process return at once; later processes reuse the cached build."""
    arch = _check_toolchain()
    sources = _sources()
    build_dir = cache_dir_for(arch, cache_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    first = not any(build_dir.glob(f"{EXTENSION}*.so"))
    if verbose is None:
        verbose = first
    if first:
        print(f"qmamba: building the CUDA kernels for sm_{arch.replace('.', '')} into {build_dir} "
              f"({len(sources)} sources; once per machine)", flush=True)
    from torch.utils import cpp_extension

    # cpp_extension reads the architecture list from this variable; set it for this build only and restore it.
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        cpp_extension.load(name=EXTENSION, sources=sources, build_directory=str(build_dir),
                           extra_include_paths=[str(CSRC)],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo",
                                                                    "-diag-suppress", "3306"],
                           is_python_module=False, verbose=verbose)
    except Exception as err:  # compiler errors come as RuntimeError / subprocess errors with the log above
        raise KernelsUnavailable(f"building qmamba's CUDA kernels in {build_dir} failed: {err}") from err
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def available() -> bool:
    """True when the kernels load here (builds them if needed). Never raises."""
    try:
        load()
        return True
    except KernelsUnavailable:
        return False
