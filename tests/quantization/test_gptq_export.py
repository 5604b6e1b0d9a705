"""``export_gptq_checkpoint``: an fp Llama-style checkpoint → GPTQ v1 4-bit tensors that our GPTQ reader turns back
into exactly what the int4 quantizer produced; everything else copied bit for bit; bad group sizes refused early."""
import json

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from angel_kernels import quantize_weight_int4, repack_gptq  # noqa: E402
from angel_kernels.quantization import export_gptq_checkpoint  # noqa: E402
from angel_kernels.reference.int4 import unpack_int4_rows  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _make_checkpoint(path, *, hidden=128, inter=256, kv=64, layers=2, vocab=64, dtype=torch.bfloat16, shards=1,
                     seed=0):
    """A Llama-shaped HF folder: config.json, safetensors (optionally sharded with an index), tokenizer files."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
               "model.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
               "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        tensors[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        for name, shape in shapes.items():
            tensors[f"{p}.{name}.weight"] = torch.randn(shape, generator=g) * 0.02
    # one group (rows 0..2 of layer 0's q_proj, first 32 inputs) with only non-negative weights: the asymmetric
    # quantizer gives it zero point 0, which GPTQ v1 cannot store (see gptq_export)
    tensors["model.layers.0.self_attn.q_proj.weight"][:3, :32].abs_()
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(path / fname))
            weight_map.update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 32,
              "num_key_value_heads": kv // 32, "vocab_size": vocab, "torch_dtype": str(dtype).split(".")[1]}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "tokenizer_config.json").write_text("{}")
    return tensors, config


def _load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("group_size,symmetric", [(64, True), (32, False), (128, True), (-1, False)])
def test_export_round_trips_through_the_gptq_reader(tmp_path, group_size, symmetric):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors, config = _make_checkpoint(src)
    assert export_gptq_checkpoint(src, dst, group_size=group_size, symmetric=symmetric) == dst

    out_config = json.loads((dst / "config.json").read_text())
    assert out_config.pop("quantization_config") == {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": symmetric,
        "checkpoint_format": "gptq",
    }
    assert out_config == config
    assert (dst / "tokenizer.json").read_text() == '{"version": "1.0"}' and (dst / "tokenizer_config.json").exists()

    out = _load_dir(dst)
    quantized = {f"model.layers.{i}.{name}" for i in range(2) for name in LINEARS}
    expected_names = {n for n in tensors if n.removesuffix(".weight") not in quantized}
    expected_names |= {f"{m}.{s}" for m in quantized for s in ("qweight", "qzeros", "scales", "g_idx")}
    assert set(out) == expected_names
    for name in tensors:  # embeddings, norms, lm_head: bit for bit, same dtype
        if name in out:
            assert out[name].dtype == tensors[name].dtype and torch.equal(out[name], tensors[name]), name

    z0_groups = 0
    for module in sorted(quantized):
        w = tensors[f"{module}.weight"]
        n, k = w.shape
        g = k if group_size == -1 else group_size
        qweight, qzeros, scales, g_idx = (out[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx"))
        assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (k // 8, n))
        assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (k // g, n // 8))
        assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (k // g, n))
        assert g_idx.dtype == torch.int32 and torch.equal(g_idx, (torch.arange(k) // g).int())

        got = repack_gptq(qweight, qzeros, scales, g_idx, sym=symmetric, checkpoint_format="gptq")
        want = quantize_weight_int4(w, group_size, sym=symmetric, scale_dtype=torch.float16)
        assert got.group_size == g and got.perm is None
        if symmetric:
            # v1 stores zero − 1 = 7 in every nibble: 0x77777777 per word
            assert (qzeros == 0x77777777).all()
            assert got.zeros is None
            assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
            continue
        # asymmetric: identical to the quantizer, except groups with zero point 0 (all weights >= 0), which v1
        # cannot store: those get zero point 1 and scale max / 14
        z0 = want.zeros == 0
        z0_groups += int(z0.sum())
        keep_rows = (~z0).repeat_interleave(g, dim=0)
        assert torch.equal(got.zeros[~z0], want.zeros[~z0]) and torch.equal(got.scales[~z0], want.scales[~z0])
        assert torch.equal(unpack_int4_rows(got.qweight)[keep_rows], unpack_int4_rows(want.qweight)[keep_rows])
        assert (got.zeros[z0] == 1).all()
        gmax = w.float().t().reshape(k // g, g, n).amax(dim=1)
        assert torch.equal(got.scales[z0], (gmax / 14).to(torch.float16)[z0])
        # round to nearest on the stored grid: every weight within half a step of its dequantized value, plus
        # what rounding the scale to fp16 (2^-11 relative) moves the grid over its 16 steps: 16 · 2^-11 < 2^-7
        step = got.scales.float().repeat_interleave(g, dim=0)
        err = (got.dequantize() - w.float().t()).abs()
        assert (err <= step * (0.5 + 2**-7) + 1e-7).all(), f"{module}: worst {(err / step).max()} steps"
    if not symmetric and group_size == 32:
        assert z0_groups >= 1  # the forced all-non-negative group exercised the v1 adjustment


def test_sharded_checkpoint_keeps_its_shards_and_index(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors, _ = _make_checkpoint(src, layers=3, shards=2)
    export_gptq_checkpoint(src, dst, group_size=64)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert files == sorted(p.name for p in src.glob("*.safetensors"))
    by_file = {f: set(load_file(str(dst / f))) for f in files}
    assert all(name in by_file[f] for name, f in index["weight_map"].items())
    assert set(index["weight_map"]) == set().union(*by_file.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for f in files
                                                  for t in load_file(str(dst / f)).values())
    assert "model.layers.2.mlp.down_proj.qweight" in index["weight_map"]


def test_fp16_and_fp32_sources(tmp_path):
    for dtype in (torch.float16, torch.float32):
        src, dst = tmp_path / f"src_{dtype}", tmp_path / f"dst_{dtype}"
        tensors, _ = _make_checkpoint(src, layers=1, dtype=dtype)
        export_gptq_checkpoint(src, dst, group_size=128)
        out = _load_dir(dst)
        w = tensors["model.layers.0.mlp.down_proj.weight"]
        want = quantize_weight_int4(w, 128, scale_dtype=torch.float16)
        assert torch.equal(out["model.layers.0.mlp.down_proj.qweight"], want.qweight)
        assert out["model.norm.weight"].dtype == dtype


def test_group_size_that_does_not_divide_k_is_refused_before_writing(tmp_path):
    # SmolLM2-135M: hidden 576 = 4.5 × 128 (1536 = 12 × 128 would fit)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_checkpoint(src, hidden=576, inter=1536, kv=192, layers=1)
    with pytest.raises(ValueError) as e:
        export_gptq_checkpoint(src, dst, group_size=128)
    msg = str(e.value)
    # one line per problem, counted, with a few of the tensors (SmolLM2 would otherwise list 180 of them)
    assert "in_features K=576 is not a multiple of group_size=128 (group sizes that divide K: [32, 64, -1]): " \
           "6 tensor(s), e.g. model.layers.0." in msg
    assert "down_proj" not in msg and len(msg.splitlines()) == 2  # only the offenders (down_proj has K=1536)
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]  # nothing written, no temporary folder left
    export_gptq_checkpoint(src, dst, group_size=64)  # what the SmolLM2 demo uses
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"] == 64


@pytest.mark.parametrize("bad", [96, 256, 16, 0, -2])
def test_unsupported_group_sizes(tmp_path, bad):
    src = tmp_path / "src"
    _make_checkpoint(src, layers=1)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\) or -1"):
        export_gptq_checkpoint(src, tmp_path / "dst", group_size=bad)
    with pytest.raises(TypeError, match="group_size must be an int"):
        export_gptq_checkpoint(src, tmp_path / "dst", group_size=64.0)


def test_folder_errors(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_checkpoint(src, layers=1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gptq_checkpoint(tmp_path / "nowhere", dst)
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_gptq_checkpoint(src, dst)
    with pytest.raises(ValueError, match="must differ"):
        export_gptq_checkpoint(src, src)
    (dst / "old.txt").unlink()  # an empty destination folder is fine
    export_gptq_checkpoint(src, dst, group_size=64)
    with pytest.raises(ValueError, match="already quantized"):
        export_gptq_checkpoint(dst, tmp_path / "again", group_size=64)


def test_stale_quantization_config_of_a_float_checkpoint_is_replaced(tmp_path):
    # transformers keeps {"quant_method": "gguf"} in the config of a model it dequantized from a GGUF file
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors, config = _make_checkpoint(src, layers=1)
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False}
    (src / "config.json").write_text(json.dumps(config))
    export_gptq_checkpoint(src, dst, group_size=64)
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    # a quantized tensor where a float weight is expected is refused, and the message names the config's method
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(256, 128, dtype=torch.int8)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"dtype I8 .*already quantized.*quant_method='gguf'.*up_proj.weight"):
        export_gptq_checkpoint(src, tmp_path / "dst2", group_size=64)


def test_checkpoint_without_decoder_linears_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"encoder.dense.weight": torch.zeros(8, 8)}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no decoder linear weight"):
        export_gptq_checkpoint(src, tmp_path / "dst")
