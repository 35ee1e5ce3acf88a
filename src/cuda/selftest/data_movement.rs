//! Data movement: layout changes, upsampling, concatenation and the element-wise steps.

use super::{acc_name, placed_sides, round_half, unpack_half, Tester};
use crate::cpu::resample;
use crate::cuda::kernels::DPtr;
use crate::cuda::precision::Precision;
use crate::Result;

impl Tester<'_> {
    pub(super) fn data_movement(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let k = &gpu.kernels;
        let (n, h, w, c) = (2, 5, 3, 6);
        let x = self.rand(n * h * w * c, -1.0, 1.0);
        let mut want = vec![0.0; 4 * x.len()];
        resample::upsample2x(&x, h, w, c, &mut want);
        let (xd, yd) = (self.up(&x)?, self.zeros(want.len())?);
        let ms = self.timed(
            || Ok(()),
            || k.upsample(st, xd.ptr, yd.ptr, n, h, w, c, None),
        )?;
        let got = yd.download(st)?;
        let desc = format!("n{n} {h}x{w} c{c}");
        self.row("upsample2x forward".into(), desc.clone(), &got, &want, ms);
        // Into 16 bits (for a tensor-core convolution): each value rounded once, as the
        // host rounds it.
        {
            let c = 16;
            let x = self.rand(n * h * w * c, -1.0, 1.0);
            let mut up = vec![0.0; 4 * x.len()];
            resample::upsample2x(&x, h, w, c, &mut up);
            let xd = self.up(&x)?;
            for precision in [Precision::Bf16, Precision::Fp16] {
                let want: Vec<f32> = up.iter().map(|&v| round_half(v, precision)).collect();
                let yd = self.zeros(up.len().div_ceil(2))?;
                let ms = self.timed(
                    || Ok(()),
                    || k.upsample(st, xd.ptr, yd.ptr, n, h, w, c, Some(precision)),
                )?;
                let got = unpack_half(&yd.download(st)?, up.len(), precision);
                self.row(
                    format!("upsample2x forward, {precision} output"),
                    format!("n{n} {h}x{w} c{c}"),
                    &got,
                    &want,
                    ms,
                );
            }
        }
        for accumulate in [false, true] {
            let dy = self.rand(4 * x.len(), -1.0, 1.0);
            let dx0 = self.grad_start(x.len(), accumulate);
            let mut want = dx0.clone();
            resample::upsample2x_backward(&dy, n, h, w, c, &mut want, accumulate);
            let dyd = self.up(&dy)?;
            let mut dxd = self.up(&dx0)?;
            let p = dxd.ptr;
            let ms = self.timed(
                || dxd.write(st, &dx0),
                || k.upsample_backward(st, dyd.ptr, p, n, h, w, c, accumulate),
            )?;
            let got = dxd.download(st)?;
            self.row(
                format!("upsample2x adjoint{}", acc_name(accumulate)),
                desc.clone(),
                &got,
                &want,
                ms,
            );
        }

        // Channel counts that are, and are not, multiples of four: the kernels' float4 and
        // scalar paths.
        for (pixels, ca, cb) in [(37, 5, 11), (37, 8, 12)] {
            let a = self.rand(pixels * ca, -1.0, 1.0);
            let b = self.rand(pixels * cb, -1.0, 1.0);
            let mut want = vec![0.0; pixels * (ca + cb)];
            resample::concat(&a, ca, &b, cb, &mut want);
            let (ad, bd, mut yd) = (self.up(&a)?, self.up(&b)?, self.zeros(want.len())?);
            let ms = self.timed(
                || Ok(()),
                || k.concat(st, ad.ptr, bd.ptr, yd.ptr, None, pixels, ca, cb),
            )?;
            let got = yd.download(st)?;
            let desc = format!("{pixels} px, {ca}+{cb}");
            self.row("concat forward".into(), desc.clone(), &got, &want, ms);
            // With the 16-bit copy for tensor-core readers: the copy, then y again.
            yd.write(st, &vec![0.0; want.len()])?;
            self.half_output_rows(
                "concat forward, 16-bit copy",
                &desc,
                &want,
                |out, precision| {
                    k.concat(
                        st,
                        ad.ptr,
                        bd.ptr,
                        yd.ptr,
                        Some((out, precision)),
                        pixels,
                        ca,
                        cb,
                    )
                },
            )?;
            let got = yd.download(st)?;
            self.row(
                "concat forward beside its 16-bit copy".into(),
                desc.clone(),
                &got,
                &want,
                ms,
            );
            // The 16-bit values alone (INVDIFF_GN_HALF_INPUT): the copy's bits.
            for precision in [Precision::Bf16, Precision::Fp16] {
                let (beside, alone) = (
                    self.zeros(want.len().div_ceil(2))?,
                    self.zeros(want.len().div_ceil(2))?,
                );
                let run = |y, out| {
                    k.concat(
                        st,
                        ad.ptr,
                        bd.ptr,
                        y,
                        Some((out, precision)),
                        pixels,
                        ca,
                        cb,
                    )
                };
                run(yd.ptr, beside.ptr)?;
                let ms = self.timed(|| Ok(()), || run(0, alone.ptr))?;
                let [beside, alone] = [&beside, &alone].map(|b| {
                    b.download(st)
                        .map(|w| unpack_half(&w, want.len(), precision))
                });
                let beside = beside?;
                self.row_within(
                    format!("concat forward, {precision} only vs its copy"),
                    desc.clone(),
                    &alone?,
                    &beside,
                    ms,
                    0.0,
                );
                // With one side already written by its producers (INVDIFF_CONCAT_FROM_PRODUCERS):
                // the other side's values written, the placed one's kept.
                for placed in [[true, false], [false, true]] {
                    let start = placed_sides(&beside, (ca, cb), placed, precision);
                    let out = self.up(&start)?;
                    let side = |p: bool, d: DPtr| if p { 0 } else { d };
                    k.concat(
                        st,
                        side(placed[0], ad.ptr),
                        side(placed[1], bd.ptr),
                        0,
                        Some((out.ptr, precision)),
                        pixels,
                        ca,
                        cb,
                    )?;
                    let got = unpack_half(&out.download(st)?, want.len(), precision);
                    self.row_within(
                        format!(
                            "concat forward, {precision} only, side {placed:?} placed vs unplaced"
                        ),
                        format!("{desc}, bits"),
                        &got,
                        &beside,
                        0.0,
                        0.0,
                    );
                }
            }
            let dy = self.rand(want.len(), -1.0, 1.0);
            for (offset, width, accumulate) in [(0, ca, true), (ca, cb, false)] {
                let d0 = self.grad_start(pixels * width, accumulate);
                let mut want = d0.clone();
                resample::concat_backward(&dy, ca + cb, offset, width, &mut want, accumulate);
                let dyd = self.up(&dy)?;
                let mut dd = self.up(&d0)?;
                let p = dd.ptr;
                let adjoint = |half| {
                    k.concat_backward(
                        st,
                        dyd.ptr,
                        p,
                        half,
                        pixels,
                        ca + cb,
                        offset,
                        width,
                        accumulate,
                    )
                };
                let ms = self.timed(|| dd.write(st, &d0), || adjoint(None))?;
                let got = dd.download(st)?;
                let name = format!(
                    "concat adjoint ch {offset}..{}{}",
                    offset + width,
                    acc_name(accumulate)
                );
                self.row(name.clone(), desc.clone(), &got, &want, ms);
                // With the 16-bit copy of the new gradient (INVDIFF_HALF_COPY_FUSED).
                self.half_copy_rows(&name, &desc, &got, |out, precision| {
                    dd.write(st, &d0)?;
                    adjoint(Some((out, precision)))?;
                    dd.download(st)
                })?;
            }
        }

        let (n, c, h, w) = (3, 4, 5, 7);
        let x = self.rand(n * c * h * w, -1.0, 1.0);
        let want: Vec<f32> = resample::nchw_to_nhwc(&x, c, h, w)
            .iter()
            .map(|v| 2.0 * v - 1.0)
            .collect();
        let (xd, yd) = (self.up(&x)?, self.zeros(x.len())?);
        let ms = self.timed(
            || Ok(()),
            || k.to_nhwc(st, xd.ptr, yd.ptr, n, c, h, w, 2.0, -1.0),
        )?;
        let got = yd.download(st)?;
        self.row(
            "nchw->nhwc (2x - 1)".into(),
            format!("n{n} c{c} {h}x{w}"),
            &got,
            &want,
            ms,
        );
        let want: Vec<f32> = resample::nhwc_to_nchw(&x, n, c, h, w)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let ms = self.timed(|| Ok(()), || k.to_nchw(st, xd.ptr, yd.ptr, n, c, h, w, 2.0))?;
        let got = yd.download(st)?;
        self.row(
            "nhwc->nchw (x2)".into(),
            format!("n{n} c{c} {h}x{w}"),
            &got,
            &want,
            ms,
        );

        for (dim, flip, shift) in [(128, false, 1.0f32), (33, true, 0.0)] {
            let t = vec![0.0, 1.0, 999.0, 500.5];
            let want = resample::timestep_embedding(&t, dim, flip, shift);
            let (td, yd) = (self.up(&t)?, self.up(&vec![f32::NAN; want.len()])?);
            let ms = self.timed(
                || Ok(()),
                || k.timestep_embedding(st, td.ptr, yd.ptr, t.len(), dim, flip, shift),
            )?;
            let got = yd.download(st)?;
            self.row(
                "timestep embedding".into(),
                format!("{} x {dim}, flip {flip}, shift {shift}", t.len()),
                &got,
                &want,
                ms,
            );
        }

        // A length that is, and one that is not, a multiple of four: the float4 and scalar paths.
        for len in [1001, 1024] {
            let a = self.rand(len, -1.0, 1.0);
            let b = self.rand(len, -1.0, 1.0);
            for accumulate in [false, true] {
                let want: Vec<f32> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| if accumulate { x + y } else { *y })
                    .collect();
                let mut ad = self.up(&a)?;
                let bd = self.up(&b)?;
                let p = ad.ptr;
                let ms = self.timed(
                    || ad.write(st, &a),
                    || k.add_into(st, p, bd.ptr, len, accumulate),
                )?;
                let got = ad.download(st)?;
                self.row(
                    format!("add into{}", acc_name(accumulate)),
                    format!("{len}"),
                    &got,
                    &want,
                    ms,
                );
            }
        }
        let len = 1001;
        let a = self.rand(len, -1.0, 1.0);
        let want: Vec<f32> = a.iter().map(|x| x / 1.7).collect();
        let mut ad = self.up(&a)?;
        let p = ad.ptr;
        let ms = self.timed(|| ad.write(st, &a), || k.divide(st, p, len, 1.7))?;
        let got = ad.download(st)?;
        self.row("divide".into(), format!("{len}"), &got, &want, ms);
        Ok(())
    }
}
