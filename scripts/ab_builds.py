#!/usr/bin/env python3
"""Two builds of the kernels timed against each other in one process, their calls alternated.

On a shared machine the speed of a process moves by 10-20% with where it runs and when (two processes of the same
build measured 1.19x apart), which hides the effect of most kernel changes when each build runs in its own
process. Here both builds' extension modules are loaded side by side (each carries its own Swift runtime; only
PyInit_* is exported, so they do not collide) and called on the same arrays, round by round, the order reversed
every other round, each round a block of calls per build (so that the other build's worker threads, which poll
for 0.2 ms after a job, are asleep for all but its first call). Within a process the build loaded first measured
up to 12% faster than the same code loaded second, so two processes run, each build loaded first in one: the
geometric mean of their ratios cancels that bias, which is printed too. The Python around the kernels is left
out: this compares kernels, not wrappers. It also checks that both builds give the same bits (outputs, gradients,
running buffers, context).

    python3 scripts/ab_builds.py OLD NEW 8x256x14x14:fb 256x1024:fwd [--channels-last] [--estimate] [--groups 32]
        [--threads 1] [--rounds 21]

OLD and NEW are directories holding a built `bcnswift` package (a source tree's python/ after
`python3 setup.py build_ext --inplace`, or site-packages). Kinds: fwd (training forward), fb (forward then
backward), eval (forward with running statistics). Prints, per shape, new/old: the geometric mean of the two
processes' medians of their rounds' time ratios (each process's interquartile range beside it), and each build's
median time per call. Exits 1 when the builds' bits differ.
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np


def load_kernels(directory, isa):
    """The kernel extension of the bcnswift package in `directory`, for ISA path `isa`, loaded from its file."""
    name = "_ext_" + isa.replace("-", "_")
    files = glob.glob(os.path.join(directory, "bcnswift", name + ".*.so"))
    if len(files) != 1:
        raise SystemExit(f"{directory}: expected one bcnswift/{name}.*.so, found {len(files)}")
    spec = importlib.util.spec_from_file_location("bcnswift." + name, files[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Layer:
    """A BatchChannelNorm layer's arrays for one build: parameters, running buffers, gradients, output."""

    def __init__(self, k, shape, dtype, groups, estimate, channels_last, kind):
        C = shape[1]
        rng = np.random.default_rng(7)
        self.k, self.groups = k, groups
        self.flags = (k.BCN_BATCH_NORM | k.BCN_CHANNEL_NORM
                      | (k.BCN_ESTIMATED if estimate else k.BCN_UNBIASED_RUNNING_VAR)
                      | (k.BCN_TRAINING if kind != "eval" else 0) | (k.BCN_CHANNELS_LAST if channels_last else 0))
        self.params = [(rng.standard_normal(n) * 0.2 + 1).astype(dtype) if i % 2 == 0
                       else (rng.standard_normal(n) * 0.2).astype(dtype) for i, n in enumerate((C, C, groups, groups))]
        self.running = [(rng.standard_normal(C) * 0.1).astype(dtype), (rng.random(C) + 0.5).astype(dtype),
                        np.zeros((), np.int64)]
        self.grads = [np.zeros_like(p) for p in self.params]
        self.context = np.zeros(k.context_length(shape[0], C, groups))

    def forward(self, x, y):
        bw, bb, cw, cb = self.params
        self.k.norm_forward(self.flags, self.groups, 1e-5, 1e-5, 0.1, x, y, bw, bb, *self.running, cw, cb,
                            self.context)

    def backward(self, x, dy, dx):
        self.k.norm_backward(self.flags, self.groups, x, dy, dx, *self.grads, self.context)


def arrays(shape, dtype, channels_last):
    """x and dy with means off 0 (seeded), laid out as asked."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = (rng.standard_normal(shape) + 0.3).astype(dtype)
    if channels_last:
        x, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, dy))
    return x, dy


def compare(old, new, spec, args):
    """{ratio: median of the rounds' new/old times, iqr, old, new: median seconds a call, same: bits equal}."""
    shape_text, kind = spec.split(":")
    shape = tuple(int(s) for s in shape_text.split("x"))
    if kind not in ("fwd", "fb", "eval"):
        raise SystemExit(f"{spec}: the kind is fwd, fb or eval")
    dtype = np.dtype(args.dtype)
    x, dy = arrays(shape, dtype, args.channels_last)
    layers = []  # [old's, new's]: (layer, y, dx)
    for k in (old, new):
        layer = Layer(k, shape, dtype, args.groups, args.estimate, args.channels_last, kind)
        y, dx = np.empty_like(x), np.empty_like(x)
        layer.forward(x, y)
        if kind == "fb":
            layer.backward(x, dy, dx)
        layers.append((layer, y, dx))

    def results(i):  # dx and the gradients only where a backward ran
        layer, y, dx = layers[i]
        return [y, *layer.running, layer.context] + ([dx, *layer.grads] if kind == "fb" else [])

    same = all(np.array_equal(p, q, equal_nan=True) for p, q in zip(results(0), results(1)))

    def block(i, reps):
        layer, y, dx = layers[i]
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            layer.forward(x, y)
            if kind == "fb":
                layer.backward(x, dy, dx)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    block(0, args.reps), block(1, args.reps)  # warm both
    ratios, t_old, t_new = [], [], []
    for r in range(args.rounds):
        t = [0.0, 0.0]
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t[i] = block(i, args.reps)
        ratios.append(t[1] / t[0]), t_old.append(t[0]), t_new.append(t[1])
    q1, q3 = np.percentile(ratios, [25, 75])
    return {"ratio": float(np.median(ratios)), "iqr": [float(q1), float(q3)], "old": float(np.median(t_old)),
            "new": float(np.median(t_new)), "same": same}


def child(args):
    """One process: args.old loaded first (through its package, which picks the ISA path), args.new beside it;
    one JSON line of `compare`'s results per spec."""
    sys.path.insert(0, os.path.abspath(args.old))
    from bcnswift import _ext  # the ISA path this CPU runs, as the package chooses it
    old, new = load_kernels(args.old, _ext.ISA), load_kernels(args.new, _ext.ISA)
    if args.threads:
        old.set_num_threads(args.threads), new.set_num_threads(args.threads)
    for spec in args.specs:
        print(json.dumps({"spec": spec, "isa": _ext.ISA, **compare(old, new, spec, args)}), flush=True)


def run_child(first, second, args):
    options = [f"--groups={args.groups}", f"--dtype={args.dtype}", f"--threads={args.threads}",
               f"--rounds={args.rounds}", f"--reps={args.reps}", "--child"]
    options += ["--channels-last"] * args.channels_last + ["--estimate"] * args.estimate
    done = subprocess.run([sys.executable, os.path.abspath(__file__), first, second, *args.specs, *options],
                          stdout=subprocess.PIPE, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old"), parser.add_argument("new")
    parser.add_argument("specs", nargs="+", metavar="SHAPE:KIND", help="e.g. 8x256x14x14:fb")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--estimate", action="store_true", help="estimated statistics (default: batch)")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=0, help="0: each build's default")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--reps", type=int, default=15, help="calls a round, of which the median counts")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    print(f"threads {args.threads or 'default'}, {args.dtype}, G = {args.groups}, "
          f"{'estimated' if args.estimate else 'batch'} statistics{', channels-last' if args.channels_last else ''}",
          flush=True)
    same = True
    for a, b in zip(run_child(args.old, args.new, args), run_child(args.new, args.old, args)):
        # a: new/old with old loaded first; b: old/new with new loaded first. Each is the true ratio times the
        # bias of the build loaded first, so their quotient's square root is the true ratio
        ratio, bias = math.sqrt(a["ratio"] / b["ratio"]), math.sqrt(a["ratio"] * b["ratio"])
        t_old, t_new = math.sqrt(a["old"] * b["new"]), math.sqrt(a["new"] * b["old"])
        ok = a["same"] and b["same"]
        same &= ok
        print(f"{a['spec']}: new/old {ratio:.3f} (old first {a['ratio']:.3f}, IQR {a['iqr'][0]:.3f}-{a['iqr'][1]:.3f}; "
              f"new first {1 / b['ratio']:.3f}, IQR {1 / b['iqr'][1]:.3f}-{1 / b['iqr'][0]:.3f}; first-loaded bias "
              f"{bias:.3f}); old {t_old * 1e6:.1f} us, new {t_new * 1e6:.1f} us; bits {'same' if ok else 'DIFFER'}",
              flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
