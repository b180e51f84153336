"""Run under mpiexec by test_sync_mpi.py: every scenario of sync_scenarios.py over real MPI processes; rank 0
prints one JSON line: {"results": [[rank 0's result, rank 1's, ...] per scenario]}.

    mpiexec -n 4 python mpi_worker.py all          # equality and failure scenarios
    mpiexec -n 2 python mpi_worker.py timeout FILE # the last rank never arrives; rank 0 times out, reports in FILE
    mpiexec -n 2 python mpi_worker.py dead         # the last rank dies before the exchange
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
            ("spatial", S.spatial, {})]
    runs += [(f"failure {case}", S.failure, dict(case=case)) for case in S.FAILURES]
    out = []
    for name, scenario, kw in runs:
        res = scenario(rank, size, comm, **kw)
        out.append({"name": name, "ranks": comm.gather(res, root=0)})
    if rank == 0:
        print(json.dumps({"results": out}), flush=True)


def run_timeout():
    layer = bcnswift.SyncBatchChannelNorm(8, 4, estimate=False, dtype=np.float64, comm=comm, timeout=2.0)
    x = np.random.default_rng(S.SEED).normal(size=(2, 8, 3)) + 1.0
    if rank == size - 1:
        time.sleep(6)  # never arrives; then leaves without calling
        sys.exit(0)
    t0 = time.monotonic()
    try:
        layer(x)
        report = {"rank": rank, "raised": None}
    except TimeoutError as e:
        report = {"rank": rank, "raised": "TimeoutError", "seconds": time.monotonic() - t0, "message": str(e),
                  "running_mean_unchanged": bool((layer.running_mean == 0).all())}
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


{"all": run_all, "timeout": run_timeout, "dead": run_dead}[sys.argv[1]]()
