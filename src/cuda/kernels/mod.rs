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
//!   per multiprocessor (the `_ilp` ones: two waves of the blocks one keeps resident, 6-12);
//! - `conv_narrow_<ncols>`: 256; (⌈mw/32⌉, ⌈mh/16⌉, n), 59.6-65.7 KB dynamic shared memory;
//!   `conv_narrow_mma_*` (tensor cores, 16-bit input): the same grid, 57.4 KB + 144 bytes a
//!   source channel (75.4 KB at 128); `conv_few_in_mma_<sc>` (tensor cores): 256;
//!   (⌈rows/128⌉, ⌈ncols/128⌉), 12.1-44.1 KB static shared memory;
//!   `conv_few_in_<sc>`: 256; (⌈runs/(256/quads)⌉ capped at 2 blocks per multiprocessor,
//!   ⌈ncols/128⌉), grid-stride over runs of 16 pixels, 4.6-36.9 KB static shared memory;
//! - `linear_rows`, `linear_batch`, `softmax_*`: 256 (8 warps, a warp per output row or
//!   element), grid-stride, capped at 16 blocks per multiprocessor;
//! - `attention_rows_split` ([`Kernels::attention_rows`]): 256; (⌈L/16⌉, ⌈L/32⌉, images x
//!   heads), 29.5-184.5 KB dynamic shared memory by head width; `attention_rows_combine`: 128;
//!   (L, images x heads); `attention_rows_ds`: as `_split`, 26-150 KB; `attention_rows_grads`:
//!   256; (⌈L/16⌉, ⌈head width/64⌉, 3 x images x heads), 66 KB;
//! - `attention_flash_*` (fused attention, [`Kernels::attention_flash`]): 128; (⌈L/64⌉,
//!   head width / 64, images x heads), 70-141 KB dynamic shared memory;
//! - `gemm_batched`: 256; (⌈n/64⌉, ⌈m/64⌉, batch); where that grid has fewer blocks than
//!   multiprocessors (unless `INVDIFF_GEMM_SMALL_TILES=0`), `gemm_batched_wk`
//!   ([`Kernels::gemm`]): (⌈n/32⌉, ⌈m/16⌉, batch), or with `INVDIFF_GEMM_WARP_K=0`
//!   `gemm_batched_32`: (⌈n/32⌉, ⌈m/32⌉, batch); `gemm_batched_tf32` (tf32 tensor cores, [`Gemm::tf32`]): as
//!   `gemm_batched`;
//! - `gn_partial` / `gn_bwd_partial(_ilp)`: 32x8; (chunks, ⌈c/32⌉, n), or with two channels a
//!   thread (`gn_bwd_partial_x16_dy16_pairs`, [`LaunchSwitches::gn_bwd_sums_pairs`]) (chunks,
//!   ⌈c/64⌉, n); `gn_*finalize`: 256 threads (`GN_FIN_THREADS`), a block per (image, group);
//!   `gn_one_pass` / `gn_bwd_one_pass`: up to 1024 threads ([`one_pass_threads`]), a block per
//!   (image, group); the forward's `_x16` kernels (16-bit input) as their fp32 forms;
//!   `conv_splitk_reduce_norm` (a split launch's reduction and its output's one-pass
//!   GroupNorm): up to 1024 threads ([`reduction_norm_threads`]), a block per (image, group);
//! - `timing_hold` (profiling only): one block of 32 threads.
//!
//! This module loads the kernels ([`Kernels::load`]) and holds what every launcher shares (the
//! argument checks, launch shapes, [`Capabilities`], the profiling `hold`). The launchers of
//! each op family have a file of their own, as the kernels do in `kernels/`, next to that
//! family's planning: `conv` (with `conv_plan`, which kernel, tile and split of K a
//! convolution takes), `norm`, `attention` (with gemm.cu's batched products), `linear` and
//! `resample`.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::device::{cu, fatbins, sm90a_fatbins, DeviceInfo};
use super::precision::Precision;
use crate::{switches, Error, Result};

mod attention;
mod conv;
mod conv_plan;
mod linear;
mod norm;
mod resample;
mod tma;

pub(crate) use attention::{
    flash_fits, gemm_form, rows_fits, rows_scratch_len, rows_split_blocks, Gemm, GemmForm,
};
#[cfg(test)]
pub(crate) use conv::wgmma_kernel_exists;
pub(crate) use conv::{ConvPtrs, ProbeCounters, Side16, WGMMA_PROBE_COUNTERS, WGMMA_PROBE_PHASES};
pub(crate) use conv_plan::{
    fold_upsampled_weights, gn_partial_fits, im2col_box, narrow_mma_fits, on_tile, plan_conv,
    plan_conv_at, plan_launch, plan_wgmma, tma_tried, ConvKernel, ConvLaunch, ConvShape, WgmmaTile,
    WGMMA_FORMS, WGMMA_SLICE,
};
pub(crate) use linear::{linear_batch_table, LINEAR_BATCH_MAX, LINEAR_ITEM_WORDS};
pub(crate) use norm::{
    norm_forms, plan_norm, reduction_norm_threads, GradSides, NormBackwardIn, NormBackwardOut,
    NormDims, NormLaunches, NormSplit, ReductionNorm, Silu,
};
// Used only by documentation links.
#[cfg(doc)]
pub(crate) use norm::one_pass_threads;

use attention::{rows_ds_smem, rows_smem, FLASH_SMEM, ROWS_GRADS_SMEM, ROWS_MAX_D};
use conv::{
    narrow_mma_smem, narrow_smem, wgmma_extra_kernels, wgmma_kernel_names, TC_KERNELS,
    WGMMA_EXTRA_SLOTS,
};
use conv_plan::{DIRECT_MAX, NARROW_MMA_MAX_SC};
use norm::SiluNormFns;

/// A raw device address (`CUdeviceptr`); 0 is the null pointer the kernels test for.
pub(crate) type DPtr = u64;

/// The kernels a device runs beyond the ones every device does ([`Kernels::capabilities`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// Hopper's wgmma convolutions (compute capability 9.0).
    pub wgmma: bool,
    /// The fused attention kernels (141 KB of shared memory a block).
    pub flash: bool,
    /// The attention rows kernels at their widest heads (184.5 KB of shared memory a block).
    pub rows: bool,
}

impl Capabilities {
    /// An H100's or H200's: what the plans made without a GPU assume.
    pub(crate) const HOPPER: Capabilities = Capabilities {
        wgmma: true,
        flash: true,
        rows: true,
    };
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

/// A kernel's optional 16-bit output as its two arguments: the address (0 for none, which the
/// kernels test) and the format code of [`half_kind`]; `what` names it if it is null.
fn half_output(half: Option<(DPtr, Precision)>, what: &str) -> Result<(DPtr, i32)> {
    match half {
        Some((p, precision)) => {
            need(p, what)?;
            Ok((p, half_kind(precision)?))
        }
        None => Ok((0, 0)),
    }
}

/// A concatenation's inputs `a` and `b` checked, and its 16-bit output `half` as
/// [`half_output`] gives it; the fp32 output `y` may be 0 only where that copy is all it
/// writes ([`Kernels::concat`], [`Kernels::concat_with_norm_sums`]), and then an input of 0
/// is a side already in the copy (written by its producers).
fn concat_outputs(
    a: DPtr,
    b: DPtr,
    y: DPtr,
    half: Option<(DPtr, Precision)>,
) -> Result<(DPtr, i32)> {
    let (y16, kind) = half_output(half, "16-bit output")?;
    if y16 == 0 || y != 0 {
        need(a, "first input")?;
        need(b, "second input")?;
    }
    if y16 == 0 {
        need(y, "output")?;
    }
    Ok((y16, kind))
}

/// A grid's y or z extent, `v`: at most 65535 (x goes to 2^31 - 1, which the launchers' 32-bit
/// checks cover).
fn grid_dim(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&g| g <= 65535)
        .ok_or_else(|| Error::Cuda(format!("{what} = {v}: too many for one launch")))
}

fn i64_of(v: usize) -> i64 {
    v as i64
}

/// Launch choices below a program's plan that the `INVDIFF_*` switches make, read once when
/// the kernels load ([`Kernels::with_launch`] makes others, for the selftest); each gives the
/// same bits either way unless its doc says otherwise. `Default` is every choice off, not the
/// defaults, which [`from_switches`](Self::from_switches) gives with no switch set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LaunchSwitches {
    /// Batched products that would leave multiprocessors idle take smaller tiles, 32-wide or
    /// (`gemm_warp_k`) warp-split (unless `INVDIFF_GEMM_SMALL_TILES=0`; the 32-wide ones took
    /// 2.6% off a bf16 forward at batch 1 on an H200).
    pub small_tiles: bool,
    /// Small batched products take `gemm_batched_wk`, whose warps split K (unless
    /// `INVDIFF_GEMM_WARP_K=0`; another rounding; 1.6% off a bf16 DPS step at batch 1 on an
    /// H200).
    pub gemm_warp_k: bool,
    /// Concatenations' sums over sides already written take `gn_concat_partial_pairs_ahead`
    /// (unless `INVDIFF_CONCAT_SUMS_AHEAD=0`; 1% off a bf16 forward at batch 8 on an H200).
    pub concat_sums_ahead: bool,
    /// The sums of GroupNorm backward passes over a 16-bit x and output gradient take
    /// `gn_bwd_partial_x16_dy16_pairs`, two channels a thread (`INVDIFF_GN_BWD_SUMS_PAIRS=1`,
    /// a candidate; the same bits).
    pub gn_bwd_sums_pairs: bool,
}

impl LaunchSwitches {
    /// What the switches set now.
    pub fn from_switches() -> Self {
        LaunchSwitches {
            small_tiles: !switches::is("INVDIFF_GEMM_SMALL_TILES", "0"),
            gemm_warp_k: !switches::is("INVDIFF_GEMM_WARP_K", "0"),
            concat_sums_ahead: !switches::is("INVDIFF_CONCAT_SUMS_AHEAD", "0"),
            gn_bwd_sums_pairs: switches::is("INVDIFF_GN_BWD_SUMS_PAIRS", "1"),
        }
    }

    /// The choices that are on, in words, for reports.
    pub fn describe(&self) -> Vec<&'static str> {
        [
            (self.small_tiles, "small product tiles"),
            (self.gemm_warp_k, "product warps splitting K"),
            (
                self.concat_sums_ahead,
                "concatenation sums eight pixels ahead",
            ),
            (
                self.gn_bwd_sums_pairs,
                "GroupNorm backward sums two channels a thread",
            ),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect()
    }
}

/// Handles to every kernel of the embedded fatbins. Cloning copies handles (the modules are
/// shared), as [`Kernels::with_launch`] does.
#[derive(Clone)]
pub(crate) struct Kernels {
    sms: u32,
    /// The launch choices the switches make (`INVDIFF_GEMM_WARP_K`, ...).
    launch: LaunchSwitches,
    conv_gemm_vec: CudaFunction,
    conv_gemm_any: CudaFunction,
    conv_splitk_reduce: CudaFunction,
    /// A split launch's reduction that also writes the 16-bit copy of its output.
    conv_splitk_reduce_copy: CudaFunction,
    /// `conv_narrow_<ncols>` at index ncols - 1, with its dynamic shared memory allowed.
    conv_narrow: Vec<CudaFunction>,
    /// `conv_few_in_<sc>` at index sc - 1.
    conv_few_in: Vec<CudaFunction>,
    /// `conv_narrow_mma_bf16`, `conv_narrow_mma_fp16`, with their dynamic shared memory
    /// allowed.
    conv_narrow_mma: [CudaFunction; 2],
    /// `conv_few_in_mma_<sc>` at index sc - 1.
    conv_few_in_mma: Vec<CudaFunction>,
    conv_weight_transpose: CudaFunction,
    /// The tensor-core convolutions, in the order of [`TC_KERNELS`].
    conv_tc: Vec<CudaFunction>,
    tc_convert: CudaFunction,
    gemm_batched: CudaFunction,
    gemm_batched_32: CudaFunction,
    gemm_batched_tf32: CudaFunction,
    gemm_batched_wk: CudaFunction,
    softmax_forward: CudaFunction,
    softmax_backward: CudaFunction,
    /// `attention_flash_forward`, `_backward_dq`, `_backward_dkv`, their shared memory allowed;
    /// on devices that give a block that much ([`FLASH_SMEM`]) only.
    attention_flash: Option<[CudaFunction; 3]>,
    /// `attention_rows_split`, `_combine`, `_ds` and `_grads`, their shared memory at the
    /// widest head allowed, on devices that give a block that much only.
    attention_rows: Option<[CudaFunction; 4]>,
    linear_rows: CudaFunction,
    linear_batch: CudaFunction,
    gn_partial: CudaFunction,
    gn_concat_partial: CudaFunction,
    gn_concat_partial_pairs: CudaFunction,
    gn_concat_partial_pairs_ahead: CudaFunction,
    gn_finalize: CudaFunction,
    gn_partial_x16: CudaFunction,
    gn_bwd_finalize: CudaFunction,
    /// The GroupNorm kernels that take a `silu` argument, from kernels/norm.cu (accurate SiLU)
    /// and kernels/norm_approx.cu (approximate): [`Kernels::silu_norm`].
    silu_norms: [SiluNormFns; 2],
    nchw_to_nhwc: CudaFunction,
    nhwc_to_nchw: CudaFunction,
    upsample2x: CudaFunction,
    upsample2x_half: CudaFunction,
    upsample2x_backward: CudaFunction,
    concat_channels: CudaFunction,
    concat_channels_half: CudaFunction,
    concat_backward: CudaFunction,
    add_into: CudaFunction,
    div_inplace: CudaFunction,
    timestep_embedding: CudaFunction,
    timing_hold: CudaFunction,
    /// Hopper's wgmma convolutions: on compute capability 9.0 only.
    conv_wgmma: Option<WgmmaKernels>,
}

/// The wgmma convolution kernels (kernels/conv_wgmma.cu).
#[derive(Clone)]
struct WgmmaKernels {
    /// `conv_wgmma_bf16`, `conv_wgmma_fp16`, their `_rows`, `_rows_lean` and `_rows_tma` forms,
    /// then the `_tall` forms of all eight (`conv::wgmma_index`).
    plain: [CudaFunction; WGMMA_KERNELS],
    /// The same kernels with cycle counters (`_probe`), for [`Kernels::conv_probe`].
    probe: [CudaFunction; WGMMA_KERNELS],
    /// The kernels with a fused shortcut or a staged epilogue, in the slots of
    /// `conv::WgmmaExtras::index` (`conv::wgmma_extra_kernels`).
    extras: Vec<Option<CudaFunction>>,
}

/// Both precisions and the four forms ([`WGMMA_FORMS`]) of every wgmma tile.
const WGMMA_KERNELS: usize = 2 * WGMMA_FORMS.len() * WgmmaTile::ALL.len();

const BLOCK: u32 = 256;

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

/// Byte offset of f32 element `i` (device addresses are in bytes).
pub(crate) fn at(base: DPtr, i: usize) -> DPtr {
    base + 4 * i as u64
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
        let conv_wgmma = match wgmma_module {
            Some((name, image)) if info.compute_capability == (9, 0) => {
                let m = cu(
                    ctx.load_module(Ptx::from_binary(image.to_vec())),
                    &format!("loading kernel module `{name}` on {}", info.name),
                )?;
                let f = |f: &str, bytes: u32| -> Result<CudaFunction> {
                    let f = cu(m.load_function(f), &format!("looking up kernel `{f}`"))?;
                    allow_smem(ctx, f, bytes)
                };
                // One family's kernels, each with its tile's shared memory, in a table of N.
                fn table<const N: usize>(
                    f: &dyn Fn(&str, u32) -> Result<CudaFunction>,
                    names: Vec<(String, WgmmaTile)>,
                    what: &str,
                ) -> Result<[CudaFunction; N]> {
                    names
                        .iter()
                        .map(|(kernel, tile)| f(kernel, tile.smem()))
                        .collect::<Result<Vec<_>>>()?
                        .try_into()
                        .map_err(|_| Error::Cuda(format!("internal: {what} kernel table")))
                }
                let mut extras = vec![None; WGMMA_EXTRA_SLOTS];
                for (slot, kernel, tile) in wgmma_extra_kernels() {
                    extras[slot] = Some(f(&kernel, tile.smem())?);
                }
                Some(WgmmaKernels {
                    plain: table(&f, wgmma_kernel_names(""), "wgmma")?,
                    probe: table(&f, wgmma_kernel_names("_probe"), "cycle-counting wgmma")?,
                    extras,
                })
            }
            _ => None,
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
        let widest = rows_smem(ROWS_MAX_D);
        let attention_rows = if widest <= info.max_block_smem {
            Some([
                allow_smem(ctx, get("attention", "attention_rows_split")?, widest)?,
                get("attention", "attention_rows_combine")?,
                allow_smem(
                    ctx,
                    get("attention", "attention_rows_ds")?,
                    rows_ds_smem(ROWS_MAX_D),
                )?,
                allow_smem(
                    ctx,
                    get("attention", "attention_rows_grads")?,
                    ROWS_GRADS_SMEM,
                )?,
            ])
        } else {
            None
        };
        Ok(Kernels {
            sms: info.multiprocessors.max(1),
            launch: LaunchSwitches::from_switches(),
            conv_gemm_vec: get("conv", "conv_gemm_vec")?,
            conv_gemm_any: get("conv", "conv_gemm_any")?,
            conv_splitk_reduce: get("conv", "conv_splitk_reduce")?,
            conv_splitk_reduce_copy: get("conv", "conv_splitk_reduce_copy")?,
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
            conv_narrow_mma: [
                allow_smem(
                    ctx,
                    get("conv_tc", "conv_narrow_mma_bf16")?,
                    narrow_mma_smem(NARROW_MMA_MAX_SC),
                )?,
                allow_smem(
                    ctx,
                    get("conv_tc", "conv_narrow_mma_fp16")?,
                    narrow_mma_smem(NARROW_MMA_MAX_SC),
                )?,
            ],
            conv_few_in_mma: (1..=DIRECT_MAX)
                .map(|c| get("conv_tc", &format!("conv_few_in_mma_{c}")))
                .collect::<Result<_>>()?,
            conv_weight_transpose: get("conv", "conv_weight_transpose")?,
            conv_tc,
            tc_convert: get("conv_tc", "tc_convert")?,
            gemm_batched: get("gemm", "gemm_batched")?,
            gemm_batched_32: get("gemm", "gemm_batched_32")?,
            gemm_batched_tf32: get("gemm", "gemm_batched_tf32")?,
            gemm_batched_wk: get("gemm", "gemm_batched_wk")?,
            softmax_forward: get("attention", "softmax_forward")?,
            softmax_backward: get("attention", "softmax_backward")?,
            attention_flash,
            attention_rows,
            linear_rows: get("linear", "linear_rows")?,
            linear_batch: get("linear", "linear_batch")?,
            gn_partial: get("norm", "gn_partial")?,
            gn_concat_partial: get("norm", "gn_concat_partial")?,
            gn_concat_partial_pairs: get("norm", "gn_concat_partial_pairs")?,
            gn_concat_partial_pairs_ahead: get("norm", "gn_concat_partial_pairs_ahead")?,
            gn_finalize: get("norm", "gn_finalize")?,
            gn_partial_x16: get("norm", "gn_partial_x16")?,
            gn_bwd_finalize: get("norm", "gn_bwd_finalize")?,
            silu_norms: [
                SiluNormFns::load(&get, SiluNormFns::MODULES[0])?,
                SiluNormFns::load(&get, SiluNormFns::MODULES[1])?,
            ],
            nchw_to_nhwc: get("resample", "nchw_to_nhwc")?,
            nhwc_to_nchw: get("resample", "nhwc_to_nchw")?,
            upsample2x: get("resample", "upsample2x")?,
            upsample2x_half: get("resample", "upsample2x_half")?,
            upsample2x_backward: get("resample", "upsample2x_backward")?,
            concat_channels: get("resample", "concat_channels")?,
            concat_channels_half: get("resample", "concat_channels_half")?,
            concat_backward: get("resample", "concat_backward")?,
            add_into: get("resample", "add_into")?,
            div_inplace: get("resample", "div_inplace")?,
            timestep_embedding: get("resample", "timestep_embedding")?,
            timing_hold: get("timing", "timing_hold")?,
            conv_wgmma,
        })
    }

    /// The launch choices the `INVDIFF_*` switches make.
    pub fn launch_switches(&self) -> LaunchSwitches {
        self.launch
    }

    /// The same kernels making the launch choices `launch` instead, for the selftest to run
    /// a launch both ways.
    pub(crate) fn with_launch(&self, launch: LaunchSwitches) -> Kernels {
        Kernels {
            launch,
            ..self.clone()
        }
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
            rows: self.attention_rows.is_some(),
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

    /// Keeps the stream busy for `ns` nanoseconds of device time (kernels/timing.cu): launched
    /// ahead of a profiled iteration, it gives the host time to enqueue the iteration's launches
    /// before the GPU reaches them.
    pub fn hold(&self, st: &CudaStream, ns: u64) -> Result<()> {
        let mut b = st.launch_builder(&self.timing_hold);
        b.arg(&ns);
        // SAFETY: the kernel reads and writes no memory.
        cu(
            unsafe { b.launch(cfg((1, 1, 1), (32, 1, 1))) }.map(drop),
            "launching timing_hold",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::norm::NormBackwardFns;
    use super::*;

    /// Every kernel the loaders look up ([`Kernels::load`], `SamplerKernels::load`) is an
    /// entry point of the module they look in, as build.rs read them from the PTX: a misspelt
    /// or missing kernel fails here, not when the first GPU loads the modules. The names come
    /// from the loaders' source (each `get("module", "name")`, the numbered direct kernels),
    /// the tensor-core table, the wgmma tables and the GroupNorm kernels each of the two
    /// GroupNorm modules has.
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
        // Every launcher module (a loader line may sit in any of them) and the sampler's.
        let mut files: Vec<_> = std::fs::read_dir(root.join("kernels"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files.push(root.join("sampler_kernels.rs"));
        for file in files {
            let src = std::fs::read_to_string(file).unwrap();
            // The loaders, not the test modules.
            let src = src.split("#[cfg(test)]\nmod tests").next().unwrap();
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
            assert_eq!(names.len(), WGMMA_KERNELS);
            asked.extend(names.into_iter().map(|(n, _)| ("conv_wgmma".into(), n)));
        }
        for module in SiluNormFns::MODULES {
            asked.extend(
                NormBackwardFns::names()
                    .flat_map(|(_, kernels)| kernels)
                    .chain(SiluNormFns::NAMES.iter().map(|n| n.to_string()))
                    .map(|n| (module.into(), n)),
            );
        }
        asked.extend(
            wgmma_extra_kernels()
                .into_iter()
                .map(|(_, n, _)| ("conv_wgmma".into(), n)),
        );
        let missing: Vec<_> = asked.iter().filter(|(m, n)| !exists(m, n)).collect();
        assert!(missing.is_empty(), "not in the built modules: {missing:?}");
    }
}
