"""The synchronized numpy layers over real MPI processes: pytest starts `mpiexec -n 2` and `-n 4` (the `mpich`
wheel's, next to this interpreter) on this machine, with hard timeouts, and asserts on what every rank reports
(mpi_worker.py runs sync_scenarios.py's scenarios)."""
import json
import os
import subprocess
import sys

import pytest

import sync_scenarios as S
from conftest import require, require_tool

require("mpi4py")

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = {"f64": 1e-12, "f32": 1e-5, "ulps": 8}  # "ulps": the Float32 lanes' bound (NUMERICS.md), errors in ulps


def mpiexec():
    """The mpiexec of the mpich wheel, beside the interpreter, else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(beside):
        return beside
    return require_tool("mpiexec", hint="pip install '.[test]' brings the mpich wheel")


def launch(n, mode, timeout=180, *extra):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
               BCNSWIFT_NUM_THREADS="1")
    # loopback only: hydra launches the ranks on this host, and they talk through shared memory
    cmd = [mpiexec(), "-n", str(n), "-hosts", "127.0.0.1", sys.executable, os.path.join(HERE, "mpi_worker.py"), mode,
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module", params=[2, 4])
def reports(request):
    proc = launch(request.param, "all")
    assert proc.returncode == 0, f"mpiexec -n {request.param} failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return request.param, {s["name"]: s["ranks"] for s in json.loads(lines[-1])["results"]}


def test_every_rank_equals_one_process_and_holds_the_same_buffers(reports):
    n, results = reports
    assert {name for name in results if not name.startswith("failure")} == {
        "equality bcn batch f64", "equality bcn estimate f64", "equality bn f64", "equality bcn batch f32",
        "equality bcn estimate f32", "uneven with an empty rank", "spatial", "one sample each f32"}, sorted(results)
    for name, ranks in results.items():
        if name.startswith("failure"):
            continue
        assert len(ranks) == n
        tol = TOL["f32" if "f32" in name else "f64"]
        for rank, res in enumerate(ranks):
            for what, err in res["errors"].items():
                bound = TOL["ulps"] if what.endswith("ulps") else tol
                assert err <= bound, f"{name}, rank {rank} of {n}: {what} off by {err:.3g}"
            assert res["identical"], f"{name}: rank {rank}'s buffers differ from rank 0's"


def test_failures_raise_on_every_rank_and_change_nothing(reports):
    n, results = reports
    failures = {k: v for k, v in results.items() if k.startswith("failure")}
    assert sorted(failures) == sorted(f"failure {case}" for case in S.FAILURES)
    for name, ranks in failures.items():
        raised = {r["raised"] for r in ranks}
        expected = S.RAISED.get(name[len("failure "):], "ValueError")
        assert raised == {expected}, f"{name}: {ranks}"
        assert all(r["unchanged"] for r in ranks), f"{name}: some rank changed its state"
        assert len({r["message"] for r in ranks}) == 1, f"{name}: ranks raised different messages"
        if name.endswith("all_nan"):
            every = ", ".join(map(str, range(n)))
            assert f"rank 0 of {n} failed (ranks {every} failed)" in ranks[0]["message"], ranks[0]["message"]
        elif name.endswith(("wrong_input_channels", "nan", "bad_dy")):
            assert f"rank {n - 1} of {n} failed" in ranks[0]["message"]


def test_a_rank_that_never_arrives_times_out(tmp_path):
    path = tmp_path / "rank0.json"
    proc = launch(2, "timeout", 60, str(path))
    assert path.exists(), proc.stdout + proc.stderr
    report = json.loads(path.read_text())
    assert report["raised"] == "TimeoutError", report
    assert 1.9 <= report["seconds"] < 10 and report["running_mean_unchanged"], report
    # the late rank's data reached the abandoned exchange's own buffers, not an array allocated after it (it
    # once landed in one), and the communicator is refused from then on
    assert report["fresh_untouched"], report
    assert report["second_call"].startswith("RuntimeError: rank 0: an earlier statistics exchange over this "
                                            "communicator timed out"), report


def test_an_intercommunicator_and_comm_null_are_refused_by_name():
    proc = launch(2, "communicators", 120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])["results"]
    assert len(ranks) == 2
    for report in ranks:
        for way in ("constructor", "setter"):
            assert report[f"inter {way}"].startswith("ValueError: comm is an intercommunicator"), report
            assert report[f"null {way}"].startswith("ValueError: comm is MPI.COMM_NULL"), report
        assert report["merged trains alike"], report


def test_a_rank_that_dies_ends_the_job_instead_of_hanging():
    # MPICH's launcher kills the other ranks when one exits early: an error, not a hang
    proc = launch(2, "dead", timeout=120)
    assert proc.returncode != 0 and '"raised": null' not in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)


def test_the_distributed_demo_trains_like_one_process(tmp_path):
    env = dict(os.environ, BCNSWIFT_NUM_THREADS="1")
    proc = subprocess.run([mpiexec(), "-n", "2", "-hosts", "127.0.0.1", sys.executable, "-m", "bcnswift.demo",
                           "--distributed", "--quick", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["max_loss_gap_sync_vs_one_process"] < 1e-9
    assert [r["variant"] for r in result["table"]] == ["BN", "SyncBN", "BCN-est+WS", "SyncBCN+WS",
                                                       "BCN-batch+WS (one process)"]
