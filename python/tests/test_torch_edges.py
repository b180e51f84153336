"""bcnswift.torch at the edges a PyTorch user meets: calls that raise change no buffer, inputs without values,
degenerate statistics worded alike on both routes, torch.func transforms, an nn.SyncBatchNorm inside BCNorm,
grouped WS ConvTranspose2d, second derivatives through the parameters alone, convert's fidelity to the layers it
replaces, and labml's cumulative average across checkpoints."""
import copy
import re

import pytest

from conftest import require
from test_torch_modules import _state, assert_states_equal, reference_ws_transposed
from test_torch_ops import EAGER_ROUTES, eager_route, gen, rand_input  # noqa: F401 (eager_route, gen are fixtures)

torch = require("torch")
import bcnswift.torch as bt  # noqa: E402
from bcnswift import _ext  # noqa: E402
from bcnswift.torch import _ops, functional  # noqa: E402
from bcnswift.torch import reference as R  # noqa: E402
from bcnswift.torch.modules import torch_batch_norm_stage  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

ROUTES = ["kernels", "composed"]


def _est(C, G):
    m = bt.BCNorm(C, G, estimate=True)
    m.bn.estbn_moving_speed.fill_(0.2)
    return m


def _estbn(C, G):
    m = bt.EstBN(C)
    m.estbn_moving_speed.fill_(0.2)
    return m


#: (name, factory (C, G) -> module, a parameter of it to give a wrong size, its size then)
MODULES = [
    ("BCNorm", lambda C, G: bt.BCNorm(C, G), lambda m: m.weight, (1, 3, 1)),
    ("BCNorm estimate", _est, lambda m: m.weight, (1, 3, 1)),
    ("EstBN", _estbn, lambda m: m.weight, (5,)),
    ("labml BatchChannelNorm", lambda C, G: bt.BatchChannelNorm(C, G), lambda m: m.channel_norm.scale, (3,)),
    ("labml BatchChannelNorm batch", lambda C, G: bt.BatchChannelNorm(C, G, estimate=False),
     lambda m: m.batch_norm.scale, (5,)),
]
MODULE_IDS = [m[0] for m in MODULES]


def _assert_unchanged(m, before, what):
    assert_states_equal(_state(m), before, f"{what}: changed")


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    """The kernels' route, or the composed one (as CUDA, half precision or BCNSWIFT_TORCH_COMPOSED=1 take)."""
    monkeypatch.setattr(functional, "COMPOSED", request.param == "composed")
    return request.param


def _hand_set_buffers(m):
    """m's batch-norm stage with its running statistics replaced by strided views (every other value of a tensor
    twice as long) and its count, if any, by a float tensor: forms torch's batch norms update in place."""
    stage = _bn(m)
    for name, b in list(stage.named_buffers(recurse=False)):
        if b.dim() == 1 and b.numel() > 1:  # the running statistics (EstBN's moving speed holds one value)
            wide = torch.full((2 * b.numel(),), float("nan"), dtype=b.dtype)
            wide[::2] = b
            setattr(stage, name, wide[::2])
        elif name == "num_batches_tracked":
            setattr(stage, name, b.to(torch.float64))
    return stage


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES], ids=MODULE_IDS)
def test_running_buffers_set_by_hand_as_strided_views_or_a_float_count_train_on_both_routes(name, make, route,
                                                                                             gen):
    """As torch's batch norms update them in place (the kernels' route refused them: the kernels write dense
    buffers through data pointers, so such buffers take the composed route): the same outputs, gradients and
    buffer values as the module with ordinary buffers, and the hand-set tensors updated where they lie."""
    torch.manual_seed(0)
    plain = make(8, 4).double()
    hand = copy.deepcopy(plain)
    stage = _hand_set_buffers(hand)
    kept = {k: b for k, b in stage.named_buffers(recurse=False)}
    assert any(not b.is_contiguous() for b in kept.values()), "no strided buffer to test"
    initial = {k: b.clone() for k, b in kept.items()}
    for step in range(3):
        x = rand_input(gen, (4, 8, 3, 3))
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [plain(xs[0]), hand(xs[1])]
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-12, atol=1e-12, msg=f"{name}, step {step}: output")
        dy = rand_input(gen, (4, 8, 3, 3))
        for y in ys:
            y.backward(dy)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-12, atol=1e-12, msg=f"step {step}: dx")
        for (k, p), q in zip(plain.named_parameters(), hand.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=f"step {step}: grad {k}")
        for k, b in _bn(plain).named_buffers(recurse=False):
            h = getattr(stage, k)
            assert h is kept[k], f"{k} was replaced, not updated in place"
            torch.testing.assert_close(h.to(b.dtype), b, rtol=1e-12, atol=1e-12, msg=f"step {step}: buffer {k}")
    for k, b in kept.items():
        if b.numel() > 1:  # the running statistics
            assert not torch.equal(b, initial[k]), f"{k}: three training steps did not move it"


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES], ids=MODULE_IDS)
def test_running_statistics_of_another_shape_are_read_flat_on_both_routes(name, make, route, gen):
    """A review: running statistics set by hand as [C, 1] (C values, as `_check_sizes` and the kernels ask) trained
    on the kernels' route, read flat, but the composed route broadcast them against [C] and failed in its last
    copy, after running_mean was written. Both routes read them flat now: the plain module's outputs and
    buffers, in the hand-set shapes."""
    plain = make(8, 4).double()
    hand = copy.deepcopy(plain)
    stage = _bn(hand)
    for k in ("running_mean", "running_var", "exp_mean", "exp_var"):
        if hasattr(stage, k):
            setattr(stage, k, getattr(stage, k).reshape(-1, 1).clone())
    for step in range(3):
        x = rand_input(gen, (4, 8, 3, 3))
        torch.testing.assert_close(hand(x), plain(x), rtol=1e-12, atol=1e-12, msg=f"{name}, step {step}: output")
        for k, b in _bn(plain).named_buffers(recurse=False):
            h = getattr(stage, k)
            assert h.shape == ((8, 1) if b.numel() == 8 else b.shape), f"{k} changed shape to {tuple(h.shape)}"
            torch.testing.assert_close(h.reshape(b.shape), b, rtol=1e-12, atol=1e-12, msg=f"step {step}: {k}")
    hand.eval(), plain.eval()
    x = rand_input(gen, (4, 8, 3, 3))
    torch.testing.assert_close(hand(x), plain(x), rtol=1e-12, atol=1e-12, msg=f"{name}: eval output")


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES], ids=MODULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("statistic", ["mean", "var"])
def test_an_expanded_running_statistic_is_refused_before_any_buffer_changes(name, make, dtype, statistic, route,
                                                                             gen):
    """A review: a running statistic set by hand as an expanded view (stride 0: every value in one place) made
    the composed route fail in its copy into it, after the buffers before it were written (torch's batch norms
    write it, keeping the last channel's number for all). A training forward now refuses it first, on every
    route, saying how to mend it; eval, which only reads it, normalizes with it."""
    m = make(8, 4).to(dtype)
    m(rand_input(gen, (4, 8, 3, 3)).to(dtype))  # buffers away from their initial values
    stage = _bn(m)
    name_in_stage = next(k for k in (f"running_{statistic}", f"exp_{statistic}") if hasattr(stage, k))
    held = getattr(stage, name_in_stage)
    setattr(stage, name_in_stage, held[:1].clone().expand(8))
    before = _state(m)
    # (named as the functional API names the buffers, as the size checks do: exp_mean is labml's running_mean)
    with pytest.raises(ValueError, match=re.escape(f"running_{statistic} (shape (8,), strides (0,)) holds values in "
                                                   f"shared memory")):
        m(rand_input(gen, (4, 8, 3, 3)).to(dtype))
    _assert_unchanged(m, before, f"{name}, {dtype}, {statistic}, on the {route} route")
    m.eval()
    x = rand_input(gen, (4, 8, 3, 3)).to(dtype)
    reference = copy.deepcopy(m)
    setattr(_bn(reference), name_in_stage, getattr(_bn(reference), name_in_stage).contiguous())
    torch.testing.assert_close(m(x), reference(x), rtol=0, atol=0, msg=f"{name}: eval with the expanded buffer")


def test_a_cumulative_average_refuses_a_count_out_of_range_on_both_routes(route, gen):
    """A review: the kernels refuse a negative count (or the largest) for momentum=None, which divides by the
    count it advances; the composed route averaged with a factor of -1/4 (and at -1 divided by zero)."""
    for held in (-5, -1, 2 ** 63 - 1):
        m = bt.BCNorm(4, 2).double()
        m.bn.momentum = None
        m.bn.num_batches_tracked.fill_(held)
        before = _state(m)
        with pytest.raises(ValueError, match=re.escape(f"(0 to 2^63 - 2) for a cumulative average, got {held}")):
            m(rand_input(gen, (3, 4, 2, 2)))
        _assert_unchanged(m, before, f"count {held} on the {route} route")


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES if n != "EstBN"],
                         ids=[n for n in MODULE_IDS if n != "EstBN"])
@pytest.mark.parametrize("hook", ["stage hook", "global hook"])
@pytest.mark.parametrize("fault", ["channel-norm eps 0", "channel-norm weight size", "one value per group"])
def test_a_stage_called_for_its_hooks_changes_no_buffer_when_the_channel_norm_refuses(name, make, hook, fault, route,
                                                                                      gen):
    """A hook on the batch-norm stage, or on every module, makes the parent call the stage's module, which updates
    its running buffers: the channel norm's checks come before that call, so that their refusal leaves the buffers
    as they were, and the hook never runs. (They came after it: the buffers moved, then the call raised.)"""
    groups, shape = (8, (4, 8, 1, 1)) if fault == "one value per group" else (4, (4, 8, 5, 5))
    m = make(8, groups).double()
    m(rand_input(gen, (4, 8, 5, 5)))  # buffers away from their initial values
    if fault == "channel-norm eps 0":
        _set_cn_eps(m, 0.0)
        message = "eps must be a positive finite number, got 0.0"
    elif fault == "channel-norm weight size":
        _set_cn_weight_size(m, 3)
        message = "cn_weight has 3 elements, expected 4"
    else:
        message = "Expected more than 1 value per channel group, got 1 channel"
    calls = []
    if hook == "stage hook":
        handle = _bn(m).register_forward_hook(lambda *_: calls.append(1))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        before = _state(m)
        for training in (True, False):
            m.train(training)
            with pytest.raises(ValueError, match=re.escape(message)):
                m(rand_input(gen, shape))
            _assert_unchanged(m, before, f"{name}, {hook}, {fault}, on the {route} route, training={training}")
    finally:
        handle.remove()
    assert not calls, f"{name}: the stage ran before the channel norm refused the input"


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES], ids=MODULE_IDS)
@pytest.mark.parametrize("missing", ["variance", "mean"])
@pytest.mark.parametrize("batch", [4, 0], ids=["values", "no values"])
def test_a_stage_with_one_running_statistic_of_two_is_refused_by_name(name, make, missing, batch, route, gen):
    """A running mean without a running variance (or the reverse), one set to None by hand: a ValueError that says
    so, on both routes, in training and eval, and nothing changed (the composed route raised an AttributeError,
    the kernels a message about their arguments)."""
    m = make(8, 4).double()
    m(rand_input(gen, (4, 8, 5, 5)))
    stage = _bn(m)
    mean_name, var_name = ("exp_mean", "exp_var") if isinstance(stage, bt.BatchNorm) else ("running_mean",
                                                                                           "running_var")
    setattr(stage, var_name if missing == "variance" else mean_name, None)
    has = "mean" if missing == "variance" else "variance"
    before = _state(m)
    for training in (True, False):
        m.train(training)
        with pytest.raises(ValueError, match=f"the batch-norm stage has a running {has} but no running {missing}"):
            m(rand_input(gen, (batch, 8, 5, 5)))
        _assert_unchanged(m, before, f"{name} on the {route} route, training={training}")


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES], ids=MODULE_IDS)
@pytest.mark.parametrize("statistic", ["mean", "variance"])
@pytest.mark.parametrize("kernels", ["native", "python"], ids=["native ops", "python ops"])
def test_running_statistics_that_require_grad_are_refused_as_torch_refuses_them(name, make, statistic, kernels,
                                                                                 route, gen, monkeypatch):
    """A running buffer given requires_grad: torch's batch norms refuse it, in training and eval ("not
    differentiable with respect to argument 'running_mean'"); so does every route here, before anything runs. (The
    kernels gave it no gradient, silently, and the composed route a real one.) Either route of the kernels' calls:
    the C++ ops', and the Python ones' (without a C++ compiler)."""
    monkeypatch.setattr(_ops, "NATIVE", _ops.NATIVE and kernels == "native")
    m = make(8, 4).double()
    m(rand_input(gen, (4, 8, 5, 5)))
    stage = _bn(m)
    prefix = "exp" if isinstance(stage, bt.BatchNorm) else "running"
    getattr(stage, f"{prefix}_{'mean' if statistic == 'mean' else 'var'}").requires_grad_(True)
    before = _state(m)
    for training in (True, False):
        m.train(training)
        for batch in (4, 0):
            x = rand_input(gen, (batch, 8, 5, 5)).requires_grad_()
            with pytest.raises(RuntimeError, match=f"the running {statistic} requires grad: running statistics are "
                                                   f"held constant"):
                m(x)
            _assert_unchanged(m, before, f"{name} on the {route} route ({kernels}), training={training}")
    torch_bn = nn.BatchNorm2d(8).double()
    getattr(torch_bn, f"running_{'mean' if statistic == 'mean' else 'var'}").requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_"):
        torch_bn(rand_input(gen, (4, 8, 5, 5)))  # the behaviour matched, should torch's change


def test_a_variance_around_the_running_mean_needs_estimates_on_both_routes(route, gen):
    """A review: the kernels refuse BCN_VARIANCE_AROUND_RUNNING_MEAN without BCN_ESTIMATED (BatchNormOptions), and
    the composed route ignored it; both refuse it now, changing nothing."""
    C = 4
    stage = functional.BatchNormStage(
        _ext.BCN_BATCH_NORM | _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN, 1e-5, 0.1, None,
        torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64),
        torch.ones(C, dtype=torch.float64), torch.tensor(0), True, True)
    for training in (True, False):
        with pytest.raises(ValueError, match="applies to estimated statistics only"):
            functional.batch_channel_norm(rand_input(gen, (3, C, 2, 2)), stage._replace(training=training), None)
        assert torch.equal(stage.running_mean, torch.zeros(C)) and int(stage.num_batches_tracked) == 0


@pytest.mark.parametrize("name,make,param,size", MODULES, ids=MODULE_IDS)
def test_a_call_that_raises_changes_no_buffer(name, make, param, size, route, gen):
    m = make(8, 4).double()
    m(rand_input(gen, (4, 8, 5, 5)))  # buffers away from their initial values
    param(m).data = torch.ones(size, dtype=torch.float64)
    before = _state(m)
    with pytest.raises(ValueError, match="elements, expected"):
        m(rand_input(gen, (4, 8, 5, 5)))
    _assert_unchanged(m, before, f"{name} on the {route} route")


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES], ids=MODULE_IDS)
@pytest.mark.parametrize("way", EAGER_ROUTES + ["composed"])
def test_a_training_call_on_an_inference_tensor_raises_before_any_buffer_moves(name, make, way, gen, monkeypatch):
    """A review: on the kernels' routes a training forward of an input made under torch.inference_mode() saved it
    for the backward only after the update, where torch refused it ("Inference tensors cannot be saved for
    backward"), leaving the running buffers moved (as torch's batch norms leave theirs); the composed route
    trained on. Every route refuses it first now, changing nothing. With no graph to record (no_grad, or no
    parameter that requires grad) the call trains, as before."""
    monkeypatch.setattr(_ops, "NATIVE", way == "native")
    monkeypatch.setattr(functional, "COMPOSED", way == "composed")
    m = make(8, 4).double()
    m(rand_input(gen, (4, 8, 5, 5)))  # buffers away from their initial values
    with torch.inference_mode():
        x = rand_input(gen, (4, 8, 5, 5))
    before = _state(m)
    with pytest.raises(RuntimeError, match=r"the input is an inference tensor \(made under torch.inference_mode"):
        m(x)
    _assert_unchanged(m, before, f"{name} on the {way} route")
    for frozen in (False, True):
        twin = copy.deepcopy(m)
        if frozen:
            twin.requires_grad_(False)
            y = twin(x)
        else:
            with torch.no_grad():
                y = twin(x)
        assert torch.isfinite(y).all() and not y.requires_grad
        assert any(not torch.equal(v, before[k]) for k, v in _state(twin).items()), f"{name}: did not train"


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES] + [("ChannelNorm", bt.ChannelNorm)],
                         ids=MODULE_IDS + ["ChannelNorm"])
def test_a_tensor_subclass_with_a_dispatch_of_its_own_takes_torch_operations(name, make, eager_route, gen):
    """A review: tensors whose class has a __torch_dispatch__ of its own (DTensor, torchao's quantized weights,
    torch's TwoTensor) reached the kernels, which read memory below the dispatcher: torch raised "data is not
    allocated yet" (the Python route: ".numpy() is not supported for tensor subclasses"), where nn.BatchNorm2d
    and nn.GroupNorm take them. They take the composed route now: each of a TwoTensor's two tensors comes out as
    the module gives it alone, and so does a WS layer whose weight is one. (The running buffers, plain tensors,
    take what the subclass makes of their update, as nn.BatchNorm2d's do.)"""
    from torch.testing._internal.two_tensor import TwoTensor
    a, b = rand_input(gen, (4, 8, 5, 5)), rand_input(gen, (4, 8, 5, 5)) * 3 - 2
    ours, alone = make(8, 4).double(), make(8, 4).double()
    alone.load_state_dict(ours.state_dict())
    y = ours(TwoTensor(a, b))
    assert type(y) is TwoTensor
    assert (y.a - alone(a)).abs().max() <= 1e-12 * y.a.abs().max(), f"{name} on the {eager_route} route"
    linear, plain = bt.Linear(8, 4).double(), bt.Linear(8, 4).double()
    plain.load_state_dict(linear.state_dict())
    w = linear.weight.detach()
    linear.weight = nn.Parameter(TwoTensor(w.clone(), w * 2))
    v = rand_input(gen, (3, 8))
    out = linear(v)
    assert type(out) is TwoTensor and (out.a - plain(v)).abs().max() <= 1e-12 * out.a.abs().max()


def _set_cn_weight_size(m, size):
    if isinstance(m, bt.BatchChannelNorm):
        m.channel_norm.scale.data = torch.ones(size, dtype=torch.float64)
    else:
        m.weight.data = torch.ones(1, size, 1, dtype=torch.float64)


def _set_cn_eps(m, value):
    if isinstance(m, bt.BatchChannelNorm):
        m.channel_norm.eps = value
    else:
        m.eps = value


def _bn(m):
    return m.batch_norm if isinstance(m, bt.BatchChannelNorm) else m.bn if isinstance(m, bt.BCNorm) else m


def _set_bn_eps(m, value):
    _bn(m).eps = value


def _set_momentum(m, value):
    _bn(m).momentum = value


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES], ids=MODULE_IDS)
@pytest.mark.parametrize("setting,value,message", [
    (_set_cn_eps, 0.0, "eps must be a positive finite number, got 0.0"),
    (_set_bn_eps, float("nan"), "eps must be a positive finite number, got nan"),
    (_set_bn_eps, -1e-5, "eps must be a positive finite number, got -1e-05"),
    (_set_momentum, 1.5, r"momentum must be in \[0, 1\](?: or None)?, got 1.5"),
    (_set_cn_eps, "a", "eps must be a number, got str 'a'"),
    (_set_bn_eps, None, "eps must be a number, got NoneType None"),
], ids=["channel-norm eps 0", "batch-norm eps nan", "batch-norm eps negative", "momentum 1.5", "channel-norm eps str",
        "batch-norm eps None"])
@pytest.mark.parametrize("batch", [4, 0], ids=["values", "no values"])
def test_a_bad_eps_or_momentum_raises_alike_on_both_routes_and_changes_no_buffer(name, make, setting, value,
                                                                                  message, batch, route, gen):
    """(An input without values computes nothing, but is checked as one with values: it skipped these checks.)"""
    m = make(8, 4).double()
    m(rand_input(gen, (4, 8, 5, 5)))
    if setting is _set_cn_eps and name == "EstBN":
        setting = _set_bn_eps  # no channel norm
    if setting is _set_momentum and isinstance(_bn(m), bt.EstBN):
        m = _bn(m) if name == "EstBN" else m
        _bn(m).estbn_moving_speed.fill_(value)  # the authors' EstBN takes its rate from this buffer
        message = r"estbn_moving_speed must be in \[0, 1\], got 1.5"  # named: the user set no momentum
    else:
        setting(m, value)
    before = _state(m)
    # momentum serves the buffers' update alone: eval refuses only a bad eps
    for training in (True, False) if setting is not _set_momentum else (True,):
        m.train(training)
        with pytest.raises(TypeError if "must be a number" in message else ValueError, match=message):
            m(rand_input(gen, (batch, 8, 5, 5)))
        _assert_unchanged(m, before, f"{name} on the {route} route, training={training}")
    if setting is _set_momentum:  # the rate of an update alone: eval, which updates nothing, runs
        assert m.eval()(rand_input(gen, (4, 8, 5, 5))).isfinite().all()
        _assert_unchanged(m, before, f"{name} on the {route} route in eval")


@pytest.mark.parametrize("groups,exc,message", [
    (4.0, TypeError, "num_groups must be an int, got float 4.0"), (True, TypeError, "num_groups must be an int"),
    (0, ValueError, "num_groups must be positive, got 0"), (3, ValueError, r"channels \(8\) must be divisible by "
                                                                      r"groups \(3\)")],
    ids=["float", "bool", "zero", "not a divisor"])
@pytest.mark.parametrize("batch", [4, 0], ids=["values", "no values"])
def test_a_hand_set_group_count_is_refused_alike_on_both_routes(groups, exc, message, batch, route, gen):
    """(The kernels' op schema raised a RuntimeError about its argument for a float; the composed route worded
    the divisibility otherwise; an input without values skipped the type's check.)"""
    m = bt.BCNorm(8, 4).double()
    m(rand_input(gen, (4, 8, 3, 3)))
    m.num_groups = groups
    if groups == 3:  # parameters that fit, so that the divisibility is what fails
        m.weight, m.bias = (nn.Parameter(torch.ones(1, 3, 1, dtype=torch.float64)) for _ in range(2))
    before = _state(m)
    with pytest.raises(exc, match=message):
        m(rand_input(gen, (batch, 8, 3, 3)))
    _assert_unchanged(m, before, route)


@pytest.mark.parametrize("name,make", [(n, f) for n, f, _, _ in MODULES] + [
    ("ChannelNorm", lambda C, G: bt.ChannelNorm(C, G))], ids=MODULE_IDS + ["ChannelNorm"])
@pytest.mark.parametrize("shape,layout", [((0, 8, 4, 4), "contiguous"), ((0, 8, 4, 4), "channels_last"),
                                          ((3, 8, 0, 4), "channels_last"), ((0, 8), "contiguous")],
                         ids=["no samples", "no samples channels_last", "no pixels channels_last", "rows"])
def test_an_input_without_values_gives_an_empty_output_and_changes_nothing(name, make, shape, layout, route, gen):
    """...but for a BCNorm on an nn.BatchNorm2d in training, whose count advances as that nn.BatchNorm2d's own
    forward advances it (run beside it on the same input)."""
    m = make(8, 4).double()
    m(rand_input(gen, (4, 8, 5, 5)))
    for training in (True, False):
        m.train(training)
        before = _state(m)
        x = rand_input(gen, shape, layout=layout).requires_grad_()
        if isinstance(_bn(m), nn.BatchNorm2d):  # torch's batch norm of x's rank beside it (BatchNorm1d for rows)
            torch_bn = (nn.BatchNorm1d if x.dim() == 2 else nn.BatchNorm2d)(8).double().train(training)
            torch_bn.load_state_dict(_bn(m).state_dict())
            torch_bn(x.detach())
            count = before["bn.num_batches_tracked"]
            assert torch_bn.num_batches_tracked == count + training, "torch counts a training call of no values"
            before["bn.num_batches_tracked"] = torch_bn.num_batches_tracked.clone()
        y = m(x)
        assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
        _assert_unchanged(m, before, f"{name}, training={training}")
        y.sum().backward()
        assert x.grad.shape == x.shape
        for k, p in m.named_parameters():
            assert p.grad is not None and not p.grad.any(), f"{name}: {k} gets a zero gradient"
        m.zero_grad()


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
@pytest.mark.parametrize("shape", [(4, 8), (4, 8, 5), (2, 8, 3, 3, 3)], ids=["2-D", "3-D", "5-D"])
def test_a_bcnorm_takes_any_rank_but_a_hooked_torch_batch_norm_takes_its_own(shape, hooked, route, gen):
    """bcnswift's BCNorm fuses its nn.BatchNorm2d and takes [B, C, *] of any rank (so that `convert` keeps a
    GroupNorm's ranks): the authors' module computes the same with a BatchNorm1d or 3d in its place. A hook on bn
    makes BCNorm call it, as the documents' module does, and then the module's own rank check decides (torch's
    ValueError, nothing changed), as documented."""
    m = bt.BCNorm(8, 4).double()
    calls = []
    if hooked:
        m.bn.register_forward_hook(lambda *_: calls.append(1))
        before = _state(m)
        with pytest.raises(ValueError, match=f"expected 4D input \\(got {len(shape)}D input\\)"):
            m(rand_input(gen, shape))
        _assert_unchanged(m, before, f"{route}, hooked")
        assert not calls
    # the authors' module (transcribed) with a batch norm of x's rank in its place, the same state
    reference = R.BCNorm(8, 4, m.eps).double()
    reference.bn = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm3d)(8).double()
    if hooked:  # a batch norm that takes x's rank, hooked
        m.bn = copy.deepcopy(reference.bn)
        m.bn.register_forward_hook(lambda *_: calls.append(1))
    x = rand_input(gen, shape)
    torch.testing.assert_close(m(x), reference(x), rtol=1e-10, atol=1e-12)
    assert len(calls) == hooked
    assert_states_equal(_state(m), _state(reference), f"{route}: buffers", rtol=1e-12, atol=1e-12)


def test_convert_keeps_a_group_norms_ranks(route, gen):
    """A GroupNorm after a Conv1d or a Linear becomes a BCNorm on an nn.BatchNorm2d (estimate=False), which takes
    the GroupNorm's [B, C, L] and [B, C] input: the authors' module with a BatchNorm1d of the same state computes
    the same."""
    for layer, shape in ((nn.Conv1d(4, 8, 3), (2, 4, 10)), (nn.Linear(4, 8), (3, 4))):
        model = bt.convert(nn.Sequential(layer, nn.GroupNorm(2, 8)).double(), num_groups=2, estimate=False,
                           weight_standardization=False)
        norm = model[1]
        reference = R.BCNorm(8, 2, norm.eps).double()
        reference.bn = nn.BatchNorm1d(8, eps=norm.bn.eps).double()
        reference.load_state_dict(norm.state_dict())
        x = rand_input(gen, shape)
        torch.testing.assert_close(model(x), reference(model[0](x)), rtol=1e-10, atol=1e-12)
        assert_states_equal(_state(norm), _state(reference), f"{route}: {type(layer).__name__}", rtol=1e-12,
                            atol=1e-12)


@pytest.mark.parametrize("make,shape,message", [
    (lambda: bt.BCNorm(8, 4), (1, 8, 1, 1), "more than 1 value per channel when training"),
    (lambda: bt.BatchChannelNorm(8, 4, estimate=False), (1, 8), "more than 1 value per channel when training"),
    (lambda: bt.ChannelNorm(8, 8), (2, 8, 1), "more than 1 value per channel group"),
], ids=["BCNorm one value", "labml rows of one sample", "ChannelNorm groups of one value"])
def test_degenerate_statistics_raise_alike_on_both_routes(make, shape, message, route, gen):
    m = make().double()
    before = _state(m)
    with pytest.raises(ValueError, match=message):
        m(rand_input(gen, shape))
    _assert_unchanged(m, before, route)


def _trained(make, gen):
    m = make().double()
    m(rand_input(gen, (4, 8, 5, 5)))
    return m


def _batch_statistics_only():
    m = bt.BCNorm(8, 4)
    m.bn = nn.BatchNorm2d(8, track_running_stats=False)  # training without a buffer to update
    return m


def test_torch_func_grad_and_vmap_run_the_same_math(gen):
    """torch.func's wrapped tensors take the composed route; their gradients and per-sample results are those of
    the kernels' route without a transform (float64). A training forward that updates running buffers is
    refused under grad, as torch's own batch norm is."""
    tol = {"rtol": 1e-10, "atol": 1e-12}
    for make in (lambda: bt.BCNorm(8, 4), lambda: bt.BCNorm(8, 4, estimate=True), lambda: bt.BatchChannelNorm(8, 4),
                 _batch_statistics_only):
        m = _trained(make, gen)
        x = rand_input(gen, (3, 8, 4, 5))
        updates = any(True for _ in m.buffers()) and make is not _batch_statistics_only
        for training in (False, True):
            m.train(training)
            if training and updates:
                with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
                    grad(lambda x: m(x).pow(2).sum())(x)
                continue
            transformed = grad(lambda x: m(x).pow(2).sum())(x)
            xr = x.clone().requires_grad_()
            m(xr).pow(2).sum().backward()
            torch.testing.assert_close(transformed, xr.grad, **tol, msg=f"{m}: grad, training={training}")
            m.zero_grad()
        m.eval()
        per_sample = vmap(m)(x.unsqueeze(1))
        torch.testing.assert_close(per_sample.squeeze(1), torch.cat([m(x[i:i + 1]) for i in range(3)]), **tol)
        params = {k: v.detach() for k, v in m.named_parameters()}
        sample_grads = vmap(grad(lambda p, xi: functional_call(m, p, (xi[None],)).pow(2).sum()),
                            in_dims=(None, 0))(params, x)
        for i in range(3):
            m.zero_grad()
            m(x[i:i + 1]).pow(2).sum().backward()
            for k, p in m.named_parameters():
                torch.testing.assert_close(sample_grads[k][i], p.grad, **tol, msg=f"sample {i}: {k}")
    conv = bt.Conv2d(8, 4, 3).double()
    x = rand_input(gen, (2, 8, 5, 5))
    transformed = grad(lambda w: functional_call(conv, {"weight": w, "bias": conv.bias}, (x,)).sum())(conv.weight)
    conv(x).sum().backward()
    torch.testing.assert_close(transformed, conv.weight.grad, **tol)


def assert_batched_gradients_as_alone(m, x, gen, **tol):
    """The gradients of m(x) with respect to x and every parameter of m, for three output gradients at once
    (autograd.grad(..., is_grads_batched=True)), each as computed alone, within `tol`."""
    inputs = [x, *m.parameters()]
    y = m(x)
    v = torch.randn((3, *y.shape), generator=gen, dtype=y.dtype) + 0.5
    batched = torch.autograd.grad(y, inputs, v, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        alone = torch.autograd.grad(y, inputs, v[i], retain_graph=True)
        for what, b, a in zip(["input"] + [k for k, _ in m.named_parameters()], batched, alone):
            assert b.shape == (3, *a.shape), (what, b.shape)
            torch.testing.assert_close(b[i], a, **tol, msg=f"{what}, gradient {i}")


#: (name, module factory, input shape) for the batched backward: each eager route's autograd Function
BATCHED_BACKWARD = [
    ("BCNorm", lambda: bt.BCNorm(8, 4), (3, 8, 4, 5)),
    ("BCNorm estimate", lambda: _est(8, 4), (3, 8, 4, 5)),
    ("EstBN", lambda: _estbn(8, 4), (3, 8, 4, 5)),
    ("labml BatchChannelNorm", lambda: bt.BatchChannelNorm(8, 4), (3, 8, 4, 5)),
    ("ChannelNorm rows", lambda: bt.ChannelNorm(8, 4), (3, 8)),
    ("WS Conv2d", lambda: bt.Conv2d(8, 4, 3), (3, 8, 5, 5)),
    ("WS Linear", lambda: bt.Linear(6, 4), (3, 6)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("name,make,shape", BATCHED_BACKWARD, ids=[b[0] for b in BATCHED_BACKWARD])
def test_a_batched_backward_gives_each_gradient_as_computed_alone(name, make, shape, training, layout, eager_route,
                                                                   gen):
    """autograd.grad(..., is_grads_batched=True) and jacobian(..., vectorize=True) run the backward under vmap,
    whose batched output gradients hold no memory for the kernels: both eager routes raised "Cannot access data
    pointer of Tensor that doesn't have storage". Each gradient of the batch, of the input and of every parameter,
    is now the one computed alone, bit for bit (the same kernel calls, one per gradient)."""
    m = make().double().train(training)
    x = rand_input(gen, shape, layout=layout if len(shape) == 4 else "contiguous").requires_grad_()
    assert_batched_gradients_as_alone(m, x, gen, rtol=0, atol=0)
    x1 = x.detach()[:2]
    m.eval()  # (a training jacobian would move the estimates between its two forwards)
    vectorized = torch.autograd.functional.jacobian(m, x1, vectorize=True)
    torch.testing.assert_close(vectorized, torch.autograd.functional.jacobian(m, x1), rtol=0, atol=0)


def test_a_batched_backward_of_a_composed_route_layer_matches_the_kernels(gen, monkeypatch):
    """The composed route (CUDA, half precision, BCNSWIFT_TORCH_COMPOSED=1) is torch's own math under vmap: its
    batched gradients are the kernels' to rounding."""
    m = _est(8, 4).double()
    x = rand_input(gen, (3, 8, 4, 5)).requires_grad_()
    v = torch.randn((2, 3, 8, 4, 5), generator=gen, dtype=torch.float64) + 0.5
    results = []
    for composed in (False, True):
        monkeypatch.setattr(functional, "COMPOSED", composed)
        k = copy.deepcopy(m)
        results.append(torch.autograd.grad(k(x), [x, *k.parameters()], v, is_grads_batched=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _untracked_estimate(make):
    """`make()`'s estimating stage with track_running_stats turned off: no estimates to move or to use."""
    m = make().double()
    (m.batch_norm if hasattr(m, "batch_norm") else m).track_running_stats = False
    return m


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("name,make", [
    ("EstimatedBatchNorm", lambda: _untracked_estimate(lambda: bt.EstimatedBatchNorm(6))),
    ("labml BatchChannelNorm", lambda: _untracked_estimate(lambda: bt.BatchChannelNorm(6, 3, estimate=True))),
    ("stage without buffers", None)])
def test_an_estimating_stage_without_estimates_normalizes_with_the_batch_on_every_route(name, make, training, gen,
                                                                                        monkeypatch):
    """An estimating stage with track_running_stats off (or without running buffers) has no estimates to move or
    to use: like the composed route, the kernels now normalize with the batch's statistics (told to estimate, they
    normalized with a blend of the buffers toward the batch, which they then did not write), and change no
    buffer. Outputs and gradients agree with the composed route and with the batch's mean and biased variance."""
    x = rand_input(gen, (4, 6, 3, 3)).requires_grad_()
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64) + 0.5
    mean, var = x.detach().mean((0, 2, 3), keepdim=True), x.detach().var((0, 2, 3), unbiased=False, keepdim=True)
    results = []
    for composed in (False, True):
        monkeypatch.setattr(functional, "COMPOSED", composed)
        if make is None:
            stage = functional.BatchNormStage(_ext.BCN_BATCH_NORM | _ext.BCN_ESTIMATED, 1e-5, 0.1, None, None, None,
                                              None, None, None, training, True)

            def call(t):
                return bt.batch_channel_norm(t, stage, None)
            before = {}
        else:
            m = make().train(training)
            call, before = m, _state(m)
        xc = x.detach().clone().requires_grad_()
        y = call(xc)
        y.backward(dy)
        results.append((y.detach(), xc.grad))
        if make is not None:
            assert_states_equal(_state(m), before, f"{name}, composed={composed}: a buffer changed")
    (y, dx), (yc, dxc) = results
    torch.testing.assert_close(y, yc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dxc, rtol=1e-10, atol=1e-12)
    if name != "labml BatchChannelNorm":  # (its channel norm follows)
        torch.testing.assert_close(y, (x.detach() - mean) / (var + 1e-5).sqrt(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flags,count,message", [
    (_ext.BCN_UNBIASED_RUNNING_VAR, [0], "flags select neither a batch-norm nor a channel-norm stage"),
    (_ext.BCN_BATCH_NORM | (1 << 12), [0], "unknown flag bits 0x1000"),
    (-1, [0], "flags must be a combination of bcnswift's flags, got -1"),
    (_ext.BCN_BATCH_NORM, [1, 2], "num_batches_tracked has 2 elements, expected 1")],
    ids=["no stage", "unknown bit", "negative", "two counts"])
def test_a_hand_built_stage_the_kernels_refuse_is_refused_alike_on_the_composed_route(flags, count, message, route,
                                                                                      gen):
    """The composed route (half precision, other devices, BCNSWIFT_TORCH_COMPOSED=1) read only the flag bits it
    knows: a stage without the batch-norm bit skipped the batch norm yet moved its buffers, and an unknown bit ran;
    a count of two values failed in torch's words. Both routes now refuse them alike, changing nothing."""
    x = rand_input(gen, (4, 6, 3, 3))
    buffers = (torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64), torch.tensor(count))
    kept = [b.clone() for b in buffers]
    stage = functional.BatchNormStage(flags, 1e-5, None if len(count) > 1 else 0.1, None, None, None, *buffers, True,
                                      True)
    with pytest.raises(ValueError, match=re.escape(message)):
        bt.batch_channel_norm(x, stage, None)
    assert all(torch.equal(b, k) for b, k in zip(buffers, kept)), route


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_a_batch_norm_without_a_count_updates_as_torch_s(momentum, route, gen):
    """BCNorm's bn with num_batches_tracked None (torch's batch norms allow it): with a momentum the update runs
    without counting; with momentum None torch's factor is 0, so the running statistics stay. The composed route
    raised TypeError on None + 1, and the kernels averaged with a factor of 1 (a scratch count from 0)."""
    ours, traced, ref = bt.BCNorm(8, 4).double(), bt.BCNorm(8, 4).double(), R.BCNorm(8, 4, 1e-5).double()
    ref.load_state_dict(ours.state_dict())
    for m in (ours, traced, ref):
        m.bn.num_batches_tracked, m.bn.momentum = None, momentum
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)  # the traced ops' update too
    for step in range(3):
        x = rand_input(gen, (4, 8, 3, 3))
        expected = ref(x)
        for m, y in ((ours, ours(x)), (traced, compiled(x))):
            torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12, msg=f"{route}: step {step}")
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-12, atol=1e-14, msg=f"{route}: {k}")
    assert ours.bn.num_batches_tracked is None and traced.bn.num_batches_tracked is None
    if momentum is None:
        assert (ours.bn.running_mean == 0).all() and (ours.bn.running_var == 1).all()


def test_vmap_in_training_names_the_running_statistics(gen):
    """vmap over a training forward that would update unbatched running buffers is refused before anything runs,
    with advice (torch's own in-place error asked for a bug report); the authors' BCNorm then takes torch's
    replace_all_batch_norm_modules_, as a torch batch norm does, and computes each sample alone."""
    from torch.func import replace_all_batch_norm_modules_
    x = rand_input(gen, (3, 2, 8, 4, 5))
    for make in (lambda: bt.BCNorm(8, 4), lambda: bt.BCNorm(8, 4, estimate=True), lambda: bt.BatchChannelNorm(8, 4),
                 lambda: bt.EstBN(8)):
        m = _trained(make, gen)
        before = _state(m)
        with pytest.raises(RuntimeError, match="under torch.func.vmap the input is batched"):
            vmap(m)(x)
        with pytest.raises(RuntimeError, match="under torch.func.vmap the input is batched"):
            vmap(grad(lambda xi: m(xi).pow(2).sum()))(x)
        _assert_unchanged(m, before, f"{m}: refused under vmap")
    m = _trained(lambda: bt.BCNorm(8, 4), gen)
    replace_all_batch_norm_modules_(m)
    torch.testing.assert_close(vmap(m)(x), torch.stack([m(xi) for xi in x]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: bt.BCNorm(8, 4, estimate=True), lambda: bt.EstBN(8)],
                         ids=["BCNorm estimate", "EstBN"])
def test_vmap_over_stacked_estimating_modules_trains_each_with_its_own_moving_speed(make, gen):
    """An ensemble (torch.func.stack_module_state) under vmap, in training: each model's moving speed is its own,
    so none is one number to read; each is checked (torch's message about .item() under vmap came instead), and
    each model's output and updated buffers are those it gets alone. A speed out of range in one model is
    refused before any model's buffers change."""
    from torch.func import stack_module_state
    models = [_trained(make, gen).train() for _ in range(3)]
    for m, speed in zip(models, (0.1, 0.3, 0.7)):
        _bn(m).estbn_moving_speed.fill_(speed)
    alone = copy.deepcopy(models)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = rand_input(gen, (3, 4, 8, 3, 3))
    y = vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,)))(params, buffers, x)
    for i, m in enumerate(alone):
        torch.testing.assert_close(y[i], m(x[i]), rtol=1e-10, atol=1e-12, msg=f"model {i}")
        for k, v in m.named_buffers():
            torch.testing.assert_close(buffers[k][i], v, rtol=1e-12, atol=1e-14, msg=f"model {i}: {k}")
    speed = next(k for k in buffers if k.endswith("estbn_moving_speed"))
    buffers[speed][1] = 1.5
    before = {k: v.clone() for k, v in buffers.items()}
    with pytest.raises(ValueError, match=re.escape("estbn_moving_speed must be in [0, 1], got 1.5")):
        vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,)))(params, buffers, x)
    for k, v in buffers.items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused call"


@pytest.mark.parametrize("make", [lambda: _estbn(8, 4), lambda: _est(8, 4)], ids=["EstBN", "BCNorm estimate"])
def test_an_estbn_without_its_moving_speed_refuses_to_train_and_evaluates(make, route, gen):
    """A review: `estbn_moving_speed = None` made a training EstBN update at rate 0, silently freezing its
    estimates (the authors' code fails on it). Training now refuses it by name, changing nothing; eval, which
    does not read it, runs."""
    m = make().double()
    m(rand_input(gen, (4, 8, 3, 3)))
    _bn(m).estbn_moving_speed = None
    before = _state(m)
    with pytest.raises(ValueError, match=re.escape("estbn_moving_speed is None: a training EstBN moves")):
        m(rand_input(gen, (4, 8, 3, 3)))
    _assert_unchanged(m, before, f"on the {route} route")
    assert m.eval()(rand_input(gen, (4, 8, 3, 3))).isfinite().all()
    _assert_unchanged(m, before, f"eval on the {route} route")


def _jacobian_times(f, x, v):
    """J(f)(x) v by reverse mode (the kernels' backward), one output value at a time."""
    J = torch.autograd.functional.jacobian(f, x)
    return (J.reshape(x.numel(), x.numel()) @ v.reshape(-1)).reshape(x.shape)


# torch's forward_ad.make_dual loads its jvp decompositions through torch.jit.script, which warns of its deprecation
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("make", [lambda: bt.BCNorm(4, 2), lambda: _est(4, 2), lambda: bt.BatchChannelNorm(4, 2),
                                  lambda: bt.ChannelNorm(4, 2)],
                         ids=["BCNorm", "BCNorm estimate", "labml", "ChannelNorm"])
def test_forward_mode_ad_gives_the_jacobians_product(make, gen):
    """Dual tensors (torch.autograd.forward_ad) take the composed route, whose torch operations carry tangents;
    the tangent is J v from the kernels' backward (float64), in training and eval, and no buffer turns dual."""
    forward_ad = torch.autograd.forward_ad
    for training in (True, False):
        m = make().double().train(training)
        reference = copy.deepcopy(m)
        x, v = rand_input(gen, (2, 4, 3, 3)), torch.randn((2, 4, 3, 3), generator=gen, dtype=torch.float64)
        with forward_ad.dual_level():
            tangent = forward_ad.unpack_dual(m(forward_ad.make_dual(x, v))).tangent
            assert all(forward_ad.unpack_dual(b).tangent is None for b in m.buffers())
        torch.testing.assert_close(tangent, _jacobian_times(reference, x, v), rtol=1e-10, atol=1e-12,
                                   msg=f"training={training}")
        assert_states_equal(_state(m), _state(reference), f"training={training}: buffers", rtol=1e-12, atol=1e-12)
    conv = bt.Conv2d(3, 4, 3).double()
    x, v = rand_input(gen, (2, 3, 5, 5)), torch.randn((2, 3, 5, 5), generator=gen, dtype=torch.float64)
    w_tangent = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
    with forward_ad.dual_level():
        dual_w = forward_ad.make_dual(conv.weight.detach(), w_tangent)
        out = functional_call(conv, {"weight": dual_w, "bias": conv.bias.detach()}, (forward_ad.make_dual(x, v),))
        tangent = forward_ad.unpack_dual(out).tangent
    jw, jx = torch.autograd.functional.jacobian(
        lambda w, xi: functional_call(conv, {"weight": w, "bias": conv.bias.detach()}, (xi,)),
        (conv.weight.detach(), x))
    n = out.numel()
    expected = jw.reshape(n, -1) @ w_tangent.reshape(-1) + jx.reshape(n, -1) @ v.reshape(-1)
    torch.testing.assert_close(tangent, expected.reshape(out.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: bt.BCNorm(4, 2), lambda: bt.BatchChannelNorm(4, 2)], ids=["BCNorm", "labml"])
def test_a_jacobian_vector_product_by_double_backward_raises_instead_of_giving_zero(make, eager_route, gen):
    """torch.autograd.functional.jvp differentiates the backward with respect to the output gradient, which the
    kernels' backward does not record: it must raise the documented error (it returned zeros)."""
    m = make().double()
    x, v = rand_input(gen, (2, 4, 3, 3)), torch.randn((2, 4, 3, 3), generator=gen, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.functional.jvp(m, x, v)
    conv = bt.Conv2d(3, 4, 3).double()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.functional.jvp(lambda w: functional_call(conv, {"weight": w}, (rand_input(gen, (2, 3, 5, 5)),)),
                                      conv.weight.detach(), torch.ones_like(conv.weight))


def test_a_sync_batch_norm_inside_bcnorm_runs_as_its_own_module(gen, monkeypatch):
    """nn.SyncBatchNorm.convert_sync_batchnorm puts one in BCNorm.bn: its forward (which synchronizes over its
    process group) runs, and without a group it normalizes as BatchNorm2d does."""
    plain = bt.BCNorm(8, 4).double()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(plain)))[0]
    assert isinstance(synced.bn, nn.SyncBatchNorm)
    calls = []
    real = nn.SyncBatchNorm.forward
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", lambda self, x: calls.append(1) or real(self, x))
    x = rand_input(gen, (4, 8, 5, 5))
    torch.testing.assert_close(synced(x), plain(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(synced.bn.running_mean, plain.bn.running_mean, rtol=1e-12, atol=1e-14)
    assert calls == [1]


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("convention", ["authors", "labml"])
def test_ws_conv_transpose_standardizes_each_output_channel_over_its_groups_inputs(groups, convention, route, gen):
    layer = bt.ConvTranspose2d(6, 12, 3, groups=groups, convention=convention).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64) * 0.3 + 0.1)
    w = layer.weight.detach()
    expected = reference_ws_transposed(w, groups, 1e-5, convention)
    torch.testing.assert_close(layer.standardized_weight().detach(), expected, rtol=1e-12, atol=1e-12)
    x = rand_input(gen, (2, 6, 4, 4))
    torch.testing.assert_close(bt.fold_weight_standardization(copy.deepcopy(layer))(x), layer(x), rtol=1e-12,
                               atol=1e-12)


def test_a_second_derivative_through_the_parameters_alone_raises_the_documented_error(eager_route, gen):
    m = bt.BCNorm(8, 4).double()
    x = rand_input(gen, (4, 8, 5, 5))  # requires no grad: only the parameters do
    g = torch.autograd.grad(m(x).pow(2).sum(), m.bn.weight, create_graph=True)[0]
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="no second derivative"):
        g.pow(2).sum().backward()


def test_ws_layers_refuse_a_fan_in_of_one_in_their_own_words(gen):
    for layer in (bt.Conv2d(4, 4, 1, groups=4), bt.Linear(1, 3)):
        with pytest.raises(ValueError, match="Weight Standardization needs a fan-in of at least 2") as e:
            layer.standardized_weight()
        assert "unbiased=False" not in str(e.value)  # an argument the layers do not have


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")  # torch's, nn.Linear(4, 0)'s too
def test_a_ws_linear_without_outputs_gives_torch_s_empty_output(gen):
    """As nn.Linear(4, 0): an empty output, and empty gradients (the kernels refuse an empty weight, which the layer
    then no longer hands them: it raised). Folded, the same. (torch's convolutions refuse no output channels.)"""
    layer, plain = bt.Linear(4, 0).double(), nn.Linear(4, 0).double()
    x = rand_input(gen, (2, 4)).requires_grad_()
    y = layer(x)
    assert y.shape == plain(x).shape == (2, 0)
    y.sum().backward()
    assert layer.weight.grad.shape == (0, 4) and torch.equal(x.grad, torch.zeros_like(x))
    assert bt.fold_weight_standardization(nn.Sequential(layer))[0](x).shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["kernels", "composed"])
@pytest.mark.parametrize("weight,kw,error,message", [
    ((3, 1), {}, ValueError,
     r"an unbiased standard deviation needs a fan-in of at least 2, got 1 \(turn unbiased off\)"),
    ((3, 4), dict(eps=0.0), ValueError, "eps must be a positive finite number, got 0.0"),
    ((0, 4), {}, ValueError, r"weight must have rank >= 2 \(\[out_channels, ...\]\) and values, got shape \(0, 4\)"),
    ((3,), {}, ValueError, r"weight must have rank >= 2"),
], ids=["fan-in 1", "eps 0", "no values", "rank 1"])
def test_functional_weight_standardization_refuses_alike_on_both_routes(weight, kw, error, message, dtype, gen):
    w = (torch.randn(weight, generator=gen) + 0.5).to(dtype)
    with pytest.raises(error, match=message):
        bt.weight_standardization(w, **kw)


@pytest.mark.parametrize("convention", ["authors", "labml"])
def test_composed_weight_standardization_of_a_constant_filter_and_of_huge_weights(convention, gen, monkeypatch):
    """The composed route (torch.func, half precision, other devices) against the kernels: a constant filter's
    gradient is the finite limit (g - mean(g)) / eps for the authors' std + eps (sqrt's derivative at 0 made it
    NaN), also where the mean of its value rounds (0.1); float32 weights near 1e30, and rows whose sum passes
    Float's range, standardize to numbers of order 1 (their squares, or their mean, overflowed: zeros or NaN);
    a spread of a few ulps of the mean keeps its digits (its deviations were 11% off about a float32 mean)."""
    eps_in_sqrt = convention == "labml"
    w = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float32) + 0.3
    w[1] = 0.0  # a zero-initialised output channel
    w[2] = 2.5  # a constant one
    w[3] = 0.1  # a constant one whose float32 mean rounds
    w[4] = 1e4 + torch.randn(3, 3, 3, generator=gen) * 1e-3  # far from 0 against its spread
    w[5] = 1e33  # a constant one so large that eps over its scale underflows
    huge = (torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float32) + 0.3) * 1e30
    huge[3] = 5e37 + torch.randn(3, 3, 3, generator=gen) * 1e36  # their sum passes 3.4e38
    huge[4, 0, 0, 0] = 3e38
    huge[5] = 1e20  # constant
    g = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    results = {}
    for composed in (False, True):
        monkeypatch.setattr(functional, "COMPOSED", composed)
        wc = w.clone().requires_grad_()
        out = bt.weight_standardization(wc, 1e-5, eps_in_sqrt=eps_in_sqrt)
        out.backward(g)
        results[composed] = (out.detach(), wc.grad, bt.weight_standardization(huge, 1e-5, eps_in_sqrt=eps_in_sqrt))
    (out_k, grad_k, huge_k), (out_c, grad_c, huge_c) = results[False], results[True]
    assert grad_c.isfinite().all() and huge_c.abs().amax() > 0.5, (grad_c, huge_c)
    torch.testing.assert_close(out_c, out_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_k, rtol=2e-4, atol=0)
    torch.testing.assert_close(huge_c, huge_k, rtol=1e-5, atol=1e-6)


def test_ws_arguments_that_are_not_what_they_claim_are_refused():
    """A bool or a string eps, a convention that is not a string, and a non-bool eps_in_sqrt are refused in
    words, as the numpy API refuses them (True was eps 1.0; "no" was labml's convention)."""
    for eps in (True, "1e-5"):
        with pytest.raises(TypeError, match="eps must be a number"):
            bt.Conv2d(4, 6, 3, eps=eps)
        with pytest.raises(TypeError, match="eps must be a number"):
            bt.weight_standardization(torch.randn(3, 4), eps=eps)
    with pytest.raises(ValueError, match="convention must be one of"):
        bt.Conv2d(4, 6, 3, convention=["authors"])
    with pytest.raises(TypeError, match="eps_in_sqrt must be a bool, got 'no'"):
        bt.weight_standardization(torch.randn(3, 4), eps_in_sqrt="no")


def test_reprs_show_the_constructor_arguments():
    assert repr(bt.BatchNorm(8, momentum=None, affine=False, track_running_stats=False)) == \
        "BatchNorm(8, eps=1e-05, momentum=None, affine=False, track_running_stats=False)"
    assert repr(bt.BCNorm(8, 4, eps=1e-3)).startswith("BCNorm(\n  8, 4, eps=0.001\n  (bn): BatchNorm2d(8, eps=")
    assert repr(bt.ChannelNorm(8, 2, affine=False)) == "ChannelNorm(8, 2, eps=1e-05, affine=False)"


_NOT_STRIDED = {"sparse": (lambda x: x.to_sparse(), "a sparse_coo tensor: convert it with .to_dense() first"),
                "mkldnn": (lambda x: x.float().to_mkldnn(), "a mkldnn tensor: convert it with .to_dense() first"),
                "nested": (lambda x: torch.nested.nested_tensor(list(x)), "a nested tensor")}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("kind", sorted(_NOT_STRIDED))
@pytest.mark.parametrize("make", [lambda: bt.BCNorm(8, 4, estimate=True), lambda: bt.BCNorm(8, 4),
                                  lambda: bt.BatchChannelNorm(8, 4), lambda: bt.ChannelNorm(8, 4),
                                  lambda: bt.EstBN(8), lambda: bt.BatchNorm(8), lambda: bt.EstimatedBatchNorm(8)],
                         ids=["BCNorm-estimate", "BCNorm", "BatchChannelNorm", "ChannelNorm", "EstBN", "BatchNorm",
                              "EstimatedBatchNorm"])
def test_an_input_that_is_not_strided_memory_is_refused_in_words_and_changes_nothing(make, kind, gen):
    """Sparse, mkldnn and nested tensors: a TypeError that names the input and its layout (torch's own errors
    spoke of reshape, a memory format, or an "internal error" of nested tensors), from the modules and from the
    functional API, in training and eval, with no buffer changed."""
    to, words = _NOT_STRIDED[kind]
    x = to(rand_input(gen, (2, 8, 3, 3), torch.float32))
    for training in (True, False):
        module = make().train(training)
        before = _state(module)
        with pytest.raises(TypeError, match=re.escape(f"expected a dense (strided) input, got {words}")):
            module(x)
        assert_states_equal(_state(module), before, kind)
    with pytest.raises(TypeError, match=re.escape(f"expected a dense (strided) input, got {words}")):
        functional.batch_channel_norm(x, None, functional.ChannelNormStage(4, 1e-5, None, None))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("kind", sorted(_NOT_STRIDED))
def test_a_weight_that_is_not_strided_memory_is_refused_in_words(kind, gen):
    to, words = _NOT_STRIDED[kind]
    w = to(torch.randn(4, 3, 2, 2, generator=gen) + 0.5)
    with pytest.raises(TypeError, match=re.escape(f"expected a dense (strided) weight, got {words}")):
        bt.weight_standardization(w)


def test_functional_weight_standardization_refuses_integers():
    with pytest.raises(TypeError, match="expected a floating-point weight, got torch.int64"):
        bt.weight_standardization(torch.arange(12).reshape(3, 4))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf"), float("nan")])
def test_ws_layers_refuse_a_bad_eps_at_construction(eps):
    for make in (lambda: bt.Conv2d(4, 4, 3, eps=eps), lambda: bt.Linear(4, 3, eps=eps)):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            make()


WS_LAYERS = [(bt.Conv1d, nn.Conv1d, (3, 4, 3), (2, 3, 9)), (bt.Conv2d, nn.Conv2d, (3, 8, 3), (2, 3, 6, 6)),
             (bt.Conv3d, nn.Conv3d, (3, 4, 2), (2, 3, 4, 4, 4)),
             (bt.ConvTranspose2d, nn.ConvTranspose2d, (4, 6, 3), (2, 4, 5, 5)), (bt.Linear, nn.Linear, (5, 7), (3, 5))]


@pytest.mark.parametrize("ws, plain, args, shape", WS_LAYERS, ids=[w[0].__name__ for w in WS_LAYERS])
def test_ws_layers_take_torch_s_arguments_by_their_names(ws, plain, args, shape, gen):
    """A review: torch.nn.utils.skip_init refused every WS layer ("Module must support a 'device' arg"), as their
    signature was (*args, convention, eps, **kwargs); and `conv(input=t)`, as torch's layers are called, failed
    with "missing 1 required positional argument: 'x'". Their signature is now the torch layer's, then
    `convention` and `eps` keyword-only; skip_init makes them uninitialized on the device asked for; the input
    goes by torch's name."""
    import inspect
    torch_parameters = list(inspect.signature(plain).parameters.values())
    ours = inspect.signature(ws).parameters
    assert list(ours.values())[:len(torch_parameters)] == torch_parameters
    assert [(n, p.kind, p.default) for n, p in list(ours.items())[len(torch_parameters):]] == \
        [("convention", inspect.Parameter.KEYWORD_ONLY, "authors"), ("eps", inspect.Parameter.KEYWORD_ONLY, 1e-5)]
    layer = torch.nn.utils.skip_init(ws, *args, convention="labml", eps=1e-3, dtype=torch.float64)
    assert type(layer) is ws and layer.convention == "labml" and layer.ws_eps == 1e-3
    assert layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float64
    built = ws(*args, convention="labml", eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        for name, p in built.named_parameters():
            getattr(layer, name).copy_(p)
    x = rand_input(gen, shape)
    expected = built(x)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer(input=x), expected, rtol=0, atol=0)

    class Subclass(ws):  # a subclass keeps the signature, unless its own __init__ says otherwise
        pass

    class Narrowed(ws):
        def __init__(self, width):
            super().__init__(*args)

    assert inspect.signature(Subclass) == inspect.signature(ws)
    assert list(inspect.signature(Narrowed).parameters) == ["width"]


def test_convert_keeps_affine_and_running_statistics_settings(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False, track_running_stats=False),
                          nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8, affine=False)).double()
    converted = bt.convert(copy.deepcopy(model), num_groups=4, estimate=False, weight_standardization=False)
    bn, gn = converted[1].bn, converted[3].bn
    assert not bn.affine and not bn.track_running_stats and bn.running_mean is None
    assert not gn.affine and gn.track_running_stats
    assert {p.dtype for p in converted.parameters()} == {torch.float64}  # the GroupNorm's too: from the model
    converted.eval()
    x = rand_input(gen, (2, 3, 7, 7))
    # without running statistics, eval normalizes with the batch's, as the replaced layer did
    y = converted[1](converted[0](x))
    reference = bt.BCNorm(8, 4).double()
    reference.bn = nn.BatchNorm2d(8, affine=False).double()  # training: batch statistics
    torch.testing.assert_close(y, reference(converted[0](x)), rtol=1e-10, atol=1e-12)


def _biasless(kind, *args):
    """A norm layer without a bias: `bias=False` where torch takes it (2.12 on; 2.11 does not), else the same
    thing made by hand (a bias parameter of None, which both torches' layers read as none)."""
    try:
        return kind(*args, bias=False)
    except TypeError:
        layer = kind(*args)
        layer.register_parameter("bias", None)
        return layer


@pytest.mark.parametrize("estimate", [True, False])
def test_convert_moves_the_replaced_layers_parameters_themselves(estimate, gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3),
                          _biasless(nn.BatchNorm2d, 8), nn.Conv2d(8, 8, 3, bias=False),
                          _biasless(nn.GroupNorm, 2, 8)).double().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + 0.5)
    model[2].requires_grad_(False)
    model[3].requires_grad_(False)
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion
    x = rand_input(gen, (4, 3, 11, 11), layout="channels_last")
    converted = bt.convert(model, num_groups=4, estimate=estimate, momentum=0.1)
    after = {**dict(converted.named_parameters()), "3.bn.bias": converted[3].bn.bias,
             "5.bn.bias": converted[5].bn.bias}
    moved = {"0.weight": "0.weight", "0.bias": "0.bias", "1.weight": "1.bn.weight", "1.bias": "1.bn.bias",
             "2.weight": "2.weight", "2.bias": "2.bias", "3.weight": "3.bn.weight", "4.weight": "4.weight",
             "5.weight": "5.bn.weight"}
    for old, new in moved.items():
        assert after[new] is before[old], f"{old} -> {new}: not the same Parameter"
    assert after["3.bn.bias"] is None and after["5.bn.bias"] is None  # bias=False: none, as in the layer
    assert "3.bn.bias" not in converted.state_dict() and "5.bn.bias" not in converted.state_dict()
    assert converted[2].weight.is_contiguous(memory_format=torch.channels_last)
    # frozen layers stay frozen, with the new per-group affine of the frozen norm; the others train
    assert not any(p.requires_grad for p in (converted[2].weight, converted[3].bn.weight, converted[3].weight,
                                             converted[3].bias))
    assert all(p.requires_grad for p in (converted[1].weight, converted[1].bias, converted[1].bn.weight))
    # a norm without bias computes as one with a zero bias
    with_bias = copy.deepcopy(converted[3])
    with_bias.bn.bias = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    h = rand_input(gen, (4, 8, 7, 7))
    torch.testing.assert_close(converted[3](h), with_bias(h), rtol=0, atol=0)
    # the optimizer built before the conversion trains the converted layers
    weight = converted[0].weight.detach().clone()
    converted(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(converted[0].weight, weight)


def test_convert_that_raises_changes_nothing_and_counts_may_be_numpy_ints():
    import numpy as np
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sequential(nn.BatchNorm2d(0)))
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="has no channels to normalize"):
        bt.convert(model, num_groups=np.int64(4))
    assert [type(m) for m in model.modules()] == kinds
    converted = bt.convert(model[:2], num_groups=np.int64(4))
    assert converted[1].num_groups == 4 and type(converted[1].num_groups) is int
    m = bt.BCNorm(8, np.int32(2))
    assert m.num_groups == 2 and type(m.num_groups) is int and type(bt.ChannelNorm(8, np.int64(4)).groups) is int
    assert bt.BCNorm(torch.tensor(8), torch.tensor(2)).num_groups == 2  # whatever has __index__, as numpy's ints
    # as the numpy layers and the functional API word it: what is not an integer is a TypeError
    for bad, error, words in ((0, ValueError, "positive, got 0"), (-2, ValueError, "positive, got -2"),
                              (2.0, TypeError, "an int, got float 2.0"), (True, TypeError, "an int, got bool True"),
                              ("4", TypeError, "an int, got str '4'"), (None, TypeError, "an int, got NoneType"),
                              (torch.tensor(True), TypeError, "an int, got Tensor")):
        with pytest.raises(error, match=re.escape(f"num_groups must be {words}")):
            bt.convert(nn.Sequential(nn.BatchNorm2d(8)), num_groups=bad)
        with pytest.raises(error, match=re.escape(f"the number of groups must be {words}")):
            bt.BCNorm(8, bad)


@pytest.mark.parametrize("make,error,message", [
    (lambda: bt.BCNorm(8, 4, eps=0), ValueError, "eps must be a positive finite number, got 0"),
    (lambda: bt.BCNorm(8, 4, eps=float("nan")), ValueError, "eps must be a positive finite number, got nan"),
    (lambda: bt.BCNorm(8, 4, eps="1e-5"), TypeError, "eps must be a number, got str '1e-5'"),
    (lambda: bt.BCNorm(0, 4), ValueError, "num_channels must be positive, got 0"),
    (lambda: bt.EstBN(8, eps=-1e-5), ValueError, "eps must be a positive finite number, got -1e-05"),
    (lambda: bt.EstBN(8.0), TypeError, "num_features must be an int, got float 8.0"),
    (lambda: bt.BatchChannelNorm(8, 4, momentum=2), ValueError, "momentum must be in [0, 1] or None, got 2"),
    (lambda: bt.BatchChannelNorm(8, 4, eps=float("inf")), ValueError,
     "eps must be a positive finite number, got inf"),
    (lambda: bt.BatchNorm(8, momentum="a"), TypeError, "momentum must be a number or None, got str 'a'"),
    (lambda: bt.EstimatedBatchNorm(8, momentum=-0.1), ValueError, "momentum must be in [0, 1] or None, got -0.1"),
    (lambda: bt.ChannelNorm(8, 4, eps=True), TypeError, "eps must be a number, got bool True"),
    (lambda: bt.ChannelNorm(-8, 4), ValueError, "channels must be positive, got -8"),
    (lambda: bt.Conv2d(3, 4, 3, eps=0.0), ValueError, "eps must be a positive finite number, got 0.0"),
], ids=["BCNorm eps 0", "BCNorm eps nan", "BCNorm eps str", "BCNorm no channels", "EstBN eps negative",
        "EstBN channels float", "labml momentum 2", "labml eps inf", "BatchNorm momentum str",
        "EstimatedBatchNorm momentum negative", "ChannelNorm eps bool", "ChannelNorm channels negative", "WS eps 0"])
def test_constructors_refuse_a_bad_setting_at_once(make, error, message):
    """As the numpy layers and the WS layers do: a setting no forward would take is refused where it is given, not
    at the first forward (a momentum only at the first training one)."""
    with pytest.raises(error, match=re.escape(message)):
        make()


def test_constructors_keep_good_settings_as_plain_numbers():
    import numpy as np
    m = bt.BatchChannelNorm(np.int64(8), 4, eps=np.float32(1e-3), momentum=None)
    assert type(m.channel_norm.eps) is float and m.channel_norm.eps == float(np.float32(1e-3))
    assert m.batch_norm.momentum is None and type(m.channel_norm.channels) is int
    m = bt.BCNorm(8, 4, eps=1, estimate=True)
    assert m.eps == 1.0 and type(m.eps) is float and m.bn.eps == 1e-5
    assert bt.EstimatedBatchNorm(8, momentum=1).momentum == 1.0


def test_convert_leaves_convolutions_of_one_input_value_plain(gen):
    """A 1x1 depthwise convolution (a fan-in of 1) has no standardized weight (an unbiased deviation of one
    value), so convert keeps it a plain nn.Conv2d, and the converted model runs; the others become WS Conv2d."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1, groups=8), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)).double()
    weights = [m.weight for m in model[:3]]
    bt.convert(model, num_groups=4)
    assert [type(m) for m in model] == [nn.Conv2d, bt.Conv2d, bt.Conv2d, bt.BCNorm]
    assert [m.weight for m in model[:3]] == weights
    assert model(rand_input(gen, (2, 8, 4, 4))).isfinite().all()


def test_a_momentum_that_is_not_a_number_and_a_group_count_of_0_are_named(route, gen):
    """A momentum that is not a number is a TypeError naming it, as the numpy layers word it (float() said only
    "could not convert string to float"), an empty batch's call included; a module's group count set to 0 after
    construction is the kernels' ValueError, not a ZeroDivisionError. Float64 modules and input, so that the
    kernels' route is the kernels' (a float32 module given float64 takes the composed one)."""
    with pytest.raises(TypeError, match="momentum must be a number or None, got str 'a'"):
        bt.convert(nn.Sequential(nn.BatchNorm2d(4)), momentum="a")
    x = rand_input(gen, (2, 8, 3, 3))
    for m in (bt.BatchNorm(8).double(), bt.BCNorm(8, 4).double()):
        _bn(m).momentum = "a"
        before = _state(m)
        for batch in (x, x[:0]):
            with pytest.raises(TypeError, match="momentum must be a number or None"):
                m(batch)
        _assert_unchanged(m, before, f"{type(m).__name__} on the {route} route")
    for make, set_zero in ((lambda: bt.BatchChannelNorm(8, 4), lambda m: setattr(m.channel_norm, "groups", 0)),
                           (lambda: bt.BatchChannelNorm(8, 4, estimate=False),
                            lambda m: setattr(m.channel_norm, "groups", 0)),
                           (lambda: bt.BCNorm(8, 4), lambda m: setattr(m, "num_groups", 0))):
        m = make().double()
        set_zero(m)
        before = _state(m)
        with pytest.raises(ValueError, match="num_groups must be positive, got 0"):
            m(x)
        _assert_unchanged(m, before, f"{type(m).__name__} on the {route} route")


def test_only_torch_batch_norms_count_a_call_without_values(gen):
    """The count of an empty training call is torch.nn.BatchNorm's (`torch_batch_norm_stage`), not a convention's:
    a stage built with the same flags but without counts_every_call (labml's BatchNorm with an unbiased running
    variance, say) counts nothing, as the numpy layers with those flags count nothing."""
    m = bt.BCNorm(8, 4).double()
    stage = torch_batch_norm_stage(m.bn)._replace(counts_every_call=False)
    before = m.bn.num_batches_tracked.clone()
    functional.batch_channel_norm(rand_input(gen, (0, 8, 3, 3)), stage, None)
    assert torch.equal(m.bn.num_batches_tracked, before)
    functional.batch_channel_norm(rand_input(gen, (0, 8, 3, 3)), torch_batch_norm_stage(m.bn), None)
    assert m.bn.num_batches_tracked == before + 1


def test_fold_keeps_the_weights_memory_format_and_frozen_state_and_moves_the_bias(gen):
    layer = bt.Conv2d(4, 6, 3).double().to(memory_format=torch.channels_last)
    layer.weight.requires_grad_(False)
    plain = bt.fold_weight_standardization(layer)
    assert type(plain) is nn.Conv2d and plain.bias is layer.bias
    assert plain.weight.is_contiguous(memory_format=torch.channels_last) and not plain.weight.requires_grad
    torch.testing.assert_close(plain.weight, layer.standardized_weight(), rtol=0, atol=0)
    x = rand_input(gen, (2, 4, 6, 6))
    torch.testing.assert_close(plain(x), layer(x), rtol=1e-12, atol=1e-12)


def _stage_child(m):
    return m.batch_norm if isinstance(m, bt.BatchChannelNorm) else m.bn


def _channel_norm_alone(m, h):
    """The channel-norm stage of `m` alone on h (the batch-norm stage's output), through the functional form."""
    if isinstance(m, bt.BatchChannelNorm):
        return m.channel_norm(h)
    return functional.batch_channel_norm(h, None, functional.ChannelNormStage(m.num_groups, m.eps, m.weight,
                                                                              m.bias))


@pytest.mark.parametrize("make", [lambda: bt.BCNorm(8, 4), lambda: _est(8, 4), lambda: bt.BatchChannelNorm(8, 4),
                                  lambda: bt.BatchChannelNorm(8, 4, estimate=False)],
                         ids=["BCNorm", "BCNorm estimate", "labml", "labml batch"])
def test_a_stage_module_with_hooks_is_called_and_its_hooks_honoured(make, route, gen):
    m, plain = make().double(), make().double()
    child = _stage_child(m)
    seen = []
    child.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()) or out.flip(1))
    backward_calls = []
    child.register_full_backward_hook(lambda mod, gin, gout: backward_calls.append(len(gout)))
    for training in (True, False):
        m.train(training)
        plain.train(training)
        x = rand_input(gen, (4, 8, 5, 5)).requires_grad_()
        y = m(x)
        h = _stage_child(plain)(x)  # the same stage, unhooked, then the hook's change
        torch.testing.assert_close(seen[-1], h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, _channel_norm_alone(plain, h.flip(1)), rtol=1e-12, atol=1e-12)
        y.square().sum().backward()
        assert backward_calls, "the stage's full backward hook ran"
        assert_states_equal(_state(m), _state(plain), f"training={training}", rtol=1e-12, atol=1e-12)
    assert len(seen) == 2


def test_a_global_hook_or_a_subclass_forward_makes_the_stage_run_itself(gen):
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: calls.append(type(mod).__name__))
    try:
        bt.BCNorm(8, 4).double()(rand_input(gen, (4, 8, 5, 5)))
    finally:
        handle.remove()
    assert calls == ["BCNorm", "BatchNorm2d"], calls

    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + torch.arange(8, dtype=x.dtype).reshape(1, 8, 1, 1)

    m = bt.BCNorm(8, 4).double()
    m.bn = Shifted(8).double()
    x = rand_input(gen, (4, 8, 5, 5))
    reference = Shifted(8).double()
    torch.testing.assert_close(m(x), _channel_norm_alone(m, reference(x)), rtol=1e-12, atol=1e-12)


def test_an_untracked_batch_norm_with_buffers_normalizes_as_torch_does(route, gen):
    """torch.nn.BatchNorm2d with track_running_stats=False but buffers (switched off after construction): training
    takes the batch's statistics and leaves the buffers alone; eval takes the buffers."""
    m = bt.BCNorm(8, 4).double()
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.randn(8, generator=gen, dtype=torch.float64) + 2)
        m.bn.running_var.copy_(torch.rand(8, generator=gen, dtype=torch.float64) + 0.5)
    m.bn.track_running_stats = False
    torch_bn = copy.deepcopy(m.bn)
    for training in (True, False):
        m.train(training)
        torch_bn.train(training)
        x = rand_input(gen, (4, 8, 5, 5))
        before = _state(m)
        torch.testing.assert_close(m(x), _channel_norm_alone(m, torch_bn(x)), rtol=1e-12, atol=1e-12)
        _assert_unchanged(m, before, f"training={training}")
        assert torch.equal(m.bn.running_mean, torch_bn.running_mean)


RESETTABLE = [
    ("BCNorm", lambda **kw: bt.BCNorm(8, 4, **kw)),
    ("BCNorm estimate", lambda **kw: bt.BCNorm(8, 4, estimate=True, **kw)),
    ("EstBN", lambda **kw: bt.EstBN(8, **kw)),
    ("labml BatchChannelNorm", lambda **kw: bt.BatchChannelNorm(8, 4, **kw)),
    ("labml BatchChannelNorm cumulative", lambda **kw: bt.BatchChannelNorm(8, 4, momentum=None, estimate=False,
                                                                           **kw)),
    ("labml BatchNorm", lambda **kw: bt.BatchNorm(8, **kw)),
    ("ChannelNorm", lambda **kw: bt.ChannelNorm(8, 4, **kw)),
]


def _every_tensor(m):
    """Parameters and buffers, the state dict's non-persistent ones too (labml's count)."""
    return {**{k: v.detach().clone() for k, v in m.named_parameters()},
            **{k: v.clone() for k, v in m.named_buffers()}}


@pytest.mark.parametrize("name,make", RESETTABLE, ids=[r[0] for r in RESETTABLE])
def test_reset_parameters_on_each_module_gives_a_fresh_one(name, make, gen):
    """Deferred initialization (meta device, to_empty, then each module's reset_parameters: FSDP's way), and
    reset_running_stats after training."""
    fresh = make(dtype=torch.float64)
    deferred = make(device="meta", dtype=torch.float64).to_empty(device="cpu")
    with torch.no_grad():
        for t in _every_tensor(deferred).values():
            assert t.is_meta is False
        for p in deferred.parameters():
            p.fill_(float("nan"))  # what to_empty's memory may hold
    deferred.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    assert_states_equal(_every_tensor(deferred), _every_tensor(fresh), f"{name} after reset_parameters")
    trained = make(dtype=torch.float64)
    for child in trained.modules():
        if isinstance(child, bt.EstBN):
            child.estbn_moving_speed.fill_(0.3)
    for _ in range(2):
        trained(rand_input(gen, (4, 8, 5, 5)))
    trained.apply(lambda m: m.reset_running_stats() if hasattr(m, "reset_running_stats") else None)
    after = _every_tensor(trained)
    for k, v in _every_tensor(fresh).items():
        if "running" in k or "exp_" in k or "count" in k or "num_batches" in k:
            assert torch.equal(after[k], v), f"{name}: {k} after reset_running_stats"
    if "estimate" in name or name == "EstBN":
        speed = [v for k, v in after.items() if k.endswith("estbn_moving_speed")]
        assert speed and float(speed[0]) == 0.3, "the moving speed is a setting, not a statistic"


def test_convert_and_fold_keep_a_shared_layer_one_layer():
    bn, conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU(), bn, conv, nn.Sequential(conv, bn))
    converted = bt.convert(model, num_groups=4)
    assert isinstance(converted[1], bt.BCNorm) and converted[1] is converted[3] is converted[5][1]
    assert isinstance(converted[4], bt.Conv2d) and converted[4] is converted[5][0]
    folded = bt.fold_weight_standardization(converted)
    assert type(folded[4]) is nn.Conv2d and folded[4] is folded[5][0]


@pytest.mark.parametrize("make", [lambda m: bt.BatchNorm(8, momentum=m),
                                  lambda m: bt.BatchChannelNorm(8, 4, momentum=m, estimate=False)],
                         ids=["BatchNorm", "BatchChannelNorm"])
def test_labml_cumulative_average_carries_on_across_a_checkpoint(make, gen):
    batches = [rand_input(gen, (4, 8, 3, 3)) for _ in range(3)]
    straight = make(None).double()
    for x in batches:
        straight(x)
    first = make(None).double()
    for x in batches[:2]:
        first(x)
    state = first.state_dict()
    assert any(k.endswith("_count") for k in state)
    resumed = make(None).double()
    resumed.load_state_dict(state, strict=True)
    resumed(batches[2])
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # with a momentum (all labml's code knows) the state dict is labml's own
    assert not any(k.endswith("_count") for k in make(0.1).state_dict())


@pytest.mark.parametrize("make", [lambda m: bt.BatchNorm(8, momentum=m),
                                  lambda m: bt.BatchChannelNorm(8, 4, momentum=m, estimate=False)],
                         ids=["BatchNorm", "BatchChannelNorm"])
def test_labml_count_follows_the_momentum_set_after_construction(make, gen):
    """A review: whether the count was saved was fixed at construction, so `m.momentum = None` (torch's way to
    switch to a cumulative average) saved no count, and a resumed average restarted silently; the other way round a
    labml checkpoint no longer loaded strictly. The count goes with momentum=None as it is when saving, and loads
    when present."""
    def cumulative_later():  # the batch norm holds the momentum (labml's BatchChannelNorm has none of its own)
        m = make(0.1).double()
        getattr(m, "batch_norm", m).momentum = None
        return m

    batches = [rand_input(gen, (4, 8, 3, 3)) for _ in range(3)]
    straight = cumulative_later()
    for x in batches:
        straight(x)
    first = cumulative_later()
    for x in batches[:2]:
        first(x)
    state = first.state_dict()
    key = next(k for k in state if k.endswith("_count"))
    assert int(state[key]) == 2
    resumed = cumulative_later()
    resumed.load_state_dict(state, strict=True)
    resumed(batches[2])
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # a labml checkpoint (no count) loads strictly into a module made with momentum=None, whose count stays
    cumulative = make(None).double()
    cumulative(batches[0])
    labml_state = make(0.1).double().state_dict()
    cumulative.load_state_dict(labml_state, strict=True)
    assert int(next(v for k, v in cumulative.named_buffers() if k.endswith("_count"))) == 1
    # a count out of the range a cumulative average trains with, or not an integer tensor, is refused, naming it
    for bad, shown in ((torch.tensor(-1), "tensor(-1)"), (torch.tensor(2 ** 63 - 1), "tensor(9223372036854775807)"),
                       (torch.tensor(2.0), "a tensor of 1 torch.float32"), (5, "5")):
        with pytest.raises(RuntimeError, match=re.escape(f"{key}: the count of a cumulative average must be one "
                                                          f"integer tensor holding 0 to 2^63 - 2, got {shown}")):
            resumed.load_state_dict({**state, key: bad}, strict=True)
    # assign=True into a module made on the meta device (deferred initialization) takes the count, or 0 from a
    # checkpoint without one, as torch's batch norms do with num_batches_tracked
    for source, expected in ((state, 2), (labml_state, 0)):
        deferred = make(None).to(device="meta", dtype=torch.float64)
        deferred.load_state_dict(source, strict=True, assign=True)
        count = next(v for k, v in deferred.named_buffers() if k.endswith("_count"))
        assert not count.is_meta and int(count) == expected and count.dtype == torch.long
        deferred(batches[0])  # trains: no buffer left on the meta device
    # a meta module's own state dict loads into it without assign, as torch's modules' do (nothing to copy)
    on_meta = make(None).to(device="meta")
    on_meta.load_state_dict(on_meta.state_dict(), strict=True)


def test_convert_leaves_a_convolution_whose_weight_is_computed(gen):
    """A review: convert raised TypeError ("cannot assign 'torch.FloatTensor' as parameter 'weight'") on a Conv2d
    wrapped by torch's hook-based weight_norm or spectral_norm, whose weight is computed from other parameters;
    such a convolution now stays as it is (as their parametrized forms, subclasses, already did), and its norm
    is converted."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based forms are deprecated, not gone
        for wrap in (torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm):
            conv = wrap(nn.Conv2d(3, 4, 3).double())
            model = bt.convert(nn.Sequential(conv, nn.BatchNorm2d(4).double()), num_groups=2)
            assert model[0] is conv and type(model[0]) is nn.Conv2d
            assert isinstance(model[1], bt.BCNorm)
            assert model(rand_input(gen, (2, 3, 6, 6))).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("estimate", [True, False])
def test_convert_leaves_a_layer_whose_bias_or_norm_affine_is_computed(estimate, gen):
    """A review: a pruned (or hook-based weight_norm'd) conv bias, batch-norm weight or group-norm bias made convert
    raise TypeError ("cannot assign 'torch.FloatTensor' as parameter ...") without naming the layer; only a
    conv's weight was screened. Such a layer now stays as it is, and the rest of the model is converted."""
    import warnings
    import torch.nn.utils.prune as prune
    cases = [("conv bias pruned", lambda m: prune.l1_unstructured(m[0], "bias", amount=0.5), 0),
             ("bn weight pruned", lambda m: prune.l1_unstructured(m[1], "weight", amount=0.5), 1),
             ("bn weight weight_norm'd", lambda m: torch.nn.utils.weight_norm(m[1], "weight", dim=0), 1),
             ("gn bias pruned", lambda m: prune.random_unstructured(m[2], "bias", amount=0.5), 2)]
    for what, hook, kept in cases:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(4, 8)).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm is deprecated, not gone
            hook(model)
        layers = list(model)
        bt.convert(model, num_groups=4, estimate=estimate)
        assert model[kept] is layers[kept], what
        converted = [i for i in range(3) if i != kept]
        assert all(model[i] is not layers[i] for i in converted), what
        assert model(rand_input(gen, (2, 3, 6, 6))).shape == (2, 8, 4, 4), what


@pytest.mark.parametrize("estimate", [True, False])
def test_convert_takes_a_batch_norm_without_a_count(estimate, gen):
    """A review: a BatchNorm2d whose num_batches_tracked is None (torch's batch norms allow it, and then count
    nothing) made convert fail in copy_(). With estimate=False the new bn has no count either, and trains as the
    replaced layer did (its momentum); EstBN's count, which its update does not read, stays at 0."""
    bn = nn.BatchNorm2d(4).double()
    bn.num_batches_tracked = None
    twin = copy.deepcopy(bn)
    new = bt.convert(bn, num_groups=2, estimate=estimate)
    if estimate:
        assert int(new.bn.num_batches_tracked) == 0
    else:
        assert new.bn.num_batches_tracked is None
        assert "bn.num_batches_tracked" not in new.state_dict()
        x = rand_input(gen, (2, 4, 5, 5))
        new(x)
        twin(x)
        torch.testing.assert_close(new.bn.running_mean, twin.running_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(new.bn.running_var, twin.running_var, rtol=1e-12, atol=0)


def test_convert_takes_the_dtype_of_a_floating_tensor_only():
    """A review: a GroupNorm without affine takes its new layer's dtype from an enclosing module's first tensor;
    an integer buffer there (a step counter) gave an integer BCNorm, which torch refused to make."""
    model = nn.Sequential(nn.GroupNorm(2, 4, affine=False))
    model.register_buffer("step", torch.tensor(0))
    converted = bt.convert(model, num_groups=2)
    assert all(t.dtype == torch.float32 for t in converted[0].parameters())
    model = nn.Sequential(nn.GroupNorm(2, 4, affine=False)).double()
    model.register_buffer("step", torch.tensor(0))
    model.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
    assert all(t.dtype == torch.float64 for t in bt.convert(model, num_groups=2)[0].parameters())


def _est_bn(C):
    m = bt.EstBN(C)
    m.estbn_moving_speed.fill_(0.5)  # 0 would freeze the estimates at 0 and 1
    return m, lambda: (m.weight, m.running_var, m.eps)


def _labml_estimated(C):
    m = bt.EstimatedBatchNorm(C)
    return m, lambda: (m.scale, m.exp_var, m.eps)


@pytest.mark.parametrize("make", [_est_bn, _labml_estimated], ids=["authors EstBN", "labml EstimatedBatchNorm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_in_eval_the_input_gradient_at_a_non_finite_value_is_a_dy_as_torch_gives_it(make, channels_last, bad, route,
                                                                                      gen):
    """In eval a batch norm alone is an affine map value by value: its input gradient a·dy does not depend on x,
    and torch's autograd gives it at a NaN or infinite input too. So do both routes (the kernels' map reads dy
    where it would read x there)."""
    m, parameters = make(6)
    m.double()
    with torch.no_grad():
        parameters()[0].copy_(torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
    m(rand_input(gen, (4, 6, 5, 5)))  # estimates away from 0 and 1
    m.eval()
    x = rand_input(gen, (2, 6, 5, 5))
    x[1, 2, 3, 4] = bad
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = rand_input(gen, (2, 6, 5, 5))
    m(x).backward(dy)
    weight, running_var, eps = parameters()
    a = (weight / torch.sqrt(running_var + eps)).detach().view(1, 6, 1, 1)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, a * dy, rtol=1e-12, atol=1e-12)


def _speed(m, speed):
    """m (an EstBN, or a BCNorm whose bn is one) with the moving speed `speed`."""
    (m.bn if isinstance(m, (bt.BCNorm, R.BCNorm)) else m).estbn_moving_speed.fill_(speed)
    return m


#: (name, bcnswift module, the documents' module) with estimates moving fast, so that a recomputation shows
CHECKPOINTED = [
    ("BCNorm estimate", lambda: _speed(bt.BCNorm(8, 4, estimate=True), 0.5),
     lambda: _speed(R.BCNorm(8, 4, 1e-5, estimate=True), 0.5)),
    ("EstBN", lambda: _speed(bt.EstBN(8), 0.5), lambda: _speed(R.EstBN(8), 0.5)),
    ("labml BatchChannelNorm", lambda: bt.BatchChannelNorm(8, 4, momentum=0.5),
     lambda: R.LabmlBatchChannelNorm(8, 4, momentum=0.5)),
    ("labml EstimatedBatchNorm", lambda: bt.EstimatedBatchNorm(8, momentum=0.5),
     lambda: R.LabmlEstimatedBatchNorm(8, momentum=0.5)),
]


@pytest.mark.parametrize("name,make,make_reference", CHECKPOINTED, ids=[c[0] for c in CHECKPOINTED])
@pytest.mark.parametrize("way", EAGER_ROUTES + ["composed"])
def test_a_recomputing_checkpoint_gives_the_documents_gradients(name, make, make_reference, way, gen, monkeypatch):
    """torch.utils.checkpoint(use_reentrant=False) runs the forward again for the backward, which moves the
    estimates a second time, in the documents' modules as here. The eager routes kept their context (the
    coefficients) outside the saved tensors, so their backward used the first forward's while x came from the
    second: input gradients 0.09 off the authors' EstBN, 0.5 off labml's, and a 30-step ResNet 9e-3 off in loss."""
    from torch.utils.checkpoint import checkpoint
    monkeypatch.setattr(_ops, "NATIVE", way == "native")
    monkeypatch.setattr(functional, "COMPOSED", way == "composed")
    _trains_as_the_documents_module(
        make, make_reference, gen, f"{name}, {way}",
        lambda m, x: checkpoint(lambda t: (m(t) * _CHANNEL_WEIGHTS).sin(), x, use_reentrant=False).sum().backward())


#: weights of a loss's channels, so that no gradient is zero by symmetry
_CHANNEL_WEIGHTS = torch.arange(1.0, 9.0, dtype=torch.float64).view(1, 8, 1, 1)


def _trains_as_the_documents_module(make, make_reference, gen, what, step, steps=1):
    """`step(m, x)` (a forward and backward of x through m), `steps` times, on a bcnswift module and on the
    documents' module holding its state, in float64: dx, every parameter's gradient and every buffer agree."""
    ours, reference = make().double(), make_reference().double()
    reference.load_state_dict(ours.state_dict())
    x0 = rand_input(gen, (4, 8, 6, 6), torch.float64)
    results = []
    for m in (ours, reference):
        for _ in range(steps):
            x = x0.clone().requires_grad_()
            step(m, x)
        results.append((x.grad, {k: p.grad for k, p in m.named_parameters()}, m.state_dict()))
    (dx, grads, state), (dx_ref, grads_ref, state_ref) = results
    assert (dx - dx_ref).abs().max() <= 1e-10 * dx_ref.abs().max(), f"{what}: dx off the documents' module's"
    for k, g in grads_ref.items():
        assert (grads[k] - g).abs().max() <= 1e-10 * g.abs().max().clamp_min(1e-300), f"{what}: d{k}"
    for k, v in state_ref.items():
        assert torch.allclose(state[k].double(), v.double(), rtol=1e-12, atol=1e-12), f"{what}: {k}"


#: CHECKPOINTED, and the modules that train with batch statistics
SELECTIVELY_CHECKPOINTED = CHECKPOINTED + [
    ("BCNorm", lambda: bt.BCNorm(8, 4), lambda: R.BCNorm(8, 4, 1e-5)),
    ("labml BatchChannelNorm batch", lambda: bt.BatchChannelNorm(8, 4, momentum=0.5, estimate=False),
     lambda: R.LabmlBatchChannelNorm(8, 4, momentum=0.5, estimate=False)),
    ("labml BatchNorm", lambda: bt.BatchNorm(8, momentum=0.5), lambda: R.LabmlBatchNorm(8, momentum=0.5)),
]


@pytest.mark.parametrize("name,make,make_reference", SELECTIVELY_CHECKPOINTED,
                         ids=[c[0] for c in SELECTIVELY_CHECKPOINTED])
def test_a_selective_checkpoint_recomputes_the_update_as_for_the_documents_modules(name, make, make_reference,
                                                                                   eager_route, gen):
    """A review: under selective activation checkpointing (a dispatch mode: the custom ops' route) a training
    forward with batch statistics ran normalize_batch, which saves x, before update_running_; the recomputation,
    which stops once the saved tensors are back (non-reentrant checkpoint's early stop), never reached the update,
    so the buffers moved once, where those of the documents' modules (and of nn.BatchNorm2d) move twice, and a
    plain checkpoint moved them twice too. The update now comes before the op that saves."""
    import functools
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    recompute = functools.partial(create_selective_checkpoint_contexts,
                                  lambda ctx, op, *args, **kwargs: CheckpointPolicy.PREFER_RECOMPUTE)
    # the module last inside: a saved tensor of a later op would take the recomputation past the update
    _trains_as_the_documents_module(
        make, make_reference, gen, f"{name}, {eager_route}",
        lambda m, x: (checkpoint(m, x, use_reentrant=False, context_fn=recompute) * _CHANNEL_WEIGHTS).sin().sum()
        .backward(), steps=2)


# ---- from a mutation test of the torch front end (each fails on a mutant the suite let through) ---------------

def test_a_cumulative_average_trains_as_torch_s_on_both_routes(route, gen):
    """momentum=None: the running statistics are the average of every batch's, as nn.BatchNorm2d keeps them (the
    composed route's factor 1/count was not tested: a factor 1/(count + 1) went unnoticed)."""
    m = bt.BCNorm(8, 4).double()
    m.bn.momentum = None
    torch_bn = copy.deepcopy(m.bn)
    for step in range(3):
        x = rand_input(gen, (4, 8, 3, 3))
        m(x), torch_bn(x)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(m.bn, k), getattr(torch_bn, k), rtol=1e-12, atol=1e-12,
                                       msg=f"step {step}: {k} on the {route} route")


_COUNTED = [(n, f) for n, f, _, _ in MODULES if "num_batches_tracked" in dict(_bn(f(8, 4)).named_buffers())]


@pytest.mark.parametrize("name,make", _COUNTED, ids=[n for n, _ in _COUNTED])
def test_a_float_count_beside_dense_statistics_trains_as_an_int64_one(name, make, route, gen):
    """Only the count set by hand as a float (statistics dense, as loading with assign=True can leave them): the
    kernels, which take an int64 count, must not be handed it; the composed route counts in it, in place."""
    plain = make(8, 4).double()
    hand = copy.deepcopy(plain)
    stage = _bn(hand)
    stage.num_batches_tracked = stage.num_batches_tracked.double()
    count = stage.num_batches_tracked
    for step in range(2):
        x = rand_input(gen, (4, 8, 3, 3))
        torch.testing.assert_close(hand(x), plain(x), rtol=1e-12, atol=1e-12, msg=f"{name}, step {step}: output")
        for k, b in _bn(plain).named_buffers(recurse=False):
            torch.testing.assert_close(getattr(stage, k).to(b.dtype), b, rtol=1e-12, atol=1e-12,
                                       msg=f"{name}, step {step}: {k}")
    assert stage.num_batches_tracked is count and count.dtype == torch.float64
    assert count.item() == _bn(plain).num_batches_tracked.item()  # 2 where the module counts (EstBN counts none)


@pytest.mark.parametrize("make", [lambda: bt.BCNorm(8, 4), lambda: bt.BatchChannelNorm(8, 4),
                                  lambda: bt.ChannelNorm(8, 4)], ids=["BCNorm", "labml", "ChannelNorm"])
def test_a_float64_module_given_float32_takes_the_composed_route(make, gen, kernel_calls, monkeypatch):
    """torch's norms refuse mixed dtypes; bcnswift's take the composed route (documented in PYTORCH.md): the
    kernels take one dtype, so they must not be called."""
    m = make().double()
    twin = copy.deepcopy(m)
    x = rand_input(gen, (4, 8, 3, 3), torch.float32)
    y = m(x)
    assert y.dtype == torch.float32 and not kernel_calls.calls, kernel_calls.calls
    monkeypatch.setattr(functional, "COMPOSED", True)
    assert torch.equal(twin(x), y)


@pytest.mark.parametrize("registrar", ["register_module_forward_pre_hook", "register_module_forward_hook",
                                       "register_module_full_backward_hook",
                                       "register_module_full_backward_pre_hook"])
def test_every_global_hook_sees_the_stage(registrar, gen):
    """A global hook of any kind makes the batch-norm stage run itself, so that the hook sees it."""
    calls = []
    handle = getattr(torch.nn.modules.module, registrar)(lambda mod, *args: calls.append(type(mod).__name__))
    try:
        x = rand_input(gen, (4, 8, 5, 5)).requires_grad_()
        bt.BCNorm(8, 4).double()(x).square().sum().backward()
    finally:
        handle.remove()
    assert "BatchNorm2d" in calls and "BCNorm" in calls, calls


@pytest.mark.parametrize("kind", ["register_full_backward_hook", "register_full_backward_pre_hook"])
def test_a_backward_hook_alone_on_the_stage_runs(kind, route, gen):
    m = bt.BCNorm(8, 4).double()
    ran = []
    getattr(_stage_child(m), kind)(lambda mod, *grads: ran.append(len(grads)))
    x = rand_input(gen, (4, 8, 5, 5)).requires_grad_()
    m(x).square().sum().backward()
    assert ran, f"{kind} on the stage did not run ({route} route)"


def test_an_unbiased_running_variance_of_one_value_per_channel_is_refused_on_both_routes(route, gen):
    """A hand-built stage that estimates with an unbiased running variance, given one value per channel: the
    kernels' ValueError, in their words, on both routes (the composed route's check was untested: without it, it
    divides by zero), and nothing changed."""
    C = 4
    stage = functional.BatchNormStage(
        _ext.BCN_BATCH_NORM | _ext.BCN_ESTIMATED | _ext.BCN_UNBIASED_RUNNING_VAR, 1e-5, 0.1, None,
        torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64),
        torch.ones(C, dtype=torch.float64), torch.tensor(0), True, True)
    with pytest.raises(ValueError, match="an unbiased running variance needs more than 1 value per channel, got 1 "
                                         "value per channel over the whole batch"):
        functional.batch_channel_norm(rand_input(gen, (1, C)), stage, None)
    assert torch.equal(stage.running_mean, torch.zeros(C, dtype=torch.float64))
    assert torch.equal(stage.running_var, torch.ones(C, dtype=torch.float64)) and int(stage.num_batches_tracked) == 0
