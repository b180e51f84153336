"""bcnswift.torch's synchronized modules over torch.distributed (gloo on 127.0.0.1), 2 and 4 processes started by
torch_dist_worker.py under a hard timeout; every rank reports, and the assertions are here."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import require

require("torch")

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n, mode, tmp_path, timeout=300):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, os.path.join(HERE, "torch_dist_worker.py"), str(n), mode, str(tmp_path),
           str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    reports = []
    for r in range(n):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} reported nothing (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
        reports.append(json.loads(path.read_text()))
    return reports


@pytest.fixture(scope="module", params=[2, 4])
def reports(request, tmp_path_factory):
    return request.param, launch(request.param, "all", tmp_path_factory.mktemp(f"gloo{request.param}"))


def test_compiled_ddp_training_runs_the_exchange_eagerly_and_graph_captures_refuse_it(tmp_path):
    """torch.compile of a model with synchronized layers crashed inside dynamo (numpy on the exchange's bytes), and
    torch.export blamed the ranks; the exchange now runs eagerly under torch.compile (a graph break), and a full
    graph or an export of a training forward is refused on every rank with words that say why."""
    for rank, report in enumerate(launch(2, "compile", tmp_path, timeout=600)):
        err = report["compiled ddp"]["errors"]["params and buffers after DDP steps"]
        assert err <= 1e-12 and report["compiled ddp"]["identical"], (rank, err)
        assert report["fullgraph"]["raised"] == "Unsupported", report["fullgraph"]
        assert "torch.compiler.disable" in report["fullgraph"]["message"]
        for capture in ("export", "make_fx"):  # (make_fx failed in the exchange, blaming the ranks)
            assert report[capture]["raised"] == "GraphCaptureError", report[capture]
            assert "export the model in eval mode" in report[capture]["message"]
        assert report["unchanged"] and report["eval export"]


def test_every_rank_equals_one_process_on_the_concatenated_batch(reports):
    n, ranks = reports
    for name in ranks[0]:
        if name.startswith("failure") or name in ("all empty", "outside the group", "phase mismatch",
                                                  "batched backward"):
            continue
        tol = 1e-5 if "float32" in name else 1e-12
        for rank, report in enumerate(ranks):
            for what, err in report[name]["errors"].items():
                assert err <= tol, f"{name}, rank {rank} of {n}: {what} off by {err:.3g}"
            assert report[name]["identical"], f"{name}: rank {rank}'s buffers differ from the others'"
            assert report[name].get("versions as one process", name.startswith("ddp")), \
                f"{name}, rank {rank}: the buffers' versions moved otherwise than one process's"
    for name in ("ddp", "uneven, one rank empty", "authors batch frozen", "authors cumulative", "labml cumulative",
                 "authors untracked", "labml untracked", "authors countless", "labml estimate untracked"):
        assert name in ranks[0], name


def test_failures_raise_on_every_rank_and_change_nothing(reports):
    n, ranks = reports
    for case, kind, words in (
            ("failure channels", "ValueError", f"rank {n - 1} of {n} failed"),
            ("failure groups", "ValueError", "disagree"),
            ("failure eps", "ValueError", "eps must be a positive finite number, got 0.0"),
            ("failure input dtype", "TypeError", "the input is float64 but the module is float32: synchronized"),
            ("failure module dtype", "ValueError", "dtype"),
            ("failure not a tensor", "TypeError", f"rank {n - 1} of {n} failed: TypeError: expected a torch.Tensor"),
            ("failure sparse", "TypeError", f"rank {n - 1} of {n} failed: TypeError: expected a dense (strided) input, "
                                            "got a sparse_coo tensor"),
            ("failure momentum", "TypeError", f"rank {n - 1} of {n} failed: TypeError: momentum must be a number"),
            ("failure sizes", "ValueError", f"rank {n - 1} of {n} failed: ValueError: cn_weight has 3 elements"),
            ("failure param dtype", "TypeError", f"rank {n - 1} of {n} failed: TypeError: cn_weight has dtype "
                                                 "float32"),
            ("failure groups type", "TypeError", f"rank {n - 1} of {n} failed: TypeError"),
            ("failure groups str", "TypeError", f"rank {n - 1} of {n} failed: TypeError: num_groups must be an int, "
                                                "got str '4'"),
            ("failure speed none", "ValueError", f"rank {n - 1} of {n} failed: ValueError: estbn_moving_speed is "
                                                 "None"),
            ("failure estimate", "ValueError", f"estimate is False on rank 0 but True on rank {n - 1}"),
            ("failure speed", "ValueError", f"rank {n - 1} of {n} failed: ValueError: estbn_moving_speed must be in "
                                            "[0, 1], got 1.5"),
            ("failure own forward", "TypeError", f"rank {n - 1} of {n} failed: TypeError: SyncBCNorm.bn is a "),
            ("failure own forward labml", "TypeError", "failed): TypeError: SyncBatchChannelNorm.channel_norm is a "),
            ("failure inference buffers", "RuntimeError", f"rank {n - 1} of {n} failed: RuntimeError: the running "
                                                          "statistics are inference tensors"),
            ("failure strided buffers", "ValueError", f"rank {n - 1} of {n} failed: ValueError: synchronized BCN "
                                                      "runs on the kernels alone"),
            ("failure float count", "ValueError", f"rank {n - 1} of {n} failed: ValueError: synchronized BCN runs "
                                                  "on the kernels alone"),
            ("failure grad buffers", "RuntimeError", f"rank {n - 1} of {n} failed: RuntimeError: the running "
                                                     "variance requires grad"),
            ("failure lone mean", "ValueError", f"rank {n - 1} of {n} failed: ValueError: the batch-norm stage has a "
                                                "running mean but no running variance"),
            ("failure out of memory", "OutOfMemoryError", f"rank {n - 1} of {n} failed: OutOfMemoryError: could not "
                                                          "allocate")):
        raised = [r[case] for r in ranks]
        assert {r["raised"] for r in raised} == {kind}, (case, raised)
        assert all(words in r["message"] and r["unchanged"] for r in raised), raised


def test_an_nn_syncbatchnorm_stage_is_fused_not_refused(reports):
    """A stage whose class has its own forward is refused, but nn.SyncBatchNorm's forward does a batch norm's
    math: SyncBCNorm fuses it over its own process group, as before that refusal."""
    n, ranks = reports
    raised = [r["failure syncbn stage"] for r in ranks]
    assert all(r["raised"] is None and not r["unchanged"] for r in raised), raised


def test_a_process_outside_the_modules_group_is_told_so(reports):
    n, ranks = reports
    members, outsider = [r["outside the group"] for r in ranks[:-1]], ranks[-1]["outside the group"]
    assert all(r["raised"] is None for r in members), members
    assert outsider["raised"] == "RuntimeError" and outsider["unchanged"], outsider
    assert f"(global rank {n - 1}) is not a member of the module's process_group" in outsider["message"], outsider


def test_a_backward_that_fails_before_the_exchange_raises_on_every_rank(reports):
    n, ranks = reports
    raised = [r["failure backward"] for r in ranks]
    assert {r["raised"] for r in raised} == {"TypeError"}, raised
    assert all(f"rank {n - 1} of {n} failed" in r["message"] for r in raised[:-1]), raised


def test_a_batched_backward_is_refused_with_batch_statistics_and_exact_when_estimated(reports):
    n, ranks = reports
    for rank, report in enumerate(ranks):
        refused, estimated = report["batched backward"]["batch"], report["batched backward"]["estimate"]
        assert refused["raised"] == "RuntimeError", (rank, refused)
        assert "so it cannot run batched" in refused["message"], (rank, refused)
        assert estimated["raised"] is None and estimated["exact"], (rank, estimated)


def test_a_forward_meeting_a_backward_raises_on_every_rank_and_kills_none(reports):
    n, ranks = reports
    met = [r["phase mismatch"] for r in ranks]  # (a rank that gloo aborted would have written no report)
    assert {r["raised"] for r in met} == {"RuntimeError"}, met
    assert all("the ranks are in different phases" in r["message"] and r["unchanged"] for r in met), met


def test_a_training_batch_empty_on_every_rank_changes_what_one_process_changes(reports):
    n, ranks = reports
    for rank, report in enumerate(ranks):
        r = report["all empty"]
        assert r["raised"] is None and r["shape"] == [0, 8, 3, 3] and r["as one process"], f"rank {rank} of {n}: {r}"
        assert r["count"] == 2, f"rank {rank} of {n}: the count of one batch, then of the empty one: {r}"


def test_a_rank_that_never_arrives_is_gloos_timeout_error(tmp_path):
    ranks = launch(2, "timeout", tmp_path, timeout=120)
    waiting = ranks[0]
    assert waiting["raised"] == "RuntimeError" and "Timed out" in waiting["message"], waiting
    assert waiting["seconds"] < 30 and waiting["unchanged"]


def test_convert_shares_parameters_and_keeps_the_state_dict():
    torch = require("torch")
    import bcnswift.torch as bt
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bt.BCNorm(8, 4, estimate=True),
                                bt.BatchChannelNorm(8, 2))
    import copy
    reference = copy.deepcopy(model).eval()
    keys = list(model.state_dict())
    weight = model[1].weight
    converted = bt.convert_sync_batch_channel_norm(model)
    assert isinstance(converted[1], bt.SyncBCNorm) and isinstance(converted[2], bt.SyncBatchChannelNorm)
    assert converted[1].weight is weight and list(converted.state_dict()) == keys
    assert isinstance(bt.convert_sync_batch_channel_norm(bt.BCNorm(8, 4)), bt.SyncBCNorm)
    # the same tensors, in containers of their own: what is registered on one module stays there
    original = bt.BCNorm(8, 4, estimate=True)
    pair = bt.convert_sync_batch_channel_norm(original)
    fired = []
    pair.register_forward_hook(lambda *a: fired.append("converted"))
    pair.register_buffer("extra", torch.zeros(1))
    pair.register_parameter("more", torch.nn.Parameter(torch.ones(1)))
    assert "extra" not in original.state_dict() and "more" not in dict(original.named_parameters())
    original.eval()(torch.randn(2, 8, 3) + 1.0)
    assert not fired and pair.weight is original.weight and pair.bn is original.bn
    # eval needs no process group and exchanges nothing
    converted.eval()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4)) + 1.0
    assert torch.equal(converted(x), reference(x))
    with pytest.raises(RuntimeError, match="init_process_group"):
        converted.train()(x)
