// Tessera CUDA kernels: shared helpers, prepended to every kernel source before NVRTC compiles it
// (kernels/src/cuda/source.rs). Self-contained: no CUDA header is needed at run time, so a worker
// image with only the driver and libnvrtc can compile the kernels. Requires sm_80 or newer
// (bf16 conversions, mma.sync with bf16 operands, cp.async).

typedef unsigned short bf16;      // raw bfloat16 bits
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define NEG_INF (__int_as_float(0xff800000))
#define LOG2E 1.4426950408889634f

// ---- bf16 <-> f32 -------------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(bf16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even, NaN preserved (PTX cvt.rn.bf16.f32, sm_80+).
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Two floats to one 32-bit word of two bf16: `lo` in the low half (the lower address / column).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Element stores of an output that is either bf16 or f32.
__device__ __forceinline__ void store_elem(bf16* p, float v) { *p = f32_to_bf16(v); }
__device__ __forceinline__ void store_elem(float* p, float v) { *p = v; }
__device__ __forceinline__ float load_elem(const bf16* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ float load_elem(const float* p) { return *p; }

// Two adjacent elements (the address is 4-byte aligned for bf16, 8-byte for f32).
__device__ __forceinline__ void store_pair(bf16* p, float a, float b) { *reinterpret_cast<u32*>(p) = pack_bf16x2(a, b); }
__device__ __forceinline__ void store_pair(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }

// ---- reductions ---------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` holds 32 floats of shared memory; the call synchronises the block.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// ---- shared memory and asynchronous copies -----------------------------------------------------

// The shared-memory address (bytes) of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16-byte asynchronous copy global -> shared address `dst`; `valid == false` writes zeros
// (src-size 0) and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Ends ptxas's basic block here. ptxas schedules a wait (cp.async.wait_group, wgmma.wait_group) or
// a barrier as early as its basic block allows, ahead of independent work written before it: a
// wait meant to follow a softmax, so that the softmax runs beside the asynchronous MMA it waits
// for, would then precede it (seen in the wgmma attention's SASS). A branch ptxas cannot resolve,
// on `nonzero`, ends the block, and nothing after it moves above. `nonzero` is nonzero whenever
// this runs; were it zero, the other path sleeps for no time and joins.
__device__ __forceinline__ void end_basic_block(int nonzero) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.s32 p, %0, 0;\n@p bra.uni END;\nnanosleep.u32 0;\nEND:\n}\n" ::"r"(nonzero) : "memory");
}

// The dynamic shared memory this block was launched with, in bytes.
__device__ __forceinline__ u32 dynamic_smem_bytes() {
    u32 n;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(n));
    return n;
}

// ---- fast exp2 ----------------------------------------------------------------------------------

__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
