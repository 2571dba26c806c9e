// Element-wise parts of sampling on f32 latents; every coefficient is a scalar computed on the host
// by the sampler (flow matching, wan2.1.md §5). Contract = the CPU twins in `cpu::sampler`.
//   cfg_combine:   out = uncond + g·(cond − uncond)                 (classifier-free guidance)
//   euler_step:    x += dt·v                                         (flow-matching Euler, in place)
//   weighted_sum:  out = Σ_{t < terms} c_t·in_t, terms ≤ 4           (UniPC predictor / corrector,
//                  data estimate x − σ·v, any linear update of latents)

extern "C" __global__ void cfg_combine_f32(float* __restrict__ out, const float* __restrict__ uncond, const float* __restrict__ cond,
                                           float g, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float u = uncond[i];
        out[i] = u + g * (cond[i] - u);
    }
}

extern "C" __global__ void euler_step_f32(float* __restrict__ x, const float* __restrict__ v, float dt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) x[i] += dt * v[i];
}

extern "C" __global__ void weighted_sum_f32(float* __restrict__ out, int terms, const float* __restrict__ in0, float c0,
                                            const float* __restrict__ in1, float c1, const float* __restrict__ in2, float c2,
                                            const float* __restrict__ in3, float c3, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float acc = c0 * in0[i];
        if (terms > 1) acc += c1 * in1[i];
        if (terms > 2) acc += c2 * in2[i];
        if (terms > 3) acc += c3 * in3[i];
        out[i] = acc;
    }
}
