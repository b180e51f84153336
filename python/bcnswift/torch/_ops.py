"""The custom operators of bcnswift.torch (namespace ``bcnswift``): the Swift kernels as torch.library ops.

Mutation and differentiation live in separate ops, as torch.library requires:

- ``bcnswift::moments(x, flags, groups) -> (context, moments)``: forward phase (a), one pass over x: the plane
  moments (in the context, float64) and the batch's moments per channel (3C float64: count, mean, M2).
- ``bcnswift::update_running_(running_mean!, running_var!, num_batches_tracked!, moments, flags, momentum,
  moving_speed)``: the running buffers' update alone, from those moments (mutates its first three arguments).
- ``bcnswift::normalize(x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias,
  flags, groups, eps, bn_eps) -> (y, context)``: functional; continues a ``moments`` context (phase (c)) or runs
  the whole forward. Training with batch statistics normalizes with ``moments`` and leaves the running buffers
  alone (the update is ``update_running_``'s); differentiable through ``normalize_backward``.
- ``bcnswift::normalize_batch(x, bn_weight, bn_bias, cn_weight, cn_bias, flags, groups, eps, bn_eps) -> (y,
  context, moments)``: ``moments`` then ``normalize`` with the batch's moments in one op, whose moments then go to
  ``update_running_``: a traced training forward with batch statistics makes two calls a layer, not three.
- ``bcnswift::normalize_backward(dy, x, context, flags, groups, bn_affine, cn_affine) -> (dx, d_bn_weight,
  d_bn_bias, d_cn_weight, d_cn_bias)``; a second derivative raises.
- ``bcnswift::weight_standardization(w, eps, flags)`` and ``bcnswift::weight_standardization_backward``.

Tensors reach the kernels without a copy when they are CPU float32/float64 and dense in C order or channels-last
(``tensor.numpy()`` shares memory); outputs take the input's memory format. Flags are the C ABI's (bcnswift.h);
the memory-format flag is set here, from the strides.

Each op is one plain function (``_moments``, ...), reached two ways: as the registered custom op, which
torch.compile and torch.export trace, and in eager mode directly, through ``torch.autograd.Function``
(``eager_forward``, ``eager_weight_standardization``): a trip through the dispatcher costs tens of
microseconds per op, more than the kernels take on the small tensors of a CNN's later stages, so eager mode makes
one call per layer where the ops make two or three. Both give the same bits. Where a C++ compiler is, the ops'
CPU kernels are native_ops.cpp's instead (_native.py builds it; ``NATIVE`` below): the same work in C++, the same
bits, errors and layouts; the functions here then serve other devices (with a TypeError). For CPU tensors the
library has the autograd formulas below in C++ too (torch.library runs their Python on every call). The eager route
then takes the library's own ops, ``_eager_normalize`` and ``_eager_weight_standardization``, autograd Functions in
C++ whose backward runs no Python; the autograd.Functions here are its fallback.
"""
import functools
import inspect
import sys
import types
from typing import Optional

import numpy as np
import torch
from torch.fx import Proxy as FxProxy

from .. import _ext
from ..layers import channels_last_strides
from . import _native
from ._threads import _kernel

# inductor may hand the ops any layout it likes (channels_last, as its convolutions prefer): the kernels read
# C order and channels-last in place, copy anything else, and the fake kernels promise the same output strides
_ANY_LAYOUT = (torch.Tag.flexible_layout,)

# The ops' Python kernels serve every device (torch's CompositeExplicitAutograd: on another device than the CPU
# they raise a clear TypeError), so that the native library's CPU kernels (native_ops.cpp, loaded at the end of
# this module when it builds) take the CPU without displacing them: the dispatcher prefers a kernel for the
# device to a composite one.
_EVERY_DEVICE = None

# every kernel call of these ops goes through here, on the threads _threads.py chooses
_kernels = types.SimpleNamespace(**{name: _kernel(name) for name in (
    "norm_moments", "running_update", "norm_forward", "norm_backward_sums", "norm_backward", "ws_forward",
    "ws_backward")})

_CONTEXT_HEADER = 10  # doubles before the context's arrays (NormalizationContext.headerLength)
_CONTEXT_FORMAT = 6  # the header's memory format: 0 C order, 1 channels-last (NormalizationContext.writeHeader)


def context_length(batch, channels, groups):
    """Doubles a context holds for [batch, channels, *] with `groups` channel-norm groups (0 without one):
    NormalizationContext.length, written with + and * only so it holds for symbolic sizes in fake kernels."""
    return _CONTEXT_HEADER + 4 * batch * channels + 4 * channels + 2 * batch * groups + groups


def _check_flags(flags):
    """flags as the kernels take them (_ext's parse_flags, the native kernels' checked_flags), checked before
    the kernels' callers add or clear bits in them."""
    if not 0 <= flags <= 0xFFFF_FFFF:
        raise ValueError(f"flags must be a combination of bcnswift's flags, got {flags}")
    if flags & ~_ext.BCN_FLAGS_ALL:
        raise ValueError(f"unknown flag bits {flags & ~_ext.BCN_FLAGS_ALL:#x}")


def _groups(flags, groups):
    """The groups a context holds: 0 without a channel norm; with one, `groups`, refused unless positive (as the
    kernels refuse it, but before a context's size is computed from it)."""
    if not flags & _ext.BCN_CHANNEL_NORM:
        return 0
    if groups <= 0:
        raise ValueError(f"num_groups must be positive, got {groups}")
    return groups


def _array(t):
    """A numpy view of a CPU tensor's memory (no copy)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


#: What the eager routes write after a context's last double (`_new_context`, and native_ops.cpp's
#: kContextStamps): the largest magnitude (a narrower float makes it infinite, and a hook that scales by the
#: largest magnitude then loses the rest) and 1 + 2⁻⁵², which needs a double's whole mantissa (any rounding, a
#: scaling by a range, a quantization changes it). A context a saved-tensor hook stored lossily is seen to be one.
_STAMP = (-sys.float_info.max, 1 + 2 ** -52)


def _new_context(length):
    """A zeroed context of `length` doubles (the kernels' own), a view of a buffer that ends with `_STAMP`: what
    the eager routes save for their backward (`_save`)."""
    full = np.zeros(length + len(_STAMP))
    full[length:] = _STAMP
    return full[:length]


# A tensor's numpy view costs about a microsecond, three in a training step (where the convolutions between two
# layers have evicted Python's caches), and a layer hands the kernels seven parameters and buffers. bcnswift's
# modules keep each one's view in a dict of their own (`KernelViews`), cleared when the module moves (.to(),
# .double(): nn.Module._apply); a tensor moved by other means (param.data = ...) is caught by its data_ptr. No
# weak references: torch.utils.swap_tensors refuses a tensor that has one.

def fx_leaf(forward):
    """A module's `forward` that torch.fx records as one call_module node, as it records torch.nn's own modules.
    FX's symbolic tracing keeps only modules defined in torch.nn as leaves and runs the forward of others on Proxy
    inputs, which the modules' checks of shapes and devices cannot answer. The GraphModule then calls the module
    itself. So the module cannot be the root of a trace (its graph would call itself): that is a TraceError
    saying what to do, as torch.nn's own modules that FX cannot trace raise one. The input is forward's first
    argument, by position or by its name (torch's layers call it `input`)."""
    name = list(inspect.signature(forward).parameters)[1]

    @functools.wraps(forward)
    def leaf_forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get(name)
        if isinstance(x, FxProxy):
            tracer = x.tracer
            path = tracer.path_of_module(self)
            if not path:  # the module traced is this one
                raise torch.fx.proxy.TraceError(
                    f"torch.fx.symbolic_trace cannot trace bcnswift.torch's {type(self).__name__} on its own: FX "
                    "keeps it as a leaf (one call_module node), which needs a module around it. Trace "
                    f"nn.Sequential({type(self).__name__}(...)) instead, or use torch.export or torch.compile")
            return tracer.create_proxy("call_module", path, args, kwargs)
        return forward(self, *args, **kwargs)
    return leaf_forward


def traced():
    """Whether this call is being traced into a graph, or watched op by op: by torch.compile or torch.export
    (dynamo), by torch.jit.trace, or under a torch dispatch mode (make_fx, FakeTensorMode, FlopCounterMode,
    selective activation checkpointing, ...). Such calls take the custom ops, which a graph records and a mode
    sees (with their fake kernels' shapes and strides); the eager routes' kernels, below autograd on raw memory,
    would be invisible to it (jit.trace recorded the output as a constant; make_fx silently recorded a stored
    tensor in the op's place, and FakeTensorMode failed inside torch)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _dispatch_modes() > 0


_dispatch_modes = torch._C._len_torch_dispatch_stack


class KernelViews:
    """For a module whose forward hands its parameters and buffers to the kernels: a dict in which `_held` keeps
    their numpy views between calls (`kernel_views()`), emptied when the module's tensors move (`_apply`: .to(),
    .double(), .cuda(), ...) and left out of pickles and deep copies."""

    def kernel_views(self):
        if traced():  # the traced route takes no views; and a trace must not write __dict__
            return None
        views = self.__dict__.get("_kernel_views")
        if views is None:
            views = self.__dict__["_kernel_views"] = {}
        return views

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_kernel_views", None)
        return super()._apply(fn, *args, **kwargs)

    def __prepare_scriptable__(self):
        # torch.jit.script asks every module this before it compiles: say why it cannot, instead of TorchScript's
        # own errors about the Python inside (an undefined name, a missing attribute, at a wrapper's line)
        raise RuntimeError(f"{type(self).__name__}: bcnswift.torch's modules cannot be compiled by TorchScript "
                           f"(torch.jit.script): their forward is Python that hands the tensors to bcnswift's "
                           f"kernels. torch.compile, torch.export and torch.jit.trace record their custom ops.")

    def __getstate__(self):
        state = super().__getstate__()
        if "_kernel_views" in state:
            state = {k: v for k, v in state.items() if k != "_kernel_views"}
        return state


def _held(t, views, role, writes=False):
    """A numpy view of `t`, a parameter or buffer (None stays None), kept in `views` under `role` while it is the
    same tensor on the same memory and size (without `views`, made afresh). Only leaves are kept: a tensor
    computed on each call (torch.func.functional_call, a parametrization) would keep its graph alive. A tensor
    that is not contiguous is read from a C-order copy, not kept; one the kernels write (`writes`) is passed as
    it is, for the kernels to refuse. (Contiguity is asked first: `param.data = ` a strided view that starts
    where the kept one did, with as many values, is other memory.)"""
    if t is None:
        return None
    if not t.is_contiguous():
        return _array(t) if writes else _array(t.contiguous())
    if views is not None:
        entry = views.get(role)
        if entry is not None and entry[0] is t and entry[1] == t.data_ptr() and entry[2].size == t.numel():
            return entry[2]
    view = _array(t)
    if views is not None and t.grad_fn is None:
        views[role] = (t, t.data_ptr(), view)
    return view


def _form(t):
    """'first' if t is in C order, 'last' if its memory is channels-last ([B, *, C] in C order, as
    torch.channels_last), else None: what the kernels read in place. From the strides alone, so that the fake
    kernels, which see no memory, decide as the real ones do."""
    if t.is_contiguous():
        return "first"
    return "last" if channels_last_strides(t.shape, t.stride(), 1) else None


_LAYOUT_FLAGS = {"first": 0, "last": _ext.BCN_CHANNELS_LAST}  # `_form`'s answers as the kernels' flag


def _like(t, x):
    """`t` in x's memory layout (a copy only when they differ). The stride of an axis of size 1 says nothing
    about the layout (torch gives a [O, I, 1, 1] weight's gradient other ones than the weight's), so it is not
    compared."""
    ts, xs = t.stride(), x.stride()
    if ts == xs or all(a == b for a, b, n in zip(ts, xs, x.shape) if n != 1):
        return t
    return torch.empty_like(x).copy_(t)


def _context_layout(x, context):
    """(x, its memory-format flag, relaid): x where it lies if the kernels read that layout, else a C-order
    copy; unless `context` (a numpy view) holds phases run on x in the other layout. A compiler may hand an op
    x in another layout than the op that made the context had (the ops take any layout, and inductor may
    recompute a saved tensor for the backward): then x is laid out (once) as the context's header records,
    relaid=True, and the caller gives its output the layout promised for x as it came (`_output`)."""
    form = _form(x)
    natural = form or "first"  # where x goes without a context: where it lies, or a C-order copy
    want = natural
    if context is not None and x.dim() > 2:
        header = context.reshape(-1)
        if header.size > _CONTEXT_FORMAT and header[_CONTEXT_FORMAT] in (0.0, 1.0):
            want = "last" if header[_CONTEXT_FORMAT] == 1.0 else "first"
    if want != form:
        x = x.contiguous() if want == "first" else x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x, _ext.BCN_CHANNELS_LAST if want == "last" else 0, want != natural


def _output(x):
    """An uninitialized tensor shaped like x, in the layout the kernels write for it: x's own when they read x
    in place, else C order (what the real and the fake kernels both return)."""
    return torch.empty_like(x) if _form(x) else torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_input(x, name="input"):
    if x.dtype not in (torch.float32, torch.float64) or not x.is_cpu:
        raise TypeError(f"bcnswift ops take CPU float32 or float64 tensors, got {name} {x.dtype} on {x.device}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have rank >= 2 ([B, C, *]), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


# ---- forward phase (a) --------------------------------------------------------------------------------------

def moment_arrays(x, flags, groups):
    """(context, moments) of x as numpy arrays: `moments`'s work, for the callers that keep them in numpy."""
    _check_input(x)
    _check_flags(flags)
    x, form, _ = _context_layout(x, None)  # where it lies, or a C-order copy
    B, C = x.shape[0], x.shape[1]
    # zeros, not empty: the kernels leave parts of a context unused, and an output must be deterministic
    # (made in numpy and lent to torch: a torch tensor's numpy view costs 2 us)
    ctx = _new_context(context_length(B, C, _groups(flags, groups)))
    m = np.empty(3 * C)
    _kernels.norm_moments(flags | form, groups, _array(x), m, ctx)
    return ctx, m


def _moments(x: torch.Tensor, flags: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    ctx, m = moment_arrays(x, flags, groups)
    return torch.from_numpy(ctx), torch.from_numpy(m)


moments = torch.library.custom_op("bcnswift::moments", _moments, mutates_args=(), device_types=_EVERY_DEVICE,
                                  tags=_ANY_LAYOUT)


def _one_device(like, like_name="the input", **tensors):
    """The fake kernels also serve the Meta key, which the dispatcher picks when any argument is a meta tensor: a
    CPU call with one meta argument reached them and returned uninitialized CPU memory (or, for update_running_,
    did nothing). As torch's own ops, every tensor argument must be on one device."""
    for name, t in tensors.items():
        if t is not None and t.device != like.device:
            raise RuntimeError(f"bcnswift ops take every tensor on one device: {name} is on {t.device}, but "
                               f"{like_name} is on {like.device}")


@moments.register_fake
def _(x, flags, groups):
    B, C = x.shape[0], x.shape[1]
    return (x.new_empty(context_length(B, C, _groups(flags, groups)), dtype=torch.float64),
            x.new_empty(3 * C, dtype=torch.float64))


# ---- the running update alone -------------------------------------------------------------------------------

def running_update(running_mean, running_var, num_batches_tracked, moments, flags, momentum, views=None):
    """The running buffers' update from `moments` (a numpy array), in place: `update_running_`'s work."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    # a stage without a count (torch's batch norms allow it) updates a scratch one, as the eager route's does
    count = np.zeros((), np.int64) if num_batches_tracked is None else _held(num_batches_tracked, views,
                                                                               "num_batches_tracked", True)
    _kernels.running_update(flags, momentum, moments, _held(running_mean, views, "running_mean", True),
                            _held(running_var, views, "running_var", True), count)


def check_speed_size(speed):
    """An EstBN's ``estbn_moving_speed`` holds one value (a size, which every route can read, traced or not)."""
    if speed.numel() != 1:
        raise ValueError(f"estbn_moving_speed must hold one value, got {speed.numel()}")


def moving_speed_value(speed):
    """The rate an EstBN's ``estbn_moving_speed`` buffer holds (one value), as a float in [0, 1]; otherwise a
    ValueError naming the buffer (the kernels would name a momentum the user never set). The authors' code takes
    any value; a rate outside [0, 1] would move the estimates away from the batch's statistics."""
    check_speed_size(speed)
    value = float(speed.reshape(-1)[0])
    if not 0 <= value <= 1:
        raise ValueError(f"estbn_moving_speed must be in [0, 1], got {value!r}")
    return value


def _update_running(running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked: torch.Tensor,
                    moments: torch.Tensor, flags: int, momentum: float,
                    moving_speed: Optional[torch.Tensor]) -> None:
    """momentum, or with `moving_speed` (a one-element tensor: the authors' EstBN buffer) its value; with
    BCN_CUMULATIVE_AVERAGE in flags, neither (1/num_batches_tracked)."""
    if moving_speed is not None:
        momentum = moving_speed_value(moving_speed)
    if running_mean is None or running_var is None:  # (the native kernel words it alike)
        raise ValueError("updating the running statistics needs running_mean and running_var")
    running_update(running_mean, running_var, num_batches_tracked, _array(moments.contiguous()), flags, momentum)


update_running_ = torch.library.custom_op(
    "bcnswift::update_running_", _update_running, mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    device_types=_EVERY_DEVICE)


@update_running_.register_fake
def _(running_mean, running_var, num_batches_tracked, moments, flags, momentum, moving_speed):
    _one_device(running_mean, "running_mean", running_var=running_var, num_batches_tracked=num_batches_tracked,
                moments=moments, moving_speed=moving_speed)
    return None


# ---- the normalization --------------------------------------------------------------------------------------

def _normalize_impl(x, context, moments, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                    cn_weight, cn_bias, flags, groups, eps, bn_eps, momentum, write_buffers, views=None):
    """(y, context, laid): phase (c) on a ``moments`` context, continued in place, or the whole forward without
    one (a new context); the context and `moments` are numpy arrays. With write_buffers, a training forward
    updates the running buffers given, in place, at `momentum` (the eager route's single call); without, the
    kernel's update goes to scratch copies (the functional op). `views`: the calling module's `KernelViews`, or
    None. `laid`: x as the kernels read it, its numpy view and its layout flag."""
    _check_input(x)
    _check_flags(flags)
    g = _groups(flags, groups)
    given = x
    x, form, relaid = _context_layout(x, context)
    if not write_buffers:
        flags, momentum = flags & ~_ext.BCN_CUMULATIVE_AVERAGE, 0.1
    flags |= form
    B, C = x.shape[0], x.shape[1]
    y = torch.empty_like(x)  # _output(x): x is now in a layout the kernels read in place, so y takes it
    xa = _array(x)
    bw = bb = rm = rv = nbt = None
    if flags & _ext.BCN_BATCH_NORM:
        dt = xa.dtype
        bw = np.ones(C, dt) if bn_weight is None else _held(bn_weight, views, "bn_weight")
        bb = np.zeros(C, dt) if bn_bias is None else _held(bn_bias, views, "bn_bias")
        if write_buffers:
            rm = _held(running_mean, views, "running_mean", True)
            rv = _held(running_var, views, "running_var", True)
            nbt = _held(num_batches_tracked, views, "num_batches_tracked", True)
        elif flags & _ext.BCN_TRAINING:
            # functional: batch statistics do not read the buffers, and the real update is update_running_'s
            rm = np.zeros(C, dt) if running_mean is None else _array(running_mean).copy()
            rv = np.ones(C, dt) if running_var is None else _array(running_var).copy()
        else:
            if running_mean is None or running_var is None:
                raise ValueError("normalizing with running statistics (eval) needs running_mean and running_var")
            rm, rv = _held(running_mean, views, "running_mean"), _held(running_var, views, "running_var")
        if nbt is None:
            nbt = np.zeros((), np.int64)
    cw = cb = None
    if flags & _ext.BCN_CHANNEL_NORM:
        cw = np.ones(groups, xa.dtype) if cn_weight is None else _held(cn_weight, views, "cn_weight")
        cb = np.zeros(groups, xa.dtype) if cn_bias is None else _held(cn_bias, views, "cn_bias")
    if context is None:
        context = _new_context(context_length(B, C, g))
        _kernels.norm_forward(flags, groups, eps, bn_eps, momentum, xa, _array(y), bw, bb, rm, rv, nbt, cw, cb,
                              context)
    else:
        _kernels.norm_forward(flags, groups, eps, bn_eps, momentum, xa, _array(y), bw, bb, rm, rv, nbt, cw, cb,
                              context, moments)
    if relaid:
        y = _output(given).copy_(y)
    return y, context, (x, xa, form)


def _normalize(x: torch.Tensor, context: Optional[torch.Tensor], moments: Optional[torch.Tensor],
               bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
               running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               cn_weight: Optional[torch.Tensor], cn_bias: Optional[torch.Tensor],
               flags: int, groups: int, eps: float, bn_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # functional: a given context is continued in a copy
    context = None if context is None else _array(context).copy()
    moments = None if moments is None else _array(moments.contiguous())
    y, context, _ = _normalize_impl(x, context, moments, bn_weight, bn_bias, running_mean, running_var, None,
                                    cn_weight, cn_bias, flags, groups, eps, bn_eps, 0.1, False)
    return y, torch.from_numpy(context)


normalize = torch.library.custom_op("bcnswift::normalize", _normalize, mutates_args=(), device_types=_EVERY_DEVICE,
                                    tags=_ANY_LAYOUT)


@normalize.register_fake
def _(x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps,
      bn_eps):
    _one_device(x, context=context, moments=moments, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                running_var=running_var, cn_weight=cn_weight, cn_bias=cn_bias)
    B, C = x.shape[0], x.shape[1]
    return _output(x), x.new_empty(context_length(B, C, _groups(flags, groups)), dtype=torch.float64)


def backward_impl(dy, x, context, flags, groups, bn_affine, cn_affine, merge_sums=None, shapes=None, form=None):
    """(dx, d_bn_weight, d_bn_bias, d_cn_weight, d_cn_bias) from the forward's context (a numpy array); empty
    tensors for a stage that is absent or not affine. With `merge_sums` (the synchronized layers), the backward
    runs as its phases: the local gradient sums (x, dy in one layout), merge_sums(sums) -> the merged sums of
    every process, then the finish. With `shapes` (the four parameters' shapes, None where absent), each
    gradient takes its parameter's shape, and is None for a parameter not given (a torch view costs more than
    the kernel on small layers). `form`: the layout flag with which the forward read this x in place (the eager
    routes `_save` it), which spares the checks of x and of its context's layout while x still lies so (a
    saved-tensor hook may have moved it)."""
    given, relaid = x, False
    _check_flags(flags)
    if form is None or _LAYOUT_FLAGS.get(_form(x)) != form:
        _check_input(x)
        x, form, relaid = _context_layout(x, context)
    xa = _array(x)
    flags = (flags & ~_ext.BCN_CUMULATIVE_AVERAGE) | form
    C = x.shape[1]
    dy = _like(dy if dy.dtype == x.dtype else dy.to(x.dtype), x)
    dx = torch.empty_like(x)  # _output(x), as in _normalize_impl
    bn = bool(flags & _ext.BCN_BATCH_NORM) and bn_affine
    cn = bool(flags & _ext.BCN_CHANNEL_NORM) and cn_affine
    dya = _array(dy)
    arrays, grads = _parameter_gradients(C if bn else 0, groups if cn else 0, shapes, xa.dtype)
    merged = ()
    if merge_sums is not None:
        sums = np.zeros(2 * C)
        _kernels.norm_backward_sums(flags, groups, xa, dya, sums, context)
        merged = (merge_sums(sums),)
    _kernels.norm_backward(flags, groups, xa, dya, _array(dx), *arrays, context, *merged)
    if relaid:
        dx = _output(given).copy_(dx)
    return (dx, *grads)


def _parameter_gradients(bn_size, cn_size, shapes, dtype):
    """(the four arrays the kernels add the parameter gradients to: zeroed, None for a stage that computes none;
    the four gradients to return). Without `shapes`, 1-D tensors, empty for a stage that computes none; with
    them (the parameters' shapes, None where absent), each in its parameter's shape, None where absent."""
    if shapes is None:
        arrays = [np.zeros(n, dtype) for n in (bn_size, bn_size, cn_size, cn_size)]
        grads = [torch.from_numpy(a) for a in arrays]
        return [a if a.size else None for a in arrays], grads
    arrays, grads = [], []
    for n, shape in zip((bn_size, bn_size, cn_size, cn_size), shapes):
        if shape is None:  # not given; a stage is affine when either parameter is: then this one's is scratch
            arrays.append(np.zeros(n, dtype) if n else None)
            grads.append(None)
        else:
            g = np.zeros(shape, dtype)
            arrays.append(g if n else None)
            grads.append(torch.from_numpy(g))
    return arrays, grads


def _normalize_backward(dy: torch.Tensor, x: torch.Tensor, context: torch.Tensor, flags: int, groups: int,
                       bn_affine: bool, cn_affine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    """dx and the parameter gradients (empty tensors for a stage that is absent or not affine)."""
    _check_same_shape(dy, x, "dy", "input")
    return backward_impl(dy, x, _array(context), flags, groups, bn_affine, cn_affine)


def _check_same_shape(grad, t, name, of):
    """A gradient given to an op (autograd checks the ones it hands over) has its tensor's shape: one that merely
    broadcasts to it would be copied into that shape and taken for the gradient of every sample."""
    if tuple(grad.shape) != tuple(t.shape):
        raise ValueError(f"{name} must have the {of}'s shape {tuple(t.shape)}, got {tuple(grad.shape)}")


normalize_backward = torch.library.custom_op("bcnswift::normalize_backward", _normalize_backward, mutates_args=(),
                                            device_types=_EVERY_DEVICE, tags=_ANY_LAYOUT)


@normalize_backward.register_fake
def _(dy, x, context, flags, groups, bn_affine, cn_affine):
    _one_device(x, dy=dy, context=context)
    C = x.shape[1]
    bn = bool(flags & _ext.BCN_BATCH_NORM) and bn_affine
    cn = bool(flags & _ext.BCN_CHANNEL_NORM) and cn_affine
    return (_output(x), x.new_empty(C if bn else 0), x.new_empty(C if bn else 0),
            x.new_empty(groups if cn else 0), x.new_empty(groups if cn else 0))


def _save(ctx, x, context, flags, groups, bn_weight, bn_bias, cn_weight, cn_bias, laid=None):
    """What a backward needs from its forward. x and the context are saved for backward: autograd checks x was
    not modified, saved-tensor hooks may pack both, and a recomputing checkpoint (`use_reentrant=False`) replaces
    both, as it replaces the documents' modules' saved tensors (with estimates, the recomputation moves them
    again, and its coefficients are the ones the layers after it saved). `context` is the op's output tensor (as
    torch.compile traces it), or on the eager routes a numpy array (None: no values), which is also kept aside,
    exact: a hook that stores saved tensors in half precision rounds the saved one, whose stamp (`_new_context`)
    then no longer holds, and the backward takes the one aside (`_saved_context`). `laid` (what `_normalize_impl`
    returned for x): its layout flag where the kernels read x in place."""
    ctx.context = None if isinstance(context, torch.Tensor) else context
    full = None if ctx.context is None else context.base
    if isinstance(context, torch.Tensor):
        ctx.save_for_backward(x, context)
    elif isinstance(full, np.ndarray) and full.size == context.size + len(_STAMP):  # `_new_context`'s
        stamped = torch.from_numpy(full)
        ctx.save_for_backward(x, stamped)
        ctx.stamped_at = stamped.data_ptr()  # where it lies: where it comes back unless a hook copied it
    else:
        ctx.save_for_backward(x)
    ctx.form = laid[2] if laid is not None and laid[0] is x else None
    ctx.flags, ctx.groups = flags, groups
    ctx.shapes = [None if t is None else t.shape for t in (bn_weight, bn_bias, cn_weight, cn_bias)]
    # a stage is affine when either parameter is given (the kernels then compute both gradients)
    ctx.bn_affine = bn_weight is not None or bn_bias is not None
    ctx.cn_affine = cn_weight is not None or cn_bias is not None


def _saved_context(ctx, saved):
    """The eager routes' context for the backward (`_save`): the one kept aside if the saved one comes back in
    its own memory (no hook, or one that kept it) or lost its stamp (a hook that stored it lossily); else the
    saved one, a copy with its stamp (a recomputing checkpoint's own, or a hook's exact copy)."""
    aside = ctx.context
    if len(saved) == 2 and aside is not None:
        full, n = saved[1], aside.size
        if full.data_ptr() == ctx.stamped_at:
            return aside
        if full.dtype == torch.float64 and full.is_cpu and full.is_contiguous() and full.numel() == n + len(_STAMP):
            values = _array(full)
            if tuple(values[n:].tolist()) == _STAMP:
                return values[:n]
    return aside


def _normalize_setup(ctx, inputs, output):
    x, _, _, bn_weight, bn_bias, _, _, cn_weight, cn_bias, flags, groups, _, _ = inputs
    _save(ctx, x, output[1], flags, groups, bn_weight, bn_bias, cn_weight, cn_bias)
    ctx.mark_non_differentiable(output[1])  # the context is bookkeeping, not a value


def _normalize_gradients(ctx, dy, backward, saved=None):
    """(dx, d_bn_weight, d_bn_bias, d_cn_weight, d_cn_bias) of a forward `_save`d in ctx, each parameter's in its
    shape (None for a parameter not given), by `backward` (the op, or `backward_impl` itself); each caller lays
    them out for its own inputs. `saved`: ctx.saved_tensors if the caller unpacked them already (each unpacking
    runs the saved-tensor hooks again)."""
    saved = ctx.saved_tensors if saved is None else saved
    context = saved[1] if ctx.context is None and len(saved) == 2 else _saved_context(ctx, saved)
    dx, *params = backward(dy, saved[0], context, ctx.flags, ctx.groups, ctx.bn_affine, ctx.cn_affine)
    # the gradients come 1-D (comparing a torch.Size costs microseconds: it goes through symbolic shapes' sym_eq)
    return (dx, *(None if shape is None else g if len(shape) == 1 else g.view(shape)
                  for g, shape in zip(params, ctx.shapes)))


def _normalize_grad(ctx, dy, _dcontext):
    dx, dbw, dbb, dcw, dcb = _normalize_gradients(ctx, dy, normalize_backward)
    # x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps,
    # bn_eps
    return dx, None, None, dbw, dbb, None, None, dcw, dcb, None, None, None, None


torch.library.register_autograd("bcnswift::normalize", _normalize_grad, setup_context=_normalize_setup)


# ---- a training forward with batch statistics in one op -----------------------------------------------------

def _normalize_batch(x: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                     cn_weight: Optional[torch.Tensor], cn_bias: Optional[torch.Tensor], flags: int, groups: int,
                     eps: float, bn_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, context, moments): `moments` then `normalize` with the batch's moments (flags with BCN_TRAINING), in
    one op, so that a traced training step makes two calls a layer (this, then update_running_ with the
    moments it returns) instead of three: a trip through the dispatcher costs more than a small layer's kernel."""
    _check_flags(flags)
    if not flags & _ext.BCN_TRAINING or not flags & _ext.BCN_BATCH_NORM or flags & _ext.BCN_ESTIMATED:
        raise ValueError("normalize_batch normalizes with batch statistics: flags need BCN_BATCH_NORM and "
                         "BCN_TRAINING, without BCN_ESTIMATED")
    context, m = moment_arrays(x, flags & ~_ext.BCN_TRAINING, groups)
    y, context, _ = _normalize_impl(x, context, m, bn_weight, bn_bias, None, None, None, cn_weight, cn_bias,
                                    flags, groups, eps, bn_eps, 0.1, False)
    return y, torch.from_numpy(context), torch.from_numpy(m)


normalize_batch = torch.library.custom_op("bcnswift::normalize_batch", _normalize_batch, mutates_args=(),
                                          device_types=_EVERY_DEVICE, tags=_ANY_LAYOUT)


@normalize_batch.register_fake
def _(x, bn_weight, bn_bias, cn_weight, cn_bias, flags, groups, eps, bn_eps):
    _one_device(x, bn_weight=bn_weight, bn_bias=bn_bias, cn_weight=cn_weight, cn_bias=cn_bias)
    B, C = x.shape[0], x.shape[1]
    return (_output(x), x.new_empty(context_length(B, C, _groups(flags, groups)), dtype=torch.float64),
            x.new_empty(3 * C, dtype=torch.float64))


def _normalize_batch_setup(ctx, inputs, output):
    x, bn_weight, bn_bias, cn_weight, cn_bias, flags, groups, _, _ = inputs
    _save(ctx, x, output[1], flags, groups, bn_weight, bn_bias, cn_weight, cn_bias)
    ctx.mark_non_differentiable(output[1], output[2])  # bookkeeping and statistics, not values


def _normalize_batch_grad(ctx, dy, _dcontext, _dmoments):
    # x, bn_weight, bn_bias, cn_weight, cn_bias, then flags, groups, eps, bn_eps
    return (*_normalize_gradients(ctx, dy, normalize_backward), None, None, None, None)


torch.library.register_autograd("bcnswift::normalize_batch", _normalize_batch_grad,
                                setup_context=_normalize_batch_setup)


_NO_SECOND_DERIVATIVE = ("bcnswift.torch's kernels have no second derivative (double backward); set "
                         "BCNSWIFT_TORCH_COMPOSED=1 for the composed pure-torch path, which has")


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_NO_SECOND_DERIVATIVE)


torch.library.register_autograd("bcnswift::normalize_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- Weight Standardization ---------------------------------------------------------------------------------

def _check_weight(w):
    if not w.is_cpu or w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"bcnswift ops take CPU float32 or float64 tensors, got a weight {w.dtype} on {w.device}")
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(f"weight must have rank >= 2 ([out_channels, ...]) and values, got shape {tuple(w.shape)}")


def _ws_output(w):
    """An output like w, in w's memory layout when that is dense (else C order), as the kernels write it."""
    return torch.empty_like(w) if _rows(w) is not None else torch.empty_like(w, memory_format=torch.contiguous_format)


def _rows(t):
    """t as [O, fan-in] over its own memory when each t[o] is one dense block, in C order or any other (a
    channels_last weight's block is [kh, kw, I]), else None. Standardization per output channel does not care in
    which order a block holds its fan-in, so such weights need no copy."""
    O = t.shape[0]
    fan = t.numel() // O
    if O > 1 and t.stride(0) != fan:
        return None
    expected = 1
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(1, t.dim()) if t.shape[d] != 1):
        if stride != expected:
            return None
        expected *= size
    return t.as_strided((O, fan), (fan, 1))


def _row_array(t, views=None):
    """A numpy view of t as [O, fan-in] (`_rows`; t must have one), kept in `views` for a layer's weight."""
    if t.is_contiguous():  # the common case: a reshaped view, no torch view made
        return _held(t, views, "weight").reshape(t.shape[0], -1)
    return _array(_rows(t))


def _weight_rows(w, views):
    """(w as the kernels read it, its rows as a numpy array): w itself when its output channels are dense blocks
    (its view kept in `views`), else a C-order copy."""
    _check_weight(w)
    if w.is_contiguous() or _rows(w) is not None:
        return w, _row_array(w, views)
    w = w.contiguous()
    return w, _row_array(w)


def weight_standardization_impl(w, eps, flags, views=None):
    """`weight_standardization`'s work; `views`: the calling layer's `KernelViews`, or None."""
    w, rows = _weight_rows(w, views)
    out = torch.empty_like(w)  # in w's own layout
    _kernels.ws_forward(flags, eps, rows, _row_array(out))
    return out


def _weight_standardization(w: torch.Tensor, eps: float, flags: int) -> torch.Tensor:
    return weight_standardization_impl(w, eps, flags)


weight_standardization = torch.library.custom_op("bcnswift::weight_standardization", _weight_standardization,
                                                mutates_args=(), device_types=_EVERY_DEVICE, tags=_ANY_LAYOUT)


@weight_standardization.register_fake
def _(w, eps, flags):
    return _ws_output(w)


def weight_standardization_backward_impl(grad, w, eps, flags, views=None):
    """`weight_standardization_backward`'s work; `views` as in `weight_standardization_impl`."""
    w, rows = _weight_rows(w, views)
    grad = _like(grad if grad.dtype == w.dtype else grad.to(w.dtype), w)
    out = torch.empty_like(w)
    _kernels.ws_backward(flags, eps, rows, _row_array(grad), _row_array(out))
    return out


def _weight_standardization_backward(grad: torch.Tensor, w: torch.Tensor, eps: float, flags: int) -> torch.Tensor:
    _check_same_shape(grad, w, "grad", "weight")
    return weight_standardization_backward_impl(grad, w, eps, flags)


weight_standardization_backward = torch.library.custom_op(
    "bcnswift::weight_standardization_backward", _weight_standardization_backward, mutates_args=(),
    device_types=_EVERY_DEVICE, tags=_ANY_LAYOUT)


@weight_standardization_backward.register_fake
def _(grad, w, eps, flags):
    _one_device(w, "w", grad=grad)
    return _ws_output(w)


def _ws_setup(ctx, inputs, output):
    w, eps, flags = inputs
    ctx.save_for_backward(w)
    ctx.eps, ctx.flags = eps, flags


def _ws_grad(ctx, grad):
    (w,) = ctx.saved_tensors
    return weight_standardization_backward(grad, w, ctx.eps, ctx.flags), None, None


torch.library.register_autograd("bcnswift::weight_standardization", _ws_grad, setup_context=_ws_setup)
torch.library.register_autograd("bcnswift::weight_standardization_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- the eager route ----------------------------------------------------------------------------------------

class _NoSecondDerivative(torch.autograd.Function):
    """g, whose derivative raises: marks a gradient the kernels computed when create_graph=True. The anchors
    (the forward's input, and the output gradient when it requires grad) attach it to the graph, as a gradient
    computed by torch would be."""

    @staticmethod
    def forward(ctx, g, *anchors):
        return g.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_NO_SECOND_DERIVATIVE)


def _first_order_only(grads, anchor, dy):
    """`grads` as the backward returns them; with create_graph=True each marked (`_NoSecondDerivative`) and
    attached through `anchor` (one of the forward's inputs that requires grad; None: none) and `dy`, the output
    gradient. Its derivative with respect to dy is what the double-backward form of a Jacobian-vector product
    (torch.autograd.functional.jvp) takes: without dy in the graph that product came out 0, silently."""
    anchors = tuple(t for t in (anchor, dy) if t is not None and t.requires_grad)
    if not torch.is_grad_enabled() or not anchors:  # create_graph=False
        return grads
    return tuple(g if g is None else _NoSecondDerivative.apply(g, *anchors) for g in grads)


def _check_before_estimates(x, bn_weight, bn_bias, cn_weight, cn_bias, flags, groups, eps, bn_eps):
    """What the normalization after an estimated update checks, checked before it (the update writes the buffers,
    and a call that fails must change none): each parameter's size and each stage's eps, by the checks the modules
    run before they call (functional's), and each parameter's dtype, as the kernels word it. Phase (a) checked the
    rest. native_ops.cpp's check_before_estimates is the C++ route's, in the same words."""
    # (functional imports this module, so its names are taken at the call)
    from .functional import BatchNormStage, ChannelNormStage, _check_dtypes, _check_scalars, _check_sizes
    # the stages as far as they are checked here: their parameters (the buffers were checked by phase (a))
    bn = BatchNormStage(flags, bn_eps, None, None, bn_weight, bn_bias, None, None, None, True, False)
    cn = ChannelNormStage(groups, eps, cn_weight, cn_bias)
    _check_sizes(x, bn if flags & _ext.BCN_BATCH_NORM else None, cn if flags & _ext.BCN_CHANNEL_NORM else None)
    _check_scalars(flags, eps, bn_eps, None)
    _check_dtypes(x, (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("cn_weight", cn_weight), ("cn_bias", cn_bias)))


class _EagerForward(torch.autograd.Function):
    """A whole training or eval forward in one call, running buffers updated in place (what moments,
    update_running_ and normalize compute together, bit for bit, without the dispatcher). The arguments are
    the tensors that may need gradients, then the rest in one tuple: autograd handles each argument of a
    Function, and a layer has fifteen."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, cn_weight, cn_bias, options):
        running_mean, running_var, num_batches_tracked, moving_speed, flags, groups, eps, bn_eps, momentum, \
            update, views = options
        if moving_speed is not None and update:  # the rate of the estimates' update alone
            momentum = moving_speed_value(moving_speed)
        if update and flags & _ext.BCN_ESTIMATED:
            # the estimates first, rounded to the buffers' dtype, then the eval normalization with them
            context, m = moment_arrays(x, flags, groups)
            _check_before_estimates(x, bn_weight, bn_bias, cn_weight, cn_bias, flags, groups, eps, bn_eps)
            running_update(running_mean, running_var, num_batches_tracked, m, flags, momentum, views)
            y, context, laid = _normalize_impl(x, context, None, bn_weight, bn_bias, running_mean, running_var,
                                               None, cn_weight, cn_bias, flags, groups, eps, bn_eps, momentum, False,
                                               views)
        else:
            train = _ext.BCN_TRAINING if update else 0
            y, context, laid = _normalize_impl(x, None, None, bn_weight, bn_bias, running_mean, running_var,
                                               num_batches_tracked, cn_weight, cn_bias, flags | train, groups, eps,
                                               bn_eps, momentum, update, views)
        if update:  # written through numpy: tell autograd, as an in-place torch op would (a stage may keep no count)
            torch.autograd.graph.increment_version(
                [t for t in (running_mean, running_var, num_batches_tracked) if t is not None])
        _save(ctx, x, context, flags, groups, bn_weight, bn_bias, cn_weight, cn_bias, laid)
        # what attaches the gradients to a second backward's graph: x, else a parameter (x may need none)
        ctx.anchor = None if x.requires_grad else next(
            (t for t in (bn_weight, bn_bias, cn_weight, cn_bias) if t is not None and t.requires_grad), None)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _eager_normalize_backward(ctx, dy)


# The eager routes' backwards hand data pointers to the kernels, which no trace can follow: under compiled autograd
# they run in eager mode, a graph break each. torch 2.13 to 2.15 break the graph at `data_ptr()` by themselves;
# torch 2.9 and 2.10 raised an internal error there, hence the explicit break.
@torch.compiler.disable
def _eager_normalize_backward(ctx, dy):
    saved = ctx.saved_tensors  # unpacked for autograd's check that x was not modified in place
    x = saved[0]
    if _vmapped(dy):  # the op, which vmap batches
        g = _normalize_gradients(ctx, dy, _backward_op_on_array, saved)
        return _first_order_only((*g, None), x if ctx.anchor is None else ctx.anchor, dy)
    g = backward_impl(dy, x, _saved_context(ctx, saved), ctx.flags, ctx.groups, ctx.bn_affine, ctx.cn_affine,
                      shapes=ctx.shapes, form=ctx.form)
    # x, bn_weight, bn_bias, cn_weight, cn_bias, then options
    return _first_order_only((*g, None), x if ctx.anchor is None else ctx.anchor, dy)


def _vmapped(t):
    """Whether t is a vmap's BatchedTensor, which holds no memory of its own for the kernels: autograd's
    `grad(..., is_grads_batched=True)` and `jacobian(..., vectorize=True)` run a backward under (legacy) vmap,
    with such output gradients. The eager routes' backwards then call the backward op through the dispatcher,
    where vmap runs it once per gradient of the batch."""
    functorch = torch._C._functorch
    return functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t)


def _backward_op_on_array(dy, x, context, *args):
    """normalize_backward with the eager routes' context, a numpy array (`_saved_context`)."""
    return normalize_backward(dy, x, torch.from_numpy(context), *args)


def check_running_statistics(running_mean, running_var):
    """A stage's running statistics come as a pair, both tensors or neither (one set to None by hand has nothing
    to normalize with, or to update, in its place), and neither requires grad: they are updated in place and held
    constant, never differentiated (the kernels gave them no gradient, silently, where the composed route gave
    one; torch's batch norms refuse them, in training and eval). native_ops.cpp's eager op makes the same checks
    in the same words, for nothing, so that the common route pays no Python for them."""
    if (running_mean is None) is not (running_var is None):
        has, lacks = ("mean", "variance") if running_var is None else ("variance", "mean")
        raise ValueError(f"the batch-norm stage has a running {has} but no running {lacks} (None): give it both "
                         f"running statistics, or neither")
    for t, what in ((running_mean, "mean"), (running_var, "variance")):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"the running {what} requires grad: running statistics are held constant, never "
                               f"differentiated (torch's batch norms refuse them too); turn it off with "
                               f"requires_grad_(False)")


def eager_forward(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, moving_speed, cn_weight,
                  cn_bias, flags, groups, eps, bn_eps, momentum, update, views=None):
    """The eager route's forward: `update` trains with running buffers (updated in place); otherwise flags
    say batch statistics (BCN_TRAINING) or running ones. `views`: the calling module's `KernelViews`. With the
    native library, the whole forward is its op `_eager_normalize`, whose backward is a node of autograd's graph
    in C++ (native_ops.cpp): the same kernel calls, without the Python around them."""
    if NATIVE:
        return _eager_normalize(x, bn_weight, bn_bias, cn_weight, cn_bias, running_mean, running_var,
                                num_batches_tracked, moving_speed, flags, groups, eps, bn_eps, momentum, update)
    check_running_statistics(running_mean, running_var)  # (the native op checks them in C++)
    return _EagerForward.apply(x, bn_weight, bn_bias, cn_weight, cn_bias, (
        running_mean, running_var, num_batches_tracked, moving_speed, flags, groups, eps, bn_eps, momentum, update,
        views))


class _EagerWeightStandardization(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, eps, flags, views):
        out = weight_standardization_impl(w, eps, flags, views)
        _ws_setup(ctx, (w, eps, flags), out)
        ctx.views = views
        return out

    @staticmethod
    def backward(ctx, grad):
        return _eager_weight_standardization_backward(ctx, grad)


@torch.compiler.disable  # (see _eager_normalize_backward)
def _eager_weight_standardization_backward(ctx, grad):
    (w,) = ctx.saved_tensors
    if _vmapped(grad):  # the op, which vmap batches (as in _eager_normalize_backward)
        dw = weight_standardization_backward(grad, w, ctx.eps, ctx.flags)
    else:
        dw = weight_standardization_backward_impl(grad, w, ctx.eps, ctx.flags, ctx.views)
    return _first_order_only((dw, None, None, None), w, grad)


def eager_weight_standardization(w, eps, flags, views=None):
    """The eager route of `weight_standardization`, a direct call (`views`: the layer's `KernelViews`); a traced
    call takes the op itself."""
    if NATIVE:  # its backward a C++ node of autograd's graph, as eager_forward's
        return _eager_weight_standardization(w, eps, flags)
    return _EagerWeightStandardization.apply(w, eps, flags, views)


# ---- the native kernels -------------------------------------------------------------------------------------

#: whether the ops run their C++ kernels (native_ops.cpp; see _native.py) on the CPU, and the eager route the
#: library's C++ autograd Functions; False: the Python kernels and autograd.Functions above.
NATIVE = _native.load()
_eager_normalize = torch.ops.bcnswift._eager_normalize.default if NATIVE else None
_eager_weight_standardization = torch.ops.bcnswift._eager_weight_standardization.default if NATIVE else None
