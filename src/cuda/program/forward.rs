//! The forward pass: one graph op at a time into steps.

use super::{Buf, Lowering, Step, WKind, W};
use crate::model::graph::{Op, Space};
use crate::{Error, Result};

impl Lowering<'_> {
    pub(super) fn forward_op(
        &mut self,
        i: usize,
        op: &Op,
        timesteps: Buf,
        record: bool,
    ) -> Result<()> {
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
}
