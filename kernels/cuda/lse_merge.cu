// Log-sum-exp merge of two partial attention results over disjoint key sets (ring attention):
// a ← a·w_a + b·w_b with w = exp(lse − max) / Σ, lse_a ← ln(exp(lse_a) + exp(lse_b)).
// Contract = the CPU twin `cpu::merge_partials`: out `[q_len, heads·head_dim]` (f32, packed rows),
// lse `[heads, q_len]`. A row of a whose lse and b's are both −∞ is left as it is.
//
// One block per query row: the threads sweep the row's channels, then update the row's lse values
// (after a barrier, since every channel of a head reads the old lse).

extern "C" __global__ void lse_merge_f32(float* __restrict__ out_a, float* __restrict__ lse_a, const float* __restrict__ out_b,
                                         const float* __restrict__ lse_b, int q_len, int heads, int head_dim) {
    const int row = blockIdx.x;
    if (row >= q_len) return;
    const int hd = heads * head_dim;
    float* a = out_a + (i64)row * hd;
    const float* b = out_b + (i64)row * hd;
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        const int h = c / head_dim;
        const float la = lse_a[(i64)h * q_len + row], lb = lse_b[(i64)h * q_len + row];
        const float mx = fmaxf(la, lb);
        if (mx == NEG_INF) continue;
        const float wa = expf(la - mx), wb = expf(lb - mx);
        const float inv = 1.0f / (wa + wb);
        a[c] = a[c] * (wa * inv) + b[c] * (wb * inv);
    }
    __syncthreads();
    for (int h = threadIdx.x; h < heads; h += blockDim.x) {
        const i64 i = (i64)h * q_len + row;
        const float la = lse_a[i], lb = lse_b[i];
        const float mx = fmaxf(la, lb);
        if (mx != NEG_INF) lse_a[i] = mx + logf(expf(la - mx) + expf(lb - mx));
    }
}
