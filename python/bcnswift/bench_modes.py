"""The benchmark's tables beyond the main one: the row path, eval, channels-last input, and peers (the authors'
PyTorch BCNorm eager and under torch.compile, a jitted JAX BCN, ONNX Runtime). Each table is a list of dicts,
measured in one run with the same thread count; bench.py prints them and writes them with --json.
"""
import os

import numpy as np

import bcnswift
from .bench import against_copies, copies, copy_times, ratio, us

#: [B, C] and small maps: the row layout (G = 32)
ROW_SHAPES = [((256, 1024), 32), ((64, 2048), 32), ((64, 512, 2, 2), 32), ((32, 256, 3, 3), 32),
              ((8, 1024, 4, 4), 32)]


def inputs(shape, seed=0):
    """x (mean 1, deviation 2) and dy, float32, from `seed`."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    return x, dy


def ours_calls(layer, x, dy, prefix=""):
    """{name: call} of `layer` on (x, dy): "fwd" and "f+b" into preallocated outputs, "alloc fwd" and
    "alloc f+b" allocating theirs; each name after `prefix`."""
    out, grad = np.empty_like(x), np.empty_like(x)

    def fb():
        layer(x, out=out)
        layer.backward(dy, out=grad)

    def fb_alloc():
        layer(x)
        layer.backward(dy)
    return {prefix + "fwd": lambda: layer(x, out=out), prefix + "f+b": fb, prefix + "alloc fwd": lambda: layer(x),
            prefix + "alloc f+b": fb_alloc}


def torch_bcnorm(num_channels, num_groups, estimate):
    """The authors' BCNorm (with EstBN moving at speed 0.1 when estimating), as in their repository."""
    from bcnswift.torch.reference import BCNorm

    m = BCNorm(num_channels, num_groups, 1e-5, estimate)
    if estimate:
        m.bn.estbn_moving_speed.fill_(0.1)
    return m


def authors_layer(num_channels, num_groups, estimate):
    """bcnswift's layer that computes what the authors' BCNorm computes: with estimate, their EstBN's variance
    about the running mean (labml's, bcnswift's default, takes it about the batch's mean)."""
    if estimate:
        return bcnswift.BatchChannelNorm(num_channels, num_groups, estimate=True, variance_around="running_mean")
    return bcnswift.BatchChannelNorm(num_channels, num_groups, estimate=False)


def torch_calls(torch, m, x, dy, prefix=""):
    """{name: call}: "fwd" (under no_grad: no graph recorded) and "f+b" of a torch module, after `prefix`; [B, C]
    as [B, C, 1, 1], which the authors' BatchNorm2d needs."""
    if x.ndim == 2:
        x, dy = x[:, :, None, None], dy[:, :, None, None]
    tx = torch.from_numpy(x).requires_grad_(True)
    tdy = torch.from_numpy(dy)

    def f():
        with torch.no_grad():
            m(tx)

    def fb():
        tx.grad = None
        m(tx).backward(tdy)
    return {prefix + "fwd": f, prefix + "f+b": fb}


def training_rows(shape, G, measure, torch=None, peer="authors"):
    """One shape's rows, estimate True then False: the copies, bcnswift's calls (`ours_calls`, computing what the
    authors' module does) and, with torch, the authors' eager BCNorm (columns named after `peer`), all measured
    together (`measure`: {name: call} -> {name: samples}); the authors' ratios divide bcnswift's allocating
    calls, as theirs allocate."""
    x, dy = inputs(shape)
    fns = copies(x, torch)
    for estimate in (True, False):
        fns.update(ours_calls(authors_layer(shape[1], G, estimate), x, dy, f"{estimate} "))
        if torch is not None:
            fns.update(torch_calls(torch, torch_bcnorm(shape[1], G, estimate), x, dy, f"{estimate} {peer} "))
    samples = measure(fns)
    rows = []
    for estimate in (True, False):
        k = f"{estimate} "
        row = {"shape": list(shape), "G": G, "estimate": estimate, **copy_times(samples),
               "fwd us": us(samples[k + "fwd"]), **against_copies(samples, k + "fwd", "fwd"),
               "fwd+bwd us": us(samples[k + "f+b"]), **against_copies(samples, k + "f+b", "f+b"),
               "alloc fwd us": us(samples[k + "alloc fwd"]), "alloc f+b us": us(samples[k + "alloc f+b"])}
        if torch is not None:
            theirs = f"{k}{peer} "
            row.update({f"{peer} fwd us": us(samples[theirs + "fwd"]), f"{peer} f+b us": us(samples[theirs + "f+b"]),
                        f"{peer}/bcn fwd": ratio(samples[theirs + "fwd"], samples[k + "alloc fwd"]),
                        f"{peer}/bcn f+b": ratio(samples[theirs + "f+b"], samples[k + "alloc f+b"])})
        rows.append(row)
    return rows


def rows_table(measure, torch=None):
    """The row path's shapes (`training_rows`)."""
    return [row for shape, G in ROW_SHAPES for row in training_rows(shape, G, measure, torch)]


def eval_table(shapes, measure, torch=None):
    out = []
    for shape, G in shapes:
        x, dy = inputs(shape)
        fns = copies(x, torch)
        for estimate in (True, False):
            layer = bcnswift.BatchChannelNorm(shape[1], G, estimate=estimate)
            layer(x)  # running statistics from one batch, then eval
            layer.eval()
            y = np.empty_like(x)
            fns[f"{estimate} eval fwd"] = lambda layer=layer, y=y: layer(x, out=y)
        samples = measure(fns)
        for estimate in (True, False):
            k = f"{estimate} eval fwd"
            out.append({"shape": list(shape), "G": G, "estimate": estimate, **copy_times(samples),
                        "eval fwd us": us(samples[k]), **against_copies(samples, k, "eval fwd")})
    return out


def channels_last_table(shapes, measure):
    """The same logical tensor in NCHW and in channels-last memory, `out=` calls, interleaved."""
    out = []
    for shape, G in shapes:
        if len(shape) < 3:
            continue
        x, dy = inputs(shape)
        last = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)  # same values, channels-last memory
        dy_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(dy, 1, -1)), -1, 1)
        fns = {}
        for estimate in (True, False):
            for name, xs, dys in (("NCHW", x, dy), ("CL", last, dy_last)):
                calls = ours_calls(bcnswift.BatchChannelNorm(shape[1], G, estimate=estimate), xs, dys)
                fns[f"{estimate} {name} fwd"], fns[f"{estimate} {name} f+b"] = calls["fwd"], calls["f+b"]
        samples = measure(fns)
        for estimate in (True, False):
            k = f"{estimate} "
            out.append({"shape": list(shape), "G": G, "estimate": estimate,
                        "NCHW fwd us": us(samples[k + "NCHW fwd"]), "CL fwd us": us(samples[k + "CL fwd"]),
                        "CL/NCHW fwd": ratio(samples[k + "CL fwd"], samples[k + "NCHW fwd"]),
                        "NCHW f+b us": us(samples[k + "NCHW f+b"]), "CL f+b us": us(samples[k + "CL f+b"]),
                        "CL/NCHW f+b": ratio(samples[k + "CL f+b"], samples[k + "NCHW f+b"])})
    return out


# ---- peers --------------------------------------------------------------------------------------------------

def _jax_bcn(shape, G, x, dy):
    import jax
    import jax.numpy as jnp

    def bcn(x, bn_w, bn_b, cn_w, cn_b):
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axes, keepdims=True)
        var = x.var(axes, keepdims=True)
        c = (1, -1) + (1,) * (x.ndim - 2)
        h = (x - mean) / jnp.sqrt(var + 1e-5) * bn_w.reshape(c) + bn_b.reshape(c)
        g = h.reshape(x.shape[0], G, -1)
        gm, gv = g.mean(-1, keepdims=True), g.var(-1, keepdims=True)
        g = (g - gm) / jnp.sqrt(gv + 1e-5) * cn_w.reshape(1, G, 1) + cn_b.reshape(1, G, 1)
        return g.reshape(x.shape)

    C = shape[1]
    params = (jnp.ones(C), jnp.zeros(C), jnp.ones(G), jnp.zeros(G))
    jx, jdy = jnp.asarray(x), jnp.asarray(dy)
    fwd = jax.jit(bcn)
    grads = jax.jit(jax.grad(lambda x, *p: (bcn(x, *p) * jdy).sum(), argnums=(0, 1, 2, 3, 4)))
    return {"fwd": lambda: fwd(jx, *params).block_until_ready(),
            "f+b": lambda: jax.block_until_ready(grads(jx, *params))}


def _onnx_bcn(shape, G, x, training, threads):
    """BatchNormalization (training_mode=1: batch statistics; 0: running ones) then GroupNormalization (opset
    18, per-group scale and bias: the channel norm), forward only."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    C = shape[1]
    f32 = TensorProto.FLOAT
    inits = [helper.make_tensor(n, f32, [k], v) for n, k, v in
             (("bn_w", C, np.ones(C)), ("bn_b", C, np.zeros(C)), ("mean", C, np.zeros(C)), ("var", C, np.ones(C)),
              ("cn_w", G, np.ones(G)), ("cn_b", G, np.zeros(G)))]
    outputs = ["h", "running_mean", "running_var"] if training else ["h"]  # training_mode needs all three
    bn = helper.make_node("BatchNormalization", ["x", "bn_w", "bn_b", "mean", "var"], outputs, epsilon=1e-5,
                          momentum=0.9, training_mode=int(training))
    gn = helper.make_node("GroupNormalization", ["h", "cn_w", "cn_b"], ["y"], epsilon=1e-5, num_groups=G)
    graph = helper.make_graph([bn, gn], "bcn", [helper.make_tensor_value_info("x", f32, list(shape))],
                              [helper.make_tensor_value_info("y", f32, list(shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    return {"fwd": lambda: session.run(None, feed)}


def peers_table(shapes, measure, torch=None):
    """BCN with batch statistics (estimate=False), float32, per shape: bcnswift's allocating calls against each
    peer that is installed, all interleaved (`measure`); a peer that fails to build or to run records its error
    instead of a time."""
    threads = bcnswift.get_num_threads()
    if _importable("jax") and threads < (os.cpu_count() or 1):
        print(f"(JAX runs on all {os.cpu_count()} cores: XLA takes no thread count once loaded; the others on "
              f"{threads})")
    out = []
    for shape, G in shapes:
        x, dy = inputs(shape)
        layer = bcnswift.BatchChannelNorm(shape[1], G, estimate=False)
        evaluating = bcnswift.BatchChannelNorm(shape[1], G, estimate=False)
        evaluating(x)
        evaluating.eval()
        calls = ours_calls(layer, x, dy)
        fns = {"bcnswift fwd": calls["alloc fwd"], "bcnswift f+b": calls["alloc f+b"],
               "bcnswift eval fwd": lambda evaluating=evaluating: evaluating(x)}
        errors = {}

        def peer(name, build):
            try:
                peer_calls = build()
                for fn in peer_calls.values():
                    fn()  # compiles, and fails here rather than in the timing
            except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
                errors[f"{name} error"] = f"{type(e).__name__}: {str(e)[:120]}"
                return
            fns.update({f"{name} {k}": fn for k, fn in peer_calls.items()})

        if torch is not None:
            peer("authors eager", lambda: torch_calls(torch, torch_bcnorm(shape[1], G, False), x, dy))

            def compiled():
                torch._dynamo.reset()
                return torch_calls(torch, torch.compile(torch_bcnorm(shape[1], G, False)), x, dy)
            peer("authors compiled", compiled)
        if _importable("jax"):
            peer("jax jit", lambda: _jax_bcn(shape, G, x, dy))
        if _importable("onnxruntime") and _importable("onnx"):
            peer("onnxruntime train-form", lambda: _onnx_bcn(shape, G, x, True, threads))
            peer("onnxruntime eval-form", lambda: _onnx_bcn(shape, G, x, False, threads))
        samples = measure(fns)
        row = {"shape": list(shape), "G": G, **{f"{k} us": us(samples[k]) for k in fns if k.startswith("bcnswift")}}
        for key in fns:
            name, _, kind = key.rpartition(" ")
            if name.startswith("bcnswift"):
                continue
            # ONNX Runtime's eval form against bcnswift's eval forward; every other peer against the training calls
            base = "bcnswift eval fwd" if name == "onnxruntime eval-form" else f"bcnswift {kind}"
            row[f"{name} {kind} us"] = us(samples[key])
            row[f"{name}/bcn {kind}"] = ratio(samples[key], samples[base])
        row.update(errors)
        out.append(row)
    return out


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None
