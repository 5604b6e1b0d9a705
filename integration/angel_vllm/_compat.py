"""Every vLLM import the plugin relies on, in one place (checked against vLLM 0.32).

When vLLM moves one of these, this module is the only one to change.
"""
from vllm.model_executor.layers.linear import (
    WEIGHT_LOADER_V2_SUPPORTED,
    LinearBase,
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import replace_parameter, set_weight_attrs

__all__ = [
    "LinearBase",
    "LinearMethodBase",
    "ModelWeightParameter",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "register_quantization_method",
    "replace_parameter",
    "set_weight_attrs",
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
