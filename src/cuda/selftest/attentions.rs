//! The batched products, softmax and attention, unfused and fused.

use super::{acc_name, tensor_core_tolerance, Tester, TOLERANCE};
use crate::cpu::attention;
use crate::cuda::kernels::{flash_fits, Gemm, GemmForm};
use crate::cuda::precision::Precision;
use crate::cuda::unet::{attention_backward, attention_forward, Attn, AttnKernel};
use crate::cuda::weights::DevBuf;
use crate::Result;

/// The attention input gradient with its four products on tf32 tensor cores, against the
/// fp32 CPU result.
const ATTENTION_TF32_GRAD: f64 = 5e-3;

impl Tester<'_> {
    /// The attention products' kernel in both tile sizes, with and without the next K slice
    /// prefetched (`INVDIFF_GEMM_PREFETCH`): a strided batch (three K slices, the last
    /// partial), scaled and accumulated, against the CPU, and every form against the plain
    /// 64-wide one, held to 0 (each output sums its products in the same order); the tiles
    /// whose warps split K (`INVDIFF_GEMM_WARP_K`; five of the eight warps with a share, the
    /// last short) against the CPU. Two layouts, for the two ways each operand's loads follow
    /// its unit stride: A by rows and B by columns (`P v`'s), then both along K (`q kᵀ`'s).
    /// Then small products overwriting C with K shorter than a warp's slice, and with no K at
    /// all, adding nothing to C.
    fn batched_products(&mut self) -> Result<()> {
        let (m, n, k, outer, inner, alpha) = (100, 70, 130, 2, 3, 0.5f32);
        // (A's row and column strides, B's), as `Gemm` takes them.
        for (a_rs, a_cs, b_rs, b_cs, layout) in [
            (1, m, n, 1, "A by columns, B by rows"),
            (k, 1, 1, k, "both along K"),
        ] {
            self.batched_product_rows(
                (m, n, k, outer, inner, alpha),
                (a_rs, a_cs, b_rs, b_cs),
                (layout, true),
            )?;
        }
        // Overwriting, with a K shorter than one warp's slice, and with no K at all (C kept).
        for (k, accumulate) in [(9, false), (0, true)] {
            self.batched_product_rows(
                (20, 40, k, 1, 2, alpha),
                (k, 1, 1, k),
                ("both along K", accumulate),
            )?;
        }
        Ok(())
    }

    /// [`Self::batched_products`]' rows for one layout.
    fn batched_product_rows(
        &mut self,
        (m, n, k, outer, inner, alpha): (usize, usize, usize, usize, usize, f32),
        (a_rs, a_cs, b_rs, b_cs): (usize, usize, usize, usize),
        (layout, accumulate): (&str, bool),
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let batch = outer * inner;
        let a = self.rand(batch * m * k, -1.0, 1.0);
        let b = self.rand(batch * k * n, -1.0, 1.0);
        let c0 = self.rand(batch * m * n, -1.0, 1.0);
        // A(i, kk) of batch z at a[z m k + i a_rs + kk a_cs], B(kk, j) at b[z k n + kk b_rs + j b_cs].
        let mut want = if accumulate {
            c0.clone()
        } else {
            vec![0.0; c0.len()]
        };
        for z in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|kk| {
                            f64::from(a[z * m * k + i * a_rs + kk * a_cs])
                                * f64::from(b[z * k * n + kk * b_rs + j * b_cs])
                        })
                        .sum();
                    want[z * m * n + i * n + j] += (f64::from(alpha) * dot) as f32;
                }
            }
        }
        let (ad, bd) = (self.up(&a)?, self.up(&b)?);
        let mut cd = self.up(&c0)?;
        let g = Gemm {
            a: ad.ptr,
            b: bd.ptr,
            c: cd.ptr,
            m,
            n,
            k,
            a_rs,
            a_cs,
            b_rs,
            b_cs,
            c_rs: n,
            outer,
            inner,
            a_bo: inner * m * k,
            a_bi: m * k,
            b_bo: inner * k * n,
            b_bi: k * n,
            c_bo: inner * m * n,
            c_bi: m * n,
            alpha,
            accumulate,
            tf32: false,
        };
        let desc = format!(
            "{batch} x {m}x{k} . {k}x{n}, {}, {layout}",
            if accumulate {
                "accumulating"
            } else {
                "overwriting"
            }
        );
        let mut plain = None;
        for (tile, prefetch) in [(64, false), (32, false), (64, true), (32, true)] {
            let form = GemmForm::Tiles { tile, prefetch };
            let ms = self.timed(|| cd.write(st, &c0), || gpu.kernels.gemm_as(st, &g, form))?;
            let got = cd.download(st)?;
            let form = format!(
                "{tile}-wide tiles{}",
                if prefetch { ", slices prefetched" } else { "" }
            );
            self.row(
                format!("batched product, {form}"),
                desc.clone(),
                &got,
                &want,
                ms,
            );
            match &plain {
                None => plain = Some(got),
                Some(first) => self.row_within(
                    format!("batched product, {form} vs 64-wide tiles"),
                    desc.clone(),
                    &got,
                    first,
                    0.0,
                    0.0,
                ),
            }
        }
        self.paired_product_rows(&g, &c0, &mut cd, &desc)?;
        let ms = self.timed(
            || cd.write(st, &c0),
            || gpu.kernels.gemm_as(st, &g, GemmForm::WarpK),
        )?;
        self.row(
            "batched product, warps splitting K".into(),
            desc.clone(),
            &cd.download(st)?,
            &want,
            ms,
        );
        // On the tf32 tensor cores: operands rounded to tf32.
        let tf32 = Gemm { tf32: true, ..g };
        let ms = self.timed(|| cd.write(st, &c0), || gpu.kernels.gemm(st, &tf32))?;
        self.row_within(
            "batched product, tf32 tensor cores".into(),
            desc,
            &cd.download(st)?,
            &want,
            ms,
            tensor_core_tolerance(Precision::Tf32),
        );
        Ok(())
    }

    /// Two products in one launch (`gemm_pair*`, INVDIFF_GEMM_PAIRS) in every tile form and
    /// on tf32, each output against its product's own launch to the bit: `g` (whose C is
    /// `cd`, starting from `c0`) beside a second of its operands with fewer rows, columns and
    /// (where `g` has more than one) images, another scale and the other accumulation, into a
    /// C of its own; in both orders, so that the first product and the second each have
    /// blocks past their tiles.
    fn paired_product_rows(
        &mut self,
        g: &Gemm,
        c0: &[f32],
        cd: &mut DevBuf,
        desc: &str,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let c1 = self.rand(c0.len(), -1.0, 1.0);
        let mut c1d = self.up(&c1)?;
        for (tile, prefetch, tf32) in [
            (64, false, false),
            (32, false, false),
            (64, true, false),
            (32, true, false),
            (64, false, true),
        ] {
            let big = Gemm { tf32, ..*g };
            let small = Gemm {
                c: c1d.ptr,
                m: g.m - g.m / 3,
                n: g.n - g.n / 4,
                outer: g.outer.max(2) - 1,
                alpha: 2.0,
                accumulate: !g.accumulate,
                ..big
            };
            let form = GemmForm::Tiles { tile, prefetch };
            cd.write(st, c0)?;
            c1d.write(st, &c1)?;
            gpu.kernels.gemm_as(st, &big, form)?;
            gpu.kernels.gemm_as(st, &small, form)?;
            let want = [cd.download(st)?, c1d.download(st)?];
            let form = format!(
                "{tile}-wide tiles{}{}",
                if prefetch { ", slices prefetched" } else { "" },
                if tf32 { ", tf32" } else { "" }
            );
            for (order, g0, g1) in [
                ("larger first", &big, &small),
                ("smaller first", &small, &big),
            ] {
                let ms = self.timed(
                    || {
                        cd.write(st, c0)?;
                        c1d.write(st, &c1)
                    },
                    || gpu.kernels.gemm_pair_as(st, g0, g1, tile, prefetch),
                )?;
                let got = [cd.download(st)?, c1d.download(st)?];
                for (which, got, want) in [
                    ("larger", &got[0], &want[0]),
                    ("smaller", &got[1], &want[1]),
                ] {
                    self.row_within(
                        format!("paired products, {form}, {order}: the {which} vs its own launch"),
                        desc.to_string(),
                        got,
                        want,
                        ms,
                        0.0,
                    );
                }
            }
        }
        Ok(())
    }

    pub(super) fn attentions(&mut self) -> Result<()> {
        self.batched_products()?;
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        // The last two: the fused kernels' shapes (heads of 64-column chunks), with a partial
        // row tile and two chunks of head width; the celebahq attention itself (1 x 512 at 256
        // tokens).
        for (n, tokens, heads, head_dim, accumulate) in [
            (1, 37, 1, 16, false),
            (3, 64, 4, 8, true),
            (2, 256, 1, 64, false),
            (2, 100, 2, 128, true),
            (1, 256, 1, 512, false),
        ] {
            let inner = heads * head_dim;
            let d = attention::Dims {
                n,
                tokens,
                heads,
                head_dim,
            };
            let qkv = self.rand(n * tokens * 3 * inner, -1.5, 1.5);
            let mut want = vec![0.0; n * tokens * inner];
            let probs =
                attention::forward(&qkv, d, &mut want, true).expect("asked for the probabilities");
            let dout = self.rand(want.len(), -1.0, 1.0);
            let g0 = self.grad_start(qkv.len(), accumulate);
            let mut want_g = g0.clone();
            attention::backward(&qkv, &probs, d, &dout, &mut want_g, accumulate);
            let desc = format!("n{n} L{tokens} {heads}x{head_dim}");
            let qd = self.up(&qkv)?;
            let dd = self.up(&dout)?;
            // The products in fp32, then on the tf32 tensor cores (INVDIFF_ATTN_TF32), then
            // fused (INVDIFF_ATTN_FLASH, tf32, where the head width allows) against the same
            // fp32 CPU results: each product within tf32's rounding, the gradient's four
            // (through the softmax's subtraction) within a few times that.
            let tf32_limits = (tensor_core_tolerance(Precision::Tf32), ATTENTION_TF32_GRAD);
            let mut kernels = vec![
                (AttnKernel::Products, "", (TOLERANCE, TOLERANCE)),
                (AttnKernel::Tf32Products, ", tf32 products", tf32_limits),
            ];
            if flash_fits(head_dim) && gpu.kernels.capabilities().flash {
                kernels.push((AttnKernel::Flash, ", fused", tf32_limits));
            }
            for (kernel, mode, limits) in kernels {
                let a = Attn {
                    n,
                    tokens,
                    heads,
                    head_dim,
                    kernel,
                };
                let pd = self.zeros(n * heads * kernel.saved_len(tokens))?;
                let od = self.zeros(want.len())?;
                let ms = self.timed(
                    || Ok(()),
                    || attention_forward(&gpu.kernels, st, a, qd.ptr, pd.ptr, od.ptr),
                )?;
                self.row_within(
                    format!("attention forward{mode}"),
                    desc.clone(),
                    &od.download(st)?,
                    &want,
                    ms,
                    limits.0,
                );
                let mut gd = self.up(&g0)?;
                let g_ptr = gd.ptr;
                let scratch = self.zeros(n * heads * kernel.saved_len(tokens))?;
                // Unpaired, then (unfused) with its products paired (INVDIFF_GEMM_PAIRS): the
                // same bits, unless INVDIFF_GEMM_WARP_K splits the unpaired fp32 products' K
                // (the pairs take the tiles), when both are held to the CPU.
                let pairs: &[bool] = match kernel {
                    AttnKernel::Flash => &[false],
                    _ => &[false, true],
                };
                let split_k =
                    kernel == AttnKernel::Products && gpu.kernels.launch_switches().gemm_warp_k;
                let mut unpaired = None;
                for &paired in pairs {
                    let ms = self.timed(
                        || gd.write(st, &g0),
                        || {
                            attention_backward(
                                &gpu.kernels,
                                st,
                                a,
                                qd.ptr,
                                pd.ptr,
                                od.ptr,
                                dd.ptr,
                                g_ptr,
                                scratch.ptr,
                                accumulate,
                                paired,
                            )
                        },
                    )?;
                    let got = gd.download(st)?;
                    let op = format!("attention input-grad{}{mode}", acc_name(accumulate));
                    match &unpaired {
                        None => {
                            self.row_within(op, desc.clone(), &got, &want_g, ms, limits.1);
                            unpaired = Some(got);
                        }
                        Some(_) if split_k => {
                            let op = format!("{op}, products paired");
                            self.row_within(op, desc.clone(), &got, &want_g, ms, limits.1);
                        }
                        Some(first) => {
                            let op = format!("{op}, products paired vs one a launch");
                            self.row_within(op, desc.clone(), &got, first, ms, 0.0);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
