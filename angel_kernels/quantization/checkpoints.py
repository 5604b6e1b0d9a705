"""Readers that repack int4 checkpoint tensors into our layout, once, at load time.

Every reader returns an ``Int4Weight`` (layout in ``reference/int4.py``) whose ``dequantize()`` equals the
checkpoint format's own dequantization exactly (the tests prove it from independently packed tensors). 4-bit only.

Supported formats (per linear layer; y = x · Wᵀ, W [N, K], g = group size, ``q[k, n]`` the stored nibble):

- **GPTQ** (AutoGPTQ / GPTQModel / optimum): ``qweight [K/8, N]`` int32 (8 K rows per word, low nibble first —
  our layout already), ``qzeros [K/g, N/8]`` int32 (8 columns per word, low nibble first), ``scales [K/g, N]``,
  optional ``g_idx [K]`` (group of each input row; act-order / ``desc_act`` makes it non-monotonic).
  Formula: ``W[n, k] = scales[g_idx[k], n] · (q[k, n] − zero[g_idx[k], n])`` with
  ``zero = stored + 1`` for ``checkpoint_format="gptq"`` (the classic export stores ``zero − 1``; a zero of 0 is
  stored as −1 and reads back as 16 — the formula, and we, keep that) and ``zero = stored`` for ``"gptq_v2"``.
  ``sym=True`` checkpoints have zero 8 everywhere: we check that and drop the zeros (symmetric layout).
- **AWQ** (AutoAWQ "GEMM" packing): ``qweight [K, N/8]`` int32 packed along N in the nibble order
  [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds column 8c + order[i]), ``qzeros [K/g, N/8]`` in the same order,
  ``scales [K/g, N]``. Formula: ``W[n, k] = scales[k // g, n] · (q[k, n] − zero[k // g, n])``.
- **compressed-tensors** ``pack-quantized`` (llm-compressor W4A16): ``weight_packed [N, K/8]`` int32 (8 K values
  per word, low nibble first, stored as value + 8), ``weight_scale [N, K/g]`` (``[N, 1]`` channel-wise),
  optional ``weight_zero_point [ceil(N/8), K/g]`` int32 (asymmetric: packed 8 per word along N, value + 8),
  optional ``weight_g_idx [K]`` (``actorder="group"``), ``weight_shape`` = [N, K].
  Formula: ``W[n, k] = weight_scale[n, g_idx[k]] · ((u − 8) − (zu − 8))`` with u, zu the stored nibbles (zero
  point 0 when symmetric), i.e. symmetric is our ``q − 8`` with q = u, and asymmetric is ``u − zu``.

Act-order (a non-trivial ``g_idx``) is undone by sorting the input rows by group: the packed rows become
``perm = argsort(g_idx)`` (stable), each group contiguous again, and ``perm`` travels with the weight so the op
reads ``x[..., perm]`` (inside the kernel's x load: no extra pass over x).
"""
from typing import Optional

import torch

from ..reference.int4 import INT4_PACK, INT4_SYM_ZERO, unpack_int4_rows
from .int4 import INT4_GROUP_SIZES, Int4Weight, pack_int4_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ: nibble i of a word holds column 8c + AWQ_ORDER[i]
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset added to the stored zero
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_int32(name: str, t, dim: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} dtype must be int32 (packed int4), got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_scales(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SCALE_DTYPES:
        raise TypeError(f"{name} dtype must be float16, bfloat16 or float32, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _group_size(k: int, n_groups: int, what: str) -> int:
    if n_groups < 1 or k % n_groups:
        raise ValueError(f"{what}: {n_groups} scale groups do not divide K={k}")
    g = k // n_groups
    if g not in INT4_GROUP_SIZES and g != k:
        raise ValueError(f"{what}: group size {g} (K={k}, {n_groups} groups) is not supported; "
                         f"use one of {INT4_GROUP_SIZES} or channel-wise")
    return g


def _unpack_int4_cols(packed: torch.Tensor, order=tuple(range(INT4_PACK))) -> torch.Tensor:
    """int32 [R, C] packed along columns → int32 [R, 8C]; nibble i of word c is column 8c + order[i]."""
    r, c = packed.shape
    out = torch.empty((r, c, INT4_PACK), dtype=torch.int32, device=packed.device)
    for i, col in enumerate(order):
        out[:, :, col] = (packed >> (4 * i)) & 0xF
    return out.reshape(r, c * INT4_PACK)


def _sort_by_group(q: torch.Tensor, g_idx: Optional[torch.Tensor], group_size: int, n_groups: int):
    """Rows of q [K, N] reordered so each group is contiguous; returns (q, perm int32 [K] or None)."""
    k = q.shape[0]
    if g_idx is None:
        return q, None
    if not isinstance(g_idx, torch.Tensor) or g_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError("g_idx must be an int32/int64 tensor [K]")
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    g_idx = g_idx.to(q.device, torch.int64)
    sequential = torch.arange(k, device=q.device) // group_size
    if torch.equal(g_idx, sequential):
        return q, None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], sequential):
        counts = torch.bincount(g_idx.clamp(0, n_groups), minlength=n_groups + 1)[:n_groups].tolist()
        raise ValueError(f"g_idx does not put exactly {group_size} rows in each of {n_groups} groups "
                         f"(rows per group: {counts[:8]}...): it cannot be stored group-contiguously")
    return q[perm], perm.to(torch.int32)


def repack_gptq(
    qweight: torch.Tensor,
    qzeros: Optional[torch.Tensor],
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor] = None,
    *,
    sym: bool,
    checkpoint_format: str = "gptq",
) -> Int4Weight:
    """GPTQ 4-bit tensors (see module doc) → ``Int4Weight``; ``qzeros`` may be None only when ``sym``."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {sorted(GPTQ_FORMATS)}, got {checkpoint_format!r}")
    _check_int32("qweight", qweight)
    _check_scales("scales", scales)
    k, n = qweight.shape[0] * INT4_PACK, qweight.shape[1]
    if scales.shape[1] != n:
        raise ValueError(f"scales must have shape (K // group_size, {n}) for qweight [K // 8, N]={tuple(qweight.shape)},"
                         f" got {tuple(scales.shape)}")
    n_groups = scales.shape[0]
    group_size = _group_size(k, n_groups, "GPTQ")
    zeros = None
    if qzeros is not None:
        _check_int32("qzeros", qzeros)
        if n % INT4_PACK or tuple(qzeros.shape) != (n_groups, n // INT4_PACK):
            raise ValueError(f"qzeros must have shape ({n_groups}, {n} // 8) with N a multiple of 8, "
                             f"got {tuple(qzeros.shape)} for N={n}")
        zeros = _unpack_int4_cols(qzeros) + GPTQ_FORMATS[checkpoint_format]
    elif not sym:
        raise ValueError("asymmetric GPTQ (sym=False) needs qzeros")
    if sym:
        if zeros is not None and not bool((zeros == INT4_SYM_ZERO).all()):
            raise ValueError(f"sym=True but the zero points (checkpoint_format={checkpoint_format!r}) are not all "
                             f"{INT4_SYM_ZERO}: load it with sym=False or check checkpoint_format")
        zeros = None
    q, perm = _sort_by_group(unpack_int4_rows(qweight), g_idx, group_size, n_groups)
    packed = pack_int4_rows(q) if perm is not None else qweight.contiguous()
    return Int4Weight(packed, scales.contiguous(), zeros.to(torch.uint8) if zeros is not None else None,
                      group_size, perm)


def repack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
    """AWQ GEMM-packed 4-bit tensors (see module doc) → ``Int4Weight`` (asymmetric)."""
    _check_int32("qweight", qweight)
    _check_int32("qzeros", qzeros)
    _check_scales("scales", scales)
    k, n = qweight.shape[0], qweight.shape[1] * INT4_PACK
    if k % INT4_PACK:
        raise ValueError(f"AWQ qweight [K, N // 8] has K={k}: K must be a multiple of 8")
    if scales.shape[1] != n:
        raise ValueError(f"scales must have shape (K // group_size, {n}) for qweight [K, N // 8]={tuple(qweight.shape)},"
                         f" got {tuple(scales.shape)}")
    n_groups = scales.shape[0]
    group_size = _group_size(k, n_groups, "AWQ")
    if tuple(qzeros.shape) != (n_groups, n // INT4_PACK):
        raise ValueError(f"qzeros must have shape ({n_groups}, {n // INT4_PACK}), got {tuple(qzeros.shape)}")
    q = _unpack_int4_cols(qweight, AWQ_ORDER)  # [K, N]
    zeros = _unpack_int4_cols(qzeros, AWQ_ORDER).to(torch.uint8)
    return Int4Weight(pack_int4_rows(q), scales.contiguous(), zeros, group_size)


def repack_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: Optional[torch.Tensor] = None,
    weight_g_idx: Optional[torch.Tensor] = None,
    weight_shape: Optional[torch.Tensor] = None,
) -> Int4Weight:
    """compressed-tensors ``pack-quantized`` 4-bit tensors (see module doc) → ``Int4Weight``."""
    _check_int32("weight_packed", weight_packed)
    _check_scales("weight_scale", weight_scale)
    n, k = weight_packed.shape[0], weight_packed.shape[1] * INT4_PACK
    if weight_shape is not None:
        shape = tuple(int(v) for v in torch.as_tensor(weight_shape).reshape(-1).tolist())
        if len(shape) != 2 or shape[0] != n or not (k - INT4_PACK < shape[1] <= k):
            raise ValueError(f"weight_shape {shape} does not match weight_packed {tuple(weight_packed.shape)}")
        if shape[1] != k:
            raise ValueError(f"in_features={shape[1]} is not a multiple of 8: our layout cannot hold it")
    if weight_scale.shape[0] != n:
        raise ValueError(f"weight_scale must have shape ({n}, K // group_size), got {tuple(weight_scale.shape)}")
    n_groups = weight_scale.shape[1]
    group_size = _group_size(k, n_groups, "compressed-tensors")
    zeros = None
    if weight_zero_point is not None:
        _check_int32("weight_zero_point", weight_zero_point)
        if tuple(weight_zero_point.shape) != (-(-n // INT4_PACK), n_groups):
            raise ValueError(f"weight_zero_point must have shape (ceil({n} / 8), {n_groups}) (packed along N), "
                             f"got {tuple(weight_zero_point.shape)}")
        zeros = _unpack_int4_cols(weight_zero_point.t())[:, :n].to(torch.uint8)  # [K/g, N], stored as zero + 8
    # The stored nibble u = value + 8 is already our unsigned symmetric value (value = u − 8); asymmetric:
    # (u − 8) − (zu − 8) = u − zu. Words pack 8 consecutive K values low nibble first, as ours: transpose only.
    qweight = weight_packed.t().contiguous()
    perm = None
    if weight_g_idx is not None:
        q, perm = _sort_by_group(unpack_int4_rows(qweight), weight_g_idx, group_size, n_groups)
        if perm is not None:
            qweight = pack_int4_rows(q)
    return Int4Weight(qweight, weight_scale.t().contiguous(), zeros, group_size, perm)
