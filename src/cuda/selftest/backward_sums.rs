//! GroupNorm backward sums written by the convolution input gradients that write their output
//! gradients (the `_gnb` wgmma kernels, `INVDIFF_GN_BWD_PRODUCER_SUMS`): launches against the
//! host's sums over their own output, and whole networks with it against the CPU. A group of
//! its own, run last: a candidate's kernel that faults ends no other check.

use super::conv_variants::wgmma_path;
use super::Tester;
use crate::cuda::kernels::{
    gn_partial_fits, on_tile, plan_wgmma, tma_tried, ConvLaunch, ConvPtrs, ConvShape,
    NormBackwardSums, WgmmaTile,
};
use crate::cuda::precision::Precision;
use crate::cuda::unet::CudaUnet;
use crate::model::graph::Pad;
use crate::Result;

/// Groups of the GroupNorm the checked launches feed.
const GROUPS: usize = 32;

impl Tester<'_> {
    /// On a device with wgmma, in bf16 and fp16: unsplit lean and TMA launches on each tile of
    /// celebahq's shapes, a partial column tile (96 columns) and a single row tile, each with
    /// random GroupNorm statistics, scale and shift over an fp32 input and over a 16-bit one,
    /// with and without SiLU: the output the same to the bit as the same launch without the sums, and the
    /// partial sums those of `gn_bwd_partial` over that output per tile and column, computed
    /// on the host in f64 from g and g * xhat formed in f32 as the kernels form them (1e-6 with
    /// SiLU, for the device's `expf` against the host's; 1e-12 without, where only the order
    /// of the f64 additions differs). With `staged` (the staged-epilogue group), only the TMA
    /// launches, staged ([`ConvLaunch::staged_epilogue`]), against the same references.
    pub(super) fn backward_sums(&mut self, staged: bool) -> Result<()> {
        if !self.gpu.kernels.has_wgmma() {
            return Ok(());
        }
        let shapes = [
            ConvShape::forward(1, 256, 256, 128, 128, 3, 1, Pad::Symmetric),
            ConvShape::forward(2, 64, 64, 256, 256, 3, 1, Pad::Symmetric),
            ConvShape::forward(1, 32, 32, 512, 512, 3, 1, Pad::Symmetric),
            ConvShape::forward(3, 16, 16, 128, 96, 3, 1, Pad::Symmetric),
            // One row tile.
            ConvShape::forward(1, 8, 16, 128, 128, 3, 1, Pad::Symmetric),
        ];
        for shape in &shapes {
            for precision in [Precision::Bf16, Precision::Fp16] {
                self.backward_sums_case(shape, precision, staged)?;
            }
        }
        Ok(())
    }

    fn backward_sums_case(
        &mut self,
        s: &ConvShape,
        precision: Precision,
        staged: bool,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (n, c) = (s.n, s.ncols);
        let desc = format!(
            "n{n} {}x{}, {}->{c}, {GROUPS} groups, {precision}",
            s.sh, s.sw, s.sc
        );
        let Some(planned) = plan_wgmma(s, gpu.sms(), precision) else {
            self.check_row(
                "GroupNorm backward sums: a wgmma launch planned".into(),
                desc,
                false,
            );
            return Ok(());
        };
        let (x_len, w_len, len) = (n * s.sh * s.sw * s.sc, 9 * c * s.sc, s.rows() * c);
        let (x, w) = (self.rand(x_len, -1.0, 1.0), self.rand(w_len, -0.05, 0.05));
        let bias = self.rand(c, -0.5, 0.5);
        let (xd, wd) = (self.up(&x)?, self.up(&w)?);
        let (xh, wh) = (
            self.half_copy(xd.ptr, x_len, precision)?,
            self.half_copy(wd.ptr, w_len, precision)?,
        );
        let bias = self.up(&bias)?;
        // The GroupNorm: its input over the output's elements, statistics [mean | rstd].
        let gx = self.rand(len, -2.0, 2.0);
        let mut stats = self.rand(n * GROUPS, -0.5, 0.5);
        stats.extend(self.rand(n * GROUPS, 0.5, 2.0));
        let (gamma, beta) = (self.rand(c, 0.5, 1.5), self.rand(c, -0.5, 0.5));
        let gxd = self.up(&gx)?;
        let gxh = self.half_copy(gxd.ptr, len, precision)?;
        let gx16 = super::unpack_half(&gxh.download(st)?, len, precision);
        let (statsd, gammad, betad) = (self.up(&stats)?, self.up(&gamma)?, self.up(&beta)?);
        let base = ConvPtrs {
            x: xh.ptr,
            w: wh.ptr,
            bias: bias.ptr,
            ..ConvPtrs::default()
        };
        for (tile, _) in WgmmaTile::ALL {
            for tma in [false, true] {
                if (tma && !tma_tried(s)) || (staged && !tma) {
                    continue;
                }
                let lean = ConvLaunch {
                    splits: 1,
                    k_per_split: s.k().next_multiple_of(64),
                    row_epilogue: true,
                    lean_loads: true,
                    tma_loads: tma,
                    ..planned
                };
                let Some(l) = on_tile(lean, tile) else {
                    continue;
                };
                let Some(chunks) = gn_partial_fits(s, &l) else {
                    continue;
                };
                let (want, _) = self.conv_output(s, &l, base, 1.0, len)?;
                let l = ConvLaunch {
                    staged_epilogue: staged,
                    ..l
                };
                for (x16, silu) in [(false, true), (true, true), (false, false)] {
                    let partial = self.guarded_partial(n, chunks, c)?;
                    let y = self.zeros(len)?;
                    let ptrs = ConvPtrs {
                        y: y.ptr,
                        gn_partial: partial.ptr,
                        gn_backward: Some(NormBackwardSums {
                            x: if x16 { gxh.ptr } else { gxd.ptr },
                            x_half: x16.then_some(precision),
                            stats: statsd.ptr,
                            gamma: gammad.ptr,
                            beta: betad.ptr,
                            groups: GROUPS,
                            silu,
                        }),
                        ..base
                    };
                    let ms =
                        self.timed(|| Ok(()), || gpu.kernels.conv(st, s, &l, ptrs, 1.0, false))?;
                    let op = format!(
                        "conv [{}] GroupNorm backward sums ({} input{})",
                        wgmma_path(&l),
                        if x16 { "16-bit" } else { "fp32" },
                        if silu { ", SiLU" } else { "" }
                    );
                    self.row_within(
                        format!("{op}: output vs without"),
                        desc.clone(),
                        &y.download(st)?,
                        &want,
                        ms,
                        0.0,
                    );
                    let xs = if x16 { &gx16 } else { &gx };
                    let expect =
                        bwd_partial_sums(&want, xs, &stats, &gamma, &beta, n, c, chunks, silu);
                    self.partial_sums_row(
                        format!("{op} vs the host's over the output"),
                        format!("{desc}, {chunks} chunks an image"),
                        &partial,
                        &expect,
                        ms,
                        if silu { 1e-6 } else { 1e-12 },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The celebahq architecture (random weights) at 64x64 x 2 and 256x256 x 1, in bf16 and
    /// fp16, with the GroupNorm backward sums from the input gradients (where the device has
    /// wgmma, with what they need, [`CudaUnet::set_gn_backward_sums`]): a DPS step's launches
    /// fewer than without, its forward + VJP against the fp32 CPU results within the network
    /// tolerances (the VJP 2e-2), alone and with the 16-bit concatenations of the recording
    /// forward, and at batch 2, planned per image, image 0 the same to the bit in the batch
    /// and alone.
    pub(super) fn backward_sums_unets(&mut self, ordinal: usize) -> Result<()> {
        self.for_candidate_networks(ordinal, true, |t, net, precision, gpu| {
            let label = format!("celebahq {precision}");
            let what = "GroupNorm backward sums from the input gradients";
            let op = format!("{label} forward + vjp, {what}");
            t.fewer_launches_row(gpu, net, true, &op, CudaUnet::set_gn_backward_sums)?;
            gpu.set_half_gn_inputs_recording(false);
            t.cpu_network_rows(gpu, net, &label, what)?;
            gpu.set_half_gn_inputs_recording(true);
            t.cpu_network_rows(
                gpu,
                net,
                &label,
                &format!("{what}, 16-bit concatenations recorded"),
            )?;
            gpu.set_half_gn_inputs_recording(false);
            if net.n > 1 {
                t.batch_invariance_rows(gpu, &net.io(), &format!("{label}, {what},"))?;
            }
            Ok(())
        })
    }
}

/// `gn_bwd_partial`'s sums per (image, chunk, column) over `dy` (`[n, hw, c]`, `chunks` equal
/// chunks of pixels an image), with the GroupNorm input `x`, statistics `[mean | rstd]` (n x
/// GROUPS each), scale and shift: g and g * xhat in f32 as the kernels form them, summed in
/// f64, the pair interleaved.
#[allow(clippy::too_many_arguments)]
fn bwd_partial_sums(
    dy: &[f32],
    x: &[f32],
    stats: &[f32],
    gamma: &[f32],
    beta: &[f32],
    n: usize,
    c: usize,
    chunks: usize,
    silu: bool,
) -> Vec<f64> {
    let hw = dy.len() / (n * c);
    let rows = hw / chunks;
    let mut out = vec![0.0f64; 2 * n * chunks * c];
    for (m, (drow, xrow)) in dy.chunks_exact(c).zip(x.chunks_exact(c)).enumerate() {
        let img = m / hw;
        let first = m / rows * c;
        for ch in 0..c {
            let gi = img * GROUPS + ch / (c / GROUPS);
            let (mean, rstd) = (stats[gi], stats[n * GROUPS + gi]);
            let xhat = (xrow[ch] - mean) * rstd;
            let mut g = drow[ch];
            if silu {
                // silu_grad_f's `1 + z (1 - s)`, which nvcc contracts to one fma.
                let z = xhat.mul_add(gamma[ch], beta[ch]);
                let s = 1.0 / (1.0 + (-z).exp());
                g *= s * z.mul_add(1.0 - s, 1.0);
            }
            g *= gamma[ch];
            out[2 * (first + ch)] += f64::from(g);
            out[2 * (first + ch) + 1] += f64::from(g * xhat);
        }
    }
    out
}
