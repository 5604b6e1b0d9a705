"""KV cache write: bit-exact against the reference quantizer, padding skipped, vLLM's packed layout, bad input."""
from functools import partial

import pytest
import torch
from hypothesis import given, strategies as st

from angel_kernels.attention import KV_WRITE, inline_scale_views, write_kv_cache
from angel_kernels.attention.kv_write import launch_kv_write
from angel_kernels.tuning import KernelConfig
from angel_kernels.reference.attention import KV_SCALE_EPS, quantize_kv_ref, write_kv_cache_ref
from angel_kernels.testing import make_generator, poison, randn

from attention_cases import empty_caches, shipped_configs, vllm_packed_int8_cache

CANDIDATES = KV_WRITE.names()


def _on(device, key, value, slots, caches):
    """A ``_case`` on ``device``."""
    return key.to(device), value.to(device), slots.to(device), [None if c is None else c.to(device) for c in caches]


def _clone(*ts):
    return [None if t is None else t.clone() for t in ts]


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _assert_same(got, want, what):
    """Bitwise (NaN poison included)."""
    for name, a, b in zip(("key_cache", "value_cache", "k_scale", "v_scale"), got, want):
        if a is not None:
            assert torch.equal(_bits(a), _bits(b)), f"{what}: {name} differs"


def _case(T, H, D, block_size, num_blocks, cache_dtype, dtype, seed, pad_every=0, scale=1.0):
    g = make_generator(seed)
    key = randn(T, H, D, dtype=dtype, generator=g, scale=scale)
    value = randn(T, H, D, dtype=dtype, generator=g, scale=scale)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T].to(torch.int64)
    if pad_every:  # tokens pad_every - 1, 2 · pad_every - 1, ...: a one-token case still writes its token
        slots[pad_every - 1 :: pad_every] = -1
    caches = empty_caches(num_blocks, block_size, H, D, cache_dtype)
    return key, value, slots, caches


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("cache_dtype,dtype", [(torch.int8, torch.float16), (torch.int8, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_write_matches_reference_bitwise_and_skips_padding(candidate, cache_dtype, dtype, block_size, monkeypatch,
                                                           device):
    monkeypatch.setenv("ANGEL_KERNELS_FORCE_KV_WRITE", candidate)
    key, value, slots, caches = _on(device, *_case(23, 3, 64, block_size, 3, cache_dtype, dtype, seed=block_size,
                                                   pad_every=4))
    want = _clone(*caches)
    write_kv_cache_ref(key, value, *want[:2], slots, *want[2:])
    write_kv_cache(key, value, caches[0], caches[1], slots, caches[2], caches[3])
    _assert_same(caches, want, candidate)
    # every written slot holds the token's row; every other slot is still poison
    written = torch.zeros(3 * block_size, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    flat_k = caches[0].reshape(-1, 3, 64)
    unused = flat_k[~written]
    assert torch.equal(_bits(unused), _bits(poison(unused.clone()))), "a padded/unused slot was written"
    if cache_dtype == torch.int8:
        assert torch.isnan(caches[2].reshape(-1, 3)[~written]).all()
        assert (caches[2].reshape(-1, 3)[written] > 0).all()
        q, s = quantize_kv_ref(key[slots >= 0])
        assert torch.equal(flat_k[slots[slots >= 0]], q)
    else:
        assert torch.equal(flat_k[slots[slots >= 0]], key[slots >= 0])


def test_rounds_to_nearest_even_and_clamps_never_truncates(device):
    # absmax 127 → scale exactly 1: the quantized values are the inputs rounded, ties to even
    row = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 2.7, -2.7, 0.49, -126.6, 0.0, 1.5, -0.5] + [0.0] * 52)
    key = row.half().reshape(1, 1, 64).to(device)
    value = (-key).contiguous()
    kc, vc, ks, vs = [t.to(device) for t in empty_caches(1, 16, 1, 64, torch.int8)]
    write_kv_cache(key, value, kc, vc, torch.tensor([5], device=device), ks, vs)
    want = torch.tensor([127, 2, 4, -2, -4, 3, -3, 0, -127, 0, 2, 0] + [0] * 52, dtype=torch.int8)
    assert ks[0, 5, 0].item() == 1.0 and vs[0, 5, 0].item() == 1.0
    assert torch.equal(kc[0, 5, 0].cpu(), want)
    assert torch.equal(vc[0, 5, 0].cpu(), -want)


def test_zero_rows_get_a_positive_scale_and_zeros(device):
    key = torch.zeros(3, 2, 64, dtype=torch.float16, device=device)
    key[1, 1, 7] = 1e-6  # tiny, below fp16's normal range: still a valid scale
    value = torch.zeros_like(key)
    kc, vc, ks, vs = [t.to(device) for t in empty_caches(2, 16, 2, 64, torch.int8)]
    write_kv_cache(key, value, kc, vc, torch.tensor([0, 1, 20], device=device), ks, vs)
    assert (ks[0, 0] == KV_SCALE_EPS).all() and (vs[0, :2] == KV_SCALE_EPS).all() and (vs[1, 4] == KV_SCALE_EPS).all()
    assert (kc[0, :2] == 0).sum() == 2 * 2 * 64 - 1 and kc[0, 1, 1, 7] != 0
    assert (vc[1, 4] == 0).all() and not torch.isnan(ks[0, :2]).any()


def test_strided_key_value_views_of_a_fused_qkv(device):
    """key/value sliced out of one [T, (Hq + 2 Hkv) · D] projection output (row stride ≠ H · D)."""
    g = make_generator(3)
    T, Hq, Hkv, D = 7, 4, 2, 64
    qkv = randn(T, (Hq + 2 * Hkv) * D, generator=g).to(device)
    key = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    value = qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
    assert not key.is_contiguous()
    slots = torch.tensor([9, 0, 33, 4, 17, 30, 2], dtype=torch.int64, device=device)
    got = [t.to(device) if t is not None else None for t in empty_caches(3, 16, Hkv, D, torch.int8)]
    want = _clone(*got)
    write_kv_cache(key, value, got[0], got[1], slots, got[2], got[3])
    write_kv_cache_ref(key.contiguous(), value.contiguous(), want[0], want[1], slots, want[2], want[3])
    _assert_same([t.cpu() for t in got], [t.cpu() for t in want], "strided key/value")


@pytest.mark.parametrize("physical", ["NHD", "HND"])
def test_vllm_packed_layout_views_and_write(physical, device):
    nb, bs, H, D = 3, 16, 2, 64
    raw, kv_cache, kc, vc, ks, vs = vllm_packed_int8_cache(nb, bs, H, D, physical=physical, device=device)
    # our view helper builds the very same views from the packed tensor
    mine = inline_scale_views(kv_cache, D)
    for a, b in zip(mine, (kc, vc, ks, vs)):
        assert a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape and a.dtype == b.dtype
    g = make_generator(11)
    T = 21
    key = randn(T, H, D, generator=g, device=device)
    value = randn(T, H, D, generator=g, device=device, scale=0.01)
    slots = torch.randperm(nb * bs, generator=g)[:T].to(torch.int64).to(device)
    slots[5] = -1
    before = raw.clone()
    write_kv_cache(key, value, *mine[:2], slots, *mine[2:])
    # decode the raw bytes as vLLM lays them out: row (block, slot, head) = K | K scale | V | V scale
    rows = kv_cache.transpose(1, 2).reshape(nb * bs, H, 2 * (D + 4))
    keep = slots >= 0
    qk, sk = quantize_kv_ref(key[keep])
    qv, sv = quantize_kv_ref(value[keep])
    r = rows[slots[keep]]
    assert torch.equal(r[..., :D], qk) and torch.equal(r[..., D + 4 : 2 * D + 4], qv)
    assert torch.equal(r[..., D : D + 4].contiguous().view(torch.float32)[..., 0], sk)
    assert torch.equal(r[..., 2 * D + 4 :].contiguous().view(torch.float32)[..., 0], sv)
    # nothing else changed
    untouched = torch.ones(nb * bs, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    raw_rows = raw.permute(0, 2, 1, 3) if physical == "HND" else raw
    before_rows = before.permute(0, 2, 1, 3) if physical == "HND" else before
    assert torch.equal(raw_rows.reshape(nb * bs, H, -1)[untouched], before_rows.reshape(nb * bs, H, -1)[untouched])


@given(
    T=st.integers(1, 40),
    H=st.sampled_from([1, 3, 8]),
    block_size=st.sampled_from([16, 32, 128]),
    magnitude=st.sampled_from([1e-4, 1.0, 300.0]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_write_bitwise(T, H, block_size, magnitude, dtype, seed):
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no Triton path here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_blocks = -(-T // block_size) + 1
    key, value, slots, caches = _case(T, H, 64, block_size, num_blocks, torch.int8, dtype, seed, pad_every=3,
                                      scale=magnitude)
    caches = [c.to(device) for c in caches]
    want = _clone(*caches)
    write_kv_cache(key.to(device), value.to(device), caches[0], caches[1], slots.to(device), caches[2], caches[3])
    write_kv_cache_ref(key.to(device), value.to(device), want[0], want[1], slots.to(device), want[2], want[3])
    _assert_same([c.cpu() for c in caches], [c.cpu() for c in want], "hypothesis")


def _good_args(cache_dtype=torch.int8):
    key = torch.randn(4, 2, 64).half()
    kc, vc, ks, vs = empty_caches(2, 16, 2, 64, cache_dtype)
    return dict(key=key, value=key.clone(), key_cache=kc, value_cache=vc,
                slot_mapping=torch.arange(4, dtype=torch.int64), k_scale=ks, v_scale=vs)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(key=a["key"].float()), TypeError, "key dtype"),
        (lambda a: a.update(value=a["value"].bfloat16()), TypeError, "value dtype"),
        (lambda a: a.update(key_cache=a["key_cache"].to(torch.int32)), TypeError, "key_cache dtype"),
        (lambda a: a.update(value_cache=a["value_cache"].half()), TypeError, "value_cache is"),
        (lambda a: a.update(k_scale=None), ValueError, "need k_scale and v_scale"),
        (lambda a: a.update(k_scale=a["k_scale"].half()), TypeError, "k_scale dtype"),
        (lambda a: a.update(v_scale=a["v_scale"][:, :8]), ValueError, "v_scale must have shape"),
        (lambda a: a.update(key=a["key"][:, :1]), ValueError, "key must have shape"),
        (lambda a: a.update(value=a["value"][:3]), ValueError, "tokens"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), TypeError, "slot_mapping dtype"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:3]), ValueError, "one slot per token"),
        (lambda a: a.update(slot_mapping=torch.tensor([0, 1, 32, 2])), ValueError, "holds 32 slots"),
        (lambda a: a.update(key=torch.randn(4, 2, 128).half()[..., ::2]), ValueError, "contiguous in its last"),
        (lambda a: a.update(key_cache=torch.zeros(2, 16, 2, 128, dtype=torch.int8)[..., ::2]), ValueError,
         "contiguous in its last"),
        (lambda a: a.update(key_cache=torch.zeros(1, 16, 2, 64, dtype=torch.int8).expand(2, 16, 2, 64)),
         ValueError, "stride-0"),
        (lambda a: a.update(key_cache=torch.zeros(2, 16, 2, 96, dtype=torch.int8),
                            value_cache=torch.zeros(2, 16, 2, 96, dtype=torch.int8)), ValueError, "head_dim 96"),
        (lambda a: a.update(key_cache=torch.zeros(4, 8, 2, 64, dtype=torch.int8),
                            value_cache=torch.zeros(4, 8, 2, 64, dtype=torch.int8)), ValueError, "block_size 8"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].to("meta")), ValueError, "meta"),
        (lambda a: a.update(k_scale=a["k_scale"].to("meta"), v_scale=a["v_scale"].to("meta")), ValueError, "meta"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, exc, match):
    args = _good_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        write_kv_cache(**args)


def test_fp_cache_rejects_scales_and_other_dtypes():
    args = _good_args(torch.float16)
    args["k_scale"] = torch.ones(2, 16, 2)
    with pytest.raises(ValueError, match="int8 caches only"):
        write_kv_cache(**args)
    args = _good_args(torch.bfloat16)
    with pytest.raises(TypeError, match="must match"):
        write_kv_cache(**args)  # fp16 key into a bf16 cache


def test_registered_op_schema_has_no_defaults_on_mutated_scales():
    """The dispatcher drops trailing arguments equal to their schema default before calling Python kernels;
    torch 2.11's version bump of mutated arguments then indexed past the end of ``args`` (IndexError) for
    fp16/bf16 caches. Mutated optional arguments therefore have no default in the schema."""
    schema = torch.ops.angel_kernels.write_kv_cache.default._schema
    mutated = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert [a.name for a in mutated] == ["key_cache", "value_cache", "k_scale", "v_scale"]
    assert all(not a.has_default_value() for a in mutated), str(schema)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_public_function_and_torch_ops_with_omitted_and_none_scales(cache_dtype, device):
    """Every way of calling the write gives the reference's bits and bumps the caches' versions; fp16/bf16
    caches get None scales (explicit, or omitted through the public function)."""
    dtype = torch.bfloat16 if cache_dtype == torch.bfloat16 else torch.float16
    key, value, slots, _ = _case(5, 2, 64, 16, 2, cache_dtype, dtype, seed=9, pad_every=3)
    want = _clone(*empty_caches(2, 16, 2, 64, cache_dtype))
    write_kv_cache_ref(key, value, want[0], want[1], slots, want[2], want[3])
    key, value, slots = key.to(device), value.to(device), slots.to(device)
    op = torch.ops.angel_kernels.write_kv_cache
    calls = {
        "public, positional": lambda c: write_kv_cache(key, value, c[0], c[1], slots, c[2], c[3]),
        "public, keywords": lambda c: write_kv_cache(key=key, value=value, key_cache=c[0], value_cache=c[1],
                                                     slot_mapping=slots, k_scale=c[2], v_scale=c[3]),
        "torch.ops, positional": lambda c: op(key, value, c[0], c[1], slots, c[2], c[3]),
        "torch.ops, keywords": lambda c: op(key, value, c[0], c[1], slots, k_scale=c[2], v_scale=c[3]),
        "torch.ops overload": lambda c: op.default(key, value, c[0], c[1], slots, c[2], c[3]),
    }
    if cache_dtype != torch.int8:
        calls["public, scales omitted"] = lambda c: write_kv_cache(key, value, c[0], c[1], slots)
    for name, call in calls.items():
        caches = [None if t is None else t.to(device) for t in empty_caches(2, 16, 2, 64, cache_dtype)]
        assert (caches[2] is None) == (cache_dtype != torch.int8)
        versions = [t._version for t in caches if t is not None]
        call(caches)
        _assert_same([None if t is None else t.cpu() for t in caches], want, name)
        assert all(t._version > v for t, v in zip([t for t in caches if t is not None], versions)), name
    if cache_dtype != torch.int8:
        # the registered op has no defaults for the scales: torch.ops callers pass None explicitly
        kc, vc, _, _ = empty_caches(2, 16, 2, 64, cache_dtype)
        with pytest.raises(RuntimeError, match="missing value for argument 'k_scale'"):
            op(key.cpu(), value.cpu(), kc, vc, slots.cpu())


def test_inline_scale_views_rejects_wrong_content_size():
    with pytest.raises(ValueError, match="2 \\* \\(head_dim"):
        inline_scale_views(torch.zeros(2, 2, 16, 2 * 64, dtype=torch.int8), 64)
    with pytest.raises(TypeError, match="kv_cache dtype"):
        inline_scale_views(torch.zeros(2, 2, 16, 136, dtype=torch.float16), 64)


def test_default_dispatch_on_cpu_without_interpreter(monkeypatch):
    from angel_kernels.attention.kv_write import KVWriteProblem

    p = KVWriteProblem(4, 2, 64, 16, torch.float16, torch.int8, torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert KV_WRITE.select(p).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert KV_WRITE.select(p).name == "triton"


def test_near_ties_and_non_finite_rows_match_the_reference(device):
    """fp16 rows whose quotients x / scale are exact half-integers or one input ulp from one, with scales whose
    reciprocal is inexact (absmax 127 · s, s = an odd 3-15 times 2^e, so scale = s exactly and x = (k + ½) · s
    is exact in fp16): there the exact product x · RN(1 / s) lies just off the tie, and its fp32 rounding often
    lands on it, where a multiply and then an add would round to even instead of to the exact product's side.
    Mixed with random rows in the same programs and in programs of their own, the write matches the reference
    bit for bit. Rows with inf / NaN: their own bits are not compared (the reference leaves them unspecified);
    the finite rows beside them are."""
    T, H, D = (64 if device.type == "cuda" else 12), 4, 64
    g = make_generator(11)
    odd = (2 * torch.randint(1, 8, (T, H, 1), generator=g) + 1).to(torch.float32)  # 3, 5, ..., 15
    pow2 = 2.0 ** torch.randint(-6, 3, (T, H, 1), generator=g).to(torch.float32)
    kmax = ((2047 / odd - 1) // 2).clamp(max=126)  # (2k + 1) · odd ≤ 2047: exact in fp16
    k = (torch.rand(T, H, D, generator=g) * (kmax + 1)).floor() * torch.sign(torch.randn(T, H, D, generator=g))
    near = ((k + 0.5 * torch.sign(k + 0.25)) * odd * pow2).half()
    step = torch.randint(-1, 2, (T, H, D), generator=g).to(torch.int16)  # -1, 0 or +1 fp16 ulp
    near = torch.where(torch.rand(T, H, D, generator=g) < 0.5, near, (near.view(torch.int16) + step).view(torch.half))
    near[..., 0] = (127 * odd[..., 0] * pow2[..., 0]).half()  # absmax → scale exactly odd · 2^e
    rand = randn(T, H, D, dtype=torch.float16, generator=g, scale=3.0)
    key = torch.where((torch.arange(T) % 3 == 0)[:, None, None], rand, near)  # tokens 0, 3, 6 ... random
    value = torch.where((torch.arange(H) % 2 == 0)[None, :, None], near, rand)  # heads 0, 2 near ties
    # whole tiles of exact ties x = (k + ½) · s, s · RN(1 / s) ≠ 1: every exact product lies off its tie, and for
    # about half of them the fp32 product rounds onto it (k + ½ · 2^-17 apart at 64-128), so a multiply then an
    # add, rounding twice, takes the even side where the exact product lies on the odd one
    off = torch.zeros(4, H, D)
    for h in range(H):
        s = torch.tensor(float((7, 13)[h % 2]))
        k = torch.arange(20, 127, dtype=torch.float32)
        prod = ((k + 0.5) * s) * (torch.ones(()) / s)  # fp32 throughout: a product rounded once to fp32
        assert (prod == k + 0.5).any() and (prod != k + 0.5).any()
        off[:, h, : D - 1] = ((k[torch.arange(D - 1) % len(k)] + 0.5) * s)[None, :]
        off[:, h, D - 1] = 127 * s  # absmax: scale = s exactly
    key, value = torch.cat([key, off.half()]), torch.cat([value, off.half()])
    T += 4
    slots = torch.randperm(T + 16, generator=g)[:T]

    kernel = partial(launch_kv_write, cfg=KernelConfig(BLOCK_M=1, BLOCK_N=4, BLOCK_K=D, num_warps=1, num_stages=1))

    def write(key, value, write_fn):
        caches = [None if c is None else c.to(device) for c in empty_caches(T // 16 + 2, 16, H, D, torch.int8)]
        write_fn(key.to(device), value.to(device), caches[0], caches[1], slots.to(device), caches[2], caches[3])
        return [c.cpu() for c in caches]

    got, want = write(key, value, kernel), write(key, value, write_kv_cache_ref)
    _assert_same(got, want, "near ties")
    assert torch.equal(want[2].view(-1, H)[slots][1], (odd * pow2)[1, :, 0])  # the scales are odd · 2^e

    bad = key.clone()
    bad[1, 0, 3], bad[2, 1, 5] = float("inf"), float("nan")
    got, want = write(bad, value, kernel), write(bad, value, write_kv_cache_ref)
    finite = torch.ones(T, H, dtype=torch.bool)
    finite[1, 0] = finite[2, 1] = False
    blk, off = slots // 16, slots % 16
    for i in (0, 2):  # key rows and their scales
        assert torch.equal(_bits(got[i][blk, off][finite]), _bits(want[i][blk, off][finite]))
    _assert_same(got[1::2], want[1::2], "values beside non-finite keys")


def _config_sample():
    """Program shapes of the tuning space (tokens × heads per program, warps) on a 3-head case."""
    from angel_kernels.attention.kv_write import KVWriteProblem, tuning_space

    p = KVWriteProblem(23, 3, 64, 16, torch.float16, torch.int8, torch.device("cpu"))
    space = tuning_space(p)
    assert {c.BLOCK_M for c in space} == {1, 2, 4} and {c.BLOCK_N for c in space} == {4, 2}
    return [c for c in space if c.num_warps == 1 or c.BLOCK_M == 4]


def _packed_caches(num_blocks, block_size, heads, head_dim, device):
    """Poisoned caches in vLLM's packed int8 rows (inline scales; V rows 4-byte aligned): its four views."""
    return list(inline_scale_views(vllm_packed_int8_cache(num_blocks, block_size, heads, head_dim, device=device)[1],
                                   head_dim))


@pytest.mark.parametrize("cfg", _config_sample(), ids=lambda c: f"t{c.BLOCK_M}h{c.BLOCK_N}w{c.num_warps}")
@pytest.mark.parametrize("cache_dtype,layout", [(torch.int8, "pages"), (torch.int8, "vllm"), (torch.float16, "pages")])
def test_every_program_shape_writes_the_reference_bits(cfg, cache_dtype, layout, device):
    """23 tokens (no tile of 2 or 4 tokens divides them), 3 heads (no head tile of 2 or 4 does), padding slots:
    each program shape writes exactly the reference's bytes and nothing else, into plain caches and into vLLM's
    packed rows (their F2I conversions)."""
    key, value, slots, caches = _on(device, *_case(23, 3, 64, 16, 3, cache_dtype, torch.float16, seed=cfg.BLOCK_M,
                                                   pad_every=3))
    if layout == "vllm":
        caches = _packed_caches(3, 16, 3, 64, device)
    want = _clone(*caches)
    write_kv_cache_ref(key, value, *want[:2], slots, *want[2:])
    launch_kv_write(key, value, caches[0], caches[1], slots, caches[2], caches[3], cfg=cfg)
    _assert_same(caches, want, str(cfg.as_dict()))


@pytest.mark.parametrize("key,cfg", list(shipped_configs("kv_write")))
def test_shipped_table_configs_write_the_reference_bits(key, cfg, device):
    """Every config a GPU table ships for the KV write, on 23 tokens with padding slots in its key's heads, head
    dim, block size and cache dtype: the reference's bytes and nothing else."""
    fields = dict(field.split("=") for field in key.split(","))
    cache_dtype = torch.int8 if fields["kv"] == "int8" else torch.float16
    heads, head_dim, page = int(fields["H"]), int(fields["D"]), int(fields["page"])
    key_, value, slots, caches = _on(device, *_case(23, heads, head_dim, page, 3, cache_dtype, torch.float16, seed=5,
                                                    pad_every=3))
    if fields.get("rows") == "packed":
        caches = _packed_caches(3, page, heads, head_dim, device)
    want = _clone(*caches)
    write_kv_cache_ref(key_, value, *want[:2], slots, *want[2:])
    launch_kv_write(key_, value, caches[0], caches[1], slots, caches[2], caches[3], cfg=cfg)
    _assert_same(caches, want, key)


def test_tune_records_the_fastest_config_that_writes_the_same_bytes(tmp_path, monkeypatch, device):
    """``tune`` under the interpreter with a fake timer: each config's first call starts from zeroed pages and is
    checked against the default config's bytes, so a config that writes nothing does not compete even when it
    is the "fastest"; the fastest correct one is recorded under the problem's key."""
    from angel_kernels.attention import kv_write
    from angel_kernels.tuning import TunedConfigStore

    p = kv_write.KVWriteProblem(40, 2, 64, 16, torch.float16, torch.int8, device)
    good = [c for c in kv_write.tuning_space(p) if c.num_warps == 1][:3]
    broken = [c for c in kv_write.tuning_space(p) if c.num_warps == 2 and c != kv_write.heuristic_config(p)][0]
    assert p.key().endswith("T=small")
    fake_us = {cfg: 10.0 - i for i, cfg in enumerate(good)}
    fake_us[broken] = 1.0
    real_launch = kv_write.launch_kv_write
    last = []

    def launch(*args, cfg=None):
        last.append(cfg)
        if cfg != broken:
            real_launch(*args, cfg=cfg)

    monkeypatch.setattr(kv_write, "launch_kv_write", launch)
    store = TunedConfigStore(tmp_path)
    best, timings = kv_write.tune(2, 64, cases=(40, 7), device=device, store=store,
                                  bench=lambda calls: fake_us[last[-1]], configs=good + [broken])
    assert broken not in timings and set(timings) == set(good)
    assert best == good[-1] and store.lookup("kv_write", p.key(), device) == best


# ---------------------------------------------------------------- GPU tier: real shapes, compiled kernel
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-4, 3.0, 300.0])
def test_gpu_reference_quantizer_is_device_independent(dtype, magnitude):
    """quantize_kv_ref gives the same bits on CUDA as on the CPU (IEEE divisions, an exact fp64 product)."""
    g = make_generator(17)
    x = randn(20000, 8, 128, dtype=dtype, generator=g, scale=magnitude)
    q_cpu, s_cpu = quantize_kv_ref(x)
    q_gpu, s_gpu = quantize_kv_ref(x.cuda())
    assert torch.equal(_bits(s_gpu.cpu()), _bits(s_cpu)), "scales differ between CUDA and CPU"
    assert torch.equal(q_gpu.cpu(), q_cpu), "int8 values differ between CUDA and CPU"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("T", [1, 7, 4096])
def test_gpu_write_bitwise(dtype, head_dim, T):
    """div_rn and the fused multiply-add must compile to exactly IEEE fp32 division and one rounding: the
    compiled kernel matches the reference run on the GPU and on the CPU."""
    H, bs = 8, 16
    nb = -(-T // bs) + 2
    key, value, slots, caches = _case(T, H, head_dim, bs, nb, torch.int8, dtype, seed=T, pad_every=5, scale=3.0)
    assert (slots >= 0).any()
    want_cpu = _clone(*caches)
    write_kv_cache_ref(key, value, want_cpu[0], want_cpu[1], slots, want_cpu[2], want_cpu[3])
    caches = [c.cuda() for c in caches]
    want = _clone(*caches)
    write_kv_cache(key.cuda(), value.cuda(), caches[0], caches[1], slots.cuda(), caches[2], caches[3])
    write_kv_cache_ref(key.cuda(), value.cuda(), want[0], want[1], slots.cuda(), want[2], want[3])
    got = [c.cpu() for c in caches]
    _assert_same(got, [c.cpu() for c in want], "gpu vs reference on the gpu")
    _assert_same(got, want_cpu, "gpu vs reference on the cpu")


@pytest.mark.gpu
def test_gpu_vllm_packed_layout():
    nb, bs, H, D = 64, 16, 8, 128
    raw, kv_cache, *_ = vllm_packed_int8_cache(nb, bs, H, D, device="cuda")
    kc, vc, ks, vs = inline_scale_views(kv_cache, D)
    g = make_generator(1, "cuda")
    key = randn(300, H, D, device="cuda", generator=g)
    value = randn(300, H, D, device="cuda", generator=g)
    slots = torch.randperm(nb * bs, device="cuda", generator=g)[:300]
    write_kv_cache(key, value, kc, vc, slots, ks, vs)
    blk, off = slots // bs, slots % bs
    for where in ("cuda", "cpu"):
        qk, sk = quantize_kv_ref(key.to(where))
        qv, sv = quantize_kv_ref(value.to(where))
        assert torch.equal(kc[blk, off].to(where), qk) and torch.equal(vc[blk, off].to(where), qv), where
        assert torch.equal(ks[blk, off].to(where), sk) and torch.equal(vs[blk, off].to(where), sv), where


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype,layout", [(torch.int8, "pages"), (torch.int8, "vllm"), (torch.float16, "pages")])
def test_gpu_every_program_shape_writes_the_reference_bits(cache_dtype, layout):
    """Llama-3-8B KV heads (8 × 128), 1001 tokens (no token tile divides them) with padding, into plain caches and
    into vLLM's packed rows (inline scales, V rows 4-byte aligned): the tuning space's program shapes and the
    card's configs (both token buckets) write the reference's bytes."""
    from angel_kernels.attention.kv_write import KVWriteProblem, config_for, tuning_space

    T, H, D, bs = 1001, 8, 128, 16
    nb = -(-T // bs) + 2
    key, value, slots, caches = _case(T, H, D, bs, nb, cache_dtype, torch.float16, seed=5, pad_every=7, scale=3.0)
    key, value, slots = key.cuda(), value.cuda(), slots.cuda()

    def fresh():
        if layout == "vllm":
            return _packed_caches(nb, bs, H, D, "cuda")
        return [None if c is None else c.cuda() for c in caches]

    want = fresh()
    write_kv_cache_ref(key, value, want[0], want[1], slots, want[2], want[3])
    dev = torch.device("cuda")
    packed = layout == "vllm"
    cards = [config_for(KVWriteProblem(t, H, D, bs, torch.float16, cache_dtype, dev, packed)) for t in (64, 4096)]
    # every token and head tile on 1 and 4 warps (each config compiles: the whole space takes minutes)
    space = tuning_space(KVWriteProblem(T, H, D, bs, torch.float16, cache_dtype, dev))
    for cfg in [c for c in space if c.num_warps in (1, 4)] + cards:
        got = fresh()
        launch_kv_write(key, value, got[0], got[1], slots, got[2], got[3], cfg=cfg)
        _assert_same(got, want, str(cfg.as_dict()))


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float16])
@pytest.mark.parametrize("T", [64, 4096])
def test_gpu_early_launch_writes_the_reference_bits(cache_dtype, T):
    """Every PDL mode (plain, early trigger, trigger at exit), two writes back to back (the second launched while
    the first runs), eager and replayed from a CUDA graph: the reference's bytes in both caches."""
    H, D, bs = 8, 128, 16
    nb = -(-T // bs) + 2
    cases = [_case(T, H, D, bs, nb, cache_dtype, torch.float16, seed=T + i, pad_every=5, scale=3.0) for i in (0, 1)]
    cases = [(k.cuda(), v.cuda(), s.cuda(), [None if c is None else c.cuda() for c in caches])
             for k, v, s, caches in cases]
    wants = []
    for key, value, slots, caches in cases:
        want = _clone(*caches)
        write_kv_cache_ref(key, value, want[0], want[1], slots, want[2], want[3])
        wants.append(want)

    def write_both(pdl):
        outs = [_clone(*caches) for _k, _v, _s, caches in cases]
        for (key, value, slots, _c), got in zip(cases, outs):
            launch_kv_write(key, value, got[0], got[1], slots, got[2], got[3], pdl=pdl)
        return outs

    for pdl in (0, 1, 2):
        for got, want in zip(write_both(pdl), wants):
            _assert_same(got, want, f"eager, PDL {pdl}")
        write_both(pdl)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = write_both(pdl)
        for got, (_k, _v, _s, caches) in zip(outs, cases):  # back to the caches' first contents
            for c, first in zip(got, caches):
                if c is not None:
                    c.copy_(first)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, wants):
            _assert_same(got, want, f"graph, PDL {pdl}")


def test_pdl_mode_by_waves():
    """Off CUDA never; on sm_90 early trigger for one wave of programs, trigger at exit for more."""
    from angel_kernels.attention.kv_write import pdl_mode

    assert pdl_mode(10, 1, torch.device("cpu")) == 0
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        dev = torch.device("cuda")
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        assert pdl_mode(32 * sms, 1, dev) == 1 and pdl_mode(32 * sms + 1, 1, dev) == 2
        assert pdl_mode(16 * sms, 4, dev) == 1 and pdl_mode(16 * sms + 1, 4, dev) == 2
