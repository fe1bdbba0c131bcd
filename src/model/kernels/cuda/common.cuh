// What every clipft kernel shares: loads of f32, f16 and bf16 as f32, and the rounded store back,
// so each kernel computes in f32 whatever the tensors hold; a warp's sum and maximum.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace clipft {

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// The sum of v over the 32 lanes of a full warp, in every lane (a butterfly: each lane adds
// in the same order, so all get the same bits).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The largest v over the 32 lanes of a full warp, in every lane.
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

}  // namespace clipft
