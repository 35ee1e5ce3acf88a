//! GroupNorm (optionally fused with SiLU) on channels-last activations, forward and backward.
//!
//! Statistics are accumulated in f64 in one pass (sum and sum of squares): a group holds up to a
//! few hundred thousand values, and f64 keeps `E[x²] - E[x]²` exact to far below f32 rounding for
//! activations whose mean is not millions of times their spread. The normalisation itself is one
//! fused multiply-add per element with a per-channel scale and shift.

use rayon::prelude::*;

use super::math;

/// Per-(image, group) mean and reciprocal standard deviation, kept for the backward pass.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// Shape of a GroupNorm call: `n` images of `hw` pixels and `c` channels in `groups` groups.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub groups: usize,
}

/// Pixels per parallel chunk when reducing over an image.
const CHUNK: usize = 1024;

/// Per-channel sums of `f(pixel row)` over an image, in f64, reduced over parallel chunks.
fn channel_sums<F>(rows: &[f32], c: usize, f: F) -> (Vec<f64>, Vec<f64>)
where
    F: Fn(usize, &[f32], &mut [f64], &mut [f64]) + Sync,
{
    rows.par_chunks(CHUNK * c)
        .enumerate()
        .map(|(ci, chunk)| {
            let mut a = vec![0.0f64; c];
            let mut b = vec![0.0f64; c];
            for (i, row) in chunk.chunks_exact(c).enumerate() {
                f(ci * CHUNK + i, row, &mut a, &mut b);
            }
            (a, b)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .reduce(add_pairs)
        .unwrap_or_else(|| (vec![0.0; c], vec![0.0; c]))
}

/// Sums chunk partials in chunk order (not in whatever order threads finish), so the
/// statistics, and everything after them, are the same on every run.
fn add_pairs(
    (mut a, mut b): (Vec<f64>, Vec<f64>),
    (x, y): (Vec<f64>, Vec<f64>),
) -> (Vec<f64>, Vec<f64>) {
    a.iter_mut().zip(&x).for_each(|(p, q)| *p += q);
    b.iter_mut().zip(&y).for_each(|(p, q)| *p += q);
    (a, b)
}

/// `y = GroupNorm(x) * gamma + beta`, then SiLU if `silu`. Returns the statistics.
pub fn forward(
    x: &[f32],
    d: Dims,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    silu: bool,
    y: &mut [f32],
) -> Stats {
    let Dims { n, hw, c, groups } = d;
    let cg = c / groups;
    let count = (cg * hw) as f64;
    let mut stats = Stats {
        mean: vec![0.0; n * groups],
        rstd: vec![0.0; n * groups],
    };
    for img in 0..n {
        let xi = &x[img * hw * c..(img + 1) * hw * c];
        let (s1, s2) = channel_sums(xi, c, |_, row, a, b| {
            for ((a, b), &v) in a.iter_mut().zip(b.iter_mut()).zip(row) {
                let v = v as f64;
                *a += v;
                *b += v * v;
            }
        });
        let mut scale = vec![0.0f32; c];
        let mut shift = vec![0.0f32; c];
        for g in 0..groups {
            let sum: f64 = s1[g * cg..(g + 1) * cg].iter().sum();
            let sq: f64 = s2[g * cg..(g + 1) * cg].iter().sum();
            let mean = sum / count;
            let var = (sq / count - mean * mean).max(0.0);
            // PyTorch adds eps in f32 before the square root.
            let rstd = 1.0 / ((var as f32 + eps) as f64).sqrt();
            stats.mean[img * groups + g] = mean as f32;
            stats.rstd[img * groups + g] = rstd as f32;
            for ch in g * cg..(g + 1) * cg {
                let a = rstd * gamma[ch] as f64;
                scale[ch] = a as f32;
                shift[ch] = (beta[ch] as f64 - mean * a) as f32;
            }
        }
        let yi = &mut y[img * hw * c..(img + 1) * hw * c];
        yi.par_chunks_mut(CHUNK * c)
            .zip(xi.par_chunks(CHUNK * c))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                    for (((o, &v), &a), &b) in yr.iter_mut().zip(xr).zip(&scale).zip(&shift) {
                        let z = v.mul_add(a, b);
                        *o = if silu { math::silu(z) } else { z };
                    }
                }
            });
    }
    stats
}

/// Gradient with respect to the input: `dx (+)= d GroupNorm(+SiLU) / dx ^T dy`.
///
/// With `xhat` the normalised input and `g = dL/dxhat` (through SiLU and the affine scale), the
/// input gradient is `rstd * (g - mean(g) - xhat * mean(g * xhat))` over each group. The first
/// pass computes `g` once (keeping it) and the two group means; the second forms `dx`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    d: Dims,
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
    stats: &Stats,
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    let Dims { n, hw, c, groups } = d;
    let cg = c / groups;
    let count = (cg * hw) as f64;
    let mut g = vec![0.0f32; hw * c];
    for img in 0..n {
        let mean: Vec<f32> = (0..c)
            .map(|ch| stats.mean[img * groups + ch / cg])
            .collect();
        let rstd: Vec<f32> = (0..c)
            .map(|ch| stats.rstd[img * groups + ch / cg])
            .collect();
        let xi = &x[img * hw * c..(img + 1) * hw * c];
        let dyi = &dy[img * hw * c..(img + 1) * hw * c];
        let (s1, s2) = g
            .par_chunks_mut(CHUNK * c)
            .zip(xi.par_chunks(CHUNK * c).zip(dyi.par_chunks(CHUNK * c)))
            .map(|(gc, (xc, dc))| {
                // f32 sums over one chunk's pixels, then f64 across chunks.
                let mut a = vec![0.0f32; c];
                let mut b = vec![0.0f32; c];
                for ((gr, xr), dr) in gc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(dc.chunks_exact(c))
                {
                    let rows = (xr.iter().zip(dr)).zip(mean.iter().zip(&rstd));
                    let params = gamma.iter().zip(beta);
                    let sums = a.iter_mut().zip(b.iter_mut());
                    for ((((&xv, &dv), (&m, &r)), (&ga, &be)), (gv, (sa, sb))) in
                        rows.zip(params).zip(gr.iter_mut().zip(sums))
                    {
                        let xhat = (xv - m) * r;
                        let mut v = dv;
                        if silu {
                            v *= math::silu_grad(xhat.mul_add(ga, be));
                        }
                        v *= ga;
                        *gv = v;
                        *sa += v;
                        *sb += v * xhat;
                    }
                }
                let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
                (widen(a), widen(b))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .reduce(add_pairs)
            .unwrap_or_else(|| (vec![0.0; c], vec![0.0; c]));
        let mut mg = vec![0.0f32; c];
        let mut mgx = vec![0.0f32; c];
        for grp in 0..groups {
            let a: f64 = s1[grp * cg..(grp + 1) * cg].iter().sum::<f64>() / count;
            let b: f64 = s2[grp * cg..(grp + 1) * cg].iter().sum::<f64>() / count;
            mg[grp * cg..(grp + 1) * cg].fill(a as f32);
            mgx[grp * cg..(grp + 1) * cg].fill(b as f32);
        }
        let dxi = &mut dx[img * hw * c..(img + 1) * hw * c];
        dxi.par_chunks_mut(CHUNK * c)
            .zip(xi.par_chunks(CHUNK * c).zip(g.par_chunks(CHUNK * c)))
            .for_each(|(dxc, (xc, gc))| {
                for ((dr, xr), gr) in dxc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(gc.chunks_exact(c))
                {
                    let stats = (mean.iter().zip(&rstd)).zip(mg.iter().zip(&mgx));
                    for ((o, (&xv, &gv)), ((&m, &r), (&a, &b))) in
                        dr.iter_mut().zip(xr.iter().zip(gr)).zip(stats)
                    {
                        let v = r * (gv - a - (xv - m) * r * b);
                        *o = if accumulate { *o + v } else { v };
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::uniform_lcg(seed, n, -1.0, 1.0)
    }

    fn loss(x: &[f32], d: Dims, gamma: &[f32], beta: &[f32], silu: bool, v: &[f32]) -> f64 {
        let mut y = vec![0.0; x.len()];
        forward(x, d, gamma, beta, 1e-6, silu, &mut y);
        y.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn backward_matches_finite_differences() {
        for silu in [false, true] {
            let d = Dims {
                n: 2,
                hw: 6,
                c: 6,
                groups: 3,
            };
            let x: Vec<f32> = rand(72, 1).iter().map(|v| v * 2.0 + 0.3).collect();
            let gamma: Vec<f32> = rand(6, 2).iter().map(|v| 1.0 + 0.5 * v).collect();
            let beta = rand(6, 3);
            let v = rand(72, 4);
            let mut y = vec![0.0; 72];
            let stats = forward(&x, d, &gamma, &beta, 1e-6, silu, &mut y);
            let mut dx = vec![0.0; 72];
            backward(&x, d, &gamma, &beta, silu, &stats, &v, &mut dx, false);
            for i in 0..72 {
                let h = 1e-2f32;
                let mut xp = x.clone();
                xp[i] += h;
                let mut xm = x.clone();
                xm[i] -= h;
                let fd = (loss(&xp, d, &gamma, &beta, silu, &v)
                    - loss(&xm, d, &gamma, &beta, silu, &v))
                    / (2.0 * h as f64);
                assert!(
                    (fd - dx[i] as f64).abs() < 2e-3,
                    "silu {silu} i {i}: {fd} vs {}",
                    dx[i]
                );
            }
        }
    }

    #[test]
    fn normalises_each_group() {
        let d = Dims {
            n: 1,
            hw: 5,
            c: 4,
            groups: 2,
        };
        let x: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let mut y = vec![0.0; 20];
        forward(&x, d, &[1.0; 4], &[0.0; 4], 0.0, false, &mut y);
        for g in 0..2 {
            let vals: Vec<f32> = (0..5)
                .flat_map(|p| [y[p * 4 + 2 * g], y[p * 4 + 2 * g + 1]])
                .collect();
            let mean: f32 = vals.iter().sum::<f32>() / 10.0;
            let var: f32 = vals.iter().map(|v| v * v).sum::<f32>() / 10.0;
            assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
        }
    }
}
