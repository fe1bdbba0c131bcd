// The Adam / AdamW step over one f32 parameter on the GPU: weight, gradient and both moments in
// one pass, in place, instead of a dozen candle kernels (and as many temporary tensors) per
// parameter. The CPU twin is kernels/adam.rs (`adam_update`); every operation here is an
// explicitly rounded intrinsic (no contraction into fused multiply-adds, IEEE division and
// square root), in the twin's order, so the GPU gives the CPU's bits.

extern "C" __global__ void clipft_adam(float* __restrict__ w, const float* __restrict__ g,
                                       float* __restrict__ m, float* __restrict__ v,
                                       long long n, int decoupled, float decay, float wd,
                                       float one_minus_beta1, float beta2, float one_minus_beta2,
                                       float eps, float grad_scale, float step_size,
                                       float bc2_sqrt) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float wi = w[i];
        float grad = __fmul_rn(g[i], grad_scale);
        if (decoupled) {
            wi = __fmul_rn(wi, decay);
        } else {
            grad = __fadd_rn(grad, __fmul_rn(wd, wi));
        }
        const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(grad, m[i]), one_minus_beta1));
        const float vi =
            __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_minus_beta2, grad), grad));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        w[i] = __fsub_rn(wi, __fdiv_rn(__fmul_rn(step_size, mi), denom));
        m[i] = mi;
        v[i] = vi;
    }
}
