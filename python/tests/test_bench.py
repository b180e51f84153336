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
