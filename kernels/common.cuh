// Shared helpers of the invdiff kernels.
//
// Every kernel is `extern "C"` so that the Rust side finds it by its plain name, takes its sizes
// as arguments (nothing is specialised per shape at build time), and guards every global access
// with a bounds check: a launch with a wrong size must produce a wrong answer the selftest sees,
// never a write outside its buffers.
//
// Numerics: built without --use_fast_math, so expf, division and sqrt are the IEEE-accurate
// versions (expf within 2 ulp); nvcc still contracts a * b + c into FMA, which only ever removes
// a rounding. The CPU backend, the reference, is within a few ulp of the same operations.
#pragma once

#include <stdint.h>

#define DEVI __device__ __forceinline__

// SiLU as PyTorch writes it, x / (1 + e^-x).
DEVI float silu_f(float x) { return x / (1.0f + expf(-x)); }

DEVI float4 ld_f4(const float* p) { return *reinterpret_cast<const float4*>(p); }
DEVI float2 ld_f2(const float* p) { return *reinterpret_cast<const float2*>(p); }

DEVI float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

DEVI float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Two fp32 in one 32-bit word of two 16-bit floats, rounded to nearest even, the first in the
// low half (the lower address): bf16 (kind 1) or fp16 (kind 2), the codes the host passes.
DEVI uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
DEVI uint32_t pack_f16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
DEVI uint32_t pack_half2(float lo, float hi, int kind) {
    return kind == 1 ? pack_bf16x2(lo, hi) : pack_f16x2(lo, hi);
}
// One fp32 as the 16 bits pack_half2 gives it.
DEVI uint16_t pack_half1(float v, int kind) { return (uint16_t)(pack_half2(v, 0.0f, kind) & 0xffffu); }
// The fp32 value of 16 bits of that kind (exact: every bf16 and fp16 value is an fp32 value).
DEVI float unpack_half1(uint16_t h, int kind) {
    if (kind == 1) return __uint_as_float((uint32_t)h << 16);
    float r;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(h));
    return r;
}
// The two fp32 values of a word pack_half2 made (the first from the low half).
DEVI float2 unpack_half2(uint32_t w, int kind) {
    return make_float2(unpack_half1(w & 0xffffu, kind), unpack_half1(w >> 16, kind));
}

// An fp32 value rounded to tf32 (nearest, ties away: cvt.rna), the bits mma.sync's tf32
// operands take.
DEVI uint32_t tf32_of(float v) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
    return r;
}

// D += A B for one m16n8k8 tf32 tile, fp32 accumulators (PTX ISA fragments, g = lane / 4,
// q = lane % 4: a0..a3 = A(g, q), A(g + 8, q), A(g, q + 4), A(g + 8, q + 4); b0, b1 =
// B(q, g), B(q + 4, g); d0, d1 = D(g, 2q), D(g, 2q + 1), d2, d3 the same at row g + 8). Not
// volatile: a pure function of its operands, which leaves the compiler free to interleave the
// products with the fragment loads.
DEVI void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D += A B for one m16n8k16 bf16 tile, fp32 accumulators: a0..a3 = A(g, 2q..2q+1), A(g + 8,
// 2q..), A(g, 2q + 8..), A(g + 8, 2q + 8..), two bf16 a register, the lower column in the low
// half; b0, b1 = B(2q..2q+1, g), B(2q + 8.., g); d as for mma_tf32. Not volatile, likewise.
DEVI void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// v split into bf16 (hi, lo) pairs for two values: hi = rn(v), lo = rn(v - hi), each as the
// register of two halves an mma operand takes (first value in the low half). Summing lo*hi +
// hi*lo + hi*hi keeps about 17 significant bits of every product (lo*lo, below 2^-16 of it, is
// left out). (An infinite v gives a NaN lo: the kernels that split take finite activations.)
DEVI void split_bf16x2(float v0, float v1, uint32_t& hi, uint32_t& lo) {
    hi = pack_bf16x2(v0, v1);
    lo = pack_bf16x2(v0 - __uint_as_float(hi << 16), v1 - __uint_as_float(hi & 0xffff0000u));
}

// acc += A B over operands split by split_bf16x2: lo·hi + hi·lo + hi·hi, in that order.
DEVI void mma_split(float (&acc)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4], const uint32_t (&bh)[2],
                    const uint32_t (&bl)[2]) {
    mma_bf16(acc, al, bh[0], bh[1]);
    mma_bf16(acc, ah, bl[0], bl[1]);
    mma_bf16(acc, ah, bh[0], bh[1]);
}

// Asynchronous copies global -> shared (cp.async), for the pipelined kernels
// (the convolutions, fused attention).
DEVI uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes from registers into shared memory, for tiles a kernel converts on the way.
DEVI void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d));
}

// 16 bytes global -> shared, or 16 zero bytes when !ok (src-size 0 reads nothing).
DEVI void cp_async16(uint32_t dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
// The same for one 4-byte element (cp.async.cg moves only 16 bytes; .ca goes through L1).
DEVI void cp_async4(uint32_t dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 4 : 0));
}
// A hint: the 128-byte line holding p into L2; no fault, no wait, no register written.
DEVI void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
DEVI void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> DEVI void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// First global thread index and the stride of a grid-stride loop, in 64 bits.
DEVI long long grid_start() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
DEVI long long grid_stride() { return (long long)gridDim.x * blockDim.x; }
