"""Hard numerics, float32 inputs against float64 computations: large means, tiny spreads, huge planes, huge values,
NaN and infinity."""
import numpy as np
import pytest

import bcnswift
from bcnswift import reference as R
from conftest import _get, _set, random_input


def _channels_last(a):
    """The same values, in channels-last memory ([B, *, C] in C order, seen as [B, C, *])."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def test_constant_channel_at_1e7_gives_exactly_the_bias(rng):
    x = rng.normal(3.0, 1.0, (2, 4, 6, 6)).astype(np.float32)
    x[:, 2] = 1e7
    bn = bcnswift.BatchNorm(4)
    bn.bias[...] = [0.25, -1.5, 0.75, 2.0]
    y = bn(x)
    assert (y[:, 2] == np.float32(0.75)).all()  # exactly the bias: no spurious +-1 from cancellation
    bcn = bcnswift.BatchChannelNorm(4, 2, estimate=False)
    bcn.bias[...] = np.array([0.5, -0.25], np.float32).reshape(1, 2, 1)
    out = bcn(np.full((2, 4, 3, 3), 1e7, np.float32)).reshape(2, 2, -1)  # [B, G, K*S]
    assert (out == np.array([0.5, -0.25], np.float32).reshape(1, 2, 1)).all()
    cn = bcnswift.ChannelNorm(4, 2, dtype=np.float64)
    cn.bias[...] = 0.125
    assert (cn(np.full((2, 4, 5), 0.7)) == 0.125).all()  # constant, not exactly representable: still exact


@pytest.mark.parametrize("spatial", [(3, 3), (16, 16), (70, 70)])  # rows, planes (one chunk), planes of chunks
def test_a_dead_channel_of_zeros_has_zero_moments_exactly(spatial, rng):
    """A channel of zeros (a dead filter's output) measures mean 0 and variance 0 exactly (its moments skip the
    Float64 passes): its output is the bias, the running mean stays 0 and the running variance decays to 0."""
    x = rng.normal(0.5, 1.0, (2, 4) + spatial).astype(np.float32)
    x[:, 1] = 0
    bn = bcnswift.BatchNorm(4, dtype=np.float32)
    bn.bias[...] = [0.25, -1.5, 0.75, 2.0]
    y = bn(x)
    assert (y[:, 1] == np.float32(-1.5)).all()
    assert bn.running_mean[1] == 0 and bn.running_var[1] == np.float32(0.9)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3), keepdims=True), x64.var(axis=(0, 2, 3), keepdims=True)
    expected = (x64 - mean) / np.sqrt(var + 1e-5) + bn.bias.reshape(1, 4, 1, 1)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mean,std", [(100.0, 0.01), (1e4, 1.0), (-3e3, 0.1)])
@pytest.mark.parametrize("estimate", [False, True])
def test_large_mean_small_spread_keeps_1e4_relative(mean, std, estimate, rng):
    x = (mean + std * rng.normal(size=(4, 8, 7, 7))).astype(np.float32)
    # momentum 1: the running buffers become the batch's (biased) statistics, so both modes normalize alike
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=estimate, momentum=1.0, unbiased_running_var=False)
    y = layer(x)
    x64 = x.astype(np.float64)
    # the float64 truth, with exact centred variances (labml's E[x²]-E[x]² would itself lose digits here)
    mu = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = x64.var(axis=(0, 2, 3), keepdims=True)
    y1 = (x64 - mu) / np.sqrt(var + 1e-5)
    g = y1.reshape(4, 4, -1)
    truth = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, truth, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.bn.running_var, var.reshape(-1), rtol=1e-4)
    np.testing.assert_allclose(layer.bn.running_mean, mu.reshape(-1), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 64, 2, 2), (13, 32, 3), (64, 128, 2), (9, 16, 1, 4), (3, 32, 2, 2)],
                         ids=str)
def test_short_planes_batch_moments_keep_float64_accuracy_at_any_thread_count(shape, dtype, rng):
    """Planes of 2 to 4 values from 8 samples take their batch moments by columns (each position of a plane
    down the samples, then a channel's columns merged around one of their means); fewer samples, by planes.
    Either way, on input whose means sit 1e4 to 1e5 spreads from 0, the float64 mean stays within
    1e-15 and M2 within 1e-9 of the exact values (E[x²] - E[x]² would lose all of M2 here; measured: 6e-11), and
    one thread gives the bits two give."""
    B, C = shape[:2]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    mean = rng.choice([-1.0, 1.0], C) * rng.uniform(1e4, 1e5, C)
    x = (rng.normal(size=shape) * rng.uniform(0.5, 2.0, C).reshape(bshape) + mean.reshape(bshape)).astype(dtype)
    layer = bcnswift.BatchChannelNorm(C, 8, estimate=False, dtype=dtype)

    def moments():
        m, ctx = np.empty(3 * C), np.empty(bcnswift._ext.context_length(B, C, 8))
        bcnswift._ext.norm_moments(layer._call_flags(), 8, x, m, ctx)
        return m.reshape(C, 3)

    got = moments()
    values = np.moveaxis(x.astype(np.longdouble), 1, 0).reshape(C, -1)
    mu = values.mean(axis=1)
    m2 = ((values - mu[:, None]) ** 2).sum(axis=1)
    assert (got[:, 0] == values.shape[1]).all()
    assert np.max(np.abs(got[:, 1] - mu) / np.abs(mu)) <= 1e-15
    assert np.max(np.abs(got[:, 2] - m2) / m2) <= 1e-9
    for threads in (1, 2):
        with bcnswift.num_threads(threads):
            np.testing.assert_array_equal(moments(), got, err_msg=f"{threads} thread(s)")


def test_forty_million_values_keep_the_variance_to_1e6():
    rng = np.random.default_rng(7)
    x = rng.random((1, 1, 40_000_000), dtype=np.float32)
    bn = bcnswift.BatchNorm(1, momentum=1.0, unbiased_running_var=False)
    bn(x)
    truth = x.astype(np.float64).var()
    assert abs(float(bn.running_var[0]) - truth) / truth < 1e-6
    assert abs(float(bn.running_mean[0]) - x.astype(np.float64).mean()) < 1e-6


def test_values_near_1e30_do_not_overflow(rng):
    x = (1e30 * (1 + 0.1 * rng.normal(size=(2, 4, 16)))).astype(np.float32)
    layer = bcnswift.BatchChannelNorm(4, 2, estimate=False, momentum=1.0)
    y = layer(x)
    assert np.isfinite(y).all() and np.isfinite(layer.bn.running_mean).all()
    ref = R.AuthorsBCNorm(4, 2, 1e-5)
    ref.bn.momentum = 1.0
    np.testing.assert_allclose(y, ref(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    dx = layer.backward(rng.normal(size=y.shape).astype(np.float32))
    assert np.isfinite(dx).all()
    # The statistics are computed in float64 and stay finite; a variance of ~1e58 has no float32 value, so a
    # float32 running_var holds inf (as PyTorch's would), and a float64 layer holds it exactly.
    assert np.isinf(layer.bn.running_var).all()
    wide = bcnswift.BatchChannelNorm(4, 2, estimate=False, momentum=1.0, dtype=np.float64)
    wide(x)
    np.testing.assert_allclose(wide.bn.running_var, ref.bn.running_var, rtol=1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_propagate_by_default(bad, rng):
    x = rng.normal(1.0, 1.0, (2, 4, 5)).astype(np.float32)
    x[1, 2, 3] = bad
    layer = bcnswift.BatchChannelNorm(4, 2, estimate=False)
    y = layer(x)
    assert np.isnan(y[:, 2:4]).all()          # the channel's statistics, then its group, as in PyTorch
    assert np.isfinite(y[:, 0:2]).all()       # the other group of each sample is untouched
    # as PyTorch: mean inf or nan
    assert not np.isfinite(layer.bn.running_mean[2]) and np.isnan(layer.bn.running_var[2])
    assert np.isfinite(layer.bn.running_mean[[0, 1, 3]]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape,channels_last", [
    ((6, 4), False), ((2, 4, 3), False), ((2, 4, 2, 2), False), ((2, 4, 20), False), ((2, 4, 5, 5), False),
    ((2, 4, 3), True), ((2, 4, 2, 2), True), ((2, 4, 5, 5), True)],
    ids=["rows", "planes of 3", "planes of 2x2", "planes of 20", "planes of 5x5", "channels-last 3",
         "channels-last 2x2", "channels-last 5x5"])
@pytest.mark.parametrize("layer_type", ["bn", "estimated bn"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_eval_a_non_finite_value_stays_its_own_as_in_pytorch(bad, shape, channels_last, layer_type, dtype, rng):
    """Eval's batch norm is a map value by value: y = a (x - running_mean) + bias. The kernels centre each plane's
    map on its mean, which a non-finite value made NaN for the whole plane (and the backward's x - p too); such a
    plane is mapped about the running mean now. dx = a dy everywhere, the bad value's own included, as PyTorch's
    autograd gives it (the backward's map reads dy where it would read x: 0 times a non-finite x was NaN)."""
    make = bcnswift.BatchNorm if layer_type == "bn" else bcnswift.EstimatedBatchNorm
    layer = make(4, dtype=dtype)
    layer(random_input(rng, shape).astype(dtype))  # running statistics away from 0 and 1
    layer.eval()
    x = random_input(rng, shape).astype(dtype)
    bad_at = (1, 2) + (1,) * (len(shape) - 2)
    x[bad_at] = bad
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    view = (1, 4) + (1,) * (len(shape) - 2)
    wide = lambda v: v.astype(np.float64).reshape(view)  # noqa: E731
    a = wide(layer.bn_weight) / np.sqrt(wide(layer.running_var) + layer.eps)
    expected = (x.astype(np.float64) - wide(layer.running_mean)) * a + wide(layer.bn_bias)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-6)
    y = layer(x)
    finite = np.isfinite(expected)
    assert (~finite).sum() == 1 and np.array_equal(np.isfinite(y), finite), "only the bad value is not finite"
    np.testing.assert_allclose(y[finite], expected[finite], **tol)
    assert np.isnan(y[bad_at]) if np.isnan(bad) else y[bad_at] == np.sign(bad) * np.inf
    dy = random_input(rng, shape).astype(dtype)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, a * dy, **tol)
    assert not np.isfinite(layer.grads["weight"][2]) and np.isfinite(layer.grads["weight"][[0, 1, 3]]).all()
    np.testing.assert_allclose(layer.grads["bias"],
                               dy.astype(np.float64).sum(axis=tuple(i for i in range(len(shape)) if i != 1)), **tol)
    # a non-finite dy stays its own as well (the backward's map centred dy on its plane's mean, NaN for all of
    # it), and is a dy there too: ±inf, not the NaN of 0·inf that reading dy in x's place once made of it
    dy[(0, 1) + (0,) * (len(shape) - 2)] = bad
    dx, expected = layer.backward(dy), a * dy.astype(np.float64)
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(dx), finite), f"only dy's bad value: {np.argwhere(~np.isfinite(dx))}"
    np.testing.assert_allclose(dx[finite], expected[finite], **tol)
    np.testing.assert_array_equal(dx[~finite], expected[~finite].astype(dtype))  # NaN where NaN, else a·dy's ±inf


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
@pytest.mark.parametrize("shape,channels_last", [((6, 4), False), ((2, 4, 3), False), ((2, 4, 5, 5), False),
                                                 ((2, 4, 5, 5), True)],
                         ids=["rows", "planes of 3", "planes of 5x5", "channels-last 5x5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_estimates_in_training_map_an_infinite_dy_to_an_infinite_dx(bad, shape, channels_last, dtype, rng):
    """In training with estimates the backward does not pass through batch statistics either: dx = a·dy value by
    value. An infinite dy gave NaN in its own dx (0·inf from the term in x the map leaves at 0); the other values
    are those of the same dy with a finite value there."""
    layer = bcnswift.EstimatedBatchNorm(4, dtype=dtype)
    x = random_input(rng, shape).astype(dtype)
    dy = random_input(rng, shape).astype(dtype)
    if channels_last:
        x, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(v, 1, -1)), -1, 1) for v in (x, dy))
    layer(x)
    at = (1, 2) + (0,) * (len(shape) - 2)
    finite_dx = layer.backward(dy).copy()
    dy[at] = bad
    dx = layer.backward(dy)
    assert dx[at] == np.copysign(np.inf, bad * layer.bn_weight[2]), dx[at]  # a = γ/σ: γ's sign
    others = np.ones(dx.shape, bool)
    others[at] = False
    np.testing.assert_array_equal(dx[others], finite_dx[others])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("layer_type", ["bcn", "bn", "cn"])
def test_nan_policy_raise_changes_nothing(bad, layer_type, rng):
    make = {"bcn": lambda: bcnswift.BatchChannelNorm(4, 2, nan_policy="raise"),
            "bn": lambda: bcnswift.BatchNorm(4, nan_policy="raise"),
            "cn": lambda: bcnswift.ChannelNorm(4, 2, nan_policy="raise")}[layer_type]
    layer = make()
    good = rng.normal(1.0, 1.0, (2, 4, 5)).astype(np.float32)
    layer(good)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    x = good.copy()
    x[0, 1, 2] = bad
    with pytest.raises(FloatingPointError, match="NaN or infinity.* and nan_policy is .raise.$"):
        layer(x)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # the backward differentiates the last good forward, as a twin's that never saw the bad input: dx and every
    # parameter gradient (a dy of ones made dx near 0 whatever the context held)
    dy = rng.normal(0.3, 1.0, good.shape).astype(np.float32)
    twin = make()
    twin(good)
    np.testing.assert_array_equal(layer.backward(dy), twin.backward(dy))
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, twin.grads[k], err_msg=k)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
@pytest.mark.parametrize("layer_type", ["bcn", "bn", "cn", "bcn channels-last"])
def test_nan_policy_raise_screens_the_backwards_dy_and_changes_nothing(bad, layer_type, rng):
    """With nan_policy="raise" a NaN or infinity in dy raises before dx or any parameter gradient is written,
    naming the value's sample and channel (in memory order, either layout); the same backward with a finite dy
    then runs as if the failed one had not happened."""
    make = {"bcn": lambda: bcnswift.BatchChannelNorm(4, 2, nan_policy="raise"),
            "bn": lambda: bcnswift.BatchNorm(4, nan_policy="raise"),
            "cn": lambda: bcnswift.ChannelNorm(4, 2, nan_policy="raise")}[layer_type.split()[0]]
    x = rng.normal(1.0, 1.0, (2, 4, 3, 5)).astype(np.float32)
    dy = rng.normal(0.3, 1.0, x.shape).astype(np.float32)
    if layer_type.endswith("channels-last"):
        x, dy = _channels_last(x), _channels_last(dy)
    layer = make()
    layer(x)
    bad_dy = dy.copy(order="K")  # in dy's layout
    bad_dy[1, 2, 0, 3] = bad
    grads = {k: v.copy() for k, v in layer.grads.items()}
    out = np.full_like(x, 7.0)
    with pytest.raises(FloatingPointError, match=r"dy holds NaN or infinity \(channel 2 of sample 1\) and "
                                                 r"nan_policy is .raise.$"):
        layer.backward(bad_dy, out=out)
    assert (out == 7.0).all()
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, grads[k], err_msg=k)
    twin = make()
    twin(x)
    np.testing.assert_array_equal(layer.backward(dy), twin.backward(dy))
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, twin.grads[k], err_msg=k)


def test_huge_plane_with_few_channels_is_exact_and_chunked(rng):
    """B = 1, 2 channels, 3 million positions: planes are split in chunks and merged; compare with float64."""
    x = (5.0 + rng.normal(size=(1, 2, 3_000_000))).astype(np.float32)
    layer = bcnswift.BatchChannelNorm(2, 1, estimate=False)
    y = layer(x)
    x64 = x.astype(np.float64)
    y1 = (x64 - x64.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x64.var(axis=(0, 2), keepdims=True) + 1e-5)
    truth = (y1 - y1.mean()) / np.sqrt(y1.var() + 1e-5)
    np.testing.assert_allclose(y, truth, rtol=1e-4, atol=1e-5)


def test_float32_tiny_groups_regression():
    """Found by hypothesis: [2, 8] input, groups of two values per sample, float32. The channel norm's nearly
    equal pairs make dx a cancellation of terms near 1e3; the scalar path evaluates it in float64."""
    from conftest import CONVENTIONS, Pair, random_input
    convention = [c for c in CONVENTIONS if c.name == "labml BatchChannelNorm, estimate=False"][0]
    rng = np.random.default_rng(1)
    pair = Pair(convention, 8, 4, np.float32, rng)
    for step in range(3):
        pair.step(random_input(rng, (2, 8)), rng.normal(0.3, 1.0, (2, 8)), f"step {step}")


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("shape", [(4, 8, 3), (2, 8, 2, 2), (2, 8, 5, 5)], ids=str)
def test_one_channel_per_group_bn_gradients_exist_only_through_eps(shape, estimate, rng):
    """With one channel per group the channel norm cancels the batch norm's affine but for eps: dγ is of order
    eps·r² and dβ is 0. Written as 1 - r²v they lost up to 9 digits (errors of 1e-8 relative to dγ itself at
    eps = 1e-8); written as eps·r² they agree with an extended-precision run of the authors' code."""
    C, L = shape[1], np.longdouble
    kw = dict(variance_around="running_mean") if estimate else {}
    layer = bcnswift.BatchChannelNorm(C, C, eps=1e-8, bn_eps=1e-5, estimate=estimate, dtype=np.float64, **kw)
    ref = R.AuthorsBCNorm(C, C, 1e-8, estimate=estimate)
    if estimate:
        ref.bn.estbn_moving_speed[:] = 0.1
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(0.3, 0.5, C)
    layer.bn.weight[...], layer.bn.bias[...] = gamma, beta
    ref.bn.weight, ref.bn.bias = gamma.astype(L), beta.astype(L)
    x, dy = random_input(rng, shape), rng.normal(0.3, 1.0, shape)
    layer(x)
    layer.backward(dy)
    ref(x.astype(L))
    ref.backward(dy.astype(L))
    scale = float(np.abs(ref.grads["bn.weight"]).max())
    for key in ("bn.weight", "bn.bias"):
        err = float(np.abs(layer.grads[key] - ref.grads[key]).max()) / scale
        assert err < 1e-10, f"{key}: error {err:.1e} relative to max |dγ| = {scale:.1e}"


@pytest.mark.parametrize("shape,G,channels_last", [((2, 16), 1, False), ((2, 64), 4, False), ((1, 16, 2), 4, False),
                                                   ((1, 12, 2), 3, False), ((2, 16, 1, 1), 2, False),
                                                   ((1, 16, 1, 2), 1, False), ((2, 16, 1, 1), 2, True),
                                                   ((1, 16, 1, 2), 2, True), ((1, 24, 2, 1), 3, True)],
                         ids=str)
def test_two_values_a_channel_keep_the_batch_norm_gradient_that_exists_through_eps(shape, G, channels_last, rng):
    """With two values a channel (B·S = 2) the batch norm's dx exists only through eps: dx = ±γ r (1 - ẑ²) Δ/2,
    1 - ẑ² = eps/(σ² + eps), what is left of dy₁'s terms. The Float32 lanes of groups of whole vectors (of
    [B, C] rows, and of the value view of short planes, whose forward's group moments the backward reads) rounded
    dy₁ first, and dx came out 67 to 4e4 ulps of its own largest magnitude off; such calls take Float64 (within
    the lanes' bound, 8 ulps, which the forward's group moments may still use). Channels-last planes of two from
    one sample (96-204 ulps) take their moments, sums and backward map in Float64."""
    C = shape[1]
    x = random_input(rng, shape).astype(np.float32)
    dy = rng.normal(0.3, 1.0, shape).astype(np.float32)
    if channels_last:
        x, dy = _channels_last(x), _channels_last(dy)
    layer = bcnswift.BatchChannelNorm(C, G, estimate=False, dtype=np.float32)
    ref = R.AuthorsBCNorm(C, G, 1e-5)
    layer(x)
    dx = layer.backward(dy)
    ref(x.astype(np.longdouble))
    dx_ref = ref.backward(dy.astype(np.longdouble))
    assert _ulps_of_scale(dx, dx_ref) <= 8, f"max |dx| = {float(np.abs(dx_ref).max()):.1e}"  # 0.1-0.3 measured
    for key in ("weight", "bias", "bn.weight", "bn.bias"):
        assert _ulps_of_scale(layer.grads[key], ref.grads[key]) <= 8, key


@pytest.mark.parametrize("shape", [(2, 16, 2), (2, 8, 1, 3), (4, 8, 2)], ids=str)
def test_two_samples_of_short_planes_keep_the_value_view_s_float32_lanes(shape, rng):
    """The value view sees planes of S values from B samples as [B, C·S] rows: from two samples, its own layout
    has two rows, which is not two values a channel (B·S is). A version of the two-values rule in which the view's
    layout judged by its own shape (it never landed) ran the view's backward without the lanes' scratch, writing
    past it (valgrind; a crash in the properties test). Within the Float32 lanes' 8 ulps of the largest |dx|."""
    C = shape[1]
    x = random_input(rng, shape).astype(np.float32)
    dy = rng.normal(0.3, 1.0, shape).astype(np.float32)
    layer = bcnswift.BatchChannelNorm(C, C // 8, estimate=False, dtype=np.float32)
    ref = R.AuthorsBCNorm(C, C // 8, 1e-5)
    for step in range(3):
        layer(x)
        dx = layer.backward(dy)
        ref(x.astype(np.longdouble))
        assert _ulps_of_scale(dx, ref.backward(dy.astype(np.longdouble))) <= 8, f"step {step}"


_LABML_PARAMETERS = {"weight": "channel_norm.scale", "bias": "channel_norm.shift", "bn.weight": "batch_norm.scale",
                     "bn.bias": "batch_norm.shift"}


def _labml_pair(C, G, estimate, rng=None):
    """bcnswift's BatchChannelNorm (labml's convention) and the documents' float64 LabmlBatchChannelNorm with the
    same parameters: drawn at random with `rng` (float32 values on both sides), else the initial ones."""
    layer = bcnswift.BatchChannelNorm(C, G, estimate=estimate, unbiased_running_var=False)
    ref = R.LabmlBatchChannelNorm(C, G, estimate=estimate)
    if rng is not None:
        _draw_parameters(layer, ref, _LABML_PARAMETERS, rng)
    _copy_parameters(layer, ref)
    return layer, ref


def _copy_parameters(layer, ref):
    for name, path in _LABML_PARAMETERS.items():
        _set(ref, path, layer.parameters()[name].astype(np.float64).reshape(np.shape(_get(ref, path))))


def _draw_parameters(layer, ref, names, rng):
    """Random parameters (weights about 1, biases about 0), the same float32 values in bcnswift's `layer` and in
    the documents' `ref` (`names`: bcnswift's name to the reference's)."""
    for name, path in names.items():
        array = layer.parameters()[name]
        array[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.3, array.shape)
        _set(ref, path, array.astype(np.float64).reshape(np.shape(_get(ref, path))))


def _to_eval(layer, ref):
    """Both into eval, the reference on bcnswift's running buffers: bcnswift keeps them in float32, and eval
    normalizes with them, so both use those values."""
    layer.eval(); ref.train(False)
    for name, path in (("bn.running_mean", "batch_norm.exp_mean"), ("bn.running_var", "batch_norm.exp_var")):
        _set(ref, path, layer.state_dict()[name].astype(np.float64).reshape(np.shape(_get(ref, path))))


def _rows_float32_error(x, G, estimate, rng=None, set_eval=None):
    """bcnswift's float32 output on [B, C] x (a training step, then eval) and the documents' float64 output on the
    same values, for BatchChannelNorm with G groups: [y, truth, y_eval, truth_eval]. With `rng`, every parameter
    is drawn at random (the same float32 values on both sides); `set_eval(layer)` may change them in place
    before eval, and returns the eval input."""
    layer, ref = _labml_pair(x.shape[1], G, estimate, rng)
    out = [layer(x), ref.forward(x.astype(np.float64))]
    _to_eval(layer, ref)
    if set_eval is not None:
        x = set_eval(layer)
        _copy_parameters(layer, ref)
    out += [layer(x), ref.forward(x.astype(np.float64))]
    return out


def _scaled_error(got, want):
    return np.max(np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))) / np.finfo(np.float32).eps


@pytest.mark.parametrize("K", [8, 16, 24, 64, 72, 128, 512], ids=lambda k: f"K={k}")
@pytest.mark.parametrize("estimate", [False, True])
def test_float32_rows_in_float32_lanes_stay_within_8_ulps(K, estimate, rng):
    """[B, C] float32 with groups of whole 8-lane vectors: the channel-norm stage runs in Float32 lanes (sums
    flushed to Float64 every 64 values: K = 72 and 128 cross that, K = 512 is a whole item), with random
    parameters. Its error against the documents' float64 code stays within 8 ulps of the output's scale (at
    most 6 measured)."""
    G = max(2, 1024 // K)
    x = random_input(rng, (64, G * K)).astype(np.float32)
    y, truth, y_eval, truth_eval = _rows_float32_error(x, G, estimate, rng)
    assert _scaled_error(y, truth) <= 8 and _scaled_error(y_eval, truth_eval) <= 8


@pytest.mark.parametrize("K,spatial", [(8, (2, 2)), (2, (2, 2)), (16, (3,)), (4, (2,)), (8, (3, 3))],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("B", [32, 3])
def test_float32_short_planes_in_float32_lanes_stay_within_8_ulps(K, spatial, estimate, B, rng):
    """Planes of 2 to 4 values whose units (K planes of S values) are whole 8-lane vectors run the channel norm
    on the same Float32 lanes, forward and backward, as one-value planes of a [B, C·S] view (planes of 9, the
    last case, keep the planes layout's Float64 maps, and take the view backward only, from 16 samples; the
    view's batch-norm sums are added over each plane's values); with random parameters, training then eval,
    within 8 ulps of the output's scale against the documents' float64 code, and dx and every parameter gradient
    within 8 ulps of their scale. On 3 samples too: planes of up to 4 values take the view backward on any
    batch (whose per-value context each panel fills), planes of 9 keep the planes' backward there."""
    G = max(2, 256 // K)
    x = random_input(rng, (B, G * K) + spatial).astype(np.float32)
    y, truth, y_eval, truth_eval = _rows_float32_error(x, G, estimate, rng)
    assert _scaled_error(y, truth) <= 8 and _scaled_error(y_eval, truth_eval) <= 8
    dy = rng.normal(0.3, 1.0, x.shape).astype(np.float32)
    dx, dx_ref, grads = _rows_float32_gradients(x, dy, G, estimate, rng)
    assert _ulps_of_scale(dx, dx_ref) <= 8
    for name, (got, want) in grads.items():
        assert _ulps_of_scale(got, want) <= 8, name


@pytest.mark.parametrize("layer_type", ["ChannelNorm", "BatchChannelNorm eval"])
def test_float32_planes_of_four_are_the_rows_of_their_values_bit_for_bit(layer_type, rng):
    """The value view, exactly: a [B, C, 2, 2] float32 input in groups of 8 channels (units of 32 values) gives
    bit for bit what the same values give as [B, 4C] rows in the same groups, whose channel norm runs on those
    Float32 lanes (the planes layout's Float64 maps differ in the last bits), forward and backward: dx and the
    channel norm's gradients. In eval, with the batch norm's running statistics and affine repeated for the four
    values of each channel (whose own gradients differ: a channel's adds its four values' sums before scaling)."""
    B, C, G = 16, 64, 8
    x = random_input(rng, (B, C, 2, 2)).astype(np.float32)
    if layer_type == "ChannelNorm":
        planes, rows = bcnswift.ChannelNorm(C, G), bcnswift.ChannelNorm(4 * C, G)
    else:
        planes = bcnswift.BatchChannelNorm(C, G, estimate=False)
        rows = bcnswift.BatchChannelNorm(4 * C, G, estimate=False)
        planes.eval(), rows.eval()
        for name, array in planes.parameters().items():
            array[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.3, array.shape)
        planes.running_mean[...] = rng.normal(0.5, 0.5, C)
        planes.running_var[...] = rng.uniform(0.5, 2.0, C)
        for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
            getattr(rows, name)[...] = np.repeat(getattr(planes, name), 4)
    for name in ("weight", "bias"):
        getattr(rows, name)[...] = getattr(planes, name)
    np.testing.assert_array_equal(planes(x).reshape(B, 4 * C), rows(x.reshape(B, 4 * C)))
    dy = rng.normal(0.3, 1.0, x.shape).astype(np.float32)
    np.testing.assert_array_equal(planes.backward(dy).reshape(B, 4 * C), rows.backward(dy.reshape(B, 4 * C)))
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(planes.grads[name], rows.grads[name], err_msg=name)


def test_float32_short_planes_take_float64_where_float32_would_round_visibly(rng):
    """As for one-value planes: [64, 256, 2, 2] in groups of 8 channels (units of 32 values), every other group 20
    standard deviations off 0 (sign alternating by sample) takes the Float64 path, within an ulp; the rest within
    8 ulps of the scale."""
    B, C, K, S = 64, 256, 8, 4
    G = C // K
    offset = np.where(np.arange(G) % 2 == 0, 20.0, 0.0)[None, :] * np.where(np.arange(B) % 2 == 0, 1, -1)[:, None]
    x = (rng.normal(0.5, 1.0, (B, G, K, S)) + offset[..., None, None]).reshape(B, C, 2, 2).astype(np.float32)
    for got, want in zip(*[iter(_rows_float32_error(x, G, estimate=False))] * 2):
        err = np.abs(got.astype(np.float64) - want).reshape(B, G, K * S)
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64).reshape(B, G, K * S)
        assert np.all(err[:, 0::2] <= ulp[:, 0::2]), "groups 20 σ off 0: within an ulp (Float64 path)"
        assert _scaled_error(got.reshape(B, G, K * S)[:, 1::2], want.reshape(B, G, K * S)[:, 1::2]) <= 8


@pytest.mark.parametrize("B", [7, 5, 3])
def test_float32_rows_in_eval_are_each_row_alone_bit_for_bit(B, rng):
    """In eval a row's output depends on that row alone. The Float32 lanes stage rows four at a time, then two,
    then one (B = 7 takes all three), and refuse groups 40 off 0 (group 0 of every third row) to the Float64
    path row by row: every row must come out bit for bit as it does alone."""
    C, G = 256, 8
    x = random_input(rng, (B, C)).astype(np.float32)
    x[::3, :32] += 40
    layer = bcnswift.BatchChannelNorm(C, G, estimate=False)
    for name, array in layer.parameters().items():
        array[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.3, array.shape)
    layer.running_mean[...] = rng.normal(0.5, 0.5, C)
    layer.running_var[...] = rng.uniform(0.5, 2.0, C)
    layer.eval()
    y = layer(x)
    for i in range(B):
        np.testing.assert_array_equal(y[i:i + 1], layer(x[i:i + 1]), err_msg=f"row {i}")


@pytest.mark.parametrize("K", [32, 8], ids=lambda k: f"K={k}")
def test_float32_rows_take_float64_where_float32_would_round_visibly(K, rng):
    """A group whose mean lies more than 4 standard deviations from 0 would lose up to |mean|/σ ulps in Float32
    (ȳ itself is rounded relative to the mean); such groups take the Float64 path, within an ulp. Groups
    alternate in each row: even ones sit 20 σ off 0 (alternating sign by sample; far enough that no group of 8
    values comes within 4 of its own σ), odd ones near 0. With K = 8 an item of a row holds 64 groups, so the
    refused ones reach the top bits of the item's mask."""
    B, C = 64, 1024
    G = C // K
    offset = np.where(np.arange(G) % 2 == 0, 20.0, 0.0)[None, :] * np.where(np.arange(B) % 2 == 0, 1, -1)[:, None]
    x = (rng.normal(0.5, 1.0, (B, G, K)) + offset[..., None]).reshape(B, C).astype(np.float32)
    for got, want in zip(*[iter(_rows_float32_error(x, G, estimate=False))] * 2):
        err = np.abs(got.astype(np.float64) - want).reshape(B, G, K)
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64).reshape(B, G, K)
        assert np.all(err[:, 0::2] <= ulp[:, 0::2]), "groups 20 σ off 0: within an ulp (Float64 path)"
        assert _scaled_error(got.reshape(B, G, K)[:, 1::2], want.reshape(B, G, K)[:, 1::2]) <= 8


@pytest.mark.parametrize("spatial", [(), (2, 2)], ids=["rows", "planes-of-4"])
def test_float32_rows_eval_with_a_cancelling_bias_takes_float64(spatial, rng):
    """Eval on inputs 100 away from the running mean, with a batch-norm bias that brings them back to 0: ȳ is
    small and centred, but a (x - μ) and β are each about 100, and their Float32 rounding would cost about 80
    ulps of the output. The guard counts |β|, so these groups take the Float64 path: within an ulp. Also for
    planes of 4 values, through the value view, whose largest |β| per group comes from the channels."""
    B, C, G = 64, 1024 // max(1, int(np.prod(spatial))), 32
    x = random_input(rng, (B, C) + spatial).astype(np.float32)
    bcast = (slice(None),) + (None,) * len(spatial)

    def cancel(layer):
        a = layer.bn_weight.astype(np.float64) / np.sqrt(layer.running_var.astype(np.float64) + layer.bn_eps)
        layer.bn_bias[...] = -100 * a
        return (layer.running_mean[bcast] + 100 + rng.normal(0, 1, (B, C) + spatial)).astype(np.float32)
    _, _, got, want = _rows_float32_error(x, G, estimate=False, rng=rng, set_eval=cancel)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got.astype(np.float64) - want) <= ulp)


def test_float32_rows_nan_reaches_the_same_outputs_as_float64(rng):
    """A NaN in one value of a [B, C] float32 input (default policy: propagate) spoils its channel's batch
    statistics, hence every group holding that channel: the Float32 lanes give the same NaNs as float64."""
    x = random_input(rng, (16, 256)).astype(np.float32)
    x[3, 70] = np.nan
    y = bcnswift.BatchChannelNorm(256, 8, estimate=False)(x)
    y64 = bcnswift.BatchChannelNorm(256, 8, estimate=False, dtype=np.float64)(x.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y64))
    assert np.isnan(y[:, 64:96]).all() and not np.isnan(np.delete(y, np.s_[64:96], axis=1)).any()


def test_batch_moments_sum_again_where_the_first_samples_mislead(rng):
    """Batch moments are sums shifted by the mean of the first eight samples, kept when that shift lies within a
    standard deviation of the mean; else summed again around the mean found. Here the first eight samples of
    channels 0-7 and 16 sit 1e6 away (their shift 180 σ off the mean): with the second pass removed the variance
    came out 2e-9 off; with it, within 1e-13, in a strip of sixteen channels (lane by lane: channels 8-15 keep
    their first pass) and in the scalar tail (C = 17)."""
    B, C = 2 ** 18, 17
    x = rng.normal(0.5, 1.0, (B, C))
    x[:8, list(range(8)) + [16]] += 1e6
    layer = bcnswift.BatchNorm(C, momentum=1.0, unbiased_running_var=False, dtype=np.float64)
    layer(x)
    wide = x.astype(np.longdouble)
    np.testing.assert_allclose(layer.running_var, wide.var(axis=0).astype(np.float64), rtol=1e-13)
    np.testing.assert_allclose(layer.running_mean, wide.mean(axis=0).astype(np.float64), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spatial", [196, 1024, 4900], ids=lambda s: f"S={s}")
def test_plane_moments_sum_again_where_the_first_values_mislead(spatial, dtype, rng):
    """A plane's moments are sums shifted by the mean of its first values (eight in float32, four in float64; a
    plane of more than 4096 values chunk by chunk), kept when that shift lies within a standard deviation of the
    mean, else summed again around the mean found (`ShiftRule`); a group's planes merge the same way. Here each
    plane's first eight values sit far out (3e3 in float32, 1e6 in float64, against a spread of 1), their mean
    5 to 23 spreads off the chunk's. Measured: the running variance within 1.5 eps of the exact one, outputs
    within 2 ulps of their scale; with the one pass kept regardless, 14 to 90 eps (float32) and 50 to 900 eps
    (float64), outputs 7 to 560 ulps."""
    B, C = 2, 8
    x = rng.normal(0.5, 1.0, (B, C, spatial))
    x[:, :, :8] += 3e3 if dtype == np.float32 else 1e6
    x = x.astype(dtype)
    exact = x.astype(np.longdouble)
    mean, var = exact.mean(axis=(0, 2)), exact.var(axis=(0, 2))
    eps = np.finfo(dtype).eps
    bn = bcnswift.BatchNorm(C, momentum=1.0, unbiased_running_var=False, dtype=dtype)
    y = bn(x)
    assert np.max(np.abs(bn.running_var - var) / var) <= 4 * eps
    truth = ((exact - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)).astype(np.float64)
    assert _ulps_of_scale(y, truth, eps) <= 4
    groups = exact.reshape(B, 2, -1)
    truth = ((groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5))
    assert _ulps_of_scale(bcnswift.ChannelNorm(C, 2, dtype=dtype)(x), truth.reshape(x.shape), eps) <= 4


@pytest.mark.parametrize("mean,std", [(100.0, 0.01), (1e4, 1.0), (-3e3, 0.1)])
@pytest.mark.parametrize("spatial", [(7, 7), (4, 4), (4, 6), (4, 8)], ids=lambda s: f"S={s[0] * s[1]}")
def test_large_mean_small_spread_gradients_keep_float64_precision(spatial, mean, std, rng):
    """Float32 planes whose mean sits 1e4 to 3e4 spreads from 0, forward and backward, against the documents'
    float64 code: the Float32 maps and gradient sums work about the centre rounded to Float and put the residue
    back in Float64 (`CentreResidue`), in planes of 49 values and in planes of 16, 24 and 32, eight at a time
    (`_planeOctets`). Measured: within 1.5 ulps of each quantity's scale; without the residue, 900 to 16,000."""
    B, C, G = 8, 64, 16
    x = (mean + std * rng.normal(size=(B, C) + spatial)).astype(np.float32)
    _check_float32_step(x, G, "nchw", rng, ulps=3)


def _check_float32_step(x, G, layout, rng, ulps):
    """A training step of float32 x ([B, C, *]; in `layout`, "nchw" or "channels-last") with dy drawn from `rng`,
    against the documents' float64 code on the same values (parameters drawn too): y, dx and every parameter
    gradient finite and within `ulps` of their scale."""
    dy = rng.normal(0.3, 1.0, x.shape).astype(np.float32)
    if layout == "channels-last":
        x, dy = _channels_last(x), _channels_last(dy)
    layer, ref = _labml_pair(x.shape[1], G, estimate=False, rng=rng)
    y, y_ref = layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert _ulps_of_scale(y, y_ref) <= ulps and _ulps_of_scale(dx, dx_ref) <= ulps
    for name, path in _LABML_PARAMETERS.items():
        assert _ulps_of_scale(layer.grads[name], ref.grads[path]) <= ulps, name


def _rows_float32_gradients(x, dy, G, estimate, rng=None, evaluate=False):
    """bcnswift's float32 gradients on [B, C] x and dy (a training step; with `evaluate`, a training step, then
    eval's) and the documents' float64 gradients of the same values, for BatchChannelNorm with G groups
    (parameters drawn at random with `rng`, else the initial ones): (dx, dx_ref, {key: (bcnswift's,
    reference's)}) with bcnswift's gradient keys."""
    layer, ref = _labml_pair(x.shape[1], G, estimate, rng)
    if evaluate:
        layer(x); ref.forward(x.astype(np.float64))
        _to_eval(layer, ref)
    layer.zero_grad()
    layer(x); ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    grads = {name: (layer.grads[name], ref.grads[path]) for name, path in _LABML_PARAMETERS.items()}
    return dx, dx_ref, grads


@pytest.mark.parametrize("layout", ["rows", "planes", "channels-last", "values"])
@pytest.mark.parametrize("scale", [1e-150, 1e-104, 1e104, 1e110, 1e150], ids=lambda s: f"{s:.0e}")
@pytest.mark.parametrize("eps", [1e-5, 1e-300])
def test_a_float64_channel_norm_keeps_dx_at_spreads_far_from_1(layout, scale, eps, rng):
    """A review: the channel norm's backward formed r³ w and multiplied it by W and by U (eps + v'), each of the
    spread's scale or its cube: past spreads of about 1e±103 r³ under- or overflowed, and dx came out 30-50% off
    (from 1e104: 1e3 ulps), or NaN with eps 1e-300 below 1e-104. Each r now meets a factor of the spread's scale
    first ((r² w)(r W), r w (r U)(r (eps + v'))): within 4 ulps of dx's scale from 1e-150 to 1e150."""
    B, C, G = 4, 8, 2
    S = {"rows": 3, "planes": 20, "channels-last": 5, "values": 1}[layout]
    x = (rng.standard_normal((B, C, S)) + 0.3) * scale
    dy = rng.standard_normal((B, C, S)) + 0.2
    cn = bcnswift.ChannelNorm(C, G, eps=eps, dtype=np.float64)
    if layout == "channels-last":
        cn(np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 2, 1))
        dx = cn.backward(np.ascontiguousarray(np.moveaxis(dy, 1, -1)).transpose(0, 2, 1))
    else:
        shape = (B, C) if S == 1 else (B, C, S)
        cn(x.reshape(shape))
        dx = cn.backward(dy.reshape(shape))
    L = np.longdouble
    z = x.astype(L).reshape(B, G, -1)
    centred = z - z.mean(-1, keepdims=True)
    inv = 1 / np.sqrt((centred * centred).mean(-1, keepdims=True) + L(eps))
    zh, g = centred * inv, dy.astype(L).reshape(B, G, -1)
    want = (inv * (g - g.mean(-1, keepdims=True) - zh * (g * zh).mean(-1, keepdims=True))).reshape(B, C, S)
    assert np.isfinite(dx).all()
    assert _ulps_of_scale(np.asarray(dx).reshape(B, C, S), want, np.finfo(np.float64).eps) <= 4


def _ulps_of_scale(got, want, eps=np.finfo(np.float32).eps):
    """The largest error in ulps (float32's, or those of `eps`) of the array's scale (its largest magnitude)."""
    want = np.asarray(want, np.longdouble)
    return float(np.max(np.abs(np.asarray(got, np.longdouble).reshape(want.shape) - want)) / (np.abs(want).max() * eps))


@pytest.mark.parametrize("K", [8, 16, 24, 64, 72, 128, 512], ids=lambda k: f"K={k}")
@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("evaluate", [False, True], ids=["training", "eval"])
def test_float32_rows_backward_in_float32_lanes_stays_within_8_ulps(K, estimate, evaluate, rng):
    """The backward of [B, C] float32 with groups of whole 8-lane vectors runs its channel-norm stage in Float32
    lanes (sums flushed to Float64 every 64 values, the batch-norm stage's channel sums every 8 samples), with
    random parameters and gradients. dx and every parameter gradient stay within 8 ulps of their scale against
    the documents' float64 code (at most 4 measured), through batch statistics and through estimates."""
    G = max(2, 1024 // K)
    x = random_input(rng, (64, G * K)).astype(np.float32)
    dy = (rng.normal(0.3, 1.0, x.shape)).astype(np.float32)
    dx, dx_ref, grads = _rows_float32_gradients(x, dy, G, estimate, rng, evaluate)
    assert _ulps_of_scale(dx, dx_ref) <= 8
    for name, (got, want) in grads.items():
        assert _ulps_of_scale(got, want) <= 8, name


@pytest.mark.parametrize("K", [32, 8], ids=lambda k: f"K={k}")
def test_float32_rows_backward_takes_float64_where_float32_would_round_visibly(K, rng):
    """The backward's Float32 lanes round e = ȳ - m relative to max(|m|, |β|), which r magnifies: groups with
    r max(|m|, |β|) > 4 take the Float64 path. As in the forward's test (and with its initial parameters, which
    keep the groups' spread that of the input), even groups sit 20 σ off 0 (sign alternating by sample; with
    K = 8 the item's mask fills 64 bits): their dx stays within an ulp of its scale, group by group; the rest
    within 8."""
    B, C = 64, 1024
    G = C // K
    offset = np.where(np.arange(G) % 2 == 0, 20.0, 0.0)[None, :] * np.where(np.arange(B) % 2 == 0, 1, -1)[:, None]
    x = (rng.normal(0.5, 1.0, (B, G, K)) + offset[..., None]).reshape(B, C).astype(np.float32)
    dy = rng.normal(0.3, 1.0, (B, C)).astype(np.float32)
    dx, dx_ref, _ = _rows_float32_gradients(x, dy, G, False)
    dx, dx_ref = dx.reshape(B, G, K), dx_ref.reshape(B, G, K)
    far = max(_ulps_of_scale(dx[:, g], dx_ref[:, g]) for g in range(0, G, 2))
    near = max(_ulps_of_scale(dx[:, g], dx_ref[:, g]) for g in range(1, G, 2))
    assert far <= 1 and near <= 8, (far, near)


@pytest.mark.parametrize("K", [64, 256], ids=lambda k: f"K={k}")
@pytest.mark.parametrize("estimate", [False, True])
def test_float32_rows_groups_whose_first_values_mislead_take_float64(K, estimate, rng):
    """A [B, C] group's Float32 sums are shifted by the mean of its first eight values; where that shift lies
    further than a standard deviation from the group's mean the group takes the Float64 path (`RowRounding`).
    Sample 0 sits 1e3 out in the first eight channels of every group (about 16 after the batch norm, 3 to 5
    spreads off its group's mean): its outputs stay within an ulp of their scale against the documents' float64 code
    (measured 0.4; with the Float32 lanes kept regardless, 3.7 to 9.7)."""
    B, C = 256, 1024
    x = rng.normal(0.5, 1.0, (B, C))
    x[0, (np.arange(C) % K) < 8] += 1e3
    x = x.astype(np.float32)
    layer, ref = _labml_pair(C, C // K, estimate)
    y, y_ref = layer(x), ref.forward(x.astype(np.float64))
    assert _ulps_of_scale(y[0], y_ref[0]) <= 1 and _ulps_of_scale(y, y_ref) <= 4


@pytest.mark.parametrize("case", [("y", {"bn.weight": 1e-20}), ("y", {"bn.weight": 3e18}), ("dx", {"weight": 1e12}),
                                  ("dx", {"bn.weight": 1e12, "weight": 1e3}), ("dx", {"x": 1e11})],
                         ids=["bn.weight=1e-20", "bn.weight=3e18", "weight=1e12", "bn.weight=1e12,weight=1e3",
                              "x*1e11"])
def test_float32_rows_groups_outside_float32s_comfortable_range_take_float64(case, rng):
    """[B, C] groups whose Float32 sums or gradient constants would leave Float32's comfortable range take the
    Float64 path (`RowRounding`): a batch-norm weight of 1e-20 or 3e18 puts the group's mean square near 1e-40
    or 1e37; a channel-norm weight of 1e12, a batch-norm weight of 1e12 (with 1e3 after it), or inputs spread
    over 1e11 put the backward's r |w| above 1e10, its r below 1e-10, or the mean square of x - μ above 1e20.
    Measured against the documents' float64 code: outputs within 0.3 ulp of their scale where the forward takes
    Float64, dx within 0.75 where the backward does; with each of those bounds removed, outputs 1.16 to 1.27 and
    dx 1.26 to 1.58."""
    B, C, G = 64, 512, 16
    checked, scales = case
    x = (rng.normal(0.5, 1.0, (B, C)) * scales.get("x", 1.0)).astype(np.float32)
    dy = rng.normal(0.3, 1.0, (B, C)).astype(np.float32)
    layer, ref = _labml_pair(C, G, estimate=False)
    for name, value in scales.items():
        if name != "x":
            layer.parameters()[name][...] = value
    _copy_parameters(layer, ref)
    y, y_ref = layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    if checked == "y":
        assert _ulps_of_scale(y, y_ref) <= 0.6
    else:
        assert _ulps_of_scale(dx, dx_ref) <= 0.9


@pytest.mark.parametrize("spatial", [(4, 4), (4, 6), (4, 8), (14, 14)], ids=lambda s: f"S={s[0] * s[1]}")
def test_float32_backward_maps_about_a_dy_centre_near_the_largest_float_take_float64(spatial, rng):
    """Output gradients about 1e38 with one value per plane at -3e38: dy - its plane mean for that value is
    -4e38, beyond Float's range, though dx (a channel-norm weight of 0.1 after it) is about 5e37. The backward's
    maps keep their centre of dy below 2^101 for the Float32 lanes (`MapRange`), so these planes map in Float64:
    dx finite and within 4 ulps of its scale against the documents' float64 code, in planes of 196 values and in
    planes of 16, 24 and 32 (eight at a time), where the bound at 2^127 gave infinities. (The parameters'
    gradients, sums of such values, exceed Float's range here, in both.)"""
    B, C, G = 8, 64, 32
    x = rng.normal(0.5, 1.0, (B, C) + spatial).astype(np.float32)
    dy = 1e38 * (1 + 0.1 * rng.normal(size=x.shape))
    dy.reshape(B, C, -1)[:, :, 0] = -3e38
    dy = dy.astype(np.float32)
    layer, ref = _labml_pair(C, G, estimate=False)
    layer.weight[...] = 0.1
    _copy_parameters(layer, ref)
    layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    assert np.isfinite(dx).all() and _ulps_of_scale(dx, dx_ref) <= 4


@pytest.mark.parametrize("x_scale,dy_scale", [(1e-3, 1e-38), (1e-32, 1e-11)], ids=["tiny-dy", "tiny-spread"])
def test_float32_rows_backward_near_float32_underflow_takes_float64(x_scale, dy_scale, rng):
    """The batch-norm stage's (x - μ) dy₁ would be subnormal in the Float32 lanes: with gradients at the bottom of
    Float32's range (dy about 1e-38, some subnormal; x - μ about 1e-3), or with inputs whose spread (1e-32) sits
    far below the batch norm's sqrt(eps) (dy about 1e-11, inside its own range). Groups whose dy or x - μ has a
    mean square below 1e-20 take the Float64 path: dx within an ulp of its scale, the parameters' gradients
    within 2. Without those bounds: dx 4 ulps and the batch-norm weight's gradient over 100 (tiny dy); 49 ulps on
    that gradient and 16 on the groups' (tiny spread)."""
    B, C, G = 64, 256, 8
    x = (random_input(rng, (B, C)) * x_scale).astype(np.float32)
    dy = (rng.normal(0.3, 1.0, (B, C)) * dy_scale).astype(np.float32)
    dx, dx_ref, grads = _rows_float32_gradients(x, dy, G, False)
    assert _ulps_of_scale(dx, dx_ref) <= 1
    for name, (got, want) in grads.items():
        assert _ulps_of_scale(got, want) <= 2, name


@pytest.mark.parametrize("where,bad,evaluate", [("dy", np.nan, False), ("dy", np.nan, True), ("dy", np.inf, False),
                                                ("dy", np.inf, True), ("x", np.nan, False), ("x", np.inf, True)],
                         ids=["nan-dy", "nan-dy-eval", "inf-dy", "inf-dy-eval", "nan-x", "inf-x-eval"])
def test_float32_rows_backward_non_finite_values_reach_the_same_outputs_as_float64(where, bad, evaluate, rng):
    """A NaN or an infinity in one value of a [B, C] float32 backward (in dy, or in x, whose forward spoils its
    group's m and r) reaches exactly the outputs that float64 makes non-finite: in training through the batch
    statistics every sample of the group's channels, in eval (fixed statistics) the one sample's group."""
    B, C, G = 16, 256, 8
    x = random_input(rng, (B, C)).astype(np.float32)
    dy = rng.normal(0.3, 1.0, (B, C)).astype(np.float32)
    (dy if where == "dy" else x)[3, 70] = bad
    results = []
    for dtype in (np.float32, np.float64):
        layer = bcnswift.BatchChannelNorm(C, G, estimate=False, dtype=dtype)
        if evaluate:
            layer(random_input(np.random.default_rng(1), (B, C)).astype(dtype))
            layer.eval()
        layer(x.astype(dtype))
        dx = layer.backward(dy.astype(dtype))
        results.append([~np.isfinite(dx)] + [~np.isfinite(np.asarray(v)) for v in layer.grads.values()])
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)
    assert results[0][0][3].any() and not results[0][0][(3 + 1) % B, :64].any()


@pytest.mark.parametrize("spatial", [(14, 14), (4, 4), (5, 5)], ids=["S=196", "S=16", "S=25"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("largest", [1e25, 1e30, 3.3e38], ids=["1e25", "1e30", "near-max"])
def test_float32_planes_at_extreme_magnitudes_keep_the_float64_precision(spatial, layout, largest, rng):
    """Float32 activations whose largest magnitude is `largest`, in every layout with Float32 maps (planes one at
    a time, four at a time, channels-last rows). A batch spread over 1e19 or more makes the backward's slope q of
    x - p about 1/σ², below Float32's normal range, and near the largest float x - p itself overflows Float32
    where the plane's mean has the other sign. The maps take Float64 for such constants (`MapRange`): output,
    dx and every parameter gradient within 4 ulps of their scale against the documents' float64 code (at most
    2.1 measured). Before, q rounded to 0 dropped its term (12% of max |dx| at 1e30), and near the largest
    float an output and its dx were infinite."""
    B, C, G = 8, 64, 32
    x = random_input(rng, (B, C) + spatial)
    x = (x * (largest / np.abs(x).max())).astype(np.float32)
    _check_float32_step(x, G, layout, rng, ulps=4)


@pytest.mark.parametrize("spatial", [(14, 14), (4, 4), (5, 5)], ids=["S=196", "S=16", "S=25"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_float32_maps_about_a_centre_near_the_largest_float_take_float64(spatial, layout, rng):
    """Activations about 1e38 with one value per channel at -3e38: the channel's mean is within Float's range,
    but x - mean for that value is not (-4e38). The maps' constants must stay below 2^101 for the Float32 lanes
    (`MapRange`), so these planes map in Float64: outputs finite and within 4 ulps of their scale against the
    documents' float64 code, as dx and the parameters' gradients. With the bound at 2^127, the planes' outputs
    (one at a time, and eight at a time) held infinities."""
    B, C, G = 8, 64, 32
    x = 1e38 * (1 + 0.1 * rng.normal(size=(B, C) + spatial))
    x.reshape(B, C, -1)[1, :, 0] = -3e38
    x = x.astype(np.float32)
    _check_float32_step(x, G, layout, rng, ulps=4)


def _one_sample_beyond_the_float32_maps(rng, shape):
    """float32 x of `shape` ([B, C, *], B >= 2) about 1, but sample 1 about -1e38 with 3e38 in each plane, where
    x - p overflows Float32 (its maps take Float64: `MapRange`); and dy about 0.3."""
    x = random_input(rng, shape)
    x[1] = -1e38 * (1 + 0.1 * rng.normal(size=x[1].shape))
    x[1].reshape(shape[1], -1)[:, 0] = 3e38
    return x.astype(np.float32), rng.normal(0.3, 1.0, shape).astype(np.float32)


@pytest.mark.parametrize("spatial", [(14, 14), (70, 70)], ids=["S=196", "chunked"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_one_sample_beyond_the_float32_maps_leaves_the_others_in_them(spatial, layout, rng):
    """Sample 1 of four lies about -1e38 with one value of 3e38 in each plane, so that x - p overflows Float32
    there (its maps run in Float64: `MapRange`), and the others about 1: each sample's output and dx finite and
    within 4 ulps of that sample's own scale against the documents' float64 code. Channels-last decides per
    sample whether its constants in Float32 keep their precision (and prepares them where its sweep first needs
    them), as the planes layout decides per plane; a sample mapped in Float32 all the same gives infinities."""
    B, C, G = 4, 64, 32
    x, dy = _one_sample_beyond_the_float32_maps(rng, (B, C) + spatial)
    if layout == "channels-last":
        x, dy = _channels_last(x), _channels_last(dy)
    layer, ref = _labml_pair(C, G, estimate=False, rng=rng)
    y, y_ref = layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    for b in range(B):
        assert np.isfinite(y[b]).all() and np.isfinite(dx[b]).all(), b
        assert _ulps_of_scale(y[b], y_ref[b]) <= 4, b
        assert _ulps_of_scale(dx[b], dx_ref[b]) <= 4, b


@pytest.mark.parametrize("spatial", [(14, 14), (70, 70)], ids=["S=196", "chunked"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_one_sample_in_float64_maps_leaves_the_others_their_own_bits(spatial, layout, rng):
    """A channel norm alone couples no samples, so each sample's output and dx in a batch are its bits run
    alone, even where sample 1 (about -1e38, with 3e38 in each plane) needs Float64 maps: the decision is per
    sample on channels-last (per plane on planes). When channels-last decided per call, every sample of such a
    batch went to Float64, and the others' bits differed from their own."""
    B, C, G = 4, 64, 32
    x, dy = _one_sample_beyond_the_float32_maps(rng, (B, C) + spatial)
    place = _channels_last if layout == "channels-last" else np.ascontiguousarray

    def run(xs, dys):
        layer = bcnswift.ChannelNorm(C, G, dtype=np.float32)
        return layer(place(xs)), layer.backward(place(dys))
    y, dx = run(x, dy)
    for b in (0, 2, 3):
        y_alone, dx_alone = run(x[b:b + 1], dy[b:b + 1])
        assert np.array_equal(y[b], y_alone[0]) and np.array_equal(dx[b], dx_alone[0]), b


@pytest.mark.parametrize("spatial", [(14, 14), (4, 4), (5, 5), (70, 70)], ids=["S=196", "S=16", "S=25", "chunked"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("offset", [0.0, 10.0, 1e3, 1e5], ids=["0", "10", "1e3", "1e5"])
def test_float32_gradients_far_off_zero_keep_the_float64_precision(spatial, layout, offset, rng):
    """An output gradient `offset` times its spread off 0 (a following layer that adds its inputs up): the
    normalization cancels dy's mean, so dx and the parameters' gradients are of the size of dy's spread. The
    Float32 lanes sum dy and dy (x - p) about a shift near dy's mean and map dx about dy's mean per plane
    (`_gradientSums`' dyShift, `_combine`'s dyMean), so that their rounding is of the spread's size too: within
    4 ulps of their scale against the documents' float64 code (at most 2.5 measured), as with no offset. Before,
    summed and mapped about 0, they lost about offset/2 ulps of dx and up to 5 times offset of the batch norm's
    bias gradient (Σ dy rounded to dy's size). Planes of 4900 values span two chunks, whose sums share their
    plane's shift; with 2 samples their bias gradients sum few planes that mostly cancel, up to 4.4 ulps of
    their scale with or without an offset, before as now: within 8 there."""
    chunked = spatial == (70, 70)
    B, C, G = (8, 64, 32) if not chunked else (2, 16, 4)
    x = random_input(rng, (B, C) + spatial).astype(np.float32)
    dy = (rng.normal(0.3, 1.0, x.shape) + offset).astype(np.float32)
    _assert_backward_within(x, dy, layout, C, G, 8 if chunked else 4)


def _assert_backward_within(x, dy, layout, C, G, tolerance):
    """dx and every parameter gradient of bcnswift's float32 BatchChannelNorm (random parameters, batch
    statistics) within `tolerance` ulps of their scale against the documents' float64 code, in `layout`."""
    if layout == "channels-last":
        x, dy = _channels_last(x), _channels_last(dy)
    layer, ref = _labml_pair(C, G, estimate=False, rng=np.random.default_rng(7))
    layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    assert np.isfinite(dx).all()
    assert _ulps_of_scale(dx, dx_ref) <= tolerance
    for name, path in _LABML_PARAMETERS.items():
        assert _ulps_of_scale(layer.grads[name], ref.grads[path]) <= tolerance, name


@pytest.mark.parametrize("spatial", [(3, 3), (4, 4), (7, 7), (14, 14)], ids=lambda s: f"S={s[0] * s[1]}")
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("mode", ["eval", "estimate"])
def test_float32_an_outlier_among_values_near_the_running_mean_keeps_the_weight_gradient(spatial, layout, mode, rng):
    """A review: with running statistics (eval, or estimate mode's estimates) the weight gradient is
    S₂ = Σ dy (x - p) + (p - μ) Σ dy per plane, and one value of 5e4 with a small dy among values of spread 5
    drags p far from μ, so that the Float32 lanes' rounding of Σ dy (x - p), about |p - μ| times Σ |dy|, outgrows
    S₂, of σ times Σ |dy|: 25-270 ulps of its scale off (planes and channels-last; the rows layout of 3x3 NCHW
    sums in Float64). Such planes, wider than 4σ of their channel, are summed again in Float64 (`resumInFloat64`):
    y, dx and both gradients within 4 ulps of their scale against the documents' float64 code."""
    B, C = 4, 8
    x = rng.normal(1.0, 5.0, (B, C) + spatial).astype(np.float32)
    dy = rng.normal(0.3, 1.0, x.shape).astype(np.float32)
    x.reshape(B, C, -1)[0, 0, 0], dy.reshape(B, C, -1)[0, 0, 0] = 5e4, 1e-3
    mean, var = rng.normal(1.0, 0.1, C).astype(np.float32), rng.uniform(20.0, 30.0, C).astype(np.float32)
    layer, ref, names = _running_pair("bn", C, 0, mean, var, estimate=mode == "estimate")
    _draw_parameters(layer, ref, names, rng)
    _assert_within(layer, ref, names, x, dy, layout)


def _running_pair(layer_type, C, G, mean, var, estimate=False):
    """bcnswift's float32 "bn" or "bcn" layer and the documents' float64 one (labml's conventions), both on the
    running statistics `mean` and `var` (float32 values), in eval; with `estimate` ("bn" only) in training as an
    EstimatedBatchNorm at a moving speed of 0, as the authors' EstBN starts, so that the estimates stay those:
    (layer, reference, {bcnswift's parameter name: the reference's})."""
    if layer_type == "bn" and estimate:
        layer, ref = bcnswift.EstimatedBatchNorm(C, momentum=0.0), R.LabmlEstimatedBatchNorm(C, momentum=0.0)
    elif layer_type == "bn":
        layer, ref = bcnswift.BatchNorm(C, unbiased_running_var=False), R.LabmlBatchNorm(C)
    else:
        layer, ref = bcnswift.BatchChannelNorm(C, G, unbiased_running_var=False), R.LabmlBatchChannelNorm(C, G)
    prefix, bn, names = (("", ref, {"weight": "scale", "bias": "shift"}) if layer_type == "bn"
                         else ("bn.", ref.batch_norm, _LABML_PARAMETERS))
    state = layer.state_dict()
    state[prefix + "running_mean"], state[prefix + "running_var"] = mean, var
    layer.load_state_dict(state)
    bn.exp_mean, bn.exp_var = mean.astype(np.float64), var.astype(np.float64)
    if not estimate:
        layer.eval(); ref.train(False)
    return layer, ref, names


def _float32_pair(layer_type, C, G, eps, rng):
    """bcnswift's float32 layer ("bcn", "bn" or "cn", batch statistics, labml's conventions) and the documents'
    float64 one with the same parameters, drawn with `rng`: (layer, reference, {bcnswift's name: reference's})."""
    if layer_type == "bcn":
        layer = bcnswift.BatchChannelNorm(C, G, eps=eps, estimate=False, unbiased_running_var=False)
        ref, names = R.LabmlBatchChannelNorm(C, G, eps=eps, estimate=False), _LABML_PARAMETERS
    elif layer_type == "bn":
        layer = bcnswift.BatchNorm(C, eps=eps, unbiased_running_var=False)
        ref, names = R.LabmlBatchNorm(C, eps=eps), {"weight": "scale", "bias": "shift"}
    else:
        layer = bcnswift.ChannelNorm(C, G, eps=eps)
        ref, names = R.LabmlChannelNorm(C, G, eps=eps), {"weight": "scale", "bias": "shift"}
    _draw_parameters(layer, ref, names, rng)
    return layer, ref, names


def _assert_step_within(layer_type, x, dy, G, eps, layout, rng, ulps=4):
    """`_assert_within` for a training step of a `_float32_pair`."""
    _assert_within(*_float32_pair(layer_type, x.shape[1], G, eps, rng), x, dy, layout, ulps)


def _assert_within(layer, ref, names, x, dy, layout, ulps=4):
    """A step of bcnswift's float32 `layer` on x and dy (float32, [B, C, *]; in `layout`) against the documents'
    float64 `ref` on the same values: y, dx and every parameter gradient (`names`) within `ulps` of their scale."""
    if layout == "channels-last":
        x, dy = _channels_last(x), _channels_last(dy)
    y, y_ref = layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    assert _ulps_of_scale(y, y_ref) <= ulps and _ulps_of_scale(dx, dx_ref) <= ulps
    for name, path in names.items():
        got, want = layer.grads[name], ref.grads[path]
        if not np.any(want):  # (Σ dy = 0 in every group: the channel norm's bias gradient is 0 exactly)
            assert not np.any(got), name
        else:
            assert _ulps_of_scale(got, want) <= ulps, name


@pytest.mark.parametrize("spatial", [(3, 3), (4, 4), (7, 7), (14, 14), (70, 70)],
                         ids=lambda s: "chunked" if s == (70, 70) else f"S={s[0] * s[1]}")
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("layer_type", ["bcn", "bn", "cn"])
@pytest.mark.parametrize("dy_kind", ["centred", "off-zero", "zero-sum"])
def test_float32_gradient_sums_whose_products_underflow_keep_the_float64_precision(spatial, layout, layer_type,
                                                                                   dy_kind, rng):
    """A review: x of spread 1e-15 and dy about 1e-28, with an eps of 1e-32 below the batch's variance, make
    products dy (x - p) of about 1e-43, below Float's normal range, where they keep only a few bits: the Float32
    lanes' Σ dy (x - p) left the weight gradients 2e4-2e5 ulps of their scale off and dx 4e3-1e4 (planes and
    channels-last; the rows layout of 3x3 NCHW sums in Float64). Planes whose sum lies below 2^-96 are summed again
    in Float64 (`resumInFloat64`), about the plane's true mean where the lanes' sums are: with dy 1e4 spreads off
    0 ("off-zero"), sums about 0 left 1e3-1e4 ulps. dy of ±1e-31 in pairs ("zero-sum": Σ dy = 0 in every plane)
    flushes every product to 0, and U = 0 with T = 0 is not taken for dy all zeros where x's deviation lies
    below 2^-20 (a second review: 8e6 ulps, every weight gradient 0). Everything within 4 ulps of its scale
    against the documents' float64 code."""
    B, C, G = (4, 8, 2) if spatial != (70, 70) else (2, 4, 2)
    x = (rng.normal(1.0, 1.0, (B, C) + spatial) * 1e-15).astype(np.float32)
    if dy_kind == "zero-sum":
        S = x[0, 0].size
        signs = np.where(np.arange(S) % 2 == 0, 1.0, -1.0)
        signs[2 * (S // 2):] = 0.0  # pairs, and a zero where S is odd
        dy = np.broadcast_to(signs.reshape(x.shape[2:]), x.shape) * rng.uniform(0.5, 2.0, (B, C) + (1,) * (x.ndim - 2))
        dy = (dy * 1e-31).astype(np.float32)
    else:
        dy = ((rng.normal(0.3, 1.0, x.shape) + (1e4 if dy_kind == "off-zero" else 0.0)) * 1e-28).astype(np.float32)
    _assert_step_within(layer_type, x, dy, G, 1e-32, layout, rng)


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("layer_type", ["bcn", "bn"])
@pytest.mark.parametrize("dy_offset", [0.0, 1e3, 1e5], ids=["dy-centred", "dy-1e3", "dy-1e5"])
def test_float32_wide_planes_with_batch_statistics_keep_the_float64_precision(layout, layer_type, dy_offset, rng):
    """Planes wider than 4σ occur with batch statistics too, in batches of more than 16 samples (a plane's variance
    is at most B σ²): here one sample of 32, eight times wider than the rest. Summed again in Float64, their U must
    be about what the lanes' U is about, the plane's true mean, Σ (dy - T/S)(x - p): summed about 0, U carried the
    rounding of p times Σ dy, and with dy 1e3 to 1e5 off zero (the setting of the test of gradients far off zero)
    the weight gradient came out 1.3e3-1.3e5 ulps of its scale off and dx 98-1.1e4 (a review found it). Within 4
    ulps of their scale against the documents' float64 code."""
    B, C, G = 32, 8, 4
    x = rng.normal(2.0, 1.0, (B, C, 14, 14))
    x[3] = 2.0 + 8.0 * rng.normal(size=(C, 14, 14))  # its planes' variance about 64 σ² of the rest's
    dy = rng.normal(0.3, 1.0, x.shape) + dy_offset
    _assert_step_within(layer_type, x.astype(np.float32), dy.astype(np.float32), G, 1e-5, layout, rng)


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_float32_an_outlier_in_any_plane_is_found(layout, rng):
    """The screen takes four channels a step and hands blocks of sixteen to the sums again (channels-last: a row
    of the block at a time), and the channels beyond the last whole four apart: an outlier in each of the 70
    planes of [2, 35, 5, 5] in turn (two blocks, a block of three fours, a tail of three) is found wherever it
    lies, its channel's weight gradient within 2 ulps of the gradient's scale (0.65 measured; 170-390 without)."""
    B, C = 2, 35
    base = rng.normal(1.0, 5.0, (B, C, 5, 5)).astype(np.float32)
    dy = rng.normal(0.3, 1.0, base.shape).astype(np.float32)
    mean, var = rng.normal(1.0, 0.1, C).astype(np.float32), rng.uniform(20.0, 30.0, C).astype(np.float32)
    for b in range(B):
        for c in range(C):
            x, d = base.copy(), dy.copy()
            x[b, c, 0, 0], d[b, c, 0, 0] = 5e4, 1e-3
            layer, ref, _ = _running_pair("bn", C, 0, mean, var)
            if layout == "channels-last":
                x, d = _channels_last(x), _channels_last(d)
            layer(x), ref.forward(np.asarray(x, np.float64))
            layer.backward(d), ref.backward(np.asarray(d, np.float64))
            got, want = layer.grads["weight"], ref.grads["scale"]
            assert abs(got[c] - want[c]) <= 2 * np.finfo(np.float32).eps * np.abs(want).max(), (b, c)


@pytest.mark.parametrize("C", [32, 40])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("layer_type", ["bcn", "bn"])
def test_float32_running_statistics_far_narrower_than_the_data_sum_every_plane_again(C, layout, layer_type, rng):
    """Running variances 50-200 times narrower than the data (stale, or gathered on other data), with one outlier
    and dy 50 off zero: every plane is wide, and every plane's sums are taken again in Float64 lanes, in
    channels-last sixteen channels a row at a time (40: two blocks and a block of eight). dx and every gradient
    within 4 ulps of their scale against the documents' float64 code (0.76 measured)."""
    B, G, S = 4, 4, (7, 7)
    x = rng.normal(1.0, 10.0, (B, C) + S).astype(np.float32)
    x.reshape(B, C, -1)[1, 3, 0] = 5e4
    dy = (rng.normal(0.3, 1.0, x.shape) + 50.0).astype(np.float32)
    mean, var = rng.normal(1.0, 0.1, C).astype(np.float32), rng.uniform(0.5, 2.0, C).astype(np.float32)
    _assert_within(*_running_pair(layer_type, C, G, mean, var), x, dy, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("layer_type", ["bcn", "bn"])
def test_float32_constant_gradients_are_not_summed_again(layout, layer_type, rng):
    """dy constant in each plane (dy = 1, an average pool's backward) makes every dy - s of the lanes 0, and U = 0
    exactly, as it should be. That is not an underflow: summed again in Float64 about the stored means, U took on
    their rounding, and dx and the batch norm's weight gradient, exactly 0 here, came out 4e-8 and 2e-5 (a review
    found it; the lanes give 5e-16 and 2e-13). dx within 1e-12 and the weight gradient within 1e-9."""
    B, C, G = 8, 8, 4
    x = random_input(rng, (B, C, 7, 7)).astype(np.float32)
    layer, _, _ = _float32_pair(layer_type, C, G, 1e-5, rng)
    if layout == "channels-last":
        x = _channels_last(x)
    layer(x)
    dx = layer.backward(np.ones_like(x))
    weight = layer.grads["bn.weight" if layer_type == "bcn" else "weight"]
    assert np.abs(dx).max() <= 1e-12 and np.abs(weight).max() <= 1e-9


@pytest.mark.parametrize("spatial", [(3, 3), (4, 4), (7, 7), (14, 14), (70, 70)],
                         ids=lambda s: "chunked" if s == (70, 70) else f"S={s[0] * s[1]}")
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_float32_moments_whose_squares_underflow_keep_the_float64_precision(spatial, layout, rng):
    """A review: a channel norm alone over values about 1e-20 apart (eps 1e-44) squares their deviations below
    Float's normal range. Channels-last columns summed again in Float64 where squares overflowed, not where they
    underflowed: y and dx up to 8.5 ulps of their scale off here, 28 in the review's case (0.4 in C order). A
    column whose mean square lies below 2^-100 is summed again too (`ChannelsLastLayout.underflowingSquares`):
    within 2 ulps in both layouts (0.9 measured)."""
    B, C, G = (4, 8, 2) if spatial != (70, 70) else (2, 4, 2)
    x = (rng.normal(1.0, 1.0, (B, C) + spatial) * 1e-20).astype(np.float32)
    dy = rng.normal(0.3, 1.0, x.shape).astype(np.float32)
    layer, ref = bcnswift.ChannelNorm(C, G, eps=1e-44), R.LabmlChannelNorm(C, G, eps=1e-44)
    if layout == "channels-last":
        x, dy = _channels_last(x), _channels_last(dy)
    y, y_ref = layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    assert _ulps_of_scale(y, y_ref) <= 2 and _ulps_of_scale(dx, dx_ref) <= 2


@pytest.mark.parametrize("spatial", [(28, 28), (14, 14), (4, 4), (70, 70)], ids=["S=784", "S=196", "S=16", "chunked"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_float32_sparse_gradients_keep_the_float64_precision(spatial, layout, rng):
    """Sparse dy (a max-pool's or ReLU's backward: 2% nonzero, and one large value at each plane's start) is not
    shifted: a shift drawn from eight values would move its zeros off 0, and the sums of dy - s drifted by it in
    each Float32 block (bias gradients 17 to 800 ulps off). `_earlyMean` shifts only where the eight values' mean
    lies further from 0 than twice their mean distance from the first: within 4 ulps of the scale, as before the
    shift."""
    B, C, G = 4, 16, 4
    shape = (B, C) + spatial
    x = rng.normal(1.0, 1.0, shape).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape) * (rng.random(shape) < 0.02)  # sparse: zeros by design
    dy[:, :, 0, 0] = rng.normal(0.0, 30.0, (B, C))
    _assert_backward_within(x, dy.astype(np.float32), layout, C, G, 4)


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("layer_type", ["bcn", "bn", "cn"])
def test_float32_gradients_near_the_largest_float_stay_finite(layout, layer_type, rng):
    """dy about 5e37 (eight of them add up beyond the largest float): the shift is their mean taken without
    overflowing (each value scaled by 1/8 first), so dx stays finite, within 4 ulps of the float64 layer's. (A
    shift summed first overflowed to infinity: every dx NaN.)"""
    x = rng.normal(1.0, 1.0, (2, 4, 5, 5)).astype(np.float32)
    dy = (rng.normal(1.0, 0.1, x.shape) * 5e37).astype(np.float32)
    if layout == "channels-last":
        x, dy = _channels_last(x), _channels_last(dy)
    make = {"bcn": lambda dt: bcnswift.BatchChannelNorm(4, 2, dtype=dt),
            "bn": lambda dt: bcnswift.BatchNorm(4, dtype=dt),
            "cn": lambda dt: bcnswift.ChannelNorm(4, 2, dtype=dt)}[layer_type]
    layer, wide = make(np.float32), make(np.float64)
    layer(x), wide(x.astype(np.float64))
    dx, dx_wide = layer.backward(dy), wide.backward(dy.astype(np.float64))
    assert np.isfinite(dx).all()
    assert _ulps_of_scale(dx, dx_wide) <= 4


@pytest.mark.parametrize("shape,G", [((64, 256), 32), ((64, 64, 2, 2), 32), ((32, 128, 3, 3), 16)],
                         ids=["rows", "2x2", "3x3"])
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5], ids=["0", "1e3", "1e5"])
def test_float32_rows_backward_far_off_zero_keeps_the_float64_precision(shape, G, offset, rng):
    """As for planes, on the row path's Float32 lanes ([B, C] in groups of 8 channels, and short planes through
    their value view): each group's ΣT and W are summed about a shift near dy's mean (`_valueGroupGradientSums`),
    so dx and the parameters' gradients stay within 4 ulps of their scale (at most 1.4 measured; before, 300 to
    1300 ulps at an offset of 1000)."""
    x = random_input(rng, shape).astype(np.float32)
    dy = (rng.normal(0.3, 1.0, shape) + offset).astype(np.float32)
    dx, dx_ref, grads = _rows_float32_gradients(x, dy, G, False, rng)
    assert _ulps_of_scale(dx, dx_ref) <= 4
    for name, (got, want) in grads.items():
        assert _ulps_of_scale(got, want) <= 4, name


@pytest.mark.parametrize("scale", [1e160, 1e170, 1e200, 1e250, 1e300])
@pytest.mark.parametrize("shape, channels_last", [((4, 4), False), ((4, 4, 2, 2), False), ((4, 4, 4, 4), False),
                                                  ((4, 4, 4, 4), True), ((4, 4, 100), False), ((1, 4, 2), False),
                                                  ((1, 4, 3, 3), False), ((1, 4, 1, 2), True)])
def test_double_input_whose_variance_overflows_gives_an_infinite_running_variance_and_the_bias(shape, channels_last,
                                                                                               scale, rng):
    """Deviations of double input from about 1e154 up square beyond the largest double: the variance's M2 is
    infinite (the mean stays finite), the running variance takes the infinity, and a batch norm alone gives every
    value its bias, as PyTorch's float64 code does; nothing raises, under either policy (a synchronized layer under
    'raise' refuses such merged moments: test_sync_layers.py). At every scale: where the squares and the squared
    sum of deviations both overflow, their difference was NaN (at 1e170 and 1e200, not at 1e160), and so were the
    running variance and every output. A review: one sample's short planes (the rows layout's planes of 2 to 15
    values, with no merge over samples to overflow) took that NaN as 0, a variance of 0."""
    x = rng.normal(1.0, 1.0, shape) * scale
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    for policy in ("propagate", "raise"):
        layer = bcnswift.BatchNorm(shape[1], dtype=np.float64, nan_policy=policy)
        layer.bias[...] = np.arange(shape[1]) + 0.25
        y = layer(x)
        expected = np.broadcast_to(layer.bias.reshape((1, -1) + (1,) * (len(shape) - 2)), shape)
        np.testing.assert_array_equal(y, expected)
        assert np.all(np.isinf(layer.running_var)) and np.all(np.isfinite(layer.running_mean)), layer.running_var


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e300])
@pytest.mark.parametrize("shape, channels_last", [((4, 8), False), ((4, 8, 2, 2), False), ((4, 8, 4, 4), False),
                                                  ((4, 8, 4, 4), True), ((4, 8, 100), False)])
def test_double_input_whose_variance_overflows_gives_bcn_the_documents_finite_values(shape, channels_last, scale,
                                                                                      rng):
    """After that infinite variance every value of a channel is its batch-norm bias β exactly (a = γ/∞ = 0), so the
    channel norm normalizes the β's, finite, forward and backward, as the authors' float64 code (nn.BatchNorm2d,
    then a batch norm over each sample's groups) computes value by value. The fused planes made each plane's M2
    after the batch norm as a² q, 0 · ∞ for an overflowed q: NaN outputs and gradients on planes and channels-last.
    (labml's code gives NaN here: its variance is E[x²] - E[x]², ∞ - ∞.)"""
    x = rng.normal(1.0, 1.0, shape) * scale
    dy = rng.normal(0.5, 1.0, shape)
    if channels_last:
        x, dy = _channels_last(x), _channels_last(dy)
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)
    ref = R.AuthorsBCNorm(8, 4, 1e-5)
    for name, array in layer.parameters().items():
        array[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.3, array.shape)
    ref.weight, ref.bias = layer.weight.copy(), layer.bias.copy()
    ref.bn.weight, ref.bn.bias = layer.bn.weight.copy(), layer.bn.bias.copy()
    y, dx = layer(x), layer.backward(dy)
    with np.errstate(over="ignore"):  # (the reference's squares overflow, as they must)
        y_ref, dx_ref = ref(x), ref.backward(dy)
    assert np.isfinite(y_ref).all() and np.isfinite(dx_ref).all()  # the documents' values: finite

    def close(got, want, tolerance):  # relative to want's scale; exactly, where want is all zeros (dx: a = 0)
        return np.array_equal(got, want) if not np.any(want) else _relative_to_scale(got, want) <= tolerance
    assert close(y, y_ref, 1e-12) and close(dx, dx_ref, 1e-12)
    # the parameters' gradients are sums of terms that cancel (β's gradients sum to 0 over a group): both sides'
    # rounding is of the terms' size, r w Σ |dy|, not of the result's (measured up to 4e-14 Σ |dy|)
    terms = np.abs(dy).sum()
    for name in ("weight", "bias", "bn.weight", "bn.bias"):
        got, want = layer.grads[name], np.reshape(ref.grads[name], layer.grads[name].shape)
        assert np.abs(got - want).max() <= 1e-12 * terms, (name, np.abs(got - want).max() / terms)
    assert np.all(np.isinf(layer.running_var)) and np.all(np.isinf(ref.bn.running_var))


def _relative_to_scale(got, want):
    """The largest error relative to the array's scale (its largest magnitude), shapes matched."""
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64).reshape(want.shape) - want)) / np.abs(want).max())


@pytest.mark.parametrize("dtype, spread, bn_weight_bound", [(np.float32, 1e-41, 1e-6), (np.float32, 1e-43, 1e-6),
                                                            (np.float64, 1e-310, 1e-9), (np.float64, 1e-312, 1e-7)])
@pytest.mark.parametrize("spatial", [(14, 14), (4, 4)], ids=["S=196", "S=16"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_subnormal_spreads_cost_only_the_float64_batch_norm_weight_s_gradient(dtype, spread, bn_weight_bound, spatial,
                                                                              layout, rng):
    """Input whose values are themselves subnormal (about `spread`). Float planes whose |Σ dy (x - p)| falls below
    2^-96 sum it again in Float64 (`resumInFloat64`), so float32 keeps its usual precision everywhere (measured
    2e-8 to 5e-8 of the batch norm's weight gradient's scale; before that guard 0.6-3e-5 at 1e-41 and 0.05-0.45% at
    1e-43). Double has no wider sums to fall back on: the batch norm's weight gradient, which those sums make,
    loses what the subnormal products lose, 1e-11 to 1e-10 of its scale at 1e-310 and up to 6e-9 at 1e-312 (the
    bounds here allow 10 to 16 times that). Everything else keeps its usual precision: the batch norm's eps
    dominates such a variance, so y is its bias's channel norm."""
    B, C, G = 8, 64, 32
    x = (random_input(rng, (B, C) + spatial) * spread).astype(dtype)
    dy = rng.normal(0.3, 1.0, x.shape).astype(dtype)
    assert np.all(np.abs(x[x != 0]) < np.finfo(dtype).smallest_normal * 1e3)  # the products below are subnormal
    if layout == "channels-last":
        x, dy = _channels_last(x), _channels_last(dy)
    layer = bcnswift.BatchChannelNorm(C, G, estimate=False, unbiased_running_var=False, dtype=dtype)
    ref = R.LabmlBatchChannelNorm(C, G, estimate=False)
    for name, array in layer.parameters().items():
        array[...] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.3, array.shape)
    _copy_parameters(layer, ref)
    usual = 1e-6 if dtype == np.float32 else 1e-10  # (float64 values near 1e-312 hold about 37 bits)
    y, y_ref = layer(x), ref.forward(x.astype(np.float64))
    dx, dx_ref = layer.backward(dy), ref.backward(dy.astype(np.float64))
    assert _relative_to_scale(y, y_ref) <= usual and _relative_to_scale(dx, dx_ref) <= usual
    for name, path in _LABML_PARAMETERS.items():
        error = _relative_to_scale(layer.grads[name], ref.grads[path])
        assert error <= (bn_weight_bound if name == "bn.weight" else usual), (name, error)
