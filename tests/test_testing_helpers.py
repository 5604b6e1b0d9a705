import math

import pytest
import torch

from angel_kernels.testing import assert_close, poison, poisoned_empty, relative_error, tolerances, randn, make_generator


def test_assert_close_passes_within_tolerance():
    ref = torch.linspace(-3, 3, 101)
    assert_close((ref * (1 + 1e-4)).half(), ref)


def test_assert_close_reports_count_index_and_values():
    ref = torch.zeros(4, 5)
    out = ref.clone().half()
    out[2, 3] = 1.0
    with pytest.raises(AssertionError, match=r"1/20 elements off.*\(2, 3\): 1 vs 0"):
        assert_close(out, ref)


def test_assert_close_fails_on_nan_even_with_huge_tolerance():
    ref = torch.ones(8)
    out = ref.clone()
    out[5] = float("nan")
    with pytest.raises(AssertionError, match="NaN/inf where the reference is finite"):
        assert_close(out, ref, atol=1e9, rtol=1e9)


def test_assert_close_shape_mismatch():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.ones(2, 3), torch.ones(3, 2))


def test_poison_marks_every_dtype():
    assert torch.isnan(poison(torch.empty(3, dtype=torch.bfloat16))).all()
    assert (poison(torch.empty(3, dtype=torch.int8)) == -128).all()
    assert (poisoned_empty(2, 2, dtype=torch.int32) == torch.iinfo(torch.int32).min).all()


def test_relative_error_is_inf_on_nan_and_zero_on_equal():
    x = torch.randn(10)
    assert relative_error(x, x) == 0.0
    y = x.clone()
    y[0] = float("nan")
    assert math.isinf(relative_error(y, x))


def test_tolerances_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="no tolerance"):
        tolerances(torch.complex64)


def test_seeded_factories_are_reproducible_and_nonzero():
    a = randn(16, 16, generator=make_generator(3))
    b = randn(16, 16, generator=make_generator(3))
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_assert_close_dequantized_scales_with_magnitude_but_catches_wrong_terms():
    from angel_kernels.testing import assert_close_dequantized

    g = make_generator(1)
    ref = randn(64, 256, generator=g, dtype=torch.float32) * 3
    noisy = (ref * (1 + 2.0**-11 * randn(64, 256, generator=g, dtype=torch.float32))).half()
    noisy[0, 0] = ref[0, 0] + 0.004  # a cancelled output off by a rounding-sized amount passes
    assert_close_dequantized(noisy, ref)
    wrong = noisy.clone()
    wrong[5, 7] += 0.1  # one wrong term, too small to move the relative error past eps
    with pytest.raises(AssertionError, match="elements off"):
        assert_close_dequantized(wrong, ref)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close_dequantized((ref * 1.01).half(), ref)
