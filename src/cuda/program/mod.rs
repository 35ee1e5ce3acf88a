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
//!
//! This module holds what a program is ([`Step`], [`Program`]); `kernel_config` which kernels
//! its steps run, `lower` the lowering's state and the planning both passes share, `forward`
//! and `backward` one graph op at a time each way.

use super::kernels::{ConvLaunch, ConvShape, GradSides, NormSplit, Side16, Silu};
use super::precision::Precision;
use super::unet::AttnKernel;
use crate::model::graph::Graph;
use crate::{Error, Result};

mod backward;
mod forward;
mod kernel_config;
mod lower;
#[cfg(test)]
mod tests;

pub(crate) use kernel_config::{
    AttentionRows, HalfGrads, KernelConfig, FOLD_MIN_ROWS, HALF_COPY_MIN, STAGED_UNSPLIT_MAX_K,
};
use lower::Lowering;

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
    /// The 16 folded taps of a 3x3 convolution after an upsampling, `[(tap, ci), co]`
    /// ([`KernelConfig::upsample_fold`]).
    FoldForward,
    /// The same, `[(tap, co), ci]`, for the input gradient.
    FoldBackward,
    /// Linear weights `[inp, out]` (Wᵀ), for the forward product.
    LinearT,
    /// Linear weights `[out, inp]` (PyTorch's layout).
    Linear,
    /// Bias of a convolution or linear layer.
    Bias,
    /// Bias of a residual block's second convolution plus that of its 1x1 shortcut, for the
    /// launch that fuses the two ([`ConvStep::shortcut`]).
    BiasWithShortcut,
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
            WKind::FoldForward => WKind::FoldBackward,
            WKind::FoldBackward => WKind::FoldForward,
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
        /// `x` holds 16-bit values in this precision: a concatenation written in 16 bits only
        /// ([`KernelConfig::half_gn_inputs`]).
        x_half: Option<Precision>,
        y: Buf,
        gamma: W,
        beta: W,
        hw: usize,
        c: usize,
        groups: usize,
        split: NormSplit,
        eps: f32,
        /// The SiLU after it ([`KernelConfig::approx_silu`] picks the approximate one).
        silu: Silu,
        partial: Buf,
        stats: Buf,
        affine: Buf,
        /// `y` holds 16-bit values in this precision (it only feeds tensor-core convolutions).
        half_out: Option<Precision>,
    },
    GroupNormBackward {
        x: Buf,
        /// `x` holds 16-bit values in this precision: a concatenation the recording forward
        /// wrote in 16 bits only ([`KernelConfig::half_gn_inputs_recording`]).
        x_half: Option<Precision>,
        dy: Buf,
        /// `dy` holds 16-bit values in this precision: the copy that the launch writing the
        /// gradient wrote instead of its fp32 values ([`KernelConfig::half_norm_grads`]).
        dy_half: Option<Precision>,
        dx: Buf,
        gamma: W,
        beta: W,
        hw: usize,
        c: usize,
        groups: usize,
        split: NormSplit,
        silu: Silu,
        stats: Buf,
        partial: Buf,
        means: Buf,
        accumulate: bool,
        /// Accumulating: a second gradient added onto `dx` before this pass's values, a
        /// residual's ([`KernelConfig::fold_residual_grads`]).
        add: Option<Buf>,
        /// `dx` holds 16-bit values in this precision (only a tensor-core input gradient reads
        /// it; never accumulating).
        half_out: Option<Precision>,
        /// With an fp32 `dx`: a 16-bit copy of the new `dx` in this precision, for the
        /// tensor-core convolutions that read `dx` once this step has written it
        /// ([`KernelConfig::fused_half_copies`]).
        dx16: Option<(Buf, Precision)>,
        /// The new `dx` goes to the two sides of the concatenation whose gradient it is, each
        /// with the 16-bit copy its adjoint step would have written, and `dx` is only read,
        /// where accumulating ([`KernelConfig::concat_grad_split`]).
        sides: Option<GradSides<Buf>>,
    },
    Attention {
        qkv: Buf,
        y: Buf,
        /// What the backward pass reads ([`AttnKernel::saved_len`]).
        saved: Buf,
        /// Whether a backward pass reads `saved` (a recording forward); the rows kernels
        /// write it only then.
        saves: bool,
        /// The forward's own scratch ([`AttnKernel::forward_scratch_len`]), where it has any.
        scratch: Option<Buf>,
        /// `y` in 16 bits for the tensor-core launch that reads it, written by the rows
        /// kernels ([`KernelConfig::fused_half_copies`]).
        y16: Option<(Buf, Precision)>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        kernel: AttnKernel,
        /// Its products' kernels chosen for one image ([`KernelConfig::batch_invariant`]).
        per_image: bool,
    },
    AttentionBackward {
        qkv: Buf,
        saved: Buf,
        /// The forward's output, which the fused and the rows kernels read.
        y: Option<Buf>,
        dy: Buf,
        dqkv: Buf,
        /// `dqkv` in 16 bits, as for [`Step::Attention`]'s `y16`.
        dqkv16: Option<(Buf, Precision)>,
        scratch: Buf,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        accumulate: bool,
        kernel: AttnKernel,
        /// As for [`Step::Attention`].
        per_image: bool,
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
        /// The partial sums of the GroupNorm that reads `y`, and that GroupNorm's split, which
        /// this step then writes too ([`KernelConfig::gn_producer_sums`]).
        sums: Option<(Buf, NormSplit)>,
        /// `y` holds 16-bit values in this precision, and no fp32 ones: every reader takes
        /// them ([`KernelConfig::half_gn_inputs`]; then no `y16`, and `sums` are over the
        /// rounded values).
        half_out: Option<Precision>,
        /// Per side (`a`, `b`): already in `y`, written by the launches that produced it
        /// ([`ConvStep::side16`], [`KernelConfig::concat_from_producers`]); the step neither
        /// reads that side's fp32 values nor writes its 16-bit ones, only reads those back for
        /// `sums` (with both sides placed and no sums, the lowering drops the step).
        placed: [bool; 2],
    },
    ConcatBackward {
        dy: Buf,
        d: Buf,
        /// A 16-bit copy of the new `d` in this precision, for the tensor-core convolutions
        /// that read `d` once this step has written it ([`KernelConfig::fused_half_copies`]).
        d16: Option<(Buf, Precision)>,
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
    /// Where the epilogue also writes the partial sums of the GroupNorm that reads `y`
    /// ([`KernelConfig::gn_producer_sums`]).
    pub gn_partial: Option<Buf>,
    /// The residual block's 1x1 shortcut, fused into this launch as more K
    /// ([`KernelConfig::shortcut_fused`], [`ConvShape::shortcut_sc`]).
    pub shortcut: Option<FusedShortcut>,
    /// A side of a 16-bit concatenation that the staged epilogue writes too
    /// ([`KernelConfig::concat_from_producers`]).
    pub side16: Option<Side16<Buf>>,
    /// A 16-bit copy of `y` that the staged epilogue writes too, for the tensor-core launches
    /// that read `y` ([`KernelConfig::epilogue_half_copies`]).
    pub copy16: Option<Buf>,
    /// Whether the launch writes `y` at all: not where only its 16-bit outputs (or its
    /// GroupNorm's) are read (`y`'s buffer then keeps one element).
    pub fp32_out: bool,
    /// The one-pass [`Step::GroupNorm`] of `y` that this split launch's reduction computes too,
    /// in place of the step ([`KernelConfig::gn_from_reduction`]).
    pub norm: Option<Box<Step>>,
}

/// A 1x1 shortcut fused into its block's second convolution: its input, in 16 bits, and its
/// forward weights (read K-major, as every wgmma launch reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FusedShortcut {
    pub x: Buf,
    pub w: W,
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
                    .chain(c.shortcut.map(|f| f.x))
                    .chain(c.temb)
                    .chain(c.residual)
                    .chain(acc(c.y, c.accumulate))
                    .collect(),
                c.fp32_out
                    .then_some(c.y)
                    .into_iter()
                    .chain(c.side16.map(|o| o.buf))
                    .chain(c.copy16)
                    .chain(c.workspace)
                    .chain(c.gn_partial)
                    .chain(c.norm.iter().flat_map(|s| s.io().1))
                    .collect(),
            ),
            // In one launch (`gn_one_pass`): no partial sums and no affine.
            GroupNorm {
                x, y, split, stats, ..
            } if split.one_pass.is_some() => (vec![*x], vec![*y, *stats]),
            // With its partial sums from the step that wrote `x`: those read.
            GroupNorm {
                x,
                y,
                partial,
                stats,
                affine,
                split,
                ..
            } if split.from_producer => (vec![*x, *partial], vec![*y, *stats, *affine]),
            GroupNorm {
                x,
                y,
                partial,
                stats,
                affine,
                ..
            } => (vec![*x], vec![*y, *partial, *stats, *affine]),
            GroupNormBackward {
                x,
                dy,
                dx,
                stats,
                split,
                accumulate,
                add,
                dx16,
                ..
            } if split.one_pass.is_some() => (
                [*x, *dy, *stats]
                    .into_iter()
                    .chain(acc(*dx, *accumulate))
                    .chain(*add)
                    .collect(),
                std::iter::once(*dx).chain(dx16.map(|(b, _)| b)).collect(),
            ),
            // With the concatenation's sides, those written instead of `dx`.
            GroupNormBackward {
                x,
                dy,
                dx,
                stats,
                partial,
                means,
                accumulate,
                add,
                dx16,
                sides,
                ..
            } => (
                [*x, *dy, *stats]
                    .into_iter()
                    .chain(acc(*dx, *accumulate))
                    .chain(*add)
                    .collect(),
                sides
                    .is_none()
                    .then_some(*dx)
                    .into_iter()
                    .chain([*partial, *means])
                    .chain(dx16.map(|(b, _)| b))
                    .chain(sides.iter().flat_map(GradSides::written))
                    .collect(),
            ),
            Attention {
                qkv,
                y,
                saved,
                scratch,
                y16,
                ..
            } => (
                vec![*qkv],
                [*y, *saved]
                    .into_iter()
                    .chain(*scratch)
                    .chain(y16.map(|(b, _)| b))
                    .collect(),
            ),
            AttentionBackward {
                qkv,
                saved,
                y,
                dy,
                dqkv,
                dqkv16,
                scratch,
                accumulate,
                ..
            } => (
                [*qkv, *saved, *dy]
                    .into_iter()
                    .chain(*y)
                    .chain(acc(*dqkv, *accumulate))
                    .collect(),
                [*dqkv, *scratch]
                    .into_iter()
                    .chain(dqkv16.map(|(b, _)| b))
                    .collect(),
            ),
            Upsample { x, y, .. } => (vec![*x], vec![*y]),
            UpsampleBackward {
                dy, dx, accumulate, ..
            } => (
                std::iter::once(*dy).chain(acc(*dx, *accumulate)).collect(),
                vec![*dx],
            ),
            // A side placed by its producers is read back from `y`, for the sums.
            Concat {
                a,
                b,
                y,
                y16,
                sums,
                placed,
                ..
            } => (
                [(*a, placed[0]), (*b, placed[1])]
                    .into_iter()
                    .map(|(side, placed)| if placed { *y } else { side })
                    .collect(),
                std::iter::once(*y)
                    .chain(y16.map(|(b, _)| b))
                    .chain(sums.map(|(b, _)| b))
                    .collect(),
            ),
            ConcatBackward {
                dy,
                d,
                d16,
                accumulate,
                ..
            } => (
                std::iter::once(*dy).chain(acc(*d, *accumulate)).collect(),
                std::iter::once(*d).chain(d16.map(|(b, _)| b)).collect(),
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
            Conv(c) => std::iter::once(c.w)
                .chain(c.bias)
                .chain(c.shortcut.map(|f| f.w))
                .chain(c.norm.iter().flat_map(|s| s.weights()))
                .collect(),
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
    /// With [`KernelConfig::half_gn_inputs`], in a forward that records nothing (and with
    /// [`KernelConfig::half_gn_inputs_recording`] in a recording one, whose GroupNorm backward
    /// passes then read them so), concatenations whose readers are their GroupNorm and such
    /// launches are stored in 16 bits too; the GroupNorm then works from the rounded values,
    /// which does change its result.
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
        let mut l = Lowering::new(g, n, h, w, sms, precision, choice)?;
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
        if let Some(i) = l.pending_shortcut {
            return Err(Error::Cuda(format!(
                "internal: shortcut op {i} was never lowered"
            )));
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
        if choice.gn_producer_sums {
            l.norm_sums_from_producers();
        }
        l.drop_placed_concats();
        if choice.gn_from_reduction {
            l.norms_from_reductions();
        }
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
            if choice.concat_grad_split {
                l.concat_grads_from_norms(forward_steps);
            }
            if choice.fold_residual_grads {
                l.fold_residual_adds(forward_steps);
            }
        }
        l.drop_unread_outputs();
        // The epilogue prefetch ([`KernelConfig::epilogue_prefetch`]) where the epilogue reads
        // something besides the bias and time embedding, which the lowering attaches after
        // planning the launch.
        for s in &mut l.steps {
            if let Step::Conv(c) = s {
                let reads = c.residual.is_some() || c.accumulate;
                c.launch.prefetch = choice.epilogue_prefetch
                    && c.launch.lean_loads
                    && c.launch.splits == 1
                    && reads;
            }
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

    /// f32 elements each buffer takes in the arena (every buffer of more than one element is
    /// named by a step: `every_buffer_with_room_is_used`).
    pub fn arena_lens(&self) -> Vec<usize> {
        self.bufs.iter().map(|b| b.len).collect()
    }

    /// Length of a host-visible slot, in f32 elements.
    pub fn len(&self, b: Buf) -> usize {
        self.bufs[b.0].len
    }
}
