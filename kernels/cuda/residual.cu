// Gated residual add of adaLN blocks: x[r, c] += y[r, c]·gate[c] (gate null: plain add).
// Contract = the CPU twins `cpu::gated_residual_add` / `cpu::residual_add`. x is the f32 residual
// stream `[rows, dim]`; y (a matrix product's output) is bf16 or f32. Grid-stride over elements.

template <typename YT>
__device__ __forceinline__ void gated_residual_add(float* __restrict__ x, const YT* __restrict__ y, const float* __restrict__ gate,
                                                   i64 n, int dim) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float yv = load_elem(y + i);
        x[i] += gate ? yv * gate[i % dim] : yv;
    }
}

extern "C" __global__ void gated_residual_add_bf16(float* x, const bf16* y, const float* gate, i64 n, int dim) {
    gated_residual_add(x, y, gate, n, dim);
}
extern "C" __global__ void gated_residual_add_f32(float* x, const float* y, const float* gate, i64 n, int dim) {
    gated_residual_add(x, y, gate, n, dim);
}
