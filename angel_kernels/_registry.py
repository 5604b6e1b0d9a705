"""One helper that turns a launcher into a ``torch.ops.angel_kernels.<name>`` op.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation and exact ``mutates_args``, so it
traces under ``torch.compile`` and can be captured in CUDA graphs, as vLLM's own custom ops are. Each op also
records a sample-input factory so one test can run ``torch.library.opcheck`` over every registered op.
"""
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

NAMESPACE = "angel_kernels"

# sample-input factory: device -> iterable of (args, kwargs) small enough for the Triton interpreter
SampleFactory = Callable[[torch.device], Iterable[tuple[tuple, dict]]]


@dataclass(frozen=True)
class RegisteredOp:
    name: str
    op: object  # torch._library.custom_ops.CustomOpDef
    mutates_args: tuple[str, ...]
    samples: SampleFactory

    @property
    def overload(self):
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


_OPS: dict[str, RegisteredOp] = {}


def register_op(
    name: str,
    *,
    fake: Callable,
    samples: SampleFactory,
    mutates_args: Sequence[str] = (),
):
    """Decorator: register ``fn`` as ``torch.ops.angel_kernels.<name>``; returns the callable op.

    ``fn``'s type annotations define the schema (no ``from __future__ import annotations`` in op modules).
    """

    def decorate(fn: Callable):
        if name in _OPS:
            raise RuntimeError(f"op angel_kernels::{name} is registered twice")
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        _OPS[name] = RegisteredOp(name, op, tuple(mutates_args), samples)
        return op

    return decorate


def registered_ops() -> dict[str, RegisteredOp]:
    """All ops registered so far (importing ``angel_kernels`` registers the public ones)."""
    return dict(_OPS)
