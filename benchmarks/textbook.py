"""The textbook baseline: SimpleConvNet/DeepConvNet computed the way the book's code does it.

Our own code, written in the book's style so that the harness has the book's speed to
compare with: im2col/col2im as a Python loop over filter taps filling a float64
``np.zeros`` scratch array, float64 weights, fresh arrays every step, Adam written
out.  :class:`TextbookNet` rebuilds an xpconv model's layers with its initial weights,
so the baseline computes the same network (tests/test_bench.py checks the scores and
the first loss).
"""

from __future__ import annotations

__all__ = ["TextbookNet"]


def _tb_out(H, W, FH, FW, S, P):
    return (H + 2 * P[0] - FH) // S[0] + 1, (W + 2 * P[1] - FW) // S[1] + 1


def _tb_im2col(x, FH, FW, S, P, np):
    """The textbook im2col: a float64 zero scratch array filled tap by tap."""
    N, C, H, W = x.shape
    OH, OW = _tb_out(H, W, FH, FW, S, P)
    img = np.pad(x, [(0, 0), (0, 0), (P[0], P[0]), (P[1], P[1])], "constant")
    col = np.zeros((N, C, FH, FW, OH, OW))  # float64, as np.zeros gives by default
    for i in range(FH):
        for j in range(FW):
            col[:, :, i, j, :, :] = img[:, :, i : i + S[0] * OH : S[0], j : j + S[1] * OW : S[1]]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(N * OH * OW, -1)


def _tb_col2im(col, shape, FH, FW, S, P, np):
    N, C, H, W = shape
    OH, OW = _tb_out(H, W, FH, FW, S, P)
    col = col.reshape(N, OH, OW, C, FH, FW).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((N, C, H + 2 * P[0] + S[0] - 1, W + 2 * P[1] + S[1] - 1))
    for i in range(FH):
        for j in range(FW):
            img[:, :, i : i + S[0] * OH : S[0], j : j + S[1] * OW : S[1]] += col[:, :, i, j, :, :]
    return img[:, :, P[0] : H + P[0], P[1] : W + P[1]]


class _TBConv:
    def __init__(self, W, b, S, P, np):
        self.W, self.b, self.S, self.P, self.np = W, b, S, P, np

    def forward(self, x, train):
        FN, C, FH, FW = self.W.shape
        N, _, H, W = x.shape
        OH, OW = _tb_out(H, W, FH, FW, self.S, self.P)
        col = _tb_im2col(x, FH, FW, self.S, self.P, self.np)
        col_W = self.W.reshape(FN, -1).T
        out = (col @ col_W + self.b).reshape(N, OH, OW, -1).transpose(0, 3, 1, 2)
        self.x_shape, self.col, self.col_W = x.shape, col, col_W
        return out

    def backward(self, dout):
        FN, C, FH, FW = self.W.shape
        dout = dout.transpose(0, 2, 3, 1).reshape(-1, FN)
        self.db = dout.sum(axis=0)
        self.dW = (self.col.T @ dout).transpose(1, 0).reshape(FN, C, FH, FW)
        dcol = dout @ self.col_W.T
        return _tb_col2im(dcol, self.x_shape, FH, FW, self.S, self.P, self.np)


class _TBPool:
    def __init__(self, ph, pw, S, P, np):
        self.ph, self.pw, self.S, self.P, self.np = ph, pw, S, P, np

    def forward(self, x, train):
        N, C, H, W = x.shape
        OH, OW = _tb_out(H, W, self.ph, self.pw, self.S, self.P)
        col = _tb_im2col(x, self.ph, self.pw, self.S, self.P, self.np).reshape(-1, self.ph * self.pw)
        self.arg_max = self.np.argmax(col, axis=1)
        self.x_shape = x.shape
        return self.np.max(col, axis=1).reshape(N, OH, OW, C).transpose(0, 3, 1, 2)

    def backward(self, dout):
        np = self.np
        dout = dout.transpose(0, 2, 3, 1)
        size = self.ph * self.pw
        dmax = np.zeros((dout.size, size))
        dmax[np.arange(self.arg_max.size), self.arg_max.flatten()] = dout.flatten()
        dcol = dmax.reshape(dout.shape + (size,)).reshape(dout.shape[0] * dout.shape[1] * dout.shape[2], -1)
        return _tb_col2im(dcol, self.x_shape, self.ph, self.pw, self.S, self.P, np)


class _TBRelu:
    def forward(self, x, train):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dout[self.mask] = 0
        return dout


class _TBAffine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x, train):
        self.x_shape = x.shape
        self.x = x.reshape(x.shape[0], -1)
        return self.x @ self.W + self.b

    def backward(self, dout):
        dx = dout @ self.W.T
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dx.reshape(*self.x_shape)


class _TBDropout:
    def __init__(self, ratio, np):
        self.ratio, self.np = ratio, np

    def forward(self, x, train):
        if train:
            self.mask = self.np.random.rand(*x.shape) > self.ratio
            return x * self.mask
        return x * (1.0 - self.ratio)

    def backward(self, dout):
        return dout * self.mask


class TextbookNet:
    """The model's layers rebuilt textbook-style, float64 weights."""

    def __init__(self, net, np):
        from xpconv import layers as L
        from xpconv.backend import to_numpy

        self.np = np
        self.layers = []
        for layer in net.layers:
            if isinstance(layer, L.Convolution):
                tl = _TBConv(to_numpy(layer.W).astype(np.float64), to_numpy(layer.b).astype(np.float64), layer.stride, layer.pad, np)
            elif isinstance(layer, L.Pooling):
                tl = _TBPool(layer.pool_h, layer.pool_w, layer.stride, layer.pad, np)
            elif isinstance(layer, L.Relu):
                tl = _TBRelu()
            elif isinstance(layer, L.Affine):
                tl = _TBAffine(to_numpy(layer.W).astype(np.float64), to_numpy(layer.b).astype(np.float64))
            elif isinstance(layer, L.Dropout):
                tl = _TBDropout(layer.dropout_ratio, np)
            else:
                raise ValueError(f"textbook baseline: no counterpart for layer {type(layer).__name__}")
            self.layers.append(tl)
        self.params = [(tl, a) for tl in self.layers if isinstance(tl, (_TBConv, _TBAffine)) for a in ("W", "b")]
        self.m = [np.zeros_like(getattr(tl, a)) for tl, a in self.params]
        self.v = [np.zeros_like(getattr(tl, a)) for tl, a in self.params]
        self.iter = 0

    def predict(self, x, train=False):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def train_step(self, x, t, lr=0.001, beta1=0.9, beta2=0.999):
        np = self.np
        y = self.predict(x, True)
        y = y - y.max(axis=1, keepdims=True)
        p = np.exp(y)
        p /= p.sum(axis=1, keepdims=True)
        N = x.shape[0]
        _loss = -np.sum(np.log(p[np.arange(N), t] + 1e-7)) / N
        dout = p.copy()
        dout[np.arange(N), t] -= 1
        dout /= N
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        self.iter += 1
        lr_t = lr * np.sqrt(1.0 - beta2**self.iter) / (1.0 - beta1**self.iter)
        for (tl, a), m, v in zip(self.params, self.m, self.v):
            g = getattr(tl, "d" + a)
            m += (1 - beta1) * (g - m)
            v += (1 - beta2) * (g**2 - v)
            getattr(tl, a)[...] -= lr_t * m / (np.sqrt(v) + 1e-7)
        return _loss

