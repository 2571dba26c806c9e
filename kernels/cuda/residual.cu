// Gated residual add of adaLN blocks: x[r, c] += y[r, c]·gate[c] (gate null: plain add).
// Contract = the CPU twins `cpu::gated_residual_add` / `cpu::residual_add`. x is the f32 residual
// stream `[rows, dim]`; y (a matrix product's output) is bf16 or f32. Blocks stride over rows,
// threads over a row's channels (no per-element index division).

template <typename YT>
__device__ __forceinline__ void gated_residual_add(float* __restrict__ x, const YT* __restrict__ y, const float* __restrict__ gate,
                                                   i64 rows, int dim) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        float* xr = x + r * dim;
        const YT* yr = y + r * dim;
        if (gate) {
            for (int c = threadIdx.x; c < dim; c += blockDim.x) xr[c] += load_elem(yr + c) * gate[c];
        } else {
            for (int c = threadIdx.x; c < dim; c += blockDim.x) xr[c] += load_elem(yr + c);
        }
    }
}

extern "C" __global__ void gated_residual_add_bf16(float* x, const bf16* y, const float* gate, i64 rows, int dim) {
    gated_residual_add(x, y, gate, rows, dim);
}
extern "C" __global__ void gated_residual_add_f32(float* x, const float* y, const float* gate, i64 rows, int dim) {
    gated_residual_add(x, y, gate, rows, dim);
}
