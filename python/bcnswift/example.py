"""A short run of Batch-Channel Normalization, forward and backward, on random data: `python -m bcnswift.example`.

It trains nothing; it shows the layer's surface and checks its gradient against a finite difference."""
import time

import numpy as np

import bcnswift
from bcnswift import _cli


def main():
    rng = np.random.default_rng(0)
    B, C, H, W, G = 2, 64, 28, 28, 32
    x = rng.normal(1.5, 2.0, (B, C, H, W)).astype(np.float32)
    layer = bcnswift.BatchChannelNorm(C, G)  # estimated statistics, float32
    print(f"bcnswift {bcnswift.__version__}: {layer!r}, {bcnswift.get_num_threads()} thread(s)")
    print(f"input  {x.shape} {x.dtype}: mean {x.mean():+.4f}, std {x.std():.4f}")

    dy = rng.normal(size=x.shape).astype(np.float32)
    t0 = time.perf_counter()
    y = layer(x)
    t1 = time.perf_counter()
    dx = layer.backward(dy)
    t2 = time.perf_counter()
    g = y.reshape(B, G, -1)
    print(f"output {y.shape}: per (sample, group) mean within {np.abs(g.mean(-1)).max():.1e} of 0, "
          f"std {g.std(-1).min():.4f}..{g.std(-1).max():.4f}")
    print(f"running_mean moved to {layer.bn.running_mean[:3].round(4)}... "
          f"after {int(layer.bn.num_batches_tracked)} batch(es)")
    print("gradients:", {k: (v.shape, float(np.abs(v).max().round(3))) for k, v in layer.grads.items()})
    # The first call also starts the worker threads and touches fresh pages; the calls after it are the speed.
    fwd, bwd = [], []
    for _ in range(20):
        t = time.perf_counter()
        layer(x)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        layer.backward(dy)
        bwd.append(time.perf_counter() - t)
    print(f"first call: forward {1e6 * (t1 - t0):.0f} us (it starts the worker threads), backward "
          f"{1e6 * (t2 - t1):.0f} us; median of the next 20: forward {1e6 * np.median(fwd):.0f} us, backward "
          f"{1e6 * np.median(bwd):.0f} us")

    # One gradient entry checked by a central difference, in float64, in eval mode (running statistics).
    ref = bcnswift.BatchChannelNorm(C, G, dtype=np.float64).eval()
    ref.load_state_dict(layer.state_dict())
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    ref(x64)
    analytic = ref.backward(dy64)[0, 3, 5, 7]
    h, xp, xm = 1e-5, x64.copy(), x64.copy()
    xp[0, 3, 5, 7] += h
    xm[0, 3, 5, 7] -= h
    numeric = ((ref(xp) - ref(xm)) * dy64).sum() / (2 * h)
    print(f"dL/dx[0,3,5,7]: backward {analytic:.8f}, finite difference {numeric:.8f}")
    assert abs(analytic - numeric) < 1e-5 * max(1.0, abs(numeric)), "gradient check failed"
    print("ok")


if __name__ == "__main__":
    _cli.run(main)
