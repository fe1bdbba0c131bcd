// The element-wise tails of a linear layer, each one pass over the GEMM's output instead of
// candle's separate bias, activation and residual kernels (quick_gelu alone is three of them,
// its backward a dozen). Rows of `cols` values; f32 arithmetic for every element type.
//   bias_act:          y = act(x + b[col])      act: 0 identity, 1 quick_gelu, 2 gelu (erf)
//   bias_act_backward: dz = dy * act'(x + b[col]), the gradient of the pre-activation (which is
//                      the product's gradient; the bias's is its column sum)
//   bias_residual:     y = x + b[col] + r        (its backward is the identity: no kernel)
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
    }

ELEMENTWISE(f32, float)
ELEMENTWISE(f16, __half)
ELEMENTWISE(bf16, __nv_bfloat16)
