// Data movement and small element-wise ops: layout changes at the network's boundary, nearest
// 2x upsampling and its adjoint, channel concatenation and its adjoint, gradient accumulation,
// division by a scale factor, and the sinusoidal timestep embedding.
//
// All are memory-bound one-pass kernels: blocks of 256 threads in grid-stride loops over the
// output (the host caps the grid at a few blocks per multiprocessor), one thread per element,
// consecutive threads on consecutive output addresses. Adjoints take an `accumulate` flag with
// the CPU's meaning: add onto what the gradient buffer holds, or overwrite it.
#include "common.cuh"

// NCHW -> NHWC with y = x * mul + add (the input centring 2x - 1 when asked).
extern "C" __global__ void nchw_to_nhwc(const float* x, float* y, int n, int c, int h, int w, float mul, float add) {
    const long long hw = (long long)h * w;
    const long long total = (long long)n * c * hw;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const int ch = (int)(i % c);
        const long long p = i / c;  // pixel index over n * hw
        const long long img = p / hw;
        const long long q = p - img * hw;
        y[i] = x[(img * c + ch) * hw + q] * mul + add;
    }
}

// NHWC -> NCHW with y = x * mul.
extern "C" __global__ void nhwc_to_nchw(const float* x, float* y, int n, int c, int h, int w, float mul) {
    const long long hw = (long long)h * w;
    const long long total = (long long)n * c * hw;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const long long q = i % hw;
        const long long plane = i / hw;  // img * c + ch
        const long long img = plane / c;
        const long long ch = plane - img * c;
        y[i] = x[(img * hw + q) * c + ch] * mul;
    }
}

// y[img, oy, ox, :] = x[img, oy / 2, ox / 2, :]; x is [n, h, w, c].
extern "C" __global__ void upsample2x(const float* x, float* y, int n, int h, int w, int c) {
    const long long total = (long long)n * 4 * h * w * c;
    const int ow = 2 * w, oh = 2 * h;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const int ch = (int)(i % c);
        const long long p = i / c;
        const int ox = (int)(p % ow);
        const long long r = p / ow;
        const int oy = (int)(r % oh);
        const long long img = r / oh;
        y[i] = x[((img * h + oy / 2) * w + ox / 2) * c + ch];
    }
}

// upsample2x into bf16 (kind 1) or fp16 (kind 2), for an upsampling whose output only feeds a
// tensor-core convolution of that precision (which would round it the same way while staging
// it). Eight channels per item: c % 8 == 0, x 16-byte aligned, y 16-byte aligned.
extern "C" __global__ void upsample2x_half(const float* x, uint4* y, int n, int h, int w, int c, int kind) {
    const int c8 = c / 8;
    const long long total = (long long)n * 4 * h * w * c8;
    const int ow = 2 * w, oh = 2 * h;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const int ch = (int)(i % c8) * 8;
        const long long p = i / c8;
        const int ox = (int)(p % ow);
        const long long r = p / ow;
        const int oy = (int)(r % oh);
        const long long img = r / oh;
        const float4* src = reinterpret_cast<const float4*>(x + ((img * h + oy / 2) * w + ox / 2) * c + ch);
        const float4 a = src[0], b = src[1];
        y[i] = make_uint4(pack_half2(a.x, a.y, kind), pack_half2(a.z, a.w, kind), pack_half2(b.x, b.y, kind),
                          pack_half2(b.z, b.w, kind));
    }
}

// dx[img, iy, ix, :] (+)= sum of dy over the 2x2 block it was copied to, in the CPU's order.
extern "C" __global__ void upsample2x_backward(const float* dy, float* dx, int n, int h, int w, int c,
                                               int accumulate) {
    const long long total = (long long)n * h * w * c;
    const long long row = 2LL * w * c;  // one output row of dy
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const int ch = (int)(i % c);
        const long long p = i / c;
        const int ix = (int)(p % w);
        const long long r = p / w;
        const int iy = (int)(r % h);
        const long long img = r / h;
        const float* r0 = dy + (img * 2 * h + 2 * iy) * row;
        const float* r1 = r0 + row;
        const long long a = 2LL * ix * c + ch;
        const float s = r0[a] + r0[a + c] + r1[a] + r1[a + c];
        dx[i] = accumulate ? dx[i] + s : s;
    }
}

// y[p, :] = [a[p, :] | b[p, :]] over `pixels` pixels; where y16 is not null, also a copy of y
// in bf16 (kind 1) or fp16 (kind 2), rounded as the tensor-core convolutions that read it
// would round y while staging it (pack_half2), so that they can take the 16-bit input path.
// vec4: four channels per item, which needs ca % 4 == 0, cb % 4 == 0, 16-byte aligned a, b and
// y and 8-byte aligned y16 (checked by the host); it divides a 64-bit index once per four
// values, the arithmetic that bounded the scalar loop rather than its bytes.
// F32 (concat_channels): y written; else (concat_channels_half, INVDIFF_GN_HALF_INPUT: a
// concatenation whose readers all read the 16-bit copy) only y16, with the same values and
// rounding, a null side skipped (its producers wrote it there,
// INVDIFF_CONCAT_FROM_PRODUCERS). A compile-time choice, so that concat_channels' code is what
// it was.
template <bool F32>
DEVI void concat_body(const float* a, const float* b, float* y, uint16_t* y16, int kind, long long pixels, int ca,
                      int cb, int vec4) {
    const int c = ca + cb;
    if (vec4) {
        const int c4 = c / 4, ca4 = ca / 4, cb4 = cb / 4;
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        float4* y4 = reinterpret_cast<float4*>(y);
        const long long total4 = pixels * c4;
        for (long long i = grid_start(); i < total4; i += grid_stride()) {
            const long long p = i / c4;
            const int j = (int)(i - p * c4);
            if (!F32 && (j < ca4 ? a : b) == nullptr) continue;
            const float4 v = j < ca4 ? a4[p * ca4 + j] : b4[p * cb4 + (j - ca4)];
            if (F32) y4[i] = v;
            if (y16)
                reinterpret_cast<uint2*>(y16)[i] = make_uint2(pack_half2(v.x, v.y, kind), pack_half2(v.z, v.w, kind));
        }
        return;
    }
    const long long total = pixels * c;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const long long p = i / c;
        const int j = (int)(i - p * c);
        if (!F32 && (j < ca ? a : b) == nullptr) continue;
        const float v = j < ca ? a[p * ca + j] : b[p * cb + (j - ca)];
        if (F32) y[i] = v;
        if (y16) y16[i] = pack_half1(v, kind);
    }
}

extern "C" __global__ void concat_channels(const float* a, const float* b, float* y, uint16_t* y16, int kind,
                                           long long pixels, int ca, int cb, int vec4) {
    concat_body<true>(a, b, y, y16, kind, pixels, ca, cb, vec4);
}
// vec4 as concat_channels' (y16 8-byte aligned).
extern "C" __global__ void concat_channels_half(const float* a, const float* b, uint16_t* y16, int kind,
                                                long long pixels, int ca, int cb, int vec4) {
    concat_body<false>(a, b, nullptr, y16, kind, pixels, ca, cb, vec4);
}

// d[p, :] (+)= dy[p, offset .. offset + width], the adjoint of one side of a concatenation;
// where d16 is not null, also a copy of the new d in bf16 (kind 1) or fp16 (kind 2), rounded as
// a conversion launch would round it (the last contribution to a gradient that tensor-core
// convolutions read). vec4 as in concat_channels: c, offset and width multiples of 4, aligned
// pointers (d16 to 8 bytes).
extern "C" __global__ void concat_backward(const float* dy, float* d, uint16_t* d16, int kind, long long pixels, int c,
                                           int offset, int width, int accumulate, int vec4) {
    if (vec4) {
        const int c4 = c / 4, o4 = offset / 4, w4 = width / 4;
        const float4* dy4 = reinterpret_cast<const float4*>(dy);
        float4* d4 = reinterpret_cast<float4*>(d);
        const long long total4 = pixels * w4;
        for (long long i = grid_start(); i < total4; i += grid_stride()) {
            const long long p = i / w4;
            const int j = (int)(i - p * w4);
            float4 v = dy4[p * c4 + o4 + j];
            if (accumulate) {
                const float4 o = d4[i];
                v = make_float4(o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w);
            }
            d4[i] = v;
            if (d16)
                reinterpret_cast<uint2*>(d16)[i] = make_uint2(pack_half2(v.x, v.y, kind), pack_half2(v.z, v.w, kind));
        }
        return;
    }
    const long long total = pixels * width;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const long long p = i / width;
        const int j = (int)(i - p * width);
        const float v = dy[p * c + offset + j];
        const float out = accumulate ? d[i] + v : v;
        d[i] = out;
        if (d16) d16[i] = pack_half1(out, kind);
    }
}

// dst (+)= src: a residual's gradient. vec4: len % 4 == 0 and 16-byte aligned pointers (checked
// by the host), four floats per item.
extern "C" __global__ void add_into(float* dst, const float* src, long long len, int accumulate, int vec4) {
    if (vec4) {
        float4* d4 = reinterpret_cast<float4*>(dst);
        const float4* s4 = reinterpret_cast<const float4*>(src);
        for (long long i = grid_start(); i < len / 4; i += grid_stride()) {
            float4 v = s4[i];
            if (accumulate) {
                const float4 o = d4[i];
                v = make_float4(o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w);
            }
            d4[i] = v;
        }
        return;
    }
    for (long long i = grid_start(); i < len; i += grid_stride()) dst[i] = accumulate ? dst[i] + src[i] : src[i];
}

// x /= div in place: a gradient through an output scale factor (mid_block_scale_factor).
extern "C" __global__ void div_inplace(float* x, long long len, float div) {
    for (long long i = grid_start(); i < len; i += grid_stride()) x[i] = x[i] / div;
}

// diffusers' get_timestep_embedding, [n] -> [n, dim], with the CPU's arithmetic: exponents and
// the argument t * freq in f32, exp/sin/cos in f64 then rounded. log_period = -(f32)ln(10000),
// passed by the host so that both sides use the same f32 value. One thread per (image, i < half);
// an odd dim's last column is zero.
extern "C" __global__ void timestep_embedding(const float* t, float* y, int n, int dim, int flip, float shift,
                                              float log_period) {
    const int half = dim / 2;
    const int cols = half + (dim & 1);
    const long long total = (long long)n * cols;
    for (long long e = grid_start(); e < total; e += grid_stride()) {
        const int img = (int)(e / cols);
        const int i = (int)(e - (long long)img * cols);
        float* row = y + (long long)img * dim;
        if (i == half) {
            row[dim - 1] = 0.f;
            continue;
        }
        const float ex = (log_period * (float)i) / ((float)half - shift);
        const float freq = (float)exp((double)ex);
        const double arg = (double)(t[img] * freq);
        const float s = (float)sin(arg), co = (float)cos(arg);
        row[i] = flip ? co : s;
        row[half + i] = flip ? s : co;
    }
}
