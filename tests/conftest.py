"""Test tiers.

- CPU tier (everywhere): kernels under the Triton interpreter on small shapes, references, pure-Python logic
  and vLLM glue. ``TRITON_INTERPRET=1`` is set here, before triton is imported, only when no GPU is present.
- GPU tier: tests marked ``@pytest.mark.gpu``, skipped without CUDA, at real shapes with compiled kernels.
"""
import os
import shutil
import subprocess


def _has_cuda_gpu() -> bool:
    # Decide before importing torch/triton (which would read TRITON_INTERPRET); nvidia-smi touches no context.
    if os.environ.get("ANGEL_KERNELS_TEST_CPU_ONLY") == "1":
        return False
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_GPU = _has_cuda_gpu()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (GPU tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels run on in this tier: cuda on a GPU machine, cpu (interpreter) otherwise."""
    import torch

    return torch.device("cuda" if HAS_GPU else "cpu")
