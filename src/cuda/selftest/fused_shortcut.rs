//! A residual block's 1x1 shortcut fused into its second convolution (the `_sc` wgmma kernels,
//! `INVDIFF_SHORTCUT_FUSED`): every form against the two launches it replaces, and whole
//! networks with it against the CPU. A group of its own, run last: a candidate's kernel that
//! faults ends no other check.

use super::conv_variants::{wgmma_path, WGMMA_VS_MMA};
use super::networks::{LAUNCHES, NETWORK_TOLERANCE};
use super::Tester;
use crate::cuda::kernels::{
    on_tile, plan_wgmma, tma_tried, ConvLaunch, ConvPtrs, ConvShape, WgmmaTile, WGMMA_SLICE,
};
use crate::cuda::precision::Precision;
use crate::cuda::unet::CudaUnet;
use crate::cuda::weights::DevConv;
use crate::model::graph::Pad;
use crate::Result;

/// One check: `n` images of `h x w`, the convolution `c -> cout` (3x3), the shortcut
/// `c2 -> cout` (1x1).
struct Case {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    c2: usize,
    cout: usize,
}

impl Tester<'_> {
    /// On a device with wgmma, in bf16 and fp16, for shapes of the celebahq network's blocks
    /// and awkward ones (a partial column tile, partial row tiles, one slice a tap): the
    /// unfused pair as the program runs it (the shortcut's launch into a buffer, then the
    /// convolution's with that buffer as its residual) is the reference. Each fused form, lean
    /// and TMA loaders on each tile, unsplit, at the planned split and at a split whose parts
    /// start inside the shortcut's K, with a time embedding and a divisor in the epilogue, must
    /// be within [`WGMMA_VS_MMA`] of it (the same products, the fp32 sums in another order),
    /// and the forms of one split the same to the bit; the unsplit lean forms also write their
    /// output's GroupNorm sums. With `staged` (the staged-epilogue group), only each unsplit
    /// TMA form, staged ([`ConvLaunch::staged_epilogue`]) against itself without, to the bit,
    /// with its GroupNorm sums.
    pub(super) fn fused_shortcuts(&mut self, staged: bool) -> Result<()> {
        if !self.gpu.kernels.has_wgmma() {
            return Ok(());
        }
        let cases = [
            // celebahq: the 8x8 and 64x64 up blocks at batch 1, the 256x256 one.
            Case {
                n: 1,
                h: 8,
                w: 8,
                c: 512,
                c2: 1024,
                cout: 512,
            },
            Case {
                n: 2,
                h: 64,
                w: 64,
                c: 256,
                c2: 384,
                cout: 256,
            },
            Case {
                n: 1,
                h: 256,
                w: 256,
                c: 128,
                c2: 256,
                cout: 128,
            },
            // 160 columns (a partial second column tile), three slices of shortcut.
            Case {
                n: 1,
                h: 16,
                w: 16,
                c: 128,
                c2: 192,
                cout: 160,
            },
            // 720 rows (partial row tiles), one slice a tap.
            Case {
                n: 3,
                h: 12,
                w: 20,
                c: 64,
                c2: 128,
                cout: 128,
            },
        ];
        for case in cases {
            for precision in [Precision::Bf16, Precision::Fp16] {
                self.fused_shortcut_case(&case, precision, staged)?;
            }
        }
        Ok(())
    }

    fn fused_shortcut_case(
        &mut self,
        case: &Case,
        precision: Precision,
        staged: bool,
    ) -> Result<()> {
        let Case {
            n,
            h,
            w,
            c,
            c2,
            cout,
        } = *case;
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let desc = format!("{n}x{h}x{w}, {c}->{cout} + 1x1 {c2}->{cout}, {precision}");
        let (x, x2) = (
            self.rand(n * h * w * c, -1.0, 1.0),
            self.rand(n * h * w * c2, -1.0, 1.0),
        );
        let conv_w = self.rand(cout * c * 9, -0.05, 0.05);
        let short_w = self.rand(cout * c2, -0.05, 0.05);
        let (b, b2) = (self.rand(cout, -0.5, 0.5), self.rand(cout, -0.5, 0.5));
        let temb = self.rand(n * cout, -0.5, 0.5);
        let out_div = 2.0;
        let mut conv = DevConv::upload(gpu, &conv_w, &b, cout, c, 3, precision)?;
        let mut short = DevConv::upload(gpu, &short_w, &b2, cout, c2, 1, precision)?;
        conv.ensure_backward_half(gpu)?;
        short.ensure_backward_half(gpu)?;
        let (xd, x2d) = (self.up(&x)?, self.up(&x2)?);
        let (xh, x2h) = (
            self.half_copy(xd.ptr, x.len(), precision)?,
            self.half_copy(x2d.ptr, x2.len(), precision)?,
        );
        let summed: Vec<f32> = b.iter().zip(&b2).map(|(a, b)| a + b).collect();
        let (summed, tembd) = (self.up(&summed)?, self.up(&temb)?);
        let len = n * h * w * cout;
        // The launches the program would plan: lean, with TMA where the shape takes it (unless
        // INVDIFF_WGMMA_TMA=0 keeps the TMA kernels out of the checks).
        let lean = |s: &ConvShape| -> Option<ConvLaunch> {
            plan_wgmma(s, gpu.sms(), precision).map(|l| ConvLaunch {
                row_epilogue: true,
                lean_loads: true,
                tma_loads: tma_tried(s),
                ..l
            })
        };

        // The reference: the shortcut's launch, then the convolution reading it as residual.
        let main = ConvShape::forward(n, h, w, c, cout, 3, 1, Pad::Symmetric);
        let fused = main.with_shortcut(c2).expect("a shape the kernels fuse");
        let one = fused.shortcut().expect("its shortcut");
        let (Some(lp), Some(lc), Some(lf)) = (lean(&one), lean(&main), lean(&fused)) else {
            let op = "conv3x3 + fused 1x1 shortcut: a wgmma launch planned".into();
            self.check_row(op, desc, false);
            return Ok(());
        };
        let ws = self.zeros(
            [lp.workspace_len(&one), lc.workspace_len(&main)]
                .into_iter()
                .max()
                .unwrap_or(0),
        )?;
        let ys = self.zeros(len)?;
        let y = self.zeros(len)?;
        let pair = || -> Result<()> {
            let shortcut = ConvPtrs {
                x: x2h.ptr,
                w: short.weights_for(lp.kernel, true)?,
                y: ys.ptr,
                bias: short.bias.ptr,
                ws: ws.ptr,
                ..ConvPtrs::default()
            };
            gpu.kernels.conv(st, &one, &lp, shortcut, 1.0, false)?;
            let ptrs = ConvPtrs {
                x: xh.ptr,
                w: conv.weights_for(lc.kernel, true)?,
                y: y.ptr,
                bias: conv.bias.ptr,
                temb: tembd.ptr,
                res: ys.ptr,
                ws: ws.ptr,
                ..ConvPtrs::default()
            };
            gpu.kernels.conv(st, &main, &lc, ptrs, out_div, false)
        };
        // (Staged, each form is checked against itself unstaged instead.)
        let (want, pair_ms) = if staged {
            (Vec::new(), 0.0)
        } else {
            let ms = self.timed(|| Ok(()), pair)?;
            (y.download(st)?, ms)
        };

        // Every fused form: each split (unsplit, planned, parts of four slices, so that some
        // start inside the shortcut's K), each tile, lean and (where it fits) TMA loaders.
        let slices = fused.k().div_ceil(WGMMA_SLICE);
        let mut pers = [slices, lf.k_per_split / WGMMA_SLICE, 4]
            .map(|k| k * WGMMA_SLICE)
            .to_vec();
        pers.sort_unstable();
        pers.dedup();
        if staged {
            pers = vec![slices * WGMMA_SLICE];
        }
        let label = "conv3x3 + fused 1x1 shortcut forward (temb, /2)";
        for per in pers {
            let split = ConvLaunch {
                splits: fused.k().div_ceil(per),
                k_per_split: per,
                tma_loads: false,
                ..lf
            };
            let ws = self.zeros(split.workspace_len(&fused))?;
            let ptrs = ConvPtrs {
                x: xh.ptr,
                w: conv.weights_for(lf.kernel, true)?,
                bias: summed.ptr,
                temb: tembd.ptr,
                ws: ws.ptr,
                x2: x2h.ptr,
                w2: short.weights_for(lf.kernel, true)?,
                ..ConvPtrs::default()
            };
            let mut first: Option<(Vec<f32>, String)> = None;
            for (tile, _) in WgmmaTile::ALL {
                for tma in [false, true] {
                    if (tma && !tma_tried(&main)) || (staged && !tma) {
                        continue;
                    }
                    let Some(v) = on_tile(
                        ConvLaunch {
                            tma_loads: tma,
                            ..split
                        },
                        tile,
                    ) else {
                        continue;
                    };
                    let (got, ms) = self.conv_output(&fused, &v, ptrs, out_div, len)?;
                    let path = wgmma_path(&v);
                    if staged {
                        self.staged_row(&fused, v, ptrs, out_div, &got, label, &desc)?;
                        continue;
                    }
                    self.row_within(
                        format!("{label} [{path}] vs the shortcut's launch and then this one's"),
                        format!("{desc}, the pair {pair_ms:.3} ms"),
                        &got,
                        &want,
                        ms,
                        WGMMA_VS_MMA,
                    );
                    match &first {
                        None => first = Some((got.clone(), path)),
                        Some((same, by)) => self.row_within(
                            format!("{label} [{path}] vs [{by}]"),
                            desc.clone(),
                            &got,
                            same,
                            0.0,
                            0.0,
                        ),
                    }
                    self.gn_partial_row(&fused, v, ptrs, out_div, &got, label, &desc)?;
                }
            }
        }
        Ok(())
    }
}

impl Tester<'_> {
    /// The celebahq architecture (random weights) at 64x64 x 2, where every level runs, and at
    /// the full 256x256 x 1, in bf16 and fp16 with the 1x1 shortcuts fused (where the device
    /// has wgmma): the forward, the recording forward and its VJP against the fp32 CPU
    /// results within the network tolerances (1e-2 and 2e-2), and at batch 2, planned per
    /// image, image 0 the same to the bit in the batch and alone.
    pub(super) fn fused_shortcut_unets(&mut self, ordinal: usize) -> Result<()> {
        self.for_candidate_networks(ordinal, true, |t, net, precision, gpu| {
            let label = format!("celebahq {precision}");
            let what = "fused shortcuts";
            // The rows below check fused programs only if the switches leave the kernels that
            // fuse on: fewer launches, or a failed row.
            let op = format!("{label} forward, {what}");
            t.fewer_row(gpu, net, false, &op, CudaUnet::set_shortcut_fused, LAUNCHES)?;
            t.cpu_network_rows(gpu, net, &label, what)?;
            let (io, want) = (net.io(), net.want());
            t.recording_rows(gpu, &io, what, &label, want, NETWORK_TOLERANCE)?;
            if net.n > 1 {
                t.batch_invariance_rows(gpu, &io, &format!("{label}, {what},"))?;
            }
            Ok(())
        })
    }
}
