"""The benchmark script runs and prints a complete row per shape and mode (no timing is asserted)."""
from bcnswift import bench


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
