"""The threads bcnswift.torch's kernels run on.

PyTorch's CPU operations run on an OpenMP team whose threads keep polling for a while after each operation.
bcnswift's own workers, woken for a kernel right after a convolution, would compete with them for the same cores,
and torch's next operation with bcnswift's polling workers. So by default the kernels run on torch's team
itself: the extension hands their ranges to the OpenMP runtime's ``GOMP_parallel`` (``bcn_set_calling_thread_team``
in the C ABI), whose threads, still polling, take them at once. Without such a runtime (a torch with another
parallel backend, or Windows) the kernels run on the calling thread alone. Results are bitwise identical
whatever runs them (docs/PYTORCH.md, "Threads").
"""
import ctypes
import glob
import os
import warnings

import torch

from .. import _ext, _thread_count
from .._switches import user_stacklevel


def _find_openmp_team():
    """The address of GOMP_parallel as torch's own CPU library resolves it, or 0. dlsym on libtorch_cpu searches
    that library and the ones it links, so this is the OpenMP runtime torch runs its operations on (GNU's libgomp,
    LLVM's libomp or Intel's libiomp5: all export the symbol), whatever else the process has loaded. 0: torch
    built with another parallel backend, a platform without dlopen's RTLD_NOLOAD (Windows), or no such symbol."""
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return 0
    # torch's CPU library where the wheels put it, then its extension module (whose dependencies include it,
    # wherever a distribution installs it)
    paths = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*")))
    for path in paths + [getattr(torch._C, "__file__", "")]:
        if not path:
            continue
        try:
            runtime = ctypes.CDLL(path, mode=noload | os.RTLD_LAZY)  # only as already loaded: torch's own
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


def _forget_team():
    """In a process forked from this one, GNU OpenMP cannot start a parallel region once the parent's team has
    run (torch's own parallel operations hang there), and whether it has run (for torch or for us) is not known
    here. So every forked child runs the kernels on its calling thread, and bcnswift.torch at least does not
    hang (PyTorch's DataLoader workers set one thread anyway)."""
    global _team
    _team = 0  # (native_ops.cpp's own fork handler does the same for the native kernels)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_team)


def _default_threads():
    raw = os.environ.get("BCNSWIFT_TORCH_NUM_THREADS", "").strip()
    if not raw:
        return None
    try:
        return _thread_count(int(raw))
    except (TypeError, ValueError):
        warnings.warn(f"BCNSWIFT_TORCH_NUM_THREADS={raw!r} is not a thread count in [0, 4096]; using torch's "
                      f"threads", RuntimeWarning, stacklevel=user_stacklevel())
        return None


_threads = _default_threads()


def sync_native():
    """Hands the setting to the native operators (native_ops.cpp) when they are loaded: they keep their own copy
    (-1: torch's threads)."""
    try:
        op = torch.ops.bcnswift._native_threads
    except AttributeError:  # not loaded (_native.py hands them the setting once they are)
        return
    op(-1 if _threads is None else _threads)


def set_num_threads(n):
    """Threads for the kernels of bcnswift.torch's operations. None (the default, when BCNSWIFT_TORCH_NUM_THREADS
    is unset): torch's own OpenMP threads, torch.get_num_threads() of them (the calling thread alone if torch runs
    no OpenMP runtime). 1: the calling thread alone. n > 1: bcnswift's own workers. 0: as bcnswift chooses (the
    calling thread's bcnswift.num_threads block, else bcnswift.set_num_threads's count). Results are bitwise
    identical for every choice."""
    global _threads
    _threads = None if n is None else _thread_count(n)
    sync_native()


def get_num_threads():
    """The setting of set_num_threads: None (torch's threads), or a thread count (0: as bcnswift chooses)."""
    return _threads


def uses_torch_threads():
    """Whether the kernels run on torch's own OpenMP threads now (set_num_threads(None) and a runtime found; the
    native kernels find the same one)."""
    return _threads is None and bool(_openmp_team())


def _call(name, args):
    """bcnswift._ext's `name`; out of memory (its MemoryError) raised as torch raises it, torch.OutOfMemoryError,
    the native kernels' type for it."""
    try:
        return getattr(_ext, name)(*args)
    except MemoryError as error:
        raise torch.OutOfMemoryError(str(error)) from error


def _kernel(name):
    """The extension's kernel `name`, run on this module's threads: the calling thread's thread count and team
    set for the call and restored after (with 0, the calling thread's own settings are left as they are)."""
    def run(*args):
        threads, team = _threads, 0
        if threads is None:
            team = _openmp_team()
            threads = torch.get_num_threads() if team else 1
        if not threads:
            return _call(name, args)
        saved_threads = _ext.set_calling_thread_num_threads(threads)
        saved_team = _ext.set_calling_thread_team(team)
        try:
            return _call(name, args)
        finally:
            _ext.set_calling_thread_team(saved_team)
            _ext.set_calling_thread_num_threads(saved_threads)
    run.__name__ = run.__qualname__ = name
    return run
