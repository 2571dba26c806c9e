// Attention with a bias by query-key distance and an additive key mask (T5's relative-position
// attention): out[i, h] = Σ_j p_ij·v[j, h], p_i = softmax_j(scale·q_i·k_j + rel[h·pitch + j + q_len − 1 − i]
// + key_add[j]). bf16 q/k/v rows (strides in elements, head h in channels [h·d, (h+1)·d)), f32
// scores, softmax and accumulation, one rounding of the output to bf16. Contract = the CPU twin
// `cpu::biased_attention`.
//
// One block per (query row, head): the query row is staged in shared memory, each thread scores a
// stride of the keys into shared memory (kv_len floats: the launcher caps kv_len), the block
// reduces max and sum, then each thread accumulates output channels over all keys. Text encoders
// run this on at most a few hundred tokens once per job, so it favours simplicity over tensor
// cores.

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Max over the block (as block_sum); every thread gets the result.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : NEG_INF;
    return warp_max(t);
}

extern "C" __global__ void biased_attention_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, int heads,
                                                 int head_dim, int q_len, int kv_len, i64 q_stride, i64 kv_stride, float scale,
                                                 const float* __restrict__ rel, i64 pitch, const float* __restrict__ key_add,
                                                 bf16* __restrict__ out, i64 out_stride) {
    extern __shared__ float smem[];  // [head_dim] query, then [kv_len] scores
    __shared__ float scratch[32];
    const int i = blockIdx.x, h = blockIdx.y;
    if (i >= q_len || h >= heads) return;
    float* qs = smem;
    float* scores = smem + head_dim;
    const bf16* qr = q + (i64)i * q_stride + (i64)h * head_dim;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) qs[c] = bf16_to_f32(qr[c]);
    __syncthreads();
    const float* bias = rel + (i64)h * pitch + (q_len - 1 - i);
    float local_max = NEG_INF;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        const bf16* kr = k + (i64)j * kv_stride + (i64)h * head_dim;
        float dot = 0.0f;
        for (int c = 0; c < head_dim; ++c) dot += qs[c] * bf16_to_f32(kr[c]);
        float s = dot * scale + bias[j];
        if (key_add) s += key_add[j];
        scores[j] = s;
        local_max = fmaxf(local_max, s);
    }
    const float max = block_max(local_max, scratch);
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        const float e = expf(scores[j] - max);
        scores[j] = e;
        local_sum += e;
    }
    const float inv = 1.0f / block_sum(local_sum, scratch);  // also orders the score writes
    bf16* orow = out + (i64)i * out_stride + (i64)h * head_dim;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
        const bf16* vc = v + (i64)h * head_dim + c;
        float acc = 0.0f;
        for (int j = 0; j < kv_len; ++j) acc += scores[j] * bf16_to_f32(vc[(i64)j * kv_stride]);
        orow[c] = f32_to_bf16(acc * inv);
    }
}
