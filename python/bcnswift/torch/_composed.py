"""The same normalization composed of plain torch operations: for tensors the Swift kernels do not take (CUDA,
MPS, bfloat16 and float16 as autocast makes them, mixed dtypes), and on request (BCNSWIFT_TORCH_COMPOSED=1).

It follows the documents' formulas, in the input's precision (at least float32), differentiable by autograd
to any order; the running buffers are updated in place without gradient, as every document does.
"""
import math

import torch
from torch.autograd import forward_ad as _forward_ad

from .. import _ext
from ..layers import check_cumulative_count
from . import _ops


# A torch.func transform's (grad, vmap, jacrev, ...) wrapped tensors have no memory the kernels could read (so
# this route takes every call under one), and under vmap no memory format to keep.
_functorch_active = torch._C._are_functorch_transforms_active


def transforms_active():
    """Whether a torch.func transform (as above) or forward-mode AD (torch.autograd.forward_ad.dual_level, whose
    dual tensors carry tangents the kernels would drop: their autograd Functions have no jvp) is active."""
    return _forward_ad._current_level >= 0 or _functorch_active()


def _compute_dtype(x):
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _channel_view(t, x):
    """A per-channel vector broadcast against [B, C, *]."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def channel_values(x, dtype):
    """Each channel's values of x ([B, C, *]) as a row of [C, B·S], detached, in `dtype`: what the batch's
    statistics per channel are taken over."""
    return x.detach().to(dtype).transpose(0, 1).reshape(x.shape[1], -1)


def running_update(running_mean, running_var, num_batches_tracked, x, flags, momentum, moving_speed):
    """The documents' running update from the batch x ([B, C, *]): (running_mean, running_var,
    num_batches_tracked) as they become, in new tensors; `commit_running` writes them."""
    _check_count(flags, num_batches_tracked)
    with torch.no_grad():
        xs = channel_values(x, _compute_dtype(x))
        mean = xs.mean(dim=1)
        centre = running_mean.reshape(-1).to(xs.dtype) if _around_running(flags) else mean
        var = ((xs - centre[:, None]) ** 2).mean(dim=1)
        return _blend(running_mean, running_var, num_batches_tracked, mean, var, xs.shape[1], flags, momentum,
                      moving_speed)


def running_update_from_moments(running_mean, running_var, num_batches_tracked, moments, flags, momentum,
                                 moving_speed):
    """`running_update` from the kernels' moments of the batch (float64 [C * 3]: count, mean and M2 of each
    channel, as `bcnswift::moments` gives them) instead of x: in float64, as the kernels update. The variance
    about the running mean is M2 / n + (mean - running_mean)², the same number as the mean of (x - running_mean)²."""
    _check_count(flags, num_batches_tracked)
    with torch.no_grad():
        m = moments.reshape(-1, 3)
        n, mean = m[:, 0], m[:, 1]
        var = m[:, 2] / n
        if _around_running(flags):
            var = var + (mean - running_mean.reshape(-1).to(m.dtype)) ** 2
        return _blend(running_mean, running_var, num_batches_tracked, mean, var, n, flags, momentum, moving_speed)


def _check_count(flags, num_batches_tracked):
    """The kernels' check of a cumulative average's count (NormalizationEngine.checkCount), worded alike: the
    factor is 1/(count + 1), so a negative count would average with a negative weight (or divide by zero), and the
    largest would wrap. Outside a trace it reads the count, as the factor does anyway (no further device sync). A
    trace cannot read it: there the graph checks it on the CPU (not on a GPU, where a device-side assert would end
    the process's context). Called before the update's no_grad block: an exported graph that raises inside one
    leaves grad mode off (torch's wrap_with_set_grad_enabled restores nothing on an error)."""
    if not flags & _ext.BCN_CUMULATIVE_AVERAGE:
        return
    if not _ops.traced():
        check_cumulative_count(int(num_batches_tracked))
    elif num_batches_tracked.is_cpu:
        torch._assert_async(_count_in_range(num_batches_tracked),
                            "num_batches_tracked must count batches (0 to 2^63 - 2) for a cumulative average")


def check_speed_in_graph(speed):
    """An EstBN moving speed checked in a graph being traced, which cannot read its value: its size (static) now,
    its range when the graph runs (`_assert_async`, a RuntimeError before the buffers are written)."""
    _ops.check_speed_size(speed)
    torch._assert_async(_speed_in_range(speed), _SPEED_RANGE)


_SPEED_RANGE = "estbn_moving_speed must be in [0, 1] (checked in a compiled graph, which cannot show the value)"


def _around_running(flags):
    return bool(flags & _ext.BCN_ESTIMATED) and bool(flags & _ext.BCN_VARIANCE_AROUND_RUNNING_MEAN)


def _blend(running_mean, running_var, num_batches_tracked, mean, var, n, flags, momentum, moving_speed):
    """The buffers moved toward the batch's (mean, biased var) of n values (a number, or a tensor of each
    channel's count), in mean's dtype: (running_mean, running_var, num_batches_tracked) as they become, each in
    its buffer's shape (a buffer of C values in another shape, [C, 1] say, is read as the kernels read it: flat)."""
    if flags & _ext.BCN_UNBIASED_RUNNING_VAR:
        # (not n / (n - 1) first: jit.trace records n as a tensor, whose quotient is a float32 factor)
        var = var * n / (n - 1)
    counts = not _around_running(flags) or bool(flags & _ext.BCN_CUMULATIVE_AVERAGE)
    if num_batches_tracked is None:  # a stage without a count (torch's batch norms allow it)
        count = None
    else:
        count = num_batches_tracked + 1 if counts else num_batches_tracked.clone()
    if flags & _ext.BCN_CUMULATIVE_AVERAGE:
        # a tensor, not a number: a trace keeps the count's value (jit.trace recorded float(count) as a constant,
        # and torch.export could not read it)
        factor = 1.0 / count.to(mean.dtype)
    elif moving_speed is not None:
        factor = moving_speed.reshape(-1)[0].to(mean.dtype)
    else:
        factor = momentum
    mean = ((1 - factor) * running_mean.reshape(-1).to(mean.dtype) + factor * mean).to(running_mean.dtype)
    var = ((1 - factor) * running_var.reshape(-1).to(var.dtype) + factor * var).to(running_var.dtype)
    staged = (mean.reshape(running_mean.shape), var.reshape(running_var.shape), count)
    valid = _valid_in_graph(flags, num_batches_tracked, moving_speed)
    if valid is None:
        return staged
    # A graph's checks (`_check_count`, `check_speed_in_graph`: _assert_async) come with no order against the
    # writes, which inductor fuses with them and may run first: a count or speed out of range then stages the
    # buffers' own values, so that the call that raises changes none, whichever runs first.
    return tuple(None if new is None else torch.where(valid, new, old)
                 for new, old in zip(staged, (running_mean, running_var, num_batches_tracked)))


def _valid_in_graph(flags, num_batches_tracked, moving_speed):
    """In a graph being traced on the CPU, the 0-d bool tensor its checks assert of the update's count (a
    cumulative average) or moving speed (what `_check_count` and `check_speed_in_graph` assert); else None (the
    eager routes read and check both before any update is staged)."""
    if not _ops.traced():
        return None
    if flags & _ext.BCN_CUMULATIVE_AVERAGE and num_batches_tracked.is_cpu:
        return _count_in_range(num_batches_tracked)
    if moving_speed is not None and moving_speed.is_cpu:
        return _speed_in_range(moving_speed)
    return None


def _count_in_range(num_batches_tracked):
    return ((num_batches_tracked >= 0) & (num_batches_tracked < 2 ** 63 - 1)).all()


def _speed_in_range(speed):
    return ((speed >= 0) & (speed <= 1)).all()


def commit_running(buffers, staged):
    """Writes `running_update`'s (mean, var, count) into the buffers (running_mean, running_var,
    num_batches_tracked), in place."""
    with torch.no_grad():
        for buffer, value in zip(buffers, staged):
            if buffer is not None:
                buffer.copy_(value)


def normalize(x, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps, bn_eps):
    """y for x ([B, C, *]); batch statistics when flags has BCN_TRAINING, else the running buffers as they are."""
    dt = _compute_dtype(x)
    out_dtype = x.dtype
    y = x.to(dt)
    if flags & _ext.BCN_BATCH_NORM:
        if flags & _ext.BCN_TRAINING:
            dims = [0] + list(range(2, x.dim()))
            mean = y.mean(dim=dims, keepdim=True)
            var = ((y - mean) ** 2).mean(dim=dims, keepdim=True)
            y = (y - mean) / torch.sqrt(var + bn_eps)
        else:
            y = (y - _channel_view(running_mean.to(dt), y)) / _channel_view(torch.sqrt(running_var.to(dt) + bn_eps), y)
        if bn_weight is not None:
            y = _channel_view(bn_weight.to(dt), y) * y
        if bn_bias is not None:
            y = y + _channel_view(bn_bias.to(dt), y)
    if flags & _ext.BCN_CHANNEL_NORM:
        shape = y.shape
        g = y.reshape(shape[0], groups, -1)
        mean = g.mean(dim=-1, keepdim=True)
        var = ((g - mean) ** 2).mean(dim=-1, keepdim=True)
        g = (g - mean) / torch.sqrt(var + eps)
        if cn_weight is not None:
            g = cn_weight.to(dt).reshape(1, groups, 1) * g
        if cn_bias is not None:
            g = g + cn_bias.to(dt).reshape(1, groups, 1)
        y = g.reshape(shape)
    y = y.to(out_dtype)
    if x.dim() >= 4 and not transforms_active() and not x.is_contiguous() \
            and x.is_contiguous(memory_format=_memory_format(x)):
        y = y.contiguous(memory_format=_memory_format(x))
    return y


def _memory_format(x):
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d if x.dim() == 5 else torch.contiguous_format


def weight_standardization(w, eps, flags):
    """Each w[o] standardized over its fan-in: (w - mean) / sqrt(var + eps) with BCN_WS_EPS_IN_SQRT (labml),
    else (w - mean) / (std + eps) (the authors'); var and std unbiased with BCN_WS_UNBIASED.

    A row whose largest |w| is 1 or more is divided first by a power of two q at least that large (exact), and
    eps by q (or q² under the root): the same number, with the row's sum and squares in range where w's would
    overflow (float32 from about 1e19, its mean from near 3e38; the kernels rescale the same way). Other rows
    keep q = 1, where eps/q² cannot overflow. q is a constant for the gradient, which does not depend on it. The
    deviations are taken about the mean corrected once (mean + mean(w - mean), the corrected two-pass
    algorithm), so that a spread of a few ulps of the mean keeps its digits. A constant row (var 0) is 0 with the
    kernels' gradient, (g - mean(g)) / eps, or / sqrt(eps) under the root, as torch.std gives it: taken apart, since
    sqrt's 0 · inf made it NaN, and eps / q (or q²) can underflow to 0 for such a row, which then made 0 / 0."""
    dt = _compute_dtype(w)
    flat = w.to(dt).reshape(w.shape[0], -1)
    unbiased = bool(flags & _ext.BCN_WS_UNBIASED)
    big = flat.detach().abs().amax(dim=1, keepdim=True)
    top = math.frexp(torch.finfo(dt).max)[1] - 1  # the largest finite power of two's exponent (127, 1023)
    exponent = torch.ceil(torch.log2(big)).clamp_max(top)
    q = torch.where(big >= 1, 2.0 ** exponent, 1)  # (2.0 **, exact as exp2, and an operator ONNX has)
    z = flat / q
    d = z - z.mean(dim=1, keepdim=True)
    d = d - d.mean(dim=1, keepdim=True)
    var = d.var(dim=1, keepdim=True, unbiased=unbiased)
    positive, one = var > 0, torch.ones_like(var)  # every sqrt below of a positive number: no NaN gradient
    if flags & _ext.BCN_WS_EPS_IN_SQRT:
        denominator, floor = torch.sqrt(torch.where(positive, var + eps / (q * q), one)), math.sqrt(eps)
    else:
        denominator, floor = torch.sqrt(torch.where(positive, var, one)) + eps / q, eps
    constant = flat - flat.detach()  # 0, with the gradient of w
    out = torch.where(positive, d / denominator, (constant - constant.mean(dim=1, keepdim=True)) / floor)
    return out.reshape(w.shape).to(w.dtype)
