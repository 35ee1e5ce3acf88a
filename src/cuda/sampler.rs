//! The whole sampling loop on the GPU: network, vector-Jacobian product, scheduler step and
//! guidance, with no allocation and no host synchronisation between steps.
//!
//! What runs where:
//! - Once, before the loop (host): the per-step scalars of every step ([`StepRow`]: the
//!   scheduler's [`StepCoeffs`], the guidance's
//!   [`GuidanceCoeffs`](crate::schedule::GuidanceCoeffs), the timestep) are uploaded as one
//!   table next to a device step counter; every buffer of the run is allocated; each image's
//!   blur transfer function and, for ΠGDM, each measurement's spectrum are computed; x_T is drawn
//!   on the device (Philox, `Noise::Seeded`) or uploaded (`Noise::Injected`, whose `z` for the
//!   steps run is uploaded too); the network's memory plan is made.
//! - Every step (device only): the UNet's timestep from the table, the step's normals, the
//!   network (recording when guided), the scheduler step, the guidance (DPS: `A x0_hat − y`, its
//!   per-image norm, `Aᵀ(r/‖r‖)`; ΠGDM: `pinv(y − A x0_hat)`), the chain rule through clamps
//!   and `x0 = (x − √(1−ᾱ) eps)/√ᾱ`, the vector-Jacobian product, the update of x in place, and a
//!   last kernel that advances the counter. No launch argument changes between steps, so the
//!   step is captured once as a CUDA graph (the network's own launches included: see
//!   [`CudaUnet::set_direct_launches`]) and replayed; with `INVDIFF_NO_CUDA_GRAPH=1` the same
//!   launches are issued directly.
//! - Progress: an event is recorded after each step and the host *queries* events (never
//!   synchronises) to report finished steps with their GPU time. It keeps at most
//!   [`LOOKAHEAD`] steps queued ahead of the last finished one, polling every [`POLL`] when it
//!   is that far ahead, so reports stay timely while the GPU never runs dry.
//! - Divergence: the kernels that write the next state record the first step whose state holds
//!   NaN or infinity; the host reads that once, with the final sample, and fails as the host
//!   loop would (the host loop stops at that step, the device loop finishes the run first).
//!
//! The numerics follow the host loop of [`crate::sampler`] operation for operation (see
//! kernels/sampler.cu and kernels/fft.cu); the differences are the network's and the FFT's.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::{self, CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};

use super::blur::{fits, DeviceBlur};
use super::device::cu;
use super::sampler_kernels::{Cursor, Dev, Filter, SamplerKernels, StepRow, Update};
use super::CudaUnet;
use crate::inverse::CircularBlur;
use crate::sampler::{Guidance, Noise, StepReport};
use crate::schedule::{Scheduler, StepCoeffs};
use crate::{ensure, Error, Result, Tensor};

/// Steps the host may queue beyond the last finished one.
pub(crate) const LOOKAHEAD: usize = 3;
/// How long the host sleeps between event queries when it is [`LOOKAHEAD`] steps ahead (a step
/// takes milliseconds).
pub(crate) const POLL: Duration = Duration::from_micros(200);

/// One run of the device loop, validated by the caller ([`crate::sampler::sample_steps`]).
pub(crate) struct DeviceJob<'a> {
    /// `[B, C, H, W]` of the state.
    pub shape: [usize; 4],
    /// Loop steps to run (indices into `timesteps`).
    pub steps: Range<usize>,
    pub scheduler: &'a dyn Scheduler,
    /// Every timestep's coefficients, indexed like the scheduler's timesteps.
    pub coeffs: &'a [StepCoeffs],
    pub guidance: Guidance,
    /// The blur of each image and the measurements `[B, C, H, W]`, for guided sampling.
    pub blur: Option<(Vec<&'a CircularBlur>, &'a Tensor)>,
    pub noise: &'a Noise,
    /// The state to start from; `None` starts from the noise's x_T.
    pub start: Option<&'a Tensor>,
}

/// Whether the device loop takes `job`-shaped guided work (`h x w` images).
pub(crate) fn supports_blur(h: usize, w: usize) -> bool {
    fits(h, w)
}

/// Runs `job` on `unet`'s GPU, replaying one captured graph per step when `graphs`; reports each
/// finished step to `progress` and returns the final state.
pub(crate) fn sample(
    unet: &mut CudaUnet,
    job: &DeviceJob,
    graphs: bool,
    progress: &mut dyn FnMut(&StepReport),
) -> Result<Tensor> {
    let mut lp = Loop::new(unet, job)?;
    let st = lp.st.clone();
    let graph = if graphs {
        Some(capture(&mut lp, unet)?)
    } else {
        None
    };
    let n = job.steps.len();
    let events = (0..=n)
        .map(|_| {
            cu(
                unet.context()
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
                "creating an event",
            )
        })
        .collect::<Result<Vec<_>>>()?;
    cu(events[0].record(&st), "recording an event")?;
    let mut reporter = Reporter {
        events: &events,
        done: 0,
        first: job.steps.start,
        timesteps: job.scheduler.timesteps(),
    };
    for s in 0..n {
        match &graph {
            Some(g) => cu(g.launch(), "launching the sampling step's graph")?,
            None => lp.enqueue(unet)?,
        }
        cu(events[s + 1].record(&st), "recording an event")?;
        reporter.poll(s + 1, progress)?;
        while s + 1 - reporter.done > LOOKAHEAD {
            std::thread::sleep(POLL);
            reporter.poll(s + 1, progress)?;
        }
    }
    while reporter.done < n {
        std::thread::sleep(POLL);
        reporter.poll(n, progress)?;
    }
    let x = lp.x.download(&st)?;
    let diverged = lp.diverged.download(&st)?[0];
    if diverged != i32::MAX {
        let step = diverged as usize;
        return Err(Error::Diverged {
            step,
            t: job.scheduler.timesteps()[step],
        });
    }
    Tensor::new(job.shape.to_vec(), x)
}

/// Captures one step as a graph; the network launches its kernels into the capture.
fn capture(lp: &mut Loop, unet: &mut CudaUnet) -> Result<CudaGraph> {
    let st = lp.st.clone();
    cu(
        st.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        "starting the capture of a sampling step",
    )?;
    unet.set_direct_launches(true);
    let launched = lp.enqueue(unet);
    unet.set_direct_launches(false);
    // End the capture whatever happened, so the stream is usable again.
    let graph = st.end_capture(sys::CUgraphInstantiate_flags(0));
    launched?;
    cu(graph, "capturing the sampling step")?
        .ok_or_else(|| Error::Cuda("capturing the sampling step produced no graph".into()))
}

/// Reports the steps whose end events have completed, in order, without waiting.
struct Reporter<'a> {
    events: &'a [CudaEvent],
    /// Steps reported so far.
    done: usize,
    /// Loop index of the first step.
    first: usize,
    timesteps: &'a [i64],
}

impl Reporter<'_> {
    fn poll(&mut self, launched: usize, progress: &mut dyn FnMut(&StepReport)) -> Result<()> {
        while self.done < launched
            && cu(
                self.events[self.done + 1].try_is_complete(),
                "running the sampling step",
            )?
        {
            let ms = cu(
                self.events[self.done].elapsed_ms(&self.events[self.done + 1]),
                "reading the step's time",
            )?;
            let index = self.first + self.done;
            progress(&StepReport {
                index,
                timestep: self.timesteps[index],
                seconds: f64::from(ms) / 1e3,
            });
            self.done += 1;
        }
        Ok(())
    }
}

/// What a guided step adds to the loop's buffers.
struct Guide {
    blur: DeviceBlur,
    update: Update,
    scale: f32,
    /// ΠGDM's σ² as the CPU's pseudo-inverse rounds it.
    s2: f64,
    y: Dev<f32>,
    prev: Dev<f32>,
    xhat: Dev<f32>,
    /// d(guidance)/d x0_hat; DPS keeps its residual here first.
    d_xhat: Dev<f32>,
    direct: Dev<f32>,
    cot: Dev<f32>,
    g_eps: Dev<f32>,
    /// DPS: each image's residual norm.
    norms: Dev<f32>,
}

/// Every buffer of a run, allocated before the loop.
struct Loop {
    k: SamplerKernels,
    st: Arc<CudaStream>,
    shape: [usize; 4],
    at: Cursor,
    _rows: Dev<StepRow>,
    counter: Dev<i32>,
    diverged: Dev<i32>,
    x: Dev<f32>,
    eps: Dev<f32>,
    t: Dev<f32>,
    /// This step's normals (seeded), or every step's (injected: `z_stride` apart).
    z: Dev<f32>,
    z_stride: usize,
    /// Seed and image ids of seeded noise when steps add noise: normals are drawn each step.
    draw: Option<(u64, Dev<u64>)>,
    guide: Option<Guide>,
}

impl Loop {
    fn new(unet: &mut CudaUnet, job: &DeviceJob) -> Result<Loop> {
        let [b, c, h, w] = job.shape;
        let cfg = &unet.graph().config;
        ensure!(
            cfg.in_channels == c && cfg.out_channels == c,
            "the model maps {} to {} channels; sampling {c}-channel images needs {c} to {c}",
            cfg.in_channels,
            cfg.out_channels
        );
        let (len, per) = (b * c * h * w, c * h * w);
        let st = unet.stream().clone();
        let sms = cu(
            unet.context()
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            "querying the device",
        )?;
        let k = SamplerKernels::load(unet.context(), unet.device_name(), sms.max(1) as usize)?;
        let guided = job.blur.is_some();

        let coeffs = &job.coeffs[job.steps.clone()];
        let rows = job
            .steps
            .clone()
            .zip(coeffs)
            .enumerate()
            .map(|(slot, (i, c))| {
                let g = guided
                    .then(|| job.scheduler.guidance_coeffs(c.t))
                    .transpose()?;
                StepRow::new(i, slot, c, g.as_ref(), job.guidance)
            })
            .collect::<Result<Vec<_>>>()?;
        let needs_z = coeffs.iter().any(|c| c.uses_noise);
        let rows = Dev::upload(&st, &rows)?;
        let counter = Dev::<i32>::zeros(&st, 1)?;
        let at = Cursor {
            rows: rows.ptr,
            counter: counter.ptr,
        };

        let (z, z_stride, draw, ids) = match job.noise {
            Noise::Seeded { seed, image_ids } => {
                let ids = Dev::upload(&st, image_ids)?;
                let z = Dev::zeros(&st, if needs_z { len } else { 1 })?;
                let draw = needs_z.then_some(*seed);
                (z, 0, draw, Some((*seed, ids)))
            }
            Noise::Injected { z, .. } => match z {
                Some(z) if needs_z => {
                    let range = job.steps.start * len..job.steps.end * len;
                    (Dev::upload(&st, &z.data()[range])?, len, None, None)
                }
                _ => (Dev::zeros(&st, 1)?, 0, None, None),
            },
        };
        let x = match (job.start, &ids, job.noise) {
            (Some(x), _, _) => {
                // The host loop's network checks this on every call; here only the start can
                // bring it in (later steps are watched by the divergence flag).
                ensure!(x.all_finite(), "sample: holds NaN or infinite values");
                Dev::upload(&st, x.data())?
            }
            (None, Some((seed, ids)), _) => {
                let x = Dev::zeros(&st, len)?;
                k.normals(&st, *seed, ids.ptr, 0, None, x.ptr, per, b)?;
                x
            }
            (None, None, Noise::Injected { x_t, .. }) => Dev::upload(&st, x_t.data())?,
            (None, None, Noise::Seeded { .. }) => unreachable!("seeded noise has ids"),
        };
        let draw = match (draw, ids) {
            (Some(seed), Some((_, ids))) => Some((seed, ids)),
            _ => None,
        };

        let guide = match &job.blur {
            None => None,
            Some((ops, y)) => Some(Guide::new(&k, &st, ops, y, job.guidance, [c, h, w])?),
        };
        unet.prepare(b, h, w, guided)?;
        Ok(Loop {
            k,
            st: st.clone(),
            shape: job.shape,
            at,
            _rows: rows,
            counter,
            diverged: Dev::upload(&st, &[i32::MAX])?,
            x,
            eps: Dev::zeros(&st, len)?,
            t: Dev::zeros(&st, b)?,
            z,
            z_stride,
            draw,
            guide,
        })
    }

    /// Issues one step on the stream.
    fn enqueue(&mut self, unet: &mut CudaUnet) -> Result<()> {
        let (k, st, at) = (&self.k, &self.st, self.at);
        let [b, c, h, w] = self.shape;
        let (len, per) = (b * c * h * w, c * h * w);
        let (x, eps) = (self.x.ptr, self.eps.ptr);
        k.set_timestep(st, at, self.t.ptr, b)?;
        if let Some((seed, ids)) = &self.draw {
            k.normals(st, *seed, ids.ptr, 0, Some(at), self.z.ptr, per, b)?;
        }
        let diverged = self.diverged.ptr;
        let Some(g) = &mut self.guide else {
            unet.forward_device(b, h, w, &self.x.slice, &self.t.slice, &mut self.eps.slice)?;
            k.step(
                st,
                at,
                x,
                eps,
                self.z.ptr,
                self.z_stride,
                x,
                0,
                len,
                diverged,
            )?;
            return k.advance(st, self.counter.ptr);
        };
        unet.forward_recording_device(b, h, w, &self.x.slice, &self.t.slice, &mut self.eps.slice)?;
        k.step(
            st,
            at,
            x,
            eps,
            self.z.ptr,
            self.z_stride,
            g.prev.ptr,
            g.xhat.ptr,
            len,
            0,
        )?;
        match g.update {
            Update::Dps => {
                let r = g.d_xhat.ptr;
                g.blur
                    .apply(k, st, Filter::Blur, g.xhat.ptr, r, g.y.ptr, None, 0.0)?;
                k.residual_normalize(st, r, g.norms.ptr, per, b)?;
                g.blur.apply(k, st, Filter::Adjoint, r, r, 0, None, 0.0)?;
            }
            Update::Pigdm => g.blur.apply(
                k,
                st,
                Filter::PinvResidual,
                g.xhat.ptr,
                g.d_xhat.ptr,
                0,
                Some(at),
                g.s2,
            )?,
        }
        k.chain(st, at, x, eps, g.d_xhat.ptr, g.direct.ptr, g.cot.ptr, len)?;
        unet.vjp_device(&g.cot.slice, &mut g.g_eps.slice)?;
        k.update(
            st,
            at,
            g.update,
            g.scale,
            g.prev.ptr,
            g.direct.ptr,
            g.g_eps.ptr,
            x,
            len,
            diverged,
        )?;
        k.advance(st, self.counter.ptr)
    }
}

impl Guide {
    fn new(
        k: &SamplerKernels,
        st: &Arc<CudaStream>,
        ops: &[&CircularBlur],
        y: &Tensor,
        guidance: Guidance,
        chw: [usize; 3],
    ) -> Result<Guide> {
        let len = y.numel();
        ensure!(
            len == ops.len() * chw.iter().product::<usize>(),
            "measurement: {:?} for {} images of {chw:?}",
            y.shape(),
            ops.len()
        );
        let (update, scale, s2) = match guidance {
            Guidance::Dps { scale, .. } => (Update::Dps, scale, 0.0),
            Guidance::Pigdm { scale, sigma } => {
                // As the host loop (σ = 0 means 1e-8) and CircularBlur's pseudo-inverse (σ² in
                // f64, rounded to f32).
                let sigma = f64::from(if sigma == 0.0 { 1e-8 } else { sigma });
                (Update::Pigdm, scale, f64::from((sigma * sigma) as f32))
            }
            Guidance::None => {
                return Err(Error::Cuda(
                    "internal: unguided sampling has no guidance buffers".into(),
                ))
            }
        };
        let mut blur = DeviceBlur::new(k, st, ops, chw)?;
        let y = Dev::upload(st, y.data())?;
        if update == Update::Pigdm {
            blur.set_measurement(k, st, y.ptr)?;
        }
        let buf = || Dev::<f32>::zeros(st, len);
        Ok(Guide {
            blur,
            update,
            scale,
            s2,
            y,
            prev: buf()?,
            xhat: buf()?,
            d_xhat: buf()?,
            direct: buf()?,
            cot: buf()?,
            g_eps: buf()?,
            norms: Dev::<f32>::zeros(st, ops.len())?,
        })
    }
}
