//! diffusers' `DDIMScheduler` (epsilon prediction, `use_clipped_model_output = false`).

use super::coeffs::{GuidanceCoeffs, StepCoeffs};
use super::config::SchedulerConfig;
use super::tables::NoiseSchedule;
use super::timesteps::inference_timesteps;
use super::{alpha_prod, Scheduler};
use crate::{Error, Result};

/// The DDIM sampler with diffusers' arithmetic and a fixed η.
#[derive(Clone, Debug)]
pub struct Ddim {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    eta: f32,
    timesteps: Vec<i64>,
    num_inference_steps: Option<usize>,
}

impl Ddim {
    /// Builds the tables for noise weight `eta` (0: deterministic DDIM, 1: DDPM-like). diffusers
    /// takes η per `step` call as a Python float and rounds it to f32 against the f32 variance.
    pub fn new(config: SchedulerConfig, eta: f32) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::input(format!(
                "DDIM eta must be a finite number >= 0, got {eta}"
            )));
        }
        let schedule = NoiseSchedule::new(&config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let timesteps = (0..config.num_train_timesteps as i64).rev().collect();
        Ok(Ddim {
            config,
            schedule,
            final_alpha_cumprod,
            eta,
            timesteps,
            num_inference_steps: None,
        })
    }

    /// The β, α, ᾱ tables.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The noise weight η.
    pub fn eta(&self) -> f32 {
        self.eta
    }

    /// N of the last `set_timesteps`, `None` before the first.
    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// diffusers' DDIM `_get_variance(t, prev_t)` (no clamp).
    pub fn variance(&self, t: i64) -> Result<f32> {
        let prev_t = self.previous_timestep(t)?;
        let (a_t, a_p) = self.alpha_pair(t, prev_t)?;
        Ok(variance_of(a_t, a_p))
    }

    fn alpha_pair(&self, t: i64, prev_t: i64) -> Result<(f32, f32)> {
        let acp = &self.schedule.alphas_cumprod;
        let a_t = alpha_prod(acp, t)?;
        let a_p = if prev_t >= 0 {
            alpha_prod(acp, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        Ok((a_t, a_p))
    }
}

/// `(1 − ᾱ_prev) / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_prev)`, in diffusers' order.
fn variance_of(a_t: f32, a_p: f32) -> f32 {
    (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
}

impl Scheduler for Ddim {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn set_timesteps(&mut self, n: usize) -> Result<Vec<i64>> {
        self.timesteps = inference_timesteps(&self.config, n)?;
        self.num_inference_steps = Some(n);
        Ok(self.timesteps.clone())
    }

    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// `t − T / N` whatever the spacing, as DDIM's `step` computes it (diffusers' DDIM has no
    /// `previous_timestep`); an error before `set_timesteps`, where diffusers' `step` raises.
    fn previous_timestep(&self, t: i64) -> Result<i64> {
        let n = self.num_inference_steps.ok_or_else(|| {
            Error::input("DDIM needs set_timesteps before stepping (number of steps unknown)")
        })?;
        Ok(t - (self.config.num_train_timesteps / n) as i64)
    }

    fn step_coeffs(&self, t: i64) -> Result<StepCoeffs> {
        let prev_t = self.previous_timestep(t)?;
        let (a_t, a_p) = self.alpha_pair(t, prev_t)?;
        let variance = variance_of(a_t, a_p);
        let std = self.eta * variance.sqrt();
        let mut direction = 1.0 - a_p - std * std;
        if self.eta <= 1.0 && (-4.0 * f32::EPSILON * (1.0 - a_p)..0.0).contains(&direction) {
            // For eta <= 1 the variance is at most 1 - ᾱ_prev, but where ᾱ_t is tiny the f32
            // variance rounds to 1 - ᾱ_prev and std² an ulp above it: the weight is 0, where
            // diffusers' square root returns NaN. (Only that far: more is not rounding.)
            direction = 0.0;
        }
        if direction.is_nan() || direction < 0.0 {
            // diffusers' step returns NaN here, from the square root below.
            let hint = if self.eta > 1.0 {
                "; eta <= 1 keeps the std within √(1 − ᾱ_prev)"
            } else {
                ""
            };
            return Err(Error::input(format!(
                "DDIM eta {}: at t = {t} the predicted noise's weight √(1 − ᾱ_prev − std²) is not \
                 a number (ᾱ_prev = {a_p}, std = η·√variance = {std}, √(1 − ᾱ_prev) = {}){hint}",
                self.eta,
                (1.0 - a_p).sqrt()
            )));
        }
        Ok(StepCoeffs {
            t,
            prev_t,
            alpha_prod_t: a_t,
            alpha_prod_t_prev: a_p,
            sqrt_alpha_prod: a_t.sqrt(),
            sqrt_one_minus_alpha_prod: (1.0 - a_t).sqrt(),
            clip: self.config.clip(),
            c_x0: a_p.sqrt(),
            c_xt: 0.0,
            c_eps: direction.sqrt(),
            variance,
            noise_std: std,
            uses_noise: self.eta > 0.0,
        })
    }

    fn guidance_coeffs(&self, t: i64) -> Result<GuidanceCoeffs> {
        let prev_t = self.previous_timestep(t)?;
        let (a_t, a_p) = self.alpha_pair(t, prev_t)?;
        Ok(GuidanceCoeffs::new(
            t,
            prev_t,
            a_t,
            a_p,
            variance_of(a_t, a_p),
        ))
    }
}
