"""Micro-batch training on real images: batch norm against BCN + Weight Standardization, in one command.

    python3 -m bcnswift.demo                      # every variant at batch sizes 1, 2 and 32 (about a minute)
    python3 -m bcnswift.demo --quick              # a few seconds: the test suite's run
    python3 -m bcnswift.demo --epochs 4 --batch-sizes 1 32 --variants BN BCN-est+WS --out results --json r.json

A small convolutional network on scikit-learn's handwritten digits (1,797 8x8 images; a fixed, stratified
80/20 split), trained with plain numpy for everything but the normalization (convolutions by im2col and matrix
products, SGD with momentum):

    conv3x3(1->16) - norm - ReLU - maxpool2 - conv3x3(16->32) - norm - ReLU - global average pool - linear(32->10)

The variants differ only in "norm" and in whether the convolution weights are standardized (WS):
    BN            bcnswift.BatchNorm (batch statistics)
    GN            bcnswift.ChannelNorm (group norm with per-group affine)
    BCN-est+WS    bcnswift.BatchChannelNorm(estimate=True) and Weight Standardization
    BCN-batch+WS  bcnswift.BatchChannelNorm(estimate=False) and Weight Standardization
Test accuracy is measured in eval mode (running statistics), which is where batch norm trained on micro-batches
suffers. Needs scikit-learn; matplotlib (optional) draws the test-accuracy curves.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import bcnswift
from . import _cli

VARIANTS = ["BN", "GN", "BCN-est+WS", "BCN-batch+WS"]


# ---- layers: numpy, each with forward(x) and backward(dy) -------------------------------------------------

class Conv3x3:
    """3x3 convolution, padding 1, no bias (a normalization follows), by im2col; optional WS on the weight."""

    def __init__(self, cin, cout, rng, dtype, standardize):
        self.w = (rng.normal(0.0, np.sqrt(2.0 / (cin * 9)), (cout, cin, 3, 3))).astype(dtype)
        self.ws = bcnswift.WeightStandardization(eps=1e-5) if standardize else None
        self.grads = {"w": np.zeros_like(self.w)}

    def params(self):
        return {"w": self.w}

    def forward(self, x):
        B, C, H, W = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        cols = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [B, C, H, W, 3, 3]
        cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(B * H * W, C * 9)
        w = self.ws(self.w) if self.ws else self.w
        out = cols @ w.reshape(w.shape[0], -1).T
        self.cache = (x.shape, cols, w)
        return np.ascontiguousarray(out.reshape(B, H, W, -1).transpose(0, 3, 1, 2))

    def backward(self, dout, need_dx=True):
        (B, C, H, W), cols, w = self.cache
        d = dout.transpose(0, 2, 3, 1).reshape(B * H * W, -1)
        dw = (d.T @ cols).reshape(w.shape)
        self.grads["w"] += self.ws.backward(dw) if self.ws else dw
        if not need_dx:
            return None
        dcols = (d @ w.reshape(w.shape[0], -1)).reshape(B, H, W, C, 3, 3)
        dxp = np.zeros((B, C, H + 2, W + 2), dout.dtype)
        for i in range(3):
            for j in range(3):
                dxp[:, :, i:i + H, j:j + W] += dcols[..., i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, 1:-1, 1:-1]


class ReLU:
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class MaxPool2:
    def forward(self, x):
        B, C, H, W = x.shape
        v = x.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, H // 2, W // 2, 4)
        self.arg = v.argmax(axis=-1)
        self.shape = x.shape
        return np.take_along_axis(v, self.arg[..., None], axis=-1)[..., 0]

    def backward(self, dy):
        B, C, H, W = self.shape
        d = np.zeros((B, C, H // 2, W // 2, 4), dy.dtype)
        np.put_along_axis(d, self.arg[..., None], dy[..., None], axis=-1)
        return d.reshape(B, C, H // 2, W // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)


class GlobalAvgPool:
    def forward(self, x):
        self.shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        B, C, H, W = self.shape
        return np.broadcast_to(dy[:, :, None, None] / (H * W), self.shape).copy()


class Linear:
    def __init__(self, cin, cout, rng, dtype):
        self.w = rng.normal(0.0, np.sqrt(1.0 / cin), (cout, cin)).astype(dtype)
        self.b = np.zeros(cout, dtype)
        self.grads = {"w": np.zeros_like(self.w), "b": np.zeros_like(self.b)}

    def params(self):
        return {"w": self.w, "b": self.b}

    def forward(self, x):
        self.x = x
        return x @ self.w.T + self.b

    def backward(self, dy):
        self.grads["w"] += dy.T @ self.x
        self.grads["b"] += dy.sum(axis=0)
        return dy @ self.w


class Norm:
    """A bcnswift normalization layer as a network layer (parameters and gradients by state-dict name)."""

    def __init__(self, variant, channels, groups, dtype, comm=None):
        if variant == "SyncBN":
            self.layer = bcnswift.SyncBatchNorm(channels, dtype=dtype, comm=comm)
        elif variant == "SyncBCN+WS":
            self.layer = bcnswift.SyncBatchChannelNorm(channels, groups, estimate=False, dtype=dtype, comm=comm)
        elif variant == "BN":
            self.layer = bcnswift.BatchNorm(channels, dtype=dtype)
        elif variant == "GN":
            self.layer = bcnswift.ChannelNorm(channels, groups, dtype=dtype)
        else:
            self.layer = bcnswift.BatchChannelNorm(channels, groups, estimate=variant.startswith("BCN-est"),
                                                   dtype=dtype)
        self.grads = self.layer.grads

    def params(self):
        return self.layer.parameters()

    def forward(self, x):
        return self.layer(x)

    def backward(self, dy):
        return self.layer.backward(dy)


class Network:
    def __init__(self, variant, rng, dtype=np.float32, comm=None):
        ws = variant.endswith("+WS")
        self.conv1, self.norm1 = Conv3x3(1, 16, rng, dtype, ws), Norm(variant, 16, 4, dtype, comm)
        self.conv2, self.norm2 = Conv3x3(16, 32, rng, dtype, ws), Norm(variant, 32, 8, dtype, comm)
        self.relu1, self.pool, self.relu2, self.gap = ReLU(), MaxPool2(), ReLU(), GlobalAvgPool()
        self.fc = Linear(32, 10, rng, dtype)
        self.trainable = {"conv1": self.conv1, "norm1": self.norm1, "conv2": self.conv2, "norm2": self.norm2,
                          "fc": self.fc}
        self.dtype = np.dtype(dtype)

    def train(self, mode=True):
        self.norm1.layer.train(mode)
        self.norm2.layer.train(mode)

    def forward(self, x):
        h = self.pool.forward(self.relu1.forward(self.norm1.forward(self.conv1.forward(x))))
        h = self.gap.forward(self.relu2.forward(self.norm2.forward(self.conv2.forward(h))))
        return self.fc.forward(h)

    def backward(self, dlogits):
        d = self.gap.backward(self.fc.backward(dlogits))
        d = self.conv2.backward(self.norm2.backward(self.relu2.backward(d)))
        d = self.pool.backward(d)
        self.conv1.backward(self.norm1.backward(self.relu1.backward(d)), need_dx=False)

    def zero_grad(self):
        for layer in self.trainable.values():
            for g in layer.grads.values():
                g.fill(0)

    def parameters(self):
        """(name, parameter, gradient) triples; parameters are updated in place."""
        for lname, layer in self.trainable.items():
            for pname, p in layer.params().items():
                yield f"{lname}.{pname}", p, layer.grads[pname]


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    p[np.arange(n), labels] -= 1
    return float(loss), p / n


class SGD:
    def __init__(self, net, lr, momentum=0.9, weight_decay=1e-4):
        self.net, self.lr, self.momentum, self.wd = net, lr, momentum, weight_decay
        self.velocity = {}

    def step(self):
        for name, p, g in self.net.parameters():
            v = self.velocity.setdefault(name, np.zeros_like(p))
            v *= self.momentum
            v += g + self.wd * p
            p -= self.lr * v


# ---- data and training --------------------------------------------------------------------------------------

def load_data(seed=0):
    """The digits as [N, 1, 8, 8] in [0, 1], split 80/20 with stratification by a fixed seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("the demo needs scikit-learn: python3 -m pip install '.[demo]'") from None
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)


def matrix_products():
    """What runs numpy's matrix products (every convolution and the linear layer here): numpy's version, and its
    BLAS library with the kernels it chose for this CPU and its threads, as threadpoolctl (a scikit-learn
    dependency) reads them. The accuracies depend on those kernels' rounding (README, "The main job"). numpy's
    BLAS is the one in numpy's own folders (a wheel's numpy.libs), or the only one loaded; scipy brings its own."""
    words = f"numpy {np.__version__}"
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return words
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    home = os.path.dirname(os.path.dirname(os.path.realpath(np.__file__)))
    own = [lib for lib in blas if os.path.realpath(lib.get("filepath", "")).startswith(os.path.join(home, "numpy"))]
    lib = own[0] if own else blas[0] if len(blas) == 1 else None
    if lib is None:
        return words
    kernels = f"{lib['architecture']} kernels, " if lib.get("architecture") else ""
    return (f"{words} on {lib.get('internal_api', 'BLAS')} {lib.get('version') or ''}".rstrip()
            + f" ({kernels}{lib.get('num_threads', '?')} thread(s))")


def evaluate(net, x, y, batch=256):
    net.train(False)
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((net.forward(x[i:i + batch].astype(net.dtype)).argmax(axis=1) == y[i:i + batch]).sum())
    net.train(True)
    return correct / len(x)


def train_run(variant, batch_size, data, epochs, seed, base_lr=0.1, log=print):
    """Trains one variant at one batch size; returns (test accuracy per epoch, seconds)."""
    x_train, x_test, y_train, y_test = data
    rng = np.random.default_rng(seed)
    net = Network(variant, rng)
    opt = SGD(net, lr=base_lr * np.sqrt(batch_size / 32))  # square-root scaling of the step with the batch
    curve = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        total_loss, correct, seen = 0.0, 0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            net.zero_grad()
            logits = net.forward(x_train[idx])
            loss, dlogits = softmax_cross_entropy(logits, y_train[idx])
            net.backward(dlogits)
            opt.step()
            total_loss += loss * len(idx)
            correct += int((logits.argmax(axis=1) == y_train[idx]).sum())
            seen += len(idx)
        acc = evaluate(net, x_test, y_test)
        curve.append(acc)
        log(f"{variant:>12} batch {batch_size:>2} | epoch {epoch + 1}/{epochs} | loss {total_loss / seen:.4f} | "
            f"running train accuracy {100 * correct / seen:5.1f}% | test accuracy (eval) {100 * acc:5.1f}% | "
            f"{time.perf_counter() - t0:5.1f} s")
    return curve, time.perf_counter() - t0


def save_figure(path, title, xlabel, ylabel, draw, legend_size=7, legend_columns=2):
    """A line chart drawn by draw(ax), saved as PNG at `path`; None (and a hint) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (python3 -m pip install '.[demo]')")
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def output_problems(out_dir, json_path):
    """Why the demo's outputs (a figure in `out_dir`, JSON at `json_path`) could not be written, or None: checked
    before training, so that a bad path does not fail after minutes of it."""
    problem = _cli.output_directory_problem(out_dir)
    if problem:
        return f"--out: {problem}"
    problem = _cli.output_file_problem(json_path)
    return problem and f"--json: {problem}"


def write_outputs(out_dir, figure, draw_figure, label, json_path, data):
    """A demo's files: the figure `draw_figure(path)` saves (it returns the path, or None without matplotlib) as
    `figure` in `out_dir`, announced as `label: path`, and `data` as JSON at `json_path` when one is given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = draw_figure(out / figure)
    if png:
        print(f"{label}: {png}")
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n")


def plot(results, path):
    colors = dict(zip(VARIANTS, ["tab:red", "tab:gray", "tab:blue", "tab:green"]))
    styles = {1: ":", 2: "--"}

    def draw(ax):
        for r in results:
            epochs = np.arange(1, len(r["curve"]) + 1)
            ax.plot(epochs, 100 * np.array(r["curve"]), styles.get(r["batch_size"], "-"), marker="o",
                    markersize=3, color=colors.get(r["variant"]), label=f"{r['variant']}, batch {r['batch_size']}")
    return save_figure(path, "Digits 8x8: micro-batch training with bcnswift normalizations", "epoch",
                       "test accuracy, eval mode (%)", draw)


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    distributed = [arg for arg in args if len(arg) > 3 and "--distributed".startswith(arg)]  # as argparse reads
    if distributed:  # its own flags and variants: demo_distributed's parser reads them all
        from . import demo_distributed
        return demo_distributed.main([arg for arg in args if arg not in distributed])
    p = argparse.ArgumentParser(prog="python3 -m bcnswift.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 32])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="directory for the accuracy plot (demo_accuracy.png)")
    p.add_argument("--json", help="write the final table here as a JSON list")
    p.add_argument("--quick", action="store_true", help="one epoch on 300 training images, batch sizes 2 and 32")
    p.add_argument("--distributed", action="store_true",
                   help="under mpiexec: one image per process, local against synchronized statistics, with "
                        "bcnswift.demo_distributed's own flags (python3 -m bcnswift.demo --distributed --help)")
    a = p.parse_args(args)
    if a.epochs < 1 or any(b < 1 for b in a.batch_sizes):
        p.error("epochs and batch sizes must be positive")
    problem = output_problems(a.out, a.json)
    if problem:
        p.error(problem)

    data = load_data(a.seed)
    if a.quick:
        x_train, x_test, y_train, y_test = data
        data = (x_train[:300], x_test, y_train[:300], y_test)
        a.epochs, a.batch_sizes = 1, [2, 32]
    print(f"bcnswift {bcnswift.__version__} demo: {len(data[0])} training and {len(data[1])} test digits, "
          f"{a.epochs} epoch(s), batch sizes {a.batch_sizes}, {bcnswift.get_num_threads()} thread(s); "
          f"matrix products: {matrix_products()}")
    results = []
    for variant in a.variants:
        for bs in a.batch_sizes:
            curve, seconds = train_run(variant, bs, data, a.epochs, a.seed)
            results.append({"variant": variant, "batch_size": bs, "test_accuracy": curve[-1],
                            "seconds": round(seconds, 2), "curve": curve})

    print("\n| variant | batch size | test accuracy (eval) | training time |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['batch_size']} | {100 * r['test_accuracy']:.1f}% | {r['seconds']:.1f} s |")
    table = [{k: r[k] for k in ("variant", "batch_size", "test_accuracy", "seconds")} for r in results]
    write_outputs(a.out, "demo_accuracy.png", lambda path: plot(results, path), "\ntest accuracy curves", a.json, table)
    if a.json:
        print(f"table: {a.json}")
    return results


if __name__ == "__main__":
    _cli.run(main)
