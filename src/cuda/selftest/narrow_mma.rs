//! The convolutions with few outputs on the tensor cores (`conv_narrow_mma_*`,
//! `INVDIFF_NARROW_MMA`): the kernel against the CPU's convolution over the same 16-bit
//! operands (so only the order of the sums differs) and against the fp32 one, forward and input
//! gradient, at celebahq's shapes and odd ones; then whole networks with it against the CPU.

use super::{acc_name, round_half, tensor_core_tolerance, Tester, TOLERANCE};
use crate::cpu::conv::{self, ConvParams, Geometry};
use crate::cuda::kernels::{ConvLaunch, ConvPtrs, ConvShape};
use crate::cuda::precision::Precision;
use crate::cuda::weights::DevConv;
use crate::model::graph::Pad;
use crate::Result;

/// One check: `n` images of `h x w`, a `k x k` convolution `cin -> cout` at `stride`, with its
/// epilogue terms; the kernel computes its forward where `cout` is narrow, its input gradient
/// where `cin` is.
struct NarrowCase {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    stride: usize,
    pad: Pad,
    /// Time embedding, residual and a divisor of 2 in the forward.
    extras: bool,
    accumulate: bool,
}

const fn case(n: usize, h: usize, w: usize, cin: usize, cout: usize, stride: usize) -> NarrowCase {
    NarrowCase {
        n,
        h,
        w,
        cin,
        cout,
        stride,
        pad: Pad::Symmetric,
        extras: false,
        accumulate: false,
    }
}

impl Tester<'_> {
    /// Celebahq's conv_out (128 -> 3, forward) and conv_in (3 -> 128, input gradient) at
    /// 256x256, then odd shapes: partial tiles both ways, 8 and 1 outputs, 32 and 256 source
    /// channels (the smallest and largest the kernel takes), every epilogue term and
    /// accumulation, and a stride-2 gradient's parity classes (taps filling part of the window,
    /// output stride 2).
    pub(super) fn narrow_tensor_convolutions(&mut self) -> Result<()> {
        let cases = [
            case(1, 256, 256, 128, 3, 1),
            case(1, 256, 256, 3, 128, 1),
            NarrowCase {
                extras: true,
                accumulate: true,
                ..case(2, 23, 37, 48, 8, 1)
            },
            NarrowCase {
                accumulate: true,
                ..case(3, 17, 9, 5, 32, 1)
            },
            case(1, 40, 33, 256, 1, 1),
            NarrowCase {
                pad: Pad::RightBottom,
                accumulate: true,
                ..case(2, 18, 26, 6, 64, 2)
            },
        ];
        for c in cases {
            for precision in [Precision::Bf16, Precision::Fp16] {
                self.narrow_case(&c, precision)?;
            }
        }
        Ok(())
    }

    /// One case in one precision: the narrow side's launches (the forward, or the input
    /// gradient's), against the CPU over the operands rounded as the kernel reads them, within
    /// [`TOLERANCE`], and over the fp32 ones, within [`tensor_core_tolerance`].
    fn narrow_case(&mut self, c: &NarrowCase, precision: Precision) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let NarrowCase {
            n,
            h,
            w,
            cin,
            cout,
            stride,
            pad,
            extras,
            accumulate,
        } = *c;
        let backward = cout > 8;
        let geo = Geometry {
            n,
            h,
            w,
            stride,
            pad,
        };
        let (oh, ow) = (h / stride, w / stride);
        let bound = 1.0 / ((cin * 9) as f32).sqrt();
        let wt = self.rand(cout * cin * 9, -bound, bound);
        let b = self.rand(cout, -1.0, 1.0);
        let (src_len, out_len) = match backward {
            false => (n * h * w * cin, n * oh * ow * cout),
            true => (n * oh * ow * cout, n * h * w * cin),
        };
        let src = self.rand(src_len, -1.0, 1.0);
        let old = self.grad_start(out_len, accumulate);
        let extra = |t: &mut Self, len| extras.then(|| t.rand(len, -1.0, 1.0));
        let temb = extra(self, n * cout);
        let res = extra(self, out_len);
        let out_div = if extras { 2.0 } else { 1.0 };
        // The CPU's results over `x` and the weights `wt`, from `old` where accumulating.
        let cpu = |x: &[f32], wt: &[f32]| {
            let p = ConvParams::new(wt, &b, cout, cin, 3);
            let mut out = old.clone();
            if backward {
                conv::backward_input(&p, x, geo, &mut out, accumulate);
            } else {
                let mut y = vec![0.0; out_len];
                conv::forward(&p, x, geo, temb.as_deref(), res.as_deref(), out_div, &mut y);
                match accumulate {
                    true => out.iter_mut().zip(&y).for_each(|(o, v)| *o += v),
                    false => out = y,
                }
            }
            out
        };
        let rounded =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| round_half(x, precision)).collect() };
        let want_rounded = cpu(&rounded(&src), &rounded(&wt));
        let want = cpu(&src, &wt);

        let mut dev = DevConv::upload(gpu, &wt, &b, cout, cin, 3, precision)?;
        dev.ensure_backward(gpu)?;
        let shapes = match backward {
            false => vec![ConvShape::forward(n, h, w, cin, cout, 3, stride, pad)],
            true => ConvShape::backward(n, h, w, cin, cout, 3, stride, pad),
        };
        let desc = format!(
            "n{n} {h}x{w} {cin}->{cout}{}{}",
            if stride == 2 { " s2" } else { "" },
            if extras { ", +temb +res /2" } else { "" }
        );
        let op = format!(
            "{precision} conv3x3 {}{} [narrow tc]",
            if backward { "input-grad" } else { "forward" },
            acc_name(accumulate)
        );
        let plans: Option<Vec<ConvLaunch>> = shapes
            .iter()
            .map(|s| ConvLaunch::narrow_mma(s, precision))
            .collect();
        let Some(plans) = plans else {
            self.check_row(format!("{op}: the kernel takes it"), desc, false);
            return Ok(());
        };
        let xd = self.up(&src)?;
        let x16 = self.half_copy(xd.ptr, src.len(), precision)?;
        let td = temb.as_deref().map(|t| self.up(t)).transpose()?;
        let rd = res.as_deref().map(|r| self.up(r)).transpose()?;
        let mut yd = self.up(&old)?;
        let y_ptr = yd.ptr;
        let run = || -> Result<()> {
            for (s, p) in shapes.iter().zip(&plans) {
                let ptrs = ConvPtrs {
                    x: x16.ptr,
                    w: dev.weights_for(p.kernel, backward)?,
                    y: y_ptr,
                    bias: if backward { 0 } else { dev.bias.ptr },
                    temb: td.as_ref().map_or(0, |d| d.ptr),
                    res: rd.as_ref().map_or(0, |d| d.ptr),
                    ..ConvPtrs::default()
                };
                let div = if backward { 1.0 } else { out_div };
                gpu.kernels.conv(st, s, p, ptrs, div, accumulate)?;
            }
            Ok(())
        };
        let ms = self.timed(|| yd.write(st, &old), run)?;
        let got = yd.download(st)?;
        self.row_within(
            format!("{op} vs cpu over the {precision} operands"),
            desc.clone(),
            &got,
            &want_rounded,
            ms,
            TOLERANCE,
        );
        self.row_within(op, desc, &got, &want, ms, tensor_core_tolerance(precision));
        Ok(())
    }

    /// The celebahq networks of the candidates in bf16 and fp16 as configured but with the
    /// narrow convolutions on the tensor cores (`INVDIFF_NARROW_MMA`): the program has them
    /// (a row), and its forward and forward + VJP are within the networks' tolerance of the
    /// CPU's fp32 results.
    pub(super) fn narrow_tensor_unets(&mut self, ordinal: usize) -> Result<()> {
        let what = "3-channel convolutions on tensor cores";
        self.for_candidate_networks(ordinal, true, |t, net, precision, gpu| {
            let label = format!("celebahq {precision}");
            gpu.set_narrow_mma(true);
            let profile = gpu.profile(net.n, net.h, net.w, true, 1)?;
            let on_tc = profile
                .steps
                .iter()
                .filter(|s| s.variant.starts_with("narrow tc-"))
                .count();
            t.check_row(
                format!("{label} forward + vjp, {what}: two launches on them"),
                net.desc.clone(),
                on_tc == 2,
            );
            t.cpu_network_rows(gpu, net, &label, what)
        })
    }
}
