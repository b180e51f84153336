"""bcnswift.torch's native operators (native_ops.cpp, built and loaded by _native.py): they are in use where a C++
compiler is (required under CI), give the bits and the errors of the ops' Python kernels, run on torch's threads,
and bcnswift.torch works without them (the Python kernels then serve, tested here in a subprocess)."""
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _missing, require, seed_of

torch = require("torch")
from bcnswift import _ext  # noqa: E402
from bcnswift.torch import _native, _ops  # noqa: E402

BN, CN, TR = _ext.BCN_BATCH_NORM, _ext.BCN_CHANNEL_NORM, _ext.BCN_TRAINING
TORCH_BN = BN | _ext.BCN_UNBIASED_RUNNING_VAR
LABML_EST = BN | _ext.BCN_ESTIMATED
AUTHORS_EST = LABML_EST | _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def gen(request):
    seed = seed_of(request.node.nodeid)
    print(f"torch seed {seed} (torch.Generator().manual_seed({seed}), from {request.node.nodeid!r})")
    return torch.Generator().manual_seed(seed)


def need_native():
    """The native operators, or `_missing` (under CI=true a failure: CI never passes on the Python kernels alone)."""
    if not _ops.NATIVE:
        _missing("bcnswift.torch's native operators", f"a C++ compiler on PATH or $CXX: {_native.reason}")


def test_the_native_operators_are_in_use():
    """Where a C++ compiler is, bcnswift.torch builds its native operators and its ops run them."""
    need_native()
    import bcnswift.torch as bt
    assert bt.uses_native_operators() and _native.reason is None


def _layout(t, layout):
    if layout == "channels_last":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "permuted":  # dense, in neither layout the kernels read: copied
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def _input(gen, shape, dtype, layout):
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    mean = (torch.randn(C, generator=gen, dtype=torch.float64) * 3 + 2).reshape(view)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + mean
    return _layout(x.to(dtype), layout)


def _same(a, b, what):
    """a and b the same bits (values, dtypes, shapes, strides), or the same tuples of them; an error is a failure."""
    for result in (a, b):
        if isinstance(result, Exception):
            raise AssertionError(f"{what}: {type(result).__name__}: {result}") from result
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        # the memory layout (an axis of size 1, or of an empty tensor, has any stride)
        assert a.numel() == 0 or all(u == v for u, v, n in zip(a.stride(), b.stride(), a.shape) if n > 1), what
        assert torch.equal(a, b), what
    else:
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{what}[{i}]")


def _native_and_python(name, *args):
    """The op's result by its native kernel (the dispatcher's CPU kernel) and by its Python kernel, or the error
    each raises."""
    def run(f):
        try:
            return f(*args)
        except Exception as error:  # noqa: BLE001 - compared below
            return error
    return run(getattr(torch.ops.bcnswift, name).default), run(getattr(_ops, "_" + name.rstrip("_")))


CONFIGS = [(flags, estimated) for flags, estimated in ((TORCH_BN | CN, False), (AUTHORS_EST | CN, True),
                                                       (LABML_EST | CN, True), (TORCH_BN, False), (CN, False))]


# rank 2 has one layout
SHAPES_AND_LAYOUTS = [(shape, layout) for shape in ((4, 8, 3, 5), (6, 16), (3, 8, 2, 2), (2, 8, 1, 7), (3, 8, 7),
                                                    (2, 8, 2, 3, 2))
                      for layout in ("contiguous", "channels_last", "permuted") if len(shape) > 2 or
                      layout == "contiguous"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", SHAPES_AND_LAYOUTS)
def test_native_kernels_give_the_python_kernels_bits(shape, layout, dtype, gen):
    """Every op, in training (batch statistics, and the estimated update) and eval, with and without affine
    parameters, each stage alone: the native kernels' outputs (values, dtypes, strides) and the running buffers
    they update are the Python kernels', bit for bit."""
    need_native()
    C, G = shape[1], 4
    x = _input(gen, shape, dtype, layout)
    dy = _input(gen, shape, dtype, layout)

    def p(n, lo, hi):
        return (torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    for (flags, estimated), affine in itertools.product(CONFIGS, (True, False)):
        # one parameter strided (read from a C-order copy), where it has values
        bw, bb = (p(2 * C, 0.5, 1.5)[::2], p(C, -0.5, 0.5)) if affine else (None, None)
        cw, cb = (p(G, 0.5, 1.5).reshape(1, G, 1), p(G, -0.5, 0.5)) if affine else (None, None)
        rm, rv = p(C, -1, 1), p(C, 0.5, 2)
        what = f"flags {flags}, affine {affine}"
        for train in ((0, TR) if flags & BN else (0,)):
            f = flags | (0 if estimated else train)
            ctx, m = _native_and_python("moments", x, flags, G)
            _same(ctx, m, f"{what}: moments")
            context, moments = ctx
            if flags & BN:
                buffers = [(rm.clone(), rv.clone(), torch.tensor(3)) for _ in range(2)]
                for (brm, brv, bn_), op in zip(buffers, (torch.ops.bcnswift.update_running_.default,
                                                          _ops._update_running)):
                    op(brm, brv, bn_, moments, flags, 0.1, torch.tensor([0.25], dtype=dtype) if estimated else None)
                _same(buffers[0], buffers[1], f"{what}: update_running_")
            given = (context, None) if estimated else (None, None)
            out = _native_and_python("normalize", x, *given, bw, bb, rm, rv, cw, cb, f, G, 1e-5, 1e-3)
            _same(*out, f"{what}, train {train}: normalize")
            y, context_y = out[0]
            if train and not estimated:
                _same(*_native_and_python("normalize_batch", x, bw, bb, cw, cb, f, G, 1e-5, 1e-3),
                      f"{what}: normalize_batch")
                # phase (c) on the moments' context with the batch's moments (what normalize_batch chains)
                _same(*_native_and_python("normalize", x, context, moments, bw, bb, None, None, cw, cb, f, G, 1e-5,
                                          1e-3), f"{what}: normalize with moments")
            for bn_affine, cn_affine in ((True, True), (False, True), (True, False)):
                _same(*_native_and_python("normalize_backward", dy, x, context_y, f, G, bn_affine, cn_affine),
                      f"{what}, train {train}, affine {bn_affine, cn_affine}: normalize_backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", [((6, 4, 3, 3), "contiguous"), ((6, 4, 3, 3), "channels_last"),
                                          ((6, 4, 3, 3), "permuted"), ((5, 7), "contiguous"),
                                          ((6, 4, 1, 1), "odd strides"), ((1, 3, 2, 2), "contiguous")])
def test_native_weight_standardization_gives_the_python_kernels_bits(shape, layout, dtype, gen):
    """Weight Standardization and its backward, both conventions, weights in every layout (each output channel
    one dense block, or not), gradients in their own layouts: the Python kernels' bits and output strides."""
    need_native()
    w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) * 0.2 + 0.05
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) + 0.3
    if layout == "odd strides":  # a 1x1 kernel's weight as inductor may lay it out: the same memory order
        w = torch.empty_strided(shape, (4, 1, 4, 4), dtype=dtype).copy_(w)
    elif len(shape) == 4:
        w = _layout(w, layout)
    for flags in (0, _ext.BCN_WS_UNBIASED, _ext.BCN_WS_UNBIASED | _ext.BCN_WS_EPS_IN_SQRT):
        _same(*_native_and_python("weight_standardization", w, 1e-5, flags), f"forward, flags {flags}")
        for g in (grad, _layout(grad, "channels_last") if len(shape) == 4 else grad.t().contiguous().t()):
            _same(*_native_and_python("weight_standardization_backward", g, w, 1e-5, flags),
                  f"backward, flags {flags}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_kernels_continue_a_context_made_in_the_other_layout(dtype, gen):
    """x laid out otherwise than when its context was made (inductor may recompute a saved tensor): both kernels
    continue in the layout the context records and give the output the layout promised for x as it came."""
    need_native()
    x = _input(gen, (4, 8, 3, 5), dtype, "channels_last")
    dy = _input(gen, (4, 8, 3, 5), dtype, "contiguous")
    f = TORCH_BN | CN
    for made, given in (("channels_last", "contiguous"), ("contiguous", "channels_last"), ("permuted", "permuted")):
        context, moments = torch.ops.bcnswift.moments.default(_layout(x, made), f, 4)
        xg = _layout(x, given)
        out = _native_and_python("normalize", xg, context, moments, None, None, None, None, None, None, f | TR, 4,
                                 1e-5, 1e-5)
        _same(*out, f"normalize: context made {made}, x given {given}")
        _same(*_native_and_python("normalize_backward", _layout(dy, given), xg, out[0][1], f | TR, 4, False, False),
              f"normalize_backward: context made {made}, x given {given}")


def _bad_calls(x):
    """Calls of the ops that must fail, each with what the Python kernels raise for it."""
    C = x.shape[1]
    f = TORCH_BN | CN | TR
    ctx, m = _ops._moments(x, TORCH_BN | CN, 4)
    ones = torch.ones(C)
    yield "normalize", (x.to(torch.float16), None, None, None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x[0, 0, 0], None, None, None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x[:0], None, None, None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x, None, None, ones.double(), None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x, None, None, torch.ones(C + 1), None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x, None, None, None, None, None, None, torch.ones(3), None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x, None, None, None, None, None, None, None, None, TORCH_BN | CN, 4, 1e-5, 1e-5)
    yield "normalize", (x, None, None, None, None, None, None, None, None, f, 3, 1e-5, 1e-5)
    yield "normalize", (x, None, None, None, None, None, None, None, None, f, 0, 1e-5, 1e-5)
    yield "normalize", (x, None, None, None, None, None, None, None, None, f, 4, -1.0, 1e-5)
    yield "normalize", (x, ctx.float(), m, None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x, ctx[:5], m, None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x, ctx, m[:3], None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize", (x[:1, :, :1, :1], None, None, None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "normalize_batch", (x, None, None, None, None, TORCH_BN | CN, 4, 1e-5, 1e-5)
    yield "moments", (x.int(), TORCH_BN | CN, 4)
    yield "update_running_", (torch.zeros(2 * C)[::2], torch.ones(C), torch.tensor(0), m, TORCH_BN, 0.1, None)
    yield "update_running_", (torch.zeros(C, dtype=torch.int32), torch.ones(C), torch.tensor(0), m, TORCH_BN, 0.1,
                              None)
    yield "update_running_", (torch.zeros(C), torch.ones(C + 1), torch.tensor(0), m, TORCH_BN, 0.1, None)
    yield "update_running_", (torch.zeros(C), torch.ones(C), torch.tensor(0.0), m, TORCH_BN, 0.1, None)
    yield "update_running_", (torch.zeros(C), torch.ones(C), torch.tensor(0), m[:-1], TORCH_BN, 0.1, None)
    yield "update_running_", (torch.zeros(C), torch.ones(C), torch.tensor(0), m, TORCH_BN, 2.0, None)
    yield "normalize_backward", (x, x, ctx, CN | TR, 4, True, True)  # a context of other stages
    yield "normalize_backward", (x[:1], x, ctx, f, 4, True, True)
    yield "normalize_backward", (x[0], x, ctx, f, 4, True, True)  # broadcasts to x's shape: refused all the same
    yield "normalize_backward", (x, x, ctx.float(), f, 4, True, True)
    # memory the kernels must not read: misaligned, or not in the layout the flags declare; groups that cannot be
    misaligned = torch.frombuffer(bytearray(4 * x.numel() + 1), dtype=torch.float32, offset=1).reshape(x.shape)
    misaligned.copy_(x)
    cl = _ext.BCN_CHANNELS_LAST
    yield "normalize", (misaligned, None, None, None, None, None, None, None, None, f, 4, 1e-5, 1e-5)
    yield "moments", (misaligned, TORCH_BN | CN, 4)
    yield "normalize", (x, None, None, None, None, None, None, None, None, f | cl, 4, 1e-5, 1e-5)
    yield "moments", (x, TORCH_BN | CN | cl, 4)
    yield "normalize_backward", (x, x, ctx, f | cl, 4, True, True)
    yield "normalize_backward", (x, misaligned, ctx, f, 4, True, True)
    yield "normalize", (x, None, None, None, None, None, None, None, None, f, 1 << 20, 1e-5, 1e-5)
    yield "normalize_batch", (x, None, None, None, None, f, 1 << 20, 1e-5, 1e-5)
    # flags outside 32 bits (which a cast would cut to their low bits), with unknown bits (which decided the
    # layout checks before the kernels refused them), or negative; groups below 1 without a context
    for flags in (f | 1 << 40, f | 1 << 12, 0xFFFF_FFFF, -1):
        yield "normalize", (x, None, None, None, None, None, None, None, None, flags, 4, 1e-5, 1e-5)
        yield "moments", (x, flags, 4)
        yield "normalize_batch", (x, None, None, None, None, flags, 4, 1e-5, 1e-5)
        yield "normalize_backward", (x, x, ctx, flags, 4, True, True)
        yield "update_running_", (torch.zeros(C), torch.ones(C), torch.tensor(0), m, flags, 0.1, None)
        yield "weight_standardization", (torch.randn(6, 4, 3, 3), 1e-5, flags)
    yield "normalize", (x, None, None, None, None, None, None, None, None, f, -2, 1e-5, 1e-5)
    yield "normalize_batch", (x, None, None, None, None, f, -2, 1e-5, 1e-5)
    yield "moments", (x, TORCH_BN | CN, -2)
    w = torch.randn(6, 4, 3, 3)
    w_misaligned = torch.frombuffer(bytearray(4 * w.numel() + 1), dtype=torch.float32, offset=1).reshape(w.shape)
    w_misaligned.copy_(w)
    yield "weight_standardization", (w_misaligned, 1e-5, 1)
    yield "weight_standardization_backward", (w_misaligned, w, 1e-5, 1)
    yield "weight_standardization_backward", (w[0], w, 1e-5, 1)
    yield "weight_standardization", (w.half(), 1e-5, 1)
    yield "weight_standardization", (w[0, 0, 0], 1e-5, 1)
    yield "weight_standardization", (w[:0], 1e-5, 1)
    yield "weight_standardization", (w, -1.0, 1)
    yield "weight_standardization", (w[:, :1, :1, :1], 1e-5, 1)  # a fan-in of one value, unbiased
    yield "weight_standardization_backward", (w[:3], w, 1e-5, 1)


def test_native_kernels_raise_the_python_kernels_errors(gen):
    """Bad input gets the same exception type and message from both kernels, and neither changes a buffer."""
    need_native()
    x = _input(gen, (4, 8, 3, 5), torch.float32, "contiguous")
    for name, args in _bad_calls(x):
        before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        native, python = _native_and_python(name, *args)
        assert isinstance(python, Exception), f"{name}{tuple(type(a).__name__ for a in args)}: no error"
        assert type(native) is type(python) and str(native) == str(python), (name, native, python)
        for a, b in zip(args, before):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), f"{name} changed an argument"


def _eager_routes(monkeypatch, make):
    """The eager route's forward and backward by the native op (`_eager_normalize`, its C++ autograd node) and by
    the Python one (`_EagerForward`), each on fresh copies from `make()` -> (x, dy, parameters, buffers, the rest
    of eager_forward's arguments): (y, the gradients of x and of each parameter, the buffers and their versions)
    of each, or the error each raised, with every tensor argument after the failed call."""
    results = []
    for native in (True, False):
        monkeypatch.setattr(_ops, "NATIVE", native)
        x, dy, (bw, bb, cw, cb), (rm, rv, nbt, speed), rest = make()
        buffers = [t for t in (rm, rv, nbt) if t is not None]
        versions = [t._version for t in buffers]
        try:
            y = _ops.eager_forward(x, bw, bb, rm, rv, nbt, speed, cw, cb, *rest)
            y.backward(dy)
            grads = tuple(None if t is None else t.grad for t in (x, bw, bb, cw, cb))
            results.append((y, grads, buffers, [t._version - v for t, v in zip(buffers, versions)]))
        except Exception as error:  # noqa: BLE001 - compared by the caller
            results.append((error, [t for t in (x, bw, bb, cw, cb, *buffers) if t is not None]))
    return results


def _same_or_none(a, b, what):
    assert (a is None) == (b is None), what
    if a is not None:
        _same(a, b, what)


EAGER_CONFIGS = [  # flags, momentum (None: cumulative average), update, moving speed ("no count": a stage without
    # num_batches_tracked); parameters are given to a stage the flags leave out too (their gradients are zeros)
    (TORCH_BN | CN, 0.3, True, False), (TORCH_BN | CN, None, True, False), (TORCH_BN | CN | TR, 0.1, False, False),
    (TORCH_BN | CN, 0.1, False, False), (AUTHORS_EST | CN, 0.0, True, True), (LABML_EST | CN, 0.2, True, False),
    (LABML_EST | CN, 0.2, False, False), (TORCH_BN, 0.1, True, False), (CN, 0.0, False, False),
    (TORCH_BN | CN, 0.3, True, "no count")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", [((4, 8, 3, 5), "contiguous"), ((4, 8, 3, 5), "channels_last"),
                                          ((4, 8, 3, 5), "permuted"), ((6, 16), "contiguous"),
                                          ((3, 8, 2, 2), "channels_last")])
def test_the_native_eager_route_gives_the_python_routes_bits(shape, layout, dtype, gen, monkeypatch):
    """The eager route (a module's forward in one call, its backward through autograd) by the native op and by
    the Python autograd.Function: outputs, input and parameter gradients (each in its parameter's shape, None for
    one not given), running buffers and their versions (bumped once by an update), bit for bit, in every mode,
    with parameters given, absent, and given for one stage's half."""
    need_native()
    C, G = shape[1], 4
    x0, dy0 = _input(gen, shape, dtype, layout), _input(gen, shape, dtype, layout)

    def p(n, lo, hi):
        return (torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    params0 = (p(C, 0.5, 1.5), p(C, -0.5, 0.5), p(G, 0.5, 1.5).reshape(1, G, 1), p(G, -0.5, 0.5).reshape(1, G, 1))
    buffers0 = (p(C, -1, 1), p(C, 0.5, 2), torch.tensor(5), torch.tensor([0.25], dtype=dtype))
    for (flags, momentum, update, speed), given, x_grad in itertools.product(
            EAGER_CONFIGS, ((1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 0, 1)), (True, False)):
        if not x_grad and not any(given):
            continue  # nothing requires grad: no backward
        if momentum is None:
            flags |= _ext.BCN_CUMULATIVE_AVERAGE

        def make():
            x = x0.clone(memory_format=torch.preserve_format).requires_grad_(x_grad)
            params = [t.clone().requires_grad_() if g else None for t, g in zip(params0, given)]
            rm, rv, nbt, ms = (t.clone() for t in buffers0)
            buffers = (rm, rv, None if speed == "no count" else nbt, ms if speed is True else None) if flags & BN \
                else (None,) * 4
            return x, dy0, params, buffers, (flags, G, 1e-5, 1e-3, momentum or 0.0, update)
        native, python = _eager_routes(monkeypatch, make)
        what = f"flags {flags}, momentum {momentum}, update {update}, given {given}, x grad {x_grad}"
        assert len(native) == len(python) == 4, (what, native[0], python[0])
        _same(native[0], python[0], f"{what}: y")
        for name, a, b in zip(("x", "bn_weight", "bn_bias", "cn_weight", "cn_bias"), native[1], python[1]):
            _same_or_none(a, b, f"{what}: the gradient of {name}")
        _same(native[2], python[2], f"{what}: buffers")
        assert native[3] == python[3] == [1 if update else 0] * len(native[3]), what


def test_the_native_eager_route_raises_the_python_routes_errors(gen, monkeypatch):
    """Bad input to the eager route: the same exception type and message from both, and no buffer or parameter
    changed by either."""
    need_native()
    x0 = _input(gen, (4, 8, 3, 5), torch.float32, "contiguous")
    C = 8

    def misaligned(n):
        t = torch.frombuffer(bytearray(4 * n + 1), dtype=torch.float32, offset=1)
        return t.copy_(torch.zeros(n))

    def call(x=x0, rm=lambda: torch.linspace(-1, 1, C), rv=lambda: torch.linspace(0.5, 2, C),
             nbt=lambda: torch.tensor(3), flags=TORCH_BN | CN, groups=4, eps=1e-5, momentum=0.1, update=True,
             bw=None, speed=None):
        def make():  # fresh buffers each time (a clone of a strided or misaligned one would be neither)
            buffers = (rm(), rv(), nbt(), speed)
            return x.clone().requires_grad_(), torch.ones_like(x), (bw, None, None, None), buffers, (
                flags, groups, eps, 1e-5, momentum, update)
        return make
    # (an estimated forward's eps: batch_channel_norm checks it before the update, as both routes' update comes
    # before the normalization's own checks)
    for make in (call(x=x0.half()), call(x=x0[:, :, 0, 0][0]), call(groups=3), call(eps=-1.0),
                 call(rm=lambda: torch.zeros(C + 1)), call(rm=lambda: torch.zeros(2 * C)[::2]),
                 call(rv=lambda: torch.ones(C).double()), call(nbt=lambda: torch.tensor(3.0)),
                 call(rm=lambda: misaligned(C)), call(momentum=1.5), call(flags=AUTHORS_EST | CN, momentum=2.0),
                 call(bw=torch.ones(C + 1, requires_grad=True)), call(x=x0[:1, :, :1, :1]),
                 call(flags=TORCH_BN | CN | 1 << 12), call(flags=AUTHORS_EST | CN, rm=lambda: torch.zeros(C - 1)),
                 call(flags=AUTHORS_EST | CN, rm=lambda: torch.zeros(2 * C)[::2]),
                 call(flags=AUTHORS_EST | CN, speed=torch.tensor([1.5]))):
        native, python = _eager_routes(monkeypatch, make)
        assert len(python) == 2 and isinstance(python[0], Exception), python
        assert type(native[0]) is type(python[0]) and str(native[0]) == str(python[0]), (native[0], python[0])
        fresh = make()
        unchanged = [t for t in (fresh[0], *fresh[2], *fresh[3][:3]) if t is not None]
        for route in (native, python):
            assert len(route[1]) == len(unchanged)
            for a, b in zip(route[1], unchanged):
                assert torch.equal(a.detach(), b.detach()), (route[0], "changed a tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_native_eager_weight_standardization_gives_the_python_routes_bits(dtype, gen, monkeypatch):
    """A WS layer's eager route by the native op (`_eager_weight_standardization`) and by the Python
    autograd.Function: the standardized weight and its gradient, bit for bit, in every layout and convention; the
    same errors for bad weights."""
    need_native()
    w0 = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64).to(dtype) * 0.2 + 0.05
    g0 = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64).to(dtype) + 0.3

    def both(w, grad, eps, flags):
        out = []
        for native in (True, False):
            monkeypatch.setattr(_ops, "NATIVE", native)
            wr = w.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            try:
                y = _ops.eager_weight_standardization(wr, eps, flags)
                y.backward(grad)
                out.append((y, wr.grad))
            except Exception as error:  # noqa: BLE001 - compared below
                out.append(error)
        return out
    for layout, flags in itertools.product(("contiguous", "channels_last", "permuted"),
                                           (0, _ext.BCN_WS_UNBIASED, _ext.BCN_WS_UNBIASED | _ext.BCN_WS_EPS_IN_SQRT)):
        _same(*both(_layout(w0, layout), _layout(g0, "channels_last"), 1e-5, flags), f"{layout}, flags {flags}")
    for w, eps, flags in ((w0.half(), 1e-5, 1), (w0, -1.0, 1), (w0[:, :1, :1, :1], 1e-5, 1), (w0, 1e-5, 1 << 12)):
        native, python = both(w, torch.ones_like(w), eps, flags)
        assert isinstance(python, Exception), (w.shape, eps, flags)
        assert type(native) is type(python) and str(native) == str(python), (native, python)


def test_native_kernels_run_on_torch_threads_with_the_calling_threads_bits(gen, kernel_calls):
    """By default the native kernels run on torch's OpenMP threads (its GOMP_parallel, as the Python kernels):
    every call under torch's thread count, parallel regions there, and the bits of the calling thread alone."""
    need_native()
    import bcnswift.torch as bt
    from bcnswift.torch import _threads
    if not sys.platform.startswith("linux"):
        pytest.skip("tested where CI runs: Linux, whose torch wheels run on OpenMP")
    assert _threads._find_openmp_team(), "torch runs on OpenMP here (torch.__config__.parallel_info())"
    saved, saved_torch = bt.get_num_threads(), torch.get_num_threads()
    torch.set_num_threads(2)
    x = _input(gen, (8, 64, 16, 16), torch.float32, "channels_last")
    dy = _input(gen, (8, 64, 16, 16), torch.float32, "channels_last")
    f = TORCH_BN | CN | TR
    try:
        runs = []
        for threads in (None, 1):
            bt.set_num_threads(threads)
            kernel_calls.clear()
            y, ctx, m = _ops.normalize_batch(x, None, None, None, None, f, 16, 1e-5, 1e-5)
            grads = _ops.normalize_backward(dy, x, ctx, f, 16, False, False)
            runs.append((y, m, *grads))
            calls = kernel_calls.calls
            assert calls and all(c.native for c in calls)
            if threads is None:
                assert {(c.threads, c.team) for c in calls} == {(2, "torch")}, calls
                assert kernel_calls.team_regions and set(kernel_calls.team_regions) == {2}
            else:
                assert {(c.threads, c.team) for c in calls} == {(1, "none")} and not kernel_calls.team_regions
        _same(runs[0], runs[1], "torch's threads against the calling thread")
    finally:
        bt.set_num_threads(saved)
        torch.set_num_threads(saved_torch)


def _subprocess(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=TESTS,
                          env={**os.environ, **env})


def test_without_a_compiler_the_python_kernels_serve(tmp_path):
    """A build that fails (here a compiler that always fails, and an empty cache) warns once, and the ops run
    their Python kernels; BCNSWIFT_TORCH_NATIVE=0 does not try, and says nothing."""
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import bcnswift.torch as bt\n"
            "from bcnswift.torch import _ops, _native\n"
            "m = bt.BCNorm(8, 4)\n"
            "y = torch.compile(m, backend='eager', fullgraph=True)(torch.randn(4, 8, 3, 3) + 1)\n"
            "warned = [w for w in caught if 'native' in str(w.message)]\n"
            "print(bt.uses_native_operators(), bool(_native.reason), len(warned), bool(y.isfinite().all()))\n")
    failing = _subprocess(code, CXX="false", BCNSWIFT_CACHE_DIR=str(tmp_path))
    assert failing.returncode == 0, failing.stderr
    assert failing.stdout.split() == ["False", "True", "1", "True"], failing.stdout
    off = _subprocess(code, BCNSWIFT_TORCH_NATIVE="0", BCNSWIFT_CACHE_DIR=str(tmp_path))
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["False", "True", "0", "True"], off.stdout
    assert not list(tmp_path.glob("*.so"))


def test_a_cache_other_users_may_write_is_not_used(tmp_path):
    """A cache directory every user may write (another could have put their code there) is neither built into
    nor loaded from, nor is a kept library every user may write: one warning, and the Python kernels serve."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from bcnswift.torch import _native\n"
            "print(_native.uses_native_operators(), [str(w.message) for w in caught if 'native' in str(w.message)])")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = _subprocess(code, BCNSWIFT_CACHE_DIR=str(shared))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False ") and f"every user may write {shared}" in out.stdout, out.stdout
    assert not list(shared.iterdir()), "built into a directory every user may write"
    # a private directory whose kept library every user may write
    private = tmp_path / "private"
    built = _subprocess(code, BCNSWIFT_CACHE_DIR=str(private))
    assert built.returncode == 0 and built.stdout.startswith("True "), built.stdout + built.stderr
    (library,) = private.glob("*.so")
    library.chmod(0o666)
    out = _subprocess(code, BCNSWIFT_CACHE_DIR=str(private))
    assert out.stdout.startswith("False ") and f"every user may write {library}" in out.stdout, out.stdout
    library.chmod(0o644)
    again = _subprocess(code, BCNSWIFT_CACHE_DIR=str(private))
    assert again.stdout.startswith("True "), again.stdout + again.stderr


def _failing_compiler(tmp_path, pause=0):
    """(a compiler that fails with 'an error of this compiler' after `pause` seconds, appending a line to a
    counter at every run; the code of a process that imports the native operators and prints whether they are in
    use and how often its reason quotes that error)."""
    counter, compiler = tmp_path / "runs", tmp_path / "failing-c++"
    compiler.write_text(f"#!/bin/sh\necho run >> {counter}\nsleep {pause}\necho 'an error of this compiler' >&2\n"
                        "exit 1\n")
    compiler.chmod(0o755)
    code = ("import warnings\nwarnings.simplefilter('ignore')\n"
            "from bcnswift.torch import _native\n"
            "print(_native.uses_native_operators(), _native.reason.count('an error of this compiler'))\n"
            "print(_native.reason)")
    return counter, compiler, code


def test_processes_launched_together_build_once_and_share_a_failure(tmp_path):
    """Processes that start together (an mpiexec launch) wait for one build; when it fails, they fail with its
    words instead of running the compiler again, one after another."""
    # slow enough that all three reach the lock while it builds, however their imports of torch interleave
    counter, compiler, code = _failing_compiler(tmp_path, pause=8)
    env = {**os.environ, "CXX": str(compiler), "BCNSWIFT_CACHE_DIR": str(tmp_path / "cache")}
    launched = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=TESTS, env=env) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in launched]
    assert all(p.returncode == 0 for p in launched), [err for _, err in outputs]
    assert [out.split()[:2] for out, _ in outputs] == [["False", "1"]] * 3, outputs
    assert counter.read_text().split() == ["run"]  # one build for the three


def test_a_failed_build_is_remembered_until_its_record_is_deleted(tmp_path):
    """A build that failed is not run again by the next import (it costs about 20 s): that import warns with the
    same words and names the record to delete; once it is deleted, the next import builds again."""
    counter, compiler, code = _failing_compiler(tmp_path)
    env = {"CXX": str(compiler), "BCNSWIFT_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for attempt in range(3):
        if attempt == 2:
            (record,) = (tmp_path / "cache").glob("*.failed")
            assert str(record) in runs[-1].stdout, runs[-1].stdout
            record.unlink()
        runs.append(_subprocess(code, **env))
        assert runs[-1].returncode == 0, runs[-1].stderr
        assert runs[-1].stdout.split()[:2] == ["False", "1"], runs[-1].stdout
    assert "delete it to try again" not in runs[0].stdout and "delete it to try again" in runs[1].stdout
    assert counter.read_text().split() == ["run", "run"]  # the first import and the one after the deletion


def test_a_compiler_killed_by_a_signal_is_not_remembered(tmp_path):
    """A compiler the out-of-memory killer ended may pass next time: no record, and the next import builds."""
    counter, compiler, code = _failing_compiler(tmp_path)
    compiler.write_text(f"#!/bin/sh\necho run >> {counter}\nkill -9 $$\n")
    env = {"CXX": str(compiler), "BCNSWIFT_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):
        run = _subprocess(code, **env)
        assert run.returncode == 0 and run.stdout.startswith("False ") and "exit -9" in run.stdout, run.stdout
    assert counter.read_text().split() == ["run", "run"] and not list((tmp_path / "cache").glob("*.failed"))


def test_the_library_is_built_once_and_kept(tmp_path):
    """A fresh cache gets the library (one build), and the next process loads it without building again."""
    need_native()
    code = "from bcnswift.torch import _ops, _native; print(_ops.NATIVE, _native.reason)"
    first = _subprocess(code, BCNSWIFT_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0 and first.stdout.split() == ["True", "None"], first.stderr
    built = list(tmp_path.glob("torch-native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat()
    second = _subprocess(code, BCNSWIFT_CACHE_DIR=str(tmp_path))
    assert second.returncode == 0 and second.stdout.split() == ["True", "None"], second.stderr
    again = built[0].stat()  # a build would have replaced the file (os.replace: a new inode)
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert list(tmp_path.glob("torch-native-*.so")) == built
    week_ago = stamp.st_mtime - 7 * 86400  # loading marks a library used, at most once a day, for _prune
    os.utime(built[0], (week_ago, week_ago))
    marked = _subprocess(code, BCNSWIFT_CACHE_DIR=str(tmp_path))
    assert marked.returncode == 0 and marked.stdout.split() == ["True", "None"], marked.stderr
    assert built[0].stat().st_ino == stamp.st_ino and built[0].stat().st_mtime > week_ago + 6 * 86400
    built[0].write_bytes(b"cut short")  # a kept library that does not load is built again, once
    # even when written a moment before the import (its modification time after the build's start: a rebuild was
    # taken for a build made meanwhile by another process, and skipped: it failed one CI run here)
    soon = time.time() + 30
    os.utime(built[0], (soon, soon))
    third = _subprocess(code, BCNSWIFT_CACHE_DIR=str(tmp_path))
    assert third.returncode == 0 and third.stdout.split() == ["True", "None"], third.stderr
    assert built[0].stat().st_size > 1000


def test_a_build_removes_the_libraries_no_import_has_loaded_for_30_days(tmp_path):
    """Every new torch, compiler or bcnswift builds a library of its own: a build removes those, and their
    locks and failure records, untouched for 30 days; recent ones, the one built and other files stay."""
    keep = tmp_path / "torch-native-2.9.0-aaaaaaaaaaaaaaaa.so"
    names = {"old": ["torch-native-2.1.0-bbbbbbbbbbbbbbbb.so", "torch-native-2.1.0-bbbbbbbbbbbbbbbb.lock",
                     "torch-native-2.2.0-cccccccccccccccc.failed"],
             "recent": ["torch-native-2.8.0-dddddddddddddddd.so", "torch-native-2.8.0-dddddddddddddddd.lock"],
             "own": [keep.name, keep.with_suffix(".lock").name, "torch-native-2.1.0-notes.txt", "other.so"]}
    long_ago = time.time() - 31 * 86400
    for kind, files in names.items():
        for name in files:
            (tmp_path / name).write_bytes(b"x")
            if kind != "recent":  # the kept library's own files are old too: the build keeps them anyway
                os.utime(tmp_path / name, (long_ago, long_ago))
    _native._prune(keep)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(names["recent"] + names["own"]), left


def test_the_python_kernels_pass_the_op_tests():
    """The ops' tests again, on the Python kernels alone (BCNSWIFT_TORCH_NATIVE=0): the fallback of every machine
    without a C++ compiler."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "test_torch_ops.py", "test_torch_compile.py"], capture_output=True, text=True,
                         timeout=900, cwd=TESTS, env={**os.environ, "BCNSWIFT_TORCH_NATIVE": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
