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
    # Imported here, not at module level, so that `import angel_vllm` works without vllm. No import touches CUDA.
    try:
        from .quant_ifq import register_ifq
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "vllm":
            raise
        # Only vLLM calls this, so vllm is present in real use; an environment without it (the GPU benchmark
        # machine) just has nothing to register.
        logger.debug("vllm is not installed: no quantization methods registered")
        return
    register_ifq()
    _REGISTERED = True
    logger.debug("angel-kernels plugin loaded: quantization methods ['ifq']")
