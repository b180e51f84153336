"""Several Python threads: different layers run in parallel with serial results; one layer serializes its calls."""
import threading

import numpy as np
import pytest

import bcnswift
from conftest import random_input


def test_different_layers_in_parallel_match_serial(rng):
    shapes = [(2, 16, 24, 24), (4, 8, 10, 10), (1, 32, 30, 30), (8, 16, 5, 5)]
    inputs = [random_input(rng, s).astype(np.float32) for s in shapes]
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]

    def run(i, out):
        layer = bcnswift.BatchChannelNorm(shapes[i][1], 4, estimate=i % 2 == 0)
        for _ in range(20):
            y = layer(inputs[i])
            dx = layer.backward(grads[i])
        out[i] = (y, dx, layer.state_dict(), {k: v.copy() for k, v in layer.grads.items()})

    serial, parallel = {}, {}
    for i in range(len(shapes)):
        run(i, serial)
    threads = [threading.Thread(target=run, args=(i, parallel)) for i in range(len(shapes)) for _ in range(1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(shapes)):
        y, dx, state, g = parallel[i]
        np.testing.assert_array_equal(y, serial[i][0])
        np.testing.assert_array_equal(dx, serial[i][1])
        for k in state:
            np.testing.assert_array_equal(state[k], serial[i][2][k])
        for k in g:
            np.testing.assert_array_equal(g[k], serial[i][3][k])


def test_one_layer_from_many_threads_loses_no_update(rng):
    """Calls on one layer are serialized: with the same batch every time, the running buffers after N training
    steps do not depend on the order, so any lost or torn update would show."""
    x = random_input(rng, (2, 8, 12, 12)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    shared = bcnswift.BatchChannelNorm(8, 4, estimate=False)
    n_threads, steps = 4, 50
    errors = []

    def work():
        try:
            for _ in range(steps):
                shared(x)
                shared.backward(dy)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    serial = bcnswift.BatchChannelNorm(8, 4, estimate=False)
    for _ in range(n_threads * steps):
        serial(x)
        serial.backward(dy)
    assert int(shared.bn.num_batches_tracked) == n_threads * steps
    np.testing.assert_array_equal(shared.bn.running_mean, serial.bn.running_mean)
    np.testing.assert_array_equal(shared.bn.running_var, serial.bn.running_var)
    for k in serial.grads:  # float32 sums of equal terms: order-independent up to rounding
        np.testing.assert_allclose(shared.grads[k], serial.grads[k], rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 32, 40, 40), (512, 256)], ids=["planes", "rows"])
def test_thread_count_does_not_change_a_bit(shape, rng):
    x = random_input(rng, shape).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    results = []
    try:
        for n in (1, 2, 16):
            bcnswift.set_num_threads(n)
            layer = bcnswift.BatchChannelNorm(shape[1], 8, estimate=False)
            y = layer(x)
            dx = layer.backward(dy)
            results.append((y, dx, layer.state_dict(), dict(layer.grads)))
    finally:
        bcnswift.set_num_threads(0)
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])
        for k in other[2]:
            np.testing.assert_array_equal(other[2][k], results[0][2][k])
        for k in other[3]:
            np.testing.assert_array_equal(other[3][k], results[0][3][k])
