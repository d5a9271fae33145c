"""im2col/col2im, convolution and pooling against independent oracles, on every namespace.

Oracles: torch.nn.functional (float64, autograd for backward) when torch is
installed, and plain Python loops (always, on small cases)."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpconv import backend, ops
from xpconv.backend import to_numpy

HAS_TORCH = importlib.util.find_spec("torch") is not None

# (N, C, H, W, FN, FH, FW, stride, pad): strides 1-3, pads 0-2, non-square, C > 1, N > 1
CONV_CASES = [
    (2, 3, 7, 6, 4, 3, 3, 1, 0),
    (2, 2, 8, 7, 3, 3, 2, 2, 1),
    (3, 3, 9, 9, 2, 2, 3, 3, 2),
    (2, 1, 5, 6, 2, 1, 1, 1, 0),
    (2, 2, 7, 8, 3, 3, 4, (1, 2), (2, 0)),
    (1, 2, 4, 4, 2, 4, 4, 1, 1),
]
POOL_CASES = [
    (2, 3, 6, 6, 2, 2, 2, 0),
    (2, 2, 7, 5, 3, 2, 1, 0),
    (3, 2, 8, 9, 3, 3, 2, 1),
    (2, 3, 9, 7, 2, 3, 3, 2),
    (2, 1, 5, 5, 2, 2, (1, 2), (1, 0)),
]


# ------------------------------------------------------------------ loop oracles


def loop_conv(x, W, b, stride, pad):
    SH, SW = ops.pair(stride)
    PH, PW = ops.pair(pad)
    N, C, H, Wd = x.shape
    FN, _, FH, FW = W.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW)))
    OH, OW = (H + 2 * PH - FH) // SH + 1, (Wd + 2 * PW - FW) // SW + 1
    out = np.zeros((N, FN, OH, OW))
    for n, f, i, j in itertools.product(range(N), range(FN), range(OH), range(OW)):
        out[n, f, i, j] = np.sum(xp_[n, :, i * SH : i * SH + FH, j * SW : j * SW + FW] * W[f]) + b[f]
    return out


def loop_pool(x, ph, pw, stride, pad, kind):
    SH, SW = ops.pair(stride)
    PH, PW = ops.pair(pad)
    N, C, H, W = x.shape
    fill = -np.inf if kind == "max" else 0.0
    xp_ = np.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW)), constant_values=fill)
    OH, OW = (H + 2 * PH - ph) // SH + 1, (W + 2 * PW - pw) // SW + 1
    out = np.zeros((N, C, OH, OW))
    for n, c, i, j in itertools.product(range(N), range(C), range(OH), range(OW)):
        win = xp_[n, c, i * SH : i * SH + ph, j * SW : j * SW + pw]
        out[n, c, i, j] = win.max() if kind == "max" else win.mean()
    return out


def loop_im2col(x, FH, FW, stride, pad):
    SH, SW = ops.pair(stride)
    PH, PW = ops.pair(pad)
    N, C, H, W = x.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW)))
    OH, OW = (H + 2 * PH - FH) // SH + 1, (W + 2 * PW - FW) // SW + 1
    rows = []
    for n, i, j in itertools.product(range(N), range(OH), range(OW)):
        rows.append(xp_[n, :, i * SH : i * SH + FH, j * SW : j * SW + FW].reshape(-1))
    return np.array(rows)


# ------------------------------------------------------------------ torch oracles


def torch_conv(x, W, b, stride, pad, dout):
    import torch
    import torch.nn.functional as F

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    Wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(xt, Wt, bt, stride=ops.pair(stride), padding=ops.pair(pad))
    out.backward(torch.tensor(dout, dtype=torch.float64))
    return out.detach().numpy(), xt.grad.numpy(), Wt.grad.numpy(), bt.grad.numpy()


def torch_pool(x, ph, pw, stride, pad, kind, dout):
    import torch
    import torch.nn.functional as F

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    if kind == "max":
        out = F.max_pool2d(xt, (ph, pw), stride=ops.pair(stride), padding=ops.pair(pad))
    else:
        out = F.avg_pool2d(xt, (ph, pw), stride=ops.pair(stride), padding=ops.pair(pad), count_include_pad=True)
    out.backward(torch.tensor(dout, dtype=torch.float64))
    return out.detach().numpy(), xt.grad.numpy()


def _ref(xp, a):
    return backend.asarray_in(np.asarray(a, dtype=np.float64), xp)


# ------------------------------------------------------------------ im2col / col2im


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_matches_loops(xp, rng, case):
    N, C, H, W, _, FH, FW, stride, pad = case
    x = rng.standard_normal((N, C, H, W))
    col = to_numpy(ops.im2col(_ref(xp, x), FH, FW, stride, pad))
    np.testing.assert_array_equal(col, loop_im2col(x, FH, FW, stride, pad))


def test_im2col_book_signature_and_shape(xp):
    x = _ref(xp, np.arange(2 * 3 * 7 * 7, dtype=np.float64).reshape(2, 3, 7, 7))
    col = ops.im2col(x, 5, 5, stride=1, pad=0)
    assert tuple(col.shape) == (2 * 3 * 3, 3 * 5 * 5)
    col = ops.im2col(x, filter_h=3, filter_w=2, stride=(2, 1), pad=(1, 0))
    assert tuple(col.shape) == (2 * 4 * 6, 3 * 3 * 2)


@pytest.mark.parametrize(
    "H, W, FH, FW, stride, pad",
    [(4, 4, 5, 3, 1, 0), (3, 3, 3, 6, 1, 1), (2, 2, 7, 7, 2, 2)],
)
def test_output_smaller_than_one_raises_with_numbers(xp, H, W, FH, FW, stride, pad):
    x = _ref(xp, np.zeros((1, 1, H, W)))
    with pytest.raises(ValueError, match=r"OH = \(H \+ 2\*PH - FH\)//SH \+ 1 = \(" + str(H)):
        ops.im2col(x, FH, FW, stride, pad)


shapes = st.tuples(
    st.integers(1, 3),  # N
    st.integers(1, 3),  # C
    st.integers(1, 8),  # H
    st.integers(1, 8),  # W
    st.integers(1, 4),  # FH
    st.integers(1, 4),  # FW
    st.integers(1, 3),  # SH
    st.integers(1, 3),  # SW
    st.integers(0, 2),  # PH
    st.integers(0, 2),  # PW
    st.integers(0, 2**31 - 1),  # data seed
).filter(lambda s: s[2] + 2 * s[8] >= s[4] and s[3] + 2 * s[9] >= s[5])


@pytest.mark.parametrize("ns", ["numpy", "array_api_strict"] + (["torch"] if HAS_TORCH else []))
@settings(max_examples=60, deadline=None)
@given(s=shapes)
def test_im2col_col2im_are_adjoint(ns, s):
    """<im2col(x), y> == <x, col2im(y)> for every shape, stride and pad."""
    xp = backend.get_namespace(ns)
    N, C, H, W, FH, FW, SH, SW, PH, PW, seed = s
    r = np.random.default_rng(seed)
    OH, OW = ops.conv_output_size(H, W, FH, FW, (SH, SW), (PH, PW))
    x = r.standard_normal((N, C, H, W))
    y = r.standard_normal((N * OH * OW, C * FH * FW))
    lhs = np.sum(to_numpy(ops.im2col(_ref(xp, x), FH, FW, (SH, SW), (PH, PW))) * y)
    rhs = np.sum(x * to_numpy(ops.col2im(_ref(xp, y), x.shape, FH, FW, (SH, SW), (PH, PW))))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


def test_col2im_rejects_wrong_col_shape(xp):
    with pytest.raises(ValueError, match=r"col2im: expected col of shape"):
        ops.col2im(_ref(xp, np.zeros((5, 9))), (1, 1, 4, 4), 3, 3)


# ------------------------------------------------------------------ convolution


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_backward_against_oracle(xp, rng, case):
    N, C, H, Wd, FN, FH, FW, stride, pad = case
    x = rng.standard_normal((N, C, H, Wd))
    W = rng.standard_normal((FN, C, FH, FW))
    b = rng.standard_normal(FN)
    out, cache = ops.conv2d_forward(_ref(xp, x), _ref(xp, W), _ref(xp, b), stride, pad)
    dout = rng.standard_normal(tuple(out.shape))
    dx, dW, db = ops.conv2d_backward(_ref(xp, dout), cache)
    if HAS_TORCH:
        o_ref, dx_ref, dW_ref, db_ref = torch_conv(x, W, b, stride, pad, dout)
        np.testing.assert_allclose(to_numpy(dx), dx_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(to_numpy(dW), dW_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(to_numpy(db), db_ref, rtol=1e-10, atol=1e-10)
    else:
        o_ref = loop_conv(x, W, b, stride, pad)
    np.testing.assert_allclose(to_numpy(out), o_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(to_numpy(out), loop_conv(x, W, b, stride, pad), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ pooling


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_forward_backward_against_oracle(xp, rng, case, kind):
    N, C, H, W, ph, pw, stride, pad = case
    if max(ops.pair(pad)) * 2 > max(ph, pw) and kind == "max":
        pad = 0  # torch requires pad <= half the kernel for max pooling
    x = rng.standard_normal((N, C, H, W))
    fwd = ops.max_pool2d_forward if kind == "max" else ops.avg_pool2d_forward
    bwd = ops.max_pool2d_backward if kind == "max" else ops.avg_pool2d_backward
    out, cache = fwd(_ref(xp, x), ph, pw, stride, pad)
    np.testing.assert_allclose(to_numpy(out), loop_pool(x, ph, pw, stride, pad, kind), rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(tuple(out.shape))
    dx = to_numpy(bwd(_ref(xp, dout), cache))
    assert dx.shape == x.shape
    if HAS_TORCH and max(ops.pair(pad)) * 2 <= min(ph, pw):
        o_ref, dx_ref = torch_pool(x, ph, pw, stride, pad, kind, dout)
        np.testing.assert_allclose(to_numpy(out), o_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-10)
    if kind == "max" or ops.pair(pad) == (0, 0):
        # every window hands its whole dout to real inputs (max pooling never picks
        # padding; unpadded average pooling spreads it over the window)
        assert dx.sum() == pytest.approx(dout.sum(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_ties_route_to_exactly_one_input(xp, stride):
    x = np.zeros((2, 3, 6, 6))  # every window is one big tie
    out, cache = ops.max_pool2d_forward(_ref(xp, x), 2, 2, stride, 0)
    dout = np.ones(tuple(out.shape))
    dx = to_numpy(ops.max_pool2d_backward(_ref(xp, dout), cache))
    # with ties each window sends its whole gradient (1.0) to one input: the first
    # (top-left) element of the window, never split between the tied inputs
    assert dx.sum() == pytest.approx(dout.sum())
    OH = out.shape[2]
    expected = np.zeros_like(x)
    for i in range(OH):
        for j in range(OH):
            expected[:, :, i * stride, j * stride] += 1.0
    np.testing.assert_array_equal(dx, expected)


def test_max_pool_padding_never_wins(xp):
    x = -np.ones((1, 1, 3, 3)) * 5.0  # all negative: zero padding would win, -inf must not
    out, _ = ops.max_pool2d_forward(_ref(xp, x), 2, 2, 2, 1)
    np.testing.assert_array_equal(to_numpy(out), np.full((1, 1, 2, 2), -5.0))


# ------------------------------------------------------------------ softmax / loss


def test_softmax_is_stable_for_huge_scores(xp):
    x = _ref(xp, np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1000.0, -1000.0]]))
    y = to_numpy(ops.softmax(x))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=1), 1.0)
    np.testing.assert_allclose(y[0], np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum())
    np.testing.assert_allclose(y[1], 1 / 3)


def test_softmax_cross_entropy_matches_formula(xp, rng):
    x = rng.standard_normal((5, 4)) * 30  # large scores: log(0) must not appear
    t = np.array([0, 3, 1, 2, 3])
    oh = np.eye(4)[t]
    loss, y = ops.softmax_cross_entropy(_ref(xp, x), _ref(xp, oh))
    m = x.max(axis=1, keepdims=True)
    ref = np.mean(np.log(np.exp(x - m).sum(axis=1)) + m[:, 0] - x[np.arange(5), t])
    assert float(loss) == pytest.approx(ref, rel=1e-12)
    assert np.isfinite(float(loss))


# ------------------------------------------------------------------ layout of the dispatch


def _imports(path):
    """Every module a file imports (function-level imports included), relative
    imports resolved against the xpconv package layout."""
    import ast
    import pathlib

    rel = pathlib.Path(path).relative_to(pathlib.Path(ops.__file__).parent.parent)
    package = list(rel.with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_geometry_is_a_leaf_that_ops_and_the_kernels_share():
    import pathlib

    from xpconv import _geometry, kernels

    assert ops.pair is _geometry.pair and ops.conv_output_size is _geometry.conv_output_size
    assert not {m for m in _imports(_geometry.__file__) if m.startswith("xpconv")}
    kdir = pathlib.Path(kernels.__file__).parent
    for path in sorted(kdir.glob("*.py")):
        xpconv_imports = {m for m in _imports(path) if m.startswith("xpconv")}
        assert "xpconv.ops" not in xpconv_imports, f"{path.name} imports xpconv.ops"
        # an optional module (numba_ops) names the kernels it replaces, and runs them
        replaced = {"xpconv.kernels.numpy_ops"} if path.name == "numba_ops.py" else set()
        assert xpconv_imports <= {"xpconv", "xpconv._geometry", "xpconv._geometry.pair", "xpconv._geometry.conv_output_size",
                                  "xpconv._geometry.window", "xpconv.kernels", "xpconv.kernels.register",
                                  "xpconv.kernels.cuda_source", "xpconv.kernels.COL_BYTES",
                                  "xpconv.kernels.col_bytes_for", "xpconv.kernels.register_step_scope",
                                  "xpconv.kernels.env_count", "xpconv.kernels.UpdateKernel"} | replaced, (path.name, xpconv_imports)


def test_window_names_the_geometry():
    from xpconv._geometry import window

    assert window(7, 9, 3, 2, (2, 1), (1, 0), "test") == (2, 1, 1, 0, 4, 8)
    assert window(7, 9, 3, 2, 1, 0, "test").OH == 5
    with pytest.raises(ValueError, match="test: filter larger than the padded input"):
        window(2, 2, 3, 3, 1, 0, "test")
