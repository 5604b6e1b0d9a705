"""``ifq`` linear method inside vLLM's linear layers: loading (merged shards included), quantization, forward.

Runs in the test process under a one-rank gloo group (vLLM's parameter classes ask the tensor-parallel rank).
Under the CPU tier's ``TRITON_INTERPRET=1`` the forward runs the Triton w8a16 kernel in the interpreter.
"""
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from angel_kernels import quantize_weight_int8  # noqa: E402


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


def _build(kind, dtype, g):
    """A vLLM linear layer with the ifq method, its shards loaded from fp32 random weights; returns (layer, W, b)."""
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
    )

    from angel_vllm.quant_ifq import IfqConfig, IfqLinearMethod

    K = 96
    common = dict(params_dtype=dtype, quant_config=IfqConfig(), return_bias=False)
    if kind == "replicated":
        layer, shards = ReplicatedLinear(K, 80, bias=True, disable_tp=True, **common), [(None, 80)]
    elif kind == "row":
        layer, shards = RowParallelLinear(K, 48, bias=True, **common), [(None, 48)]
    elif kind == "merged_gate_up":
        layer, shards = MergedColumnParallelLinear(K, [80, 80], bias=False, **common), [(0, 80), (1, 80)]
    else:  # qkv: head_size 16, 4 query heads, 2 KV heads
        layer = QKVParallelLinear(K, 16, 4, 2, bias=True, **common)
        shards = [("q", 64), ("k", 32), ("v", 32)]
    assert isinstance(layer.quant_method, IfqLinearMethod)
    assert layer.weight.dtype == dtype and layer.weight.shape == (sum(n for _, n in shards), K)

    Ws = {sid: torch.randn(n, K, generator=g) * 0.05 for sid, n in shards}
    bs = {sid: torch.randn(n, generator=g) for sid, n in shards}
    # load in reverse shard order: the loader must place each shard by its id, not by arrival
    for sid, _ in reversed(shards):
        args = () if sid is None else (sid,)
        layer.weight_loader(layer.weight, Ws[sid].to(dtype), *args)
        if layer.bias is not None:
            layer.weight_loader(layer.bias, bs[sid].to(dtype), *args)
    W = torch.cat([Ws[sid] for sid, _ in shards]).to(dtype)
    b = torch.cat([bs[sid] for sid, _ in shards]).to(dtype) if layer.bias is not None else None
    return layer, W, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["replicated", "row", "merged_gate_up", "qkv"])
def test_layer_quantizes_after_loading_and_matches_fp_weight(tp1, kind, dtype):
    g = torch.Generator().manual_seed(["replicated", "row", "merged_gate_up", "qkv"].index(kind))
    layer, W, b = _build(kind, dtype, g)
    layer.quant_method.process_weights_after_loading(layer)

    # the weight is now int8 [N, K] + fp32 scales [N], bit-identical to the library's quantizer on the loaded
    # weight (so every shard landed in its rows); no fp16/bf16 copy of the weight is left on the layer
    q_ref, s_ref = quantize_weight_int8(W)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, q_ref)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, s_ref)
    assert {name: p.dtype for name, p in layer.named_parameters() if p.dim() == 2} == {"weight": torch.int8}

    x = torch.randn(5, W.shape[1], generator=g).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (5, W.shape[0]) and torch.isfinite(y).all()

    ref = x.float() @ W.float().T + (b.float() if b is not None else 0)
    # int8 error bound: round-to-nearest moves each weight by at most scale/2 (scale = row absmax / 127), so
    # |Δy[m, n]| <= scale[n] / 2 * sum_k |x[m, k]|; plus the output's own rounding to fp16/bf16 (2^-8 relative
    # for bf16, 2^-11 for fp16, taken as 2^-8 for both) and a small fp32 accumulation slack.
    bound = s_ref[None, :] / 2 * x.float().abs().sum(dim=1, keepdim=True) + ref.abs() * 2.0**-8 + 1e-3
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.4g}, worst excess {(err - bound).max():.4g}"
    # and it is the int8 error, not something larger: ~ the error of the dequantized weight itself
    deq = x.float() @ (q_ref.float() * s_ref[:, None]).T + (b.float() if b is not None else 0)
    assert (y.float() - deq).abs().max() <= (deq.abs().max() * 2.0**-7).item() + 1e-3


def test_process_weights_after_loading_is_idempotent(tp1):
    layer, W, _ = _build("replicated", torch.bfloat16, torch.Generator().manual_seed(0))
    layer.quant_method.process_weights_after_loading(layer)
    q, s = layer.weight.clone(), layer.weight_scale.clone()
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, s)


def test_tile_major_weights_give_the_row_major_forward(tp1, monkeypatch):
    """Where the layer stores its weight tile-major (on CUDA, whole 64 × 128 blocks; forced here on CPU), the
    weight is the quantizer's output in that layout and the forward returns the row-major layer's bits."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from angel_kernels import tile_major_int8
    from angel_kernels.gemm.w8a16 import tile_major_fits
    from angel_vllm import quant_ifq
    from angel_vllm.quant_ifq import IfqConfig

    g = torch.Generator().manual_seed(3)
    W = (torch.randn(128, 256, generator=g) * 0.05).half()
    shipped_policy = quant_ifq._tile_major_for
    layers = []
    for policy in (lambda q: False, lambda q: tile_major_fits(*q.shape)):
        monkeypatch.setattr(quant_ifq, "_tile_major_for", policy)
        layer = ReplicatedLinear(256, 128, bias=False, disable_tp=True, params_dtype=torch.float16,
                                 quant_config=IfqConfig(), return_bias=False)
        layer.weight_loader(layer.weight, W)
        layer.quant_method.process_weights_after_loading(layer)
        layers.append(layer)
    row, tiled = layers
    q_ref, _ = quantize_weight_int8(W)
    assert not row.ifq_tile_major and torch.equal(row.weight, q_ref)
    assert tiled.ifq_tile_major and torch.equal(tiled.weight, tile_major_int8(q_ref))
    x = torch.randn(3, 256, generator=g).half()
    assert torch.equal(tiled(x), row(x))
    # on this CPU the method keeps weights row-major: the reference path would reorder them on every call
    assert not shipped_policy(q_ref)


def test_fragment_major_weights_give_the_reference_forward(tp1, monkeypatch):
    """Where the layer stores its weight fragment-major (sm_90, whole 64 × 128 tiles; forced here on CPU), the
    weight is the quantizer's output in that layout, viewed as int8 [N, K], and the forward is the int8 GEMM's."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from angel_kernels import fragment_major_int8
    from angel_kernels.reference.gemm import w8a16_gemm_ref
    from angel_vllm import quant_ifq
    from angel_vllm.quant_ifq import IfqConfig

    g = torch.Generator().manual_seed(4)
    W = (torch.randn(128, 256, generator=g) * 0.05).half()
    monkeypatch.setattr(quant_ifq, "_layout_for", lambda q: "fragment")
    layer = ReplicatedLinear(256, 128, bias=False, disable_tp=True, params_dtype=torch.float16,
                             quant_config=IfqConfig(), return_bias=False)
    layer.weight_loader(layer.weight, W)
    layer.quant_method.process_weights_after_loading(layer)
    q_ref, s_ref = quantize_weight_int8(W)
    assert layer.ifq_layout == "fragment" and not layer.ifq_tile_major
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (128, 256)
    assert torch.equal(layer.weight.view(torch.int32), fragment_major_int8(q_ref))
    x = torch.randn(3, 256, generator=g).half()
    assert torch.equal(layer(x), w8a16_gemm_ref(x, q_ref, s_ref))
    layer.quant_method.process_weights_after_loading(layer)  # a second call keeps the quantized weight
    assert torch.equal(layer.weight.view(torch.int32), fragment_major_int8(q_ref))


def test_layout_policy(monkeypatch):
    """Fragment-major where the fragment kernel runs (stubbed here) and the shape is whole tiles, unless switched
    off; otherwise tile-major on CUDA, row-major on this CPU."""
    from angel_vllm import quant_ifq

    q = torch.zeros(128, 256, dtype=torch.int8)
    assert quant_ifq._layout_for(q) == "row"  # no sm_90 GPU here
    monkeypatch.setattr(quant_ifq, "fragment_kernel_runs_on", lambda device: (True, ""))
    assert quant_ifq._layout_for(q) == "fragment"
    assert quant_ifq._layout_for(torch.zeros(96, 256, dtype=torch.int8)) == "row"  # not whole 64-row tiles
    assert quant_ifq._layout_for(torch.zeros(128, 200, dtype=torch.int8)) == "row"  # nor 128-column blocks
    monkeypatch.setattr(quant_ifq, "FRAGMENT_ON_HOPPER", False)
    assert quant_ifq._layout_for(q) == "row"
