"""Runs vLLM on a tiny random Llama with ``kv_cache_dtype="int8_per_token_head"``; prints one JSON line of results.

Run by the ``test_int8_kv_*.py`` tests in a child process: the CPU engine binds threads and cores and creates a
process group, none of which should leak into the test process. The backend is registered here explicitly
(``register_int8_kv_backend()``), and vLLM's own ``CPU_ATTN`` is restored for the reference runs, whatever the
installed plugin entry point registers.

Usage: python int8_kv_engine_run.py {main|cache|triton} MODEL_DIR
- main:   vLLM's backend vs ours with bf16 KV; int8 KV and int8 KV + ifq (teacher-forced against bf16 KV);
          configurations refused at LLM(...)
- cache:  prefix caching on vs off, chunked prefill vs whole prompts (int8 KV)
- triton: int8 KV with our Triton kernels (run it under TRITON_INTERPRET=1) against bf16 KV
Every int8 run also reports which kernel candidates served it and which kinds of batches reached attention.
"""
import gc
import json
import os
import subprocess
import sys

import torch
from tiny_llama import VOCAB, build_tiny_llama

INT8 = "int8_per_token_head"
ATTN_WEIGHT_GAIN = 3.0  # see build_model


def build_model(path: str, head_dim: int = 64) -> None:
    """The tiny Llama (tiny_llama.py) with heads of ``head_dim`` (our kernels: 64/128/256), 1024 positions.

    HF's init (std 0.02) gives attention logits of std ~0.1 (q, k elements ~0.3 after RMSNorm; 64-dim dot
    products / 8): attention is nearly uniform, and errors in it hardly change the tokens (measured: an attention
    that ignores q·k entirely still agreed with the reference on 111/128 teacher-forced steps). q/k/v/o weights
    ×3 make the logits' std ~0.9 and the attention output a larger share of the residual stream; then uniform
    attention agrees on 52/128 steps, a softmax scale off by 2x on 55/128, and int8 KV on 123/128.
    """
    build_tiny_llama(path, head_dim=head_dim, attn_weight_gain=ATTN_WEIGHT_GAIN)


def random_tokens(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


# ------------------------------------------------------------------------------------------------ instrumentation
SERVED: set = set()  # "family.candidate" of every kernel selection
BATCHES: dict = {}  # kinds of batches that reached the int8 attention


def instrument() -> None:
    """Record kernel selections and batch kinds (reads host-side metadata only; the results are unchanged)."""
    from angel_kernels.dispatch import KernelFamily

    from angel_vllm.attention_backend import _Int8KVAttention

    select = KernelFamily.select

    def recording_select(self, problem, **kw):
        cand = select(self, problem, **kw)
        SERVED.add(f"{self.family}.{cand.name}")
        return cand

    KernelFamily.select = recording_select
    attend = _Int8KVAttention.attend

    def recording_attend(self, query, kv_cache, meta, output):
        n_req = meta.query_start_loc.shape[0] - 1
        q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1])[:n_req].tolist()
        ctx = meta.seq_lens[:n_req].tolist()
        kinds = []
        if meta.max_query_len == 1:
            kinds.append("decode")
        else:
            kinds.append("varlen")
            if any(q > 1 and c > q for q, c in zip(q_lens, ctx)):
                kinds.append("varlen_with_cached_context")  # prefix-cache hit or a later prefill chunk
            if any(q == 1 for q in q_lens):
                kinds.append("varlen_with_decode_rows")  # a mixed prefill/decode batch
        for k in kinds:
            BATCHES[k] = BATCHES.get(k, 0) + 1
        return attend(self, query, kv_cache, meta, output)

    _Int8KVAttention.attend = recording_attend


def observed() -> dict:
    out = {"served": sorted(SERVED), "batches": dict(BATCHES)}
    SERVED.clear()
    BATCHES.clear()
    return out


# ------------------------------------------------------------------------------------------------ backend control
def use_backend(ours: bool) -> None:
    """Ours registered over CPU_ATTN, or vLLM's own; the selector caches its answer, so clear it either way."""
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import _cached_get_attn_backend

    load_general_plugins()  # once per process: an entry point registering later must not undo the choice here
    if ours:
        from angel_vllm.attention_backend import register_int8_kv_backend

        register_int8_kv_backend()
    else:
        AttentionBackendEnum.CPU_ATTN.clear_override()
    _cached_get_attn_backend.cache_clear()


def make_llm(path, kv_cache_dtype="auto", quantization=None, dtype="bfloat16", **kw):
    from vllm import LLM

    args = dict(
        model=path, dtype=dtype, quantization=quantization, kv_cache_dtype=kv_cache_dtype, skip_tokenizer_init=True,
        max_model_len=512, max_num_batched_tokens=512, kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0,
    )
    args.update(kw)
    return LLM(**args)


def with_llm(fn, path, **kw):
    """fn(LLM(path, **kw)), then the engine is gone before the next one starts (it owns process-wide groups)."""
    llm = make_llm(path, **kw)
    try:
        return fn(llm)
    finally:
        del llm
        gc.collect()


def construction_error(path, **kw) -> str:
    try:
        with_llm(lambda llm: None, path, **kw)
    except Exception as e:  # noqa: BLE001 (the message is what the test checks)
        return f"{type(e).__name__}: {e}"
    return ""


def attention_info(llm) -> list:
    """Per attention layer: impl class, whether the int8 path serves it, its KV cache tensor's dtype and shape."""
    def info(model):
        from vllm.model_executor.layers.attention import Attention

        rows = []
        for m in model.modules():
            if isinstance(m, Attention):
                kv = m.kv_cache[0] if isinstance(m.kv_cache, (list, tuple)) else m.kv_cache
                rows.append([type(m.impl).__name__, getattr(m.impl, "_angel", None) is not None,
                             str(kv.dtype), list(kv.shape)])
        return rows

    return llm.apply_model(info)[0]


def weight_dtypes(llm) -> list:
    return llm.apply_model(
        lambda m: sorted({f"{type(mod).__name__}:{mod.weight.dtype}" for mod in m.modules()
                          if isinstance(getattr(mod, "weight", None), torch.Tensor)})
    )[0]


# ---------------------------------------------------------------------------------------------------- generation
def generate(llm, prompts, max_tokens):
    from vllm import SamplingParams

    # top-2 log-probabilities: the chosen token's and the margin to the runner-up
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, logprobs=2, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


def summarize(outs) -> dict:
    """tokens, chosen-token log-probabilities and top-1 minus top-2 margins (how close to a tie each step was)."""
    tokens, logprobs, margins = [], [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
        tops = [sorted((lp.logprob for lp in step.values()), reverse=True) for step in c.logprobs]
        margins.append([t[0] - t[1] for t in tops])
    return {"tokens": tokens, "logprobs": logprobs, "margins": margins}


def teacher_forced_ranks(llm, prompts, continuations) -> list:
    """Rank, under ``llm``, of each token of the reference continuation (1 = llm's greedy choice agrees).

    Scored as prompt log-probabilities, so one early flip cannot derail every later position.
    """
    from vllm import SamplingParams

    scored = llm.generate(
        [{"prompt_token_ids": p + c} for p, c in zip(prompts, continuations)],
        SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0),
        use_tqdm=False,
    )
    ranks = []
    for p, o in zip(prompts, scored):
        for i in range(len(p), len(o.prompt_token_ids)):
            ranks.append(o.prompt_logprobs[i][o.prompt_token_ids[i]].rank)
    return ranks


# ---------------------------------------------------------------------------------------------------------- main
N_PROMPTS = 16
MAX_TOKENS = 8


def main_prompts(n: int = N_PROMPTS) -> list:
    g = torch.Generator().manual_seed(1)
    return [random_tokens(g, k) for k in torch.randint(3, 40, (N_PROMPTS,), generator=g).tolist()][:n]


def run_main(path: str) -> dict:
    prompts = main_prompts()
    res = {}

    def plain(llm):
        return dict(summarize(generate(llm, prompts, MAX_TOKENS)), attn=attention_info(llm))

    def scored(llm):
        # the reference continuation: vLLM's own backend with bf16 KV
        ranks = teacher_forced_ranks(llm, prompts, res["stock_bf16"]["tokens"])
        return dict(plain(llm), teacher_forced_ranks=ranks, **observed())

    use_backend(ours=False)
    res["stock_bf16"] = with_llm(plain, path)
    use_backend(ours=True)
    observed()
    res["ours_bf16"] = with_llm(lambda llm: dict(plain(llm), **observed()), path)  # must touch none of our kernels
    res["ours_int8"] = with_llm(scored, path, kv_cache_dtype=INT8)
    res["ours_int8_ifq"] = with_llm(lambda llm: dict(scored(llm), weight_dtypes=weight_dtypes(llm)), path,
                                    kv_cache_dtype=INT8, quantization="ifq")

    # configurations our kernels cannot serve: refused while LLM(...) builds, before any weight is loaded
    small_dir = path + "_head32"
    if not os.path.exists(os.path.join(small_dir, "config.json")):
        build_model(small_dir, head_dim=32)
    res["errors"] = {
        "float32": construction_error(path, kv_cache_dtype=INT8, dtype="float32"),
        "block_size_48": construction_error(path, kv_cache_dtype=INT8, block_size=48),
        "head_dim_32": construction_error(small_dir, kv_cache_dtype=INT8),
    }
    return res


# --------------------------------------------------------------------------------------------------------- cache
PREFIX_LEN = 150
PREFIX_BLOCK = 32  # the CPU platform turns prefix caching off for blocks that are not multiples of 32
LONG_PROMPT = 300
CHUNK_TOKENS = 64


def run_cache(path: str) -> dict:
    g = torch.Generator().manual_seed(2)
    prefix = random_tokens(g, PREFIX_LEN)
    shared = [prefix + random_tokens(g, n) for n in (7, 19, 33)]
    long_prompt = random_tokens(g, LONG_PROMPT)
    short = [random_tokens(g, n) for n in (5, 12)]
    res = {}
    use_backend(ours=True)

    def prefix_run(llm):
        first = generate(llm, shared[:1], MAX_TOKENS)  # fills the cache with the prefix
        rest = generate(llm, shared[1:], MAX_TOKENS)  # hits it: the queries are the suffixes only
        outs = list(first) + list(rest)
        return dict(summarize(outs), cached=[o.num_cached_tokens or 0 for o in outs], **observed())

    def chunk_run(llm):
        sc = llm.llm_engine.vllm_config.scheduler_config
        # short prompts first: the first step fills its 64-token budget with both short prompts and the start of
        # the long one, so the next steps carry their decodes next to later chunks (mixed batches)
        outs = generate(llm, short + [long_prompt], MAX_TOKENS)
        return dict(summarize(outs), scheduler=[sc.enable_chunked_prefill, sc.max_num_batched_tokens], **observed())

    for caching in (True, False):
        res["prefix_on" if caching else "prefix_off"] = with_llm(
            prefix_run, path, kv_cache_dtype=INT8, enable_prefix_caching=caching, block_size=PREFIX_BLOCK)
    # the long prompt in chunks of 64 tokens (scheduler budget), next to two short prompts
    res["chunked"] = with_llm(chunk_run, path, kv_cache_dtype=INT8, enable_prefix_caching=False,
                              enable_chunked_prefill=True, max_num_batched_tokens=CHUNK_TOKENS)
    res["whole"] = with_llm(chunk_run, path, kv_cache_dtype=INT8, enable_prefix_caching=False)
    return res


# -------------------------------------------------------------------------------------------------------- triton
TRITON_PROMPTS = 4  # the interpreter runs ~0.3 s per decode step of this model


def run_triton(path: str) -> dict:
    prompts = main_prompts(TRITON_PROMPTS)
    res = {"interpreter": os.environ.get("TRITON_INTERPRET", "")}
    use_backend(ours=False)
    res["stock_bf16"] = with_llm(lambda llm: summarize(generate(llm, prompts, MAX_TOKENS)), path)
    use_backend(ours=True)
    observed()

    def scored(llm):
        ranks = teacher_forced_ranks(llm, prompts, res["stock_bf16"]["tokens"])
        return dict(summarize(generate(llm, prompts, MAX_TOKENS)), teacher_forced_ranks=ranks, **observed())

    res["ours_int8"] = with_llm(scored, path, kv_cache_dtype=INT8)
    return res


def run_in_child(mode: str, model_dir: str, *, triton_interpreter: bool = False, timeout: int = 600) -> dict:
    """Run this script in a fresh process and return its JSON (for the tests)."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if triton_interpreter:
        env["TRITON_INTERPRET"] = "1"  # read when triton is imported: only a fresh process can switch it
    else:
        # CPU serving path: with TRITON_INTERPRET unset our ops run their pure-torch references on CPU tensors,
        # as in a user's vLLM on CPU
        env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, __file__, mode, model_dir], capture_output=True, text=True,
                         timeout=timeout, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("INT8KV_RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"engine run {mode!r} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~3 s instead of ~25 s
    mode, path = sys.argv[1], sys.argv[2]
    if not os.path.exists(os.path.join(path, "config.json")):
        build_model(path)
    instrument()
    result = {"main": run_main, "cache": run_cache, "triton": run_triton}[mode](path)
    print("INT8KV_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
