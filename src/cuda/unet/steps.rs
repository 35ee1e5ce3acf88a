//! One step of a program to its kernel launches: the dispatcher both the captured graphs and
//! the profiler run.

use cudarc::driver::CudaStream;

use super::{attention_backward, attention_forward, Attn, ShapePlan};
use crate::cuda::kernels::{
    ConvPtrs, Kernels, NormBackwardIn, NormBackwardOut, NormDims, NormSplit, ReductionNorm, Side16,
};
use crate::cuda::program::{Buf, Step};
use crate::cuda::streams::{PassSchedule, SideStreams};
use crate::cuda::weights::DevWeights;
use crate::{Error, Result};

/// Launches `steps` of `plan` in order on `st`, or, with `lanes`, spread over the side
/// streams as their schedule says.
pub(super) fn launch_all(
    k: &Kernels,
    st: &CudaStream,
    wts: &DevWeights,
    plan: &ShapePlan,
    steps: &[Step],
    lanes: Option<(&SideStreams, &PassSchedule)>,
) -> Result<()> {
    match lanes {
        Some((side, schedule)) => {
            schedule.run(st, side, |i, on| launch(k, on, wts, plan, &steps[i]))
        }
        None => steps.iter().try_for_each(|s| launch(k, st, wts, plan, s)),
    }
}

/// The addresses of the one-pass GroupNorm a split launch's reduction computes too
/// ([`ConvStep::norm`](crate::cuda::program::ConvStep)).
fn reduction_norm(step: &Step, p: &impl Fn(Buf) -> u64, wts: &DevWeights) -> Result<ReductionNorm> {
    let Step::GroupNorm {
        y,
        gamma,
        beta,
        groups,
        eps,
        silu,
        stats,
        half_out,
        x_half: None,
        split: NormSplit {
            one_pass: Some(one_pass_threads),
            ..
        },
        ..
    } = *step
    else {
        return Err(Error::Cuda(format!(
            "internal: a reduction given {step:?} as its GroupNorm (one pass over fp32 values \
             expected)"
        )));
    };
    Ok(ReductionNorm {
        gamma: wts.ptr(gamma)?,
        beta: wts.ptr(beta)?,
        y: p(y),
        half_out,
        stats: p(stats),
        groups,
        eps,
        silu,
        one_pass_threads,
    })
}

pub(super) fn launch(
    k: &Kernels,
    st: &CudaStream,
    wts: &DevWeights,
    plan: &ShapePlan,
    step: &Step,
) -> Result<()> {
    let p = |b: Buf| plan.ptr(b);
    let opt = |b: Option<Buf>| b.map_or(0, p);
    let (n, h, w) = (plan.program.n, plan.program.h, plan.program.w);
    match *step {
        Step::ToNhwc {
            src,
            dst,
            c,
            mul,
            add,
        } => k.to_nhwc(st, p(src), p(dst), n, c, h, w, mul, add),
        Step::ToNchw { src, dst, c, mul } => k.to_nchw(st, p(src), p(dst), n, c, h, w, mul),
        Step::TimeEmbedding {
            t,
            y,
            dim,
            flip,
            shift,
        } => k.timestep_embedding(st, p(t), p(y), n, dim, flip, shift),
        Step::LinearRows {
            x,
            y,
            w: wt,
            b,
            inp,
            out,
            silu_in,
            residual,
            out_div,
        } => k.linear_rows(
            st,
            p(x),
            wts.ptr(wt)?,
            wts.ptr(b)?,
            opt(residual),
            p(y),
            n,
            inp,
            out,
            silu_in,
            out_div,
        ),
        Step::LinearBatch {
            x,
            inp,
            silu_in,
            out_div,
            ref layers,
            table,
        } => k.linear_batch(
            st,
            p(x),
            p(table),
            layers.len(),
            layers.iter().map(|l| l.out).sum(),
            n,
            inp,
            silu_in,
            out_div,
        ),
        Step::Conv(ref c) => {
            let ptrs = ConvPtrs {
                x: p(c.x),
                w: wts.conv_ptr(c.w, &c.launch)?,
                y: if c.fp32_out { p(c.y) } else { 0 },
                bias: c.bias.map(|b| wts.ptr(b)).transpose()?.unwrap_or(0),
                temb: opt(c.temb),
                res: opt(c.residual),
                ws: opt(c.workspace),
                gn_partial: opt(c.gn_partial),
                y16: c.side16.map_or(Side16::default(), |o| o.map(p)),
                copy16: opt(c.copy16),
                x2: opt(c.shortcut.map(|f| f.x)),
                w2: c
                    .shortcut
                    .map(|f| wts.conv_ptr(f.w, &c.launch))
                    .transpose()?
                    .unwrap_or(0),
                norm: c
                    .norm
                    .as_deref()
                    .map(|s| reduction_norm(s, &p, wts))
                    .transpose()?,
            };
            k.conv(st, &c.shape, &c.launch, ptrs, c.out_div, c.accumulate)
        }
        Step::GroupNorm {
            x,
            x_half,
            y,
            gamma,
            beta,
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
        } => k.group_norm(
            st,
            NormDims {
                n,
                hw,
                c,
                groups,
                split,
            },
            p(x),
            x_half,
            wts.ptr(gamma)?,
            wts.ptr(beta)?,
            p(y),
            p(partial),
            p(stats),
            p(affine),
            eps,
            silu,
            half_out,
        ),
        Step::GroupNormBackward {
            x,
            x_half,
            dy,
            dy_half,
            dx,
            gamma,
            beta,
            hw,
            c,
            groups,
            split,
            silu,
            stats,
            partial,
            means,
            accumulate,
            add,
            half_out,
            dx16,
            sides,
        } => k.group_norm_backward(
            st,
            NormDims {
                n,
                hw,
                c,
                groups,
                split,
            },
            NormBackwardIn {
                x: p(x),
                x_half,
                dy: p(dy),
                dy_half,
                gamma: wts.ptr(gamma)?,
                beta: wts.ptr(beta)?,
                stats: p(stats),
                silu,
            },
            NormBackwardOut {
                partial: p(partial),
                means: p(means),
                dx: p(dx),
                accumulate,
                add: add.map(p),
                half_out,
                copy: dx16.map(|(b, precision)| (p(b), precision)),
                sides: sides.map(|g| g.map(p)),
                ..NormBackwardOut::default()
            },
        ),
        Step::Attention {
            qkv,
            y,
            saved,
            saves,
            scratch,
            y16,
            tokens,
            heads,
            head_dim,
            kernel,
            per_image,
        } => attention_forward(
            k,
            st,
            Attn {
                n,
                tokens,
                heads,
                head_dim,
                kernel,
                per_image,
            },
            p(qkv),
            p(saved),
            saves,
            opt(scratch),
            p(y),
            y16.map(|(b, precision)| (p(b), precision)),
        ),
        Step::AttentionBackward {
            qkv,
            saved,
            y,
            dy,
            dqkv,
            dqkv16,
            scratch,
            tokens,
            heads,
            head_dim,
            accumulate,
            kernel,
            per_image,
        } => attention_backward(
            k,
            st,
            Attn {
                n,
                tokens,
                heads,
                head_dim,
                kernel,
                per_image,
            },
            p(qkv),
            p(saved),
            opt(y),
            p(dy),
            p(dqkv),
            dqkv16.map(|(b, precision)| (p(b), precision)),
            p(scratch),
            accumulate,
        ),
        Step::Upsample {
            x,
            y,
            h,
            w,
            c,
            half_out,
        } => k.upsample(st, p(x), p(y), n, h, w, c, half_out),
        Step::UpsampleBackward {
            dy,
            dx,
            h,
            w,
            c,
            accumulate,
        } => k.upsample_backward(st, p(dy), p(dx), n, h, w, c, accumulate),
        Step::Concat {
            a,
            b,
            y,
            y16,
            pixels,
            ca,
            cb,
            sums,
            half_out,
            placed,
        } => {
            // The launchers take a concatenation in 16 bits only as a 16-bit copy with no fp32
            // output (the lowering gives such a step no copy of its own), and a side its
            // producers placed as an input of 0.
            debug_assert!(half_out.is_none() || y16.is_none());
            let (y, half) = match half_out {
                Some(precision) => (0, Some((p(y), precision))),
                None => (p(y), y16.map(|(b, precision)| (p(b), precision))),
            };
            let side = |b: Buf, placed: bool| if placed { 0 } else { p(b) };
            let (a, b) = (side(a, placed[0]), side(b, placed[1]));
            match sums {
                Some((partial, split)) => k.concat_with_norm_sums(
                    st,
                    a,
                    b,
                    y,
                    half,
                    n,
                    pixels / n,
                    (ca, cb),
                    split,
                    p(partial),
                ),
                None => k.concat(st, a, b, y, half, pixels, ca, cb),
            }
        }
        Step::ConcatBackward {
            dy,
            d,
            d16,
            pixels,
            c,
            offset,
            width,
            accumulate,
        } => k.concat_backward(
            st,
            p(dy),
            p(d),
            d16.map(|(b, precision)| (p(b), precision)),
            pixels,
            c,
            offset,
            width,
            accumulate,
        ),
        Step::AddInto {
            dst,
            src,
            len,
            accumulate,
        } => k.add_into(st, p(dst), p(src), len, accumulate),
        Step::Divide { x, len, div } => k.divide(st, p(x), len, div),
        Step::ToHalf {
            x,
            y,
            len,
            precision,
        } => k.convert_half(st, p(x), p(y), len, precision),
    }
}
