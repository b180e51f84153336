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
"""
from typing import Optional

import numpy as np
import torch

from .. import _ext
from ..layers import memory_format

_CONTEXT_HEADER = 10  # doubles before the context's arrays (NormalizationContext.headerLength)


def context_length(batch, channels, groups):
    """Doubles a context holds for [batch, channels, *] with `groups` channel-norm groups (0 without one):
    NormalizationContext.length, written with + and * only so it holds for symbolic sizes in fake kernels."""
    return _CONTEXT_HEADER + 4 * batch * channels + 4 * channels + 2 * batch * groups + groups


def _groups(flags, groups):
    return groups if flags & _ext.BCN_CHANNEL_NORM else 0


def _array(t):
    """A numpy view of a CPU tensor's memory (no copy)."""
    return t.detach().numpy()


def _param(t):
    return None if t is None else _array(t.contiguous())


def _layout(x):
    """(x or a dense copy, flags for its memory format): the kernels read [B, C, *] in C order or channels-last."""
    form = memory_format(_array(x)) if x.dim() >= 2 else None
    if form is None:
        x = x.contiguous()
        form = "first"
    return x, _ext.BCN_CHANNELS_LAST if form == "last" else 0


def _like(t, x):
    """`t` in x's memory layout (a copy only when they differ)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _output(x):
    """An uninitialized tensor shaped like x, in x's memory format (what the fake kernels promise)."""
    return torch.empty_like(x)


def _check_input(x, name="input"):
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"bcnswift ops take CPU float32 or float64 tensors, got {name} {x.dtype} on {x.device}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have rank >= 2 ([B, C, *]), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


# ---- forward phase (a) --------------------------------------------------------------------------------------

@torch.library.custom_op("bcnswift::moments", mutates_args=(), device_types="cpu")
def moments(x: torch.Tensor, flags: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_input(x)
    x, form = _layout(x)
    B, C = x.shape[0], x.shape[1]
    # zeros, not empty: the kernels leave parts of a context unused, and an output must be deterministic
    ctx = torch.zeros(context_length(B, C, _groups(flags, groups)), dtype=torch.float64)
    m = torch.empty(3 * C, dtype=torch.float64)
    _ext.norm_moments(flags | form, groups, _array(x), _array(m), _array(ctx))
    return ctx, m


@moments.register_fake
def _(x, flags, groups):
    B, C = x.shape[0], x.shape[1]
    return (x.new_empty(context_length(B, C, _groups(flags, groups)), dtype=torch.float64),
            x.new_empty(3 * C, dtype=torch.float64))


# ---- the running update alone -------------------------------------------------------------------------------

@torch.library.custom_op("bcnswift::update_running_",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"), device_types="cpu")
def update_running_(running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked: torch.Tensor,
                    moments: torch.Tensor, flags: int, momentum: float,
                    moving_speed: Optional[torch.Tensor]) -> None:
    """momentum, or with `moving_speed` (a one-element tensor: the authors' EstBN buffer) its value; with
    BCN_CUMULATIVE_AVERAGE in flags, neither (1/num_batches_tracked)."""
    if moving_speed is not None:
        momentum = float(moving_speed.reshape(-1)[0])
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _ext.running_update(flags, momentum, _array(moments.contiguous()), _array(running_mean),
                        _array(running_var), _array(num_batches_tracked))


@update_running_.register_fake
def _(running_mean, running_var, num_batches_tracked, moments, flags, momentum, moving_speed):
    return None


# ---- the normalization --------------------------------------------------------------------------------------

@torch.library.custom_op("bcnswift::normalize", mutates_args=(), device_types="cpu")
def normalize(x: torch.Tensor, context: Optional[torch.Tensor], moments: Optional[torch.Tensor],
              bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
              running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
              cn_weight: Optional[torch.Tensor], cn_bias: Optional[torch.Tensor],
              flags: int, groups: int, eps: float, bn_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_input(x)
    x, form = _layout(x)
    flags = (flags & ~_ext.BCN_CUMULATIVE_AVERAGE) | form
    B, C = x.shape[0], x.shape[1]
    y = _output(x)
    bn = bool(flags & _ext.BCN_BATCH_NORM)
    bw = bb = rm = rv = nbt = None
    if bn:
        dt = _array(x).dtype
        bw = np.ones(C, dt) if bn_weight is None else _param(bn_weight)
        bb = np.zeros(C, dt) if bn_bias is None else _param(bn_bias)
        if flags & _ext.BCN_TRAINING:
            # this op is functional: any update the kernel makes goes to scratch copies (update_running_ makes
            # the real one); batch statistics do not read the buffers at all
            rm = np.zeros(C, dt) if running_mean is None else _array(running_mean).copy()
            rv = np.ones(C, dt) if running_var is None else _array(running_var).copy()
        else:
            if running_mean is None or running_var is None:
                raise ValueError("normalizing with running statistics (eval) needs running_mean and running_var")
            rm, rv = _param(running_mean), _param(running_var)
        nbt = np.zeros((), np.int64)
    cn = bool(flags & _ext.BCN_CHANNEL_NORM)
    cw, cb = (_param(cn_weight), _param(cn_bias)) if cn else (None, None)
    if cn and (cw is None or cb is None):
        dt = _array(x).dtype
        cw = np.ones(groups, dt) if cw is None else cw
        cb = np.zeros(groups, dt) if cb is None else cb
    if context is None:
        out_ctx = torch.zeros(context_length(B, C, _groups(flags, groups)), dtype=torch.float64)
        _ext.norm_forward(flags, groups, eps, bn_eps, 0.1, _array(x), _array(y), bw, bb, rm, rv, nbt, cw, cb,
                          _array(out_ctx))
    else:
        out_ctx = context.clone()
        m = None if moments is None else _array(moments.contiguous())
        _ext.norm_forward(flags, groups, eps, bn_eps, 0.1, _array(x), _array(y), bw, bb, rm, rv, nbt, cw, cb,
                          _array(out_ctx), m)
    return y, out_ctx


@normalize.register_fake
def _(x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps,
      bn_eps):
    B, C = x.shape[0], x.shape[1]
    return _output(x), x.new_empty(context_length(B, C, _groups(flags, groups)), dtype=torch.float64)


@torch.library.custom_op("bcnswift::normalize_backward", mutates_args=(), device_types="cpu")
def normalize_backward(dy: torch.Tensor, x: torch.Tensor, context: torch.Tensor, flags: int, groups: int,
                       bn_affine: bool, cn_affine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    """dx and the parameter gradients (empty tensors for a stage that is absent or not affine)."""
    _check_input(x)
    x, form = _layout(x)
    flags = (flags & ~_ext.BCN_CUMULATIVE_AVERAGE) | form
    C = x.shape[1]
    dy = _like(dy.to(x.dtype), x)
    dx = _output(x)
    bn = bool(flags & _ext.BCN_BATCH_NORM) and bn_affine
    cn = bool(flags & _ext.BCN_CHANNEL_NORM) and cn_affine
    grads = [x.new_zeros(C if bn else 0), x.new_zeros(C if bn else 0),
             x.new_zeros(groups if cn else 0), x.new_zeros(groups if cn else 0)]
    arrays = [_array(g) if g.numel() else None for g in grads]
    _ext.norm_backward(flags, groups, _array(x), _array(dy), _array(dx), *arrays, _array(context))
    return (dx, *grads)


@normalize_backward.register_fake
def _(dy, x, context, flags, groups, bn_affine, cn_affine):
    C = x.shape[1]
    bn = bool(flags & _ext.BCN_BATCH_NORM) and bn_affine
    cn = bool(flags & _ext.BCN_CHANNEL_NORM) and cn_affine
    return (_output(x), x.new_empty(C if bn else 0), x.new_empty(C if bn else 0),
            x.new_empty(groups if cn else 0), x.new_empty(groups if cn else 0))


def _normalize_setup(ctx, inputs, output):
    x, _, _, bn_weight, bn_bias, _, _, cn_weight, cn_bias, flags, groups, _, _ = inputs
    ctx.save_for_backward(x, output[1])
    ctx.mark_non_differentiable(output[1])  # the context is bookkeeping, not a value
    ctx.flags, ctx.groups = flags, groups
    ctx.shapes = [None if t is None else t.shape for t in (bn_weight, bn_bias, cn_weight, cn_bias)]
    ctx.bn_affine = bn_weight is not None
    ctx.cn_affine = cn_weight is not None


def _normalize_grad(ctx, dy, _dcontext):
    x, context = ctx.saved_tensors
    dx, dbw, dbb, dcw, dcb = normalize_backward(dy, x, context, ctx.flags, ctx.groups, ctx.bn_affine,
                                                ctx.cn_affine)
    grads = [None if shape is None else g.reshape(shape) for g, shape in zip((dbw, dbb, dcw, dcb), ctx.shapes)]
    # x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps,
    # bn_eps
    return dx, None, None, grads[0], grads[1], None, None, grads[2], grads[3], None, None, None, None


torch.library.register_autograd("bcnswift::normalize", _normalize_grad, setup_context=_normalize_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("bcnswift.torch's kernels have no second derivative (double backward); set "
                       "BCNSWIFT_TORCH_COMPOSED=1 for the composed pure-torch path, which has")


torch.library.register_autograd("bcnswift::normalize_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- Weight Standardization ---------------------------------------------------------------------------------

def _check_weight(w):
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"bcnswift ops take CPU float32 or float64 tensors, got a weight {w.dtype} on {w.device}")
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(f"weight must have rank >= 2 ([out_channels, ...]) and values, got shape {tuple(w.shape)}")


def _ws_output(w):
    """An output like w; computed in C order, then laid out as w is (conv weights may be channels_last)."""
    return torch.empty_like(w)


@torch.library.custom_op("bcnswift::weight_standardization", mutates_args=(), device_types="cpu")
def weight_standardization(w: torch.Tensor, eps: float, flags: int) -> torch.Tensor:
    _check_weight(w)
    out = _ws_output(w)
    dense = out if out.is_contiguous() else torch.empty_like(w, memory_format=torch.contiguous_format)
    _ext.ws_forward(flags, eps, _array(w.contiguous()), _array(dense))
    return out if dense is out else out.copy_(dense)


@weight_standardization.register_fake
def _(w, eps, flags):
    return _ws_output(w)


@torch.library.custom_op("bcnswift::weight_standardization_backward", mutates_args=(), device_types="cpu")
def weight_standardization_backward(grad: torch.Tensor, w: torch.Tensor, eps: float, flags: int) -> torch.Tensor:
    _check_weight(w)
    out = _ws_output(w)
    dense = out if out.is_contiguous() else torch.empty_like(w, memory_format=torch.contiguous_format)
    _ext.ws_backward(flags, eps, _array(w.contiguous()), _array(grad.to(w.dtype).contiguous()), _array(dense))
    return out if dense is out else out.copy_(dense)


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
