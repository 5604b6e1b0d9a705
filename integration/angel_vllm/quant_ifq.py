"""``quantization="ifq"``: int8 weight-only linear layers, quantized online while an fp16/bf16 checkpoint loads.

Each linear layer is created exactly like vLLM's unquantized one (a ``ModelWeightParameter`` [N, K] in the model
dtype), so vLLM's loaders fill it unchanged: merged qkv / gate_up shards, column- and row-parallel tensor-parallel
slices. After loading, ``process_weights_after_loading`` quantizes it per output channel
(``angel_kernels.quantize_weight_int8``: absmax / 127, round to nearest) and replaces it by

- ``layer.weight``: int8 [N, K] (same name and shape as before, 1 byte per weight instead of 2): where N is a
  multiple of 64 and K of 128, on sm_90 fragment-major (``angel_kernels.fragment_major_int8``, its int32 words
  viewed as bytes: each thread's wgmma operands one contiguous run, run by ``w8a16_fragment_gemm``), on other
  CUDA GPUs tile-major (``angel_kernels.tile_major_int8``: each 64 × 128 block one contiguous run), else
  row-major; ``layer.ifq_layout`` says which ("fragment", "tile" or "row"; ``layer.ifq_tile_major``: "tile"),
- ``layer.weight_scale``: fp32 [N],

dropping the fp16/bf16 copy. ``apply`` runs ``angel_kernels.w8a16_fragment_gemm`` or ``w8a16_gemm`` (compiled on
CUDA; on CPU the launcher picks the pure-torch reference, or the Triton interpreter under ``TRITON_INTERPRET=1``).

Only ``LinearBase`` layers are quantized. Embeddings and ``lm_head`` (``ParallelLMHead`` is not a ``LinearBase``)
stay in the model dtype, and attention gets no method (vLLM asserts a KV-cache method when one is returned).

Activation dtypes: fp16 and bf16, the dtypes ``w8a16_gemm`` accepts. ``dtype="auto"`` never yields fp32 on vLLM's
CPU or CUDA platforms (an fp32 checkpoint is downcast to the platform's first supported dtype: bf16), so fp32 only
arrives when asked for explicitly; vLLM then refuses it before loading with "float32 is not supported for
quantization method ifq. Supported dtypes: [...]". Casting fp32 activations to bf16 and back instead would look
like an fp32 model while computing in bf16, so it is not done.
"""
from typing import Any, Optional

import torch

from angel_kernels import fragment_major_int8, quantize_weight_int8, tile_major_int8, w8a16_fragment_gemm, w8a16_gemm
from angel_kernels.gemm.fragment import fragment_fits, fragment_kernel_runs_on
from angel_kernels.gemm.w8a16 import tile_major_fits

from ._compat import (
    LinearBase,
    LinearMethodBase,
    ModelWeightParameter,
    QuantizationConfig,
    QuantizeMethodBase,
    register_quantization_method,
    replace_parameter,
    set_weight_attrs,
)

__all__ = ["IFQ_NAME", "IfqConfig", "IfqLinearMethod", "register_ifq"]

IFQ_NAME = "ifq"


class WeightOnlyConfig(QuantizationConfig):
    """What the weight-only methods (ifq, ifq_int4) share: fp16/bf16 activations, Ampere or newer on CUDA."""

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]  # what w8a16_gemm / w4a16_gemm accept

    @classmethod
    def get_min_capability(cls) -> int:
        # bf16 tensor-core dots (Triton's tl.dot on bf16) need Ampere; vLLM skips this check on CPU.
        return 80


class IfqConfig(WeightOnlyConfig):
    """Online int8 weight-only quantization. No checkpoint file and no arguments: vLLM builds it as ``IfqConfig()``.

    Module-level (not defined inside ``register``) so that it unpickles in vLLM's worker processes.
    """

    def __init__(self) -> None:
        super().__init__()

    def __repr__(self) -> str:
        return "IfqConfig(weight=int8 per-output-channel symmetric, activations=fp16/bf16)"

    def get_name(self) -> str:
        return IFQ_NAME

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # online: nothing to read from the checkpoint

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "IfqConfig":
        # Reached only for a checkpoint whose config says quant_method "ifq" (vLLM rejects a mismatch earlier).
        return cls()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if isinstance(layer, LinearBase):
            return IfqLinearMethod(self)
        return None


class IfqLinearMethod(LinearMethodBase):
    """Loads the fp16/bf16 weight with vLLM's parameter classes, quantizes it to int8 after loading."""

    def __init__(self, quant_config: IfqConfig) -> None:
        self.quant_config = quant_config

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        # Same parameter as vLLM's UnquantizedLinearMethod: [sum(output shards on this rank), K on this rank].
        weight_loader = extra_weight_attrs.pop("weight_loader")
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            input_dim=1,
            output_dim=0,
            weight_loader=weight_loader,
        )
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)
        layer.ifq_layout = "row"  # until process_weights_after_loading decides
        layer.ifq_tile_major = False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.dtype == torch.int8:  # already quantized (vLLM may call this again, e.g. on reload)
            return
        qweight, scales = quantize_weight_int8(layer.weight.data)  # [N, K] int8, [N] fp32
        layer.ifq_layout = _layout_for(qweight)
        layer.ifq_tile_major = layer.ifq_layout == "tile"
        # one more int8 copy of this layer only, while it is repacked
        if layer.ifq_layout == "fragment":
            qweight = fragment_major_int8(qweight).view(torch.int8)  # [N, K]: the int32 words as bytes
        elif layer.ifq_tile_major:
            qweight = tile_major_int8(qweight)
        # replace_parameter re-registers `weight` (keeping its weight_loader); the fp16/bf16 tensor has no other
        # reference once this returns, so its memory is released.
        replace_parameter(layer, "weight", qweight)
        layer.register_parameter("weight_scale", torch.nn.Parameter(scales, requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if layer.ifq_layout == "fragment":
            return w8a16_fragment_gemm(x, layer.weight.view(torch.int32), layer.weight_scale, bias)
        return w8a16_gemm(x, layer.weight, layer.weight_scale, bias, tile_major=layer.ifq_tile_major)


# Tile-major weights (H100, same run, M = 1, µs row-major → tile-major): 28672×4096 45.8 → 44.2, 28672×8192
# 88.0 → 84.4, 8192×28672 86.1 → 80.6, 4096×14336 25.2 → 24.7; M = 16 1-6 % faster, M = 64 / 256 equal,
# 6144×4096 and 4096×4096 within 0.3 µs (benchmarks/NOTES.md). A switch, to compare the layouts in a deployment.
TILE_MAJOR_ON_CUDA = True


# Fragment-major weights on sm_90 (H100, same run, µs tile-major → fragment-major, bits equal): M = 1 28672×4096
# 44.7 → 41.9, 28672×8192 84.8 → 79.9, 6144×4096 13.7 → 12.3; M ≤ 16 geomean over cuBLAS fp16 1.70 → 1.85,
# 64 ≤ M ≤ 256 0.93 → 0.99 (benchmarks/NOTES.md). A switch, to compare the layouts in a deployment.
FRAGMENT_ON_HOPPER = True


def _layout_for(qweight: torch.Tensor) -> str:
    """"fragment" on a GPU the fragment kernel runs on (sm_90), "tile" on other CUDA GPUs (``_tile_major_for``),
    where the shape is whole 64 × 128 blocks; else "row"."""
    if FRAGMENT_ON_HOPPER and fragment_fits(*qweight.shape) and fragment_kernel_runs_on(qweight.device)[0]:
        return "fragment"
    return "tile" if _tile_major_for(qweight) else "row"


def _tile_major_for(qweight: torch.Tensor) -> bool:
    """Store a layer's weight tile-major: on CUDA (the Triton kernel streams it; on CPU the reference path would
    reorder it back on every call), where the shape is whole 64 × 128 blocks, unless TILE_MAJOR_ON_CUDA is off."""
    return TILE_MAJOR_ON_CUDA and qweight.is_cuda and tile_major_fits(*qweight.shape)


def register_ifq() -> None:
    """Make ``quantization="ifq"`` available to vLLM in this process (safe to call more than once)."""
    register_quantization_method(IFQ_NAME, IfqConfig, IfqLinearMethod)
