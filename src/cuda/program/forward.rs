//! The forward pass: one graph op at a time into steps.

#[cfg(doc)]
use super::KernelConfig;
use super::{Buf, FusedShortcut, Lowering, Side16, Step, WKind, W};
use crate::cuda::kernels::ConvShape;
use crate::cuda::precision::Precision;
use crate::cuda::unet::AttnKernel;
use crate::model::graph::{Op, Space, Tid};
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
            Op::Conv { .. } => {
                // A 1x1 shortcut waits for its block's second convolution, which may take it
                // in ([`KernelConfig::shortcut_fused`]); else it is lowered just before it,
                // where it would have been anyway (the op before it).
                if self.shortcut_to_fuse(i) {
                    self.pending_shortcut = Some(i);
                    return Ok(());
                }
                let mut fused = None;
                if let Some(j) = self.pending_shortcut.take() {
                    fused = self.fusion(op, &g.ops[j])?;
                    if fused.is_none() {
                        self.conv_forward(&g.ops[j], None)?;
                    }
                }
                self.conv_forward(op, fused)?;
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
                let x_half = self.half[x].then_some(self.precision);
                let (yb, half_out) = self.output_value(y);
                let partial = self.buf(
                    split.scratch_len(split.partial_len(self.n, c)),
                    "GroupNorm partial sums",
                );
                let stats = self.buf(2 * self.n * groups, "GroupNorm statistics");
                let affine = self.buf(split.scratch_len(2 * self.n * c), "GroupNorm affine");
                if keep {
                    self.aux[i] = Some(stats);
                }
                self.steps.push(Step::GroupNorm {
                    x: xb,
                    x_half,
                    y: yb,
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
                    silu: self.silu(silu),
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
                let kernel = self.attention_kernel(tokens, heads, head_dim);
                // The rows kernels write P only for a backward pass to read.
                let saved_len = match kernel {
                    AttnKernel::Rows if !keep => 0,
                    _ => self.n * heads * kernel.saved_len(tokens),
                };
                let saved = self.buf(saved_len, "attention probabilities or log-sum-exps");
                if keep {
                    self.aux[i] = Some(saved);
                }
                let scratch_len = kernel.forward_scratch_len(tokens, head_dim);
                let scratch = (scratch_len > 0)
                    .then(|| self.buf(self.n * heads * scratch_len, "attention splits"));
                self.steps.push(Step::Attention {
                    qkv: qb,
                    y: yb,
                    saved,
                    saves: keep,
                    scratch,
                    y16: None,
                    tokens,
                    heads,
                    head_dim,
                    kernel,
                    per_image: self.choice.batch_invariant,
                });
            }
            // Folded into the convolution that reads it: no step.
            Op::Upsample { y, .. } if self.folded[y].is_some() => {}
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
                // Stored in 16 bits only where every reader takes it so
                // (KernelConfig::half_gn_inputs): then no copy beside.
                if self.half_concat_fits(y, record)? {
                    self.half[y] = true;
                }
                let (yb, half_out) = self.output_value(y);
                let y16 = if half_out.is_none() && self.wants_copy16(y)? {
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
                let (ca, cb) = (self.ch(a), self.ch(b));
                let placed = match half_out {
                    Some(_) if self.choice.concat_from_producers => [
                        self.place_side(a, yb, 0, ca + cb),
                        self.place_side(b, yb, ca, ca + cb),
                    ],
                    _ => [false; 2],
                };
                self.steps.push(Step::Concat {
                    a: ab,
                    b: bb,
                    y: yb,
                    y16,
                    pixels: self.n * h * w,
                    ca,
                    cb,
                    sums: None,
                    half_out,
                    placed,
                });
            }
        }
        Ok(())
    }
}

/// What only the forward pass asks of the lowering.
impl Lowering<'_> {
    /// Lowers convolution `op`: one launch, or one per parity class of the output pixel where
    /// an upsampling is folded into it; with `fused` ([`fusion`](Self::fusion)), the one launch
    /// of that summed problem with its shortcut, whose output it no longer reads as its
    /// residual, and the two biases summed.
    fn conv_forward(&mut self, op: &Op, fused: Option<(ConvShape, FusedShortcut)>) -> Result<()> {
        let Op::Conv {
            x,
            y,
            p,
            temb,
            residual,
            out_div,
            ..
        } = *op
        else {
            return Err(Error::Cuda(format!(
                "internal: {op:?} lowered as a convolution"
            )));
        };
        // Folded after an upsampling: one launch per parity class of the output pixel, from
        // the upsampling's input (in 16 bits below fp32 and tf32).
        let (shapes, xb, half_input, kind) = match self.folded[x] {
            Some(src) => {
                let (h, w) = self.hw(src);
                let shapes = ConvShape::upsampled_forward(self.n, h, w, self.ch(src), self.ch(y));
                let half = self.precision.is_half();
                let xb = if half {
                    self.sixteen_bit(src)?
                } else {
                    self.val(src)?
                };
                (shapes, xb, half, WKind::FoldForward)
            }
            None => {
                let shape = match &fused {
                    Some((shape, _)) => shape.clone(),
                    None => self.gemm_shape(op)?.expect("a convolution"),
                };
                let (xb, half_input) = self.main_input(op, x)?;
                (vec![shape], xb, half_input, WKind::ConvForward)
            }
        };
        let tb = temb.map(|t| self.val(t)).transpose()?;
        let rb = match fused {
            Some(_) => None,
            None => residual.map(|r| self.val(r)).transpose()?,
        };
        let bias = match fused {
            Some(_) => WKind::BiasWithShortcut,
            None => WKind::Bias,
        };
        let yb = self.new_value(y);
        for shape in shapes {
            let mut s = self.conv_step(shape, xb, W { pid: p, kind }, yb, half_input);
            s.bias = Some(W { pid: p, kind: bias });
            s.temb = tb;
            s.residual = rb;
            s.out_div = out_div;
            s.shortcut = fused.as_ref().map(|f| f.1);
            self.steps.push(Step::Conv(s));
        }
        Ok(())
    }

    /// Whether op `i` is a 1x1 shortcut that [`KernelConfig::shortcut_fused`] may fuse into the
    /// op after it: a 1x1 convolution with nothing in its epilogue but its bias, read only by
    /// the next op, a 3x3 convolution at stride 1 (not folded after an upsampling), as its
    /// residual; in bf16/fp16 on the deep pipelines and wgmma. Whether it is fused is decided
    /// there ([`fusion`](Self::fusion)).
    fn shortcut_to_fuse(&self, i: usize) -> bool {
        let c = self.choice;
        if !(c.shortcut_fused && c.wgmma && c.deep && self.precision.is_half()) {
            return false;
        }
        let g = self.g;
        let (
            Some(&Op::Conv {
                y,
                kernel: 1,
                stride: 1,
                temb: None,
                residual: None,
                out_div,
                ..
            }),
            Some(&Op::Conv {
                x,
                kernel: 3,
                stride: 1,
                residual: Some(r),
                ..
            }),
        ) = (g.ops.get(i), g.ops.get(i + 1))
        else {
            return false;
        };
        let readers = g.ops.iter().filter(|o| o.inputs().contains(&y)).count();
        out_div == 1.0 && r == y && y != g.output && readers == 1 && self.folded[x].is_none()
    }

    /// Whether convolution `op` can take in shortcut `sc` (the op [`shortcut_to_fuse`] held
    /// back): the summed problem ([`ConvShape::with_shortcut`]) and the shortcut's input and
    /// weights, where that input comes in 16 bits and the launch takes the lean or TMA wgmma
    /// kernels. Deciding may lower the 16-bit copies of the two inputs, which the unfused
    /// launches then read.
    ///
    /// [`shortcut_to_fuse`]: Self::shortcut_to_fuse
    fn fusion(&mut self, op: &Op, sc: &Op) -> Result<Option<(ConvShape, FusedShortcut)>> {
        let (&Op::Conv { x, .. }, &Op::Conv { x: x2, p: p2, .. }) = (op, sc) else {
            return Ok(None);
        };
        let Some(shape) = self
            .gemm_shape(op)?
            .and_then(|s| s.with_shortcut(self.ch(x2)))
        else {
            return Ok(None);
        };
        let (x2b, half2) = self.main_input(sc, x2)?;
        let (_, half_input) = self.main_input(op, x)?;
        if !(half2 && half_input && self.plan_step(&shape, half_input).lean_loads) {
            return Ok(None);
        }
        let w = W {
            pid: p2,
            kind: WKind::ConvForward,
        };
        Ok(Some((shape, FusedShortcut { x: x2b, w })))
    }

    /// The buffer of a value that may be stored in 16 bits (GroupNorm, upsampling and, with
    /// [`KernelConfig::half_gn_inputs`], concatenation outputs), and that precision when it is.
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

    /// Has the launches that wrote value `t` also write it into the 16-bit concatenation
    /// buffer `yb` (`width` channels) at channel `offset`, where they can
    /// ([`KernelConfig::concat_from_producers`]): every step that wrote `t` a launch with a
    /// staged epilogue that overwrote its share (one launch, or an upsampling's folded
    /// classes, whose pixels add up to the whole). Whether they do.
    fn place_side(&mut self, t: Tid, yb: Buf, offset: usize, width: usize) -> bool {
        let Some(tb) = self.value[t] else {
            return false;
        };
        let c = self.ch(t);
        let writers: Vec<usize> = (0..self.steps.len())
            .filter(|&i| self.steps[i].io().1.contains(&tb))
            .collect();
        let mut rows = 0;
        for &i in &writers {
            let Step::Conv(s) = &self.steps[i] else {
                return false;
            };
            if !(s.y == tb
                && s.launch.staged_epilogue
                && !s.accumulate
                && s.side16.is_none()
                && s.shape.ncols == c)
            {
                return false;
            }
            rows += s.shape.rows();
        }
        let (h, w) = self.hw(t);
        // (The epilogue stores four channels at once: the side's place in whole fours.)
        let fours = offset % 4 == 0 && c % 4 == 0 && width % 4 == 0;
        if writers.is_empty() || rows != self.n * h * w || !fours {
            return false;
        }
        for &i in &writers {
            if let Step::Conv(s) = &mut self.steps[i] {
                s.side16 = Some(Side16 {
                    buf: yb,
                    offset,
                    width,
                });
            }
        }
        true
    }

    /// Whether concatenation output `y` may be stored in 16 bits only
    /// ([`KernelConfig::half_gn_inputs`]): bf16/fp16 with the deep pipelines and the 16-bit
    /// copies its tensor-core readers read ([`KernelConfig::half_concat`]), and every reader a
    /// 16-bit GroupNorm or launch ([`read_in_16_bits`](Self::read_in_16_bits)). The
    /// GroupNorm then works from the rounded values. A recording forward (`record`) keeps the
    /// fp32 ones, which its GroupNorm's backward pass reads, unless that pass reads 16 bits too
    /// ([`KernelConfig::half_gn_inputs_recording`]); no other step of the backward pass reads
    /// a concatenation's values.
    fn half_concat_fits(&self, y: Tid, record: bool) -> Result<bool> {
        let c = self.choice;
        let ok = c.half_gn_inputs
            && (!record || c.half_gn_inputs_recording)
            && c.half_concat
            && c.deep
            && self.precision.is_half();
        Ok(ok && self.read_in_16_bits(y)?)
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
        if self.half[x] {
            return Ok((src, true));
        }
        if self.fresh_half_copy(src).is_some() || self.wants_half_copy(self.numel(x)) {
            return Ok((self.sixteen_bit(x)?, true));
        }
        Ok((src, false))
    }

    /// A 16-bit copy of fp32 value `x`: one made earlier, or a conversion now.
    fn sixteen_bit(&mut self, x: Tid) -> Result<Buf> {
        let src = self.val(x)?;
        if let Some(c) = self.fresh_half_copy(src) {
            return Ok(c);
        }
        let name = format!("{} (16-bit copy)", self.g.tensors[x].name);
        Ok(self.half_copy(src, self.numel(x), &name))
    }
}
