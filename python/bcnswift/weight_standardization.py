"""Weight Standardization (Qiao et al.): each output channel of a weight [O, ...] standardized over its fan-in.

  eps_in_sqrt=True  (labml):               w_hat = (w - mean) / sqrt(var + eps)
  eps_in_sqrt=False (the authors' conv):   w_hat = (w - mean) / (std + eps)
with var and std unbiased (over fan_in - 1, torch's default) or, with unbiased=False, biased (TensorFlow).

The default here is labml's (eps_in_sqrt=True); bcnswift.torch's WS layers and its weight_standardization default
to the authors' (eps_in_sqrt=False). With the same arguments both give the same bits.
"""
import threading

import numpy as np

from . import _ext
from .layers import _dtype, _positive_float, as_float_array, instance_state


def _flags(unbiased, eps_in_sqrt):
    if not isinstance(unbiased, (bool, np.bool_)):
        raise TypeError(f"unbiased must be a bool, got {unbiased!r}")
    if not isinstance(eps_in_sqrt, (bool, np.bool_)):
        raise TypeError(f"eps_in_sqrt must be a bool, got {eps_in_sqrt!r}")
    return (_ext.BCN_WS_UNBIASED if unbiased else 0) | (_ext.BCN_WS_EPS_IN_SQRT if eps_in_sqrt else 0)


def _weight(w, name="w"):
    # float32 and float64 in either byte order keep their width ('>f4' == float32 is False in numpy)
    dt = np.float32 if isinstance(w, np.ndarray) and w.dtype.kind == "f" and w.dtype.itemsize == 4 else np.float64
    if isinstance(w, np.ndarray) and w.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {w.dtype}")
    w = as_float_array(w, _dtype(dt), name)
    if w.ndim < 2:  # checked before the C-order copy, which makes a 0-d array 1-d
        raise ValueError(f"{name} must have rank >= 2 ([out_channels, ...]), got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {w.shape}")
    return np.ascontiguousarray(w)  # the kernels read rows in C order


def weight_standardization(w, eps=1e-5, unbiased=True, eps_in_sqrt=True):
    """Standardized copy of weight w ([O, ...], float32 or float64; other floats become float64), in C order (w
    in any other layout is read through a C-order copy)."""
    flags, eps = _flags(unbiased, eps_in_sqrt), _positive_float(eps, "eps")
    w = _weight(w)
    out = np.empty_like(w)
    _ext.ws_forward(flags, eps, w, out)
    return out


def weight_standardization_backward(w, dw_hat, eps=1e-5, unbiased=True, eps_in_sqrt=True):
    """Gradient with respect to w of weight_standardization(w, ...), given the gradient dw_hat of its output."""
    flags, eps = _flags(unbiased, eps_in_sqrt), _positive_float(eps, "eps")
    w = _weight(w)
    g = as_float_array(dw_hat, w.dtype, "dw_hat")
    if g.shape != w.shape:
        raise ValueError(f"dw_hat has shape {g.shape}, expected the weight's shape {w.shape}")
    g = np.ascontiguousarray(g)
    dw = np.empty_like(w)
    _ext.ws_backward(flags, eps, w, g, dw)
    return dw


class WeightStandardization:
    """Callable Weight Standardization that remembers its last input for backward: w_hat = ws(w); ws.backward(g)."""

    # in slots, so that copy and pickle leave their reads fast on CPython 3.11 (layers.instance_state)
    __slots__ = ("eps", "unbiased", "eps_in_sqrt", "_last", "_lock", "__dict__", "__weakref__")

    def __init__(self, eps=1e-5, unbiased=True, eps_in_sqrt=True):
        _flags(unbiased, eps_in_sqrt)
        self.eps = _positive_float(eps, "eps")
        self.unbiased, self.eps_in_sqrt = bool(unbiased), bool(eps_in_sqrt)
        self._last = None
        self._lock = threading.Lock()

    def __call__(self, w):
        """w standardized with the options as they are now (eps, unbiased and eps_in_sqrt may be changed between
        calls), which backward() then uses for this call's gradient."""
        flags, eps = _flags(self.unbiased, self.eps_in_sqrt), _positive_float(self.eps, "eps")
        w = _weight(w)
        out = np.empty_like(w)
        _ext.ws_forward(flags, eps, w, out)
        with self._lock:
            self._last = (w, eps, self.unbiased, self.eps_in_sqrt)
        return out

    forward = __call__

    def backward(self, dw_hat):
        """Gradient with respect to the last call's w, with that call's eps and options. w is kept by reference,
        not copied: do not modify it in place in between (an optimizer's step comes after the backward)."""
        with self._lock:
            last = self._last
        if last is None:
            raise RuntimeError("backward() called before any forward call")
        w, eps, unbiased, eps_in_sqrt = last
        return weight_standardization_backward(w, dw_hat, eps, unbiased, eps_in_sqrt)

    def __getstate__(self):  # copy and pickle without the lock
        state = instance_state(self)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        for k, v in state.items():  # slots among them: not self.__dict__.update
            object.__setattr__(self, k, v)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"WeightStandardization(eps={self.eps}, unbiased={self.unbiased}, eps_in_sqrt={self.eps_in_sqrt})"
