//! The per-step scalars of one reverse step, and the elementwise formula that uses them.
//!
//! DDPM and DDIM differ only in which coefficients are zero, so one formula (and one GPU kernel)
//! serves both:
//! ```text
//! x0   = (x - sqrt_one_minus_alpha_prod * eps) / sqrt_alpha_prod     then clamp to ±clip
//! prev = c_x0 * x0 + c_xt * x + c_eps * eps  [+ noise_std * z  if uses_noise]
//! ```
//! Each operation is one f32 rounding, left to right, which is what diffusers' tensor code does;
//! a term whose coefficient is exactly 0 (`c_eps` in DDPM, `c_xt` in DDIM) is skipped, because
//! diffusers never computes it: this only matters for signed zeros and non-finite inputs.

use crate::{Error, Result};

/// Smallest DDPM posterior variance: diffusers clamps it so that a log would stay finite.
pub(crate) const MIN_VARIANCE: f32 = 1e-20;

/// The scalars of one DDPM or DDIM step from timestep `t` to `prev_t`, in f32 with diffusers'
/// operation order (see the module doc for the formula they feed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoeffs {
    /// Current timestep.
    pub t: i64,
    /// Timestep the step lands on; −1 after the last one.
    pub prev_t: i64,
    /// ᾱ_t.
    pub alpha_prod_t: f32,
    /// ᾱ_prev (1, or ᾱ_0 for DDIM with `set_alpha_to_one = false`, when `prev_t < 0`).
    pub alpha_prod_t_prev: f32,
    /// √ᾱ_t, the divisor of the x0 prediction.
    pub sqrt_alpha_prod: f32,
    /// √(1 − ᾱ_t), the weight of ε in the x0 prediction.
    pub sqrt_one_minus_alpha_prod: f32,
    /// x0 is clamped to [−clip, clip] (diffusers' `clip_sample_range`) when set.
    pub clip: Option<f32>,
    /// Weight of the (clamped) x0 in `prev`: DDPM `√ᾱ_prev·β_t/(1−ᾱ_t)`, DDIM `√ᾱ_prev`.
    pub c_x0: f32,
    /// Weight of x_t in `prev`: DDPM `√α_t·(1−ᾱ_prev)/(1−ᾱ_t)`, DDIM 0.
    pub c_xt: f32,
    /// Weight of ε in `prev`: DDPM 0, DDIM `√(1 − ᾱ_prev − std²)`.
    pub c_eps: f32,
    /// The step's variance: DDPM `_get_variance(t)` (per `variance_type`), DDIM's σ_t²/η².
    pub variance: f32,
    /// Standard deviation multiplying z: DDPM `√variance`, DDIM `η·√variance`; 0 where
    /// diffusers draws no noise.
    pub noise_std: f32,
    /// Whether diffusers draws a noise tensor at this step (DDPM: `t > 0`; DDIM: `η > 0`, at
    /// every step including the last). Samplers must consume noise exactly when this is true
    /// to stay in step with a reference run.
    pub uses_noise: bool,
}

impl StepCoeffs {
    /// The predicted (and clamped) x0 of one element.
    #[inline]
    pub fn x0(&self, x: f32, eps: f32) -> f32 {
        let x0 = (x - self.sqrt_one_minus_alpha_prod * eps) / self.sqrt_alpha_prod;
        match self.clip {
            // Written out rather than `f32::clamp` so NaN propagates like torch's clamp.
            Some(c) if x0 < -c => -c,
            Some(c) if x0 > c => c,
            _ => x0,
        }
    }

    /// x_prev of one element from its x0 (as returned by [`StepCoeffs::x0`]), x_t, ε and the
    /// standard-normal draw `z` (ignored unless `uses_noise`).
    #[inline]
    pub fn prev(&self, x0: f32, x: f32, eps: f32, z: f32) -> f32 {
        let mut p = self.c_x0 * x0;
        if self.c_xt != 0.0 {
            p += self.c_xt * x;
        }
        if self.c_eps != 0.0 {
            p += self.c_eps * eps;
        }
        if self.uses_noise {
            p += self.noise_std * z;
        }
        p
    }
}

/// The elementwise reference step over whole buffers: fills `x0_out` (clamped x0, diffusers'
/// `pred_original_sample`) and `prev_out` (`prev_sample`). `z` is required when
/// `coeffs.uses_noise`, ignored otherwise.
pub fn step_slice(
    coeffs: &StepCoeffs,
    eps: &[f32],
    x: &[f32],
    z: Option<&[f32]>,
    x0_out: &mut [f32],
    prev_out: &mut [f32],
) -> Result<()> {
    let n = x.len();
    for (name, len) in [
        ("eps", eps.len()),
        ("x0_out", x0_out.len()),
        ("prev_out", prev_out.len()),
    ] {
        if len != n {
            return Err(Error::input(format!(
                "scheduler step at t={}: `{name}` has {len} elements, `x` has {n}",
                coeffs.t
            )));
        }
    }
    let z = match (coeffs.uses_noise, z) {
        (true, None) => {
            return Err(Error::input(format!(
                "scheduler step at t={} adds noise but no noise buffer was given",
                coeffs.t
            )))
        }
        (true, Some(z)) if z.len() != n => {
            return Err(Error::input(format!(
                "scheduler step at t={}: noise has {} elements, `x` has {n}",
                coeffs.t,
                z.len()
            )))
        }
        (true, z) => z,
        (false, _) => None,
    };
    for i in 0..n {
        let x0 = coeffs.x0(x[i], eps[i]);
        x0_out[i] = x0;
        prev_out[i] = coeffs.prev(x0, x[i], eps[i], z.map_or(0.0, |z| z[i]));
    }
    Ok(())
}

/// The per-step scalars of the notebook's guided samplers, computed with 0-d float32 tensors
/// there and in f32 with the same operation order here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuidanceCoeffs {
    /// Current timestep.
    pub t: i64,
    /// The scheduler's previous timestep (DDPM `previous_timestep`, DDIM `t − T/N`).
    pub prev_t: i64,
    /// `alpha_beta`'s `current_alpha_t = ᾱ_t / ᾱ_prev`.
    pub alpha_t: f32,
    /// `current_beta_t = 1 − alpha_t`.
    pub beta_t: f32,
    /// DPS's adaptive weight η_t = β_t / √α_t (notebook eq. 2).
    pub dps_eta: f32,
    /// ΠGDM's `scheduler._get_variance(t, prev_t)`: for DDPM the prev argument is ignored and
    /// this is the configured variance (fixed_small: clamped at 1e-20); for DDIM it is DDIM's
    /// unclamped variance.
    pub pigdm_variance: f32,
    /// ΠGDM's r = √(variance / (variance + 1)).
    pub pigdm_r: f32,
    /// r² (`r ** 2`, one f32 product).
    pub pigdm_r2: f32,
    /// ΠGDM's `current_alpha_t = 1 / (1 + variance)`.
    pub pigdm_alpha: f32,
    /// √pigdm_alpha.
    pub pigdm_sqrt_alpha: f32,
}

impl GuidanceCoeffs {
    /// Computes the ΠGDM quantities from `variance` and the DPS ones from ᾱ_t and ᾱ_prev.
    pub(crate) fn new(t: i64, prev_t: i64, a_t: f32, a_p: f32, variance: f32) -> Self {
        let alpha_t = a_t / a_p;
        let beta_t = 1.0 - alpha_t;
        let r = (variance / (variance + 1.0)).sqrt();
        // torch evaluates `1 / tensor` as `tensor.reciprocal() * 1`, which rounds the same.
        let pigdm_alpha = 1.0 / (variance + 1.0);
        GuidanceCoeffs {
            t,
            prev_t,
            alpha_t,
            beta_t,
            dps_eta: beta_t / alpha_t.sqrt(),
            pigdm_variance: variance,
            pigdm_r: r,
            pigdm_r2: r * r,
            pigdm_alpha,
            pigdm_sqrt_alpha: pigdm_alpha.sqrt(),
        }
    }

    /// The notebook's DPS weight `scale * eta_t` (η_t = [`Self::dps_eta`] when `adaptive`,
    /// else 1), multiplying the gradient in `x_t = x_prev - weight * g`.
    pub fn dps_weight(&self, scale: f32, adaptive: bool) -> f32 {
        if adaptive {
            scale * self.dps_eta
        } else {
            scale
        }
    }

    /// The notebook's ΠGDM update of one element,
    /// `x_prec + scale * grad * (r ** 2) * sqrt(current_alpha_t)`, rounded left to right.
    #[inline]
    pub fn pigdm_update(&self, x_prec: f32, grad: f32, scale: f32) -> f32 {
        x_prec + scale * grad * self.pigdm_r2 * self.pigdm_sqrt_alpha
    }
}
