// The emulator's __nv_bfloat16: the upper 16 bits of an f32, rounded to nearest even (NaN kept
// quiet), as cuda_bf16.h's __float2bfloat16_rn and __bfloat162float.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    uint16_t bits;
};

__device__ __forceinline__ float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

__device__ __forceinline__ __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
    } else {
        h.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return h;
}
