"""The functional form of bcnswift.torch: one fused call per layer, on the Swift kernels when they take the
tensors (CPU float32/float64, every tensor of the input's dtype) and composed of torch operations otherwise.

``batch_channel_norm(x, bn, cn)`` normalizes x ([B, C, *]) with a batch-norm stage described by ``bn``
(a ``BatchNormStage``), a channel-norm stage described by ``cn`` (a ``ChannelNormStage``), or both fused.
Modules build the stages from their parameters and buffers on every call; the running buffers in ``bn`` are
updated in place when ``bn.training`` and ``bn.track_running_stats`` (as torch.nn.BatchNorm2d does).
"""
import os
from typing import NamedTuple, Optional

import torch

from .. import _ext
from . import _composed, _ops

#: True when BCNSWIFT_TORCH_COMPOSED is set (to anything but "" or "0") at import: every call then takes the
#: composed pure-torch path, which tests and debugging compare against the kernels.
COMPOSED = os.environ.get("BCNSWIFT_TORCH_COMPOSED", "") not in ("", "0")


class BatchNormStage(NamedTuple):
    """A batch-norm stage: its convention (ABI flags: BCN_BATCH_NORM plus BCN_ESTIMATED,
    BCN_UNBIASED_RUNNING_VAR, BCN_VARIANCE_AROUND_RUNNING_MEAN as the document says), its parameters (None:
    not affine) and buffers (None: no running statistics), and the mode."""
    flags: int
    eps: float
    momentum: Optional[float]  # None: cumulative average (1/num_batches_tracked)
    moving_speed: Optional[torch.Tensor]  # the authors' EstBN: the update rate is this buffer's value
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    training: bool
    track_running_stats: bool


class ChannelNormStage(NamedTuple):
    """A channel-norm stage: per sample, statistics over each of `groups` groups of channels, then a per-group
    affine (None: not affine)."""
    groups: int
    eps: float
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _fast(x, tensors):
    # is_cpu: device.type builds a device object, about 1 us a tensor, on every call of every layer
    if COMPOSED or not x.is_cpu or x.dtype not in (torch.float32, torch.float64):
        return False
    dtype = x.dtype
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype != dtype):
            return False
    return True


def batch_channel_norm(x, bn: Optional[BatchNormStage], cn: Optional[ChannelNormStage], *, views=None):
    """y = channel_norm(batch_norm(x)) (either stage may be None), fused; see the module docstring. `views`: a
    dict the caller keeps between calls, in which the kernels' route keeps the numpy views of the stages'
    tensors (bcnswift's modules pass their own, `KernelViews`); None makes them afresh on each call."""
    if x.dim() < 2:
        raise ValueError(f"expected an input of rank >= 2 ([B, C, *]), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    flags, groups, eps = 0, 1, 1e-5
    tensors = []
    if cn is not None:
        flags |= _ext.BCN_CHANNEL_NORM
        groups, eps = cn.groups, cn.eps
        tensors += [cn.weight, cn.bias]
    if bn is None:
        if not _fast(x, tensors):
            return _composed.normalize(x, None, None, None, None, cn.weight, cn.bias, flags, groups, eps, eps)
        if not torch.compiler.is_compiling():
            return _ops.eager_forward(x, None, None, None, None, None, None, cn.weight, cn.bias, flags, groups, eps,
                                      eps, 0.0, False, views)
        return _ops.normalize(x, None, None, None, None, None, None, cn.weight, cn.bias, flags, groups, eps,
                              eps)[0]
    flags |= bn.flags
    batch_statistics = bn.training or not bn.track_running_stats or bn.running_mean is None
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if bn.momentum is None:
        flags |= _ext.BCN_CUMULATIVE_AVERAGE
    momentum = 0.0 if bn.momentum is None else float(bn.momentum)
    estimated = update and bool(flags & _ext.BCN_ESTIMATED)
    tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    cn_weight, cn_bias = (cn.weight, cn.bias) if cn is not None else (None, None)
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    train = _ext.BCN_TRAINING if batch_statistics and not estimated else 0
    if not _fast(x, tensors):
        if update:
            _composed.running_update_(*buffers, x, flags, momentum, bn.moving_speed)
        return _composed.normalize(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, cn_weight, cn_bias,
                                   flags | train, groups, eps, bn.eps)
    if not torch.compiler.is_compiling():
        return _ops.eager_forward(x, bn.weight, bn.bias, *buffers, bn.moving_speed, cn_weight, cn_bias,
                                  flags | (0 if update else train), groups, eps, bn.eps, momentum, update, views)
    if not update:
        return _ops.normalize(x, None, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, cn_weight,
                              cn_bias, flags | train, groups, eps, bn.eps)[0]
    # traced: the functional normalization, then the buffers' update (the one op that mutates). With batch
    # statistics the normalization measures the batch and returns its moments for the update; estimated, the
    # moments come first, then the update, then the normalization with the updated buffers, held constant as the
    # documents do
    if not estimated:
        y, _, moments = _ops.normalize_batch(x, bn.weight, bn.bias, cn_weight, cn_bias, flags | train, groups, eps,
                                             bn.eps)
        _ops.update_running_(*buffers, moments, flags, momentum, bn.moving_speed)
        return y
    context, moments = _ops.moments(x.detach(), flags, groups)
    _ops.update_running_(*buffers, moments, flags, momentum, bn.moving_speed)
    return _ops.normalize(x, context, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, cn_weight,
                          cn_bias, flags | train, groups, eps, bn.eps)[0]


def weight_standardization(w, eps=1e-5, eps_in_sqrt=False, unbiased=True, *, views=None):
    """w with each output channel (w[o]) standardized over its fan-in: (w - mean) / (std + eps) (the authors'
    convolution; eps_in_sqrt=False) or (w - mean) / sqrt(var + eps) (labml; eps_in_sqrt=True), with the unbiased
    std and var unless unbiased=False. Differentiable. `views` as in `batch_channel_norm` (the WS layers')."""
    flags = (_ext.BCN_WS_UNBIASED if unbiased else 0) | (_ext.BCN_WS_EPS_IN_SQRT if eps_in_sqrt else 0)
    if COMPOSED or not w.is_cpu or w.dtype not in (torch.float32, torch.float64):
        return _composed.weight_standardization(w, eps, flags)
    return _ops.weight_standardization_route(w, float(eps), flags, views)
