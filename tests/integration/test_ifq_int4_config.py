"""``quantization="ifq_int4"``: registration, reading the checkpoint's quantization config, when the method claims
a checkpoint (only when asked), which layers it takes, and the errors for what it cannot read."""
import pickle
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}
AWQ = {"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "GEMM",
       "modules_to_not_convert": None}


def _ct(**weights):
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64, "actorder": None,
         "dynamic": False, **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "quantization_status": "compressed", "kv_cache_scheme": None, "sparsity_config": {},
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None,
                                          "output_activations": None}}}


def test_register_is_idempotent_and_touches_no_cuda():
    code = textwrap.dedent(
        """
        import torch
        import angel_vllm
        angel_vllm.register()
        angel_vllm.register()
        angel_vllm.quant_ifq_int4.register_ifq_int4()  # even past register()'s own guard, a repeat must not raise
        from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
        assert get_quantization_config("ifq_int4") is angel_vllm.quant_ifq_int4.IfqInt4Config
        assert get_quantization_config("ifq") is angel_vllm.quant_ifq.IfqConfig  # registered next to it
        assert QUANTIZATION_METHODS.count("ifq_int4") == 1
        assert WEIGHT_LOADER_V2_SUPPORTED.count("IfqInt4LinearMethod") == 1
        assert not torch.cuda.is_initialized(), "register() initialized CUDA"
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_config_contract():
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    cfg = IfqInt4Config.from_config(GPTQ)
    assert cfg.get_name() == "ifq_int4"
    assert IfqInt4Config.get_config_filenames() == []
    assert cfg.get_supported_act_dtypes() == [torch.float16, torch.bfloat16]
    assert repr(cfg) == "IfqInt4Config(format=gptq, group_size=128, sym=True, act_order=False, checkpoint_format=gptq)"
    restored = pickle.loads(pickle.dumps(cfg))  # vLLM ships the config to worker processes
    assert isinstance(restored, IfqInt4Config) and restored.scheme == cfg.scheme


def test_no_quantization_config_explains_what_to_do():
    # vLLM builds the config with no argument when the checkpoint has no quantization_config
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    with pytest.raises(ValueError, match="no quantization_config.*quantization='ifq'.*export_gptq_checkpoint"):
        IfqInt4Config()


@pytest.mark.parametrize(
    "hf_cfg,user,claimed",
    [
        (GPTQ, "ifq_int4", True),
        (AWQ, "ifq_int4", True),
        (_ct(), "ifq_int4", True),
        ({**GPTQ, "bits": 8}, "ifq_int4", True),  # claimed, so that from_config can say what is wrong
        (GPTQ, None, False),  # not asked: vLLM's own gptq method keeps the checkpoint
        (AWQ, None, False),
        (_ct(), None, False),
        (GPTQ, "gptq", False),
        (GPTQ, "ifq", False),
        ({"quant_method": "fp8"}, "ifq_int4", False),  # not a format we read: vLLM reports the mismatch
    ],
)
def test_override_claims_only_when_asked(hf_cfg, user, claimed):
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    got = IfqInt4Config.override_quantization_method(dict(hf_cfg), user)
    assert got == ("ifq_int4" if claimed else None)


def test_vllm_resolves_the_method_by_the_flag(tmp_path):
    """vLLM's own resolution (ModelConfig._verify_quantization) on a GPTQ config.json, with and without the flag."""
    import json

    from vllm.config import ModelConfig
    from transformers import LlamaConfig

    import angel_vllm

    angel_vllm.register()
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128).to_dict()
    cfg["quantization_config"] = GPTQ
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    def resolved(quantization):
        return ModelConfig(model=str(tmp_path), quantization=quantization, skip_tokenizer_init=True,
                           max_model_len=128, dtype="bfloat16").quantization

    assert resolved("ifq_int4") == "ifq_int4"
    assert resolved(None) == "auto_gptq"  # the plugin does not take GPTQ checkpoints away from vLLM


def test_from_config_reads_each_format():
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    s = IfqInt4Config.from_config({**GPTQ, "group_size": 32, "sym": False, "desc_act": True,
                                   "checkpoint_format": "gptq_v2"}).scheme
    assert (s.fmt, s.group_size, s.sym, s.act_order, s.checkpoint_format) == ("gptq", 32, False, True, "gptq_v2")
    s = IfqInt4Config.from_config({**GPTQ, "group_size": -1, "desc_act": True}).scheme
    assert s.group_size == -1 and not s.act_order  # one group: act-order is a no-op
    s = IfqInt4Config.from_config({k: v for k, v in GPTQ.items() if k != "checkpoint_format"} | {"format": "gptq"}).scheme
    assert s.checkpoint_format == "gptq"  # GPTQModel spells it `format`
    s = IfqInt4Config.from_config(AWQ).scheme
    assert (s.fmt, s.group_size, s.sym, s.act_order) == ("awq", 128, False, False)
    s = IfqInt4Config.from_config({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True}).scheme
    assert s.group_size == 64
    s = IfqInt4Config.from_config(_ct(symmetric=False, actorder="group")).scheme
    assert (s.fmt, s.group_size, s.sym, s.act_order, s.skip) == ("compressed-tensors", 64, False, True, ["lm_head"])
    s = IfqInt4Config.from_config(_ct(strategy="channel", group_size=None, actorder="weight")).scheme
    assert s.group_size == -1 and not s.act_order


@pytest.mark.parametrize(
    "hf_cfg,match",
    [
        ({**GPTQ, "bits": 8}, "8-bit weights; ifq_int4 reads 4-bit checkpoints only"),
        ({**GPTQ, "group_size": 256}, r"group_size=256; supported: \(32, 64, 128\) or -1"),
        ({**GPTQ, "group_size": 16}, "group_size=16"),
        ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
        ({**GPTQ, "dynamic": {"-:.*mlp.*": {}}}, "per-module overrides"),
        ({**GPTQ, "lm_head": True}, "quantized lm_head"),
        ({**GPTQ, "sym": "yes"}, "must be booleans"),
        ({**AWQ, "w_bit": 3}, "3-bit weights"),
        ({**AWQ, "version": "gemv"}, "version='gemv'"),
        ({**AWQ, "zero_point": False}, "zero_point=False"),
        ({**AWQ, "q_group_size": 96}, "group_size=96"),
        (_ct(num_bits=8), "8-bit weights"),
        (_ct(group_size=256), "group_size=256"),
        (_ct(strategy="tensor"), "strategy='tensor'"),
        (_ct(type="float"), "type='float'"),
        (_ct(actorder="dynamic"), "actorder='dynamic'"),
        ({**_ct(), "format": "int-quantized"}, "format='int-quantized'"),
        ({**_ct(), "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
        ({**_ct(), "config_groups": {"a": _ct()["config_groups"]["group_0"], "b": _ct()["config_groups"]["group_0"]}},
         "2 config_groups"),
        ({**_ct(), "config_groups": {"g": {**_ct()["config_groups"]["group_0"],
                                           "input_activations": {"num_bits": 8}}}}, "weight-only"),
        ({"quant_method": "fp8"}, "quant_method 'fp8' is not read"),
    ],
)
def test_unsupported_checkpoints_fail_when_the_config_is_built(hf_cfg, match):
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    with pytest.raises(ValueError, match=match) as e:
        IfqInt4Config.from_config(hf_cfg)
    assert str(e.value).startswith("ifq_int4: ")


def _linear():
    """An unconstructed vLLM linear layer: enough for get_quant_method's type and name checks."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    return RowParallelLinear.__new__(RowParallelLinear)


@pytest.mark.parametrize(
    "hf_cfg,quantized,skipped",
    [
        ({**GPTQ, "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                   ["self_attn.o_proj"]]},
         "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
        ({**AWQ, "modules_to_not_convert": ["mlp"]}, "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj"),
        ({**_ct(), "ignore": ["lm_head", "re:.*down_proj"]}, "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"),
    ],
)
def test_layers_left_unquantized_by_the_checkpoint_load_unquantized(hf_cfg, quantized, skipped):
    from torch import nn
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from angel_vllm.quant_ifq_int4 import IfqInt4Config, IfqInt4LinearMethod

    cfg = IfqInt4Config.from_config(hf_cfg)
    method = cfg.get_quant_method(_linear(), prefix=quantized)
    assert isinstance(method, IfqInt4LinearMethod) and method.prefix == quantized
    assert isinstance(cfg.get_quant_method(_linear(), prefix=skipped), UnquantizedLinearMethod)
    assert cfg.get_quant_method(nn.Embedding(4, 4), prefix="model.embed_tokens") is None  # not a LinearBase


def test_unlisted_unquantized_layers_are_read_from_the_safetensors_headers(tmp_path):
    # as vLLM's own gptq and awq methods: modules holding int32 tensors are the quantized ones
    from safetensors.torch import save_file

    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    save_file({
        "model.embed_tokens.weight": torch.zeros(4, 8, dtype=torch.float16),
        "model.layers.0.self_attn.q_proj.qweight": torch.zeros(1, 8, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.scales": torch.zeros(1, 8, dtype=torch.float16),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(8, 8, dtype=torch.bfloat16),
    }, str(tmp_path / "model.safetensors"))
    gptq = IfqInt4Config.from_config(GPTQ)
    gptq.maybe_update_config(str(tmp_path))
    assert gptq.scheme.only == ["model.layers.0.self_attn.q_proj"]
    down, q = "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"
    assert [type(gptq.get_quant_method(_linear(), p)).__name__ for p in (q, down)] == [
        "IfqInt4LinearMethod", "UnquantizedLinearMethod"]
    awq = IfqInt4Config.from_config(AWQ)
    awq.maybe_update_config(str(tmp_path))
    assert awq.scheme.skip == ["model.embed_tokens", down]
    assert [type(awq.get_quant_method(_linear(), p)).__name__ for p in (q, down)] == [
        "IfqInt4LinearMethod", "UnquantizedLinearMethod"]
    explicit = IfqInt4Config.from_config({**GPTQ, "modules_in_block_to_quantize": ["self_attn.q_proj"]})
    explicit.maybe_update_config(str(tmp_path))
    assert explicit.scheme.only == ["self_attn.q_proj"]  # the checkpoint's own list wins


def test_g_idx_is_kept_only_for_act_order():
    # vLLM's default checkpoint mapper drops `.g_idx`; act-order layers need it
    from angel_vllm.quant_ifq_int4 import IfqInt4Config

    name = "model.layers.0.self_attn.q_proj.g_idx"
    assert IfqInt4Config.from_config({**GPTQ, "desc_act": True}).get_checkpoint_weight_mapper().map_name(name) == name
    assert IfqInt4Config.from_config(GPTQ).get_checkpoint_weight_mapper().map_name(name) is None
