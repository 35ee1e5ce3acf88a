//! Circular convolution by FFT: the notebook's `fft_blur`, its adjoint and `pinv_deblurring`.
//!
//! Arithmetic is f64 complex (rustfft) whatever the f32 inputs: it costs about twice f32 and
//! keeps our own rounding two orders of magnitude below torch's complex64 pocketfft, so the
//! distance to the notebook is torch's error alone and the adjoint identity holds to ~1e-15.
//! Bit parity with pocketfft is out of reach anyway (different FFT algorithms).
//!
//! Two channels share one complex FFT (`x_a + i·x_b`): every filter here has a real impulse
//! response (Hermitian spectrum), so the real and imaginary parts of the result are the two
//! filtered channels. A 3-channel image thus costs two complex 2-D transforms per direction.

use std::sync::Arc;

use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use super::operator::{check_len, LinearOperator};
use crate::{Error, Result, Tensor};

type C64 = Complex<f64>;

/// Rows per rayon task in the FFT passes.
const ROWS_PER_TASK: usize = 8;

/// The notebook's `fft_blur(x, k)`: circular *convolution* (not correlation) of every channel
/// with the same kernel, stored as given (no flip, no normalisation), centred by `p2o` at index
/// `(floor(kh/2), floor(kw/2))`:
/// `y[c,i,j] = Σ_{a,b} k[a,b] · x[c, (i − a + kh/2) mod H, (j − b + kw/2) mod W]`.
pub struct CircularBlur {
    shape: [usize; 3],
    kernel: Vec<f32>,
    kernel_hw: [usize; 2],
    /// FFT of `p2o(kernel)`, stored transposed (`W` rows of `H`), the layout [`Fft2`] yields.
    otf: Vec<C64>,
    fft: Fft2,
}

impl CircularBlur {
    /// A blur of `channels×h×w` images by `kernel` of shape `[kh, kw]`, `[1, kh, kw]` or
    /// `[1, 1, kh, kw]` (the notebook's `(1, 1, 33, 33)`).
    pub fn new(kernel: &Tensor, channels: usize, h: usize, w: usize) -> Result<Self> {
        let [kh, kw] = match *kernel.shape() {
            [kh, kw] | [1, kh, kw] | [1, 1, kh, kw] => [kh, kw],
            ref s => {
                return Err(Error::input(format!(
                    "blur kernel must have shape [h, w], [1, h, w] or [1, 1, h, w], got {s:?}"
                )))
            }
        };
        Self::from_slice(kernel.data(), kh, kw, channels, h, w)
    }

    /// As [`CircularBlur::new`] from a row-major `kh×kw` slice.
    pub fn from_slice(
        kernel: &[f32],
        kh: usize,
        kw: usize,
        channels: usize,
        h: usize,
        w: usize,
    ) -> Result<Self> {
        if kh == 0 || kw == 0 || kernel.len() != kh * kw {
            return Err(Error::input(format!(
                "blur kernel of {kh}×{kw} needs {} values, got {} (and may not be empty)",
                kh * kw,
                kernel.len()
            )));
        }
        if channels == 0 || h == 0 || w == 0 {
            return Err(Error::input(format!(
                "blur image shape must be non-empty, got {channels}×{h}×{w}"
            )));
        }
        if kh > h || kw > w {
            return Err(Error::input(format!(
                "blur kernel of {kh}×{kw} is larger than the {h}×{w} image"
            )));
        }
        if let Some(i) = kernel.iter().position(|v| !v.is_finite()) {
            return Err(Error::input(format!(
                "blur kernel value {i} (row {}, column {}) is {}",
                i / kw,
                i % kw,
                kernel[i]
            )));
        }
        let fft = Fft2::new(h, w);
        // p2o: the kernel at the top-left corner, rolled by −floor(k/2) along each axis.
        let mut psf = vec![C64::new(0.0, 0.0); h * w];
        for a in 0..kh {
            for b in 0..kw {
                let i = (a + h - kh / 2) % h;
                let j = (b + w - kw / 2) % w;
                psf[i * w + j].re = f64::from(kernel[a * kw + b]);
            }
        }
        let mut otf = vec![C64::new(0.0, 0.0); h * w];
        fft.forward(&mut psf, &mut otf);
        Ok(CircularBlur {
            shape: [channels, h, w],
            kernel: kernel.to_vec(),
            kernel_hw: [kh, kw],
            otf,
            fft,
        })
    }

    /// The kernel as given, row-major.
    pub fn kernel(&self) -> &[f32] {
        &self.kernel
    }

    /// `[kh, kw]`.
    pub fn kernel_shape(&self) -> [usize; 2] {
        self.kernel_hw
    }

    /// Filters every channel of `x` by `filter(K)` at each frequency, `K` being the OTF.
    fn apply(&self, x: &[f32], out: &mut [f32], filter: impl Fn(C64) -> C64 + Sync) -> Result<()> {
        check_len("blur input", x.len(), self.shape)?;
        check_len("blur output", out.len(), self.shape)?;
        let scale = self.fft.scale();
        self.for_channel_pairs(out, |c, bufs| {
            let [data, spec, _] = bufs;
            load_pair(x, c, data);
            self.fft.forward(data, spec);
            spec.par_iter_mut()
                .zip(self.otf.par_iter())
                .for_each(|(s, &k)| *s *= filter(k) * scale);
        });
        Ok(())
    }

    /// For each pair of channels `(c, c + 1)` (the last alone if C is odd), lets `spectrum`
    /// leave a (transposed) spectrum in the second of three plane-sized buffers, then writes
    /// its inverse transform into `out`.
    fn for_channel_pairs(&self, out: &mut [f32], spectrum: impl Fn(usize, [&mut [C64]; 3])) {
        let plane = self.shape[1] * self.shape[2];
        let zero = C64::new(0.0, 0.0);
        let (mut a, mut b, mut c) = (vec![zero; plane], vec![zero; plane], vec![zero; plane]);
        for ch in (0..self.shape[0]).step_by(2) {
            spectrum(ch, [&mut a, &mut b, &mut c]);
            self.fft.inverse(&mut b, &mut a);
            store_pair(&a, ch, out);
        }
    }
}

/// Channels `c` and `c + 1` (if any) of `x` as the real and imaginary parts of `buf`.
fn load_pair(x: &[f32], c: usize, buf: &mut [C64]) {
    let plane = buf.len();
    let re = &x[c * plane..(c + 1) * plane];
    match x.get((c + 1) * plane..(c + 2) * plane) {
        Some(im) => {
            for ((v, &a), &b) in buf.iter_mut().zip(re).zip(im) {
                *v = C64::new(f64::from(a), f64::from(b));
            }
        }
        None => {
            for (v, &a) in buf.iter_mut().zip(re) {
                *v = C64::new(f64::from(a), 0.0);
            }
        }
    }
}

/// The inverse of [`load_pair`], rounding to f32.
fn store_pair(buf: &[C64], c: usize, out: &mut [f32]) {
    let plane = buf.len();
    let (head, tail) = out.split_at_mut((c + 1) * plane);
    for (o, v) in head[c * plane..].iter_mut().zip(buf) {
        *o = v.re as f32;
    }
    if let Some(im) = tail.get_mut(..plane) {
        for (o, v) in im.iter_mut().zip(buf) {
            *o = v.im as f32;
        }
    }
}

/// `r²` rounded to f32 (torch's `r ** 2` on a 0-d float32 tensor) and `σ²` computed in f64 then
/// rounded to f32 (a Python float added to a complex64 tensor), both widened back to f64.
fn wiener_params(r: f32, sigma: f32) -> Result<(f64, f64)> {
    if !(r.is_finite() && sigma.is_finite() && sigma > 0.0) {
        return Err(Error::input(format!(
            "pseudo-inverse needs a finite r and a finite sigma > 0, got r = {r}, sigma = {sigma}"
        )));
    }
    let s = f64::from(sigma);
    Ok((f64::from(r * r), f64::from((s * s) as f32)))
}

impl LinearOperator for CircularBlur {
    fn input_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn output_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        self.apply(x, out, |k| k)
    }

    /// Circular correlation, `real(ifft2(conj(K) · fft2(y)))`.
    fn adjoint(&self, y: &[f32], out: &mut [f32]) -> Result<()> {
        self.apply(y, out, |k| k.conj())
    }

    /// `pinv_deblurring`: `real(ifft2(conj(K) / (r²|K|² + σ²) · fft2(y)))`.
    fn pseudo_inverse(&self, y: &[f32], r: f32, sigma: f32, out: &mut [f32]) -> Result<()> {
        let (r2, s2) = wiener_params(r, sigma)?;
        self.apply(y, out, |k| k.conj() / (r2 * k.norm_sqr() + s2))
    }

    /// Fused in the frequency domain, `conj(K)/(r²|K|²+σ²) · (fft2(y) − K·fft2(x))`: one
    /// inverse transform instead of three, and no intermediate f32 rounding.
    fn pinv_residual(
        &self,
        y: &[f32],
        x: &[f32],
        r: f32,
        sigma: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let (r2, s2) = wiener_params(r, sigma)?;
        check_len("guidance measurement", y.len(), self.shape)?;
        check_len("guidance estimate", x.len(), self.shape)?;
        check_len("guidance output", out.len(), self.shape)?;
        let scale = self.fft.scale();
        self.for_channel_pairs(out, |c, bufs| {
            let [data, spec_y, spec_x] = bufs;
            load_pair(x, c, data);
            self.fft.forward(data, spec_x);
            load_pair(y, c, data);
            self.fft.forward(data, spec_y);
            spec_y
                .par_iter_mut()
                .zip(spec_x.par_iter())
                .zip(self.otf.par_iter())
                .for_each(|((sy, &sx), &k)| {
                    *sy = k.conj() / (r2 * k.norm_sqr() + s2) * (*sy - k * sx) * scale;
                });
        });
        Ok(())
    }

    fn as_circular_blur(&self) -> Option<&CircularBlur> {
        Some(self)
    }
}

/// A planned 2-D complex FFT of `H×W` planes whose spectra are kept transposed (`W×H`), which
/// saves a transpose per direction since every filter here is pointwise.
struct Fft2 {
    h: usize,
    w: usize,
    row_fwd: Arc<dyn Fft<f64>>,
    row_inv: Arc<dyn Fft<f64>>,
    col_fwd: Arc<dyn Fft<f64>>,
    col_inv: Arc<dyn Fft<f64>>,
}

impl Fft2 {
    fn new(h: usize, w: usize) -> Self {
        let mut planner = FftPlanner::new();
        Fft2 {
            h,
            w,
            row_fwd: planner.plan_fft_forward(w),
            row_inv: planner.plan_fft_inverse(w),
            col_fwd: planner.plan_fft_forward(h),
            col_inv: planner.plan_fft_inverse(h),
        }
    }

    /// The factor `1 / (H·W)` that makes [`Fft2::inverse`] the inverse of [`Fft2::forward`];
    /// callers fold it into their pointwise filter.
    fn scale(&self) -> f64 {
        1.0 / (self.h * self.w) as f64
    }

    /// `spec` = DFT of the `H×W` plane `data`, transposed; `data` is used as scratch.
    fn forward(&self, data: &mut [C64], spec: &mut [C64]) {
        fft_rows(data, self.w, &self.row_fwd);
        transpose(data, spec, self.h, self.w);
        fft_rows(spec, self.h, &self.col_fwd);
    }

    /// `data` = unnormalised inverse DFT of the transposed spectrum `spec` (used as scratch).
    fn inverse(&self, spec: &mut [C64], data: &mut [C64]) {
        fft_rows(spec, self.h, &self.col_inv);
        transpose(spec, data, self.w, self.h);
        fft_rows(data, self.w, &self.row_inv);
    }
}

/// In-place FFTs of every `len`-long row of `buf`, in parallel.
fn fft_rows(buf: &mut [C64], len: usize, fft: &Arc<dyn Fft<f64>>) {
    buf.par_chunks_mut(len * ROWS_PER_TASK).for_each_init(
        || vec![C64::new(0.0, 0.0); fft.get_inplace_scratch_len()],
        |scratch, rows| fft.process_with_scratch(rows, scratch),
    );
}

/// `dst (cols×rows) = srcᵀ` for `src` of `rows×cols`, by tiles to stay in cache.
fn transpose(src: &[C64], dst: &mut [C64], rows: usize, cols: usize) {
    const TILE: usize = 16;
    dst.par_chunks_mut(rows * TILE)
        .enumerate()
        .for_each(|(tile_col, block)| {
            let c0 = tile_col * TILE;
            let nc = block.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let src_row = &src[r * cols + c0..r * cols + c0 + nc];
                    for (dc, &v) in src_row.iter().enumerate() {
                        block[dc * rows + r] = v;
                    }
                }
            }
        });
}
