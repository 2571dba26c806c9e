// The VAE's kernels on channel-major frames `[C, T, H, W]` (bf16): the RMS norm over channels
// (optionally followed by SiLU), nearest ×2 upsampling of planes, a tiled 2-D transpose, and the
// two halves of a 3-D convolution around a cuBLASLt GEMM: im2col of a tile of output positions
// (input given as up to two pieces in time, read in place) and the bias-add store of the GEMM's
// f32 tile. Contracts = the CPU twins `cpu::channel_rms_norm`, `cpu::upsample_nearest2x`,
// `cpu::transpose` and `cpu::conv3d_pieces` (launch wrappers: `cuda::video`). Every index that can
// pass 2^31 (a 1080p frame plane is 2M positions, times up to hundreds of channels) is 64-bit.

// ---- channel RMS norm ---------------------------------------------------------------------------

// In place on x `[channels, positions]`: per position p, s = scale / max(‖x[:, p]‖₂, 1e-12) with
// scale = √channels (f32, computed by the host as the twin does), y = x·(s·γ[c]), then
// y·σ(y) when `silu`; one rounding to bf16. The squares are summed over channels in order, in f32.
// One thread per position (adjacent threads read adjacent positions: coalesced), two passes.
extern "C" __global__ void channel_rms_norm_bf16(bf16* __restrict__ x, const float* __restrict__ gamma, int channels, i64 positions,
                                                 float scale, int silu) {
    for (i64 p = blockIdx.x * (i64)blockDim.x + threadIdx.x; p < positions; p += (i64)gridDim.x * blockDim.x) {
        float ss = 0.0f;
        for (int c = 0; c < channels; ++c) {
            const float v = bf16_to_f32(x[(i64)c * positions + p]);
            ss += v * v;
        }
        const float s = scale / fmaxf(sqrtf(ss), 1e-12f);
        for (int c = 0; c < channels; ++c) {
            bf16* e = x + (i64)c * positions + p;
            float y = bf16_to_f32(*e) * (s * gamma[c]);
            if (silu) y = y * (1.0f / (1.0f + expf(-y)));
            *e = f32_to_bf16(y);
        }
    }
}

// ---- nearest ×2 upsampling ----------------------------------------------------------------------

// `planes` planes of h × w -> planes of 2h × 2w: out[pl, 2r + dr, 2c + dc] = x[pl, r, c]. One
// thread per input element, writing its two output pairs (rows 2r and 2r + 1) as 32-bit words
// (an even element index of a 256-byte aligned buffer).
extern "C" __global__ void upsample_nearest2x_bf16(bf16* __restrict__ out, const bf16* __restrict__ x, i64 planes, int h, int w) {
    const i64 plane = (i64)h * w, n = planes * plane, ow = 2 * (i64)w;
    u32* o = reinterpret_cast<u32*>(out);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 pl = i / plane;
        const i64 rc = i - pl * plane;
        const i64 r = rc / w, c = rc - r * w;
        const u32 v = (u32)x[i];
        const u32 pair = v | (v << 16);
        const i64 top = pl * 4 * plane + 2 * r * ow + 2 * c;  // element index, even
        o[top >> 1] = pair;
        o[(top + ow) >> 1] = pair;
    }
}

// ---- transpose ----------------------------------------------------------------------------------

#define TR_TILE 32
#define TR_ROWS 8  // blockDim.y: each thread moves TR_TILE / TR_ROWS elements of a tile

// out[j, i] = x[i, j] for x `[rows, cols]` (both packed, any element offset: no vector access).
// Blocks stride over 32 × 32 tiles staged in shared memory; a row of the tile is padded to 33
// elements, so the column reads of the write phase hit 32 distinct banks. Block (32, 8).
extern "C" __global__ void transpose_bf16(bf16* __restrict__ out, const bf16* __restrict__ x, i64 rows, i64 cols) {
    __shared__ bf16 tile[TR_TILE][TR_TILE + 1];
    const i64 tiles_c = (cols + TR_TILE - 1) / TR_TILE;
    const i64 tiles = ((rows + TR_TILE - 1) / TR_TILE) * tiles_c;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (i64 t = blockIdx.x; t < tiles; t += gridDim.x) {
        const i64 r0 = (t / tiles_c) * TR_TILE, c0 = (t % tiles_c) * TR_TILE;
#pragma unroll
        for (int dy = ty; dy < TR_TILE; dy += TR_ROWS) {
            const i64 r = r0 + dy, c = c0 + tx;
            if (r < rows && c < cols) tile[dy][tx] = x[r * cols + c];
        }
        __syncthreads();
#pragma unroll
        for (int dy = ty; dy < TR_TILE; dy += TR_ROWS) {
            const i64 orow = c0 + dy, ocol = r0 + tx;  // output row = input column
            if (orow < cols && ocol < rows) out[orow * rows + ocol] = tile[tx][dy];
        }
        __syncthreads();  // the tile is rewritten by the next iteration
    }
}

// ---- 3-D convolution: im2col and bias store ------------------------------------------------------

// Columns of output positions [p0, p0 + n) of a 3-D convolution (PyTorch's Conv3d: cross-
// correlation, no dilation or groups) whose input is the frames of piece a (`ta` frames) followed
// in time by those of piece b (`tb` frames), each `[channels, t_i, h, w]`. Output extent (·, ho,
// wo); stride (st, sh, sw); zero padding before each axis (pt, ph, pw) (padding after is implied
// by the output extent). Row j of `cols` (pitch `k_pitch`, a multiple of 8) holds, at
// k = ((ci·kt + dt)·kh + dh)·kw + dw (the weight's order), the input value under that tap, zero
// in padding and in the columns taps..k_pitch. Each thread fills 8 consecutive columns of a row
// and stores them as one 16-byte word (rows start 16-byte aligned: k_pitch % 8 == 0).
extern "C" __global__ void im2col_conv3d_bf16(bf16* __restrict__ cols, const bf16* __restrict__ xa, const bf16* __restrict__ xb, int ta,
                                              int tb, int channels, int h, int w, int kt, int kh, int kw, int st, int sh, int sw, int pt,
                                              int ph, int pw, int ho, int wo, i64 p0, int n, int k_pitch, int taps) {
    const int groups = k_pitch >> 3;
    const i64 total = (i64)n * groups;
    const int frames = ta + tb;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const i64 j = i / groups;
        const int k0 = (int)(i - j * groups) * 8;
        const i64 p = p0 + j;
        const i64 rest = p / wo;
        const int ox = (int)(p - rest * wo);
        const int oy = (int)(rest % ho);
        const int ot = (int)(rest / ho);
        const int t_base = ot * st - pt, y_base = oy * sh - ph, x_base = ox * sw - pw;
        int dw = k0 % kw, r = k0 / kw;
        int dh = r % kh;
        r /= kh;
        int dt = r % kt;
        int ci = r / kt;
        u32 packed[4];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            u32 val = 0;
            if (k0 + e < taps) {
                const int ti = t_base + dt, yi = y_base + dh, xi = x_base + dw;
                if (ti >= 0 && ti < frames && yi >= 0 && yi < h && xi >= 0 && xi < w) {
                    const bool in_a = ti < ta;
                    const bf16* src = in_a ? xa : xb;
                    const int tf = in_a ? ta : tb, fi = in_a ? ti : ti - ta;
                    val = (u32)src[(((i64)ci * tf + fi) * h + yi) * (i64)w + xi];
                }
                if (++dw == kw) {
                    dw = 0;
                    if (++dh == kh) {
                        dh = 0;
                        if (++dt == kt) {
                            dt = 0;
                            ++ci;
                        }
                    }
                }
            }
            if (e & 1) {
                packed[e >> 1] |= val << 16;
            } else {
                packed[e >> 1] = val;
            }
        }
        *reinterpret_cast<uint4*>(cols + j * k_pitch + k0) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
}

// out[c, p0 + j] = bf16(y[c, j] + bias[c]) for the GEMM's packed f32 tile y `[co, n]`, into the
// bf16 output `[co, positions]`: the convolution's one rounding.
extern "C" __global__ void conv_bias_store_bf16(bf16* __restrict__ out, const float* __restrict__ y, const float* __restrict__ bias, int co,
                                                int n, i64 p0, i64 positions) {
    const i64 total = (i64)co * n;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const i64 c = i / n;
        const i64 j = i - c * n;
        out[c * positions + p0 + j] = f32_to_bf16(y[i] + bias[c]);
    }
}
