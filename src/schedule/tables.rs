//! The per-training-timestep tables β, α = 1 − β and ᾱ = ∏α, with torch's CPU rounding.

use super::config::{BetaSchedule, SchedulerConfig};
use crate::{Error, Result};

/// diffusers' cap on each beta of the cosine schedule.
const MAX_BETA: f64 = 0.999;

/// β_t, α_t and ᾱ_t for t = 0..T, exactly as diffusers builds them in float32 on the CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    /// β_t.
    pub betas: Vec<f32>,
    /// α_t = 1 − β_t (one f32 subtraction).
    pub alphas: Vec<f32>,
    /// ᾱ_t: torch's CPU `cumprod` accumulates in f64 and rounds each prefix to f32.
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Builds the tables of `cfg`; fails if a beta lies outside [0, 1), which would make a square
    /// root of the schedule NaN.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        let t = cfg.num_train_timesteps;
        let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::Linear) => linspace_f32(cfg.beta_start, cfg.beta_end, t),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), t)
                    .into_iter()
                    .map(|s| s * s)
                    .collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => betas_for_alpha_bar(t),
        };
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(0.0..1.0).contains(*b))
        {
            // The linspace's first half counts from beta_start, its second from beta_end.
            let key = match (&cfg.trained_betas, cfg.beta_schedule) {
                (Some(_), _) => "trained_betas",
                (None, BetaSchedule::SquaredcosCapV2) => "beta_schedule",
                (None, _) if i < t / 2 => "beta_start",
                (None, _) => "beta_end",
            };
            return Err(Error::config(
                cfg.path(),
                key,
                format!("beta[{i}] = {b} is outside [0, 1)"),
            ));
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut acc = 1.0f64;
        let alphas_cumprod = alphas
            .iter()
            .map(|&a| {
                acc *= f64::from(a);
                acc as f32
            })
            .collect();
        Ok(NoiseSchedule {
            betas,
            alphas,
            alphas_cumprod,
        })
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` bit for bit (torch's CPU kernel, which the
/// compiler fuses into FMAs): the first half counts up from `start`, the second half down from
/// `end`, so both ends are exact.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (cosine transform): Python float arithmetic, then one
/// rounding to f32 by `torch.tensor(betas, dtype=torch.float32)`.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA) as f32
        })
        .collect()
}
