//! Typed launchers for `kernels/sampler.cu` (scheduler step, guidance chain rule and updates,
//! residual norm, Philox normals, step counter) and `kernels/fft.cu` (circular blur by FFT), and
//! the host mirrors of their parameter structs.
//!
//! Launch shapes (threads per block, blocks):
//! - `sampler_step` / `_chain` / `_update` / `_normals`: 256; grid-stride, ⌈items/256⌉ capped at
//!   8 blocks per multiprocessor;
//! - `sampler_residual_norms`: 512; one block per image; `sampler_residual_scale`: 256, a
//!   thread per value;
//! - `sampler_set_timestep`, `sampler_advance`: one block of 32;
//! - `fft_rows_forward` / `fft_rows_inverse`: min(256, ⌈W/32⌉·32); (H, ⌈C/2⌉, B), 32·W bytes of
//!   dynamic shared memory; `fft_cols`: likewise with H and W swapped.
//!
//! Kernels that take the step's scalars read them at a [`Cursor`]: the row table and the device
//! counter, whose addresses never change during a run.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::device::{cu, fatbins};
use super::kernels::DPtr;
use crate::sampler::Guidance;
use crate::schedule::{GuidanceCoeffs, StepCoeffs};
use crate::{Error, Result};

/// `StepRow` of kernels/step_row.cuh, field for field (all 4-byte, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct StepRow {
    pub t: f32,
    pub s0: f32,
    pub s1: f32,
    pub clip: f32,
    pub c_x0: f32,
    pub c_xt: f32,
    pub c_eps: f32,
    pub noise_std: f32,
    pub dps_w: f32,
    pub pigdm_r2: f32,
    pub pigdm_sqrt_alpha: f32,
    pub flags: i32,
    pub step: i32,
    pub z_slot: i32,
}
const _: () = assert!(std::mem::size_of::<StepRow>() == 56);
// SAFETY: plain-old-data with the C layout of the kernels' struct.
unsafe impl DeviceRepr for StepRow {}

/// `StepRow::flags` bits (ROW_* in step_row.cuh).
const ROW_CLIP: i32 = 1;
const ROW_NOISE: i32 = 2;

impl StepRow {
    /// The row of loop step `step` (which reads slice `z_slot` of injected noise) with the
    /// scheduler's coefficients and, for guided sampling, the guidance's.
    pub fn new(
        step: usize,
        z_slot: usize,
        c: &StepCoeffs,
        g: Option<&GuidanceCoeffs>,
        guidance: Guidance,
    ) -> Result<StepRow> {
        let index = |v: usize, what: &str| {
            i32::try_from(v)
                .map_err(|_| Error::input(format!("{what} {v} is too large for the GPU sampler")))
        };
        let mut row = StepRow {
            t: c.t as f32,
            s0: c.sqrt_alpha_prod,
            s1: c.sqrt_one_minus_alpha_prod,
            clip: c.clip.unwrap_or(0.0),
            c_x0: c.c_x0,
            c_xt: c.c_xt,
            c_eps: c.c_eps,
            noise_std: c.noise_std,
            flags: if c.clip.is_some() { ROW_CLIP } else { 0 }
                | if c.uses_noise { ROW_NOISE } else { 0 },
            step: index(step, "step")?,
            z_slot: index(z_slot, "noise slot")?,
            ..StepRow::default()
        };
        if let Some(g) = g {
            if let Guidance::Dps { scale, adaptive } = guidance {
                row.dps_w = g.dps_weight(scale, adaptive);
            }
            row.pigdm_r2 = g.pigdm_r2;
            row.pigdm_sqrt_alpha = g.pigdm_sqrt_alpha;
        }
        Ok(row)
    }
}

/// Where the current step's row is: the row table and the device counter indexing it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cursor {
    pub rows: DPtr,
    pub counter: DPtr,
}

/// Largest radix list a line length may need (FFT_MAX_RADICES in fft.cu).
const MAX_RADICES: usize = 16;

/// `FftPlan` of kernels/fft.cu: a line length and its radices.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FftPlan {
    n: i32,
    count: i32,
    radix: [i32; MAX_RADICES],
}
const _: () = assert!(std::mem::size_of::<FftPlan>() == 72);
// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for FftPlan {}

/// Longest line the shared-memory FFT takes: two lines of f64 complex in the 48 KB a block gets
/// without opting in to more.
pub(crate) const MAX_LINE: usize = 48 * 1024 / 32;

impl FftPlan {
    /// Radix 4 while it divides, then 2, then odd factors in increasing order (a prime length is
    /// one direct DFT).
    pub fn new(n: usize) -> Result<FftPlan> {
        if n == 0 || n > MAX_LINE {
            return Err(Error::Cuda(format!(
                "GPU FFT lines must have 1 to {MAX_LINE} points, got {n}"
            )));
        }
        let mut radices = Vec::new();
        let mut rest = n;
        for p in [4, 2] {
            while rest % p == 0 {
                radices.push(p);
                rest /= p;
            }
        }
        let mut p = 3;
        while rest > 1 {
            while rest % p == 0 {
                radices.push(p);
                rest /= p;
            }
            p += 2;
        }
        let mut radix = [0; MAX_RADICES];
        for (r, &p) in radix.iter_mut().zip(&radices) {
            *r = p as i32;
        }
        Ok(FftPlan {
            n: n as i32,
            count: radices.len() as i32,
            radix,
        })
    }

    fn len(&self) -> usize {
        self.n as usize
    }
}

/// `e^{-2πik/n}` for k < n, interleaved (re, im): the twiddles of an n-point line.
pub(crate) fn twiddles(n: usize) -> Vec<f64> {
    (0..n)
        .flat_map(|k| {
            let a = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
            [a.cos(), a.sin()]
        })
        .collect()
}

/// One transform direction's line: its plan and its twiddle table on the device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Line {
    pub plan: FftPlan,
    pub tw: DPtr,
}

/// What `fft_cols` does between its forward and inverse column transforms (FFT_* in fft.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Filter {
    /// Stop at the spectrum.
    Forward = 0,
    /// `A`: times K.
    Blur = 1,
    /// `Aᵀ`: times conj(K).
    Adjoint = 2,
    /// ΠGDM: `conj(K)/(r²|K|²+σ²)·(Y − K·X)`.
    PinvResidual = 3,
}

/// The update after the vector-Jacobian product (UPDATE_* in sampler.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Update {
    Dps = 0,
    Pigdm = 1,
}

/// `[B, C, H, W]` of the images a blur launch covers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Images {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Images {
    /// Complex planes per image (two channels share one).
    pub fn pairs(&self) -> usize {
        self.c.div_ceil(2)
    }
}

/// A device array of `T` with its raw address, for launches.
pub(crate) struct Dev<T> {
    pub slice: CudaSlice<T>,
    pub ptr: DPtr,
}

impl<T: DeviceRepr> Dev<T> {
    fn wrap(slice: CudaSlice<T>, st: &CudaStream) -> Dev<T> {
        // Event tracking is off for the context (see Gpu::open), so the guard records nothing.
        let ptr = {
            let (ptr, _guard) = slice.device_ptr(st);
            ptr
        };
        Dev { slice, ptr }
    }

    /// A copy of `data` on the device (at least one element, so the address is never null).
    pub fn upload(st: &Arc<CudaStream>, data: &[T]) -> Result<Dev<T>> {
        let slice = cu(st.clone_htod(data), "uploading to the GPU")?;
        Ok(Self::wrap(slice, st))
    }

    /// The array's contents (waits for the stream).
    pub fn download(&self, st: &Arc<CudaStream>) -> Result<Vec<T>> {
        let v = cu(st.clone_dtoh(&self.slice), "copying from the GPU")?;
        cu(st.synchronize(), "waiting for the GPU")?;
        Ok(v)
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> Dev<T> {
    /// `len` zeros (at least one).
    pub fn zeros(st: &Arc<CudaStream>, len: usize) -> Result<Dev<T>> {
        let bytes = len * std::mem::size_of::<T>();
        let slice = cu(
            st.alloc_zeros::<T>(len.max(1)),
            &format!("allocating {} MiB on the GPU", bytes >> 20),
        )?;
        Ok(Self::wrap(slice, st))
    }
}

/// Handles to the kernels of sampler.cu and fft.cu.
pub(crate) struct SamplerKernels {
    sms: u32,
    normals: CudaFunction,
    step: CudaFunction,
    chain: CudaFunction,
    update: CudaFunction,
    residual_norms: CudaFunction,
    residual_scale: CudaFunction,
    set_timestep: CudaFunction,
    advance: CudaFunction,
    rows_forward: CudaFunction,
    cols: CudaFunction,
    rows_inverse: CudaFunction,
}

const BLOCK: u32 = 256;
/// NORM_THREADS in sampler.cu.
const NORM_THREADS: u32 = 512;

/// One warp, for the kernels that touch a handful of values.
const ONE_WARP: LaunchConfig = LaunchConfig {
    grid_dim: (1, 1, 1),
    block_dim: (32, 1, 1),
    shared_mem_bytes: 0,
};

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Cuda(format!(
            "{what} = {v} is too large for the kernels' 32-bit indices"
        ))
    })
}

fn need(p: DPtr, what: &str) -> Result<()> {
    if p == 0 {
        return Err(Error::Cuda(format!(
            "internal: null device pointer for {what}"
        )));
    }
    Ok(())
}

impl SamplerKernels {
    /// Loads the two modules on `ctx` (`device` names the GPU in messages).
    pub fn load(ctx: &Arc<CudaContext>, device: &str, sms: usize) -> Result<SamplerKernels> {
        let module = |name: &str| -> Result<_> {
            let (_, image) = fatbins().iter().find(|(n, _)| *n == name).ok_or_else(|| {
                Error::Cuda(format!("kernel module `{name}` is missing from this build"))
            })?;
            cu(
                ctx.load_module(Ptx::from_binary(image.to_vec())),
                &format!("loading kernel module `{name}` on {device}"),
            )
        };
        let (sampler, fft) = (module("sampler")?, module("fft")?);
        let get = |m: &Arc<cudarc::driver::CudaModule>, f: &str| {
            cu(m.load_function(f), &format!("looking up kernel `{f}`"))
        };
        Ok(SamplerKernels {
            sms: (sms as u32).max(1),
            normals: get(&sampler, "sampler_normals")?,
            step: get(&sampler, "sampler_step")?,
            chain: get(&sampler, "sampler_chain")?,
            update: get(&sampler, "sampler_update")?,
            residual_norms: get(&sampler, "sampler_residual_norms")?,
            residual_scale: get(&sampler, "sampler_residual_scale")?,
            set_timestep: get(&sampler, "sampler_set_timestep")?,
            advance: get(&sampler, "sampler_advance")?,
            rows_forward: get(&fft, "fft_rows_forward")?,
            cols: get(&fft, "fft_cols")?,
            rows_inverse: get(&fft, "fft_rows_inverse")?,
        })
    }

    /// Grid-stride launch over `items`.
    fn flat(&self, items: usize) -> LaunchConfig {
        let blocks = items
            .div_ceil(BLOCK as usize)
            .clamp(1, (8 * self.sms) as usize);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A block per line of `line` points, `(lines, pairs, images)` blocks.
    fn lines(&self, line: &FftPlan, lines: usize, img: Images) -> Result<LaunchConfig> {
        let threads = line.len().div_ceil(32).clamp(1, 8) * 32;
        Ok(LaunchConfig {
            grid_dim: (
                u32::try_from(lines).map_err(|_| Error::Cuda("too many FFT lines".into()))?,
                u32::try_from(img.pairs())
                    .ok()
                    .filter(|&p| p <= 65535)
                    .ok_or_else(|| Error::Cuda(format!("{} channels", img.c)))?,
                u32::try_from(img.b)
                    .ok()
                    .filter(|&b| b <= 65535)
                    .ok_or_else(|| Error::Cuda(format!("a batch of {}", img.b)))?,
            ),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 32 * line.len() as u32,
        })
    }

    /// Standard normals of `Noise::Seeded` for `batch` images of `per` values into `out`: slot
    /// `slot` when `at` is None (x_T: 0), else the current step's, skipped at steps that add no
    /// noise. `ids` holds the batch's u64 image ids.
    #[allow(clippy::too_many_arguments)]
    pub fn normals(
        &self,
        st: &CudaStream,
        seed: u64,
        ids: DPtr,
        slot: u64,
        at: Option<Cursor>,
        out: DPtr,
        per: usize,
        batch: usize,
    ) -> Result<()> {
        need(ids, "image ids")?;
        need(out, "output")?;
        let (rows, counter) = at.map_or((0, 0), |c| (c.rows, c.counter));
        let (per_i, batch_i) = (per as i64, i32_of(batch, "batch")?);
        let mut b = st.launch_builder(&self.normals);
        b.arg(&seed)
            .arg(&ids)
            .arg(&slot)
            .arg(&rows)
            .arg(&counter)
            .arg(&out)
            .arg(&per_i)
            .arg(&batch_i);
        // SAFETY: ids holds batch u64, out batch x per floats; the row table holds the counter's row.
        cu(
            unsafe { b.launch(self.flat(batch * per.div_ceil(2))) }.map(drop),
            "launching sampler_normals",
        )
    }

    /// The scheduler step over `len` values: `prev` (may be `x`) and, when non-null,
    /// `xhat` = clean_output(x0); noise from `z + z_slot·z_stride`; `diverged` (or null) records
    /// the step when prev is not finite.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        st: &CudaStream,
        at: Cursor,
        x: DPtr,
        eps: DPtr,
        z: DPtr,
        z_stride: usize,
        prev: DPtr,
        xhat: DPtr,
        len: usize,
        diverged: DPtr,
    ) -> Result<()> {
        need(x, "x")?;
        need(eps, "eps")?;
        need(z, "noise")?;
        need(prev, "prev")?;
        let (zs, l) = (z_stride as i64, len as i64);
        let mut b = st.launch_builder(&self.step);
        b.arg(&at.rows)
            .arg(&at.counter)
            .arg(&x)
            .arg(&eps)
            .arg(&z)
            .arg(&zs)
            .arg(&prev)
            .arg(&xhat)
            .arg(&l)
            .arg(&diverged);
        // SAFETY: every array holds len floats (z: len past every slot the rows name).
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching sampler_step",
        )
    }

    /// The chain rule from d/d x0_hat to the direct gradient and the network's cotangent.
    #[allow(clippy::too_many_arguments)]
    pub fn chain(
        &self,
        st: &CudaStream,
        at: Cursor,
        x: DPtr,
        eps: DPtr,
        d_xhat: DPtr,
        direct: DPtr,
        cot: DPtr,
        len: usize,
    ) -> Result<()> {
        for (p, what) in [
            (x, "x"),
            (eps, "eps"),
            (d_xhat, "d_xhat"),
            (direct, "direct"),
            (cot, "cot"),
        ] {
            need(p, what)?;
        }
        let l = len as i64;
        let mut b = st.launch_builder(&self.chain);
        b.arg(&at.rows)
            .arg(&at.counter)
            .arg(&x)
            .arg(&eps)
            .arg(&d_xhat)
            .arg(&direct)
            .arg(&cot)
            .arg(&l);
        // SAFETY: every array holds len floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching sampler_chain",
        )
    }

    /// The DPS or ΠGDM update into `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        st: &CudaStream,
        at: Cursor,
        mode: Update,
        scale: f32,
        prev: DPtr,
        direct: DPtr,
        g_eps: DPtr,
        x: DPtr,
        len: usize,
        diverged: DPtr,
    ) -> Result<()> {
        for (p, what) in [
            (prev, "prev"),
            (direct, "direct"),
            (g_eps, "g_eps"),
            (x, "x"),
        ] {
            need(p, what)?;
        }
        let (m, l) = (mode as i32, len as i64);
        let mut b = st.launch_builder(&self.update);
        b.arg(&at.rows)
            .arg(&at.counter)
            .arg(&m)
            .arg(&scale)
            .arg(&prev)
            .arg(&direct)
            .arg(&g_eps)
            .arg(&x)
            .arg(&l)
            .arg(&diverged);
        // SAFETY: every array holds len floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching sampler_update",
        )
    }

    /// `r_b /= ||r_b||` for each of `batch` images of `per` values (zero where the norm is 0),
    /// with each image's norm in `norms` (`batch` floats) on the way.
    pub fn residual_normalize(
        &self,
        st: &CudaStream,
        r: DPtr,
        norms: DPtr,
        per: usize,
        batch: usize,
    ) -> Result<()> {
        need(r, "residual")?;
        need(norms, "residual norms")?;
        let len = per * batch;
        let (p, l) = (per as i64, len as i64);
        let mut b = st.launch_builder(&self.residual_norms);
        b.arg(&r).arg(&p).arg(&norms);
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(batch).map_err(|_| Error::Cuda("batch too large".into()))?,
                1,
                1,
            ),
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: r holds batch x per floats, norms batch.
        cu(
            unsafe { b.launch(cfg) }.map(drop),
            "launching sampler_residual_norms",
        )?;
        let mut b = st.launch_builder(&self.residual_scale);
        b.arg(&r).arg(&p).arg(&l).arg(&norms);
        // A thread per value, not flat()'s capped grid-stride: the division's slow-path call
        // keeps a thread from loading its next value before the last one's division
        // (kernels/sampler.cu).
        let blocks = u32::try_from(len.div_ceil(BLOCK as usize).max(1))
            .map_err(|_| Error::Cuda("residual too large".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        cu(
            unsafe { b.launch(cfg) }.map(drop),
            "launching sampler_residual_scale",
        )
    }

    /// The UNet's `n` timestep inputs from the current row.
    pub fn set_timestep(&self, st: &CudaStream, at: Cursor, t: DPtr, n: usize) -> Result<()> {
        need(t, "timesteps")?;
        let ni = i32_of(n, "batch")?;
        let mut b = st.launch_builder(&self.set_timestep);
        b.arg(&at.rows).arg(&at.counter).arg(&t).arg(&ni);
        // SAFETY: t holds n floats.
        cu(
            unsafe { b.launch(ONE_WARP) }.map(drop),
            "launching sampler_set_timestep",
        )
    }

    /// Makes the next row current.
    pub fn advance(&self, st: &CudaStream, counter: DPtr) -> Result<()> {
        need(counter, "counter")?;
        let mut b = st.launch_builder(&self.advance);
        b.arg(&counter);
        // SAFETY: counter is one int.
        cu(
            unsafe { b.launch(ONE_WARP) }.map(drop),
            "launching sampler_advance",
        )
    }

    /// Row FFTs of the channel pairs of `x` (`img`, f32) into `planes` (`[B, P, H, W]` complex).
    pub fn fft_rows_forward(
        &self,
        st: &CudaStream,
        img: Images,
        x: DPtr,
        planes: DPtr,
        row: Line,
    ) -> Result<()> {
        need(x, "input")?;
        need(planes, "planes")?;
        self.check_line(&row, img.w)?;
        let (c, h, w) = (
            i32_of(img.c, "channels")?,
            i32_of(img.h, "height")?,
            i32_of(img.w, "width")?,
        );
        let mut b = st.launch_builder(&self.rows_forward);
        b.arg(&x)
            .arg(&c)
            .arg(&h)
            .arg(&w)
            .arg(&planes)
            .arg(&row.tw)
            .arg(&row.plan);
        // SAFETY: x holds B x C x H x W floats, planes B x P x H x W complex, tw W complex.
        cu(
            unsafe { b.launch(self.lines(&row.plan, img.h, img)?) }.map(drop),
            "launching fft_rows_forward",
        )
    }

    /// Column pass over `planes`: forward transform, `filter`, inverse transform. `otf` is
    /// `[B, H, W]` complex, `yspec` `[B, P, H, W]` (ΠGDM only, else 0); `s2` is ΠGDM's σ² and
    /// `at` gives its r² (ignored by the other filters).
    #[allow(clippy::too_many_arguments)]
    pub fn fft_cols(
        &self,
        st: &CudaStream,
        img: Images,
        planes: DPtr,
        filter: Filter,
        otf: DPtr,
        yspec: DPtr,
        at: Option<Cursor>,
        s2: f64,
        col: Line,
    ) -> Result<()> {
        need(planes, "planes")?;
        if filter != Filter::Forward {
            need(otf, "transfer function")?;
        }
        if filter == Filter::PinvResidual {
            need(yspec, "measurement spectrum")?;
            at.ok_or_else(|| Error::Cuda("internal: the pseudo-inverse needs a step row".into()))?;
        }
        self.check_line(&col, img.h)?;
        let (h, w, mode) = (
            i32_of(img.h, "height")?,
            i32_of(img.w, "width")?,
            filter as i32,
        );
        let (rows, counter) = at.map_or((0, 0), |c| (c.rows, c.counter));
        let scale = 1.0 / (img.h * img.w) as f64;
        let mut b = st.launch_builder(&self.cols);
        b.arg(&planes)
            .arg(&h)
            .arg(&w)
            .arg(&mode)
            .arg(&otf)
            .arg(&yspec)
            .arg(&rows)
            .arg(&counter)
            .arg(&s2)
            .arg(&scale)
            .arg(&col.tw)
            .arg(&col.plan);
        // SAFETY: planes and yspec hold B x P x H x W complex, otf B x H x W, tw H complex.
        cu(
            unsafe { b.launch(self.lines(&col.plan, img.w, img)?) }.map(drop),
            "launching fft_cols",
        )
    }

    /// Inverse row FFTs of `planes` back to the channels of `out` (f32), minus `sub` when it
    /// is non-null.
    pub fn fft_rows_inverse(
        &self,
        st: &CudaStream,
        img: Images,
        planes: DPtr,
        out: DPtr,
        sub: DPtr,
        row: Line,
    ) -> Result<()> {
        need(planes, "planes")?;
        need(out, "output")?;
        self.check_line(&row, img.w)?;
        let (c, h, w) = (
            i32_of(img.c, "channels")?,
            i32_of(img.h, "height")?,
            i32_of(img.w, "width")?,
        );
        let mut b = st.launch_builder(&self.rows_inverse);
        b.arg(&planes)
            .arg(&c)
            .arg(&h)
            .arg(&w)
            .arg(&out)
            .arg(&sub)
            .arg(&row.tw)
            .arg(&row.plan);
        // SAFETY: planes hold B x P x H x W complex; out and sub B x C x H x W floats.
        cu(
            unsafe { b.launch(self.lines(&row.plan, img.h, img)?) }.map(drop),
            "launching fft_rows_inverse",
        )
    }

    fn check_line(&self, line: &Line, n: usize) -> Result<()> {
        need(line.tw, "twiddles")?;
        if line.plan.len() != n {
            return Err(Error::Cuda(format!(
                "internal: an FFT plan of {} points used on lines of {n}",
                line.plan.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radices_multiply_to_the_length() {
        for n in [1, 2, 3, 7, 32, 48, 96, 255, 256, 257, 1000, MAX_LINE] {
            let p = FftPlan::new(n).unwrap();
            let prod: i32 = p.radix[..p.count as usize].iter().product();
            assert_eq!(prod as usize, n, "{n}");
            assert!(p.radix[..p.count as usize].iter().all(|&r| r > 1));
        }
        assert_eq!(FftPlan::new(256).unwrap().count, 4);
        assert!(FftPlan::new(MAX_LINE + 1).is_err());
        assert!(FftPlan::new(0).is_err());
    }

    #[test]
    fn twiddles_are_the_roots_of_unity() {
        let t = twiddles(8);
        assert_eq!(t.len(), 16);
        assert!((t[4] - 0.0).abs() < 1e-15 && (t[5] + 1.0).abs() < 1e-15);
    }
}
