//! Multi-head scaled dot-product attention over the tokens of each image, forward and backward.
//!
//! `qkv` is `[n, L, 3 * inner]` (queries, keys and values side by side, as one fused projection
//! writes them) and the output `[n, L, inner]`; head `h` uses channels `h * d .. (h + 1) * d` of
//! each. The probabilities `P = softmax(q kᵀ / √d)` are materialised per (image, head): the UNet
//! attends at low resolution (L = 256 tokens for celebahq), where P is small, and the backward
//! pass reuses it instead of recomputing two products.

use rayon::prelude::*;

use super::gemm::{matmul, matmul_raw, Mat};
use super::math;

/// Shape of an attention call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Dims {
    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Runs `f(image, head, rows)` for every (image, head) pair and block of query (or key) rows,
/// in parallel. The blocks depend on the token count only, and each product is
/// single-threaded, so an image's result is the same whatever the batch and thread count.
fn for_each_block<F: Fn(usize, usize, std::ops::Range<usize>) + Sync>(d: Dims, f: F) {
    let l = d.tokens;
    let blocks = l.div_ceil(128).max(if l >= 64 { 2 } else { 1 });
    let rows = l.div_ceil(blocks);
    (0..d.n * d.heads * blocks).into_par_iter().for_each(|j| {
        let (pair, b) = (j / blocks, j % blocks);
        let r0 = (b * rows).min(l);
        f(pair / d.heads, pair % d.heads, r0..(r0 + rows).min(l));
    });
}

/// An output buffer shared by the per-head jobs, which write disjoint (interleaved) elements.
#[derive(Clone, Copy)]
struct Shared {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: the jobs that share it write disjoint elements (see each use).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn new(buf: &mut [f32]) -> Self {
        Shared {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// The elements `offset .. offset + len` as a slice.
    ///
    /// # Safety
    /// No other job may touch these elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn block(&self, offset: usize, len: usize) -> &mut [f32] {
        assert!(offset + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(offset), len)
    }

    /// `C (+)= A B` into this buffer from element `offset` on.
    ///
    /// # Safety
    /// No other job may touch the elements this product writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(
        &self,
        offset: usize,
        m: usize,
        n: usize,
        k: usize,
        ldc: usize,
        a: Mat,
        b: Mat,
        accumulate: bool,
        threads: usize,
    ) {
        assert!(offset <= self.len);
        matmul_raw(
            m,
            n,
            k,
            self.ptr.add(offset),
            self.len - offset,
            ldc,
            a,
            b,
            accumulate,
            threads,
        )
    }
}

/// `o = softmax(q kᵀ / √d) v` per head. Returns `P` (`[n, heads, L, L]`) when `keep_probs`.
pub fn forward(qkv: &[f32], d: Dims, o: &mut [f32], keep_probs: bool) -> Option<Vec<f32>> {
    let (l, hd, inner) = (d.tokens, d.head_dim, d.inner());
    assert_eq!(qkv.len(), d.n * l * 3 * inner);
    assert_eq!(o.len(), d.n * l * inner);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut probs = vec![0.0f32; d.n * d.heads * l * l];
    let (po, pp) = (Shared::new(o), Shared::new(&mut probs));
    for_each_block(d, |img, h, rows| {
        let base = img * l * 3 * inner;
        let q = &qkv[base + rows.start * 3 * inner + h * hd..];
        let k = &qkv[base + inner + h * hd..];
        let v = &qkv[base + 2 * inner + h * hd..];
        let m = rows.len();
        // SAFETY: each job owns rows `rows` of its (image, head) P block.
        let p = unsafe { pp.block(((img * d.heads + h) * l + rows.start) * l, m * l) };
        let (qm, km) = (
            Mat {
                data: q,
                rs: 3 * inner,
                cs: 1,
            },
            Mat {
                data: k,
                rs: 1,
                cs: 3 * inner,
            },
        );
        matmul(m, l, hd, p, l, qm, km, false, 1);
        for row in p.chunks_exact_mut(l) {
            let mut max = f32::NEG_INFINITY;
            for s in row.iter_mut() {
                *s *= scale;
                max = max.max(*s);
            }
            let mut sum = 0.0f32;
            for s in row.iter_mut() {
                *s = math::exp(*s - max);
                sum += *s;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
        // SAFETY: each job writes only its own rows of its own head's channels.
        unsafe {
            let vm = Mat {
                data: v,
                rs: 3 * inner,
                cs: 1,
            };
            po.matmul(
                (img * l + rows.start) * inner + h * hd,
                m,
                hd,
                l,
                inner,
                Mat::rows(p, l),
                vm,
                false,
                1,
            )
        };
    });
    keep_probs.then_some(probs)
}

/// Gradient with respect to `qkv`: `dqkv (+)= ...` given `do` and the forward's `P`.
///
/// Two phases: per block of query rows, `dS = P ∘ (dO vᵀ - rowsum(dO vᵀ ∘ P)) / √d` and
/// `dq = dS k`; then per block of key rows, `dk = dSᵀ q` and `dv = Pᵀ dO`.
pub fn backward(
    qkv: &[f32],
    probs: &[f32],
    d: Dims,
    dout: &[f32],
    dqkv: &mut [f32],
    accumulate: bool,
) {
    let (l, hd, inner) = (d.tokens, d.head_dim, d.inner());
    assert_eq!(dqkv.len(), qkv.len());
    let scale = 1.0 / (hd as f32).sqrt();
    let mut ds = vec![0.0f32; probs.len()];
    let (pd, pds) = (Shared::new(dqkv), Shared::new(&mut ds));
    let at = |img: usize, part: usize, h: usize| img * l * 3 * inner + part * inner + h * hd;
    for_each_block(d, |img, h, rows| {
        let m = rows.len();
        let blk = (img * d.heads + h) * l * l;
        let p = &probs[blk + rows.start * l..blk + rows.end * l];
        let dov = &dout[(img * l + rows.start) * inner + h * hd..];
        let v = &qkv[at(img, 2, h)..];
        let k = &qkv[at(img, 1, h)..];
        // SAFETY: each job owns rows `rows` of its (image, head) dS block.
        let dsb = unsafe { pds.block(blk + rows.start * l, m * l) };
        let (dom, vt) = (
            Mat {
                data: dov,
                rs: inner,
                cs: 1,
            },
            Mat {
                data: v,
                rs: 1,
                cs: 3 * inner,
            },
        );
        matmul(m, l, hd, dsb, l, dom, vt, false, 1);
        for (drow, prow) in dsb.chunks_exact_mut(l).zip(p.chunks_exact(l)) {
            let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
            for (g, &pv) in drow.iter_mut().zip(prow) {
                *g = pv * (*g - dot) * scale;
            }
        }
        // SAFETY: each job writes only its own query rows of its own head's q channels.
        unsafe {
            let km = Mat {
                data: k,
                rs: 3 * inner,
                cs: 1,
            };
            let off = at(img, 0, h) + rows.start * 3 * inner;
            pd.matmul(
                off,
                m,
                hd,
                l,
                3 * inner,
                Mat::rows(dsb, l),
                km,
                accumulate,
                1,
            );
        }
    });
    for_each_block(d, |img, h, rows| {
        let m = rows.len();
        let blk = (img * d.heads + h) * l * l;
        // Columns `rows` of dS and P, transposed: rows of dSᵀ and Pᵀ.
        let dst = Mat {
            data: &ds[blk + rows.start..],
            rs: 1,
            cs: l,
        };
        let pt = Mat {
            data: &probs[blk + rows.start..],
            rs: 1,
            cs: l,
        };
        let q = Mat {
            data: &qkv[at(img, 0, h)..],
            rs: 3 * inner,
            cs: 1,
        };
        let dov = Mat {
            data: &dout[img * l * inner + h * hd..],
            rs: inner,
            cs: 1,
        };
        // SAFETY: each job writes only its own key rows of its own head's k and v channels.
        unsafe {
            let off = rows.start * 3 * inner;
            pd.matmul(
                at(img, 1, h) + off,
                m,
                hd,
                l,
                3 * inner,
                dst,
                q,
                accumulate,
                1,
            );
            pd.matmul(
                at(img, 2, h) + off,
                m,
                hd,
                l,
                3 * inner,
                pt,
                dov,
                accumulate,
                1,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::uniform_lcg(seed, n, -1.0, 1.0)
    }

    #[test]
    fn forward_matches_definition_and_backward_matches_finite_differences() {
        let d = Dims {
            n: 2,
            tokens: 5,
            heads: 2,
            head_dim: 3,
        };
        let inner = 6;
        let qkv = rand(2 * 5 * 3 * inner, 1);
        let mut o = vec![0.0; 2 * 5 * inner];
        let p = forward(&qkv, d, &mut o, true).unwrap();
        // Definition, image 1 head 1, token 2.
        let at = |t: usize, part: usize, c: usize| qkv[(5 + t) * 3 * inner + part * inner + 3 + c];
        let s: Vec<f64> = (0..5)
            .map(|j| {
                (0..3)
                    .map(|c| at(2, 0, c) as f64 * at(j, 1, c) as f64)
                    .sum::<f64>()
                    / 3f64.sqrt()
            })
            .collect();
        let z: f64 = s.iter().map(|v| v.exp()).sum();
        for c in 0..3 {
            let want: f64 = (0..5).map(|j| s[j].exp() / z * at(j, 2, c) as f64).sum();
            assert!((o[(5 + 2) * inner + 3 + c] as f64 - want).abs() < 1e-6);
        }
        let v = rand(o.len(), 2);
        let mut g = vec![0.0; qkv.len()];
        backward(&qkv, &p, d, &v, &mut g, false);
        let loss = |x: &[f32]| -> f64 {
            let mut o = vec![0.0; 2 * 5 * inner];
            forward(x, d, &mut o, false);
            o.iter().zip(&v).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        for i in 0..qkv.len() {
            let h = 1e-2;
            let mut xp = qkv.clone();
            xp[i] += h;
            let mut xm = qkv.clone();
            xm[i] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
            assert!((fd - g[i] as f64).abs() < 1e-3, "{i}: {fd} vs {}", g[i]);
        }
    }
}
