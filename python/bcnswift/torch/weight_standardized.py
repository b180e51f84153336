"""Weight-Standardized layers: subclasses of the torch layers whose weight is standardized per output channel,
over its fan-in, on every forward (Qiao et al.).

``convention="authors"`` (the default): (w - mean) / (std + eps), std unbiased, as the authors' Conv2d.
``convention="labml"``: (w - mean) / sqrt(var + eps), var unbiased, as labml's weight_standardization (seed 004).
The output channels are dim 0 of the weight, except for ConvTranspose2d, whose weight is [in, out/groups, ...]:
there output channel k·(out/groups) + j reads w[k·in/groups:(k+1)·in/groups, j] (its group's inputs), so its fan-in
is that block.
"""
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from ._ops import KernelViews, fx_leaf
from ..layers import _positive_float
from .functional import standardizable, weight_standardization

CONVENTIONS = {"authors": False, "labml": True}  # convention -> eps inside the square root


class _WeightStandardized(KernelViews):
    """What every WS layer shares: the convention, eps, and the standardized weight."""

    _output_dim = 0

    def __init_subclass__(cls, **kwargs):
        """A WS layer's signature is its torch layer's, then ``convention`` and ``eps`` (keyword-only): tools read
        it (torch.nn.utils.skip_init asks for ``device``), and ``__init__`` below takes *args and **kwargs."""
        super().__init_subclass__(**kwargs)
        if cls.__init__ is not _WeightStandardized.__init__:  # a subclass's own __init__ says what it takes
            cls.__signature__ = None
            return
        layer = next((c for c in cls.__mro__ if c.__module__.startswith("torch.nn.modules.")
                      and c is not nn.Module), None)
        if layer is None:  # the shared bases (_StandardizedConv)
            return
        torch_signature = inspect.signature(layer.__init__)
        ws = [inspect.Parameter("convention", inspect.Parameter.KEYWORD_ONLY, default="authors"),
              inspect.Parameter("eps", inspect.Parameter.KEYWORD_ONLY, default=1e-5)]
        taken = [p for p in list(torch_signature.parameters.values())[1:] if p.kind != p.VAR_KEYWORD]
        cls.__signature__ = torch_signature.replace(parameters=taken + ws)

    def __init__(self, *args, convention="authors", eps=1e-5, **kwargs):
        """The torch layer's arguments, then WS's: ``convention`` ("authors" or "labml") and ``eps``."""
        super().__init__(*args, **kwargs)
        if not isinstance(convention, str) or convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        # not a bool or a string, and above 0: the kernels refuse others at the first forward; say so here
        self.convention, self.ws_eps = convention, _positive_float(eps, "eps")

    @property
    def eps(self):
        """WS's eps (kept as ``ws_eps``), under the name the constructor and labml's layers give it; assigning it
        takes effect at the next call."""
        return self.ws_eps

    @eps.setter
    def eps(self, value):
        self.ws_eps = _positive_float(value, "eps")

    def standardized_weight(self, weight=None):
        """The weight the layer computes with (differentiable with respect to ``weight``); of `weight` instead of
        ``self.weight`` when given."""
        w = self.weight if weight is None else weight
        if not self._output_dim:
            return self._standardized(w)
        # [in, out/groups, *k]: output channel (k, j)'s fan-in is w[k·in/g:(k+1)·in/g, j], rows of [out, in/g, *k]
        g, kernel = self.groups, w.shape[2:]
        if g == 1:
            return self._standardized(w.transpose(0, 1)).transpose(0, 1)
        blocks = (g, w.shape[0] // g, w.shape[1]) + kernel
        rows = w.reshape(blocks).transpose(1, 2).reshape((g * w.shape[1], w.shape[0] // g) + kernel)
        return self._standardized(rows).reshape(blocks[:1] + blocks[2:3] + blocks[1:2] + kernel).transpose(1, 2) \
            .reshape(w.shape)

    def _standardized(self, w):
        """`w` ([out, fan-in...]) standardized per row; both conventions divide by an unbiased deviation."""
        if not w.shape[0]:  # no output channels (torch's layers allow them: an empty output), nothing to standardize
            return w.clone()
        if not standardizable(w):  # a fan-in below 2 (integers only: this runs on every forward)
            raise ValueError(f"{type(self).__name__}: Weight Standardization needs a fan-in of at least 2 per output "
                             f"channel (its unbiased deviation), got weight of shape {tuple(self.weight.shape)}")
        return weight_standardization(w, self.ws_eps, eps_in_sqrt=CONVENTIONS[self.convention],
                                      views=self.kernel_views())

    def extra_repr(self):
        return f"{super().extra_repr()}, convention={self.convention!r}, ws_eps={self.ws_eps}"


class _StandardizedConv(_WeightStandardized):
    """The forward of the WS convolutions whose torch layer has `_conv_forward(x, weight, bias)`."""

    @fx_leaf
    def forward(self, input):  # torch's name, which callers may pass by keyword
        return self._conv_forward(input, self.standardized_weight(), self.bias)


class Conv1d(_StandardizedConv, nn.Conv1d):
    """nn.Conv1d with Weight Standardization; same arguments, plus ``convention`` and ``eps``."""


class Conv2d(_StandardizedConv, nn.Conv2d):
    """nn.Conv2d with Weight Standardization; same arguments, plus ``convention`` and ``eps``."""


class Conv3d(_StandardizedConv, nn.Conv3d):
    """nn.Conv3d with Weight Standardization; same arguments, plus ``convention`` and ``eps``."""


class ConvTranspose2d(_WeightStandardized, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with Weight Standardization (per output channel: dim 1 of the weight, over its group's
    inputs); same arguments, plus ``convention`` and ``eps``."""

    _output_dim = 1

    @fx_leaf
    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")  # torch's words
        num_spatial_dims = 2
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              num_spatial_dims, self.dilation)
        return F.conv_transpose2d(input, self.standardized_weight(), self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)


class Linear(_WeightStandardized, nn.Linear):
    """nn.Linear with Weight Standardization; same arguments, plus ``convention`` and ``eps``."""

    @fx_leaf
    def forward(self, input):
        return F.linear(input, self.standardized_weight(), self.bias)


#: each WS layer and the torch layer it folds into
PLAIN = {Conv1d: nn.Conv1d, Conv2d: nn.Conv2d, Conv3d: nn.Conv3d, ConvTranspose2d: nn.ConvTranspose2d,
         Linear: nn.Linear}


#: the methods a WS layer's output comes from: a subclass that overrides one computes something else
_COMPUTING = ("forward", "standardized_weight", "_standardized", "_conv_forward", "_output_padding")


def ws_class(layer):
    """The WS class of `layer` (a key of PLAIN), or None: the WS class its class derives from, unless that
    subclass overrides a method the output comes from (a forward of its own, say), which makes it no WS layer to
    fold. A subclass that only adds attributes or an __init__ folds, and so does a layer that carries a
    parametrization (torch.nn.utils.parametrize makes its class a subclass that adds properties)."""
    cls = type(layer)
    base = next((c for c in cls.__mro__ if c in PLAIN), None)
    if base is None or any(getattr(cls, name, None) is not getattr(base, name, None) for name in _COMPUTING):
        return None
    return base


def eval_value(layer, name):
    """Tensor `name` of `layer` ("weight" or "bias") as the layer's next call in eval mode computes it. torch's
    hook-based weight_norm and spectral_norm (and torch.nn.utils.prune's masks) compute it in a hook before each
    call, so the attribute holds the last call's, which an optimizer step since has made stale: their hook computes
    it afresh (spectral_norm without a power iteration, as in eval). A parametrization computes it on every read: it
    is read with the layer in eval mode (spectral_norm's power iteration would otherwise move its vectors), then the
    layer's modes are restored, so that reading changes nothing."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(layer)
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return hook.compute_weight(layer, do_power_iteration=False)
        if isinstance(hook, BasePruningMethod) and hook._tensor_name == name:  # (torch.nn.utils.prune)
            return hook.apply_mask(layer)
    modes = [(module, module.training) for module in layer.modules()]
    try:
        layer.eval()
        return getattr(layer, name)
    finally:
        for module, training in modes:
            module.training = training


def _trained(layer, name):
    """Whether any parameter `name` is made of requires grad: the parameter itself, a hook-based weight_norm's or
    spectral_norm's (weight_g, weight_v, weight_orig), or a parametrization's (parametrizations.weight.*)."""
    return any(p.requires_grad for key, p in layer.named_parameters()
               if key == name or key.startswith((f"{name}_", f"parametrizations.{name}.")))


def plain_copy(layer):
    """The torch layer (nn.Conv2d, ...) computing what the WS `layer` computes now in eval mode: its standardized
    weight (a new Parameter in the weight's memory format, which requires grad where the weight's parameters do)
    and its bias (the same Parameter, or a new one holding a computed bias). A weight or bias computed from
    others (weight_norm, spectral_norm, any parametrization) is taken as the next call in eval mode would compute
    it (`eval_value`) and kept as a plain Parameter: fold is for inference."""
    plain = PLAIN[ws_class(layer)]
    with torch.no_grad():
        w, bias = eval_value(layer, "weight"), eval_value(layer, "bias")
    kw = {"device": "meta", "dtype": w.dtype}  # every parameter comes from `layer`: none is made here
    if plain is nn.Linear:
        out = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **kw)
    else:
        extra = {"output_padding": layer.output_padding} if plain is nn.ConvTranspose2d else {}
        out = plain(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    bias=bias is not None, padding_mode=layer.padding_mode, **extra, **kw)
    with torch.no_grad():
        standardized = torch.empty_like(w)  # w's strides: channels_last stays channels_last
        standardized.copy_(layer.standardized_weight(w))
    out.weight = nn.Parameter(standardized, requires_grad=_trained(layer, "weight"))
    if bias is not None:
        out.bias = bias if isinstance(bias, nn.Parameter) else \
            nn.Parameter(bias.detach().clone(), requires_grad=_trained(layer, "bias"))
    out.train(layer.training)
    return out
