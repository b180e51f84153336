"""torch.compile(fullgraph=True) on a model using every bcnswift.torch module: no graph break (fullgraph raises
on one), the kernels run inside the compiled graph, and training steps and eval give eager's results."""
import contextlib
import copy
import functools
import subprocess
import sys

import pytest

from conftest import require
from test_torch_edges import assert_batched_gradients_as_alone
from test_torch_ops import eager_route, gen, rand_input  # noqa: F401 (eager_route, gen are fixtures)

torch = require("torch")
import bcnswift.torch as bt  # noqa: E402
from bcnswift.torch import _ops, _requirements  # noqa: E402
from torch import nn  # noqa: E402


def every_module_model():
    est = bt.BCNorm(16, 4, estimate=True)
    est.bn.estbn_moving_speed.fill_(0.1)
    return nn.Sequential(
        bt.Conv2d(3, 16, 3, padding=1, bias=False), bt.BCNorm(16, 4), nn.ReLU(),
        bt.Conv2d(16, 16, 3, padding=1, bias=False, convention="labml"), est, nn.ReLU(),
        bt.Conv2d(16, 16, 3, padding=1, bias=False), bt.BatchChannelNorm(16, 8), nn.ReLU(),
        bt.Conv2d(16, 16, 1, bias=False), bt.BatchChannelNorm(16, 8, estimate=False), bt.ChannelNorm(16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), bt.Linear(16, 10))


def twin_models():
    """The every-module model in float64 and a deep copy, dynamo's caches cleared first."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = every_module_model().double()
    return eager, copy.deepcopy(eager)


def train_step_alike(eager, module, compiled, x, target, step, optimizers=(), unchecked=()):
    """One training step of the eager model and of `compiled` (`module` compiled) on x: outputs, gradients and
    buffers (but those named in `unchecked`) equal to float64's rounding. The optimizers then step (else the
    gradients are cleared)."""
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, rtol=1e-10, atol=1e-10, msg=f"step {step}: output")
    nn.functional.cross_entropy(ye, target).backward()
    nn.functional.cross_entropy(yc, target).backward()
    for (name, pe), pc in zip(eager.named_parameters(), module.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-9, atol=1e-10, msg=f"step {step}: grad {name}")
    for opt in optimizers:
        opt.step()
    eager.zero_grad(), module.zero_grad()
    for (name, be), bc in zip(eager.named_buffers(), module.buffers()):
        if name.rsplit(".", 1)[-1] not in unchecked:
            torch.testing.assert_close(bc, be, rtol=1e-10, atol=1e-10, msg=f"step {step}: buffer {name}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_model_has_no_graph_break_and_matches_eager(layout, gen, kernel_calls):
    eager, compiled_module = twin_models()
    compiled = torch.compile(compiled_module, fullgraph=True)
    if layout == "channels_last":
        eager, compiled_module = (m.to(memory_format=torch.channels_last) for m in (eager, compiled_module))
    kernel_calls.clear()
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_module.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        x = rand_input(gen, (2, 3, 8, 8), torch.float64, layout)
        target = torch.randint(0, 10, (2,), generator=gen)
        train_step_alike(eager, compiled_module, compiled, x, target, step, (opt_e, opt_c))
    eager.eval(), compiled_module.eval()
    x = rand_input(gen, (2, 3, 8, 8), torch.float64, layout)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-10, msg="eval")
    # every normalization in both models ran on the kernels: 5 fused calls per forward
    assert len(kernel_calls.named("norm_forward")) == 2 * 5 * 4


@functools.cache
def _compile_keeps_float_scalar_buffer_updates():
    """Whether torch.compile keeps an in-place update of a 0-dim float64 buffer in its graph. torch 2.9 to 2.13
    drop it (for torch's own modules alike; seen with every backend, though not always with "eager"); 2.14 keeps
    it."""
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.full((), 2.0, dtype=torch.float64))

        def forward(self, x):
            with torch.no_grad():
                self.count.copy_(self.count + 1)
            return x * 2

    torch._dynamo.reset()
    counter = Counter()
    torch.compile(counter, fullgraph=True)(torch.ones(2))
    return counter.count.item() == 3.0


#: torch releases (2.9 to 2.14) whose compile(dynamic=True) compiles again for a new image size: the backward is
#: compiled with strides of the first call's size, and a layout test on them (`_ops._form`, and torch.empty_like's
#: own) specializes the size, for torch's own norm layers too (docs/PYTORCH.md, "Supported torch versions")
RECOMPILES_FOR_A_NEW_SIZE = _requirements.release(torch.__version__) < (2, 15)


def _strided_buffers(model):
    """Every batch-norm stage's running statistics as strided views and its count as a float (test_torch_edges)."""
    from test_torch_edges import _hand_set_buffers
    for m in model.modules():
        if isinstance(m, (bt.BCNorm, bt.BatchChannelNorm)):
            _hand_set_buffers(m)
    return model


@pytest.mark.parametrize("why", ["BCNSWIFT_TORCH_COMPOSED", "strided buffers"])
def test_compiled_composed_route_matches_eager(why, gen, monkeypatch, kernel_calls):
    """The composed route traced whole (as a GPU, half precision or BCNSWIFT_TORCH_COMPOSED=1 take it, and a
    training step on buffers set by hand in forms the kernels do not write): EstBN's moving speed, which eager
    mode reads from its buffer to check it, broke the graph with a data-dependent guard."""
    # torch 2.9 to 2.13 drop the compiled update of the count set by hand as a 0-dim float, as they do for torch's
    # own modules: there the counts alone go unchecked (momentum 0.1 throughout, so no other value reads them)
    lost = () if why != "strided buffers" or _compile_keeps_float_scalar_buffer_updates() else ("num_batches_tracked",)
    eager, compiled_module = twin_models()
    if why == "BCNSWIFT_TORCH_COMPOSED":
        monkeypatch.setattr(bt.functional, "COMPOSED", True)
    else:
        eager, compiled_module = _strided_buffers(eager), _strided_buffers(compiled_module)
    compiled = torch.compile(compiled_module, fullgraph=True)
    kernel_calls.clear()
    for step in range(2):
        x = rand_input(gen, (2, 3, 8, 8), torch.float64)
        target = torch.randint(0, 10, (2,), generator=gen)
        train_step_alike(eager, compiled_module, compiled, x, target, step, unchecked=lost)
    # composed throughout, but for the layer without a batch-norm stage (ChannelNorm), whose kernels write no
    # buffer: it alone runs on them with strided buffers elsewhere
    normalizations = len(kernel_calls.named("norm_forward"))
    assert normalizations == (0 if why == "BCNSWIFT_TORCH_COMPOSED" else 2 * 2), kernel_calls.calls


@pytest.mark.parametrize("route", ["kernels", "composed"])
@pytest.mark.parametrize("module", ["BCNorm", "EstBN"])
def test_compiled_refuses_a_moving_speed_out_of_range_and_changes_no_buffer(route, module, gen, monkeypatch):
    """EstBN's moving speed set by hand outside [0, 1]: refused under torch.compile on both routes, as in eager
    mode, before any buffer is written. (The composed route traced whole checked it nowhere: eager mode reads the
    buffer to check it, which a graph cannot.) The graph is the one compiled for a good speed: a speed is a
    value, which no guard watches."""
    torch._dynamo.reset()
    if route == "composed":
        monkeypatch.setattr(bt.functional, "COMPOSED", True)
    m = bt.BCNorm(8, 4, estimate=True).double() if module == "BCNorm" else bt.EstBN(8).double()
    bn = m.bn if module == "BCNorm" else m
    bn.estbn_moving_speed.fill_(0.25)
    compiled = torch.compile(m, fullgraph=True)
    x = rand_input(gen, (4, 8, 5, 5), torch.float64)
    compiled(x)  # compiled, and trains, at a speed in range
    for speed in (1.5, -0.25, float("nan")):
        bn.estbn_moving_speed.fill_(speed)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises((RuntimeError, ValueError), match=r"estbn_moving_speed must be in \[0, 1\]"):
            compiled(x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]) or (k.endswith("moving_speed") and v.isnan().all()), \
                f"{route} route, speed {speed}: {k} changed"
    bn.estbn_moving_speed.fill_(1.0)  # the ends of the range train
    compiled(x)
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", ["BCNorm", "labml BatchChannelNorm"])
def test_inductor_on_the_composed_route_refuses_a_count_out_of_range_and_changes_no_buffer(module, gen,
                                                                                           monkeypatch):
    """A cumulative average's count set by hand out of range, compiled by inductor on the composed route (as
    portable(), half precision and other devices take it): refused, and no buffer written. Inductor fused the
    graph's check with the buffers' writes and ran it after them, so the running statistics moved (the graphs
    that test_a_cumulative_average_keeps_its_count... runs keep their order)."""
    torch._dynamo.reset()
    monkeypatch.setattr(bt.functional, "COMPOSED", True)
    m = bt.BCNorm(8, 4).double() if module == "BCNorm" else bt.BatchChannelNorm(8, 4, estimate=True).double()
    bn = m.bn if module == "BCNorm" else m.batch_norm
    bn.momentum = None
    count = bn.num_batches_tracked if module == "BCNorm" else bn._count
    compiled = torch.compile(m, fullgraph=True)
    x = rand_input(gen, (4, 8, 5, 5), torch.float64)
    compiled(x)  # compiled, and trains, with a count in range
    for bad in (-5, 2 ** 63 - 1):
        count.fill_(bad)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(RuntimeError, match=r"num_batches_tracked must count batches \(0 to 2\^63 - 2\)"):
            compiled(x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), f"count {bad}: {k} changed"
        assert int(count) == bad
    count.fill_(3)
    mean = bn.running_mean.clone() if module == "BCNorm" else bn.exp_mean.clone()
    compiled(x)  # in range again: the average of four batches
    moved = bn.running_mean if module == "BCNorm" else bn.exp_mean
    torch.testing.assert_close(moved, 0.75 * mean + 0.25 * x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ["kernels", "composed"])
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph breaks"])
def test_compiled_refuses_running_statistics_that_require_grad(route, fullgraph, gen, monkeypatch):
    """As in eager mode (test_torch_edges), refused while tracing, before anything runs: with fullgraph=True
    dynamo's error carries the refusal's words; without, the refusal itself is raised."""
    if route == "composed":
        monkeypatch.setattr(bt.functional, "COMPOSED", True)
    for estimate in (False, True):
        for training in (True, False):
            torch._dynamo.reset()
            m = bt.BCNorm(8, 4, estimate=estimate).double().train(training)
            m.bn.running_var.requires_grad_(True)
            before = {k: v.clone() for k, v in m.state_dict().items()}
            with pytest.raises(RuntimeError, match="the running variance requires grad"):
                torch.compile(m, backend="aot_eager", fullgraph=fullgraph)(rand_input(gen, (4, 8, 5, 5),
                                                                                      torch.float64))
            for k, v in m.state_dict().items():
                assert torch.equal(v, before[k]), f"estimate={estimate}, training={training}: {k} changed"


def test_one_dynamic_graph_serves_every_batch_and_image_size(gen, kernel_calls):
    """compile(dynamic=True), as a last smaller batch or another image size leads to: the ops' fake kernels take
    symbolic sizes without guarding on them, so one graph serves batches of 2, 3 and 5 and images of 8x8 to 3x3
    (the rows layout's short planes included), each step equal to eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend
    eager, compiled_module = twin_models()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=True, backend=counter)
    first = None  # the frames compiled by the first call (the model's, and those its first call makes apart)
    for step, (batch, side) in enumerate([(2, 8), (3, 6), (5, 3), (3, 8)]):
        x = rand_input(gen, (batch, 3, side, side), torch.float64)
        target = torch.randint(0, 10, (batch,), generator=gen)
        train_step_alike(eager, compiled_module, compiled, x, target, step)
        first = counter.frame_count if first is None else first
    # before torch 2.15, once for each new image size (6x6 and 3x3; batch sizes still share a graph)
    most = 2 if RECOMPILES_FOR_A_NEW_SIZE else 0
    assert first >= 1 and counter.frame_count - first <= most, \
        f"recompiled for another size: {counter.frame_count - first} frames after the first call's {first}"
    assert len(kernel_calls.named("norm_forward")) == 2 * 5 * 4  # every normalization ran on the kernels


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin")  # the Python route's kernels
@pytest.mark.parametrize("forward", ["eager", "compiled"])
def test_compiled_autograd_gives_eager_gradients(forward, gen, kernel_calls):
    # compiled autograd traces the backward graph as the autograd engine would run it. With a compiled forward
    # the graph holds the ops' registered formulas and compiles whole. With an eager one it holds the eager
    # route's nodes: C++ Functions (CppNode<bcnswift::EagerNormalize>, ...) that hand data pointers to the
    # kernels, which no tracer can follow, so compiled autograd runs each in eager mode, a graph break apiece
    # (without the native library, the Python autograd.Functions, which dynamo gives up tracing alike)
    from torch._dynamo import compiled_autograd
    eager, traced_module = twin_models()
    run = torch.compile(traced_module, fullgraph=True) if forward == "compiled" else traced_module
    backward_graphs = []

    def compiler(graph):
        backward_graphs.append(graph)
        return torch.compile(graph, backend="eager", fullgraph=forward == "compiled")
    for step in range(2):
        x = rand_input(gen, (2, 3, 8, 8), torch.float64)
        target = torch.randint(0, 10, (2,), generator=gen)
        nn.functional.cross_entropy(eager(x), target).backward()
        kernel_calls.clear()
        with compiled_autograd._enable(compiler):
            nn.functional.cross_entropy(run(x), target).backward()
        # the normalizations' backward ran on the kernels inside the compiled backward: 5 fused layers
        assert len(kernel_calls.named("norm_backward")) == 5, f"step {step}"
        for (name, pe), pc in zip(eager.named_parameters(), traced_module.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-9, atol=1e-10, msg=f"step {step}: grad {name}")
        for (name, be), bc in zip(eager.named_buffers(), traced_module.buffers()):
            torch.testing.assert_close(bc, be, rtol=1e-10, atol=1e-10, msg=f"step {step}: buffer {name}")
    assert backward_graphs, "compiled autograd compiled no backward graph"


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_a_batched_backward_through_the_traced_ops_gives_each_gradient_as_computed_alone(training, gen):
    """autograd.grad(..., is_grads_batched=True) through a graph of the ops (aot_eager): vmap runs the backward ops
    once per gradient, each the one computed alone (to rounding: torch's batched matmuls in the model add in
    another order). (Inductor's compiled backward takes no batched gradients, for torch's own layers either.)"""
    eager, _ = twin_models()
    eager.train(training)
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    assert_batched_gradients_as_alone(compiled, rand_input(gen, (2, 3, 8, 8)).requires_grad_(), gen, rtol=1e-12,
                                      atol=1e-14)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_convolutions_hand_their_channels_last_memory_to_the_kernels(gen, monkeypatch, kernel_calls):
    """Inductor lays convolution outputs out channels-last on the CPU when it judges that faster (forced here).
    The ops take any layout (tagged flexible_layout), so the kernels read that memory in place: no conversion to
    C order before each normalization and back after it, which once cost the compiled "small" ResNet a fifth of
    its step."""
    monkeypatch.setattr(torch._inductor.config, "force_layout_optimization", True)
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)  # a cached graph would hide a change
    torch._dynamo.reset()
    torch.manual_seed(0)
    est = bt.BCNorm(16, 4, estimate=True)
    est.bn.estbn_moving_speed.fill_(0.1)
    eager = nn.Sequential(bt.Conv2d(3, 16, 3, padding=1, bias=False), bt.BCNorm(16, 4), nn.ReLU(),
                          bt.Conv2d(16, 16, 3, padding=1, bias=False), est).double()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    kernel_calls.clear()
    x = rand_input(gen, (2, 3, 8, 8), torch.float64).requires_grad_()  # C order in, as a user passes it
    dy = rand_input(gen, (2, 16, 8, 8), torch.float64)
    yc = compiled(x)
    yc.backward(dy)
    flags_seen = [(c.name, c.flags) for c in kernel_calls.calls if c.name.startswith("norm_")]
    assert {name for name, _ in flags_seen} == {"norm_moments", "norm_forward", "norm_backward"}
    in_c_order = [(name, flags) for name, flags in flags_seen if not flags & _ops._ext.BCN_CHANNELS_LAST]
    assert not in_c_order, f"kernels given C-order copies: {in_c_order}"
    xe = x.detach().clone().requires_grad_()
    ye = eager(xe)
    ye.backward(dy)
    torch.testing.assert_close(yc, ye, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-9, atol=1e-10)


def _assert_same_buffers(model, reference, what):
    for (name, b), r in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-10, msg=f"{what}: buffer {name}")


def _call_targets(graph):
    return {str(n.target) for n in graph.nodes if n.op == "call_function"}


def _bcnswift_ops(targets):
    return sorted(t for t in targets if t.startswith("bcnswift."))


def _assert_replays_eager(program, eager, gen):
    """The exported module's outputs and buffer updates on two new inputs are eager's (float64 [2, 3, 8, 8])."""
    module = program.module()
    for step in range(2):
        x = rand_input(gen, (2, 3, 8, 8), torch.float64)
        torch.testing.assert_close(module(x), eager(x), rtol=1e-10, atol=1e-10, msg=f"call {step}")
        _assert_same_buffers(module, eager, f"call {step}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_exported_program_records_the_ops_and_matches_eager(training, gen):
    """torch.export of a model using every module: the graph holds bcnswift's ops (the kernels run when it runs),
    and the exported module's outputs (and in training its buffers' updates) are eager's."""
    torch.manual_seed(0)
    eager = every_module_model().double().train(training)
    exported_from = copy.deepcopy(eager)
    x0 = rand_input(gen, (2, 3, 8, 8), torch.float64)
    program = torch.export.export(exported_from, (x0,))
    targets = _call_targets(program.graph)
    assert {"bcnswift.weight_standardization.default"} < targets
    assert ("bcnswift.update_running_.default" in targets) == training
    _assert_replays_eager(program, eager, gen)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_portable_export_holds_torch_operations_alone_and_matches_eager(training, gen):
    """Inside bt.portable(), torch.export records the composed route: no bcnswift op in the graph, and the
    exported module's outputs (and in training its buffers' updates) are eager's on the kernels, to float64
    rounding. The block ends with itself, an error's too: exports after it record the ops again."""
    torch.manual_seed(0)
    eager = every_module_model().double().train(training)
    x0 = rand_input(gen, (2, 3, 8, 8), torch.float64)
    with bt.portable():
        program = torch.export.export(copy.deepcopy(eager), (x0,))
    targets = _call_targets(program.graph)
    assert "aten.conv2d.default" in targets and not _bcnswift_ops(targets), targets
    _assert_replays_eager(program, eager, gen)
    with pytest.raises(KeyError), bt.portable():
        raise KeyError("inside the block")
    again = torch.export.export(copy.deepcopy(eager), (x0,))
    assert "bcnswift.weight_standardization.default" in _call_targets(again.graph)


def test_compiled_calls_inside_portable_trace_torch_operations(gen):
    """A compiled model called inside bt.portable() is traced again (dynamo guards on the block), into torch
    operations, and gives what it gave outside, where its graph holds bcnswift's ops. A nested block traces
    nothing again, and after the block the graph of the ops runs again."""
    torch._dynamo.reset()
    graphs, ran = [], []

    def backend(gm, example_inputs):
        targets = _call_targets(gm.graph)
        graphs.append(targets)

        def run(*args):
            ran.append(bool(_bcnswift_ops(targets)))
            return gm.forward(*args)
        return run
    model = nn.Sequential(bt.Conv2d(3, 8, 3, padding=1), bt.BCNorm(8, 4)).double().eval()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = rand_input(gen, (2, 3, 8, 8), torch.float64)
    outside = compiled(x)
    with bt.portable():
        inside = compiled(x)
        with bt.portable():
            nested = compiled(x)
    after = compiled(x)
    assert len(graphs) == 2, graphs
    assert {"bcnswift.weight_standardization.default", "bcnswift.normalize.default"} <= graphs[0], graphs[0]
    assert not _bcnswift_ops(graphs[1]), graphs[1]
    assert ran == [True, False, False, True], ran
    for y in (inside, nested, after):
        torch.testing.assert_close(y, outside, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tracer", ["jit.trace", "make_fx"])
def test_other_traces_inside_portable_record_torch_operations(tracer, training, gen):
    """portable() holds for the other tracers the modules know (jit.trace, and a dispatch mode's make_fx): their
    graphs hold no bcnswift op, and give the model's outputs and, in training, its buffers' updates. (make_fx of
    EstBN's update failed on the composed route: the range check of its speed read the buffer's value.)"""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    model = every_module_model().double().train(training)
    traced_from = copy.deepcopy(model)
    x0 = rand_input(gen, (2, 3, 8, 8), torch.float64)
    with bt.portable():
        if tracer == "jit.trace":
            graph = torch.jit.trace(traced_from, x0, check_trace=False)
            ops = {n.kind().replace("::", ".") for n in graph.inlined_graph.nodes()}
        else:
            graph = make_fx(traced_from)(x0)
            ops = _call_targets(graph.graph)
    assert any("conv" in o for o in ops) and not _bcnswift_ops(ops), ops
    model(x0)  # the trace ran one forward, which updated traced_from's buffers in training
    x = rand_input(gen, (2, 3, 8, 8), torch.float64)
    torch.testing.assert_close(graph(x), model(x), rtol=1e-10, atol=1e-10)
    _assert_same_buffers(traced_from, model, tracer)


@pytest.mark.parametrize("portable", [False, True], ids=["ops", "portable"])
def test_aot_inductor_compiles_an_exported_program(portable, tmp_path, gen):
    """AOTInductor (torch._inductor.aoti_compile_and_package) compiles a torch.export program of the modules into
    a package: with bcnswift's ops (which the package calls through the dispatcher, planned with their fake
    kernels' shapes and strides), or, exported inside portable(), without them. Both give eager's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(bt.Conv2d(3, 8, 3, padding=1), bt.BCNorm(8, 4, estimate=True), nn.ReLU(),
                          bt.BatchChannelNorm(8, 2), bt.ChannelNorm(8, 4)).eval()
    x = rand_input(gen, (2, 3, 8, 8), torch.float32)
    with bt.portable() if portable else contextlib.nullcontext():
        program = torch.export.export(model, (x,))
    assert bool(_bcnswift_ops(_call_targets(program.graph))) != portable
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    x = rand_input(gen, (2, 3, 8, 8), torch.float32)  # another input of the program's (static) shape
    torch.testing.assert_close(torch._inductor.aoti_load_package(package)(x), model(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("way", ["portable", "decompose"])
def test_a_portable_program_runs_where_bcnswift_cannot_be_imported(way, tmp_path, gen):
    """What portable() and decompose are for: the saved program loads and runs in a process where importing
    bcnswift fails, and gives the model's outputs."""
    torch.manual_seed(0)
    model = every_module_model().eval()
    x = rand_input(gen, (2, 3, 8, 8), torch.float32)
    if way == "portable":
        with bt.portable():
            program = torch.export.export(model, (x,))
    else:
        program = bt.decompose(torch.export.export(model, (x,)))
    torch.export.save(program, tmp_path / "model.pt2")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys\n"
            "sys.modules['bcnswift'] = None  # import bcnswift now raises ImportError\n"
            "import torch\n"
            "y = torch.export.load(sys.argv[1]).module()(torch.load(sys.argv[2]))\n"
            "torch.save(y, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, timeout=600)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("table", ["bcnswift's", "core ATen too"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_decompose_rewrites_an_exported_program_into_torch_operations(training, table, gen):
    """bt.decompose: a program exported with bcnswift's ops becomes one of torch operations (the update of the
    running buffers too, which functionalization wraps before a decomposition table is consulted), whose
    outputs and buffer updates are eager's on the kernels to float64 rounding. The given program keeps its ops,
    and the kernel registered for the update's decomposition is gone after the call."""
    torch.manual_seed(0)
    eager = every_module_model().double().train(training)
    x0 = rand_input(gen, (2, 3, 8, 8), torch.float64)
    program = torch.export.export(copy.deepcopy(eager), (x0,))
    further = torch.export.default_decompositions() if table == "core ATen too" else None
    decomposed = bt.decompose(program, further)
    targets = _call_targets(decomposed.graph)
    wrapped = {str(n.args[0]) for n in decomposed.graph.nodes if n.op == "call_function" and n.args
               and isinstance(n.args[0], torch._ops.OpOverload)}
    assert not _bcnswift_ops(targets | wrapped), targets | wrapped
    assert ("aten.convolution.default" if further else "aten.conv2d.default") in targets, targets
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bcnswift::update_running_",
                                                              "CompositeImplicitAutograd")
    assert "bcnswift.weight_standardization.default" in _call_targets(program.graph)
    assert ("bcnswift.update_running_.default" in _call_targets(program.graph)) == training
    _assert_replays_eager(decomposed, eager, gen)
    # the given program runs the kernels still, on the parameters and buffers it shares with the decomposed one
    # (as run_decompositions shares them), which have followed eager's
    _assert_replays_eager(program, eager, gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_decompose_keeps_a_dynamic_batch_size(layout, gen):
    """A program exported with a dynamic batch size, decomposed, trains on other batch sizes as eager does: the
    counts behind its running variances follow the batch. Its views are made for the example's memory format,
    as run_decompositions makes them, so the example has the inputs' layout."""
    torch.manual_seed(0)
    eager = every_module_model().double()
    x0 = rand_input(gen, (4, 3, 8, 8), torch.float64, layout)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = bt.decompose(torch.export.export(copy.deepcopy(eager), (x0,), dynamic_shapes=({0: batch},)))
    module = program.module()
    for size in (2, 7, 3):
        x = rand_input(gen, (size, 3, 8, 8), torch.float64, layout)
        torch.testing.assert_close(module(x), eager(x), rtol=1e-10, atol=1e-10, msg=f"batch {size}")
        _assert_same_buffers(module, eager, f"batch {size}")


def _moving(est_bn):
    est_bn.estbn_moving_speed.fill_(0.3)  # (0 at first, as in the authors' code: the estimates would not move)
    return est_bn


# every module alone and the WS layers on other ranks, with the options that change the update: (model, input)
_DECOMPOSED = {
    "EstBN, variance about the running mean": (lambda: _moving(bt.EstBN(8)), (3, 8, 5, 5)),
    "labml BatchNorm, momentum None": (lambda: bt.BatchNorm(8, momentum=None), (3, 8, 5, 5)),
    "labml BatchNorm, no running stats": (lambda: bt.BatchNorm(8, track_running_stats=False), (3, 8, 5, 5)),
    "labml EstimatedBatchNorm, momentum None": (lambda: bt.EstimatedBatchNorm(8, momentum=None), (3, 8, 5, 5)),
    "labml ChannelNorm, no affine": (lambda: bt.ChannelNorm(8, 4, affine=False), (3, 8, 5, 5)),
    "[B, C] rows": (lambda: nn.Sequential(bt.Linear(5, 8), bt.BCNorm(8, 4, estimate=True)), (6, 5)),
    "Conv1d": (lambda: nn.Sequential(bt.Conv1d(3, 8, 3), bt.BCNorm(8, 2)), (3, 3, 9)),
    "Conv3d": (lambda: nn.Sequential(bt.Conv3d(3, 8, 3), bt.BatchChannelNorm(8, 2)), (2, 3, 5, 5, 5)),
    "ConvTranspose2d, labml": (lambda: nn.Sequential(bt.ConvTranspose2d(3, 8, 3, convention="labml"),
                                                     bt.BatchChannelNorm(8, 2, estimate=False)), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_DECOMPOSED))
def test_decompose_gives_each_modules_outputs_and_updates(case, training, gen):
    make, shape = _DECOMPOSED[case]
    torch.manual_seed(0)
    eager = make().double().train(training)
    x0 = rand_input(gen, shape, torch.float64)
    module = bt.decompose(torch.export.export(copy.deepcopy(eager), (x0,))).module()
    for step in range(3):
        x = rand_input(gen, shape, torch.float64)
        torch.testing.assert_close(module(x), eager(x), rtol=1e-10, atol=1e-10, msg=f"call {step}")
        _assert_same_buffers(module, eager, f"call {step}")


def test_decompose_removes_the_update_kernel_after_a_pass_that_failed(gen):
    """The update's CompositeImplicitAutograd kernel lives for the call alone, one that raises too: the ops'
    programs then run the kernels' update again."""
    def failing(*args, **kwargs):
        raise KeyError("a further decomposition that fails")
    model = nn.Sequential(bt.Conv2d(3, 8, 3, padding=1), bt.BCNorm(8, 4)).double()
    x = rand_input(gen, (2, 3, 8, 8), torch.float64)
    program = torch.export.export(copy.deepcopy(model), (x,))
    with pytest.raises(Exception, match="a further decomposition that fails"):
        bt.decompose(program, {torch.ops.aten.conv2d.default: failing})
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bcnswift::update_running_",
                                                              "CompositeImplicitAutograd")
    _assert_replays_eager(bt.decompose(program), model, gen)  # and a later call registers it again


def _cumulative_model():
    model = nn.Sequential(bt.Conv2d(3, 8, 3, padding=1), bt.BCNorm(8, 4), nn.ReLU(), bt.BatchChannelNorm(8, 2))
    model[1].bn.momentum = None  # a cumulative average: the factor is 1 / num_batches_tracked
    return model.double()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace")
@pytest.mark.parametrize("way", ["decompose", "portable export", "portable jit.trace"])
def test_a_cumulative_average_keeps_its_count_in_a_graph_of_torch_operations(way, gen):
    """With momentum=None the update's factor is 1 / num_batches_tracked. Graphs of torch operations read the
    count each call, so three training calls in a row update as eager does (jit.trace had recorded the count
    of the traced call as a constant, and torch.export inside portable() could not read it)."""
    torch.manual_seed(0)
    eager = _cumulative_model()
    x0 = rand_input(gen, (2, 3, 8, 8), torch.float64)
    if way == "decompose":
        graph = bt.decompose(torch.export.export(copy.deepcopy(eager), (x0,))).module()
    else:
        with bt.portable():
            traced_from = copy.deepcopy(eager)
            if way == "portable export":
                graph = torch.export.export(traced_from, (x0,)).module()
            else:
                graph = torch.jit.trace(traced_from, x0, check_trace=False)
                eager(x0)  # the trace ran one forward, which updated traced_from's buffers
    for step in range(3):
        x = rand_input(gen, (2, 3, 8, 8), torch.float64)
        torch.testing.assert_close(graph(x), eager(x), rtol=1e-10, atol=1e-10, msg=f"call {step}")
        _assert_same_buffers(graph, eager, f"call {step}")
    assert int(eager[1].bn.num_batches_tracked) == (4 if way == "portable jit.trace" else 3)
    if way != "portable jit.trace":  # (jit.trace drops the check: an op without outputs)
        # the graph checks the count it cannot read while tracing, before it writes a buffer
        dict(graph.named_buffers())["1.bn.num_batches_tracked"].fill_(-1)
        before = [b.clone() for b in graph.buffers()]
        with pytest.raises(RuntimeError, match="num_batches_tracked must count batches"):
            graph(rand_input(gen, (2, 3, 8, 8), torch.float64))
        for b, was in zip(graph.buffers(), before):
            assert torch.equal(b, was)
        assert torch.is_grad_enabled(), "the error left grad mode off"


class _OpCall(nn.Module):
    """Calls one bcnswift op directly, as a program made of hand-written op calls would."""

    def __init__(self, call):
        super().__init__()
        self.call = call

    def forward(self, x):
        return self.call(x)


_ops_ns = torch.ops.bcnswift
_BN_CN = _ops._ext.BCN_BATCH_NORM | _ops._ext.BCN_CHANNEL_NORM
_REFUSED = {
    "a context read elsewhere": (lambda x: _ops_ns.moments(x, _BN_CN, 4)[0].sum() + x.sum(), "context of"),
    "nan raise": (lambda x: _ops_ns.normalize(x, None, None, None, None, None, None, None, None,
                                              _ops._ext.BCN_CHANNEL_NORM | _ops._ext.BCN_NAN_RAISE, 4, 1e-5,
                                              1e-5)[0], "BCN_NAN_RAISE"),
    "handed moments": (lambda x: _ops_ns.normalize(x, None, _ops_ns.moments(x, _BN_CN, 4)[1], None, None, None, None,
                                                   None, None, _BN_CN | _ops._ext.BCN_TRAINING, 4, 1e-5, 1e-5)[0],
                       "handed the batch's moments"),
    "a backward": (lambda x: _ops_ns.weight_standardization_backward(x.reshape(8, -1), x.reshape(8, -1), 1e-5, 1),
                   "a backward"),
}


@pytest.mark.parametrize("case", list(_REFUSED))
def test_decompose_refuses_what_has_no_composed_form(case, gen):
    call, words = _REFUSED[case]
    x = rand_input(gen, (2, 8, 4, 4), torch.float64)
    program = torch.export.export(_OpCall(call), (x,))
    with pytest.raises(ValueError, match=words):
        bt.decompose(program)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bcnswift::update_running_",
                                                              "CompositeImplicitAutograd")
    with pytest.raises(TypeError, match="ExportedProgram"):
        bt.decompose(_OpCall(call))


@pytest.mark.filterwarnings("ignore:`torch.jit.script")
@pytest.mark.parametrize("make", [lambda: bt.BCNorm(8, 4), lambda: bt.BatchChannelNorm(8, 4),
                                  lambda: nn.Sequential(bt.Conv2d(3, 8, 3), nn.ReLU()), every_module_model],
                         ids=["BCNorm", "labml", "WS conv inside Sequential", "every module"])
def test_torch_jit_script_refuses_in_words_that_name_the_ways_that_work(make):
    with pytest.raises(RuntimeError, match=r"cannot be compiled by TorchScript \(torch.jit.script\).*"
                                           r"torch.compile, torch.export and torch.jit.trace"):
        torch.jit.script(make())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_records_the_ops_and_matches_eager(training, eager_route, gen):
    """torch.jit.trace (deprecated by torch, still used) sees only dispatcher calls: the modules take the custom
    ops while it traces (the Python eager route's numpy calls once failed inside torch with "unordered_map::at";
    the native eager route's op is a dispatcher call too, so only the Python route shows whether tracing is seen).
    The traced module then gives eager's outputs, input and parameter gradients and buffer updates, also on a batch
    of another size."""
    torch.manual_seed(0)
    eager = every_module_model().double().train(training)
    traced_from = copy.deepcopy(eager)
    x0 = rand_input(gen, (2, 3, 8, 8), torch.float64)
    traced = torch.jit.trace(traced_from, x0, check_trace=False)
    if training:
        eager(x0)  # the trace ran one forward, which updated the buffers
    for step, batch in enumerate((2, 3)):
        x = rand_input(gen, (batch, 3, 8, 8), torch.float64)
        xe, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yt = eager(xe), traced(xt)
        torch.testing.assert_close(yt, ye, rtol=1e-10, atol=1e-10, msg=f"call {step}: output")
        g = torch.randn(ye.shape, generator=gen, dtype=ye.dtype)
        ye.backward(g), yt.backward(g)
        torch.testing.assert_close(xt.grad, xe.grad, rtol=1e-9, atol=1e-10, msg=f"call {step}: input gradient")
        for (name, pe), pt in zip(eager.named_parameters(), traced_from.parameters()):
            torch.testing.assert_close(pt.grad, pe.grad, rtol=1e-9, atol=1e-10, msg=f"call {step}: grad {name}")
        _assert_same_buffers(traced_from, eager, f"call {step}")


@pytest.mark.parametrize("make", [lambda: bt.Conv2d(4, 6, 3), lambda: bt.Linear(5, 3), lambda: bt.ChannelNorm(8, 2),
                                  lambda: bt.BCNorm(8, 4)], ids=["Conv2d", "Linear", "ChannelNorm", "BCNorm"])
def test_fx_symbolic_trace_of_a_module_alone_says_how_to_trace_it(make):
    """A module FX keeps as a leaf cannot be the root of its own trace (its graph would call itself): a TraceError
    that says to wrap it, not an AttributeError about a submodule named ''; wrapped, it traces."""
    module = make().double()
    with pytest.raises(torch.fx.proxy.TraceError, match=r"nn\.Sequential\(" + type(module).__name__):
        torch.fx.symbolic_trace(module)
    graph_module = torch.fx.symbolic_trace(nn.Sequential(module))
    assert [n.op for n in graph_module.graph.nodes] == ["placeholder", "call_module", "output"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_keeps_the_modules_as_leaves(training, gen):
    """torch.fx's symbolic tracing keeps torch.nn's modules as leaves and traces into others, whose shape checks
    a Proxy cannot answer ("symbolically traced variables cannot be used as inputs to control flow", as every
    FX-based tool met before). bcnswift's modules record themselves as one call_module node each, as torch.nn's
    do, and the GraphModule gives eager's outputs, gradients and buffer updates."""
    torch.manual_seed(0)
    eager = nn.Sequential(every_module_model(), nn.Unflatten(1, (10, 1, 1)),
                          bt.ConvTranspose2d(10, 4, 2, stride=2)).double().train(training)
    traced_from = copy.deepcopy(eager)
    graph_module = torch.fx.symbolic_trace(traced_from)
    def ours(m):
        return type(m).__module__.startswith("bcnswift")
    # every module of ours that the model calls (not those inside another of ours, which fuses their work)
    called = {type(m) for name, m in eager.named_modules() if ours(m) and not any(
        ours(eager.get_submodule(".".join(name.split(".")[:i]))) for i in range(1, name.count(".") + 1))}
    assert bt.BCNorm in called and bt.ConvTranspose2d in called
    recorded = {type(graph_module.get_submodule(n.target)) for n in graph_module.graph.nodes if n.op == "call_module"}
    assert called <= recorded and not [n for n in graph_module.graph.nodes if n.op == "call_function"
                                     and "bcnswift" in str(n.target)]
    for step in range(2):
        x = rand_input(gen, (2, 3, 8, 8), torch.float64)
        xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yg = eager(xe), graph_module(xg)
        torch.testing.assert_close(yg, ye, rtol=0, atol=0, msg=f"call {step}: output")
        g = torch.randn(ye.shape, generator=gen, dtype=ye.dtype)
        ye.backward(g), yg.backward(g)
        torch.testing.assert_close(xg.grad, xe.grad, rtol=0, atol=0, msg=f"call {step}: input gradient")
        for (name, pe), pg in zip(eager.named_parameters(), graph_module.parameters()):
            torch.testing.assert_close(pg.grad, pe.grad, rtol=0, atol=0, msg=f"call {step}: grad {name}")
        _assert_same_buffers(graph_module, eager, f"call {step}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_make_fx_records_the_ops_and_its_graph_replays_the_model(training, gen):
    """make_fx sees the modules op by op, under a torch dispatch mode: they take the custom ops there, as they do
    while dynamo traces. (The eager routes work below the dispatcher: make_fx recorded a stored tensor in their
    place, silently, and its graph then returned that tensor whatever its input.) The graph holds the ops, and
    replayed on a new input gives the model's output and buffer updates."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    model = every_module_model().double().train(training)
    replayed = copy.deepcopy(model)
    x0 = rand_input(gen, (2, 3, 8, 8), torch.float64)
    graph = make_fx(replayed)(x0)
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {o for o in ops if o.startswith("bcnswift.")} >= {"bcnswift.weight_standardization.default"}, ops
    assert any(o.startswith("bcnswift.normalize") for o in ops), ops
    for name, buffer in replayed.named_buffers():  # the trace ran one forward: run it again from the start
        buffer.copy_(dict(model.named_buffers())[name])
    x = rand_input(gen, (2, 3, 8, 8), torch.float64)
    torch.testing.assert_close(graph(x), model(x), rtol=1e-12, atol=1e-12)
    _assert_same_buffers(replayed, model, "replayed graph")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fake_tensor_mode_gives_the_real_shapes_and_strides(layout, gen):
    """Under FakeTensorMode (shape and memory planning) every module runs on its fake kernels: outputs of the
    real shape and strides, channels_last kept. (It failed inside torch: the eager route read fake memory.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = every_module_model()[:-3].to(memory_format=fmt)
    x = rand_input(gen, (4, 3, 8, 8), torch.float32).contiguous(memory_format=fmt)
    real = model(x)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = model(mode.from_tensor(x))
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype
