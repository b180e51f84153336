"""Data-parallel micro-batch training: N processes with one image each, local against synchronized statistics.

    mpiexec -n 4 python3 -m bcnswift.demo --distributed            # about a minute on two cores
    mpiexec -n 4 python3 -m bcnswift.demo --distributed --quick    # a few seconds

The demo's network and digits (bcnswift.demo), in float64, trained by N MPI processes that each see one image
per step (rank r takes the r-th image of each global batch of N) and average their gradients (an allreduce, as
DistributedDataParallel does). The normalization is:
    BN            bcnswift.BatchNorm on each process's single image (local statistics)
    SyncBN        bcnswift.SyncBatchNorm: batch statistics over the N images of all processes
    BCN-est+WS    bcnswift.BatchChannelNorm(estimate=True) + WS, local
    SyncBCN+WS    bcnswift.SyncBatchChannelNorm(estimate=False) + WS: batch statistics over all processes
Rank 0 then trains BCN-batch+WS in one process with batch N on the same global batches: SyncBCN+WS must follow
its loss curve to rounding. Rank 0 prints the table and saves the loss curves (demo_distributed.png).
"""
import argparse
import time

import numpy as np

import bcnswift
from . import _cli
from .demo import (SGD, Network, evaluate, load_data, output_problems, save_figure, softmax_cross_entropy,
                   write_outputs)
from .distributed import mpi_world

VARIANTS = ["BN", "SyncBN", "BCN-est+WS", "SyncBCN+WS"]


def train(variant, data, epochs, seed, comm, ranks, per_rank=1, log=print):
    """Trains `variant` with `ranks` processes of `per_rank` images each (comm None: one process, batch
    ranks·per_rank); returns (mean training loss of each step over the global batch, test accuracy, seconds)."""
    x_train, x_test, y_train, y_test = data
    rank = comm.Get_rank() if comm is not None else 0
    net = Network(variant, np.random.default_rng(seed), np.float64, comm)
    global_batch = ranks * per_rank
    opt = SGD(net, lr=0.1 * np.sqrt(global_batch / 32))
    order_rng = np.random.default_rng(seed + 1)
    losses = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = order_rng.permutation(len(x_train))
        for start in range(0, len(order) - global_batch + 1, global_batch):
            idx = order[start:start + global_batch]
            mine = idx if comm is None else idx[rank * per_rank:(rank + 1) * per_rank]
            net.zero_grad()
            logits = net.forward(x_train[mine].astype(np.float64))
            loss, dlogits = softmax_cross_entropy(logits, y_train[mine])
            net.backward(dlogits)
            if comm is not None:  # DDP's averaging of gradients, and of the loss for the curve
                for _, _, g in net.parameters():
                    total = np.empty_like(g)
                    comm.Allreduce(g, total)
                    g[...] = total / ranks
                total = np.empty(1)
                comm.Allreduce(np.array([loss]), total)
                loss = total[0] / ranks
            opt.step()
            losses.append(loss)
        if rank == 0:
            log(f"{variant:>12} | epoch {epoch + 1}/{epochs} | loss {np.mean(losses[-len(order) // global_batch:]):.4f}"
                f" | {time.perf_counter() - t0:5.1f} s")
    accuracy = evaluate(net, x_test, y_test)
    return np.array(losses), accuracy, time.perf_counter() - t0


def plot(curves, path):
    k = max(1, max(len(v) for v in curves.values()) // 60)

    def draw(ax):
        for name, losses in curves.items():
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k, smooth, "--" if "one process" in name else "-", label=name)
    return save_figure(path, "Digits 8x8, one image per process: local against synchronized statistics", "step",
                       f"training loss (moving average of {k} steps)", draw, legend_size=8, legend_columns=1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m bcnswift.demo --distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--out", default=".", help="directory for demo_distributed.png")
    p.add_argument("--json", help="write the table and the curves' agreement here")
    p.add_argument("--quick", action="store_true", help="one epoch on 200 training images")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error(f"--epochs must be positive, got {a.epochs}")
    comm = mpi_world()
    rank, ranks = comm.Get_rank(), comm.Get_size()
    # rank 0 writes the outputs: it checks their paths, and every rank stops if they cannot be written
    problem = comm.bcast(output_problems(a.out, a.json) if rank == 0 else None, root=0)
    if problem:
        p.error(problem)
    data = load_data(a.seed)
    if a.quick:
        x_train, x_test, y_train, y_test = data
        data, a.epochs = (x_train[:200], x_test, y_train[:200], y_test), 1
    log = print if rank == 0 else (lambda *args, **kw: None)
    log(f"bcnswift {bcnswift.__version__} distributed demo: {ranks} processes, one image each, "
        f"{len(data[0])} training digits, {a.epochs} epoch(s), float64")
    rows, curves = [], {}
    for variant in a.variants:
        losses, acc, seconds = train(variant, data, a.epochs, a.seed, comm, ranks, log=log)
        rows.append({"variant": variant, "processes": ranks, "images per process": 1, "test_accuracy": acc,
                     "final_loss": float(np.mean(losses[-50:])), "seconds": round(seconds, 2)})
        curves[f"{variant}, {ranks} x 1"] = losses
    if rank != 0:
        return None
    result = {"table": rows}
    if "SyncBCN+WS" in a.variants:
        losses, acc, seconds = train("BCN-batch+WS", data, a.epochs, a.seed, None, ranks, per_rank=1, log=log)
        synced = curves[f"SyncBCN+WS, {ranks} x 1"]
        rows.append({"variant": "BCN-batch+WS (one process)", "processes": 1, "images per process": ranks,
                     "test_accuracy": acc, "final_loss": float(np.mean(losses[-50:])), "seconds": round(seconds, 2)})
        curves[f"BCN-batch+WS, one process, batch {ranks}"] = losses
        gap = float(np.max(np.abs(synced - losses)))
        result["max_loss_gap_sync_vs_one_process"] = gap
    print(f"\n| variant | processes x images | test accuracy (eval, rank 0) | loss, last 50 steps | time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['processes']} x {r['images per process']} | {100 * r['test_accuracy']:.1f}% | "
              f"{r['final_loss']:.4f} | {r['seconds']:.1f} s |")
    if "max_loss_gap_sync_vs_one_process" in result:
        print(f"\nSyncBCN+WS over {ranks} x 1 images against one process with batch {ranks}: largest difference of "
              f"the per-step loss over {len(synced)} steps = {result['max_loss_gap_sync_vs_one_process']:.2e}")
    write_outputs(a.out, "demo_distributed.png", lambda path: plot(curves, path), "loss curves", a.json, result)
    return result


if __name__ == "__main__":
    _cli.run(main)
