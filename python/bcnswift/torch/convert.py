"""Model surgery: swap an existing model's normalization for the authors' BCNorm (and its convolutions for
Weight-Standardized ones), and fold Weight Standardization away for inference."""
import itertools

import torch
from torch import nn

from ..layers import _positive_int, real_number
from .functional import standardizable
from .modules import BCNorm, EstBN
from .weight_standardized import Conv2d, plain_copy, ws_class


def largest_divisor_at_most(channels, limit):
    """The largest divisor of `channels` that is at most `limit` (at least 1)."""
    return max(d for d in range(1, min(channels, max(limit, 1)) + 1) if channels % d == 0)


def _reference(module, default):
    """A floating-point parameter or buffer of `module` (its own first, then its children's), whose device and
    dtype a layer made for it takes; else `default` (one of an enclosing module's). Not an integer buffer (a step
    counter, say): a layer made in its dtype could hold no gradient."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return next((t for t in tensors if t.is_floating_point()), default)


def _take_parameter(module, name, parameter):
    """`parameter` (a Parameter of the replaced layer, or None: none) as `module.name`: the same object, so that
    its requires_grad, memory format and an optimizer built before the swap stay with it."""
    if parameter is None:
        module.register_parameter(name, None)
    else:
        setattr(module, name, parameter)


def _bcnorm_for(layer, num_groups, estimate, momentum, like):
    C = layer.num_features if isinstance(layer, nn.BatchNorm2d) else layer.num_channels
    if C < 1:
        raise ValueError(f"cannot convert {layer}: it has no channels to normalize")
    ref = _reference(layer, like)  # a GroupNorm without affine has no tensor of its own
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = BCNorm(C, largest_divisor_at_most(C, num_groups), eps=layer.eps, estimate=estimate, **kw)
    if not estimate:
        # the replaced layer's affine and track_running_stats (EstBN, the authors' module, has both always)
        tracks = layer.track_running_stats if isinstance(layer, nn.BatchNorm2d) else True
        new.bn = nn.BatchNorm2d(C, layer.eps, affine=layer.affine, track_running_stats=tracks, **kw)
    bn = new.bn
    bn.eps = layer.eps
    if layer.weight is not None:  # BatchNorm2d's affine, or GroupNorm's per-channel affine (bias=False: no bias)
        _take_parameter(bn, "weight", layer.weight)
        _take_parameter(bn, "bias", layer.bias)
        for p in (new.weight, new.bias):  # the new per-group affine: frozen with the layer's
            p.requires_grad_(layer.weight.requires_grad)
    with torch.no_grad():
        if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None and bn.running_mean is not None:
            bn.running_mean.copy_(layer.running_mean)
            bn.running_var.copy_(layer.running_var)
            if layer.num_batches_tracked is not None:
                bn.num_batches_tracked.copy_(layer.num_batches_tracked)
            elif not estimate:  # torch's batch norms allow none (and then count nothing); EstBN's count is unused
                bn.num_batches_tracked = None
        if estimate:
            bn.estbn_moving_speed.fill_(momentum)  # a speed of 0 would freeze the estimates
    if not estimate:
        bn.momentum = layer.momentum if isinstance(layer, nn.BatchNorm2d) else momentum
    new.train(layer.training)
    return new


def _ws_conv_for(conv):
    new = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                 dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                 padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype)
    _take_parameter(new, "weight", conv.weight)
    _take_parameter(new, "bias", conv.bias)
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

    The replaced layers' parameters move to the new ones as the same Parameter objects (a norm's weight and
    bias, a convolution's weight and bias), so their requires_grad, memory format and an optimizer that already
    holds them carry over; a norm without a bias (``bias=False``) gives a ``bn`` without one, and a batch norm
    without a count (``num_batches_tracked`` None) a ``bn`` without one with estimate=False. The new per-group
    ``weight`` and ``bias`` of a BCNorm are frozen when the replaced layer's weight is. Each new layer takes the
    device and dtype of the replaced one (of an enclosing module's tensors when it has none). A layer that
    appears at several places in `model` is replaced by one new layer at all of them. Only layers of exactly
    these types are swapped: subclasses (nn.SyncBatchNorm among them) may compute otherwise. A layer whose weight
    or bias is computed from other parameters (torch's hook-based ``weight_norm`` or ``spectral_norm``, a mask of
    ``torch.nn.utils.prune``; their parametrized forms are subclasses) has no Parameter to move and stays as it
    is. Hooks registered on a replaced layer do not move to the new one (as with
    nn.SyncBatchNorm.convert_sync_batchnorm).

    A convolution with a fan-in of 1 (a 1x1 depthwise one: one weight per output channel) stays a plain
    nn.Conv2d: its unbiased deviation, over one value, is undefined, so the WS Conv2d refuses it on every call.

    Returns the converted model: `model` itself, changed in place, unless `model` is itself one of the layers
    replaced. Layers already inside a BCNorm are left alone. A conversion that raises changes nothing.
    """
    num_groups = _positive_int(num_groups, "num_groups")
    if momentum is not None:
        momentum = real_number(momentum, "momentum", "a number or None")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if estimate and momentum is None:
        raise ValueError("estimate=True needs a momentum (EstBN has no cumulative average)")

    def swap(layer, like):
        if type(layer) in (nn.BatchNorm2d, nn.GroupNorm) and _own_parameters(layer):
            return _bcnorm_for(layer, num_groups, estimate, momentum, like)
        if weight_standardization and type(layer) is nn.Conv2d and _own_parameters(layer) \
                and standardizable(layer.weight):
            return _ws_conv_for(layer)
        return layer if isinstance(layer, (BCNorm, EstBN)) else None
    return _replace(model, swap)


def _own_parameters(layer):
    """Whether the layer's weight and bias are each a Parameter or None: not computed before each call from other
    parameters by a hook (torch's hook-based ``weight_norm`` or ``spectral_norm``, a mask of
    ``torch.nn.utils.prune``), which a new layer would not run. Such a layer stays as it is: the computed tensor
    cannot take a Parameter's place."""
    return all(t is None or isinstance(t, nn.Parameter) for t in (layer.weight, layer.bias))


def _replace(model, swap):
    """`model` with every layer for which swap(layer, like) gives a module replaced by it, at every place a module
    holds it, and not descended into; swap gives None to descend. `like`: a tensor of the nearest enclosing module
    that has one (`_reference`). Every replacement is made before any is put in place, so that a swap that raises
    leaves `model` as it was."""
    if not isinstance(model, nn.Module):  # (its first use, parameters(), raised AttributeError)
        raise TypeError(f"expected a model (a torch.nn.Module), got {type(model).__name__}")
    done, edits = {}, []  # what each layer met so far becomes (by id: a shared layer stays one), and where

    def walk(module, like):
        if id(module) in done:
            return done[id(module)]
        new = swap(module, like)
        if new is not None:
            done[id(module)] = new
            return new
        done[id(module)] = module
        like = _reference(module, like)
        # nn.Module.named_children yields a child held twice once: every place is edited here
        for name, child in list(module._modules.items()):
            if child is not None:
                replaced = walk(child, like)
                if replaced is not child:
                    edits.append((module, name, replaced))
        return module

    result = walk(model, None)
    for module, name, replaced in edits:
        setattr(module, name, replaced)
    return result


def fold_weight_standardization(model):
    """For inference: replaces every Weight-Standardized layer in `model` by the plain torch layer holding its
    standardized weight (the same outputs, without standardizing on every call). Returns the model (in place,
    unless `model` is itself such a layer). A layer whose weight or bias is computed (a parametrization such as
    ``parametrizations.weight_norm``, torch's hook-based ``weight_norm`` or ``spectral_norm``, or a mask of
    ``torch.nn.utils.prune``) folds what its next call in eval mode would compute, as a plain Parameter; reading it
    changes nothing in the model. A subclass of a WS layer folds too, unless it overrides a method its output comes
    from (its forward, say): then it is left as it is."""
    return _replace(model, lambda layer, like: plain_copy(layer) if ws_class(layer) is not None else None)
