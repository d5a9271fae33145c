// xpconv CUDA kernels for max and average pooling, forward and backward.
//
// Loaded by xpconv/kernels/cuda_source.py into a cupy.RawModule (NVRTC), after
// the helpers of common.cu, and driven by xpconv/kernels/cupy_ops.py.  One thread per output element in a
// grid-stride loop; a float (_f32) and a double (_f64) entry point of each
// kernel with C linkage.  Results equal the generic code in xpconv/ops.py
// (tests/test_cupy_kernels.py).  No #include (NVRTC has no host headers);
// 32-bit index arithmetic (cupy_ops splits launches over the batch).
//
// Argument order of every entry point (cupy_ops._launch relies on it): arrays
// with one block per sample (sliced when a launch is split over the batch),
// then arrays shared by the whole batch, then int total (elements to write),
// then the int sizes, then any scalar of type T.
//
// Shapes: x (N, C, H, W); windows KH x KW, stride SH/SW, pad PH/PW; out and the
// argmax (N, C, OH, OW).  Window position k = ky*KW + kx, as in the generic code.

// Max over each window; padding reads as neg_inf (-inf, passed in since NVRTC
// has no INFINITY).  argmax is the first maximal position (as xp.argmax: the
// first of tied maxima, the first NaN if any).
template <typename T>
__device__ __forceinline__ void max_pool_fwd_impl(const T* __restrict__ x, T* __restrict__ out,
                                                  int* __restrict__ argmax, int total, int H, int W,
                                                  int KH, int KW, int SH, int SW, int PH, int PW,
                                                  int OH, int OW, T neg_inf)
{
    XPC_FOR_EACH(idx, total) {
        int t, i, j;  // t = n*C + c
        xpc_unravel3(idx, OH, OW, t, i, j);
        const T* xc = x + t * H * W;
        int arg;
        out[idx] = xpc_window_max(i * SH - PH, j * SW - PW, KH, KW, H, W, neg_inf,
                                  [&](int h, int w) { return xc[h * W + w]; }, &arg);
        argmax[idx] = arg;
    }
}

// dx as a gather: each input pixel sums dout over the windows whose argmax is
// that pixel (window row outer, column inner: the generic col2im order).  Every
// window's gradient reaches exactly one pixel; no atomics.
template <typename T>
__device__ __forceinline__ void max_pool_bwd_impl(const T* __restrict__ dout, const int* __restrict__ argmax,
                                                  T* __restrict__ dx, int total, int H, int W, int KH,
                                                  int KW, int SH, int SW, int PH, int PW, int OH, int OW)
{
    XPC_FOR_EACH(idx, total) {
        int t, h, w;  // t = n*C + c
        xpc_unravel3(idx, H, W, t, h, w);
        const int base = t * OH * OW;
        T acc = T(0);
        xpc_windows_covering(h + PH, w + PW, KH, KW, SH, SW, OH, OW, [&](int i, int j, int ky, int kx) {
            const int o = base + i * OW + j;
            if (argmax[o] == ky * KW + kx) acc += dout[o];
        });
        dx[idx] = acc;
    }
}

// Mean over each window, zero padding counted (count_include_pad): sum / (KH*KW).
template <typename T>
__device__ __forceinline__ void avg_pool_fwd_impl(const T* __restrict__ x, T* __restrict__ out, int total,
                                                  int H, int W, int KH, int KW, int SH, int SW, int PH,
                                                  int PW, int OH, int OW)
{
    XPC_FOR_EACH(idx, total) {
        int t, i, j;  // t = n*C + c
        xpc_unravel3(idx, OH, OW, t, i, j);
        const T* xc = x + t * H * W;
        const int h0 = i * SH - PH;
        const int w0 = j * SW - PW;
        T acc = T(0);
        for (int ky = 0; ky < KH; ++ky) {
            const int h = h0 + ky;
            if (h < 0 || h >= H) continue;
            for (int kx = 0; kx < KW; ++kx) {
                const int w = w0 + kx;
                if (w >= 0 && w < W) acc += xc[h * W + w];
            }
        }
        out[idx] = acc / T(KH * KW);
    }
}

// dx pixel = sum of dout / (KH*KW) over the windows covering it (gather).
template <typename T>
__device__ __forceinline__ void avg_pool_bwd_impl(const T* __restrict__ dout, T* __restrict__ dx, int total,
                                                  int H, int W, int KH, int KW, int SH, int SW, int PH,
                                                  int PW, int OH, int OW)
{
    const T count = T(KH * KW);
    XPC_FOR_EACH(idx, total) {
        int t, h, w;  // t = n*C + c
        xpc_unravel3(idx, H, W, t, h, w);
        const int base = t * OH * OW;
        T acc = T(0);
        xpc_windows_covering(h + PH, w + PW, KH, KW, SH, SW, OH, OW,
                             [&](int i, int j, int, int) { acc += dout[base + i * OW + j] / count; });
        dx[idx] = acc;
    }
}

#define XPC_POOL_ARGS int total, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW
#define XPC_POOL_PASS total, H, W, KH, KW, SH, SW, PH, PW, OH, OW

#define XPC_POOL_ENTRY_POINTS(SUFFIX, T)                                                                     \
    extern "C" __global__ void xpc_max_pool_fwd_##SUFFIX(const T* __restrict__ x, T* __restrict__ out,       \
                                                         int* __restrict__ argmax, XPC_POOL_ARGS, T neg_inf) \
    {                                                                                                        \
        max_pool_fwd_impl<T>(x, out, argmax, XPC_POOL_PASS, neg_inf);                                        \
    }                                                                                                        \
    extern "C" __global__ void xpc_max_pool_bwd_##SUFFIX(const T* __restrict__ dout,                         \
                                                         const int* __restrict__ argmax, T* __restrict__ dx, \
                                                         XPC_POOL_ARGS)                                      \
    {                                                                                                        \
        max_pool_bwd_impl<T>(dout, argmax, dx, XPC_POOL_PASS);                                               \
    }                                                                                                        \
    extern "C" __global__ void xpc_avg_pool_fwd_##SUFFIX(const T* __restrict__ x, T* __restrict__ out,       \
                                                         XPC_POOL_ARGS)                                      \
    {                                                                                                        \
        avg_pool_fwd_impl<T>(x, out, XPC_POOL_PASS);                                                         \
    }                                                                                                        \
    extern "C" __global__ void xpc_avg_pool_bwd_##SUFFIX(const T* __restrict__ dout, T* __restrict__ dx,     \
                                                         XPC_POOL_ARGS)                                      \
    {                                                                                                        \
        avg_pool_bwd_impl<T>(dout, dx, XPC_POOL_PASS);                                                       \
    }

XPC_POOL_ENTRY_POINTS(f32, float)
XPC_POOL_ENTRY_POINTS(f64, double)
