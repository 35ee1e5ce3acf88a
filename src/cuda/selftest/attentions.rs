//! The batched products, softmax and attention, unfused and fused.

use super::{acc_name, tensor_core_tolerance, unpack_half, Tester, TOLERANCE};
use crate::cpu::attention;
use crate::cuda::kernels::{flash_fits, gemm_form, rows_fits, Gemm, GemmForm};
use crate::cuda::precision::Precision;
use crate::cuda::unet::{attention_backward, attention_forward, Attn, AttnKernel};
use crate::cuda::weights::DevBuf;
use crate::Result;

/// The attention input gradient with its four products on tf32 tensor cores, against the
/// fp32 CPU result.
const ATTENTION_TF32_GRAD: f64 = 5e-3;

/// The attention in rows (split-bf16 products, about 17 significant bits), forward and
/// backward, against the fp32 CPU results.
const ATTENTION_ROWS: f64 = 1e-4;

/// The 16-bit type a shape's copy rows use: both, over the shapes.
fn half_precision(tokens: usize) -> Precision {
    if tokens % 2 == 0 {
        Precision::Bf16
    } else {
        Precision::Fp16
    }
}

impl Tester<'_> {
    /// The attention products' kernel in both tile sizes: a strided batch (three K slices, the
    /// last partial), scaled and accumulated, against the CPU, and the 32-wide tiles against
    /// the 64-wide ones, held to 0 (each output sums its products in the same order); the
    /// tiles whose warps split K (`INVDIFF_GEMM_WARP_K`; five of the eight warps with a share,
    /// the last short) against the CPU. Two layouts, for the two ways each operand's loads follow
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
        for tile in [64, 32] {
            let form = GemmForm::Tiles { tile };
            let ms = self.timed(|| cd.write(st, &c0), || gpu.kernels.gemm_as(st, &g, form))?;
            let got = cd.download(st)?;
            let form = format!("{tile}-wide tiles");
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
        let ms = self.timed(|| cd.write(st, &c0), || gpu.kernels.gemm(st, &tf32, false))?;
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

    pub(super) fn attentions(&mut self) -> Result<()> {
        self.batched_products()?;
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        // Heads of 64 and 128 channels: the fused kernels' shapes (64-column chunks), with a
        // partial row tile and two chunks of head width; the celebahq attentions themselves
        // (1 x 512 at 256 and 64 tokens). The softmax (kernels/attention.cu) holds rows of up to 256 in
        // registers: 20 tokens leave lanes without an element, 256 fill every lane's eight,
        // 257 and 300 take its passes over memory. Attention in rows takes the heads of 16
        // channels and more: 33 tokens end in a split of one key and a query tile of one.
        for (n, tokens, heads, head_dim, accumulate) in [
            (2, 33, 3, 48, false),
            (1, 37, 1, 16, false),
            (2, 20, 2, 8, false),
            (1, 257, 1, 16, false),
            (1, 300, 1, 16, true),
            (3, 64, 4, 8, true),
            (2, 256, 1, 64, false),
            (2, 100, 2, 128, true),
            (1, 256, 1, 512, false),
            (1, 64, 1, 512, true),
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
            let rows_limits = (ATTENTION_ROWS, ATTENTION_ROWS);
            if rows_fits(head_dim) && gpu.kernels.capabilities().rows {
                kernels.push((AttnKernel::Rows, ", in rows", rows_limits));
            }
            for (kernel, mode, limits) in kernels {
                let a = Attn {
                    n,
                    tokens,
                    heads,
                    head_dim,
                    kernel,
                    per_image: false,
                };
                let pd = self.zeros(n * heads * kernel.saved_len(tokens))?;
                let fd = self.zeros(n * heads * kernel.forward_scratch_len(tokens, head_dim))?;
                let od = self.zeros(want.len())?;
                let forward = |saves, o, o16| {
                    attention_forward(&gpu.kernels, st, a, qd.ptr, pd.ptr, saves, fd.ptr, o, o16)
                };
                if kernel == AttnKernel::Rows {
                    // A forward that saves nothing (no backward pass reads P) writes the
                    // same output.
                    let bare = self.zeros(want.len())?;
                    forward(false, bare.ptr, None)?;
                    forward(true, od.ptr, None)?;
                    self.row_within(
                        format!("attention forward{mode}, saving nothing vs saving P"),
                        desc.clone(),
                        &bare.download(st)?,
                        &od.download(st)?,
                        0.0,
                        0.0,
                    );
                }
                let ms = self.timed(|| Ok(()), || forward(true, od.ptr, None))?;
                self.row_within(
                    format!("attention forward{mode}"),
                    desc.clone(),
                    &od.download(st)?,
                    &want,
                    ms,
                    limits.0,
                );
                if kernel == AttnKernel::Rows {
                    self.row_within(
                        format!("attention probabilities{mode}"),
                        desc.clone(),
                        &pd.download(st)?,
                        &probs,
                        0.0,
                        limits.0,
                    );
                    // The output's 16-bit copy (INVDIFF_HALF_COPY_FUSED) is the conversion
                    // launch's, and the fp32 output is unchanged by writing it.
                    let precision = half_precision(tokens);
                    let (with, copy) = (self.zeros(want.len())?, self.zeros(want.len())?);
                    forward(true, with.ptr, Some((copy.ptr, precision)))?;
                    self.copy_rows(
                        &format!("attention forward{mode}"),
                        &desc,
                        [&od, &with, &copy],
                        want.len(),
                        precision,
                    )?;
                }
                let mut gd = self.up(&g0)?;
                let scratch = self.zeros(n * heads * kernel.saved_len(tokens))?;
                let backward = |g, g16| {
                    attention_backward(
                        &gpu.kernels,
                        st,
                        a,
                        qd.ptr,
                        pd.ptr,
                        od.ptr,
                        dd.ptr,
                        g,
                        g16,
                        scratch.ptr,
                        accumulate,
                    )
                };
                let g_ptr = gd.ptr;
                let ms = self.timed(|| gd.write(st, &g0), || backward(g_ptr, None))?;
                let op = format!("attention input-grad{}{mode}", acc_name(accumulate));
                self.row_within(
                    op.clone(),
                    desc.clone(),
                    &gd.download(st)?,
                    &want_g,
                    ms,
                    limits.1,
                );
                if kernel == AttnKernel::Rows {
                    let precision = half_precision(tokens);
                    let (with, copy) = (self.up(&g0)?, self.zeros(g0.len())?);
                    backward(with.ptr, Some((copy.ptr, precision)))?;
                    self.copy_rows(&op, &desc, [&gd, &with, &copy], g0.len(), precision)?;
                }
            }
        }
        self.per_image_attention_rows()
    }

    /// Rows holding an output written with its 16-bit copy (`bufs[1]`, `bufs[2]`) to the same
    /// output written without (`bufs[0]`), and the copy to the conversion launch's copy of it,
    /// bit for bit.
    fn copy_rows(
        &mut self,
        op: &str,
        desc: &str,
        bufs: [&DevBuf; 3],
        len: usize,
        precision: Precision,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let [without, with, copy] = bufs;
        let with_host = with.download(st)?;
        self.row_within(
            format!("{op}, with its 16-bit copy vs without"),
            desc.into(),
            &with_host,
            &without.download(st)?,
            0.0,
            0.0,
        );
        let converted = self.half_copy(with.ptr, len, precision)?;
        self.row_within(
            format!("{op}: 16-bit copy ({precision}) vs the conversion launch's"),
            desc.into(),
            &unpack_half(&copy.download(st)?, len, precision),
            &unpack_half(&converted.download(st)?, len, precision),
            0.0,
            0.0,
        );
        Ok(())
    }

    /// The celebahq attention (256 tokens, one head of 512) planned per image
    /// (`--batch-invariant`) in a batch large enough that the products' kernels chosen for the
    /// whole batch would be the 64-wide tiles where one image's are the warp-split ones (which
    /// round otherwise): image 0's output and input gradient against its own alone, bit for
    /// bit. Where the switches leave one kernel for both plans, a row says so instead. The
    /// attention in rows, whose blocks each work on one image whatever the batch, likewise.
    fn per_image_attention_rows(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (tokens, inner) = (256, 512);
        // S = q kᵀ has 16 blocks of 64 x 64 outputs an image.
        let n = self.gpu.sms() / 16 + 1;
        let run = |kernel, images: usize, qkv: &DevBuf, dout: &DevBuf| -> Result<[Vec<f32>; 2]> {
            let a = Attn {
                n: images,
                tokens,
                heads: 1,
                head_dim: inner,
                kernel,
                per_image: true,
            };
            let saved = DevBuf::zeros(st, images * tokens * tokens)?;
            let scratch = DevBuf::zeros(st, images * tokens * tokens)?;
            let forward_scratch =
                DevBuf::zeros(st, images * kernel.forward_scratch_len(tokens, inner))?;
            let out = DevBuf::zeros(st, images * tokens * inner)?;
            let grad = DevBuf::zeros(st, images * tokens * 3 * inner)?;
            attention_forward(
                &gpu.kernels,
                st,
                a,
                qkv.ptr,
                saved.ptr,
                true,
                forward_scratch.ptr,
                out.ptr,
                None,
            )?;
            attention_backward(
                &gpu.kernels,
                st,
                a,
                qkv.ptr,
                saved.ptr,
                out.ptr,
                dout.ptr,
                grad.ptr,
                None,
                scratch.ptr,
                false,
            )?;
            Ok([out.download(st)?, grad.download(st)?])
        };
        let qkv = self.rand(n * tokens * 3 * inner, -1.5, 1.5);
        let dout = self.rand(n * tokens * inner, -1.0, 1.0);
        let scores = Gemm {
            m: tokens,
            n: tokens,
            k: inner,
            outer: n,
            inner: 1,
            ..Gemm::default()
        };
        let (sms, launch) = (self.gpu.sms() as u32, gpu.kernels.launch_switches());
        let form = |per_image| gemm_form(&scores, sms, &launch, per_image);
        let mut kernels = vec![];
        if form(true) == form(false) {
            self.check_row(
                "attention, planned per image".into(),
                "not checked: one kernel either way (INVDIFF_GEMM_WARP_K=0 or \
                 INVDIFF_GEMM_SMALL_TILES=0)"
                    .into(),
                true,
            );
        } else {
            kernels.push((AttnKernel::Products, ""));
        }
        if gpu.kernels.capabilities().rows {
            kernels.push((AttnKernel::Rows, ", in rows"));
        }
        for (kernel, mode) in kernels {
            let batch = run(kernel, n, &self.up(&qkv)?, &self.up(&dout)?)?;
            let one = run(
                kernel,
                1,
                &self.up(&qkv[..tokens * 3 * inner])?,
                &self.up(&dout[..tokens * inner])?,
            )?;
            for (what, batch, one) in [
                ("forward", &batch[0], &one[0]),
                ("input-grad", &batch[1], &one[1]),
            ] {
                self.row_within(
                    format!(
                        "attention {what}{mode}, planned per image: image 0 of the batch vs alone"
                    ),
                    format!("n{n} L{tokens} 1x{inner}"),
                    &batch[..one.len()],
                    one,
                    0.0,
                    0.0,
                );
            }
        }
        Ok(())
    }
}
