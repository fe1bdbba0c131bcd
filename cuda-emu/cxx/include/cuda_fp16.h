// The emulator's __half: IEEE binary16 bits, converted with round to nearest even (GCC's
// _Float16), as cuda_fp16.h's __float2half_rn and __half2float.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t bits;
};

__device__ __forceinline__ float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return static_cast<float>(f);
}

__device__ __forceinline__ __half __float2half_rn(float v) {
    const _Float16 f = static_cast<_Float16>(v);
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
