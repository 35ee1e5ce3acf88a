// Row softmax of the attention scores and its backward, in place, one warp per row.
//
// The scores S = q kᵀ come from gemm_batched; these kernels apply the 1/√d scale exactly where
// the CPU does (inside the softmax, before the maximum), then P = exp(s - max) / sum. The
// probabilities stay materialised, [n, heads, L, L], as on the CPU: at the UNet's attention
// resolutions (L = 256 for celebahq) P is small, and the backward pass reuses it.
// Rows are independent and L is a few hundred, so a warp per row with three passes over the row
// (it stays in L1) is simple and keeps the reductions inside one warp.
#include "common.cuh"

// P = softmax(scale * S) per row of `len`, in place. Blocks of 256 threads, grid-stride over rows.
extern "C" __global__ void softmax_forward(float* p, long long rows, int len, float scale) {
    pdl_entry();
    const int lane = threadIdx.x & 31;
    for (long long r = grid_start() >> 5; r < rows; r += grid_stride() >> 5) {
        float* row = p + r * len;
        float mx = -INFINITY;
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

// dS = P ∘ (dP - rowsum(dP ∘ P)) · scale, with dP in `ds` on entry. Same launch as the forward.
extern "C" __global__ void softmax_backward(const float* p, float* ds, long long rows, int len, float scale) {
    pdl_entry();
    const int lane = threadIdx.x & 31;
    for (long long r = grid_start() >> 5; r < rows; r += grid_stride() >> 5) {
        const float* prow = p + r * len;
        float* drow = ds + r * len;
        float dot = 0.f;
        for (int j = lane; j < len; j += 32) dot += drow[j] * prow[j];
        dot = warp_sum(dot);
        for (int j = lane; j < len; j += 32) drow[j] = prow[j] * (drow[j] - dot) * scale;
    }
}
