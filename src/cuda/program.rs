//! Lowers the graph, at one (batch, height, width), into the list of launches the executor runs:
//! the forward pass, and in recording mode the backward pass after it, over numbered virtual
//! buffers. Kernel choices that size memory (split-K, GroupNorm chunks) are made here, so that
//! the memory plan ([`super::plan`]) sees every workspace.
//!
//! After the forward pass is lowered, the few-row linear layers that read the same input (every
//! resnet's projection of the time embedding) are merged into one launch
//! ([`Step::LinearBatch`]): each alone is a launch of a few hundred warps whose cost is the
//! launch itself.
//!
//! The structure mirrors the CPU executor (`crate::cpu::unet`): the same ops in the same order,
//! the same gradient accumulation in reverse (the first contribution to a gradient overwrites,
//! later ones add), and only what a backward op reads is kept from the forward pass. Lifetimes
//! are not tracked here: each buffer lives from the first to the last step that names it, which
//! [`Program::lifetimes`] reads off the list.

use super::kernels::{
    flash_fits, gn_partial_fits, on_tile, plan_conv_at, plan_norm, plan_wgmma,
    plan_wgmma_clustered, plan_wgmma_six, Capabilities, ConvKernel, ConvLaunch, ConvShape,
    NormInput, NormSplit, WgmmaTile, GN_CLUSTER_MAX, LINEAR_BATCH_MAX, LINEAR_ITEM_WORDS,
    MAX_CLUSTER_SPLITS,
};
use super::precision::Precision;
use super::unet::AttnKernel;
use crate::model::graph::{Graph, Op, Pad, ParamKind, Space, Tid};
use crate::{switches, Error, Result};

/// Which kernels a program's steps run. The tensor-core pipeline choices compute the same
/// results bit for bit; wgmma sums the same products in another order, and the one-pass
/// GroupNorm adds its f64 sums in another order. The choices are there to be compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelConfig {
    /// The deep pipelines, and in bf16/fp16 16-bit intermediates
    /// ([`Program::build_with`]), rather than the two-stage kernels with fp32 intermediates.
    pub deep: bool,
    /// With `deep`: launches with 16-bit inputs on Hopper's wgmma kernel (only where the
    /// device has it, compute capability 9.0).
    pub wgmma: bool,
    /// GroupNorms whose groups are small enough
    /// ([`one_pass_shape`](super::kernels::one_pass_shape)) in one launch (`gn_one_pass`,
    /// `gn_bwd_one_pass` in kernels/norm.cu) instead of three.
    pub gn_one_pass: bool,
    /// With `gn_one_pass`: groups up to eight times larger (the 64x64 and 128x128 levels) in one
    /// launch too, as clusters of 2-8 blocks a group ([`GN_CLUSTER_MAX`]; compute capability
    /// 9.0 only).
    pub gn_clusters: bool,
    /// In bf16/fp16 with `deep`: concatenations also write a 16-bit copy for the tensor-core
    /// convolutions that read them (the residual blocks' 1x1 shortcuts), which then take the
    /// 16-bit input path (wgmma on Hopper) instead of staging the fp32 values; the copy is
    /// rounded as staging would round, so only wgmma's order of summation changes.
    pub half_concat: bool,
    /// wgmma launches split 2 to 8 ways reduce within a thread-block cluster
    /// ([`ConvLaunch::cluster`]): one launch and no workspace, the same sums.
    pub cluster_split_k: bool,
    /// With `cluster_split_k`: plain-tile wgmma launches are split for clusters
    /// ([`plan_wgmma_clustered`]: at most 8 ways, a cheaper reduction in the cost), so that
    /// the ones planned more than 8 ways (batch 1's 32x32 to 8x8 levels) reduce in clusters too.
    pub cluster_plan: bool,
    /// In bf16/fp16 with `deep`: a tensor-core launch whose main input is stored in fp32 and
    /// holds at least [`HALF_COPY_MIN`] values (the stride-2 downsampling convolutions, the
    /// input gradients of the convolutions that end a residual block) first converts it to
    /// 16 bits in a launch of its own, shared by every such reader, and then takes the
    /// 16-bit input path (wgmma on Hopper) instead of staging the fp32 values. The copy
    /// rounds as staging would, so only wgmma's order of summation changes.
    pub half_copy: bool,
    /// In the backward pass, a residual's gradient that would start as a copy of the block
    /// output's gradient (its first contribution) is that buffer itself, which later
    /// contributions then add onto: no copy launch, the same sums.
    pub alias_residual_grads: bool,
    /// Deep tensor-core launches (mma.sync and wgmma) finish their rows with the loads of
    /// four output pairs issued before their stores ([`ConvLaunch::row_epilogue`]): the same
    /// arithmetic.
    pub row_epilogue: bool,
    /// Tensor-core convolutions ask L2 for each block's weights before waiting for the launch
    /// before them ([`ConvLaunch::prefetch_weights`]): under `INVDIFF_PDL` while that launch
    /// still runs, and otherwise all at once rather than a pipeline slice ahead.
    pub prefetch_weights: bool,
    /// Below fp32 (the convolutions in bf16, fp16 or tf32): the attention products on the
    /// tf32 tensor cores ([`Gemm::tf32`](super::kernels::Gemm)) instead of fp32 FMAs; the
    /// softmax stays fp32.
    pub attention_tf32: bool,
    /// Below fp32: attentions whose heads are whole 64-column chunks
    /// ([`flash_fits`]) run fused ([`AttnKernel::Flash`], tf32
    /// tensor cores, no P in memory; three launches per forward and backward pair instead of
    /// eight). Ahead of `attention_tf32` where both apply.
    pub attention_flash: bool,
    /// Unsplit wgmma launches with at least a wave of them take 256-row tiles
    /// ([`WgmmaTile::Tall`]): the same sums in the same order.
    pub tall_tiles: bool,
    /// wgmma launches that can run one block per multiprocessor are split for it and take the
    /// six-stage tile ([`WgmmaTile::SixStages`]): the same sums as that split on the plain
    /// tile.
    pub six_stages: bool,
    /// The wgmma launches of 3x3 stride-1 convolutions and their input gradients whose rows
    /// tile without leaving an image row ([`halo_fits`](super::kernels::halo_fits)) take the
    /// halo tile ([`WgmmaTile::Halo`]; K split by channel slices), ahead of the tall one; with
    /// `tall_tiles` too, the unsplit ones that fill the machine with 256-row tiles take
    /// [`WgmmaTile::TallHalo`]. The same products, summed channel slices outer.
    pub halo_tiles: bool,
    /// With `halo_tiles`: a GroupNorm whose 16-bit output only a halo-tile convolution reads
    /// writes no output; the convolution applies its scale and shift (and SiLU) to the fp32
    /// input as it loads it ([`NormInput`]): the same 16-bit values, one pass over the
    /// activations fewer.
    pub halo_norm: bool,
    /// With `halo_tiles`: an unsplit halo-tile convolution whose output a GroupNorm reads
    /// writes that GroupNorm's partial sums in its epilogue
    /// ([`ConvPtrs::gn_partial`](super::kernels::ConvPtrs)), and the GroupNorm skips its own
    /// pass over the output. The same sums in another order.
    pub halo_stats: bool,
    /// Every choice that changes the order of a sum (the split of K, GroupNorm's chunks) made
    /// from one image's shape, so that an image's results are bit for bit the same in any
    /// batch; otherwise they are made for the whole batch, which fills the device better.
    pub batch_invariant: bool,
}

impl Default for KernelConfig {
    /// Deep pipelines, mma.sync, three-launch GroupNorms.
    fn default() -> Self {
        KernelConfig {
            deep: true,
            wgmma: false,
            gn_one_pass: false,
            gn_clusters: false,
            half_concat: false,
            cluster_split_k: false,
            cluster_plan: false,
            half_copy: false,
            alias_residual_grads: false,
            row_epilogue: false,
            prefetch_weights: false,
            attention_tf32: false,
            attention_flash: false,
            tall_tiles: false,
            six_stages: false,
            halo_tiles: false,
            halo_norm: false,
            halo_stats: false,
            batch_invariant: false,
        }
    }
}

impl KernelConfig {
    /// The choices the `INVDIFF_*` switches ask for (src/switches.rs), each kernel that not
    /// every device runs only where this one does (`here`).
    pub fn from_switches(here: Capabilities) -> Self {
        let on = |name| switches::is(name, "1");
        let gn_clusters = here.gn_clusters && on("INVDIFF_GN_CLUSTER");
        KernelConfig {
            deep: !switches::is("INVDIFF_TC_PIPELINE", "two"),
            wgmma: here.wgmma && !switches::is("INVDIFF_WGMMA", "0"),
            // Clustered GroupNorms extend the one-pass ones, so they bring them along.
            gn_one_pass: on("INVDIFF_GN_ONE_PASS") || gn_clusters,
            gn_clusters,
            half_concat: on("INVDIFF_HALF_CONCAT"),
            cluster_split_k: on("INVDIFF_CLUSTER_SPLITK")
                || switches::is("INVDIFF_CLUSTER_SPLITK", "plan"),
            cluster_plan: switches::is("INVDIFF_CLUSTER_SPLITK", "plan"),
            half_copy: on("INVDIFF_HALF_COPY"),
            alias_residual_grads: on("INVDIFF_ALIAS_GRADS"),
            row_epilogue: on("INVDIFF_ROW_EPILOGUE"),
            prefetch_weights: on("INVDIFF_PREFETCH_WEIGHTS"),
            attention_tf32: on("INVDIFF_ATTN_TF32"),
            attention_flash: here.flash && on("INVDIFF_ATTN_FLASH"),
            tall_tiles: on("INVDIFF_WGMMA_TALL"),
            six_stages: on("INVDIFF_WGMMA_SIX_STAGES"),
            // The GroupNorms' work goes into the halo tiles, so they bring the tiles along.
            halo_tiles: on("INVDIFF_WGMMA_HALO")
                || on("INVDIFF_HALO_NORM")
                || on("INVDIFF_HALO_STATS"),
            halo_norm: on("INVDIFF_HALO_NORM"),
            halo_stats: on("INVDIFF_HALO_STATS"),
            batch_invariant: false,
        }
    }

    /// The choices that differ from the plain mma.sync program, in words, for reports (the
    /// switches change the speed, and some the order of sums).
    pub fn describe(&self) -> Vec<&'static str> {
        [
            (!self.deep, "two-stage pipelines"),
            (self.wgmma, "wgmma"),
            (self.gn_one_pass, "one-pass GroupNorm"),
            (self.gn_clusters, "clustered one-pass GroupNorm"),
            (self.half_concat, "16-bit concatenation copies"),
            (self.cluster_split_k, "cluster split-K"),
            (self.cluster_plan, "splits planned for clusters"),
            (self.half_copy, "16-bit input copies"),
            (self.alias_residual_grads, "aliased residual gradients"),
            (self.row_epilogue, "row epilogue"),
            (self.prefetch_weights, "weight prefetch"),
            (self.attention_tf32, "tf32 attention"),
            (self.attention_flash, "fused attention"),
            (self.tall_tiles, "tall wgmma tiles"),
            (self.six_stages, "six-stage wgmma tiles"),
            (self.halo_tiles, "halo wgmma tiles"),
            (self.halo_norm, "GroupNorm in halo loads"),
            (self.halo_stats, "GroupNorm sums in halo epilogues"),
            (self.batch_invariant, "per-image plans"),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect()
    }
}

/// Fewest values of an fp32 input that [`KernelConfig::half_copy`] converts: at batch 1, the
/// 64x64 x 256 level and above. In the v0.4 profile (H200, bf16, batch 1) the 16-bit path
/// ran 12-60 us faster per launch there, against a conversion estimated at 3-16 us (its bytes
/// at the card's bandwidth, plus a launch); below, the gain was under the estimate.
pub(crate) const HALF_COPY_MIN: usize = 1 << 20;

/// A virtual buffer of the program; the plan gives it an arena offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Buf(pub usize);

/// Which device array of a parameter group a launch reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WKind {
    /// Convolution weights `[(tap, ci), co]`.
    ConvForward,
    /// Convolution weights `[(tap, co), ci]`, for the input gradient.
    ConvBackward,
    /// Linear weights `[inp, out]` (Wᵀ), for the forward product.
    LinearT,
    /// Linear weights `[out, inp]` (PyTorch's layout).
    Linear,
    /// Bias of a convolution or linear layer.
    Bias,
    /// GroupNorm scale.
    Gamma,
    /// GroupNorm shift.
    Beta,
}

/// A parameter array: group `pid` of the graph, array `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct W {
    pub pid: usize,
    pub kind: WKind,
}

impl W {
    /// The same product's weights K-major, as the wgmma kernel reads them: a convolution's
    /// forward layout `[(tap, ci), co]` transposed per tap is its input-gradient layout and
    /// vice versa, and a linear layer's `[inp, out]` transposed is PyTorch's `[out, inp]`.
    pub fn k_major(self) -> W {
        let kind = match self.kind {
            WKind::ConvForward => WKind::ConvBackward,
            WKind::ConvBackward => WKind::ConvForward,
            WKind::LinearT => WKind::Linear,
            WKind::Linear => WKind::LinearT,
            other => other,
        };
        W { kind, ..self }
    }
}

/// One launch (or a short fixed sequence, e.g. GroupNorm's three) of the program.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    ToNhwc {
        src: Buf,
        dst: Buf,
        c: usize,
        mul: f32,
        add: f32,
    },
    ToNchw {
        src: Buf,
        dst: Buf,
        c: usize,
        mul: f32,
    },
    TimeEmbedding {
        t: Buf,
        y: Buf,
        dim: usize,
        flip: bool,
        shift: f32,
    },
    LinearRows {
        x: Buf,
        y: Buf,
        w: W,
        b: W,
        inp: usize,
        out: usize,
        silu_in: bool,
        residual: Option<Buf>,
        out_div: f32,
    },
    /// Several [`LinearRows`](Step::LinearRows) without residual that read the same `x`, in
    /// one launch (kernels/linear.cu `linear_batch`). `table` holds the layers' device addresses
    /// for the kernel: written when the plan is made, so it lives over the whole program (see
    /// [`Program::lifetimes`]).
    LinearBatch {
        x: Buf,
        inp: usize,
        silu_in: bool,
        out_div: f32,
        layers: Vec<BatchedLinear>,
        table: Buf,
    },
    Conv(ConvStep),
    GroupNorm {
        x: Buf,
        /// None where a halo convolution applies the GroupNorm as it loads `x`
        /// ([`ConvLaunch::norm_input`]): statistics and affine only.
        y: Option<Buf>,
        gamma: W,
        beta: W,
        hw: usize,
        c: usize,
        groups: usize,
        split: NormSplit,
        eps: f32,
        silu: bool,
        partial: Buf,
        stats: Buf,
        affine: Buf,
        /// `y` holds 16-bit values in this precision (it only feeds tensor-core convolutions).
        half_out: Option<Precision>,
    },
    GroupNormBackward {
        x: Buf,
        dy: Buf,
        dx: Buf,
        gamma: W,
        beta: W,
        hw: usize,
        c: usize,
        groups: usize,
        split: NormSplit,
        silu: bool,
        stats: Buf,
        partial: Buf,
        means: Buf,
        accumulate: bool,
        /// `dx` holds 16-bit values in this precision (only a tensor-core input gradient reads
        /// it; never accumulating).
        half_out: Option<Precision>,
    },
    Attention {
        qkv: Buf,
        y: Buf,
        /// What the backward pass reads ([`AttnKernel::saved_len`]).
        saved: Buf,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        kernel: AttnKernel,
    },
    AttentionBackward {
        qkv: Buf,
        saved: Buf,
        /// The forward's output, which the fused kernels read.
        y: Option<Buf>,
        dy: Buf,
        dqkv: Buf,
        scratch: Buf,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        accumulate: bool,
        kernel: AttnKernel,
    },
    Upsample {
        x: Buf,
        y: Buf,
        h: usize,
        w: usize,
        c: usize,
        /// As for GroupNorm: `y` holds 16-bit values for tensor-core convolutions.
        half_out: Option<Precision>,
    },
    UpsampleBackward {
        dy: Buf,
        dx: Buf,
        h: usize,
        w: usize,
        c: usize,
        accumulate: bool,
    },
    Concat {
        a: Buf,
        b: Buf,
        y: Buf,
        /// A 16-bit copy of `y` in this precision, for the tensor-core convolutions that read
        /// `y` ([`KernelConfig::half_concat`]).
        y16: Option<(Buf, Precision)>,
        pixels: usize,
        ca: usize,
        cb: usize,
    },
    ConcatBackward {
        dy: Buf,
        d: Buf,
        pixels: usize,
        c: usize,
        offset: usize,
        width: usize,
        accumulate: bool,
    },
    AddInto {
        dst: Buf,
        src: Buf,
        len: usize,
        accumulate: bool,
    },
    Divide {
        x: Buf,
        len: usize,
        div: f32,
    },
    /// `y` = the `len` fp32 values of `x` as 16-bit values in `precision`, two per f32 slot
    /// ([`KernelConfig::half_copy`]).
    ToHalf {
        x: Buf,
        y: Buf,
        len: usize,
        precision: Precision,
    },
}

/// One layer of a [`Step::LinearBatch`]: `y = (f(x) Wᵀ + b) / out_div`, `out` wide.
#[derive(Clone, Debug)]
pub(crate) struct BatchedLinear {
    pub y: Buf,
    pub w: W,
    pub b: W,
    pub out: usize,
}

/// One implicit-GEMM launch: convolution, its input gradient, or a token-wise linear layer.
#[derive(Clone, Debug)]
pub(crate) struct ConvStep {
    pub shape: ConvShape,
    pub launch: ConvLaunch,
    pub x: Buf,
    pub w: W,
    pub y: Buf,
    pub bias: Option<W>,
    pub temb: Option<Buf>,
    pub residual: Option<Buf>,
    pub workspace: Option<Buf>,
    pub out_div: f32,
    pub accumulate: bool,
    /// With [`ConvLaunch::norm_input`]: the scale and shift of the GroupNorm whose fp32 input
    /// `x` is (the GroupNorm then writes no output).
    pub norm: Option<Buf>,
    /// Where the epilogue also writes the partial sums of the GroupNorm that reads `y`
    /// ([`KernelConfig::halo_stats`]).
    pub gn_partial: Option<Buf>,
}

impl Step {
    /// The buffers the step reads and those it writes (a buffer it accumulates into is both).
    pub fn io(&self) -> (Vec<Buf>, Vec<Buf>) {
        use Step::*;
        let acc = |b: Buf, a: bool| a.then_some(b);
        match self {
            ToNhwc { src, dst, .. } | ToNchw { src, dst, .. } => (vec![*src], vec![*dst]),
            TimeEmbedding { t, y, .. } => (vec![*t], vec![*y]),
            LinearRows { x, y, residual, .. } => {
                (std::iter::once(*x).chain(*residual).collect(), vec![*y])
            }
            LinearBatch {
                x, layers, table, ..
            } => (vec![*x, *table], layers.iter().map(|l| l.y).collect()),
            Conv(c) => (
                [c.x]
                    .into_iter()
                    .chain(c.norm)
                    .chain(c.temb)
                    .chain(c.residual)
                    .chain(acc(c.y, c.accumulate))
                    .collect(),
                [c.y]
                    .into_iter()
                    .chain(c.workspace)
                    .chain(c.gn_partial)
                    .collect(),
            ),
            // Partial sums from the producing convolution are read, not written, and `x` only
            // where the GroupNorm writes an output.
            GroupNorm {
                x,
                y,
                split,
                partial,
                stats,
                affine,
                ..
            } if split.from_producer => (
                y.map(|_| *x).into_iter().chain([*partial]).collect(),
                y.iter().copied().chain([*stats, *affine]).collect(),
            ),
            // In one launch (`gn_one_pass`): no partial sums, and no affine for a convolution to
            // apply (norms_into_halo_loads leaves these GroupNorms alone).
            GroupNorm {
                x, y, split, stats, ..
            } if split.one_pass.is_some() => {
                (vec![*x], y.iter().copied().chain([*stats]).collect())
            }
            GroupNorm {
                x,
                y,
                partial,
                stats,
                affine,
                ..
            } => (
                vec![*x],
                y.iter()
                    .copied()
                    .chain([*partial, *stats, *affine])
                    .collect(),
            ),
            GroupNormBackward {
                x,
                dy,
                dx,
                stats,
                partial,
                means,
                accumulate,
                ..
            } => (
                [*x, *dy, *stats]
                    .into_iter()
                    .chain(acc(*dx, *accumulate))
                    .collect(),
                vec![*dx, *partial, *means],
            ),
            Attention { qkv, y, saved, .. } => (vec![*qkv], vec![*y, *saved]),
            AttentionBackward {
                qkv,
                saved,
                y,
                dy,
                dqkv,
                scratch,
                accumulate,
                ..
            } => (
                [*qkv, *saved, *dy]
                    .into_iter()
                    .chain(*y)
                    .chain(acc(*dqkv, *accumulate))
                    .collect(),
                vec![*dqkv, *scratch],
            ),
            Upsample { x, y, .. } => (vec![*x], vec![*y]),
            UpsampleBackward {
                dy, dx, accumulate, ..
            } => (
                std::iter::once(*dy).chain(acc(*dx, *accumulate)).collect(),
                vec![*dx],
            ),
            Concat { a, b, y, y16, .. } => (
                vec![*a, *b],
                std::iter::once(*y).chain(y16.map(|(b, _)| b)).collect(),
            ),
            ConcatBackward {
                dy, d, accumulate, ..
            } => (
                std::iter::once(*dy).chain(acc(*d, *accumulate)).collect(),
                vec![*d],
            ),
            AddInto {
                dst,
                src,
                accumulate,
                ..
            } => (
                std::iter::once(*src)
                    .chain(acc(*dst, *accumulate))
                    .collect(),
                vec![*dst],
            ),
            Divide { x, .. } => (vec![*x], vec![*x]),
            ToHalf { x, y, .. } => (vec![*x], vec![*y]),
        }
    }

    /// Every buffer the step reads or writes.
    pub fn buffers(&self) -> Vec<Buf> {
        let (mut r, w) = self.io();
        r.extend(w);
        r
    }

    /// The parameter arrays the step reads.
    pub fn weights(&self) -> Vec<W> {
        use Step::*;
        match self {
            LinearRows { w, b, .. } => vec![*w, *b],
            LinearBatch { layers, .. } => layers.iter().flat_map(|l| [l.w, l.b]).collect(),
            Conv(c) => std::iter::once(c.w).chain(c.bias).collect(),
            GroupNorm { gamma, beta, .. } | GroupNormBackward { gamma, beta, .. } => {
                vec![*gamma, *beta]
            }
            _ => vec![],
        }
    }
}

/// A virtual buffer: its length in f32 elements and, for messages and tests, what it holds.
#[derive(Clone, Debug)]
pub(crate) struct BufDesc {
    pub len: usize,
    pub what: String,
}

/// The lowered graph at one shape and mode.
#[derive(Clone, Debug)]
pub(crate) struct Program {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub steps: Vec<Step>,
    pub bufs: Vec<BufDesc>,
    /// Steps `0..forward_steps` are the forward pass; the rest, the backward pass.
    pub forward_steps: usize,
    /// The input sample, NCHW, written by the host before the forward pass.
    pub sample: Buf,
    /// Per-image timesteps `[n]`, written by the host before the forward pass.
    pub timesteps: Buf,
    /// The predicted noise, NCHW.
    pub output: Buf,
    /// Recording mode: the cotangent (NCHW) written before the backward pass, and the input
    /// gradient (NCHW) it produces.
    pub cotangent: Option<Buf>,
    pub grad_input: Option<Buf>,
}

/// Builds programs.
struct Lowering<'g> {
    g: &'g Graph,
    n: usize,
    h: usize,
    w: usize,
    sms: usize,
    precision: Precision,
    steps: Vec<Step>,
    bufs: Vec<BufDesc>,
    value: Vec<Option<Buf>>,
    grad: Vec<Option<Buf>>,
    /// Per op: its GroupNorm statistics or attention probabilities, for the backward pass.
    aux: Vec<Option<Buf>>,
    /// Per tensor: stored as 16-bit values in `precision` (see [`Program::build_with`]).
    half: Vec<bool>,
    /// Per tensor: its gradient stored as 16-bit values in `precision`.
    half_grad: Vec<bool>,
    /// 16-bit copies of buffers (a concatenation's own, [`KernelConfig::half_concat`], or a
    /// conversion, [`KernelConfig::half_copy`]): source, copy, and the step that wrote the
    /// copy. A copy serves while no later step has written its source.
    half_copies: Vec<(Buf, Buf, usize)>,
    /// Which kernels the steps run.
    choice: KernelConfig,
}

impl Program {
    /// Lowers `g` for a batch of `n` images of `h x w`, the backward pass too when `record`.
    /// `sms` (the device's multiprocessor count) steers split-K and GroupNorm chunking;
    /// `precision` picks the convolution kernels. In bf16 and fp16, values and gradients that
    /// only feed tensor-core convolutions are stored in that precision
    /// ([`build_with`](Self::build_with)).
    pub fn build(
        g: &Graph,
        n: usize,
        h: usize,
        w: usize,
        record: bool,
        sms: usize,
        precision: Precision,
    ) -> Result<Program> {
        Self::build_with(g, n, h, w, record, sms, precision, KernelConfig::default())
    }

    /// [`build`](Self::build), choosing the kernels ([`KernelConfig`]): among them the deep
    /// tensor-core pipelines (the default) or the two-stage ones (kernels/conv_tc.cu), which
    /// compute the same, and wgmma where asked. With deep pipelines in bf16 and fp16, GroupNorm and
    /// upsampling outputs are stored in 16 bits when every reader is a convolution (or
    /// token-wise linear layer) on the tensor-core kernel taking it as its main input: those
    /// kernels round their input to that precision anyway, so storing it rounded
    /// halves the traffic and changes no result; the backward pass never reads these values
    /// (GroupNorm's backward reads its input, the convolutions' input gradients none). Likewise
    /// in the backward pass for the gradient a GroupNorm passes to the convolution before it,
    /// when that is its only contribution and the convolution's input gradient its only reader.
    #[allow(clippy::too_many_arguments)]
    pub fn build_with(
        g: &Graph,
        n: usize,
        h: usize,
        w: usize,
        record: bool,
        sms: usize,
        precision: Precision,
        choice: KernelConfig,
    ) -> Result<Program> {
        g.config.check_input_size(h, w)?;
        if n == 0 {
            return Err(Error::input("batch of 0 images"));
        }
        let mut l = Lowering {
            g,
            n,
            h,
            w,
            sms,
            precision,
            steps: Vec::new(),
            bufs: Vec::new(),
            value: vec![None; g.tensors.len()],
            grad: vec![None; g.tensors.len()],
            aux: vec![None; g.ops.len()],
            half: vec![false; g.tensors.len()],
            half_grad: vec![false; g.tensors.len()],
            half_copies: Vec::new(),
            choice,
        };
        if choice.deep && matches!(precision, Precision::Bf16 | Precision::Fp16) {
            l.half = l.half_tensors()?;
            l.half_grad = l.half_gradients();
        }
        let cfg = &g.config;
        let sample = l.buf(n * cfg.in_channels * h * w, "input sample (NCHW)");
        let timesteps = l.buf(n, "timesteps");
        let x = l.new_value(g.input);
        let (mul, add) = if cfg.center_input_sample {
            (2.0, -1.0)
        } else {
            (1.0, 0.0)
        };
        l.steps.push(Step::ToNhwc {
            src: sample,
            dst: x,
            c: cfg.in_channels,
            mul,
            add,
        });
        for (i, op) in g.ops.iter().enumerate() {
            l.forward_op(i, op, timesteps, record)?;
        }
        let output = l.buf(n * cfg.out_channels * h * w, "output (NCHW)");
        let out_val = l.val(g.output)?;
        l.steps.push(Step::ToNchw {
            src: out_val,
            dst: output,
            c: cfg.out_channels,
            mul: 1.0,
        });
        l.batch_linears();
        let forward_steps = l.steps.len();

        let (mut cotangent, mut grad_input) = (None, None);
        if record {
            let cot = l.buf(n * cfg.out_channels * h * w, "cotangent (NCHW)");
            let gy = l.new_grad(g.output);
            l.steps.push(Step::ToNhwc {
                src: cot,
                dst: gy,
                c: cfg.out_channels,
                mul: 1.0,
                add: 0.0,
            });
            for (i, op) in g.ops.iter().enumerate().rev() {
                let y = op.output();
                if !g.tensors[y].on_input_path {
                    continue;
                }
                let Some(dy) = l.grad[y] else { continue };
                l.backward_op(i, op, dy)?;
            }
            let gx = l.grad[g.input]
                .ok_or_else(|| Error::input("the output does not depend on the input sample"))?;
            let out = l.buf(n * cfg.in_channels * h * w, "input gradient (NCHW)");
            let mul = if cfg.center_input_sample { 2.0 } else { 1.0 };
            l.steps.push(Step::ToNchw {
                src: gx,
                dst: out,
                c: cfg.in_channels,
                mul,
            });
            cotangent = Some(cot);
            grad_input = Some(out);
        }
        if choice.halo_stats {
            l.norm_sums_from_halo_epilogues();
        }
        if choice.halo_norm {
            l.norms_into_halo_loads();
        }
        Ok(Program {
            n,
            h,
            w,
            steps: l.steps,
            bufs: l.bufs,
            forward_steps,
            sample,
            timesteps,
            output,
            cotangent,
            grad_input,
        })
    }

    /// Per buffer, the first and last step that name it. The host-visible slots are pinned to
    /// the end of the program so that a graph can be replayed without rewriting its input and
    /// the result stays readable after the pass that wrote it; the batched linear layers'
    /// tables, written once when the plan is made, over the whole program.
    pub fn lifetimes(&self) -> Vec<(usize, usize)> {
        let mut life = vec![(usize::MAX, 0usize); self.bufs.len()];
        for (i, s) in self.steps.iter().enumerate() {
            for b in s.buffers() {
                let l = &mut life[b.0];
                l.0 = l.0.min(i);
                l.1 = l.1.max(i);
            }
        }
        let end = self.steps.len().saturating_sub(1);
        for b in [
            Some(self.sample),
            Some(self.timesteps),
            Some(self.output),
            self.cotangent,
            self.grad_input,
        ]
        .into_iter()
        .flatten()
        {
            life[b.0].1 = end;
        }
        for s in &self.steps {
            if let Step::LinearBatch { table, .. } = s {
                life[table.0] = (0, end);
            }
        }
        for l in &mut life {
            if l.0 == usize::MAX {
                *l = (0, 0);
            }
        }
        life
    }

    /// f32 elements each buffer takes in the arena: its length, or none for a buffer no step
    /// names (a pass over the finished steps can leave one behind: the output of a GroupNorm
    /// that a halo convolution applies as it loads, [`KernelConfig::halo_norm`]).
    pub fn arena_lens(&self) -> Vec<usize> {
        let mut named = vec![false; self.bufs.len()];
        for s in &self.steps {
            for b in s.buffers() {
                named[b.0] = true;
            }
        }
        self.bufs
            .iter()
            .zip(named)
            .map(|(b, named)| if named { b.len } else { 0 })
            .collect()
    }

    /// Length of a host-visible slot, in f32 elements.
    pub fn len(&self, b: Buf) -> usize {
        self.bufs[b.0].len
    }
}

impl Lowering<'_> {
    /// [`KernelConfig::halo_norm`], on the finished step list: each GroupNorm (in three
    /// launches) whose 16-bit output only a halo-tile convolution reads hands that
    /// convolution its fp32 input and its scale and shift, and writes no output. The output's
    /// buffer, named by no step any more, takes no memory ([`Program::arena_lens`]).
    fn norms_into_halo_loads(&mut self) {
        let mut readers = vec![Vec::new(); self.bufs.len()];
        for (i, s) in self.steps.iter().enumerate() {
            for b in s.io().0 {
                readers[b.0].push(i);
            }
        }
        for i in 0..self.steps.len() {
            let Step::GroupNorm {
                x,
                y: Some(y),
                half_out: Some(_),
                split,
                silu,
                affine,
                ..
            } = self.steps[i]
            else {
                continue;
            };
            let [j] = readers[y.0][..] else { continue };
            // The convolution reads x and the affine where the GroupNorm ran: nothing between
            // may write them (none does in a forward pass, whose values are written once).
            let overwritten = self.steps[i + 1..j].iter().any(|s| {
                let writes = s.io().1;
                writes.contains(&x) || writes.contains(&affine)
            });
            let Step::Conv(c) = &mut self.steps[j] else {
                continue;
            };
            if split.one_pass.is_some() || c.x != y || !c.launch.tile.is_halo() || overwritten {
                continue;
            }
            c.x = x;
            c.norm = Some(affine);
            c.launch.norm_input = if silu {
                NormInput::AffineSilu
            } else {
                NormInput::Affine
            };
            if let Step::GroupNorm { y, .. } = &mut self.steps[i] {
                *y = None;
            }
        }
    }

    /// [`KernelConfig::halo_stats`], on the finished step list: each GroupNorm (in three
    /// launches) whose input was last written by an unsplit halo-tile convolution that can
    /// write its partial sums ([`gn_partial_fits`]) takes them from that convolution's
    /// epilogue, one chunk per tile, in a partial buffer of that size.
    fn norm_sums_from_halo_epilogues(&mut self) {
        // The step that last wrote each buffer, as the steps go by.
        let mut writer: Vec<Option<usize>> = vec![None; self.bufs.len()];
        for i in 0..self.steps.len() {
            if let Step::GroupNorm {
                x, hw, c, split, ..
            } = self.steps[i]
            {
                let producer = writer[x.0].filter(|_| split.one_pass.is_none());
                if let Some(Step::Conv(conv)) = producer.map(|j| &self.steps[j]) {
                    let rows = conv.launch.tile.rows();
                    if conv.y == x
                        && conv.gn_partial.is_none()
                        && gn_partial_fits(&conv.shape, &conv.launch)
                        && conv.shape.ncols == c
                        && conv.shape.mh * conv.shape.mw == hw
                    {
                        let from_conv = NormSplit {
                            chunks: hw / rows,
                            chunk_px: rows,
                            one_pass: None,
                            from_producer: true,
                        };
                        let len = from_conv.partial_len(self.n, c);
                        let partial = self.buf(len, "GroupNorm partial sums");
                        if let Some(Step::Conv(conv)) = producer.map(|j| &mut self.steps[j]) {
                            conv.gn_partial = Some(partial);
                        }
                        if let Step::GroupNorm {
                            split, partial: p, ..
                        } = &mut self.steps[i]
                        {
                            *split = from_conv;
                            *p = partial;
                        }
                    }
                }
            }
            // (The partial buffers made above are new.)
            writer.resize(self.bufs.len(), None);
            for b in self.steps[i].io().1 {
                writer[b.0] = Some(i);
            }
        }
    }

    /// How a GroupNorm over `hw` pixels of `c` channels runs (see [`KernelConfig`]).
    fn norm_split(&self, hw: usize, c: usize, groups: usize) -> NormSplit {
        let n = if self.choice.batch_invariant {
            1
        } else {
            self.n
        };
        let one_pass_blocks = match (self.choice.gn_one_pass, self.choice.gn_clusters) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => GN_CLUSTER_MAX,
        };
        plan_norm(n, hw, c, groups, self.sms, one_pass_blocks)
    }

    fn buf(&mut self, len: usize, what: &str) -> Buf {
        self.bufs.push(BufDesc {
            len: len.max(1),
            what: what.to_string(),
        });
        Buf(self.bufs.len() - 1)
    }

    fn numel(&self, t: Tid) -> usize {
        self.g.shape(t, self.n, self.h, self.w).iter().product()
    }

    /// (height, width) of tensor `t`; (1, 1) for per-image vectors.
    fn hw(&self, t: Tid) -> (usize, usize) {
        match self.g.tensors[t].space {
            Space::Vector => (1, 1),
            Space::Image { level } => (self.h >> level, self.w >> level),
        }
    }

    fn ch(&self, t: Tid) -> usize {
        self.g.tensors[t].channels
    }

    fn new_value(&mut self, t: Tid) -> Buf {
        let b = self.buf(self.numel(t), &self.g.tensors[t].name.clone());
        self.value[t] = Some(b);
        b
    }

    /// Merges the forward steps' few-row linear layers without residual that read the same `x`
    /// (with the same width, SiLU and divisor) into [`Step::LinearBatch`] launches of at most
    /// [`LINEAR_BATCH_MAX`] layers, each where the first of its layers was: in celebahq, the 32
    /// resnets' projections of the time embedding, ~12.5 us each as separate launches on an
    /// H200 (0.4 ms of a 5.5 ms batch-1 bf16 forward). A group closes at any step that writes its `x` (none does
    /// in the forward pass, whose values are written once; the check keeps the merge sound
    /// regardless). Their outputs are then written earlier than before, which only lengthens
    /// their lifetimes.
    fn batch_linears(&mut self) {
        type Key = (Buf, usize, bool, u32);
        let mut open: Vec<(Key, Vec<usize>)> = Vec::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            if let Step::LinearRows {
                x,
                inp,
                silu_in,
                residual: None,
                out_div,
                ..
            } = *s
            {
                let key = (x, inp, silu_in, out_div.to_bits());
                match open
                    .iter_mut()
                    .find(|(k, g)| *k == key && g.len() < LINEAR_BATCH_MAX)
                {
                    Some((_, g)) => g.push(i),
                    None => open.push((key, vec![i])),
                }
            }
            let (_, writes) = s.io();
            let (closed, still): (Vec<_>, Vec<_>) = open
                .into_iter()
                .partition(|((x, ..), _)| writes.contains(x));
            groups.extend(closed.into_iter().map(|(_, g)| g));
            open = still;
        }
        groups.extend(open.into_iter().map(|(_, g)| g));
        // Per step of a group: the merged step that replaces it (the group's first), or None
        // to drop it (the others).
        let mut replace: Vec<Option<Option<Step>>> = vec![None; self.steps.len()];
        for g in groups.into_iter().filter(|g| g.len() > 1) {
            let layers: Vec<BatchedLinear> = g
                .iter()
                .map(|&i| match self.steps[i] {
                    Step::LinearRows { y, w, b, out, .. } => BatchedLinear { y, w, b, out },
                    _ => unreachable!("groups hold LinearRows steps"),
                })
                .collect();
            let Step::LinearRows {
                x,
                inp,
                silu_in,
                out_div,
                ..
            } = self.steps[g[0]]
            else {
                unreachable!("groups hold LinearRows steps")
            };
            let table = self.buf(
                layers.len() * LINEAR_ITEM_WORDS,
                &format!("table of {} batched linear layers", layers.len()),
            );
            replace[g[0]] = Some(Some(Step::LinearBatch {
                x,
                inp,
                silu_in,
                out_div,
                layers,
                table,
            }));
            for &i in &g[1..] {
                replace[i] = Some(None);
            }
        }
        let steps = std::mem::take(&mut self.steps);
        self.steps = steps
            .into_iter()
            .zip(replace)
            .filter_map(|(s, r)| r.unwrap_or(Some(s)))
            .collect();
    }

    /// The buffer of a value that may be stored in 16 bits (GroupNorm and upsampling
    /// outputs), and that precision when it is.
    fn output_value(&mut self, t: Tid) -> (Buf, Option<Precision>) {
        if !self.half[t] {
            return (self.new_value(t), None);
        }
        // Two 16-bit values per f32 slot.
        let b = self.buf(
            self.numel(t).div_ceil(2),
            &format!("{} (16-bit)", self.g.tensors[t].name),
        );
        self.value[t] = Some(b);
        (b, Some(self.precision))
    }

    fn val(&self, t: Tid) -> Result<Buf> {
        self.value[t].ok_or_else(|| {
            Error::Cuda(format!(
                "internal: `{}` read before it is computed",
                self.g.tensors[t].name
            ))
        })
    }

    fn new_grad(&mut self, t: Tid) -> Buf {
        let b = self.buf(self.numel(t), &format!("d {}", self.g.tensors[t].name));
        self.grad[t] = Some(b);
        b
    }

    /// The gradient buffer of `t` and whether it already holds contributions to add onto.
    fn grad_slot(&mut self, t: Tid) -> (Buf, bool) {
        match self.grad[t] {
            Some(b) => (b, true),
            None => (self.new_grad(t), false),
        }
    }

    /// (input, output) widths of linear parameter group `p` (q/k/v fused: three outputs).
    fn linear_dims(&self, p: usize) -> Result<(usize, usize)> {
        match self.g.params[p].kind {
            ParamKind::Linear { out, inp } => Ok((inp, out)),
            ParamKind::Qkv { inner, c } => Ok((c, 3 * inner)),
            _ => Err(Error::Cuda(format!(
                "internal: linear op with parameter `{}`",
                self.g.params[p].name
            ))),
        }
    }

    /// The implicit-GEMM shape of a convolution or of a token-wise linear layer; None for
    /// other ops and for linear layers on per-image vectors.
    fn gemm_shape(&self, op: &Op) -> Result<Option<ConvShape>> {
        let g = self.g;
        Ok(match *op {
            Op::Conv {
                x,
                y,
                kernel,
                stride,
                pad,
                ..
            } => {
                let (h, w) = self.hw(x);
                Some(ConvShape::forward(
                    self.n,
                    h,
                    w,
                    self.ch(x),
                    self.ch(y),
                    kernel,
                    stride,
                    pad,
                ))
            }
            Op::Linear { x, y, p, .. } if g.tensors[y].space != Space::Vector => {
                let (inp, out) = self.linear_dims(p)?;
                let (h, w) = self.hw(x);
                Some(ConvShape::linear(self.n, h * w, inp, out))
            }
            _ => None,
        })
    }

    /// Which GroupNorm and upsampling outputs to store in 16 bits: those whose every reader
    /// takes them as the main input of a tensor-core launch (see [`Program::build_with`]).
    fn half_tensors(&self) -> Result<Vec<bool>> {
        let g = self.g;
        let mut half = vec![false; g.tensors.len()];
        for op in &g.ops {
            let (Op::GroupNorm { y, .. } | Op::Upsample { y, .. }) = *op else {
                continue;
            };
            let mut readers = g.ops.iter().filter(|o| o.inputs().contains(&y)).peekable();
            let mut ok = y != g.output && readers.peek().is_some();
            for r in readers {
                ok &= self.tensor_core_main_input(r, y)?;
            }
            half[y] = ok;
        }
        Ok(half)
    }

    /// Whether op `r` reads `t` only as the main input of a launch on the tensor-core kernel
    /// (which rounds that input to 16 bits anyway, so a 16-bit `t` serves it as well).
    fn tensor_core_main_input(&self, r: &Op, t: Tid) -> Result<bool> {
        let main_only = match *r {
            Op::Conv {
                x, temb, residual, ..
            } => x == t && temb != Some(t) && residual != Some(t),
            Op::Linear { x, residual, .. } => x == t && residual != Some(t),
            _ => false,
        };
        Ok(main_only
            && self
                .gemm_shape(r)?
                .is_some_and(|s| self.on_tensor_cores(&s)))
    }

    /// Whether launch shape `s` runs on the tensor-core kernel of the program's precision.
    fn on_tensor_cores(&self, s: &ConvShape) -> bool {
        plan_conv_at(s, self.sms, self.precision).kernel == ConvKernel::Tensor(self.precision)
    }

    /// The 16-bit copy of buffer `src` made earlier, if nothing has written `src` since.
    fn fresh_half_copy(&self, src: Buf) -> Option<Buf> {
        self.half_copies
            .iter()
            .rev()
            .find(|&&(from, _, at)| {
                from == src
                    && self.steps[at + 1..]
                        .iter()
                        .all(|s| !s.io().1.contains(&src))
            })
            .map(|&(_, copy, _)| copy)
    }

    /// Whether concatenation output `y` gets a 16-bit copy ([`KernelConfig::half_concat`]): in
    /// bf16/fp16 with the deep pipelines, when some op reads it as the main input of a
    /// tensor-core launch.
    fn wants_copy16(&self, y: Tid) -> Result<bool> {
        if !(self.choice.half_concat && self.choice.deep && self.precision.is_half()) {
            return Ok(false);
        }
        for r in &self.g.ops {
            if self.tensor_core_main_input(r, y)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Where op `r`'s tensor-core launch reads its main input `x` from, and whether in 16 bits:
    /// a 16-bit copy of `x` when there is one (or [`KernelConfig::half_copy`] makes one now)
    /// and `r` may take it, else `x` as stored.
    fn main_input(&mut self, r: &Op, x: Tid) -> Result<(Buf, bool)> {
        if !self.tensor_core_main_input(r, x)? {
            return Ok((self.val(x)?, self.half[x]));
        }
        let src = self.val(x)?;
        if let Some(c) = self.fresh_half_copy(src) {
            return Ok((c, true));
        }
        if !self.half[x] && self.wants_half_copy(self.numel(x)) {
            let name = format!("{} (16-bit copy)", self.g.tensors[x].name);
            return Ok((self.half_copy(src, self.numel(x), &name), true));
        }
        Ok((src, self.half[x]))
    }

    /// How an attention with heads of `head_dim` runs ([`KernelConfig::attention_flash`],
    /// [`KernelConfig::attention_tf32`]): on the tensor cores never in fp32.
    fn attention_kernel(&self, head_dim: usize) -> AttnKernel {
        let below_fp32 = self.precision != Precision::Fp32;
        if below_fp32 && self.choice.attention_flash && flash_fits(head_dim) {
            AttnKernel::Flash
        } else if below_fp32 && self.choice.attention_tf32 {
            AttnKernel::Tf32Products
        } else {
            AttnKernel::Products
        }
    }

    /// Whether [`KernelConfig::half_copy`] converts an fp32 input of `len` values.
    fn wants_half_copy(&self, len: usize) -> bool {
        self.choice.half_copy
            && self.choice.deep
            && self.precision.is_half()
            && len >= HALF_COPY_MIN
    }

    /// A step converting the `len` fp32 values of `src` to 16 bits; the copy's buffer.
    fn half_copy(&mut self, src: Buf, len: usize, name: &str) -> Buf {
        let y = self.buf(len.div_ceil(2), name);
        self.steps.push(Step::ToHalf {
            x: src,
            y,
            len,
            precision: self.precision,
        });
        self.half_copies.push((src, y, self.steps.len() - 1));
        y
    }

    /// The input gradient's source for the launches of `shapes`, which read `dy`, the fp32
    /// gradient of tensor `y`: a 16-bit copy when [`KernelConfig::half_copy`] asks for one and
    /// every launch runs on the tensor-core kernel, else `dy` itself.
    fn grad_input(&mut self, y: Tid, dy: Buf, shapes: &[ConvShape]) -> (Buf, bool) {
        if self.half_grad[y] {
            return (dy, true);
        }
        let tensor_cores = shapes.iter().all(|s| self.on_tensor_cores(s));
        if !(tensor_cores && self.wants_half_copy(self.numel(y))) {
            return (dy, false);
        }
        // With alias_residual_grads a residual's gradient is its block output's buffer, which
        // may already have a copy.
        if let Some(c) = self.fresh_half_copy(dy) {
            return (c, true);
        }
        let name = format!("d {} (16-bit copy)", self.g.tensors[y].name);
        (self.half_copy(dy, self.numel(y), &name), true)
    }

    /// The residual `r`'s share of the gradient `dy` of a block's output: added onto its
    /// gradient, or, as its first contribution, copied there; with
    /// [`KernelConfig::alias_residual_grads`] that first contribution is `dy`'s buffer itself
    /// (`dy` is final here and nothing reads it after this op's own launches).
    fn residual_grad(&mut self, r: Tid, dy: Buf) {
        if self.choice.alias_residual_grads && self.grad[r].is_none() {
            self.grad[r] = Some(dy);
            return;
        }
        let (gr, acc) = self.grad_slot(r);
        self.steps.push(Step::AddInto {
            dst: gr,
            src: dy,
            len: self.numel(r),
            accumulate: acc,
        });
    }

    /// The input-gradient launches of convolution `x -> y` (see [`ConvShape::backward`]).
    fn conv_backward_shapes(
        &self,
        x: Tid,
        y: Tid,
        kernel: usize,
        stride: usize,
        pad: Pad,
    ) -> Vec<ConvShape> {
        let (h, w) = self.hw(x);
        ConvShape::backward(self.n, h, w, self.ch(x), self.ch(y), kernel, stride, pad)
    }

    /// Which gradients to store in 16 bits: that of a convolution's output whose only reader
    /// is a GroupNorm (whose backward then writes the whole gradient at once) and whose
    /// backward reads it only in tensor-core input-gradient launches (no residual, no division).
    fn half_gradients(&self) -> Vec<bool> {
        let g = self.g;
        let mut half = vec![false; g.tensors.len()];
        for op in &g.ops {
            let Op::Conv {
                x,
                y,
                kernel,
                stride,
                pad,
                residual: None,
                out_div,
                ..
            } = *op
            else {
                continue;
            };
            let mut readers = g.ops.iter().filter(|o| o.inputs().contains(&y));
            let only_norm = matches!(readers.next(), Some(Op::GroupNorm { x: nx, .. }) if *nx == y)
                && readers.next().is_none();
            let tensor_cores = self
                .conv_backward_shapes(x, y, kernel, stride, pad)
                .iter()
                .all(|s| self.on_tensor_cores(s));
            half[y] = only_norm
                && tensor_cores
                && out_div == 1.0
                && y != g.output
                && g.tensors[y].on_input_path
                && g.tensors[x].on_input_path;
        }
        half
    }

    /// A convolution (or token-wise linear) launch; `half_input`: `x` holds 16-bit values (see
    /// [`ConvLaunch::half_input`]), which the wgmma kernel takes where [`KernelConfig::wgmma`].
    fn conv_step(&mut self, shape: ConvShape, x: Buf, w: W, y: Buf, half_input: bool) -> ConvStep {
        // With batch_invariant, one image's launch: the kernel choice never depends on the
        // batch, the split of K does.
        let planned = if self.choice.batch_invariant {
            ConvShape {
                n: 1,
                ..shape.clone()
            }
        } else {
            shape.clone()
        };
        // With six_stages, a launch that can run one block per multiprocessor is split so
        // and takes the six-stage tile.
        let wgmma = (half_input && self.choice.wgmma)
            .then(|| {
                self.choice
                    .six_stages
                    .then(|| plan_wgmma_six(&planned, self.sms, self.precision))
                    .flatten()
                    .or_else(|| plan_wgmma(&planned, self.sms, self.precision))
            })
            .flatten();
        let mut launch = wgmma.unwrap_or_else(|| {
            let mut l = plan_conv_at(&planned, self.sms, self.precision);
            l.deep = self.choice.deep && matches!(l.kernel, ConvKernel::Tensor(_));
            l.half_input = half_input;
            l
        });
        if self.choice.cluster_split_k
            && self.choice.cluster_plan
            && launch.tile == WgmmaTile::Plain
        {
            if let Some(l) = launch
                .wgmma
                .then(|| plan_wgmma_clustered(&planned, self.sms, self.precision))
                .flatten()
            {
                (launch.splits, launch.k_per_split) = (l.splits, l.k_per_split);
            }
        }
        launch.cluster = self.choice.cluster_split_k
            && launch.wgmma
            && launch.tile == WgmmaTile::Plain
            && (2..=MAX_CLUSTER_SPLITS).contains(&launch.splits);
        launch.row_epilogue = self.choice.row_epilogue
            && launch.deep
            && matches!(launch.kernel, ConvKernel::Tensor(_));
        launch.prefetch_weights =
            self.choice.prefetch_weights && matches!(launch.kernel, ConvKernel::Tensor(_));
        let plain = launch.wgmma && launch.tile == WgmmaTile::Plain;
        // One tall block per multiprocessor: only unsplit, where they fill the machine at least
        // once.
        let tall = WgmmaTile::Tall;
        let tall_blocks = planned.rows().div_ceil(tall.rows()) * planned.ncols.div_ceil(128);
        let tall_here =
            self.choice.tall_tiles && plain && launch.splits == 1 && tall_blocks >= self.sms;
        let halo = (self.choice.halo_tiles && plain)
            .then(|| {
                let tall_halo = on_tile(launch, &planned, WgmmaTile::TallHalo);
                tall_halo
                    .filter(|_| tall_here)
                    .or_else(|| on_tile(launch, &planned, WgmmaTile::Halo))
            })
            .flatten();
        if let Some(h) = halo {
            launch = h;
        } else if tall_here {
            launch.tile = tall;
        }
        let ws_len = launch.workspace_len(&shape);
        let workspace = (ws_len > 0).then(|| self.buf(ws_len, "split-K workspace"));
        ConvStep {
            shape,
            launch,
            x,
            w,
            y,
            bias: None,
            temb: None,
            residual: None,
            workspace,
            out_div: 1.0,
            accumulate: false,
            norm: None,
            gn_partial: None,
        }
    }

    fn forward_op(&mut self, i: usize, op: &Op, timesteps: Buf, record: bool) -> Result<()> {
        let g = self.g;
        let keep = record && g.tensors[op.output()].on_input_path;
        match *op {
            Op::TimeEmbedding {
                y,
                dim,
                flip_sin_to_cos,
                freq_shift,
            } => {
                let yb = self.new_value(y);
                self.steps.push(Step::TimeEmbedding {
                    t: timesteps,
                    y: yb,
                    dim,
                    flip: flip_sin_to_cos,
                    shift: freq_shift,
                });
            }
            Op::Linear {
                x,
                y,
                p,
                silu_in,
                residual,
                out_div,
            } => {
                let (inp, out) = self.linear_dims(p)?;
                let xb = self.val(x)?;
                let res = residual.map(|r| self.val(r)).transpose()?;
                let yb = self.new_value(y);
                if g.tensors[y].space == Space::Vector {
                    self.steps.push(Step::LinearRows {
                        x: xb,
                        y: yb,
                        w: W {
                            pid: p,
                            kind: WKind::Linear,
                        },
                        b: W {
                            pid: p,
                            kind: WKind::Bias,
                        },
                        inp,
                        out,
                        silu_in,
                        residual: res,
                        out_div,
                    });
                } else {
                    if silu_in {
                        return Err(Error::Cuda(format!(
                            "`{}`: SiLU-input linear layers only act on the time embedding",
                            g.params[p].name
                        )));
                    }
                    let shape = self.gemm_shape(op)?.expect("a token-wise linear layer");
                    let (xb, half_input) = self.main_input(op, x)?;
                    let mut s = self.conv_step(
                        shape,
                        xb,
                        W {
                            pid: p,
                            kind: WKind::LinearT,
                        },
                        yb,
                        half_input,
                    );
                    s.bias = Some(W {
                        pid: p,
                        kind: WKind::Bias,
                    });
                    s.residual = res;
                    s.out_div = out_div;
                    self.steps.push(Step::Conv(s));
                }
            }
            Op::Conv {
                x,
                y,
                p,
                temb,
                residual,
                out_div,
                ..
            } => {
                let shape = self.gemm_shape(op)?.expect("a convolution");
                let (xb, half_input) = self.main_input(op, x)?;
                let tb = temb.map(|t| self.val(t)).transpose()?;
                let rb = residual.map(|r| self.val(r)).transpose()?;
                let yb = self.new_value(y);
                let mut s = self.conv_step(
                    shape,
                    xb,
                    W {
                        pid: p,
                        kind: WKind::ConvForward,
                    },
                    yb,
                    half_input,
                );
                s.bias = Some(W {
                    pid: p,
                    kind: WKind::Bias,
                });
                s.temb = tb;
                s.residual = rb;
                s.out_div = out_div;
                self.steps.push(Step::Conv(s));
            }
            Op::GroupNorm {
                x,
                y,
                p,
                groups,
                eps,
                silu,
            } => {
                let (h, w) = self.hw(x);
                let (hw, c) = (h * w, self.ch(x));
                let split = self.norm_split(hw, c, groups);
                let xb = self.val(x)?;
                let (yb, half_out) = self.output_value(y);
                let partial = self.buf(split.partial_len(self.n, c), "GroupNorm partial sums");
                let stats = self.buf(2 * self.n * groups, "GroupNorm statistics");
                let affine = self.buf(2 * self.n * c, "GroupNorm affine");
                if keep {
                    self.aux[i] = Some(stats);
                }
                self.steps.push(Step::GroupNorm {
                    x: xb,
                    y: Some(yb),
                    gamma: W {
                        pid: p,
                        kind: WKind::Gamma,
                    },
                    beta: W {
                        pid: p,
                        kind: WKind::Beta,
                    },
                    hw,
                    c,
                    groups,
                    split,
                    eps,
                    silu,
                    partial,
                    stats,
                    affine,
                    half_out,
                });
            }
            Op::Attention {
                qkv,
                y,
                heads,
                head_dim,
            } => {
                let (h, w) = self.hw(qkv);
                let tokens = h * w;
                let qb = self.val(qkv)?;
                let yb = self.new_value(y);
                let kernel = self.attention_kernel(head_dim);
                let saved = self.buf(
                    self.n * heads * kernel.saved_len(tokens),
                    "attention probabilities or log-sum-exps",
                );
                if keep {
                    self.aux[i] = Some(saved);
                }
                self.steps.push(Step::Attention {
                    qkv: qb,
                    y: yb,
                    saved,
                    tokens,
                    heads,
                    head_dim,
                    kernel,
                });
            }
            Op::Upsample { x, y } => {
                let (h, w) = self.hw(x);
                let c = self.ch(x);
                let xb = self.val(x)?;
                let (yb, half_out) = self.output_value(y);
                self.steps.push(Step::Upsample {
                    x: xb,
                    y: yb,
                    h,
                    w,
                    c,
                    half_out,
                });
            }
            Op::Concat { a, b, y } => {
                let (h, w) = self.hw(a);
                let (ab, bb) = (self.val(a)?, self.val(b)?);
                let yb = self.new_value(y);
                let y16 = if self.wants_copy16(y)? {
                    let b = self.buf(
                        self.numel(y).div_ceil(2),
                        &format!("{} (16-bit copy)", g.tensors[y].name),
                    );
                    // The copy is written by the concatenation about to be pushed.
                    self.half_copies.push((yb, b, self.steps.len()));
                    Some((b, self.precision))
                } else {
                    None
                };
                self.steps.push(Step::Concat {
                    a: ab,
                    b: bb,
                    y: yb,
                    y16,
                    pixels: self.n * h * w,
                    ca: self.ch(a),
                    cb: self.ch(b),
                });
            }
        }
        Ok(())
    }

    fn backward_op(&mut self, i: usize, op: &Op, dy: Buf) -> Result<()> {
        let g = self.g;
        let on_path = |t: Tid| g.tensors[t].on_input_path;
        let aux = |what: &str| Error::Cuda(format!("internal: {what} of op {i} were not recorded"));
        match *op {
            Op::TimeEmbedding { .. } => {
                return Err(Error::Cuda(
                    "internal: the time embedding is not on the input path".into(),
                ))
            }
            Op::Linear {
                x,
                y,
                p,
                residual,
                out_div,
                ..
            } => {
                if g.tensors[y].space == Space::Vector {
                    return Err(Error::Cuda(format!(
                        "internal: `{}` acts on a vector yet lies on the input path",
                        g.params[p].name
                    )));
                }
                let (inp, out) = self.linear_dims(p)?;
                if out_div != 1.0 {
                    self.steps.push(Step::Divide {
                        x: dy,
                        len: self.numel(y),
                        div: out_div,
                    });
                }
                if on_path(x) {
                    let (h, w) = self.hw(x);
                    let (gx, acc) = self.grad_slot(x);
                    let shape = ConvShape::linear(self.n, h * w, out, inp);
                    let (src, half_input) = self.grad_input(y, dy, std::slice::from_ref(&shape));
                    let mut s = self.conv_step(
                        shape,
                        src,
                        W {
                            pid: p,
                            kind: WKind::Linear,
                        },
                        gx,
                        half_input,
                    );
                    s.accumulate = acc;
                    self.steps.push(Step::Conv(s));
                }
                if let Some(r) = residual.filter(|&r| on_path(r)) {
                    self.residual_grad(r, dy);
                }
            }
            Op::Conv {
                x,
                y,
                p,
                kernel,
                stride,
                pad,
                residual,
                out_div,
                ..
            } => {
                if out_div != 1.0 {
                    self.steps.push(Step::Divide {
                        x: dy,
                        len: self.numel(y),
                        div: out_div,
                    });
                }
                if on_path(x) {
                    let (gx, acc) = self.grad_slot(x);
                    let shapes = self.conv_backward_shapes(x, y, kernel, stride, pad);
                    let (src, half_input) = self.grad_input(y, dy, &shapes);
                    for shape in shapes {
                        let mut s = self.conv_step(
                            shape,
                            src,
                            W {
                                pid: p,
                                kind: WKind::ConvBackward,
                            },
                            gx,
                            half_input,
                        );
                        s.accumulate = acc;
                        self.steps.push(Step::Conv(s));
                    }
                }
                if let Some(r) = residual.filter(|&r| on_path(r)) {
                    self.residual_grad(r, dy);
                }
            }
            Op::GroupNorm {
                x, p, groups, silu, ..
            } => {
                let stats = self.aux[i].ok_or_else(|| aux("GroupNorm statistics"))?;
                let (h, w) = self.hw(x);
                let (hw, c) = (h * w, self.ch(x));
                let split = self.norm_split(hw, c, groups);
                let xb = self.val(x)?;
                let half_out = self.half_grad[x].then_some(self.precision);
                let (gx, acc) = if half_out.is_some() {
                    if self.grad[x].is_some() {
                        return Err(Error::Cuda(format!(
                            "internal: 16-bit gradient of `{}` has another contribution",
                            g.tensors[x].name
                        )));
                    }
                    // Two 16-bit values per f32 slot.
                    let b = self.buf(
                        self.numel(x).div_ceil(2),
                        &format!("d {} (16-bit)", g.tensors[x].name),
                    );
                    self.grad[x] = Some(b);
                    (b, false)
                } else {
                    self.grad_slot(x)
                };
                let partial = self.buf(
                    split.partial_len(self.n, c),
                    "GroupNorm backward partial sums",
                );
                let means = self.buf(2 * self.n * groups, "GroupNorm backward means");
                self.steps.push(Step::GroupNormBackward {
                    x: xb,
                    dy,
                    dx: gx,
                    gamma: W {
                        pid: p,
                        kind: WKind::Gamma,
                    },
                    beta: W {
                        pid: p,
                        kind: WKind::Beta,
                    },
                    hw,
                    c,
                    groups,
                    split,
                    silu,
                    stats,
                    partial,
                    means,
                    accumulate: acc,
                    half_out,
                });
            }
            Op::Attention {
                qkv,
                y,
                heads,
                head_dim,
            } => {
                let saved = self.aux[i].ok_or_else(|| aux("attention probabilities"))?;
                let (h, w) = self.hw(qkv);
                let tokens = h * w;
                let qb = self.val(qkv)?;
                let kernel = self.attention_kernel(head_dim);
                let yb = match kernel {
                    AttnKernel::Flash => Some(self.val(y)?),
                    _ => None,
                };
                let (gq, acc) = self.grad_slot(qkv);
                let scratch = self.buf(
                    self.n * heads * kernel.saved_len(tokens),
                    "attention score gradients or dO . O sums",
                );
                self.steps.push(Step::AttentionBackward {
                    qkv: qb,
                    saved,
                    y: yb,
                    dy,
                    dqkv: gq,
                    scratch,
                    tokens,
                    heads,
                    head_dim,
                    accumulate: acc,
                    kernel,
                });
            }
            Op::Upsample { x, .. } => {
                let (h, w) = self.hw(x);
                let c = self.ch(x);
                let (gx, acc) = self.grad_slot(x);
                self.steps.push(Step::UpsampleBackward {
                    dy,
                    dx: gx,
                    h,
                    w,
                    c,
                    accumulate: acc,
                });
            }
            Op::Concat { a, b, .. } => {
                let (h, w) = self.hw(a);
                let (ca, cb) = (self.ch(a), self.ch(b));
                let pixels = self.n * h * w;
                for (t, offset, width) in [(a, 0, ca), (b, ca, cb)] {
                    if on_path(t) {
                        let (gt, acc) = self.grad_slot(t);
                        self.steps.push(Step::ConcatBackward {
                            dy,
                            d: gt,
                            pixels,
                            c: ca + cb,
                            offset,
                            width,
                            accumulate: acc,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UNetConfig;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};

    /// What the program computes, symbolically: each buffer holds a hash of the expression
    /// that wrote it (operation, weights and the hashes it read), a copy holds its source's
    /// hash, and a 16-bit value `half(v)` whoever rounded it (a 16-bit copy, a GroupNorm's
    /// 16-bit output, or the tensor-core kernel staging an fp32 input). Two programs that
    /// compute the same sums from the same values give the output and input gradient the same
    /// hashes, whatever buffers, copies and kernels they use.
    fn symbolic(p: &Program) -> (u64, Option<u64>) {
        fn h(parts: &[&dyn Fn(&mut DefaultHasher)]) -> u64 {
            let mut s = DefaultHasher::new();
            for f in parts {
                f(&mut s);
            }
            s.finish()
        }
        let half = |v: u64| h(&[&|s| "half".hash(s), &|s| v.hash(s)]);
        let mut val = vec![0u64; p.bufs.len()];
        // What a GroupNorm without an output would have written, by its affine buffer: the
        // halo convolution that applies it reads that.
        let mut normalised = std::collections::HashMap::new();
        val[p.sample.0] = h(&[&|s| "sample".hash(s)]);
        val[p.timesteps.0] = h(&[&|s| "timesteps".hash(s)]);
        for (i, step) in p.steps.iter().enumerate() {
            if i == p.forward_steps {
                if let Some(c) = p.cotangent {
                    val[c.0] = h(&[&|s| "cotangent".hash(s)]);
                }
            }
            let info = step.info(p.n, p.h, p.w);
            let weights: Vec<(usize, String)> = step
                .weights()
                .iter()
                .map(|w| (w.pid, format!("{:?}", w.kind)))
                .collect();
            let op = |s: &mut DefaultHasher| {
                info.kind.hash(s);
                info.shape.hash(s);
                weights.hash(s);
            };
            let (reads, writes) = step.io();
            match step {
                Step::AddInto {
                    dst,
                    src,
                    accumulate: false,
                    ..
                } => val[dst.0] = val[src.0],
                Step::ToHalf { x, y, .. } => val[y.0] = half(val[x.0]),
                Step::GroupNorm {
                    x,
                    y,
                    half_out,
                    partial,
                    stats,
                    affine,
                    ..
                } => {
                    // The generic rule below, with the output's slot kept when there is none,
                    // and the value of `x` alone whoever added its partial sums.
                    let r = [val[x.0]];
                    let out = |j: usize| h(&[&op, &|s| r.hash(s), &|s| j.hash(s)]);
                    let yv = if half_out.is_some() {
                        half(out(0))
                    } else {
                        out(0)
                    };
                    match y {
                        Some(y) => val[y.0] = yv,
                        None => {
                            normalised.insert(affine.0, yv);
                        }
                    }
                    for (j, b) in [partial, stats, affine].into_iter().enumerate() {
                        val[b.0] = out(j + 1);
                    }
                }
                Step::Conv(c) => {
                    let staged = !c.launch.half_input
                        && matches!(c.launch.kernel, ConvKernel::Tensor(q) if q.is_half());
                    let main = match c.norm {
                        Some(affine) => normalised[&affine.0],
                        None if staged => half(val[c.x.0]),
                        None => val[c.x.0],
                    };
                    let extra: Vec<u64> = c
                        .temb
                        .into_iter()
                        .chain(c.residual)
                        .map(|b| val[b.0])
                        .collect();
                    let old = (c.accumulate || c.shape.out_stride > 1).then(|| val[c.y.0]);
                    let bits = c.out_div.to_bits();
                    val[c.y.0] = h(&[
                        &op,
                        &|s| main.hash(s),
                        &|s| extra.hash(s),
                        &|s| old.hash(s),
                        &|s| bits.hash(s),
                    ]);
                }
                _ => {
                    // The fused attention backward also reads the forward's output, a function
                    // of q/k/v, which it already reads.
                    let derived = match *step {
                        Step::AttentionBackward { y, .. } => y,
                        _ => None,
                    };
                    let r: Vec<u64> = reads
                        .iter()
                        .filter(|&&b| Some(b) != derived)
                        .map(|b| val[b.0])
                        .collect();
                    let halves: Vec<Buf> = match *step {
                        Step::Upsample {
                            y,
                            half_out: Some(_),
                            ..
                        } => vec![y],
                        Step::GroupNormBackward {
                            dx,
                            half_out: Some(_),
                            ..
                        } => vec![dx],
                        _ => vec![],
                    };
                    for (j, w) in writes.iter().enumerate() {
                        val[w.0] = h(&[&op, &|s| r.hash(s), &|s| j.hash(s)]);
                    }
                    if let Step::Concat {
                        y,
                        y16: Some((c, _)),
                        ..
                    } = *step
                    {
                        val[c.0] = half(val[y.0]);
                    }
                    for b in halves {
                        val[b.0] = half(val[b.0]);
                    }
                }
            }
        }
        (val[p.output.0], p.grad_input.map(|g| val[g.0]))
    }

    /// cluster_plan splits plain-tile wgmma launches at most 8 ways, every split one reducing
    /// in a cluster without a workspace; at batch 1 that moves the launches planned 9-36 ways
    /// (the 32x32 to 8x8 levels) into clusters, and it leaves the other launches' kernels alone.
    #[test]
    fn cluster_plan_splits_for_clusters() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let build = |cluster_plan| {
            let tc = KernelConfig {
                wgmma: true,
                cluster_split_k: true,
                cluster_plan,
                ..KernelConfig::default()
            };
            Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, tc).unwrap()
        };
        let convs = |p: &Program| -> Vec<ConvStep> {
            p.steps
                .iter()
                .filter_map(|s| match s {
                    Step::Conv(c) => Some(c.clone()),
                    _ => None,
                })
                .collect()
        };
        let (before, after) = (convs(&build(false)), convs(&build(true)));
        assert_eq!(before.len(), after.len());
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(
                (b.launch.wgmma, b.launch.tile),
                (a.launch.wgmma, a.launch.tile)
            );
            if !(a.launch.wgmma && a.launch.tile == WgmmaTile::Plain) {
                assert_eq!(a.launch, b.launch);
                continue;
            }
            assert!(a.launch.splits <= MAX_CLUSTER_SPLITS, "{:?}", a.launch);
            assert_eq!(a.launch.cluster, a.launch.splits > 1);
            assert!(a.workspace.is_none());
            assert!(a.launch.splits * a.launch.k_per_split >= a.shape.k());
            moved += usize::from(b.launch.splits > MAX_CLUSTER_SPLITS);
        }
        assert!(moved > 20, "{moved}");
    }

    /// Over every combination of the passes that move work between steps (one-pass GroupNorms,
    /// 16-bit copies, aliased gradients, GroupNorms applied in halo loads or summed in halo
    /// epilogues, tall tiles), with wgmma, halo tiles, 16-bit concatenations and fused
    /// attention on: a step reads and writes one buffer only where it adds onto it element by
    /// element; a convolution that applies a GroupNorm reads that GroupNorm's input and affine
    /// with nothing written to either in between; a convolution that writes a GroupNorm's
    /// partial sums is the last writer of that GroupNorm's input, unsplit, on a halo tile.
    #[test]
    fn fused_steps_keep_their_contracts() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let (mut applied, mut summed) = (0, 0);
        for (n, size) in [(1, 256), (2, 64)] {
            for bits in 0..64u32 {
                let tc = KernelConfig {
                    wgmma: true,
                    halo_tiles: true,
                    half_concat: true,
                    attention_flash: true,
                    gn_one_pass: bits & 1 != 0,
                    half_copy: bits & 2 != 0,
                    alias_residual_grads: bits & 4 != 0,
                    halo_norm: bits & 8 != 0,
                    halo_stats: bits & 16 != 0,
                    tall_tiles: bits & 32 != 0,
                    ..KernelConfig::default()
                };
                let p =
                    Program::build_with(&g, n, size, size, true, 132, Precision::Bf16, tc).unwrap();
                let written_between = |from: usize, to: usize, b: Buf| {
                    p.steps[from + 1..to].iter().any(|s| s.io().1.contains(&b))
                };
                for (i, s) in p.steps.iter().enumerate() {
                    let (reads, writes) = s.io();
                    for b in writes.iter().filter(|b| reads.contains(b)) {
                        let adds_onto = match *s {
                            Step::Conv(ref c) => c.accumulate && c.y == *b && c.x != *b,
                            Step::GroupNormBackward { dx, accumulate, .. }
                            | Step::UpsampleBackward { dx, accumulate, .. } => {
                                accumulate && dx == *b
                            }
                            Step::AddInto {
                                dst, accumulate, ..
                            } => accumulate && dst == *b,
                            Step::ConcatBackward { d, accumulate, .. } => accumulate && d == *b,
                            Step::AttentionBackward {
                                dqkv, accumulate, ..
                            } => accumulate && dqkv == *b,
                            Step::Divide { .. } => true,
                            _ => false,
                        };
                        assert!(adds_onto, "step {i} reads and writes {b:?}: {s:?} ({tc:?})");
                    }
                    let Step::Conv(c) = s else { continue };
                    if let Some(affine) = c.norm {
                        applied += 1;
                        let j = p.steps[..i]
                            .iter()
                            .rposition(
                                |t| matches!(t, Step::GroupNorm { affine: a, .. } if *a == affine),
                            )
                            .expect("the GroupNorm a convolution applies runs before it");
                        let Step::GroupNorm { x, .. } = p.steps[j] else {
                            unreachable!()
                        };
                        assert_eq!(x, c.x);
                        assert!(!written_between(j, i, x) && !written_between(j, i, affine));
                    }
                    if let Some(partial) = c.gn_partial {
                        summed += 1;
                        let j = i + p.steps[i..]
                            .iter()
                            .position(|t| matches!(t, Step::GroupNorm { partial: q, .. } if *q == partial))
                            .expect("a GroupNorm reads the sums a convolution writes");
                        let Step::GroupNorm { x, split, .. } = p.steps[j] else {
                            unreachable!()
                        };
                        assert!(x == c.y && split.from_producer && !written_between(i, j, x));
                        assert!(c.launch.splits == 1 && c.launch.tile.is_halo());
                    }
                }
            }
        }
        assert!(applied > 0 && summed > 0, "{applied} {summed}");
    }

    /// Reads only ever see values some earlier step (or the host) wrote, in both modes.
    #[test]
    fn every_buffer_is_written_before_it_is_read() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let mut programs: Vec<(bool, Program)> = [
            (false, Precision::Fp32),
            (true, Precision::Fp32),
            (true, Precision::Bf16),
        ]
        .into_iter()
        .map(|(record, precision)| {
            let p = Program::build(&g, 2, 64, 32, record, 132, precision).unwrap();
            (record, p)
        })
        .collect();
        // With 16-bit input copies, which need full-size inputs to appear.
        let copies = KernelConfig {
            half_copy: true,
            ..KernelConfig::default()
        };
        let p = Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, copies).unwrap();
        assert!(p.steps.iter().any(|s| matches!(s, Step::ToHalf { .. })));
        programs.push((true, p));
        for (record, p) in programs {
            let mut written = vec![false; p.bufs.len()];
            written[p.sample.0] = true;
            written[p.timesteps.0] = true;
            // The batched linear layers' tables: written when the plan is made.
            for s in &p.steps {
                if let Step::LinearBatch { table, .. } = s {
                    written[table.0] = true;
                }
            }
            for (i, s) in p.steps.iter().enumerate() {
                if i == p.forward_steps {
                    written[p.cotangent.unwrap().0] = true;
                }
                let (reads, writes) = s.io();
                for r in reads {
                    assert!(
                        written[r.0],
                        "step {i} reads `{}` before anything wrote it",
                        p.bufs[r.0].what
                    );
                }
                for w in writes {
                    written[w.0] = true;
                }
            }
            assert!(written[p.output.0]);
            if record {
                assert!(written[p.grad_input.unwrap().0]);
            }
        }
    }

    /// Every resnet's projection of the time embedding (one per convolution that adds it) is
    /// in one batched launch, before any reader of its output, whose table lives over the
    /// whole program; the time-embedding MLP's two layers stay separate launches.
    #[test]
    fn time_embedding_projections_are_one_launch() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let projections = g
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Conv { temb: Some(_), .. }))
            .count();
        assert!(projections > 1);
        for (record, precision) in [(false, Precision::Fp32), (true, Precision::Bf16)] {
            let p = Program::build(&g, 1, 64, 32, record, 132, precision).unwrap();
            let batches: Vec<usize> = (0..p.steps.len())
                .filter(|&i| matches!(p.steps[i], Step::LinearBatch { .. }))
                .collect();
            assert_eq!(batches.len(), 1, "{batches:?}");
            let at = batches[0];
            assert!(at < p.forward_steps);
            let Step::LinearBatch {
                x,
                inp,
                silu_in,
                out_div,
                ref layers,
                table,
            } = p.steps[at]
            else {
                unreachable!()
            };
            assert_eq!(layers.len(), projections);
            assert!(silu_in && out_div == 1.0);
            assert_eq!(inp, g.config.time_embedding_dim);
            assert_eq!(p.bufs[table.0].len, projections * LINEAR_ITEM_WORDS);
            assert_eq!(p.lifetimes()[table.0], (0, p.steps.len() - 1));
            // What is left: the MLP's two layers, neither reading the embedding `x`.
            let rows: Vec<&Step> = p
                .steps
                .iter()
                .filter(|s| matches!(s, Step::LinearRows { .. }))
                .collect();
            assert_eq!(rows.len(), 2);
            assert!(rows
                .iter()
                .all(|s| matches!(**s, Step::LinearRows { x: rx, .. } if rx != x)));
            for l in layers {
                let first_read = p.steps.iter().position(|s| s.io().0.contains(&l.y));
                assert!(first_read.is_some_and(|r| r > at), "{}", p.bufs[l.y.0].what);
                let writers = p.steps.iter().filter(|s| s.io().1.contains(&l.y)).count();
                assert_eq!(writers, 1);
            }
        }
    }

    /// In bf16 and fp16, exactly the GroupNorm and upsampling outputs that only feed
    /// tensor-core launches, and the gradients GroupNorms pass back to such launches, are
    /// 16-bit, at half the length, and only those launches read 16-bit inputs.
    #[test]
    fn batch_invariant_programs_plan_every_image_alike() {
        // What a step sums in which order: its launch's split of K, or its GroupNorm's split.
        fn orders(p: &Program) -> Vec<String> {
            p.steps
                .iter()
                .filter_map(|s| match s {
                    Step::Conv(c) => Some(format!("{:?}", c.launch)),
                    Step::GroupNorm { split, .. } | Step::GroupNormBackward { split, .. } => {
                        Some(format!("{split:?}"))
                    }
                    _ => None,
                })
                .collect()
        }
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for precision in [Precision::Fp32, Precision::Bf16] {
            for (gn_one_pass, gn_clusters) in [(false, false), (true, false), (true, true)] {
                let choice = |batch_invariant| KernelConfig {
                    wgmma: true,
                    gn_one_pass,
                    gn_clusters,
                    batch_invariant,
                    ..KernelConfig::default()
                };
                let build = |n, inv| {
                    Program::build_with(&g, n, 128, 128, true, 132, precision, choice(inv)).unwrap()
                };
                let one = orders(&build(1, true));
                for n in [2, 3, 8] {
                    let other = orders(&build(n, true));
                    assert_eq!(other.len(), one.len());
                    for (i, (a, b)) in other.iter().zip(&one).enumerate() {
                        assert_eq!(a, b, "{precision}, batch {n}, step {i} of those that sum");
                    }
                }
                // Planned for the batch, the splits do change with it.
                assert_ne!(orders(&build(8, false)), orders(&build(1, false)));
            }
        }
    }

    #[test]
    fn sixteen_bit_values_feed_only_tensor_core_launches() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for precision in [
            Precision::Fp32,
            Precision::Tf32,
            Precision::Bf16,
            Precision::Fp16,
        ] {
            for (deep, half_concat) in [(true, false), (false, false), (true, true), (false, true)]
            {
                let tc = KernelConfig {
                    deep,
                    half_concat,
                    ..KernelConfig::default()
                };
                let p = Program::build_with(&g, 2, 64, 32, true, 132, precision, tc).unwrap();
                let expect_half = deep && matches!(precision, Precision::Bf16 | Precision::Fp16);
                // Which buffers a GroupNorm (or a concatenation's copy) wrote in 16 bits, and
                // who reads them.
                let mut half = vec![false; p.bufs.len()];
                let (mut norms, mut upsamplings, mut half_grads, mut copies) = (0, 0, 0, 0);
                for s in &p.steps {
                    let (y, half_out, len) = match *s {
                        Step::Concat {
                            y16: Some((y, hp)),
                            pixels,
                            ca,
                            cb,
                            ..
                        } => {
                            copies += 1;
                            (y, Some(hp), pixels * (ca + cb))
                        }
                        Step::GroupNorm {
                            y: Some(y),
                            half_out,
                            hw,
                            c,
                            ..
                        } => {
                            norms += 1;
                            (y, half_out, p.n * hw * c)
                        }
                        Step::Upsample {
                            y,
                            half_out,
                            h,
                            w,
                            c,
                            ..
                        } => {
                            upsamplings += 1;
                            (y, half_out, p.n * 4 * h * w * c)
                        }
                        Step::GroupNormBackward {
                            dx,
                            half_out,
                            accumulate,
                            hw,
                            c,
                            ..
                        } => {
                            if half_out.is_some() {
                                assert!(!accumulate);
                                half_grads += 1;
                            }
                            (dx, half_out, p.n * hw * c)
                        }
                        _ => continue,
                    };
                    if let Some(hp) = half_out {
                        assert!(expect_half && hp == precision);
                        assert_eq!(p.bufs[y.0].len, len.div_ceil(2));
                        half[y.0] = true;
                    }
                }
                let mut readers = 0;
                for s in &p.steps {
                    let (reads, _) = s.io();
                    for r in reads.iter().filter(|r| half[r.0]) {
                        let Step::Conv(c) = s else {
                            panic!("`{}` read by {s:?}", p.bufs[r.0].what)
                        };
                        assert_eq!(c.x, *r, "a 16-bit buffer read as a residual or embedding");
                        assert!(c.launch.half_input);
                        assert_eq!(c.launch.kernel, ConvKernel::Tensor(precision));
                        readers += 1;
                    }
                    if let Step::Conv(c) = s {
                        assert_eq!(c.launch.half_input, half[c.x.0]);
                        let tensor = matches!(c.launch.kernel, ConvKernel::Tensor(_));
                        assert_eq!(c.launch.deep, deep && tensor);
                    }
                }
                let halves = half.iter().filter(|&&h| h).count();
                if expect_half {
                    // Every GroupNorm of this architecture feeds a 3x3 convolution or the
                    // attention's q/k/v product on tensor cores, except the last, which feeds
                    // the 3-channel output convolution (fp32 kernel); every upsampling feeds
                    // its block's convolution.
                    // Backward: the gradient of each residual block's first convolution (32
                    // blocks), which only its second GroupNorm reads. With half_concat, the
                    // 18 concatenations of the up blocks, each read by its block's shortcut.
                    assert_eq!(upsamplings, 5);
                    assert_eq!(half_grads, 32);
                    assert_eq!(copies, if half_concat { 18 } else { 0 });
                    assert_eq!(
                        halves,
                        norms - 1 + upsamplings + half_grads + copies,
                        "{precision}"
                    );
                    assert_eq!(readers, halves);
                } else {
                    assert_eq!(halves, 0);
                }
            }
        }
    }
    /// With half_copy, every large fp32 main input of a tensor-core launch is converted once
    /// to 16 bits, and the copies feed only 16-bit-input tensor-core launches.
    #[test]
    fn half_copies_feed_only_tensor_core_launches() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for precision in [Precision::Tf32, Precision::Bf16, Precision::Fp16] {
            for half_concat in [false, true] {
                let tc = KernelConfig {
                    half_copy: true,
                    half_concat,
                    ..KernelConfig::default()
                };
                let p = Program::build_with(&g, 1, 256, 256, true, 132, precision, tc).unwrap();
                let mut copy = vec![false; p.bufs.len()];
                let mut readers = vec![0; p.bufs.len()];
                let (mut forward, mut backward) = (0, 0);
                for (i, s) in p.steps.iter().enumerate() {
                    if let Step::ToHalf {
                        y,
                        len,
                        precision: hp,
                        ..
                    } = *s
                    {
                        assert!(precision.is_half() && hp == precision);
                        assert!(len >= HALF_COPY_MIN);
                        assert_eq!(p.bufs[y.0].len, len.div_ceil(2));
                        copy[y.0] = true;
                        if i < p.forward_steps {
                            forward += 1;
                        } else {
                            backward += 1;
                        }
                    }
                }
                for s in &p.steps {
                    let (reads, _) = s.io();
                    for r in reads.iter().filter(|r| copy[r.0]) {
                        let Step::Conv(c) = s else {
                            panic!("`{}` read by {s:?}", p.bufs[r.0].what)
                        };
                        assert_eq!(c.x, *r, "a 16-bit copy read as a residual or embedding");
                        assert!(c.launch.half_input);
                        assert_eq!(c.launch.kernel, ConvKernel::Tensor(precision));
                        readers[r.0] += 1;
                    }
                    // What is left staged from fp32 is small.
                    if let Step::Conv(c) = s {
                        if precision.is_half()
                            && c.launch.kernel == ConvKernel::Tensor(precision)
                            && !c.launch.half_input
                        {
                            let sh = &c.shape;
                            assert!(sh.n * sh.sh * sh.sw * sh.sc < HALF_COPY_MIN, "{s:?}");
                        }
                    }
                }
                assert!(copy.iter().zip(&readers).all(|(&c, &r)| !c || r > 0));
                if precision.is_half() {
                    // The selftest's celebahq rows (2 x 64 x 64) copy too, at their top level.
                    let small =
                        Program::build_with(&g, 2, 64, 64, true, 132, precision, tc).unwrap();
                    assert!(small.steps.iter().any(|s| matches!(s, Step::ToHalf { .. })));
                }
                if precision.is_half() {
                    // Forward: the inputs of the stride-2 downsampling convolutions at the
                    // 256x256 to 64x64 levels, plus, without the concatenations' own copies,
                    // the 9 concatenations of the up blocks at those levels. Backward: the
                    // gradients read by the input gradients of the residual blocks' second
                    // convolutions and 1x1 shortcuts (each its own copy without aliasing),
                    // the upsamplers' and the first downsampler's convolutions at those
                    // levels.
                    assert_eq!(forward, if half_concat { 3 } else { 12 });
                    assert_eq!(backward, 29);
                } else {
                    assert_eq!(forward + backward, 0);
                }
            }
        }
    }
    /// Copies, aliases, 16-bit inputs and fused attention change where values live and which
    /// kernel reads them, never what is computed: every combination of the switches computes the default
    /// program's output and input gradient (symbolically, [`symbolic`]), and so does the
    /// two-stage pipeline, which stages every input from fp32; a program missing one
    /// accumulation does not.
    #[test]
    fn switches_compute_what_the_default_program_computes() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        // At batch 32 the middle block's 8x8 gradients are large enough to be copied, and
        // its attention's residual gradient, aliased, is then added onto after a copy of it
        // was made: the copy must not be reused.
        for (n, h, w) in [(1, 256, 256), (2, 64, 32), (32, 256, 256)] {
            for precision in [Precision::Bf16, Precision::Fp16] {
                let build = |tc: KernelConfig| {
                    Program::build_with(&g, n, h, w, true, 132, precision, tc).unwrap()
                };
                let base = build(KernelConfig::default());
                let want = symbolic(&base);
                assert!(want.1.is_some());
                for bits in 0..16 {
                    let tc = KernelConfig {
                        half_copy: bits & 1 != 0,
                        alias_residual_grads: bits & 2 != 0,
                        half_concat: bits & 4 != 0,
                        attention_flash: bits & 8 != 0,
                        ..KernelConfig::default()
                    };
                    assert_eq!(symbolic(&build(tc)), want, "{precision} {n}x{h}x{w} {tc:?}");
                }
                let two_stage = KernelConfig {
                    deep: false,
                    ..KernelConfig::default()
                };
                assert_eq!(symbolic(&build(two_stage)), want);
                let mut broken = base;
                let last_add = broken
                    .steps
                    .iter()
                    .rposition(|s| {
                        matches!(
                            s,
                            Step::AddInto {
                                accumulate: true,
                                ..
                            }
                        )
                    })
                    .unwrap();
                broken.steps.remove(last_add);
                assert_ne!(symbolic(&broken).1, want.1);
            }
        }
    }

    /// prefetch_weights marks every tensor-core convolution launch and changes nothing else.
    #[test]
    fn weight_prefetch_on_every_tensor_core_convolution() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for precision in [Precision::Bf16, Precision::Fp32] {
            let build = |prefetch_weights| {
                let tc = KernelConfig {
                    wgmma: true,
                    prefetch_weights,
                    ..KernelConfig::default()
                };
                Program::build_with(&g, 1, 64, 64, true, 132, precision, tc).unwrap()
            };
            let (plain, marked) = (build(false), build(true));
            assert_eq!(plain.steps.len(), marked.steps.len());
            let mut tensor = 0;
            for (a, b) in plain.steps.iter().zip(&marked.steps) {
                match (a, b) {
                    (Step::Conv(a), Step::Conv(b)) => {
                        let tc = matches!(a.launch.kernel, ConvKernel::Tensor(_));
                        assert_eq!(b.launch.prefetch_weights, tc);
                        let unmarked = ConvLaunch {
                            prefetch_weights: false,
                            ..b.launch
                        };
                        assert_eq!(unmarked, a.launch);
                        tensor += usize::from(tc);
                    }
                    (a, b) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
                }
            }
            assert_eq!(tensor > 0, precision == Precision::Bf16);
        }
    }

    /// With alias_residual_grads no gradient starts as a copy: every residual's first
    /// contribution is its block output's gradient buffer.
    #[test]
    fn aliased_residual_gradients_leave_no_copies() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let copies = |alias: bool| {
            let tc = KernelConfig {
                alias_residual_grads: alias,
                ..KernelConfig::default()
            };
            let p = Program::build_with(&g, 1, 64, 64, true, 132, Precision::Bf16, tc).unwrap();
            let adds = |acc: bool| {
                p.steps
                    .iter()
                    .filter(|s| matches!(s, Step::AddInto { accumulate, .. } if *accumulate == acc))
                    .count()
            };
            (adds(false), adds(true))
        };
        let (plain, accumulating) = copies(false);
        // One per residual block and attention block of the architecture whose residual's
        // gradient starts there.
        assert!(plain > 20, "{plain}");
        assert_eq!(copies(true), (0, accumulating));
    }
    /// attention_tf32 and attention_flash put the attention on tf32 tensor cores below fp32,
    /// forward and backward alike, and never in fp32; fused attention, where both are asked,
    /// saves each query's log-sum-exp instead of P, and its backward reads the forward's
    /// output; heads the fused kernels cannot take keep the products.
    #[test]
    fn tensor_core_attention_only_below_fp32() {
        use AttnKernel::*;
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let mut narrow = UNetConfig::celebahq_256();
        narrow.attention_head_dim = Some(32);
        let g_narrow = Graph::build(&narrow).unwrap();
        for precision in Precision::ALL {
            for (tf32, flash) in [(false, false), (true, false), (false, true), (true, true)] {
                let tc = KernelConfig {
                    attention_tf32: tf32,
                    attention_flash: flash,
                    ..KernelConfig::default()
                };
                for (graph, fits) in [(&g, true), (&g_narrow, false)] {
                    let p =
                        Program::build_with(graph, 1, 64, 64, true, 132, precision, tc).unwrap();
                    let mut kernels = Vec::new();
                    for s in &p.steps {
                        match *s {
                            Step::Attention {
                                kernel,
                                saved,
                                tokens,
                                heads,
                                ..
                            } => {
                                assert_eq!(p.bufs[saved.0].len, heads * kernel.saved_len(tokens));
                                kernels.push(kernel);
                            }
                            Step::AttentionBackward { kernel, y, .. } => {
                                assert_eq!(y.is_some(), kernel == Flash);
                                kernels.push(kernel);
                            }
                            _ => {}
                        }
                    }
                    assert_eq!(kernels.len(), 12, "six attentions, both directions");
                    let want = match (precision, flash && fits, tf32) {
                        (Precision::Fp32, ..) => Products,
                        (_, true, _) => Flash,
                        (_, false, true) => Tf32Products,
                        (_, false, false) => Products,
                    };
                    assert!(
                        kernels.iter().all(|&k| k == want),
                        "{precision} tf32 {tf32} flash {flash} fits {fits}: {kernels:?}"
                    );
                }
            }
        }
    }
    /// tall_tiles gives 256-row tiles to the unsplit wgmma launches that fill the machine with
    /// them: the 256x256 level at batch 1, most launches at batch 8; never without wgmma.
    #[test]
    fn tall_tiles_where_they_fill_the_machine() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let tall = |n: usize, wgmma: bool| -> (usize, usize) {
            let tc = KernelConfig {
                wgmma,
                tall_tiles: true,
                ..KernelConfig::default()
            };
            let p = Program::build_with(&g, n, 256, 256, false, 132, Precision::Bf16, tc).unwrap();
            let (mut tall, mut wg) = (0, 0);
            for s in &p.steps {
                if let Step::Conv(c) = s {
                    if c.launch.wgmma {
                        wg += 1;
                    }
                    if c.launch.tile == WgmmaTile::Tall {
                        assert!(c.launch.wgmma && c.launch.splits == 1 && !c.launch.cluster);
                        assert!(c.shape.rows().div_ceil(256) * c.shape.ncols.div_ceil(128) >= 132);
                        tall += 1;
                    }
                }
            }
            (tall, wg)
        };
        let (b1, wg1) = tall(1, true);
        let (b8, wg8) = tall(8, true);
        assert!(b1 > 0 && b1 < wg1, "{b1} of {wg1}");
        assert!(b8 > b1 && b8 <= wg8, "{b8} of {wg8}");
        assert_eq!(tall(8, false).0, 0);
    }
    /// six_stages splits the wgmma launches that can run one block per multiprocessor so, and
    /// gives them the six-stage tile: at batch 1, the levels below 256x256; none of the tall
    /// or cluster ones.
    #[test]
    fn six_stages_where_blocks_are_alone() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let tc = KernelConfig {
            wgmma: true,
            tall_tiles: true,
            six_stages: true,
            cluster_split_k: true,
            ..KernelConfig::default()
        };
        let p = Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, tc).unwrap();
        let mut six = 0;
        for s in &p.steps {
            if let Step::Conv(c) = s {
                let blocks =
                    c.shape.rows().div_ceil(128) * c.shape.ncols.div_ceil(128) * c.launch.splits;
                if c.launch.tile == WgmmaTile::SixStages {
                    assert!(c.launch.wgmma && !c.launch.cluster);
                    assert!(blocks <= 132, "{blocks}");
                    six += 1;
                }
            }
        }
        assert!(six > 10, "{six}");
    }
    /// halo_tiles gives the halo tiles to the wgmma launches of the shapes they take,
    /// ahead of the tall tile: at batch 8, the 3x3 convolutions and their input gradients of
    /// the 256x256 to 64x64 levels (rows of at least 64) whose channels come in 32s; with
    /// tall_tiles too, the 256-row halo tile where those fill the machine; split ones too.
    #[test]
    fn halo_tiles_where_they_fit() {
        use crate::cuda::kernels::halo_fits;
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for tall_tiles in [false, true] {
            let tc = KernelConfig {
                wgmma: true,
                tall_tiles,
                halo_tiles: true,
                ..KernelConfig::default()
            };
            let p = Program::build_with(&g, 8, 256, 256, true, 132, Precision::Bf16, tc).unwrap();
            let (mut halo, mut tall_halo, mut widths) = (0, 0, std::collections::BTreeSet::new());
            for s in &p.steps {
                if let Step::Conv(c) = s {
                    let fits = c.launch.wgmma && !c.launch.cluster && halo_fits(&c.shape, 128);
                    assert_eq!(c.launch.tile.is_halo(), fits, "{:?}", c.shape);
                    assert!(c.launch.tile.takes(&c.shape, &c.launch));
                    if fits {
                        assert_eq!((c.shape.taps.len(), c.shape.in_stride), (9, 1));
                        widths.insert(c.shape.mw);
                        halo += 1;
                    }
                    if c.launch.tile == WgmmaTile::TallHalo {
                        let blocks = c.shape.rows().div_ceil(256) * c.shape.ncols.div_ceil(128);
                        assert!(blocks >= 132, "{blocks}");
                        tall_halo += 1;
                    }
                }
            }
            assert!(halo > 20, "{halo}");
            assert_eq!(widths.into_iter().collect::<Vec<_>>(), [64, 128, 256]);
            if tall_tiles {
                assert!(tall_halo > 20, "{tall_halo} of {halo}");
            } else {
                assert_eq!(tall_halo, 0);
            }
        }
        // At batch 1 the 128x128 and 64x64 levels split K: by whole channel slices, reduced
        // in a cluster with cluster_split_k.
        for cluster_split_k in [false, true] {
            let tc = KernelConfig {
                wgmma: true,
                halo_tiles: true,
                cluster_split_k,
                ..KernelConfig::default()
            };
            let p = Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, tc).unwrap();
            let (mut split, mut clustered) = (0, 0);
            for s in &p.steps {
                if let Step::Conv(c) = s {
                    assert!(!c.launch.wgmma || c.launch.tile.takes(&c.shape, &c.launch));
                    if c.launch.tile.is_halo() && c.launch.splits > 1 {
                        split += 1;
                        clustered += usize::from(c.launch.cluster);
                    }
                }
            }
            assert!(split > 10, "{split}");
            assert_eq!(clustered > 0, cluster_split_k, "{clustered} of {split}");
        }
    }
    /// halo_norm hands the halo convolutions the GroupNorms they read: each fused
    /// convolution reads the fp32 input and the scale and shift of a GroupNorm that writes
    /// nothing else any step reads, and the program computes what the unfused one does
    /// ([`symbolic`]); at the levels of one-pass GroupNorms nothing changes. (The fp32 input
    /// now lives until the convolution instead of its 16-bit image: the b8 forward's arena
    /// grows from 1.75 to 1.89 GB.)
    #[test]
    fn halo_norm_moves_groupnorms_into_halo_loads() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for (n, record) in [(8, false), (1, true)] {
            let build = |halo_norm: bool| {
                let tc = KernelConfig {
                    wgmma: true,
                    halo_tiles: true,
                    halo_norm,
                    gn_one_pass: true,
                    ..KernelConfig::default()
                };
                Program::build_with(&g, n, 256, 256, record, 132, Precision::Bf16, tc).unwrap()
            };
            let (plain, fused) = (build(false), build(true));
            assert_eq!(plain.steps.len(), fused.steps.len());
            assert_eq!(symbolic(&fused), symbolic(&plain));
            let mut moved = 0;
            for (a, b) in plain.steps.iter().zip(&fused.steps) {
                match (a, b) {
                    (Step::Conv(a), Step::Conv(b)) if b.norm.is_some() => {
                        assert!(b.launch.tile.is_halo() && a.launch.tile.is_halo());
                        assert_ne!(b.launch.norm_input, NormInput::None);
                        let gn = fused.steps.iter().find(|s| {
                            matches!(s, Step::GroupNorm { x, y: None, affine, .. }
                                if *x == b.x && Some(*affine) == b.norm)
                        });
                        assert!(gn.is_some(), "{:?}", b.shape);
                        moved += 1;
                    }
                    (Step::GroupNorm { split, .. }, Step::GroupNorm { y: None, .. }) => {
                        assert!(split.one_pass.is_none());
                    }
                    _ => {}
                }
            }
            assert!(moved > 10, "{moved}");
        }
    }
    /// halo_stats hands GroupNorms their partial sums from the halo convolution that wrote
    /// their input: each such GroupNorm reads the partial buffer that convolution's epilogue
    /// writes, one chunk per tile, and the program computes what the one without does
    /// ([`symbolic`]), alone and with halo_norm (a GroupNorm then runs its finalize only).
    #[test]
    fn halo_stats_take_groupnorm_sums_from_the_producer() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for (n, record, halo_norm) in [(8, false, false), (1, true, false), (8, false, true)] {
            let build = |halo_stats: bool| {
                let tc = KernelConfig {
                    wgmma: true,
                    halo_tiles: true,
                    halo_stats,
                    halo_norm,
                    ..KernelConfig::default()
                };
                Program::build_with(&g, n, 256, 256, record, 132, Precision::Bf16, tc).unwrap()
            };
            let (plain, fused) = (build(false), build(true));
            assert_eq!(symbolic(&fused), symbolic(&plain));
            let mut given = 0;
            for (i, s) in fused.steps.iter().enumerate() {
                let Step::GroupNorm {
                    x,
                    split,
                    partial,
                    hw,
                    ..
                } = s
                else {
                    continue;
                };
                if !split.from_producer {
                    continue;
                }
                let producer = fused.steps[..i].iter().rev().find(|s| s.io().1.contains(x));
                let Some(Step::Conv(c)) = producer else {
                    panic!("GroupNorm {i}: its input was not written by a convolution");
                };
                assert_eq!(c.gn_partial, Some(*partial));
                assert!(c.launch.tile.is_halo() && c.launch.splits == 1);
                assert_eq!(split.chunks * c.launch.tile.rows(), *hw);
                given += 1;
            }
            // 19 at batch 8; at batch 1 the 128x128 and 64x64 levels split K, which leaves 7.
            assert!(given >= if n == 1 { 7 } else { 19 }, "{given}");
        }
    }
    /// Reports name every choice that is on, and none that is off.
    #[test]
    fn every_choice_has_a_name() {
        assert!(KernelConfig::default().describe().is_empty());
        let flags: [fn(&mut KernelConfig); 19] = [
            |c| c.deep = false,
            |c| c.wgmma = true,
            |c| c.gn_one_pass = true,
            |c| c.gn_clusters = true,
            |c| c.half_concat = true,
            |c| c.cluster_split_k = true,
            |c| c.cluster_plan = true,
            |c| c.half_copy = true,
            |c| c.alias_residual_grads = true,
            |c| c.row_epilogue = true,
            |c| c.prefetch_weights = true,
            |c| c.attention_tf32 = true,
            |c| c.attention_flash = true,
            |c| c.tall_tiles = true,
            |c| c.six_stages = true,
            |c| c.halo_tiles = true,
            |c| c.halo_norm = true,
            |c| c.halo_stats = true,
            |c| c.batch_invariant = true,
        ];
        let mut all = KernelConfig::default();
        for set in flags {
            let mut one = KernelConfig::default();
            set(&mut one);
            assert_eq!(one.describe().len(), 1, "{one:?}");
            set(&mut all);
        }
        assert_eq!(all.describe().len(), flags.len());
    }
}
