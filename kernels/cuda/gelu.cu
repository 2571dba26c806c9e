// GELU with the tanh approximation (PyTorch `approximate="tanh"`), in place:
// 0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)·(x + 0.044715·x³) (no cancellation near 0).
// Contract = the CPU twin `cpu::apply_activation(.., Activation::GeluTanh)`. Grid-stride.

template <typename T>
__device__ __forceinline__ void gelu_tanh(T* __restrict__ x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = load_elem(x + i);
        const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        store_elem(x + i, v / (1.0f + expf(-2.0f * u)));
    }
}

extern "C" __global__ void gelu_tanh_bf16(bf16* x, i64 n) { gelu_tanh(x, n); }
extern "C" __global__ void gelu_tanh_f32(float* x, i64 n) { gelu_tanh(x, n); }

// Exact GELU, x·Φ(x) = 0.5·x·(1 + erf(x/√2)), in place (PyTorch `nn.GELU()`, CLIP's MLP). f32
// arithmetic (`erff`: ≤ 2 ulp), one rounding to x's type. Contract = the CPU twin
// `cpu::apply_activation(.., Activation::Gelu)` (erf in f64, rounded once). Grid-stride.

template <typename T>
__device__ __forceinline__ void gelu_erf(T* __restrict__ x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = load_elem(x + i);
        store_elem(x + i, 0.5f * v * (1.0f + erff(v * 0.7071067811865476f)));
    }
}

extern "C" __global__ void gelu_erf_bf16(bf16* x, i64 n) { gelu_erf(x, n); }
extern "C" __global__ void gelu_erf_f32(float* x, i64 n) { gelu_erf(x, n); }

// Elementwise product in place, x[i] ← x[i]·y[i]: f32 arithmetic, one rounding to x's type. The
// gate of T5's gated-GELU feed-forward (gelu(wi_0·h) ⊙ wi_1·h). Contract = the CPU twin
// `cpu::mul_in_place`. Grid-stride.

template <typename T>
__device__ __forceinline__ void mul(T* __restrict__ x, const T* __restrict__ y, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        store_elem(x + i, load_elem(x + i) * load_elem(y + i));
    }
}

extern "C" __global__ void mul_bf16(bf16* x, const bf16* y, i64 n) { mul(x, y, n); }
extern "C" __global__ void mul_f32(float* x, const float* y, i64 n) { mul(x, y, n); }

// Elementwise sum in place, x[i] ← x[i] + y[i]: f32 arithmetic, one rounding to x's type (the
// VAE's residual connections on bf16 activations). Contract = the twin `HostOps::accumulate`
// (`bf16(f32(x) + f32(y))`). Grid-stride.

template <typename T>
__device__ __forceinline__ void add(T* __restrict__ x, const T* __restrict__ y, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        store_elem(x + i, load_elem(x + i) + load_elem(y + i));
    }
}

extern "C" __global__ void add_bf16(bf16* x, const bf16* y, i64 n) { add(x, y, n); }
extern "C" __global__ void add_f32(float* x, const float* y, i64 n) { add(x, y, n); }
