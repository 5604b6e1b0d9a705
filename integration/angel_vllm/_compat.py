"""Every vLLM import the plugin relies on, in one place (checked against vLLM 0.32).

When vLLM moves one of these, this module is the only one to change. Imports that pull in more of vLLM than the
linear layers do (model utilities, the compressed-tensors helpers, which import the ``compressed_tensors``
package) are deferred to the functions at the bottom, so that ``register()`` stays cheap.
"""
from vllm.model_executor.layers.linear import (
    WEIGHT_LOADER_V2_SUPPORTED,
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)
from vllm.model_executor.utils import replace_parameter, set_weight_attrs

__all__ = [
    "BasevLLMParameter",
    "ChannelQuantScaleParameter",
    "GroupQuantScaleParameter",
    "LinearBase",
    "LinearMethodBase",
    "ModelWeightParameter",
    "PackedColumnParameter",
    "PackedvLLMParameter",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "RowvLLMParameter",
    "UnquantizedLinearMethod",
    "checkpoint_modules",
    "ct_layer_is_ignored",
    "ct_layer_is_targeted",
    "gptq_layer_is_quantized",
    "is_layer_skipped",
    "register_quantization_method",
    "replace_parameter",
    "set_weight_attrs",
    "weights_mapper",
]


def register_quantization_method(name: str, config_cls: type, linear_method_cls: type | None = None) -> None:
    """Register ``config_cls`` under ``name`` (and its linear method for ``weight_loader_v2``); safe to repeat.

    vLLM's ``register_quantization_config`` tolerates a duplicate name: it adds the name to its method lists
    once and overwrites the class (logging at debug level). ``register_weight_loader_v2_supported_method``
    appends the class name on every call, so that one is guarded here.
    """
    register_quantization_config(name)(config_cls)
    if linear_method_cls is not None and linear_method_cls.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
        register_weight_loader_v2_supported_method(linear_method_cls)


def weights_mapper(**mappings):
    """``vllm.model_executor.models.utils.WeightsMapper(**mappings)`` (checkpoint-name rewriting while loading)."""
    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper(**mappings)


def ct_layer_is_ignored(prefix: str, ignore, fused_mapping) -> bool:
    """compressed-tensors ``ignore`` list semantics (exact names or ``re:`` patterns; fused layers by shard)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    return should_ignore_layer(prefix, ignore=ignore, fused_mapping=fused_mapping)


def ct_layer_is_targeted(prefix: str, layer, targets, fused_mapping) -> bool:
    """compressed-tensors ``targets`` semantics (layer names, ``re:`` patterns, or module class names)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import find_matched_target

    return find_matched_target(prefix, layer, targets, fused_mapping) is not None


def gptq_layer_is_quantized(prefix: str, quantized_modules, fused_mapping) -> bool:
    """GPTQ ``modules_in_block_to_quantize`` semantics (substring match; an empty list means every layer)."""
    from vllm.model_executor.layers.quantization.utils.gptq_utils import is_layer_gptq_quantized

    return is_layer_gptq_quantized(prefix, quantized_modules, fused_mapping)


def checkpoint_modules(model: str, revision=None) -> tuple[list[str], list[str]]:
    """(every module, modules holding a non-float tensor) from the checkpoint's safetensors headers (no tensor
    is read)."""
    from vllm.transformers_utils.config import get_safetensors_params_metadata

    floats = ("F16", "BF16", "F32", "F64")  # safetensors header dtype names
    metadata = get_safetensors_params_metadata(model, revision=revision)
    modules = {name.rsplit(".", 1)[0] for name in metadata}
    quantized = {name.rsplit(".", 1)[0] for name, info in metadata.items()
                 if (dtype := info.get("dtype")) and dtype not in floats}
    return sorted(modules), sorted(quantized)
