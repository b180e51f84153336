"""The demo: its network's gradients by finite differences (so its numbers come from correct training), and a
quick end-to-end run."""
import copy
import json

import numpy as np
import pytest

from bcnswift import demo
from conftest import require


@pytest.mark.parametrize("variant,training", [("BN", True), ("GN", True), ("BCN-batch+WS", True),
                                              ("BCN-est+WS", False), ("BN", False)])
def test_network_gradients_by_finite_differences(variant, training):
    """Every parameter gradient of the whole network, float64. Estimated statistics stop the gradient by design,
    so that variant is checked where they are constants (eval); batch statistics are differentiated through."""
    rng = np.random.default_rng(11)
    net = demo.Network(variant, rng, dtype=np.float64)
    x = rng.random((3, 1, 8, 8))
    y = rng.integers(0, 10, 3)
    if not training:
        net.forward(x)  # move the running statistics away from their initial values
        net.train(False)

    def loss_of(n):
        return demo.softmax_cross_entropy(copy.deepcopy(n).forward(x), y)[0]

    net.zero_grad()
    reference = copy.deepcopy(net)
    loss, dlogits = demo.softmax_cross_entropy(net.forward(x), y)
    net.backward(dlogits)
    h = 1e-6
    checked = 0
    for (name, _, grad), (_, p_ref, _) in zip(net.parameters(), reference.parameters()):
        flat = p_ref.reshape(-1)
        for k in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            old = flat[k]
            flat[k] = old + h
            plus = loss_of(reference)
            flat[k] = old - h
            minus = loss_of(reference)
            flat[k] = old
            numeric = (plus - minus) / (2 * h)
            assert abs(grad.reshape(-1)[k] - numeric) <= 1e-5 * max(1.0, abs(numeric)), (name, k)
            checked += 1
    assert checked >= 30


def test_quick_run_writes_table_and_plot(tmp_path):
    require("sklearn")
    out = tmp_path / "out"
    results = demo.main(["--quick", "--out", str(out), "--json", str(tmp_path / "table.json")])
    table = json.loads((tmp_path / "table.json").read_text())
    assert len(table) == len(demo.VARIANTS) * 2 == len(results)
    assert {tuple(sorted(r)) for r in table} == {("batch_size", "seconds", "test_accuracy", "variant")}
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["seconds"] >= 0 for r in table)
    require("matplotlib")  # the demo plots when it can; CI requires it
    png = out / "demo_accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
