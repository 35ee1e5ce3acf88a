//! The folded upsampling ([`ConvShape::upsampled_forward`], `INVDIFF_UPSAMPLE_FOLD`): the four
//! class launches against the CPU's nearest upsampling followed by its 3x3 convolution, and the
//! two input-gradient launches against the CPU's input gradient followed by the upsampling's
//! adjoint, in every precision, on the launches the program would plan (in bf16/fp16 from a
//! 16-bit copy of the input, on wgmma where the device has it, else the deep mma.sync
//! pipeline; the input gradient from the fp32 gradient and from a 16-bit copy).

use super::{tensor_core_tolerance, Tester};
use crate::cpu::conv::{self, ConvParams, Geometry};
use crate::cpu::resample::{upsample2x, upsample2x_backward};
use crate::cuda::kernels::{plan_conv_at, plan_wgmma, ConvKernel, ConvLaunch, ConvPtrs, ConvShape};
use crate::cuda::precision::Precision;
use crate::cuda::weights::{DevBuf, DevConv};
use crate::model::graph::Pad;
use crate::Result;

impl Tester<'_> {
    pub(super) fn folded_upsamplings(&mut self) -> Result<()> {
        // Odd low-resolution sizes (every border of every class), a partial column tile, an
        // epilogue with everything; then the celebahq 64x64 -> 128x128 level.
        for (n, h, w, cin, cout, extras) in [(2, 7, 9, 32, 72, true), (1, 64, 64, 256, 256, false)]
        {
            for precision in [
                Precision::Fp32,
                Precision::Tf32,
                Precision::Bf16,
                Precision::Fp16,
            ] {
                self.folded_upsampling(n, h, w, cin, cout, extras, precision)?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn folded_upsampling(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        extras: bool,
        precision: Precision,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (uh, uw) = (2 * h, 2 * w);
        let bound = 1.0 / ((cin * 9) as f32).sqrt();
        let x = self.rand(n * h * w * cin, -1.0, 1.0);
        let wt = self.rand(cout * cin * 9, -bound, bound);
        let b = self.rand(cout, -1.0, 1.0);
        let temb = extras.then(|| self.rand(n * cout, -1.0, 1.0));
        let res = extras.then(|| self.rand(n * uh * uw * cout, -1.0, 1.0));
        let out_div = if extras { 2.0 } else { 1.0 };
        let dy = self.rand(n * uh * uw * cout, -1.0, 1.0);

        // The CPU: upsample, convolve; the gradient back through both.
        let geo = Geometry {
            n,
            h: uh,
            w: uw,
            stride: 1,
            pad: Pad::Symmetric,
        };
        let cpu = ConvParams::new(&wt, &b, cout, cin, 3);
        let mut up = vec![0.0; 4 * x.len()];
        upsample2x(&x, h, w, cin, &mut up);
        let mut want = vec![0.0; dy.len()];
        conv::forward(
            &cpu,
            &up,
            geo,
            temb.as_deref(),
            res.as_deref(),
            out_div,
            &mut want,
        );
        let mut dup = vec![0.0; up.len()];
        conv::backward_input(&cpu, &dy, geo, &mut dup, false);
        let mut want_dx = vec![0.0; x.len()];
        upsample2x_backward(&dup, n, h, w, cin, &mut want_dx, false);

        let mut dev = DevConv::upload(gpu, &wt, &b, cout, cin, 3, precision)?;
        let folded = dev.ensure_folded(gpu)?;
        folded.ensure_backward(gpu)?;
        let desc = format!("n{n} {h}x{w} -> {uh}x{uw} {cin}->{cout}");
        let label = |what: &str, plans: &[ConvLaunch]| {
            let kernel = if plans.iter().all(|p| p.wgmma) {
                "wgmma"
            } else {
                "mma.sync"
            };
            let split = plans.iter().map(|p| p.splits).max().unwrap_or(1);
            format!(
                "{precision} conv3x3 after upsampling, folded {what} [{kernel}, splits <= {split}]"
            )
        };

        // Forward: four class launches, each writing its pixels.
        let half = precision.is_half();
        let xd = self.up(&x)?;
        let input = if half {
            self.half_copy_of(&xd, x.len(), precision)?
        } else {
            xd
        };
        let td = temb.as_deref().map(|t| self.up(t)).transpose()?;
        let rd = res.as_deref().map(|r| self.up(r)).transpose()?;
        let y = self.zeros(want.len())?;
        let shapes = ConvShape::upsampled_forward(n, h, w, cin, cout);
        let plans: Vec<ConvLaunch> = shapes
            .iter()
            .map(|s| self.planned(s, precision, half))
            .collect();
        let spaces = self.workspaces(&shapes, &plans)?;
        let ms = self.timed(
            || Ok(()),
            || {
                for ((s, p), ws) in shapes.iter().zip(&plans).zip(&spaces) {
                    let ptrs = ConvPtrs {
                        x: input.ptr,
                        w: folded.weights_for(p.kernel, p.wgmma)?,
                        y: y.ptr,
                        bias: folded.bias.ptr,
                        temb: td.as_ref().map_or(0, |d| d.ptr),
                        res: rd.as_ref().map_or(0, |d| d.ptr),
                        ws: ws.ptr,
                        ..ConvPtrs::default()
                    };
                    gpu.kernels.conv(st, s, p, ptrs, out_div, false)?;
                }
                Ok(())
            },
        )?;
        let got = y.download(st)?;
        let tolerance = tensor_core_tolerance(precision);
        self.row_within(
            label("forward, 4 classes", &plans),
            desc.clone(),
            &got,
            &want,
            ms,
            tolerance,
        );

        // Input gradient: two launches into the low-resolution gradient, the second adding
        // onto the first; from the fp32 gradient, then (bf16/fp16) from a 16-bit copy.
        let dyd = self.up(&dy)?;
        let dy16 = half
            .then(|| self.half_copy_of(&dyd, dy.len(), precision))
            .transpose()?;
        let shapes = ConvShape::upsampled_backward(n, h, w, cin, cout);
        let inputs = std::iter::once((&dyd, false)).chain(dy16.as_ref().map(|d| (d, true)));
        for (input, half_input) in inputs {
            let plans: Vec<ConvLaunch> = shapes
                .iter()
                .map(|s| self.planned(s, precision, half_input))
                .collect();
            let spaces = self.workspaces(&shapes, &plans)?;
            let dx = self.zeros(x.len())?;
            let ms = self.timed(
                || Ok(()),
                || {
                    for (j, ((s, p), ws)) in shapes.iter().zip(&plans).zip(&spaces).enumerate() {
                        let ptrs = ConvPtrs {
                            x: input.ptr,
                            w: folded.weights_for(p.kernel, !p.wgmma)?,
                            y: dx.ptr,
                            ws: ws.ptr,
                            ..ConvPtrs::default()
                        };
                        gpu.kernels.conv(st, s, p, ptrs, 1.0, j > 0)?;
                    }
                    Ok(())
                },
            )?;
            let got = dx.download(st)?;
            let from = if half_input { "16-bit dy" } else { "fp32 dy" };
            self.row_within(
                label(&format!("input gradient, 2 launches, {from}"), &plans),
                desc.clone(),
                &got,
                &want_dx,
                ms,
                tolerance,
            );
        }
        Ok(())
    }

    /// The launch a program plans for `s` (`Lowering::conv_step`'s defaults): wgmma on a
    /// 16-bit input where the device has it, else the kernel for the precision, the tensor
    /// cores' on the deep pipeline.
    fn planned(&self, s: &ConvShape, precision: Precision, half_input: bool) -> ConvLaunch {
        let sms = self.gpu.sms();
        let wgmma =
            plan_wgmma(s, sms, precision).filter(|_| half_input && self.gpu.kernels.has_wgmma());
        wgmma.unwrap_or_else(|| {
            let plan = plan_conv_at(s, sms, precision);
            ConvLaunch {
                deep: matches!(plan.kernel, ConvKernel::Tensor(_)),
                half_input,
                ..plan
            }
        })
    }

    /// A split-K workspace per launch (an empty one where it needs none).
    fn workspaces(&self, shapes: &[ConvShape], plans: &[ConvLaunch]) -> Result<Vec<DevBuf>> {
        shapes
            .iter()
            .zip(plans)
            .map(|(s, p)| self.zeros(p.workspace_len(s)))
            .collect()
    }

    /// The `len` values of `src` rounded to 16 bits (two per f32 slot), in a new buffer.
    fn half_copy_of(&self, src: &DevBuf, len: usize, precision: Precision) -> Result<DevBuf> {
        let copy = self.zeros(len.div_ceil(2))?;
        self.gpu
            .kernels
            .convert_half(&self.gpu.stream, src.ptr, copy.ptr, len, precision)?;
        Ok(copy)
    }
}
