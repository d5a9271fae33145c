"""The Numba kernels (xpconv/kernels/numba_ops.py, installed with xpconv where Numba publishes wheels)
give the generic path's results, and take the NumPy kernels' place explicitly.

Skipped only when numba is not installed (the ``test`` extra installs it).  Every
DeepConvNet layer shape and odd ones (channel counts that fill no register block, H !=
W, odd output sizes under a 2x2 pool, pads 0-3, one sample), SimpleConvNet's 5x5 pad-0
layer and odd 5x5 ones (pads 0-4), float32 and float64,
forward (training and inference) and backward with and without dL/dx, against the
reference classes in xpconv.ops (``impl=ops.GENERIC``); the cases the kernels leave to
the NumPy kernels (stride, no pad, other filters and pools) too; and whole models.  Every
instruction-set variant (AVX2's 8 x 8 blocks, AVX-512's 16 x 16 with and without 512-bit
vectors) runs the equality tests in a process of its own with Numba's target forced
(``test_every_isa_variant_equals_generic``; a variant the CPU cannot execute is skipped).
Tolerances as tests/test_numpy_kernels.py: float32 rtol 2e-4 / atol 2e-5, float64
rtol 1e-10 / atol 1e-12.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from xpconv import kernels, layers, ops  # noqa: E402
from xpconv.kernels import numba_ops, numpy_ops  # noqa: E402
from xpconv.models import DeepConvNet  # noqa: E402

DTYPES = ("float32", "float64")
# (N, C, H, W, FN, stride, pad), 3x3 filters: DeepConvNet's layers (batch cut to 3), then odd ones
DEEP = [
    (3, 1, 28, 28, 16, 1, 1),
    (3, 16, 28, 28, 16, 1, 1),
    (3, 16, 14, 14, 32, 1, 1),
    (3, 32, 14, 14, 32, 1, 2),
    (3, 32, 8, 8, 64, 1, 1),
    (3, 64, 8, 8, 64, 1, 1),
]
ODD = [
    (2, 3, 7, 9, 5, 1, 1),  # 7x9 out: a 2x2 pool cuts the last row
    (1, 5, 6, 11, 20, 1, 2),  # 20 filters: one full block of 16 and one of 4
    (4, 17, 5, 5, 33, 1, 1),  # 17 channels (dx: a block of 16 and one of 1), 33 filters
    (2, 2, 4, 10, 3, 1, 3),  # pad 3
    (1, 1, 3, 3, 1, 1, 1),
    (2, 2, 8, 8, 3, 1, 0),  # no pad: dz's border is K - 1 = 2, dx reads from its corner
    (2, 17, 6, 9, 33, 1, 0),
]
# (N, C, H, W, FN, stride, pad), 5x5 filters: SimpleConvNet's layer (batch cut to 3), then odd ones
FIVE = [
    (3, 1, 28, 28, 30, 1, 0),
    (2, 3, 9, 11, 5, 1, 0),  # 5x7 out: a 2x2 pool cuts the last row
    (2, 2, 10, 7, 17, 1, 1),  # 17 filters: a block of 16 and one of 1; dz's border 3
    (1, 4, 7, 7, 40, 1, 2),  # 40 filters: a pair of blocks (float32 dW) and a single one
    (2, 5, 6, 5, 3, 1, 4),  # pad 4 = K - 1: no border
    (1, 17, 5, 5, 16, 1, 3),  # pad past K - 1; 17 channels
    (1, 2, 50, 50, 3, 1, 0),  # more positions per sample than dW's tile (QB)
]
# what numba_ops leaves to numpy_ops: (N, C, H, W, FN, FH, FW, stride, pad)
NOT_COVERED = [
    (2, 3, 9, 9, 4, 3, 3, 2, 1),
    (2, 3, 8, 8, 4, 7, 7, 1, 3),  # 7x7: not in KERNEL_SIZES
    (2, 2, 9, 8, 3, 1, 1, 1, 0),
    (2, 2, 9, 8, 3, 5, 5, 2, 0),
    (2, 2, 8, 8, 3, 3, 3, 1, (1, 2)),
    (2, 2, 8, 7, 3, 3, 2, 1, 1),
]


def tol(dtype):
    return {"rtol": 2e-4, "atol": 2e-5} if dtype == "float32" else {"rtol": 1e-10, "atol": 1e-12}


#: the absolute tolerance's share of the largest reference magnitude: an element of dW that
#: cancels to ~0.06 among elements of ~80 carries the rounding of the ~80-sized terms it sums
#: (3e-5 in float32 between two correct summation orders)
SCALE_TOL = {"float32": 1e-5, "float64": 1e-13}


def close(got, want, dtype, what):
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    t = tol(dtype)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, err_msg=what, rtol=t["rtol"], atol=t["atol"] + SCALE_TOL[str(np.dtype(dtype))] * scale)


def inputs(rng, case, dtype, F=(3, 3)):
    N, C, H, W, FN = case[:5]
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = (rng.standard_normal((FN, C) + F) * 0.5).astype(dtype)
    b = (rng.standard_normal(FN) * 0.1).astype(dtype)
    return x, Wt, b


def by_numba(cache):
    return isinstance(cache.kernel, numba_ops.Conv2d | numba_ops.Conv2dReluMaxPool2d) and isinstance(cache.state, numba_ops._State)


def test_numba_kernels_replace_the_numpy_ones():
    """find() gives the Numba kernel for the two convolution ops it covers, which keeps the
    NumPy kernel it replaced, and Adam's fused update; every other op keeps its NumPy kernel."""
    for op, cls, old in (
        ("conv2d", numba_ops.Conv2d, numpy_ops.Conv2d),
        ("conv2d_relu_max_pool2d", numba_ops.Conv2dReluMaxPool2d, numpy_ops.Conv2dReluMaxPool2d),
    ):
        k = kernels.find("numpy", op)
        assert type(k) is cls and type(k.replaces) is old and (k.namespace, k.op) == ("numpy", op)
    for op in ("im2col", "max_pool2d", "avg_pool2d"):
        assert type(kernels.find("numpy", op)).__module__ == numpy_ops.__name__
    assert type(kernels.find("numpy", "adam_update")) is numba_ops.AdamUpdate


def test_register_says_what_it_replaces(monkeypatch):
    monkeypatch.setattr(kernels, "REGISTRY", dict(kernels.REGISTRY))
    with pytest.raises(ValueError, match=r"expected the kernel registered before to be none, got Conv2d"):
        kernels.register("numpy", "conv2d")(type("Other", (), {}))
    with pytest.raises(ValueError, match=r"expected the kernel registered before to be MaxPool2d, got Conv2d"):
        kernels.register("numpy", "conv2d", replaces=numpy_ops.MaxPool2d)(type("Other", (), {}))
    kernels.register("numpy", "newop")(type("New", (), {}))
    assert type(kernels.REGISTRY[("numpy", "newop")]).__name__ == "New"


def test_environment_switch_leaves_the_numpy_kernels():
    code = "from xpconv import kernels; print(type(kernels.find('numpy', 'conv2d')).__module__)"
    env = dict(os.environ, XPCONV_NUMBA="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "xpconv.kernels.numpy_ops"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("case", DEEP + ODD)
def test_conv_equals_generic(rng, case, pooled, dtype):
    check_equals_generic(rng, case, pooled, dtype, 3)


@pytest.mark.parametrize("direct_pool", [False, True], ids=["full-dz", "direct-pool"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("case", FIVE)
def test_conv_5x5_equals_generic(rng, case, pooled, dtype, direct_pool, monkeypatch):
    """5x5 filters; pooled without dx, dW through the full dz buffer or (``DIRECT_POOL``,
    the default) straight from the pool's routing (``_dw_pool``): both against the reference."""
    monkeypatch.setattr(numba_ops, "DIRECT_POOL", direct_pool)
    check_equals_generic(rng, case, pooled, dtype, 5)


def check_equals_generic(rng, case, pooled, dtype, K):
    x, Wt, b = inputs(rng, case, dtype, F=(K, K))
    stride, pad = case[5:]
    if pooled and min(x.shape[2] + 2 * pad - K + 1, x.shape[3] + 2 * pad - K + 1) < 2:
        pytest.skip("output smaller than the pool window")

    def run(impl):
        if pooled:
            out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, 2, 2, 2, impl=impl)
            infer, _ = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, 2, 2, 2, training=False, impl=impl)
            back = ops.conv2d_relu_max_pool2d_backward
        else:
            out, cache = ops.conv2d_forward(x, Wt, b, stride, pad, relu=True, impl=impl)
            infer = ops.conv2d_forward(x, Wt, b, stride, pad, relu=False, impl=impl)[0]
            back = ops.conv2d_backward
        dout = np.random.default_rng(3).standard_normal(out.shape).astype(dtype)
        return out, infer, cache, back(dout, cache), back(dout, cache, need_dx=False)

    (out, infer, cache, grads, nodx), (rout, rinfer, _, rgrads, rnodx) = run(None), run(ops.GENERIC)
    assert by_numba(cache), "expected the Numba kernel to run"
    close(out, rout, dtype, "out")
    close(infer, rinfer, dtype, "out (inference / no ReLU)")
    for got, want, name in zip(grads, rgrads, ("dx", "dW", "db")):
        close(got, want, dtype, name)
    assert nodx[0] is None and rnodx[0] is None
    close(nodx[1], rgrads[1], dtype, "dW (need_dx=False)")
    close(nodx[2], rgrads[2], dtype, "db (need_dx=False)")


def test_conv_without_relu_passes_negative_values(rng):
    x, Wt, b = inputs(rng, DEEP[2], "float64")
    out, cache = ops.conv2d_forward(x, Wt, b, 1, 1)
    assert by_numba(cache) and float(np.min(out)) < 0
    d = np.random.default_rng(1).standard_normal(out.shape)
    rout, rcache = ops.conv2d_forward(x, Wt, b, 1, 1, impl=ops.GENERIC)
    close(out, rout, "float64", "out")
    for got, want, name in zip(ops.conv2d_backward(d, cache), ops.conv2d_backward(d, rcache), ("dx", "dW", "db")):
        close(got, want, "float64", name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_ties_route_the_gradient_to_the_first_maximum(rng, dtype):
    """A window of equal values (here all inputs 0, so every output is the bias): the
    gradient goes to its first member, as the reference's arg-max."""
    x = np.zeros((2, 3, 6, 6), dtype)
    Wt = (rng.standard_normal((4, 3, 3, 3))).astype(dtype)
    b = np.array([0.5, -0.5, 1.0, 0.25], dtype)
    out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, 1, 1, 2, 2, 2)
    rout, rcache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, 1, 1, 2, 2, 2, impl=ops.GENERIC)
    assert by_numba(cache)
    d = np.ones(out.shape, dtype)
    for got, want, name in zip(ops.conv2d_relu_max_pool2d_backward(d, cache), ops.conv2d_relu_max_pool2d_backward(d, rcache), ("dx", "dW", "db")):
        close(got, want, dtype, name)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("case", NOT_COVERED)
def test_cases_not_covered_run_the_numpy_kernels(rng, case, pooled):
    x, Wt, b = inputs(rng, case, "float32", F=case[5:7])
    stride, pad = case[7:]
    pool = (2, 2, 2) if case[0] != 2 or case[1] != 3 else (3, 3, 2)  # an overlapping pool on two of them

    def run(impl):
        if pooled:
            out, cache = ops.conv2d_relu_max_pool2d_forward(x, Wt, b, stride, pad, *pool, impl=impl)
            back = ops.conv2d_relu_max_pool2d_backward
        else:
            out, cache = ops.conv2d_forward(x, Wt, b, stride, pad, relu=True, impl=impl)
            back = ops.conv2d_backward
        return out, cache, back(np.ones(out.shape, "float32"), cache)

    (out, cache, grads), (rout, _, rgrads) = run(None), run(ops.GENERIC)
    assert type(cache.kernel).__module__ == numba_ops.__name__ and not isinstance(cache.state, numba_ops._State)
    close(out, rout, "float32", "out")
    for got, want, name in zip(grads, rgrads, ("dx", "dW", "db")):
        close(got, want, "float32", name)


def test_covers():
    x, W, b = np.zeros((1, 2, 5, 5), np.float32), np.zeros((3, 2, 3, 3), np.float32), np.zeros(3, np.float32)
    assert numba_ops.covers(x, W, b, 1, 1) and numba_ops.covers(x, W, b, (1, 1), 2) and numba_ops.covers(x, W, b, 1, 0)
    assert not numba_ops.covers(x, W, b, 2, 1) and not numba_ops.covers(x, W, b, 1, (1, 2))
    assert not numba_ops.covers(x.astype(np.int64), W.astype(np.int64), b.astype(np.int64), 1, 1)
    assert numba_ops.covers(x, np.zeros((3, 2, 5, 5), np.float32), b, 1, 0)
    for shape in ((3, 2, 7, 7), (3, 2, 1, 1), (3, 2, 5, 3), (3, 2, 4, 4)):
        assert not numba_ops.covers(x, np.zeros(shape, np.float32), b, 1, 1), shape


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["deep", "simple"])
def test_models_equal_generic_layers(rng, model, dtype, threads):
    """A DeepConvNet's and a SimpleConvNet's (5x5, pad 0, its block without dx) loss and
    gradients with the Numba kernels (one and two Numba threads) equal the unfused
    generic path's."""
    import numba

    from xpconv.models import SimpleConvNet

    if model == "deep":
        net = DeepConvNet(input_dim=(1, 12, 12), hidden_size=9, dropout_ratio=0.0, dtype=dtype, seed=1)
    else:
        net = SimpleConvNet(input_dim=(1, 12, 12), conv_param={"filter_num": 20}, hidden_size=9, weight_init_std=0.3, dtype=dtype, seed=1)
    x = rng.standard_normal((5, 1, 12, 12)).astype(dtype)
    t = rng.integers(0, 10, 5)
    convs = [layer for layer in net.layers if isinstance(layer, layers.Convolution | layers.Pooling)]
    for layer in convs:
        layer.impl = ops.GENERIC
    h = x
    for layer in net.layers:
        h = layer.forward(h, True)
    ref_loss = float(net.last_layer.forward(h, t))
    d = net.last_layer.backward(1.0)
    for layer in reversed(net.layers):
        d = layer.backward(d)
    ref = {k: np.array(getattr(layer, "d" + attr)) for k, (layer, attr) in net._slots.items()}
    for layer in convs:
        layer.impl = None
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        grads = net.gradient(x, t)
        loss = float(net.loss(x, t))
    finally:
        numba.set_num_threads(old)
    blocks = [s for s in net.steps if isinstance(s, layers.ConvBlock)]
    assert blocks and all(by_numba(blk._cache) for blk in blocks), "the model should run the Numba kernels"
    assert loss == pytest.approx(ref_loss, rel=1e-5 if dtype == "float32" else 1e-12)
    for k in ref:
        close(grads[k], ref[k], dtype, k)


# ====================================================================== threads: BLAS yields to Numba


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return min(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


def test_a_pass_after_one_that_ran_these_kernels_keeps_blas_on_one_thread(monkeypatch):
    import numba
    from threadpoolctl import threadpool_limits

    from xpconv.models import SimpleConvNet

    monkeypatch.setattr(numba_ops.BlasYields, "_used_last", False)
    seen = []
    real = numba_ops.BlasYields.__enter__

    def enter(self):
        out = real(self)
        if type(self)._depth == 1:  # the outermost pass (gradient() runs loss() inside)
            seen.append(_blas_threads())
        return out

    monkeypatch.setattr(numba_ops.BlasYields, "__enter__", enter)
    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype("float32")
    t = np.arange(4) % 10
    with threadpool_limits(limits=2, user_api="blas"):
        numba.set_num_threads(2)
        try:
            deep = DeepConvNet(seed=0)
            deep.gradient(x, t)  # the first pass: nothing known yet, BLAS as it was
            deep.gradient(x, t)  # the last pass ran the Numba kernels: BLAS on one thread
            deep.predict(x)
            assert seen == [2, 1, 1], seen
            assert _blas_threads() == 2  # restored after each pass
            simple = SimpleConvNet(conv_param={"filter_size": 7}, seed=0)  # 7x7 convolutions: the NumPy kernels
            simple.gradient(x, t)  # after a Numba pass: pinned once more
            simple.gradient(x, t)  # the last pass ran no Numba kernel: BLAS keeps its threads
            assert seen[-2:] == [1, 2], seen
            numba.set_num_threads(1)  # one Numba thread: nothing to yield to
            deep.gradient(x, t)
            deep.gradient(x, t)
            assert seen[-2:] == [2, 2], seen
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_step_scope_is_a_no_op_where_no_kernel_module_adds_one():
    import contextlib

    assert isinstance(kernels.step_scope("array_api_strict"), contextlib.nullcontext)
    assert kernels.SCOPES["numpy"] == [numba_ops.BlasYields]


# ====================================================================== products on Numba's threads


@pytest.fixture
def two_threads_blas_held(monkeypatch):
    """Numba on two threads and BLAS held to one, as inside a pass after one that ran the kernels."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("these tests need two Numba threads (NUMBA_NUM_THREADS >= 2)")
    monkeypatch.setattr(numba_ops.BlasYields, "limited", True)
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(old)


def _counting_gemm(monkeypatch):
    calls = []
    real = numba_ops._gemm

    def spy(*args):
        calls.append(args[6:9])  # M, N, K
        return real(*args)

    monkeypatch.setattr(numba_ops, "_gemm", spy)
    return calls


def _product_close(got, a, b):
    """got equals a @ b to the rounding of its terms: |got - a@b| <= eps * (|a| @ |b|) elementwise."""
    want = a @ b
    bound = (np.abs(a) @ np.abs(b)) * (1e-5 if a.dtype == np.float32 else 1e-13)
    assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(100, 4320, 100), (100, 100, 4320), (4320, 100, 100), (37, 3001, 61), (61, 3001, 37), (1, 40000, 60), (60, 40000, 1)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_equals_the_product_split_over_numba_threads(rng, dtype, M, K, N, ta, tb, two_threads_blas_held, monkeypatch):
    """Affine's three products of SimpleConvNet (x @ W, dout @ W.T, x.T @ dout), odd sizes
    that split unevenly, one row or one column, each operand contiguous or a transpose of a
    contiguous one: ops.matmul runs the split kernel and gives a @ b."""
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
    a, b = (a.T if ta else a), (b.T if tb else b)
    calls = _counting_gemm(monkeypatch)
    got = ops.matmul(a, b)
    assert calls == [(M, N, K)]
    _product_close(got, a, b)


class Sub(np.ndarray):
    pass


def test_matmul_leaves_what_it_does_not_cover_to_numpy(rng, two_threads_blas_held, monkeypatch):
    """Small products, mixed or other dtypes, strided operands, subclasses, other namespaces,
    BLAS not held or one Numba thread: ``a @ b`` (and numpy's own errors for bad shapes)."""
    import numba

    calls = _counting_gemm(monkeypatch)
    a = rng.standard_normal((64, 512)).astype("float32")
    b = rng.standard_normal((512, 64)).astype("float32")
    assert numba_ops.Matmul().accepts(a, b)
    cases = [
        (a[:, :32], b[:32]),  # 2^16 multiply-adds
        (a, b.astype("float64")),
        (a.astype("float16"), b.astype("float16")),
        (a.astype("int64"), b.astype("int64")),
        (a[:, ::2], b[::2]),  # strided
        (np.asfortranarray(rng.standard_normal((256, 512)).astype("float32"))[::2], b),  # neither order
        (a.view(Sub), b),
    ]
    for x, y in cases:
        assert not numba_ops.Matmul().accepts(x, y), (x.dtype, x.shape, x.strides)
        np.testing.assert_array_equal(ops.matmul(x, y), x @ y)
    with pytest.raises(ValueError, match="matmul"):
        ops.matmul(a, a)
    monkeypatch.setattr(numba_ops.BlasYields, "limited", False)
    np.testing.assert_array_equal(ops.matmul(a, b), a @ b)
    monkeypatch.setattr(numba_ops.BlasYields, "limited", True)
    numba.set_num_threads(1)
    np.testing.assert_array_equal(ops.matmul(a, b), a @ b)
    assert calls == []


def test_matmul_finds_numpy_blas():
    """The NumPy wheel's OpenBLAS exports CBLAS gemm: found, with its integer width."""
    numba_ops.Matmul._gemm = None
    found = numba_ops._blas_gemm()
    assert not isinstance(found, str), found
    sgemm, dgemm, what = found
    assert sgemm.argtypes[6].__name__ == "c_float" and dgemm.argtypes[6].__name__ == "c_double"
    assert "sgemm" in what and "dgemm" in what and "openblas" in what.lower()


def test_simple_convnet_pass_splits_its_affine_products(rng, monkeypatch):
    """SimpleConvNet (4320 x 100 Affine) at batch 64 on two Numba threads: the second pass holds
    BLAS to one thread and runs Affine's three 4320-wide products split; the gradients equal the
    first pass's (BLAS on its own threads)."""
    import numba

    from xpconv.models import SimpleConvNet

    monkeypatch.setattr(numba_ops.BlasYields, "_used_last", False)
    net = SimpleConvNet(seed=0)
    x = rng.random((64, 1, 28, 28)).astype("float32")
    t = np.arange(64) % 10
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        calls = _counting_gemm(monkeypatch)
        first = net.gradient(x, t)
        assert calls == []
        second = net.gradient(x, t)
    finally:
        numba.set_num_threads(old)
    assert sorted(calls) == sorted([(64, 100, 4320), (64, 4320, 100), (4320, 100, 64)])
    assert not numba_ops.BlasYields.limited
    for k in first:
        close(second[k], first[k], "float32", k)


# --------------------------------------------------------------------------- compile targets

HOST_AVX512 = "+avx,+avx2,+fma,+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512cd,-amx-tile"
HOST_AVX2 = "+avx,+avx2,+fma,-avx512f,-avx512bw"


def test_choose_target_asks_for_512_bit_vectors_on_avx512():
    t = numba_ops.choose_target(None, None, "rocketlake", HOST_AVX512)
    assert t == {"cpu": "rocketlake", "features": HOST_AVX512 + ",-prefer-256-bit", "level": "avx512", "wide": True}
    # a forced target (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) is what counts, not the host
    t = numba_ops.choose_target("skylake-avx512", "+avx2,+fma,+avx512f,+avx512bw,+avx512dq,+avx512vl", "znver4", HOST_AVX2)
    assert (t["cpu"], t["level"], t["wide"]) == ("skylake-avx512", "avx512", True)
    assert t["features"].endswith(",-prefer-256-bit")


def test_choose_target_leaves_what_it_should_alone():
    # a feature string that names prefer-256-bit, either way, is the user's choice
    for sign, wide in (("+", False), ("-", True)):
        t = numba_ops.choose_target(None, HOST_AVX512 + f",{sign}prefer-256-bit", "x", HOST_AVX2)
        assert (t["features"], t["level"], t["wide"]) == (None, "avx512", wide)
    # AVX2 (and AVX-512F without BW/DQ/VL) get the AVX2 blocks and no change
    assert numba_ops.choose_target(None, None, "haswell", HOST_AVX2) == {"cpu": "haswell", "features": None, "level": "avx2", "wide": False}
    assert numba_ops.choose_target(None, "+avx2,+fma,+avx512f", "x", "")["level"] == "avx2"
    assert numba_ops.choose_target(None, None, "generic", "+sse2")["level"] == "other"
    # XPCONV_NUMBA_TARGET=numba: Numba's target as it is
    t = numba_ops.choose_target(None, None, "rocketlake", HOST_AVX512, "numba")
    assert (t["features"], t["level"], t["wide"]) == (None, "avx512", False)
    with pytest.raises(ValueError, match=r"XPCONV_NUMBA_TARGET: expected 'auto' or 'numba', got 'native'"):
        numba_ops.choose_target(None, None, "x", HOST_AVX2, "native")


def test_this_process_compiles_for_the_chosen_target():
    from numba.core import config, registry

    t = numba_ops.TARGET
    assert numba_ops.BLOCKS[t["level"]] == (numba_ops.FB, numba_ops.PB, numba_ops.FV, numba_ops._PAIRS, numba_ops.TG)
    assert t["features"] == config.CPU_FEATURES
    # the SLP vectorizer (the micro-kernel's vector write-out) is on unless asked otherwise
    assert t["slp"] == bool(config.SLP_VECTORIZE)
    if t["mode"] == "auto" and "NUMBA_SLP_VECTORIZE" not in os.environ:
        assert t["slp"]
    if "fixed" not in t["mode"] and t["features"] is not None:
        assert registry.cpu_target.target_context.codegen()._tm_features == t["features"]


def _host_runs(features: str) -> bool:
    import llvmlite.binding as ll

    host = numba_ops._feature_map(ll.get_host_cpu_features().flatten())
    return all(host.get(f, False) for f, on in numba_ops._feature_map(features).items() if on)


# each ISA variant, compiled in a process of its own with Numba's target forced (benchmarks/isa.py's
# cells), runs the equality tests above: (cell, the level and vector width it must choose)
VARIANTS = [("avx2", "avx2", False), ("skylake-avx512", "avx512", True), ("skylake-avx512-numba", "avx512", False)]


@pytest.mark.parametrize("cell,level,wide", VARIANTS)
def test_every_isa_variant_equals_generic(cell, level, wide, tmp_path):
    if os.environ.get("XPCONV_TEST_VARIANT"):
        pytest.skip("inside a variant's run already")
    from benchmarks.isa import CELLS

    env = dict(os.environ, **CELLS[cell][1], XPCONV_TEST_VARIANT=f"{level},{int(wide)}", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("XPCONV_NUMBA", None)
    if not _host_runs(env["NUMBA_CPU_FEATURES"]):
        pytest.skip(f"this CPU cannot execute {cell} code ({env['NUMBA_CPU_FEATURES']})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                        "-k", "equals_generic and not models and not isa_variant or variant_target"],
                       env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-1000:]


if os.environ.get("XPCONV_TEST_VARIANT"):  # collected only in those processes, never skipped in the main run
    def test_variant_target():
        """Inside test_every_isa_variant_equals_generic's process: the level and vector width chosen."""
        level, wide = os.environ["XPCONV_TEST_VARIANT"].split(",")
        t = numba_ops.TARGET
        assert (t["level"], t["wide"]) == (level, wide == "1"), t
        assert t["cpu"] == os.environ["NUMBA_CPU_NAME"]
        assert t["slp"] == (os.environ.get("XPCONV_NUMBA_TARGET") != "numba"), t


def test_scratch_buffers_are_reused_only_when_nothing_refers_to_them():
    """The kernels' working buffers come back once free, never while a view of them lives,
    only for requests of at least half their size, and at most KEEP are kept."""
    pool = numba_ops._Scratch()
    a = pool.zeros(1 << 20, np.float32)
    assert a.dtype == np.float32 and a.shape == (1 << 20,) and not a.any()
    a[:] = 7
    v = a[10:20]  # a view keeps the buffer taken
    del a
    b = pool.zeros(1 << 20, np.float32)
    assert not np.shares_memory(b, v) and not b.any()
    assert (v == 7).all()
    base = id(v.base)  # the id only: holding the base would keep it taken
    del v
    c = pool.zeros(1 << 20, np.float32)  # the first buffer is free again: reused, and zeroed
    assert id(c.base) == base and not c.any()
    del c
    assert id(pool.empty(1 << 18, np.float32).base) != base  # under half its size: not reused
    d = pool.empty(1 << 19, np.float64)  # another dtype of the same bytes: reused
    assert d.dtype == np.float64 and d.shape == (1 << 19,) and id(d.base) == base and len(pool._bufs) == 3
    held = [pool.empty((1 << 18) + i, np.float32) for i in range(pool.KEEP + 4)]
    assert len(pool._bufs) <= pool.KEEP and all(h.flags.writeable for h in held)
    assert len({h.__array_interface__["data"][0] for h in held}) == len(held)  # none shared
    small, huge = pool.empty(10, np.float32), pool.empty((pool.LIMIT >> 2) + 1, np.uint8)
    assert small.base is None and huge.size == (pool.LIMIT >> 2) + 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("n", [7, (1 << 16) + 3])  # one pass, and split over Numba's threads
def test_adam_update_equals_the_reference_bit_for_bit(rng, dtype, weight_decay, n):
    """Adam's fused update (parameter, m and v after five steps) equals Adam._step's NumPy
    operations exactly, weight decay included; an infinite parameter stays as the reference has it."""
    from xpconv.optim import Adam

    p0 = rng.standard_normal((n,)).astype(dtype)
    p0[3] = np.inf
    fused, ref = Adam(lr=0.01, weight_decay=weight_decay), Adam(lr=0.01, weight_decay=weight_decay)
    ref._fast_kernel = lambda xp: None  # the generic _step
    pf, pr = {"W": p0.copy()}, {"W": p0.copy()}
    for _ in range(5):
        g = rng.standard_normal((n,)).astype(dtype)
        fused.update(pf, {"W": g})
        with np.errstate(invalid="ignore"):  # inf * decay: inf / inf in the reference, as in the kernel
            ref.update(pr, {"W": g})
    for got, want in ((pf["W"], pr["W"]), (fused.state["m"]["W"], ref.state["m"]["W"]), (fused.state["v"]["W"], ref.state["v"]["W"])):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, want)
    assert (pf["W"] != p0).sum() >= n - 1


def test_adam_update_leaves_what_it_does_not_cover_to_the_reference():
    k = numba_ops.AdamUpdate()
    a = np.zeros((4, 4), np.float32)
    assert k.accepts(a, a.copy(), a.copy(), a.copy())
    assert not k.accepts(a, a.copy()[::-1], a.copy(), a.copy())  # not C-contiguous
    assert not k.accepts(a, a.astype(np.float64), a.copy(), a.copy())  # mixed dtypes
    assert not k.accepts(a.astype(np.float16), *(a.astype(np.float16) for _ in range(3)))
    ro = a.copy()
    ro.flags.writeable = False
    assert not k.accepts(ro, a.copy(), a.copy(), a.copy())
