"""benchmarks/sass_report.py: launches captured on the CPU compile for sm_90a as the GPU would specialize them.

Run in a subprocess: the CPU tier sets TRITON_INTERPRET=1, under which kernels are interpreted functions that
cannot be compiled."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="this Triton ships no NVIDIA tools")


def _python(code_or_args: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


SPECIALIZE = """
import json, torch
from benchmarks import sass_report as S
from angel_kernels.gemm import w8a16
from angel_kernels.tuning import KernelConfig
x = torch.randn(3, 256, dtype=torch.float16)
q = torch.randint(-127, 128, (128, 256), dtype=torch.int8)
cfg = KernelConfig(16, 64, 128, num_warps=4, num_stages=3, extra=(("GROUP_N", 1),))
launches = S.capture_launches(w8a16.launch_tiled, x, q, torch.rand(128), None, cfg)
sig, consts, attrs, options = S._specialize(launches[0])
names = [p.name for p in launches[0].fn.params]
print(json.dumps({"kernels": [l.fn.__name__ for l in launches], "sig": sig, "options": options,
                  "consts": {names[k[0]]: v for k, v in consts.items() if not hasattr(v, "__dict__")},
                  "divisible": sorted(names[k[0]] for k in attrs)}))
"""


def test_capture_records_launches_and_specializes_like_the_gpu():
    got = json.loads(_python(["-c", SPECIALIZE]).strip().splitlines()[-1])
    assert got["kernels"] == ["_w8a16_gemm_kernel"]  # recorded, not run
    assert got["sig"]["x_ptr"] == "*fp16" and got["sig"]["w_ptr"] == "*i32"  # the int8 weight read as words
    assert got["consts"]["stride_xk"] == 1  # integers equal to 1 become constants
    assert got["sig"]["K"] == "i32" and "K" in got["divisible"]  # 256: divisible by 16
    assert got["consts"]["ASM"] is True and got["consts"]["DOT_FP32"] is False  # GPU switches, not the CPU's
    assert got["options"] == {"num_warps": 4, "num_stages": 3}


def test_report_counts_registers_and_the_main_loop():
    out = _python(["benchmarks/sass_report.py", "w8a16", "--n", "256", "--k", "512"])
    assert "_w8a16_gemm_kernel" in out and "registers/thread" in out
    assert "HGMMA" in out.split("hottest loop:")[1]  # the tensor-core main loop of an sm_90a build


FRAGMENT = """
import json, torch
from benchmarks import sass_report as S
from angel_kernels.gemm import fragment
x = torch.randn(256, 4096, dtype=torch.float16)
words = torch.zeros(4096, 4096 // 4, dtype=torch.int32)
p = fragment.FragmentProblem(256, 4096, 4096, x.dtype, x.device)
launches = S.capture_launches(fragment._run_gluon, p, x, words, torch.ones(4096), None, int4=False)
sig, consts, attrs, options = S._specialize(launches[0])
print(json.dumps({"kernels": [l.fn.__name__ for l in launches], "x_desc": sig["x_desc"]}))
"""


def test_fragment_op_launches_specialize_with_their_tma_descriptors():
    got = json.loads(_python(["-c", FRAGMENT]).strip().splitlines()[-1])
    assert got["kernels"] == ["_fragment_gemm_paired_kernel"]  # 4096×4096, M = 256: paired tiles (132 SMs)
    assert got["x_desc"].startswith("tensordesc<fp16[128, 64]")  # Triton's own type string for the descriptor
