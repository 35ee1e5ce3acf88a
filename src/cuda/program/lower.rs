//! The lowering's state ([`Lowering`]) and what the forward and backward passes share: buffers,
//! 16-bit values and copies, the planning of each convolution launch; and the fusions applied
//! to the finished list (the time-embedding projections batched after the forward pass).

#[cfg(doc)]
use super::Program;
use super::{
    AttentionRows, BatchedLinear, Buf, BufDesc, ConvStep, KernelConfig, Step, FOLD_MIN_ROWS,
    HALF_COPY_MIN, STAGED_UNSPLIT_MAX_K, W,
};
use crate::cuda::kernels::{
    flash_fits, gn_partial_fits, im2col_box, narrow_mma_fits, plan_conv_at, plan_launch, plan_norm,
    reduction_norm_threads, rows_fits, rows_split_blocks, ConvKernel, ConvLaunch, ConvShape,
    GradSides, NormSplit, Silu, WgmmaTile, LINEAR_BATCH_MAX, LINEAR_ITEM_WORDS, WGMMA_SLICE,
};
use crate::cuda::precision::Precision;
use crate::cuda::unet::AttnKernel;
use crate::model::graph::{Graph, Op, Pad, ParamKind, Space, Tid};
use crate::{Error, Result};

/// Builds programs.
pub(super) struct Lowering<'g> {
    pub(super) g: &'g Graph,
    pub(super) n: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) sms: usize,
    pub(super) precision: Precision,
    pub(super) steps: Vec<Step>,
    pub(super) bufs: Vec<BufDesc>,
    pub(super) value: Vec<Option<Buf>>,
    pub(super) grad: Vec<Option<Buf>>,
    /// Per op: its GroupNorm statistics or attention probabilities, for the backward pass.
    pub(super) aux: Vec<Option<Buf>>,
    /// Per tensor: stored as 16-bit values in `precision` (see [`Program::build_with`]).
    pub(super) half: Vec<bool>,
    /// Per tensor: its gradient stored as 16-bit values in `precision`.
    pub(super) half_grad: Vec<bool>,
    /// 16-bit copies of buffers (a concatenation's own, [`KernelConfig::half_concat`], or a
    /// conversion, [`KernelConfig::half_copy`]): source, copy, and the step that wrote the
    /// copy. A copy serves while no later step has written its source. Read while the passes
    /// are lowered; the rewrites after the backward pass (which remove steps) leave it as it
    /// was.
    pub(super) half_copies: Vec<(Buf, Buf, usize)>,
    /// Per tensor: for an upsampling's output folded into the convolution that reads it
    /// ([`KernelConfig::upsample_fold`]), the upsampling's input, which that convolution
    /// reads instead.
    pub(super) folded: Vec<Option<Tid>>,
    /// Which kernels the steps run.
    pub(super) choice: KernelConfig,
    /// A 1x1 shortcut op the forward pass has not lowered yet: the op after it may take it in
    /// ([`KernelConfig::shortcut_fused`]).
    pub(super) pending_shortcut: Option<usize>,
}

impl<'g> Lowering<'g> {
    /// An empty lowering of `g` for `n` images of `h x w`; in bf16 and fp16 with the deep
    /// pipelines, with the tensors and gradients to store in 16 bits already chosen.
    pub(super) fn new(
        g: &'g Graph,
        n: usize,
        h: usize,
        w: usize,
        sms: usize,
        precision: Precision,
        choice: KernelConfig,
    ) -> Result<Self> {
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
            folded: vec![None; g.tensors.len()],
            choice,
            pending_shortcut: None,
        };
        if choice.deep && matches!(precision, Precision::Bf16 | Precision::Fp16) {
            l.half = l.half_tensors()?;
            l.half_grad = l.half_gradients();
        }
        if choice.upsample_fold {
            l.folded = l.upsample_folds();
        }
        Ok(l)
    }
}

impl Lowering<'_> {
    /// How a GroupNorm over `hw` pixels of `c` channels runs (see [`KernelConfig`]).
    pub(super) fn norm_split(&self, hw: usize, c: usize, groups: usize) -> NormSplit {
        let n = if self.choice.batch_invariant {
            1
        } else {
            self.n
        };
        plan_norm(
            n,
            hw,
            c,
            groups,
            self.sms,
            self.choice.gn_one_pass,
            self.choice.gn_ilp,
        )
    }

    pub(super) fn buf(&mut self, len: usize, what: &str) -> Buf {
        self.bufs.push(BufDesc {
            len: len.max(1),
            what: what.to_string(),
        });
        Buf(self.bufs.len() - 1)
    }

    pub(super) fn numel(&self, t: Tid) -> usize {
        self.g.shape(t, self.n, self.h, self.w).iter().product()
    }

    /// (height, width) of tensor `t`; (1, 1) for per-image vectors.
    pub(super) fn hw(&self, t: Tid) -> (usize, usize) {
        match self.g.tensors[t].space {
            Space::Vector => (1, 1),
            Space::Image { level } => (self.h >> level, self.w >> level),
        }
    }

    pub(super) fn ch(&self, t: Tid) -> usize {
        self.g.tensors[t].channels
    }

    /// The SiLU a GroupNorm's steps take where `on`: approximate in bf16/fp16 with
    /// [`KernelConfig::approx_silu`], whose convolutions round far more than it does.
    pub(super) fn silu(&self, on: bool) -> Silu {
        Silu::new(on, self.choice.approx_silu && self.precision.is_half())
    }

    pub(super) fn new_value(&mut self, t: Tid) -> Buf {
        let b = self.buf(self.numel(t), &self.g.tensors[t].name.clone());
        self.value[t] = Some(b);
        b
    }

    /// With [`KernelConfig::gn_producer_sums`]: each three-launch forward GroupNorm whose input
    /// was last written, whole, by a convolution whose launch can write the partial sums
    /// ([`gn_partial_fits`]: the lean and TMA wgmma kernels, unsplit, images of whole tiles)
    /// takes them from that convolution's epilogue, a chunk per tile, and its partial buffer
    /// is resized to those chunks; one whose input a concatenation wrote takes them from the
    /// concatenation, which then runs as the GroupNorm's own first launch
    /// (`gn_concat_partial`, its chunks). Either way the GroupNorm skips its own pass over the
    /// input: one launch and one read of the activation less.
    pub(super) fn norm_sums_from_producers(&mut self) {
        for i in 0..self.steps.len() {
            let Step::GroupNorm {
                x,
                x_half,
                hw,
                c,
                split,
                partial,
                ..
            } = self.steps[i]
            else {
                continue;
            };
            if split.one_pass.is_some() || split.from_producer {
                continue;
            }
            let Some(j) = (0..i).rev().find(|&j| self.steps[j].io().1.contains(&x)) else {
                continue;
            };
            let given = NormSplit {
                from_producer: true,
                ..split
            };
            // The split the GroupNorm takes its sums in, where its input's writer can write them.
            let taken = match &mut self.steps[j] {
                // A concatenation in 16 bits only sums the values it rounds (x_half).
                Step::Concat {
                    y,
                    ca,
                    cb,
                    sums: sums @ None,
                    half_out,
                    ..
                } if *y == x && *ca + *cb == c && *half_out == x_half => {
                    *sums = Some((partial, given));
                    Some(given)
                }
                Step::Conv(conv)
                    if conv.y == x
                        && x_half.is_none()
                        && !conv.accumulate
                        && conv.gn_partial.is_none()
                        && conv.shape.ncols == c
                        && conv.shape.mh * conv.shape.mw == hw
                        && conv.shape.n == self.n =>
                {
                    gn_partial_fits(&conv.shape, &conv.launch).map(|chunks| {
                        conv.gn_partial = Some(partial);
                        NormSplit {
                            chunks,
                            chunk_px: hw / chunks,
                            ..given
                        }
                    })
                }
                _ => None,
            };
            if let Some(taken) = taken {
                self.bufs[partial.0].len = taken.partial_len(self.n, c);
                if let Step::GroupNorm { split, .. } = &mut self.steps[i] {
                    *split = taken;
                }
            }
        }
    }

    /// With [`KernelConfig::gn_from_reduction`]: each one-pass forward GroupNorm whose input
    /// was last written, whole, by a split launch (the 8x8 and 16x16 levels at batch 1) is
    /// computed by that launch's reduction (kernels/norm.cu `conv_splitk_reduce_norm`, where
    /// [`reduction_norm_threads`] allows its group), and its step goes: one dependent launch
    /// and one read of the activation less, the same outputs bit for bit.
    pub(super) fn norms_from_reductions(&mut self) {
        let mut kept = vec![true; self.steps.len()];
        for (i, keep) in kept.iter_mut().enumerate() {
            let Step::GroupNorm {
                x,
                x_half: None,
                hw,
                c,
                groups,
                split,
                ..
            } = self.steps[i]
            else {
                continue;
            };
            if split.one_pass.is_none()
                || groups == 0
                || c % groups != 0
                || reduction_norm_threads(hw, c / groups).is_none()
            {
                continue;
            }
            let Some(j) = (0..i).rev().find(|&j| self.steps[j].io().1.contains(&x)) else {
                continue;
            };
            let n = self.n;
            let norm = Box::new(self.steps[i].clone());
            if let Step::Conv(conv) = &mut self.steps[j] {
                let s = &conv.shape;
                let whole = s.rows_are_pixels() && s.mh * s.mw == hw && s.ncols == c && s.n == n;
                if conv.y == x
                    && whole
                    && conv.launch.splits > 1
                    && !conv.accumulate
                    && conv.fp32_out
                    && conv.norm.is_none()
                    && conv.side16.is_none()
                    && conv.copy16.is_none()
                    && conv.gn_partial.is_none()
                {
                    conv.norm = Some(norm);
                    *keep = false;
                }
            }
        }
        let mut keep = kept.iter();
        self.steps
            .retain(|_| *keep.next().expect("one flag a step"));
        self.renumber_half_copies(&kept);
    }

    /// Drops the concatenations whose two sides their producers wrote
    /// ([`KernelConfig::concat_from_producers`]) and that sum nothing for their GroupNorm (a
    /// one-pass one): they would do nothing.
    pub(super) fn drop_placed_concats(&mut self) {
        let kept: Vec<bool> = self
            .steps
            .iter()
            .map(|s| {
                !matches!(
                    s,
                    Step::Concat {
                        placed: [true, true],
                        sums: None,
                        ..
                    }
                )
            })
            .collect();
        let mut keep = kept.iter();
        self.steps
            .retain(|_| *keep.next().expect("one flag a step"));
        self.renumber_half_copies(&kept);
    }

    /// Has the launches whose 16-bit outputs ([`ConvStep::side16`], [`ConvStep::copy16`]) are
    /// all that any step reads of them write no fp32 output: the up path's convolutions whose
    /// values only a 16-bit concatenation takes, the down path's that only a concatenation and
    /// a tensor-core launch take. Only where every step that names the output is such a
    /// launch writing it (an upsampling's four folded classes, say), since its buffer then
    /// keeps one element.
    pub(super) fn drop_unread_outputs(&mut self) {
        let halves = |s: &Step| match s {
            Step::Conv(c) if c.side16.is_some() || c.copy16.is_some() || c.norm.is_some() => {
                Some(c.y)
            }
            _ => None,
        };
        let droppable: std::collections::HashSet<Buf> = self
            .steps
            .iter()
            .filter_map(halves)
            .filter(|&y| {
                self.steps
                    .iter()
                    .filter(|s| s.buffers().contains(&y))
                    .all(|s| halves(s) == Some(y) && !s.io().0.contains(&y))
            })
            .collect();
        for s in &mut self.steps {
            if let Step::Conv(c) = s {
                if droppable.contains(&c.y) {
                    c.fp32_out = false;
                    self.bufs[c.y.0].len = 1;
                }
            }
        }
    }

    /// Has each GroupNorm backward pass over a concatenation (three launches, an fp32 input
    /// gradient it adds onto) write the concatenation's two gradients itself, where the
    /// concatenation's two adjoint steps (from `from` on, overwriting their sides) right after
    /// it only copy them out of its `dx` and nothing else reads that `dx`: the pass takes their
    /// outputs and 16-bit copies ([`Step::GroupNormBackward`]'s `sides`) and the two steps go.
    /// The same values: the adjoint steps copied the fp32 values and rounded them as the pass
    /// does. (A concatenation's block always has a 1x1 shortcut, whose input gradient writes
    /// `dx` first; a pass that did not add onto `dx` would leave it unused.)
    pub(super) fn concat_grads_from_norms(&mut self, from: usize) {
        let mut i = from;
        while i + 2 < self.steps.len() {
            let (
                Step::GroupNormBackward {
                    x,
                    dy,
                    stats,
                    dx,
                    hw,
                    c,
                    split,
                    accumulate: true,
                    half_out: None,
                    dx16: None,
                    sides: None,
                    ..
                },
                Step::ConcatBackward {
                    dy: dy_a,
                    d: a,
                    d16: a16,
                    pixels: pa,
                    c: ca_total,
                    offset: 0,
                    width: ca,
                    accumulate: false,
                },
                Step::ConcatBackward {
                    dy: dy_b,
                    d: b,
                    d16: b16,
                    pixels: pb,
                    c: cb_total,
                    offset: ob,
                    width: cb,
                    accumulate: false,
                },
            ) = (&self.steps[i], &self.steps[i + 1], &self.steps[i + 2])
            else {
                i += 1;
                continue;
            };
            let (dx, c) = (*dx, *c);
            let taken = GradSides {
                a: *a,
                a16: *a16,
                b: *b,
                b16: *b16,
                ca: *ca,
            };
            // The sides are written in the pass's element-wise launch: none may be what it
            // reads.
            let read = [*x, *dy, *stats, dx];
            let fits = split.one_pass.is_none()
                && taken.written().all(|s| !read.contains(&s))
                // (One kind of rounding for both copies.)
                && a16.zip(*b16).is_none_or(|((_, p), (_, q))| p == q)
                && *dy_a == dx
                && *dy_b == dx
                && *pa == self.n * hw
                && *pb == *pa
                && *ca_total == c
                && *cb_total == c
                && *ob == *ca
                && ca + cb == c
                && ca % 4 == 0
                && cb % 4 == 0
                && self.steps[i + 3..]
                    .iter()
                    .all(|s| !s.buffers().contains(&dx));
            if !fits {
                i += 1;
                continue;
            }
            if let Step::GroupNormBackward { sides, .. } = &mut self.steps[i] {
                *sides = Some(taken);
            }
            self.steps.drain(i + 1..i + 3);
            i += 1;
        }
    }

    /// Has each accumulating GroupNorm backward pass (fp32, whole input gradient) that is the
    /// next step to touch a gradient which a residual's gradient was just added onto (an
    /// [`Step::AddInto`] from `from` on, accumulating) add it itself, before its own values
    /// ([`Step::GroupNormBackward`]'s `add`), where nothing between writes what was added: the
    /// AddInto goes. (old + r) + v, the same bits: a launch and a read and write of the
    /// gradient less, for one read of `r`.
    pub(super) fn fold_residual_adds(&mut self, from: usize) {
        let mut gone = Vec::new();
        for i in from..self.steps.len() {
            let Step::AddInto {
                dst,
                src,
                len,
                accumulate: true,
            } = self.steps[i]
            else {
                continue;
            };
            let Some(j) =
                (i + 1..self.steps.len()).find(|&j| self.steps[j].buffers().contains(&dst))
            else {
                continue;
            };
            if self.steps[i + 1..=j]
                .iter()
                .any(|s| s.io().1.contains(&src))
            {
                continue;
            }
            let n = self.n;
            if let Step::GroupNormBackward {
                dx,
                hw,
                c,
                accumulate: true,
                add: add @ None,
                half_out: None,
                sides: None,
                ..
            } = &mut self.steps[j]
            {
                if *dx == dst && n * *hw * *c == len {
                    *add = Some(src);
                    gone.push(i);
                }
            }
        }
        let mut at = 0..;
        self.steps
            .retain(|_| at.next().is_some_and(|i| !gone.contains(&i)));
    }

    /// Merges the forward steps' few-row linear layers without residual that read the same `x`
    /// (with the same width, SiLU and divisor) into [`Step::LinearBatch`] launches of at most
    /// [`LINEAR_BATCH_MAX`] layers, each where the first of its layers was: in celebahq, the 32
    /// resnets' projections of the time embedding, ~12.5 us each as separate launches on an
    /// H200 (0.4 ms of a 5.5 ms batch-1 bf16 forward). A group closes at any step that writes its `x` (none does
    /// in the forward pass, whose values are written once; the check keeps the merge sound
    /// regardless). Their outputs are then written earlier than before, which only lengthens
    /// their lifetimes.
    pub(super) fn batch_linears(&mut self) {
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
        let kept: Vec<bool> = replace.iter().map(|r| !matches!(r, Some(None))).collect();
        let steps = std::mem::take(&mut self.steps);
        self.steps = steps
            .into_iter()
            .zip(replace)
            .filter_map(|(s, r)| r.unwrap_or(Some(s)))
            .collect();
        self.renumber_half_copies(&kept);
    }

    /// After steps were removed (`kept[i]`: whether step i still is, in order), points each
    /// 16-bit copy at its writer's new place ([`fresh_half_copy`](Self::fresh_half_copy) looks
    /// for writes of the source after it); a copy whose writer went goes too.
    fn renumber_half_copies(&mut self, kept: &[bool]) {
        let mut place = Vec::with_capacity(kept.len());
        let mut next = 0;
        for &k in kept {
            place.push(k.then_some(next));
            next += usize::from(k);
        }
        self.half_copies = std::mem::take(&mut self.half_copies)
            .into_iter()
            .filter_map(|(src, copy, at)| place[at].map(|at| (src, copy, at)))
            .collect();
    }

    pub(super) fn val(&self, t: Tid) -> Result<Buf> {
        self.value[t].ok_or_else(|| {
            Error::Cuda(format!(
                "internal: `{}` read before it is computed",
                self.g.tensors[t].name
            ))
        })
    }

    pub(super) fn new_grad(&mut self, t: Tid) -> Buf {
        let b = self.buf(self.numel(t), &format!("d {}", self.g.tensors[t].name));
        self.grad[t] = Some(b);
        b
    }

    /// The gradient buffer of `t` and whether it already holds contributions to add onto.
    pub(super) fn grad_slot(&mut self, t: Tid) -> (Buf, bool) {
        match self.grad[t] {
            Some(b) => (b, true),
            None => (self.new_grad(t), false),
        }
    }

    /// (input, output) widths of linear parameter group `p` (q/k/v fused: three outputs).
    pub(super) fn linear_dims(&self, p: usize) -> Result<(usize, usize)> {
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
    pub(super) fn gemm_shape(&self, op: &Op) -> Result<Option<ConvShape>> {
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

    /// Whether every reader of `y` (one at least; not the network's output; channels in units
    /// of four) reads it as 16-bit values at no loss of its own: a GroupNorm with a 16-bit
    /// output (its `_x16` kernels), or the main input of a tensor-core launch (which rounds it
    /// anyway). [`KernelConfig::half_gn_inputs`] stores such concatenations in 16 bits.
    pub(super) fn read_in_16_bits(&self, y: Tid) -> Result<bool> {
        let g = self.g;
        let mut readers = g.ops.iter().filter(|o| o.inputs().contains(&y)).peekable();
        let mut ok = y != g.output && readers.peek().is_some() && self.ch(y) % 4 == 0;
        for r in readers {
            ok &= match *r {
                Op::GroupNorm { x, y: gy, .. } => x == y && self.half[gy],
                _ => self.tensor_core_main_input(r, y)?,
            };
        }
        Ok(ok)
    }

    /// Whether op `r` reads `t` only as the main input of a launch on the tensor-core kernel
    /// (which rounds that input to 16 bits anyway, so a 16-bit `t` serves it as well).
    pub(super) fn tensor_core_main_input(&self, r: &Op, t: Tid) -> Result<bool> {
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

    /// Whether launch shape `s` runs on a tensor-core kernel of the program's precision that
    /// rounds its main input to 16 bits: the GEMM, or (narrow_mma) the few-output kernel,
    /// which takes that input only in 16 bits.
    pub(super) fn on_tensor_cores(&self, s: &ConvShape) -> bool {
        plan_conv_at(s, self.sms, self.precision).kernel == ConvKernel::Tensor(self.precision)
            || self.narrow_mma_here(s)
    }

    /// Whether `s` runs on [`ConvKernel::NarrowTensor`] when its input is in 16 bits
    /// ([`KernelConfig::narrow_mma`]).
    fn narrow_mma_here(&self, s: &ConvShape) -> bool {
        self.choice.narrow_mma && narrow_mma_fits(s, self.precision)
    }

    /// The 16-bit copy of buffer `src` made earlier, if nothing has written `src` since.
    pub(super) fn fresh_half_copy(&self, src: Buf) -> Option<Buf> {
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

    /// How an attention of `tokens` tokens and `heads` heads of `head_dim` runs
    /// ([`KernelConfig::attention_flash`], [`KernelConfig::attention_rows`],
    /// [`KernelConfig::attention_tf32`]): on the tensor cores never in fp32.
    pub(super) fn attention_kernel(
        &self,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> AttnKernel {
        let below_fp32 = self.precision != Precision::Fp32;
        let images = if self.choice.batch_invariant {
            1
        } else {
            self.n
        };
        let rows_here = match self.choice.attention_rows {
            AttentionRows::Off => false,
            AttentionRows::OneWave => rows_split_blocks(images * heads, tokens) <= self.sms,
            AttentionRows::Everywhere => true,
        };
        if below_fp32 && self.choice.attention_flash && flash_fits(head_dim) {
            AttnKernel::Flash
        } else if below_fp32 && rows_here && rows_fits(head_dim) {
            AttnKernel::Rows
        } else if below_fp32 && self.choice.attention_tf32 {
            AttnKernel::Tf32Products
        } else {
            AttnKernel::Products
        }
    }

    /// Whether [`KernelConfig::half_copy`] converts an fp32 input of `len` values over the
    /// batch (one image's share with `batch_invariant`: the copy moves its readers to wgmma,
    /// which sums in another order, so the choice must not depend on the batch).
    pub(super) fn wants_half_copy(&self, len: usize) -> bool {
        let len = if self.choice.batch_invariant {
            len / self.n
        } else {
            len
        };
        self.choice.half_copy
            && self.choice.deep
            && self.precision.is_half()
            && (len >= HALF_COPY_MIN || self.choice.half_copy_small)
    }

    /// A step converting the `len` fp32 values of `src` to 16 bits; the copy's buffer; or,
    /// where the step that last wrote `src` wrote all of it and can write a 16-bit copy beside
    /// ([`copy_by_writer`](Self::copy_by_writer)), that step writing the copy.
    pub(super) fn half_copy(&mut self, src: Buf, len: usize, name: &str) -> Buf {
        let y = self.buf(len.div_ceil(2), name);
        let last = self.steps.iter().rposition(|s| s.io().1.contains(&src));
        if let Some(at) = last.filter(|&at| self.copy_by_writer(at, src, len, Some(y), true)) {
            self.half_copies.push((src, y, at));
            return y;
        }
        self.steps.push(Step::ToHalf {
            x: src,
            y,
            len,
            precision: self.precision,
        });
        self.half_copies.push((src, y, self.steps.len() - 1));
        y
    }

    /// A 16-bit copy of the `len` fp32 values of `src` that the step which wrote them last
    /// writes beside them ([`copy_by_writer`](Self::copy_by_writer)), or one made earlier
    /// that is still fresh; `None` where neither can be had without a conversion launch.
    pub(super) fn half_copy_by_writer(&mut self, src: Buf, len: usize, name: &str) -> Option<Buf> {
        if let Some(copy) = self.fresh_half_copy(src) {
            return Some(copy);
        }
        let at = self.steps.iter().rposition(|s| s.io().1.contains(&src))?;
        if !self.copy_by_writer(at, src, len, None, false) {
            return None;
        }
        let y = self.buf(len.div_ceil(2), name);
        self.copy_by_writer(at, src, len, Some(y), false);
        self.half_copies.push((src, y, at));
        Some(y)
    }

    /// Has step `at`, which wrote `src` last, also write `src`'s `len` values in 16 bits to
    /// `y`, where it wrote all of them and can: a concatenation's adjoint, a GroupNorm's
    /// backward with an fp32 gradient, or an attention in rows, forward or backward
    /// ([`KernelConfig::fused_half_copies`]); a launch with a
    /// staged epilogue ([`KernelConfig::epilogue_half_copies`]) or, with
    /// [`KernelConfig::reduce_half_copies`], a split one's reduction; or with
    /// [`KernelConfig::class_half_copies`] the parity-class launches that wrote it last, each
    /// its own pixels. The same bits as a conversion launch. The last two only where the copy
    /// replaces a conversion launch (`instead_of_conversion`), not where a step would read it
    /// instead of the fp32 values (a GroupNorm backward pass's output gradient), so that those
    /// candidates change no value. Whether it does (with `y` None, whether it could, changing
    /// nothing).
    fn copy_by_writer(
        &mut self,
        at: usize,
        src: Buf,
        len: usize,
        y: Option<Buf>,
        instead_of_conversion: bool,
    ) -> bool {
        let classes = instead_of_conversion
            .then(|| self.class_writers(at, src, len))
            .flatten();
        if let Some(classes) = classes {
            for j in classes {
                if let Step::Conv(conv) = &mut self.steps[j] {
                    conv.copy16 = y;
                }
            }
            return true;
        }
        let (n, precision, choice) = (self.n, self.precision, self.choice);
        // An attention's output has a head's width a token, its input gradient three (q, k, v).
        let parts = match self.steps[at] {
            Step::AttentionBackward { .. } => 3,
            _ => 1,
        };
        match &mut self.steps[at] {
            Step::ConcatBackward {
                d,
                d16: slot @ None,
                pixels,
                width,
                ..
            } if choice.fused_half_copies && *d == src && *pixels * *width == len => {
                *slot = y.map(|y| (y, precision));
                true
            }
            Step::GroupNormBackward {
                dx,
                dx16: slot @ None,
                half_out: None,
                hw,
                c,
                ..
            } if choice.fused_half_copies && *dx == src && n * *hw * *c == len => {
                *slot = y.map(|y| (y, precision));
                true
            }
            Step::Attention {
                y: out,
                y16: slot @ None,
                kernel: AttnKernel::Rows,
                tokens,
                heads,
                head_dim,
                ..
            }
            | Step::AttentionBackward {
                dqkv: out,
                dqkv16: slot @ None,
                kernel: AttnKernel::Rows,
                tokens,
                heads,
                head_dim,
                ..
            } if choice.fused_half_copies
                && *out == src
                && n * *tokens * parts * *heads * *head_dim == len =>
            {
                *slot = y.map(|y| (y, precision));
                true
            }
            Step::Conv(conv)
                if choice.epilogue_half_copies
                    && conv.copy16.is_none()
                    && conv.y == src
                    && (conv.launch.staged_epilogue
                        || (choice.reduce_half_copies
                            && instead_of_conversion
                            && conv.launch.splits > 1
                            && conv.norm.is_none()
                            && conv.side16.is_none()
                            && matches!(conv.launch.kernel, ConvKernel::Tensor(p) if p.is_half())))
                    && conv.shape.out_stride == 1
                    && conv.shape.rows() * conv.shape.ncols == len =>
            {
                conv.copy16 = y;
                true
            }
            _ => false,
        }
    }

    /// With [`KernelConfig::class_half_copies`] (and staged epilogues' copies): the steps of
    /// the parity-class launches that wrote `src` last, from step `at` back, where they wrote
    /// all its `len` values (every class of one output grid), each has a staged epilogue and
    /// none a copy yet; `None` otherwise. Each writes a class of output pixels, so their copies
    /// together are the whole copy (and the streams let them run side by side, the copy being
    /// indexed by output pixel: `other_class` in src/cuda/streams.rs).
    fn class_writers(&self, at: usize, src: Buf, len: usize) -> Option<Vec<usize>> {
        if !(self.choice.class_half_copies && self.choice.epilogue_half_copies) {
            return None;
        }
        let Step::Conv(last) = &self.steps[at] else {
            return None;
        };
        let grid = |s: &ConvShape| (s.n, s.yh, s.yw, s.out_stride, s.ncols);
        let stride = last.shape.out_stride;
        if stride < 2 || last.y != src {
            return None;
        }
        let mut classes: Vec<usize> = Vec::new();
        let mut offsets = Vec::new();
        let mut written = 0;
        for j in (0..=at).rev() {
            if !self.steps[j].io().1.contains(&src) {
                continue;
            }
            match &self.steps[j] {
                Step::Conv(c)
                    if c.y == src
                        && grid(&c.shape) == grid(&last.shape)
                        && c.launch.staged_epilogue
                        && c.copy16.is_none()
                        && !offsets.contains(&(c.shape.out_oy, c.shape.out_ox)) =>
                {
                    offsets.push((c.shape.out_oy, c.shape.out_ox));
                    classes.push(j);
                    written += c.shape.rows() * c.shape.ncols;
                }
                _ => break,
            }
        }
        (offsets.len() == stride * stride && written == len).then_some(classes)
    }

    /// The input-gradient launches of convolution `x -> y` (see [`ConvShape::backward`]).
    pub(super) fn conv_backward_shapes(
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

    /// Which upsamplings to fold into the convolution after them
    /// ([`KernelConfig::upsample_fold`]): those whose output only a 3x3 stride-1 convolution
    /// reads, as its main input, where the input has at least [`FOLD_MIN_ROWS`] pixels over
    /// the batch (one image's with `batch_invariant`, so that no image's sums depend on its
    /// batch); in bf16/fp16, only with the deep pipelines and where every folded launch, both
    /// ways, runs on the tensor cores (which take the 16-bit copy of the input the folded
    /// launches read).
    fn upsample_folds(&self) -> Vec<Option<Tid>> {
        let g = self.g;
        let n = if self.choice.batch_invariant {
            1
        } else {
            self.n
        };
        let mut folded = vec![None; g.tensors.len()];
        for op in &g.ops {
            let Op::Upsample { x, y } = *op else {
                continue;
            };
            let mut readers = g.ops.iter().filter(|o| o.inputs().contains(&y));
            let (
                Some(&Op::Conv {
                    x: cx,
                    y: cy,
                    kernel: 3,
                    stride: 1,
                    pad: Pad::Symmetric,
                    temb,
                    residual,
                    ..
                }),
                None,
            ) = (readers.next(), readers.next())
            else {
                continue;
            };
            let (h, w) = self.hw(x);
            let (cin, cout) = (self.ch(x), self.ch(cy));
            let launches = ConvShape::upsampled_forward(self.n, h, w, cin, cout)
                .into_iter()
                .chain(ConvShape::upsampled_backward(self.n, h, w, cin, cout));
            if cx == y
                && temb != Some(y)
                && residual != Some(y)
                && y != g.output
                && n * h * w >= FOLD_MIN_ROWS
                && (!self.precision.is_half()
                    || (self.choice.deep && launches.into_iter().all(|s| self.on_tensor_cores(&s))))
            {
                folded[y] = Some(x);
            }
        }
        folded
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
    pub(super) fn conv_step(
        &mut self,
        shape: ConvShape,
        x: Buf,
        w: W,
        y: Buf,
        half_input: bool,
    ) -> ConvStep {
        let launch = self.plan_step(&shape, half_input);
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
            gn_partial: None,
            shortcut: None,
            side16: None,
            copy16: None,
            fp32_out: true,
            norm: None,
        }
    }

    /// How [`conv_step`](Self::conv_step) launches `shape`: kernel, split, tile and loaders.
    pub(super) fn plan_step(&self, shape: &ConvShape, half_input: bool) -> ConvLaunch {
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
        if half_input && self.narrow_mma_here(&planned) {
            if let Some(l) = ConvLaunch::narrow_mma(&planned, self.precision) {
                return l;
            }
        }
        // Over the fp32 input, where the fp32 kernel would run (nothing else in the program
        // changes: a shape a bf16/fp16 program runs on the tensor-core GEMM, 8 -> 128 say, may
        // be handed a 16-bit input, which this kernel cannot read).
        if self.choice.few_in_mma
            && self.precision.is_half()
            && !half_input
            && plan_conv_at(&planned, self.sms, self.precision).kernel == ConvKernel::FewIn
        {
            if let Some(l) = ConvLaunch::few_in_mma(&planned) {
                return l;
            }
        }
        let mut launch = plan_launch(
            &planned,
            self.sms,
            self.precision,
            half_input,
            half_input && self.choice.wgmma,
            self.choice.deep,
        );
        launch.row_epilogue = self.choice.row_epilogue
            && launch.deep
            && matches!(launch.kernel, ConvKernel::Tensor(_));
        let plain = launch.wgmma && launch.tile == WgmmaTile::Plain;
        // One tall block per multiprocessor: only unsplit, where they fill the machine at least
        // once.
        let tall = WgmmaTile::Tall;
        let tall_blocks = planned.rows().div_ceil(tall.rows()) * planned.ncols.div_ceil(128);
        let tall_here =
            self.choice.tall_tiles && plain && launch.splits == 1 && tall_blocks >= self.sms;
        if tall_here {
            launch.tile = tall;
        }
        let lean_here = launch.wgmma && launch.row_epilogue;
        launch.tma_loads = self.choice.wgmma_tma
            && lean_here
            && im2col_box(&planned).is_some()
            && (planned.in_stride == 1 || self.choice.strided_tma);
        launch.lean_loads = (self.choice.wgmma_lean || launch.tma_loads) && lean_here;
        // After the tile's choice, so that these keep the plain tile, as the sweep timed them
        // (the split rule gives two splits only where tall blocks would not fill the machine).
        if self.choice.staged_epilogue
            && self.choice.staged_unsplit
            && launch.tma_loads
            && launch.splits == 2
            && planned.k() <= STAGED_UNSPLIT_MAX_K
        {
            launch.splits = 1;
            launch.k_per_split = planned.k().div_ceil(WGMMA_SLICE) * WGMMA_SLICE;
        }
        launch.staged_epilogue =
            self.choice.staged_epilogue && launch.tma_loads && launch.splits == 1;
        launch
    }
}
