//! The other forms a tensor-core convolution launch can take (pipelines, epilogues, tiles, the
//! cycle probe), each against the plain launch's result.

use super::{SelftestRow, Tester};
use crate::cuda::kernels::{
    gn_partial_fits, on_tile, plan_wgmma, tma_tried, ConvKernel, ConvLaunch, ConvPtrs, ConvShape,
    DPtr, ProbeCounters, WgmmaTile, WGMMA_FORMS, WGMMA_PROBE_PHASES, WGMMA_SLICE,
};
use crate::cuda::precision::Precision;
use crate::cuda::weights::DevBuf;
use crate::Result;

/// Relative L2 allowed between the wgmma and mma.sync kernels: the same bf16/fp16 products in
/// fp32, added in a different order.
pub(super) const WGMMA_VS_MMA: f64 = 1e-5;

/// Every other form of wgmma launch `p` of `shape` ([`on_tile`]), each tile with each
/// epilogue, and the row epilogue also with the lean loaders and, where [`tma_tried`], the TMA
/// loads: the same sums in the same order as `p`.
pub(super) fn wgmma_forms(p: ConvLaunch, shape: &ConvShape) -> Vec<ConvLaunch> {
    let tma = tma_tried(shape);
    let mut out = Vec::new();
    for (tile, _) in WgmmaTile::ALL {
        let Some(v) = on_tile(p, tile) else {
            continue;
        };
        for (row_epilogue, lean_loads, tma_loads) in WGMMA_FORMS {
            if tma_loads && !tma {
                continue;
            }
            let v = ConvLaunch {
                row_epilogue,
                lean_loads,
                tma_loads,
                ..v
            };
            if v != p {
                out.push(v);
            }
        }
        // The epilogue's reads prefetched, on the last (leanest) form, where unsplit.
        if let Some(&last) = out.last().filter(|l| l.lean_loads && l.splits == 1) {
            out.push(ConvLaunch {
                prefetch: true,
                ..last
            });
        }
    }
    out
}

pub(super) fn wgmma_path(p: &ConvLaunch) -> String {
    let mut s = String::from(p.tile.describe());
    if p.splits > 1 {
        s += &format!(", {} splits", p.splits);
    }
    if p.row_epilogue {
        s += ", row epilogue";
    }
    s += &p.loads_described();
    s
}

/// What [`Tester::guarded_partial`] fills the words past the partial sums with: no launch
/// writes there.
const PARTIAL_GUARD: f32 = -7.25;

impl Tester<'_> {
    /// wgmma launch `wp` of `shape` through its cycle-counting kernel (`ptrs` as for `want`,
    /// the plain kernel's output): the same outputs to the bit, and counters that add up (two
    /// warpgroups per block, four in a tall one, each with its split's K slices).
    pub(super) fn probe_row(
        &mut self,
        shape: &ConvShape,
        wp: ConvLaunch,
        ptrs: ConvPtrs,
        want: &[f32],
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let y = self.zeros(want.len())?;
        let ws = self.zeros(wp.workspace_len(shape))?;
        let p = ConvPtrs {
            y: y.ptr,
            ws: ws.ptr,
            ..ptrs
        };
        let counters = ProbeCounters::new(st)?;
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv_probe(st, shape, &wp, p, &counters),
        )?;
        let c = counters.read(st)?;
        // Two warpgroups per block, four in a tall one.
        let per_block = wp.tile.rows() as u64 / 64;
        let tiles = (shape.rows().div_ceil(wp.tile.rows()) * shape.ncols.div_ceil(128)) as u64;
        let slices = shape.k().div_ceil(WGMMA_SLICE) as u64;
        let warpgroups = per_block * tiles * wp.splits as u64;
        let phases = WGMMA_PROBE_PHASES.len();
        // `timed` runs the launch twice (warm-up, then timed): whole multiples of one launch's
        // counts. The splits of a tile share its slices.
        let runs = c[phases] / warpgroups.max(1);
        let counted = runs > 0
            && c[phases] == runs * warpgroups
            && c[phases + 1] == runs * per_block * tiles * slices
            && c[..phases].iter().all(|&v| v > 0);
        let op = format!("{label} [{}] cycle probe vs plain", wgmma_path(&wp));
        if counted {
            self.row_within(op, desc.into(), &y.download(st)?, want, ms, 0.0);
        } else {
            self.rows.push(SelftestRow {
                op,
                shape: format!(
                    "{desc}: counters {c:?} for {warpgroups} warpgroups, {slices} slices"
                ),
                rel_l2: f64::NAN,
                gpu_ms: ms,
                tolerance: 0.0,
            });
        }
        Ok(())
    }

    /// Unsplit lean or TMA wgmma launch `wp` of `shape` writing the GroupNorm partial sums of
    /// its output as well ([`ConvPtrs::gn_partial`]), where it can ([`gn_partial_fits`]):
    /// the output the same to the bit as `want` (the same launch without them), and the sums
    /// those of `want` per tile and column, in f64 (another order of the same additions).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gn_partial_row(
        &mut self,
        shape: &ConvShape,
        wp: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        want: &[f32],
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let Some(chunks) = gn_partial_fits(shape, &wp) else {
            return Ok(());
        };
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (n, c) = (shape.n, shape.ncols);
        let y = self.zeros(want.len())?;
        let partial = self.guarded_partial(n, chunks, c)?;
        let p = ConvPtrs {
            y: y.ptr,
            gn_partial: partial.ptr,
            ..ptrs
        };
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv(st, shape, &wp, p, out_div, false),
        )?;
        let op = format!("{label} [{}] GroupNorm sums", wgmma_path(&wp));
        self.row_within(
            format!("{op}: output vs without"),
            desc.into(),
            &y.download(st)?,
            want,
            ms,
            0.0,
        );
        let rows = shape.mh * shape.mw / chunks;
        let mut expect = vec![0.0f64; 2 * n * chunks * c];
        for (m, row) in want.chunks_exact(c).enumerate() {
            // Image m / (chunks * rows), chunk (m / rows) % chunks: pair m / rows * c + col.
            let first = m / rows * c;
            for (col, &v) in row.iter().enumerate() {
                expect[2 * (first + col)] += f64::from(v);
                expect[2 * (first + col) + 1] += f64::from(v) * f64::from(v);
            }
        }
        self.partial_sums_row(
            format!("{op} vs the host's over the output"),
            format!("{desc}, {chunks} chunks of {rows} rows an image"),
            &partial,
            &expect,
            ms,
            1e-12,
        )
    }

    /// Room for the partial sums of `n` images of `chunks` chunks of `c` channels (two f64, so
    /// four f32 slots, each), zeroed, then one image's more filled with [`PARTIAL_GUARD`]: where
    /// a block past the last image would write.
    fn guarded_partial(&self, n: usize, chunks: usize, c: usize) -> Result<DevBuf> {
        let mut words = vec![0.0f32; 4 * (n + 1) * chunks * c];
        words[4 * n * chunks * c..].fill(PARTIAL_GUARD);
        self.up(&words)
    }

    /// A row holding the f64 partial sums at the start of `partial`
    /// ([`Self::guarded_partial`]) to `expect` within `tolerance` (relative L2 in f64); a launch
    /// that wrote past them (a guard word changed) fails it (NaN).
    fn partial_sums_row(
        &mut self,
        op: String,
        shape: String,
        partial: &DevBuf,
        expect: &[f64],
        ms: f64,
        tolerance: f64,
    ) -> Result<()> {
        let words = partial.download(&self.gpu.stream)?;
        let (sums, guard) = words.split_at((2 * expect.len()).min(words.len()));
        let got: Vec<f64> = sums
            .chunks_exact(2)
            .map(|w| f64::from_bits(u64::from(w[0].to_bits()) | u64::from(w[1].to_bits()) << 32))
            .collect();
        let diff: f64 = got.iter().zip(expect).map(|(a, b)| (a - b) * (a - b)).sum();
        let norm: f64 = expect.iter().map(|b| b * b).sum();
        let intact = got.len() == expect.len()
            && !guard.is_empty()
            && guard.iter().all(|w| w.to_bits() == PARTIAL_GUARD.to_bits());
        self.rows.push(SelftestRow {
            op,
            shape: if intact {
                shape
            } else {
                format!("{shape}; wrote past its sums")
            },
            rel_l2: (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
                + if intact { 0.0 } else { f64::NAN },
            gpu_ms: ms,
            tolerance,
        });
        Ok(())
    }

    /// Where the device has Hopper's wgmma kernel and `shape` suits it at `precision`: its
    /// launch, and a 16-bit copy of the `len` fp32 values at `x` for it to read.
    pub(super) fn wgmma_variant(
        &self,
        shape: &ConvShape,
        precision: Precision,
        x: DPtr,
        len: usize,
    ) -> Result<Option<(ConvLaunch, DevBuf)>> {
        let plan = plan_wgmma(shape, self.gpu.sms(), precision);
        let Some(plan) = plan.filter(|_| self.gpu.kernels.has_wgmma()) else {
            return Ok(None);
        };
        Ok(Some((plan, self.half_copy(x, len, precision)?)))
    }

    /// For a two-stage tensor-core launch `plan` reading `len` fp32 values at `x`: the deep
    /// launch of the same problem on the same input (None: read `x`), and in bf16/fp16 the one
    /// reading a 16-bit copy of it, made here; each with either epilogue. Nothing for other
    /// kernels.
    pub(super) fn deep_variants(
        &self,
        plan: ConvLaunch,
        x: DPtr,
        len: usize,
    ) -> Result<Vec<(ConvLaunch, Option<DevBuf>)>> {
        let ConvKernel::Tensor(precision) = plan.kernel else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        // Each pipeline with both epilogues (the row epilogue computes the same, in the same
        // order).
        for row_epilogue in [false, true] {
            let deep = ConvLaunch {
                deep: true,
                row_epilogue,
                ..plan
            };
            out.push((deep, None));
            if precision != Precision::Tf32 {
                let copy = self.half_copy(x, len, precision)?;
                let half_input = ConvLaunch {
                    half_input: true,
                    ..deep
                };
                out.push((half_input, Some(copy)));
            }
        }
        Ok(out)
    }
}
