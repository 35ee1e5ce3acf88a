//! Linear layers: the few-row kernels of the time embedding, alone and batched.

use super::{acc_name, path, Tester};
use crate::cpu::linear::{self, LinearParams};
use crate::cuda::kernels::{at, linear_batch_table, plan_conv, ConvPtrs, ConvShape};
use crate::cuda::weights::transpose;
use crate::Result;

impl Tester<'_> {
    pub(super) fn linears(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        // Few rows (the time-embedding MLP): the warp-per-output kernel. Widths that end within
        // a warp's first, second or third round of loads (kernels/linear.cu: 32 x DOT_AHEAD =
        // 256 elements), so that the lanes' last rounds hold different numbers of elements.
        for (rows, inp, out, silu_in, with_res, out_div) in [
            (3, 40, 24, true, true, 1.5f32),
            (1, 128, 512, false, false, 1.0),
            (2, 250, 40, true, false, 1.0),
            (2, 300, 40, true, false, 1.0),
            (1, 600, 33, false, true, 2.0),
        ] {
            let x = self.rand(rows * inp, -2.0, 2.0);
            let bound = 1.0 / (inp as f32).sqrt();
            let wt = self.rand(out * inp, -bound, bound);
            let b = self.rand(out, -1.0, 1.0);
            let res = if with_res {
                Some(self.rand(rows * out, -1.0, 1.0))
            } else {
                None
            };
            let p = LinearParams::new(wt.clone(), b.clone(), out, inp);
            let mut want = vec![0.0; rows * out];
            linear::forward(&p, &x, silu_in, res.as_deref(), out_div, &mut want, 1);
            let (xd, wd, bd) = (self.up(&x)?, self.up(&wt)?, self.up(&b)?);
            let rd = res.as_deref().map(|r| self.up(r)).transpose()?;
            let yd = self.zeros(want.len())?;
            let res_ptr = rd.as_ref().map_or(0, |d| d.ptr);
            let ms = self.timed(
                || Ok(()),
                || {
                    gpu.kernels.linear_rows(
                        st, xd.ptr, wd.ptr, bd.ptr, res_ptr, yd.ptr, rows, inp, out, silu_in,
                        out_div,
                    )
                },
            )?;
            let got = yd.download(st)?;
            let op = format!(
                "linear rows{}{}",
                if silu_in { " silu-in" } else { "" },
                if with_res { " +res /div" } else { "" }
            );
            self.row(op, format!("{rows} x {inp}->{out}"), &got, &want, ms);
        }
        // Several few-row layers on the same input in one launch (every resnet's projection of
        // the time embedding): bit for bit what linear_rows computes for each, and the CPU's.
        for (rows, inp) in [(1, 512), (3, 72)] {
            let outs = [128, 256, 512, 24];
            let x = self.rand(rows * inp, -2.0, 2.0);
            let bound = 1.0 / (inp as f32).sqrt();
            let total: usize = outs.iter().sum();
            let xd = self.up(&x)?;
            let (single, batched) = (self.zeros(rows * total)?, self.zeros(rows * total)?);
            let (mut layers, mut devs, mut want) = (Vec::new(), Vec::new(), Vec::new());
            let mut at_out = 0;
            for &out in &outs {
                let wt = self.rand(out * inp, -bound, bound);
                let b = self.rand(out, -1.0, 1.0);
                let p = LinearParams::new(wt.clone(), b.clone(), out, inp);
                let mut y = vec![0.0; rows * out];
                linear::forward(&p, &x, true, None, 1.0, &mut y, 1);
                want.extend(y);
                let (wd, bd) = (self.up(&wt)?, self.up(&b)?);
                layers.push((wd.ptr, bd.ptr, at(batched.ptr, at_out), out));
                gpu.kernels.linear_rows(
                    st,
                    xd.ptr,
                    wd.ptr,
                    bd.ptr,
                    0,
                    at(single.ptr, at_out),
                    rows,
                    inp,
                    out,
                    true,
                    1.0,
                )?;
                devs.push((wd, bd));
                at_out += rows * out;
            }
            let table = self.up(&linear_batch_table(&layers)?)?;
            let ms = self.timed(
                || Ok(()),
                || {
                    gpu.kernels.linear_batch(
                        st,
                        xd.ptr,
                        table.ptr,
                        outs.len(),
                        total,
                        rows,
                        inp,
                        true,
                        1.0,
                    )
                },
            )?;
            let got = batched.download(st)?;
            let shape = format!("{rows} x {inp}->{outs:?}");
            self.row_within(
                "linear batch silu-in, bits of linear_rows".into(),
                shape.clone(),
                &got,
                &single.download(st)?,
                ms,
                0.0,
            );
            self.row("linear batch silu-in".into(), shape, &got, &want, ms);
        }
        // Token-wise (q/k/v, attention output): the implicit GEMM with one tap.
        for (rows, inp, out, accumulate) in [(37, 48, 144, false), (256, 512, 1536, true)] {
            let x = self.rand(rows * inp, -1.0, 1.0);
            let bound = 1.0 / (inp as f32).sqrt();
            let wt = self.rand(out * inp, -bound, bound);
            let b = self.rand(out, -1.0, 1.0);
            let res = self.rand(rows * out, -1.0, 1.0);
            let p = LinearParams::new(wt.clone(), b.clone(), out, inp);
            let mut want = vec![0.0; rows * out];
            linear::forward(&p, &x, false, Some(&res), 1.25, &mut want, rows);
            let (xd, wtd, wd, bd, rd) = (
                self.up(&x)?,
                self.up(&transpose(&wt, out, inp))?,
                self.up(&wt)?,
                self.up(&b)?,
                self.up(&res)?,
            );
            let yd = self.zeros(want.len())?;
            let shape = ConvShape::linear(1, rows, inp, out);
            let plan = plan_conv(&shape, gpu.sms());
            let ws = self.zeros(plan.workspace_len(&shape))?;
            let ptrs = ConvPtrs {
                x: xd.ptr,
                w: wtd.ptr,
                y: yd.ptr,
                bias: bd.ptr,
                res: rd.ptr,
                ws: ws.ptr,
                ..ConvPtrs::default()
            };
            let ms = self.timed(
                || Ok(()),
                || gpu.kernels.conv(st, &shape, &plan, ptrs, 1.25, false),
            )?;
            let got = yd.download(st)?;
            let desc = format!("{rows} x {inp}->{out}");
            self.row(
                format!(
                    "linear tokens +res /div [{}]",
                    path(plan.kernel, plan.splits)
                ),
                desc.clone(),
                &got,
                &want,
                ms,
            );

            let dy = self.rand(rows * out, -1.0, 1.0);
            let dx0 = self.grad_start(rows * inp, accumulate);
            let mut want_dx = dx0.clone();
            linear::backward_input(&p, &dy, &mut want_dx, accumulate, rows);
            let dyd = self.up(&dy)?;
            let mut dxd = self.up(&dx0)?;
            let dx_ptr = dxd.ptr;
            let shape = ConvShape::linear(1, rows, out, inp);
            let plan = plan_conv(&shape, gpu.sms());
            let ws = self.zeros(plan.workspace_len(&shape))?;
            let ptrs = ConvPtrs {
                x: dyd.ptr,
                w: wd.ptr,
                y: dx_ptr,
                ws: ws.ptr,
                ..ConvPtrs::default()
            };
            let ms = self.timed(
                || dxd.write(st, &dx0),
                || gpu.kernels.conv(st, &shape, &plan, ptrs, 1.0, accumulate),
            )?;
            let got = dxd.download(st)?;
            self.row(
                format!(
                    "linear tokens input-grad{} [{}]",
                    acc_name(accumulate),
                    path(plan.kernel, plan.splits)
                ),
                desc,
                &got,
                &want_dx,
                ms,
            );
        }
        Ok(())
    }
}
