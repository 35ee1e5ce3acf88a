//! diffusers' `DDPMScheduler` (epsilon prediction, fixed variances).

use super::coeffs::{GuidanceCoeffs, StepCoeffs, MIN_VARIANCE};
use super::config::{SchedulerConfig, VarianceType};
use super::tables::NoiseSchedule;
use super::timesteps::inference_timesteps;
use super::{alpha_prod, Scheduler};
use crate::{Error, Result};

/// The DDPM ancestral sampler with diffusers' arithmetic.
#[derive(Clone, Debug)]
pub struct Ddpm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<i64>,
    num_inference_steps: Option<usize>,
}

impl Ddpm {
    /// Builds the tables; fails on a `variance_type` other than fixed_small / fixed_large.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        if let VarianceType::Unsupported(v) = &config.variance_type {
            return Err(Error::config(
                config.path(),
                "variance_type",
                format!("`{v}` is not implemented for DDPM (expected fixed_small or fixed_large)"),
            ));
        }
        let schedule = NoiseSchedule::new(&config)?;
        let timesteps = (0..config.num_train_timesteps as i64).rev().collect();
        Ok(Ddpm {
            config,
            schedule,
            timesteps,
            num_inference_steps: None,
        })
    }

    /// The β, α, ᾱ tables.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// N of the last `set_timesteps`, `None` before the first.
    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// diffusers' `_get_variance(t)` for the configured `variance_type`.
    pub fn variance(&self, t: i64) -> Result<f32> {
        let prev_t = self.previous_timestep(t)?;
        let (a_t, a_p) = self.alpha_pair(t, prev_t)?;
        Ok(self.variance_of(a_t, a_p))
    }

    fn alpha_pair(&self, t: i64, prev_t: i64) -> Result<(f32, f32)> {
        let acp = &self.schedule.alphas_cumprod;
        let a_t = alpha_prod(acp, t)?;
        let a_p = if prev_t >= 0 {
            alpha_prod(acp, prev_t)?
        } else {
            1.0
        };
        Ok((a_t, a_p))
    }

    fn variance_of(&self, a_t: f32, a_p: f32) -> f32 {
        let current_beta = 1.0 - a_t / a_p;
        let v = (1.0 - a_p) / (1.0 - a_t) * current_beta;
        // Written out rather than `f32::max` so NaN propagates like torch's clamp.
        let v = if v < MIN_VARIANCE { MIN_VARIANCE } else { v };
        match self.config.variance_type {
            VarianceType::FixedLarge => current_beta,
            _ => v,
        }
    }
}

impl Scheduler for Ddpm {
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

    /// The next entry of the timesteps after `t` (−1 after the last); `t − 1` before
    /// `set_timesteps`. An error if `t` is not one of the timesteps, where diffusers raises.
    fn previous_timestep(&self, t: i64) -> Result<i64> {
        if self.num_inference_steps.is_none() {
            return Ok(t - 1);
        }
        let i = self.timesteps.iter().position(|&s| s == t).ok_or_else(|| {
            Error::input(format!(
                "timestep {t} is not one of the {} DDPM inference timesteps",
                self.timesteps.len()
            ))
        })?;
        Ok(self.timesteps.get(i + 1).copied().unwrap_or(-1))
    }

    fn step_coeffs(&self, t: i64) -> Result<StepCoeffs> {
        let prev_t = self.previous_timestep(t)?;
        let (a_t, a_p) = self.alpha_pair(t, prev_t)?;
        let b_t = 1.0 - a_t;
        let b_p = 1.0 - a_p;
        let current_alpha = a_t / a_p;
        let current_beta = 1.0 - current_alpha;
        let variance = self.variance_of(a_t, a_p);
        let uses_noise = t > 0;
        Ok(StepCoeffs {
            t,
            prev_t,
            alpha_prod_t: a_t,
            alpha_prod_t_prev: a_p,
            sqrt_alpha_prod: a_t.sqrt(),
            sqrt_one_minus_alpha_prod: b_t.sqrt(),
            clip: self.config.clip(),
            c_x0: a_p.sqrt() * current_beta / b_t,
            c_xt: current_alpha.sqrt() * b_p / b_t,
            c_eps: 0.0,
            variance,
            noise_std: if uses_noise { variance.sqrt() } else { 0.0 },
            uses_noise,
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
            self.variance_of(a_t, a_p),
        ))
    }
}
