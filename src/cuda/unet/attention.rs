//! Attention composed from kernel launches (the batched products and softmax, or the fused
//! kernels), forward and backward: what the program's attention steps run.

use cudarc::driver::CudaStream;

use crate::cuda::kernels::{at, rows_scratch_len, DPtr, Gemm, Kernels};
use crate::cuda::precision::Precision;
use crate::{Error, Result};

/// The lowering gives a 16-bit copy of an attention's output or input gradient only to the
/// rows kernels, which write it.
fn only_rows_copy() -> Error {
    Error::Cuda("internal: a 16-bit copy asked of an attention that is not in rows".into())
}

/// Shape of an attention call: `n` images of `tokens` tokens, `heads` heads of `head_dim`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attn {
    pub n: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub kernel: AttnKernel,
    /// The products' kernels chosen for one image's share of the batch (`--batch-invariant`;
    /// [`Kernels::gemm`]'s `per_image`).
    pub per_image: bool,
}

/// How an attention runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttnKernel {
    /// Batched products in fp32 FMAs and a softmax, P materialised (`[n, heads, L, L]`).
    Products,
    /// The same with the products on the tf32 tensor cores ([`Gemm::tf32`]).
    Tf32Products,
    /// In rows of queries ([`Kernels::attention_rows`], [`Kernels::attention_rows_backward`]:
    /// split-bf16 tensor-core products, two launches each way), P materialised as for
    /// `Products`; the backward reads the forward's output.
    Rows,
    /// Fused (`attention_flash_*`, tf32 tensor cores): P never leaves the multiprocessor; the
    /// forward saves each query's log-sum-exp (`[n, heads, L]`) instead, and the backward
    /// reads the forward's output.
    Flash,
}

impl AttnKernel {
    /// Floats of what the forward saves for the backward, per (image, head): P, or the
    /// log-sum-exp of each query.
    pub fn saved_len(self, tokens: usize) -> usize {
        match self {
            AttnKernel::Flash => tokens,
            _ => tokens * tokens,
        }
    }

    /// Floats of scratch the forward needs per (image, head) beyond what it saves (the rows
    /// kernels' splits, [`rows_scratch_len`]).
    pub fn forward_scratch_len(self, tokens: usize, head_dim: usize) -> usize {
        match self {
            AttnKernel::Rows => rows_scratch_len(tokens, head_dim),
            _ => 0,
        }
    }
}

impl Attn {
    /// The batched-product view of one operand, per (image, head).
    fn view(&self) -> (usize, usize, usize) {
        let inner = self.heads * self.head_dim;
        (inner, self.tokens * 3 * inner, self.tokens * self.tokens)
    }
}

/// `o = softmax(q kᵀ / √d) v` per (image, head); `qkv` is `[n, L, 3 inner]`, `o` is
/// `[n, L, inner]`, and `saved` receives what the backward pass reads
/// ([`AttnKernel::saved_len`] floats per (image, head)), or with [`AttnKernel::Rows`] and
/// `saves` false nothing (no backward pass reads it). `scratch` holds
/// [`AttnKernel::forward_scratch_len`] floats per (image, head). With `o16` (rows only), `o`
/// in 16 bits there too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward(
    k: &Kernels,
    st: &CudaStream,
    a: Attn,
    qkv: DPtr,
    saved: DPtr,
    saves: bool,
    scratch: DPtr,
    o: DPtr,
    o16: Option<(DPtr, Precision)>,
) -> Result<()> {
    match a.kernel {
        AttnKernel::Rows => {
            let p = saves.then_some(saved);
            return k.attention_rows(
                st, a.n, a.tokens, a.heads, a.head_dim, qkv, scratch, p, o, o16,
            );
        }
        _ if o16.is_some() => return Err(only_rows_copy()),
        AttnKernel::Flash => {
            return k.attention_flash(st, a.n, a.tokens, a.heads, a.head_dim, qkv, saved, o, None)
        }
        AttnKernel::Products | AttnKernel::Tf32Products => {}
    }
    let probs = saved;
    let (inner, img, ll) = a.view();
    let (l, d) = (a.tokens, a.head_dim);
    let base = Gemm {
        outer: a.n,
        inner: a.heads,
        alpha: 1.0,
        tf32: a.kernel == AttnKernel::Tf32Products,
        ..Gemm::default()
    };
    // S = Q Kᵀ.
    k.gemm(
        st,
        &Gemm {
            a: qkv,
            b: at(qkv, inner),
            c: probs,
            m: l,
            n: l,
            k: d,
            a_rs: 3 * inner,
            a_cs: 1,
            b_rs: 1,
            b_cs: 3 * inner,
            c_rs: l,
            a_bo: img,
            a_bi: d,
            b_bo: img,
            b_bi: d,
            c_bo: a.heads * ll,
            c_bi: ll,
            ..base
        },
        a.per_image,
    )?;
    k.softmax(st, probs, a.n * a.heads * l, l, 1.0 / (d as f32).sqrt())?;
    // O = P V.
    k.gemm(
        st,
        &Gemm {
            a: probs,
            b: at(qkv, 2 * inner),
            c: o,
            m: l,
            n: d,
            k: l,
            a_rs: l,
            a_cs: 1,
            b_rs: 3 * inner,
            b_cs: 1,
            c_rs: inner,
            a_bo: a.heads * ll,
            a_bi: ll,
            b_bo: img,
            b_bi: d,
            c_bo: l * inner,
            c_bi: d,
            ..base
        },
        a.per_image,
    )
}

/// Gradient of [`attention_forward`] with respect to `qkv`: `dqkv (+)= ...`, given what the
/// forward saved, its output `o` (read by [`AttnKernel::Flash`] and [`AttnKernel::Rows`]
/// only) and `dy` = dO; `scratch` holds [`AttnKernel::saved_len`] floats per (image, head).
/// With `dqkv16` (rows only), `dqkv` in 16 bits there too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    k: &Kernels,
    st: &CudaStream,
    a: Attn,
    qkv: DPtr,
    saved: DPtr,
    o: DPtr,
    dy: DPtr,
    dqkv: DPtr,
    dqkv16: Option<(DPtr, Precision)>,
    scratch: DPtr,
    accumulate: bool,
) -> Result<()> {
    match a.kernel {
        AttnKernel::Rows => {
            return k.attention_rows_backward(
                st,
                a.n,
                a.tokens,
                a.heads,
                a.head_dim,
                qkv,
                [saved, o, dy],
                scratch,
                dqkv,
                dqkv16,
                accumulate,
            )
        }
        _ if dqkv16.is_some() => return Err(only_rows_copy()),
        AttnKernel::Flash => {
            let backward = Some((o, dy, scratch, accumulate));
            return k.attention_flash(
                st, a.n, a.tokens, a.heads, a.head_dim, qkv, saved, dqkv, backward,
            );
        }
        AttnKernel::Products | AttnKernel::Tf32Products => {}
    }
    let (probs, ds) = (saved, scratch);
    let (inner, img, ll) = a.view();
    let (l, d) = (a.tokens, a.head_dim);
    let base = Gemm {
        outer: a.n,
        inner: a.heads,
        alpha: 1.0,
        tf32: a.kernel == AttnKernel::Tf32Products,
        ..Gemm::default()
    };
    // The per-(image, head) views of P or dS, of dO, and of a q/k/v part (and its gradient).
    let p_view = |ptr: DPtr, transposed: bool| {
        (
            ptr,
            if transposed { (1, l) } else { (l, 1) },
            a.heads * ll,
            ll,
        )
    };
    let part = |ptr: DPtr, which: usize| at(ptr, which * inner);
    // dV = Pᵀ dO.
    let (pp, (prs, pcs), pbo, pbi) = p_view(probs, true);
    let dv = Gemm {
        a: pp,
        b: dy,
        c: part(dqkv, 2),
        m: l,
        n: d,
        k: l,
        a_rs: prs,
        a_cs: pcs,
        b_rs: inner,
        b_cs: 1,
        c_rs: 3 * inner,
        a_bo: pbo,
        a_bi: pbi,
        b_bo: l * inner,
        b_bi: d,
        c_bo: img,
        c_bi: d,
        accumulate,
        ..base
    };
    // dP = dO Vᵀ, then dS = P ∘ (dP - rowsum(dP ∘ P)) / √d.
    let dp = Gemm {
        a: dy,
        b: part(qkv, 2),
        c: ds,
        m: l,
        n: l,
        k: d,
        a_rs: inner,
        a_cs: 1,
        b_rs: 1,
        b_cs: 3 * inner,
        c_rs: l,
        a_bo: l * inner,
        a_bi: d,
        b_bo: img,
        b_bi: d,
        c_bo: a.heads * ll,
        c_bi: ll,
        ..base
    };
    // dQ = dS K, dK = dSᵀ Q.
    let [dq, dk] = [(false, 1, 0), (true, 0, 1)].map(|(transposed, src, dst)| {
        let (sp, (srs, scs), sbo, sbi) = p_view(ds, transposed);
        Gemm {
            a: sp,
            b: part(qkv, src),
            c: part(dqkv, dst),
            m: l,
            n: d,
            k: l,
            a_rs: srs,
            a_cs: scs,
            b_rs: 3 * inner,
            b_cs: 1,
            c_rs: 3 * inner,
            a_bo: sbo,
            a_bi: sbi,
            b_bo: img,
            b_bi: d,
            c_bo: img,
            c_bi: d,
            accumulate,
            ..base
        }
    });
    k.gemm(st, &dv, a.per_image)?;
    k.gemm(st, &dp, a.per_image)?;
    k.softmax_backward(st, probs, ds, a.n * a.heads * l, l, 1.0 / (d as f32).sqrt())?;
    k.gemm(st, &dq, a.per_image)?;
    k.gemm(st, &dk, a.per_image)
}
