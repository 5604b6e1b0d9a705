"""CPU tests of the benchmark harness: slugs, floors, rows and result files, tables, plots, the quantizers and
references the benchmarks check peers against, and one end-to-end family run on CPU."""
import json
import math

import pytest

from benchmarks import bench_attention as A
from benchmarks import bench_gemm as G
from benchmarks import bench_kv_write as W
from benchmarks import bench_prefill as PF
from benchmarks import harness as H
from benchmarks import plot as P

# The ANCHORS.md machine: 3.0 TB/s copy, ~700 TFLOP/s fp16, 895 TOP/s int8.
H100 = H.Floors(copy_bw=3.0e12, fp16_flops=700e12, int8_ops=895e12, l2_bytes=50 * 2**20)


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA H200", "nvidia-h200"),
    ("  NVIDIA  A100-SXM4-40GB ", "nvidia-a100-sxm4-40gb"),
    ("***", "unknown"),
])
def test_slug(name, slug):
    assert H.gpu_slug(name) == slug


def test_git_sha_falls_back_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ANGEL_GIT_SHA", "abc123")
    assert H.git_sha(tmp_path) == "abc123"  # tmp_path is no git checkout
    assert H.git_sha() == "abc123"  # the variable wins over a checkout too (a copied tree's .git may be stale)
    monkeypatch.delenv("ANGEL_GIT_SHA")
    assert H.git_sha(tmp_path) == "unknown"


def test_quantile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert H.quantile(xs, 0.5) == 3.0
    assert H.quantile(xs, 0.2) == pytest.approx(1.8)
    assert H.quantile(xs, 0.8) == pytest.approx(4.2)
    assert H.quantile([7.0], 0.2) == 7.0
    with pytest.raises(ValueError):
        H.quantile([], 0.5)


@pytest.mark.parametrize("m, kind, expected_us", [
    (1, "w16", 78.3), (1, "w8", 39.2), (1, "w4", 19.6),  # ANCHORS.md, 28672×4096 (its floors count bytes only)
    (16, "w16", 78.6), (1024, "w16", 100.7), (1024, "w8", 61.5), (1024, "w4", 41.9),
])
def test_gemm_floor_bytes_match_anchors(m, kind, expected_us):
    b, f, c = G.floor_model(G.make_case("8b.gate_up", m))[kind]
    assert b / H100.copy_bw * 1e6 == pytest.approx(expected_us, abs=0.06)
    assert H.floor_us(b, f, c, H100) == pytest.approx(max(b / H100.copy_bw, f / H100.fp16_flops) * 1e6)


def test_floor_takes_the_compute_bound_when_larger():
    case = G.make_case("70b.gate_up", 4096)
    b, f, c = G.floor_model(case)["w16"]
    assert f / H100.fp16_flops > b / H100.copy_bw
    assert H100.floor_us(b, f, c) == pytest.approx(2 * 4096 * 28672 * 8192 / 700e12 * 1e6)
    # W8A8 is measured against the int8 peak
    b8, f8, c8 = G.floor_model(case)["a8w8"]
    assert c8 == "int8" and H100.floor_us(b8, f8, c8) == pytest.approx(f8 / 895e12 * 1e6)
    with pytest.raises(ValueError):
        H100.peak("fp4")


@pytest.mark.parametrize("batch, context, kind, expected_us", [
    (1, 1024, "kv16", 1.4), (1, 1024, "kv8", 0.7), (64, 16384, "kv16", 1431.7), (64, 16384, "kv8", 738.2),
    (8, 32768, "kv16", 357.9), (8, 32768, "kv8", 184.5),
])
def test_attention_floor_matches_anchors(batch, context, kind, expected_us):
    b, f, c = A.floor_model(A.make_case(batch, context))[kind]
    # ANCHORS.md rounds q + out (≤ 0.4 µs) away; the floor here counts them
    assert H.floor_us(b, f, c, H100) == pytest.approx(expected_us, abs=0.06 + 0.4)
    assert H.floor_us(b, f, c, H100) >= expected_us - 0.06


def test_pct_of_floor():
    assert H.pct_of_floor(50.0, 100.0) == 50.0
    assert H.pct_of_floor(None, 100.0) is None and H.pct_of_floor(1.0, None) is None


def test_rotation_count_exceeds_l2():
    l2 = 50 * 2**20
    for set_bytes in (1, 4 * 2**20, 33 * 2**20, 60 * 2**20, 2**30):
        n = H.rotation_count(set_bytes, l2)
        assert 1 <= n <= H.MAX_INPUT_SETS
        assert n == H.MAX_INPUT_SETS or n * set_bytes >= H.ROTATION_L2_FACTOR * l2
    assert H.rotation_count(2**30, l2) == 1
    assert H.rotation_count(10, 0) == 1  # no L2 to defeat (CPU)


def test_case_order_and_quick_rows():
    quick = G.build_cases(quick=True)
    assert [(c["shape"], c["M"]) for c in quick[:5]] == [("8b.gate_up", m) for m in (1, 16, 64, 256, 1024)]
    assert len(quick) == 13
    full = G.build_cases()
    assert len(full) == len(G.SHAPES) * len(G.M_ALL)
    assert full[:13] == quick  # the ANCHORS rows always run first
    assert len({(c["shape"], c["M"]) for c in full}) == len(full)
    assert [c["M"] for c in G.build_cases(shapes=["8b.o"], ms=[1, 4096])] == [1, 4096]
    assert len(A.build_cases()) == len(A.CASES) and all(c["context"] % 16 == 0 for c in A.build_cases())


def _meta():
    return {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "git_sha": "f" * 40}


def _rows():
    case1, case2 = G.make_case("8b.gate_up", 1), G.make_case("8b.gate_up", 16)
    floors = {k: H100.floor_us(*v) for k, v in G.floor_model(case1).items()}
    t = H.Timing(median_us=40.0, p20_us=39.0, p80_us=41.5, method="graph", calls_per_sample=64, samples=20)
    te = H.Timing(median_us=250.0, p20_us=240.0, p80_us=260.0, method="eager", calls_per_sample=8, samples=5,
                  note="graph capture failed (RuntimeError: x); eager timing")
    common = dict(family="gemm", meta=_meta(), case_floors=floors)
    return [
        H.make_row(case=case1, case_str=G.case_str(case1), provider="cublas_fp16", timing=t, floor=floors["w16"],
                   floor_kind="w16", rel_error=3.2e-4, **common),
        H.make_row(case=case1, case_str=G.case_str(case1), provider="gemlite_a16w8", timing=te, floor=floors["w8"],
                   floor_kind="w8", rel_error=1e-3, note="int8 per-channel", **common),
        H.make_row(case=case1, case_str=G.case_str(case1), provider="tinygemm_w4", status=H.STATUS_REFCHECK_FAILED,
                   floor=floors["w4"], floor_kind="w4", rel_error=1.2, **common),
        H.make_row(case=case2, case_str=G.case_str(case2), provider="torch_int_mm", status=H.STATUS_SKIPPED,
                   reason="torch._int_mm needs M > 16", **common),
        H.make_row(case=case2, case_str=G.case_str(case2), provider="cublas_fp16", status=H.STATUS_ERROR,
                   error="RuntimeError: boom", rel_error=math.inf, **common),
    ]


def test_rows_have_the_schema_and_round_trip(tmp_path):
    rows = _rows()
    for r in rows:
        assert set(H.ROW_KEYS) <= set(r)
    ok = rows[0]
    assert ok["median_us"] == 40.0 and ok["timing"] == "graph" and ok["git_sha"] == "f" * 40
    assert ok["pct_of_floor"] == pytest.approx(100 * ok["floor_us"] / 40.0, abs=0.01)
    assert ok["case"] == {"shape": "8b.gate_up", "M": 1, "N": 28672, "K": 4096}
    assert rows[1]["timing"] == "eager" and "graph capture failed" in rows[1]["note"]
    assert rows[2]["median_us"] is None and rows[2]["pct_of_floor"] is None
    assert rows[4]["rel_err"] == "inf"
    path = H.write_rows(rows, tmp_path, H.gpu_slug(_meta()["gpu"]), "gemm")
    assert path == tmp_path / "nvidia-h100-80gb-hbm3" / "gemm.json"
    assert H.load_rows(path) == json.loads(json.dumps(rows))


def test_floors_sidecar_merges_families(tmp_path):
    H.write_floors(tmp_path, "gpu", "gemm", H100, _meta(), {"gemlite_a8w8": "import gemlite failed"})
    H.write_floors(tmp_path, "gpu", "attention", H100, _meta())
    data = json.loads((tmp_path / "gpu" / "floors.json").read_text())
    assert set(data) == {"gemm", "attention"}
    assert data["gemm"]["copy_bw_GBps"] == pytest.approx(3000.0)
    assert data["gemm"]["unavailable"] == {"gemlite_a8w8": "import gemlite failed"}


def test_table_lists_cases_providers_and_floors():
    rows = _rows()
    text = H.format_table(rows, "median_us", title="gemm")
    lines = text.splitlines()
    assert lines[0] == "### gemm (µs)"
    assert lines[1].startswith("| case | cublas_fp16 | gemlite_a16w8 | tinygemm_w4 | torch_int_mm |")
    assert "floor w16 / w8 / a8w8 / w4 (µs)" in lines[1]
    row1 = next(x for x in lines if x.startswith("| 8b.gate_up 28672x4096 M=1 |"))
    assert "| 40.0 | 250.0e | FAIL | - |" in row1 and "78.3 / 39.2 / 39.2 / 19.6" in row1
    row16 = next(x for x in lines if x.startswith("| 8b.gate_up 28672x4096 M=16 |"))
    assert "| err | - | - | skip |" in row16
    assert any("tinygemm_w4: refcheck_failed" in x and "1.2" in x for x in lines)
    pct = H.format_table(rows, "pct_of_floor")
    assert f"| {rows[0]['pct_of_floor']:.1f} |" in pct


def test_plot_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    path = H.write_rows(_rows(), tmp_path, "gpu", "gemm")
    for metric in ("us", "pct"):
        out = tmp_path / f"plot_{metric}.png"
        assert P.main([str(path), "--metric", metric, "--where", "shape=8b.gate_up", "-o", str(out)]) == 0
        assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert P.main([str(path), "--where", "shape=none"]) == 1


# --- the quantizers and references the peers are checked against (torch on CPU) ---------------------------------
torch = pytest.importorskip("torch")


def test_int4_packing_for_tinygemm():
    q = torch.tensor([[1, 2, 3, 4, 15, 0, 7, 8]], dtype=torch.uint8)
    assert G.pack_int4_tinygemm(q).tolist() == [[0x12, 0x34, 0xF0, 0x78]]


def test_int4_quantizer_and_tinygemm_scales_zeros():
    g = torch.Generator().manual_seed(0)
    n, k = 16, 256
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale, zero = G.quant_int4_asym(w, 128)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    deq = G.dequant_int4(q, scale, zero, 128)
    assert ((deq - w).abs() <= scale.repeat_interleave(128, dim=1) * 0.51).all()
    sz = G.tinygemm_scales_zeros(scale, zero, torch.float32)
    assert sz.shape == (k // 128, n, 2)
    assert torch.allclose(G.dequant_tinygemm(q, sz, 128), deq, atol=1e-6)
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("no CPU tinygemm in this torch")
    # tinygemm's own CPU kernel agrees with our reading of its (q − 8) · scale + zero convention
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    sz16 = G.tinygemm_scales_zeros(scale, zero, torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz16)
    ref = G._ref_matmul(x, G.dequant_tinygemm(q, sz16, 128))
    assert H.rel_err(y, ref) < 1e-2


def test_int8_and_activation_quantizers():
    w = torch.randn(8, 64)
    q, s = G.quant_rows_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] * 0.51).all()
    xq, sx = G.quant_act_per_token(torch.randn(4, 64), torch.int8, 127.0, -128.0, round_=True)
    assert xq.dtype == torch.int8 and sx.shape == (4,)


def test_rel_err_flags_nan_and_shape():
    ref = torch.ones(4)
    assert H.rel_err(torch.ones(4), ref) == 0.0
    assert H.rel_err(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref) == math.inf
    with pytest.raises(ValueError):
        H.rel_err(torch.ones(5), ref)


def test_paged_reference_matches_dense_and_sdpa():
    g = torch.Generator().manual_seed(1)
    b, l, hq, hkv, d, bs = 3, 37, 8, 2, 16, 16
    bt, nb = A.shuffled_block_table(b, l, bs, "cpu", generator=g)
    assert sorted(bt.flatten().tolist()) == list(range(nb))
    k = torch.randn(b, l, hkv, d, generator=g)
    v = torch.randn(b, l, hkv, d, generator=g)
    kc = torch.full((nb, bs, hkv, d), float("nan"))  # unwritten slots must never be read
    vc = kc.clone()
    slots = A.slot_mapping(bt, l, bs)
    kc.view(-1, hkv, d)[slots] = k.reshape(-1, hkv, d)
    vc.view(-1, hkv, d)[slots] = v.reshape(-1, hkv, d)
    q = torch.randn(b, hq, d, generator=g)
    scale = d ** -0.5
    paged = A.paged_attention_ref(q, A.fp16_loader(kc, vc), bt, [l] * b, scale, bs)
    dense = A.dense_attention_ref(q, k, v, scale)
    assert torch.allclose(paged, dense, atol=1e-5)
    kr = k.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)  # [B, Hq, L, D]
    vr = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kr, vr, scale=scale)[:, :, 0]
    assert torch.allclose(dense, sdpa, atol=1e-5)
    call = A._sdpa_fn(hq, hkv, d, flash=False)  # the dense peer's GQA-as-rows trick
    assert torch.allclose(call(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()), dense, atol=1e-5)


def test_int8_inline_cache_layout():
    nb, bs, hkv, d = 2, 16, 2, 8
    kv, kc, vc, ks, vs = A.int8_inline_cache(nb, bs, hkv, d, "cpu")
    assert kv.shape == (nb, bs, hkv, 2 * (d + 4)) and kc.shape[-1] == d + 4 and vc.shape[-1] == d + 4
    assert ks.shape == vs.shape == (nb, bs, hkv) and ks.dtype == torch.float32
    kv.zero_()
    ks[1, 3, 1] = 2.5
    vs[1, 3, 1] = -1.0
    raw = kv[1, 3, 1]  # one (block, slot, head): [K (d) | K scale | V (d) | V scale]
    assert raw[d:d + 4].view(torch.float32).item() == 2.5
    assert raw[2 * d + 4:].view(torch.float32).item() == -1.0
    assert int(raw[:d].abs().sum()) == 0 and int(raw[d + 4:2 * d + 4].abs().sum()) == 0
    kc[..., :d] = 3
    deq_k, _ = A.int8_loader(kc, vc, ks, vs, d)(torch.tensor([1]))
    assert deq_k.shape == (bs, hkv, d) and deq_k[3, 1, 0].item() == 7.5


# --- one family end to end on CPU: refcheck, errors, skips, result files, table ---------------------------------
def _tiny_family():
    F = torch.nn.functional

    def prep_ok(case, device):
        x, w = torch.randn(case["M"], case["K"]), torch.randn(case["N"], case["K"])
        return H.Prepared(fn=F.linear, input_sets=[(x, w)], ref=lambda: x @ w.t(), floor_kind="w16", tol=1e-4)

    def prep_wrong(case, device):
        x, w = torch.randn(case["M"], case["K"]), torch.randn(case["N"], case["K"])
        return H.Prepared(fn=lambda a, b: F.linear(a, b) * 2, input_sets=[(x, w)], ref=x @ w.t(), floor_kind="w8")

    def prep_raise(case, device):
        raise RuntimeError("no kernel for this shape")

    reg = H.ProviderRegistry("tiny")
    reg.add(H.Provider("ok", prep_ok, floor_kind="w16"))
    reg.add(H.Provider("wrong", prep_wrong, floor_kind="w8"))
    reg.add(H.Provider("raises", prep_raise, floor_kind="w4"))
    reg.add(H.Provider("picky", prep_ok, supports=lambda c: (c["M"] > 1, "needs M > 1")))
    reg.add(H.Provider("absent", prep_ok, available=lambda: (False, "not installed")))
    cases = [{"shape": "t", "M": 1, "N": 8, "K": 16}, {"shape": "t", "M": 4, "N": 8, "K": 16}]
    return H.Family("tiny", cases, G.case_str, G.floor_model, reg, sort_key=G.sort_key)


def test_run_family_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "TARGET_TOTAL_MS", 5.0)
    monkeypatch.setattr(H, "TARGET_GRAPH_US", 50.0)
    fam = _tiny_family()
    logs = []
    rows = H.run_family(fam, out=tmp_path, device=torch.device("cpu"), floors=H100, meta=_meta(), log=logs.append)
    by = {(r["case"]["M"], r["provider"]): r for r in rows}
    assert by[(1, "ok")]["status"] == "ok" and by[(1, "ok")]["timing"] == "cpu" and by[(1, "ok")]["median_us"] > 0
    assert by[(1, "wrong")]["status"] == "refcheck_failed" and by[(1, "wrong")]["median_us"] is None
    assert by[(1, "wrong")]["rel_err"] == pytest.approx(1.0, rel=1e-3)
    assert by[(1, "raises")]["status"] == "error" and "no kernel" in by[(1, "raises")]["error"]
    assert by[(1, "raises")]["floor_kind"] == "w4" and by[(1, "raises")]["floor_us"] is not None
    assert by[(1, "picky")]["status"] == "skipped" and by[(4, "picky")]["status"] == "ok"
    assert not any(r["provider"] == "absent" for r in rows)
    assert any("absent skipped: not installed" in line for line in logs)
    saved = H.load_rows(tmp_path / "nvidia-h100-80gb-hbm3" / "tiny.json")
    assert len(saved) == len(rows) == 8
    floors = json.loads((tmp_path / "nvidia-h100-80gb-hbm3" / "floors.json").read_text())
    assert floors["tiny"]["unavailable"] == {"absent": "not installed"}
    assert "| t 8x16 M=1 |" in H.format_table(saved)
    # a spent budget records the remaining cases as skipped instead of running them
    rows = H.run_family(fam, out=tmp_path / "b", device=torch.device("cpu"), floors=H100, meta=_meta(),
                        budget_s=-1.0, log=logs.append)
    assert {r["status"] for r in rows} == {"skipped"} and "time budget" in rows[0]["reason"]


def test_plan_lists_providers_and_skips():
    lines = []
    fam = G.family(quick=True)
    fam.providers = fam.providers.select(["cublas_fp16", "torch_int_mm"])  # no heavy imports in the CPU tier
    avail = H.plan(fam, lines.append, cuda=False)
    assert set(avail) == {"cublas_fp16", "torch_int_mm"}
    assert any("M=1: cublas_fp16, torch_int_mm (skip:" in x for x in lines)
    assert "angel_w8a16" in G.providers().names()
    assert A.providers().names() == ["vllm_fp16", "vllm_int8", "sdpa_dense_fp16", "angel_fp16", "angel_int8",
                                     "angel_int8_vllm_layout"]
    assert PF.providers().names() == ["sdpa_flash_fp16", "vllm_fp16", "vllm_int8", "angel_fp16", "angel_int8",
                                     "angel_int8_vllm_layout"]
    assert [PF.case_str(c) for c in PF.build_cases()][-1] == "B=1 new=512 prefix=3584"
    assert PF.visible_pairs(4, 0) == 10 and PF.visible_pairs(2, 3) == 2 * 3 + 3
    assert W.providers().names() == ["vllm_fp16", "vllm_int8", "angel_fp16", "angel_int8", "angel_int8_vllm_layout"]
    # int8 write: read 2 fp16 tensors + slots, write 2 int8 tensors + 2 fp32 scales per (token, head)
    assert W.floor_model(W.make_case(2))["int8"][0] == 2 * 2048 * 2 + 16 + 2 * 2048 + 2 * 2 * 8 * 4
    assert "angel_w4a16" in G.providers().names()
    with pytest.raises(ValueError):
        G.providers().select(["nope"])
