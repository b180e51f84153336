"""The benchmark script runs and prints a complete row per shape and mode (no timing is asserted)."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import numpy as np

import bcnswift
from bcnswift import _ext, bench
from conftest import require


def test_bench_runs_on_small_shapes(capsys):
    rows = bench.run([((2, 8, 4, 4), 4), ((16, 8), 2)], quick=True, reference=True, use_torch=False)
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| shape"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert len(rows) == 4  # two shapes, both estimate modes
    for row in rows:
        assert len(row) == len(columns)
        times = [float(v) for c, v in zip(columns, row) if c.endswith(" us")]
        assert times and all(t > 0 for t in times)
        assert "| " + " | ".join(row) + " |" in printed


def test_mode_tables_run_on_small_shapes(capsys):
    tables = bench.run_modes(["eval", "channels_last"], quick=True, use_torch=False, shapes=[((2, 8, 4, 4), 4)])
    printed = capsys.readouterr().out
    assert [len(tables[m]) for m in ("eval", "channels_last")] == [2, 2]  # one shape, both estimate modes
    for row in tables["channels_last"]:
        assert row["CL/NCHW fwd"] == row["CL fwd us"] / row["NCHW fwd us"] > 0
        assert row["CL/NCHW f+b"] == row["CL f+b us"] / row["NCHW f+b us"] > 0
    assert "Channels-last against NCHW" in printed and "Eval forward" in printed


def test_paired_timer_interleaves_its_functions():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = bench.paired_median_times(fns, min_seconds=0.0, repeats=4)
    assert len(times) == 2 and all(t > 0 for t in times)
    # two warm-up calls each, then one call per repeat, in the order a b, b a, a b, b a
    assert "".join(calls) == "aabb" + "ab" "ba" "ab" "ba"


def test_torch_steps_take_turns():
    require("torch")
    from bcnswift.torch import bench as torch_bench
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in ("a", "a bare", "b", "b bare")}
    medians = torch_bench.interleaved_medians(steps, repeats=3, warmup=1)
    assert set(medians) == set(steps) and all(t > 0 for t in medians.values())
    order = ["a", "a bare", "b", "b bare"]
    # the warm-up step each, the shared paired timer's two first calls each, then one step a round in turn,
    # every other round reversed
    assert calls == order + [n for n in order for _ in range(2)] + order + order[::-1] + order


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
        assert r["ms_per_step"] > 0 and 0 <= r["normalization_share"] < 1
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
