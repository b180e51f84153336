"""Bad input gets a clear exception naming what is wrong, and a failed call changes no running buffer."""
import copy
import pickle
import re

import numpy as np
import pytest

import bcnswift
from bcnswift import _ext
from conftest import random_input, require


def snapshot(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed by a failed call")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_channels=0, num_groups=1), ValueError, "num_channels must be positive, got 0"),
    (dict(num_channels=-4, num_groups=2), ValueError, "num_channels must be positive, got -4"),
    (dict(num_channels=4.0, num_groups=2), TypeError, "num_channels must be an int"),
    (dict(num_channels=4, num_groups=0), ValueError, "num_groups must be positive, got 0"),
    (dict(num_channels=6, num_groups=4), ValueError, r"num_channels \(6\) must be divisible by num_groups \(4\)"),
    (dict(num_channels=4, num_groups=2, eps=0), ValueError, "eps must be a positive finite number, got 0"),
    (dict(num_channels=4, num_groups=2, eps=-1e-5), ValueError, "eps"),
    (dict(num_channels=4, num_groups=2, eps="a"), TypeError, "eps must be a number"),
    (dict(num_channels=4, num_groups=2, momentum=1.5), ValueError, r"momentum must be in \[0, 1\] or None, got 1.5"),
    (dict(num_channels=4, num_groups=2, momentum=-0.1), ValueError, "momentum"),
    (dict(num_channels=4, num_groups=2, momentum=float("nan")), ValueError, "momentum"),
    (dict(num_channels=4, num_groups=2, variance_around="median"), ValueError, "variance_around must be one of"),
    (dict(num_channels=4, num_groups=2, estimate=False, variance_around="running_mean"), ValueError, "estimate=True"),
    (dict(num_channels=4, num_groups=2, nan_policy="ignore"), ValueError, "nan_policy must be one of"),
    (dict(num_channels=4, num_groups=2, dtype=np.int32), TypeError, "dtype must be float32 or float64, got int32"),
    (dict(num_channels=4, num_groups=2, dtype=np.float16), TypeError, "float16"),
    (dict(num_channels=4, num_groups=2, dtype="nonsense"), TypeError, "dtype"),
    (dict(num_channels=4, num_groups=2, estimate="yes"), TypeError, "estimate must be a bool"),
    (dict(num_channels=4, num_groups=2, bn_eps=0.0), ValueError, "bn_eps"),
    (dict(num_channels=4, num_groups=2, eps="1e-5"), TypeError, "eps must be a number, got str '1e-5'"),
    (dict(num_channels=4, num_groups=2, eps=True), TypeError, "eps must be a number, got bool True"),
    (dict(num_channels=4, num_groups=2, bn_eps=np.bool_(True)), TypeError, "bn_eps must be a number"),
    (dict(num_channels=4, num_groups=2, momentum="0.1"), TypeError, "momentum must be a number or None, got str"),
    (dict(num_channels=4, num_groups=2, momentum=True), TypeError, "momentum must be a number or None, got bool"),
    (dict(num_channels=4, num_groups=2, variance_around=["batch"]), ValueError, "variance_around must be one of"),
    (dict(num_channels=4, num_groups=2, nan_policy=[]), ValueError, "nan_policy must be one of"),
    (dict(num_channels=4, num_groups=2, channel_axis=1.0), ValueError, r"channel_axis must be 1 .* got 1.0"),
    (dict(num_channels=4, num_groups=2, channel_axis=np.array([1])), ValueError, "channel_axis must be 1"),
    # bools are not ints nor numbers, even where int(True) or float(True) would give a valid value
    (dict(num_channels=True, num_groups=1), TypeError, "num_channels must be an int, got bool True"),
    (dict(num_channels=4, num_groups=np.bool_(True)), TypeError, "num_groups must be an int, got bool"),
    (dict(num_channels=4, num_groups=2, channel_axis=True), ValueError, r"channel_axis must be 1 .* got True"),
    (dict(num_channels=4, num_groups=2, eps=np.array(True)), TypeError, "eps must be a number, got ndarray"),
    (dict(num_channels=4, num_groups=2, unbiased_running_var="yes"), TypeError,
     "unbiased_running_var must be a bool or None, got 'yes'"),
    (dict(num_channels=4, num_groups=2, eps=float("inf")), ValueError, "eps must be a positive finite number, got inf"),
    (dict(num_channels=4, num_groups=2, bn_eps=float("inf")), ValueError, "bn_eps must be a positive finite number"),
    # np.dtype(None) is float64, which None once gave silently
    (dict(num_channels=4, num_groups=2, dtype=None), TypeError, "dtype must be float32 or float64, got None"),
    # numpy's own error named no argument
    (dict(num_channels=2 ** 62, num_groups=1), (MemoryError, ValueError), f"num_channels={2 ** 62}: its parameters"),
    (dict(num_channels=2 ** 40, num_groups=1), MemoryError, f"num_channels={2 ** 40}: its parameters"),
])
def test_construction_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bcnswift.BatchChannelNorm(**kwargs)


def test_numbers_of_numpy_types_are_taken():
    layer = bcnswift.BatchChannelNorm(np.int64(8), np.int32(4), eps=np.float32(1e-3), momentum=np.float64(0.2),
                                      channel_axis=np.int64(-1))
    assert (layer.num_channels, layer.num_groups, layer.channel_axis) == (8, 4, -1)
    assert layer.eps == float(np.float32(1e-3)) and layer.momentum == 0.2
    # numpy bools are taken for the bool options, and kept as Python's bools
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=np.bool_(False), unbiased_running_var=np.bool_(False))
    assert layer.estimate is False and layer.unbiased_running_var is False


def test_a_torch_bool_is_not_a_number():
    """A one-value torch bool tensor converted by float() to 1.0, so eps=torch.tensor(True) gave eps 1."""
    torch = require("torch")
    for kwargs in (dict(eps=torch.tensor(True)), dict(momentum=torch.tensor([False]))):
        with pytest.raises(TypeError, match="must be a number"):
            bcnswift.BatchChannelNorm(4, 2, **kwargs)
    assert bcnswift.BatchChannelNorm(4, 2, eps=torch.tensor(1e-3, dtype=torch.float64)).eps == 1e-3


@pytest.mark.parametrize("name,value", [("num_channels", 16), ("num_groups", 8), ("num_groups", "2"),
                                        ("num_channels", 4.0)])
def test_the_sizes_a_layer_is_made_with_are_fixed(name, value, rng):
    """num_groups set by hand (with a weight and bias to match) failed at the next forward of the batch size seen
    before, in the words of the context's cache; 4.0 or "2" failed in numpy's. The sizes are now refused when
    assigned, naming them, and the layer computes as before. Copies, pickles and a pickle of the versions where
    they were plain attributes keep them."""
    x = rng.normal(1.5, 1.0, (3, 8, 5))
    layers = [bcnswift.BatchChannelNorm(8, 4), bcnswift.ChannelNorm(8, 4)]
    if name == "num_channels":
        layers.append(bcnswift.BatchNorm(8))
    for layer in layers:
        layer.eval()
        y, before = layer(x).copy(), getattr(layer, name)
        with pytest.raises(AttributeError, match=f"^{name} is fixed when a layer is made \\(its .* sized by it\\): "
                                                 f"make a new {type(layer).__name__} with {name}="):
            setattr(layer, name, value)
        assert getattr(layer, name) == before
        np.testing.assert_array_equal(layer(x), y)
        state = layer.__getstate__()
        state = {k[1:] if k in ("_num_channels", "_num_groups") else k: v for k, v in state.items()}  # the old names
        old = type(layer).__new__(type(layer))
        old.__setstate__(state)
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), old):
            assert getattr(twin, name) == before and repr(twin) == repr(layer)
            np.testing.assert_array_equal(twin(x), y)


def test_train_takes_a_bool_only():
    layer = bcnswift.BatchChannelNorm(8, 4)
    for mode in ("False", 0, None):
        with pytest.raises(ValueError, match="training mode is expected to be a bool"):
            layer.train(mode)
    assert layer.training and not layer.train(np.bool_(False)).training


@pytest.mark.parametrize("name,value", [("estimate", False), ("variance_around", "running_mean"),
                                        ("unbiased_running_var", True), ("nan_policy", "raise")])
def test_options_the_kernels_flags_come_from_are_fixed(name, value, rng):
    """Assigned after construction, these changed nothing the layer computed while repr() showed the new value:
    now refused, naming the option. Copies and pickles keep them."""
    layer = bcnswift.BatchChannelNorm(8, 4)
    before = getattr(layer, name)
    with pytest.raises(AttributeError, match=f"^{name} is fixed when a layer is made .* make a new "
                                             f"BatchChannelNorm with {name}="):
        setattr(layer, name, value)
    assert getattr(layer, name) == before
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert getattr(twin, name) == before and repr(twin) == repr(layer)
    norm = bcnswift.ChannelNorm(8, 4)
    if name != "nan_policy":
        with pytest.raises(AttributeError, match=f"ChannelNorm has no batch-norm stage, so no {name}"):
            setattr(norm, name, value)
        assert not hasattr(norm, name)


def test_a_hand_set_eps_or_momentum_is_named_at_the_call(rng):
    x = random_input(rng, (4, 8, 3, 3)).astype(np.float32)
    for name, value, exc, match in [("eps", "a", TypeError, "eps must be a number, got str 'a'"),
                                    ("bn_eps", None, TypeError, "bn_eps must be a number, got NoneType None"),
                                    ("momentum", "a", TypeError, "momentum must be a number or None, got str 'a'"),
                                    ("eps", -1, ValueError, "eps must be a positive finite number, got -1.0")]:
        layer = bcnswift.BatchChannelNorm(8, 4)
        layer(x)
        before = snapshot(layer)
        setattr(layer, name, value)
        with pytest.raises(exc, match=re.escape(match)):
            layer(x)
        assert_unchanged(layer, before)


def test_weight_standardization_and_timeouts_take_numbers_only():
    w = np.random.default_rng(0).normal(0.5, 1, (4, 9))
    with pytest.raises(TypeError, match="eps must be a number, got str"):
        bcnswift.weight_standardization(w, eps="1e-5")

    class Comm:
        def Allgather(self, send, recv):
            recv[0] = send

        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1
    for timeout in ("5", True):
        with pytest.raises(TypeError, match="timeout must be a number of seconds or None"):
            bcnswift.SyncBatchChannelNorm(8, 4, comm=Comm(), timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        bcnswift.SyncBatchChannelNorm(8, 4, comm=Comm(), timeout=0)


@pytest.mark.parametrize("layer", [
    bcnswift.BatchChannelNorm(8, 4),
    bcnswift.BatchChannelNorm(8, 2, eps=1e-3, momentum=None, estimate=False, dtype=np.float64, bn_eps=1e-4,
                              nan_policy="raise", channel_axis=-1),
    bcnswift.BatchChannelNorm(8, 4, variance_around="running_mean", unbiased_running_var=True),
    bcnswift.BatchNorm(6, momentum=0.3, nan_policy="raise"),
    bcnswift.EstimatedBatchNorm(6, variance_around="running_mean", channel_axis=-1),
    bcnswift.ChannelNorm(6, 3, eps=1e-4, dtype=np.float64),
], ids=lambda layer: type(layer).__name__)
def test_repr_is_the_call_that_makes_the_layer(layer):
    """Every argument that tells two layers apart shows, and only arguments the class takes (BatchNorm's repr
    once showed estimate= and variance_around=, which BatchNorm() refuses)."""
    namespace = {"float32": np.float32, "float64": np.float64, **{name: getattr(bcnswift, name) for name in (
        "BatchChannelNorm", "BatchNorm", "EstimatedBatchNorm", "ChannelNorm")}}
    again = eval(repr(layer), namespace)
    assert repr(again) == repr(layer)
    assert again._flags == layer._flags and again.bn_eps == layer.bn_eps and again.channel_axis == layer.channel_axis


@pytest.mark.parametrize("w", [np.float32(3.0), np.array(3.0), 2.5, np.ones(4)], ids=["np.float32", "0-d", "float",
                                                                                 "1-d"])
def test_a_weight_below_rank_2_is_reported_with_its_own_shape(w):
    """The message names the shape given (a 0-d weight is (), not the (1,) of numpy's C-order copy), for the
    weight and for the gradient given to the backward."""
    shape = re.escape(str(np.shape(w)))
    with pytest.raises(ValueError, match=rf"w must have rank >= 2 \(\[out_channels, ...\]\), got shape {shape}$"):
        bcnswift.weight_standardization(w)
    with pytest.raises(ValueError, match=rf"dw_hat has shape {shape}, expected the weight's shape \(2, 3\)$"):
        bcnswift.weight_standardization_backward(np.ones((2, 3)) + np.arange(3), w)


def test_weight_standardization_keeps_float32_in_either_byte_order():
    w = np.random.default_rng(0).normal(0.5, 1, (4, 9)).astype(">f4")
    out = bcnswift.weight_standardization(w)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, bcnswift.weight_standardization(w.astype(np.float32)))


@pytest.mark.parametrize("shape,channel_axis", [((0, 8, 3), 1), ((2, 8, 0), 1), ((0, 8), 1), ((0, 3, 3, 8), -1)],
                         ids=["no samples", "no positions", "rows", "channels last axis"])
def test_an_input_without_values_gives_an_empty_output_and_changes_nothing(shape, channel_axis, rng):
    """As torch's batch norm (and bcnswift.torch, and the sync layers for a rank without data): an empty output,
    no buffer changed, an empty dx and no gradient added; in training and eval, with out= too."""
    for layer in (bcnswift.BatchChannelNorm(8, 4, channel_axis=channel_axis),
                  bcnswift.BatchNorm(8, channel_axis=channel_axis),
                  bcnswift.ChannelNorm(8, 4, channel_axis=channel_axis)):
        # buffers and gradients away from their initial values first
        full = random_input(rng, (4, 8, 3)).astype(np.float32)
        full = full if channel_axis == 1 else np.ascontiguousarray(np.moveaxis(full, 1, -1))
        layer(full)
        layer.backward(random_input(rng, (4, 8, 3)).astype(np.float32) if channel_axis == 1 else
                       np.ascontiguousarray(np.moveaxis(random_input(rng, (4, 8, 3)), 1, -1)).astype(np.float32))
        for training in (True, False):
            layer.train(training)
            before = {k: v.copy() for k, v in layer.state_dict().items()}
            grads = {k: v.copy() for k, v in layer.grads.items()}
            x = np.ones(shape, np.float32)
            y = layer(x)
            assert y.shape == shape and y.dtype == np.float32
            out = np.empty(shape, np.float32)
            assert layer(x, out=out) is out
            dx = layer.backward(np.ones(shape, np.float32))
            assert dx.shape == shape
            for k, v in layer.state_dict().items():
                np.testing.assert_array_equal(v, before[k], err_msg=f"{type(layer).__name__}: {k}")
            for k, v in layer.grads.items():
                np.testing.assert_array_equal(v, grads[k], err_msg=f"{type(layer).__name__}: grad {k}")


def test_integer_data_is_refused_whatever_holds_it_but_lists_of_numbers_convert(rng):
    """The README: integer arrays raise TypeError. A buffer (memoryview) of ints was converted silently, as a torch
    int tensor was; lists of ints still convert, as numpy functions convert them."""
    layer = bcnswift.BatchNorm(4)
    for held in (memoryview(np.ones((2, 4, 3), np.int64)), memoryview(np.ones((2, 4, 3), np.uint8))):
        with pytest.raises(TypeError, match="must be a floating-point array, got dtype"):
            layer(held)
        with pytest.raises(TypeError, match="must be a floating-point array, got dtype"):
            bcnswift.weight_standardization(held)
    listed = random_input(rng, (2, 4, 3)).round().astype(int).tolist()
    np.testing.assert_array_equal(layer(listed), layer(np.asarray(listed, np.float32)))
    assert layer(memoryview(np.asarray(listed, np.float64))).dtype == np.float32


def test_masked_values_are_refused_and_a_mask_without_any_is_plain_data(rng):
    """A masked array's plain data holds whatever lies under its mask, which the statistics took in silently."""
    layer = bcnswift.BatchChannelNorm(8, 4, dtype=np.float64, estimate=False)  # (estimates would move)
    x = random_input(rng, (2, 8, 3))
    np.testing.assert_array_equal(layer(np.ma.masked_array(x)), layer(x))
    np.testing.assert_array_equal(layer(np.ma.masked_array(x, mask=np.zeros(x.shape, bool))), layer(x))
    masked = np.ma.masked_array(x)
    masked[0, 1, 2] = np.ma.masked
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"input has masked values, .* fill them \(input.filled\(value\)\)"):
        layer(masked)
    assert_unchanged(layer, before)
    layer(x)
    with pytest.raises(ValueError, match="dy has masked values"):
        layer.backward(masked)
    with pytest.raises(ValueError, match="w has masked values"):
        bcnswift.weight_standardization(masked)


def test_grads_replaced_by_something_else_than_a_dict_is_named(rng):
    layer = bcnswift.BatchChannelNorm(8, 4)
    x = random_input(rng, (2, 8, 3)).astype(np.float32)
    layer(x)
    layer.grads = None
    for call in (lambda: layer.backward(np.ones_like(x)), layer.zero_grad, lambda: copy.deepcopy(layer)):
        with pytest.raises(TypeError, match="grads must be a dict of the parameters' gradients .* got NoneType"):
            call()


def test_part_construction_errors():
    with pytest.raises(ValueError, match="num_channels"):
        bcnswift.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        bcnswift.EstimatedBatchNorm(3, momentum=2)
    with pytest.raises(ValueError, match="divisible"):
        bcnswift.ChannelNorm(5, 2)
    with pytest.raises(TypeError, match="dtype"):
        bcnswift.ChannelNorm(4, 2, dtype=complex)


BAD_INPUTS = [
    (np.ones(8, np.float32), ValueError, r"rank >= 2"),
    (np.float32(3.0), ValueError, r"rank >= 2"),
    (np.ones((2, 5, 3), np.float32), ValueError, r"input has 5 channels \(dimension 1\) but the layer has 8"),
    (np.ones((2, 8, 3), np.int64), TypeError, "floating-point array, got dtype int64"),
    (np.ones((2, 8, 3), bool), TypeError, "got dtype bool"),
    (np.ones((2, 8, 3), np.complex64), TypeError, "got dtype complex64"),
    (np.empty((2, 8, 3), object), TypeError, "got dtype object"),
    ([["a"] * 8] * 2, TypeError, "real numbers"),
    ([[1.0] * 8, [1.0] * 7], TypeError, "cannot be converted"),
]


@pytest.mark.parametrize("estimate", [True, False])
@pytest.mark.parametrize("x,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs_change_nothing(x, exc, match, estimate, rng):
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=estimate)
    layer(random_input(rng, (2, 8, 3)))
    before = snapshot(layer)
    with pytest.raises(exc, match=match):
        layer(x)
    assert_unchanged(layer, before)


def test_a_torch_tensor_that_requires_grad_is_a_type_error_naming_the_argument(rng):
    """The numpy API takes torch tensors as arrays, and one that requires grad cannot be one: torch's RuntimeError
    came through (a meta, sparse or bfloat16 tensor was already a TypeError naming the argument). Now a TypeError
    that names it, with torch's advice (detach()), from the forward, the backward and weight_standardization."""
    torch = require("torch")
    layer = bcnswift.BatchChannelNorm(8, 4)
    x = random_input(rng, (2, 8, 3))
    layer(x)
    before = snapshot(layer)
    grad = torch.from_numpy(x).requires_grad_()
    with pytest.raises(TypeError, match="input cannot be converted to an array: .*detach"):
        layer(grad)
    with pytest.raises(TypeError, match="dy cannot be converted to an array: .*detach"):
        layer.backward(grad)
    assert_unchanged(layer, before)
    with pytest.raises(TypeError, match="w cannot be converted to an array: .*detach"):
        bcnswift.weight_standardization(torch.ones(3, 4, requires_grad=True))
    twin = copy.deepcopy(layer)
    np.testing.assert_array_equal(layer(grad.detach()), twin(x))


def test_lists_and_other_float_dtypes_are_converted(rng):
    layer = bcnswift.BatchChannelNorm(4, 2, estimate=False, dtype=np.float32)
    x64 = random_input(rng, (3, 4, 5))
    expected = bcnswift.BatchChannelNorm(4, 2, estimate=False, dtype=np.float32)(x64.astype(np.float32))
    for x in (x64, x64.astype(np.float16).astype(np.float64), x64.tolist()):
        y = layer(x)
        assert y.dtype == np.float32
    np.testing.assert_array_equal(layer(x64), expected)
    assert bcnswift.BatchChannelNorm(4, 2, dtype=np.float64)([[1, 2, 3, 4], [5, 6, 7, 9]]).dtype == np.float64


def test_backward_errors(rng):
    layer = bcnswift.BatchChannelNorm(8, 4)
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((2, 8, 3), np.float32))
    layer(random_input(rng, (2, 8, 3)))
    grads = {k: v.copy() for k, v in layer.grads.items()}
    with pytest.raises(ValueError, match=r"dy has shape \(2, 8, 4\), the last forward's output has shape \(2, 8, 3\)"):
        layer.backward(np.ones((2, 8, 4), np.float32))
    with pytest.raises(TypeError, match="dtype int32"):
        layer.backward(np.ones((2, 8, 3), np.int32))
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, grads[k])


@pytest.mark.parametrize("shape", [(1, 8), (1, 8, 1), (1, 8, 1, 1)])
def test_one_value_per_channel_in_training(shape, rng):
    layer = bcnswift.BatchChannelNorm(8, 2, estimate=False)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(random_input(rng, shape))
    assert_unchanged(layer, before)
    bn = bcnswift.BatchNorm(8)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(random_input(rng, shape))
    assert int(bn.num_batches_tracked) == 0
    # estimate mode and eval accept it
    est = bcnswift.BatchChannelNorm(8, 2, estimate=True)
    assert np.isfinite(est(random_input(rng, shape))).all()
    assert np.isfinite(layer.eval()(random_input(rng, shape))).all()
    # an unbiased running variance cannot come from one value
    with pytest.raises(ValueError, match="unbiased running variance"):
        bcnswift.BatchChannelNorm(8, 2, estimate=True, unbiased_running_var=True)(random_input(rng, shape))


def test_single_value_per_channel_group_is_refused(rng):
    layer = bcnswift.BatchChannelNorm(8, 8, estimate=True)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="more than 1 value per channel group"):
        layer(random_input(rng, (4, 8)))
    assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="channel group"):
        bcnswift.ChannelNorm(8, 8)(random_input(rng, (4, 8)))


def test_channel_norm_checks_its_channel_count(rng):
    # 12 channels would divide into 4 groups too: only the layer knows it was built for 8
    with pytest.raises(ValueError, match="input has 12 channels"):
        bcnswift.ChannelNorm(8, 4)(random_input(rng, (2, 12, 3)))


def _unaligned(a):
    """A copy of `a` whose data starts one byte past an aligned address."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


def _read_only(a):
    """A copy of `a` that cannot be written."""
    a = a.copy()
    a.flags.writeable = False
    return a


def _layouts(base):
    """The same values as `base` ([2, 6, 4, 5]) in every memory layout numpy can make."""
    yield "fortran", np.asfortranarray(base)
    yield "transposed view", np.ascontiguousarray(base.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
    yield "negative strides", np.ascontiguousarray(base[::-1, :, ::-1])[::-1, :, ::-1]
    big = np.zeros((4, 6, 8, 10), base.dtype)
    big[::2, :, ::2, ::2] = base
    yield "sliced view", big[::2, :, ::2, ::2]
    yield "read-only", _read_only(base)
    yield "unaligned", _unaligned(base)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_memory_layout(dtype, rng):
    base = random_input(rng, (2, 6, 4, 5)).astype(dtype)
    dy = rng.normal(size=base.shape).astype(dtype)
    ref = bcnswift.BatchChannelNorm(6, 3, estimate=False, dtype=dtype)
    y_ref, dx_ref = ref(base), ref.backward(dy)
    for name, x in _layouts(base):
        keep = x.copy()
        layer = bcnswift.BatchChannelNorm(6, 3, estimate=False, dtype=dtype)
        y = layer(x)
        dx = layer.backward(np.asfortranarray(dy))
        np.testing.assert_array_equal(y, y_ref, err_msg=name)
        np.testing.assert_array_equal(dx, dx_ref, err_msg=name)
        np.testing.assert_array_equal(x, keep, err_msg=f"{name}: input was written")


def test_memory_facts_agree_with_numpys_flags(rng):
    """The layers read an array's flags through _ext.memory_facts (numpy's `flags` object costs ~900
    instructions a read); its bits must say what numpy's flags say, in every layout."""
    base = random_input(rng, (2, 6, 4, 5)).astype(np.float32)
    class Sub(np.ndarray):
        pass
    cases = [("C order", base), ("1-D", base.ravel()), ("0-d", np.full((), 2.5)),
             ("view of all", base[:]), ("subclass view", base.view(Sub)),
             ("subclass, Fortran order", np.asfortranarray(base).view(Sub)), *_layouts(base)]
    for name, a in cases:
        bits = _ext.memory_facts(a)
        expected = {_ext.MEMORY_C_ORDER: a.flags.c_contiguous, _ext.MEMORY_ALIGNED: a.flags.aligned,
                    _ext.MEMORY_WRITEABLE: a.flags.writeable, _ext.MEMORY_OWNDATA: a.flags.owndata}
        for bit, flag in expected.items():
            assert bool(bits & bit) == flag, f"{name}: bit {bit} says {bool(bits & bit)}, numpy says {flag}"
    with pytest.raises(TypeError, match="numpy array, got list"):
        _ext.memory_facts([1.0, 2.0])


def test_fresh_output_accepts_only_what_needs_no_further_check(rng):
    """out= checks start with one C call, _ext.fresh_output, which may only say yes when every check would pass
    and no overlap is possible: anything else goes on to the full checks (which word the errors above)."""
    x = random_input(rng, (2, 6, 4, 5)).astype(np.float32)
    last = np.empty_like(np.moveaxis(np.empty((2, 4, 5, 6), np.float32), -1, 1))  # channels-last, owning memory
    last[...] = x
    dy = np.empty_like(x)
    readonly = _read_only(x)
    for like, out, allow in ((x, np.empty_like(x), None), (last, np.empty_like(last), None),
                             (x, dy, dy), (x, np.empty_like(x), dy)):
        assert _ext.fresh_output(out, like, allow) is True
    refused = {
        "out is the input": (x, x, None),
        "out a view": (x, np.empty_like(x)[:], None),
        "input a view": (x[:], np.empty_like(x), None),
        "other layout": (x, np.empty_like(last), None),
        "other dtype": (x, np.empty(x.shape, np.float64), None),
        "other byte order": (x, np.empty(x.shape, ">f4"), None),
        "other shape": (x, np.empty((2, 6, 20), np.float32), None),
        "read-only": (x, readonly, None),
        "dy a view": (x, np.empty_like(x), dy[:]),
        "not an array": (x, [0.0], None),
        "input not an array": ([0.0], np.empty(1), None),
    }
    for name, (like, out, allow) in refused.items():
        assert _ext.fresh_output(out, like, allow) is False, name
    with pytest.raises(TypeError, match="3 arguments"):
        _ext.fresh_output(x, x)


def test_threads_setting():
    n = bcnswift.get_num_threads()
    assert n >= 1
    bcnswift.set_num_threads(3)
    assert bcnswift.get_num_threads() == 3
    bcnswift.set_num_threads(0)
    assert bcnswift.get_num_threads() == n
    with pytest.raises(ValueError, match="threads"):
        bcnswift.set_num_threads(-1)
    with pytest.raises(TypeError, match="threads"):
        bcnswift.set_num_threads(1.5)
    with pytest.raises(TypeError, match="threads"):
        bcnswift.set_num_threads(True)
    with pytest.raises(TypeError, match="threads"):
        bcnswift.set_num_threads(np.float64(2))
    for integral in (np.int64(2), np.int32(2), np.uint8(2)):  # any integral type, as operator.index takes
        bcnswift.set_num_threads(integral)
        assert bcnswift.get_num_threads() == 2
    bcnswift.set_num_threads(1_000)  # a call uses at most 256: the count says so
    assert bcnswift.get_num_threads() == 256
    with bcnswift.num_threads(4096):
        assert bcnswift.get_num_threads() == 256
    bcnswift.set_num_threads(0)
    assert bcnswift.get_num_threads() == n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_sample_one_channel_per_group_backward(dtype, rng):
    """Regression: B = 1 with one channel per group once overflowed the backward's scratch (2G > B*C)."""
    for C in (1, 2, 5, 64):
        layer = bcnswift.BatchChannelNorm(C, C, estimate=True, dtype=dtype)
        x = random_input(rng, (1, C, 3))
        layer(x)
        dx = layer.backward(rng.normal(size=x.shape))
        assert np.isfinite(dx).all() and all(np.isfinite(g).all() for g in layer.grads.values())


def test_out_arguments(rng):
    x = random_input(rng, (2, 8, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    a, b = bcnswift.BatchChannelNorm(8, 4, estimate=False), bcnswift.BatchChannelNorm(8, 4, estimate=False)
    out = np.empty_like(x)
    assert a(x, out=out) is out
    np.testing.assert_array_equal(out, b(x))
    g = dy.copy()
    assert a.backward(g, out=g) is g  # dx may overwrite dy
    np.testing.assert_array_equal(g, b.backward(dy))
    before = {k: v.copy() for k, v in a.state_dict().items()}
    with pytest.raises(ValueError, match="overlap"):
        a(x, out=x)
    shared = np.concatenate([x.ravel(), x.ravel()[:1]])  # views that own no memory and overlap by all but one
    with pytest.raises(ValueError, match="overlap"):
        a(shared[:-1].reshape(x.shape), out=shared[1:].reshape(x.shape))
    c = bcnswift.BatchChannelNorm(8, 4, estimate=False)
    c(x)
    with pytest.raises(ValueError, match="overlap"):
        c.backward(dy, out=x)  # dx over the input that the backward reads
    with pytest.raises(ValueError, match="dtype float32 and shape"):
        a(x, out=np.empty((2, 8, 4), np.float32))
    with pytest.raises(ValueError, match="dtype float32"):
        a(x, out=np.empty(x.shape, np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        a(x, out=np.empty((5, 8, 2), np.float32).transpose(2, 1, 0))
    for bad in (_unaligned(x), _read_only(x)):  # named as the caller's out (the extension's own check says y)
        with pytest.raises(ValueError, match="^out must be aligned, writeable and C-contiguous like the input$"):
            a(x, out=bad)
    with pytest.raises(TypeError, match="numpy array"):
        a(x, out=[0.0])
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_out_arguments_with_channels_last_axis_are_checked_in_the_callers_order(rng):
    """channel_axis=-1: out= is refused unless it is an array (a list was copied, filled, and dropped: the call
    returned the list unchanged), and errors word shapes and layouts as the caller lays them out."""
    layer = bcnswift.BatchChannelNorm(8, 4, channel_axis=-1)
    x = random_input(rng, (2, 3, 3, 8)).astype(np.float32)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="out must be a numpy array, got list"):
        layer(x, out=[[0.0] * 8] * 2)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3, 8\), got float32 \(2, 3, 3, 7\)"):
        layer(x, out=np.empty((2, 3, 3, 7), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3, 8\), got float32 \(8,\)"):
        layer(x, out=np.empty(8, np.float32))
    with pytest.raises(ValueError, match="C-contiguous like the input"):
        layer(x, out=np.empty((2, 8, 3, 3), np.float32).transpose(0, 2, 3, 1))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    dx = np.empty_like(x)
    assert layer.backward(random_input(rng, x.shape).astype(np.float32), out=dx) is dx
    with pytest.raises(TypeError, match="out must be a numpy array"):
        layer.backward(random_input(rng, x.shape).astype(np.float32), out=list(dx))


def test_out_must_be_dy_itself_or_apart_from_it(rng):
    """dx may overwrite dy in place, but not dy shifted (the kernels read dy while they write dx), and never the
    input, not even when dy is the input."""
    x = random_input(rng, (3, 8, 5)).astype(np.float32)
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False)
    layer(x)
    before = {k: v.copy() for k, v in layer.grads.items()}
    shared = np.concatenate([rng.normal(size=x.size), [0.0]]).astype(np.float32)
    dy, shifted = shared[:-1].reshape(x.shape), shared[1:].reshape(x.shape)
    with pytest.raises(ValueError, match="dy itself or not overlap it"):
        layer.backward(dy, out=shifted)
    with pytest.raises(ValueError, match="overlap the input"):
        layer.backward(x, out=x)
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, before[k])
    same = np.ndarray(x.shape, x.dtype, buffer=shared, offset=0)  # dy's memory, another array object
    reference = bcnswift.BatchChannelNorm(8, 4, estimate=False)
    reference(x)
    expected = reference.backward(dy.copy())
    assert layer.backward(dy, out=same) is same
    np.testing.assert_array_equal(same, expected)


def test_out_may_be_an_array_subclass_and_is_returned_itself(rng, tmp_path):
    x = random_input(rng, (2, 8, 5)).astype(np.float32)
    mapped = np.memmap(tmp_path / "y.bin", dtype=np.float32, mode="w+", shape=x.shape)
    a, b = bcnswift.BatchChannelNorm(8, 4), bcnswift.BatchChannelNorm(8, 4)
    assert a(x, out=mapped) is mapped
    np.testing.assert_array_equal(mapped, b(x))
    last = bcnswift.BatchChannelNorm(8, 4, channel_axis=-1)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    out = np.empty_like(xl)
    assert last(xl, out=out) is out
    dxl = np.empty_like(xl)
    assert last.backward(np.ones_like(xl), out=dxl) is dxl


def test_a_cumulative_average_refuses_a_count_that_is_not_one(rng):
    x = random_input(rng, (4, 3, 5))
    for count in (-1, np.iinfo(np.int64).max):
        layer = bcnswift.BatchNorm(3, momentum=None, dtype=np.float64)
        layer.num_batches_tracked[...] = count
        before = {k: v.copy() for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError, match="num_batches_tracked must count batches"):
            layer(x)
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k])


def test_a_count_at_its_largest_stays_there_with_a_momentum(rng):
    """With a momentum the count only counts: at 2^63 - 1 (loaded, never trained to) it once wrapped to -2^63, and
    the layer's own state dict no longer loaded."""
    largest = np.iinfo(np.int64).max
    layer = bcnswift.BatchNorm(3, momentum=0.1, dtype=np.float64)
    state = layer.state_dict()
    state["num_batches_tracked"] = np.array(largest)
    layer.load_state_dict(state)
    layer(random_input(rng, (4, 3, 5)))
    assert int(layer.num_batches_tracked) == largest
    layer.load_state_dict(layer.state_dict())
    ordinary = bcnswift.BatchNorm(3, momentum=0.1, dtype=np.float64)
    ordinary(random_input(rng, (4, 3, 5)))
    assert int(ordinary.num_batches_tracked) == 1


def test_with_a_momentum_a_negative_count_only_counts_as_in_pytorch(rng):
    """A count set negative by hand trains (-5 to -4), as torch.nn.BatchNorm's does; only a cumulative average,
    which divides by it, refuses it (above). load_state_dict refuses it, as it refuses any count of no batches."""
    layer = bcnswift.BatchChannelNorm(4, 2, momentum=0.1, estimate=False, dtype=np.float64)
    layer.num_batches_tracked[...] = -5
    layer(random_input(rng, (3, 4, 5)))
    assert int(layer.num_batches_tracked) == -4
    with pytest.raises(ValueError, match="must be a whole number of batches, got -4"):
        layer.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("make", [lambda: bcnswift.BatchChannelNorm(4, 2, dtype=np.float64),
                                  lambda: bcnswift.BatchNorm(4, dtype=np.float64),
                                  lambda: bcnswift.EstimatedBatchNorm(4, dtype=np.float64)],
                         ids=["BatchChannelNorm", "BatchNorm", "EstimatedBatchNorm"])
def test_out_must_not_overlap_the_layers_own_arrays(make, rng):
    """A review: out= a view of the running mean (or of a gradient) was accepted, and the call wrote its result
    and the buffer update (or the gradient) into the same memory. Now a ValueError, with nothing changed. (A
    ChannelNorm's arrays hold G values, fewer than any output it can make.)"""
    layer = make()
    if isinstance(layer, bcnswift.BatchNorm):
        layer.eval()  # batch statistics need two values per channel, and the arrays hold one per channel
    x, dy = random_input(rng, (1, 4, 1)), rng.normal(0.5, 1.0, (1, 4, 1))
    owned = dict(layer.parameters(), **{f"grad {k}": v for k, v in layer.grads.items()})
    if hasattr(layer, "running_mean"):
        owned.update(running_mean=layer.running_mean, running_var=layer.running_var)
    tried = [name for name, array in owned.items() if array.size >= 4]  # not the groups' 2 weights and biases
    assert len(tried) >= 4
    for name in tried:
        array = owned[name]
        view = array.reshape(-1)[:4].reshape(1, 4, 1)
        before = snapshot(layer)
        with pytest.raises(ValueError, match="must not overlap the layer's parameters, running buffers or gradients"):
            layer(x, out=view)
        assert_unchanged(layer, before)
        layer(x)
        grads = {k: v.copy() for k, v in layer.grads.items()}
        with pytest.raises(ValueError, match="must not overlap the layer's parameters"):
            layer.backward(dy, out=view)
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(v, grads[k], err_msg=f"{name}: grad {k} changed by a refused backward")


@pytest.mark.parametrize("make", [lambda: bcnswift.BatchChannelNorm(4, 2, dtype=np.float64),
                                  lambda: bcnswift.BatchNorm(4, dtype=np.float64),
                                  lambda: bcnswift.EstimatedBatchNorm(4, dtype=np.float64)],
                         ids=["BatchChannelNorm", "BatchNorm", "EstimatedBatchNorm"])
@pytest.mark.parametrize("layout", ["C order", "channels-last"])
def test_an_array_assigned_to_the_layer_as_a_view_of_out_is_refused(make, layout, rng):
    """The other way round from the test above, left by earlier reviews: out= fresh memory of its own (the common
    case, which the layers accept in one C call that cannot see their arrays), and one of the layer's arrays
    assigned as a view of that out. The forward wrote its result over the parameter or buffer it read and updated
    (a backward over the gradient it adds to). Now a ValueError before anything is read or written: the output,
    the array and every other array keep their values. (A backward reads no parameter or running buffer: the
    context holds what it needs.)"""
    shape = (3, 4, 2, 5)
    x, dy = random_input(rng, shape), rng.normal(0.5, 1.0, shape)
    if layout == "channels-last":
        x, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, dy))

    def aliased(layer, assign):
        """out in fresh memory laid out as x, and 4 contiguous values inside it given to the layer by `assign`."""
        out = np.empty_like(x)
        assert out.flags.owndata and out.strides == x.strides  # the extension's quick acceptance
        out[...] = rng.normal(3.0, 1.0, shape)
        view = np.ravel(out, order="K")[7:11]
        assert np.shares_memory(view, out) and view.flags.c_contiguous
        assign(view)
        return out

    def refused(layer, call, match, what):
        before, grads = snapshot(layer), {k: v.copy() for k, v in layer.grads.items()}
        out_before = out.copy()
        with pytest.raises(ValueError, match=match):
            call()
        assert_unchanged(layer, before)
        np.testing.assert_array_equal(out, out_before, err_msg=f"{what}: out written")
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(v, grads[k], err_msg=f"{what}: grad {k} changed by a refused call")

    names = [n for n in ("running_mean", "running_var", "bn_weight", "bn_bias") if hasattr(make(), n)]
    assert names
    for name in names:
        layer = make()
        layer(x)

        def assign(view):
            view[...] = getattr(layer, name)
            setattr(layer, name, view)
        out = aliased(layer, assign)
        # (channels-last x is a view, so the layer's full checks run first, and say it in their words)
        refused(layer, lambda: layer(x, out=out), f"y \\(the output\\) must not overlap {name}, which the call|"
                "out must not overlap the layer's parameters, running buffers or gradients", name)
    layer = make()
    layer(x)
    for key in [k for k, v in layer.grads.items() if v.size == 4]:
        layer.zero_grad()
        layer.backward(dy)  # gradients of some size, so that an overwrite would show

        def assign(view):
            view[...] = layer.grads[key]
            layer.grads[key] = view
        out = aliased(layer, assign)
        refused(layer, lambda: layer.backward(dy, out=out),
                "dx \\(the input gradient\\) must not overlap grad_|"
                "out must not overlap the layer's parameters, running buffers or gradients", f"grad {key}")


@pytest.mark.parametrize("name", ["running_mean", "running_var", "num_batches_tracked"])
def test_a_running_buffer_assigned_over_the_input_or_another_buffer_is_refused_and_nothing_is_written(name, rng):
    """A running buffer assigned by hand as a view of the input made the forward write into the caller's x
    (inputs are never written); one sharing the memory of another buffer was updated by both. Refused before any
    value is written, naming both arrays; so is a gradient over dy in the backward."""
    x = random_input(rng, (3, 8, 5))
    for estimate in (True, False):
        layer = bcnswift.BatchChannelNorm(8, 4, dtype=np.float64, estimate=estimate)
        layer(x)
        own = getattr(layer, name)
        other = "running_var" if name == "running_mean" else "running_mean"
        for source, overlapped in ((x, "x"), (getattr(layer, other), other)):
            # own's values, in memory of the source (float64 values; the count, int64, in 8 of its bytes)
            k = min(2, source.size - own.size)
            view = source.reshape(-1)[k:k + own.size].view(own.dtype).reshape(own.shape)
            view[...] = own
            setattr(layer, name, view)
            kept, before = x.copy(), snapshot(layer)
            with pytest.raises(ValueError, match="must not overlap .*, which the call reads or writes") as e:
                layer(x)
            assert {name, overlapped} <= set(re.findall(r"\w+", str(e.value).split(",")[0])), str(e.value)
            np.testing.assert_array_equal(x, kept, err_msg="x written")
            assert_unchanged(layer, before)
            setattr(layer, name, own)
    layer = bcnswift.BatchChannelNorm(8, 4, dtype=np.float64)
    layer(x)
    dy = random_input(rng, (3, 8, 5))
    layer.grads["weight"] = dy.reshape(-1)[:4].reshape(1, 4, 1)
    kept = dy.copy()
    with pytest.raises(ValueError, match="grad_cn_weight must not overlap dy, which the call reads or writes"):
        layer.backward(dy)
    np.testing.assert_array_equal(dy, kept, err_msg="dy written")


def test_an_empty_input_of_a_huge_batch_needs_no_context(rng):
    """A review: [2^40, 4, 0] holds no values, yet the forward first allocated a context sized by its batch
    (160 TiB) and raised MemoryError; [0, 4, 2^40] worked."""
    layer = bcnswift.BatchChannelNorm(4, 2)
    for shape in ((2 ** 40, 4, 0), (0, 4, 2 ** 40)):
        x = np.empty(shape, np.float32)
        assert layer(x).shape == shape
        assert layer.backward(np.empty(shape, np.float32)).shape == shape


def test_a_running_variance_beyond_float32_is_infinite_under_either_policy_as_in_pytorch(rng):
    """Finite float32 values of about ±3e20 have a variance beyond float32's range: the running variance becomes
    infinite, while the call's output stays finite (docs/NUMERICS.md says why "raise" does not refuse it: the
    check would come after phase (a) has written the context, which a failed call must leave as it was)."""
    x = (np.sign(rng.normal(size=(2, 1, 4))) * 3e20 + rng.normal(1e18, 1e17, (2, 1, 4))).astype(np.float32)
    for policy in ("propagate", "raise"):
        layer = bcnswift.BatchNorm(1, nan_policy=policy)
        assert np.isfinite(layer(x)).all()
        assert np.isinf(layer.running_var).all() and int(layer.num_batches_tracked) == 1
    wide = bcnswift.BatchNorm(1, nan_policy="raise", dtype=np.float64)  # float64 holds it
    wide(x.astype(np.float64))
    assert np.isfinite(wide.running_var).all()


def test_state_dict_entries_of_the_wrong_kind_are_named(rng):
    """A review: a bool moving speed set momentum=1.0 (a bool count was refused), a (C,) weight of the wrong size
    was "expected (4,) or (4,)", and a count of 2^70 was "must hold numbers, got dtype object"."""
    est = bcnswift.BatchChannelNorm(4, 2, variance_around="running_mean")
    before = snapshot(est)
    with pytest.raises(TypeError, match="'bn.estbn_moving_speed' must hold a number, got dtype bool"):
        est.load_state_dict({**before, "bn.estbn_moving_speed": np.array([True])})
    assert est.momentum == 0.1
    bn = bcnswift.BatchNorm(4)
    state = bn.state_dict()
    with pytest.raises(ValueError, match=r"has shape \(3,\), expected \(4,\)$"):
        bn.load_state_dict({**state, "weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"has shape \(3,\), expected \(1, 2, 1\) or \(2,\)"):
        est.load_state_dict({**before, "weight": np.ones(3, np.float32)})
    for count in (2 ** 70, 2 ** 64, -2 ** 63 - 1):
        with pytest.raises(ValueError, match=f"'num_batches_tracked' holds {count}, beyond"):
            bn.load_state_dict({**state, "num_batches_tracked": count})
    assert_unchanged(bn, state)
    assert_unchanged(est, before)


def _forward_args(rng, dtype=np.float64, shape=(3, 8, 5)):
    """A valid argument list of _ext.norm_forward (BCN with batch statistics, training) as a dict in its order."""
    B, C = shape[:2]
    return {"flags": _ext.BCN_BATCH_NORM | _ext.BCN_CHANNEL_NORM | _ext.BCN_TRAINING, "groups": 4, "eps": 1e-5,
            "bn_eps": 1e-5, "momentum": 0.1, "x": random_input(rng, shape).astype(dtype),
            "y": np.full(shape, 7.0, dtype), "bn_weight": rng.normal(1.0, 0.2, C).astype(dtype),
            "bn_bias": rng.normal(0.5, 0.2, C).astype(dtype), "running_mean": rng.normal(0.5, 1.0, C).astype(dtype),
            "running_var": rng.uniform(0.5, 2.0, C).astype(dtype), "num_batches_tracked": np.array(5, np.int64),
            "cn_weight": rng.normal(1.0, 0.2, 4).astype(dtype), "cn_bias": rng.normal(0.5, 0.2, 4).astype(dtype),
            "context": np.full(_ext.context_length(B, C, 4), 3.0)}


def _overlapping(args, name):
    """A y whose last bytes hold the first value of args[name] (moved there, values kept): one value shared."""
    y, other = args["y"], args[name]
    raw = np.zeros(y.nbytes + other.nbytes - other.itemsize, np.uint8)
    args[name] = raw[y.nbytes - other.itemsize:].view(other.dtype).reshape(other.shape)
    args[name][...] = other
    return raw[:y.nbytes].view(y.dtype).reshape(y.shape)


def _other_dtype(a):
    return a.astype(np.float32 if a.dtype == np.float64 else np.float64)


# (what is wrong, the argument, how to make it so, the exception, a phrase of its message)
_EXTENSION_REFUSALS = [
    ("x strided", "x", lambda a, rng: np.repeat(a["x"], 2, axis=2)[:, :, ::2], ValueError, "x must be aligned"),
    ("x in Fortran order", "x", lambda a, rng: np.asfortranarray(a["x"]), ValueError, "C-contiguous"),
    ("x NCHW under the channels-last flag", "flags", lambda a, rng: a["flags"] | _ext.BCN_CHANNELS_LAST, ValueError,
     "dense in channels-last order"),
    ("x unaligned", "x", lambda a, rng: _unaligned(a["x"]), ValueError, "x must be aligned"),
    ("x of rank 1", "x", lambda a, rng: a["x"].ravel(), ValueError, "rank >= 2"),
    ("x of ints", "x", lambda a, rng: a["x"].astype(np.int64), TypeError, "float32 or float64"),
    ("y read-only", "y", lambda a, rng: _read_only(a["y"]), ValueError, "y must be writeable"),
    ("y one value short", "y", lambda a, rng: a["y"].ravel()[:-1], ValueError, "y has 119 elements, expected 120"),
    ("y of the other dtype", "y", lambda a, rng: _other_dtype(a["y"]), TypeError, "y has dtype"),
    ("running_mean short", "running_mean", lambda a, rng: a["running_mean"][:-1], ValueError, "running_mean has 7"),
    ("running_var read-only", "running_var", lambda a, rng: _read_only(a["running_var"]), ValueError, "writeable"),
    ("running_var of the other dtype", "running_var", lambda a, rng: _other_dtype(a["running_var"]), TypeError,
     "running_var has dtype"),
    ("num_batches_tracked of two", "num_batches_tracked", lambda a, rng: np.array([5, 5], np.int64), ValueError,
     "num_batches_tracked has 2 elements"),
    ("cn_weight of one per channel", "cn_weight", lambda a, rng: np.repeat(a["cn_weight"], 2), ValueError,
     "cn_weight has 8"),
    ("context read-only", "context", lambda a, rng: _read_only(a["context"]), ValueError, "context must be writeable"),
    ("an unknown flag", "flags", lambda a, rng: a["flags"] | (1 << 30), ValueError, "unknown flag bits"),
    ("flags beyond 32 bits", "flags", lambda a, rng: a["flags"] | (1 << 32), ValueError, "combination of bcnswift"),
    ("no groups", "groups", lambda a, rng: 0, ValueError, "num_groups must be positive, got 0"),
    ("y over the running variance's first value", "y", lambda a, rng: _overlapping(a, "running_var"), ValueError,
     "must not overlap running_var"),
    ("y over the context's first value", "y", lambda a, rng: _overlapping(a, "context"), ValueError,
     "must not overlap context"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", _EXTENSION_REFUSALS, ids=lambda c: c[0])
def test_the_extension_refuses_what_the_layers_never_pass_it(case, dtype, rng):
    """The layers screen every array before they call the extension, so only a direct call reaches its own checks
    (bcnswift.torch's and the phases' callers pass arrays of their own making): each bad argument there is a clear
    exception, before any value is read or written. The same call with that one argument good succeeds."""
    _, name, spoil, error, phrase = case
    args = _forward_args(rng, dtype)
    good = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    _ext.norm_forward(*good.values())
    assert not np.array_equal(good["y"], args["y"]) and good["num_batches_tracked"] == 6
    args[name] = spoil(args, rng)
    before = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=re.escape(phrase)):
        _ext.norm_forward(*args.values())
    for key, value in before.items():
        np.testing.assert_array_equal(args[key], value, err_msg=f"{key} changed")


def test_the_extensions_phases_and_merge_refuse_bad_arrays(rng):
    """The statistics phases' and merge's own checks, reached only by direct calls (the layers' exchange and
    bcnswift.torch pass arrays of their own making): clear exceptions, nothing written."""
    args = _forward_args(rng)
    flags, x = args["flags"], args["x"]
    moments, ctx = np.full(24, 2.0), args["context"]
    with pytest.raises(ValueError, match="moments has 23 elements, expected 24"):
        _ext.norm_moments(flags, 4, x, moments[:-1], ctx)
    with pytest.raises(ValueError, match="moments must be writeable"):
        _ext.norm_moments(flags, 4, x, _read_only(moments), ctx)
    with pytest.raises(ValueError, match="y .the output. must not overlap moments"):
        _ext.norm_forward(*args.values(), args["y"].ravel()[:24])  # the finish's moments inside y
    np.testing.assert_array_equal(moments, 2.0)
    sums = np.full(16, 2.0)
    with pytest.raises(ValueError, match="dy has 119 elements"):
        _ext.norm_backward_sums(flags, 4, x, x.ravel()[:-1], sums, ctx)
    with pytest.raises(ValueError, match="sums must be writeable"):
        _ext.norm_backward_sums(flags, 4, x, x, _read_only(sums), ctx)
    np.testing.assert_array_equal(sums, 2.0)
    with pytest.raises(ValueError, match=re.escape("sets must be [n, 3 * channels]")):
        _ext.merge(3, np.ones((2, 8)))
    with pytest.raises(ValueError, match="merge width must be 3"):
        _ext.merge(4, np.ones((2, 8)))
    with pytest.raises(ValueError, match="sets must be aligned"):
        _ext.merge(2, np.ones((2, 16))[:, ::2])
    w = rng.normal(0.2, 1.0, (4, 3, 3, 3))
    with pytest.raises(ValueError, match="w_hat must be writeable"):
        _ext.ws_forward(0, 1e-5, w, _read_only(w))
    with pytest.raises(ValueError, match="grad_w has 107 elements"):
        _ext.ws_backward(0, 1e-5, w, w, np.empty(107))


@pytest.mark.parametrize("case", [("count", 2.5, "channel 3 count 2.5 values: a count must be a whole number"),
                                  ("count", 0.0, "channel 3 count 0 values: a count must be a whole number"),
                                  ("count", np.inf, "channel 3 count inf values"),
                                  ("count", 14.0, "channel 3 count 14 values and channel 0's 15: every channel"),
                                  ("m2", -1.0, "channel 3 have M2 -1.0: a sum of squared deviations cannot be")],
                         ids=["fractional count", "no values", "endless count", "unequal counts", "negative M2"])
def test_moments_handed_to_the_finish_that_are_not_moments_are_named(case, rng):
    """Phase (c) takes the batch's moments from the caller (merged from other processes, say): a set that no batch
    could have is refused, the message saying which channel and what is wrong with it, and nothing changes."""
    field, value, phrase = case
    args = _forward_args(rng)
    moments = np.empty(24)
    _ext.norm_moments(args["flags"], args["groups"], args["x"], moments, args["context"])
    assert moments[0] == 15  # (count, mean, M2) per channel: 3 samples of 5 values
    moments[9 + (0 if field == "count" else 2)] = value
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError, match=re.escape(phrase)):
        _ext.norm_forward(*args.values(), moments)
    for key, kept in before.items():  # the context too: phase (a)'s planes' moments, which (c) reads
        np.testing.assert_array_equal(args[key], kept, err_msg=f"{key} changed")
