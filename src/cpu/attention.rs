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

/// Runs `f(image, head, job_threads)` over every (image, head) pair: in parallel across pairs
/// when there are enough of them, otherwise one after another with parallel products.
fn for_each_head<F: Fn(usize, usize, usize) + Sync>(d: Dims, f: F) {
    let jobs = d.n * d.heads;
    let threads = rayon::current_num_threads();
    if jobs >= threads {
        (0..jobs)
            .into_par_iter()
            .for_each(|j| f(j / d.heads, j % d.heads, 1));
    } else {
        (0..jobs).for_each(|j| f(j / d.heads, j % d.heads, threads));
    }
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
    for_each_head(d, |img, h, threads| {
        let base = img * l * 3 * inner;
        let q = &qkv[base + h * hd..];
        let k = &qkv[base + inner + h * hd..];
        let v = &qkv[base + 2 * inner + h * hd..];
        // SAFETY: each (image, head) job owns its P block, a contiguous range.
        let p = unsafe { pp.block((img * d.heads + h) * l * l, l * l) };
        matmul(
            l,
            l,
            hd,
            p,
            l,
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
            false,
            threads,
        );
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
        // SAFETY: each job writes only its own head's channels of its own image's rows.
        unsafe {
            po.matmul(
                img * l * inner + h * hd,
                l,
                hd,
                l,
                inner,
                Mat::rows(p, l),
                Mat {
                    data: v,
                    rs: 3 * inner,
                    cs: 1,
                },
                false,
                threads,
            )
        };
    });
    keep_probs.then_some(probs)
}

/// Gradient with respect to `qkv`: `dqkv (+)= ...` given `do` and the forward's `P`.
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
    let pd = Shared::new(dqkv);
    for_each_head(d, |img, h, threads| {
        let base = img * l * 3 * inner;
        let q = &qkv[base + h * hd..];
        let k = &qkv[base + inner + h * hd..];
        let v = &qkv[base + 2 * inner + h * hd..];
        let p = &probs[(img * d.heads + h) * l * l..][..l * l];
        let dov = &dout[img * l * inner + h * hd..];
        // SAFETY (all three products into `pd`): each job writes only its own head's q, k and v
        // channels of its own image.
        // dV = Pᵀ dO.
        unsafe {
            pd.matmul(
                base + 2 * inner + h * hd,
                l,
                hd,
                l,
                3 * inner,
                Mat::transposed(p, l),
                Mat {
                    data: dov,
                    rs: inner,
                    cs: 1,
                },
                accumulate,
                threads,
            )
        };
        // dP = dO Vᵀ, then dS = P ∘ (dP - rowsum(dP ∘ P)) · scale.
        let mut ds = vec![0.0f32; l * l];
        matmul(
            l,
            l,
            hd,
            &mut ds,
            l,
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
            false,
            threads,
        );
        for (drow, prow) in ds.chunks_exact_mut(l).zip(p.chunks_exact(l)) {
            let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
            for (g, &pv) in drow.iter_mut().zip(prow) {
                *g = pv * (*g - dot) * scale;
            }
        }
        // dQ = dS K, dK = dSᵀ Q.
        unsafe {
            pd.matmul(
                base + h * hd,
                l,
                hd,
                l,
                3 * inner,
                Mat::rows(&ds, l),
                Mat {
                    data: k,
                    rs: 3 * inner,
                    cs: 1,
                },
                accumulate,
                threads,
            );
            pd.matmul(
                base + inner + h * hd,
                l,
                hd,
                l,
                3 * inner,
                Mat::transposed(&ds, l),
                Mat {
                    data: q,
                    rs: 3 * inner,
                    cs: 1,
                },
                accumulate,
                threads,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
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
