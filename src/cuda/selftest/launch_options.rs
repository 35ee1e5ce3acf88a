//! The choices a convolution launch makes below its plan ([`LaunchSwitches`]), each against
//! the other way, bit for bit: the 3-channel image convolutions' narrow kernels on 8-row
//! tiles (`conv_narrow_short_*`, `INVDIFF_NARROW_SHORT`); and how the
//! launches are scheduled: a convolution's parity-class launches side by side on the streams
//! (`INVDIFF_CLASS_CONCURRENCY`), whole networks against the schedule that orders them. A group
//! of its own, run last: a candidate's kernel that faults ends no other check.

use super::networks::ORDERED_PAIRS;
use super::{epilogue_setups, Tester};
use crate::cuda::kernels::{
    plan_conv, ConvKernel, ConvLaunch, ConvPtrs, ConvShape, LaunchSwitches,
};
use crate::cuda::streams::streams_wanted;
use crate::cuda::unet::CudaUnet;
use crate::cuda::weights::DevBuf;
use crate::model::graph::Pad;
use crate::Result;

/// A shape's operands: fp32 activations and weights, a bias, a time embedding, a residual,
/// and what the launches add onto.
struct Operands {
    x: DevBuf,
    w: DevBuf,
    bias: DevBuf,
    temb: DevBuf,
    res: DevBuf,
    old: Vec<f32>,
}

impl Tester<'_> {
    fn operands(&mut self, s: &ConvShape) -> Result<Operands> {
        let blocks = s.taps.iter().map(|t| t.w).max().unwrap_or(0) as usize + 1;
        let len = s.n * s.yh * s.yw * s.ncols;
        let x = self.rand(s.n * s.sh * s.sw * s.sc, -1.0, 1.0);
        let w = self.rand(blocks * s.sc * s.ncols, -0.05, 0.05);
        let bias = self.rand(s.ncols, -0.5, 0.5);
        let temb = self.rand(s.n * s.ncols, -0.5, 0.5);
        let res = self.rand(len, -1.0, 1.0);
        Ok(Operands {
            x: self.up(&x)?,
            w: self.up(&w)?,
            bias: self.up(&bias)?,
            temb: self.up(&temb)?,
            res: self.up(&res)?,
            old: self.rand(len, -1.0, 1.0),
        })
    }

    /// Launch `l` of `s` (operands `ptrs`, epilogue terms from `ops`) making each of `opts`'
    /// launch choices, the second against the first, under each epilogue
    /// ([`epilogue_setups`]), to the bit.
    fn option_rows(
        &mut self,
        s: &ConvShape,
        (l, label): (ConvLaunch, &str),
        ptrs: ConvPtrs,
        ops: &Operands,
        (opts, what): ([LaunchSwitches; 2], &str),
    ) -> Result<()> {
        let desc = format!(
            "n{} {}x{} -> {}x{}, {}->{} ({} taps, output stride {})",
            s.n,
            s.sh,
            s.sw,
            s.mh,
            s.mw,
            s.sc,
            s.ncols,
            s.taps.len(),
            s.out_stride
        );
        let ws = self.zeros(l.workspace_len(s))?;
        let all = ConvPtrs {
            bias: ops.bias.ptr,
            temb: ops.temb.ptr,
            res: ops.res.ptr,
            ws: ws.ptr,
            ..ptrs
        };
        for (terms, p, div, accumulate) in epilogue_setups(all) {
            let mut out = Vec::new();
            let mut ms = 0.0;
            for o in opts {
                let (kernels, st) = (self.gpu.kernels.with_launch(o), &self.gpu.stream);
                let mut y = self.up(&ops.old)?;
                let p = ConvPtrs { y: y.ptr, ..p };
                let run = || kernels.conv(st, s, &l, p, div, accumulate);
                ms = self.timed(|| y.write(st, &ops.old), run)?;
                out.push(y.download(st)?);
            }
            self.row_within(
                format!(
                    "{what} ({terms}{}) [{label}]",
                    if accumulate { ", adding" } else { "" }
                ),
                format!("{desc}, bits"),
                &out[1],
                &out[0],
                ms,
                0.0,
            );
        }
        Ok(())
    }

    /// The 3-channel image convolutions' narrow launches (celebahq's conv_out forward and
    /// conv_in input gradient at 256x256, batch 1; odd sizes at batch 2: a partial row tile,
    /// 13 source channels in 4-byte copies, 5 outputs) on 8-row tiles against 16-row ones,
    /// under each epilogue, overwriting and adding, to the bit. (At batch 2 and 256x256 the
    /// 16-row tiles fill the card and `INVDIFF_NARROW_SHORT` keeps them.)
    pub(super) fn narrow_tiles(&mut self) -> Result<()> {
        let mut shapes = vec![
            ConvShape::forward(1, 256, 256, 128, 3, 3, 1, Pad::Symmetric),
            ConvShape::forward(2, 20, 24, 13, 5, 3, 1, Pad::Symmetric),
        ];
        shapes.extend(ConvShape::backward(
            1,
            256,
            256,
            3,
            128,
            3,
            1,
            Pad::Symmetric,
        ));
        let base = self.gpu.kernels.launch_switches();
        let opts = |narrow_short| LaunchSwitches {
            narrow_short,
            ..base
        };
        for s in &shapes {
            let l = plan_conv(s, self.gpu.sms());
            self.check_row(
                format!(
                    "narrow tiles: {}->{} plans the narrow kernel",
                    s.sc, s.ncols
                ),
                format!("n{} {}x{}", s.n, s.mh, s.mw),
                l.kernel == ConvKernel::Narrow,
            );
            let ops = self.operands(s)?;
            let ptrs = ConvPtrs {
                x: ops.x.ptr,
                w: ops.w.ptr,
                ..ConvPtrs::default()
            };
            let what = "narrow convolution, 8-row vs 16-row tiles";
            self.option_rows(
                s,
                (l, "narrow"),
                ptrs,
                &ops,
                ([opts(false), opts(true)], what),
            )?;
        }
        Ok(())
    }

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
}
