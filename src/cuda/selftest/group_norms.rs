//! GroupNorm (+SiLU), forward and backward, in every form the planner can choose.

use super::{acc_name, placed_sides, unpack_half, Tester};
use crate::cpu::norm;
use crate::cuda::kernels::{
    norm_forms, plan_norm, DPtr, Kernels, NormBackwardIn, NormBackwardOut, NormDims, NormSplit,
    Silu,
};
use crate::cuda::precision::Precision;
use crate::cuda::weights::DevBuf;
use crate::Result;

/// A backward pass's input gradient and its 16-bit copy, widened.
type BackwardOutputs = (Vec<f32>, Vec<f32>);
/// A forward pass's output, widened, and its statistics.
type ForwardOutputs = (Vec<f32>, Vec<f32>);

/// How a row's op names the SiLU after its GroupNorm.
pub(super) fn silu_label(silu: Silu) -> &'static str {
    match silu {
        Silu::Off => "",
        Silu::Accurate => "+silu",
        Silu::Approx => "+approximate silu",
    }
}

/// What every backward run of one GroupNorm shares: its statistics, scale and shift, SiLU.
fn shared_inputs((stats, gamma, beta): (&DevBuf, &DevBuf, &DevBuf), silu: Silu) -> NormBackwardIn {
    NormBackwardIn {
        gamma: gamma.ptr,
        beta: beta.ptr,
        stats: stats.ptr,
        silu,
        ..NormBackwardIn::default()
    }
}

impl Tester<'_> {
    /// `x` on the device as 16-bit values of `precision` (a conversion launch's rounding), and
    /// those values widened to fp32: the inputs of a `_x16` kernel and of the fp32 kernel it
    /// must match.
    fn rounded_input(&self, x: &[f32], precision: Precision) -> Result<(DevBuf, DevBuf)> {
        let fp32 = self.up(x)?;
        let x16 = self.half_copy(fp32.ptr, x.len(), precision)?;
        let words = x16.download(&self.gpu.stream)?;
        let widened = self.up(&unpack_half(&words, x.len(), precision))?;
        Ok((x16, widened))
    }

    /// `values` on the device in fp32 and, where `half` is set, as 16-bit values of it (a
    /// conversion launch's rounding): the forms an input can take, each with its precision.
    fn stored_forms(
        &mut self,
        values: &[f32],
        half: Option<Precision>,
    ) -> Result<Vec<(DevBuf, Option<Precision>)>> {
        let mut forms = vec![(self.up(values)?, None)];
        if let Some(p) = half {
            forms.push((self.rounded_input(values, p)?.0, Some(p)));
        }
        Ok(forms)
    }

    /// GroupNorm `d` (16-bit output) of `x` stored in 16 bits of `precision`
    /// ([`KernelConfig::half_gn_inputs`](crate::cuda::program::KernelConfig)): its output and
    /// statistics the same bits as the fp32-input kernels' over the same values widened.
    #[allow(clippy::too_many_arguments)]
    fn half_input_rows(
        &mut self,
        d: NormDims,
        x: &[f32],
        (gamma, beta): (&DevBuf, &DevBuf),
        eps: f32,
        silu: Silu,
        precision: Precision,
        desc: &str,
    ) -> Result<()> {
        let (x16, widened) = self.rounded_input(x, precision)?;
        let mut outs = Vec::new();
        let mut ms = 0.0;
        for input in [(widened.ptr, None), (x16.ptr, Some(precision))] {
            let out;
            (out, ms) = self.half_output_run(d, input, (gamma, beta), eps, silu, precision)?;
            outs.push(out);
        }
        let s = silu_label(silu);
        let op = format!("groupnorm{s} forward, {precision} input and output vs fp32 input");
        self.same_bits_rows(&op, "statistics", desc, &outs, ms);
        Ok(())
    }

    /// GroupNorm `d` of the input at `x` (16-bit values of `x_half` where set) into a 16-bit
    /// output of `precision`: that output widened, the statistics, and the launch's time.
    fn half_output_run(
        &mut self,
        d: NormDims,
        (x, x_half): (DPtr, Option<Precision>),
        (gamma, beta): (&DevBuf, &DevBuf),
        eps: f32,
        silu: Silu,
        precision: Precision,
    ) -> Result<(ForwardOutputs, f64)> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let len = d.n * d.hw * d.c;
        let y = self.zeros(len.div_ceil(2))?;
        let partial = self.zeros(d.split.partial_len(d.n, d.c))?;
        let stats = self.zeros(2 * d.n * d.groups)?;
        let affine = self.zeros(2 * d.n * d.c)?;
        let ms = self.timed(
            || Ok(()),
            || {
                gpu.kernels.group_norm(
                    st,
                    d,
                    x,
                    x_half,
                    gamma.ptr,
                    beta.ptr,
                    y.ptr,
                    partial.ptr,
                    stats.ptr,
                    affine.ptr,
                    eps,
                    silu,
                    Some(precision),
                )
            },
        )?;
        let y = unpack_half(&y.download(st)?, len, precision);
        Ok(((y, stats.download(st)?), ms))
    }

    /// One backward pass `d` from `inputs` onto a fresh `dx0` (accumulating, after `add` where
    /// set): into an fp32 input gradient, with its 16-bit copy in `precision` where `copy`, or
    /// with `out16` a 16-bit one. The input gradient and the copy (zeros where none), widened,
    /// and the pass's time.
    #[allow(clippy::too_many_arguments)]
    fn backward_run(
        &mut self,
        d: NormDims,
        inputs: NormBackwardIn,
        onto: (&[f32], bool, Option<DPtr>),
        out16: Option<Precision>,
        copy: bool,
        precision: Precision,
    ) -> Result<(BackwardOutputs, f64)> {
        let kernels = &self.gpu.kernels;
        let (out, _, ms) =
            self.backward_run_on(kernels, d, inputs, onto, out16, copy, precision)?;
        Ok((out, ms))
    }

    /// [`backward_run`](Self::backward_run) on `kernels` (other launch choices), also
    /// returning the three-launch form's partial sums (f64 words as pairs of f32 ones).
    #[allow(clippy::too_many_arguments)]
    fn backward_run_on(
        &mut self,
        kernels: &Kernels,
        d: NormDims,
        inputs: NormBackwardIn,
        (dx0, accumulate, add): (&[f32], bool, Option<DPtr>),
        out16: Option<Precision>,
        copy: bool,
        precision: Precision,
    ) -> Result<(BackwardOutputs, Vec<f32>, f64)> {
        let st = &self.gpu.stream;
        let mut dx = self.up(dx0)?;
        let copy_buf = self.zeros(dx0.len().div_ceil(2))?;
        let partial = self.zeros(d.split.partial_len(d.n, d.c))?;
        let means = self.zeros(2 * d.n * d.groups)?;
        let outputs = NormBackwardOut {
            partial: partial.ptr,
            means: means.ptr,
            dx: dx.ptr,
            accumulate,
            add,
            half_out: out16,
            copy: copy.then_some((copy_buf.ptr, precision)),
            ..NormBackwardOut::default()
        };
        let ms = self.timed(
            || dx.write(st, dx0),
            || kernels.group_norm_backward(st, d, inputs, outputs),
        )?;
        let got = match out16 {
            Some(p) => unpack_half(&dx.download(st)?, dx0.len(), p),
            None => dx.download(st)?,
        };
        let copy = unpack_half(&copy_buf.download(st)?, dx0.len(), precision);
        Ok(((got, copy), partial.download(st)?, ms))
    }

    /// The input gradient of GroupNorm `d` (fp32, overwriting or accumulating onto `dx0`, with
    /// and without a 16-bit copy) from the statistics at `stats` with `x` stored in 16 bits of
    /// `precision` ([`KernelConfig::half_gn_inputs_recording`](crate::cuda::program::KernelConfig)):
    /// the same bits as the fp32-input kernels' over the same values widened.
    #[allow(clippy::too_many_arguments)]
    fn half_input_backward_rows(
        &mut self,
        d: NormDims,
        x: &[f32],
        (dy, stats): (&DevBuf, &DevBuf),
        (gamma, beta): (&DevBuf, &DevBuf),
        (silu, accumulate): (Silu, bool),
        dx0: &[f32],
        precision: Precision,
        desc: &str,
    ) -> Result<()> {
        let (x16, widened) = self.rounded_input(x, precision)?;
        let s = silu_label(silu);
        let op = format!(
            "groupnorm{s} input-grad{}, {precision} input vs fp32 input",
            acc_name(accumulate)
        );
        // With the 16-bit copy of the new dx (INVDIFF_HALF_COPY_FUSED) and without.
        for with_copy in [true, false] {
            let mut outs = Vec::new();
            let mut ms = 0.0;
            for (input, x_half) in [(widened.ptr, None), (x16.ptr, Some(precision))] {
                let inputs = NormBackwardIn {
                    x: input,
                    x_half,
                    dy: dy.ptr,
                    dy_half: None,
                    gamma: gamma.ptr,
                    beta: beta.ptr,
                    stats: stats.ptr,
                    silu,
                };
                let out;
                (out, ms) = self.backward_run(
                    d,
                    inputs,
                    (dx0, accumulate, None),
                    None,
                    with_copy,
                    precision,
                )?;
                outs.push(out);
            }
            if with_copy {
                self.same_bits_rows(&op, "16-bit copy", desc, &outs, ms);
            } else {
                let op = format!("{op}, no copy");
                self.row_within(op, desc.into(), &outs[1].0, &outs[0].0, ms, 0.0);
            }
        }
        Ok(())
    }

    /// The input gradient of GroupNorm `d` (an `_ilp` form) from its output gradient `dy`
    /// stored in 16 bits of `precision` (the `_dy16` kernels,
    /// [`KernelConfig::half_norm_grads`](crate::cuda::program::KernelConfig)), over an fp32 x
    /// and (units of four) a 16-bit one, into an fp32 `dx` (overwriting or accumulating onto
    /// `dx0`, with its 16-bit copy) and (fp32 x, units of four) a 16-bit one: the same bits as
    /// the fp32-gradient kernels' over the same gradient widened.
    #[allow(clippy::too_many_arguments)]
    fn half_grad_backward_rows(
        &mut self,
        d: NormDims,
        (x, dy): (&[f32], &[f32]),
        params: (&DevBuf, &DevBuf, &DevBuf),
        (silu, accumulate): (Silu, bool),
        dx0: &[f32],
        precision: Precision,
        desc: &str,
    ) -> Result<()> {
        let (dy16, dy_widened) = self.rounded_input(dy, precision)?;
        let xs = self.stored_forms(x, (d.c % 4 == 0).then_some(precision))?;
        let base = shared_inputs(params, silu);
        let s = silu_label(silu);
        for (xb, x_half) in &xs {
            let (xp, x_half) = (xb.ptr, *x_half);
            let xs = if x_half.is_some() { ", 16-bit x" } else { "" };
            // fp32 dx with its copy; a 16-bit dx (overwriting, fp32 x, units of four).
            let half_out = x_half.is_none() && d.c % 4 == 0;
            for out16 in std::iter::once(None).chain(half_out.then_some(Some(precision))) {
                let accumulate = accumulate && out16.is_none();
                let mut outs = Vec::new();
                let mut ms = 0.0;
                for (dyp, dy_half) in [(dy_widened.ptr, None), (dy16.ptr, Some(precision))] {
                    let inputs = NormBackwardIn {
                        x: xp,
                        x_half,
                        dy: dyp,
                        dy_half,
                        ..base
                    };
                    let copy = out16.is_none();
                    let out;
                    let onto = (dx0, accumulate, None);
                    (out, ms) = self.backward_run(d, inputs, onto, out16, copy, precision)?;
                    outs.push(out);
                }
                let op = format!(
                    "groupnorm{s} input-grad{}{}, {precision} output gradient vs fp32{xs}",
                    acc_name(accumulate),
                    if out16.is_some() { " (16-bit)" } else { "" },
                );
                if out16.is_some() {
                    self.row_within(op, desc.into(), &outs[1].0, &outs[0].0, ms, 0.0);
                } else {
                    self.same_bits_rows(&op, "16-bit copy", desc, &outs, ms);
                }
                // Over a 16-bit x and dy, the sums launch (three-launch forms) two channels a
                // thread (INVDIFF_GN_BWD_SUMS_PAIRS) against one channel a thread: the partial
                // sums, the input gradient and its copy, bit for bit.
                if x_half.is_some() && d.split.one_pass.is_none() {
                    let inputs = NormBackwardIn {
                        x: xp,
                        x_half,
                        dy: dy16.ptr,
                        dy_half: Some(precision),
                        ..base
                    };
                    let onto = (dx0, accumulate, None);
                    let mut runs = Vec::new();
                    for pairs in [false, true] {
                        let launch = self.launch_with(|l| l.gn_bwd_sums_pairs = pairs);
                        let k = self.gpu.kernels.with_launch(launch);
                        runs.push(
                            self.backward_run_on(&k, d, inputs, onto, None, true, precision)?,
                        );
                    }
                    let op = format!(
                        "groupnorm{s} input-grad{}, 16-bit x and {precision} output gradient, {}",
                        acc_name(accumulate),
                        "sums two channels a thread vs one",
                    );
                    let (sums, ms) = (&runs[1].1, runs[1].2);
                    let op_sums = format!("{op}: partial sums, bits");
                    self.same_words_row(op_sums, desc, sums, &runs[0].1, ms);
                    let outs = [runs[0].0.clone(), runs[1].0.clone()];
                    self.same_bits_rows(&op, "16-bit copy", desc, &outs, runs[1].2);
                }
            }
        }
        Ok(())
    }

    /// The backward pass `d` (accumulating onto `dx0`) adding a second gradient first, against
    /// the pass onto the sum, in each form of x and dy it takes (see the caller).
    fn added_gradient_rows(
        &mut self,
        d: NormDims,
        (x, dy): (&[f32], &[f32]),
        (stats, gamma, beta): (&DevBuf, &DevBuf, &DevBuf),
        silu: Silu,
        dx0: &[f32],
        desc: &str,
    ) -> Result<()> {
        let half = Precision::Bf16;
        let r = self.rand(x.len(), -1.0, 1.0);
        let summed: Vec<f32> = dx0.iter().zip(&r).map(|(a, b)| a + b).collect();
        let rd = self.up(&r)?;
        let xs = self.stored_forms(x, (d.c % 4 == 0).then_some(half))?;
        let dys = self.stored_forms(dy, d.split.ilp.then_some(half))?;
        let base = shared_inputs((stats, gamma, beta), silu);
        let s = silu_label(silu);
        for (xb, x_half) in &xs {
            for (dyb, dy_half) in &dys {
                let (x_half, dy_half) = (*x_half, *dy_half);
                let inputs = NormBackwardIn {
                    x: xb.ptr,
                    x_half,
                    dy: dyb.ptr,
                    dy_half,
                    ..base
                };
                let (want, _) =
                    self.backward_run(d, inputs, (&summed, true, None), None, true, half)?;
                let onto = (dx0, true, Some(rd.ptr));
                let (got, ms) = self.backward_run(d, inputs, onto, None, true, half)?;
                let op = format!(
                    "groupnorm{s} input-grad+, adding a second gradient first{}{}",
                    if x_half.is_some() { ", 16-bit x" } else { "" },
                    if dy_half.is_some() { ", 16-bit dy" } else { "" },
                );
                self.same_bits_rows(&op, "16-bit copy", desc, &[want, got], ms);
            }
        }
        Ok(())
    }

    /// Rows holding a form's two outputs (`outs[1]`: the main one and `second`) to those of the
    /// form it must reproduce (`outs[0]`: the fp32 kernels' over widened values, say), bit for
    /// bit.
    fn same_bits_rows(
        &mut self,
        op: &str,
        second: &str,
        desc: &str,
        outs: &[(Vec<f32>, Vec<f32>)],
        ms: f64,
    ) {
        self.row_within(op.into(), desc.into(), &outs[1].0, &outs[0].0, ms, 0.0);
        let op = format!("{op}: {second}");
        self.row_within(op, desc.into(), &outs[1].1, &outs[0].1, ms, 0.0);
    }

    pub(super) fn group_norms(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (off, on, approx) = (Silu::Off, Silu::Accurate, Silu::Approx);
        for (n, h, w, c, groups, silu, accumulate) in [
            (1, 7, 5, 64, 32, on, false),
            (3, 6, 6, 96, 32, off, true),
            (2, 64, 64, 128, 32, on, true),
            (1, 5, 3, 3, 1, off, false),
            (1, 32, 32, 256, 32, on, true),
            // Several pixels a thread in the element passes (more than a grid's stride) and
            // per warp in the partial sums, with a remainder: the `_ilp` kernels' rounds, in
            // units of four channels and (c % 4 != 0) of one.
            (1, 96, 96, 256, 32, on, true),
            (1, 256, 256, 6, 3, on, true),
            // The approximate SiLU (INVDIFF_APPROX_SILU) in every form, to the CPU's accurate
            // one: three launches with and without the `_ilp` kernels, one pass, units of one.
            (2, 64, 64, 128, 32, approx, true),
            (1, 32, 32, 256, 32, approx, false),
            (1, 96, 96, 256, 32, approx, true),
            (1, 40, 40, 6, 3, approx, true),
        ] {
            let hw = h * w;
            let d = norm::Dims { n, hw, c, groups };
            // An offset mean, so that E[x²] - E[x]² is tested away from zero mean.
            let x = self.rand(n * hw * c, -1.0, 3.0);
            // The approximate SiLU also over |x| up to about 30 (its exponential's range
            // reduction rounds x log2(e), an error that grows with |x|; sigmoid saturates).
            let gain = if silu == approx { 12.0 } else { 1.0 };
            let gamma = self.rand(c, 0.5 * gain, 1.5 * gain);
            let beta = self.rand(c, -0.5, 0.5);
            let eps = 1e-6;
            let mut want = vec![0.0; x.len()];
            let stats = norm::forward(&x, d, &gamma, &beta, eps, silu.is_on(), &mut want);
            let dy = self.rand(x.len(), -1.0, 1.0);
            let dx0 = self.grad_start(x.len(), accumulate);
            let mut want_dx = dx0.clone();
            norm::backward(
                &x,
                d,
                &gamma,
                &beta,
                silu.is_on(),
                &stats,
                &dy,
                &mut want_dx,
                accumulate,
            );
            // Each form's fp32 outputs without the `_ilp` kernels (three launches, one pass),
            // which those kernels must reproduce bit for bit.
            let mut plain: [Option<(Vec<f32>, Vec<f32>)>; 2] = [None, None];
            // Three launches; one pass where the groups are small enough; each with and
            // without the `_ilp` kernels.
            for split in norm_forms(n, hw, c, groups, gpu.sms()) {
                let nd = NormDims {
                    n,
                    hw,
                    c,
                    groups,
                    split,
                };
                let (xd, gd, bd) = (self.up(&x)?, self.up(&gamma)?, self.up(&beta)?);
                let yd = self.zeros(x.len())?;
                let partial = self.zeros(split.partial_len(n, c))?;
                let sd = self.zeros(2 * n * groups)?;
                let affine = self.zeros(2 * n * c)?;
                let forward = |y, half_out| {
                    gpu.kernels.group_norm(
                        st,
                        nd,
                        xd.ptr,
                        None,
                        gd.ptr,
                        bd.ptr,
                        y,
                        partial.ptr,
                        sd.ptr,
                        affine.ptr,
                        eps,
                        silu,
                        half_out,
                    )
                };
                let ms = self.timed(|| Ok(()), || forward(yd.ptr, None))?;
                let got_y = yd.download(st)?;
                let desc = format!("n{n} {h}x{w} c{c} g{groups} ({})", split.form());
                let s = silu_label(silu);
                self.row(
                    format!("groupnorm{s} forward"),
                    desc.clone(),
                    &got_y,
                    &want,
                    ms,
                );
                // The 16-bit output that feeds tensor-core convolutions, and a 16-bit input.
                if c % 4 == 0 {
                    self.half_output_rows(
                        &format!("groupnorm{s} forward"),
                        &desc,
                        &want,
                        |out, precision| forward(out, Some(precision)),
                    )?;
                    for precision in [Precision::Bf16, Precision::Fp16] {
                        self.half_input_rows(nd, &x, (&gd, &bd), eps, silu, precision, &desc)?;
                    }
                }

                let dyd = self.up(&dy)?;
                let mut dxd = self.up(&dx0)?;
                let dx_ptr = dxd.ptr;
                let means = self.zeros(2 * n * groups)?;
                let backward = |dx, accumulate, add, half_out, copy| {
                    gpu.kernels.group_norm_backward(
                        st,
                        nd,
                        NormBackwardIn {
                            x: xd.ptr,
                            x_half: None,
                            dy_half: None,
                            dy: dyd.ptr,
                            gamma: gd.ptr,
                            beta: bd.ptr,
                            stats: sd.ptr,
                            silu,
                        },
                        NormBackwardOut {
                            partial: partial.ptr,
                            means: means.ptr,
                            dx,
                            accumulate,
                            add,
                            half_out,
                            copy,
                            ..NormBackwardOut::default()
                        },
                    )
                };
                let ms = self.timed(
                    || dxd.write(st, &dx0),
                    || backward(dx_ptr, accumulate, None, None, None),
                )?;
                let got_dx = dxd.download(st)?;
                if silu == approx {
                    let inputs = (xd.ptr, dyd.ptr, gd.ptr, bd.ptr);
                    let onto = (dx0.as_slice(), accumulate);
                    self.approx_kernels_ran(nd, inputs, eps, onto, (&got_y, &got_dx), &desc)?;
                }
                self.row(
                    format!("groupnorm{s} input-grad{}", acc_name(accumulate)),
                    desc.clone(),
                    &got_dx,
                    &want_dx,
                    ms,
                );
                // The fp32 input gradient with its 16-bit copy (INVDIFF_HALF_COPY_FUSED).
                self.half_copy_rows(
                    &format!("groupnorm{s} input-grad{}", acc_name(accumulate)),
                    &desc,
                    &got_dx,
                    |out, precision| {
                        dxd.write(st, &dx0)?;
                        backward(dx_ptr, accumulate, None, None, Some((out, precision)))?;
                        dxd.download(st)
                    },
                )?;
                // A second gradient added onto dx first (INVDIFF_GN_ADD_RESIDUAL): the same bits
                // as the pass onto dx + it (what add_into would have left), with the 16-bit copy;
                // over an fp32 x and (units of four) a 16-bit one, from an fp32 dy and (`_ilp`)
                // a 16-bit one.
                if accumulate {
                    self.added_gradient_rows(nd, (&x, &dy), (&sd, &gd, &bd), silu, &dx0, &desc)?;
                }
                let form = &mut plain[split.one_pass.is_some() as usize];
                match form {
                    Some((y, dx)) if split.ilp => {
                        let same = format!("{desc} against the same form's plain kernels, bits");
                        self.row_within(
                            format!("groupnorm{s} forward"),
                            same.clone(),
                            &got_y,
                            y,
                            0.0,
                            0.0,
                        );
                        self.row_within(
                            format!("groupnorm{s} input-grad{}", acc_name(accumulate)),
                            same,
                            &got_dx,
                            dx,
                            0.0,
                            0.0,
                        );
                    }
                    _ => *form = Some((got_y, got_dx)),
                }
                // The 16-bit input gradient (overwriting) that feeds a tensor-core input gradient;
                // the fp32 one from a 16-bit x.
                if c % 4 == 0 {
                    for precision in [Precision::Bf16, Precision::Fp16] {
                        self.half_input_backward_rows(
                            nd,
                            &x,
                            (&dyd, &sd),
                            (&gd, &bd),
                            (silu, accumulate),
                            &dx0,
                            precision,
                            &desc,
                        )?;
                    }
                    let mut want = vec![0.0; x.len()];
                    let on = silu.is_on();
                    norm::backward(&x, d, &gamma, &beta, on, &stats, &dy, &mut want, false);
                    self.half_output_rows(
                        &format!("groupnorm{s} input-grad"),
                        &desc,
                        &want,
                        |out, precision| backward(out, false, None, Some(precision), None),
                    )?;
                }
                // From a 16-bit output gradient (the `_dy16` forms of the `_ilp` kernels).
                if split.ilp {
                    for precision in [Precision::Bf16, Precision::Fp16] {
                        self.half_grad_backward_rows(
                            nd,
                            (&x, &dy),
                            (&sd, &gd, &bd),
                            (silu, accumulate),
                            &dx0,
                            precision,
                            &desc,
                        )?;
                    }
                }
            }
        }
        self.concat_norm_sums()
    }

    /// Rows showing that the approximate SiLU's kernels ran (kernels/norm_approx.cu): GroupNorm
    /// `d`'s fp32 output `got.0` and input gradient `got.1` (onto `dx0` where accumulating)
    /// differ from those of the accurate kernels of the same form, run here on buffers of their
    /// own (so that no later row reads what they wrote).
    fn approx_kernels_ran(
        &mut self,
        d: NormDims,
        (x, dy, gamma, beta): (DPtr, DPtr, DPtr, DPtr),
        eps: f32,
        (dx0, accumulate): (&[f32], bool),
        got: (&[f32], &[f32]),
        desc: &str,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (n, len) = (d.n, dx0.len());
        let y = self.zeros(len)?;
        let partial = self.zeros(d.split.partial_len(n, d.c))?;
        let stats = self.zeros(2 * n * d.groups)?;
        let (affine, means) = (self.zeros(2 * n * d.c)?, self.zeros(2 * n * d.groups)?);
        let dx = self.up(dx0)?;
        let on = Silu::Accurate;
        let k = &gpu.kernels;
        k.group_norm(
            st,
            d,
            x,
            None,
            gamma,
            beta,
            y.ptr,
            partial.ptr,
            stats.ptr,
            affine.ptr,
            eps,
            on,
            None,
        )?;
        let inputs = NormBackwardIn {
            x,
            dy,
            gamma,
            beta,
            stats: stats.ptr,
            silu: on,
            ..NormBackwardIn::default()
        };
        let outputs = NormBackwardOut {
            partial: partial.ptr,
            means: means.ptr,
            dx: dx.ptr,
            accumulate,
            ..NormBackwardOut::default()
        };
        k.group_norm_backward(st, d, inputs, outputs)?;
        let accurate = [y.download(st)?, dx.download(st)?];
        let s = silu_label(Silu::Approx);
        for ((what, got), other) in [("forward", got.0), ("input-grad", got.1)]
            .into_iter()
            .zip(&accurate)
        {
            let op = format!("groupnorm{s} {what} vs the accurate SiLU's kernels");
            self.differs_row(op, desc, got, other);
        }
        Ok(())
    }

    /// The candidates' celebahq networks in bf16 and fp16 as configured but with the
    /// approximate SiLU (`INVDIFF_APPROX_SILU`): every GroupNorm step with a SiLU takes it
    /// (a row, from the forward + VJP program's profile), the eps and input gradient differ
    /// from the accurate SiLU's (a row, with their distance: equal outputs would mean that
    /// no kernel was given it), and the forward and forward + VJP are within the networks'
    /// tolerance of the CPU's fp32 results.
    pub(super) fn approx_silu_unets(&mut self, ordinal: usize) -> Result<()> {
        let what = "approximate SiLU";
        self.for_candidate_networks(ordinal, true, |t, net, precision, gpu| {
            let label = format!("celebahq {precision} forward + vjp, {what}");
            gpu.set_approx_silu(false);
            let accurate = Self::network_outputs(gpu, net)?;
            gpu.set_approx_silu(true);
            let profile = gpu.profile(net.n, net.h, net.w, true, 1)?;
            let with_silu = |s: &&crate::cuda::StepTime| {
                s.kind.starts_with("groupnorm") && s.shape.ends_with("+ SiLU")
            };
            let norms = profile.steps.iter().filter(with_silu).count();
            let approx = profile
                .steps
                .iter()
                .filter(with_silu)
                .filter(|s| s.variant.contains(what))
                .count();
            t.check_row(
                format!("{label}: the GroupNorms with SiLU take it"),
                format!("{}: {approx} of {norms}", net.desc),
                norms > 0 && approx == norms,
            );
            let (eps, grad) = Self::network_outputs(gpu, net)?;
            for (name, got, want) in [("eps", &eps, &accurate.0), ("vjp", &grad, &accurate.1)] {
                let op = format!("{label}: {name} differs from the accurate SiLU's");
                t.differs_row(op, &net.desc, got.data(), want.data());
            }
            t.cpu_network_rows(gpu, net, &format!("celebahq {precision}"), what)
        })
    }

    /// A concatenation that also writes its GroupNorm's partial sums (`gn_concat_partial`,
    /// INVDIFF_GN_PRODUCER_SUMS), then that GroupNorm without its own first launch: the
    /// concatenation, its 16-bit copy, the partial sums and the GroupNorm's output the same
    /// bits as the plain concatenation and three-launch GroupNorm's (the same sums in the same
    /// order). Both the float4 and the scalar concatenation, one pixel a chunk's thread and
    /// many (the last shape's chunks are 125 pixels on 132 multiprocessors). Again with the
    /// concatenation in 16 bits only and the GroupNorm reading it so (INVDIFF_GN_HALF_INPUT):
    /// against `concat_channels_half` and the `_x16` GroupNorm.
    fn concat_norm_sums(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let k = &gpu.kernels;
        // (The second takes the one-channel kernel, the third two channels a thread over a
        // partial block of them; the others whole blocks.)
        let shapes = [
            (2, 63, 40, 24, 8, Precision::Bf16),
            (1, 37, 5, 11, 4, Precision::Fp16),
            (1, 50, 28, 12, 4, Precision::Fp16),
            (1, 1024, 128, 128, 32, Precision::Bf16),
            (1, 16384, 128, 128, 32, Precision::Fp16),
        ];
        for ((n, hw, ca, cb, groups, precision), only16) in
            shapes.into_iter().flat_map(|s| [(s, false), (s, true)])
        {
            let c = ca + cb;
            let host = [
                self.rand(n * hw * ca, -1.0, 3.0),
                self.rand(n * hw * cb, -1.0, 3.0),
                self.rand(c, 0.5, 1.5),
                self.rand(c, -0.5, 0.5),
            ];
            let [a, b, gamma, beta] = [0, 1, 2, 3].map(|i| self.up(&host[i]));
            let (a, b, gamma, beta) = (a?, b?, gamma?, beta?);
            let three = plan_norm(n, hw, c, groups, gpu.sms(), false, true);
            let given = NormSplit {
                from_producer: true,
                ..three
            };
            let desc = format!(
                "n{n} {hw} px {ca}+{cb} ch g{groups} ({}, {precision} {})",
                given.form(),
                if only16 { "only" } else { "copy" }
            );
            // In 16 bits only: no fp32 concatenation, a GroupNorm of 16-bit input and output.
            let half_gn = only16.then_some(precision);
            let mut outs = Vec::new();
            for fused in [false, true] {
                let (y, y16, gn) = (
                    self.zeros(n * hw * c)?,
                    self.zeros((n * hw * c).div_ceil(2))?,
                    self.zeros(n * hw * c)?,
                );
                let partial = self.zeros(three.partial_len(n, c))?;
                let (stats, affine) = (self.zeros(2 * n * groups)?, self.zeros(2 * n * c)?);
                let half = Some((y16.ptr, precision));
                let (y_ptr, x) = if only16 { (0, y16.ptr) } else { (y.ptr, y.ptr) };
                let run = || {
                    if fused {
                        k.concat_with_norm_sums(
                            st,
                            a.ptr,
                            b.ptr,
                            y_ptr,
                            half,
                            n,
                            hw,
                            (ca, cb),
                            given,
                            partial.ptr,
                        )?;
                    } else {
                        k.concat(st, a.ptr, b.ptr, y_ptr, half, n * hw, ca, cb)?;
                    }
                    let split = if fused { given } else { three };
                    let d = NormDims {
                        n,
                        hw,
                        c,
                        groups,
                        split,
                    };
                    k.group_norm(
                        st,
                        d,
                        x,
                        half_gn,
                        gamma.ptr,
                        beta.ptr,
                        gn.ptr,
                        partial.ptr,
                        stats.ptr,
                        affine.ptr,
                        1e-6,
                        Silu::Accurate,
                        half_gn,
                    )
                };
                let ms = self.timed(|| Ok(()), run)?;
                let copy = unpack_half(&y16.download(st)?, n * hw * c, precision);
                let gn = match half_gn {
                    Some(p) => unpack_half(&gn.download(st)?, n * hw * c, p),
                    None => gn.download(st)?,
                };
                outs.push(([y.download(st)?, copy, gn], partial.download(st)?, ms));
            }
            let ([y, y16, gn], sums, _) = &outs[0];
            let ([fy, fy16, fgn], fsums, ms) = &outs[1];
            // The f64 partial sums (two f32 slots each), compared as bits.
            let plain = if only16 {
                "gn_partial_x16's"
            } else {
                "gn_partial's"
            };
            let op = format!("concat with GroupNorm sums: partial sums vs {plain}, bits");
            self.same_words_row(op, &desc, fsums, sums, *ms);
            for (what, got, want) in [
                ("concatenation", fy, y),
                ("its 16-bit copy", fy16, y16),
                ("GroupNorm+silu output", fgn, gn),
            ] {
                self.row_within(
                    format!("concat with GroupNorm sums: {what} vs plain, bits"),
                    desc.clone(),
                    got,
                    want,
                    *ms,
                    0.0,
                );
            }
            // In 16 bits only, with sides already written by their producers
            // (INVDIFF_CONCAT_FROM_PRODUCERS; the lowering places only even sides): read back
            // for the sums, the same bits; with the read-back sums four and eight pixels ahead
            // (INVDIFF_CONCAT_SUMS_AHEAD).
            let placements = [[true, false], [false, true], [true, true]];
            let cases = [false, true]
                .into_iter()
                .flat_map(|a| placements.map(|p| (a, p)));
            for (ahead, placed) in cases.filter(|_| only16 && ca % 2 == 0 && cb % 2 == 0) {
                let kernels = k.with_launch(self.launch_with(|l| l.concat_sums_ahead = ahead));
                let ahead = if ahead { ", eight ahead" } else { "" };
                let out = self.up(&placed_sides(fy16, (ca, cb), placed, precision))?;
                let partial = self.zeros(given.partial_len(n, c))?;
                let side = |p: bool, d: DPtr| if p { 0 } else { d };
                kernels.concat_with_norm_sums(
                    st,
                    side(placed[0], a.ptr),
                    side(placed[1], b.ptr),
                    0,
                    Some((out.ptr, precision)),
                    n,
                    hw,
                    (ca, cb),
                    given,
                    partial.ptr,
                )?;
                let sums_got = partial.download(st)?;
                let op = format!(
                    "concat with GroupNorm sums, side {placed:?} placed{ahead}: partial sums vs \
                     unplaced, bits"
                );
                self.same_words_row(op, &desc, &sums_got, fsums, 0.0);
                // (With both placed it writes no value: nothing to compare.)
                if placed != [true; 2] {
                    let got = unpack_half(&out.download(st)?, n * hw * c, precision);
                    self.row_within(
                            format!("concat with GroupNorm sums, side {placed:?} placed{ahead}: 16-bit values vs unplaced, bits"),
                            desc.clone(),
                            &got,
                            fy16,
                            0.0,
                            0.0,
                        );
                }
            }
        }
        Ok(())
    }
}
