// Strided batched matrix product C = alpha A B (+ C), for the attention products
// (S = q kᵀ, O = P v, and dV = Pᵀ dO, dP = dO vᵀ, dQ = dS k, dK = dSᵀ q).
//
// Every operand is a strided view: A(i, k) = a[i * a_rs + k * a_cs], so a transpose, a head's
// slice of the fused q/k/v rows, or one image's P block are all plain views, with no copies.
// The batch index z = blockIdx.z splits into an outer (image) and inner (head) index, each with
// its own stride. The products are small (L = 256 tokens, d <= 512 for celebahq: 67 MFLOP each),
// so this kernel favours generality: 64x64 block tile (32x32, when asked, where 64-wide tiles
// would leave most multiprocessors idle), 256 threads with a 4x4 (2x2) register tile,
// scalar bounds-checked loads whose thread mapping follows whichever stride of the operand is 1
// (so that a warp reads consecutive addresses either way). K slices are 64 deep: at batch 1
// only 16-32 blocks run and each slice waits on its global loads, so the slice count is the
// kernel's time (slices of 16 made one attention product at 256 tokens ~25 us). Loading the
// next slice into registers during this one's products changed nothing on an H200 (stop 34).
// The `_wk` kernel (the default where 32-wide tiles would run; INVDIFF_GEMM_WARP_K=0 keeps the
// tiles) takes the other way out of that chain of slices: a 16 x 32 tile whose eight warps
// each multiply their own eighth of K, in 16-deep slices through
// a buffer of their own (the next slice's loads issued before this one's products, no barrier
// but the warp's), and then add their eight partial tiles in warp order. At batch 1 the
// attention's products (K = 512 or 256) then have 128-256 blocks, each with at most four slices
// a warp in a row, where the 32-wide tiles have 64-128 blocks of four to eight. Each output is
// eight runs of its products added in order, not one run: another rounding than the tiles'
// (the selftest holds both to the CPU). Because that rounding differs, whether a product runs
// them is planned for one image under --batch-invariant (src/cuda/kernels/attention.rs).
// Pairing two independent products in one launch (the backward's dV beside dP) was no faster.
#include "common.cuh"

struct GemmArgs {
    const float* a;
    const float* b;
    float* c;
    long long a_rs, a_cs, b_rs, b_cs, c_rs;
    long long a_bo, a_bi, b_bo, b_bi, c_bo, c_bi;
    int m, n, k, batch_inner;
    float alpha;
    int accumulate;
};
static_assert(sizeof(GemmArgs) == 136, "GemmArgs must match src/cuda/kernels/attention.rs");

// K slice of every tile: 64 deep.
constexpr int TK = 64;

// The (image, head) views of batch z's operands.
struct Views {
    const float* A;
    const float* B;
    float* C;
};
DEVI Views views(const GemmArgs& g, int z) {
    const int bo = z / g.batch_inner;
    const int bi = z - bo * g.batch_inner;
    return {g.a + bo * g.a_bo + bi * g.a_bi, g.b + bo * g.b_bo + bi * g.b_bi, g.c + bo * g.c_bo + bi * g.c_bi};
}

// Slice k0 of a TM x TM tile at (m0, n0) into shared memory, k-major rows of TM + PAD floats,
// zero outside the matrices; each thread's elements follow whichever stride is 1.
template <int TM, int PAD>
DEVI void load_slice(const GemmArgs& g, const Views& v, int m0, int n0, int k0, float (&As)[TK][TM + PAD],
                     float (&Bs)[TK][TM + PAD]) {
    constexpr int TN = TM, LOG_TK = 6, LOG_TM = TM == 64 ? 6 : 5;
    static_assert(TM == 64 || TM == 32, "tile sizes are powers of two the shifts know");
    const int tid = threadIdx.x;
    const bool a_kfast = g.a_cs == 1;
    const bool b_nfast = g.b_cs == 1;
#pragma unroll
    for (int r = 0; r < TK * TM / 256; ++r) {
        const int e = tid + 256 * r;
        int mm, kk;
        if (a_kfast) { kk = e & (TK - 1); mm = e >> LOG_TK; } else { mm = e & (TM - 1); kk = e >> LOG_TM; }
        int i = m0 + mm, k = k0 + kk;
        As[kk][mm] = (i < g.m && k < g.k) ? v.A[i * g.a_rs + k * g.a_cs] : 0.f;
        int nn;
        if (b_nfast) { nn = e & (TN - 1); kk = e >> LOG_TM; } else { kk = e & (TK - 1); nn = e >> LOG_TK; }
        const int j = n0 + nn;
        k = k0 + kk;
        Bs[kk][nn] = (j < g.n && k < g.k) ? v.B[k * g.b_rs + j * g.b_cs] : 0.f;
    }
}

// C(row, col) = alpha acc (+ C(row, col)), inside the matrix.
DEVI void store_c(const GemmArgs& g, float* C, int row, int col, float acc) {
    if (row >= g.m || col >= g.n) return;
    float* cp = C + row * g.c_rs + col;
    float v = g.alpha * acc;
    if (g.accumulate) v += *cp;
    *cp = v;
}

// One block's tile of TM x TM outputs, 256 threads in a 16 x 16 grid with an R x R register
// tile each (R = TM / 16). Every output sums its k products in order whatever TM is, so both
// tile sizes give the same bits.
template <int TM> DEVI void gemm_tile(const GemmArgs& g, int z) {
    constexpr int R = TM / 16;
    __shared__ __align__(16) float As[TK][TM + 4];
    __shared__ __align__(16) float Bs[TK][TM + 4];
    const int tid = threadIdx.x;
    const Views v = views(g, z);
    const int m0 = blockIdx.y * TM;
    const int n0 = blockIdx.x * TM;
    const int tx = tid & 15;
    const int ty = tid >> 4;

    float acc[R][R];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < R; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < g.k; k0 += TK) {
        load_slice<TM, 4>(g, v, m0, n0, k0, As, Bs);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; ++kk) {
            float a4[R], b4[R];
            if constexpr (R == 4) {
                const float4 av = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
                const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
                a4[0] = av.x, a4[1] = av.y, a4[2] = av.z, a4[3] = av.w;
                b4[0] = bv.x, b4[1] = bv.y, b4[2] = bv.z, b4[3] = bv.w;
            } else {
                const float2 av = *reinterpret_cast<const float2*>(&As[kk][ty * 2]);
                const float2 bv = *reinterpret_cast<const float2*>(&Bs[kk][tx * 2]);
                a4[0] = av.x, a4[1] = av.y;
                b4[0] = bv.x, b4[1] = bv.y;
            }
#pragma unroll
            for (int i = 0; i < R; ++i)
#pragma unroll
                for (int j = 0; j < R; ++j) acc[i][j] = fmaf(a4[i], b4[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < R; ++j) store_c(g, v.C, m0 + ty * R + i, n0 + tx * R + j, acc[i][j]);
}

// The same product on the tensor cores (tf32 mma.sync m16n8k8, fp32 accumulation), for the
// attention of the networks whose convolutions already run in bf16, fp16 or tf32: a 64 x 64
// tile, the same loads, then 8 warps as 4 (rows) x 2 (columns) of 16 x 32 outputs, four
// m16n8 tiles each, every operand rounded to tf32 as it leaves shared memory. Rows of 72
// floats: a fragment read (k = q, m or n = g) then hits bank 8q + g, 32 distinct banks.
DEVI void gemm_tile_tf32(const GemmArgs& g, int z) {
    constexpr int TM = 64;
    __shared__ __align__(16) float As[TK][TM + 8];
    __shared__ __align__(16) float Bs[TK][TM + 8];
    const int tid = threadIdx.x;
    const Views v = views(g, z);
    const int m0 = blockIdx.y * TM;
    const int n0 = blockIdx.x * TM;
    const int warp = tid >> 5, lane = tid & 31;
    const int gr = lane >> 2, q = lane & 3;
    const int wm = (warp & 3) * 16, wn = (warp >> 2) * 32;

    float acc[4][4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

    for (int k0 = 0; k0 < g.k; k0 += TK) {
        load_slice<TM, 8>(g, v, m0, n0, k0, As, Bs);
        __syncthreads();
#pragma unroll
        for (int k8 = 0; k8 < TK; k8 += 8) {
            const uint32_t a[4] = {tf32_of(As[k8 + q][wm + gr]), tf32_of(As[k8 + q][wm + gr + 8]),
                                   tf32_of(As[k8 + q + 4][wm + gr]), tf32_of(As[k8 + q + 4][wm + gr + 8])};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const int n = wn + 8 * t + gr;
                mma_tf32(acc[t], a, tf32_of(Bs[k8 + q][n]), tf32_of(Bs[k8 + q + 4][n]));
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const int col = n0 + wn + 8 * t + 2 * q;
#pragma unroll
        for (int e = 0; e < 4; ++e) store_c(g, v.C, m0 + wm + gr + 8 * (e >> 1), col + (e & 1), acc[t][e]);
    }
}

namespace wk {
constexpr int TM = 16, TN = 32;  // a block's outputs: rows, columns
constexpr int WARPS = 8;         // K split eight ways
constexpr int KS = 16;           // a warp's K slice
constexpr int APITCH = TM + 4;   // floats a k row of a warp's A slice takes (16-byte rows)
constexpr int BPITCH = TN + 4;
constexpr int WARP_FLOATS = KS * (APITCH + BPITCH);  // a warp's buffer: its A, then its B
static_assert(TM * TN <= WARP_FLOATS, "a warp's partial tile fits its buffer");
}  // namespace wk

// Where lane element e of a warp's slice lies: (am, ak) in its TM x KS slice of A and (bk, bn)
// in its KS x TN slice of B, each operand's lanes along whichever of its strides is 1 (a_kfast:
// A's k stride; b_nfast: B's n stride), so that a warp reads consecutive addresses.
struct WkAt {
    int am, ak, bk, bn;
};
DEVI WkAt wk_at(bool a_kfast, bool b_nfast, int e) {
    using namespace wk;
    return {a_kfast ? e / KS : e % TM, a_kfast ? e % KS : e / TM, b_nfast ? e / TN : e % KS,
            b_nfast ? e % TN : e / KS};
}

// A warp's slice of A (TM x KS) and of B (KS x TN), lane `lane`'s elements as loaded (A's
// TM x KS / 32 of them at e = lane + 32 r, then B's); zeros outside the matrices and at or past
// k1 (the end of the warp's share of K).
struct WkSlice {
    float a[wk::TM * wk::KS / 32];
    float b[wk::KS * wk::TN / 32];
};
DEVI void wk_fetch(const GemmArgs& g, const Views& v, int m0, int n0, int k0, int k1, WkSlice& s) {
    using namespace wk;
    const int lane = threadIdx.x & 31;
    const bool a_kfast = g.a_cs == 1, b_nfast = g.b_cs == 1;
#pragma unroll
    for (int r = 0; r < TM * KS / 32; ++r) {
        const WkAt at = wk_at(a_kfast, b_nfast, lane + 32 * r);
        const int i = m0 + at.am, k = k0 + at.ak;
        s.a[r] = (i < g.m && k < k1) ? v.A[i * g.a_rs + k * g.a_cs] : 0.f;
    }
#pragma unroll
    for (int r = 0; r < KS * TN / 32; ++r) {
        const WkAt at = wk_at(a_kfast, b_nfast, lane + 32 * r);
        const int j = n0 + at.bn, k = k0 + at.bk;
        s.b[r] = (j < g.n && k < k1) ? v.B[k * g.b_rs + j * g.b_cs] : 0.f;
    }
}
// The slice into the warp's buffer: A k-major at buf[ak * APITCH + am], B at
// buf[KS * APITCH + bk * BPITCH + bn].
DEVI void wk_stash(const GemmArgs& g, const WkSlice& s, float* buf) {
    using namespace wk;
    const int lane = threadIdx.x & 31;
    const bool a_kfast = g.a_cs == 1, b_nfast = g.b_cs == 1;
#pragma unroll
    for (int r = 0; r < TM * KS / 32; ++r) {
        const WkAt at = wk_at(a_kfast, b_nfast, lane + 32 * r);
        buf[at.ak * APITCH + at.am] = s.a[r];
    }
#pragma unroll
    for (int r = 0; r < KS * TN / 32; ++r) {
        const WkAt at = wk_at(a_kfast, b_nfast, lane + 32 * r);
        buf[KS * APITCH + at.bk * BPITCH + at.bn] = s.b[r];
    }
}

// The `_wk` product (see the header): lane (rg, cg) = (lane / 8, lane % 8) of each warp holds
// rows 4 rg .. + 3 x columns 4 cg .. + 3 of its partial tile.
DEVI void gemm_tile_wk(const GemmArgs& g, int z) {
    using namespace wk;
    __shared__ __align__(16) float bufs[WARPS][WARP_FLOATS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rg = lane >> 3, cg = lane & 7;
    const Views v = views(g, z);
    const int m0 = blockIdx.y * TM;
    const int n0 = blockIdx.x * TN;
    float* buf = bufs[warp];
    // This warp's share of K: whole slices, the last warps' possibly short or empty.
    const int span = (g.k + WARPS * KS - 1) / (WARPS * KS) * KS;
    const int kb = warp * span, ke = min(g.k, kb + span);

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    WkSlice next;
    if (kb < ke) wk_fetch(g, v, m0, n0, kb, ke, next);
    for (int k0 = kb; k0 < ke; k0 += KS) {
        wk_stash(g, next, buf);
        __syncwarp();
        if (k0 + KS < ke) wk_fetch(g, v, m0, n0, k0 + KS, ke, next);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            const float4 av = *reinterpret_cast<const float4*>(buf + kk * APITCH + 4 * rg);
            const float4 bv = *reinterpret_cast<const float4*>(buf + KS * APITCH + kk * BPITCH + 4 * cg);
            const float a4[4] = {av.x, av.y, av.z, av.w};
            const float b4[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a4[i], b4[j], acc[i][j]);
        }
        // Every lane done with the slice before the next one overwrites it.
        __syncwarp();
    }

    // The partial tiles meet in the warps' buffers; thread t then adds outputs t and t + 256
    // over the eight warps, in warp order.
#pragma unroll
    for (int i = 0; i < 4; ++i)
        *reinterpret_cast<float4*>(buf + (4 * rg + i) * TN + 4 * cg) =
            make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    __syncthreads();
#pragma unroll
    for (int h = 0; h < TM * TN / 256; ++h) {
        const int o = threadIdx.x + 256 * h;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += bufs[w][o];
        store_c(g, v.C, m0 + o / TN, n0 + o % TN, sum);
    }
}

// Grid (ceil(n / 64), ceil(m / 64), batch), 256 threads, 34.8 KB static shared memory.
extern "C" __global__ void __launch_bounds__(256) gemm_batched(const GemmArgs g) {
    gemm_tile<64>(g, blockIdx.z);
}

// Grid (ceil(n / 32), ceil(m / 32), batch), 256 threads, 18.4 KB static shared memory: four
// times the blocks, for products whose 64-wide tiles would leave most multiprocessors idle
// (the attention products at batch 1: 16-32 blocks).
extern "C" __global__ void __launch_bounds__(256) gemm_batched_32(const GemmArgs g) {
    gemm_tile<32>(g, blockIdx.z);
}

// Grid (ceil(n / 32), ceil(m / 16), batch), 256 threads, 28 KB static shared memory.
extern "C" __global__ void __launch_bounds__(256, 2) gemm_batched_wk(const GemmArgs g) {
    gemm_tile_wk(g, blockIdx.z);
}

// Grid (ceil(n / 64), ceil(m / 64), batch), 256 threads, 36.9 KB static shared memory; tf32
// tensor cores (sm_80 and later).
extern "C" __global__ void __launch_bounds__(256) gemm_batched_tf32(const GemmArgs g) {
    gemm_tile_tf32(g, blockIdx.z);
}
