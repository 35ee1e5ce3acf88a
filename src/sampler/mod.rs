//! Sampling loops: unconditional DDPM/DDIM (the notebook's `ddpm_sampling`), and posterior
//! sampling for inverse problems with DPS (fixed or adaptive step weight) and ΠGDM
//! (the notebook's `dps_sampling` and `pigdm_sampling`).
//!
//! The loops follow the notebook line by line (REFERENCE.md §4.4) with one deliberate change:
//! every guidance term is computed **per image**. The notebook's DPS takes one norm over the
//! whole batch, so each image's update depends on the others; here image b uses
//! `||A_b(x0_hat_b) - y_b||`, which equals the notebook's value for a batch of one, and an image's
//! result does not depend on what else is in the batch.
//!
//! Gradients follow PyTorch's autograd through the notebook's graph:
//! `x_t -> eps = UNet(x_t) -> x0 = (x_t - √(1-ᾱ)·eps)/√ᾱ -> clamp(±1) -> clean_output ->`
//! the guidance scalar. The clamps pass gradient only strictly inside their range, as
//! PyTorch's clamp backward does.

pub mod noise;

use std::sync::Arc;

use rayon::prelude::*;

use crate::engine::Engine;
use crate::inverse::{clean_output, CircularBlur, LinearOperator};
use crate::schedule::{GuidanceCoeffs, Scheduler, StepCoeffs};
use crate::{ensure, Error, Result, Tensor};
pub use noise::Noise;

/// How the measurement steers the sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guidance {
    /// Unconditional sampling.
    None,
    /// DPS: `x_{t-1} = x'_{t-1} - scale·η_t·∇_{x_t}||A(x0_hat) - y||`, η_t = 1 (fixed) or
    /// β_t/√α_t (adaptive).
    Dps { scale: f32, adaptive: bool },
    /// ΠGDM: `x_{t-1} = x'_{t-1} + scale·r_t²·√α_t·J^T h`, with `h` the Wiener-type
    /// pseudo-inverse of the residual at measurement noise `sigma`.
    Pigdm { scale: f32, sigma: f32 },
}

impl Guidance {
    /// An error unless the scale, and ΠGDM's noise level, are finite numbers >= 0: anything else
    /// diverges, or samples away from the measurement.
    pub fn check(&self) -> Result<()> {
        if let Guidance::Dps { scale, .. } | Guidance::Pigdm { scale, .. } = *self {
            ensure!(
                scale.is_finite() && scale >= 0.0,
                "the guidance scale must be a finite number >= 0 (0 samples without guidance), \
                 got {scale}"
            );
        }
        if let Guidance::Pigdm { sigma, .. } = *self {
            ensure!(
                sigma.is_finite() && sigma >= 0.0,
                "sigma must be a finite number >= 0, got {sigma}"
            );
        }
        Ok(())
    }
}

/// The measurements of a batch: one operator and one measurement per image, in image space
/// `[0, 1]` as in the notebook.
pub struct Measurements {
    pub operators: Vec<Arc<dyn LinearOperator>>,
    /// `[B, C, H, W]`.
    pub y: Tensor,
}

/// Per-step progress, for progress bars and reports.
pub struct StepReport {
    /// Loop step (0 = first, noisiest).
    pub index: usize,
    pub timestep: i64,
    /// Wall time of the step in seconds (the GPU loop reports the step's GPU time, measured
    /// with events).
    pub seconds: f64,
}

/// Runs the whole reverse process on `engine` and returns the final sample in model space
/// (`[-1, 1]` scale, not clamped). `scheduler` must have its timesteps set.
///
/// On a CUDA engine the whole loop runs on the GPU (see [`crate::cuda`]'s device sampler) when
/// there is no guidance or every operator is a [`CircularBlur`]; otherwise, and on the CPU, the
/// host loop runs, which is the reference.
pub fn sample(
    engine: &mut Engine,
    scheduler: &dyn Scheduler,
    guidance: Guidance,
    measurements: Option<&Measurements>,
    noise: &Noise,
    shape: [usize; 4],
    mut progress: impl FnMut(&StepReport),
) -> Result<Tensor> {
    let steps = 0..scheduler.timesteps().len();
    run(
        engine,
        scheduler,
        guidance,
        measurements,
        noise,
        Start::Noise(shape),
        steps,
        &mut progress,
    )
}

/// Runs loop steps `steps` (indices into the scheduler's timesteps) from the state `x`; noise
/// draws are those of the same step indices, so a run can be resumed or checked step by step.
/// Runs on the GPU under the same conditions as [`sample`].
#[allow(clippy::too_many_arguments)]
pub fn sample_steps(
    engine: &mut Engine,
    scheduler: &dyn Scheduler,
    guidance: Guidance,
    measurements: Option<&Measurements>,
    noise: &Noise,
    x: Tensor,
    steps: std::ops::Range<usize>,
    mut progress: impl FnMut(&StepReport),
) -> Result<Tensor> {
    run(
        engine,
        scheduler,
        guidance,
        measurements,
        noise,
        Start::State(x),
        steps,
        &mut progress,
    )
}

/// Where a run starts.
enum Start {
    /// x_T of the noise, for images of this shape.
    Noise([usize; 4]),
    State(Tensor),
}

#[allow(clippy::too_many_arguments)]
fn run(
    engine: &mut Engine,
    scheduler: &dyn Scheduler,
    guidance: Guidance,
    measurements: Option<&Measurements>,
    noise: &Noise,
    start: Start,
    steps: std::ops::Range<usize>,
    progress: &mut dyn FnMut(&StepReport),
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    ensure!(
        steps.end <= timesteps.len(),
        "steps {steps:?} are outside the scheduler's {} timesteps",
        timesteps.len()
    );
    let coeffs = timesteps
        .iter()
        .map(|&t| scheduler.step_coeffs(t))
        .collect::<Result<Vec<_>>>()?;
    let shape: [usize; 4] = match &start {
        Start::Noise(shape) => *shape,
        Start::State(x) => x.shape().try_into().map_err(|_| {
            Error::input(format!(
                "sampler state must be [B,C,H,W], got {:?}",
                x.shape()
            ))
        })?,
    };
    let needs_z = coeffs[steps.clone()].iter().any(|c| c.uses_noise);
    noise.check(shape, timesteps.len(), needs_z)?;
    if guidance != Guidance::None {
        let m = measurements.ok_or_else(|| Error::input("guided sampling needs measurements"))?;
        check_measurements(m, shape)?;
    }
    guidance.check()?;

    if let (false, Some(unet)) = (steps.is_empty(), engine.cuda_mut()) {
        if let Some(blur) = device_blur(guidance, measurements, shape) {
            let graphs = unet.uses_graphs();
            let job = crate::cuda::DeviceJob {
                shape,
                steps,
                scheduler,
                coeffs: &coeffs,
                guidance,
                blur,
                noise,
                start: match &start {
                    Start::Noise(_) => None,
                    Start::State(x) => Some(x),
                },
            };
            return crate::cuda::sample_on_device(unet, &job, graphs, progress);
        }
    }

    // The host loop holds the state, a step's noise, the network's output and the next state,
    // at the least (the device loop, above, holds them on the GPU).
    crate::host::check_fits(
        crate::host::f32_bytes(&shape, 4),
        &format!("the sampler's arrays for a batch of {shape:?}"),
    )?;
    let mut x = match start {
        Start::Noise(shape) => noise.initial(shape),
        Start::State(x) => x,
    };
    for i in steps {
        let (t, c) = (timesteps[i], &coeffs[i]);
        let start = std::time::Instant::now();
        let z = c.uses_noise.then(|| noise.step(i, shape));
        x = match (guidance, measurements) {
            (Guidance::None, _) | (_, None) => {
                let eps = engine.forward(&x, &[t as f32])?;
                step(c, &x, &eps, z.as_ref()).prev
            }
            (g, Some(m)) => guided_step(engine, scheduler, c, g, m, &x, z.as_ref())?,
        };
        if !x.all_finite() {
            return Err(Error::Diverged { step: i, t });
        }
        progress(&StepReport {
            index: i,
            timestep: t,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(x)
}

/// What the device loop needs to guide a run, when it can: `Some(None)` for unguided sampling,
/// `Some(Some(blurs and measurements))` when every operator is a [`CircularBlur`] the GPU
/// takes, `None` when the host loop must run.
#[allow(clippy::type_complexity)]
fn device_blur(
    guidance: Guidance,
    measurements: Option<&Measurements>,
    [_, _, h, w]: [usize; 4],
) -> Option<Option<(Vec<&CircularBlur>, &Tensor)>> {
    match (guidance, measurements) {
        (Guidance::None, _) | (_, None) => Some(None),
        (_, Some(m)) => {
            let ops = m
                .operators
                .iter()
                .map(|op| op.as_circular_blur())
                .collect::<Option<Vec<_>>>()?;
            crate::cuda::device_blur_fits(h, w).then_some(Some((ops, &m.y)))
        }
    }
}

fn check_measurements(m: &Measurements, shape: [usize; 4]) -> Result<()> {
    ensure!(
        m.y.shape() == shape,
        "measurement: shape {:?} does not match the images being restored {shape:?}",
        m.y.shape()
    );
    ensure!(
        m.operators.len() == shape[0],
        "{} operators for a batch of {}",
        m.operators.len(),
        shape[0]
    );
    for op in &m.operators {
        ensure!(
            op.input_shape() == [shape[1], shape[2], shape[3]]
                && op.output_shape() == op.input_shape(),
            "operator maps {:?} to {:?}, the images are {:?}",
            op.input_shape(),
            op.output_shape(),
            &shape[1..]
        );
    }
    ensure!(
        m.y.all_finite(),
        "measurement: holds NaN or infinite values"
    );
    Ok(())
}

/// The scheduler step's outputs.
pub(crate) struct Stepped {
    /// x0 before the clamp (its gradient mask needs it).
    pub x0_raw: Vec<f32>,
    /// The clamped x0 the scheduler uses (`pred_original_sample`).
    pub x0: Vec<f32>,
    /// `prev_sample`.
    pub prev: Tensor,
}

/// One DDPM/DDIM step, elementwise.
pub(crate) fn step(c: &StepCoeffs, x: &Tensor, eps: &Tensor, z: Option<&Tensor>) -> Stepped {
    let n = x.numel();
    let (mut x0_raw, mut x0, mut prev) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let (xs, es) = (x.data(), eps.data());
    x0_raw
        .par_iter_mut()
        .zip(x0.par_iter_mut())
        .zip(prev.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((r, x0v), p))| {
            *r = (xs[i] - c.sqrt_one_minus_alpha_prod * es[i]) / c.sqrt_alpha_prod;
            *x0v = c.x0(xs[i], es[i]);
            *p = c.prev(*x0v, xs[i], es[i], z.map_or(0.0, |z| z.data()[i]));
        });
    Stepped {
        x0_raw,
        x0,
        prev: Tensor::new(x.shape().to_vec(), prev).expect("same shape as x"),
    }
}

/// One DPS or ΠGDM step: the scheduler step, the guidance gradient through the network, the
/// update.
fn guided_step(
    engine: &mut Engine,
    scheduler: &dyn Scheduler,
    c: &StepCoeffs,
    guidance: Guidance,
    m: &Measurements,
    x: &Tensor,
    z: Option<&Tensor>,
) -> Result<Tensor> {
    let gc = scheduler.guidance_coeffs(c.t)?;
    let eps = engine.forward_recording(x, &[c.t as f32])?;
    let s = step(c, x, &eps, z);
    let per = x.numel() / x.shape()[0];
    // d(guidance scalar)/d x0_hat, per image.
    let mut d_xhat = vec![0.0f32; x.numel()];
    let y = m.y.data();
    d_xhat
        .par_chunks_mut(per)
        .enumerate()
        .try_for_each(|(b, d)| -> Result<()> {
            let xhat: Vec<f32> = s.x0[b * per..(b + 1) * per]
                .iter()
                .map(|&v| clean_output(v))
                .collect();
            let yb = &y[b * per..(b + 1) * per];
            let op = &m.operators[b];
            match guidance {
                Guidance::Dps { .. } => {
                    // d||A x - y|| = Aᵀ (A x - y) / ||A x - y|| (zero at zero, as torch.norm).
                    let mut r = vec![0.0f32; per];
                    op.forward(&xhat, &mut r)?;
                    r.iter_mut().zip(yb).for_each(|(a, b)| *a -= b);
                    if normalize_residual(&mut r) {
                        op.adjoint(&r, d)?;
                    }
                }
                Guidance::Pigdm { sigma, .. } => {
                    // The guidance vector is detached: the scalar is <h, x0_hat>, so d/dx0_hat = h.
                    let sigma = if sigma == 0.0 { 1e-8 } else { sigma };
                    op.pinv_residual(yb, &xhat, gc.pigdm_r, sigma, d)?;
                }
                Guidance::None => unreachable!("unguided steps do not come here"),
            }
            Ok(())
        })?;
    let (d_direct, cot) = chain_rule(c, &s, &d_xhat);
    if !cot.iter().all(|v| v.is_finite()) {
        // The next state would not be finite either: the loop reports divergence at this step,
        // as the device loop does, where the network would refuse the cotangent.
        return Tensor::new(x.shape().to_vec(), vec![f32::NAN; x.numel()]);
    }
    let cot = Tensor::new(x.shape().to_vec(), cot)?;
    let g_eps = engine.vjp(&cot)?;
    let out = update(&gc, guidance, s.prev.data(), &d_direct, g_eps.data());
    Tensor::new(x.shape().to_vec(), out)
}

/// DPS's `r / ||r||` in place, the norm summed in f64; false (and `r` untouched) when the norm
/// is zero, where the gradient is zero as torch.norm's.
pub(crate) fn normalize_residual(r: &mut [f32]) -> bool {
    let norm = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() as f32;
    if norm > 0.0 {
        r.iter_mut().for_each(|v| *v /= norm);
    }
    norm > 0.0
}

/// From d(guidance)/d x0_hat to d/dx_t directly and the network's cotangent (d/deps), through
/// clean_output ((clamp(x0, -1, 1) + 1) / 2), the scheduler's clamp and
/// x0 = (x_t - √(1-ᾱ) eps) / √ᾱ.
pub(crate) fn chain_rule(c: &StepCoeffs, s: &Stepped, d_xhat: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let clip = c.clip;
    let (s0, s1) = (c.sqrt_alpha_prod, c.sqrt_one_minus_alpha_prod);
    let mut d_direct = vec![0.0f32; d_xhat.len()];
    let mut cot = vec![0.0f32; d_xhat.len()];
    d_direct
        .par_iter_mut()
        .zip(cot.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dd, ce))| {
            let (raw, x0) = (s.x0_raw[i], s.x0[i]);
            let inside_clip = clip.is_none_or(|c| -c < raw && raw < c);
            let g = if inside_clip && -1.0 < x0 && x0 < 1.0 {
                d_xhat[i] / 2.0
            } else {
                0.0
            };
            let g_raw = g / s0;
            *dd = g_raw;
            *ce = -g_raw * s1;
        });
    (d_direct, cot)
}

/// The DPS or ΠGDM update of the scheduler's `prev` by the gradient `d_direct + g_eps`.
pub(crate) fn update(
    gc: &GuidanceCoeffs,
    guidance: Guidance,
    prev: &[f32],
    d_direct: &[f32],
    g_eps: &[f32],
) -> Vec<f32> {
    let grad = d_direct.iter().zip(g_eps).map(|(a, b)| a + b);
    match guidance {
        Guidance::Dps { scale, adaptive } => {
            let w = gc.dps_weight(scale, adaptive);
            prev.iter().zip(grad).map(|(p, g)| p - w * g).collect()
        }
        Guidance::Pigdm { scale, .. } => prev
            .iter()
            .zip(grad)
            .map(|(&p, g)| gc.pigdm_update(p, g, scale))
            .collect(),
        Guidance::None => prev.to_vec(),
    }
}

/// The image a sample shows: `(x / 2 + 0.5)` clamped to `[0, 1]`.
pub fn to_image(sample: &Tensor) -> Tensor {
    let data = sample
        .data()
        .iter()
        .map(|&v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    Tensor::new(sample.shape().to_vec(), data).expect("same shape")
}
