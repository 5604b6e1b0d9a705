"""What ptxas makes of a kernel at its real launch configuration, on any machine (no GPU needed).

Runs a launcher of angel-kernels with CPU tensors while Triton's launch is intercepted, compiles each captured
launch for an H100 (sm_90a) with the arguments specialized the way Triton specializes them on a GPU (integers
equal to 1 become constants, integers and pointers divisible by 16 are marked so), and reports per kernel:
registers per thread, spill bytes, shared memory, and the instruction mix of its hottest loop (the largest block
that ends in a backward branch). Useful before spending GPU time: a register or spill change, or how many
instructions a K-block costs, shows here in seconds.

    python benchmarks/sass_report.py decode --kv int8 [--block-n 128 --warps 4 --stages 2 --d-split 2 --words 1]
        [--qk-int8 1 --max-regs 168]
    python benchmarks/sass_report.py prefill --kv fp16 [--block-m 128 --block-n 64 --warps 8 --stages 3]
    python benchmarks/sass_report.py w8a16 --n 28672 --k 4096 --m 1 [--block-n 64 --warps 4 --stages 3]
    python benchmarks/sass_report.py w4a16 --n 28672 --k 4096 --m 1
    python benchmarks/sass_report.py fragment --n 4096 --k 4096 --m 256 [--int4 1]

``fragment``: whatever the fragment-major op launches at that M on an sm_90 GPU of 132 SMs (``gluon_tile_for``:
decode, batch, piped, paired or streamed tiles; Gluon kernels: Triton 3.6, the GPU machine's, e.g. from the wheel
cache on PYTHONPATH).
Counts come from the Triton installed here; the GPU machine's Triton version may differ (`triton.__version__` is
printed). ``--dump DIR`` keeps the PTX, the SASS and the TTGIR.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
# Launchers pick these switches from the tensors' device (the interpreter needs them); set as on a GPU.
GPU_SWITCHES = {"DOT_FP32": False, "ASM": True}
_PTR_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8",
    torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
}


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict


def capture_launches(run, *args, **kwargs) -> list[Launch]:
    """Call ``run(*args, **kwargs)`` with every Triton launch recorded instead of executed."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *a, grid, warmup, **kw):
        launches.append(Launch(self, a, kw))

    JITFunction.run = record
    try:
        run(*args, **kwargs)
    finally:
        JITFunction.run = original
    return launches


def _specialize(launch: Launch):
    """(signature, constexprs, attrs, options) as Triton's launcher would build them on a GPU."""
    kw = dict(launch.kwargs)
    kw.update({k: v for k, v in GPU_SWITCHES.items() if k in kw})
    options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
    if "maxnreg" in kw:
        options["maxnreg"] = kw.pop("maxnreg")
    params = launch.fn.params
    values = dict(zip((p.name for p in params), launch.args))
    values.update(kw)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        name = p.name
        v = values[name] if name in values else p.default
        if p.is_constexpr or v is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = _PTR_TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif type(v).__name__ == "TensorDescriptor":  # TMA descriptors: Triton's own type string
            from triton.runtime.jit import mangle_type

            signature[name] = mangle_type(v)
        else:
            raise TypeError(f"{launch.fn.__name__}: cannot specialize {name}={v!r}")
    return signature, constexprs, attrs, options


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def hottest_loop(sass: str) -> collections.Counter:
    """Opcode counts of the largest block that ends in a branch to an earlier address."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    best: list = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = [x for x in ins if int(target.group(1), 16) <= x[0] <= addr]
            best = body if len(body) > len(best) else best
    return collections.Counter(op.split(".")[0] for _, op, _ in best)


def report(launch: Launch, dump: str | None = None) -> str:
    signature, constexprs, attrs, options = _specialize(launch)
    source = ASTSource
    if getattr(launch.fn, "is_gluon", lambda: False)():  # Gluon kernels carry their layouts: their own source
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options=options)
    name = launch.fn.__name__
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / f"{name}.ptx"
        ptx.write_text(kernel.asm["ptx"])
        ptxas = ""
        # Triton's PTX version decides which bundled ptxas reads it (3.9 writes PTX 9.4: the CUDA 13 one)
        for tool in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([_tool(tool), "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                                  str(Path(tmp) / "v.cubin")], capture_output=True, text=True)
            if run.returncode == 0:
                ptxas = run.stderr
                break
        cubin = Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])  # the cubin Triton itself built
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext, text in (("ptx", kernel.asm["ptx"]), ("ttgir", kernel.asm["ttgir"]), ("sass", sass)):
            Path(dump, f"{name}.{ext}").write_text(text)
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    loop = hottest_loop(sass)
    consts = {k: GPU_SWITCHES.get(k, v) for k, v in launch.kwargs.items()
              if k not in ("num_warps", "num_stages", "maxnreg")}
    lines = [
        f"{name}  warps={options['num_warps']} stages={options['num_stages']}"
        f"{' maxnreg=%d' % options['maxnreg'] if 'maxnreg' in options else ''} {consts}",
        f"  registers/thread {regs.group(1) if regs else '?'}, spill stores/loads "
        f"{spills.group(1) if spills else '?'}/{spills.group(2) if spills else '?'} B, "
        f"shared memory {kernel.metadata.shared} B",
        f"  hottest loop: {sum(loop.values())} instructions: "
        + " ".join(f"{op}:{n}" for op, n in loop.most_common(16)),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- cases
def _flags(args) -> tuple:
    """The --flag NAME=VALUE options as config extras."""
    return tuple((name, int(value)) for name, value in (flag.split("=") for flag in args.flag))


def _decode_launch(args):
    from angel_kernels.attention.kv_cache import int8_page_bytes, int8_page_views
    from angel_kernels.attention.paged_decode import launch_paged_attention
    from angel_kernels.tuning import KernelConfig

    # Llama-3-8B heads, block 16, batch 4 × 4096 tokens; int8 in the plugin's page layout
    B, L, Hq, Hkv, D, page = 4, 4096, 32, 8, 128, 16
    blocks = B * L // page
    if args.kv == "int8":
        pages = torch.zeros(blocks, int8_page_bytes(page, Hkv, D), dtype=torch.int8)
        caches = int8_page_views(pages, page, Hkv, D)
    else:
        caches = (torch.zeros(blocks, page, Hkv, D, dtype=torch.float16),) * 2 + (None, None)
    block_table = torch.arange(blocks, dtype=torch.int32).reshape(B, L // page)
    seq_lens = torch.full((B,), L, dtype=torch.int32)
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16)
    extra = (("D_SPLIT", args.d_split or 2), ("MIN_SPLIT_TILES", 2), ("PROGRAMS_PER_SM", 2),
             ("QK_INT8", args.qk_int8), ("WORDS", args.words))
    extra += (("MAX_REGS", args.max_regs),) if args.max_regs else ()
    extra += _flags(args)
    cfg = KernelConfig(16, args.block_n, 128, num_warps=args.warps, num_stages=args.stages, extra=extra)
    kc, vc, ks, vs = caches
    import angel_kernels.attention.paged_decode as decode

    sms, decode.num_sms = decode.num_sms, lambda device: H100_SMS  # split counts as on the GPU
    try:
        return capture_launches(launch_paged_attention, q, kc, vc, block_table, seq_lens, D**-0.5, ks, vs, cfg=cfg)
    finally:
        decode.num_sms = sms


def _prefill_launch(args):
    from angel_kernels.attention.kv_cache import int8_page_bytes, int8_page_views
    from angel_kernels.attention.paged_prefill import launch_paged_varlen
    from angel_kernels.tuning import KernelConfig

    # 4 prompts × 1024 tokens, Llama-3-8B heads, block 16
    B, L, Hq, Hkv, D, page = 4, 1024, 32, 8, 128, 16
    blocks = B * L // page
    if args.kv == "int8":
        pages = torch.zeros(blocks, int8_page_bytes(page, Hkv, D), dtype=torch.int8)
        kc, vc, ks, vs = int8_page_views(pages, page, Hkv, D)
    else:
        kc = vc = torch.zeros(blocks, page, Hkv, D, dtype=torch.float16)
        ks = vs = None
    block_table = torch.arange(blocks, dtype=torch.int32).reshape(B, L // page)
    seq_lens = torch.full((B,), L, dtype=torch.int32)
    qsl = torch.arange(0, B * L + 1, L, dtype=torch.int32)
    q = torch.randn(B * L, Hq, D, dtype=torch.float16)
    cfg = KernelConfig(args.block_m or 128, args.block_n, D, num_warps=args.warps, num_stages=args.stages,
                       extra=(("D_SPLIT", args.d_split or 1), ("WORDS", args.words)) + _flags(args))
    return capture_launches(launch_paged_varlen, q, kc, vc, block_table, seq_lens, qsl, D**-0.5, ks, vs, cfg=cfg)


def _gemm_launch(args):
    from angel_kernels.gemm import w4a16, w8a16
    from angel_kernels.tuning import KernelConfig

    x = torch.randn(args.m, args.k, dtype=torch.float16)
    cfg = KernelConfig(args.block_m or 16, args.block_n, 128, num_warps=args.warps, num_stages=args.stages,
                       extra=(("GROUP_N", 1),) + ((("DOT_T", 1),) if args.dot_t else ()))
    if args.kernel == "w8a16":
        q = torch.randint(-127, 128, (args.n, args.k), dtype=torch.int8)
        return capture_launches(w8a16.launch_tiled, x, q, torch.rand(args.n), None, cfg)
    qw = torch.zeros(args.k // 8, args.n, dtype=torch.int32)
    sc = torch.ones(args.k // 128, args.n, dtype=torch.float16)
    return capture_launches(w4a16.launch_tiled, x, qw, sc, None, 128, None, None, cfg)


def _fragment_launch(args):
    from angel_kernels.gemm import fragment

    x = torch.randn(args.m, args.k, dtype=torch.float16)
    if args.int4:
        words = torch.zeros(args.n, args.k // 8, dtype=torch.int32)
        scales = torch.ones(args.k // 128, args.n, dtype=torch.float16)
    else:
        words = torch.zeros(args.n, args.k // 4, dtype=torch.int32)
        scales = torch.ones(args.n)
    p = fragment.FragmentProblem(args.m, args.n, args.k, x.dtype, x.device)  # CPU: the rules use 132 SMs
    return capture_launches(fragment._run_gluon, p, x, words, scales, None, int4=bool(args.int4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=("decode", "prefill", "w8a16", "w4a16", "fragment"))
    ap.add_argument("--kv", choices=("int8", "fp16"), default="int8")
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--block-m", type=int, default=None,
                    help="prefill: query rows per tile (default 128); w8a16/w4a16: token tile (default 16)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--d-split", type=int, default=None, help="head-dim halves (default: decode 2, prefill 1)")
    ap.add_argument("--words", type=int, default=0, help="decode, prefill: read the int8 cache as int32 words")
    ap.add_argument("--max-regs", type=int, default=0, help="decode: ptxas register cap (maxnreg)")
    ap.add_argument("--qk-int8", type=int, default=0, help="decode: q·kᵀ on int8 tensor cores (int8 cache)")
    ap.add_argument("--dot-t", type=int, default=0, help="w8a16, w4a16: tokens on the MMA's M side (DOT_T)")
    ap.add_argument("--int4", type=int, default=0, help="fragment: int4 words (default: int8)")
    ap.add_argument("--flag", action="append", default=[], metavar="NAME=VALUE",
                    help="decode, prefill: another config flag, e.g. PAGE_ADDR=1 or FENCE_V=1 (repeatable)")
    ap.add_argument("--dump", default=None, help="directory for the PTX, SASS and TTGIR")
    args = ap.parse_args(argv)
    if args.kernel == "decode":
        args.block_n = args.block_n or 128
        args.stages = args.stages or 2
        launches = _decode_launch(args)
    elif args.kernel == "prefill":
        args.block_n = args.block_n or 64
        args.stages = args.stages or 3
        launches = _prefill_launch(args)
    elif args.kernel == "fragment":
        launches = _fragment_launch(args)
    else:
        args.block_n = args.block_n or 64
        args.stages = args.stages or 3
        launches = _gemm_launch(args)
    print(f"triton {triton.__version__}, target sm_90a")
    for launch in launches:
        print(report(launch, args.dump))
    return 0


if __name__ == "__main__":
    sys.exit(main())
