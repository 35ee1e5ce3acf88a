// Attention, two ways: the row softmax that the batched products of gemm.cu surround (the
// default, with P materialised), and below it the fused kernels (INVDIFF_ATTN_FLASH=1).
//
// Row softmax of the attention scores and its backward, in place, one warp per row.
// The scores S = q kᵀ come from gemm_batched; these kernels apply the 1/√d scale exactly where
// the CPU does (inside the softmax, before the maximum), then P = exp(s - max) / sum. The
// probabilities stay materialised, [n, heads, L, L], as on the CPU: at the UNet's attention
// resolutions (L = 256 for celebahq) P is small, and the backward pass reuses it.
// Rows are independent and L is a few hundred, so a warp per row keeps the reductions inside
// one warp. A row of up to 32 x SOFTMAX_HELD values stays in the lanes' registers between the
// passes (every attention of celebahq-256): one read and one write of it. Longer rows take
// passes over memory, which read the row again after each of the warp's reductions (three
// reads in the forward, two in the backward); at batch 1 (256 rows, so 256 warps on the whole
// card) each read is a wait on memory that little else covers. Both forms do the same
// operations in the same order, so the same bits.
#include "common.cuh"

// Values of a row a lane holds: rows up to 256 long stay in registers.
constexpr int SOFTMAX_HELD = 8;

// P = softmax(scale * S) per row of `len`, in place. Blocks of 256 threads, grid-stride over rows.
extern "C" __global__ void softmax_forward(float* p, long long rows, int len, float scale) {
    const int lane = threadIdx.x & 31;
    for (long long r = grid_start() >> 5; r < rows; r += grid_stride() >> 5) {
        float* row = p + r * len;
        float mx = -INFINITY;
        if (len <= 32 * SOFTMAX_HELD) {
            float v[SOFTMAX_HELD];
#pragma unroll
            for (int i = 0; i < SOFTMAX_HELD; ++i) {
                const int j = lane + 32 * i;
                v[i] = j < len ? row[j] * scale : 0.f;
            }
#pragma unroll
            for (int i = 0; i < SOFTMAX_HELD; ++i)
                if (lane + 32 * i < len) mx = fmaxf(mx, v[i]);
            mx = warp_max(mx);
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < SOFTMAX_HELD; ++i) {
                if (lane + 32 * i < len) {
                    v[i] = expf(v[i] - mx);
                    sum += v[i];
                }
            }
            sum = warp_sum(sum);
            const float inv = 1.0f / sum;
#pragma unroll
            for (int i = 0; i < SOFTMAX_HELD; ++i) {
                const int j = lane + 32 * i;
                if (j < len) row[j] = v[i] * inv;
            }
            continue;
        }
        for (int j = lane; j < len; j += 32) {
            const float v = row[j] * scale;
            row[j] = v;
            mx = fmaxf(mx, v);
        }
        mx = warp_max(mx);
        float sum = 0.f;
        for (int j = lane; j < len; j += 32) {
            const float e = expf(row[j] - mx);
            row[j] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        const float inv = 1.0f / sum;
        for (int j = lane; j < len; j += 32) row[j] *= inv;
    }
}

// One row of softmax_backward held in registers (len <= 32 * SOFTMAX_HELD); FULL: len is that,
// so that no load or product needs a predicate (with them, ptxas began the products before the
// last two loads of a 256-long row).
template <bool FULL>
DEVI void softmax_backward_held(const float* prow, float* drow, int len, float scale, int lane) {
    auto in = [&](int i) { return FULL || lane + 32 * i < len; };
    float pv[SOFTMAX_HELD], dv[SOFTMAX_HELD];
#pragma unroll
    for (int i = 0; i < SOFTMAX_HELD; ++i) {
        pv[i] = in(i) ? prow[lane + 32 * i] : 0.f;
        dv[i] = in(i) ? drow[lane + 32 * i] : 0.f;
    }
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < SOFTMAX_HELD; ++i)
        if (in(i)) dot += dv[i] * pv[i];
    dot = warp_sum(dot);
#pragma unroll
    for (int i = 0; i < SOFTMAX_HELD; ++i)
        if (in(i)) drow[lane + 32 * i] = pv[i] * (dv[i] - dot) * scale;
}

// dS = P ∘ (dP - rowsum(dP ∘ P)) · scale, with dP in `ds` on entry. Same launch as the forward.
extern "C" __global__ void softmax_backward(const float* p, float* ds, long long rows, int len, float scale) {
    const int lane = threadIdx.x & 31;
    for (long long r = grid_start() >> 5; r < rows; r += grid_stride() >> 5) {
        const float* prow = p + r * len;
        float* drow = ds + r * len;
        if (len == 32 * SOFTMAX_HELD) {
            softmax_backward_held<true>(prow, drow, len, scale, lane);
            continue;
        }
        if (len < 32 * SOFTMAX_HELD) {
            softmax_backward_held<false>(prow, drow, len, scale, lane);
            continue;
        }
        float dot = 0.f;
        for (int j = lane; j < len; j += 32) dot += drow[j] * prow[j];
        dot = warp_sum(dot);
        for (int j = lane; j < len; j += 32) drow[j] = prow[j] * (drow[j] - dot) * scale;
    }
}

// ---------------------------------------------------------------------------------------------
// Fused attention (INVDIFF_ATTN_FLASH=1, below fp32): FlashAttention-2's algorithm, with no
// L x L matrix in global memory and three launches per attention pair instead of eight.
//
// The networks' attention is one head of d = 512 at L = 256 or 64 tokens. FlashAttention's
// usual block, a query tile that keeps whole output rows (64 x d) in registers, does not fit at
// d = 512, and at batch 1 it would give 4 blocks to a 132-multiprocessor chip. So a block owns
// a 64-row tile *and one 64-column chunk of what it outputs*: it recomputes the scores over the
// full d for each chunk (d / 64 times in all; these products are small) and keeps only 64 x 64
// accumulators. Grid (row tiles, d / 64, images x heads): 32 blocks at batch 1.
//   forward: per chunk of 64 keys, S = Q Kᵀ over slices of 32 of d, the online softmax
//     (running maximum and sum per row, the accumulators rescaled), O += P V[:, chunk]; then
//     O / sum, and each row's log-sum-exp for the backward pass.
//   backward, dQ (query tiles): D = rowsum(dO ∘ O) first; per key chunk S and dP = dO Vᵀ,
//     P = exp(S scale - lse), dS = P ∘ (dP - D) scale, dQ += dS K[:, chunk]. Writes D.
//   backward, dK and dV (key tiles): per query chunk Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, the same Pᵀ
//     and dSᵀ, dV += Pᵀ dO[:, chunk], dK += dSᵀ Q[:, chunk].
// Products on tf32 mma.sync (m16n8k8; operands rounded as they leave shared memory, fp32 sums),
// 4 warps of 16 rows. A warp's 16 x 64 score fragment, in mma's C layout, is the A operand of
// the next product as it stands: the k index of a tf32 A fragment is relabelled per n8 tile j
// (k = q is column 8j + 2q, k = q + 4 is column 8j + 2q + 1) and the B operand is read with the
// same relabelling, so probabilities never pass through shared memory. Operand slices come by
// cp.async, double-buffered, one commit group per step; the chunk-wide operand of the second
// product (V, K, or Q and dO) is issued with the second slice of the chunk before the one that
// reads it, into one of two buffers, after the barrier that ends that buffer's last reader.
// Requires d % 64 == 0 (the host falls back to the products above otherwise); L is any size:
// rows past it are read as zeros, their scores masked to -inf. scripts/emulate_flash.py runs
// these three kernels lane by lane in numpy (fragments, masks, the cp.async protocol): keep it
// in step with them.
namespace fa {
constexpr int ROWS = 64;     // a block's tile: queries (forward, dQ) or keys (dK, dV)
constexpr int CHUNK = 64;    // the other side, per step of the outer loop
constexpr int DK = 32;       // depth of one slice of the full-d products
constexpr int DC = 64;       // output columns per block
constexpr int THREADS = 128; // 4 warps x 16 rows
// Shared-memory row pitches of 4 (mod 32) floats: a fragment read (row g, column q) hits bank
// 4g + q, and a relabelled B read (row 2q, column g) bank 8q + g: 32 distinct banks either way.
constexpr int SP = DK + 4;
constexpr int CP = DC + 4;
constexpr int SLICE = ROWS * SP; // floats of one slice buffer (ROWS == CHUNK)
constexpr int PANEL = CHUNK * CP; // floats of one chunk-wide panel buffer
}  // namespace fa

struct FlashArgs {
    const float* qkv;  // [n, L, 3 inner]: q, k, v side by side; head h at columns h d
    const float* o;    // [n, L, inner]: the forward's output (backward)
    const float* dout; // [n, L, inner]: its gradient (backward)
    float* y;          // forward: O, [n, L, inner]; backward: dqkv, [n, L, 3 inner]
    float* lse;        // [n, heads, L]: each query's log-sum-exp of its scaled scores
    float* dsum;       // [n, heads, L]: each query's dO · O (backward)
    int tokens, heads, head_dim;
    float scale;
    int accumulate;    // backward: dqkv += instead of =
    int pad_;
};
static_assert(sizeof(FlashArgs) == 72, "FlashArgs must match src/cuda/kernels/attention.rs");

// Dynamic shared memory, bytes (src/cuda/kernels/attention.rs FLASH_SMEM has the same three).
constexpr unsigned FLASH_FWD_SMEM = (2 * 2 * fa::SLICE + 2 * fa::PANEL) * 4;                       // 71,680
constexpr unsigned FLASH_DQ_SMEM = (4 * 2 * fa::SLICE + 2 * fa::PANEL + fa::ROWS) * 4;              // 108,800
constexpr unsigned FLASH_DKV_SMEM = (4 * 2 * fa::SLICE + 2 * 2 * fa::PANEL + 2 * 2 * fa::CHUNK) * 4; // 144,384

// Each kernel traps on a launch it cannot serve, a loud failure rather than a write past the
// allocation or columns left unwritten: less dynamic shared memory than it lays out, or heads
// that are not whole 64-column chunks (the host's flash_fits; the grid covers d / 64 chunks,
// and a chunk's panel is issued at its second slice, so d >= 64).
DEVI void fa_require(const FlashArgs& a, unsigned smem_bytes) {
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(have));
    if (have < smem_bytes || a.head_dim % fa::DC != 0 || a.head_dim < fa::DC) __trap();
}

// Rows [r0, r0 + 64) x columns [c0, c0 + W) of a row-major matrix (pitch ld floats) into shared
// memory of pitch W + 4, zeros for rows at or past `rows`.
template <int W>
DEVI void fa_load(float* s, const float* g, long long ld, int r0, int rows, int c0) {
    constexpr int V4 = W / 4;
    for (int e = threadIdx.x; e < fa::ROWS * V4; e += fa::THREADS) {
        const int r = e / V4, c = (e % V4) * 4;
        const bool ok = r0 + r < rows;
        cp_async16(smem_addr(s + r * (W + 4) + c), g + (ok ? r0 + r : 0) * ld + c0 + c, ok);
    }
}

// 64 floats of a per-query vector from element r0 on into shared memory, zeros past `rows`.
DEVI void fa_load_vec(float* s, const float* g, int r0, int rows) {
    for (int e = threadIdx.x; e < fa::CHUNK; e += fa::THREADS) {
        const bool ok = r0 + e < rows;
        cp_async4(smem_addr(s + e), g + (ok ? r0 + e : 0), ok);
    }
}

// acc[t] (n8 tile t of a warp's 16 x 64) += A Bᵀ over one slice of depth DK: A the warp's 16
// rows from row wr, B 64 rows, both row-major in shared memory of pitch SP.
DEVI void fa_slice(float (&acc)[8][4], const float* a, const float* b, int wr, int g, int q) {
    using namespace fa;
#pragma unroll
    for (int k8 = 0; k8 < DK; k8 += 8) {
        const float* a0 = a + (wr + g) * SP + k8 + q;
        const uint32_t af[4] = {tf32_of(a0[0]), tf32_of(a0[8 * SP]), tf32_of(a0[4]), tf32_of(a0[8 * SP + 4])};
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const float* b0 = b + (8 * t + g) * SP + k8 + q;
            mma_tf32(acc[t], af, tf32_of(b0[0]), tf32_of(b0[4]));
        }
    }
}

// acc[t] (n8 tile t of a warp's 16 x 64 outputs) += P B: P the warp's 16 x 64 fragment in mma's
// C layout (p[j] the n8 tile j), B 64 rows of 64 in shared memory of pitch CP, k relabelled as
// the header says.
DEVI void fa_c_product(float (&acc)[8][4], const float (&p)[8][4], const float* b, int g, int q) {
    using namespace fa;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const uint32_t af[4] = {tf32_of(p[j][0]), tf32_of(p[j][2]), tf32_of(p[j][1]), tf32_of(p[j][3])};
        const float* b0 = b + (8 * j + 2 * q) * CP + g;
#pragma unroll
        for (int t = 0; t < 8; ++t) mma_tf32(acc[t], af, tf32_of(b0[8 * t]), tf32_of(b0[CP + 8 * t]));
    }
}

DEVI void fa_zero(float (&acc)[8][4]) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
}

// The mainloop of the three kernels. Step s multiplies slice s % slices of chunk s / slices:
// acc[i] += A_i B_iᵀ over it for each of the N products (A_i, B_i the slice buffers a[i], b[i]
// of the step's parity; acc[i] zeroed at a chunk's first slice), then, at the chunk's last
// slice, end_of_chunk(chunk). The caller has issued step 0's copies; before each step come the
// next one's (issue, one commit group each): one group lands while a step multiplies, and the
// barrier after each step ends the reads of its buffers.
template <int N, class Issue, class EndOfChunk>
DEVI void fa_mainloop(int steps, int slices, Issue issue, const float* const (&a)[N], const float* const (&b)[N],
                      float (&acc)[N][8][4], int wr, int g, int q, EndOfChunk end_of_chunk) {
    for (int s = 0; s < steps; ++s) {
        const int chunk = s / slices, sl = s - chunk * slices;
        if (s + 1 < steps) issue(s + 1); else cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (sl == 0) fa_zero(acc[i]);
            fa_slice(acc[i], a[i] + (s & 1) * fa::SLICE, b[i] + (s & 1) * fa::SLICE, wr, g, q);
        }
        if (sl == slices - 1) end_of_chunk(chunk);
        __syncthreads();
    }
}

// The sum over the four threads of a quad (the threads that hold one fragment row).
DEVI float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
DEVI float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Stores (or adds onto) a warp's 16 x 64 fragment at rows row0 + (g, g + 8), columns col0 +
// 8t + 2q of a row-major matrix of pitch ld, rows at or past `rows` skipped, times `mul[r]`.
DEVI void fa_store(const float (&acc)[8][4], float* out, long long ld, int row0, int rows, int col0,
                   const float (&mul)[2], bool accumulate, int g, int q) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= rows) continue;
        float* o = out + row * ld + col0 + 2 * q;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            float2 v = make_float2(acc[t][2 * r] * mul[r], acc[t][2 * r + 1] * mul[r]);
            float2* p = reinterpret_cast<float2*>(o + 8 * t);
            if (accumulate) {
                const float2 old = *p;
                v.x += old.x;
                v.y += old.y;
            }
            *p = v;
        }
    }
}

// What a block works on, the same in the three kernels: its image and head, that head's columns
// of the q/k/v rows (pitch ld) and of the O and dO rows (pitch inner), its tile's first row r0
// and output chunk's first column c0 (of the head), the steps of its mainloop (slices of d per
// chunk of the other side), and where its (image, head)'s per-query vectors (lse, dsum) start.
struct FaBlock {
    int img, head, inner, L, r0, c0, slices, chunks, steps;
    long long ld, vec0;
    const float *q, *k, *v, *o, *dout;
};
DEVI FaBlock fa_block(const FlashArgs& a) {
    FaBlock w;
    w.img = blockIdx.z / a.heads;
    w.head = blockIdx.z - w.img * a.heads;
    w.inner = a.heads * a.head_dim;
    w.L = a.tokens;
    w.r0 = blockIdx.x * fa::ROWS;
    w.c0 = blockIdx.y * fa::DC;
    w.slices = a.head_dim / fa::DK;
    w.chunks = (w.L + fa::CHUNK - 1) / fa::CHUNK;
    w.steps = w.chunks * w.slices;
    w.ld = 3LL * w.inner;
    w.vec0 = (long long)blockIdx.z * w.L;
    w.q = a.qkv + (long long)w.img * w.L * w.ld + w.head * a.head_dim;
    w.k = w.q + w.inner;
    w.v = w.q + 2 * w.inner;
    const long long rows = (long long)w.img * w.L * w.inner + w.head * a.head_dim;
    w.o = a.o + rows;
    w.dout = a.dout + rows;
    return w;
}

// Grid (⌈L/64⌉, d/64, n heads), 128 threads, FLASH_FWD_SMEM dynamic shared memory.
extern "C" __global__ void __launch_bounds__(fa::THREADS) attention_flash_forward(const FlashArgs a) {
    fa_require(a, FLASH_FWD_SMEM);
    using namespace fa;
    extern __shared__ __align__(16) float sm[];
    float* qs = sm;                 // [2][ROWS][SP]: a slice of the query tile
    float* ks = qs + 2 * SLICE;     // [2][CHUNK][SP]: the same slice of a key chunk
    float* vs = ks + 2 * SLICE;     // [2][CHUNK][CP]: a key chunk's values, the block's columns
    const FaBlock w = fa_block(a);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3, wr = warp * 16;

    // Step s multiplies slice s % slices of key chunk s / slices; its copies also bring the
    // next chunk's values when it is a chunk's second step.
    auto issue = [&](int s) {
        const int kc = s / w.slices, sl = s - kc * w.slices;
        fa_load<DK>(qs + (s & 1) * SLICE, w.q, w.ld, w.r0, w.L, sl * DK);
        fa_load<DK>(ks + (s & 1) * SLICE, w.k, w.ld, kc * CHUNK, w.L, sl * DK);
        if (sl == 1 && kc + 1 < w.chunks) fa_load<DC>(vs + ((kc + 1) & 1) * PANEL, w.v, w.ld, (kc + 1) * CHUNK, w.L, w.c0);
        cp_async_commit();
    };
    fa_load<DC>(vs, w.v, w.ld, 0, w.L, w.c0);
    issue(0);

    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}; // rows g, g + 8
    float o[8][4], sc[1][8][4];
    float(&s_acc)[8][4] = sc[0];
    fa_zero(o);
    const float* const a_slices[1] = {qs};
    const float* const b_slices[1] = {ks};
    fa_mainloop<1>(w.steps, w.slices, issue, a_slices, b_slices, sc, wr, g, q, [&](int kc) {
        // The online softmax over this chunk's keys (scaled, as the CPU scales, before the
        // maximum), then O += P V.
        float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kc * CHUNK + 8 * t + 2 * q + (e & 1);
                const float v = key < w.L ? s_acc[t][e] * a.scale : -INFINITY;
                s_acc[t][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = quad_max(mx[r]); // finite: every chunk holds at least one key
            corr[r] = expf(m_run[r] - mx[r]);
            m_run[r] = mx[r];
            l_run[r] *= corr[r];
        }
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = expf(s_acc[t][e] - mx[e >> 1]);
                s_acc[t][e] = p;
                l_run[e >> 1] += p;
                o[t][e] *= corr[e >> 1];
            }
        fa_c_product(o, s_acc, vs + (kc & 1) * PANEL, g, q);
    });

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(l_run[r]);
        inv[r] = 1.0f / l;
        const int row = w.r0 + wr + g + 8 * r;
        if (blockIdx.y == 0 && q == 0 && row < w.L) a.lse[w.vec0 + row] = m_run[r] + logf(l);
    }
    fa_store(o, a.y + ((long long)w.img * w.L) * w.inner + w.head * a.head_dim, w.inner, w.r0 + wr, w.L, w.c0, inv, false,
             g, q);
}

// Grid (⌈L/64⌉, d/64, n heads), 128 threads, FLASH_DQ_SMEM dynamic shared memory. Writes
// dsum for attention_flash_backward_dkv, which runs after it.
extern "C" __global__ void __launch_bounds__(fa::THREADS) attention_flash_backward_dq(const FlashArgs a) {
    fa_require(a, FLASH_DQ_SMEM);
    using namespace fa;
    extern __shared__ __align__(16) float sm[];
    float* qs = sm;                   // [2][ROWS][SP] slices of the block's queries,
    float* dos = qs + 2 * SLICE;      // of their output gradients,
    float* ks = dos + 2 * SLICE;      // of a key chunk's keys
    float* vs = ks + 2 * SLICE;       // and values
    float* kp = vs + 2 * SLICE;       // [2][CHUNK][CP]: a key chunk's keys, the block's columns
    float* dsum_s = kp + 2 * PANEL;   // [ROWS]
    const FaBlock w = fa_block(a);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3, wr = warp * 16;

    auto issue = [&](int s) {
        const int kc = s / w.slices, sl = s - kc * w.slices;
        fa_load<DK>(qs + (s & 1) * SLICE, w.q, w.ld, w.r0, w.L, sl * DK);
        fa_load<DK>(dos + (s & 1) * SLICE, w.dout, w.inner, w.r0, w.L, sl * DK);
        fa_load<DK>(ks + (s & 1) * SLICE, w.k, w.ld, kc * CHUNK, w.L, sl * DK);
        fa_load<DK>(vs + (s & 1) * SLICE, w.v, w.ld, kc * CHUNK, w.L, sl * DK);
        if (sl == 1 && kc + 1 < w.chunks) fa_load<DC>(kp + ((kc + 1) & 1) * PANEL, w.k, w.ld, (kc + 1) * CHUNK, w.L, w.c0);
        cp_async_commit();
    };
    fa_load<DC>(kp, w.k, w.ld, 0, w.L, w.c0);
    issue(0);

    // D = rowsum(dO ∘ O) over the whole head, a warp per row, while the first copies fly.
    for (int r = warp; r < ROWS; r += THREADS / 32) {
        const int row = w.r0 + r;
        float acc = 0.f;
        if (row < w.L)
            for (int c = 4 * lane; c < a.head_dim; c += 128) {
                const float4 x = ld_f4(w.o + row * w.inner + c), y = ld_f4(w.dout + row * w.inner + c);
                acc += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
            }
        acc = warp_sum(acc);
        if (lane == 0) {
            dsum_s[r] = acc;
            if (blockIdx.y == 0 && row < w.L) a.dsum[w.vec0 + row] = acc;
        }
    }
    __syncthreads();
    float lse[2], dsum[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = w.r0 + wr + g + 8 * r;
        lse[r] = row < w.L ? a.lse[w.vec0 + row] : 0.f;
        dsum[r] = dsum_s[wr + g + 8 * r];
    }

    // S = Q Kᵀ and dP = dO Vᵀ per key chunk.
    float dq[8][4], sp[2][8][4];
    fa_zero(dq);
    const float* const a_slices[2] = {qs, dos};
    const float* const b_slices[2] = {ks, vs};
    fa_mainloop<2>(w.steps, w.slices, issue, a_slices, b_slices, sp, wr, g, q, [&](int kc) {
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kc * CHUNK + 8 * t + 2 * q + (e & 1), r = e >> 1;
                const float p = key < w.L ? expf(sp[0][t][e] * a.scale - lse[r]) : 0.f;
                sp[0][t][e] = p * (sp[1][t][e] - dsum[r]) * a.scale; // dS
            }
        fa_c_product(dq, sp[0], kp + (kc & 1) * PANEL, g, q);
    });
    const float one[2] = {1.f, 1.f};
    fa_store(dq, a.y + ((long long)w.img * w.L) * w.ld + w.head * a.head_dim, w.ld, w.r0 + wr, w.L, w.c0, one,
             a.accumulate != 0, g, q);
}

// Grid (⌈L/64⌉, d/64, n heads) over key tiles, 128 threads, FLASH_DKV_SMEM dynamic shared
// memory; reads the lse of the forward and the dsum of attention_flash_backward_dq.
extern "C" __global__ void __launch_bounds__(fa::THREADS) attention_flash_backward_dkv(const FlashArgs a) {
    fa_require(a, FLASH_DKV_SMEM);
    using namespace fa;
    extern __shared__ __align__(16) float sm[];
    float* ks = sm;                   // [2][ROWS][SP] slices of the block's keys,
    float* vs = ks + 2 * SLICE;       // of their values,
    float* qs = vs + 2 * SLICE;       // of a query chunk's queries
    float* dos = qs + 2 * SLICE;      // and output gradients
    float* qp = dos + 2 * SLICE;      // [2][CHUNK][CP]: a query chunk's queries, the block's columns,
    float* dop = qp + 2 * PANEL;      // [2][CHUNK][CP]: and output gradients
    float* lse_s = dop + 2 * PANEL;   // [2][CHUNK]: a query chunk's lse
    float* dsum_s = lse_s + 2 * CHUNK; // [2][CHUNK]: and dsum
    const FaBlock w = fa_block(a);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3, wr = warp * 16;

    auto panels = [&](int qc) {
        const int b = qc & 1;
        fa_load<DC>(qp + b * PANEL, w.q, w.ld, qc * CHUNK, w.L, w.c0);
        fa_load<DC>(dop + b * PANEL, w.dout, w.inner, qc * CHUNK, w.L, w.c0);
        fa_load_vec(lse_s + b * CHUNK, a.lse + w.vec0, qc * CHUNK, w.L);
        fa_load_vec(dsum_s + b * CHUNK, a.dsum + w.vec0, qc * CHUNK, w.L);
    };
    auto issue = [&](int s) {
        const int qc = s / w.slices, sl = s - qc * w.slices;
        fa_load<DK>(ks + (s & 1) * SLICE, w.k, w.ld, w.r0, w.L, sl * DK);
        fa_load<DK>(vs + (s & 1) * SLICE, w.v, w.ld, w.r0, w.L, sl * DK);
        fa_load<DK>(qs + (s & 1) * SLICE, w.q, w.ld, qc * CHUNK, w.L, sl * DK);
        fa_load<DK>(dos + (s & 1) * SLICE, w.dout, w.inner, qc * CHUNK, w.L, sl * DK);
        if (sl == 1 && qc + 1 < w.chunks) panels(qc + 1);
        cp_async_commit();
    };
    panels(0);
    issue(0);

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ per query chunk.
    float dk[8][4], dv[8][4], sp[2][8][4];
    fa_zero(dk);
    fa_zero(dv);
    const float* const a_slices[2] = {ks, vs};
    const float* const b_slices[2] = {qs, dos};
    fa_mainloop<2>(w.steps, w.slices, issue, a_slices, b_slices, sp, wr, g, q, [&](int qc) {
        const int b = qc & 1;
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * t + 2 * q + (e & 1);
                const float p = qc * CHUNK + c < w.L ? expf(sp[0][t][e] * a.scale - lse_s[b * CHUNK + c]) : 0.f;
                sp[0][t][e] = p;                                                    // Pᵀ
                sp[1][t][e] = p * (sp[1][t][e] - dsum_s[b * CHUNK + c]) * a.scale; // dSᵀ
            }
        fa_c_product(dv, sp[0], dop + b * PANEL, g, q);
        fa_c_product(dk, sp[1], qp + b * PANEL, g, q);
    });
    const float one[2] = {1.f, 1.f};
    float* base = a.y + ((long long)w.img * w.L) * w.ld + w.head * a.head_dim;
    fa_store(dk, base + w.inner, w.ld, w.r0 + wr, w.L, w.c0, one, a.accumulate != 0, g, q);
    fa_store(dv, base + 2 * w.inner, w.ld, w.r0 + wr, w.L, w.c0, one, a.accumulate != 0, g, q);
}

// ---------------------------------------------------------------------------------------------
// Attention in rows (INVDIFF_ATTN_ROWS=1, below fp32): the forward in two launches instead of
// three, P written for the backward pass (below: two launches instead of the unfused five).
//
// At batch 1 the unfused forward's three launches (S = q kᵀ, its softmax, P v) take about 8 us
// each for 134 MFLOP at 256 tokens: each waits out its own ramp, and the products' blocks wait
// on their K slices one after another. Here a block owns 16 queries and one split of 32 keys,
// and issues every operand it reads by cp.async at its start (Q and K as one group, then V,
// which lands while the scores are formed). It forms the split's scores over the whole head,
// their exponentials against the split's maximum, and the split's share of the output
// (flash-decoding's partial softmax): O_s = Σ_k e^(s_k - m_s) v_k, l_s = Σ_k e^(s_k - m_s).
// The second launch combines a query's splits, O = Σ_s e^(m_s - m) O_s / l with l = Σ_s
// e^(m_s - m) l_s, and rescales the saved exponentials into P by the same factors; where the
// next launch reads O in 16 bits, it writes that copy too (the conversion launch's bits). Grid
// (⌈L/16⌉, ⌈L/32⌉, images x heads): 128 blocks at batch 1 and 256 tokens, 8 at 64.
//
// Products on bf16 mma.sync (m16n8k16) over operands split into bf16 pairs (split_bf16x2:
// three products a step, fp32 sums), about 17 significant bits, so that the attention stays
// near the fp32 products it replaces rather than rounded to 16 bits as the convolutions'
// inputs are. 8 warps: for the scores each takes every eighth k16 step of the head (4 n8 tiles
// of keys) and the warps' partial sums meet in shared memory, added in warp order; for E v each
// takes every eighth n8 tile of the head's columns over the split's 32 keys (2 k16 steps).
//
// Shared memory (floats): Q [16][d + 8], K [32][d + 8], V [32][d + 4], the warps' partial
// scores [8][16][40], the exponentials [16][40]. A half-warp's float2 fragment reads (rows g,
// columns 2q, 2q + 1) hit 32 distinct banks at row pitches of 8 (mod 16) floats (Q, K, the
// scores, the exponentials), and V's B reads (rows 2q, 2q + 1, column g) at 4 (mod 16).
// Needs head_dim % 16 == 0 and head_dim <= 512 (8 n8 tiles a warp; the host's rows_fit).
namespace ar {
constexpr int ROWS = 16;  // queries per block: one m16 tile
constexpr int KEYS = 32;  // keys per block: one split
constexpr int WARPS = 8;
constexpr int THREADS = 32 * WARPS;
constexpr int MAX_D = 8 * 8 * WARPS;  // head width: 8 n8 tiles of E v a warp
constexpr int RP = 40;                // pitch of the partial scores and the exponentials
}  // namespace ar

struct RowsArgs {
    const float* qkv;  // [n, L, 3 inner]: q, k, v side by side; head h at columns h d
    float* part;       // [n heads, splits, L, d]: each split's share of O, unnormalised
    float* ml;         // [n heads, splits, L, 2]: each split's maximum and sum of exponentials
    float* p;          // [n heads, L, L]: the exponentials, then P; null where nothing reads P
    float* y;          // [n, L, inner]: O
    uint16_t* y16;     // [n, L, inner]: O in 16 bits (half_kind), as tc_convert would write it; or null
    int tokens, heads, head_dim, splits;
    float scale;
    int half_kind;     // 1 bf16, 2 fp16 (common.cuh's pack_half2)
};
static_assert(sizeof(RowsArgs) == 72, "RowsArgs must match src/cuda/kernels/attention.rs");

// Dynamic shared memory of attention_rows_split at head width d, bytes (rows_smem in
// src/cuda/kernels/attention.rs has the same formula).
DEVI unsigned rows_smem(int d) {
    return 4u * (48 * (d + 8) + 32 * (d + 4) + (ar::WARPS + 1) * ar::ROWS * ar::RP);
}

DEVI void st_f2(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }

// Rows [row0, row0 + rows) of a head's d columns (row-major at src, pitch ld floats) into
// shared memory at s (pitch `pitch`) by 16-byte cp.async, zeros for rows at or past L: the rows
// kernels' operand copies, from all of a block's threads.
DEVI void rows_load(float* s, int pitch, const float* src, long long ld, int row0, int rows, int L, int d) {
    const int c4 = d / 4;
    for (int e = threadIdx.x; e < rows * c4; e += ar::THREADS) {
        const int r = e / c4, c = (e - r * c4) * 4;
        const bool ok = row0 + r < L;
        cp_async16(smem_addr(s + r * pitch + c), src + (ok ? row0 + r : 0) * ld + c, ok);
    }
}

// The split pair of the two consecutive floats at p (a float2 read).
DEVI void split_at(const float* p, uint32_t& hi, uint32_t& lo) {
    const float2 v = ld_f2(p);
    split_bf16x2(v.x, v.y, hi, lo);
}

// The A fragment of the 16 x 16 block at column k of a row-major fp32 matrix of pitch `pitch`
// in shared memory, split.
DEVI void a_split(const float* s, int pitch, int k, int g, int q, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    const float* a0 = s + g * pitch + k + 2 * q;
    split_at(a0, hi[0], lo[0]);
    split_at(a0 + 8 * pitch, hi[1], lo[1]);
    split_at(a0 + 8, hi[2], lo[2]);
    split_at(a0 + 8 * pitch + 8, hi[3], lo[3]);
}

// This warp's partial sums of A Bᵀ for 16 rows of A and 32 of B (row-major at `pitch` in shared
// memory) over every eighth k16 step of the head, into red[warp] ([16][RP]): the forward's
// scores (q, k) and the backward's dP (dO, v). rows_score_sum adds them after a barrier.
DEVI void rows_partial_scores(const float* as, const float* bs, int pitch, int d, float* red, int warp, int g,
                              int q) {
    using namespace ar;
    float acc[4][4] = {};
    for (int k = 16 * warp; k < d; k += 16 * WARPS) {
        uint32_t ah[4], al[4];
        a_split(as, pitch, k, g, q, ah, al);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const float* b0 = bs + (8 * t + g) * pitch + k + 2 * q;
            uint32_t bh[2], bl[2];
            split_at(b0, bh[0], bl[0]);
            split_at(b0 + 8, bh[1], bl[1]);
            mma_split(acc[t], ah, al, bh, bl);
        }
    }
    float* mine = red + warp * ROWS * RP;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        st_f2(mine + g * RP + 8 * t + 2 * q, acc[t][0], acc[t][1]);
        st_f2(mine + (g + 8) * RP + 8 * t + 2 * q, acc[t][2], acc[t][3]);
    }
}

// The warps' partial sums at (row, columns c, c + 1), added in warp order.
DEVI float2 rows_score_sum(const float* red, int row, int c) {
    using namespace ar;
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        const float2 v = ld_f2(red + (w * ROWS + row) * RP + c);
        s.x += v.x;
        s.y += v.y;
    }
    return s;
}

// Grid (⌈L/16⌉, splits = ⌈L/32⌉, n heads), ar::THREADS threads, rows_smem(d) dynamic shared
// memory. Traps on a launch it cannot serve (a loud failure rather than a write past its
// buffers): less shared memory than it lays out, a head width it does not take, a split count
// that is not ⌈L/32⌉, or a block shape or grid that does not match it.
extern "C" __global__ void __launch_bounds__(ar::THREADS) attention_rows_split(const RowsArgs a) {
    using namespace ar;
    const int d = a.head_dim, L = a.tokens;
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(have));
    if (have < rows_smem(d) || d % 16 != 0 || d > MAX_D || a.splits != (L + KEYS - 1) / KEYS ||
        blockDim.x != THREADS || blockIdx.y >= a.splits)
        __trap();
    extern __shared__ __align__(16) float sm[];
    const int qp = d + 8, vp = d + 4;
    float* qs = sm;                       // [ROWS][qp]
    float* ks = qs + ROWS * qp;           // [KEYS][qp]
    float* vs = ks + KEYS * qp;           // [KEYS][vp]
    float* red = vs + KEYS * vp;          // [WARPS][ROWS][RP]
    float* es = red + WARPS * ROWS * RP;  // [ROWS][RP]
    const int bh = blockIdx.z, img = bh / a.heads, head = bh - img * a.heads;
    const int inner = a.heads * d, split = blockIdx.y;
    const long long ld = 3LL * inner;
    const int r0 = blockIdx.x * ROWS, k0 = split * KEYS;
    const float* base = a.qkv + (long long)img * L * ld + head * d;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;

    rows_load(qs, qp, base, ld, r0, ROWS, L, d);
    rows_load(ks, qp, base + inner, ld, k0, KEYS, L, d);
    cp_async_commit();
    rows_load(vs, vp, base + 2 * inner, ld, k0, KEYS, L, d);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    rows_partial_scores(qs, ks, qp, d, red, warp, g, q);
    __syncthreads();

    // The split's softmax, 16 threads a query (two keys each, the lanes of a half-warp): the
    // warps' sums in warp order, scaled before the maximum as the CPU scales, keys past L
    // masked (the split's first key is inside L, so the maximum is finite).
    {
        const int row = tid >> 4, c = 2 * (tid & 15), qrow = r0 + row;
        const float2 s = rows_score_sum(red, row, c);
        const float sx = k0 + c < L ? s.x * a.scale : -INFINITY;
        const float sy = k0 + c + 1 < L ? s.y * a.scale : -INFINITY;
        float m = fmaxf(sx, sy);
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        const float ex = expf(sx - m), ey = expf(sy - m);
        float l = ex + ey;
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        st_f2(es + row * RP + c, ex, ey);
        if (qrow < L) {
            if (a.p) {
                float* prow = a.p + ((long long)bh * L + qrow) * L + k0 + c;
                if (k0 + c < L) prow[0] = ex;
                if (k0 + c + 1 < L) prow[1] = ey;
            }
            if (c == 0) st_f2(a.ml + (((long long)bh * a.splits + split) * L + qrow) * 2, m, l);
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // O_s = E V: this warp's n8 tiles of columns 8 (warp + 8i), over the split's two k16 steps.
    uint32_t eh[2][4], el[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) a_split(es, RP, 16 * kk, g, q, eh[kk], el[kk]);
    float* out = a.part + (((long long)bh * a.splits + split) * L + r0) * d;
#pragma unroll
    for (int i = 0; i < MAX_D / (8 * WARPS); ++i) {
        const int col = 8 * (warp + WARPS * i);
        if (col >= d) continue;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            const float* b0 = vs + (16 * kk + 2 * q) * vp + col + g;
            uint32_t bh[2], bl[2];
            split_bf16x2(b0[0], b0[vp], bh[0], bl[0]);
            split_bf16x2(b0[8 * vp], b0[9 * vp], bh[1], bl[1]);
            mma_split(acc, eh[kk], el[kk], bh, bl);
        }
        if (r0 + g < L) st_f2(out + g * d + col + 2 * q, acc[0], acc[1]);
        if (r0 + g + 8 < L) st_f2(out + (g + 8) * d + col + 2 * q, acc[2], acc[3]);
    }
}

// Grid (L, n heads), 128 threads: query blockIdx.x of (image, head) blockIdx.y, from the
// splits attention_rows_split wrote. Each thread forms the query's maximum and sum over the
// splits (the same operations in every thread), then its columns of O, the splits added in
// order, and its keys of P.
extern "C" __global__ void __launch_bounds__(128) attention_rows_combine(const RowsArgs a) {
    const int L = a.tokens, d = a.head_dim, splits = a.splits, row = blockIdx.x, bh = blockIdx.y;
    const int img = bh / a.heads, head = bh - img * a.heads;
    const long long stride = 2LL * L;  // from one split's (m, l) of this query to the next's
    const float* ml = a.ml + ((long long)bh * splits * L + row) * 2;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, ml[s * stride]);
    float l = 0.f;
    for (int s = 0; s < splits; ++s) l += expf(ml[s * stride] - m) * ml[s * stride + 1];
    const float inv = 1.0f / l;
    const float* part = a.part + ((long long)bh * splits * L + row) * d;
    const long long y0 = ((long long)img * L + row) * a.heads * d + head * d;
    for (int c = 4 * threadIdx.x; c < d; c += 4 * blockDim.x) {
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < splits; ++s) {
            const float w = expf(ml[s * stride] - m);
            const float4 v = ld_f4(part + (long long)s * L * d + c);
            o.x += w * v.x;
            o.y += w * v.y;
            o.z += w * v.z;
            o.w += w * v.w;
        }
        const float4 v = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
        *reinterpret_cast<float4*>(a.y + y0 + c) = v;
        if (a.y16)
            *reinterpret_cast<uint2*>(a.y16 + y0 + c) =
                make_uint2(pack_half2(v.x, v.y, a.half_kind), pack_half2(v.z, v.w, a.half_kind));
    }
    if (a.p) {
        float* prow = a.p + ((long long)bh * L + row) * L;
        for (int k = threadIdx.x; k < L; k += blockDim.x) prow[k] *= expf(ml[(k / ar::KEYS) * stride] - m) * inv;
    }
}

// The backward pass of attention in rows: two launches instead of the unfused five, over the P
// the forward saved.
//   attention_rows_ds, grid (⌈L/16⌉, ⌈L/32⌉, images x heads) as the forward's split launch:
//     dP = dO vᵀ for the block's 16 queries and 32 keys over the whole head (the forward's
//     scores with dO for q and v for k), D = dO · O per query (FlashAttention's form of
//     rowsum(dP ∘ P), which needs no other split's keys), and dS = P ∘ (dP - D) / √d into the
//     scratch the unfused backward keeps dS in.
//   attention_rows_grads, grid (⌈L/16⌉, 3 x ⌈d/64⌉, images x heads): the three products that
//     remain, each a block's 16 x 64 outputs over the whole of L, in chunks of 64 through a
//     ring of three cp.async stages: dQ = dS k, dK = dSᵀ q, dV = Pᵀ dO. A warp owns one n8
//     tile of the 64 columns. The transposed A operands are staged as they lie (rows of L,
//     pitch 20: the scalar fragment reads at rows 2q, 2q + 1 and column g hit bank 8q + g);
//     row-major A at pitch 72 as the forward's; B at pitch 68 as the forward's V. Where the
//     next launch reads dqkv in 16 bits, it writes that copy too.
// Products split into bf16 pairs as in the forward. Needs head_dim % 16 == 0 and head_dim <=
// 512 (rows_fit); any L.
namespace ag {
constexpr int ROWS = 16, COLS = 64, CHUNK = 64, STAGES = 3;
constexpr int ARP = CHUNK + 8;  // row-major A: [ROWS][ARP]
constexpr int ATP = ROWS + 4;   // transposed A: [CHUNK][ATP]
constexpr int BP = COLS + 4;    // B: [CHUNK][BP]
constexpr int A_STAGE = CHUNK * ATP > ROWS * ARP ? CHUNK * ATP : ROWS * ARP;
constexpr int STAGE = A_STAGE + CHUNK * BP;
}  // namespace ag

struct RowsBwdArgs {
    const float* qkv;   // [n, L, 3 inner]
    const float* o;     // [n, L, inner]: the forward's output
    const float* dout;  // [n, L, inner]: its gradient
    const float* p;     // [n heads, L, L]: P, as the forward saved it
    float* ds;          // [n heads, L, L]: dS
    float* dqkv;        // [n, L, 3 inner]
    uint16_t* dqkv16;   // [n, L, 3 inner]: dqkv in 16 bits (half_kind) as tc_convert would write it; or null
    int tokens, heads, head_dim, accumulate;
    float scale;
    int half_kind;      // 1 bf16, 2 fp16
};
static_assert(sizeof(RowsBwdArgs) == 80, "RowsBwdArgs must match src/cuda/kernels/attention.rs");

// Dynamic shared memory of the two backward kernels, bytes (src/cuda/kernels/attention.rs
// rows_ds_smem and ROWS_GRADS_SMEM).
DEVI unsigned rows_ds_smem(int d) { return 4u * (64 * (d + 8) + ar::WARPS * ar::ROWS * ar::RP + ar::ROWS); }
constexpr unsigned ROWS_GRADS_SMEM = 4u * ag::STAGES * ag::STAGE;  // 67,584

// Grid (⌈L/16⌉, ⌈L/32⌉, n heads), ar::THREADS threads, rows_ds_smem(d) dynamic shared memory.
extern "C" __global__ void __launch_bounds__(ar::THREADS) attention_rows_ds(const RowsBwdArgs a) {
    using namespace ar;
    const int d = a.head_dim, L = a.tokens;
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(have));
    if (have < rows_ds_smem(d) || d % 16 != 0 || d > MAX_D || blockDim.x != THREADS ||
        gridDim.y != (unsigned)((L + KEYS - 1) / KEYS))
        __trap();
    extern __shared__ __align__(16) float sm[];
    const int pitch = d + 8;
    float* dos = sm;                       // [ROWS][pitch]: the queries' output gradients
    float* os = dos + ROWS * pitch;        // [ROWS][pitch]: their outputs
    float* vs = os + ROWS * pitch;         // [KEYS][pitch]: the split's values
    float* red = vs + KEYS * pitch;        // [WARPS][ROWS][RP]
    float* dsum = red + WARPS * ROWS * RP; // [ROWS]: D
    const int bh = blockIdx.z, img = bh / a.heads, head = bh - img * a.heads;
    const int inner = a.heads * d;
    const long long ld = 3LL * inner;
    const int r0 = blockIdx.x * ROWS, k0 = blockIdx.y * KEYS;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;

    const long long rows0 = (long long)img * L * inner + head * d;
    rows_load(dos, pitch, a.dout + rows0, inner, r0, ROWS, L, d);
    rows_load(vs, pitch, a.qkv + (long long)img * L * ld + 2 * inner + head * d, ld, k0, KEYS, L, d);
    cp_async_commit();
    rows_load(os, pitch, a.o + rows0, inner, r0, ROWS, L, d);
    cp_async_commit();
    // This thread's two keys of P for the dS step, loaded now.
    const int row = tid >> 4, c = 2 * (tid & 15), qrow = r0 + row;
    float p0 = 0.f, p1 = 0.f;
    if (qrow < L) {
        const float* prow = a.p + ((long long)bh * L + qrow) * L + k0 + c;
        if (k0 + c < L) p0 = prow[0];
        if (k0 + c + 1 < L) p1 = prow[1];
    }
    cp_async_wait<1>();
    __syncthreads();

    // dP, as the forward's scores.
    rows_partial_scores(dos, vs, pitch, d, red, warp, g, q);
    cp_async_wait<0>();
    __syncthreads();
    // D per query, a warp per two rows.
    for (int r = warp; r < ROWS; r += WARPS) {
        float s = 0.f;
        for (int c4 = 4 * lane; c4 < d; c4 += 128) {
            const float4 x = ld_f4(dos + r * pitch + c4), y = ld_f4(os + r * pitch + c4);
            s += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
        }
        s = warp_sum(s);
        if (lane == 0) dsum[r] = s;
    }
    __syncthreads();
    const float2 dp = rows_score_sum(red, row, c);
    if (qrow < L) {
        const float D = dsum[row];
        float* dsrow = a.ds + ((long long)bh * L + qrow) * L + k0 + c;
        if (k0 + c < L) dsrow[0] = p0 * (dp.x - D) * a.scale;
        if (k0 + c + 1 < L) dsrow[1] = p1 * (dp.y - D) * a.scale;
    }
}

// Grid (⌈L/16⌉, 3 x ⌈d/64⌉: dQ's column chunks, dK's, dV's, n heads), ar::THREADS threads,
// ROWS_GRADS_SMEM dynamic shared memory; after attention_rows_ds.
extern "C" __global__ void __launch_bounds__(ar::THREADS) attention_rows_grads(const RowsBwdArgs a) {
    using namespace ag;
    const int d = a.head_dim, L = a.tokens;
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(have));
    const int col_chunks = (d + COLS - 1) / COLS;
    if (have < ROWS_GRADS_SMEM || d % 16 != 0 || blockDim.x != ar::THREADS || gridDim.y != 3u * col_chunks) __trap();
    extern __shared__ __align__(16) float sm[];
    const int prod = blockIdx.y / col_chunks, bh = blockIdx.z;
    const int img = bh / a.heads, head = bh - img * a.heads;
    const int inner = a.heads * d;
    const long long ld = 3LL * inner;
    const int r0 = blockIdx.x * ROWS, c0 = (blockIdx.y - prod * col_chunks) * COLS;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
    // A: dS by rows (dQ), dS by columns (dK), P by columns (dV); B: k (dQ), q (dK), dO (dV).
    const bool trans = prod != 0;
    const float* amat = (prod == 2 ? a.p : a.ds) + (long long)bh * L * L;
    const float* bmat = prod == 2 ? a.dout + (long long)img * L * inner + head * d + c0
                                  : a.qkv + (long long)img * L * ld + (prod == 0 ? inner : 0) + head * d + c0;
    const long long bld = prod == 2 ? inner : ld;
    const int chunks = (L + CHUNK - 1) / CHUNK;

    // Chunk ch of L (A's columns, B's rows) into stage ch % STAGES, zeros past L and d; one
    // commit group per call, empty past the last chunk, so that a wait counts chunks.
    auto issue = [&](int ch) {
        if (ch < chunks) {
            float* as = sm + (ch % STAGES) * STAGE;
            float* bs = as + A_STAGE;
            const int k0 = ch * CHUNK;
            for (int e = tid; e < ROWS * CHUNK; e += ar::THREADS) {
                // Consecutive threads along A's rows in memory: k (by rows), j (by columns).
                const int i = trans ? e % ROWS : e / CHUNK, k = trans ? e / ROWS : e % CHUNK;
                const bool ok = r0 + i < L && k0 + k < L;
                const long long src = trans ? (long long)(k0 + k) * L + r0 + i : (long long)(r0 + i) * L + k0 + k;
                cp_async4(smem_addr(as + (trans ? k * ATP + i : i * ARP + k)), amat + (ok ? src : 0), ok);
            }
            for (int e = tid; e < CHUNK * (COLS / 4); e += ar::THREADS) {
                const int k = e / (COLS / 4), cc = (e % (COLS / 4)) * 4;
                const bool ok = k0 + k < L && c0 + cc < d;
                cp_async16(smem_addr(bs + k * BP + cc), bmat + (ok ? (k0 + k) * bld + cc : 0), ok);
            }
        }
        cp_async_commit();
    };
    for (int ch = 0; ch < STAGES - 1; ++ch) issue(ch);

    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const int nt = 8 * warp;  // this warp's columns in the block's 64
    for (int ch = 0; ch < chunks; ++ch) {
        // The stage this refills was last read in the previous step, before its closing barrier.
        issue(ch + STAGES - 1);
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        const float* as = sm + (ch % STAGES) * STAGE;
        const float* bs = as + A_STAGE;
#pragma unroll
        for (int kk = 0; kk < CHUNK; kk += 16) {
            uint32_t ah[4], al[4];
            if (trans) {
                // A(i, k) = as[k][i]: rows g, g + 8; k = kk + 2q, + 1, + 8, + 9.
                const float* a0 = as + (kk + 2 * q) * ATP + g;
                split_bf16x2(a0[0], a0[ATP], ah[0], al[0]);
                split_bf16x2(a0[8], a0[ATP + 8], ah[1], al[1]);
                split_bf16x2(a0[8 * ATP], a0[9 * ATP], ah[2], al[2]);
                split_bf16x2(a0[8 * ATP + 8], a0[9 * ATP + 8], ah[3], al[3]);
            } else {
                a_split(as, ARP, kk, g, q, ah, al);
            }
            const float* b0 = bs + (kk + 2 * q) * BP + nt + g;
            uint32_t bh[2], bl[2];
            split_bf16x2(b0[0], b0[BP], bh[0], bl[0]);
            split_bf16x2(b0[8 * BP], b0[9 * BP], bh[1], bl[1]);
            mma_split(acc, ah, al, bh, bl);
        }
        __syncthreads();
    }
    if (c0 + nt >= d) return;
    const long long out0 = (long long)img * L * ld + prod * inner + head * d + c0 + nt + 2 * q;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r0 + g + 8 * r;
        if (row >= L) continue;
        const long long at = out0 + row * ld;
        float2* o = reinterpret_cast<float2*>(a.dqkv + at);
        float2 v = make_float2(acc[2 * r], acc[2 * r + 1]);
        if (a.accumulate) {
            const float2 old = *o;
            v.x += old.x;
            v.y += old.y;
        }
        *o = v;
        if (a.dqkv16) *reinterpret_cast<uint32_t*>(a.dqkv16 + at) = pack_half2(v.x, v.y, a.half_kind);
    }
}
