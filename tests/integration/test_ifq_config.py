"""``quantization="ifq"``: registration through the plugin entry point and the config's contract with vLLM."""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")


def test_register_is_idempotent_and_touches_no_cuda():
    code = textwrap.dedent(
        """
        import torch
        import angel_vllm
        angel_vllm.register()
        angel_vllm.register()
        angel_vllm.quant_ifq.register_ifq()  # even past register()'s own guard, a repeat must not raise
        from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
        assert get_quantization_config("ifq") is angel_vllm.quant_ifq.IfqConfig
        assert QUANTIZATION_METHODS.count("ifq") == 1
        assert WEIGHT_LOADER_V2_SUPPORTED.count("IfqLinearMethod") == 1
        assert not torch.cuda.is_initialized(), "register() initialized CUDA"
        """
    )
    # a fresh process: the test process may have registered already
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_config_contract():
    import torch
    from torch import nn

    from angel_vllm.quant_ifq import IfqConfig

    cfg = IfqConfig()  # online methods are built with no arguments
    assert cfg.get_name() == "ifq"
    assert IfqConfig.get_config_filenames() == []
    assert cfg.get_supported_act_dtypes() == [torch.float16, torch.bfloat16]
    assert isinstance(IfqConfig.from_config({"quant_method": "ifq"}), IfqConfig)
    assert cfg.get_quant_method(nn.Linear(4, 4), prefix="model.layers.0.mlp.down_proj") is None  # not a LinearBase
    assert cfg.get_quant_method(nn.Embedding(4, 4), prefix="model.embed_tokens") is None


def test_config_pickles():
    # vLLM ships the config to worker processes; classes defined at module level unpickle there
    import pickle

    from angel_vllm.quant_ifq import IfqConfig

    assert isinstance(pickle.loads(pickle.dumps(IfqConfig())), IfqConfig)


def test_register_without_vllm_is_a_no_op():
    # where vllm is absent (e.g. a GPU machine used for kernels and benchmarks only) register() must not raise
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoVllm(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoVllm())
        import angel_vllm
        angel_vllm.register()
        angel_vllm.register()
        assert "vllm" not in sys.modules
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
