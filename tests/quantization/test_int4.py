"""int4 group-wise quantizer: against a straightforward per-group reference written here, error bounds, zero groups,
packing, chunking and bad input."""
import pytest
import torch
from hypothesis import given, strategies as st

from angel_kernels import Int4Weight, quantize_weight_int4
from angel_kernels.quantization.int4 import pack_int4_rows
from angel_kernels.reference import dequantize_int4_ref
from angel_kernels.reference.int4 import unpack_int4_rows
from angel_kernels.testing import make_generator, randn


def _naive_quantize(w: torch.Tensor, group: int, sym: bool, scale_dtype: torch.dtype):
    """One group at a time, plain Python control flow: q [K, N] ints 0..15, scales/zeros [K/g, N]."""
    n, k = w.shape
    g = k if group == -1 else group
    q = torch.zeros(k, n, dtype=torch.int64)
    scales = torch.zeros(k // g, n, dtype=scale_dtype)
    zeros = torch.zeros(k // g, n, dtype=torch.int64)
    for col in range(n):
        for gi in range(k // g):
            vals = w[col, gi * g : (gi + 1) * g].float()  # fp32 scalars throughout, as the spec says
            lo, hi = torch.clamp(vals.min(), max=0.0), torch.clamp(vals.max(), min=0.0)
            raw = torch.maximum(hi / 7, -lo / 8) if sym else (hi - lo) / 15
            s = torch.clamp(raw, min=1e-8).to(scale_dtype)
            if s.item() == 0:
                s = torch.tensor(torch.finfo(scale_dtype).tiny, dtype=scale_dtype)
            z = 8 if sym else int(torch.clamp(torch.round(-lo / s.float()), 0, 15).item())
            qv = torch.clamp(torch.round(vals / s.float()) + z, 0, 15)
            q[gi * g : (gi + 1) * g, col] = qv.to(torch.int64)
            scales[gi, col] = s
            zeros[gi, col] = z
    return q, scales, zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_matches_naive_reference_bitwise(dtype, sym, group):
    g = make_generator(group + sym)
    w = randn(6, 256, dtype=dtype, generator=g, scale=0.1)
    w[1, :32] = 0  # an all-zero group
    w[2, :64] = w[2, :64].abs()  # an all-positive group (asym: zero point 0)
    q_ref, s_ref, z_ref = _naive_quantize(w, group, sym, dtype)
    out = quantize_weight_int4(w, group, sym=sym)
    assert out.group_size == (256 if group == -1 else group) and out.perm is None
    assert out.qweight.dtype == torch.int32 and out.qweight.shape == (32, 6)
    assert torch.equal(unpack_int4_rows(out.qweight).long(), q_ref)
    assert out.scales.dtype == dtype and torch.equal(out.scales, s_ref)
    if sym:
        assert out.zeros is None
    else:
        assert out.zeros.dtype == torch.uint8 and torch.equal(out.zeros.long(), z_ref)


@given(
    n=st.integers(1, 9),
    groups=st.integers(1, 3),
    group=st.sampled_from([32, 64, 128]),
    sym=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    scale=st.sampled_from([1e-4, 1e-2, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_at_most_half_a_step(n, groups, group, sym, dtype, scale, seed):
    k = group * groups
    w = randn(n, k, dtype=dtype, generator=make_generator(seed), scale=scale)
    qw = quantize_weight_int4(w, group, sym=sym)
    deq = qw.dequantize()  # [K, N]
    step = qw.scales.float().repeat_interleave(group, dim=0)
    err = (deq - w.float().t()).abs()
    # half a step, plus the scale's own rounding to its dtype (relative 2^-8 for bf16) over up to 8 steps
    slack = 8 * step * (2**-8 if dtype == torch.bfloat16 else 2**-11 if dtype == torch.float16 else 2**-23)
    assert (err <= step / 2 + slack + 1e-12).all()
    q = unpack_int4_rows(qw.qweight)
    assert q.min() >= 0 and q.max() <= 15


def test_zero_weight_and_exact_zeros():
    w = torch.zeros(4, 64, dtype=torch.float16)
    w[1, 5] = 0.3
    for sym in (True, False):
        qw = quantize_weight_int4(w, 32, sym=sym)
        assert (qw.scales > 0).all(), "a zero group still gets a positive scale"
        deq = qw.dequantize()
        assert deq[:, 0].eq(0).all() and deq[:, 2:].eq(0).all()  # zeros dequantize to exactly 0
        assert deq[6, 1] == 0  # asym: 0 is representable (the range always contains it)


def test_row_chunk_does_not_change_the_result():
    w = randn(37, 128, dtype=torch.bfloat16, generator=make_generator(5))
    a = quantize_weight_int4(w, 64, sym=False)
    b = quantize_weight_int4(w, 64, sym=False, row_chunk=8)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


def test_scale_dtype_and_fields():
    w = randn(16, 64, dtype=torch.bfloat16, generator=make_generator(1))
    qw = quantize_weight_int4(w, 32, scale_dtype=torch.float32)
    assert isinstance(qw, Int4Weight) and qw.scales.dtype == torch.float32
    assert qw.K == 64 and qw.N == 16
    assert torch.equal(qw.dequantize(), dequantize_int4_ref(qw.qweight, qw.scales, None, 32))


def test_pack_unpack_round_trip_and_nibble_order():
    q = torch.randint(0, 16, (64, 24), generator=make_generator(2))
    q[7::8, 0] = 15  # nibble 7 = 15 sets the word's sign bit
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.int32 and packed.shape == (8, 24)
    assert torch.equal(unpack_int4_rows(packed).long(), q)
    one = torch.zeros(8, 1, dtype=torch.int64)
    one[0, 0], one[1, 0] = 1, 2  # row 0 in the low nibble, row 1 in the next
    assert pack_int4_rows(one).item() == 0x21


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(w=torch.ones(3, 4, 5)), ValueError, "2-D"),
        (dict(w=torch.ones(3, 64, dtype=torch.int32)), TypeError, "dtype"),
        (dict(w=torch.ones(3, 64), group_size=48), ValueError, "group_size"),
        (dict(w=torch.ones(3, 96), group_size=64), ValueError, "multiple of 8 and of group_size"),
        (dict(w=torch.ones(3, 60), group_size=-1), ValueError, "multiple of 8"),
        (dict(w=torch.ones(3, 64), group_size=32, scale_dtype=torch.int8), TypeError, "scale_dtype"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, exc, match):
    w = kwargs.pop("w")
    with pytest.raises(exc, match=match):
        quantize_weight_int4(w, **kwargs)


def test_non_finite_weight_is_rejected():
    w = torch.ones(3, 64)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight_int4(w, 32)
