"""Model surgery: swap an existing model's normalization for the authors' BCNorm (and its convolutions for
Weight-Standardized ones), and fold Weight Standardization away for inference."""
import torch
from torch import nn

from .modules import BCNorm, EstBN
from .weight_standardized import PLAIN, Conv2d, plain_copy


def largest_divisor_at_most(channels, limit):
    """The largest divisor of `channels` that is at most `limit` (at least 1)."""
    return max(d for d in range(1, min(channels, max(limit, 1)) + 1) if channels % d == 0)


def _bcnorm_for(layer, num_groups, estimate, momentum):
    C = layer.num_features if isinstance(layer, nn.BatchNorm2d) else layer.num_channels
    ref = layer.weight if layer.weight is not None else next(iter(layer.buffers()), None)
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = BCNorm(C, largest_divisor_at_most(C, num_groups), eps=layer.eps, estimate=estimate, **kw)
    bn = new.bn
    bn.eps = layer.eps
    with torch.no_grad():
        if layer.weight is not None:  # BatchNorm2d's affine, or GroupNorm's per-channel affine
            bn.weight.copy_(layer.weight)
            bn.bias.copy_(layer.bias)
        if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None:
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
    - with estimate=True, ``bn`` is EstBN with its moving speed set to `momentum` (the authors' 0 would freeze
      the estimates).

    Returns the converted model: `model` itself, changed in place, unless `model` is itself one of the layers
    replaced. Layers already inside a BCNorm are left alone.
    """
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if estimate and momentum is None:
        raise ValueError("estimate=True needs a momentum (EstBN has no cumulative average)")
    if type(model) in (nn.BatchNorm2d, nn.GroupNorm):
        return _bcnorm_for(model, num_groups, estimate, momentum)
    if weight_standardization and type(model) is nn.Conv2d:
        return _ws_conv_for(model)
    if isinstance(model, (BCNorm, EstBN)):
        return model
    for name, child in model.named_children():
        new = convert(child, num_groups, estimate, weight_standardization, momentum)
        if new is not child:
            setattr(model, name, new)
    return model


def fold_weight_standardization(model):
    """For inference: replaces every Weight-Standardized layer in `model` by the plain torch layer holding its
    standardized weight (the same outputs, without standardizing on every call). Returns the model (in place,
    unless `model` is itself such a layer)."""
    if type(model) in PLAIN:
        return plain_copy(model)
    for name, child in model.named_children():
        new = fold_weight_standardization(child)
        if new is not child:
            setattr(model, name, new)
    return model
