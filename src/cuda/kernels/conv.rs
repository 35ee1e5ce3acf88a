//! Launchers of the convolution kernels (kernels/conv.cu, conv_tc.cu, conv_wgmma.cu): the
//! addresses a launch is given ([`ConvPtrs`]) and the argument block they share, the
//! tensor-core kernel tables, and the checks before each launch.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, PushKernelArg};

use super::conv_plan::{
    direct_fits, few_in_mma_fits, gn_partial_fits, im2col_box, narrow_mma_fits, tc_slice,
    ConvKernel, ConvLaunch, ConvShape, WgmmaTile, DIRECT_MAX, NARROW_MMA_MAX_SC, TILE, WGMMA_SLICE,
};
use super::norm::ReductionNorm;
use super::{cfg, grid_dim, half_kind, i32_of, i64_of, need, tma, DPtr, Kernels, BLOCK};
use crate::cuda::device::cu;
use crate::cuda::precision::Precision;
use crate::{Error, Result};

/// ConvArgs of kernels/conv.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ConvArgs {
    x: DPtr,
    w: DPtr,
    y: DPtr,
    bias: DPtr,
    temb: DPtr,
    res: DPtr,
    ws: DPtr,
    n: i32,
    mh: i32,
    mw: i32,
    sh: i32,
    sw: i32,
    sc: i32,
    ncols: i32,
    taps: i32,
    in_stride: i32,
    yh: i32,
    yw: i32,
    out_stride: i32,
    out_oy: i32,
    out_ox: i32,
    k_per_split: i32,
    accumulate: i32,
    out_div: f32,
    tap_dy: [i32; 9],
    tap_dx: [i32; 9],
    tap_w: [i32; 9],
    prefetch: i32,
    gn_partial: DPtr,
    y16: DPtr,
    y16_stride: i32,
    y16_offset: i32,
    copy16: DPtr,
}

const _: () = assert!(std::mem::size_of::<ConvArgs>() == 272);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for ConvArgs {}

/// Shortcut of kernels/conv_wgmma.cu, field for field: the fused shortcut's 16-bit source and
/// K-major weights, and its channels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ShortcutArgs {
    x: DPtr,
    w: DPtr,
    sc: i32,
}

const _: () = assert!(std::mem::size_of::<ShortcutArgs>() == 24);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for ShortcutArgs {}

/// Addresses of one implicit-GEMM launch; 0 where absent.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ConvPtrs {
    pub x: DPtr,
    pub w: DPtr,
    pub y: DPtr,
    pub bias: DPtr,
    pub temb: DPtr,
    pub res: DPtr,
    pub ws: DPtr,
    /// Where the epilogue also writes the GroupNorm partial sums of the output, one chunk per
    /// tile in kernels/norm.cu's layout; only where [`gn_partial_fits`] holds.
    pub gn_partial: DPtr,
    /// A fused shortcut's ([`ConvShape::shortcut_sc`]) 16-bit source and K-major weights.
    pub x2: DPtr,
    pub w2: DPtr,
    /// Where a staged epilogue also writes the output rounded to 16 bits, as one side of a
    /// concatenation, and as a copy of `y` (`ncols` wide; the copy also a split launch's
    /// reduction); with either, `y` may be 0 (no fp32 output).
    pub y16: Side16,
    pub copy16: DPtr,
    /// The one-pass GroupNorm of `y` that a split launch's reduction computes too
    /// (kernels/norm.cu `conv_splitk_reduce_norm`); with it, `y` may be 0 (no fp32 output).
    pub norm: Option<ReductionNorm>,
}

/// A launch's output rounded to the precision of its kernel, as a side of a 16-bit
/// concatenation ([`KernelConfig::concat_from_producers`](crate::cuda::program::KernelConfig)):
/// pixel p's values at `buf`'s 16-bit elements `p * width + offset ..`. `B` names the buffer:
/// the program's [`Buf`](crate::cuda::program::Buf), or its address for the launch (0 for
/// none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Side16<B = DPtr> {
    pub buf: B,
    pub offset: usize,
    pub width: usize,
}

impl<B> Side16<B> {
    /// The same side in buffer `f(buf)` (a program's buffer to its address).
    pub fn map<C>(self, f: impl Fn(B) -> C) -> Side16<C> {
        Side16 {
            buf: f(self.buf),
            offset: self.offset,
            width: self.width,
        }
    }
}

/// Dynamic shared memory of the deep tensor-core pipelines (kernels/conv_tc.cu): ASYNC, four
/// stages of 18,944 bytes; STAGED, three stages of 25,088 bytes and two 10,240-byte A tiles.
const TC_ASYNC_SMEM: u32 = 75_776;
const TC_STAGED_SMEM: u32 = 95_744;

/// The kernel name infixes of [`WGMMA_FORMS`](super::WGMMA_FORMS), in [`wgmma_index`]
/// order: the pairwise epilogue, the row epilogue, the row epilogue with lean loaders, the row
/// epilogue with TMA loads.
const WGMMA_FORM_NAMES: [&str; 4] = ["", "_rows", "_rows_lean", "_rows_tma"];

/// Where wgmma launch `plan`'s kernel sits in [`Kernels`]' tables: bf16 or fp16, then the form
/// ([`WGMMA_FORM_NAMES`]), then the tile ([`WgmmaTile::ALL`]'s order).
fn wgmma_index(precision: Precision, plan: &ConvLaunch) -> usize {
    let form =
        usize::from(plan.row_epilogue) + usize::from(plan.lean_loads) + usize::from(plan.tma_loads);
    table_index(precision, form, WGMMA_FORM_NAMES.len(), plan.tile)
}

/// The place of the kernel of `precision`, form `form` of `forms` and tile `tile` in a wgmma
/// table: bf16 or fp16, then the form, then the tile ([`WgmmaTile::ALL`]'s order).
fn table_index(precision: Precision, form: usize, forms: usize, tile: WgmmaTile) -> usize {
    let tile = WgmmaTile::ALL
        .iter()
        .position(|&(t, _)| t == tile)
        .unwrap_or(0);
    usize::from(precision == Precision::Fp16) + 2 * form + 2 * forms * tile
}

/// The wgmma kernels of one of [`Kernels`]' tables in [`wgmma_index`] order (precision, then
/// form, then tile), each with its tile: the plain ones (`suffix` "") or the cycle-counting
/// ones ("_probe").
pub(super) fn wgmma_kernel_names(suffix: &str) -> Vec<(String, WgmmaTile)> {
    let mut out = Vec::new();
    for (tile, name) in WgmmaTile::ALL {
        for form in WGMMA_FORM_NAMES {
            for t in ["bf16", "fp16"] {
                out.push((format!("conv_wgmma_{t}{form}{name}{suffix}"), tile));
            }
        }
    }
    out
}

/// What a wgmma launch adds to the plain lean or TMA kernels, each feature a kernel of its own
/// (kernels/conv_wgmma.cu compiles them as template flags: a run-time branch would cost every
/// kernel registers). The kernels are named by their features in this order:
/// `conv_wgmma_{bf16|fp16}_rows_{lean|tma}[_sc][_st][_tall]`.
#[derive(Clone, Copy, Debug)]
struct WgmmaExtras {
    /// TMA loads (else lean loaders).
    tma: bool,
    /// A fused 1x1 shortcut (`_sc`).
    shortcut: bool,
    /// The epilogue through shared memory (`_st`; TMA).
    staged: bool,
}

impl WgmmaExtras {
    /// What wgmma launch `plan` adds, with a fused shortcut (`fused`) or not.
    fn of(plan: &ConvLaunch, fused: bool) -> WgmmaExtras {
        WgmmaExtras {
            tma: plan.tma_loads,
            shortcut: fused,
            staged: plan.staged_epilogue,
        }
    }

    /// Every combination, in [`WgmmaExtras::index`]'s bit order.
    fn all() -> impl Iterator<Item = WgmmaExtras> {
        (0..WGMMA_EXTRA_COMBINATIONS).map(|b| WgmmaExtras {
            tma: b & 1 != 0,
            shortcut: b & 2 != 0,
            staged: b & 4 != 0,
        })
    }

    /// Whether any feature is on (else the launch takes a plain lean or TMA kernel).
    fn any(self) -> bool {
        self.shortcut || self.staged
    }

    /// Whether kernels/conv_wgmma.cu has this combination: some feature, the staged epilogue
    /// only with TMA (on every tile).
    fn exists(self) -> bool {
        self.any() && (!self.staged || self.tma)
    }

    /// The kernel's name in `precision` on `tile`.
    fn name(self, precision: Precision, tile: WgmmaTile) -> String {
        let flag = |on: bool, infix: &'static str| if on { infix } else { "" };
        let loads = if self.tma { "_tma" } else { "_lean" };
        let tile = WgmmaTile::ALL
            .iter()
            .find(|&&(t, _)| t == tile)
            .map_or("", |&(_, suffix)| suffix);
        format!(
            "conv_wgmma_{}_rows{loads}{}{}{tile}",
            precision.name(),
            flag(self.shortcut, "_sc"),
            flag(self.staged, "_st")
        )
    }

    /// Where this combination's kernel in `precision` on `tile` sits in a table of
    /// [`WGMMA_EXTRA_SLOTS`] (bf16 or fp16, then the features as bits, then the tile).
    fn index(self, precision: Precision, tile: WgmmaTile) -> usize {
        let bits =
            usize::from(self.tma) | usize::from(self.shortcut) << 1 | usize::from(self.staged) << 2;
        table_index(precision, bits, WGMMA_EXTRA_COMBINATIONS, tile)
    }
}

/// Whether kernels/conv_wgmma.cu has a kernel for wgmma launch `plan` with a fused shortcut
/// (`fused`) or without: every plain form does; one that adds a feature needs lean or TMA
/// loaders and a combination that exists. (For the program tests; [`Kernels::conv`] looks the
/// kernel up itself.)
#[cfg(test)]
pub(crate) fn wgmma_kernel_exists(plan: &ConvLaunch, fused: bool) -> bool {
    let extras = WgmmaExtras::of(plan, fused);
    !extras.any() || (plan.lean_loads && extras.exists())
}

/// Whether launch `plan` of `s` can write the 16-bit outputs `p` asks for (none; or in
/// bf16/fp16 with a staged epilogue, which writes each row's four columns at once: a side's
/// channels within its width, both 8-byte aligned; or a copy alone by a split launch's
/// reduction, `conv_splitk_reduce_copy`, which computes no GroupNorm).
fn half_outputs_fit(s: &ConvShape, plan: &ConvLaunch, p: &ConvPtrs) -> bool {
    let side = p.y16;
    if side.buf == 0 && p.copy16 == 0 {
        return true;
    }
    let side_fits = side.buf == 0
        || (side.buf % 8 == 0
            && side.offset % 4 == 0
            && side.width % 4 == 0
            && side.offset + s.ncols <= side.width);
    let reduced = plan.splits > 1 && side.buf == 0 && p.norm.is_none();
    (plan.staged_epilogue || reduced)
        && matches!(
            plan.kernel,
            ConvKernel::Tensor(Precision::Bf16 | Precision::Fp16)
        )
        && side_fits
        && p.copy16 % 8 == 0
}

/// Combinations of [`WgmmaExtras`]' three flags.
const WGMMA_EXTRA_COMBINATIONS: usize = 1 << 3;

/// Slots of the table of [`WgmmaExtras`] kernels: both precisions, every tile, every
/// combination (those [`WgmmaExtras::exists`] rejects stay empty).
pub(super) const WGMMA_EXTRA_SLOTS: usize = 2 * WGMMA_EXTRA_COMBINATIONS * WgmmaTile::ALL.len();

/// The [`WgmmaExtras`] kernels that exist, each with its slot and tile.
pub(super) fn wgmma_extra_kernels() -> Vec<(usize, String, WgmmaTile)> {
    let mut out = Vec::new();
    for (tile, _) in WgmmaTile::ALL {
        for extras in WgmmaExtras::all().filter(|e| e.exists()) {
            for precision in [Precision::Bf16, Precision::Fp16] {
                out.push((
                    extras.index(precision, tile),
                    extras.name(precision, tile),
                    tile,
                ));
            }
        }
    }
    out
}

/// Counters a `conv_wgmma_*_probe` launch adds to (kernels/conv_wgmma.cu `PROBE_COUNTERS`): the
/// cycles of each [`WGMMA_PROBE_PHASES`] phase summed over warpgroups, the number of
/// warpgroups, the number of K slices they multiplied.
pub(crate) const WGMMA_PROBE_COUNTERS: usize = 9;

/// Zeroed counters on the device for one [`Kernels::conv_probe`] launch to add to.
pub(crate) struct ProbeCounters {
    slice: CudaSlice<u64>,
    ptr: DPtr,
}

impl ProbeCounters {
    pub fn new(st: &Arc<CudaStream>) -> Result<ProbeCounters> {
        let slice = cu(
            st.alloc_zeros::<u64>(WGMMA_PROBE_COUNTERS),
            "allocating probe counters",
        )?;
        let ptr = {
            let (ptr, _guard) = slice.device_ptr(st);
            ptr
        };
        Ok(ProbeCounters { slice, ptr })
    }

    /// Their values, once the stream's work is done.
    pub fn read(&self, st: &Arc<CudaStream>) -> Result<[u64; WGMMA_PROBE_COUNTERS]> {
        let v = cu(st.clone_dtoh(&self.slice), "copying from the GPU")?;
        cu(st.synchronize(), "waiting for the GPU")?;
        v.try_into()
            .map_err(|_| Error::Cuda("internal: probe counters of the wrong length".into()))
    }
}

/// The phases a probe launch counts cycles in, in the kernel's order.
pub(crate) const WGMMA_PROBE_PHASES: [&str; 7] = [
    "set-up",
    "copy wait",
    "barrier",
    "copy issue",
    "products + batch wait",
    "drain",
    "epilogue",
];

/// One tensor-core convolution kernel of kernels/conv_tc.cu and the launches that take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TcKernel {
    pub(super) name: &'static str,
    precision: Precision,
    /// [`ConvLaunch::deep`], [`ConvLaunch::half_input`].
    deep: bool,
    half_input: bool,
    /// [`ConvLaunch::row_epilogue`].
    rows: bool,
}

impl TcKernel {
    const fn new(
        name: &'static str,
        precision: Precision,
        deep: bool,
        half_input: bool,
        rows: bool,
    ) -> TcKernel {
        TcKernel {
            name,
            precision,
            deep,
            half_input,
            rows,
        }
    }

    /// Dynamic shared memory: none for the two-stage kernels (static), ASYNC's for tf32 and
    /// 16-bit inputs, STAGED's for fp32 inputs into bf16/fp16.
    pub(super) fn dynamic_smem(&self) -> u32 {
        if !self.deep {
            0
        } else if self.precision == Precision::Tf32 || self.half_input {
            TC_ASYNC_SMEM
        } else {
            TC_STAGED_SMEM
        }
    }
}

/// Every tensor-core convolution kernel (256 threads each): the two-stage ones (fp32 input),
/// and the deep pipelines (ASYNC for tf32 and 16-bit inputs, STAGED for fp32 inputs into
/// bf16/fp16).
pub(super) const TC_KERNELS: [TcKernel; 13] = {
    use Precision::{Bf16, Fp16, Tf32};
    [
        TcKernel::new("conv_tc_tf32", Tf32, false, false, false),
        TcKernel::new("conv_tc_bf16", Bf16, false, false, false),
        TcKernel::new("conv_tc_fp16", Fp16, false, false, false),
        TcKernel::new("conv_tc_tf32_async", Tf32, true, false, false),
        TcKernel::new("conv_tc_bf16_hin", Bf16, true, true, false),
        TcKernel::new("conv_tc_fp16_hin", Fp16, true, true, false),
        TcKernel::new("conv_tc_bf16_staged", Bf16, true, false, false),
        TcKernel::new("conv_tc_fp16_staged", Fp16, true, false, false),
        TcKernel::new("conv_tc_tf32_async_rows", Tf32, true, false, true),
        TcKernel::new("conv_tc_bf16_hin_rows", Bf16, true, true, true),
        TcKernel::new("conv_tc_fp16_hin_rows", Fp16, true, true, true),
        TcKernel::new("conv_tc_bf16_staged_rows", Bf16, true, false, true),
        TcKernel::new("conv_tc_fp16_staged_rows", Fp16, true, false, true),
    ]
};

/// The index in [`TC_KERNELS`] of the kernel tensor-core launch `plan` runs; an error for a
/// plan no kernel implements (fp32, 16-bit input without the deep pipeline or in tf32).
fn tc_kernel(plan: &ConvLaunch) -> Result<usize> {
    let ConvKernel::Tensor(precision) = plan.kernel else {
        return Err(Error::Cuda(format!(
            "internal: {:?} convolution planned as a tensor-core launch",
            plan.kernel
        )));
    };
    TC_KERNELS
        .iter()
        .position(|k| {
            k.precision == precision
                && k.deep == plan.deep
                && k.half_input == plan.half_input
                && k.rows == plan.row_epilogue
        })
        .ok_or_else(|| {
            Error::Cuda(format!(
                "internal: no tensor-core kernel for {precision} with deep {}, 16-bit input {} \
                 and row epilogue {}",
                plan.deep, plan.half_input, plan.row_epilogue
            ))
        })
}

/// Dynamic shared memory of `conv_narrow_<ncols>` (kernels/conv.cu): three stages, each an 18x34
/// halo tile of 8 channels (19,584 bytes) and their weights (9 x 8 x ncols floats).
pub(super) fn narrow_smem(ncols: usize) -> u32 {
    (3 * (18 * 34 * 8 * 4 + 9 * 8 * 4 * ncols)) as u32
}

/// Dynamic shared memory of `conv_narrow_mma_*` (kernels/conv_tc.cu) over `sc` source
/// channels: three stages of an 18x34 halo tile of 16 channels in 16 bits (58,752 bytes) and
/// the launch's weights in fragment order (144 bytes a source channel).
pub(super) fn narrow_mma_smem(sc: usize) -> u32 {
    (58_752 + 144 * sc) as u32
}

/// Rows (output pixels) and columns of a `conv_few_in_mma_<sc>` block.
const FEW_IN_MMA_TILE: usize = 128;

/// Output tile of `conv_narrow_*` and `conv_narrow_mma_*` (columns, rows).
const NARROW_TILE: (usize, usize) = (32, 16);

/// The grid of `conv_narrow_*` and `conv_narrow_mma_*` over `s`: a block per output tile
/// ([`NARROW_TILE`]) and image.
fn narrow_grid(s: &ConvShape) -> Result<(u32, u32, u32)> {
    let (tw, th) = NARROW_TILE;
    Ok((
        s.mw.div_ceil(tw) as u32,
        grid_dim(s.mh.div_ceil(th), "row tiles")?,
        grid_dim(s.n, "batch")?,
    ))
}

/// Direct launch `plan` of `s` in words, for the launchers' refusals: kernel, shape, stride,
/// taps, splits and the pipeline choices none of the direct kernels takes.
fn direct_launch(s: &ConvShape, plan: &ConvLaunch) -> String {
    format!(
        "{:?} convolution {}->{} at stride {} with {} taps, {} splits, deep {}, 16-bit input {}, \
         wgmma {}",
        plan.kernel,
        s.sc,
        s.ncols,
        s.in_stride,
        s.taps.len(),
        plan.splits,
        plan.deep,
        plan.half_input,
        plan.wgmma
    )
}

/// Run length of `conv_few_in_*`, and the output columns one of its blocks computes.
const FEW_IN_RUN: usize = 16;
const FEW_IN_COLS: usize = 128;

impl Kernels {
    /// `y = (conv(x) + bias + temb + res) / out_div (+ y)`, the implicit GEMM of `s`.
    pub fn conv(
        &self,
        st: &CudaStream,
        s: &ConvShape,
        plan: &ConvLaunch,
        p: ConvPtrs,
        out_div: f32,
        accumulate: bool,
    ) -> Result<()> {
        self.conv_with(st, s, plan, p, out_div, accumulate, None)
    }

    /// [`Kernels::conv`] of a wgmma launch through its `_probe` kernel, which adds where its
    /// cycles went to `probe` (the same outputs, a little slower).
    pub(crate) fn conv_probe(
        &self,
        st: &CudaStream,
        s: &ConvShape,
        plan: &ConvLaunch,
        p: ConvPtrs,
        probe: &ProbeCounters,
    ) -> Result<()> {
        if !plan.wgmma {
            return Err(Error::Cuda(
                "internal: a cycle probe of a launch without wgmma".into(),
            ));
        }
        self.conv_with(st, s, plan, p, 1.0, false, Some(probe.ptr))
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_with(
        &self,
        st: &CudaStream,
        s: &ConvShape,
        plan: &ConvLaunch,
        p: ConvPtrs,
        out_div: f32,
        accumulate: bool,
        probe: Option<u64>,
    ) -> Result<()> {
        if s.taps.is_empty() || s.taps.len() > 9 {
            return Err(Error::Cuda(format!(
                "internal: a convolution with {} taps",
                s.taps.len()
            )));
        }
        need(p.x, "convolution input")?;
        need(p.w, "convolution weights")?;
        if (p.y16.buf == 0 && p.copy16 == 0 && p.norm.is_none()) || accumulate {
            need(p.y, "convolution output")?;
        }
        // The reduction that also normalises writes the whole output, pixel for row.
        let dense = s.rows_are_pixels();
        if p.norm.is_some() && (plan.splits < 2 || accumulate || !dense || probe.is_some()) {
            return Err(Error::Cuda(format!(
                "internal: a GroupNorm asked of the reduction of a launch with {} splits \
                 (accumulating {accumulate}, writing every pixel {dense}, probed {})",
                plan.splits,
                probe.is_some()
            )));
        }
        // Checked before the product launch, so that a refusal leaves nothing half written.
        let reduce_norm = match &p.norm {
            Some(norm) => Some((
                norm.args(s.mh * s.mw, s.ncols)?,
                i32_of(s.n * norm.groups, "GroupNorm blocks")? as u32,
                norm.silu,
            )),
            None => None,
        };
        let rows = s.rows();
        if rows == 0 || s.ncols == 0 || s.sc == 0 {
            return Ok(());
        }
        i32_of(rows * s.ncols.max(s.sc), "convolution rows x channels")?;
        i32_of(s.k(), "convolution reduction length")?;
        if plan.splits > 1 {
            need(p.ws, "split-K workspace")?;
            i32_of(plan.splits * rows * s.ncols, "split-K workspace")?;
        }
        let mut a = ConvArgs {
            x: p.x,
            w: p.w,
            y: p.y,
            bias: p.bias,
            temb: p.temb,
            res: p.res,
            // Unsplit launches get none, so that no kernel can mistake a workspace for a split.
            ws: if plan.splits > 1 { p.ws } else { 0 },
            n: i32_of(s.n, "batch")?,
            mh: i32_of(s.mh, "rows")?,
            mw: i32_of(s.mw, "columns")?,
            sh: i32_of(s.sh, "source height")?,
            sw: i32_of(s.sw, "source width")?,
            sc: i32_of(s.sc, "source channels")?,
            ncols: i32_of(s.ncols, "output channels")?,
            taps: s.taps.len() as i32,
            in_stride: i32_of(s.in_stride, "stride")?,
            yh: i32_of(s.yh, "output height")?,
            yw: i32_of(s.yw, "output width")?,
            out_stride: i32_of(s.out_stride, "output stride")?,
            out_oy: s.out_oy as i32,
            out_ox: s.out_ox as i32,
            k_per_split: i32_of(plan.k_per_split, "K per split")?,
            accumulate: accumulate as i32,
            out_div,
            prefetch: i32::from(plan.prefetch),
            gn_partial: p.gn_partial,
            y16: p.y16.buf,
            y16_stride: i32_of(p.y16.width, "concatenation channels")?,
            y16_offset: i32_of(p.y16.offset, "concatenation channel offset")?,
            copy16: p.copy16,
            ..ConvArgs::default()
        };
        for (i, t) in s.taps.iter().enumerate() {
            a.tap_dy[i] = t.dy;
            a.tap_dx[i] = t.dx;
            a.tap_w[i] = t.w;
        }
        // The family that fuses a shortcut: 16-bit wgmma launches with lean or TMA loaders.
        let lean_wgmma = plan.wgmma
            && plan.lean_loads
            && matches!(
                plan.kernel,
                ConvKernel::Tensor(Precision::Bf16 | Precision::Fp16)
            );
        // Every kernel but the fused-shortcut ones would ignore the second source: refuse
        // any other plan for a fused shape, and a second source for an unfused one.
        let fused = s.shortcut_sc > 0;
        if fused {
            need(p.x2, "fused shortcut input")?;
            need(p.w2, "fused shortcut weights")?;
            let plain = ConvShape {
                shortcut_sc: 0,
                ..s.clone()
            };
            if !lean_wgmma || probe.is_some() || plain.with_shortcut(s.shortcut_sc).is_none() {
                return Err(Error::Cuda(format!(
                    "internal: a convolution {}->{} with a fused {}-channel shortcut planned \
                     as {:?} with wgmma {}, lean loads {}, cycle probe {}: only the lean and \
                     TMA wgmma kernels fuse it, at input stride 1 over the source's own grid, \
                     with channels in whole K slices of {WGMMA_SLICE}",
                    s.sc,
                    s.ncols,
                    s.shortcut_sc,
                    plan.kernel,
                    plan.wgmma,
                    plan.lean_loads,
                    probe.is_some()
                )));
            }
        } else if p.x2 != 0 || p.w2 != 0 {
            return Err(Error::Cuda(format!(
                "internal: a shortcut's input or weights given to a convolution {}->{} without \
                 one",
                s.sc, s.ncols
            )));
        }
        if p.gn_partial != 0 && gn_partial_fits(s, plan).is_none() {
            return Err(Error::Cuda(format!(
                "internal: GroupNorm sums asked of a {:?} convolution launch that cannot write \
                 them ({} splits, lean loads {}, tile {:?})",
                plan.kernel, plan.splits, plan.lean_loads, plan.tile
            )));
        }
        if !half_outputs_fit(s, plan, &p) {
            let side = p.y16;
            return Err(Error::Cuda(format!(
                "internal: 16-bit outputs (a concatenation side at channels {}..{} of {}: {}, a \
                 copy: {}) asked of a {:?} convolution launch without a staged epilogue ({}) \
                 or a split one's reduction with a copy alone ({} splits, a GroupNorm in the \
                 reduction: {}), or misaligned",
                side.offset,
                side.offset + s.ncols,
                side.width,
                side.buf != 0,
                p.copy16 != 0,
                plan.kernel,
                plan.staged_epilogue,
                plan.splits,
                p.norm.is_some()
            )));
        }
        if matches!(plan.kernel, ConvKernel::Narrow | ConvKernel::FewIn) {
            return self.conv_direct(st, s, plan, &a);
        }
        if let ConvKernel::NarrowTensor(precision) = plan.kernel {
            return self.conv_narrow_mma(st, s, plan, &a, precision);
        }
        if plan.kernel == ConvKernel::FewInTensor {
            return self.conv_few_in_mma(st, s, plan, &a);
        }
        // The 16-byte path also needs 16-byte aligned bases; the arena guarantees it, and
        // anything else falls back to scalar loads.
        let aligned = [p.x, p.w, p.y, p.res, p.ws, p.bias, p.temb, p.x2, p.w2]
            .iter()
            .all(|&q| q % 16 == 0);
        let tensor = matches!(plan.kernel, ConvKernel::Tensor(_));
        let half = matches!(
            plan.kernel,
            ConvKernel::Tensor(Precision::Bf16 | Precision::Fp16)
        );
        if (plan.deep && !tensor)
            || (plan.half_input && !(half && plan.deep))
            || (plan.wgmma && !plan.half_input)
            || (plan.row_epilogue && !(tensor && plan.deep))
            || (plan.tile != WgmmaTile::Plain && !plan.wgmma)
            || (plan.lean_loads && !(plan.wgmma && plan.row_epilogue))
            || (plan.tma_loads && !(plan.lean_loads && im2col_box(s).is_some()))
            || (plan.prefetch && !(plan.lean_loads && plan.splits == 1))
            || (plan.staged_epilogue && !(plan.tma_loads && plan.splits == 1 && probe.is_none()))
        {
            return Err(Error::Cuda(format!(
                "internal: {:?} convolution planned with deep {}, 16-bit input {}, wgmma {}, \
                 row epilogue {}, lean loads {}, TMA loads {}, prefetch {}, {} splits and tile \
                 {:?} (staged epilogue {}, fused shortcut {fused}, cycle probe {})",
                plan.kernel,
                plan.deep,
                plan.half_input,
                plan.wgmma,
                plan.row_epilogue,
                plan.lean_loads,
                plan.tma_loads,
                plan.prefetch,
                plan.splits,
                plan.tile,
                plan.staged_epilogue,
                probe.is_some()
            )));
        }
        // The kernel and its dynamic shared memory.
        let (f, smem) = match plan.kernel {
            ConvKernel::Tensor(precision) => {
                // No fallback here: the weights are already in this precision's layout.
                if !aligned || s.sc % 8 != 0 || s.ncols % 8 != 0 {
                    return Err(Error::Cuda(format!(
                        "internal: tensor-core convolution {}->{} with unaligned buffers or \
                         channels not multiples of 8",
                        s.sc, s.ncols
                    )));
                }
                let slice = if plan.wgmma {
                    WGMMA_SLICE
                } else {
                    tc_slice(precision)
                };
                if plan.k_per_split % slice != 0 {
                    return Err(Error::Cuda(
                        "internal: split-K not a multiple of the tensor-core K slice".into(),
                    ));
                }
                if plan.wgmma {
                    let missing = || {
                        Error::Cuda(
                            "internal: wgmma convolution planned on a device without it".into(),
                        )
                    };
                    let wg = self.conv_wgmma.as_ref().ok_or_else(missing)?;
                    let extras = WgmmaExtras::of(plan, fused);
                    let f = if extras.any() {
                        wg.extras[extras.index(precision, plan.tile)]
                            .as_ref()
                            .ok_or_else(|| {
                                Error::Cuda(format!(
                                    "internal: no wgmma kernel {}",
                                    extras.name(precision, plan.tile)
                                ))
                            })?
                    } else if probe.is_some() {
                        &wg.probe[wgmma_index(precision, plan)]
                    } else {
                        &wg.plain[wgmma_index(precision, plan)]
                    };
                    (f, plan.tile.smem())
                } else {
                    let k = tc_kernel(plan)?;
                    (&self.conv_tc[k], TC_KERNELS[k].dynamic_smem())
                }
            }
            ConvKernel::Vec if aligned && s.sc % 8 == 0 && s.ncols % 4 == 0 => {
                (&self.conv_gemm_vec, 0)
            }
            _ => (&self.conv_gemm_any, 0),
        };
        let (tile_rows, threads) = if plan.wgmma {
            (plan.tile.rows(), plan.tile.threads())
        } else {
            (TILE, BLOCK)
        };
        let grid = (
            i32_of(rows.div_ceil(tile_rows), "row tiles")? as u32,
            u32::try_from(s.ncols.div_ceil(TILE))
                .unwrap_or(u32::MAX)
                .min(65535),
            u32::try_from(plan.splits).unwrap_or(65535).min(65535),
        );
        let mut launch = cfg(grid, (threads, 1, 1));
        launch.shared_mem_bytes = smem;
        // The TMA kernels take their tensor maps after the argument block, the fused
        // shortcut's after the main ones: its source's through the main source's pixel box (the
        // same walk), its weights as a one-block convolution's.
        // (The main maps read only the taps and the main source's channels.)
        let mut maps = None;
        if let ConvKernel::Tensor(precision) = plan.kernel {
            if plan.tma_loads {
                let second = match s.shortcut() {
                    Some(one) => {
                        let source = ConvShape {
                            sc: s.shortcut_sc,
                            shortcut_sc: 0,
                            ..s.clone()
                        };
                        Some((
                            tma::im2col_map(precision, p.x2, &source, tile_rows)?,
                            tma::weight_map(precision, p.w2, &one)?,
                        ))
                    }
                    None => None,
                };
                maps = Some((
                    tma::im2col_map(precision, p.x, s, tile_rows)?,
                    tma::weight_map(precision, p.w, s)?,
                    second,
                ));
            }
        }
        let shortcut = ShortcutArgs {
            x: p.x2,
            w: p.w2,
            sc: i32_of(s.shortcut_sc, "fused shortcut channels")?,
        };
        let mut b = st.launch_builder(f);
        b.arg(&a);
        if let Some((ta, tb, second)) = &maps {
            b.arg(ta).arg(tb);
            if let Some((ta2, tb2)) = second {
                b.arg(ta2).arg(tb2);
            }
        }
        if fused {
            b.arg(&shortcut);
        }
        if let Some(probe) = &probe {
            b.arg(probe);
        }
        // SAFETY: the argument block, the maps (the shortcut's two after the main ones), the
        // shortcut's operands where it is fused and the probe's counters are the kernel's
        // parameters, in order, and `a` holds the shapes its pointers cover (the caller's
        // contract); the grid covers exactly the tiles of the problem.
        cu(unsafe { b.launch(launch) }.map(drop), "launching conv_gemm")?;
        if plan.splits > 1 {
            let splits = plan.splits as i32;
            if let Some(((g, threads), blocks, silu)) = reduce_norm {
                let mut b = st.launch_builder(&self.silu_norm(silu).reduce_norm);
                b.arg(&a).arg(&splits).arg(&g);
                // SAFETY: the workspace holds splits x rows x ncols partial sums written above;
                // a block per (image, group) reads its group's and writes them (where y is set),
                // the GroupNorm's output of the same shape and its two statistics; args()
                // checked that a group fits the block.
                cu(
                    unsafe { b.launch(cfg((blocks, 1, 1), (threads, 1, 1))) }.map(drop),
                    "launching conv_splitk_reduce_norm",
                )?;
                return Ok(());
            }
            // The copy (half_outputs_fit checked it: a bf16 or fp16 kernel) by the reduction.
            let (f, name, kind) = match (p.copy16, plan.kernel) {
                (0, _) => (&self.conv_splitk_reduce, "conv_splitk_reduce", 0),
                (_, ConvKernel::Tensor(precision)) => (
                    &self.conv_splitk_reduce_copy,
                    "conv_splitk_reduce_copy",
                    half_kind(precision)?,
                ),
                (_, k) => {
                    return Err(Error::Cuda(format!(
                        "internal: a 16-bit copy asked of the reduction of a {k:?} launch"
                    )))
                }
            };
            let mut b = st.launch_builder(f);
            b.arg(&a).arg(&splits);
            if p.copy16 != 0 {
                b.arg(&kind);
            }
            // SAFETY: the workspace holds splits x rows x ncols partial sums written above;
            // the reduction's grid-stride loop stays inside rows x ncols outputs (and as many
            // 16-bit values of the copy, where set).
            cu(
                unsafe { b.launch(self.flat(rows * s.ncols)) }.map(drop),
                &format!("launching {name}"),
            )?;
        }
        Ok(())
    }

    /// The launch of a direct kernel (`plan.kernel` Narrow or FewIn) on the filled `a`.
    fn conv_direct(
        &self,
        st: &CudaStream,
        s: &ConvShape,
        plan: &ConvLaunch,
        a: &ConvArgs,
    ) -> Result<()> {
        let narrow = plan.kernel == ConvKernel::Narrow;
        let channels = if narrow { s.ncols } else { s.sc };
        if !direct_fits(s)
            || channels > DIRECT_MAX
            || plan.splits != 1
            || plan.deep
            || plan.half_input
        {
            return Err(Error::Cuda(format!(
                "internal: {}: the direct kernels take at most {DIRECT_MAX} channels on their \
                 narrow side, stride 1, taps in a 3x3 window, one split, fp32",
                direct_launch(s, plan)
            )));
        }
        let (f, launch, name) = if narrow {
            let mut launch = cfg(narrow_grid(s)?, (BLOCK, 1, 1));
            launch.shared_mem_bytes = narrow_smem(s.ncols);
            (
                &self.conv_narrow[s.ncols - 1],
                launch,
                format!("conv_narrow_{}", s.ncols),
            )
        } else {
            let runs = s.n * s.mh * s.mw.div_ceil(FEW_IN_RUN);
            // Runs a block computes at a time: 256 / (quads of 4 columns in a column tile).
            let per_block = BLOCK as usize / s.ncols.min(FEW_IN_COLS).div_ceil(4);
            let grid = (
                self.blocks(runs, per_block, 2),
                grid_dim(s.ncols.div_ceil(FEW_IN_COLS), "column tiles")?,
                1,
            );
            (
                &self.conv_few_in[s.sc - 1],
                cfg(grid, (BLOCK, 1, 1)),
                format!("conv_few_in_{}", s.sc),
            )
        };
        let mut b = st.launch_builder(f);
        b.arg(a);
        // SAFETY: the pointers cover the shapes in `a` (the caller's contract), sizes were
        // checked; the grid covers every output of the problem.
        cu(
            unsafe { b.launch(launch) }.map(drop),
            &format!("launching {name}"),
        )
    }

    /// A [`ConvKernel::NarrowTensor`] launch (`conv_narrow_mma_*`, kernels/conv_tc.cu): after
    /// [`Kernels::conv`]'s checks, those of its own kernel.
    fn conv_narrow_mma(
        &self,
        st: &CudaStream,
        s: &ConvShape,
        plan: &ConvLaunch,
        a: &ConvArgs,
        precision: Precision,
    ) -> Result<()> {
        if !narrow_mma_fits(s, precision)
            || plan.splits != 1
            || !plan.half_input
            || plan.deep
            || plan.wgmma
            || a.x % 16 != 0
        {
            return Err(Error::Cuda(format!(
                "internal: {}, input aligned {}: the kernel takes at most {DIRECT_MAX} outputs \
                 from 16 to {NARROW_MMA_MAX_SC} 16-bit source channels in steps of 16 (16-byte \
                 aligned), stride 1, taps in a 3x3 window, one split",
                direct_launch(s, plan),
                a.x % 16 == 0
            )));
        }
        let mut launch = cfg(narrow_grid(s)?, (BLOCK, 1, 1));
        launch.shared_mem_bytes = narrow_mma_smem(s.sc);
        let f = &self.conv_narrow_mma[usize::from(precision == Precision::Fp16)];
        let mut b = st.launch_builder(f);
        b.arg(a);
        // SAFETY: the pointers cover the shapes in `a` (the caller's contract), sizes and the
        // kernel's conditions were checked; the grid covers every output pixel.
        cu(
            unsafe { b.launch(launch) }.map(drop),
            &format!("launching conv_narrow_mma_{}", precision.name()),
        )
    }

    /// A [`ConvKernel::FewInTensor`] launch (`conv_few_in_mma_<sc>`, kernels/conv_tc.cu): after
    /// [`Kernels::conv`]'s checks, those of its own kernel.
    fn conv_few_in_mma(
        &self,
        st: &CudaStream,
        s: &ConvShape,
        plan: &ConvLaunch,
        a: &ConvArgs,
    ) -> Result<()> {
        // The kernel stores pairs of outputs where ncols is even.
        let y_aligned = s.ncols % 2 == 1 || a.y % 8 == 0;
        if !few_in_mma_fits(s)
            || plan.splits != 1
            || plan.half_input
            || plan.deep
            || plan.wgmma
            || !y_aligned
        {
            return Err(Error::Cuda(format!(
                "internal: {}, output aligned {y_aligned}: the kernel takes at most {DIRECT_MAX} \
                 fp32 source channels, stride 1, taps in a 3x3 window, one split, and an 8-byte \
                 aligned output where the outputs are even in number",
                direct_launch(s, plan)
            )));
        }
        let grid = (
            i32_of(s.rows().div_ceil(FEW_IN_MMA_TILE), "row tiles")? as u32,
            grid_dim(s.ncols.div_ceil(FEW_IN_MMA_TILE), "column tiles")?,
            1,
        );
        let mut b = st.launch_builder(&self.conv_few_in_mma[s.sc - 1]);
        b.arg(a);
        // SAFETY: the pointers cover the shapes in `a` (the caller's contract), sizes and the
        // kernel's conditions were checked; the grid covers every row and column.
        cu(
            unsafe { b.launch(cfg(grid, (BLOCK, 1, 1))) }.map(drop),
            &format!("launching conv_few_in_mma_{}", s.sc),
        )
    }

    /// Per-tap transpose `[taps, rows, cols] -> [taps, cols, rows]` (forward to input-gradient
    /// convolution weights).
    pub fn weight_transpose(
        &self,
        st: &CudaStream,
        src: DPtr,
        dst: DPtr,
        taps: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        need(src, "weights")?;
        need(dst, "transposed weights")?;
        let (t, r, c) = (
            i32_of(taps, "taps")?,
            i32_of(rows, "rows")?,
            i32_of(cols, "cols")?,
        );
        let mut b = st.launch_builder(&self.conv_weight_transpose);
        b.arg(&src).arg(&dst).arg(&t).arg(&r).arg(&c);
        // SAFETY: src and dst hold taps * rows * cols floats.
        cu(
            unsafe { b.launch(self.flat(taps * rows * cols)) }.map(drop),
            "launching conv_weight_transpose",
        )
    }

    /// `dst` (16-bit elements, two per f32 slot) = `src` (`len` f32) rounded to nearest even
    /// as bf16 or fp16.
    pub fn convert_half(
        &self,
        st: &CudaStream,
        src: DPtr,
        dst: DPtr,
        len: usize,
        precision: Precision,
    ) -> Result<()> {
        need(src, "fp32 values to convert")?;
        need(dst, "16-bit copy")?;
        let kind = half_kind(precision)?;
        let l = i64_of(len);
        let mut b = st.launch_builder(&self.tc_convert);
        b.arg(&src).arg(&dst).arg(&l).arg(&kind);
        // SAFETY: src holds len floats, dst room for ⌈len / 2⌉ 32-bit words.
        cu(
            unsafe { b.launch(self.flat(len.div_ceil(2))) }.map(drop),
            "launching tc_convert",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::{on_tile, plan_conv, plan_conv_at, plan_wgmma, WGMMA_FORMS};
    use crate::model::graph::Pad;

    /// 16-bit outputs only from staged epilogues, each alone or both, a side within its width
    /// and aligned; and a copy alone from a split bf16/fp16 launch's reduction, without a
    /// GroupNorm in it.
    #[test]
    fn half_outputs_only_from_staged_epilogues_and_split_reductions() {
        let shape = ConvShape::forward(1, 16, 16, 64, 128, 3, 1, Pad::Symmetric);
        let plain = ConvLaunch {
            tma_loads: true,
            lean_loads: true,
            row_epilogue: true,
            ..plan_wgmma(&shape, 132, Precision::Bf16)
                .unwrap()
                .with_splits(&shape, WGMMA_SLICE, 1)
        };
        let staged = ConvLaunch {
            staged_epilogue: true,
            ..plain
        };
        let side = |buf, offset, width| Side16 { buf, offset, width };
        let none = ConvPtrs::default();
        let copy = ConvPtrs {
            copy16: 256,
            ..none
        };
        let sided = ConvPtrs {
            y16: side(512, 128, 256),
            ..none
        };
        let both = ConvPtrs {
            copy16: 256,
            ..sided
        };
        for p in [none, copy, sided, both] {
            assert!(half_outputs_fit(&shape, &staged, &p), "{p:?}");
            let wanted = p.copy16 != 0 || p.y16.buf != 0;
            assert_eq!(half_outputs_fit(&shape, &plain, &p), !wanted, "{p:?}");
        }
        for bad in [
            side(512, 132, 256),
            side(512, 130, 260),
            side(516, 128, 256),
            side(512, 4, 128),
        ] {
            let p = ConvPtrs { y16: bad, ..none };
            assert!(!half_outputs_fit(&shape, &staged, &p), "{p:?}");
        }
        let misaligned = ConvPtrs {
            copy16: 260,
            ..none
        };
        assert!(!half_outputs_fit(&shape, &staged, &misaligned));
        let split = plain.with_splits(&shape, WGMMA_SLICE, 4);
        assert!(split.splits > 1);
        assert!(half_outputs_fit(&shape, &split, &copy));
        assert!(!half_outputs_fit(&shape, &split, &misaligned));
        for p in [sided, both] {
            assert!(!half_outputs_fit(&shape, &split, &p), "{p:?}");
        }
        let fp32_split = ConvLaunch {
            kernel: ConvKernel::Vec,
            ..split
        };
        assert!(!half_outputs_fit(&shape, &fp32_split, &copy));
    }

    /// Every wgmma form a launch can ask for finds the kernel of its precision, epilogue,
    /// loaders and tile.
    #[test]
    fn wgmma_plans_find_their_kernels() {
        let names = wgmma_kernel_names("");
        let shape = ConvShape::forward(1, 16, 16, 64, 64, 3, 1, Pad::Symmetric);
        let mut seen = Vec::new();
        for precision in [Precision::Bf16, Precision::Fp16] {
            let wp = plan_wgmma(&shape, 132, precision).unwrap();
            for (tile, suffix) in WgmmaTile::ALL {
                for (row_epilogue, lean_loads, tma_loads) in WGMMA_FORMS {
                    let plan = ConvLaunch {
                        row_epilogue,
                        lean_loads,
                        tma_loads,
                        ..on_tile(wp, tile).unwrap()
                    };
                    let i = wgmma_index(precision, &plan);
                    let (name, t) = &names[i];
                    let rows = if tma_loads {
                        "_rows_tma"
                    } else if lean_loads {
                        "_rows_lean"
                    } else if row_epilogue {
                        "_rows"
                    } else {
                        ""
                    };
                    assert_eq!(
                        *name,
                        format!("conv_wgmma_{}{rows}{suffix}", precision.name())
                    );
                    assert_eq!(*t, tile);
                    seen.push(i);
                }
            }
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), names.len());
    }

    /// The kernels with extra features: each in a slot of its own, named by its features, 16
    /// in all (every one of them in the built module: `every_kernel_the_loaders_ask_for_exists`
    /// in mod.rs), every combination of the features among them.
    #[test]
    fn wgmma_extras_have_one_slot_each() {
        let kernels = wgmma_extra_kernels();
        let mut slots: Vec<_> = kernels.iter().map(|k| k.0).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), kernels.len());
        assert!(slots.iter().all(|&s| s < WGMMA_EXTRA_SLOTS));
        let names: Vec<&str> = kernels.iter().map(|k| k.1.as_str()).collect();
        for name in [
            "conv_wgmma_bf16_rows_lean_sc_tall",
            "conv_wgmma_fp16_rows_tma_sc",
            "conv_wgmma_bf16_rows_tma_st_tall",
            "conv_wgmma_bf16_rows_tma_sc_st",
            "conv_wgmma_fp16_rows_tma_sc_st_tall",
        ] {
            assert!(names.contains(&name), "{name}");
        }
        assert!(!names.iter().any(|n| n.contains("_lean_st")));
        assert_eq!(kernels.len(), 16);
    }

    /// Every tensor-core plan the kernels implement resolves to exactly one kernel, with its
    /// shared memory; the others (16-bit input without the deep pipeline or in tf32, the row
    /// epilogue without it, fp32) to none.
    #[test]
    fn tensor_core_plans_pick_one_kernel() {
        let shape = ConvShape::forward(1, 16, 16, 64, 64, 3, 1, Pad::Symmetric);
        let mut resolved = Vec::new();
        for p in Precision::ALL {
            for deep in [false, true] {
                for half_input in [false, true] {
                    for row_epilogue in [false, true] {
                        let plan = ConvLaunch {
                            deep,
                            half_input,
                            row_epilogue,
                            ..plan_conv_at(&shape, 132, p)
                        };
                        let valid = p != Precision::Fp32
                            && (!half_input || (deep && p.is_half()))
                            && (!row_epilogue || deep);
                        let Ok(i) = tc_kernel(&plan) else {
                            assert!(!valid, "{plan:?}");
                            continue;
                        };
                        assert!(valid, "{plan:?}");
                        let k = &TC_KERNELS[i];
                        let smem = match (deep, p, half_input) {
                            (false, ..) => 0,
                            (true, Precision::Tf32, _) | (true, _, true) => TC_ASYNC_SMEM,
                            _ => TC_STAGED_SMEM,
                        };
                        assert_eq!(k.dynamic_smem(), smem, "{}", k.name);
                        assert_eq!(k.rows, row_epilogue, "{}", k.name);
                        resolved.push(i);
                    }
                }
            }
        }
        resolved.sort();
        assert_eq!(resolved, (0..TC_KERNELS.len()).collect::<Vec<_>>());
        assert!(tc_kernel(&plan_conv(&shape, 132)).is_err());
    }

    /// The table of tensor-core kernels matches what kernels/conv_tc.cu instantiates: each
    /// name once, with its precision, pipeline and input type, and nothing else.
    #[test]
    fn tensor_core_kernels_match_the_cuda_source() {
        let src = include_str!("../../../kernels/conv_tc.cu");
        // `TC_KERNEL(name, T)` and `TC_DEEP_KERNEL(name, T, P, AH, ROWS)` lines, as
        // (name, T, P, AH, ROWS) with the two-stage kernels' implicit TWO, false, false.
        let mut found: Vec<(String, String, String, String, String)> = src
            .lines()
            .filter_map(|l| {
                let (deep, args) = if let Some(a) = l.strip_prefix("TC_DEEP_KERNEL(") {
                    (true, a)
                } else {
                    (false, l.strip_prefix("TC_KERNEL(")?)
                };
                let args: Vec<String> = args
                    .trim_end()
                    .strip_suffix(')')?
                    .split(',')
                    .map(|a| a.trim().to_string())
                    .collect();
                Some(if deep {
                    assert_eq!(args.len(), 5, "{l}");
                    (
                        args[0].clone(),
                        args[1].clone(),
                        args[2].clone(),
                        args[3].clone(),
                        args[4].clone(),
                    )
                } else {
                    assert_eq!(args.len(), 2, "{l}");
                    (
                        args[0].clone(),
                        args[1].clone(),
                        "TWO".into(),
                        "false".into(),
                        "false".into(),
                    )
                })
            })
            .collect();
        let mut want: Vec<(String, String, String, String, String)> = TC_KERNELS
            .iter()
            .map(|k| {
                let t = match k.precision {
                    Precision::Tf32 => "TF32",
                    Precision::Bf16 => "BF16",
                    Precision::Fp16 => "FP16",
                    Precision::Fp32 => panic!("{}: fp32", k.name),
                };
                let pipe = match k.dynamic_smem() {
                    0 => "TWO",
                    TC_ASYNC_SMEM => "ASYNC",
                    _ => "STAGED",
                };
                (
                    k.name.to_string(),
                    t.to_string(),
                    pipe.to_string(),
                    k.half_input.to_string(),
                    k.rows.to_string(),
                )
            })
            .collect();
        found.sort();
        want.sort();
        assert_eq!(found, want);
    }
}
