"""Fragment-major int4 and int8 weights: the layouts against their definitions, the round trips, the ops'
candidates against w4a16's / w8a16's results, validation; on the GPU the Gluon kernel bit for bit against the
Triton kernels."""
import pytest
import torch

from angel_kernels import (
    quantize_weight_int4, quantize_weight_int8, row_major_from_fragment_int8, tile_major_int8, w4a16_fragment_gemm,
    w8a16_fragment_gemm, w8a16_gemm,
)
from angel_kernels.gemm.fragment import (
    LARGE_M_FRAGMENT, W4A16_FRAGMENT, W8A16_FRAGMENT, FragmentProblem, batch_tile_for, block_m_for, blocks_ahead,
    fragment_fits, fragment_major_int4, fragment_major_int8, packed_from_fragment, piped_tile_for,
)
from angel_kernels.quantization.int4 import pack_int4_rows
from angel_kernels.reference import w4a16_gemm_ref
from angel_kernels.reference.gemm import w8a16_gemm_ref
from angel_kernels.testing import assert_close, make_generator, poisoned_empty, randint8, randn
from weight_only_cases import Layer, WeightOnlyGemm, check_batch_invariance, check_candidate


def _fragment_places(n, k):
    """For every weight element (row, column): (word index, bit shift) in the fragment-major int4 layout, straight
    from the definition (thread t = 32 w + 4 g + c, word s, nibble 4 e + 2 h + r)."""
    row = torch.arange(n)[:, None].expand(n, k)
    col = torch.arange(k)[None, :].expand(n, k)
    tn, rr = row // 64, row % 64
    w, r, g = rr // 16, (rr % 16) // 8, rr % 8
    tk, cc = col // 128, col % 128
    s, h, c, e = cc // 16, (cc % 16) // 8, (cc % 8) // 2, cc % 2
    thread = 32 * w + 4 * g + c
    word = (tn * (k // 128) + tk) * 1024 + thread * 8 + s
    return word, 4 * (4 * e + 2 * h + r)


@pytest.mark.parametrize("n,k", [(64, 128), (192, 384)])
def test_int4_layout_follows_its_definition(n, k):
    g = make_generator(n + k)
    nib = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    words = fragment_major_int4(pack_int4_rows(nib.t().contiguous()))
    assert words.shape == (n, k // 8) and words.dtype == torch.int32
    word, shift = _fragment_places(n, k)
    assert torch.equal((words.reshape(-1)[word] >> shift) & 0xF, nib)


@pytest.mark.parametrize("n,k", [(64, 128), (128, 256)])
def test_int8_layout_follows_its_definition(n, k):
    q = randint8(n, k, generator=make_generator(k))
    words = fragment_major_int8(q)
    assert words.shape == (n, k // 4)
    row = torch.arange(n)[:, None].expand(n, k)
    col = torch.arange(k)[None, :].expand(n, k)
    rr, cc = row % 64, col % 128
    thread = 32 * (rr // 16) + 4 * (rr % 8) + (cc % 8) // 2
    word = ((row // 64) * (k // 128) + col // 128) * 2048 + thread * 16 + (cc // 16) * 2 + (cc % 16) // 8
    byte = word * 4 + 2 * ((rr % 16) // 8) + cc % 2
    assert torch.equal(words.reshape(-1).view(torch.int8)[byte], q)


@pytest.mark.parametrize("n,k", [(64, 128), (320, 512)])
def test_round_trip(n, k, monkeypatch):
    from angel_kernels.gemm import fragment as mod

    q = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=make_generator(n), dtype=torch.int64).to(torch.int32)
    words = fragment_major_int4(q)
    assert torch.equal(packed_from_fragment(words), q)
    monkeypatch.setattr(mod, "REPACK_ROWS", 128)  # several row chunks, the last one partial at N = 320
    assert torch.equal(fragment_major_int4(q), words)


@pytest.mark.parametrize("n,k", [(100, 128), (64, 200)])
def test_partial_tiles_are_refused(n, k):
    assert not fragment_fits(n, k)
    with pytest.raises(ValueError, match="N % 64 == 0 and K % 128 == 0"):
        fragment_major_int4(torch.zeros(k // 8, n, dtype=torch.int32))


def _layer(m, n, k, dtype, device, seed, bias=False, scale_dtype=None):
    g = make_generator(seed)
    x = randn(m, k, dtype=dtype, device=device, generator=g)
    w = quantize_weight_int4(randn(n, k, dtype=dtype, device=device, generator=g, scale=0.05), 128, sym=True)
    scales = w.scales if scale_dtype is None else w.scales.to(scale_dtype)
    b = randn(n, dtype=dtype, device=device, generator=g) if bias else None
    return x, w.qweight, scales, b


@pytest.mark.parametrize("m", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_gives_w4a16_results(m, dtype):
    x, q, s, b = _layer(m, 192, 384, dtype, "cpu", seed=m, bias=m == 3)
    got = w4a16_fragment_gemm(x, fragment_major_int4(q), s, b)
    assert torch.equal(got, w4a16_gemm_ref(x, q, s, None, 128, b, None))
    lead = w4a16_fragment_gemm(x.reshape(1, m, 384), fragment_major_int4(q), s, b)
    assert lead.shape == (1, m, 192) and torch.equal(lead[0], got)


def _fragment_layer(m, n, k, dtype, device, seed, *, bias=False):
    x, q, s, b = _layer(m, n, k, dtype, device, seed, bias=bias)
    words = fragment_major_int4(q)
    return Layer(x, n, lambda a: w4a16_fragment_gemm(a, words, s, b),
                 lambda a: w4a16_gemm_ref(a, q, s, None, 128, b, None))


OP = WeightOnlyGemm("w4a16_fragment", W4A16_FRAGMENT.force_variable, _fragment_layer)


def _int8_layer(m, n, k, dtype, device, seed, *, bias=False):
    g = make_generator(seed)
    x = randn(m, k, dtype=dtype, device=device, generator=g)
    q, s = quantize_weight_int8(randn(n, k, dtype=dtype, device=device, generator=g, scale=0.05))
    b = randn(n, dtype=dtype, device=device, generator=g) if bias else None
    words = fragment_major_int8(q)
    return Layer(x, n, lambda a: w8a16_fragment_gemm(a, words, s, b), lambda a: w8a16_gemm_ref(a, q, s, b))


OP_INT8 = WeightOnlyGemm("w8a16_fragment", W8A16_FRAGMENT.force_variable, _int8_layer)


@pytest.mark.parametrize("width", ["int4", "int8"])
@pytest.mark.parametrize("cand", W4A16_FRAGMENT.names())
def test_every_candidate_that_runs_here(cand, width, device, monkeypatch):
    op, family = (OP, W4A16_FRAGMENT) if width == "int4" else (OP_INT8, W8A16_FRAGMENT)
    layer = op.layer(5, 128, 256, torch.float16, device, seed=11, bias=True)
    ok, why = family.get(cand).can_implement(FragmentProblem(5, 128, 256, torch.float16, layer.x.device))
    if not ok:
        pytest.skip(why)
    check_candidate(op, cand, layer, monkeypatch, name=f"{width} 5x128x256")


def test_validation():
    x, q, s, b = _layer(2, 128, 256, torch.float16, "cpu", seed=3)
    words = fragment_major_int4(q)
    with pytest.raises(ValueError, match="K=128"):
        w4a16_fragment_gemm(x[:, :128], words, s)
    with pytest.raises(ValueError, match="scales"):
        w4a16_fragment_gemm(x, words, s[:1])
    with pytest.raises(TypeError, match="words"):
        w4a16_fragment_gemm(x, words.to(torch.int64), s)
    with pytest.raises(TypeError, match="bias"):
        w4a16_fragment_gemm(x, words, s, torch.zeros(128, dtype=torch.float32))
    with pytest.raises(ValueError, match="N % 64"):
        w4a16_fragment_gemm(x, words[:100], s[:, :100])
    with pytest.raises(TypeError, match="x"):
        w4a16_fragment_gemm(x.float(), words, s)


def test_block_m_by_m():
    assert [block_m_for(m, 4096, 4096) for m in (1, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 500)] == [
        8, 8, 16, 16, 32, 32, 64, 64, 64, 64, 128, 128]
    assert block_m_for(100, 28672, 8192) == 128  # large weights: 128-token tiles from M = 65


# ----------------------------------------------------------------------------------------------------- GPU tier
GPU_SHAPES = [(28672, 4096), (4096, 14336), (1024, 4096)]  # splits 1, 8, 4 on 132 SMs


def _triton_w4a16(x, q, s, b):
    """The Triton w4a16 kernel on the packed weight, at the fragment op's split count."""
    from angel_kernels.gemm._splitk import split_k_on
    from angel_kernels.gemm.w4a16 import W4A16Problem, config_for, launch_tiled

    (m, k), n = x.shape, q.shape[1]
    split = split_k_on(x.device, "w4a16_fragment", n, k, 128)
    cfg = config_for(W4A16Problem(m, n, k, 128, x.dtype, x.device))
    return launch_tiled(x, q, s, None, 128, b, None, cfg, split_k=split)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 33, 64, 100, 300])
def test_gpu_gluon_bits_equal_triton_w4a16(n, k, m, monkeypatch):
    monkeypatch.setenv(W4A16_FRAGMENT.force_variable, "gluon")
    x, q, s, b = _layer(m, n, k, torch.float16, "cuda", seed=m + n, bias=m == 3)
    want = _triton_w4a16(x, q, s, b)
    got = w4a16_fragment_gemm(x, fragment_major_int4(q), s, b)
    assert not torch.isnan(got).any()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (got - want).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.bfloat16, None), (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("m", [1, 40])
def test_gpu_gluon_dtypes(dtype, scale_dtype, m, monkeypatch):
    monkeypatch.setenv(W4A16_FRAGMENT.force_variable, "gluon")
    x, q, s, b = _layer(m, 6144, 4096, dtype, "cuda", seed=m, bias=True, scale_dtype=scale_dtype)
    want = _triton_w4a16(x, q, s, b)
    got = w4a16_fragment_gemm(x, fragment_major_int4(q), s, b)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("warpgroups,ahead", [(1, 2), (2, 2), (1, 3)])  # the probe's variants, same bits
def test_gpu_gluon_writes_every_output_and_strided_x(warpgroups, ahead):
    from angel_kernels.gemm._fragment_gluon import launch
    from angel_kernels.gemm._splitk import plan_split

    x, q, s, _ = _layer(37, 1024, 4096, torch.float16, "cuda", seed=5)
    wide = torch.zeros(37, 4096 + 64, dtype=torch.float16, device="cuda")
    wide[:, :4096] = x
    y = poisoned_empty(37, 1024, dtype=torch.float16, device="cuda")
    bm = block_m_for(37, 1024, 4096)
    plan = plan_split(x.device, "w4a16_fragment", 37, 1024, 4096, 128, 1024 // (64 * warpgroups), y, serial=False)
    launch(wide[:, :4096], fragment_major_int4(q), s, None, y, plan, bm, warpgroups=warpgroups, ahead=ahead)
    want = w4a16_fragment_gemm(x, fragment_major_int4(q), s)
    assert torch.equal(y, want)


@pytest.mark.parametrize("split_k,m,n", [(2, 1, 64), (4, 3, 192), (8, 16, 320)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaled,biased", [(False, False), (True, False), (False, True), (True, True)])
def test_split_sum_adds_partials_in_split_order(split_k, m, n, dtype, scaled, biased, device):
    from angel_kernels.gemm._splitk import launch_split_sum

    g = make_generator(split_k * 100 + m)
    # magnitudes over 2^±12: another summation order gives other bits
    spread = torch.exp2(torch.randint(-12, 13, (split_k, m, n), generator=g).float())
    parts = (torch.randn(split_k, m, n, generator=g) * spread).to(device)
    parts[:, 0, :3] = -0.0  # an all -0 column keeps its sign, as p0 + p1 + … does
    scales = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(device) if scaled else None
    bias = randn(n, dtype=dtype, device=device, generator=g) if biased else None
    wide = poisoned_empty(m, n + 16, dtype=dtype, device=device)
    launch_split_sum(parts, wide[:, :n], scales, bias)
    want = parts[0].clone()
    for p in parts[1:]:
        want = want + p
    if scaled:
        want = want * scales
    if biased:
        want = want + bias.float()
    want = want.to(dtype)
    # compiled, scale and bias may fuse into one FMA (as in the kernels whose bits it must give); the interpreter
    # rounds fp32 to bf16 toward zero
    fused = device.type == "cuda" and scaled and biased
    if fused or (device.type == "cpu" and dtype == torch.bfloat16):
        assert_close(wide[:, :n], want, name="split sum")
    else:
        assert torch.equal(wide[:, :n], want)
    assert torch.isnan(wide[:, n:]).all()  # nothing written past the row (the poison is NaN)


def test_split_sum_refuses_what_it_cannot_sum():
    from angel_kernels.gemm._splitk import launch_split_sum

    parts, y = torch.zeros(2, 3, 64), torch.empty(3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32"):
        launch_split_sum(parts.half(), y)
    with pytest.raises(ValueError, match="contiguous"):
        launch_split_sum(parts.transpose(1, 2).contiguous().transpose(1, 2), y)
    with pytest.raises(ValueError, match=r"y must be \[3, 64\]"):
        launch_split_sum(parts, y.t())
    with pytest.raises(ValueError, match="bias"):
        launch_split_sum(parts, y, bias=torch.zeros(32))


def _decode_tile_operands(int4, n, k, m):
    """CUDA operands of a decode-tile launch: x, bias, fragment-major words and scales (int4: group 128), the op's
    token tile and the launch's tile count."""
    g = make_generator(n + k + m)
    x = randn(m, k, dtype=torch.float16, device="cuda", generator=g)
    b = randn(n, dtype=torch.float16, device="cuda", generator=g)
    if int4:
        w = quantize_weight_int4(randn(n, k, dtype=torch.float16, device="cuda", generator=g, scale=0.05), 128,
                                 sym=True)
        words, s = fragment_major_int4(w.qweight), w.scales
    else:
        words, s = fragment_major_int8(randint8(n, k, device="cuda", generator=g)), torch.rand(n, device="cuda")
    bm = block_m_for(m, n, k)
    tiles = n // 64 * ((m + bm - 1) // bm)
    return x, b, words, s, bm, tiles


@pytest.mark.gpu
@pytest.mark.parametrize("int4", [True, False])
@pytest.mark.parametrize("n,k,m", [(4096, 4096, 1), (4096, 4096, 16), (6144, 4096, 5), (1024, 4096, 33),
                                   (4096, 14336, 8), (6144, 4096, 24), (8192, 28672, 19)])
def test_gpu_split_sum_kernel_gives_the_last_arrival_bits(int4, n, k, m):
    """Decode tiles on split weights: the partials summed by the split sum kernel (every PDL mode, also its own
    mode 2 after a mode-1 split launch) and by the last program of each tile give the same bits, with bias and
    (int8) per-channel scales."""
    from angel_kernels.gemm._fragment_gluon import launch
    from angel_kernels.gemm._splitk import plan_split

    x, b, words, s, bm, tiles = _decode_tile_operands(int4, n, k, m)
    outs = []
    for sum_kernel, pdl, sum_pdl in ((False, 1, None), (True, 0, None), (True, 1, None), (True, 2, None),
                                     (True, 1, 2)):
        y = poisoned_empty(m, n, dtype=torch.float16, device="cuda")
        plan = plan_split(x.device, "w4a16_fragment", m, n, k, 128, tiles, y, serial=False)
        assert plan.split_k > 1
        launch(x, words, s, b, y, plan, bm, int4=int4, ahead=blocks_ahead(bm), pdl=pdl, sum_kernel=sum_kernel,
               sum_pdl=sum_pdl)
        outs.append(y)
    assert not torch.isnan(outs[0]).any()
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("int4", [True, False])
@pytest.mark.parametrize("n,k,m,ahead,cap", [(4096, 4096, 1, 4, 0), (6144, 4096, 5, 2, 0), (28672, 4096, 16, 4, 0),
                                             (4096, 14336, 24, 2, 0), (1024, 1280, 3, 4, 0), (8192, 28672, 32, 2, 0),
                                             (4096, 14336, 7, 4, 128), (28672, 4096, 2, 4, 128)])
def test_gpu_decode_tiles_in_pairs_of_k_blocks_give_the_same_bits(int4, n, k, m, ahead, cap):
    """Two K-blocks per wgmma group (PAIR) against one: the same bits (their MMAs accumulate in the same order),
    split and unsplit, with bias, on the op's token tile, also under a register cap."""
    from angel_kernels.gemm._fragment_gluon import launch
    from angel_kernels.gemm._splitk import plan_split
    from angel_kernels.gemm.fragment import PAIR_STAGES

    x, b, words, s, bm, tiles = _decode_tile_operands(int4, n, k, m)
    outs = []
    for pair in (False, True):
        y = poisoned_empty(m, n, dtype=torch.float16, device="cuda")
        plan = plan_split(x.device, "w4a16_fragment", m, n, k, 128, tiles, y, serial=False)
        launch(x, words, s, b, y, plan, bm, int4=int4, ahead=ahead if pair else blocks_ahead(bm), pdl=1,
               pair=pair, max_regs=cap if pair else 0, **({"stages": PAIR_STAGES} if pair else {}))
        outs.append(y)
    assert not torch.isnan(outs[0]).any()
    assert torch.equal(outs[1], outs[0])


def test_decode_tiles_in_pairs_refuse_odd_block_counts():
    from angel_kernels.gemm._fragment_gluon import launch
    from angel_kernels.gemm._splitk import plan_split

    x, words, scales, y = _launch_operands(1, 128, 1152)  # 9 K-blocks
    plan = plan_split(CPU, "w4a16_fragment", 1, 128, 1152, 128, 2, y, split_k=1)
    with pytest.raises(ValueError, match="multiples of 256"):
        launch(x, words, scales, None, y, plan, 8, pair=True, ahead=2, stages=6)
    x, words, scales, y = _launch_operands(1, 128, 1024)
    plan = plan_split(CPU, "w4a16_fragment", 1, 128, 1024, 128, 2, y, split_k=1)
    with pytest.raises(ValueError, match="ahead 2 or 4"):
        launch(x, words, scales, None, y, plan, 8, pair=True, ahead=3, stages=6)
    with pytest.raises(ValueError, match="stages >= 4"):
        launch(x, words, scales, None, y, plan, 8, pair=True, ahead=2, stages=3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100])
def test_gpu_int8_mode_bits_equal_w8a16(m, monkeypatch):
    from angel_kernels.gemm._fragment_gluon import launch
    from angel_kernels.gemm._splitk import plan_split

    monkeypatch.setenv("ANGEL_KERNELS_FORCE_W8A16", "tiled")
    n, k = 4096, 4096
    g = make_generator(m)
    x = randn(m, k, dtype=torch.float16, device="cuda", generator=g)
    q = randint8(n, k, device="cuda", generator=g)
    s = torch.rand(n, device="cuda") * 0.01 + 1e-3
    want = w8a16_gemm(x, q, s)
    y = poisoned_empty(m, n, dtype=torch.float16, device="cuda")
    bm = block_m_for(m, n, k)
    plan = plan_split(x.device, "w8a16", m, n, k, 128, n // 64 * ((m + bm - 1) // bm), y, serial=False)
    launch(x, fragment_major_int8(q), s, None, y, plan, bm, int4=False)
    assert torch.equal(y, want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [9, 30, 100, 700])
def test_gpu_batch_invariance(m, monkeypatch):
    check_batch_invariance(OP, 4096, 4096, m, monkeypatch, candidate="gluon")


CPU = torch.device("cpu")  # the split rule off the GPU assumes 132 SMs, as on an H100


@pytest.mark.parametrize("int4,tile", [(True, (4, 128, 4, False)), (False, (2, 128, 3, False))])
def test_batch_tiles_serve_unsplit_weights_from_m_33_to_1024(int4, tile):
    assert batch_tile_for(CPU, 256, 28672, 4096, int4) == tile  # 448 row tiles: split 1
    assert batch_tile_for(CPU, 65, 28672, 8192, int4) == tile
    assert batch_tile_for(CPU, 1024, 1024, 1024, int4) == tile  # K = 1024 never splits
    assert batch_tile_for(CPU, 64, 1024, 1024, int4) is None  # decode tiles (8 two-warpgroup tiles)
    # from M = 33 where two-warpgroup tiles give each of the 132 SMs one: 64 tokens, two warpgroups
    assert batch_tile_for(CPU, 64, 28672, 4096, int4) == (2, 64, 3, False)
    assert batch_tile_for(CPU, 33, 16896, 1024, int4) == (2, 64, 3, False)  # K = 1024: split 1
    assert batch_tile_for(CPU, 33, 16768, 1024, int4) is None  # 131 tiles
    assert batch_tile_for(CPU, 32, 28672, 4096, int4) is None  # 32-token decode tiles
    assert batch_tile_for(CPU, 1025, 28672, 4096, int4) is None  # dequantize + cuBLAS
    assert batch_tile_for(CPU, 256, 640, 1024, int4) == (2,) + tile[1:]  # N % 256 != 0: two warpgroups
    assert batch_tile_for(CPU, 256, 576, 1024, int4) is None  # N % 128 != 0


@pytest.mark.parametrize("int4", [True, False])
def test_piped_tiles_serve_unsplit_weights_from_m_256(int4):
    piped = (2, 256, 4, 3)
    assert piped_tile_for(CPU, 256, 28672, 4096, int4) == piped
    assert piped_tile_for(CPU, 1024, 28672, 8192, int4) == piped
    assert piped_tile_for(CPU, 300, 640, 1024, int4) == piped  # two warpgroups' rows (N % 128 == 0)
    assert piped_tile_for(CPU, 255, 28672, 4096, int4) is None  # batch tiles
    assert piped_tile_for(CPU, 1025, 28672, 4096, int4) is None  # dequantize + cuBLAS
    assert piped_tile_for(CPU, 512, 8192, 28672, int4) is None  # split weights: serial batch tiles
    assert piped_tile_for(CPU, 512, 576, 1024, int4) is None  # N % 128 != 0


def _launch_operands(m, n, k, int4=True):
    """CPU operands for the launchers' argument checks (they refuse before anything runs) and for recorded
    launches: int4 words and group scales, or int8 words and channel scales."""
    x = torch.zeros(m, k, dtype=torch.float16)
    words = torch.zeros(n, k // (8 if int4 else 4), dtype=torch.int32)
    scales = torch.ones(k // 128, n, dtype=torch.float16) if int4 else torch.ones(n)
    return x, words, scales, torch.empty(m, n, dtype=torch.float16)


def _record_launches(monkeypatch) -> list:
    """Triton launches recorded as (kernel function, launch keywords) instead of run: the op's launch path on the
    CPU."""
    from triton.runtime.jit import JITFunction

    from angel_kernels.gemm import _fragment_gluon

    def split_sum(partials, y, channel_scales=None, bias=None, pdl=0):
        launched.append((split_sum, {"SPLIT_K": partials.shape[0], "PDL": pdl}))

    launched = []
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, grid, warmup, **kw: launched.append((self, kw)))
    monkeypatch.setattr(_fragment_gluon, "launch_split_sum", split_sum)  # a plain Triton kernel: recorded too
    return launched


def test_piped_paired_parts_and_streamed_launchers_refuse_what_they_cannot_run():
    from angel_kernels.gemm._fragment_gluon import launch_paired, launch_parts, launch_piped, launch_streamed
    from angel_kernels.gemm._splitk import plan_split

    x, words, scales, y = _launch_operands(300, 192, 1024)
    split = plan_split(CPU, "w4a16_fragment", 300, 192, 1024, 128, 6, y, split_k=2, serial=False)
    with pytest.raises(ValueError, match="serially"):
        launch_piped(x, words, scales, None, y, split)
    whole = plan_split(CPU, "w4a16_fragment", 300, 192, 1024, 128, 6, y, split_k=1)
    with pytest.raises(ValueError, match="multiple of 128 rows"):
        launch_piped(x, words, scales, None, y, whole)
    x, words, scales, y = _launch_operands(200, 128, 1536)
    odd = plan_split(CPU, "w4a16_fragment", 200, 128, 1536, 128, 0, y, split_k=3, serial=True)
    with pytest.raises(ValueError, match="split 3"):
        launch_paired(x, words, scales, None, y, odd)
    with pytest.raises(ValueError, match="even number of K-blocks"):  # ranges of 3 K-blocks
        launch_streamed(x, words, scales, None, y, plan_split(CPU, "w4a16_fragment", 200, 128, 1536, 128, 0, y,
                                                                split_k=4, serial=True))
    with pytest.raises(ValueError, match="serially"):
        launch_streamed(x, words, scales, None, y, plan_split(CPU, "w4a16_fragment", 200, 128, 1536, 128, 2, y,
                                                                split_k=2, serial=False))
    x, words, scales, y = _launch_operands(300, 192, 1024)
    with pytest.raises(ValueError, match="N % 128"):
        launch_streamed(x, words, scales, None, y, whole)
    two = plan_split(CPU, "w4a16_fragment", 300, 192, 1024, 128, 0, y, split_k=2, serial=True)
    with pytest.raises(ValueError, match="that 4 divides"):
        launch_parts(x, words, scales, None, y, two)
    with pytest.raises(ValueError, match="that 3 divides"):
        launch_parts(x, words, scales, None, y, two, parts=3)


@pytest.mark.parametrize("int4", [True, False])
def test_serial_batch_tiles_serve_split_weights_from_m_129_to_512(int4):
    one_128, one_64, two_128, four_64 = (1, 128, 3, True), (1, 64, 3, True), (2, 128, 3, True), (4, 64, 3, True)
    assert batch_tile_for(CPU, 256, 4096, 14336, int4) == one_128  # 128 tiles, two per SM: one wave
    assert batch_tile_for(CPU, 384, 6144, 4096, int4) == one_128  # 288 tiles: two waves, as every other shape
    assert batch_tile_for(CPU, 192, 6144, 4096, int4) == one_64  # last 128-token tile half full: 64-token tiles
    assert batch_tile_for(CPU, 129, 8192, 28672, int4) == one_64  # 384 tiles, three per SM: one wave
    assert batch_tile_for(CPU, 448, 4096, 4096, int4) == two_128  # 128 tiles: one wave (one_64: 448, two)
    assert batch_tile_for(CPU, 320, 6144, 4096, int4) == four_64  # 120 tiles: the only one-wave choice
    assert batch_tile_for(CPU, 512, 4096, 14336, int4) == one_128  # 256 tiles: 97 % of one wave
    assert batch_tile_for(CPU, 512, 8192, 28672, int4) == one_128  # 512 tiles: two waves, 97 % full
    assert batch_tile_for(CPU, 512, 6144, 4096, int4) is None  # 73 % at best: dequantize + cuBLAS
    assert batch_tile_for(CPU, 448, 8192, 28672, int4) == two_128  # 2^27 elements or more: 256 tiles, 97 %
    assert batch_tile_for(CPU, 384, 8192, 28672, int4) is None  # 384 tiles, two waves 73 % full: decode tiles
    assert batch_tile_for(CPU, 128, 8192, 28672, int4) is None  # decode tiles up to M = 128
    assert batch_tile_for(CPU, 513, 8192, 28672, int4) is None  # dequantize + cuBLAS


def test_serial_tile_choice_counts_waves():
    from angel_kernels.gemm.fragment import serial_tile_for

    assert serial_tile_for(320, 6144, 4096, 132)[:2] == (4, 64)  # 120 tiles: one wave; the others' need two
    assert serial_tile_for(320, 6144, 4096, 240)[:2] == (1, 64)  # 480 tiles in 720 slots: one wave, cheaper
    assert serial_tile_for(256, 6144, 4096, 66)[:2] == (1, 128)  # 192 tiles, 132 slots: two waves at 1.0 each
    assert serial_tile_for(384, 6144, 4096, 132)[:2] == (1, 128)  # two waves, 55 % full: fine below 2^27
    assert serial_tile_for(384, 8192, 16384, 132) is None  # 2^27 elements: the same waves are not
    assert serial_tile_for(320, 384, 4096, 132)[:2] == (1, 64)  # N = 384: four warpgroups (256 rows) do not divide
    assert serial_tile_for(512, 6144, 4096, 200) == (1, 128, 3, True)  # 384 tiles in 400 slots: 96 % full


def test_paired_tiles_serve_split_weights_that_fill_one_wave():
    from angel_kernels.gemm.fragment import paired_tile_for

    def ms(n, k):
        grid = (64, 65, 80, 100, 128, 129, 192, 193, 256, 257, 320, 384, 512)
        return {m: paired_tile_for(CPU, m, n, k) for m in grid if paired_tile_for(CPU, m, n, k)}

    assert ms(6144, 4096) == {65: 128, 80: 128, 100: 128, 128: 128}  # 96 tiles of 128 tokens: 73 % of 132 SMs
    assert ms(8192, 28672) == {65: 128, 80: 128, 100: 128, 128: 128}  # 128 tiles
    # 64 row tiles: 128 tiles of 64 tokens at 97-128 (at 65-96 the last one is at most half full), of 128 at 193-256
    assert ms(4096, 4096) == {100: 64, 128: 64, 193: 128, 256: 128}
    assert ms(4096, 14336) == {100: 64, 128: 64, 193: 128, 256: 128}
    assert ms(28672, 4096) == {}  # unsplit: no ranges to pair
    assert ms(2048, 4096) == {192: 64, 256: 64, 384: 128}  # 32 row tiles (M = 320: both last tiles half full)
    assert paired_tile_for(CPU, 500, 2048, 4096) == 128  # × 4


def test_parts_tiles_serve_whole_64_token_tiles_that_fill_one_wave(monkeypatch):
    from angel_kernels.gemm import fragment as mod
    from angel_kernels.gemm.fragment import PARTS_TILE, parts_tile_for

    def ms(n, k):
        return [m for m in range(1, 600) if parts_tile_for(CPU, m, n, k) is not None]

    assert ms(6144, 4096) == [64]  # 96 row tiles: 73 % of 132 SMs at 64 tokens, 145 % at 128
    assert ms(8192, 28672) == [64]  # 128 row tiles
    assert ms(4096, 4096) == ms(4096, 14336) == [128]  # 64 row tiles: 48 % at 64 tokens, 97 % at 128
    assert ms(2048, 4096) == [192, 256]  # 32 row tiles
    assert ms(28672, 4096) == []  # unsplit
    assert parts_tile_for(CPU, 64, 6144, 4096) == PARTS_TILE
    monkeypatch.setattr(mod, "split_k_on", lambda device, kernel, n, k, block: 2)
    assert ms(6144, 4096) == []  # two ranges: not four warpgroups' worth
    monkeypatch.setattr(mod, "split_k_on", lambda device, kernel, n, k, block: 8)
    assert ms(6144, 4096) == [64]


def test_streamed_tiles_serve_split_weights_whose_256_token_tiles_fill_one_wave(monkeypatch):
    from angel_kernels.gemm import fragment as mod
    from angel_kernels.gemm.fragment import STREAMED_TILE, streamed_tile_for

    def ms(n, k):
        return [m for m in range(1, 1100) if streamed_tile_for(CPU, m, n, k) is not None]

    # 128 tiles on 132 SMs from M = 384 (the last 256-token tile half full) to LARGE_M_FRAGMENT
    assert ms(8192, 28672) == ms(8192, 8192) == list(range(384, 513))
    assert streamed_tile_for(CPU, 448, 8192, 28672) == STREAMED_TILE
    assert ms(4096, 14336) == ms(6144, 4096) == []  # 64 / 96 tiles: the wave part-empty
    assert ms(10240, 8192) == []  # 160 tiles: two waves
    assert ms(28672, 4096) == []  # unsplit: the piped tiles
    monkeypatch.setattr(mod, "num_sms", lambda device, default: 120)
    assert ms(8192, 28672) == []  # 128 tiles on 120 SMs: two waves
    monkeypatch.setattr(mod, "num_sms", lambda device, default: 132)
    monkeypatch.setattr(mod, "split_k_on", lambda device, kernel, n, k, block: 4)
    assert streamed_tile_for(CPU, 448, 8192, 1536) is None  # ranges of 3 K-blocks: the kernel takes them in pairs
    assert streamed_tile_for(CPU, 448, 8192, 1024) == STREAMED_TILE
    monkeypatch.setattr(mod, "STREAMED", False)
    assert streamed_tile_for(CPU, 448, 8192, 1024) is None


def test_one_rule_names_the_gluon_kernel_and_the_op_launches_it(monkeypatch):
    """``gluon_tile_for``'s precedence on the Llama shapes (132 SMs off the GPU), and ``_run_gluon`` launching that
    kernel with that tile (the launches recorded instead of run, so this runs on the CPU)."""
    from angel_kernels.gemm.fragment import (
        PARTS_TILE, PIPED_TILE, SMALL_BATCH_TILE, STREAMED_TILE, _run_gluon, gluon_tile_for,
    )

    cases = {  # (M, N, K, int4): (kernel, tile, the kernel function, its BLOCK_M)
        (1, 28672, 4096, True): ("decode", (8,), "_fragment_gemm_kernel", 8),
        (64, 28672, 4096, False): ("batch", SMALL_BATCH_TILE + (False,), "_fragment_gemm_tma_kernel", 64),
        (300, 28672, 4096, True): ("piped", PIPED_TILE, "_fragment_gemm_piped_kernel", 256),
        (100, 6144, 4096, False): ("paired", (128,), "_fragment_gemm_paired_kernel", 128),
        (448, 4096, 4096, True): ("batch", (2, 128, 3, True), "_fragment_gemm_tma_kernel", 128),
        (448, 8192, 28672, False): ("streamed", STREAMED_TILE, "_fragment_gemm_stream_kernel", 256),
        (64, 4096, 14336, True): ("decode", (64,), "_fragment_gemm_kernel", 64),
        (64, 6144, 4096, False): ("parts", PARTS_TILE, "_fragment_gemm_parts_kernel", 64),
        (128, 4096, 14336, True): ("parts", PARTS_TILE, "_fragment_gemm_parts_kernel", 64),
    }
    launched = _record_launches(monkeypatch)
    for (m, n, k, int4), (kernel, tile, function, block_m) in cases.items():
        assert gluon_tile_for(CPU, m, n, k, int4) == (kernel, tile), (m, n, k)
        launched.clear()
        x, words, scales, _y = _launch_operands(m, n, k, int4)
        y = _run_gluon(FragmentProblem(m, n, k, torch.float16, CPU), x, words, scales, None, int4=int4)
        fn, kw = launched[0]
        assert y.shape == (m, n) and (fn.__name__, kw["BLOCK_M"], kw["INT4"]) == (function, block_m, int4), (m, n, k)
        # split decode tiles: their partials summed by the split sum kernel, launched after them the same way
        sums = [(f.__name__, k["SPLIT_K"], k["PDL"]) for f, k in launched[1:]]
        split = kernel == "decode" and kw["SPLIT_K"] > 1
        assert sums == ([("split_sum", kw["SPLIT_K"], kw["PDL"])] if split else []), (m, n, k)


def test_decode_tiles_keep_three_k_blocks_of_words_in_flight_where_their_registers_cost_no_occupancy(monkeypatch):
    """AHEAD as launched: 3 up to 16 tokens, 2 on 32-token tiles, 3 on 64-token tiles of launches of at most two
    programs per SM (4096×4096 split in four: 256 programs on 132 SMs), else 2 (4096×14336 split in eight: 512);
    4 where K-blocks go in pairs (int4 4096×4096 and 4096×14336 up to 8 tokens)."""
    from angel_kernels.gemm.fragment import _run_gluon

    launched = _record_launches(monkeypatch)
    aheads = {(1, 4096, 14336): 4, (16, 4096, 14336): 3, (16, 4096, 4096): 3, (8, 4096, 4096): 4,
              (32, 4096, 4096): 2, (48, 4096, 4096): 3, (64, 4096, 4096): 3, (64, 4096, 14336): 2}
    for (m, n, k), ahead in aheads.items():
        launched.clear()
        x, words, scales, _y = _launch_operands(m, n, k, True)
        _run_gluon(FragmentProblem(m, n, k, torch.float16, CPU), x, words, scales, None, int4=True)
        fn, kw = launched[0]
        assert (fn.__name__, kw["AHEAD"]) == ("_fragment_gemm_kernel", ahead), (m, n, k)


def test_decode_tiles_launch_dependently_int4_at_2_to_8_tokens_on_long_ranges_without_early_trigger(monkeypatch):
    """The decode tiles' PDL mode as launched: early trigger (1), but trigger at exit (2) for int4 at 2-8 tokens
    on ranges of 32 K-blocks or more (28672×4096 unsplit: 32; 4096×4096 split in four: 8); the batch tiles' mode
    is GLUON_PDL's (off)."""
    from angel_kernels.gemm.fragment import GLUON_PDL, _run_gluon

    launched = _record_launches(monkeypatch)
    modes = {(1, 28672, 4096, True): 1, (4, 28672, 4096, True): 2, (8, 4096, 4096, True): 1,
             (16, 28672, 4096, True): 1, (4, 28672, 4096, False): 1, (2, 4096, 14336, True): 1,
             (2, 8192, 28672, True): 2, (64, 28672, 4096, True): GLUON_PDL}
    for (m, n, k, int4), mode in modes.items():
        launched.clear()
        x, words, scales, _y = _launch_operands(m, n, k, int4)
        _run_gluon(FragmentProblem(m, n, k, torch.float16, CPU), x, words, scales, None, int4=int4)
        kw = launched[0][1]
        assert kw["PDL"] == mode and kw.get("launch_pdl", False) == bool(mode), (m, n, k, int4)


def test_split_decode_tiles_leave_the_sum_to_a_second_kernel_below_32_k_blocks_per_range(monkeypatch):
    """Split decode tiles on ranges of fewer than 32 K-blocks (4096×4096 in four: 8; 4096×14336 in eight: 14) are
    followed by the split sum kernel in their PDL mode; longer ranges (8192×28672 in four: 56) and unsplit weights
    (28672×4096) sum in the split kernel. int4 32-token tiles (17-32 tokens) with more than two split programs per
    SM take the sum kernel on every range, in mode 2; 4096×4096's 256 programs (1.9 per SM) keep the rule above."""
    from angel_kernels.gemm.fragment import _run_gluon

    launched = _record_launches(monkeypatch)
    split_mode = "the split kernel's"
    # (M, N, K) → {int4: (summed by the sum kernel, its PDL mode)}
    sums = {(1, 4096, 4096): {True: (True, split_mode), False: (True, split_mode)},
            (16, 4096, 14336): {True: (True, split_mode), False: (True, split_mode)},
            (32, 4096, 14336): {True: (True, 2), False: (True, split_mode)},
            (17, 6144, 4096): {True: (True, 2), False: (True, split_mode)},
            (32, 4096, 4096): {True: (True, split_mode), False: (True, split_mode)},
            (24, 8192, 28672): {True: (True, 2), False: (False, None)},
            (4, 8192, 28672): {True: (False, None), False: (False, None)},
            (1, 28672, 4096): {True: (False, None), False: (False, None)},
            (24, 28672, 4096): {True: (False, None), False: (False, None)}}
    for (m, n, k), by_width in sums.items():
        for int4, (summed, mode) in by_width.items():
            launched.clear()
            x, words, scales, _y = _launch_operands(m, n, k, int4)
            _run_gluon(FragmentProblem(m, n, k, torch.float16, CPU), x, words, scales, None, int4=int4)
            names = [f.__name__ for f, _kw in launched]
            assert names == ["_fragment_gemm_kernel"] + (["split_sum"] if summed else []), (m, n, k, int4)
            kw = launched[0][1]
            assert kw["SUM_KERNEL"] == summed, (m, n, k, int4)
            if summed:
                assert launched[1][1]["PDL"] == (kw["PDL"] if mode == split_mode else mode), (m, n, k, int4)


def test_decode_tiles_pair_k_blocks_on_launches_of_at_most_four_programs_per_sm(monkeypatch):
    """Two K-blocks per wgmma group (four K-blocks of words ahead, six x stages) on launches that fit three programs
    per SM (6144×4096 and 4096×4096 in four ranges: 384 and 256 programs on 132 SMs): int4 at 1-16 tokens on
    launches of more than two per SM; on launches of at most two, 3-8 tokens (int4) and 3-16 (int8). On launches of
    three to four per SM (4096×14336: 512; 28672×4096: 448) int4 up to 8 tokens, capped at 128 registers. 17+ tokens
    keep one K-block per group."""
    from angel_kernels.gemm.fragment import PAIR_CAPPED_REGS, PAIR_STAGES, _run_gluon

    launched = _record_launches(monkeypatch)
    capped = PAIR_CAPPED_REGS
    pairs = {(1, 6144, 4096, True): 0, (16, 6144, 4096, True): 0, (5, 4096, 4096, True): 0,
             (16, 4096, 4096, True): None, (1, 4096, 4096, True): None, (2, 4096, 4096, True): None,
             (1, 4096, 14336, True): capped, (8, 28672, 4096, True): capped, (16, 4096, 14336, True): None,
             (1, 4096, 14336, False): None, (24, 6144, 4096, True): None, (1, 6144, 4096, False): None,
             (8, 6144, 4096, False): None, (2, 4096, 4096, False): None, (3, 4096, 4096, False): 0,
             (16, 4096, 4096, False): 0, (17, 4096, 4096, False): None}  # None: no pair; else the register cap
    for (m, n, k, int4), cap in pairs.items():
        launched.clear()
        x, words, scales, _y = _launch_operands(m, n, k, int4)
        _run_gluon(FragmentProblem(m, n, k, torch.float16, CPU), x, words, scales, None, int4=int4)
        kw = launched[0][1]
        assert kw["PAIR"] == (cap is not None), (m, n, k, int4)
        assert kw.get("maxnreg", 0) == (cap or 0), (m, n, k, int4)
        if cap is not None:
            assert kw["AHEAD"] == 4 and kw["STAGES"] == PAIR_STAGES


@pytest.mark.parametrize("family,int4", [(W4A16_FRAGMENT, True), (W8A16_FRAGMENT, False)])
def test_dequantize_then_cublas_only_where_the_batch_tiles_do_not_serve(family, int4, monkeypatch):
    from angel_kernels.gemm import fragment as mod

    dequant = family.get("dequant_matmul")
    monkeypatch.setattr(mod, "split_k_on", lambda device, kernel, n, k, block: 1 if n == 28672 else 8)
    cuda = torch.device("cuda")  # the rule's SM count off the GPU: 132
    for m, n, suits in [(300, 4096, False), (512, 4096, False), (512, 6144, True), (512, 28672, False),
                        (1024, 28672, False), (1025, 28672, True), (4096, 4096, True)]:
        ok, reason = dequant.suits(FragmentProblem(m, n, 4096, torch.float16, cuda))
        assert ok == suits, (m, n, reason)
    assert not dequant.suits(FragmentProblem(LARGE_M_FRAGMENT, 4096, 4096, torch.float16, CPU))[0]


@pytest.mark.gpu
@pytest.mark.parametrize("int4", [True, False])
@pytest.mark.parametrize("n,k,m", [(1024, 1024, 65), (1024, 1024, 300), (1024, 1024, 1000), (640, 1024, 300),
                                   (28672, 4096, 1000), (4096, 14336, 512), (8192, 4096, 256), (1024, 1024, 200),
                                   (1152, 1024, 257), (1024, 128, 300), (6144, 4096, 192), (6144, 4096, 320),
                                   (4096, 4096, 448), (4096, 14336, 300), (6144, 4096, 100), (4096, 4096, 200),
                                   (4096, 14336, 256), (2048, 4096, 400), (4096, 4096, 120),
                                   (4096, 14336, 128), (2048, 4096, 170), (28672, 4096, 40), (28672, 4096, 64),
                                   (8192, 28672, 448), (8192, 8192, 384), (8192, 8192, 512), (6144, 4096, 64),
                                   (8192, 28672, 64), (4096, 4096, 128)])
def test_gpu_batch_tiles_keep_rows_batch_invariant(int4, n, k, m, monkeypatch):
    """Batch tiles give each row the bits of the decode tiles at M = 1 (unsplit weights: two warpgroups on 64
    tokens at M = 33-64, then int4 on 4 warpgroups, on 2 where N % 256 != 0, and piped tiles from M = 256, one row
    past a token tile at M = 257; split weights: the ranges run serially, paired on two warpgroups, on four
    (parts tiles: 6144×4096 and 8192×28672 at M = 64, 4096-row weights at 128), or streamed),
    with a bias, bf16 activations, x a strided view (TMA reads it in place)."""
    from angel_kernels.gemm import fragment as mod
    from angel_kernels.gemm.fragment import gluon_tile_for, streamed_tile_for

    cuda = torch.device("cuda")
    if gluon_tile_for(cuda, m, n, k, int4)[0] == "decode":
        pytest.skip("not a batch-tile problem on this GPU's SM count")
    family = W4A16_FRAGMENT if int4 else W8A16_FRAGMENT
    assert family.select(FragmentProblem(m, n, k, torch.bfloat16, torch.device("cuda"))).name == "gluon"
    x0, q, s, b = _layer(m, n, k, torch.bfloat16, "cuda", seed=m + n + k, bias=True)
    wide = torch.zeros(m, k + 128, dtype=torch.bfloat16, device="cuda")
    wide[:, 64 : 64 + k] = x0
    x = wide[:, 64 : 64 + k]
    if int4:
        words, op = fragment_major_int4(q), w4a16_fragment_gemm
    else:
        w = randn(n, k, dtype=torch.bfloat16, device="cuda", generator=make_generator(m), scale=0.05)
        q, s = quantize_weight_int8(w)
        words, op = fragment_major_int8(q), w8a16_fragment_gemm
    full = op(x, words, s, b)
    assert not torch.isnan(full).any()
    for i in sorted({0, m // 2, m - 1}):
        assert torch.equal(full[i : i + 1].view(torch.int16), op(x[i : i + 1], words, s, b).view(torch.int16))
    if piped_tile_for(cuda, m, n, k, int4) is not None or streamed_tile_for(cuda, m, n, k) is not None:
        monkeypatch.setattr(mod, "PIPED", False)  # every row: the batch (or decode) tiles' bits
        monkeypatch.setattr(mod, "STREAMED", False)
        assert torch.equal(full.view(torch.int16), op(x, words, s, b).view(torch.int16))


# (K-tiles per program, warps) of the dequantization pass, K; 2 K-tiles on K = 384 (three) fall back to 1
DEQUANT_CASES = [(None, 384), (None, 512), ((1, 4), 512), ((2, 4), 384), ((4, 8), 512)]


@pytest.mark.parametrize("tiles,k", DEQUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_fragment_kernel_matches_packed_dequantization(dtype, tiles, k, device, monkeypatch):
    from angel_kernels.gemm import fragment as mod
    from angel_kernels.gemm.w4a16 import dequantize_packed

    _x, q, s, _b = _layer(1, 128, k, dtype, device, seed=7)
    monkeypatch.setattr(mod, "interpreter_active", lambda: True)  # the Triton pass, also on the CPU
    got = mod.dequantize_fragment(fragment_major_int4(q), s, dtype, tiles)
    want = dequantize_packed(q.cpu(), s.cpu(), None, 128, dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        assert_close(got, want, atol=0, rtol=2**-6)  # the interpreter truncates fp32 → bf16
    else:
        assert torch.equal(got.cpu(), want)


# ------------------------------------------------------------------------------------------- int8 (w8a16_fragment_gemm)
@pytest.mark.parametrize("n,k", [(64, 128), (320, 512)])
def test_int8_round_trip(n, k):
    q = randint8(n, k, generator=make_generator(n + k))
    assert torch.equal(row_major_from_fragment_int8(fragment_major_int8(q)), q)


@pytest.mark.parametrize("tiles,k", DEQUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_dequantization_matches_w8a16s(dtype, tiles, k, device, monkeypatch):
    from angel_kernels.gemm import fragment as mod
    from angel_kernels.gemm.w8a16 import dequantize_int8

    q = randint8(128, k, device=device, generator=make_generator(5))
    s = torch.rand(128, device=device) * 0.01 + 1e-3
    want = dequantize_int8(q.cpu(), s.cpu(), dtype)  # torch on the CPU
    monkeypatch.setattr(mod, "interpreter_active", lambda: True)  # the Triton pass, also on the CPU
    got = mod.dequantize_fragment_int8(fragment_major_int8(q), s, dtype, tiles)
    if device.type == "cpu" and dtype == torch.bfloat16:
        assert_close(got, want, atol=0, rtol=2**-6)  # the interpreter truncates fp32 → bf16
    else:
        assert torch.equal(got.cpu(), want)


def test_int8_validation():
    g = make_generator(3)
    x = randn(2, 256, generator=g)
    q, s = quantize_weight_int8(randn(128, 256, generator=g, scale=0.05))
    words = fragment_major_int8(q)
    with pytest.raises(ValueError, match="K=128"):
        w8a16_fragment_gemm(x[:, :128], words, s)
    with pytest.raises(ValueError, match="scales"):
        w8a16_fragment_gemm(x, words, s[:64])
    with pytest.raises(TypeError, match="words"):
        w8a16_fragment_gemm(x, q, s)
    with pytest.raises(TypeError, match="bias"):
        w8a16_fragment_gemm(x, words, s, torch.zeros(128, dtype=torch.float32))
    with pytest.raises(ValueError, match="N % 64"):
        w8a16_fragment_gemm(x, words[:100], s[:100])
    with pytest.raises(TypeError, match="scales"):
        w8a16_fragment_gemm(x, words, s.to(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16, 33, 100, 300, 1024])
def test_gpu_int8_op_bits_equal_w8a16(n, k, m, monkeypatch):
    """The op gives w8a16_gemm's bits on the tile-major weight, with a bias, fp32 scales: its Gluon kernels (decode
    tiles, batch tiles on unsplit weights through M = 1024) the Triton kernel's, dequantize + cuBLAS w8a16_gemm's
    dequantize + cuBLAS (M = 1024 on split weights)."""
    if batch_tile_for(torch.device("cuda"), m, n, k, False) is not None:
        monkeypatch.setenv("ANGEL_KERNELS_FORCE_W8A16", "tiled")
    g = make_generator(m + n)
    x = randn(m, k, dtype=torch.float16, device="cuda", generator=g)
    q, s = quantize_weight_int8(randn(n, k, dtype=torch.float16, device="cuda", generator=g, scale=0.05))
    b = randn(n, dtype=torch.float16, device="cuda", generator=g)
    want = w8a16_gemm(x, tile_major_int8(q), s, b, tile_major=True)
    assert torch.equal(w8a16_fragment_gemm(x, fragment_major_int8(q), s, b), want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [9, 30, 100, 300])
def test_gpu_int8_batch_invariance(m, monkeypatch):
    check_batch_invariance(OP_INT8, 4096, 4096, m, monkeypatch, candidate="gluon")
