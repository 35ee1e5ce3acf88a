// What the two convolution kernel families (conv.cu: fp32 SIMT; conv_tc.cu: tensor cores)
// share: the problem description the host fills (src/cuda/kernels/conv.rs), the mapping of GEMM rows
// to pixels, and the epilogue, so that both round every output the same way; the 3x3 window
// of taps that conv.cu's direct kernels work on.
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
    int prefetch;  // the lean wgmma kernels, unsplit: ask L2 for the epilogue's reads first
    double* gn_partial;  // the lean wgmma kernels, unsplit: the output's GroupNorm partial sums, or null
    // The staged epilogue (conv_wgmma.cu's `_st` kernels, unsplit), each output value also in
    // 16 bits: at y16[pixel * y16_stride + y16_offset + col] (a side of a concatenation) and at
    // copy16[pixel * ncols + col] (a copy for tensor-core readers), each where not null; y is
    // null where nothing reads the fp32 values.
    uint16_t* y16;
    int y16_stride, y16_offset;
    uint16_t* copy16;
};
static_assert(sizeof(ConvArgs) == 272, "ConvArgs must match src/cuda/kernels/conv.rs");

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
// division, then the old value when accumulating. `bias` is the bias of column col, or 0
// without one: what finish() reads.
DEVI float finish_with_bias(const ConvArgs& a, float bias, int img, long long pix, int col, float acc) {
    float v = acc;
    if (a.bias != nullptr || a.temb != nullptr || a.res != nullptr) {
        float e = bias;
        if (a.temb != nullptr) e += a.temb[(long long)img * a.ncols + col];
        if (a.res != nullptr) e += a.res[pix * a.ncols + col];
        v = e + acc;
    }
    v = v / a.out_div;
    if (a.accumulate) v += a.y[pix * a.ncols + col];
    return v;
}

// The launch's taps in shared memory, written by its first nine threads (the caller
// synchronises before reading them). The GEMM kernels index them by a run-time tap number, and
// a run-time index into the parameter block would copy the whole block to local memory.
struct Taps {
    int dy[9], dx[9], w[9];
};
DEVI void stage_taps(const ConvArgs& a, Taps& s) {
#pragma unroll
    for (int t = 0; t < 9; ++t) {
        if (threadIdx.x == t) {
            s.dy[t] = a.tap_dy[t];
            s.dx[t] = a.tap_dx[t];
            s.w[t] = a.tap_w[t];
        }
    }
}

// The K range [kb, ke) of split blockIdx.z, in `slices` slices of bk; `extra_k` more K after
// the taps' (the wgmma kernels' fused 1x1 shortcut, conv_wgmma.cu).
struct KSplit {
    int kb, ke, slices;
};
DEVI KSplit k_split(const ConvArgs& a, int bk, int extra_k = 0) {
    const int K = a.taps * a.sc + extra_k;
    const int kb = blockIdx.z * a.k_per_split;
    const int ke = min(K, kb + a.k_per_split);
    return {kb, ke, ke > kb ? (ke - kb + bk - 1) / bk : 0};
}

DEVI float finish(const ConvArgs& a, int img, long long pix, int col, float acc) {
    return finish_with_bias(a, a.bias != nullptr ? a.bias[col] : 0.0f, img, pix, col, acc);
}

// Two adjacent outputs (row m, columns col and col + 1) of a tensor-core tile: raw partial sums
// into split blockIdx.z's workspace when K is split (`split`), else finished into y.
DEVI void store_pair(const ConvArgs& a, bool split, int M, int m, RowCoord rc, long long pix, int col, float2 v) {
    if (split) {
        *reinterpret_cast<float2*>(a.ws + ((long long)blockIdx.z * M + m) * a.ncols + col) = v;
        return;
    }
    v.x = finish(a, rc.img, pix, col, v.x);
    v.y = finish(a, rc.img, pix, col + 1, v.y);
    *reinterpret_cast<float2*>(a.y + pix * a.ncols + col) = v;
}

// The epilogue of NP column pairs of one output row (row m of image img at output pixel pix):
// pair i holds v[i] for columns col0 + 8i and col0 + 8i + 1, those at or past ncols skipped.
// finish()'s arithmetic in its order, but every load (bias, time embedding, residual, the old
// output when accumulating) is issued before the first store: the compiler cannot tell that
// y aliases none of them (an element is only ever read and written by the thread that owns
// it), so store_pair's loop waits a memory round trip per pair after each store. SKIP_DIV1
// (the lean wgmma kernels): no division where out_div is 1, whose quotient is the dividend to
// the bit; the IEEE division is a reciprocal, two corrections and a slow-path test per value.
// KEEP (the lean wgmma kernels): where `keep` is not null, each pair is also stored at
// keep + 8i, for the GroupNorm partial sums (wg_stats in conv_wgmma.cu).
template <int NP, bool SKIP_DIV1 = false, bool KEEP = false>
DEVI void finish_row(const ConvArgs& a, int img, long long pix, int col0, const float2 (&v)[NP],
                     float* keep = nullptr) {
    const bool epi = a.bias != nullptr || a.temb != nullptr || a.res != nullptr;
    float2 e[NP], old[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const int col = col0 + 8 * i;
        e[i] = old[i] = make_float2(0.f, 0.f);
        if (col >= a.ncols) continue;
        if (a.bias != nullptr) e[i] = *reinterpret_cast<const float2*>(a.bias + col);
        if (a.temb != nullptr) {
            const float2 t = *reinterpret_cast<const float2*>(a.temb + (long long)img * a.ncols + col);
            e[i].x += t.x;
            e[i].y += t.y;
        }
        if (a.res != nullptr) {
            const float2 r = *reinterpret_cast<const float2*>(a.res + pix * a.ncols + col);
            e[i].x += r.x;
            e[i].y += r.y;
        }
        if (a.accumulate) old[i] = *reinterpret_cast<const float2*>(a.y + pix * a.ncols + col);
    }
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const int col = col0 + 8 * i;
        if (col >= a.ncols) continue;
        float2 r = v[i];
        if (epi) {
            r.x = e[i].x + r.x;
            r.y = e[i].y + r.y;
        }
        if (!SKIP_DIV1 || a.out_div != 1.0f) {
            r.x = r.x / a.out_div;
            r.y = r.y / a.out_div;
        }
        if (a.accumulate) {
            r.x += old[i].x;
            r.y += old[i].y;
        }
        *reinterpret_cast<float2*>(a.y + pix * a.ncols + col) = r;
        if (KEEP && keep != nullptr) *reinterpret_cast<float2*>(keep + 8 * i) = r;
    }
}

// The direct kernels (conv.cu: conv_narrow_*, conv_few_in_*) see the taps as cells of one 3x3
// window of source offsets: the host sends them only launches at in_stride 1 whose taps lie in
// such a window, at distinct offsets; a cell without a tap has zero weights.
struct Window {
    int dy0, dx0;  // source offset of cell (0, 0), the smallest tap offsets
};

DEVI Window tap_window(const ConvArgs& a) {
    Window w{a.tap_dy[0], a.tap_dx[0]};
    // Constant indices only (see gemm_body in conv.cu).
#pragma unroll
    for (int t = 1; t < 9; ++t) {
        if (t < a.taps) {
            w.dy0 = min(w.dy0, a.tap_dy[t]);
            w.dx0 = min(w.dx0, a.tap_dx[t]);
        }
    }
    return w;
}

// The weight block (tap_w) of window cell `cell` = 3 * row + column, or -1 when no tap is there.
DEVI int cell_weights(const ConvArgs& a, Window win, int cell) {
    int w = -1;
#pragma unroll
    for (int t = 0; t < 9; ++t) {
        if (t < a.taps && (a.tap_dy[t] - win.dy0) * 3 + (a.tap_dx[t] - win.dx0) == cell) w = a.tap_w[t];
    }
    return w;
}
