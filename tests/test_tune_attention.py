"""benchmarks/tune_attention.py without a GPU: its config spaces, the per-case ranking and merging a tuned table
into the shipped one (the timing itself is replaced by a fake)."""
import json

import pytest
import torch

from angel_kernels.attention import paged_decode, paged_prefill
from angel_kernels.tuning import TunedConfigStore
from benchmarks import tune_attention as T


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float16])
def test_focus_spaces_are_slices_of_the_kernel_spaces(kv_dtype):
    cpu = torch.device("cpu")
    d = paged_decode.PagedDecodeProblem(32, 8, 128, 16, torch.float16, kv_dtype, cpu)
    p = paged_prefill.PagedPrefillProblem(32, 8, 128, 16, torch.float16, kv_dtype, cpu)
    for focus, full in ((T.focus_decode_space(d), paged_decode.tuning_space(d)),
                        (T.focus_prefill_space(p), paged_prefill.tuning_space(p))):
        assert 4 <= len(focus) <= 20 and set(focus) <= set(full)
    # the head-dim-128 decode default (the H100 winner) is among them, and the int8 prefill default
    assert paged_decode.heuristic_config(d) in T.focus_decode_space(d)
    if kv_dtype == torch.int8:
        assert paged_prefill.heuristic_config(p) in T.focus_prefill_space(p)


def test_per_case_ranking_weighs_every_case_alike(tmp_path, monkeypatch):
    """A config 2x slower on the small case and 10 % faster on the large one loses to the balanced one: summed
    time would pick it."""
    d = paged_decode.PagedDecodeProblem(32, 8, 128, 16, torch.float16, torch.int8, torch.device("cpu"))
    a, b = T.focus_decode_space(d)[:2]
    times = {(1, 1024): {a: 10.0, b: 20.0}, (64, 16384): {a: 1000.0, b: 900.0}}

    def fake_tune(*args, configs, cases, store, **kw):
        (case,) = cases
        return None, {c: times[case][c] for c in configs}

    monkeypatch.setattr(paged_decode, "tune", fake_tune)
    store = TunedConfigStore(str(tmp_path / "out"))
    best, score = T.tune_per_case(paged_decode, d, [a, b], ((1, 1024), (64, 16384)), store, str(tmp_path / "scratch"))
    assert best == a and score[a] == pytest.approx((1.0 * 1000 / 900) ** 0.5)
    assert store.lookup(paged_decode.KERNEL_NAME, d.key(), d.device) == a


def test_ship_merges_kernel_by_kernel_and_key_by_key(tmp_path):
    shipped = tmp_path / "configs" / "gpu.json"
    shipped.parent.mkdir()
    shipped.write_text(json.dumps({"kernels": {"k1": {"a": 1, "b": 2}, "k2": {"c": 3}}, "meta": {"gpu": "X"}}))
    tuned = tmp_path / "gpu.json"
    tuned.write_text(json.dumps({"kernels": {"k1": {"b": 20, "d": 4}}, "meta": {"gpu": "Y"}}))
    T.ship(tuned, shipped.parent)
    assert json.loads(shipped.read_text()) == {"kernels": {"k1": {"a": 1, "b": 20, "d": 4}, "k2": {"c": 3}},
                                               "meta": {"gpu": "X"}}


def test_ship_keeps_the_launch_rules_no_tune_varies(tmp_path):
    shipped = tmp_path / "configs" / "gpu.json"
    shipped.parent.mkdir()
    old = {"num_stages": 2, "extra": {"MIN_SPLIT_TILES": 8, "ONE_WAVE_STAGES": 3}}
    shipped.write_text(json.dumps({"kernels": {"k": {"key": old}}, "meta": {}}))
    tuned = tmp_path / "gpu.json"
    tuned.write_text(json.dumps({"kernels": {"k": {"key": {"num_stages": 3, "extra": {"MIN_SPLIT_TILES": 4}}}},
                                 "meta": {}}))
    T.ship(tuned, shipped.parent)
    assert json.loads(shipped.read_text())["kernels"]["k"]["key"] == {
        "num_stages": 3, "extra": {"MIN_SPLIT_TILES": 4, "ONE_WAVE_STAGES": 3}}
