"""bcnswift.torch's native operators (native_ops.cpp): the CPU kernels of its normalization ops in C++, built
once per torch installation with the system's C++ compiler (the one torch.compile uses on the CPU), cached, and
loaded when bcnswift.torch is imported.

Their Python kernels (_ops.py) cost an op tens of microseconds a call around the Swift kernels, several times
that in a training step; the C++ ones a few microseconds, with the same checks, layouts and bits. Without a
compiler, or with ``BCNSWIFT_TORCH_NATIVE=0``, the ops keep their Python kernels (one warning when a build
was tried and failed). The build takes about 20 seconds here, once: the library is kept under
``$BCNSWIFT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/bcnswift``, else ``~/.cache/bcnswift``), named by a hash of
its source, the torch it is built against and the compiler, so another torch or a new bcnswift builds afresh.
Processes that start together (an mpiexec or torchrun launch) build it once, under a file lock; when that build
fails, the processes that waited for it, and later imports, fail with its words instead of building again, one
after another (delete the ``.failed`` file it names to try again; a new compiler, torch or bcnswift tries anew).
A kept library that does not load is built again, once. A cache directory or library that belongs to another user, or
that every user may write, is not used (another user could have put their code there): the Python kernels serve.
Each build removes the libraries (and records) of the cache that no import has loaded for 30 days: every new torch,
compiler or bcnswift leaves one behind otherwise.
"""
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .._switches import switch
from . import _threads

SOURCE = Path(__file__).with_name("native_ops.cpp")
HEADER = Path(__file__).resolve().parent.parent / "_c_api.h"
#: the environment variable that turns the native operators off ("0"); on by default
ENVIRONMENT = "BCNSWIFT_TORCH_NATIVE"
_BUILD_SECONDS = 600
#: a kept library that no import has loaded for this long is removed by the next build (loading refreshes its
#: modification time, at most once a day)
_UNUSED_SECONDS = 30 * 86400

#: why the native operators are not in use (None: they are), for uses_native_operators() and the warning
reason = "not loaded yet"


def uses_native_operators():
    """Whether bcnswift.torch's ops run their C++ kernels (native_ops.cpp). False: their Python kernels, because
    BCNSWIFT_TORCH_NATIVE=0, or no C++ compiler, or a build that failed (which warned, with the compiler's
    words). The results are the same bits either way; the native kernels save tens of microseconds a call."""
    return reason is None


def wanted():
    return switch(ENVIRONMENT, True)


def _compiler():
    """The compiler's command as a list ($CXX may hold a launcher and flags: "ccache g++"), or None."""
    cxx = shlex.split(os.environ.get("CXX", ""))
    if cxx:
        return [shutil.which(cxx[0]) or cxx[0], *cxx[1:]]
    found = next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)
    return [found] if found else None


def _cache_dir():
    chosen = os.environ.get("BCNSWIFT_CACHE_DIR", "").strip()
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "bcnswift"


def _foreign(path):
    """Why code at `path` (the cache directory, or a library in it) may not be the user's own, or None: it
    belongs to another user, or every user may write it (and so replace what it holds)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        return f"{path} belongs to another user"
    if status.st_mode & 0o002:
        return f"every user may write {path}"
    return None


def _command(cxx, output):
    root = Path(torch.__file__).resolve().parent
    include, lib = root / "include", root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [*cxx, "-O2", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", f"-I{HEADER.parent}", str(SOURCE), "-o", str(output),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _stamp(path):
    """A file's identity for the cache key: path, size, modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _library_path(cxx):
    """Where the library built by `cxx` for this torch lives: named by a hash of everything that shapes it (its
    sources, the compiler and its flags, torch's version, files and CPU library, Python's version)."""
    torch_cpu = sorted((Path(torch.__file__).resolve().parent / "lib").glob("libtorch_cpu.*"))
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), HEADER.read_bytes(), torch.__version__.encode(), torch.__file__.encode(),
                 _stamp(cxx[0]).encode(), " ".join(cxx[1:]).encode(), sys.version.encode(),
                 " ".join(_stamp(p) for p in torch_cpu).encode(), " ".join(_command(["c++"], "out")).encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"torch-native-{torch.__version__.split('+')[0]}-{key.hexdigest()[:16]}.so"


def _identity(path):
    """Which file lies at `path` (None: none): a build puts a new file there (os.replace), so its identity
    changes, whatever its modification time says (a file written a moment before a build started has one as
    recent as the build's)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _build(cxx, path, replace=None):
    """Compiles the library to `path` unless another process already has: unless a file is there, or with
    `replace` (the `_identity` of a library that did not load), unless another file has replaced that one. One
    process builds, under a lock, while the others wait for it. A build that failed fails the
    processes that waited for it, and later imports, with its words, rather than running again in every process
    of a launch and on every import (about 20 s each); its record (`.failed` beside the library) is what to delete
    to try again. A lock held longer than a build can take is given up on."""
    import fcntl  # POSIX; on other systems the import fails and the Python kernels serve

    path.parent.mkdir(parents=True, exist_ok=True)
    failed = path.with_suffix(".failed")
    started = time.time()
    with open(path.with_suffix(".lock"), "w") as lock:
        deadline = started + _BUILD_SECONDS + 60
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise RuntimeError(f"another process has held {lock.name} for {_BUILD_SECONDS + 60} s")
                time.sleep(0.2)
        there = _identity(path)
        if there is not None and (replace is None or there != replace):  # built meanwhile
            return
        if failed.exists():  # failed while this process waited, or remembered from an earlier import
            words = failed.read_text()
            if failed.stat().st_mtime < started - 1:
                words += (f"\n(a build that failed before, not tried again while {failed} is there: delete it to "
                          f"try again)")
            raise RuntimeError(words)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            built = Path(scratch) / path.name
            done = subprocess.run(_command(cxx, built), capture_output=True, text=True, timeout=_BUILD_SECONDS)
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
                message = f"{' '.join(cxx)} failed (exit {done.returncode}):\n{tail}"
                if done.returncode > 0:  # the compiler's verdict; one killed by a signal (OOM) may pass next time
                    failed.write_text(message)
                raise RuntimeError(message)
            with open(built, "rb") as f:
                os.fsync(f.fileno())
            os.replace(built, path)
        failed.unlink(missing_ok=True)
        _prune(path)


def _prune(keep):
    """Removes the cache's libraries, locks and failure records, other than `keep`'s, untouched for
    `_UNUSED_SECONDS` (a library is touched when loaded; a lock when a build takes it). One that another process
    still has loaded stays mapped there; one another process is about to load fails to, and is built again."""
    cutoff = time.time() - _UNUSED_SECONDS
    for old in keep.parent.glob("torch-native-*"):
        if old.stem == keep.stem or old.suffix not in (".so", ".lock", ".failed"):
            continue
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: the cache is only tidied
            pass


def _mark_used(path):
    """Refreshes a loaded library's modification time (at most once a day) so that `_prune` keeps it."""
    try:
        if time.time() - path.stat().st_mtime > 86400:
            os.utime(path)
    except OSError:  # a cache we may read but not write
        pass


def load():
    """Builds (if needed) and loads the native operators; returns whether they are in use. Called once, by
    _ops.py, after it has defined the ops (whose CPU kernels the library registers)."""
    global reason
    if not wanted():
        reason = f"{ENVIRONMENT}={os.environ.get(ENVIRONMENT, '').strip()}"  # 0, off, false or no
        return False
    cxx = _compiler()
    if cxx is None:
        reason = "no C++ compiler (c++, g++ or clang++ on PATH, or $CXX)"
        warnings.warn(f"bcnswift.torch: {reason}, so its ops run their Python kernels, tens of microseconds slower "
                      f"a call (set {ENVIRONMENT}=0 to not try)", RuntimeWarning, stacklevel=3)
        return False
    try:
        path = _library_path(cxx)
        unsafe = _foreign(path.parent)  # before building into it, and the library before loading it
        if not unsafe:
            if not path.exists():
                _build(cxx, path)
            unsafe = _foreign(path)
        if unsafe:
            raise RuntimeError(f"{unsafe}; not loading a library from it (set BCNSWIFT_CACHE_DIR to a directory "
                               f"of your own)")
        try:
            torch.ops.load_library(str(path))
        except OSError:  # a library that does not load (cut short, say): built again, once
            _build(cxx, path, replace=_identity(path))
            torch.ops.load_library(str(path))
        # finds the kernels' C ABI table (now, under the GIL, not on a first call), then registers the CPU kernels
        torch.ops.bcnswift._native_enable()
        _mark_used(path)
    except Exception as error:  # noqa: BLE001 - any failure leaves the Python kernels in place
        reason = f"the build or load failed: {error}"
        warnings.warn(f"bcnswift.torch: its native operators could not be built or loaded, so its ops run their "
                      f"Python kernels, tens of microseconds slower a call (set {ENVIRONMENT}=0 to not try): "
                      f"{error}", RuntimeWarning, stacklevel=3)
        return False
    reason = None
    _threads.sync_native()
    return True
