"""Weight quantizers used while loading a checkpoint."""
from .int8 import quantize_weight_int8

__all__ = ["quantize_weight_int8"]
