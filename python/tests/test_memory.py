"""The extension leaks nothing: 100,000 forward/backward calls leave the resident memory flat."""
import gc

import numpy as np

import bcnswift


def resident_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4  # pages of 4 KiB


def test_100k_calls_keep_memory_flat():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 1.0, (2, 8, 4, 4)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    layer = bcnswift.BatchChannelNorm(8, 4)
    bad = np.ones((2, 3, 4), np.float32)

    def burst(n):
        for i in range(n):
            layer(x)
            layer.backward(dy)
            if i % 100 == 0:  # error paths must not leak either
                try:
                    layer(bad)
                except ValueError:
                    pass
        gc.collect()

    burst(10_000)  # warm up allocator pools
    before = resident_kib()
    burst(90_000)
    grown = resident_kib() - before
    # A leak of one context (~100 doubles) per call would be ~70 MB; allow allocator noise.
    assert grown < 2048, f"resident memory grew by {grown} KiB over 90,000 calls"
