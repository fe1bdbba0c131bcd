// The Adam / AdamW step on the GPU: weight, gradient and both moments in one pass, in place,
// instead of a dozen candle kernels (and as many temporary tensors) per parameter. The CPU twin
// is kernels/adam.rs (`adam_update`); every operation here is an explicitly rounded intrinsic
// (no contraction into fused multiply-adds, IEEE division and square root), in the twin's
// order, so the GPU gives the CPU's bits.
//
// Two entry points: `clipft_adam` over one f32 parameter, and `clipft_adam_multi_*` over every
// parameter of a model in one launch (llm.c's fused AdamW over all parameters): each tensor's
// addresses and length come from a table, its gradient may be f16/bf16 (the gradient of the
// compute copy that mixed precision runs on), and the same pass refreshes that compute copy
// from the updated f32 weight, so a mixed-precision step needs no casts of weights or
// gradients at all. `clipft_sum_squares_multi_*` reads the same table for the gradients' sum
// of squares (gradient clipping, f16's overflow check): one partial sum per chunk, added on
// the host in order.

#include "common.cuh"

namespace {

struct AdamScalars {
    int decoupled;
    float decay, wd, one_minus_beta1, beta2, one_minus_beta2, eps, grad_scale, step_size,
        bc2_sqrt;
};

// Element i of w, m and v updated from the gradient value g; returns the new weight.
__device__ __forceinline__ float adam_element(float* __restrict__ w, float g,
                                              float* __restrict__ m, float* __restrict__ v,
                                              long long i, const AdamScalars& s) {
    float wi = w[i];
    float grad = __fmul_rn(g, s.grad_scale);
    if (s.decoupled) {
        wi = __fmul_rn(wi, s.decay);
    } else {
        grad = __fadd_rn(grad, __fmul_rn(s.wd, wi));
    }
    const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(grad, m[i]), s.one_minus_beta1));
    const float vi =
        __fadd_rn(__fmul_rn(v[i], s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, grad), grad));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bc2_sqrt), s.eps);
    wi = __fsub_rn(wi, __fdiv_rn(__fmul_rn(s.step_size, mi), denom));
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
    return wi;
}

// The multi-tensor table: per tensor, kTableWords 64-bit words at these offsets. Addresses
// are device pointers; kCopy is 0 for a tensor without a compute copy. kFirstChunk is the
// number of chunks of all tensors before this one (so the table is sorted by it).
enum : int { kW = 0, kG, kM, kV, kCopy, kLen, kFirstChunk, kTableWords = 8 };

// Elements of one tensor a block updates per table lookup (kernels/cuda/adam.rs: CHUNK).
constexpr long long kChunk = 4096;

// The table entry of the tensor chunk c belongs to: the last one whose first chunk is at or
// before c.
__device__ __forceinline__ const unsigned long long* entry_of(
    const unsigned long long* __restrict__ table, int tensors, int c) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if ((long long)table[mid * kTableWords + kFirstChunk] <= c) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return table + lo * kTableWords;
}

template <typename T>
__device__ void adam_multi(const unsigned long long* __restrict__ table, int tensors,
                           int chunks, const AdamScalars s) {
    for (int c = blockIdx.x; c < chunks; c += gridDim.x) {
        const unsigned long long* e = entry_of(table, tensors, c);
        float* w = reinterpret_cast<float*>(e[kW]);
        const T* g = reinterpret_cast<const T*>(e[kG]);
        float* m = reinterpret_cast<float*>(e[kM]);
        float* v = reinterpret_cast<float*>(e[kV]);
        T* copy = reinterpret_cast<T*>(e[kCopy]);
        const long long n = (long long)e[kLen];
        const long long start = (c - (long long)e[kFirstChunk]) * kChunk;
        const long long end = min(start + kChunk, n);
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float wi = adam_element(w, clipft::load(g[i]), m, v, i, s);
            if (copy != nullptr) {
                copy[i] = clipft::store<T>(wi);
            }
        }
    }
}

// partial[c] = the sum of g^2 over chunk c (f32), for every chunk; only kG, kLen and
// kFirstChunk of the table are read. block kSumThreads.
constexpr int kSumThreads = 256;

template <typename T>
__device__ void sum_squares_multi(const unsigned long long* __restrict__ table, int tensors,
                                  int chunks, float* __restrict__ partial) {
    __shared__ float warp_sums[kSumThreads / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int c = blockIdx.x; c < chunks; c += gridDim.x) {  // block-uniform
        const unsigned long long* e = entry_of(table, tensors, c);
        const T* g = reinterpret_cast<const T*>(e[kG]);
        const long long n = (long long)e[kLen];
        const long long start = (c - (long long)e[kFirstChunk]) * kChunk;
        const long long end = min(start + kChunk, n);
        float sum = 0.0f;
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float v = clipft::load(g[i]);
            sum = fmaf(v, v, sum);
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) warp_sums[warp] = sum;
        __syncthreads();
        if (threadIdx.x == 0) {
            float total = 0.0f;
            for (int w = 0; w < kSumThreads / 32; ++w) total += warp_sums[w];
            partial[c] = total;
        }
        __syncthreads();  // warp_sums is rewritten by the next chunk
    }
}

}  // namespace

extern "C" __global__ void clipft_adam(float* __restrict__ w, const float* __restrict__ g,
                                       float* __restrict__ m, float* __restrict__ v,
                                       long long n, int decoupled, float decay, float wd,
                                       float one_minus_beta1, float beta2, float one_minus_beta2,
                                       float eps, float grad_scale, float step_size,
                                       float bc2_sqrt) {
    const AdamScalars s{decoupled,       decay, wd,         one_minus_beta1, beta2,
                        one_minus_beta2, eps,   grad_scale, step_size,       bc2_sqrt};
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        adam_element(w, g[i], m, v, i, s);
    }
}

#define CLIPFT_ADAM_MULTI(suffix, T)                                                          \
    extern "C" __global__ void clipft_adam_multi_##suffix(                                     \
        const unsigned long long* __restrict__ table, int tensors, int chunks, int decoupled, \
        float decay, float wd, float one_minus_beta1, float beta2, float one_minus_beta2,     \
        float eps, float grad_scale, float step_size, float bc2_sqrt) {                       \
        adam_multi<T>(table, tensors, chunks,                                                 \
                      AdamScalars{decoupled, decay, wd, one_minus_beta1, beta2,               \
                                  one_minus_beta2, eps, grad_scale, step_size, bc2_sqrt});    \
    }

CLIPFT_ADAM_MULTI(f32, float)
CLIPFT_ADAM_MULTI(f16, __half)
CLIPFT_ADAM_MULTI(bf16, __nv_bfloat16)

#define CLIPFT_SUM_SQUARES_MULTI(suffix, T)                                                    \
    extern "C" __global__ void __launch_bounds__(kSumThreads)                                 \
        clipft_sum_squares_multi_##suffix(const unsigned long long* __restrict__ table,       \
                                          int tensors, int chunks, float* __restrict__ partial) { \
        sum_squares_multi<T>(table, tensors, chunks, partial);                                 \
    }

CLIPFT_SUM_SQUARES_MULTI(f32, float)
CLIPFT_SUM_SQUARES_MULTI(f16, __half)
CLIPFT_SUM_SQUARES_MULTI(bf16, __nv_bfloat16)
