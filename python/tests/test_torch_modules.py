"""bcnswift.torch's modules: the documents' names, state dicts and initial values; checkpoints both ways; the
composed path against the kernels; other dtypes; module life (eval, no_grad, copies, pickling, saving);
convert and fold_weight_standardization; the Weight-Standardized layers."""
import copy
import io
import os
import pickle
import subprocess
import sys

import pytest

from conftest import require
from test_torch_ops import LAYOUTS, eager_route, gen, rand_input  # noqa: F401 (fixtures)

torch = require("torch")
from bcnswift.torch import reference as R  # noqa: E402
import bcnswift.torch as bt  # noqa: E402
from bcnswift import _ext  # noqa: E402
from bcnswift.torch import _ops, functional  # noqa: E402
from bcnswift.torch.weight_standardized import PLAIN  # noqa: E402
from torch import nn  # noqa: E402


def _authors_est(C, G):
    m = R.BCNorm(C, G, 1e-5, estimate=True)
    m.bn.estbn_moving_speed.fill_(0.2)
    return m


def _ours_authors_est(C, G):
    m = bt.BCNorm(C, G, 1e-5, estimate=True)
    m.bn.estbn_moving_speed.fill_(0.2)
    return m


def _estbn(cls):
    def make(C, G):
        m = cls(C)
        m.estbn_moving_speed.fill_(0.2)
        return m
    return make


#: (name, reference factory, bcnswift factory), each (C, G) -> module
PAIRS = [
    ("authors BCNorm", lambda C, G: R.BCNorm(C, G, 1e-5), lambda C, G: bt.BCNorm(C, G, 1e-5)),
    ("authors BCNorm estimate", _authors_est, _ours_authors_est),
    ("authors EstBN", _estbn(R.EstBN), _estbn(bt.EstBN)),
    ("labml BatchChannelNorm", lambda C, G: R.LabmlBatchChannelNorm(C, G),
     lambda C, G: bt.BatchChannelNorm(C, G)),
    ("labml BatchChannelNorm batch", lambda C, G: R.LabmlBatchChannelNorm(C, G, estimate=False),
     lambda C, G: bt.BatchChannelNorm(C, G, estimate=False)),
    ("labml BatchNorm", lambda C, G: R.LabmlBatchNorm(C), lambda C, G: bt.BatchNorm(C)),
    ("labml EstimatedBatchNorm", lambda C, G: R.LabmlEstimatedBatchNorm(C),
     lambda C, G: bt.EstimatedBatchNorm(C)),
    ("labml ChannelNorm", lambda C, G: R.LabmlChannelNorm(C, G), lambda C, G: bt.ChannelNorm(C, G)),
]
IDS = [p[0] for p in PAIRS]


def randomize(module, gen):
    """Parameters and floating buffers drawn away from their initial values (variances positive)."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or "moving_speed" in name:
                continue
            lo = 0.5 if any(k in name for k in ("var", "weight", "scale")) else -0.5
            t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + lo)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_states_equal(a, b, what, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k].to(b[k].dtype), b[k], rtol=rtol, atol=atol, msg=f"{what}: {k}")


@pytest.mark.parametrize("name,make_ref,make_ours", PAIRS, ids=IDS)
def test_fresh_modules_hold_the_documents_state(name, make_ref, make_ours):
    ref, ours = make_ref(8, 4), make_ours(8, 4)
    assert list(ours.state_dict()) == list(ref.state_dict()), name
    assert_states_equal(_state(ours), _state(ref), name)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("make_ref,make_ours", [
    (lambda: R.BCNorm(8, 4, 1e-5, estimate=True), lambda: bt.BCNorm(8, 4, 1e-5, estimate=True)),
    (lambda: R.EstBN(8), lambda: bt.EstBN(8)),
], ids=["BCNorm estimate", "EstBN"])
def test_fresh_estbn_has_moving_speed_zero_and_freezes_its_estimates(make_ref, make_ours, gen):
    """Seed 003's EstBN starts with estbn_moving_speed = 0: training forwards then leave the estimates as they
    are, in both implementations. (The PAIRS above set the speed to 0.2 on both sides, to compare updates.)"""
    ref, ours = make_ref().double(), make_ours().double()
    assert_states_equal(_state(ours), _state(ref), "fresh")
    speeds = [v for k, v in ours.state_dict().items() if k.endswith("estbn_moving_speed")]
    assert len(speeds) == 1 and speeds[0].tolist() == [0.0]
    before = _state(ours)
    x = rand_input(gen, (2, 8, 3, 3))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    assert_states_equal(_state(ours), before, "after a training forward")
    assert_states_equal(_state(ref), before, "the reference, after a training forward")


@pytest.mark.parametrize("name,make_ref,make_ours", PAIRS, ids=IDS)
def test_checkpoints_load_both_ways_and_give_the_same_outputs(name, make_ref, make_ours, gen):
    ref, ours = make_ref(8, 4).double(), make_ours(8, 4).double()
    randomize(ref, gen)
    ours.load_state_dict(ref.state_dict(), strict=True)
    for step in range(3):
        x = rand_input(gen, (2, 8, 3, 4))
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12, msg=f"{name}: step {step}")
    back = make_ref(8, 4).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    assert_states_equal(_state(back), _state(ref), name, rtol=1e-13, atol=1e-13)
    ours.eval(), ref.eval()
    x = rand_input(gen, (2, 8, 3, 4))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12, msg=f"{name}: eval")


# ---- the composed path --------------------------------------------------------------------------------------

def _distinct_eps(module):
    """Each stage of `module` (the module and its submodules that hold an eps) given an eps of its own: 0.05, 0.3,
    ... of the same order as the variances, so that the output depends on which eps a stage takes."""
    stages = [m for m in module.modules() if hasattr(m, "eps")]
    for k, m in enumerate(stages):
        m.eps = 0.05 + 0.25 * k
    return module


def _run(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}, _state(module)


@pytest.mark.parametrize("name,make_ref,make_ours", PAIRS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_composed_path_matches_the_kernels(name, make_ref, make_ours, layout, dtype, gen, monkeypatch):
    """Training and eval, with each stage's own eps, large enough to move the output beyond the tolerance: a route
    that gave one stage the other's eps would show."""
    fast = make_ours(8, 4).to(dtype)
    randomize(fast, gen)
    _distinct_eps(fast)
    composed = copy.deepcopy(fast)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for mode in ("train", "eval"):
        fast.train(mode == "train"), composed.train(mode == "train")
        x = rand_input(gen, (2, 8, 3, 5), dtype, layout)
        dy = rand_input(gen, (2, 8, 3, 5), dtype, layout)
        a = _run(fast, x, dy)
        monkeypatch.setattr(functional, "COMPOSED", True)
        b = _run(composed, x, dy)
        monkeypatch.setattr(functional, "COMPOSED", False)
        for what, u, v in (("output", a[0], b[0]), ("dx", a[1], b[1])):
            torch.testing.assert_close(u, v, **tol, msg=f"{name}, {mode}: {what}")
        assert a[0].stride() == b[0].stride() == x.stride(), f"{name}: layouts"
        for k in a[2]:
            torch.testing.assert_close(a[2][k], b[2][k], **tol, msg=f"{name}, {mode}: grad {k}")
        assert_states_equal(a[3], b[3], f"{name}, {mode}", **tol)
        fast.zero_grad(), composed.zero_grad()


def test_composed_path_is_forced_by_the_environment():
    code = ("import pytest, torch, bcnswift.torch as bt\n"
            "from torch_kernel_calls import KernelCalls\n"
            "with pytest.MonkeyPatch.context() as patch:\n"
            "    calls = KernelCalls(patch)\n"
            "    bt.BCNorm(4, 2)(torch.randn(2, 4, 3) + 1)\n"
            "    print(bt.functional.COMPOSED, len(calls.named('norm_forward')))\n")
    # the words of every bcnswift switch (bcnswift._switches): "false" was on, as was anything but "" and "0"
    for value, expected in (("1", "True 0"), ("0", "False 1"), (" Yes ", "True 0"), ("false", "False 1"),
                            ("off", "False 1"), ("", "False 1"), ("maybe", "False 1")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=os.path.dirname(os.path.abspath(__file__)),
                             env={**os.environ, "BCNSWIFT_TORCH_COMPOSED": value})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected, value
        # the warning names the user's line (here the -c code's), not bcnswift's
        warned = "<string>:1: RuntimeWarning: BCNSWIFT_TORCH_COMPOSED='maybe' is neither on" in out.stderr
        assert warned == (value == "maybe"), out.stderr


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(bt.Conv2d(3, 8, 3), bt.BCNorm(8, 4)),
    lambda: nn.Sequential(bt.Conv2d(3, 8, 3, convention="labml"), bt.BCNorm(8, 4, estimate=True)),
    lambda: nn.Sequential(bt.ConvTranspose2d(3, 8, 3), bt.BatchChannelNorm(8, 4)),
    lambda: nn.Sequential(bt.Conv2d(3, 8, 3), bt.BatchChannelNorm(8, 4, estimate=False), bt.ChannelNorm(8, 2)),
], ids=["authors", "authors estimate + labml WS", "labml + ConvTranspose2d", "labml batch + ChannelNorm"])
def test_a_model_on_another_device_takes_the_composed_path(make, monkeypatch, kernel_calls):
    """Tensors off the CPU never reach the kernels: here on PyTorch's meta device (shapes without memory,
    where any kernel call would fail), forward and backward in training and eval. A GPU takes the same route."""
    monkeypatch.setattr(_ops, "_kernels", None)  # any Python kernel call would raise
    model = make().to("meta")
    for training in (True, False):
        model.train(training)
        x = torch.empty(2, 3, 6, 6, device="meta", requires_grad=True)
        y = model(x)
        y.sum().backward()
        assert y.device.type == "meta" and x.grad.shape == x.shape
        assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
        model.zero_grad()
    assert not kernel_calls.calls


@pytest.mark.parametrize("layer,shape", [
    (lambda: bt.Conv2d(3, 5, 3), (2, 3, 6, 6)),
    (lambda: bt.Conv2d(3, 5, 3, convention="labml"), (2, 3, 6, 6)),
    (lambda: bt.ConvTranspose2d(3, 6, 3, groups=3), (2, 3, 4, 4)),
    (lambda: bt.Linear(7, 5), (4, 7)),
], ids=["Conv2d", "Conv2d labml", "ConvTranspose2d", "Linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_standardization_composed_path_matches_the_kernels(layer, shape, dtype, gen, monkeypatch,
                                                                  kernel_calls):
    fast = layer().to(dtype)
    with torch.no_grad():
        fast.weight.copy_(rand_input(gen, tuple(fast.weight.shape), dtype))
    composed = copy.deepcopy(fast)
    x = rand_input(gen, shape, dtype)
    with torch.no_grad():
        dy = rand_input(gen, tuple(fast(x).shape), dtype)
    kernel_calls.clear()
    a = _run(fast, x, dy)
    monkeypatch.setattr(functional, "COMPOSED", True)
    b = _run(composed, x, dy)
    # the kernels ran for `fast` alone
    assert [c.name for c in kernel_calls.calls] == ["ws_forward", "ws_backward"], kernel_calls.calls
    rel = 1e-12 if dtype == torch.float64 else 1e-5  # relative to each quantity's largest magnitude
    for what, u, v in (("output", a[0], b[0]), ("dx", a[1], b[1]), ("weight grad", a[2]["weight"],
                                                                    b[2]["weight"])):
        torch.testing.assert_close(u, v, rtol=rel, atol=rel * float(v.abs().max()), msg=what)


@pytest.mark.parametrize("eps_in_sqrt", [False, True], ids=["authors", "labml"])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_weight_standardization_follows_its_formula_on_both_routes(eps_in_sqrt, unbiased, dtype, gen,
                                                                               monkeypatch):
    """functional.weight_standardization, each convention and deviation, on the kernels and the composed route,
    against its formula in float64 (output, and the weight's gradient by autograd through the formula): unbiased
    or not is the route's to honour, which the WS layers (always unbiased) cannot show. eps is 0.1, of the order
    of the deviations, so that where it goes shows too."""
    w = rand_input(gen, (6, 3, 2, 2), dtype)  # a fan-in of 12: the two deviations differ by 4%
    eps = 0.1
    exact = w.to(torch.float64, copy=True).requires_grad_()  # (a copy: w itself stays without grad)
    rows = exact.reshape(6, -1)
    centred = rows - rows.mean(dim=1, keepdim=True)
    var = rows.var(dim=1, unbiased=unbiased, keepdim=True)
    expected = (centred / (torch.sqrt(var + eps) if eps_in_sqrt else torch.sqrt(var) + eps)).reshape(w.shape)
    g = rand_input(gen, tuple(w.shape))
    expected_grad, = torch.autograd.grad(expected, exact, g)
    rel = 1e-12 if dtype == torch.float64 else 1e-5  # relative to each quantity's largest magnitude
    for route in ("kernels", "composed"):
        monkeypatch.setattr(functional, "COMPOSED", route == "composed")
        x = w.clone().requires_grad_()
        out = functional.weight_standardization(x, eps, eps_in_sqrt=eps_in_sqrt, unbiased=unbiased)
        out.backward(g.to(dtype))
        for what, u, v in (("output", out.detach(), expected.detach()), ("weight grad", x.grad, expected_grad)):
            torch.testing.assert_close(u.double(), v, rtol=rel, atol=rel * float(v.abs().max()),
                                       msg=f"{route}: {what}")


def _randomized(module, gen):
    """`module` with every parameter and buffer drawn afresh (non-zero means; positive variances), so that the
    affine terms and the running statistics take part in what a test compares."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
                elif not name.endswith("estbn_moving_speed"):
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.5 + 0.8)
    return module


@pytest.mark.parametrize("estimate", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_takes_the_composed_path_and_stays_within_its_rounding(dtype, estimate, gen):
    """Half precision runs the composed route. Output, dx and every parameter gradient are compared with the
    authors' module in float64 on the same (half-rounded) numbers, within the dtype's epsilon of each quantity's
    largest magnitude (the output: the route computes in float32 and rounds once) or four times it (gradients):
    a group variance divided by n - 1 instead of n in the half route passed the tolerances this test had before
    (2e-2 against bcnswift's own float32)."""
    ref = _randomized(R.BCNorm(8, 4, 1e-5, estimate=estimate).double(), gen)
    if estimate:
        ref.bn.estbn_moving_speed.fill_(0.1)
    ours = bt.BCNorm(8, 4, estimate=estimate)
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(dtype)
    ref.load_state_dict({k: v.to(dtype).double() if v.is_floating_point() else v
                         for k, v in ours.state_dict().items()})  # the same half-rounded numbers
    x = rand_input(gen, (2, 8, 4, 4), dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64) + 0.5
    y, expected = ours(x), ref(x64)
    assert y.dtype == dtype
    y.backward(dy.to(dtype))
    expected.backward(dy.to(dtype).double())
    eps = torch.finfo(dtype).eps
    pairs = [("output", y, expected, 1), ("dx", x.grad, x64.grad, 4)]  # the output: one rounding to half
    pairs += [(f"grad {name}", p.grad, dict(ref.named_parameters())[name].grad, 4)
              for name, p in ours.named_parameters()]
    for what, got, truth, k in pairs:
        torch.testing.assert_close(got.double(), truth, rtol=0, atol=k * eps * float(truth.detach().abs().max()),
                                   msg=lambda m: f"{what}: {m}")
    for name, b in ours.named_buffers():  # the running statistics' update (estimate mode: before normalizing)
        if b.is_floating_point():
            truth = dict(ref.named_buffers())[name]
            torch.testing.assert_close(b.double(), truth, rtol=0, atol=2 * eps * float(truth.abs().max()),
                                       msg=lambda m: f"{name}: {m}")


def test_autocast_runs_and_stays_within_bfloat16_rounding(gen):
    """Under CPU autocast (bfloat16 convolutions), the normalization's output and every gradient stay within a few
    bfloat16 epsilons of the same model in float32, on drawn (not fresh) parameters."""
    model = nn.Sequential(bt.Conv2d(3, 8, 3, padding=1), _randomized(bt.BCNorm(8, 4), gen), nn.ReLU())
    x = rand_input(gen, (2, 3, 6, 6), torch.float32)
    twin = copy.deepcopy(model)
    expected = twin(x)
    expected.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=8 * eps * float(expected.detach().abs().max()))
    # one scale for every gradient: the convolution's bias gradient is 0 up to rounding (the batch norm after it
    # takes every channel's mean away), so its own largest magnitude is no scale
    scale = max(float(q.grad.abs().max()) for q in twin.parameters())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=16 * eps * scale, msg=lambda m: f"{name}: {m}")


# ---- module life --------------------------------------------------------------------------------------------

def test_no_grad_inference_mode_eval_copies_pickles_and_saves(gen):
    m = bt.BCNorm(8, 4, estimate=True)
    m.bn.estbn_moving_speed.fill_(0.1)
    x = rand_input(gen, (2, 8, 3, 3), torch.float32)
    twin = copy.deepcopy(m)  # runs each step with autograd: no_grad and inference_mode must change nothing else
    with torch.no_grad():
        y = m(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, twin(x).detach(), rtol=0, atol=0)
    with torch.inference_mode():
        y = m(x)
    assert y.is_inference()
    torch.testing.assert_close(y.clone(), twin(x).detach(), rtol=0, atol=0)
    assert_states_equal(_state(m), _state(twin), "no_grad and inference_mode update the estimates as autograd does")
    assert m.bn.running_mean.abs().sum() > 0
    m.eval(), twin.eval()
    with torch.inference_mode():
        torch.testing.assert_close(m(x), twin(x).detach(), rtol=0, atol=0)
    before = _state(m)
    y1 = m(x)
    assert_states_equal(_state(m), before, "eval changes nothing")
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(clone(x), y1, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = bt.BCNorm(8, 4, estimate=True).eval()
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), y1, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), y1, rtol=0, atol=0)


@pytest.mark.parametrize("composed", [False, True], ids=["kernels", "composed"])
@pytest.mark.parametrize("name", ["authors BCNorm", "authors BCNorm estimate", "labml BatchChannelNorm"])
def test_buffers_made_under_inference_mode_train_only_there(gen, monkeypatch, name, composed):
    """As torch's batch norms: a training forward outside inference mode refuses to update inference tensors in
    place, on the kernels as on the composed route (whose copy_ torch refuses), and changes nothing."""
    monkeypatch.setattr(functional, "COMPOSED", composed)
    make = dict((p[0], p[2]) for p in PAIRS)[name]
    with torch.inference_mode():
        m = make(8, 4)
    x = rand_input(gen, (2, 8, 3, 3), torch.float32)
    before = _state(m)
    with pytest.raises(RuntimeError, match="inference tensors .made under torch.inference_mode"):
        m(x)
    assert_states_equal(_state(m), before, "a refused forward changes nothing")
    with torch.inference_mode():
        y = m(x)  # inside inference mode torch updates them: so does bcnswift
    twin = make(8, 4)
    twin.load_state_dict(before)
    torch.testing.assert_close(y.clone(), twin(x).detach(), rtol=0, atol=0)
    assert_states_equal(_state(m), _state(twin), "trained under inference_mode as outside it")
    with torch.no_grad():
        m.eval()(x)  # eval writes nothing: allowed


def test_parameters_made_under_inference_mode_differ_by_route(gen, monkeypatch):
    """docs/PYTORCH.md: in eval, an input that requires grad and parameters made under inference mode: the
    composed route raises as nn.BatchNorm2d does (torch will not save inference tensors for backward); the
    kernels' route gives the gradients of the same module made outside inference mode (float64)."""
    with torch.inference_mode():
        m = bt.BCNorm(8, 4, dtype=torch.float64)
        bn = nn.BatchNorm2d(8, dtype=torch.float64)
        m(rand_input(gen, (4, 8, 3, 3)))  # running statistics other than 0 and 1
    twin = bt.BCNorm(8, 4, dtype=torch.float64)
    twin.load_state_dict(m.state_dict())
    m.eval(), bn.eval(), twin.eval()
    x = rand_input(gen, (2, 8, 3, 3)).requires_grad_()
    for module in (bn, m):
        monkeypatch.setattr(functional, "COMPOSED", True)
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            module(x)
    monkeypatch.setattr(functional, "COMPOSED", False)
    dy = rand_input(gen, (2, 8, 3, 3))
    got = torch.autograd.grad(m(x), x, dy)[0]
    expected = torch.autograd.grad(twin(x), x, dy)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_track_running_stats_false_and_no_affine_follow_torch(gen):
    m = bt.BCNorm(8, 4)
    m.bn = nn.BatchNorm2d(8, affine=False, track_running_stats=False)
    ref = R.BCNorm(8, 4, 1e-5)
    ref.bn = nn.BatchNorm2d(8, affine=False, track_running_stats=False)
    for mode in (True, False):
        m.train(mode), ref.train(mode)
        x = rand_input(gen, (2, 8, 3, 3), torch.float32)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    m.bn = nn.BatchNorm2d(8, momentum=None)  # cumulative average
    ref.bn = nn.BatchNorm2d(8, momentum=None)
    m.train(), ref.train()
    for _ in range(3):
        x = rand_input(gen, (2, 8, 3, 3), torch.float32)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert_states_equal(_state(m), _state(ref), "cumulative", rtol=1e-6, atol=1e-6)


# ---- convert and fold ---------------------------------------------------------------------------------------

def test_convert_swaps_layers_and_keeps_what_it_should(gen):
    model = nn.Sequential(nn.Conv2d(3, 24, 3, bias=False), nn.BatchNorm2d(24, eps=1e-3, momentum=0.3), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(24, 20, 1), nn.GroupNorm(5, 20, eps=1e-4)))
    randomize(model, gen)
    model[1].num_batches_tracked.fill_(7)
    original = copy.deepcopy(model)
    converted = bt.convert(model, num_groups=7, estimate=True, momentum=0.05)
    assert converted is model
    assert type(model[0]) is bt.Conv2d and type(model[3][0]) is bt.Conv2d
    assert torch.equal(model[0].weight, original[0].weight) and torch.equal(model[3][0].bias, original[3][0].bias)
    bn = model[1]
    assert type(bn) is bt.BCNorm and bn.num_groups == 6 and bn.eps == 1e-3 and bn.bn.eps == 1e-3
    assert isinstance(bn.bn, bt.EstBN) and float(bn.bn.estbn_moving_speed) == pytest.approx(0.05)
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn.bn, k), getattr(original[1], k)), k
    gn = model[3][1]
    assert type(gn) is bt.BCNorm and gn.num_groups == 5 and gn.eps == 1e-4
    assert torch.equal(gn.bn.weight, original[3][1].weight) and torch.equal(gn.bn.bias, original[3][1].bias)
    # estimate=False keeps a BatchNorm2d (its momentum too); existing BCNorms are left alone
    again = bt.convert(copy.deepcopy(original), num_groups=32, estimate=False, weight_standardization=False)
    assert type(again[0]) is nn.Conv2d and isinstance(again[1].bn, nn.BatchNorm2d)
    assert again[1].bn.momentum == 0.3 and again[1].num_groups == 24
    nested = nn.Sequential(bt.BCNorm(8, 4))
    assert type(bt.convert(nested)[0].bn) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="num_groups"):
        bt.convert(model, num_groups=0)


def test_largest_divisor_at_most():
    assert [bt.largest_divisor_at_most(c, g) for c, g in ((64, 32), (24, 7), (7, 32), (20, 5), (1, 8))] == \
        [32, 6, 7, 5, 1]


def test_fold_weight_standardization_gives_plain_layers_with_the_same_outputs(gen):
    model = nn.Sequential(bt.Conv2d(3, 8, 3, padding=1), bt.BCNorm(8, 4), nn.ReLU(),
                          bt.ConvTranspose2d(8, 4, 3, stride=2, output_padding=1),
                          nn.Flatten(), bt.Linear(4 * 14 * 14, 5, convention="labml")).double().eval()
    x = rand_input(gen, (2, 3, 6, 6))
    expected = model(x)
    folded = bt.fold_weight_standardization(model)
    assert [type(m) for m in folded] == [nn.Conv2d, bt.BCNorm, nn.ReLU, nn.ConvTranspose2d, nn.Flatten, nn.Linear]
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)
    assert not any(m.training for m in folded.modules())  # an eval model folds into one


@pytest.mark.parametrize("estimate", [False, True])
def test_convert_keeps_each_layer_s_mode(estimate, gen):
    """An eval model converted stays in eval (its BCNorms would otherwise normalize with batch statistics and
    move their running buffers at inference); a training one stays in training."""
    for training in (False, True):
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(4, 8)).double().train(training)
        bt.convert(m, 4, estimate=estimate)
        assert {c.training for c in m.modules()} == {training}, (training, m)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        m(rand_input(gen, (2, 3, 6, 6)))
        moved = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
        assert bool(moved) == training, (training, moved)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_fold_takes_what_a_computed_weights_next_call_would_use_and_changes_nothing(gen):
    """A WS layer carrying a parametrization (its class a subclass of the WS class) was left unfolded, still
    standardizing on every call; one under torch's hook-based weight_norm or spectral_norm folded the weight the
    hook computed at the last call, stale after an optimizer step (off by about 10 here). Each now folds what its
    next call in eval mode computes (a hook-computed bias too), read without moving spectral_norm's vectors; a
    subclass with its own forward stays. Two identical models take the same step: one is folded at once, the
    other's next eval call is the truth. A review added a layer pruned with torch.nn.utils.prune (a mask applied
    in a hook, as weight_norm's), which folded the stale weight too, and a subclass that only adds an attribute,
    which was left unfolded."""
    from torch.nn.utils import parametrizations, prune, spectral_norm, weight_norm

    class OwnForward(bt.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1

    class Tagged(bt.Conv2d):  # no code of its own
        tag = "mine"

    def make():
        torch.manual_seed(5)
        layers = [bt.Conv2d(3, 8, 3, padding=1), bt.Conv2d(8, 8, 3, padding=1), bt.Conv2d(8, 8, 3, padding=1),
                  bt.Conv2d(8, 8, 3, padding=1), Tagged(8, 8, 3, padding=1),
                  nn.Flatten(), bt.Linear(8 * 6 * 6, 5), bt.Linear(5, 4)]
        parametrizations.weight_norm(layers[0])
        weight_norm(layers[1])
        spectral_norm(layers[2])
        prune.l1_unstructured(layers[3], "weight", amount=0.3)
        parametrizations.spectral_norm(layers[6])
        weight_norm(layers[7], name="bias", dim=0)
        return nn.Sequential(*layers, OwnForward(1, 1, 1)).double()

    x = rand_input(gen, (2, 3, 6, 6))
    folded_model, truth = make(), make()
    for model in (folded_model, truth):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model[:8](x).square().sum().backward()
        optimizer.step()  # the hooks' weights are now stale until the next call
    # spectral_norm's power-iteration vectors, which a read in training mode would move
    originals = list(folded_model)
    vectors = [originals[2].weight_u, originals[2].weight_v, originals[6].parametrizations.weight[0]._u,
               originals[6].parametrizations.weight[0]._v]
    before = [v.clone() for v in vectors]
    folded = bt.fold_weight_standardization(folded_model)  # in training mode, straight after the step
    assert [type(m) for m in folded] == [nn.Conv2d] * 5 + [nn.Flatten, nn.Linear, nn.Linear, OwnForward]
    assert all(torch.equal(v, b) for v, b in zip(vectors, before))
    assert originals[6].training and originals[6].parametrizations.weight[0].training  # modes restored
    truth.eval()
    folded.eval()
    torch.testing.assert_close(folded[:8](x), truth[:8](x), rtol=1e-12, atol=1e-12)
    for i in (3, 4):  # layer by layer too: the pruned one and the subclass
        h = rand_input(gen, (2, 8, 6, 6))
        torch.testing.assert_close(folded[i](h), truth[i](h), rtol=1e-12, atol=1e-12, msg=f"layer {i}")
    assert all(type(m.weight) is nn.Parameter and m.weight.requires_grad for m in folded[:8] if hasattr(m, "weight"))
    assert type(folded[7].bias) is nn.Parameter and folded[7].bias.requires_grad


# ---- Weight Standardization ---------------------------------------------------------------------------------

def _reference_ws(w, eps, convention):
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    if convention == "labml":
        out = (flat - mean) / torch.sqrt(flat.var(dim=1, keepdim=True) + eps)
    else:
        out = (flat - mean) / (flat.std(dim=1, keepdim=True) + eps)
    return out.reshape(w.shape)


def reference_ws_transposed(w, groups, eps, convention):
    """`_reference_ws` of a ConvTranspose weight [in, out/groups, *k], output channel by output channel: channel
    k·(out/groups) + j reads, and is standardized over, w[k·in/groups:(k+1)·in/groups, j]."""
    out = torch.empty_like(w)
    per_group = w.shape[0] // groups
    for k in range(groups):
        block = slice(k * per_group, (k + 1) * per_group)
        for j in range(w.shape[1]):
            out[block, j] = _reference_ws(w[block, j].unsqueeze(0), eps, convention)[0]
    return out


@pytest.mark.parametrize("convention", ["authors", "labml"])
@pytest.mark.parametrize("layer,shape", [
    (lambda c: bt.Conv1d(3, 5, 3, convention=c), (2, 3, 7)),
    (lambda c: bt.Conv2d(3, 5, 3, groups=1, convention=c), (2, 3, 6, 6)),
    (lambda c: bt.Conv3d(3, 5, 2, convention=c), (2, 3, 4, 4, 4)),
    (lambda c: bt.ConvTranspose2d(3, 6, 3, groups=3, convention=c), (2, 3, 4, 4)),
    (lambda c: bt.Linear(7, 5, convention=c), (4, 7)),
], ids=["Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear"])
def test_weight_standardized_layers_match_the_formula(convention, layer, shape, gen):
    m = layer(convention).double()
    x = rand_input(gen, shape)
    w = m.weight
    if isinstance(m, nn.ConvTranspose2d):  # output channels on dim 1, each over its group's inputs
        expected_w = reference_ws_transposed(w, m.groups, 1e-5, convention)
    else:
        expected_w = _reference_ws(w, 1e-5, convention)
    torch.testing.assert_close(m.standardized_weight(), expected_w, rtol=1e-12, atol=1e-12)
    plain = copy.deepcopy(m)
    plain.__class__ = PLAIN[type(m)]  # the torch layer, computing with the reference's weight
    with torch.no_grad():
        plain.weight.copy_(expected_w)
    torch.testing.assert_close(m(x), plain(x), rtol=1e-12, atol=1e-12)


def test_weight_standardization_against_the_transcribed_convolutions(gen):
    for ours, ref in ((bt.Conv2d(4, 6, 3), R.AuthorsConv2d(4, 6, 3)),
                      (bt.Conv2d(4, 6, 3, convention="labml"), R.LabmlConv2d(4, 6, 3))):
        ref.load_state_dict(ours.state_dict(), strict=True)
        ours.double(), ref.double()
        x = rand_input(gen, (2, 4, 7, 7))
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="convention"):
        bt.Conv2d(4, 6, 3, convention="tf")


@pytest.mark.parametrize("name,make_ref,make_ours", PAIRS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_route_and_registered_ops_give_the_same_bits(name, make_ref, make_ours, layout, gen, monkeypatch):
    """Eager mode makes one call per layer; torch.compile traces the ops (normalize_batch and update_running_,
    or moments, update_running_ and normalize): here the ops run eagerly, as if traced, and must agree bit for
    bit."""
    eager = make_ours(8, 4)
    randomize(eager, gen)
    traced = copy.deepcopy(eager)
    for mode in ("train", "eval"):
        eager.train(mode == "train"), traced.train(mode == "train")
        x = rand_input(gen, (2, 8, 3, 5), torch.float32, layout)
        dy = rand_input(gen, (2, 8, 3, 5), torch.float32, layout)
        a = _run(eager, x, dy)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        b = _run(traced, x, dy)
        monkeypatch.undo()
        for what, u, v in (("output", a[0], b[0]), ("dx", a[1], b[1])):
            assert torch.equal(u, v), f"{name}, {mode}: {what}"
        for k in a[2]:
            assert torch.equal(a[2][k], b[2][k]), f"{name}, {mode}: grad {k}"
        for k in a[3]:
            assert torch.equal(a[3][k], b[3][k]), f"{name}, {mode}: {k}"
        eager.zero_grad(), traced.zero_grad()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_tensor_hooks_may_hand_back_x_in_another_layout(layout, eager_route, gen):
    """The eager backward skips its checks of x when x still lies as the forward read it. A saved-tensor hook
    may hand x back in another memory layout (torch.autograd.graph.save_on_cpu copies into C order, dropping
    channels_last): the backward then lays x out again and gives the same bits as without the hook, with dx in
    x's layout as the forward had it."""
    module = bt.BCNorm(8, 4)
    randomize(module, gen)
    x = rand_input(gen, (2, 8, 3, 5), torch.float32, layout)
    dy = rand_input(gen, (2, 8, 3, 5), torch.float32, layout)
    other = torch.channels_last if layout == "contiguous" else torch.contiguous_format
    plain = _run(copy.deepcopy(module), x, dy)
    unpacked = []

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: t.contiguous(memory_format=other) if t.dim() == 4 else t, unpack):  # x (the context: 1-D)
        hooked = _run(module, x, dy)
    assert any(t.shape == x.shape and t.stride() != x.stride() for t in unpacked), "the hook moved no x"
    for what, u, v in (("output", plain[0], hooked[0]), ("dx", plain[1], hooked[1])):
        assert torch.equal(u, v) and u.stride() == v.stride() == x.stride(), what
    for k in plain[2]:
        assert torch.equal(plain[2][k], hooked[2][k]), f"grad {k}"


@pytest.mark.parametrize("restores", ["float32", "the dtype it packed", "scaled by the largest magnitude",
                                      "a copy"])
def test_saved_tensor_hooks_that_round_leave_the_context_exact(eager_route, restores, gen):
    """A memory-saving pack hook that stores saved tensors in half precision (a common pattern) also rounds the
    stamped copy of the forward's context, which the eager routes save so that a recomputing checkpoint replaces
    it: the backward sees the stamps broken (or the dtype changed) and takes the context kept aside, exact, on both
    routes; an exact copy keeps them, and is taken. Here the hook rounds the float64 tensors alone (the context),
    so the gradients are those without it, bit for bit. (A single stamp of 2⁵³ - 1, the context's largest value,
    survived a hook that scales by the largest magnitude, and the backward took the rounded context.)"""
    module = bt.BCNorm(8, 4)
    randomize(module, gen)
    x = rand_input(gen, (2, 8, 3, 5), torch.float32)
    dy = rand_input(gen, (2, 8, 3, 5), torch.float32)
    seen = []

    def pack(t):
        seen.append((tuple(t.shape), t.dtype, t[-len(_ops._STAMP):].tolist() if t.dtype == torch.float64 else None))
        if t.dtype != torch.float64:
            return t.dtype, t, None
        if restores == "a copy":
            return t.dtype, t.clone(), None
        scale = t.abs().max() if restores == "scaled by the largest magnitude" else None
        return t.dtype, (t if scale is None else t / scale).to(torch.float16), scale

    def unpack(packed):
        dtype, t, scale = packed
        t = t.to(torch.float32 if restores == "float32" and dtype == torch.float64 else dtype)
        return t if scale is None else t * scale
    plain = _run(copy.deepcopy(module), x, dy)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        hooked = _run(module, x, dy)
    assert seen[0][:2] == ((2, 8, 3, 5), torch.float32) and [s[1] for s in seen[1:]] == [torch.float64], seen
    assert tuple(seen[1][2]) == _ops._STAMP, "the route's stamps are not _ops._STAMP"  # native_ops.cpp's too
    for what, u, v in (("output", plain[0], hooked[0]), ("dx", plain[1], hooked[1])):
        assert torch.equal(u, v), what
    for k in plain[2]:
        assert torch.equal(plain[2][k], hooked[2][k]), f"grad {k}"


@pytest.mark.parametrize("present", ["weight", "bias"])
def test_a_stage_with_one_affine_parameter_gets_its_gradient(present, gen, monkeypatch):
    """The functional form takes a stage with only a weight or only a bias (None for the other): the kernels'
    gradient of the one given matches the composed path's (it used to fail for a bias alone)."""
    C, G = 8, 4
    x = rand_input(gen, (3, C, 4, 5), torch.float64)
    dy = rand_input(gen, (3, C, 4, 5), torch.float64)

    def run():
        xg = x.clone().requires_grad_()
        bn_p = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        cn_p = (torch.rand(1, G, 1, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        bn_w, bn_b = (bn_p, None) if present == "weight" else (None, bn_p)
        cn_w, cn_b = (cn_p, None) if present == "weight" else (None, cn_p)
        bn = functional.BatchNormStage(_ext.BCN_BATCH_NORM, 1e-5, 0.1, None, bn_w, bn_b, None, None, None, True,
                                       False)
        functional.batch_channel_norm(xg, bn, functional.ChannelNormStage(G, 1e-5, cn_w, cn_b)).backward(dy)
        return xg.grad, bn_p.grad, cn_p.grad

    state = gen.get_state()
    fast = run()
    gen.set_state(state)
    monkeypatch.setattr(functional, "COMPOSED", True)
    composed = run()
    for what, u, v in zip(("dx", f"batch norm {present}", f"channel norm {present}"), fast, composed):
        assert u is not None and u.shape == v.shape, what
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10, msg=what)
