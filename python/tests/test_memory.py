"""Memory: the extension leaks nothing (100,000 forward/backward calls leave the resident memory flat), a call
whose scratch cannot be allocated raises MemoryError, and a call's scratch stays of the input's size."""
import gc

import numpy as np
import pytest

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


_SHORT_PLANES = r'''
import json, resource, sys, numpy as np, bcnswift
B, C, S, G, estimate, kind = json.loads(sys.argv[1])
rng = np.random.default_rng(11)
x = rng.normal(1.5, 2.0, (B, C, S)).astype(np.float32)
dy = rng.normal(-0.5, 1.0, x.shape).astype(np.float32)
y, dx = np.empty_like(x), np.empty_like(x)
layer = bcnswift.ChannelNorm(C, G) if kind == "channel norm" else bcnswift.BatchChannelNorm(C, G, estimate=estimate)
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
budget = 12 * x.nbytes + (96 << 20)  # the context, the scratch (a few times x's size at most) and the allocator's
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (size + budget, hard))
try:
    layer(x, out=y)
    layer.backward(dy, out=dx)
    layer.eval()
    layer(x, out=y)
    raised = None
except MemoryError as e:
    raised = str(e)
resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
print(json.dumps({"raised": raised, "finite": bool(np.isfinite(y).all() and np.isfinite(dx).all())}))
'''


@pytest.mark.parametrize("B, C, S, G, estimate, kind", [
    (2_000_000, 1, 2, 1, False, "bcn"), (2_000_000, 1, 2, 1, True, "bcn"), (600_000, 2, 5, 1, False, "bcn"),
    (500_000, 8, 2, 4, False, "bcn"), (2_000_000, 1, 3, 1, False, "channel norm")])
def test_short_planes_of_few_channels_take_scratch_of_the_inputs_size(B, C, S, G, estimate, kind):
    """Planes of 2 to 15 values took per-thread scratch of 2·B Doubles for every channel of a panel about 256
    channels wide, whatever C was: [2e6, 1, 2] float32 (16 MB) reserved 8 GB and a 152 MB input failed with
    MemoryError on a 23 GB machine; eval and a channel norm alone, which never use it, reserved it too. Under an
    address-space limit of a dozen times the input, each call runs now."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, BCNSWIFT_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # no thread to start under the limit
    proc = subprocess.run([sys.executable, "-c", _SHORT_PLANES, json.dumps([B, C, S, G, estimate, kind])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report == {"raised": None, "finite": True}, report
