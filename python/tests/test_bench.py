"""The benchmark script runs and prints a complete row per shape and mode (no timing is asserted)."""
import importlib.util
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import bcnswift
from bcnswift import _ext, bench
from conftest import require


def test_bench_runs_on_small_shapes(capsys):
    rows = bench.run([((2, 8, 4, 4), 4), ((16, 8), 2)], quick=True, reference=True, use_torch=False)
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| shape"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert len(rows) == 4  # two shapes, both estimate modes
    assert "copy 2t us" not in columns  # no torch: no threaded copy
    for row in rows:
        assert list(row) == columns  # raw floats, for --json
        times = [v for c, v in row.items() if c.endswith(" us")]
        assert len(times) == 7 and all(isinstance(t, float) and t > 0 for t in times)
        assert row["fwd/copy"] > 0 and row["f+b/copy"] > 0
        assert "| " + " | ".join(bench._cell(c, v) for c, v in row.items()) + " |" in printed


def test_mode_tables_run_on_small_shapes(capsys):
    tables = bench.run_modes(["eval", "channels_last"], quick=True, use_torch=False, shapes=[((2, 8, 4, 4), 4)])
    printed = capsys.readouterr().out
    assert [len(tables[m]) for m in ("eval", "channels_last")] == [2, 2]  # one shape, both estimate modes
    for row in tables["channels_last"]:
        assert row["CL/NCHW fwd"] > 0 and row["CL/NCHW f+b"] > 0 and row["CL fwd us"] > 0
    for row in tables["eval"]:
        assert row["eval fwd/copy"] > 0 and row["copy us"] > 0
    assert "Channels-last against NCHW" in printed and "Eval forward" in printed


def test_ratios_are_medians_of_the_rounds_ratios():
    # a slow phase (round 2) that doubles both: the rounds' ratios all say 2, where the medians of each list,
    # taken apart, would set a's slow rounds against b's fast ones and say 3
    a, b = [2.0, 6.0, 6.0], [1.0, 3.0, 1.0]
    assert statistics.median(a) / statistics.median(b) == 6.0
    assert bench.ratio(a, b) == 2.0
    assert bench.ratio([3.0, 5.0, 7.0], [1.0, 1.0, 1.0]) == 5.0
    with pytest.raises(ValueError, match="equally long"):
        bench.ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        bench.ratio([], [])


def test_the_copies_and_each_call_s_ratios_to_them():
    x = np.arange(1.0, 65.0, dtype=np.float32).reshape(4, 16)
    fns = bench.copies(x)
    assert list(fns) == ["copy"]
    samples = {"copy": [1.0, 2.0, 1.0], "copy 2t": [0.5, 1.0, 0.5], "fwd": [3.0, 6.0, 3.0]}
    assert bench.copy_times(samples) == {"copy us": 1e6, "copy 2t us": 0.5e6}
    assert bench.against_copies(samples, "fwd", "fwd") == {"fwd/copy": 3.0, "fwd/copy 2t": 6.0}


def test_the_threaded_copy_runs_on_the_benchmark_s_threads():
    require("torch")
    import torch
    threads = bcnswift.get_num_threads()
    try:
        x = np.arange(1.0, 65.0, dtype=np.float32).reshape(4, 16)
        bcnswift.set_num_threads(2)
        fns = bench.copies(x, torch)
        assert list(fns) == ["copy", "copy 2t"]
        fns["copy 2t"]()
        bcnswift.set_num_threads(1)
        assert list(bench.copies(x, torch)) == ["copy"]  # one thread: np.copyto is that yardstick
    finally:
        bcnswift.set_num_threads(threads)


def test_paired_samples_time_without_the_garbage_collector_and_with_gaps():
    import gc
    seen = []
    fns = [lambda: seen.append(gc.isenabled()), lambda: seen.append(gc.isenabled())]
    assert gc.isenabled()
    t0 = time.perf_counter()
    bench.paired_samples(fns, min_seconds=0.0, repeats=3, gap=0.01)
    assert time.perf_counter() - t0 >= 6 * 0.01  # a gap before each of the 2 x 3 turns
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        bench.paired_samples(fns, min_seconds=0.0, repeats=1)
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def test_interleaved_names_its_samples():
    calls = []
    samples = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                                min_seconds=0.0, gap=0.0)
    assert list(samples) == ["a", "b"] and all(len(s) == 3 and min(s) > 0 for s in samples.values())
    assert "".join(calls[4:]) == "ab" "ba" "ab"


def test_paired_timer_interleaves_its_functions():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = bench.paired_median_times(fns, min_seconds=0.0, repeats=4)
    assert len(times) == 2 and all(t > 0 for t in times)
    # two warm-up calls each, then one call per repeat, in the order a b, b a, a b, b a
    assert "".join(calls) == "aabb" + "ab" "ba" "ab" "ba"


def test_paired_samples_come_one_a_round():
    calls = []
    fns = [lambda n=n: calls.append(n) for n in "abcd"]
    samples = bench.paired_samples(fns, min_seconds=0.0, repeats=3)
    assert [len(s) for s in samples] == [3] * 4 and all(t > 0 for s in samples for t in s)
    assert "".join(calls[8:]) == "abcd" "dcba" "abcd"  # after two calls each to size the repeats
    calls.clear()
    bench.paired_samples(fns, min_seconds=0.0, repeats=3, pairs=True)
    assert "".join(calls[8:]) == "abcd" "badc" "abcd"
    with pytest.raises(ValueError, match="even number of functions, got 3"):
        bench.paired_samples(fns[:3], min_seconds=0.0, repeats=1, pairs=True)


def _binomial_below(n, k):
    """P(Binomial(n, 1/2) < k), summed term by term."""
    return sum(math.comb(n, j) for j in range(k)) / 2 ** n


def test_median_interval_is_the_binomial_order_statistics():
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 6, 9, 10, 17, 41, 100, 101):
        values = list(rng.normal(3.0, 1.0, n))
        low, high = bench.median_interval(values)
        xs = sorted(values)
        k = xs.index(low) + 1  # the interval is the k-th smallest and the k-th largest value
        assert high == xs[n - k], (n, k)
        if k > 1 or _binomial_below(n, 1) <= 0.025:
            # the largest k whose tails each hold at most 2.5%: so the interval covers the median at >= 95%
            assert _binomial_below(n, k) <= 0.025 < _binomial_below(n, k + 1), (n, k)
        else:  # too few values for 95%: the whole range
            assert (low, high) == (xs[0], xs[-1]), n
    # at 50%: P(Binomial(9, 1/2) < 3) = 46/512 <= 25% < P(... < 4) = 130/512, so the 3rd and the 7th of nine
    assert bench.median_interval([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0], confidence=0.5) == (3.0, 7.0)
    with pytest.raises(ValueError, match="at least one value"):
        bench.median_interval([])


def test_torch_steps_take_turns():
    require("torch")
    from bcnswift.torch import bench as torch_bench
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in ("a", "a bare", "b", "b bare")}
    times = torch_bench.interleaved_times(steps, repeats=3, warmup=1)
    assert set(times) == set(steps) and all(len(ts) == 3 and min(ts) > 0 for ts in times.values())
    order = ["a", "a bare", "b", "b bare"]
    # the warm-up step each, the shared paired timer's two first calls each, then one step a round in turn,
    # every other round each way after its bare model: no step runs twice in a row
    swapped = ["a bare", "a", "b bare", "b"]
    assert calls == order + [n for n in order for _ in range(2)] + order + swapped + order


def test_the_normalization_share_is_taken_round_by_round():
    require("torch")
    from bcnswift.torch import bench as torch_bench
    # a round in a fast phase: its step and bare step say 10% as the other rounds do, where the medians of the
    # steps and of the bare steps, each taken alone, would pair a slow step with a fast bare one and say 50%
    times, bare = [1.0, 2.0, 2.0], [0.9, 1.0, 1.8]
    share, low, high = torch_bench.normalization_share(times, bare)
    assert math.isclose(1 - statistics.median(bare) / statistics.median(times), 0.5)
    assert math.isclose(share, 0.1) and math.isclose(low, 0.1) and math.isclose(high, 0.5)
    share, low, high = torch_bench.normalization_share([1.0, 1.0, 1.0], [1.05, 1.1, 0.95])
    assert math.isclose(share, -0.05) and low < share < 0 < high  # noise, not clamped
    assert torch_bench._percent(-0.004) == "0" and torch_bench._percent(-0.05) == "-5"


def test_models_without_normalization_keep_their_numbers_in_range():
    # with nn.Identity for every normalization, a standardized convolution multiplies its input's scale by about
    # sqrt(fan-in): unscaled, "small"'s output started near 1e19 and its steps ran on NaN within five
    require("torch")
    import torch
    from bcnswift.torch import bench as torch_bench
    for way in ("authors", "bcnswift"):
        torch.manual_seed(11)  # the models' initial weights and the input: reproducible
        step = torch_bench.stepper(torch_bench.build("small", way, False, normalization=False), False)
        for _ in range(8):
            step()
            assert torch.isfinite(step.loss) and step.loss < 10, (way, float(step.loss))
        x = torch.randn(8, 3, 32, 32) + 0.5
        net = torch_bench.build("small", way, False, normalization=False)
        with torch.no_grad():
            out = net[:-3](x)  # the last stage's output, before pooling
        assert 0.05 < float(out.std()) < 20, (way, float(out.std()))


def test_the_bench_refuses_steps_that_diverged(monkeypatch):
    require("torch")
    import torch
    from bcnswift.torch import bench as torch_bench
    calls = []

    def diverged():
        calls.append(1)
        diverged.loss = torch.tensor(float("nan"))
    monkeypatch.setattr(torch_bench, "stepper", lambda model, compiled: diverged)
    with pytest.raises(RuntimeError, match="the loss is nan after the timed steps"):
        torch_bench.run(models=("small",), ways=("bcnswift eager",), repeats=1, warmup=0)
    assert calls


def test_the_torch_bench_runs_on_the_threads_asked_for(monkeypatch):
    """--threads was accepted with --torch and ignored: the steps ran on torch's default threads."""
    require("torch")
    import torch
    from bcnswift.torch import bench as torch_bench
    seen = []

    def step():
        seen.append(torch.get_num_threads())
        step.loss = torch.tensor(1.0)
    monkeypatch.setattr(torch_bench, "stepper", lambda model, compiled: step)
    before = torch.get_num_threads()
    try:
        torch_bench.run(models=("small",), ways=("bcnswift eager",), repeats=1, warmup=0, threads=1)
        assert seen and set(seen) == {1}
    finally:
        torch.set_num_threads(before)


def test_torch_bench_builds_torch_s_own_normalizations_for_scale():
    require("torch")
    from torch import nn
    from bcnswift.torch import Conv2d, bench as torch_bench
    for who, kind in (("batchnorm2d", nn.BatchNorm2d), ("groupnorm", nn.GroupNorm)):
        net = torch_bench.build("small", who, False)
        norms = [m for m in net.modules() if isinstance(m, kind)]
        assert len(norms) == 20 and all(isinstance(m, Conv2d) for m in net.modules() if isinstance(m, nn.Conv2d))
    assert {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)} == {16}
    with pytest.raises(ValueError, match="unknown way 'layernorm eager'"):
        torch_bench.run(models=("small",), ways=("layernorm eager",), repeats=1, warmup=0)
    with pytest.raises(ValueError, match="unknown way 'bcnswift'"):
        torch_bench.run(models=("small",), ways=("bcnswift",), repeats=1, warmup=0)


def test_torch_bench_runs_a_model(tmp_path, capsys):
    require("torch")
    import json
    from bcnswift.torch import bench as torch_bench
    path = tmp_path / "torch.json"
    results, ratios = torch_bench.run(models=("small",), ways=("authors eager", "bcnswift eager"), repeats=1,
                                      warmup=1, json_path=str(path))
    printed = capsys.readouterr().out
    for way in ("authors eager", "bcnswift eager"):
        r = results[f"small {way}"]
        low, high = r["normalization_share_ci95"]
        assert r["ms_per_step"] > 0 and low <= r["normalization_share"] <= high < 1
        assert f"small {way}: " in printed
    assert ratios["small: authors eager / bcnswift eager"] > 0
    saved = json.loads(path.read_text())
    assert saved["results"] == results and saved["bcnswift_torch_threads"] == torch_bench._kernel_threads()


def _ab_builds():
    """scripts/ab_builds.py, the developers' A/B of two builds, as a module."""
    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "ab_builds.py"
    spec = importlib.util.spec_from_file_location("ab_builds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_ab_builds_compares_a_build_with_itself():
    """Both processes run and agree on the bits; the printed ratio is a positive number (no time asserted)."""
    path, _ = _ab_builds()
    package_dir = os.path.dirname(os.path.dirname(bcnswift.__file__))
    done = subprocess.run([sys.executable, str(path), package_dir, package_dir, "2x8x4x4:fb", "3x16:eval",
                           "--channels-last", "--groups", "4", "--rounds", "2", "--reps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if ": new/old " in line]
    assert [line.split(":")[0] for line in lines] == ["2x8x4x4", "3x16"]
    for line in lines:
        assert float(line.split("new/old ")[1].split()[0]) > 0 and line.endswith("bits same")


def test_ab_builds_reports_builds_that_differ():
    """A 'new build' whose forward output is one ulp off in one value is reported, for every kind."""
    _, ab = _ab_builds()
    old = ab.load_kernels(os.path.dirname(os.path.dirname(_ext.__file__)), _ext.ISA)

    def off_by_one_ulp(*args):
        old.norm_forward(*args)
        y = args[6]
        y.reshape(-1)[5] = np.nextafter(y.reshape(-1)[5], np.inf)

    new = types.SimpleNamespace(**{k: getattr(old, k) for k in dir(old) if not k.startswith("__")})
    new.norm_forward = off_by_one_ulp
    options = types.SimpleNamespace(dtype="float32", channels_last=False, groups=4, estimate=False, reps=1, rounds=1)
    for kind in ("fwd", "fb", "eval"):
        assert ab.compare(old, old, f"2x8x4x4:{kind}", options)["same"]
        assert not ab.compare(old, new, f"2x8x4x4:{kind}", options)["same"]


@pytest.mark.parametrize("argv, message", [
    (["--torch", "--no-torch"], "contradict"),
    (["--rows", "--torch"], "choose one of"),
    (["--sync", "--torch"], "choose one of"),
    (["--sync", "--eval"], "choose one of"),
    (["--rows", "--models", "small"], "--models only apply with --torch"),
    (["--estimate"], "--estimate only apply with --torch"),
    (["--rounds", "3", "--ways", "authors eager"], "--ways, --rounds only apply with --torch"),
    (["--sync", "--no-reference"], "do not apply with --sync"),
    (["--threads", "-1"], "positive number of threads"),
    (["--threads", "0"], "positive number of threads"),
    (["--threads", "100000"], "at most 4096"),
    (["--rounds", "x"], "positive number of rounds, got 'x'"),
    (["--torch", "--models", "nosuch"], "unknown --models 'nosuch'"),
    (["--torch", "--ways", "authors eager,foo"], "unknown way 'foo'"),
    (["--torch", "--models", ""], "unknown --models ''"),
    (["--torch", "--no-reference"], "--no-reference does not apply with --torch"),
    (["--rows", "--json", "/nonexistent-dir/x.json"], "--json: cannot write /nonexistent-dir/x.json"),
])
def test_bench_refuses_bad_command_lines_before_any_work(argv, message, capsys):
    """Each of these ran (ignoring flags), ran the wrong mode, or failed with a traceback after the run."""
    if "--torch" in argv and "--no-torch" not in argv:
        require("torch")
    with pytest.raises(SystemExit) as raised:
        bench.parse_arguments(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: python3 -m bcnswift.bench"), err


def test_bench_checks_the_json_path_without_leaving_a_file(tmp_path):
    target = tmp_path / "results.json"
    a = bench.parse_arguments(["--rows", "--json", str(target)])
    assert a.json == str(target) and not target.exists()
    target.write_text("kept")  # an existing file is opened to append, so it keeps its contents until the run
    bench.parse_arguments(["--eval", "--json", str(target)])
    assert target.read_text() == "kept"


def test_bench_sync_fails_without_mpiexec(monkeypatch, tmp_path):
    """It printed a hint and exited 0, so a run that measured nothing passed."""
    from bcnswift import bench_sync
    import shutil
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))  # no mpiexec beside it
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as raised:
        bench_sync.launch(ranks=(2,))
    assert "no mpiexec" in str(raised.value.code)


def test_bench_sync_passes_threads_repeats_and_json_through(tmp_path):
    """--threads, --quick and --json were ignored by --sync: every rank ran 1 thread, 200 repeats, no file."""
    require("mpi4py")
    target = tmp_path / "sync.json"
    proc = subprocess.run([sys.executable, "-m", "bcnswift.bench", "--sync", "--quick", "--threads", "2", "--json",
                           str(target)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json
    written = json.loads(target.read_text())
    assert [r["ranks"] for r in written["sync"]] == [2, 4]
    for r in written["sync"]:
        assert r["threads_per_rank"] == 2 and r["repeats"] == 50
        assert r["local_us"] > 0 and r["synchronized_us"] > 0 and r["allgathers_us"] > 0
    assert "2 thread(s) per rank" in proc.stdout
