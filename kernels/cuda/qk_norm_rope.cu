// RMSNorm of q or k over the full hidden size (all heads together), fused with Wan's 3-D RoPE:
// x ← rope(x / sqrt(mean(x²) + eps) · weight), in place on bf16 rows, f32 arithmetic, one rounding.
// RoPE rotates interleaved channel pairs (2i, 2i+1) of every head by the angle of pair i for the
// row's token (wan2.1.md §1.3a): out₂ᵢ = x₂ᵢ·cos − x₂ᵢ₊₁·sin, out₂ᵢ₊₁ = x₂ᵢ·sin + x₂ᵢ₊₁·cos.
// Contract = the CPU twin `cpu::qk_norm_rope` (RMSNorm then `RopeTable::apply`). `cos`/`sin` are
// the table `[rows, head_dim/2]` of the rows' tokens; null means no rotation (cross-attention).
//
// One block per row.

extern "C" __global__ void qk_norm_rope_bf16(bf16* __restrict__ x, int rows, i64 stride, int heads, int head_dim,
                                             const float* __restrict__ weight, float eps, const float* __restrict__ cos_t,
                                             const float* __restrict__ sin_t) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int dim = heads * head_dim, pairs = head_dim / 2;
    bf16* xr = x + (i64)row * stride;
    const u32* xp = reinterpret_cast<const u32*>(xr);  // channel pairs
    float ss = 0.0f;
    for (int p = threadIdx.x; p < dim / 2; p += blockDim.x) {
        const u32 w2 = xp[p];
        const float a = bf16_to_f32((bf16)(w2 & 0xffffu)), b = bf16_to_f32((bf16)(w2 >> 16));
        ss += a * a + b * b;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / dim + eps);
    u32* xw = reinterpret_cast<u32*>(xr);
    for (int p = threadIdx.x; p < dim / 2; p += blockDim.x) {
        const u32 w2 = xp[p];
        float a = bf16_to_f32((bf16)(w2 & 0xffffu)) * inv * weight[2 * p];
        float b = bf16_to_f32((bf16)(w2 >> 16)) * inv * weight[2 * p + 1];
        if (cos_t) {
            const int j = p % pairs;
            const float c = cos_t[(i64)row * pairs + j], s = sin_t[(i64)row * pairs + j];
            const float ra = a * c - b * s, rb = a * s + b * c;
            a = ra;
            b = rb;
        }
        xw[p] = pack_bf16x2(a, b);
    }
}
