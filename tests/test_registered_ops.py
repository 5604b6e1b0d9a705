"""Every registered op passes torch.library.opcheck (schema, fake impl, autograd registration, AOT dispatch)."""
import pytest
import torch

import angel_kernels  # noqa: F401  (registers the ops)
from angel_kernels._registry import registered_ops

OPS = registered_ops()


def test_ops_are_registered():
    assert "w8a16_gemm" in OPS
    for name in OPS:
        assert hasattr(torch.ops.angel_kernels, name)


@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(name, device):
    entry = OPS[name]
    n = 0
    for args, kwargs in entry.samples(device):
        torch.library.opcheck(entry.overload, args, kwargs)
        n += 1
    assert n > 0, f"{name} has no sample inputs"


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def _copies(args, kwargs):
    return tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()}


def _run(op, args, kwargs):
    """The op on fresh copies of the inputs: (result, the copies) so mutated inputs can be compared too."""
    args, kwargs = _copies(args, kwargs)
    return op(*args, **kwargs), args, kwargs


def _assert_same(got, want, what):
    g_out, g_args, g_kwargs = got
    w_out, w_args, w_kwargs = want
    pairs = [(g_out, w_out)] + list(zip(g_args, w_args)) + [(g_kwargs[k], w_kwargs[k]) for k in w_kwargs]
    for g, w in pairs:
        if isinstance(w, torch.Tensor):
            assert torch.equal(g, w), f"{what}: differs from the eager call"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(OPS))
def test_gpu_op_under_torch_compile_and_cuda_graphs(name):
    """As vLLM runs its custom ops on CUDA: each op traced by ``torch.compile(fullgraph=True)`` and each op
    captured in a CUDA graph and replayed gives the eager call's outputs (and mutated inputs) bit for bit."""
    entry = OPS[name]
    op = entry.overload
    for args, kwargs in entry.samples(torch.device("cuda")):
        eager = _run(op, args, kwargs)  # also compiles the kernels before the graph capture below

        torch._dynamo.reset()
        compiled = torch.compile(lambda *a, **k: op(*a, **k), fullgraph=True, dynamic=False)
        _assert_same(_run(compiled, args, kwargs), eager, f"{name} under torch.compile")

        c_args, c_kwargs = _copies(args, kwargs)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _run(op, args, kwargs)  # warm-up off-graph
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            out = op(*c_args, **c_kwargs)
        for a, orig in zip(c_args, args):  # the capture ran nothing: reset mutated inputs, then replay
            if isinstance(a, torch.Tensor):
                a.copy_(orig)
        for k, v in c_kwargs.items():
            if isinstance(v, torch.Tensor):
                v.copy_(kwargs[k])
        graph.replay()
        torch.cuda.synchronize()
        _assert_same((out, c_args, c_kwargs), eager, f"{name} replayed from a CUDA graph")
