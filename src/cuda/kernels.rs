//! Typed launchers for the kernels in `kernels/*.cu`: each checks its preconditions on the host,
//! picks the variant whose fast-path conditions hold, sizes the grid, and launches on a stream.
//!
//! Device buffers are passed as raw device addresses ([`DPtr`]): the executor keeps every
//! activation in one planned arena and hands out addresses inside it, which cudarc's slice types
//! cannot express without borrowing the whole arena per argument. Callers guarantee that each
//! address points at as many f32 as the launch reads or writes; the launchers check sizes against
//! the kernels' index ranges (31-bit counts where the kernel uses `int`).
//!
//! Launch shapes (threads per block, blocks):
//! - `conv_gemm_vec` / `conv_gemm_any`: 256; (⌈M/128⌉, ⌈ncols/128⌉, splits), 16.6 KB shared;
//!   `conv_tc_*` (tensor cores): the same grid, 37.9 KB shared, or 74 / 93.5 KB of dynamic
//!   shared memory for the deep pipelines;
//!   `conv_wgmma_*` (sm_90a, 16-bit inputs): the same grid, 97 KB dynamic, 2 per multiprocessor;
//!   `conv_splitk_reduce` and the element-wise kernels: 256; grid-stride, ⌈len/256⌉ capped at
//!   8 blocks per multiprocessor; the GroupNorm element-wise passes (`gn_apply*`,
//!   `gn_bwd_apply*`): (channel units, pixels) threads, (pixel blocks, n) blocks, about 8 blocks
//!   per multiprocessor;
//! - `conv_narrow_<ncols>`: 256; (⌈mw/32⌉, ⌈mh/16⌉, n), 59.6-65.7 KB dynamic shared memory;
//!   `conv_few_in_<sc>`: 256; (⌈runs/(256/quads)⌉ capped at 2 blocks per multiprocessor,
//!   ⌈ncols/128⌉), grid-stride over runs of 16 pixels, 4.6-36.9 KB static shared memory;
//! - `linear_rows`, `linear_batch`, `softmax_*`: 256 (8 warps, a warp per output row or
//!   element), grid-stride, capped at 16 blocks per multiprocessor;
//! - `attention_flash_*` (fused attention, [`Kernels::attention_flash`]): 128; (⌈L/64⌉,
//!   head width / 64, images x heads), 70-141 KB dynamic shared memory;
//! - `gemm_batched`: 256; (⌈n/64⌉, ⌈m/64⌉, batch); `gemm_batched_32` (with
//!   `INVDIFF_GEMM_SMALL_TILES=1`, where that grid has fewer blocks than multiprocessors):
//!   (⌈n/32⌉, ⌈m/32⌉, batch); `gemm_batched_tf32` (tf32 tensor cores, [`Gemm::tf32`]): as
//!   `gemm_batched`;
//! - `gn_partial` / `gn_bwd_partial`: 32x8; (chunks, ⌈c/32⌉, n); `gn_*finalize`: 256 threads
//!   (`GN_FIN_THREADS`), a block per (image, group); `gn_one_pass` / `gn_bwd_one_pass`: up to
//!   1024 threads ([`one_pass_shape`]), a block per (image, group), or a cluster of 2-8 along z;
//! - `timing_hold` (profiling only): one block of 32 threads.

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
};
use cudarc::nvrtc::Ptx;

use super::device::{cu, fatbins, sm90a_fatbins, DeviceInfo};
use super::launch::{max_active_clusters, pdl_wanted, Launch};
use super::precision::Precision;
use crate::model::graph::Pad;
use crate::{switches, Error, Result};

/// A raw device address (`CUdeviceptr`); 0 is the null pointer the kernels test for.
pub(crate) type DPtr = u64;

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
    norm: DPtr,
    norm_silu: i32,
    prefetch_w: i32,
    gn_partial: DPtr,
}
const _: () = assert!(std::mem::size_of::<ConvArgs>() == 256);
// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for ConvArgs {}

/// Layers one `linear_batch` launch computes at most (kernels/linear.cu caches their table in
/// shared memory).
pub(crate) const LINEAR_BATCH_MAX: usize = 64;

/// LinearItem of kernels/linear.cu, field for field: one layer of a `linear_batch` launch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct LinearItem {
    w: DPtr,
    bias: DPtr,
    y: DPtr,
    out: i32,
    start: i32,
}
const _: () = assert!(std::mem::size_of::<LinearItem>() == 32);

/// f32 slots one layer takes in a `linear_batch` table.
pub(crate) const LINEAR_ITEM_WORDS: usize = std::mem::size_of::<LinearItem>() / 4;

/// The table a `linear_batch` launch reads, as the f32 words of the buffer that holds it: per
/// layer `(w, bias, y, out)`, its weights `[out, inp]`, bias `[out]` and output `[rows, out]`.
pub(crate) fn linear_batch_table(layers: &[(DPtr, DPtr, DPtr, usize)]) -> Result<Vec<f32>> {
    if layers.is_empty() || layers.len() > LINEAR_BATCH_MAX {
        return Err(Error::Cuda(format!(
            "internal: a batched linear launch of {} layers (1 to {LINEAR_BATCH_MAX})",
            layers.len()
        )));
    }
    let mut start = 0;
    let mut items = Vec::with_capacity(layers.len());
    for &(w, bias, y, out) in layers {
        for (p, what) in [(w, "weights"), (bias, "bias"), (y, "output")] {
            need(p, what)?;
        }
        items.push(LinearItem {
            w,
            bias,
            y,
            out: i32_of(out, "outputs")?,
            start: i32_of(start, "batched outputs")?,
        });
        start += out;
    }
    Ok(bytemuck::cast_slice(&items).to_vec())
}

/// GemmArgs of kernels/gemm.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GemmArgs {
    a: DPtr,
    b: DPtr,
    c: DPtr,
    a_rs: i64,
    a_cs: i64,
    b_rs: i64,
    b_cs: i64,
    c_rs: i64,
    a_bo: i64,
    a_bi: i64,
    b_bo: i64,
    b_bi: i64,
    c_bo: i64,
    c_bi: i64,
    m: i32,
    n: i32,
    k: i32,
    batch_inner: i32,
    alpha: f32,
    accumulate: i32,
}
const _: () = assert!(std::mem::size_of::<GemmArgs>() == 136);
// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for GemmArgs {}

/// FlashArgs of kernels/attention.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FlashArgs {
    qkv: DPtr,
    o: DPtr,
    dout: DPtr,
    y: DPtr,
    lse: DPtr,
    dsum: DPtr,
    tokens: i32,
    heads: i32,
    head_dim: i32,
    scale: f32,
    accumulate: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<FlashArgs>() == 72);
// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for FlashArgs {}

/// Dynamic shared memory of the fused attention kernels (kernels/attention.cu
/// `FLASH_*_SMEM`, which trap when given less): forward, dQ, dK and dV.
const FLASH_SMEM: [u32; 3] = [71_680, 108_800, 144_384];
/// Rows of a fused attention block's tile and columns of its output chunk.
const FLASH_TILE: usize = 64;

/// The kernels a device runs beyond the ones every device does ([`Kernels::capabilities`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// Hopper's wgmma convolutions (compute capability 9.0).
    pub wgmma: bool,
    /// The fused attention kernels (141 KB of shared memory a block).
    pub flash: bool,
    /// Clusters of one-pass GroupNorm blocks.
    pub gn_clusters: bool,
}

impl Capabilities {
    /// The most blocks a one-pass GroupNorm may give a group here ([`plan_norm`]'s
    /// `one_pass_blocks`).
    pub fn one_pass_blocks(&self) -> u32 {
        if self.gn_clusters {
            GN_CLUSTER_MAX
        } else {
            1
        }
    }
}

/// Whether the fused attention kernels take heads of `head_dim` (whole 64-column chunks).
pub(crate) fn flash_fits(head_dim: usize) -> bool {
    head_dim > 0 && head_dim % FLASH_TILE == 0
}

/// One tap of an implicit-GEMM convolution: source offset and weight block (see conv.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tap {
    pub dy: i32,
    pub dx: i32,
    pub w: i32,
}

/// The geometry of one implicit-GEMM launch (kernels/conv.cu explains each field).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConvShape {
    pub n: usize,
    pub mh: usize,
    pub mw: usize,
    pub sh: usize,
    pub sw: usize,
    pub sc: usize,
    pub ncols: usize,
    pub in_stride: usize,
    pub yh: usize,
    pub yw: usize,
    pub out_stride: usize,
    pub out_oy: usize,
    pub out_ox: usize,
    pub taps: Vec<Tap>,
}

/// Zero rows above / columns left of the input of a 3x3 convolution.
fn pad_before(pad: Pad) -> i32 {
    match pad {
        Pad::Symmetric => 1,
        Pad::RightBottom => 0,
    }
}

impl ConvShape {
    /// GEMM rows (output pixels of this launch).
    pub fn rows(&self) -> usize {
        self.n * self.mh * self.mw
    }

    /// Reduction length, taps x source channels.
    pub fn k(&self) -> usize {
        self.taps.len() * self.sc
    }

    /// Forward convolution of an `h x w` input of `cin` channels into `cout` (k = 1 or 3); the
    /// weights are the forward layout `[(tap, ci), co]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        n: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: Pad,
    ) -> Self {
        let (oh, ow) = (h / stride, w / stride);
        let taps = if k == 1 {
            vec![Tap { dy: 0, dx: 0, w: 0 }]
        } else {
            let p = pad_before(pad);
            (0..9)
                .map(|t| Tap {
                    dy: t / 3 - p,
                    dx: t % 3 - p,
                    w: t,
                })
                .collect()
        };
        ConvShape {
            n,
            mh: oh,
            mw: ow,
            sh: h,
            sw: w,
            sc: cin,
            ncols: cout,
            in_stride: stride,
            yh: oh,
            yw: ow,
            out_stride: 1,
            out_oy: 0,
            out_ox: 0,
            taps,
        }
    }

    /// The input-gradient launches of the same convolution (weights in the layout
    /// `[(tap, co), ci]`): one for stride 1 and 1x1; one per parity class of the input pixel
    /// for stride 2, each with only the taps that reach that class.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        n: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: Pad,
    ) -> Vec<Self> {
        let (oh, ow) = (h / stride, w / stride);
        let base = ConvShape {
            n,
            mh: h,
            mw: w,
            sh: oh,
            sw: ow,
            sc: cout,
            ncols: cin,
            in_stride: 1,
            yh: h,
            yw: w,
            out_stride: 1,
            out_oy: 0,
            out_ox: 0,
            taps: vec![Tap { dy: 0, dx: 0, w: 0 }],
        };
        if k == 1 {
            return vec![base];
        }
        if stride == 1 {
            // dx[i] = sum_t dy[i + 1 - d_t] W_t.
            let taps = (0..9)
                .map(|t| Tap {
                    dy: 1 - t / 3,
                    dx: 1 - t % 3,
                    w: t,
                })
                .collect();
            return vec![ConvShape { taps, ..base }];
        }
        // Input row iy = 2j + py receives tap row d when iy + p - d is even, from output row
        // (iy + p - d) / 2 = j + (py + p - d) / 2; likewise for columns.
        let p = pad_before(pad);
        let mut classes = Vec::new();
        for py in 0..2i32 {
            for px in 0..2i32 {
                let rows: Vec<i32> = (0..3).filter(|d| (py + p - d) % 2 == 0).collect();
                let cols: Vec<i32> = (0..3).filter(|d| (px + p - d) % 2 == 0).collect();
                let mut taps = Vec::new();
                for &dy in &rows {
                    for &dx in &cols {
                        taps.push(Tap {
                            dy: (py + p - dy).div_euclid(2),
                            dx: (px + p - dx).div_euclid(2),
                            w: dy * 3 + dx,
                        });
                    }
                }
                let mh = (h + 1 - py as usize) / 2;
                let mw = (w + 1 - px as usize) / 2;
                if mh == 0 || mw == 0 {
                    continue;
                }
                classes.push(ConvShape {
                    mh,
                    mw,
                    out_stride: 2,
                    out_oy: py as usize,
                    out_ox: px as usize,
                    taps,
                    ..base.clone()
                });
            }
        }
        classes
    }

    /// A linear layer over `tokens` rows of each of `n` images as a one-tap product; `inp` is
    /// the reduction width.
    pub fn linear(n: usize, tokens: usize, inp: usize, out: usize) -> Self {
        ConvShape {
            n,
            mh: 1,
            mw: tokens,
            sh: 1,
            sw: tokens,
            sc: inp,
            ncols: out,
            in_stride: 1,
            yh: 1,
            yw: tokens,
            out_stride: 1,
            out_oy: 0,
            out_ox: 0,
            taps: vec![Tap { dy: 0, dx: 0, w: 0 }],
        }
    }
}

/// Which implicit-GEMM kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConvKernel {
    /// 16-byte loads; needs sc % 8 == 0, ncols % 4 == 0 and aligned pointers.
    Vec,
    /// Scalar loads, any sizes.
    Any,
    /// Direct, few outputs: ncols <= 8, in_stride 1, taps in a 3x3 window
    /// (`conv_narrow_<ncols>`: a halo tile of activations in shared memory).
    Narrow,
    /// Direct, few inputs: sc <= 8, in_stride 1, taps in a 3x3 window (`conv_few_in_<sc>`:
    /// the weights in shared memory, a run of pixels x 4 columns per thread).
    FewIn,
    /// Tensor cores (kernels/conv_tc.cu) in tf32, bf16 or fp16 (never fp32); needs sc % 8 == 0,
    /// ncols % 8 == 0 and aligned pointers. Reads the weights in that precision's layout (see
    /// `DevWeights::conv_ptr`).
    Tensor(Precision),
}

/// How one implicit-GEMM launch is split (decided when the program is built, because the
/// split-K workspace is part of the memory plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvLaunch {
    pub kernel: ConvKernel,
    pub splits: usize,
    pub k_per_split: usize,
    /// Tensor cores only: the deeper pipeline (kernels/conv_tc.cu: ASYNC for tf32 and 16-bit
    /// inputs, STAGED for fp32 inputs into bf16/fp16) instead of the two-stage one. Same
    /// results either way.
    pub deep: bool,
    /// The input is already in the tensor-core kernel's 16-bit precision (two elements per
    /// f32 slot), written so by the op before it; only with `ConvKernel::Tensor` in bf16 or
    /// fp16 and `deep`. Set by the lowering, which knows where each input comes from. (With
    /// a [`NormInput`], the halo tile makes those 16-bit values from a GroupNorm's input.)
    pub half_input: bool,
    /// Hopper's warpgroup products (kernels/conv_wgmma.cu) instead of mma.sync: only with
    /// `half_input`, K split in multiples of [`WGMMA_SLICE`], and the weights read K-major
    /// (the other direction's layout, [`crate::cuda::program::W::k_major`]).
    pub wgmma: bool,
    /// With `wgmma` and 2 to [`MAX_CLUSTER_SPLITS`] splits: the splits of each tile run as one
    /// thread-block cluster and sum their partial products through distributed shared memory
    /// (kernels/conv_wgmma.cu `cluster_reduce`) instead of the workspace and
    /// `conv_splitk_reduce`: the same sums in the same order, one launch, no workspace.
    pub cluster: bool,
    /// Tensor cores with `deep` (mma.sync or wgmma): the epilogue that issues each row's
    /// loads (bias, time embedding, residual) four pairs at a time before storing them
    /// (`ROWS` in kernels/conv_tc.cu and conv_wgmma.cu, the `_rows` kernels) instead of pair
    /// by pair; the same arithmetic.
    pub row_epilogue: bool,
    /// With `wgmma`: its tile; with `cluster` only one that [`WgmmaTile::clusters`].
    pub tile: WgmmaTile,
    /// Tensor cores: every block first asks L2 for the weights it will read, before waiting
    /// for the grid it depends on (`prefetch_tap` in kernels/conv_common.cuh): a hint, the
    /// same results.
    pub prefetch_weights: bool,
    /// With a halo tile: what it does to the input as it loads it ([`ConvPtrs::norm`]).
    pub norm_input: NormInput,
}

/// The input of a halo-tile convolution: its 16-bit operand, or the fp32 input of the
/// GroupNorm that would have written it, normalised with that GroupNorm's per-channel scale
/// and shift ([`ConvPtrs::norm`]), then SiLU, as the tile loads it: the same 16-bit values,
/// without the GroupNorm's own pass over them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum NormInput {
    /// `x` is the 16-bit operand.
    #[default]
    None,
    /// `x` is a GroupNorm's fp32 input: scale and shift it.
    Affine,
    /// The same, then SiLU.
    AffineSilu,
}

/// The tile of a wgmma launch (kernels/conv_wgmma.cu `WgTile` and `HaloTile`): for a given
/// split of K the others compute the same sums in the same order, and the two halo tiles the
/// same sums in an order of their own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum WgmmaTile {
    /// 128 rows, three stages, two blocks per multiprocessor (`PlainTile`).
    #[default]
    Plain,
    /// 256 rows of four warpgroups, one block per multiprocessor (`TallTile`, the `_tall`
    /// kernels): half the weight traffic per product.
    Tall,
    /// 128 rows alone on the multiprocessor with six stages, four slices of copies ahead
    /// (`SixStageTile`, the `_6stage` kernels), for launches of at most one block per
    /// multiprocessor.
    SixStages,
    /// 128 rows whose A operand is a shared-memory halo of the tile's pixels, copied once per
    /// 32 channels for all nine taps (`PlainHaloTile`, the `_halo` kernels): only the shapes
    /// [`halo_fits`] takes, K split by channel slices ([`on_tile`]). It sums K in another
    /// order (channel slices outer).
    Halo,
    /// The halo tile with 256 rows of four warpgroups, one block per multiprocessor
    /// (`TallHaloTile`, the `_tall_halo` kernels): the same sums as [`WgmmaTile::Halo`].
    TallHalo,
}

impl WgmmaTile {
    /// In the order of [`Kernels`]' wgmma tables, with each one's kernel name suffix.
    pub(crate) const ALL: [(WgmmaTile, &'static str); 5] = [
        (WgmmaTile::Plain, ""),
        (WgmmaTile::Tall, "_tall"),
        (WgmmaTile::SixStages, "_6stage"),
        (WgmmaTile::Halo, "_halo"),
        (WgmmaTile::TallHalo, "_tall_halo"),
    ];

    /// "wgmma" and the tile in words, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            WgmmaTile::Plain => "wgmma",
            WgmmaTile::Tall => "wgmma, tall",
            WgmmaTile::SixStages => "wgmma, six stages",
            WgmmaTile::Halo => "wgmma, halo",
            WgmmaTile::TallHalo => "wgmma, tall halo",
        }
    }

    /// Output rows of one block.
    pub fn rows(self) -> usize {
        match self {
            WgmmaTile::Tall | WgmmaTile::TallHalo => 256,
            _ => TILE,
        }
    }

    /// The K one step of its mainloop multiplies (what the cycle probe counts): one tap of
    /// [`HALO_CHANNELS`] channels in the halo tiles, [`WGMMA_SLICE`] otherwise.
    pub fn k_step(self) -> usize {
        if self.is_halo() {
            HALO_CHANNELS
        } else {
            WGMMA_SLICE
        }
    }

    /// What K is split in multiples of: all nine taps of [`HALO_CHANNELS`] channels in the
    /// halo tiles, [`WGMMA_SLICE`] otherwise.
    pub fn split_unit(self) -> usize {
        if self.is_halo() {
            9 * HALO_CHANNELS
        } else {
            WGMMA_SLICE
        }
    }

    fn threads(self) -> u32 {
        match self {
            WgmmaTile::Tall | WgmmaTile::TallHalo => 512,
            _ => BLOCK,
        }
    }

    /// Dynamic shared memory: three stages of two 16 KB operand tiles, four of a 32 KB and a
    /// 16 KB tile, or six of two 16 KB tiles, plus 1 KB to align them; or two halos of
    /// 3 x (rows + 2) pixels x 64 bytes and six (eight when tall) 8 KB weight stages, plus
    /// 128 bytes.
    fn smem(self) -> u32 {
        match self {
            WgmmaTile::Plain => 99_328,
            WgmmaTile::Tall | WgmmaTile::SixStages => 197_632,
            WgmmaTile::Halo => 99_200,
            WgmmaTile::TallHalo => 164_736,
        }
    }

    /// Whether this is one of the halo tiles, which sum K in their own order.
    pub fn is_halo(self) -> bool {
        matches!(self, WgmmaTile::Halo | WgmmaTile::TallHalo)
    }

    /// Whether this tile's kernels reduce split K within a cluster (`cluster_reduce`): the
    /// 128-row ones.
    pub fn clusters(self) -> bool {
        matches!(self, WgmmaTile::Plain | WgmmaTile::Halo)
    }

    /// Whether this tile's kernels compute launch `l` of `s`: any wgmma launch, clusters only
    /// where [`WgmmaTile::clusters`], and the halo tiles only the shapes [`halo_fits`] takes
    /// at their row count, K split by whole [`WgmmaTile::split_unit`]s into splits none of
    /// which is empty.
    pub fn takes(self, s: &ConvShape, l: &ConvLaunch) -> bool {
        if l.cluster && !self.clusters() {
            return false;
        }
        if !self.is_halo() {
            return true;
        }
        let slices = s.sc / HALO_CHANNELS;
        let per = l.k_per_split / self.split_unit();
        halo_fits(s, self.rows())
            && l.k_per_split % self.split_unit() == 0
            && per > 0
            && l.splits == slices.div_ceil(per)
    }
}

/// Channels of one step of the halo tiles' mainloop (kernels/conv_wgmma.cu `HALO_BK`).
const HALO_CHANNELS: usize = 32;

/// Wgmma launch `l` of `s` (on a tile other than the halo ones) moved to `tile`: the same
/// split, or for a halo tile K re-split into at most as many splits by whole channel slices
/// (each split takes all nine taps of its channels; a cluster stays one while there are
/// splits to reduce). `None` where the tile does not take `s`, or `l` reduces in a cluster
/// and the tile cannot.
pub(crate) fn on_tile(l: ConvLaunch, s: &ConvShape, tile: WgmmaTile) -> Option<ConvLaunch> {
    if !l.wgmma || l.tile.is_halo() || (l.cluster && !tile.clusters()) {
        return None;
    }
    if !tile.is_halo() {
        return Some(ConvLaunch { tile, ..l });
    }
    if !halo_fits(s, tile.rows()) {
        return None;
    }
    let slices = s.sc / HALO_CHANNELS;
    let per = slices.div_ceil(l.splits.max(1));
    let splits = slices.div_ceil(per);
    Some(ConvLaunch {
        tile,
        splits,
        k_per_split: per * tile.split_unit(),
        cluster: l.cluster && splits > 1,
        ..l
    })
}

/// Most splits of K one cluster reduces (the portable cluster size).
pub(crate) const MAX_CLUSTER_SPLITS: usize = 8;

/// Block tile of the GEMM kernels, and the K slice.
const TILE: usize = 128;
const BK: usize = 8;

/// K slice of the tensor-core kernel: 64 bytes of a row.
fn tc_slice(p: Precision) -> usize {
    if p == Precision::Tf32 {
        16
    } else {
        32
    }
}

/// K slice of the wgmma convolutions: 64 16-bit values, one 128-byte swizzled row.
pub(crate) const WGMMA_SLICE: usize = 64;

/// A wgmma launch of `s` (16-bit input, bf16 or fp16 products): the tensor-core split-K rule
/// over its 64-deep K slices. `None` where the kernel's channel and precision conditions fail.
pub(crate) fn plan_wgmma(s: &ConvShape, sms: usize, precision: Precision) -> Option<ConvLaunch> {
    if !precision.is_half() || s.ncols <= 8 || s.sc % 8 != 0 || s.ncols % 8 != 0 {
        return None;
    }
    let mut l = split_k(s, ConvKernel::Tensor(precision), WGMMA_SLICE, sms);
    l.deep = true;
    l.half_input = true;
    l.wgmma = true;
    Some(l)
}

/// The wgmma launch of `s` with K split for a cluster's reduction: at most
/// [`MAX_CLUSTER_SPLITS`] splits, chosen by the tensor-core cost with [`CLUSTER_SPLIT_SLICES`]
/// for the partial sums. `None` where the wgmma kernel does not take `s`.
pub(crate) fn plan_wgmma_clustered(
    s: &ConvShape,
    sms: usize,
    precision: Precision,
) -> Option<ConvLaunch> {
    let mut l = plan_wgmma(s, sms, precision)?;
    let clustered = split_k_by(s, l.kernel, WGMMA_SLICE, 2 * sms.max(1), |t, k, slots| {
        tc_splits(t, k, slots, MAX_CLUSTER_SPLITS, CLUSTER_SPLIT_SLICES)
    });
    l.splits = clustered.splits;
    l.k_per_split = clustered.k_per_split;
    Some(l)
}

/// The six-stage wgmma launch of `s` ([`WgmmaTile::SixStages`]): K split for one block per
/// multiprocessor. `None` where the wgmma kernel does not take `s`, or where even so split the
/// launch would have more blocks than multiprocessors.
pub(crate) fn plan_wgmma_six(
    s: &ConvShape,
    sms: usize,
    precision: Precision,
) -> Option<ConvLaunch> {
    let mut l = plan_wgmma(s, sms, precision)?;
    let alone = split_k_on(s, l.kernel, WGMMA_SLICE, sms.max(1));
    let tiles = s.rows().div_ceil(TILE) * s.ncols.div_ceil(TILE);
    if tiles * alone.splits > sms {
        return None;
    }
    l.splits = alone.splits;
    l.k_per_split = alone.k_per_split;
    l.tile = WgmmaTile::SixStages;
    Some(l)
}

/// Whether a halo tile of `rows` rows (128: [`WgmmaTile::Halo`], 256:
/// [`WgmmaTile::TallHalo`]) computes `s`: nine taps at distinct offsets of one 3x3 window at
/// in_stride 1 (a 3x3 stride-1 convolution or its input gradient), channels in slices of 32,
/// and rows that tile by `rows` without leaving an image, each warpgroup's 64 on one row:
/// `mw` a multiple of 64 that divides `rows` or that `rows` divides.
pub(crate) fn halo_fits(s: &ConvShape, rows: usize) -> bool {
    s.taps.len() == 9
        && direct_fits(s)
        && s.sc % HALO_CHANNELS == 0
        && s.mw % 64 == 0
        && (rows % s.mw == 0 || s.mw % rows == 0)
        && (s.mh * s.mw) % rows == 0
}

/// Whether launch `plan` of `s` can write the GroupNorm partial sums of its output
/// ([`ConvPtrs::gn_partial`]): a halo tile, unsplit, each output row the pixel of the same
/// index, so that a tile's rows are one chunk of one image.
pub(crate) fn gn_partial_fits(s: &ConvShape, plan: &ConvLaunch) -> bool {
    plan.tile.is_halo()
        && halo_fits(s, plan.tile.rows())
        && plan.splits == 1
        && !plan.cluster
        && s.out_stride == 1
        && (s.out_oy, s.out_ox) == (0, 0)
        && (s.yh, s.yw) == (s.mh, s.mw)
}

/// Most output channels of [`ConvKernel::Narrow`] and source channels of [`ConvKernel::FewIn`]:
/// kernels/conv.cu has one kernel per count.
const DIRECT_MAX: usize = 8;

/// Whether the direct kernels (kernels/conv.cu, `conv_narrow_*` and `conv_few_in_*`) can
/// compute `s`: in_stride 1, and 1 to 9 taps at distinct offsets inside one 3x3 window (which
/// every stride-1 or 1x1 forward and every input gradient has).
fn direct_fits(s: &ConvShape) -> bool {
    let (Some(dy0), Some(dx0)) = (
        s.taps.iter().map(|t| t.dy).min(),
        s.taps.iter().map(|t| t.dx).min(),
    ) else {
        return false;
    };
    let mut seen = [false; 9];
    s.in_stride == 1
        && s.taps.len() <= 9
        && s.taps.iter().all(|t| {
            let (ry, rx) = (t.dy - dy0, t.dx - dx0);
            let fits = ry <= 2 && rx <= 2;
            let cell = (3 * ry + rx) as usize;
            fits && !std::mem::replace(&mut seen[cell], true)
        })
}

/// Chooses the kernel and the split of K for `s` on a device with `sms` multiprocessors.
///
/// Few output or few source channels (the 3-channel image convolutions) take the direct
/// kernels where they fit. Otherwise the GEMM: two 256-thread blocks fit on a multiprocessor
/// (128 registers per thread). When the tile grid alone leaves slots empty, K is split so as to
/// minimise waves per unit of work (ties go to fewer splits, which cost a workspace round
/// trip), keeping at least 8 K slices per split.
pub(crate) fn plan_conv(s: &ConvShape, sms: usize) -> ConvLaunch {
    if direct_fits(s) && (s.ncols <= DIRECT_MAX || s.sc <= DIRECT_MAX) {
        let kernel = if s.ncols <= DIRECT_MAX {
            ConvKernel::Narrow
        } else {
            ConvKernel::FewIn
        };
        return ConvLaunch::new(kernel, 1, s.k());
    }
    let kernel = if s.sc % 8 == 0 && s.ncols % 4 == 0 {
        ConvKernel::Vec
    } else {
        ConvKernel::Any
    };
    split_k(s, kernel, BK, sms)
}

/// [`plan_conv`] at `precision`: the tensor-core kernel wherever its preconditions hold (the
/// same split-K rule over its longer K slices), the fp32 kernels elsewhere and for fp32.
pub(crate) fn plan_conv_at(s: &ConvShape, sms: usize, precision: Precision) -> ConvLaunch {
    if precision == Precision::Fp32 || s.ncols <= 8 || s.sc % 8 != 0 || s.ncols % 8 != 0 {
        return plan_conv(s, sms);
    }
    split_k(s, ConvKernel::Tensor(precision), tc_slice(precision), sms)
}

/// The split of K for `kernel` with K slices of `bk`.
fn split_k(s: &ConvShape, kernel: ConvKernel, bk: usize, sms: usize) -> ConvLaunch {
    split_k_on(s, kernel, bk, 2 * sms.max(1))
}

/// [`split_k`] for `slots` blocks running at once.
fn split_k_on(s: &ConvShape, kernel: ConvKernel, bk: usize, slots: usize) -> ConvLaunch {
    split_k_by(s, kernel, bk, slots, |tiles, ktiles, slots| match kernel {
        ConvKernel::Tensor(_) => tc_splits(tiles, ktiles, slots, 64, SPLIT_SLICES),
        _ => simt_splits(tiles, ktiles, slots),
    })
}

/// The launch of `kernel` with K in whole slices of `bk` split as `choose(tiles, K slices,
/// slots)` asks (a rule below), rounded to equal whole slices per split.
fn split_k_by(
    s: &ConvShape,
    kernel: ConvKernel,
    bk: usize,
    slots: usize,
    choose: impl Fn(usize, usize, usize) -> usize,
) -> ConvLaunch {
    let k = s.k();
    let tiles = s.rows().div_ceil(TILE) * s.ncols.div_ceil(TILE);
    let ktiles = k.div_ceil(bk).max(1);
    let per = ktiles.div_ceil(choose(tiles, ktiles, slots)) * bk;
    ConvLaunch::new(kernel, k.div_ceil(per).max(1), per)
}

/// The fp32 kernels: the fewest waves of blocks per split, each split at least 8 K slices, a
/// further split only for a 5% gain.
fn simt_splits(tiles: usize, ktiles: usize, slots: usize) -> usize {
    let max_splits = (ktiles / 8).clamp(1, 64);
    let mut best = (1usize, f64::INFINITY);
    for splits in 1..=max_splits {
        let waves = (tiles * splits).div_ceil(slots) as f64;
        let cost = waves / splits as f64;
        if cost < best.1 * 0.95 {
            best = (splits, cost);
        }
    }
    best.0
}

/// What a block's partial sums cost when K is split, in K slices (fitted, below): the workspace
/// round trip and the reduction launch.
const SPLIT_SLICES: f64 = 8.0;
/// The same for splits that reduce in a thread-block cluster (distributed shared memory, no
/// workspace, no reduction launch). A guess, not a fit: `INVDIFF_CLUSTER_SPLITK=plan` is timed
/// on a GPU beside `=1` to tell.
const CLUSTER_SPLIT_SLICES: f64 = 2.0;

/// The tensor-core kernels: a cost in K slices, fitted to every launch of the celebahq network
/// timed under every split on an H200 (`kernels_cuda --sweep`, batch 1 and 8, 2026-11-26): each
/// wave of blocks costs its slices plus about 4 more (prologue, pipeline fill, epilogue), and
/// splitting costs about 8 slices per block's worth of partial sums (the workspace round trip
/// and the reduction). Against the former rule (the SIMT one) it took the tensor-core launches
/// of a batch-1 forward + VJP from 9.89 to 9.37 ms and left batch 8 unchanged (23.90 / 23.87 ms):
/// the small low-resolution launches were latency-bound and wanted more, shorter splits.
///
/// `max_splits` and `split_slices` (the cost of a block's partial sums, [`SPLIT_SLICES`] through
/// a workspace) are parameters for [`plan_wgmma_clustered`].
fn tc_splits(
    tiles: usize,
    ktiles: usize,
    slots: usize,
    max_splits: usize,
    split_slices: f64,
) -> usize {
    const WAVE_SLICES: f64 = 4.0;
    let mut best = (1usize, f64::INFINITY);
    for want in 1..=ktiles.min(max_splits) {
        // The split a per-split length of ceil(ktiles / want) slices really gives.
        let per = ktiles.div_ceil(want);
        let splits = ktiles.div_ceil(per);
        let waves = (tiles * splits).div_ceil(slots) as f64;
        let mut cost = waves * (per as f64 + WAVE_SLICES);
        if splits > 1 {
            cost += split_slices * (splits * tiles) as f64 / slots as f64;
        }
        if cost < best.1 {
            best = (splits, cost);
        }
    }
    best.0
}

impl ConvLaunch {
    /// `kernel` over `splits` splits of `k_per_split`, with every pipeline choice off.
    fn new(kernel: ConvKernel, splits: usize, k_per_split: usize) -> Self {
        ConvLaunch {
            kernel,
            splits,
            k_per_split,
            deep: false,
            half_input: false,
            wgmma: false,
            cluster: false,
            row_epilogue: false,
            tile: WgmmaTile::Plain,
            norm_input: NormInput::None,
            prefetch_weights: false,
        }
    }

    /// f32 elements of split-K workspace the launch needs (none when a cluster reduces).
    pub fn workspace_len(&self, s: &ConvShape) -> usize {
        if self.splits > 1 && !self.cluster {
            self.splits * s.rows() * s.ncols
        } else {
            0
        }
    }
}

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
    /// With [`ConvLaunch::norm_input`]: the GroupNorm's scale and shift, `[n][2][sc]`
    /// (`x` then holds its fp32 input).
    pub norm: DPtr,
    /// Halo tiles, unsplit, output rows in pixel order: where the epilogue also writes the
    /// GroupNorm partial sums of the output, in kernels/norm.cu's layout with one chunk per
    /// tile ([`NormSplit::from_producer`]).
    pub gn_partial: DPtr,
}

/// The grid of a one-pass GroupNorm over `groups` (image, group) pairs: `shape.blocks` along z.
fn one_pass_grid(groups: usize, shape: OnePass) -> LaunchConfig {
    cfg((groups as u32, 1, shape.blocks), (shape.threads, 1, 1))
}

/// A one-pass GroupNorm of several blocks a group launches them as one cluster.
fn one_pass_clusters(b: &mut Launch<'_>, shape: OnePass) {
    if shape.blocks > 1 {
        b.cluster_z(shape.blocks);
    }
}

/// Threads of a GroupNorm finalize block (`FIN_THREADS` in kernels/norm.cu).
const GN_FIN_THREADS: u32 = 256;

/// How a GroupNorm runs: in three launches with `chunks` blocks of `chunk_px` pixels per
/// (image, 32 channels) for the partial sums, or, where `one_pass` gives a launch shape, in one
/// launch (kernels/norm.cu `gn_one_pass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NormSplit {
    pub chunks: usize,
    pub chunk_px: usize,
    pub one_pass: Option<OnePass>,
    /// The partial sums come from the convolution that wrote the input (its epilogue,
    /// [`ConvPtrs::gn_partial`]: chunks of one tile's rows), so `gn_partial` does not run.
    pub from_producer: bool,
}

/// Pixels of its group one thread of the one-pass GroupNorm holds (`ONE_PASS_PIXELS`).
const GN_ONE_PASS_PIXELS: usize = 8;

/// The launch of a one-pass GroupNorm: `threads` a block, `blocks` per (image, group) (a
/// thread-block cluster along z when more than one, whose blocks add their sums through
/// distributed shared memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OnePass {
    pub threads: u32,
    pub blocks: u32,
}

/// Most blocks of a one-pass GroupNorm's cluster (the portable cluster size).
pub(crate) const GN_CLUSTER_MAX: u32 = 8;

/// The one-pass launch for groups of `cg` channels over `hw` pixels with at most `max_blocks`
/// blocks a group: the fewest blocks (1, 2, 4 or 8) whose blocks need at most 1024 threads,
/// each `cg` threads per pixel row, enough rows that each thread holds at most
/// `GN_ONE_PASS_PIXELS` pixels, rounded up to whole warps; `None` where even `max_blocks`
/// blocks are not enough (one block takes groups of up to 8192 elements when `cg` divides
/// 1024), where three launches fill the device better anyway.
pub(crate) fn one_pass_shape(hw: usize, cg: usize, max_blocks: u32) -> Option<OnePass> {
    [1, 2, 4, 8]
        .into_iter()
        .take_while(|&blocks| blocks <= max_blocks)
        .find_map(|blocks| {
            let rows = hw.div_ceil(GN_ONE_PASS_PIXELS * blocks as usize);
            let threads = (cg.max(1) * rows).next_multiple_of(32);
            (threads <= 1024).then_some(OnePass {
                threads: threads as u32,
                blocks,
            })
        })
}

/// Enough blocks to fill every multiprocessor about eight times over (eight 256-thread blocks
/// are what one holds, and the partial sums are bound by bytes in flight), at least 8 pixels a
/// block; one pass instead where `one_pass_blocks` (the most blocks a group may take, 0 for
/// never) allows it and the groups are small enough.
pub(crate) fn plan_norm(
    n: usize,
    hw: usize,
    c: usize,
    groups: usize,
    sms: usize,
    one_pass_blocks: u32,
) -> NormSplit {
    let per_chunk = n * c.div_ceil(32);
    let want = (8 * sms.max(1)).div_ceil(per_chunk.max(1));
    let chunks = want.clamp(1, hw.div_ceil(8).max(1));
    let chunk_px = hw.div_ceil(chunks).max(1);
    NormSplit {
        chunks: hw.div_ceil(chunk_px).max(1),
        chunk_px,
        one_pass: one_pass_shape(hw, c / groups.max(1), one_pass_blocks),
        from_producer: false,
    }
}

/// The distinct ways a GroupNorm of these sizes can run, for the selftest and the sweep: three
/// launches, then one pass in one block a group and in clusters of up to `max_blocks` where the
/// groups allow them.
pub(crate) fn norm_forms(
    n: usize,
    hw: usize,
    c: usize,
    groups: usize,
    sms: usize,
    max_blocks: u32,
) -> Vec<NormSplit> {
    let mut out: Vec<NormSplit> = Vec::new();
    for blocks in [0, 1, max_blocks] {
        let split = plan_norm(n, hw, c, groups, sms, blocks);
        if (blocks == 0 || split.one_pass.is_some()) && !out.contains(&split) {
            out.push(split);
        }
    }
    out
}

impl NormSplit {
    /// f32 elements of the f64 partial sums (sum and sum of squares per chunk and channel).
    pub fn partial_len(&self, n: usize, c: usize) -> usize {
        4 * n * self.chunks * c
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Cuda(format!(
            "{what} = {v} is too large for the kernels' 32-bit indices"
        ))
    })
}

/// The kernels' code for a 16-bit format (common.cuh, `pack_half2`).
fn half_kind(p: Precision) -> Result<i32> {
    match p {
        Precision::Bf16 => Ok(1),
        Precision::Fp16 => Ok(2),
        other => Err(Error::Cuda(format!(
            "internal: no 16-bit values in {other}"
        ))),
    }
}

/// [`i32_of`] of each `(value, name)`.
fn i32s<const N: usize>(vals: [(usize, &str); N]) -> Result<[i32; N]> {
    let mut out = [0; N];
    for (o, (v, what)) in out.iter_mut().zip(vals) {
        *o = i32_of(v, what)?;
    }
    Ok(out)
}

fn i64_of(v: usize) -> i64 {
    v as i64
}

/// Handles to every kernel of the embedded fatbins.
pub(crate) struct Kernels {
    sms: u32,
    /// Launches use programmatic dependent launch (src/cuda/launch.rs).
    pdl: bool,
    /// Batched products that would leave multiprocessors idle take 32-wide tiles
    /// (`INVDIFF_GEMM_SMALL_TILES=1`; off until timed on a GPU).
    small_tiles: bool,
    conv_gemm_vec: CudaFunction,
    conv_gemm_any: CudaFunction,
    conv_splitk_reduce: CudaFunction,
    /// `conv_narrow_<ncols>` at index ncols - 1, with its dynamic shared memory allowed.
    conv_narrow: Vec<CudaFunction>,
    /// `conv_few_in_<sc>` at index sc - 1.
    conv_few_in: Vec<CudaFunction>,
    conv_weight_transpose: CudaFunction,
    /// The tensor-core convolutions, in the order of [`TC_KERNELS`].
    conv_tc: Vec<CudaFunction>,
    tc_convert: CudaFunction,
    gemm_batched: CudaFunction,
    gemm_batched_32: CudaFunction,
    gemm_batched_tf32: CudaFunction,
    softmax_forward: CudaFunction,
    softmax_backward: CudaFunction,
    /// `attention_flash_forward`, `_backward_dq`, `_backward_dkv`, their shared memory allowed;
    /// on devices that give a block that much ([`FLASH_SMEM`]) only.
    attention_flash: Option<[CudaFunction; 3]>,
    /// The one-pass GroupNorms can run as clusters of [`GN_CLUSTER_MAX`] blocks of 1024
    /// threads here (compute capability 9.0, and the driver says such a cluster fits).
    gn_clusters: bool,
    linear_rows: CudaFunction,
    linear_batch: CudaFunction,
    gn_partial: CudaFunction,
    gn_finalize: CudaFunction,
    gn_apply: CudaFunction,
    gn_apply_half: CudaFunction,
    gn_bwd_partial: CudaFunction,
    gn_bwd_finalize: CudaFunction,
    gn_bwd_apply: CudaFunction,
    gn_bwd_apply_half: CudaFunction,
    gn_one_pass: CudaFunction,
    gn_bwd_one_pass: CudaFunction,
    nchw_to_nhwc: CudaFunction,
    nhwc_to_nchw: CudaFunction,
    upsample2x: CudaFunction,
    upsample2x_half: CudaFunction,
    upsample2x_backward: CudaFunction,
    concat_channels: CudaFunction,
    concat_backward: CudaFunction,
    add_into: CudaFunction,
    div_inplace: CudaFunction,
    timestep_embedding: CudaFunction,
    timing_hold: CudaFunction,
    /// `conv_wgmma_bf16`, `conv_wgmma_fp16`, their `_rows` forms, then the `_tall`, `_6stage`,
    /// `_halo` and `_tall_halo` forms of all four ([`wgmma_index`]): on compute capability 9.0
    /// only.
    conv_wgmma: Option<[CudaFunction; 20]>,
    /// The same kernels with cycle counters (`_probe`), for [`Kernels::conv_probe`].
    conv_wgmma_probe: Option<[CudaFunction; 20]>,
}

const BLOCK: u32 = 256;

/// Dynamic shared memory of the deep tensor-core pipelines (kernels/conv_tc.cu): ASYNC, four
/// stages of 18,944 bytes; STAGED, three stages of 25,088 bytes and two 10,240-byte A tiles.
const TC_ASYNC_SMEM: u32 = 75_776;
const TC_STAGED_SMEM: u32 = 95_744;
/// Where wgmma launch `plan`'s kernel sits in [`Kernels`]' tables: bf16 or fp16, then the
/// pairwise or row epilogue, then the tile ([`WgmmaTile::ALL`]'s order).
fn wgmma_index(precision: Precision, plan: &ConvLaunch) -> usize {
    let tile = WgmmaTile::ALL
        .iter()
        .position(|&(t, _)| t == plan.tile)
        .unwrap_or(0);
    usize::from(precision == Precision::Fp16) + 2 * usize::from(plan.row_epilogue) + 4 * tile
}
/// The wgmma kernels of one of [`Kernels`]' tables in [`wgmma_index`] order (precision, then
/// epilogue, then tile), each with its tile: the plain ones (`suffix` "") or the cycle-counting
/// ones ("_probe").
fn wgmma_kernel_names(suffix: &str) -> Vec<(String, WgmmaTile)> {
    let mut out = Vec::new();
    for (tile, name) in WgmmaTile::ALL {
        for rows in ["", "_rows"] {
            for t in ["bf16", "fp16"] {
                out.push((format!("conv_wgmma_{t}{rows}{name}{suffix}"), tile));
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
struct TcKernel {
    name: &'static str,
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
    fn dynamic_smem(&self) -> u32 {
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
const TC_KERNELS: [TcKernel; 13] = {
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
fn narrow_smem(ncols: usize) -> u32 {
    (3 * (18 * 34 * 8 * 4 + 9 * 8 * 4 * ncols)) as u32
}

/// Output tile of `conv_narrow_*` (columns, rows) and run length of `conv_few_in_*`.
const NARROW_TILE: (usize, usize) = (32, 16);
const FEW_IN_RUN: usize = 16;
const FEW_IN_COLS: usize = 128;

/// Lets `f` use `bytes` of dynamic shared memory, beyond the 48 KB a launch gets by default,
/// and asks for the largest shared-memory share of the multiprocessor, so that two such blocks
/// fit side by side.
fn allow_smem(ctx: &CudaContext, f: CudaFunction, bytes: u32) -> Result<CudaFunction> {
    use sys::CUfunction_attribute::*;
    // cudarc's set_attribute does not make the context current itself.
    cu(ctx.bind_to_thread(), "binding the CUDA context")?;
    cu(
        f.set_attribute(
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        ),
        "allowing a kernel more than 48 KB of shared memory",
    )?;
    cu(
        f.set_attribute(CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100),
        "preferring shared memory over L1 for a kernel",
    )?;
    Ok(f)
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// Non-null check for pointers a kernel dereferences unconditionally.
fn need(p: DPtr, what: &str) -> Result<()> {
    if p == 0 {
        return Err(Error::Cuda(format!(
            "internal: null device pointer for {what}"
        )));
    }
    Ok(())
}

impl Kernels {
    /// Loads every module and looks up every kernel; a fatbin without code for this device
    /// fails here with the driver's message.
    pub fn load(ctx: &Arc<CudaContext>, info: &DeviceInfo) -> Result<Kernels> {
        let mut modules = Vec::new();
        for (name, image) in fatbins() {
            let m = cu(
                ctx.load_module(Ptx::from_binary(image.to_vec())),
                &format!("loading kernel module `{name}` on {}", info.name),
            )?;
            modules.push((*name, m));
        }
        let get = |module: &str, f: &str| -> Result<CudaFunction> {
            let (_, m) = modules.iter().find(|(n, _)| *n == module).ok_or_else(|| {
                Error::Cuda(format!(
                    "kernel module `{module}` is missing from this build"
                ))
            })?;
            cu(m.load_function(f), &format!("looking up kernel `{f}`"))
        };
        // The tensor-core convolutions, the deep pipelines allowed their dynamic shared memory.
        let conv_tc = TC_KERNELS
            .iter()
            .map(|k| {
                let f = get("conv_tc", k.name)?;
                match k.dynamic_smem() {
                    0 => Ok(f),
                    bytes => allow_smem(ctx, f, bytes),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        // Hopper's wgmma kernels exist as sm_90a machine code only.
        let wgmma_module = sm90a_fatbins().iter().find(|(n, _)| *n == "conv_wgmma");
        let (conv_wgmma, conv_wgmma_probe) = match wgmma_module {
            Some((name, image)) if info.compute_capability == (9, 0) => {
                let m = cu(
                    ctx.load_module(Ptx::from_binary(image.to_vec())),
                    &format!("loading kernel module `{name}` on {}", info.name),
                )?;
                let f = |f: &str, bytes: u32| -> Result<CudaFunction> {
                    let f = cu(m.load_function(f), &format!("looking up kernel `{f}`"))?;
                    allow_smem(ctx, f, bytes)
                };
                let all = |suffix: &str| -> Result<[CudaFunction; 20]> {
                    let out = wgmma_kernel_names(suffix)
                        .iter()
                        .map(|(kernel, tile)| f(kernel, tile.smem()))
                        .collect::<Result<Vec<_>>>()?;
                    out.try_into()
                        .map_err(|_| Error::Cuda("internal: wgmma kernel table".into()))
                };
                (Some(all("")?), Some(all("_probe")?))
            }
            _ => (None, None),
        };
        // The fused attention where a block may have its shared memory.
        let attention_flash = if FLASH_SMEM.iter().all(|&b| b <= info.max_block_smem) {
            let names = [
                "attention_flash_forward",
                "attention_flash_backward_dq",
                "attention_flash_backward_dkv",
            ];
            let mut fs = Vec::new();
            for (name, bytes) in names.into_iter().zip(FLASH_SMEM) {
                fs.push(allow_smem(ctx, get("attention", name)?, bytes)?);
            }
            Some(
                fs.try_into()
                    .map_err(|_| Error::Cuda("internal: fused attention kernels".into()))?,
            )
        } else {
            None
        };
        // One-pass GroupNorms in clusters where the driver says a cluster of the largest fits.
        let gn_one_pass = get("norm", "gn_one_pass")?;
        let gn_bwd_one_pass = get("norm", "gn_bwd_one_pass")?;
        let fits =
            |f: &CudaFunction| max_active_clusters(f, 1024, GN_CLUSTER_MAX).is_ok_and(|n| n > 0);
        let gn_clusters =
            info.compute_capability.0 >= 9 && fits(&gn_one_pass) && fits(&gn_bwd_one_pass);
        Ok(Kernels {
            sms: info.multiprocessors.max(1),
            pdl: pdl_wanted(info.compute_capability),
            small_tiles: switches::is("INVDIFF_GEMM_SMALL_TILES", "1"),
            conv_gemm_vec: get("conv", "conv_gemm_vec")?,
            conv_gemm_any: get("conv", "conv_gemm_any")?,
            conv_splitk_reduce: get("conv", "conv_splitk_reduce")?,
            conv_narrow: (1..=DIRECT_MAX)
                .map(|c| {
                    allow_smem(
                        ctx,
                        get("conv", &format!("conv_narrow_{c}"))?,
                        narrow_smem(c),
                    )
                })
                .collect::<Result<_>>()?,
            conv_few_in: (1..=DIRECT_MAX)
                .map(|c| get("conv", &format!("conv_few_in_{c}")))
                .collect::<Result<_>>()?,
            conv_weight_transpose: get("conv", "conv_weight_transpose")?,
            conv_tc,
            tc_convert: get("conv_tc", "tc_convert")?,
            gemm_batched: get("gemm", "gemm_batched")?,
            gemm_batched_32: get("gemm", "gemm_batched_32")?,
            gemm_batched_tf32: get("gemm", "gemm_batched_tf32")?,
            softmax_forward: get("attention", "softmax_forward")?,
            softmax_backward: get("attention", "softmax_backward")?,
            attention_flash,
            linear_rows: get("linear", "linear_rows")?,
            linear_batch: get("linear", "linear_batch")?,
            gn_partial: get("norm", "gn_partial")?,
            gn_finalize: get("norm", "gn_finalize")?,
            gn_apply: get("norm", "gn_apply")?,
            gn_apply_half: get("norm", "gn_apply_half")?,
            gn_bwd_partial: get("norm", "gn_bwd_partial")?,
            gn_bwd_finalize: get("norm", "gn_bwd_finalize")?,
            gn_bwd_apply: get("norm", "gn_bwd_apply")?,
            gn_bwd_apply_half: get("norm", "gn_bwd_apply_half")?,
            gn_clusters,
            gn_one_pass,
            gn_bwd_one_pass,
            nchw_to_nhwc: get("resample", "nchw_to_nhwc")?,
            nhwc_to_nchw: get("resample", "nhwc_to_nchw")?,
            upsample2x: get("resample", "upsample2x")?,
            upsample2x_half: get("resample", "upsample2x_half")?,
            upsample2x_backward: get("resample", "upsample2x_backward")?,
            concat_channels: get("resample", "concat_channels")?,
            concat_backward: get("resample", "concat_backward")?,
            add_into: get("resample", "add_into")?,
            div_inplace: get("resample", "div_inplace")?,
            timestep_embedding: get("resample", "timestep_embedding")?,
            timing_hold: get("timing", "timing_hold")?,
            conv_wgmma,
            conv_wgmma_probe,
        })
    }

    /// Whether launches use programmatic dependent launch (`INVDIFF_PDL=1` on Hopper).
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// Whether small batched products take 32-wide tiles (`INVDIFF_GEMM_SMALL_TILES=1`).
    pub fn small_tiles(&self) -> bool {
        self.small_tiles
    }

    fn launch<'a>(&self, st: &'a CudaStream, f: &'a CudaFunction) -> Launch<'a> {
        Launch::new(st, f, self.pdl)
    }

    /// Whether this device runs the wgmma convolutions (compute capability 9.0).
    pub fn has_wgmma(&self) -> bool {
        self.conv_wgmma.is_some()
    }

    /// What this device runs of the kernels that not every device does, for
    /// [`KernelConfig::from_switches`](super::program::KernelConfig::from_switches).
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            wgmma: self.has_wgmma(),
            flash: self.attention_flash.is_some(),
            gn_clusters: self.gn_clusters,
        }
    }

    /// Blocks for a grid-stride loop over `items` work items of `per_block` each.
    fn blocks(&self, items: usize, per_block: usize, per_sm: u32) -> u32 {
        let want = items.div_ceil(per_block).max(1);
        want.min((self.sms * per_sm) as usize) as u32
    }

    /// Element-wise launch shape over `len` elements.
    fn flat(&self, len: usize) -> LaunchConfig {
        cfg((self.blocks(len, BLOCK as usize, 8), 1, 1), (BLOCK, 1, 1))
    }

    /// Warp-per-row launch shape over `rows` rows.
    fn warps(&self, rows: usize) -> LaunchConfig {
        cfg((self.blocks(rows, 8, 16), 1, 1), (BLOCK, 1, 1))
    }

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
        need(p.y, "convolution output")?;
        let rows = s.rows();
        if rows == 0 || s.ncols == 0 || s.sc == 0 {
            return Ok(());
        }
        i32_of(rows * s.ncols.max(s.sc), "convolution rows x channels")?;
        i32_of(s.k(), "convolution reduction length")?;
        let workspace = plan.splits > 1 && !plan.cluster;
        if workspace {
            need(p.ws, "split-K workspace")?;
            i32_of(plan.splits * rows * s.ncols, "split-K workspace")?;
        }
        if plan.cluster && !(plan.wgmma && (2..=MAX_CLUSTER_SPLITS).contains(&plan.splits)) {
            return Err(Error::Cuda(format!(
                "internal: a cluster reduction planned for {} splits (wgmma {})",
                plan.splits, plan.wgmma
            )));
        }
        let mut a = ConvArgs {
            x: p.x,
            w: p.w,
            y: p.y,
            bias: p.bias,
            temb: p.temb,
            res: p.res,
            // No workspace with splits: the kernel reduces within the cluster.
            ws: if workspace { p.ws } else { 0 },
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
            norm: p.norm,
            norm_silu: i32::from(plan.norm_input == NormInput::AffineSilu),
            prefetch_w: i32::from(plan.prefetch_weights),
            gn_partial: p.gn_partial,
            ..ConvArgs::default()
        };
        for (i, t) in s.taps.iter().enumerate() {
            a.tap_dy[i] = t.dy;
            a.tap_dx[i] = t.dx;
            a.tap_w[i] = t.w;
        }
        if matches!(plan.kernel, ConvKernel::Narrow | ConvKernel::FewIn) {
            return self.conv_direct(st, s, plan, &a);
        }
        // The 16-byte path also needs 16-byte aligned bases; the arena guarantees it, and
        // anything else falls back to scalar loads.
        let aligned = [p.x, p.w, p.y, p.res, p.ws, p.bias, p.temb, p.norm]
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
            || (plan.prefetch_weights && !tensor)
            || (plan.tile != WgmmaTile::Plain && !plan.wgmma)
            || (plan.wgmma && !plan.tile.takes(s, plan))
            || ((plan.norm_input != NormInput::None) != (p.norm != 0))
            || (plan.norm_input != NormInput::None && !plan.tile.is_halo())
            || (p.gn_partial != 0 && !gn_partial_fits(s, plan))
        {
            return Err(Error::Cuda(format!(
                "internal: {:?} convolution planned with deep {}, 16-bit input {}, wgmma {}, \
                 row epilogue {}, weight prefetch {}, tile {:?}, cluster {} and input {:?} \
                 (scale and shift {})",
                plan.kernel,
                plan.deep,
                plan.half_input,
                plan.wgmma,
                plan.row_epilogue,
                plan.prefetch_weights,
                plan.tile,
                plan.cluster,
                plan.norm_input,
                if p.norm != 0 { "given" } else { "absent" }
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
                    plan.tile.split_unit()
                } else {
                    tc_slice(precision)
                };
                if plan.k_per_split % slice != 0 {
                    return Err(Error::Cuda(
                        "internal: split-K not a multiple of the tensor-core K slice".into(),
                    ));
                }
                if plan.wgmma {
                    let kernels = if probe.is_some() {
                        &self.conv_wgmma_probe
                    } else {
                        &self.conv_wgmma
                    };
                    let wg = kernels.as_ref().ok_or_else(|| {
                        Error::Cuda(
                            "internal: wgmma convolution planned on a device without it".into(),
                        )
                    })?;
                    (&wg[wgmma_index(precision, plan)], plan.tile.smem())
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
        let mut b = self.launch(st, f);
        b.arg(&a);
        if let Some(probe) = &probe {
            b.arg(probe);
        }
        if plan.cluster {
            b.cluster_z(grid.2);
        }
        // SAFETY: as above; the grid covers exactly the tiles of the problem.
        cu(unsafe { b.launch(launch) }.map(drop), "launching conv_gemm")?;
        if workspace {
            let splits = plan.splits as i32;
            let mut b = self.launch(st, &self.conv_splitk_reduce);
            b.arg(&a).arg(&splits);
            // SAFETY: the workspace holds splits x rows x ncols partial sums written above.
            cu(
                unsafe { b.launch(self.flat(rows * s.ncols)) }.map(drop),
                "launching conv_splitk_reduce",
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
                "internal: {:?} convolution {}->{} at stride {} with {} taps, {} splits, deep {}, \
                 16-bit input {}: the direct kernels take at most {DIRECT_MAX} channels on their \
                 narrow side, stride 1, taps in a 3x3 window, one split, fp32",
                plan.kernel,
                s.sc,
                s.ncols,
                s.in_stride,
                s.taps.len(),
                plan.splits,
                plan.deep,
                plan.half_input
            )));
        }
        // Grid y and z stop at 65535 (x at 2^31 - 1, which the 32-bit checks above cover).
        let grid_dim = |v: usize, what: &str| -> Result<u32> {
            u32::try_from(v)
                .ok()
                .filter(|&g| g <= 65535)
                .ok_or_else(|| Error::Cuda(format!("{what} = {v}: too many for one launch")))
        };
        let (f, launch, name) = if narrow {
            let (tw, th) = NARROW_TILE;
            let grid = (
                s.mw.div_ceil(tw) as u32,
                grid_dim(s.mh.div_ceil(th), "row tiles")?,
                grid_dim(s.n, "batch")?,
            );
            let mut launch = cfg(grid, (BLOCK, 1, 1));
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
        let mut b = self.launch(st, f);
        b.arg(a);
        // SAFETY: the pointers cover the shapes in `a` (the caller's contract), sizes were
        // checked; the grid covers every output of the problem.
        cu(
            unsafe { b.launch(launch) }.map(drop),
            &format!("launching {name}"),
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
        let mut b = self.launch(st, &self.conv_weight_transpose);
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
        let mut b = self.launch(st, &self.tc_convert);
        b.arg(&src).arg(&dst).arg(&l).arg(&kind);
        // SAFETY: src holds len floats, dst room for ⌈len / 2⌉ 32-bit words.
        cu(
            unsafe { b.launch(self.flat(len.div_ceil(2))) }.map(drop),
            "launching tc_convert",
        )
    }

    /// `C[z] = alpha A[z] B[z] (+ C[z])` over a batch of `outer x inner` strided views.
    pub fn gemm(&self, st: &CudaStream, g: &Gemm) -> Result<()> {
        // With small_tiles, 32-wide tiles where 64-wide ones would not give every
        // multiprocessor a block (the same sums in the same order either way); the tf32
        // kernel has 64-wide tiles only.
        let blocks64 = g.m.div_ceil(64) * g.n.div_ceil(64) * g.outer * g.inner;
        let small = self.small_tiles && !g.tf32 && blocks64 < self.sms as usize;
        self.gemm_tiled(st, g, if small { 32 } else { 64 })
    }

    /// [`gemm`](Self::gemm) with square tiles of `tile` (32 or 64) outputs.
    pub(crate) fn gemm_tiled(&self, st: &CudaStream, g: &Gemm, tile: usize) -> Result<()> {
        if !(tile == 64 || (tile == 32 && !g.tf32)) {
            return Err(Error::Cuda(format!(
                "internal: no {tile}-wide tiles for batched products (tf32 {})",
                g.tf32
            )));
        }
        need(g.a, "matrix A")?;
        need(g.b, "matrix B")?;
        need(g.c, "matrix C")?;
        if g.m == 0 || g.n == 0 || g.outer * g.inner == 0 {
            return Ok(());
        }
        let args = GemmArgs {
            a: g.a,
            b: g.b,
            c: g.c,
            a_rs: i64_of(g.a_rs),
            a_cs: i64_of(g.a_cs),
            b_rs: i64_of(g.b_rs),
            b_cs: i64_of(g.b_cs),
            c_rs: i64_of(g.c_rs),
            a_bo: i64_of(g.a_bo),
            a_bi: i64_of(g.a_bi),
            b_bo: i64_of(g.b_bo),
            b_bi: i64_of(g.b_bi),
            c_bo: i64_of(g.c_bo),
            c_bi: i64_of(g.c_bi),
            m: i32_of(g.m, "rows")?,
            n: i32_of(g.n, "columns")?,
            k: i32_of(g.k, "reduction")?,
            batch_inner: i32_of(g.inner, "inner batch")?,
            alpha: g.alpha,
            accumulate: g.accumulate as i32,
        };
        let batch = g.outer * g.inner;
        if batch > 65535 || g.m.div_ceil(tile) > 65535 {
            return Err(Error::Cuda(format!(
                "batched product too large for one launch: batch {batch}, {} rows",
                g.m
            )));
        }
        let grid = (
            i32_of(g.n.div_ceil(tile), "column tiles")? as u32,
            g.m.div_ceil(tile) as u32,
            batch as u32,
        );
        let f = if g.tf32 {
            &self.gemm_batched_tf32
        } else if tile == 32 {
            &self.gemm_batched_32
        } else {
            &self.gemm_batched
        };
        let mut b = self.launch(st, f);
        b.arg(&args);
        // SAFETY: every view lies inside its buffer (the caller's contract).
        cu(
            unsafe { b.launch(cfg(grid, (BLOCK, 1, 1))) }.map(drop),
            "launching gemm_batched",
        )
    }

    /// Fused attention (kernels/attention.cu, `attention_flash_*`): with `backward` None,
    /// `y = softmax(q kᵀ / √d) v` and each query's log-sum-exp into `lse`; with
    /// `backward = Some((o, dout, dsum, accumulate))`, `y (+)= dqkv` from the forward's
    /// output `o`, its gradient `dout` and `lse`, with `dsum` as `[n, heads, L]` scratch.
    /// `qkv` and `y`'s layouts are [`attention_forward`](super::unet::attention_forward)'s;
    /// `head_dim` must satisfy [`flash_fits`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_flash(
        &self,
        st: &CudaStream,
        n: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        qkv: DPtr,
        lse: DPtr,
        y: DPtr,
        backward: Option<(DPtr, DPtr, DPtr, bool)>,
    ) -> Result<()> {
        if !flash_fits(head_dim) {
            return Err(Error::Cuda(format!(
                "internal: fused attention needs heads of a multiple of {FLASH_TILE} channels, \
                 not {head_dim}"
            )));
        }
        let Some(flash) = &self.attention_flash else {
            return Err(Error::Cuda(format!(
                "internal: fused attention planned on a device that gives a block less than \
                 {} bytes of shared memory",
                FLASH_SMEM[2]
            )));
        };
        need(qkv, "q/k/v")?;
        need(lse, "attention log-sum-exp")?;
        need(y, "attention output")?;
        // 16-byte copies of q/k/v, O and dO rows; float2 stores of y.
        let rows = [qkv, y]
            .into_iter()
            .chain(backward.iter().flat_map(|b| [b.0, b.1]));
        if rows.into_iter().any(|p| p % 16 != 0) {
            return Err(Error::Cuda(
                "internal: fused attention on buffers not 16-byte aligned".into(),
            ));
        }
        if n * heads * tokens == 0 {
            return Ok(());
        }
        i32_of(tokens * 3 * heads * head_dim, "tokens x q/k/v width")?;
        let batch = n * heads;
        if batch > 65535 {
            return Err(Error::Cuda(format!(
                "fused attention over {batch} (image, head) pairs: at most 65535 per launch"
            )));
        }
        let mut args = FlashArgs {
            qkv,
            y,
            lse,
            tokens: i32_of(tokens, "tokens")?,
            heads: i32_of(heads, "heads")?,
            head_dim: i32_of(head_dim, "head width")?,
            scale: 1.0 / (head_dim as f32).sqrt(),
            ..FlashArgs::default()
        };
        let grid = (
            i32_of(tokens.div_ceil(FLASH_TILE), "row tiles")? as u32,
            (head_dim / FLASH_TILE) as u32,
            batch as u32,
        );
        let kernels: &[usize] = match backward {
            None => &[0],
            Some((o, dout, dsum, accumulate)) => {
                need(o, "attention output")?;
                need(dout, "attention output gradient")?;
                need(dsum, "attention dO . O sums")?;
                args.o = o;
                args.dout = dout;
                args.dsum = dsum;
                args.accumulate = accumulate as i32;
                // dQ first: it writes the sums dK and dV read.
                &[1, 2]
            }
        };
        for &i in kernels {
            let mut b = self.launch(st, &flash[i]);
            b.arg(&args);
            let mut launch = cfg(grid, (128, 1, 1));
            launch.shared_mem_bytes = FLASH_SMEM[i];
            // SAFETY: qkv, y, o and dout hold n * tokens rows of their widths, lse and dsum
            // n * heads * tokens floats (the caller's contract); the grid covers exactly the
            // row tiles and column chunks the kernels index.
            cu(
                unsafe { b.launch(launch) }.map(drop),
                "launching fused attention",
            )?;
        }
        Ok(())
    }

    /// Row softmax of `rows x len` scores in place, after scaling by `scale`.
    pub fn softmax(
        &self,
        st: &CudaStream,
        p: DPtr,
        rows: usize,
        len: usize,
        scale: f32,
    ) -> Result<()> {
        need(p, "scores")?;
        let (r, l) = (i64_of(rows), i32_of(len, "row length")?);
        let mut b = self.launch(st, &self.softmax_forward);
        b.arg(&p).arg(&r).arg(&l).arg(&scale);
        // SAFETY: p holds rows * len floats.
        cu(
            unsafe { b.launch(self.warps(rows)) }.map(drop),
            "launching softmax_forward",
        )
    }

    /// `ds = p (ds - rowsum(ds p)) scale` in place (ds holds dP on entry).
    pub fn softmax_backward(
        &self,
        st: &CudaStream,
        p: DPtr,
        ds: DPtr,
        rows: usize,
        len: usize,
        scale: f32,
    ) -> Result<()> {
        need(p, "probabilities")?;
        need(ds, "score gradient")?;
        let (r, l) = (i64_of(rows), i32_of(len, "row length")?);
        let mut b = self.launch(st, &self.softmax_backward);
        b.arg(&p).arg(&ds).arg(&r).arg(&l).arg(&scale);
        // SAFETY: p and ds hold rows * len floats.
        cu(
            unsafe { b.launch(self.warps(rows)) }.map(drop),
            "launching softmax_backward",
        )
    }

    /// `y = (f(x) Wᵀ + b + res) / out_div` over few rows; `w` is `[out, inp]`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_rows(
        &self,
        st: &CudaStream,
        x: DPtr,
        w: DPtr,
        bias: DPtr,
        res: DPtr,
        y: DPtr,
        rows: usize,
        inp: usize,
        out: usize,
        silu_in: bool,
        out_div: f32,
    ) -> Result<()> {
        for (p, what) in [(x, "input"), (w, "weights"), (bias, "bias"), (y, "output")] {
            need(p, what)?;
        }
        let (r, i, o) = linear_sizes(rows, inp, out)?;
        let silu = silu_in as i32;
        let mut b = self.launch(st, &self.linear_rows);
        b.arg(&x)
            .arg(&w)
            .arg(&bias)
            .arg(&res)
            .arg(&y)
            .arg(&r)
            .arg(&i)
            .arg(&o)
            .arg(&silu)
            .arg(&out_div);
        // SAFETY: x is rows x inp, w out x inp, y (and res if set) rows x out.
        cu(
            unsafe { b.launch(self.warps(rows * out)) }.map(drop),
            "launching linear_rows",
        )
    }

    /// [`linear_rows`](Self::linear_rows) (no residual) of several layers reading the same
    /// `x` in one launch: `table` ([`linear_batch_table`]) lists `layers` layers whose widths
    /// add up to `total_out`, each writing its own output.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_batch(
        &self,
        st: &CudaStream,
        x: DPtr,
        table: DPtr,
        layers: usize,
        total_out: usize,
        rows: usize,
        inp: usize,
        silu_in: bool,
        out_div: f32,
    ) -> Result<()> {
        need(x, "input")?;
        need(table, "layer table")?;
        if layers == 0 || layers > LINEAR_BATCH_MAX {
            return Err(Error::Cuda(format!(
                "internal: a batched linear launch of {layers} layers (1 to {LINEAR_BATCH_MAX})"
            )));
        }
        let l = i32_of(layers, "layers")?;
        let (r, i, o) = linear_sizes(rows, inp, total_out)?;
        let silu = silu_in as i32;
        let mut b = self.launch(st, &self.linear_batch);
        b.arg(&x)
            .arg(&table)
            .arg(&l)
            .arg(&r)
            .arg(&i)
            .arg(&o)
            .arg(&silu)
            .arg(&out_div);
        // SAFETY: x is rows x inp; the table holds `layers` items whose widths add up to
        // total_out, each with weights out x inp, a bias of out and an output of rows x out
        // (the kernel skips outputs past an item's width).
        cu(
            unsafe { b.launch(self.warps(rows * total_out)) }.map(drop),
            "launching linear_batch",
        )
    }

    /// The element-wise GroupNorm passes (kernels/norm.cu `for_units`): a grid row per image,
    /// the `lanes` units of channels of a pixel across threadIdx.x, pixels across threadIdx.y
    /// and the row's blocks; about eight 256-thread blocks per multiprocessor in all.
    fn norm_units(&self, n: usize, hw: usize, lanes: usize) -> Result<LaunchConfig> {
        if n > 65535 {
            return Err(Error::Cuda(format!(
                "GroupNorm too large for one launch: {n} images"
            )));
        }
        let bx = lanes.clamp(1, BLOCK as usize);
        let by = (BLOCK as usize / bx).max(1);
        let per_image = (8 * self.sms as usize).div_ceil(n.max(1));
        let gx = hw.div_ceil(by).clamp(1, per_image.max(1));
        Ok(cfg((gx as u32, n as u32, 1), (bx as u32, by as u32, 1)))
    }

    fn norm_grid(&self, n: usize, c: usize, split: NormSplit) -> Result<LaunchConfig> {
        if n > 65535 || c.div_ceil(32) > 65535 {
            return Err(Error::Cuda(format!(
                "GroupNorm too large for one launch: {n} images, {c} channels"
            )));
        }
        Ok(cfg(
            (
                i32_of(split.chunks, "chunks")? as u32,
                c.div_ceil(32) as u32,
                n as u32,
            ),
            (32, 8, 1),
        ))
    }

    /// GroupNorm forward: statistics into `stats` (`[mean | rstd]`, n x groups each), the
    /// per-channel affine into `affine` (`[n][2][c]`), then `y`, in fp32, or with `half_out`
    /// in bf16/fp16 (two elements per f32 slot) for the tensor-core convolutions it feeds.
    /// Without `y` (0), the statistics and the affine only, for a halo convolution that
    /// applies them as it loads `x` ([`NormInput`]); three launches only.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        &self,
        st: &CudaStream,
        d: NormDims,
        x: DPtr,
        gamma: DPtr,
        beta: DPtr,
        y: DPtr,
        partial: DPtr,
        stats: DPtr,
        affine: DPtr,
        eps: f32,
        silu: bool,
        half_out: Option<Precision>,
    ) -> Result<()> {
        for (p, what) in [
            (x, "input"),
            (gamma, "scale"),
            (beta, "shift"),
            (partial, "partial sums"),
            (stats, "statistics"),
            (affine, "affine"),
        ] {
            need(p, what)?;
        }
        if d.split.from_producer && d.split.one_pass.is_some() {
            return Err(Error::Cuda(
                "internal: a GroupNorm given its partial sums planned in one pass".into(),
            ));
        }
        if y == 0 && d.split.one_pass.is_some() {
            return Err(Error::Cuda(
                "internal: a GroupNorm without an output planned in one pass".into(),
            ));
        }
        let NormDims {
            n,
            hw,
            c,
            groups,
            split,
        } = d;
        let (ni, hwi, ci, gi, chunks, cpx) = d.kernel_args()?;
        let silu = silu as i32;
        let kind = half_out.map_or(Ok(0), half_kind)?;
        if let Some(shape) = split.one_pass {
            let mut b = self.launch(st, &self.gn_one_pass);
            b.arg(&x)
                .arg(&gamma)
                .arg(&beta)
                .arg(&y)
                .arg(&stats)
                .arg(&ni)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&eps)
                .arg(&silu)
                .arg(&kind);
            one_pass_clusters(&mut b, shape);
            // SAFETY: x is n x hw x c floats, y room for as many values of `kind`, stats for
            // 2 n groups floats; a group's blocks hold all its pixels (one_pass_shape).
            return cu(
                unsafe { b.launch(one_pass_grid(n * groups, shape)) }.map(drop),
                "launching gn_one_pass",
            );
        }
        if !split.from_producer {
            let mut b = self.launch(st, &self.gn_partial);
            b.arg(&x).arg(&hwi).arg(&ci).arg(&cpx).arg(&partial);
            // SAFETY: x is n x hw x c; partial holds n x chunks x c pairs of doubles.
            cu(
                unsafe { b.launch(self.norm_grid(n, c, split)?) }.map(drop),
                "launching gn_partial",
            )?;
        }
        let mut b = self.launch(st, &self.gn_finalize);
        b.arg(&partial)
            .arg(&ni)
            .arg(&hwi)
            .arg(&ci)
            .arg(&gi)
            .arg(&chunks)
            .arg(&eps)
            .arg(&gamma)
            .arg(&beta)
            .arg(&stats)
            .arg(&affine);
        let fin = cfg(((n * groups) as u32, 1, 1), (GN_FIN_THREADS, 1, 1));
        // SAFETY: stats holds 2 n groups floats, affine 2 n c.
        cu(unsafe { b.launch(fin) }.map(drop), "launching gn_finalize")?;
        if y == 0 {
            return Ok(());
        }
        if half_out.is_some() {
            if c % 4 != 0 || x % 16 != 0 || affine % 16 != 0 || y % 8 != 0 {
                return Err(Error::Cuda(format!(
                    "internal: 16-bit GroupNorm output with {c} channels or unaligned buffers"
                )));
            }
            let mut b = self.launch(st, &self.gn_apply_half);
            b.arg(&x)
                .arg(&affine)
                .arg(&y)
                .arg(&hwi)
                .arg(&ci)
                .arg(&silu)
                .arg(&kind);
            // SAFETY: x is n x hw x c floats, y room for n x hw x c 16-bit values.
            return cu(
                unsafe { b.launch(self.norm_units(n, hw, c / 4)?) }.map(drop),
                "launching gn_apply_half",
            );
        }
        let vec = c % 4 == 0 && [x, y, affine].iter().all(|p| p % 16 == 0);
        let vec4 = vec as i32;
        let mut b = self.launch(st, &self.gn_apply);
        b.arg(&x)
            .arg(&affine)
            .arg(&y)
            .arg(&hwi)
            .arg(&ci)
            .arg(&silu)
            .arg(&vec4);
        let lanes = if vec { c / 4 } else { c };
        // SAFETY: x and y are n x hw x c.
        cu(
            unsafe { b.launch(self.norm_units(n, hw, lanes)?) }.map(drop),
            "launching gn_apply",
        )
    }

    /// GroupNorm input gradient from the forward's `stats`: `dx (+)= ...`; with `half_out`
    /// (overwriting only) in bf16/fp16 for the tensor-core input gradient that reads it.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_backward(
        &self,
        st: &CudaStream,
        d: NormDims,
        x: DPtr,
        dy: DPtr,
        gamma: DPtr,
        beta: DPtr,
        stats: DPtr,
        partial: DPtr,
        means: DPtr,
        dx: DPtr,
        silu: bool,
        accumulate: bool,
        half_out: Option<Precision>,
    ) -> Result<()> {
        if half_out.is_some() && (accumulate || d.c % 4 != 0 || dx % 8 != 0) {
            return Err(Error::Cuda(format!(
                "internal: 16-bit GroupNorm input gradient accumulating, with {} channels or \
                 unaligned",
                d.c
            )));
        }
        for (p, what) in [
            (x, "input"),
            (dy, "output gradient"),
            (gamma, "scale"),
            (beta, "shift"),
            (stats, "statistics"),
            (partial, "partial sums"),
            (means, "group means"),
            (dx, "input gradient"),
        ] {
            need(p, what)?;
        }
        let NormDims {
            n,
            hw,
            c,
            groups,
            split,
        } = d;
        let (ni, hwi, ci, gi, chunks, cpx) = d.kernel_args()?;
        let silu = silu as i32;
        let kind = half_out.map_or(Ok(0), half_kind)?;
        let acc = accumulate as i32;
        if let Some(shape) = split.one_pass {
            let mut b = self.launch(st, &self.gn_bwd_one_pass);
            b.arg(&x)
                .arg(&dy)
                .arg(&stats)
                .arg(&gamma)
                .arg(&beta)
                .arg(&dx)
                .arg(&ni)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&silu)
                .arg(&acc)
                .arg(&kind);
            one_pass_clusters(&mut b, shape);
            // SAFETY: as in the forward; dx holds n x hw x c values of `kind`.
            return cu(
                unsafe { b.launch(one_pass_grid(n * groups, shape)) }.map(drop),
                "launching gn_bwd_one_pass",
            );
        }
        let mut b = self.launch(st, &self.gn_bwd_partial);
        b.arg(&x)
            .arg(&dy)
            .arg(&stats)
            .arg(&gamma)
            .arg(&beta)
            .arg(&ni)
            .arg(&hwi)
            .arg(&ci)
            .arg(&gi)
            .arg(&silu)
            .arg(&cpx)
            .arg(&partial);
        // SAFETY: as in the forward.
        cu(
            unsafe { b.launch(self.norm_grid(n, c, split)?) }.map(drop),
            "launching gn_bwd_partial",
        )?;
        let mut b = self.launch(st, &self.gn_bwd_finalize);
        b.arg(&partial)
            .arg(&ni)
            .arg(&hwi)
            .arg(&ci)
            .arg(&gi)
            .arg(&chunks)
            .arg(&means);
        let fin = cfg(((n * groups) as u32, 1, 1), (GN_FIN_THREADS, 1, 1));
        // SAFETY: means holds 2 n groups floats.
        cu(
            unsafe { b.launch(fin) }.map(drop),
            "launching gn_bwd_finalize",
        )?;
        if half_out.is_some() {
            let mut b = self.launch(st, &self.gn_bwd_apply_half);
            b.arg(&x)
                .arg(&dy)
                .arg(&stats)
                .arg(&means)
                .arg(&gamma)
                .arg(&beta)
                .arg(&dx)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&silu)
                .arg(&kind);
            // SAFETY: x and dy are n x hw x c floats, dx room for as many 16-bit values.
            return cu(
                unsafe { b.launch(self.norm_units(n, hw, c / 4)?) }.map(drop),
                "launching gn_bwd_apply_half",
            );
        }
        let vec = c % 4 == 0 && [x, dy, dx].iter().all(|p| p % 16 == 0);
        let vec4 = vec as i32;
        let mut b = self.launch(st, &self.gn_bwd_apply);
        b.arg(&x)
            .arg(&dy)
            .arg(&stats)
            .arg(&means)
            .arg(&gamma)
            .arg(&beta)
            .arg(&dx)
            .arg(&hwi)
            .arg(&ci)
            .arg(&gi)
            .arg(&silu)
            .arg(&acc)
            .arg(&vec4);
        let lanes = if vec { c / 4 } else { c };
        // SAFETY: x, dy and dx are n x hw x c.
        cu(
            unsafe { b.launch(self.norm_units(n, hw, lanes)?) }.map(drop),
            "launching gn_bwd_apply",
        )
    }

    /// NCHW `x` to NHWC `y`, `y = x * mul + add`.
    #[allow(clippy::too_many_arguments)]
    pub fn to_nhwc(
        &self,
        st: &CudaStream,
        x: DPtr,
        y: DPtr,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        mul: f32,
        add: f32,
    ) -> Result<()> {
        need(x, "NCHW input")?;
        need(y, "NHWC output")?;
        let len = n * c * h * w;
        let [ni, ci, hi, wi] = i32s([(n, "n"), (c, "c"), (h, "h"), (w, "w")])?;
        let mut b = self.launch(st, &self.nchw_to_nhwc);
        b.arg(&x)
            .arg(&y)
            .arg(&ni)
            .arg(&ci)
            .arg(&hi)
            .arg(&wi)
            .arg(&mul)
            .arg(&add);
        // SAFETY: x and y hold n c h w floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching nchw_to_nhwc",
        )
    }

    /// NHWC `x` to NCHW `y`, `y = x * mul`.
    #[allow(clippy::too_many_arguments)]
    pub fn to_nchw(
        &self,
        st: &CudaStream,
        x: DPtr,
        y: DPtr,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        mul: f32,
    ) -> Result<()> {
        need(x, "NHWC input")?;
        need(y, "NCHW output")?;
        let len = n * c * h * w;
        let [ni, ci, hi, wi] = i32s([(n, "n"), (c, "c"), (h, "h"), (w, "w")])?;
        let mut b = self.launch(st, &self.nhwc_to_nchw);
        b.arg(&x)
            .arg(&y)
            .arg(&ni)
            .arg(&ci)
            .arg(&hi)
            .arg(&wi)
            .arg(&mul);
        // SAFETY: x and y hold n c h w floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching nhwc_to_nchw",
        )
    }

    /// Nearest 2x upsampling of `[n, h, w, c]`, into fp32 or (`half_out`) 16-bit values for the
    /// tensor-core convolution it feeds.
    #[allow(clippy::too_many_arguments)]
    pub fn upsample(
        &self,
        st: &CudaStream,
        x: DPtr,
        y: DPtr,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        half_out: Option<Precision>,
    ) -> Result<()> {
        need(x, "input")?;
        need(y, "output")?;
        let [ni, hi, wi, ci] = i32s([(n, "n"), (h, "h"), (w, "w"), (c, "c")])?;
        if let Some(precision) = half_out {
            if c % 8 != 0 || x % 16 != 0 || y % 16 != 0 {
                return Err(Error::Cuda(format!(
                    "internal: 16-bit upsampling output with {c} channels or unaligned buffers"
                )));
            }
            let kind = half_kind(precision)?;
            let mut b = self.launch(st, &self.upsample2x_half);
            b.arg(&x)
                .arg(&y)
                .arg(&ni)
                .arg(&hi)
                .arg(&wi)
                .arg(&ci)
                .arg(&kind);
            // SAFETY: x holds n h w c floats, y room for four times as many 16-bit values.
            return cu(
                unsafe { b.launch(self.flat(4 * n * h * w * c / 8)) }.map(drop),
                "launching upsample2x_half",
            );
        }
        let mut b = self.launch(st, &self.upsample2x);
        b.arg(&x).arg(&y).arg(&ni).arg(&hi).arg(&wi).arg(&ci);
        // SAFETY: x holds n h w c floats, y four times as many.
        cu(
            unsafe { b.launch(self.flat(4 * n * h * w * c)) }.map(drop),
            "launching upsample2x",
        )
    }

    /// Adjoint of [`upsample`](Self::upsample): `dx (+)= 2x2 block sums of dy`.
    #[allow(clippy::too_many_arguments)]
    pub fn upsample_backward(
        &self,
        st: &CudaStream,
        dy: DPtr,
        dx: DPtr,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        accumulate: bool,
    ) -> Result<()> {
        need(dy, "output gradient")?;
        need(dx, "input gradient")?;
        let [ni, hi, wi, ci] = i32s([(n, "n"), (h, "h"), (w, "w"), (c, "c")])?;
        let acc = accumulate as i32;
        let mut b = self.launch(st, &self.upsample2x_backward);
        b.arg(&dy)
            .arg(&dx)
            .arg(&ni)
            .arg(&hi)
            .arg(&wi)
            .arg(&ci)
            .arg(&acc);
        // SAFETY: dx holds n h w c floats, dy four times as many.
        cu(
            unsafe { b.launch(self.flat(n * h * w * c)) }.map(drop),
            "launching upsample2x_backward",
        )
    }

    /// `y = [a | b]` along channels over `pixels` pixels; with `half`, also a 16-bit copy of
    /// `y` in that precision at the given address, for tensor-core convolutions to read.
    #[allow(clippy::too_many_arguments)]
    pub fn concat(
        &self,
        st: &CudaStream,
        a: DPtr,
        b_: DPtr,
        y: DPtr,
        half: Option<(DPtr, Precision)>,
        pixels: usize,
        ca: usize,
        cb: usize,
    ) -> Result<()> {
        need(a, "first input")?;
        need(b_, "second input")?;
        need(y, "output")?;
        let (y16, kind) = match half {
            Some((p, precision)) => {
                need(p, "16-bit output")?;
                (p, half_kind(precision)?)
            }
            None => (0, 0),
        };
        let (p, cai, cbi) = (
            i64_of(pixels),
            i32_of(ca, "channels")?,
            i32_of(cb, "channels")?,
        );
        let vec =
            ca % 4 == 0 && cb % 4 == 0 && [a, b_, y].iter().all(|p| p % 16 == 0) && y16 % 8 == 0;
        let vec4 = vec as i32;
        let mut b = self.launch(st, &self.concat_channels);
        b.arg(&a)
            .arg(&b_)
            .arg(&y)
            .arg(&y16)
            .arg(&kind)
            .arg(&p)
            .arg(&cai)
            .arg(&cbi)
            .arg(&vec4);
        let items = pixels * (ca + cb) / if vec { 4 } else { 1 };
        // SAFETY: a is pixels x ca, b pixels x cb, y pixels x (ca + cb), y16 (when set) room
        // for as many 16-bit values.
        cu(
            unsafe { b.launch(self.flat(items)) }.map(drop),
            "launching concat_channels",
        )
    }

    /// `d (+)= dy[.., offset .. offset + width]` over `pixels` pixels of `c` channels.
    #[allow(clippy::too_many_arguments)]
    pub fn concat_backward(
        &self,
        st: &CudaStream,
        dy: DPtr,
        d: DPtr,
        pixels: usize,
        c: usize,
        offset: usize,
        width: usize,
        accumulate: bool,
    ) -> Result<()> {
        need(dy, "output gradient")?;
        need(d, "input gradient")?;
        if offset + width > c {
            return Err(Error::Cuda(format!(
                "concat adjoint: channels {offset}..{} of {c}",
                offset + width
            )));
        }
        let (p, ci, oi, wi) = (i64_of(pixels), i32_of(c, "c")?, offset as i32, width as i32);
        let acc = accumulate as i32;
        let vec = [c, offset, width].iter().all(|v| v % 4 == 0) && dy % 16 == 0 && d % 16 == 0;
        let vec4 = vec as i32;
        let mut b = self.launch(st, &self.concat_backward);
        b.arg(&dy)
            .arg(&d)
            .arg(&p)
            .arg(&ci)
            .arg(&oi)
            .arg(&wi)
            .arg(&acc)
            .arg(&vec4);
        let items = pixels * width / if vec { 4 } else { 1 };
        // SAFETY: dy is pixels x c, d pixels x width.
        cu(
            unsafe { b.launch(self.flat(items)) }.map(drop),
            "launching concat_backward",
        )
    }

    /// `dst (+)= src` over `len` elements.
    pub fn add_into(
        &self,
        st: &CudaStream,
        dst: DPtr,
        src: DPtr,
        len: usize,
        accumulate: bool,
    ) -> Result<()> {
        need(dst, "destination")?;
        need(src, "source")?;
        let (l, acc) = (i64_of(len), accumulate as i32);
        let vec = len % 4 == 0 && dst % 16 == 0 && src % 16 == 0;
        let vec4 = vec as i32;
        let mut b = self.launch(st, &self.add_into);
        b.arg(&dst).arg(&src).arg(&l).arg(&acc).arg(&vec4);
        let items = if vec { len / 4 } else { len };
        // SAFETY: both hold len floats.
        cu(
            unsafe { b.launch(self.flat(items)) }.map(drop),
            "launching add_into",
        )
    }

    /// `x /= div` over `len` elements.
    pub fn divide(&self, st: &CudaStream, x: DPtr, len: usize, div: f32) -> Result<()> {
        need(x, "buffer")?;
        let l = i64_of(len);
        let mut b = self.launch(st, &self.div_inplace);
        b.arg(&x).arg(&l).arg(&div);
        // SAFETY: x holds len floats.
        cu(
            unsafe { b.launch(self.flat(len)) }.map(drop),
            "launching div_inplace",
        )
    }

    /// The sinusoidal embedding of `n` timesteps, `[n, dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn timestep_embedding(
        &self,
        st: &CudaStream,
        t: DPtr,
        y: DPtr,
        n: usize,
        dim: usize,
        flip: bool,
        shift: f32,
    ) -> Result<()> {
        need(t, "timesteps")?;
        need(y, "embedding")?;
        let (ni, di, fl) = (i32_of(n, "n")?, i32_of(dim, "dim")?, flip as i32);
        // The CPU's constant: ln(10000) in f64, rounded to f32, negated.
        let log_period = -(10000f64.ln() as f32);
        let mut b = self.launch(st, &self.timestep_embedding);
        b.arg(&t)
            .arg(&y)
            .arg(&ni)
            .arg(&di)
            .arg(&fl)
            .arg(&shift)
            .arg(&log_period);
        // SAFETY: t holds n floats, y n x dim.
        cu(
            unsafe { b.launch(self.flat(n * dim.div_ceil(2).max(1))) }.map(drop),
            "launching timestep_embedding",
        )
    }

    /// Keeps the stream busy for `ns` nanoseconds of device time (kernels/timing.cu): launched
    /// ahead of a profiled iteration, it gives the host time to enqueue the iteration's launches
    /// before the GPU reaches them.
    pub fn hold(&self, st: &CudaStream, ns: u64) -> Result<()> {
        let mut b = self.launch(st, &self.timing_hold);
        b.arg(&ns);
        // SAFETY: the kernel reads and writes no memory.
        cu(
            unsafe { b.launch(cfg((1, 1, 1), (32, 1, 1))) }.map(drop),
            "launching timing_hold",
        )
    }
}

/// Shape of a GroupNorm call and its reduction split.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormDims {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub groups: usize,
    pub split: NormSplit,
}

impl NormDims {
    /// `(n, hw, c, groups, chunks, chunk pixels)` as the forward and backward kernels take them,
    /// after checking that the groups divide the channels and that every index fits an i32.
    fn kernel_args(&self) -> Result<(i32, i32, i32, i32, i32, i32)> {
        let NormDims {
            n,
            hw,
            c,
            groups,
            split,
        } = *self;
        if groups == 0 || c % groups != 0 {
            return Err(Error::Cuda(format!(
                "GroupNorm: {groups} groups do not divide {c} channels"
            )));
        }
        i32_of(n * hw * c, "GroupNorm elements")?;
        Ok((
            n as i32,
            hw as i32,
            c as i32,
            groups as i32,
            split.chunks as i32,
            i32_of(split.chunk_px, "chunk")?,
        ))
    }
}

/// A strided batched product (see kernels/gemm.cu): element (i, k) of batch (o, b) of A is at
/// `a + o * a_bo + b * a_bi + i * a_rs + k * a_cs`, and likewise for B and C (C's columns are
/// contiguous).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Gemm {
    pub a: DPtr,
    pub b: DPtr,
    pub c: DPtr,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_rs: usize,
    pub a_cs: usize,
    pub b_rs: usize,
    pub b_cs: usize,
    pub c_rs: usize,
    pub outer: usize,
    pub inner: usize,
    pub a_bo: usize,
    pub a_bi: usize,
    pub b_bo: usize,
    pub b_bi: usize,
    pub c_bo: usize,
    pub c_bi: usize,
    pub alpha: f32,
    pub accumulate: bool,
    /// On the tf32 tensor cores (`gemm_batched_tf32`: operands rounded to tf32, fp32 sums)
    /// instead of fp32 FMAs.
    pub tf32: bool,
}

/// `rows`, `inp` and `out` of a few-row linear launch as the kernels' 32-bit sizes, checked
/// together with every index they form.
fn linear_sizes(rows: usize, inp: usize, out: usize) -> Result<(i32, i32, i32)> {
    i32_of(rows * out.max(inp), "rows x width")?;
    Ok((
        i32_of(rows, "rows")?,
        i32_of(inp, "inputs")?,
        i32_of(out, "outputs")?,
    ))
}

/// Byte offset of f32 element `i` (device addresses are in bytes).
pub(crate) fn at(base: DPtr, i: usize) -> DPtr {
    base + 4 * i as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the loaders look up ([`Kernels::load`], `SamplerKernels::load`) is an
    /// entry point of the module they look in, as build.rs read them from the PTX: a misspelt
    /// or missing kernel fails here, not when the first GPU loads the modules. The names come
    /// from the loaders' source (each `get("module", "name")`, the numbered direct kernels),
    /// the tensor-core table and the wgmma tables.
    #[test]
    fn every_kernel_the_loaders_ask_for_exists() {
        let entries = crate::cuda::device::kernel_entries();
        if entries.is_empty() {
            // Built without nvcc: there is nothing to load.
            return;
        }
        let exists = |module: &str, name: &str| {
            entries
                .iter()
                .any(|(m, names)| *m == module && names.contains(&name))
        };
        let mut asked: Vec<(String, String)> = Vec::new();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda");
        for file in ["kernels.rs", "sampler_kernels.rs"] {
            let src = std::fs::read_to_string(root.join(file)).unwrap();
            // The loaders, not these tests.
            let src = src.split("#[cfg(test)]").next().unwrap();
            for line in src
                .lines()
                .filter(|l| l.contains("get(") && !l.contains("fn "))
            {
                let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
                // `get(&sampler, "name")`: the module is the variable's name.
                let var = line
                    .split("get(&")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                let (module, name) = match (var, quoted.as_slice()) {
                    (Some(m), [n]) => (m, *n),
                    (None, [m, n]) => (*m, *n),
                    _ => continue,
                };
                if !entries.iter().any(|(m, _)| *m == module) {
                    continue;
                }
                if name.contains("{c}") {
                    for c in 1..=DIRECT_MAX {
                        asked.push((module.into(), name.replace("{c}", &c.to_string())));
                    }
                } else {
                    asked.push((module.into(), name.into()));
                }
            }
        }
        assert!(asked.len() > 40, "{asked:?}");
        asked.extend(TC_KERNELS.iter().map(|k| ("conv_tc".into(), k.name.into())));
        for suffix in ["", "_probe"] {
            let names = wgmma_kernel_names(suffix);
            assert_eq!(names.len(), 4 * WgmmaTile::ALL.len());
            asked.extend(names.into_iter().map(|(n, _)| ("conv_wgmma".into(), n)));
        }
        let missing: Vec<_> = asked.iter().filter(|(m, n)| !exists(m, n)).collect();
        assert!(missing.is_empty(), "not in the built modules: {missing:?}");
    }

    /// Every input pixel of a stride-2 convolution falls in exactly one parity class, and each
    /// class's taps are exactly the forward taps that reach it.
    #[test]
    fn stride2_backward_classes_cover_the_adjoint() {
        for pad in [Pad::Symmetric, Pad::RightBottom] {
            let (h, w) = (6, 10);
            let classes = ConvShape::backward(1, h, w, 1, 1, 3, 2, pad);
            assert_eq!(classes.len(), 4);
            let total: usize = classes.iter().map(|c| c.rows()).sum();
            assert_eq!(total, h * w);
            let p = pad_before(pad);
            for c in &classes {
                for j in 0..c.mh {
                    for i in 0..c.mw {
                        let (iy, ix) = ((j * 2 + c.out_oy) as i32, (i * 2 + c.out_ox) as i32);
                        let mut want: Vec<(i32, i32, i32)> = Vec::new();
                        for t in 0..9 {
                            let (dy, dx) = (t / 3, t % 3);
                            let (ny, nx) = (iy + p - dy, ix + p - dx);
                            if ny % 2 == 0
                                && nx % 2 == 0
                                && ny >= 0
                                && nx >= 0
                                && ny / 2 < (h / 2) as i32
                                && nx / 2 < (w / 2) as i32
                            {
                                want.push((ny / 2, nx / 2, t));
                            }
                        }
                        let mut got: Vec<(i32, i32, i32)> = c
                            .taps
                            .iter()
                            .map(|t| (j as i32 + t.dy, i as i32 + t.dx, t.w))
                            .filter(|&(y, x, _)| {
                                y >= 0 && x >= 0 && y < (h / 2) as i32 && x < (w / 2) as i32
                            })
                            .collect();
                        want.sort();
                        got.sort();
                        assert_eq!(got, want, "{pad:?} pixel ({iy}, {ix})");
                    }
                }
            }
        }
    }

    #[test]
    fn split_k_fills_the_machine_only_when_needed() {
        let big = ConvShape::forward(1, 256, 256, 128, 128, 3, 1, Pad::Symmetric);
        assert_eq!(plan_conv(&big, 132).splits, 1);
        assert_eq!(plan_conv(&big, 132).kernel, ConvKernel::Vec);
        let small = ConvShape::forward(1, 8, 8, 1024, 512, 3, 1, Pad::Symmetric);
        let p = plan_conv(&small, 132);
        assert!(p.splits > 16, "{p:?}");
        assert!(
            p.splits * p.k_per_split >= small.k() && (p.splits - 1) * p.k_per_split < small.k()
        );
        assert_eq!(p.k_per_split % BK, 0);
    }

    /// The 3-channel image convolutions, both directions, on the direct kernels; shapes they
    /// cannot compute (stride 2, taps outside a 3x3 window, many channels both sides) on the
    /// GEMM.
    #[test]
    fn few_channels_take_the_direct_kernels() {
        use Pad::*;
        let kernels = |cin, cout, stride, pad| {
            let f = plan_conv(
                &ConvShape::forward(2, 256, 256, cin, cout, 3, stride, pad),
                132,
            );
            let b: Vec<_> = ConvShape::backward(2, 256, 256, cin, cout, 3, stride, pad)
                .iter()
                .map(|s| plan_conv(s, 132).kernel)
                .collect();
            assert!(b.iter().all(|&k| k == b[0]));
            assert_eq!(f.splits, 1);
            (f.kernel, b[0])
        };
        use ConvKernel::{Any, FewIn, Narrow};
        assert_eq!(kernels(128, 3, 1, Symmetric), (Narrow, FewIn));
        assert_eq!(kernels(3, 128, 1, Symmetric), (FewIn, Narrow));
        assert_eq!(kernels(8, 8, 1, Symmetric), (Narrow, Narrow));
        assert_eq!(kernels(9, 9, 1, Symmetric), (Any, Any));
        // Stride 2: the forward on the GEMM, its parity-class gradients direct.
        assert_eq!(kernels(3, 128, 2, Symmetric), (Any, Narrow));
        assert_eq!(kernels(128, 4, 2, RightBottom), (ConvKernel::Vec, FewIn));
        // 1x1 and linear layers.
        let one = ConvShape::forward(1, 16, 16, 3, 64, 1, 1, Symmetric);
        assert_eq!(plan_conv(&one, 132).kernel, FewIn);
        assert_eq!(
            plan_conv(&ConvShape::linear(1, 100, 64, 3), 132).kernel,
            Narrow
        );
        // Taps beyond one 3x3 window, or two at one offset.
        let mut wide = ConvShape::forward(1, 16, 16, 64, 3, 3, 1, Symmetric);
        wide.taps[0].dx = -2;
        assert_eq!(plan_conv(&wide, 132).kernel, Any);
        let mut twice = ConvShape::forward(1, 16, 16, 64, 3, 3, 1, Symmetric);
        twice.taps[1] = twice.taps[0];
        assert_eq!(plan_conv(&twice, 132).kernel, Any);
        assert!(direct_fits(&ConvShape::forward(
            1,
            16,
            16,
            64,
            3,
            3,
            1,
            RightBottom
        )));
    }

    /// Tensor cores wherever channels allow, the fp32 kernels elsewhere and for fp32, and the
    /// split of K in whole tensor-core slices.
    #[test]
    fn precision_picks_the_kernel() {
        let big = ConvShape::forward(8, 256, 256, 128, 128, 3, 1, Pad::Symmetric);
        for p in [Precision::Tf32, Precision::Bf16, Precision::Fp16] {
            assert_eq!(plan_conv_at(&big, 132, p).kernel, ConvKernel::Tensor(p));
            assert_eq!(plan_conv_at(&big, 132, p).splits, 1);
            let small = ConvShape::forward(1, 8, 8, 512, 512, 3, 1, Pad::Symmetric);
            let l = plan_conv_at(&small, 132, p);
            assert!(l.splits > 1 && l.k_per_split % tc_slice(p) == 0, "{l:?}");
            assert!(l.splits * l.k_per_split >= small.k());
            for s in [
                ConvShape::forward(1, 256, 256, 3, 128, 3, 1, Pad::Symmetric),
                ConvShape::forward(1, 256, 256, 128, 3, 3, 1, Pad::Symmetric),
                ConvShape::forward(1, 16, 16, 20, 36, 3, 1, Pad::Symmetric),
            ] {
                assert_eq!(plan_conv_at(&s, 132, p), plan_conv(&s, 132));
            }
        }
        assert_eq!(
            plan_conv_at(&big, 132, Precision::Fp32),
            plan_conv(&big, 132)
        );
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
        let src = include_str!("../../kernels/conv_tc.cu");
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

    #[test]
    fn norm_split_covers_every_pixel() {
        for (n, hw, c) in [(1, 65536, 128), (8, 64, 512), (3, 35, 96), (1, 1, 32)] {
            let s = plan_norm(n, hw, c, 32, 132, 0);
            assert!(
                s.chunks * s.chunk_px >= hw && (s.chunks - 1) * s.chunk_px < hw,
                "{s:?}"
            );
            assert_eq!(s.one_pass, None);
        }
    }

    #[test]
    fn one_pass_groupnorm_takes_the_small_levels_only() {
        // celebahq-256 (32 groups): the 8x8 to 32x32 levels in one block a group; with
        // clusters also 64x64 (4 blocks) and 128x128 at 128 channels (8), never 256x256.
        let one = |threads, blocks| Some(OnePass { threads, blocks });
        for (hw, c, want, clustered) in [
            (8 * 8, 512, one(128, 1), one(128, 1)),
            (16 * 16, 512, one(512, 1), one(512, 1)),
            (32 * 32, 256, one(1024, 1), one(1024, 1)),
            (64 * 64, 256, None, one(1024, 4)),
            (64 * 64, 512, None, one(1024, 8)),
            (128 * 128, 128, None, one(1024, 8)),
            (128 * 128, 256, None, None),
            (256 * 256, 128, None, None),
        ] {
            assert_eq!(plan_norm(1, hw, c, 32, 132, 1).one_pass, want, "{hw} {c}");
            let got = plan_norm(1, hw, c, 32, 132, GN_CLUSTER_MAX).one_pass;
            assert_eq!(got, clustered, "{hw} {c}");
            assert_eq!(plan_norm(8, hw, c, 32, 132, 0).one_pass, None);
        }
        // Odd group widths: whole warps, and a group's blocks hold all its pixels (the kernel's
        // rows = threads / cg pixel rows a block, ONE_PASS_PIXELS apiece).
        for (hw, cg) in [(35, 3), (1, 1), (15, 3), (100, 7), (10_000, 3), (4096, 7)] {
            let s = one_pass_shape(hw, cg, GN_CLUSTER_MAX).unwrap();
            let (t, b) = (s.threads as usize, s.blocks as usize);
            assert!(
                t % 32 == 0 && t <= 1024 && t / cg * b * GN_ONE_PASS_PIXELS >= hw,
                "{hw} {cg} {s:?}"
            );
        }
        assert_eq!(one_pass_shape(1, 2048, GN_CLUSTER_MAX), None);
        assert_eq!(one_pass_shape(1, 32, 0), None);
    }
}
