// Multi-head scaled dot-product attention for CLIP's short sequences (77 text tokens under the
// causal mask, 50 to 577 image tokens), inference forward, as one kernel per (item, head, group
// of 16 queries). Queries, keys and values are read straight from the projections' row-major
// [batch * seq, ld] products (head h at columns h * hd), each projection's bias added as it is
// loaded (so the projection GEMM writes no biased copy), and the context is written as
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
// Backward, for training, over the stacked product qkv [batch * seq, ld] (queries at column 0,
// keys at d, values at 2 d; the stacked bias added on load) and writing d qkv in the same layout
// (also the bias's gradient, summed over rows), as two kernels that each
// recompute what they need instead of keeping the score matrix (FlashAttention-2's split):
//   attention_dq, per (item, head, 16 query rows), like the forward: the row's running maximum
//     and sum again over the key tiles, lse = m + ln l, D = dO . O; then per key
//     p = exp(s - lse), dp = dO . v, ds = p (dp - D), dq += ds k (times scale at the end).
//     Writes dq and each row's lse and D (f32 scratch) for the second kernel.
//   attention_dkv, per (item, head, 16 key rows): queries and output gradients go through
//     shared memory in tiles of 64 (from the first tile that sees the block's keys under the
//     mask); lane i takes query i and i + 32 of the tile, computes p and ds, and the warp
//     accumulates dv += p dO and dk += ds q_scaled with lane c owning dimensions c and c + 32.
// No atomics: each output value is one warp's, so the result is deterministic.
//
// Tensor cores (f16 and bf16, head_dim 64, at most 128 rows): attention_tc, the forward, and
// attention_tc_backward, the whole backward in one kernel; one block per (item, head) holds the
// sequence in shared memory (see each kernel's comment).
//
// Packed batches: with `offsets` (items + 1 row offsets), item i is rows offsets[i] ..
// offsets[i + 1] and a query sees only its own sequence's keys (the text tower stops each
// caption at its end-of-text token); `seq` is then the longest sequence (the grid's extent and
// the statistics' stride) and blocks past a shorter sequence return at once. Without offsets
// (null), item i is rows i * seq .. (i + 1) * seq.
//
// Limits: head_dim 32 or 64 (OpenAI CLIP: 64 everywhere); any sequence length.

#include "common.cuh"

#include <mma.h>

namespace {

using clipft::load;
using clipft::store;
using clipft::warp_max;
using clipft::warp_sum;

constexpr int TILE = 64;        // keys per shared-memory tile
constexpr int WARPS = 4;        // warps per block
constexpr int ROWS = 4;         // query rows per warp
constexpr int MAX_HD = 64;      // largest head dimension
constexpr int PER_LANE = MAX_HD / 32;

// Where sequence `item` lies in the rows: packed end to end (`offsets`, items + 1 of them) or,
// with no offsets, `seq` rows per item.
struct Span {
    size_t base;
    int len;
};

__device__ __forceinline__ Span span(const unsigned* offsets, int item, int seq) {
    if (offsets == nullptr) return {(size_t)item * seq, seq};
    // Through the read-only cache (ptxas then fits attention_dq_f32 in 72 registers without
    // spilling).
    const unsigned first = __ldg(offsets + item), end = __ldg(offsets + item + 1);
    return {(size_t)first, (int)(end - first)};
}

// grid (batch * heads, ceil(seq / (WARPS * ROWS))), block WARPS * 32 threads, dynamic shared
// memory attention_smem_bytes(hd).
template <typename T>
__device__ void attention(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const T* __restrict__ bq,
                          const T* __restrict__ bk, const T* __restrict__ bv, T* __restrict__ out,
                          const unsigned* __restrict__ offsets, int seq, int heads, int hd,
                          int ld, float scale, int causal) {
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
    const Span sp = span(offsets, item, seq);
    const size_t base = sp.base;
    const int len = sp.len;
    if (first >= len) return;  // the whole block: past a shorter packed sequence

    // This block's query rows, scaled, into shared memory.
    for (int i = threadIdx.x; i < WARPS * ROWS * hd; i += blockDim.x) {
        const int r = i / hd, c = i % hd, row = first + r;
        qs[i] = row < len ? (load(q[(base + row) * ld + h * hd + c]) + load(bq[h * hd + c])) * scale
                          : 0.0f;
    }

    float m[ROWS], l[ROWS], o[ROWS][PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) o[r][c] = 0.0f;
    }

    // Keys the block's rows can see: all of the sequence's, or up to its last row under the
    // mask.
    const int last = min(len, first + WARPS * ROWS);
    const int kend = causal ? last : len;
    const int lanes_hd = hd / 32;

    for (int k0 = 0; k0 < kend; k0 += TILE) {
        const int kn = min(TILE, kend - k0);
        __syncthreads();
        for (int i = threadIdx.x; i < kn * hd; i += blockDim.x) {
            const int j = i / hd, c = i % hd;
            const size_t src = (base + k0 + j) * ld + h * hd + c;
            ks[j * stride + c] = load(k[src]) + load(bk[h * hd + c]);
            vs[j * stride + c] = load(v[src]) + load(bv[h * hd + c]);
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = first + warp * ROWS + r;
            if (row >= len) continue;  // warp-uniform
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
        if (row >= len) continue;
        const float inv = 1.0f / l[r];
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c)
            if (c < lanes_hd)
                out[(base + row) * d + h * hd + lane + 32 * c] = store<T>(o[r][c] * inv);
    }
}

// Backward pass 1: dq, and each row's lse and D. grid (batch * heads, ceil(seq / 16)), block
// WARPS * 32, dynamic shared memory attention_dq_smem_bytes(hd).
template <typename T>
__device__ void attention_dq(const T* __restrict__ qkv, const T* __restrict__ bias,
                             const T* __restrict__ o, const T* __restrict__ dout,
                             T* __restrict__ dqkv,
                             float* __restrict__ lse, float* __restrict__ dsum,
                             const unsigned* __restrict__ offsets, int seq, int heads, int hd,
                             int ld, float scale, int causal) {
    extern __shared__ float smem[];
    const int stride = hd + 1;
    float* ks = smem;
    float* vs = ks + TILE * stride;
    float* qs = vs + TILE * stride;      // [WARPS * ROWS][hd], scaled queries
    float* gs = qs + WARPS * ROWS * hd;  // [WARPS * ROWS][hd], output gradients

    const int item = blockIdx.x / heads, h = blockIdx.x % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first = blockIdx.y * WARPS * ROWS;
    const int d = heads * hd;
    const Span sp = span(offsets, item, seq);
    const size_t base = sp.base;
    const int len = sp.len;
    const int lanes_hd = hd / 32;
    if (first >= len) return;  // the whole block: past a shorter packed sequence

    for (int i = threadIdx.x; i < WARPS * ROWS * hd; i += blockDim.x) {
        const int r = i / hd, c = i % hd, row = first + r;
        const bool in = row < len;
        qs[i] = in ? (load(qkv[(base + row) * ld + h * hd + c]) + load(bias[h * hd + c])) * scale
                   : 0.0f;
        gs[i] = in ? load(dout[(base + row) * d + h * hd + c]) : 0.0f;
    }
    __syncthreads();

    float dr[ROWS], m[ROWS], l[ROWS], dq[ROWS][PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = first + warp * ROWS + r;
        float acc = 0.0f;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) {
            dq[r][c] = 0.0f;
            if (row < len && c < lanes_hd)
                acc = fmaf(gs[(warp * ROWS + r) * hd + lane + 32 * c],
                           load(o[(base + row) * d + h * hd + lane + 32 * c]), acc);
        }
        dr[r] = warp_sum(acc);
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }

    const int last = min(len, first + WARPS * ROWS);
    const int kend = causal ? last : len;

    // The softmax statistics, as the forward computes them.
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        const int kn = min(TILE, kend - k0);
        __syncthreads();
        for (int i = threadIdx.x; i < kn * hd; i += blockDim.x) {
            const int j = i / hd, c = i % hd;
            ks[j * stride + c] =
                load(qkv[(base + k0 + j) * ld + d + h * hd + c]) + load(bias[d + h * hd + c]);
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = first + warp * ROWS + r;
            if (row >= len) continue;  // warp-uniform
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
            float psum = 0.0f;
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) psum += __expf(s[t] - mnew);
            l[r] = __expf(m[r] - mnew) * l[r] + warp_sum(psum);
            m[r] = mnew;
        }
    }
    float lr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) lr[r] = m[r] + __logf(l[r]);

    // dq = scale * sum_j p_j (dp_j - D) k_j.
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        const int kn = min(TILE, kend - k0);
        __syncthreads();
        for (int i = threadIdx.x; i < kn * hd; i += blockDim.x) {
            const int j = i / hd, c = i % hd;
            const size_t src = (base + k0 + j) * ld + h * hd + c;
            ks[j * stride + c] = load(qkv[src + d]) + load(bias[d + h * hd + c]);
            vs[j * stride + c] = load(qkv[src + 2 * d]) + load(bias[2 * d + h * hd + c]);
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = first + warp * ROWS + r;
            if (row >= len) continue;  // warp-uniform
            const int jend = causal ? min(kn, row + 1 - k0) : kn;
            if (jend <= 0) continue;  // warp-uniform
            const float* qr = qs + (warp * ROWS + r) * hd;
            const float* gr = gs + (warp * ROWS + r) * hd;
            float ds[TILE / 32];
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) {
                const int j = lane + 32 * t;
                float g = 0.0f;
                if (j < jend) {
                    const float* kr = ks + j * stride;
                    const float* vr = vs + j * stride;
                    float sc = 0.0f, dp = 0.0f;
                    for (int c = 0; c < hd; ++c) {
                        sc = fmaf(qr[c], kr[c], sc);
                        dp = fmaf(gr[c], vr[c], dp);
                    }
                    g = __expf(sc - lr[r]) * (dp - dr[r]);
                }
                ds[t] = g;
            }
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) {
                const int jn = min(32, jend - 32 * t);  // warp-uniform
                for (int jj = 0; jj < jn; ++jj) {
                    const float g = __shfl_sync(0xffffffffu, ds[t], jj);
                    const float* kr = ks + (32 * t + jj) * stride;
#pragma unroll
                    for (int c = 0; c < PER_LANE; ++c)
                        if (c < lanes_hd) dq[r][c] = fmaf(g, kr[lane + 32 * c], dq[r][c]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = first + warp * ROWS + r;
        if (row >= len) continue;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c)
            if (c < lanes_hd)
                dqkv[(base + row) * ld + h * hd + lane + 32 * c] = store<T>(dq[r][c] * scale);
        if (lane == 0) {
            lse[(size_t)blockIdx.x * seq + row] = lr[r];
            dsum[(size_t)blockIdx.x * seq + row] = dr[r];
        }
    }
}

// Backward pass 2: dk and dv. grid (batch * heads, ceil(seq / 16)), block WARPS * 32, dynamic
// shared memory attention_dkv_smem_bytes(hd). Runs after attention_dq (its lse and D).
template <typename T>
__device__ void attention_dkv(const T* __restrict__ qkv, const T* __restrict__ bias,
                              const T* __restrict__ dout,
                              const float* __restrict__ lse, const float* __restrict__ dsum,
                              T* __restrict__ dqkv, const unsigned* __restrict__ offsets,
                              int seq, int heads, int hd, int ld, float scale, int causal) {
    extern __shared__ float smem[];
    const int stride = hd + 1;
    float* qs = smem;                        // [TILE][stride], scaled queries
    float* gs = qs + TILE * stride;          // [TILE][stride], output gradients
    float* kb = gs + TILE * stride;          // [WARPS * ROWS][hd], the block's keys
    float* vb = kb + WARPS * ROWS * hd;      // [WARPS * ROWS][hd], the block's values
    float* ls = vb + WARPS * ROWS * hd;      // [TILE], the tile's lse
    float* dm = ls + TILE;                   // [TILE], the tile's D

    const int item = blockIdx.x / heads, h = blockIdx.x % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first = blockIdx.y * WARPS * ROWS;
    const int d = heads * hd;
    const Span sp = span(offsets, item, seq);
    const size_t base = sp.base;
    const int len = sp.len;
    const size_t stats = (size_t)blockIdx.x * seq;
    const int lanes_hd = hd / 32;
    if (first >= len) return;  // the whole block: past a shorter packed sequence

    for (int i = threadIdx.x; i < WARPS * ROWS * hd; i += blockDim.x) {
        const int r = i / hd, c = i % hd, key = first + r;
        const bool in = key < len;
        const size_t src = (base + key) * ld + h * hd + c;
        kb[i] = in ? load(qkv[src + d]) + load(bias[d + h * hd + c]) : 0.0f;
        vb[i] = in ? load(qkv[src + 2 * d]) + load(bias[2 * d + h * hd + c]) : 0.0f;
    }

    float dk[ROWS][PER_LANE], dv[ROWS][PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) dk[r][c] = dv[r][c] = 0.0f;

    // Under the mask, queries before the block's first key do not see it.
    const int q0 = causal ? (first / TILE) * TILE : 0;
    for (int i0 = q0; i0 < len; i0 += TILE) {
        const int in_tile = min(TILE, len - i0);
        __syncthreads();
        for (int i = threadIdx.x; i < in_tile * hd; i += blockDim.x) {
            const int r = i / hd, c = i % hd;
            const size_t row = base + i0 + r;
            qs[r * stride + c] = (load(qkv[row * ld + h * hd + c]) + load(bias[h * hd + c])) * scale;
            gs[r * stride + c] = load(dout[row * d + h * hd + c]);
        }
        for (int i = threadIdx.x; i < in_tile; i += blockDim.x) {
            ls[i] = lse[stats + i0 + i];
            dm[i] = dsum[stats + i0 + i];
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int key = first + warp * ROWS + r;
            if (key >= len) continue;  // warp-uniform
            const float* kr = kb + (warp * ROWS + r) * hd;
            const float* vr = vb + (warp * ROWS + r) * hd;
            float p[TILE / 32], ds[TILE / 32];
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) {
                const int i = lane + 32 * t;
                float pv = 0.0f, g = 0.0f;
                if (i < in_tile && (!causal || i0 + i >= key)) {
                    const float* qr = qs + i * stride;
                    const float* gr = gs + i * stride;
                    float sc = 0.0f, dp = 0.0f;
                    for (int c = 0; c < hd; ++c) {
                        sc = fmaf(qr[c], kr[c], sc);
                        dp = fmaf(gr[c], vr[c], dp);
                    }
                    pv = __expf(sc - ls[i]);
                    g = pv * (dp - dm[i]);
                }
                p[t] = pv;
                ds[t] = g;
            }
#pragma unroll
            for (int t = 0; t < TILE / 32; ++t) {
                const int jn = min(32, in_tile - 32 * t);  // warp-uniform
                for (int jj = 0; jj < jn; ++jj) {
                    const float pj = __shfl_sync(0xffffffffu, p[t], jj);
                    const float gj = __shfl_sync(0xffffffffu, ds[t], jj);
                    const float* qr = qs + (32 * t + jj) * stride;
                    const float* gr = gs + (32 * t + jj) * stride;
#pragma unroll
                    for (int c = 0; c < PER_LANE; ++c)
                        if (c < lanes_hd) {
                            dv[r][c] = fmaf(pj, gr[lane + 32 * c], dv[r][c]);
                            dk[r][c] = fmaf(gj, qr[lane + 32 * c], dk[r][c]);
                        }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int key = first + warp * ROWS + r;
        if (key >= len) continue;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c)
            if (c < lanes_hd) {
                const size_t dst = (base + key) * ld + h * hd + lane + 32 * c;
                dqkv[dst + d] = store<T>(dk[r][c]);
                dqkv[dst + 2 * d] = store<T>(dv[r][c]);
            }
    }
}

// Tensor-core forward for f16 / bf16, head_dim 64, sequences of at most 128 rows (CLIP's 77
// text and 50 image tokens): one block of TC_WARPS warps per (item, head). The block's keys and
// values (bias added, rounded to T) go to shared memory once; each warp takes 16-query tiles
// in turn: S = Q K^T on tensor cores (wmma 16x16x16, f32 accumulation, only the key tiles the
// tile sees under the mask), the row softmax in f32 over the visible keys, P rounded to T, and
// O = P V on tensor cores, written as T. Q is pre-scaled and rounded to T, as the projections'
// outputs are. Its CPU twin is attention_tc_twin (the same roundings).
constexpr int TC_WARPS = 4;
constexpr int TC_HD = 64;
constexpr int TC_LDH = TC_HD + 8;  // rows of K, V and Q in shared memory (T elements)

// One warp: a 16 x TC_HD tile `a` (rows TC_LDH apart) times the transpose of `nk` 16-row
// tiles of `b` (rows TC_LDH apart), 16 x 16 f32 results side by side in `out` (rows `ldo`
// apart): the scores Q K^T, or dO V^T.
template <typename T>
__device__ __forceinline__ void tc_times_transposed(const T* a, const T* b, int nk, float* out,
                                                    int ldo) {
    using namespace nvcuda;
    for (int kt = 0; kt < nk; ++kt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < TC_HD / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            wmma::load_matrix_sync(fa, a + kk * 16, TC_LDH);
            wmma::load_matrix_sync(fb, b + kt * 16 * TC_LDH + kk * 16, TC_LDH);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(out + kt * 16, acc, ldo, wmma::mem_row_major);
    }
}

// One warp: the softmax of the 16 score rows in `sw` (rows `lds` apart) of the query tile
// starting at sequence row `row0`, over each row's visible keys (none past the sequence's
// `len` rows, under `causal` the row's own and earlier ones), rounded to T into `p` (rows `ldp`
// apart), `ncols` values per row, zero past the visible keys.
template <typename T>
__device__ __forceinline__ void tc_softmax(const float* sw, int lds, int row0, int len,
                                           int causal, T* p, int ldp, int ncols) {
    const int lane = threadIdx.x % 32;
    for (int r = 0; r < 16; ++r) {
        const int row = row0 + r;
        const int visible = row >= len ? 0 : (causal ? row + 1 : len);
        float m = -INFINITY;
        for (int j = lane; j < visible; j += 32) m = fmaxf(m, sw[r * lds + j]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < visible; j += 32) sum += __expf(sw[r * lds + j] - m);
        sum = warp_sum(sum);
        const float inv = visible > 0 ? 1.0f / sum : 0.0f;
        for (int j = lane; j < ncols; j += 32) {
            const float pj = j < visible ? __expf(sw[r * lds + j] - m) * inv : 0.0f;
            p[r * ldp + j] = store<T>(pj);
        }
    }
}

template <typename T>
__device__ void attention_tc(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const T* __restrict__ bq,
                             const T* __restrict__ bk, const T* __restrict__ bv,
                             T* __restrict__ out, const unsigned* __restrict__ offsets, int seq,
                             int heads, int ld, float scale, int causal) {
    // head_dim is TC_HD (64): the launcher checks it.
    using namespace nvcuda;
    extern __shared__ __align__(32) unsigned char tc_smem[];
    // Sized by the launcher for the longest sequence: tp = seq rounded up to 16.
    const int tp = (seq + 15) / 16 * 16;
    const int lds = max(tp, TC_HD) + 4;  // f32 scratch rows
    const int ldp = tp + 8;              // P rows (T elements)
    T* ks = reinterpret_cast<T*>(tc_smem);
    T* vs = ks + tp * TC_LDH;
    T* qw_all = vs + tp * TC_LDH;                                     // [warps][16][TC_LDH]
    float* sw_all = reinterpret_cast<float*>(qw_all + TC_WARPS * 16 * TC_LDH);  // [warps][16][lds]
    T* pw_all = reinterpret_cast<T*>(sw_all + TC_WARPS * 16 * lds);   // [warps][16][ldp]

    const int item = blockIdx.x / heads, h = blockIdx.x % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int d = heads * TC_HD;
    const Span sp = span(offsets, item, seq);
    const size_t base = sp.base;
    const int len = sp.len;
    const int tiles = (len + 15) / 16;
    const int rows = tiles * 16;

    for (int i = threadIdx.x; i < rows * TC_HD; i += blockDim.x) {
        const int j = i / TC_HD, c = i % TC_HD;
        float kv = 0.0f, vv = 0.0f;
        if (j < len) {
            const size_t src = (base + j) * ld + h * TC_HD + c;
            kv = load(k[src]) + load(bk[h * TC_HD + c]);
            vv = load(v[src]) + load(bv[h * TC_HD + c]);
        }
        ks[j * TC_LDH + c] = store<T>(kv);
        vs[j * TC_LDH + c] = store<T>(vv);
    }
    __syncthreads();

    T* qw = qw_all + warp * 16 * TC_LDH;
    float* sw = sw_all + warp * 16 * lds;
    T* pw = pw_all + warp * 16 * ldp;
    for (int qt = warp; qt < tiles; qt += TC_WARPS) {
        for (int i = lane; i < 16 * TC_HD; i += 32) {
            const int r = i / TC_HD, c = i % TC_HD, row = qt * 16 + r;
            const float x =
                row < len ? (load(q[(base + row) * ld + h * TC_HD + c]) + load(bq[h * TC_HD + c])) *
                                scale
                          : 0.0f;
            qw[r * TC_LDH + c] = store<T>(x);
        }
        __syncwarp();
        // Key tiles this query tile sees.
        const int nk = causal ? qt + 1 : tiles;
        tc_times_transposed(qw, ks, nk, sw, lds);
        __syncwarp();
        // Row softmax over the visible keys, in f32; P rounded to T (zero where masked).
        tc_softmax(sw, lds, qt * 16, len, causal, pw, ldp, nk * 16);
        __syncwarp();
        // O = P V, 16 columns at a time, into the f32 scratch.
        for (int ct = 0; ct < TC_HD / 16; ++ct) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int kt = 0; kt < nk; ++kt) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(a, pw + kt * 16, ldp);
                wmma::load_matrix_sync(b, vs + kt * 16 * TC_LDH + ct * 16, TC_LDH);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(sw + ct * 16, acc, lds, wmma::mem_row_major);
        }
        __syncwarp();
        for (int i = lane; i < 16 * TC_HD; i += 32) {
            const int r = i / TC_HD, c = i % TC_HD, row = qt * 16 + r;
            if (row < len) out[(base + row) * d + h * TC_HD + c] = store<T>(sw[r * lds + c]);
        }
        __syncwarp();
    }
}

// Tensor-core backward for f16 / bf16, head_dim 64, sequences of at most 128 rows: one block
// of TC_WARPS warps per (item, head) over the stacked projection, writing d qkv like the
// CUDA-core pair but in one kernel. The whole sequence's scaled queries, keys, values and
// output gradients go to shared memory once (rounded to T, zero past the sequence); each warp
// takes 16-query tiles in turn: S = Q K^T and the row softmax P (as the tensor-core forward),
// dP = dO V^T, dS = P (dP - D) with D = dO . O, and dQ = scale dS K; P and dS stay in shared
// memory (rounded to T), and after a barrier each warp takes 16-key tiles: dV = P^T dO and
// dK = dS^T Q over the query tiles that see them. Products on tensor cores (wmma 16x16x16, f32
// accumulation); every output value is one warp's, so the result is deterministic. Its CPU
// twin is attention_tc_backward_twin (the same roundings).
template <typename T>
__device__ void attention_tc_backward(const T* __restrict__ qkv, const T* __restrict__ bias,
                                      const T* __restrict__ o, const T* __restrict__ dout,
                                      T* __restrict__ dqkv, const unsigned* __restrict__ offsets,
                                      int seq, int heads, int ld, float scale, int causal) {
    // head_dim is TC_HD (64): the launcher checks it.
    using namespace nvcuda;
    extern __shared__ __align__(32) unsigned char tc_smem[];
    // Sized by the launcher for the longest sequence: tp = seq rounded up to 16.
    const int tp = (seq + 15) / 16 * 16;
    const int ldp = tp + 8;              // P and dS rows (T elements)
    const int lds = max(tp, TC_HD) + 4;  // f32 scratch rows
    T* qs = reinterpret_cast<T*>(tc_smem);  // [tp][TC_LDH] scaled queries
    T* ks = qs + tp * TC_LDH;               // keys
    T* vs = ks + tp * TC_LDH;               // values
    T* gs = vs + tp * TC_LDH;               // output gradients
    T* ps = gs + tp * TC_LDH;               // [tp][ldp] P
    T* dss = ps + tp * ldp;                 // [tp][ldp] dS
    float* sw_all = reinterpret_cast<float*>(dss + tp * ldp);  // [warps][16][lds]
    float* dd = sw_all + TC_WARPS * 16 * lds;                  // [tp] D per row

    const int item = blockIdx.x / heads, h = blockIdx.x % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int d = heads * TC_HD;
    const Span sp = span(offsets, item, seq);
    const size_t base = sp.base;
    const int len = sp.len;
    const int tiles = (len + 15) / 16;
    const int rows = tiles * 16;

    for (int i = threadIdx.x; i < rows * TC_HD; i += blockDim.x) {
        const int j = i / TC_HD, c = i % TC_HD;
        float qv = 0.0f, kv = 0.0f, vv = 0.0f, gv = 0.0f;
        if (j < len) {
            const size_t src = (base + j) * ld + h * TC_HD + c;
            qv = (load(qkv[src]) + load(bias[h * TC_HD + c])) * scale;
            kv = load(qkv[src + d]) + load(bias[d + h * TC_HD + c]);
            vv = load(qkv[src + 2 * d]) + load(bias[2 * d + h * TC_HD + c]);
            gv = load(dout[(base + j) * d + h * TC_HD + c]);
        }
        qs[j * TC_LDH + c] = store<T>(qv);
        ks[j * TC_LDH + c] = store<T>(kv);
        vs[j * TC_LDH + c] = store<T>(vv);
        gs[j * TC_LDH + c] = store<T>(gv);
    }
    // D = dO . O, one warp per row (zero past the sequence).
    for (int j = warp; j < rows; j += TC_WARPS) {
        float acc = 0.0f;
        if (j < len)
            for (int c = lane; c < TC_HD; c += 32) {
                const size_t at = (base + j) * d + h * TC_HD + c;
                acc = fmaf(load(dout[at]), load(o[at]), acc);
            }
        acc = warp_sum(acc);
        if (lane == 0) dd[j] = acc;
    }
    __syncthreads();

    float* sw = sw_all + warp * 16 * lds;
    for (int qt = warp; qt < tiles; qt += TC_WARPS) {
        const T* qw = qs + qt * 16 * TC_LDH;
        const T* gw = gs + qt * 16 * TC_LDH;
        // Key tiles this query tile sees.
        const int nk = causal ? qt + 1 : tiles;
        tc_times_transposed(qw, ks, nk, sw, lds);
        __syncwarp();
        // P over the visible keys, rounded to T; zero elsewhere in the row (every key tile's
        // column, for the dK and dV pass).
        tc_softmax(sw, lds, qt * 16, len, causal, ps + qt * 16 * ldp, ldp, rows);
        __syncwarp();
        // dP = dO V^T, over the scores in the scratch.
        tc_times_transposed(gw, vs, nk, sw, lds);
        __syncwarp();
        // dS = P (dP - D), rounded to T (zero where P is).
        for (int r = 0; r < 16; ++r) {
            const int row = qt * 16 + r;
            const float dr = dd[row];
            for (int j = lane; j < rows; j += 32) {
                const float g = j < nk * 16 ? load(ps[row * ldp + j]) * (sw[r * lds + j] - dr) : 0.0f;
                dss[row * ldp + j] = store<T>(g);
            }
        }
        __syncwarp();
        // dQ = scale dS K, 16 columns at a time.
        for (int ct = 0; ct < TC_HD / 16; ++ct) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int kt = 0; kt < nk; ++kt) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(a, dss + qt * 16 * ldp + kt * 16, ldp);
                wmma::load_matrix_sync(b, ks + kt * 16 * TC_LDH + ct * 16, TC_LDH);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(sw + ct * 16, acc, lds, wmma::mem_row_major);
        }
        __syncwarp();
        for (int i = lane; i < 16 * TC_HD; i += 32) {
            const int r = i / TC_HD, c = i % TC_HD, row = qt * 16 + r;
            if (row < len)
                dqkv[(base + row) * ld + h * TC_HD + c] = store<T>(sw[r * lds + c] * scale);
        }
        __syncwarp();
    }
    __syncthreads();
    // Per 16-key tile: dV = P^T dO (part 0) and dK = dS^T Q (part 1), over the query tiles
    // that see the keys.
    for (int kt = warp; kt < tiles; kt += TC_WARPS) {
        const int q0 = causal ? kt : 0;
        for (int part = 0; part < 2; ++part) {
            const T* left = part == 0 ? ps : dss;
            const T* right = part == 0 ? gs : qs;
            for (int ct = 0; ct < TC_HD / 16; ++ct) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.0f);
                for (int qt = q0; qt < tiles; ++qt) {
                    // The transposed tile: element (key, query) at left[query][key].
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                    wmma::load_matrix_sync(a, left + qt * 16 * ldp + kt * 16, ldp);
                    wmma::load_matrix_sync(b, right + qt * 16 * TC_LDH + ct * 16, TC_LDH);
                    wmma::mma_sync(acc, a, b, acc);
                }
                wmma::store_matrix_sync(sw + ct * 16, acc, lds, wmma::mem_row_major);
            }
            __syncwarp();
            const int at = part == 0 ? 2 * d : d;
            for (int i = lane; i < 16 * TC_HD; i += 32) {
                const int r = i / TC_HD, c = i % TC_HD, key = kt * 16 + r;
                if (key < len)
                    dqkv[(base + key) * ld + at + h * TC_HD + c] = store<T>(sw[r * lds + c]);
            }
            __syncwarp();
        }
    }
}
}  // namespace

#define ATTENTION(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                \
        NAME(const T* q, const T* k, const T* v, const T* bq, const T* bk, const T* bv, T* out,  \
             const unsigned* offsets, int seq, int heads, int hd, int ld, float scale,           \
             int causal) {                                                                       \
        attention<T>(q, k, v, bq, bk, bv, out, offsets, seq, heads, hd, ld, scale, causal);     \
    }

ATTENTION(clipft_attention_f32, float)
ATTENTION(clipft_attention_f16, __half)
ATTENTION(clipft_attention_bf16, __nv_bfloat16)

// The same arguments as the CUDA-core forward (hd, always 64 here, included), so one launcher
// serves both.
#define ATTENTION_TC(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                 \
        NAME(const T* q, const T* k, const T* v, const T* bq, const T* bk, const T* bv, T* out,  \
             const unsigned* offsets, int seq, int heads, int hd, int ld, float scale,           \
             int causal) {                                                                       \
        attention_tc<T>(q, k, v, bq, bk, bv, out, offsets, seq, heads, ld, scale, causal);      \
    }

ATTENTION_TC(clipft_attention_tc_f16, __half)
ATTENTION_TC(clipft_attention_tc_bf16, __nv_bfloat16)

#define ATTENTION_BACKWARD(SUFFIX, T)                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) clipft_attention_dq_##SUFFIX(      \
        const T* qkv, const T* bias, const T* o, const T* dout, T* dqkv, float* lse,            \
        float* dsum, const unsigned* offsets, int seq, int heads, int hd, int ld, float scale,   \
        int causal) {                                                                           \
        attention_dq<T>(qkv, bias, o, dout, dqkv, lse, dsum, offsets, seq, heads, hd, ld,       \
                        scale, causal);                                                         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) clipft_attention_dkv_##SUFFIX(     \
        const T* qkv, const T* bias, const T* dout, const float* lse, const float* dsum,        \
        T* dqkv, const unsigned* offsets, int seq, int heads, int hd, int ld, float scale,       \
        int causal) {                                                                           \
        attention_dkv<T>(qkv, bias, dout, lse, dsum, dqkv, offsets, seq, heads, hd, ld, scale,  \
                         causal);                                                               \
    }

// The CUDA-core backward's arguments less its statistics (lse, D): this kernel recomputes them.
#define ATTENTION_TC_BACKWARD(NAME, T)                                                          \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                 \
        NAME(const T* qkv, const T* bias, const T* o, const T* dout, T* dqkv,                   \
             const unsigned* offsets, int seq, int heads, int hd, int ld, float scale,          \
             int causal) {                                                                       \
        attention_tc_backward<T>(qkv, bias, o, dout, dqkv, offsets, seq, heads, ld, scale,       \
                                 causal);                                                        \
    }

ATTENTION_TC_BACKWARD(clipft_attention_tc_backward_f16, __half)
ATTENTION_TC_BACKWARD(clipft_attention_tc_backward_bf16, __nv_bfloat16)

ATTENTION_BACKWARD(f32, float)
ATTENTION_BACKWARD(f16, __half)
ATTENTION_BACKWARD(bf16, __nv_bfloat16)
