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


_SCRATCH_FAILS = r'''
import json, resource, numpy as np, bcnswift
# channels-last planes of 2 values: the call's scratch (about 13 times the input) is larger than x, y and the context
layer = bcnswift.BatchChannelNorm(1024, 32, estimate=False, channel_axis=-1)
x = np.random.default_rng(0).normal(1.0, 2.0, (1024, 2, 1024)).astype(np.float32)
y = np.empty_like(x)
before = {k: v.copy() for k, v in layer.state_dict().items()}
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (size + (60 << 20), hard))  # the context fits, the scratch does not
try:
    layer(x, out=y)
    raised = None
except MemoryError as e:
    raised = str(e)
resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
unchanged = all(np.array_equal(v, before[k]) for k, v in layer.state_dict().items())
again = layer(x, out=y) is y and bool(np.isfinite(y).all())
print(json.dumps({"raised": raised, "unchanged": unchanged, "again": again}))
'''


def test_a_call_whose_scratch_cannot_be_allocated_raises_memory_error_and_the_process_lives():
    """The kernels' scratch came from Swift's allocate, which stops the process when malloc fails: a valid call
    aborted with 'failed to allocate' (SIGABRT). It raises MemoryError now (C: BCN_ERR_OUT_OF_MEMORY), before
    anything is written, and the next call with memory to spare runs."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, BCNSWIFT_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # no thread to start under the limit
    proc = subprocess.run([sys.executable, "-c", _SCRATCH_FAILS], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["raised"] and "could not allocate" in report["raised"] and "scratch memory" in report["raised"], \
        report
    assert report["unchanged"] and report["again"], report
