"""Several Python threads: different layers run in parallel with serial results; one layer serializes its calls."""
import copy
import os
import pickle
import signal
import threading
import time

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


# (40, 64, 16, 16): 320 units, enough for the backward's units to run on the workers too
# (256, 264) and (64, 264, 3, 3): groups of 33 channels, so blocks and panels end off the lanes
@pytest.mark.parametrize("shape", [(2, 32, 40, 40), (40, 64, 16, 16), (512, 256), (256, 264), (64, 264, 3, 3)],
                         ids=["planes", "planes-many-units", "rows", "rows-odd-groups", "rows-short-planes"])
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


@pytest.mark.parametrize("threads", [2, 16])
def test_concurrent_callers_of_the_worker_pool_match_serial(threads, rng):
    """Inputs big enough for the worker pool, from four Python threads at once: one call holds the pool, the
    others run on their own threads; every result equals the serial one bit for bit."""
    shapes = [(4, 32, 28, 28), (2, 64, 24, 24), (1024, 128), (8, 16, 33, 17)]
    inputs = [random_input(rng, s).astype(np.float32) for s in shapes]
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]

    def run(i, out, steps=15):
        layer = bcnswift.BatchChannelNorm(shapes[i][1], 8, estimate=i % 2 == 1)
        for _ in range(steps):
            y = layer(inputs[i])
            dx = layer.backward(grads[i])
        out[i] = (y, dx, layer.state_dict())

    try:
        bcnswift.set_num_threads(threads)
        serial, parallel = {}, {}
        for i in range(len(shapes)):
            run(i, serial)
        workers = [threading.Thread(target=run, args=(i, parallel)) for i in range(len(shapes))]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        bcnswift.set_num_threads(0)
    for i in range(len(shapes)):
        np.testing.assert_array_equal(parallel[i][0], serial[i][0])
        np.testing.assert_array_equal(parallel[i][1], serial[i][1])
        for k in serial[i][2]:
            np.testing.assert_array_equal(parallel[i][2][k], serial[i][2][k])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_computes_with_threads(rng):
    """A child forked after the parent used its worker threads has none of them; its calls must neither hang
    nor differ (as with multiprocessing's fork start method, or data-loader workers)."""
    x = random_input(rng, (4, 64, 30, 30)).astype(np.float32)
    try:
        bcnswift.set_num_threads(2)
        layer = bcnswift.BatchChannelNorm(64, 8, estimate=False)
        expected = layer(x).copy()
        layer = bcnswift.BatchChannelNorm(64, 8, estimate=False)
        pid = os.fork()
        if pid == 0:  # child: exit status says whether the result matched
            try:
                os._exit(0 if np.array_equal(layer(x), expected) and np.array_equal(layer(x), layer(x)) else 1)
            except BaseException:
                os._exit(2)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.01)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        np.testing.assert_array_equal(layer(x), expected)  # the parent's pool still works
    finally:
        bcnswift.set_num_threads(0)


def test_test_seeds_do_not_depend_on_hash_randomization():
    """The rng fixture's seeds come from the test id alone: the same under any PYTHONHASHSEED."""
    import os
    import subprocess
    import sys
    code = "import sys; sys.path.insert(0, sys.argv[1]); from conftest import seed_of; print(seed_of('a/b.py::t[x]'))"
    here = os.path.dirname(os.path.abspath(__file__))
    seeds = {subprocess.run([sys.executable, "-c", code, here], env={**os.environ, "PYTHONHASHSEED": str(h)},
                            capture_output=True, text=True, check=True).stdout for h in (1, 2, 3)}
    assert len(seeds) == 1 and seeds.pop().strip().isdigit()


def test_num_threads_is_this_threads_alone(rng):
    """`num_threads(n)` sets the count for calls from this thread only, nests, and restores the thread's
    previous setting on exit, also after an exception; results are bitwise those of any other count."""
    x = random_input(rng, (4, 64, 28, 28)).astype(np.float32)  # large enough for the worker pool
    dy = rng.normal(size=x.shape).astype(np.float32)

    def step():
        layer = bcnswift.BatchChannelNorm(64, 8, estimate=False)
        return layer(x), layer.backward(dy)

    try:
        bcnswift.set_num_threads(2)
        expected = step()
        seen = {}
        with bcnswift.num_threads(1) as limit:
            assert bcnswift.get_num_threads() == 1
            assert bcnswift.build_info()["threads_source"] == "num_threads(1) on this thread"
            other = threading.Thread(target=lambda: seen.update(count=bcnswift.get_num_threads()))
            other.start()
            other.join()
            for got, want in zip(step(), expected):
                np.testing.assert_array_equal(got, want)
            with bcnswift.num_threads(np.int64(3)):
                assert bcnswift.get_num_threads() == 3
            with limit:  # the same instance again, inside itself
                assert bcnswift.get_num_threads() == 1
            assert bcnswift.get_num_threads() == 1
        assert seen["count"] == 2  # the other thread kept the process's count
        assert bcnswift.get_num_threads() == 2
        assert bcnswift.build_info()["threads_source"] == "set_num_threads(2)"
        with pytest.raises(KeyError):
            with bcnswift.num_threads(1):
                raise KeyError("inside")
        assert bcnswift.get_num_threads() == 2
        with bcnswift.num_threads(0):  # 0: the process's count
            assert bcnswift.get_num_threads() == 2
    finally:
        bcnswift.set_num_threads(0)
    for bad, error in ((-1, ValueError), (5000, ValueError), (1.0, TypeError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="threads"):
            bcnswift.num_threads(bad)


def test_one_num_threads_instance_entered_by_two_threads():
    """One instance (say, a module-level limit) entered by two threads whose blocks overlap and end in the other
    order: each thread gets its own previous setting back."""
    limit = bcnswift.num_threads(1)
    entered, first_left = threading.Barrier(2, timeout=30), threading.Event()
    after = {}

    def run(name, own, leave_first):
        with bcnswift.num_threads(own):
            with limit:
                entered.wait()  # both inside the same instance's block
                if not leave_first:
                    assert first_left.wait(timeout=30)
                after[name + " inside"] = bcnswift.get_num_threads()
            if leave_first:
                first_left.set()
            after[name] = bcnswift.get_num_threads()

    threads = [threading.Thread(target=run, args=("a", 3, True)), threading.Thread(target=run, args=("b", 4, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert after == {"a inside": 1, "b inside": 1, "a": 3, "b": 4}


def test_thread_count_changed_during_calls_changes_no_bit(rng):
    """Another thread switching the process's thread count between 1 and 16 while calls run: each call sizes its
    per-thread scratch and runs its loops with one count (it pins it), so every result keeps its bits. (Before,
    a count raised between the two handed out slots beyond the scratch: about one call in seven came out wrong.)
    Shapes above the parallel threshold in every layout: rows, short planes, planes, channels-last."""
    def channels_last(a):
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)

    cases = []
    for shape, G, last in [((256, 1024), 32, False), ((64, 512, 2, 2), 32, False), ((32, 256, 3, 3), 32, False),
                           ((8, 64, 32, 32), 8, False), ((8, 64, 32, 32), 8, True)]:
        x = random_input(rng, shape).astype(np.float32)
        dy = rng.normal(0.3, 1.0, shape).astype(np.float32)
        cases.append((shape, G) + ((channels_last(x), channels_last(dy)) if last else (x, dy)))

    def run(shape, G, x, dy):
        layer = bcnswift.BatchChannelNorm(shape[1], G, estimate=False)
        y = layer(x)
        return [y, layer.backward(dy), layer.running_var.copy(), layer.grads["bn.weight"].copy()]

    want = [run(*case) for case in cases]
    stop = threading.Event()

    def toggle():
        i = 0
        while not stop.is_set():
            bcnswift.set_num_threads((1, 16)[i % 2])
            i += 1

    toggler = threading.Thread(target=toggle, daemon=True)
    toggler.start()
    try:
        end, calls = time.monotonic() + 1.5, 0
        while time.monotonic() < end:
            for case, expected in zip(cases, want):
                for got, exp in zip(run(*case), expected):
                    np.testing.assert_array_equal(got, exp, err_msg=f"{case[0]} after {calls} calls")
                calls += 1
    finally:
        stop.set()
        toggler.join(timeout=10)
        bcnswift.set_num_threads(0)
    assert calls >= len(cases)


def test_state_dict_load_and_zero_grad_wait_for_a_running_call(rng):
    """They take the layer's lock, as forward and backward do: never a half-updated buffer (a forward of a large
    layer in another thread gave torn state_dict() snapshots before). So do copy and pickle, which copy the
    arrays under it."""
    layer = bcnswift.BatchChannelNorm(8, 4)
    state = layer.state_dict()
    for call in (layer.state_dict, lambda: layer.load_state_dict(state), layer.zero_grad,
                 lambda: copy.deepcopy(layer), lambda: pickle.dumps(layer)):
        done = threading.Event()
        with layer._lock:  # a call in progress
            t = threading.Thread(target=lambda: (call(), done.set()), daemon=True)
            t.start()
            assert not done.wait(0.2), f"{call} ran during a call"
        assert done.wait(30), f"{call} did not run after the call"
        t.join(30)


def test_a_momentum_loaded_between_a_forwards_checks_and_its_update_is_the_one_used(rng):
    """A review: a forward made its flags (the cumulative-average bit among them) before taking the layer's lock
    and read momentum again under it, so a load_state_dict from another thread in between, switching momentum
    to or from None, paired one's flag with the other's value for that call. The lock-held part now derives the
    bit from the momentum it reads. (White-box: the two halves of `forward`, with the load between them.)"""
    x = random_input(rng, (4, 3, 5))
    for first, then in ((0.1, None), (None, 0.1)):
        layer = bcnswift.BatchChannelNorm(3, 3, momentum=first, variance_around="running_mean",
                                          dtype=np.float64)
        reference = bcnswift.BatchChannelNorm(3, 3, momentum=then, variance_around="running_mean",
                                              dtype=np.float64)
        xl, y, flags, ctx = layer._prepare_forward(x, None)
        speed = np.array([np.nan if then is None else then])  # estbn_moving_speed sets the momentum (NaN: None)
        layer.load_state_dict({**layer.state_dict(), "bn.estbn_moving_speed": speed})
        with layer._lock:
            layer._finish_forward(xl, y, flags, ctx)
        expected = reference(x)
        np.testing.assert_array_equal(y, expected)
        for k, v in reference.state_dict().items():
            np.testing.assert_array_equal(layer.state_dict()[k], v, err_msg=f"{first} -> {then}: {k}")
