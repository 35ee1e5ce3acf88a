//! Attention (kernels/attention.cu, gemm.cu): the batched products and softmax of the unfused
//! attention, the forward in rows of queries, and the fused FlashAttention-style kernels.

use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, PushKernelArg};

use super::{
    at, cfg, grid_dim, half_output, i32_of, i64_of, need, DPtr, Kernels, LaunchSwitches, BLOCK,
};
use crate::cuda::device::cu;
use crate::cuda::precision::Precision;
use crate::{Error, Result};

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

/// RowsArgs of kernels/attention.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RowsArgs {
    qkv: DPtr,
    part: DPtr,
    ml: DPtr,
    p: DPtr,
    y: DPtr,
    y16: DPtr,
    tokens: i32,
    heads: i32,
    head_dim: i32,
    splits: i32,
    scale: f32,
    half_kind: i32,
}

const _: () = assert!(std::mem::size_of::<RowsArgs>() == 72);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for RowsArgs {}

/// RowsBwdArgs of kernels/attention.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RowsBwdArgs {
    qkv: DPtr,
    o: DPtr,
    dout: DPtr,
    p: DPtr,
    ds: DPtr,
    dqkv: DPtr,
    dqkv16: DPtr,
    tokens: i32,
    heads: i32,
    head_dim: i32,
    accumulate: i32,
    scale: f32,
    half_kind: i32,
}

const _: () = assert!(std::mem::size_of::<RowsBwdArgs>() == 80);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for RowsBwdArgs {}

/// Queries of an `attention_rows_split` block, and keys of its split.
const ROWS_QUERIES: usize = 16;
const ROWS_KEYS: usize = 32;

/// The widest head the rows kernels take (kernels/attention.cu `ar::MAX_D`).
pub(super) const ROWS_MAX_D: usize = 512;

/// Whether the rows kernels take heads of `head_dim` (whole k16 steps, at most
/// [`ROWS_MAX_D`]).
pub(crate) fn rows_fits(head_dim: usize) -> bool {
    head_dim > 0 && head_dim % 16 == 0 && head_dim <= ROWS_MAX_D
}

/// Row pitch, floats, of the rows kernels' partial scores and exponentials (`ar::RP`), and
/// the warps of a block.
const ROWS_SCORE_PITCH: usize = 40;
const ROWS_WARPS: usize = 8;

/// Dynamic shared memory of `attention_rows_split` at heads of `head_dim`, bytes (the
/// kernel's `rows_smem`, which traps when given less): q and k rows at a pitch of
/// head_dim + 8, v rows at head_dim + 4, the warps' partial scores and the exponentials;
/// 188,928 at 512.
pub(super) fn rows_smem(head_dim: usize) -> u32 {
    let floats = (ROWS_QUERIES + ROWS_KEYS) * (head_dim + 8)
        + ROWS_KEYS * (head_dim + 4)
        + (ROWS_WARPS + 1) * ROWS_QUERIES * ROWS_SCORE_PITCH;
    (4 * floats) as u32
}

/// Dynamic shared memory of `attention_rows_ds` at heads of `head_dim`, bytes (the kernel's
/// `rows_ds_smem`): the queries' output gradients and outputs and the split's values at a
/// pitch of head_dim + 8, the warps' partial scores, a sum per query; 153,664 at 512.
pub(super) fn rows_ds_smem(head_dim: usize) -> u32 {
    let floats = (2 * ROWS_QUERIES + ROWS_KEYS) * (head_dim + 8)
        + ROWS_WARPS * ROWS_QUERIES * ROWS_SCORE_PITCH
        + ROWS_QUERIES;
    (4 * floats) as u32
}

/// Dynamic shared memory of `attention_rows_grads` (kernels/attention.cu `ROWS_GRADS_SMEM`):
/// three stages of a 64-deep chunk of its A and B operands.
pub(super) const ROWS_GRADS_SMEM: u32 = 67_584;

/// Output columns of an `attention_rows_grads` block.
const ROWS_GRADS_COLS: usize = 64;

/// The grid of `attention_rows_split` and `attention_rows_ds`: query tiles, key splits and
/// (image, head) pairs, each checked to fit a launch.
struct RowsGrid {
    tiles: u32,
    splits: u32,
    pairs: u32,
}

impl RowsGrid {
    fn new(n: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<Self> {
        i32_of(tokens * 3 * heads * head_dim, "tokens x q/k/v width")?;
        Ok(RowsGrid {
            tiles: i32_of(tokens.div_ceil(ROWS_QUERIES), "attention query tiles")? as u32,
            splits: grid_dim(tokens.div_ceil(ROWS_KEYS), "attention key splits")?,
            pairs: grid_dim(n * heads, "attention (image, head) pairs")?,
        })
    }
}

/// Blocks of `attention_rows_split` over `pairs` (image, head) pairs of `tokens` tokens.
pub(crate) fn rows_split_blocks(pairs: usize, tokens: usize) -> usize {
    pairs * tokens.div_ceil(ROWS_QUERIES) * tokens.div_ceil(ROWS_KEYS)
}

/// Floats of the rows kernels' scratch per (image, head) at `tokens` and `head_dim`: each
/// 32-key split's share of the output and each query's (maximum, sum) in it.
pub(crate) fn rows_scratch_len(tokens: usize, head_dim: usize) -> usize {
    tokens.div_ceil(ROWS_KEYS) * tokens * (head_dim + 2)
}

/// Dynamic shared memory of the fused attention kernels (kernels/attention.cu
/// `FLASH_*_SMEM`, which trap when given less): forward, dQ, dK and dV.
pub(super) const FLASH_SMEM: [u32; 3] = [71_680, 108_800, 144_384];

/// Rows of a fused attention block's tile and columns of its output chunk.
const FLASH_TILE: usize = 64;

/// Whether the fused attention kernels take heads of `head_dim` (whole 64-column chunks).
pub(crate) fn flash_fits(head_dim: usize) -> bool {
    head_dim > 0 && head_dim % FLASH_TILE == 0
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

/// The kernel of kernels/gemm.cu that runs a batched product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmForm {
    /// Square tiles of `tile` (32 or 64) outputs: the same bits whatever the tile.
    Tiles { tile: usize },
    /// 16 x 32 tiles whose eight warps each multiply an eighth of K (`gemm_batched_wk`, fp32
    /// only): each output's eight runs added in order, another rounding.
    WarpK,
}

/// `g`'s kernel arguments, or `None` for a product with no outputs.
fn gemm_args(g: &Gemm) -> Result<Option<GemmArgs>> {
    need(g.a, "matrix A")?;
    need(g.b, "matrix B")?;
    need(g.c, "matrix C")?;
    if g.m == 0 || g.n == 0 || g.outer * g.inner == 0 {
        return Ok(None);
    }
    Ok(Some(GemmArgs {
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
    }))
}

/// How [`Kernels::gemm`] runs `g` on a device of `sms` multiprocessors. With
/// `launch.small_tiles`, 32-wide tiles where 64-wide ones would not give every multiprocessor a
/// block (the same sums in the same order either way), or with `launch.gemm_warp_k` tiles whose
/// warps split K, which round otherwise: with `per_image` (`--batch-invariant`) that choice is
/// made for one image's share of the batch, so that an image's results do not depend on the
/// batch. The tf32 kernel has 64-wide tiles only.
pub(crate) fn gemm_form(g: &Gemm, sms: u32, launch: &LaunchSwitches, per_image: bool) -> GemmForm {
    let small = |outer: usize| {
        let blocks64 = g.m.div_ceil(64) * g.n.div_ceil(64) * outer * g.inner;
        launch.small_tiles && !g.tf32 && blocks64 < sms as usize
    };
    if launch.gemm_warp_k && small(if per_image { 1 } else { g.outer }) {
        return GemmForm::WarpK;
    }
    GemmForm::Tiles {
        tile: if small(g.outer) { 32 } else { 64 },
    }
}

impl Kernels {
    /// `C[z] = alpha A[z] B[z] (+ C[z])` over a batch of `outer x inner` strided views, in
    /// [`gemm_form`]'s form (`per_image`: planned for one image).
    pub fn gemm(&self, st: &CudaStream, g: &Gemm, per_image: bool) -> Result<()> {
        self.gemm_as(st, g, gemm_form(g, self.sms, &self.launch, per_image))
    }

    /// [`gemm`](Self::gemm) in `form`.
    pub(crate) fn gemm_as(&self, st: &CudaStream, g: &Gemm, form: GemmForm) -> Result<()> {
        let fits = match form {
            GemmForm::Tiles { tile } => tile == 64 || tile == 32 && !g.tf32,
            GemmForm::WarpK => !g.tf32,
        };
        if !fits {
            return Err(Error::Cuda(format!(
                "internal: no batched-product kernel {form:?} (tf32 {})",
                g.tf32
            )));
        }
        let Some(args) = gemm_args(g)? else {
            return Ok(());
        };
        // A block's outputs: (rows, columns).
        let (tm, tn) = match form {
            GemmForm::Tiles { tile } => (tile, tile),
            GemmForm::WarpK => (16, 32),
        };
        let f = match form {
            _ if g.tf32 => &self.gemm_batched_tf32,
            GemmForm::WarpK => &self.gemm_batched_wk,
            GemmForm::Tiles { tile: 32 } => &self.gemm_batched_32,
            GemmForm::Tiles { .. } => &self.gemm_batched,
        };
        let (rows, cols) = (g.m.div_ceil(tm), g.n.div_ceil(tn));
        let batch = g.outer * g.inner;
        if batch > 65535 || rows > 65535 {
            return Err(Error::Cuda(format!(
                "batched product too large for one launch: batch {batch}, {rows} row tiles"
            )));
        }
        let grid = (
            i32_of(cols, "column tiles")? as u32,
            rows as u32,
            batch as u32,
        );
        let mut b = st.launch_builder(f);
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
    /// `qkv` and `y`'s layouts are [`attention_forward`](crate::cuda::unet::attention_forward)'s;
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
        let batch = grid_dim(n * heads, "fused attention (image, head) pairs")?;
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
            batch,
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
            let mut b = st.launch_builder(&flash[i]);
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

    /// Attention in rows (kernels/attention.cu, `attention_rows_split` then
    /// `attention_rows_combine`): `y = softmax(q kᵀ / √d) v` over `qkv` and `y` in
    /// [`attention_forward`](crate::cuda::unet::attention_forward)'s layouts, with `scratch`
    /// holding [`rows_scratch_len`] floats per (image, head); with `p`, P as the unfused
    /// forward leaves it (`[n, heads, L, L]`) for the backward pass; with `y16`, `y` in 16 bits
    /// there too, as [`Kernels::convert_half`] would write it. `head_dim` must satisfy
    /// [`rows_fits`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rows(
        &self,
        st: &CudaStream,
        n: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        qkv: DPtr,
        scratch: DPtr,
        p: Option<DPtr>,
        y: DPtr,
        y16: Option<(DPtr, Precision)>,
    ) -> Result<()> {
        let [split, combine, ..] = self.rows_kernels(head_dim)?;
        need(qkv, "q/k/v")?;
        need(scratch, "attention split scratch")?;
        need(y, "attention output")?;
        if let Some(p) = p {
            need(p, "attention probabilities")?;
        }
        let (y16, half_kind) = half_output(y16, "attention output in 16 bits")?;
        // 8-byte stores of four 16-bit outputs.
        if y16 % 8 != 0 {
            return Err(Error::Cuda(
                "internal: attention in rows with a 16-bit output not 8-byte aligned".into(),
            ));
        }
        // 16-byte copies of q/k/v rows, float4 reads of the splits' outputs and stores of y.
        if [qkv, scratch, y].into_iter().any(|p| p % 16 != 0) {
            return Err(Error::Cuda(
                "internal: attention in rows on buffers not 16-byte aligned".into(),
            ));
        }
        if n * heads * tokens == 0 {
            return Ok(());
        }
        let g = RowsGrid::new(n, tokens, heads, head_dim)?;
        let (batch, splits) = (n * heads, tokens.div_ceil(ROWS_KEYS));
        i32_of(splits * tokens, "attention splits x tokens")?;
        let part_len = batch * splits * tokens * head_dim;
        let args = RowsArgs {
            qkv,
            part: scratch,
            ml: at(scratch, part_len),
            p: p.unwrap_or(0),
            y,
            y16,
            tokens: i32_of(tokens, "tokens")?,
            heads: i32_of(heads, "heads")?,
            head_dim: i32_of(head_dim, "head width")?,
            splits: i32_of(splits, "attention splits")?,
            scale: 1.0 / (head_dim as f32).sqrt(),
            half_kind,
        };
        let launches = [
            (
                split,
                (g.tiles, g.splits, g.pairs),
                256,
                rows_smem(head_dim),
            ),
            (combine, (tokens as u32, g.pairs, 1), 128, 0),
        ];
        for (f, grid, threads, smem) in launches {
            let mut b = st.launch_builder(f);
            b.arg(&args);
            let mut launch = cfg(grid, (threads, 1, 1));
            launch.shared_mem_bytes = smem;
            // SAFETY: qkv and y hold n * tokens rows of their widths, scratch
            // rows_scratch_len floats per (image, head) and p n * heads * tokens² (the
            // caller's contract); the grids cover exactly the query tiles, splits and queries
            // the kernels index.
            cu(
                unsafe { b.launch(launch) }.map(drop),
                "launching attention in rows",
            )?;
        }
        Ok(())
    }

    /// The backward pass of [`attention_rows`](Self::attention_rows) (`attention_rows_ds`
    /// then `attention_rows_grads`): `dqkv (+)=` the gradient of `y` with respect to `qkv`,
    /// given the forward's P (`p`), its output `o` and the output's gradient `dout`, with `ds`
    /// as `[n, heads, L, L]` scratch; with `dqkv16`, `dqkv` in 16 bits there too, as
    /// [`Kernels::convert_half`] would write it. Layouts and `head_dim` as for the forward.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rows_backward(
        &self,
        st: &CudaStream,
        n: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        qkv: DPtr,
        [p, o, dout]: [DPtr; 3],
        ds: DPtr,
        dqkv: DPtr,
        dqkv16: Option<(DPtr, Precision)>,
        accumulate: bool,
    ) -> Result<()> {
        let [_, _, score_grads, grads] = self.rows_kernels(head_dim)?;
        for (ptr, what) in [
            (qkv, "q/k/v"),
            (p, "attention probabilities"),
            (o, "attention output"),
            (dout, "attention output gradient"),
            (ds, "attention score gradient"),
            (dqkv, "q/k/v gradient"),
        ] {
            need(ptr, what)?;
        }
        let (dqkv16, half_kind) = half_output(dqkv16, "q/k/v gradient in 16 bits")?;
        // 16-byte copies of q/k/v, O and dO rows; float2 stores of dqkv, 4-byte ones of its
        // 16-bit copy.
        if [qkv, o, dout, dqkv].into_iter().any(|p| p % 16 != 0) || dqkv16 % 4 != 0 {
            return Err(Error::Cuda(
                "internal: attention in rows on buffers not 16-byte aligned".into(),
            ));
        }
        if n * heads * tokens == 0 {
            return Ok(());
        }
        let g = RowsGrid::new(n, tokens, heads, head_dim)?;
        i32_of(tokens * tokens, "attention scores")?;
        let args = RowsBwdArgs {
            qkv,
            o,
            dout,
            p,
            ds,
            dqkv,
            dqkv16,
            tokens: i32_of(tokens, "tokens")?,
            heads: i32_of(heads, "heads")?,
            head_dim: i32_of(head_dim, "head width")?,
            accumulate: accumulate as i32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            half_kind,
        };
        let launches = [
            (
                score_grads,
                (g.tiles, g.splits, g.pairs),
                rows_ds_smem(head_dim),
            ),
            (
                grads,
                (
                    g.tiles,
                    3 * head_dim.div_ceil(ROWS_GRADS_COLS) as u32,
                    g.pairs,
                ),
                ROWS_GRADS_SMEM,
            ),
        ];
        for (f, grid, smem) in launches {
            let mut b = st.launch_builder(f);
            b.arg(&args);
            let mut launch = cfg(grid, (256, 1, 1));
            launch.shared_mem_bytes = smem;
            // SAFETY: qkv and dqkv hold n * tokens rows of 3 * heads * head_dim floats, o and
            // dout of heads * head_dim, p and ds n * heads * tokens² (the caller's contract);
            // the grids cover exactly the tiles the kernels index.
            cu(
                unsafe { b.launch(launch) }.map(drop),
                "launching attention in rows (backward)",
            )?;
        }
        Ok(())
    }

    /// The four rows kernels, for heads of `head_dim`: an internal error where they do not
    /// take them ([`rows_fits`]) or this device does not run them.
    fn rows_kernels(&self, head_dim: usize) -> Result<&[CudaFunction; 4]> {
        if !rows_fits(head_dim) {
            return Err(Error::Cuda(format!(
                "internal: attention in rows needs heads of a multiple of 16 channels up to \
                 {ROWS_MAX_D}, not {head_dim}"
            )));
        }
        self.attention_rows.as_ref().ok_or_else(|| {
            Error::Cuda(format!(
                "internal: attention in rows planned on a device that gives a block less than \
                 {} bytes of shared memory",
                rows_smem(ROWS_MAX_D)
            ))
        })
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
        let mut b = st.launch_builder(&self.softmax_forward);
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
        let mut b = st.launch_builder(&self.softmax_backward);
        b.arg(&p).arg(&ds).arg(&r).arg(&l).arg(&scale);
        // SAFETY: p and ds hold rows * len floats.
        cu(
            unsafe { b.launch(self.warps(rows)) }.map(drop),
            "launching softmax_backward",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// celebahq's attention products (256 tokens, one head of 512) on 132 multiprocessors:
    /// planned for the batch, the warp-split kernel (which rounds otherwise) gives way to the
    /// 64-wide tiles once the batch fills the device; planned per image, it never does, so an
    /// image's sums do not depend on the batch.
    #[test]
    fn per_image_plans_keep_one_images_product_kernel_at_any_batch() {
        let launch = LaunchSwitches {
            small_tiles: true,
            gemm_warp_k: true,
            ..LaunchSwitches::default()
        };
        // The form of an m x n product (K 512) over `outer` images.
        let form = |(m, n), outer, launch: &LaunchSwitches, per_image| {
            let g = Gemm {
                m,
                n,
                k: 512,
                outer,
                inner: 1,
                ..Gemm::default()
            };
            gemm_form(&g, 132, launch, per_image)
        };
        // S = q kᵀ (16 tiles of 64 x 64 an image) and P v (32).
        for mn in [(256, 256), (256, 512)] {
            assert_eq!(form(mn, 1, &launch, false), GemmForm::WarpK);
            assert_eq!(form(mn, 32, &launch, false), GemmForm::Tiles { tile: 64 });
            for outer in [1, 4, 9, 32] {
                let got = form(mn, outer, &launch, true);
                assert_eq!(got, GemmForm::WarpK, "{mn:?}, batch {outer}");
            }
        }
        // Without the warp-split kernel: 32- or 64-wide tiles, the same sums either way.
        let tiles = LaunchSwitches {
            gemm_warp_k: false,
            ..launch
        };
        let scores = (256, 256);
        assert_eq!(form(scores, 1, &tiles, true), GemmForm::Tiles { tile: 32 });
        assert_eq!(form(scores, 32, &tiles, true), GemmForm::Tiles { tile: 64 });
    }
}
