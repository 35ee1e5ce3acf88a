//! The 3-channel convolutions on the tensor cores (`INVDIFF_NARROW_MMA`, `INVDIFF_FEW_IN_MMA`):
//! the few-output kernel (`conv_narrow_mma_*`) against the CPU's convolution over the same
//! 16-bit operands (so only the order of the sums differs) and against the fp32 one, the
//! few-input kernel (`conv_few_in_mma_<sc>`, operands split into bf16 pairs) against the fp32
//! one, forward and input gradient, at celebahq's shapes and odd ones; then whole networks
//! with them against the CPU.

use super::{acc_name, round_half, tensor_core_tolerance, Tester, TOLERANCE};
use crate::cpu::conv::{self, ConvParams, Geometry};
use crate::cuda::kernels::{
    narrow_mma_fits, plan_conv, ConvKernel, ConvLaunch, ConvPtrs, ConvShape,
};
use crate::cuda::precision::Precision;
use crate::cuda::weights::DevConv;
use crate::model::graph::Pad;
use crate::{switches, Result};

/// One check: `n` images of `h x w`, a 3x3 convolution `cin -> cout` at `stride`, with its
/// epilogue terms (forward) and accumulation.
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

/// Largest relative L2 error of `conv_few_in_mma_<sc>` against the CPU's fp32 convolution: its
/// operands keep about 17 bits (a numpy model of the split at K = 27 and 72 gives 3.8e-6 to
/// 4.5e-6, against 2.1e-3 to 2.4e-3 for operands rounded once to bf16).
const FEW_IN_MMA_TOLERANCE: f64 = 2e-5;

impl Tester<'_> {
    /// Celebahq's conv_out (128 -> 3) and conv_in (3 -> 128) at 256x256, each forward and input
    /// gradient (the four launches the kernels take), then odd shapes: partial tiles both ways,
    /// 8 to 1 outputs (and, back, inputs), 16 and 256 source channels for the few-output
    /// kernel (its smallest and largest) and 144 (a partial second round of its weights), every
    /// count from 1 to 8 for the few-input one (a kernel each; one to five k16 steps), 37
    /// outputs (odd: stores one at a time), 144 and 256 (two column tiles), every epilogue term
    /// and accumulation, and stride-2 gradients' parity classes (taps filling part of the
    /// window, output stride 2) for both kernels, accumulating and not.
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
                extras: true,
                accumulate: true,
                ..case(3, 17, 9, 5, 32, 1)
            },
            case(1, 40, 33, 256, 1, 1),
            case(1, 20, 35, 144, 1, 1),
            NarrowCase {
                extras: true,
                ..case(2, 9, 20, 16, 2, 1)
            },
            NarrowCase {
                pad: Pad::RightBottom,
                accumulate: true,
                ..case(2, 18, 26, 6, 64, 2)
            },
            case(1, 12, 10, 5, 48, 2),
            NarrowCase {
                accumulate: true,
                ..case(1, 12, 10, 48, 7, 2)
            },
            case(1, 11, 19, 4, 32, 1),
            NarrowCase {
                accumulate: true,
                ..case(2, 10, 14, 6, 48, 1)
            },
            NarrowCase {
                extras: true,
                ..case(1, 13, 21, 3, 37, 1)
            },
        ];
        for c in cases {
            for backward in [false, true] {
                for precision in [Precision::Bf16, Precision::Fp16] {
                    self.narrow_case(&c, backward, precision)?;
                }
            }
        }
        Ok(())
    }

    /// One case's forward or input gradient (`backward`) where the fp32 program runs it on a
    /// direct kernel: on the few-output kernel in `precision` over 16-bit operands, against
    /// the CPU over the operands rounded as it reads them (within [`TOLERANCE`]: only the
    /// order of the sums differs) and over the fp32 ones (within [`tensor_core_tolerance`]);
    /// or (once, in bf16) on the few-input kernel over the fp32 operands, against the CPU's
    /// fp32 result within [`FEW_IN_MMA_TOLERANCE`].
    fn narrow_case(&mut self, c: &NarrowCase, backward: bool, precision: Precision) -> Result<()> {
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
        let shapes = match backward {
            false => vec![ConvShape::forward(n, h, w, cin, cout, 3, stride, pad)],
            true => ConvShape::backward(n, h, w, cin, cout, 3, stride, pad),
        };
        // (Few outputs from source channels the tensor-core kernel does not take, 37 say, stay
        // on the fp32 kernel: the program tests check that celebahq's do not.)
        let few_outputs = match plan_conv(&shapes[0], gpu.sms()).kernel {
            ConvKernel::Narrow if narrow_mma_fits(&shapes[0], precision) => true,
            ConvKernel::FewIn if precision == Precision::Bf16 => false,
            _ => return Ok(()),
        };
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
        let extras = extras && !backward;
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
        let want = cpu(&src, &wt);

        let mut dev = DevConv::upload(gpu, &wt, &b, cout, cin, 3, precision)?;
        dev.ensure_backward(gpu)?;
        let desc = format!(
            "n{n} {h}x{w} {cin}->{cout}{}{}",
            if stride == 2 { " s2" } else { "" },
            if extras { ", +temb +res /2" } else { "" }
        );
        let op = format!(
            "{} conv3x3 {}{} [{}]",
            if few_outputs {
                precision.name()
            } else {
                "bf16x3"
            },
            if backward { "input-grad" } else { "forward" },
            acc_name(accumulate),
            if few_outputs {
                "narrow tc"
            } else {
                "few-in tc"
            },
        );
        let plans: Option<Vec<ConvLaunch>> = shapes
            .iter()
            .map(|s| match few_outputs {
                true => ConvLaunch::narrow_mma(s, precision),
                false => ConvLaunch::few_in_mma(s),
            })
            .collect();
        let Some(plans) = plans else {
            self.check_row(format!("{op}: the kernel takes it"), desc, false);
            return Ok(());
        };
        let xd = self.up(&src)?;
        let x = match few_outputs {
            true => Some(self.half_copy(xd.ptr, src.len(), precision)?),
            false => None,
        };
        let td = temb.as_deref().map(|t| self.up(t)).transpose()?;
        let rd = res.as_deref().map(|r| self.up(r)).transpose()?;
        let mut yd = self.up(&old)?;
        let y_ptr = yd.ptr;
        let run = || -> Result<()> {
            for (s, p) in shapes.iter().zip(&plans) {
                let ptrs = ConvPtrs {
                    x: x.as_ref().map_or(xd.ptr, |x| x.ptr),
                    w: dev.weights_for(p.kernel, backward)?,
                    y: y_ptr,
                    bias: if backward { 0 } else { dev.bias.ptr },
                    temb: td.as_ref().map_or(0, |d| d.ptr),
                    res: rd.as_ref().map_or(0, |d| d.ptr),
                    ..ConvPtrs::default()
                };
                gpu.kernels.conv(st, s, p, ptrs, out_div, accumulate)?;
            }
            Ok(())
        };
        let ms = self.timed(|| yd.write(st, &old), run)?;
        let got = yd.download(st)?;
        if !few_outputs {
            self.row_within(op, desc, &got, &want, ms, FEW_IN_MMA_TOLERANCE);
            return Ok(());
        }
        let rounded =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| round_half(x, precision)).collect() };
        let want_rounded = cpu(&rounded(&src), &rounded(&wt));
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
    /// 3-channel convolutions on the tensor cores (`INVDIFF_NARROW_MMA`, `INVDIFF_FEW_IN_MMA`):
    /// the program has them (a row: both few-input launches, and conv_out's few-output one
    /// unless the deep pipelines are off; conv_in's input gradient takes it where its output
    /// gradient gets a 16-bit copy, which the program tests check at full size), and its
    /// forward and forward + VJP are within the networks' tolerance of the CPU's fp32 results.
    pub(super) fn narrow_tensor_unets(&mut self, ordinal: usize) -> Result<()> {
        let what = "3-channel convolutions on tensor cores";
        self.for_candidate_networks(ordinal, true, |t, net, precision, gpu| {
            let label = format!("celebahq {precision}");
            gpu.set_narrow_mma(true);
            gpu.set_few_in_mma(true);
            let profile = gpu.profile(net.n, net.h, net.w, true, 1)?;
            let on_tc = |prefix: &str| {
                profile
                    .steps
                    .iter()
                    .filter(|s| s.variant.starts_with(prefix))
                    .count()
            };
            let (narrow, few_in) = (on_tc("narrow tc-"), on_tc("few-in tc-"));
            // The few-output kernel reads 16 bits: conv_out's input is one where the deep
            // pipelines are on; conv_in's output gradient one where it is large enough for a
            // 16-bit copy (HALF_COPY_MIN, or any size on Hopper), which 16-bit copies allow.
            let least = usize::from(!switches::is("INVDIFF_TC_PIPELINE", "two"));
            t.check_row(
                format!("{label} forward + vjp, {what}: the launches on them"),
                format!(
                    "{}: {narrow} few-output ({least} to 2 expected), {few_in} few-input (2)",
                    net.desc
                ),
                (least..=2).contains(&narrow) && few_in == 2,
            );
            t.cpu_network_rows(gpu, net, &label, what)
        })
    }
}
