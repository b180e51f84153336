"""SyncBatchChannelNorm and SyncBatchNorm: the numpy layers with batch statistics over every process of a
communicator (the exchange is distributed.py's).

In training each forward merges the moments of every rank's batch, so every rank normalizes with, and folds into
its running buffers, the statistics of the concatenated batch, bit for bit alike; with batch statistics the
backward merges the 2C gradient sums likewise. Estimate mode needs no backward exchange; eval and the channel norm
exchange nothing. A rank may hold an empty batch ([0, C, *]): it contributes nothing, and its buffers still
follow. Parameter gradients are each rank's local contribution (sum them across ranks, as for PyTorch's
SyncBatchNorm). Every rank must call the layer in the same order and mode.
"""
import copy

import numpy as np

from . import _ext
from .distributed import UNSENT, LayerConfig, Synchronizer, mpi_world, timeout_seconds
from .layers import BatchChannelNorm, BatchNorm, _momentum, _positive_float, check_cumulative_count


class _Synchronized:
    """The synchronized forward and backward over a layer's own phases."""

    def _sync_setup(self, comm, timeout):
        self._comm, self._timeout = comm, timeout_seconds(timeout)
        self._synchronizer = Synchronizer(mpi_world() if comm is None else comm, self._timeout)

    @property
    def timeout(self):
        """Seconds each exchange waits for the other ranks (None: as long as the transport does); settable."""
        return self._timeout

    @timeout.setter
    def timeout(self, timeout):
        seconds = timeout_seconds(timeout)  # checked first
        with self._lock:
            self._timeout = seconds
            if self._synchronizer is not None:  # (None: unpickled, made with this timeout when first needed)
                self._synchronizer.timeout = seconds

    def __repr__(self):
        text = super().__repr__()  # (the communicator is no value a repr could show)
        return text if self._timeout is None else f"{text[:-1]}, timeout={self._timeout!r})"

    @property
    def comm(self):
        """The communicator (or transport) of the exchanges (None after unpickling a layer whose own did not
        pickle); settable."""
        return None if getattr(self, "_comm_lost", False) else self.synchronizer.comm

    @comm.setter
    def comm(self, comm):
        synchronizer = Synchronizer(mpi_world() if comm is None else comm, self._timeout)  # checked first
        with self._lock:
            self._comm, self._synchronizer, self._comm_lost = comm, synchronizer, False

    @property
    def synchronizer(self):
        if self._synchronizer is None:  # unpickled: the copy finds its own communicator
            if getattr(self, "_comm_lost", False):
                raise RuntimeError(f"this {type(self).__name__} was unpickled from a layer whose communicator did "
                                   "not pickle (mpi4py's do not, but for COMM_WORLD): set its `comm` to the one "
                                   "to exchange over before training it (eval needs none)")
            self._synchronizer = Synchronizer(mpi_world() if self._comm is None else self._comm, self._timeout)
        return self._synchronizer

    def _config(self):
        return LayerConfig(self._num_channels, self._num_groups, self._call_flags(), self.dtype.itemsize, self.eps,
                           self.bn_eps, self.momentum)

    def forward(self, x, out=None):
        """As the layer's forward; in training, with the statistics of every rank's batch together. x may be
        empty ([0, C, *]) on some ranks."""
        if not self.training:  # the layer's own forward, an empty batch too (DDP's uneven inputs): it records
            return super().forward(x, out)  # this forward for the backward, which then exchanges nothing
        local = {}
        try:  # a setting changed after construction may not even make a configuration: fail every rank with it
            config, unmade = self._config(), None
        except Exception as e:  # noqa: BLE001
            config, unmade = UNSENT, e

        def moments():
            if unmade is not None:
                raise unmade
            xl, y, flags, ctx = self._prepare_forward(x, out)
            self._check_finish(xl, y, flags, ctx)
            m = np.zeros(3 * self._num_channels)
            if xl.size:
                self._call(_ext.norm_moments, flags, self._num_groups, xl, m, ctx)
            local.update(x=xl, y=y, flags=flags, ctx=ctx)
            return m

        with self._lock:
            merged = self.synchronizer.moments(config, moments)
            xl, y, flags, ctx = local["x"], local["y"], local["flags"], local["ctx"]
            if xl.size:
                self._finish_forward(xl, y, flags, ctx, merged)
            elif merged[0]:  # nothing to normalize; the buffers follow the others' (phase (c'))
                self._call(_ext.running_update, flags, 0.0 if self.momentum is None else self.momentum, merged,
                           self.running_mean, self.running_var, self.num_batches_tracked)
            # (no rank had a value: nothing to fold in, as a single layer given an empty batch changes nothing)
            # a fourth element: a training forward's, whose backward exchanges with this agreed configuration
            self._saved = (xl, ctx, flags, config)
        return self._result(y, out)

    __call__ = forward

    def _check_finish(self, x, y, flags, ctx):
        """Every check this rank's finish will make after the exchange (the forward's phase (c), or an empty
        rank's running update), made before it: a rank that would fail there alone, after the others changed
        their buffers, fails in the exchange with them instead (its error in the header). The settings' values
        (assigned after construction, say), the parameters', buffers' and output's arrays."""
        self._finish_forward(x, y, flags, ctx, self.CHECK_ONLY)
        # and what the engine checks of the settings' values (NormalizationEngine+Checks), in the layers' words
        _positive_float(self.eps, "eps")
        if self._has_bn:
            _positive_float(self.bn_eps, "bn_eps")
            if _momentum(self.momentum) is None:
                check_cumulative_count(int(self.num_batches_tracked))

    def backward(self, dy, out=None):
        """As the layer's backward; after a training forward with batch statistics, with the gradient sums of
        every rank's batch together. Parameter gradients are this rank's contribution."""
        with self._lock:
            saved = self._saved
            if saved is None or len(saved) < 4 or saved[2] & _ext.BCN_ESTIMATED:
                x, ctx, flags, dy, dx = self._prepare_backward(dy, out)
                if x.size:
                    self._finish_backward(x, ctx, flags, dy, dx)
                return self._result(dx, out)
            local = {}

            def sums():
                x, ctx, flags, dyl, dx = self._prepare_backward(dy, out)
                g = self._gradients()  # a gradient that is None is made in the finish
                _ext.check_backward_finish(flags, self._num_groups, x, dyl, dx,
                                           *(g.get(k) for k in self._gradient_keys), ctx, None)
                s = np.zeros(2 * self._num_channels)
                if x.size:
                    self._call(_ext.norm_backward_sums, flags, self._num_groups, x, dyl, s, ctx)
                local.update(x=x, ctx=ctx, flags=flags, dy=dyl, dx=dx)
                return s

            merged = self.synchronizer.gradient_sums(saved[3], sums)
            if local["x"].size:
                self._finish_backward(local["x"], local["ctx"], local["flags"], local["dy"], local["dx"], merged)
        return self._result(local["dx"], out)

    def __getstate__(self):
        """For pickling: the communicator goes along if it pickles (None, COMM_WORLD, a picklable transport).
        Another (an mpi4py sub-communicator, say) cannot: the copy is marked, and refuses to train until given
        one (`comm`), where it once took COMM_WORLD in its place, silently exchanging with other processes."""
        state = super().__getstate__()
        state["_synchronizer"] = None
        if state["_comm"] is not None and not _picklable(state["_comm"]):
            state["_comm"], state["_comm_lost"] = None, True
        return state

    def __deepcopy__(self, memo):
        """A copy in this process keeps the communicator itself (it names processes; it is not copied), with a
        synchronizer of its own over it."""
        state = super().__getstate__()  # arrays copied
        comm = state.pop("_comm")
        state["_synchronizer"] = None
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__({"_comm": comm, **copy.deepcopy(state, memo)})
        return clone

    def __copy__(self):  # as the layers' own copies: the arrays copied too
        return self.__deepcopy__({})


def _picklable(obj):
    import pickle
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


class SyncBatchChannelNorm(_Synchronized, BatchChannelNorm):
    """BatchChannelNorm with batch statistics over every process of `comm` (see the module docstring).

    Args: as BatchChannelNorm, plus
        comm: an mpi4py communicator (default: MPI.COMM_WORLD, imported only then), or any object with
            mpi4py's Allgather(sendbuf, recvbuf), Get_rank() and Get_size() over numpy buffers.
        timeout: seconds to wait for the other ranks at each exchange (needs the transport's Iallgather, as
            mpi4py's); None waits forever. After a TimeoutError the communicator is unusable: end the job.
    """

    def __init__(self, num_channels, num_groups, eps=1e-5, momentum=0.1, estimate=True,
                 unbiased_running_var=None, variance_around="batch", dtype=np.float32, *, bn_eps=None,
                 nan_policy="propagate", channel_axis=1, comm=None, timeout=None):
        super().__init__(num_channels, num_groups, eps, momentum, estimate, unbiased_running_var, variance_around,
                         dtype, bn_eps=bn_eps, nan_policy=nan_policy, channel_axis=channel_axis)
        self._sync_setup(comm, timeout)


class SyncBatchNorm(_Synchronized, BatchNorm):
    """BatchNorm with batch statistics over every process of `comm`; `comm` and `timeout` as for
    SyncBatchChannelNorm."""

    def __init__(self, num_channels, eps=1e-5, momentum=0.1, unbiased_running_var=None, dtype=np.float32, *,
                 nan_policy="propagate", channel_axis=1, comm=None, timeout=None):
        super().__init__(num_channels, eps, momentum, unbiased_running_var, dtype, nan_policy=nan_policy,
                         channel_axis=channel_axis)
        self._sync_setup(comm, timeout)
