"""Runs vLLM on a tiny random Llama with and without ``quantization="ifq"``; prints one JSON line of results.

Run by ``test_ifq_engine.py`` in a child process: the CPU engine binds threads and cores and creates a process
group, none of which should leak into the test process. ``quantization="ifq"`` is found through the installed
``vllm.general_plugins`` entry point (nothing here calls ``register()``).

Usage: python ifq_engine_run.py MODEL_DIR
"""
import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~3 s instead of ~25 s

import torch  # noqa: E402
from tiny_llama import VOCAB, build_tiny_llama  # noqa: E402

N_PROMPTS = 16
MAX_TOKENS = 8


def build_model(path: str) -> None:
    """The tiny Llama with heads of 32 (vLLM's CPU attention needs head_dim >= 32), 128 positions."""
    build_tiny_llama(path, head_dim=32, max_positions=128)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 20, (N_PROMPTS,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def make_llm(path, dtype, quantization):
    from vllm import LLM

    return LLM(
        model=path, dtype=dtype, quantization=quantization, skip_tokenizer_init=True, max_model_len=128,
        kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0,
    )


def run_pair(path: str, dtype: str) -> dict:
    from vllm import SamplingParams

    ps = prompts()
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False, logprobs=2)

    llm = make_llm(path, dtype, None)
    base_out = llm.generate([{"prompt_token_ids": p} for p in ps], greedy, use_tqdm=False)
    base = [list(o.outputs[0].token_ids) for o in base_out]
    # top-1 minus top-2 log-probability of each greedy step: how close to a tie the unquantized model was
    margins = []
    for o in base_out:
        for step in o.outputs[0].logprobs:
            top = sorted((lp.logprob for lp in step.values()), reverse=True)
            margins.append(top[0] - top[1])
    del llm
    gc.collect()

    llm = make_llm(path, dtype, "ifq")
    weight_dtypes = llm.apply_model(
        lambda m: sorted({f"{type(mod).__name__}:{mod.weight.dtype}" for mod in m.modules()
                          if isinstance(getattr(mod, "weight", None), torch.Tensor)})
    )[0]
    ifq = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in ps], greedy, use_tqdm=False)]
    # Teacher forcing: the ifq model scores the unquantized model's continuation, so one early flip cannot
    # derail every later position. rank 1 = ifq's greedy choice equals the unquantized one at that step.
    scored = llm.generate(
        [{"prompt_token_ids": p + b} for p, b in zip(ps, base)],
        SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0),
        use_tqdm=False,
    )
    ranks = []
    for p, o in zip(ps, scored):
        for i in range(len(p), len(o.prompt_token_ids)):
            ranks.append(o.prompt_logprobs[i][o.prompt_token_ids[i]].rank)
    del llm
    gc.collect()
    return {"base": base, "ifq": ifq, "margins": margins, "teacher_forced_ranks": ranks, "weight_dtypes": weight_dtypes}


def fp32_error(path: str) -> str:
    try:
        make_llm(path, "float32", "ifq")
    except Exception as e:  # noqa: BLE001 (the message is what the test checks)
        return f"{type(e).__name__}: {e}"
    return ""


def main() -> None:
    path = sys.argv[1]
    if not os.path.exists(os.path.join(path, "config.json")):
        build_model(path)
    result = {dtype: run_pair(path, dtype) for dtype in ("bfloat16", "float16")}
    result["float32_error"] = fp32_error(path)
    print("IFQ_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
