"""Every setting a user gives bcnswift.torch reaches the computation, or is refused where it is given: convert's
momentum and the types it swaps, the torch arguments of the layers convert and fold make (dilation, groups,
padding modes, ...), a WS ConvTranspose2d's output_size and padding_mode, the modules' group counts and input
ranks, and labml's track_running_stats switched after construction. Each test here kills a change to the library
that the rest of the suite let pass (a mutation test; docs/TESTING.md)."""
import copy
import re

import pytest

from conftest import require
from test_torch_modules import _reference_ws, _state, assert_states_equal, randomize, reference_ws_transposed
from test_torch_ops import gen, rand_input  # noqa: F401 (gen is a fixture)

torch = require("torch")
import bcnswift.torch as bt  # noqa: E402
from bcnswift.torch import reference as R  # noqa: E402
from torch import nn  # noqa: E402


# ---- convert's arguments ------------------------------------------------------------------------------------

def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(4, 8))


@pytest.mark.parametrize("kw,message", [
    ({"momentum": 1.5}, "momentum must be in [0, 1], got 1.5"),
    ({"momentum": -0.1}, "momentum must be in [0, 1], got -0.1"),
    ({"momentum": float("nan")}, "momentum must be in [0, 1], got nan"),
    ({"momentum": None}, "estimate=True needs a momentum (EstBN has no cumulative average)"),
], ids=["above 1", "negative", "nan", "None with estimates"])
def test_convert_refuses_a_momentum_no_estimate_could_take_and_changes_nothing(kw, message):
    model = _model()
    kinds, before = [type(m) for m in model.modules()], _state(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        bt.convert(model, num_groups=4, estimate=True, **kw)
    assert [type(m) for m in model.modules()] == kinds
    assert_states_equal(_state(model), before, "after a refused convert")


@pytest.mark.parametrize("model", [[nn.BatchNorm2d(8)], "model", None, nn.BatchNorm2d], ids=repr)
def test_convert_and_fold_refuse_what_is_not_a_module_in_words(model):
    for surgery in (bt.convert, bt.fold_weight_standardization):
        with pytest.raises(TypeError, match=f"expected a model \\(a torch.nn.Module\\), got {type(model).__name__}"):
            surgery(model)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_convert_takes_the_ends_of_the_momentum_range_as_the_moving_speed(momentum, gen):
    """A speed of 1 replaces the estimates by the batch's at every step; 0 freezes them (the authors' default)."""
    model = bt.convert(_model().double(), num_groups=4, estimate=True, momentum=momentum)
    speeds = [m.bn.estbn_moving_speed.item() for m in model if isinstance(m, bt.BCNorm)]
    assert speeds == [momentum, momentum]
    reference = R.EstBN(8).double()
    reference.load_state_dict(model[1].bn.state_dict())
    x = rand_input(gen, (2, 3, 6, 6))
    h = model[0](x)  # what the BCNorm receives
    model(x)
    reference(h)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[1].bn, name), getattr(reference, name), rtol=1e-12, atol=1e-12,
                                   msg=name)


def test_convert_with_batch_statistics_and_no_momentum_keeps_cumulative_averages(gen):
    """estimate=False, momentum=None: a BatchNorm2d keeps its own momentum; a GroupNorm's new batch norm has
    momentum None, torch's cumulative average."""
    model = bt.convert(_model(), num_groups=4, estimate=False, momentum=None)
    assert model[1].bn.momentum == 0.1 and model[2].bn.momentum is None


def test_convert_swaps_layers_of_exactly_the_named_types():
    """Subclasses of nn.BatchNorm2d, nn.GroupNorm and nn.Conv2d may compute otherwise: they stay, the same
    objects, and their parameters stay theirs."""
    class ScaledBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class ShiftedGroupNorm(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) + 1

    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    own = [PaddedConv(3, 8, 3), ScaledBatchNorm(8), ShiftedGroupNorm(4, 8)]
    model = nn.Sequential(*own, nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    bt.convert(model, num_groups=4)
    assert all(a is b for a, b in zip(model, own)), model
    assert [type(m) for m in model][3:] == [bt.Conv2d, bt.BCNorm]


# ---- the layers convert and fold make keep every torch argument ----------------------------------------------

_CONV = {"stride": 2, "padding": 2, "dilation": 2, "groups": 2, "padding_mode": "reflect"}
_SETTINGS = ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding")


def _settings(layer):
    return {k: getattr(layer, k) for k in _SETTINGS if hasattr(layer, k)}


def test_convert_and_fold_keep_every_convolution_setting(gen):
    """A Conv2d with stride, padding, dilation, groups, a padding mode and a bias: convert's WS Conv2d and the
    plain layer fold makes of it have the same settings, and compute the convolution of the standardized weight
    with them (a plain Conv2d of that weight is the reference)."""
    conv = nn.Conv2d(4, 6, 3, bias=True, **_CONV).double()
    randomize(conv, gen)
    ws = bt.convert(nn.Sequential(conv))[0]
    assert type(ws) is bt.Conv2d and _settings(ws) == _settings(conv)
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.copy_(_reference_ws(conv.weight, 1e-5, "authors"))
    x = rand_input(gen, (2, 4, 11, 11))
    torch.testing.assert_close(ws(x), reference(x), rtol=1e-12, atol=1e-12)
    folded = bt.fold_weight_standardization(nn.Sequential(ws))[0]
    assert type(folded) is nn.Conv2d and _settings(folded) == _settings(conv)
    torch.testing.assert_close(folded(x), reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make,shape", [
    (lambda: bt.Conv1d(4, 6, 3, **_CONV), (2, 4, 13)),
    (lambda: bt.Conv3d(4, 6, 2, stride=2, padding=1, dilation=2, groups=2, padding_mode="circular"), (2, 4, 6, 6, 6)),
    (lambda: bt.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2), (2, 4, 5, 5)),
], ids=["Conv1d", "Conv3d", "ConvTranspose2d"])
def test_fold_keeps_every_setting_of_each_ws_layer(make, shape, gen):
    layer = make().double()
    randomize(layer, gen)
    x = rand_input(gen, shape)
    expected = layer(x)
    folded = bt.fold_weight_standardization(nn.Sequential(layer))[0]
    assert _settings(folded) == _settings(layer)
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("convention", ["authors", "labml"])
def test_a_ws_layers_eps_set_after_construction_takes_effect(convention, gen):
    """A review: the WS layers take ``eps=`` but kept it as ``ws_eps``, so `layer.eps = ...` (labml's attribute)
    changed nothing. `eps` is now ``ws_eps`` under its constructor's name, checked as the constructor checks it."""
    layer = bt.Conv2d(4, 6, 3, convention=convention).double()
    randomize(layer, gen)
    x = rand_input(gen, (2, 4, 5, 5))
    layer.eps = 0.25
    assert layer.eps == layer.ws_eps == 0.25 and "eps" not in layer.__dict__
    expected = nn.functional.conv2d(x, _reference_ws(layer.weight, 0.25, convention), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=re.escape("eps must be a positive finite number, got 0.0")):
        layer.eps = 0.0
    with pytest.raises(TypeError, match=re.escape("eps must be a number, got str '1'")):
        layer.eps = "1"
    assert layer.eps == 0.25
    assert bt.fold_weight_standardization(nn.Sequential(layer))[0](x).allclose(expected, rtol=1e-12, atol=1e-12)


# ---- WS ConvTranspose2d's call ------------------------------------------------------------------------------

def test_ws_conv_transpose_takes_an_output_size_as_torch_s_does(gen):
    """Stride 2 leaves the output's size ambiguous by one: output_size picks it, as in nn.ConvTranspose2d."""
    layer = bt.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    randomize(layer, gen)
    plain = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    with torch.no_grad():
        plain.weight.copy_(reference_ws_transposed(layer.weight, 2, 1e-5, "authors"))
        plain.bias.copy_(layer.bias)
    x = rand_input(gen, (2, 4, 5, 5))
    for size in ([9, 9], [10, 10], [9, 10]):
        y = layer(x, output_size=size)
        assert list(y.shape[2:]) == size
        torch.testing.assert_close(y, plain(x, output_size=size), rtol=1e-12, atol=1e-12, msg=str(size))


def test_ws_conv_transpose_refuses_a_padding_mode_set_later_as_torch_s_does(gen):
    """nn.ConvTranspose2d refuses any padding mode but 'zeros' at construction, and at the call when set later:
    the WS layer raises the same error, in the words of this torch's nn.ConvTranspose2d."""
    x = rand_input(gen, (2, 4, 5, 5))
    errors = []
    for make in (lambda: nn.ConvTranspose2d(4, 6, 3), lambda: bt.ConvTranspose2d(4, 6, 3)):
        layer = make().double()
        layer.padding_mode = "reflect"
        with pytest.raises(ValueError) as e:
            layer(x)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "padding mode is supported for ConvTranspose2d" in errors[0], errors


# ---- the modules' construction and inputs -------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: bt.BCNorm(8, 3),
    lambda: bt.BCNorm(8, 3, estimate=True),
    lambda: bt.ChannelNorm(8, 3),
    lambda: bt.BatchChannelNorm(8, 3),
    lambda: bt.BatchChannelNorm(8, 16, estimate=False),
], ids=["BCNorm", "BCNorm estimate", "ChannelNorm", "BatchChannelNorm", "BatchChannelNorm more groups than channels"])
def test_a_group_count_that_does_not_divide_the_channels_is_refused_at_construction(make):
    with pytest.raises(ValueError, match=r"the channel count \(8\) must be divisible by the number of groups"):
        make()


MODULES = [
    ("BCNorm", lambda: bt.BCNorm(8, 4)),
    ("BCNorm estimate", lambda: bt.BCNorm(8, 4, estimate=True)),
    ("EstBN", lambda: bt.EstBN(8)),
    ("labml BatchChannelNorm", lambda: bt.BatchChannelNorm(8, 4)),
    ("labml BatchNorm", lambda: bt.BatchNorm(8)),
    ("labml EstimatedBatchNorm", lambda: bt.EstimatedBatchNorm(8)),
    ("labml ChannelNorm", lambda: bt.ChannelNorm(8, 4)),
]


@pytest.mark.parametrize("name,make", MODULES, ids=[m[0] for m in MODULES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_input_of_rank_below_2_is_refused_by_name_and_changes_nothing(name, make, training, gen):
    """[C] is not [B, C, *]: the module says what it expects, in training and eval, and keeps its buffers."""
    m = make().double().train(training)
    before = _state(m)
    x = rand_input(gen, (1, 8))[0]
    with pytest.raises(ValueError, match=re.escape("expects an input [B, 8, *], got shape (8,)")):
        m(x)
    assert_states_equal(_state(m), before, name)


# ---- switches set after construction ------------------------------------------------------------------------

def test_labml_batch_norm_switched_untracked_after_construction_follows_labml(gen):
    """labml's BatchNorm reads track_running_stats at every call: switched off with its buffers in place, it
    normalizes with the batch's statistics in training and in eval, and never updates the buffers."""
    ours, ref = bt.BatchNorm(8).double(), R.LabmlBatchNorm(8).double()
    randomize(ref, gen)
    ours.load_state_dict(ref.state_dict())
    ours.track_running_stats = ref.track_running_stats = False
    before = _state(ours)
    for training in (True, False):
        ours.train(training), ref.train(training)
        x = rand_input(gen, (4, 8, 3, 3))
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12, msg=f"training={training}")
    assert_states_equal(_state(ours), before, "buffers")
    assert_states_equal(_state(ref), before, "the reference's buffers")
