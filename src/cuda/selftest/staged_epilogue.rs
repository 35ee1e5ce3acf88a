//! Epilogues through shared memory (the `_st` wgmma kernels, `INVDIFF_EPI_STAGED`): launches
//! against the same launch without, bit for bit, also where they fuse a shortcut (that group's
//! checks, staged) or write 16-bit outputs (a concatenation's side,
//! `INVDIFF_CONCAT_FROM_PRODUCERS`; a copy, `INVDIFF_EPI_HALF_COPIES`), and whole networks
//! against the same network without. A group of its own,
//! run last: a candidate's kernel that faults ends no other check.

use super::conv_variants::wgmma_path;
use super::{epilogue_setups, round_half, unpack_half, Tester};
use crate::cuda::kernels::{
    on_tile, plan_wgmma, tma_tried, ConvLaunch, ConvPtrs, ConvShape, DPtr, Side16, WgmmaTile,
};
use crate::cuda::precision::Precision;
use crate::cuda::profile::StepTime;
use crate::cuda::weights::DevBuf;
use crate::model::graph::Pad;
use crate::Result;

impl Tester<'_> {
    /// On a device with wgmma, in bf16 and fp16: unsplit TMA launches on both tiles at
    /// celebahq's shapes and awkward ones (a partial column tile, partial row tiles, stride-2
    /// input gradients, one launch per parity class into a strided output), with a bias, a
    /// time embedding, a residual and a divisor in the epilogue, with a time embedding alone
    /// and without a divisor, and with no epilogue terms, each also adding onto an output:
    /// staged, the same output as without to the bit; where the launch can write GroupNorm
    /// sums, those checked against the host's as every launch's are.
    pub(super) fn staged_epilogues(&mut self) -> Result<()> {
        if !self.gpu.kernels.has_wgmma() {
            return Ok(());
        }
        let mut shapes = vec![
            ConvShape::forward(1, 256, 256, 128, 128, 3, 1, Pad::Symmetric),
            ConvShape::forward(2, 64, 64, 256, 256, 3, 1, Pad::Symmetric),
            ConvShape::forward(1, 32, 32, 512, 512, 3, 1, Pad::Symmetric),
            ConvShape::forward(1, 16, 16, 128, 160, 3, 1, Pad::Symmetric),
            ConvShape::forward(3, 12, 20, 64, 128, 3, 1, Pad::Symmetric),
        ];
        shapes.extend(ConvShape::backward(
            2,
            32,
            32,
            128,
            128,
            3,
            2,
            Pad::RightBottom,
        ));
        for shape in &shapes {
            for precision in [Precision::Bf16, Precision::Fp16] {
                self.staged_epilogue_case(shape, precision)?;
            }
        }
        Ok(())
    }

    /// Launch `l` (TMA, unsplit) staged against its own output without (`want`, with `ptrs`
    /// and `out_div`), to the bit, and its GroupNorm sums where it can write them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn staged_row(
        &mut self,
        s: &ConvShape,
        l: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        want: &[f32],
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let staged = ConvLaunch {
            staged_epilogue: true,
            ..l
        };
        let (got, ms) = self.conv_output(s, &staged, ptrs, out_div, want.len())?;
        self.row_within(
            format!("{label} [{}] vs [{}]", wgmma_path(&staged), wgmma_path(&l)),
            desc.into(),
            &got,
            want,
            ms,
            0.0,
        );
        self.gn_partial_row(s, staged, ptrs, out_div, &got, label, desc)
    }

    fn staged_epilogue_case(&mut self, s: &ConvShape, precision: Precision) -> Result<()> {
        let Some(TmaCase {
            desc,
            planned,
            ptrs,
            len,
            bufs: _bufs,
        }) = self.tma_case(s, precision)?
        else {
            return Ok(());
        };
        // What the launches add onto.
        let old = self.rand(len, -1.0, 1.0);
        for (tile, _) in WgmmaTile::ALL {
            let tma = ConvLaunch {
                splits: 1,
                k_per_split: s.k().next_multiple_of(64),
                row_epilogue: true,
                lean_loads: true,
                tma_loads: true,
                ..planned
            };
            let Some(plain) = on_tile(tma, tile) else {
                continue;
            };
            let staged = ConvLaunch {
                staged_epilogue: true,
                ..plain
            };
            for (what, p, div, accumulate) in epilogue_setups(ptrs) {
                let (want, plain_ms) = self.output_over(s, &plain, p, div, &old, accumulate)?;
                let (got, ms) = self.output_over(s, &staged, p, div, &old, accumulate)?;
                let label = format!("conv ({what}{})", if accumulate { ", adding" } else { "" });
                self.row_within(
                    format!(
                        "{label} [{}] vs [{}]",
                        wgmma_path(&staged),
                        wgmma_path(&plain)
                    ),
                    format!("{desc}, without {plain_ms:.3} ms"),
                    &got,
                    &want,
                    ms,
                    0.0,
                );
                if !accumulate {
                    self.gn_partial_row(s, staged, p, div, &got, &label, &desc)?;
                    self.half_output_rows_staged(
                        s, staged, p, div, &old, &want, &label, &desc, precision,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Staged launch `l` writing its output also in 16 bits: as a side of a concatenation
    /// (`Side16`, INVDIFF_CONCAT_FROM_PRODUCERS), channels 4.. of `ncols + 8`, and as a copy
    /// (INVDIFF_EPI_HALF_COPIES), with and without its fp32 output: the side and the copy
    /// `want` rounded as a conversion rounds it, to the bit, the side's other channels
    /// untouched, and the fp32 output, where written, `want` to the bit. Both start as `old` rounded, what the pixels a strided
    /// launch leaves keep.
    #[allow(clippy::too_many_arguments)]
    fn half_output_rows_staged(
        &mut self,
        s: &ConvShape,
        l: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        old: &[f32],
        want: &[f32],
        label: &str,
        desc: &str,
        precision: Precision,
    ) -> Result<()> {
        let (c, offset) = (s.ncols, 4);
        let width = c + 8;
        let widen = |v: &[f32]| -> Vec<f32> {
            v.chunks(c)
                .flat_map(|px| {
                    let mut row = vec![0.0; width];
                    row[offset..offset + c].copy_from_slice(px);
                    row
                })
                .collect()
        };
        let round =
            |v: Vec<f32>| -> Vec<f32> { v.iter().map(|&x| round_half(x, precision)).collect() };
        let (side_start, copy_start) = (self.up(&widen(old))?, self.up(old)?);
        let (side_want, copy_want) = (round(widen(want)), round(want.to_vec()));
        let st = &self.gpu.stream;
        let path = wgmma_path(&l);
        for fp32 in [true, false] {
            let side = self.half_copy(side_start.ptr, side_want.len(), precision)?;
            let copy = self.half_copy(copy_start.ptr, copy_want.len(), precision)?;
            let y = self.up(old)?;
            let p = ConvPtrs {
                y: if fp32 { y.ptr } else { 0 },
                y16: Side16 {
                    buf: side.ptr,
                    width,
                    offset,
                },
                copy16: copy.ptr,
                ..ptrs
            };
            self.gpu.kernels.conv(st, s, &l, p, out_div, false)?;
            let what = if fp32 {
                "beside its fp32 output"
            } else {
                "alone"
            };
            for (out, want, name, at) in [
                (
                    &side,
                    &side_want,
                    "concatenation side",
                    format!("channels {offset}.. of {width}"),
                ),
                (&copy, &copy_want, "copy", "its own layout".to_string()),
            ] {
                let got = unpack_half(&out.download(st)?, want.len(), precision);
                self.row_within(
                    format!("{label} [{path}], {precision} {name} {what}"),
                    format!("{desc}, {at}, bits"),
                    &got,
                    want,
                    0.0,
                    0.0,
                );
            }
            if fp32 {
                self.row_within(
                    format!("{label} [{path}], fp32 output beside its 16-bit ones"),
                    format!("{desc}, bits"),
                    &y.download(st)?,
                    want,
                    0.0,
                    0.0,
                );
            }
        }
        Ok(())
    }

    /// A launch check's shape in words, its wgmma launch as planned where the selftest tries
    /// TMA on `s` (else `None`, and a failed row where a launch should have been planned), and
    /// random operands for two forms of it to share: the 16-bit input and K-major weights of
    /// every tap block it names, a bias, a time embedding and a residual.
    fn tma_case(&mut self, s: &ConvShape, precision: Precision) -> Result<Option<TmaCase>> {
        let desc = format!(
            "n{} {}x{} -> {}x{}, {}->{} ({} taps, output stride {}), {precision}",
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
        let Some(planned) = plan_wgmma(s, self.gpu.sms(), precision).filter(|_| tma_tried(s))
        else {
            if tma_tried(s) {
                self.check_row(
                    "staged epilogue: a wgmma launch planned".into(),
                    desc,
                    false,
                );
            }
            return Ok(None);
        };
        let blocks = s.taps.iter().map(|t| t.w).max().unwrap_or(0) as usize + 1;
        let (x_len, w_len) = (s.n * s.sh * s.sw * s.sc, blocks * s.ncols * s.sc);
        let len = s.n * s.yh * s.yw * s.ncols;
        let mut bufs = Vec::new();
        // (The fp32 source lives beside its copy, so that the conversion queued on the stream
        // reads live memory whatever the allocator's freeing does.)
        let mut half = |t: &mut Self, n: usize, lo: f32, hi: f32| -> Result<DPtr> {
            let v = t.rand(n, lo, hi);
            let d = t.up(&v)?;
            let h = t.half_copy(d.ptr, n, precision)?;
            let ptr = h.ptr;
            bufs.extend([d, h]);
            Ok(ptr)
        };
        let (x, w) = (
            half(self, x_len, -1.0, 1.0)?,
            half(self, w_len, -0.05, 0.05)?,
        );
        let mut full = |t: &mut Self, n: usize, lo: f32, hi: f32| -> Result<DPtr> {
            let v = t.rand(n, lo, hi);
            let d = t.up(&v)?;
            let ptr = d.ptr;
            bufs.push(d);
            Ok(ptr)
        };
        let bias = full(self, s.ncols, -0.5, 0.5)?;
        let temb = full(self, s.n * s.ncols, -0.5, 0.5)?;
        let res = full(self, len, -1.0, 1.0)?;
        Ok(Some(TmaCase {
            desc,
            planned,
            ptrs: ConvPtrs {
                x,
                w,
                bias,
                temb,
                res,
                ..ConvPtrs::default()
            },
            len,
            bufs,
        }))
    }

    /// Launch `l`'s output over `old` (what it adds onto when `accumulate`), divided by
    /// `out_div`, and its time (of launches that add onto the output more than once: the
    /// output checked is one more launch's, over `old` again).
    fn output_over(
        &self,
        s: &ConvShape,
        l: &ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        old: &[f32],
        accumulate: bool,
    ) -> Result<(Vec<f32>, f64)> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let y = self.up(old)?;
        let p = ConvPtrs { y: y.ptr, ..ptrs };
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv(st, s, l, p, out_div, accumulate),
        )?;
        let y = self.up(old)?;
        let p = ConvPtrs { y: y.ptr, ..ptrs };
        gpu.kernels.conv(st, s, l, p, out_div, accumulate)?;
        Ok((y.download(st)?, ms))
    }

    /// The celebahq architecture (random weights) at 64x64 x 2 and 256x256 x 1, in bf16 and
    /// fp16, as configured but for two choices: staged epilogues with the tall tiles on and
    /// with them off, each with its forward and forward + VJP the same to the bit as without
    /// staging, with the tall tiles on, once the program shows it stages. Every split of K
    /// stays (`set_staged_epilogue_and_tall`): the two-way splits unsplit to stage sum in
    /// another order, which the network rows against the CPU check.
    pub(super) fn staged_epilogue_unets(&mut self, ordinal: usize) -> Result<()> {
        self.for_candidate_networks(ordinal, false, |t, net, precision, gpu| {
            gpu.set_staged_epilogue_and_tall(false, true);
            let want = Self::network_outputs(gpu, net)?;
            let staged = |s: &StepTime| s.variant.contains("staged epilogue");
            let has = ("staged epilogues", &staged as &dyn Fn(&StepTime) -> bool);
            for (tall, what) in [
                (true, "staged epilogue"),
                (false, "staged epilogue, no tall tiles"),
            ] {
                gpu.set_staged_epilogue_and_tall(true, tall);
                let op = format!("celebahq {precision}, {what}");
                t.same_network_rows(gpu, net, &op, has, &want)?;
            }
            Ok(())
        })
    }

    /// The celebahq networks of [`staged_epilogue_unets`](Self::staged_epilogue_unets) as
    /// configured, with the staged epilogues' 16-bit outputs (the concatenations' sides,
    /// `INVDIFF_CONCAT_FROM_PRODUCERS`; the copies, `INVDIFF_EPI_HALF_COPIES`) each, both,
    /// and without: forward and forward + VJP the same to the bit, once the program shows a
    /// launch writing them (with both, one writing no fp32 output).
    pub(super) fn half_output_unets(&mut self, ordinal: usize) -> Result<()> {
        self.for_candidate_networks(ordinal, false, |t, net, precision, gpu| {
            gpu.set_epilogue_half_outputs(false, false);
            let want = Self::network_outputs(gpu, net)?;
            for (sides, copies, what, markers) in [
                (
                    true,
                    false,
                    "concatenation sides",
                    &[", concatenation side"][..],
                ),
                (false, true, "16-bit copies", &[", 16-bit copy"][..]),
                (
                    true,
                    true,
                    "both",
                    &[", concatenation side", ", no fp32 output"][..],
                ),
            ] {
                // (A GroupNorm backward pass's variant names concatenation sides too.)
                let writes = |s: &StepTime| {
                    s.kind.starts_with("conv") && markers.iter().all(|m| s.variant.contains(m))
                };
                let has = (
                    format!("launches writing {what}"),
                    &writes as &dyn Fn(&StepTime) -> bool,
                );
                gpu.set_epilogue_half_outputs(sides, copies);
                let op = format!("celebahq {precision}, {what} from staged epilogues");
                t.same_network_rows(gpu, net, &op, (&has.0, has.1), &want)?;
            }
            Ok(())
        })
    }
}

/// A launch check's setup ([`Tester::tma_case`]): its description, planned launch, operands
/// (kept alive in `bufs`) and output length.
struct TmaCase {
    desc: String,
    planned: ConvLaunch,
    ptrs: ConvPtrs,
    len: usize,
    bufs: Vec<DevBuf>,
}
