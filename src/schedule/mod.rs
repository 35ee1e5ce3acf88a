//! Noise schedules and the DDPM / DDIM schedulers, with diffusers' float32 arithmetic.
//!
//! A scheduler turns a timestep into plain f32 scalars ([`StepCoeffs`], [`GuidanceCoeffs`]);
//! the tensors are then updated elementwise by whichever backend holds them, with the formula
//! of [`StepCoeffs::x0`] / [`StepCoeffs::prev`] (reference: [`step_slice`]).
//!
//! Parity with torch (diffusers 0.42.1, torch 2.15 CPU): the tables, timesteps and every
//! quantity without a square root are bit-exact; torch's CPU `sqrt` is not correctly rounded
//! (about one value in five is 1 ulp off), so √-derived scalars may differ by an ulp or two
//! (more for DDIM's `√(1 − ᾱ_prev − std²)`, where the subtraction cancels). Ours use correctly
//! rounded square roots, which a CUDA kernel's `sqrtf` reproduces.

mod coeffs;
mod config;
mod ddim;
mod ddpm;
mod tables;
mod timesteps;

pub use coeffs::{step_slice, GuidanceCoeffs, StepCoeffs};
pub use config::{BetaSchedule, SchedulerConfig, TimestepSpacing, VarianceType};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use tables::NoiseSchedule;
pub use timesteps::inference_timesteps;

use crate::{Error, Result};

/// What the samplers need from a scheduler, whichever kind it is.
pub trait Scheduler: Send + Sync {
    /// The configuration the scheduler was built from.
    fn config(&self) -> &SchedulerConfig;

    /// ᾱ_t for t = 0..T.
    fn alphas_cumprod(&self) -> &[f32];

    /// Chooses `n` inference timesteps (see [`inference_timesteps`]) and returns them.
    fn set_timesteps(&mut self, n: usize) -> Result<Vec<i64>>;

    /// The current timesteps, descending (all T before `set_timesteps`).
    fn timesteps(&self) -> &[i64];

    /// The timestep a step from `t` lands on; −1 after the last.
    fn previous_timestep(&self, t: i64) -> Result<i64>;

    /// The scalars of the step from `t`.
    fn step_coeffs(&self, t: i64) -> Result<StepCoeffs>;

    /// The scalars the guided samplers (DPS, ΠGDM) need at `t`.
    fn guidance_coeffs(&self, t: i64) -> Result<GuidanceCoeffs>;
}

/// ᾱ_t, or an error naming `t` when it is outside the table.
fn alpha_prod(alphas_cumprod: &[f32], t: i64) -> Result<f32> {
    usize::try_from(t)
        .ok()
        .and_then(|i| alphas_cumprod.get(i).copied())
        .ok_or_else(|| {
            Error::input(format!(
                "timestep {t} is outside the {} training timesteps",
                alphas_cumprod.len()
            ))
        })
}
