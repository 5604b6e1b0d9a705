"""Kernel configs and the checks that prune impossible ones before any benchmarking."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

# Hopper: 228 KB shared memory per SM, 227 KB usable by one block.
H100_SMEM_PER_BLOCK = 227 * 1024


@dataclass(frozen=True)
class KernelConfig:
    """Block shape and launch parameters of one Triton GEMM-like kernel."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 2
    extra: tuple[tuple[str, int], ...] = field(default=())

    def as_dict(self) -> dict:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        d = dict(d)
        extra = tuple(sorted(d.pop("extra", {}).items()))
        return cls(**d, extra=extra)

    def meta(self) -> dict:
        """constexpr block sizes + extras, for a kernel launch."""
        d = {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K}
        d.update(dict(self.extra))
        return d


def smem_bytes(cfg: KernelConfig, a_bytes: float, b_bytes: float) -> int:
    """Shared memory of a pipelined A[BM, BK]·B[BK, BN] main loop (element sizes in bytes, 0.5 for int4)."""
    per_stage = cfg.BLOCK_M * cfg.BLOCK_K * a_bytes + cfg.BLOCK_K * cfg.BLOCK_N * b_bytes
    return int(per_stage * max(cfg.num_stages, 1))


def prune_configs(
    configs: Iterable[KernelConfig],
    *,
    K: int,
    a_bytes: float = 2,
    b_bytes: float = 1,
    group_size: int | None = None,
    smem_limit: int = H100_SMEM_PER_BLOCK,
) -> list[KernelConfig]:
    """Keep configs whose shared memory fits, whose BLOCK_K divides K into the split, and (group-wise
    weights) whose BLOCK_K does not straddle a scale group (``BLOCK_K <= group_size`` and divides it)."""
    kept = []
    for cfg in configs:
        if smem_bytes(cfg, a_bytes, b_bytes) > smem_limit:
            continue
        if K % (cfg.BLOCK_K * cfg.SPLIT_K) != 0 and cfg.SPLIT_K > 1:
            continue
        if group_size is not None and (cfg.BLOCK_K > group_size or group_size % cfg.BLOCK_K != 0):
            continue
        kept.append(cfg)
    return kept
