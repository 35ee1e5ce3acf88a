// The per-step scalars of the device sampling loop (src/cuda/sampler.rs), shared by sampler.cu and
// fft.cu.
//
// The host uploads one row per loop step before the loop, and a device counter says which row is
// current: every kernel of a step reads `rows[*counter]` and the last kernel of the step increments
// the counter. One captured CUDA graph therefore serves every step, since no launch argument
// changes between steps. Every field is 4 bytes so that the Rust mirror (`StepRow` in
// src/cuda/sampler_kernels.rs) has the same layout without padding rules to get right.
#pragma once

// StepRow::flags bits.
#define ROW_CLIP 1   // clamp x0 to [-clip, clip] (StepCoeffs::clip is Some)
#define ROW_NOISE 2  // the step adds noise (StepCoeffs::uses_noise)

struct StepRow {
    float t;                 // the UNet's timestep input
    float s0;                // StepCoeffs::sqrt_alpha_prod
    float s1;                // StepCoeffs::sqrt_one_minus_alpha_prod
    float clip;              // StepCoeffs::clip when ROW_CLIP
    float c_x0;              // StepCoeffs::c_x0
    float c_xt;              // StepCoeffs::c_xt
    float c_eps;             // StepCoeffs::c_eps
    float noise_std;         // StepCoeffs::noise_std
    float dps_w;             // GuidanceCoeffs::dps_weight(scale, adaptive)
    float pigdm_r2;          // GuidanceCoeffs::pigdm_r2
    float pigdm_sqrt_alpha;  // GuidanceCoeffs::pigdm_sqrt_alpha
    int flags;               // ROW_* bits
    int step;                // loop step index i: seeded noise draws from slot i + 1
    int z_slot;              // injected noise: which [B, C, H, W] slice of z this step reads
};
