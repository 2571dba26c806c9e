// Attention for heads wider than the flash kernel's 128 channels (multiples of 8 up to 512; the
// VAE's mid-block runs one head of 384 over every position of a frame): softmax(scale·q·kᵀ)·v per
// head with the per-row log-sum-exp. Same contract as `flash_attention.cu` and the CPU twin
// `cpu::attention`: bf16 token-major rows with strides (multiples of 8, 16-byte aligned starts),
// head h in the channels [h·D, (h+1)·D) of each row; out `[q_len, out_stride]` bf16 or f32 (even
// stride and start), lse `[heads, q_len]` = ln Σ_j exp(scale·q·k_j) (−∞ and a zero output when
// there are no keys).
//
// One block = 8 warps = 8 query rows of one head; a warp owns a query row. Tiles of 32 keys are
// staged in shared memory, then the same buffer holds the tile's 32 values: lane j scores key j
// (a full dot product over the head against the warp's query row in shared memory), the warp
// takes the tile's max and sum (online softmax, f32 throughout: probabilities are not rounded),
// and each lane accumulates its channel pairs c = lane + 32·i (i < 8) over the tile's keys, the
// probabilities broadcast by shuffles. Key rows in shared memory are WA_LDW words apart, an odd
// number, so the 32 lanes reading the same word of 32 rows hit 32 distinct banks. No tensor
// cores: correct and simple before fast.

#define WA_WARPS 8
#define WA_BN 32                        // keys per tile
#define WA_MAX_D 512                    // widest head
#define WA_PAIRS (WA_MAX_D / 64)        // channel pairs per lane at the widest head
#define WA_LDW (WA_MAX_D / 2 + 1)       // 32-bit words per staged row (odd: conflict-free columns)

__device__ __forceinline__ float wa_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The two bf16 of a 32-bit word (the lower address in the low half).
__device__ __forceinline__ float lo_bf16(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf16(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Rows [r0, r0 + WA_BN) of a token-major matrix (row stride `stride`, head_dim channels from
// `base`, 16-byte aligned rows) into `s` (WA_LDW words apart); rows at or past `rows_valid` are zero.
__device__ __forceinline__ void wa_load_tile(u32* s, const bf16* base, i64 stride, int r0, int rows_valid, int chunks) {
    for (int c = threadIdx.x; c < WA_BN * chunks; c += WA_WARPS * 32) {
        const int r = c / chunks, col = c - r * chunks;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < rows_valid) v = *reinterpret_cast<const uint4*>(base + (i64)(r0 + r) * stride + col * 8);
        u32* d = s + r * WA_LDW + col * 4;
        d[0] = v.x;
        d[1] = v.y;
        d[2] = v.z;
        d[3] = v.w;
    }
}

template <typename OutT>
__device__ __forceinline__ void wide_attention_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                   OutT* __restrict__ out, float* __restrict__ lse, int q_len, int kv_len, i64 q_stride,
                                                   i64 kv_stride, i64 out_stride, int head_dim, float scale) {
    __shared__ u32 s_kv[WA_BN * WA_LDW];
    __shared__ u32 s_q[WA_WARPS][WA_MAX_D / 2];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y;
    const int row = blockIdx.x * WA_WARPS + warp;
    const bool active = row < q_len;  // inactive warps still share the tile loads and barriers
    const int words = head_dim >> 1;  // channel pairs per head
    const int chunks = head_dim >> 3;  // 16-byte chunks per row
    const bf16* kh = k + (i64)h * head_dim;
    const bf16* vh = v + (i64)h * head_dim;

    if (active) {
        const u32* qr = reinterpret_cast<const u32*>(q + (i64)row * q_stride + (i64)h * head_dim);
        for (int c = lane; c < words; c += 32) s_q[warp][c] = qr[c];
    } else {
        for (int c = lane; c < words; c += 32) s_q[warp][c] = 0u;
    }

    float acc[WA_PAIRS][2];
#pragma unroll
    for (int i = 0; i < WA_PAIRS; ++i) acc[i][0] = acc[i][1] = 0.0f;
    float m = NEG_INF, l = 0.0f;  // running max and sum of the row (the same on every lane)

    for (int k0 = 0; k0 < kv_len; k0 += WA_BN) {
        const int nk = min(WA_BN, kv_len - k0);
        __syncthreads();  // every warp is done with the previous tile's values (and s_q is written)
        wa_load_tile(s_kv, kh, kv_stride, k0, nk, chunks);
        __syncthreads();

        // Lane j scores key k0 + j.
        float s = NEG_INF;
        if (lane < nk) {
            const u32* kr = s_kv + lane * WA_LDW;
            const u32* qr = s_q[warp];
            float d = 0.0f;
#pragma unroll 4
            for (int c = 0; c < words; ++c) {
                const u32 kw = kr[c], qw = qr[c];
                d = fmaf(lo_bf16(qw), lo_bf16(kw), d);
                d = fmaf(hi_bf16(qw), hi_bf16(kw), d);
            }
            s = d * scale;
        }
        const float mx = fmaxf(m, wa_warp_max(s));
        const float base = (mx == NEG_INF) ? 0.0f : mx;
        const float corr = fast_exp2((m - base) * LOG2E);  // 0 while m is −∞
        const float p = fast_exp2((s - base) * LOG2E);     // 0 for keys past the end
        l = l * corr + warp_sum(p);
        m = mx;
#pragma unroll
        for (int i = 0; i < WA_PAIRS; ++i) {
            acc[i][0] *= corr;
            acc[i][1] *= corr;
        }

        __syncthreads();  // every warp is done with the keys
        wa_load_tile(s_kv, vh, kv_stride, k0, nk, chunks);
        __syncthreads();

        for (int j = 0; j < nk; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
            const u32* vr = s_kv + j * WA_LDW;
#pragma unroll
            for (int i = 0; i < WA_PAIRS; ++i) {
                const int c = lane + 32 * i;
                if (c < words) {
                    const u32 vw = vr[c];
                    acc[i][0] = fmaf(pj, lo_bf16(vw), acc[i][0]);
                    acc[i][1] = fmaf(pj, hi_bf16(vw), acc[i][1]);
                }
            }
        }
    }

    if (active) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        OutT* orow = out + (i64)row * out_stride + (i64)h * head_dim;
#pragma unroll
        for (int i = 0; i < WA_PAIRS; ++i) {
            const int c = lane + 32 * i;
            if (c < words) store_pair(orow + 2 * c, acc[i][0] * inv, acc[i][1] * inv);
        }
        if (lane == 0) lse[(i64)h * q_len + row] = l > 0.0f ? m + logf(l) : NEG_INF;
    }
}

// Entry points, bf16 or f32 output. Grid (ceil(q_len / 8), heads), block 256 threads, static
// shared memory (41 KB: within what every architecture gives without opting in).
extern "C" __global__ __launch_bounds__(WA_WARPS * 32) void wide_attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                                                                  float* lse, int q_len, int kv_len, i64 q_stride, i64 kv_stride,
                                                                                  i64 out_stride, int head_dim, float scale) {
    wide_attention_fwd<bf16>(q, k, v, out, lse, q_len, kv_len, q_stride, kv_stride, out_stride, head_dim, scale);
}
extern "C" __global__ __launch_bounds__(WA_WARPS * 32) void wide_attention_f32(const bf16* q, const bf16* k, const bf16* v, float* out,
                                                                                 float* lse, int q_len, int kv_len, i64 q_stride, i64 kv_stride,
                                                                                 i64 out_stride, int head_dim, float scale) {
    wide_attention_fwd<float>(q, k, v, out, lse, q_len, kv_len, q_stride, kv_stride, out_stride, head_dim, scale);
}
