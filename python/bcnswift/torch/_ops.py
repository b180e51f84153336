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
- ``bcnswift::normalize_backward(dy, x, context, flags, groups, bn_affine, cn_affine) -> (dx, d_bn_weight,
  d_bn_bias, d_cn_weight, d_cn_bias)``; a second derivative raises.
- ``bcnswift::weight_standardization(w, eps, flags)`` and ``bcnswift::weight_standardization_backward``.

Tensors reach the kernels without a copy when they are CPU float32/float64 and dense in C order or channels-last
(``tensor.numpy()`` shares memory); outputs take the input's memory format. Flags are the C ABI's (bcnswift.h);
the memory-format flag is set here, from the strides.

Each op is one plain function (``_moments``, ...), reached two ways: as the registered custom op, which
torch.compile and torch.export trace, and in eager mode directly, through ``torch.autograd.Function``
(``eager_forward``, ``weight_standardization_route``): a trip through the dispatcher costs tens of
microseconds per op, more than the kernels take on the small tensors of a CNN's later stages, so eager mode makes
one call per layer where the ops make three. Both give the same bits.
"""
import os
import types
import warnings
from typing import Optional

import numpy as np
import torch

from .. import _ext, _thread_count
from ..layers import channels_last_strides

# inductor may hand the ops any layout it likes (channels_last, as its convolutions prefer): the kernels read
# C order and channels-last in place, copy anything else, and the fake kernels promise the same output strides
_ANY_LAYOUT = (torch.Tag.flexible_layout,)

# ---- threads ------------------------------------------------------------------------------------------------
# PyTorch's intra-op threads (OpenMP) keep polling for a while after each parallel operation. bcnswift's own
# workers, woken for a kernel right after one, would compete with them for the same cores, and torch's next
# operation with bcnswift's polling workers. In a training step the kernels do better alone on the calling
# thread (docs/PYTORCH.md, "Threads"), so that is the default here, for these ops only.

def _default_threads():
    raw = os.environ.get("BCNSWIFT_TORCH_NUM_THREADS", "").strip()
    if not raw:
        return 1
    try:
        return _thread_count(int(raw))
    except (TypeError, ValueError):
        warnings.warn(f"BCNSWIFT_TORCH_NUM_THREADS={raw!r} is not a thread count in [0, 4096]; using 1")
        return 1


_threads = _default_threads()


def set_num_threads(n):
    """Threads for the kernels of bcnswift.torch's operations: 1 (the default, or BCNSWIFT_TORCH_NUM_THREADS)
    runs them on the calling thread, beside torch's own thread pool; n > 1 uses bcnswift's workers too; 0 leaves
    the choice to bcnswift (the calling thread's bcnswift.num_threads block, else bcnswift.set_num_threads's
    count). Results are bitwise identical for every count."""
    global _threads
    _threads = _thread_count(n)


def get_num_threads():
    """The thread count bcnswift.torch's kernels run with (0: as bcnswift chooses; see set_num_threads)."""
    return _threads


def _with_torch_threads(name):
    """The extension's kernel `name`, run under this module's thread count, set for the calling thread only and
    restored after (with 0, the calling thread's setting is left as it is)."""
    def run(*args):
        if not _threads:
            return getattr(_ext, name)(*args)
        saved = _ext.set_calling_thread_num_threads(_threads)
        try:
            return getattr(_ext, name)(*args)
        finally:
            _ext.set_calling_thread_num_threads(saved)
    run.__name__ = run.__qualname__ = name
    return run


# every kernel call of these ops goes through here
_kernels = types.SimpleNamespace(**{name: _with_torch_threads(name) for name in (
    "norm_moments", "running_update", "norm_forward", "norm_backward_sums", "norm_backward", "ws_forward",
    "ws_backward")})

_CONTEXT_HEADER = 10  # doubles before the context's arrays (NormalizationContext.headerLength)
_CONTEXT_FORMAT = 6  # the header's memory format: 0 C order, 1 channels-last (NormalizationContext.writeHeader)


def context_length(batch, channels, groups):
    """Doubles a context holds for [batch, channels, *] with `groups` channel-norm groups (0 without one):
    NormalizationContext.length, written with + and * only so it holds for symbolic sizes in fake kernels."""
    return _CONTEXT_HEADER + 4 * batch * channels + 4 * channels + 2 * batch * groups + groups


def _groups(flags, groups):
    return groups if flags & _ext.BCN_CHANNEL_NORM else 0


def _array(t):
    """A numpy view of a CPU tensor's memory (no copy)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _param(t):
    return None if t is None else _array(t if t.is_contiguous() else t.contiguous())


def _form(t):
    """'first' if t is in C order, 'last' if its memory is channels-last ([B, *, C] in C order, as
    torch.channels_last), else None: what the kernels read in place. From the strides alone, so that the fake
    kernels, which see no memory, decide as the real ones do."""
    if t.is_contiguous():
        return "first"
    return "last" if channels_last_strides(t.shape, t.stride(), 1) else None


def _like(t, x):
    """`t` in x's memory layout (a copy only when they differ). The stride of an axis of size 1 says nothing
    about the layout (torch gives a [O, I, 1, 1] weight's gradient other ones than the weight's), so it is not
    compared."""
    same = all(a == b for a, b, n in zip(t.stride(), x.stride(), x.shape) if n != 1)
    return t if same else torch.empty_like(x).copy_(t)


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

def _moments(x: torch.Tensor, flags: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_input(x)
    x, form, _ = _context_layout(x, None)  # where it lies, or a C-order copy
    B, C = x.shape[0], x.shape[1]
    # zeros, not empty: the kernels leave parts of a context unused, and an output must be deterministic
    # (made in numpy and lent to torch: a torch tensor's numpy view costs 2 us)
    ctx = np.zeros(context_length(B, C, _groups(flags, groups)))
    m = np.empty(3 * C)
    _kernels.norm_moments(flags | form, groups, _array(x), m, ctx)
    return torch.from_numpy(ctx), torch.from_numpy(m)


moments = torch.library.custom_op("bcnswift::moments", _moments, mutates_args=(), device_types="cpu",
                                  tags=_ANY_LAYOUT)


@moments.register_fake
def _(x, flags, groups):
    B, C = x.shape[0], x.shape[1]
    return (x.new_empty(context_length(B, C, _groups(flags, groups)), dtype=torch.float64),
            x.new_empty(3 * C, dtype=torch.float64))


# ---- the running update alone -------------------------------------------------------------------------------

def _update_running(running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked: torch.Tensor,
                    moments: torch.Tensor, flags: int, momentum: float,
                    moving_speed: Optional[torch.Tensor]) -> None:
    """momentum, or with `moving_speed` (a one-element tensor: the authors' EstBN buffer) its value; with
    BCN_CUMULATIVE_AVERAGE in flags, neither (1/num_batches_tracked)."""
    if moving_speed is not None:
        momentum = float(moving_speed.reshape(-1)[0])
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _kernels.running_update(flags, momentum, _array(moments.contiguous()), _array(running_mean),
                            _array(running_var), _array(num_batches_tracked))


update_running_ = torch.library.custom_op(
    "bcnswift::update_running_", _update_running, mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    device_types="cpu")


@update_running_.register_fake
def _(running_mean, running_var, num_batches_tracked, moments, flags, momentum, moving_speed):
    return None


# ---- the normalization --------------------------------------------------------------------------------------

def _normalize_impl(x, context, moments, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                    cn_weight, cn_bias, flags, groups, eps, bn_eps, momentum, write_buffers):
    """(y, context): phase (c) on a ``moments`` context, or the whole forward without one. With
    write_buffers, a training forward updates the running buffers given, in place, at `momentum` (the eager
    route's single call); without, the kernel's update goes to scratch copies (the functional op)."""
    _check_input(x)
    given = x
    context_array = None if context is None else _array(context)
    x, form, relaid = _context_layout(x, context_array)
    if not write_buffers:
        flags, momentum = flags & ~_ext.BCN_CUMULATIVE_AVERAGE, 0.1
    flags |= form
    B, C = x.shape[0], x.shape[1]
    y = torch.empty_like(x)  # _output(x): x is now in a layout the kernels read in place, so y takes it
    xa = _array(x)
    bw = bb = rm = rv = nbt = None
    if flags & _ext.BCN_BATCH_NORM:
        dt = xa.dtype
        bw = np.ones(C, dt) if bn_weight is None else _param(bn_weight)
        bb = np.zeros(C, dt) if bn_bias is None else _param(bn_bias)
        if write_buffers:
            rm, rv, nbt = _array(running_mean), _array(running_var), _array(num_batches_tracked)
        elif flags & _ext.BCN_TRAINING:
            # functional: batch statistics do not read the buffers, and the real update is update_running_'s
            rm = np.zeros(C, dt) if running_mean is None else _array(running_mean).copy()
            rv = np.ones(C, dt) if running_var is None else _array(running_var).copy()
        else:
            if running_mean is None or running_var is None:
                raise ValueError("normalizing with running statistics (eval) needs running_mean and running_var")
            rm, rv = _param(running_mean), _param(running_var)
        if nbt is None:
            nbt = np.zeros((), np.int64)
    cw = cb = None
    if flags & _ext.BCN_CHANNEL_NORM:
        cw = np.ones(groups, xa.dtype) if cn_weight is None else _param(cn_weight)
        cb = np.zeros(groups, xa.dtype) if cn_bias is None else _param(cn_bias)
    if context is None:
        ctx_array = np.zeros(context_length(B, C, _groups(flags, groups)))
        out_ctx = torch.from_numpy(ctx_array)
        _kernels.norm_forward(flags, groups, eps, bn_eps, momentum, xa, _array(y), bw, bb, rm, rv, nbt, cw, cb,
                              ctx_array)
    else:
        if write_buffers:
            out_ctx = context
        else:  # functional: continue a copy
            context_array = context_array.copy()
            out_ctx = torch.from_numpy(context_array)
        m = None if moments is None else _array(moments.contiguous())
        _kernels.norm_forward(flags, groups, eps, bn_eps, momentum, xa, _array(y), bw, bb, rm, rv, nbt, cw, cb,
                              context_array, m)
    if relaid:
        y = _output(given).copy_(y)
    return y, out_ctx


def _normalize(x: torch.Tensor, context: Optional[torch.Tensor], moments: Optional[torch.Tensor],
               bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
               running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               cn_weight: Optional[torch.Tensor], cn_bias: Optional[torch.Tensor],
               flags: int, groups: int, eps: float, bn_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _normalize_impl(x, context, moments, bn_weight, bn_bias, running_mean, running_var, None, cn_weight,
                           cn_bias, flags, groups, eps, bn_eps, 0.1, False)


normalize = torch.library.custom_op("bcnswift::normalize", _normalize, mutates_args=(), device_types="cpu",
                                    tags=_ANY_LAYOUT)


@normalize.register_fake
def _(x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps,
      bn_eps):
    B, C = x.shape[0], x.shape[1]
    return _output(x), x.new_empty(context_length(B, C, _groups(flags, groups)), dtype=torch.float64)


def backward_impl(dy, x, context, flags, groups, bn_affine, cn_affine, merge_sums=None, shapes=None):
    """(dx, d_bn_weight, d_bn_bias, d_cn_weight, d_cn_bias); empty tensors for a stage that is absent or not
    affine. With `merge_sums` (the synchronized layers), the backward runs as its phases: the local gradient
    sums (x, dy in one layout), merge_sums(sums) -> the merged sums of every process, then the finish. With
    `shapes` (the four parameters' shapes, None where absent), the gradients take them (a torch view costs more
    than the kernel on small layers)."""
    _check_input(x)
    given = x
    ca = _array(context)
    x, form, relaid = _context_layout(x, ca)
    flags = (flags & ~_ext.BCN_CUMULATIVE_AVERAGE) | form
    C = x.shape[1]
    dy = _like(dy if dy.dtype == x.dtype else dy.to(x.dtype), x)
    dx = torch.empty_like(x)  # _output(x), as in _normalize_impl
    bn = bool(flags & _ext.BCN_BATCH_NORM) and bn_affine
    cn = bool(flags & _ext.BCN_CHANNEL_NORM) and cn_affine
    xa, dya = _array(x), _array(dy)
    sizes = (C if bn else 0, C if bn else 0, groups if cn else 0, groups if cn else 0)
    if shapes is not None:
        sizes = [shape if n and shape is not None else n for n, shape in zip(sizes, shapes)]
    arrays = [np.zeros(n, xa.dtype) for n in sizes]
    merged = ()
    if merge_sums is not None:
        sums = np.zeros(2 * C)
        _kernels.norm_backward_sums(flags, groups, xa, dya, sums, ca)
        merged = (merge_sums(sums),)
    _kernels.norm_backward(flags, groups, xa, dya, _array(dx), *(a if a.size else None for a in arrays), ca,
                           *merged)
    if relaid:
        dx = _output(given).copy_(dx)
    return (dx, *(torch.from_numpy(a) for a in arrays))


def _normalize_backward(dy: torch.Tensor, x: torch.Tensor, context: torch.Tensor, flags: int, groups: int,
                       bn_affine: bool, cn_affine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    """dx and the parameter gradients (empty tensors for a stage that is absent or not affine)."""
    return backward_impl(dy, x, context, flags, groups, bn_affine, cn_affine)


normalize_backward = torch.library.custom_op("bcnswift::normalize_backward", _normalize_backward, mutates_args=(),
                                            device_types="cpu", tags=_ANY_LAYOUT)


@normalize_backward.register_fake
def _(dy, x, context, flags, groups, bn_affine, cn_affine):
    C = x.shape[1]
    bn = bool(flags & _ext.BCN_BATCH_NORM) and bn_affine
    cn = bool(flags & _ext.BCN_CHANNEL_NORM) and cn_affine
    return (_output(x), x.new_empty(C if bn else 0), x.new_empty(C if bn else 0),
            x.new_empty(groups if cn else 0), x.new_empty(groups if cn else 0))


def _save(ctx, x, context, flags, groups, bn_weight, bn_bias, cn_weight, cn_bias):
    """What a backward needs from its forward."""
    ctx.save_for_backward(x, context)
    ctx.flags, ctx.groups = flags, groups
    ctx.shapes = [None if t is None else t.shape for t in (bn_weight, bn_bias, cn_weight, cn_bias)]
    # a stage is affine when either parameter is given (the kernels then compute both gradients)
    ctx.bn_affine = bn_weight is not None or bn_bias is not None
    ctx.cn_affine = cn_weight is not None or cn_bias is not None


def _normalize_setup(ctx, inputs, output):
    x, _, _, bn_weight, bn_bias, _, _, cn_weight, cn_bias, flags, groups, _, _ = inputs
    _save(ctx, x, output[1], flags, groups, bn_weight, bn_bias, cn_weight, cn_bias)
    ctx.mark_non_differentiable(output[1])  # the context is bookkeeping, not a value


def _normalize_gradients(ctx, dy, backward):
    x, context = ctx.saved_tensors
    dx, dbw, dbb, dcw, dcb = backward(dy, x, context, ctx.flags, ctx.groups, ctx.bn_affine, ctx.cn_affine)
    grads = [None if shape is None else g if g.shape == shape else g.view(shape)
             for g, shape in zip((dbw, dbb, dcw, dcb), ctx.shapes)]
    # x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps,
    # bn_eps
    return dx, None, None, grads[0], grads[1], None, None, grads[2], grads[3], None, None, None, None


def _normalize_grad(ctx, dy, _dcontext):
    return _normalize_gradients(ctx, dy, normalize_backward)


torch.library.register_autograd("bcnswift::normalize", _normalize_grad, setup_context=_normalize_setup)


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


def _weight_standardization(w: torch.Tensor, eps: float, flags: int) -> torch.Tensor:
    _check_weight(w)
    if _rows(w) is None:
        w = w.contiguous()
    out = torch.empty_like(w)  # in w's own layout
    _kernels.ws_forward(flags, eps, _array(_rows(w)), _array(_rows(out)))
    return out


weight_standardization = torch.library.custom_op("bcnswift::weight_standardization", _weight_standardization,
                                                mutates_args=(), device_types="cpu", tags=_ANY_LAYOUT)


@weight_standardization.register_fake
def _(w, eps, flags):
    return _ws_output(w)


def _weight_standardization_backward(grad: torch.Tensor, w: torch.Tensor, eps: float, flags: int) -> torch.Tensor:
    _check_weight(w)
    if _rows(w) is None:
        w = w.contiguous()
    grad = _like(grad if grad.dtype == w.dtype else grad.to(w.dtype), w)
    out = torch.empty_like(w)
    _kernels.ws_backward(flags, eps, _array(_rows(w)), _array(_rows(grad)), _array(_rows(out)))
    return out


weight_standardization_backward = torch.library.custom_op(
    "bcnswift::weight_standardization_backward", _weight_standardization_backward, mutates_args=(),
    device_types="cpu", tags=_ANY_LAYOUT)


@weight_standardization_backward.register_fake
def _(grad, w, eps, flags):
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
    """g, whose derivative raises: marks a gradient the kernels computed when create_graph=True. `anchor` (the
    forward's input, which requires grad then) attaches it to the graph, as a gradient computed by torch would
    be."""

    @staticmethod
    def forward(ctx, g, anchor):
        return g.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_NO_SECOND_DERIVATIVE)


def _first_order_only(grads, anchor):
    if not torch.is_grad_enabled() or not anchor.requires_grad:  # create_graph=False
        return grads
    return tuple(g if g is None else _NoSecondDerivative.apply(g, anchor) for g in grads)


class _EagerForward(torch.autograd.Function):
    """A whole training or eval forward in one call, running buffers updated in place (what moments,
    update_running_ and normalize compute together, bit for bit, without the dispatcher)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, moving_speed,
                cn_weight, cn_bias, flags, groups, eps, bn_eps, momentum, update):
        if moving_speed is not None:
            momentum = float(moving_speed.reshape(-1)[0])
        if update and flags & _ext.BCN_ESTIMATED:
            # the estimates first, rounded to the buffers' dtype, then the eval normalization with them
            context, m = _moments(x, flags, groups)
            _update_running(running_mean, running_var, num_batches_tracked, m, flags, momentum, None)
            y, context = _normalize_impl(x, context, None, bn_weight, bn_bias, running_mean, running_var, None,
                                         cn_weight, cn_bias, flags, groups, eps, bn_eps, momentum, False)
        else:
            train = _ext.BCN_TRAINING if update else 0
            y, context = _normalize_impl(x, None, None, bn_weight, bn_bias, running_mean, running_var,
                                         num_batches_tracked, cn_weight, cn_bias, flags | train, groups, eps,
                                         bn_eps, momentum, update)
        if update:  # written through numpy: tell autograd, as an in-place torch op would
            torch.autograd.graph.increment_version((running_mean, running_var, num_batches_tracked))
        _save(ctx, x, context, flags, groups, bn_weight, bn_bias, cn_weight, cn_bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        g = _normalize_gradients(ctx, dy, lambda *args: backward_impl(*args, shapes=ctx.shapes))
        # x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, moving_speed, cn_weight, cn_bias,
        # and the 6 options
        grads = (g[0], g[3], g[4], None, None, None, None, g[7], g[8]) + (None,) * 6
        return _first_order_only(grads, ctx.saved_tensors[0])


def eager_forward(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, moving_speed, cn_weight,
                  cn_bias, flags, groups, eps, bn_eps, momentum, update):
    """The eager route's forward: `update` trains with running buffers (updated in place); otherwise flags
    say batch statistics (BCN_TRAINING) or running ones."""
    return _EagerForward.apply(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                               moving_speed, cn_weight, cn_bias, flags, groups, eps, bn_eps, momentum, update)


class _EagerWeightStandardization(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, eps, flags):
        out = _weight_standardization(w, eps, flags)
        _ws_setup(ctx, (w, eps, flags), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return _first_order_only((_weight_standardization_backward(grad, w, ctx.eps, ctx.flags), None, None), w)


def weight_standardization_route(w, eps, flags):
    """The op while torch.compile traces, the direct call in eager mode."""
    if torch.compiler.is_compiling():
        return weight_standardization(w, eps, flags)
    return _EagerWeightStandardization.apply(w, eps, flags)
