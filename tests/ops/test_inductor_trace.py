"""What Inductor receives for the avkernels ops on CUDA (docs/DESIGN.md, "PyTorch
conventions"): AOTAutograd's functional graphs of a TrackedBN forward, of ``batch_norm_bwd``
and of the masking ops, traced on fake CUDA tensors (no GPU needed), must hold the avkernels
Triton kernels as user-defined Triton kernels (``triton_kernel_wrapper_functional``) and no opaque
``avkernels::`` op; on CPU the op stays. Tracing under ``FakeTensorMode`` without real inputs
also shows that the traced path reads no data on the host (``.item()`` on a fake tensor raises)
and uses no tensor kept across calls (mixing a real tensor in raises), which is what CUDA graph
capture needs. The joint forward and backward through TrackedBN's autograd is traced on a real
GPU only (``.ci/gpu``): the autograd engine asks the CUDA driver about the device.

``wrap_triton`` takes compiled-mode kernels, so under ``TRITON_INTERPRET=1`` this module reruns
itself in a process without it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from avkernels import TrackedBN  # noqa: E402
from avkernels.ops.batch_norm import triton_launch, triton_plans  # noqa: E402
from tests.helpers.batch_norm import INTERPRETER  # noqa: E402
from tests.helpers.scripts import script_environment  # noqa: E402

compiled_triton = pytest.mark.skipif(INTERPRETER, reason="run by test_without_the_interpreter")


@pytest.mark.skipif(not INTERPRETER, reason="the tests below run in this process")
def test_without_the_interpreter():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=script_environment(TRITON_INTERPRET=None),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-6000:]


def _traced_graphs(fn, *inputs) -> list[torch.fx.GraphModule]:
    """The forward graphs AOTAutograd hands its compiler for ``fn(*inputs)``."""
    graphs = []

    def keep(graph, _inputs):
        graphs.append(graph)
        return graph

    aot_function(fn, fw_compiler=keep)(*inputs)
    return graphs


def _called(graphs) -> tuple[list[str], list[str]]:
    """(Triton kernel names in launch order, avkernels ops) called by ``graphs``, the mutating
    ops' calls included (``auto_functionalized_v2(op, ...)``)."""
    kernels, ops = [], []
    for graph in graphs:
        for node in graph.graph.nodes:
            target = node.target
            if target is torch.ops.higher_order.auto_functionalized_v2:
                target = node.args[0]
            if target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernels.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
            elif getattr(target, "namespace", None) == "avkernels":
                ops.append(str(target))
    return kernels, ops


@pytest.fixture
def fake_gpu(monkeypatch):
    """Fake CUDA tensors; the launch plans sized for a 132-SM GPU instead of asking the driver."""
    monkeypatch.setattr(triton_plans, "target_programs", lambda device: 8 * 132)
    with FakeTensorMode() as mode:
        yield mode


def _trace_training_forward(device, layout=torch.contiguous_format):
    bn = TrackedBN(4, device=device)
    x = torch.randn(2, 4, 3, 5, device=device).to(memory_format=layout)
    state = {name: t.detach() for name, t in [*bn.named_parameters(), *bn.named_buffers()]}

    def forward(x, *tensors):
        return torch.func.functional_call(bn, dict(zip(state, tensors)), (x,))

    return _traced_graphs(forward, x, *state.values())


@compiled_triton
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_training_forward_on_cuda_is_two_user_triton_kernels(fake_gpu, layout):
    kernels, ops = _called(_trace_training_forward("cuda", layout))
    assert kernels == ["fwd_partial_stats_kernel", "fwd_normalize_kernel"]
    assert ops == []


@compiled_triton
def test_eval_forward_on_cuda_is_one_user_triton_kernel(fake_gpu):
    bn = TrackedBN(4, device="cuda").eval()
    x = torch.randn(2, 4, 3, 5, device="cuda")
    state = {name: t.detach() for name, t in [*bn.named_parameters(), *bn.named_buffers()]}

    def forward(x, *tensors):
        return torch.func.functional_call(bn, dict(zip(state, tensors)), (x,))

    kernels, ops = _called(_traced_graphs(forward, x, *state.values()))
    assert kernels == ["fwd_normalize_kernel"]
    assert ops == []


@compiled_triton
@pytest.mark.parametrize(("train", "expected"), [
    (True, ["bwd_partial_sums_kernel", "bwd_grad_x_kernel"]),
    (False, ["bwd_partial_sums_kernel"]),
])  # fmt: skip
def test_backward_on_cuda_is_user_triton_kernels(fake_gpu, train, expected):
    def backward(grad_y, x, weight, bias, mean, invstd):
        return torch.ops.avkernels.batch_norm_bwd(
            grad_y, x, weight, bias, None, None, None, mean, invstd, train, True
        )

    x = torch.randn(2, 4, 3, 5, device="cuda")
    channel, stats = torch.ones(4, device="cuda"), torch.ones(1, 4, device="cuda")
    kernels, ops = _called(_traced_graphs(backward, torch.randn_like(x), x, channel, channel,
                                          stats, stats))  # fmt: skip
    assert kernels == expected
    assert ops == []


@compiled_triton
def test_cpu_keeps_the_opaque_op(fake_gpu):
    kernels, ops = _called(_trace_training_forward("cpu"))
    assert kernels == []
    assert ops == ["avkernels.batch_norm_fwd.default"]


@compiled_triton
def test_masking_ops_on_cuda_are_user_triton_kernels(fake_gpu):
    seeds = torch.zeros(2, 2, dtype=torch.int64, device="cuda")
    ratio = torch.full((2,), 0.5, dtype=torch.float64, device="cuda")

    def zero_patches(x, ratio, seeds):
        torch.ops.avkernels.zero_masked_patches(x, ratio, seeds, 2, 3)
        return x

    def fusion(a, v, ratio, seeds):
        out = torch.ops.avkernels.masked_concat(a, v, ratio, None, seeds, 2, 4)
        return out, torch.ops.avkernels.masked_concat_backward(out, ratio, None, seeds, 6, 2, 4)

    x = torch.randn(2, 3, 2, 8, 6, device="cuda")
    a, v = torch.randn(2, 6, device="cuda"), torch.randn(2, 8, device="cuda")
    for graphs, expected in [
        (_traced_graphs(zero_patches, x, ratio, seeds), ["zero_masked_patches_kernel"]),
        (_traced_graphs(fusion, a, v, ratio, seeds), ["masked_copy_pair_kernel"] * 2),
    ]:
        kernels, ops = _called(graphs)
        assert kernels == expected
        assert ops == []


# Calls that read device data on the host or wait for the GPU: each breaks CUDA graph capture.
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "synchronize", "data_ptr", "nonzero")


def test_eager_cuda_launchers_have_no_host_syncs():
    """The eager launchers (and the checks they make) name none of HOST_SYNCS, so capturing their
    calls in a CUDA graph (``torch.cuda.graph``) records launches only. The scratch counters they
    keep per (device, stream) are reset by the kernels, so a replay finds them zeroed."""
    import ast
    import inspect

    from avkernels.ops import checks
    from avkernels.ops.masking import triton_launch as masking_launch

    for module in (triton_launch, masking_launch, checks):
        tree = ast.parse(inspect.getsource(module))
        called = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        }
        assert not called & set(HOST_SYNCS), (module.__name__, called & set(HOST_SYNCS))


def _small_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        TrackedBN(8, activation="relu"),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        TrackedBN(8),
    ).cuda()


@compiled_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by .ci/gpu)")
def test_reduce_overhead_compile_matches_eager_on_gpu():
    """Training steps of a TrackedBN model under CUDA graphs (mode="reduce-overhead"): the same
    outputs, gradients and buffers as eager, the avkernels kernels in Inductor's code, and no
    CUDA graph skipped."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    eager = _small_model()
    compiled_model = _small_model()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, mode="reduce-overhead", dynamic=False)
    counters.clear()
    for step in range(4):
        x = torch.randn(4, 3, 8, 8, device="cuda")
        expected = eager(x)
        expected.square().mean().backward()
        if step == 0:
            got, codes = run_and_get_code(compiled, x)
            code = "\n".join(codes)
            for kernel in ("fwd_partial_stats_kernel", "fwd_normalize_kernel"):
                assert kernel in code, f"{kernel} not in Inductor's forward code"
            assert "avkernels.batch_norm_fwd" not in code
        else:
            got = compiled(x)
        got = got.clone()  # the next replay overwrites a CUDA graph's output
        got.square().mean().backward()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4, msg=name)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@compiled_triton
def test_dynamic_batch_stays_symbolic(monkeypatch):
    """With a symbolic batch size (``torch.compile(dynamic=True)`` or Dynamo's automatic dynamic
    shapes after a second batch size) the traced launchers keep it symbolic, so a new batch size
    needs no new graph."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    monkeypatch.setattr(triton_plans, "target_programs", lambda device: 8 * 132)
    shapes = ShapeEnv()
    batch = shapes.create_symintnode(shapes.create_symbol(6, ConstantSource("batch")), hint=6)
    with FakeTensorMode(shape_env=shapes):
        x = torch.randn(batch, 4, 3, 5, device="cuda")
        channel, stats = torch.ones(4, device="cuda"), torch.ones(1, 4, device="cuda")

        def training_step(x, weight, mean, invstd):
            absent = (None,) * 11  # no bias, ABRi, running statistics or dead counters
            y, *_ = torch.ops.avkernels.batch_norm_fwd(x, weight, *absent, True, 0.1, 1e-5, False)
            return y, torch.ops.avkernels.batch_norm_bwd(
                y, x, weight, None, None, None, None, mean, invstd, True, False
            )

        graphs = _traced_graphs(training_step, x, channel, stats, stats)
    kernels, ops = _called(graphs)
    assert kernels == [
        "fwd_partial_stats_kernel",
        "fwd_normalize_kernel",
        "bwd_partial_sums_kernel",
        "bwd_grad_x_kernel",
    ]
    assert ops == []
    reads_batch = [n for n in graphs[0].graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert reads_batch, "the batch size was baked into the graph"
