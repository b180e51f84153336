"""Synchronized BCN over torch.distributed: SyncBCNorm (the authors'), SyncBatchChannelNorm (labml's) and
convert_sync_batch_channel_norm, the analogue of nn.SyncBatchNorm.convert_sync_batchnorm.

The exchange is bcnswift.distributed's (the numpy layers' too): in a training forward every rank's batch
moments are allgathered and merged in rank order, so every rank normalizes with, and folds into its buffers, the
statistics of the concatenated batch, bit for bit alike; with batch statistics the backward merges the 2C
gradient sums. Estimate mode needs no backward exchange; eval exchanges nothing. A rank's batch may be empty.
Parameter gradients are each rank's contribution, which DistributedDataParallel sums (averages) as for
nn.SyncBatchNorm. A failing rank, or layers that disagree, make every rank raise. A rank that never arrives
turns into gloo's timeout error (``init_process_group(timeout=...)``). CPU float32/float64 tensors; the process
group may use any backend whose all_gather_into_tensor takes CPU tensors (gloo).
"""
import copy
import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _ext
from ..distributed import UNSENT, LayerConfig, Synchronizer
from ..layers import real_number
from . import _ops
from ._ops import fx_leaf
from .modules import (BatchChannelNorm, BatchNorm, BCNorm, ChannelNorm, EstBN, overrides_forward,
                      torch_batch_norm_stage)
from .functional import (_ESTIMATING, ChannelNormStage, _check_dtypes, _check_scalars, _check_sizes,
                         _check_writable, _kernels_update, batch_norm_momentum, check_dense, counts_empty_call,
                         cumulative_average)


class ProcessGroupTransport:
    """A torch.distributed process group as a bcnswift transport (mpi4py's Allgather over numpy buffers)."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("synchronized BCN needs torch.distributed: call "
                               "torch.distributed.init_process_group('gloo', ...) first")
        if dist.get_rank(group) < 0:  # its rank and size would be -1
            raise RuntimeError(f"this process (global rank {dist.get_rank()}) is not a member of the module's "
                               "process_group: only its members may run the module in training")
        self.group = group

    def Get_rank(self):
        return dist.get_rank(self.group)

    def Get_size(self):
        return dist.get_world_size(self.group)

    def Allgather(self, send, recv):
        send = np.require(send, requirements=["C", "W"])  # torch wants writable memory, though it only reads
        dist.all_gather_into_tensor(torch.from_numpy(recv).view(-1), torch.from_numpy(send), group=self.group)


class _TorchSynchronizer(Synchronizer):
    """The exchange, with out of memory on any rank raised as torch raises it on one."""
    out_of_memory = torch.OutOfMemoryError


def _agreed_itemsize(x, own):
    """The bytes of a value of the module's dtype (`own`: its first parameter or buffer), which every rank's layer
    must agree on; x's, for a module that holds none (nothing of its own to get out of step), 0 when x is no
    tensor. Reads nothing of x that could raise: this runs before the exchange."""
    t = own if own is not None else x if isinstance(x, torch.Tensor) else None
    return 0 if t is None else t.element_size()


def _scratch_buffers(C, dtype):
    return torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), torch.zeros((), dtype=torch.long)


class _SyncForward(torch.autograd.Function):
    """A training forward with the statistics of every rank; its backward merges the gradient sums (batch
    statistics) or is local (estimate mode)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, moving_speed,
                cn_weight, cn_bias, flags, groups, eps, bn_eps, momentum, channels, synchronizer, counts_empty,
                itemsize, precheck):
        estimated = bool(flags & _ext.BCN_ESTIMATED)
        cumulative = bool(flags & _ext.BCN_CUMULATIVE_AVERAGE)
        # itemsize: the module's (`_agreed_itemsize`), so that ranks whose modules differ in dtype disagree
        config = LayerConfig(channels, groups if flags & _ext.BCN_CHANNEL_NORM else 0, flags | _ext.BCN_TRAINING,
                             itemsize, eps, bn_eps, None if cumulative else momentum)
        local = {}

        def moments():
            # everything about x is checked here, inside the exchange: a rank that raised before it would leave
            # the others waiting in the allgather
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
            check_dense(x, "input")
            if x.dim() < 2 or x.shape[1] != channels:
                raise ValueError(f"expected an input [B, {channels}, *], got shape {tuple(x.shape)}")
            if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"synchronized BCN runs on CPU float32/float64 tensors, got {x.dtype} on {x.device}")
            precheck(x)
            # before the update of the buffers, which precedes the normalization's own checks (failing here,
            # inside the exchange, every rank fails together)
            _check_scalars(flags, eps, bn_eps, momentum)
            if x.numel() == 0:
                return np.zeros(3 * channels)
            local["context"], m = _ops.moment_arrays(x, flags, groups)
            return m

        merged = synchronizer.moments(config, moments)
        buffers = (running_mean, running_var, num_batches_tracked)
        if "context" not in local:  # an empty batch: only the buffers follow the others' (if any rank had values)
            if merged[0]:
                _ops.running_update(*buffers, merged, flags, momentum)
            elif counts_empty:  # no rank had a value: as in one process, a torch batch norm counts the call
                num_batches_tracked.add_(1)
            y, context = torch.empty_like(x), None
        elif estimated:  # as one process: the estimates first, then the eval normalization with them
            _ops.running_update(*buffers, merged, flags, momentum)
            y, context, _ = _ops._normalize_impl(x, local["context"], None, bn_weight, bn_bias, running_mean,
                                                 running_var, None, cn_weight, cn_bias, flags, groups, eps, bn_eps,
                                                 momentum, False)
        else:
            y, context, _ = _ops._normalize_impl(x, local["context"], merged, bn_weight, bn_bias, *buffers,
                                                 cn_weight, cn_bias, flags | _ext.BCN_TRAINING, groups, eps, bn_eps,
                                                 momentum, True)
        # written through numpy: tell autograd, as an in-place torch op would (a stage may keep no count)
        torch.autograd.graph.increment_version([t for t in buffers if t is not None])
        train = 0 if estimated else _ext.BCN_TRAINING
        _ops._save(ctx, x, context, flags | train, groups, bn_weight, bn_bias, cn_weight, cn_bias)
        ctx.synchronizer, ctx.config, ctx.empty = synchronizer, config, context is None
        return y

    @staticmethod
    def backward(ctx, dy):
        exchange = not ctx.flags & _ext.BCN_ESTIMATED
        joined = []

        def merge(sums):
            joined.append(True)
            return ctx.synchronizer.gradient_sums(ctx.config, lambda: sums)

        try:
            return _SyncForward._gradients(ctx, dy, merge if exchange else None)
        except Exception as e:
            if not exchange or joined:
                raise
            # failed before the exchange (unpacking x, its checks, its local sums): join it with the failure,
            # so that every rank raises instead of waiting for this one until the process group's timeout

            def failed():
                raise e
            ctx.synchronizer.gradient_sums(ctx.config, failed)
            raise

    @staticmethod
    def _gradients(ctx, dy, merge):
        """The backward's gradients, the batch's gradient sums exchanged through `merge` (None: estimated)."""
        saved = ctx.saved_tensors
        x = saved[0]
        if ctx.empty:
            if merge is not None:  # take part in the exchange, contributing nothing
                merge(np.zeros(2 * ctx.config.channels))
            shapes = ctx.shapes
            g = [None if s is None else torch.zeros(s, dtype=x.dtype) for s in shapes]
            return (torch.zeros_like(x), g[0], g[1], None, None, None, None, g[2], g[3]) + (None,) * 10

        def backward(dy, x, context, flags, groups, bn_affine, cn_affine):
            return _ops.backward_impl(dy, x, context, flags, groups, bn_affine, cn_affine, merge, ctx.shapes)

        if _ops._vmapped(dy):  # (autograd.grad(is_grads_batched=True), jacobian(vectorize=True))
            if merge is not None:
                raise RuntimeError("a synchronized backward with batch statistics exchanges one set of gradient sums "
                                   "between the ranks per output gradient, so it cannot run batched "
                                   "(autograd.grad(..., is_grads_batched=True), jacobian(..., vectorize=True)): "
                                   "compute the gradients one at a time")
            backward = _ops._backward_op_on_array  # estimated: local, the op, which vmap batches
        dx, dbw, dbb, dcw, dcb = _ops._normalize_gradients(ctx, dy, backward, saved)
        grads = (dx, dbw, dbb, None, None, None, None, dcw, dcb) + (None,) * 10
        return _ops._first_order_only(grads, x, dy)


class GraphCaptureError(RuntimeError):
    """A synchronized training forward inside a graph capture (torch.export, or a traced fake input)."""


@torch.compiler.disable  # torch.compile runs it eagerly, a graph break (fullgraph=True: torch's error saying so)
def sync_batch_channel_norm(x, stages, channels, process_group=None):
    """The training forward of a batch-norm stage and an optional channel-norm stage, with the statistics of every
    rank of `process_group`. `stages()` gives them, as (bn: a functional.BatchNormStage, cn: a ChannelNormStage or
    None, refused: an error the caller found or None); whatever it raises, or `refused`, is raised inside the
    exchange, on every rank, like this call's own errors. It exchanges numbers between processes as it runs, so no
    graph can hold it: `torch.compile` runs it eagerly, and an export refuses it (on this rank alone, before the
    exchange: a trace runs on one rank without the others)."""
    if torch.compiler.is_exporting() or _fake(x) or _recorded():
        raise GraphCaptureError(
            "a synchronized BCN layer exchanges its batch statistics between processes as it runs, so a graph cannot "
            "hold its training forward: export the model in eval mode, or built with the local modules (BCNorm, "
            "BatchChannelNorm)")
    synchronizer = _TorchSynchronizer(ProcessGroupTransport(process_group))
    # From here on, what could raise on one rank alone is raised inside the exchange, where every rank fails
    # together: a rank raising before it would leave the others waiting in the allgather until the timeout.
    try:
        bn, cn, refused = stages()
        flags = bn.flags | (_ext.BCN_CUMULATIVE_AVERAGE if cumulative_average(bn) else 0)
        groups, eps = 1, bn.eps
        cn_weight = cn_bias = None
        if cn is not None:
            flags |= _ext.BCN_CHANNEL_NORM
            groups, eps, cn_weight, cn_bias = cn.groups, cn.eps, cn.weight, cn.bias
        buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        kept = bn.track_running_stats and bn.running_mean is not None
        # the module's dtype is its first parameter or buffer's
        own = next((t for t in (bn.weight, bn.bias, bn.running_mean if kept else None, cn_weight, cn_bias)
                    if t is not None), None)
        itemsize = _agreed_itemsize(x, own)
        if not kept:  # batch statistics, nothing to keep (x's dtype; any dtype if x is not a tensor: that fails
            # inside the exchange, on every rank), an estimating stage's too (`functional._ESTIMATING`)
            buffers = _scratch_buffers(channels, x.dtype if isinstance(x, torch.Tensor) else torch.float64)
            flags &= ~_ESTIMATING
    except Exception as e:  # noqa: BLE001 - the stages cannot be read: nothing to configure, every rank hears why
        _fail_together(synchronizer, e)
    # What else could fail is turned into numbers the header can carry (NaN where it failed), and the error is
    # raised inside the exchange (`precheck`), after the input's own checks.
    try:
        if refused is not None:
            raise refused
        _ops.check_running_statistics(bn.running_mean, bn.running_var)
        momentum = batch_norm_momentum(bn)
        if bn.moving_speed is not None:  # EstBN's rate is this buffer's value
            momentum = _ops.moving_speed_value(bn.moving_speed)
        eps, bn_eps = real_number(eps, "eps"), real_number(bn.eps, "eps")
        counts_empty = kept and counts_empty_call(bn)  # (an empty batch on every rank: as one process counts it)
        early = None
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
        momentum, eps, bn_eps, counts_empty, early = math.nan, math.nan, math.nan, False, e

    held = (("bn_weight", bn.weight), ("bn_bias", bn.bias), ("running_mean", buffers[0]),
            ("running_var", buffers[1]), ("cn_weight", cn_weight), ("cn_bias", cn_bias))

    def precheck(x):
        """Inside the exchange, x a CPU float tensor, before estimate mode's update of the buffers: every parameter
        and buffer has x's dtype (the kernels' own check would come after that update), the scalars convert, and
        each holds one value per channel (or group)."""
        if own is not None and own.dtype != x.dtype:  # the input is the odd one: say so, not which tensor differs
            raise TypeError(f"the input is {str(x.dtype)[6:]} but the module is {str(own.dtype)[6:]}: synchronized "
                            f"BCN runs on the kernels alone, which take one dtype (convert the input, or the module "
                            f"with .to(torch.{str(x.dtype)[6:]}))")
        _check_dtypes(x, held)
        if kept:
            _check_writable(buffers)
            if not _kernels_update(buffers):  # (the local modules take such buffers through the composed route)
                raise ValueError("synchronized BCN runs on the kernels alone, which update running_mean and "
                                 "running_var in place as dense tensors and num_batches_tracked as int64; this "
                                 "stage's buffers were set in another form (a strided view, a float count): give it "
                                 "such ones (stage.running_mean = stage.running_mean.contiguous(), "
                                 "stage.num_batches_tracked = stage.num_batches_tracked.long(), ...)")
        if early is not None:
            raise early
        _check_sizes(x, bn, cn)

    return _SyncForward.apply(x, bn.weight, bn.bias, *buffers, bn.moving_speed, cn_weight, cn_bias, flags, groups,
                              eps, bn_eps, momentum, channels, synchronizer, counts_empty, itemsize, precheck)


def _fail_together(synchronizer, error):
    """Joins a training forward's exchange with `error` as this rank's failure, before any configuration could be
    read (the header's is `UNSENT`): every rank raises (the others naming this rank and its message), and so does
    this one, `error` as the cause."""
    def failed():
        raise error
    synchronizer.moments(UNSENT, failed)
    raise RuntimeError("the statistics exchange went on after a rank's failure") from error  # (it never does)


def _recorded():
    """Whether make_fx (its proxy mode) records this call into a graph, which could not hold the exchange: it failed
    in the exchange, blaming the ranks. Other dispatch modes (FlopCounterMode, ...) only watch: the call runs."""
    key = getattr(torch._C, "_TorchDispatchModeKey", None)
    return key is not None and torch._C._get_dispatch_mode(key.PROXY) is not None


def _fake(x):
    """Whether x is a tracing stand-in without values (a fake or meta tensor)."""
    from torch._subclasses.fake_tensor import is_fake
    return isinstance(x, torch.Tensor) and (is_fake(x) or x.is_meta)


class SyncBCNorm(BCNorm):
    """The authors' BCNorm with batch statistics over every rank of `process_group` (None: the default group)
    in training; the same arguments, parameters and state dict as BCNorm otherwise."""

    def __init__(self, num_channels, num_groups, eps=1e-5, estimate=False, process_group=None, device=None,
                 dtype=None):
        super().__init__(num_channels, num_groups, eps, estimate, device=device, dtype=dtype)
        self.process_group = process_group

    @fx_leaf
    def forward(self, x):
        # statistics are exchanged only where the batch-norm stage trains: not in eval, nor with the stage frozen
        # (`model.bn.eval()`, as nn.SyncBatchNorm exchanges only when it trains itself); an empty batch too (a rank
        # without data) runs here, to an empty output
        if not self.training or not isinstance(self.bn, (EstBN, _BatchNorm)) or not self.bn.training:
            return super().forward(x)
        return sync_batch_channel_norm(x, self._stages, self.num_channels, self.process_group)

    def _stages(self):
        """`sync_batch_channel_norm`'s stages, read where a failure reaches every rank (EstBN's refuses a moving
        speed of None)."""
        bn = self.bn
        estimated = isinstance(bn, EstBN)
        stage = bn.stage() if estimated else torch_batch_norm_stage(bn)
        cn = ChannelNormStage(self.num_groups, self.eps, self.weight, self.bias)
        # nn.SyncBatchNorm's own forward does a batch norm's math too, over its own group: fused over this one's
        fused = EstBN.forward if estimated else \
            nn.SyncBatchNorm.forward if isinstance(bn, nn.SyncBatchNorm) else _BatchNorm.forward
        return stage, cn, _own_forward(self, "bn", bn, fused)


class SyncBatchChannelNorm(BatchChannelNorm):
    """labml's BatchChannelNorm with batch statistics over every rank of `process_group` in training."""

    def __init__(self, channels, groups, eps=1e-5, momentum=0.1, estimate=True, process_group=None, device=None,
                 dtype=None):
        super().__init__(channels, groups, eps, momentum, estimate, device=device, dtype=dtype)
        self.process_group = process_group

    @fx_leaf
    def forward(self, x):
        if not self.training or not self.batch_norm.training:  # as SyncBCNorm: the stage frozen exchanges nothing
            return super().forward(x)
        return sync_batch_channel_norm(x, self._stages, self.channel_norm.channels, self.process_group)

    def _stages(self):
        batch_norm, channel_norm = self.batch_norm, self.channel_norm
        refused = (_own_forward(self, "batch_norm", batch_norm, BatchNorm.forward)
                   or _own_forward(self, "channel_norm", channel_norm, ChannelNorm.forward))
        return batch_norm.stage(), channel_norm.stage(), refused


def _own_forward(module, name, stage, fused_forward):
    """A TypeError when the stage's class overrides the forward whose math the synchronized call fuses (the
    local modules call such a stage instead, but it would see only its own rank's statistics), else None."""
    if not overrides_forward(stage, fused_forward):
        return None
    return TypeError(f"{type(module).__name__}.{name} is a {type(stage).__qualname__}, whose class has a forward of "
                     f"its own: a synchronized layer cannot call it (it fuses the stage's math with the statistics of "
                     f"every rank, which a stage called alone would not see) and would skip it. Use the local "
                     f"module, or a stage without its own forward")


def _synchronized(module, process_group):
    if isinstance(module, (SyncBCNorm, SyncBatchChannelNorm)):
        return None
    if isinstance(module, BCNorm):
        new = SyncBCNorm.__new__(SyncBCNorm)
    elif isinstance(module, BatchChannelNorm):
        new = SyncBatchChannelNorm.__new__(SyncBatchChannelNorm)
    else:
        return None
    # the same parameters, buffers and submodules, in containers of its own (as nn.SyncBatchNorm's conversion
    # makes): shared dicts would make a hook, buffer or child registered on one module appear on the other
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
                         for k, v in module.__dict__.items()})
    new.__dict__.pop("_kernel_views", None)  # but views of its own (KernelViews)
    new.process_group = process_group
    return new


def convert_sync_batch_channel_norm(module, process_group=None):
    """Every BCNorm and BatchChannelNorm in `module` replaced by its synchronized form, sharing its parameters,
    buffers and submodules (as nn.SyncBatchNorm.convert_sync_batchnorm); returns the module (a new one when
    `module` itself is converted)."""
    new = _synchronized(module, process_group)
    if new is not None:
        return new
    for name, child in module.named_children():
        converted = convert_sync_batch_channel_norm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
