// nvcuda::wmma for the emulator. On a GPU a fragment's elements are spread over the warp's
// lanes in an unspecified layout; here every lane holds the whole tile (in f32, which holds
// f16 and bf16 exactly), and loads, stores and products are warp barriers, as the real
// operations are warp-collective. Products accumulate in f32 in k order.
#pragma once

#include "emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    float x[rows * cols];
};

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<float>(v);
}

inline float element(float v) { return v; }
inline float element(__half v) { return __half2float(v); }
inline float element(__nv_bfloat16 v) { return __bfloat162float(v); }

// matrix_a (M x K) or matrix_b (K x N) from row- or column-major memory with leading
// dimension ldm.
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads are not emulated");
    clipft_emu::warp_sync(clipft_emu::Sync::WmmaLoad, 0xffffffffu);
    using F = fragment<Use, M, N, K, T, L>;
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c)
            f.x[r * F::cols + c] = element(std::is_same_v<L, row_major> ? p[(size_t)r * ldm + c]
                                                                         : p[(size_t)c * ldm + r]);
}

template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
    clipft_emu::warp_sync(clipft_emu::Sync::WmmaMma, 0xffffffffu);
    float out[M * N];
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            float acc = c.x[m * N + n];
            for (int k = 0; k < K; ++k) acc += a.x[m * K + k] * b.x[k * N + n];
            out[m * N + n] = acc;
        }
    std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
    clipft_emu::warp_sync(clipft_emu::Sync::WmmaStore, 0xffffffffu);
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) {
            float& dst = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
            dst = f.x[r * N + c];
        }
}

}  // namespace wmma
}  // namespace nvcuda
