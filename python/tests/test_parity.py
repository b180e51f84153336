"""bcnswift against the numpy transcriptions of the documents, for every convention, rank, dtype and mode."""
import numpy as np
import pytest

from conftest import CONVENTIONS, Pair, random_input

SHAPES = {  # rank: a shape with C = 8
    2: (6, 8),
    3: (3, 8, 5),
    4: (2, 8, 3, 4),
    5: (2, 8, 2, 3, 2),
}
GROUPS = [4, 1, 8]  # two channels per group, one group, one channel per group
# Planes of 16 or more elements take the SIMD kernels (shorter ones inline scalar loops); planes over 4096
# elements are split into chunks and merged.
LARGE_PLANES = [(2, 8, 6, 7), (3, 8, 33), (2, 4, 9000)]


def _cases():
    for c in CONVENTIONS:
        for G in (GROUPS if c.groups else [None]):
            for rank, shape in SHAPES.items():
                if G == 8 and rank == 2:
                    continue  # one value per group: refused (test_errors)
                yield c, G, shape


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("convention,G,shape", list(_cases()),
                         ids=lambda v: str(v).replace(" ", "") if not isinstance(v, tuple) else "x".join(map(str, v)))
def test_training_steps_then_eval(convention, G, shape, dtype, rng):
    """Several training steps (running buffers evolve, gradients each step), then eval forward and backward."""
    pair = Pair(convention, shape[1], G, dtype, rng)
    for step in range(3):
        x = random_input(rng, shape)
        pair.step(x, rng.normal(0.5, 1.0, shape), f"training step {step}, shape {shape}")
    pair.train(False)
    for step in range(2):
        x = random_input(rng, shape)
        pair.step(x, rng.normal(-0.5, 1.0, shape), f"eval step {step}, shape {shape}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name.replace(" ", ""))
def test_batch_size_one(convention, dtype, rng):
    """Micro-batch training: one sample per step, the case BCN exists for."""
    shape = (1, 8, 3, 5)
    pair = Pair(convention, 8, 4 if convention.groups else None, dtype, rng)
    for step in range(4):
        pair.step(random_input(rng, shape), rng.normal(0.2, 1.0, shape), f"batch 1, step {step}")


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("convention", CONVENTIONS[:4], ids=lambda c: c.name.replace(" ", ""))
def test_momentum_values(convention, momentum, rng):
    shape = (2, 8, 4, 4)
    pair = Pair(convention, 8, 4, np.float64, rng, momentum=momentum)
    for step in range(3):
        pair.step(random_input(rng, shape), rng.normal(0.3, 1.0, shape), f"momentum {momentum}, step {step}")


def test_gradients_accumulate_until_zero_grad(rng):
    import bcnswift
    # batch statistics: the second forward's gradient does not depend on the running buffers it moved
    layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)
    x = random_input(rng, (2, 8, 5))
    dy = rng.normal(0.3, 1.0, x.shape)
    layer(x)
    layer.backward(dy)
    once = {k: v.copy() for k, v in layer.grads.items()}
    assert all(np.abs(v).max() > 0 for v in once.values())
    layer(x)
    layer.backward(dy)
    for k in once:
        np.testing.assert_allclose(layer.grads[k], 2 * once[k], rtol=1e-12, atol=1e-12)
    layer.zero_grad()
    assert all(not v.any() for v in layer.grads.values())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", LARGE_PLANES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name.replace(" ", ""))
def test_vector_and_chunked_planes(convention, shape, dtype, rng):
    pair = Pair(convention, shape[1], 2 if convention.groups else None, dtype, rng)
    for step in range(2):
        pair.step(random_input(rng, shape), rng.normal(0.5, 1.0, shape), f"training step {step}, shape {shape}")
    pair.train(False)
    pair.step(random_input(rng, shape), rng.normal(-0.5, 1.0, shape), f"eval, shape {shape}")


# Rows wider than one column block of the row path (~512 values): blocks of whole groups, a partial last block,
# groups wider than a block, and batch norm alone over several blocks.
WIDE_ROWS = [((5, 600), 4), ((3, 96, 3, 3), 32), ((4, 700), 7), ((2, 1200), 2)]
# The row path's loops take four planes (S > 1) or four values (S = 1) at a time: channel counts and groups
# that leave a remainder run the scalar tails too.
WIDE_ROWS += [((3, 30, 3), 5), ((7, 30), 3), ((4, 10, 2, 2), 5), ((5, 18, 7), 6)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,G", WIDE_ROWS, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name.replace(" ", ""))
def test_wide_rows(convention, shape, G, dtype, rng):
    pair = Pair(convention, shape[1], G if convention.groups else None, dtype, rng)
    for step in range(2):
        pair.step(random_input(rng, shape), rng.normal(0.5, 1.0, shape), f"training step {step}, shape {shape}")
    pair.train(False)
    pair.step(random_input(rng, shape), rng.normal(-0.5, 1.0, shape), f"eval, shape {shape}")


# Short planes whose memo (every plane's moments, which phase (a) keeps for the output, and the backward's phase (a)
# for its phase (c)) would pass 16 MB: the phases measure again instead, and planes of 2 to 4 values from 8 samples
# take the batch moments by columns whatever the dtype. 256 x 4200 planes of 2 values: a forward's memo would be
# 17 MB. (K·S = 28 is not a whole number of 8-lane vectors, so float32 stays off the value view too.)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("convention", [CONVENTIONS[1], CONVENTIONS[2]], ids=lambda c: c.name.replace(" ", ""))
def test_short_planes_above_the_memo_limit(convention, dtype, rng):
    shape = (256, 4200, 2)
    pair = Pair(convention, shape[1], 300, dtype, rng)
    pair.step(random_input(rng, shape), rng.normal(0.5, 1.0, shape), f"training step, shape {shape}")
