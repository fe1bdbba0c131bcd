// Kernels that exercise the emulator itself (tests/cuda_emu.rs): one correct use of each
// barrier kind, and one of each bug the emulator must report rather than hide.

// The block's sum of v, in thread 0 (the others return 0): warp shuffles, then each warp's
// sum through `part` (one slot per warp), which the caller may reuse only after a barrier.
__device__ float block_sum(float v, float* part) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.x == 0)
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += part[w];
    return s;
}

// One block: out[0] = sum of in[0 .. blockDim.x) by warp shuffles, then shared memory.
extern "C" __global__ void emu_selftest_block_sum(const float* in, float* out) {
    __shared__ float part[32];
    const float s = block_sum(in[threadIdx.x], part);
    if (threadIdx.x == 0) out[0] = s;
}

// Half of each warp leaves, the other half shuffles with it.
extern "C" __global__ void emu_selftest_shuffle_after_exit(float* out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// The lanes of a warp at different warp operations.
extern "C" __global__ void emu_selftest_split_warp(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 2 == 0) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    } else {
        __syncwarp();
    }
    out[threadIdx.x] = v;
}

// Half a warp waits at a shuffle, the other half at __syncthreads: neither can go on.
extern "C" __global__ void emu_selftest_deadlock(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = v;
}

// Writes one float past `bytes` of dynamic shared memory.
extern "C" __global__ void emu_selftest_smem_overrun(int bytes) {
    extern __shared__ float buf[];
    if (threadIdx.x == 0) buf[bytes / 4] = 0.0f;
}

// Reads dynamic shared memory nobody wrote: the poison (NaN).
extern "C" __global__ void emu_selftest_smem_uninit(float* out) {
    extern __shared__ float buf[];
    out[threadIdx.x] = buf[threadIdx.x];
}

// Declares at most 64 threads per block.
extern "C" __global__ void __launch_bounds__(64) emu_selftest_bounded(float* out) {
    out[threadIdx.x] = 1.0f;
}

// `rounds` block sums in a row through one shared slot per warp: out[block * rounds + r] = sum
// of in[r * blockDim.x ..][..blockDim.x]. Without `guarded`, the barrier after thread 0 reads
// the slots is missing: a warp running ahead into the next round overwrites its slot first.
extern "C" __global__ void emu_selftest_block_sums(const float* in, float* out, int rounds,
                                                   int guarded) {
    __shared__ float part[32];
    for (int r = 0; r < rounds; ++r) {
        const float s = block_sum(in[r * blockDim.x + threadIdx.x], part);
        if (threadIdx.x == 0) out[blockIdx.x * rounds + r] = s;
        if (guarded) __syncthreads();
    }
}
