// Convolutions on channels-last activations as implicit GEMM, forward and input gradient, and
// the token-wise linear layers (a 1x1 convolution is the same product).
//
// One problem description, ConvArgs, covers every case. The GEMM rows are pixels of an
// `n x mh x mw` grid, the columns are output channels, and the reduction runs over
// (tap, source channel). Row (img, my, mx) reads, for tap t, source pixel
// (my * in_stride + tap_dy[t], mx * in_stride + tap_dx[t]) of image img (zero outside the
// image: that is the padding), channels 0..sc, against weight rows tap_w[t] * sc .. + sc of
// B = [taps_total * sc, ncols] (row-major). Its result goes to output pixel
// (my * out_stride + out_oy, mx * out_stride + out_ox) of a yh x yw image.
// - forward, 3x3 stride s, padding p: taps (dy - p, dx - p), in_stride s, B = [(tap, ci), co];
// - input gradient, stride 1: taps (1 - dy, 1 - dx) over dy, B = [(tap, co), ci];
// - input gradient, stride 2: one launch per parity class (py, px) of the input pixel, each with
//   only the taps that reach it (4, 2, 2 or 1) and out_stride 2: no multiplication by the
//   zeros a dilated gradient would hold;
// - 1x1 convolution and linear layers: one tap at (0, 0).
// Epilogue: y = (acc + bias + temb[img] + residual) / out_div (+ y when accumulating).
//
// conv_gemm_vec: the fast path. 128x128 block tile, K slices of 8 double-buffered in shared
// memory with the next slice's global loads in flight during the current slice's arithmetic,
// 256 threads each computing an 8x8 register tile (as 2x2 blocks of 4x4, so that every shared
// read is a 16-byte broadcast or a conflict-free 16-byte row). Each thread loads one 16-byte
// quarter of an A row (4 channels of one pixel; two threads cover a 32-byte sector) and one
// 16-byte quarter of a B row. Needs sc % 8 == 0 (an 8-wide K slice stays inside one tap) and
// ncols % 4 == 0; the host checks both and the 16-byte alignment of every pointer.
// conv_gemm_any: the same kernel with scalar, fully bounds-checked loads, for any sizes.
// Both split K over gridDim.z when the tile grid alone cannot fill the machine; the splits then
// write raw partial sums to a workspace and conv_splitk_reduce adds them in a fixed order (the
// result does not depend on scheduling) and applies the epilogue.
// conv_narrow: ncols <= 8 (the 3-channel image convolutions): one warp per output pixel, lanes
// over source channels, a warp reduction per output channel; a 128-wide tile would waste 97%.
#include "conv_common.cuh"

// The fp32 weights of B.
DEVI const float* weights(const ConvArgs& a) { return static_cast<const float*>(a.w); }

constexpr int BM = 128;
constexpr int BN = 128;
constexpr int BK = 8;
// Row padding of the transposed A tile: the two threads sharing a pixel store into different
// bank halves, and rows stay 16-byte aligned for the vector reads.
constexpr int APAD = 4;

template <bool VEC>
DEVI void gemm_body(const ConvArgs& a) {
    __shared__ __align__(16) float As[2][BK][BM + APAD];
    __shared__ __align__(16) float Bs[2][BK][BN];
    __shared__ int s_dy[9], s_dx[9], s_w[9];

    const int tid = threadIdx.x;
    // Constant indices only: a run-time index into the parameter block would copy it to local
    // memory.
#pragma unroll
    for (int t = 0; t < 9; ++t) {
        if (tid == t) {
            s_dy[t] = a.tap_dy[t];
            s_dx[t] = a.tap_dx[t];
            s_w[t] = a.tap_w[t];
        }
    }

    const int M = a.n * a.mh * a.mw;
    const int sc = a.sc;
    const int ncols = a.ncols;
    const int K = a.taps * sc;
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int kb = blockIdx.z * a.k_per_split;
    const int ke = min(K, kb + a.k_per_split);
    const int ntiles = ke > kb ? (ke - kb + BK - 1) / BK : 0;

    // Loader roles: A row a_row, k offsets a_kq..a_kq+3; B row b_k, columns b_col..b_col+3.
    const int a_row = tid >> 1;
    const int a_kq = (tid & 1) * 4;
    const int am = m0 + a_row;
    const bool a_ok = am < M;
    int a_y = 0, a_x = 0;
    long long a_img_base = 0;
    if (a_ok) {
        const RowCoord r = decode_row(a, am);
        a_y = r.my * a.in_stride;
        a_x = r.mx * a.in_stride;
        a_img_base = (long long)r.img * a.sh * a.sw * sc;
    }
    const float* a_base = a.x + a_img_base;
    const int b_k = tid >> 5;
    const int b_c4 = (tid & 31) * 4;
    const int b_col = n0 + b_c4;

    // VEC path: the (tap, channel) of the next k each loader reads, advanced by BK per slice
    // (sc >= 8, so one step crosses at most one tap boundary).
    int at = 0, aci = 0, bt = 0, bci = 0;
    if (VEC) {
        int k = kb + a_kq;
        at = k / sc;
        aci = k - at * sc;
        k = kb + b_k;
        bt = k / sc;
        bci = k - bt * sc;
    }
    __syncthreads();

    float ra[4], rb[4];
    auto load = [&](int k0) {
        if (VEC) {
            const int k = k0 + a_kq;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (a_ok && k < ke) {
                const int iy = a_y + s_dy[at];
                const int ix = a_x + s_dx[at];
                if ((unsigned)iy < (unsigned)a.sh && (unsigned)ix < (unsigned)a.sw)
                    v = *reinterpret_cast<const float4*>(a_base + ((long long)iy * a.sw + ix) * sc + aci);
            }
            ra[0] = v.x; ra[1] = v.y; ra[2] = v.z; ra[3] = v.w;
            aci += BK;
            if (aci >= sc) { aci -= sc; ++at; }

            const int kr = k0 + b_k;
            float4 u = make_float4(0.f, 0.f, 0.f, 0.f);
            if (kr < ke && b_col < ncols)
                u = *reinterpret_cast<const float4*>(weights(a) + (long long)(s_w[bt] * sc + bci) * ncols + b_col);
            rb[0] = u.x; rb[1] = u.y; rb[2] = u.z; rb[3] = u.w;
            bci += BK;
            if (bci >= sc) { bci -= sc; ++bt; }
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int k = k0 + a_kq + j;
                float v = 0.f;
                if (a_ok && k < ke) {
                    const int t = k / sc;
                    const int ci = k - t * sc;
                    const int iy = a_y + s_dy[t];
                    const int ix = a_x + s_dx[t];
                    if ((unsigned)iy < (unsigned)a.sh && (unsigned)ix < (unsigned)a.sw)
                        v = a_base[((long long)iy * a.sw + ix) * sc + ci];
                }
                ra[j] = v;
            }
            const int kr = k0 + b_k;
            long long row = -1;
            if (kr < ke) {
                const int t = kr / sc;
                row = (long long)s_w[t] * sc + (kr - t * sc);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = b_col + j;
                rb[j] = (row >= 0 && c < ncols) ? weights(a)[row * ncols + c] : 0.f;
            }
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 4; ++j) As[buf][a_kq + j][a_row] = ra[j];
        *reinterpret_cast<float4*>(&Bs[buf][b_k][b_c4]) = make_float4(rb[0], rb[1], rb[2], rb[3]);
    };

    const int tx = tid & 15;
    const int ty = tid >> 4;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    if (ntiles > 0) {
        load(kb);
        store(0);
    }
    __syncthreads();
    for (int t = 0; t < ntiles; ++t) {
        const int cur = t & 1;
        if (t + 1 < ntiles) load(kb + (t + 1) * BK);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[cur][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[cur][kk][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][kk][64 + tx * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        if (t + 1 < ntiles) store(cur ^ 1);
        __syncthreads();
    }

    const bool split = gridDim.z > 1;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int r = (i < 4) ? ty * 4 + i : 64 + ty * 4 + (i - 4);
        const int m = m0 + r;
        if (m >= M) continue;
        const RowCoord rc = decode_row(a, m);
        const long long pix = out_pixel(a, rc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int col = n0 + h * 64 + tx * 4;
            if (VEC) {
                if (col >= ncols) continue;
                float4 v = make_float4(acc[i][h * 4], acc[i][h * 4 + 1], acc[i][h * 4 + 2], acc[i][h * 4 + 3]);
                if (split) {
                    *reinterpret_cast<float4*>(a.ws + ((long long)blockIdx.z * M + m) * ncols + col) = v;
                } else {
                    v.x = finish(a, rc.img, pix, col, v.x);
                    v.y = finish(a, rc.img, pix, col + 1, v.y);
                    v.z = finish(a, rc.img, pix, col + 2, v.z);
                    v.w = finish(a, rc.img, pix, col + 3, v.w);
                    *reinterpret_cast<float4*>(a.y + pix * ncols + col) = v;
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int c = col + j;
                    if (c >= ncols) continue;
                    const float v = acc[i][h * 4 + j];
                    if (split)
                        a.ws[((long long)blockIdx.z * M + m) * ncols + c] = v;
                    else
                        a.y[pix * ncols + c] = finish(a, rc.img, pix, c, v);
                }
            }
        }
    }
}

// Grid (ceil(M / 128), ceil(ncols / 128), splits), 256 threads, 16.6 KB static shared memory.
extern "C" __global__ void __launch_bounds__(256, 2) conv_gemm_vec(const ConvArgs a) { gemm_body<true>(a); }

// Same launch shape as conv_gemm_vec; any sizes and alignments.
extern "C" __global__ void __launch_bounds__(256, 2) conv_gemm_any(const ConvArgs a) { gemm_body<false>(a); }

// Sums the split-K partials in split order and applies the epilogue. Grid-stride over M * ncols.
extern "C" __global__ void conv_splitk_reduce(const ConvArgs a, int splits) {
    const int M = a.n * a.mh * a.mw;
    const long long total = (long long)M * a.ncols;
    for (long long e = grid_start(); e < total; e += grid_stride()) {
        const int m = (int)(e / a.ncols);
        const int col = (int)(e - (long long)m * a.ncols);
        float s = 0.f;
        for (int z = 0; z < splits; ++z) s += a.ws[(long long)z * total + e];
        const RowCoord rc = decode_row(a, m);
        const long long pix = out_pixel(a, rc);
        a.y[pix * a.ncols + col] = finish(a, rc.img, pix, col, s);
    }
}

// ncols <= 8. Blocks of 256 threads (8 warps), grid-stride over the M rows, one warp per row.
extern "C" __global__ void __launch_bounds__(256) conv_narrow(const ConvArgs a) {
    const int lane = threadIdx.x & 31;
    const long long warp = grid_start() >> 5;
    const long long nwarps = grid_stride() >> 5;
    const int M = a.n * a.mh * a.mw;
    const int sc = a.sc;
    const int ncols = a.ncols;
    for (long long mm = warp; mm < M; mm += nwarps) {
        const int m = (int)mm;
        const RowCoord rc = decode_row(a, m);
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.f;
#pragma unroll
        for (int t = 0; t < 9; ++t) {
            if (t >= a.taps) break;
            const int iy = rc.my * a.in_stride + a.tap_dy[t];
            const int ix = rc.mx * a.in_stride + a.tap_dx[t];
            if ((unsigned)iy >= (unsigned)a.sh || (unsigned)ix >= (unsigned)a.sw) continue;
            const float* xp = a.x + (((long long)rc.img * a.sh + iy) * a.sw + ix) * sc;
            const float* wp = weights(a) + (long long)a.tap_w[t] * sc * ncols;
            for (int ci = lane; ci < sc; ci += 32) {
                const float v = xp[ci];
                const float* wr = wp + (long long)ci * ncols;
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    if (j < ncols) acc[j] = fmaf(v, wr[j], acc[j]);
            }
        }
        const long long pix = out_pixel(a, rc);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (j >= ncols) break;
            const float s = warp_sum(acc[j]);
            if (lane == 0) a.y[pix * ncols + j] = finish(a, rc.img, pix, j, s);
        }
    }
}

// Per-tap transpose of a [taps, rows, cols] weight into [taps, cols, rows]: the forward layout
// [(tap, ci), co] becomes the input-gradient layout [(tap, co), ci]. Run once per network.
extern "C" __global__ void conv_weight_transpose(const float* src, float* dst, int taps, int rows, int cols) {
    const long long per = (long long)rows * cols;
    const long long total = per * taps;
    for (long long e = grid_start(); e < total; e += grid_stride()) {
        const long long t = e / per;
        const long long rem = e - t * per;
        const long long c = rem / rows;
        const long long r = rem - c * rows;
        dst[e] = src[t * per + r * cols + c];
    }
}
