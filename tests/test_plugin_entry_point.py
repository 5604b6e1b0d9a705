from importlib.metadata import entry_points


def test_entry_point_is_installed_and_idempotent():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "angel_kernels"]
    assert len(eps) == 1 and eps[0].value == "angel_vllm:register"
    register = eps[0].load()
    register()
    register()  # vLLM calls it in every process, possibly more than once
