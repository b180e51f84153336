"""What bcnswift.torch's kernels were called with, whichever kernels its ops run: the Python ones (_ops.py, whose
calls of bcnswift._ext are wrapped here) or the native ones (native_ops.cpp, whose probe records its calls).
A white-box hook for the tests that check what reaches the kernels: memory (no copies), layouts (flags) and
threads. Import it after torch is known to be there (conftest.require)."""
from typing import NamedTuple

import numpy as np
import torch

from bcnswift import _ext
from bcnswift.torch import _ops, _threads

# the native probe's kinds, by the name of the bcnswift._ext function the Python kernels call for the same work
# (the whole forward and its phase (c) are both norm_forward there); "team region": a parallel region the native
# kernels ran on torch's threads, with its thread count
_NATIVE_NAMES = {0: "norm_moments", 1: "norm_forward", 2: "running_update", 3: "norm_backward", 4: "team region",
                 5: "ws_forward", 6: "ws_backward"}
_PYTHON_NAMES = ("norm_moments", "running_update", "norm_forward", "norm_backward_sums", "norm_backward",
                 "ws_forward", "ws_backward")


class Call(NamedTuple):
    name: str  # bcnswift._ext's name for the work
    flags: int
    addresses: frozenset  # data addresses of the arrays handed over (native: x, and dy in a backward)
    threads: int  # the calling thread's thread count during the call
    team: str  # "torch" (torch's own threads), "none" (bcnswift's workers or the calling thread), else "other"
    native: bool


def calling_thread_team():
    """The calling thread's team (bcn_set_calling_thread_team) as an address, 0 for none."""
    team = _ext.set_calling_thread_team(0)
    _ext.set_calling_thread_team(team)
    return team


def _python_team():
    team = calling_thread_team()
    return "none" if team == 0 else "torch" if team == _threads._find_openmp_team() else "other"


class KernelCalls:
    """Records every kernel call of bcnswift.torch from its creation until `stop` (which the `kernel_calls`
    fixture calls); the wrapping of bcnswift._ext is monkeypatch's, undone after the test."""

    def __init__(self, monkeypatch):
        self._calls, self._regions = [], []
        for name in _PYTHON_NAMES:
            real = getattr(_ext, name)

            def wrapped(*args, _real=real, _name=name):
                addresses = frozenset(a.ctypes.data for a in args if isinstance(a, np.ndarray))
                self._calls.append(Call(_name, int(args[0]), addresses, _ext.get_num_threads(), _python_team(),
                                        False))
                return _real(*args)
            monkeypatch.setattr(_ops._ext, name, wrapped)
        if _ops.NATIVE:
            torch.ops.bcnswift._native_probe(True)

    def _collect(self):
        if _ops.NATIVE:
            log = torch.ops.bcnswift._native_probe(True)
            for i in range(0, len(log), 6):
                kind, flags, x, dy, threads, team = log[i:i + 6]
                if _NATIVE_NAMES[kind] == "team region":
                    self._regions.append(threads)
                    continue
                self._calls.append(Call(_NATIVE_NAMES[kind], flags, frozenset(a for a in (x, dy) if a), threads,
                                        "torch" if team else "none", True))

    def stop(self):
        self._collect()
        if _ops.NATIVE:
            torch.ops.bcnswift._native_probe(False)

    @property
    def calls(self):
        self._collect()
        return list(self._calls)

    @property
    def team_regions(self):
        """The thread count of each parallel region the native kernels ran on torch's threads."""
        self._collect()
        return list(self._regions)

    def clear(self):
        self._collect()
        self._calls.clear()
        self._regions.clear()

    def named(self, name):
        return [c for c in self.calls if c.name == name]

    def addresses(self, name):
        return {a for c in self.named(name) for a in c.addresses}
