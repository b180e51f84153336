"""Run under mpiexec by test_sync_mpi.py: every scenario of sync_scenarios.py over real MPI processes; rank 0
prints one JSON line: {"results": [[rank 0's result, rank 1's, ...] per scenario]}.

    mpiexec -n 4 python mpi_worker.py all          # equality and failure scenarios
    mpiexec -n 2 python mpi_worker.py timeout FILE # the last rank never arrives; rank 0 times out, reports in FILE
    mpiexec -n 2 python mpi_worker.py dead         # the last rank dies before the exchange
    mpiexec -n 2 python mpi_worker.py communicators  # an intercommunicator and MPI.COMM_NULL refused
"""
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bcnswift  # noqa: E402
import sync_scenarios as S  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def run_all():
    runs = [("equality bcn batch f64", S.equality, dict(kind="bcn", estimate=False)),
            ("equality bcn estimate f64", S.equality, dict(kind="bcn", estimate=True)),
            ("equality bn f64", S.equality, dict(kind="bn")),
            ("equality bcn batch f32", S.equality, dict(kind="bcn", estimate=False, dtype=np.float32)),
            ("equality bcn estimate f32", S.equality, dict(kind="bcn", estimate=True, dtype=np.float32)),
            ("uneven with an empty rank", S.equality, dict(sizes=[3] + [0] + [1] * (size - 2), estimate=False)),
            ("spatial", S.spatial, {}),
            ("one sample each f32", S.one_sample_each, {})]
    runs += [(f"failure {case}", S.failure, dict(case=case)) for case in S.FAILURES]
    out = []
    for name, scenario, kw in runs:
        res = scenario(rank, size, comm, **kw)
        out.append({"name": name, "ranks": comm.gather(res, root=0)})
    if rank == 0:
        print(json.dumps({"results": out}), flush=True)


def run_timeout():
    """Rank 0 times out; the last rank arrives late, after it, and joins the collective rank 0 abandoned. Rank 0
    then allocates an array of that exchange's receive buffer's size and drives MPI's progress on another
    communicator: the late rank's data must not land in that array (the abandoned buffers are kept), and a
    second call must refuse the communicator."""
    from bcnswift.distributed import HEADER_BYTES
    other = comm.Dup()  # collective: every rank, first
    layer = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=comm, timeout=2.0)
    x = np.random.default_rng(S.SEED).normal(size=(2, 8, 3)) + 1.0
    if rank == size - 1:
        time.sleep(3.5)  # late: rank 0 has given up
        try:
            layer(x)  # meets rank 0's pending header, then waits for moments that never come
        except TimeoutError:
            pass
        time.sleep(20)  # until rank 0 ends the job
        sys.exit(0)
    t0 = time.monotonic()
    try:
        layer(x)
        report = {"rank": rank, "raised": None}
    except TimeoutError as e:
        report = {"rank": rank, "raised": "TimeoutError", "seconds": time.monotonic() - t0, "message": str(e),
                  "running_mean_unchanged": bool((layer.running_mean == 0).all())}
    # (after the except clause, which kept the exchange's frame, and so its buffers, alive through the exception)
    fresh = np.zeros((size, HEADER_BYTES), np.uint8)  # the size of the abandoned header exchange's recv
    if report["raised"]:
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            other.Iprobe()
            time.sleep(0.01)
        report["fresh_untouched"] = not fresh.any()
        try:
            layer(x)
            report["second_call"] = None
        except Exception as e2:  # noqa: BLE001 - reported
            report["second_call"] = f"{type(e2).__name__}: {e2}"
    # a file, not stdout: the launcher may tear down before it forwards the output of an aborting job
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)
    comm.Abort(0)  # the collective is still pending: end the job, as the docs say


def run_dead():
    layer = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=comm)
    if rank == size - 1:
        os._exit(7)  # dies before the exchange
    layer(np.random.default_rng(S.SEED).normal(size=(2, 8, 3)) + 1.0)
    print(json.dumps({"rank": rank, "raised": None}), flush=True)


def run_communicators():
    """Communicators an exchange cannot use, refused by name when given (constructor or `comm` setter), on each
    rank alone: an intercommunicator (its Allgather gathers the other group's values alone: each rank normalized
    with the other's statistics, silently), and MPI.COMM_NULL, which Split(MPI.UNDEFINED) gives the ranks it
    leaves out (MPI's own error in the first training forward, on those ranks). Then an intracommunicator of the
    same ranks trains."""
    local = comm.Split(rank % 2, rank)
    inter = local.Create_intercomm(0, comm, 1 - rank % 2)
    null = comm.Split(MPI.UNDEFINED if rank == size - 1 else 0, rank)
    report = {"rank": rank}
    for name, given in (("inter", inter), ("null", null if rank == size - 1 else MPI.COMM_NULL)):
        for way in ("constructor", "setter"):
            try:
                if way == "constructor":
                    bcnswift.SyncBatchNorm(3, dtype=np.float64, comm=given)
                else:
                    bcnswift.SyncBatchChannelNorm(6, 3, dtype=np.float64, comm=comm).comm = given
                report[f"{name} {way}"] = None
            except Exception as e:  # noqa: BLE001 - reported
                report[f"{name} {way}"] = f"{type(e).__name__}: {e}"
    merged = inter.Merge(rank % 2)
    layer = bcnswift.SyncBatchNorm(3, dtype=np.float64, comm=merged)
    layer(np.random.default_rng(S.SEED + rank).normal(1.5, 1.0, (4, 3, 2)))
    gathered = comm.allgather(layer.running_mean)
    report["merged trains alike"] = all(np.array_equal(g, gathered[0]) for g in gathered)
    reports = comm.gather(report, root=0)
    if rank == 0:
        print(json.dumps({"results": reports}), flush=True)


{"all": run_all, "timeout": run_timeout, "dead": run_dead, "communicators": run_communicators}[sys.argv[1]]()
