"""``quantization="ifq_int4"``: int4 group-wise weight-only linear layers, read from a PTQ checkpoint.

Reads the 4-bit checkpoints that GPTQ (AutoGPTQ / GPTQModel / optimum, ``checkpoint_format`` gptq or gptq_v2),
AutoAWQ (GEMM packing) and llm-compressor (compressed-tensors ``pack-quantized`` W4A16) write. Each linear layer is
created with vLLM's parameter classes in the checkpoint's own layout, so vLLM's loaders place every tensor:
merged qkv / gate_up shards, column-parallel slices of N, row-parallel slices of K together with their scale
groups. After loading, ``process_weights_after_loading`` repacks the layer once with the library's readers
(``repack_gptq`` / ``repack_awq`` / ``repack_compressed_tensors``) into the layout of ``w4a16_gemm``:

- ``layer.int4_qweight`` int32 [K / 8, N], ``layer.int4_scales`` [K / g, N] (fp16, bf16 or fp32: the smallest of
  them that holds the checkpoint's scales exactly), ``layer.int4_zeros`` uint8 [K / g, N] or None (symmetric),
  ``layer.int4_perm`` int32 [K] or None (act-order), ``layer.int4_group_size`` (K for channel-wise),

and drops the checkpoint tensors. ``apply`` runs ``angel_kernels.w4a16_gemm`` (compiled Triton on CUDA; on CPU
the pure-torch reference, or the Triton interpreter under ``TRITON_INTERPRET=1``). On an sm_90 GPU a symmetric
group-128 layer without act-order whose shape is whole 64 × 128 tiles is stored fragment-major instead
(``angel_kernels.fragment_major_int4``, ``layer.int4_fragment``) and served by ``w4a16_fragment_gemm``: the same
results, the weight fed to wgmma from registers (H100, 28672×4096 at M = 1: 28.4 instead of 36.1 µs).

Selection. ``LLM(model=gptq_awq_or_ct_path, quantization="ifq_int4")``: ``override_quantization_method`` claims
such a checkpoint only when the user asked for ``ifq_int4``. Without the flag the checkpoint keeps vLLM's own
method (``auto_gptq``, ``auto_awq`` / CPU AWQ, ``compressed-tensors``): installing the plugin changes nothing for
users who did not ask for it. A checkpoint without a quantization config gets a clear error (``ifq`` is the
method for fp16/bf16 checkpoints), and so does an unsupported one (bits, group size, packing) when the config is
built, or a layer shape the layout cannot hold (see below) when the layer is created, before any weight is read.

Scales load into fp32 parameters (exact for fp16, bf16 and fp32 checkpoints alike: vLLM's own methods load them
into the model dtype, which rounds fp16 scales when the model runs in bf16). Until the repack that costs 4 bytes
per group instead of 2 (at group 128: 0.031 instead of 0.016 bytes per weight, next to the int4 weight's 0.5).

Tensor parallelism: a row-parallel rank holds K / tp input rows and the scale groups of those rows, so K / tp must
be a multiple of the group size; channel-wise scales are replicated. Act-order (``desc_act`` /
``actorder="group"``): ``g_idx`` is loaded and becomes ``perm``; on a row-parallel rank the scales are replicated
and each rank keeps the groups its rows use, which must be whole groups (true for GPTQModel's static groups, not
for classic act-order at TP > 1: that case is refused with an error). Shards of a merged layer share one
``g_idx`` (GPTQ's act-order comes from the shared input's statistics); a checkpoint whose shards differ is refused
while loading.

Only ``LinearBase`` layers are quantized; embeddings and ``lm_head`` stay in the model dtype (a checkpoint with a
quantized ``lm_head`` is refused), attention gets no method. Activations: fp16 and bf16.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from angel_kernels import (
    fragment_major_int4, repack_awq, repack_compressed_tensors, repack_gptq, w4a16_fragment_gemm, w4a16_gemm,
)
from angel_kernels.gemm.fragment import GROUP_SIZE as FRAGMENT_GROUP_SIZE, fragment_fits, fragment_kernel_runs_on

from ._compat import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    LinearBase,
    LinearMethodBase,
    PackedColumnParameter,
    PackedvLLMParameter,
    QuantizeMethodBase,
    RowvLLMParameter,
    UnquantizedLinearMethod,
    checkpoint_modules,
    ct_layer_is_ignored,
    ct_layer_is_targeted,
    gptq_layer_is_quantized,
    is_layer_skipped,
    register_quantization_method,
    weights_mapper,
)
from .quant_ifq import WeightOnlyConfig

__all__ = ["IFQ_INT4_NAME", "IfqInt4Config", "IfqInt4LinearMethod", "register_ifq_int4"]

IFQ_INT4_NAME = "ifq_int4"
FORMATS = ("gptq", "awq", "compressed-tensors")  # the checkpoint's quant_method values we read
GROUP_SIZES = (32, 64, 128)  # what w4a16_gemm serves, plus channel-wise (-1)
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PACK = 8  # int4 values per int32 word
OUR_PARAMS = ("int4_qweight", "int4_scales", "int4_zeros", "int4_perm")


def _fail(msg: str) -> ValueError:
    return ValueError(f"ifq_int4: {msg}")


def _check_bits(bits, what: str) -> None:
    if bits != 4:
        raise _fail(f"{what} has {bits}-bit weights; ifq_int4 reads 4-bit checkpoints only (vLLM's own method "
                    f"loads this one: leave quantization unset)")


def _normalize_group_size(group_size, what: str) -> int:
    g = -1 if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or (g not in GROUP_SIZES and g != -1):
        raise _fail(f"{what} has group_size={group_size!r}; supported: {GROUP_SIZES} or -1 (channel-wise)")
    return g


@dataclass
class _Scheme:
    """What every quantized linear layer of the checkpoint looks like."""

    fmt: str  # "gptq" | "awq" | "compressed-tensors"
    group_size: int  # -1: channel-wise
    sym: bool
    act_order: bool = False  # a g_idx tensor per layer (GPTQ desc_act, compressed-tensors actorder="group")
    checkpoint_format: str = "gptq"  # GPTQ only: "gptq" (v1, zero − 1 stored) or "gptq_v2"
    # which layers are quantized (others load unquantized); semantics per format, see get_quant_method
    skip: list[str] = field(default_factory=list)  # AWQ modules_to_not_convert / compressed-tensors ignore
    only: list[str] = field(default_factory=list)  # GPTQ modules_in_block_to_quantize (empty: all)
    targets: list[str] = field(default_factory=lambda: ["Linear"])  # compressed-tensors targets


def _parse_gptq(cfg: dict) -> _Scheme:
    what = "this GPTQ checkpoint"
    _check_bits(cfg.get("bits"), what)
    g = _normalize_group_size(cfg.get("group_size"), what)
    fmt = cfg.get("checkpoint_format") or cfg.get("format") or "gptq"
    if fmt not in GPTQ_CHECKPOINT_FORMATS:
        raise _fail(f"{what} has checkpoint_format={fmt!r}; supported: {GPTQ_CHECKPOINT_FORMATS} "
                    f"(marlin / bitblas repacked exports are not read)")
    if cfg.get("dynamic"):
        raise _fail(f"{what} has per-module overrides (dynamic={cfg['dynamic']!r}); one scheme for every layer "
                    f"is supported")
    if cfg.get("lm_head"):
        raise _fail(f"{what} has a quantized lm_head (lm_head=true); only the decoder's linear layers are read")
    sym = cfg.get("sym", True)
    desc_act = cfg.get("desc_act", False)
    if not isinstance(sym, bool) or not isinstance(desc_act, bool):
        raise _fail(f"{what}: sym and desc_act must be booleans, got sym={sym!r}, desc_act={desc_act!r}")
    only = cfg.get("modules_in_block_to_quantize") or []
    flat = [m for group in only for m in (group if isinstance(group, list) else [group])]
    return _Scheme("gptq", g, sym, act_order=desc_act and g != -1, checkpoint_format=fmt, only=flat)


def _parse_awq(cfg: dict) -> _Scheme:
    what = "this AWQ checkpoint"
    _check_bits(cfg.get("w_bit", cfg.get("bits")), what)
    g = _normalize_group_size(cfg.get("q_group_size", cfg.get("group_size")), what)
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise _fail(f"{what} has version={cfg.get('version')!r}; AutoAWQ's GEMM packing is supported "
                    f"(GEMV / Marlin packings are not)")
    if cfg.get("zero_point", True) is not True:
        raise _fail(f"{what} has zero_point={cfg.get('zero_point')!r}; AWQ GEMM checkpoints with zero points "
                    f"are supported")
    if cfg.get("lm_head"):
        raise _fail(f"{what} has a quantized lm_head; only the decoder's linear layers are read")
    return _Scheme("awq", g, sym=False, skip=list(cfg.get("modules_to_not_convert") or []))


def _parse_compressed_tensors(cfg: dict) -> _Scheme:
    what = "this compressed-tensors checkpoint"
    groups = cfg.get("config_groups") or {}
    if len(groups) != 1:
        raise _fail(f"{what} has {len(groups)} config_groups; one W4A16 scheme for every layer is supported")
    (name, group), = groups.items()
    fmt = group.get("format") or cfg.get("format")
    if fmt != "pack-quantized":
        raise _fail(f"{what} has format={fmt!r}; the int4 weight-only format 'pack-quantized' is supported")
    if group.get("input_activations") or group.get("output_activations"):
        raise _fail(f"{what} quantizes activations (config group {name!r}); ifq_int4 is weight-only (W4A16)")
    w = group.get("weights") or {}
    _check_bits(w.get("num_bits"), what)
    if w.get("type", "int") != "int" or w.get("dynamic", False):
        raise _fail(f"{what} has weights of type={w.get('type')!r}, dynamic={w.get('dynamic')!r}; static int "
                    f"weights are supported")
    strategy = w.get("strategy")
    if strategy == "channel":
        g = -1
    elif strategy == "group":
        g = _normalize_group_size(w.get("group_size"), what)
    else:
        raise _fail(f"{what} has strategy={strategy!r}; 'group' and 'channel' are supported")
    actorder = w.get("actorder")
    if actorder not in (None, "static", "weight", "group"):
        raise _fail(f"{what} has actorder={actorder!r}; supported: None, 'weight'/'static' or 'group'")
    if cfg.get("kv_cache_scheme"):
        raise _fail(f"{what} also quantizes the KV cache (kv_cache_scheme); not supported with ifq_int4")
    sparsity = cfg.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise _fail(f"{what} is sparse (sparsity_config format {sparsity.get('format')!r}); not supported")
    targets = list(group.get("targets") or [])
    if any("lm_head" in t for t in targets):
        raise _fail(f"{what} targets lm_head; only the decoder's linear layers are read")
    return _Scheme("compressed-tensors", g, sym=bool(w.get("symmetric", True)), act_order=actorder == "group" and g != -1,
                   skip=list(cfg.get("ignore") or []), targets=targets)


_PARSERS = {"gptq": _parse_gptq, "awq": _parse_awq, "compressed-tensors": _parse_compressed_tensors}


def _checkpoint_method(cfg: dict) -> str:
    return str(cfg.get("quant_method", "")).lower()


class IfqInt4Config(WeightOnlyConfig):
    """int4 weight-only layers from a GPTQ / AWQ / compressed-tensors checkpoint (see module doc).

    Module-level (not defined inside ``register``) so that it unpickles in vLLM's worker processes. Built by
    ``from_config`` from the checkpoint's ``quantization_config``; vLLM builds it with no argument when the
    checkpoint has none, which is refused with an explanation.
    """

    def __init__(self, scheme: Optional[_Scheme] = None) -> None:
        super().__init__()
        if scheme is None:
            raise _fail("the model has no quantization_config: ifq_int4 loads int4 checkpoints (GPTQ, AWQ, "
                        "compressed-tensors pack-quantized). For an fp16/bf16 checkpoint use quantization='ifq' "
                        "(int8, quantized while loading), or write a GPTQ checkpoint first with "
                        "angel_kernels.quantization.export_gptq_checkpoint")
        self.scheme = scheme

    def __repr__(self) -> str:
        s = self.scheme
        return (f"IfqInt4Config(format={s.fmt}, group_size={s.group_size}, sym={s.sym}, act_order={s.act_order}"
                + (f", checkpoint_format={s.checkpoint_format}" if s.fmt == "gptq" else "") + ")")

    def get_name(self) -> str:
        return IFQ_INT4_NAME

    @staticmethod
    def get_config_filenames() -> list[str]:
        # The quantization config comes from config.json (every GPTQ / AWQ / llm-compressor export writes it
        # there). With none, vLLM calls IfqInt4Config(), which explains what ifq_int4 needs.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "IfqInt4Config":
        method = _checkpoint_method(config)
        if method not in _PARSERS:
            raise _fail(f"checkpoint quant_method {config.get('quant_method')!r} is not read; supported: {FORMATS}")
        return cls(_PARSERS[method](config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[str]:
        """Claim GPTQ / AWQ / compressed-tensors checkpoints only when the user asked for ``ifq_int4``.

        vLLM asks every registered method (custom ones first) before its own; returning the name for
        ``user_quant=None`` would take every GPTQ checkpoint away from vLLM's own method, so it is never done.
        Unsupported variants (8 bits, other packings) are still claimed when asked for, so that ``from_config``
        can say what is wrong instead of vLLM's generic "does not match" error.
        """
        if user_quant != IFQ_INT4_NAME or not isinstance(hf_quant_cfg, dict):
            return None
        return IFQ_INT4_NAME if _checkpoint_method(hf_quant_cfg) in FORMATS else None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if not isinstance(layer, LinearBase):
            return None
        return IfqInt4LinearMethod(self, prefix) if self._is_quantized(layer, prefix) else UnquantizedLinearMethod()

    def _is_quantized(self, layer: torch.nn.Module, prefix: str) -> bool:
        s, fused = self.scheme, self.packed_modules_mapping
        if s.fmt == "gptq":
            return gptq_layer_is_quantized(prefix, s.only, fused)
        if s.fmt == "awq":
            return not is_layer_skipped(prefix, s.skip, fused, match_mode="substring")
        return ct_layer_is_targeted(prefix, layer, s.targets, fused) and not ct_layer_is_ignored(prefix, s.skip, fused)

    def get_checkpoint_weight_mapper(self):
        # vLLM's default drops every `.g_idx` (its kernels no longer read act-order); act-order needs it.
        return weights_mapper() if self.scheme.act_order else super().get_checkpoint_weight_mapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.scheme.skip = hf_to_vllm_mapper.apply_list(self.scheme.skip)
        self.scheme.only = hf_to_vllm_mapper.apply_list(self.scheme.only)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        # GPTQ and AWQ checkpoints may leave layers unquantized without saying so; as vLLM's own methods, read
        # which modules hold int32 tensors from the safetensors headers when the config lists none.
        s = self.scheme
        if (s.fmt == "gptq" and not s.only) or (s.fmt == "awq" and not s.skip):
            modules, quantized = checkpoint_modules(model_name, revision)
            if s.fmt == "gptq":
                s.only = quantized
            else:
                s.skip = sorted(set(modules) - set(quantized))


# --------------------------------------------------------------------------------------------- linear method
def _compact_float(t: torch.Tensor) -> torch.Tensor:
    """fp32 → fp16 or bf16 when that holds every value exactly (what the checkpoint stored), else fp32."""
    for dtype in (torch.float16, torch.bfloat16):
        c = t.to(dtype)
        if torch.equal(c.to(t.dtype), t):
            return c
    return t


def _rank_groups(g_idx: torch.Tensor, n_groups: int, group_size: int, prefix: str):
    """Act-order rows of one row-parallel rank → (groups they use, sorted; g_idx renumbered 0..).

    The kernel needs each group as ``group_size`` contiguous rows, so the rank's rows must form whole groups.
    """
    g_idx = g_idx.to(torch.int64)
    if bool((g_idx >= n_groups).any()):
        raise _fail(f"{prefix}: g_idx has group {int(g_idx.max())} but the layer has {n_groups} groups")
    used = torch.unique(g_idx)
    if used.numel() * group_size != g_idx.numel():
        raise _fail(f"{prefix}: this rank's {g_idx.numel()} act-order input rows fall into {used.numel()} groups of "
                    f"{group_size}, not whole groups; with act-order (desc_act) checkpoints use "
                    f"tensor_parallel_size=1, or a checkpoint with static groups")
    return used, torch.searchsorted(used, g_idx).to(torch.int32)


class IfqInt4LinearMethod(LinearMethodBase):
    """Creates the checkpoint's parameters with vLLM's classes, repacks them to our int4 layout after loading."""

    def __init__(self, quant_config: IfqInt4Config, prefix: str = "") -> None:
        self.quant_config = quant_config
        self.prefix = prefix
        self.replicated_scales = False  # set in create_weights (row-parallel rank with full scale rows)
        self.checkpoint_params: list[str] = []
        self._first_g_idx: Optional[torch.Tensor] = None

    # Parameter names per format: (qweight, scales, zeros, g_idx)
    _NAMES = {
        "gptq": ("qweight", "scales", "qzeros", "g_idx"),
        "awq": ("qweight", "scales", "qzeros", None),
        "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"),
    }

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        s = self.quant_config.scheme
        loader = extra_weight_attrs["weight_loader"]
        k, n = input_size_per_partition, sum(output_partition_sizes)
        row_parallel = input_size != k
        g = input_size if s.group_size == -1 else s.group_size
        where = f"{self.prefix or type(layer).__name__}"
        if k % PACK:
            raise _fail(f"{where}: {k} input features per rank is not a multiple of 8 (int4 packs 8 per int32)")
        # packed 8 per int32 along N: GPTQ/AWQ qzeros, AWQ qweight, compressed-tensors zero points
        packs_n = s.fmt in ("gptq", "awq") or not s.sym
        if packs_n and any(p % PACK for p in output_partition_sizes):
            raise _fail(f"{where}: output shards {output_partition_sizes} per rank must be multiples of 8 "
                        f"({s.fmt} packs 8 output features per int32)")
        # Row-parallel ranks get replicated scale rows when a local slice cannot own its groups: channel-wise
        # (one group spans all K) and act-order (a rank's rows belong to groups anywhere in K).
        self.replicated_scales = row_parallel and (s.group_size == -1 or s.act_order)
        if s.group_size != -1 and k % g:
            raise _fail(f"{where}: {k} input features per rank (K={input_size}) is not a multiple of "
                        f"group_size={g}; each tensor-parallel rank must hold whole scale groups")
        n_groups = input_size // g if self.replicated_scales else k // g

        def packed(data, **dims):
            return PackedvLLMParameter(data=data, packed_factor=PACK, weight_loader=loader, **dims)

        def scale_param(shape, output_dim, input_dim):
            data = torch.empty(shape, dtype=torch.float32)  # exact for fp16 / bf16 / fp32 checkpoint scales
            if self.replicated_scales:
                return ChannelQuantScaleParameter(data=data, output_dim=output_dim, weight_loader=loader)
            return GroupQuantScaleParameter(data=data, output_dim=output_dim, input_dim=input_dim,
                                            weight_loader=loader)

        def zeros_param(shape, output_dim, input_dim, packed_dim):
            data = torch.empty(shape, dtype=torch.int32)
            if self.replicated_scales:
                return PackedColumnParameter(data=data, output_dim=output_dim, packed_dim=packed_dim,
                                             packed_factor=PACK, weight_loader=loader)
            return packed(data, input_dim=input_dim, output_dim=output_dim, packed_dim=packed_dim)

        params: dict[str, BasevLLMParameter] = {}
        qw_name, s_name, z_name, gi_name = self._NAMES[s.fmt]
        if s.fmt == "gptq":  # qweight [K/8, N] packed along K; qzeros [G, N/8]; scales [G, N]
            params[qw_name] = packed(torch.empty(k // PACK, n, dtype=torch.int32), input_dim=0, output_dim=1,
                                     packed_dim=0)
            params[s_name] = scale_param((n_groups, n), output_dim=1, input_dim=0)
            params[z_name] = zeros_param((n_groups, n // PACK), output_dim=1, input_dim=0, packed_dim=1)
        elif s.fmt == "awq":  # qweight [K, N/8] packed along N; qzeros [G, N/8]; scales [G, N]
            params[qw_name] = packed(torch.empty(k, n // PACK, dtype=torch.int32), input_dim=0, output_dim=1,
                                     packed_dim=1)
            params[s_name] = scale_param((n_groups, n), output_dim=1, input_dim=0)
            params[z_name] = zeros_param((n_groups, n // PACK), output_dim=1, input_dim=0, packed_dim=1)
        else:  # weight_packed [N, K/8]; weight_scale [N, G]; weight_zero_point [N/8, G]; weight_shape [2]
            params[qw_name] = packed(torch.empty(n, k // PACK, dtype=torch.int32), input_dim=1, output_dim=0,
                                     packed_dim=1)
            params[s_name] = scale_param((n, n_groups), output_dim=0, input_dim=1)
            if not s.sym:
                params[z_name] = zeros_param((n // PACK, n_groups), output_dim=0, input_dim=1, packed_dim=0)
            params["weight_shape"] = BasevLLMParameter(data=torch.zeros(2, dtype=torch.int64), weight_loader=loader)
        if s.act_order:
            # -1 marks "not loaded"; merged shards must agree (one input permutation per layer)
            params[gi_name] = RowvLLMParameter(data=torch.full((k,), -1, dtype=torch.int32), input_dim=0,
                                               weight_loader=self._g_idx_loader(loader))
        for name, p in params.items():
            layer.register_parameter(name, p)
        self.checkpoint_params = list(params)
        layer.int4_input_size = input_size  # the full K (weight_shape check)

    def _g_idx_loader(self, loader):
        def load(param, loaded_weight, *shard):
            if self._first_g_idx is None:
                self._first_g_idx = loaded_weight.detach().to("cpu", torch.int64).clone()
            elif not torch.equal(self._first_g_idx, loaded_weight.detach().to("cpu", torch.int64)):
                raise _fail(f"{self.prefix}: the shards of this merged layer have different act-order g_idx; "
                            f"one input permutation per merged layer is supported")
            return loader(param, loaded_weight, *shard)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if isinstance(getattr(layer, "int4_qweight", None), torch.Tensor):  # already repacked (repeat call)
            return
        s = self.quant_config.scheme
        qw_name, s_name, z_name, gi_name = self._NAMES[s.fmt]
        qweight = getattr(layer, qw_name).data
        scales = getattr(layer, s_name).data
        zeros = getattr(layer, z_name).data if z_name in self.checkpoint_params else None
        g_idx = None
        if s.act_order:
            g_idx = getattr(layer, gi_name).data
            if bool((g_idx < 0).any()):
                raise _fail(f"{self.prefix}: act-order checkpoint without a {gi_name} tensor for this layer")
            if self.replicated_scales:  # keep the groups this rank's rows use, renumbered
                group_dim = 0 if s.fmt == "gptq" else 1
                used, g_idx = _rank_groups(g_idx, scales.shape[group_dim], s.group_size, self.prefix)
                scales = scales.index_select(group_dim, used.to(scales.device))
                zeros = zeros.index_select(group_dim, used.to(zeros.device)) if zeros is not None else None
        if s.fmt == "gptq":
            w = repack_gptq(qweight, zeros, scales, g_idx, sym=s.sym, checkpoint_format=s.checkpoint_format)
        elif s.fmt == "awq":
            w = repack_awq(qweight, zeros, scales)
        else:
            in_features = int(layer.weight_shape.data[1])
            if in_features != layer.int4_input_size:
                raise _fail(f"{self.prefix}: weight_shape says {in_features} input features, the layer has "
                            f"{layer.int4_input_size}")
            w = repack_compressed_tensors(qweight, scales, zeros, g_idx)

        for name in self.checkpoint_params:
            delattr(layer, name)
        self.checkpoint_params = []
        self._first_g_idx = None

        def param(t):
            return torch.nn.Parameter(t, requires_grad=False) if t is not None else None

        layer.int4_fragment = _fragment_for(w)
        qweight = fragment_major_int4(w.qweight) if layer.int4_fragment else w.qweight
        layer.register_parameter("int4_qweight", param(qweight))
        layer.register_parameter("int4_scales", param(_compact_float(w.scales.to(torch.float32))))
        layer.register_parameter("int4_zeros", param(w.zeros))
        layer.register_parameter("int4_perm", param(w.perm))
        layer.int4_group_size = w.group_size

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if getattr(layer, "int4_fragment", False):
            return w4a16_fragment_gemm(x, layer.int4_qweight, layer.int4_scales, bias)
        return w4a16_gemm(x, layer.int4_qweight, layer.int4_scales, layer.int4_zeros, layer.int4_group_size, bias,
                          layer.int4_perm)


# Store eligible layers fragment-major on sm_90 (off: the packed layout everywhere, for comparisons).
FRAGMENT_ON_HOPPER = True


def _fragment_for(w) -> bool:
    """Fragment-major for a symmetric group-128 weight without act-order, of whole 64 × 128 tiles, on a GPU the
    Gluon kernel runs on."""
    k, n = w.qweight.shape[0] * 8, w.qweight.shape[1]
    return (FRAGMENT_ON_HOPPER and w.zeros is None and w.perm is None and w.group_size == FRAGMENT_GROUP_SIZE
            and fragment_fits(n, k) and fragment_kernel_runs_on(w.qweight.device)[0])


def register_ifq_int4() -> None:
    """Make ``quantization="ifq_int4"`` available to vLLM in this process (safe to call more than once)."""
    register_quantization_method(IFQ_INT4_NAME, IfqInt4Config, IfqInt4LinearMethod)
