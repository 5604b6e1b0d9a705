"""Weight quantizers used while loading a checkpoint."""
from .int8 import quantize_weight_int8
from .int4 import Int4Weight, quantize_weight_int4
from .checkpoints import repack_awq, repack_compressed_tensors, repack_gptq
from .gptq_export import export_gptq_checkpoint

__all__ = ["quantize_weight_int8", "quantize_weight_int4", "Int4Weight", "repack_gptq", "repack_awq", "repack_compressed_tensors", "export_gptq_checkpoint"]
