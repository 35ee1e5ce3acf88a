// Linear layers over a few rows: the time-embedding MLP and each resnet's projection of it,
// y = (f(x) Wᵀ + b + residual) / out_div with f = SiLU or identity, rows = batch size.
//
// With a handful of rows a tiled product would leave almost every thread idle; instead one warp
// computes one output element as a dot product over the input width, reading a row of W in
// PyTorch's [out, inp] layout with consecutive lanes on consecutive addresses, and the input row
// (which every warp of the row shares, from L1). Token-wise linears (q/k/v and the attention
// output projection) have thousands of rows and go through conv_gemm instead.
//
// linear_rows is one layer; linear_batch is several layers that read the same input (every
// resnet's projection of the time embedding, 32 in celebahq-256) in one launch: each of those
// launches is a few hundred warps, so their cost was the launch itself (~12.5 us each on an H200).
// Its warps compute exactly what linear_rows computes for the same output (same loads, same fma
// order, same reduction), so the two are bit-identical.
#include "common.cuh"

// W elements a lane loads at once (row_dot).
constexpr int DOT_AHEAD = 8;

// One round of row_dot for a lane: elements i, i + 32, .. (DOT_AHEAD of them; with PARTIAL,
// those below inp). f of the round's x values (L1 hits: every warp of the row reads them), then
// all the round's W loads, then the products in order. Whole rounds load unconditionally: with
// every load predicated, ptxas started the products after five or six of the eight.
template <bool PARTIAL>
DEVI void dot_round(const float* xr, const float* wr, int i, int inp, int silu_in, float& acc) {
    auto in = [&](int u) { return !PARTIAL || i + 32 * u < inp; };
    float v[DOT_AHEAD], w[DOT_AHEAD];
#pragma unroll
    for (int u = 0; u < DOT_AHEAD; ++u) {
        const float x = in(u) ? xr[i + 32 * u] : 0.f;
        v[u] = silu_in ? silu_f(x) : x;
    }
#pragma unroll
    for (int u = 0; u < DOT_AHEAD; ++u) w[u] = in(u) ? wr[i + 32 * u] : 0.f;
#pragma unroll
    for (int u = 0; u < DOT_AHEAD; ++u)
        if (in(u)) acc = fmaf(v[u], w[u], acc);
}

// One output's dot product f(x row) . (W row), f = SiLU or identity, summed across the warp
// (every lane gets the sum), in rounds of DOT_AHEAD of a lane's elements (dot_round), a last
// partial one where the width ends inside a round. Under SiLU a plain unrolled loop loaded W
// one element at a time: the IEEE division calls a slow path, and ptxas sinks each load past
// the call to its use (SASS), so each warp waited out a DRAM latency per element; the 32
// resnets' projections took 27 us for 20 MB on an H200 (stop 34's kernel timeline), on the path
// to the first convolution that adds them. The same products in the same order as that loop,
// so the same bits.
DEVI float row_dot(const float* xr, const float* wr, int inp, int silu_in, int lane) {
    float acc = 0.f;
    int i = lane;
    for (; i + 32 * (DOT_AHEAD - 1) < inp; i += 32 * DOT_AHEAD)
        dot_round<false>(xr, wr, i, inp, silu_in, acc);
    if (i < inp) dot_round<true>(xr, wr, i, inp, silu_in, acc);
    return warp_sum(acc);
}

// Blocks of 256 threads, grid-stride over rows * out warps.
extern "C" __global__ void linear_rows(const float* x, const float* w, const float* bias, const float* res,
                                       float* y, int rows, int inp, int out, int silu_in, float out_div) {
    const int lane = threadIdx.x & 31;
    const long long total = (long long)rows * out;
    for (long long e = grid_start() >> 5; e < total; e += grid_stride() >> 5) {
        const int r = (int)(e / out);
        const int o = (int)(e - (long long)r * out);
        const float acc = row_dot(x + (long long)r * inp, w + (long long)o * inp, inp, silu_in, lane);
        if (lane == 0) {
            float b = bias[o];
            if (res != nullptr) b += res[e];
            y[e] = (b + acc) / out_div;
        }
    }
}

// One layer of linear_batch: its weights [out, inp], bias and output [rows, out], its width and
// the sum of the widths of the layers before it. `LinearItem` (src/cuda/kernels/linear.rs)
// writes it field for field (32 bytes).
struct LinearItem {
    const float* w;
    const float* bias;
    float* y;
    int out;
    int start;
};

// Layers per launch: the table is cached in shared memory (2 KB). Rust: LINEAR_BATCH_MAX.
#define LINEAR_BATCH_MAX 64

// Blocks of 256 threads, grid-stride over rows * total_out warps, total_out the sum of the
// layers' widths: warp e computes output j = e % total_out of row e / total_out, which belongs
// to the last layer whose start is <= j.
extern "C" __global__ void linear_batch(const float* x, const LinearItem* items, int n_items, int rows, int inp,
                                        int total_out, int silu_in, float out_div) {
    __shared__ LinearItem its[LINEAR_BATCH_MAX];
    const int n = min(n_items, LINEAR_BATCH_MAX);
    for (int i = threadIdx.x; i < n; i += blockDim.x) its[i] = items[i];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const long long total = (long long)rows * total_out;
    for (long long e = grid_start() >> 5; e < total; e += grid_stride() >> 5) {
        const int r = (int)(e / total_out);
        const int j = (int)(e - (long long)r * total_out);
        // Binary search over the starts, which increase: the same answer for the whole warp.
        int lo = 0, hi = n - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (its[mid].start <= j) lo = mid;
            else hi = mid - 1;
        }
        const LinearItem it = its[lo];
        const int o = j - it.start;
        // Only a table that disagrees with total_out gets here; skip rather than write outside.
        if (o < 0 || o >= it.out) continue;
        const float acc = row_dot(x + (long long)r * inp, it.w + (long long)o * inp, inp, silu_in, lane);
        if (lane == 0) {
            const float b = it.bias[o];
            it.y[(long long)r * it.out + o] = (b + acc) / out_div;
        }
    }
}
