"""bcnswift: Batch-Channel Normalization and Weight Standardization (Qiao et al.), fused CPU kernels in Swift.

    import numpy as np, bcnswift
    layer = bcnswift.BatchChannelNorm(64, 32)        # estimate=True, float32
    y = layer(x)                                      # x: [B, 64, *]
    dx = layer.backward(dy); layer.grads              # gradients
"""
import operator
import os
import platform
import sys
import threading
import warnings

import numpy as np

from . import _ext
from .layers import BatchChannelNorm, BatchNorm, ChannelNorm, EstimatedBatchNorm
from .sync_layers import SyncBatchChannelNorm, SyncBatchNorm
from .weight_standardization import (WeightStandardization, weight_standardization,
                                     weight_standardization_backward)

__version__ = "0.1.0"
__all__ = ["BatchChannelNorm", "BatchNorm", "EstimatedBatchNorm", "ChannelNorm", "SyncBatchChannelNorm",
           "SyncBatchNorm", "WeightStandardization",
           "weight_standardization", "weight_standardization_backward", "set_num_threads", "get_num_threads",
           "num_threads", "build_info"]

_threads_source = None  # set by set_num_threads(n > 0)


def _environment_threads():
    """(raw BCNSWIFT_NUM_THREADS or None, whether the kernels take it): they read it once, as Swift's Int() parses
    a string (an optional sign and digits, nothing around them), and take it when it is above 0; otherwise they
    use every core."""
    raw = os.environ.get("BCNSWIFT_NUM_THREADS")
    if raw is None or raw == "":
        return None, False
    digits = raw[1:] if raw[:1] in "+-" else raw
    return raw, digits.isascii() and digits.isdigit() and 0 < int(raw) < 2 ** 63  # beyond Int, Int() gives nil


_raw_threads, _taken = _environment_threads()
# The kernels read BCNSWIFT_NUM_THREADS once, when they first need a thread count: have them read it now, when
# this module did, so that a change to the environment after import moves neither (build_info reports it)
_ext.get_num_threads()
if _raw_threads is not None and not _taken:
    warnings.warn(f"BCNSWIFT_NUM_THREADS={_raw_threads!r} is not a positive integer; bcnswift ignores it and uses "
                  f"every core", RuntimeWarning, stacklevel=2)


def _thread_count(n):
    """n as a thread count: any integral type (np.int64 too) in [0, 4096]; bool, float and str refused."""
    if isinstance(n, (bool, np.bool_)):
        raise TypeError(f"number of threads must be an int, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"number of threads must be an int, got {type(n).__name__} {n!r}") from None
    if not 0 <= n <= 4096:
        raise ValueError(f"number of threads must be in [0, 4096], got {n}")
    return n


def set_num_threads(n):
    """Worker threads for later calls (n >= 1), or 0 for the default: BCNSWIFT_NUM_THREADS, else all cores.
    Results are bitwise identical for every thread count. A call uses at most 256 threads (a larger n is
    taken as 256). A thread inside `num_threads` keeps its own count."""
    n = _thread_count(n)
    _ext.set_num_threads(n)
    global _threads_source
    _threads_source = f"set_num_threads({n})" if n > 0 else None


def get_num_threads():
    """Worker threads the calling thread's next call uses (its `num_threads` block's, if it is in one)."""
    return _ext.get_num_threads()


class num_threads:
    """Context manager: bcnswift's worker threads for the calls made from this thread inside the block, n >= 1
    (0: the process's count, as set_num_threads sets it). Other threads keep theirs; on exit the thread's
    previous setting comes back. Results are bitwise identical for every thread count.

        with bcnswift.num_threads(1):   # run on this thread alone, e.g. inside another library's thread pool
            y = layer(x)
    """

    def __init__(self, n):
        self.n = _thread_count(n)
        # per thread, a stack of the settings replaced: one instance may be entered inside itself, and by
        # several threads at once
        self._local = threading.local()

    def __enter__(self):
        saved = self._local.__dict__.setdefault("saved", [])
        saved.append(_ext.set_calling_thread_num_threads(self.n))
        return self

    def __exit__(self, *exc):
        _ext.set_calling_thread_num_threads(self._local.saved.pop())
        return False


def build_info():
    """What this installation is and runs on, for bug reports (``python -m bcnswift`` prints it): version, C ABI
    version, the ISA path in use, the paths this CPU allows and the paths built, the Swift compiler, the thread
    count and where it comes from."""
    local = _ext.set_calling_thread_num_threads(0)  # read this thread's own count (0: none), then put it back
    _ext.set_calling_thread_num_threads(local)
    if local:
        source = f"num_threads({local}) on this thread"
    elif _threads_source is not None:
        source = _threads_source
    elif _taken:
        source = f"BCNSWIFT_NUM_THREADS={_raw_threads}"
    elif _raw_threads is not None:
        source = f"default: all cores (BCNSWIFT_NUM_THREADS={_raw_threads!r} ignored: not a positive integer)"
    else:
        source = "default: all cores"
    return {
        "version": __version__,
        "abi_version": _ext.ABI_VERSION,
        "isa": _ext.ISA,
        "isa_forced": _ext.ISA_FORCED,
        "isa_allowed": list(_ext.ISA_ALLOWED),
        "isa_built": list(_ext.ISA_BUILT),
        "swift_version": _ext.SWIFT_VERSION,
        "threads": get_num_threads(),
        "threads_source": source,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }
