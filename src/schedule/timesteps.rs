//! `set_timesteps(N)`: the inference timesteps of diffusers' DDPM and DDIM schedulers.

use super::config::{SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// The N timesteps, descending, for `cfg`'s spacing; the same formula serves DDPM and DDIM.
///
/// Fails when `n` is 0 or exceeds `num_train_timesteps` (diffusers raises too), and when the
/// spacing yields a timestep outside `0..T`: `leading` with a large `steps_offset`, and
/// `trailing` for the N (61, 103, 121, ... for T = 1000) where NumPy's float `arange` returns one
/// element too many and diffusers ends on timestep −1 (which torch silently reads as ᾱ[T−1]).
pub fn inference_timesteps(cfg: &SchedulerConfig, n: usize) -> Result<Vec<i64>> {
    let t = cfg.num_train_timesteps;
    if n == 0 || n > t {
        return Err(Error::input(format!(
            "number of inference steps must be in 1..={t} (num_train_timesteps of {}), got {n}",
            cfg.path().display()
        )));
    }
    let steps: Vec<i64> = match cfg.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = (t / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * ratio + cfg.steps_offset)
                .collect()
        }
        TimestepSpacing::Linspace => linspace_f64(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Trailing => arange_f64(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(|v| v.round_ties_even() as i64 - 1)
            .collect(),
    };
    if let Some(bad) = steps.iter().find(|&&s| s < 0 || s >= t as i64) {
        return Err(Error::input(format!(
            "{:?} spacing with {n} steps (steps_offset {}) gives timestep {bad}, outside 0..{t}",
            cfg.timestep_spacing, cfg.steps_offset
        )));
    }
    Ok(steps)
}

/// `numpy.linspace(start, stop, n)` in f64: `i * step + start`, last element set to `stop`.
fn linspace_f64(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut y: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    y[n - 1] = stop;
    y
}

/// `numpy.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, elements
/// `start`, `start + step`, then `start + i * delta` with `delta = (start + step) - start`, which
/// is how NumPy's `DOUBLE_fill` extrapolates from the first two.
fn arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}
