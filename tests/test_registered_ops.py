"""Every registered op passes torch.library.opcheck (schema, fake impl, autograd registration, AOT dispatch)."""
import pytest
import torch

import angel_kernels  # noqa: F401  (registers the ops)
from angel_kernels._registry import registered_ops

OPS = registered_ops()


def test_ops_are_registered():
    assert "w8a16_gemm" in OPS
    for name in OPS:
        assert hasattr(torch.ops.angel_kernels, name)


@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(name, device):
    entry = OPS[name]
    n = 0
    for args, kwargs in entry.samples(device):
        torch.library.opcheck(entry.overload, args, kwargs)
        n += 1
    assert n > 0, f"{name} has no sample inputs"
