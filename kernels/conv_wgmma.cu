// Convolutions on Hopper's warpgroup tensor cores (wgmma; sm_90a only, build.rs compiles this
// file for that target alone and the host loads it on compute capability 9.0 only): the
// implicit GEMM of conv_tc.cu for its `_hin` case, bf16/fp16 activations and weights with fp32
// accumulation, the same ConvArgs, split-K workspace and epilogue. mma.sync (conv_tc.cu) feeds
// the tensor cores from registers that every warp first loads from shared memory; wgmma reads
// both operands from shared memory itself, which is what lets Hopper approach its matrix rate.
//
// Tile: 128 output rows (pixels) x 128 columns (output channels) per block of two warpgroups
// (256 threads); warpgroup w multiplies rows 64w .. 64w + 63 against all 128 columns with
// m64n128k16 (64 fp32 accumulators per thread). Two blocks per multiprocessor. K slices of 64
// 16-bit values (128 bytes). (256-row tiles, each warpgroup two m64n128k16 sharing B, four
// stages and one block per multiprocessor, ran 1.6-1.8x slower on an H200, and were removed;
// the tall tile, WgTile<256>, brings 256 rows back as four warpgroups of this kind.)
//
// Shared memory: WG_STAGES stages of [A 128 rows x 128 bytes | B 128 rows x 128 bytes], both
// K-major (a row holds one pixel's, or one output channel's, 64 consecutive k), in the 128-byte
// swizzle wgmma reads: the 16-byte chunk c of row r lives at r * 128 + ((c ^ (r % 8)) * 16),
// each 8-row group a 1024-byte aligned block. Descriptors: start address, stride 1024 bytes
// between 8-row groups, swizzle mode 1; a k16 step advances the start by 32 bytes within the
// row (the hardware applies the swizzle to the address it forms, which is why the blocks must
// be 1024-byte aligned). The weights are read K-major, `[tap][column][channel]`: the per-tap
// transpose of the layout conv_tc.cu reads, i.e. the other direction's weights (the forward
// convolution reads the input-gradient layout and vice versa; a linear layer reads PyTorch's
// `[out, inp]`), so no extra copy exists.
//
// Pipeline: every thread copies 4 A and 4 B chunks per slice with cp.async (zero-filled
// outside the image, past the split's K and past the columns). Per slice: wait for its copies,
// fence them into the async proxy wgmma reads through, barrier, refill the stage whose products
// are known complete, then four wgmma steps, committed, leaving that batch in flight while the
// next slice is issued (wait_group 1). Of the three stages one is being multiplied, one may
// still be read by the previous batch, and one is loading: one slice of copies ahead, the
// other block on the multiprocessor hiding the rest. (Waiting for each batch instead, with two
// slices of copies ahead, measured 1-1.5% slower on an H200: bf16 forward b8 26.15 vs 25.88
// ms, b32 96.09 vs 94.64 ms.)
//
// TMA (the `_tma` kernels, INVDIFF_WGMMA_TMA): one thread issues each slice as two bulk tensor
// copies (the tensor memory accelerator), an im2col copy of the A rows and a tiled copy of the
// B rows, whose bytes complete the stage's mbarrier; the other threads issue no copies at all.
// The products are the cp.async kernels', so the bits are theirs; so is the barrier protocol,
// with one slice more of copies in flight in the plain tile (wg_body).
// Why: with cp.async every thread spends 186-346 instructions a slice forming addresses, and
// the stop-16 cycle probe put 36-57% of a block's cycles there, against 7-17% in the products.
// Why not the usual producer and per-stage `empty` barriers, which would keep every stage in
// flight: with the producer waiting in a loop inside a consumer warpgroup while products are
// in flight, ptxas serialises every wgmma (C7518); with an extra producer warp the consumers
// get 96 registers, whose spills serialise them too (C7515). A producer warpgroup that hands
// its registers over (setmaxnreg) is untried: it needs a fifth warpgroup's worth of threads.
//
// GroupNorm sums (a.gn_partial, the lean and TMA kernels, unsplit; INVDIFF_GN_PRODUCER_SUMS):
// the epilogue also stages its finished values in the drained stages and sums each column over
// the tile's rows (wg_stats), in norm.cu's partial-sum layout, so that the GroupNorm that reads
// the output skips its own pass over it. A run-time choice: launches without it still test
// the staging pointer once per pair in the epilogue (finish_row) and take 126-128 registers
// instead of 118 (no spills, the same blocks a multiprocessor).
//
// Fused 1x1 shortcut (the `_sc` kernels, lean and TMA; INVDIFF_SHORTCUT_FUSED): a residual
// block's second convolution also multiplies the block's input (a second 16-bit source at the
// same pixels) by its 1x1 shortcut's weights, as K slices after its own taps, into the same
// accumulators; the host sums the two biases, and the residual the shortcut's own launch wrote
// and the epilogue read back is gone. Both sources' channels are multiples of 64, so no slice
// straddles them and a slice's copies come from one source: in the lean loaders each thread
// moves its row pointers to the second source once, when its cursor passes the last tap; in
// the TMA kernels thread 0 switches maps (the second im2col map has the first's pixel box, so
// the walk's bases are the same, and copies the tap at offset 0, 0).
//
// Staged epilogue (the `_st` kernels, TMA, unsplit; INVDIFF_EPI_STAGED): v0.7's cycle probe put
// the epilogue at 46-52% of a warpgroup's cycles in the large 3x3 launches, and halving the
// bytes of some of its stores (16-bit outputs) gained under 1%: it looks bound by its memory
// instructions, each warp access of the fragment spread over 8 pixels. These kernels stage the
// tile in the drained stages and finish whole rows with 16-byte accesses (wg_epilogue_staged),
// the same arithmetic per value. They compose with the fused shortcut (`_tma_sc_st`): the
// epilogue only starts once every copy into the stages has landed. The GroupNorm sums read the
// finished values where the fragment epilogue would have staged them.
//
// Accumulator fragment (PTX ISA, "wgmma .m64nNk16 register fragment for D"): warp v of a
// warpgroup holds rows 16v .. 16v + 15; d[4j + e] is row g (+8 for e >= 2), column 8j + 2q + e % 2
// (g = lane / 4, q = lane % 4): mma.sync's C fragment, once per 8 columns.
#include "conv_common.cuh"

constexpr int WG_TN = 128;
constexpr int WG_BK = 64;
constexpr int WG_STAGES = 3;
constexpr int WG_TILE = 128 * 128;  // bytes of one operand's slice
constexpr int WG_STAGE = 2 * WG_TILE;
// Dynamic shared memory: the stages plus slack to align them to 1024 bytes.
constexpr int WG_SMEM = WG_STAGES * WG_STAGE + 1024;
static_assert(WG_SMEM == 99328, "WG_SMEM must match WgmmaTile::smem in src/cuda/kernels/conv_plan.rs");

// The tall tile (`_tall` kernels, a default since the H200 run of v0.5): 256 rows x 128 columns per
// block of four warpgroups (512 threads, one block per multiprocessor), four stages of 48 KB,
// two slices of copies ahead. The v0.4 b8 profile moves 4.4-4.8 TB/s of operands from L2 in the
// long-K convolutions (each block's slice: 16 KB of A and 16 KB of B for 2 MFLOP), about what
// the L2 delivers: 256 rows share each B slice over twice the products, 85 instead of 64 FLOP
// per byte. (The 256-row attempt of v0.3, two warpgroups of 128 accumulators, lost 1.6-1.8x;
// with one block per multiprocessor nothing hid its pair-by-pair epilogue, which the row
// epilogue now shortens.)
template <int TM> struct WgTile {
    static_assert(TM == 128 || TM == 256, "128- or 256-row tiles");
    static constexpr int THREADS = 2 * TM;
    static constexpr int STAGES = TM == 128 ? WG_STAGES : 4;
    static constexpr int STAGE = TM * 128 + WG_TILE;  // A rows, then B's 128
    static constexpr int SMEM = STAGES * STAGE + 1024;
    static constexpr int BLOCKS_PER_SM = 2 * SMEM <= 227 * 1024 ? 2 : 1;
};
using PlainTile = WgTile<128>;
using TallTile = WgTile<256>;
static_assert(PlainTile::SMEM == WG_SMEM && PlainTile::BLOCKS_PER_SM == 2, "the plain kernels' tile");
static_assert(TallTile::SMEM == 197632, "TallTile::SMEM must match WgmmaTile::smem in src/cuda/kernels/conv_plan.rs");

// Where chunk c (16 bytes) of row r of a swizzled operand tile lives, from the tile's start.
DEVI uint32_t swz(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }

// A shared-memory matrix descriptor: 128-byte swizzle, 1024 bytes between 8-row groups.
DEVI uint64_t wg_desc(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

// A tensor map (cuda.h's CUtensorMap: 128 opaque bytes, 64-byte aligned) that the host encodes
// (src/cuda/kernels/tma.rs); kernels take it as a __grid_constant__ parameter and give the
// copies its address.
struct alignas(64) TmaMap {
    unsigned long long opaque[16];
};
static_assert(sizeof(TmaMap) == 128, "TmaMap must match TensorMap in src/cuda/kernels/tma.rs");

// What the `_tma` kernels' copies need besides the stage: the two maps, and the im2col
// coordinates of the tile's first row. The A map's pixel box has its lower corner at the
// smallest tap offsets (dy0, dx0), so row m's filter base is its output pixel (times the input
// stride, the map's traversal stride) shifted by them and a tap's im2col offsets (dx - dx0,
// dy - dy0) are never negative; the box holds as many bases a row and rows as the launch's
// output grid (mw x mh), so the copy's walk over the box's bases, row by row and image by
// image, visits the GEMM's rows in their order (PTX ISA, "Tensor im2col mode").
struct TmaLoads {
    const TmaMap* a;  // im2col map of x [n, sh, sw, sc], 64 channels x TM pixels a copy
    const TmaMap* b;  // tiled map of w [blocks, ncols, sc], a box of 64 x 128 x 1
    // The `_sc` kernels: the same two of the shortcut's source and weights (Shortcut).
    const TmaMap* a2;
    const TmaMap* b2;
};

// The fused shortcut's operands (the `_sc` kernels): its source x2 [n, sh, sw, sc] (16-bit, the
// pixels of ConvArgs::x) and K-major weights [ncols, sc] (16-bit); sc a multiple of 64, as is
// the main source's.
struct Shortcut {
    const void* x;
    const void* w;
    int sc;
};
static_assert(sizeof(Shortcut) == 24, "Shortcut must match ShortcutArgs in src/cuda/kernels/conv.rs");

DEVI void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// One arrival that also expects `bytes` of copies before the phase completes.
DEVI void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Cycles a copy may keep a stage's barrier waiting (about 2 s) before mbar_wait traps.
constexpr long long MBAR_TIMEOUT_CYCLES = 4LL << 30;
// Waits until phase `parity` of the barrier has completed. Copies whose bytes never arrive (a
// tensor map that does not describe what the kernel expects) would otherwise hang the device
// until the host gives up; a trap fails the launch with an error instead, in seconds.
DEVI void mbar_wait(uint32_t bar, uint32_t parity) {
    long long since = 0;
    for (;;) {
        uint32_t done;
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
        if (done) return;
        const long long now = clock64();
        if (since == 0)
            since = now;
        else if (now - since > MBAR_TIMEOUT_CYCLES)
            __trap();
    }
}
// The im2col copy of 64 channels from c0 of the pixels the map's walk visits from filter base
// (w, h) of image n, shifted by the tap's offsets (ow, oh); zeros outside the image and past the
// batch.
DEVI void tma_im2col(uint32_t dst, const TmaMap* map, uint32_t bar, int c0, int w, int h, int n, uint16_t ow,
                     uint16_t oh) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.im2col.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5, %6}], [%2], {%7, %8};\n" ::"r"(dst),
        "l"(map), "r"(bar), "r"(c0), "r"(w), "r"(h), "r"(n), "h"(ow), "h"(oh)
        : "memory");
}
// The tiled copy of the box at (c0, row, block) of a three-dimensional map; zeros outside it.
DEVI void tma_tile3(uint32_t dst, const TmaMap* map, uint32_t bar, int c0, int row, int block) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
        "l"(map), "r"(bar), "r"(c0), "r"(row), "r"(block)
        : "memory");
}

// By the thread that initialised a launch's mbarriers: the barriers visible to the copies (the
// async proxy) that complete them, and the tensor maps (SC: the shortcut's too) fetched ahead of
// the first copies.
template <bool SC> DEVI void tma_ready(const TmaLoads& tma) {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(tma.a) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(tma.b) : "memory");
    if constexpr (SC) {
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(tma.a2) : "memory");
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(tma.b2) : "memory");
    }
}

// Thread 0's copies of one slice into the stage at `sa`, completing `bar`: tap `at`'s 64
// channels from `aci` of the input window at (bw, bh) of image `img` and the matching weight
// rows for columns n0..; with SC, tap a.taps is the shortcut's own pixel (offset (0, 0) from
// the window's corner) and its weights. Out-of-bounds pixels and columns arrive as zeros, so
// every copy writes its whole box.
template <bool SC, int TM, int STAGE>
DEVI void tma_slice(const ConvArgs& a, const TmaLoads& tma, const Taps& taps, const Window& win, uint32_t sa,
                    uint32_t bar, int at, int aci, int bw, int bh, int img, int n0) {
    mbar_expect_tx(bar, STAGE);
    if (SC && at >= a.taps) {
        tma_im2col(sa, tma.a2, bar, aci, bw, bh, img, (uint16_t)(-win.dx0), (uint16_t)(-win.dy0));
        tma_tile3(sa + TM * 128, tma.b2, bar, aci, n0, 0);
    } else {
        tma_im2col(sa, tma.a, bar, aci, bw, bh, img, (uint16_t)(taps.dx[at] - win.dx0),
                   (uint16_t)(taps.dy[at] - win.dy0));
        tma_tile3(sa + TM * 128, tma.b, bar, aci, n0, taps.w[at]);
    }
}

// The epilogue's reads of rows m0.. (the residual, and the old output where it accumulates)
// into L2 by `threads` threads, `tid` among them: a line at each 32 of the row's 128 columns
// (four lines where ncols is a multiple of 32; a hint, so a line left out costs only its miss),
// so that they overlap the products instead of following them.
template <int TM>
DEVI void prefetch_epilogue_rows(const ConvArgs& a, int M, int m0, int n0, int tid, int threads) {
    for (int i = tid; i < TM * 4; i += threads) {
        const int m = m0 + i / 4, col = n0 + 32 * (i & 3);
        if (m >= M || col >= a.ncols) continue;
        const long long off = out_pixel(a, decode_row(a, m)) * a.ncols + col;
        if (a.res != nullptr) prefetch_l2(a.res + off);
        if (a.accumulate) prefetch_l2(a.y + off);
    }
}

// Pins the accumulators in program order around the asynchronous products: the compiler sees
// wgmma's register operands written when it is issued, not when wgmma.wait_group returns.
DEVI void wg_fence_acc(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int T> DEVI void wg_mma(float (&d)[64], uint64_t da, uint64_t db);
// m64n128k16 with fp32 accumulators for operands of type TY (bf16 or f16), both from shared
// memory through their descriptors, scaling D by 1 (accumulate).
#define WG_MMA(T, TY)                                                                              \
    template <> DEVI void wg_mma<T>(float (&d)[64], uint64_t da, uint64_t db) {                     \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                  \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                  \
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"  \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
                     : "l"(da), "l"(db), "r"(1));                                                  \
    }
WG_MMA(1, "bf16")
WG_MMA(2, "f16")
#undef WG_MMA

// Where a block's cycles go (the `_probe` kernels, for `kernels_cuda --sweep`; the GPU
// machines have no profiler): each thread reads the multiprocessor's cycle counter at the
// borders of wg_body's phases and adds the time since the last border to that phase; the first
// thread of each warpgroup adds its sums to the launch's counters at the end. The phases:
// set-up (taps, row decoding, the first copies), waiting for this thread's copies of a slice
// (their latency), the block's barrier after it (the other threads' copies and products),
// issuing the next slice's copies, issuing the products and waiting for the batch before, the
// drain after the last slice, the epilogue. Compiled out of the ordinary kernels.
enum {
    PROBE_SETUP,
    PROBE_COPY_WAIT,
    PROBE_BARRIER,
    PROBE_ISSUE,
    PROBE_MMA,
    PROBE_DRAIN,
    PROBE_EPILOGUE,
    PROBE_PHASES
};
// Counters of one launch: PROBE_PHASES sums of cycles, then the number of warpgroups, then
// the number of K slices they multiplied.
constexpr int PROBE_COUNTERS = PROBE_PHASES + 2;
static_assert(PROBE_COUNTERS == 9, "PROBE_COUNTERS must match WGMMA_PROBE_COUNTERS in src/cuda/kernels/conv.rs");

template <bool ON> struct Probe {
    DEVI void start() {}
    DEVI void mark(int) {}
    DEVI void flush(unsigned long long*, int) {}
};
template <> struct Probe<true> {
    long long last;
    long long sum[PROBE_PHASES];
    DEVI void start() {
#pragma unroll
        for (int i = 0; i < PROBE_PHASES; ++i) sum[i] = 0;
        last = clock64();
    }
    DEVI void mark(int phase) {
        const long long now = clock64();
        sum[phase] += now - last;
        last = now;
    }
    DEVI void flush(unsigned long long* out, int slices) {
        if (out == nullptr || threadIdx.x % 128 != 0) return;
#pragma unroll
        for (int i = 0; i < PROBE_PHASES; ++i) atomicAdd(out + i, (unsigned long long)sum[i]);
        atomicAdd(out + PROBE_PHASES, 1ull);
        atomicAdd(out + PROBE_PHASES + 1, (unsigned long long)slices);
    }
};

// The mainloop's pieces. The top of an iteration: this thread's copies of
// the step issued AHEAD iterations earlier have landed and are visible to wgmma (the async
// proxy), and after the barrier so are every other thread's.
template <int AHEAD, bool PROBE> DEVI void wg_step_ready(Probe<PROBE>& cycles) {
    cp_async_wait<AHEAD - 1>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    cycles.mark(PROBE_COPY_WAIT);
    __syncthreads();
    cycles.mark(PROBE_BARRIER);
}

// One batch of products (`issue` calls wg_mma for the step), committed as a group and left in
// flight while the next step is set up; the batch before it is complete on return.
template <class Issue> DEVI void wg_batch(float (&acc)[64], Issue issue) {
    wg_fence_acc(acc);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    issue();
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    wg_fence_acc(acc);
}

// Every batch of this warpgroup's products complete.
DEVI void wg_wait_all(float (&acc)[64]) {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    wg_fence_acc(acc);
}

// After the last step: every product and copy complete before the epilogue reads the
// accumulators or reuses the stages.
DEVI void wg_drain(float (&acc)[64]) {
    wg_wait_all(acc);
    cp_async_wait<0>();
}

// Pairs of a row finish_row takes at once in the ROWS epilogue (8 at once spilled 40 bytes at
// the 128 registers that two blocks per multiprocessor leave each thread).
constexpr int ROW_PAIRS = 4;

// Floats between the rows of a tile's finished values staged for wg_stats: 8 more than the
// 128 columns, so that the 8 rows a warp's store covers fall in different banks.
constexpr int STATS_PITCH = WG_TN + 8;

// The epilogue of a block's accumulators, warpgroup w holding rows m0 + 64w .. m0 + 64w + 63
// against columns n0 .. n0 + 127: raw partial sums into the workspace when K is split
// (`split`), else finished into y, pair by pair (store_pair) or ROW_PAIRS pairs of a row at a
// time (ROWS: finish_row; with LEAN, no division by an out_div of 1, and where `keep` is not
// null the finished values also staged there, row r - m0 at keep + (r - m0) * STATS_PITCH).
template <bool ROWS, bool LEAN>
DEVI void wg_epilogue(const ConvArgs& a, const float (&acc)[64], int M, int m0, int n0, bool split,
                      float* keep = nullptr) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2;
    const int q = lane & 3;
    const int row0 = m0 + (warp >> 2) * 64 + (warp & 3) * 16 + g;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int m = row0 + 8 * h;
        if (m >= M) continue;
        const RowCoord rc = decode_row(a, m);
        const long long pix = out_pixel(a, rc);
        if (ROWS && !split) {
#pragma unroll
            for (int part = 0; part < 16 / ROW_PAIRS; ++part) {
                float2 v[ROW_PAIRS];
#pragma unroll
                for (int j = 0; j < ROW_PAIRS; ++j) {
                    const int jj = ROW_PAIRS * part + j;
                    v[j] = make_float2(acc[4 * jj + 2 * h], acc[4 * jj + 2 * h + 1]);
                }
                const int col0 = 8 * ROW_PAIRS * part + 2 * q;
                float* kept = LEAN && keep != nullptr ? keep + (m - m0) * STATS_PITCH + col0 : nullptr;
                finish_row<ROW_PAIRS, LEAN, LEAN>(a, rc.img, pix, n0 + col0, v, kept);
            }
            continue;
        }
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int col = n0 + 8 * j + 2 * q;
            if (col >= a.ncols) continue;
            store_pair(a, split, M, m, rc, pix, col, make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]));
        }
    }
}

// The unsplit epilogue of the STAGED kernels (the `_st` kernels, TMA; see wg_body): ROWS and
// LEAN's arithmetic per value (finish_row: (bias + time embedding + residual) + acc, then the
// division unless by 1, then the old output), through shared memory. Every thread first stores
// its accumulators in the drained stages at `stage` (row r - m0 at stage + (r - m0) *
// STATS_PITCH, as wg_stats reads them; the caller synchronised after the products); then each
// warp finishes whole rows, a lane four consecutive columns, so that every load and store is a
// 16-byte access and a warp's covers 512 contiguous bytes of one pixel, where the fragment's
// 8-byte accesses spread a warp's over 8 pixels (8 lines an instruction, 32 instructions a
// thread). U rows' loads go ahead of their arithmetic. Where `sums`, the finished values go
// back in place for wg_stats. Needs ncols % 4 == 0 and 16-byte aligned bias, temb, res and y,
// which the host checks for every tensor-core launch (the tensor-core kernels have no
// unaligned fallback). Where a.y16 or a.copy16 is not null, each finished value also goes there
// rounded to T's 16 bits as pack_half2 rounds them, as a conversion launch would (a producer
// writing its side of a concatenation, INVDIFF_CONCAT_FROM_PRODUCERS, y16_stride and y16_offset
// multiples of 4; a copy, INVDIFF_EPI_HALF_COPIES; both 8-byte aligned), and a null a.y stores
// no fp32 value (never with accumulate, which the host checks).
template <int T, int TM>
DEVI void wg_epilogue_staged(const ConvArgs& a, const float (&acc)[64], int M, int m0, int n0, float* stage,
                             bool sums) {
    constexpr int WARPS = WgTile<TM>::THREADS / 32;
    constexpr int U = 4;
    static_assert(TM % (WARPS * U) == 0, "whole units of rows a warp");
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int lr0 = (warp >> 2) * 64 + (warp & 3) * 16 + (lane >> 2);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < 16; ++j)
            *reinterpret_cast<float2*>(stage + (lr0 + 8 * h) * STATS_PITCH + 8 * j + 2 * (lane & 3)) =
                make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
    __syncthreads();
    const int col = n0 + 4 * lane;
    if (col >= a.ncols) return;
    const bool epi = a.bias != nullptr || a.temb != nullptr || a.res != nullptr;
    const bool divide = a.out_div != 1.0f;
    // Each lane finds 16 rows' pixels, where the fragment finds 2: without decode_row's two
    // divisions where the output grid is the rows' own (out_pixel(decode_row(m)) == m).
    const bool own_grid = a.out_stride == 1 && a.out_oy == 0 && a.out_ox == 0 && a.yh == a.mh && a.yw == a.mw;
    const int per = a.mh * a.mw;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 bias = a.bias != nullptr ? *reinterpret_cast<const float4*>(a.bias + col) : zero;
    auto add = [](float4 p, float4 q) { return make_float4(p.x + q.x, p.y + q.y, p.z + q.z, p.w + q.w); };
    for (int r0 = warp; r0 < TM; r0 += WARPS * U) {
        float4 v[U], e[U], old[U];
        long long px[U];  // each row's output pixel, -1 past M
#pragma unroll
        for (int k = 0; k < U; ++k) {
            const int r = r0 + WARPS * k, m = m0 + r;
            px[k] = -1;
            if (m >= M) continue;
            long long pix = m;
            int img = 0;
            if (!own_grid) {
                const RowCoord rc = decode_row(a, m);
                pix = out_pixel(a, rc);
                img = rc.img;
            } else if (a.temb != nullptr) {
                img = m / per;
            }
            px[k] = pix;
            v[k] = *reinterpret_cast<const float4*>(stage + r * STATS_PITCH + 4 * lane);
            e[k] = bias;
            if (a.temb != nullptr)
                e[k] = add(e[k], *reinterpret_cast<const float4*>(a.temb + (long long)img * a.ncols + col));
            const long long el = pix * a.ncols + col;
            if (a.res != nullptr) e[k] = add(e[k], *reinterpret_cast<const float4*>(a.res + el));
            old[k] = a.accumulate ? *reinterpret_cast<const float4*>(a.y + el) : zero;
        }
#pragma unroll
        for (int k = 0; k < U; ++k) {
            if (px[k] < 0) break;
            float4 w = v[k];
            if (epi) w = add(e[k], w);
            if (divide) w = make_float4(w.x / a.out_div, w.y / a.out_div, w.z / a.out_div, w.w / a.out_div);
            if (a.accumulate) w = add(w, old[k]);
            if (a.y != nullptr) *reinterpret_cast<float4*>(a.y + px[k] * a.ncols + col) = w;
            if (a.y16 != nullptr || a.copy16 != nullptr) {
                const uint2 h = make_uint2(pack_half2(w.x, w.y, T), pack_half2(w.z, w.w, T));
                if (a.y16 != nullptr)
                    *reinterpret_cast<uint2*>(a.y16 + px[k] * a.y16_stride + a.y16_offset + col) = h;
                if (a.copy16 != nullptr) *reinterpret_cast<uint2*>(a.copy16 + px[k] * a.ncols + col) = h;
            }
            if (sums) *reinterpret_cast<float4*>(stage + (r0 + WARPS * k) * STATS_PITCH + 4 * lane) = w;
        }
    }
}

// The GroupNorm partial sums of a block's finished output (a.gn_partial; the lean kernels,
// unsplit, for a launch whose output a GroupNorm reads next): per column, the f64 sum and sum
// of squares over the tile's TM rows, in kernels/norm.cu's layout with one chunk per tile
// (chunk = the tile's place in its image; the host sends only launches whose images are whole
// tiles, output rows in pixel order), so that the GroupNorm skips its own pass over the
// output (gn_partial). The values come staged in `keep` (by wg_epilogue, or written back by
// wg_epilogue_staged); PARTS threads per column each add a run of rows in order, then the first
// adds the runs in order.
template <int TM>
DEVI void wg_stats(const ConvArgs& a, float* keep, int M, int m0, int n0) {
    constexpr int PARTS = 2 * TM / WG_TN;
    constexpr int RUN = TM / PARTS;
    static_assert(TM * STATS_PITCH * 4 + PARTS * WG_TN * 16 <= WgTile<TM>::STAGES * WgTile<TM>::STAGE,
                  "the staged values and the runs' sums fit in the stages");
    double2* runs = reinterpret_cast<double2*>(keep + TM * STATS_PITCH);
    const int col = threadIdx.x % WG_TN, part = threadIdx.x / WG_TN;
    const int rows = min(TM, M - m0);
    // Every thread's values staged.
    __syncthreads();
    double s = 0.0, q = 0.0;
    for (int r = part * RUN; r < min(rows, (part + 1) * RUN); ++r) {
        const double v = (double)keep[r * STATS_PITCH + col];
        s += v;
        q += v * v;
    }
    runs[part * WG_TN + col] = make_double2(s, q);
    __syncthreads();
    if (part != 0 || n0 + col >= a.ncols) return;
#pragma unroll
    for (int p = 1; p < PARTS; ++p) {
        const double2 r = runs[p * WG_TN + col];
        s += r.x;
        q += r.y;
    }
    const int per = a.mh * a.mw;
    const int img = m0 / per, chunks = per / TM, chunk = (m0 - img * per) / TM;
    double* out = a.gn_partial + (((long long)img * chunks + chunk) * a.ncols + n0 + col) * 2;
    out[0] = s;
    out[1] = q;
}

// Rows of A a lean loader gives no pixel (past the GEMM's M): far outside every image, so that
// the bounds test of every tap fails for them.
constexpr int WG_NO_ROW = -(1 << 28);

// T: 1 bf16, 2 fp16 (conv_tc.cu's TcType); PROBE: count cycles into `probe` (see Probe);
// ROWS: finish each row's pairs ROW_PAIRS at a time (finish_row: loads before stores, 8 round
// trips to memory per thread instead of 32) rather than pair by pair (store_pair).
// Tile: a WgTile (rows, stages).
// LEAN (the `_lean` kernels, INVDIFF_WGMMA_LEAN): the loaders keep a pointer to each of their
// rows' pixels and form a slice's addresses from one offset per slice (the tap's pixel shift
// and channel, and the tap's weight block), with branch-free bounds tests; the plain loaders
// recompute every chunk's address from the row's image, and the sweep's cycle probe puts 36-42%
// of a block's cycles in issuing those copies (346 instructions a thread per slice in SASS,
// against four products; 186 lean). The epilogue, 32-44% of the cycles at short K, skips the
// division by an out_div of 1 (about two thirds of its instructions a value). The same copies
// and the same values, so the same bits.
// TMA (the `_tma` kernels, with LEAN's epilogue): thread 0 copies each slice with the tensor
// memory accelerator through the maps in `tma` (TmaLoads), and every thread waits on the
// stage's mbarrier instead of its own copies. Only for launches whose slices are whole taps
// (sc % 64 == 0), which the host checks (`im2col_box` in conv_plan.rs); at an input stride
// above 1 the map's walk steps that many pixels (its traversal stride), so a row's filter base
// is its output pixel times the stride, shifted by the window's corner.
// SC (the `_sc` kernels, LEAN or TMA): the fused 1x1 shortcut over `sc2` (see the header), at
// input stride 1 with the output grid the source's, which the host checks.
// STAGED (the `_st` kernels, TMA, also with SC): an unsplit launch finishes its rows
// through shared memory (wg_epilogue_staged), a split one as the TMA kernels do.
template <int T, bool PROBE, bool ROWS, class Tile, bool LEAN = false, bool TMA = false, bool SC = false,
          bool STAGED = false>
DEVI void wg_body(const ConvArgs& a, unsigned char* smem, unsigned long long* probe, TmaLoads tma = {},
                  Shortcut sc2 = {}) {
    static_assert(!TMA || (LEAN && ROWS), "the TMA kernels finish rows as the lean ones do");
    static_assert(!SC || LEAN, "the fused shortcut has lean and TMA loaders only");
    static_assert(!LEAN || ROWS, "the lean kernels finish rows (wg_stats reads what finish_row staged)");
    static_assert(!STAGED || (TMA && !PROBE), "staged epilogue: TMA kernels");
    constexpr int TM = Tile::THREADS / 2;
    // Rows apart of one thread's chunks; B's 128 rows take 4 chunks a thread at 256 threads,
    // 2 at 512.
    constexpr int ROW_STEP = Tile::THREADS / 8;
    constexpr int B_CHUNKS = 128 / ROW_STEP;
    Probe<PROBE> cycles;
    cycles.start();
    __shared__ Taps taps;
    const int tid = threadIdx.x;
    stage_taps(a, taps);

    const int M = a.n * a.mh * a.mw;
    const int sc = a.sc;
    const int ncols = a.ncols;
    const int m0 = blockIdx.x * TM;
    const int n0 = blockIdx.y * WG_TN;
    const KSplit ks = k_split(a, WG_BK, SC ? sc2.sc : 0);
    const int kb = ks.kb, ke = ks.ke, ntiles = ks.slices;

    // Loaders: chunk c of A rows r0 + ROW_STEP j (j < 4) and of B rows r0 + ROW_STEP j
    // (j < B_CHUNKS); one (tap, channel) cursor, since the A and B chunks of a thread share
    // their k.
    const int c = tid & 7;
    const int r0 = tid >> 3;
    const uint16_t* const xa = reinterpret_cast<const uint16_t*>(a.x);
    const uint16_t* const wb = static_cast<const uint16_t*>(a.w);
    bool a_ok[4];
    int a_y[4], a_x[4];
    const uint16_t* a_base[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int m = m0 + r0 + ROW_STEP * j;
        a_ok[j] = m < M;
        a_y[j] = LEAN ? WG_NO_ROW : 0;
        a_x[j] = 0;
        a_base[j] = xa;
        if (a_ok[j]) {
            const RowCoord r = decode_row(a, m);
            a_y[j] = r.my * a.in_stride;
            a_x[j] = r.mx * a.in_stride;
            a_base[j] = xa + (long long)r.img * a.sh * a.sw * sc;
            // LEAN: the row's pixel itself.
            if (LEAN) a_base[j] += ((long long)a_y[j] * a.sw + a_x[j]) * sc;
        }
    }
    // LEAN: this thread's first B row, the step to its next, and which are product columns.
    const uint16_t* b_row = wb + (long long)(n0 + r0) * sc;
    long long b_step = (long long)ROW_STEP * sc;
    unsigned b_cols = 0;
#pragma unroll
    for (int j = 0; j < B_CHUNKS; ++j) b_cols |= (unsigned)(n0 + r0 + ROW_STEP * j < ncols) << j;
    // The cursor: tap `at`, channel `aci` of a source of `src_sc` channels; with SC, tap
    // a.taps is the shortcut's, over sc2.
    int at, aci, src_sc = sc;
    // SC, lean loaders: the row pointers and B rows moved to the shortcut's source and weights.
    auto enter_shortcut = [&] {
        src_sc = sc2.sc;
        if constexpr (!TMA) {
            const uint16_t* const x2 = static_cast<const uint16_t*>(sc2.x);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const RowCoord r = decode_row(a, min(m0 + r0 + ROW_STEP * j, M - 1));
                a_base[j] = x2 + (((long long)r.img * a.sh + r.my) * a.sw + r.mx) * src_sc;
            }
            b_row = static_cast<const uint16_t*>(sc2.w) + (long long)(n0 + r0) * src_sc;
            b_step = (long long)ROW_STEP * src_sc;
        }
    };
    {
        const int k = kb + c * 8;
        at = k / sc;
        aci = k - at * sc;
        if (SC && at >= a.taps) {
            aci = k - a.taps * sc;
            at = a.taps;
            enter_shortcut();
        }
    }
    // TMA: one mbarrier per stage, which its copies' bytes complete; slice t waits for phase
    // (t / S) & 1 of stage t % S. The tile's first row's filter base in the A map's box.
    __shared__ __align__(8) unsigned long long full[TMA ? Tile::STAGES : 1];
    const Window win = TMA ? tap_window(a) : Window{0, 0};
    int base_w = 0, base_h = 0, base_img = 0;
    if constexpr (TMA) {
        const RowCoord r = decode_row(a, m0);
        base_w = r.mx * a.in_stride + win.dx0;
        base_h = r.my * a.in_stride + win.dy0;
        base_img = r.img;
        if (tid == 0) {
#pragma unroll
            for (int s = 0; s < Tile::STAGES; ++s) mbar_init(smem_addr(&full[s]), 1);
            tma_ready<SC>(tma);
        }
    }
    // The epilogue's reads of this block's rows (a.prefetch, lean kernels, unsplit): blocks
    // finish their products together, and their epilogues then share the memory's bandwidth.
    if (LEAN && a.prefetch) prefetch_epilogue_rows<TM>(a, M, m0, n0, tid, Tile::THREADS);
    __syncthreads();

    const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
    // Rows r0 + ROW_STEP j share r0 % 8, so chunk c of each sits at one swizzled column.
    const uint32_t chunk = swz(r0, c);
    auto load_lean = [&](int k0, int stage) {
        const uint32_t sa = base + stage * Tile::STAGE + chunk;
        const uint32_t sb = sa + TM * 128;
        const bool kok = k0 + c * 8 < ke;
        // SC: the shortcut's slices read the row's own pixel, weights from its first block.
        const bool second = SC && at >= a.taps;
        // Past the last tap (the end of K) any tap does: kok turns every copy off.
        const int tap = kok && !second ? at : 0;
        const int dy = second ? 0 : taps.dy[tap], dx = second ? 0 : taps.dx[tap];
        const long long a_off = ((long long)dy * a.sw + dx) * sc + aci;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const bool ok =
                kok && (unsigned)(a_y[j] + dy) < (unsigned)a.sh && (unsigned)(a_x[j] + dx) < (unsigned)a.sw;
            cp_async16(sa + ROW_STEP * 128 * j, ok ? a_base[j] + a_off : xa, ok);
        }
        const uint16_t* b = b_row + (second ? 0 : (long long)taps.w[tap] * ncols * sc) + aci;
#pragma unroll
        for (int j = 0; j < B_CHUNKS; ++j, b += b_step) {
            const bool ok = kok && (b_cols >> j & 1);
            cp_async16(sb + ROW_STEP * 128 * j, ok ? b : wb, ok);
        }
        aci += WG_BK;
        while (aci >= src_sc) {
            aci -= src_sc;
            ++at;
            if (SC && at == a.taps) enter_shortcut();
        }
    };
    auto load_plain = [&](int k0, int stage) {
        const uint32_t sa = base + stage * Tile::STAGE;
        const uint32_t sb = sa + TM * 128;
        const bool kok = k0 + c * 8 < ke;
        int dy = 0, dx = 0;
        long long wrow = 0;
        if (kok) {
            dy = taps.dy[at];
            dx = taps.dx[at];
            wrow = (long long)taps.w[at] * ncols;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = r0 + ROW_STEP * j;
            const uint16_t* src = xa;
            bool ok = false;
            if (a_ok[j] && kok) {
                const int iy = a_y[j] + dy;
                const int ix = a_x[j] + dx;
                if ((unsigned)iy < (unsigned)a.sh && (unsigned)ix < (unsigned)a.sw) {
                    src = a_base[j] + ((long long)iy * a.sw + ix) * sc + aci;
                    ok = true;
                }
            }
            cp_async16(sa + swz(r, c), src, ok);
        }
#pragma unroll
        for (int j = 0; j < B_CHUNKS; ++j) {
            const int r = r0 + ROW_STEP * j;
            const int n = n0 + r;
            const bool bok = kok && n < ncols;
            cp_async16(sb + swz(r, c), bok ? wb + (wrow + n) * sc + aci : wb, bok);
        }
        aci += WG_BK;
        while (aci >= sc) {
            aci -= sc;
            ++at;
        }
    };
    auto load = [&](int k0, int stage) {
        if constexpr (LEAN)
            load_lean(k0, stage);
        else
            load_plain(k0, stage);
    };
    // TMA: thread 0 (whose cursor starts at kb) copies the next slice, one tap's 64 channels.
    auto load_tma = [&](int stage) {
        if (tid != 0) return;
        tma_slice<SC, TM, Tile::STAGE>(a, tma, taps, win, base + stage * Tile::STAGE, smem_addr(&full[stage]), at,
                                       aci, base_w, base_h, base_img, n0);
        aci += WG_BK;
        if (aci >= src_sc) {
            aci = 0;
            ++at;
            if (SC && at == a.taps) src_sc = sc2.sc;
        }
    };

    const int warp = tid >> 5;
    const int wg = warp >> 2;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;

    // Slice t lives in stage t % S. Its copies were issued AHEAD iterations earlier, one group
    // per slice (empty past the end), so "all but AHEAD - 1 groups done" means it landed. The
    // barrier of slice t tells every thread that each warpgroup's batch for slice t - 2 is
    // complete (each waited for it before arriving), and slice t + AHEAD refills that stage.
    constexpr int S = Tile::STAGES;
    constexpr int AHEAD = S - 2;
    // The products of the slice in `stage`, committed and left in flight (wg_batch).
    auto products = [&](int stage) {
        const uint32_t sa = base + stage * Tile::STAGE + wg * 64 * 128;
        const uint32_t sb = base + stage * Tile::STAGE + TM * 128;
        wg_batch(acc, [&] {
            if constexpr (LEAN) {
                // A k16 step is 32 bytes further into the rows: 2 in the descriptors' address
                // field, which holds address / 16. sa and sb are 1024-byte aligned, so ks * 32
                // only sets address bits 5-6 (field bits 1-2): the add never carries.
                const uint64_t da = wg_desc(sa), db = wg_desc(sb);
#pragma unroll
                for (int ks = 0; ks < WG_BK / 16; ++ks) wg_mma<T>(acc, da + 2 * ks, db + 2 * ks);
            } else {
#pragma unroll
                for (int ks = 0; ks < WG_BK / 16; ++ks)
                    wg_mma<T>(acc, wg_desc(sa + ks * 32), wg_desc(sb + ks * 32));
            }
        });
    };
    if constexpr (TMA) {
        // The plain tile keeps one slice of copies more in flight than the cp.async loop
        // (S - 1 ahead): each warpgroup waits for its products of slice t - 1 before the
        // barrier of slice t, which then frees their stage for slice t - 1 + S. With one fewer,
        // the copies' latency (about a microsecond, assumed) would exceed the time its two
        // blocks take to multiply a slice; the tensor cores idle across a block's barrier, but
        // the other block can fill the gap. The tall tile has no other block, and already two
        // slices ahead: it keeps the cp.async loop's order (S - 2 ahead, the barrier of slice t
        // certifying the products of slice t - 2), whose products overlap the barrier.
        constexpr bool WAIT_OWN = Tile::BLOCKS_PER_SM > 1;
        constexpr int TMA_AHEAD = WAIT_OWN ? S - 1 : S - 2;
#pragma unroll
        for (int s = 0; s < TMA_AHEAD; ++s)
            if (s < ntiles) load_tma(s);
        cycles.mark(PROBE_SETUP);
        int stage = 0, phase = 0, next = TMA_AHEAD;
        for (int t = 0; t < ntiles; ++t) {
            if constexpr (WAIT_OWN) {
                wg_wait_all(acc);
                cycles.mark(PROBE_MMA);
            }
            __syncthreads();
            cycles.mark(PROBE_BARRIER);
            if (t + TMA_AHEAD < ntiles) load_tma(next);
            next = next + 1 == S ? 0 : next + 1;
            cycles.mark(PROBE_ISSUE);
            mbar_wait(smem_addr(&full[stage]), phase);
            // The products are warp-aligned instructions; the wait's lanes may leave its loop
            // apart.
            __syncwarp();
            cycles.mark(PROBE_COPY_WAIT);
            products(stage);
            cycles.mark(PROBE_MMA);
            if (++stage == S) {
                stage = 0;
                phase ^= 1;
            }
        }
    } else {
#pragma unroll
        for (int s = 0; s < AHEAD; ++s) {
            if (s < ntiles) load(kb + s * WG_BK, s);
            cp_async_commit();
        }
        cycles.mark(PROBE_SETUP);
        for (int t = 0; t < ntiles; ++t) {
            wg_step_ready<AHEAD>(cycles);
            const int nt = t + AHEAD;
            if (nt < ntiles) load(kb + nt * WG_BK, nt % S);
            cp_async_commit();
            cycles.mark(PROBE_ISSUE);
            products(t % S);
            cycles.mark(PROBE_MMA);
        }
    }
    wg_drain(acc);
    cycles.mark(PROBE_DRAIN);

    // GroupNorm partial sums (a.gn_partial): the finished values staged in the stages, once
    // every warpgroup's products are done reading them.
    // (STAGED: the stages hold every unsplit launch's values on their way out.)
    float* keep = nullptr;
    if constexpr (LEAN) {
        if ((STAGED || a.gn_partial != nullptr) && gridDim.z == 1) {
            __syncthreads();
            keep = reinterpret_cast<float*>(smem + (base - smem_addr(smem)));
        }
    }
    if (STAGED && keep != nullptr)
        wg_epilogue_staged<T, TM>(a, acc, M, m0, n0, keep, a.gn_partial != nullptr);
    else
        wg_epilogue<ROWS, LEAN>(a, acc, M, m0, n0, gridDim.z > 1, STAGED ? nullptr : keep);
    const bool stats = LEAN && keep != nullptr && (!STAGED || a.gn_partial != nullptr);
    if (stats) wg_stats<TM>(a, keep, M, m0, n0);
    cycles.mark(PROBE_EPILOGUE);
    cycles.flush(probe, ntiles);
}

// Grid (ceil(M / rows), ceil(ncols / 128), splits), Tile::THREADS threads, Tile::SMEM bytes of
// dynamic shared memory. Needs sc % 8 == 0, ncols % 8 == 0, k_per_split % 64 == 0 and 16-byte
// aligned x, w, y, res, ws, bias and temb (the host checks them); x and w hold 16-bit values of the
// product's type.
#define WG_KERNEL(name, T, ROWS, TILE, LEAN)                                                         \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, TILE::BLOCKS_PER_SM)                 \
        name(const ConvArgs a) {                                                                      \
        extern __shared__ __align__(1024) unsigned char wg_dsmem[];                                  \
        wg_body<T, false, ROWS, TILE, LEAN>(a, wg_dsmem, nullptr);                                    \
    }
// The same kernel counting its cycles into probe[PROBE_COUNTERS] (zeroed by the host).
#define WG_PROBE_KERNEL(name, T, ROWS, TILE, LEAN)                                                   \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, TILE::BLOCKS_PER_SM)                 \
        name(const ConvArgs a, unsigned long long* probe) {                                           \
        extern __shared__ __align__(1024) unsigned char wg_dsmem[];                                  \
        wg_body<T, true, ROWS, TILE, LEAN>(a, wg_dsmem, probe);                                       \
    }
// The TMA forms: the maps follow the argument block. STAGED as wg_body takes it.
#define WG_TMA_KERNEL(name, T, TILE, STAGED)                                                         \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, TILE::BLOCKS_PER_SM)                 \
        name(const ConvArgs a, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb) { \
        extern __shared__ __align__(1024) unsigned char wg_dsmem[];                                  \
        wg_body<T, false, true, TILE, true, true, false, STAGED>(a, wg_dsmem, nullptr,                \
                                                                TmaLoads{&ta, &tb});                  \
    }
#define WG_TMA_PROBE_KERNEL(name, T, TILE)                                                           \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, TILE::BLOCKS_PER_SM)                 \
        name(const ConvArgs a, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,  \
             unsigned long long* probe) {                                                             \
        extern __shared__ __align__(1024) unsigned char wg_dsmem[];                                  \
        wg_body<T, true, true, TILE, true, true>(a, wg_dsmem, probe, TmaLoads{&ta, &tb});             \
    }
// The fused-shortcut forms (SC): lean loaders, and TMA loads (STAGED: the staged epilogue) with
// the shortcut's two maps after the main ones; the shortcut's operands last.
#define WG_SC_KERNEL(name, T, TILE)                                                                  \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, TILE::BLOCKS_PER_SM)                 \
        name(const ConvArgs a, const Shortcut s) {                                                    \
        extern __shared__ __align__(1024) unsigned char wg_dsmem[];                                  \
        wg_body<T, false, true, TILE, true, false, true>(a, wg_dsmem, nullptr, TmaLoads{}, s);        \
    }
#define WG_TMA_SC_KERNEL(name, T, TILE, STAGED)                                                      \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, TILE::BLOCKS_PER_SM)                 \
        name(const ConvArgs a, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,  \
             const __grid_constant__ TmaMap ta2, const __grid_constant__ TmaMap tb2, const Shortcut s) { \
        extern __shared__ __align__(1024) unsigned char wg_dsmem[];                                  \
        wg_body<T, false, true, TILE, true, true, true, STAGED>(                                      \
            a, wg_dsmem, nullptr, TmaLoads{&ta, &tb, &ta2, &tb2}, s);                                 \
    }
// Both precisions, the four forms (pairwise epilogue, row epilogue, row epilogue with lean
// loaders, row epilogue with TMA loads), plain and counting, of one tile; then that tile's
// fused-shortcut and staged forms and their combination (the host's WgmmaExtras names them).
#define WG_KERNELS(prefix, TILE)                                                                     \
    WG_KERNEL(conv_wgmma_bf16##prefix, 1, false, TILE, false)                                       \
    WG_KERNEL(conv_wgmma_fp16##prefix, 2, false, TILE, false)                                       \
    WG_KERNEL(conv_wgmma_bf16_rows##prefix, 1, true, TILE, false)                                   \
    WG_KERNEL(conv_wgmma_fp16_rows##prefix, 2, true, TILE, false)                                   \
    WG_KERNEL(conv_wgmma_bf16_rows_lean##prefix, 1, true, TILE, true)                               \
    WG_KERNEL(conv_wgmma_fp16_rows_lean##prefix, 2, true, TILE, true)                               \
    WG_PROBE_KERNEL(conv_wgmma_bf16##prefix##_probe, 1, false, TILE, false)                         \
    WG_PROBE_KERNEL(conv_wgmma_fp16##prefix##_probe, 2, false, TILE, false)                         \
    WG_PROBE_KERNEL(conv_wgmma_bf16_rows##prefix##_probe, 1, true, TILE, false)                     \
    WG_PROBE_KERNEL(conv_wgmma_fp16_rows##prefix##_probe, 2, true, TILE, false)                     \
    WG_PROBE_KERNEL(conv_wgmma_bf16_rows_lean##prefix##_probe, 1, true, TILE, true)                 \
    WG_PROBE_KERNEL(conv_wgmma_fp16_rows_lean##prefix##_probe, 2, true, TILE, true)                 \
    WG_TMA_KERNEL(conv_wgmma_bf16_rows_tma##prefix, 1, TILE, false)                                 \
    WG_TMA_KERNEL(conv_wgmma_fp16_rows_tma##prefix, 2, TILE, false)                                 \
    WG_TMA_PROBE_KERNEL(conv_wgmma_bf16_rows_tma##prefix##_probe, 1, TILE)                          \
    WG_TMA_PROBE_KERNEL(conv_wgmma_fp16_rows_tma##prefix##_probe, 2, TILE)                          \
    WG_SC_KERNEL(conv_wgmma_bf16_rows_lean_sc##prefix, 1, TILE)                                     \
    WG_SC_KERNEL(conv_wgmma_fp16_rows_lean_sc##prefix, 2, TILE)                                     \
    WG_TMA_SC_KERNEL(conv_wgmma_bf16_rows_tma_sc##prefix, 1, TILE, false)                           \
    WG_TMA_SC_KERNEL(conv_wgmma_fp16_rows_tma_sc##prefix, 2, TILE, false)                           \
    WG_TMA_KERNEL(conv_wgmma_bf16_rows_tma_st##prefix, 1, TILE, true)                               \
    WG_TMA_KERNEL(conv_wgmma_fp16_rows_tma_st##prefix, 2, TILE, true)                               \
    WG_TMA_SC_KERNEL(conv_wgmma_bf16_rows_tma_sc_st##prefix, 1, TILE, true)                         \
    WG_TMA_SC_KERNEL(conv_wgmma_fp16_rows_tma_sc_st##prefix, 2, TILE, true)
WG_KERNELS(, PlainTile)
WG_KERNELS(_tall, TallTile)
