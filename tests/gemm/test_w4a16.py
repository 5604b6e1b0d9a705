"""w4a16 GEMM: every candidate against the fp32 reference, every group size, sym/asym, fp16/bf16, act-order,
both dequantization modes of the tiled kernel, awkward shapes, and input validation."""
import os
from dataclasses import replace

import pytest
import torch
from hypothesis import given, strategies as st

from angel_kernels import quantize_weight_int4, w4a16_gemm
from angel_kernels.gemm._splitk import PROGRAMS_PER_SM, split_k_for, tile_counters
from angel_kernels.gemm.w4a16 import (
    W4A16,
    W4A16Problem,
    _modes,
    block_k_for,
    dequantize_packed,
    interpreter_config,
    launch_tiled,
    tune,
    tuning_space,
)
from angel_kernels.quantization.int4 import pack_int4_rows
from angel_kernels.reference import dequantize_int4_ref, w4a16_gemm_ref
from angel_kernels.testing import assert_close, assert_close_dequantized, make_generator, poisoned_empty, randn, tolerances
from angel_kernels.tuning import KernelConfig
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

CANDIDATES = W4A16.names()
GROUPS = [32, 64, 128, -1]  # -1: channel-wise
MODES = [(1, 1), (1, 0), (0, 1), (0, 0)]  # (MAGIC, INTERLEAVE)


def _inputs(m, n, k, dtype, device, seed, *, group=128, sym=True, bias=False, act_order=False, wscale=0.05):
    g = make_generator(seed)
    x = randn(m, k, dtype=dtype, device=device, generator=g)
    w = quantize_weight_int4(randn(n, k, dtype=dtype, device=device, generator=g, scale=wscale), group, sym=sym)
    b = randn(n, dtype=dtype, device=device, generator=g) if bias else None
    perm = torch.randperm(k, generator=g).to(torch.int32).to(device) if act_order else None
    return x, w, b, perm


def _ref(x, w, b=None, perm=None):
    return w4a16_gemm_ref(x, w.qweight, w.scales, w.zeros, w.group_size, b, perm)


def _call(x, w, b=None, perm=None):
    return w4a16_gemm(x, w.qweight, w.scales, w.zeros, w.group_size, b, perm)


def _layer(m, n, k, dtype, device, seed, *, bias=False, group=128, sym=True):
    x, w, b, _ = _inputs(m, n, k, dtype, device, seed, group=group, sym=sym, bias=bias)
    return Layer(x, n, lambda a: _call(a, w, b), lambda a: _ref(a, w, b))


# Both candidates round each dequantized weight to the activation dtype (the tiled kernel feeds the MMA with it).
OP = WeightOnlyGemm("w4a16", "ANGEL_KERNELS_FORCE_W4A16", _layer)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("m", EVERY_CANDIDATE_MS)
def test_every_candidate_matches_reference(candidate, m, device, monkeypatch):
    # N, K multiples of 16 and of every group, not powers of two; the group, symmetry and bias vary with M
    group = GROUPS[m % 4]
    layer = _layer(m, 80, 384, torch.float16, device, seed=m, group=group, sym=m % 3 != 0, bias=m % 2 == 1)
    check_candidate(OP, candidate, layer, monkeypatch, name=f"M={m} g={group}")


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", GROUPS)
def test_groups_symmetry_dtypes(candidate, dtype, sym, group, device, monkeypatch):
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_W4A16", candidate)
    x, w, b, _ = _inputs(5, 48, 256, dtype, device, seed=group + 3 * sym, group=group, sym=sym, bias=True)
    assert (w.zeros is None) == sym
    assert_close(_call(x, w, b), _ref(x, w, b), name=f"{candidate} {dtype} g={group} sym={sym}")


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_act_order_perm(candidate, dtype, device, monkeypatch):
    """perm: packed row k multiplies x[..., perm[k]]; the same as running the unpermuted layer on x[..., perm]."""
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_W4A16", candidate)
    x, w, b, perm = _inputs(9, 64, 256, dtype, device, seed=4, group=64, sym=False, bias=True, act_order=True)
    y = _call(x, w, b, perm)
    assert_close(y, _ref(x, w, b, perm))
    assert_close(y, _ref(x[:, perm.long()], w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_dequant_modes_are_bitwise_identical(dtype, sym, device):
    """MAGIC (bitcast from 0x6400 / 0x4300) and INTERLEAVE (pairs + joins) give the very same weights as the
    plain per-element path, so the outputs match bit for bit (and the reference within tolerance)."""
    x, w, b, perm = _inputs(19, 80, 384, dtype, device, seed=8, group=64, sym=sym, bias=True, act_order=True)
    ref = _ref(x, w, b, perm)
    outs = []
    for magic, inter in MODES:
        cfg = KernelConfig(32, 64, block_k_for(64), extra=_modes(magic, inter))
        y = launch_tiled(x, w.qweight, w.scales, w.zeros, w.group_size, b, perm, cfg)
        assert_close(y, ref, name=f"MAGIC={magic} INTERLEAVE={inter}")
        outs.append(y)
    for (magic, inter), y in zip(MODES[1:], outs[1:]):
        assert torch.equal(y, outs[0]), f"MAGIC={magic} INTERLEAVE={inter} differs from MAGIC=1 INTERLEAVE=1"
    # PTX=0: the Triton dequantization instead of the PTX one (the same path under the interpreter)
    cfg = KernelConfig(32, 64, block_k_for(64), extra=_modes(1, 1, ptx=0))
    assert torch.equal(launch_tiled(x, w.qweight, w.scales, w.zeros, w.group_size, b, perm, cfg), outs[0])


@pytest.mark.parametrize("magic,inter", MODES)
def test_extreme_zero_points_and_nibbles(magic, inter, device):
    """Every nibble 0..15 against zeros 0 and 16 (old GPTQ exports read a stored −1 back as 16)."""
    n, k = 32, 128
    q = torch.arange(k * n, dtype=torch.int32).reshape(k, n) % 16
    qweight = pack_int4_rows(q).to(device)
    zeros = torch.tensor([0, 16, 8, 15] * (n // 4), dtype=torch.uint8).reshape(1, n).repeat(k // 32, 1).to(device)
    scales = torch.full((k // 32, n), 0.25, dtype=torch.float16, device=device)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.eye(k, dtype=dtype, device=device)[:16]  # rows of x pick rows of the weight: y = Wᵀ[:16]
        cfg = KernelConfig(16, 32, 32, extra=_modes(magic, inter))
        y = launch_tiled(x, qweight, scales, zeros, 32, None, None, cfg)
        expect = dequantize_int4_ref(qweight, scales, zeros, 32)[:16]
        assert torch.equal(y.float(), expect), f"{dtype}"


def test_leading_dims_strided_x_and_strided_weight_views(device):
    x, w, b, _ = _inputs(6, 48, 256, torch.bfloat16, device, seed=7, group=64, sym=False, bias=True)
    x3 = x.reshape(2, 3, 256)
    y = w4a16_gemm(x3, w.qweight, w.scales, w.zeros, 64, b)
    assert y.shape == (2, 3, 48)
    assert_close(y, w4a16_gemm_ref(x3, w.qweight, w.scales, w.zeros, 64, b))
    wide = torch.cat([x, x], dim=1)[:, ::2]  # column stride 2
    scales_t = w.scales.t().contiguous().t()  # [K // g, N] with strides (1, K // g)
    zeros_t = w.zeros.t().contiguous().t()
    assert not wide.is_contiguous() and not scales_t.is_contiguous()
    p = W4A16Problem(6, 48, 256, 64, torch.bfloat16, torch.device(device))
    y = W4A16.get("tiled").run(p, wide, w.qweight, scales_t, zeros_t, None, None)
    assert_close(y, w4a16_gemm_ref(wide, w.qweight, w.scales, w.zeros, 64))


@pytest.mark.parametrize("group,k", [(128, 384), (-1, 200), (-1, 8)])
def test_tiled_writes_every_element(group, k, device):
    """Poisoned output buffer (NaN): an element the kernel forgot stays NaN and fails; channel-wise K=200 and
    K=8 exercise the masked K tail (BLOCK_K 128)."""
    x, w, b, _ = _inputs(37, 80, k, torch.float16, device, seed=k, group=group, sym=False, bias=True)
    out = poisoned_empty(37, 80, dtype=torch.float16, device=device)
    y = launch_tiled(x, w.qweight, w.scales, w.zeros, w.group_size, b, None, interpreter_config(w.group_size), out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, _ref(x, w, b))


@pytest.mark.parametrize("split_k", [2, 3, 4])
@pytest.mark.parametrize("group,k", [(64, 384), (-1, 200)])
def test_split_k_matches_reference_and_leaves_counters_zeroed(split_k, group, k, device):
    """Deterministic split-K (last program of a tile sums the partials in order), act-order and K tails included."""
    from angel_kernels.gemm import w4a16 as mod

    x, w, b, perm = _inputs(19, 144, k, torch.float16, device, seed=split_k, group=group, sym=False, bias=True,
                            act_order=True)
    p = W4A16Problem(19, 144, k, w.group_size, x.dtype, device)
    cfg = interpreter_config(w.group_size) if device.type == "cpu" else mod.heuristic_config(p)
    cfg = replace(cfg, extra=tuple(kv for kv in cfg.extra if kv[0] not in ("SERIAL", "DOT_T")) + (("SERIAL", 0),))
    for _ in range(2):  # the second call proves the tile counters were reset by the first
        y = launch_tiled(x, w.qweight, w.scales, w.zeros, w.group_size, b, perm, cfg, split_k=split_k)
        assert_close(y, _ref(x, w, b, perm), name=f"split_k={split_k}")
    assert int(tile_counters(x.device, 1).abs().sum()) == 0
    # SERIAL: one program per tile walks the same split ranges in order: the same bits, no partials
    serial = replace(cfg, extra=cfg.extra[:-1] + (("SERIAL", 1),))
    assert torch.equal(launch_tiled(x, w.qweight, w.scales, w.zeros, w.group_size, b, perm, serial, split_k=split_k), y)
    # DOT_T (tokens on the MMA's M side): the same sums in the transposed product (bitwise on the GPU: w8a16's
    # test_gpu_dot_t_rows_are_the_swap_ab_rows)
    for base in (cfg, serial):
        y_t = launch_tiled(x, w.qweight, w.scales, w.zeros, w.group_size, b, perm,
                           replace(base, extra=base.extra + (("DOT_T", 1),)), split_k=split_k)
        assert_close(y_t, _ref(x, w, b, perm), name=f"split_k={split_k} {base.extra}")


def test_split_k_depends_on_weight_shape_only():
    def split(n, k, block_k=128, sms=132):
        return split_k_for(n, k, block_k, sms, PROGRAMS_PER_SM["w4a16"])

    assert split(28672, 4096) == 2  # 448 tiles of 64 rows: 3.4 per SM, short of 3.5
    assert split(28672, 4096, sms=112) == 1  # 4 per SM
    assert split(4096, 14336) == 8  # 64 tiles: 512 programs
    assert split(6144, 4096) == 4
    assert split(4096, 4096, 32) == 4  # group 32: same split, more K-blocks per split
    assert split(8192, 28672, 64) == 4
    assert split(64, 1024) == 1  # too few K values to split


def test_dequantize_packed_matches_reference(device):
    _, w, _, _ = _inputs(1, 48, 256, torch.float16, device, seed=3, group=32, sym=False)
    dq = dequantize_packed(w.qweight, w.scales, w.zeros, 32, torch.float32)
    assert torch.equal(dq, dequantize_int4_ref(w.qweight, w.scales, w.zeros, 32))


def _triton_here():
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@given(
    m=st.integers(1, 40),
    n16=st.integers(1, 6),
    kg=st.integers(1, 3),
    group=st.sampled_from(GROUPS),
    sym=st.booleans(),
    bf16=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_and_magnitudes(m, n16, kg, group, sym, bf16, scale, seed):
    if not _triton_here():
        pytest.skip("no Triton path here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float16
    n = 16 * n16
    k = 8 * (5 * kg + 1) if group == -1 else group * kg  # channel-wise: K = 48, 88, 128 (masked K tails)
    g = make_generator(seed)
    x = randn(m, k, dtype=dtype, device=device, generator=g, scale=scale)
    w = quantize_weight_int4(randn(n, k, dtype=dtype, device=device, generator=g, scale=0.1), group, sym=sym)
    p = W4A16Problem(m, n, k, w.group_size, dtype, torch.device(device))
    y = W4A16.get("tiled").run(p, x, w.qweight, w.scales, w.zeros, None, None)
    assert_close(y, _ref(x, w), atol=tolerances(dtype)[0] * scale * 10)


def test_registered_op_and_fake_shape():
    x, w, b, perm = _inputs(3, 32, 64, torch.float16, "cpu", seed=1, group=32, bias=True, act_order=True)
    y = torch.ops.angel_kernels.w4a16_gemm(x, w.qweight, w.scales, w.zeros, 32, b, perm)
    assert_close(y, _ref(x, w, b, perm))
    from torch._subclasses.fake_tensor import FakeTensorMode

    x3, qweight, scales = x.reshape(1, 3, 64), w.qweight, w.scales
    with FakeTensorMode() as mode:
        fx, fq, fs = (mode.from_tensor(t) for t in (x3, qweight, scales))
        fy = torch.ops.angel_kernels.w4a16_gemm(fx, fq, fs, None, 32)
    assert fy.shape == (1, 3, 32) and fy.dtype == torch.float16


def test_empty_batch():
    x, w, _, _ = _inputs(1, 32, 64, torch.float16, "cpu", seed=1, group=32)
    assert _call(x[:0], w).shape == (0, 32)


def _bad_args():
    g = make_generator(0)
    w = quantize_weight_int4(randn(32, 128, generator=g, dtype=torch.float16, scale=0.05), 64, sym=False)
    return dict(x=randn(4, 128, generator=g), qweight=w.qweight, scales=w.scales, zeros=w.zeros, group_size=64,
                bias=None, perm=None)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(x=a["x"].float()), TypeError, "x dtype"),
        (lambda a: a.update(qweight=a["qweight"].to(torch.int64)), TypeError, "qweight dtype"),
        (lambda a: a.update(qweight=a["qweight"].reshape(-1)), ValueError, "qweight must be 2-D"),
        (lambda a: a.update(x=a["x"][:, :-4]), ValueError, "multiple of 8"),
        (lambda a: a.update(x=a["x"][:, :-64]), ValueError, "x has K=64"),
        (lambda a: a.update(group_size=48), ValueError, "group_size must be one of"),
        (lambda a: a.update(group_size=256), ValueError, "group_size must be one of"),
        (lambda a: a.update(x=torch.randn(4, 96).half(), qweight=a["qweight"][:12]), ValueError, "not a multiple of group_size"),
        (lambda a: a.update(scales=a["scales"][:, :-1]), ValueError, "scales must have shape"),
        (lambda a: a.update(scales=a["scales"][:1]), ValueError, "scales must have shape"),
        (lambda a: a.update(scales=a["scales"].to(torch.int32)), TypeError, "scales dtype"),
        (lambda a: a.update(scales=a["scales"].reshape(-1)), ValueError, "scales must be 2-D"),
        (lambda a: a.update(zeros=a["zeros"].to(torch.int32)), TypeError, "zeros dtype"),
        (lambda a: a.update(zeros=a["zeros"][:, :16]), ValueError, "zeros must have shape"),
        (lambda a: a.update(bias=torch.ones(3, dtype=torch.float16)), ValueError, "bias must have shape"),
        (lambda a: a.update(bias=torch.ones(32, dtype=torch.bfloat16)), TypeError, "bias dtype"),
        (lambda a: a.update(perm=torch.arange(128)), TypeError, "perm dtype"),
        (lambda a: a.update(perm=torch.arange(64, dtype=torch.int32)), ValueError, "perm must have shape"),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, "meta"),
        (lambda a: a.update(zeros=a["zeros"].to("meta")), ValueError, "meta"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, exc, match):
    args = _bad_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        w4a16_gemm(args["x"], args["qweight"], args["scales"], args["zeros"], args["group_size"], args["bias"], args["perm"])


def test_launch_rejects_block_k_straddling_a_group():
    x, w, _, _ = _inputs(2, 32, 128, torch.float16, "cpu", seed=1, group=32)
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide group_size=32"):
        launch_tiled(x, w.qweight, w.scales, None, 32, None, None, KernelConfig(16, 32, 64))


def test_default_dispatch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = W4A16Problem(4, 32, 64, 32, torch.float16, torch.device("cpu"))
    assert W4A16.select(p).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert W4A16.select(p).name == "tiled"
    assert W4A16.select(W4A16Problem(4096, 32, 64, 32, torch.float16, torch.device("cuda"))).name == "dequant_matmul"
    assert W4A16.select(W4A16Problem(16, 32, 64, 32, torch.float16, torch.device("cuda"))).name == "tiled"


def test_reference_switch_routes_the_launcher_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr("angel_kernels.gemm.w4a16.w4a16_gemm_ref", lambda *a: calls.append(1) or w4a16_gemm_ref(*a))
    monkeypatch.setenv("ANGEL_KERNELS_REFERENCE", "1")
    x, w, _, _ = _inputs(2, 32, 64, torch.float16, "cpu", seed=2, group=32)
    _call(x, w)
    assert calls == [1]


@pytest.mark.parametrize("m", [1, 16, 64, 1024])
@pytest.mark.parametrize("group", GROUPS)
def test_tuning_space_keeps_one_block_k_per_group(m, group):
    """Batch invariance: every M bucket's configs take the group's K-block (DOT_T tiles also half of it), and a
    K-block never straddles a group."""
    k = 4096
    g = k if group == -1 else group
    space = tuning_space(W4A16Problem(m, 4096, k, g, torch.float16, torch.device("cuda")))
    assert space and max(c.BLOCK_K for c in space) == block_k_for(g)
    assert all(g % c.BLOCK_K == 0 for c in space)
    assert {dict(c.extra)["MAGIC"] for c in space} == {1}


def test_tune_records_a_checked_config(tmp_path, device, monkeypatch):
    """The warm-up entry runs every config of the space (checked against the reference) and stores the winner
    (CPU tier, fake timing; on a GPU the benchmarks run it, compiling ~60 configs costs minutes). With a 16 KB
    "L2", each config's bench gets 5 calls over distinct input sets of 7.7 KB (x, packed weight, scales, zeros)."""
    from angel_kernels.tuning import TunedConfigStore

    if device.type == "cuda":
        pytest.skip("compiles the whole tuning space: run by the benchmarks on a GPU")
    monkeypatch.setattr("angel_kernels.tuning.l2_bytes", lambda device: 16 << 10)
    store = TunedConfigStore(tmp_path)
    m1 = interpreter_config(64)
    sets_seen = []
    best, timings = tune(96, 128, 3, group_size=64, sym=False, device=device, store=store, invariant_with=m1,
                         bench=lambda calls: sets_seen.append(len(calls)) or 1.0)
    p = W4A16Problem(4, 96, 128, 64, torch.float16, device)
    assert best in tuning_space(p) and set(timings) == set(tuning_space(p))  # all admitted (batch-invariant)
    assert store.lookup("w4a16.tiled", p.key(), device) == best
    assert sets_seen == [5] * len(timings)


# ---------------------------------------------------------------- GPU tier: real shapes, compiled kernels
@pytest.mark.gpu
@pytest.mark.parametrize("candidate", REAL_SHAPE_CANDIDATES)
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("m", REAL_SHAPE_MS)
def test_gpu_real_shapes(candidate, n, k, m, monkeypatch):
    check_real_shape(OP, candidate, n, k, m, monkeypatch, group=128)


@pytest.mark.gpu
@pytest.mark.parametrize("candidate", ["tiled", "dequant_matmul"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,sym,act_order", [(32, False, False), (64, True, True), (128, False, True), (-1, True, False)])
@pytest.mark.parametrize("m", [1, 16, 257])
def test_gpu_groups_dtypes_act_order(candidate, dtype, group, sym, act_order, m, monkeypatch):
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_W4A16", candidate)
    x, w, b, perm = _inputs(m, 6144, 4096, dtype, "cuda", seed=m, group=group, sym=sym, bias=True, act_order=act_order)
    assert_close_dequantized(_call(x, w, b, perm), _ref(x, w, b, perm), name=f"{candidate} {dtype} g={group} sym={sym}")


@pytest.mark.gpu
@pytest.mark.parametrize("magic,inter", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 64, 257])
def test_gpu_dequant_modes(magic, inter, dtype, m):
    """Each dequantization mode compiled at a heuristic-like config of its M regime, against the reference."""
    x, w, b, _ = _inputs(m, 4096, 4096, dtype, "cuda", seed=m, group=128, sym=False, bias=True)
    bm, bn, warps, stages = (16, 64, 4, 4) if m <= 16 else (64, 128, 4, 3)
    cfg = KernelConfig(bm, bn, 128, num_warps=warps, num_stages=stages, extra=_modes(magic, inter))
    y = launch_tiled(x, w.qweight, w.scales, w.zeros, 128, b, None, cfg)
    assert_close_dequantized(y, _ref(x, w, b), name=f"MAGIC={magic} INTERLEAVE={inter} {dtype} M={m}")
    if (magic, inter) == (1, 1):  # the PTX dequantization against the Triton one: bit for bit
        no_ptx = KernelConfig(bm, bn, 128, num_warps=warps, num_stages=stages, extra=_modes(1, 1, ptx=0))
        assert torch.equal(launch_tiled(x, w.qweight, w.scales, w.zeros, 128, b, None, no_ptx), y)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_ptx_dequant_is_the_triton_dequant(dtype, sym, m):
    """The PTX word dequantization against the Triton one, bit for bit, symmetric and asymmetric, fp16 and bf16,
    on random words (every nibble value) and zero points 0..16."""
    n, k = 256, 1024
    gen = torch.Generator(device="cuda").manual_seed(m + 2 * sym)
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(k // 128, n, device="cuda", generator=gen) + 0.5).to(dtype) * 0.01
    zeros = None if sym else torch.randint(0, 17, (k // 128, n), dtype=torch.uint8, device="cuda", generator=gen)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    bm, bn, warps, stages = (16, 64, 4, 3) if m <= 16 else (64, 128, 4, 3)
    ys = [launch_tiled(x, qweight, scales, zeros, 128, None, None,
                       KernelConfig(bm, bn, 128, num_warps=warps, num_stages=stages, extra=_modes(1, 1, ptx=ptx)),
                       out=poisoned_empty(m, n, dtype=dtype, device="cuda"))
          for ptx in (1, 0)]
    assert torch.isfinite(ys[0]).all()
    assert torch.equal(ys[0], ys[1])
    assert_close_dequantized(ys[0], w4a16_gemm_ref(x, qweight, scales, zeros, 128), name=f"{dtype} sym={sym}")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", INVARIANCE_SHAPES)
@pytest.mark.parametrize("m", INVARIANCE_MS)
@pytest.mark.parametrize("group,sym", [(128, True), (64, False)])
def test_gpu_batch_invariance_tiled(n, k, m, group, sym, monkeypatch):
    check_batch_invariance(OP, n, k, m, monkeypatch, group=group, sym=sym)


@pytest.mark.parametrize("group,sym", [(32, False), (128, True), (-1, True)])
def test_triton_dequantize_matches_torch_path(group, sym, device, monkeypatch):
    from angel_kernels.gemm import w4a16 as mod

    _x, w, _b, _p = _inputs(1, 72, 256, torch.float16, device, seed=group % 7, group=group, sym=sym)
    for dtype in (torch.float16, torch.bfloat16):
        got = mod.dequantize_packed(w.qweight, w.scales, w.zeros, w.group_size, dtype)
        monkeypatch.setattr(mod, "interpreter_active", lambda: False)
        want = mod.dequantize_packed(w.qweight.cpu(), w.scales.cpu(), None if w.zeros is None else w.zeros.cpu(),
                                     w.group_size, dtype)
        monkeypatch.undo()
        if device.type == "cpu" and dtype == torch.bfloat16:
            assert_close(got, want, atol=0, rtol=2**-6)  # the interpreter truncates fp32 → bf16 (scale and product)
        else:
            assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("m", TUNING_SPACE_MS)
def test_tuning_space_fits_the_m_bucket(m):
    space = tuning_space(W4A16Problem(m, 4096, 4096, 128, torch.float16, torch.device("cpu")))
    check_tuning_space_fits_the_m_bucket(space, m)


@pytest.mark.gpu
@pytest.mark.parametrize("n,m", [(1000, 77), (1008, 77), (4096, 130)])
def test_gpu_dot_t_rows_are_the_swap_ab_rows(n, m):
    """As w8a16's: DOT_T tiles (K-blocks of 128 and 64, split launch or SERIAL) give the swap-AB M=1 rows bit for
    bit (zero points, N and M tails). N = 1000 (rows not 16-aligned) runs the swap-AB tile in DOT_T's place:
    the check there is that it compiles and gives the same rows."""
    x, w, b, _ = _inputs(m, n, 4096, torch.float16, torch.device("cuda"), seed=m, sym=False, bias=True)
    check_dot_t_rows_match_swap_ab(
        lambda xs, cfg: launch_tiled(xs, w.qweight, w.scales, w.zeros, w.group_size, b, None, cfg), x)
