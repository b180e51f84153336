"""ONNX export: a model built from bcnswift.torch's modules (or converted with `convert`) exports with
torch.onnx.export, by either exporter, and ONNX Runtime computes what the model computes in eval mode (and in
training mode, exported so).

ONNX has none of bcnswift's operators, so while torch.onnx.export traces, the modules and WS layers take the
composed route (torch operations); the references here are the same models run eagerly on the kernels."""
import copy
import io
import warnings

import pytest

from conftest import require
from test_torch_modules import _state, assert_states_equal
from test_torch_ops import gen, rand_input  # noqa: F401 (gen is a fixture)

torch = require("torch")
require("onnx")
require("onnxscript")  # the dynamo exporter's translation
ort = require("onnxruntime")
import bcnswift.torch as bt  # noqa: E402
from torch import nn  # noqa: E402

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def _planes():
    """Every 4-D module and WS layer in sequence, both conventions and estimate modes."""
    return nn.Sequential(
        bt.Conv2d(3, 16, 3, padding=1), bt.BCNorm(16, 4), nn.ReLU(),
        bt.Conv2d(16, 16, 3, padding=1, convention="labml"), bt.BCNorm(16, 8, estimate=True), nn.ReLU(),
        bt.ConvTranspose2d(16, 16, 3, padding=1), bt.BatchChannelNorm(16, 4),
        bt.BatchChannelNorm(16, 2, estimate=False), bt.ChannelNorm(16, 4), bt.EstBN(16), bt.EstimatedBatchNorm(16),
        bt.BatchNorm(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), bt.Linear(16, 5))


def _lines_and_volumes():
    """The modules on 3-D and 5-D input, through WS Conv1d and Conv3d."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.line = nn.Sequential(bt.Conv1d(3, 8, 3, padding=1), bt.BCNorm(8, 4, estimate=True),
                                      bt.BatchChannelNorm(8, 2))
            self.volume = nn.Sequential(bt.Conv3d(3, 8, 3, padding=1, convention="labml"), bt.ChannelNorm(8, 4),
                                        bt.BCNorm(8, 2))

        def forward(self, x):
            return self.line(x.flatten(2)).sum(dim=2) + self.volume(x).mean(dim=(2, 3, 4))
    return Model()


def _converted():
    """A plain torch CNN with batch norm and group norm, converted (EstBN estimates, WS convolutions)."""
    return bt.convert(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GroupNorm(8, 32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), num_groups=8)


MODELS = {"planes": (_planes, (4, 3, 8, 8)), "lines and volumes": (_lines_and_volumes, (4, 3, 4, 5, 6)),
          "converted": (_converted, (4, 3, 8, 8))}


def _trained(make, shape, gen):
    """A model after three SGD steps from random affine parameters, in eval mode, and an input: running
    statistics, estimates and affines all away from their initial values."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = make()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or p.dim() == 3:  # the norms' affines ((C,), or (1, G, 1) in BCNorm)
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if "weight" in name or "scale" in name
                        else torch.randn(p.shape, generator=gen) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("estbn_moving_speed"):
                b.fill_(0.3)  # a standalone EstBN's estimates move only once its speed is set
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(rand_input(gen, shape, torch.float32)).square().mean().backward()
        optimizer.step()
    return model.eval(), rand_input(gen, shape, torch.float32)


def _export(model, x, dynamo, **kwargs):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, the dynamo one's notes
        torch.onnx.export(model, (x,), buffer, dynamo=dynamo, verbose=False, **kwargs)
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


def _run(session, x):
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _assert_matches(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= 2e-5 * scale, f"{what}: largest error {error:.3g}, {error / scale:.3g} of the largest value"


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_exports_and_onnx_runtime_computes_its_eval_outputs(name, dynamo, gen):
    make, shape = MODELS[name]
    model, x = _trained(make, shape, gen)
    expected, before = model(x), _state(model)
    session = _export(model, x, dynamo)
    _assert_matches(_run(session, x), expected, f"{name}, ONNX Runtime against eager")
    # the export left the model as it was, and calls after it take the kernels again, with the same bits
    assert_states_equal(_state(model), before, "after the export")
    assert torch.equal(model(x), expected), "eager output after the export"


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_an_exported_model_takes_other_batch_sizes(dynamo, gen):
    model, x = _trained(_converted, (4, 3, 8, 8), gen)
    if dynamo:
        kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=2, max=64)},)}
    else:
        kwargs = {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}}
    session = _export(model, x, dynamo, **kwargs)
    for batch in (2, 7):
        other = rand_input(gen, (batch, 3, 8, 8), torch.float32)
        _assert_matches(_run(session, other), model(other), f"batch {batch}")


@pytest.mark.parametrize("way", ["portable", "decompose"])
def test_a_program_exported_inside_portable_exports_to_onnx(way, gen):
    """An ExportedProgram made with torch.export holds bcnswift's ops, which ONNX has not; made inside
    bt.portable(), or rewritten by bt.decompose, it holds torch operations, and torch.onnx.export takes it."""
    model, x = _trained(_planes, (4, 3, 8, 8), gen)
    if way == "portable":
        with bt.portable():
            program = torch.export.export(model, (x,))
    else:
        program = bt.decompose(torch.export.export(model, (x,)))
    _assert_matches(_run(_export(program, x, True), x), model(x), f"{way} program, ONNX Runtime against eager")


def test_a_folded_model_exports_its_standardized_weights_as_plain_convolutions(gen):
    model, x = _trained(_converted, (4, 3, 8, 8), gen)
    expected = model(x)
    folded = bt.fold_weight_standardization(model)
    session = _export(folded, x, True)
    _assert_matches(_run(session, x), expected, "folded, ONNX Runtime against the unfolded model")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_synchronized_modules_export_as_their_local_eval(dynamo, gen):
    model, x = _trained(_planes, (4, 3, 8, 8), gen)
    synchronized = bt.convert_sync_batch_channel_norm(copy.deepcopy(model)).eval()
    kinds = {type(m) for m in synchronized.modules()}
    assert {bt.SyncBCNorm, bt.SyncBatchChannelNorm} <= kinds, kinds
    _assert_matches(_run(_export(synchronized, x, dynamo), x), model(x), "synchronized, against the local model")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_model_exported_in_training_mode_normalizes_with_the_batch_statistics(dynamo, gen):
    """Exported in training mode (the dynamo exporter traces the mode the model is in; the TorchScript one is asked
    with TrainingMode.TRAINING), the graph normalizes each batch with its own statistics, and the estimate modes
    with the estimates moved by that batch, as the training forward does. The export changes no buffer: the
    TorchScript exporter runs the model as it traces and keeps the buffers as they are when it ends, so a moved
    estimate would be moved again by the graph (torch's own batch norms are moved by it, unread in training)."""
    model, x = _trained(_planes, (4, 3, 8, 8), gen)
    model.train()
    kwargs = {} if dynamo else {"training": torch.onnx.TrainingMode.TRAINING}
    original, before = copy.deepcopy(model), _state(model)
    session = _export(model, x, dynamo, **kwargs)
    assert model.training, "the export left the model in eval mode"
    assert_states_equal(_state(model), before, "after the export")
    for batch in (x, rand_input(gen, (4, 3, 8, 8), torch.float32)):
        with torch.no_grad():
            expected = copy.deepcopy(original)(batch)  # one training forward from the buffers as they were
        _assert_matches(_run(session, batch), expected, "training mode, ONNX Runtime against the training forward")


def test_training_calls_on_other_threads_update_their_buffers_during_an_export(gen, monkeypatch):
    """torch.onnx.is_in_onnx_export() and the dynamo exporter's compiling flag are process-wide: while an export
    runs on one thread, another thread's training call sees both (and takes the composed route), yet it is not the
    export's trace, so it updates its buffers as eagerly (only the TorchScript tracer, per thread, skips them)."""
    model = nn.Sequential(bt.BCNorm(8, 4, estimate=True), bt.BatchChannelNorm(8, 4)).train()
    eager = copy.deepcopy(model)
    x = rand_input(gen, (4, 8, 5, 5), torch.float32)
    before = _state(model)
    with torch.no_grad():
        expected = eager(x)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        y = model(x)
    monkeypatch.undo()
    _assert_matches(y, expected, "a training call during another thread's export")
    moved = [k for k, v in _state(model).items() if not torch.equal(v, before[k])]
    assert moved, "no buffer moved"
    assert_states_equal(_state(model), _state(eager), "buffers after the call", rtol=1e-5, atol=1e-6)
