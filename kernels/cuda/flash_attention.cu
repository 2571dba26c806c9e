// Flash attention, forward: softmax(scale·q·kᵀ)·v per head, bf16 inputs, f32 accumulation on tensor
// cores (mma.sync m16n8k16), online softmax, any sequence length (tails masked), output and the
// per-row log-sum-exp. Contract = the CPU twin `cpu::attention`: token-major rows with strides,
// head h in the channels [h·D, (h+1)·D) of each row; out `[q_len, out_stride]`, lse `[heads, q_len]`
// (ln Σ_j exp(scale·q·k_j); −∞ and a zero output when there are no keys).
//
// One block = 4 warps = BM query rows of one head; each warp owns 16·MT rows and keeps its scores
// and output accumulator in registers. Key/value tiles of BN rows stream through shared memory
// with cp.async: V_j loads while QKᵀ_j runs, K_{j+1} while softmax and PV_j run. Rows in shared
// memory are padded by 8 elements (16 bytes) so ldmatrix is free of bank conflicts.
//
// Where the Q fragments live (Q_SMEM): at head dim 64 they stay in registers for the whole block;
// at 128, two row tiles per warp (MT = 2) leave no registers for them (the accumulator alone is 128
// per thread), so the Q tile stays in shared memory and each k-slice of it is read again with
// ldmatrix for every key tile. Two row tiles per warp halve the shared-memory reads per MMA of the
// key and value fragments, which bound the kernel at one row tile; the key tiles are 32 rows there
// so the scores fit beside the accumulator without spilling.
//
// Shared memory is dynamic: the launcher passes `FaTile::SMEM_BYTES` (mirrored by
// `cuda::attention::flash_smem_bytes`), above the 48 KiB default at head dim 128, and a block given
// less stops with a trap rather than reading past it.
//
// Requires: 16-byte aligned q/k/v base pointers and strides that are multiples of 8 elements.

#define FA_WARPS 4

template <int D, int MT, int BN, bool Q_SMEM>
struct FaTile {
    static constexpr int BM = FA_WARPS * 16 * MT;  // query rows per block
    static constexpr int LD = D + 8;               // padded shared row, elements
    static constexpr int KV_ELEMS = BN * LD;
    static constexpr int Q_ELEMS = BM * LD;
    // K and V tiles, then the Q tile: beside them for the whole block when Q_SMEM, else over them
    // (read once into registers before the first key tile lands).
    static constexpr int SMEM_ELEMS = Q_SMEM ? 2 * KV_ELEMS + Q_ELEMS : ((2 * KV_ELEMS > Q_ELEMS) ? 2 * KV_ELEMS : Q_ELEMS);
    static constexpr int SMEM_BYTES = SMEM_ELEMS * 2;
};

extern __shared__ __align__(128) bf16 fa_smem[];

// ldmatrix at the shared-memory address `a` (bytes, from smem_addr): every lane's address is one
// base per operand plus a constant, which keeps the address registers to one per operand.
__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// c[16x8] += a[16x16] · b[16x8], bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Loads rows [row0, row0 + ROWS) of a token-major matrix (row stride `stride`, D channels from
// `base`) into shared memory with padded rows; rows at or past `rows_valid` are zero-filled.
template <int ROWS, int D, int LD>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* base, i64 stride, int row0, int rows_valid) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    static_assert((ROWS * CHUNKS) % (FA_WARPS * 32) == 0, "tile chunks must divide among the threads");
#pragma unroll
    for (int i = 0; i < ROWS * CHUNKS / (FA_WARPS * 32); ++i) {
        const int c = i * FA_WARPS * 32 + threadIdx.x;
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const bool valid = r < rows_valid;
        const bf16* src = base + (valid ? (i64)(row0 + r) * stride : 0) + col;
        cp_async16(smem_addr(s + r * LD + col), src, valid);
    }
}

template <int D, int MT, int BN, bool Q_SMEM, typename OutT>
__device__ __forceinline__ void flash_attention_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                    const bf16* __restrict__ v, OutT* __restrict__ out,
                                                    float* __restrict__ lse, int q_len, int kv_len, i64 q_stride,
                                                    i64 kv_stride, i64 out_stride, float scale) {
    typedef FaTile<D, MT, BN, Q_SMEM> T;
    if (dynamic_smem_bytes() < (u32)T::SMEM_BYTES) __trap();  // the launcher's size disagrees with this tile
    bf16* sK = fa_smem;
    bf16* sV = fa_smem + T::KV_ELEMS;
    bf16* sQ = Q_SMEM ? fa_smem + 2 * T::KV_ELEMS : fa_smem;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;         // mma fragment row group / thread in group
    const int mi = lane >> 3, mr = lane & 7;       // ldmatrix: which matrix this lane addresses, its row
    const int h = blockIdx.y;
    const int q0 = blockIdx.x * T::BM;
    const bf16* qh = q + (i64)h * D;
    const bf16* kh = k + (i64)h * D;
    const bf16* vh = v + (i64)h * D;
    const float scale_log2 = scale * LOG2E;

    // Q tile -> shared memory; without Q_SMEM, on into registers (A fragments) and the shared
    // memory is left to the key and value tiles.
    load_tile<T::BM, D, T::LD>(sQ, qh, q_stride, q0, q_len - q0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    // This lane's ldmatrix address in row tile `mt`, k-slice `kk` of the Q tile.
    // Each operand's ldmatrix base for this lane, in bytes; a fragment adds a constant to it.
    const u32 q_base = smem_addr(sQ + (warp * 16 * MT + mr + (mi & 1) * 8) * T::LD + (mi >> 1) * 8);
    const u32 k_base = smem_addr(sK + ((mi >> 1) * 8 + mr) * T::LD + (mi & 1) * 8);
    const u32 v_base = smem_addr(sV + ((mi & 1) * 8 + mr) * T::LD + (mi >> 1) * 8);
    auto q_frag_addr = [&](int mt, int kk) { return q_base + 2 * (mt * 16 * T::LD + kk * 16); };
    u32 qf[Q_SMEM ? 1 : MT][Q_SMEM ? 1 : D / 16][4];
    if (!Q_SMEM) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[Q_SMEM ? 0 : mt][Q_SMEM ? 0 : kk], q_frag_addr(mt, kk));
        __syncthreads();
    }

    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int d = 0; d < D / 8; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.0f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
    }

    const int n_tiles = (kv_len + BN - 1) / BN;
    if (n_tiles > 0) load_tile<BN, D, T::LD>(sK, kh, kv_stride, 0, kv_len);
    cp_async_commit();

    for (int j = 0; j < n_tiles; ++j) {
        const int k0 = j * BN;
        load_tile<BN, D, T::LD>(sV, vh, kv_stride, k0, kv_len - k0);
        cp_async_commit();
        cp_async_wait<1>();  // K_j has landed (V_j may still be in flight)
        __syncthreads();

        // S = Q·K_jᵀ
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 qk[MT][4];  // this k-slice's Q fragments
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (Q_SMEM) {
                    ldmatrix_x4(qk[mt], q_frag_addr(mt, kk));
                } else {
#pragma unroll
                    for (int e = 0; e < 4; ++e) qk[mt][e] = qf[Q_SMEM ? 0 : mt][Q_SMEM ? 0 : kk][e];
                }
            }
#pragma unroll
            for (int n2 = 0; n2 < BN / 16; ++n2) {
                u32 b[4];
                ldmatrix_x4(b, k_base + 2 * (n2 * 16 * T::LD + kk * 16));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(s[mt][2 * n2], qk[mt], b[0], b[1]);
                    mma_bf16(s[mt][2 * n2 + 1], qk[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with sK
        if (j + 1 < n_tiles) load_tile<BN, D, T::LD>(sK, kh, kv_stride, k0 + BN, kv_len - k0 - BN);
        cp_async_commit();

        // Keys past the end do not exist.
        if (k0 + BN > kv_len) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (k0 + n * 8 + 2 * t + (e & 1) >= kv_len) s[mt][n][e] = NEG_INF;
        }

        // Online softmax: new running max per row, rescale what was accumulated, P = exp(S − max).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {  // hh = 0: row g, hh = 1: row g + 8
                float mx = m[mt][hh];
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * hh], s[mt][n][2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float base = (mx == NEG_INF) ? 0.0f : mx * scale_log2;
                const float corr = fast_exp2(m[mt][hh] * scale_log2 - base);  // 0 when m was −∞
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
                    const float p0 = fast_exp2(fmaf(s[mt][n][2 * hh], scale_log2, -base));
                    const float p1 = fast_exp2(fmaf(s[mt][n][2 * hh + 1], scale_log2, -base));
                    s[mt][n][2 * hh] = p0;
                    s[mt][n][2 * hh + 1] = p1;
                    sum += p0 + p1;
                }
                l[mt][hh] = l[mt][hh] * corr + sum;  // this thread's share of the row sum
                m[mt][hh] = mx;
#pragma unroll
                for (int d = 0; d < D / 8; ++d) {
                    o[mt][d][2 * hh] *= corr;
                    o[mt][d][2 * hh + 1] *= corr;
                }
            }
        }

        // P as bf16 A fragments, packed before the wait so the f32 scores are dead across it
        // (half the registers).
        u32 pa[MT][BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int ks = 0; ks < BN / 16; ++ks) {
                pa[mt][ks][0] = pack_bf16x2(s[mt][2 * ks][0], s[mt][2 * ks][1]);
                pa[mt][ks][1] = pack_bf16x2(s[mt][2 * ks][2], s[mt][2 * ks][3]);
                pa[mt][ks][2] = pack_bf16x2(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
                pa[mt][ks][3] = pack_bf16x2(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
            }

        cp_async_wait<1>();  // V_j has landed (K_{j+1} may still be in flight)
        __syncthreads();

        // O += P·V_j.
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) {
#pragma unroll
            for (int d2 = 0; d2 < D / 16; ++d2) {
                u32 b[4];
                ldmatrix_x4_trans(b, v_base + 2 * (ks * 16 * T::LD + d2 * 16));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(o[mt][2 * d2], pa[mt][ks], b[0], b[1]);
                    mma_bf16(o[mt][2 * d2 + 1], pa[mt][ks], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with sV before the next V tile lands there
    }
    cp_async_wait<0>();

    // Normalise, store the output rows and the log-sum-exp.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float sum = l[mt][hh];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            const int row = q0 + warp * 16 * MT + mt * 16 + g + hh * 8;
            if (row < q_len) {
                OutT* orow = out + (i64)row * out_stride + (i64)h * D + 2 * t;
#pragma unroll
                for (int d = 0; d < D / 8; ++d) store_pair(orow + d * 8, o[mt][d][2 * hh] * inv, o[mt][d][2 * hh + 1] * inv);
                if (t == 0) lse[(i64)h * q_len + row] = sum > 0.0f ? m[mt][hh] * scale + logf(sum) : NEG_INF;
            }
        }
    }
}

// Entry points, bf16 or f32 output, 128 query rows per block: head dim 64 with Q in registers and
// key tiles of 64 (18,432 bytes of shared memory), 128 with Q in shared memory and key tiles of 32
// (52,224 bytes; tiles of 64 spill registers). Grid (ceil(q_len / 128), heads), block 128 threads,
// dynamic shared memory of FaTile::SMEM_BYTES.
#define FA_ENTRY(NAME, D, MT, BN, Q_SMEM, OUT_T)                                                                \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) NAME(                                          \
        const bf16* q, const bf16* k, const bf16* v, OUT_T* out, float* lse, int q_len, int kv_len, i64 q_stride, \
        i64 kv_stride, i64 out_stride, float scale) {                                                           \
        flash_attention_fwd<D, MT, BN, Q_SMEM, OUT_T>(q, k, v, out, lse, q_len, kv_len, q_stride, kv_stride, out_stride, scale); \
    }

FA_ENTRY(flash_attention_d64_bf16, 64, 2, 64, false, bf16)
FA_ENTRY(flash_attention_d64_f32, 64, 2, 64, false, float)
FA_ENTRY(flash_attention_d128_bf16, 128, 2, 32, true, bf16)
FA_ENTRY(flash_attention_d128_f32, 128, 2, 32, true, float)
