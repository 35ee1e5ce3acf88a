// Circular blur on the GPU by 2-D FFT, per image: the forward operator A, its adjoint Aᵀ and
// ΠGDM's pseudo-inverse of the residual, as src/inverse/blur.rs (CircularBlur) computes them.
//
// Design:
// - Arithmetic in f64 like the CPU reference (rustfft in f64): Hopper runs f64 at half the f32
//   rate and these transforms are tiny next to the UNet, so the only differences from the CPU are
//   f64 roundings, invisible after the final rounding to f32.
// - As on the CPU, two channels share one complex transform (x_c + i·x_{c+1}); every filter has
//   a real impulse response, so the real and imaginary parts of the result are the two filtered
//   channels. A C-channel image is P = ⌈C/2⌉ complex planes.
// - A 2-D filter is three launches: `fft_rows_forward` (load the channel pair, FFT each row),
//   `fft_cols` (FFT each column, multiply by the filter, inverse FFT the column: the spectrum
//   never goes back to memory) and `fft_rows_inverse` (inverse FFT each row, round to f32,
//   optionally subtract a measurement). The OTF of each image's kernel and, for ΠGDM, the
//   spectrum of each measurement are computed once per run with `fft_cols` in FORWARD mode.
// - Each line (row or column) is transformed by one block in shared memory with a Stockham
//   autosort FFT of any length: the length is split into radices (4s first, then 2, then odd
//   primes; the host plans them), and each stage computes every output directly as a p-point DFT
//   of its inputs times a twiddle. That is O(N·Σp): N log N for smooth sizes such as 256 or 48, a
//   direct DFT for a prime length, with one code path for all.
// - Unnormalised transforms (rustfft's convention); the 1/(H·W) goes into the filter, as on the
//   CPU.
#include "common.cuh"
#include "step_row.cuh"

// The radices of one line length; mirrors FftPlan in src/cuda/sampler_kernels.rs.
#define FFT_MAX_RADICES 16
struct FftPlan {
    int n;
    int count;
    int radix[FFT_MAX_RADICES];
};

// fft_cols modes.
#define FFT_FORWARD 0      // leave the spectrum (OTF, measurement spectra)
#define FFT_FILTER_K 1     // A: multiply by K
#define FFT_FILTER_CONJ 2  // Aᵀ: multiply by conj(K)
#define FFT_PINV 3         // conj(K) / (r²|K|² + σ²) · (Y − K·X)

DEVI double2 cmul(double2 a, double2 b) { return make_double2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x); }

// The N = plan.n points in `src` (shared memory, already synchronised) transformed, using `dst`
// as the other buffer; returns the buffer holding the result (synchronised). `tw[k]` is
// e^{-2πik/N}; the inverse transform conjugates it.
DEVI double2* fft_line(double2* src, double2* dst, const double2* __restrict__ tw, const FftPlan& plan,
                       bool inverse) {
    const int n_total = plan.n;
    const double sign = inverse ? -1.0 : 1.0;
    int n = n_total, s = 1;
    for (int f = 0; f < plan.count; ++f) {
        const int p = plan.radix[f], m = n / p, step = n_total / p;
        for (int o = threadIdx.x; o < n_total; o += blockDim.x) {
            // Output o = q + s·(p·j + u) is the u-th point of the p-point DFT of inputs
            // q + s·(j + r·m), r < p, times the twiddle e^{-2πi·j·u/n}.
            const int q = o % s, t = o / s, u = t % p, j = t / p;
            double2 acc = make_double2(0.0, 0.0);
            int ru = 0;  // r·u mod p
            for (int r = 0; r < p; ++r) {
                double2 w = tw[ru * step];
                w.y *= sign;
                const double2 v = src[q + s * (j + r * m)];
                acc.x += v.x * w.x - v.y * w.y;
                acc.y += v.x * w.y + v.y * w.x;
                ru += u;
                if (ru >= p) ru -= p;
            }
            double2 w = tw[j * u * s];
            w.y *= sign;
            dst[o] = cmul(acc, w);
        }
        __syncthreads();
        double2* tmp = src;
        src = dst;
        dst = tmp;
        n = m;
        s *= p;
    }
    return src;
}

// Row FFTs of channel pairs: block (row, pair, image) loads channels 2·pair and 2·pair + 1 (zero
// when C is odd and this is the last pair) of `x` ([B, C, H, W] f32) and writes the transformed
// row to `planes` ([B, P, H, W] complex).
extern "C" __global__ void fft_rows_forward(const float* x, int C, int H, int W, double2* planes,
                                            const double2* __restrict__ tw, FftPlan plan) {
    extern __shared__ double2 line[];
    const int row = blockIdx.x, pair = blockIdx.y, b = blockIdx.z, P = gridDim.y;
    const int c0 = 2 * pair;
    const float* re = x + (((long long)b * C + c0) * H + row) * W;
    const float* im = c0 + 1 < C ? re + (long long)H * W : nullptr;
    for (int k = threadIdx.x; k < W; k += blockDim.x) line[k] = make_double2(re[k], im ? im[k] : 0.0f);
    __syncthreads();
    const double2* out = fft_line(line, line + W, tw, plan, false);
    double2* dst = planes + (((long long)b * P + pair) * H + row) * W;
    for (int k = threadIdx.x; k < W; k += blockDim.x) dst[k] = out[k];
}

// Column pass, in place on `planes`: block (column, pair, image) transforms its column and, unless
// mode is FFT_FORWARD, filters it and transforms it back. `otf` is [B, H, W] (one kernel per
// image), `yspec` [B, P, H, W]; ΠGDM's r² is the current step's, σ² and the 1/(H·W) `scale`
// are fixed.
extern "C" __global__ void fft_cols(double2* planes, int H, int W, int mode, const double2* otf,
                                    const double2* yspec, const StepRow* rows, const int* counter, double s2,
                                    double scale, const double2* __restrict__ tw, FftPlan plan) {
    extern __shared__ double2 line[];
    const int col = blockIdx.x, pair = blockIdx.y, b = blockIdx.z, P = gridDim.y;
    const long long plane_off = ((long long)b * P + pair) * H * W;
    double2* plane = planes + plane_off;
    for (int i = threadIdx.x; i < H; i += blockDim.x) line[i] = plane[(long long)i * W + col];
    __syncthreads();
    double2* spec = fft_line(line, line + H, tw, plan, false);
    if (mode != FFT_FORWARD) {
        const double2* k_col = otf + (long long)b * H * W + col;
        const double r2 = mode == FFT_PINV ? (double)rows[*counter].pigdm_r2 : 0.0;
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            const double2 k = k_col[(long long)i * W];
            const double2 v = spec[i];
            double2 out;
            if (mode == FFT_FILTER_K) {
                out = cmul(v, make_double2(k.x * scale, k.y * scale));
            } else if (mode == FFT_FILTER_CONJ) {
                out = cmul(v, make_double2(k.x * scale, -k.y * scale));
            } else {
                const double2 y = yspec[plane_off + (long long)i * W + col];
                const double d = r2 * (k.x * k.x + k.y * k.y) + s2;
                const double2 kx = cmul(k, v);
                const double2 h = cmul(make_double2(k.x / d, -k.y / d), make_double2(y.x - kx.x, y.y - kx.y));
                out = make_double2(h.x * scale, h.y * scale);
            }
            spec[i] = out;
        }
        __syncthreads();
        double2* other = spec == line ? line + H : line;
        spec = fft_line(spec, other, tw, plan, true);
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x) plane[(long long)i * W + col] = spec[i];
}

// Inverse row FFTs back to channels: block (row, pair, image) writes the real part to channel
// 2·pair and the imaginary part to channel 2·pair + 1 (if C has it) of `out` ([B, C, H, W] f32),
// each rounded to f32 and minus `sub` (same layout) when given: A x − y in one pass.
extern "C" __global__ void fft_rows_inverse(const double2* planes, int C, int H, int W, float* out,
                                            const float* sub, const double2* __restrict__ tw, FftPlan plan) {
    extern __shared__ double2 line[];
    const int row = blockIdx.x, pair = blockIdx.y, b = blockIdx.z, P = gridDim.y;
    const double2* src = planes + (((long long)b * P + pair) * H + row) * W;
    for (int k = threadIdx.x; k < W; k += blockDim.x) line[k] = src[k];
    __syncthreads();
    const double2* res = fft_line(line, line + W, tw, plan, true);
    const int c0 = 2 * pair;
    const long long re_off = (((long long)b * C + c0) * H + row) * W;
    const long long im_off = re_off + (long long)H * W;
    const bool has_im = c0 + 1 < C;
    for (int k = threadIdx.x; k < W; k += blockDim.x) {
        float re = (float)res[k].x, im = (float)res[k].y;
        if (sub != nullptr) {
            re = __fsub_rn(re, sub[re_off + k]);
            if (has_im) im = __fsub_rn(im, sub[im_off + k]);
        }
        out[re_off + k] = re;
        if (has_im) out[im_off + k] = im;
    }
}
