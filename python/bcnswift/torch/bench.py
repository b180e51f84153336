"""The benchmark a PyTorch user cares about: one training step of a ResNet with WS convolutions and BCN, with
the authors' modules and with bcnswift.torch, eager and compiled (``python -m bcnswift.bench --torch``).

Models (CIFAR-style: 3x3 stem, 4 stages of 2 basic blocks, strides 1, 2, 2, 2, average pool, linear to 10):
  small     widths 32, 64, 128, 256, 16 groups
  resnet18  widths 64, 128, 256, 512, 32 groups
A step is forward, cross-entropy, backward and SGD (momentum 0.9) on a batch of 8 32x32 images, with the
default thread counts. Each model runs four ways: the authors' modules (reference.py: BCNorm on nn.BatchNorm2d,
their WS Conv2d) eager and under torch.compile, and bcnswift.torch eager and compiled. `--ways` picks others, among
them, for scale, "batchnorm2d eager" and "groupnorm eager": bcnswift's WS convolutions with torch's own
nn.BatchNorm2d or nn.GroupNorm, each half of BCN's work, where BCN was.

The normalization's share of a step is 1 - t(same model, normalization layers replaced by nn.Identity) / t(step),
each measured the same way (eager or compiled), in the same run. Every way of a model and its model without
normalization take one step each in turn, so that the machine's slow phases fall on all of them alike; every other
round each way's pair swaps places (the bare model first), so that neither runs after itself or always first. A
share is a difference of two times, each of which moves by 5-10% from one step to the next on a busy machine, so
it is taken round by round (a step and its model's bare step, a few milliseconds apart) and the median of the
rounds' shares is reported, with a distribution-free 95% confidence interval for it. That interval holds the
noise within one run only: between processes, in other phases of the machine, the share has moved by more (run
the benchmark several times to see it).
Step times are medians of the rounds' steps, after a warm-up (which includes compiling).
"""
import json
import statistics
import warnings

import torch
from torch import nn

from ..bench import median_interval, paired_samples
from . import BCNorm, Conv2d, _native, get_num_threads, largest_divisor_at_most, uses_native_operators, \
    uses_torch_threads
from . import reference as R

MODELS = {"small": ((32, 64, 128, 256), 16), "resnet18": ((64, 128, 256, 512), 32)}
#: whose modules a way runs (`build`), and how (`stepper`)
WHO = ("authors", "bcnswift", "batchnorm2d", "groupnorm")
MODES = ("eager", "compiled")
WAYS = ("authors eager", "authors compiled", "bcnswift eager", "bcnswift compiled")


class _Block(nn.Module):
    def __init__(self, cin, cout, stride, conv, norm):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def resnet(widths, conv, norm, classes=10):
    layers = [conv(3, widths[0], 3, padding=1, bias=False), norm(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(2):
            layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1, conv, norm))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def build(model, way, estimate, normalization=True):
    """The model `model` ("small", "resnet18") built the `way` ("authors", "bcnswift"; or, for scale,
    "batchnorm2d" and "groupnorm": bcnswift's WS convolutions with torch's nn.BatchNorm2d or nn.GroupNorm in
    place of BCN, each half of BCN's work); with normalization=False, the same model with every normalization
    layer an nn.Identity (and its convolutions' WS eps raised to keep its activations in range:
    `_keep_in_range`)."""
    widths, groups = MODELS[model]
    if way not in WHO:
        raise ValueError(f"unknown way {way!r}: expected one of {', '.join(WHO)}")
    bcn = R.BCNorm if way == "authors" else BCNorm

    def norm(c):
        g = largest_divisor_at_most(c, groups)
        if not normalization:
            return nn.Identity()
        if way == "batchnorm2d":
            return nn.BatchNorm2d(c)
        if way == "groupnorm":
            return nn.GroupNorm(g, c)
        m = bcn(c, g, 1e-5, estimate=estimate)
        if estimate:
            m.bn.estbn_moving_speed.fill_(0.1)
        return m
    conv = R.AuthorsConv2d if way == "authors" else Conv2d
    torch.manual_seed(0)
    net = resnet(widths, conv, norm)
    return net if normalization else _keep_in_range(net)


def _keep_in_range(net):
    """A model without normalization whose steps compute on numbers, as its normalized twin's do.

    With nothing to normalize them, a standardized convolution multiplies its input's scale by about
    sqrt(fan-in): the output of "small" starts near 1e19, and a few SGD steps later every value is NaN. Such a
    step is not the normalized step minus its normalization (bcnswift's resnet18 bare step took 8-12% longer on
    NaN than on numbers in two runs), and the share came out low, at times below 0. Each convolution's WS eps (an
    addition per output channel, whatever its value) is raised here to std(w)·(sqrt(fan-in) - 1), so that
    (w - mean) / (std + eps) has a standard deviation of 1/sqrt(fan-in) and the convolution keeps its input's
    scale."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            eps = float(m.weight.detach().flatten(1).std(dim=1).mean()) * (fan_in ** 0.5 - 1)
            if isinstance(m, R.AuthorsConv2d):
                m.std_eps = eps
            else:
                m.ws_eps = eps
    return net


def stepper(model, compiled, batch=8):
    """One training step of `model` as a function of no arguments (compiled with torch.compile if asked)."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 32, 32) + 0.5
    target = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model) if compiled else model
    if compiled:
        # compile afresh: inductor's cache keys ignore a custom op's tags, so a graph cached from another
        # version of bcnswift (or of this benchmark's models) could stand in for the one under test
        from torch._inductor import config
        run = config.patch(force_disable_caches=True)(run)
        # dynamo keeps 8 compiled graphs per code object (every model's forward is the same code) and runs any
        # beyond them eagerly, saying so only in a log: a step timed as compiled must be compiled
        run = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)(run)
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run(x), target)
        loss.backward()
        opt.step()
        step.loss = loss.detach()  # checked after timing: a step on NaN is not the step under test
    return step


def interleaved_times(steps, repeats, warmup):
    """Seconds of each step function, one per round, after `warmup` steps each (compiling, when compiled): one
    step each in turn, so that the machine's slow phases fall on all of them alike. `steps` holds pairs (a way,
    then its bare model), whose two swap places every other round (`bcnswift.bench.paired_samples` with
    pairs=True). Time r of every step comes from round r."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = paired_samples(list(steps.values()), min_seconds=0.0, repeats=repeats, pairs=True)
    return dict(zip(steps, times))


def normalization_share(times, bare_times):
    """(median, low, high): the median over rounds of 1 - t_bare / t, a round's step and its bare step timed
    next to each other, and a 95% confidence interval for it (`bcnswift.bench.median_interval`). Noise can make
    a round's share negative, and so the median and the interval."""
    shares = [1 - b / t for t, b in zip(times, bare_times)]
    return (statistics.median(shares), *median_interval(shares))


def _percent(share):
    """A share in whole percent, without the "-0" of a share just below 0."""
    return f"{round(share * 100)}"


def _kernel_threads():
    """Where bcnswift.torch's kernels run (set_num_threads), in words."""
    n = get_num_threads()
    if uses_torch_threads():
        return "torch's OpenMP threads"
    if n is None or n == 1:
        return "the calling thread"
    return f"{n} bcnswift threads" if n else "bcnswift's default threads"


def check_way(way):
    """(who, mode) of a way '<who> <mode>'; ValueError naming the choices if it is not one."""
    who, _, mode = way.partition(" ")
    if who not in WHO or mode not in MODES:
        raise ValueError(f"unknown way {way!r}: expected '<who> <mode>' with who one of {', '.join(WHO)} "
                         f"and mode one of {', '.join(MODES)}")
    return who, mode


def run(models=("small", "resnet18"), ways=WAYS, repeats=41, warmup=3, estimate=False, json_path=None,
        threads=None):
    """Times every way of every model (`interleaved_times`), prints a line each and the ratios, and returns
    both. `threads`: torch's thread count for the run (None: torch's default), on which bcnswift.torch's
    kernels run too."""
    if threads is not None:
        torch.set_num_threads(threads)
    ops = "native" if uses_native_operators() else f"Python ({_native.reason})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), bcnswift.torch's kernels on "
          f"{_kernel_threads()}, its ops' kernels {ops}; training step: batch 8, 32x32, SGD; BCN "
          f"estimate={estimate}; {repeats} rounds, in each of which every way and its model without "
          f"normalization take a step in turn; medians over the rounds")
    results = {}
    for model in models:
        steps = {}
        for way in ways:
            who, mode = check_way(way)
            compiled = mode == "compiled"
            steps[way] = stepper(build(model, who, estimate), compiled)
            steps[way + " bare"] = stepper(build(model, who, estimate, normalization=False), compiled)
        times = interleaved_times(steps, repeats, warmup)
        for name, step in steps.items():
            if not torch.isfinite(step.loss):
                raise RuntimeError(f"{model} {name}: the loss is {float(step.loss)} after the timed steps; "
                                   f"their times would not be those of the step under test")
        for way in ways:
            share, low, high = normalization_share(times[way], times[way + " bare"])
            t = statistics.median(times[way])
            results[f"{model} {way}"] = {"ms_per_step": t * 1e3, "normalization_share": share,
                                         "normalization_share_ci95": [low, high]}
            print(f"{model} {way}: {t * 1e3:.1f} ms/step, normalization {_percent(share)}% "
                  f"(this run's 95% CI {_percent(low)}..{_percent(high)}%)", flush=True)
        torch._dynamo.reset()
    ratios = {}
    for model in models:
        def ms(way):
            return results.get(f"{model} {way}", {}).get("ms_per_step")
        for num, den in (("authors eager", "bcnswift eager"), ("authors compiled", "bcnswift compiled"),
                         ("bcnswift eager", "bcnswift compiled")):
            if ms(num) and ms(den):
                key = f"{model}: {num} / {den}"
                ratios[key] = ms(num) / ms(den)
                print(f"{key} = {ratios[key]:.2f}x")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "bcnswift_torch_threads": _kernel_threads(), "native_operators": uses_native_operators(),
                       "estimate": estimate,
                       "repeats": repeats, "results": results, "ratios": ratios}, f, indent=2)
    return results, ratios
