"""The cost of synchronized statistics: a SyncBatchChannelNorm training step against a local BatchChannelNorm on
the same per-process batch, under MPI; rank 0 prints medians.

    python3 -m bcnswift.bench --sync                      # starts mpiexec -n 2 and -n 4 itself
    mpiexec -n 4 python3 -m bcnswift.bench_sync           # one rank count

Each repeat times the local step, the synchronized step and the allgathers alone, each after a barrier and as the
slowest rank's time, in turn (which runs first alternates). The extra time is the median of the repeats'
differences, synchronized minus local, so that a slow phase of the machine falls on both sides of it. It should be
close to the four allgathers (the forward's header and moments, the backward's header and sums: a few kilobytes
each at C = 256).
"""
import json
import statistics
import sys
import time

import numpy as np

import bcnswift
from . import _cli
from .bench import turn_order
from .distributed import HEADER_BYTES, mpi_world


def slowest_in_turn(comm, fns, repeats):
    """Per function, the slowest rank's seconds in each repeat: every repeat runs each function once after a
    barrier, in turn (reversed every other repeat). Sample r of every list comes from repeat r."""
    from mpi4py import MPI
    for fn in fns:
        fn()
    samples = [[] for _ in fns]
    for r in range(repeats):
        for i in turn_order(len(fns), r):
            comm.Barrier()
            t0 = time.perf_counter()
            fns[i]()
            t = np.array([time.perf_counter() - t0])
            worst = np.empty(1)
            comm.Allreduce(t, worst, op=MPI.MAX)
            samples[i].append(worst[0])
    return samples


def main(shape=(2, 256, 14, 14), groups=32, repeats=200, json_path=None):
    comm = mpi_world()
    rank, size = comm.Get_rank(), comm.Get_size()
    C = shape[1]
    rng = np.random.default_rng(rank)
    x = (rng.normal(size=shape) + 1.0).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    local = bcnswift.BatchChannelNorm(C, groups, estimate=False)
    synced = bcnswift.SyncBatchChannelNorm(C, groups, estimate=False, comm=comm)
    y, dx = np.empty_like(x), np.empty_like(x)

    def step(layer):
        return lambda: (layer(x, out=y), layer.backward(dy, out=dx))

    header = np.zeros(HEADER_BYTES, np.uint8)
    moments, sums = np.zeros(3 * C), np.zeros(2 * C)
    gathers = [(a, np.empty((size, a.size), a.dtype)) for a in (header, moments, header, sums)]

    def exchanges():
        for send, recv in gathers:
            comm.Allgather(send, recv)

    local_s, sync_s, gather_s = slowest_in_turn(comm, [step(local), step(synced), exchanges], repeats)
    t_local, t_sync, t_gather = (statistics.median(s) for s in (local_s, sync_s, gather_s))
    t_extra = statistics.median(b - a for a, b in zip(local_s, sync_s))
    if rank == 0:
        print(f"{size} ranks, [{', '.join(map(str, shape))}] per rank, G = {groups}, float32, forward+backward, "
              f"{bcnswift.get_num_threads()} thread(s) per rank, median of {repeats}: local {t_local * 1e6:.0f} us, "
              f"synchronized {t_sync * 1e6:.0f} us, extra {t_extra * 1e6:.0f} us (median of the differences); "
              f"the four allgathers alone {t_gather * 1e6:.0f} us", flush=True)
        if json_path:
            result = {"ranks": size, "shape_per_rank": list(shape), "groups": groups,
                      "threads_per_rank": bcnswift.get_num_threads(), "repeats": repeats,
                      "local_us": t_local * 1e6, "synchronized_us": t_sync * 1e6,
                      "extra_us": t_extra * 1e6, "allgathers_us": t_gather * 1e6}
            with open(json_path, "w") as f:
                json.dump(result, f, indent=2)
    return t_local, t_sync, t_gather, t_extra


def launch(ranks=(2, 4), threads=None, quick=False, json_path=None):
    """Runs this module under mpiexec (the one next to the interpreter, from the mpich wheel) for each count, with
    `threads` kernel threads a rank (None: BCNSWIFT_NUM_THREADS, else 1) and 50 repeats if `quick` (else 200);
    returns each count's figures, and writes them at `json_path` ({"build_info", "sync": [one per count]}). Exits
    with an error if there is no mpiexec: a benchmark that ran nothing must not pass."""
    import os
    import shutil
    import subprocess
    import tempfile
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("bcnswift.bench --sync: no mpiexec beside the interpreter or on PATH: pip install '.[mpi]'")
    env = dict(os.environ, BCNSWIFT_NUM_THREADS=str(threads) if threads else
               os.environ.get("BCNSWIFT_NUM_THREADS", "1"))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for n in ranks:
            part = os.path.join(scratch, f"{n}.json")
            subprocess.run([mpiexec, "-n", str(n), "-hosts", "127.0.0.1", sys.executable, "-m",
                            "bcnswift.bench_sync", "--repeats", str(50 if quick else 200), "--json", part],
                           env=env, timeout=600, check=True)
            with open(part) as f:
                results.append(json.load(f))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"build_info": bcnswift.build_info(), "sync": results}, f, indent=2)
    return results


def _command_line(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python3 -m bcnswift.bench_sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200, help="timed repeats a figure (default 200)")
    p.add_argument("--json", metavar="FILE", help="rank 0 writes its figures here")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be positive, got {a.repeats}")
    return main(repeats=a.repeats, json_path=a.json)


if __name__ == "__main__":
    _cli.run(_command_line)
