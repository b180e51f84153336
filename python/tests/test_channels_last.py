"""Channels-last memory and channel_axis=-1: normalized where the data lie (no copy), outputs and gradients in
the input's layout, results equal to the [B, C, *] path on the same logical tensor, bitwise thread-invariant."""
import tracemalloc

import numpy as np
import pytest

import bcnswift
from bcnswift.layers import memory_format
from bcnswift import reference as R
from conftest import random_input

LAYERS = {
    "BCN batch": lambda C, dt, **kw: bcnswift.BatchChannelNorm(C, 4, estimate=False, dtype=dt, **kw),
    "BCN estimate": lambda C, dt, **kw: bcnswift.BatchChannelNorm(C, 4, estimate=True, dtype=dt, **kw),
    "authors EstBN": lambda C, dt, **kw: bcnswift.BatchChannelNorm(C, 4, variance_around="running_mean", dtype=dt,
                                                                   **kw),
    "BatchNorm": lambda C, dt, **kw: bcnswift.BatchNorm(C, dtype=dt, **kw),
    "EstimatedBatchNorm": lambda C, dt, **kw: bcnswift.EstimatedBatchNorm(C, dtype=dt, **kw),
    "ChannelNorm": lambda C, dt, **kw: bcnswift.ChannelNorm(C, 4, dtype=dt, **kw),
}
# every layout: channels-last planes of 2 to 15 values, of 16 and more, ranks 3 to 5
SHAPES = [(3, 8, 5), (2, 8, 3, 3), (2, 8, 20), (2, 16, 6, 7), (1, 8, 2, 3, 4), (2, 8, 70, 70)]


def channels_last(x):
    """The same logical [B, C, *] tensor with channels-last memory (what PyTorch's channels_last holds)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


def tolerance(dtype):
    return 1e-13 if np.dtype(dtype) == np.float64 else 2e-6


def assert_rel(actual, expected, dtype, what):
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)).max()) / scale
    assert err <= tolerance(dtype), f"{what}: relative error {err:.2e}"


def run_steps(layer, xs, dys):
    out = []
    for step, (x, dy) in enumerate(zip(xs, dys)):
        layer.train(step < 2)
        layer.zero_grad()
        y = layer(x)
        dx = layer.backward(dy)
        out.append((y, dx, {k: v.copy() for k, v in layer.grads.items()}, layer.state_dict()))
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LAYERS)
def test_channels_last_matches_channels_first(name, shape, dtype, rng):
    C = shape[1]
    xs = [random_input(rng, shape).astype(dtype) for _ in range(3)]
    dys = [rng.normal(0.3, 1.0, shape).astype(dtype) for _ in range(3)]
    first = run_steps(LAYERS[name](C, dtype), xs, dys)
    last = run_steps(LAYERS[name](C, dtype), [channels_last(x) for x in xs], [channels_last(d) for d in dys])
    for step, ((y, dx, g, st), (yl, dxl, gl, stl)) in enumerate(zip(first, last)):
        assert memory_format(yl) == "last" and memory_format(dxl) == "last", "layout not kept"
        assert yl.dtype == dtype and yl.shape == shape
        assert_rel(yl, y, dtype, f"{name} step {step}: y")
        assert_rel(dxl, dx, dtype, f"{name} step {step}: dx")
        for k in g:
            assert_rel(gl[k], g[k], dtype, f"{name} step {step}: grad {k}")
        for k in st:
            assert_rel(stl[k], st[k], dtype, f"{name} step {step}: {k}")


@pytest.mark.parametrize("name", LAYERS)
def test_channel_axis_last(name, rng):
    """channel_axis=-1 takes [B, *, C] data (flax, Keras): C-contiguous [B, H, W, C] is channels-last memory."""
    shape = (3, 8, 6, 5)
    x = random_input(rng, shape)
    dy = rng.normal(0.3, 1.0, shape)
    a = LAYERS[name](8, np.float64)
    b = LAYERS[name](8, np.float64, channel_axis=-1)
    y, dx = a(x), a.backward(dy)
    x_last, dy_last = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    y_last = b(x_last)
    dx_last = b.backward(dy_last)
    assert y_last.shape == x_last.shape and y_last.flags.c_contiguous and dx_last.flags.c_contiguous
    assert_rel(np.moveaxis(y_last, -1, 1), y, np.float64, f"{name}: y")
    assert_rel(np.moveaxis(dx_last, -1, 1), dx, np.float64, f"{name}: dx")
    for k in a.grads:
        assert_rel(b.grads[k], a.grads[k], np.float64, f"{name}: grad {k}")
    # [B, C] data is the same either way
    x2 = random_input(rng, (4, 8))
    np.testing.assert_array_equal(LAYERS[name](8, np.float64, channel_axis=-1)(x2), LAYERS[name](8, np.float64)(x2))
    with pytest.raises(ValueError, match="channels \\(the last dimension\\)"):
        b(np.ones((2, 8, 3)))
    with pytest.raises(ValueError, match="channel_axis must be 1"):
        LAYERS[name](8, np.float64, channel_axis=2)


def test_other_strides_are_copied_into_a_dense_layout(rng):
    x = random_input(rng, (2, 8, 6, 6))
    ref = bcnswift.BatchChannelNorm(8, 4, dtype=np.float64)(x)
    strided = np.asfortranarray(x)  # neither C order nor channels-last
    assert memory_format(strided) is None
    np.testing.assert_array_equal(bcnswift.BatchChannelNorm(8, 4, dtype=np.float64)(strided), ref)
    # a dy in the other layout is laid out like x before the backward
    a, b = bcnswift.BatchChannelNorm(8, 4, dtype=np.float64), bcnswift.BatchChannelNorm(8, 4, dtype=np.float64)
    dy = rng.normal(size=x.shape)
    a(x), b(x)
    np.testing.assert_array_equal(a.backward(dy), b.backward(channels_last(dy)))


def test_axes_of_size_1_may_have_any_stride(rng):
    """An axis of one element (a slice of a channels-last tensor) may have any stride: still channels-last,
    normalized where it lies, the output laid out alike."""
    x = channels_last(random_input(rng, (1, 8, 3, 5)))[:, :, 1:2]  # B's stride still spans H's 3 rows
    assert not x.flags.c_contiguous and x.strides[0] == 3 * x.strides[2]
    assert memory_format(x) == "last"
    ref = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)
    y = layer(x)
    assert memory_format(y) == "last" and not y.flags.c_contiguous
    assert_rel(y, ref(np.ascontiguousarray(x)), np.float64, "y of a channels-last input")


def test_out_must_have_the_input_layout(rng):
    x = channels_last(random_input(rng, (2, 8, 6, 6)).astype(np.float32))
    layer = bcnswift.BatchChannelNorm(8, 4)
    out = np.empty_like(x)
    assert layer(x, out=out) is not None and memory_format(out) == "last"
    with pytest.raises(ValueError, match="channels-last like the input"):
        layer(x, out=np.empty(x.shape, np.float32))


@pytest.mark.parametrize("layout", ["first", "last"])
def test_forward_and_backward_copy_nothing(layout, rng):
    """tracemalloc sees the output and O(B·C) numbers, never a copy of the input (2 MB here)."""
    shape = (4, 64, 32, 32)
    x = random_input(rng, shape).astype(np.float32)
    x = x if layout == "first" else channels_last(x)
    dy = rng.normal(size=shape).astype(np.float32)
    dy = dy if layout == "first" else channels_last(dy)
    layer = bcnswift.BatchChannelNorm(64, 8, estimate=False)
    layer(x), layer.backward(dy)  # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        y = layer(x)
        forward_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        dx = layer.backward(dy)
        backward_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    small = 64 * 1024  # the context and parameters: O(B·C) numbers
    assert forward_peak <= y.nbytes + small, f"forward allocated {forward_peak} bytes for a {y.nbytes}-byte output"
    assert backward_peak <= dx.nbytes + small, f"backward allocated {backward_peak} bytes"


# (1, 512, 48, 48): more rows than 16 stretches of 64K values, so each stretch takes a sixteenth of the sample
CAPPED = (1, 512, 48, 48)


@pytest.mark.parametrize("shape", [(4, 16, 64, 65), (64, 32, 3, 3), (64, 64, 4, 5), CAPPED],
                         ids=str)  # (64, 64, 4, 5): 256 units
def test_channels_last_results_do_not_depend_on_thread_count(shape, rng):
    x = channels_last(random_input(rng, shape).astype(np.float32))
    dy = channels_last(rng.normal(size=shape).astype(np.float32))
    results = []
    try:
        for threads in (1, 2, 5):
            bcnswift.set_num_threads(threads)
            layer = bcnswift.BatchChannelNorm(shape[1], 4, estimate=False)
            y = layer(x)
            results.append((y, layer.backward(dy), layer.grads["bn.weight"].copy(), layer.grads["weight"].copy(),
                            layer.running_var.copy()))
    finally:
        bcnswift.set_num_threads(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_channels_last_with_capped_stretches_matches_channels_first(rng):
    xs = [random_input(rng, CAPPED) for _ in range(3)]
    dys = [rng.normal(0.3, 1.0, CAPPED) for _ in range(3)]
    make = LAYERS["BCN batch"]
    first = run_steps(make(CAPPED[1], np.float64), xs, dys)
    last = run_steps(make(CAPPED[1], np.float64), [channels_last(x) for x in xs], [channels_last(d) for d in dys])
    for step, ((y, dx, g, _), (yl, dxl, gl, _)) in enumerate(zip(first, last)):
        assert_rel(yl, y, np.float64, f"step {step}: y")
        assert_rel(dxl, dx, np.float64, f"step {step}: dx")
        for k in g:
            assert_rel(gl[k], g[k], np.float64, f"step {step}: grad {k}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_channels_last_moments_of_drifting_planes(dtype, rng):
    """Each stretch of rows measures its planes around a shift of its own, sums again in Float64 where the shift
    was off, and a sample's stretches merge by Chan's formula: planes far from zero with a small spread, whose
    mean drifts across the rows, and every third channel's first value far off (the first of the shift's rows,
    so that stretch is summed again). The data are ill-conditioned (an offset 1e5 times the spread, eps a tenth
    of the variance), so both layouts are held to an extended-precision run of labml's layer: channels-last at
    most a little less accurate than [B, C, *]."""
    B, C, H, W = 2, 64, 40, 40  # 1600 rows of 64 channels: two stretches a sample (1024 and 576 rows)
    drift = np.linspace(-1.0, 1.0, H * W).reshape(1, 1, H, W) * rng.uniform(0.01, 0.05, (1, C, 1, 1))
    x = 1e3 + rng.normal(0.0, 0.01, (B, C, H, W)) + drift
    x[:, ::3, 0, 0] += 50.0
    x, dy = x.astype(dtype), rng.normal(0.3, 1.0, x.shape).astype(dtype)
    ref = R.LabmlBatchChannelNorm(C, 4, estimate=False)
    want = {"y": ref(x.astype(np.longdouble)), "dx": ref.backward(dy.astype(np.longdouble)),
            "running_mean": ref.batch_norm.exp_mean, "running_var": ref.batch_norm.exp_var}
    errors = {}
    for layout, (xs, dys) in {"first": (x, dy), "last": (channels_last(x), channels_last(dy))}.items():
        layer = bcnswift.BatchChannelNorm(C, 4, estimate=False, unbiased_running_var=False, dtype=dtype)
        got = {"y": layer(xs), "dx": layer.backward(dys), "running_mean": layer.running_mean,
               "running_var": layer.running_var}
        errors[layout] = {k: float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want}
    for k in want:
        first, last = errors["first"][k], errors["last"][k]
        assert last <= 1.5 * first + 4 * np.finfo(dtype).eps, f"{k}: channels-last {last:.2e}, [B, C, *] {first:.2e}"


def test_channels_last_input_streaming_from_memory_matches_channels_first(rng):
    """Above 16 MB of input the column sums read each block's rows in order (the same bits as the strips the
    smaller inputs take): a 17.5 MB float32 input against the [B, C, *] path."""
    shape = (1, 128, 190, 180)
    x = random_input(rng, shape).astype(np.float32)
    dy = rng.normal(0.3, 1.0, shape).astype(np.float32)
    assert x.nbytes > 16 << 20
    first = run_steps(LAYERS["BCN batch"](128, np.float32), [x], [dy])
    last = run_steps(LAYERS["BCN batch"](128, np.float32), [channels_last(x)], [channels_last(dy)])
    (y, dx, g, _), (yl, dxl, gl, _) = first[0], last[0]
    assert_rel(yl, y, np.float32, "y")
    assert_rel(dxl, dx, np.float32, "dx")
    for k in g:
        assert_rel(gl[k], g[k], np.float32, f"grad {k}")


def test_channels_last_planes_whose_float32_squares_overflow(rng):
    """A plane of 1e20 ± 3e19: its squares around the shift overflow Float32 while their sum of deviations stays
    finite, so its stretch is summed again in Float64 (it was kept with an infinite M2: y was NaN)."""
    shape = (2, 8, 8, 8)
    x = random_input(rng, shape)
    x[:, 0] = rng.normal(1e20, 3e19, x[:, 0].shape)
    x = x.astype(np.float32)
    dy = rng.normal(0.3, 1.0, shape).astype(np.float32)
    first = run_steps(LAYERS["BCN batch"](8, np.float32), [x], [dy])
    last = run_steps(LAYERS["BCN batch"](8, np.float32), [channels_last(x)], [channels_last(dy)])
    (y, dx, _, st), (yl, dxl, _, stl) = first[0], last[0]
    assert np.isfinite(yl).all() and np.isfinite(stl["bn.running_var"]).all()
    assert_rel(yl, y, np.float32, "y")
    assert_rel(dxl, dx, np.float32, "dx")
