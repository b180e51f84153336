"""bcnswift.torch's custom ops: torch.library.opcheck on every op in every configuration the modules use,
gradcheck in float64, no copies on the way to the kernels, errors, and the ops' refusal of a second derivative."""
import copy
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require, seed_of

torch = require("torch")
import bcnswift  # noqa: E402
import bcnswift.torch as bt  # noqa: E402
from bcnswift import _ext  # noqa: E402
from bcnswift.torch import _ops, _requirements, _threads  # noqa: E402
from torch_kernel_calls import calling_thread_team  # noqa: E402

BN, CN, TR = _ext.BCN_BATCH_NORM, _ext.BCN_CHANNEL_NORM, _ext.BCN_TRAINING
TORCH_BN = BN | _ext.BCN_UNBIASED_RUNNING_VAR
AUTHORS_EST = BN | _ext.BCN_ESTIMATED | _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN
DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]
#: the eager route's forms a test can take: the Python kernels and autograd Functions (where the native library is
#: not built, or BCNSWIFT_TORCH_NATIVE=0), and the native ones where built (test_torch_native.py requires them
#: under CI); a test takes each through the `eager_route` fixture
EAGER_ROUTES = ["python"] + (["native"] if _ops.NATIVE else [])


@pytest.fixture(params=EAGER_ROUTES)
def eager_route(request, monkeypatch):
    """The test runs on each of EAGER_ROUTES in turn: the library's C++ autograd Functions (native_ops.cpp), or the
    Python ones."""
    monkeypatch.setattr(_ops, "NATIVE", request.param == "native")
    return request.param


@pytest.fixture
def gen(request):
    seed = seed_of(request.node.nodeid)
    print(f"torch seed {seed} (torch.Generator().manual_seed({seed}), from {request.node.nodeid!r})")
    return torch.Generator().manual_seed(seed)


def rand_input(gen, shape, dtype=torch.float64, layout="contiguous"):
    """Random [B, C, *] input with per-channel means around 1.5 and scales 0.5..2.5."""
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    mean = (torch.randn(C, generator=gen, dtype=torch.float64) + 1.5).reshape(view)
    scale = (torch.rand(C, generator=gen, dtype=torch.float64) * 2 + 0.5).reshape(view)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + mean).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # dense, but neither C order nor channels-last: the kernels get a copy
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def parameters(gen, C, G, dtype):
    def u(n, lo, hi):
        return (torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    return {"bw": u(C, 0.5, 1.5), "bb": u(C, -0.5, 0.5), "rm": u(C, -1, 1), "rv": u(C, 0.5, 2),
            "cw": u(G, 0.5, 1.5), "cb": u(G, -0.5, 0.5)}


def test_import_bcnswift_does_not_import_torch():
    code = "import sys, bcnswift; bcnswift.BatchChannelNorm(4, 2); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("version", ["2.8.0+cpu", "2.4.1", "1.13.1"])
def test_an_older_torch_is_refused_at_import_with_the_version_it_needs(version, tmp_path):
    """A torch older than the minimum (a stand-in package that has only a version) stops `import bcnswift.torch`
    with an ImportError that names the torch needed and the one found, before any op is registered (torch 2.4's
    import failed with an AttributeError on a Tag it lacks); bcnswift alone still imports."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    code = ("import bcnswift; print('numpy side imported')\n"
            "try:\n    import bcnswift.torch\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(bcnswift.__path__[0])])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "numpy side imported", out.stdout
    assert lines[1].startswith(f"ImportError: bcnswift.torch needs torch >= 2.9, but found torch {version} ("), \
        out.stdout
    assert "pip install 'torch>=2.9'" in lines[1]


@pytest.mark.parametrize("version,release", [("2.8.0+cpu", (2, 8)), ("2.9.1+cu128", (2, 9)),
                                             ("2.10.0a0+git1234", (2, 10)), ("2.15.0", (2, 15)), ("3.0", (3, 0))])
def test_torch_versions_are_read_by_their_release(version, release):
    """(major, minor), compared as numbers (2.10 is newer than 2.9, which a string comparison gets wrong), local
    and pre-release tails ignored: a nightly of 2.10 has 2.10's API. A version without them is refused."""
    assert _requirements.release(version) == release
    with pytest.raises(ImportError, match="bcnswift.torch cannot read torch's version 'nightly'"):
        _requirements.release("nightly")


def test_the_install_extras_ask_for_the_torch_the_import_requires():
    """pyproject.toml's torch and test extras (its only requirements of torch) name the minimum that `import
    bcnswift.torch` checks, and the torch running these tests meets it. (Read as text: tomllib is Python 3.11's.)"""
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    extras = dict(re.findall(r'^(torch|test) = \[(.*?)\]', text, flags=re.M | re.S))
    minimum = "torch>=" + ".".join(map(str, _requirements.MINIMUM_TORCH))
    assert sorted(extras) == ["test", "torch"], extras
    for extra, listed in extras.items():
        named = re.findall(r'"(torch\b[^"]*)"', listed)
        assert named == [minimum], f"[{extra}] asks for {named}, the import requires {minimum}"
    assert re.findall(r'"torch\b[^"]*"', text) == [f'"{minimum}"'] * 2, "torch required outside the two extras"
    assert _requirements.release(torch.__version__) >= _requirements.MINIMUM_TORCH


@pytest.mark.parametrize("B,C,G", [(1, 1, 0), (2, 8, 4), (7, 96, 32), (3, 5, 0), (1000, 1, 1)])
def test_context_length_formula_is_the_librarys(B, C, G):
    assert _ops.context_length(B, C, G) == _ext.context_length(B, C, G)


# ---- opcheck ------------------------------------------------------------------------------------------------

STAGES = {"BCN batch statistics": TORCH_BN | CN, "BCN estimated": AUTHORS_EST | CN,
          "BN batch statistics": TORCH_BN, "BN estimated": AUTHORS_EST, "CN": CN}


def op_calls(stage, dtype, layout, training, gen):
    """The ops and arguments batch_channel_norm runs for this configuration (parameters requiring grad)."""
    flags = STAGES[stage]
    p = parameters(gen, 8, 4, dtype)
    x = rand_input(gen, (3, 8, 4, 5), dtype, layout).requires_grad_()
    bw, bb, cw, cb = (p[k].requires_grad_() for k in ("bw", "bb", "cw", "cb"))
    if not flags & BN:
        return [(_ops.normalize, (x, None, None, None, None, None, None, cw, cb, flags, 4, 1e-5, 1e-5))]
    cn = (cw, cb) if flags & CN else (None, None)
    if not training:
        return [(_ops.normalize, (x, None, None, bw, bb, p["rm"], p["rv"], *cn, flags, 4, 1e-5, 1e-3))]
    ctx, m = _ops.moments(x.detach(), flags, 4)
    speed = torch.full((1,), 0.25, dtype=dtype) if flags & _ext.BCN_ESTIMATED else None
    update = (_ops.update_running_, (p["rm"], p["rv"], torch.tensor(3), m, flags, 0.1, speed))
    if flags & _ext.BCN_ESTIMATED:
        return [(_ops.moments, (x.detach(), flags, 4)), update,
                (_ops.normalize, (x, ctx, None, bw, bb, p["rm"], p["rv"], *cn, flags, 4, 1e-5, 1e-3))]
    # batch statistics: the normalization measures the batch, then the update takes its moments; normalize
    # continuing a moments context is checked too (the phases torch.export or a user may call)
    return [(_ops.normalize_batch, (x, bw, bb, *cn, flags | TR, 4, 1e-5, 1e-3)), update,
            (_ops.normalize, (x, ctx, m, bw, bb, None, None, *cn, flags | TR, 4, 1e-5, 1e-3))]


def normalizing_calls(calls):
    """The calls among `calls` that normalize, each with its flags: what a backward continues."""
    flags_at = {_ops.normalize: 9, _ops.normalize_batch: 5}
    return [(op, args, args[flags_at[op]]) for op, args in calls if op in flags_at]


# "permuted": the fake kernels must promise the strides the real ones give when they copy (inductor may hand the
# ops any layout: they are tagged flexible_layout)
CONFIGS = [(s, d, l, t) for s, d, l, t in itertools.product(STAGES, DTYPES, LAYOUTS + ["permuted"], [True, False])
           if not (s == "CN" and not t)]


@pytest.mark.parametrize("stage,dtype,layout,training", CONFIGS)
def test_opcheck_normalization_ops(stage, dtype, layout, training, gen):
    for op, args in op_calls(stage, dtype, layout, training, gen):
        torch.library.opcheck(op, args)
    # the backward op, on the context of each normalization above
    for op, args, flags in normalizing_calls(op_calls(stage, dtype, layout, training, gen)):
        ctx = op(*args)[1]
        x = args[0].detach()
        dy = rand_input(gen, tuple(x.shape), dtype, layout)
        torch.library.opcheck(_ops.normalize_backward, (dy, x, ctx, flags, 4, True, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["permuted"])
@pytest.mark.parametrize("flags", [_ext.BCN_WS_UNBIASED, _ext.BCN_WS_UNBIASED | _ext.BCN_WS_EPS_IN_SQRT])
def test_opcheck_weight_standardization_ops(dtype, layout, flags, gen):
    w = rand_input(gen, (6, 3, 3, 3), dtype, layout).requires_grad_()
    torch.library.opcheck(_ops.weight_standardization, (w, 1e-5, flags))
    g = rand_input(gen, (6, 3, 3, 3), dtype, layout)
    torch.library.opcheck(_ops.weight_standardization_backward, (g, w.detach(), 1e-5, flags))


# ---- gradcheck ----------------------------------------------------------------------------------------------

def _modules():
    """(name, module factory) for gradcheck: each stage alone and fused, both estimate modes, both documents."""
    def est_bn():
        m = bt.EstBN(6)
        return m  # moving speed 0: the documents treat the updated estimates as constants

    return [("BCNorm", lambda: bt.BCNorm(6, 3)), ("BCNorm estimate", lambda: bt.BCNorm(6, 3, estimate=True)),
            ("EstBN", est_bn), ("labml BatchChannelNorm", lambda: bt.BatchChannelNorm(6, 3, momentum=0.0)),
            ("labml BatchChannelNorm, batch", lambda: bt.BatchChannelNorm(6, 3, estimate=False)),
            ("labml BatchNorm", lambda: bt.BatchNorm(6)), ("labml ChannelNorm", lambda: bt.ChannelNorm(6, 2)),
            ("labml EstimatedBatchNorm", lambda: bt.EstimatedBatchNorm(6, momentum=0.0))]


@pytest.mark.parametrize("name,make", _modules(), ids=[n for n, _ in _modules()])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(name, make, training, layout, gen):
    m = make().double().train(training)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5)
        for b in m.buffers():
            if b.is_floating_point() and b.numel() > 1:
                b.copy_(torch.rand(b.shape, generator=gen, dtype=torch.float64) + 0.5)
    x = rand_input(gen, (2, 6, 3, 4), torch.float64, layout).requires_grad_()
    params = [p for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("convention", ["authors", "labml"])
def test_gradcheck_weight_standardization(convention, gen):
    conv = bt.Conv2d(3, 4, 3, convention=convention).double()
    x = rand_input(gen, (2, 3, 5, 5))
    w = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(conv, {"weight": w}, (x,)), (w,))


@pytest.mark.parametrize("route", ["eager", "ops"])
def test_second_derivative_is_a_clear_error(route, gen, monkeypatch):
    """Both routes: the eager autograd.Functions, and the registered ops torch.compile traces (their backward
    ops carry the error), here run as if traced."""
    if route == "ops":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

        def eager(*args):
            raise AssertionError("the eager route ran")

        monkeypatch.setattr(_ops, "eager_forward", eager)
        monkeypatch.setattr(_ops._EagerWeightStandardization, "apply", eager)
    m = bt.BCNorm(6, 3).double()
    x = rand_input(gen, (2, 6, 3, 3)).requires_grad_()
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.sum().backward()
    w = bt.Conv2d(3, 4, 3).double()
    (gw,) = torch.autograd.grad(w(rand_input(gen, (2, 3, 5, 5))).sum(), w.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        gw.square().sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_ops_called_directly_differentiate_as_the_eager_route(dtype, layout, gen):
    """The ops' autograd (native_ops.cpp's for CPU tensors where it is built, else the Python formulas), called
    directly with tensors that require grad: the eager route's bits for outputs and every gradient, each in its
    parameter's shape; outputs that need none under no_grad; the moments not differentiable; update_running_
    bumping each buffer's version once."""
    C, G = 8, 4
    x0 = rand_input(gen, (3, C, 4, 5), dtype, layout)
    dy = rand_input(gen, (3, C, 4, 5), dtype, layout)
    p = parameters(gen, C, G, dtype)
    flags = TORCH_BN | CN

    def leaves():
        return [t.clone().requires_grad_() for t in (x0, p["bw"], p["bb"], p["cw"].reshape(1, G, 1),
                                                      p["cb"].reshape(1, G, 1))]
    runs = []
    for way in ("normalize_batch", "normalize", "eager"):
        x, bw, bb, cw, cb = leaves()
        if way == "normalize_batch":
            y = _ops.normalize_batch(x, bw, bb, cw, cb, flags | TR, G, 1e-5, 1e-3)[0]
        elif way == "normalize":
            y = _ops.normalize(x, None, None, bw, bb, None, None, cw, cb, flags | TR, G, 1e-5, 1e-3)[0]
        else:
            y = _ops.eager_forward(x, bw, bb, None, None, None, None, cw, cb, flags | TR, G, 1e-5, 1e-3, 0.1, False)
        y.backward(dy)
        runs.append((way, [y.detach(), *(t.grad for t in (x, bw, bb, cw, cb))]))
    for way, results in runs[:-1]:
        for name, a, b in zip(("y", "x", "bn_weight", "bn_bias", "cn_weight", "cn_bias"), results, runs[-1][1]):
            assert a.shape == b.shape and torch.equal(a, b), f"{way}: {name}"
    with torch.no_grad():
        x, bw, bb, cw, cb = leaves()
        assert not any(t.requires_grad for t in _ops.normalize_batch(x, bw, bb, cw, cb, flags | TR, G, 1e-5, 1e-3))
    w = (torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64) * 0.2 + 0.05).to(dtype)
    ws = [w.clone().requires_grad_() for _ in range(2)]
    _ops.weight_standardization(ws[0], 1e-5, _ext.BCN_WS_UNBIASED).backward(torch.ones_like(w))
    _ops.eager_weight_standardization(ws[1], 1e-5, _ext.BCN_WS_UNBIASED).backward(torch.ones_like(w))
    assert torch.equal(ws[0].grad, ws[1].grad)
    context, moments = _ops.moments(x0.clone().requires_grad_(), flags, G)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        moments.sum().backward()
    # an argument that gets no gradient, requiring one, still puts the output in the graph (torch.library's rule)
    rm = p["rm"].clone().requires_grad_()
    y = _ops.normalize(x0, None, None, None, None, rm, p["rv"], None, None, flags, G, 1e-5, 1e-3)[0]
    assert y.requires_grad
    y.sum().backward()
    assert rm.grad is None
    rm, rv, nbt = p["rm"].clone(), p["rv"].clone(), torch.tensor(2)
    before = [t._version for t in (rm, rv, nbt)]
    _ops.update_running_(rm, rv, nbt, _ops.moments(x0, flags, G)[1], flags, 0.1, None)
    assert [t._version for t in (rm, rv, nbt)] == [v + 1 for v in before]
    assert int(nbt) == 3


def test_out_of_memory_in_the_python_kernels_is_torchs_out_of_memory_error(gen, monkeypatch):
    """bcnswift._ext raises MemoryError when a kernel's scratch cannot be allocated (BCN_ERR_OUT_OF_MEMORY); the
    ops' Python kernels and the Python eager route raise it as torch.OutOfMemoryError, with the kernels' words,
    as the native kernels do (and as torch's own operations do)."""
    words = "bcnswift: out of memory: the call's scratch (12345 bytes) could not be allocated"

    def refuse(*args):
        raise MemoryError(words)
    monkeypatch.setattr(_ops._ext, "norm_forward", refuse)
    monkeypatch.setattr(_ops, "NATIVE", False)
    x = rand_input(gen, (3, 8, 4, 5), torch.float32)
    with pytest.raises(torch.OutOfMemoryError, match=f"^{re.escape(words)}$"):
        _ops._normalize(x, None, None, None, None, None, None, None, None, TORCH_BN | CN | TR, 4, 1e-5, 1e-5)
    with pytest.raises(torch.OutOfMemoryError, match=f"^{re.escape(words)}$"):
        bt.BCNorm(8, 4)(x)


# ---- no copies ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("estimate", [False, True])
def test_input_and_output_gradient_reach_the_kernels_without_a_copy(dtype, layout, estimate, gen, kernel_calls):
    m = bt.BCNorm(8, 4, estimate=estimate).to(dtype)
    x = rand_input(gen, (2, 8, 5, 6), dtype, layout).requires_grad_()
    rec = kernel_calls
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                           torch.contiguous_format)
    dy = rand_input(gen, (2, 8, 5, 6), dtype, layout)
    y.backward(dy)
    if estimate:  # the estimates are updated from the moments first
        assert x.data_ptr() in rec.addresses("norm_moments")
    assert x.data_ptr() in rec.addresses("norm_forward")
    assert {x.data_ptr(), dy.data_ptr()} <= rec.addresses("norm_backward")
    assert x.grad.stride() == x.stride()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_registered_ops_take_tensors_without_a_copy(dtype, layout, gen, kernel_calls):
    x = rand_input(gen, (2, 8, 5, 6), dtype, layout)
    dy = rand_input(gen, (2, 8, 5, 6), dtype, layout)
    rec = kernel_calls
    ctx, m = _ops.moments(x, TORCH_BN | CN, 4)
    y, ctx = _ops.normalize(x, ctx, m, None, None, None, None, None, None, TORCH_BN | CN | TR, 4, 1e-5, 1e-5)
    dx = _ops.normalize_backward(dy, x, ctx, TORCH_BN | CN | TR, 4, False, False)[0]
    assert x.data_ptr() in rec.addresses("norm_moments") & rec.addresses("norm_forward")
    assert {x.data_ptr(), dy.data_ptr()} <= rec.addresses("norm_backward")
    assert y.stride() == dx.stride() == x.stride()


# the native route where it is built (test_torch_native.py requires it under CI; the ops' tests also run without)
def test_kept_parameter_views_follow_their_tensors(eager_route, gen):
    """The eager route's Python kernels (which serve where the native library is not built) keep a numpy view of
    each parameter and buffer a module hands them (`KernelViews`, _ops._held): a tensor moved to other memory
    (param.data = ...) is read from there; moving the module (.to(), .double(), with torch's swap_tensors too)
    drops the views, which pickles and deep copies leave out. The native route keeps no views of the norms' tensors
    (the WS layers' it keeps), and reads each tensor where it lies on every call."""
    import pickle
    python = eager_route == "python"
    x = rand_input(gen, (4, 8, 3, 3), torch.float32)

    def fresh_output(m):  # the same state in a module the kernels have never seen
        twin = bt.BCNorm(8, 4).to(next(m.parameters()).dtype)
        twin.load_state_dict(m.state_dict())
        return twin(x.to(twin.weight.dtype)).detach()

    # outputs detached: a live graph holds the parameters, and swap_tensors refuses them then (torch's rule)
    m = bt.BCNorm(8, 4)
    before = m(x).detach()
    kept = {"bn_weight", "bn_bias", "running_mean", "running_var", "cn_weight"}
    assert kept <= set(m.kernel_views()) if python else not kept & set(m.kernel_views())
    with torch.no_grad():
        m.bn.weight.data = torch.linspace(0.5, 2.0, 8)  # new memory for a parameter
        m.bn.running_mean.data = torch.full((8,), 0.25)  # and for a buffer
    after = m(x).detach()
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh_output(m))
    assert m.bn.running_mean[0].item() != 0.25  # the update went to the buffer's new memory
    # a review: a strided view that starts where the kept one did, with as many values, is other memory
    wide = torch.linspace(0.5, 2.0, 16)
    with torch.no_grad():
        m.bn.weight.data = wide[:8]
        m(x)
        m.bn.weight.data = wide[::2]
    assert m.bn.weight.data_ptr() == wide.data_ptr() and not m.bn.weight.is_contiguous()
    assert torch.equal(m(x).detach(), fresh_output(m))
    assert "_kernel_views" not in copy.deepcopy(m).__dict__
    assert "_kernel_views" not in pickle.loads(pickle.dumps(m)).__dict__
    m.double()
    assert "_kernel_views" not in m.__dict__  # the float32 views (and their memory) are gone
    assert torch.equal(m(x.double()).detach(), fresh_output(m))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:  # swap_tensors refuses tensors with weak references: the views hold none
        m.float()
        conv = bt.Conv2d(8, 8, 3, padding=1)
        conv(x).sum().backward()
        conv.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert torch.equal(m(x).detach(), fresh_output(m))
    # a weight computed for the call (torch.func.functional_call, a parametrization) is used, not kept: its
    # graph would stay alive with it
    doubled = (m.bn.weight * 2).detach().requires_grad_() * 1
    y = torch.func.functional_call(m, {"bn.weight": doubled}, (x,))
    if python:
        assert m.kernel_views()["bn_weight"][0] is m.bn.weight
    assert not torch.equal(y.detach(), m(x).detach())
    w = conv.weight.detach()  # the authors' standardization, composed here: the kernels read the double weight
    flat = w.reshape(w.shape[0], -1)
    ws = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + conv.ws_eps)
    expected = torch.nn.functional.conv2d(x.double(), ws.reshape(w.shape), conv.bias, padding=1)
    torch.testing.assert_close(conv(x.double()).detach(), expected, rtol=1e-12, atol=1e-12)


def test_a_traced_module_keeps_no_views(gen):
    """Under torch.compile the modules take the ops' route, which uses no views: tracing must not write the
    module's __dict__ (a side effect that torch.export reports, and a guard that recompiles after .to())."""
    torch._dynamo.reset()
    m = bt.BCNorm(8, 4)
    torch.compile(m, backend="eager", fullgraph=True)(rand_input(gen, (4, 8, 3, 3), torch.float32))
    assert "_kernel_views" not in m.__dict__


def test_normalize_batch_takes_batch_statistics_only(gen):
    x = rand_input(gen, (3, 8, 4, 5), torch.float32)
    for flags in (TORCH_BN | CN, AUTHORS_EST | CN | TR, CN | TR):
        with pytest.raises(ValueError, match="batch statistics"):
            _ops.normalize_batch(x, None, None, None, None, flags, 4, 1e-5, 1e-5)


def test_a_running_buffer_the_kernels_cannot_write_is_an_error(gen):
    """The ops' kernels update running buffers in place through their data pointers: one that is not contiguous
    (or a count that is not int64) is a clear error and nothing is written (a view of a C-order copy would take
    the update and lose it). The modules hand such buffers to the composed route instead (test_torch_edges.py)."""
    x = rand_input(gen, (4, 8, 3, 3), torch.float32)
    moments = _ops.moments(x, TORCH_BN | CN, 4)[1]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buffers = {"running_mean": torch.zeros(8), "running_var": torch.ones(8), "num_batches_tracked": torch.tensor(3)}
        if name == "num_batches_tracked":
            buffers[name] = torch.tensor(3.0)
        else:
            buffers[name] = torch.full((16,), 0.5)[::2]
        before = {k: v.clone() for k, v in buffers.items()}
        with pytest.raises((ValueError, TypeError), match=name):
            _ops.update_running_(*buffers.values(), moments, TORCH_BN | CN, 0.1, None)
        for k, v in buffers.items():
            assert torch.equal(v, before[k]), f"{name}: {k} written"


def test_kernels_run_with_the_torch_thread_count_and_restore_the_callers(gen, kernel_calls):
    """Every kernel call of the ops runs under bcnswift.torch's threads (by default torch's own threads,
    torch.get_num_threads() of them), set for the calling thread only; afterwards the thread's count and team are
    its own again, after a failing call too. Python kernels and native ones alike."""
    names = {"norm_moments", "running_update", "norm_forward", "norm_backward", "ws_forward", "ws_backward"}
    conv = bt.Conv2d(4, 8, 3, padding=1).double()
    x = rand_input(gen, (2, 4, 6, 6)).requires_grad_()
    saved = bt.get_num_threads()
    try:
        bcnswift.set_num_threads(2)
        if not sys.platform.startswith("linux"):
            pytest.skip("tested where CI runs: Linux, whose torch wheels run on OpenMP")
        assert _threads._find_openmp_team(), "torch runs on OpenMP here (torch.__config__.parallel_info())"
        # None: torch's team with torch's count; 0: as bcnswift chooses (the process's), on its workers
        for torch_threads, expected in ((None, (torch.get_num_threads(), "torch")), (1, (1, "none")),
                                        (3, (3, "none")), (0, (2, "none"))):
            bt.set_num_threads(torch_threads)
            assert bt.get_num_threads() == torch_threads
            assert bt.uses_torch_threads() == (torch_threads is None)
            kernel_calls.clear()
            for estimate in (False, True):
                norm = bt.BCNorm(8, 4, estimate=estimate).double()
                if estimate:
                    norm.bn.estbn_moving_speed.fill_(0.1)
                norm(conv(x)).sum().backward()  # the eager route
                ctx, m = _ops.moments(x, TORCH_BN | CN, 2)  # the registered ops
                buffers = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                           torch.zeros((), dtype=torch.int64))
                _ops.update_running_(*buffers, m, TORCH_BN, 0.1, None)
                y, ctx = _ops.normalize(x, ctx, m, None, None, None, None, None, None, TORCH_BN | CN | TR, 2,
                                        1e-5, 1e-5)
                _ops.normalize_backward(torch.ones_like(y), x, ctx, TORCH_BN | CN | TR, 2, False, False)
            calls = kernel_calls.calls
            assert {c.name for c in calls} == names, calls
            assert {(c.threads, c.team) for c in calls} == {expected}, calls
            assert bcnswift.get_num_threads() == 2 and calling_thread_team() == 0
        with bcnswift.num_threads(5):  # the caller's own setting: used with 0, given back after each kernel
            for torch_threads, expected in ((1, 1), (0, 5)):
                bt.set_num_threads(torch_threads)
                kernel_calls.clear()
                bt.BCNorm(8, 4).double()(conv(x)).sum().backward()
                assert {c.threads for c in kernel_calls.calls} == {expected}, kernel_calls.calls
                assert bcnswift.get_num_threads() == 5
            bt.set_num_threads(None)
            with pytest.raises(ValueError, match="more than 1 value per channel"):  # the kernel refuses it
                bt.BCNorm(4, 2).double()(torch.ones(1, 4, 1, dtype=torch.float64))
            assert bcnswift.get_num_threads() == 5  # restored after the failure too
            assert calling_thread_team() == 0
        for bad in (-1, 1.5, True):
            with pytest.raises((TypeError, ValueError), match="threads"):
                bt.set_num_threads(bad)
    finally:
        bt.set_num_threads(saved)
        bcnswift.set_num_threads(0)


def test_a_team_address_is_checked():
    for bad, error in ((-1, ValueError), (1 << 70, ValueError), (True, TypeError), (1.5, TypeError), ("0", TypeError)):
        with pytest.raises(error, match="team"):
            _ext.set_calling_thread_team(bad)
    assert calling_thread_team() == 0


def test_torch_threads_give_the_calling_threads_bits(gen, monkeypatch, kernel_calls):
    """On torch's OpenMP team (the default: bcn_set_calling_thread_team with the runtime's GOMP_parallel) the
    kernels give the bits they give on the calling thread alone: BCN forward and backward in both memory
    layouts, training and eval, and Weight Standardization, on tensors large enough for two threads. The team
    is reached through a counting wrapper around GOMP_parallel (the Python kernels'; the native ones' regions
    are probed), to see that the kernels really ran there."""
    import ctypes
    address = _threads._find_openmp_team()
    if not sys.platform.startswith("linux"):
        pytest.skip("tested where CI runs: Linux, whose torch wheels run on OpenMP")
    assert address, "torch runs on OpenMP here: its GOMP_parallel is found"
    team = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    gomp_parallel, regions = team(address), []

    @team
    def counting(fn, data, threads, flags):
        regions.append(threads)
        gomp_parallel(fn, data, threads, flags)
    monkeypatch.setattr(_threads, "_team", ctypes.cast(counting, ctypes.c_void_p).value)
    saved, saved_torch = bt.get_num_threads(), torch.get_num_threads()
    torch.set_num_threads(2)  # a team of two even where torch would take one core
    try:
        x0 = rand_input(gen, (8, 64, 16, 16), torch.float32)
        dy = torch.randn(x0.shape, generator=gen, dtype=torch.float32) + 0.3
        w0 = torch.randn(256, 128, 3, 3, generator=gen, dtype=torch.float32) * 0.1 + 0.02
        runs = []
        for threads in (None, 1):
            kernel_calls.clear()
            regions.clear()
            bt.set_num_threads(threads)
            assert bt.uses_torch_threads() == (threads is None)
            out = []
            for layout in (torch.contiguous_format, torch.channels_last):
                norm = bt.BCNorm(64, 16)
                x = x0.clone(memory_format=layout).requires_grad_()
                y = norm(x)
                y.backward(dy.contiguous(memory_format=layout))
                norm.eval()
                out += [y, x.grad, norm(x.detach()), norm.bn.running_var, norm.weight.grad, norm.bn.weight.grad]
            w = w0.clone().requires_grad_()
            ws = bt.weight_standardization(w)
            ws.backward(torch.ones_like(ws))
            runs.append(out + [ws, w.grad])
            team_regions = regions + kernel_calls.team_regions
            if threads is None:  # every parallel kernel ran on the team
                assert team_regions and set(team_regions) == {2}, team_regions
            else:
                assert not team_regions, team_regions
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        bt.set_num_threads(saved)
        torch.set_num_threads(saved_torch)


def test_a_forked_child_runs_the_kernels_on_its_calling_thread():
    """GNU OpenMP cannot start a parallel region in a process forked after the parent's team ran (torch's own
    parallel operations hang there): a forked child runs the kernels on its calling thread, and finishes. The
    eager route's kernels and the ops' (native where built) alike."""
    if sys.platform.startswith("linux"):  # as the tests of the team above: torch's Linux wheels bring GNU OpenMP
        assert hasattr(os, "fork") and _threads._find_openmp_team(), "no OpenMP team found on Linux"
    elif not hasattr(os, "fork") or not _threads._find_openmp_team():
        pytest.skip("no os.fork, or a torch without OpenMP, on this platform")
    code = """if True:
        import os, signal, torch, bcnswift.torch as bt
        from bcnswift import _ext
        torch.set_num_threads(2)
        torch.manual_seed(3)
        x = torch.randn(8, 64, 32, 32) + 0.5
        m = bt.BCNorm(64, 16)
        flags = _ext.BCN_BATCH_NORM | _ext.BCN_CHANNEL_NORM | _ext.BCN_TRAINING
        op = torch.ops.bcnswift.normalize_batch.default
        expected, expected_op = m(x).detach(), op(x, None, None, None, None, flags, 16, 1e-5, 1e-5)[0]
        assert bt.uses_torch_threads()  # the parent's kernels ran on torch's team
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child ends, whatever becomes of this process
            # compared in numpy: torch.equal on this size is itself a parallel operation, which would hang
            ok = not bt.uses_torch_threads() and (m(x).detach().numpy() == expected.numpy()).all()
            ok = ok and (op(x, None, None, None, None, flags, 16, 1e-5, 1e-5)[0].numpy() == expected_op.numpy()).all()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0", out.stdout


def test_default_torch_thread_count_comes_from_the_environment():
    code = "import bcnswift.torch as bt; print(bt.get_num_threads())"
    for env, expected in (("", "None"), ("4", "4"), ("0", "0"), ("many", "None")):
        out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "BCNSWIFT_TORCH_NUM_THREADS": env})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == expected, (env, out.stdout, out.stderr)
        # a RuntimeWarning, as every other bad bcnswift variable gives (it was a UserWarning)
        warned = "RuntimeWarning: BCNSWIFT_TORCH_NUM_THREADS='many' is not a thread count" in out.stderr
        assert warned == (env == "many"), out.stderr


# ---- errors -------------------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error_and_changes_no_buffer(gen):
    m = bt.BCNorm(8, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"\[B, 8, \*\]"):
        m(torch.ones(2, 6, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 8, 1, 1, generator=gen) + 1)
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 8, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="divisible"):
        bt.BCNorm(8, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel group"):
        bt.ChannelNorm(8, 8)(torch.randn(2, 8, 1, generator=gen))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TypeError, match="CPU float32 or float64"):
        _ops.moments(torch.ones(2, 8, 3, dtype=torch.float16), CN, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_weights_are_standardized_where_they_lie(dtype, gen, kernel_calls):
    """Each output channel of a channels_last weight is still one dense block (its fan-in in another order), so
    WS and its gradient run on the weight's memory and keep its layout; values match the C-order weight's."""
    w = rand_input(gen, (6, 4, 3, 3), dtype, "contiguous")
    g = rand_input(gen, (6, 4, 3, 3), dtype, "contiguous")
    wl, gl = w.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    rec = kernel_calls
    out = _ops._weight_standardization(wl, 1e-5, _ext.BCN_WS_UNBIASED)
    dw = _ops._weight_standardization_backward(gl, wl, 1e-5, _ext.BCN_WS_UNBIASED)
    assert wl.data_ptr() in rec.addresses("ws_forward") and gl.data_ptr() in rec.addresses("ws_backward")
    assert out.is_contiguous(memory_format=torch.channels_last) and dw.stride() == wl.stride()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, _ops._weight_standardization(w, 1e-5, _ext.BCN_WS_UNBIASED), rtol=tol, atol=tol)
    torch.testing.assert_close(dw, _ops._weight_standardization_backward(g, w, 1e-5, _ext.BCN_WS_UNBIASED),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strides_of_size_one_axes_cost_no_copy(dtype, gen, kernel_calls):
    """A 1x1 convolution's weight gradient arrives (from inductor's graph) with other strides on its axes of
    size 1 than the weight has: the same memory layout, so the WS backward and the normalization's backward
    read it in place, and the results are those of the plain layout."""
    w = rand_input(gen, (6, 4, 1, 1), dtype)
    g = rand_input(gen, (6, 4, 1, 1), dtype)
    g_odd = torch.empty_strided((6, 4, 1, 1), (4, 1, 4, 4), dtype=dtype).copy_(g)
    x = rand_input(gen, (3, 8, 1, 1), dtype)
    dy = rand_input(gen, (3, 8, 1, 1), dtype)
    dy_odd = torch.empty_strided((3, 8, 1, 1), (8, 1, 8, 8), dtype=dtype).copy_(dy)
    assert g_odd.stride() != w.stride() and dy_odd.stride() != x.stride()
    ctx = _ops.normalize(x, None, None, None, None, None, None, None, None, TORCH_BN | CN | TR, 4, 1e-5, 1e-5)[1]
    rec = kernel_calls
    dw = _ops._weight_standardization_backward(g_odd, w, 1e-5, _ext.BCN_WS_UNBIASED)
    dx = _ops.normalize_backward(dy_odd, x, ctx, TORCH_BN | CN | TR, 4, False, False)[0]
    assert g_odd.data_ptr() in rec.addresses("ws_backward")
    assert dy_odd.data_ptr() in rec.addresses("norm_backward")
    torch.testing.assert_close(dw, _ops._weight_standardization_backward(g, w, 1e-5, _ext.BCN_WS_UNBIASED),
                               rtol=0, atol=0)
    torch.testing.assert_close(dx, _ops._normalize_backward(dy, x, ctx, TORCH_BN | CN | TR, 4, False, False)[0],
                               rtol=0, atol=0)


def _laid_out(t, layout):
    """t's values in `layout`: C order, channels-last ([B, *, C] in C order, any rank), or permuted (dense in
    neither)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("shape,forward_layout,given_layout", [
    ((3, 8, 4, 5), "contiguous", "channels_last"), ((3, 8, 4, 5), "channels_last", "contiguous"),
    ((3, 8, 4, 5), "channels_last", "permuted"), ((3, 8, 20), "contiguous", "channels_last"),
    ((3, 8, 20), "channels_last", "contiguous")])
@pytest.mark.parametrize("stage", ["BCN batch statistics", "BCN estimated"])
def test_ops_continue_a_context_made_in_the_other_layout(shape, forward_layout, given_layout, stage, gen):
    """The ops take any layout (flexible_layout), and inductor may hand a later phase the same x in another
    layout than the phase that made the context saw (it can recompute a saved tensor for the backward). The
    phase continues in the context's layout and returns its output in the layout promised for x as given
    (`_output`), leaving the context it was given alone: the values are those of one layout throughout, to
    the bit."""
    flags = STAGES[stage]
    p = parameters(gen, 8, 4, torch.float64)
    x = _laid_out(rand_input(gen, shape, torch.float64), forward_layout)
    dy = _laid_out(rand_input(gen, shape, torch.float64), forward_layout)
    x_given, dy_given = _laid_out(x, given_layout), _laid_out(dy, given_layout)
    ctx, m = _ops.moments(x, flags, 4)
    ctx_before = ctx.clone()
    if flags & _ext.BCN_ESTIMATED:
        args = (None, p["bw"], p["bb"], p["rm"], p["rv"], p["cw"], p["cb"], flags, 4, 1e-5, 1e-3)
    else:
        args = (m, p["bw"], p["bb"], None, None, p["cw"], p["cb"], flags | TR, 4, 1e-5, 1e-3)
    y, ctx_y = _ops.normalize(x, ctx, *args)
    y_given, ctx_given = _ops.normalize(x_given, ctx, *args)
    assert torch.equal(ctx, ctx_before), "normalize changed the context it was given"
    assert y_given.stride() == _ops._output(x_given).stride() != y.stride()
    torch.testing.assert_close(y_given, y, rtol=0, atol=0)
    torch.testing.assert_close(ctx_given, ctx_y, rtol=0, atol=0)
    train = 0 if flags & _ext.BCN_ESTIMATED else TR
    ctx_y_before = ctx_y.clone()
    grads = _ops.normalize_backward(dy, x, ctx_y, flags | train, 4, True, True)
    grads_given = _ops.normalize_backward(dy_given, x_given, ctx_y, flags | train, 4, True, True)
    assert torch.equal(ctx_y, ctx_y_before), "normalize_backward changed the context"
    assert grads_given[0].stride() == _ops._output(x_given).stride()
    for g, g_given in zip(grads, grads_given):
        torch.testing.assert_close(g_given, g, rtol=0, atol=0)


def test_a_context_of_any_dense_shape_is_read_as_its_values(gen):
    """The kernels take a context by its values (dtype, density and length are checked), so a [1, N] view
    of one works as the flat tensor does, header included."""
    flags = STAGES["BCN batch statistics"]
    p = parameters(gen, 8, 4, torch.float64)
    x = rand_input(gen, (3, 8, 4, 5), torch.float64)
    ctx, m = _ops.moments(x, flags, 4)
    args = (m, p["bw"], p["bb"], None, None, p["cw"], p["cb"], flags | TR, 4, 1e-5, 1e-3)
    y, ctx_y = _ops.normalize(x, ctx, *args)
    y2, ctx_y2 = _ops.normalize(x, ctx.view(1, -1), *args)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(ctx_y2.reshape(-1), ctx_y, rtol=0, atol=0)


def test_a_meta_tensor_among_cpu_tensors_is_refused_by_every_op(gen):
    """The fake kernels serve the Meta key, which the dispatcher picks when any argument is a meta tensor: a CPU
    call with one meta argument returned uninitialized CPU memory (normalize, the backwards) or did nothing
    (update_running_). Each op now refuses it, as torch's own ops refuse tensors on two devices."""
    meta = {"device": "meta", "dtype": torch.float64}
    x = rand_input(gen, (2, 4, 3, 3))
    ctx, m = _ops.moments(x, TORCH_BN, 1)
    rm, rv, nbt = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.tensor(0)
    _, context = _ops.normalize(x, None, None, None, None, None, None, None, None, TORCH_BN | TR, 1, 1e-5, 1e-5)
    calls = {
        "normalize": lambda: _ops.normalize(x, None, None, torch.ones(4, **meta), None, None, None, None, None,
                                            TORCH_BN | TR, 1, 1e-5, 1e-5),
        "normalize_batch": lambda: _ops.normalize_batch(x, None, None, torch.ones(2, **meta), None,
                                                        TORCH_BN | CN | TR, 2, 1e-5, 1e-5),
        "normalize_backward": lambda: _ops.normalize_backward(torch.ones(2, 4, 3, 3, **meta), x, context,
                                                              TORCH_BN | TR, 1, False, False),
        "update_running_ speed": lambda: _ops.update_running_(rm, rv, nbt, m, TORCH_BN | TR, 0.1,
                                                              torch.ones(1, **meta)),
        "update_running_ buffer": lambda: _ops.update_running_(torch.zeros(4, **meta), rv, nbt, m, TORCH_BN | TR,
                                                               0.1, None),
        "weight_standardization_backward": lambda: _ops.weight_standardization_backward(
            torch.ones(4, 9, **meta), rand_input(gen, (4, 9)), 1e-5, 0),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="bcnswift ops take every tensor on one device: .* is on meta"):
            call()
        assert torch.equal(rm, torch.zeros(4, dtype=torch.float64)) and nbt == 0, f"{name} changed a buffer"


@pytest.mark.parametrize("bad", ["bn_weight size", "cn_weight dtype", "bn_eps", "eps"])
def test_an_estimated_update_checks_the_normalization_first(eager_route, bad, gen):
    """With estimates the eager route folds the batch into the buffers before it normalizes with them, and the
    normalization checks its parameters and eps: a call refused there had already moved the buffers. They are now
    checked first. (The modules check the same before calling; this is the op called directly.)"""
    x = rand_input(gen, (2, 4, 3, 3))
    rm, rv, nbt = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.tensor(0)
    bw = torch.ones(3 if bad == "bn_weight size" else 4, dtype=torch.float64)
    cw = torch.ones(2, dtype=torch.float32 if bad == "cn_weight dtype" else torch.float64)
    eps, bn_eps = (-1.0 if bad == "eps" else 1e-5), (0.0 if bad == "bn_eps" else 1e-5)
    flags = BN | CN | _ext.BCN_ESTIMATED
    with pytest.raises((ValueError, TypeError), match="bn_weight has 3 elements|cn_weight has dtype float32|eps must"):
        _ops.eager_forward(x, bw, None, rm, rv, nbt, None, cw, None, flags, 2, eps, bn_eps, 0.1, True)
    assert torch.equal(rm, torch.zeros(4, dtype=torch.float64)) and torch.equal(rv, torch.ones(4, dtype=torch.float64))
    assert nbt == 0
    _ops.eager_forward(x, bw[:4] if bw.numel() == 4 else torch.ones(4, dtype=torch.float64), None, rm, rv, nbt, None,
                       cw.double(), None, flags, 2, 1e-5, 1e-5, 0.1, True)
    assert not torch.equal(rm, torch.zeros(4, dtype=torch.float64)), "a good call updates the estimates"


def test_a_moving_speed_holds_one_value_and_an_update_needs_its_buffers(gen):
    """A speed of two values used the first; an empty one raised an IndexError; no buffers gave 'running_mean must
    be float32 or float64' (native) or an AttributeError (Python). Both kernels now say what is wrong (the Python
    ones when test_torch_native.py runs this file without the native library)."""
    x = rand_input(gen, (2, 4, 3, 3))
    _, m = _ops.moments(x, TORCH_BN, 1)
    rm, rv, nbt = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.tensor(0)
    for speed in (torch.tensor([0.5, 9.0]), torch.zeros(0)):
        with pytest.raises(ValueError, match=f"estbn_moving_speed must hold one value, got {speed.numel()}"):
            _ops.update_running_(rm, rv, nbt, m, TORCH_BN | TR, 0.1, speed)
    with pytest.raises(ValueError, match="updating the running statistics needs running_mean and running_var"):
        _ops.update_running_(None, None, None, m, TORCH_BN | TR, 0.1, None)
    assert torch.equal(rm, torch.zeros(4, dtype=torch.float64))


def test_the_fake_kernels_refuse_a_group_count_below_one(gen):
    """Under FakeTensorMode (tracing, torch.compile's first pass) num_groups 0 is refused as the real kernels refuse
    it, not later at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    flags = _ext.BCN_BATCH_NORM | _ext.BCN_CHANNEL_NORM | _ext.BCN_TRAINING
    x = rand_input(gen, (2, 8, 3, 3))
    w, b = torch.ones(8, dtype=x.dtype), torch.zeros(8, dtype=x.dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for groups in (0, -2):
            with pytest.raises(ValueError, match=f"num_groups must be positive, got {groups}"):
                _ops.moments(x, flags, groups)
            with pytest.raises(ValueError, match=f"num_groups must be positive, got {groups}"):
                _ops.normalize_batch(x, w, b, w[:4], b[:4], flags, groups, 1e-5, 1e-5)
