"""KV cache write: scatter the new tokens' key/value rows into a paged cache, quantizing for int8 caches.

int8 caches: one fp32 scale per (token, KV head), ``scale = max(absmax / 127, eps)``, values
``clamp(round_half_even(x / scale), -127, 127)`` with correctly rounded fp32 division in both steps:
bit-identical to ``reference.quantize_kv_ref`` on every device (the attention kernels read any int8 · scale,
so caches written by vLLM's own kernel, which rounds half away from zero and may store -128, read correctly
too). fp16/bf16 caches: a copy.

Candidates (``ANGEL_KERNELS_FORCE_KV_WRITE`` / ``ANGEL_KERNELS_DISABLE=kv_write.<name>``):
- ``triton``: one program per (token, group of KV heads); a negative slot skips the token.
- ``reference``: the pure-torch write (CPU path).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import check_same_device, check_tensor
from .._registry import register_op
from ..dispatch import Candidate, KernelFamily
from ..reference.attention import KV_SCALE_EPS, write_kv_cache_ref
from ..reference.quant import INT8_QMAX
from ..runtime import reference_forced, triton_runnable_on
from .kv_cache import check_kv_caches, check_query_dtype

# Adding then subtracting 1.5 · 2^23 rounds an fp32 |y| < 2^22 to the nearest integer, ties to even (the sum
# lands where the fp32 spacing is 1), i.e. torch.round; Triton has no portable rint (libdevice is CUDA-only).
_RNE_MAGIC = 12582912.0
# ~4K elements per program: Llama-3-8B (8 KV heads × 128) writes one token's K and V with one program each.
_ELEMS_PER_PROGRAM = 4096


@dataclass(frozen=True)
class KVWriteProblem:
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # of key/value
    cache_dtype: torch.dtype
    device: torch.device


@triton.jit
def _write_rows(
    src_ptr, stride_src_h, dst_ptr, stride_dst_h, scale_ptr, stride_scale_h,
    heads, head_mask, dims,
    QUANT: tl.constexpr, SCALE_EPS: tl.constexpr, QMAX: tl.constexpr, RNE_MAGIC: tl.constexpr,
):
    """Copy (or quantize) the rows ``heads`` × [HEAD_DIM] of one token from ``src`` into one cache slot."""
    src = src_ptr + heads[:, None] * stride_src_h + dims[None, :]
    dst = dst_ptr + heads[:, None] * stride_dst_h + dims[None, :]
    x = tl.load(src, mask=head_mask[:, None], other=0.0)
    if QUANT:
        # Bit-exact with reference.quantize_kv_ref; every step is one correctly rounded IEEE fp32 operation:
        # - fp16/bf16 → fp32, abs and max are exact, so absmax does not depend on the reduction order;
        # - both divisions are tl.math.div_rn (PTX div.rn.f32): Triton's plain fp32 '/' lowers to the
        #   approximate div.full.f32 on NVIDIA GPUs, and a reciprocal multiply x · (1/127) is a second rounding
        #   (it differs from x / 127 in the last bit for ~4.5 % of inputs);
        # - the rounding is two separate fp32 adds (add.rn is PTX's default) and no multiplication is anywhere
        #   in the chain, so FMA contraction (which fuses a mul into an add) cannot change a result.
        xf = x.to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(xf), axis=1), QMAX), SCALE_EPS)
        y = tl.math.div_rn(xf, scale[:, None])
        y = (y + RNE_MAGIC) - RNE_MAGIC  # round half to even (|y| <= ~128 << 2^22)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(dst, y.to(tl.int8), mask=head_mask[:, None])
        tl.store(scale_ptr + heads * stride_scale_h, scale, mask=head_mask)
    else:
        tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=head_mask[:, None])


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
    num_heads, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    QUANT: tl.constexpr, SCALE_EPS: tl.constexpr, QMAX: tl.constexpr, RNE_MAGIC: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok)  # int64: block · block_size + offset; negative = padding
    # out-of-range slots are skipped too (the launcher rejects them when it can check without a device sync)
    if (slot >= 0) & (slot < num_slots):
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        head_mask = heads < num_heads
        dims = tl.arange(0, HEAD_DIM)
        _write_rows(
            key_ptr + tok * stride_kt, stride_kh,
            kc_ptr + blk * stride_kcb + off * stride_kcs, stride_kch,
            ks_ptr + blk * stride_ksb + off * stride_kss, stride_ksh,
            heads, head_mask, dims, QUANT, SCALE_EPS, QMAX, RNE_MAGIC,
        )
        _write_rows(
            value_ptr + tok * stride_vt, stride_vh,
            vc_ptr + blk * stride_vcb + off * stride_vcs, stride_vch,
            vs_ptr + blk * stride_vsb + off * stride_vss, stride_vsh,
            heads, head_mask, dims, QUANT, SCALE_EPS, QMAX, RNE_MAGIC,
        )


def launch_kv_write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale) -> None:
    T, H, D = key.shape
    num_blocks, block_size = key_cache.shape[:2]
    quant = key_cache.dtype == torch.int8
    block_h = min(triton.next_power_of_2(H), max(1, _ELEMS_PER_PROGRAM // D))
    # unquantized caches: the scale pointers are never dereferenced (QUANT is a constexpr)
    ks = k_scale if quant else key_cache
    vs = v_scale if quant else value_cache
    ks_strides = k_scale.stride() if quant else (0, 0, 0)
    vs_strides = v_scale.stride() if quant else (0, 0, 0)
    grid = (T, triton.cdiv(H, block_h))
    _kv_write_kernel[grid](
        key, value, key_cache, value_cache, ks, vs, slot_mapping,
        H, num_blocks * block_size,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        *ks_strides, *vs_strides,
        BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_H=block_h,
        QUANT=quant, SCALE_EPS=KV_SCALE_EPS, QMAX=float(INT8_QMAX), RNE_MAGIC=_RNE_MAGIC,
        num_warps=4 if block_h * D >= 1024 else 2,
    )


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
    num_blocks, block_size, heads, head_dim, _ = check_kv_caches(key_cache, value_cache, k_scale, v_scale, writable=True)
    check_query_dtype("key", key, key_cache.dtype)
    check_tensor("value", value, dtypes=(key.dtype,))
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (heads, head_dim):
            raise ValueError(f"{name} must have shape [num_tokens, {heads}, {head_dim}] to match the cache, got {tuple(t.shape)}")
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
        raise ValueError(f"slot_mapping has slot {top} but the cache holds {num_slots} slots (num_blocks · block_size)")


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
