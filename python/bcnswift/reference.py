"""Numpy transcriptions of the reference documents' code, in float64 (or np.longdouble, when given longdouble
inputs: an extended-precision reference), with hand-derived backward passes.

These are the truth bcnswift is tested against (python/tests), and are themselves checked by finite differences.
Each class follows one document's code line by line where it can; where a document's module only takes 4-D
input (nn.BatchNorm2d, EstBN's view(1, -1, 1, 1)), the same arithmetic is applied to [B, C, *].

  LabmlBatchNorm, LabmlEstimatedBatchNorm, LabmlChannelNorm, LabmlBatchChannelNorm   (000, 001, 004)
  TorchBatchNorm2d   PyTorch nn.BatchNorm2d semantics: running_var stored unbiased   (003, the authors' self.bn)
  AuthorsEstBN       the authors' EstBN (variance around the running mean before its update; rate
                     estbn_moving_speed; eps fixed at 1e-5)                               (003)
  AuthorsBCNorm      the authors' BCNorm: bn, then batch_norm over (b, g) rows, then per-group affine (003)
  ws_labml, ws_authors (+ _backward)   Weight Standardization's two conventions

Forward methods cache what backward needs; backward(dy) returns dx and stores parameter gradients in .grads.

Where the documents' code does something a transcription cannot, or the documents disagree with themselves:
- labml's BatchNorm (001, and 000's BatchChannelNorm with estimate=False) updates exp_mean and exp_var with autograd
  on, so in its own code an eval-mode backward raises ("backward through the graph a second time") or, with
  retain_graph, flows through the running averages into earlier steps. These transcriptions hold running
  statistics constant in eval, as PyTorch's batch norms and bcnswift do.
- 002 (a notebook) computes 001's batch norm with a two-pass variance (torch.var) where labml takes E[x²] - E[x]²;
  it has no transcription of its own (LabmlBatchNorm stands for it, and the layers load its gamma/beta names),
  and its BatchNorm2D cannot run eval (n_features is undefined).
- 004 writes the folded variance about the running mean in its prose and about the batch mean in its code, as
  000 does; the transcription follows the code. 004 calls the affine gamma and beta where 000 says scale, shift.
- AuthorsEstBN's estbn_moving_speed is a float64; the authors' buffer is float32, where 0.1 is 0.10000000149:
  compare bit for bit with the buffer's value, not with 0.1.
"""
import numpy as np


def _rows_standardize(z, eps):
    """Each row of z [R, N] to zero mean and unit biased variance: (z - mean) / sqrt(var + eps)."""
    mean = z.mean(axis=1, keepdims=True)
    var = z.var(axis=1, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    return (z - mean) * inv, inv


def _rows_standardize_backward(dxhat, xhat, inv):
    """Gradient of _rows_standardize: inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    return inv * (dxhat - dxhat.mean(axis=1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))


def _wide(x):
    """x as an array of at least float64 precision (longdouble stays longdouble)."""
    x = np.asarray(x)
    return x.astype(np.result_type(x.dtype, np.float64), copy=False)


def _bcs(x):
    x = _wide(x)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _channel_rows(x3):
    """[B, C, S] -> [C, B*S] (each channel's values as one row)."""
    return x3.transpose(1, 0, 2).reshape(x3.shape[1], -1)


def _from_channel_rows(r, shape3):
    B, C, S = shape3
    return r.reshape(C, B, S).transpose(1, 0, 2)


class _Module:
    training = True

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)


class LabmlBatchNorm(_Module):
    """001: labml BatchNorm. var = E[x²] - E[x]² (biased), stored biased in exp_var."""

    def __init__(self, channels, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.scale, self.shift = np.ones(channels), np.zeros(channels)
        self.exp_mean, self.exp_var = np.zeros(channels), np.ones(channels)

    def forward(self, x):
        x_shape = np.shape(x)
        x = _bcs(x)
        assert self.channels == x.shape[1]
        if self.training or not self.track_running_stats:
            mean = x.mean(axis=(0, 2))
            mean_x2 = (x ** 2).mean(axis=(0, 2))
            var = mean_x2 - mean ** 2
            if self.training and self.track_running_stats:
                self.exp_mean = (1 - self.momentum) * self.exp_mean + self.momentum * mean
                self.exp_var = (1 - self.momentum) * self.exp_var + self.momentum * var
            self._batch_stats = True
        else:
            mean, var = self.exp_mean, self.exp_var
            self._batch_stats = False
        inv = 1.0 / np.sqrt(var + self.eps)
        x_norm = (x - mean.reshape(1, -1, 1)) * inv.reshape(1, -1, 1)
        self._cache = (x_shape, x.shape, x_norm, inv)
        if self.affine:
            x_norm = self.scale.reshape(1, -1, 1) * x_norm + self.shift.reshape(1, -1, 1)
        return x_norm.reshape(x_shape)

    __call__ = forward

    def backward(self, dy):
        x_shape, shape3, x_norm, inv = self._cache
        dy = _wide(dy).reshape(shape3)
        self.grads = {"scale": (dy * x_norm).sum(axis=(0, 2)), "shift": dy.sum(axis=(0, 2))}
        dxn = dy * self.scale.reshape(1, -1, 1) if self.affine else dy
        if self._batch_stats:
            dx = _from_channel_rows(_rows_standardize_backward(_channel_rows(dxn), _channel_rows(x_norm),
                                                               inv.reshape(-1, 1)), shape3)
        else:
            dx = dxn * inv.reshape(1, -1, 1)
        return dx.reshape(x_shape)


class LabmlEstimatedBatchNorm(_Module):
    """000/004: labml EstimatedBatchNorm. Training updates exp_mean/exp_var (biased var via E[x²] - E[x]²) under
    no_grad, then normalizes with them."""

    def __init__(self, channels, eps=1e-5, momentum=0.1, affine=True):
        self.channels, self.eps, self.momentum, self.affine = channels, eps, momentum, affine
        self.scale, self.shift = np.ones(channels), np.zeros(channels)
        self.exp_mean, self.exp_var = np.zeros(channels), np.ones(channels)

    def forward(self, x):
        x_shape = np.shape(x)
        x = _bcs(x)
        assert self.channels == x.shape[1]
        if self.training:
            mean = x.mean(axis=(0, 2))
            mean_x2 = (x ** 2).mean(axis=(0, 2))
            var = mean_x2 - mean ** 2
            self.exp_mean = (1 - self.momentum) * self.exp_mean + self.momentum * mean
            self.exp_var = (1 - self.momentum) * self.exp_var + self.momentum * var
        inv = 1.0 / np.sqrt(self.exp_var + self.eps)
        x_norm = (x - self.exp_mean.reshape(1, -1, 1)) * inv.reshape(1, -1, 1)
        self._cache = (x_shape, x.shape, x_norm, inv)
        if self.affine:
            x_norm = self.scale.reshape(1, -1, 1) * x_norm + self.shift.reshape(1, -1, 1)
        return x_norm.reshape(x_shape)

    __call__ = forward

    def backward(self, dy):
        x_shape, shape3, x_norm, inv = self._cache
        dy = _wide(dy).reshape(shape3)
        self.grads = {"scale": (dy * x_norm).sum(axis=(0, 2)), "shift": dy.sum(axis=(0, 2))}
        dxn = dy * self.scale.reshape(1, -1, 1) if self.affine else dy
        return (dxn * inv.reshape(1, -1, 1)).reshape(x_shape)


class LabmlChannelNorm(_Module):
    """000: labml ChannelNorm: x.view(B, G, -1), var = E[x²] - E[x]², per-group scale and shift."""

    def __init__(self, channels, groups, eps=1e-5, affine=True):
        self.channels, self.groups, self.eps, self.affine = channels, groups, eps, affine
        self.scale, self.shift = np.ones(groups), np.zeros(groups)

    def forward(self, x):
        x_shape = np.shape(x)
        B = x_shape[0]
        assert self.channels == x_shape[1]
        x = _wide(x).reshape(B, self.groups, -1)
        mean = x.mean(axis=-1, keepdims=True)
        mean_x2 = (x ** 2).mean(axis=-1, keepdims=True)
        var = mean_x2 - mean ** 2
        inv = 1.0 / np.sqrt(var + self.eps)
        x_norm = (x - mean) * inv
        self._cache = (x_shape, x_norm, inv)
        if self.affine:
            x_norm = self.scale.reshape(1, -1, 1) * x_norm + self.shift.reshape(1, -1, 1)
        return x_norm.reshape(x_shape)

    __call__ = forward

    def backward(self, dy):
        x_shape, x_norm, inv = self._cache
        B, G = x_norm.shape[:2]
        dy = _wide(dy).reshape(x_norm.shape)
        self.grads = {"scale": (dy * x_norm).sum(axis=(0, 2)), "shift": dy.sum(axis=(0, 2))}
        dxn = dy * self.scale.reshape(1, -1, 1) if self.affine else dy
        dx = _rows_standardize_backward(dxn.reshape(B * G, -1), x_norm.reshape(B * G, -1), inv.reshape(-1, 1))
        return dx.reshape(x_shape)


class LabmlBatchChannelNorm(_Module):
    """000: labml BatchChannelNorm: EstimatedBatchNorm (estimate=True) or BatchNorm, then ChannelNorm."""

    def __init__(self, channels, groups, eps=1e-5, momentum=0.1, estimate=True):
        if estimate:
            self.batch_norm = LabmlEstimatedBatchNorm(channels, eps=eps, momentum=momentum)
        else:
            self.batch_norm = LabmlBatchNorm(channels, eps=eps, momentum=momentum)
        self.channel_norm = LabmlChannelNorm(channels, groups, eps)

    def train(self, mode=True):
        self.training = mode
        self.batch_norm.train(mode)
        self.channel_norm.train(mode)
        return self

    def forward(self, x):
        return self.channel_norm(self.batch_norm(x))

    __call__ = forward

    def backward(self, dy):
        dx = self.batch_norm.backward(self.channel_norm.backward(dy))
        self.grads = {"batch_norm.scale": self.batch_norm.grads["scale"],
                      "batch_norm.shift": self.batch_norm.grads["shift"],
                      "channel_norm.scale": self.channel_norm.grads["scale"],
                      "channel_norm.shift": self.channel_norm.grads["shift"]}
        return dx

    def state_dict(self):
        return {"batch_norm.scale": self.batch_norm.scale.copy(), "batch_norm.shift": self.batch_norm.shift.copy(),
                "batch_norm.exp_mean": self.batch_norm.exp_mean.copy(),
                "batch_norm.exp_var": self.batch_norm.exp_var.copy(),
                "channel_norm.scale": self.channel_norm.scale.copy(),
                "channel_norm.shift": self.channel_norm.shift.copy()}


class TorchBatchNorm2d(_Module):
    """nn.BatchNorm2d (the authors' self.bn with estimate=False) on [B, C, *]: batch mean and biased variance in
    training; running_var updated with the unbiased variance; momentum None is the cumulative average."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight, self.bias = np.ones(num_features), np.zeros(num_features)
        self.running_mean, self.running_var = np.zeros(num_features), np.ones(num_features)
        self.num_batches_tracked = 0

    def forward(self, x):
        x_shape = np.shape(x)
        x3 = _bcs(x)
        if self.training:
            self.num_batches_tracked += 1
            factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            rows = _channel_rows(x3)
            n = rows.shape[1]
            if n <= 1:
                raise ValueError("Expected more than 1 value per channel when training")
            xhat, inv = _rows_standardize(rows, self.eps)
            mean, var = rows.mean(axis=1), rows.var(axis=1)
            self.running_mean = (1 - factor) * self.running_mean + factor * mean
            self.running_var = (1 - factor) * self.running_var + factor * var * n / (n - 1)
            x_norm = _from_channel_rows(xhat, x3.shape)
            self._cache = (x_shape, x3.shape, x_norm, inv.reshape(-1), True)
        else:
            inv = 1.0 / np.sqrt(self.running_var + self.eps)
            x_norm = (x3 - self.running_mean.reshape(1, -1, 1)) * inv.reshape(1, -1, 1)
            self._cache = (x_shape, x3.shape, x_norm, inv, False)
        out = self.weight.reshape(1, -1, 1) * x_norm + self.bias.reshape(1, -1, 1)
        return out.reshape(x_shape)

    __call__ = forward

    def backward(self, dy):
        x_shape, shape3, x_norm, inv, batch = self._cache
        dy = _wide(dy).reshape(shape3)
        self.grads = {"weight": (dy * x_norm).sum(axis=(0, 2)), "bias": dy.sum(axis=(0, 2))}
        dxn = dy * self.weight.reshape(1, -1, 1)
        if batch:
            dx = _from_channel_rows(_rows_standardize_backward(_channel_rows(dxn), _channel_rows(x_norm),
                                                               inv.reshape(-1, 1)), shape3)
        else:
            dx = dxn * inv.reshape(1, -1, 1)
        return dx.reshape(x_shape)


class AuthorsEstBN(_Module):
    """003: the authors' EstBN, transcribed. Note eps is fixed at 1e-5 and num_batches_tracked never advances."""

    def __init__(self, num_features):
        self.num_features = num_features
        self.weight, self.bias = np.ones(num_features), np.zeros(num_features)
        self.running_mean, self.running_var = np.zeros(num_features), np.ones(num_features)
        self.num_batches_tracked = 0
        self.estbn_moving_speed = np.zeros(1)

    def forward(self, inp):
        ms = float(self.estbn_moving_speed[0])
        x_shape = np.shape(inp)
        inp3 = _bcs(inp)
        if self.training:
            inp_t = _channel_rows(inp3)
            running_mean = inp_t.mean(axis=1)
            inp_t = inp_t - self.running_mean.reshape(-1, 1)
            running_var = np.mean(inp_t * inp_t, axis=1)
            self.running_mean = self.running_mean * (1 - ms) + ms * running_mean
            self.running_var = self.running_var * (1 - ms) + ms * running_var
        inv = 1.0 / np.sqrt(self.running_var + 1e-5)
        out = (inp3 - self.running_mean.reshape(1, -1, 1)) * inv.reshape(1, -1, 1)
        self._cache = (x_shape, inp3.shape, out, inv)
        out = self.weight.reshape(1, -1, 1) * out + self.bias.reshape(1, -1, 1)
        return out.reshape(x_shape)

    __call__ = forward

    def backward(self, dy):
        x_shape, shape3, x_norm, inv = self._cache
        dy = _wide(dy).reshape(shape3)
        self.grads = {"weight": (dy * x_norm).sum(axis=(0, 2)), "bias": dy.sum(axis=(0, 2))}
        return (dy * (self.weight * inv).reshape(1, -1, 1)).reshape(x_shape)


class AuthorsBCNorm(_Module):
    """003: the authors' BCNorm, transcribed: bn, view(1, B*G, -1), batch_norm(training, eps), per-group affine."""

    def __init__(self, num_channels, num_groups, eps, estimate=False):
        self.num_channels, self.num_groups, self.eps = num_channels, num_groups, eps
        self.weight, self.bias = np.ones((1, num_groups, 1)), np.zeros((1, num_groups, 1))
        self.bn = AuthorsEstBN(num_channels) if estimate else TorchBatchNorm2d(num_channels)

    def train(self, mode=True):
        self.training = mode
        self.bn.train(mode)
        return self

    def forward(self, inp):
        out = self.bn(inp)
        B = np.shape(inp)[0]
        rows = out.reshape(B * self.num_groups, -1)  # the view(1, B*G, -1) batch_norm: one row per (b, g)
        xhat, inv = _rows_standardize(rows, self.eps)
        self._cache = (np.shape(inp), xhat, inv)
        out = xhat.reshape(B, self.num_groups, -1)
        out = self.weight * out + self.bias
        return out.reshape(np.shape(inp))

    __call__ = forward

    def backward(self, dy):
        shape, xhat, inv = self._cache
        B, G = shape[0], self.num_groups
        dy3 = _wide(dy).reshape(B, G, -1)
        xh3 = xhat.reshape(B, G, -1)
        gw = (dy3 * xh3).sum(axis=(0, 2)).reshape(1, G, 1)
        gb = dy3.sum(axis=(0, 2)).reshape(1, G, 1)
        drows = _rows_standardize_backward((dy3 * self.weight).reshape(B * G, -1), xhat, inv)
        dx = self.bn.backward(drows.reshape(shape))
        self.grads = {"weight": gw, "bias": gb, "bn.weight": self.bn.grads["weight"], "bn.bias": self.bn.grads["bias"]}
        return dx.reshape(shape)

    def state_dict(self):
        d = {"weight": self.weight.copy(), "bias": self.bias.copy(), "bn.weight": self.bn.weight.copy(),
             "bn.bias": self.bn.bias.copy(), "bn.running_mean": self.bn.running_mean.copy(),
             "bn.running_var": self.bn.running_var.copy(),
             "bn.num_batches_tracked": np.array(self.bn.num_batches_tracked, np.int64)}
        if isinstance(self.bn, AuthorsEstBN):
            d["bn.estbn_moving_speed"] = self.bn.estbn_moving_speed.copy()
        return d


# ---- Weight Standardization ---------------------------------------------------------------------------------

def ws_labml(weight, eps=1e-5, unbiased=True):
    """labml: var, mean = torch.var_mean(weight.view(c_out, -1), dim=1); (w - mean) / sqrt(var + eps)."""
    w = _wide(weight)
    w2 = w.reshape(w.shape[0], -1)
    var = w2.var(axis=1, ddof=1 if unbiased else 0, keepdims=True)
    mean = w2.mean(axis=1, keepdims=True)
    return ((w2 - mean) / np.sqrt(var + eps)).reshape(w.shape)


def ws_authors(weight, eps=1e-5, unbiased=True):
    """The authors' Conv2d: mean over dims 1, 2, 3 in turn; w - mean; divide by std(dim=1) + eps (on [O, -1])."""
    w = _wide(weight)
    mean = w
    for axis in range(1, w.ndim):
        mean = mean.mean(axis=axis, keepdims=True)
    w = w - mean
    std = w.reshape(w.shape[0], -1).std(axis=1, ddof=1 if unbiased else 0)
    std = std.reshape((-1,) + (1,) * (w.ndim - 1)) + eps
    return w / std


def ws_backward(weight, grad_w_hat, eps=1e-5, unbiased=True, eps_in_sqrt=True):
    """Hand-derived gradient of ws_labml (eps_in_sqrt) or ws_authors with respect to the raw weight."""
    w = _wide(weight)
    O = w.shape[0]
    w2 = w.reshape(O, -1)
    g = _wide(grad_w_hat).reshape(O, -1)
    n = w2.shape[1]
    nu = n - (1 if unbiased else 0)
    c = w2 - w2.mean(axis=1, keepdims=True)
    var = (c * c).sum(axis=1, keepdims=True) / nu
    std = np.sqrt(var)
    den = np.sqrt(var + eps) if eps_in_sqrt else std + eps
    # d den / d var: 1/(2 den) or 1/(2 std); d var / d w_j = 2 c_j / nu
    dden_dvar = 1.0 / (2.0 * den) if eps_in_sqrt else np.where(std > 0, 1.0 / (2.0 * np.where(std > 0, std, 1)), 0.0)
    s = (g * c).sum(axis=1, keepdims=True)
    dw = (g - g.mean(axis=1, keepdims=True)) / den - s / den ** 2 * dden_dvar * 2.0 * c / nu
    return dw.reshape(w.shape)
