"""The benchmark's tables beyond the main one: the row path, eval, channels-last input, and peers (the authors'
PyTorch BCNorm eager and under torch.compile, a jitted JAX BCN, ONNX Runtime). Each table is a list of dicts,
measured in one run with the same thread count; bench.py prints them and writes them with --json.
"""
import numpy as np

import bcnswift

#: [B, C] and small maps: the row layout (G = 32)
ROW_SHAPES = [((256, 1024), 32), ((64, 2048), 32), ((64, 512, 2, 2), 32), ((32, 256, 3, 3), 32),
              ((8, 1024, 4, 4), 32)]


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    return x, dy


def ours_times(layer, x, dy, timer):
    """(fwd, f+b) into preallocated outputs, and (fwd, f+b) allocating."""
    out, grad = np.empty_like(x), np.empty_like(x)

    def fb():
        layer(x, out=out)
        layer.backward(dy, out=grad)

    def fb_alloc():
        layer(x)
        layer.backward(dy)
    return (timer(lambda: layer(x, out=out)), timer(fb), timer(lambda: layer(x)), timer(fb_alloc))


def torch_bcnorm(num_channels, num_groups, estimate):
    """The authors' BCNorm (with EstBN moving at speed 0.1 when estimating), as in their repository."""
    from bcnswift.torch.reference import BCNorm

    m = BCNorm(num_channels, num_groups, 1e-5, estimate)
    if estimate:
        m.bn.estbn_moving_speed.fill_(0.1)
    return m


def _authors_eager(torch, shape, G, estimate, x, dy, timer):
    return torch_times(torch, torch_bcnorm(shape[1], G, estimate), x, dy, timer)


def torch_times(torch, m, x, dy, timer):
    """(fwd, f+b) of a torch module; [B, C] as [B, C, 1, 1], which the authors' BatchNorm2d needs."""
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
    return timer(f), timer(fb)


def rows_table(timer, copy_timer, torch=None):
    out = []
    for shape, G in ROW_SHAPES:
        x, dy = _inputs(shape)
        copy_t = copy_timer(x)
        for estimate in (True, False):
            fwd, fb, fwd_a, fb_a = ours_times(bcnswift.BatchChannelNorm(shape[1], G, estimate=estimate), x, dy, timer)
            row = {"shape": list(shape), "G": G, "estimate": estimate, "copy us": copy_t, "fwd us": fwd,
                   "fwd/copy": fwd / copy_t, "fwd+bwd us": fb, "f+b/copy": fb / copy_t}
            if torch is not None:
                t_f, t_fb = _authors_eager(torch, shape, G, estimate, x, dy, timer)
                row.update({"authors fwd us": t_f, "authors f+b us": t_fb, "authors/bcn fwd": t_f / fwd_a,
                            "authors/bcn f+b": t_fb / fb_a})
            out.append(row)
    return out


def eval_table(shapes, timer, copy_timer):
    out = []
    for shape, G in shapes:
        x, dy = _inputs(shape)
        copy_t = copy_timer(x)
        for estimate in (True, False):
            layer = bcnswift.BatchChannelNorm(shape[1], G, estimate=estimate)
            layer(x)  # running statistics from one batch, then eval
            layer.eval()
            y = np.empty_like(x)
            fwd = timer(lambda: layer(x, out=y))
            out.append({"shape": list(shape), "G": G, "estimate": estimate, "copy us": copy_t, "eval fwd us": fwd,
                        "eval fwd/copy": fwd / copy_t})
    return out


def channels_last_table(shapes, paired_timer):
    """The same logical tensor in NCHW and in channels-last memory, each `out=` call pair timed interleaved."""
    out = []
    for shape, G in shapes:
        if len(shape) < 3:
            continue
        x, dy = _inputs(shape)
        last = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)  # same values, channels-last memory
        dy_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(dy, 1, -1)), -1, 1)
        for estimate in (True, False):
            runs = []
            for xs, dys in ((x, dy), (last, dy_last)):
                layer = bcnswift.BatchChannelNorm(shape[1], G, estimate=estimate)
                y, dx = np.empty_like(xs), np.empty_like(xs)

                def fb(layer=layer, xs=xs, dys=dys, y=y, dx=dx):
                    layer(xs, out=y)
                    layer.backward(dys, out=dx)
                runs.append((lambda layer=layer, xs=xs, y=y: layer(xs, out=y), fb))
            fwd, cl_fwd = paired_timer(runs[0][0], runs[1][0])
            fb, cl_fb = paired_timer(runs[0][1], runs[1][1])
            out.append({"shape": list(shape), "G": G, "estimate": estimate, "NCHW fwd us": fwd,
                        "CL fwd us": cl_fwd, "CL/NCHW fwd": cl_fwd / fwd, "NCHW f+b us": fb,
                        "CL f+b us": cl_fb, "CL/NCHW f+b": cl_fb / fb})
    return out


# ---- peers --------------------------------------------------------------------------------------------------

def _jax_bcn(shape, G, x, dy, timer):
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
    return (timer(lambda: fwd(jx, *params).block_until_ready()),
            timer(lambda: jax.block_until_ready(grads(jx, *params))))


def _onnx_bcn(shape, G, x, training, threads, timer):
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
    return timer(lambda: session.run(None, feed))


def peers_table(shapes, timer, torch=None):
    """BCN with batch statistics (estimate=False), float32, per shape: bcnswift's allocating calls against each
    peer that is installed; a peer that fails records its error instead of a time."""
    threads = bcnswift.get_num_threads()
    out = []
    for shape, G in shapes:
        x, dy = _inputs(shape)
        layer = bcnswift.BatchChannelNorm(shape[1], G, estimate=False)
        _, _, fwd, fb = ours_times(layer, x, dy, timer)
        layer.eval()
        fwd_eval = timer(lambda: layer(x))
        row = {"shape": list(shape), "G": G, "bcnswift fwd us": fwd, "bcnswift f+b us": fb,
               "bcnswift eval fwd us": fwd_eval}

        def peer(name, measure, both=True, base=fwd):
            try:
                t = measure()
            except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
                row[f"{name} error"] = f"{type(e).__name__}: {str(e)[:120]}"
                return
            if both:
                row[f"{name} fwd us"], row[f"{name} f+b us"] = t
                row[f"{name}/bcn fwd"], row[f"{name}/bcn f+b"] = t[0] / fwd, t[1] / fb
            else:
                row[f"{name} fwd us"], row[f"{name}/bcn fwd"] = t, t / base

        if torch is not None:
            peer("authors eager", lambda: _authors_eager(torch, shape, G, False, x, dy, timer))

            def compiled():
                torch._dynamo.reset()
                return torch_times(torch, torch.compile(torch_bcnorm(shape[1], G, False)), x, dy, timer)
            peer("authors compiled", compiled)
        if _importable("jax"):
            peer("jax jit", lambda: _jax_bcn(shape, G, x, dy, timer))
        if _importable("onnxruntime") and _importable("onnx"):
            peer("onnxruntime train-form", lambda: _onnx_bcn(shape, G, x, True, threads, timer), both=False)
            peer("onnxruntime eval-form", lambda: _onnx_bcn(shape, G, x, False, threads, timer), both=False,
                 base=fwd_eval)
        out.append(row)
    return out


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None
