"""The head-major int8 page layout (``int8_page_views``): disjoint aligned regions covering the page exactly, and
the write + decode + prefill kernels on it give the same bits as on separate plain tensors."""
import pytest
import torch

from angel_kernels.attention import (int8_page_bytes, int8_page_views, paged_attention, paged_decode_attention,
                                     write_kv_cache)
from angel_kernels.testing import make_generator, randn

from attention_cases import shuffled_block_table, slot_mapping_for


def test_regions_cover_the_page_once():
    nb, bs, h, d = 3, 16, 2, 64
    pages = torch.zeros(nb, int8_page_bytes(bs, h, d), dtype=torch.int8)
    kc, vc, ks, vs = int8_page_views(pages, bs, h, d)
    assert kc.shape == vc.shape == (nb, bs, h, d) and ks.shape == vs.shape == (nb, bs, h)
    kc.fill_(1)
    vc.fill_(2)
    ks.fill_(3.0)
    vs.fill_(4.0)
    raw = pages.view(torch.uint8).to(torch.int32)
    # every byte written exactly once: K and V bytes hold 1 and 2; the scale bytes are those of 3.0 and 4.0
    assert (raw[:, : bs * h * d] == 1).all() and (raw[:, bs * h * d : 2 * bs * h * d] == 2).all()
    scales = pages[:, 2 * bs * h * d :].contiguous().view(torch.float32)
    assert (scales[:, : bs * h] == 3.0).all() and (scales[:, bs * h :] == 4.0).all()
    # head-major: a KV head's rows of one block are contiguous
    assert kc.stride() == (pages.stride(0), d, bs * d, 1) and ks.stride()[1:] == (1, bs)


@pytest.mark.parametrize(
    "shape,match",
    [((3, 100), "bytes per block"), ((3, int8_page_bytes(16, 2, 64) * 2), "bytes per block")],
)
def test_bad_pages(shape, match):
    with pytest.raises(ValueError, match=match):
        int8_page_views(torch.zeros(shape, dtype=torch.int8), 16, 2, 64)
    with pytest.raises(ValueError, match="contiguous within a block"):
        int8_page_views(torch.zeros(int8_page_bytes(16, 2, 64), 3, dtype=torch.int8).t(), 16, 2, 64)


def test_kernels_on_pages_match_plain_tensors(device):
    g = make_generator(4)
    bs, hkv, hq, d = 16, 2, 4, 64
    lens, q_lens = [40, 17], [9, 1]
    table, nb = shuffled_block_table(lens, bs, g)
    table = table.clamp(max=nb - 1)  # this test reads only the used columns; keep ids valid for both layouts
    slots = slot_mapping_for(table, lens, bs).to(device)
    key = randn(sum(lens), hkv, d, dtype=torch.float16, generator=g).to(device)
    value = randn(sum(lens), hkv, d, dtype=torch.float16, generator=g).to(device)
    pages = torch.zeros(nb, int8_page_bytes(bs, hkv, d), dtype=torch.int8, device=device)
    paged = int8_page_views(pages, bs, hkv, d)
    plain = (torch.zeros(nb, bs, hkv, d, dtype=torch.int8, device=device),
             torch.zeros(nb, bs, hkv, d, dtype=torch.int8, device=device),
             torch.zeros(nb, bs, hkv, device=device), torch.zeros(nb, bs, hkv, device=device))
    for kc, vc, ks, vs in (paged, plain):
        write_kv_cache(key, value, kc, vc, slots, ks, vs)
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
    table, seq = table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(len(lens), hq, d, dtype=torch.float16, generator=g).to(device)
    outs = [paged_decode_attention(q, kc, vc, table, seq, ks, vs, scale=d ** -0.5) for kc, vc, ks, vs in (paged, plain)]
    assert torch.equal(*outs)
    qv = randn(sum(q_lens), hq, d, dtype=torch.float16, generator=g).to(device)
    qsl = torch.tensor([0, 9, 10], dtype=torch.int32, device=device)
    outs = [paged_attention(qv, kc, vc, table, seq, qsl, ks, vs, scale=d ** -0.5, max_query_len=9)
            for kc, vc, ks, vs in (paged, plain)]
    assert torch.equal(*outs)
