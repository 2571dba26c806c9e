// LayerNorm over each row with optional affine and adaLN modulation:
// y = ((x − mean)/sqrt(var + eps)·weight + bias)·(1 + scale) + shift, each part optional (null).
// Contract = the CPU twin `cpu::layer_norm` with `LayerNormParams`. Input f32 rows `[rows, dim]`
// (the residual stream), output bf16 rows `[rows, dim]` (the next matrix product's input).
//
// One block per row; mean and variance in two passes over the row (it stays in L1), f32 sums.

extern "C" __global__ void layer_norm_modulated_bf16(bf16* __restrict__ y, const float* __restrict__ x, int rows, int dim, float eps,
                                                     const float* __restrict__ weight, const float* __restrict__ bias,
                                                     const float* __restrict__ scale, const float* __restrict__ shift) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (i64)row * dim;
    bf16* yr = y + (i64)row * dim;
    float s = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) s += xr[c];
    const float mean = block_sum(s, scratch) / dim;
    float v = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float d = xr[c] - mean;
        v += d * d;
    }
    const float inv = rsqrtf(block_sum(v, scratch) / dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float o = (xr[c] - mean) * inv;
        if (weight) o *= weight[c];
        if (bias) o += bias[c];
        if (scale) o *= 1.0f + scale[c];
        if (shift) o += shift[c];
        yr[c] = f32_to_bf16(o);
    }
}
