"""The NumPy fast paths (xpconv/kernels/numpy_ops.py) give the generic path's results.

Every kernel numpy_ops registers is run against the reference classes in xpconv.ops
(``impl=ops.GENERIC``) on random inputs: odd sizes, strides 1-3, pads 0-2,
non-square filters and pools, float32 and float64, forward and backward (with and
without dL/dx), in one batch slice and in many (``CHUNK_BYTES`` shrunk so every
sample is its own GEMM).  At model level, the fused Convolution->Relu[->Pooling]
steps of ``Sequential`` give the same loss and gradients as the unfused layers run
one by one on the generic path.
"""

from __future__ import annotations

import numpy as np
import pytest

from xpconv import kernels, layers, ops
from xpconv.kernels import numpy_ops
from xpconv.models import DeepConvNet, SimpleConvNet

DTYPES = ("float32", "float64")
# (N, C, H, W, FN, FH, FW, stride, pad): odd sizes, strides 1-3, pads 0-2, non-square filters
CONV_CASES = [
    (3, 2, 7, 9, 4, 3, 2, 1, 0),
    (2, 3, 8, 5, 5, 2, 3, (2, 1), (1, 2)),
    (1, 1, 11, 10, 3, 5, 4, 3, 2),
    (4, 3, 6, 6, 2, 1, 1, 2, 1),
    (2, 2, 9, 7, 3, 3, 3, (3, 2), (2, 0)),
    (5, 1, 12, 12, 6, 5, 5, 1, 0),
]
# (N, C, H, W, ph, pw, stride, pad)
POOL_CASES = [
    (2, 3, 6, 6, 2, 2, 2, 0),
    (3, 2, 7, 5, 3, 2, 1, 0),
    (2, 2, 8, 9, 3, 3, 2, 1),
    (2, 3, 9, 7, 2, 3, 3, 2),
    (1, 2, 5, 5, 2, 2, (1, 2), (1, 0)),
]
# conv case + (ph, pw, pool stride, pool pad): tiling pools take the fused kernel,
# the others the composed one (conv+relu kernel, then the max-pool kernel)
FUSED_CASES = [
    ((3, 2, 9, 9, 4, 3, 3, 1, 1), (2, 2, 2, 0)),  # 9x9 out: the last row/column is cut off
    ((2, 3, 10, 8, 5, 3, 2, 1, 0), (2, 3, (2, 3), 0)),  # non-square tiling pool
    ((2, 1, 13, 11, 3, 4, 3, (2, 1), 2), (3, 3, 3, 0)),
    ((2, 2, 8, 8, 3, 3, 3, 1, 1), (3, 3, 2, 0)),  # overlapping windows: composed
    ((2, 2, 7, 9, 3, 2, 2, 1, 0), (2, 2, 2, 1)),  # padded pool: composed
]


@pytest.fixture(autouse=True)
def numpy_kernels_registered(monkeypatch):
    """These tests are about numpy_ops: where an optional module (numba_ops, when numba
    is installed) registered a kernel in a NumPy kernel's place, the NumPy kernel is put
    back for the test (tests/test_numba_kernels.py tests the replacements)."""
    kernels.find("numpy", "conv2d")  # loads the namespace's modules
    for key, k in list(kernels.REGISTRY.items()):
        if key[0] == "numpy" and hasattr(k, "replaces"):
            monkeypatch.setitem(kernels.REGISTRY, key, k.replaces)


@pytest.fixture(params=["one-slice", "slice-per-sample", "slices-on-3-threads"])
def chunking(request, monkeypatch):
    """Run every kernel with its default batch slices, with one sample per GEMM, and
    with the slices spread over worker threads (XPCONV_NUM_THREADS)."""
    monkeypatch.delenv(numpy_ops.THREADS_ENV, raising=False)
    if request.param != "one-slice":
        monkeypatch.setattr(numpy_ops, "CHUNK_BYTES", 1)
    if request.param == "slices-on-3-threads":
        monkeypatch.setenv(numpy_ops.THREADS_ENV, "3")
    return request.param


def test_worker_threads_setting(monkeypatch):
    monkeypatch.setenv(numpy_ops.THREADS_ENV, "two")
    with pytest.raises(ValueError, match="XPCONV_NUM_THREADS: expected a whole number >= 1"):
        numpy_ops._workers()
    monkeypatch.setenv(numpy_ops.THREADS_ENV, "2")
    assert numpy_ops._workers() == 2
    seen = numpy_ops._for_slices(10, 100, lambda a, b: (a, b))
    assert seen == [(0, 3), (3, 6), (6, 9), (9, 10)]  # ordered, at least two slices per worker
    monkeypatch.delenv(numpy_ops.THREADS_ENV)
    assert numpy_ops._for_slices(10, 4, lambda a, b: (a, b)) == [(0, 4), (4, 8), (8, 10)]


def tol(dtype):
    return {"rtol": 2e-4, "atol": 2e-5} if dtype == "float32" else {"rtol": 1e-10, "atol": 1e-12}


def close(got, want, dtype, what):
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    np.testing.assert_allclose(got, want, err_msg=what, **tol(dtype))


def run_both(fn):
    """fn(impl) with the registered NumPy kernels (impl=None) and with the reference
    (impl=GENERIC): (fast result, generic result)."""
    return fn(None), fn(ops.GENERIC)


def made_by(cache, namespace):
    return cache.kernel.namespace == namespace


def conv_inputs(rng, case, dtype):
    N, C, H, W, FN, FH, FW, stride, pad = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = (rng.standard_normal((FN, C, FH, FW)) * 0.5).astype(dtype)
    b = (rng.standard_normal(FN) * 0.1).astype(dtype)
    return x, Wt, b, stride, pad


def test_numpy_kernels_are_registered():
    """The tests below exercise real kernels, not the generic code twice: every op of
    xpconv.ops has a NumPy kernel, registered under its op name, with the reference's parameters."""
    import inspect

    # ReLU and softmax + cross-entropy are one NumPy pass each already: there is no
    # launch to save on the host, so NumPy runs their reference (the CuPy path fuses them)
    window_ops = {op: ref for op, ref in ops.REFERENCE.items() if op not in ("relu", "softmax_cross_entropy")}
    assert set(window_ops) == set(ops.REFERENCE) - {"relu", "softmax_cross_entropy"} and len(window_ops) == 5
    assert sorted(numpy_ops.__all__) == sorted(type(k).__name__ for k in window_ops.values())
    for op in ("relu", "softmax_cross_entropy"):
        assert kernels.find("numpy", op) is None
    for op, ref in window_ops.items():
        k = kernels.find("numpy", op)
        assert type(k) is getattr(numpy_ops, type(ref).__name__), op
        assert (k.namespace, k.op) == ("numpy", op)
        for method in ("forward", "backward"):
            assert inspect.signature(getattr(k, method)).parameters.keys() == inspect.signature(getattr(ref, method)).parameters.keys(), (op, method)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES + [c[0] for c in FUSED_CASES])
def test_im2col_equals_generic(rng, case, dtype):
    x, Wt, _, stride, pad = conv_inputs(rng, case, dtype)
    FH, FW = Wt.shape[2:]
    fast, ref = run_both(lambda impl: ops.im2col(x, FH, FW, stride, pad, impl=impl))
    np.testing.assert_array_equal(fast, ref)
    fast, ref = run_both(lambda impl: ops.im2col(x, FH, FW, stride, pad, pad_value=-np.inf, impl=impl))
    np.testing.assert_array_equal(fast, ref)
    # col2im, im2col's adjoint and backward: the same sums in the same order
    col = rng.standard_normal(fast.shape).astype(dtype)
    fast, ref = run_both(lambda impl: ops.col2im(col, x.shape, FH, FW, stride, pad, impl=impl))
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_backward_equal_generic(rng, chunking, case, relu, dtype):
    x, Wt, b, stride, pad = conv_inputs(rng, case, dtype)
    N, FN = x.shape[0], Wt.shape[0]

    def run(impl):
        out, cache = ops.conv2d_forward(x, Wt, b, stride, pad, relu=relu, impl=impl)
        dout = np.random.default_rng(7).standard_normal(out.shape).astype(dtype)
        return out, cache, ops.conv2d_backward(dout, cache), ops.conv2d_backward(dout, cache, need_dx=False)

    (out, cache, grads, grads_nodx), (rout, rcache, rgrads, rgrads_nodx) = run_both(run)
    assert made_by(cache, "numpy") and made_by(rcache, ops.GENERIC), "expected the kernel on the fast path only"
    close(np.asarray(out), rout, dtype, "conv out")
    for got, want, name in zip(grads, rgrads, ("dx", "dW", "db")):
        close(np.asarray(got), want, dtype, name)
    assert grads_nodx[0] is None and rgrads_nodx[0] is None
    close(grads_nodx[1], rgrads[1], dtype, "dW (need_dx=False)")
    close(grads_nodx[2], rgrads[2], dtype, "db (need_dx=False)")
    assert out.shape[:2] == (N, FN)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_forward_backward_equal_generic(rng, case, kind, dtype):
    N, C, H, W, ph, pw, stride, pad = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    x[0, 0, :2, :2] = 0.5  # a tie: the first maximum wins on both paths
    fwd, bwd = (ops.max_pool2d_forward, ops.max_pool2d_backward) if kind == "max" else (ops.avg_pool2d_forward, ops.avg_pool2d_backward)

    def run(impl):
        out, cache = fwd(x, ph, pw, stride, pad, impl=impl)
        dout = np.random.default_rng(3).standard_normal(out.shape).astype(dtype)
        return out, cache, bwd(dout, cache)

    (out, cache, dx), (rout, rcache, rdx) = run_both(run)
    assert made_by(cache, "numpy") and made_by(rcache, ops.GENERIC)
    close(np.asarray(out), rout, dtype, f"{kind}-pool out")
    close(np.asarray(dx), rdx, dtype, f"{kind}-pool dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,pool", FUSED_CASES)
def test_fused_conv_relu_maxpool_equals_generic(rng, chunking, case, pool, dtype):
    x, Wt, b, stride, pad = conv_inputs(rng, case, dtype)
    ph, pw, ps, pp = pool

    def run(impl):
        out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, ph, pw, ps, pp, impl=impl)
        dout = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
        infer, _ = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, ph, pw, ps, pp, training=False, impl=impl)
        grads = ops.conv2d_relu_max_pool2d_backward(dout, cache)
        nodx = ops.conv2d_relu_max_pool2d_backward(dout, cache, need_dx=False)
        return out, infer, cache, grads, nodx

    (out, infer, cache, grads, nodx), (rout, _, rcache, rgrads, rnodx) = run_both(run)
    assert made_by(cache, "numpy") and made_by(rcache, ops.GENERIC)
    close(np.asarray(out), rout, dtype, "fused out")
    close(np.asarray(infer), rout, dtype, "fused out (training=False)")
    for got, want, name in zip(grads, rgrads, ("dx", "dW", "db")):
        close(np.asarray(got), want, dtype, f"fused {name}")
    assert nodx[0] is None and rnodx[0] is None
    close(nodx[1], rgrads[1], dtype, "fused dW (need_dx=False)")
    close(nodx[2], rgrads[2], dtype, "fused db (need_dx=False)")

    # and the same as the three unfused reference ops one after the other
    G = ops.GENERIC
    z, c1 = ops.conv2d_forward(x, Wt, b, stride, pad, impl=G)
    mask = (z > 0).astype(dtype)
    p, c2 = ops.max_pool2d_forward(z * mask, ph, pw, ps, pp, impl=G)
    dout = np.random.default_rng(5).standard_normal(p.shape).astype(dtype)
    dx, dW, db = ops.conv2d_backward(ops.max_pool2d_backward(dout, c2) * mask, c1)
    close(np.asarray(out), p, dtype, "fused vs unfused out")
    for got, want, name in zip(grads, (dx, dW, db), ("dx", "dW", "db")):
        close(np.asarray(got), want, dtype, f"fused vs unfused {name}")


def test_fused_relu_dead_windows_get_no_gradient(rng):
    """A pool window whose pre-activations are all negative outputs 0 and passes no
    gradient on either path (the fused kernel takes the arg-max before the ReLU)."""
    x = rng.standard_normal((2, 1, 6, 6)).astype("float32")
    Wt = np.zeros((2, 1, 1, 1), "float32")
    Wt[0] = 1.0
    b = np.array([-100.0, 0.0], "float32")  # channel 0 all dead, channel 1 all exactly 0

    def run(impl):
        out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, 1, 0, 2, 2, 2, impl=impl)
        return out, ops.conv2d_relu_max_pool2d_backward(np.ones(out.shape, "float32"), cache)

    (out, (dx, dW, db)), (rout, (rdx, rdW, rdb)) = run_both(run)
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(rout, 0)
    for got, want in ((dx, rdx), (dW, rdW), (db, rdb)):
        np.testing.assert_array_equal(got, 0)
        np.testing.assert_array_equal(want, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ties_route_the_gradient_to_the_first_maximum(rng, dtype):
    """Windows of equal positive values: dx goes to each window's first member on
    both paths (as argmax), not spread or sent to the last one."""
    x = np.kron(rng.uniform(1, 2, (2, 1, 3, 4)), np.ones((2, 2))).astype(dtype)  # constant 2x2 blocks
    Wt = np.ones((3, 1, 1, 1), dtype)
    b = np.zeros(3, dtype)

    def run(impl):
        out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, 1, 0, 2, 2, 2, impl=impl)
        return ops.conv2d_relu_max_pool2d_backward(np.ones(out.shape, dtype), cache)[0]

    dx, rdx = run_both(run)
    close(np.asarray(dx), rdx, dtype, "dx with ties")
    np.testing.assert_array_equal(np.asarray(rdx)[:, :, ::2, ::2], 3)  # 3 filters each send 1
    np.testing.assert_array_equal(np.asarray(rdx)[:, :, 1::2, :], 0)


def test_kernel_outputs_feed_the_generic_path_and_back(rng):
    """Kernel outputs are NCHW views of channel-major memory; the generic code takes
    them as inputs, and the kernels take generic (C-contiguous NCHW) outputs."""
    x, Wt, b, stride, pad = conv_inputs(rng, (3, 2, 8, 7, 4, 3, 3, 1, 1), "float64")
    out, _ = ops.conv2d_forward(x, Wt, b, stride, pad, relu=True)
    assert not out.flags.c_contiguous  # the layout the next kernel reads fast
    W2 = rng.standard_normal((3, 4, 2, 2))
    b2 = rng.standard_normal(3)
    fast, ref = run_both(lambda impl: ops.conv2d_forward(out, W2, b2, 2, 0, impl=impl)[0])
    close(np.asarray(fast), ref, "float64", "conv of a kernel output")
    gen, _ = ops.conv2d_forward(x, Wt, b, stride, pad, relu=True, impl=ops.GENERIC)
    fast2, _ = ops.conv2d_forward(np.ascontiguousarray(gen), W2, b2, 2, 0)
    close(np.asarray(fast2), ref, "float64", "kernel on a generic output")


def test_backward_follows_the_kernel_that_ran_the_forward(rng):
    """A cache holds the kernel that made it: the backward is that kernel's (and gives
    the generic gradients); a cache of another op is refused with the op named."""
    x, Wt, b, stride, pad = conv_inputs(rng, (2, 2, 7, 7, 3, 3, 3, 1, 1), "float64")
    out, cache = ops.conv2d_forward(x, Wt, b, stride, pad)
    _, rcache = ops.conv2d_forward(x, Wt, b, stride, pad, impl=ops.GENERIC)
    assert cache.kernel is kernels.find("numpy", "conv2d") and rcache.kernel is ops.REFERENCE["conv2d"]
    dout = rng.standard_normal(out.shape)
    dx, dW, db = ops.conv2d_backward(dout, cache)
    rdx, rdW, rdb = ops.conv2d_backward(dout, rcache)
    for got, want, name in ((dx, rdx, "dx"), (dW, rdW, "dW"), (db, rdb, "db")):
        close(np.asarray(got), want, "float64", name)
    _, pool_cache = ops.avg_pool2d_forward(x, 2, 2, 2)
    with pytest.raises(TypeError, match="max_pool2d_backward: expected the cache of max_pool2d_forward"):
        ops.max_pool2d_backward(dout, pool_cache)
    with pytest.raises(TypeError, match="conv2d_relu_max_pool2d_backward: expected the cache"):
        ops.conv2d_relu_max_pool2d_backward(dout, cache)
    with pytest.raises(TypeError, match="conv2d_backward: expected the cache"):
        ops.conv2d_backward(dout, cache.state)  # the bare state, not a cache
    _, none = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, 1, 1, 2, 2, 2, training=False)
    with pytest.raises(RuntimeError, match="training=False"):
        ops.conv2d_relu_max_pool2d_backward(dout, none)


def test_impl_chooses_the_implementation(rng):
    x, Wt, b, stride, pad = conv_inputs(rng, (2, 2, 7, 7, 3, 3, 3, 1, 1), "float64")
    k = kernels.find("numpy", "conv2d")
    assert ops.conv2d_forward(x, Wt, b, impl=k)[1].kernel is k
    assert ops.conv2d_forward(x, Wt, b, impl=ops.GENERIC)[1].kernel is ops.REFERENCE["conv2d"]
    with pytest.raises(ValueError, match="expected a kernel for 'conv2d', got one for 'max_pool2d'"):
        ops.conv2d_forward(x, Wt, b, impl=kernels.find("numpy", "max_pool2d"))
    with pytest.raises(ValueError, match="impl must be None, 'generic' or a kernel object"):
        ops.conv2d_forward(x, Wt, b, impl="fast")


def test_float32_stays_float32(rng):
    x, Wt, b, stride, pad = conv_inputs(rng, (2, 2, 8, 8, 3, 3, 3, 1, 0), "float32")
    out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, 2, 2, 2)
    grads = ops.conv2d_relu_max_pool2d_backward(np.ones(out.shape, "float32"), cache)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)


# ---------------------------------------------------------------------- model level


def _set_impl(net, impl):
    """Run every window layer of ``net`` (and so its fused blocks) with ``impl``."""
    for layer in net.layers:
        if isinstance(layer, (layers.Convolution, layers.Pooling, layers.AvgPooling)):
            layer.impl = impl


def _unfused_gradient(net, x, t):
    """Loss and gradients of ``net`` with every layer run on its own, on the generic path."""
    _set_impl(net, ops.GENERIC)
    try:
        h = x
        for layer in net.layers:
            h = layer.forward(h, True)
        loss = net.last_layer.forward(h, t)
        d = net.last_layer.backward(1.0)
        for layer in reversed(net.layers):
            d = layer.backward(d)
    finally:
        _set_impl(net, None)
    return float(loss), {k: np.array(getattr(layer, "d" + attr)) for k, (layer, attr) in net._slots.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["simple", "deep"])
def test_fused_model_equals_unfused_generic_layers(rng, model, dtype):
    if model == "simple":
        net = SimpleConvNet(input_dim=(2, 13, 11), conv_param={"filter_num": 5, "filter_size": 3, "pad": 1, "stride": 1},
                            hidden_size=7, weight_init_std=0.3, dtype=dtype, seed=1)
        kinds = [layers.ConvBlock, layers.Affine, layers.Relu, layers.Affine]
    else:
        net = DeepConvNet(input_dim=(1, 12, 12), hidden_size=9, dropout_ratio=0.0, dtype=dtype, seed=1)
        kinds = [layers.ConvBlock] * 6 + [layers.Affine, layers.Relu, layers.Dropout, layers.Affine, layers.Dropout]
    x = rng.standard_normal((4,) + tuple(net.config["input_dim"])).astype(dtype)
    t = rng.integers(0, 10, 4)
    ref_loss, ref = _unfused_gradient(net, x, t)
    grads = net.gradient(x, t)
    assert [type(s) for s in net.steps] == kinds
    blocks = [s for s in net.steps if isinstance(s, layers.ConvBlock)]
    assert all(blk._cache.kernel.namespace == "numpy" for blk in blocks), "the model should run the NumPy kernels"
    assert float(net.loss(x, t)) == pytest.approx(ref_loss, rel=1e-5 if dtype == "float32" else 1e-12)
    assert set(grads) == set(ref)
    for k in ref:
        close(np.asarray(grads[k]), ref[k], dtype, f"{model} {k}")
    # inference (training=False keeps nothing) gives the training forward's scores
    _set_impl(net, ops.GENERIC)
    want = np.asarray(net.predict(x))
    _set_impl(net, None)
    close(np.asarray(net.predict(x)), want, dtype, f"{model} predict")


def test_fuse_groups_conv_relu_pool_only():
    conv = layers.Convolution(np.zeros((2, 1, 3, 3), "float32"), np.zeros(2, "float32"))
    conv2 = layers.Convolution(np.zeros((2, 2, 3, 3), "float32"), np.zeros(2, "float32"))
    relu, relu2, pool, avg = layers.Relu(), layers.Relu(), layers.Pooling(2, 2, 2), layers.AvgPooling(2, 2, 2)
    steps = layers.fuse([conv, relu, pool, conv2, relu2, avg])
    assert [type(s) for s in steps] == [layers.ConvBlock, layers.ConvBlock, layers.AvgPooling]
    assert steps[0].pool is pool and steps[1].pool is None
    assert layers.fuse([conv, pool, relu]) == [conv, pool, relu]


def test_fusion_is_decided_once_when_the_model_is_built(rng):
    net = SimpleConvNet(input_dim=(1, 8, 8), conv_param={"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=4, seed=0)
    steps = list(net.steps)
    block = steps[0]
    assert isinstance(block, layers.ConvBlock) and block.conv is net.layers[0] and block.pool is net.layers[2]
    x = rng.standard_normal((2, 1, 8, 8)).astype("float32")
    net.gradient(x, np.array([1, 2]))
    net.predict(x)
    assert all(a is b for a, b in zip(net.steps, steps)) and len(net.steps) == len(steps)
    assert "ConvBlock(Convolution(1->2, 3x3" in repr(block)


# --------------------------------------------------------------------------- Winograd F(2x2,3x3)

# DeepConvNet's six layers at 1x28x28 (batch cut to 3): (N, C, H, W, FN, FH, FW, stride, pad), pooled?
DEEP_LAYERS = [
    ((3, 1, 28, 28, 16, 3, 3, 1, 1), False),
    ((3, 16, 28, 28, 16, 3, 3, 1, 1), True),
    ((3, 16, 14, 14, 32, 3, 3, 1, 1), False),
    ((3, 32, 14, 14, 32, 3, 3, 1, 2), True),
    ((3, 32, 8, 8, 64, 3, 3, 1, 1), False),
    ((3, 64, 8, 8, 64, 3, 3, 1, 1), True),
]
# odd sizes for the Winograd path: odd channel counts, H != W, pads 0-2, one sample;
# the last two have odd output sizes and must fall back to the im2col GEMM
WINOGRAD_ODD = [
    ((2, 3, 6, 10, 5, 3, 3, 1, 0), True),
    ((1, 5, 8, 6, 3, 3, 3, 1, 2), True),
    ((4, 7, 12, 8, 9, 3, 3, 1, 1), True),
    ((2, 3, 7, 9, 4, 3, 3, 1, 1), False),
    ((2, 2, 9, 8, 3, 3, 3, 1, 2), False),
]


@pytest.fixture
def winograd_spy(monkeypatch):
    """Winograd for every channel count (WINOGRAD_MIN_C = 1), counting its slices."""
    calls = []
    real = numpy_ops._winograd_blocks
    monkeypatch.setattr(numpy_ops, "WINOGRAD_MIN_C", 1)
    monkeypatch.setattr(numpy_ops, "_winograd_blocks", lambda *a: calls.append(a[-2:]) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,winograd", WINOGRAD_ODD + [(c, p) for c, p in DEEP_LAYERS if p])
def test_winograd_fused_forward_equals_generic(rng, chunking, winograd_spy, case, winograd, dtype):
    """The fused conv-relu-max-pool forward as Winograd F(2x2,3x3) gives the reference's
    output, and its cache the reference's gradients (the backward reads the arg-max and
    the ReLU mask that the Winograd forward left).  Tolerances: float32 rtol 2e-4 /
    atol 2e-5, float64 rtol 1e-10 / atol 1e-12 (measured: relative error to the largest
    output ~5e-7 in float32, ~1e-15 in float64)."""
    x, Wt, b, stride, pad = conv_inputs(rng, case, dtype)

    def run(impl):
        out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, 2, 2, 2, impl=impl)
        infer, _ = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, 2, 2, 2, training=False, impl=impl)
        dout = np.random.default_rng(7).standard_normal(out.shape).astype(dtype)
        return out, infer, ops.conv2d_relu_max_pool2d_backward(dout, cache)

    (out, infer, grads), (rout, _, rgrads) = run_both(run)
    assert bool(winograd_spy) == winograd, f"Winograd ran {len(winograd_spy)} slices, expected it to run: {winograd}"
    if winograd and chunking != "one-slice":
        assert len(winograd_spy) == 2 * case[0], "expected one Winograd slice per sample (two forwards)"
    close(np.asarray(out), rout, dtype, "winograd out")
    close(np.asarray(infer), rout, dtype, "winograd out (training=False)")
    for got, want, name in zip(grads, rgrads, ("dx", "dW", "db")):
        close(np.asarray(got), want, dtype, f"winograd {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,pooled", DEEP_LAYERS)
def test_deepconvnet_layers_equal_generic(rng, case, pooled, dtype):
    """Every DeepConvNet layer shape with the default dispatch (Winograd where
    WINOGRAD_MIN_C allows, else the im2col GEMM): forward and backward as the reference."""
    x, Wt, b, stride, pad = conv_inputs(rng, case, dtype)

    def run(impl):
        if pooled:
            out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, 2, 2, 2, impl=impl)
            back = ops.conv2d_relu_max_pool2d_backward
        else:
            out, cache = ops.conv2d_forward(x, Wt, b, stride, pad, relu=True, impl=impl)
            back = ops.conv2d_backward
        dout = np.random.default_rng(3).standard_normal(out.shape).astype(dtype)
        return out, back(dout, cache), back(dout, cache, need_dx=False)

    (out, grads, nodx), (rout, rgrads, rnodx) = run_both(run)
    close(np.asarray(out), rout, dtype, "out")
    for got, want, name in zip(grads, rgrads, ("dx", "dW", "db")):
        close(np.asarray(got), want, dtype, name)
    assert nodx[0] is None and rnodx[0] is None
    close(nodx[1], rgrads[1], dtype, "dW (need_dx=False)")
