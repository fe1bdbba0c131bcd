// Multi-head scaled dot-product attention for CLIP's short sequences (77 text tokens under the
// causal mask, 50 to 577 image tokens), inference forward, as one kernel per (item, head, group
// of 16 queries). Queries, keys and values are read straight from the projections' row-major
// [batch * seq, ld] outputs (head h at columns h * hd), and the context is written as
// [batch * seq, heads * hd], ready for the output projection: no head transposes, no score
// matrix in global memory, no separate mask, softmax or copy kernels.
//
// Algorithm (the CPU twin in mod.rs follows it step for step): keys and values go through
// shared memory in tiles of 64 rows, converted to f32; each warp owns 4 query rows (pre-scaled
// by `scale`, kept in shared memory) and, per tile, computes a score per key (lane j takes keys
// j and j + 32, a full dot product each), then updates the row's running maximum m, running
// sum l and output o (lane c owns output dimensions c and c + 32) with the online softmax:
//   m' = max(m, max_j s_j);  a = exp(m - m');  p_j = exp(s_j - m')
//   l = a * l + sum_j p_j;   o = a * o + sum_j p_j v_j
// and at the end writes o / l. Accumulation is f32 for every input type.
//
// Limits: head_dim 32 or 64 (OpenAI CLIP: 64 everywhere); any sequence length.

#include "common.cuh"

namespace {

using clipft::load;
using clipft::store;

constexpr int TILE = 64;        // keys per shared-memory tile
constexpr int WARPS = 4;        // warps per block
constexpr int ROWS = 4;         // query rows per warp
constexpr int MAX_HD = 64;      // largest head dimension
constexpr int PER_LANE = MAX_HD / 32;

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// grid (batch * heads, ceil(seq / (WARPS * ROWS))), block WARPS * 32 threads, dynamic shared
// memory attention_smem_bytes(hd).
template <typename T>
__device__ void attention(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, T* __restrict__ out, int seq, int heads,
                          int hd, int ld, float scale, int causal) {
    extern __shared__ float smem[];
    const int stride = hd + 1;  // padded rows: lanes reading one column of many rows hit
                                // different banks
    float* ks = smem;
    float* vs = ks + TILE * stride;
    float* qs = vs + TILE * stride;  // [WARPS * ROWS][hd]

    const int item = blockIdx.x / heads, h = blockIdx.x % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first = blockIdx.y * WARPS * ROWS;
    const int d = heads * hd;
    const size_t base = (size_t)item * seq;

    // This block's query rows, scaled, into shared memory.
    for (int i = threadIdx.x; i < WARPS * ROWS * hd; i += blockDim.x) {
        const int r = i / hd, c = i % hd, row = first + r;
        qs[i] = row < seq ? load(q[(base + row) * ld + h * hd + c]) * scale : 0.0f;
    }

    float m[ROWS], l[ROWS], o[ROWS][PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) o[r][c] = 0.0f;
    }

    // Keys the block's rows can see: all of them, or up to its last row under the mask.
    const int last = min(seq, first + WARPS * ROWS);
    const int kend = causal ? last : seq;
    const int lanes_hd = hd / 32;

    for (int k0 = 0; k0 < kend; k0 += TILE) {
        const int kn = min(TILE, kend - k0);
        __syncthreads();
        for (int i = threadIdx.x; i < kn * hd; i += blockDim.x) {
            const int j = i / hd, c = i % hd;
            const size_t src = (base + k0 + j) * ld + h * hd + c;
            ks[j * stride + c] = load(k[src]);
            vs[j * stride + c] = load(v[src]);
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = first + warp * ROWS + r;
            if (row >= seq) continue;  // warp-uniform
            // Keys of this tile the row sees: j < jend.
            const int jend = causal ? min(kn, row + 1 - k0) : kn;
            if (jend <= 0) continue;  // warp-uniform
            const float* qr = qs + (warp * ROWS + r) * hd;
            float s[TILE / 32];
            float tmax = -INFINITY;
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) {
                const int j = lane + 32 * t;
                float acc = -INFINITY;
                if (j < jend) {
                    acc = 0.0f;
                    const float* kr = ks + j * stride;
                    for (int c = 0; c < hd; ++c) acc = fmaf(qr[c], kr[c], acc);
                }
                s[t] = acc;
                tmax = fmaxf(tmax, acc);
            }
            const float mnew = fmaxf(m[r], warp_max(tmax));
            const float a = __expf(m[r] - mnew);
            float psum = 0.0f;
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) {
                s[t] = __expf(s[t] - mnew);  // exp(-inf) = 0 for masked keys
                psum += s[t];
            }
            l[r] = a * l[r] + warp_sum(psum);
            m[r] = mnew;
#pragma unroll
            for (int c = 0; c < PER_LANE; ++c) o[r][c] *= a;
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) {
                const int jn = min(32, jend - 32 * t);  // warp-uniform
                for (int jj = 0; jj < jn; ++jj) {
                    const float p = __shfl_sync(0xffffffffu, s[t], jj);
                    const float* vr = vs + (32 * t + jj) * stride;
#pragma unroll
                    for (int c = 0; c < PER_LANE; ++c)
                        if (c < lanes_hd) o[r][c] = fmaf(p, vr[lane + 32 * c], o[r][c]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = first + warp * ROWS + r;
        if (row >= seq) continue;
        const float inv = 1.0f / l[r];
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c)
            if (c < lanes_hd)
                out[(base + row) * d + h * hd + lane + 32 * c] = store<T>(o[r][c] * inv);
    }
}

}  // namespace

#define ATTENTION(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                \
        NAME(const T* q, const T* k, const T* v, T* out, int seq, int heads, int hd, int ld, \
             float scale, int causal) {                                                     \
        attention<T>(q, k, v, out, seq, heads, hd, ld, scale, causal);                      \
    }

ATTENTION(clipft_attention_f32, float)
ATTENTION(clipft_attention_f16, __half)
ATTENTION(clipft_attention_bf16, __nv_bfloat16)
