"""Test-suite wiring shared by every test.

Triton kernels run in Triton's interpreter on machines without a CUDA GPU. The interpreter is
chosen by TRITON_INTERPRET when a kernel is *defined* (decorated), so it must be set before any
module that defines kernels is imported; conftest.py is imported before the test modules.
"""
import os

# OpenMP threads that spin while waiting make every op several times slower when the two cores
# are shared (CI, parallel jobs); must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic and light on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; runs in benchmarks/gpu_sweep.sh on the device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where Triton kernels run in this session: the GPU if present, else the CPU interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
