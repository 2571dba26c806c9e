// Element type conversions between the f32 residual stream / latents and bf16 matrix operands.
// bf16 rounding is to nearest even, as `half::bf16::from_f32` on the CPU. Grid-stride.

extern "C" __global__ void f32_to_bf16_kernel(bf16* __restrict__ out, const float* __restrict__ in, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = f32_to_bf16(in[i]);
}

extern "C" __global__ void bf16_to_f32_kernel(float* __restrict__ out, const bf16* __restrict__ in, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = bf16_to_f32(in[i]);
}
