"""Model surgery: swap an existing model's normalization for the authors' BCNorm (and its convolutions for
Weight-Standardized ones), and fold Weight Standardization away for inference."""
import itertools

import torch
from torch import nn

from .modules import BCNorm, EstBN
from .weight_standardized import PLAIN, Conv2d, plain_copy


def largest_divisor_at_most(channels, limit):
    """The largest divisor of `channels` that is at most `limit` (at least 1)."""
    return max(d for d in range(1, min(channels, max(limit, 1)) + 1) if channels % d == 0)


def _reference(module, default):
    """A parameter or buffer of `module` (its own first, then its children's), whose device and dtype a layer made
    for it takes; else `default` (one of an enclosing module's)."""
    return next(itertools.chain(module.parameters(), module.buffers()), default)


def _bcnorm_for(layer, num_groups, estimate, momentum, like):
    C = layer.num_features if isinstance(layer, nn.BatchNorm2d) else layer.num_channels
    ref = _reference(layer, like)  # a GroupNorm without affine has no tensor of its own
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = BCNorm(C, largest_divisor_at_most(C, num_groups), eps=layer.eps, estimate=estimate, **kw)
    if not estimate:
        # the replaced layer's affine and track_running_stats (EstBN, the authors' module, has both always)
        tracks = layer.track_running_stats if isinstance(layer, nn.BatchNorm2d) else True
        new.bn = nn.BatchNorm2d(C, layer.eps, affine=layer.affine, track_running_stats=tracks, **kw)
    bn = new.bn
    bn.eps = layer.eps
    with torch.no_grad():
        if layer.weight is not None:  # BatchNorm2d's affine, or GroupNorm's per-channel affine
            bn.weight.copy_(layer.weight)
            bn.bias.copy_(layer.bias)
        if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None and bn.running_mean is not None:
            bn.running_mean.copy_(layer.running_mean)
            bn.running_var.copy_(layer.running_var)
            bn.num_batches_tracked.copy_(layer.num_batches_tracked)
        if estimate:
            bn.estbn_moving_speed.fill_(momentum)  # a speed of 0 would freeze the estimates
    if not estimate:
        bn.momentum = layer.momentum if isinstance(layer, nn.BatchNorm2d) else momentum
    new.train(layer.training)
    return new


def _ws_conv_for(conv):
    new = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                 dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                 padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    return new


def convert(model, num_groups=32, estimate=True, weight_standardization=True, momentum=0.1):
    """Swaps every nn.BatchNorm2d and nn.GroupNorm in `model` for the authors' BCNorm, and with
    weight_standardization every plain nn.Conv2d for the WS Conv2d (authors' convention), keeping weights.

    - each BCNorm keeps the replaced layer's eps (for both stages), and has the largest divisor of its channel
      count that is at most `num_groups` as its number of groups;
    - a BatchNorm2d's affine, running statistics and count go to ``bn.*`` (its momentum too, with
      estimate=False); a GroupNorm's per-channel affine goes to ``bn.weight``, ``bn.bias``;
    - with estimate=False, ``bn`` is an nn.BatchNorm2d with the replaced layer's ``affine`` and
      ``track_running_stats`` (a GroupNorm's affine, and running statistics);
    - with estimate=True, ``bn`` is EstBN with its moving speed set to `momentum` (the authors' 0 would freeze
      the estimates); EstBN always has an affine (from 1 and 0 when the replaced layer had none) and estimates.

    Each new layer takes the device and dtype of the replaced one (of an enclosing module's tensors when it has
    none). A layer that appears at several places in `model` is replaced by one new layer at all of them. Only
    layers of exactly these types are swapped: subclasses (nn.SyncBatchNorm among them) may compute otherwise.

    Returns the converted model: `model` itself, changed in place, unless `model` is itself one of the layers
    replaced. Layers already inside a BCNorm are left alone.
    """
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if estimate and momentum is None:
        raise ValueError("estimate=True needs a momentum (EstBN has no cumulative average)")

    def swap(layer, like):
        if type(layer) in (nn.BatchNorm2d, nn.GroupNorm):
            return _bcnorm_for(layer, num_groups, estimate, momentum, like)
        if weight_standardization and type(layer) is nn.Conv2d:
            return _ws_conv_for(layer)
        return layer if isinstance(layer, (BCNorm, EstBN)) else None
    return _replace(model, swap, None, {})


def _replace(model, swap, like, done):
    """`model` with every layer for which swap(layer, like) gives a module replaced by it, at every place a module
    holds it (nn.Module.named_children yields a child held twice once), and not descended into; swap gives None
    to descend. `like`: a tensor of the nearest enclosing module that has one (`_reference`). `done`: what each
    layer met so far became (by id), so that a layer shared between places stays one layer."""
    if id(model) in done:
        return done[id(model)]
    new = swap(model, like)
    if new is not None:
        done[id(model)] = new
        return new
    like = _reference(model, like)
    for name, child in list(model._modules.items()):
        if child is not None:
            replaced = _replace(child, swap, like, done)
            if replaced is not child:
                setattr(model, name, replaced)
    return model


def fold_weight_standardization(model):
    """For inference: replaces every Weight-Standardized layer in `model` by the plain torch layer holding its
    standardized weight (the same outputs, without standardizing on every call). Returns the model (in place,
    unless `model` is itself such a layer)."""
    return _replace(model, lambda layer, like: plain_copy(layer) if type(layer) in PLAIN else None, None, {})
