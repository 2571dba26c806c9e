// The element-wise updates of flow-matching sampling on f32 latents; every coefficient is a scalar
// computed on the host by the sampler (wan2.1.md §5). Contract = the CPU twins in `cpu::sampler`,
// bit for bit: every product, sum and quotient is an explicitly rounded intrinsic (__fmul_rn,
// __fadd_rn, __fsub_rn, __fdiv_rn), so nothing is contracted into a fused multiply-add and the
// order of operations is the twin's.
//   guide_f32:       cond = uncond + g·(cond − uncond)                  (classifier-free guidance)
//   euler_step_f32:  x += dt·v                                           (flow-matching Euler)
//   unipc_step_f32:  UniPC corrector + predictor with its history (x̃_{i−1}, m_{i−1}, m_{i−2})

extern "C" __global__ void guide_f32(float* __restrict__ cond, const float* __restrict__ uncond, float g, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float u = uncond[i];
        cond[i] = __fadd_rn(u, __fmul_rn(g, __fsub_rn(cond[i], u)));
    }
}

extern "C" __global__ void euler_step_f32(float* __restrict__ x, const float* __restrict__ v, float dt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        x[i] = __fadd_rn(x[i], __fmul_rn(dt, v[i]));
    }
}

// One UniPC step. `corrector` 0/1: whether the corrector runs; `c_second` 0/1: its second-order term
// (c_r, c_rho0); `p_second` 0/1: the predictor's second-order term (p_r).
extern "C" __global__ void unipc_step_f32(float* __restrict__ x, const float* __restrict__ v, float* __restrict__ last,
                                          float* __restrict__ m1s, float* __restrict__ m2s, float sigma, int corrector,
                                          float c_ratio, float c_alpha_phi, float c_alpha_b, int c_second, float c_r, float c_rho0,
                                          float c_rho_last, float p_ratio, float p_alpha_phi, float p_alpha_b, int p_second,
                                          float p_r, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float xv = x[i], m1 = m1s[i], m2 = m2s[i];
        // convert_model_output: m_i = x_i − σ_i·v_i, on the uncorrected sample.
        const float m = __fsub_rn(xv, __fmul_rn(sigma, v[i]));
        float xi = xv;
        if (corrector) {
            const float base = __fsub_rn(__fmul_rn(c_ratio, last[i]), __fmul_rn(c_alpha_phi, m1));
            const float corr_res = c_second ? __fmul_rn(c_rho0, __fdiv_rn(__fsub_rn(m2, m1), c_r)) : 0.0f;
            const float d1_t = __fsub_rn(m, m1);
            xi = __fsub_rn(base, __fmul_rn(c_alpha_b, __fadd_rn(corr_res, __fmul_rn(c_rho_last, d1_t))));
        }
        last[i] = xi;
        float next = __fsub_rn(__fmul_rn(p_ratio, xi), __fmul_rn(p_alpha_phi, m));
        if (p_second) next = __fsub_rn(next, __fmul_rn(p_alpha_b, __fmul_rn(0.5f, __fdiv_rn(__fsub_rn(m1, m), p_r))));
        x[i] = next;
        m2s[i] = m1;
        m1s[i] = m;
    }
}
