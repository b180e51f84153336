"""Started by test_sync_torch.py: `python torch_dist_worker.py N MODE OUTDIR PORT` spawns N processes that join a
gloo process group on 127.0.0.1:PORT and run MODE; each rank writes OUTDIR/rank<r>.json for the test to assert on.

MODE "all": synchronized modules against one process on the concatenated batch (outputs, input gradients,
all-reduced parameter gradients, buffers), identity across ranks, uneven and empty batches, DDP training steps,
and failures. MODE "compile": DDP training steps under torch.compile, and graph captures refused. MODE "timeout":
the last rank never arrives; the others must get gloo's timeout error.
"""
import copy
import datetime
import json
import os
import sys
import time
import zlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

SEED = zlib.crc32(b"bcnswift torch sync")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def batches(seed, sizes, C, dtype):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(C, generator=g, dtype=torch.float64).view(1, C, 1, 1) + 2.0
    xs = [(torch.randn(b, C, 3, 4, generator=g, dtype=torch.float64) * 1.5 + mean).to(dtype) for b in sizes]
    dys = [(torch.randn(b, C, 3, 4, generator=g, dtype=torch.float64) + 0.3).to(dtype) for b in sizes]
    return xs, dys


def identical_across_ranks(t):
    t = t.detach().contiguous()
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _batch_norm_stage(m):
    """The batch-norm stage of an authors' module (bn) or of labml's (batch_norm)."""
    return m.bn if hasattr(m, "bn") else m.batch_norm


def make(kind, C, G, dtype):
    """(synchronized module, the same local one); a kind ending in " frozen" has its batch-norm stage in eval
    inside a training module (the frozen-BN idiom), which exchanges nothing: it did, and trained the stage.
    "cumulative": momentum None, a cumulative average of the batches' statistics; "untracked": a batch norm
    switched to track_running_stats=False after construction, so that it has buffers but must not update them;
    "authors countless": the batch norm's num_batches_tracked set to None (it failed after updating the buffers);
    "labml estimate untracked": an estimating stage with track_running_stats off, which has no estimates to move
    or use: the statistics of the whole batch (it normalized with a blend of scratch buffers toward the batch)."""
    if kind.endswith(" frozen"):
        pair = make(kind[:-len(" frozen")], C, G, dtype)
        for m in pair:
            _batch_norm_stage(m).eval()
            if hasattr(m, "bn"):
                m.bn.running_mean.fill_(1.5)  # away from the fresh buffers, so that using them shows
        return pair
    import bcnswift.torch as bt
    if kind == "labml estimate untracked":  # an estimating stage without estimates: the batch's statistics
        pair = (bt.SyncBatchChannelNorm(C, G, estimate=True, dtype=dtype),
                bt.BatchChannelNorm(C, G, estimate=True, dtype=dtype))
        for m in pair:
            m.batch_norm.track_running_stats = False
        return pair
    if kind == "authors countless":  # a batch norm without num_batches_tracked (set to None): momentum alone
        pair = bt.SyncBCNorm(C, G, dtype=dtype), bt.BCNorm(C, G, dtype=dtype)
        for m in pair:
            m.bn.num_batches_tracked = None
        return pair
    if kind.endswith((" cumulative", " untracked")):  # batch statistics; the documents' modules, or labml's
        pair = (bt.SyncBCNorm(C, G, dtype=dtype), bt.BCNorm(C, G, dtype=dtype)) if kind.startswith("authors") else \
            (bt.SyncBatchChannelNorm(C, G, estimate=False, dtype=dtype), bt.BatchChannelNorm(C, G, estimate=False,
                                                                                               dtype=dtype))
        for m in pair:
            stage = _batch_norm_stage(m)
            if kind.endswith(" cumulative"):
                stage.momentum = None
            else:
                stage.track_running_stats = False
        return pair
    if kind == "authors batch":
        return bt.SyncBCNorm(C, G, dtype=dtype), bt.BCNorm(C, G, dtype=dtype)
    if kind == "authors estimate":
        a, b = bt.SyncBCNorm(C, G, estimate=True, dtype=dtype), bt.BCNorm(C, G, estimate=True, dtype=dtype)
        a.bn.estbn_moving_speed.fill_(0.1)
        b.bn.estbn_moving_speed.fill_(0.1)
        return a, b
    estimate = kind == "labml estimate"
    return (bt.SyncBatchChannelNorm(C, G, estimate=estimate, dtype=dtype),
            bt.BatchChannelNorm(C, G, estimate=estimate, dtype=dtype))


def equality(rank, size, kind, dtype, sizes, steps=2):
    C, G = 8, 4
    ours, single = make(kind, C, G, dtype)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    err = {"y": 0.0, "dx": 0.0, "grads": 0.0, "buffers": 0.0, "eval": 0.0}
    same = versions = True
    for step in range(steps):
        xs, dys = batches(SEED + step, sizes, C, dtype)
        x = xs[rank].clone().requires_grad_()
        x_all = torch.cat(xs).requires_grad_()
        for m in (ours, single):
            m.zero_grad(set_to_none=True)
        # a buffer written in place must say so (its version), as autograd checks tensors saved for a backward
        before = [[b._version for b in m.buffers()] for m in (ours, single)]
        y = ours(x)
        y.backward(dys[rank])
        y_all = single(x_all)
        y_all.backward(torch.cat(dys))
        moved = [[b._version > v for b, v in zip(m.buffers(), was)] for m, was in zip((ours, single), before)]
        versions &= moved[0] == moved[1]
        err["y"] = max(err["y"], rel(y, y_all[lo:hi]))
        err["dx"] = max(err["dx"], rel(x.grad, x_all.grad[lo:hi]))
        for (name, p), (_, q) in zip(ours.named_parameters(), single.named_parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank's grads are its contribution; their sum is the whole batch's
            err["grads"] = max(err["grads"], rel(g, q.grad))
        for (name, b), (_, c) in zip(ours.named_buffers(), single.named_buffers()):
            err["buffers"] = max(err["buffers"], rel(b, c))
            same &= identical_across_ranks(b)
    ours.eval()
    single.eval()
    xs, _ = batches(SEED + 99, sizes, C, dtype)
    with torch.no_grad():  # eval exchanges nothing: each rank is one process on its own batch (labml's untracked
        # batch norm takes that batch's statistics in eval; the others normalize each sample alone)
        err["eval"] = rel(ours(xs[rank]), single(xs[rank]))
    return {"errors": err, "identical": same, "versions as one process": versions}


def ddp(rank, size, steps=3, compiled=False):
    """WS conv + BCNorm + linear, trained with DDP over the ranks (under torch.compile if `compiled`: the
    synchronized forward runs eagerly there, a graph break), against one process on the whole batch."""
    import bcnswift.torch as bt
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    model = nn.Sequential(bt.Conv2d(3, 8, 3, padding=1), bt.BCNorm(8, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).double()
    single = copy.deepcopy(model)
    module = bt.convert_sync_batch_channel_norm(model)
    synced = DistributedDataParallel(module)
    if compiled:
        synced = torch.compile(synced)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (synced, single)]
    g = torch.Generator().manual_seed(SEED)
    per = 2
    for step in range(steps):
        x = torch.randn(per * size, 3, 6, 6, generator=g, dtype=torch.float64) + 0.7
        t = torch.randint(0, 5, (per * size,), generator=g)
        for m, opt, xb, tb in ((synced, opts[0], x[rank * per:(rank + 1) * per], t[rank * per:(rank + 1) * per]),
                               (single, opts[1], x, t)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), tb).backward()
            opt.step()
    err = max(rel(p, q) for p, q in zip(module.state_dict().values(), single.state_dict().values())
              if p.is_floating_point())
    return {"errors": {"params and buffers after DDP steps": err},
            "identical": all(identical_across_ranks(p) for p in module.state_dict().values())}


def run_compile(rank, size):
    """Compiled DDP training against one process; a full graph and an export of a synchronized training forward
    refused on every rank, changing nothing (they crashed inside dynamo, or blamed the ranks)."""
    import bcnswift.torch as bt
    out = {"compiled ddp": ddp(rank, size, compiled=True)}
    layer = bt.SyncBCNorm(8, 4, dtype=torch.float64)
    x = batches(SEED, [2], 8, torch.float64)[0][0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    from torch.fx.experimental.proxy_tensor import make_fx
    for name, capture in (("fullgraph", lambda: torch.compile(layer, fullgraph=True)(x)),
                          ("export", lambda: torch.export.export(layer, (x,))), ("make_fx", lambda: make_fx(layer)(x))):
        try:
            capture()
            out[name] = {"raised": None}
        except Exception as e:  # noqa: BLE001
            out[name] = {"raised": type(e).__name__, "message": str(e)[:300]}
    out["unchanged"] = all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer.eval()
    out["eval export"] = torch.export.export(layer, (x,)).module()(x).shape == x.shape
    return out


def failure(rank, size, case):
    """channels, groups: the last rank's input or layer differs; eps: estimate mode, which updates its buffers
    before it normalizes, with eps 0 everywhere; input dtype: a float32 module in estimate mode given float64 on
    every rank; module dtype: the last rank's module is float32, the others' float64 (each given its own dtype);
    not a tensor: the last rank passes a numpy array, raising before any tensor work, yet inside the exchange;
    sparse: the last rank passes its batch as a sparse tensor;
    momentum: the last rank's momentum is not a number; sizes: estimate mode, the last rank's per-group weight
    has 3 values for 4 groups (caught before the estimates' update); estimate: only the last rank estimates (its
    moving speed 0.2, which the exchange compares as its momentum: the message must name estimate); speed: the
    last rank's moving speed is 1.5; own forward: the last rank's bn is a BatchNorm2d subclass with a forward of
    its own, which the fused exchange would skip; own forward labml: every rank's labml channel_norm is one;
    syncbn stage: every rank's bn is an nn.SyncBatchNorm, whose own forward does a batch norm's math (fused, no
    error); inference buffers: the last rank's layer was made under torch.inference_mode(), so its buffers cannot
    be updated outside it; strided buffers, float count: the last rank's running_mean is a strided view, or its
    num_batches_tracked a float (the local modules take those through the composed route; the kernels, which the
    exchange runs on alone, do not); grad buffers: the last rank's running_var requires grad; lone mean: the last
    rank's running_var is None (its running_mean kept); speed none: the last rank's EstBN moving speed is None
    (refused while its stage is read, before the exchange: the others waited in the allgather); groups str: the
    last rank's num_groups is "4" (a TypeError comparing it); out of memory: the last rank's moments kernel cannot
    allocate its scratch (its MemoryError, which bcnswift.torch raises as torch.OutOfMemoryError)."""
    import bcnswift.torch as bt
    C = 8
    bad = rank == size - 1
    dtype = torch.float32 if case == "input dtype" or case == "module dtype" and bad else torch.float64
    estimate = case in ("eps", "input dtype", "sizes", "speed", "param dtype", "speed none") or \
        case == "estimate" and bad
    with torch.inference_mode(case == "inference buffers" and bad):
        layer = bt.SyncBCNorm(C, 2 if case == "groups" and bad else 4, estimate=estimate, dtype=dtype)
    if case == "own forward" and bad:
        class Shifted(torch.nn.BatchNorm2d):
            def forward(self, x):
                return super().forward(x) + 1
        layer.bn = Shifted(C, dtype=dtype)
    if case == "syncbn stage":
        layer.bn = torch.nn.SyncBatchNorm(C, dtype=dtype)
    if case == "own forward labml":
        class ShiftedChannelNorm(bt.ChannelNorm):
            def forward(self, x):
                return super().forward(x) + 1
        layer = bt.SyncBatchChannelNorm(C, 4, estimate=False, dtype=dtype)
        layer.channel_norm = ShiftedChannelNorm(C, 4, dtype=dtype)
    if estimate:  # estimate mode updates the buffers before it normalizes: a failure must stop it first
        layer.bn.estbn_moving_speed.fill_(0.2)
    if case == "eps":
        layer.bn.eps = 0.0
    if case == "speed" and bad:
        layer.bn.estbn_moving_speed.fill_(1.5)
    if case == "speed none" and bad:
        layer.bn.estbn_moving_speed = None
    xs, _ = batches(SEED, [2] * size, C, torch.float64 if case == "input dtype" else dtype)
    x = xs[rank][:, :C - 1] if case == "channels" and bad else xs[rank]
    if case == "not a tensor" and bad:
        x = x.numpy()
    if case == "sparse" and bad:
        x = x.to_sparse()
    if case == "momentum" and bad:
        layer.bn.momentum = "a"
    if case == "groups type" and bad:  # a header cannot carry it: the rank's error instead, on every rank
        layer.num_groups = 4.0
    if case == "groups str" and bad:
        layer.num_groups = "4"
    if case == "param dtype" and bad:  # checked before estimate mode's update of the buffers, on every rank
        layer.weight = torch.nn.Parameter(torch.ones(1, 4, 1, dtype=torch.float32))
    if case == "sizes" and bad:
        layer.weight = torch.nn.Parameter(torch.ones(1, 3, 1, dtype=dtype))
    if case == "strided buffers" and bad:
        wide = torch.zeros(2 * C, dtype=dtype)
        layer.bn.running_mean = wide[::2]
    if case == "float count" and bad:
        layer.bn.num_batches_tracked = layer.bn.num_batches_tracked.to(dtype)
    if case == "grad buffers" and bad:
        layer.bn.running_var.requires_grad_(True)
    if case == "lone mean" and bad:
        layer.bn.running_var = None
    from bcnswift import _ext
    kernel = _ext.norm_moments
    if case == "out of memory" and bad:  # this rank's process alone (the kernels look theirs up at each call)
        def refuse(*args):
            raise MemoryError("could not allocate 4611686018427387904 bytes of scratch memory for this call")
        _ext.norm_moments = refuse
    before = copy.deepcopy(layer.state_dict())
    try:
        layer(x)
        out = {"raised": None, "message": ""}
    except Exception as e:  # noqa: BLE001
        out = {"raised": type(e).__name__, "message": str(e)}
    finally:
        _ext.norm_moments = kernel
    out["unchanged"] = all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    return out


def all_empty(rank, size):
    """A training batch empty on every rank: an empty output, and the buffers as one process given one leaves
    them (the running statistics as they were; the count advanced, as torch's BatchNorm2d advances it)."""
    import bcnswift.torch as bt
    layer = bt.SyncBCNorm(8, 4, dtype=torch.float64)
    xs, _ = batches(SEED, [2] * size, 8, torch.float64)
    layer(xs[rank])
    one = bt.BCNorm(8, 4, dtype=torch.float64)
    one.load_state_dict(layer.state_dict())
    empty = torch.zeros(0, 8, 3, 3, dtype=torch.float64)
    one(empty)
    try:
        y = layer(empty.clone().requires_grad_())
        y.sum().backward()
        out = {"raised": None, "message": "", "shape": list(y.shape)}
    except Exception as e:  # noqa: BLE001
        out = {"raised": type(e).__name__, "message": str(e), "shape": None}
    out["as one process"] = all(torch.equal(one.state_dict()[k], v) for k, v in layer.state_dict().items())
    out["count"] = int(layer.bn.num_batches_tracked)
    return out


def failure_in_backward(rank, size):
    """The last rank's backward fails before the exchange (a saved-tensor hook hands x back in float16, which the
    kernels refuse): every rank must raise, none wait for it."""
    import bcnswift.torch as bt
    C = 8
    layer = bt.SyncBCNorm(C, 4, dtype=torch.float64)
    xs, _ = batches(SEED, [2] * size, C, torch.float64)
    x = xs[rank].clone().requires_grad_()
    bad = rank == size - 1
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, (lambda t: t.half()) if bad else (lambda t: t)):
        y = layer(x)
    try:
        y.sum().backward()
        return {"raised": None, "message": ""}
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "message": str(e)}


def batched_backward(rank, size):
    """autograd.grad(..., is_grads_batched=True) on every rank: with batch statistics, refused on every rank (one
    exchange of gradient sums per output gradient cannot be batched); estimated (a local backward), each gradient of
    the batch is the one computed alone, bit for bit. Both raised "Cannot access data pointer"."""
    import bcnswift.torch as bt
    out = {}
    for kind in ("batch", "estimate"):
        layer = bt.SyncBCNorm(8, 4, estimate=kind == "estimate", dtype=torch.float64)
        if kind == "estimate":
            layer.bn.estbn_moving_speed.fill_(0.1)
        xs, dys = batches(SEED + 7, [2] * size, 8, torch.float64)
        x = xs[rank].clone().requires_grad_()
        y = layer(x)
        v = torch.stack([dys[rank], dys[rank] * 0.5 + 0.25, -dys[rank]])
        try:
            g = torch.autograd.grad(y, x, v, is_grads_batched=True, retain_graph=True)[0]
            alone = [torch.autograd.grad(y, x, vi, retain_graph=True)[0] for vi in v]
            out[kind] = {"raised": None, "message": "", "exact": all(torch.equal(g[i], a) for i, a in enumerate(alone))}
        except Exception as e:  # noqa: BLE001
            out[kind] = {"raised": type(e).__name__, "message": str(e)}
    return out


def phase_mismatch(rank, size):
    """The last rank makes a forward while the others make the backward of theirs: every rank raises the same
    RuntimeError. The backward once sent its header and sums in one allgather, larger than the forward's header
    alone, and gloo answered collectives of two sizes by aborting the process (SIGABRT)."""
    import bcnswift.torch as bt
    layer = bt.SyncBCNorm(8, 4, dtype=torch.float64)
    x = batches(SEED, [2] * size, 8, torch.float64)[0][rank].clone().requires_grad_()
    y = layer(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        if rank == size - 1:
            layer(x)
        else:
            y.sum().backward()
        out = {"raised": None, "message": ""}
    except Exception as e:  # noqa: BLE001
        out = {"raised": type(e).__name__, "message": str(e)}
    out["unchanged"] = all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items()) and (
        x.grad is None and all(p.grad is None for p in layer.parameters()))
    return out


def outside_the_group(rank, size):
    """A module on a process group without the last rank, called on every rank: its members train together, the
    last rank gets a RuntimeError saying it is no member (its rank and size in the group were -1: it raised a
    numpy error about negative dimensions)."""
    import bcnswift.torch as bt
    group = dist.new_group(list(range(size - 1)))  # every rank takes part in making it
    layer = bt.SyncBCNorm(8, 4, dtype=torch.float64, process_group=group)
    try:
        layer(batches(SEED, [2] * size, 8, torch.float64)[0][rank])
        out = {"raised": None, "message": ""}
    except Exception as e:  # noqa: BLE001
        out = {"raised": type(e).__name__, "message": str(e)}
    out["unchanged"] = bool((layer.bn.num_batches_tracked == 0).item())
    return out


def run_all(rank, size):
    out = {}
    for dtype in (torch.float64, torch.float32):
        for kind in ("authors batch", "authors estimate", "labml batch", "labml estimate"):
            out[f"{kind} {str(dtype)[6:]}"] = equality(rank, size, kind, dtype, [2 + r % 2 for r in range(size)])
    for kind in ("authors batch frozen", "authors estimate frozen", "labml batch frozen", "authors cumulative",
                 "labml cumulative", "authors untracked", "labml untracked", "authors countless",
                 "labml estimate untracked"):
        out[kind] = equality(rank, size, kind, torch.float64, [2 + r % 2 for r in range(size)])
    out["uneven, one rank empty"] = equality(rank, size, "authors batch", torch.float64, [3, 0] + [1] * (size - 2))
    out["uneven, estimate"] = equality(rank, size, "authors estimate", torch.float64, [0, 2] + [3] * (size - 2))
    out["ddp"] = ddp(rank, size)
    for case in ("channels", "groups", "eps", "input dtype", "module dtype", "not a tensor", "sparse", "momentum",
                 "sizes", "groups type", "estimate", "speed", "own forward", "own forward labml", "syncbn stage",
                 "inference buffers", "strided buffers", "float count", "grad buffers", "lone mean", "param dtype",
                 "out of memory", "speed none", "groups str"):
        out[f"failure {case}"] = failure(rank, size, case)
    out["failure backward"] = failure_in_backward(rank, size)
    out["batched backward"] = batched_backward(rank, size)
    out["phase mismatch"] = phase_mismatch(rank, size)
    out["outside the group"] = outside_the_group(rank, size)
    out["all empty"] = all_empty(rank, size)
    return out


def run_timeout(rank, size):
    import bcnswift.torch as bt
    layer = bt.SyncBCNorm(8, 4, dtype=torch.float64)
    if rank == size - 1:
        time.sleep(8)
        return {"raised": None}
    t0 = time.monotonic()
    try:
        layer(batches(SEED, [2], 8, torch.float64)[0][0])
        return {"raised": None}
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "message": str(e)[:300], "seconds": time.monotonic() - t0,
                "unchanged": bool((layer.bn.running_mean == 0).all())}


def main(rank, size, mode, outdir, port):
    timeout = 3 if mode == "timeout" else 60
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout))
    torch.set_num_threads(1)
    result = {"all": run_all, "timeout": run_timeout, "compile": run_compile}[mode](rank, size)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if mode != "timeout":
        dist.destroy_process_group()
    else:
        os._exit(0)  # a timed-out collective may still be pending: leave without waiting for it


if __name__ == "__main__":
    n, mode, outdir, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["BCNSWIFT_NUM_THREADS"] = "1"
    mp.start_processes(main, args=(n, mode, outdir, port), nprocs=n, start_method="spawn")
