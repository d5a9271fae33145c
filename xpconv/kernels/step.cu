// xpconv CUDA kernels for the rest of a training step: ReLU, softmax + cross-entropy,
// Dropout masks and the optimizers' parameter updates -- each one launch.
//
// Loaded by xpconv/kernels/cuda_source.py after common.cu and driven by
// xpconv/kernels/cupy_ops.py, with the argument order of every source here: arrays,
// then int total (elements, or rows, to write), then int sizes, then scalars of
// type T.  Each kernel has a float (_f32) and a double (_f64) entry point.  Results
// equal the generic code (xpconv/ops.py, xpconv/optim.py, xpconv/backend.py), which
// is their spec: the same operations in the same order (tests/test_cupy_kernels.py,
// tests/test_gpu_shape.py).

template <typename T> __device__ __forceinline__ T xpc_exp(T v);
template <> __device__ __forceinline__ float xpc_exp<float>(float v) { return expf(v); }
template <> __device__ __forceinline__ double xpc_exp<double>(double v) { return exp(v); }
template <typename T> __device__ __forceinline__ T xpc_log(T v);
template <> __device__ __forceinline__ float xpc_log<float>(float v) { return logf(v); }
template <> __device__ __forceinline__ double xpc_log<double>(double v) { return log(v); }
template <typename T> __device__ __forceinline__ T xpc_sqrt(T v);
template <> __device__ __forceinline__ float xpc_sqrt<float>(float v) { return sqrtf(v); }
template <> __device__ __forceinline__ double xpc_sqrt<double>(double v) { return sqrt(v); }

// NaN of type T without headers: 0/0 computed at run time.
template <typename T> __device__ __forceinline__ T xpc_nan(T zero) { return zero / zero; }

// ---------------------------------------------------------------- ReLU

template <typename T>
__device__ __forceinline__ void relu_fwd_impl(const T* __restrict__ x, T* __restrict__ out, int total)
{
    XPC_FOR_EACH(i, total) {
        const T v = x[i];
        out[i] = v * (T)(v > (T)0);
    }
}

// the forward's output marks where its input was > 0
template <typename T>
__device__ __forceinline__ void relu_bwd_impl(const T* __restrict__ dout, const T* __restrict__ out,
                                              T* __restrict__ dx, int total)
{
    XPC_FOR_EACH(i, total) { dx[i] = dout[i] * (T)(out[i] > (T)0); }
}

// ---------------------------------------------------------------- softmax + cross-entropy

// One thread per row n of x (N, K): y[n] = softmax(x[n]) through log-softmax, and
// rowloss[n] = -log y[n, t[n]] * inv_n (NaN when t[n] is not in [0, K)).
template <typename T>
__device__ __forceinline__ void softmax_xent_fwd_impl(const T* __restrict__ x, const long long* __restrict__ t,
                                                      T* __restrict__ y, T* __restrict__ rowloss, int total,
                                                      int K, T inv_n)
{
    XPC_FOR_EACH(n, total) {
        const T* row = x + n * K;
        T m = row[0];
        for (int k = 1; k < K; ++k) m = row[k] > m ? row[k] : m;
        T s = (T)0;
        for (int k = 0; k < K; ++k) s += xpc_exp<T>(row[k] - m);
        const T lse = xpc_log<T>(s);
        for (int k = 0; k < K; ++k) y[n * K + k] = xpc_exp<T>((row[k] - m) - lse);
        const long long c = t[n];
        rowloss[n] = (c >= 0 && c < K) ? -((row[c] - m) - lse) * inv_n : xpc_nan<T>((T)0);
    }
}

// dx[n, k] = (y[n, k] - (k == t[n])) * scale, a NaN row where t[n] is out of range.
template <typename T>
__device__ __forceinline__ void softmax_xent_bwd_impl(const T* __restrict__ y, const long long* __restrict__ t,
                                                      T* __restrict__ dx, int total, int K, T scale)
{
    XPC_FOR_EACH(i, total) {
        const int n = i / K, k = i - (i / K) * K;
        const long long c = t[n];
        const T hot = (c >= 0 && c < K) ? (T)(c == k) : xpc_nan<T>((T)0);
        dx[i] = (y[i] - hot) * scale;
    }
}

// ---------------------------------------------------------------- Dropout masks

// lowbias32 (C. Wellons' integer hash): a bijection of 32-bit words with full avalanche.
__device__ __forceinline__ unsigned int xpc_mix32(unsigned int x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// mask[i] = 1 where unit i is kept: (mix(mix(i ^ k1) ^ k2) >> 8) >= threshold, a 24-bit
// uniform against round(ratio * 2**24) -- xpconv.backend.keep_mask, element for element.
template <typename T>
__device__ __forceinline__ void dropout_mask_impl(T* __restrict__ mask, int total, int k1, int k2, int threshold)
{
    XPC_FOR_EACH(i, total) {
        const unsigned int h = xpc_mix32(xpc_mix32((unsigned int)i ^ (unsigned int)k1) ^ (unsigned int)k2);
        mask[i] = (T)((int)(h >> 8) >= threshold);
    }
}

// ---------------------------------------------------------------- optimizer updates (xpconv/optim.py)

// the gradient the update uses: g, plus wd * p when weight decay is on
template <typename T>
__device__ __forceinline__ T xpc_grad(const T* __restrict__ g, const T* __restrict__ p, int i, T wd)
{
    return wd != (T)0 ? g[i] + wd * p[i] : g[i];
}

template <typename T>
__device__ __forceinline__ void sgd_impl(T* p, const T* __restrict__ g, int total, T wd, T lr)
{
    XPC_FOR_EACH(i, total) { p[i] = p[i] - lr * xpc_grad<T>(g, p, i, wd); }
}

template <typename T>
__device__ __forceinline__ void momentum_impl(T* p, const T* __restrict__ g, T* __restrict__ v, int total, T wd,
                                              T lr, T mom)
{
    XPC_FOR_EACH(i, total) {
        const T gi = xpc_grad<T>(g, p, i, wd);
        T vi = v[i] * mom;
        vi = vi - lr * gi;
        v[i] = vi;
        p[i] = p[i] + vi;
    }
}

// mm = momentum**2, lr1 = (1 + momentum) * lr (computed on the host, as optim does)
template <typename T>
__device__ __forceinline__ void nesterov_impl(T* p, const T* __restrict__ g, T* __restrict__ v, int total, T wd,
                                              T lr, T mom, T mm, T lr1)
{
    XPC_FOR_EACH(i, total) {
        const T gi = xpc_grad<T>(g, p, i, wd);
        T pi = p[i] + mm * v[i];
        p[i] = pi - lr1 * gi;
        T vi = v[i] * mom;
        v[i] = vi - lr * gi;
    }
}

// AdaGrad (decay 1, add 1) and RMSprop (decay d, add 1 - d): h = h*decay + (add*g)*g
template <typename T>
__device__ __forceinline__ void adagrad_impl(T* p, const T* __restrict__ g, T* __restrict__ h, int total, T wd,
                                             T lr, T decay, T add, int scaled)
{
    XPC_FOR_EACH(i, total) {
        const T gi = xpc_grad<T>(g, p, i, wd);
        T hi = scaled ? h[i] * decay : h[i];
        hi = scaled ? hi + (add * gi) * gi : hi + gi * gi;
        h[i] = hi;
        p[i] = p[i] - (lr * gi) / (xpc_sqrt<T>(hi) + (T)1e-7);
    }
}

// lr_t: the bias-corrected step size of this update (computed on the host, as optim does)
template <typename T>
__device__ __forceinline__ void adam_impl(T* p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                                          int total, T wd, T lr_t, T one_minus_b1, T one_minus_b2)
{
    XPC_FOR_EACH(i, total) {
        const T gi = xpc_grad<T>(g, p, i, wd);
        const T mi = m[i] + one_minus_b1 * (gi - m[i]);
        const T vi = v[i] + one_minus_b2 * (gi * gi - v[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] - (lr_t * mi) / (xpc_sqrt<T>(vi) + (T)1e-7);
    }
}

#define XPC_STEP_ENTRY_POINTS(SUFFIX, T)                                                                        \
    extern "C" __global__ void xpc_relu_fwd_##SUFFIX(const T* __restrict__ x, T* __restrict__ out, int total)  \
    {                                                                                                            \
        relu_fwd_impl<T>(x, out, total);                                                                         \
    }                                                                                                            \
    extern "C" __global__ void xpc_relu_bwd_##SUFFIX(const T* __restrict__ dout, const T* __restrict__ out,     \
                                                     T* __restrict__ dx, int total)                             \
    {                                                                                                            \
        relu_bwd_impl<T>(dout, out, dx, total);                                                                  \
    }                                                                                                            \
    extern "C" __global__ void xpc_softmax_xent_fwd_##SUFFIX(const T* __restrict__ x,                           \
                                                             const long long* __restrict__ t,                   \
                                                             T* __restrict__ y, T* __restrict__ rowloss,        \
                                                             int total, int K, T inv_n)                         \
    {                                                                                                            \
        softmax_xent_fwd_impl<T>(x, t, y, rowloss, total, K, inv_n);                                             \
    }                                                                                                            \
    extern "C" __global__ void xpc_softmax_xent_bwd_##SUFFIX(const T* __restrict__ y,                           \
                                                             const long long* __restrict__ t,                   \
                                                             T* __restrict__ dx, int total, int K, T scale)     \
    {                                                                                                            \
        softmax_xent_bwd_impl<T>(y, t, dx, total, K, scale);                                                     \
    }                                                                                                            \
    extern "C" __global__ void xpc_dropout_mask_##SUFFIX(T* __restrict__ mask, int total, int k1, int k2,       \
                                                         int threshold)                                         \
    {                                                                                                            \
        dropout_mask_impl<T>(mask, total, k1, k2, threshold);                                                    \
    }                                                                                                            \
    extern "C" __global__ void xpc_sgd_##SUFFIX(T* p, const T* __restrict__ g, int total, T wd, T lr)          \
    {                                                                                                            \
        sgd_impl<T>(p, g, total, wd, lr);                                                                        \
    }                                                                                                            \
    extern "C" __global__ void xpc_momentum_##SUFFIX(T* p, const T* __restrict__ g, T* __restrict__ v,         \
                                                     int total, T wd, T lr, T mom)                              \
    {                                                                                                            \
        momentum_impl<T>(p, g, v, total, wd, lr, mom);                                                           \
    }                                                                                                            \
    extern "C" __global__ void xpc_nesterov_##SUFFIX(T* p, const T* __restrict__ g, T* __restrict__ v,         \
                                                     int total, T wd, T lr, T mom, T mm, T lr1)                 \
    {                                                                                                            \
        nesterov_impl<T>(p, g, v, total, wd, lr, mom, mm, lr1);                                                  \
    }                                                                                                            \
    extern "C" __global__ void xpc_adagrad_##SUFFIX(T* p, const T* __restrict__ g, T* __restrict__ h,          \
                                                    int total, int scaled, T wd, T lr, T decay, T add)          \
    {                                                                                                            \
        adagrad_impl<T>(p, g, h, total, wd, lr, decay, add, scaled);                                             \
    }                                                                                                            \
    extern "C" __global__ void xpc_adam_##SUFFIX(T* p, const T* __restrict__ g, T* __restrict__ m,             \
                                                 T* __restrict__ v, int total, T wd, T lr_t, T omb1, T omb2)    \
    {                                                                                                            \
        adam_impl<T>(p, g, m, v, total, wd, lr_t, omb1, omb2);                                                   \
    }

XPC_STEP_ENTRY_POINTS(f32, float)
XPC_STEP_ENTRY_POINTS(f64, double)
