"""NumPy model of kernels/cuda/flash_attention_sm90.cu, both schedules (OVERLAP false and true), one
thread block at a time, with the asynchrony the hardware has and a sequential model would hide:

- Shared memory is written chunk by chunk as the kernel's threads write it (load_tile_cm's core-matrix
  tiled layout); wgmma reads its operands through the kernel's descriptors at the places the PTX ISA's
  canonical no-swizzle layouts give (K-major and MN-major), and its accumulator and register-A
  fragments are scattered per lane.
- cp.async: bytes a thread copies become readable by the block only once the copying threads have
  waited for their group and a barrier has followed. Until then they read as NaN, so a premature read
  poisons the result. Issuing a copy into bytes that a wgmma still reads, or read before the last
  barrier, is an error.
- wgmma: a warpgroup's group of MMAs reads its operands when issued and owns its accumulator and
  register-A registers until the warpgroup waits for it (wgmma.wait_group N: all but the newest N
  groups). Touching those registers before then is an error.

Then the same checks are shown to fail: each deliberate bug in `BUGS` must be caught. Rerun after a
change to the kernel's indexing or schedule (`.ci/run` runs it; it fails past the GPU test's bounds):

    python3 kernels/tests/flash_attention_sm90_model.py     # needs numpy
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flash_attention_model import G, T, bf16, check, shfl_xor  # noqa: E402

BM, BN = 128, 64  # FA90_BM query rows per block (2 warpgroups of 64), FA90_BN key rows per tile


class Hazard(Exception):
    """A race the hardware would have: the kernel's synchronisation does not order two accesses."""


class Block:
    """Shared memory, cp.async groups and wgmma groups of one thread block."""

    def __init__(self, nbytes):
        self.smem = np.full(nbytes // 2, np.nan, np.float32)  # what a read sees (bf16 values)
        self.open = []      # cp.async writes since the last commit: (byte offset, values)
        self.groups = []    # committed, not yet waited for
        self.landed = []    # waited for, not yet published by a barrier
        self.reads = []     # shared-memory reads of wgmma groups not yet released: (group, lo, hi)
        self.inflight = {0: [], 1: []}  # per warpgroup: its committed, unwaited wgmma groups

    # cp.async
    def cp_async(self, lo, vals):
        hi = lo + 2 * len(vals)
        for grp, rlo, rhi in self.reads:
            if lo < rhi and rlo < hi:
                raise Hazard(f"cp.async into bytes [{lo}, {hi}) that a wgmma reads ([{rlo}, {rhi}), "
                             f"{'unfinished' if not grp['done'] else 'finished, no barrier since'})")
        self.smem[lo // 2:hi // 2] = np.nan  # may land at any time from now on
        self.open.append((lo, vals))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def cp_wait(self, n):
        while len(self.groups) > n:
            self.landed.append(self.groups.pop(0))

    def barrier(self):
        for g in self.landed:
            for lo, vals in g:
                self.smem[lo // 2:lo // 2 + len(vals)] = vals
        self.landed = []
        self.reads = [r for r in self.reads if not r[0]["done"]]

    # wgmma
    def touch(self, wg, *regs):
        for grp in self.inflight[wg]:
            for r in regs:
                if r in grp["regs"]:
                    raise Hazard(f"warpgroup {wg} touches {r} while a wgmma group owns it")

    def issue(self, wg, regs, reads):
        self.touch(wg, *regs)
        grp = {"regs": set(regs), "done": False}
        self.inflight[wg].append(grp)
        self.reads += [(grp, lo, hi) for lo, hi in reads]

    def wg_wait(self, wg, n):
        while len(self.inflight[wg]) > n:
            self.inflight[wg].pop(0)["done"] = True

    def idle(self):
        return not self.open and not self.groups and not any(self.inflight.values())


def tile_values(src, row0, rows, valid, D):
    """load_tile_cm: the bytes of one tile, chunk i (16 bytes) at 16·i."""
    buf = np.zeros(rows * D, np.float32)
    for i in range(rows * D // 8):
        r8, c, rg = i & 7, (i >> 3) % (D // 8), (i >> 3) // (D // 8)
        r = rg * 8 + r8
        buf[8 * i:8 * i + 8] = src[row0 + r, c * 8:c * 8 + 8] if r < valid else 0
    return buf


def desc_fields(start, lbo, sbo):
    # smem_desc's packing, unpacked again (checks the 14-bit fields hold the values)
    d = ((start & 0x3FFFF) >> 4) | (((lbo & 0x3FFFF) >> 4) << 16) | (((sbo & 0x3FFFF) >> 4) << 32)
    return (d & 0x3FFF) << 4, ((d >> 16) & 0x3FFF) << 4, ((d >> 32) & 0x3FFF) << 4


def at(smem, byte_offsets):
    if byte_offsets.max() >= 2 * len(smem):
        raise Hazard(f"a wgmma operand reaches byte {byte_offsets.max()}, past the block's {2 * len(smem)}")
    return smem[byte_offsets // 2]


def read_kmajor(smem, desc, rows):
    # K-major, no swizzle: element (r, k) of a rows x 16 operand at
    # start + (r % 8)·16 + (r / 8)·SBO + (k % 8)·2 + (k / 8)·LBO
    start, lbo, sbo = desc
    r, kk = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
    return at(smem, start + (r % 8) * 16 + (r // 8) * sbo + (kk % 8) * 2 + (kk // 8) * lbo)


def read_mnmajor(smem, desc, n):
    # MN-major, no swizzle: element (k, n) of a 16 x n operand at
    # start + (n % 8)·2 + (n / 8)·SBO + (k % 8)·16 + (k / 8)·LBO
    start, lbo, sbo = desc
    kk, c = np.meshgrid(np.arange(16), np.arange(n), indexing="ij")
    return at(smem, start + (c % 8) * 2 + (c // 8) * sbo + (kk % 8) * 16 + (kk // 8) * lbo)


def acc_coords(N):
    # accumulator d[i] of warp wi, lane L of a m64nN wgmma: (row, col)
    out = np.zeros((4, 32, N // 2, 2), np.int64)
    for wi in range(4):
        for L in range(32):
            g, t = L >> 2, L & 3
            for i in range(N // 2):
                n, e = i // 4, i % 4
                out[wi, L, i] = (16 * wi + g + 8 * (e // 2), 8 * n + 2 * t + (e % 2))
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
            r = 16 * wi
            A[r + g, 2 * t:2 * t + 2] = pa[wi, L, 0]
            A[r + g + 8, 2 * t:2 * t + 2] = pa[wi, L, 1]
            A[r + g, 2 * t + 8:2 * t + 10] = pa[wi, L, 2]
            A[r + g + 8, 2 * t + 8:2 * t + 10] = pa[wi, L, 3]
    return A


# Deliberate bugs, each of which the model must catch (a Hazard, or results out of bounds).
BUGS = {
    "V's LBO and SBO swapped": "v_desc",
    "accumulator row halves swapped": "acc_rows",
    "loads issued before the tile's barrier": "load_before_barrier",
    "overlapped: no wait for P·V before O is rescaled": "no_pv_wait",
    "overlapped: P packed into the fragments P·V still reads": "one_p_set",
    "overlapped: V loaded with K (no lag) into the stage P·V reads": "v_no_lag",
    "cp.async group waited one too few": "shallow_wait",
}


def block_sm90(q, k, v, q0, D, scale, q_len, kv_len, overlap, bug=None):
    QB, KVB = BM * D * 2, BN * D * 2
    b = Block(QB + 4 * KVB)
    s_q = 0
    s_k = lambda st: QB + st * 2 * KVB
    s_v = lambda st: QB + st * 2 * KVB + KVB
    load = lambda dst, src, row0, rows, valid: b.cp_async(dst, tile_values(src, row0, rows, valid, D))
    sl2 = np.float32(scale * 1.4426950408889634)
    n_tiles = (kv_len + BN - 1) // BN

    load(s_q, q, q0, BM, q_len - q0)
    if n_tiles > 0:
        load(s_k(0), k, 0, BN, kv_len)
        if not overlap:
            load(s_v(0), v, 0, BN, kv_len)
    b.commit()

    o = np.zeros((2, 4, 32, D // 2), np.float64)
    m = np.full((2, 4, 2, 32), -np.inf, np.float32)
    l = np.zeros((2, 4, 2, 32), np.float32)
    s = np.zeros((2, 4, 32, BN // 2), np.float32)
    pa = {"pa0": np.zeros((2, BN // 16, 4, 32, 4, 2), np.float32), "pa1": np.zeros((2, BN // 16, 4, 32, 4, 2), np.float32)}
    corr = np.zeros((2, 4, 2, 32), np.float32)

    def loads(j):
        k0 = j * BN
        if overlap:
            if j + 1 < n_tiles:
                load(s_k((j + 1) & 1), k, k0 + BN, BN, kv_len - k0 - BN)
            load(s_v((j + 1) & 1) if bug == "v_no_lag" else s_v(j & 1), v, k0, BN, kv_len - k0)
        elif j + 1 < n_tiles:
            load(s_k((j + 1) & 1), k, k0 + BN, BN, kv_len - k0 - BN)
            load(s_v((j + 1) & 1), v, k0 + BN, BN, kv_len - k0 - BN)
        b.commit()

    def issue_pv(wg, p_set, v_tile):
        b.touch(wg, "o", p_set)
        lbo, sbo = (128, 16 * D) if bug == "v_desc" else (16 * D, 128)
        for ks in range(BN // 16):
            Bv = read_mnmajor(b.smem, desc_fields(v_tile + ks * 32 * D, lbo, sbo), D)  # 16 x D
            o[wg] = wgmma(o[wg], regs_a(pa[p_set][wg, ks]), Bv, D)
        b.issue(wg, ["o", p_set], [(v_tile, v_tile + KVB)])

    def rescale(wg):
        # rescale_o: o[4d + e] belongs to row g + 8·(e / 2)
        o[wg] *= corr[wg][:, (np.arange(D // 2) % 4) // 2, :].transpose(0, 2, 1)

    def warpgroup_tile(wg, j, pa_prev, pa_next):
        k0 = j * BN
        q_wg = s_q + wg * 8 * (D // 8) * 128
        # issue_qk
        b.touch(wg, "s")
        acc = np.zeros((4, 32, BN // 2), np.float64)
        for kk in range(D // 16):
            A = read_kmajor(b.smem, desc_fields(q_wg + kk * 256, 128, 16 * D), 64)
            Bk = read_kmajor(b.smem, desc_fields(s_k(j & 1) + kk * 256, 128, 16 * D), BN)  # N x 16
            acc = wgmma(acc, A, Bk.T, BN)
        if bug == "acc_rows":
            acc = acc.reshape(4, 32, BN // 8, 2, 2)[:, :, :, ::-1, :].reshape(4, 32, BN // 2)
        s[wg] = acc
        b.issue(wg, ["s"], [(q_wg, q_wg + 64 * D * 2), (s_k(j & 1), s_k(j & 1) + KVB)])
        if overlap and j > 0:
            issue_pv(wg, pa_prev, s_v((j - 1) & 1))
            b.wg_wait(wg, 1)
        else:
            b.wg_wait(wg, 0)
        # mask_tail and online_softmax
        b.touch(wg, "s")
        for n in range(BN // 8):
            for e in range(4):
                s[wg][:, k0 + n * 8 + 2 * T + (e & 1) >= kv_len, 4 * n + e] = -np.inf
        for wi in range(4):
            for hh in range(2):
                mx = m[wg, wi, hh].copy()
                for n in range(BN // 8):
                    mx = np.maximum(mx, np.maximum(s[wg, wi, :, 4 * n + 2 * hh], s[wg, wi, :, 4 * n + 2 * hh + 1]))
                mx = np.maximum(mx, shfl_xor(mx, 1))
                mx = np.maximum(mx, shfl_xor(mx, 2))
                base = np.where(mx == -np.inf, 0, mx * sl2).astype(np.float32)
                with np.errstate(invalid="ignore"):
                    corr[wg, wi, hh] = np.exp2(m[wg, wi, hh] * sl2 - base)
                sm = np.zeros(32, np.float32)
                for n in range(BN // 8):
                    for e in (2 * hh, 2 * hh + 1):
                        p_ = np.exp2(s[wg, wi, :, 4 * n + e] * sl2 - base).astype(np.float32)
                        s[wg, wi, :, 4 * n + e] = p_
                        sm += p_
                l[wg, wi, hh] = l[wg, wi, hh] * corr[wg, wi, hh] + sm
                m[wg, wi, hh] = mx
        # pack_p
        target = pa_prev if bug == "one_p_set" else pa_next
        b.touch(wg, target)
        for ks in range(BN // 16):
            for e in range(4):
                pa[target][wg, ks, :, :, e] = bf16(s[wg][:, :, 8 * ks + 2 * e:8 * ks + 2 * e + 2])
        if overlap:
            if bug != "no_pv_wait":
                b.wg_wait(wg, 0)
            b.touch(wg, "o")
            rescale(wg)
        else:
            b.touch(wg, "o")
            rescale(wg)
            issue_pv(wg, target, s_v(j & 1))
            b.wg_wait(wg, 0)

    for j in range(n_tiles):
        pa_prev, pa_next = ("pa1", "pa0") if j % 2 == 0 else ("pa0", "pa1")
        if bug == "load_before_barrier":
            loads(j)
        b.cp_wait(1 if bug == "shallow_wait" else 0)
        b.barrier()
        if bug != "load_before_barrier":
            loads(j)
        for wg in range(2):
            warpgroup_tile(wg, j, pa_prev, pa_next)
    if overlap and n_tiles > 0:
        b.cp_wait(0)
        b.barrier()
        last = "pa0" if n_tiles & 1 else "pa1"
        for wg in range(2):
            issue_pv(wg, last, s_v((n_tiles - 1) & 1))
            b.wg_wait(wg, 0)
    b.cp_wait(0)
    if not b.idle():
        raise Hazard("the block exits with copies or MMAs in flight")

    out = np.zeros((q_len, D), np.float32)
    lse = np.zeros(q_len, np.float32)
    for wg in range(2):
        for wi in range(4):
            for hh in range(2):
                sm = l[wg, wi, hh]
                sm = sm + shfl_xor(sm, 1)
                sm = sm + shfl_xor(sm, 2)
                inv = np.where(sm > 0, 1 / np.where(sm > 0, sm, 1), 0)
                for L in range(32):
                    row = q0 + wg * 64 + wi * 16 + G[L] + hh * 8
                    if row < q_len:
                        for d in range(D // 8):
                            out[row, d * 8 + 2 * T[L]] = o[wg, wi, L, 4 * d + 2 * hh] * inv[L]
                            out[row, d * 8 + 2 * T[L] + 1] = o[wg, wi, L, 4 * d + 2 * hh + 1] * inv[L]
                        if T[L] == 0:
                            lse[row] = m[wg, wi, hh, L] * scale + np.log(sm[L]) if sm[L] > 0 else -np.inf
    return out, lse


def attention(q, k, v, D, ql, kl, overlap, bug=None):
    scale = 1 / np.sqrt(D)
    out = np.zeros((ql, D))
    lse = np.zeros(ql)
    for qb in range((ql + BM - 1) // BM):
        o_, l_ = block_sm90(q, k, v, qb * BM, D, scale, ql, kl, overlap, bug)
        rows = slice(qb * BM, min(ql, qb * BM + BM))
        out[rows] = o_[rows]
        lse[rows] = l_[rows]
    if kl == 0:
        return out, lse, None, None
    logits = (q[:ql].astype(np.float64) @ k[:kl].T.astype(np.float64)) * scale
    mref = logits.max(1, keepdims=True)
    pr = np.exp(logits - mref)
    z = pr.sum(1, keepdims=True)
    return out, lse, (pr / z) @ v[:kl].astype(np.float64), (mref + np.log(z))[:, 0]


def inputs(rng, D, ql, kl):
    q = bf16(rng.uniform(-2, 2, (ql, D)))
    k = bf16(rng.uniform(-2, 2, (max(kl, 1) + BN, D)))
    v = bf16(rng.uniform(-1, 1, (max(kl, 1) + BN, D)))
    q = np.vstack([q, np.zeros((BM, D), np.float32)])  # rows past q_len are never read (zero-filled)
    return q, k, v


def main():
    rng = np.random.default_rng(0)
    # 3 tiles (an odd count: the last P in pa0), 2 tiles (even: pa1), one partial tile, no keys.
    cases = [(64, 150, 150), (128, 130, 100), (128, 1, 1), (64, 5, 0)]
    for overlap in (False, True):
        for D, ql, kl in cases:
            q, k, v = inputs(rng, D, ql, kl)
            out, lse, ref, lref = attention(q, k, v, D, ql, kl, overlap)
            check(f"wgmma{' overlapped' if overlap else ''} d={D} q={ql} kv={kl}", out, lse, ref, lref)
    # Every deliberate bug is caught, in a schedule it applies to.
    for what, bug in BUGS.items():
        overlap = what.startswith("overlapped") or bug in ("load_before_barrier", "shallow_wait")
        q, k, v = inputs(rng, 128, 130, 150)
        try:
            out, lse, ref, lref = attention(q, k, v, 128, 130, 150, overlap, bug)
            err = np.abs(out - ref)
            caught = not (np.all(err <= 4e-3 + 1e-2 * np.abs(ref)) and np.all(np.abs(lse - lref) <= 1e-4 + 1e-4 * np.abs(lref)))
            how = "results out of bounds" if caught else "NOT CAUGHT"
        except Hazard as e:
            caught, how = True, f"hazard: {e}"
        print(f"bug '{what}': {how}")
        assert caught, what


if __name__ == "__main__":
    main()
