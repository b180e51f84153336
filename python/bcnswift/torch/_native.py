"""bcnswift.torch's native operators (native_ops.cpp): the CPU kernels of its normalization ops in C++, built
once per torch installation with the system's C++ compiler (the one torch.compile uses on the CPU), cached, and
loaded when bcnswift.torch is imported.

Their Python kernels (_ops.py) cost an op tens of microseconds a call around the Swift kernels, several times
that in a training step; the C++ ones about a microsecond, with the same checks, layouts and bits. Without a
compiler, or with ``BCNSWIFT_TORCH_NATIVE=0``, the ops keep their Python kernels (one warning when a build
was tried and failed). The build takes about 15 seconds, once: the library is kept under
``$BCNSWIFT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/bcnswift``, else ``~/.cache/bcnswift``), named by a hash of
its source, the torch it is built against and the compiler, so another torch or a new bcnswift builds afresh.
Processes that start together (an mpiexec or torchrun launch) build it once, under a file lock.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

from . import _threads

SOURCE = Path(__file__).with_name("native_ops.cpp")
HEADER = Path(__file__).resolve().parent.parent / "_c_api.h"
#: the environment variable that turns the native operators off ("0"); on by default
ENVIRONMENT = "BCNSWIFT_TORCH_NATIVE"
_BUILD_SECONDS = 600

#: why the native operators are not in use (None: they are), for bcnswift.torch.native_info()
reason = "not loaded yet"


def uses_native_operators():
    """Whether bcnswift.torch's ops run their C++ kernels (native_ops.cpp). False: their Python kernels, because
    BCNSWIFT_TORCH_NATIVE=0, or no C++ compiler, or a build that failed (which warned, with the compiler's
    words). The results are the same bits either way; the native kernels save tens of microseconds a call."""
    return reason is None


def wanted():
    return os.environ.get(ENVIRONMENT, "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler():
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return shutil.which(cxx) or cxx
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


def _cache_dir():
    chosen = os.environ.get("BCNSWIFT_CACHE_DIR", "").strip()
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "bcnswift"


def _command(cxx, output):
    root = Path(torch.__file__).resolve().parent
    include, lib = root / "include", root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [cxx, "-O2", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", f"-I{HEADER.parent}", str(SOURCE), "-o", str(output),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _library_path(cxx):
    """Where the library built by `cxx` for this torch lives: named by a hash of everything that shapes it."""
    resolved = Path(cxx).resolve()
    stat = resolved.stat()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), HEADER.read_bytes(), torch.__version__.encode(), torch.__file__.encode(),
                 f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}".encode(), sys.version.encode(),
                 " ".join(_command("c++", "out")).encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"torch-native-{torch.__version__.split('+')[0]}-{key.hexdigest()[:16]}.so"


def _build(cxx, path):
    """Compiles the library to `path` unless another process already has (the lock makes the others wait)."""
    import fcntl  # POSIX; on other systems the import fails and the Python kernels serve

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            built = Path(scratch) / path.name
            done = subprocess.run(_command(cxx, built), capture_output=True, text=True, timeout=_BUILD_SECONDS)
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
                raise RuntimeError(f"{cxx} failed (exit {done.returncode}):\n{tail}")
            os.replace(built, path)


def load():
    """Builds (if needed) and loads the native operators; returns whether they are in use. Called once, by
    _ops.py, after it has defined the ops (whose CPU kernels the library registers)."""
    global reason
    if not wanted():
        reason = f"{ENVIRONMENT}=0"
        return False
    cxx = _compiler()
    if cxx is None:
        reason = "no C++ compiler (c++, g++ or clang++ on PATH, or $CXX)"
        warnings.warn(f"bcnswift.torch: {reason}, so its ops run their Python kernels, tens of microseconds slower "
                      f"a call (set {ENVIRONMENT}=0 to not try)", RuntimeWarning, stacklevel=3)
        return False
    try:
        path = _library_path(cxx)
        if not path.exists():
            _build(cxx, path)
        torch.ops.load_library(str(path))
        # finds the kernels' C ABI table (now, under the GIL, not on a first call), then registers the CPU kernels
        torch.ops.bcnswift._native_enable()
    except Exception as error:  # noqa: BLE001 - any failure leaves the Python kernels in place
        reason = f"the build or load failed: {error}"
        warnings.warn(f"bcnswift.torch: its native operators could not be built or loaded, so its ops run their "
                      f"Python kernels, tens of microseconds slower a call (set {ENVIRONMENT}=0 to not try): "
                      f"{error}", RuntimeWarning, stacklevel=3)
        return False
    reason = None
    _threads.native = True
    _threads.sync_native()
    return True
