"""Benchmark: bcnswift against the numpy reference, the authors' PyTorch BCNorm (if torch is importable) and
np.copyto of the same tensor, measured in one run with the same thread count.

    python3 -m bcnswift.bench                 # the shapes of the README table
    python3 -m bcnswift.bench --quick         # fewer repetitions
    python3 -m bcnswift.bench --no-reference  # skip the (slow) numpy reference
    python3 -m bcnswift.bench --torch         # PyTorch training steps (bcnswift/torch/bench.py)
    python3 -m bcnswift.bench --sync          # synchronized against local statistics, 2 and 4 MPI ranks
    python3 -m bcnswift.bench --rows --eval --channels-last --peers --json bench.json   # the other tables

A shape's calls (the copies, bcnswift's, PyTorch's) take turns, round by round (`interleaved`), so that a slow
phase of the machine falls on all of them alike; times are medians over the rounds, and a ratio is the median of
the rounds' ratios. `copy` is np.copyto on one thread; `copy Nt` (with PyTorch installed and N > 1 threads) is
torch's copy_ on the benchmark's N threads, the yardstick for work spread over them. `fwd` and `fwd+bwd` write
into preallocated outputs (`out=`), as the copies do, so their ratios to the copy compare the work; `alloc` times
are plain calls that allocate their outputs, as users and PyTorch make them, and the PyTorch ratios compare
those. PyTorch's forward runs under no_grad (no graph recorded), bcnswift's keeps what its backward needs.
(Above 32 MB glibc maps every allocation afresh, and zeroing its pages costs as much as a copy.) numpy's OpenBLAS
worker threads spin while idle and take cores from whatever runs next (bcnswift, np.copyto and torch alike), so
the benchmark runs with OPENBLAS_NUM_THREADS=1 unless it is set (it re-executes itself to apply it).
"""
import argparse
import gc
import math
import os
import sys
import statistics
import time

import numpy as np

import bcnswift
from bcnswift import _cli, reference as R

SHAPES = [((2, 64, 56, 56), 32), ((1, 256, 56, 56), 32), ((2, 512, 28, 28), 32), ((8, 256, 14, 14), 32),
          ((32, 64, 32, 32), 32), ((64, 128, 32, 32), 32), ((2, 32, 8, 8), 8)]


def median_time(fn, min_seconds=0.02, repeats=7):
    """Median seconds per call: each repeat runs fn enough times to last min_seconds."""
    return paired_median_times([fn], min_seconds, repeats)[0]


def paired_samples(fns, min_seconds=0.02, repeats=7, pairs=False, gap=0.0):
    """Seconds per call of each of `fns`, one list per function with one sample per repeat: each repeat runs a
    function enough times to last min_seconds, the functions' repeats interleaved, so that a slow phase of the
    machine falls on all of them alike. Sample r of every list comes from round r: for ratios between them, round
    by round. Every other round runs them in reverse order; with pairs=True, fns are pairs (0, 1), (2, 3), ...
    and every other round swaps the two of each pair instead, so that a pair's two alternate and no function runs
    twice in a row across rounds (a reversed list starts with the function the round before ended with, which
    then runs on its own warm caches). `gap`: seconds of idleness before each function's turn, in which the
    worker threads the one before left spinning (bcnswift's 0.2 ms, OpenMP's and ONNX Runtime's) go to sleep,
    so that none takes a core from the next. The garbage collector is off while timing, as in timeit."""
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return _paired_samples(fns, min_seconds, repeats, pairs, gap)
    finally:
        if collecting:
            gc.enable()


def _paired_samples(fns, min_seconds, repeats, pairs, gap):
    inner = []
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        inner.append(max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7))))
    if pairs and len(fns) % 2:
        raise ValueError(f"pairs=True needs an even number of functions, got {len(fns)}")
    samples = [[] for _ in fns]
    for r in range(repeats):
        for i in turn_order(len(fns), r, pairs):
            fn, n = fns[i], inner[i]
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[i].append((time.perf_counter() - t0) / n)
    return samples


def turn_order(count, round_number, pairs=False):
    """The order in which round `round_number` runs `count` timed functions: as listed in even rounds; in odd ones
    reversed, or with pairs=True with the two of each pair (0, 1), (2, 3), ... swapped."""
    order = list(range(count))
    if round_number % 2 == 0:
        return order
    return [i ^ 1 for i in order] if pairs else order[::-1]


def paired_median_times(fns, min_seconds=0.02, repeats=7):
    """Median seconds per call of each of `fns`, timed by `paired_samples`: for ratios between them."""
    return [statistics.median(s) for s in paired_samples(fns, min_seconds, repeats)]


def interleaved(fns, repeats=11, min_seconds=0.02, gap=0.01):
    """{name: seconds per call, one sample per round} of the named functions `fns` (a dict), which take turns
    round by round (`paired_samples`, with `gap`): for `ratio`."""
    names = list(fns)
    return dict(zip(names, paired_samples([fns[n] for n in names], min_seconds, repeats, gap=gap)))


def ratio(a, b):
    """The median over rounds of a[r] / b[r], a and b timed in the same rounds (`interleaved`): unlike a ratio of
    two medians, it never sets one function's slow phase against another's fast one."""
    if len(a) != len(b) or not a:
        raise ValueError(f"ratio needs two equally long, non-empty lists of samples, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


def copies(x, torch=None):
    """{name: call}: np.copyto of `x` into an existing array on one thread ("copy"), and with `torch` and more
    than one thread, torch's copy_ on them ("copy Nt", N the thread count): the yardsticks of a bcnswift call's
    work, on one thread and on the threads bcnswift spreads it over."""
    out = np.empty_like(x)
    fns = {"copy": lambda: np.copyto(out, x)}
    n = bcnswift.get_num_threads()
    if torch is not None and n > 1:
        tx, tout = torch.from_numpy(x), torch.from_numpy(np.empty_like(x))
        fns[f"copy {n}t"] = lambda: tout.copy_(tx)
    return fns


def _copy_names(samples):
    return [k for k in samples if k == "copy" or k.startswith("copy ")]


def copy_times(samples):
    """{"copy us": median, ...}: the copies' (`copies`) medians in microseconds."""
    return {f"{k} us": statistics.median(samples[k]) * 1e6 for k in _copy_names(samples)}


def against_copies(samples, key, prefix):
    """{"<prefix>/copy": ratio, ...}: the call `key`'s ratio to each copy, round by round (`ratio`)."""
    return {f"{prefix}/{k}": ratio(samples[key], samples[k]) for k in _copy_names(samples)}


def us(samples):
    """The median of `samples` (seconds) in microseconds."""
    return statistics.median(samples) * 1e6


def median_interval(values, confidence=0.95):
    """(low, high): a distribution-free confidence interval for the median of the population `values` were
    drawn from, the k-th smallest and k-th largest value, k the largest with P(Binomial(n, 1/2) < k) <=
    (1 - confidence) / 2. Too few values for that confidence (n < 6 at 95%) give the whole range."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n
        if below > (1 - confidence) / 2:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k else (xs[0], xs[-1])


def warm_up(seconds=0.5):
    """Runs a forward+backward for `seconds` before anything is timed: on the machine docs/PERFORMANCE.md was
    measured on, the first row a fresh process timed ran at up to 1.9x its twin row (the same work in the other
    estimate mode)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 64, 56, 56)) + 1).astype(np.float32)
    layer = bcnswift.BatchChannelNorm(64, 32)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        layer.backward(layer(x))


def load_torch(use_torch):
    """torch on bcnswift's thread count, or None when not asked for or not installed."""
    if not use_torch:
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(bcnswift.get_num_threads())
    return torch


def run(shapes, quick=False, reference=True, use_torch=True):
    """The main table: per shape, the copies, bcnswift's calls in both estimate modes and the authors' PyTorch
    BCNorm, interleaved (`interleaved`); then, alone, the numpy transcription of the authors' BCNorm. bcnswift
    computes what the authors' module does (`bench_modes.authors_layer`). Rows are dicts, times in us."""
    from . import bench_modes as M
    threads = bcnswift.get_num_threads()
    torch = load_torch(use_torch)
    repeats = 5 if quick else 11
    print(f"bcnswift {bcnswift.__version__} ({bcnswift.build_info()['isa']}), numpy {np.__version__} "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})"
          + (f", torch {torch.__version__}" if torch else ", torch not installed")
          + f"; {threads} thread(s); float32, training; {repeats} rounds, a shape's calls in turn; medians, and "
            f"ratios as medians of the rounds' ratios")
    warm_up(0.1 if quick else 0.5)
    rows, printer = [], _RowPrinter()
    for shape, G in shapes:
        for row in M.training_rows(shape, G, lambda fns: interleaved(fns, repeats), torch, peer="torch"):
            if reference:
                x, dy = M.inputs(shape)
                ref = R.AuthorsBCNorm(shape[1], G, 1e-5, estimate=row["estimate"])

                def rfb():
                    ref(x)
                    ref.backward(dy)
                row["numpy fwd us"] = median_time(lambda: ref(x), repeats=3, min_seconds=0.0) * 1e6
                row["numpy f+b us"] = median_time(rfb, repeats=3, min_seconds=0.0) * 1e6
            rows.append(row)
            printer(row)
    return rows


class _RowPrinter:
    """Prints rows (dicts) as a markdown table as they come: the header from the first row's keys."""
    def __init__(self):
        self.columns = None

    def __call__(self, row):
        if self.columns is None:
            self.columns = list(row)
            print("| " + " | ".join(self.columns) + " |")
            print("|" + "---|" * len(self.columns))
        print("| " + " | ".join(_cell(c, row.get(c, "")) for c in self.columns) + " |", flush=True)


def _cell(column, v):
    """A table cell: times (" us" columns) with 1 decimal, other floats (ratios) with 2."""
    if isinstance(v, float):
        return f"{v:.1f}" if column.endswith(" us") else f"{v:.2f}"
    return str(v)


def print_table(title, rows):
    """A markdown table of dicts (floats: 1 decimal for times, 2 for ratios); returns the rows."""
    print(f"\n{title}\n")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(_cell(c, r.get(c, "")) for c in columns) + " |", flush=True)
    return rows


def run_modes(modes, quick=False, use_torch=True, shapes=None):
    """The tables named in `modes` ("rows", "eval", "channels_last", "peers"), times in microseconds; each
    shape's calls interleaved (`interleaved`)."""
    from . import bench_modes as M
    repeats = 5 if quick else 11
    torch = load_torch(use_torch)

    def measure(fns):
        return interleaved(fns, repeats)

    big = shapes or [s for s in SHAPES if np.prod(s[0]) >= 8 * 256 * 14 * 14]
    print(f"bcnswift {bcnswift.__version__} ({bcnswift.build_info()['isa']}), {bcnswift.get_num_threads()} "
          f"thread(s), float32, {repeats} rounds, a shape's calls in turn; medians in us, and ratios as medians "
          f"of the rounds' ratios")
    tables = {}
    warm_up(0.1 if quick else 0.5)
    if "rows" in modes:
        tables["rows"] = print_table("Row path (training)", M.rows_table(measure, torch))
    if "eval" in modes:
        tables["eval"] = print_table("Eval forward", M.eval_table(big, measure, torch))
    if "channels_last" in modes:
        tables["channels_last"] = print_table("Channels-last against NCHW (training)",
                                              M.channels_last_table(big, measure))
    if "peers" in modes:
        tables["peers"] = print_table("Peers: BCN with batch statistics",
                                      M.peers_table(big + [((256, 1024), 32)], measure, torch))
    return tables


def _positive(what):
    """An argparse type: a positive int, the error naming `what`."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number of {what}, got {text!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number of {what}, got {text}")
        return n
    parse.__name__ = what  # argparse names the type in some messages
    return parse


#: the flags that only --torch reads (each defaults to None, so that one given shows)
TORCH_FLAGS = ("models", "ways", "estimate", "rounds")


def parse_arguments(argv=None):
    """The command line, checked before any work: one mode (--sync, --torch, or the tables), no flag the mode
    ignores, thread counts and torch models and ways that exist, and a --json path that can be written."""
    p = argparse.ArgumentParser(prog="python3 -m bcnswift.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--no-reference", action="store_true", help="skip the numpy reference")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    p.add_argument("--threads", type=_positive("threads"),
                   help="worker threads, 1 to 4096 (default: bcnswift's default; with --sync, per rank: "
                        "BCNSWIFT_NUM_THREADS, else 1; with --torch, torch's threads, on which bcnswift.torch's "
                        "kernels run too)")
    p.add_argument("--sync", action="store_true",
                   help="the extra time of SyncBatchChannelNorm over a local layer, under mpiexec -n 2 and -n 4")
    p.add_argument("--torch", action="store_true",
                   help="instead: PyTorch training steps, the authors' modules against bcnswift.torch")
    p.add_argument("--models", help="with --torch: models to run, comma-separated (default: small,resnet18)")
    p.add_argument("--ways", help="with --torch: comma-separated '<who> <mode>' (default: authors and bcnswift, "
                                  "eager and compiled); who: authors, bcnswift, batchnorm2d or groupnorm (torch's "
                                  "own, for scale); mode: eager or compiled")
    p.add_argument("--estimate", action="store_true", default=None,
                   help="with --torch: BCN with estimated statistics (the batchnorm2d and groupnorm ways have none)")
    p.add_argument("--rounds", type=_positive("rounds"),
                   help="with --torch: rounds of steps (default 41, 15 with --quick)")
    p.add_argument("--rows", action="store_true", help="the row path: [B, C] and small maps against copy and torch")
    p.add_argument("--eval", action="store_true", help="eval forward against copy")
    p.add_argument("--channels-last", action="store_true", help="channels-last input against NCHW")
    p.add_argument("--peers", action="store_true",
                   help="the authors' BCNorm eager and compiled, JAX jit, ONNX Runtime (whichever is installed)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args(argv)
    tables = [f"--{name.replace('_', '-')}" for name in ("rows", "eval", "channels_last", "peers")
              if getattr(a, name)]
    modes = [flag for flag, on in (("--sync", a.sync), ("--torch", a.torch)) if on] + (tables and ["tables"])
    if len(modes) > 1:
        p.error(f"choose one of --sync, --torch and the tables ({', '.join(tables) or '--rows ...'}): "
                f"got {', '.join(m if m != 'tables' else ' '.join(tables) for m in modes)}")
    if a.torch and a.no_torch:
        p.error("--torch and --no-torch contradict each other")
    if a.torch and a.no_reference:
        p.error("--no-reference does not apply with --torch (its steps have no numpy reference)")
    if not a.torch:
        given = [f"--{name}" for name in TORCH_FLAGS if getattr(a, name) is not None]
        if given:
            p.error(f"{', '.join(given)} only apply with --torch")
    if a.sync and (a.no_reference or a.no_torch):
        p.error("--no-reference and --no-torch do not apply with --sync")
    if a.threads is not None and a.threads > 4096:
        p.error(f"--threads must be at most 4096, got {a.threads}")
    if a.torch:
        try:
            from bcnswift.torch import bench as torch_bench
        except ImportError as e:
            p.error(f"--torch needs PyTorch (python3 -m pip install '.[torch]'): {e}")
        a.models = ",".join(torch_bench.MODELS).split(",") if a.models is None else a.models.split(",")
        unknown = [m for m in a.models if m not in torch_bench.MODELS]
        if unknown:
            p.error(f"unknown --models {', '.join(map(repr, unknown))}: choose from {', '.join(torch_bench.MODELS)}")
        a.ways = list(torch_bench.WAYS) if a.ways is None else a.ways.split(",")
        try:
            for way in a.ways:
                torch_bench.check_way(way)
        except ValueError as e:
            p.error(str(e))
    problem = _cli.output_file_problem(a.json)
    if problem:
        p.error(f"--json: {problem}")
    return a


def main(argv=None):
    if "OPENBLAS_NUM_THREADS" not in os.environ and argv is None:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "bcnswift.bench"] + sys.argv[1:])
    a = parse_arguments(argv)
    if a.sync:
        from bcnswift import bench_sync
        bench_sync.launch(threads=a.threads, quick=a.quick, json_path=a.json)
        return
    if a.threads:
        bcnswift.set_num_threads(a.threads)
    if a.torch:
        from bcnswift.torch import bench as torch_bench
        rounds = a.rounds or (15 if a.quick else 41)
        torch_bench.run(models=a.models, ways=a.ways, repeats=rounds, estimate=bool(a.estimate), json_path=a.json,
                        threads=a.threads)
        return
    modes = [m for m, on in (("rows", a.rows), ("eval", a.eval), ("channels_last", a.channels_last),
                             ("peers", a.peers)) if on]
    if modes:
        tables = run_modes(modes, quick=a.quick, use_torch=not a.no_torch)
    else:
        rows = run(SHAPES, quick=a.quick, reference=not a.no_reference, use_torch=not a.no_torch)
        tables = {"main": rows}
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump({"build_info": bcnswift.build_info(), "tables": tables}, f, indent=2)


if __name__ == "__main__":
    _cli.run(main)
