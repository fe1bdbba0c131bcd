// Layer normalisation over rows of `cols` values, forward and backward, for training on the GPU
// (candle's fused layer norm records no backward, and the composed one is a dozen kernels each
// way). f32 statistics and arithmetic for every element type. The CPU twins are in
// layernorm.rs and follow these steps.
//
// Forward, one warp per row: mean = sum x / n, then var = sum (x - mean)^2 / n (two passes over
// the row, as torch), rstd = 1 / sqrt(var + eps), y = (x - mean) rstd w + b.
//
// Backward, one warp per row, NWARPS warps of RPW rows per block: the row's mean and rstd
// again, xh = (x - mean) rstd, g = dy w, then
//   dx = rstd (g - mean(g) - xh mean(g xh))
// and the weight's and bias's gradients, sum over rows of dy xh and of dy, without atomics:
// each warp adds its rows into its own shared-memory row of partial sums, the block adds its
// warps' rows in order into one partial per block, and a second kernel adds the blocks'
// partials in order. The result is deterministic. With `dres` (a residual stream's gradient
// arriving beside the norm's, as in a pre-LN block), dx is rounded to T and dres added to it
// in the same pass, the sum rounded again: what the norm's gradient and a separate add give.
//
// Limits: the backward keeps 2 cols floats per warp in shared memory: cols <= 1024.

#include "common.cuh"

namespace {

using clipft::load;
using clipft::store;
using clipft::warp_sum;

constexpr int NWARPS = 4;  // warps per block, both kernels
constexpr int RPW = 8;     // rows per warp in the backward

// The row's mean and 1 / sqrt(var + eps), in every lane.
template <typename T>
__device__ __forceinline__ void stats(const T* __restrict__ xr, int cols, float eps, int lane,
                                      float& mean, float& rstd) {
    float s = 0.0f;
    for (int c = lane; c < cols; c += 32) s += load(xr[c]);
    mean = warp_sum(s) / cols;
    float v = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        const float d = load(xr[c]) - mean;
        v = fmaf(d, d, v);
    }
    rstd = rsqrtf(warp_sum(v) / cols + eps);
}

// grid ceil(rows / NWARPS), block NWARPS * 32.
template <typename T>
__device__ void layernorm(const T* __restrict__ x, const T* __restrict__ w,
                          const T* __restrict__ b, T* __restrict__ y, int rows, int cols,
                          float eps) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * NWARPS + warp;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * cols;
    float mean, rstd;
    stats(xr, cols, eps, lane, mean, rstd);
    T* yr = y + (size_t)row * cols;
    for (int c = lane; c < cols; c += 32)
        yr[c] = store<T>(fmaf((load(xr[c]) - mean) * rstd, load(w[c]), load(b[c])));
}

// The residual add that closes a block's branch and the layer norm after it, in one pass:
// h = x + b[col] + r (rounded to T: the residual stream), y = layernorm(h) with the
// statistics of the rounded h, as the separate kernels compute them. One warp per row, each
// lane over the same columns in both passes (so it reads back only its own writes). grid
// ceil(rows / NWARPS), block NWARPS * 32. Inference only: training keeps the two ops, whose
// backward candle's autograd can follow.
template <typename T>
__device__ void residual_layernorm(const T* __restrict__ x, const T* __restrict__ b,
                                   const T* __restrict__ r, const T* __restrict__ w,
                                   const T* __restrict__ lb, T* __restrict__ h,
                                   T* __restrict__ y, int rows, int cols, float eps) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * NWARPS + warp;
    if (row >= rows) return;
    const size_t at = (size_t)row * cols;
    T* hr = h + at;
    for (int c = lane; c < cols; c += 32)
        hr[c] = store<T>(load(x[at + c]) + load(b[c]) + load(r[at + c]));
    float mean, rstd;
    stats(hr, cols, eps, lane, mean, rstd);
    T* yr = y + at;
    for (int c = lane; c < cols; c += 32)
        yr[c] = store<T>(fmaf((load(hr[c]) - mean) * rstd, load(w[c]), load(lb[c])));
}

// grid ceil(rows / (NWARPS * RPW)), block NWARPS * 32, dynamic shared memory
// NWARPS * 2 * cols floats; dres may be null. Writes dx and the block's partial sums partial[block][2][cols]
// (the weight's, then the bias's).
template <typename T>
__device__ void layernorm_backward(const T* __restrict__ x, const T* __restrict__ w,
                                   const T* __restrict__ dy, const T* __restrict__ dres,
                                   T* __restrict__ dx,
                                   float* __restrict__ partial, int rows, int cols, float eps) {
    extern __shared__ float acc[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* mine = acc + (size_t)warp * 2 * cols;
    for (int c = lane; c < 2 * cols; c += 32) mine[c] = 0.0f;
    const int first = blockIdx.x * NWARPS * RPW + warp * RPW;
    for (int k = 0; k < RPW; ++k) {
        const int row = first + k;
        if (row >= rows) break;  // warp-uniform
        const T* xr = x + (size_t)row * cols;
        const T* gr = dy + (size_t)row * cols;
        float mean, rstd;
        stats(xr, cols, eps, lane, mean, rstd);
        float sg = 0.0f, sgx = 0.0f;
        for (int c = lane; c < cols; c += 32) {
            const float xh = (load(xr[c]) - mean) * rstd;
            const float g = load(gr[c]) * load(w[c]);
            sg += g;
            sgx = fmaf(g, xh, sgx);
        }
        const float mg = warp_sum(sg) / cols, mgx = warp_sum(sgx) / cols;
        T* dr = dx + (size_t)row * cols;
        const T* rr = dres == nullptr ? nullptr : dres + (size_t)row * cols;
        for (int c = lane; c < cols; c += 32) {
            const float xh = (load(xr[c]) - mean) * rstd;
            const float d = load(gr[c]);
            float v = rstd * (d * load(w[c]) - mg - xh * mgx);
            if (rr != nullptr) v = load(store<T>(v)) + load(rr[c]);
            dr[c] = store<T>(v);
            mine[c] = fmaf(d, xh, mine[c]);
            mine[cols + c] += d;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * cols; i += blockDim.x) {
        float s = 0.0f;
        for (int wp = 0; wp < NWARPS; ++wp) s += acc[(size_t)wp * 2 * cols + i];
        partial[(size_t)blockIdx.x * 2 * cols + i] = s;
    }
}

// grid ceil(2 cols / 256), block 256: out[i] = sum over blocks of partial[block][i], the
// weight's gradient then the bias's.
template <typename T>
__device__ void layernorm_backward_sum(const float* __restrict__ partial, T* __restrict__ out,
                                       int blocks, int cols) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= 2 * cols) return;
    float s = 0.0f;
    for (int b = 0; b < blocks; ++b) s += partial[(size_t)b * 2 * cols + i];
    out[i] = store<T>(s);
}

}  // namespace

#define LAYERNORM(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) clipft_layernorm_##SUFFIX(       \
        const T* x, const T* w, const T* b, T* y, int rows, int cols, float eps) {             \
        layernorm<T>(x, w, b, y, rows, cols, eps);                                             \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32)                                  \
        clipft_layernorm_backward_##SUFFIX(const T* x, const T* w, const T* dy, const T* dres, \
                                           T* dx, float* partial, int rows, int cols,          \
                                           float eps) {                                        \
        layernorm_backward<T>(x, w, dy, dres, dx, partial, rows, cols, eps);                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32)                                  \
        clipft_residual_layernorm_##SUFFIX(const T* x, const T* b, const T* r, const T* w,     \
                                           const T* lb, T* h, T* y, int rows, int cols,        \
                                           float eps) {                                        \
        residual_layernorm<T>(x, b, r, w, lb, h, y, rows, cols, eps);                          \
    }                                                                                          \
    extern "C" __global__ void clipft_layernorm_backward_sum_##SUFFIX(                         \
        const float* partial, T* out, int blocks, int cols) {                                  \
        layernorm_backward_sum<T>(partial, out, blocks, cols);                                 \
    }

LAYERNORM(f32, float)
LAYERNORM(f16, __half)
LAYERNORM(bf16, __nv_bfloat16)
