//! Convolutions: every kernel family against the CPU's convolution, forward and input
//! gradient, at awkward shapes and at the network's own, in each precision.

use super::conv_variants::{wgmma_forms, wgmma_path, WGMMA_VS_MMA};
use super::{acc_name, path, tensor_core_tolerance, Tester, TENSOR_CORE};
use crate::cpu::conv::{self, ConvParams, Geometry};
use crate::cuda::kernels::{
    im2col_box, on_tile, plan_conv, plan_conv_at, plan_wgmma, ConvKernel, ConvLaunch, ConvPtrs,
    ConvShape, DPtr,
};
use crate::cuda::precision::Precision;
use crate::cuda::weights::DevConv;
use crate::model::graph::Pad;
use crate::Result;

/// The inputs and CPU results of one convolution check.
struct ConvData<'a> {
    x: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    temb: Option<&'a [f32]>,
    res: Option<&'a [f32]>,
    want: &'a [f32],
    dy: &'a [f32],
    dx0: &'a [f32],
    want_dx: &'a [f32],
}

/// A convolution check.
struct ConvCase {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: Pad,
    temb: bool,
    res: bool,
    out_div: f32,
    accumulate: bool,
}

#[allow(clippy::too_many_arguments)]
fn cc(
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: Pad,
) -> ConvCase {
    ConvCase {
        n,
        h,
        w,
        cin,
        cout,
        k,
        stride,
        pad,
        temb: false,
        res: false,
        out_div: 1.0,
        accumulate: false,
    }
}

/// The deep pipeline a launch takes and its input, for row names.
fn deep_path(p: &ConvLaunch) -> String {
    let pipe = match (p.kernel, p.half_input) {
        (ConvKernel::Tensor(Precision::Tf32), _) => "async",
        (_, true) => "async, 16-bit input",
        _ => "staged",
    };
    let rows = if p.row_epilogue { ", row epilogue" } else { "" };
    format!("{}, {pipe}{rows}", path(p.kernel, p.splits))
}
fn pad_name(k: usize, stride: usize, pad: Pad) -> &'static str {
    match (k, stride, pad) {
        (3, 2, Pad::Symmetric) => " pad 1",
        (3, 2, Pad::RightBottom) => " pad right/bottom",
        _ => "",
    }
}

impl Tester<'_> {
    /// Runs `run` once to warm up, resets its output with `reset`, then times one run.
    /// Launch `plan` of `shape` with `ptrs` into a fresh zeroed output of `len` values, not
    /// accumulating: the output and the launch's time.
    pub(super) fn conv_output(
        &self,
        shape: &ConvShape,
        plan: &ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        len: usize,
    ) -> Result<(Vec<f32>, f64)> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let y = self.zeros(len)?;
        let p = ConvPtrs { y: y.ptr, ..ptrs };
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv(st, shape, plan, p, out_div, false),
        )?;
        Ok((y.download(st)?, ms))
    }

    pub(super) fn convolutions(&mut self) -> Result<()> {
        use Pad::*;
        let cases = vec![
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                ..cc(1, 7, 5, 16, 24, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(3, 9, 6, 3, 20, 3, 1, Symmetric)
            },
            cc(2, 10, 6, 32, 12, 3, 2, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 10, 6, 32, 12, 3, 2, RightBottom)
            },
            cc(1, 6, 14, 20, 36, 3, 2, RightBottom),
            ConvCase {
                res: true,
                accumulate: true,
                ..cc(3, 5, 7, 24, 40, 1, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(1, 9, 7, 40, 3, 3, 1, Symmetric)
            },
            ConvCase {
                temb: true,
                ..cc(1, 64, 48, 128, 128, 3, 1, Symmetric)
            },
            cc(1, 8, 8, 256, 256, 3, 1, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 32, 32, 64, 64, 3, 2, Symmetric)
            },
            // Full size: celebahq's first level (19.3 GFLOP), for a realistic time.
            ConvCase {
                temb: true,
                ..cc(1, 256, 256, 128, 128, 3, 1, Symmetric)
            },
            // The 3-channel image convolutions at celebahq's size, on the direct kernels:
            // conv_out 128->3 (forward narrow, input gradient few-in) and conv_in 3->128
            // (forward few-in, input gradient narrow), with the network's epilogues (a bias
            // forward, a fresh input gradient) at batch 1, accumulating at batch 2.
            cc(1, 256, 256, 128, 3, 3, 1, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 256, 256, 128, 3, 3, 1, Symmetric)
            },
            cc(1, 256, 256, 3, 128, 3, 1, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 256, 256, 3, 128, 3, 1, Symmetric)
            },
            // The direct kernels at odd sizes: partial tiles and runs, channel counts not
            // multiples of 4 (4-byte copies, partial column quads, scalar stores), every
            // epilogue term; the parity classes of a stride-2 gradient (taps filling part of
            // the window, output stride 2); 1x1.
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                accumulate: true,
                ..cc(2, 24, 20, 13, 5, 3, 1, Symmetric)
            },
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                accumulate: true,
                ..cc(3, 24, 20, 5, 13, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(1, 12, 10, 6, 16, 3, 2, RightBottom)
            },
            ConvCase {
                res: true,
                ..cc(2, 7, 9, 12, 3, 1, 1, Symmetric)
            },
        ];
        for c in cases {
            self.conv_case(c, &[Precision::Fp32])?;
        }
        self.direct_batch_invariance()
    }

    /// The direct kernels compute an image's outputs from that image alone: the first image's
    /// result in a batch of 2 equals, bit for bit, its result alone (forward and input
    /// gradient of 128->3 and 3->128).
    fn direct_batch_invariance(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (h, w) = (40, 72);
        for (cin, cout) in [(128, 3), (3, 128)] {
            let bound = 1.0 / ((cin * 9) as f32).sqrt();
            let wt = self.rand(cout * cin * 9, -bound, bound);
            let b = self.rand(cout, -1.0, 1.0);
            let mut dev = DevConv::upload(gpu, &wt, &b, cout, cin, 3, Precision::Fp32)?;
            dev.ensure_backward(gpu)?;
            for backward in [false, true] {
                let (src_c, out_c) = if backward { (cout, cin) } else { (cin, cout) };
                let src = self.rand(2 * h * w * src_c, -1.0, 1.0);
                let xd = self.up(&src)?;
                let mut outs = Vec::new();
                let mut paths = Vec::new();
                let mut ms = 0.0;
                for n in [2, 1] {
                    let shape = if backward {
                        ConvShape::backward(n, h, w, cin, cout, 3, 1, Pad::Symmetric).remove(0)
                    } else {
                        ConvShape::forward(n, h, w, cin, cout, 3, 1, Pad::Symmetric)
                    };
                    let plan = plan_conv(&shape, gpu.sms());
                    let yd = self.zeros(n * h * w * out_c)?;
                    let ptrs = ConvPtrs {
                        x: xd.ptr,
                        w: dev.weights_for(plan.kernel, backward)?,
                        y: yd.ptr,
                        bias: if backward { 0 } else { dev.bias.ptr },
                        ..ConvPtrs::default()
                    };
                    ms = self.timed(
                        || Ok(()),
                        || gpu.kernels.conv(st, &shape, &plan, ptrs, 1.0, false),
                    )?;
                    outs.push(yd.download(st)?);
                    paths.push(path(plan.kernel, plan.splits));
                }
                let alone = &outs[1];
                self.row_within(
                    format!(
                        "conv3x3 s1 {} [{}] image 1 of 2 vs alone",
                        if backward { "input-grad" } else { "forward" },
                        paths.join(" vs ")
                    ),
                    format!("{h}x{w} {cin}->{cout}"),
                    &outs[0][..alone.len()],
                    alone,
                    ms,
                    0.0,
                );
            }
        }
        Ok(())
    }

    /// Every tensor-core precision at celebahq's shapes (the largest and the smallest level,
    /// split-K, both stride-2 paddings, 1x1) and at odd sizes, epilogue and accumulation
    /// included; channels not multiples of 8 take the fp32 path (the row's path says so).
    pub(super) fn tensor_core_convolutions(&mut self) -> Result<()> {
        use Pad::*;
        let cases = vec![
            // Unsplit on every tile, so its lean and TMA forms also run with the epilogue's
            // reads prefetched, which the residual and the accumulation give something to read.
            ConvCase {
                temb: true,
                res: true,
                accumulate: true,
                ..cc(1, 256, 256, 128, 128, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(1, 8, 8, 512, 512, 3, 1, Symmetric)
            },
            // Rows of 64, a partial column tile both ways.
            ConvCase {
                temb: true,
                res: true,
                accumulate: true,
                ..cc(2, 64, 64, 96, 160, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(2, 32, 32, 64, 64, 3, 2, Symmetric)
            },
            cc(2, 10, 6, 32, 16, 3, 2, RightBottom),
            ConvCase {
                res: true,
                accumulate: true,
                ..cc(3, 5, 7, 24, 40, 1, 1, Symmetric)
            },
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                ..cc(1, 7, 5, 16, 24, 3, 1, Symmetric)
            },
            cc(3, 9, 6, 3, 20, 3, 1, Symmetric),
            // 72 outputs (40 back, in the input gradient): the columns end inside a warp's 32
            // (mma.sync) and inside the 128 of a wgmma tile; 99 rows, K not a whole number of
            // slices.
            ConvCase {
                res: true,
                ..cc(1, 9, 11, 40, 72, 3, 1, Symmetric)
            },
            // For the TMA loads (whole-tap slices): 351 rows whose tiles straddle images and
            // end inside the batch, 192 columns (a partial column tile), every epilogue term.
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                accumulate: true,
                ..cc(3, 9, 13, 64, 192, 3, 1, Symmetric)
            },
            // The stride-2 input gradient's parity classes on TMA (192 -> 128 at input stride 1);
            // with this padding two of them have taps on one side in one direction only, whose
            // im2col boxes tell width from height.
            ConvCase {
                accumulate: true,
                ..cc(2, 12, 20, 128, 192, 3, 2, RightBottom)
            },
            // A downsampling's forward (stride 2, padding 1 all round) whose tiles straddle
            // images: on TMA with INVDIFF_TMA_STRIDED=1, through a map that walks two pixels.
            cc(2, 16, 22, 128, 128, 3, 2, Symmetric),
        ];
        for c in cases {
            self.conv_case(c, &TENSOR_CORE)?;
        }
        Ok(())
    }

    /// Checks one convolution, forward and input gradient, at each of `precisions` against
    /// the same CPU results.
    fn conv_case(&mut self, c: ConvCase, precisions: &[Precision]) -> Result<()> {
        let ConvCase {
            n,
            h,
            w,
            cin,
            cout,
            k,
            stride,
            pad,
            out_div,
            accumulate,
            ..
        } = c;
        let geo = Geometry {
            n,
            h,
            w,
            stride,
            pad,
        };
        let (oh, ow) = (h / stride, w / stride);
        let bound = 1.0 / ((cin * k * k) as f32).sqrt();
        let x = self.rand(n * h * w * cin, -1.0, 1.0);
        let wt = self.rand(cout * cin * k * k, -bound, bound);
        let b = self.rand(cout, -1.0, 1.0);
        let temb = if c.temb {
            Some(self.rand(n * cout, -1.0, 1.0))
        } else {
            None
        };
        let res = if c.res {
            Some(self.rand(n * oh * ow * cout, -1.0, 1.0))
        } else {
            None
        };
        let cpu = ConvParams::new(&wt, &b, cout, cin, k);
        let mut want = vec![0.0; n * oh * ow * cout];
        conv::forward(
            &cpu,
            &x,
            geo,
            temb.as_deref(),
            res.as_deref(),
            out_div,
            &mut want,
        );
        let dy = self.rand(want.len(), -1.0, 1.0);
        let dx0 = self.grad_start(x.len(), accumulate);
        let mut want_dx = dx0.clone();
        conv::backward_input(&cpu, &dy, geo, &mut want_dx, accumulate);
        for &precision in precisions {
            self.conv_on_gpu(
                &c,
                precision,
                ConvData {
                    x: &x,
                    w: &wt,
                    b: &b,
                    temb: temb.as_deref(),
                    res: res.as_deref(),
                    want: &want,
                    dy: &dy,
                    dx0: &dx0,
                    want_dx: &want_dx,
                },
            )?;
        }
        Ok(())
    }

    /// The GPU half of [`conv_case`](Self::conv_case) at one precision.
    fn conv_on_gpu(&mut self, c: &ConvCase, precision: Precision, d: ConvData) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let &ConvCase {
            n,
            h,
            w,
            cin,
            cout,
            k,
            stride,
            pad,
            out_div,
            accumulate,
            ..
        } = c;
        let ConvData {
            x,
            w: wt,
            b,
            temb,
            res,
            want,
            dy,
            dx0,
            want_dx,
        } = d;
        let tolerance = tensor_core_tolerance(precision);
        let named = |op: String| {
            if precision == Precision::Fp32 {
                op
            } else {
                format!("{precision} {op}")
            }
        };
        let mut dev = DevConv::upload(gpu, wt, b, cout, cin, k, precision)?;
        let xd = self.up(x)?;
        let td = temb.map(|t| self.up(t)).transpose()?;
        let rd = res.map(|r| self.up(r)).transpose()?;
        let yd = self.zeros(want.len())?;
        let shape = ConvShape::forward(n, h, w, cin, cout, k, stride, pad);
        let plan = plan_conv_at(&shape, gpu.sms(), precision);
        let ws = self.zeros(plan.workspace_len(&shape))?;
        let ptrs = ConvPtrs {
            x: xd.ptr,
            w: dev.weights_for(plan.kernel, false)?,
            y: yd.ptr,
            bias: dev.bias.ptr,
            temb: td.as_ref().map_or(0, |d| d.ptr),
            res: rd.as_ref().map_or(0, |d| d.ptr),
            ws: ws.ptr,
            ..ConvPtrs::default()
        };
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv(st, &shape, &plan, ptrs, out_div, false),
        )?;
        let got = yd.download(st)?;
        let desc = format!("n{n} {h}x{w} {cin}->{cout}{}", pad_name(k, stride, pad));
        let epi = [(c.temb, "+temb"), (c.res, "+res"), (out_div != 1.0, "/div")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, s)| *s)
            .collect::<String>();
        self.row_within(
            named(format!(
                "conv{k}x{k} s{stride} forward{epi} [{}]",
                path(plan.kernel, plan.splits)
            )),
            desc.clone(),
            &got,
            want,
            ms,
            tolerance,
        );
        // The deep pipelines, from fp32 and (bf16/fp16) from the input already rounded to 16
        // bits in memory, as a GroupNorm before a convolution writes it: the same schedule of
        // roundings and sums, so the same result as the two-stage kernel's.
        for (deep, copy) in self.deep_variants(plan, xd.ptr, x.len())? {
            let xin = copy.as_ref().map_or(xd.ptr, |c| c.ptr);
            let p = ConvPtrs { x: xin, ..ptrs };
            let (out, ms) = self.conv_output(&shape, &deep, p, out_div, want.len())?;
            self.row_within(
                named(format!(
                    "conv{k}x{k} s{stride} forward{epi} [{}] vs two-stage",
                    deep_path(&deep)
                )),
                desc.clone(),
                &out,
                &got,
                ms,
                0.0,
            );
        }
        // Hopper's wgmma kernel, on the 16-bit input and the K-major weights (the
        // input-gradient layout): the same products as mma.sync, summed in another order.
        dev.ensure_backward(gpu)?;
        if let Some((wp, copy)) = self.wgmma_variant(&shape, precision, xd.ptr, x.len())? {
            let ws = self.zeros(wp.workspace_len(&shape))?;
            let ptrs = ConvPtrs {
                x: copy.ptr,
                w: dev.weights_for(wp.kernel, true)?,
                ws: ws.ptr,
                ..ptrs
            };
            let (wg_out, ms) = self.conv_output(&shape, &wp, ptrs, out_div, want.len())?;
            self.row_within(
                named(format!(
                    "conv{k}x{k} s{stride} forward{epi} [{}] vs mma.sync",
                    wgmma_path(&wp)
                )),
                desc.clone(),
                &wg_out,
                &got,
                ms,
                WGMMA_VS_MMA,
            );
            let label = named(format!("conv{k}x{k} s{stride} forward{epi}"));
            // The row epilogue, the lean loaders and the tall tile: the same products summed in
            // the same order and the same epilogue arithmetic, so the same bits.
            for v in std::iter::once(wp).chain(wgmma_forms(wp, &shape)) {
                if v != wp {
                    let (out, ms) = self.conv_output(&shape, &v, ptrs, out_div, want.len())?;
                    self.row_within(
                        format!("{label} [{}] vs plain wgmma", wgmma_path(&v)),
                        desc.clone(),
                        &out,
                        &wg_out,
                        ms,
                        0.0,
                    );
                }
                if out_div == 1.0 {
                    self.probe_row(&shape, v, ptrs, &wg_out, &label, &desc)?;
                }
                self.gn_partial_row(&shape, v, ptrs, out_div, &wg_out, &label, &desc)?;
            }
        }
        let dyd = self.up(dy)?;
        let mut dxd = self.up(dx0)?;
        let dx_ptr = dxd.ptr;
        let shapes = ConvShape::backward(n, h, w, cin, cout, k, stride, pad);
        let plans: Vec<_> = shapes
            .iter()
            .map(|s| plan_conv_at(s, gpu.sms(), precision))
            .collect();
        let ws_len = shapes
            .iter()
            .zip(&plans)
            .map(|(s, p)| p.workspace_len(s))
            .max()
            .unwrap_or(0);
        let ws = self.zeros(ws_len)?;
        let input_grad = |plans: &[ConvLaunch], dy: DPtr| -> Result<()> {
            for (s, p) in shapes.iter().zip(plans) {
                let ptrs = ConvPtrs {
                    x: dy,
                    w: dev.weights_for(p.kernel, true)?,
                    y: dx_ptr,
                    ws: ws.ptr,
                    ..ConvPtrs::default()
                };
                gpu.kernels.conv(st, s, p, ptrs, 1.0, accumulate)?;
            }
            Ok(())
        };
        let ms = self.timed(|| dxd.write(st, dx0), || input_grad(&plans, dyd.ptr))?;
        let got = dxd.download(st)?;
        let paths: Vec<String> = plans.iter().map(|p| path(p.kernel, p.splits)).collect();
        self.row_within(
            named(format!(
                "conv{k}x{k} s{stride} input-grad{} [{}]",
                acc_name(accumulate),
                paths.join(", ")
            )),
            desc.clone(),
            &got,
            want_dx,
            ms,
            tolerance,
        );
        // Deep pipelines for the input gradient (the 16-bit dy: what a GroupNorm's backward
        // writes for the first convolution of a residual block), against the two-stage result.
        // The parity classes of a stride-2 gradient share their channels, hence their kernel.
        debug_assert!(plans
            .iter()
            .all(|p| Some(p.kernel) == plans.first().map(|f| f.kernel)));
        if let Some(&first) = plans.first() {
            for (deep, copy) in self.deep_variants(first, dyd.ptr, dy.len())? {
                let dyin = copy.as_ref().map_or(dyd.ptr, |c| c.ptr);
                let deep_plans: Vec<ConvLaunch> = plans
                    .iter()
                    .map(|p| ConvLaunch {
                        deep: deep.deep,
                        half_input: deep.half_input,
                        row_epilogue: deep.row_epilogue,
                        ..*p
                    })
                    .collect();
                let ms = self.timed(|| dxd.write(st, dx0), || input_grad(&deep_plans, dyin))?;
                self.row_within(
                    named(format!(
                        "conv{k}x{k} s{stride} input-grad{} [{}] vs two-stage",
                        acc_name(accumulate),
                        deep_path(&deep)
                    )),
                    desc.clone(),
                    &dxd.download(st)?,
                    &got,
                    ms,
                    0.0,
                );
            }
        }
        // wgmma for the input gradient: K-major weights are the forward layout.
        let wg_plans: Option<Vec<ConvLaunch>> = shapes
            .iter()
            .map(|s| plan_wgmma(s, gpu.sms(), precision))
            .collect();
        if let (Some(wg_plans), Some(first)) = (wg_plans, shapes.first()) {
            if let Some((_, copy)) = self.wgmma_variant(first, precision, dyd.ptr, dy.len())? {
                let ws_len = shapes
                    .iter()
                    .zip(&wg_plans)
                    .map(|(s, p)| p.workspace_len(s))
                    .max()
                    .unwrap_or(0);
                let ws = self.zeros(ws_len)?;
                let run = |plans: &[ConvLaunch]| -> Result<()> {
                    for (s, p) in shapes.iter().zip(plans) {
                        let ptrs = ConvPtrs {
                            x: copy.ptr,
                            w: dev.weights_for(p.kernel, false)?,
                            y: dx_ptr,
                            ws: ws.ptr,
                            ..ConvPtrs::default()
                        };
                        gpu.kernels.conv(st, s, p, ptrs, 1.0, accumulate)?;
                    }
                    Ok(())
                };
                let ms = self.timed(|| dxd.write(st, dx0), || run(&wg_plans))?;
                let paths: Vec<String> = wg_plans.iter().map(wgmma_path).collect();
                let wg_got = dxd.download(st)?;
                self.row_within(
                    named(format!(
                        "conv{k}x{k} s{stride} input-grad{} [{}] vs mma.sync",
                        acc_name(accumulate),
                        paths.join(", ")
                    )),
                    desc.clone(),
                    &wg_got,
                    &got,
                    ms,
                    WGMMA_VS_MMA,
                );
                // The row epilogue (accumulating too), the lean loaders, the TMA loads and the
                // tall tile: the same bits.
                for form in wgmma_forms(wg_plans[0], first) {
                    let v: Vec<ConvLaunch> = shapes
                        .iter()
                        .zip(&wg_plans)
                        .map(|(s, p)| ConvLaunch {
                            row_epilogue: form.row_epilogue,
                            lean_loads: form.lean_loads,
                            tma_loads: form.tma_loads && im2col_box(s).is_some(),
                            prefetch: form.prefetch && p.splits == 1,
                            ..on_tile(*p, form.tile).unwrap_or(*p)
                        })
                        .collect();
                    let ms = self.timed(|| dxd.write(st, dx0), || run(&v))?;
                    let paths: Vec<String> = v.iter().map(wgmma_path).collect();
                    self.row_within(
                        named(format!(
                            "conv{k}x{k} s{stride} input-grad{} [{}] vs plain wgmma",
                            acc_name(accumulate),
                            paths.join(", ")
                        )),
                        desc.clone(),
                        &dxd.download(st)?,
                        &wg_got,
                        ms,
                        0.0,
                    );
                }
            }
        }
        Ok(())
    }
}
