"""The threads bcnswift.torch's kernels run on.

PyTorch's CPU operations run on an OpenMP team whose threads keep polling for a while after each operation.
bcnswift's own workers, woken for a kernel right after a convolution, would compete with them for the same cores,
and torch's next operation with bcnswift's polling workers. So by default the kernels run on torch's team
itself: the extension hands their ranges to the OpenMP runtime's ``GOMP_parallel`` (``bcn_set_calling_thread_team``
in the C ABI), whose threads, still polling, take them at once. Without such a runtime in the process the kernels
run on the calling thread alone. Results are bitwise identical whatever runs them (docs/PYTORCH.md, "Threads").
"""
import ctypes
import os
import warnings

import torch

from .. import _ext, _thread_count

# the runtimes that export GOMP_parallel: GNU's, Intel's and LLVM's
_OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def _find_openmp_team():
    """The address of GOMP_parallel in the OpenMP runtime PyTorch runs its operations on, or 0: torch built
    without OpenMP, or no such runtime loaded (only libraries already in the process are looked at, torch's own
    first)."""
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return 0
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[5] for fields in (line.split(None, 5) for line in maps) if len(fields) == 6}
    except OSError:
        return 0
    paths = [p.strip() for p in paths if os.path.basename(p.strip()).startswith(_OPENMP_RUNTIMES)]
    here = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda p: (not p.startswith(here), p)):
        try:
            runtime = ctypes.CDLL(path, mode=noload | os.RTLD_LAZY)
            address = ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        if address:
            return address
    return 0


_team = None  # GOMP_parallel's address (0: none), looked up at the first kernel call


def _openmp_team():
    global _team
    if _team is None:
        _team = _find_openmp_team()
    return _team


def _default_threads():
    raw = os.environ.get("BCNSWIFT_TORCH_NUM_THREADS", "").strip()
    if not raw:
        return None
    try:
        return _thread_count(int(raw))
    except (TypeError, ValueError):
        warnings.warn(f"BCNSWIFT_TORCH_NUM_THREADS={raw!r} is not a thread count in [0, 4096]; using torch's "
                      f"threads")
        return None


_threads = _default_threads()


def set_num_threads(n):
    """Threads for the kernels of bcnswift.torch's operations. None (the default, when BCNSWIFT_TORCH_NUM_THREADS
    is unset): torch's own OpenMP threads, torch.get_num_threads() of them (the calling thread alone if torch runs
    no OpenMP runtime). 1: the calling thread alone. n > 1: bcnswift's own workers. 0: as bcnswift chooses (the
    calling thread's bcnswift.num_threads block, else bcnswift.set_num_threads's count). Results are bitwise
    identical for every choice."""
    global _threads
    _threads = None if n is None else _thread_count(n)


def get_num_threads():
    """The setting of set_num_threads: None (torch's threads), or a thread count (0: as bcnswift chooses)."""
    return _threads


def uses_torch_threads():
    """Whether the kernels run on torch's own OpenMP threads now (set_num_threads(None) and a runtime found)."""
    return _threads is None and bool(_openmp_team())


def _kernel(name):
    """The extension's kernel `name`, run on this module's threads: the calling thread's thread count and team
    set for the call and restored after (with 0, the calling thread's own settings are left as they are)."""
    def run(*args):
        threads, team = _threads, 0
        if threads is None:
            team = _openmp_team()
            threads = torch.get_num_threads() if team else 1
        if not threads:
            return getattr(_ext, name)(*args)
        saved_threads = _ext.set_calling_thread_num_threads(threads)
        saved_team = _ext.set_calling_thread_team(team)
        try:
            return getattr(_ext, name)(*args)
        finally:
            _ext.set_calling_thread_team(saved_team)
            _ext.set_calling_thread_num_threads(saved_threads)
    run.__name__ = run.__qualname__ = name
    return run
