"""The candidate list both weight-only GEMMs share: dequantize + cuBLAS for large M, the Triton kernel, the reference."""
from typing import Any, Callable

from ..dispatch import Candidate, KernelFamily
from ..runtime import triton_runnable_on

# From here on cuBLAS on a dequantized copy is the default (H100, 28672×4096 M=1024, w8a16: 437.8 µs graph-timed;
# the tiled kernel took 589 under do_bench; cuBLAS fp16 alone 320). Rows are batch-invariant for M < LARGE_M
# only: cuBLAS sums in its own order, so a row computed in a batch of ≥ 1024 differs in its last bits from the same
# row computed alone. Speculative verification batches stay far below that.
LARGE_M = 1024


def weight_only_family(
    name: str,
    *,
    dequant_matmul: Callable,
    tiled: Callable,
    reference: Callable,
    problem_key: Callable[[Any], Any],
) -> KernelFamily:
    """Candidates in preference order; every problem has ``M`` and ``device``."""
    return KernelFamily(
        name,
        [
            Candidate(
                "dequant_matmul",
                can_implement=lambda p: (True, ""),
                run=dequant_matmul,
                suits=lambda p: (p.device.type == "cuda" and p.M >= LARGE_M, f"meant for CUDA with M >= {LARGE_M}"),
            ),
            Candidate("tiled", can_implement=lambda p: triton_runnable_on(p.device), run=tiled),
            Candidate("reference", can_implement=lambda p: (True, ""), run=reference),
        ],
        problem_key=problem_key,
    )
