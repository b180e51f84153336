"""The functional form of bcnswift.torch: one fused call per layer, on the Swift kernels when they take the
tensors (CPU float32/float64, every tensor of the input's dtype) and composed of torch operations otherwise.

``batch_channel_norm(x, bn, cn)`` normalizes x ([B, C, *]) with a batch-norm stage described by ``bn``
(a ``BatchNormStage``), a channel-norm stage described by ``cn`` (a ``ChannelNormStage``), or both fused.
Modules build the stages from their parameters and buffers on every call; the running buffers in ``bn`` are
updated in place when ``bn.training`` and ``bn.track_running_stats`` (as torch.nn.BatchNorm2d does).
"""
import contextlib
import math
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch

from .. import _ext
from .._switches import switch
from ..layers import _positive_int, real_number
from . import _composed, _ops

#: True when BCNSWIFT_TORCH_COMPOSED is on (1, true, yes, on: `_switches`) at import: every call then takes the
#: composed pure-torch path, which tests and debugging compare against the kernels.
COMPOSED = switch("BCNSWIFT_TORCH_COMPOSED", False)

_transforms_active = _composed.transforms_active  # bound once, as every call asks it


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
    #: torch.nn.BatchNorm's forward counts every training call in num_batches_tracked, one without values too
    #: (which momentum=None then divides by); the documents' other batch norms count none (`counts_empty_call`)
    counts_every_call: bool = False


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
    if _transforms_active():  # torch.func's wrapped tensors have no memory for the kernels; dual ones' tangents
        return False
    if _dispatching(x):
        return False
    dtype = x.dtype
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype != dtype or _dispatching(t)):
            return False
    return True


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def _dispatching(t):
    """Whether t is a tensor subclass with a ``__torch_dispatch__`` of its own (DTensor, torchao's quantized
    weights, a wrapper such as torch's TwoTensor), outside a trace: its memory, if it has any, does not hold its
    values, and the subclass must see each operation, which the kernels, reading memory below the dispatcher, would
    hide from it (torch raised "data is not allocated yet"). Such tensors take the composed route's torch
    operations. Inside a trace (a dispatch mode, dynamo) the fake and functional tensors are such subclasses too,
    and take the custom ops as before."""
    cls = type(t)
    if cls is torch.Tensor or cls is torch.nn.Parameter:  # (two compares on every tensor of every call)
        return False
    return cls.__torch_dispatch__ is not _PLAIN_DISPATCH and not _ops.traced()


#: How many `portable()` blocks are open, changed under `_portable_lock` (blocks on two threads would otherwise
#: lose an increment: `+=` is a read and a write); and whether any is (`_route` reads it). A module global, which
#: dynamo reads as a constant of the graph it traces and guards on, so a compiled function traced outside a block
#: is traced again inside one; a flag, not the depth, so that a nested block traces nothing again.
_portable_depth = 0
_portable = False
_portable_lock = threading.Lock()


@contextlib.contextmanager
def portable():
    """A block whose traces leave bcnswift out: the modules and WS layers traced inside it (by torch.export,
    torch.compile, torch.jit.trace or a dispatch mode) record torch operations, the composed route that other
    devices take, instead of the ``bcnswift::`` custom ops. The graph then runs where bcnswift is not installed:
    an ExportedProgram handed to ``torch.onnx.export`` (whose own traces take that route anyway), saved with
    ``torch.export.save`` and loaded by a process without bcnswift, or compiled by AOTInductor into a package
    that needs no bcnswift where it runs. Eager calls inside the block still run the kernels. The setting is the
    process's: a trace on another thread meanwhile records torch operations too. A program already exported
    with the ops gets the same rewriting from `decompose`.

        with bcnswift.torch.portable():
            ep = torch.export.export(model.eval(), (x,))
        torch.onnx.export(ep, f="model.onnx")
    """
    global _portable_depth, _portable
    with _portable_lock:
        _portable_depth += 1
        _portable = True
    try:
        yield
    finally:
        with _portable_lock:
            _portable_depth -= 1
            _portable = _portable_depth > 0


def _route(fast):
    """How a call runs, from `_fast`'s answer: "eager" (the kernels, called directly), "op" (the custom op, which
    a trace records: torch.compile, torch.export, jit.trace, a dispatch mode) or "composed" (torch operations:
    where the kernels cannot run, while torch.onnx.export traces, since ONNX has none of bcnswift's operators,
    and in traces inside `portable()`)."""
    if not fast:
        return "composed"
    if not _ops.traced():
        return "eager"
    # true under either exporter (TorchScript's traces with torch.jit.trace, the dynamo one with torch.export);
    # asked of traced calls alone, as it costs about a microsecond (and imports torch.onnx the first time)
    return "composed" if _portable or torch.onnx.is_in_onnx_export() else "op"


def check_dense(t, what):
    """A TypeError for a tensor that is not strided memory (sparse, mkldnn, nested): neither the kernels nor the
    composed route read one, and torch's own errors for it name reshape or a memory format, not the input."""
    if t.layout != torch.strided or t.is_nested:
        kind = "a nested tensor" if t.is_nested else f"a {str(t.layout).removeprefix('torch.').lstrip('_')} tensor"
        advice = "" if t.is_nested else ": convert it with .to_dense() first"
        raise TypeError(f"expected a dense (strided) {what}, got {kind}{advice}")


def _check_sizes(x, bn, cn):
    """Each parameter and buffer holds one value per channel (batch norm) or per group (channel norm), worded as
    the kernels word it, before any route that would update a buffer first runs: the composed route, the
    estimated forward and a traced one. (The kernels' one-call forward, the common route, checks the same before
    it writes, so it does without this.) Returns the channel norm's groups as an int (None without one)."""
    C = x.shape[1]
    groups = None
    if cn is not None:
        # a module's num_groups set after construction ("4", 0): named, not a modulo by zero or a str's TypeError
        groups = cn.groups
        if type(groups) is not int or groups < 1:  # (an int passes with one test: estimate mode's every call)
            groups = _positive_int(groups, "num_groups")
        if C % groups:
            raise ValueError(f"channels ({C}) must be divisible by groups ({groups})")
        sized = [("cn_weight", cn.weight, groups), ("cn_bias", cn.bias, groups)]
    else:
        sized = []
    if bn is not None:
        sized += [(name, t, C) for name, t in (("bn_weight", bn.weight), ("bn_bias", bn.bias),
                                                ("running_mean", bn.running_mean), ("running_var", bn.running_var))]
        sized.append(("num_batches_tracked", bn.num_batches_tracked, 1))
    for name, t, n in sized:
        if t is not None and t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
    return groups


def _check_stage_flags(flags):
    """A hand-built stage's flags as the kernels refuse them, for the composed route, which read only the bits it
    knows (an unknown bit, or no stage's bit, ran; the latter skipped the batch norm yet moved its buffers)."""
    _ops._check_flags(flags)
    if not flags & (_ext.BCN_BATCH_NORM | _ext.BCN_CHANNEL_NORM):
        raise ValueError("flags select neither a batch-norm nor a channel-norm stage")


def _check_dtypes(x, named):
    """Each tensor of `named` ((name, tensor) pairs, None skipped) has x's dtype, worded as the kernels word it,
    before a route that writes a buffer before the kernels' own check runs (an estimated update, the exchange)."""
    for name, t in named:
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected "
                            f"{str(x.dtype).replace('torch.', '')} (the input's)")


def _check_writable(buffers):
    """The running buffers (running_mean, running_var, num_batches_tracked) can be updated in place: not inference
    tensors (made under torch.inference_mode()) outside inference mode, which torch refuses to write, in its batch
    norms and in the composed route alike; the kernels, writing through data pointers, would not notice."""
    if torch.is_inference_mode_enabled():
        return
    if any(t is not None and t.is_inference() for t in buffers):
        raise RuntimeError("the running statistics are inference tensors (made under torch.inference_mode()), "
                           "which torch does not update in place outside inference mode, as a training forward "
                           "would: train under inference_mode, or give the layer clones of its buffers first "
                           "(for each buffer b of its batch-norm stage, setattr(stage, name, b.clone()))")


def _check_saveable(x, tensors):
    """A training call that records a graph saves x for its backward, which torch refuses for an inference tensor
    (made under torch.inference_mode()): refused here, before the running buffers move, where the kernels would
    have raised after the update (as torch's batch norms do), and on the composed route alike."""
    if x.is_inference() and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError("the input is an inference tensor (made under torch.inference_mode()), which autograd "
                           "cannot save for the backward of a training forward: pass x.clone() made outside "
                           "inference mode, or run the forward under torch.no_grad() or inference_mode")


def _check_apart(buffers):
    """The running statistics (buffers: running_mean, running_var, num_batches_tracked) hold each value in memory
    of its own, as an update in place needs: not an expanded view (a stride of 0), whose values share one
    location, so that an update can only write one of them (torch refuses to copy into it, after the buffers
    before it were written; its batch norms write it, and keep one channel's number for all). Asked only of
    buffers the kernels cannot update, which are dense. A sufficient test: sorted by stride, each axis of size
    above 1 steps past the whole extent of the axes before it."""
    for name, t in zip(("running_mean", "running_var"), buffers):
        if t is None or t.is_contiguous():
            continue
        extent = 0
        for stride, size in sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1):
            if stride <= extent:
                raise ValueError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) holds values in shared "
                                 f"memory, as an expanded view does, where an update in place would write one "
                                 f"number for all: give the module a buffer of its own in its place (a .clone())")
            extent += stride * (size - 1)


def _kernels_update(buffers):
    """Whether the kernels can update the running buffers (running_mean, running_var, num_batches_tracked) in
    place: the statistics dense, as the kernels write them through data pointers, and the count int64. Buffers
    assigned by hand in other forms (a strided view, a float count) take the composed route, which updates them
    as torch's batch norms do, in any strides and dtype."""
    mean, var, count = buffers
    return (mean.is_contiguous() and (var is None or var.is_contiguous())
            and (count is None or count.dtype == torch.int64))


def _batched(t):
    """Whether t is batched by a torch.func.vmap at any of the transforms' levels wrapped around it."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _check_unbatched(x, buffers):
    """Under torch.func.vmap a batched input cannot update running buffers that are not batched: torch refuses
    the in-place write at the end (on the composed route, which transforms take) with advice for a bug in torch.
    Its own batch norms say what to do instead; so does this, before anything runs."""
    if not _composed._functorch_active() or not _batched(x):
        return
    if not any(t is not None and _batched(t) for t in buffers):
        raise RuntimeError("a training forward updates the running statistics in place, and under torch.func.vmap "
                           "the input is batched where they are not (as for torch's own batch norms): use eval "
                           "mode, or a batch-norm stage without running statistics (for the authors' BCNorm, "
                           "torch.func.replace_all_batch_norm_modules_(model) makes its bn one)")


#: The flags of an estimating stage, dropped where it has no estimates to move or to use (track_running_stats
#: off, or no running buffers): it normalizes with the batch's statistics, as the composed route does. Told to
#: estimate, the kernels normalized with a blend of the buffers toward the batch, which they did not write.
_ESTIMATING = _ext.BCN_ESTIMATED | _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN


def counts_empty_call(bn):
    """Whether a call of `bn` without values advances its count: in training, for a stage that counts every
    call (`BatchNormStage.counts_every_call`) and tracks running statistics, as torch.nn.BatchNorm's forward
    decides."""
    return bn.counts_every_call and bn.training and bn.track_running_stats and bn.num_batches_tracked is not None


def _real(value, name, expected="a number"):
    """A stage's eps or momentum as a float: a float passes with one test (this runs on every call of every layer);
    anything but a real number is a TypeError naming it, as the numpy layers word it (the ops' schemas raised a
    RuntimeError naming an argument of theirs, float() "could not convert")."""
    return value if type(value) is float else real_number(value, name, expected)


def cumulative_average(bn):
    """Whether a batch-norm stage's update is the cumulative average (factor 1/num_batches_tracked): momentum None,
    with a count. Without one (num_batches_tracked None), torch's batch norms update with a factor of 0, and so
    does this: momentum None then reads as 0.0 (`batch_norm_momentum`)."""
    return bn.momentum is None and bn.num_batches_tracked is not None


def batch_norm_momentum(bn):
    """A batch-norm stage's momentum as a float (0.0 for None, whose flag says cumulative average; `_real`)."""
    momentum = bn.momentum
    return 0.0 if momentum is None else _real(momentum, "momentum", "a number or None")


def _check_scalars(flags, eps, bn_eps, momentum):
    """Each stage's eps and the momentum (None: no update of the buffers, which alone uses it), worded as the
    kernels word them, before any route that would update a buffer before the kernels' own checks run (the
    estimated forward, a traced one) or that has none (the composed route, which would divide by zero or average
    with any weight)."""
    if flags & _ext.BCN_CHANNEL_NORM and not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if flags & _ext.BCN_BATCH_NORM:
        if not 0 < bn_eps < math.inf:
            raise ValueError(f"eps must be a positive finite number, got {bn_eps!r}")
        if momentum is not None and not flags & _ext.BCN_CUMULATIVE_AVERAGE and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if flags & _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN and not flags & _ext.BCN_ESTIMATED:
            # as BatchNormOptions.validate refuses it: the composed route ignored it without a word
            raise ValueError("varianceCentre .runningMean (BCN_VARIANCE_AROUND_RUNNING_MEAN) applies to estimated "
                             "statistics only")


def _check_values(x, flags, groups, training, update):
    """The statistics a call needs are defined (the kernels' checks, worded as they word them; the composed route
    would divide by zero or normalize by eps alone): more than one value per channel group, and per channel when
    training with batch statistics or updating an unbiased running variance."""
    B, C = x.shape[0], x.shape[1]
    S = x.numel() // (B * C)  # called with values only
    size = f"input of size [{B}, {C}, {S}] ([B, C, S])"
    if flags & _ext.BCN_CHANNEL_NORM and (C // groups) * S == 1:
        raise ValueError(f"Expected more than 1 value per channel group, got {C // groups} channel(s) per group and "
                         f"spatial size {S}")
    if flags & _ext.BCN_BATCH_NORM and B * S == 1:
        if training:
            raise ValueError(f"Expected more than 1 value per channel when training, got {size}")
        if update and flags & _ext.BCN_UNBIASED_RUNNING_VAR:  # the kernels find it in the batch's moments
            raise ValueError("an unbiased running variance needs more than 1 value per channel, got 1 value per "
                             "channel over the whole batch")


def _empty_output(x, tensors):
    """The output for an input without values ([0, C, *] or a zero-sized spatial axis): x's shape and layout, no
    statistics measured and no buffer changed; in autograd's graph, so that each parameter gets a zero gradient, as
    torch's batch norm gives it."""
    y = x.clone()
    for t in tensors:
        if t is not None and t.requires_grad:
            y = y + t.sum() * 0
    return y


def updates_running(bn):
    """Whether a call of `bn` updates its running buffers: in training, tracking running statistics that it has."""
    return bn.training and bn.track_running_stats and bn.running_mean is not None


def _update_rate(bn, momentum):
    """The rate of a batch-norm stage's update, to check: its moving speed where a buffer holds one (EstBN's,
    which is the rate), else its momentum. The buffer is read where that waits for no GPU and breaks no graph: on
    the CPU, outside a trace (`_ops.traced`: torch.compile, where reading a tensor's value is data-dependent,
    jit.trace, which would record the value as a constant, a dispatch mode such as make_fx, which cannot read
    it). Traced on the CPU, the graph checks it instead (`_assert_async`, a RuntimeError before the buffers are
    written; jit.trace drops that check, an op without outputs). On a GPU the composed route updates with the
    buffer as it is, unchecked, as the authors' code does: a device-side assert there would leave the process's
    GPU context unusable."""
    speed = bn.moving_speed
    if speed is None or not speed.is_cpu:
        return momentum
    if _ops.traced():
        _composed.check_speed_in_graph(speed)
        return momentum
    if _composed._functorch_active():
        return _wrapped_speed_value(speed)
    return _ops.moving_speed_value(speed)


def _wrapped_speed_value(speed):
    """`_ops.moving_speed_value` under a torch.func transform, where the buffer may be batched (vmap over the
    stacked states of several modules: torch.func.stack_module_state) and so hold no one value to read: each
    model's, read from the tensor beneath the transforms' wrappers."""
    _ops.check_speed_size(speed)  # the size each model sees
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(speed):
        speed = functorch.get_unwrapped(speed)
    for value in speed.reshape(-1, 1):  # one per model (one without vmap)
        rate = _ops.moving_speed_value(value)
    return rate


def _check_empty_call(x, bn, cn):
    """The checks of the stages that a call with values makes (types, sizes, eps, the momentum of an update), for
    an input without values, which computes nothing: a stage set wrong by hand fails on its first call whatever
    the batch."""
    flags, eps, bn_eps, momentum = 0, 1e-5, None, None
    if cn is not None:
        flags |= _ext.BCN_CHANNEL_NORM
        eps = _real(cn.eps, "eps")
    if bn is not None:
        _ops.check_running_statistics(bn.running_mean, bn.running_var)
        flags |= bn.flags | (_ext.BCN_CUMULATIVE_AVERAGE if cumulative_average(bn) else 0)
        bn_eps = _real(bn.eps, "eps")
        momentum = batch_norm_momentum(bn)  # a momentum that is not a number: refused in eval too, as with values
        momentum = _update_rate(bn, momentum) if updates_running(bn) else None  # no update: range unchecked
    _check_sizes(x, bn, cn)
    _check_scalars(flags, eps, bn_eps, momentum)


def check_channel_norm(x, cn):
    """The checks the channel-norm stage `cn` makes of an input shaped as x (its settings, the sizes of its affine,
    more than one value per group), for a parent that calls its batch-norm stage's module first (one with hooks or
    a forward of its own): that call updates the running buffers, which a refusal after it would leave changed."""
    groups = _check_sizes(x, None, cn)
    _check_scalars(_ext.BCN_CHANNEL_NORM, _real(cn.eps, "eps"), None, None)
    if 0 not in x.shape:
        _check_values(x, _ext.BCN_CHANNEL_NORM, groups, False, False)


def batch_channel_norm(x, bn: Optional[BatchNormStage], cn: Optional[ChannelNormStage], *, views=None):
    """y = channel_norm(batch_norm(x)) (either stage may be None), fused; see the module docstring. `views`: a
    dict the caller keeps between calls, in which the kernels' route keeps the numpy views of the stages'
    tensors (bcnswift's modules pass their own, `KernelViews`); None makes them afresh on each call. An input
    without values gives an empty output and changes no buffer, but for a stage that counts every call (torch's
    batch norms, `counts_empty_call`): its num_batches_tracked counts it."""
    if bn is None and cn is None:
        raise ValueError("batch_channel_norm needs a batch-norm stage, a channel-norm stage or both; got neither")
    if x.dim() < 2:
        raise ValueError(f"expected an input of rank >= 2 ([B, C, *]), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    check_dense(x, "input")
    if 0 in x.shape:  # no values (cheaper than numel() on every call): the stages checked as a call with values
        _check_empty_call(x, bn, cn)
        if bn is not None:
            if counts_empty_call(bn):
                bn.num_batches_tracked.add_(1)
        stages = ([cn.weight, cn.bias] if cn else []) + ([bn.weight, bn.bias] if bn else [])
        return _empty_output(x, stages)
    flags, groups, eps = 0, 1, 1e-5
    tensors = []
    if cn is not None:
        flags |= _ext.BCN_CHANNEL_NORM
        groups, eps = cn.groups if type(cn.groups) is int else _positive_int(cn.groups, "num_groups"), \
            _real(cn.eps, "eps")
        tensors += [cn.weight, cn.bias]
    if bn is None:
        route = _route(_fast(x, tensors))
        if route == "eager":
            return _ops.eager_forward(x, None, None, None, None, None, None, cn.weight, cn.bias, flags, groups, eps,
                                      eps, 0.0, False, views)
        if route == "op":
            return _ops.normalize(x, None, None, None, None, None, None, cn.weight, cn.bias, flags, groups, eps,
                                  eps)[0]
        _check_sizes(x, bn, cn)
        _check_scalars(flags, eps, None, None)
        _check_values(x, flags, groups, False, False)
        return _composed.normalize(x, None, None, None, None, cn.weight, cn.bias, flags, groups, eps, eps)
    flags |= bn.flags
    bn_eps = _real(bn.eps, "eps")
    batch_statistics = bn.training or not bn.track_running_stats or bn.running_mean is None
    update = updates_running(bn)
    if batch_statistics and not update:
        flags &= ~_ESTIMATING  # no estimates to move or to use: the batch's statistics (see `_ESTIMATING`)
    if cumulative_average(bn):
        flags |= _ext.BCN_CUMULATIVE_AVERAGE
    momentum = batch_norm_momentum(bn)
    estimated = update and bool(flags & _ext.BCN_ESTIMATED)
    tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    cn_weight, cn_bias = (cn.weight, cn.bias) if cn is not None else (None, None)
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    if update and not torch.compiler.is_compiling():  # (dynamo cannot trace is_inference_mode_enabled)
        _check_writable(buffers)
        _check_unbatched(x, buffers)
        _check_saveable(x, tensors)
    train = _ext.BCN_TRAINING if batch_statistics and not estimated else 0
    route = _route(_fast(x, tensors) and (not update or _kernels_update(buffers)))
    if route == "composed":
        _check_stage_flags(flags)
        _ops.check_running_statistics(bn.running_mean, bn.running_var)
        _check_sizes(x, bn, cn)
        _check_scalars(flags, eps, bn_eps, _update_rate(bn, momentum) if update else None)
        _check_values(x, flags, groups, bool(train), update)
        if update:
            _check_apart(buffers)
        # the update staged, the normalization run, and only then the buffers written: a call that fails
        # changes nothing
        staged = _composed.running_update(*buffers, x, flags, momentum, bn.moving_speed) if update else None
        running = staged[:2] if staged is not None and estimated else (bn.running_mean, bn.running_var)
        y = _composed.normalize(x, bn.weight, bn.bias, *running, cn_weight, cn_bias, flags | train, groups, eps,
                                bn_eps)
        # not in the TorchScript exporter's trace: it stores the buffers as they are when its trace ends, and its
        # graph would move the estimates it reads once more. Asked of this thread's tracer (is_in_onnx_export alone
        # is process-wide: other threads' training calls must update); the dynamo exporter traces fake buffers
        if staged is not None and not (torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()):
            _composed.commit_running(buffers, staged)
        return y
    compiling = route == "op"
    if compiling:  # (while tracing: the graph holds no check of them)
        _ops.check_running_statistics(bn.running_mean, bn.running_var)
    if estimated or compiling:  # the buffers' update comes before the normalization's own checks
        _check_sizes(x, bn, cn)
        _check_scalars(flags, eps, bn_eps, momentum if update else None)
    if not compiling:
        return _ops.eager_forward(x, bn.weight, bn.bias, *buffers, bn.moving_speed, cn_weight, cn_bias,
                                  flags | (0 if update else train), groups, eps, bn_eps, momentum, update, views)
    if not update:
        return _ops.normalize(x, None, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, cn_weight,
                              cn_bias, flags | train, groups, eps, bn_eps)[0]
    # traced: the functional normalization and the buffers' update (the one op that mutates). Compiled or
    # jit-traced with batch statistics, the normalization measures the batch and returns its moments for the
    # update, after it: two ops a layer, not three
    if not estimated and (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        y, _, moments = _ops.normalize_batch(x, bn.weight, bn.bias, cn_weight, cn_bias, flags | train, groups, eps,
                                             bn_eps)
        _ops.update_running_(*buffers, moments, flags, momentum, bn.moving_speed)
        return y
    # estimated: the moments, the update, then the normalization with the updated buffers, held constant as the
    # documents do. Under a dispatch mode, batch statistics take the same order (the normalization then continues
    # from the batch's moments): a non-reentrant checkpoint's recomputation (selective activation checkpointing's
    # too) stops once the tensors saved for backward are back, which must come after the update, as it comes in
    # torch's batch norms, for the buffers to move again as theirs do (after normalize_batch, they moved once)
    context, moments = _ops.moments(x.detach(), flags, groups)
    _ops.update_running_(*buffers, moments, flags, momentum, bn.moving_speed)
    if estimated:
        return _ops.normalize(x, context, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, cn_weight,
                              cn_bias, flags | train, groups, eps, bn_eps)[0]
    return _ops.normalize(x, context, moments, bn.weight, bn.bias, None, None, cn_weight, cn_bias, flags | train,
                          groups, eps, bn_eps)[0]


def standardizable(w):
    """Whether each output channel of `w` ([out, ...]: rows of its fan-in) has at least 2 values, as an unbiased
    deviation needs (a 1x1 depthwise convolution's has 1)."""
    return w.numel() >= 2 * w.shape[0]


def _check_ws_arguments(w, eps, unbiased):
    """What the kernels refuse, in their words, for the composed route (which would return NaN or infinity)."""
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(f"weight must have rank >= 2 ([out_channels, ...]) and values, got shape {tuple(w.shape)}")
    if unbiased and not standardizable(w):
        raise ValueError(f"an unbiased standard deviation needs a fan-in of at least 2, got {w.numel() // w.shape[0]} "
                         f"(turn unbiased off)")
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def weight_standardization(w, eps=1e-5, eps_in_sqrt=False, unbiased=True, *, views=None):
    """w with each output channel (w[o]) standardized over its fan-in: (w - mean) / (std + eps) (the authors'
    convolution; eps_in_sqrt=False) or (w - mean) / sqrt(var + eps) (labml; eps_in_sqrt=True), with the unbiased
    std and var unless unbiased=False. Differentiable. `views` as in `batch_channel_norm` (the WS layers')."""
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    check_dense(w, "weight")
    if type(eps_in_sqrt) is not bool or type(unbiased) is not bool:  # (the WS layers pass bools and a float)
        for name, value in (("eps_in_sqrt", eps_in_sqrt), ("unbiased", unbiased)):
            if not isinstance(value, (bool, np.bool_)):  # as the numpy API: "no" would be True
                raise TypeError(f"{name} must be a bool, got {value!r}")
    if type(eps) is not float:
        eps = real_number(eps, "eps")  # not a bool or a string
    flags = (_ext.BCN_WS_UNBIASED if unbiased else 0) | (_ext.BCN_WS_EPS_IN_SQRT if eps_in_sqrt else 0)
    route = _route(_fast(w, ()))
    if route == "eager":
        return _ops.eager_weight_standardization(w, float(eps), flags, views)
    if route == "op":
        return _ops.weight_standardization(w, float(eps), flags)
    _check_ws_arguments(w, eps, unbiased)
    return _composed.weight_standardization(w, eps, flags)
