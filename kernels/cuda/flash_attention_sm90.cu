// Flash attention forward for Hopper (sm_90a only): the contract of `flash_attention.cu` (and of
// the CPU twin `cpu::attention`), with both products on warpgroup MMAs (wgmma) instead of mma.sync:
// S = Q·Kᵀ reads Q and K straight from shared memory through matrix descriptors, and O += P·V takes
// P from registers (the S accumulators rounded to bf16) and V from shared memory. Compiled with
// `--gpu-architecture=sm_90a` and loaded only on compute capability 9.0.
//
// One block = 2 warpgroups (256 threads) = 128 query rows of one head, 64 per warpgroup; key and
// value tiles of 64 rows, double-buffered: cp.async brings tile j+1 while tile j is computed.
//
// Shared-memory layout of every tile (rows x D bf16), "core-matrix tiled": 8 rows x 16 bytes form
// one 128-byte core matrix; the byte offset of element (r, c) is
//     ((r / 8) * (D / 8) + c / 8) * 128 + (r % 8) * 16 + (c % 8) * 2,
// so the 16-byte chunk i = ((r/8)·(D/8) + c/8)·8 + r%8 sits at 16·i and the loads write contiguous
// bytes. As a K-major operand (Q for S, K for S: rows are M or N, columns are K) the core matrix
// next along K is 128 bytes on (the leading byte offset, LBO) and the one next along M/N is 16·D
// bytes on (the stride byte offset, SBO). V is the B operand of P·V with N = the columns (d) and
// K = the rows (keys): MN-major, so LBO (next along K, 8 keys) = 16·D and SBO (next along N, 8
// channels) = 128. No swizzle: each core matrix is 128 contiguous bytes.
//
// Requires: 16-byte aligned q/k/v base pointers and strides that are multiples of 8 elements.

#define WG_THREADS 128
#define FA90_WARPGROUPS 2
#define FA90_THREADS (WG_THREADS * FA90_WARPGROUPS)
#define FA90_BM (64 * FA90_WARPGROUPS)  // query rows per block
#define FA90_BN 64                      // key rows per tile

// Makes this thread's shared-memory writes (generic proxy: cp.async, st.shared) visible to the
// async proxy wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// Pins an accumulator register at this point of the program: the compiler may not move its reads
// or writes across (wgmma writes it asynchronously, behind the compiler's back, until the wait).
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void pin(u32& r) { asm volatile("" : "+r"(r)::"memory"); }

// A shared-memory matrix descriptor without swizzle: start address, LBO and SBO in bytes (all
// multiples of 16; each field keeps bits 4..17).
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) | ((u64)((sbo & 0x3FFFF) >> 4) << 32);
}

// Copies rows [row0, row0 + ROWS) of a token-major matrix (row stride `stride`, D channels from
// `base`) into the core-matrix tiled layout at `dst`; rows at or past `rows_valid` are zero-filled.
// Thread i of the block writes chunk i, i + FA90_THREADS, ...: contiguous bytes per warp.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile_cm(u32 dst, const bf16* base, i64 stride, int row0, int rows_valid) {
    constexpr int CHUNKS = ROWS * D / 8;
    static_assert(CHUNKS % FA90_THREADS == 0, "tile chunks must divide among the threads");
#pragma unroll
    for (int n = 0; n < CHUNKS / FA90_THREADS; ++n) {
        const int i = n * FA90_THREADS + threadIdx.x;
        const int r8 = i & 7, c = (i >> 3) % (D / 8), rg = (i >> 3) / (D / 8);
        const int r = rg * 8 + r8;
        const bool valid = r < rows_valid;
        const bf16* src = base + (valid ? (i64)(row0 + r) * stride : 0) + c * 8;
        cp_async16(dst + 16 * i, src, valid);
    }
}

// ---- wgmma (operand lists written out: one per accumulator register) --------------------------

// d[64 x 64] (+)= A[64 x 16] · B[64 x 16]ᵀ, A and B K-major in shared memory (descriptors).
__device__ __forceinline__ void wgmma_m64n64k16_ss(float* d, u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d[64 x 64] (+)= A[64 x 16] · B[16 x 64], A in registers (each warp's 16 rows as mma.m16n8k16 A
// fragments), B MN-major in shared memory (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float* d, const u32* a, u64 desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// d[64 x 128] (+)= A[64 x 16] · B[16 x 128], A in registers (each warp's 16 rows as mma.m16n8k16 A
// fragments), B MN-major in shared memory (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float* d, const u32* a, u64 desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

template <int D>
struct Fa90Tile {
    static constexpr int Q_BYTES = FA90_BM * D * 2;
    static constexpr int KV_BYTES = FA90_BN * D * 2;  // one K or V tile
    // Q, then two stages of (K, V).
    static constexpr int SMEM_BYTES = Q_BYTES + 4 * KV_BYTES;
};

extern __shared__ __align__(128) unsigned char fa90_smem[];

template <int D>
__device__ __forceinline__ void wgmma_pv(float* o, const u32* a, u64 desc_v);
template <>
__device__ __forceinline__ void wgmma_pv<64>(float* o, const u32* a, u64 desc_v) { wgmma_m64n64k16_rs(o, a, desc_v, 1); }
template <>
__device__ __forceinline__ void wgmma_pv<128>(float* o, const u32* a, u64 desc_v) { wgmma_m64n128k16_rs(o, a, desc_v, 1); }

// ---- one warpgroup's part of a key tile -------------------------------------------------------

// Issues S = Q·K_tileᵀ for this warpgroup's 64 rows (D/16 k-slices) and commits it as one wgmma
// group; the caller waits for it before it reads `s`.
template <int D>
__device__ __forceinline__ void issue_qk(float* s, u32 q_wg, u32 k_tile) {
#pragma unroll
    for (int i = 0; i < FA90_BN / 2; ++i) s[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < FA90_BN / 2; ++i) pin(s[i]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        wgmma_m64n64k16_ss(s, smem_desc(q_wg + kk * 256, 128, 16 * D), smem_desc(k_tile + kk * 256, 128, 16 * D), 1);
    wgmma_commit();
}

// Issues O += P·V_tile (FA90_BN/16 k-slices of 16 keys: two row groups, 32·D bytes each) and
// commits it as one wgmma group; `o` and `pa` are the MMA's until the caller waits for it.
template <int D>
__device__ __forceinline__ void issue_pv(float* o, u32 (*pa)[4], u32 v_tile) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) pin(o[i]);
#pragma unroll
    for (int ks = 0; ks < FA90_BN / 16; ++ks)
#pragma unroll
        for (int e = 0; e < 4; ++e) pin(pa[ks][e]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < FA90_BN / 16; ++ks) wgmma_pv<D>(o, pa[ks], smem_desc(v_tile + ks * 32 * D, 16 * D, 128));
    wgmma_commit();
}

// Keys past the end do not exist. s[4n + e]: row g + 8·(e / 2), key k0 + 8n + 2t + e % 2.
__device__ __forceinline__ void mask_tail(float* s, int k0, int kv_len, int t) {
    if (k0 + FA90_BN > kv_len) {
#pragma unroll
        for (int n = 0; n < FA90_BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (k0 + n * 8 + 2 * t + (e & 1) >= kv_len) s[4 * n + e] = NEG_INF;
    }
}

// Online softmax of one tile's scores per row (hh = 0: row g, hh = 1: row g + 8 of the warp's 16):
// `s` becomes P = exp(scale·(S − m)) with m the new running maximum, `l` this thread's share of
// the row sums (rescaled), and corr[hh] the factor the row's output accumulator is to be scaled by.
__device__ __forceinline__ void online_softmax(float* s, float* m, float* l, float* corr, float scale_log2) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float mx = m[hh];
#pragma unroll
        for (int n = 0; n < FA90_BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * hh], s[4 * n + 2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = (mx == NEG_INF) ? 0.0f : mx * scale_log2;
        corr[hh] = fast_exp2(m[hh] * scale_log2 - base);  // 0 when m was −∞
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < FA90_BN / 8; ++n) {
            const float p0 = fast_exp2(fmaf(s[4 * n + 2 * hh], scale_log2, -base));
            const float p1 = fast_exp2(fmaf(s[4 * n + 2 * hh + 1], scale_log2, -base));
            s[4 * n + 2 * hh] = p0;
            s[4 * n + 2 * hh + 1] = p1;
            sum += p0 + p1;
        }
        l[hh] = l[hh] * corr[hh] + sum;
        m[hh] = mx;
    }
}

// O's rows scaled by corr. o[4d + e]: row g + 8·(e / 2), channel 8d + 2t + e % 2.
template <int D>
__device__ __forceinline__ void rescale_o(float* o, const float* corr) {
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
        o[4 * d + 0] *= corr[0];
        o[4 * d + 1] *= corr[0];
        o[4 * d + 2] *= corr[1];
        o[4 * d + 3] *= corr[1];
    }
}

// P as bf16 A fragments: k-slice ks covers keys 16·ks .. 16·ks + 15, the accumulator's n8 blocks
// 2·ks and 2·ks + 1 (the accumulator layout is the register-A layout).
__device__ __forceinline__ void pack_p(u32 (*pa)[4], const float* s) {
#pragma unroll
    for (int ks = 0; ks < FA90_BN / 16; ++ks) {
        pa[ks][0] = pack_bf16x2(s[8 * ks + 0], s[8 * ks + 1]);
        pa[ks][1] = pack_bf16x2(s[8 * ks + 2], s[8 * ks + 3]);
        pa[ks][2] = pack_bf16x2(s[8 * ks + 4], s[8 * ks + 5]);
        pa[ks][3] = pack_bf16x2(s[8 * ks + 6], s[8 * ks + 7]);
    }
}

// ---- the kernel --------------------------------------------------------------------------------
//
// Two schedules of the same arithmetic (OVERLAP):
// - false: per key tile j, S_j = Q·K_jᵀ, wait, softmax, O += P_j·V_j, wait. K_j and V_j share a
//   stage; tile j + 1 streams in while tile j is computed.
// - true (FlashAttention-3's intra-warpgroup overlap): per tile j, S_j and then O += P_{j−1}·V_{j−1}
//   are issued together; the softmax of S_j runs while the tensor cores compute P_{j−1}·V_{j−1}, and
//   O is rescaled once that product is in. The last P·V follows the loop. V lags K by one tile:
//   iteration j reads K_j (K stage j % 2) and V_{j−1} (V stage (j − 1) % 2), and loads K_{j+1} and
//   V_j into the stages iteration j − 1 read, so two stages of each still suffice.
// O accumulates P_i·V_i scaled to the running maximum either way: in the overlapped schedule O
// holds the tiles before j − 1, scaled to m_{j−1}, when P_{j−1}·V_{j−1} (also relative to m_{j−1})
// is added, and the sum is then rescaled to m_j.
template <int D, bool OVERLAP, typename OutT>
__device__ __forceinline__ void flash_attention_sm90(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                     const bf16* __restrict__ v, OutT* __restrict__ out,
                                                     float* __restrict__ lse, int q_len, int kv_len, i64 q_stride,
                                                     i64 kv_stride, i64 out_stride, float scale) {
    typedef Fa90Tile<D> T;
    if (dynamic_smem_bytes() < (u32)T::SMEM_BYTES) __trap();  // the launcher's size disagrees with this tile
    const u32 s_q = smem_addr(fa90_smem);
    auto s_k = [&](int stage) { return s_q + T::Q_BYTES + stage * 2 * T::KV_BYTES; };
    auto s_v = [&](int stage) { return s_q + T::Q_BYTES + stage * 2 * T::KV_BYTES + T::KV_BYTES; };

    const int wg = threadIdx.x / WG_THREADS;                  // warpgroup: query rows [64·wg, 64·wg + 64)
    const int wi = (threadIdx.x % WG_THREADS) >> 5;           // warp in the warpgroup: its 16 rows
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;                    // accumulator fragment row group / thread in group
    const int h = blockIdx.y;
    const int q0 = blockIdx.x * FA90_BM;
    const bf16* qh = q + (i64)h * D;
    const bf16* kh = k + (i64)h * D;
    const bf16* vh = v + (i64)h * D;
    const float scale_log2 = scale * LOG2E;
    const int n_tiles = (kv_len + FA90_BN - 1) / FA90_BN;

    // Q and the first key tile, and the first value tile unless overlapped (there V lags K).
    load_tile_cm<FA90_BM, D>(s_q, qh, q_stride, q0, q_len - q0);
    if (n_tiles > 0) {
        load_tile_cm<FA90_BN, D>(s_k(0), kh, kv_stride, 0, kv_len);
        if (!OVERLAP) load_tile_cm<FA90_BN, D>(s_v(0), vh, kv_stride, 0, kv_len);
    }
    cp_async_commit();

    // This warpgroup's Q rows start at row group 8·wg; a k16 slice is two chunks (256 bytes) on.
    const u32 q_wg = s_q + wg * 8 * (D / 8) * 128;

    float o[D / 2];  // O[64 x D] accumulator: this thread's D/2 values
    float m[2], l[2], corr[2];
    float s[FA90_BN / 2];
    // P of a tile as A fragments. Overlapped, two sets alternate by tile: the softmax of tile j
    // writes one while the P·V of tile j − 1 still reads the other, so packing P need not wait for
    // that product (the compiler would otherwise move the wait before the packing, and the softmax
    // with it).
    u32 pa0[FA90_BN / 16][4], pa1[FA90_BN / 16][4];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    m[0] = m[1] = NEG_INF;
    l[0] = l[1] = 0.0f;

    // Key tile j; P_{j−1} in `pa_prev` (overlapped), P_j into `pa_next`. One barrier a tile: once
    // every thread has seen its loads land, and both warpgroups are done with the previous tile's
    // stages, the next loads go into those stages and land while this tile is computed.
    auto key_tile = [&](int j, u32(*pa_prev)[4], u32(*pa_next)[4]) {
        const int k0 = j * FA90_BN;
        cp_async_wait<0>();  // Q, K_j, and V_j (overlapped: V_{j−1})
        fence_proxy_async();
        __syncthreads();
        if (OVERLAP) {
            if (j + 1 < n_tiles) load_tile_cm<FA90_BN, D>(s_k((j + 1) & 1), kh, kv_stride, k0 + FA90_BN, kv_len - k0 - FA90_BN);
            load_tile_cm<FA90_BN, D>(s_v(j & 1), vh, kv_stride, k0, kv_len - k0);
        } else if (j + 1 < n_tiles) {
            load_tile_cm<FA90_BN, D>(s_k((j + 1) & 1), kh, kv_stride, k0 + FA90_BN, kv_len - k0 - FA90_BN);
            load_tile_cm<FA90_BN, D>(s_v((j + 1) & 1), vh, kv_stride, k0 + FA90_BN, kv_len - k0 - FA90_BN);
        }
        cp_async_commit();

        issue_qk<D>(s, q_wg, s_k(j & 1));
        if (OVERLAP && j > 0) {
            issue_pv<D>(o, pa_prev, s_v((j - 1) & 1));
            wgmma_wait<1>();  // S_j is in; P_{j−1}·V_{j−1} may still run
        } else {
            wgmma_wait<0>();
        }
#pragma unroll
        for (int i = 0; i < FA90_BN / 2; ++i) pin(s[i]);
        mask_tail(s, k0, kv_len, t);
        online_softmax(s, m, l, corr, scale_log2);
        pack_p(pa_next, s);
        if (OVERLAP) {
            end_basic_block(kv_len);  // or ptxas moves the wait above the softmax
            wgmma_wait<0>();          // P_{j−1}·V_{j−1} is in: O is free
#pragma unroll
            for (int i = 0; i < D / 2; ++i) pin(o[i]);
            rescale_o<D>(o, corr);
        } else {
            rescale_o<D>(o, corr);
            issue_pv<D>(o, pa_next, s_v(j & 1));
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < D / 2; ++i) pin(o[i]);
        }
    };
    // Two tiles an iteration, so that which set of P fragments a tile reads and writes is known
    // at compile time (register arrays indexed at run time would live in local memory).
    for (int j = 0; j < n_tiles; j += 2) {
        key_tile(j, pa1, pa0);
        if (j + 1 < n_tiles) key_tile(j + 1, pa0, pa1);
    }
    if (OVERLAP && n_tiles > 0) {
        // The last tile's P·V (V_{n−1} came with the last group; P_{n−1} in pa0 when n is odd).
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (n_tiles & 1)
            issue_pv<D>(o, pa0, s_v((n_tiles - 1) & 1));
        else
            issue_pv<D>(o, pa1, s_v((n_tiles - 1) & 1));
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < D / 2; ++i) pin(o[i]);
    }
    cp_async_wait<0>();  // nothing may be in flight at exit (no tiles: the Q group)

    // Normalise, store the output rows and the log-sum-exp. o[4d + e]: row g + 8·(e / 2), channel
    // 8d + 2t + e % 2.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float sum = l[hh];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int row = q0 + wg * 64 + wi * 16 + g + hh * 8;
        if (row < q_len) {
            OutT* orow = out + (i64)row * out_stride + (i64)h * D + 2 * t;
#pragma unroll
            for (int d = 0; d < D / 8; ++d) store_pair(orow + d * 8, o[4 * d + 2 * hh] * inv, o[4 * d + 2 * hh + 1] * inv);
            if (t == 0) lse[(i64)h * q_len + row] = sum > 0.0f ? m[hh] * scale + logf(sum) : NEG_INF;
        }
    }
}

// Entry points, bf16 or f32 output, each schedule. Grid (ceil(q_len / 128), heads), block 256
// threads, dynamic shared memory of Fa90Tile::SMEM_BYTES (49,152 bytes at head dim 64, 98,304 at
// 128). Two blocks per multiprocessor at head dim 64; one at 128, where holding to 128 registers
// for two would spill.
#define FA90_ENTRY(NAME, D, OVERLAP, MIN_BLOCKS, OUT_T)                                                             \
    extern "C" __global__ void __launch_bounds__(FA90_THREADS, MIN_BLOCKS) NAME(                                   \
        const bf16* q, const bf16* k, const bf16* v, OUT_T* out, float* lse, int q_len, int kv_len, i64 q_stride,    \
        i64 kv_stride, i64 out_stride, float scale) {                                                               \
        flash_attention_sm90<D, OVERLAP, OUT_T>(q, k, v, out, lse, q_len, kv_len, q_stride, kv_stride, out_stride, \
                                                scale);                                                             \
    }

FA90_ENTRY(flash_attention_sm90_d64_bf16, 64, false, 2, bf16)
FA90_ENTRY(flash_attention_sm90_d64_f32, 64, false, 2, float)
FA90_ENTRY(flash_attention_sm90_d128_bf16, 128, false, 1, bf16)
FA90_ENTRY(flash_attention_sm90_d128_f32, 128, false, 1, float)
FA90_ENTRY(flash_attention_sm90_overlap_d64_bf16, 64, true, 2, bf16)
FA90_ENTRY(flash_attention_sm90_overlap_d64_f32, 64, true, 2, float)
FA90_ENTRY(flash_attention_sm90_overlap_d128_bf16, 128, true, 1, bf16)
FA90_ENTRY(flash_attention_sm90_overlap_d128_f32, 128, true, 1, float)
