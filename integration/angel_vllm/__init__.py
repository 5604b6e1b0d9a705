"""vLLM glue for angel-kernels: the only package that imports vllm.

vLLM calls ``register()`` in every process through the ``vllm.general_plugins`` entry point. It must be
idempotent and must not touch CUDA (it also runs in processes that never use a GPU).
"""
import logging

logger = logging.getLogger("angel_vllm")

_REGISTERED = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (quantization methods and backends land here)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    logger.debug("angel-kernels plugin loaded")
