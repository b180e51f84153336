"""Runtime CPU dispatch: every ISA path built passes the parity suite, the paths agree within its tolerances, a
forced path the CPU lacks is an ImportError (never an illegal instruction), and on a CPU without AVX (qemu's
Nehalem) the baseline path runs. build_info() reports all of it."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bcnswift
from conftest import require_tool

HERE = os.path.dirname(os.path.abspath(__file__))
#: the suite each path must pass (the current path runs the whole suite anyway)
PARITY_SUITE = ["test_parity.py", "test_gradients.py", "test_weight_standardization.py", "test_phases.py",
                "test_channels_last.py", "test_numerics.py", "test_concurrency.py", "test_sync_layers.py"]


def run_python(code, isa=None, prefix=(), timeout=300, extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    env.pop("BCNSWIFT_ISA", None)
    if isa:
        env["BCNSWIFT_ISA"] = isa
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=HERE)


def test_build_info_reports_the_paths():
    info = bcnswift.build_info()
    assert info["version"] == bcnswift.__version__ and info["abi_version"] == 2
    assert info["isa"] in info["isa_built"] and info["isa"] in info["isa_allowed"]
    assert "baseline" in info["isa_built"] and "baseline" in info["isa_allowed"]
    if info["machine"] in ("x86_64", "AMD64"):
        assert info["isa_built"] == ["x86-64-v3", "baseline"]
    assert info["swift_version"].startswith("Swift version")
    assert info["threads"] == bcnswift.get_num_threads() >= 1
    printed = subprocess.run([sys.executable, "-m", "bcnswift"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and f"isa: {info['isa']}" in printed.stdout


def test_the_avx2_path_has_no_masked_loads():
    """LLVM turns a loop's `optional?[i] ?? 0` into AVX masked loads (vmaskmovpd), which the CPU runs from the
    null pointer when the optional is nil: each one a microcode assist of about a hundred cycles, which once cost
    the tiny call's estimated backward 0.5 us. The kernels test such optionals once, outside their loops."""
    if bcnswift.build_info()["machine"] not in ("x86_64", "AMD64"):
        pytest.skip("the x86-64-v3 path is built on x86-64 alone")
    objdump = require_tool("objdump", hint="apt-get install binutils")
    paths = glob.glob(os.path.join(os.path.dirname(bcnswift.__file__), "_ext_x86_64_v3*.so"))
    assert len(paths) == 1, paths
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", paths[0]], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    assert "vpermpd" in listing  # the listing is of AVX2 code at all
    masked = [line.strip() for line in listing.splitlines() if "maskmov" in line]
    assert not masked, f"{len(masked)} masked loads or stores, first: {masked[:3]}"


def test_threads_source_follows_set_num_threads():
    before = bcnswift.get_num_threads()
    try:
        bcnswift.set_num_threads(1)
        assert bcnswift.build_info()["threads_source"] == "set_num_threads(1)"
    finally:
        bcnswift.set_num_threads(0)
    assert bcnswift.get_num_threads() == before


@pytest.mark.parametrize("value,taken", [("3", True), (" 3 ", False), ("abc", False), ("-1", False), ("1.5", False),
                                         ("0", False), ("99999999999999999999", False)])
def test_build_info_says_whether_the_kernels_took_bcnswift_num_threads(value, taken):
    """The kernels parse BCNSWIFT_NUM_THREADS as Swift's Int() does: build_info reported ' 3 ' as taken while they
    used every core. A value they ignore now says so, in build_info and in a warning at import."""
    code = ("import warnings, bcnswift, json; print(json.dumps([bcnswift.get_num_threads(), "
            "bcnswift.build_info()['threads_source']]))")
    env = dict(os.environ, BCNSWIFT_NUM_THREADS=value)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    threads, source = json.loads(proc.stdout)
    if taken:
        assert (threads, source) == (3, "BCNSWIFT_NUM_THREADS=3") and "RuntimeWarning" not in proc.stderr
    else:
        assert threads == os.cpu_count() or threads == min(os.cpu_count(), 256)
        assert source == f"default: all cores (BCNSWIFT_NUM_THREADS={value!r} ignored: not a positive integer)"
        assert f"BCNSWIFT_NUM_THREADS={value!r} is not a positive integer" in proc.stderr


def test_build_info_reports_the_environment_as_it_was_at_import():
    """A review: BCNSWIFT_ISA set after import made build_info say isa_forced, and BCNSWIFT_NUM_THREADS set after
    import but before the first call moved the kernels' count while build_info reported every core."""
    code = ("import os, json, bcnswift\n"
            "os.environ['BCNSWIFT_ISA'] = 'baseline'; os.environ['BCNSWIFT_NUM_THREADS'] = '1'\n"
            "info = bcnswift.build_info()\n"
            "print(json.dumps([info['isa_forced'], info['threads'], info['threads_source']]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("BCNSWIFT_ISA", "BCNSWIFT_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    forced, threads, source = json.loads(proc.stdout)
    assert forced is False
    assert threads == min(os.cpu_count(), 256) and source == "default: all cores"


@pytest.mark.parametrize("isa", [p for p in bcnswift.build_info()["isa_built"]
                                 if p in bcnswift.build_info()["isa_allowed"]])
def test_every_built_path_passes_the_parity_suite(isa):
    env = dict(os.environ, BCNSWIFT_ISA=isa)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_SUITE],
                          capture_output=True, text=True, env=env, timeout=900, cwd=HERE)
    assert proc.returncode == 0, f"BCNSWIFT_ISA={isa}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    check = run_python("from bcnswift import _ext; print(_ext.ISA)", isa)
    assert check.stdout.strip() == isa


_FORWARD_BACKWARD = """
import json, numpy as np, bcnswift
rng = np.random.default_rng(7)
x = rng.normal(size=(4, 16, 5, 6)) * 2 + 1.5
dy = rng.normal(size=x.shape) - 0.3
out = {}
for dtype in ("float32", "float64"):
    layer = bcnswift.BatchChannelNorm(16, 4, estimate=False, dtype=dtype)
    y = layer(x.astype(dtype)); dx = layer.backward(dy.astype(dtype))
    w = bcnswift.weight_standardization(x.reshape(16, -1).astype(dtype))
    out[dtype] = [y.tolist(), dx.tolist(), w.tolist(), layer.running_var.tolist()]
print(json.dumps(out))
"""


def test_the_paths_agree_within_the_parity_tolerances():
    results = {}
    for isa in [p for p in bcnswift.build_info()["isa_built"] if p in bcnswift.build_info()["isa_allowed"]]:
        proc = run_python(_FORWARD_BACKWARD, isa)
        assert proc.returncode == 0, proc.stderr
        results[isa] = json.loads(proc.stdout)
    paths = list(results)
    if bcnswift.build_info()["machine"] in ("x86_64", "AMD64"):  # else one portable path: nothing to compare
        assert len(paths) >= 2, f"only {paths} built and allowed: the paths' agreement is not tested"
    for other in paths[1:]:
        for dtype, rtol in (("float32", 2e-6), ("float64", 1e-13)):
            for a, b in zip(results[paths[0]][dtype], results[other][dtype]):
                np.testing.assert_allclose(np.array(a), np.array(b), rtol=rtol, atol=rtol,
                                           err_msg=f"{paths[0]} against {other}, {dtype}")


def test_forcing_a_path_that_cannot_load_is_an_import_error():
    proc = run_python("import bcnswift", "x86-64-v9")
    assert proc.returncode != 0 and "ImportError: BCNSWIFT_ISA='x86-64-v9' names no ISA path" in proc.stderr


# ---- an old CPU, emulated --------------------------------------------------------------------------------

_OLD_CPU_CHECK = """
import numpy as np, bcnswift
info = bcnswift.build_info()
assert info["isa"] == "baseline" and info["isa_allowed"] == ["baseline"], info
rng = np.random.default_rng(11)
x = rng.normal(size=(3, 8, 4, 5)) * 1.5 + 2.0
dy = rng.normal(size=x.shape) + 0.2
layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)
y = layer(x)
dx = layer.backward(dy)
# the reference: batch norm with batch statistics, then per-sample groups, in float64
m = x.mean(axis=(0, 2, 3), keepdims=True); v = x.var(axis=(0, 2, 3), keepdims=True)
h = (x - m) / np.sqrt(v + 1e-5)
g = h.reshape(3, 4, -1); gm = g.mean(-1, keepdims=True); gv = g.var(-1, keepdims=True)
expected = ((g - gm) / np.sqrt(gv + 1e-5)).reshape(x.shape)
assert np.allclose(y, expected, rtol=1e-12, atol=1e-12), abs(y - expected).max()
eps = 1e-6; k = (1, 2, 3, 1)
xp = x.copy(); xp[k] += eps; xm = x.copy(); xm[k] -= eps
f = lambda a: float((bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=np.float64)(a) * dy).sum())
fd = (f(xp) - f(xm)) / (2 * eps)
assert abs(fd - dx[k]) < 1e-6 * max(1, abs(fd)), (fd, dx[k])
w = rng.normal(size=(6, 3, 3, 3)) + 0.5
ws = bcnswift.weight_standardization(w, eps=1e-5, unbiased=True, eps_in_sqrt=False)  # the authors' form
flat = w.reshape(6, -1)
exp = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, ddof=1, keepdims=True) + 1e-5)
assert np.allclose(ws.reshape(6, -1), exp, rtol=1e-12, atol=1e-12)
print("old cpu ok", info["isa"])
"""


def qemu():
    if bcnswift.build_info()["machine"] not in ("x86_64", "AMD64"):
        pytest.skip("x86_64 only")
    return require_tool("qemu-x86_64", hint="Debian's qemu-user, which .ci/run installs")


def run_on_nehalem(code, isa=None):
    """`code` in a Python on an emulated CPU without AVX (qemu's Nehalem). numpy's OpenBLAS (scipy-openblas, numpy
    2.4's wheels) picks its kernels from the CPU it detects; under qemu-user's Nehalem it picks Haswell's
    (OPENBLAS_VERBOSE=2 says so) and dies of an illegal instruction as numpy loads, before any bcnswift code runs.
    Told the CPU (OPENBLAS_CORETYPE), it takes Nehalem's kernels, and the test is about bcnswift's paths again."""
    return run_python(code, isa, prefix=(qemu(), "-cpu", "Nehalem"), timeout=600,
                      extra_env={"OPENBLAS_CORETYPE": "Nehalem"})


def test_on_a_cpu_without_avx_the_baseline_path_runs():
    proc = run_on_nehalem(_OLD_CPU_CHECK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "old cpu ok baseline" in proc.stdout


def test_on_a_cpu_without_avx_forcing_avx2_is_an_import_error_not_a_crash():
    proc = run_on_nehalem("import bcnswift", "x86-64-v3")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "ImportError: BCNSWIFT_ISA='x86-64-v3': this CPU (or its OS) lacks avx, avx2" in proc.stderr
    assert "lzcnt" in proc.stderr
