// The element-wise tails of a linear layer, each one pass over the GEMM's output instead of
// candle's separate bias, activation and residual kernels (quick_gelu alone is three of them,
// its backward a dozen). Rows of `cols` values; f32 arithmetic for every element type.
//   bias_act:          y = act(x + b[col])      act: 0 identity, 1 quick_gelu, 2 gelu (erf)
//   bias_act_backward: dz = dy * act'(x + b[col]), the gradient of the pre-activation (which is
//                      the product's gradient; the bias's is its column sum)
//   bias_residual:     y = x + b[col] + r        (its backward is the identity: no kernel)
//   column_sum:        a bias's gradient, sum over rows of g[row][col], read in g's own type
//                      and accumulated in f32 (no f32 copy of g): per chunk of COLSUM_ROWS rows
//                      a partial per column (threads own consecutive columns, so every row
//                      is read coalesced), then the partials added in chunk order, so the
//                      result is deterministic.
// The CPU twins are in elementwise.rs.

#include "common.cuh"

namespace {

using clipft::load;
using clipft::store;

__device__ __forceinline__ float activate(float v, int act) {
    switch (act) {
        case 1: return v / (1.0f + expf(-1.702f * v));                 // x * sigmoid(1.702 x)
        case 2: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        default: return v;
    }
}

template <typename T>
__device__ void bias_act(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y,
                         long long n, int cols, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = store<T>(activate(load(x[i]) + load(b[i % cols]), act));
    }
}

__device__ __forceinline__ float derivative(float v, int act) {
    switch (act) {
        case 1: {
            const float sg = 1.0f / (1.0f + expf(-1.702f * v));
            return sg + 1.702f * v * sg * (1.0f - sg);
        }
        case 2:
            return 0.5f * (1.0f + erff(v * 0.70710678118654752f)) +
                   v * 0.39894228040143268f * expf(-0.5f * v * v);
        default: return 1.0f;
    }
}

template <typename T>
__device__ void bias_act_backward(const T* __restrict__ x, const T* __restrict__ b,
                                  const T* __restrict__ dy, T* __restrict__ dz, long long n,
                                  int cols, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dz[i] = store<T>(load(dy[i]) * derivative(load(x[i]) + load(b[i % cols]), act));
    }
}

template <typename T>
__device__ void bias_residual(const T* __restrict__ x, const T* __restrict__ b,
                              const T* __restrict__ r, T* __restrict__ y, long long n, int cols) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = store<T>(load(x[i]) + load(b[i % cols]) + load(r[i]));
    }
}

constexpr int COLSUM_ROWS = 64;  // rows per chunk

// grid (ceil(cols / 256), ceil(rows / COLSUM_ROWS)), block 256.
template <typename T>
__device__ void column_sum_partial(const T* __restrict__ g, float* __restrict__ partial,
                                   long long rows, int cols) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    const long long first = (long long)blockIdx.y * COLSUM_ROWS;
    const long long last = min(rows, first + COLSUM_ROWS);
    float s = 0.0f;
    for (long long r = first; r < last; ++r) s += load(g[r * cols + col]);
    partial[(size_t)blockIdx.y * cols + col] = s;
}

// grid ceil(cols / 256), block 256.
template <typename T>
__device__ void column_sum_total(const float* __restrict__ partial, T* __restrict__ out,
                                 int chunks, int cols) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * cols + col];
    out[col] = store<T>(s);
}

}  // namespace

#define ELEMENTWISE(SUFFIX, T)                                                                \
    extern "C" __global__ void clipft_bias_act_##SUFFIX(const T* x, const T* b, T* y,         \
                                                        long long n, int cols, int act) {     \
        bias_act<T>(x, b, y, n, cols, act);                                                   \
    }                                                                                         \
    extern "C" __global__ void clipft_bias_act_backward_##SUFFIX(                             \
        const T* x, const T* b, const T* dy, T* dz, long long n, int cols, int act) {         \
        bias_act_backward<T>(x, b, dy, dz, n, cols, act);                                     \
    }                                                                                         \
    extern "C" __global__ void clipft_bias_residual_##SUFFIX(const T* x, const T* b,          \
                                                             const T* r, T* y, long long n,   \
                                                             int cols) {                      \
        bias_residual<T>(x, b, r, y, n, cols);                                                \
    }                                                                                         \
    extern "C" __global__ void clipft_column_sum_partial_##SUFFIX(                            \
        const T* g, float* partial, long long rows, int cols) {                               \
        column_sum_partial<T>(g, partial, rows, cols);                                        \
    }                                                                                         \
    extern "C" __global__ void clipft_column_sum_total_##SUFFIX(const float* partial, T* out, \
                                                                int chunks, int cols) {       \
        column_sum_total<T>(partial, out, chunks, cols);                                      \
    }

ELEMENTWISE(f32, float)
ELEMENTWISE(f16, __half)
ELEMENTWISE(bf16, __nv_bfloat16)
