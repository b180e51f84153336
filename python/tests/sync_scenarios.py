"""Scenarios for the synchronized numpy layers, run by every rank of a group: in-process threads
(test_sync_layers.py, a transport with Allgather only) and real MPI processes (mpi_worker.py under mpiexec).

Each scenario gets (rank, size, comm) and returns a dict of plain numbers and strings that the test asserts on:
relative errors against one process on the concatenated batch, whether this rank's buffers equal rank 0's
(checked by a second exchange of their bytes), and what each rank raised. Inputs come from a seed shared by every
rank (printed by the tests), so each rank can rebuild the whole batch and the single-process result itself.
"""
import zlib

import numpy as np

import bcnswift

SEED = zlib.crc32(b"bcnswift sync scenarios")


def rel(a, b):
    """max |a - b| / max |b| (0 when both are empty)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def inputs(seed, sizes, C, S, dtype):
    """Per-rank batches [B_r, C, S...] with non-zero per-channel means, and upstream gradients."""
    rng = np.random.default_rng(seed)
    mean, std = rng.normal(2.0, 1.0, C), rng.uniform(0.5, 3.0, C)
    shape = (1, C) + (1,) * len(S)
    xs = [(rng.normal(size=(b, C) + S) * std.reshape(shape) + mean.reshape(shape)).astype(dtype) for b in sizes]
    dys = [(rng.normal(size=(b, C) + S) + 0.3).astype(dtype) for b in sizes]
    return xs, dys


def gathered_bytes(comm, array):
    """Every rank's copy of `array` (same size everywhere), for checking bitwise identity."""
    a = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    out = np.empty((comm.Get_size(), a.size), np.uint8)
    comm.Allgather(a, out)
    return out


def _state(layer):
    return {k: v for k, v in layer.state_dict().items() if "moving_speed" not in k}


def equality(rank, size, comm, kind="bcn", estimate=False, dtype=np.float64, sizes=None, S=(3, 4), steps=2,
             momentum=0.1, seed=SEED):
    """`steps` training forward+backward steps of a synchronized layer against one process on the concatenated
    batch; then an eval forward and backward (local on every rank, an empty one's too)."""
    C, G = 8, 4
    sizes = sizes or [2 + r % 2 for r in range(size)]
    kw = dict(dtype=dtype, momentum=momentum)
    if kind == "bcn":
        ours = bcnswift.SyncBatchChannelNorm(C, G, estimate=estimate, comm=comm, **kw)
        single = bcnswift.BatchChannelNorm(C, G, estimate=estimate, **kw)
    else:
        ours = bcnswift.SyncBatchNorm(C, comm=comm, **kw)
        single = bcnswift.BatchNorm(C, **kw)
    errors = {"y": 0.0, "dx": 0.0, "grads": 0.0, "buffers": 0.0, "eval": 0.0}
    identical = True
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for step in range(steps):
        xs, dys = inputs(seed + step, sizes, C, S, dtype)
        x_all, dy_all = np.concatenate(xs), np.concatenate(dys)
        ours.zero_grad()
        single.zero_grad()
        y = ours(xs[rank])
        dx = ours.backward(dys[rank])
        y_all = single(x_all)
        dx_all = single.backward(dy_all)
        errors["y"] = max(errors["y"], rel(y, y_all[lo:hi]))
        errors["dx"] = max(errors["dx"], rel(dx, dx_all[lo:hi]))
        # parameter gradients: this rank's contribution; their sum over ranks is the single process's
        for name, g in ours.grads.items():
            total = np.empty((size,) + g.shape, g.dtype)
            comm.Allgather(np.ascontiguousarray(g), total)
            errors["grads"] = max(errors["grads"], rel(total.astype(np.float64).sum(0), single.grads[name]))
        for name, v in _state(ours).items():
            errors["buffers"] = max(errors["buffers"], rel(v, _state(single)[name]))
            copies = gathered_bytes(comm, v)
            identical &= bool((copies == copies[0]).all())
    ours.eval()
    single.eval()
    xs, dys = inputs(seed + 99, sizes, C, S, dtype)
    y, dx = ours(xs[rank]), ours.backward(dys[rank])
    y_all, dx_all = single(np.concatenate(xs)), single.backward(np.concatenate(dys))
    errors["eval"] = max(rel(y, y_all[lo:hi]), rel(dx, dx_all[lo:hi]))
    errors["eval shapes"] = float(y.shape != xs[rank].shape or dx.shape != xs[rank].shape)
    return {"errors": errors, "identical": identical}


def one_sample_each(rank, size, comm, seed=SEED):
    """A training step of float32 [1, 16] on every rank (BCN, two groups of eight channels: the rows' Float32
    lanes), against an extended-precision run of the authors' code on the whole batch: dx's largest error in ulps
    of the largest |dx|. On two ranks the batch norm's statistics rest on two values a channel, where its dx exists
    only through eps (NUMERICS.md): the lanes, which each rank chose by its own [1, C] shape, left tens to
    thousands of ulps there, so the backward takes the batch's count from the forward."""
    from bcnswift import reference as R
    C, G = 16, 2
    xs, dys = inputs(seed, [1] * size, C, (), np.float32)
    layer = bcnswift.SyncBatchChannelNorm(C, G, estimate=False, dtype=np.float32, comm=comm)
    layer(xs[rank])
    dx = layer.backward(dys[rank])
    ref = R.AuthorsBCNorm(C, G, 1e-5)
    ref(np.concatenate(xs).astype(np.longdouble))
    dx_ref = ref.backward(np.concatenate(dys).astype(np.longdouble))
    error = np.abs(dx.astype(np.longdouble) - dx_ref[rank:rank + 1]).max() / np.abs(dx_ref).max()
    identical = all(bool((copies == copies[0]).all())
                    for copies in (gathered_bytes(comm, v) for v in _state(layer).values()))
    return {"errors": {"dx ulps": float(error / np.finfo(np.float32).eps)}, "identical": identical}


def spatial(rank, size, comm, dtype=np.float64, seed=SEED):
    """SyncBatchNorm on ranks with different spatial sizes (one empty) against one BatchNorm over every value:
    the statistics are per channel over all (sample, position) pairs, so [1, C, N] of all values is the same
    batch."""
    C = 6
    rng = np.random.default_rng(seed)
    shapes = [(2, C, 5, 1 + r) if r != 1 else (0, C, 3, 3) for r in range(size)]
    xs = [(rng.normal(size=s) + rng.normal(2.0, 1.0, C).reshape(1, C, 1, 1)).astype(dtype) for s in shapes]
    dys = [(rng.normal(size=s) - 0.2).astype(dtype) for s in shapes]

    def flat(a):
        return a.transpose(1, 0, 2, 3).reshape(C, -1)

    x_all = np.concatenate([flat(a) for a in xs], axis=1)[None]
    dy_all = np.concatenate([flat(a) for a in dys], axis=1)[None]
    ours = bcnswift.SyncBatchNorm(C, dtype=dtype, comm=comm)
    single = bcnswift.BatchNorm(C, dtype=dtype)
    y, dx = ours(xs[rank]), ours.backward(dys[rank])
    y_all, dx_all = single(x_all)[0], single.backward(dy_all)[0]
    offsets = np.cumsum([0] + [flat(a).shape[1] for a in xs])
    part = slice(offsets[rank], offsets[rank + 1])
    errors = {"y": rel(flat(y), y_all[:, part]), "dx": rel(flat(dx), dx_all[:, part])}
    errors["buffers"] = max(rel(v, single.state_dict()[k]) for k, v in ours.state_dict().items())
    identical = True  # every rank's buffers bitwise rank 0's, the empty rank's too
    for v in _state(ours).values():
        copies = gathered_bytes(comm, v)
        identical &= bool((copies == copies[0]).all())
    return {"errors": errors, "shape": list(y.shape), "identical": identical}


def failure(rank, size, comm, case, seed=SEED):
    """One rank (the last) does something wrong, or the layers disagree; returns what this rank raised and
    whether its buffers and gradients stayed as they were."""
    C, G = 8, 4
    bad = rank == size - 1
    kw = dict(estimate=False, dtype=np.float64, comm=comm)
    if case in ("groups", "eps", "bn_eps", "momentum", "momentum_none", "estimate", "dtype", "unbiased",
                "variance_around", "channels") and bad:
        kw.update({"groups": {}, "eps": dict(eps=1e-3), "bn_eps": dict(bn_eps=1e-3), "momentum": dict(momentum=0.2),
                   "momentum_none": dict(momentum=None), "estimate": dict(estimate=True),
                   "dtype": dict(dtype=np.float32), "unbiased": dict(unbiased_running_var=False),
                   "variance_around": dict(estimate=True, variance_around="running_mean"),
                   "channels": {}}[case])
    if case == "variance_around":
        kw["estimate"] = True
    if case == "count_at_largest":  # a cumulative average on every rank, the last unable to advance its count
        kw["momentum"] = None
    channels = C + 4 if case == "channels" and bad else C
    groups = 2 if case == "groups" and bad else G
    policy = "propagate" if case == "nan_policy" and bad else "raise"
    layer = bcnswift.SyncBatchChannelNorm(channels, groups, nan_policy=policy, **kw)
    xs, dys = inputs(seed, [2] * size, C, (3, 3), np.float64)
    x, dy = xs[rank], dys[rank]
    if case == "wrong_input_channels" and bad:
        x = x[:, :C - 1]
    if case == "channels" and bad:
        x = np.concatenate([x, x[:, :4] + 1.0], axis=1)
    if case in ("nan", "nan_policy") and bad or case == "all_nan":  # all_nan: every rank fails, in the same words
        x = x.copy()
        x[1, 2, 0, 1] = np.nan
    if case == "degenerate":
        x = x[:1, :, :1, :1] if rank == 0 else x[:0]
    if case == "momentum_type" and bad:  # set after construction: a header cannot carry it
        layer.momentum = "a"
    if case == "config_type" and bad:  # set after construction: no configuration can be made of it
        layer.dtype = "float64"
    # arrays and values that only the finish after the exchange used to refuse, on one rank (or, eps 0, on an
    # empty rank that finishes with a running update alone, which never read eps)
    if case == "running_var_dtype" and bad:
        layer.bn.running_var = np.ones(C, np.float32)
    if case == "bn_weight_size" and bad:
        layer.bn.weight = np.ones(C - 1)
    if case == "weight_size" and bad:
        layer.weight = np.ones(G + 1)
    if case == "eps_zero_empty":
        layer.eps = 0.0
        x = x[:0] if rank == 0 else x
    if case == "out_of_memory" and bad:  # its context (sized by the batch, cached) cannot be allocated
        layer._context_size = (len(x), 2 ** 59)
    if case in ("count_at_largest", "negative_count") and bad:  # set by hand: no load takes either
        layer.num_batches_tracked[...] = 2 ** 63 - 1 if case == "count_at_largest" else -5
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    result = {"raised": None, "message": ""}
    try:
        if case in BACKWARD_FAILURES:
            layer(x)
            if case == "grad_dtype" and bad:
                layer.grads["bn.weight"] = np.zeros(C, np.float32)
            before = {k: v.copy() for k, v in layer.state_dict().items()}
            grads_before = {k: v.copy() for k, v in layer.grads.items()}
            if case == "phase" and bad:  # a forward, where the others make a backward
                layer(x)
            else:
                layer.backward(dy[:, :, :2] if case == "bad_dy" and bad else dy)
        else:
            layer(x)
    except Exception as e:  # noqa: BLE001 - the test asserts on the type
        # a rank that failed on its own keeps that failure as the cause (its traceback); the others have none
        cause = e.__cause__
        result = {"raised": type(e).__name__, "message": str(e), "cause": cause and type(cause).__name__}
    after = layer.state_dict()
    result["count"] = int(layer.num_batches_tracked)
    result["unchanged"] = all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)
    if case in BACKWARD_FAILURES:
        result["unchanged"] &= all(np.array_equal(grads_before[k], layer.grads[k]) for k in grads_before)
    return result


FAILURES = ["wrong_input_channels", "nan", "all_nan", "bad_dy", "degenerate", "channels", "groups", "eps", "bn_eps",
            "momentum", "momentum_none", "estimate", "dtype", "unbiased", "variance_around", "nan_policy",
            "momentum_type", "config_type", "running_var_dtype", "bn_weight_size", "weight_size", "eps_zero_empty",
            "grad_dtype", "phase", "out_of_memory"]
#: what every rank raises in each case of FAILURES (ValueError where not named)
RAISED = {"nan": "FloatingPointError", "all_nan": "FloatingPointError", "momentum_type": "TypeError",
          "config_type": "RuntimeError", "running_var_dtype": "TypeError", "grad_dtype": "TypeError",
          "phase": "RuntimeError", "out_of_memory": "MemoryError"}
#: the cases that fail in a backward (after a forward that every rank made)
BACKWARD_FAILURES = ("bad_dy", "grad_dtype", "phase")
