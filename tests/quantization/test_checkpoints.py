"""Checkpoint readers: tensors packed here, word by word, from known integer matrices in each format's own layout;
the repacked weight must dequantize to exactly what the format's own dequantization formula gives."""
import pytest
import torch

from angel_kernels import repack_awq, repack_compressed_tensors, repack_gptq, w4a16_gemm
from angel_kernels.testing import assert_close, make_generator, randn

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ: nibble i of a word holds column 8c + order[i]


def _word(nibbles) -> int:
    """8 values 0..15, first in the low nibble → the int32 holding them (two's complement)."""
    v = 0
    for j, nib in enumerate(nibbles):
        assert 0 <= nib <= 15
        v |= int(nib) << (4 * j)
    return v - (1 << 32) if v >= 1 << 31 else v


def _pack_rows(vals: torch.Tensor) -> torch.Tensor:
    """[R, C] → int32 [R / 8, C]: word (r, c) holds rows 8r .. 8r+7 of column c."""
    r, c = vals.shape
    rows = [[_word(vals[8 * i : 8 * i + 8, j].tolist()) for j in range(c)] for i in range(r // 8)]
    return torch.tensor(rows, dtype=torch.int32)


def _pack_cols(vals: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[R, C] → int32 [R, C / 8]: nibble i of word (r, c) holds column 8c + order[i]."""
    r, c = vals.shape
    return torch.tensor(
        [[_word([vals[i, 8 * j + o].item() for o in order]) for j in range(c // 8)] for i in range(r)], dtype=torch.int32
    )


def _g_idx(k, group, act_order, gen):
    if not act_order:
        return torch.arange(k) // group
    perm = torch.randperm(k, generator=gen)  # GPTQ act-order: rows quantized in this order, groups along it
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[perm] = torch.arange(k) // group
    return g_idx


# ---------------------------------------------------------------------------------------------------- GPTQ
def _gptq_checkpoint(k, n, group, *, sym, fmt, act_order, seed=0):
    gen = make_generator(seed)
    gsz = k if group == -1 else group
    q = torch.randint(0, 16, (k, n), generator=gen)
    zero = torch.full((k // gsz, n), 8) if sym else torch.randint(0, 16, (k // gsz, n), generator=gen)
    if not sym:
        zero[0, :3] = torch.tensor([0, 15, 1])  # zero 0: the classic export stores −1 (nibble 15, read back as 16)
    stored = (zero - 1) & 0xF if fmt == "gptq" else zero
    scales = (torch.rand(k // gsz, n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    g_idx = _g_idx(k, gsz, act_order, gen)
    ckpt = dict(qweight=_pack_rows(q), qzeros=_pack_cols(stored), scales=scales, g_idx=g_idx.to(torch.int32))
    # the format's own dequantization: W[n, k] = scales[g_idx[k], n] · (q[k, n] − (stored + 1 | stored))
    z_eff = stored + 1 if fmt == "gptq" else stored
    wt = scales.float()[g_idx] * (q - z_eff[g_idx]).float()  # Wᵀ [K, N]
    return ckpt, wt


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act_order"])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_gptq_repack_matches_format_dequantization(fmt, sym, act_order, group):
    ckpt, wt = _gptq_checkpoint(256, 48, group, sym=sym, fmt=fmt, act_order=act_order, seed=group + 7 * sym)
    w = repack_gptq(**ckpt, sym=sym, checkpoint_format=fmt)
    assert (w.zeros is None) == sym
    assert w.group_size == (256 if group == -1 else group)
    assert (w.perm is not None) == (act_order and group != -1)  # channel-wise: one group, nothing to sort
    if not sym and fmt == "gptq":
        assert w.zeros[0, 0] == 16  # the stored −1 of a zero point 0 reads back as 16, as the format says
    assert torch.equal(w.dequantize(), wt)


def test_gptq_without_g_idx_keeps_qweight_as_is():
    ckpt, wt = _gptq_checkpoint(128, 32, 64, sym=False, fmt="gptq", act_order=False)
    ckpt.pop("g_idx")
    w = repack_gptq(**ckpt, sym=False)
    assert torch.equal(w.qweight, ckpt["qweight"]) and w.perm is None
    assert torch.equal(w.dequantize(), wt)


def test_gptq_sym_without_qzeros():
    ckpt, wt = _gptq_checkpoint(128, 32, 64, sym=True, fmt="gptq", act_order=True)
    w = repack_gptq(ckpt["qweight"], None, ckpt["scales"], ckpt["g_idx"], sym=True)
    assert torch.equal(w.dequantize(), wt)


def test_gptq_errors():
    ckpt, _ = _gptq_checkpoint(128, 32, 64, sym=False, fmt="gptq", act_order=True)
    with pytest.raises(ValueError, match="not all 8"):
        repack_gptq(**ckpt, sym=True)
    with pytest.raises(ValueError, match="needs qzeros"):
        repack_gptq(ckpt["qweight"], None, ckpt["scales"], sym=False)
    with pytest.raises(ValueError, match="checkpoint_format"):
        repack_gptq(**ckpt, sym=False, checkpoint_format="gptq_v3")
    with pytest.raises(ValueError, match="qzeros must have shape"):
        repack_gptq(ckpt["qweight"], ckpt["qzeros"][:, :2], ckpt["scales"], sym=False)
    with pytest.raises(ValueError, match="group size 16"):
        repack_gptq(ckpt["qweight"], None, ckpt["scales"].repeat(4, 1), sym=True)
    with pytest.raises(ValueError, match="scales must have shape"):
        repack_gptq(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"][:, :16], sym=False)
    with pytest.raises(TypeError, match="qweight dtype must be int32"):
        repack_gptq(ckpt["qweight"].long(), ckpt["qzeros"], ckpt["scales"], sym=False)
    bad = ckpt["g_idx"].clone()
    bad[0] = 1 - bad[0]  # one group with 65 rows, the other with 63
    with pytest.raises(ValueError, match="exactly 64 rows"):
        repack_gptq(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"], bad, sym=False)
    with pytest.raises(ValueError, match="g_idx must have shape"):
        repack_gptq(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"], ckpt["g_idx"][:-1], sym=False)


# ----------------------------------------------------------------------------------------------------- AWQ
def _awq_checkpoint(k, n, group, seed=0):
    gen = make_generator(seed)
    gsz = k if group == -1 else group
    q = torch.randint(0, 16, (k, n), generator=gen)
    zero = torch.randint(0, 16, (k // gsz, n), generator=gen)
    scales = (torch.rand(k // gsz, n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    ckpt = dict(qweight=_pack_cols(q, AWQ_PACK_ORDER), qzeros=_pack_cols(zero, AWQ_PACK_ORDER), scales=scales)
    g = torch.arange(k) // gsz
    return ckpt, scales.float()[g] * (q - zero[g]).float()  # W[n, k] = scales[k // g, n] · (q − zero)


@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_awq_repack_matches_format_dequantization(group):
    ckpt, wt = _awq_checkpoint(256, 48, group, seed=group)
    w = repack_awq(**ckpt)
    assert w.qweight.shape == (32, 48) and w.zeros.shape == wt.new_empty(256 // w.group_size, 48).shape
    assert torch.equal(w.dequantize(), wt)


def test_awq_nibble_order_is_not_sequential():
    """A word whose nibble i is i: AWQ puts column order[i] there, so column 1 reads 4 (not 1)."""
    qweight = torch.tensor([[_word(range(8))]] * 32, dtype=torch.int32)  # [K=32, N/8=1]
    w = repack_awq(qweight, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8, dtype=torch.float16))
    assert w.dequantize()[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_awq_errors():
    ckpt, _ = _awq_checkpoint(128, 32, 64)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        repack_awq(ckpt["qweight"], ckpt["qzeros"][:1], ckpt["scales"])
    with pytest.raises(ValueError, match="scales must have shape"):
        repack_awq(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"][:, :8])
    with pytest.raises(ValueError, match="multiple of 8"):
        repack_awq(ckpt["qweight"][:12], ckpt["qzeros"], ckpt["scales"])
    with pytest.raises(TypeError, match="scales dtype"):
        repack_awq(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"].to(torch.int32))


# -------------------------------------------------------------------------------------- compressed-tensors
def _ct_checkpoint(n, k, group, *, sym, act_order, seed=0):
    gen = make_generator(seed)
    gsz = k if group == -1 else group
    q = torch.randint(-8, 8, (n, k), generator=gen)  # signed values, as the quantizer produced them
    zp = torch.zeros(n, k // gsz, dtype=torch.int64) if sym else torch.randint(-8, 8, (n, k // gsz), generator=gen)
    scale = (torch.rand(n, k // gsz, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    g_idx = _g_idx(k, gsz, act_order, gen)
    ckpt = dict(
        weight_packed=_pack_cols(q + 8),  # [N, K/8]: 8 values along K, low nibble first, stored as value + 8
        weight_scale=scale,
        weight_shape=torch.tensor([n, k]),
    )
    if not sym:
        rows = -(-n // 8) * 8
        padded = torch.zeros(rows, k // gsz, dtype=torch.int64)
        padded[:n] = zp + 8  # stored as value + 8, the padding rows stay 0
        ckpt["weight_zero_point"] = _pack_rows(padded)  # [ceil(N/8), K/g]: packed along the output dim
    if act_order:
        ckpt["weight_g_idx"] = g_idx.to(torch.int32)
    # the format's own dequantization: W[n, k] = scale[n, g_idx[k]] · (q[n, k] − zp[n, g_idx[k]])
    w = scale.float()[:, g_idx] * (q - zp[:, g_idx]).float()
    return ckpt, w.t()


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act_order"])
@pytest.mark.parametrize("group,n", [(32, 48), (64, 20), (128, 40), (-1, 24)])
def test_compressed_tensors_repack_matches_format_dequantization(sym, act_order, group, n):
    ckpt, wt = _ct_checkpoint(n, 256, group, sym=sym, act_order=act_order, seed=n)
    w = repack_compressed_tensors(**ckpt)
    assert (w.zeros is None) == sym
    assert torch.equal(w.dequantize(), wt)


def test_compressed_tensors_packer_agrees_with_the_library():
    """Our test packer writes what compressed-tensors itself writes, and the repacked weight dequantizes to what
    the library's own dequantization gives (skipped where the library is not installed)."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    n, k, gsz = 20, 128, 32
    gen = make_generator(3)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    zp = torch.randint(-8, 8, (n, k // gsz), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // gsz, generator=gen) * 0.02 + 1e-3
    packed = ct.pack_to_int32(q, 4)
    packed_zp = ct.pack_to_int32(zp, 4, packed_dim=0)
    assert torch.equal(packed, _pack_cols(q.long() + 8))
    padded = torch.zeros(-(-n // 8) * 8, k // gsz, dtype=torch.int64)
    padded[:n] = zp.long() + 8
    assert torch.equal(packed_zp, _pack_rows(padded))
    w = repack_compressed_tensors(packed, scale, packed_zp, weight_shape=torch.tensor([n, k]))
    theirs = dequantize(q, scale, zp)  # [N, K]
    assert_close(w.dequantize().t(), theirs.float(), atol=1e-6, rtol=1e-6)


def test_compressed_tensors_errors():
    ckpt, _ = _ct_checkpoint(24, 128, 32, sym=False, act_order=False)
    with pytest.raises(ValueError, match="weight_zero_point must have shape"):
        repack_compressed_tensors(ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"][:1])
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        repack_compressed_tensors(ckpt["weight_packed"], ckpt["weight_scale"][:8])
    with pytest.raises(ValueError, match="not a multiple of 8"):
        repack_compressed_tensors(ckpt["weight_packed"], ckpt["weight_scale"], weight_shape=torch.tensor([24, 126]))
    with pytest.raises(ValueError, match="does not match"):
        repack_compressed_tensors(ckpt["weight_packed"], ckpt["weight_scale"], weight_shape=torch.tensor([23, 128]))
    with pytest.raises(ValueError, match="group size 8"):
        repack_compressed_tensors(ckpt["weight_packed"], ckpt["weight_scale"].repeat(1, 4))


# ------------------------------------------------------------------------------------- end to end: the GEMM
@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repacked_weights_run_in_the_gemm(fmt, dtype, device):
    """Act-order checkpoints included: the op reads x[..., perm] inside the kernel."""
    k, n = 256, 48
    if fmt == "gptq":
        ckpt, wt = _gptq_checkpoint(k, n, 64, sym=False, fmt="gptq", act_order=True, seed=1)
        w = repack_gptq(**ckpt, sym=False)
    elif fmt == "awq":
        ckpt, wt = _awq_checkpoint(k, n, 64, seed=1)
        w = repack_awq(**ckpt)
    else:
        ckpt, wt = _ct_checkpoint(n, k, 64, sym=True, act_order=True, seed=1)
        w = repack_compressed_tensors(**ckpt)
    assert w.perm is not None or fmt == "awq"
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    x = randn(5, k, dtype=dtype, device=device, generator=make_generator(2))
    y = w4a16_gemm(x, to(w.qweight), to(w.scales), to(w.zeros), w.group_size, None, to(w.perm))
    assert_close(y, (x.float() @ wt.to(device)).to(dtype), name=fmt)
