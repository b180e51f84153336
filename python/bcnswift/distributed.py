"""Batch statistics across processes: the exchange behind the synchronized layers (numpy and torch).

A synchronized training forward runs the statistics phases of the engine (docs/ARCHITECTURE.md) around two
allgathers: (a) each process computes its batch's moments per channel (count, mean, M2, float64; an empty batch
has count 0); every process sends a fixed-size *header* (status, the layer's configuration, an error message),
then, when every header says OK and every configuration agrees, its moments; (b) every process merges all the
moment sets in rank order with Chan's formula (``_ext.merge``), so all hold bitwise the same statistics; (c) each
finishes locally: running buffers, coefficients, output. The backward with batch statistics does the same with its
2C per-channel gradient sums: a header, then the sums. Every exchange begins with the same fixed-size header, so
that a rank in a forward meeting one in a backward is told so (RuntimeError on every rank) rather than a
transport's collectives of two sizes meeting (undefined for MPI; gloo aborts the process).

Failing together: an error before the exchange (wrong channel count, NaN with nan_policy="raise", a bad dy) is
caught and sent in the header instead of moments; then every rank raises the same exception type (ValueError,
FloatingPointError, TypeError or out of memory as the failing rank's, else RuntimeError), naming the failing rank
and its message, and no rank changes anything. Layers that disagree on anything that changes the
math (channels, groups, dtype, the convention's flags, eps, bn_eps, momentum) or on nan_policy make every rank
raise ValueError.
After the merge every rank decides alike, since all hold the same bits: a degenerate batch (one value per channel
over all ranks together) raises on every rank.

A transport is anything with mpi4py's ``Get_rank()``, ``Get_size()`` and ``Allgather(sendbuf, recvbuf)`` over
numpy buffers (recvbuf is [size, len(sendbuf)]): an mpi4py communicator, or ``bcnswift.torch``'s adapter over
torch.distributed. With ``timeout`` (seconds) and a transport that has ``Iallgather`` (mpi4py), the exchange polls
and raises TimeoutError when some rank has not arrived in time; the collective is then still pending, so the
communicator must not be used again (end the job, e.g. ``comm.Abort()``), and so after an interrupt (Ctrl-C)
while it waits. Its buffers are kept for the life of
the process (`_ABANDONED`), since MPI may still write the late ranks' data into them, and every later exchange over
that communicator raises RuntimeError at once instead of pairing with the pending one.
"""
import struct
import time
from typing import NamedTuple, Optional

import numpy as np

from . import _ext
from .layers import real_number

# magic, status, phase, channels, groups, flags, itemsize, eps, bn_eps, momentum, (reserved, 0); then the message
_FIELDS = struct.Struct("<8siiqqIIdddq")
_MAGIC = b"bcnsync1"
_MESSAGE_BYTES = 256
HEADER_BYTES = _FIELDS.size + _MESSAGE_BYTES

#: flags that must agree: those that change the math, and the NaN policy (a rank that propagates a NaN into
#: the merged moments would fold it into its buffers while a raising rank refuses them); not the memory layout
_AGREED_FLAGS = (_ext.BCN_BATCH_NORM | _ext.BCN_ESTIMATED | _ext.BCN_UNBIASED_RUNNING_VAR
                 | _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN | _ext.BCN_CUMULATIVE_AVERAGE | _ext.BCN_CHANNEL_NORM
                 | _ext.BCN_TRAINING | _ext.BCN_NAN_RAISE)
_FLAG_WORDS = [(_ext.BCN_BATCH_NORM, "the batch-norm stage", ("absent", "present")),
               (_ext.BCN_CHANNEL_NORM, "the channel-norm stage", ("absent", "present")),
               (_ext.BCN_ESTIMATED, "estimate", (False, True)),
               (_ext.BCN_UNBIASED_RUNNING_VAR, "unbiased_running_var", (False, True)),
               (_ext.BCN_VARIANCE_AROUND_RUNNING_MEAN, "variance_around", ("'batch'", "'running_mean'")),
               (_ext.BCN_TRAINING, "training", (False, True)),
               (_ext.BCN_NAN_RAISE, "nan_policy", ("'propagate'", "'raise'"))]
#: a header's status for a failed rank: the type every rank then raises (4 for any type not named); `_OUT_OF_MEMORY`
#: raises the synchronizer's `out_of_memory` (MemoryError, or torch's OutOfMemoryError), not one type for all
_ERRORS = {1: ValueError, 2: FloatingPointError, 3: TypeError, 4: RuntimeError}
_OUT_OF_MEMORY = 5

#: (request, send, recv) of every exchange that timed out or was interrupted (a KeyboardInterrupt while it
#: waited): the collective is still pending, and MPI writes into
#: recv (and reads send) whenever it progresses, so these arrays must never return to numpy's allocator
_ABANDONED = []
#: communicators with an abandoned exchange pending: any later exchange over one would pair with it
_BROKEN = []
_MOMENTS, _SUMS = 1, 2


class LayerConfig(NamedTuple):
    """What every rank's layer must agree on."""
    channels: int
    groups: int
    flags: int
    itemsize: int  # 4: float32, 8: float64
    eps: float
    bn_eps: float
    momentum: Optional[float]


#: the configuration a header carries in place of one it cannot (`Synchronizer._header`), or of one a layer
#: could not even build, with an error
UNSENT = LayerConfig(0, 0, 0, 0, float("nan"), float("nan"), None)

#: how each field travels in the header (momentum None as NaN)
_FIELD_FORMATS = {"channels": "<q", "groups": "<q", "flags": "<I", "itemsize": "<I", "eps": "<d", "bn_eps": "<d",
                  "momentum": "<d"}


def _shown(value):
    """repr(value), shortened; never raises (an int of 5000 digits, a __repr__ that fails)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _unsendable(config):
    """A TypeError naming the first field of `config` that a header cannot carry."""
    for name, form in _FIELD_FORMATS.items():
        value = getattr(config, name)
        try:
            struct.pack(form, float("nan") if value is None and name == "momentum" else value)
        except Exception:  # noqa: BLE001
            expected = "a number" if form == "<d" else "an int"
            return TypeError(f"the layer's {name} must be {expected}, got {_shown(value)}")
    return TypeError("the layer's settings cannot be exchanged")


def _error_text(error):
    """The header's message for `error`: UTF-8, cut to its room at a character's boundary (a cut inside one
    reached the other ranks as U+FFFD); never raises, whatever its str does."""
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:  # noqa: BLE001
        text = type(error).__name__
    cut = text.encode("utf-8", "backslashreplace")[:_MESSAGE_BYTES]
    return cut.decode("utf-8", "ignore").encode("utf-8")


def _error_code(error, out_of_memory):
    """The status for `error`: out of memory (MemoryError, or `out_of_memory`: torch's is a RuntimeError) first."""
    if isinstance(error, (MemoryError, out_of_memory)):
        return _OUT_OF_MEMORY
    for code, kind in _ERRORS.items():
        if isinstance(error, kind) and kind is not RuntimeError:
            return code
    return 4


def _pack_header(config, phase, error, out_of_memory=MemoryError):
    message = b"" if error is None else _error_text(error)
    momentum = float("nan") if config.momentum is None else config.momentum
    status = 0 if error is None else _error_code(error, out_of_memory)
    fields = _FIELDS.pack(_MAGIC, status, phase, config.channels,
                          config.groups, config.flags & _AGREED_FLAGS, config.itemsize, config.eps, config.bn_eps,
                          momentum, 0)
    return np.frombuffer(fields + message.ljust(_MESSAGE_BYTES, b"\0"), np.uint8)


def _disagreement(a, b):
    """(what, value on a, value on b) for the first difference between two unpacked headers' configurations."""
    def momentum(row):  # momentum=None travels as the cumulative-average flag (and a NaN)
        return None if row[5] & _ext.BCN_CUMULATIVE_AVERAGE else row[9]

    def scalars(*fields):
        for what, u, v in fields:
            if u != v:
                return what, u, v
        return None

    # the settings first, then the numbers they give meaning to: an estimating layer against one with batch
    # statistics is named as such, not by the moving speed the estimating one reads as its momentum
    return (scalars(("channels", a[3], b[3]), ("groups", a[4], b[4]),
                    ("dtype", f"float{8 * a[6]}", f"float{8 * b[6]}"))
            or next(((what, words[bool(a[5] & bit)], words[bool(b[5] & bit)])
                     for bit, what, words in _FLAG_WORDS if (a[5] ^ b[5]) & bit), None)
            or scalars(("eps", a[7], b[7]), ("bn_eps", a[8], b[8]), ("momentum", momentum(a), momentum(b))))


def timeout_seconds(timeout):
    """An exchange's `timeout` as a float of seconds above 0, or None (wait as long as the transport does)."""
    seconds = None if timeout is None else real_number(timeout, "timeout", "a number of seconds or None")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return seconds


def _check_intracommunicator(comm):
    """An mpi4py communicator (one with ``Is_inter``) must be a live intracommunicator: not ``MPI.COMM_NULL``,
    which ``Split(MPI.UNDEFINED)`` gives the ranks it leaves out (it failed in the first exchange, with MPI's
    words, on those ranks alone), and not an intercommunicator, whose Allgather gathers the other group's buffers
    alone: each rank normalized with the other group's statistics, without a word, and the ranks' buffers parted."""
    is_inter = getattr(comm, "Is_inter", None)
    if not callable(is_inter):  # a transport of another kind
        return
    if not comm:  # (an mpi4py handle is false when null)
        raise ValueError("comm is MPI.COMM_NULL (what Split(MPI.UNDEFINED) gives the ranks it leaves out): this "
                         "process is in no communicator to exchange over; give such ranks a layer of their own "
                         "communicator, or a local layer")
    if is_inter():
        raise ValueError("comm is an intercommunicator, whose Allgather gathers the other group's values alone: "
                         "give an intracommunicator (inter.Merge() makes one of both groups)")


class Synchronizer:
    """The exchange for one transport (see the module docstring); layers share it."""

    #: what a rank's out-of-memory error is besides MemoryError, and what every rank raises for one:
    #: bcnswift.torch's exchange sets torch.OutOfMemoryError, the type its kernels raise
    out_of_memory = MemoryError

    def __init__(self, comm, timeout=None):
        for method in ("Allgather", "Get_rank", "Get_size"):
            if not callable(getattr(comm, method, None)):
                raise TypeError(f"comm must be an mpi4py communicator or have Allgather, Get_rank and Get_size; "
                                f"{type(comm).__name__} has no {method}()")
        _check_intracommunicator(comm)
        self.timeout = timeout_seconds(timeout)
        self.comm = comm
        self._ok_headers = {}  # (config, phase) -> this rank's header when all is well, packed once

    def _header(self, config, phase, error):
        """This rank's header. It cannot fail: a setting a header cannot carry (groups 4.0, a momentum of "a"
        or 10**400, set on one rank after construction) is sent as this rank's error, so that every rank fails
        together rather than the others waiting in the allgather for this one."""
        try:
            if error is not None:
                return _pack_header(config, phase, error, self.out_of_memory)
            key = (config, phase)
            try:
                header = self._ok_headers.get(key)
            except TypeError:  # a field that cannot be hashed (a 0-d array): packed, not kept
                return _pack_header(config, phase, None)
            if header is None:
                if len(self._ok_headers) > 64:  # layers of many configurations: keep the cache small
                    self._ok_headers.clear()
                header = self._ok_headers[key] = _pack_header(config, phase, None)
            return header
        except Exception:  # noqa: BLE001 - whatever it is, the others must hear of it
            return _pack_header(UNSENT, phase, error if error is not None else _unsendable(config),
                                self.out_of_memory)

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def size(self):
        return self.comm.Get_size()

    def _allgather(self, send):
        if any(_same_comm(self.comm, c) for c in _BROKEN):
            raise RuntimeError(f"rank {self.rank}: an earlier statistics exchange over this communicator timed out "
                               "(or was interrupted) and is still pending; it cannot be used again (end the job, "
                               "e.g. comm.Abort())")
        recv = np.empty((self.size, send.size), send.dtype)
        if self.timeout is None or not hasattr(self.comm, "Iallgather"):
            self.comm.Allgather(send, recv)
            return recv
        request = self.comm.Iallgather(send, recv)
        deadline = time.monotonic() + self.timeout
        pause = 1e-6
        try:
            while not request.Test():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {self.rank}: some rank did not reach the statistics exchange within "
                                       f"{self.timeout:g} s; the exchange is still pending, so this communicator "
                                       "cannot be used again (end the job, e.g. comm.Abort())")
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
        except BaseException:  # the timeout, or an interrupt while waiting (Ctrl-C: a stuck job is when one comes)
            _ABANDONED.append((request, send, recv))  # the collective is still pending: see `_ABANDONED`
            _BROKEN.append(self.comm)
            raise
        return recv

    def _check(self, headers, mine):
        """Raises on every rank, alike, if some rank failed or the layers disagree."""
        # every rank OK, with this rank's configuration: the usual case. (Every rank may also have failed alike,
        # with the same words: this rank's status, the int after the magic, tells.)
        if (headers == mine).all() and not mine[8:12].any():
            return
        rows = [_FIELDS.unpack(bytes(h[:_FIELDS.size])) for h in headers]
        for rank, row in enumerate(rows):
            if row[0] != _MAGIC:
                raise RuntimeError(f"rank {rank} sent no bcnswift statistics header: the ranks are not running "
                                   "the same layer at the same time")
        failed = [r for r, row in enumerate(rows) if row[1] != 0]
        if failed:
            r = failed[0]
            message = bytes(headers[r][_FIELDS.size:]).rstrip(b"\0").decode(errors="replace")
            others = f" (ranks {', '.join(map(str, failed))} failed)" if len(failed) > 1 else ""
            status = rows[r][1]
            kind = self.out_of_memory if status == _OUT_OF_MEMORY else _ERRORS.get(status, RuntimeError)
            raise kind(f"rank {r} of {len(rows)} failed{others}: {message}; no rank changed anything")
        if any(row[2] != rows[0][2] for row in rows):
            raise RuntimeError("the ranks are in different phases (a forward against a backward): every rank "
                               "must call the layer in the same order and mode")
        for rank, row in enumerate(rows[1:], 1):
            diff = _disagreement(rows[0], row)
            if diff:
                what, u, v = diff
                raise ValueError(f"the synchronized layers disagree across ranks: {what} is {u} on rank 0 but "
                                 f"{v} on rank {rank}; nothing was computed")

    def moments(self, config, local):
        """The batch's moments over every rank, merged in rank order (3C float64). `local()` returns this
        rank's (3C float64, count 0 for an empty batch) or raises; then every rank raises alike."""
        m, error = _local_values(local, 3 * config.channels, "moments")
        mine = self._header(config, _MOMENTS, error)
        self._check_chained(self._allgather(mine), mine, error)
        return _ext.merge(3, self._allgather(m))

    def gradient_sums(self, config, local):
        """The backward's per-channel sums over every rank, added in rank order (2C float64), after a header as
        the forward's (the same size: see the module docstring). `local()` returns this rank's (zeros for an
        empty batch) or raises. `config` must be the forward's, which every rank agreed on: its channel count sizes
        what every rank sends."""
        sums, error = _local_values(local, 2 * config.channels, "gradient sums")
        mine = self._header(config, _SUMS, error)
        self._check_chained(self._allgather(mine), mine, error)
        return _ext.merge(2, self._allgather(sums))

    def _check_chained(self, headers, mine, error):
        """`_check`, whose exception, when this rank failed on its own (`error`), keeps that failure's traceback
        as its cause."""
        try:
            self._check(headers, mine)
        except Exception as e:
            if error is not None:
                raise e from error
            raise


def _local_values(local, count, what):
    """(values, None): `local()` as `count` contiguous float64 values; or (`count` zeros, the exception) when it
    raises or gives another count. Any local failure must reach the other ranks in the header, or they would
    wait; the zeros keep the exchange's size (a header then says not to read them)."""
    try:
        values = np.ascontiguousarray(local(), np.float64)
        if values.size != count:
            raise ValueError(f"{what} have {values.size} values, expected {count}")
        return values, None
    except Exception as e:  # noqa: BLE001 - see above
        return np.zeros(count), e


def _same_comm(a, b):
    """Whether transports `a` and `b` are one communicator (the same object, or mpi4py's equal handles); never
    raises."""
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def mpi_world():
    """mpi4py's COMM_WORLD, imported only now; a clear ImportError without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("synchronized layers need a communicator: pass comm= (any object with Allgather, "
                          "Get_rank, Get_size), or install mpi4py and an MPI (pip install \"bcnswift[mpi]\")"
                          ) from e
    return MPI.COMM_WORLD
