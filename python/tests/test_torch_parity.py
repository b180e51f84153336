"""Training parity with the documents' own PyTorch modules (transcribed in bcnswift/torch/reference.py): a small
CNN with WS convolutions and BCN, and a ResNet basic block converted by bcnswift.torch.convert, trained for 20 SGD
steps side by side. Outputs, input gradients, every parameter gradient and every buffer agree at every step, to 1e-10
in float64 and 1e-4 in float32, relative to the largest magnitude of each quantity."""
import pytest

from conftest import require
from test_torch_ops import gen, rand_input  # noqa: F401 (gen is a fixture)

torch = require("torch")
from bcnswift.torch import reference as R  # noqa: E402
import bcnswift.torch as bt  # noqa: E402
from torch import nn  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
STEPS = 20


def assert_agree(ours, ref, tol, what):
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = max(float(ref.abs().max()), 1e-30)
    err = float((ours - ref).abs().max())
    assert err <= tol * scale, f"{what}: max difference {err:.3g}, {err / scale:.3g} of the largest magnitude"


def small_cnn(conv, norm):
    # No convolution biases: a bias before a batch norm has a gradient of exactly 0, all rounding. A smooth
    # activation (SiLU), so that the two models' float32 rounding differences stay as small in the gradients: with
    # ReLU, an input of 4e-8 came out positive in one model and negative in the other at step 15 (AVX-512
    # machine, seed 3161593837), and the input gradients then differed by 4% of their scale.
    return nn.Sequential(conv(3, 16, 3, padding=1, bias=False), norm(16, 4), nn.SiLU(),
                         conv(16, 32, 3, padding=1, bias=False),
                         norm(32, 8), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _speed(module, value):
    for m in module.modules():
        if hasattr(m, "estbn_moving_speed"):
            m.estbn_moving_speed.fill_(value)
    return module


MODELS = {
    "authors BCNorm + WS": (lambda: small_cnn(R.AuthorsConv2d, lambda c, g: R.BCNorm(c, g, 1e-5)),
                            lambda: small_cnn(bt.Conv2d, lambda c, g: bt.BCNorm(c, g, 1e-5))),
    "authors BCNorm estimate + WS": (
        lambda: _speed(small_cnn(R.AuthorsConv2d, lambda c, g: R.BCNorm(c, g, 1e-5, estimate=True)), 0.1),
        lambda: small_cnn(bt.Conv2d, lambda c, g: bt.BCNorm(c, g, 1e-5, estimate=True))),
    "labml BatchChannelNorm + WS": (
        lambda: small_cnn(R.LabmlConv2d, lambda c, g: R.LabmlBatchChannelNorm(c, g)),
        lambda: small_cnn(lambda *a, **k: bt.Conv2d(*a, convention="labml", **k),
                          lambda c, g: bt.BatchChannelNorm(c, g))),
    "labml BatchChannelNorm batch statistics + WS": (
        lambda: small_cnn(R.LabmlConv2d, lambda c, g: R.LabmlBatchChannelNorm(c, g, estimate=False)),
        lambda: small_cnn(lambda *a, **k: bt.Conv2d(*a, convention="labml", **k),
                          lambda c, g: bt.BatchChannelNorm(c, g, estimate=False))),
}


def train_side_by_side(ref, ours, inputs, loss_fn, dtype, what):
    """STEPS SGD steps on both models; every quantity compared at every step."""
    tol = TOLERANCE[dtype]
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    for step, (x, target) in enumerate(inputs):
        where = f"{what}, {dtype}, step {step}"
        # the documents' modules view their input, so they take it contiguous; ours takes its layout as given
        xr = x.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
        xo = x.detach().clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        assert_agree(yo, yr, tol, f"{where}: output")
        loss_fn(yr, target).backward()
        loss_fn(yo, target).backward()
        assert_agree(xo.grad, xr.grad, tol, f"{where}: input gradient")
        params_ref, params_ours = dict(ref.named_parameters()), dict(ours.named_parameters())
        assert params_ref.keys() == params_ours.keys()
        for k in params_ref:
            assert_agree(params_ours[k].grad, params_ref[k].grad, tol, f"{where}: gradient of {k}")
        opt_ref.step(), opt_ours.step()
        opt_ref.zero_grad(), opt_ours.zero_grad()
        state_ref, state_ours = ref.state_dict(), ours.state_dict()
        assert state_ref.keys() == state_ours.keys()
        for k in state_ref:
            assert_agree(state_ours[k], state_ref[k], tol, f"{where}: {k}")
    ref.eval(), ours.eval()
    x = inputs[0][0]
    assert_agree(ours(x), ref(x.contiguous()), tol, f"{what}, {dtype}: eval output")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_cnn_trains_as_the_documents_modules(name, dtype, gen):
    make_ref, make_ours = MODELS[name]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = make_ref().to(dtype)
    ours = make_ours().to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = [(rand_input(gen, (2, 3, 8, 8), dtype), torch.randint(0, 10, (2,), generator=gen))
              for _ in range(STEPS)]
    train_side_by_side(ref, ours, inputs, nn.functional.cross_entropy, dtype, name)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, with the convolution and normalization given."""

    def __init__(self, cin, cout, stride, conv, norm):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU()
        self.conv2 = conv(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_converted_resnet_block_trains_as_the_authors_block(estimate, dtype, layout, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    block = BasicBlock(8, 24, 2, nn.Conv2d, nn.BatchNorm2d).to(dtype)
    ours = bt.convert(block, num_groups=16, estimate=estimate, momentum=0.1)  # 24 channels: 12 groups
    ref = BasicBlock(8, 24, 2, R.AuthorsConv2d,
                     lambda c: R.BCNorm(c, bt.largest_divisor_at_most(c, 16), 1e-5, estimate=estimate)).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    if layout == "channels_last":
        ours = ours.to(memory_format=torch.channels_last)
    inputs = []
    for _ in range(STEPS):
        x = rand_input(gen, (2, 8, 8, 8), dtype)
        inputs.append((x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x,
                       rand_input(gen, (2, 24, 4, 4), dtype)))
    train_side_by_side(ref, ours, inputs, lambda y, t: (y * t).mean(), dtype,
                       f"ResNet block, estimate={estimate}, {layout}")
