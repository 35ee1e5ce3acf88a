//! A concatenation's two gradients written by the GroupNorm backward pass over it (the `_split`
//! GroupNorm backward kernels, `INVDIFF_CONCAT_GRAD_SPLIT`): launches against the whole input
//! gradient that the concatenation's adjoint steps would have split, bit for bit, and whole
//! networks against the same network without; and whole networks with the residual gradients
//! added by the GroupNorm backward passes (`INVDIFF_GN_ADD_RESIDUAL`, whose launches the group
//! norms group checks) against the same network without. Groups of their own, run last: a
//! new kernel that faults ends no other check.

use super::networks::LAUNCHES;
use super::{acc_name, unpack_half, Tester};
use crate::cuda::kernels::{plan_norm, GradSides, NormBackwardIn, NormBackwardOut, NormDims, Silu};
use crate::cuda::precision::Precision;
use crate::cuda::unet::CudaUnet;
use crate::Result;

impl Tester<'_> {
    /// The three-launch backward pass with and without loads ahead, over an fp32 and a 16-bit
    /// input, overwriting and adding onto the input gradient, without and with 16-bit copies
    /// (bf16, fp16), from an fp32 and (loads ahead, with copies) a 16-bit output gradient,
    /// at celebahq's concatenations (32x32 x 768 = 512 + 256, 64x64 x 512,
    /// 16x24 x 384 at batch 2) and an awkward one (7x9 x 96 = 32 + 64 in 8 groups, a group
    /// across the two sides): each side the same to the bit as its channels of the whole input
    /// gradient (and of its 16-bit copy), and the input gradient itself left as it was.
    pub(super) fn concat_gradient_splits(&mut self) -> Result<()> {
        for (n, h, w, ca, cb, groups) in [
            (1, 32, 32, 512, 256, 32),
            (1, 64, 64, 256, 256, 32),
            (2, 16, 24, 256, 128, 32),
            (1, 7, 9, 32, 64, 8),
        ] {
            for half in [None, Some(Precision::Bf16), Some(Precision::Fp16)] {
                for x16 in [false, true] {
                    if x16 && half.is_none() {
                        continue;
                    }
                    for ilp in [false, true] {
                        for accumulate in [false, true] {
                            // A 16-bit output gradient: `half`'s, with the `_ilp` kernels.
                            for dy16 in [false, true] {
                                if dy16 && !(ilp && half.is_some()) {
                                    continue;
                                }
                                let case = (n, h, w, ca, cb, groups);
                                let form = (half, x16, dy16, ilp);
                                self.concat_gradient_split_case(case, form, accumulate)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn concat_gradient_split_case(
        &mut self,
        (n, h, w, ca, cb, groups): (usize, usize, usize, usize, usize, usize),
        (half, x16, dy16, ilp): (Option<Precision>, bool, bool, bool),
        accumulate: bool,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (hw, c) = (h * w, ca + cb);
        let len = n * hw * c;
        let split = plan_norm(n, hw, c, groups, gpu.sms(), false, ilp);
        let d = NormDims {
            n,
            hw,
            c,
            groups,
            split,
        };
        let x = self.rand(len, -2.0, 2.0);
        let dy = self.rand(len, -1.0, 1.0);
        let mut stats = self.rand(n * groups, -0.5, 0.5);
        stats.extend(self.rand(n * groups, 0.5, 2.0));
        let (gamma, beta) = (self.rand(c, 0.5, 1.5), self.rand(c, -0.5, 0.5));
        let dx0 = self.grad_start(len, accumulate);
        let xd = self.up(&x)?;
        // A 16-bit x: its copy in `half`'s precision (the recorded concatenation's values).
        let x16d = match half.filter(|_| x16) {
            Some(p) => Some((self.half_copy(xd.ptr, len, p)?, p)),
            None => None,
        };
        let (xp, x_half) = match &x16d {
            Some((b, p)) => (b.ptr, Some(*p)),
            None => (xd.ptr, None),
        };
        let (dyd, sd, gd, bd) = (
            self.up(&dy)?,
            self.up(&stats)?,
            self.up(&gamma)?,
            self.up(&beta)?,
        );
        // A 16-bit dy: its copy in `half`'s precision (what the launch writing it wrote).
        let dy16d = match half.filter(|_| dy16) {
            Some(p) => Some((self.half_copy(dyd.ptr, len, p)?, p)),
            None => None,
        };
        let (dyp, dy_half) = match &dy16d {
            Some((b, p)) => (b.ptr, Some(*p)),
            None => (dyd.ptr, None),
        };
        let partial = self.zeros(split.partial_len(n, c))?;
        let means = self.zeros(2 * n * groups)?;
        let inputs = NormBackwardIn {
            x: xp,
            x_half,
            dy: dyp,
            dy_half,
            gamma: gd.ptr,
            beta: bd.ptr,
            stats: sd.ptr,
            silu: Silu::Accurate,
        };
        let run = |dx, copy, sides| {
            let outputs = NormBackwardOut {
                partial: partial.ptr,
                means: means.ptr,
                dx,
                accumulate,
                add: None,
                half_out: None,
                copy,
                sides,
                ..NormBackwardOut::default()
            };
            gpu.kernels.group_norm_backward(st, d, inputs, outputs)
        };
        // The whole input gradient (and its copy), as the program without the split has it.
        let whole = self.up(&dx0)?;
        let copy = self.zeros(len.div_ceil(2))?;
        run(whole.ptr, half.map(|p| (copy.ptr, p)), None)?;
        let want = whole.download(st)?;
        let want16 = match half {
            Some(p) => Some(unpack_half(&copy.download(st)?, len, p)),
            None => None,
        };
        // The two sides; the input gradient random where the pass overwrites it, so that a
        // kernel that read or wrote it there would show.
        let dx1 = if accumulate {
            dx0.clone()
        } else {
            self.rand(len, -1.0, 1.0)
        };
        let dx = self.up(&dx1)?;
        let (a, b) = (self.zeros(n * hw * ca)?, self.zeros(n * hw * cb)?);
        let (a16, b16) = (
            self.zeros((n * hw * ca).div_ceil(2))?,
            self.zeros((n * hw * cb).div_ceil(2))?,
        );
        let sides = GradSides {
            a: a.ptr,
            a16: half.map(|p| (a16.ptr, p)),
            b: b.ptr,
            b16: half.map(|p| (b16.ptr, p)),
            ca,
        };
        let ms = self.timed(|| Ok(()), || run(dx.ptr, None, Some(sides)))?;
        let columns = |v: &[f32], from: usize, to: usize| -> Vec<f32> {
            v.chunks_exact(c)
                .flat_map(|p| p[from..to].to_vec())
                .collect()
        };
        let desc = format!(
            "n{n} {h}x{w} c{ca}+{cb} g{groups} ({}{}{})",
            split.form(),
            if x16 { ", 16-bit x" } else { "" },
            if dy16 { ", 16-bit dy" } else { "" }
        );
        let op = format!("groupnorm+silu input-grad{} split", acc_name(accumulate));
        let bits = format!("{desc}, bits");
        for (side, got, from, to) in [("first", &a, 0, ca), ("second", &b, ca, c)] {
            self.row_within(
                format!("{op}: {side} side vs the whole gradient's"),
                bits.clone(),
                &got.download(st)?,
                &columns(&want, from, to),
                ms,
                0.0,
            );
        }
        if let (Some(p), Some(want16)) = (half, &want16) {
            for (side, got, from, to) in [("first", &a16, 0, ca), ("second", &b16, ca, c)] {
                let got = unpack_half(&got.download(st)?, n * hw * (to - from), p);
                self.row_within(
                    format!("{op}: {side} side's {p} copy vs the whole gradient's"),
                    bits.clone(),
                    &got,
                    &columns(want16, from, to),
                    ms,
                    0.0,
                );
            }
        }
        self.row_within(
            format!("{op}: the input gradient left as it was"),
            bits,
            &dx.download(st)?,
            &dx1,
            ms,
            0.0,
        );
        Ok(())
    }

    /// The celebahq architecture (random weights) at 64x64 x 2 and 256x256 x 1, in bf16 and
    /// fp16, as configured but for the split: a DPS step's launches fewer with it, and its
    /// forward + VJP the same to the bit as without.
    pub(super) fn concat_gradient_split_unets(&mut self, ordinal: usize) -> Result<()> {
        let set = CudaUnet::set_concat_grad_split;
        self.same_bits_choice_unets(ordinal, "concatenation gradients split", set, LAUNCHES)
    }

    /// The same with the residual gradients added by the GroupNorm backward passes
    /// (`INVDIFF_GN_ADD_RESIDUAL`) against their AddInto launches.
    pub(super) fn residual_gradient_unets(&mut self, ordinal: usize) -> Result<()> {
        let set = CudaUnet::set_fold_residual_grads;
        let op = "residual gradients added by GroupNorms";
        self.same_bits_choice_unets(ordinal, op, set, LAUNCHES)
    }
}
