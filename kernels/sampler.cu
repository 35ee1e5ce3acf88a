// The elementwise and per-image work of one sampling step on the GPU (src/cuda/sampler.rs): the
// scheduler step, the chain rule of the guidance through x0, the DPS / ΠGDM updates, the
// per-image residual norm of DPS, Philox normals, and the step counter.
//
// Design:
// - Per-step scalars come from the table of StepRow (step_row.cuh) at the device counter, never
//   from launch arguments, so one captured graph replays every step; `sampler_advance` is the
//   last launch of a step.
// - Every formula mirrors its CPU reference (src/schedule/coeffs.rs, src/sampler/mod.rs,
//   src/rng.rs) operation for operation with explicit round-to-nearest intrinsics (__fmul_rn,
//   __fadd_rn, ...): nvcc would otherwise contract a * b + c into an FMA, which rounds once where
//   the CPU rounds twice. With them the results are bit-identical to the CPU's given the same
//   inputs (the sampler's differences come only from the network and the FFTs).
// - Clamps are written as comparisons, not fminf/fmaxf, so that NaN propagates as in torch.
// - Kernels that write the next state also record the first step whose state is not finite
//   (atomicMin into `diverged`), which the host reads once at the end instead of checking every
//   step.
#include "common.cuh"
#include "step_row.cuh"

// ---- Philox4x32-10 and Box-Muller, the recipe of src/rng.rs bit for bit -------------------------

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

DEVI uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k.x += PHILOX_W0;
            k.y += PHILOX_W1;
        }
        const unsigned hi0 = __umulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
        const unsigned hi1 = __umulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// musl's logf without its special cases (rng.rs `ln`).
DEVI float ln_rng(float x) {
    const float LN2_HI = __uint_as_float(0x3f317180u), LN2_LO = __uint_as_float(0x3717f7d1u);
    const float LG1 = __uint_as_float(0x3f2aaaaau), LG2 = __uint_as_float(0x3eccce13u);
    const float LG3 = __uint_as_float(0x3e91e9eeu), LG4 = __uint_as_float(0x3e789e26u);
    const unsigned ix = __float_as_uint(x) + (0x3f800000u - 0x3f3504f3u);
    const int k = (int)(ix >> 23) - 0x7f;
    const float m = __uint_as_float((ix & 0x007fffffu) + 0x3f3504f3u);
    const float f = __fsub_rn(m, 1.0f);
    const float s = __fdiv_rn(f, __fadd_rn(2.0f, f));
    const float z = __fmul_rn(s, s);
    const float w = __fmul_rn(z, z);
    const float t1 = __fmul_rn(w, __fadd_rn(LG2, __fmul_rn(w, LG4)));
    const float t2 = __fmul_rn(z, __fadd_rn(LG1, __fmul_rn(w, LG3)));
    const float r = __fadd_rn(t2, t1);
    const float hfsq = __fmul_rn(__fmul_rn(0.5f, f), f);
    const float dk = (float)k;
    float v = __fmul_rn(s, __fadd_rn(hfsq, r));
    v = __fadd_rn(v, __fmul_rn(dk, LN2_LO));
    v = __fsub_rn(v, hfsq);
    v = __fadd_rn(v, f);
    return __fadd_rn(v, __fmul_rn(dk, LN2_HI));
}

// (sin 2πu, cos 2πu) by quadrant reduction and Cephes' polynomials (rng.rs `sincos_2pi`).
DEVI void sincos_2pi_rng(float u, float* sn, float* cs) {
    const float TWO_PI = __uint_as_float(0x40c90fdbu);
    const float S1 = __uint_as_float(0xbe2aaaa3u), S2 = __uint_as_float(0x3c08839eu);
    const float S3 = __uint_as_float(0xb94ca1f9u), C1 = __uint_as_float(0x3d2aaaa5u);
    const float C2 = __uint_as_float(0xbab6061au), C3 = __uint_as_float(0x37ccf5ceu);
    const float q = roundf(__fmul_rn(u, 4.0f));
    const float x = __fmul_rn(__fsub_rn(u, __fmul_rn(q, 0.25f)), TWO_PI);
    const float z = __fmul_rn(x, x);
    float s = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(S3, z), S2), z), S1);
    s = __fadd_rn(__fmul_rn(__fmul_rn(s, z), x), x);
    float c = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(C3, z), C2), z), C1);
    c = __fmul_rn(__fmul_rn(c, z), z);
    c = __fadd_rn(__fsub_rn(c, __fmul_rn(0.5f, z)), 1.0f);
    switch ((int)q & 3) {
        case 0: *sn = s; *cs = c; break;
        case 1: *sn = c; *cs = -s; break;
        case 2: *sn = -s; *cs = -c; break;
        default: *sn = -c; *cs = s; break;
    }
}

DEVI float unit_open(unsigned r) { return __fmul_rn(__fadd_rn((float)(r >> 9), 0.5f), 1.0f / 8388608.0f); }

// Elements 2·pair and 2·pair + 1 of stream (seed, stream).
DEVI float2 normal_pair(unsigned long long seed, unsigned long long stream, unsigned long long pair) {
    const uint4 r = philox4x32_10(
        make_uint4((unsigned)pair, (unsigned)(pair >> 32), (unsigned)stream, (unsigned)(stream >> 32)),
        make_uint2((unsigned)seed, (unsigned)(seed >> 32)));
    const float radius = __fsqrt_rn(__fmul_rn(-2.0f, ln_rng(unit_open(r.x))));
    float s, c;
    sincos_2pi_rng(unit_open(r.y), &s, &c);
    return make_float2(__fmul_rn(radius, c), __fmul_rn(radius, s));
}

// Noise::Seeded draws of `batch` images of `per` values: image b reads stream (ids[b] << 32) | slot.
// With `rows` the slot is the current step's (step + 1) and nothing is drawn at steps without
// noise; without, `slot` is used (0 for x_T). Grid-stride, a thread per pair of values.
extern "C" __global__ void sampler_normals(unsigned long long seed, const unsigned long long* ids,
                                           unsigned long long slot, const StepRow* rows, const int* counter,
                                           float* out, long long per, int batch) {
    if (rows != nullptr) {
        const StepRow& row = rows[*counter];
        if (!(row.flags & ROW_NOISE)) return;
        slot = (unsigned long long)row.step + 1;
    }
    const long long pairs = (per + 1) / 2;
    for (long long j = grid_start(); j < pairs * batch; j += grid_stride()) {
        const long long b = j / pairs, pair = j - b * pairs;
        const float2 v = normal_pair(seed, (ids[b] << 32) | slot, (unsigned long long)pair);
        float* o = out + b * per + 2 * pair;
        o[0] = v.x;
        if (2 * pair + 1 < per) o[1] = v.y;
    }
}

// ---- the scheduler step ------------------------------------------------------------------------

// x0 before the clamp, (x - s1·eps) / s0.
DEVI float x0_raw(const StepRow& r, float x, float e) { return __fdiv_rn(__fsub_rn(x, __fmul_rn(r.s1, e)), r.s0); }

DEVI float clamp_x0(const StepRow& r, float raw) {
    if (r.flags & ROW_CLIP) {
        if (raw < -r.clip) return -r.clip;
        if (raw > r.clip) return r.clip;
    }
    return raw;
}

// The notebook's clean_output, (clamp(x, -1, 1) + 1) / 2.
DEVI float clean_output(float v) {
    const float c = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    return __fdiv_rn(__fadd_rn(c, 1.0f), 2.0f);
}

DEVI void note_divergence(int* diverged, float v, int step) {
    if (diverged != nullptr && !isfinite(v)) atomicMin(diverged, step);
}

// StepCoeffs::x0 / ::prev over `len` values: prev (which may be x itself: each thread reads its
// x before writing) and, when `xhat` is given, clean_output(x0) for the guidance. z is read at
// z + z_slot·z_stride (injected noise: all steps' draws; seeded: stride 0, this step's draws).
extern "C" __global__ void sampler_step(const StepRow* rows, const int* counter, const float* x,
                                        const float* eps, const float* z, long long z_stride, float* prev,
                                        float* xhat, long long len, int* diverged) {
    const StepRow& r = rows[*counter];
    const float* zs = z + (long long)r.z_slot * z_stride;
    for (long long i = grid_start(); i < len; i += grid_stride()) {
        // The noise with x and eps: read where it is used, its load waited for the x0
        // division's slow-path call, which ptxas issues no load past.
        const float xv = x[i], e = eps[i], zv = (r.flags & ROW_NOISE) ? zs[i] : 0.0f;
        const float x0 = clamp_x0(r, x0_raw(r, xv, e));
        float p = __fmul_rn(r.c_x0, x0);
        if (r.c_xt != 0.0f) p = __fadd_rn(p, __fmul_rn(r.c_xt, xv));
        if (r.c_eps != 0.0f) p = __fadd_rn(p, __fmul_rn(r.c_eps, e));
        if (r.flags & ROW_NOISE) p = __fadd_rn(p, __fmul_rn(r.noise_std, zv));
        prev[i] = p;
        if (xhat != nullptr) xhat[i] = clean_output(x0);
        note_divergence(diverged, p, r.step);
    }
}

// ---- the guidance gradient ---------------------------------------------------------------------

// From d(guidance)/d x0_hat to d/dx_t directly (`direct`) and the network's cotangent (`cot`),
// through clean_output, the scheduler's clamp and x0 = (x - s1·eps) / s0. Gradient passes only
// strictly inside each clamp's range, as torch's clamp backward; x0 is recomputed from x and eps
// exactly as sampler_step computed it.
extern "C" __global__ void sampler_chain(const StepRow* rows, const int* counter, const float* x,
                                         const float* eps, const float* d_xhat, float* direct, float* cot,
                                         long long len) {
    const StepRow& r = rows[*counter];
    for (long long i = grid_start(); i < len; i += grid_stride()) {
        // d_xhat with x and eps (as sampler_step's noise), whether or not the clamps pass it:
        // like x and eps it holds len values (the launcher's contract).
        const float d = d_xhat[i];
        const float raw = x0_raw(r, x[i], eps[i]);
        const float x0 = clamp_x0(r, raw);
        const bool inside_clip = !(r.flags & ROW_CLIP) || (-r.clip < raw && raw < r.clip);
        const float g = inside_clip && -1.0f < x0 && x0 < 1.0f ? __fdiv_rn(d, 2.0f) : 0.0f;
        const float g_raw = __fdiv_rn(g, r.s0);
        direct[i] = g_raw;
        cot[i] = __fmul_rn(-g_raw, r.s1);
    }
}

#define UPDATE_DPS 0
#define UPDATE_PIGDM 1

// x = prev - w·(direct + g_eps) (DPS) or prev + scale·grad·r²·√α (ΠGDM), rounded left to right.
extern "C" __global__ void sampler_update(const StepRow* rows, const int* counter, int mode, float scale,
                                          const float* prev, const float* direct, const float* g_eps, float* x,
                                          long long len, int* diverged) {
    const StepRow& r = rows[*counter];
    for (long long i = grid_start(); i < len; i += grid_stride()) {
        const float g = __fadd_rn(direct[i], g_eps[i]);
        float v;
        if (mode == UPDATE_DPS) {
            v = __fsub_rn(prev[i], __fmul_rn(r.dps_w, g));
        } else {
            v = __fadd_rn(prev[i], __fmul_rn(__fmul_rn(__fmul_rn(scale, g), r.pigdm_r2), r.pigdm_sqrt_alpha));
        }
        x[i] = v;
        note_divergence(diverged, v, r.step);
    }
}

// DPS: r_b ← r_b / ||r_b|| per image (zero where the norm is zero, which makes the gradient zero
// as torch.norm's backward does at 0), in two launches. sampler_residual_norms, a block per
// image: f64 partial sums in a fixed order and a fixed tree, so the norm is deterministic; its
// final rounding to f32 matches the CPU's sequential f64 sum except within an f64 rounding of an
// f32 tie. sampler_residual_scale then divides every value by its image's norm, a thread per
// value. The division was the norm block's second loop once, and that block waited out an L2
// round trip per value: the IEEE division calls a slow path, and ptxas issues no load past the
// call (SASS: a load, the division, a store, 384 times a thread at 3 x 256 x 256; in a
// grid-stride loop a thread's values would still go one at a time). The same norm and the same
// divisions.
#define NORM_THREADS 512
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    sampler_residual_norms(const float* r, long long per, float* norms) {
    __shared__ double part[NORM_THREADS];
    const float* img = r + (long long)blockIdx.x * per;
    double acc = 0.0;
    for (long long i = threadIdx.x; i < per; i += NORM_THREADS) {
        const double v = (double)img[i];
        acc += v * v;
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int h = NORM_THREADS / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) norms[blockIdx.x] = (float)sqrt(part[0]);
}

// r[i] / norms[i / per] for value i = grid_start() of the `len` of the batch (zero where the
// norm is zero): a thread per value.
extern "C" __global__ void sampler_residual_scale(float* r, long long per, long long len, const float* norms) {
    const long long i = grid_start();
    if (i >= len) return;
    const float norm = norms[i / per];
    r[i] = norm > 0.0f ? __fdiv_rn(r[i], norm) : 0.0f;
}

// The UNet's timestep input for the current step, one per image.
extern "C" __global__ void sampler_set_timestep(const StepRow* rows, const int* counter, float* t, int n) {
    const float v = rows[*counter].t;
    for (int i = threadIdx.x; i < n; i += blockDim.x) t[i] = v;
}

// The last launch of a step: makes the next row current.
extern "C" __global__ void sampler_advance(int* counter) {
    if (threadIdx.x == 0) *counter += 1;
}
