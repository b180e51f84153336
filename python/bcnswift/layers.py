"""Batch-Channel Normalization and its parts, over numpy arrays, with a torch.nn-like surface.

Every layer is one fused computation in the Swift core (docs/ARCHITECTURE.md): the layer object owns its
parameters, running buffers and gradients as numpy arrays; a forward updates the running buffers only when it
succeeds. Inputs are [B, C, *] arrays (or [B, *, C] with channel_axis=-1), in C order or channels-last memory
(as PyTorch's channels_last tensors are), normalized where they lie. Float arrays of another precision are
converted to the layer's dtype (as numpy functions convert); integer, boolean, complex and object arrays are
refused with TypeError.
"""
import math
import operator
import threading

import numpy as np

from . import _ext

_DTYPES = {np.dtype(np.float32), np.dtype(np.float64)}
_VARIANCE_AROUND = {"batch": 0, "running_mean": _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN}
_NAN_POLICIES = {"propagate": 0, "raise": _ext.BCN_NAN_RAISE}


def _boolean(value):
    """Whether `value` is a bool: Python's, numpy's (a 0-d array too) or torch's (which numpy's == does not see).
    Bools are neither ints nor numbers here, though Python and numpy would take them as either."""
    dtype = getattr(value, "dtype", None)
    return isinstance(value, (bool, np.bool_)) or dtype == np.bool_ or str(dtype) == "torch.bool"


def _positive_int(value, name):
    """`value` as an int if it is an integer above 0 (Python's, numpy's, or whatever has ``__index__``, such as a
    one-value integer tensor), else a TypeError for what is not an integer (a bool, a float, a string) or a
    ValueError for one below 1. The numpy layers and bcnswift.torch's modules alike."""
    n = None
    if not _boolean(value):
        try:
            n = operator.index(value)
        except TypeError:
            pass
    if n is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {n}")
    return n


def real_number(value, what, expected="a number"):
    """`value` as a float if it is a real number (Python's or numpy's, a 0-d array or a one-value tensor too), else
    a TypeError: "<what> must be <expected>". Strings and bools are not numbers here, as they are not ints for
    _positive_int."""
    refused = isinstance(value, (str, bytes)) or _boolean(value)
    try:
        if not refused:
            return float(value)
    except (TypeError, ValueError):
        pass
    raise TypeError(f"{what} must be {expected}, got {type(value).__name__} {value!r}")


def _positive_float(value, name):
    v = real_number(value, name)
    if not (v > 0 and np.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_cumulative_count(count):
    """The count a cumulative average (momentum None) may hold when it trains, worded as the kernels word it
    (NormalizationEngine.checkCount): it divides by the count it advances to, so 0 to 2^63 - 2."""
    if not 0 <= count < 2 ** 63 - 1:
        raise ValueError(f"num_batches_tracked must count batches (0 to 2^63 - 2) for a cumulative average, got "
                         f"{count}")


def _momentum(value):
    if value is None:
        return None
    v = real_number(value, "momentum", "a number or None")
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] or None, got {value!r}")
    return v


def _choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def _dtype(value):
    if value is None:  # np.dtype(None) is float64: a default nobody asked for
        raise TypeError("dtype must be float32 or float64, got None")
    try:
        dt = np.dtype(value)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {value!r}") from None
    if dt not in _DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def as_float_array(x, dtype, name="input"):
    """x as an aligned array of `dtype`, in its own memory order; copies only when it must (another dtype,
    misaligned, or not an array). Non-float arrays: TypeError."""
    if type(x) is np.ndarray:
        if x.dtype == dtype and x.flags.aligned:
            return x
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        return np.require(x, dtype=dtype, requirements=["A"])
    if isinstance(x, np.ndarray):  # subclasses: view as a plain array
        if isinstance(x, np.ma.MaskedArray) and np.ma.getmask(x) is not np.ma.nomask and np.ma.getmask(x).any():
            # the plain array holds whatever lies under the mask, which the statistics would take in silently
            raise ValueError(f"{name} has masked values, which bcnswift cannot leave out of its statistics: fill "
                             f"them ({name}.filled(value)) or remove them first")
        return as_float_array(np.asarray(x), dtype, name)
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as e:  # (RuntimeError: torch's, for a tensor that requires grad)
        raise TypeError(f"{name} cannot be converted to an array: {e}") from None
    # Lists of ints convert, as numpy functions do; bools, complex and text do not. What carries a dtype of its own
    # (a torch tensor, a buffer: they become arrays of that dtype) is held to the arrays' rule: floats only.
    if arr.dtype.kind not in "fiu" or (arr.dtype.kind != "f" and not isinstance(x, (list, tuple))):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}" if arr.dtype.kind not in "fiu"
                        else f"{name} must be a floating-point array, got dtype {arr.dtype}")
    return np.require(arr, dtype=dtype, requirements=["C", "A"])


# Bits of _ext.memory_facts(a), which the checks on every call read: numpy's `a.flags` builds a new object on
# each read, about 900 instructions (a tenth of a tiny call's Python).
_C_ORDER, _ALIGNED, _WRITEABLE, _OWNDATA = (_ext.MEMORY_C_ORDER, _ext.MEMORY_ALIGNED, _ext.MEMORY_WRITEABLE,
                                            _ext.MEMORY_OWNDATA)
_ALIGNED_C_ORDER = _C_ORDER | _ALIGNED


def memory_format(a):
    """'first' if the logical [B, C, *] array `a` is C-contiguous, 'last' if its memory is channels-last
    (np.moveaxis(a, 1, -1) is C-contiguous, as for PyTorch's channels_last), else None. Rank-2 arrays and
    arrays with one position are both at once; they count as 'first'. (Read from the strides: this runs on every
    call.)"""
    if _ext.memory_facts(a) & _C_ORDER:
        return "first"
    return "last" if channels_last_strides(a.shape, a.strides, a.itemsize) else None


def channels_last_strides(shape, strides, unit):
    """True when strides (in units of `unit`) lay out the logical [B, C, *] shape channels-last: dense in the
    order of np.moveaxis(a, 1, -1), innermost first. Axes of size 1 may have any stride. Rank 2 never counts
    (it has no channels-last order apart from C order). Shared by numpy arrays and torch tensors (fake ones too,
    which have strides but no memory)."""
    if len(shape) <= 2:
        return False
    expected = unit
    for axis in (1, *range(len(shape) - 1, 1, -1), 0):
        if shape[axis] != 1 and strides[axis] != expected:
            return False
        expected *= shape[axis]
    return True


def _checked_out(out, like, form, name, allow=None, channel_axis=1, owned=tuple):
    """`out` if it can receive a result shaped, typed and laid out like `like` (whose memory_format is `form`)
    without overlapping it, nor `allow` (backward's dy) unless it is exactly `allow` (the same array or the same
    memory with the same strides, which the kernels may overwrite in place), nor any array `owned()` returns (the
    layer's parameters, buffers and gradients, which the call reads or writes beside out). `out` and `like` are
    logical [B, C, *] views; messages word shapes and layouts in the caller's axis order (`channel_axis`). Runs on
    every call that passes out=, so the cheap tests come first: two different arrays that each allocated their own
    memory cannot overlap, and the common case (an array like `like` in fresh memory, such as np.empty_like makes)
    is one C call. (An `owned` array overlaps such an out only if it is a view of it, which only an assignment to
    the layer's attributes could make; the extension refuses that, check_apart in _ext.c.)"""
    if _ext.fresh_output(out, like, allow):
        return out
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(out).__name__}")
    shown = (lambda a: a.shape) if channel_axis == 1 else (lambda a: np.moveaxis(a, 1, -1).shape)
    if out.dtype != like.dtype or out.shape != like.shape:
        raise ValueError(f"{name} must have dtype {like.dtype} and shape {shown(like)}, got {out.dtype} "
                         f"{shown(out)}")
    facts = _ext.memory_facts(out)  # memory_format(out), without reading the facts twice:
    laid_out = facts & _C_ORDER if form == "first" else \
        not facts & _C_ORDER and channels_last_strides(out.shape, out.strides, out.itemsize)
    if not (facts & _ALIGNED and facts & _WRITEABLE and laid_out):
        # in the caller's axis order: with channel_axis=-1, logical channels-last memory is C order
        layout = "C-contiguous" if (form == "first") == (channel_axis == 1) else \
            ("channels-last" if channel_axis == 1 else "in the memory order [B, C, *] (channels first)")
        raise ValueError(f"{name} must be aligned, writeable and {layout} like the input")
    if not (facts & _OWNDATA and _ext.memory_facts(like) & _OWNDATA and out is not like) \
            and np.may_share_memory(out, like):
        raise ValueError(f"{name} must not overlap the input (backward needs the input unchanged)")
    if allow is not None and out is not allow and np.may_share_memory(out, allow) and not _same_memory(out, allow):
        raise ValueError(f"{name} must be dy itself or not overlap it (dy is read while dx is written)")
    if any(np.may_share_memory(out, a) for a in owned()):
        raise ValueError(f"{name} must not overlap the layer's parameters, running buffers or gradients (the call "
                         "reads or writes them beside it)")
    return out


def _same_memory(a, b):
    """Whether a and b are views of the same memory with the same data pointer, shape and strides."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides)


def _aligned_c_order(a):
    return _ext.memory_facts(a) & _ALIGNED_C_ORDER == _ALIGNED_C_ORDER


def _nan_raised(e):
    """Re-raises an extension's FloatingPointError worded for Python."""
    raise FloatingPointError(f"{e} and nan_policy is 'raise'") from None


def _relaid(a, like):
    """A copy of `a` in the memory layout of `like`."""
    b = np.empty_like(like)
    b[...] = a
    return b


def _alias(name, of=None):
    """Another name for the attribute `name` (of the object in attribute `of`, if given), read and assigned
    through: `layer.weight -= step` updates the array in place and then assigns it back, which a property without
    a setter refused after the update had happened."""
    def owner(self):
        return self if of is None else getattr(self, of)
    return property(lambda self: getattr(owner(self), name), lambda self, v: setattr(owner(self), name, v))


def instance_state(obj):
    """Every attribute `obj` holds, in its slots and in its __dict__: what copy and pickle must carry.

    The layers keep the attributes their calls read in slots. On CPython 3.11, reading an instance's __dict__ (which
    copy and pickle must do, to carry attributes a user added) makes every later read of an attribute kept in that
    dict about three times slower (20 ns; a tiny forward read 0.3 us more, for good, after a deepcopy); slots are
    read as before. Slots are read through their own descriptors: a subclass may shadow one with a property
    (BatchNorm's `weight`), which reading by name would take for an attribute."""
    state = {}
    for cls in reversed(type(obj).__mro__):
        for name in cls.__dict__.get("__slots__", ()):
            if name not in ("__dict__", "__weakref__"):
                try:
                    state[name] = cls.__dict__[name].__get__(obj, cls)
                except AttributeError:  # a slot never assigned
                    pass
    state.update(getattr(obj, "__dict__", {}))
    return state


def _fixed(name, batch_norm=True, why="its kernels' flags come from it"):
    """A constructor option that the layer's kernel flags (or its arrays' sizes: `why`) are made from once,
    read-only afterwards: assigned, it changed nothing the layer computed (while repr() showed the new value), or
    failed in words that did not name it. `batch_norm`: an option of the batch-norm stage, which layers without one
    do not have."""
    key = "_" + name

    def get(self):
        # getattr, not self.__dict__ (the attribute is a slot; see instance_state)
        try:
            return getattr(self, key)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no batch-norm stage, so no {name}") from None

    def refuse(self, value):
        if batch_norm and not self._has_bn:
            raise AttributeError(f"{type(self).__name__} has no batch-norm stage, so no {name}")
        raise AttributeError(f"{name} is fixed when a layer is made ({why}): make a new {type(self).__name__} "
                             f"with {name}={value!r}")
    return property(get, refuse)


class _Normalization:
    """What every layer shares: options as ABI flags, arrays, train/eval, forward/backward, state dicts."""

    estimate = _fixed("estimate")
    variance_around = _fixed("variance_around")
    unbiased_running_var = _fixed("unbiased_running_var")
    nan_policy = _fixed("nan_policy", batch_norm=False)
    # (set by hand, num_groups failed in the context's sizing, by batch size, or in numpy's words)
    num_channels = _fixed("num_channels", batch_norm=False, why="its parameters, buffers and contexts are sized by it")
    num_groups = _fixed("num_groups", batch_norm=False, why="its weight, bias and contexts are sized by it")
    _FIXED = ("estimate", "variance_around", "unbiased_running_var", "nan_policy", "num_channels", "num_groups")
    # every attribute _setup makes (the ones a call reads) in a slot, so that copy and pickle leave their reads fast
    # on CPython 3.11 (instance_state); __dict__ for what subclasses and users add
    __slots__ = ("_num_channels", "channel_axis", "eps", "dtype", "_nan_policy", "training", "momentum", "_estimate",
                 "_variance_around", "_unbiased_running_var", "bn_eps", "bn_weight", "bn_bias", "running_mean",
                 "running_var", "num_batches_tracked", "_num_groups", "weight", "bias", "_flags", "_lock", "_saved",
                 "grads", "_context_size", "bn", "__dict__", "__weakref__")

    _has_bn = False
    _has_cn = False
    _bn_prefix = ""  # state-dict prefix of the batch-norm entries ("bn." inside BatchChannelNorm)
    # state-dict names of the bn weight, bn bias, cn weight and cn bias (None: no such stage), the keys of `grads`
    _gradient_keys = (None, None, None, None)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        b = cls._bn_prefix
        cls._gradient_keys = (b + "weight" if cls._has_bn else None, b + "bias" if cls._has_bn else None,
                              "weight" if cls._has_cn else None, "bias" if cls._has_cn else None)

    def _setup(self, num_channels, num_groups, eps, momentum, estimate, unbiased_running_var, variance_around,
               dtype, bn_eps, nan_policy, channel_axis):
        self._num_channels = _positive_int(num_channels, "num_channels")
        if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, (int, np.integer)) \
                or channel_axis not in (1, -1):
            raise ValueError(f"channel_axis must be 1 ([B, C, *]) or -1 ([B, *, C]), got {channel_axis!r}")
        self.channel_axis = int(channel_axis)
        self.eps = _positive_float(eps, "eps")
        self.dtype = _dtype(dtype)
        self._nan_policy = _choice(nan_policy, "nan_policy", _NAN_POLICIES)
        self.training = True
        flags = _NAN_POLICIES[nan_policy]
        C, dt = self._num_channels, self.dtype
        if self._has_bn:
            self.momentum = _momentum(momentum)
            if not isinstance(estimate, (bool, np.bool_)):
                raise TypeError(f"estimate must be a bool, got {estimate!r}")
            self._estimate = bool(estimate)
            self._variance_around = _choice(variance_around, "variance_around", _VARIANCE_AROUND)
            if self.variance_around == "running_mean" and not self.estimate:
                raise ValueError("variance_around='running_mean' applies to estimated statistics (estimate=True)")
            if unbiased_running_var is None:
                unbiased_running_var = not self.estimate
            if not isinstance(unbiased_running_var, (bool, np.bool_)):
                raise TypeError(f"unbiased_running_var must be a bool or None, got {unbiased_running_var!r}")
            self._unbiased_running_var = bool(unbiased_running_var)
            self.bn_eps = self.eps if bn_eps is None else _positive_float(bn_eps, "bn_eps")
            flags |= _ext.BCN_BATCH_NORM | _VARIANCE_AROUND[self.variance_around]
            flags |= _ext.BCN_ESTIMATED if self.estimate else 0
            flags |= _ext.BCN_UNBIASED_RUNNING_VAR if self.unbiased_running_var else 0
            try:
                self.bn_weight = np.ones(C, dt)
                self.bn_bias = np.zeros(C, dt)
                self.running_mean = np.zeros(C, dt)
                self.running_var = np.ones(C, dt)
            except (MemoryError, ValueError) as e:  # numpy's errors name no argument (and its MemoryError
                # subclass takes other arguments than a message)
                kind = MemoryError if isinstance(e, MemoryError) else ValueError
                raise kind(f"num_channels={C}: its parameters and buffers do not fit in memory ({e})") from None
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.momentum, self.bn_eps = None, self.eps
        if self._has_cn:
            G = self._num_groups = _positive_int(num_groups, "num_groups")
            if C % G:
                raise ValueError(f"num_channels ({C}) must be divisible by num_groups ({G})")
            flags |= _ext.BCN_CHANNEL_NORM
            self.weight = np.ones((1, G, 1), dt)
            self.bias = np.zeros((1, G, 1), dt)
        else:
            self._num_groups = 0
        self._flags = flags
        self._lock = threading.Lock()
        self._saved = None
        self._context_size = (None, 0)
        self.grads = {k: np.zeros_like(v) for k, v in self._parameters().items()}

    # ---- torch.nn.Module-like mode switches --------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (batch statistics, running buffers updated); returns self. `mode` must be a bool, as
        torch.nn.Module.train asks (train("False") would otherwise mean training)."""
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be a bool, got {type(mode).__name__} {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (running statistics, no update); returns self."""
        return self.train(False)

    # ---- computation --------------------------------------------------------------------------------------

    def _call_flags(self):
        f = self._flags | (_ext.BCN_TRAINING if self.training else 0)
        if self._has_bn and self.momentum is None:
            f |= _ext.BCN_CUMULATIVE_AVERAGE
        return f

    def _logical(self, a):
        """The [B, C, *] view of an array laid out as the layer's channel_axis says."""
        return a if self.channel_axis == 1 else np.moveaxis(a, -1, 1)

    def _user(self, a):
        """The array as the caller lays it out ([B, *, C] with channel_axis=-1)."""
        return a if self.channel_axis == 1 else np.moveaxis(a, 1, -1)

    def _out(self, out, like, form, allow=None):
        """`out` checked to receive a result like the logical `like` (`_checked_out`), as its logical view. Only
        an array has a view: anything else (a list, a tensor) is refused before np.moveaxis would copy it into an
        array the result would then go to, unseen."""
        if self.channel_axis != 1:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
            if out.ndim != like.ndim:
                raise ValueError(f"out must have dtype {like.dtype} and shape {self._user(like).shape}, got "
                                 f"{out.dtype} {out.shape}")
        return _checked_out(self._logical(out), like, form, "out", allow, self.channel_axis, self._owned)

    def _owned(self):
        """The arrays a call reads or writes besides its input and output: parameters, buffers, gradients."""
        return (*self._parameters().values(), *(v for v in self._buffers().values() if v is not None),
                *(v for v in self._gradients().values() if v is not None))

    def _result(self, a, out):
        """What forward and backward return: `out` itself when given (not a view of it in the user's axis
        order), else `a` in the user's axis order."""
        return self._user(a) if out is None else out

    def _input(self, x):
        """(logical [B, C, *] view of x, memory format): x where it lies when it is C-contiguous or
        channels-last, else a copy in the memory order natural for the channel axis. x may hold no values."""
        if type(x) is np.ndarray and x.dtype is self.dtype and self.channel_axis == 1:
            # the common case, in a few reads: the full path below takes about 2K instructions more (callgrind),
            # of the 54K a tiny call makes
            if x.ndim >= 2 and x.shape[1] == self._num_channels and x.size and _aligned_c_order(x):
                return x, "first"
        x = as_float_array(x, self.dtype)
        if x.ndim < 2:
            raise ValueError(f"input must have rank >= 2 ([B, C, *]), got shape {x.shape}")
        if x.shape[self.channel_axis] != self._num_channels:  # only the layer knows its channel count
            where = "dimension 1" if self.channel_axis == 1 else "the last dimension"
            raise ValueError(f"input has {x.shape[self.channel_axis]} channels ({where}) but the layer has "
                             f"{self.num_channels}")
        logical = self._logical(x)
        form = memory_format(logical)
        if form is None:
            logical = self._logical(np.ascontiguousarray(x))
            form = memory_format(logical)
        return logical, form

    def _call(self, function, *args):
        """An extension call, its errors worded for Python."""
        try:
            return function(*args)
        except FloatingPointError as e:
            _nan_raised(e)

    def _prepare_forward(self, x, out):
        """(logical x, y to fill, call flags, an empty context): everything a forward checks before it runs."""
        x, form = self._input(x)
        y = np.empty_like(x) if out is None else self._out(out, x, form)
        flags = self._call_flags() | (_ext.BCN_CHANNELS_LAST if form == "last" else 0)
        # an input without values needs no context: one sized by its batch could be too large to allocate
        return x, y, flags, np.empty(self._context_length(x.shape[0]) if x.size else 0)

    def _context_length(self, batch):
        """Doubles of a context for `batch` samples (C and G are the layer's: only the batch size varies).
        `_context_size` holds (batch, doubles) for the last batch size: one attribute, so threads agree."""
        cached, doubles = self._context_size
        if batch != cached:
            doubles = _ext.context_length(batch, self._num_channels, self._num_groups)
            self._context_size = (batch, doubles)
        return doubles

    #: `_finish_forward`'s moments that ask for its checks alone (`_ext.check_finish`), run nothing
    CHECK_ONLY = object()

    def _finish_forward(self, x, y, flags, ctx, moments=None):
        """The whole forward, or with the batch's `moments` (merged from elsewhere) phase (c) on a context that
        phase (a) filled; with moments=CHECK_ONLY, every check of that phase (c) and nothing run (a synchronized
        layer's, before its exchange). Called with the lock held. One frame: this runs on every call."""
        momentum, bn, cn = self.momentum, self._has_bn, self._has_cn
        # The flags were made before the lock: a load_state_dict in between may have switched momentum to or from
        # None, so the cumulative-average bit follows the momentum read here, once
        if bn:
            flags = flags | _ext.BCN_CUMULATIVE_AVERAGE if momentum is None else flags & ~_ext.BCN_CUMULATIVE_AVERAGE
        momentum, eps, bn_eps = 0.0 if momentum is None else momentum, self.eps, self.bn_eps
        if type(eps) is not float or type(bn_eps) is not float or type(momentum) is not float:  # assigned by hand:
            # named (the extension's float conversion says only "must be real number, not str")
            eps, bn_eps = real_number(eps, "eps"), real_number(bn_eps, "bn_eps")
            momentum = real_number(momentum, "momentum", "a number or None")
        args = (flags, self._num_groups, eps, bn_eps, momentum, x, y,
                self.bn_weight if bn else None, self.bn_bias if bn else None,
                self.running_mean if bn else None, self.running_var if bn else None,
                self.num_batches_tracked if bn else None, self.weight if cn else None, self.bias if cn else None, ctx)
        try:  # not through _call: this runs on every call, and the extra frame is a tenth of a tiny call's time
            if moments is None:
                _ext.norm_forward(*args)
            elif moments is _Normalization.CHECK_ONLY:
                _ext.check_finish(*args, None)
            else:
                _ext.norm_forward(*args, moments)
        except FloatingPointError as e:
            _nan_raised(e)

    def forward(self, x, out=None):
        """Normalize x ([B, C, *], or [B, *, C] with channel_axis=-1); returns a new array of the layer's dtype,
        x's shape and x's memory layout (C order or channels-last), or fills `out` (that dtype, shape and layout,
        not overlapping x) and returns it. Reusing `out` saves allocating, which matters above 32 MB, where
        every fresh allocation is new pages the kernel must zero. An input without values ([0, C, *], or a
        spatial size of 0) gives an empty output and changes no buffer (torch's batch norm leaves its running
        statistics too, though it counts the call in num_batches_tracked)."""
        x, y, flags, ctx = self._prepare_forward(x, out)
        with self._lock:
            if x.size:
                self._finish_forward(x, y, flags, ctx)
            self._saved = (x, ctx, flags)
        return self._result(y, out)

    __call__ = forward

    def _prepare_backward(self, dy, out):
        """(x, context, flags of the last forward, dy in x's layout, dx to fill); call with the lock held."""
        if self._saved is None:
            raise RuntimeError("backward() called before any forward()")
        x, ctx, flags = self._saved[:3]
        form = "last" if flags & _ext.BCN_CHANNELS_LAST else "first"  # x's, as the forward found it
        if not (type(dy) is np.ndarray and dy.dtype is x.dtype and form == "first" and self.channel_axis == 1
                and dy.shape == x.shape and _aligned_c_order(dy)):  # else the checks, worded, and a relayout
            dy = self._logical(as_float_array(dy, self.dtype, "dy"))
            if dy.shape != x.shape:
                raise ValueError(f"dy has shape {self._user(dy).shape}, the last forward's output has shape "
                                 f"{self._user(x).shape}")
            if memory_format(dy) != form:
                dy = _relaid(dy, x)
        dx = np.empty_like(x) if out is None else self._out(out, x, form, allow=dy)
        return x, ctx, flags, dy, dx

    def _finish_backward(self, x, ctx, flags, dy, dx, sums=None):
        """The whole backward, or with the batch's gradient `sums` (merged from elsewhere) its phase (c)."""
        g = self.grads if type(self.grads) is dict else self._gradients()
        bw, bb, cw, cb = self._gradient_keys
        gw, gb, gcw, gcb = g.get(bw), g.get(bb), g.get(cw), g.get(cb)  # (get(None) is None: an absent stage)
        if (gw is None and bw) or (gb is None and bb) or (gcw is None and cw) or (gcb is None and cb):
            gw, gb, gcw, gcb = self._fresh_gradients()
        try:  # not through _call, as in _finish_forward
            if sums is None:  # two calls rather than *args: this runs on every backward
                _ext.norm_backward(flags, self._num_groups, x, dy, dx, gw, gb, gcw, gcb, ctx)
            else:
                _ext.norm_backward(flags, self._num_groups, x, dy, dx, gw, gb, gcw, gcb, ctx, sums)
        except FloatingPointError as e:
            _nan_raised(e)

    def backward(self, dy, out=None):
        """Gradient with respect to the input of the last forward; adds parameter gradients to `grads`.

        The last forward's input must not have been modified since (it is kept by reference, not copied).
        dx has that input's shape and memory layout; dy in another layout is copied into it first. `out`, if
        given, receives dx (as in `forward`; it may be dy itself). After a forward of an input without values,
        dx is empty and the gradients stay as they are.
        """
        with self._lock:
            x, ctx, flags, dy, dx = self._prepare_backward(dy, out)
            if x.size:
                self._finish_backward(x, ctx, flags, dy, dx)
        return self._result(dx, out)

    def _gradients(self):
        """`grads`, which the user may have replaced: any dict, else a TypeError that says what it holds."""
        if not isinstance(self.grads, dict):
            raise TypeError(f"grads must be a dict of the parameters' gradients (zero_grad(set_to_none=True) sets "
                            f"its entries to None), got {type(self.grads).__name__}")
        return self.grads

    def _fresh_gradients(self):
        """The four gradient arrays, where an entry of `grads` is None or missing (torch's set_to_none, or a
        `del`) made anew as zeros, as torch makes a `.grad` that is None; None for an absent stage."""
        params = self._parameters()
        for k in self._gradient_keys:
            if k is not None and self.grads.get(k) is None:
                self.grads[k] = np.zeros_like(params[k])
        return tuple(None if k is None else self.grads[k] for k in self._gradient_keys)

    def zero_grad(self, set_to_none=False):
        """Sets every parameter gradient to zero, or with `set_to_none` to None (the next backward makes it
        anew, as torch does with a `.grad` that is None)."""
        with self._lock:  # not while a backward adds to them
            for k, v in self._gradients().items():
                if set_to_none:
                    self.grads[k] = None
                elif v is not None:
                    v.fill(0)

    # ---- state --------------------------------------------------------------------------------------------

    def _parameters(self):
        bn_weight, bn_bias, cn_weight, cn_bias = self._gradient_keys  # the names `grads` and backward use
        p = {}
        if self._has_cn:
            p[cn_weight], p[cn_bias] = self.weight, self.bias
        if self._has_bn:
            p[bn_weight], p[bn_bias] = self.bn_weight, self.bn_bias
        return p

    def _buffers(self):
        if not self._has_bn:
            return {}
        b = self._bn_prefix
        d = {b + "running_mean": self.running_mean, b + "running_var": self.running_var,
             b + "num_batches_tracked": self.num_batches_tracked}
        if self.estimate and self.variance_around == "running_mean":
            d[b + "estbn_moving_speed"] = None  # materialized from momentum in state_dict()
        return d

    def parameters(self):
        """The live parameter arrays by state-dict name (modify them in place to change the layer)."""
        return self._parameters()

    def state_dict(self):
        """Copies of the parameters and buffers, keyed as the authors' PyTorch modules name them; taken between
        calls (under the layer's lock), never halfway through a forward's update."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self):
        d = {}
        for k, v in {**self._parameters(), **self._buffers()}.items():
            if k.endswith("estbn_moving_speed"):
                # NaN stands for momentum=None (a cumulative average), which the authors' EstBN cannot express
                d[k] = np.array([np.nan if self.momentum is None else self.momentum], self.dtype)
            elif not isinstance(v, np.ndarray):  # an attribute assigned by hand (layer.running_mean = [...])
                raise TypeError(f"state dict entry {k!r} must be a numpy array, got {type(v).__name__}: assign "
                                "arrays to a layer's parameters and buffers, or write into them ([...] = values)")
            else:
                d[k] = v.copy()
        return d

    def _aliases(self):
        """labml's and the notebooks' names for the same entries."""
        b = self._bn_prefix
        a = {}
        if self._has_bn:
            outer = "batch_norm." if b else ""
            for src, dst in (("scale", "weight"), ("shift", "bias"), ("gamma", "weight"), ("beta", "bias"),
                             ("exp_mean", "running_mean"), ("exp_var", "running_var")):
                a[outer + src] = b + dst
        if self._has_cn:
            outer = "channel_norm." if b else ""
            for src, dst in (("scale", "weight"), ("shift", "bias")):
                a.setdefault(outer + src, dst)
        return a

    def load_state_dict(self, state_dict, strict=True):
        """Loads parameters and buffers; accepts the keys of state_dict(), labml's names, and (G,)-shaped group
        weight and bias. An unknown key (KeyError), a missing one when strict (KeyError) or a wrong shape
        (ValueError) changes nothing. num_batches_tracked and estbn_moving_speed are optional: when absent they
        keep their values; estbn_moving_speed, when given, sets momentum (NaN: momentum=None, as state_dict()
        writes it for a cumulative average). Every entry, and that the layer's arrays can be written, is checked
        before any is written, between calls (under the layer's lock). `strict` is a bool."""
        with self._lock:
            self._load_state_dict(state_dict, strict)

    def _load_state_dict(self, state_dict, strict):
        if not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        if not isinstance(strict, (bool, np.bool_)):  # ("no" would be True)
            raise TypeError(f"strict must be a bool, got {strict!r}")
        params, buffers, aliases = self._parameters(), self._buffers(), self._aliases()
        targets = {**params, **buffers}
        staged, unknown = {}, []
        for key, value in state_dict.items():
            name = aliases.get(key, key)
            if name not in targets:
                unknown.append(key)
                continue
            if name in staged:
                raise KeyError(f"state dict gives {name!r} twice (as {key!r} and an alias)")
            staged[name] = self._convert_entry(name, key, value, targets[name])
        if unknown:
            raise KeyError(f"unexpected key(s) in state dict: {', '.join(map(repr, unknown))}; "
                           f"expected {', '.join(map(repr, targets))}")
        if strict:
            # labml's modules have neither entry: a missing one leaves the current value (as PyTorch does for
            # checkpoints without num_batches_tracked)
            optional = ("estbn_moving_speed", "num_batches_tracked")
            missing = [k for k in targets if k not in staged and not k.endswith(optional)]
            if missing:
                raise KeyError(f"missing key(s) in state dict: {', '.join(map(repr, missing))}")
        # a cumulative average (momentum None, after this load) advances the count it divides by: as its next
        # training call would, refuse the largest (a review found it loaded, then failed that call) or a negative
        # one, where this dict gives the count or makes the average cumulative (then the count may be the layer's
        # own); a dict that changes neither loads as it did, for eval
        speed = [v for k, v in staged.items() if k.endswith("estbn_moving_speed")]  # the momentum it sets
        momentum = speed[0] if speed else self.momentum
        count = next((v for k, v in staged.items() if k.endswith("num_batches_tracked")), None)
        if self._has_bn and momentum is None and count is not None:
            check_cumulative_count(int(count))
        elif self._has_bn and momentum is None and speed and self.momentum is not None:
            try:
                check_cumulative_count(int(self.num_batches_tracked))
            except ValueError as e:
                raise ValueError(f"{e}: the layer's own count, which this state dict keeps while it makes the "
                                 "running average cumulative") from None
        # an array set by hand as read-only (a view of a read-only buffer, say) failed in numpy's words, after the
        # entries before it were written
        for name in staged:
            target = targets[name]
            if isinstance(target, np.ndarray) and not target.flags.writeable:
                raise ValueError(f"the layer's {name} is a read-only array, which this load cannot write: give the "
                                 f"layer a writeable one (a copy) first")
        for name, value in staged.items():
            if name.endswith("estbn_moving_speed"):
                self.momentum = value  # checked by _convert_entry
            else:
                targets[name][...] = value

    def _convert_entry(self, name, key, value, target):
        if isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 64:
            # (numpy would make an object array of it, refused below as not numbers)
            raise ValueError(f"state dict entry {key!r} holds {value}, beyond any count or value this layer keeps")
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"state dict entry {key!r} must hold numbers, got dtype {arr.dtype}")
        if name.endswith("estbn_moving_speed"):  # the momentum it sets (NaN: None), checked before any write
            if arr.dtype.kind == "b":  # as num_batches_tracked: True is no speed
                raise TypeError(f"state dict entry {key!r} must hold a number, got dtype bool")
            if arr.size != 1:
                raise ValueError(f"state dict entry {key!r} must hold one value, got shape {arr.shape}")
            value = arr.reshape(-1)[0]
            if np.isnan(value):
                return None
            # A float32 speed (state_dict() of a float32 layer, a torch EstBN) is this layer's momentum if that
            # rounds to it (a round trip keeps the layer), else the shortest decimal that rounds to it: the momentum
            # it was most likely written from (0.1, not 0.10000000149...)
            if arr.dtype == np.float32:
                if self.momentum is not None and np.float32(self.momentum) == value:
                    return self.momentum
                return _momentum(float(str(value)))
            return _momentum(float(value))
        if name.endswith("num_batches_tracked"):
            if arr.size != 1:
                raise ValueError(f"state dict entry {key!r} must hold one value, got shape {arr.shape}")
            # compared as a Python int or float, exactly: numpy before 2 compared an int64 with 2**63 as floats
            count = arr.reshape(-1)[0].item()
            if arr.dtype.kind == "b" or not (math.isfinite(count) and 0 <= count < 2 ** 63 and count == int(count)):
                raise ValueError(f"state dict entry {key!r} must be a whole number of batches, got {count}")
            return np.array(int(count), np.int64)
        flat = name in ("weight", "bias") and target.shape != (target.size,)  # the groups' (1, G, 1) as (G,) too
        if arr.shape != target.shape and not (flat and arr.shape == (target.size,)):
            raise ValueError(f"state dict entry {key!r} has shape {arr.shape}, expected {target.shape}"
                             + (f" or ({target.size},)" if flat else ""))
        with np.errstate(over="ignore"):
            converted = arr.astype(self.dtype)
        if arr.dtype.kind == "f" and (np.isfinite(arr) & ~np.isfinite(converted)).any():
            raise ValueError(f"state dict entry {key!r} holds values beyond {self.dtype}'s range (largest magnitude "
                             f"{np.abs(arr[np.isfinite(arr)]).max():.3g}): this layer would hold infinities")
        return converted.reshape(target.shape)

    def __getstate__(self):  # copy and pickle: everything but the lock and the last forward
        with self._lock:  # arrays copied here: a forward beside copy.deepcopy or pickle.dumps tears none
            state = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in instance_state(self).items()}
            state["grads"] = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in self._gradients().items()}
        del state["_lock"]
        state["_saved"] = None
        state.pop("_context_size", None)  # the extension that unpickles it may size contexts otherwise
        state.pop("bn", None)
        return state

    def __setstate__(self, state):
        # the fixed options under their own names (pickles of versions before they were read-only)
        # one setattr at a time, not self.__dict__.update: most are slots (instance_state)
        for k, v in state.items():
            object.__setattr__(self, "_" + k if k in self._FIXED else k, v)
        self.dtype = np.dtype(self.dtype.name)  # numpy's own instance, which the forward's fast path compares by `is`
        self._lock = threading.Lock()
        self._context_size = (None, 0)
        if isinstance(self, BatchChannelNorm):
            self.bn = _BatchNormView(self)

    def __repr__(self):
        """The constructor call that makes this layer: every argument the class takes, keywords last, the
        keyword-only ones only when not their default."""
        fields = [f"num_channels={self.num_channels}"]
        if self._has_cn:
            fields.append(f"num_groups={self.num_groups}")
        fields.append(f"eps={self.eps}")
        if self._has_bn:
            fields.append(f"momentum={self.momentum}")
            if self._has_cn:  # BatchChannelNorm; BatchNorm and EstimatedBatchNorm take no estimate=
                fields.append(f"estimate={self.estimate}")
            fields.append(f"unbiased_running_var={self.unbiased_running_var}")
            if self.estimate:  # BatchNorm takes no variance_around=
                fields.append(f"variance_around={self.variance_around!r}")
        fields.append(f"dtype={self.dtype.name}")
        if self._has_bn and self._has_cn and self.bn_eps != self.eps:
            fields.append(f"bn_eps={self.bn_eps}")
        if self.nan_policy != "propagate":
            fields.append(f"nan_policy={self.nan_policy!r}")
        if self.channel_axis != 1:
            fields.append(f"channel_axis={self.channel_axis}")
        return f"{type(self).__name__}({', '.join(fields)})"


class BatchChannelNorm(_Normalization):
    """Batch-Channel Normalization (Qiao et al.): a batch norm, then a channel norm with per-group affine, fused.

    Args:
        num_channels: C, the size of dimension 1 of the input.
        num_groups: G, dividing C; the channel norm normalizes each sample's groups of C/G channels.
        eps: > 0, added to the variances (the batch norm's too, unless bn_eps is given).
        momentum: in [0, 1], the running buffers' update rate; None for a cumulative average
            (factor 1/num_batches_tracked, as PyTorch).
        estimate: True normalizes with running estimates updated from each batch first (labml's
            EstimatedBatchNorm, the authors' EstBN; gradients treat them as constants); False with batch
            statistics (the authors' nn.BatchNorm2d).
        unbiased_running_var: fold var·n/(n-1) into running_var; None picks the documents' choice: True with
            batch statistics, False when estimating.
        variance_around: "batch" (labml) or "running_mean" (the authors' EstBN: the variance folded into
            running_var is measured around the running mean before its update). Only with estimate=True.
        dtype: np.float32 or np.float64; parameters, buffers and outputs have this dtype.
        bn_eps: the batch norm's eps when it differs (the authors' code fixes it at 1e-5).
        nan_policy: "propagate" (as PyTorch) or "raise": FloatingPointError before anything changes, for NaN or
            infinity in the input (or in a backward's output gradient).
        channel_axis: 1 for [B, C, *] input (PyTorch), -1 for [B, *, C] (flax, Keras). Either memory layout
            (C order, or channels-last as PyTorch's channels_last) is normalized where it lies; outputs and
            gradients keep the input's layout.

    State dict: 'weight', 'bias' (1, G, 1); 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var' (C,);
    'bn.num_batches_tracked' (); and 'bn.estbn_moving_speed' (1,) with variance_around="running_mean".
    """

    _has_bn = True
    _has_cn = True
    _bn_prefix = "bn."

    def __init__(self, num_channels, num_groups, eps=1e-5, momentum=0.1, estimate=True,
                 unbiased_running_var=None, variance_around="batch", dtype=np.float32, *, bn_eps=None,
                 nan_policy="propagate", channel_axis=1):
        self._setup(num_channels, num_groups, eps, momentum, estimate, unbiased_running_var, variance_around,
                    dtype, bn_eps, nan_policy, channel_axis)
        self.bn = _BatchNormView(self)


class BatchNorm(_Normalization):
    """Batch normalization with batch statistics in training (gradients flow through them), running ones in eval.

    Same arguments as BatchChannelNorm's batch-norm part; unbiased_running_var=None means True (PyTorch).
    State dict: 'weight', 'bias', 'running_mean', 'running_var' (C,), 'num_batches_tracked' ().
    """

    _has_bn = True

    def __init__(self, num_channels, eps=1e-5, momentum=0.1, unbiased_running_var=None, dtype=np.float32, *,
                 nan_policy="propagate", channel_axis=1):
        self._setup(num_channels, None, eps, momentum, False, unbiased_running_var, "batch", dtype, None,
                    nan_policy, channel_axis)

    weight = _alias("bn_weight")
    bias = _alias("bn_bias")


class EstimatedBatchNorm(_Normalization):
    """Batch normalization with estimated statistics: training first folds the batch into the running buffers,
    then normalizes with them (labml's EstimatedBatchNorm; variance_around="running_mean" is the authors' EstBN).

    unbiased_running_var=None means False (both documents store the biased variance).
    State dict as BatchNorm's, plus 'estbn_moving_speed' (1,) with variance_around="running_mean".
    """

    _has_bn = True

    def __init__(self, num_channels, eps=1e-5, momentum=0.1, unbiased_running_var=None, variance_around="batch",
                 dtype=np.float32, *, nan_policy="propagate", channel_axis=1):
        self._setup(num_channels, None, eps, momentum, True, unbiased_running_var, variance_around, dtype, None,
                    nan_policy, channel_axis)

    weight = _alias("bn_weight")
    bias = _alias("bn_bias")


class ChannelNorm(_Normalization):
    """Channel normalization: per sample, statistics over each group of C/G channels, then a per-group affine
    (labml's ChannelNorm; the second half of the authors' BCNorm). State dict: 'weight', 'bias' (1, G, 1)."""

    _has_cn = True

    def __init__(self, num_channels, num_groups, eps=1e-5, dtype=np.float32, *, nan_policy="propagate",
                 channel_axis=1):
        self._setup(num_channels, num_groups, eps, None, False, None, "batch", dtype, None, nan_policy,
                    channel_axis)


class _BatchNormView:
    """`layer.bn.weight`, `layer.bn.running_mean`, ...: the batch-norm part's live arrays, named as in PyTorch."""

    def __init__(self, owner):
        self._owner = owner

    weight = _alias("bn_weight", of="_owner")
    bias = _alias("bn_bias", of="_owner")
    running_mean = _alias("running_mean", of="_owner")
    running_var = _alias("running_var", of="_owner")
    num_batches_tracked = _alias("num_batches_tracked", of="_owner")
