// Linear layers over a few rows: the time-embedding MLP and each resnet's projection of it,
// y = (f(x) Wᵀ + b + residual) / out_div with f = SiLU or identity, rows = batch size.
//
// With a handful of rows a tiled product would leave almost every thread idle; instead one warp
// computes one output element as a dot product over the input width, reading a row of W in
// PyTorch's [out, inp] layout with consecutive lanes on consecutive addresses, and the input row
// (which every warp of the row shares, from L1). Token-wise linears (q/k/v and the attention
// output projection) have thousands of rows and go through conv_gemm instead.
#include "common.cuh"

// Blocks of 256 threads, grid-stride over rows * out warps.
extern "C" __global__ void linear_rows(const float* x, const float* w, const float* bias, const float* res,
                                       float* y, int rows, int inp, int out, int silu_in, float out_div) {
    const int lane = threadIdx.x & 31;
    const long long total = (long long)rows * out;
    for (long long e = grid_start() >> 5; e < total; e += grid_stride() >> 5) {
        const int r = (int)(e / out);
        const int o = (int)(e - (long long)r * out);
        const float* xr = x + (long long)r * inp;
        const float* wr = w + (long long)o * inp;
        float acc = 0.f;
        // Unrolled so that eight loads per lane are in flight at once: with a few hundred warps
        // on the whole card, a dependent chain of loads made this a 12 us launch (batch 1).
#pragma unroll 8
        for (int i = lane; i < inp; i += 32) {
            const float v = silu_in ? silu_f(xr[i]) : xr[i];
            acc = fmaf(v, wr[i], acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            float b = bias[o];
            if (res != nullptr) b += res[e];
            y[e] = (b + acc) / out_div;
        }
    }
}
