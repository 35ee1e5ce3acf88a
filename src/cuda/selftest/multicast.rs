//! Weight slices multicast in clusters of two (the `_tma_mc` and `_tma_sc_mc` wgmma kernels,
//! `INVDIFF_WGMMA_MULTICAST`): launches against the same launch without, bit for bit, and whole
//! networks against the same network without. A group of its own, run last: a candidate's
//! kernel that faults ends no other check.

use super::conv_variants::wgmma_path;
use super::Tester;
use crate::cuda::kernels::{plan_wgmma, tma_tried, ConvLaunch, ConvPtrs, ConvShape, DPtr};
use crate::cuda::precision::Precision;
use crate::cuda::profile::StepTime;
use crate::cuda::weights::DevBuf;
use crate::model::graph::Pad;
use crate::Result;

impl Tester<'_> {
    /// On a device with wgmma, in bf16 and fp16: TMA launches on the plain tile at celebahq's
    /// shapes and awkward ones (an odd number of row tiles, so a padding block; a single row
    /// tile; a partial column tile, whose second block's half of the weights lies wholly past
    /// the columns; rows in partial tiles; stride-2 input gradients, one launch per parity
    /// class; with a fused 1x1 shortcut, the celebahq blocks' and awkward ones), each unsplit,
    /// at its planned split of K and in splits of five slices (so that split launches refill
    /// their stages too, the last split shorter, and some start inside a fused shortcut's K),
    /// with a time embedding, a residual and a divisor in the epilogue: multicast in clusters
    /// of two, the same output as without to the bit; where the launch writes GroupNorm sums,
    /// those checked against the host's as every launch's are. With `staged` (the
    /// staged-epilogue group), only the unsplit launches, multicast and staged
    /// ([`ConvLaunch::staged_epilogue`]) against multicast without, to the bit.
    pub(super) fn multicasts(&mut self, staged: bool) -> Result<()> {
        if !self.gpu.kernels.has_wgmma() {
            return Ok(());
        }
        let mut shapes = vec![
            ConvShape::forward(1, 256, 256, 128, 128, 3, 1, Pad::Symmetric),
            ConvShape::forward(1, 8, 8, 512, 512, 3, 1, Pad::Symmetric),
            ConvShape::forward(1, 24, 16, 128, 128, 3, 1, Pad::Symmetric),
            ConvShape::forward(2, 64, 64, 128, 160, 3, 1, Pad::Symmetric),
            ConvShape::forward(3, 12, 20, 64, 128, 3, 1, Pad::Symmetric),
            ConvShape::forward(2, 16, 16, 1024, 512, 1, 1, Pad::Symmetric),
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
        // Fused shortcuts (`_tma_sc_mc`): celebahq's 8x8 and 64x64 up blocks; 160 columns, so
        // the second column tile's second half of both weight slices lies past the columns; an
        // odd number of row tiles.
        for (n, h, w, c, cout, c2) in [
            (1, 8, 8, 512, 512, 1024),
            (2, 64, 64, 256, 256, 384),
            (1, 16, 16, 128, 160, 192),
            (1, 24, 16, 128, 128, 256),
        ] {
            let main = ConvShape::forward(n, h, w, c, cout, 3, 1, Pad::Symmetric);
            shapes.extend(main.with_shortcut(c2));
        }
        for shape in &shapes {
            for precision in [Precision::Bf16, Precision::Fp16] {
                self.multicast_case(shape, precision, staged)?;
            }
        }
        Ok(())
    }

    fn multicast_case(&mut self, s: &ConvShape, precision: Precision, staged: bool) -> Result<()> {
        let Some(TmaCase {
            desc,
            planned,
            ptrs,
            len,
            bufs: _bufs,
        }) = self.tma_case(s, precision, "multicast")?
        else {
            return Ok(());
        };
        let tma = ConvLaunch {
            row_epilogue: true,
            lean_loads: true,
            tma_loads: true,
            ..planned
        };
        let unsplit = ConvLaunch {
            splits: 1,
            k_per_split: s.k().next_multiple_of(64),
            ..tma
        };
        let slices = s.k().div_ceil(64);
        let fives = ConvLaunch {
            splits: slices.div_ceil(5),
            k_per_split: 5 * 64,
            ..tma
        };
        let mut plans = vec![unsplit];
        if tma.splits > 1 && !staged {
            plans.push(tma);
        }
        if slices > 5 && fives != tma && !staged {
            plans.push(fives);
        }
        for plain in plans {
            let ws = self.zeros(plain.workspace_len(s))?;
            let ptrs = ConvPtrs { ws: ws.ptr, ..ptrs };
            let multicast = ConvLaunch {
                multicast: true,
                ..plain
            };
            let label = "conv (temb, residual, /2)";
            if staged {
                let (got, _) = self.conv_output(s, &multicast, ptrs, 2.0, len)?;
                self.staged_row(s, multicast, ptrs, 2.0, &got, label, &desc)?;
                continue;
            }
            let (want, plain_ms) = self.conv_output(s, &plain, ptrs, 2.0, len)?;
            let (got, ms) = self.conv_output(s, &multicast, ptrs, 2.0, len)?;
            self.row_within(
                format!(
                    "{label} [{}] vs [{}]",
                    wgmma_path(&multicast),
                    wgmma_path(&plain)
                ),
                format!("{desc}, without {plain_ms:.3} ms"),
                &got,
                &want,
                ms,
                0.0,
            );
            self.gn_partial_row(s, multicast, ptrs, 2.0, &got, label, &desc)?;
        }
        Ok(())
    }

    /// A launch check's shape in words, its wgmma launch as planned where the selftest tries
    /// TMA on `s` (else `None`, and a failed row named after `what` where a launch should have
    /// been planned), and random operands for two forms of it to share: the 16-bit input and
    /// K-major weights of every tap block it names (and a fused shortcut's source and weights),
    /// a bias, a time embedding and a residual.
    pub(super) fn tma_case(
        &mut self,
        s: &ConvShape,
        precision: Precision,
        what: &str,
    ) -> Result<Option<TmaCase>> {
        let desc = format!(
            "n{} {}x{} -> {}x{}, {}->{} ({} taps, output stride {}){}, {precision}",
            s.n,
            s.sh,
            s.sw,
            s.mh,
            s.mw,
            s.sc,
            s.ncols,
            s.taps.len(),
            s.out_stride,
            match s.shortcut_sc {
                0 => String::new(),
                c2 => format!(" + fused 1x1 {c2}->{}", s.ncols),
            }
        );
        let Some(planned) = plan_wgmma(s, self.gpu.sms(), precision).filter(|_| tma_tried(s))
        else {
            if tma_tried(s) {
                self.check_row(format!("{what}: a wgmma launch planned"), desc, false);
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
        // A fused shortcut's source and K-major weights (`[ncols][c2]`).
        let (x2, w2) = match s.shortcut_sc {
            0 => (0, 0),
            c2 => (
                half(self, s.n * s.sh * s.sw * c2, -1.0, 1.0)?,
                half(self, s.ncols * c2, -0.05, 0.05)?,
            ),
        };
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
                x2,
                w2,
                ..ConvPtrs::default()
            },
            len,
            bufs,
        }))
    }

    /// The celebahq architecture (random weights) at 64x64 x 2 and 256x256 x 1, in bf16 and
    /// fp16, as configured (the switches applied) but for three choices: the 1x1 shortcuts
    /// unfused, then fused; and for each, multicast with the tall tiles on and multicast with
    /// them off (multicast where they were), each with its forward and forward + VJP the same
    /// to the bit as without multicast and with the tall tiles on (every launch sums the same
    /// products in the same order), once the program shows it multicasts (with the shortcuts
    /// fused, a fused launch among them).
    pub(super) fn multicast_unets(&mut self, ordinal: usize) -> Result<()> {
        self.for_candidate_networks(ordinal, false, |t, net, precision, gpu| {
            for fused in [false, true] {
                gpu.set_shortcut_fused(fused);
                let label = match fused {
                    false => format!("celebahq {precision}"),
                    true => format!("celebahq {precision}, fused shortcuts"),
                };
                gpu.set_multicast_and_tall(false, true);
                let want = Self::network_outputs(gpu, net)?;
                // With the shortcuts fused, a fused launch among those that multicast.
                let multicast = |s: &StepTime| {
                    s.variant.contains("multicast") && (!fused || s.kind.contains("shortcut"))
                };
                let has = (
                    if fused {
                        "fused launches that multicast"
                    } else {
                        "launches that multicast"
                    },
                    &multicast as &dyn Fn(&StepTime) -> bool,
                );
                for (tall, what) in [(true, "multicast"), (false, "multicast, no tall tiles")] {
                    gpu.set_multicast_and_tall(true, tall);
                    t.same_network_rows(gpu, net, &format!("{label}, {what}"), has, &want)?;
                }
            }
            Ok(())
        })
    }
}

/// A launch check's setup ([`Tester::tma_case`]): its description, planned launch, operands
/// (kept alive in `bufs`) and output length.
pub(super) struct TmaCase {
    pub desc: String,
    pub planned: ConvLaunch,
    pub ptrs: ConvPtrs,
    pub len: usize,
    pub bufs: Vec<DevBuf>,
}
