"""Tune the paged attention kernels (decode, varlen prefill, KV write) on this GPU and write the config table.

For each kernel and KV dtype (int8, fp16) at Llama-3-8B heads (32 query / 8 KV, head 128, block 16): time the
configs (CUDA-graph medians, ``angel_kernels.tuning.timing``) on the kernel's tuning cases, each checked against
the heuristic config's output, and print the heuristic's time next to the five fastest. Writes
``OUT/<gpu-slug>.json`` in the tuned-config format (merge into angel_kernels/tuning/configs/ to ship it).

Usage: python benchmarks/tune_attention.py --out OUT [--kernels decode,prefill,kv_write] [--kv int8,fp16,int8-packed]
       [--space full|small|focus] [--cases 1x1024,64x16384] [--per-case] [--ship]
(--kv int8-packed: decode over / KV write into vLLM's packed int8_per_token_head rows, under their own key.)
(--cases: decode (batch x context) cases to time, default the kernel's TUNE_CASES; a short GPU run can tune on the
large cases and then print the top configs of a small one. --per-case with prefill: the benchmark's four cases.)
"""
import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from angel_kernels.attention import kv_write, paged_decode, paged_prefill
from angel_kernels.tuning import TunedConfigStore, gpu_slug

HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = 32, 8, 128, 16
# prefill --per-case: the benchmark's cases (batch, new tokens, cached prefix), a 1k-token RAG prompt included
PREFILL_CASES = ((1, 1024, 0), (4, 1024, 0), (1, 4096, 0), (1, 512, 3584))


def small_decode_space(p):
    """The decode space's 4/8-warp, 256-token-split, 2-4-stage slice (60 fp16 / 360 int8 configs)."""
    return [c for c in paged_decode.tuning_space(p)
            if c.num_warps in (4, 8) and dict(c.extra)["MIN_SPLIT_TILES"] * c.BLOCK_N == 256 and c.num_stages > 1]


def focus_decode_space(p):
    """Around the configs that led the H100 tunes, page addressing throughout. int8: one-warp programs on 32-token
    tiles (whole head dim, the word path with FENCE_V, 8 programs per SM, 128- or 256-token splits with a floor of
    16, 2-3 stages, with and without int8 q·kᵀ) and the earlier 4-warp leader (128-token tiles, int8 q·kᵀ, 2 per
    SM, 256-token splits with a floor of 8, 2-3 stages); fp16: 4 warps, BLOCK_N 64 with the head-dim halves,
    exactly 3 programs per SM, 2-3 stages, splits of 64-256 or 1024 tokens, with and without the floor of 8
    (the element path and the register cap never led). The int8 configs with the query rows on either MMA side
    (HEADS_N: it led there; fp16's 64-token halves lost with it, 64×16k 1461 → 1487 µs). 20 int8 / 16 fp16
    configs."""
    def keep(c):
        x = dict(c.extra)
        if "MAX_REGS" in x or c.num_stages not in (2, 3) or not x.get("PAGE_ADDR"):
            return False
        tokens = x["MIN_SPLIT_TILES"] * c.BLOCK_N
        if p.kv_dtype == torch.int8:
            if x["D_SPLIT"] != 1 or x.get("WORDS") != 1:
                return False
            if c.num_warps == 1:
                return (c.BLOCK_N == 32 and x["PROGRAMS_PER_SM"] == 8 and tokens in (128, 256)
                        and x.get("MIN_SPLITS") == 16)
            return (c.num_warps == 4 and c.BLOCK_N == 128 and x["PROGRAMS_PER_SM"] == 2 and tokens == 256
                    and x.get("MIN_SPLITS") == 8 and x.get("QK_INT8") == 1)
        # 1024-token splits: 16 instead of 32 splits at 16k (half the partials; B=64×16k trails vLLM's fp16 kernel)
        return (not x.get("HEADS_N") and c.num_warps == 4 and x["PROGRAMS_PER_SM"] == 3 and c.BLOCK_N == 64
                and x["D_SPLIT"] == 2 and x.get("MIN_SPLITS", 1) in (1, 8) and (tokens <= 256 or tokens == 1024))

    return [c for c in paged_decode.tuning_space(p) if keep(c)]


def focus_prefill_space(p):
    """Around the H100 leaders (int8 64×128 / 4 warps with int8 q·kᵀ and the word path, fp16 128×64 / 8 warps with
    the head-dim halves, both with page addressing): 64×128 / 4 warps and 128×64 / 8 warps at 2-3 stages, 64×64 /
    4 warps at 2; int8 with and without fresh prompts on their dequantized rows (FRESH_COPY) (10 int8, 4 fp16
    configs)."""
    shapes = ((64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2))

    def keep(c):
        x = dict(c.extra)
        if p.kv_dtype == torch.int8:
            variant = x.get("WORDS") == 1 and x.get("QK_INT8") == 1 and "D_SPLIT" not in x
        else:
            variant = x.get("D_SPLIT") == 2
        return (c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages) in shapes and x.get("PAGE_ADDR") and variant

    return [c for c in paged_prefill.tuning_space(p) if keep(c)]


PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "angel_kernels" / "tuning" / "configs"


# Config extras that no tuning space varies (launch rules timed by probes, e.g. paged_decode.split_stages): a tuned
# entry that replaces one with them keeps them.
CARRIED_EXTRAS = ("ONE_WAVE_STAGES",)


def ship(tuned_json: Path, configs_dir: Path = PACKAGE_CONFIGS) -> None:
    """Merge a tuned table into the package's table for the same GPU (kernel by kernel, key by key; the old entry's
    CARRIED_EXTRAS stay)."""
    shipped = Path(configs_dir) / Path(tuned_json).name
    table = json.loads(shipped.read_text()) if shipped.exists() else {"kernels": {}, "meta": {}}
    tuned = json.loads(tuned_json.read_text())
    for kernel, entries in tuned["kernels"].items():
        old_entries = table["kernels"].setdefault(kernel, {})
        for key, entry in entries.items():
            old = old_entries.get(key)
            if isinstance(old, dict) and isinstance(entry, dict):
                kept = {k: v for k, v in old.get("extra", {}).items()
                        if k in CARRIED_EXTRAS and k not in entry.get("extra", {})}
                if kept:
                    entry["extra"] = dict(sorted({**entry.get("extra", {}), **kept}.items()))
                    print(f"{kernel} {key}: kept {kept}")
        old_entries.update(entries)
    table["meta"] = table["meta"] or tuned["meta"]
    shipped.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"shipped into {shipped}")


def tune_per_case(kernel, p, configs, cases, store, scratch, **tune_kw):
    """Time the configs on each case alone and keep the one with the best geometric mean of (time / the case's
    fastest time): a 10 µs case weighs as much as a 1 ms one (the summed time of ``tune`` follows the largest case
    only). ``kernel``: paged_decode (cases (batch, context)) or paged_prefill ((batch, new, prefix)). Returns
    (best, {config: score}); prints the leaders' per-case times."""
    per_case = {}
    for case in cases:
        _, per_case[case] = kernel.tune(HEADS_Q, HEADS_KV, HEAD_DIM, block_size=BLOCK, kv_dtype=p.kv_dtype,
                                        store=TunedConfigStore(scratch), configs=configs, cases=(case,), **tune_kw)
    common = [c for c in configs if all(c in t for t in per_case.values())]
    fastest = {case: min(t.values()) for case, t in per_case.items()}
    score = {c: math.exp(sum(math.log(per_case[case][c] / fastest[case]) for case in cases) / len(cases))
             for c in common}
    best = min(score, key=score.__getitem__)
    store.record(kernel.KERNEL_NAME, p.key(), best, p.device)
    print(f"\n## {kernel.KERNEL_NAME} {p.key()} per case (µs), ranked by the geometric mean of time / fastest:")
    print("  score  " + "  ".join("x".join(str(v) for v in case) for case in cases))
    ranked = sorted(score, key=score.__getitem__)
    heur = kernel.heuristic_config(p)
    for c in ranked[:8] + ([heur] if heur in score and heur not in ranked[:8] else []):
        print(f"  {score[c]:.3f}  " + "  ".join(f"{per_case[case][c]:.1f}" for case in cases) + f"  {c.as_dict()}")
    return best, score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernels", default="decode,prefill")
    ap.add_argument("--kv", default="int8,fp16",
                    help="int8, fp16, int8-packed (vLLM's packed int8_per_token_head rows: decode, kv_write)")
    ap.add_argument("--space", choices=("full", "small", "focus"), default="full",
                    help="the whole space, a 4/8-warp decode slice, or the configs around earlier leaders")
    ap.add_argument("--ship", action="store_true", help="merge the result into the package's config table")
    ap.add_argument("--cases", default=None, help="decode cases, e.g. 1x1024,8x4096 (default: TUNE_CASES)")
    ap.add_argument("--per-case", action="store_true",
                    help="time each case alone, keep the best geometric mean of time / the case's fastest")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # each config's time as it is measured
    dev = torch.device("cuda")
    store = TunedConfigStore(args.out)
    for kernel in args.kernels.split(","):
        mod = {"decode": paged_decode, "prefill": paged_prefill, "kv_write": kv_write}[kernel]
        for kv in args.kv.split(","):
            kv_dtype = torch.int8 if kv.startswith("int8") else torch.float16
            packed = kv == "int8-packed"
            if packed and kernel == "prefill":
                raise SystemExit("--kv int8-packed: decode and kv_write only")
            decode_kw = {"packed_rows": True} if packed else {}
            t0 = time.time()
            if kernel == "kv_write":  # per token bucket: the sum over its cases, then each case alone
                for bucket, cases in kv_write.TUNE_TOKENS.items():
                    p = kv_write.KVWriteProblem(max(cases), HEADS_KV, HEAD_DIM, BLOCK, torch.float16, kv_dtype, dev,
                                                packed)
                    configs = kv_write.tuning_space(p)
                    best, timings = kv_write.tune(HEADS_KV, HEAD_DIM, block_size=BLOCK, cache_dtype=kv_dtype,
                                                  store=store, configs=configs, cases=cases, packed_rows=packed)
                    heur = kv_write.heuristic_config(p)
                    leaders = sorted(timings, key=timings.__getitem__)[:6]
                    leaders += [heur] if heur not in leaders else []
                    print(f"\n## kv_write kv={kv} T={bucket} {p.key()}: {len(timings)}/{len(configs)} configs; "
                          f"heuristic {timings.get(heur, float('nan')):.1f} µs; leaders, each case alone (µs):")
                    for tokens in cases:
                        _, alone = kv_write.tune(HEADS_KV, HEAD_DIM, block_size=BLOCK, cache_dtype=kv_dtype,
                                                 store=TunedConfigStore(tempfile.mkdtemp()), configs=leaders,
                                                 cases=(tokens,), packed_rows=packed)
                        print(f"  T={tokens}: " + "  ".join(f"{alone.get(c, float('nan')):.1f}" for c in leaders))
                    for c in leaders:
                        print(f"  {timings.get(c, float('nan')):9.1f} µs  {c.as_dict()}")
                store.save(dev)
                continue
            elif kernel == "decode":
                p = paged_decode.PagedDecodeProblem(HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK, torch.float16, kv_dtype, dev,
                                                    packed_rows=packed)
                spaces = {"full": paged_decode.tuning_space, "small": small_decode_space, "focus": focus_decode_space}
                configs = spaces[args.space](p)
                configs = [paged_decode.heuristic_config(p)] + [c for c in configs
                                                                if c != paged_decode.heuristic_config(p)]
                cases = paged_decode.TUNE_CASES if args.cases is None else tuple(
                    tuple(int(v) for v in case.split("x")) for case in args.cases.split(","))
                if args.per_case:
                    with tempfile.TemporaryDirectory() as scratch:
                        tune_per_case(paged_decode, p, configs, cases, store, scratch, **decode_kw)
                    store.save(dev)
                    continue
                best, timings = paged_decode.tune(HEADS_Q, HEADS_KV, HEAD_DIM, block_size=BLOCK, kv_dtype=kv_dtype,
                                                  store=store, configs=configs, cases=cases, **decode_kw)
            else:
                p = paged_prefill.PagedPrefillProblem(HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK, torch.float16, kv_dtype,
                                                      dev)
                space = focus_prefill_space(p) if args.space == "focus" else paged_prefill.tuning_space(p)
                configs = [paged_prefill.heuristic_config(p)] + [c for c in space
                                                                 if c != paged_prefill.heuristic_config(p)]
                if args.per_case:
                    with tempfile.TemporaryDirectory() as scratch:
                        tune_per_case(paged_prefill, p, configs, PREFILL_CASES, store, scratch)
                    store.save(dev)
                    continue
                best, timings = paged_prefill.tune(HEADS_Q, HEADS_KV, HEAD_DIM, block_size=BLOCK, kv_dtype=kv_dtype,
                                                   store=store, configs=configs)
            heur = mod.heuristic_config(p)
            print(f"\n## {kernel} kv={kv} {p.key()}: {len(timings)}/{len(configs)} configs timed in"
                  f" {time.time() - t0:.0f} s; heuristic {timings.get(heur, float('nan')):.1f} µs")
            for cfg, us in sorted(timings.items(), key=lambda kv_: kv_[1])[:8]:
                print(f"  {us:9.1f} µs  {cfg.as_dict()}")
            store.save(dev)
    print(f"\nwrote {args.out}/{gpu_slug(dev)}.json")
    if args.ship:
        ship(Path(args.out) / f"{gpu_slug(dev)}.json")


if __name__ == "__main__":
    main()
