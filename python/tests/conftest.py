"""Shared test machinery: the conventions bcnswift must reproduce, each as (bcnswift layer, reference module)."""
import copy
import importlib
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

import bcnswift
from bcnswift import reference as R


def _missing(what, hint):
    """Under CI (CI=true) a missing dependency fails the test, so that CI never passes by skipping; elsewhere
    the test (or test module) skips."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true ({hint})", pytrace=False)
    pytest.skip(f"{what} is missing ({hint})", allow_module_level=True)


def require(module):
    """An optional dependency the tests need (torch, mpi4py, hypothesis, ...): imported, or `_missing`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        _missing(f"the Python module {module}", f"pip install '.[test]': {e}")


def require_tool(*commands, hint):
    """Commands the test runs (clang, swift): their paths on PATH (one command: its path alone), or `_missing`."""
    paths = [shutil.which(c) for c in commands]
    absent = [c for c, path in zip(commands, paths) if path is None]
    if absent:
        _missing(f"the command(s) {', '.join(absent)}", hint)
    return paths[0] if len(paths) == 1 else paths


def require_python(version):
    """CPython `version` ("3.9") that runs, for tests of other Pythons' wheels: pyenv's (this machine's kind
    carries 3.9 to 3.13), else python3.9 on PATH (pyenv's shims are on PATH for every version, and fail for one
    not selected, so each is tried); or `_missing`."""
    candidates = [str(p) for p in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))]
    candidates += [p for p in [shutil.which(f"python{version}")] if p]
    for python in candidates:
        if subprocess.run([python, "-c", "import venv"], capture_output=True, timeout=60).returncode == 0:
            return python
    _missing(f"CPython {version}", "the oldest and newest Pythons the package supports, in pyenv or on PATH")


def seed_of(name):
    """A seed that depends on `name` alone, the same in every run (unlike hash(), which Python randomizes)."""
    return zlib.crc32(name.encode())


@pytest.fixture
def kernel_calls(monkeypatch):
    """bcnswift.torch's kernel calls during the test (torch_kernel_calls.KernelCalls): torch tests only."""
    calls = importlib.import_module("torch_kernel_calls").KernelCalls(monkeypatch)
    yield calls
    calls.stop()


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's id so a failure reproduces; the seed is printed, and
    pytest shows it with a failing test's output."""
    seed = seed_of(request.node.nodeid)
    print(f"rng seed {seed} (np.random.default_rng({seed}), from {request.node.nodeid!r})")
    return np.random.default_rng(seed)


def tolerance(dtype):
    """(rtol, atol) for comparing an output of `dtype` with the float64 reference (values of order 1)."""
    return (1e-9, 1e-9) if np.dtype(dtype) == np.float64 else (1e-4, 1e-4)


def assert_close(actual, expected, dtype, what):
    rtol, atol = tolerance(dtype)
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64).reshape(expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


class Convention:
    """One document's variant: how to build both sides and how their names correspond.

    names maps bcnswift's state-dict keys to the reference's attribute paths (for parameters and buffers);
    grads maps bcnswift's gradient keys to the reference's .grads keys."""

    def __init__(self, name, make, make_ref, names, grads, groups=True, ref_state_keys=None):
        self.name, self.make, self.make_ref = name, make, make_ref
        self.names, self.grads, self.groups = names, grads, groups
        self.ref_state_keys = ref_state_keys or {}

    def __repr__(self):
        return self.name


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, path, value):
    *head, last = path.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


BCN_NAMES_AUTHORS = {"weight": "weight", "bias": "bias", "bn.weight": "bn.weight", "bn.bias": "bn.bias",
                     "bn.running_mean": "bn.running_mean", "bn.running_var": "bn.running_var"}
BCN_NAMES_LABML = {"weight": "channel_norm.scale", "bias": "channel_norm.shift", "bn.weight": "batch_norm.scale",
                   "bn.bias": "batch_norm.shift", "bn.running_mean": "batch_norm.exp_mean",
                   "bn.running_var": "batch_norm.exp_var"}
BN_NAMES_TORCH = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}
BN_NAMES_LABML = {"weight": "scale", "bias": "shift", "running_mean": "exp_mean", "running_var": "exp_var"}


def _authors_estbn(C, momentum):
    m = R.AuthorsEstBN(C)
    m.estbn_moving_speed[:] = momentum
    return m


def _authors_bcn_est(C, G, momentum):
    m = R.AuthorsBCNorm(C, G, 1e-5, estimate=True)
    m.bn.estbn_moving_speed[:] = momentum
    return m


CONVENTIONS = [
    Convention("labml BatchChannelNorm, estimate=True",
               lambda C, G, dt, m: bcnswift.BatchChannelNorm(C, G, momentum=m, estimate=True, dtype=dt),
               lambda C, G, m: R.LabmlBatchChannelNorm(C, G, momentum=m, estimate=True),
               BCN_NAMES_LABML, {"weight": "channel_norm.scale", "bias": "channel_norm.shift",
                                 "bn.weight": "batch_norm.scale", "bn.bias": "batch_norm.shift"}),
    Convention("labml BatchChannelNorm, estimate=False",
               lambda C, G, dt, m: bcnswift.BatchChannelNorm(C, G, momentum=m, estimate=False,
                                                             unbiased_running_var=False, dtype=dt),
               lambda C, G, m: R.LabmlBatchChannelNorm(C, G, momentum=m, estimate=False),
               BCN_NAMES_LABML, {"weight": "channel_norm.scale", "bias": "channel_norm.shift",
                                 "bn.weight": "batch_norm.scale", "bn.bias": "batch_norm.shift"}),
    Convention("authors BCNorm, nn.BatchNorm2d",
               lambda C, G, dt, m: bcnswift.BatchChannelNorm(C, G, momentum=m, estimate=False, dtype=dt),
               lambda C, G, m: _with_momentum(R.AuthorsBCNorm(C, G, 1e-5, estimate=False), m),
               BCN_NAMES_AUTHORS, {k: k for k in ("weight", "bias", "bn.weight", "bn.bias")}),
    Convention("authors BCNorm, EstBN",
               lambda C, G, dt, m: bcnswift.BatchChannelNorm(C, G, momentum=m, estimate=True,
                                                             variance_around="running_mean", dtype=dt),
               _authors_bcn_est,
               BCN_NAMES_AUTHORS, {k: k for k in ("weight", "bias", "bn.weight", "bn.bias")}),
    Convention("BatchChannelNorm, batch statistics, cumulative average",
               lambda C, G, dt, m: bcnswift.BatchChannelNorm(C, G, momentum=None, estimate=False, dtype=dt),
               lambda C, G, m: _with_momentum(R.AuthorsBCNorm(C, G, 1e-5, estimate=False), None),
               BCN_NAMES_AUTHORS, {k: k for k in ("weight", "bias", "bn.weight", "bn.bias")}),
    Convention("PyTorch BatchNorm2d",
               lambda C, G, dt, m: bcnswift.BatchNorm(C, momentum=m, dtype=dt),
               lambda C, G, m: R.TorchBatchNorm2d(C, momentum=m),
               BN_NAMES_TORCH, {"weight": "weight", "bias": "bias"}, groups=False),
    Convention("PyTorch BatchNorm2d, cumulative average",
               lambda C, G, dt, m: bcnswift.BatchNorm(C, momentum=None, dtype=dt),
               lambda C, G, m: R.TorchBatchNorm2d(C, momentum=None),
               BN_NAMES_TORCH, {"weight": "weight", "bias": "bias"}, groups=False),
    Convention("labml BatchNorm",
               lambda C, G, dt, m: bcnswift.BatchNorm(C, momentum=m, unbiased_running_var=False, dtype=dt),
               lambda C, G, m: R.LabmlBatchNorm(C, momentum=m),
               BN_NAMES_LABML, {"weight": "scale", "bias": "shift"}, groups=False),
    Convention("labml EstimatedBatchNorm",
               lambda C, G, dt, m: bcnswift.EstimatedBatchNorm(C, momentum=m, dtype=dt),
               lambda C, G, m: R.LabmlEstimatedBatchNorm(C, momentum=m),
               BN_NAMES_LABML, {"weight": "scale", "bias": "shift"}, groups=False),
    Convention("authors EstBN",
               lambda C, G, dt, m: bcnswift.EstimatedBatchNorm(C, momentum=m, variance_around="running_mean",
                                                               dtype=dt),
               lambda C, G, m: _authors_estbn(C, m),
               BN_NAMES_TORCH, {"weight": "weight", "bias": "bias"}, groups=False),
    Convention("labml ChannelNorm",
               lambda C, G, dt, m: bcnswift.ChannelNorm(C, G, dtype=dt),
               lambda C, G, m: R.LabmlChannelNorm(C, G),
               {"weight": "scale", "bias": "shift"}, {"weight": "scale", "bias": "shift"}),
]


def _with_momentum(module, momentum):
    module.bn.momentum = momentum
    return module


class Pair:
    """A bcnswift layer and its reference, given the same random parameters and buffers."""

    def __init__(self, convention, C, G, dtype, rng, momentum=0.1):
        self.c, self.dtype = convention, np.dtype(dtype)
        self.ours = convention.make(C, G, dtype, momentum)
        self.ref = convention.make_ref(C, G, momentum)
        state = {}
        for ours_key, ref_path in convention.names.items():
            current = np.asarray(_get(self.ref, ref_path))
            if "running_var" in ours_key:
                value = rng.uniform(0.5, 2.0, current.shape)
            elif "running_mean" in ours_key:
                value = rng.normal(0.5, 0.5, current.shape)
            elif ours_key.endswith("weight"):
                value = rng.uniform(0.5, 1.5, current.shape)
            else:
                value = rng.normal(0.3, 0.5, current.shape)
            value = value.astype(dtype).astype(np.float64)  # representable in the layer's dtype
            _set(self.ref, ref_path, value)
            state[ours_key] = value
        self.ours.load_state_dict(state, strict=False)

    def train(self, mode=True):
        self.ours.train(mode)
        self.ref.train(mode)

    def step(self, x, dy, what):
        """One forward and backward on both sides; compares outputs, buffers, dx and parameter gradients."""
        self.ours.zero_grad()
        y = self.ours(x.astype(self.dtype))
        y_ref = self.ref(x.astype(self.dtype).astype(np.float64))
        assert y.dtype == self.dtype and y.shape == x.shape
        assert_close(y, y_ref, self.dtype, f"{self.c}: output, {what}")
        for ours_key, ref_path in self.c.names.items():
            ours_value = self.ours.state_dict()[ours_key]
            assert_close(ours_value, _get(self.ref, ref_path), self.dtype, f"{self.c}: {ours_key}, {what}")
        dx = self.ours.backward(dy.astype(self.dtype))
        dx_ref = self.ref.backward(dy.astype(self.dtype).astype(np.float64))
        assert_close(dx, dx_ref, self.dtype, f"{self.c}: dx, {what}")
        for ours_key, ref_key in self.c.grads.items():
            assert_close(self.ours.grads[ours_key], self.ref.grads[ref_key], self.dtype,
                         f"{self.c}: grad {ours_key}, {what}")
        return y


def random_input(rng, shape, mean=None, std=None):
    """Random input with non-zero, per-channel means and varied scales."""
    C = shape[1]
    mean = rng.normal(2.0, 1.0, C) if mean is None else mean
    std = rng.uniform(0.5, 3.0, C) if std is None else std
    bshape = (1, C) + (1,) * (len(shape) - 2)
    return rng.normal(size=shape) * std.reshape(bshape) + mean.reshape(bshape)


def fresh_copy(layer):
    return copy.deepcopy(layer)
