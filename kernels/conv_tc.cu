// Convolutions on tensor cores (mma.sync): the implicit GEMM of conv.cu, with the products in
// tf32, bf16 or fp16 and everything else (accumulation, epilogue, split-K partials, the output)
// in fp32. The activations read are fp32, or (the `_hin` kernels) already bf16/fp16 in memory:
// a GroupNorm whose output only feeds convolutions writes it in the products' precision, with
// the same rounding these kernels apply while staging fp32, so both variants compute the same.
//
// The problem is conv.cu's ConvArgs, field for field (same rows, taps, parity classes, epilogue
// and split-K workspace, so conv.cu's conv_splitk_reduce finishes split launches); only `w`
// changes type: bf16/fp16 weights converted once at upload (tc_convert), in the same
// [(tap, channel), column] layouts, or the fp32 weights themselves for tf32.
//
// Tiles. A 128x128 output tile per block of 256 threads (8 warps as 2 along M x 4 along N, each
// warp 64x32 = 4 m16 x 4 n8 mma tiles, 64 fp32 accumulators per thread). The K slice per stage
// is 64 bytes of a row: 32 bf16/fp16 (two m16n8k16 steps) or 16 tf32 (two m16n8k8 steps).
// (4 warps of 64x64, 128 accumulators per thread, ran 1.4-2.6x slower on every launch of the
// network on an H200, and were removed.)
//
// Pipelines (Pipe). TWO, the first version: two shared-memory stages. While the warps multiply
// stage t, the loads of slice t+1 are in flight: the weights (and, for tf32, the activations,
// which need no conversion) by cp.async straight into the other stage; for bf16/fp16 the
// activations by 16-byte global loads into registers, converted and stored into the other stage
// after the multiply, because the fp32 -> half conversion needs the data in registers. The
// global loads' latency is then hidden only behind one slice's products. The deeper pipelines
// keep every load asynchronous, several slices in flight, one barrier per slice:
// - ASYNC (tf32, and the `_hin` kernels whose activations are already bf16/fp16 in memory):
//   ASYNC_STAGES stages, cp.async straight into each;
// - STAGED (fp32 activations into bf16/fp16 products): STAGED_STAGES stages whose A part is an
//   fp32 staging area; once slice t has landed, each thread converts the chunks it copied
//   itself (so no barrier is needed in between) into one of two 16-bit A tiles, which the
//   multiply reads. All variants round and accumulate identically: only the schedule differs.
//
// Loaders: each thread moves two chunks of A and two 16-byte chunks of B per slice. A chunk is
// KC = 8 (half) or 4 (tf32) consecutive channels of one pixel and tap (16 bytes, or 32 of fp32
// on their way to bf16/fp16), so sc % 8 == 0 keeps it inside one tap (the host checks it, and
// ncols % 8 == 0, and 16-byte aligned pointers); rows outside the image, k past the split and
// columns past ncols are zero-filled.
//
// Shared memory (bytes): A stage [128 rows][64 + 16 pad], B stage [32 rows][256 + 16 pad]
// (half) or [16 rows][512 + 32 pad] (tf32): 18,944 per stage. The pads make every ldmatrix
// phase (8 rows of 16 bytes) and every tf32 B read hit 32 distinct banks: A rows are 20 words
// apart, half B rows 68 (4 mod 32: eight 4-bank rows), tf32 B rows 136 (8 mod 32: lane (g, q)
// reads bank 8q + g). STAGED's fp32 staging rows are 128 bytes unpadded: only the thread that
// copied a chunk reads it back (two-way bank conflicts on those four reads per slice, which a
// pad would remove at 6 KB of shared memory).
//
// Fragments (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"; g = lane / 4, q = lane % 4):
// - A, both types: ldmatrix.x4 of the 16x32-byte block at (m-tile rows, k-step); lanes 0-15 name
//   rows 0-15 at byte 0, lanes 16-31 rows 0-15 at byte 16. Registers: rows g / g + 8, bytes 0-15
//   / 16-31, which is a0..a3 of m16n8k16 (two halves per register) and of m16n8k8 tf32 (one
//   fp32 per register: an 8x8 b16 matrix is an 8x4 fp32 one, lane -> (g, q)), then rounded by
//   cvt.rna.tf32.
// - B, half: ldmatrix.x4.trans over [k][n] rows; matrices (k 0-7, n 0-7), (k 8-15, n 0-7),
//   (k 0-7, n 8-15), (k 8-15, n 8-15) give b0, b1 of two n8 tiles (k = 2q, 2q+1 (+8), n = g).
// - B, tf32: ldmatrix cannot transpose 32-bit elements, so two scalar reads, (k = q, n = g) and
//   (k = q + 4, n = g).
// - C: c0, c1 at (row g, cols 2q, 2q+1), c2, c3 at row g + 8; the epilogue stores them as float2.
#include <type_traits>

#include "conv_common.cuh"

enum TcType { TF32 = 0, BF16 = 1, FP16 = 2 };

constexpr int TBM = 128;
constexpr int TBN = 128;
constexpr int THREADS = 256;
constexpr int A_PITCH = 64 + 16;
constexpr int A_STAGE = TBM * A_PITCH;
constexpr int B_STAGE = 32 * (256 + 16);
constexpr int STAGE = A_STAGE + B_STAGE;
// The pipelines (see the header): TWO, two stages, the activations staged through registers
// for bf16/fp16; ASYNC, every load a cp.async straight into its stage, ASYNC_STAGES stages (tf32,
// and 16-bit activations); STAGED, fp32 activations for bf16/fp16 by cp.async into an fp32
// staging area, STAGED_STAGES stages, each thread converting its own chunks into one of two
// 16-bit A tiles. On sm_90 two 256-thread blocks per multiprocessor fit either way (2 x 74 /
// 93.5 KB); both fit the 99 KB a block may have on sm_86/89.
// src/cuda/kernels/conv.rs passes ASYNC_SMEM and STAGED_SMEM as dynamic shared memory.
enum Pipe { TWO = 0, ASYNC = 1, STAGED = 2 };
constexpr int ASYNC_STAGES = 4;
constexpr int ASYNC_SMEM = ASYNC_STAGES * STAGE;
static_assert(ASYNC_SMEM == 75776, "ASYNC_SMEM must match TC_ASYNC_SMEM in src/cuda/kernels/conv.rs");
constexpr int STAGED_STAGES = 3;
constexpr int STG_PITCH = 128;  // bytes per staged fp32 row (32 channels)
constexpr int STG_A = TBM * STG_PITCH;
constexpr int STG_STAGE = STG_A + B_STAGE;
constexpr int STAGED_SMEM = STAGED_STAGES * STG_STAGE + 2 * A_STAGE;
static_assert(STAGED_SMEM == 95744, "STAGED_SMEM must match TC_STAGED_SMEM in src/cuda/kernels/conv.rs");

template <int T> struct Tc {
    static constexpr int ESZ = T == TF32 ? 4 : 2;  // bytes per element in shared memory
    static constexpr int BK = 64 / ESZ;             // K slice
    static constexpr int KC = 16 / ESZ;             // elements per 16-byte chunk
    static constexpr int BPITCH = T == TF32 ? 512 + 32 : 256 + 16;  // bytes per B row
    static constexpr int B_CPR = TBN / KC;          // chunks per B row
};
static_assert(Tc<TF32>::BK * Tc<TF32>::BPITCH <= B_STAGE, "tf32 B stage fits");
static_assert(Tc<BF16>::BK * Tc<BF16>::BPITCH <= B_STAGE, "half B stage fits");

// Two fp32 to one register of two halves (common.cuh), the first in the low half.
template <int T> DEVI uint32_t pack2(float lo, float hi) {
    return T == BF16 ? pack_bf16x2(lo, hi) : pack_f16x2(lo, hi);
}

DEVI uint32_t to_tf32(uint32_t bits) { return tf32_of(__uint_as_float(bits)); }

DEVI void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

DEVI void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Not volatile: a pure function of its operands, which leaves the compiler free to interleave
// the products with the fragment loads.
template <int T> DEVI void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (T == TF32) {
        mma_tf32(d, a, b0, b1);
    } else if constexpr (T == BF16) {
        mma_bf16(d, a, b0, b1);
    } else {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// The activations' element type in memory: fp32, or 16-bit floats already in the product's
// precision (AH, half-precision products only).
template <bool AH> struct AElem { using type = float; };
template <> struct AElem<true> { using type = uint16_t; };

DEVI float4 ld_shared_f4(uint32_t addr) {
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr));
    return v;
}

// One block's tile with pipeline P (see Pipe); AH: the activations are 16-bit in memory (ASYNC
// with bf16/fp16 only); ROWS: each row's four column pairs finished at once (finish_row, as
// conv_wgmma.cu's ROWS) rather than pair by pair. `smem` holds the stages: static for TWO,
// dynamic otherwise.
template <int T, int P, bool AH, bool ROWS = false>
DEVI void tc_body(const ConvArgs& a, unsigned char* smem) {
    static_assert(!AH || (T != TF32 && P == ASYNC), "16-bit activations: ASYNC, half products");
    static_assert(P != STAGED || T != TF32, "tf32 needs no conversion to stage");
    using C = Tc<T>;
    using AT = typename AElem<AH>::type;
    constexpr int BK = C::BK;
    constexpr int KC = C::KC;
    __shared__ Taps taps;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    stage_taps(a, taps);

    const int M = a.n * a.mh * a.mw;
    const int sc = a.sc;
    const int ncols = a.ncols;
    const int m0 = blockIdx.x * TBM;
    const int n0 = blockIdx.y * TBN;
    const KSplit ks = k_split(a, BK);
    const int kb = ks.kb, ke = ks.ke, ntiles = ks.slices;

    // A loader: rows a_row and a_row + 64, chunk a_kc of the 64-byte row (the same k for both,
    // so one (tap, channel) cursor serves them).
    const int a_row = tid >> 2;
    const int a_kc = tid & 3;
    bool a_ok[2];
    int a_y[2], a_x[2];
    const AT* const xa = reinterpret_cast<const AT*>(a.x);
    const AT* a_base[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int m = m0 + a_row + 64 * j;
        a_ok[j] = m < M;
        a_y[j] = a_x[j] = 0;
        a_base[j] = xa;
        if (a_ok[j]) {
            const RowCoord r = decode_row(a, m);
            a_y[j] = r.my * a.in_stride;
            a_x[j] = r.mx * a.in_stride;
            a_base[j] = xa + (long long)r.img * a.sh * a.sw * sc;
        }
    }
    // B loader: rows b_row and b_row + 256 / B_CPR of the slice, chunk b_nc of the row.
    constexpr int B_ROW_STEP = THREADS / C::B_CPR;
    const int b_row = tid / C::B_CPR;
    const int b_nc = tid % C::B_CPR;
    const int b_col = n0 + b_nc * KC;
    const bool b_col_ok = b_col < ncols;
    const unsigned char* wbytes = reinterpret_cast<const unsigned char*>(a.w);

    // (tap, channel) of the next k each loader reads, advanced by BK per slice.
    int at, aci, bt[2], bci[2];
    {
        int k = kb + a_kc * KC;
        at = k / sc;
        aci = k - at * sc;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            k = kb + b_row + j * B_ROW_STEP;
            bt[j] = k / sc;
            bci[j] = k - bt[j] * sc;
        }
    }
    __syncthreads();

    const uint32_t s_base = smem_addr(smem);
    // Where slice buffer `buf` keeps its A tile (fp32 staging area for STAGED) and its B tile.
    auto a_stage = [&](int buf) -> uint32_t {
        return P == STAGED ? s_base + buf * STG_STAGE : s_base + buf * STAGE;
    };
    auto b_stage = [&](int buf) -> uint32_t {
        return P == STAGED ? s_base + buf * STG_STAGE + STG_A : s_base + buf * STAGE + A_STAGE;
    };
    // STAGED: the two 16-bit A tiles the multiply reads, after the staging stages.
    auto a_tile = [&](int i) -> uint32_t { return s_base + STAGED_STAGES * STG_STAGE + i * A_STAGE; };
    float4 ra[2][2];  // fp32 activations on their way to a 16-bit A tile (TWO, STAGED)

    auto load_a = [&](int k0, int buf) {
        const int k = k0 + a_kc * KC;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const AT* src = xa;
            bool ok = false;
            if (a_ok[j] && k < ke) {
                const int iy = a_y[j] + taps.dy[at];
                const int ix = a_x[j] + taps.dx[at];
                if ((unsigned)iy < (unsigned)a.sh && (unsigned)ix < (unsigned)a.sw) {
                    src = a_base[j] + ((long long)iy * a.sw + ix) * sc + aci;
                    ok = true;
                }
            }
            if constexpr (P == STAGED) {
                const uint32_t dst = a_stage(buf) + (a_row + 64 * j) * STG_PITCH + a_kc * 32;
                cp_async16(dst, src, ok);
                cp_async16(dst + 16, src + 4, ok);
            } else if constexpr (T == TF32 || AH) {
                cp_async16(a_stage(buf) + (a_row + 64 * j) * A_PITCH + a_kc * 16, src, ok);
            } else {
                const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
                ra[j][0] = ok ? *reinterpret_cast<const float4*>(src) : z;
                ra[j][1] = ok ? *reinterpret_cast<const float4*>(src + 4) : z;
            }
        }
        aci += BK;
        while (aci >= sc) {
            aci -= sc;
            ++at;
        }
    };
    // ra, converted, into the 16-bit A tile at `tile`.
    auto store_a = [&](uint32_t tile) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const uint32_t p0 = pack2<T>(ra[j][0].x, ra[j][0].y);
            const uint32_t p1 = pack2<T>(ra[j][0].z, ra[j][0].w);
            const uint32_t p2 = pack2<T>(ra[j][1].x, ra[j][1].y);
            const uint32_t p3 = pack2<T>(ra[j][1].z, ra[j][1].w);
            st_shared_v4(tile + (a_row + 64 * j) * A_PITCH + a_kc * 16, p0, p1, p2, p3);
        }
    };
    // STAGED: this thread's own chunks of staging buffer `buf` back into ra (its own cp.async
    // copies, visible to it after the wait).
    auto unstage_a = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const uint32_t src = a_stage(buf) + (a_row + 64 * j) * STG_PITCH + a_kc * 32;
            ra[j][0] = ld_shared_f4(src);
            ra[j][1] = ld_shared_f4(src + 16);
        }
    };
    auto load_b = [&](int k0, int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int row = b_row + j * B_ROW_STEP;
            const bool ok = b_col_ok && k0 + row < ke;
            const void* src = a.w;
            if (ok) src = wbytes + ((long long)(taps.w[bt[j]] * sc + bci[j]) * ncols + b_col) * C::ESZ;
            cp_async16(b_stage(buf) + row * C::BPITCH + b_nc * 16, src, ok);
            bci[j] += BK;
            while (bci[j] >= sc) {
                bci[j] -= sc;
                ++bt[j];
            }
        }
    };

    const int g = lane >> 2;
    const int q = lane & 3;
    const int wm = (warp >> 2) * 64;
    const int wn = (warp & 3) * 32;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // The products of one slice: A tile at sa, B tile at sb (shared-memory addresses).
    auto compute = [&](uint32_t sa, uint32_t sb) {
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            uint32_t bf[4][2];
            if constexpr (T == TF32) {
                const float* bs = reinterpret_cast<const float*>(smem + (sb - s_base));
                constexpr int BW = C::BPITCH / 4;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = wn + j * 8 + g;
                    bf[j][0] = to_tf32(__float_as_uint(bs[(ks * 8 + q) * BW + col]));
                    bf[j][1] = to_tf32(__float_as_uint(bs[(ks * 8 + q + 4) * BW + col]));
                }
            } else {
#pragma unroll
                for (int p = 0; p < 2; ++p) {
                    uint32_t r[4];
                    const int krow = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int col = wn + p * 16 + (lane >> 4) * 8;
                    ldmatrix_x4_trans(sb + krow * C::BPITCH + col * 2, r);
                    bf[2 * p][0] = r[0];
                    bf[2 * p][1] = r[1];
                    bf[2 * p + 1][0] = r[2];
                    bf[2 * p + 1][1] = r[3];
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                uint32_t af[4];
                ldmatrix_x4(sa + (wm + i * 16 + (lane & 15)) * A_PITCH + ks * 32 + (lane >> 4) * 16, af);
                if constexpr (T == TF32) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) af[e] = to_tf32(af[e]);
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) mma<T>(acc[i][j], af, bf[j][0], bf[j][1]);
            }
        }
    };

    if constexpr (P == ASYNC || P == STAGED) {
        // S - 1 slices in flight while one is multiplied. Slice t lives in stage t % S; one
        // group is committed per slice (empty past the end) so that "all but S - 2 groups
        // done" always means "slice t landed". The barrier after the wait also tells every warp
        // that slice t - 1's stage, which this iteration refills, is no longer being read.
        // STAGED: before the barrier each thread converts its own staged chunks of slice t into
        // A tile t % 2, whose last reader, the multiply of slice t - 2, every warp finished
        // before the previous iteration's barrier.
        constexpr int S = P == ASYNC ? ASYNC_STAGES : STAGED_STAGES;
#pragma unroll
        for (int s = 0; s < S - 1; ++s) {
            if (s < ntiles) {
                load_a(kb + s * BK, s);
                load_b(kb + s * BK, s);
            }
            cp_async_commit();
        }
        for (int t = 0; t < ntiles; ++t) {
            cp_async_wait<S - 2>();
            if constexpr (P == STAGED) {
                unstage_a(t % S);
                store_a(a_tile(t & 1));
            }
            __syncthreads();
            const int nt = t + S - 1;
            if (nt < ntiles) {
                load_a(kb + nt * BK, nt % S);
                load_b(kb + nt * BK, nt % S);
            }
            cp_async_commit();
            compute(P == STAGED ? a_tile(t & 1) : a_stage(t % S), b_stage(t % S));
        }
        cp_async_wait_all();
    } else {
        if (ntiles > 0) {
            load_a(kb, 0);
            load_b(kb, 0);
            cp_async_commit();
            if constexpr (T != TF32) store_a(a_stage(0));
        }
        cp_async_wait_all();
        __syncthreads();
        for (int t = 0; t < ntiles; ++t) {
            const int cur = t & 1;
            const bool next = t + 1 < ntiles;
            if (next) {
                load_a(kb + (t + 1) * BK, cur ^ 1);
                load_b(kb + (t + 1) * BK, cur ^ 1);
                cp_async_commit();
            }
            compute(a_stage(cur), b_stage(cur));
            if constexpr (T != TF32) {
                if (next) store_a(a_stage(cur ^ 1));
            }
            cp_async_wait_all();
            __syncthreads();
        }
    }

    const bool split = gridDim.z > 1;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + wm + i * 16 + h * 8 + g;
            if (m >= M) continue;
            const RowCoord rc = decode_row(a, m);
            const long long pix = out_pixel(a, rc);
            if (ROWS && !split) {
                float2 v[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) v[j] = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
                finish_row<4>(a, rc.img, pix, n0 + wn + 2 * q, v);
                continue;
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = n0 + wn + j * 8 + 2 * q;
                if (col >= ncols) continue;
                store_pair(a, split, M, m, rc, pix, col, make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]));
            }
        }
    }
}

// Grid (ceil(M / 128), ceil(ncols / 128), splits), 256 threads. Needs sc % 8 == 0,
// ncols % 8 == 0 and 16-byte aligned x, w, y, res and ws.
//
// Two stages, 37.9 KB of static shared memory:
#define TC_KERNEL(name, T)                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const ConvArgs a) { \
        __shared__ __align__(128) unsigned char smem[2 * STAGE];                 \
        tc_body<T, TWO, false>(a, smem);                                         \
    }
TC_KERNEL(conv_tc_tf32, TF32)
TC_KERNEL(conv_tc_bf16, BF16)
TC_KERNEL(conv_tc_fp16, FP16)

// Deeper pipelines in dynamic shared memory (ASYNC_SMEM or STAGED_SMEM bytes, which the host
// allows once per kernel, above the 48 KB default): tf32 and 16-bit activations (`_hin`:
// `ConvArgs::x` points to bf16/fp16 values) with ASYNC, fp32 activations into bf16/fp16
// products with STAGED.
#define TC_DEEP_KERNEL(name, T, P, AH, ROWS)                                    \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const ConvArgs a) { \
        extern __shared__ __align__(128) unsigned char dsmem[];                  \
        tc_body<T, P, AH, ROWS>(a, dsmem);                                       \
    }
TC_DEEP_KERNEL(conv_tc_tf32_async, TF32, ASYNC, false, false)
TC_DEEP_KERNEL(conv_tc_bf16_hin, BF16, ASYNC, true, false)
TC_DEEP_KERNEL(conv_tc_fp16_hin, FP16, ASYNC, true, false)
TC_DEEP_KERNEL(conv_tc_bf16_staged, BF16, STAGED, false, false)
TC_DEEP_KERNEL(conv_tc_fp16_staged, FP16, STAGED, false, false)
// The same with the row epilogue (ROWS), the default since the H200 run of v0.5.
TC_DEEP_KERNEL(conv_tc_tf32_async_rows, TF32, ASYNC, false, true)
TC_DEEP_KERNEL(conv_tc_bf16_hin_rows, BF16, ASYNC, true, true)
TC_DEEP_KERNEL(conv_tc_fp16_hin_rows, FP16, ASYNC, true, true)
TC_DEEP_KERNEL(conv_tc_bf16_staged_rows, BF16, STAGED, false, true)
TC_DEEP_KERNEL(conv_tc_fp16_staged_rows, FP16, STAGED, false, true)

// conv_narrow_mma_{bf16,fp16} (INVDIFF_NARROW_MMA): conv.cu's conv_narrow_<NC> (at most 8
// output channels: celebahq's conv_out forward, 128 -> 3, and conv_in's input gradient) on the
// tensor cores, over 16-bit activations. The fp32 kernel does 144 x NC FMAs for every 18 float4
// of activations it reads from shared memory, and ran at 13-23 TFLOP/s on an H200 (30-34 us a
// launch at batch 1, 189 us at batch 8), a third of the FMA rate; here a 16x16 fragment of
// activations (one ldmatrix.x4) feeds one m16n8k16 product whose 8 columns are the outputs, so
// the launch is bound by its bytes (16-bit activations, half the fp32 kernel's) and by the
// ldmatrix traffic, about as long.
//
// A block computes conv_narrow's 16x32 tile of output pixels (grid (ceil(mw / 32),
// ceil(mh / 16), n), 256 threads): warp w rows 2w and 2w + 1, each as two m16 tiles of 16
// pixels. Per stage, cp.async brings 16 channels of the 18x34 halo tile (32 bytes a pixel,
// 19,584 bytes; three stages in flight; each thread's halo slots and their sources worked out
// once). Each of the 9 window cells is then one k16 step: the B fragment of (cell, channel
// chunk) and, per m16 tile, the A fragment of the 16 pixels that cell reads, an ldmatrix.x4 of
// the tile's pixels shifted by the cell's offset (an implicit GEMM needs no re-layout per tap,
// only other row addresses). A warp's two output rows read halo rows 2w .. 2w + 3, so it loads
// the 24 distinct fragments (halo row, tile half, cell column) once each, each serving the
// cells of both output rows it lies under: 24 ldmatrix and 36 products a stage. The halves of
// a pixel in halo column hx are swapped where bit 2 of hx is set, so that 8 consecutive
// pixels of a halo row (an ldmatrix phase) fall in 8 distinct bank quads, and a lane's address
// is one offset per (tile half, cell column) plus the row's.
//
// The weights (the 16-bit copy in the [(tap, channel), column] layout the other tensor-core
// kernels read) are staged once per block, already in fragment order: for cell c and chunk s,
// lane (g, q)'s b0, b1 (k = 2q, 2q + 1, 2q + 8, 2q + 9 of the chunk, column g, zero past ncols
// and where no tap is) as one 8-byte word at ((c * chunks + s) * 32 + lane) * 8, 144 bytes a
// source channel. The host sends sc % 16 == 0, sc <= 256 (NARROW_MMA_MAX_SC, the shared memory
// it allows), one split, taps in a 3x3 window at in_stride 1 (direct_fits), a 16-byte aligned
// x. The epilogue is finish()'s, per value; the sums run in another order than conv_narrow's
// and over rounded operands, as every tensor-core kernel's do.
namespace nmma {
constexpr int TW = 32, TH = 16;
constexpr int HW = TW + 2, HH = TH + 2;
constexpr int HALO = HW * HH;
constexpr int CK = 16;
constexpr int STAGE_BYTES = HALO * CK * 2;
constexpr int STAGES = 3;
// Fragment words a thread stages in one round (all of them at sc <= 128, two rounds above).
constexpr int WORDS_PER_ROUND = 9 * (128 / CK) * 32 / THREADS;
// Where 16-byte half h of a pixel in halo column hx sits within its 32 bytes: swapped in
// every other group of four columns, so that an ldmatrix phase (8 consecutive pixels of a
// halo row, one half each) reads 8 distinct bank quads.
DEVI int swizzle(int h, int hx) { return (h ^ (hx >> 2)) & 1; }
}  // namespace nmma
static_assert(nmma::STAGES * nmma::STAGE_BYTES == 58752,
              "NMMA_STAGES_SMEM must match src/cuda/kernels/conv.rs");

template <int T>
DEVI void narrow_mma_body(const ConvArgs& a, unsigned char* smem) {
    using namespace nmma;
    __shared__ int s_cellw[9];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int sc = a.sc, ncols = a.ncols;
    const int chunks = sc / CK;
    const Window win = tap_window(a);
    if (tid < 9) s_cellw[tid] = cell_weights(a, win, tid);
    const int x0 = blockIdx.x * TW, y0 = blockIdx.y * TH, img = blockIdx.z;
    const uint16_t* const xh = reinterpret_cast<const uint16_t*>(a.x);
    const uint16_t* const wh = static_cast<const uint16_t*>(a.w);
    const uint32_t halo0 = smem_addr(smem);
    uint2* const frag = reinterpret_cast<uint2*>(smem + STAGES * STAGE_BYTES);

    // A thread's halo slots (16-byte halves of halo pixels), the same in every stage: slot r is
    // half i & 1 of pixel i >> 1, i = tid + 256 r, its source (0 outside the image: a zero
    // fill) and its place in a stage, worked out once.
    constexpr int SLOTS = (2 * HALO + THREADS - 1) / THREADS;
    const uint16_t* slot_src[SLOTS];
    uint32_t slot_dst[SLOTS];
#pragma unroll
    for (int r = 0; r < SLOTS; ++r) {
        const int i = tid + THREADS * r;
        const int p = i >> 1, h = i & 1;
        const int hy = p / HW, hx = p - hy * HW;
        const int iy = y0 + win.dy0 + hy, ix = x0 + win.dx0 + hx;
        const bool ok = i < 2 * HALO && (unsigned)iy < (unsigned)a.sh && (unsigned)ix < (unsigned)a.sw;
        slot_src[r] = ok ? xh + (((long long)img * a.sh + iy) * a.sw + ix) * sc + 8 * h : nullptr;
        slot_dst[r] = i < 2 * HALO ? p * 32 + (swizzle(h, hx) << 4) : ~0u;
    }
    // Channels [16 chunk, 16 chunk + 16) of the halo into stage buf.
    auto load_stage = [&](int chunk, int buf) {
#pragma unroll
        for (int r = 0; r < SLOTS; ++r) {
            if (slot_dst[r] == ~0u) continue;
            const bool ok = slot_src[r] != nullptr;
            cp_async16(halo0 + buf * STAGE_BYTES + slot_dst[r], ok ? slot_src[r] + chunk * CK : xh, ok);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < chunks) load_stage(s, s);
        cp_async_commit();
    }

    // The weights, while the first stages load: fragment word w (lane w % 32 of (cell, chunk)
    // w / 32) is thread w % 256's, so a thread keeps its lane (g, q) and the words of a round
    // (all of them up to sc = 128) are loaded before the first is stored.
    __syncthreads();  // s_cellw
    {
        const int g = lane >> 2, q = lane & 3;
        const int words = 9 * chunks * 32;
        for (int w0 = tid; w0 < words; w0 += WORDS_PER_ROUND * THREADS) {
            uint32_t lo[WORDS_PER_ROUND], hi[WORDS_PER_ROUND];
#pragma unroll
            for (int i = 0; i < WORDS_PER_ROUND; ++i) {
                const int w = w0 + THREADS * i;
                const int cell = (w >> 5) / chunks, chunk = (w >> 5) - cell * chunks;
                const int wrow = w < words && g < ncols ? s_cellw[cell] : -1;
                uint32_t e[4] = {0, 0, 0, 0};
                if (wrow >= 0) {
                    const uint16_t* src = wh + ((long long)wrow * sc + chunk * CK + 2 * q) * ncols + g;
                    e[0] = src[0];
                    e[1] = src[ncols];
                    e[2] = src[8 * ncols];
                    e[3] = src[9 * ncols];
                }
                lo[i] = e[0] | e[1] << 16;
                hi[i] = e[2] | e[3] << 16;
            }
#pragma unroll
            for (int i = 0; i < WORDS_PER_ROUND; ++i) {
                const int w = w0 + THREADS * i;
                if (w < words) frag[w] = make_uint2(lo[i], hi[i]);
            }
        }
    }

    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    // This lane's ldmatrix rows, per halo column offset u = 16 half + dx (half: which 16 pixels
    // of a tile row, dx: the cell's column): pixel lane % 16 + u of a halo row, 16-byte half
    // lane / 16, as a byte offset within the row (the swizzle depends on the column only).
    const int lrow = lane & 15, lhalf = lane >> 4;
    uint32_t col_off[2][3];
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
            const int hx = 16 * half + lrow + dx;
            col_off[half][dx] = hx * 32 + (swizzle(lhalf, hx) << 4);
        }
    for (int c = 0; c < chunks; ++c) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (c + STAGES - 1 < chunks) load_stage(c + STAGES - 1, (c + STAGES - 1) % STAGES);
        cp_async_commit();
        // The warp's output rows 2w and 2w + 1 read halo rows 2w .. 2w + 3: each of the 24
        // fragments (halo row, tile half, dx) is loaded once and serves the cells (dy, dx) of
        // the output rows it is halo row dy of.
        const uint32_t base = halo0 + (c % STAGES) * STAGE_BYTES + 2 * warp * HW * 32;
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
            uint2 b[3];
#pragma unroll
            for (int dy = 0; dy < 3; ++dy) b[dy] = frag[((3 * dy + dx) * chunks + c) * 32 + lane];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    uint32_t fa[4];
                    ldmatrix_x4(base + r * HW * 32 + col_off[half][dx], fa);
#pragma unroll
                    for (int dy = 0; dy < 3; ++dy) {
                        const int row = r - dy;  // the output row (0 or 1) halo row r is dy of
                        if (row == 0 || row == 1) mma<T>(acc[2 * row + half], fa, b[dy].x, b[dy].y);
                    }
                }
            }
        }
    }
    cp_async_wait_all();

    // c0, c1: pixel g of the tile, columns 2q, 2q + 1; c2, c3: pixel g + 8.
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int my = y0 + 2 * warp + (j >> 1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int mx = x0 + 16 * (j & 1) + g + 8 * h;
            if (my >= a.mh || mx >= a.mw) continue;
            const long long pix = out_pixel(a, RowCoord{img, my, mx});
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 2 * q + e;
                if (col < ncols) a.y[pix * ncols + col] = finish(a, img, pix, col, acc[j][2 * h + e]);
            }
        }
    }
}

// 58,752 bytes of stages and 144 x sc of weights, dynamic (the host allows NMMA_MAX_SC's).
#define NARROW_MMA_KERNEL(name, T)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const ConvArgs a) { \
        extern __shared__ __align__(128) unsigned char dsmem[];                      \
        narrow_mma_body<T>(a, dsmem);                                                \
    }
NARROW_MMA_KERNEL(conv_narrow_mma_bf16, BF16)
NARROW_MMA_KERNEL(conv_narrow_mma_fp16, FP16)

// conv_few_in_mma_<SC> (INVDIFF_FEW_IN_MMA, bf16 and fp16 programs): conv.cu's conv_few_in_<SC> (at
// most 8 source channels: celebahq's conv_in forward, 3 -> 128, and conv_out's input gradient)
// on the tensor cores. K is 9 x sc <= 72, so the launch is bound by its fp32 output (a 128-channel
// image: 32 MB at 256x256), not by products; conv_few_in ran at 15-23 TFLOP/s on an H200 (30 us
// a launch at batch 1, 160 us at batch 8), where writing the output alone takes about a third
// of that. Its input is fp32 (the sampler's state, or the gradient a sampler hands back), so
// rather than round it to 16 bits this kernel keeps about 17 significant bits of every
// operand: each value v is split into bf16 hi = rn(v) and lo = rn(v - hi), and each product
// is summed as lo*hi + hi*lo + hi*hi (three m16n8k16 products; lo*lo, below 2^-16 of the
// product, is left out). bf16 rather than fp16 for both precisions: the weights' small lo
// parts would be fp16 subnormals.
//
// A block computes 128 GEMM rows (output pixels, in row order) x 128 columns; grid
// (ceil(rows / 128), ceil(ncols / 128)), 256 threads; one kernel per sc, so that the (window
// cell, channel) of every k = cell * sc + channel is a constant. First two threads a pixel
// gather its values (zero outside the image, past 9 x sc and where no tap is) into two
// shared-memory A tiles (hi, lo) of 16 * ks halves a row, ks = ceil(9 sc / 16) k16 steps (rows
// 32 ks + 16 bytes apart: any 8 rows' 16-byte chunks fall in distinct bank quads); warp w holds
// the B fragments of columns 16w..16w + 15 for every step in registers (2 n8 tiles x ks x (hi,
// lo)). Then each warp walks the 8 m16 tiles of the block: per step an ldmatrix.x4 of each A
// tile and six products, then finish()'s epilogue, or where there is only a bias (the
// network's launches) the bias alone, and rows that are their own output pixels without a
// division to find them.
namespace fmma {
constexpr int BM = 128;
constexpr int BN = 128;
}  // namespace fmma

// One kernel per source channel count SC, so that every (cell, channel) of k is a constant.
template <int SC>
DEVI void few_in_mma_body(const ConvArgs& a) {
    using namespace fmma;
    constexpr int K = 9 * SC;
    constexpr int KS = (K + 15) / 16;  // k16 steps
    constexpr int PITCH = 32 * KS + 16;
    constexpr int PAIRS = 8 * KS;  // k pairs a row
    __shared__ __align__(16) unsigned char a_hi[BM * PITCH];
    __shared__ __align__(16) unsigned char a_lo[BM * PITCH];
    __shared__ int s_cellw[9];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ncols = a.ncols;
    const int M = a.n * a.mh * a.mw;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const Window win = tap_window(a);
    if (tid < 9) s_cellw[tid] = cell_weights(a, win, tid);
    __syncthreads();

    // B: this lane's fragments, (k = 16 s + 2q, +1 | +8, +9; column n0 + 16 warp + 8 j + g).
    const float* const wf = static_cast<const float*>(a.w);
    const int g = lane >> 2, q = lane & 3;
    float bv[2][KS][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int col = n0 + 16 * warp + 8 * j + g;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int k = 16 * s + 2 * q + (e & 1) + 8 * (e >> 1);
                const int cell = k / SC;
                const int wrow = k < K && col < ncols ? s_cellw[cell] : -1;
                bv[j][s][e] = wrow >= 0 ? wf[((long long)wrow * SC + k - cell * SC) * ncols + col] : 0.f;
            }
        }
    }

    // A: thread t gathers the first or (t >= 128) second half of pixel t % 128's k pairs, each
    // half its own copy of the code, so that every k is a constant. Every load goes out before
    // the first store.
    const auto gather = [&](auto half) {
        constexpr int P0 = decltype(half)::value * (PAIRS / 2);
        constexpr int PN = decltype(half)::value ? PAIRS - PAIRS / 2 : PAIRS / 2;
        const int p = tid & (BM - 1);
        const int m = m0 + p;
        const RowCoord rc = decode_row(a, m < M ? m : 0);
        const float* const xi = a.x + (long long)rc.img * a.sh * a.sw * SC;
        float xv[PN][2];
#pragma unroll
        for (int i = 0; i < PN; ++i) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int k = 2 * (P0 + i) + e;
                const int cell = k / SC, ch = k % SC;
                const int iy = rc.my + win.dy0 + cell / 3, ix = rc.mx + win.dx0 + cell % 3;
                const bool ok = k < K && m < M && s_cellw[k < K ? cell : 0] >= 0 && (unsigned)iy < (unsigned)a.sh &&
                                (unsigned)ix < (unsigned)a.sw;
                xv[i][e] = ok ? xi[((long long)iy * a.sw + ix) * SC + ch] : 0.f;
            }
        }
#pragma unroll
        for (int i = 0; i < PN; ++i) {
            uint32_t hi, lo;
            split_bf16x2(xv[i][0], xv[i][1], hi, lo);
            *reinterpret_cast<uint32_t*>(a_hi + p * PITCH + 4 * (P0 + i)) = hi;
            *reinterpret_cast<uint32_t*>(a_lo + p * PITCH + 4 * (P0 + i)) = lo;
        }
    };
    if (tid < BM)
        gather(std::integral_constant<int, 0>{});
    else
        gather(std::integral_constant<int, 1>{});
    uint32_t bh[2][KS][2], bl[2][KS][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int s = 0; s < KS; ++s) {
            split_bf16x2(bv[j][s][0], bv[j][s][1], bh[j][s][0], bl[j][s][0]);
            split_bf16x2(bv[j][s][2], bv[j][s][3], bh[j][s][1], bl[j][s][1]);
        }
    // This lane's biases (0 past ncols or without a bias): columns n0 + 16 warp + 8 j + 2q + e.
    float bias[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int col = n0 + 16 * warp + 8 * j + 2 * q + e;
            bias[j][e] = a.bias != nullptr && col < ncols ? a.bias[col] : 0.f;
        }
    // An epilogue of the bias alone (the network's case): what finish_with_bias() computes
    // then, without its per-value tests and division by 1. Rows that are their output pixels
    // (out_pixel the identity): no division to find them.
    const bool plain = a.temb == nullptr && a.res == nullptr && a.out_div == 1.0f && !a.accumulate;
    const bool dense = a.out_stride == 1 && a.out_oy == 0 && a.out_ox == 0 && a.yh == a.mh && a.yw == a.mw;
    const bool vec_out = (ncols & 1) == 0;
    __syncthreads();

    const uint32_t hi0 = smem_addr(a_hi), lo0 = smem_addr(a_lo);
#pragma unroll 1
    for (int mt = 0; mt < BM / 16; ++mt) {
        float acc[2][4] = {};
        const uint32_t row_off = (mt * 16 + (lane & 15)) * PITCH + (lane >> 4) * 16;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
            uint32_t ah[4], al[4];
            ldmatrix_x4(hi0 + row_off + 32 * s, ah);
            ldmatrix_x4(lo0 + row_off + 32 * s, al);
#pragma unroll
            for (int j = 0; j < 2; ++j) mma_split(acc[j], ah, al, bh[j][s], bl[j][s]);
        }
        // c0, c1: row g, columns 2q, 2q + 1 of an n8 tile; c2, c3: row g + 8.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + mt * 16 + g + 8 * h;
            if (m >= M) continue;
            RowCoord rc{0, 0, 0};
            long long pix = m;
            if (!dense || !plain) {
                rc = decode_row(a, m);
                pix = out_pixel(a, rc);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = n0 + 16 * warp + 8 * j + 2 * q;
                float* const yp = a.y + pix * ncols + col;
                float v[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float x = acc[j][2 * h + e];
                    v[e] = plain ? (a.bias != nullptr ? bias[j][e] + x : x)
                                 : finish_with_bias(a, bias[j][e], rc.img, pix, col + e, x);
                }
                // Even widths keep the pair 8-byte aligned (the host checks y).
                if (col + 1 < ncols && vec_out) {
                    *reinterpret_cast<float2*>(yp) = make_float2(v[0], v[1]);
                } else {
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (col + e < ncols) yp[e] = v[e];
                }
            }
        }
    }
}

// 128 x 128 outputs a block, 256 threads; 2 x 128 x (32 KS + 16) bytes of static shared memory
// (44 KB at SC = 8).
#define FEW_IN_MMA(SC)                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) conv_few_in_mma_##SC(const ConvArgs a) { \
        few_in_mma_body<SC>(a);                                                          \
    }
FEW_IN_MMA(1)
FEW_IN_MMA(2)
FEW_IN_MMA(3)
FEW_IN_MMA(4)
FEW_IN_MMA(5)
FEW_IN_MMA(6)
FEW_IN_MMA(7)
FEW_IN_MMA(8)
#undef FEW_IN_MMA

// The weights' half-precision copies, made once: element i of src rounded to nearest even as
// bf16 (kind 1) or fp16 (kind 2), two per 32-bit word of dst (an odd tail pairs with zero).
extern "C" __global__ void tc_convert(const float* src, uint32_t* dst, long long len, int kind) {
    const long long pairs = (len + 1) / 2;
    for (long long e = grid_start(); e < pairs; e += grid_stride()) {
        const float lo = src[2 * e];
        const float hi = 2 * e + 1 < len ? src[2 * e + 1] : 0.0f;
        dst[e] = kind == BF16 ? pack2<BF16>(lo, hi) : pack2<FP16>(lo, hi);
    }
}
