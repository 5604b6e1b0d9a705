"""w8a16 GEMM: every candidate against the fp32 reference, on awkward shapes, plus input validation."""
from dataclasses import replace

import pytest
import torch
from hypothesis import given, strategies as st

from angel_kernels import quantize_weight_int8, row_major_int8, tile_major_int8, w8a16_gemm
from angel_kernels.gemm._splitk import PROGRAMS_PER_SM, split_k_for, tile_counters
from angel_kernels.gemm.w8a16 import INTERPRETER_CONFIG, W8A16, W8A16Problem, launch_tiled
from angel_kernels.reference import quantize_weight_int8_ref, w8a16_gemm_ref
from angel_kernels.testing import assert_close, make_generator, randn
from weight_only_cases import (
    EVERY_CANDIDATE_MS,
    INVARIANCE_MS,
    INVARIANCE_SHAPES,
    LLAMA_SHAPES,
    REAL_SHAPE_CANDIDATES,
    REAL_SHAPE_MS,
    TUNING_SPACE_MS,
    Layer,
    WeightOnlyGemm,
    check_batch_invariance,
    check_candidate,
    check_dot_t_rows_match_swap_ab,
    check_real_shape,
    check_tuning_space_fits_the_m_bucket,
)

CANDIDATES = W8A16.names()


def _inputs(m, n, k, dtype, device, seed, bias=False):
    g = make_generator(seed)
    x = randn(m, k, dtype=dtype, device=device, generator=g)
    w = randn(n, k, dtype=dtype, device=device, generator=g, scale=0.05)
    q, s = quantize_weight_int8(w)
    b = randn(n, dtype=dtype, device=device, generator=g) if bias else None
    return x, q, s, b


def _layer(m, n, k, dtype, device, seed, *, bias=False, tile_major=False):
    x, q, s, b = _inputs(m, n, k, dtype, device, seed, bias=bias)
    qt = tile_major_int8(q) if tile_major else q
    return Layer(x, n, lambda a: w8a16_gemm(a, qt, s, b, tile_major=tile_major), lambda a: w8a16_gemm_ref(a, q, s, b))


# dequant_matmul rounds each weight q·s to fp16 before the product; tiled scales the fp32 accumulator
OP = WeightOnlyGemm("w8a16", "ANGEL_KERNELS_FORCE_W8A16", _layer, exact_weight_candidates=("tiled",))


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("m", EVERY_CANDIDATE_MS)
def test_every_candidate_matches_reference(candidate, m, device, monkeypatch):
    # N and K: multiples of 16, not powers of two, K not a multiple of the interpreter's BLOCK_K
    layer = _layer(m, 80, 208, torch.float16, device, seed=m, bias=m % 2 == 1)
    check_candidate(OP, candidate, layer, monkeypatch, name=f"M={m}")


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_bf16_and_leading_dims(candidate, device, monkeypatch):
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_W8A16", candidate)
    x, q, s, b = _inputs(6, 48, 96, torch.bfloat16, device, seed=7, bias=True)
    x3 = x.reshape(2, 3, 96)
    y = w8a16_gemm(x3, q, s, b)
    assert y.shape == (2, 3, 48)
    assert_close(y, w8a16_gemm_ref(x3, q, s, b))


def test_tiled_handles_strided_x_and_writes_every_element(device):
    x, q, s, _ = _inputs(5, 64, 128, torch.float16, device, seed=11)
    wide = torch.cat([x, x], dim=1)[:, ::2]  # non-contiguous rows, column stride 2
    assert not wide.is_contiguous()
    cfg = W8A16.get("tiled")
    p = W8A16Problem(5, 64, 128, torch.float16, torch.device(device))
    y = cfg.run(p, wide, q, s, None)
    assert_close(y, w8a16_gemm_ref(wide, q, s))


@pytest.mark.parametrize("view", ["row_stride", "offset", "k_stride"])
def test_weight_views_that_are_not_word_aligned(view, device):
    """The word path needs 4-byte-aligned, K-contiguous rows; other weight views take the element path (same
    results)."""
    from angel_kernels.gemm.w8a16 import _word_view_ok

    x, q, s, _ = _inputs(3, 48, 96, torch.float16, device, seed=5)
    if view == "row_stride":  # rows 99 bytes apart
        w = torch.zeros(48, 99, dtype=torch.int8, device=device)[:, :96]
    elif view == "offset":  # starts one byte into its storage
        w = torch.zeros(48, 97, dtype=torch.int8, device=device)[:, 1:]
    else:  # K not contiguous
        w = torch.zeros(48, 192, dtype=torch.int8, device=device)[:, ::2]
    w.copy_(q)
    assert not _word_view_ok(w) and _word_view_ok(q)
    cfg = W8A16.get("tiled")
    p = W8A16Problem(3, 48, 96, torch.float16, torch.device(device))
    assert torch.equal(cfg.run(p, x, w, s, None), cfg.run(p, x, q, s, None))
    # DOT_T on the element path too (a batch config must not change its product with the weight's alignment)
    dot_t = replace(INTERPRETER_CONFIG, extra=INTERPRETER_CONFIG.extra + (("DOT_T", 1),))
    assert_close(launch_tiled(x, w, s, None, dot_t), w8a16_gemm_ref(x, q, s, None))


def test_tile_major_layout_and_round_trip():
    """Element (n, k) of a tile-major weight sits at (n // 64)·64K + (k // 128)·8192 + (n % 64)·128 + k % 128; the
    layout round-trips; shapes without whole 64 × 128 blocks are refused."""
    from angel_kernels.gemm.w8a16 import tile_major_fits

    n, k = 192, 384
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=make_generator(1))
    t = tile_major_int8(q)
    assert t.shape == q.shape and t.is_contiguous() and not torch.equal(t, q)
    flat = t.flatten()
    for a, c in [(0, 0), (63, 127), (64, 0), (1, 128), (130, 300), (191, 383)]:
        assert flat[(a // 64) * 64 * k + (c // 128) * 8192 + (a % 64) * 128 + c % 128] == q[a, c]
    assert torch.equal(row_major_int8(t), q)
    assert tile_major_int8(q.t().contiguous().t()).equal(t)  # a non-contiguous row-major view is fine
    assert tile_major_fits(64, 128) and not tile_major_fits(96, 128) and not tile_major_fits(64, 192)
    for bad in (q[:96], q[:, :320]):
        with pytest.raises(ValueError, match="tile-major int8 weight needs N % 64 == 0 and K % 128 == 0"):
            tile_major_int8(bad)
    with pytest.raises(ValueError, match="contiguous"):
        row_major_int8(torch.zeros(128, 256, dtype=torch.int8)[::2])


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("m", [1, 3, 33])
def test_tile_major_gives_the_row_major_bits(candidate, m, device, monkeypatch):
    """Every candidate on a tile-major weight returns exactly what it returns on the row-major one: 3 × 2 blocks of
    64 × 128 (and ragged M), with bias."""
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_W8A16", candidate)
    x, q, s, b = _inputs(m, 192, 256, torch.float16, device, seed=20 + m, bias=True)
    y = w8a16_gemm(x, tile_major_int8(q), s, b, tile_major=True)
    assert torch.equal(y, w8a16_gemm(x, q, s, b)), candidate
    assert_close(y, w8a16_gemm_ref(x, q, s, b))


@pytest.mark.parametrize("block_k", [64, 128])
@pytest.mark.parametrize("split_k", [1, 3])
def test_tile_major_kernel_configs(block_k, split_k, device):
    """The Triton kernel on a tile-major weight: K-blocks of 128 (one block per step) and 64 (two steps per block),
    split-K ranges (split launch and SERIAL), DOT_T tiles, the element path (WORDS 0): the row-major bits."""
    x, q, s, b = _inputs(5, 128, 768, torch.bfloat16, device, seed=block_k + split_k, bias=True)
    t = tile_major_int8(q)
    base = INTERPRETER_CONFIG if device.type == "cpu" else replace(INTERPRETER_CONFIG, num_stages=2)
    for extra in ((("SERIAL", 0),), (("SERIAL", 1),), (("DOT_T", 1), ("SERIAL", 0)), (("SERIAL", 0), ("WORDS", 0))):
        cfg = replace(base, BLOCK_K=block_k, extra=base.extra + extra)
        y = launch_tiled(x, t, s, b, cfg, split_k=split_k, tile_major=True)
        assert torch.equal(y, launch_tiled(x, q, s, b, cfg, split_k=split_k)), (extra, block_k, split_k)
    assert_close(y, w8a16_gemm_ref(x, q, s, b))
    with pytest.raises(ValueError, match="must divide 128"):
        launch_tiled(x, t, s, b, replace(base, BLOCK_K=256), tile_major=True)


@pytest.mark.parametrize("split_k", [2, 3, 4])
def test_split_k_matches_reference_and_leaves_counters_zeroed(split_k, device):
    from angel_kernels.gemm import w8a16 as mod

    x, q, s, b = _inputs(19, 144, 400, torch.float16, device, seed=split_k, bias=True)  # K tail: 400 = 6·64 + 16
    cfg = INTERPRETER_CONFIG if device.type == "cpu" else mod.heuristic_config(W8A16Problem(19, 144, 400, x.dtype, device))
    cfg = replace(cfg, extra=tuple(kv for kv in cfg.extra if kv[0] not in ("SERIAL", "DOT_T")) + (("SERIAL", 0),))
    for _ in range(2):  # the second call proves the tile counters were reset by the first
        y = launch_tiled(x, q, s, b, cfg, split_k=split_k)
        assert_close(y, w8a16_gemm_ref(x, q, s, b), name=f"split_k={split_k}")
    assert int(tile_counters(x.device, 1).abs().sum()) == 0
    # SERIAL: one program per tile walks the same split ranges in order: the same bits, no partials
    serial = replace(cfg, extra=cfg.extra[:-1] + (("SERIAL", 1),))
    assert torch.equal(launch_tiled(x, q, s, b, serial, split_k=split_k), y)
    # DOT_T (tokens on the MMA's M side): the same sums in the transposed product (the same bits on the GPU, see
    # test_gpu_dot_t_rows_are_the_swap_ab_rows; numpy may order a transposed product's sums differently)
    for base in (cfg, serial):
        y_t = launch_tiled(x, q, s, b, replace(base, extra=base.extra + (("DOT_T", 1),)), split_k=split_k)
        assert_close(y_t, w8a16_gemm_ref(x, q, s, b), name=f"split_k={split_k} {base.extra}")


def test_split_k_depends_on_weight_shape_only():
    def split(n, k, sms=132):
        return split_k_for(n, k, 128, sms, PROGRAMS_PER_SM["w8a16"])

    assert split(28672, 4096) == 1  # 448 tiles of 64 rows: 3.4 per SM already
    assert split(28672, 4096, sms=160) == 2
    assert split(4096, 14336) == 8  # 64 tiles: 512 programs
    assert split(6144, 4096) == 4  # 8 would leave 512 K values per split
    assert split(8192, 28672) == 4
    assert split(4096, 4096) == 4
    assert split(64, 1024) == 1  # too few K steps to split


@given(
    m=st.integers(1, 40),
    n16=st.integers(1, 6),
    k16=st.integers(1, 12),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_and_magnitudes(m, n16, k16, scale, seed):
    import os

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no Triton path here")
    g = make_generator(seed)
    n, k = 16 * n16, 16 * k16
    x = randn(m, k, device=device, generator=g, scale=scale)
    w = randn(n, k, device=device, generator=g, scale=0.1)
    q, s = quantize_weight_int8(w)
    p = W8A16Problem(m, n, k, torch.float16, torch.device(device))
    y = W8A16.get("tiled").run(p, x, q, s, None)
    assert_close(y, w8a16_gemm_ref(x, q, s), atol=2e-3 * scale * 10)


def test_quantizer_matches_reference_bitwise_and_zero_rows():
    g = make_generator(5)
    w = randn(37, 70, generator=g, dtype=torch.bfloat16)
    w[3] = 0  # an all-zero output channel: scale stays positive, values stay 0
    q, s = quantize_weight_int8(w, row_chunk=8)
    q_ref, s_ref = quantize_weight_int8_ref(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert (q[3] == 0).all() and s[3] > 0
    assert q.abs().max() <= 127
    # round-trip error: at most half a step per element
    err = (q.float() * s[:, None] - w.float()).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()


def test_quantizer_rejects_bad_weights():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_int8(torch.ones(3, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        quantize_weight_int8(torch.ones(3, 4, dtype=torch.int32))
    bad = torch.ones(3, 4)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight_int8(bad)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(x=a["x"].float()), TypeError, "x dtype"),
        (lambda a: a.update(qweight=a["qweight"].to(torch.int32)), TypeError, "qweight dtype"),
        (lambda a: a.update(x=a["x"][:, :-16]), ValueError, "K="),
        (lambda a: a.update(scales=a["scales"][:-1]), ValueError, "scales must have shape"),
        (lambda a: a.update(scales=a["scales"][:, None]), ValueError, "scales must be 1-D"),
        (lambda a: a.update(bias=torch.ones(3, dtype=torch.float16)), ValueError, "bias must have shape"),
        (lambda a: a.update(bias=torch.ones(32, dtype=torch.bfloat16)), TypeError, "bias dtype"),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, "meta"),
        (lambda a: a.update(tile_major=True), ValueError, r"N % 64 == 0 and K % 128 == 0, got \[N, K\] = \[32, 64\]"),
        (lambda a: a.update(x=torch.randn(4, 128).half(), qweight=torch.zeros(128, 256, dtype=torch.int8)[:, :128],
                            scales=torch.rand(128), tile_major=True), ValueError, "must be contiguous"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, exc, match):
    args = dict(
        x=torch.randn(4, 64).half(),
        qweight=torch.randint(-127, 128, (32, 64), dtype=torch.int8),
        scales=torch.rand(32),
        bias=None,
        tile_major=False,
    )
    mutate(args)
    with pytest.raises(exc, match=match):
        w8a16_gemm(args["x"], args["qweight"], args["scales"], args["bias"], tile_major=args["tile_major"])


def test_default_dispatch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = W8A16Problem(4, 32, 64, torch.float16, torch.device("cpu"))
    assert W8A16.select(p).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert W8A16.select(p).name == "tiled"


def test_reference_switch_routes_the_launcher_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr("angel_kernels.gemm.w8a16.w8a16_gemm_ref", lambda *a: calls.append(1) or w8a16_gemm_ref(*a))
    monkeypatch.setenv("ANGEL_KERNELS_REFERENCE", "1")
    x, q, s, _ = _inputs(2, 32, 64, torch.float16, "cpu", seed=2)
    w8a16_gemm(x, q, s)
    assert calls == [1]


def test_tune_times_rotating_input_sets_and_records_the_fastest(tmp_path, device, monkeypatch):
    """With a 40 KB "L2", sets of 27 KB (x 2 KB, weight 24 KB, scales) rotate 3 at a time: the bench gets 3 calls
    on distinct inputs, set 0 is the checked one, and the fastest config is stored."""
    from angel_kernels.gemm import w8a16 as mod
    from angel_kernels.tuning import TunedConfigStore

    if device.type == "cuda":
        pytest.skip("interpreter-sized; on a GPU the benchmarks run tune() with the graph timer")
    p = W8A16Problem(4, 96, 256, torch.float16, device)
    space = mod.tuning_space(p)[:3]
    monkeypatch.setattr(mod, "tuning_space", lambda p: space)
    monkeypatch.setattr("angel_kernels.tuning.l2_bytes", lambda device: 40_000)
    outputs = []

    def bench(calls):
        outputs.append([c() for c in calls])
        return float(len(outputs))  # each config "slower" than the one before

    store = TunedConfigStore(tmp_path)
    best, timings = mod.tune(96, 256, 3, device=device, store=store, bench=bench)
    assert best == space[0] and list(timings) == space
    assert store.lookup(mod.KERNEL_NAME, p.key(), device) == best
    assert [len(o) for o in outputs] == [3, 3, 3]
    y0, y1, y2 = outputs[0]
    assert not torch.equal(y0, y1) and not torch.equal(y1, y2)  # distinct input sets
    for o in outputs[1:]:  # every config runs on the same sets (its bits may differ: tolerance)
        for i in range(3):
            assert_close(o[i], outputs[0][i], name=f"set {i}")


# ---------------------------------------------------------------- GPU tier: real shapes, compiled kernels
@pytest.mark.gpu
@pytest.mark.parametrize("candidate", REAL_SHAPE_CANDIDATES)
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("m", REAL_SHAPE_MS)
def test_gpu_real_shapes(candidate, n, k, m, monkeypatch):
    check_real_shape(OP, candidate, n, k, m, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", INVARIANCE_SHAPES)
@pytest.mark.parametrize("m", INVARIANCE_MS)
def test_gpu_batch_invariance_tiled(n, k, m, monkeypatch):
    check_batch_invariance(OP, n, k, m, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("candidate", REAL_SHAPE_CANDIDATES)
@pytest.mark.parametrize("m", [1, 16, 64, 257, 1024])
def test_gpu_tile_major_real_shapes(candidate, m, monkeypatch):
    """A tile-major weight (as the vLLM method stores it) at real shapes and every M regime: the row-major
    results bit for bit, the reference within tolerance, and batch-invariant rows below LARGE_M."""
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_W8A16", candidate)
    for n, k in ((6144, 4096), (4096, 14336)):
        x, q, s, b = _inputs(m, n, k, torch.float16, "cuda", seed=m, bias=True)
        t = tile_major_int8(q)
        y = w8a16_gemm(x, t, s, b, tile_major=True)
        assert torch.equal(y, w8a16_gemm(x, q, s, b)), f"{candidate} M={m} {n}x{k}"
        OP.close(candidate)(y, w8a16_gemm_ref(x, q, s, b), name=f"{candidate} M={m} {n}x{k}")
        if candidate == "tiled" and m > 1:
            assert torch.equal(y[m - 1 :], w8a16_gemm(x[m - 1 :], t, s, b, tile_major=True))


@pytest.mark.parametrize("m", TUNING_SPACE_MS)
def test_tuning_space_fits_the_m_bucket(m):
    from angel_kernels.gemm.w8a16 import BLOCK_K, tuning_space

    space = tuning_space(W8A16Problem(m, 4096, 4096, torch.float16, torch.device("cpu")))
    check_tuning_space_fits_the_m_bucket(space, m)
    assert max(c.BLOCK_K for c in space) == BLOCK_K


def test_dequantize_int8_matches_torch(device):
    from angel_kernels.gemm.w8a16 import dequantize_int8

    x, q, s, _ = _inputs(1, 70, 300, torch.float16, device, seed=9)  # tails in both dimensions
    for dtype in (torch.float16, torch.bfloat16):
        w = dequantize_int8(q, s, dtype)
        ref = (q.float() * s[:, None]).to(dtype)
        assert w.dtype == dtype and w.shape == q.shape
        if device.type == "cpu" and dtype == torch.bfloat16:
            # the interpreter truncates fp32 → bf16 instead of rounding: allow one bf16 step there
            assert_close(w, ref, atol=0, rtol=2**-7)
        else:
            assert torch.equal(w, ref)
    x, q, s, _ = _inputs(1, 128, 384, torch.float16, device, seed=10)
    for dtype in (torch.float16, torch.bfloat16):  # a tile-major weight comes back row-major
        assert torch.equal(dequantize_int8(tile_major_int8(q), s, dtype, tile_major=True), dequantize_int8(q, s, dtype))


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(64, 256), (80, 200)], ids=["even", "ragged"])
def test_conversions_are_bit_identical_to_plain(m, dtype, n, k, device):
    """int8 → float by integer add + bitcast (MAGIC, fp16) and a word at a time (WORDS: PTX byte permutes on a
    GPU, integer ops under the interpreter) give exactly the plain conversion's results, every value -127..127,
    with and without tile masks (ragged N and K)."""
    from dataclasses import replace

    x, q, s, b = _inputs(m, n, k, dtype, device, seed=m, bias=True)
    values = torch.arange(-127, 128, dtype=torch.int8)  # every int8 weight value appears, in rows 0 and 1
    q[0, : min(255, k)] = values[:k]
    q[1, : max(0, 255 - k)] = values[k:]
    plain, *others = [
        launch_tiled(x, q, s, b, replace(INTERPRETER_CONFIG, extra=(("GROUP_N", 8), *modes)))
        for modes in [(("MAGIC", 0), ("WORDS", 0)), (("MAGIC", 1), ("WORDS", 0)), (("MAGIC", 1), ("WORDS", 1))]
    ]
    for name, y in zip(["MAGIC", "WORDS"], others):
        assert torch.equal(plain, y), f"{name} differs from the plain conversion"
    assert_close(plain, w8a16_gemm_ref(x, q, s, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 64, 257])
def test_gpu_word_conversion_at_real_configs(dtype, m):
    """WORDS (PTX) against the plain conversion at the heuristic config of each M regime: bit for bit."""
    from dataclasses import replace

    from angel_kernels.gemm.w8a16 import heuristic_config

    x, q, s, b = _inputs(m, 4096, 4096, dtype, "cuda", seed=m, bias=True)
    cfg = heuristic_config(W8A16Problem(m, 4096, 4096, dtype, x.device))
    plain = launch_tiled(x, q, s, b, replace(cfg, extra=(("GROUP_N", 8), ("MAGIC", 0), ("WORDS", 0))))
    words = launch_tiled(x, q, s, b, replace(cfg, extra=(("GROUP_N", 8), ("WORDS", 1))))
    assert torch.equal(plain, words)
    assert_close(words, w8a16_gemm_ref(x, q, s, b))


def test_serial_splits_only_once_the_tiles_give_the_programs_the_split_is_for():
    from angel_kernels.gemm._splitk import serial_by_default

    cpu = torch.device("cpu")  # 132 SMs, as an H100
    assert not serial_by_default(cpu, "w4a16", 2, 448)  # 28672×4096 at M = 1: the split's programs are needed
    assert serial_by_default(cpu, "w4a16", 2, 462)
    assert serial_by_default(cpu, "w8a16", 8, 396) and not serial_by_default(cpu, "w8a16", 8, 395)
    assert not serial_by_default(cpu, "w8a16", 1, 10_000)  # nothing to serialize


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(1000, 4000, 77), (4096, 4096, 130)])
def test_gpu_dot_t_rows_are_the_swap_ab_rows(n, k, m):
    """Batch invariance across tile kinds: DOT_T tiles (K-blocks of 128 and 64, split launch or SERIAL) give the
    rows of the swap-AB M=1 tile bit for bit, with N, K (4000 = 31·128 + 32, split 2) and M tails."""
    x, q, s, b = _inputs(m, n, k, torch.bfloat16 if m == 77 else torch.float16, torch.device("cuda"), seed=m,
                         bias=True)
    check_dot_t_rows_match_swap_ab(lambda xs, cfg: launch_tiled(xs, q, s, b, cfg), x)
