//! The other forms a tensor-core convolution launch can take (pipelines, epilogues, tiles,
//! clusters, the fused GroupNorm work, the weight prefetch, the cycle probe), each against
//! the plain launch's result.

use super::{SelftestRow, Tester};
use crate::cuda::kernels::{
    gn_partial_fits, on_tile, plan_norm, plan_wgmma, ConvKernel, ConvLaunch, ConvPtrs, ConvShape,
    DPtr, NormDims, NormInput, ProbeCounters, WgmmaTile, WGMMA_PROBE_PHASES, WGMMA_SLICE,
};
use crate::cuda::precision::Precision;
use crate::cuda::weights::DevBuf;
use crate::Result;

/// Relative L2 allowed between the wgmma and mma.sync kernels: the same bf16/fp16 products in
/// fp32, added in a different order.
pub(super) const WGMMA_VS_MMA: f64 = 1e-5;

/// Every other form of wgmma launch `p` of `shape` ([`on_tile`]), each tile with each
/// epilogue and with the weight prefetch, and how far it may be from `p`'s result: 0 (the same
/// sums in the same order), or [`WGMMA_VS_MMA`] for the halo tiles (channel slices outer),
/// where they take the launch.
pub(super) fn wgmma_forms(p: ConvLaunch, shape: &ConvShape) -> Vec<(ConvLaunch, f64)> {
    let mut out = Vec::new();
    for (tile, _) in WgmmaTile::ALL {
        let Some(v) = on_tile(p, shape, tile) else {
            continue;
        };
        let tolerance = if tile.is_halo() { WGMMA_VS_MMA } else { 0.0 };
        for (row_epilogue, prefetch_weights) in [(false, false), (true, false), (false, true)] {
            let v = ConvLaunch {
                row_epilogue,
                prefetch_weights,
                ..v
            };
            if v != p {
                out.push((v, tolerance));
            }
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
    if p.prefetch_weights {
        s += ", weight prefetch";
    }
    s
}

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
        let slices = shape.k().div_ceil(wp.tile.k_step()) as u64;
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

    /// Halo launch `halo` of `shape` applying a GroupNorm (+SiLU) to the fp32 input at `x`
    /// (`len` values) as it loads it, against the same launch reading that GroupNorm's 16-bit
    /// output: the same bits (the same fma, SiLU and rounding). `ptrs` as for the plain
    /// launch; the output has `out_len` values.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn halo_norm_row(
        &mut self,
        shape: &ConvShape,
        halo: ConvLaunch,
        ptrs: ConvPtrs,
        x: DPtr,
        len: usize,
        out_div: f32,
        out_len: usize,
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let ConvKernel::Tensor(precision) = halo.kernel else {
            return Ok(());
        };
        let (c, groups) = (shape.sc, 32);
        let hw = shape.sh * shape.sw;
        let split = plan_norm(shape.n, hw, c, groups, gpu.sms(), 0);
        let nd = NormDims {
            n: shape.n,
            hw,
            c,
            groups,
            split,
        };
        let (gamma, beta) = (self.rand(c, 0.5, 1.5), self.rand(c, -0.5, 0.5));
        let (gamma, beta) = (self.up(&gamma)?, self.up(&beta)?);
        let y16 = self.zeros(len.div_ceil(2))?;
        let partial = self.zeros(split.partial_len(shape.n, c))?;
        let stats = self.zeros(2 * shape.n * groups)?;
        let affine = self.zeros(2 * shape.n * c)?;
        gpu.kernels.group_norm(
            st,
            nd,
            x,
            gamma.ptr,
            beta.ptr,
            y16.ptr,
            partial.ptr,
            stats.ptr,
            affine.ptr,
            1e-6,
            true,
            Some(precision),
        )?;
        let mut outs = Vec::new();
        let mut ms = 0.0;
        let fused = ConvLaunch {
            norm_input: NormInput::AffineSilu,
            ..halo
        };
        for (plan, p) in [
            (halo, ConvPtrs { x: y16.ptr, ..ptrs }),
            (
                fused,
                ConvPtrs {
                    x,
                    norm: affine.ptr,
                    ..ptrs
                },
            ),
        ] {
            let (out, t) = self.conv_output(shape, &plan, p, out_div, out_len)?;
            outs.push(out);
            ms = t;
        }
        self.row_within(
            format!(
                "{label} [{}, GroupNorm+SiLU in the loads] vs on its output",
                wgmma_path(&halo)
            ),
            desc.into(),
            &outs[1],
            &outs[0],
            ms,
            0.0,
        );
        Ok(())
    }

    /// Halo launch `halo` of `shape` writing the GroupNorm partial sums of its output
    /// (ConvPtrs::gn_partial): its output held to 0 against the launch without them, and the
    /// sums (f64, one chunk per tile) against the host's over that output. `ptrs` as for the
    /// plain launch; the output has `out_len` values.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn halo_stats_row(
        &mut self,
        shape: &ConvShape,
        halo: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        out_len: usize,
        label: &str,
        desc: &str,
    ) -> Result<()> {
        if !gn_partial_fits(shape, &halo) {
            return Ok(());
        }
        let st = &self.gpu.stream;
        let (rows, c) = (halo.tile.rows(), shape.ncols);
        let per = shape.mh * shape.mw;
        let chunks = per / rows;
        let partial = self.zeros(4 * shape.n * chunks * c)?;
        let mut outs = Vec::new();
        let mut ms = 0.0;
        for gn_partial in [0, partial.ptr] {
            let p = ConvPtrs { gn_partial, ..ptrs };
            let (out, t) = self.conv_output(shape, &halo, p, out_div, out_len)?;
            outs.push(out);
            ms = t;
        }
        let path = format!("{}, GroupNorm sums in the epilogue", wgmma_path(&halo));
        self.row_within(
            format!("{label} [{path}] output vs without"),
            desc.into(),
            &outs[1],
            &outs[0],
            ms,
            0.0,
        );
        // The device's f64 pairs, and the host's sums over the same rows, both as f32.
        let words = partial.download(st)?;
        let got: Vec<f32> = words
            .chunks_exact(2)
            .map(|w| {
                f64::from_bits(u64::from(w[0].to_bits()) | u64::from(w[1].to_bits()) << 32) as f32
            })
            .collect();
        let y = &outs[1];
        let mut want = vec![0f32; got.len()];
        for img in 0..shape.n {
            for chunk in 0..chunks {
                for ch in 0..c {
                    let (mut s, mut q) = (0f64, 0f64);
                    for r in 0..rows {
                        let v = f64::from(y[(img * per + chunk * rows + r) * c + ch]);
                        s += v;
                        q += v * v;
                    }
                    let at = ((img * chunks + chunk) * c + ch) * 2;
                    want[at] = s as f32;
                    want[at + 1] = q as f32;
                }
            }
        }
        self.row_within(
            format!("{label} [{path}] sums vs the host's"),
            desc.into(),
            &got,
            &want,
            ms,
            1e-6,
        );
        Ok(())
    }

    /// wgmma launches `wp` of `shape` split 2, 3 and 8 ways (as far as K allows), each reduced
    /// through the workspace and within a thread-block cluster: held to 0 against each other
    /// (the same sums in the same order); the same for the halo tile where it takes `shape`
    /// (split by channel slices). `ptrs` hold the 16-bit input and K-major weights; the output
    /// has `len` values.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cluster_rows(
        &mut self,
        shape: &ConvShape,
        wp: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        len: usize,
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let k = shape.k();
        let slices = k.div_ceil(WGMMA_SLICE);
        let mut tried = Vec::new();
        for want in [2, 3, 8] {
            let per = slices.div_ceil(want) * WGMMA_SLICE;
            let plain = ConvLaunch {
                splits: k.div_ceil(per),
                k_per_split: per,
                cluster: false,
                ..wp
            };
            for tile in [WgmmaTile::Plain, WgmmaTile::Halo] {
                let Some(via_workspace) = on_tile(plain, shape, tile) else {
                    continue;
                };
                let splits = via_workspace.splits;
                if splits < 2 || tried.contains(&(tile, splits)) {
                    continue;
                }
                tried.push((tile, splits));
                let in_cluster = ConvLaunch {
                    cluster: true,
                    ..via_workspace
                };
                let op = format!(
                    "{label} [{}] cluster vs workspace",
                    wgmma_path(&via_workspace)
                );
                let run = |t: &Self| -> Result<(Vec<Vec<f32>>, f64)> {
                    let ws = t.zeros(via_workspace.workspace_len(shape))?;
                    let p = ConvPtrs { ws: ws.ptr, ..ptrs };
                    let (by_workspace, _) =
                        t.conv_output(shape, &via_workspace, p, out_div, len)?;
                    let (by_cluster, ms) = t.conv_output(shape, &in_cluster, p, out_div, len)?;
                    Ok((vec![by_workspace, by_cluster], ms))
                };
                // A cluster launch the device refuses is this row's failure, not the group's
                // end.
                match run(self) {
                    Ok((outs, ms)) => self.row_within(op, desc.into(), &outs[1], &outs[0], ms, 0.0),
                    Err(e) => self.rows.push(SelftestRow {
                        op,
                        shape: format!("{desc}: {e}"),
                        rel_l2: f64::NAN,
                        gpu_ms: f64::NAN,
                        tolerance: 0.0,
                    }),
                }
            }
        }
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
        // order), and with the weight prefetch (a hint: the same bits).
        for (row_epilogue, prefetch_weights) in [(false, false), (true, false), (false, true)] {
            let deep = ConvLaunch {
                deep: true,
                row_epilogue,
                prefetch_weights,
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
