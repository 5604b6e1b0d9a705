"""Cases both weight-only GEMMs (w8a16, w4a16) must pass, written once.

Each test file describes its op as a ``WeightOnlyGemm`` (how to build a quantized layer, which env var forces a
candidate, which candidates keep the weights exact) and keeps its own parametrization; the bodies live here:
every candidate against the fp32 reference, real Llama shapes on the GPU, and bitwise batch invariance of the
tiled kernel (a row's result must not depend on how many rows share the launch).
"""
from dataclasses import dataclass
from typing import Callable

import torch

from angel_kernels.testing import assert_close, assert_close_dequantized
from angel_kernels.tuning import m_bucket

# M values of the CPU-tier candidate sweep: 1, tiny, primes, one past a power of two, a non-power above 64.
EVERY_CANDIDATE_MS = [1, 2, 3, 7, 16, 33, 100]
# Llama-3 8B projections as (N, K): qkv, o, gate_up, down.
LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
REAL_SHAPE_CANDIDATES = ["tiled", "dequant_matmul"]
REAL_SHAPE_MS = [1, 16, 64, 257, 1024]
# Batch invariance: both split-K shapes (split 4), every M regime of the tiled kernel up to LARGE_M.
INVARIANCE_SHAPES = [(4096, 4096), (6144, 4096)]
INVARIANCE_MS = [2, 16, 33, 64, 300, 1024]
TUNING_SPACE_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 4096]


@dataclass(frozen=True)
class Layer:
    """A quantized layer with N outputs: activations ``x`` and, for any activations, the op and its reference."""

    x: torch.Tensor
    n: int
    run: Callable[[torch.Tensor], torch.Tensor]
    ref: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WeightOnlyGemm:
    """What the shared cases need to know about one op.

    ``layer(m, n, k, dtype, device, seed, *, bias, **variant) -> Layer``; ``force_env`` forces a candidate;
    ``exact_weight_candidates``: those that apply the scales to the fp32 accumulator (the weights are never
    rounded, so the plain tolerance holds); the others round each dequantized weight to the activation dtype and
    are held to ``assert_close_dequantized``.
    """

    name: str
    force_env: str
    layer: Callable[..., Layer]
    exact_weight_candidates: tuple = ()

    def close(self, candidate: str) -> Callable:
        return assert_close if candidate in self.exact_weight_candidates else assert_close_dequantized


def check_candidate(op: WeightOnlyGemm, candidate: str, layer: Layer, monkeypatch, *, name: str) -> None:
    """The forced candidate's output has x's dtype, shape [M, N], and matches the fp32 reference."""
    monkeypatch.setenv(op.force_env, candidate)
    y = layer.run(layer.x)
    assert y.dtype == layer.x.dtype and y.shape == (layer.x.shape[0], layer.n)
    assert_close(y, layer.ref(layer.x), name=f"{candidate} {name}")


def check_real_shape(op: WeightOnlyGemm, candidate: str, n: int, k: int, m: int, monkeypatch, **variant) -> None:
    monkeypatch.setenv(op.force_env, candidate)
    layer = op.layer(m, n, k, torch.float16, "cuda", seed=m + n, bias=True, **variant)
    op.close(candidate)(layer.run(layer.x), layer.ref(layer.x), name=f"{candidate} {m}x{n}x{k}")


def check_batch_invariance(op: WeightOnlyGemm, n: int, k: int, m: int, monkeypatch, candidate: str = "tiled",
                           **variant) -> None:
    """f(X)[i] == f(X[i:i+1]) bitwise: each M bucket has its own tile config, the K reduction is shared."""
    monkeypatch.setenv(op.force_env, candidate)
    layer = op.layer(m, n, k, torch.float16, "cuda", seed=m, bias=True, **variant)
    full = layer.run(layer.x)
    for i in sorted({0, m // 2, m - 1}):
        alone = layer.run(layer.x[i : i + 1])
        assert torch.equal(full[i : i + 1], alone), f"{op.name}: row {i} of M={m} differs from M=1"


def check_tuning_space_fits_the_m_bucket(space: list, m: int) -> None:
    assert space, "empty tuning space"
    # one K reduction for every M (batch invariance): the reduction's K-block, or half of it on DOT_T tiles
    # (the same chain of k16 MMA steps; the tuner's invariance check confirms each config on the GPU)
    full = max(c.BLOCK_K for c in space)
    assert all(c.BLOCK_K == full or (2 * c.BLOCK_K == full and dict(c.extra).get("DOT_T")) for c in space)
    # no token tile larger than twice the bucket (wasted MMA work), none below the MMA minimum of 16; DOT_T tiles
    # (tokens on wgmma's M side) take at least 64
    def fits(c):
        low = 64 if dict(c.extra).get("DOT_T") else 16
        return low <= c.BLOCK_M <= max(low, 2 * m_bucket(m))

    assert all(fits(c) for c in space), [(c.BLOCK_M, dict(c.extra)) for c in space if not fits(c)]


def check_dot_t_rows_match_swap_ab(run: Callable, x: torch.Tensor) -> None:
    """DOT_T tiles (K-blocks of 128 and 64, split launch or SERIAL) give the rows of the swap-AB M=1 tile bit for
    bit (int16 views: −0 and +0 differ). ``run(x, cfg)`` launches the tiled kernel with a config."""
    from angel_kernels.tuning import KernelConfig

    m = x.shape[0]
    one = KernelConfig(16, 64, 128, num_warps=4, num_stages=3, extra=(("GROUP_N", 1),))
    picks = (0, m // 2, m - 1)
    rows = [run(x[i : i + 1], one) for i in picks]
    for block_k, serial in ((128, 0), (128, 1), (64, 0), (64, 1)):
        cfg = KernelConfig(128, 128, block_k, num_warps=4, num_stages=2,
                           extra=(("DOT_T", 1), ("GROUP_N", 8), ("SERIAL", serial)))
        y = run(x, cfg)
        for i, row in zip(picks, rows):
            assert torch.equal(y[i : i + 1].view(torch.int16), row.view(torch.int16)), (block_k, serial, i)
