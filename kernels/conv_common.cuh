// What the two convolution kernel families (conv.cu: fp32 SIMT; conv_tc.cu: tensor cores)
// share: the problem description the host fills (src/cuda/kernels.rs), the mapping of GEMM rows
// to pixels, and the epilogue, so that both round every output the same way.
#pragma once
#include "common.cuh"

struct ConvArgs {
    const float* x;     // gather source [n, sh, sw, sc]; 16-bit values for conv_tc.cu's _hin kernels
    const void* w;      // B, row-major, ncols wide: f32 (conv.cu), f32/bf16/f16 (conv_tc.cu)
    float* y;           // output [n, yh, yw, ncols]
    const float* bias;  // [ncols] or null
    const float* temb;  // [n, ncols] or null
    const float* res;   // like y, or null
    float* ws;          // split-K partial sums [splits, M, ncols], or null
    int n, mh, mw;
    int sh, sw, sc;
    int ncols;
    int taps, in_stride;
    int yh, yw, out_stride, out_oy, out_ox;
    int k_per_split;  // a multiple of the kernel's K slice
    int accumulate;
    float out_div;
    int tap_dy[9];
    int tap_dx[9];
    int tap_w[9];
};
static_assert(sizeof(ConvArgs) == 232, "ConvArgs must match src/cuda/kernels.rs");

struct RowCoord {
    int img, my, mx;
};

DEVI RowCoord decode_row(const ConvArgs& a, int m) {
    const int per = a.mh * a.mw;
    RowCoord r;
    r.img = m / per;
    const int rem = m - r.img * per;
    r.my = rem / a.mw;
    r.mx = rem - r.my * a.mw;
    return r;
}

DEVI long long out_pixel(const ConvArgs& a, RowCoord r) {
    return ((long long)r.img * a.yh + (long long)r.my * a.out_stride + a.out_oy) * a.yw +
           (long long)r.mx * a.out_stride + a.out_ox;
}

// The epilogue for one element, in the CPU's order: (bias + temb + residual) + acc, then the
// division, then the old value when accumulating.
DEVI float finish(const ConvArgs& a, int img, long long pix, int col, float acc) {
    float v = acc;
    if (a.bias != nullptr || a.temb != nullptr || a.res != nullptr) {
        float e = a.bias != nullptr ? a.bias[col] : 0.0f;
        if (a.temb != nullptr) e += a.temb[(long long)img * a.ncols + col];
        if (a.res != nullptr) e += a.res[pix * a.ncols + col];
        v = e + acc;
    }
    v = v / a.out_div;
    if (a.accumulate) v += a.y[pix * a.ncols + col];
    return v;
}
