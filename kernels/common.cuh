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

// d SiLU / dx = s (1 + x (1 - s)), s = sigmoid(x).
DEVI float silu_grad_f(float x) {
    float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

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

// First global thread index and the stride of a grid-stride loop, in 64 bits.
DEVI long long grid_start() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
DEVI long long grid_stride() { return (long long)gridDim.x * blockDim.x; }
