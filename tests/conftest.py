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
