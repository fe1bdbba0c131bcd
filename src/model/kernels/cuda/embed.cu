// The towers' embeddings on the GPU path, forward and backward. Composed from candle's ops, the
// text embedding is two gathers and an add (each a launch, the ids and positions uploaded
// apart), and the vision embedding a concatenation with the class token, a broadcast add of
// the positions and the pre-layer-norm; their backward adds a zero-filled buffer per edge, a
// reduction over the batch for the positions and copies for the concatenation. Here:
//
// - token_positions: out[r] = table[id_r] + pos[p_r], one warp per row, the ids and positions
//   read as (id, position) pairs. Ids or positions past their table give a zero row; the
//   launchers check them on the host first, so this is only a guard against reading out of
//   bounds.
// - rows_sum: the gathers' backward. Each group of rows is summed into its target row
//   (token id or position) in the group's order, one thread per column, no atomics: the
//   result is deterministic. The host sorts the rows into groups; rows no group targets keep
//   the zeros the launcher fills them with.
// - unfold_patches: the pixels [items][channels][size][size] as rows of patches, row (item,
//   gy, gx) holding the patch's values in the convolution kernel's (channel, y, x) order, so
//   the patch embedding is one product; one thread per value, consecutive threads along a row.
// - class_positions: x[b][j] = (j == 0 ? cls : e[b][j - 1]) + pos[j] for the patch product e,
//   one warp per row; class_positions_norm: the layer norm of those x (each rounded to T
//   first, as the stored sum is) with w and lb, in one pass, without storing x (inference).
// - class_positions_backward: from the gradient of x, the patches' rows (a copy), and each
//   position's gradient summed over the batch in order (the class token's is position 0's).
//
// f32 arithmetic for every element type, each output rounded once. The CPU twins are in
// embed.rs and follow these steps.

#include "common.cuh"

namespace {

using clipft::load;
using clipft::store;
using clipft::warp_sum;

constexpr int NWARPS = 4;  // warps per block of the row kernels
constexpr int COLS = 128;  // threads per block of the column kernels

// grid ceil(n / NWARPS), block NWARPS * 32. at holds n (id, position) pairs.
template <typename T>
__device__ void token_positions(const T* __restrict__ table, const T* __restrict__ pos,
                                const unsigned* __restrict__ at, T* __restrict__ out, int n,
                                int d, int vocab, int positions) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * NWARPS + warp;
    if (row >= n) return;
    const unsigned id = at[2 * (size_t)row], p = at[2 * (size_t)row + 1];
    const bool ok = id < (unsigned)vocab && p < (unsigned)positions;
    T* o = out + (size_t)row * d;
    for (int c = lane; c < d; c += 32) {
        const float v = ok ? load(table[(size_t)id * d + c]) + load(pos[(size_t)p * d + c]) : 0.0f;
        o[c] = store<T>(v);
    }
}

// grid (groups, ceil(d / COLS)), block COLS. Group k sums rows[start[k] .. start[k + 1]) of g
// into row target[k] of out (out_rows rows); start holds groups + 1 offsets into rows (n).
template <typename T>
__device__ void rows_sum(const T* __restrict__ g, const unsigned* __restrict__ start,
                         const unsigned* __restrict__ rows, const unsigned* __restrict__ target,
                         T* __restrict__ out, int groups, int n, int d, int out_rows) {
    const int k = blockIdx.x, c = blockIdx.y * COLS + threadIdx.x;
    if (k >= groups || c >= d) return;
    const unsigned t = target[k];
    if (t >= (unsigned)out_rows) return;
    const unsigned end = min(start[k + 1], (unsigned)n);
    float s = 0.0f;
    for (unsigned i = start[k]; i < end; ++i) {
        const unsigned r = rows[i];
        if (r < (unsigned)n) s += load(g[(size_t)r * d + c]);
    }
    out[(size_t)t * d + c] = store<T>(s);
}

// grid ceil(total / 256), block 256; total = items * grid^2 * channels * p^2 values.
template <typename T>
__device__ void unfold_patches(const T* __restrict__ px, T* __restrict__ out, int items,
                               int channels, int size, int p) {
    const int g = size / p, k = channels * p * p;
    const size_t total = (size_t)items * g * g * k;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const size_t r = i / k;
    const int col = (int)(i % k);
    const int item = (int)(r / ((size_t)g * g)), gy = (int)(r / g % g), gx = (int)(r % g);
    const int ch = col / (p * p), py = col / p % p, pxi = col % p;
    out[i] = px[(((size_t)item * channels + ch) * size + gy * p + py) * size + gx * p + pxi];
}

// Column c of row `row` (item row / t, position row % t) of x, rounded to T as stored.
template <typename T>
__device__ __forceinline__ float class_position(const T* __restrict__ e, const T* __restrict__ cls,
                                                const T* __restrict__ pos, int row, int t, int d,
                                                int c) {
    const int item = row / t, j = row % t;
    const float src = j == 0 ? load(cls[c]) : load(e[((size_t)item * (t - 1) + j - 1) * d + c]);
    return load(store<T>(src + load(pos[(size_t)j * d + c])));
}

// grid ceil(rows / NWARPS), block NWARPS * 32; rows = items * t.
template <typename T>
__device__ void class_positions(const T* __restrict__ e, const T* __restrict__ cls,
                                const T* __restrict__ pos, T* __restrict__ x, int rows, int t,
                                int d) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * NWARPS + warp;
    if (row >= rows) return;
    T* xr = x + (size_t)row * d;
    for (int c = lane; c < d; c += 32) xr[c] = store<T>(class_position(e, cls, pos, row, t, d, c));
}

// grid ceil(rows / NWARPS), block NWARPS * 32. Two passes for the statistics (mean, then the
// squared deviations, as layernorm.cu), a third for the output; x recomputed in each.
template <typename T>
__device__ void class_positions_norm(const T* __restrict__ e, const T* __restrict__ cls,
                                     const T* __restrict__ pos, const T* __restrict__ w,
                                     const T* __restrict__ lb, T* __restrict__ y, int rows,
                                     int t, int d, float eps) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * NWARPS + warp;
    if (row >= rows) return;
    float s = 0.0f;
    for (int c = lane; c < d; c += 32) s += class_position(e, cls, pos, row, t, d, c);
    const float mean = warp_sum(s) / d;
    float v = 0.0f;
    for (int c = lane; c < d; c += 32) {
        const float dv = class_position(e, cls, pos, row, t, d, c) - mean;
        v = fmaf(dv, dv, v);
    }
    const float rstd = rsqrtf(warp_sum(v) / d + eps);
    T* yr = y + (size_t)row * d;
    for (int c = lane; c < d; c += 32) {
        const float h = class_position(e, cls, pos, row, t, d, c);
        yr[c] = store<T>(fmaf((h - mean) * rstd, load(w[c]), load(lb[c])));
    }
}

// grid (t, ceil(d / COLS)), block COLS. dx is [items][t][d]; dpatch [items][t - 1][d], dpos
// [t][d], dcls [d].
template <typename T>
__device__ void class_positions_backward(const T* __restrict__ dx, T* __restrict__ dpatch,
                                         T* __restrict__ dpos, T* __restrict__ dcls, int items,
                                         int t, int d) {
    const int j = blockIdx.x, c = blockIdx.y * COLS + threadIdx.x;
    if (j >= t || c >= d) return;
    float s = 0.0f;
    for (int b = 0; b < items; ++b) {
        const T v = dx[((size_t)b * t + j) * d + c];
        s += load(v);
        if (j > 0) dpatch[((size_t)b * (t - 1) + j - 1) * d + c] = v;
    }
    dpos[(size_t)j * d + c] = store<T>(s);
    if (j == 0) dcls[c] = store<T>(s);
}

}  // namespace

#define EMBED(SUFFIX, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) clipft_token_positions_##SUFFIX(  \
        const T* table, const T* pos, const unsigned* at, T* out, int n, int d, int vocab,      \
        int positions) {                                                                        \
        token_positions<T>(table, pos, at, out, n, d, vocab, positions);                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(COLS) clipft_rows_sum_##SUFFIX(                \
        const T* g, const unsigned* start, const unsigned* rows, const unsigned* target,        \
        T* out, int groups, int n, int d, int out_rows) {                                       \
        rows_sum<T>(g, start, rows, target, out, groups, n, d, out_rows);                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) clipft_unfold_patches_##SUFFIX(           \
        const T* px, T* out, int items, int channels, int size, int p) {                        \
        unfold_patches<T>(px, out, items, channels, size, p);                                   \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) clipft_class_positions_##SUFFIX(  \
        const T* e, const T* cls, const T* pos, T* x, int rows, int t, int d) {                 \
        class_positions<T>(e, cls, pos, x, rows, t, d);                                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32)                                   \
        clipft_class_positions_norm_##SUFFIX(const T* e, const T* cls, const T* pos,            \
                                             const T* w, const T* lb, T* y, int rows, int t,    \
                                             int d, float eps) {                                \
        class_positions_norm<T>(e, cls, pos, w, lb, y, rows, t, d, eps);                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(COLS) clipft_class_positions_backward_##SUFFIX( \
        const T* dx, T* dpatch, T* dpos, T* dcls, int items, int t, int d) {                    \
        class_positions_backward<T>(dx, dpatch, dpos, dcls, items, t, d);                       \
    }

EMBED(f32, float)
EMBED(f16, __half)
EMBED(bf16, __nv_bfloat16)
