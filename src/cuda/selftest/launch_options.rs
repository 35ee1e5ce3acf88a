//! How the launches are scheduled or merged, each way against the other, bit for bit: a
//! convolution's parity-class launches side by side on the streams
//! (`INVDIFF_CLASS_CONCURRENCY`), the 16-bit copy of a stride-2 input gradient written by its
//! parity-class launches (`INVDIFF_CLASS_HALF_COPIES`) or by a split launch's reduction
//! (`INVDIFF_REDUCE_HALF_COPIES`), and GroupNorms computed by the reductions of the split
//! launches before them (`INVDIFF_GN_FROM_REDUCTION`), whole networks against the programs
//! without.

use super::group_norms::silu_label;
use super::networks::{LAUNCHES, ORDERED_PAIRS};
use super::Tester;
use super::{round_half, unpack_half};
use crate::cuda::kernels::{
    plan_conv, plan_conv_at, plan_norm, reduction_norm_threads, ConvPtrs, ConvShape, NormDims,
    ReductionNorm, Silu, WGMMA_SLICE,
};
use crate::cuda::precision::Precision;
use crate::cuda::profile::StepTime;
use crate::cuda::streams::streams_wanted;
use crate::cuda::unet::CudaUnet;
use crate::cuda::weights::DevConv;
use crate::model::graph::Pad;
use crate::{switches, Result};

impl Tester<'_> {
    /// The celebahq architecture (random weights) at 64x64 x 2 and 256x256 x 1, in bf16 and
    /// fp16, as configured but with each convolution's parity-class launches side by side on
    /// the streams: a DPS step's schedule orders fewer pairs of steps, and its forward + VJP
    /// is the same to the bit as with the classes in order (the same launches, on disjoint
    /// pixels: a difference would mean an order lost that some other array needed). With one
    /// stream (`INVDIFF_STREAMS=1`) nothing runs side by side, and a row says so instead.
    pub(super) fn class_concurrency_unets(&mut self, ordinal: usize) -> Result<()> {
        let op = "parity classes side by side";
        if streams_wanted() == 1 {
            let why = "not checked: one stream (INVDIFF_STREAMS=1)";
            self.check_row(format!("celebahq forward + vjp, {op}"), why.into(), true);
            return Ok(());
        }
        let set = CudaUnet::set_class_concurrency;
        self.same_bits_choice_unets(ordinal, op, set, ORDERED_PAIRS)
    }

    /// The same networks as configured but with the 16-bit copy of a stride-2 input gradient
    /// written by its four parity-class launches, each at its own pixels, where all four stage
    /// their epilogues (at 256x256 x 1 the first downsampling's; none at 64x64 x 2): forward
    /// and forward + VJP the same to the bit as with a conversion launch.
    pub(super) fn class_half_copy_unets(&mut self, ordinal: usize) -> Result<()> {
        let writes = |s: &StepTime| {
            s.kind == "conv 3x3 s2 input-grad" && s.variant.contains(", 16-bit copy")
        };
        let (op, what) = (
            "16-bit copies by parity-class launches",
            "parity classes writing a copy",
        );
        self.same_bits_where_present(ordinal, op, CudaUnet::set_class_half_copies, what, writes)
    }

    /// A split tensor-core launch whose reduction also writes the 16-bit copy of its output
    /// (`conv_splitk_reduce_copy`), in bf16 and fp16, at two shapes (5 x 7 to 72 columns, a
    /// partial column tile, with every epilogue term, accumulating; a plain 8 x 8 one, also with
    /// no fp32 output): its fp32 output the same bits as the plain reduction's, the copy that
    /// output rounded to nearest even as a conversion launch rounds it, bit for bit.
    pub(super) fn reduction_copy_kernels(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        // (n, h, w, cin, cout, epilogue extras and accumulation)
        for (n, h, w, cin, cout, extras) in [(1, 5, 7, 64, 72, true), (2, 8, 8, 128, 128, false)] {
            let shape = ConvShape::forward(n, h, w, cin, cout, 3, 1, Pad::Symmetric);
            let len = n * h * w * cout;
            let bound = 1.0 / ((cin * 9) as f32).sqrt();
            let (wt, b) = (
                self.rand(cout * cin * 9, -bound, bound),
                self.rand(cout, -1.0, 1.0),
            );
            let host = [
                self.rand(n * h * w * cin, -1.0, 1.0),
                self.rand(n * cout, -1.0, 1.0),
                self.rand(len, -1.0, 1.0),
                self.rand(len, -1.0, 1.0),
            ];
            let [x, temb, res] = [0, 1, 2].map(|i| self.up(&host[i]));
            let (x, temb, res) = (x?, temb?, res?);
            for precision in [Precision::Bf16, Precision::Fp16] {
                // (Splits of whole 64-wide slices suit every tensor-core kernel's slice.)
                let plan = plan_conv_at(&shape, gpu.sms(), precision);
                let plan = plan.with_splits(&shape, WGMMA_SLICE, 4);
                let dev = DevConv::upload(gpu, &wt, &b, cout, cin, 3, precision)?;
                let ws = self.zeros(plan.workspace_len(&shape))?;
                let copy = self.zeros(len.div_ceil(2))?;
                let mut outs = Vec::new();
                for copy16 in [0, copy.ptr] {
                    let y = self.up(&host[3])?;
                    let p = ConvPtrs {
                        x: x.ptr,
                        w: dev.weights_for(plan.kernel, false)?,
                        y: y.ptr,
                        bias: dev.bias.ptr,
                        temb: if extras { temb.ptr } else { 0 },
                        res: if extras { res.ptr } else { 0 },
                        ws: ws.ptr,
                        copy16,
                        ..ConvPtrs::default()
                    };
                    let out_div = if extras { 2.0 } else { 1.0 };
                    gpu.kernels.conv(st, &shape, &plan, p, out_div, extras)?;
                    outs.push(y.download(st)?);
                }
                let got = unpack_half(&copy.download(st)?, len, precision);
                let rounded: Vec<f32> = outs[0].iter().map(|&v| round_half(v, precision)).collect();
                let extra = if extras {
                    ", temb, residual, /2, accumulating"
                } else {
                    ""
                };
                let desc = format!(
                    "n{n} {h}x{w} {cin}->{cout}, {} splits{extra}, bits",
                    plan.splits
                );
                let op = "conv split reduction with a 16-bit copy";
                let copy_op = format!("{op}, its {precision} copy");
                self.row_within(copy_op, desc.clone(), &got, &rounded, 0.0, 0.0);
                let out_op = format!("{op}: {precision} output vs without");
                self.row_within(out_op, desc.clone(), &outs[1], &outs[0], 0.0, 0.0);
                // The copy alone (y null: nothing reads the fp32 values), where nothing is
                // added onto y.
                if !extras {
                    let alone = self.zeros(len.div_ceil(2))?;
                    let p = ConvPtrs {
                        x: x.ptr,
                        w: dev.weights_for(plan.kernel, false)?,
                        bias: dev.bias.ptr,
                        ws: ws.ptr,
                        copy16: alone.ptr,
                        ..ConvPtrs::default()
                    };
                    gpu.kernels.conv(st, &shape, &plan, p, 1.0, false)?;
                    let got = unpack_half(&alone.download(st)?, len, precision);
                    let alone_op = format!("{op}, its {precision} copy with no fp32 output");
                    self.row_within(alone_op, desc, &got, &rounded, 0.0, 0.0);
                }
            }
        }
        Ok(())
    }

    /// The same networks as configured but with the 16-bit copies that split launches'
    /// reductions write (`conv_splitk_reduce_copy`) instead of conversion launches: forward
    /// and forward + VJP the same to the bit as with the conversions.
    pub(super) fn reduction_copy_unets(&mut self, ordinal: usize) -> Result<()> {
        let writes = |s: &StepTime| {
            (s.kind.starts_with("conv") || s.kind.starts_with("linear"))
                && s.variant.contains("split-K")
                && s.variant.contains(", 16-bit copy")
        };
        let (op, what) = (
            "16-bit copies by split reductions",
            "split launches writing a copy",
        );
        self.same_bits_where_present(ordinal, op, CudaUnet::set_reduce_half_copies, what, writes)
    }

    /// The fused reduction and GroupNorm alone, at shapes celebahq does not have (groups of 3
    /// and 7 channels, a last warp that is partly past the group, a block larger than the
    /// one-pass block it stands for, with and without the time embedding, a residual and a
    /// divisor, SiLU accurate and approximate, fp32 and bf16 outputs): the split fp32 launch,
    /// then its reduction with and without the GroupNorm; the launch's output, the GroupNorm's
    /// and its statistics the same bits as the plain reduction's followed by `gn_one_pass`
    /// (with the approximate SiLU, both from kernels/norm_approx.cu, and a row showing that the
    /// fused GroupNorm's output differs from the accurate module's).
    pub(super) fn reduction_norm_kernels(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        // (n, h, w, cin, cout, groups, epilogue extras, SiLU, 16-bit output)
        let cases = [
            (1, 5, 7, 24, 48, 8, true, Silu::Accurate, None),
            (
                2,
                10,
                10,
                16,
                21,
                3,
                false,
                Silu::Off,
                Some(Precision::Bf16),
            ),
            (1, 8, 8, 64, 64, 4, true, Silu::Off, None),
            (1, 8, 8, 32, 64, 4, false, Silu::Approx, None),
        ];
        for (n, h, w, cin, cout, groups, extras, silu, half_out) in cases {
            let shape = ConvShape::forward(n, h, w, cin, cout, 3, 1, Pad::Symmetric);
            let plan = plan_conv(&shape, gpu.sms()).with_splits(&shape, 8, 4);
            let (hw, cg) = (h * w, cout / groups);
            let (Some(threads), Some(one)) = (
                reduction_norm_threads(hw, cg),
                plan_norm(n, hw, cout, groups, gpu.sms(), true, true).one_pass,
            ) else {
                self.check_row(
                    "conv split reduction + groupnorm".into(),
                    format!("n{n} {h}x{w} {cout} ch g{groups}: no fused form"),
                    false,
                );
                continue;
            };
            let bound = 1.0 / ((cin * 9) as f32).sqrt();
            let (wt, b) = (
                self.rand(cout * cin * 9, -bound, bound),
                self.rand(cout, -1.0, 1.0),
            );
            let dev = DevConv::upload(gpu, &wt, &b, cout, cin, 3, Precision::Fp32)?;
            let len = n * hw * cout;
            let host = [
                self.rand(n * hw * cin, -1.0, 1.0),
                self.rand(n * cout, -1.0, 1.0),
                self.rand(len, -1.0, 1.0),
                self.rand(cout, 0.5, 1.5),
                self.rand(cout, -0.5, 0.5),
            ];
            let [x, temb, res, gamma, beta] = [0, 1, 2, 3, 4].map(|i| self.up(&host[i]));
            let (x, temb, res, gamma, beta) = (x?, temb?, res?, gamma?, beta?);
            let ws = self.zeros(plan.workspace_len(&shape))?;
            // One pass takes no partial sums and no affine, but the launcher wants addresses.
            let unused = self.zeros(1)?;
            let out_div = if extras { 2.0 } else { 1.0 };
            let ptrs = |y, norm| ConvPtrs {
                x: x.ptr,
                w: dev.weights_for(plan.kernel, false).unwrap_or(0),
                y,
                bias: dev.bias.ptr,
                temb: if extras { temb.ptr } else { 0 },
                res: if extras { res.ptr } else { 0 },
                ws: ws.ptr,
                norm,
                ..ConvPtrs::default()
            };
            let gn_len = if half_out.is_some() {
                len.div_ceil(2)
            } else {
                len
            };
            let mut outs = Vec::new();
            // With the approximate SiLU, the fused launch once more with the accurate one, whose
            // GroupNorm output must differ: the approximate module's kernel ran.
            let accurate_too = (silu == Silu::Approx).then_some((true, Silu::Accurate));
            for (fused, silu) in [(false, silu), (true, silu)]
                .into_iter()
                .chain(accurate_too)
            {
                let (y, gy, stats) = (
                    self.zeros(len)?,
                    self.zeros(gn_len)?,
                    self.zeros(2 * n * groups)?,
                );
                let norm = ReductionNorm {
                    gamma: gamma.ptr,
                    beta: beta.ptr,
                    y: gy.ptr,
                    half_out,
                    stats: stats.ptr,
                    groups,
                    eps: 1e-6,
                    silu,
                    one_pass_threads: one,
                };
                gpu.kernels.conv(
                    st,
                    &shape,
                    &plan,
                    ptrs(y.ptr, fused.then_some(norm)),
                    out_div,
                    false,
                )?;
                if !fused {
                    let split = plan_norm(n, hw, cout, groups, gpu.sms(), true, true);
                    let d = NormDims {
                        n,
                        hw,
                        c: cout,
                        groups,
                        split,
                    };
                    gpu.kernels.group_norm(
                        st, d, y.ptr, None, gamma.ptr, beta.ptr, gy.ptr, unused.ptr, stats.ptr,
                        unused.ptr, 1e-6, silu, half_out,
                    )?;
                }
                outs.push([y.download(st)?, gy.download(st)?, stats.download(st)?]);
            }
            let desc = format!(
                "n{n} {h}x{w} {cin}->{cout} g{groups}, {} splits, {threads} threads for one pass's {one}{}{}",
                plan.splits,
                if extras { ", temb + residual, /2" } else { "" },
                match half_out {
                    Some(p) => format!(", {p} output"),
                    None => String::new(),
                }
            );
            for (k, what) in ["convolution output", "groupnorm output", "statistics"]
                .iter()
                .enumerate()
            {
                let op = format!(
                    "conv split reduction + groupnorm{}, {what} vs two launches, bits",
                    silu_label(silu)
                );
                self.same_words_row(op, &desc, &outs[1][k], &outs[0][k], 0.0);
            }
            if let Some(accurate) = outs.get(2) {
                let op = "conv split reduction + groupnorm+approximate silu, groupnorm output vs \
                          the accurate SiLU's";
                self.differs_row(op.into(), &desc, &outs[1][1], &accurate[1]);
            }
        }
        Ok(())
    }

    /// The same networks as configured but with the one-pass GroupNorms after split launches
    /// computed by those launches' reductions (kernels/norm.cu `conv_splitk_reduce_norm`; at
    /// 256x256 x 1 the 8x8 and 16x16 levels' 24, fewer at 64x64 x 2): fewer launches, and the
    /// forward + VJP the same to the bit as with the reduction and the GroupNorm apart (the
    /// same reduction, then gn_one_pass's sums in its order).
    /// In fp32 too (the fp32 kernels' split launches, an fp32 GroupNorm output). Without
    /// one-pass GroupNorms (`INVDIFF_GN_ONE_PASS=0`) there is nothing to fuse, and a row says so.
    pub(super) fn reduction_norm_unets(&mut self, ordinal: usize) -> Result<()> {
        let op = "GroupNorms computed by split reductions";
        if switches::is("INVDIFF_GN_ONE_PASS", "0") {
            let why = "not checked: no one-pass GroupNorms (INVDIFF_GN_ONE_PASS=0)";
            self.check_row(format!("celebahq forward + vjp, {op}"), why.into(), true);
            return Ok(());
        }
        let set = CudaUnet::set_gn_from_reduction;
        self.same_bits_choice_unets(ordinal, op, set, LAUNCHES)?;
        // On the cards the bf16 and fp16 rows run on (their split launches are planned for
        // 132 multiprocessors in the program test).
        if !self.gpu.kernels.has_wgmma() {
            return Ok(());
        }
        let (model, networks) = self.candidate_networks(false)?;
        for net in &networks {
            let mut gpu = CudaUnet::with_precision(&model, ordinal, Precision::Fp32)?;
            self.same_bits_choice_rows(&mut gpu, net, Precision::Fp32, op, set, LAUNCHES)?;
        }
        Ok(())
    }
}
