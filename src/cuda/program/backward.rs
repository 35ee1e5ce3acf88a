//! The backward pass (recording mode): the graph's ops in reverse into input-gradient steps,
//! the first contribution to a gradient overwriting it and later ones adding.

#[cfg(doc)]
use super::KernelConfig;
use super::{Buf, HalfGrads, Lowering, Step, WKind, W};
use crate::cuda::kernels::ConvShape;
use crate::cuda::unet::AttnKernel;
use crate::model::graph::{Op, Space, Tid};
use crate::{Error, Result};

impl Lowering<'_> {
    pub(super) fn backward_op(&mut self, i: usize, op: &Op, dy: Buf) -> Result<()> {
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
                // Folded after an upsampling: the gradient of the upsampling's input directly,
                // in two launches that add up.
                let (x, shapes, kind) = match self.folded[x] {
                    Some(src) => {
                        let (h, w) = self.hw(src);
                        let (cin, cout) = (self.ch(src), self.ch(y));
                        let shapes = ConvShape::upsampled_backward(self.n, h, w, cin, cout);
                        (src, shapes, WKind::FoldBackward)
                    }
                    None => {
                        let shapes = self.conv_backward_shapes(x, y, kernel, stride, pad);
                        (x, shapes, WKind::ConvBackward)
                    }
                };
                if on_path(x) {
                    let (gx, acc) = self.grad_slot(x);
                    let (src, half_input) = self.grad_input(y, dy, &shapes);
                    // Stride-2 classes write disjoint pixels; the folded launches the same ones.
                    let adds = kind == WKind::FoldBackward;
                    for (j, shape) in shapes.into_iter().enumerate() {
                        let mut s = self.conv_step(shape, src, W { pid: p, kind }, gx, half_input);
                        s.accumulate = acc || (adds && j > 0);
                        self.steps.push(Step::Conv(s));
                    }
                }
                if let Some(r) = residual.filter(|&r| on_path(r)) {
                    self.residual_grad(r, dy);
                }
            }
            Op::GroupNorm {
                x,
                y,
                p,
                groups,
                silu,
                ..
            } => {
                let stats = self.aux[i].ok_or_else(|| aux("GroupNorm statistics"))?;
                let (h, w) = self.hw(x);
                let (hw, c) = (h * w, self.ch(x));
                let split = self.norm_split(hw, c, groups);
                let xb = self.val(x)?;
                let x_half = self.half[x].then_some(self.precision);
                let half_dy = match self.choice.half_norm_grads {
                    HalfGrads::Off => false,
                    HalfGrads::OverHalfInputs => x_half.is_some(),
                    HalfGrads::Everywhere => true,
                };
                let dy16 = if half_dy && self.precision.is_half() && split.ilp {
                    let name = format!("d {} (16-bit copy)", g.tensors[y].name);
                    self.half_copy_by_writer(dy, self.numel(x), &name)
                } else {
                    None
                };
                let (dy, dy_half) = match dy16 {
                    Some(copy) => (copy, Some(self.precision)),
                    None => (dy, None),
                };
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
                    split.scratch_len(split.partial_len(self.n, c)),
                    "GroupNorm backward partial sums",
                );
                let means = self.buf(
                    split.scratch_len(2 * self.n * groups),
                    "GroupNorm backward means",
                );
                self.steps.push(Step::GroupNormBackward {
                    x: xb,
                    x_half,
                    dy,
                    dy_half,
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
                    silu: self.silu(silu),
                    stats,
                    partial,
                    means,
                    accumulate: acc,
                    add: None,
                    half_out,
                    dx16: None,
                    sides: None,
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
                let kernel = self.attention_kernel(tokens, heads, head_dim);
                let yb = match kernel {
                    AttnKernel::Flash | AttnKernel::Rows => Some(self.val(y)?),
                    AttnKernel::Products | AttnKernel::Tf32Products => None,
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
                    dqkv16: None,
                    scratch,
                    tokens,
                    heads,
                    head_dim,
                    accumulate: acc,
                    kernel,
                    per_image: self.choice.batch_invariant,
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
                            d16: None,
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

/// What only the backward pass asks of the lowering.
impl Lowering<'_> {
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
}
