import json

import pytest
import torch

from angel_kernels.tuning import KernelConfig, M_BUCKETS, TunedConfigStore, m_bucket, prune_configs, smem_bytes
from angel_kernels.tuning.store import slugify


@pytest.mark.parametrize("m,bucket", [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (100, 128), (4096, 4096), (10**6, 4096)])
def test_m_bucket(m, bucket):
    assert m_bucket(m) == bucket


def test_m_bucket_rejects_nonpositive():
    with pytest.raises(ValueError):
        m_bucket(0)


def test_buckets_are_sorted_powers_of_two():
    assert list(M_BUCKETS) == sorted(M_BUCKETS) and all(b & (b - 1) == 0 for b in M_BUCKETS)


def test_smem_and_pruning():
    small = KernelConfig(16, 64, 128, num_stages=4)
    huge = KernelConfig(256, 256, 256, num_stages=4)
    assert smem_bytes(small, 2, 1) == (16 * 128 * 2 + 128 * 64) * 4
    assert prune_configs([small, huge], K=4096) == [small]
    # group-wise weights: a K-block must stay inside one scale group
    g64 = prune_configs([KernelConfig(16, 64, 64), KernelConfig(16, 64, 128), KernelConfig(16, 64, 48)], K=4096, group_size=64)
    assert [c.BLOCK_K for c in g64] == [64]
    # split-K must divide K
    assert prune_configs([KernelConfig(16, 64, 128, SPLIT_K=3)], K=4096) == []


def test_config_roundtrip():
    cfg = KernelConfig(16, 64, 256, SPLIT_K=2, num_warps=4, num_stages=3, extra=(("GROUP_M", 8),))
    assert KernelConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg
    assert cfg.meta() == {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}


def test_store_record_save_and_lazy_reload(tmp_path):
    store = TunedConfigStore(tmp_path)
    assert store.lookup("k", "N=1,K=2,M=1", "cpu") is None
    cfg = KernelConfig(32, 64, 64, extra=(("GROUP_M", 4),))
    store.record("k", "N=1,K=2,M=1", cfg, "cpu")
    path = store.save("cpu")
    data = json.loads(path.read_text())
    assert path.name == "cpu.json"
    assert data["meta"]["format"] == 1 and data["meta"]["torch"] and data["meta"]["triton"]
    fresh = TunedConfigStore(tmp_path)
    assert fresh._tables == {}  # nothing read until the first lookup
    assert fresh.lookup("k", "N=1,K=2,M=1", "cpu") == cfg


def test_lookup_is_remembered_until_a_record(tmp_path):
    """Launchers look configs up on every call: the second lookup returns the same object without reading the
    table again; a record replaces what was remembered."""
    store = TunedConfigStore(tmp_path)
    cfg = KernelConfig(32, 64, 64)
    store.record("k", "x", cfg, "cpu")
    first = store.lookup("k", "x", "cpu")
    store._tables.clear()  # a second lookup must not need the table
    assert store.lookup("k", "x", torch.device("cpu")) is first == cfg
    assert store.lookup("k", "y", "cpu") is None
    newer = KernelConfig(16, 64, 64)
    store.record("k", "x", newer, "cpu")
    assert store.lookup("k", "x", "cpu") == newer


def test_store_ignores_unknown_format(tmp_path):
    (tmp_path / "cpu.json").write_text(json.dumps({"meta": {"format": 99}, "kernels": {"k": {"x": {}}}}))
    assert TunedConfigStore(tmp_path).lookup("k", "x", "cpu") is None


def test_shipped_configs_parse():
    from angel_kernels.tuning.store import CONFIG_DIR

    for path in CONFIG_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["meta"]["format"] == 1, path.name
        for kernel, table in data["kernels"].items():
            for key, entry in table.items():
                KernelConfig.from_dict(entry)


def test_slugify():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_tune_kernel_picks_fastest_valid_config_and_records_it(tmp_path):
    from angel_kernels.tuning import tune_kernel

    fast_but_wrong = KernelConfig(16, 32, 64)
    fast = KernelConfig(16, 64, 64)
    slow = KernelConfig(16, 128, 64)
    broken = KernelConfig(16, 256, 64)
    cost = {fast_but_wrong: 1.0, fast: 2.0, slow: 5.0}

    def make_call(cfg):
        if cfg == broken:
            raise RuntimeError("does not compile")
        return lambda: (cfg, "wrong" if cfg == fast_but_wrong else "right")

    def check(result):
        assert result[1] == "right"

    store = TunedConfigStore(tmp_path)
    best, timings = tune_kernel(
        store, "toy", "N=1,K=1,M=1", [fast_but_wrong, fast, slow, broken], make_call, "cpu",
        check=check, bench=lambda calls: cost[calls[0]()[0]],
    )
    assert best == fast and set(timings) == {fast, slow}
    assert store.lookup("toy", "N=1,K=1,M=1", "cpu") == fast


def test_tune_kernel_without_configs_is_an_error(tmp_path):
    from angel_kernels.tuning import tune_kernel

    with pytest.raises(ValueError, match="no configs"):
        tune_kernel(TunedConfigStore(tmp_path), "toy", "k", [], lambda c: None, "cpu")
