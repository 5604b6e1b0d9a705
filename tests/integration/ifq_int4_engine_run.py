"""Exports a tiny random Llama to GPTQ and runs vLLM on it with ``quantization="ifq_int4"`` and with vLLM's own
GPTQ method (no flag); prints one JSON line of results.

Run by ``test_ifq_int4_engine.py`` in a child process (the CPU engine binds threads and cores and creates a process
group, none of which should leak into the test process). ``ifq_int4`` is found through the installed
``vllm.general_plugins`` entry point (nothing here calls ``register()``).

Usage: python ifq_int4_engine_run.py WORK_DIR
"""
import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~3 s instead of ~25 s

import torch  # noqa: E402

from ifq_engine_run import MAX_TOKENS, build_model, prompts  # noqa: E402  (same tiny model and prompts as ifq)

GROUP_SIZE = 64  # what the SmolLM2 demo uses; divides the tiny model's K = 128 and 256


def make_llm(path, dtype, quantization):
    from vllm import LLM

    return LLM(
        model=path, dtype=dtype, quantization=quantization, skip_tokenizer_init=True, max_model_len=128,
        kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0,
    )


def describe(llm) -> dict:
    """Resolved method name, the linear layers' quant methods, and the linear layers' parameters (name:dtype)."""
    from vllm.model_executor.layers.linear import LinearBase

    def inspect(model):
        methods = sorted({type(m.quant_method).__name__ for m in model.modules() if isinstance(m, LinearBase)})
        params = sorted({f"{n}:{p.dtype}" for m in model.modules() if isinstance(m, LinearBase)
                         for n, p in m.named_parameters(recurse=False)})
        return {"methods": methods, "params": params}

    return {"quantization": llm.llm_engine.model_config.quantization, **llm.apply_model(inspect)[0]}


def run_pair(gptq_dir: str, dtype: str) -> dict:
    from vllm import SamplingParams

    ps = [{"prompt_token_ids": p} for p in prompts()]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False, logprobs=2)

    # vLLM's own loading of the same GPTQ checkpoint (no flag): the reference, and proof the plugin stays out
    llm = make_llm(gptq_dir, dtype, None)
    vllm_info = describe(llm)
    ref_out = llm.generate(ps, greedy, use_tqdm=False)
    ref = [list(o.outputs[0].token_ids) for o in ref_out]
    margins = []  # top-1 minus top-2 log-probability of each greedy step of vLLM's gptq
    for o in ref_out:
        for step in o.outputs[0].logprobs:
            top = sorted((lp.logprob for lp in step.values()), reverse=True)
            margins.append(top[0] - top[1])
    del llm
    gc.collect()

    llm = make_llm(gptq_dir, dtype, "ifq_int4")
    ours_info = describe(llm)
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(ps, greedy, use_tqdm=False)]
    # Teacher forcing: ifq_int4 scores vLLM gptq's continuation, so one early flip cannot derail later positions.
    scored = llm.generate(
        [{"prompt_token_ids": p["prompt_token_ids"] + r} for p, r in zip(ps, ref)],
        SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0),
        use_tqdm=False,
    )
    ranks = []
    for p, o in zip(ps, scored):
        for i in range(len(p["prompt_token_ids"]), len(o.prompt_token_ids)):
            ranks.append(o.prompt_logprobs[i][o.prompt_token_ids[i]].rank)
    del llm
    gc.collect()
    return {"vllm": vllm_info, "ifq_int4": ours_info, "ref": ref, "ours": ours, "margins": margins,
            "teacher_forced_ranks": ranks}


def unquantized_error(model_dir: str) -> str:
    """``quantization="ifq_int4"`` on a checkpoint without a quantization config must fail with our message."""
    try:
        make_llm(model_dir, "bfloat16", "ifq_int4")
    except Exception as e:  # noqa: BLE001 (the message is what the test checks)
        return f"{type(e).__name__}: {e}"
    return ""


def main() -> None:
    from angel_kernels.quantization import export_gptq_checkpoint

    work = Path(sys.argv[1])
    model_dir, gptq_dir = work / "tiny_llama", work / f"tiny_llama_gptq_g{GROUP_SIZE}"
    if not (model_dir / "config.json").exists():
        build_model(str(model_dir))
    if not gptq_dir.exists():
        export_gptq_checkpoint(model_dir, gptq_dir, group_size=GROUP_SIZE)
    result = {dtype: run_pair(str(gptq_dir), dtype) for dtype in ("bfloat16", "float16")}
    result["unquantized_error"] = unquantized_error(str(model_dir))
    print("IFQ_INT4_RESULT " + json.dumps(result))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
