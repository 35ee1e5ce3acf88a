//! The folded upsampling ([`ConvShape::upsampled_forward`], `INVDIFF_UPSAMPLE_FOLD`): the four
//! class launches against the CPU's nearest upsampling followed by its 3x3 convolution, and the
//! two input-gradient launches against the CPU's input gradient followed by the upsampling's
//! adjoint, in every precision, on the launches the program would plan (in bf16/fp16 from a
//! 16-bit copy of the input, on wgmma where the device has it, else the deep mma.sync
//! pipeline; the input gradient from the fp32 gradient and from a 16-bit copy). Where they
//! run on wgmma, the first launch each way also takes every other form a launch can take
//! (tiles, epilogues), held to the planned one.

use super::conv_variants::{wgmma_forms, wgmma_path};
use super::{path, tensor_core_tolerance, Tester};
use crate::cpu::conv::{self, ConvParams, Geometry};
use crate::cpu::resample::{upsample2x, upsample2x_backward};
use crate::cuda::kernels::{plan_launch, ConvLaunch, ConvPtrs, ConvShape};
use crate::cuda::precision::Precision;
use crate::cuda::weights::{DevBuf, DevConv};
use crate::model::graph::Pad;
use crate::Result;

/// A check: `n` inputs of `h x w`, `cin -> cout` channels, with temb, residual and a divisor
/// (`extras`), in each of `precisions`.
struct FoldCase {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    extras: bool,
    precisions: &'static [Precision],
}

/// The folded launches of one direction and the weights they read.
struct Launches<'a> {
    shapes: &'a [ConvShape],
    folded: &'a DevConv,
    backward: bool,
}

impl Tester<'_> {
    pub(super) fn folded_upsamplings(&mut self) -> Result<()> {
        use Precision::*;
        const EVERY: &[Precision] = &[Fp32, Tf32, Bf16, Fp16];
        let case = |n, h, w, cin, cout, extras, precisions: &'static [Precision]| FoldCase {
            n,
            h,
            w,
            cin,
            cout,
            extras,
            precisions,
        };
        // Odd low-resolution sizes (every border of every class), a partial column tile of the
        // tensor-core kernels, an epilogue with everything; the celebahq 64x64 -> 128x128
        // level; and, below bf16 (the program folds these only where the tensor cores take
        // them), 8 channels on the direct kernels and 12 on the scalar GEMM.
        for c in [
            case(2, 7, 9, 32, 72, true, EVERY),
            case(1, 64, 64, 256, 256, false, EVERY),
            case(1, 9, 11, 8, 8, true, &[Fp32, Tf32]),
            case(2, 5, 7, 12, 12, false, &[Fp32, Tf32]),
        ] {
            for &precision in c.precisions {
                self.folded_upsampling(&c, precision)?;
            }
        }
        Ok(())
    }

    fn folded_upsampling(&mut self, c: &FoldCase, precision: Precision) -> Result<()> {
        let &FoldCase {
            n,
            h,
            w,
            cin,
            cout,
            extras,
            ..
        } = c;
        let gpu = self.gpu;
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
                "wgmma".to_string()
            } else {
                path(plans[0].kernel, 1)
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
            self.half_copy(xd.ptr, x.len(), precision)?
        } else {
            xd
        };
        let td = temb.as_deref().map(|t| self.up(t)).transpose()?;
        let rd = res.as_deref().map(|r| self.up(r)).transpose()?;
        let base = ConvPtrs {
            x: input.ptr,
            bias: folded.bias.ptr,
            temb: td.as_ref().map_or(0, |d| d.ptr),
            res: rd.as_ref().map_or(0, |d| d.ptr),
            ..ConvPtrs::default()
        };
        let shapes = ConvShape::upsampled_forward(n, h, w, cin, cout);
        let plans: Vec<ConvLaunch> = shapes
            .iter()
            .map(|s| self.planned(s, precision, half))
            .collect();
        let run = Launches {
            shapes: &shapes,
            folded,
            backward: false,
        };
        let (got, ms) = self.run_launches(&run, &plans, base, out_div, want.len())?;
        let tolerance = tensor_core_tolerance(precision);
        let what = "forward, 4 classes";
        self.row_within(
            label(what, &plans),
            desc.clone(),
            &got,
            &want,
            ms,
            tolerance,
        );
        // Every class: their taps sit differently about the pixel, so each has its own
        // im2col box for the TMA loads (the classes (0, 1) and (1, 0) tell width from height).
        let what = |class| format!("forward, class {class}");
        self.classes_in_other_forms(&run, &plans, base, out_div, want.len(), what, &desc)?;

        // Input gradient: two launches into the low-resolution gradient, the second adding
        // onto the first; from the fp32 gradient, then (bf16/fp16) from a 16-bit copy.
        let dyd = self.up(&dy)?;
        let dy16 = half
            .then(|| self.half_copy(dyd.ptr, dy.len(), precision))
            .transpose()?;
        let shapes = ConvShape::upsampled_backward(n, h, w, cin, cout);
        let run = Launches {
            shapes: &shapes,
            folded,
            backward: true,
        };
        let inputs = std::iter::once((&dyd, false)).chain(dy16.as_ref().map(|d| (d, true)));
        for (input, half_input) in inputs {
            let plans: Vec<ConvLaunch> = shapes
                .iter()
                .map(|s| self.planned(s, precision, half_input))
                .collect();
            let base = ConvPtrs {
                x: input.ptr,
                ..ConvPtrs::default()
            };
            let (got, ms) = self.run_launches(&run, &plans, base, 1.0, x.len())?;
            let from = if half_input { "16-bit dy" } else { "fp32 dy" };
            let what = format!("input gradient, 2 launches, {from}");
            self.row_within(
                label(&what, &plans),
                desc.clone(),
                &got,
                &want_dx,
                ms,
                tolerance,
            );
            // Each launch alone, fresh (its taps sit differently about the pixel: row class 1's
            // window starts a row above it), in every other form.
            let what = |class| format!("{what}, row class {class} alone");
            self.classes_in_other_forms(&run, &plans, base, 1.0, x.len(), what, &desc)?;
        }
        Ok(())
    }

    /// Runs `plans` of `run`'s launches into a fresh output of `len` values (the input
    /// gradient's second launch adding onto the first): the output and the launches' time.
    fn run_launches(
        &self,
        run: &Launches,
        plans: &[ConvLaunch],
        base: ConvPtrs,
        out_div: f32,
        len: usize,
    ) -> Result<(Vec<f32>, f64)> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let y = self.zeros(len)?;
        let spaces: Vec<DevBuf> = run
            .shapes
            .iter()
            .zip(plans)
            .map(|(s, p)| self.zeros(p.workspace_len(s)))
            .collect::<Result<_>>()?;
        let ms = self.timed(
            || Ok(()),
            || {
                for (j, ((s, p), ws)) in run.shapes.iter().zip(plans).zip(&spaces).enumerate() {
                    // wgmma reads the other layout (K-major).
                    let ptrs = ConvPtrs {
                        w: run.folded.weights_for(p.kernel, p.wgmma != run.backward)?,
                        y: y.ptr,
                        ws: ws.ptr,
                        ..base
                    };
                    gpu.kernels
                        .conv(st, s, p, ptrs, out_div, run.backward && j > 0)?;
                }
                Ok(())
            },
        )?;
        Ok((y.download(st)?, ms))
    }

    /// Each launch of `run` (a parity class, `what(class)` in the rows) whose plan is wgmma,
    /// alone in every other form ([`Self::other_forms`]), with the weights its direction reads.
    #[allow(clippy::too_many_arguments)]
    fn classes_in_other_forms(
        &mut self,
        run: &Launches,
        plans: &[ConvLaunch],
        base: ConvPtrs,
        out_div: f32,
        len: usize,
        what: impl Fn(usize) -> String,
        desc: &str,
    ) -> Result<()> {
        for (class, (s, &p)) in run.shapes.iter().zip(plans).enumerate() {
            if p.wgmma {
                let ptrs = ConvPtrs {
                    w: run.folded.weights_for(p.kernel, !run.backward)?,
                    ..base
                };
                self.other_forms(s, p, ptrs, out_div, len, &what(class), desc)?;
            }
        }
        Ok(())
    }

    /// The other wgmma forms of launch `p` of `shape` (tiles, epilogues, loaders) against `p`
    /// itself, alone in a fresh output: the same sums, as `conv_variants` holds them for the
    /// unfolded shapes.
    #[allow(clippy::too_many_arguments)]
    fn other_forms(
        &mut self,
        shape: &ConvShape,
        p: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        len: usize,
        what: &str,
        desc: &str,
    ) -> Result<()> {
        let ws = self.zeros(p.workspace_len(shape))?;
        let ptrs = ConvPtrs { ws: ws.ptr, ..ptrs };
        let (want, _) = self.conv_output(shape, &p, ptrs, out_div, len)?;
        let label = format!("conv3x3 after upsampling, folded {what}");
        for v in wgmma_forms(p, shape) {
            let ws = self.zeros(v.workspace_len(shape))?;
            let vp = ConvPtrs { ws: ws.ptr, ..ptrs };
            let (got, ms) = self.conv_output(shape, &v, vp, out_div, len)?;
            self.row_within(
                format!("{label} [{}] vs plain wgmma", wgmma_path(&v)),
                desc.to_string(),
                &got,
                &want,
                ms,
                0.0,
            );
        }
        Ok(())
    }

    /// The launch a program plans for `s`: wgmma on a 16-bit input where the device has it.
    fn planned(&self, s: &ConvShape, precision: Precision, half_input: bool) -> ConvLaunch {
        let wgmma = self.gpu.kernels.has_wgmma();
        plan_launch(s, self.gpu.sms(), precision, half_input, wgmma, true)
    }
}
