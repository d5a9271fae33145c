// Helpers shared by xpconv's CUDA sources (conv.cu, pool.cu).
//
// Not a kernel source of its own: xpconv/kernels/cuda_source.py puts this text in
// front of each source (then a #line directive, so compiler messages name the
// source's own lines).  No #include (NVRTC has no host headers); 32-bit index
// arithmetic (cupy_ops splits launches over the batch).

// Grid-stride loop of int idx over [0, total): one thread per output element.
// idx + stride never overflows: cupy_ops keeps total <= 2**31 - 1 - threads*blocks.
#define XPC_FOR_EACH(idx, total)                                                      \
    for (int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x); idx < (total);       \
         idx += (int)(blockDim.x * gridDim.x))

// The coordinates of a flat index into a C-contiguous array: idx = (a*B + b)*C + c
// gives (a, b, c); idx = ((a*B + b)*C + c)*D + d gives (a, b, c, d).
__device__ __forceinline__ void xpc_unravel3(int idx, int B, int C, int& a, int& b, int& c)
{
    c = idx % C;
    idx /= C;
    b = idx % B;
    a = idx / B;
}

__device__ __forceinline__ void xpc_unravel4(int idx, int B, int C, int D, int& a, int& b, int& c, int& d)
{
    d = idx % D;
    xpc_unravel3(idx / D, B, C, a, b, c);
}

// Calls visit(i, j, ky, kx) for every window (i, j) of an OH x OW grid of KH x KW
// windows with strides SH/SW whose tap (ky, kx) lands on padded position (hp, wp)
// -- window row outer, column inner: the order the generic col2im adds in.  The
// backward passes gather with it (each input element sums what reaches it), so
// they need no atomics and are deterministic.
template <typename Visit>
__device__ __forceinline__ void xpc_windows_covering(int hp, int wp, int KH, int KW, int SH, int SW, int OH,
                                                     int OW, Visit visit)
{
    for (int ky = hp % SH; ky < KH && ky <= hp; ky += SH) {
        const int i = (hp - ky) / SH;
        if (i >= OH) continue;
        for (int kx = wp % SW; kx < KW && kx <= wp; kx += SW) {
            const int j = (wp - kx) / SW;
            if (j >= OW) continue;
            visit(i, j, ky, kx);
        }
    }
}

// The maximum of load(h, w) over the KH x KW window with top-left corner (h0, w0)
// of an H x W plane, positions outside it reading as neg_inf (-inf, passed in
// since NVRTC has no INFINITY).  *arg gets the first maximal tap ky*KW + kx, as
// xp.argmax picks it: the first of tied maxima, the first NaN if any.
template <typename T, typename Load>
__device__ __forceinline__ T xpc_window_max(int h0, int w0, int KH, int KW, int H, int W, T neg_inf, Load load,
                                            int* arg)
{
    T best = neg_inf;
    int at = 0;
    for (int ky = 0; ky < KH; ++ky) {
        const int h = h0 + ky;
        const bool row_in = h >= 0 && h < H;
        for (int kx = 0; kx < KW; ++kx) {
            const int w = w0 + kx;
            const T v = (row_in && w >= 0 && w < W) ? load(h, w) : neg_inf;
            const int k = ky * KW + kx;
            if (k == 0 || v > best || (v != v && best == best)) {
                best = v;
                at = k;
            }
        }
    }
    *arg = at;
    return best;
}
