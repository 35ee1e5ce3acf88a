//! The device sampler's checks, run by [`selftest`](super::selftest()): each kernel of
//! kernels/sampler.cu and kernels/fft.cu on random data against the host code it mirrors, then
//! whole sampling loops (GPU loop against the host loop on the CPU engine) and a graph replay
//! against direct launches.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::blur::DeviceBlur;
use super::device::{cu, Gpu};
use super::sampler::{sample as device_sample, DeviceJob};
use super::sampler_kernels::{Cursor, Dev, Filter, Images, SamplerKernels, StepRow, Update};
use super::selftest::{SelftestRow, TOLERANCE};
use crate::engine::{DeviceChoice, Engine};
use crate::inverse::{clean_output, gaussian_kernel, motion_kernel, CircularBlur, LinearOperator};
use crate::model::Model;
use crate::sampler::{self, chain_rule, normalize_residual, update, Guidance, Measurements, Noise};
use crate::schedule::{Ddim, Ddpm, Scheduler, SchedulerConfig, StepCoeffs};
use crate::{rng, Result, Tensor};

/// Relative L2 a whole sampling loop may end at: three steps of a random-weight network amplify
/// the network's own 1e-6-level differences.
const LOOP_TOLERANCE: f64 = 1e-4;

/// Runs every sampler check on `gpu` (whose device is `ordinal`).
pub(crate) fn run(gpu: &Gpu, ordinal: usize) -> Result<Vec<SelftestRow>> {
    let k = SamplerKernels::load(&gpu.ctx, &gpu.info.name, gpu.sms())?;
    let mut c = Check {
        st: gpu.stream.clone(),
        k,
        rows: Vec::new(),
        seed: 0x005A_3B1E,
    };
    c.normals()?;
    c.steps()?;
    c.blurs(2, [3, 32, 48], &[(5, 0), (9, 1)])?;
    c.blurs(2, [3, 256, 256], &[(33, 0), (33, 2)])?;
    c.norms()?;
    c.chains()?;
    c.updates()?;
    c.loops(ordinal)?;
    Ok(c.rows)
}

struct Check {
    st: Arc<CudaStream>,
    k: SamplerKernels,
    rows: Vec<SelftestRow>,
    seed: u64,
}

/// Shapes in words.
fn dims(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

impl Check {
    /// Uniform values in [lo, hi), from a fresh stream of the generator.
    fn rand(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        super::selftest::uniform(&mut self.seed, len, lo, hi)
    }

    fn up<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<Dev<T>> {
        Dev::upload(&self.st, data)
    }

    fn zeros(&self, len: usize) -> Result<Dev<f32>> {
        Dev::zeros(&self.st, len)
    }

    fn down(&self, d: &Dev<f32>) -> Result<Vec<f32>> {
        d.download(&self.st)
    }

    /// A one-row step table (counter 0) and its cursor.
    fn table(&self, row: StepRow) -> Result<(Dev<StepRow>, Dev<i32>, Cursor)> {
        let rows = self.up(&[row])?;
        let counter = Dev::<i32>::zeros(&self.st, 1)?;
        let at = Cursor {
            rows: rows.ptr,
            counter: counter.ptr,
        };
        Ok((rows, counter, at))
    }

    /// Milliseconds of one run of `f` after a warm-up run.
    fn timed(&self, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        super::selftest::time_one_run(&self.st, f)
    }

    fn row(&mut self, op: String, shape: String, got: &[f32], want: &[f32], ms: f64) {
        self.row_tol(op, shape, got, want, ms, TOLERANCE);
    }

    fn row_tol(
        &mut self,
        op: String,
        shape: String,
        got: &[f32],
        want: &[f32],
        ms: f64,
        tolerance: f64,
    ) {
        self.rows
            .push(SelftestRow::compare(op, shape, got, want, ms, tolerance));
    }

    /// Philox normals against `rng::fill_normal`: x_T (slot 0) and a step's draw (slot from the
    /// table), odd image sizes so the last pair is half used.
    fn normals(&mut self) -> Result<()> {
        let seed = 0x0123_4567_89AB_CDEF;
        for (ids, per, step) in [
            (vec![0u64, 3, (1 << 31) + 5], 105usize, None),
            (vec![7u64, 1 << 20], 3 * 256 * 256 + 1, Some(4usize)),
        ] {
            let slot = step.map_or(0, |s| s as u64 + 1);
            let mut want = vec![0.0f32; ids.len() * per];
            for (chunk, &id) in want.chunks_exact_mut(per).zip(&ids) {
                rng::fill_normal(seed, (id << 32) | slot, chunk);
            }
            let idsd = self.up(&ids)?;
            let out = self.zeros(want.len())?;
            let table = step
                .map(|s| {
                    self.table(StepRow {
                        flags: 2,
                        step: s as i32,
                        ..StepRow::default()
                    })
                })
                .transpose()?;
            let at = table.as_ref().map(|t| t.2);
            let ms = self.timed(|| {
                self.k
                    .normals(&self.st, seed, idsd.ptr, 0, at, out.ptr, per, ids.len())
            })?;
            let got = self.down(&out)?;
            let exact = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            let op = match step {
                None => "philox normals x_T (slot 0)".to_string(),
                Some(s) => format!("philox normals z of step {s} (table)"),
            };
            self.row(
                op,
                format!("{} x {per}, {exact}/{} bit-exact", ids.len(), want.len()),
                &got,
                &want,
                ms,
            );
        }
        Ok(())
    }

    /// The scheduler step: DDPM (clip, noise at t > 0), DDIM η=0 without clip, DDIM η=0.5
    /// (clip, noise), reading injected-style noise from slot 1 of two.
    fn steps(&mut self) -> Result<()> {
        let cases = schedulers()?;
        let (b, c, h, w) = (2, 3, 17, 19);
        let len = b * c * h * w;
        for (name, sched) in &cases {
            let t = sched.timesteps()[1];
            let co = sched.step_coeffs(t)?;
            let x = self.rand(len, -3.0, 3.0);
            let eps = self.rand(len, -3.0, 3.0);
            let z = self.rand(2 * len, -2.0, 2.0);
            let mut x0 = vec![0.0; len];
            let mut prev = vec![0.0; len];
            crate::schedule::step_slice(&co, &eps, &x, Some(&z[len..]), &mut x0, &mut prev)?;
            let xhat: Vec<f32> = x0.iter().map(|&v| clean_output(v)).collect();
            let (_rows, _counter, at) =
                self.table(StepRow::new(1, 1, &co, None, Guidance::None)?)?;
            let (xd, ed, zd) = (self.up(&x)?, self.up(&eps)?, self.up(&z)?);
            let (pd, hd) = (self.zeros(len)?, self.zeros(len)?);
            let ms = self.timed(|| {
                self.k.step(
                    &self.st, at, xd.ptr, ed.ptr, zd.ptr, len, pd.ptr, hd.ptr, len, 0,
                )
            })?;
            let desc = format!(
                "{} t={t}{}{}",
                dims(&[b, c, h, w]),
                if co.clip.is_some() { " clip" } else { "" },
                if co.uses_noise { " noise" } else { "" }
            );
            let (got_p, got_h) = (self.down(&pd)?, self.down(&hd)?);
            self.row(
                format!("sampler step {name} prev"),
                desc.clone(),
                &got_p,
                &prev,
                ms,
            );
            self.row(
                format!("sampler step {name} x0_hat"),
                desc,
                &got_h,
                &xhat,
                ms,
            );
        }
        Ok(())
    }

    /// A, A x − y, Aᵀ and ΠGDM's pinv(y − A x) against [`CircularBlur`], a different kernel
    /// per image (`(size, kind)`: 0 Gaussian, else a motion kernel of that seed).
    fn blurs(&mut self, b: usize, chw: [usize; 3], kernels: &[(usize, u64)]) -> Result<()> {
        let [c, h, w] = chw;
        let per = c * h * w;
        let ops = kernels
            .iter()
            .take(b)
            .map(|&(size, kind)| {
                let k = if kind == 0 {
                    gaussian_kernel(size, size as f64 / 6.0)?
                } else {
                    motion_kernel(size, 0.5, kind)?
                };
                CircularBlur::new(&k, c, h, w)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&CircularBlur> = ops.iter().collect();
        let x = self.rand(b * per, 0.0, 1.0);
        let y = self.rand(b * per, 0.0, 1.0);
        let (r, sigma) = (0.3f32, 0.05f32);
        let mut blur = DeviceBlur::new(&self.k, &self.st, &refs, chw)?;
        let img: Images = blur.images();
        let (xd, yd, od) = (self.up(&x)?, self.up(&y)?, self.zeros(b * per)?);
        blur.set_measurement(&self.k, &self.st, yd.ptr)?;
        let row = StepRow {
            pigdm_r2: r * r,
            ..StepRow::default()
        };
        let (_rows, _counter, at) = self.table(row)?;
        let s2 = f64::from((f64::from(sigma) * f64::from(sigma)) as f32);
        let desc = format!(
            "{} kernels {}",
            dims(&[img.b, c, h, w]),
            kernels
                .iter()
                .take(b)
                .map(|(s, _)| format!("{s}x{s}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        for (name, filter, sub) in [
            ("A x", Filter::Blur, false),
            ("A x - y", Filter::Blur, true),
            ("adjoint", Filter::Adjoint, false),
            ("pinv(y - A x)", Filter::PinvResidual, false),
        ] {
            let mut want = vec![0.0f32; b * per];
            for (i, op) in ops.iter().enumerate() {
                let (xi, yi) = (&x[i * per..(i + 1) * per], &y[i * per..(i + 1) * per]);
                let out = &mut want[i * per..(i + 1) * per];
                match filter {
                    Filter::Blur => {
                        op.forward(xi, out)?;
                        if sub {
                            out.iter_mut().zip(yi).for_each(|(a, b)| *a -= b);
                        }
                    }
                    Filter::Adjoint => op.adjoint(xi, out)?,
                    _ => op.pinv_residual(yi, xi, r, sigma, out)?,
                }
            }
            let sub_ptr = if sub { yd.ptr } else { 0 };
            let ms = self.timed(|| {
                blur.apply(
                    &self.k,
                    &self.st,
                    filter,
                    xd.ptr,
                    od.ptr,
                    sub_ptr,
                    Some(at),
                    s2,
                )
            })?;
            let got = self.down(&od)?;
            self.row(format!("blur {name} (fft)"), desc.clone(), &got, &want, ms);
        }
        Ok(())
    }

    /// DPS's per-image r / ||r||, one image all zeros; small images, and celebahq's.
    fn norms(&mut self) -> Result<()> {
        for (b, per) in [(3, 3 * 37 * 41), (3, 3 * 256 * 256)] {
            let mut r = self.rand(b * per, -1.0, 1.0);
            r[per..2 * per].iter_mut().for_each(|v| *v = 0.0);
            let mut want = r.clone();
            for chunk in want.chunks_exact_mut(per) {
                if !normalize_residual(chunk) {
                    chunk.iter_mut().for_each(|v| *v = 0.0);
                }
            }
            let mut rd = self.up(&r)?;
            let ptr = rd.ptr;
            let norms = self.up(&vec![0.0f32; b])?;
            self.k
                .residual_normalize(&self.st, ptr, norms.ptr, per, b)?;
            let got = self.down(&rd)?;
            // Timed from the same residual, put back before each run.
            let ms = self.timed(|| {
                cu(
                    self.st.memcpy_htod(&r, &mut rd.slice),
                    "resetting the residual",
                )?;
                self.k.residual_normalize(&self.st, ptr, norms.ptr, per, b)
            })?;
            self.row(
                "dps residual / per-image norm".into(),
                format!("{b} x {per}, image 1 zero"),
                &got,
                &want,
                ms,
            );
        }
        Ok(())
    }

    /// The chain rule to the direct gradient and the cotangent, with and without the clamp.
    fn chains(&mut self) -> Result<()> {
        let len = 2 * 3 * 23 * 29;
        for (name, sched) in &schedulers()? {
            let co = sched.step_coeffs(sched.timesteps()[2])?;
            let x = Tensor::new(vec![len], self.rand(len, -3.0, 3.0))?;
            let eps = Tensor::new(vec![len], self.rand(len, -3.0, 3.0))?;
            let d_xhat = self.rand(len, -1.0, 1.0);
            let s = sampler::step(&co, &x, &eps, None);
            let (want_d, want_c) = chain_rule(&co, &s, &d_xhat);
            let (_rows, _counter, at) =
                self.table(StepRow::new(2, 0, &co, None, Guidance::None)?)?;
            let (xd, ed, dd) = (self.up(x.data())?, self.up(eps.data())?, self.up(&d_xhat)?);
            let (od, cd) = (self.zeros(len)?, self.zeros(len)?);
            let ms = self.timed(|| {
                self.k
                    .chain(&self.st, at, xd.ptr, ed.ptr, dd.ptr, od.ptr, cd.ptr, len)
            })?;
            let desc = format!(
                "{len} values{}",
                if co.clip.is_some() { ", clip" } else { "" }
            );
            let (got_d, got_c) = (self.down(&od)?, self.down(&cd)?);
            self.row(
                format!("chain rule {name} direct"),
                desc.clone(),
                &got_d,
                &want_d,
                ms,
            );
            self.row(
                format!("chain rule {name} cotangent"),
                desc,
                &got_c,
                &want_c,
                ms,
            );
        }
        Ok(())
    }

    /// DPS (fixed and adaptive weight) and ΠGDM updates.
    fn updates(&mut self) -> Result<()> {
        let len = 5000;
        let mut sched = Ddpm::new(SchedulerConfig::default())?;
        sched.set_timesteps(20)?;
        let t = sched.timesteps()[5];
        let (co, gc) = (sched.step_coeffs(t)?, sched.guidance_coeffs(t)?);
        for (name, g, mode) in [
            (
                "dps fixed",
                Guidance::Dps {
                    scale: 0.7,
                    adaptive: false,
                },
                Update::Dps,
            ),
            (
                "dps adaptive",
                Guidance::Dps {
                    scale: 1.3,
                    adaptive: true,
                },
                Update::Dps,
            ),
            (
                "pigdm",
                Guidance::Pigdm {
                    scale: 1.1,
                    sigma: 0.05,
                },
                Update::Pigdm,
            ),
        ] {
            let prev = self.rand(len, -2.0, 2.0);
            let direct = self.rand(len, -1.0, 1.0);
            let g_eps = self.rand(len, -1.0, 1.0);
            let want = update(&gc, g, &prev, &direct, &g_eps);
            let (_rows, _counter, at) = self.table(StepRow::new(5, 0, &co, Some(&gc), g)?)?;
            let scale = match g {
                Guidance::Pigdm { scale, .. } => scale,
                _ => 0.0,
            };
            let (pd, dd, gd, xd) = (
                self.up(&prev)?,
                self.up(&direct)?,
                self.up(&g_eps)?,
                self.zeros(len)?,
            );
            let ms = self.timed(|| {
                self.k.update(
                    &self.st, at, mode, scale, pd.ptr, dd.ptr, gd.ptr, xd.ptr, len, 0,
                )
            })?;
            let got = self.down(&xd)?;
            self.row(
                format!("update {name}"),
                format!("{len} values, t={t}"),
                &got,
                &want,
                ms,
            );
        }
        Ok(())
    }

    /// Whole loops: GPU against the host loop on the CPU engine, 3 steps on a random-weight
    /// model, then a graph replay against direct launches.
    fn loops(&mut self, ordinal: usize) -> Result<()> {
        let model = Model::tiny(false);
        let mut cpu = Engine::new(&model, DeviceChoice::Cpu)?;
        let mut gpu = Engine::new(&model, DeviceChoice::Cuda(ordinal))?;
        let shape = [2, 3, 32, 32];
        let m = self.measurements(shape)?;
        let per_run: usize = shape.iter().product();
        let x_t = Tensor::new(shape.to_vec(), self.rand(per_run, -1.5, 1.5))?;
        let z = Tensor::new(vec![3, 2, 3, 32, 32], self.rand(3 * per_run, -1.5, 1.5))?;
        let injected = Noise::Injected {
            x_t: x_t.clone(),
            z: Some(z),
        };
        let seeded = Noise::Seeded {
            seed: 11,
            image_ids: vec![4, 9],
        };
        let dps = |adaptive| Guidance::Dps {
            scale: if adaptive { 0.5 } else { 0.2 },
            adaptive,
        };
        let pigdm = Guidance::Pigdm {
            scale: 0.5,
            sigma: 0.05,
        };
        let [ddpm, ddim] = loop_schedulers()?;
        let (ddpm, ddim) = (ddpm.as_ref(), ddim.as_ref());
        let cases: [(&str, &dyn Scheduler, Guidance); 5] = [
            ("ddpm", ddpm, Guidance::None),
            ("ddim eta 0.5", ddim, Guidance::None),
            ("dps fixed", ddpm, dps(false)),
            ("dps adaptive", ddpm, dps(true)),
            ("pigdm", ddpm, pigdm),
        ];
        for (name, sched, g) in cases {
            for (noise_name, noise) in [("seeded", &seeded), ("injected", &injected)] {
                let ms = |e: &mut Engine| -> Result<(Tensor, f64)> {
                    let mut secs = Vec::new();
                    let x = sampler::sample(e, sched, g, Some(&m), noise, shape, |r| {
                        secs.push(r.seconds)
                    })?;
                    Ok((x, 1e3 * secs.iter().sum::<f64>() / secs.len().max(1) as f64))
                };
                let (want, _) = ms(&mut cpu)?;
                let (got, step_ms) = ms(&mut gpu)?;
                self.row_tol(
                    format!("loop {name}, {noise_name} (tol 1e-4, ms/step)"),
                    format!("{} 3 steps, 2 kernels", dims(&shape)),
                    got.data(),
                    want.data(),
                    step_ms,
                    LOOP_TOLERANCE,
                );
            }
        }

        // Resuming mid-run: a state, steps 1..3, injected z slices 1 and 2.
        let g = dps(false);
        let run = |e: &mut Engine| {
            sampler::sample_steps(e, ddim, g, Some(&m), &injected, x_t.clone(), 1..3, |_| {})
        };
        let (want, got) = (run(&mut cpu)?, run(&mut gpu)?);
        self.row_tol(
            "loop dps fixed ddim, steps 1..3 from a state (tol 1e-4)".into(),
            format!("{} 2 steps", dims(&shape)),
            got.data(),
            want.data(),
            0.0,
            LOOP_TOLERANCE,
        );

        // The captured step replayed must equal the same launches issued directly, here and at
        // a realistic image size (whose ms/step is mostly guidance, the network being tiny).
        for (shape, name) in [
            ([2, 3, 32, 32], "dps"),
            ([2, 3, 256, 256], "dps"),
            ([2, 3, 256, 256], "pigdm"),
        ] {
            let m = self.measurements(shape)?;
            let g = if name == "dps" { dps(true) } else { pigdm };
            let unet = gpu.cuda_mut().expect("a CUDA engine");
            let coeffs = ddpm
                .timesteps()
                .iter()
                .map(|&t| ddpm.step_coeffs(t))
                .collect::<Result<Vec<StepCoeffs>>>()?;
            let blur = Some((
                m.operators
                    .iter()
                    .map(|op| op.as_circular_blur().expect("blurs"))
                    .collect(),
                &m.y,
            ));
            let job = DeviceJob {
                shape,
                steps: 0..3,
                scheduler: ddpm,
                coeffs: &coeffs,
                guidance: g,
                blur,
                noise: &seeded,
                start: None,
            };
            let mut results = Vec::new();
            for graphs in [false, true] {
                let mut secs = Vec::new();
                let x = device_sample(unet, &job, graphs, &mut |r| secs.push(r.seconds))?;
                let ms = 1e3 * secs.iter().sum::<f64>() / secs.len() as f64;
                results.push((x, ms));
            }
            let ((direct, direct_ms), (graph, graph_ms)) = (&results[0], &results[1]);
            self.row(
                format!("loop {name} graph replay = direct ({direct_ms:.2} ms/step direct)"),
                format!("{} 3 steps", dims(&shape)),
                graph.data(),
                direct.data(),
                *graph_ms,
            );
            unet.release_plans();
        }
        Ok(())
    }

    /// Two images with different blurs and random measurements in [0, 1].
    fn measurements(&mut self, shape: [usize; 4]) -> Result<Measurements> {
        let [b, c, h, w] = shape;
        let kernels = [gaussian_kernel(5, 1.0)?, motion_kernel(7, 0.5, 3)?];
        let operators = kernels
            .iter()
            .cycle()
            .take(b)
            .map(|k| -> Result<Arc<dyn LinearOperator>> {
                Ok(Arc::new(CircularBlur::new(k, c, h, w)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let y = Tensor::new(shape.to_vec(), self.rand(b * c * h * w, 0.0, 1.0))?;
        Ok(Measurements { operators, y })
    }
}

/// A DDPM (clipped x0, noise), a DDIM with η = 0 and no clip, and a DDIM with η = 0.5, at 10
/// steps.
fn schedulers() -> Result<Vec<(&'static str, Box<dyn Scheduler>)>> {
    let mut ddpm = Ddpm::new(SchedulerConfig::default())?;
    ddpm.set_timesteps(10)?;
    let mut unclipped = SchedulerConfig::default();
    unclipped.clip_sample = false;
    let mut ddim0 = Ddim::new(unclipped, 0.0)?;
    ddim0.set_timesteps(10)?;
    let mut ddim = Ddim::new(SchedulerConfig::default(), 0.5)?;
    ddim.set_timesteps(10)?;
    Ok(vec![
        ("ddpm", Box::new(ddpm)),
        ("ddim eta 0", Box::new(ddim0)),
        ("ddim eta 0.5", Box::new(ddim)),
    ])
}

/// The whole-loop schedulers: DDPM and DDIM η = 0.5, 3 steps.
fn loop_schedulers() -> Result<[Box<dyn Scheduler>; 2]> {
    let mut ddpm = Ddpm::new(SchedulerConfig::default())?;
    ddpm.set_timesteps(3)?;
    let mut ddim = Ddim::new(SchedulerConfig::default(), 0.5)?;
    ddim.set_timesteps(3)?;
    Ok([Box::new(ddpm), Box::new(ddim)])
}
