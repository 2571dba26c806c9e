// Spacetime patches: latent video `[C, F, H, W]` (f32) <-> token rows. Token s of the patch grid
// (F', H', W') sits at (s / (H'·W'), (s / W') mod H', s mod W'), each patch p_t × p_h × p_w.
// Contract = the CPU twins `cpu::patchify` / `cpu::unpatchify`:
//   patchify:   rows for tokens [token0, token0 + tokens), features ordered (c, p_t, p_h, p_w)
//               (the patch-embedding Conv3d weight's order), written as bf16 (a GEMM operand);
//   unpatchify: all tokens' rows `[S, C·p_t·p_h·p_w]` with features ordered (c, p_t, p_h, p_w)
//               (patchify's order: the transformer loads its output projection in that order),
//               scattered back into an f32 latent; patchify's inverse.
// One thread per output element (a gather in both directions).

extern "C" __global__ void patchify_bf16(bf16* __restrict__ out, const float* __restrict__ latent, int channels, int gf, int gh, int gw,
                                         int pt, int ph, int pw, i64 token0, i64 tokens) {
    const int feat = channels * pt * ph * pw;
    const i64 fl = (i64)gf * pt, hl = (i64)gh * ph, wl = (i64)gw * pw;
    const i64 n = tokens * feat;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 row = i / feat;
        int j = (int)(i % feat);
        const int e = j % pw;
        j /= pw;
        const int b = j % ph;
        j /= ph;
        const int a = j % pt;
        const int c = j / pt;
        const i64 s = token0 + row;
        const i64 f = s / ((i64)gh * gw), h = (s / gw) % gh, w = s % gw;
        out[i] = f32_to_bf16(latent[((c * fl + f * pt + a) * hl + h * ph + b) * wl + w * pw + e]);
    }
}

extern "C" __global__ void unpatchify_f32(float* __restrict__ latent, const float* __restrict__ tokens, int channels, int gf, int gh,
                                          int gw, int pt, int ph, int pw) {
    const int feat = channels * pt * ph * pw;
    const i64 fl = (i64)gf * pt, hl = (i64)gh * ph, wl = (i64)gw * pw;
    const i64 n = channels * fl * hl * wl;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 xw = i % wl, yh = (i / wl) % hl, zf = (i / (wl * hl)) % fl;
        const int c = (int)(i / (wl * hl * fl));
        const i64 s = ((zf / pt) * gh + yh / ph) * gw + xw / pw;
        const int k = (int)(((c * pt + zf % pt) * ph + yh % ph) * pw + xw % pw);
        latent[i] = tokens[s * feat + k];
    }
}
