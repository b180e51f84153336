"""Benchmark: bcnswift against the numpy reference, the authors' PyTorch BCNorm (if torch is importable) and
np.copyto of the same tensor, measured in one run with the same thread count.

    python3 -m bcnswift.bench                 # the shapes of the README table
    python3 -m bcnswift.bench --quick         # fewer repetitions
    python3 -m bcnswift.bench --no-reference  # skip the (slow) numpy reference
    python3 -m bcnswift.bench --torch         # PyTorch training steps (bcnswift/torch/bench.py)
    python3 -m bcnswift.bench --sync          # synchronized against local statistics, 2 and 4 MPI ranks

Times are medians over repeats; ratios are computed from medians measured in this same run. `fwd` and
`fwd+bwd` write into preallocated outputs (`out=`), as `np.copyto` does, so their ratios to the copy compare the
work; `alloc` times are plain calls that allocate their outputs, as users and PyTorch make them, and the PyTorch
ratios compare those. (Above 32 MB glibc maps every allocation afresh, and zeroing its pages costs as much as a
copy.) numpy's OpenBLAS
worker threads spin while idle and take cores from whatever runs next (bcnswift, np.copyto and torch alike), so
the benchmark runs with OPENBLAS_NUM_THREADS=1 unless it is set (it re-executes itself to apply it).
"""
import argparse
import os
import sys
import statistics
import time

import numpy as np

import bcnswift
from bcnswift import reference as R

SHAPES = [((2, 64, 56, 56), 32), ((1, 256, 56, 56), 32), ((2, 512, 28, 28), 32), ((8, 256, 14, 14), 32),
          ((32, 64, 32, 32), 32), ((64, 128, 32, 32), 32), ((2, 32, 8, 8), 8)]


def median_time(fn, min_seconds=0.02, repeats=7):
    """Median seconds per call: each repeat runs fn enough times to last min_seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_seconds / one))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def torch_bcnorm(num_channels, num_groups, estimate):
    """The authors' BCNorm (with EstBN moving at speed 0.1 when estimating), as in their repository."""
    from bcnswift.torch.reference import BCNorm

    m = BCNorm(num_channels, num_groups, 1e-5, estimate)
    if estimate:
        m.bn.estbn_moving_speed.fill_(0.1)
    return m


def run(shapes, quick=False, reference=True, use_torch=True):
    threads = bcnswift.get_num_threads()
    torch = None
    if use_torch:
        try:
            import torch  # noqa: F811
            torch.set_num_threads(threads)
        except ImportError:
            torch = None
    repeats = 5 if quick else 11
    print(f"bcnswift {bcnswift.__version__}, numpy {np.__version__} (OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})"
          + (f", torch {torch.__version__}" if torch else ", torch not installed")
          + f"; {threads} thread(s); float32, training; median of {repeats} repeats")
    cols = ["shape", "G", "estimate", "copy us", "fwd us", "fwd/copy", "fwd+bwd us", "f+b/copy",
            "alloc fwd us", "alloc f+b us"]
    if torch:
        cols += ["torch fwd us", "torch f+b us", "torch/bcn fwd", "torch/bcn f+b"]
    if reference:
        cols += ["numpy fwd us", "numpy f+b us"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rng = np.random.default_rng(0)
    rows = []
    for shape, G in shapes:
        x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        out, grad = np.empty_like(x), np.empty_like(x)
        copy_t = median_time(lambda: np.copyto(out, x), repeats=repeats)
        for estimate in (True, False):
            layer = bcnswift.BatchChannelNorm(shape[1], G, estimate=estimate)
            # Into preallocated outputs, as np.copyto writes into one: the ratios to the copy compare the work.
            fwd = median_time(lambda: layer(x, out=out), repeats=repeats)

            def fb():
                layer(x, out=out)
                layer.backward(dy, out=grad)
            fb_t = median_time(fb, repeats=repeats)
            # Allocating calls, as users (and PyTorch) make them: what the PyTorch ratios compare.
            fwd_a = median_time(lambda: layer(x), repeats=repeats)

            def fb_alloc():
                layer(x)
                layer.backward(dy)
            fb_a = median_time(fb_alloc, repeats=repeats)
            row = [str(list(shape)), str(G), str(estimate), f"{copy_t * 1e6:.1f}", f"{fwd * 1e6:.1f}",
                   f"{fwd / copy_t:.2f}", f"{fb_t * 1e6:.1f}", f"{fb_t / copy_t:.2f}", f"{fwd_a * 1e6:.1f}",
                   f"{fb_a * 1e6:.1f}"]
            if torch:
                m = torch_bcnorm(shape[1], G, estimate)
                tx = torch.from_numpy(x).requires_grad_(True)
                tdy = torch.from_numpy(dy)

                def tf():
                    with torch.no_grad():
                        m(tx)

                def tfb():
                    tx.grad = None
                    m(tx).backward(tdy)
                t_f = median_time(tf, repeats=repeats)
                t_fb = median_time(tfb, repeats=repeats)
                row += [f"{t_f * 1e6:.1f}", f"{t_fb * 1e6:.1f}", f"{t_f / fwd_a:.1f}", f"{t_fb / fb_a:.1f}"]
            if reference:
                ref = (R.LabmlBatchChannelNorm(shape[1], G, estimate=True) if estimate
                       else R.AuthorsBCNorm(shape[1], G, 1e-5))
                r_f = median_time(lambda: ref(x), repeats=3, min_seconds=0.0)

                def rfb():
                    ref(x)
                    ref.backward(dy)
                r_fb = median_time(rfb, repeats=3, min_seconds=0.0)
                row += [f"{r_f * 1e6:.0f}", f"{r_fb * 1e6:.0f}"]
            rows.append(row)
            print("| " + " | ".join(row) + " |", flush=True)
    return rows


def main(argv=None):
    if "OPENBLAS_NUM_THREADS" not in os.environ and argv is None:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "bcnswift.bench"] + sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--no-reference", action="store_true", help="skip the numpy reference")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    p.add_argument("--threads", type=int, default=0, help="worker threads (default: bcnswift's default)")
    p.add_argument("--sync", action="store_true",
                   help="the extra time of SyncBatchChannelNorm over a local layer, under mpiexec -n 2 and -n 4")
    p.add_argument("--torch", action="store_true",
                   help="instead: PyTorch training steps, the authors' modules against bcnswift.torch")
    p.add_argument("--models", default="small,resnet18", help="with --torch: models to run")
    p.add_argument("--estimate", action="store_true", help="with --torch: BCN with estimated statistics")
    p.add_argument("--json", metavar="FILE", help="with --torch: also write the results as JSON")
    a = p.parse_args(argv)
    if a.threads:
        bcnswift.set_num_threads(a.threads)
    if a.sync:
        from bcnswift import bench_sync
        bench_sync.launch()
        return
    if a.torch:
        from bcnswift.torch import bench as torch_bench
        torch_bench.run(models=a.models.split(","), repeats=7 if a.quick else 15, estimate=a.estimate,
                        json_path=a.json)
        return
    run(SHAPES, quick=a.quick, reference=not a.no_reference, use_torch=not a.no_torch)


if __name__ == "__main__":
    main()
