"""Fragment-level NumPy model of kernels/cuda/flash_attention.cu: one thread block at a time, with
ldmatrix (plain and .trans), mma.m16n8k16 (bf16, f32 accumulate) and shfl.xor acting per lane as the
PTX ISA documents them, and the kernel's own index formulas. Checks, without a GPU, that the fragment
mappings, tail masking, online softmax and log-sum-exp compose to attention (errors ~5e-4 from the
bf16 probabilities). Then the same for kernels/cuda/flash_attention_sm90.cu: its core-matrix tiled
shared memory written chunk by chunk as the kernel's threads write it, wgmma reading its operands
through the kernel's descriptors as the PTX ISA's canonical layouts place them (no swizzle; K-major
and MN-major), and its accumulator and register-A fragments. A change to either kernel's indexing
should be mirrored here and rerun (`.ci/run` runs it; it fails past the GPU test's bounds):

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


# ---- flash_attention_sm90.cu ----------------------------------------------------------------------
# Shared memory as a flat byte array of bf16 values (index = byte offset / 2).

def load_tile_cm(smem, dst, src, row0, rows, valid, D, threads=256):
    # the kernel's load_tile_cm: chunk i -> bytes [dst + 16 i, dst + 16 i + 16)
    for i in range(rows * D // 8):
        r8, c, rg = i & 7, (i >> 3) % (D // 8), (i >> 3) // (D // 8)
        r = rg * 8 + r8
        vals = src[row0 + r, c*8:c*8 + 8] if r < valid else np.zeros(8, np.float32)
        smem[(dst + 16*i)//2:(dst + 16*i)//2 + 8] = vals

def desc_fields(start, lbo, sbo):
    # smem_desc's packing, unpacked again (checks the 14-bit fields hold the values)
    d = ((start & 0x3FFFF) >> 4) | (((lbo & 0x3FFFF) >> 4) << 16) | (((sbo & 0x3FFFF) >> 4) << 32)
    return (d & 0x3FFF) << 4, ((d >> 16) & 0x3FFF) << 4, ((d >> 32) & 0x3FFF) << 4

def read_kmajor(smem, desc, rows):
    # K-major, no swizzle: element (r, k) of a rows x 16 operand at
    # start + (r % 8)·16 + (r / 8)·SBO + (k % 8)·2 + (k / 8)·LBO
    start, lbo, sbo = desc
    M = np.zeros((rows, 16), np.float32)
    for r in range(rows):
        for k in range(16):
            M[r, k] = smem[(start + (r % 8)*16 + (r // 8)*sbo + (k % 8)*2 + (k // 8)*lbo)//2]
    return M

def read_mnmajor(smem, desc, n):
    # MN-major, no swizzle: element (k, n) of a 16 x n operand at
    # start + (n % 8)·2 + (n / 8)·SBO + (k % 8)·16 + (k / 8)·LBO
    start, lbo, sbo = desc
    M = np.zeros((16, n), np.float32)
    for k in range(16):
        for c in range(n):
            M[k, c] = smem[(start + (c % 8)*2 + (c // 8)*sbo + (k % 8)*16 + (k // 8)*lbo)//2]
    return M

def acc_coords(N):
    # accumulator d[i] of warp wi, lane L of a m64nN wgmma: (row, col)
    out = np.zeros((4, 32, N//2, 2), np.int64)
    for wi in range(4):
        for L in range(32):
            g, t = L >> 2, L & 3
            for i in range(N//2):
                n, e = i // 4, i % 4
                out[wi, L, i] = (16*wi + g + 8*(e // 2), 8*n + 2*t + (e % 2))
    return out

def wgmma(acc, A, B, N):
    # acc[4, 32, N/2] += A[64 x 16] · B[16 x N], scattered by the accumulator layout
    C = A.astype(np.float64) @ B.astype(np.float64)
    co = acc_coords(N)
    return acc + C[co[..., 0], co[..., 1]]

def regs_a(pa):
    # register A fragments (per warp as mma.m16n8k16's) -> the 64 x 16 matrix
    A = np.zeros((64, 16), np.float32)
    for wi in range(4):
        for L in range(32):
            g, t = L >> 2, L & 3
            r = 16*wi
            A[r + g, 2*t:2*t+2] = pa[wi, L, 0]; A[r + g + 8, 2*t:2*t+2] = pa[wi, L, 1]
            A[r + g, 2*t+8:2*t+10] = pa[wi, L, 2]; A[r + g + 8, 2*t+8:2*t+10] = pa[wi, L, 3]
    return A

def block_sm90(q, k, v, q0, D, scale, q_len, kv_len):
    BM, BN = 128, 64
    Q_BYTES, KV_BYTES = BM*D*2, BN*D*2
    smem = np.full((Q_BYTES + 4*KV_BYTES)//2, np.nan, np.float32)  # unwritten bytes poison the result
    s_q = 0
    s_k = lambda st: Q_BYTES + st*2*KV_BYTES
    s_v = lambda st: Q_BYTES + st*2*KV_BYTES + KV_BYTES
    load_tile_cm(smem, s_q, q, q0, BM, q_len - q0, D)
    n_tiles = (kv_len + BN - 1)//BN
    if n_tiles > 0:
        load_tile_cm(smem, s_k(0), k, 0, BN, kv_len, D); load_tile_cm(smem, s_v(0), v, 0, BN, kv_len, D)
    out = np.zeros((q_len, D), np.float32); lse = np.zeros(q_len, np.float32)
    sl2 = np.float32(scale * 1.4426950408889634)
    G, T = LANES >> 2, LANES & 3
    o = np.zeros((2, 4, 32, D//2), np.float64)
    m = np.full((2, 4, 2, 32), -np.inf, np.float32); l = np.zeros((2, 4, 2, 32), np.float32)
    for j in range(n_tiles):
        st = j & 1; k0 = j*BN
        if j + 1 < n_tiles:
            load_tile_cm(smem, s_k(st ^ 1), k, k0 + BN, BN, kv_len - k0 - BN, D)
            load_tile_cm(smem, s_v(st ^ 1), v, k0 + BN, BN, kv_len - k0 - BN, D)
        for wg in range(2):
            q_wg = s_q + wg*8*(D//8)*128
            s = np.zeros((4, 32, BN//2), np.float64)
            for kk in range(D//16):
                A = read_kmajor(smem, desc_fields(q_wg + kk*256, 128, 16*D), 64)
                Bk = read_kmajor(smem, desc_fields(s_k(st) + kk*256, 128, 16*D), BN)  # N x 16
                s = wgmma(s, A, Bk.T, BN)
            s = s.astype(np.float32)
            for n in range(BN//8):
                for e in range(4):
                    mask = k0 + n*8 + 2*T + (e & 1) >= kv_len
                    s[:, mask, 4*n + e] = -np.inf
            for wi in range(4):
                for hh in range(2):
                    mx = m[wg, wi, hh].copy()
                    for n in range(BN//8):
                        mx = np.maximum(mx, np.maximum(s[wi, :, 4*n + 2*hh], s[wi, :, 4*n + 2*hh + 1]))
                    mx = np.maximum(mx, shfl_xor(mx, 1)); mx = np.maximum(mx, shfl_xor(mx, 2))
                    base = np.where(mx == -np.inf, 0, mx*sl2).astype(np.float32)
                    with np.errstate(invalid='ignore'):
                        corr = np.exp2(m[wg, wi, hh]*sl2 - base)
                    sm = np.zeros(32, np.float32)
                    for n in range(BN//8):
                        for e in (2*hh, 2*hh + 1):
                            p_ = np.exp2(s[wi, :, 4*n + e]*sl2 - base).astype(np.float32)
                            s[wi, :, 4*n + e] = p_; sm += p_
                    l[wg, wi, hh] = l[wg, wi, hh]*corr + sm; m[wg, wi, hh] = mx
                    for d in range(D//8):
                        o[wg, wi, :, 4*d + 2*hh] *= corr; o[wg, wi, :, 4*d + 2*hh + 1] *= corr
            for ks in range(BN//16):
                pa = np.zeros((4, 32, 4, 2), np.float32)
                for e in range(4):
                    pa[:, :, e] = bf16(s[:, :, 8*ks + 2*e:8*ks + 2*e + 2])
                Bv = read_mnmajor(smem, desc_fields(s_v(st) + ks*32*D, 16*D, 128), D)  # 16 x D
                o[wg] = wgmma(o[wg], regs_a(pa), Bv, D)
    for wg in range(2):
        for wi in range(4):
            for hh in range(2):
                sm = l[wg, wi, hh]; sm = sm + shfl_xor(sm, 1); sm = sm + shfl_xor(sm, 2)
                inv = np.where(sm > 0, 1/np.where(sm > 0, sm, 1), 0)
                for L in range(32):
                    row = q0 + wg*64 + wi*16 + G[L] + hh*8
                    if row < q_len:
                        for d in range(D//8):
                            out[row, d*8 + 2*T[L]] = o[wg, wi, L, 4*d + 2*hh]*inv[L]
                            out[row, d*8 + 2*T[L] + 1] = o[wg, wi, L, 4*d + 2*hh + 1]*inv[L]
                        if T[L] == 0:
                            lse[row] = m[wg, wi, hh, L]*scale + np.log(sm[L]) if sm[L] > 0 else -np.inf
    return out, lse

for D, ql, kl in [(64, 150, 100), (128, 130, 70), (64, 5, 0), (128, 1, 1)]:
    q = bf16(rng.uniform(-2, 2, (ql, D))); k = bf16(rng.uniform(-2, 2, (max(kl, 1) + 64, D))); v = bf16(rng.uniform(-1, 1, (max(kl, 1) + 64, D)))
    q = np.vstack([q, np.zeros((128, D), np.float32)])  # rows past q_len are never read (zero-filled)
    scale = 1/np.sqrt(D)
    out = np.zeros((ql, D)); lse = np.zeros(ql)
    for qb in range((ql + 127)//128):
        o_, l_ = block_sm90(q, k, v, qb*128, D, scale, ql, kl)
        rows = slice(qb*128, min(ql, qb*128 + 128)); out[rows] = o_[rows]; lse[rows] = l_[rows]
    if kl == 0:
        check(f"wgmma d={D} q={ql} kv={kl}", out, lse); continue
    logits = (q[:ql].astype(np.float64) @ k[:kl].T.astype(np.float64))*scale
    mref = logits.max(1, keepdims=True); pr = np.exp(logits - mref); z = pr.sum(1, keepdims=True)
    ref = (pr/z) @ v[:kl].astype(np.float64); lref = (mref + np.log(z))[:, 0]
    check(f"wgmma d={D} q={ql} kv={kl}", out, lse, ref, lref)
