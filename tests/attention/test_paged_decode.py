"""Paged decode attention against the fp32 reference: lengths around block edges, shuffled block tables, GQA,
int8 and fp caches, vLLM's packed layout, split-KV policy, batch invariance (bitwise), bad input."""
import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, strategies as st

from angel_kernels.attention import PAGED_DECODE, inline_scale_views, paged_decode_attention, write_kv_cache
from angel_kernels.attention.paged_decode import (
    INTERPRETER_CONFIG,
    MAX_SPLITS_CAP,
    PagedDecodeProblem,
    SplitPolicy,
    _split_q,
    config_for,
    heuristic_config,
    launch_paged_attention,
    max_splits_for,
    row_alignment,
    split_policy,
)
from angel_kernels.reference.attention import paged_attention_ref, paged_decode_attention_ref
from angel_kernels.testing import assert_close, make_generator, randn, relative_error

from attention_cases import (build_case, shipped_configs, slot_mapping_for, vllm_packed_int8_cache,
                             with_vllm_packed_cache)

CANDIDATES = PAGED_DECODE.names()
ARGS = ("q", "key_cache", "value_cache", "block_table", "seq_lens", "k_scale", "v_scale")


def _run(c, **kw):
    return paged_decode_attention(*(c[a] for a in ARGS), scale=c["scale"], **kw)


def _ref(c, **kw):
    return paged_decode_attention_ref(c["q"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"],
                                      c["scale"], c["k_scale"], c["v_scale"], **kw)


def _triton_here():
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 300])
def test_context_lengths_around_block_edges(length, cache_dtype, device):
    c = build_case([length], cache_dtype=cache_dtype, seed=length, device=device)
    out = _run(c)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    assert_close(out, _ref(c), name=f"L={length} {cache_dtype}")


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_mixed_lengths_every_candidate(candidate, cache_dtype, device, monkeypatch):
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_PAGED_DECODE", candidate)
    c = build_case([300, 1, 17, 0, 64, 129], cache_dtype=cache_dtype, seed=5, device=device)
    out = _run(c)
    assert_close(out, _ref(c), name=candidate)
    assert (out[3] == 0).all(), "an empty sequence attends to nothing: zeros"


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_batch_invariance_bitwise(cache_dtype, device):
    """A sequence's output is the same bits alone and in a batch (splits follow its own length only)."""
    lens = [300, 1, 17, 150, 16]
    c = build_case(lens, cache_dtype=cache_dtype, seed=9, device=device)
    full = _run(c)
    for b in range(len(lens)):
        alone = dict(c)
        for name in ("q", "block_table", "seq_lens"):
            alone[name] = c[name][b : b + 1]
        assert torch.equal(_run(alone), full[b : b + 1]), f"sequence {b} (L={lens[b]}) differs alone"


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_head_dim_halves(cache_dtype, device):
    """D_SPLIT = 2 (two half-width operands and accumulators) computes the same attention, with windows and
    soft-cap, one split and several."""
    from angel_kernels.tuning import KernelConfig

    c = build_case([300, 1, 17, 0, 40], head_dim=128, cache_dtype=cache_dtype, seed=21, device=device)
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    for kw in ({}, {"sliding_window": 33, "soft_cap": 20.0}):
        outs = []
        for d_split in (1, 2):
            cfg = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=0, num_warps=4, num_stages=1,
                               extra=(("MIN_SPLIT_TILES", 1), ("D_SPLIT", d_split)))
            outs.append(launch_paged_attention(c["q"][:, None], *args, cfg=cfg, **kw)[:, 0])
        assert_close(outs[1], _ref(c, **kw), name=f"D_SPLIT=2 {cache_dtype} {kw}")
        assert_close(outs[1], outs[0], name="halves vs whole")


def _int8_layout_case(layout, dtype, seed, device):
    """Ragged int8 sequences (300, 1, 17, 0, 40 tokens; 2 KV heads of 64) in separate tensors (16-byte rows) or in
    vLLM's packed layout (scales inline: 8- and 4-byte aligned rows)."""
    lens = [300, 1, 17, 0, 40]
    c = build_case(lens, head_dim=64, dtype=dtype, seed=seed, device=device)
    if layout == "packed":
        c = with_vllm_packed_cache(c, lens, device)
        assert row_alignment(c["key_cache"]) < 16
    return c


@pytest.mark.parametrize("layout", ["separate", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_words_path_is_bitwise_identical(layout, dtype, device):
    """WORDS (int8 rows read as int32 words, converted a word at a time: PTX on a GPU, integer ops in the
    interpreter) gives the element path's results (bits on a GPU): both head-dim halves, windows and soft-cap,
    ragged lengths, 16-byte rows and vLLM's packed rows (4-byte aligned)."""
    from angel_kernels.tuning import KernelConfig

    c = _int8_layout_case(layout, dtype, 23, device)
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    for kw in ({}, {"sliding_window": 33, "soft_cap": 20.0}):
        for d_split in (1, 2):
            outs = []
            for words in (0, 1):
                cfg = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=0, num_warps=4, num_stages=1,
                                   extra=(("D_SPLIT", d_split), ("MIN_SPLIT_TILES", 1), ("WORDS", words)))
                outs.append(launch_paged_attention(c["q"][:, None], *args, cfg=cfg, **kw)[:, 0])
            name = f"{layout} {dtype} D_SPLIT={d_split} {kw}"
            if device.type == "cuda":
                assert torch.equal(outs[0], outs[1]), name
            else:  # the same operands, but the interpreter's dot (numpy) may sum a transposed operand in another
                # order: one rounding step of the output at most (a wrong word offset would be far off)
                ulp = 2**-10 if dtype == torch.float16 else 2**-7
                torch.testing.assert_close(outs[1], outs[0], rtol=ulp, atol=1e-5, msg=name)
    assert_close(outs[1], _ref(c, sliding_window=33, soft_cap=20.0), name=f"WORDS {layout} {dtype}")


@pytest.mark.parametrize("layout", ["separate", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_qk_on_int8_tensor_cores(layout, dtype, device):
    """QK_INT8 (q split into two int8 parts, q·kᵀ on int8 MMAs) against the fp32 reference: both head-dim halves,
    element and word paths for V, windows and soft-cap, ragged lengths, 16-byte and vLLM's packed rows; and within
    a few output roundings of the fp path (q is carried to 2^-16 of each row's largest element)."""
    from angel_kernels.tuning import KernelConfig

    c = _int8_layout_case(layout, dtype, 29, device)
    c["q"] = c["q"] * 8.0  # larger logits: a q-quantization error would show in peaked softmax rows
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    ulp = 2**-10 if dtype == torch.float16 else 2**-7
    for kw in ({}, {"sliding_window": 33, "soft_cap": 20.0}):
        for d_split, words, max_regs in ((1, 0, 0), (2, 1, 168)):  # (a register cap only changes the GPU build)
            outs = []
            for qk_int8 in (0, 1):
                cfg = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=0, num_warps=4, num_stages=1,
                                   extra=(("D_SPLIT", d_split), ("MAX_REGS", max_regs), ("MIN_SPLIT_TILES", 1),
                                          ("QK_INT8", qk_int8), ("WORDS", words)))
                outs.append(launch_paged_attention(c["q"][:, None], *args, cfg=cfg, **kw)[:, 0])
            name = f"{layout} {dtype} D_SPLIT={d_split} WORDS={words} {kw}"
            assert_close(outs[1], _ref(c, **kw), name=name)
            torch.testing.assert_close(outs[1], outs[0], rtol=4 * ulp, atol=1e-3, msg=name)


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_query_rows_on_the_mma_n_side(cache_dtype, device):
    """HEADS_N (transposed tiles: scores [tokens, rows], acc [head dim, rows], the query rows on an 8-wide MMA N
    side) computes the same attention as the 16-row M side: int8 with q·kᵀ on int8 MMAs and the word path, the
    element path with head-dim halves, fp16 whole and in halves; windows and soft-cap; 4 rows of 8 (GQA 4 of 2 KV
    heads), 8 of 8 (two query tokens) and 16 rows (an N side of 16); ragged and empty sequences, several splits."""
    from angel_kernels.tuning import KernelConfig

    c = build_case([300, 1, 17, 0, 40], head_dim=64, cache_dtype=cache_dtype, seed=37, device=device)
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    int8 = cache_dtype == torch.int8
    variants = ((("D_SPLIT", 1), ("QK_INT8", 1), ("WORDS", 1)), (("D_SPLIT", 2),)) if int8 else (
        (("D_SPLIT", 1),), (("D_SPLIT", 2),))
    g = make_generator(37)
    for num_queries in (1, 2, 4):
        q = c["q"][:, None] if num_queries == 1 else randn(5, num_queries, 4, 64, generator=g).to(device)
        for kw in ({}, {"sliding_window": 33, "soft_cap": 20.0}):
            ref = paged_attention_ref(q, *args, **kw)
            for base in variants:
                outs = []
                for heads_n in (0, 1):
                    extra = tuple(sorted(base + (("HEADS_N", heads_n), ("MIN_SPLIT_TILES", 2))))
                    cfg = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=0, num_warps=1, num_stages=1, extra=extra)
                    outs.append(launch_paged_attention(q, *args, cfg=cfg, **kw))
                name = f"{cache_dtype} Q={num_queries} {dict(base)} {kw}"
                assert torch.isfinite(outs[1]).all(), name
                assert_close(outs[1], ref, name=name)
                assert_close(outs[1], outs[0], name=f"HEADS_N vs M side: {name}")


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_page_addressing_is_bitwise_identical(block_size, cache_dtype, device):
    """PAGE_ADDR (page and slot from the tile index, 32-bit wide page offsets, int8 rows past the length read
    unmasked from block 0) changes no bit: pages smaller and larger than the KV tile, ragged and empty sequences in
    poisoned caches, windows and soft-cap, one split and several, the word path, int8 q·kᵀ and the head-dim
    halves. FENCE_V rides along: a no-op under the interpreter (a GPU layout choice, checked on the GPU)."""
    from angel_kernels.tuning import KernelConfig

    c = build_case([300, 1, 17, 0, 40], head_dim=64, block_size=block_size, cache_dtype=cache_dtype, seed=31,
                   device=device)
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    int8 = cache_dtype == torch.int8
    variants = ((("D_SPLIT", 1), ("WORDS", 1)), (("D_SPLIT", 2), ("QK_INT8", 1))) if int8 else ((("D_SPLIT", 2),),)
    for kw in ({}, {"sliding_window": 33, "soft_cap": 20.0}):
        for base in variants:
            outs = []
            for flags in ((), (("FENCE_V", 1), ("PAGE_ADDR", 1))):
                extra = tuple(sorted(base + (("MIN_SPLIT_TILES", 2),) + flags))
                cfg = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=0, num_warps=4, num_stages=1, extra=extra)
                outs.append(launch_paged_attention(c["q"][:, None], *args, cfg=cfg, **kw)[:, 0])
            name = f"{cache_dtype} page {block_size} {dict(base)} {kw}"
            assert torch.equal(outs[1], outs[0]), name
            assert_close(outs[1], _ref(c, **kw), name=name)


@triton.jit
def _split_q_kernel(q_ptr, hi_ptr, lo_ptr, step_ptr, M: tl.constexpr, D: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(q_ptr + offs)
    amax = tl.max(tl.abs(q.to(tl.float32)), axis=1)
    step = tl.where(amax > 0, amax / 127.0, 1.0)
    hi, lo = _split_q(q, step)
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)
    tl.store(step_ptr + tl.arange(0, M), step)


def test_split_q_carries_q_to_sixteen_bits(device):
    """_split_q's two int8 parts: within [-127, 127], and step · (hi + lo / 254) within step / 508 of q."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(16, 64, generator=gen) * torch.logspace(-4, 4, 16)[:, None]
    q[3] = 0.0
    q[5, 7] = 1e4  # one outlier sets the row's step
    q = q.half().to(device)
    hi = torch.empty(16, 64, dtype=torch.int8, device=device)
    lo = torch.empty(16, 64, dtype=torch.int8, device=device)
    step = torch.empty(16, device=device)
    _split_q_kernel[(1,)](q, hi, lo, step, 16, 64)
    q, hi, lo, step = q.cpu(), hi.cpu(), lo.cpu(), step.cpu()
    assert hi.abs().max() <= 127 and lo.abs().max() <= 127
    back = step[:, None].double() * (hi.double() + lo.double() / 254)
    assert ((back - q.double()).abs() <= step[:, None].double() / 508 * 1.001).all()
    assert (hi[3] == 0).all() and (lo[3] == 0).all()


def test_grid_split_mapping_does_not_change_bits(device):
    """The grid's split dimension (batch-dependent) only decides which program computes a split."""
    c = build_case([300, 77], seed=4, device=device)
    q4 = c["q"][:, None]
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    outs = [launch_paged_attention(q4, *args, grid_splits=g) for g in (1, 2, 3, 4)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert_close(outs[0][:, 0], _ref(c))


@pytest.mark.parametrize("max_splits,min_tiles,min_splits", [(1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 2, 1), (5, 1, 1),
                                                            (16, 1, 1), (16, 4, 8), (4, 8, 3)])
def test_every_split_policy_is_correct(max_splits, min_tiles, min_splits, device):
    c = build_case([300, 33], seed=6, device=device)
    p = PagedDecodeProblem(4, 2, 64, 16, torch.float16, torch.int8, c["q"].device)
    cfg = config_for(p)
    policy = SplitPolicy(cfg.BLOCK_N, min_tiles, max_splits, min_splits)
    out = launch_paged_attention(c["q"][:, None], *(c[a] for a in ARGS[1:5]), c["scale"], c["k_scale"],
                                 c["v_scale"], cfg=cfg, policy=policy)[:, 0]
    assert_close(out, _ref(c), name=f"policy {policy}")


def test_one_wave_grids_take_the_configs_one_wave_stages(monkeypatch):
    """``ONE_WAVE_STAGES`` serves grids of at most PROGRAMS_PER_SM programs per SM (the interpreter's 4 SMs here),
    num_stages the larger ones; a config without it always runs num_stages. The launch passes the rule's count."""
    from dataclasses import replace

    import angel_kernels.attention.paged_decode as pd
    from angel_kernels.tuning import KernelConfig

    cpu = torch.device("cpu")
    cfg = KernelConfig(16, 32, 128, num_warps=1, num_stages=2, extra=(("MIN_SPLIT_TILES", 1), ("ONE_WAVE_STAGES", 3),
                                                                       ("PROGRAMS_PER_SM", 8)))
    assert [pd.split_stages(cfg, n, cpu) for n in (1, 32, 33, 1000)] == [3, 3, 2, 2]
    plain = replace(cfg, extra=(("MIN_SPLIT_TILES", 1), ("PROGRAMS_PER_SM", 8)))
    assert [pd.split_stages(plain, n, cpu) for n in (1, 1000)] == [2, 2]
    stages = []
    real = pd.split_stages
    monkeypatch.setattr(pd, "split_stages", lambda *a: stages.append(real(*a)) or stages[-1])
    for lens in ([300], [300, 40, 7, 100]):  # 2 KV heads × up to 16 split slots: one wave of 4 SMs × 8, then more
        c = build_case(lens, heads_q=4, heads_kv=2, head_dim=64, dtype=torch.float16, seed=3)
        out = launch_paged_attention(c["q"][:, None], *(c[a] for a in ARGS[1:5]), c["scale"], c["k_scale"],
                                     c["v_scale"], cfg=replace(cfg, BLOCK_K=64))
        assert_close(out[:, 0], _ref(c))
    assert stages == [3, 2]


def test_split_policy_depends_on_length_only():
    pol = SplitPolicy(block_n=64, min_split_tiles=4, max_splits=32)
    assert pol.num_splits(0) == 0
    assert [pol.num_splits(n) for n in (1, 256, 257, 1024, 8192)] == [1, 1, 2, 4, 32]
    for n in (1, 100, 5000, 32768, 131072):
        first, tiles, per, ns = pol.split_tiles(n)
        assert 1 <= ns <= 32 and (ns - 1) * per < tiles <= ns * per
        assert ns <= pol.max_num_splits(n) <= pol.max_num_splits(131072)
    # a window only moves the first tile: 4096 visible tokens of a 32k context cut like a 4k context (+1 tile)
    assert pol.num_splits(32768, sliding_window=4096) in (pol.num_splits(4096), pol.num_splits(4096 + 64))
    # the short-context floor: 8 splits while they hold fewer than min_split_tiles tiles, then min_split_tiles
    short = SplitPolicy(block_n=128, min_split_tiles=2, max_splits=32, min_splits=8)
    assert [short.num_splits(n) for n in (0, 1, 500, 1024, 2048, 4096, 16384, 32768)] == [0, 1, 4, 8, 8, 16, 32, 32]
    for n in range(0, 70000, 997):
        first, tiles, per, ns = short.split_tiles(n)
        assert ns <= short.max_num_splits(n) <= short.max_num_splits(70000)
        assert ns == 0 or (ns - 1) * per < tiles <= ns * per
    assert SplitPolicy(128, 2, 32, 1).num_splits(1024) == 4  # without the floor
    # H100 SXM, Llama-3-8B: 32 splits per sequence; the KV-head count is a model constant, not a batch size
    assert max_splits_for(8, torch.device("cpu")) == 1  # the interpreter's pretend 4-SM device: 8 // 8
    # EXACT_SPLITS: 3 programs per SM without the power-of-two rounding (4 SMs, 1 KV head: 12 splits, not 8)
    from angel_kernels.tuning import KernelConfig

    cpu = torch.device("cpu")
    assert max_splits_for(1, cpu, 3) == 8 and max_splits_for(1, cpu, 3, pow2=False) == 12
    p = PagedDecodeProblem(4, 1, 64, 16, torch.float16, torch.int8, cpu)
    cfg = KernelConfig(16, 32, 64, extra=(("EXACT_SPLITS", 1), ("MIN_SPLIT_TILES", 1), ("PROGRAMS_PER_SM", 3)))
    assert split_policy(p, cfg).max_splits == 12
    # SPLITS_CAP: a config's own bound on the split count instead of MAX_SPLITS_CAP (4 SMs × 64 per SM, 1 KV head)
    assert max_splits_for(1, cpu, 64) == MAX_SPLITS_CAP == 64 and max_splits_for(1, cpu, 64, cap=128) == 128
    capped = KernelConfig(16, 32, 64, extra=(("MIN_SPLIT_TILES", 1), ("PROGRAMS_PER_SM", 64), ("SPLITS_CAP", 128)))
    policy = split_policy(p, capped)
    assert policy.max_splits == 128 and policy.num_splits(128 * 32) == 128 and policy.max_num_splits(10 ** 6) == 128
    assert split_policy(p, KernelConfig(16, 32, 64, extra=(("MIN_SPLIT_TILES", 1), ("PROGRAMS_PER_SM", 64)))
                        ).max_splits == 64


def test_row_alignment_hint_is_what_the_memory_guarantees():
    """The kernel's tl.multiple_of hint: 16 B for plain caches, what vLLM's packed rows allow (K 8 B, V 4 B)."""
    plain = torch.zeros(4, 16, 2, 64, dtype=torch.int8)
    assert row_alignment(plain) == 16 and row_alignment(plain.half()) == 8  # elements
    _raw, _kv, kc, vc, _ks, _vs = vllm_packed_int8_cache(4, 16, 2, 64)
    assert kc.data_ptr() % 16 == 0 and kc.stride(2) == 2 * (64 + 4)
    assert row_alignment(kc) == 8 and row_alignment(vc) == 4
    assert row_alignment(plain[:, :, :, :]) == 16 and row_alignment(torch.zeros(5, 16, 3, 64, dtype=torch.int8)[1:]) == 16


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_block_sizes(block_size, device):
    c = build_case([1, 130, 200], block_size=block_size, seed=block_size, device=device)
    assert_close(_run(c), _ref(c), name=f"block {block_size}")


@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (8, 2), (16, 1), (6, 3)])
def test_gqa_groups(heads_q, heads_kv, device):
    c = build_case([45, 100], heads_q=heads_q, heads_kv=heads_kv, seed=heads_q, device=device)
    assert_close(_run(c), _ref(c), name=f"{heads_q}/{heads_kv} heads")


@pytest.mark.parametrize("head_dim", [128, 256])
def test_head_dims(head_dim, device):
    c = build_case([70], heads_q=2, heads_kv=1, head_dim=head_dim, seed=head_dim, device=device)
    assert_close(_run(c), _ref(c), name=f"D={head_dim}")


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.bfloat16])
def test_bf16(cache_dtype, device):
    c = build_case([1, 90], cache_dtype=cache_dtype, dtype=torch.bfloat16, seed=2, device=device)
    assert_close(_run(c), _ref(c))


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_all_zero_kv_rows(cache_dtype, device):
    """Zero K rows score 0 (their scale is the eps, the data 0); zero V rows add nothing but weight."""
    c = build_case([40], cache_dtype=cache_dtype, seed=8, device=device, zero_tokens=range(0, 40, 3))
    out = _run(c)
    assert torch.isfinite(out).all()
    assert_close(out, _ref(c))
    # an all-zero context: every score 0, every value 0 → exactly 0
    z = build_case([33], cache_dtype=cache_dtype, seed=8, device=device, zero_tokens=range(33))
    assert (_run(z) == 0).all()


@pytest.mark.parametrize("window", [1, 5, 16, 64, 1000])
def test_sliding_window(window, device):
    c = build_case([300, 3, 70], seed=window, device=device)
    assert_close(_run(c, sliding_window=window), _ref(c, sliding_window=window), name=f"window {window}")


def test_soft_cap_and_large_logits(device):
    c = build_case([150, 20], seed=3, device=device, kv_scale=8.0)  # logits up to ~±60 before the cap
    for cap in (5.0, 50.0):
        assert_close(_run(c, soft_cap=cap), _ref(c, soft_cap=cap), name=f"soft cap {cap}")
    assert_close(_run(c, soft_cap=30.0, sliding_window=40), _ref(c, soft_cap=30.0, sliding_window=40))


def test_several_query_tokens_per_sequence_causal(device):
    """The kernels' query side: Q tokens per sequence at the last Q positions, causal (not public yet)."""
    c = build_case([300, 5, 40], seed=12, device=device)
    g = make_generator(12)
    for Q in (2, 4):
        q4 = randn(3, Q, 4, 64, generator=g).to(device)
        args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
        out = launch_paged_attention(q4, *args, sliding_window=50)
        ref = paged_attention_ref(q4, *args, sliding_window=50)
        assert_close(out, ref, name=f"Q={Q}")


@pytest.mark.parametrize("physical", ["NHD", "HND"])
def test_vllm_packed_layout_reads_like_separate_tensors(physical, device, monkeypatch):
    """Write through the packed views (vLLM's inline scales), decode from them; same bits as plain tensors with the
    split partials in one dtype (``partial_dtype`` keeps the packed rows' in fp32)."""
    from angel_kernels.attention import paged_decode

    monkeypatch.setattr(paged_decode, "PARTIAL_DTYPE", torch.float32)
    lens, bs, H, D = [100, 37], 16, 2, 64
    c = build_case(lens, seed=21, device=device)
    nb = c["key_cache"].shape[0]
    raw, kv_cache, *_ = vllm_packed_int8_cache(nb, bs, H, D, physical=physical, device=device)
    kc, vc, ks, vs = inline_scale_views(kv_cache, D)
    slots = slot_mapping_for(c["block_table"].cpu(), lens, bs).to(device)
    write_kv_cache(c["key"].to(device), c["value"].to(device), kc, vc, slots, ks, vs)
    packed = dict(c, key_cache=kc, value_cache=vc, k_scale=ks, v_scale=vs)
    assert torch.equal(_run(packed), _run(c))
    assert_close(_run(packed), _ref(c))


def test_split_partials_in_fp16_for_fp16_queries_except_on_packed_rows():
    from angel_kernels.attention.paged_decode import partial_dtype

    assert partial_dtype(torch.float16, packed_rows=False) == torch.float16
    assert partial_dtype(torch.float16, packed_rows=True) == torch.float32
    assert partial_dtype(torch.bfloat16, packed_rows=False) == torch.float32


@given(
    lens=st.lists(st.integers(0, 160), min_size=1, max_size=4),
    block_size=st.sampled_from([16, 32, 64]),
    cache_dtype=st.sampled_from([torch.int8, torch.float16]),
    window=st.sampled_from([None, 1, 24]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_lengths(lens, block_size, cache_dtype, window, seed):
    if not _triton_here():
        pytest.skip("no Triton path here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = build_case(lens, block_size=block_size, cache_dtype=cache_dtype, seed=seed, device=device)
    out = _run(c, sliding_window=window)
    assert_close(out, _ref(c, sliding_window=window), name=f"lens {lens}")


def test_fp_cache_scales_omitted_or_none_through_torch_ops(device):
    """The op mutates nothing, so the dispatcher dropping trailing default (None) scales is harmless: omitted,
    explicit None, positional or keyword, public callable or torch.ops, all give the same bits."""
    c = build_case([20, 5], cache_dtype=torch.float16, seed=2, device=device)
    base = (c["q"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"])
    op = torch.ops.angel_kernels.paged_decode_attention
    want = paged_decode_attention(*base, None, None, scale=c["scale"])
    for name, out in {
        "public, omitted": paged_decode_attention(*base, scale=c["scale"]),
        "torch.ops, omitted": op(*base, scale=c["scale"]),
        "torch.ops, None": op(*base, None, None, scale=c["scale"]),
        "torch.ops, keywords": op.default(*base, k_scale=None, v_scale=None, scale=c["scale"]),
    }.items():
        assert torch.equal(out, want), name
    assert_close(want, _ref(c))


# ------------------------------------------------------------------------------------------------ bad input
def _good():
    return build_case([20, 5], seed=0)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=a["q"].float()), TypeError, "q dtype"),
        (lambda a: a.update(q=a["q"][:, None]), ValueError, "q must be 3-D"),
        (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple of num_kv_heads"),
        (lambda a: a.update(q=torch.randn(2, 4, 128).half()[..., ::2]), ValueError, "q must be contiguous"),
        (lambda a: a.update(key_cache=a["key_cache"][..., :32], value_cache=a["value_cache"][..., :32]),
         ValueError, "head_dim 32"),
        (lambda a: a.update(key_cache=a["key_cache"].reshape(-1, 8, 2, 64), value_cache=a["value_cache"].reshape(-1, 8, 2, 64),
                            k_scale=a["k_scale"].reshape(-1, 8, 2), v_scale=a["v_scale"].reshape(-1, 8, 2)),
         ValueError, "block_size 8"),
        (lambda a: a.update(k_scale=None, v_scale=None), ValueError, "need k_scale and v_scale"),
        (lambda a: a.update(v_scale=a["v_scale"].double()), TypeError, "v_scale dtype"),
        (lambda a: a.update(key_cache=a["key_cache"].half(), value_cache=a["value_cache"].half()), ValueError,
         "int8 caches only"),
        (lambda a: a.update(key_cache=a["key_cache"].bfloat16(), value_cache=a["value_cache"].bfloat16(),
                            k_scale=None, v_scale=None), TypeError, "must match"),
        (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table dtype"),
        (lambda a: a.update(seq_lens=a["seq_lens"].long()), TypeError, "seq_lens dtype"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "one row per sequence"),
        (lambda a: a.update(seq_lens=torch.tensor([20, 49], dtype=torch.int32)), ValueError, "block_table is too short"),
        (lambda a: a.update(seq_lens=torch.tensor([20, -1], dtype=torch.int32)), ValueError, "seq_lens must be >= 0"),
        (lambda a: a["block_table"].__setitem__((0, 0), 10_000), ValueError, "block ids outside"),
        (lambda a: a.update(block_table=a["block_table"].to("meta")), ValueError, "meta"),
        (lambda a: a.update(scale=0.0), ValueError, "scale must be"),
        (lambda a: a.update(sliding_window=0), ValueError, "sliding_window"),
        (lambda a: a.update(soft_cap=-1.0), ValueError, "soft_cap"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, exc, match):
    c = _good()
    mutate(c)
    kw = {k: c[k] for k in ("sliding_window", "soft_cap") if k in c}
    with pytest.raises(exc, match=match):
        paged_decode_attention(*(c[a] for a in ARGS), scale=c["scale"], **kw)


def test_default_dispatch_on_cpu_without_interpreter(monkeypatch):
    p = PagedDecodeProblem(4, 2, 64, 16, torch.float16, torch.int8, torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert PAGED_DECODE.select(p).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert PAGED_DECODE.select(p).name == "split_kv"
    assert split_policy(p).block_n == INTERPRETER_CONFIG.BLOCK_N


# ---------------------------------------------------------------- GPU tier: Llama-3-8B heads, compiled kernels
HQ, HKV, D, BS = 32, 8, 128, 16


def _gpu_case(lens, *, cache_dtype, seed, dtype=torch.float16):
    """Build on the GPU: K/V randn, written by our write kernel (int8) or copied (fp16); fp32 copies kept."""
    from attention_cases import shuffled_block_table

    g = make_generator(seed)
    table, nb = shuffled_block_table(lens, BS, g)
    table = table.cuda()
    gg = make_generator(seed, "cuda")
    total = sum(lens)
    key = randn(total, HKV, D, dtype=dtype, device="cuda", generator=gg)
    value = randn(total, HKV, D, dtype=dtype, device="cuda", generator=gg)
    q = randn(len(lens), HQ, D, dtype=dtype, device="cuda", generator=gg)
    slots = slot_mapping_for(table.cpu(), lens, BS).cuda()
    kc = torch.zeros(nb, BS, HKV, D, dtype=cache_dtype, device="cuda")
    vc = torch.zeros_like(kc)
    ks = vs = None
    if cache_dtype == torch.int8:
        ks = torch.ones(nb, BS, HKV, device="cuda")
        vs = torch.ones_like(ks)
    write_kv_cache(key, value, kc, vc, slots, ks, vs)
    kf = torch.zeros(nb, BS, HKV, D, device="cuda")
    vf = torch.zeros_like(kf)
    kf[slots // BS, slots % BS] = key.float()
    vf[slots // BS, slots % BS] = value.float()
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return dict(q=q, key_cache=kc, value_cache=vc, block_table=table, seq_lens=lens_t, k_scale=ks, v_scale=vs,
                scale=D ** -0.5, kf=kf, vf=vf)


GPU_CASES = [(1, 1), (1, 17), (1, 1024), (1, 4096), (1, 32768), (8, 4096), (8, 32768), (32, 4096), (64, 1000),
             (64, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
@pytest.mark.parametrize("batch,context", GPU_CASES)
def test_gpu_llama3_heads(batch, context, cache_dtype):
    lens = [context] * batch
    c = _gpu_case(lens, cache_dtype=cache_dtype, seed=batch * 7 + context)
    out = _run(c)
    # against the fp32 reference over the same (dequantized) cache
    assert_close(out, _ref(c), name=f"B={batch} L={context} {cache_dtype}")
    # against the fp32 reference over the unquantized K/V: the int8 cache's whole error budget
    exact = paged_decode_attention_ref(c["q"].float(), c["kf"], c["vf"], c["block_table"], c["seq_lens"], c["scale"])
    err = relative_error(out, exact)
    assert err <= (1e-2 if cache_dtype == torch.int8 else 2e-3), f"relative error {err:.3g} vs unquantized K/V"


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_gpu_mixed_lengths_and_batch_invariance(cache_dtype):
    """Batch of 64 with lengths 1..32k: each sequence's output is bitwise the same alone."""
    g = torch.Generator().manual_seed(64)
    lens = torch.randint(1, 32769, (64,), generator=g).tolist()
    lens[:6] = [1, 15, 16, 17, 32768, 300]
    c = _gpu_case(lens, cache_dtype=cache_dtype, seed=64)
    full = _run(c)
    assert_close(full, _ref(c))
    exact = paged_decode_attention_ref(c["q"].float(), c["kf"], c["vf"], c["block_table"], c["seq_lens"], c["scale"])
    assert relative_error(full, exact) <= (1e-2 if cache_dtype == torch.int8 else 2e-3)
    for b in (0, 1, 3, 4, 5, 17, 40, 63):
        alone = dict(c)
        for name in ("q", "block_table", "seq_lens"):
            alone[name] = c[name][b : b + 1]
        assert torch.equal(_run(alone), full[b : b + 1]), f"sequence {b} (L={lens[b]}) differs alone vs batch 64"
        # and as part of a batch of 8 (another grid split mapping)
        eight = dict(c)
        for name in ("q", "block_table", "seq_lens"):
            eight[name] = c[name][max(0, b - 7) : b + 1]
        assert torch.equal(_run(eight)[-1:], full[b : b + 1]), f"sequence {b} differs in a batch of 8"


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_gpu_early_launch_changes_no_bit(cache_dtype):
    """Programmatic dependent launch only moves launches: a sequence launched alone with an early trigger
    (``uses_pdl``: grids of at most one program per SM) gives the bits it gets in a batch of 64 (int8: plain
    launches; fp16: dependent launches with no early trigger, ``pdl_modes``)."""
    from angel_kernels.attention.paged_decode import uses_pdl

    g = torch.Generator().manual_seed(65)
    lens = torch.randint(1, 1001, (64,), generator=g).tolist()
    lens[:3] = [1, 17, 1000]
    c = _gpu_case(lens, cache_dtype=cache_dtype, seed=65)
    p = PagedDecodeProblem(HQ, HKV, D, BS, c["q"].dtype, cache_dtype, torch.device("cuda"))
    max_ns = split_policy(p).max_num_splits(c["block_table"].shape[1] * BS)
    assert uses_pdl(HKV * max_ns, p.device) and not uses_pdl(64 * HKV * max_ns, p.device)
    full = _run(c)
    for b in (0, 1, 2, 9, 63):
        alone = dict(c)
        for name in ("q", "block_table", "seq_lens"):
            alone[name] = c[name][b : b + 1]
        assert torch.equal(_run(alone), full[b : b + 1]), f"sequence {b} (L={lens[b]}) differs alone vs batch 64"
    torch.cuda.synchronize()
    assert_close(full, _ref(c))


@pytest.mark.gpu
def test_gpu_reduce_launched_beside_a_one_wave_int8_grid_changes_no_bit(monkeypatch):
    """int8 grids of one wave (8 sequences of 4000 tokens, a 4016-token table: 16 splits, 1024 one-warp programs)
    launch the reduce kernel dependently (``pdl_modes`` mode 3): the bits of plain launches, the reference's values."""
    import angel_kernels.attention.paged_decode as pd

    c = _gpu_case([4000] * 8, cache_dtype=torch.int8, seed=66)
    p = PagedDecodeProblem(HQ, HKV, D, BS, c["q"].dtype, torch.int8, torch.device("cuda"))
    cfg = pd.config_for(p)
    max_ns = split_policy(p).max_num_splits(c["block_table"].shape[1] * BS)
    per_sm = int(dict(cfg.extra).get("PROGRAMS_PER_SM", pd.PROGRAMS_PER_SM))
    modes = pd.pdl_modes(8 * HKV * max_ns, True, p.device, per_sm)
    if modes != (3, True):
        pytest.skip(f"{8 * HKV * max_ns} programs at {per_sm} per SM are not one wave on this GPU (modes {modes})")
    early = _run(c)
    monkeypatch.setattr(pd, "pdl_modes", lambda *a, **k: (0, False))
    plain = _run(c)
    torch.cuda.synchronize()
    assert torch.equal(early, plain), f"modes {modes} against plain launches"
    assert_close(early, _ref(c))


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_gpu_page_addressing_at_the_tuned_config(cache_dtype, block_size):
    """PAGE_ADDR (32-bit wide page offsets in PTX, unmasked int8 rows) at the shipped config, Llama-3-8B heads,
    ragged lengths, pages smaller and larger than the KV tile: the same bits; with FENCE_V too: within the
    reference tolerance."""
    from dataclasses import replace

    c = build_case([4097, 1000, 16, 1], heads_q=32, heads_kv=8, head_dim=128, block_size=block_size,
                   cache_dtype=cache_dtype, seed=19, device="cuda")
    p = PagedDecodeProblem(32, 8, 128, c["key_cache"].shape[1], torch.float16, cache_dtype, torch.device("cuda"))
    cfg = config_for(p)
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    outs = []
    for page_addr, fence in ((0, 0), (1, 0), (1, 1)):
        extra = {**dict(cfg.extra), "PAGE_ADDR": page_addr, "FENCE_V": fence}
        outs.append(launch_paged_attention(c["q"][:, None], *args, cfg=replace(cfg, extra=tuple(sorted(extra.items())))))
    assert torch.equal(outs[0], outs[1])  # addressing only
    for out in outs[1:]:  # the fence may reorder the products inside an MMA
        assert_close(out[:, 0], _ref(c))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [9, 11])
def test_gpu_int8_words_at_the_tuned_config(dtype, seed):
    """WORDS (the PTX conversion) against the element path at the shipped int8 config: bit for bit. For bf16
    queries both without FENCE_V: the element path keeps its int8 tile until the MMA (no fence: MAGIC is fp16's),
    so a fenced word path hands the MMA another operand layout, whose products the tensor core sums in another
    order (H200: one output in 16384 one bf16 ulp apart, seeds 9 and 11). The shipped config itself: against
    the fp32 reference."""
    from dataclasses import replace

    c = build_case([4097, 1000, 16, 1], heads_q=32, heads_kv=8, head_dim=128, dtype=dtype, seed=seed, device="cuda")
    p = PagedDecodeProblem(32, 8, 128, c["key_cache"].shape[1], dtype, torch.int8, torch.device("cuda"))
    cfg = config_for(p)
    extra = {**dict(cfg.extra)}
    if dtype == torch.bfloat16:
        extra["FENCE_V"] = 0
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    outs = []
    for words in (0, 1):
        extra["WORDS"] = words
        variant = replace(cfg, extra=tuple(sorted(extra.items())))
        outs.append(launch_paged_attention(c["q"][:, None], *args, cfg=variant))
    assert torch.equal(outs[0], outs[1])
    assert_close(launch_paged_attention(c["q"][:, None], *args, cfg=cfg)[:, 0], _ref(c))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("words", [0, 1])
def test_gpu_int8_qk_at_the_tuned_config(dtype, words):
    """QK_INT8 (int8 q·kᵀ) at the shipped int8 config, Llama-3-8B heads: against the fp32 reference, and within a
    few output roundings of the fp16/bf16 q·kᵀ path."""
    from dataclasses import replace

    c = build_case([4097, 1000, 16, 1], heads_q=32, heads_kv=8, head_dim=128, dtype=dtype, seed=10, device="cuda")
    c["q"] = c["q"] * 4.0  # peaked rows
    p = PagedDecodeProblem(32, 8, 128, c["key_cache"].shape[1], dtype, torch.int8, torch.device("cuda"))
    cfg = config_for(p)
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    outs = []
    for qk_int8 in (0, 1):
        extra = tuple(sorted({**dict(cfg.extra), "WORDS": words, "QK_INT8": qk_int8}.items()))
        outs.append(launch_paged_attention(c["q"][:, None], *args, cfg=replace(cfg, extra=extra)))
    assert_close(outs[1][:, 0], _ref(c), name="QK_INT8")
    ulp = 2**-10 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(outs[1], outs[0], rtol=4 * ulp, atol=1e-3)


@pytest.mark.gpu
def test_gpu_vllm_packed_rows_at_the_tuned_config():
    """vLLM's packed int8 rows (scales inline: 8- and 4-byte aligned rows) at the card's config for them, Llama-3-8B
    heads: against the fp32 reference, and a sequence alone and in the batch, bitwise."""
    lens = [4097, 1000, 16, 1]
    c = build_case(lens, heads_q=32, heads_kv=8, head_dim=128, seed=14, device="cuda")
    c = with_vllm_packed_cache(c, lens, "cuda")
    assert row_alignment(c["value_cache"]) < 16
    out = _run(c)
    assert_close(out, _ref(c), name="packed rows")
    one = paged_decode_attention(c["q"][:1], c["key_cache"], c["value_cache"], c["block_table"][:1],
                                 c["seq_lens"][:1], c["k_scale"], c["v_scale"], scale=c["scale"])
    assert torch.equal(one, out[:1])


@pytest.mark.gpu
def test_gpu_window_softcap_bf16():
    c = _gpu_case([5000, 40, 9000], cache_dtype=torch.int8, seed=3, dtype=torch.bfloat16)
    for kw in ({"sliding_window": 4096}, {"soft_cap": 30.0}, {"sliding_window": 100, "soft_cap": 50.0}):
        assert_close(_run(c, **kw), _ref(c, **kw), name=str(kw))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,block_size", [(64, 32), (256, 64), (128, 128)])
def test_gpu_other_head_dims_and_blocks(head_dim, block_size):
    c = build_case([1, 700, 3000], heads_q=16, heads_kv=4, head_dim=head_dim, block_size=block_size, seed=head_dim,
                   device="cuda")
    assert_close(_run(c), _ref(c))


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_head_dim_128_default_configs(cache_dtype, device):
    """The untuned defaults for head dim 128 (the H100 winners: int8 q·kᵀ on int8 MMAs with V by the word path,
    FENCE_V and page addressing; fp16 halves with page addressing; the short-context split floor) against the
    reference, window and soft-cap included."""
    from angel_kernels.attention.paged_decode import heuristic_config

    c = build_case([700, 1, 129, 40], heads_q=8, heads_kv=2, head_dim=128, cache_dtype=cache_dtype, seed=31,
                   device=device)
    p = PagedDecodeProblem(8, 2, 128, 16, c["q"].dtype, cache_dtype, c["q"].device)
    cfg = heuristic_config(p)
    assert dict(cfg.extra).get("WORDS", 0) == (cache_dtype == torch.int8)
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    for kw in ({}, {"sliding_window": 100, "soft_cap": 30.0}):
        out = launch_paged_attention(c["q"][:, None], *args, cfg=cfg, **kw)[:, 0]
        assert_close(out, _ref(c, **kw), name=f"{cache_dtype} {kw}")


def test_early_launch_only_for_small_grids_on_hopper(monkeypatch):
    """``uses_pdl``: programmatic dependent launch on sm_90 and later for grids of at most one program per SM; never
    before sm_90 or off CUDA."""
    import angel_kernels.attention.paged_decode as pd

    cuda = torch.device("cuda")
    monkeypatch.setattr(pd, "num_sms", lambda device: 132)
    for capability, small, large in (((9, 0), True, False), ((10, 0), True, False), ((8, 0), False, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert pd.uses_pdl(132, cuda) is small and pd.uses_pdl(133, cuda) is large, capability
        # fuller grids: fp16 caches dependent with no early trigger (mode 2), int8 plain
        hopper = capability >= (9, 0)
        assert pd.pdl_modes(132, True, cuda) == pd.pdl_modes(132, False, cuda) == ((1, True) if hopper else (0, False))
        assert pd.pdl_modes(133, False, cuda) == ((2, True) if hopper else (0, False))
        assert pd.pdl_modes(133, True, cuda) == (0, False)
        # int8 grids of one wave (per_sm programs per SM): a plain split launch, the reduce dependent (mode 3)
        assert pd.pdl_modes(8 * 132, True, cuda, per_sm=8) == ((3, True) if hopper else (0, False))
        assert pd.pdl_modes(8 * 132 + 1, True, cuda, per_sm=8) == (0, False)
    assert not pd.uses_pdl(1, torch.device("cpu"))
    assert pd.pdl_modes(1000, False, torch.device("cpu")) == (0, False)


def test_launcher_keys_vllms_packed_rows_apart(monkeypatch, device):
    """A launch on vLLM's packed int8 cache (4-byte aligned rows) looks its config up as ``rows=packed``; a launch
    on separate 16-byte rows does not."""
    import angel_kernels.attention.paged_decode as pd

    keys = []

    def recording_config_for(p):
        keys.append(p.key())
        return INTERPRETER_CONFIG

    monkeypatch.setattr(pd, "config_for", recording_config_for)
    lens = [40, 3]
    c = build_case(lens, seed=5, device=device)
    packed = with_vllm_packed_cache(c, lens, device)
    for case in (c, packed):
        args = [case[a] for a in ARGS[1:5]] + [case["scale"], case["k_scale"], case["v_scale"]]
        launch_paged_attention(case["q"][:, None], *args)
    assert not keys[0].endswith(",rows=packed") and keys[1].endswith(",rows=packed"), keys


def test_packed_rows_have_their_own_key_and_default():
    """vLLM's packed int8 rows (4-byte aligned) are keyed apart from 16-byte rows, and their head-dim-128 default
    is the word path alone (the 16-byte-row default reads them with narrow loads)."""
    rows16 = PagedDecodeProblem(32, 8, 128, 16, torch.float16, torch.int8, torch.device("cpu"))
    packed = PagedDecodeProblem(32, 8, 128, 16, torch.float16, torch.int8, torch.device("cpu"), packed_rows=True)
    assert packed.key() == rows16.key() + ",rows=packed"
    extra = dict(heuristic_config(packed).extra)
    assert extra.get("WORDS") == 1 and not extra.get("QK_INT8") and not extra.get("PAGE_ADDR")
    assert dict(heuristic_config(rows16).extra).get("HEADS_N") == 1


@pytest.mark.parametrize("key,cfg", list(shipped_configs("paged_decode.split_kv")))
def test_shipped_table_configs_compute_attention(key, cfg, device):
    """Every config a GPU table ships for paged decode, on a small case of its key's kind (int8 page layout,
    vLLM's packed int8 rows, fp16; its head dim, group and block size), against the fp32 reference."""
    fields = dict(field.split("=") for field in key.split(","))
    lens = [300, 1, 40]
    c = build_case(lens, heads_q=int(fields["G"]), heads_kv=1, head_dim=int(fields["D"]),
                   block_size=int(fields["page"]), cache_dtype=torch.int8 if fields["kv"] == "int8" else torch.float16,
                   seed=41, device=device)
    if fields.get("rows") == "packed":
        c = with_vllm_packed_cache(c, lens, device)
        assert row_alignment(c["value_cache"]) < 16
    args = [c[a] for a in ARGS[1:5]] + [c["scale"], c["k_scale"], c["v_scale"]]
    out = launch_paged_attention(c["q"][:, None], *args, cfg=cfg)[:, 0]
    assert torch.isfinite(out).all(), key
    assert_close(out, _ref(c), name=key)


def test_tuning_space_and_tune_record_a_config(tmp_path, monkeypatch):
    """The warm-up entry point runs end to end (tiny cases, a fake clock) and records under the shape-only key."""
    from angel_kernels.attention.paged_decode import KERNEL_NAME, tune, tuning_space
    from angel_kernels.tuning import TunedConfigStore

    if not _triton_here():
        pytest.skip("no Triton path here")
    p = PagedDecodeProblem(4, 2, 64, 16, torch.float16, torch.int8, torch.device("cpu"))
    space = tuning_space(p)
    assert space and all(c.BLOCK_N * 64 <= 16384 and dict(c.extra)["MIN_SPLIT_TILES"] >= 1 for c in space)
    monkeypatch.setattr("angel_kernels.attention.paged_decode.tuning_space", lambda p: space[::len(space) // 3])
    store = TunedConfigStore(tmp_path)
    ticks = iter(range(10_000, 0, -1))  # each config "faster" than the one before
    best, timings = tune(4, 2, 64, cases=((2, 40),), device="cpu", store=store,
                         bench=lambda call: float(next(ticks)))
    assert store.lookup(KERNEL_NAME, p.key(), "cpu") == best and timings[best] == min(timings.values())
    # vLLM's packed int8 rows: timed on caches in that layout (the configs' outputs checked against the packed
    # heuristic's) and recorded under their own key
    packed = PagedDecodeProblem(4, 2, 64, 16, torch.float16, torch.int8, torch.device("cpu"), packed_rows=True)
    launched = []
    real_launch = launch_paged_attention

    def launch(q, key_cache, *args, **kw):
        launched.append(row_alignment(key_cache))
        return real_launch(q, key_cache, *args, **kw)

    monkeypatch.setattr("angel_kernels.attention.paged_decode.launch_paged_attention", launch)
    best, _ = tune(4, 2, 64, cases=((2, 40),), device="cpu", store=store, bench=lambda call: float(next(ticks)),
                   packed_rows=True)
    assert launched and max(launched) < 16 and store.lookup(KERNEL_NAME, packed.key(), "cpu") == best
    assert packed.key() != p.key()
    with pytest.raises(ValueError, match="packed_rows"):
        tune(4, 2, 64, kv_dtype=torch.float16, device="cpu", store=store, packed_rows=True)
