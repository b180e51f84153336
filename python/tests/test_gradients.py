"""Gradients by central finite differences in float64: the reference's hand-derived backward passes, and
bcnswift's fused backward, in every mode.

Training with batch statistics is differentiated through the statistics. In estimate mode the documents stop the
gradient at the running estimates (torch.no_grad), so the gradient is that of the same layer evaluated with those
estimates frozen: eval mode on the post-update buffers. Both sides are checked against that function."""
import copy

import numpy as np
import pytest

import bcnswift
from bcnswift import reference as R
from conftest import CONVENTIONS, Pair, random_input

H = 1e-6


def numeric_gradient(f, x, indices, h=H):
    g = []
    for idx in indices:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g.append((f(xp) - f(xm)) / (2 * h))
    return np.array(g)


def pick(rng, shape, k=8):
    return [tuple(int(rng.integers(0, n)) for n in shape) for _ in range(k)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name.replace(" ", ""))
@pytest.mark.parametrize("shape", [(5, 8), (2, 8, 3, 2), (2, 8, 5, 5)], ids=["rows", "small-planes", "vector-planes"])
def test_bcnswift_gradients_by_finite_differences(convention, training, shape, rng):
    pair = Pair(convention, 8, 4 if convention.groups else None, np.float64, rng)
    layer = pair.ours.train(training)
    batch_stats = layer._has_bn and not layer.estimate
    before = copy.deepcopy(layer)
    x = random_input(rng, shape)
    w = rng.normal(0.4, 1.0, shape)  # loss = sum(w * y)
    y = layer(x)
    dx = layer.backward(w)

    if training and not batch_stats:  # estimates frozen after their update
        frozen = copy.deepcopy(layer).eval()
        np.testing.assert_allclose(frozen(x), y, rtol=1e-12, atol=1e-12)
    else:
        frozen = before

    def loss(xv, f=frozen):
        return float((copy.deepcopy(f)(xv) * w).sum())

    idx = pick(rng, shape)
    np.testing.assert_allclose(dx[tuple(np.array(idx).T)], numeric_gradient(loss, x, idx), rtol=1e-5, atol=1e-6)

    for name, grad in layer.grads.items():
        base = frozen.state_dict()

        def loss_p(pv, name=name):
            f = copy.deepcopy(frozen)
            f.parameters()[name][...] = pv
            return float((f(x) * w).sum())

        pidx = pick(rng, grad.shape, 4)
        np.testing.assert_allclose(grad[tuple(np.array(pidx).T)], numeric_gradient(loss_p, base[name], pidx),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


REFERENCES = [
    ("LabmlBatchNorm", lambda: R.LabmlBatchNorm(6), ["scale", "shift"]),
    ("LabmlEstimatedBatchNorm", lambda: R.LabmlEstimatedBatchNorm(6), ["scale", "shift"]),
    ("LabmlChannelNorm", lambda: R.LabmlChannelNorm(6, 3), ["scale", "shift"]),
    ("TorchBatchNorm2d", lambda: R.TorchBatchNorm2d(6), ["weight", "bias"]),
    ("AuthorsEstBN", lambda: R.AuthorsEstBN(6), ["weight", "bias"]),
    ("AuthorsBCNorm", lambda: R.AuthorsBCNorm(6, 3, 1e-5), ["weight", "bias", "bn.weight", "bn.bias"]),
    ("AuthorsBCNorm-est", lambda: R.AuthorsBCNorm(6, 3, 1e-5, estimate=True),
     ["weight", "bias", "bn.weight", "bn.bias"]),
    ("LabmlBatchChannelNorm", lambda: R.LabmlBatchChannelNorm(6, 3, estimate=False),
     ["batch_norm.scale", "batch_norm.shift", "channel_norm.scale", "channel_norm.shift"]),
]


def _attr(obj, path):
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,make,params", REFERENCES, ids=[r[0] for r in REFERENCES])
def test_reference_backward_by_finite_differences(name, make, params, training, rng):
    """The reference's backward passes are themselves derived by hand: check them too. Estimate-mode training
    is checked in eval on its (post-update) buffers, which is where its gradient stops."""
    module = make().train(training)
    for p in params:  # random parameters, so weight-dependent terms are exercised
        v = _attr(module, p)
        v[...] = rng.uniform(0.5, 1.5, v.shape) if p.endswith(("scale", "weight")) else rng.normal(0.3, 0.5, v.shape)
    shape = (3, 6, 2, 3)
    x = random_input(rng, shape)
    w = rng.normal(0.4, 1.0, shape)
    module(x)
    dx = module.backward(w)
    grads = dict(module.grads)
    estimated = isinstance(module, (R.LabmlEstimatedBatchNorm, R.AuthorsEstBN)) or (
        isinstance(module, R.AuthorsBCNorm) and isinstance(module.bn, R.AuthorsEstBN))
    frozen = copy.deepcopy(module)
    if training and estimated:
        frozen.train(False)  # estimates frozen at their post-update values

    def loss(xv):
        return float((copy.deepcopy(frozen)(xv) * w).sum())

    idx = pick(rng, shape)
    np.testing.assert_allclose(dx[tuple(np.array(idx).T)], numeric_gradient(loss, x, idx), rtol=1e-5, atol=1e-6)
    for p in params:
        g = np.asarray(grads[p])
        base = _attr(frozen, p).copy()

        def loss_p(pv, p=p):
            f = copy.deepcopy(frozen)
            _attr(f, p)[...] = pv
            return float((f(x) * w).sum())

        pidx = pick(rng, base.shape, 3)
        np.testing.assert_allclose(g.reshape(base.shape)[tuple(np.array(pidx).T)],
                                   numeric_gradient(loss_p, base, pidx), rtol=1e-5, atol=1e-6, err_msg=p)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3), (3, 2, 3, 3), (2, 2, 2, 2, 3)])
def test_weight_standardization_gradients(shape, unbiased, eps_in_sqrt, rng):
    w = rng.normal(0.3, 0.2, shape)
    g = rng.normal(0.2, 1.0, shape)
    ref = R.ws_labml if eps_in_sqrt else R.ws_authors
    idx = pick(rng, shape)
    fd = numeric_gradient(lambda v: float((ref(v, 1e-5, unbiased) * g).sum()), w, idx)
    ours = bcnswift.weight_standardization_backward(w, g, 1e-5, unbiased, eps_in_sqrt)
    theirs = R.ws_backward(w, g, 1e-5, unbiased, eps_in_sqrt)
    sel = tuple(np.array(idx).T)
    np.testing.assert_allclose(theirs[sel], fd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours[sel], fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer_type", ["BatchChannelNorm", "BatchNorm", "ChannelNorm"])
def test_a_gradient_set_to_none_or_removed_starts_again_from_zeros(layer_type, rng):
    """As torch's `.grad`: zero_grad(set_to_none=True), an entry set to None or deleted, and the next backward
    makes that gradient anew from zeros (it skipped it, silently, when None; copies and zero_grad raised
    AttributeError). Other entries keep accumulating."""
    import pickle
    args = (8, 4) if layer_type != "BatchNorm" else (8,)
    options = {"estimate": False} if layer_type == "BatchChannelNorm" else {}  # each backward's gradient the same

    def make(*args, **kwargs):
        return getattr(bcnswift, layer_type)(*args, **kwargs, **options)
    x = random_input(rng, (2, 8, 3, 3))
    dy = rng.normal(0.3, 1.0, x.shape)
    once = make(*args, dtype=np.float64)
    once(x), once.backward(dy)
    layer = make(*args, dtype=np.float64)
    layer(x), layer.backward(dy)
    layer.zero_grad(set_to_none=True)
    assert all(v is None for v in layer.grads.values())
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert all(v is None for v in clone.grads.values())
    layer.zero_grad()  # fills what is there, leaves None alone
    layer(x), layer.backward(dy, out=np.empty_like(x))  # out= checks overlaps with the gradients it holds
    for k, v in once.grads.items():
        np.testing.assert_array_equal(layer.grads[k], v, err_msg=k)
    first = sorted(layer.grads)[0]
    del layer.grads[first]
    layer(x), layer.backward(dy)
    for k, v in once.grads.items():
        np.testing.assert_allclose(layer.grads[k], v if k == first else 2 * v, rtol=1e-14, atol=0, err_msg=k)
