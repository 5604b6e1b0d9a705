"""The int8 KV attention backend piece by piece: cache page, kernel block sizes, configuration checks, registration,
and the impl's cache write + attention on the int8 cache pages against the pure-torch references, for CPU_ATTN's impl
and for the CUDA backend's (CUSTOM: its metadata builder and impl, driven with CPU tensors).

In the CPU tier (``TRITON_INTERPRET=1``) the impl runs our Triton kernels under the interpreter.
"""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from angel_kernels.attention import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS  # noqa: E402
from angel_kernels.reference.attention import paged_varlen_attention_ref, write_kv_cache_ref  # noqa: E402

INT8 = "int8_per_token_head"


def _spec(dtype, quant_mode_name, block_size=32, head_size=64, num_kv_heads=2):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    return FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
                             kv_quant_mode=KVQuantMode[quant_mode_name])


def test_int8_page_size_is_vllms_and_other_dtypes_are_untouched():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from angel_vllm.attention_backend import AngelCPUAttentionBackend, AngelTritonAttentionBackend

    int8 = _spec(torch.int8, "INT8_PER_TOKEN_HEAD")
    for backend in (AngelCPUAttentionBackend, AngelTritonAttentionBackend):
        page = backend.customize_spec(int8).page_size_bytes
        # per (KV head, slot): K 64 B, V 64 B and an fp32 scale each: the page size of vLLM's Triton backend
        assert page == 2 * 32 * 2 * (64 + 4) == TritonAttentionBackend.customize_spec(int8).page_size_bytes
        assert backend.get_supported_kernel_block_sizes(int8) == list(SUPPORTED_BLOCK_SIZES)
    bf16 = _spec(torch.bfloat16, "NONE")
    assert AngelCPUAttentionBackend.customize_spec(bf16) == CPUAttentionBackend.customize_spec(bf16)
    assert (AngelCPUAttentionBackend.get_supported_kernel_block_sizes(bf16)
            == CPUAttentionBackend.get_supported_kernel_block_sizes(bf16))
    assert (AngelTritonAttentionBackend.get_supported_kernel_block_sizes(bf16)
            == TritonAttentionBackend.get_supported_kernel_block_sizes(bf16))
    assert AngelCPUAttentionBackend.get_name() == "CPU_ATTN"  # vLLM looks the layer's backend up by this name
    assert INT8 in AngelCPUAttentionBackend.supported_kv_cache_dtypes
    assert INT8 not in CPUAttentionBackend.supported_kv_cache_dtypes  # the stock list is not mutated


def test_validate_configuration_names_what_int8_cannot_serve():
    from vllm.platforms.interface import DeviceCapability

    from angel_vllm.attention_backend import AngelTritonAttentionBackend, int8_kv_config_problems

    assert int8_kv_config_problems(64, torch.bfloat16, 16) == []
    assert int8_kv_config_problems(None, None, None) == []
    assert int8_kv_config_problems(96, torch.float32, 48) == [
        f"head size 96 (supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})",
        "model dtype float32 (supported: float16, bfloat16)",
        f"block size 48 (supported: {', '.join(map(str, SUPPORTED_BLOCK_SIZES))})",
    ]

    def reasons(head_size, kv, block_size=None, dtype=torch.float16):
        return AngelTritonAttentionBackend.validate_configuration(
            head_size=head_size, dtype=dtype, kv_cache_dtype=kv, block_size=block_size, use_mla=False,
            has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
            device_capability=DeviceCapability(9, 0), attn_type="decoder",
        )

    assert reasons(128, INT8) == [] and reasons(128, INT8, 64) == []
    assert reasons(96, INT8) == [f"{INT8}: unsupported head size 96 (supported: 64, 128, 256)"]
    assert reasons(128, INT8, 48) == [f"{INT8}: unsupported block size 48 (supported: 16, 32, 64, 128)"]
    assert reasons(96, "auto") == [] and reasons(96, "fp8") == []  # vLLM's Triton kernels serve those


def test_register_is_idempotent_keeps_a_foreign_custom_backend_and_touches_no_cuda():
    code = textwrap.dedent(
        """
        import torch
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
        from angel_vllm.attention_backend import register_int8_kv_backend
        register_int8_kv_backend()
        register_int8_kv_backend()
        assert AttentionBackendEnum.CPU_ATTN.get_path() == "angel_vllm.attention_backend.AngelCPUAttentionBackend"
        assert AttentionBackendEnum.CUSTOM.get_path() == "angel_vllm.attention_backend.AngelTritonAttentionBackend"
        assert AttentionBackendEnum.CPU_ATTN.get_class().get_impl_cls().__name__ == "AngelCPUAttentionImpl"
        # someone else's CUSTOM backend stays
        register_backend(AttentionBackendEnum.CUSTOM, "elsewhere.Backend")
        register_int8_kv_backend()
        assert AttentionBackendEnum.CUSTOM.get_path() == "elsewhere.Backend"
        assert not torch.cuda.is_initialized(), "registration initialized CUDA"
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


# ------------------------------------------------------------------------------------------------ the impl itself
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("int8kv_config")
    LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64).save_pretrained(path)
    return str(path)


def _impl(model_dir, kv_cache_dtype=INT8, head_size=64, model_dtype="bfloat16", block_size=16, impl="cpu", **kw):
    """The CPU impl, or (impl="cuda") the CUDA one, which needs no GPU to be built and driven with CPU tensors."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config

    from angel_vllm.attention_backend import AngelCPUAttentionImpl, AngelTritonAttentionImpl

    config = VllmConfig(
        model_config=ModelConfig(model=model_dir, dtype=model_dtype, skip_tokenizer_init=True),
        cache_config=CacheConfig(cache_dtype=kv_cache_dtype, block_size=block_size),
    )
    args = dict(num_heads=4, head_size=head_size, scale=head_size ** -0.5, num_kv_heads=2, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype=kv_cache_dtype)
    args.update(kw)
    with set_current_vllm_config(config):
        return (AngelTritonAttentionImpl if impl == "cuda" else AngelCPUAttentionImpl)(**args)


def _metadata(impl, model_dir, *, block_size, **fields):
    """vLLM's metadata of the impl's backend: CPU_ATTN's, or what CUSTOM's builder (the CUDA backend's, built
    here on the CPU) makes from vLLM's common metadata."""
    if impl != "cuda":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

        return CPUAttentionMetadata(**fields, scheduler_metadata=None)
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.utils import CommonAttentionMetadata

    from angel_vllm.attention_backend import AngelTritonAttentionBackend, AngelTritonMetadataBuilder

    config = VllmConfig(model_config=ModelConfig(model=model_dir, dtype="bfloat16", skip_tokenizer_init=True),
                        cache_config=CacheConfig(cache_dtype=INT8, block_size=block_size))
    spec = AngelTritonAttentionBackend.customize_spec(_spec(torch.int8, "INT8_PER_TOKEN_HEAD", block_size))
    # a CUDA graph would freeze the host-side choice between the decode and the varlen kernel
    assert (AngelTritonMetadataBuilder.get_cudagraph_support(config, spec)
            == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    with set_current_vllm_config(config):
        builder = AngelTritonMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], config, torch.device("cpu"))
    qsl = fields["query_start_loc"]
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=fields["seq_lens"], num_reqs=qsl.shape[0] - 1,
        num_actual_tokens=fields["num_actual_tokens"], max_query_len=fields["max_query_len"],
        max_seq_len=fields["max_seq_len"], block_table_tensor=fields["block_table"],
        slot_mapping=fields["slot_mapping"])
    return builder.build(0, common)


@pytest.mark.parametrize("impl_kind", ["cpu", "cuda"])
@pytest.mark.parametrize("window,cap", [(None, None), (9, 30.0)])
def test_impl_writes_the_cache_pages_and_attends_like_the_references(model_dir, window, cap, impl_kind):
    """A mixed batch on vLLM's cache tensor (logical [blocks, heads, slots, 2·(D+4)] as vLLM's CPU layout, each
    block's bytes arranged by int8_page_views):
    seq 0 has 21 cached tokens and 5 new ones (a prefix hit or a later chunk), seq 1 decodes at position 34,
    seq 2 is a fresh 7-token prefill. Both impls: CPU_ATTN's and CUSTOM's (the CUDA backend's glue on vLLM's
    Triton metadata, driven with CPU tensors)."""
    from angel_kernels import int8_page_views

    impl = _impl(model_dir, sliding_window=window, logits_soft_cap=cap, impl=impl_kind)
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, bs, nb = 4, 2, 64, 16, 10
    ctx, new = [21, 34, 0], [5, 1, 7]
    lens = [c + n for c, n in zip(ctx, new)]
    table = torch.tensor([[3, 7, 0], [1, 8, 5], [9, 2, 4]], dtype=torch.int32)
    kv_cache = torch.zeros(nb, Hkv, bs, 2 * (D + 4), dtype=torch.int8)
    key = torch.randn(sum(lens), Hkv, D, generator=g).to(torch.bfloat16) * 3
    value = torch.randn(sum(lens), Hkv, D, generator=g).to(torch.bfloat16)
    query = torch.randn(sum(new), Hq, D, generator=g).to(torch.bfloat16)

    def slots(b, positions):
        return torch.tensor([int(table[b, p // bs]) * bs + p % bs for p in positions], dtype=torch.int64)

    starts = [0, lens[0], lens[0] + lens[1]]
    old_rows = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, ctx)])
    new_rows = torch.cat([torch.arange(s + c, s + c + n) for s, c, n in zip(starts, ctx, new)])
    old_slots = torch.cat([slots(b, range(ctx[b])) for b in range(3)])
    new_slots = torch.cat([slots(b, range(ctx[b], lens[b])) for b in range(3)])
    impl.do_kv_cache_update(None, key[old_rows], value[old_rows], kv_cache, old_slots)  # an earlier step
    impl.do_kv_cache_update(None, key[new_rows], value[new_rows], kv_cache, new_slots)

    qsl = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    meta = _metadata(impl_kind, model_dir, block_size=bs, num_actual_tokens=13, max_query_len=7,
                     query_start_loc=qsl, max_seq_len=max(lens), seq_lens=torch.tensor(lens, dtype=torch.int32),
                     block_table=table, slot_mapping=new_slots)
    output = torch.full((sum(new), Hq, D), float("nan"), dtype=torch.bfloat16)
    impl.forward(None, query, None, None, kv_cache, meta, output)

    # the reference: the same tokens written into plain caches, then varlen attention over them
    kc = torch.zeros(nb, bs, Hkv, D, dtype=torch.int8)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(nb, bs, Hkv)
    vs = torch.zeros_like(ks)
    all_slots = torch.cat([slots(b, range(lens[b])) for b in range(3)])
    all_rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    write_kv_cache_ref(key[all_rows], value[all_rows], kc, vc, all_slots, ks, vs)
    views = int8_page_views(kv_cache.view(nb, -1), bs, Hkv, D)
    used = all_slots // bs, all_slots % bs
    for mine, ref in zip(views, (kc, vc, ks, vs)):  # the write is bit-exact with the reference quantizer
        assert torch.equal(mine[used], ref[used])

    expected = paged_varlen_attention_ref(query, kc, vc, table, meta.seq_lens, qsl, ks, vs, scale=D ** -0.5,
                                          sliding_window=window, soft_cap=cap)
    assert not output.isnan().any()
    torch.testing.assert_close(output.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl_kind", ["cpu", "cuda"])
def test_impl_for_other_dtypes_is_vllms(model_dir, impl_kind):
    impl = _impl(model_dir, kv_cache_dtype="auto", impl=impl_kind)
    assert impl._angel is None  # forward and do_kv_cache_update go straight to vLLM's impl


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"head_size": 96}, "head size 96 (supported: 64, 128, 256)"),
        ({"model_dtype": "float32"}, "model dtype float32 (supported: float16, bfloat16)"),
        ({"block_size": 48}, "block size 48 (supported: 16, 32, 64, 128)"),
        ({"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]}, "does not support ALiBi"),
        ({"sinks": torch.zeros(4)}, "does not support attention sinks"),
        ({"attn_type": "encoder_only"}, "does not support encoder_only attention"),
    ],
)
def test_impl_refuses_what_the_kernels_cannot_serve(model_dir, kw, message):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8_per_token_head'") as err:
        _impl(model_dir, **kw)
    assert message in str(err.value)
