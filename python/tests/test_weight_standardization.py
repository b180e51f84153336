"""Weight Standardization against both documents' formulas, ranks 2 to 5, float32 and float64."""
import copy
import pickle

import numpy as np
import pytest

import bcnswift
from bcnswift import reference as R
from conftest import assert_close

SHAPES = [(16, 9), (8, 4, 3), (6, 3, 3, 3), (4, 2, 3, 3, 3)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_reference(shape, eps_in_sqrt, unbiased, dtype, rng):
    w = (rng.normal(0.05, 0.1, shape) + rng.normal(0, 0.5, (shape[0],) + (1,) * (len(shape) - 1))).astype(dtype)
    g = rng.normal(0.1, 1.0, shape).astype(dtype)
    w64 = w.astype(np.float64)
    ref = R.ws_labml(w64, 1e-5, unbiased) if eps_in_sqrt else R.ws_authors(w64, 1e-5, unbiased)
    out = bcnswift.weight_standardization(w, eps=1e-5, unbiased=unbiased, eps_in_sqrt=eps_in_sqrt)
    assert out.dtype == dtype and out.shape == shape
    assert_close(out, ref, dtype, "w_hat")
    dw = bcnswift.weight_standardization_backward(w, g, eps=1e-5, unbiased=unbiased, eps_in_sqrt=eps_in_sqrt)
    assert_close(dw, R.ws_backward(w64, g.astype(np.float64), 1e-5, unbiased, eps_in_sqrt), dtype, "dw")

    ws = bcnswift.WeightStandardization(eps=1e-5, unbiased=unbiased, eps_in_sqrt=eps_in_sqrt)
    np.testing.assert_array_equal(ws(w), out)
    np.testing.assert_array_equal(ws.backward(g), dw)


def test_the_layer_s_options_may_change_between_calls_and_its_backward_keeps_the_forward_s(rng):
    """eps, unbiased and eps_in_sqrt assigned after construction take effect at the next call; the backward is the
    gradient of the last call, with that call's options (it read the layer's current ones, while the forward
    kept the constructor's: a gradient of another function than the one computed)."""
    w, g = rng.normal(0.3, 1.5, (6, 3, 3, 3)), rng.normal(0.2, 1.0, (6, 3, 3, 3))
    ws = bcnswift.WeightStandardization(eps=1e-5, unbiased=True, eps_in_sqrt=True)
    ws.eps, ws.unbiased, ws.eps_in_sqrt = 1e-3, False, False
    np.testing.assert_array_equal(ws(w), bcnswift.weight_standardization(w, 1e-3, False, False))
    ws.eps, ws.unbiased, ws.eps_in_sqrt = 0.5, True, True  # after the forward
    np.testing.assert_array_equal(ws.backward(g), bcnswift.weight_standardization_backward(w, g, 1e-3, False, False))
    ws.unbiased = "no"
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        ws(w)
    ws.unbiased, ws.eps = True, -1.0
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        ws(w)


def test_standardized_rows_have_zero_mean_and_unit_std(rng):
    w = rng.normal(3.0, 2.0, (32, 3, 3, 3))
    out = bcnswift.weight_standardization(w, eps=1e-12)
    rows = out.reshape(32, -1)
    np.testing.assert_allclose(rows.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(rows.std(axis=1, ddof=1), 1, rtol=1e-9)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_constant_filter_is_finite(eps_in_sqrt, rng):
    w = rng.normal(0.1, 1.0, (4, 3, 3, 3))
    w[1] = 0.7  # one constant filter
    g = rng.normal(0.2, 1.0, w.shape)
    out = bcnswift.weight_standardization(w, eps_in_sqrt=eps_in_sqrt)
    dw = bcnswift.weight_standardization_backward(w, g, eps_in_sqrt=eps_in_sqrt)
    assert np.isfinite(out).all() and np.isfinite(dw).all()
    np.testing.assert_array_equal(out[1], 0)
    # the limit: only the mean term survives, (g - mean(g)) / den
    den = np.sqrt(1e-5) if eps_in_sqrt else 1e-5
    np.testing.assert_allclose(dw[1], (g[1] - g[1].mean()) / den, rtol=1e-9)


def test_fan_in_one_unbiased_is_an_error():
    with pytest.raises(ValueError, match=r"^an unbiased standard deviation needs a fan-in of at least 2, got 1 "
                                         r"\(turn unbiased off\)$"):
        bcnswift.weight_standardization(np.ones((4, 1)))
    out = bcnswift.weight_standardization(np.arange(4.0).reshape(4, 1), unbiased=False)
    np.testing.assert_array_equal(out, 0)
    for dtype in (np.float32, np.float64):  # w_hat does not depend on w: its gradient is 0, not rounding noise
        w = np.array([[3.0], [-0.1], [1e30], [7.0]], dtype)
        dw = bcnswift.weight_standardization_backward(w, np.array([[0.7], [-2.0], [1.0], [0.0]], dtype), unbiased=False)
        np.testing.assert_array_equal(dw, 0)


def test_bad_arguments():
    w = np.ones((2, 3))
    with pytest.raises(ValueError, match="eps"):
        bcnswift.weight_standardization(w, eps=0)
    with pytest.raises(ValueError, match="rank"):
        bcnswift.weight_standardization(np.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        bcnswift.weight_standardization(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="shape"):
        bcnswift.weight_standardization_backward(w, np.ones((3, 2)))
    with pytest.raises(RuntimeError, match="before"):
        bcnswift.WeightStandardization().backward(w)
    with pytest.raises(ValueError, match="empty"):
        bcnswift.weight_standardization(np.ones((0, 3)))
    for kwargs, name in ((dict(unbiased="yes"), "unbiased"), (dict(eps_in_sqrt=1), "eps_in_sqrt")):
        with pytest.raises(TypeError, match=f"^{name} must be a bool"):
            bcnswift.WeightStandardization(**kwargs)  # at construction, not at the first call
        with pytest.raises(TypeError, match=f"^{name} must be a bool"):
            bcnswift.weight_standardization(w + np.arange(3), **kwargs)
        with pytest.raises(TypeError, match=f"^{name} must be a bool"):
            bcnswift.weight_standardization_backward(w + np.arange(3), w, **kwargs)


def test_the_defaults_are_labml_s(rng):
    """weight_standardization, its backward and WeightStandardization default to labml's formula: eps 1e-5
    inside the square root, the unbiased variance. (Rows of a small spread, where eps shows.)"""
    w = rng.normal(0.3, 0.05, (6, 3, 3, 3)) + rng.normal(0.0, 0.5, (6, 1, 1, 1))
    g = rng.normal(0.2, 1.0, w.shape)
    assert_close(bcnswift.weight_standardization(w), R.ws_labml(w, 1e-5, True), np.float64, "w_hat")
    assert_close(bcnswift.weight_standardization_backward(w, g), R.ws_backward(w, g, 1e-5, True, True), np.float64,
                 "dw")
    ws = bcnswift.WeightStandardization()
    assert (ws.eps, ws.unbiased, ws.eps_in_sqrt) == (1e-5, True, True)
    np.testing.assert_array_equal(ws(w), bcnswift.weight_standardization(w))
    np.testing.assert_array_equal(ws.backward(g), bcnswift.weight_standardization_backward(w, g))


def test_the_layer_copies_and_pickles_with_its_options_and_its_last_call(rng):
    w, g = rng.normal(0.3, 1.5, (4, 2, 3, 3)), rng.normal(0.2, 1.0, (4, 2, 3, 3))
    ws = bcnswift.WeightStandardization(eps=1e-3, unbiased=False, eps_in_sqrt=False)
    ws(w)
    dw = ws.backward(g)
    for clone in (copy.deepcopy(ws), pickle.loads(pickle.dumps(ws))):
        assert repr(clone) == repr(ws)
        np.testing.assert_array_equal(clone.backward(g), dw)
        np.testing.assert_array_equal(clone(w * 2.0), bcnswift.weight_standardization(w * 2.0, 1e-3, False, False))


@pytest.mark.parametrize("layout", ["fortran", "sliced", "reversed", "transposed"])
def test_any_memory_layout_gives_the_c_order_results(layout, rng):
    w = rng.normal(0.05, 0.3, (6, 4, 3, 3))
    g = rng.normal(0.1, 1.0, w.shape)
    arrange = {"fortran": np.asfortranarray, "sliced": lambda a: np.repeat(a, 2, axis=1)[:, ::2],
               "reversed": lambda a: a[::-1].copy()[::-1], "transposed": lambda a: a.T.copy().T}[layout]
    wl, gl = arrange(w), arrange(g)
    np.testing.assert_array_equal(wl, w)
    assert not wl.flags.c_contiguous
    np.testing.assert_array_equal(bcnswift.weight_standardization(wl), bcnswift.weight_standardization(w))
    np.testing.assert_array_equal(bcnswift.weight_standardization_backward(wl, gl),
                                  bcnswift.weight_standardization_backward(w, g))


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_a_constant_row_has_a_finite_gradient_at_any_eps(eps_in_sqrt, rng):
    """The header's promise: grad_w = (g - mean(g)) / den for a constant row, never NaN, even where den³
    underflows (eps 1e-300 in the square root)."""
    w = np.full((2, 6), 0.75)
    g = rng.normal(0.3, 1.0, w.shape)
    for eps in (1e-5, 1e-300):
        dw = bcnswift.weight_standardization_backward(w, g, eps=eps, eps_in_sqrt=eps_in_sqrt)
        den = np.sqrt(eps) if eps_in_sqrt else eps
        np.testing.assert_allclose(dw, (g - g.mean(axis=1, keepdims=True)) / den, rtol=1e-12)


def _ws_decimal(w, eps, unbiased, eps_in_sqrt):
    """ŵ of one row in decimal arithmetic (80 digits: the context `_assert_matches_decimal` sets), the documents'
    formula, with no range to overflow."""
    n = len(w)
    mean = sum(w) / n
    var = sum((v - mean) ** 2 for v in w) / (n - (1 if unbiased else 0))
    den = (var + eps).sqrt() if eps_in_sqrt else var.sqrt() + eps
    return [(v - mean) / den for v in w]


def _assert_matches_decimal(w, g, eps, unbiased, eps_in_sqrt, tolerance, what):
    """Both directions of every row of w (float32 or float64) against the formula in 80 digits, the gradient by
    central differences there (independent of the kernel's algebra), each within `tolerance` of the row's largest
    reference value. Rows whose values are all equal get the documented limit, (g - mean(g)) / den."""
    import decimal
    with np.errstate(all="ignore"):
        out = bcnswift.weight_standardization(w, eps=eps, unbiased=unbiased, eps_in_sqrt=eps_in_sqrt)
        dw = bcnswift.weight_standardization_backward(w, g, eps=eps, unbiased=unbiased, eps_in_sqrt=eps_in_sqrt)
    with decimal.localcontext(decimal.Context(prec=80)):  # a row spread over ulps, then perturbed by 1e-25 of that
        D = decimal.Decimal
        d_eps = D(eps)
        for o in range(w.shape[0]):
            row, grad = [D(float(v)) for v in w[o]], [D(float(v)) for v in g[o]]
            ref = _ws_decimal(row, d_eps, unbiased, eps_in_sqrt)
            spread = max(abs(v - sum(row) / len(row)) for v in row)
            if spread == 0:
                den = d_eps.sqrt() if eps_in_sqrt else d_eps
                ref_dw = [(gj - sum(grad) / len(grad)) / den for gj in grad]
            else:
                h, ref_dw = spread * D("1e-25"), []
                for i in range(len(row)):
                    up, down = list(row), list(row)
                    up[i] += h
                    down[i] -= h
                    f = _ws_decimal(up, d_eps, unbiased, eps_in_sqrt)
                    b = _ws_decimal(down, d_eps, unbiased, eps_in_sqrt)
                    ref_dw.append(sum(gj * (fj - bj) for gj, fj, bj in zip(grad, f, b)) / (2 * h))
            where = f"{what}, row {o} of {w.dtype}"
            for got, expected, name in ((out[o], ref, "w_hat"), (dw[o], ref_dw, "dw")):
                expected = np.array([float(v) for v in expected])  # ±inf: beyond the largest double
                assert not np.isnan(expected).any(), where
                with np.errstate(over="ignore"):  # infinite only where the value overflows the dtype itself
                    overflows = ~np.isfinite(expected.astype(got.dtype))
                assert not np.isnan(got).any(), f"{where}: {name} {got}"
                np.testing.assert_array_equal(got[overflows], np.sign(expected[overflows]) * np.inf, where)
                kept = ~overflows & (np.abs(expected) <= np.finfo(got.dtype).max)
                if kept.any():  # to the dtype's own resolution at the bottom (a value below it rounds to 0)
                    atol = max(tolerance * np.abs(expected[kept]).max(), np.finfo(got.dtype).smallest_subnormal)
                    np.testing.assert_allclose(got[kept], expected[kept], rtol=0, atol=atol, err_msg=f"{where}: {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_a_fan_in_of_two_has_the_gradient_that_exists_through_eps(eps_in_sqrt, unbiased, dtype, rng):
    """A review: with two weights a row, ŵ is ±1 but for eps, and dw (eps·gh/den³ or eps·gh/den², gh half the
    difference of dŵ) is what is left of terms about 1/eps times larger: the general formula lost 7e2-3e3 float32
    ulps of the largest |dw| at eps 1e-5, and 2e4 float64 ulps (as the documents' own float64 code does). In
    closed form, within a few ulps of an 80-digit reference, from tiny to huge weights, and with gradients of
    opposite signs near the largest value (halved before their difference, which would overflow)."""
    # (the forward's ŵ is held to the same; float64's: 450 ulps, where the general formula's dw lost 2e4)
    tolerance = 4 * np.finfo(np.float32).eps if dtype == np.float32 else 1e-13
    # weights whose dw the reference resolves (its 80 digits hold eps/den² from about 1e-50), or whose dw
    # underflows the dtype (1e30 and 1e38 in float32, 1e300 in float64: 0 in both)
    magnitudes = (1e-30, 1.0, 1e30, 1e38) if dtype == np.float32 else (1e-100, 1e-30, 1.0, 1e300)
    for magnitude in magnitudes:
        for eps in (1e-5, 1e-10, 1e-30):
            w = (rng.normal(0.5, 1.0, (4, 2)) * magnitude).astype(dtype)
            g = rng.normal(0.2, 1.0, w.shape).astype(dtype)
            if magnitude == 1.0:  # a constant row (exact in 80 digits): the limit gh/√eps or gh/eps
                w[3] = 0.75
            _assert_matches_decimal(w, g, eps, unbiased, eps_in_sqrt, tolerance, f"magnitude {magnitude:g}, eps {eps}")
    w = np.array([[1.5, -0.5]], dtype)  # dŵ's difference past the largest value, dw within range
    g = np.array([[np.finfo(dtype).max, -np.finfo(dtype).max]], dtype)
    _assert_matches_decimal(w, g, 1e-5, unbiased, eps_in_sqrt, tolerance, "gradients near the largest value")


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_a_fan_in_of_two_keeps_a_tiny_gradient_that_huge_weights_and_gradients_make(eps_in_sqrt, unbiased):
    """Reviews: eps/den³ underflowed before it met a huge dŵ (w = ±1e110, dŵ = ±1e300 gave 0 where dw is
    3.5e-36), and halving subnormal weights or gradients before their difference rounded them (dŵ = (5e-324, 0)
    gave 0; w = ±5e-324 gave 4-6 times dw). The closed form, evaluated in 80 digits (beyond the central
    differences' reach at eps/den² of 1e-225), against the kernel, which works on significands: within 4 ulps
    wherever dw is a normal double, 0 or a subnormal where it underflows, infinite where it overflows."""
    import decimal
    cases = [(1e110, -1e110, 1e300, -1e300, 1e-5), (1e120, -1e120, 1e300, -1e300, 1e-5),
             (1.0, -1.0, 1e308, -1e308, 1e-300), (1e-150, -1e-150, 1e-300, -1e-300, 1e-300),
             (1e150, -1e150, 1e300, -1e300, 1e300), (0.0, 0.0, 1e-300, -1e-300, 5e-324),
             (1e-160, -1e-160, 1e200, -1e200, 1e-310), (1e200, -1e200, 1e-300, -1e-300, 1e-5),
             (0.0, 0.0, 5e-324, 0.0, 1e-300), (0.0, 0.0, 5e-324, 0.0, 1e-5),
             (5e-324, -5e-324, 1e-300, -1e-300, 5e-324), (1.5e-323, 0.0, 1e-300, -1e-300, 5e-324),
             (1.7e308, -1.7e308, 1.7e308, -1.7e308, 1e-5)]
    with decimal.localcontext(decimal.Context(prec=80)):
        D = decimal.Decimal
        for w0, w1, g0, g1, eps in cases:
            dw = bcnswift.weight_standardization_backward(np.array([[w0, w1]]), np.array([[g0, g1]]), eps=eps,
                                                          unbiased=unbiased, eps_in_sqrt=eps_in_sqrt)
            h, gh = abs(D(w0) - D(w1)) / 2, (D(g0) - D(g1)) / 2
            std = h * (D(2).sqrt() if unbiased else 1)
            den = (std * std + D(eps)).sqrt() if eps_in_sqrt else std + D(eps)
            want = float(D(eps) * gh / den ** (3 if eps_in_sqrt else 2))
            case = (w0, w1, g0, g1, eps, dw[0, 0], want)
            assert dw[0, 1] == -dw[0, 0], case
            if np.isinf(want):  # (labml's 1e355 at eps 1e-310: beyond the largest double, as dw itself is)
                assert dw[0, 0] == want, case
            elif abs(want) >= np.finfo(np.float64).tiny:
                assert abs(dw[0, 0] - want) <= 4 * np.spacing(abs(want)), case
            else:
                assert abs(dw[0, 0] - want) <= np.finfo(np.float64).smallest_subnormal, case


@pytest.mark.parametrize("eps", [1e-5, 1e-300, 5e-324])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_extreme_magnitudes_match_a_decimal_reference(eps_in_sqrt, unbiased, eps, rng):
    """Weights from 1e-300 to 1e300 and eps down to the smallest double: M2 and den³ of a row would overflow or
    underflow in Float64 (a NaN forward from about 1e154, a backward that dropped its second term from about 1e103);
    such rows are rescaled by a power of two."""
    for magnitude in (1e-300, 1e-170, 1e-100, 1.0, 1e100, 1e150, 1e200, 1e300):
        w = rng.normal(0.5, 1.0, (3, 9)) * magnitude
        g = rng.normal(0.2, 1.0, w.shape)
        _assert_matches_decimal(w, g, eps, unbiased, eps_in_sqrt, 1e-12, f"magnitude {magnitude:g}")


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_float32_rows_beyond_float32_constants_match_a_decimal_reference(eps_in_sqrt):
    """Float32 lanes take 1/den, w - mean and the gradient's constants in Float32: tiny or huge weights, a huge
    eps, or values of both signs near the largest float gave NaN, infinities or a dropped term (a review's
    reproducers); such rows run in Float64."""
    big = np.finfo(np.float32).max
    g = np.array([[.5, -1, 2, .25, -.75, 1.5, -2, .3]] * 2, np.float32)
    steps = np.arange(1, 9, dtype=np.float32)
    cases = [(np.full((2, 8), .7, np.float32), 1e-100), (steps * np.float32(1e-40), 1e-100),
             (steps * np.float32(1e-25), 1e-100), (np.array([[big] * 5 + [-big] * 3], np.float32), 1e-5),
             ((steps + (steps == 8)) * np.float32(1e25), 1e-5), ((steps + (steps == 8)) * np.float32(1e37), 1e100),
             (steps * np.float32(3e-3), 1e-5)]  # and an ordinary row
    for w, eps in cases:
        w = np.broadcast_to(w, (2, 8)).copy()
        for unbiased in (True, False):
            _assert_matches_decimal(w, g, eps, unbiased, eps_in_sqrt, 1e-6, f"{w[0, :2]}..., eps {eps}")


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_rows_spread_over_a_few_ulps_and_huge_gradients_match_a_decimal_reference(eps_in_sqrt, rng):
    """A row spread over a few ulps of its mean lost w - mean to the mean's rounding (ŵ off by up to its whole
    size); a gradient near 1e300 overflowed Σ g (w - mean). Both now keep their precision."""
    def below(v, k):  # the k-th double below v
        for _ in range(k):
            v = np.nextafter(v, 0)
        return v
    # (two values would make ŵ = ±1 whatever w is: a zero gradient, where the reference has only its own rounding)
    for w, eps in ((np.array([[1.0, below(1.0, 1), 1.0, below(1.0, 3)], [1e200, below(1e200, 2), 1e200, 1e200]]),
                    1e-300), (np.array([[3.0 + k * 2 ** -51 for k in range(6)]]), 1e-310)):
        g = rng.normal(0.2, 1.0, w.shape)
        _assert_matches_decimal(w, g, eps, False, eps_in_sqrt, 1e-12, f"{w[0, :2]}...")
    w, g = np.array([[0.0, 1e90, -0.5e90, 0.3e90]]), np.array([[1e300, -1e300, .5e300, .2e300]])
    _assert_matches_decimal(w, g, 1e-5, True, eps_in_sqrt, 1e-12, "huge gradient")


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_gradients_near_the_largest_double_match_a_decimal_reference(eps_in_sqrt, rng):
    """dŵ near DBL_MAX: Σ g overflowed even on the rescaled rows, which gave -inf or NaN for a finite exact dw (a
    review's reproducer: w = [0, 1, 2], dŵ = 1e308 each). Such g is summed scaled by a power of two, the result
    scaled back last: dw keeps its precision, and overflows only where the exact value does."""
    big = np.finfo(np.float64).max
    for magnitude in (1.0, 1e-100, 1e100):
        w = rng.normal(0.5, 1.0, (3, 9)) * magnitude
        for g in (rng.uniform(-1, 1, w.shape) * big, rng.uniform(-1, 1, w.shape) * 1e308,
                  np.array([[1e308, 0.5e308, -0.25e308, 1.5e308, 1e307, -1e308, 0.0, 1.7e308, -1.7e308]] * 3)):
            _assert_matches_decimal(w, g, 1e-5, True, eps_in_sqrt, 1e-12, f"magnitude {magnitude:g}, g {g[0, :2]}")


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_underflowing_moments_sums_and_quotients_match_a_decimal_reference(eps_in_sqrt):
    """A second review's reproducers: a row whose M2 underflows to 0 (tiny or subnormal values) passed for a
    constant one; Σ g (w - mean) underflowed (tiny g) or q did (huge eps), dropping the gradient's second term; the
    scaled path's division over- or underflowed where its result does not."""
    w = np.array([[1, 2, 3, 4, 5, 6, 7, 9.0]])
    g = np.array([[.5, -1, 2, .25, -.75, 1.5, -2, .3]])
    tiny = np.nextafter(1e-200, 1)
    cases = [(np.array([[1e-200, 1e-200, tiny]]), g[:, :3], 1e-5, 1e-12),
             (np.array([[1, 2, 0, -1]]) * 5e-324, g[:, :4], 1e-100, 1e-12),
             ((w * 1e-9).astype(np.float32), (g * 1e-38).astype(np.float32), 1e-20, 1e-6),
             ((w * 1e-3).astype(np.float32), (g * 1e-40).astype(np.float32), 1e-5, 1e-6),
             (w * 1e-80, g * 1e-250, 1e-170, 1e-12), (w * 1e52, g * 1e-232, 1e99, 1e-12),
             (w * 1e-150, g * 1e-300, 1e-250, 1e-12), (1e80 * (1 + w[:, :3] * 1e-7), g[:, :3] * 1e306, 1e-107, 1e-12)]
    for wc, gc, eps, tolerance in cases:
        for unbiased in (True, False):
            _assert_matches_decimal(wc, gc, eps, unbiased, eps_in_sqrt, tolerance, f"{wc[0, :2]}..., eps {eps}")


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["labml", "authors"])
def test_constant_rows_at_extreme_magnitudes_and_eps(eps_in_sqrt, rng):
    """A constant row standardizes to 0 and its gradient is (g - mean(g)) / den, at any magnitude and eps:
    never NaN; infinite only where that quotient overflows (the authors' den = eps below about 1e-308)."""
    g = rng.normal(0.3, 1.0, (4, 6))
    for value in (0.0, 0.7, -3e-300, 2.5e300):
        w = np.full((4, 6), value)
        for eps in (1e-5, 1e-300, 5e-324):
            what = f"value {value}, eps {eps}"
            out = bcnswift.weight_standardization(w, eps=eps, eps_in_sqrt=eps_in_sqrt)
            np.testing.assert_array_equal(out, 0, err_msg=what)
            dw = bcnswift.weight_standardization_backward(w, g, eps=eps, eps_in_sqrt=eps_in_sqrt)
            den = np.sqrt(eps) if eps_in_sqrt else eps
            with np.errstate(over="ignore"):
                expected = (g - g.mean(axis=1, keepdims=True)) / den
            assert not np.isnan(dw).any(), what
            np.testing.assert_allclose(dw, expected, rtol=1e-12, err_msg=what)


@pytest.mark.parametrize("offset", [0.0, 10.0, 1e3, 1e5], ids=["0", "10", "1e3", "1e5"])
@pytest.mark.parametrize("fan_in", [9, 576, 5000], ids=["9", "576", "chunked"])
def test_float32_gradients_far_off_zero_keep_their_precision(offset, fan_in, rng):
    """dŵ `offset` times its spread off 0: dw = (dŵ - mean) / den - ... cancels the mean, and the Float32 lanes
    sum and map about it (`_gradientSums`' shift, `_combine`'s dyMean; rows of 5000 span two chunks, which share
    the row's shift), so dw keeps its precision: within 4 ulps of its scale against the float64 reference (at
    most 0.9 measured). Summed and mapped about 0, it lost about offset/2 ulps."""
    w = (rng.normal(0.02, 0.1, (16, fan_in))).astype(np.float32)
    g = (rng.normal(0.3, 1.0, w.shape) + offset).astype(np.float32)
    dw = bcnswift.weight_standardization_backward(w, g)
    ref = R.ws_backward(w.astype(np.float64), g.astype(np.float64))
    assert np.abs(dw - ref).max() <= 4 * np.finfo(np.float32).eps * np.abs(ref).max()
