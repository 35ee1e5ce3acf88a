//! Data movement and small element-wise steps (kernels/resample.cu): layout changes, nearest
//! upsampling, channel concatenation, the adds and divisions between ops, and the sinusoidal
//! timestep embedding.

use cudarc::driver::{CudaStream, PushKernelArg};

use super::{concat_outputs, half_kind, half_output, i32_of, i64_of, need, DPtr, Kernels};
use crate::cuda::device::cu;
use crate::cuda::precision::Precision;
use crate::{Error, Result};

/// [`i32_of`] of each `(value, name)`.
fn i32s<const N: usize>(vals: [(usize, &str); N]) -> Result<[i32; N]> {
    let mut out = [0; N];
    for (o, (v, what)) in out.iter_mut().zip(vals) {
        *o = i32_of(v, what)?;
    }
    Ok(out)
}

impl Kernels {
    /// NCHW `x` to NHWC `y`, `y = x * mul + add`.
    #[allow(clippy::too_many_arguments)]
    pub fn to_nhwc(
        &self,
        st: &CudaStream,
        x: DPtr,
        y: DPtr,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        mul: f32,
        add: f32,
    ) -> Result<()> {
        need(x, "NCHW input")?;
        need(y, "NHWC output")?;
        let len = n * c * h * w;
        let [ni, ci, hi, wi] = i32s([(n, "n"), (c, "c"), (h, "h"), (w, "w")])?;
        let mut b = st.launch_builder(&self.nchw_to_nhwc);
        b.arg(&x)
            .arg(&y)
            .arg(&ni)
            .arg(&ci)
            .arg(&hi)
            .arg(&wi)
            .arg(&mul)
            .arg(&add);
        // SAFETY: x and y hold n c h w floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching nchw_to_nhwc",
        )
    }

    /// NHWC `x` to NCHW `y`, `y = x * mul`.
    #[allow(clippy::too_many_arguments)]
    pub fn to_nchw(
        &self,
        st: &CudaStream,
        x: DPtr,
        y: DPtr,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        mul: f32,
    ) -> Result<()> {
        need(x, "NHWC input")?;
        need(y, "NCHW output")?;
        let len = n * c * h * w;
        let [ni, ci, hi, wi] = i32s([(n, "n"), (c, "c"), (h, "h"), (w, "w")])?;
        let mut b = st.launch_builder(&self.nhwc_to_nchw);
        b.arg(&x)
            .arg(&y)
            .arg(&ni)
            .arg(&ci)
            .arg(&hi)
            .arg(&wi)
            .arg(&mul);
        // SAFETY: x and y hold n c h w floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching nhwc_to_nchw",
        )
    }

    /// Nearest 2x upsampling of `[n, h, w, c]`, into fp32 or (`half_out`) 16-bit values for the
    /// tensor-core convolution it feeds.
    #[allow(clippy::too_many_arguments)]
    pub fn upsample(
        &self,
        st: &CudaStream,
        x: DPtr,
        y: DPtr,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        half_out: Option<Precision>,
    ) -> Result<()> {
        need(x, "input")?;
        need(y, "output")?;
        let [ni, hi, wi, ci] = i32s([(n, "n"), (h, "h"), (w, "w"), (c, "c")])?;
        if let Some(precision) = half_out {
            if c % 8 != 0 || x % 16 != 0 || y % 16 != 0 {
                return Err(Error::Cuda(format!(
                    "internal: 16-bit upsampling output with {c} channels or unaligned buffers"
                )));
            }
            let kind = half_kind(precision)?;
            let mut b = st.launch_builder(&self.upsample2x_half);
            b.arg(&x)
                .arg(&y)
                .arg(&ni)
                .arg(&hi)
                .arg(&wi)
                .arg(&ci)
                .arg(&kind);
            // SAFETY: x holds n h w c floats, y room for four times as many 16-bit values.
            return cu(
                unsafe { b.launch(self.flat(4 * n * h * w * c / 8)) }.map(drop),
                "launching upsample2x_half",
            );
        }
        let mut b = st.launch_builder(&self.upsample2x);
        b.arg(&x).arg(&y).arg(&ni).arg(&hi).arg(&wi).arg(&ci);
        // SAFETY: x holds n h w c floats, y four times as many.
        cu(
            unsafe { b.launch(self.flat(4 * n * h * w * c)) }.map(drop),
            "launching upsample2x",
        )
    }

    /// Adjoint of [`upsample`](Self::upsample): `dx (+)= 2x2 block sums of dy`.
    #[allow(clippy::too_many_arguments)]
    pub fn upsample_backward(
        &self,
        st: &CudaStream,
        dy: DPtr,
        dx: DPtr,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        accumulate: bool,
    ) -> Result<()> {
        need(dy, "output gradient")?;
        need(dx, "input gradient")?;
        let [ni, hi, wi, ci] = i32s([(n, "n"), (h, "h"), (w, "w"), (c, "c")])?;
        let acc = accumulate as i32;
        let mut b = st.launch_builder(&self.upsample2x_backward);
        b.arg(&dy)
            .arg(&dx)
            .arg(&ni)
            .arg(&hi)
            .arg(&wi)
            .arg(&ci)
            .arg(&acc);
        // SAFETY: dx holds n h w c floats, dy four times as many.
        cu(
            unsafe { b.launch(self.flat(n * h * w * c)) }.map(drop),
            "launching upsample2x_backward",
        )
    }

    /// `y = [a | b]` along channels over `pixels` pixels; with `half`, also a 16-bit copy of
    /// `y` in that precision at the given address, for tensor-core convolutions to read, or,
    /// with a `y` of 0, only that copy, where an `a` or `b` of 0 is a side already there.
    #[allow(clippy::too_many_arguments)]
    pub fn concat(
        &self,
        st: &CudaStream,
        a: DPtr,
        b_: DPtr,
        y: DPtr,
        half: Option<(DPtr, Precision)>,
        pixels: usize,
        ca: usize,
        cb: usize,
    ) -> Result<()> {
        let (y16, kind) = concat_outputs(a, b_, y, half)?;
        if a == 0 && b_ == 0 {
            return Err(Error::Cuda(
                "internal: a concatenation launched with both sides already written".into(),
            ));
        }
        let (p, cai, cbi) = (
            i64_of(pixels),
            i32_of(ca, "channels")?,
            i32_of(cb, "channels")?,
        );
        // A y of 0 (only the 16-bit copy, KernelConfig::half_gn_inputs) is aligned too.
        let vec =
            ca % 4 == 0 && cb % 4 == 0 && [a, b_, y].iter().all(|p| p % 16 == 0) && y16 % 8 == 0;
        let vec4 = vec as i32;
        let (f, name) = match y {
            0 => (&self.concat_channels_half, "concat_channels_half"),
            _ => (&self.concat_channels, "concat_channels"),
        };
        let mut b = st.launch_builder(f);
        b.arg(&a).arg(&b_);
        if y != 0 {
            b.arg(&y);
        }
        b.arg(&y16)
            .arg(&kind)
            .arg(&p)
            .arg(&cai)
            .arg(&cbi)
            .arg(&vec4);
        let items = pixels * (ca + cb) / if vec { 4 } else { 1 };
        // SAFETY: a is pixels x ca, b pixels x cb, y (when set) pixels x (ca + cb), y16 (when
        // set) room for as many 16-bit values.
        cu(
            unsafe { b.launch(self.flat(items)) }.map(drop),
            &format!("launching {name}"),
        )
    }

    /// `d (+)= dy[.., offset .. offset + width]` over `pixels` pixels of `c` channels; with
    /// `half`, also a 16-bit copy of the new `d` in that precision at the given address (what
    /// a conversion launch would write), for tensor-core convolutions to read.
    #[allow(clippy::too_many_arguments)]
    pub fn concat_backward(
        &self,
        st: &CudaStream,
        dy: DPtr,
        d: DPtr,
        half: Option<(DPtr, Precision)>,
        pixels: usize,
        c: usize,
        offset: usize,
        width: usize,
        accumulate: bool,
    ) -> Result<()> {
        need(dy, "output gradient")?;
        need(d, "input gradient")?;
        if offset + width > c {
            return Err(Error::Cuda(format!(
                "concat adjoint: channels {offset}..{} of {c}",
                offset + width
            )));
        }
        let (d16, kind) = half_output(half, "16-bit input gradient")?;
        let (p, ci, oi, wi) = (i64_of(pixels), i32_of(c, "c")?, offset as i32, width as i32);
        let acc = accumulate as i32;
        let vec = [c, offset, width].iter().all(|v| v % 4 == 0)
            && dy % 16 == 0
            && d % 16 == 0
            && d16 % 8 == 0;
        let vec4 = vec as i32;
        let mut b = st.launch_builder(&self.concat_backward);
        b.arg(&dy)
            .arg(&d)
            .arg(&d16)
            .arg(&kind)
            .arg(&p)
            .arg(&ci)
            .arg(&oi)
            .arg(&wi)
            .arg(&acc)
            .arg(&vec4);
        let items = pixels * width / if vec { 4 } else { 1 };
        // SAFETY: dy is pixels x c, d pixels x width, d16 (when set) room for as many 16-bit
        // values.
        cu(
            unsafe { b.launch(self.flat(items)) }.map(drop),
            "launching concat_backward",
        )
    }

    /// `dst (+)= src` over `len` elements.
    pub fn add_into(
        &self,
        st: &CudaStream,
        dst: DPtr,
        src: DPtr,
        len: usize,
        accumulate: bool,
    ) -> Result<()> {
        need(dst, "destination")?;
        need(src, "source")?;
        let (l, acc) = (i64_of(len), accumulate as i32);
        let vec = len % 4 == 0 && dst % 16 == 0 && src % 16 == 0;
        let vec4 = vec as i32;
        let mut b = st.launch_builder(&self.add_into);
        b.arg(&dst).arg(&src).arg(&l).arg(&acc).arg(&vec4);
        let items = if vec { len / 4 } else { len };
        // SAFETY: both hold len floats.
        cu(
            unsafe { b.launch(self.flat(items)) }.map(drop),
            "launching add_into",
        )
    }

    /// `x /= div` over `len` elements.
    pub fn divide(&self, st: &CudaStream, x: DPtr, len: usize, div: f32) -> Result<()> {
        need(x, "buffer")?;
        let l = i64_of(len);
        let mut b = st.launch_builder(&self.div_inplace);
        b.arg(&x).arg(&l).arg(&div);
        // SAFETY: x holds len floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching div_inplace",
        )
    }

    /// The sinusoidal embedding of `n` timesteps, `[n, dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn timestep_embedding(
        &self,
        st: &CudaStream,
        t: DPtr,
        y: DPtr,
        n: usize,
        dim: usize,
        flip: bool,
        shift: f32,
    ) -> Result<()> {
        need(t, "timesteps")?;
        need(y, "embedding")?;
        let (ni, di, fl) = (i32_of(n, "n")?, i32_of(dim, "dim")?, flip as i32);
        // The CPU's constant: ln(10000) in f64, rounded to f32, negated.
        let log_period = -(10000f64.ln() as f32);
        let mut b = st.launch_builder(&self.timestep_embedding);
        b.arg(&t)
            .arg(&y)
            .arg(&ni)
            .arg(&di)
            .arg(&fl)
            .arg(&shift)
            .arg(&log_period);
        // SAFETY: t holds n floats, y n x dim.
        cu(
            unsafe { b.launch(self.flat(n * dim.div_ceil(2).max(1))) }.map(drop),
            "launching timestep_embedding",
        )
    }
}
