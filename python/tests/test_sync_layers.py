"""The synchronized numpy layers over an in-process transport: threads as ranks, with a transport that has only
Allgather, Get_rank and Get_size (no mpi4py), as a user's own transport would. The same scenarios run over real
MPI processes in test_sync_mpi.py."""
import contextlib
import copy
import pickle
import threading

import numpy as np
import pytest

import bcnswift
import sync_scenarios as S


class ThreadGroup:
    """`size` ranks in one process; Allgather through a barrier (bounded, so a bug cannot hang the suite)."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size

    def run(self, scenario, *args, **kwargs):
        results = [None] * self.size

        def rank(r):
            try:
                results[r] = scenario(r, self.size, _Comm(self, r), *args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported to the test thread
                results[r] = e
                self.barrier.abort()
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "a rank hung"
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results


class _Comm:
    def __init__(self, group, rank):
        self.group, self.rank = group, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.group.size

    def Allgather(self, send, recv):
        g = self.group
        g.slots[self.rank] = np.array(send, copy=True)
        g.barrier.wait()
        for r in range(g.size):
            recv[r] = g.slots[r].reshape(recv[r].shape)
        g.barrier.wait()


class _Pending:
    """An Iallgather request that the other ranks never complete; its poll number `interrupt_at` raises
    KeyboardInterrupt, as Ctrl-C while the exchange waits."""

    def __init__(self, interrupt_at=None):
        self.polls, self.interrupt_at = 0, interrupt_at

    def Test(self):
        self.polls += 1
        if self.polls == self.interrupt_at:
            raise KeyboardInterrupt
        return False


class _Stuck(_Comm):
    """A transport whose exchanges with a timeout never complete (`_Pending`); it keeps the last one's buffers."""
    interrupt_at = None

    def Iallgather(self, send, recv):
        self.buffers = (send, recv)
        return _Pending(self.interrupt_at)

    def Allgather(self, send, recv):
        raise AssertionError("no exchange may run over a communicator with one pending")

    def __eq__(self, other):  # as mpi4py's: another handle of the same communicator is equal
        return isinstance(other, _Stuck) and other.group is self.group

    __hash__ = object.__hash__


@contextlib.contextmanager
def _forgotten_after(comm):
    """The exchange's records of `comm`'s abandoned exchange (distributed._BROKEN, _ABANDONED) removed afterwards,
    so that later tests start clean."""
    from bcnswift import distributed
    try:
        yield distributed
    finally:
        distributed._BROKEN[:] = [c for c in distributed._BROKEN if c is not comm]
        kept = getattr(comm, "buffers", (None,))[0]
        distributed._ABANDONED[:] = [a for a in distributed._ABANDONED if a[1] is not kept]


def _assert_equal_to_single_process(results, tol):
    for rank, res in enumerate(results):
        for what, err in res["errors"].items():
            assert err <= tol, f"rank {rank}: {what} differs from one process by {err:.3g} (seed {S.SEED})"
        assert res["identical"], f"rank {rank}: buffers differ from rank 0's"


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("kind,estimate", [("bcn", False), ("bcn", True), ("bn", False)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_equals_one_process_on_the_concatenated_batch(size, kind, estimate, dtype):
    results = ThreadGroup(size).run(S.equality, kind=kind, estimate=estimate, dtype=dtype)
    _assert_equal_to_single_process(results, 1e-12 if dtype == np.float64 else 1e-5)


@pytest.mark.parametrize("sizes", [[3, 0], [0, 2, 1], [1, 1, 1, 1]])
def test_uneven_and_empty_batches(sizes):
    results = ThreadGroup(len(sizes)).run(S.equality, sizes=sizes, estimate=False)
    _assert_equal_to_single_process(results, 1e-12)
    results = ThreadGroup(len(sizes)).run(S.equality, sizes=sizes, estimate=True, momentum=None)
    _assert_equal_to_single_process(results, 1e-12)


def test_different_spatial_sizes():
    results = ThreadGroup(3).run(S.spatial)
    _assert_equal_to_single_process(results, 1e-12)
    assert results[1]["shape"] == [0, 6, 3, 3]


@pytest.mark.parametrize("case", S.FAILURES)
def test_every_rank_fails_together_and_changes_nothing(case):
    size = 3
    results = ThreadGroup(size).run(S.failure, case)
    kinds = {r["raised"] for r in results}
    assert len(kinds) == 1 and None not in kinds, f"{case}: ranks raised {[r['raised'] for r in results]}"
    expected = S.RAISED.get(case, "ValueError")
    assert kinds == {expected}, f"{case}: {results[0]['message']}"
    for rank, r in enumerate(results):
        assert r["unchanged"], f"{case}: rank {rank} changed its buffers or gradients"
        # (a momentum of "a" fails in the local checks of the finish, made before the exchange)
        one_rank = ("wrong_input_channels", "nan", "bad_dy", "config_type", "momentum_type", "running_var_dtype",
                    "bn_weight_size",
                    "weight_size", "grad_dtype", "out_of_memory")
        own = case in ("all_nan", "eps_zero_empty") or (case in one_rank and rank == size - 1)
        assert (r["cause"] is not None) == own, f"{case}: rank {rank}'s exception has cause {r['cause']}"
        if case in ("wrong_input_channels", "nan", "bad_dy"):
            assert f"rank {size - 1} of {size} failed" in r["message"], r["message"]
        elif case == "config_type":
            assert f"rank {size - 1} of {size} failed: AttributeError" in r["message"], r["message"]
        elif case == "momentum_type":
            assert f"rank {size - 1} of {size} failed: TypeError: momentum must be a number or None, got str 'a'" \
                in r["message"], r["message"]
        elif case in ("all_nan", "eps_zero_empty"):
            assert f"rank 0 of {size} failed (ranks 0, 1, 2 failed)" in r["message"], r["message"]
        elif case in ("running_var_dtype", "bn_weight_size", "weight_size", "grad_dtype"):
            named = {"running_var_dtype": "running_var has dtype float32", "bn_weight_size": "bn_weight has 7",
                     "weight_size": "cn_weight has 5", "grad_dtype": "grad_bn_weight has dtype float32"}[case]
            assert f"rank {size - 1} of {size} failed" in r["message"] and named in r["message"], r["message"]
        elif case == "phase":
            assert "the ranks are in different phases" in r["message"], r["message"]
        elif case == "out_of_memory":
            assert f"rank {size - 1} of {size} failed: MemoryError: Unable to allocate" in r["message"], r["message"]
        elif case == "degenerate":
            assert "more than 1 value" in r["message"] or "one value" in r["message"], r["message"]
        else:  # the setting that differs is named
            assert "disagree across ranks" in r["message"] and f"rank {size - 1}" in r["message"], r["message"]
            named = {"momentum_none": "momentum", "unbiased": "unbiased_running_var"}.get(case, case)
            assert f": {named} is " in r["message"], r["message"]
            if case == "momentum_none":  # a cumulative average is named as such, not by the NaN it travels as
                assert f"momentum is 0.1 on rank 0 but None on rank {size - 1}" in r["message"], r["message"]


@pytest.mark.parametrize("case", ["eps", "momentum_none", "unbiased"])
def test_two_ranks_that_disagree_both_raise_and_change_nothing(case):
    for rank, r in enumerate(ThreadGroup(2).run(S.failure, case)):
        assert r["raised"] == "ValueError" and r["unchanged"], (rank, r)
        assert "disagree across ranks" in r["message"] and "on rank 1" in r["message"], (rank, r)


def test_raise_refuses_merged_moments_that_overflow_on_every_rank_and_changes_nothing():
    """Under nan_policy='raise' the merged moments are checked too: finite double input whose variance overflows
    (here 1e160) raises FloatingPointError on every rank, buffers unchanged, where one process, which checks only
    its input, lets the infinity through (test_numerics.py, docs/DISTRIBUTED.md)."""
    def scenario(rank, size, comm):
        layer = bcnswift.SyncBatchChannelNorm(4, 2, estimate=False, dtype=np.float64, nan_policy="raise",
                                              comm=comm)
        before = {k: v.copy() for k, v in layer.state_dict().items()}
        x = np.random.default_rng(rank).normal(1.0, 1.0, (4, 4, 4, 4)) * 1e160
        try:
            layer(x)
            raised = None
        except FloatingPointError as e:
            raised = str(e)
        unchanged = all(np.array_equal(v, before[k]) for k, v in layer.state_dict().items())
        return {"raised": raised, "unchanged": unchanged}
    for r in ThreadGroup(2).run(scenario):
        assert r["raised"] and "batch moments of channel 0 hold NaN or infinity" in r["raised"], r
        assert r["unchanged"], r


def test_eval_and_channel_statistics_exchange_nothing():
    class Counting(_Comm):
        calls = 0

        def Allgather(self, send, recv):
            Counting.calls += 1
            recv[0] = send

    rng = np.random.default_rng(S.SEED)
    layer = bcnswift.SyncBatchChannelNorm(8, 4, estimate=True, dtype=np.float64, comm=Counting(ThreadGroup(1), 0))
    x = rng.normal(size=(2, 8, 3)) + 1.5
    layer(x)
    assert Counting.calls == 2  # header, then moments
    layer.backward(x - 1.0)
    assert Counting.calls == 2  # estimate mode: no backward exchange
    layer.eval()
    layer(x)
    assert Counting.calls == 2
    batch = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=Counting(ThreadGroup(1), 0))
    batch(x)
    batch.backward(x)
    assert Counting.calls == 6  # two for the forward, two for the backward: a header as the forward's, then sums


# The plain layer's single call keeps numbers between its phases that the sync layer's phased calls compute
# again: on planes (each unit's gradient), on short planes (plane moments and gradients), on one-value planes
# (each unit's sums), and not at all on short planes whose memo would exceed RowsLayout.memoLimit (16 MB: the
# last shape, 1.06M planes of 2 values).
@pytest.mark.parametrize("shape", [(3, 8, 5), (3, 8, 20), (6, 8), (1040, 1024, 2)],
                         ids=["rows", "planes", "rows-one-value", "rows-no-memo"])
def test_one_rank_equals_the_plain_layer_bit_for_bit(shape):
    rng = np.random.default_rng(S.SEED + 1)
    x, dy = rng.normal(size=shape) + 2.0, rng.normal(size=shape) - 0.5
    C = shape[1]
    for estimate in (False, True):
        sync = bcnswift.SyncBatchChannelNorm(C, 2, estimate=estimate, comm=_Comm(ThreadGroup(1), 0))
        plain = bcnswift.BatchChannelNorm(C, 2, estimate=estimate)
        np.testing.assert_array_equal(sync(x), plain(x))
        np.testing.assert_array_equal(sync.backward(dy), plain.backward(dy))
        for k, v in plain.state_dict().items():
            np.testing.assert_array_equal(sync.state_dict()[k], v, err_msg=k)
        for k, v in plain.grads.items():
            np.testing.assert_array_equal(sync.grads[k], v, err_msg=k)


@pytest.mark.parametrize("B,spatial", [(24, ()), (24, (2, 2)), (3, (2, 2)), (16, (3, 3))],
                         ids=["rows", "planes-of-4", "planes-of-4-on-3-samples", "planes-of-9"])
def test_one_rank_equals_the_plain_layer_bit_for_bit_in_float32_lanes(B, spatial):
    """[B, C] float32 with groups of 32 channels, or short planes through the value view (groups of 128 or 288
    values; the view's backward fills its per-value context panel by panel): the backward's Float32 lanes. The
    plain layer's single call records which groups took them; the sync layer's separate phases decide again
    from the same data, and must take the same path: group 0 sits 20 standard deviations off 0 (sign alternating
    by sample), so it takes the Float64 path beside group 1's Float32 lanes."""
    rng = np.random.default_rng(S.SEED + 2)
    C = 64
    x = rng.normal(0.5, 1.0, (B, C) + spatial) + 2.0
    x[:, :32] += np.where(np.arange(B) % 2 == 0, 20.0, -20.0).reshape((B, 1) + (1,) * len(spatial))
    x, dy = x.astype(np.float32), (rng.normal(size=x.shape) - 0.5).astype(np.float32)
    for estimate in (False, True):
        sync = bcnswift.SyncBatchChannelNorm(C, 2, estimate=estimate, comm=_Comm(ThreadGroup(1), 0))
        plain = bcnswift.BatchChannelNorm(C, 2, estimate=estimate)
        np.testing.assert_array_equal(sync(x), plain(x))
        np.testing.assert_array_equal(sync.backward(dy), plain.backward(dy))
        for k, v in plain.grads.items():
            np.testing.assert_array_equal(sync.grads[k], v, err_msg=k)


def test_bad_arguments():
    with pytest.raises(TypeError, match="Allgather"):
        bcnswift.SyncBatchChannelNorm(8, 4, comm=object())
    with pytest.raises(ValueError, match="timeout"):
        bcnswift.SyncBatchNorm(8, comm=_Comm(ThreadGroup(1), 0), timeout=0)


def test_pickle_and_deepcopy_keep_the_state():
    import copy
    layer = bcnswift.SyncBatchChannelNorm(8, 4, comm=_Comm(ThreadGroup(1), 0))
    layer(np.random.default_rng(S.SEED).normal(size=(2, 8, 3)) + 1.0)
    for clone in (copy.deepcopy(layer), copy.copy(layer), pickle.loads(pickle.dumps(layer))):
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[k], v)
            assert not np.shares_memory(clone.state_dict()[k], v), k


def test_a_copy_keeps_the_communicator_and_an_unpickled_one_without_it_refuses_to_train():
    """A copy in the process exchanges over the same communicator. A communicator that does not pickle (mpi4py's
    sub-communicators) cannot go along into a pickle: the unpickled layer refuses to train until given one, where
    it once took COMM_WORLD in its place, exchanging with processes its original never did."""
    import copy
    comm = _Comm(ThreadGroup(1), 0)  # holds a lock: it does not pickle
    layer = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=comm)
    x = np.random.default_rng(S.SEED).normal(1.0, 2.0, (2, 8, 3))
    for clone in (copy.deepcopy(layer), copy.copy(layer)):
        assert clone.comm is comm and clone.synchronizer is not layer.synchronizer
        np.testing.assert_array_equal(clone(x), layer.forward(x))
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.comm is None
    before = {k: v.copy() for k, v in clone.state_dict().items()}
    with pytest.raises(RuntimeError, match="communicator did not pickle .* set its `comm`"):
        clone(x)
    for k, v in clone.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    clone.eval()
    np.testing.assert_array_equal(clone(x), layer.eval()(x))  # eval exchanges nothing
    with pytest.raises(TypeError, match="Allgather"):
        clone.comm = object()
    clone.comm = comm
    clone.train(), layer.train()
    np.testing.assert_array_equal(clone(x), layer(x))


def test_an_empty_batch_in_eval_gives_an_empty_output():
    layer = bcnswift.SyncBatchChannelNorm(8, 4, comm=_Comm(ThreadGroup(1), 0)).eval()
    y = layer(np.zeros((0, 8, 3, 3), np.float32))
    assert y.shape == (0, 8, 3, 3) and y.dtype == np.float32
    with pytest.raises(ValueError, match="channels"):
        layer(np.zeros((0, 7, 3, 3), np.float32))


def _all_empty(rank, size, comm):
    layer = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=comm)
    layer(np.random.default_rng(rank).normal(2.0, 1.0, (3, 8, 4)))  # buffers away from their initial values
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    y = layer(np.zeros((0, 8, 4)))
    dx = layer.backward(np.zeros((0, 8, 4)))
    return {"shapes": (y.shape, dx.shape),
            "unchanged": all(np.array_equal(v, before[k]) for k, v in layer.state_dict().items())}


def test_a_training_batch_empty_on_every_rank_changes_nothing():
    """As a single layer given an empty batch: an empty output, no buffer moved. (It raised 'batch moments of
    channel 0 (count 0.0, M2 0.0) are not moments of the same 0.0 values': the merged moments had no value.)"""
    for r in ThreadGroup(3).run(_all_empty):
        assert r["shapes"] == ((0, 8, 4), (0, 8, 4)) and r["unchanged"], r


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no words for it")


def _exchange(rank, size, comm, case):
    """One moments exchange of the Synchronizer itself, the last rank bringing what a header cannot carry as it
    is: what every rank raised."""
    from bcnswift.distributed import LayerConfig, Synchronizer
    bad = rank == size - 1
    config = LayerConfig(4, 2, 0, 8, 1e-5, 1e-5, 0.1)
    if bad and case == "groups of 5000 digits":
        config = config._replace(groups=10 ** 5000)
    if bad and case == "a momentum array":
        config = config._replace(momentum=np.array(0.1))
    if bad and case == "an eps beyond doubles":
        config = config._replace(eps=10 ** 400)

    def local():
        if bad and case == "a lone surrogate":
            raise ValueError("bad \udcff value")
        if bad and case == "a str that raises":
            raise _Unprintable()
        if bad and case == "a long message":
            raise ValueError("a long message " + "é" * 400)
        if bad and case == "a wrong count":
            return np.zeros(5)
        return np.zeros(12)

    try:
        Synchronizer(comm).moments(config, local)
        return {"raised": None, "message": ""}
    except Exception as e:  # noqa: BLE001 - the test asserts on the type
        return {"raised": type(e).__name__, "message": str(e)}


@pytest.mark.parametrize("case,kind,words", [
    ("groups of 5000 digits", "TypeError", "the layer's groups must be an int, got a int"),
    ("a lone surrogate", "ValueError", "ValueError: bad \\udcff value"),
    ("a str that raises", "RuntimeError", "failed: _Unprintable;"),
    ("a momentum array", None, ""),
    ("an eps beyond doubles", "TypeError", "the layer's eps must be a number, got 1000"),
    ("a long message", "ValueError", "ValueError: a long message éé"),  # cut at a character (below)
    ("a wrong count", "ValueError", "ValueError: moments have 5 values, expected 12"),
])
def test_a_header_is_sent_whatever_this_rank_brings(case, kind, words):
    """Synchronizer._header never raises: an unprintable error, a value no repr can show, an unhashable setting
    reach every rank as this rank's failure (or, for a 0-d array momentum that packs, as a setting), never a
    rank that raised alone while the others waited (the barrier here gives up after 60 s)."""
    results = ThreadGroup(2).run(_exchange, case)
    assert [r["raised"] for r in results] == [kind, kind], results
    assert all(words in r["message"] for r in results), results
    if case == "a long message":  # 256 bytes of UTF-8, cut between two characters: no U+FFFD on any rank
        for r in results:
            quoted = r["message"].split("failed: ", 1)[1].split("; no rank changed")[0]
            assert "\ufffd" not in quoted and 254 <= len(quoted.encode()) <= 256, r["message"]


def test_a_timed_out_exchange_keeps_its_buffers_and_its_communicator_is_refused_after():
    """MPI may still write a late rank's data into a timed-out exchange's receive buffer: it was dropped with the
    exchange's frame, and numpy handed its memory to the next array of that size (test_sync_mpi.py shows it over
    MPI). Every later exchange over that communicator, by any layer, raises at once."""
    comm = _Stuck(ThreadGroup(2), 0)
    x = np.random.default_rng(S.SEED).normal(size=(2, 8, 3)) + 1.5
    layer = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=comm, timeout=0.05)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with _forgotten_after(comm) as distributed:
        with pytest.raises(TimeoutError, match="rank 0: some rank did not reach the statistics exchange"):
            layer(x)
        send, recv = comm.buffers
        assert any(s is send and r is recv for _, s, r in distributed._ABANDONED)
        for again in (layer, bcnswift.SyncBatchNorm(8, dtype=np.float64, comm=comm, timeout=0.05),
                      bcnswift.SyncBatchNorm(8, dtype=np.float64, comm=_Stuck(comm.group, 0), timeout=0.05)):
            with pytest.raises(RuntimeError, match=r"timed out \(or was interrupted\) and is still pending; it "
                                                   "cannot be used again"):
                again(x)
        assert all(np.array_equal(v, layer.state_dict()[k]) for k, v in before.items())
        other = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=_Comm(ThreadGroup(1), 0))
        other(x)  # another communicator is unaffected


def test_timeout_is_an_attribute_as_comm_is():
    """`timeout` reads, sets (checked, used by the next exchange) and shows in repr(), as `comm` reads and sets: it
    was kept apart (layer.timeout raised AttributeError, and assigning it made a new attribute the exchange
    never read)."""
    comm = _Stuck(ThreadGroup(2), 0)
    layer = bcnswift.SyncBatchNorm(8, dtype=np.float64, comm=comm, timeout=30)
    assert layer.timeout == 30.0 and repr(layer).endswith(", timeout=30.0)")
    for bad, kind in (("x", TypeError), (0, ValueError), (-1.0, ValueError), (float("nan"), ValueError)):
        with pytest.raises(kind, match="timeout must be"):
            layer.timeout = bad
    assert layer.timeout == 30.0
    layer.timeout = 0.05
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin.timeout == 0.05 and repr(twin) == repr(layer)
    x = np.random.default_rng(S.SEED).normal(size=(2, 8, 3)) + 1.5
    with _forgotten_after(comm), pytest.raises(TimeoutError, match="within 0.05 s"):
        layer(x)
    layer.timeout = None
    assert layer.timeout is None and "timeout" not in repr(layer)


def test_an_interrupt_while_an_exchange_waits_keeps_its_buffers_and_refuses_its_communicator_after():
    """A KeyboardInterrupt (Ctrl-C: a stuck job is when one comes) while the exchange polls its pending
    Iallgather leaves the collective pending, as a timeout does: its buffers are kept and every later exchange
    over that communicator raises at once (it dropped both: MPI could write into memory numpy reuses, and the
    next exchange paired with the pending one)."""
    comm = _Stuck(ThreadGroup(2), 0)
    comm.interrupt_at = 3  # while it waits
    x = np.random.default_rng(S.SEED).normal(size=(2, 8, 3)) + 1.5
    layer = bcnswift.SyncBatchNorm(8, dtype=np.float64, comm=comm, timeout=30)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with _forgotten_after(comm) as distributed:
        with pytest.raises(KeyboardInterrupt):
            layer(x)
        send, recv = comm.buffers
        assert any(s is send and r is recv for _, s, r in distributed._ABANDONED)
        with pytest.raises(RuntimeError, match=r"timed out \(or was interrupted\) and is still pending"):
            layer(x)
        assert all(np.array_equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_a_count_one_rank_cannot_advance_fails_every_rank_before_the_exchange():
    """A cumulative average (momentum None) divides by the count it advances to: a count at 2^63 - 1 on one rank
    fails every rank together, none changed (that rank alone would otherwise fail after the others had folded the
    batch in). With a momentum the count only counts, as in PyTorch: a negative one trains."""
    results = ThreadGroup(2).run(S.failure, "count_at_largest")
    for r in results:
        assert r["raised"] == "ValueError" and r["unchanged"], r
        assert "rank 1 of 2 failed: ValueError: num_batches_tracked must count batches" in r["message"], r
    results = ThreadGroup(2).run(S.failure, "negative_count")
    assert [(r["raised"], r["count"]) for r in results] == [(None, 1), (None, -4)], results


def test_without_a_communicator_the_layers_exchange_over_mpi_world(monkeypatch):
    """comm=None (the default) is mpi4py's COMM_WORLD, read when the layer is made (here a stand-in, as mpi4py
    may be absent); an assigned comm is the one a layer then reports and exchanges over; None again is the world."""
    from bcnswift import sync_layers
    world, other = _Comm(ThreadGroup(1), 0), _Comm(ThreadGroup(1), 0)
    monkeypatch.setattr(sync_layers, "mpi_world", lambda: world)
    x = np.random.default_rng(S.SEED).normal(1.0, 2.0, (2, 8, 3))
    for layer in (bcnswift.SyncBatchChannelNorm(8, 4, dtype=np.float64), bcnswift.SyncBatchNorm(8, dtype=np.float64)):
        assert layer.comm is world and layer.synchronizer.comm is world
        layer.comm = other
        assert layer.comm is other and layer.synchronizer.comm is other
        layer(x)
        layer.comm = None
        assert layer.comm is world


class _Alone:
    """A one-rank transport that pickles (no lock, no process handle)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        recv[0] = send


def test_a_communicator_that_pickles_goes_along_into_the_pickle():
    layer = bcnswift.SyncBatchNorm(8, dtype=np.float64, comm=_Alone())
    x = np.random.default_rng(S.SEED).normal(1.0, 2.0, (2, 8, 3))
    layer(x)
    clone = pickle.loads(pickle.dumps(layer))
    assert isinstance(clone.comm, _Alone) and clone.comm is not layer.comm
    np.testing.assert_array_equal(clone(x), layer(x))  # it trains, over its own copy of the transport
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[k], v, err_msg=k)


def test_the_exchange_polls_only_with_a_timeout_and_a_transport_that_can():
    """Without a timeout every exchange is the transport's blocking Allgather, even where it has Iallgather; with
    one, Iallgather is polled where the transport has it, and a transport without it waits in Allgather."""
    class Polling(_Alone):
        polls = 0

        def Iallgather(self, send, recv):
            Polling.polls += 1
            recv[0] = send

            class Late:  # arrives at the third test, well within the timeout
                tests = 0

                def Test(self):
                    self.tests += 1
                    return self.tests >= 3
            return Late()

    x = np.random.default_rng(S.SEED).normal(1.0, 2.0, (2, 8, 3))
    expected = bcnswift.BatchNorm(8, dtype=np.float64)(x)
    assert not hasattr(_Alone(), "Iallgather")  # the last case: its output alone shows it waited in Allgather
    for comm, timeout, polls in ((Polling(), None, 0), (Polling(), 60.0, 2), (_Alone(), 60.0, 2)):
        layer = bcnswift.SyncBatchNorm(8, dtype=np.float64, comm=comm, timeout=timeout)
        np.testing.assert_array_equal(layer(x), expected)
        assert Polling.polls == polls, (type(comm).__name__, timeout)


def test_a_rank_that_sends_something_else_than_a_header_is_named():
    """A transport whose other rank is in another collective of the same size (no bcnswift header): every rank
    raises, naming it, and nothing changes."""
    class Stranger(_Alone):
        def Get_size(self):
            return 2

        def Allgather(self, send, recv):
            recv[0] = send
            recv[1] = 7  # whatever the other collective sends

    layer = bcnswift.SyncBatchNorm(8, dtype=np.float64, comm=Stranger())
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="rank 1 sent no bcnswift statistics header"):
        layer(np.random.default_rng(S.SEED).normal(1.0, 2.0, (2, 8, 3)))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
