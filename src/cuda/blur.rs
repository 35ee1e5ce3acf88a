//! [`CircularBlur`] on the GPU, one kernel per image: `A`, `Aᵀ` and ΠGDM's pseudo-inverse of the
//! residual as pointwise filters between the FFTs of kernels/fft.cu (three launches each).
//!
//! Built once per sampling run: the transfer function of every image's kernel (`p2o` as on the
//! CPU, then a forward FFT on the device), the twiddle tables, the complex scratch planes, and for
//! ΠGDM the spectrum of every measurement (which does not change during the run). Applying it
//! allocates nothing, so it can be captured in a CUDA graph.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::kernels::DPtr;
use super::sampler_kernels::{
    twiddles, Cursor, Dev, FftPlan, Filter, Images, Line, SamplerKernels, MAX_LINE,
};
use crate::inverse::{CircularBlur, LinearOperator};
use crate::{ensure, Result};

/// Per-image circular blurs of a batch of `[B, C, H, W]` images on the device.
pub(crate) struct DeviceBlur {
    img: Images,
    row: Line,
    col: Line,
    /// `[B, H, W]` complex (f64 pairs): the FFT of each image's `p2o(kernel)`.
    otf: Dev<f64>,
    /// `[B, P, H, W]` complex scratch for the transforms.
    planes: Dev<f64>,
    /// `[B, P, H, W]` complex: the measurements' spectra, once set.
    yspec: Option<Dev<f64>>,
    // The twiddle tables the lines point at.
    _tw: (Dev<f64>, Dev<f64>),
}

/// Whether [`DeviceBlur`] takes `h x w` images.
pub(crate) fn fits(h: usize, w: usize) -> bool {
    (1..=MAX_LINE).contains(&h) && (1..=MAX_LINE).contains(&w)
}

impl DeviceBlur {
    /// The blurs `ops` (one per image) of `[ops.len(), c, h, w]` images.
    pub fn new(
        k: &SamplerKernels,
        st: &Arc<CudaStream>,
        ops: &[&CircularBlur],
        [c, h, w]: [usize; 3],
    ) -> Result<DeviceBlur> {
        ensure!(
            fits(h, w),
            "the GPU blur takes images of at most {MAX_LINE} x {MAX_LINE}, got {h} x {w}"
        );
        for op in ops {
            ensure!(
                op.input_shape() == [c, h, w],
                "blur operator for {:?} images used on {:?}",
                op.input_shape(),
                [c, h, w]
            );
        }
        let img = Images {
            b: ops.len(),
            c,
            h,
            w,
        };
        let (tw_w, tw_h) = (
            Dev::upload(st, &twiddles(w))?,
            Dev::upload(st, &twiddles(h))?,
        );
        let row = Line {
            plan: FftPlan::new(w)?,
            tw: tw_w.ptr,
        };
        let col = Line {
            plan: FftPlan::new(h)?,
            tw: tw_h.ptr,
        };
        // p2o: each kernel at the top-left corner, rolled by −floor(k/2) along each axis.
        let mut psf = vec![0.0f32; ops.len() * h * w];
        for (plane, op) in psf.chunks_exact_mut(h * w).zip(ops) {
            let ([kh, kw], kernel) = (op.kernel_shape(), op.kernel());
            for a in 0..kh {
                for b in 0..kw {
                    let i = (a + h - kh / 2) % h;
                    let j = (b + w - kw / 2) % w;
                    plane[i * w + j] = kernel[a * kw + b];
                }
            }
        }
        let psf = Dev::upload(st, &psf)?;
        let otf = Dev::<f64>::zeros(st, 2 * ops.len() * h * w)?;
        let one = Images { c: 1, ..img };
        k.fft_rows_forward(st, one, psf.ptr, otf.ptr, row)?;
        k.fft_cols(st, one, otf.ptr, Filter::Forward, 0, 0, None, 0.0, col)?;
        let planes = Dev::<f64>::zeros(st, 2 * img.b * img.pairs() * h * w)?;
        Ok(DeviceBlur {
            img,
            row,
            col,
            otf,
            planes,
            yspec: None,
            _tw: (tw_w, tw_h),
        })
    }

    /// The images this blur covers.
    pub fn images(&self) -> Images {
        self.img
    }

    /// Transforms the measurements `y` (`[B, C, H, W]` f32 on the device) once, for
    /// [`Filter::PinvResidual`].
    pub fn set_measurement(
        &mut self,
        k: &SamplerKernels,
        st: &Arc<CudaStream>,
        y: DPtr,
    ) -> Result<()> {
        let spec = Dev::<f64>::zeros(
            st,
            2 * self.img.b * self.img.pairs() * self.img.h * self.img.w,
        )?;
        k.fft_rows_forward(st, self.img, y, spec.ptr, self.row)?;
        k.fft_cols(
            st,
            self.img,
            spec.ptr,
            Filter::Forward,
            0,
            0,
            None,
            0.0,
            self.col,
        )?;
        self.yspec = Some(spec);
        Ok(())
    }

    /// `out = filter(x) − sub` (`sub` may be 0) for `[B, C, H, W]` f32 device arrays: `A x`,
    /// `Aᵀ x`, or ΠGDM's `pinv(y − A x)` with the current step's r² (at `at`) and σ² `s2`.
    /// `out` may be `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        k: &SamplerKernels,
        st: &CudaStream,
        filter: Filter,
        x: DPtr,
        out: DPtr,
        sub: DPtr,
        at: Option<Cursor>,
        s2: f64,
    ) -> Result<()> {
        let yspec = match filter {
            Filter::Forward => {
                return Err(crate::Error::Cuda(
                    "internal: a blur applies a filter, not the bare spectrum".into(),
                ))
            }
            Filter::PinvResidual => {
                self.yspec
                    .as_ref()
                    .ok_or_else(|| {
                        crate::Error::Cuda(
                            "internal: the pseudo-inverse needs the measurement set first".into(),
                        )
                    })?
                    .ptr
            }
            _ => 0,
        };
        k.fft_rows_forward(st, self.img, x, self.planes.ptr, self.row)?;
        k.fft_cols(
            st,
            self.img,
            self.planes.ptr,
            filter,
            self.otf.ptr,
            yspec,
            at,
            s2,
            self.col,
        )?;
        k.fft_rows_inverse(st, self.img, self.planes.ptr, out, sub, self.row)
    }
}
