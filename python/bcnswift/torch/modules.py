"""The documents' normalization modules, under their own names, arguments and state-dict keys, each one fused
call (functional.batch_channel_norm).

The authors' (seed 003): ``BCNorm(num_channels, num_groups, eps, estimate=False)`` holding ``bn``, a real
``torch.nn.BatchNorm2d`` (estimate=False) or ``EstBN`` (estimate=True), and the per-group ``weight``/``bias``
of shape (1, G, 1).

labml's (seeds 000, 001, 004): ``BatchChannelNorm(channels, groups, eps, momentum, estimate=True)`` holding
``batch_norm`` (``EstimatedBatchNorm`` or ``BatchNorm``) and ``channel_norm`` (``ChannelNorm``), with
``scale``/``shift`` parameters and ``exp_mean``/``exp_var`` buffers.

Every module takes input of any rank >= 2 ([B, C, *]), in C order or channels_last memory (kept by the
output), and runs on any device and dtype (the kernels take CPU float32/float64; the rest is composed).
"""

import torch
from torch import nn
from torch.nn.modules import module as _module  # the registries of every module's hooks
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _ext
from ..layers import _momentum, _positive_float, _positive_int
from ._ops import KernelViews, fx_leaf
from .functional import BatchNormStage, ChannelNormStage, batch_channel_norm, check_channel_norm, check_dense

_TORCH_BN = _ext.BCN_BATCH_NORM | _ext.BCN_UNBIASED_RUNNING_VAR
_AUTHORS_ESTBN = _ext.BCN_BATCH_NORM | _ext.BCN_ESTIMATED | _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN
_LABML_BN = _ext.BCN_BATCH_NORM
_LABML_ESTIMATED = _ext.BCN_BATCH_NORM | _ext.BCN_ESTIMATED


def _check_channels(x, channels, who):
    try:
        fits = x.dim() >= 2 and x.shape[1] == channels
    except RuntimeError:  # a nested tensor's sizes ("internal error"); batch_channel_norm checks the rest once
        check_dense(x, "input")
        raise
    if not fits:
        raise ValueError(f"{who} expects an input [B, {channels}, *], got shape {tuple(x.shape)}")


def _fill(parameter, value):
    """A parameter (None: the module has none) set to `value` everywhere, outside autograd (reset_parameters)."""
    if parameter is not None:
        with torch.no_grad():
            parameter.fill_(value)


def _check_groups(channels, groups):
    """The number of groups as an int, if it is positive and divides channels."""
    n = _positive_int(groups, "the number of groups")
    if channels % n:
        raise ValueError(f"the channel count ({channels}) must be divisible by the number of groups ({n})")
    return n


def overrides_forward(child, fused_forward):
    """Whether the class of a stage's module has a forward other than `fused_forward`, the one whose math a fused
    call computes (a subclass may override it)."""
    return type(child).forward is not fused_forward


def runs_itself(child, fused_forward):
    """Whether a stage's module must be called itself instead of fused into its parent's one call: hooks on it
    (its own, or every module's), or a forward of its own (`overrides_forward`). Then the parent calls it, as the
    documents' modules do."""
    return (overrides_forward(child, fused_forward) or bool(
        child._forward_hooks or child._forward_pre_hooks or child._backward_hooks or child._backward_pre_hooks
        or _module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
        or _module._global_backward_pre_hooks))


def torch_batch_norm_stage(bn):
    """The stage of a torch.nn.BatchNorm{1,2,3}d (any _BatchNorm): batch statistics in training, running
    variance stored unbiased, momentum None for a cumulative average, as PyTorch does. Also as PyTorch does, eval
    normalizes with the running buffers whenever they exist, track_running_stats or not (labml's BatchNorm, and
    the stage's own rule, take the batch's without it): so the stage says "tracked" in eval."""
    return BatchNormStage(_TORCH_BN, bn.eps, bn.momentum, None, bn.weight, bn.bias, bn.running_mean,
                          bn.running_var, bn.num_batches_tracked, bn.training,
                          bn.track_running_stats or not bn.training, counts_every_call=True)


class EstBN(KernelViews, nn.Module):
    """The authors' estimated batch norm (seed 003): in training, first fold the batch into the running buffers,
    the variance measured around the running mean before its update, at the rate held in the buffer
    ``estbn_moving_speed`` (which starts at 0, freezing the estimates until set); then normalize with them,
    held constant for the gradient. ``num_batches_tracked`` never advances (as in the authors' code).

    Args:
        num_features: C.
        eps: added to running_var (the authors' code fixes it at 1e-5; ``convert`` keeps a replaced layer's).
    """

    def __init__(self, num_features, eps=1e-5, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = _positive_float(eps, "eps")
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("estbn_moving_speed", torch.zeros(1, **kw))

    def reset_running_stats(self):
        """The estimates and the count at their initial values (mean 0, variance 1, count 0); the moving speed, a
        setting, stays."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self):
        """Everything at a fresh module's values, as the authors' code makes it: the estimates, weight 1, bias 0,
        and the moving speed 0 (so `to_empty` then reset gives a fresh module)."""
        self.reset_running_stats()
        _fill(self.weight, 1)
        _fill(self.bias, 0)
        self.estbn_moving_speed.zero_()

    def stage(self):
        speed = self.estbn_moving_speed  # (read once: a buffer's read goes through nn.Module.__getattr__)
        if speed is None and self.training:  # (a stage without it would update at rate 0)
            raise ValueError("estbn_moving_speed is None: a training EstBN moves its estimates at the rate this "
                             "buffer holds (the authors' code fails without it too); give it a one-value tensor "
                             "in [0, 1], e.g. torch.tensor([0.1])")
        return BatchNormStage(_AUTHORS_ESTBN, self.eps, 0.0, speed, self.weight, self.bias,
                              self.running_mean, self.running_var, self.num_batches_tracked, self.training, True)

    @fx_leaf
    def forward(self, x):
        _check_channels(x, self.num_features, "EstBN")
        return batch_channel_norm(x, self.stage(), None, views=self.kernel_views())

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


class BCNorm(KernelViews, nn.Module):
    """The authors' Batch-Channel Normalization (seed 003): ``bn`` (nn.BatchNorm2d, or EstBN with estimate=True),
    then per sample a normalization over each of num_groups groups of channels with eps and a per-group affine
    ``weight``, ``bias`` of shape (1, num_groups, 1). Fused into one call.

    ``bn`` may be any torch.nn batch norm (its momentum, eps, affine and track_running_stats are honoured) or
    EstBN; any other module there (nn.SyncBatchNorm too, which synchronizes its own statistics), and ``bn`` when
    it has hooks or a subclass's own forward, runs on its own (is called), followed by the fused channel norm.
    ``bcnswift.torch.convert_sync_batch_channel_norm`` makes a model's BCNorms synchronize the fused way.
    """

    def __init__(self, num_channels, num_groups, eps=1e-5, estimate=False, device=None, dtype=None):
        super().__init__()
        num_channels = _positive_int(num_channels, "num_channels")
        num_groups = _check_groups(num_channels, num_groups)
        kw = {"device": device, "dtype": dtype}
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = _positive_float(eps, "eps")
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1, **kw))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1, **kw))
        self.bn = EstBN(num_channels, **kw) if estimate else nn.BatchNorm2d(num_channels, **kw)

    def reset_parameters(self):
        """The per-group affine at weight 1, bias 0 (``bn`` has its own reset_parameters)."""
        _fill(self.weight, 1)
        _fill(self.bias, 0)

    @fx_leaf
    def forward(self, x):
        _check_channels(x, self.num_channels, "BCNorm")
        cn = ChannelNormStage(self.num_groups, self.eps, self.weight, self.bias)
        bn = self.bn  # a submodule: each read goes through nn.Module.__getattr__
        if isinstance(bn, EstBN) and not runs_itself(bn, EstBN.forward):
            return batch_channel_norm(x, bn.stage(), cn, views=self.kernel_views())
        if isinstance(bn, _BatchNorm) and not runs_itself(bn, _BatchNorm.forward):
            return batch_channel_norm(x, torch_batch_norm_stage(bn), cn, views=self.kernel_views())
        # any other module (nn.SyncBatchNorm among them: its statistics are its process group's, and its forward
        # its own), or one with hooks, runs on its own; the channel norm's checks first, as its call would refuse
        # x only after bn had updated its buffers
        check_channel_norm(x, cn)
        return batch_channel_norm(bn(x), None, cn, views=self.kernel_views())

    def extra_repr(self):
        return f"{self.num_channels}, {self.num_groups}, eps={self.eps}"


class BatchNorm(KernelViews, nn.Module):
    """labml's BatchNorm (seed 001): batch statistics in training (and always without running statistics),
    running variance stored biased; ``scale``/``shift`` parameters, ``exp_mean``/``exp_var`` buffers."""

    def __init__(self, channels, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        channels = _positive_int(channels, "channels")
        self.channels, self.eps, self.momentum = channels, _positive_float(eps, "eps"), _momentum(momentum)
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.scale = nn.Parameter(torch.ones(channels, **kw))
            self.shift = nn.Parameter(torch.zeros(channels, **kw))
        else:
            self.scale = self.shift = None
        if track_running_stats:
            self.register_buffer("exp_mean", torch.zeros(channels, **kw))
            self.register_buffer("exp_var", torch.ones(channels, **kw))
        else:
            self.exp_mean = self.exp_var = None
        # labml keeps no count; this one serves momentum=None, a cumulative average (an extension of labml's
        # modules, whose update needs a momentum). It is saved while momentum is None (`_save_to_state_dict`),
        # so that a checkpoint carries the average on, and loaded when present, so that labml's own checkpoints
        # load strictly: not a persistent buffer, which would fix both at construction, before `momentum = None`.
        self.register_buffer("_count", torch.tensor(0, dtype=torch.long, device=device), persistent=False)

    _flags = _LABML_BN

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.momentum is None:
            destination[prefix + "_count"] = self._count if keep_vars else self._count.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_count"
        if key not in state_dict and self._count.is_meta:
            # no count (labml's checkpoints) into a module made on the meta device: 0, as torch's batch norms put
            # a num_batches_tracked there (torch's load_state_dict hands each module a copy of the dict)
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict:  # labml's checkpoints, or one saved with a momentum: the count stays
            return
        if key in unexpected_keys:  # not a persistent buffer, so the module's loader did not expect it
            unexpected_keys.remove(key)
        count = state_dict[key]
        whole = isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_floating_point() \
            and not count.is_complex() and count.dtype != torch.bool
        # the range a cumulative average trains with (NormalizationEngine.checkCount); a meta count has no value
        if not whole or not count.is_meta and not 0 <= int(count) < 2 ** 63 - 1:
            shown = f"a tensor of {count.numel()} {count.dtype}" if isinstance(count, torch.Tensor) and not whole \
                else repr(count)
            error_msgs.append(f"{key}: the count of a cumulative average must be one integer tensor holding 0 to "
                              f"2^63 - 2, got {shown}")
            return
        with torch.no_grad():
            if local_metadata.get("assign_to_params_buffers", False):  # load_state_dict(..., assign=True)
                self._count = count.reshape(()).to(torch.long)
            elif count.is_meta and not self._count.is_meta:
                error_msgs.append(f"{key}: a count on the meta device has no value to copy (use assign=True)")
            elif not count.is_meta:  # (meta into meta: nothing to copy, as for the module's other tensors)
                self._count.copy_(count.reshape(()))

    def reset_running_stats(self):
        """exp_mean 0, exp_var 1 and the count of a cumulative average 0 (nothing without running statistics)."""
        if self.exp_mean is not None:
            self.exp_mean.zero_()
            self.exp_var.fill_(1)
        self._count.zero_()

    def reset_parameters(self):
        """The running statistics, and scale 1, shift 0, as labml's constructor makes them."""
        self.reset_running_stats()
        _fill(self.scale, 1)
        _fill(self.shift, 0)

    def stage(self):
        return BatchNormStage(self._flags, self.eps, self.momentum, None, self.scale, self.shift, self.exp_mean,
                              self.exp_var, self._count, self.training, self.track_running_stats)

    @fx_leaf
    def forward(self, x):
        _check_channels(x, self.channels, type(self).__name__)
        return batch_channel_norm(x, self.stage(), None, views=self.kernel_views())

    def extra_repr(self):
        return (f"{self.channels}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class EstimatedBatchNorm(BatchNorm):
    """labml's EstimatedBatchNorm (seeds 000, 004): in training, first fold the batch's mean and biased variance
    into ``exp_mean``/``exp_var`` at rate momentum, then normalize with them, held constant for the gradient."""

    def __init__(self, channels, eps=1e-5, momentum=0.1, affine=True, device=None, dtype=None):
        super().__init__(channels, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)

    _flags = _LABML_ESTIMATED


class ChannelNorm(KernelViews, nn.Module):
    """labml's ChannelNorm (seed 000): per sample, each of `groups` groups of channels normalized, then a
    per-group affine ``scale``, ``shift`` of shape (groups,)."""

    def __init__(self, channels, groups, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__()
        channels = _positive_int(channels, "channels")
        groups = _check_groups(channels, groups)
        kw = {"device": device, "dtype": dtype}
        self.channels, self.groups, self.eps, self.affine = channels, groups, _positive_float(eps, "eps"), affine
        if affine:
            self.scale = nn.Parameter(torch.ones(groups, **kw))
            self.shift = nn.Parameter(torch.zeros(groups, **kw))
        else:
            self.scale = self.shift = None

    def reset_parameters(self):
        """scale 1, shift 0, as labml's constructor makes them."""
        _fill(self.scale, 1)
        _fill(self.shift, 0)

    def stage(self):
        return ChannelNormStage(self.groups, self.eps, self.scale, self.shift)

    @fx_leaf
    def forward(self, x):
        _check_channels(x, self.channels, "ChannelNorm")
        return batch_channel_norm(x, None, self.stage(), views=self.kernel_views())

    def extra_repr(self):
        return f"{self.channels}, {self.groups}, eps={self.eps}, affine={self.affine}"


class BatchChannelNorm(KernelViews, nn.Module):
    """labml's BatchChannelNorm (seed 000): ``batch_norm`` (EstimatedBatchNorm with estimate=True, else labml's
    BatchNorm) then ``channel_norm`` (ChannelNorm), fused into one call."""

    def __init__(self, channels, groups, eps=1e-5, momentum=0.1, estimate=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if estimate:
            self.batch_norm = EstimatedBatchNorm(channels, eps=eps, momentum=momentum, **kw)
        else:
            self.batch_norm = BatchNorm(channels, eps=eps, momentum=momentum, **kw)
        self.channel_norm = ChannelNorm(channels, groups, eps, **kw)

    @fx_leaf
    def forward(self, x):
        batch_norm, channel_norm = self.batch_norm, self.channel_norm
        _check_channels(x, channel_norm.channels, "BatchChannelNorm")
        if runs_itself(batch_norm, BatchNorm.forward) or runs_itself(channel_norm, ChannelNorm.forward):
            # hooks or a forward of their own: each stage called, as labml's; the channel norm's checks first (but
            # of a forward of its own, unknown), as its call would refuse x after batch_norm had updated its buffers
            if not overrides_forward(channel_norm, ChannelNorm.forward):
                check_channel_norm(x, channel_norm.stage())
            return channel_norm(batch_norm(x))
        return batch_channel_norm(x, batch_norm.stage(), channel_norm.stage(), views=self.kernel_views())
