"""Programs already exported with bcnswift's ops, made to run without bcnswift: ``decompose(program)``.

A ``torch.export`` program traced outside ``portable()`` records the ``bcnswift::`` ops, so it runs only where
bcnswift is installed, and ONNX export refuses it. ``decompose`` rewrites such a program as ``portable()`` would
have traced it: each op becomes the composed route's torch operations (_composed.py, the documents' formulas),
through ``ExportedProgram.run_decompositions``.

The functional ops go in the decomposition table. The running buffers' update (``bcnswift::update_running_``)
cannot: it mutates, so functionalization wraps it before the table is consulted. It decomposes as a mutating op
with a CompositeImplicitAutograd kernel does, one registered for the length of the call alone.

The kernels' context (plane moments for the backward) has no composed counterpart. The decompositions return
zeros in its place, which is sound only because a forward program reads a context nowhere but in ``normalize``,
which ignores it; ``decompose`` refuses a program that reads one anywhere else.
"""
import operator
import threading

import torch

from .. import _ext
from . import _composed, _ops

__all__ = ["decompose"]

_bcnswift = torch.ops.bcnswift

# (op, index of its context in its outputs): the ops that return a context
_CONTEXT_OUTPUT = {_bcnswift.moments.default: 0, _bcnswift.normalize.default: 1,
                   _bcnswift.normalize_batch.default: 1}
_BACKWARD_OPS = (_bcnswift.normalize_backward.default, _bcnswift.weight_standardization_backward.default)

# one call at a time registers the update's kernel (a second registration would fail)
_registration_lock = threading.Lock()


def decompose(program, decomp_table=None):
    """`program` (a ``torch.export.ExportedProgram``) with every bcnswift op replaced by torch operations, as if
    it had been exported inside ``portable()``: a new program that holds no ``bcnswift::`` op, so it runs, saves
    and exports to ONNX where bcnswift is not installed. Its outputs and, in training, its buffers' updates are
    the program's own to the composed route's rounding (float64 rounding for float64 programs).

    Parameters:
      program: what ``torch.export.export`` made of bcnswift's modules, WS layers or ops, in train or eval mode.
      decomp_table: further decompositions to run in the same pass, as ``run_decompositions`` takes them (for
        example ``torch.export.default_decompositions()`` for core ATen). None, the default, decomposes
        bcnswift's ops alone and keeps every other op as it is.

    Raises ValueError, before anything is traced, for what has no composed form: a program holding bcnswift's
    backward ops (a joint graph) or reading a kernels' context anywhere but in the normalization, the batch
    norm's ``normalize`` handed moments (the synchronized layers' phase (c)), and ``BCN_NAN_RAISE``; and
    RuntimeError, naming them, if bcnswift ops are left after the pass (tried with torch 2.15 only, where none
    are; an older torch whose export already wrapped the update would leave it).

    The new program shares the given one's parameters and buffers, and its reshapes become views for the example
    input's memory format, as ``run_decompositions`` makes any program: export with a channels_last example for
    channels_last input. While it runs (a retrace, usually well under a second), a trace that another thread
    makes (torch.compile, torch.export) records the update as those torch operations too; calls of the op itself,
    compiled graphs made before among them, still run the kernel.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"decompose takes a torch.export.ExportedProgram, got {type(program).__name__}")
    _check_program(program)
    table = {} if decomp_table is None else decomp_table.copy()
    table.update(_TABLE)
    with _registration_lock, torch.library._scoped_library("bcnswift", "IMPL") as library:
        library.impl("update_running_", _update_running, "CompositeImplicitAutograd")
        decomposed = program.run_decompositions(table)
    left = sorted({str(t) for t in _op_targets(decomposed) if str(t).startswith("bcnswift.")})
    if left:  # (a guard: every op the check above lets through has a decomposition)
        raise RuntimeError(f"bcnswift ops left after decomposing the program: {', '.join(left)}")
    return decomposed


def _calls(program):
    """The call_function nodes of the program's graph and of its submodules' (a higher-order op's body)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield from (node for node in module.graph.nodes if node.op == "call_function")


def _op_targets(program):
    """The ops the program calls: for a higher-order op that wraps another (auto_functionalized_v2 wraps a
    mutating op), the wrapped one too."""
    for node in _calls(program):
        yield node.target
        if node.args and isinstance(node.args[0], torch._ops.OpOverload):
            yield node.args[0]


def _check_program(program):
    for node in _calls(program):
        if node.target in _BACKWARD_OPS:
            raise ValueError(f"the program calls {node.target}, a backward, which has no composed form: decompose "
                             "takes forward programs (torch.export's); export a joint graph inside "
                             "bcnswift.torch.portable() instead")
        if node.target in _CONTEXT_OUTPUT:
            _check_context_readers(node)


def _check_context_readers(node):
    """The context `node` returns is read by nothing, or as a normalization's `context` argument alone."""
    index = _CONTEXT_OUTPUT[node.target]
    for item in node.users:
        if item.target is not operator.getitem or item.args[1] != index:
            continue
        for reader in item.users:
            read = list(reader.args) + list(reader.kwargs.values())
            if reader.target is not _bcnswift.normalize.default or read[1] is not item or read.count(item) != 1:
                raise ValueError(f"the program reads the kernels' context of {node.name} in {reader.name}: only "
                                 "the kernels compute one, so it has no composed form; export the model inside "
                                 "bcnswift.torch.portable() instead")


def _refuse_nan_raise(flags):
    if flags & _ext.BCN_NAN_RAISE:
        raise ValueError("BCN_NAN_RAISE has no composed form: the kernels check their input's values as they "
                         "read it")


def _unread_context(x, flags, groups):
    """Zeros in the place of the kernels' context (which nothing of a checked program reads)."""
    B, C = x.shape[0], x.shape[1]
    return x.new_zeros(_ops.context_length(B, C, _ops._groups(flags, groups)), dtype=torch.float64)


def _batch_moments(x):
    """The count, mean and M2 of each channel of x ([B, C, *]) in float64, as `bcnswift::moments` lays them out
    ([C * 3]); without a gradient, as the kernels' moments have none."""
    xs = _composed.channel_values(x, torch.float64)
    mean = xs.mean(dim=1)
    m2 = ((xs - mean[:, None]) ** 2).sum(dim=1)
    return torch.stack([torch.full_like(mean, xs.shape[1]), mean, m2], dim=1).reshape(-1)


def _moments(x, flags, groups):
    _refuse_nan_raise(flags)
    return _unread_context(x, flags, groups), _batch_moments(x)


def _normalize(x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags,
               groups, eps, bn_eps):
    _refuse_nan_raise(flags)
    if moments is not None and flags & _ext.BCN_BATCH_NORM and flags & _ext.BCN_TRAINING:
        raise ValueError("bcnswift::normalize handed the batch's moments (the synchronized layers' phase (c)) has "
                         "no composed form: its statistics may be other processes' too")
    y = _composed.normalize(x, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags, groups, eps,
                            bn_eps)
    return y, _unread_context(x, flags, groups)


def _normalize_batch(x, bn_weight, bn_bias, cn_weight, cn_bias, flags, groups, eps, bn_eps):
    _refuse_nan_raise(flags)
    y = _composed.normalize(x, bn_weight, bn_bias, None, None, cn_weight, cn_bias, flags, groups, eps, bn_eps)
    return y, _unread_context(x, flags, groups), _batch_moments(x)


def _update_running(running_mean, running_var, num_batches_tracked, moments, flags, momentum, moving_speed):
    if moving_speed is not None and moving_speed.is_cpu:  # (the op's kernel checks it; not on a GPU: _update_rate)
        _composed.check_speed_in_graph(moving_speed)
    staged = _composed.running_update_from_moments(running_mean, running_var, num_batches_tracked, moments, flags,
                                                   momentum, moving_speed)
    _composed.commit_running((running_mean, running_var, num_batches_tracked), staged)


def _weight_standardization(w, eps, flags):
    return _composed.weight_standardization(w, eps, flags)


_TABLE = {_bcnswift.moments.default: _moments, _bcnswift.normalize.default: _normalize,
          _bcnswift.normalize_batch.default: _normalize_batch,
          _bcnswift.weight_standardization.default: _weight_standardization}
