"""Pieces shared by the weight-only GEMM kernels: tile order, deterministic split-K, the split policy.

The kernels put weight rows on the MMA's M side (swap-AB) and tokens on its N side; both split K the same way:
each of the SPLIT_K programs of a tile writes an fp32 partial, and the last one to arrive (an acq_rel counter)
sums the partials in split order 0, 1, … — deterministic, no float atomics — then writes the tile and resets
its counter for the next launch. The fragment decode tiles on short split ranges leave that sum to a second kernel
(``launch_split_sum``, the same arithmetic) instead.
"""
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..runtime import dependent_launch, num_sms

# Split K until a decode launch has PROGRAMS_PER_SM programs per SM. Why several: a program is one warpgroup
# stalled at a barrier or on shared memory most of the time (ncu, w8a16 28672×4096 M=1 on an H200: 20 % of warp
# slots active; stalls per issued instruction: barrier 1.8, short scoreboard 1.6, long scoreboard 1.2), so an
# SM needs several programs' worth of independent work. Measured (H100, CUDA graphs, M=1, µs):
#   w8a16 4096×14336: 256 programs 26.5, 512 25.9;  28672×4096: 448 programs 47.5, 896 51.0
#   w4a16 4096×14336: 256 programs 25.2, 512 20.9;  28672×4096: 448 programs 40.4, 896 36.0;
#         28672×8192: 448 programs 76.6, 896 66.4
# The int4 kernel's programs are lighter (72 registers, 29 KB of shared memory: 7 fit an SM; w8a16's 128-row
# tiles take 127 registers and 53 KB: 4), so it wants more of them.
# The fragment-major kernel (gemm/fragment.py: no shared-memory round trip, 80 registers when this was measured,
# before its loop was unrolled) wants fewer: at M = 1 on 28672×4096 (448 tiles) one range took 28.3 µs against
# 30.5 split in two, on 28672×8192 54.4 vs 55.4 (H100, same run); 4096-row shapes keep their splits (4096×14336
# split 1: 54.4 µs against 16.2 at 8). After the unrolling a forced sweep kept these counts within 0.4 µs of the
# best (int8 mode, benchmarks/NOTES.md).
PROGRAMS_PER_SM = {"w8a16": 3, "w4a16": 3.5, "w4a16_fragment": 3}
MAX_SPLIT_K = 8
MIN_K_PER_SPLIT = 1024  # input features per split: at least 8 K-blocks of 128
DEFAULT_SMS = 132  # H100 / H200; used off-GPU (the interpreter) so CPU tests split as the GPU does


def split_k_for(n: int, k: int, block_k: int, sms: int = DEFAULT_SMS, programs_per_sm: float = 3) -> int:
    """Split count from the weight shape, the kernel's BLOCK_K and the GPU's SM count, never from M (batch
    invariance): the smallest power of two giving ``programs_per_sm`` programs of 64-row tiles per SM."""
    tiles = triton.cdiv(n, 64)
    steps = triton.cdiv(k, block_k)
    split = 1
    while (
        tiles * split < programs_per_sm * sms
        and split * 2 <= MAX_SPLIT_K
        and steps % (split * 2) == 0
        and k // (split * 2) >= MIN_K_PER_SPLIT
    ):
        split *= 2
    return split


def split_k_on(device: torch.device, kernel: str, n: int, k: int, block_k: int) -> int:
    """``split_k_for`` with the device's SM count and the kernel's PROGRAMS_PER_SM (``"w8a16"`` / ``"w4a16"``)."""
    return split_k_for(n, k, block_k, num_sms(device, DEFAULT_SMS), PROGRAMS_PER_SM[kernel])


def serial_by_default(device: torch.device, kernel: str, split_k: int, num_tiles: int) -> bool:
    """Run a split launch's ranges one after the other in one program per tile (same bits, see the kernels'
    SERIAL) once the tiles alone give the programs per SM that the split is there for: the fp32 partials grow
    with M (M · N · SPLIT_K · 8 bytes written and read), the weight does not. A config's ``SERIAL`` extra
    overrides this. (w4a16 28672×4096 at M = 1 has 448 tiles, 3.4 per SM on 132 SMs, below its 3.5: serial
    it took 40.7 µs against 35.6 split in two.)"""
    return split_k > 1 and num_tiles >= PROGRAMS_PER_SM[kernel] * num_sms(device, DEFAULT_SMS)


@dataclass(frozen=True)
class SplitPlan:
    """How a launch reduces K: ``split_k`` ranges of ``k_per_split`` (a multiple of the split block), summed by
    one program per tile (``serial``) or by the last of ``split_k`` programs through ``partials``/``counters``."""
    split_k: int
    k_per_split: int
    serial: bool
    partials: torch.Tensor
    counters: torch.Tensor

    @property
    def grid_k(self) -> int:
        return 1 if self.serial else self.split_k


def plan_split(device: torch.device, kernel: str, m: int, n: int, k: int, split_block: int, num_tiles: int,
               out: torch.Tensor, split_k=None, serial=None) -> SplitPlan:
    """The launch's K reduction. ``split_block``: the K granularity of the split ranges, the same for every M
    (batch invariance); ``split_k``: forced (tests) or from the weight shape and the GPU; ``serial``: a config's
    SERIAL or ``serial_by_default``. ``out`` stands in for the unused partials and counters."""
    if split_k is None:
        split_k = split_k_on(device, kernel, n, k, split_block)  # weight shape and GPU, never M
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), split_block) * split_block
    if serial is None:
        serial = serial_by_default(device, kernel, split_k, num_tiles)
    serial = bool(serial) and split_k > 1
    if split_k > 1 and not serial:
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
        counters = tile_counters(device, num_tiles)
    else:
        partials = counters = out  # unused
    return SplitPlan(split_k, k_per_split, serial, partials, counters)


def _with_extra(c, name: str, value: int, **fields):
    """c with one more extra (kept sorted, as KernelConfig.from_dict stores them) and other fields replaced."""
    return replace(c, extra=tuple(sorted(c.extra + ((name, value),))), **fields)


def with_serial_choices(configs: list, split_k: int) -> list:
    """Tuning: each config both ways (``SERIAL`` 0 and 1) where the weight shape splits K; else as given."""
    if split_k <= 1:
        return configs
    return [_with_extra(c, "SERIAL", serial) for serial in (0, 1) for c in configs]


def with_dot_t_choices(configs: list) -> list:
    """Tuning: configs of 64 or more tokens per tile also with ``DOT_T`` (tokens on the MMA's M side, the
    converted weight from shared memory; smaller token tiles would fall back to mma.sync there), at the
    reduction's K-block and at half of it: 64-wide K-blocks keep the split ranges and, on these tiles, the
    rows' bits (H100: 128×128 / 4 warps / 4 stages, 28672×4096 M=128: 77.2 µs vs 84.3 at K-blocks of 128;
    two programs fit an SM). A swap-AB 128×128×64 / 8-warp tile gave other bits there, so the tuner's
    invariance check (--invariant) decides what is admitted."""
    dot_t = [_with_extra(c, "DOT_T", 1) for c in configs if c.BLOCK_M >= 64]
    return configs + dot_t + [replace(c, BLOCK_K=c.BLOCK_K // 2) for c in dot_t if c.BLOCK_K >= 128]


def with_decode_dot_t_choices(configs: list) -> list:
    """Decode tuning (M ≤ 16): also DOT_T tiles of 64 tokens (wgmma's smallest M side; the rows beyond M are
    masked) at 4 warps, 2 and 3 stages. Same bits as the swap-AB tiles (DOT_T rows matched the M = 1 configs on
    the H100), fewer instructions per K-block (sm_90a, 28672×4096, 64 weight rows: w8a16 257 → 191 at 2 stages,
    w4a16 337 → 260: one shared-memory store of the converted tile instead of four STS / LDSM rounds, and no
    wait after each HGMMA), but 16 KB of shared memory per stage for the mostly empty x tile."""
    return configs + [_with_extra(c, "DOT_T", 1, BLOCK_M=64, num_stages=stages)
                      for c in configs if c.num_warps == 4 and c.num_stages == 3 for stages in (2, 3)]


# Split-K tile counters: one zeroed int32 buffer per device, shared by the kernels, grown on demand; every launch
# leaves the counters it used at zero (launches on one stream never overlap; two streams running split-K GEMMs at
# once would share them). Made outside CUDA-graph capture: a buffer first zeroed inside a captured graph holds
# garbage for every other graph until that one replays (vLLM warms up eagerly before it captures).
_COUNTERS: dict = {}


def tile_counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"split-K GEMM: {n} tile counters are needed for the first time during CUDA-graph capture; run the"
                " same shapes once outside the capture first (warm-up)"
            )
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """(pid_n, pid_m, num_pid_m): GROUP_N weight tiles are visited by every token tile before moving on (x and W
    reuse in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_N * num_pid_m
    group_id = pid // num_pid_in_group
    first_pid_n = group_id * GROUP_N
    group_size_n = min(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + ((pid % num_pid_in_group) % group_size_n)
    pid_m = (pid % num_pid_in_group) // group_size_n
    return pid_n, pid_m, num_pid_m


@triton.jit
def tile_rows_and_tokens(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """This program's tile: (offs_n, offs_m, mask_n, mask_m, tile index for the split counters), weight rows n
    and tokens m in ``grouped_tile`` order."""
    pid_n, pid_m, num_pid_m = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_n, offs_m, offs_n < N, offs_m < M, pid_n * num_pid_m + pid_m


@triton.jit
def collect_tile(acc, part_ptr, count_ptr, tile, pid_k, offs_n, offs_m, mask_n, mask_m, M, N,
                 SPLIT_K: tl.constexpr, SERIAL: tl.constexpr, DOT_T: tl.constexpr):
    """The tile's sum over K as [BLOCK_N, BLOCK_M] (``acc`` is [BLOCK_M, BLOCK_N] with DOT_T), and whether this
    program writes it: in a split launch only the last of the tile's programs (``reduce_split_k``), otherwise
    every program (one per tile)."""
    if DOT_T:  # the split ranges' sums are elementwise: one layout change, after them
        acc = tl.trans(acc)
    writes = tl.full((), 1, tl.int1)
    if SPLIT_K > 1 and not SERIAL:
        acc, writes = reduce_split_k(acc, part_ptr, count_ptr, tile, pid_k, offs_n, offs_m, mask_n, mask_m, M, N,
                                     SPLIT_K)
    return acc, writes


@triton.jit
def reduce_split_k(acc, part_ptr, count_ptr, tile, pid_k, offs_n, offs_m, mask_n, mask_m, M, N,
                   SPLIT_K: tl.constexpr):
    """Store this split's partial; returns (the sum over splits, whether this program is the last to arrive).
    Only the last program's sum is complete; it alone must write the tile."""
    part_offs = offs_n[:, None].to(tl.int64) + offs_m[None, :].to(tl.int64) * N  # partials: [SPLIT_K, M, N]
    tile_mask = mask_n[:, None] & mask_m[None, :]
    tl.store(part_ptr + pid_k.to(tl.int64) * M * N + part_offs, acc, mask=tile_mask)
    # acq_rel: our partial is visible before the count moves; the last program sees every partial.
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
    is_last = arrived == SPLIT_K - 1
    if is_last:
        acc = tl.load(part_ptr + part_offs, mask=tile_mask, other=0.0)
        for s in range(1, SPLIT_K):
            acc += tl.load(part_ptr + s * M * N + part_offs, mask=tile_mask, other=0.0)
        tl.store(count_ptr + tile, 0)
    return acc, is_last


@triton.jit
def _split_sum_kernel(part_ptr, s_ptr, bias_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr,
                      CHANNEL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y [M, N] from the partials [SPLIT_K, M, N]: summed in split order (p0 + p1) + p2 …, then (CHANNEL_SCALE)
    times the fp32 per-channel scale, + bias in fp32, one rounding: the last-arrival sum's arithmetic
    (``reduce_split_k``, the fragment kernels' ``_store_result``), so the same bits. PDL: launched while the split
    kernel runs (1: the next kernel may launch at once, 2: as these programs exit); waits for it before reading."""
    if PDL == 1:
        gdc_launch_dependents()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    size = M * N
    mask = offs < size
    n = offs % N
    if PDL:
        gdc_wait()
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * size + offs, mask=mask, other=0.0)
    if CHANNEL_SCALE:
        acc = acc * tl.load(s_ptr + n, mask=mask).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


SPLIT_SUM_BLOCK = 1024  # outputs per program of the split sum (8 per thread at 4 warps)


def launch_split_sum(partials: torch.Tensor, y: torch.Tensor, channel_scales=None, bias=None, pdl: int = 0):
    """y [M, N] (row stride y.stride(0), unit column stride) = the sum of ``partials`` [SPLIT_K, M, N] (fp32,
    contiguous) in split order, times ``channel_scales`` [N] (int8 weights' per-channel scales) if given, + ``bias``
    [N]. ``pdl``: 0 a plain launch; 1 or 2 a programmatic dependent launch after the split kernel (1: the next
    kernel may launch at once, 2: as these programs exit)."""
    split_k, m, n = partials.shape
    if not partials.is_contiguous() or partials.dtype != torch.float32:
        raise ValueError(f"partials must be contiguous float32, got {partials.dtype} with strides {partials.stride()}")
    if y.shape != (m, n) or y.stride(1) != 1:
        raise ValueError(f"y must be [{m}, {n}] with unit column stride, got {tuple(y.shape)} / {y.stride()}")
    for name, t in (("channel_scales", channel_scales), ("bias", bias)):
        if t is not None and (t.numel() != n or not t.is_contiguous()):
            raise ValueError(f"{name} must be {n} contiguous values, got {tuple(t.shape)}")
    _split_sum_kernel[(triton.cdiv(m * n, SPLIT_SUM_BLOCK),)](
        partials, channel_scales if channel_scales is not None else partials, bias if bias is not None else partials,
        y, m, n, y.stride(0), SPLIT_K=split_k, CHANNEL_SCALE=channel_scales is not None, HAS_BIAS=bias is not None,
        BLOCK=SPLIT_SUM_BLOCK, PDL=pdl, num_warps=4, **dependent_launch(pdl > 0))
