"""Shared test setup: GPU tests skip on machines without CUDA, and every test starts from the same seed."""

import pytest
import torch

# The tests use tiny tensors: one intra-op thread is faster for them, and it keeps the suite's time steady when other
# processes load the cores (2 threads on 2 busy cores made a tiny conv1d ~400x slower here).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked `gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_COMPILED_LAUNCHES: set = set()  # Triton launches already compiled for a GPU in this session


@pytest.fixture
def interpret(tmp_path):
    """Run a Python script with Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) in a subprocess from the
    project root — the interpreter must be switched on before triton is imported, hence the fresh process — then
    compile every kernel launch it made for a real GPU (tests/triton_compile.py: the interpreter never runs Triton's
    compiler, so a kernel it refuses would otherwise pass here). Skips when triton is not installed; fails with the
    script's output tails when it exits non-zero, or with the compiler's messages; returns the script's stdout."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.triton_compile import compile_launches

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the Triton kernels cannot be interpreted")

    def run(script: str) -> str:
        launches = tmp_path / "triton_launches.json"
        prologue = f"from tests.triton_compile import record_launches; record_launches({str(launches)!r})\n"
        proc = subprocess.run([sys.executable, "-c", prologue + script], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        failures = compile_launches(str(launches), _COMPILED_LAUNCHES)
        assert not failures, "Triton's compiler refuses launches the interpreter ran:\n" + "\n".join(failures)
        return proc.stdout

    return run
