"""Fragment-level NumPy model of kernels/cuda/flash_attention.cu: one thread block at a time, with
ldmatrix (plain and .trans), mma.m16n8k16 (bf16, f32 accumulate) and shfl.xor acting per lane as the
PTX ISA documents them, and the kernel's own index formulas. Checks, without a GPU, that the fragment
mappings, tail masking, online softmax and log-sum-exp compose to attention (errors ~5e-4 from the
bf16 probabilities). `flash_attention_sm90_model.py` is the same for the warpgroup-MMA kernel. A
change to the kernel's indexing should be mirrored here and rerun (`.ci/run` runs it; it fails past
the GPU test's bounds):

    python3 kernels/tests/flash_attention_model.py     # needs numpy
"""
import numpy as np
def bf16(x):
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7fff + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)

LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3
MI, MR = LANES >> 3, LANES & 7

def ldmatrix_x4(smem, LD, addr_rows, addr_cols, trans=False):
    # addr_rows/cols: per lane, element index (row, col) in the padded smem of the start of an 8-elem row
    # returns regs[32, 4, 2] (each reg two values: low, high)
    regs = np.zeros((32, 4, 2), np.float32)
    for i in range(4):
        # matrix i: rows provided by lanes 8i..8i+7
        M = np.stack([smem[addr_rows[8*i + j], addr_cols[8*i + j]: addr_cols[8*i + j] + 8] for j in range(8)])
        for L in range(32):
            if not trans:
                regs[L, i] = M[L // 4, 2*(L % 4): 2*(L % 4) + 2]
            else:
                regs[L, i] = [M[2*(L % 4), L // 4], M[2*(L % 4) + 1, L // 4]]
    return regs

def mma(c, a, b0, b1):
    # c[32,4], a[32,4,2], b0/b1[32,2]: reconstruct matrices from fragments, multiply, scatter back
    A = np.zeros((16, 16), np.float32); B = np.zeros((16, 8), np.float32)
    for L in range(32):
        g, t = L >> 2, L & 3
        A[g, 2*t:2*t+2] = a[L, 0]; A[g+8, 2*t:2*t+2] = a[L, 1]
        A[g, 2*t+8:2*t+10] = a[L, 2]; A[g+8, 2*t+8:2*t+10] = a[L, 3]
        B[2*t:2*t+2, g] = b0[L]; B[2*t+8:2*t+10, g] = b1[L]
    C = A.astype(np.float64) @ B.astype(np.float64)
    out = c.copy()
    for L in range(32):
        g, t = L >> 2, L & 3
        out[L] += [C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1]]
    return out

def shfl_xor(v, m):
    return v[LANES ^ m]

def check(what, out, lse, ref=None, lref=None):
    # The bounds of kernels/tests/gpu_kernels.rs's flash test (f32 output): |out - ref| <= 4e-3 +
    # 1e-2 |ref| (P is rounded to bf16 before P·V), |lse - ref| <= 1e-4 + 1e-4 |ref|; no keys: a
    # zero output and an lse of -inf.
    if ref is None:
        ok = np.all(out == 0) and np.all(lse == -np.inf)
        print(what, "no keys: out zero and lse -inf", ok)
    else:
        e_out, e_lse = np.abs(out - ref), np.abs(lse - lref)
        ok = np.all(e_out <= 4e-3 + 1e-2*np.abs(ref)) and np.all(e_lse <= 1e-4 + 1e-4*np.abs(lref))
        print(what, "max|out-ref|", e_out.max(), "max|lse-ref|", e_lse.max(), "within bounds", ok)
    assert ok, what

def block(q, k, v, q0, D, MT, BN, Q_SMEM, scale, q_len, kv_len):
    WARPS = 4; BM = WARPS*16*MT; LD = D + 8
    def load(src, row0, rows, valid):
        s = np.zeros((rows, LD), np.float32)
        for r in range(rows):
            if r < valid: s[r, :D] = src[row0 + r]
        return s
    sQ = load(q, q0, BM, q_len - q0)
    out = np.zeros((q_len, D), np.float32); lse = np.zeros(q_len, np.float32)
    for w in range(WARPS):
        q_frag = lambda mt, kk: ldmatrix_x4(sQ, LD, w*16*MT + mt*16 + MR + (MI & 1)*8, kk*16 + (MI >> 1)*8)
        # Without Q_SMEM the fragments are read once, before the key tiles overwrite sQ.
        qf = None if Q_SMEM else [[q_frag(mt, kk) for kk in range(D//16)] for mt in range(MT)]
        o = np.zeros((MT, D//8, 32, 4), np.float32)
        m = np.full((MT, 2, 32), -np.inf, np.float32); l = np.zeros((MT, 2, 32), np.float32)
        n_tiles = (kv_len + BN - 1)//BN
        sl2 = np.float32(scale * 1.4426950408889634)
        for j in range(n_tiles):
            k0 = j*BN
            sK = load(k, k0, BN, kv_len - k0); sV = load(v, k0, BN, kv_len - k0)
            s = np.zeros((MT, BN//8, 32, 4), np.float32)
            for kk in range(D//16):
                qk = [q_frag(mt, kk) if Q_SMEM else qf[mt][kk] for mt in range(MT)]
                for n2 in range(BN//16):
                    b = ldmatrix_x4(sK, LD, n2*16 + (MI >> 1)*8 + MR, kk*16 + (MI & 1)*8)
                    for mt in range(MT):
                        s[mt, 2*n2] = mma(s[mt, 2*n2], qk[mt], b[:, 0], b[:, 1])
                        s[mt, 2*n2+1] = mma(s[mt, 2*n2+1], qk[mt], b[:, 2], b[:, 3])
            for mt in range(MT):
                for n in range(BN//8):
                    for e in range(4):
                        mask = k0 + n*8 + 2*T + (e & 1) >= kv_len
                        s[mt, n, mask, e] = -np.inf
            for mt in range(MT):
                for hh in range(2):
                    mx = m[mt, hh].copy()
                    for n in range(BN//8):
                        mx = np.maximum(mx, np.maximum(s[mt, n, :, 2*hh], s[mt, n, :, 2*hh+1]))
                    mx = np.maximum(mx, shfl_xor(mx, 1)); mx = np.maximum(mx, shfl_xor(mx, 2))
                    base = np.where(mx == -np.inf, 0, mx*sl2).astype(np.float32)
                    with np.errstate(invalid='ignore'):
                        corr = np.exp2(m[mt, hh]*sl2 - base)
                    sm = np.zeros(32, np.float32)
                    for n in range(BN//8):
                        for e in (2*hh, 2*hh+1):
                            p = np.exp2(s[mt, n, :, e]*sl2 - base).astype(np.float32)
                            s[mt, n, :, e] = p; sm += p
                    l[mt, hh] = l[mt, hh]*corr + sm; m[mt, hh] = mx
                    for d in range(D//8):
                        o[mt, d, :, 2*hh] *= corr; o[mt, d, :, 2*hh+1] *= corr
            for ks in range(BN//16):
                pa = np.zeros((MT, 32, 4, 2), np.float32)
                for mt in range(MT):
                    pa[mt, :, 0] = bf16(s[mt, 2*ks][:, 0:2]); pa[mt, :, 1] = bf16(s[mt, 2*ks][:, 2:4])
                    pa[mt, :, 2] = bf16(s[mt, 2*ks+1][:, 0:2]); pa[mt, :, 3] = bf16(s[mt, 2*ks+1][:, 2:4])
                for d2 in range(D//16):
                    b = ldmatrix_x4(sV, LD, ks*16 + (MI & 1)*8 + MR, d2*16 + (MI >> 1)*8, trans=True)
                    for mt in range(MT):
                        o[mt, 2*d2] = mma(o[mt, 2*d2], pa[mt], b[:, 0], b[:, 1])
                        o[mt, 2*d2+1] = mma(o[mt, 2*d2+1], pa[mt], b[:, 2], b[:, 3])
        for mt in range(MT):
            for hh in range(2):
                sm = l[mt, hh]; sm = sm + shfl_xor(sm, 1); sm = sm + shfl_xor(sm, 2)
                inv = np.where(sm > 0, 1/np.where(sm > 0, sm, 1), 0)
                for L in range(32):
                    row = q0 + w*16*MT + mt*16 + G[L] + hh*8
                    if row < q_len:
                        for d in range(D//8):
                            out[row, d*8 + 2*T[L]] = o[mt, d, L, 2*hh]*inv[L]
                            out[row, d*8 + 2*T[L] + 1] = o[mt, d, L, 2*hh+1]*inv[L]
                        if T[L] == 0:
                            lse[row] = m[mt, hh, L]*scale + np.log(sm[L]) if sm[L] > 0 else -np.inf
    return out, lse

def main():
    rng = np.random.default_rng(0)
    # The kernel's entry points: (64, MT 2, key tiles of 64, Q in registers) and (128, MT 2, key tiles
    # of 32, Q in shared memory).
    for D, MT, BN, Q_SMEM, ql, kl in [(64, 2, 64, False, 130, 100), (128, 2, 32, True, 200, 130), (64, 2, 64, False, 5, 0), (128, 2, 32, True, 1, 1), (128, 2, 32, True, 5, 0)]:
        BM = 4*16*MT
        q = bf16(rng.uniform(-2, 2, (ql, D))); k = bf16(rng.uniform(-2, 2, (max(kl,1), D))); v = bf16(rng.uniform(-1, 1, (max(kl,1), D)))
        scale = 1/np.sqrt(D)
        out = np.zeros((ql, D)); lse = np.zeros(ql)
        for qb in range((ql + BM - 1)//BM):
            o, l = block(q, k, v, qb*BM, D, MT, BN, Q_SMEM, scale, ql, kl)
            rows = slice(qb*BM, min(ql, qb*BM + BM)); out[rows] = o[rows]; lse[rows] = l[rows]
        if kl == 0:
            check(f"mma d={D} q={ql} kv={kl}", out, lse); continue
        logits = (q.astype(np.float64) @ k[:kl].T.astype(np.float64))*scale
        mref = logits.max(1, keepdims=True); pr = np.exp(logits - mref); z = pr.sum(1, keepdims=True)
        ref = (pr/z) @ v[:kl].astype(np.float64); lref = (mref + np.log(z))[:, 0]
        check(f"mma d={D} q={ql} kv={kl}", out, lse, ref, lref)


if __name__ == "__main__":
    main()
