"""KV cache write: scatter the new tokens' key/value rows into a paged cache, quantizing for int8 caches.

int8 caches: one fp32 scale per (token, KV head), ``scale = max(absmax / 127, eps)`` (a correctly rounded fp32
division), values ``round_half_even(x · (1 / scale))``, the exact product of x and the correctly rounded fp32
reciprocal (within 2^-16 of x / scale, so the nearest integer to x / scale except within 2^-16 of a tie):
bit-identical to ``reference.quantize_kv_ref`` on every device. The attention kernels read any int8 · scale, so
caches written by vLLM's own kernel, which rounds half away from zero and may store -128, read correctly too.
fp16/bf16 caches: a copy.

Candidates (``ANGEL_KERNELS_FORCE_KV_WRITE`` / ``ANGEL_KERNELS_DISABLE=kv_write.<name>``):
- ``triton``: one program per (tokens, KV heads) tile, its shape the card's tuned config (``config_for``); a
  negative slot skips the token.
- ``reference``: the pure-torch write (CPU path).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from .._registry import register_op
from ..dispatch import Candidate, KernelFamily
from ..reference.attention import KV_SCALE_EPS, write_kv_cache_ref
from ..reference.quant import INT8_QMAX
from ..runtime import dependent_launch, dependent_launch_supported, num_sms, reference_forced, triton_runnable_on
from ..tuning import KernelConfig, default_store
from .kv_cache import check_kv_caches, check_query_dtype, row_alignment

# Adding 1.5 · 2^23 rounds an fp32 |y| < 2^22 to the nearest integer, ties to even (the sum lands where the fp32
# spacing is 1), i.e. torch.round; Triton has no portable rint (libdevice is CUDA-only).
_RNE_MAGIC = 12582912.0
KERNEL_NAME = "kv_write"
# Writes of up to this many tokens (decode steps, short chunks) are latency-bound and tuned apart from prefill
# chunks, which stream: one config per bucket and card.
SMALL_TOKENS = 1024
DEFAULT_SMS = 132  # off-GPU stand-in (the interpreter never launches with PDL)


@dataclass(frozen=True)
class KVWriteProblem:
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # of key/value
    cache_dtype: torch.dtype
    device: torch.device
    packed_rows: bool = False  # int8 rows not 16-byte aligned (vLLM's packed layout, scales inline)

    def key(self) -> str:
        kind = "int8" if self.cache_dtype == torch.int8 else "fp"
        tokens = "small" if self.num_tokens <= SMALL_TOKENS else "large"
        return (f"H={self.num_kv_heads},D={self.head_dim},page={self.block_size},kv={kind},T={tokens}"
                + ",rows=packed" * self.packed_rows)


@triton.jit
def _write_rows(
    x, dst_rows, scale_rows, live, dims,
    QUANT: tl.constexpr, SCALE_EPS: tl.constexpr, QMAX: tl.constexpr, RNE_MAGIC: tl.constexpr,
    LOW_BYTE: tl.constexpr,
):
    """Copy (or quantize) the loaded rows x [rows, HEAD_DIM], one per (token, head) pair of the tile, to
    ``dst_rows`` (per-row pointers; rows not ``live`` are not written: padding, whose rows were read anyway, see
    ``_kv_write_kernel``)."""
    dst = dst_rows[:, None] + dims[None, :]
    if QUANT:
        # Bit-exact with reference.quantize_kv_ref: s = max(RN(absmax / 127), eps) and RN(1 / s) by correctly
        # rounded divisions (div_rn: Triton's plain fp32 '/' is the approximate div.full.f32 on NVIDIA GPUs), once
        # per row; then one fused multiply-add per element, x · RN(1 / s) + 1.5 · 2^23, rounded once: the exact
        # product (|x · RN(1 / s)| < 2^22) lands where the fp32 spacing is 1, so the sum is 1.5 · 2^23 plus the
        # product rounded to the nearest integer, ties to even, and its low byte is the int8 (bits 0x4B400000 + n:
        # no float → int conversion). |x · RN(1 / s)| ≤ 127 (1 + 2^-23) for finite rows, so no clamp is needed.
        # - fp16/bf16 → fp32, abs and max are exact, so absmax does not depend on the reduction order;
        # - an fma rounds once whatever the compiler fuses around it: the reference's single rounding of the exact
        #   product.
        # (The division x / s per element, the earlier definition, cost a correctly rounded division or a
        # reciprocal with a near-tie guard and a slow path: H200 int8 T = 4096 / 16384 9.6 / 29.0 µs; this
        # 7.5 / 25.7, both tuned.)
        xf = x.to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(xf), axis=1), QMAX), SCALE_EPS)
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        t = tl.math.fma(xf, inv[:, None], RNE_MAGIC)  # bits 0x4B400000 + round(x · inv): the low byte is the int8
        if LOW_BYTE:
            tl.store(dst, t.to(tl.int32, bitcast=True).to(tl.int8), mask=live[:, None])
        else:  # rows not 16-byte aligned (vLLM's packed layout): the integer converted by F2I, see launch_kv_write
            tl.store(dst, (t - RNE_MAGIC).to(tl.int8), mask=live[:, None])
        tl.store(scale_rows, scale, mask=live)
    else:
        tl.store(dst, x.to(dst_rows.dtype.element_ty), mask=live[:, None])


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
    num_tokens, num_heads, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    QUANT: tl.constexpr, SCALE_EPS: tl.constexpr, QMAX: tl.constexpr, RNE_MAGIC: tl.constexpr,
    LOW_BYTE: tl.constexpr = True, PDL: tl.constexpr = 0,
):
    """One program per BLOCK_T consecutive tokens × BLOCK_H KV heads: its rows are the (token, head) pairs. PDL:
    launched while the previous kernel of the stream finishes (programmatic dependent launch), waiting for it
    before the first load; 1 also lets the next kernel launch at once, 2 when this one's programs exit."""
    if PDL:
        gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()
    rows = tl.arange(0, BLOCK_T * BLOCK_H)
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + rows // BLOCK_H
    heads = tl.program_id(1) * BLOCK_H + rows % BLOCK_H
    ok = (tok < num_tokens) & (heads < num_heads)
    dims = tl.arange(0, HEAD_DIM)
    # the rows are read whether or not the token's slot is padding, so that their loads do not wait for the slots'
    # (one memory latency per program instead of two); only live rows are written
    slot = tl.load(slot_ptr + tok, mask=ok, other=-1)  # int64: block · block_size + offset
    k = tl.load(key_ptr + (tok * stride_kt + heads * stride_kh)[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(value_ptr + (tok * stride_vt + heads * stride_vh)[:, None] + dims[None, :], mask=ok[:, None],
                other=0.0)
    # negative slots are padding; out-of-range ones are skipped too (the launcher rejects them when it can check
    # without a device sync); tokens and heads past the end carry slot -1
    live = (slot >= 0) & (slot < num_slots)
    blk = tl.where(live, slot, 0) // BLOCK_SIZE
    off = tl.where(live, slot, 0) % BLOCK_SIZE
    _write_rows(k, kc_ptr + blk * stride_kcb + off * stride_kcs + heads * stride_kch,
                ks_ptr + blk * stride_ksb + off * stride_kss + heads * stride_ksh,
                live, dims, QUANT, SCALE_EPS, QMAX, RNE_MAGIC, LOW_BYTE)
    _write_rows(v, vc_ptr + blk * stride_vcb + off * stride_vcs + heads * stride_vch,
                vs_ptr + blk * stride_vsb + off * stride_vss + heads * stride_vsh,
                live, dims, QUANT, SCALE_EPS, QMAX, RNE_MAGIC, LOW_BYTE)


def heuristic_config(p: KVWriteProblem) -> KernelConfig:
    """Untuned default, the H200's winners (NOTES.md, KV cache write). int8 pages: two tokens × 512 elements (four
    KV heads of 128) on 2 warps for small writes (≤ SMALL_TOKENS, latency-bound), two tokens × 1024 on 4 warps for
    streaming ones. vLLM's packed int8 rows (F2I conversions): one token × 512 elements on one warp. fp16 / bf16
    caches: one token × 1024 elements on 4 warps."""
    quant = p.cache_dtype == torch.int8
    small = p.num_tokens <= SMALL_TOKENS
    heads_all = triton.next_power_of_2(p.num_kv_heads)
    if quant and p.packed_rows:
        elems, tokens, warps = 512, 1, 1
    elif quant:
        elems, tokens, warps = (512, 2, 2) if small else (1024, 2, 4)
    else:
        elems, tokens, warps = 1024, 1, 4
    block_h = min(heads_all, max(1, elems // p.head_dim))
    warps = max(1, min(warps, tokens * block_h * p.head_dim // 128))  # at least 4 elements per thread
    return KernelConfig(BLOCK_M=tokens, BLOCK_N=block_h, BLOCK_K=p.head_dim, num_warps=warps, num_stages=1)


def tuning_space(p: KVWriteProblem) -> list[KernelConfig]:
    """Tokens per program 1-4, heads per program all of them or half, 1-4 warps, at least 4 elements per thread."""
    heads_all = triton.next_power_of_2(p.num_kv_heads)
    space = []
    for block_h in sorted({heads_all, max(1, heads_all // 2)}, reverse=True):
        for tokens in (1, 2, 4):
            for warps in (1, 2, 4):
                if tokens * block_h * p.head_dim >= 32 * warps * 4:
                    space.append(KernelConfig(BLOCK_M=tokens, BLOCK_N=block_h, BLOCK_K=p.head_dim,
                                              num_warps=warps, num_stages=1))
    return space


def config_for(p: KVWriteProblem) -> KernelConfig:
    """The card's tuned config for these heads (``configs/<gpu>.json``, kernel ``kv_write``), else the heuristic."""
    if p.device.type != "cuda":
        return heuristic_config(p)
    return default_store().lookup(KERNEL_NAME, p.key(), p.device) or heuristic_config(p)


# Resident programs per SM at most (sm_90), and its warps: what one wave of the write's programs can hold.
MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM = 32, 64


def pdl_mode(programs: int, num_warps: int, device: torch.device) -> int:
    """How the write launches (the kernel's PDL): 0 plain (no CUDA or before sm_90); 1 where its grid fits one
    wave, so the next kernel's programs may become resident at once and wait beside ours; 2 (no early trigger)
    where it takes several waves, since a waiting program there takes the slot of one of ours. H200, CUDA graphs,
    back-to-back writes, one run, two samples each, µs plain / 1 / 2: int8 T = 64 2.59, 2.61 / 1.92, 1.92 / 2.07,
    2.44; T = 4096 (8192 one-warp programs, two waves) 10.27, 10.32 / 10.65, 10.66 / 10.12, 10.12; T = 16384 31.38,
    31.31 / 40.52, 40.54 / 31.11, 31.05; fp16 T = 64 2.01 / 1.41 / 1.89, T = 512 2.95 / 2.30 / 2.79 (same bits in
    each)."""
    if not dependent_launch_supported(device):
        return 0
    per_sm = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps)
    return 1 if programs <= per_sm * num_sms(device, DEFAULT_SMS) else 2


def launch_kv_write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, cfg=None,
                    pdl=None) -> None:
    """``pdl``: the kernel's PDL mode (``pdl_mode`` unless given)."""
    T, H, D = key.shape
    num_blocks, block_size = key_cache.shape[:2]
    quant = key_cache.dtype == torch.int8
    # Rows not 16-byte aligned (vLLM's packed int8 rows: K rows 8-byte, V rows 4-byte aligned) take their int8
    # values by F2I: storing the low byte of the rounding sum on them, Triton 3.6 left rows unwritten on 4-warp
    # programs (H200; the GPU tier checks every program shape on that layout).
    packed = quant and min(row_alignment(key_cache), row_alignment(value_cache)) < 16
    if cfg is None:
        cfg = config_for(KVWriteProblem(T, H, D, block_size, key.dtype, key_cache.dtype, key.device, packed))
    # unquantized caches: the scale pointers are never dereferenced (QUANT is a constexpr)
    ks = k_scale if quant else key_cache
    vs = v_scale if quant else value_cache
    ks_strides = k_scale.stride() if quant else (0, 0, 0)
    vs_strides = v_scale.stride() if quant else (0, 0, 0)
    grid = (triton.cdiv(T, cfg.BLOCK_M), triton.cdiv(H, cfg.BLOCK_N))
    if pdl is None:
        pdl = pdl_mode(grid[0] * grid[1], cfg.num_warps, key.device)
    _kv_write_kernel[grid](
        key, value, key_cache, value_cache, ks, vs, slot_mapping,
        T, H, num_blocks * block_size,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        *ks_strides, *vs_strides,
        BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_T=cfg.BLOCK_M, BLOCK_H=cfg.BLOCK_N,
        QUANT=quant, SCALE_EPS=KV_SCALE_EPS, QMAX=float(INT8_QMAX), RNE_MAGIC=_RNE_MAGIC,
        LOW_BYTE=not packed, PDL=pdl, num_warps=cfg.num_warps,
        **dependent_launch(pdl > 0),
    )


TUNE_TOKENS = {"small": (64, 512), "large": (4096, 16384)}  # a decode step of batch 64 and short chunks; prefill


def tune(num_kv_heads: int, head_dim: int, *, block_size: int = 16, cache_dtype=torch.int8, dtype=torch.float16,
         cases=TUNE_TOKENS["large"], device="cuda", store=None, bench=None, configs=None, packed_rows: bool = False):
    """Time ``tuning_space`` (or ``configs``) on the sum of ``cases`` (token counts, slots of shuffled blocks; int8
    caches as ``int8_page_views`` pages, the plugin's layout, or with ``packed_rows`` vLLM's packed rows with
    inline scales), check that each config writes the heuristic config's bytes, record the fastest under the
    token bucket of the largest case. Returns (best config, {config: µs}); timing as ``paged_decode.tune``."""
    from functools import partial

    from ..tuning import l2_bytes, rotation_count, tune_kernel
    from .kv_cache import INLINE_SCALE_BYTES, inline_scale_views, int8_page_bytes, int8_page_views

    device = torch.device(device)
    if packed_rows and cache_dtype != torch.int8:
        raise ValueError("packed_rows is vLLM's int8 layout: cache_dtype must be torch.int8")
    p = KVWriteProblem(max(cases), num_kv_heads, head_dim, block_size, dtype, cache_dtype, device, packed_rows)
    gen = torch.Generator(device=device).manual_seed(0)

    def make_set():
        inputs = []
        for tokens in cases:
            nb = -(-tokens // block_size)
            slots = (torch.randperm(nb, device=device, generator=gen)[:, None] * block_size
                     + torch.arange(block_size, device=device)).reshape(-1)[:tokens]
            key = torch.randn(tokens, num_kv_heads, head_dim, device=device, generator=gen).to(dtype)
            value = torch.randn(tokens, num_kv_heads, head_dim, device=device, generator=gen).to(dtype)
            if packed_rows:  # [block, slot, head, K | K scale | V | V scale], as vLLM allocates it
                pages = torch.zeros(nb, block_size, num_kv_heads, 2 * (head_dim + INLINE_SCALE_BYTES),
                                    dtype=torch.int8, device=device)
                caches = inline_scale_views(pages.transpose(1, 2), head_dim)
            elif cache_dtype == torch.int8:
                pages = torch.zeros(nb, int8_page_bytes(block_size, num_kv_heads, head_dim), dtype=torch.int8,
                                    device=device)
                caches = int8_page_views(pages, block_size, num_kv_heads, head_dim)
            else:
                pages = torch.zeros(nb, block_size, num_kv_heads, 2 * head_dim, dtype=cache_dtype, device=device)
                caches = (pages[..., :head_dim], pages[..., head_dim:], None, None)
            inputs.append(((key, value, caches[0], caches[1], slots, caches[2], caches[3]), pages))
        return inputs

    sets = [make_set()]
    set_bytes = sum(t.numel() * t.element_size() for args, pages in sets[0] for t in (*args[:2], pages))
    sets += [make_set() for _ in range(1, rotation_count(set_bytes, l2_bytes(device)))]

    def make_call(cfg):
        for _, pages in sets[0]:  # the checked call starts from zeroed pages: a config that skips a row fails
            pages.zero_()

        def run(inputs):
            for args, _ in inputs:
                launch_kv_write(*args, cfg=cfg)
            return [pages for _, pages in inputs]

        return [partial(run, inputs) for inputs in sets]

    baseline = [pages.clone() for pages in make_call(heuristic_config(p))[0]()]

    def check(outs):
        for out, ref in zip(outs, baseline):
            if not torch.equal(out, ref):
                raise ValueError("the cache bytes differ from the default config's")

    return tune_kernel(store or default_store(), KERNEL_NAME, p.key(), configs or tuning_space(p), make_call, device,
                       check=check, bench=bench)


def _run_triton(p, *args):
    launch_kv_write(*args)


def _run_reference(p, *args):
    write_kv_cache_ref(*args)


KV_WRITE: KernelFamily[KVWriteProblem] = KernelFamily(
    "kv_write",
    [
        Candidate("triton", can_implement=lambda p: triton_runnable_on(p.device), run=_run_triton),
        Candidate("reference", can_implement=lambda p: (True, ""), run=_run_reference),
    ],
    problem_key=lambda p: (p.num_kv_heads, p.head_dim, p.block_size, p.dtype, p.cache_dtype, p.device.type),
)


def _validate(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale):
    num_blocks, block_size, heads, head_dim, _ = check_kv_caches(key_cache, value_cache, k_scale, v_scale,
                                                                 writable=True)
    check_query_dtype("key", key, key_cache.dtype)
    check_tensor("value", value, dtypes=(key.dtype,))
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (heads, head_dim):
            raise ValueError(f"{name} must have shape [num_tokens, {heads}, {head_dim}] to match the cache,"
                             f" got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {t.stride()}")
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key has {key.shape[0]} tokens but value has {value.shape[0]}")
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), dim=1)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must have one slot per token ({key.shape[0]}), got {slot_mapping.shape[0]}")
    check_same_device(key=key, value=value, key_cache=key_cache, slot_mapping=slot_mapping)
    return num_blocks * block_size


def _check_slots_on_host(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Only where the slots are readable without a device sync (CPU tensors). On CUDA an out-of-range slot is
    skipped by the kernel (never written out of bounds) and not reported."""
    if slot_mapping.device.type != "cpu" or slot_mapping.numel() == 0:
        return
    top = int(slot_mapping.max())
    if top >= num_slots:
        raise ValueError(f"slot_mapping has slot {top} but the cache holds {num_slots} slots"
                         " (num_blocks · block_size)")


def _write_fake(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale):
    _validate(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def _samples(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    T, H, D, nb, bs = 5, 2, 64, 3, 16
    for cache_dtype in (torch.int8, torch.float16):
        key = torch.randn(T, H, D, generator=g).half().to(device)
        value = torch.randn(T, H, D, generator=g).half().to(device)
        kc = torch.zeros(nb, bs, H, D, dtype=cache_dtype, device=device)
        vc = torch.zeros_like(kc)
        slots = torch.tensor([3, 17, -1, 40, 0], dtype=torch.int64, device=device)
        if cache_dtype == torch.int8:
            ks = torch.ones(nb, bs, H, device=device)
            vs = torch.ones(nb, bs, H, device=device)
        else:
            ks = vs = None
        yield (key, value, kc, vc, slots, ks, vs), {}


# The registered op's schema gives k_scale/v_scale no default on purpose:
#   write_kv_cache(Tensor key, Tensor value, Tensor(a2!) key_cache, Tensor(a3!) value_cache, Tensor slot_mapping,
#                  Tensor(a5!)? k_scale, Tensor(a6!)? v_scale) -> ()
# When a Python kernel is called back from the dispatcher, trailing positional arguments equal to their schema
# default are dropped from ``args``; torch 2.11's version-bump kernel of mutable custom ops (ADInplaceOrView)
# then indexes ``args`` by the mutated arguments' schema positions and fails with ``IndexError`` for fp16/bf16
# caches (both scales None). An argument without a default is always passed. The user-facing defaults live in
# the thin ``write_kv_cache`` below, which always passes all seven arguments.
@register_op(
    "write_kv_cache",
    fake=_write_fake,
    samples=_samples,
    mutates_args=("key_cache", "value_cache", "k_scale", "v_scale"),
)
def _write_kv_cache_op(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
) -> None:
    num_slots = _validate(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    _check_slots_on_host(slot_mapping, num_slots)
    if key.shape[0] == 0:
        return
    p = KVWriteProblem(
        key.shape[0], key.shape[1], key.shape[2], key_cache.shape[1], key.dtype, key_cache.dtype, key.device
    )
    cand = KV_WRITE.select(p, force="reference" if reference_forced() else None)
    cand.run(p, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Write key/value [T, H_kv, D] (fp16/bf16) into the paged caches in place.

    key_cache/value_cache: [num_blocks, block_size, H_kv, D] views, int8 (then k_scale/v_scale fp32
    [num_blocks, block_size, H_kv] receive one scale per token and head) or the dtype of key/value.
    slot_mapping: int64 [T], ``block · block_size + offset``; a negative slot leaves the cache untouched.
    Calls the registered op ``torch.ops.angel_kernels.write_kv_cache``, which takes all seven arguments
    (pass ``None, None`` as the scales of fp16/bf16 caches).
    """
    _write_kv_cache_op(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
