// GroupNorm (optionally fused with SiLU) on channels-last activations [n, hw, c], forward and
// backward, with groups of c / groups consecutive channels.
//
// Each direction is three launches:
// 1. partial sums per (image, pixel chunk, channel), in f64 as on the CPU (or, forward, by the
//    step that wrote x, INVDIFF_GN_PRODUCER_SUMS: a convolution's epilogue, a chunk per tile,
//    wg_stats in conv_wgmma.cu; a concatenation, as gn_concat_partial below): grid
//    (chunks, ceil(c / 32), n) of 32x8 blocks; a warp reads 32 consecutive channels of a pixel
//    (128 coalesced bytes) and the 8 warps take every 8th pixel of the chunk. The host picks the
//    chunk count so that even 32 groups of one 256x256 image fill every multiprocessor, which a
//    block per (image, group) could not.
// 2. a finalize, one block of FIN_THREADS per (image, group), that adds the group's chunk x
//    channel partials in a fixed order (each thread a strided share, then a tree in shared
//    memory: deterministic, and parallel, because one thread per group adding hundreds of
//    dependent global loads took 60 us at batch 1), and forms the statistics as the CPU does
//    (mean, var = E[x²] - mean², rstd with eps added in f32), then the per-channel scale and
//    shift of the forward pass;
// 3. an element-wise pass, y = x * scale + shift (one fma, as on the CPU) then SiLU, in fp32
//    or rounded to bf16/fp16 for the tensor-core convolutions it feeds; or the input gradient
//    dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy silu'(z) gamma.
// Statistics are stored as [mean for n*groups | rstd for n*groups] (the backward pass reads
// them from the recorded forward).
//
// The `_ilp` kernels (INVDIFF_GN_ILP) are the backward's partial sums, the element-wise passes
// and the one-pass backward with the loads of several pixels issued before their arithmetic
// (for_units), and the one-pass forward with its channel's scale and shift loaded with its
// pixels; the same results, bit for bit.
//
// The `_x16` kernels (INVDIFF_GN_HALF_INPUT) are the forward's partial sums, 16-bit apply and
// one pass over an x stored in 16 bits (a concatenation written only as the 16-bit copy the
// convolutions read), and (INVDIFF_GN_HALF_INPUT_RECORDING) the backward's partial sums, fp32
// apply and one pass over such an x kept for the backward pass: each value widened exactly, so
// the fp32 kernels' results over the rounded values, for half the bytes of x.
//
// The `_dy16` kernels (INVDIFF_GN_HALF_DY) are the `_ilp` backward kernels over a dy (the
// output gradient) stored in 16 bits, the copy that the convolution's input gradient writing it
// wrote instead of fp32 values: each value widened exactly, so the fp32 kernels' results over
// the rounded gradient, for half its bytes.
//
// The backward's accumulating element passes (and one pass) can add a second gradient `add`
// onto the old dx before their own value (INVDIFF_GN_ADD_RESIDUAL): a residual's gradient,
// which a launch of its own (add_into, resample.cu) would have added just before; (old + add)
// + v, the same bits, a launch and a read and write of dx less. A null `add` adds nothing.
//
// gn_bwd_partial_x16_dy16_pairs (INVDIFF_GN_BWD_SUMS_PAIRS, a candidate) is the backward's
// partial sums over a 16-bit x and dy two channels a thread, 4-byte loads where the `_x16_dy16`
// kernel makes 2-byte ones; the same bits.
//
// gn_concat_partial_pairs_ahead (the default; INVDIFF_CONCAT_SUMS_AHEAD=0 turns it off) is
// gn_concat_partial_pairs with its sums over a side already written eight pixels' loads ahead
// instead of four; the same bits.
//
// The `_split` kernels (INVDIFF_CONCAT_GRAD_SPLIT) are the backward's element-wise pass over a
// concatenation writing the concatenation's two gradients (GradSplit) instead of dx, which the
// concatenation's two adjoint steps (concat_backward in resample.cu) would only have copied
// out of dx: the same values, two launches and a read and write of dx less.
//
// Small groups (the 8x8 to 32x32 levels of celebahq-256, at most ONE_PASS_PIXELS pixels a
// thread) can instead take one launch per direction, `gn_one_pass` / `gn_bwd_one_pass`: a block
// per (image, group) loads its group into registers, sums, forms the same statistics and writes
// the output (the three dependent launches took 11-15 us per GroupNorm of these levels at
// batch 1 on an H200, for 1-8K elements a group). Only the order in which the f64 sums are
// added differs from the three-launch form.
//
// norm_approx.cu compiles this file again with INVDIFF_SILU_APPROX defined: the kernels that
// take a `silu` argument, with the same names and arguments, in a module of their own
// (`norm_approx`), whose SiLU and SiLU derivative take sigmoid_approx (below) instead of the
// accurate exponential and division; the host launches them for bf16/fp16 programs with
// KernelConfig::approx_silu (INVDIFF_APPROX_SILU, a candidate). A module rather than a run-time
// argument, so that this one's code is unchanged: a mode tested per element cost the accurate
// path three instructions an element, and both forms in one kernel spilled.
//
// conv_splitk_reduce_norm (INVDIFF_GN_FROM_REDUCTION) is a split convolution's reduction
// (conv_splitk_reduce) and the one-pass GroupNorm of its output in one launch, a block per
// (image, group): at the 8x8 and 16x16 levels of celebahq-256 at batch 1 a split launch's
// reduction and the GroupNorm after it are two dependent launches of a few microseconds each.
// The block first forms each of its group's outputs as the reduction would (a thread an output
// where the group has at most 1024), then sums them as gn_one_pass's threads would, in the same
// order, so both outputs are those of the two launches, bit for bit.
#include <type_traits>

#include "common.cuh"
#include "conv_common.cuh"

// SiLU and the sigmoid its derivative takes: accurate, or (norm_approx.cu) approximate. In the
// approximate module, ACCURATE_OCCUPANCY keeps the fp32 element passes at the three blocks of
// 256 threads a multiprocessor that the accurate ones have (80 registers): with the shorter
// SiLU, ptxas took 90 for gn_bwd_apply_ilp and gn_bwd_apply_split_ilp, two blocks.
#ifdef INVDIFF_SILU_APPROX
// 1 / (1 + e^-x) with e^-x and the reciprocal on the multifunction unit (ex2.approx, 2 ulp;
// rcp.approx, 1 ulp): 4 instructions where the accurate form is about 20 (expf's range
// reduction, an IEEE division with its slow-path branch). Within about 2^-21 + 1.2 |x| 2^-24
// relative of the accurate sigmoid (x log2 e is rounded before the exponential: 2^-20 at
// |x| = 16), but for a sigmoid below 2^-126 (x in -88.7..-87.3), which the reciprocal flushes
// to 0.
DEVI float sigmoid_approx(float x) {
    float e, r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(e) : "f"(x * -1.44269504f));
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(1.0f + e));
    return r;
}
DEVI float norm_silu(float x) { return x * sigmoid_approx(x); }
DEVI float norm_sigmoid(float x) { return sigmoid_approx(x); }
#define ACCURATE_OCCUPANCY __launch_bounds__(256, 3)
#else
DEVI float norm_silu(float x) { return silu_f(x); }
DEVI float norm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
#define ACCURATE_OCCUPANCY
#endif

// d SiLU / dx = s (1 + x (1 - s)), s = sigmoid(x).
DEVI float silu_grad_f(float x) {
    float s = norm_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

// GroupNorm's element-wise step for four channels: x * scale + shift (one fma, as on the CPU),
// then SiLU.
DEVI void affine4(float4 v, float4 sc, float4 sh, int silu, float (&o)[4]) {
    o[0] = fmaf(v.x, sc.x, sh.x);
    o[1] = fmaf(v.y, sc.y, sh.y);
    o[2] = fmaf(v.z, sc.z, sh.z);
    o[3] = fmaf(v.w, sc.w, sh.w);
    if (silu) {
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = norm_silu(o[j]);
    }
}

// The block's two partial sums per channel (thread (lane, wy) holds warp wy's share of channel
// ch in a and b), added over the 8 warps in a fixed order and stored at
// partial[((img * chunks + chunk) * c + ch) * 2 + {0, 1}] (img = blockIdx.z, chunk = blockIdx.x).
DEVI void store_partials(double a, double b, int ch, int c, double* partial) {
    __shared__ double s1[8][32], s2[8][32];
    const int lane = threadIdx.x, wy = threadIdx.y;
    s1[wy][lane] = a;
    s2[wy][lane] = b;
    __syncthreads();
    if (wy == 0 && ch < c) {
        for (int i = 1; i < 8; ++i) {
            a += s1[i][lane];
            b += s2[i][lane];
        }
        double* out = partial + (((long long)blockIdx.z * gridDim.x + blockIdx.x) * c + ch) * 2;
        out[0] = a;
        out[1] = b;
    }
}

constexpr int FIN_THREADS = 256;

// The sums over channels [ch0, ch0 + cg) of image img of both partial sums, returned to every
// thread of the block (one block per (image, group), FIN_THREADS threads). Item i = chunk * cg
// + channel offset, so neighbouring threads read neighbouring channels of one chunk.
DEVI void group_sums(const double* partial, int img, int ch0, int cg, int c, int chunks, double& s,
                     double& q) {
    __shared__ double s1[FIN_THREADS], s2[FIN_THREADS];
    const int t = threadIdx.x;
    double a = 0.0, b = 0.0;
    for (int i = t; i < chunks * cg; i += FIN_THREADS) {
        const int k = i / cg, j = i - k * cg;
        const double* p = partial + (((long long)img * chunks + k) * c + ch0 + j) * 2;
        a += p[0];
        b += p[1];
    }
    s1[t] = a;
    s2[t] = b;
    __syncthreads();
    for (int half = FIN_THREADS / 2; half > 0; half /= 2) {
        if (t < half) {
            s1[t] += s1[t + half];
            s2[t] += s2[t + half];
        }
        __syncthreads();
    }
    s = s1[0];
    q = s2[0];
}

// Forward partial sums over c channels: partial[((img * chunks + chunk) * c + ch) * 2 + {0, 1}]
// = (sum, sum sq), grid (chunks, ceil(c / 32), n) of 32x8 blocks. column(img, ch) gives the
// thread's channel as a function of the pixel p, which returns the value (and may store it
// elsewhere); each warp adds every 8th pixel of the chunk, in order.
template <typename Column> DEVI void chunk_sums(int hw, int c, int chunk_px, double* partial, Column column) {
    const int lane = threadIdx.x, wy = threadIdx.y;
    const int ch = blockIdx.y * 32 + lane;
    const int img = blockIdx.z;
    const int p0 = blockIdx.x * chunk_px;
    const int p1 = min(hw, p0 + chunk_px);
    double a = 0.0, b = 0.0;
    if (ch < c) {
        auto value = column(img, ch);
#pragma unroll 4
        for (int p = p0 + wy; p < p1; p += 8) {
            const double v = (double)value(p);
            a += v;
            b += v * v;
        }
    }
    store_partials(a, b, ch, c, partial);
}

#ifndef INVDIFF_SILU_APPROX // (kernels without a SiLU: the accurate module's only)
extern "C" __global__ void __launch_bounds__(256) gn_partial(const float* x, int hw, int c, int chunk_px,
                                                           double* partial) {
    chunk_sums(hw, c, chunk_px, partial, [&](int img, int ch) {
        const float* xi = x + (long long)img * hw * c + ch;
        return [=](int p) { return xi[(long long)p * c]; };
    });
}
// gn_partial over an x of 16-bit values (xkind as pack_half1; INVDIFF_GN_HALF_INPUT), each
// widened exactly: the sums gn_partial forms over those values in fp32.
extern "C" __global__ void __launch_bounds__(256) gn_partial_x16(const uint16_t* x, int xkind, int hw, int c,
                                                               int chunk_px, double* partial) {
    chunk_sums(hw, c, chunk_px, partial, [&](int img, int ch) {
        const uint16_t* xi = x + (long long)img * hw * c + ch;
        return [=](int p) { return unpack_half1(xi[(long long)p * c], xkind); };
    });
}

// gn_partial over the concatenation y = [a | b] of two arrays' channels (ca and cb of them),
// which it also writes, with its 16-bit copy where y16 is not null (kind as pack_half1): the
// concatenation (concat_channels in resample.cu) and its GroupNorm's partial sums in one pass
// over the values, the same sums as gn_partial's over y (chunk_sums), so the same bits
// (INVDIFF_GN_PRODUCER_SUMS). With y null, only the 16-bit values, and the sums over them
// widened: gn_partial_x16's over y16 (INVDIFF_GN_HALF_INPUT), which gn_concat_partial_pairs
// below takes wherever the channels pair up.
// The pointers are __restrict__ (the arrays never overlap): without it each pixel's load waits
// for the stores before it, one 4-byte load in flight a thread. For the same reason the two
// outputs are two loops, not a test per pixel, which nvcc would leave between the loads.
extern "C" __global__ void __launch_bounds__(256)
    gn_concat_partial(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                      uint16_t* __restrict__ y16, int kind, int hw, int ca, int cb, int chunk_px,
                      double* __restrict__ partial) {
    const int c = ca + cb;
    // Channel ch's source column of image img, and its place in y (element (img, pixel 0, ch)).
    auto source = [&](int img, int ch) {
        return ch < ca ? a + (long long)img * hw * ca + ch : b + (long long)img * hw * cb + (ch - ca);
    };
    auto width = [&](int ch) { return ch < ca ? ca : cb; };
    auto at = [&](int img, int ch) { return (long long)img * hw * c + ch; };
    if (y == nullptr) {
        chunk_sums(hw, c, chunk_px, partial, [&](int img, int ch) {
            const float* src = source(img, ch);
            const int w = width(ch);
            uint16_t* out16 = y16 + at(img, ch);
            return [=](int p) {
                const uint16_t h = pack_half1(src[(long long)p * w], kind);
                out16[(long long)p * c] = h;
                return unpack_half1(h, kind);
            };
        });
        return;
    }
    chunk_sums(hw, c, chunk_px, partial, [&](int img, int ch) {
        const float* src = source(img, ch);
        const int w = width(ch);
        float* out = y + at(img, ch);
        uint16_t* out16 = y16 ? y16 + at(img, ch) : nullptr;
        return [=](int p) {
            const float v = src[(long long)p * w];
            out[(long long)p * c] = v;
            if (out16) out16[(long long)p * c] = pack_half1(v, kind);
            return v;
        };
    });
}

// gn_concat_partial with y null (16 bits only) two channels a thread, for ca and cb even: a
// warp reads 128 contiguous bytes of a pixel's 16-bit values or 256 of its fp32 ones, where one
// channel a thread read 64 or 128 (the 256x256 level's sums over sides already written moved
// 1.6 TB/s at batch 8 on an H200, stop 27). A null a or b is a side its producers already
// wrote to y16 (INVDIFF_CONCAT_FROM_PRODUCERS), only read back for the sums. Grid (chunks,
// ceil(c / 64), n) of 32x8 blocks. Each channel adds its pixels in chunk_sums' order and its
// warps' sums as store_partials does: gn_concat_partial's bits.
extern "C" __global__ void __launch_bounds__(256)
    gn_concat_partial_pairs(const float* __restrict__ a, const float* __restrict__ b,
                            uint16_t* __restrict__ y16, int kind, int hw, int ca, int cb, int chunk_px,
                            double* __restrict__ partial) {
    const int c = ca + cb;
    const int lane = threadIdx.x, wy = threadIdx.y;
    const int ch = blockIdx.y * 64 + 2 * lane;
    const int img = blockIdx.z;
    const int p0 = blockIdx.x * chunk_px;
    const int p1 = min(hw, p0 + chunk_px);
    const bool first = ch < ca;
    const float* side = first ? a : b;
    const int w = first ? ca : cb;
    const float* src = side == nullptr ? nullptr : side + (long long)img * hw * w + (first ? ch : ch - ca);
    // Two 16-bit values a word: pixel p's pair at word p * c / 2.
    uint32_t* out = reinterpret_cast<uint32_t*>(y16 + (long long)img * hw * c + ch);
    const int words = c / 2;
    double s0 = 0.0, q0 = 0.0, s1 = 0.0, q1 = 0.0;
#pragma unroll 4
    for (int p = ch < c ? p0 + wy : p1; p < p1; p += 8) {
        uint32_t h;
        if (src == nullptr) {
            h = out[(long long)p * words];
        } else {
            const float2 v = *reinterpret_cast<const float2*>(src + (long long)p * w);
            h = pack_half2(v.x, v.y, kind);
            out[(long long)p * words] = h;
        }
        const float2 f = unpack_half2(h, kind);
        const double v0 = (double)f.x, v1 = (double)f.y;
        s0 += v0;
        q0 += v0 * v0;
        s1 += v1;
        q1 += v1 * v1;
    }
    // store_partials per channel: lane l holds channels ch and ch + 1.
    store_partials(s0, q0, ch, c, partial);
    __syncthreads();
    store_partials(s1, q1, ch + 1, c, partial);
}

// gn_concat_partial_pairs with the loop over a side already written (read back for its sums
// alone) on its own, eight pixels' loads issued before their sums (INVDIFF_CONCAT_SUMS_AHEAD):
// in one loop with the copying side nvcc issues four, 128 bytes a warp each, and those sums
// over the 256x256 level's concatenations moved 2.4 TB/s at batch 8 on an H200 (stop 28,
// call 3). The same pixels in the same order, so the same bits; the copying side as before.
// The lane set-up repeats gn_concat_partial_pairs' own: moved into a helper both call, it
// changes the SASS of that kernel, which INVDIFF_CONCAT_SUMS_AHEAD=0 runs for comparisons.
constexpr int CONCAT_SUMS_AHEAD = 8;
extern "C" __global__ void __launch_bounds__(256)
    gn_concat_partial_pairs_ahead(const float* __restrict__ a, const float* __restrict__ b,
                                  uint16_t* __restrict__ y16, int kind, int hw, int ca, int cb,
                                  int chunk_px, double* __restrict__ partial) {
    const int c = ca + cb;
    const int lane = threadIdx.x, wy = threadIdx.y;
    const int ch = blockIdx.y * 64 + 2 * lane;
    const int img = blockIdx.z;
    const int p0 = blockIdx.x * chunk_px;
    const int p1 = min(hw, p0 + chunk_px);
    const bool first = ch < ca;
    const float* side = first ? a : b;
    const int w = first ? ca : cb;
    const float* src = side == nullptr ? nullptr : side + (long long)img * hw * w + (first ? ch : ch - ca);
    uint32_t* out = reinterpret_cast<uint32_t*>(y16 + (long long)img * hw * c + ch);
    const int words = c / 2;
    double s0 = 0.0, q0 = 0.0, s1 = 0.0, q1 = 0.0;
    auto add = [&](uint32_t h) {
        const float2 f = unpack_half2(h, kind);
        const double v0 = (double)f.x, v1 = (double)f.y;
        s0 += v0;
        q0 += v0 * v0;
        s1 += v1;
        q1 += v1 * v1;
    };
    const int start = ch < c ? p0 + wy : p1;
    if (src == nullptr) {
        const uint32_t* in = out;
        int p = start;
        // Whole rounds of eight of this warp's pixels: every load, then the sums in order.
        for (; p + 8 * (CONCAT_SUMS_AHEAD - 1) < p1; p += 8 * CONCAT_SUMS_AHEAD) {
            uint32_t h[CONCAT_SUMS_AHEAD];
#pragma unroll
            for (int u = 0; u < CONCAT_SUMS_AHEAD; ++u) h[u] = in[(long long)(p + 8 * u) * words];
#pragma unroll
            for (int u = 0; u < CONCAT_SUMS_AHEAD; ++u) add(h[u]);
        }
        for (; p < p1; p += 8) add(in[(long long)p * words]);
    } else {
#pragma unroll 4
        for (int p = start; p < p1; p += 8) {
            const float2 v = *reinterpret_cast<const float2*>(src + (long long)p * w);
            const uint32_t h = pack_half2(v.x, v.y, kind);
            out[(long long)p * words] = h;
            add(h);
        }
    }
    store_partials(s0, q0, ch, c, partial);
    __syncthreads();
    store_partials(s1, q1, ch + 1, c, partial);
}
#endif

// A group's mean and 1 / std from its sums over `count` elements, as the CPU forms them
// (var = E[x²] - mean², eps added in f32), written to stats[id] and stats[n * groups + id] by
// thread 0.
struct GroupStats {
    double mean, rstd;
};
DEVI GroupStats group_stats(double s, double q, double count, float eps, float* stats, int n, int groups, int id) {
    const double mean = s / count;
    const double var = fmax(q / count - mean * mean, 0.0);
    const double rstd = 1.0 / sqrt((double)((float)var + eps));
    if (threadIdx.x == 0) {
        stats[id] = (float)mean;
        stats[n * groups + id] = (float)rstd;
    }
    return {mean, rstd};
}

// Channel ch's scale and shift: y = x * scale + shift is (x - mean) rstd gamma + beta.
DEVI void channel_affine(GroupStats st, const float* gamma, const float* beta, int ch, float& scale, float& shift) {
    const double a = st.rstd * (double)gamma[ch];
    scale = (float)a;
    shift = (float)((double)beta[ch] - st.mean * a);
}

#ifndef INVDIFF_SILU_APPROX // (kernels without a SiLU: the accurate module's only)
// Statistics and per-channel affine of the forward pass; one block per (image, group) (blockIdx.x
// = image * groups + group). scale_shift is [n][2][c]: scale then shift per image.
extern "C" __global__ void __launch_bounds__(FIN_THREADS) gn_finalize(const double* partial, int n, int hw, int c,
                                                                   int groups, int chunks, float eps,
                                                                   const float* gamma, const float* beta,
                                                                   float* stats, float* scale_shift) {
    const int id = blockIdx.x;
    const int img = id / groups, g = id - img * groups;
    const int cg = c / groups;
    double s, q;
    group_sums(partial, img, g * cg, cg, c, chunks, s, q);
    const GroupStats st = group_stats(s, q, (double)cg * (double)hw, eps, stats, n, groups, id);
    float* sc = scale_shift + (long long)img * 2 * c;
    for (int ch = g * cg + threadIdx.x; ch < (g + 1) * cg; ch += FIN_THREADS)
        channel_affine(st, gamma, beta, ch, sc[ch], sc[c + ch]);
}
#endif

// The element-wise passes (apply, and the backward's apply) walk one image per blockIdx.y:
// threadIdx.x takes a unit of channels (four, or one where c % 4 != 0) and keeps the unit's
// per-channel constants in registers, threadIdx.y and blockIdx.x stride over the pixels. The
// element loop is then loads, the arithmetic and a store: a flat loop's per-element index
// division (64-bit) cost more than the bytes. setup(u) makes unit u's constants; load(e) reads
// unit element e (of the image-major [n][hw][lanes] array) and finish(k, in, e, q) computes and
// stores it with constants k (q: e's pixel over the batch, e = q * lanes + unit).
//
// P > 1 (the `_ilp` kernels) issues the loads of P of a thread's pixels before the first of
// their arithmetic. SiLU and its gradient divide, and the IEEE division has a slow path, a
// branch nvcc does not move the next pixel's loads across: with P = 1 a thread waits out a
// whole memory latency per pixel (in SASS, one pixel's loads per round). The results are the
// same bits.
template <int P, typename Setup, typename Load, typename Finish>
DEVI void for_units(int hw, int lanes, Setup setup, Load load, Finish finish) {
    const long long first = (long long)blockIdx.y * hw;
    for (int u = threadIdx.x; u < lanes; u += blockDim.x) {
        const auto k = setup(u);
        if constexpr (P == 1) {
            // The plain kernels' loop as it was timed (the same SASS).
            for (int p = blockIdx.x * blockDim.y + threadIdx.y; p < hw; p += gridDim.x * blockDim.y) {
                const long long e = (first + p) * lanes + u;
                finish(k, load(e), e, first + p);
            }
        } else {
            const int stride = gridDim.x * blockDim.y;
            for (int p = blockIdx.x * blockDim.y + threadIdx.y; p < hw; p += P * stride) {
                decltype(load(0LL)) in[P];
#pragma unroll
                for (int j = 0; j < P; ++j)
                    if (p + j * stride < hw) in[j] = load((first + p + j * stride) * lanes + u);
#pragma unroll
                for (int j = 0; j < P; ++j)
                    if (p + j * stride < hw)
                        finish(k, in[j], (first + p + j * stride) * lanes + u, first + p + j * stride);
            }
        }
    }
}

// Unit element e of a float4 array.
DEVI float4 ld_unit4(const float* a, long long e) { return reinterpret_cast<const float4*>(a)[e]; }
// x's unit element e as loaded: a float4, or (X16) four 16-bit values in a uint2, which
// widen4 widens. Apart, so that the `_ilp` loops issue every load before the first widening
// (fp16's conversion would otherwise wait on its load before the next load issues).
template <bool X16> DEVI auto ld_x4(const void* x, long long e) {
    if constexpr (X16)
        return reinterpret_cast<const uint2*>(x)[e];
    else
        return ld_unit4(static_cast<const float*>(x), e);
}
DEVI float4 widen4(float4 v, int) { return v; }
DEVI float4 widen4(uint2 u, int kind) {
    const float2 lo = unpack_half2(u.x, kind), hi = unpack_half2(u.y, kind);
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}
// x's element e as loaded, fp32 or (X16) one 16-bit value of xkind, and widened apart (as
// ld_x4 and widen4 for units), for the `_ilp` loops that issue their loads before any
// widening; ld_x1 does both at once.
template <bool X16> DEVI auto ld_raw1(const void* x, long long e) {
    if constexpr (X16)
        return static_cast<const uint16_t*>(x)[e];
    else
        return static_cast<const float*>(x)[e];
}
DEVI float widen1(float v, int) { return v; }
DEVI float widen1(uint16_t h, int kind) { return unpack_half1(h, kind); }
template <bool X16> DEVI float ld_x1(const void* x, long long e, int xkind) {
    return widen1(ld_raw1<X16>(x, e), xkind);
}

// A unit's four scales and four shifts.
struct Affine4 {
    float4 scale, shift;
};

// y = x * scale + shift (then SiLU), element-wise; grid (pixel blocks, n), see for_units. vec4
// = 1 (units of four channels) needs c % 4 == 0 and 16-byte aligned x, y and scale_shift
// (checked by the host).
template <int P>
DEVI void apply(const float* x, const float* scale_shift, float* y, int hw, int c, int silu, int vec4) {
    const float* ss = scale_shift + (long long)blockIdx.y * 2 * c;
    if (vec4) {
        for_units<P>(
            hw, c / 4, [&](int u) { return Affine4{ld_f4(ss + 4 * u), ld_f4(ss + c + 4 * u)}; },
            [&](long long e) { return ld_unit4(x, e); },
            [&](const Affine4& k, float4 v, long long e, long long) {
                float o[4];
                affine4(v, k.scale, k.shift, silu, o);
                reinterpret_cast<float4*>(y)[e] = make_float4(o[0], o[1], o[2], o[3]);
            });
    } else {
        for_units<P>(
            hw, c, [&](int ch) { return make_float2(ss[ch], ss[c + ch]); }, [&](long long e) { return x[e]; },
            [&](float2 k, float v, long long e, long long) {
                const float z = fmaf(v, k.x, k.y);
                y[e] = silu ? norm_silu(z) : z;
            });
    }
}

// apply with the output in bf16 (kind 1) or fp16 (kind 2), for a GroupNorm that only feeds
// tensor-core convolutions of that precision (kernels/conv_tc.cu, `_hin`): the same fma and
// SiLU, then the rounding those kernels would apply while staging an fp32 input. Units of four
// channels; needs c % 4 == 0, 16-byte aligned x (8-byte with X16) and scale_shift, 8-byte
// aligned y (checked by the host). X16: x holds 16-bit values of xkind (ld_x4).
template <int P, bool X16>
DEVI void apply_half(const void* x, int xkind, const float* scale_shift, uint2* y, int hw, int c, int silu,
                     int kind) {
    const float* ss = scale_shift + (long long)blockIdx.y * 2 * c;
    for_units<P>(
        hw, c / 4, [&](int u) { return Affine4{ld_f4(ss + 4 * u), ld_f4(ss + c + 4 * u)}; },
        [&](long long e) { return ld_x4<X16>(x, e); },
        [&](const Affine4& k, auto in, long long e, long long) {
            float o[4];
            affine4(widen4(in, xkind), k.scale, k.shift, silu, o);
            y[e] = make_uint2(pack_half2(o[0], o[1], kind), pack_half2(o[2], o[3], kind));
        });
}

// Pixels per thread whose loads the `_ilp` element passes issue together.
constexpr int APPLY_ILP = 2;

extern "C" __global__ void gn_apply(const float* x, const float* scale_shift, float* y, int hw, int c, int silu,
                                    int vec4) {
    apply<1>(x, scale_shift, y, hw, c, silu, vec4);
}
extern "C" __global__ void gn_apply_ilp(const float* x, const float* scale_shift, float* y, int hw, int c,
                                        int silu, int vec4) {
    apply<APPLY_ILP>(x, scale_shift, y, hw, c, silu, vec4);
}
extern "C" __global__ void gn_apply_half(const float* x, const float* scale_shift, uint2* y, int hw, int c,
                                         int silu, int kind) {
    apply_half<1, false>(x, 0, scale_shift, y, hw, c, silu, kind);
}
extern "C" __global__ void gn_apply_half_ilp(const float* x, const float* scale_shift, uint2* y, int hw, int c,
                                             int silu, int kind) {
    apply_half<APPLY_ILP, false>(x, 0, scale_shift, y, hw, c, silu, kind);
}
// The same over an x of 16-bit values (INVDIFF_GN_HALF_INPUT).
extern "C" __global__ void gn_apply_half_x16(const uint16_t* x, int xkind, const float* scale_shift, uint2* y,
                                             int hw, int c, int silu, int kind) {
    apply_half<1, true>(x, xkind, scale_shift, y, hw, c, silu, kind);
}
extern "C" __global__ void gn_apply_half_x16_ilp(const uint16_t* x, int xkind, const float* scale_shift, uint2* y,
                                                 int hw, int c, int silu, int kind) {
    apply_half<APPLY_ILP, true>(x, xkind, scale_shift, y, hw, c, silu, kind);
}

// g = d loss / d xhat for one element, and xhat; the CPU's formula.
DEVI void grad_xhat(float xv, float dyv, float mean, float rstd, float gm, float bt, int silu, float& g,
                    float& xhat) {
    xhat = (xv - mean) * rstd;
    g = dyv;
    if (silu) g *= silu_grad_f(fmaf(xhat, gm, bt));
    g *= gm;
}

// Backward partial sums of g and g * xhat, same layout and launch as gn_partial. U > 1 (the
// `_ilp` kernel) loads U of a warp's pixels before their arithmetic (see for_units); the sums
// are added in the same order, so the bits are the same. X16: x holds 16-bit values of xkind;
// DY16: dy, of dykind.
template <int U, bool X16, bool DY16>
DEVI void bwd_partial(const void* x, int xkind, const void* dy, int dykind, const float* stats, const float* gamma,
                      const float* beta, int n, int hw, int c, int groups, int silu, int chunk_px, double* partial) {
    const int lane = threadIdx.x, wy = threadIdx.y;
    const int ch = blockIdx.y * 32 + lane;
    const int img = blockIdx.z;
    const int p0 = blockIdx.x * chunk_px;
    const int p1 = min(hw, p0 + chunk_px);
    double a = 0.0, b = 0.0;
    if (ch < c) {
        const int gi = img * groups + ch / (c / groups);
        const float mean = stats[gi], rstd = stats[n * groups + gi];
        const float gm = gamma[ch], bt = beta[ch];
        // The `_dy16` forms index in 32 bits (the host checks that a GroupNorm's elements fit
        // an i32): with x and dy of different widths, 64-bit indices made the fp32-x form's
        // three pixels spill 8 bytes at 40 registers, 32-bit ones none.
        using Index = typename std::conditional<DY16, int, long long>::type;
        const Index base = (Index)img * hw * c + ch;
#pragma unroll(U == 1 ? 4 : 1)
        for (int p = p0 + wy; p < p1; p += 8 * U) {
            decltype(ld_raw1<X16>(x, 0)) xv[U];
            decltype(ld_raw1<DY16>(dy, 0)) dv[U];
#pragma unroll
            for (int k = 0; k < U; ++k) {
                if (p + 8 * k < p1) {
                    // (Past the last pixel, the index could pass what an i32 holds.)
                    const Index i = base + (Index)(p + 8 * k) * c;
                    xv[k] = ld_raw1<X16>(x, i);
                    dv[k] = ld_raw1<DY16>(dy, i);
                }
            }
#pragma unroll
            for (int k = 0; k < U; ++k) {
                if (p + 8 * k >= p1) break;
                float g, xhat;
                grad_xhat(widen1(xv[k], xkind), widen1(dv[k], dykind), mean, rstd, gm, bt, silu, g, xhat);
                a += (double)g;
                b += (double)(g * xhat);
            }
        }
    }
    store_partials(a, b, ch, c, partial);
}

// Pixels per warp whose loads gn_bwd_partial_ilp issues together: three fit the 32 registers
// of eight blocks a multiprocessor, the wave plan_norm sizes the grid for (four spill, and
// gn_bwd_partial's 40 registers fit six, a quarter of the grid in a second wave).
constexpr int PARTIAL_ILP = 3;

// The arguments after x (and xkind), with a dy of fp32 (DY) or, for the `_dy16` kernels, of
// 16-bit values of dykind.
#define BWD_PARTIAL_ARGS(DY)                                                                               \
    DY, const float *stats, const float *gamma, const float *beta, int n, int hw, int c, int groups, int silu, \
        int chunk_px, double *partial
#define BWD_PARTIAL_PASS stats, gamma, beta, n, hw, c, groups, silu, chunk_px, partial
#define DY_FP32 const float *dy
#define DY_HALF const uint16_t *dy, int dykind
extern "C" __global__ void __launch_bounds__(256) gn_bwd_partial(const float* x, BWD_PARTIAL_ARGS(DY_FP32)) {
    bwd_partial<1, false, false>(x, 0, dy, 0, BWD_PARTIAL_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 8) gn_bwd_partial_ilp(const float* x, BWD_PARTIAL_ARGS(DY_FP32)) {
    bwd_partial<PARTIAL_ILP, false, false>(x, 0, dy, 0, BWD_PARTIAL_PASS);
}
// The same over an x of 16-bit values (INVDIFF_GN_HALF_INPUT_RECORDING). x's addresses no longer
// follow dy's (2 bytes an element against 4), and the `_ilp` form's three pixels then take 40
// registers: at 32 (eight blocks a multiprocessor) they spill 40 bytes, two pixels 24. So six
// blocks a multiprocessor, a part of plan_norm's grid in a second wave, to be timed. The
// `_dy16` forms likewise (over an fp32 x, three pixels spill 40 bytes at 32 registers).
extern "C" __global__ void __launch_bounds__(256)
    gn_bwd_partial_x16(const uint16_t* x, int xkind, BWD_PARTIAL_ARGS(DY_FP32)) {
    bwd_partial<1, true, false>(x, xkind, dy, 0, BWD_PARTIAL_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 6)
    gn_bwd_partial_x16_ilp(const uint16_t* x, int xkind, BWD_PARTIAL_ARGS(DY_FP32)) {
    bwd_partial<PARTIAL_ILP, true, false>(x, xkind, dy, 0, BWD_PARTIAL_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 6)
    gn_bwd_partial_dy16_ilp(const float* x, BWD_PARTIAL_ARGS(DY_HALF)) {
    bwd_partial<PARTIAL_ILP, false, true>(x, 0, dy, dykind, BWD_PARTIAL_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 6)
    gn_bwd_partial_x16_dy16_ilp(const uint16_t* x, int xkind, BWD_PARTIAL_ARGS(DY_HALF)) {
    bwd_partial<PARTIAL_ILP, true, true>(x, xkind, dy, dykind, BWD_PARTIAL_PASS);
}

// gn_bwd_partial_x16_dy16_ilp two channels a thread (INVDIFF_GN_BWD_SUMS_PAIRS), for an even
// c: a warp reads 128 contiguous bytes of a pixel's 16-bit x and as many of its dy, where one
// channel a thread read 64 of each in 2-byte loads (the sums of the 256x256 x 256 passes over
// the up path's concatenations, whose three launches moved 1.6-1.7 TB/s in the v0.10 b1
// profile; the forward's concatenation sums went from 1.6 to 2.4 TB/s so, stop 27). Grid
// (chunks, ceil(c / 64), n) of 32x8 blocks. Each channel (its own group's statistics: with an
// odd group width the two may differ) adds its pixels in bwd_partial's order and its warps' sums
// as store_partials does: the bits of the one-channel kernel.
extern "C" __global__ void __launch_bounds__(256, 5)
    gn_bwd_partial_x16_dy16_pairs(const uint16_t* x, int xkind, BWD_PARTIAL_ARGS(DY_HALF)) {
    const int lane = threadIdx.x, wy = threadIdx.y;
    const int ch = blockIdx.y * 64 + 2 * lane;
    const int img = blockIdx.z;
    const int p0 = blockIdx.x * chunk_px;
    const int p1 = min(hw, p0 + chunk_px);
    double a0 = 0.0, b0 = 0.0, a1 = 0.0, b1 = 0.0;
    if (ch < c) {
        const int cg = c / groups;
        const int g0 = img * groups + ch / cg, g1 = img * groups + (ch + 1) / cg;
        const float mean0 = stats[g0], rstd0 = stats[n * groups + g0];
        const float mean1 = stats[g1], rstd1 = stats[n * groups + g1];
        const float gm0 = gamma[ch], bt0 = beta[ch], gm1 = gamma[ch + 1], bt1 = beta[ch + 1];
        // Pixel p's pair of channels at word p * c / 2 (32-bit indices: the host checks that
        // a GroupNorm's elements fit an i32, as for the `_dy16` forms).
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(x) + (img * hw * c + ch) / 2;
        const uint32_t* dw = reinterpret_cast<const uint32_t*>(dy) + (img * hw * c + ch) / 2;
        const int words = c / 2;
        for (int p = p0 + wy; p < p1; p += 8 * PARTIAL_ILP) {
            uint32_t xv[PARTIAL_ILP], dv[PARTIAL_ILP];
#pragma unroll
            for (int k = 0; k < PARTIAL_ILP; ++k) {
                if (p + 8 * k < p1) {
                    xv[k] = xw[(p + 8 * k) * words];
                    dv[k] = dw[(p + 8 * k) * words];
                }
            }
#pragma unroll
            for (int k = 0; k < PARTIAL_ILP; ++k) {
                if (p + 8 * k >= p1) break;
                const float2 xf = unpack_half2(xv[k], xkind), df = unpack_half2(dv[k], dykind);
                float g, xhat;
                grad_xhat(xf.x, df.x, mean0, rstd0, gm0, bt0, silu, g, xhat);
                a0 += (double)g;
                b0 += (double)(g * xhat);
                grad_xhat(xf.y, df.y, mean1, rstd1, gm1, bt1, silu, g, xhat);
                a1 += (double)g;
                b1 += (double)(g * xhat);
            }
        }
    }
    // store_partials per channel: lane l holds channels ch and ch + 1.
    store_partials(a0, b0, ch, c, partial);
    __syncthreads();
    store_partials(a1, b1, ch + 1, c, partial);
}

#ifndef INVDIFF_SILU_APPROX // (kernels without a SiLU: the accurate module's only)
// Group means of g and g * xhat: means[id] and means[n * groups + id]; one block per (image,
// group), as gn_finalize.
extern "C" __global__ void __launch_bounds__(FIN_THREADS) gn_bwd_finalize(const double* partial, int n, int hw,
                                                                       int c, int groups, int chunks,
                                                                       float* means) {
    const int id = blockIdx.x;
    const int img = id / groups, g = id - img * groups;
    const int cg = c / groups;
    double s, q;
    group_sums(partial, img, g * cg, cg, c, chunks, s, q);
    if (threadIdx.x == 0) {
        const double count = (double)cg * (double)hw;
        means[id] = (float)(s / count);
        means[n * groups + id] = (float)(q / count);
    }
}
#endif

// One channel's constants for the input gradient of image blockIdx.y (n = gridDim.y images):
// its group's mean and rstd, its scale and shift, and the group means of g and g * xhat.
struct BwdChannel {
    float mean, rstd, gm, bt, mg, mgx;
};
DEVI BwdChannel bwd_channel(const float* stats, const float* means, const float* gamma, const float* beta,
                            int groups, int cg, int ch) {
    const int n = gridDim.y;
    const int gi = blockIdx.y * groups + ch / cg;
    return {stats[gi], stats[n * groups + gi], gamma[ch], beta[ch], means[gi], means[n * groups + gi]};
}
struct BwdUnit {
    BwdChannel ch[4];
};
DEVI BwdUnit bwd_unit(const float* stats, const float* means, const float* gamma, const float* beta, int groups,
                      int cg, int u) {
    BwdUnit k;
#pragma unroll
    for (int j = 0; j < 4; ++j) k.ch[j] = bwd_channel(stats, means, gamma, beta, groups, cg, 4 * u + j);
    return k;
}

// rstd (g - mean(g) - xhat mean(g xhat)) for one element; the CPU's formula.
DEVI float bwd_from(float g, float xhat, float rstd, float mg, float mgx) { return rstd * (g - mg - xhat * mgx); }
DEVI float bwd_value(float xv, float dyv, const BwdChannel& k, int silu) {
    float g, xhat;
    grad_xhat(xv, dyv, k.mean, k.rstd, k.gm, k.bt, silu, g, xhat);
    return bwd_from(g, xhat, k.rstd, k.mg, k.mgx);
}

// The four values of a unit element from its x and dy.
DEVI void bwd_values4(float4 xv, float4 dv, const BwdUnit& k, int silu, float (&v)[4]) {
    v[0] = bwd_value(xv.x, dv.x, k.ch[0], silu);
    v[1] = bwd_value(xv.y, dv.y, k.ch[1], silu);
    v[2] = bwd_value(xv.z, dv.z, k.ch[2], silu);
    v[3] = bwd_value(xv.w, dv.w, k.ch[3], silu);
}

// What the backward's element pass reads of a unit element: x and dy (units as ld_x4 loads
// them, single elements widened) and, when it accumulates with P > 1, the old dx and the
// element of `add` (P = 1 reads those after the arithmetic, as the timed kernel did).
template <typename X, typename DY, typename T> struct BwdIn {
    X x;
    DY dy;
    T old, add;
};

// The two sides of a concatenation's gradient, written by the GroupNorm backward pass over the
// concatenation instead of its full dx (the `_split` kernels, INVDIFF_CONCAT_GRAD_SPLIT): pixel
// q's first ca channels of the new dx go to a[q][ca], the other cb to b[q][cb], each also in 16
// bits of kind16 where a16 / b16 is not null, as concat_backward (resample.cu) would have copied
// and rounded them from dx, which nothing else reads. Units of four: ca and cb multiples of 4,
// 16-byte aligned a and b, 8-byte aligned a16 and b16 (checked by the host).
struct GradSplit {
    float* a;
    uint2* a16;
    float* b;
    uint2* b16;
    int ca, cb;
};
DEVI void split_store(const GradSplit& sp, long long q, int u, const float (&v)[4], int kind16) {
    const int ua = sp.ca / 4;
    const bool first = u < ua;
    const long long i = first ? q * ua + u : q * (sp.cb / 4) + (u - ua);
    float* d = first ? sp.a : sp.b;
    uint2* d16 = first ? sp.a16 : sp.b16;
    reinterpret_cast<float4*>(d)[i] = make_float4(v[0], v[1], v[2], v[3]);
    if (d16) d16[i] = make_uint2(pack_half2(v[0], v[1], kind16), pack_half2(v[2], v[3], kind16));
}

// A unit's constants and its place among the pixel's units.
struct BwdUnitAt {
    BwdUnit k;
    int u;
};

// dx (+)= rstd (g - mean(g) - xhat mean(g xhat)), element-wise, accumulating onto dx + add
// where add is not null (16-byte aligned for vec4); grid (pixel blocks, n), see
// for_units (P pixels a round); vec4 as gn_apply (c % 4 == 0, 16-byte aligned x, dy and dx).
// Where dx16 is not null (8-byte aligned for vec4), also the new dx in bf16 (kind16 1) or fp16
// (2), rounded as a conversion launch would round it: the last contribution to a gradient that
// tensor-core convolutions read. X16: x holds 16-bit values of xkind, in units of four only
// (the host passes vec4 = 1, 8-byte aligned x). DY16: dy holds 16-bit values of dykind (8-byte
// aligned for vec4). SPLIT (units of four): the new dx goes to the two sides of `sp` instead
// (dx is only read, where accumulating; dx16 unused).
template <int P, bool X16, bool DY16, bool SPLIT>
DEVI void bwd_apply(const void* x, int xkind, const void* dy, int dykind, const float* stats, const float* means,
                    const float* gamma, const float* beta, float* dx, const float* add, uint2* dx16, int kind16,
                    int hw, int c, int groups, int silu, int accumulate, int vec4, GradSplit sp) {
    const int cg = c / groups;
    // P > 1 loads what it adds onto with the rest (P = 1 after the arithmetic, as timed).
    const bool ahead = P > 1 && accumulate;
    if (X16 || SPLIT || vec4) {
        using In = BwdIn<decltype(ld_x4<X16>(x, 0)), decltype(ld_x4<DY16>(dy, 0)), float4>;
        for_units<P>(
            hw, c / 4, [&](int u) { return BwdUnitAt{bwd_unit(stats, means, gamma, beta, groups, cg, u), u}; },
            [&](long long e) {
                return In{ld_x4<X16>(x, e), ld_x4<DY16>(dy, e), ahead ? ld_unit4(dx, e) : float4{},
                          ahead && add ? ld_unit4(add, e) : float4{}};
            },
            [&](const BwdUnitAt& k, const In& in, long long e, long long q) {
                float v[4];
                bwd_values4(widen4(in.x, xkind), widen4(in.dy, dykind), k.k, silu, v);
                if (accumulate) {
                    float4 o = P > 1 ? in.old : ld_unit4(dx, e);
                    if (add) {
                        const float4 a = P > 1 ? in.add : ld_unit4(add, e);
                        o = make_float4(o.x + a.x, o.y + a.y, o.z + a.z, o.w + a.w);
                    }
                    v[0] += o.x;
                    v[1] += o.y;
                    v[2] += o.z;
                    v[3] += o.w;
                }
                if constexpr (SPLIT) {
                    split_store(sp, q, k.u, v, kind16);
                } else {
                    reinterpret_cast<float4*>(dx)[e] = make_float4(v[0], v[1], v[2], v[3]);
                    if (dx16)
                        dx16[e] = make_uint2(pack_half2(v[0], v[1], kind16), pack_half2(v[2], v[3], kind16));
                }
            });
    } else {
        for_units<P>(
            hw, c, [&](int ch) { return bwd_channel(stats, means, gamma, beta, groups, cg, ch); },
            [&](long long e) {
                return BwdIn<float, float, float>{ld_x1<X16>(x, e, xkind), ld_x1<DY16>(dy, e, dykind),
                                                  ahead ? dx[e] : 0.0f, ahead && add ? add[e] : 0.0f};
            },
            [&](const BwdChannel& k, const BwdIn<float, float, float>& in, long long e, long long) {
                const float v = bwd_value(in.x, in.dy, k, silu);
                float old = 0.0f;
                if (accumulate) {
                    old = P > 1 ? in.old : dx[e];
                    if (add) old += P > 1 ? in.add : add[e];
                }
                const float out = accumulate ? old + v : v;
                dx[e] = out;
                if (dx16) reinterpret_cast<uint16_t*>(dx16)[e] = pack_half1(out, kind16);
            });
    }
}

// bwd_apply (overwriting) into bf16 (kind 1) or fp16 (kind 2), for an input gradient whose
// only reader is a tensor-core convolution's input gradient (which would round it the same
// way while staging it). Units of four channels: c % 4 == 0, 16-byte aligned x and dy, 8-byte
// aligned dx (and dy, DY16: 16-bit values of dykind).
template <int P, bool DY16>
DEVI void bwd_apply_half(const float* x, const void* dy, int dykind, const float* stats, const float* means,
                         const float* gamma, const float* beta, uint2* dx, int hw, int c, int groups, int silu,
                         int kind) {
    const int cg = c / groups;
    using In = BwdIn<float4, decltype(ld_x4<DY16>(dy, 0)), float4>;
    for_units<P>(
        hw, c / 4, [&](int u) { return bwd_unit(stats, means, gamma, beta, groups, cg, u); },
        [&](long long e) { return In{ld_unit4(x, e), ld_x4<DY16>(dy, e), float4{}, float4{}}; },
        [&](const BwdUnit& k, const In& in, long long e, long long) {
            float v[4];
            bwd_values4(in.x, widen4(in.dy, dykind), k, silu, v);
            dx[e] = make_uint2(pack_half2(v[0], v[1], kind), pack_half2(v[2], v[3], kind));
        });
}

// The element pass's arguments after x (and xkind), with dy as DY_FP32 or DY_HALF give it.
#define BWD_APPLY_ARGS(DY)                                                                                           \
    DY, const float *stats, const float *means, const float *gamma, const float *beta, float *dx,              \
        const float *add, uint2 *dx16, int kind16, int hw, int c, int groups, int silu, int accumulate, int vec4
#define BWD_APPLY_PASS stats, means, gamma, beta, dx, add, dx16, kind16, hw, c, groups, silu, accumulate, vec4
extern "C" __global__ void gn_bwd_apply(const float* x, BWD_APPLY_ARGS(DY_FP32)) {
    bwd_apply<1, false, false, false>(x, 0, dy, 0, BWD_APPLY_PASS, {});
}
extern "C" __global__ void ACCURATE_OCCUPANCY gn_bwd_apply_ilp(const float* x, BWD_APPLY_ARGS(DY_FP32)) {
    bwd_apply<APPLY_ILP, false, false, false>(x, 0, dy, 0, BWD_APPLY_PASS, {});
}
// The same over an x of 16-bit values (INVDIFF_GN_HALF_INPUT_RECORDING): x and xkind first.
extern "C" __global__ void gn_bwd_apply_x16(const uint16_t* x, int xkind, BWD_APPLY_ARGS(DY_FP32)) {
    bwd_apply<1, true, false, false>(x, xkind, dy, 0, BWD_APPLY_PASS, {});
}
extern "C" __global__ void gn_bwd_apply_x16_ilp(const uint16_t* x, int xkind, BWD_APPLY_ARGS(DY_FP32)) {
    bwd_apply<APPLY_ILP, true, false, false>(x, xkind, dy, 0, BWD_APPLY_PASS, {});
}
// The split forms (SPLIT): the arguments of gn_bwd_apply / gn_bwd_apply_x16 (dx read only,
// dx16 unused), then the two sides.
extern "C" __global__ void gn_bwd_apply_split(const float* x, BWD_APPLY_ARGS(DY_FP32), const GradSplit sp) {
    bwd_apply<1, false, false, true>(x, 0, dy, 0, BWD_APPLY_PASS, sp);
}
extern "C" __global__ void ACCURATE_OCCUPANCY gn_bwd_apply_split_ilp(const float* x, BWD_APPLY_ARGS(DY_FP32),
                                                                     const GradSplit sp) {
    bwd_apply<APPLY_ILP, false, false, true>(x, 0, dy, 0, BWD_APPLY_PASS, sp);
}
extern "C" __global__ void gn_bwd_apply_x16_split(const uint16_t* x, int xkind, BWD_APPLY_ARGS(DY_FP32),
                                                  const GradSplit sp) {
    bwd_apply<1, true, false, true>(x, xkind, dy, 0, BWD_APPLY_PASS, sp);
}
extern "C" __global__ void gn_bwd_apply_x16_split_ilp(const uint16_t* x, int xkind, BWD_APPLY_ARGS(DY_FP32),
                                                      const GradSplit sp) {
    bwd_apply<APPLY_ILP, true, false, true>(x, xkind, dy, 0, BWD_APPLY_PASS, sp);
}
// The `_dy16` forms of the four `_ilp` ones.
extern "C" __global__ void gn_bwd_apply_dy16_ilp(const float* x, BWD_APPLY_ARGS(DY_HALF)) {
    bwd_apply<APPLY_ILP, false, true, false>(x, 0, dy, dykind, BWD_APPLY_PASS, {});
}
extern "C" __global__ void gn_bwd_apply_x16_dy16_ilp(const uint16_t* x, int xkind, BWD_APPLY_ARGS(DY_HALF)) {
    bwd_apply<APPLY_ILP, true, true, false>(x, xkind, dy, dykind, BWD_APPLY_PASS, {});
}
extern "C" __global__ void gn_bwd_apply_split_dy16_ilp(const float* x, BWD_APPLY_ARGS(DY_HALF), const GradSplit sp) {
    bwd_apply<APPLY_ILP, false, true, true>(x, 0, dy, dykind, BWD_APPLY_PASS, sp);
}
extern "C" __global__ void gn_bwd_apply_x16_split_dy16_ilp(const uint16_t* x, int xkind, BWD_APPLY_ARGS(DY_HALF),
                                                           const GradSplit sp) {
    bwd_apply<APPLY_ILP, true, true, true>(x, xkind, dy, dykind, BWD_APPLY_PASS, sp);
}
#define BWD_APPLY_HALF_ARGS(DY)                                                                                \
    const float *x, DY, const float *stats, const float *means, const float *gamma, const float *beta, uint2 *dx, \
        int hw, int c, int groups, int silu, int kind
#define BWD_APPLY_HALF_PASS stats, means, gamma, beta, dx, hw, c, groups, silu, kind
extern "C" __global__ void gn_bwd_apply_half(BWD_APPLY_HALF_ARGS(DY_FP32)) {
    bwd_apply_half<1, false>(x, dy, 0, BWD_APPLY_HALF_PASS);
}
extern "C" __global__ void gn_bwd_apply_half_ilp(BWD_APPLY_HALF_ARGS(DY_FP32)) {
    bwd_apply_half<APPLY_ILP, false>(x, dy, 0, BWD_APPLY_HALF_PASS);
}
extern "C" __global__ void gn_bwd_apply_half_dy16_ilp(BWD_APPLY_HALF_ARGS(DY_HALF)) {
    bwd_apply_half<APPLY_ILP, true>(x, dy, dykind, BWD_APPLY_HALF_PASS);
}

// ---- One pass for small groups ----

constexpr int ONE_PASS_PIXELS = 8;

// a and b summed over the block (blockDim.x a multiple of 32, at most 1024), returned to every
// thread: within each warp, then over the warps' sums, every warp adding them in the same order.
DEVI void block_sum2(double& a, double& b) {
    __shared__ double sa[32], sb[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        sa[warp] = a;
        sb[warp] = b;
    }
    __syncthreads();
    const bool have = lane < (int)(blockDim.x / 32);
    a = have ? sa[lane] : 0.0;
    b = have ? sb[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
}

// Where a one-pass block's thread works: group g of image img (blockIdx.x = img * groups + g),
// channel ch (the thread's place within its pixel row of cg threads), pixel rows row, row +
// rows, ... (rows = blockDim.x / cg; threads past the last whole row only join the sums).
struct OnePass {
    int id, ch, row, rows;
    long long base; // element (img, pixel 0, ch)
    DEVI OnePass(int hw, int c, int groups) {
        id = blockIdx.x;
        const int img = id / groups, g = id - img * groups, cg = c / groups;
        const int j = threadIdx.x % cg;
        ch = g * cg + j;
        row = threadIdx.x / cg;
        rows = blockDim.x / cg;
        base = (long long)img * hw * c + ch;
    }
    // The element of the thread's k-th pixel, or -1 past the group's pixels.
    DEVI long long at(int k, int hw, int c) const {
        const int p = row + k * rows;
        return row < rows && p < hw ? base + (long long)p * c : -1;
    }
};

// One value of an output that is fp32 (kind 0) or bf16/fp16 (kind 1/2, pack_half1).
DEVI void store_kind(void* y, long long e, float v, int kind) {
    if (kind == 0)
        static_cast<float*>(y)[e] = v;
    else
        static_cast<uint16_t*>(y)[e] = pack_half1(v, kind);
}

// The whole forward GroupNorm of one small group: gn_partial + gn_finalize + gn_apply(_half),
// with the same statistics, affine and element formula; y in fp32 or 16 bits (kind as
// store_kind). Block size from the host (one_pass_threads): each thread at most
// ONE_PASS_PIXELS pixels. X16: x holds 16-bit values of xkind (ld_x1).
template <bool AHEAD, bool X16>
DEVI void one_pass(const void* x, int xkind, const float* gamma, const float* beta, void* y, float* stats, int n,
                   int hw, int c, int groups, float eps, int silu, int kind) {
    const OnePass t(hw, c, groups);
    // AHEAD (gn_one_pass_ilp): the channel's scale and shift loaded with the pixels, not after
    // the block's sums, where they cost a memory round trip of their own.
    float gm = 0.0f, bt = 0.0f;
    if (AHEAD) {
        gm = gamma[t.ch];
        bt = beta[t.ch];
    }
    float v[ONE_PASS_PIXELS];
    double a = 0.0, b = 0.0;
#pragma unroll
    for (int k = 0; k < ONE_PASS_PIXELS; ++k) {
        const long long e = t.at(k, hw, c);
        v[k] = e >= 0 ? ld_x1<X16>(x, e, xkind) : 0.0f;
        a += (double)v[k];
        b += (double)v[k] * (double)v[k];
    }
    block_sum2(a, b);
    const GroupStats st = group_stats(a, b, (double)(c / groups) * (double)hw, eps, stats, n, groups, t.id);
    float scale, shift;
    if (AHEAD)
        channel_affine(st, &gm, &bt, 0, scale, shift);
    else
        channel_affine(st, gamma, beta, t.ch, scale, shift);
#pragma unroll
    for (int k = 0; k < ONE_PASS_PIXELS; ++k) {
        const long long e = t.at(k, hw, c);
        if (e < 0) continue;
        const float z = fmaf(v[k], scale, shift);
        store_kind(y, e, silu ? norm_silu(z) : z, kind);
    }
}

// What conv_splitk_reduce_norm's GroupNorm needs besides the convolution: its affine, its
// output (kind as store_kind), its statistics, and the one-pass block it stands for.
struct ReduceNormArgs {
    const float* gamma;
    const float* beta;
    void* y;
    float* stats;
    int groups, silu, kind, one_pass_threads;
    float eps;
    int pad;
};
static_assert(sizeof(ReduceNormArgs) == 56, "ReduceNormArgs must match src/cuda/kernels/norm.rs");

// Most outputs of a group a reduction-and-norm block holds (REDUCTION_NORM_OUTPUTS in
// src/cuda/kernels/norm.rs): four a thread at 1024, each formed after the last, a memory round
// trip apiece, so larger groups are left to the two launches.
constexpr int REDUCE_NORM_MAX = 4096;

// Output e (row m, column col) of split launch `a` as conv_splitk_reduce forms it: the partials
// added from 0 in split order, then finish_with_bias()'s arithmetic on the epilogue's reads. A
// round's loads go out together, those past the last split reading it again and not added
// (predicated loads let ptxas start the adds early). In SASS a thread's second to fourth
// outputs issue all their loads before the first add; its first puts the epilogue's bias +
// temb add before the partials' loads, which then wait for the epilogue's reads, a second
// round trip (reading the epilogue's values after the partials, or peeling the first round,
// made ptxas interleave more). The same adds
// in the same order. An output's loads are all a thread can overlap (the stores between
// outputs keep the next output's loads behind them), which is what stop 29's
// INVDIFF_SPLITK_AHEAD, the reduction alone, gained little from; here the gain is the
// GroupNorm's launch.
template <int AHEAD>
DEVI float reduced_output(const ConvArgs& a, int splits, int total, int m, int col) {
    const int e = m * a.ncols + col;
    const RowCoord rc = decode_row(a, m);
    const long long pix = out_pixel(a, rc);
    const float bias = a.bias != nullptr ? a.bias[col] : 0.0f;
    const float temb = a.temb != nullptr ? a.temb[(long long)rc.img * a.ncols + col] : 0.0f;
    const float res = a.res != nullptr ? a.res[pix * a.ncols + col] : 0.0f;
    float s = 0.f;
    for (int z = 0; z < splits; z += AHEAD) {
        float part[AHEAD];
#pragma unroll
        for (int i = 0; i < AHEAD; ++i) part[i] = a.ws[min(z + i, splits - 1) * total + e];
        // Without the barrier (a NOP in SASS) ptxas kept 32 registers by putting adds between
        // the loads.
        __syncwarp();
#pragma unroll
        for (int i = 0; i < AHEAD; ++i)
            if (z + i < splits) s += part[i];
    }
    // finish_with_bias() on the values read above, in its order. (Its arithmetic is not shared
    // through a helper both call: written so, with the reads ahead of it, every convolution
    // kernel's SASS changed.)
    float v = s;
    if (a.bias != nullptr || a.temb != nullptr || a.res != nullptr) {
        float e2 = bias;
        if (a.temb != nullptr) e2 += temb;
        if (a.res != nullptr) e2 += res;
        v = e2 + s;
    }
    return v / a.out_div;
}

// The reduction of split launch `a` (the whole workspace, not accumulating, output pixel = row)
// and the one-pass GroupNorm of its output, grid n * groups, blockDim.x threads (a multiple of
// 32, at least g.one_pass_threads, at most 1024). Output i of the group (pixel i / cg, channel
// i % cg of the group) belongs to thread i % blockDim.x. a.y may be null (the program reads only
// the GroupNorm's output); then only the GroupNorm's outputs are written.
extern "C" __global__ void __launch_bounds__(1024)
    conv_splitk_reduce_norm(const ConvArgs a, int splits, const ReduceNormArgs g) {
    __shared__ float vals[REDUCE_NORM_MAX];
    const int hw = a.mh * a.mw, c = a.ncols, cg = c / g.groups;
    const int id = blockIdx.x, img = id / g.groups, ch0 = (id - img * g.groups) * cg;
    const int total = a.n * hw * c, outputs = cg * hw;
    constexpr int PER = REDUCE_NORM_MAX / 1024;
    // (The host sizes the block for the group; a launch that does not fit writes nothing.)
    if (outputs > REDUCE_NORM_MAX || outputs > PER * (int)blockDim.x || (int)blockDim.x < g.one_pass_threads ||
        blockDim.x % 32 != 0)
        return;
#pragma unroll
    for (int r = 0; r < PER; ++r) {
        // The whole warp forms an output (reduced_output's __syncwarp): a thread past the last
        // forms the first again and keeps nothing.
        if (r * (int)blockDim.x >= outputs) break;
        const int i = threadIdx.x + r * blockDim.x;
        const bool mine = i < outputs;
        const int at = mine ? i : 0;
        const int p = at / cg, col = ch0 + at - p * cg;
        const int m = img * hw + p;
        // Rounds of 24: one at the 8x8 level's 24 splits and the 16x16 level's 12-18, two at
        // 29-30. 32 a round spilled 200 bytes at the 64 registers of 1024 threads. The loads
        // past the last split repeat it and hit L1.
        const float v = reduced_output<24>(a, splits, total, m, col);
        if (mine) {
            if (a.y != nullptr) a.y[(long long)m * c + col] = v;
            vals[i] = v;
        }
    }
    __syncthreads();
    // gn_one_pass's sums: its thread t (t < one_pass_threads) adds channel t % cg of pixel rows
    // t / cg, + rows, ... in that order, and block_sum2 adds the threads' sums; the threads past
    // them add nothing, as gn_one_pass's warps past its block would not exist (their zeros are
    // the zeros block_sum2 gives absent warps).
    double sa = 0.0, sb = 0.0;
    if ((int)threadIdx.x < g.one_pass_threads) {
        const int j = threadIdx.x % cg, row = threadIdx.x / cg, rows = g.one_pass_threads / cg;
#pragma unroll
        for (int k = 0; k < ONE_PASS_PIXELS; ++k) {
            const int p = row + k * rows;
            const float x = row < rows && p < hw ? vals[p * cg + j] : 0.0f;
            sa += (double)x;
            sb += (double)x * (double)x;
        }
    }
    block_sum2(sa, sb);
    const int n = a.n;
    const GroupStats st = group_stats(sa, sb, (double)cg * (double)hw, g.eps, g.stats, n, g.groups, id);
#pragma unroll
    for (int r = 0; r < PER; ++r) {
        const int i = threadIdx.x + r * blockDim.x;
        if (i >= outputs) break;
        const int p = i / cg, col = ch0 + i - p * cg;
        float scale, shift;
        channel_affine(st, g.gamma, g.beta, col, scale, shift);
        const float z = fmaf(vals[i], scale, shift);
        store_kind(g.y, (long long)(img * hw + p) * c + col, g.silu ? norm_silu(z) : z, g.kind);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    gn_one_pass(const float* x, const float* gamma, const float* beta, void* y, float* stats, int n, int hw, int c,
                int groups, float eps, int silu, int kind) {
    one_pass<false, false>(x, 0, gamma, beta, y, stats, n, hw, c, groups, eps, silu, kind);
}
extern "C" __global__ void __launch_bounds__(1024)
    gn_one_pass_ilp(const float* x, const float* gamma, const float* beta, void* y, float* stats, int n, int hw,
                    int c, int groups, float eps, int silu, int kind) {
    one_pass<true, false>(x, 0, gamma, beta, y, stats, n, hw, c, groups, eps, silu, kind);
}
// The same over an x of 16-bit values (INVDIFF_GN_HALF_INPUT).
extern "C" __global__ void __launch_bounds__(1024)
    gn_one_pass_x16(const uint16_t* x, int xkind, const float* gamma, const float* beta, void* y, float* stats, int n,
                    int hw, int c, int groups, float eps, int silu, int kind) {
    one_pass<false, true>(x, xkind, gamma, beta, y, stats, n, hw, c, groups, eps, silu, kind);
}
extern "C" __global__ void __launch_bounds__(1024)
    gn_one_pass_x16_ilp(const uint16_t* x, int xkind, const float* gamma, const float* beta, void* y, float* stats,
                        int n, int hw, int c, int groups, float eps, int silu, int kind) {
    one_pass<true, true>(x, xkind, gamma, beta, y, stats, n, hw, c, groups, eps, silu, kind);
}

// The whole input gradient of one small group: gn_bwd_partial + gn_bwd_finalize +
// gn_bwd_apply(_half), the same formulas; dx (+)= in fp32 (onto dx + add where add is not
// null), or = in 16 bits (kind 1/2); with an fp32 dx and dx16 not null, also the new dx in 16
// bits (kind16), as bwd_apply's dx16. AHEAD (gn_bwd_one_pass_ilp) loads all of a thread's
// pixels, and the old dx it adds onto, before the first of their arithmetic (see for_units;
// `add` after, with the stores): the same bits. X16: x holds 16-bit
// values of xkind, widened as they are loaded (kept raw until their arithmetic, they would
// make the `_ilp` form spill 8 bytes at its 64 registers); DY16: dy, of dykind, likewise (over
// an fp32 x the `_ilp` form still spills 8 bytes).
template <bool AHEAD, bool X16, bool DY16>
DEVI void bwd_one_pass(const void* x, int xkind, const void* dy, int dykind, const float* stats, const float* gamma,
                       const float* beta, void* dx, const float* add, uint16_t* dx16, int kind16, int n, int hw,
                       int c, int groups, int silu, int accumulate, int kind) {
    const OnePass t(hw, c, groups);
    const float mean = stats[t.id], rstd = stats[n * groups + t.id];
    const float gm = gamma[t.ch], bt = beta[t.ch];
    float xv[ONE_PASS_PIXELS], dv[ONE_PASS_PIXELS], old[ONE_PASS_PIXELS];
    if (AHEAD) {
#pragma unroll
        for (int k = 0; k < ONE_PASS_PIXELS; ++k) {
            const long long e = t.at(k, hw, c);
            if (e < 0) continue;
            xv[k] = ld_x1<X16>(x, e, xkind);
            dv[k] = ld_x1<DY16>(dy, e, dykind);
            old[k] = kind == 0 && accumulate ? static_cast<float*>(dx)[e] : 0.0f;
        }
    }
    float g[ONE_PASS_PIXELS], xhat[ONE_PASS_PIXELS];
    double a = 0.0, b = 0.0;
#pragma unroll
    for (int k = 0; k < ONE_PASS_PIXELS; ++k) {
        const long long e = t.at(k, hw, c);
        g[k] = xhat[k] = 0.0f;
        if (e < 0) continue;
        const float xk = AHEAD ? xv[k] : ld_x1<X16>(x, e, xkind);
        grad_xhat(xk, AHEAD ? dv[k] : ld_x1<DY16>(dy, e, dykind), mean, rstd, gm, bt, silu, g[k], xhat[k]);
        a += (double)g[k];
        b += (double)(g[k] * xhat[k]);
    }
    block_sum2(a, b);
    const double count = (double)(c / groups) * (double)hw;
    const float mg = (float)(a / count), mgx = (float)(b / count);
#pragma unroll
    for (int k = 0; k < ONE_PASS_PIXELS; ++k) {
        const long long e = t.at(k, hw, c);
        if (e < 0) continue;
        const float v = bwd_from(g[k], xhat[k], rstd, mg, mgx);
        if (kind == 0) {
            float o = 0.0f;
            if (accumulate) {
                o = AHEAD ? old[k] : static_cast<float*>(dx)[e];
                if (add) o += add[e];
            }
            const float out = accumulate ? o + v : v;
            static_cast<float*>(dx)[e] = out;
            if (dx16) dx16[e] = pack_half1(out, kind16);
        } else {
            store_kind(dx, e, v, kind);
        }
    }
}

#define BWD_ONE_PASS_ARGS(DY)                                                                                 \
    DY, const float *stats, const float *gamma, const float *beta, void *dx, const float *add, uint16_t *dx16,   \
        int kind16, int n, int hw, int c, int groups, int silu, int accumulate, int kind
#define BWD_ONE_PASS_PASS stats, gamma, beta, dx, add, dx16, kind16, n, hw, c, groups, silu, accumulate, kind
extern "C" __global__ void __launch_bounds__(1024) gn_bwd_one_pass(const float* x, BWD_ONE_PASS_ARGS(DY_FP32)) {
    bwd_one_pass<false, false, false>(x, 0, dy, 0, BWD_ONE_PASS_PASS);
}
extern "C" __global__ void __launch_bounds__(1024) gn_bwd_one_pass_ilp(const float* x, BWD_ONE_PASS_ARGS(DY_FP32)) {
    bwd_one_pass<true, false, false>(x, 0, dy, 0, BWD_ONE_PASS_PASS);
}
// The same over an x of 16-bit values (INVDIFF_GN_HALF_INPUT_RECORDING), and the `_dy16` forms.
extern "C" __global__ void __launch_bounds__(1024)
    gn_bwd_one_pass_x16(const uint16_t* x, int xkind, BWD_ONE_PASS_ARGS(DY_FP32)) {
    bwd_one_pass<false, true, false>(x, xkind, dy, 0, BWD_ONE_PASS_PASS);
}
extern "C" __global__ void __launch_bounds__(1024)
    gn_bwd_one_pass_x16_ilp(const uint16_t* x, int xkind, BWD_ONE_PASS_ARGS(DY_FP32)) {
    bwd_one_pass<true, true, false>(x, xkind, dy, 0, BWD_ONE_PASS_PASS);
}
extern "C" __global__ void __launch_bounds__(1024)
    gn_bwd_one_pass_dy16_ilp(const float* x, BWD_ONE_PASS_ARGS(DY_HALF)) {
    bwd_one_pass<true, false, true>(x, 0, dy, dykind, BWD_ONE_PASS_PASS);
}
extern "C" __global__ void __launch_bounds__(1024)
    gn_bwd_one_pass_x16_dy16_ilp(const uint16_t* x, int xkind, BWD_ONE_PASS_ARGS(DY_HALF)) {
    bwd_one_pass<true, true, true>(x, xkind, dy, dykind, BWD_ONE_PASS_PASS);
}
