"""The benchmark a PyTorch user cares about: one training step of a ResNet with WS convolutions and BCN, with
the authors' modules and with bcnswift.torch, eager and compiled (``python -m bcnswift.bench --torch``).

Models (CIFAR-style: 3x3 stem, 4 stages of 2 basic blocks, strides 1, 2, 2, 2, average pool, linear to 10):
  small     widths 32, 64, 128, 256, 16 groups
  resnet18  widths 64, 128, 256, 512, 32 groups
A step is forward, cross-entropy, backward and SGD (momentum 0.9) on a batch of 8 32x32 images, with the
default thread counts. Each model runs four ways: the authors' modules (reference.py: BCNorm on nn.BatchNorm2d,
their WS Conv2d) eager and under torch.compile, and bcnswift.torch eager and compiled.

The normalization's share of a step is 1 - t(same model, normalization layers replaced by nn.Identity) / t(step),
each measured the same way (eager or compiled), in the same run. Times are medians of repeated steps after a
warm-up (which includes compiling). Every way of a model and its model without normalization take one step each
in turn, the order reversed every other round, so that the machine's slow phases fall on all of them alike:
a share is a difference of two times, and timed apart, minutes of drift swamped it.
"""
import json
import warnings

import torch
from torch import nn

from ..bench import paired_median_times
from . import BCNorm, Conv2d, _native, get_num_threads, largest_divisor_at_most, uses_native_operators, \
    uses_torch_threads
from . import reference as R

MODELS = {"small": ((32, 64, 128, 256), 16), "resnet18": ((64, 128, 256, 512), 32)}


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
    """The model `model` ("small", "resnet18") built the `way` ("authors", "bcnswift"); with
    normalization=False, the same model with every normalization layer an nn.Identity."""
    widths, groups = MODELS[model]
    if not normalization:
        def norm(c):
            return nn.Identity()
    elif way == "authors":
        def norm(c):
            m = R.BCNorm(c, largest_divisor_at_most(c, groups), 1e-5, estimate=estimate)
            if estimate:
                m.bn.estbn_moving_speed.fill_(0.1)
            return m
    else:
        def norm(c):
            m = BCNorm(c, largest_divisor_at_most(c, groups), 1e-5, estimate=estimate)
            if estimate:
                m.bn.estbn_moving_speed.fill_(0.1)
            return m
    conv = R.AuthorsConv2d if way == "authors" else Conv2d
    torch.manual_seed(0)
    return resnet(widths, conv, norm)


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
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(x), target).backward()
        opt.step()
    return step


def interleaved_medians(steps, repeats, warmup):
    """Median seconds of each step function after `warmup` steps each (compiling, when compiled): one step
    each in turn, the order reversed every other round (`bcnswift.bench.paired_median_times`), so that the
    machine's slow phases fall on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = paired_median_times(list(steps.values()), min_seconds=0.0, repeats=repeats)
    return dict(zip(steps, times))


def _kernel_threads():
    """Where bcnswift.torch's kernels run (set_num_threads), in words."""
    n = get_num_threads()
    if uses_torch_threads():
        return "torch's OpenMP threads"
    if n is None or n == 1:
        return "the calling thread"
    return f"{n} bcnswift threads" if n else "bcnswift's default threads"


def run(models=("small", "resnet18"), ways=("authors eager", "authors compiled", "bcnswift eager",
                                         "bcnswift compiled"), repeats=15, warmup=3, estimate=False,
        json_path=None):
    ops = "native" if uses_native_operators() else f"Python ({_native.reason})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), bcnswift.torch's kernels on "
          f"{_kernel_threads()}, its ops' kernels {ops}; training step: batch 8, 32x32, SGD; BCN "
          f"estimate={estimate}; median of {repeats} steps, every way and its model without normalization timed "
          f"in turn")
    results = {}
    for model in models:
        steps = {}
        for way in ways:
            who, mode = way.split()
            compiled = mode == "compiled"
            steps[way] = stepper(build(model, who, estimate), compiled)
            steps[way + " bare"] = stepper(build(model, who, estimate, normalization=False), compiled)
        medians = interleaved_medians(steps, repeats, warmup)
        for way in ways:
            t, t_bare = medians[way], medians[way + " bare"]
            share = max(0.0, 1 - t_bare / t)
            results[f"{model} {way}"] = {"ms_per_step": t * 1e3, "normalization_share": share}
            print(f"{model} {way}: {t * 1e3:.1f} ms/step, normalization {share * 100:.0f}%", flush=True)
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
