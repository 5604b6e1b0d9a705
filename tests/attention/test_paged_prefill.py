"""Varlen paged attention (prefill, chunked prefill, prefix-cached prefill, decode tokens in the same batch)
against the fp32 reference: query/context lengths around tile and block edges, GQA groups, int8 and fp caches,
vLLM's packed layout, windows and soft-cap, batch invariance (bitwise), routing of decode batches, bad input."""
import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from angel_kernels.attention import PAGED_PREFILL, inline_scale_views, paged_attention, paged_decode_attention
from angel_kernels.attention.paged_prefill import block_q_for
from angel_kernels.reference.attention import paged_varlen_attention_ref, write_kv_cache_ref
from angel_kernels.testing import assert_close, make_generator, randn

from attention_cases import build_case, slot_mapping_for, vllm_packed_int8_cache, with_vllm_packed_cache

CANDIDATES = PAGED_PREFILL.names()
ARGS = ("q", "key_cache", "value_cache", "block_table", "seq_lens", "query_start_loc", "k_scale", "v_scale")


def varlen_case(lens, q_lens, *, seed=0, device="cpu", **kw):
    """Caches holding ``lens[b]`` tokens per sequence; q [sum(q_lens), H_q, D] for the last q_lens[b] of them."""
    c = build_case(lens, seed=seed, device=device, **kw)
    g = make_generator(seed + 1000)
    heads_q, head_dim = c["q"].shape[1], c["q"].shape[2]
    total = sum(q_lens)
    c["q"] = randn(total, heads_q, head_dim, dtype=c["q"].dtype, generator=g).to(device)
    starts = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    c["query_start_loc"] = starts.to(device)
    c["max_query_len"] = max(max(q_lens), 1)
    return c


def _run(c, **kw):
    return paged_attention(*(c[a] for a in ARGS), scale=c["scale"], max_query_len=c["max_query_len"], **kw)


def _ref(c, **kw):
    return paged_varlen_attention_ref(*(c[a] for a in ARGS), scale=c["scale"], **kw)


# (context length, query length) pairs: a whole prompt, a chunk after a cached prefix, a decode token, a sequence
# with no query this step, prompts around the 16-token interpreter tiles and blocks
MIXED = ([(20, 20), (70, 9), (17, 1), (12, 0), (33, 33), (16, 16), (48, 17)])


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_mixed_batch_every_candidate(candidate, cache_dtype, device, monkeypatch):
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_PAGED_PREFILL", candidate)
    lens, q_lens = zip(*MIXED)
    c = varlen_case(lens, q_lens, cache_dtype=cache_dtype, seed=3, device=device)
    out = _run(c)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    assert_close(out, _ref(c), name=f"{candidate} {cache_dtype}")


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (6, 2), (8, 1)])
def test_gqa_groups(heads_q, heads_kv, device):
    """Group 1, a group of 3 (rows of a tile not a power of two) and 8 (one token's group fills half a tile)."""
    c = varlen_case([40, 9], [23, 9], heads_q=heads_q, heads_kv=heads_kv, seed=heads_q, device=device)
    assert_close(_run(c), _ref(c), name=f"Hq={heads_q} Hkv={heads_kv}")


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_sliding_window_and_soft_cap(cache_dtype, device):
    lens, q_lens = [70, 40, 5], [30, 40, 1]
    c = varlen_case(lens, q_lens, cache_dtype=cache_dtype, seed=11, device=device)
    for kw in ({"sliding_window": 1}, {"sliding_window": 19}, {"soft_cap": 5.0},
               {"sliding_window": 33, "soft_cap": 30.0}):
        assert_close(_run(c, **kw), _ref(c, **kw), name=str(kw))


def test_head_dim_128_bf16(device):
    c = varlen_case([37, 20], [37, 4], head_dim=128, dtype=torch.bfloat16, seed=2, device=device)
    assert_close(_run(c), _ref(c), name="D=128 bf16")


@pytest.mark.parametrize("physical", ["NHD", "HND"])
def test_vllm_packed_int8_cache(physical, device):
    lens, q_lens = [50, 21], [18, 21]
    heads_kv, head_dim, block_size = 2, 64, 16
    g = make_generator(6)
    num_blocks = 9
    raw, kv_cache, *_ = vllm_packed_int8_cache(num_blocks, block_size, heads_kv, head_dim, physical=physical)
    kc, vc, ks, vs = inline_scale_views(kv_cache, head_dim)
    table = torch.randperm(num_blocks, generator=g)[:8].reshape(2, 4).to(torch.int32)
    key = randn(sum(lens), heads_kv, head_dim, dtype=torch.float16, generator=g)
    value = randn(sum(lens), heads_kv, head_dim, dtype=torch.float16, generator=g)
    write_kv_cache_ref(key, value, kc, vc, slot_mapping_for(table, lens, block_size), ks, vs)
    c = dict(key_cache=kc, value_cache=vc, k_scale=ks, v_scale=vs, block_table=table,
             seq_lens=torch.tensor(lens, dtype=torch.int32), scale=head_dim ** -0.5)
    c["q"] = randn(sum(q_lens), 4, head_dim, dtype=torch.float16, generator=g)
    c["query_start_loc"] = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
    c["max_query_len"] = max(q_lens)
    c = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    assert_close(_run(c), _ref(c), name=physical)


def test_batch_invariance_bitwise(device):
    """A sequence's rows are the same bits alone and in a batch: a program only reads its own sequence."""
    lens, q_lens = [70, 33, 17, 48], [9, 33, 1, 17]
    c = varlen_case(lens, q_lens, seed=8, device=device)
    full = _run(c)
    starts = c["query_start_loc"].tolist()
    for b in range(len(lens)):
        alone = dict(c, q=c["q"][starts[b] : starts[b + 1]], block_table=c["block_table"][b : b + 1],
                     seq_lens=c["seq_lens"][b : b + 1], max_query_len=max(q_lens),
                     query_start_loc=torch.tensor([0, q_lens[b]], dtype=torch.int32, device=device))
        if q_lens[b] == 1:
            alone["max_query_len"] = 2  # keep it on the varlen kernel: decode batches are routed elsewhere
        assert torch.equal(_run(alone), full[starts[b] : starts[b + 1]]), f"sequence {b} differs alone"


def test_decode_batches_use_the_decode_kernel(device):
    """max_query_len == 1: the same bits as paged_decode_attention (its split-KV kernel)."""
    c = varlen_case([40, 17, 1], [1, 1, 1], seed=12, device=device)
    dec = paged_decode_attention(c["q"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"],
                                 c["k_scale"], c["v_scale"], scale=c["scale"])
    assert torch.equal(_run(c), dec)
    assert_close(_run(dict(c, max_query_len=2)), _ref(c), name="varlen kernel on single-token queries")


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_random_lengths(data):
    n = data.draw(st.integers(1, 4), label="num_seqs")
    lens = [data.draw(st.integers(1, 80), label=f"L{i}") for i in range(n)]
    q_lens = [data.draw(st.integers(0, L), label=f"Q{i}") for i, L in enumerate(lens)]
    cache_dtype = data.draw(st.sampled_from([torch.int8, torch.float16]), label="cache")
    c = varlen_case(lens, q_lens, cache_dtype=cache_dtype, seed=sum(lens))
    assert_close(_run(c), _ref(c), name=f"lens={lens} q_lens={q_lens}")


def test_tile_numbering_covers_every_query():
    """cdiv(Q_b, BLOCK_Q) tiles starting at query_start_loc[b] // BLOCK_Q + b never overlap and fit the grid."""
    g = torch.Generator().manual_seed(0)
    for block_q in (1, 5, 16, 32):
        for _ in range(50):
            q_lens = torch.randint(0, 70, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            starts = [0]
            for n in q_lens:
                starts.append(starts[-1] + n)
            grid = starts[-1] // block_q + len(q_lens)
            owner = {}
            for b, n in enumerate(q_lens):
                first = starts[b] // block_q + b
                for t in range(-(-n // block_q)):
                    assert first + t < grid and first + t not in owner
                    owner[first + t] = b
    assert block_q_for(4, 128) == 32 and block_q_for(3, 128) == 42 and block_q_for(256, 128) == 1


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: c.update(query_start_loc=c["query_start_loc"][:-1]), "num_seqs \\+ 1"),
        (lambda c: c.update(query_start_loc=c["query_start_loc"] + 1), "rise from 0"),
        (lambda c: c.update(query_start_loc=c["query_start_loc"].long()), "query_start_loc"),
        (lambda c: c.update(max_query_len=3), "below the longest"),
        (lambda c: c.update(max_query_len=0), "max_query_len"),
        (lambda c: c.update(seq_lens=torch.tensor([4, 9], dtype=torch.int32)), "only 4 cached tokens"),
        (lambda c: c.update(seq_lens=torch.tensor([500, 9], dtype=torch.int32)), "block_table is too short"),
        (lambda c: c.update(q=c["q"].float()), "q"),
        (lambda c: c.update(q=c["q"][..., :32]), "head_dim"),
        (lambda c: c.update(k_scale=None), "k_scale"),
    ],
)
def test_bad_input(mutate, match):
    c = varlen_case([40, 9], [23, 9], seed=1)
    mutate(c)
    with pytest.raises((ValueError, TypeError), match=match):
        _run(c)


@pytest.mark.parametrize("layout", ["separate", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_words_path(layout, dtype, device):
    """WORDS (int8 rows read as int32 words, converted a word at a time) gives the element path's results: bits on
    a GPU, one output rounding under the interpreter (its dot sums a transposed operand in another order); masked
    and unmasked tiles, windows and soft-cap, 16-byte rows and vLLM's packed rows (4-byte aligned V)."""
    from angel_kernels.attention.paged_decode import row_alignment
    from angel_kernels.attention.paged_prefill import launch_paged_varlen
    from angel_kernels.tuning import KernelConfig

    lens, q_lens = zip(*MIXED)
    c = varlen_case(lens, q_lens, cache_dtype=torch.int8, dtype=dtype, seed=12, device=device)
    if layout == "packed":
        c = with_vllm_packed_cache(c, lens, device)
        assert row_alignment(c["value_cache"]) == 4
    args = [c[a] for a in ARGS[:6]] + [c["scale"], c["k_scale"], c["v_scale"]]
    block_m, block_n = (16, 16) if device.type == "cpu" else (64, 64)
    for kw in ({}, {"sliding_window": 19, "soft_cap": 20.0}):
        outs = [launch_paged_varlen(*args, cfg=KernelConfig(block_m, block_n, 0, num_warps=4, num_stages=1,
                                                            extra=(("WORDS", words),)), **kw) for words in (0, 1)]
        name = f"{layout} {dtype} {kw}"
        if device.type == "cuda":
            assert torch.equal(outs[0], outs[1]), name
        else:
            ulp = 2**-10 if dtype == torch.float16 else 2**-7
            torch.testing.assert_close(outs[1], outs[0], rtol=ulp, atol=1e-5, msg=name)
        assert_close(outs[1], _ref(c, **kw), name=name)


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
def test_page_addressing_is_bitwise_identical(cache_dtype, block_size, device):
    """PAGE_ADDR (page and slot from the tile start, 32-bit wide page offsets) changes no bit: pages smaller and
    larger than the KV tile, masked and unmasked tiles, a window with soft-cap, the int8 word path."""
    from angel_kernels.attention.paged_prefill import launch_paged_varlen
    from angel_kernels.tuning import KernelConfig

    lens, q_lens = zip(*MIXED)
    c = varlen_case(lens, q_lens, cache_dtype=cache_dtype, block_size=block_size, seed=16, device=device)
    args = [c[a] for a in ARGS[:6]] + [c["scale"], c["k_scale"], c["v_scale"]]
    block_m, block_n = (16, 16) if device.type == "cpu" else (64, 64)
    words = int(cache_dtype == torch.int8)
    for kw in ({}, {"sliding_window": 19, "soft_cap": 20.0}):
        outs = [launch_paged_varlen(*args, cfg=KernelConfig(block_m, block_n, 0, num_warps=4, num_stages=1,
                                                            extra=(("PAGE_ADDR", on), ("WORDS", words))), **kw)
                for on in (0, 1)]
        name = f"{cache_dtype} page {block_size} {kw}"
        assert torch.equal(outs[0], outs[1]), name
        assert_close(outs[1], _ref(c, **kw), name=name)


@pytest.mark.parametrize("dtype,qk_int8", [(torch.float16, 1), (torch.bfloat16, 0)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_fresh_prompts_on_their_dequantized_rows(block_size, dtype, qk_int8, device):
    """FRESH_COPY (int8 caches): fresh prompts (no cached prefix, ≥ FRESH_MIN_TOKENS tokens) give the bits of the
    plain-cache launch over their dequantized rows, the other sequences (shorter prompts, chunks after a prefix,
    decode tokens, one without queries) the bits of the int8 config without FRESH_COPY, as does every sequence when
    max_query_len rules fresh prompts out; all against the reference; with a window and soft-cap too."""
    from angel_kernels.attention.paged_prefill import (FRESH_MIN_TOKENS, PagedPrefillProblem, fresh_prompt_config,
                                                       launch_paged_varlen)
    from angel_kernels.tuning import KernelConfig

    lens, q_lens = zip(*(MIXED + [(100, 41), (64, 64), (90, 90)]))
    c = varlen_case(lens, q_lens, cache_dtype=torch.int8, dtype=dtype, block_size=block_size, seed=23,
                    device=device)
    args = [c[a] for a in ARGS[:6]] + [c["scale"], c["k_scale"], c["v_scale"]]
    deq = [(c[cache].float() * c[sc].float()[..., None]).to(dtype) for cache, sc in
           (("key_cache", "k_scale"), ("value_cache", "v_scale"))]
    p = PagedPrefillProblem(c["q"].shape[1], deq[0].shape[2], c["q"].shape[2], block_size, dtype, torch.int8,
                            torch.device(device))
    block_m, block_n = (16, 16) if device.type == "cpu" else (64, 128)
    extra = (("PAGE_ADDR", 1), ("QK_INT8", qk_int8), ("WORDS", 1))
    rows, t = [], 0
    for L, n in zip(lens, q_lens):
        rows.append(torch.arange(t, t + n) if L == n and n >= FRESH_MIN_TOKENS else torch.arange(0))
        t += n
    fresh = torch.cat(rows).to(device)
    other = torch.tensor([i for i in range(t) if i not in set(fresh.tolist())], dtype=torch.int64, device=device)
    assert fresh.numel() and other.numel()
    for kw in ({}, {"sliding_window": 19, "soft_cap": 20.0}):
        name = f"page {block_size} {dtype} {kw}"
        cfg = KernelConfig(block_m, block_n, 0, num_warps=4, num_stages=2, extra=extra)
        fresh_cfg = dataclasses.replace(cfg, extra=extra + (("FRESH_COPY", 1),))
        out = launch_paged_varlen(*args, cfg=fresh_cfg, **kw)
        assert not out.isnan().any(), name
        assert_close(out, _ref(c, **kw), name=name)
        cached = launch_paged_varlen(*args, cfg=cfg, **kw)
        assert torch.equal(out[other], cached[other]), name
        assert torch.equal(launch_paged_varlen(*args, cfg=fresh_cfg, max_query_len=FRESH_MIN_TOKENS - 1, **kw),
                           cached), name
        plain = launch_paged_varlen(*args[:1], *deq, *args[3:7], None, None, cfg=fresh_prompt_config(p), **kw)
        if device.type == "cpu" and dtype == torch.bfloat16:  # the interpreter truncates fp32 → bf16 (the GPU rounds)
            torch.testing.assert_close(out[fresh], plain[fresh], rtol=2**-6, atol=2**-5, msg=name)
        else:
            assert torch.equal(out[fresh], plain[fresh]), name


@pytest.mark.parametrize("cache_dtype,words", [(torch.int8, 0), (torch.int8, 1), (torch.float16, 0),
                                               (torch.bfloat16, 0)])
def test_head_dim_halves(cache_dtype, words, device):
    """D_SPLIT 2 (q, K, V and the accumulator in head-dim halves) against the reference and the whole-dim path:
    masked and unmasked tiles, a window with soft-cap, both output halves written."""
    from angel_kernels.attention.paged_prefill import launch_paged_varlen
    from angel_kernels.tuning import KernelConfig

    dtype = torch.bfloat16 if cache_dtype == torch.bfloat16 else torch.float16
    lens, q_lens = zip(*MIXED)
    c = varlen_case(lens, q_lens, cache_dtype=cache_dtype, dtype=dtype, seed=14, device=device)
    args = [c[a] for a in ARGS[:6]] + [c["scale"], c["k_scale"], c["v_scale"]]
    block_m, block_n = (16, 16) if device.type == "cpu" else (64, 64)
    for kw in ({}, {"sliding_window": 19, "soft_cap": 20.0}):
        outs = []
        for d_split in (1, 2):
            cfg = KernelConfig(block_m, block_n, 0, num_warps=4, num_stages=1,
                               extra=(("D_SPLIT", d_split), ("WORDS", words)))
            out = launch_paged_varlen(*args, cfg=cfg, **kw)
            assert not out.isnan().any()
            outs.append(out)
        name = f"{cache_dtype} WORDS={words} {kw}"
        assert_close(outs[1], _ref(c, **kw), name=name)
        ulp = 2**-10 if dtype == torch.float16 else 2**-7
        torch.testing.assert_close(outs[1], outs[0], rtol=2 * ulp, atol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["separate", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_qk_on_int8_tensor_cores(layout, dtype, device):
    """QK_INT8 (q split into two int8 parts, q·kᵀ on int8 MMAs, as in paged_decode) against the fp32 reference and
    within a few output roundings of the fp path: whole head dim and halves, the element and word paths for V
    (FENCE_V with the word path: a GPU layout choice, a no-op under the interpreter), masked and unmasked tiles,
    windows and soft-cap, 16-byte and vLLM's packed rows."""
    from angel_kernels.attention.paged_prefill import launch_paged_varlen
    from angel_kernels.tuning import KernelConfig

    lens, q_lens = zip(*MIXED)
    c = varlen_case(lens, q_lens, cache_dtype=torch.int8, dtype=dtype, head_dim=64, seed=18, device=device)
    if layout == "packed":
        c = with_vllm_packed_cache(c, lens, device)
    c["q"] = c["q"] * 8.0  # larger logits: a q-quantization error would show in peaked softmax rows
    args = [c[a] for a in ARGS[:6]] + [c["scale"], c["k_scale"], c["v_scale"]]
    block_m, block_n = (16, 16) if device.type == "cpu" else (64, 64)
    ulp = 2**-10 if dtype == torch.float16 else 2**-7
    for kw in ({}, {"sliding_window": 19, "soft_cap": 20.0}):
        for d_split, words in ((1, 0), (2, 1)):
            outs = []
            for qk_int8 in (0, 1):
                extra = (("D_SPLIT", d_split), ("FENCE_V", words), ("QK_INT8", qk_int8), ("WORDS", words))
                out = launch_paged_varlen(*args, cfg=KernelConfig(block_m, block_n, 0, num_warps=4, num_stages=1,
                                                                  extra=extra), **kw)
                assert not out.isnan().any()
                outs.append(out)
            name = f"{layout} {dtype} D_SPLIT={d_split} WORDS={words} {kw}"
            assert_close(outs[1], _ref(c, **kw), name=name)
            torch.testing.assert_close(outs[1], outs[0], rtol=4 * ulp, atol=1e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_long_prompts(cache_dtype, head_dim):
    """Real sizes: 1000- and 4097-token prompts, a 512-token chunk after 3000 cached tokens, decode tokens."""
    dtype = torch.bfloat16 if cache_dtype == torch.bfloat16 else torch.float16
    lens, q_lens = [1000, 3512, 4097, 300], [1000, 512, 4097, 1]
    c = varlen_case(lens, q_lens, heads_q=32, heads_kv=8, head_dim=head_dim, cache_dtype=cache_dtype, dtype=dtype,
                    seed=head_dim, device="cuda")
    out = _run(c)
    torch.cuda.synchronize()
    assert_close(out, _ref(c), name=f"{cache_dtype} D={head_dim}")


def test_tuning_space_and_tune_record_a_config(tmp_path):
    """The warm-up entry point runs end to end (tiny cases, a fake clock) and records under the shape-only key."""
    from angel_kernels.attention.paged_prefill import KERNEL_NAME, PagedPrefillProblem, tune, tuning_space
    from angel_kernels.tuning import KernelConfig, TunedConfigStore

    p = PagedPrefillProblem(4, 2, 64, 16, torch.float16, torch.int8, torch.device("cpu"))
    assert len(tuning_space(p)) >= 20
    configs = [KernelConfig(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=64, num_warps=4, num_stages=1) for bn in (16, 32)]
    store = TunedConfigStore(tmp_path)
    ticks = iter(range(10_000, 0, -1))  # each config "faster" than the one before
    best, timings = tune(4, 2, 64, cases=((2, 20, 0), (1, 5, 30)), device="cpu", store=store, configs=configs,
                         bench=lambda calls: float(next(ticks)))
    assert best == configs[-1] and set(timings) == set(configs)
    assert store.lookup(KERNEL_NAME, p.key(), "cpu") == best
