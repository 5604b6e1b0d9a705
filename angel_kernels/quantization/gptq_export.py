"""Write a GPTQ (v1, ``checkpoint_format="gptq"``) 4-bit checkpoint from an fp16/bf16/fp32 Llama-style one.

``export_gptq_checkpoint(src, dst, group_size=..., symmetric=...)`` quantizes every linear weight of the decoder
layers (``q/k/v/o_proj``, ``gate/up/down_proj``) with our round-to-nearest int4 quantizer
(``quantize_weight_int4``) and stores each one the way AutoGPTQ / GPTQModel / optimum do, so that any GPTQ reader
(``repack_gptq``, vLLM's ``gptq``, transformers) loads it. Embeddings, norms and ``lm_head`` are copied unchanged.

Per linear layer ``<name>.weight`` W [N, K] becomes (g = group size, K for channel-wise):

- ``<name>.qweight`` int32 ``[K / 8, N]``: 8 consecutive input rows per word, low nibble first (our own layout);
- ``<name>.qzeros``  int32 ``[K / g, N / 8]``: 8 output columns per word, low nibble first, each the zero point
  *minus one* (the v1 convention; readers add the 1 back), so symmetric checkpoints store 7 everywhere;
- ``<name>.scales``  fp16  ``[K / g, N]``;
- ``<name>.g_idx``   int32 ``[K]``: ``k // g`` (no act-order: ``desc_act`` is false).

v1 cannot store a zero point of 0 (0 − 1 wraps to nibble 15, which every v1 reader takes back as 16). Symmetric
weights always have zero point 8. An asymmetric group whose weights are all ≥ 0 gets zero point 0 from the
quantizer; such groups are re-quantized with zero point 1 and scale max / 14, the finest grid v1 can express for
them (the error bound stays half a step of that grid).

The quantizer rounds each scale to fp16 *before* dividing by it, so the stored (q, scale) pairs are exactly what a
GPTQ reader sees: ``repack_gptq`` on the written tensors gives back the quantizer's ``Int4Weight`` bit for bit.

No vllm import here (library layer); ``safetensors`` is imported when the function runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch

from ..reference.int4 import INT4_PACK, INT4_QMAX, INT4_SYM_ZERO
from .int4 import INT4_GROUP_SIZES, Int4Weight, _scale_to_storage, pack_int4_rows, quantize_weight_int4

__all__ = ["export_gptq_checkpoint", "gptq_v1_tensors", "DECODER_LINEAR_RE"]

# The decoder's linear weights (HF Llama names: model.layers.<i>.self_attn.q_proj.weight, ...).
DECODER_LINEAR_RE = re.compile(
    r"^(?P<module>(?:.*\.)?layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj))\.weight$"
)
GPTQ_SCALE_DTYPE = torch.float16  # what every GPTQ reader expects for `scales`
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Copied when present: tokenizer (sentencepiece / BPE / fast), chat template, generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pack_int4_cols(v: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [R, C] → int32 [R, C / 8]: nibble j of word c holds column 8c + j (GPTQ ``qzeros``)."""
    return pack_int4_rows(v.t()).t().contiguous()


def _requantize_zero_point_0_groups(w: torch.Tensor, q: Int4Weight) -> Int4Weight:
    """Asymmetric groups with zero point 0 (all weights ≥ 0) → zero point 1, scale max / 14 (see module doc)."""
    bad = q.zeros == 0  # [G, N]
    if not bool(bad.any()):
        return q
    n, k = w.shape
    g = q.group_size
    groups = w.to(torch.float32).t().reshape(k // g, g, n)  # [G, g, N]
    hi = groups.amax(dim=1)  # [G, N], ≥ 0 in these groups
    s_new = _scale_to_storage(hi / (INT4_QMAX - 1), q.scales.dtype)
    scales = torch.where(bad, s_new, q.scales)
    zeros = torch.where(bad, torch.ones_like(q.zeros), q.zeros)
    vals = torch.round(groups / scales.to(torch.float32)[:, None, :]).add_(zeros[:, None, :].to(torch.float32))
    vals = vals.clamp_(0, INT4_QMAX).reshape(k, n)
    old = torch.empty((k // INT4_PACK, INT4_PACK, n), dtype=torch.int32)
    for j in range(INT4_PACK):
        old[:, j, :] = (q.qweight >> (4 * j)) & 0xF
    bad_rows = bad.repeat_interleave(g, dim=0)  # [K, N]
    merged = torch.where(bad_rows, vals.to(torch.int32), old.reshape(k, n))
    return Int4Weight(pack_int4_rows(merged), scales, zeros, g)


def gptq_v1_tensors(q: Int4Weight) -> dict[str, torch.Tensor]:
    """One layer's ``Int4Weight`` (no act-order) → GPTQ v1 tensors {qweight, qzeros, scales, g_idx}.

    Zero points must be 1..16 (v1 stores zero − 1 in a nibble); symmetric weights (``zeros`` None) store 7.
    """
    if q.perm is not None:
        raise ValueError("act-order weights (perm) are not written: the export has desc_act=false")
    k, n = q.K, q.N
    if n % INT4_PACK:
        raise ValueError(f"N={n} output features must be a multiple of 8 (GPTQ packs 8 zero points per int32)")
    n_groups = q.scales.shape[0]
    zeros = q.zeros.to(torch.int32) if q.zeros is not None else torch.full((n_groups, n), INT4_SYM_ZERO, dtype=torch.int32)
    if bool((zeros < 1).any()) or bool((zeros > INT4_QMAX + 1).any()):
        raise ValueError("GPTQ v1 stores zero − 1 in 4 bits: zero points must lie in 1..16")
    return {
        "qweight": q.qweight.contiguous(),
        "qzeros": _pack_int4_cols((zeros - 1) & 0xF),
        "scales": q.scales.to(GPTQ_SCALE_DTYPE).contiguous(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // q.group_size).to(torch.int32),
    }


def _check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size not in INT4_GROUP_SIZES and group_size != -1:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} or -1 (channel-wise), got {group_size}")


def _shards(src: Path) -> list[str]:
    index = src / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {src} (only safetensors checkpoints can be exported)")
    return files


def _plan(src: Path, shards: list[str], group_size: int, quant_cfg) -> tuple[dict[str, list[str]], list[str]]:
    """Every tensor name per shard, and the names to quantize; all shape/dtype problems raised before writing.

    ``quant_cfg``: the source config's quantization_config, if any. It only means "already quantized" when the
    tensors say so too: transformers writes {"quant_method": "gguf"} into the config of a model it dequantized
    from a GGUF file, whose safetensors are plain floats.
    """
    from safetensors import safe_open

    names_by_shard: dict[str, list[str]] = {}
    to_quantize: list[str] = []
    problems: dict[str, list[str]] = {}  # what is wrong -> the tensors it is wrong for
    for shard in shards:
        with safe_open(str(src / shard), framework="pt") as f:
            names = list(f.keys())
            names_by_shard[shard] = names
            for name in names:
                if not DECODER_LINEAR_RE.match(name):
                    continue
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if dtype not in ("F16", "BF16", "F32"):
                    said = f"; config.json says quant_method={quant_cfg.get('quant_method')!r}" if quant_cfg else ""
                    problems.setdefault(f"dtype {dtype} (expected F16, BF16 or F32: is it already quantized?"
                                        f"{said})", []).append(name)
                    continue
                if len(shape) != 2:
                    problems.setdefault(f"shape {shape} is not 2-D [out_features, in_features]", []).append(name)
                    continue
                n, k = shape
                g = k if group_size == -1 else group_size
                if k % g or k % INT4_PACK:
                    fitting = [s for s in INT4_GROUP_SIZES if k % s == 0] + [-1]
                    problems.setdefault(f"in_features K={k} is not a multiple of group_size={g} "
                                        f"(group sizes that divide K: {fitting})", []).append(name)
                if n % INT4_PACK:
                    problems.setdefault(f"out_features N={n} is not a multiple of 8 (GPTQ packs 8 zero points "
                                        f"per int32 word)", []).append(name)
                to_quantize.append(name)
    if problems:
        lines = [f"{what}: {len(names)} tensor(s), e.g. {', '.join(names[:3])}" for what, names in problems.items()]
        raise ValueError(f"cannot export a GPTQ checkpoint with group_size={group_size}:\n  " + "\n  ".join(lines))
    if not to_quantize:
        if quant_cfg:
            raise ValueError(f"{src} is already quantized (quantization_config quant_method="
                             f"{quant_cfg.get('quant_method')!r}; no float decoder linear weights)")
        raise ValueError(f"no decoder linear weight (layers.<i>.self_attn.q_proj.weight, ...) found in {src}")
    return names_by_shard, to_quantize


def export_gptq_checkpoint(
    src_dir: Union[str, os.PathLike],
    dst_dir: Union[str, os.PathLike],
    *,
    group_size: int = 128,
    symmetric: bool = True,
) -> Path:
    """Quantize ``src_dir`` (HF safetensors + config.json) into a GPTQ v1 4-bit checkpoint at ``dst_dir``.

    ``group_size``: 32, 64, 128, or −1 (channel-wise); it must divide every quantized layer's in_features (a
    ValueError lists the layers and the group sizes that would fit). ``symmetric``: zero point 8 everywhere
    (``sym: true``), else one zero point per group. ``dst_dir`` must not exist or be empty; the checkpoint is
    written to a sibling temporary folder and renamed into place, so a failed export leaves nothing behind.
    A ``quantization_config`` already in the source config.json is replaced when every decoder linear weight is
    a float tensor (a model dequantized from GGUF by transformers keeps ``{"quant_method": "gguf"}`` there);
    otherwise the source is refused as already quantized.
    Returns ``dst_dir`` as a ``Path``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    _check_group_size(group_size)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    src, dst = Path(src_dir), Path(dst_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: src_dir must be a Hugging Face checkpoint folder")
    if dst.resolve() == src.resolve():
        raise ValueError("dst_dir must differ from src_dir")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty folder")
    config = json.loads(config_path.read_text())
    stale = [config.pop(key, None) for key in ("quantization_config", "compression_config")]
    stale = stale[0] or stale[1]
    shards = _shards(src)
    names_by_shard, to_quantize = _plan(src, shards, group_size, stale)
    quantize = set(to_quantize)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for shard in shards:
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(src / shard), framework="pt") as f:
                for name in names_by_shard[shard]:
                    t = f.get_tensor(name)
                    if name not in quantize:
                        out[name] = t.contiguous()
                        continue
                    module = DECODER_LINEAR_RE.match(name)["module"]
                    q = quantize_weight_int4(t, group_size, sym=symmetric, scale_dtype=GPTQ_SCALE_DTYPE)
                    if not symmetric:
                        q = _requantize_zero_point_0_groups(t, q)
                    for suffix, tensor in gptq_v1_tensors(q).items():
                        out[f"{module}.{suffix}"] = tensor
            save_file(out, str(tmp / shard), metadata={"format": "pt"})
            for name, t in out.items():
                weight_map[name] = shard
                total_size += t.numel() * t.element_size()
        if (src / SAFETENSORS_INDEX).is_file():
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": False,
            "sym": symmetric,
            "checkpoint_format": "gptq",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst

