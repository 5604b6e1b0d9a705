"""vLLM glue for angel-kernels: the only package that imports vllm.

vLLM calls ``register()`` in every process through the ``vllm.general_plugins`` entry point. It must be
idempotent and must not touch CUDA (it also runs in processes that never use a GPU).
"""
import importlib
import logging

logger = logging.getLogger("angel_vllm")

# What register() installs, in order: (module in this package, its registration function, what it adds).
# One line per quantization method or backend; each function must itself be safe to call again.
REGISTRATIONS = (
    (".quant_ifq", "register_ifq", "quantization method 'ifq'"),
    (".quant_ifq_int4", "register_ifq_int4", "quantization method 'ifq_int4'"),
    (".attention_backend", "register_int8_kv_backend", "int8_per_token_head KV cache backend"),
)

_REGISTERED = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (quantization methods and backends land here)."""
    global _REGISTERED
    if _REGISTERED:
        return
    # Imported here, not at module level, so that `import angel_vllm` works without vllm. No import touches CUDA.
    # Every module is imported before anything registers: vLLM ends up with all of them or with none.
    try:
        functions = [getattr(importlib.import_module(module, __name__), fn) for module, fn, _ in REGISTRATIONS]
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "vllm":
            raise
        # Only vLLM calls this, so vllm is present in real use; an environment without it (the GPU benchmark
        # machine) just has nothing to register.
        logger.debug("vllm is not installed: nothing registered")
        return
    for fn in functions:
        fn()
    _REGISTERED = True
    logger.debug("angel-kernels plugin loaded: %s", ", ".join(what for _, _, what in REGISTRATIONS))
