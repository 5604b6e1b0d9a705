"""Every plugin mode through vLLM on a tiny random Llama: with and without n-gram speculative decoding, and 32
requests together against each alone; prints one JSON line of results.

Run by ``test_engine_matrix.py`` (and ``test_vllm_serve.py`` for its reference) in child processes: the CPU engine
binds threads and cores and creates a process group, none of which should leak into the test process. The plugin
is found through the installed ``vllm.general_plugins`` entry point (nothing here calls ``register()``).

Usage: python engine_matrix_run.py {matrix|mp} WORK_DIR
- matrix: engines in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), two per mode (none, ifq, ifq_int4,
          int8 KV, ifq + int8 KV, ifq_int4 + int8 KV). The first: greedy continuations of repetitive prompts, 32
          requests of mixed lengths submitted together and then each alone, and the serving test's prompt. The
          second, with ``speculative_config=NGRAM``: the repetitive prompts again, with vLLM's speculative-decoding
          counters. Each phase also reports which kernels served it and which kinds of batches reached the int8
          attention (``int8_kv_engine_run.instrument``).
- mp:     ifq + int8 KV with vLLM's default engine process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``, spawned): the
          engine process's pid, linear methods and attention impls, and greedy continuations of the repetitive
          prompts.
WORK_DIR holds the models, written once by ``prepare``: ``tiny_llama`` (int8_kv_engine_run's model: bf16, head_dim
64, vocab 256, plus a byte-level tokenizer for the server) and ``tiny_llama_gptq`` (its GPTQ int4 export, group 64).
"""
import gc
import json
import os
import sys
import time
from pathlib import Path

from int8_kv_engine_run import INT8, VOCAB

GROUP_SIZE = 64  # divides the model's K = 256 and 512
BASE, GPTQ = "tiny_llama", "tiny_llama_gptq"
# mode -> (checkpoint, LLM arguments)
MODES = {
    "none": (BASE, {}),
    "ifq": (BASE, {"quantization": "ifq"}),
    "ifq_int4": (GPTQ, {"quantization": "ifq_int4"}),
    "int8_kv": (BASE, {"kv_cache_dtype": INT8}),
    "ifq+int8_kv": (BASE, {"quantization": "ifq", "kv_cache_dtype": INT8}),
    "ifq_int4+int8_kv": (GPTQ, {"quantization": "ifq_int4", "kv_cache_dtype": INT8}),
}
# prompt lookup: the last 2-4 tokens are searched for earlier in the sequence; up to 4 tokens that followed them
# there are proposed and verified in one step
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
SPEC_MAX_TOKENS = 32
N_CONCURRENT = 32
INVARIANCE_MAX_TOKENS = 12
# the serving test's prompt (the tokenizer maps each UTF-8 byte to its own id) and the modes it is compared with
SERVE_PROMPT = "Hello, world! Hello, world! Hello,"
SERVE_MAX_TOKENS = 8
SERVE_REFERENCE_MODES = ("none", "ifq", "int8_kv", "ifq+int8_kv")


# ---------------------------------------------------------------------------------------------------- the models
def byte_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer without merges, built offline: token id = byte value (vocab 256, the
    model's), each byte written as GPT-2's printable stand-in character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for chr(256 + i) in byte order
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(extra)): b for b in range(VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024)


def prepare(work: Path) -> None:
    """Both checkpoints, each written once and moved into place only when complete."""
    from int8_kv_engine_run import build_model

    from angel_kernels.quantization import export_gptq_checkpoint

    work = Path(work)
    base, gptq = work / BASE, work / GPTQ
    if not (base / "config.json").exists():
        tmp = work / (BASE + ".partial")
        build_model(str(tmp), head_dim=64)
        byte_tokenizer().save_pretrained(str(tmp))
        tmp.rename(base)
    if not (gptq / "config.json").exists():
        export_gptq_checkpoint(base, gptq, group_size=GROUP_SIZE)  # writes beside, renames into place


# --------------------------------------------------------------------------------------------------- the prompts
def spec_prompts() -> list:
    """Eight prompts that repeat themselves (a few random tokens, a 3-9 token pattern 2-5 times, then the start of
    it once more) and two without repetition. The random model's own greedy continuations also fall into cycles,
    which the lookup finds in the generated tokens."""
    import torch

    g = torch.Generator().manual_seed(3)

    def ints(lo, hi, n):
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    out = []
    for i in range(8):
        n, reps, n_head = ints(3, 10, 1)[0], ints(2, 6, 1)[0], ints(0, 8, 1)[0]
        pattern = ints(0, VOCAB, n)
        out.append(ints(0, VOCAB, n_head) + pattern * reps + pattern[: 1 + i % n])
    return out + [ints(0, VOCAB, n) for n in (11, 29)]


def invariance_prompts() -> list:
    """32 prompts of 1 to 300 tokens (3,000 in all: with 512 tokens per step the engine prefills them in chunks,
    next to the decodes of the prompts that started first)."""
    import torch

    g = torch.Generator().manual_seed(4)
    lengths = [1, 2, 300, 5] + torch.randint(3, 200, (N_CONCURRENT - 4,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def serve_prompt_ids() -> list:
    return list(SERVE_PROMPT.encode())


# --------------------------------------------------------------------------------------------------- the engines
def _sidestep_llvmlite_scan() -> None:
    """vLLM 0.32 on CPU: each worker's start (``register_triton_kernel_overrides``) scans every loaded module's
    namespace and calls ``vars(value).get("kernel")`` on whatever has a ``__dict__``. Once numba is loaded (vLLM's
    n-gram proposer imports it), ``llvmlite.binding.ffi.lib`` answers ``__dict__`` through its ``__getattr__``
    with a ctypes function wrapper, and the scan dies: ``AttributeError: '_lib_fn_wrapper' object has no attribute
    'get'``. So in one process no engine can start after an n-gram engine (or after ``import numba``). Putting a
    plain dict under that name in llvmlite's lazy function table lets the scan pass it by."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    if ffi is not None:
        ffi.lib._fntab.setdefault("__dict__", {})


def make_llm(work: Path, mode: str, **kw):
    from vllm import LLM

    _sidestep_llvmlite_scan()
    checkpoint, mode_kw = MODES[mode]
    args = dict(
        model=str(work / checkpoint), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512,
        max_num_batched_tokens=512, kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0,
        disable_log_stats=False,  # the speculative-decoding counters are stats
    )
    args.update(mode_kw)
    args.update(kw)
    return LLM(**args)


def greedy(llm, prompts, max_tokens) -> dict:
    """Greedy tokens, each chosen token's log-probability and its margin over the runner-up (top-1 minus top-2
    log-probability: how close to a tie the step was), as vLLM reports them from the target model's logits."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True, logprobs=2)
    res = {"tokens": [], "logprobs": [], "margins": []}
    for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False):
        c = o.outputs[0]
        res["tokens"].append(list(c.token_ids))
        res["logprobs"].append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
        tops = [sorted((lp.logprob for lp in step.values()), reverse=True) for step in c.logprobs]
        res["margins"].append([t[0] - t[1] for t in tops])
    return res


def alone(llm, prompts, max_tokens) -> dict:
    """``greedy`` for each prompt by itself: one request in the engine at a time."""
    runs = [greedy(llm, [p], max_tokens) for p in prompts]
    return {k: [r[k][0] for r in runs] for k in runs[0]}


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters (process-wide Prometheus counters: callers take differences)."""
    totals = dict.fromkeys(SPEC_COUNTERS, 0)
    for m in llm.get_metrics():
        if m.name in totals:
            totals[m.name] += int(m.value)
    return totals


def inspect_model(model) -> dict:
    """Runs where the model lives (the engine process when multiprocessing is on): the pid, the linear layers'
    quant methods and the attention impls (with the int8 path or not)."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.linear import LinearBase

    methods = sorted({f"{type(m.quant_method).__module__}.{type(m.quant_method).__name__}"
                      for m in model.modules() if isinstance(m, LinearBase)})
    attention = sorted({f"{type(m.impl).__name__}:int8={getattr(m.impl, '_angel', None) is not None}"
                        for m in model.modules() if isinstance(m, Attention)})
    return {"pid": os.getpid(), "linear_methods": methods, "attention": attention}


def engine_pieces(llm) -> dict:
    # With multiprocessing, apply_model pickles the function by reference: name it through this module's import
    # name, not __main__ (the spawned engine process knows this script under another name).
    import engine_matrix_run

    return llm.apply_model(engine_matrix_run.inspect_model)[0]


class Clock:
    """Wall seconds of each phase, by name."""

    def __init__(self):
        self.laps, self._t = {}, time.perf_counter()

    def __call__(self, name):
        t = time.perf_counter()
        self.laps[name] = round(t - self._t, 2)
        self._t = t


# ---------------------------------------------------------------------------------------------------------- runs
def run_matrix(work: Path) -> dict:
    from int8_kv_engine_run import instrument, observed

    instrument()  # records kernel selections and batch kinds; results unchanged
    sp, ip = spec_prompts(), invariance_prompts()
    res = {}
    for mode in MODES:
        r = res[mode] = {}
        clock = Clock()
        # Prefix caching off: "alone" repeats the prompts of "together", which would otherwise be served from the
        # cache (another path, covered by test_int8_kv_prefix_chunked); batch composition is what is under test.
        llm = make_llm(work, mode, enable_prefix_caching=False)
        clock("start")
        r["pieces"] = engine_pieces(llm)
        observed()
        r["plain"] = dict(greedy(llm, sp, SPEC_MAX_TOKENS), **observed())
        clock("plain")
        r["together"] = dict(greedy(llm, ip, INVARIANCE_MAX_TOKENS), **observed())
        clock("together")
        r["alone"] = dict(alone(llm, ip, INVARIANCE_MAX_TOKENS), **observed())
        clock("alone")
        if mode in SERVE_REFERENCE_MODES:
            r["serve_reference"] = greedy(llm, [serve_prompt_ids()], SERVE_MAX_TOKENS)
        del llm
        gc.collect()

        llm = make_llm(work, mode, speculative_config=dict(NGRAM))  # vLLM's defaults otherwise (prefix caching on)
        clock("start_ngram")
        r["ngram_pieces"] = engine_pieces(llm)
        before = spec_counters(llm)
        observed()
        r["ngram"] = dict(greedy(llm, sp, SPEC_MAX_TOKENS), **observed())
        after = spec_counters(llm)
        r["ngram_counters"] = {k.removeprefix("vllm:spec_decode_"): after[k] - before[k] for k in SPEC_COUNTERS}
        clock("ngram")
        del llm
        gc.collect()
        r["seconds"] = clock.laps
    return res


def run_mp(work: Path) -> dict:
    clock = Clock()
    llm = make_llm(work, "ifq+int8_kv", enable_prefix_caching=False)
    clock("start")
    res = {"front_pid": os.getpid(), "engine": engine_pieces(llm)}
    res["plain"] = greedy(llm, spec_prompts(), SPEC_MAX_TOKENS)
    clock("generate")
    llm.llm_engine.engine_core.shutdown()
    clock("shutdown")
    res["seconds"] = clock.laps
    return res


def run_in_child(mode: str, work: str, timeout: int = 600) -> dict:
    """Run this script in a fresh process and return its JSON (for the tests)."""
    import subprocess

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if mode == "mp" else "0")
    # CPU serving path: with TRITON_INTERPRET unset our ops run their pure-torch references on CPU tensors, as in a
    # user's vLLM on CPU (the interpreted Triton kernels are covered by the layer and int8-KV Triton tests)
    env.pop("TRITON_INTERPRET", None)
    if mode == "mp":
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model sends a function to the engine process
    out = subprocess.run([sys.executable, __file__, mode, work], capture_output=True, text=True, timeout=timeout,
                         env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ENGINE_MATRIX_RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"engine run {mode!r} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if mode == "mp" else "0")
    import torch

    torch.set_grad_enabled(False)
    prepare(work)
    result = {"matrix": run_matrix, "mp": run_mp}[mode](work)
    print("ENGINE_MATRIX_RESULT " + json.dumps(result))


if __name__ == "__main__":  # the mp engine process is spawned: it re-imports this file and must not run main()
    main()
