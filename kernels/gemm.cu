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
// kernel's time (slices of 16 made one attention product at 256 tokens ~25 us).
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
static_assert(sizeof(GemmArgs) == 136, "GemmArgs must match src/cuda/kernels.rs");

// One block's tile of TM x TM outputs, 256 threads in a 16 x 16 grid with an R x R register
// tile each (R = TM / 16). Every output sums its k products in order whatever TM is, so both
// tile sizes give the same bits.
template <int TM> DEVI void gemm_tile(const GemmArgs& g) {
    constexpr int TN = TM, TK = 64, R = TM / 16;
    constexpr int LOG_TK = 6, LOG_TM = TM == 64 ? 6 : 5;
    static_assert(TM == 64 || TM == 32, "tile sizes are powers of two the shifts know");
    __shared__ __align__(16) float As[TK][TM + 4];
    __shared__ __align__(16) float Bs[TK][TN + 4];
    const int tid = threadIdx.x;
    const int z = blockIdx.z;
    const int bo = z / g.batch_inner;
    const int bi = z - bo * g.batch_inner;
    const float* A = g.a + bo * g.a_bo + bi * g.a_bi;
    const float* B = g.b + bo * g.b_bo + bi * g.b_bi;
    float* C = g.c + bo * g.c_bo + bi * g.c_bi;
    const int m0 = blockIdx.y * TM;
    const int n0 = blockIdx.x * TN;
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const bool a_kfast = g.a_cs == 1;
    const bool b_nfast = g.b_cs == 1;

    float acc[R][R];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < R; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < g.k; k0 += TK) {
#pragma unroll
        for (int r = 0; r < TK * TM / 256; ++r) {
            const int e = tid + 256 * r;
            int mm, kk;
            if (a_kfast) { kk = e & (TK - 1); mm = e >> LOG_TK; } else { mm = e & (TM - 1); kk = e >> LOG_TM; }
            int i = m0 + mm, k = k0 + kk;
            As[kk][mm] = (i < g.m && k < g.k) ? A[i * g.a_rs + k * g.a_cs] : 0.f;
            int nn;
            if (b_nfast) { nn = e & (TN - 1); kk = e >> LOG_TM; } else { kk = e & (TK - 1); nn = e >> LOG_TK; }
            const int j = n0 + nn;
            k = k0 + kk;
            Bs[kk][nn] = (j < g.n && k < g.k) ? B[k * g.b_rs + j * g.b_cs] : 0.f;
        }
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
    for (int i = 0; i < R; ++i) {
        const int row = m0 + ty * R + i;
        if (row >= g.m) continue;
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int col = n0 + tx * R + j;
            if (col >= g.n) continue;
            float* cp = C + row * g.c_rs + col;
            float v = g.alpha * acc[i][j];
            if (g.accumulate) v += *cp;
            *cp = v;
        }
    }
}

// Grid (ceil(n / 64), ceil(m / 64), batch), 256 threads, 34.8 KB static shared memory.
extern "C" __global__ void __launch_bounds__(256) gemm_batched(const GemmArgs g) {
    pdl_entry();
    gemm_tile<64>(g);
}

// Grid (ceil(n / 32), ceil(m / 32), batch), 256 threads, 18.4 KB static shared memory: four
// times the blocks, for products whose 64-wide tiles would leave most multiprocessors idle
// (the attention products at batch 1: 16-32 blocks).
extern "C" __global__ void __launch_bounds__(256) gemm_batched_32(const GemmArgs g) {
    pdl_entry();
    gemm_tile<32>(g);
}
