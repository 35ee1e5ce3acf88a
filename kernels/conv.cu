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
// The 3-channel image convolutions (celebahq: conv_out 128->3 and conv_in 3->128, forward and
// input gradient) would waste 97% of a 128-wide tile, so they have direct kernels of their own,
// for launches at in_stride 1 whose taps fit a 3x3 window (every stride-1 3x3 and 1x1
// convolution and every input gradient; the host sends anything else to the GEMM):
// - conv_narrow_<NC>, ncols == NC <= 8 (few outputs: conv_out forward, conv_in's input
//   gradient): a block computes a 16x32 tile of output pixels. Per stage it brings CK = 8
//   channels of the 18x34 halo tile and their weights into shared memory with cp.async (16-byte
//   copies when sc % 4 == 0: each activation is read once from memory, plus the halo, 20%),
//   three stages in flight. Each thread keeps a column of 4 pixels x NC sums; the warps of one
//   half of the block take channels 0-3 of the stage, the other half 4-7, and the halves add
//   their sums at the end. Per 4 channels a thread reads 18 float4 of activations (lanes on
//   consecutive pixels: conflict-free) and 9 x NC float4 of weights (one address per warp) for
//   144 x NC FMAs.
// - conv_few_in_<SC>, sc == SC <= 8, any ncols (few inputs: conv_in forward, conv_out's input
//   gradient): all weights of a 128-column tile in shared memory; a thread computes a run of 16
//   pixels along a row x 4 columns, reading each source value once per row of the window and
//   storing float4s.
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
    __shared__ Taps taps;

    const int tid = threadIdx.x;
    stage_taps(a, taps);

    const int M = a.n * a.mh * a.mw;
    const int sc = a.sc;
    const int ncols = a.ncols;
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const KSplit ks = k_split(a, BK);
    const int kb = ks.kb, ke = ks.ke, ntiles = ks.slices;

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
                const int iy = a_y + taps.dy[at];
                const int ix = a_x + taps.dx[at];
                if ((unsigned)iy < (unsigned)a.sh && (unsigned)ix < (unsigned)a.sw)
                    v = *reinterpret_cast<const float4*>(a_base + ((long long)iy * a.sw + ix) * sc + aci);
            }
            ra[0] = v.x; ra[1] = v.y; ra[2] = v.z; ra[3] = v.w;
            aci += BK;
            if (aci >= sc) { aci -= sc; ++at; }

            const int kr = k0 + b_k;
            float4 u = make_float4(0.f, 0.f, 0.f, 0.f);
            if (kr < ke && b_col < ncols)
                u = *reinterpret_cast<const float4*>(weights(a) + (long long)(taps.w[bt] * sc + bci) * ncols + b_col);
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
                    const int iy = a_y + taps.dy[t];
                    const int ix = a_x + taps.dx[t];
                    if ((unsigned)iy < (unsigned)a.sh && (unsigned)ix < (unsigned)a.sw)
                        v = a_base[((long long)iy * a.sw + ix) * sc + ci];
                }
                ra[j] = v;
            }
            const int kr = k0 + b_k;
            long long row = -1;
            if (kr < ke) {
                const int t = kr / sc;
                row = (long long)taps.w[t] * sc + (kr - t * sc);
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
extern "C" __global__ void __launch_bounds__(256, 2) conv_gemm_vec(const ConvArgs a) {
    gemm_body<true>(a);
}

// Same launch shape as conv_gemm_vec; any sizes and alignments.
extern "C" __global__ void __launch_bounds__(256, 2) conv_gemm_any(const ConvArgs a) {
    gemm_body<false>(a);
}

// Sums the split-K partials in split order and applies the epilogue. Grid-stride over M * ncols.
// COPY (conv_splitk_reduce_copy, INVDIFF_REDUCE_HALF_COPIES): each output also rounded to 16
// bits of `kind` (pack_half1) at a.copy16[pixel * ncols + col], the copy a conversion launch
// would have made for the tensor-core launches that read it, and y only where not null; a
// kernel of its own, so that conv_splitk_reduce stays as it was.
template <bool COPY> DEVI void splitk_reduce(const ConvArgs& a, int splits, int kind) {
    const int M = a.n * a.mh * a.mw;
    const long long total = (long long)M * a.ncols;
    for (long long e = grid_start(); e < total; e += grid_stride()) {
        const int m = (int)(e / a.ncols);
        const int col = (int)(e - (long long)m * a.ncols);
        float s = 0.f;
        for (int z = 0; z < splits; ++z) s += a.ws[(long long)z * total + e];
        const RowCoord rc = decode_row(a, m);
        const long long pix = out_pixel(a, rc);
        const float v = finish(a, rc.img, pix, col, s);
        if (!COPY || a.y != nullptr) a.y[pix * a.ncols + col] = v;
        if (COPY) a.copy16[pix * a.ncols + col] = pack_half1(v, kind);
    }
}
extern "C" __global__ void conv_splitk_reduce(const ConvArgs a, int splits) {
    splitk_reduce<false>(a, splits, 0);
}
extern "C" __global__ void conv_splitk_reduce_copy(const ConvArgs a, int splits, int kind) {
    splitk_reduce<true>(a, splits, kind);
}

// ---- Direct kernels for the 3-channel image convolutions ----
// Both take launches at in_stride 1 whose taps fit one 3x3 window (conv_common.cuh, Window),
// and compute each output in one thread, in a fixed order: deterministic, and an image's result
// does not depend on the rest of the batch.

namespace nrw {
constexpr int TW = 32;                 // output columns per block, one per lane
constexpr int TH = 16;                 // output rows per block
constexpr int PY = 4;                  // rows per thread: warp w has rows 4 (w % 4) .. + 3
constexpr int CK = 8;                  // source channels per stage: quad h for warps 4h .. 4h + 3
constexpr int STAGES = 3;
constexpr int HH = TH + 2, HW = TW + 2, HP = HH * HW;  // the halo tile, 18 x 34 pixels
}  // namespace nrw

// The dynamic shared memory of conv_narrow_*.
extern __shared__ float4 direct_smem[];

// conv_narrow_<NC>: ncols == NC <= 8. Grid (ceil(mw / 32), ceil(mh / 16), n), 256 threads,
// dynamic shared memory STAGES x (2 x HP float4 of activations + 9 x CK x NC weights).
template <int NC>
DEVI void narrow_body(const ConvArgs& a) {
    using namespace nrw;
    float4* const smem = direct_smem;
    float4* xs = smem;  // [STAGES][quad 2][HP]: 4 channels per halo pixel
    float* wsm = reinterpret_cast<float*>(smem + STAGES * 2 * HP);  // [STAGES][cell 9][CK][NC]
    __shared__ int s_cellw[9];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int rg = (tid >> 5) & 3;
    const int half = tid >> 7;
    const Window win = tap_window(a);
    if (tid < 9) s_cellw[tid] = cell_weights(a, win, tid);

    const int img = blockIdx.z;
    const int my0 = blockIdx.y * TH;
    const int mx0 = blockIdx.x * TW;
    const int sc = a.sc;
    const int sh = a.sh, sw = a.sw;
    const int iy0 = my0 + win.dy0;
    const int ix0 = mx0 + win.dx0;
    const float* xb = a.x + (long long)img * sh * sw * sc;
    const bool vec = (sc & 3) == 0 && (reinterpret_cast<uintptr_t>(a.x) & 15) == 0;
    const int nchunks = (sc + CK - 1) / CK;
    __syncthreads();

    // Chunk `chunk` (channels CK * chunk ..) of the halo and of the weights into stage `st`;
    // zeros outside the image, past sc and in cells without a tap.
    auto load = [&](int chunk, int st) {
        const int c0 = chunk * CK;
        float4* xst = xs + st * 2 * HP;
        if (vec) {
            // Two threads per pixel, one 16-byte quad each (sc % 4 == 0: a quad is all in or out).
            for (int u = tid; u < 2 * HP; u += 256) {
                const int p = u >> 1;
                const int q = u & 1;
                const int hy = p / HW;
                const int iy = iy0 + hy;
                const int ix = ix0 + p - hy * HW;
                const int c = c0 + 4 * q;
                const bool ok = (unsigned)iy < (unsigned)sh && (unsigned)ix < (unsigned)sw && c < sc;
                const float* src = ok ? xb + ((long long)iy * sw + ix) * sc + c : a.x;
                cp_async16(smem_addr(xst + q * HP + p), src, ok);
            }
        } else {
            for (int u = tid; u < CK * HP; u += 256) {
                const int p = u / CK;
                const int c = u - p * CK;
                const int hy = p / HW;
                const int iy = iy0 + hy;
                const int ix = ix0 + p - hy * HW;
                const bool ok = (unsigned)iy < (unsigned)sh && (unsigned)ix < (unsigned)sw && c0 + c < sc;
                const float* src = ok ? xb + ((long long)iy * sw + ix) * sc + c0 + c : a.x;
                cp_async4(smem_addr(reinterpret_cast<float*>(xst + (c >> 2) * HP + p) + (c & 3)), src, ok);
            }
        }
        float* wst = wsm + st * 9 * CK * NC;
        for (int e = tid; e < 9 * CK * NC; e += 256) {
            const int cell = e / (CK * NC);
            const int rem = e - cell * (CK * NC);
            const int c = rem / NC;
            const int j = rem - c * NC;
            const int wrow = s_cellw[cell];
            const bool ok = wrow >= 0 && c0 + c < sc;
            const float* src = ok ? weights(a) + ((long long)wrow * sc + c0 + c) * NC + j : weights(a);
            cp_async4(smem_addr(wst + e), src, ok);
        }
    };

    float acc[PY][NC];
#pragma unroll
    for (int i = 0; i < PY; ++i)
#pragma unroll
        for (int j = 0; j < NC; ++j) acc[i][j] = 0.f;

    // One commit group per chunk, empty ones included, so that wait<STAGES - 2> at chunk k
    // always means "chunk k has landed".
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < nchunks) load(st, st);
        cp_async_commit();
    }
    for (int k = 0; k < nchunks; ++k) {
        cp_async_wait<STAGES - 2>();
        // Chunk k is visible to all, and every warp is done with chunk k - 1, whose stage the
        // next load overwrites.
        __syncthreads();
        if (k + STAGES - 1 < nchunks) load(k + STAGES - 1, (k + STAGES - 1) % STAGES);
        cp_async_commit();
        const int st = k % STAGES;
        // This thread's column of halo pixels (lane + dx, rows 4 rg ..) in its quad's plane:
        // consecutive lanes read consecutive 16-byte words, conflict-free.
        const float4* xq = xs + (st * 2 + half) * HP + rg * PY * HW + lane;
        // Weights of (cell, quad): 4 x NC floats, the same address across the warp (a broadcast).
        const float4* wq = reinterpret_cast<const float4*>(wsm + st * 9 * CK * NC + half * 4 * NC);
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
            float4 col[PY + 2];
#pragma unroll
            for (int r = 0; r < PY + 2; ++r) col[r] = xq[r * HW + dx];
#pragma unroll
            for (int dy = 0; dy < 3; ++dy) {
                float w[4 * NC];
#pragma unroll
                for (int i = 0; i < NC; ++i) {
                    const float4 t = wq[(dy * 3 + dx) * (CK * NC / 4) + i];
                    w[4 * i] = t.x;
                    w[4 * i + 1] = t.y;
                    w[4 * i + 2] = t.z;
                    w[4 * i + 3] = t.w;
                }
#pragma unroll
                for (int oy = 0; oy < PY; ++oy) {
                    const float4 v = col[oy + dy];
#pragma unroll
                    for (int j = 0; j < NC; ++j) {
                        acc[oy][j] = fmaf(v.x, w[j], acc[oy][j]);
                        acc[oy][j] = fmaf(v.y, w[NC + j], acc[oy][j]);
                        acc[oy][j] = fmaf(v.z, w[2 * NC + j], acc[oy][j]);
                        acc[oy][j] = fmaf(v.w, w[3 * NC + j], acc[oy][j]);
                    }
                }
            }
        }
    }

    // The two channel halves meet in shared memory (the activation stages, now free); warps
    // 0-3 add the other half's sums to theirs and write the outputs.
    cp_async_wait_all();
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);  // [TH][NC][32]
    if (half == 1) {
#pragma unroll
        for (int oy = 0; oy < PY; ++oy)
#pragma unroll
            for (int j = 0; j < NC; ++j) red[((rg * PY + oy) * NC + j) * 32 + lane] = acc[oy][j];
    }
    __syncthreads();
    if (half == 0) {
        const int mx = mx0 + lane;
#pragma unroll
        for (int oy = 0; oy < PY; ++oy) {
            const int my = my0 + rg * PY + oy;
            if (my >= a.mh || mx >= a.mw) continue;
            const long long pix = out_pixel(a, RowCoord{img, my, mx});
#pragma unroll
            for (int j = 0; j < NC; ++j) {
                const float s = acc[oy][j] + red[((rg * PY + oy) * NC + j) * 32 + lane];
                a.y[pix * NC + j] = finish(a, img, pix, j, s);
            }
        }
    }
}

// One direct kernel per channel count N: `prefix` N, 256 threads, running body<N>.
#define DIRECT_KERNEL(prefix, body, N)                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2) prefix##N(const ConvArgs a) {     \
        body<N>(a);                                                                       \
    }
#define NARROW(NC) DIRECT_KERNEL(conv_narrow_, narrow_body, NC)
NARROW(1)
NARROW(2)
NARROW(3)
NARROW(4)
NARROW(5)
NARROW(6)
NARROW(7)
NARROW(8)
#undef NARROW

namespace few {
constexpr int FP = 16;      // output pixels per thread, a run along a row
constexpr int FCOLS = 128;  // output columns per block (blockIdx.y), 4 per thread
constexpr int FQ = FCOLS / 4;
}  // namespace few

// One source row's contribution to a run: the window cells (dy, 0..2) of every channel.
// xr: source pixel ix0 (the run's first pixel + dx0) of the row; wr: the weights of cell
// (dy, 0) for this thread's quad. CHECK: some of the FP + 2 source pixels lie outside the image
// (bit u of `inside` says whether pixel ix0 + u is in); without, every load is unconditional.
template <int SC, bool CHECK>
DEVI void few_in_row(const float* xr, unsigned inside, const float4* wr, float (&acc)[few::FP][4]) {
    using namespace few;
    // Not unrolled: unrolled, the next channel's loads would be hoisted and spill.
#pragma unroll 1
    for (int ci = 0; ci < SC; ++ci) {
        const float* xc = xr + ci;
        float v[FP + 2];
#pragma unroll
        for (int u = 0; u < FP + 2; ++u) v[u] = !CHECK || ((inside >> u) & 1u) ? xc[u * SC] : 0.f;
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
            const float4 w = wr[(dx * SC + ci) * FQ];
#pragma unroll
            for (int p = 0; p < FP; ++p) {
                acc[p][0] = fmaf(v[p + dx], w.x, acc[p][0]);
                acc[p][1] = fmaf(v[p + dx], w.y, acc[p][1]);
                acc[p][2] = fmaf(v[p + dx], w.z, acc[p][2]);
                acc[p][3] = fmaf(v[p + dx], w.w, acc[p][3]);
            }
        }
    }
}

// conv_few_in_<SC>: sc == SC <= 8, any ncols. Grid (blocks, ceil(ncols / 128)), 256 threads;
// the block's 128 columns of the weights in shared memory, [cell 9][SC][128]. Thread
// (run, quad) computes a run of FP pixels along a row x 4 columns, each weight (one float4 per
// thread and (cell, channel)) serving FP pixels and each activation 12 products; with 32 quads
// (ncols >= 128) a warp is one run, so its activation loads are one address across the warp.
// Grid-stride over runs, 256 / quads runs per block at a time.
template <int SC>
DEVI void few_in_body(const ConvArgs& a) {
    using namespace few;
    __shared__ float4 ws[9 * SC * FQ];
    __shared__ int s_cellw[9];
    const int tid = threadIdx.x;
    const Window win = tap_window(a);
    if (tid < 9) s_cellw[tid] = cell_weights(a, win, tid);
    __syncthreads();

    const int ncols = a.ncols;
    const int col0 = blockIdx.y * FCOLS;
    float* wsf = reinterpret_cast<float*>(ws);
    // Every weight this thread stages is loaded before the first is stored: a loop storing
    // each as it came issued one load, waited for it, stored it and went on, fourteen memory
    // round trips (SC = 3) before the block's first product.
    constexpr int WPER = (9 * SC * FCOLS + 255) / 256;
    float wv[WPER];
#pragma unroll
    for (int i = 0; i < WPER; ++i) {
        const int e = tid + 256 * i;
        const int row = e / FCOLS;  // cell * SC + channel
        const int c = col0 + (e - row * FCOLS);
        // Only the last round can pass the end: testing every round (ptxas cannot know that
        // tid < 256) made it branch around each cell read, and the last load went out after
        // the first stores.
        const bool staged = i < WPER - 1 || e < 9 * SC * FCOLS;
        const int wrow = staged ? s_cellw[row / SC] : -1;
        wv[i] = wrow >= 0 && c < ncols ? weights(a)[((long long)wrow * SC + row % SC) * ncols + c] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < WPER; ++i)
        if (tid + 256 * i < 9 * SC * FCOLS) wsf[tid + 256 * i] = wv[i];
    __syncthreads();

    const int nq = min(FQ, (ncols - col0 + 3) / 4);
    const int quad = tid % nq;
    const int slot = tid / nq;
    const int per_block = 256 / nq;
    if (slot >= per_block) return;
    const int col = col0 + 4 * quad;
    // This thread's biases (0 past ncols and without a bias), read once.
    float bias[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) bias[i] = a.bias != nullptr && col + i < ncols ? a.bias[col + i] : 0.f;
    const bool vec_out = (ncols & 3) == 0 && (reinterpret_cast<uintptr_t>(a.y) & 15) == 0;
    // An epilogue of the bias alone (the network's case), with no per-element tests.
    const bool plain = a.temb == nullptr && a.res == nullptr && a.out_div == 1.0f && !a.accumulate;
    // Runs <= rows < 2^31 (the host checks rows x ncols).
    const int runs_x = (a.mw + FP - 1) / FP;
    const int runs = a.n * a.mh * runs_x;
    const unsigned all = (1u << (FP + 2)) - 1;
    for (int r = blockIdx.x * per_block + slot; r < runs; r += gridDim.x * per_block) {
        const int rr = r / runs_x;
        const int x0 = (r - rr * runs_x) * FP;
        const int img = rr / a.mh;
        const int my = rr - img * a.mh;
        float acc[FP][4];
#pragma unroll
        for (int p = 0; p < FP; ++p)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[p][i] = 0.f;
        const int ix0 = x0 + win.dx0;
        unsigned inside = 0;
#pragma unroll
        for (int u = 0; u < FP + 2; ++u) inside |= ((unsigned)(ix0 + u) < (unsigned)a.sw ? 1u : 0u) << u;
#pragma unroll 1
        for (int dy = 0; dy < 3; ++dy) {
            const int iy = my + win.dy0 + dy;
            if ((unsigned)iy >= (unsigned)a.sh) continue;
            // Only dereferenced at the pixels `inside` names.
            const float* xr = a.x + (((long long)img * a.sh + iy) * a.sw + ix0) * SC;
            const float4* wr = ws + dy * 3 * SC * FQ + quad;
            if (inside == all)
                few_in_row<SC, false>(xr, inside, wr, acc);
            else
                few_in_row<SC, true>(xr, inside, wr, acc);
        }
        const long long pix0 = out_pixel(a, RowCoord{img, my, x0});
#pragma unroll
        for (int p = 0; p < FP; ++p) {
            if (x0 + p >= a.mw) break;
            const long long pix = pix0 + (long long)p * a.out_stride;
            float o[4];
            if (plain) {
                // What finish_with_bias() computes when only the bias may be there.
#pragma unroll
                for (int i = 0; i < 4; ++i) o[i] = a.bias != nullptr ? bias[i] + acc[p][i] : acc[p][i];
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    o[i] = col + i < ncols ? finish_with_bias(a, bias[i], img, pix, col + i, acc[p][i]) : 0.f;
            }
            float* yp = a.y + pix * ncols + col;
            if (vec_out) {
                *reinterpret_cast<float4*>(yp) = make_float4(o[0], o[1], o[2], o[3]);
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    if (col + i < ncols) yp[i] = o[i];
            }
        }
    }
}

#define FEW_IN(SC) DIRECT_KERNEL(conv_few_in_, few_in_body, SC)
FEW_IN(1)
FEW_IN(2)
FEW_IN(3)
FEW_IN(4)
FEW_IN(5)
FEW_IN(6)
FEW_IN(7)
FEW_IN(8)
#undef FEW_IN

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
