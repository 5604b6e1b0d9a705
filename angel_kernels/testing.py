"""Testing helpers shared by the test suite and the benchmarks' refcheck.

- ``assert_close``: allclose with a report that says how many elements are off, where, and by how much,
  and that always fails on NaN/inf where the reference is finite.
- ``poison``: fill an output buffer with a value no kernel would produce, so unwritten elements are caught.
- ``tolerances``: dtype-keyed (atol, rtol) for comparing a kernel against its fp32 reference.
- ``make_generator`` / ``randn`` / ``randint8``: seeded input factories (never zeros).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "TOLERANCES",
    "tolerances",
    "assert_close",
    "assert_close_dequantized",
    "relative_error",
    "poison",
    "poisoned_empty",
    "make_generator",
    "randn",
    "randint8",
]

# (atol, rtol) against an fp32 reference of the same quantized operands. fp16 outputs carry ~1e-3 relative
# rounding; bf16 ~8e-3; accumulation-order differences in K ~ 4096 add a few ulps on top.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.int8: (0.0, 0.0),
    torch.int32: (0.0, 0.0),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for dtype {dtype}") from None


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (inf when out has NaN/inf)."""
    o = out.detach().to(torch.float64)
    r = ref.detach().to(torch.float64)
    if not torch.isfinite(o).all():
        return math.inf
    denom = torch.linalg.vector_norm(r).item()
    num = torch.linalg.vector_norm(o - r).item()
    return num / denom if denom > 0 else num


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "output",
    max_report: int = 5,
) -> None:
    """Elementwise |out − ref| ≤ atol + rtol·|ref|, with NaN/inf in ``out`` always an error.

    Tolerances default to ``tolerances(out.dtype)``. The failure message gives the mismatch count, the first
    bad indices with both values, the worst absolute error and the relative error of the whole tensor.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    d_atol, d_rtol = tolerances(out.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    problems = []
    bad_nonfinite = ~torch.isfinite(o) & torch.isfinite(r)
    if bad_nonfinite.any():
        idx = bad_nonfinite.nonzero()[:max_report].tolist()
        problems.append(f"{int(bad_nonfinite.sum())} NaN/inf where the reference is finite, first at {idx}")
    finite = torch.isfinite(o) & torch.isfinite(r)
    diff = (o - r).abs()
    bad = finite & (diff > atol + rtol * r.abs())
    if bad.any():
        idx = bad.nonzero()[:max_report]
        shown = ", ".join(
            f"{tuple(i.tolist())}: {o[tuple(i)].item():.6g} vs {r[tuple(i)].item():.6g}" for i in idx
        )
        worst = diff[finite].max().item()
        problems.append(
            f"{int(bad.sum())}/{o.numel()} elements off (atol={atol:g}, rtol={rtol:g}); worst |diff| {worst:.4g};"
            f" first: {shown}"
        )
    if problems:
        rel = relative_error(out, ref)
        raise AssertionError(f"{name} ({out.dtype}, shape {tuple(out.shape)}), rel. error {rel:.3g}: " + "; ".join(problems))


def assert_close_dequantized(out: torch.Tensor, ref: torch.Tensor, *, name: str = "output") -> None:
    """For kernels that round each dequantized weight to the activation dtype before the product (fp16: relative
    2^-11 per weight, bf16: 2^-8), against a reference with exact weights. Their error scales with the magnitude
    of the terms summed, not with the (possibly cancelled) output value, so:
    - the whole tensor's relative error must stay under the dtype's epsilon (measured: 2.8e-4 fp16, 2.2e-3 bf16,
      i.e. u/√3 as random rounding predicts), and
    - each element within 4·eps·max|ref| (a wrong term is of the order of max|ref| / √K or larger).
    """
    eps = torch.finfo(out.dtype).eps
    rel = relative_error(out, ref)
    if not rel <= eps:
        raise AssertionError(f"{name}: relative error {rel:.3g} > {eps:.3g} (eps of {out.dtype})")
    assert_close(out, ref, atol=4 * eps * ref.detach().abs().amax().item(), name=name)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with a value a correct kernel never leaves behind (NaN for floats, extremes for ints)."""
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


def poisoned_empty(*shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    return poison(torch.empty(*shape, dtype=dtype, device=device))


def make_generator(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(*shape, dtype=torch.float16, device="cpu", generator: torch.Generator | None = None, scale: float = 1.0):
    """Normal(0, scale²) in ``dtype``; drawn in fp32 on the generator's device then moved."""
    gdev = generator.device if generator is not None else device
    x = torch.randn(*shape, dtype=torch.float32, device=gdev, generator=generator) * scale
    return x.to(device=device, dtype=dtype)


def randint8(*shape, device="cpu", generator: torch.Generator | None = None, low: int = -127, high: int = 128):
    gdev = generator.device if generator is not None else device
    return torch.randint(low, high, shape, dtype=torch.int8, device=gdev, generator=generator).to(device)
