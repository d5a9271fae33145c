// xpconv CUDA kernels for convolution: im2col, col2im, and the NHWC <-> NCHW
// moves around the cuBLAS matrix products with bias, ReLU and max pooling fused
// in (the conv -> ReLU -> max-pool block never writes the convolution's output).
//
// Loaded by xpconv/kernels/cuda_source.py into a cupy.RawModule (NVRTC), after
// the helpers of common.cu (XPC_FOR_EACH, xpc_windows_covering, xpc_window_max),
// and driven by xpconv/kernels/cupy_ops.py.  Every kernel is one pass, one thread
// per output element, in a grid-stride loop; each has a float (_f32) and a
// double (_f64) entry point with C linkage.  Results equal the generic code in
// xpconv/ops.py, summing in the same order (tests/test_cupy_kernels.py).
//
// House rules for this file: no #include (NVRTC has no host headers); index
// arithmetic in 32-bit int -- cupy_ops splits a launch over the batch so that
// every array a launch touches holds fewer than 2**31 - 2**24 elements.
//
// Argument order of every entry point (cupy_ops._launch relies on it): arrays
// with one block per sample (sliced when a launch is split over the batch),
// then arrays shared by the whole batch, then int total (elements to write),
// then the int sizes, then any scalar of type T.
//
// Shapes: N batch, C channels, H/W height/width, FH/FW filter, SH/SW stride,
// PH/PW pad, OH/OW output, K = C*FH*FW, P = OH*OW, F = filters.

// col (N*OH*OW, C*FH*FW): row (n*OH + i)*OW + j, column (c*FH + fy)*FW + fx holds
// x[n, c, i*SH - PH + fy, j*SW - PW + fx], or pad_value outside the image.
template <typename T>
__device__ __forceinline__ void im2col_impl(const T* __restrict__ x, T* __restrict__ col, int total,
                                            int C, int H, int W, int FH, int FW, int SH, int SW,
                                            int PH, int PW, int OH, int OW, T pad_value)
{
    const int K = C * FH * FW;
    XPC_FOR_EACH(idx, total) {
        int n, i, j, k, c, fy, fx;
        xpc_unravel4(idx, OH, OW, K, n, i, j, k);
        xpc_unravel3(k, FH, FW, c, fy, fx);
        const int h = i * SH - PH + fy;
        const int w = j * SW - PW + fx;
        col[idx] = (h >= 0 && h < H && w >= 0 && w < W) ? x[((n * C + c) * H + h) * W + w] : pad_value;
    }
}

// Adjoint of im2col as a gather: each pixel of x (N, C, H, W) sums the columns
// that read it, filter row outer and column inner (the generic code's order).
// No atomics, so the result is deterministic.
template <typename T>
__device__ __forceinline__ void col2im_impl(const T* __restrict__ col, T* __restrict__ x, int total,
                                            int C, int H, int W, int FH, int FW, int SH, int SW,
                                            int PH, int PW, int OH, int OW)
{
    const int K = C * FH * FW;
    XPC_FOR_EACH(idx, total) {
        int n, c, h, w;
        xpc_unravel4(idx, C, H, W, n, c, h, w);
        const T* cn = col + n * OH * OW * K + c * FH * FW;
        T acc = T(0);
        xpc_windows_covering(h + PH, w + PW, FH, FW, SH, SW, OH, OW, [&](int i, int j, int fy, int fx) {
            acc += cn[(i * OW + j) * K + fy * FW + fx];
        });
        x[idx] = acc;
    }
}

// out (N, F, P) = y (N*P, F) moved to NCHW, plus bias b (F,); with relu != 0 also
// multiplied by (out > 0), as the generic Relu layer does (x * mask).
template <typename T>
__device__ __forceinline__ void bias_nhwc_to_nchw_impl(const T* __restrict__ y, T* __restrict__ out,
                                                       const T* __restrict__ b, int total, int F, int P, int relu)
{
    XPC_FOR_EACH(idx, total) {
        int n, f, p;
        xpc_unravel3(idx, F, P, n, f, p);
        T v = y[(n * P + p) * F + f] + b[f];
        if (relu) v = v * (v > T(0) ? T(1) : T(0));
        out[idx] = v;
    }
}

// d (N*P, F) = dout (N, F, P) moved to NHWC; when mask is not null, multiplied by
// (mask > 0) on the way (the backward of a fused ReLU, mask = its output).
template <typename T>
__device__ __forceinline__ void nchw_to_nhwc_impl(const T* __restrict__ dout, const T* __restrict__ mask,
                                                  T* __restrict__ d, int total, int F, int P)
{
    XPC_FOR_EACH(idx, total) {
        int n, p, f;
        xpc_unravel3(idx, P, F, n, p, f);
        const int s = (n * F + f) * P + p;
        T v = dout[s];
        if (mask) v = v * (mask[s] > T(0) ? T(1) : T(0));
        d[idx] = v;
    }
}

// The convolution -> ReLU -> max-pool block without writing the convolution's
// output: out (N, F, QH, QW) is the max over KH x KW windows (stride SH/SW, pad
// PH/PW reading as neg_inf) of relu(y + b), y (N*OH*OW, F) the convolution in NHWC
// rows.  argmax, when not null, gets each window's first maximal position, as the
// generic max pool does on the ReLU's output -- or -1 where that maximum is not
// > 0, since the ReLU passes no gradient there.
template <typename T>
__device__ __forceinline__ void bias_relu_maxpool_impl(const T* __restrict__ y, T* __restrict__ out,
                                                       int* __restrict__ argmax, const T* __restrict__ b,
                                                       int total, int F, int OH, int OW, int KH, int KW,
                                                       int SH, int SW, int PH, int PW, int QH, int QW,
                                                       T neg_inf)
{
    XPC_FOR_EACH(idx, total) {
        int n, f, qi, qj;
        xpc_unravel4(idx, F, QH, QW, n, f, qi, qj);
        const T* yn = y + n * OH * OW * F + f;
        const T bias = b[f];
        int arg;
        const T best = xpc_window_max(qi * SH - PH, qj * SW - PW, KH, KW, OH, OW, neg_inf, [&](int h, int w) {
            const T v = yn[(h * OW + w) * F] + bias;
            return v * (v > T(0) ? T(1) : T(0));
        }, &arg);
        out[idx] = best;
        if (argmax) argmax[idx] = best > T(0) ? arg : -1;
    }
}

// Backward of the block above down to the convolution's output, written straight
// as NHWC rows d (N*OH*OW, F): each position sums dpool (N, F, QH, QW) over the
// windows whose argmax it is (gather, window row outer and column inner).
template <typename T>
__device__ __forceinline__ void maxpool_bwd_nhwc_impl(const T* __restrict__ dpool, const int* __restrict__ argmax,
                                                      T* __restrict__ d, int total, int F, int OH, int OW,
                                                      int KH, int KW, int SH, int SW, int PH, int PW, int QH,
                                                      int QW)
{
    XPC_FOR_EACH(idx, total) {
        int n, h, w, f;
        xpc_unravel4(idx, OH, OW, F, n, h, w, f);
        const int base = (n * F + f) * QH * QW;
        T acc = T(0);
        xpc_windows_covering(h + PH, w + PW, KH, KW, SH, SW, QH, QW, [&](int qi, int qj, int ky, int kx) {
            const int o = base + qi * QW + qj;
            if (argmax[o] == ky * KW + kx) acc += dpool[o];
        });
        d[idx] = acc;
    }
}

#define XPC_CONV_ENTRY_POINTS(SUFFIX, T)                                                                   \
    extern "C" __global__ void xpc_im2col_##SUFFIX(const T* __restrict__ x, T* __restrict__ col, int total, \
                                                   int C, int H, int W, int FH, int FW, int SH, int SW,    \
                                                   int PH, int PW, int OH, int OW, T pad_value)            \
    {                                                                                                      \
        im2col_impl<T>(x, col, total, C, H, W, FH, FW, SH, SW, PH, PW, OH, OW, pad_value);                 \
    }                                                                                                      \
    extern "C" __global__ void xpc_col2im_##SUFFIX(const T* __restrict__ col, T* __restrict__ x, int total, \
                                                   int C, int H, int W, int FH, int FW, int SH, int SW,    \
                                                   int PH, int PW, int OH, int OW)                         \
    {                                                                                                      \
        col2im_impl<T>(col, x, total, C, H, W, FH, FW, SH, SW, PH, PW, OH, OW);                            \
    }                                                                                                      \
    extern "C" __global__ void xpc_bias_nhwc_to_nchw_##SUFFIX(const T* __restrict__ y, T* __restrict__ out, \
                                                              const T* __restrict__ b, int total, int F,   \
                                                              int P, int relu)                             \
    {                                                                                                      \
        bias_nhwc_to_nchw_impl<T>(y, out, b, total, F, P, relu);                                           \
    }                                                                                                      \
    extern "C" __global__ void xpc_nchw_to_nhwc_##SUFFIX(const T* __restrict__ dout,                        \
                                                         const T* __restrict__ mask, T* __restrict__ d,    \
                                                         int total, int F, int P)                          \
    {                                                                                                      \
        nchw_to_nhwc_impl<T>(dout, mask, d, total, F, P);                                                  \
    }                                                                                                      \
    extern "C" __global__ void xpc_bias_relu_maxpool_##SUFFIX(const T* __restrict__ y, T* __restrict__ out, \
                                                              int* __restrict__ argmax,                    \
                                                              const T* __restrict__ b, int total, int F,   \
                                                              int OH, int OW, int KH, int KW, int SH,      \
                                                              int SW, int PH, int PW, int QH, int QW,      \
                                                              T neg_inf)                                   \
    {                                                                                                      \
        bias_relu_maxpool_impl<T>(y, out, argmax, b, total, F, OH, OW, KH, KW, SH, SW, PH, PW, QH, QW,     \
                                  neg_inf);                                                                \
    }                                                                                                      \
    extern "C" __global__ void xpc_maxpool_bwd_nhwc_##SUFFIX(const T* __restrict__ dpool,                   \
                                                             const int* __restrict__ argmax,               \
                                                             T* __restrict__ d, int total, int F, int OH,  \
                                                             int OW, int KH, int KW, int SH, int SW,       \
                                                             int PH, int PW, int QH, int QW)               \
    {                                                                                                      \
        maxpool_bwd_nhwc_impl<T>(dpool, argmax, d, total, F, OH, OW, KH, KW, SH, SW, PH, PW, QH, QW);      \
    }

XPC_CONV_ENTRY_POINTS(f32, float)
XPC_CONV_ENTRY_POINTS(f64, double)
