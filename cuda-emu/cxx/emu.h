// The prelude of every emulated kernel file: what nvcc gives a .cu file (qualifiers, the built-in
// thread coordinates, warp and block synchronisation, the intrinsics clipft's kernels use),
// implemented for the CPU. Each CUDA thread of a block runs as a fiber on the launching OS
// thread; a fiber runs until it reaches a barrier (__syncthreads, __syncwarp, a shuffle, a wmma
// operation), and the scheduler (runtime.cc) releases a barrier once every thread it concerns
// is waiting at it. So a kernel that diverges around a warp or block barrier, or shuffles with
// lanes that have exited, is reported instead of silently computing something.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#ifdef CLIPFT_EMU_SCAN
// build.rs's scan of the preprocessed source: the bound stays beside the kernel's name, and
// the kernel's table entry keeps it (a launch over it is refused, as on a GPU).
#define __launch_bounds__(...) CLIPFT_EMU_LAUNCH_BOUNDS(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
// Static __shared__ arrays become function statics: one per kernel instantiation, shared by the
// fibers of the block (blocks run one after another). Dynamic (`extern __shared__`) arrays are
// rewritten by build.rs into pointers to the launch's shared-memory buffer.
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

// The running fiber's coordinates; the scheduler sets them before resuming a fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace clipft_emu {

// What a warp barrier is for: every lane of a warp must reach the same kind.
enum class Sync : int { Shfl, SyncWarp, WmmaLoad, WmmaMma, WmmaStore };

void warp_sync(Sync kind, unsigned mask);
void block_sync();
void* dynamic_shared();
unsigned lane();
// Publishes `v` for the warp's shuffle and returns lane `src`'s value.
uint64_t exchange(uint64_t v, unsigned src, unsigned mask);
// Ends the calling fiber's launch with an error.
[[noreturn]] void fail(const std::string& why);

// One kernel as the emulator's launcher finds it: its name, the argument tags its C++
// signature gives (see `tags`), and how to call it from 64-bit argument slots.
struct Entry {
    const char* name;
    std::string (*tags)();
    void (*invoke)(void* fn, const uint64_t* args);
    void* fn;
    // Threads per block the kernel's __launch_bounds__ allows (1024 without one).
    unsigned max_threads;
};

template <class T> struct Tag;
template <> struct Tag<int> { static constexpr const char* s = "i"; };
template <> struct Tag<long long> { static constexpr const char* s = "l"; };
template <> struct Tag<float> { static constexpr const char* s = "F"; };

template <class T> struct Elem;
template <> struct Elem<float> { static constexpr const char* s = "f"; };
template <> struct Elem<unsigned> { static constexpr const char* s = "u"; };
template <> struct Elem<unsigned long long> { static constexpr const char* s = "q"; };

template <class T> struct Tag<T*> {
    static std::string str() { return std::string("*") + Elem<std::remove_cv_t<T>>::s; }
};

template <class T> std::string tag_of() {
    if constexpr (std::is_pointer_v<T>) {
        return Tag<T>::str();
    } else {
        return Tag<T>::s;
    }
}

template <class T> T from_slot(uint64_t v) {
    if constexpr (std::is_pointer_v<T>) {
        return reinterpret_cast<T>(static_cast<uintptr_t>(v));
    } else if constexpr (std::is_same_v<T, float>) {
        const uint32_t bits = static_cast<uint32_t>(v);
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    } else {
        return static_cast<T>(static_cast<int64_t>(v));
    }
}

template <class... P> std::string tags_of() { return (std::string() + ... + tag_of<P>()); }

template <class... P, size_t... I>
void call(void (*f)(P...), const uint64_t* args, std::index_sequence<I...>) {
    f(from_slot<P>(args[I])...);
}

template <class... P> void invoke(void* fn, const uint64_t* args) {
    call(reinterpret_cast<void (*)(P...)>(fn), args, std::index_sequence_for<P...>{});
}

template <class... P> Entry entry(const char* name, void (*f)(P...), unsigned max_threads) {
    return Entry{name, &tags_of<P...>, &invoke<P...>, reinterpret_cast<void*>(f), max_threads};
}

}  // namespace clipft_emu

#define CLIPFT_EMU_ENTRY(k, bound) clipft_emu::entry(#k, &k, (bound))

inline void __syncthreads() { clipft_emu::block_sync(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    clipft_emu::warp_sync(clipft_emu::Sync::SyncWarp, mask);
}

template <class T> T __shfl_sync(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffles of at most 64 bits");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    u = clipft_emu::exchange(u, static_cast<unsigned>(src) & 31u, mask);
    T r;
    std::memcpy(&r, &u, sizeof(T));
    return r;
}

template <class T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return __shfl_sync(mask, v, static_cast<int>(clipft_emu::lane() ^ static_cast<unsigned>(lane_mask)));
}

template <class T> T __ldg(const T* p) { return *p; }

// Fast-math and explicitly rounded intrinsics: the IEEE operation (build.rs compiles with
// -ffp-contract=off, so nothing is fused behind the kernel's back).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }

// CUDA's overloaded min and max for the integer types the kernels mix.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace clipft_emu {
template <> struct Elem<__half> { static constexpr const char* s = "h"; };
template <> struct Elem<__nv_bfloat16> { static constexpr const char* s = "b"; };
}  // namespace clipft_emu
