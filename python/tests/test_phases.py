"""The statistics phases through the extension: moments, merge and the running update alone agree with the
fused forward, for every convention with running buffers."""
import numpy as np
import pytest

import bcnswift
from bcnswift import _ext

from conftest import CONVENTIONS, Pair, random_input

BN_CONVENTIONS = [c for c in CONVENTIONS if "ChannelNorm" not in c.name or "Batch" in c.name]


def _moments(layer, x):
    flags = layer._call_flags()
    m = np.empty(3 * x.shape[1])
    ctx = np.empty(_ext.context_length(x.shape[0], x.shape[1], layer.num_groups))
    _ext.norm_moments(flags, layer.num_groups, x, m, ctx)
    return m


@pytest.mark.parametrize("convention", BN_CONVENTIONS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_update_alone_is_the_forwards_update(convention, dtype, rng):
    pair = Pair(convention, 8, 4, dtype, rng, momentum=0.3)
    alone = convention.make(8, 4, dtype, 0.3)
    # (not estbn_moving_speed: a float32 buffer would round the momentum)
    alone.load_state_dict({k: v for k, v in pair.ours.state_dict().items() if "moving_speed" not in k})
    for step in range(3):
        x = random_input(rng, (3, 8, 5, 4)).astype(dtype)
        pair.ours(x)
        flags = alone._call_flags()
        momentum = 0.0 if alone.momentum is None else alone.momentum
        _ext.running_update(flags, momentum, _moments(alone, x), alone.running_mean, alone.running_var,
                            alone.num_batches_tracked)
        for key, value in pair.ours.state_dict().items():
            np.testing.assert_array_equal(alone.state_dict()[key], value, err_msg=f"{convention}: {key}, step {step}")


def test_running_update_refusals_change_nothing(rng):
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)
    x = random_input(rng, (2, 8, 3))
    m = _moments(layer, x)
    before = layer.state_dict()
    flags = layer._call_flags()
    rm, rv, nbt = layer.running_mean, layer.running_var, layer.num_batches_tracked
    with pytest.raises(ValueError, match="batch-norm"):
        _ext.running_update(_ext.BCN_CHANNEL_NORM, 0.1, m, rm, rv, nbt)
    with pytest.raises(ValueError, match="momentum"):
        _ext.running_update(flags, 2.0, m, rm, rv, nbt)
    with pytest.raises(ValueError, match="moments has 21 elements"):
        _ext.running_update(flags, 0.1, m[:21], rm, rv, nbt)
    with pytest.raises(TypeError, match="running_var has dtype float32"):
        _ext.running_update(flags, 0.1, m, rm, rv.astype(np.float32), nbt)
    bad = m.copy()
    bad[3] = 2.5  # channel 1's count is not channel 0's
    with pytest.raises(ValueError, match="channel 1"):
        _ext.running_update(flags, 0.1, bad, rm, rv, nbt)
    one = m.copy()
    one[0::3], one[2::3] = 1, 0
    with pytest.raises(ValueError, match="more than 1 value"):
        _ext.running_update(flags, 0.1, one, rm, rv, nbt)
    nan = m.copy()
    nan[1] = np.nan
    with pytest.raises(FloatingPointError, match="channel 0"):
        _ext.running_update(flags | _ext.BCN_NAN_RAISE, 0.1, nan, rm, rv, nbt)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_gradient_sums_holding_nan_are_refused_under_raise(rng):
    """Phase (c) of the backward refuses merged sums holding NaN under nan_policy="raise", as the forward's
    refuses such moments, writing neither dx nor a gradient."""
    x = random_input(rng, (4, 8, 5))
    dy = rng.normal(0.2, 1.0, x.shape)
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64, nan_policy="raise")
    layer(x)
    with layer._lock:
        xl, ctx, flags, dyl, dx = layer._prepare_backward(dy, None)
    sums = np.zeros(16)
    _ext.norm_backward_sums(flags, layer.num_groups, xl, dyl, sums, ctx)
    sums[3] = np.nan
    dx[...] = 7.0
    grads = {k: v.copy() for k, v in layer.grads.items()}
    with pytest.raises(FloatingPointError, match="gradient sums"):
        layer._finish_backward(xl, ctx, flags, dyl, dx, sums)
    assert (dx == 7.0).all()
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, grads[k])


def _one_non_finite(a, rng):
    """A copy of `a` with one value (sample 1, channel 2) NaN or an infinity."""
    bad = a.copy()
    bad[(1, 2) + (0,) * (a.ndim - 2)] = rng.choice([np.nan, np.inf, -np.inf])
    return bad


@pytest.mark.parametrize("shape", [(4, 8, 5), (6, 8)], ids=["planes", "rows"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_raise_given_to_phase_c_alone_still_refuses_a_non_finite_x(shape, training, rng):
    """nan_policy="raise" promises that a non-finite x writes nothing. Phase (c) keeps that promise on its own,
    whatever phase (a) screened: nothing (it ran without "raise"), another x (a checked x, then this one
    unchecked), or another x before this one was refused; y and the running buffers stay as they were."""
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64, nan_policy="raise")
    layer.train(training)
    raising = layer._call_flags()
    plain = raising & ~_ext.BCN_NAN_RAISE
    assert raising & _ext.BCN_NAN_RAISE
    good = random_input(rng, shape)
    bad = _one_non_finite(good, rng)
    ctx = np.empty(_ext.context_length(shape[0], 8, layer.num_groups))
    for first in ("plain", "stale", "refused"):
        m = np.empty(24)
        if first != "plain":  # a checked x's phase (a) on the same context first
            _ext.norm_moments(raising, layer.num_groups, good, m, ctx)
        if first == "refused":
            with pytest.raises(FloatingPointError):
                _ext.norm_moments(raising, layer.num_groups, bad, np.empty(24), ctx)
        else:
            _ext.norm_moments(plain, layer.num_groups, bad, m, ctx)
        before = {k: v.copy() for k, v in layer.state_dict().items()}
        y = np.full(shape, 7.0)
        with pytest.raises(FloatingPointError, match="input holds NaN or infinity"):
            layer._finish_forward(bad, y, raising, ctx, m)  # phase (c): with moments
        assert (y == 7.0).all(), first
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=f"{first}: {k}")
    # the same phases on the finite x still run, and give the fused forward's numbers
    m = np.empty(24)
    _ext.norm_moments(plain, layer.num_groups, good, m, ctx)
    y, fused = np.empty(shape), bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)
    fused.load_state_dict(layer.state_dict())
    fused.train(training)
    layer._finish_forward(good, y, raising, ctx, m)
    np.testing.assert_array_equal(y, fused(good))


@pytest.mark.parametrize("shape", [(4, 8, 5), (6, 8)], ids=["planes", "rows"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_raise_given_to_backward_phase_c_alone_still_refuses_a_non_finite_dy(shape, training, rng):
    """The backward's twin: phase (c) under "raise" refuses a non-finite dy that its phase (a) did not check
    (run without "raise", after another dy under it, or refused after another dy), writing neither dx nor a
    parameter gradient."""
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64, nan_policy="raise")
    layer.train(training)
    x = random_input(rng, shape)
    layer(x)
    dy = rng.normal(0.3, 1.0, shape)
    with layer._lock:
        xl, ctx, raising, dyl, dx = layer._prepare_backward(dy, None)
    plain = raising & ~_ext.BCN_NAN_RAISE
    bad = _one_non_finite(dyl, rng)
    for first in ("plain", "stale", "refused"):
        sums = np.zeros(16)
        if first != "plain":
            _ext.norm_backward_sums(raising, layer.num_groups, xl, dyl, sums, ctx)
        if first == "refused":
            with pytest.raises(FloatingPointError):
                _ext.norm_backward_sums(raising, layer.num_groups, xl, bad, np.zeros(16), ctx)
        else:
            _ext.norm_backward_sums(plain, layer.num_groups, xl, bad, sums, ctx)
        grads = {k: v.copy() for k, v in layer.grads.items()}
        dx[...] = 7.0
        with pytest.raises(FloatingPointError, match="output gradient dy holds NaN or infinity"):
            layer._finish_backward(xl, ctx, raising, bad, dx, sums)
        assert (dx == 7.0).all(), first
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(v, grads[k], err_msg=f"{first}: {k}")


@pytest.mark.parametrize("shape", [(2, 8, 2), (3, 16, 3), (4, 8)], ids=str)
def test_a_merged_count_of_two_keeps_the_backward_s_phases_in_step(shape, rng):
    """A review: the backward of short planes runs a value view whose phase (c) always takes the Float32 lanes;
    its phase (a) asked the context's count instead, and a phased forward whose merged moments claimed two values a
    channel (any count is a whole number a caller may merge) sent it down the Float64 path, so phase (c) read
    masks phase (a) never wrote and wrote dx out of bounds (valgrind; corrupted heap). Each backward now runs, and
    gives the same dx every time."""
    layer = bcnswift.BatchChannelNorm(shape[1], shape[1] // 8, estimate=False, dtype=np.float32)
    x = random_input(rng, shape).astype(np.float32)
    dy = rng.normal(0.3, 1.0, shape).astype(np.float32)
    xl, y, flags, ctx = layer._prepare_forward(x, None)
    m = np.empty(3 * shape[1])
    _ext.norm_moments(flags, layer.num_groups, xl, m, ctx)
    m[0::3] = 2.0  # the merged count: fewer values than this process holds
    with layer._lock:
        layer._finish_forward(xl, y, flags, ctx, m)
        layer._saved = (xl, ctx, flags)
    first = layer.backward(dy)
    assert np.isfinite(first).all()
    for _ in range(3):
        np.testing.assert_array_equal(layer.backward(dy), first)
