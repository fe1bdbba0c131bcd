// CLIPLoss, fused: the rows' L2 normalisation, and the symmetric cross-entropy over the scaled
// similarity matrix, forward and backward; the similarity product itself is a GEMM (candle's).
//
// For text features t and image features i (rows of a batch of B pairs), s = exp(logit_scale):
//   tn = t / |t|, in = i / |i|            (clipft_row_norm_*, one warp per row, f32 out)
//   X = tn in^T                           (a GEMM, outside)
//   L = s X; loss = (sum_k lse_row(L)_k - L_kk + sum_k lse_col(L)_k - L_kk) / (2 B)
// forward: clipft_clip_ce_lse (one warp per row and per column: the log-sum-exp of L's row or
// column k and its term lse - L_kk), then clipft_clip_ce_sum over the 2 B terms.
// backward, for an upstream gradient g of the loss:
//   dL_kj = g / (2 B) (exp(L_kj - lse_row_k) + exp(L_kj - lse_col_j) - 2 [k = j])
//   dX = s dL, d logit_scale = sum dL L    (clipft_clip_ce_backward, one warp per row, then
//                                           clipft_clip_ce_sum over the rows' partial sums)
//   dt = (d tn - tn (tn . d tn)) / |t|     (clipft_row_norm_backward_*, in t's dtype)
// Every sum runs in a fixed order (lanes, then the warp's butterfly, then one block's tree), so
// the results are deterministic. The CPU twins in clip_loss.rs follow the same steps.

#include "common.cuh"

namespace {

using clipft::load;
using clipft::store;
using clipft::warp_max;
using clipft::warp_sum;

constexpr int WARPS = 4;

// y = x / |x| per row (f32); grid ceil(rows / WARPS), block WARPS * 32.
template <typename T>
__device__ void row_norm(const T* __restrict__ x, float* __restrict__ y, int rows, int cols) {
    const int row = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * cols;
    float ss = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        const float v = load(xr[c]);
        ss = fmaf(v, v, ss);
    }
    const float inv = 1.0f / sqrtf(warp_sum(ss));
    float* yr = y + (size_t)row * cols;
    for (int c = lane; c < cols; c += 32) yr[c] = load(xr[c]) * inv;
}

// dx = (dy - y (y . dy)) / |x| per row, y = x / |x| recomputed; in x's type.
template <typename T>
__device__ void row_norm_backward(const T* __restrict__ x, const float* __restrict__ dy,
                                  T* __restrict__ dx, int rows, int cols) {
    const int row = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * cols;
    const float* gr = dy + (size_t)row * cols;
    float ss = 0.0f, dot = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        const float v = load(xr[c]);
        ss = fmaf(v, v, ss);
        dot = fmaf(v, gr[c], dot);
    }
    const float inv = 1.0f / sqrtf(warp_sum(ss));
    // y . dy = (x . dy) / |x|
    const float ydy = warp_sum(dot) * inv;
    T* dr = dx + (size_t)row * cols;
    for (int c = lane; c < cols; c += 32) {
        const float y = load(xr[c]) * inv;
        dr[c] = store<T>((gr[c] - y * ydy) * inv);
    }
}

}  // namespace

#define ROW_NORM(SUFFIX, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                    \
        clipft_row_norm_##SUFFIX(const T* x, float* y, int rows, int cols) {                    \
        row_norm<T>(x, y, rows, cols);                                                          \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) clipft_row_norm_backward_##SUFFIX( \
        const T* x, const float* dy, T* dx, int rows, int cols) {                               \
        row_norm_backward<T>(x, dy, dx, rows, cols);                                            \
    }

ROW_NORM(f32, float)
ROW_NORM(f16, __half)
ROW_NORM(bf16, __nv_bfloat16)

// Warp w < b: row w of L = s X; warp b + w: column w. Writes the log-sum-exp to lse[w] (rows)
// or lse[b + w] (columns) and the term lse - L_ww to terms at the same index. grid
// ceil(2 b / WARPS), block WARPS * 32.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    clipft_clip_ce_lse(const float* __restrict__ x, const float* __restrict__ log_scale,
                       float* __restrict__ lse, float* __restrict__ terms, int b) {
    const int w = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (w >= 2 * b) return;
    const float s = expf(log_scale[0]);
    const bool col = w >= b;
    const int k = col ? w - b : w;
    // Element j of the row or column.
    auto at = [&](int j) { return s * (col ? x[(size_t)j * b + k] : x[(size_t)k * b + j]); };
    float m = -INFINITY;
    for (int j = lane; j < b; j += 32) m = fmaxf(m, at(j));
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < b; j += 32) sum += expf(at(j) - m);
    const float l = m + logf(warp_sum(sum));
    if (lane == 0) {
        lse[w] = l;
        terms[w] = l - s * x[(size_t)k * b + k];
    }
}

// out[0] = factor * sum(v[0..n]): one block of 256 threads, thread-strided sums, then a tree.
extern "C" __global__ void __launch_bounds__(256)
    clipft_clip_ce_sum(const float* __restrict__ v, float* __restrict__ out, int n,
                       float factor) {
    __shared__ float part[256];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += 256) acc += v[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int h = 128; h > 0; h >>= 1) {
        if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = part[0] * factor;
}

// One warp per row k of the b x b similarities: dX_kj = s dL_kj into dx, and sum_j dL_kj L_kj
// into partial[k]. g: the loss's gradient (one value on the device). grid ceil(b / WARPS),
// block WARPS * 32.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    clipft_clip_ce_backward(const float* __restrict__ x, const float* __restrict__ log_scale,
                            const float* __restrict__ lse, const float* __restrict__ g,
                            float* __restrict__ dx, float* __restrict__ partial, int b) {
    const int k = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (k >= b) return;
    const float s = expf(log_scale[0]);
    const float scale = g[0] / (2.0f * b);
    const float lr = lse[k];
    float acc = 0.0f;
    for (int j = lane; j < b; j += 32) {
        const float l = s * x[(size_t)k * b + j];
        const float d =
            scale * (expf(l - lr) + expf(l - lse[b + j]) - (j == k ? 2.0f : 0.0f));
        dx[(size_t)k * b + j] = s * d;
        acc = fmaf(d, l, acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) partial[k] = acc;
}
