"""A compiled Winograd F(2x2,3x3) forward for the pooled 3x3 layers (the 2x2 output tile is
the 2x2/2 pool window), against the direct kernel (_forward_pool), DeepConvNet's three pooled
layers at batch 100, one thread:

    NUMBA_NUM_THREADS=1 python benchmarks/prototypes/numba_winograd.py

Per sample: the input transform B^T d B into V (16, C, T), the 16 products M[e] = U[e] V[e] by
the direct kernel's micro-kernel (one tap, the C channels as its reduction), the output
transform A^T M A + bias, then pool and ReLU.  Measured on the 2-core Zen 4 (ms, best of 11):
direct 4.91 / 5.01 / 5.91, this 11.27 / 19.11 / 10.71 (C = 16 / 32 / 64): 2.6x slower over
the three, though it does 2.25x fewer multiplications.  Taking one stage out at a time, each
of the three costs 3-11 ms: the transforms are scalar here (stride-2 reads, 16 output streams),
and the products, with reductions of only C = 16-64 per block, reach ~40 GFLOP/s against the
direct kernel's ~110.  Reading each input row deinterleaved (even and odd columns apart, so
the tiles' reads are unit-stride) and the pool's arg-max as selects changed little: 10.2 / 16.4
/ 10.1 ms.  LLVM vectorizes neither transform as written (heap arrays it cannot prove apart);
the direct kernel's trick, fixed-length loops over stack arrays, would have to be carried into
both transforms.  The products would stay slow even so: timed alone with one sample's V and M
in L2 (one tile block of 16 filters x 16 tiles), the micro-kernel reaches 41 / 80 / 102 GFLOP/s
for reductions of C = 16 / 64 / 256 steps: each block costs about as much again as 16-20
reduction steps (zeroing, the bias and the 16 stores), which the direct kernel's C x 9 steps
hide and Winograd's C steps do not.  At best the 64-channel layer would gain (~2 ms of its
5.9).  Results agree with the direct kernel to 1e-6 relative, the pool's
arg-max in every position.  Not used.
"""
import time, numpy as np, numba
from numba import prange
from xpconv.kernels import numba_ops as nb
from xpconv.kernels.numpy_ops import _winograd_weights
PB, FB = nb.PB, nb.FB

@nb._pjit
def wino_pool(xf, N, C, Hp, Wp, QH, QW, U, b, zb, out, idx, training):
    """out = relu(maxpool2x2(conv3x3(x) + b)) by Winograd F(2x2,3x3): tile (qy, qx) = pool window."""
    FN = out.shape[0]
    T = QH * QW
    Tp = -(-T // PB) * PB
    FNp = U.shape[1] * FB
    starts = np.arange(0, Tp, PB)
    for n in prange(N):
        V = np.zeros(16 * C * Tp, xf.dtype)
        M = np.empty(16 * FNp * Tp, xf.dtype)
        for c in range(C):
            for qy in range(QH):
                r = c * N * Hp * Wp + n * Hp * Wp + 2 * qy * Wp
                o = c * Tp + qy * QW
                for qx in range(QW):
                    p = r + 2 * qx
                    d00 = xf[p]; d01 = xf[p + 1]; d02 = xf[p + 2]; d03 = xf[p + 3]
                    p1 = p + Wp
                    d10 = xf[p1]; d11 = xf[p1 + 1]; d12 = xf[p1 + 2]; d13 = xf[p1 + 3]
                    p2 = p1 + Wp
                    d20 = xf[p2]; d21 = xf[p2 + 1]; d22 = xf[p2 + 2]; d23 = xf[p2 + 3]
                    p3 = p2 + Wp
                    d30 = xf[p3]; d31 = xf[p3 + 1]; d32 = xf[p3 + 2]; d33 = xf[p3 + 3]
                    # B^T d (rows)
                    t00 = d00 - d20; t01 = d01 - d21; t02 = d02 - d22; t03 = d03 - d23
                    t10 = d10 + d20; t11 = d11 + d21; t12 = d12 + d22; t13 = d13 + d23
                    t20 = d20 - d10; t21 = d21 - d11; t22 = d22 - d12; t23 = d23 - d13
                    t30 = d10 - d30; t31 = d11 - d31; t32 = d12 - d32; t33 = d13 - d33
                    s = C * Tp
                    q = o + qx
                    V[q] = t00 - t02; V[q + s] = t01 + t02; V[q + 2 * s] = t02 - t01; V[q + 3 * s] = t01 - t03
                    V[q + 4 * s] = t10 - t12; V[q + 5 * s] = t11 + t12; V[q + 6 * s] = t12 - t11; V[q + 7 * s] = t11 - t13
                    V[q + 8 * s] = t20 - t22; V[q + 9 * s] = t21 + t22; V[q + 10 * s] = t22 - t21; V[q + 11 * s] = t21 - t23
                    V[q + 12 * s] = t30 - t32; V[q + 13 * s] = t31 + t32; V[q + 14 * s] = t32 - t31; V[q + 15 * s] = t31 - t33
        for e in range(16):
            nb._sample(V, e * C * Tp, Tp, C, 0, 1, U[e], starts, M, e * FNp * Tp, Tp, zb, False)
        S = FNp * Tp
        for f in range(FN):
            bf = b[f]
            for t in range(T):
                q = f * Tp + t
                m0 = M[q]; m1 = M[q + S]; m2 = M[q + 2 * S]; m3 = M[q + 3 * S]
                m4 = M[q + 4 * S]; m5 = M[q + 5 * S]; m6 = M[q + 6 * S]; m7 = M[q + 7 * S]
                m8 = M[q + 8 * S]; m9 = M[q + 9 * S]; m10 = M[q + 10 * S]; m11 = M[q + 11 * S]
                m12 = M[q + 12 * S]; m13 = M[q + 13 * S]; m14 = M[q + 14 * S]; m15 = M[q + 15 * S]
                # A^T M: rows
                a0 = m0 + m4 + m8; a1 = m1 + m5 + m9; a2 = m2 + m6 + m10; a3 = m3 + m7 + m11
                c0 = m4 - m8 - m12; c1 = m5 - m9 - m13; c2 = m6 - m10 - m14; c3 = m7 - m11 - m15
                y00 = a0 + a1 + a2 + bf; y01 = a1 - a2 - a3 + bf
                y10 = c0 + c1 + c2 + bf; y11 = c1 - c2 - c3 + bf
                m = y00; k = 0
                if y01 > m:
                    m, k = y01, 1
                if y10 > m:
                    m, k = y10, 2
                if y11 > m:
                    m, k = y11, 3
                qy = t // QW
                qx = t - qy * QW
                out[f, n, qy, qx] = max(m, 0.0)
                if training:
                    idx[f, n, qy, qx] = k

def packU(W, dt):
    FN, C = W.shape[:2]
    U, _ = _winograd_weights(W, np.zeros(FN), dt)  # (16, FN, C)
    nbk = -(-FN // FB)
    Up = np.zeros((16, nbk * FB, C), dt); Up[:, :FN] = U
    return np.ascontiguousarray(Up.reshape(16, nbk, FB, C).transpose(0, 1, 3, 2)[:, :, :, None, :])

def best(f, R=11):
    ts=[]
    for _ in range(R):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)*1e3
rng=np.random.default_rng(0); N=100; tot=[0,0]
for C,H,W,FN,P in [(16,28,28,16,1),(32,14,14,32,2),(64,8,8,64,1)]:
    x=rng.standard_normal((N,C,H,W),dtype=np.float32); Wt=rng.standard_normal((FN,C,3,3),dtype=np.float32)*.1; b=rng.standard_normal(FN).astype(np.float32)
    xf,_=nb._flat(x,P,P,3,np.float32); xf=xf.copy(); wk=nb._pack(Wt,np.float32); Hp,Wp=H+2*P,W+2*P; OH,OW=Hp-2,Wp-2
    QH,QW=OH//2,OW//2
    o1=np.empty((FN,N,QH,QW),np.float32); i1=np.empty(o1.shape,np.uint8); o2=o1.copy(); i2=i1.copy()
    bp=nb._padded(b, wk.shape[0]*FB, np.float32); U=packU(Wt,np.float32); zb=np.zeros(U.shape[1]*FB,np.float32)
    nb._forward_pool(xf,N,C,Hp,Wp,OH,OW,3,wk,bp,o1,i1,True); wino_pool(xf,N,C,Hp,Wp,QH,QW,U,b,zb,o2,i2,True)
    err=np.abs(o1-o2).max()/np.abs(o1).max(); agree=(i1==i2).mean()
    t1=best(lambda: nb._forward_pool(xf,N,C,Hp,Wp,OH,OW,3,wk,bp,o1,i1,True)); t2=best(lambda: wino_pool(xf,N,C,Hp,Wp,QH,QW,U,b,zb,o2,i2,True))
    tot[0]+=t1; tot[1]+=t2
    print(f"C{C} {H}x{W} FN{FN}: direct {t1:.2f} winograd {t2:.2f}  rel err {err:.1e} idx agree {agree:.5f}")
print(tot)
