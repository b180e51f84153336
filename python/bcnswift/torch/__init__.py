"""bcnswift.torch: Batch-Channel Normalization and Weight Standardization for PyTorch, on bcnswift's kernels.

    import torch, bcnswift.torch as bt
    model = bt.convert(torchvision_model, num_groups=32)       # BN/GN -> the authors' BCNorm, Conv2d -> WS
    norm = bt.BCNorm(64, 32, 1e-5, estimate=True)               # the authors' module, state dict and all
    model = torch.compile(model, fullgraph=True)                # custom ops: no graph break
    with bt.portable():                                         # traces of torch operations alone, for
        program = torch.export.export(model, (x,))              # ONNX and runtimes without bcnswift
    program = bt.decompose(torch.export.export(model, (x,)))    # the same, for a program exported with the ops

The modules carry the documents' names, arguments and state-dict keys (the authors' BCNorm/EstBN, labml's
BatchChannelNorm/BatchNorm/EstimatedBatchNorm/ChannelNorm, WS Conv1d/2d/3d/ConvTranspose2d/Linear); CPU float32
and float64 tensors run on the fused Swift kernels through the custom ops in ``bcnswift::`` (see _ops.py), and
everything else (CUDA, MPS, half precision, or BCNSWIFT_TORCH_COMPOSED=1) on the same math composed of torch
operations. Importing bcnswift alone never imports torch; this module needs torch >= 2.9 (an older torch
raises ImportError here; docs/PYTORCH.md, "Supported torch versions").

The kernels run on torch's own OpenMP threads by default, with torch's thread count, rather than on threads
that would compete with them: ``set_num_threads(n)`` (or BCNSWIFT_TORCH_NUM_THREADS) changes that.

The ops' CPU kernels are C++ where a C++ compiler is (built once per torch installation on first import, about
20 seconds, and cached; BCNSWIFT_TORCH_NATIVE=0 keeps the Python kernels): ``uses_native_operators()``.
"""
from ._requirements import require_torch

require_torch()

from . import _ops  # registers the custom ops
from ._native import uses_native_operators
from ._threads import get_num_threads, set_num_threads, uses_torch_threads
from .distributed import GraphCaptureError, SyncBatchChannelNorm, SyncBCNorm, convert_sync_batch_channel_norm
from .convert import convert, fold_weight_standardization, largest_divisor_at_most
from .decompose import decompose
from .functional import BatchNormStage, ChannelNormStage, batch_channel_norm, portable, weight_standardization
from .modules import BatchChannelNorm, BatchNorm, BCNorm, ChannelNorm, EstBN, EstimatedBatchNorm
from .weight_standardized import Conv1d, Conv2d, Conv3d, ConvTranspose2d, Linear

__all__ = ["BCNorm", "EstBN", "BatchChannelNorm", "BatchNorm", "EstimatedBatchNorm", "ChannelNorm", "Conv1d",
           "Conv2d", "Conv3d", "ConvTranspose2d", "Linear", "convert", "fold_weight_standardization",
           "batch_channel_norm", "weight_standardization", "BatchNormStage", "ChannelNormStage",
           "largest_divisor_at_most", "SyncBCNorm", "SyncBatchChannelNorm", "convert_sync_batch_channel_norm",
           "GraphCaptureError", "portable", "decompose",
           "set_num_threads", "get_num_threads", "uses_torch_threads", "uses_native_operators"]
