"""``ifq_int4`` linear method inside vLLM's linear layers: GPTQ / AWQ / compressed-tensors tensors loaded through
vLLM's parameter classes (merged shards, act-order), repacked to our layout, and the tensor-parallel shard
arithmetic: each rank of a TP=2 layer must hold exactly its slice of the TP=1 layer.

Checkpoint tensors are written here from ``quantize_weight_int4`` output in each format's layout (the readers'
own exactness against independently packed words is in tests/quantization/test_checkpoints.py). Runs in the test
process under a one-rank gloo group; TP=2 ranks are built one at a time in this process by giving the linear
layers rank r of 2 (only the weights and the local GEMM are compared, no collective runs). Under the CPU tier's
``TRITON_INTERPRET=1`` the forward runs the Triton w4a16 kernel in the interpreter.
"""
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from angel_kernels import Int4Weight, quantize_weight_int4  # noqa: E402
from angel_kernels.quantization.gptq_export import gptq_v1_tensors  # noqa: E402
from angel_kernels.quantization.int4 import pack_int4_rows  # noqa: E402
from angel_kernels.reference.int4 import unpack_int4_rows  # noqa: E402
from angel_kernels.testing import assert_close  # noqa: E402

K = 128
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ: nibble i of a word holds column 8c + order[i]

# name -> (checkpoint format, symmetric, act-order layout, group size)
#   act-order "halves": a permutation inside each half of K (whole groups on each of 2 row-parallel ranks)
#   act-order "full":   a permutation of all of K (classic desc_act: groups spread over both halves)
SCHEMES = {
    "gptq_sym": ("gptq", True, None, 32),
    "gptq_asym_act_order": ("gptq", False, "halves", 32),
    "gptq_channelwise": ("gptq", True, None, -1),
    "awq": ("awq", False, None, 64),
    "ct_sym_act_order": ("compressed-tensors", True, "halves", 32),
    "ct_asym": ("compressed-tensors", False, None, 64),
}


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment, destroy_model_parallel, init_distributed_environment,
        initialize_model_parallel,
    )

    import angel_vllm

    angel_vllm.register()
    init_file = tmp_path_factory.mktemp("dist") / "init"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=f"file://{init_file}", local_rank=0, backend="gloo"
        )
        initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


@pytest.fixture
def as_rank(monkeypatch):
    """as_rank(r, size): linear layers built afterwards are rank r of a size-way tensor-parallel group."""
    import vllm.model_executor.layers.linear as linear

    def set_rank(rank: int, size: int) -> None:
        monkeypatch.setattr(linear, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(linear, "get_tensor_model_parallel_world_size", lambda: size)

    return set_rank


# ----------------------------------------------------------------------------------- checkpoint tensors
def _pack_cols(vals: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] values 0..15 → int32 [R, C / 8]: nibble i of word c holds column 8c + order[i]."""
    r, c = vals.shape
    v = vals.to(torch.int64).reshape(r, c // 8, 8)
    word = sum(v[:, :, o] << (4 * i) for i, o in enumerate(order))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _act_order_perm(layout, gen):
    if layout == "halves":
        return torch.cat([torch.randperm(K // 2, generator=gen), K // 2 + torch.randperm(K // 2, generator=gen)])
    return torch.randperm(K, generator=gen)


def _quantize(w, g, sym, perm, scale_dtype):
    """w [N, K] → (Int4Weight, q [K, N] in checkpoint row order, g_idx [K] or None, dequantized Wᵀ [K, N]).

    Act-order: groups run along ``perm`` (quantize W[:, perm] sequentially), rows stay in feature order and
    g_idx[perm[j]] = j // g, as a GPTQ desc_act / compressed-tensors actorder="group" checkpoint stores them.
    """
    q = quantize_weight_int4(w if perm is None else w[:, perm], g, sym=sym, scale_dtype=scale_dtype)
    rows = unpack_int4_rows(q.qweight)
    deq = q.dequantize()  # [K, N] in quantized order
    if perm is None:
        return q, rows, None, deq
    rows_ckpt, deq_ckpt = torch.empty_like(rows), torch.empty_like(deq)
    rows_ckpt[perm], deq_ckpt[perm] = rows, deq
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // q.group_size).int()
    return q, rows_ckpt, g_idx, deq_ckpt


def _tensors(fmt, q: Int4Weight, rows, g_idx):
    """One shard's checkpoint tensors in format ``fmt``."""
    n = q.N
    zeros = q.zeros.to(torch.int64) if q.zeros is not None else torch.full(q.scales.shape, 8)
    if fmt == "gptq":
        t = gptq_v1_tensors(Int4Weight(pack_int4_rows(rows), q.scales, q.zeros, q.group_size))
        if g_idx is not None:
            t["g_idx"] = g_idx
        else:
            t.pop("g_idx")  # vLLM drops g_idx without act-order
        return t
    if fmt == "awq":
        return {"qweight": _pack_cols(rows, AWQ_ORDER), "qzeros": _pack_cols(zeros, AWQ_ORDER),
                "scales": q.scales.clone()}
    t = {"weight_packed": pack_int4_rows(rows).t().contiguous(), "weight_scale": q.scales.t().contiguous(),
         "weight_shape": torch.tensor([n, K])}
    if q.zeros is not None:
        t["weight_zero_point"] = pack_int4_rows(zeros.t())  # [N / 8, G]: packed along the output dim
    if g_idx is not None:
        t["weight_g_idx"] = g_idx
    return t


def _config(scheme):
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    fmt, sym, act, g = SCHEMES[scheme]
    if fmt == "gptq":
        cfg = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": act is not None, "sym": sym,
               "checkpoint_format": "gptq"}
    elif fmt == "awq":
        cfg = {"quant_method": "awq", "w_bit": 4, "q_group_size": g, "zero_point": True, "version": "GEMM"}
    else:
        weights = {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group" if g != -1 else "channel",
                   "group_size": g if g != -1 else None, "actorder": "group" if act else None}
        cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}
    return IfqInt4Config.from_config(cfg)


def _shards(kind):
    if kind == "replicated":
        return [(None, 80)]
    if kind == "row":
        return [(None, 48)]
    if kind == "merged_gate_up":
        return [(0, 80), (1, 80)]
    return [("q", 64), ("k", 32), ("v", 32)]  # head_size 16, 4 query heads, 2 KV heads


def _checkpoint(scheme, kind, seed, layout=None):
    """{shard id: (tensors, dequantized Wᵀ [K, N_shard])} plus biases; shards share one act-order permutation."""
    fmt, sym, act, g = SCHEMES[scheme]
    gen = torch.Generator().manual_seed(seed)
    perm = _act_order_perm(layout or act, gen) if act else None
    out = {}
    for sid, n in _shards(kind):
        w = torch.randn(n, K, generator=gen) * 0.05
        # GPTQ and AWQ store fp16 scales; llm-compressor writes them in the model dtype (bf16 here)
        q, rows, g_idx, deq = _quantize(w, g, sym, perm, torch.bfloat16 if fmt == "compressed-tensors" else torch.float16)
        out[sid] = (_tensors(fmt, q, rows, g_idx), deq, torch.randn(n, generator=gen))
    return out


def _build(kind, scheme, dtype, bias):
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
    )

    common = dict(params_dtype=dtype, quant_config=_config(scheme), return_bias=False)
    if kind == "replicated":
        return ReplicatedLinear(K, 80, bias=bias, disable_tp=True, **common)
    if kind == "row":
        return RowParallelLinear(K, 48, bias=bias, **common)
    if kind == "merged_gate_up":
        return MergedColumnParallelLinear(K, [80, 80], bias=bias, **common)
    return QKVParallelLinear(K, 16, 4, 2, bias=bias, **common)


def _load(layer, ckpt, dtype):
    """Every shard's tensors through the parameters' own weight loaders, in reverse shard order (a loader must
    place a shard by its id, not by arrival), as vLLM's model loader calls them."""
    for sid, (tensors, _, b) in reversed(list(ckpt.items())):
        args = () if sid is None else (sid,)
        for name, t in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, t, *args)
        if layer.bias is not None:
            layer.weight_loader(layer.bias, b.to(dtype), *args)


def _layer_weight(layer) -> Int4Weight:
    return Int4Weight(layer.int4_qweight, layer.int4_scales, layer.int4_zeros, layer.int4_group_size, layer.int4_perm)


# ------------------------------------------------------------------------------------------------ TP = 1
# bf16 for every layer kind, fp16 on the merged ones (keeps the number of interpreted kernel runs down)
KIND_DTYPES = [(k, torch.bfloat16) for k in ("replicated", "row", "merged_gate_up", "qkv")] + [
    (k, torch.float16) for k in ("merged_gate_up", "qkv")]


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("kind,dtype", KIND_DTYPES, ids=[f"{k}-{str(d)[6:]}" for k, d in KIND_DTYPES])
def test_layer_loads_repacks_and_matches_the_checkpoint(tp1, kind, dtype, scheme):
    from angel_vllm.quant_ifq_int4 import IfqInt4LinearMethod

    seed = list(SCHEMES).index(scheme) * 10 + ["replicated", "row", "merged_gate_up", "qkv"].index(kind)
    ckpt = _checkpoint(scheme, kind, seed)
    layer = _build(kind, scheme, dtype, bias=kind in ("replicated", "qkv"))
    assert isinstance(layer.quant_method, IfqInt4LinearMethod)
    _load(layer, ckpt, dtype)
    layer.quant_method.process_weights_after_loading(layer)

    fmt, sym, act, g = SCHEMES[scheme]
    w = _layer_weight(layer)
    want = torch.cat([deq for _, deq, _ in ckpt.values()], dim=1)  # Wᵀ [K, N] as the format dequantizes it
    # exact: every shard landed in its columns, every scale group and zero point with its rows
    assert torch.equal(w.dequantize(), want)
    assert (w.zeros is None) == sym and (w.perm is not None) == (act is not None)
    assert w.group_size == (K if g == -1 else g)
    # the checkpoint tensors are gone; scales kept in the first of fp16 / bf16 that holds them exactly: fp16 for
    # all of these (bf16 scales of this magnitude, 8-bit significands, are fp16 values too)
    params = {name: p.dtype for name, p in layer.named_parameters() if name != "bias"}
    expect = {"int4_qweight": torch.int32, "int4_scales": torch.float16}
    if not sym:
        expect["int4_zeros"] = torch.uint8
    if act:
        expect["int4_perm"] = torch.int32
    assert params == expect

    x = (torch.randn(5, K, generator=torch.Generator().manual_seed(seed)) * 0.5).to(dtype)
    y = layer(x)
    ref = x.float() @ want
    if layer.bias is not None:
        ref = ref + torch.cat([b for _, _, b in ckpt.values()]).to(dtype).float()
    assert y.dtype == dtype and y.shape == (5, want.shape[1])
    assert_close(y, ref, name=f"{kind}/{scheme}")


def test_process_weights_after_loading_is_idempotent(tp1):
    layer = _build("qkv", "gptq_asym_act_order", torch.bfloat16, bias=False)
    _load(layer, _checkpoint("gptq_asym_act_order", "qkv", 0), torch.bfloat16)
    layer.quant_method.process_weights_after_loading(layer)
    before = {n: p.clone() for n, p in layer.named_parameters()}
    layer.quant_method.process_weights_after_loading(layer)
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


# ------------------------------------------------------------------------------------------------ TP = 2
def _tp_pair(as_rank, kind, scheme, ckpt):
    """The TP=1 layer and both ranks of the TP=2 layer, each loaded from the same full checkpoint tensors."""
    dtype = torch.bfloat16
    layers = []
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        as_rank(rank, size)
        layer = _build(kind, scheme, dtype, bias=False)
        assert layer.tp_size == size and layer.tp_rank == rank
        _load(layer, ckpt, dtype)
        layer.quant_method.process_weights_after_loading(layer)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("scheme", ["gptq_sym", "gptq_asym_act_order", "gptq_channelwise", "awq", "ct_sym_act_order",
                                    "ct_asym"])
def test_row_parallel_ranks_hold_their_k_slice_and_its_groups(tp1, as_rank, scheme):
    """K = 128 split in two: each rank owns rows [64 r, 64 r + 64) and their scale groups (32: 2 of 4 groups,
    64: 1 of 2; channel-wise: the one scale row, replicated; act-order: whole groups permuted inside each half,
    renumbered per rank). The partial products of the two ranks add up to the TP=1 output."""
    ckpt = _checkpoint(scheme, "row", 100 + list(SCHEMES).index(scheme))
    full, r0, r1 = _tp_pair(as_rank, "row", scheme, ckpt)
    w_full = _layer_weight(full).dequantize()
    for r, layer in enumerate((r0, r1)):
        assert layer.input_size_per_partition == K // 2
        w = _layer_weight(layer)
        assert w.K == K // 2 and w.N == 48
        assert torch.equal(w.dequantize(), w_full[r * K // 2 : (r + 1) * K // 2]), f"rank {r}"
        g = SCHEMES[scheme][3]
        assert w.group_size == (K // 2 if g == -1 else g)
    if SCHEMES[scheme][2] is None:  # sequential groups: the rank's rows of the TP=1 tensors, bit for bit
        assert torch.equal(r1.int4_qweight, full.int4_qweight[K // 16 :])
        if SCHEMES[scheme][3] != -1:
            assert torch.equal(r1.int4_scales, full.int4_scales[full.int4_scales.shape[0] // 2 :])

    x = (torch.randn(3, K, generator=torch.Generator().manual_seed(7)) * 0.5).to(torch.bfloat16)
    parts = [layer.quant_method.apply(layer, x[:, r * K // 2 : (r + 1) * K // 2]) for r, layer in enumerate((r0, r1))]
    assert_close(parts[0].float() + parts[1].float(), full.quant_method.apply(full, x).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["merged_gate_up", "qkv"])
@pytest.mark.parametrize("scheme", ["gptq_asym_act_order", "awq", "ct_asym"])
def test_column_parallel_ranks_hold_their_n_slice_of_each_shard(tp1, as_rank, kind, scheme):
    """N split per shard: rank r holds columns [r n/2, (r + 1) n/2) of gate and of up (q, k and v: one of two
    KV heads and two of four query heads each), packed zero points included (8 columns per int32)."""
    ckpt = _checkpoint(scheme, kind, 200 + list(SCHEMES).index(scheme))
    full, r0, r1 = _tp_pair(as_rank, kind, scheme, ckpt)
    sizes = [n for _, n in _shards(kind)]
    w_full = _layer_weight(full).dequantize()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for r, layer in enumerate((r0, r1)):
        cols = torch.cat([torch.arange(s + r * n // 2, s + (r + 1) * n // 2) for s, n in zip(starts, sizes)])
        w = _layer_weight(layer)
        assert w.K == K and w.N == sum(sizes) // 2
        assert torch.equal(w.dequantize(), w_full[:, cols]), f"rank {r}"
        x = (torch.randn(3, K, generator=torch.Generator().manual_seed(r)) * 0.5).to(torch.bfloat16)
        assert_close(layer.quant_method.apply(layer, x), full.quant_method.apply(full, x)[:, cols], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- errors
def test_act_order_spread_over_ranks_is_refused(tp1, as_rank):
    # classic desc_act: a permutation of all of K puts pieces of every group on both ranks
    ckpt = _checkpoint("gptq_asym_act_order", "row", 3, layout="full")
    as_rank(1, 2)
    layer = _build("row", "gptq_asym_act_order", torch.bfloat16, bias=False)
    _load(layer, ckpt, torch.bfloat16)
    with pytest.raises(ValueError, match="not whole groups.*tensor_parallel_size=1"):
        layer.quant_method.process_weights_after_loading(layer)
    as_rank(0, 1)  # the same checkpoint at TP=1 is fine
    layer = _build("row", "gptq_asym_act_order", torch.bfloat16, bias=False)
    _load(layer, ckpt, torch.bfloat16)
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(_layer_weight(layer).dequantize(), ckpt[None][1])


def test_merged_shards_with_different_g_idx_are_refused(tp1):
    ckpt = _checkpoint("gptq_asym_act_order", "merged_gate_up", 4)
    other = _checkpoint("gptq_asym_act_order", "merged_gate_up", 5)
    ckpt[1] = other[1]  # up_proj from another permutation
    layer = _build("merged_gate_up", "gptq_asym_act_order", torch.bfloat16, bias=False)
    with pytest.raises(ValueError, match="different act-order g_idx"):
        _load(layer, ckpt, torch.bfloat16)


def test_missing_g_idx_is_refused(tp1):
    ckpt = _checkpoint("ct_sym_act_order", "row", 6)
    ckpt[None][0].pop("weight_g_idx")
    layer = _build("row", "ct_sym_act_order", torch.bfloat16, bias=False)
    _load(layer, ckpt, torch.bfloat16)
    with pytest.raises(ValueError, match="without a weight_g_idx"):
        layer.quant_method.process_weights_after_loading(layer)


def test_shapes_the_layout_cannot_hold_are_refused_at_construction(tp1, as_rank):
    from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear

    cfg = _config("gptq_sym")
    with pytest.raises(ValueError, match=r"output shards \[20\] per rank must be multiples of 8"):
        ReplicatedLinear(K, 20, bias=False, params_dtype=torch.bfloat16, quant_config=cfg, disable_tp=True)
    with pytest.raises(ValueError, match="100 input features per rank is not a multiple of 8"):
        ReplicatedLinear(100, 32, bias=False, params_dtype=torch.bfloat16, quant_config=cfg, disable_tp=True)
    with pytest.raises(ValueError, match="96 input features per rank .* not a multiple of group_size=64"):
        ReplicatedLinear(96, 32, bias=False, params_dtype=torch.bfloat16, quant_config=_config("awq"),
                         disable_tp=True)
    as_rank(0, 2)  # K = 128 over 2 ranks: 64 rows each, half a group of 128
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    g128 = IfqInt4Config.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                      "sym": True})
    with pytest.raises(ValueError, match="64 input features per rank .K=128. is not a multiple of group_size=128"):
        RowParallelLinear(K, 32, bias=False, params_dtype=torch.bfloat16, quant_config=g128)


def test_fragment_major_only_for_layers_the_hopper_kernel_serves(monkeypatch):
    """Which repacked layers are stored fragment-major, with the GPU check answered yes (this machine has none)."""
    from angel_vllm import quant_ifq_int4 as mod

    monkeypatch.setattr(mod, "fragment_kernel_runs_on", lambda device: (True, ""))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * 0.05

    def q(group=128, sym=True, n=128):
        return quantize_weight_int4(w[:n], group, sym=sym)

    assert mod._fragment_for(q())
    assert not mod._fragment_for(q(group=64))  # the layout serves group 128 only
    assert not mod._fragment_for(q(sym=False))  # zero points
    assert not mod._fragment_for(q(n=96))  # not whole 64-row tiles
    perm = q()
    assert not mod._fragment_for(Int4Weight(perm.qweight, perm.scales, None, 128, torch.arange(256, dtype=torch.int32)))
    monkeypatch.setattr(mod, "FRAGMENT_ON_HOPPER", False)
    assert not mod._fragment_for(q())
