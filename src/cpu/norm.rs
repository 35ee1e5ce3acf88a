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

/// Pixels per parallel chunk of an image of `hw` pixels: `hw / 16` within 64..=1024, so that
/// images from 1024 pixels up give at least 16 chunks (with 1024-pixel chunks the 32x32 level
/// was one chunk, on one core) and smaller ones chunks of 64.
/// A function of the image alone, since the sums are added chunk by chunk: the results do not
/// depend on the number of threads.
fn chunk_px(hw: usize) -> usize {
    (hw / 16).clamp(64, 1024)
}

/// Per-channel sums of `f(pixel row)` over an image of `hw` pixels, in f64, reduced over
/// parallel chunks.
fn channel_sums<F>(rows: &[f32], hw: usize, c: usize, f: F) -> (Vec<f64>, Vec<f64>)
where
    F: Fn(&[f32], &mut [f64], &mut [f64]) + Sync,
{
    rows.par_chunks(chunk_px(hw) * c)
        .map(|chunk| {
            let mut a = vec![0.0f64; c];
            let mut b = vec![0.0f64; c];
            for row in chunk.chunks_exact(c) {
                f(row, &mut a, &mut b);
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
    let image = (hw * c).max(1);
    // Images side by side as well as each image's chunks: a small level's image is few chunks.
    let per_image: Vec<Stats> = y[..n * hw * c]
        .par_chunks_mut(image)
        .zip(x[..n * hw * c].par_chunks(image))
        .map(|(yi, xi)| {
            let mut stats = Stats {
                mean: vec![0.0; groups],
                rstd: vec![0.0; groups],
            };
            let (s1, s2) = channel_sums(xi, hw, c, |row, a, b| {
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
                stats.mean[g] = mean as f32;
                stats.rstd[g] = rstd as f32;
                for ch in g * cg..(g + 1) * cg {
                    let a = rstd * gamma[ch] as f64;
                    scale[ch] = a as f32;
                    shift[ch] = (beta[ch] as f64 - mean * a) as f32;
                }
            }
            let chunk = chunk_px(hw) * c;
            yi.par_chunks_mut(chunk)
                .zip(xi.par_chunks(chunk))
                .for_each(|(yc, xc)| {
                    if silu {
                        apply_rows::<true>(yc, xc, &scale, &shift);
                    } else {
                        apply_rows::<false>(yc, xc, &scale, &shift);
                    }
                });
            stats
        })
        .collect();
    Stats {
        mean: per_image
            .iter()
            .flat_map(|s| s.mean.iter().copied())
            .collect(),
        rstd: per_image
            .iter()
            .flat_map(|s| s.rstd.iter().copied())
            .collect(),
    }
}

/// `y = x * scale + shift` (then SiLU) over whole pixel rows. SILU is a constant so that each
/// form is its own vector loop: with a test per element, the compiled loop computed SiLU for
/// every element and then selected, as slow without SiLU as with it.
fn apply_rows<const SILU: bool>(y: &mut [f32], x: &[f32], scale: &[f32], shift: &[f32]) {
    let c = scale.len();
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((o, &v), &a), &b) in yr.iter_mut().zip(xr).zip(scale).zip(shift) {
            let z = v.mul_add(a, b);
            *o = if SILU { math::silu(z) } else { z };
        }
    }
}

/// Gradient with respect to the input: `dx (+)= d GroupNorm(+SiLU) / dx ^T dy`.
///
/// With `xhat` the normalised input and `g = dL/dxhat` (through SiLU and the affine scale), the
/// input gradient is `rstd * (g - mean(g) - xhat * mean(g * xhat))` over each group. The first
/// pass sums `g` and `g * xhat`; the second computes `g` again to form `dx`. Keeping `g` from the
/// first pass instead cost an image-sized buffer, written and read back, and allocated afresh
/// (page faults, and TLB shootdowns when freed) on every call: a fifth of the pass's time.
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
    let chunk = chunk_px(hw) * c;
    let image = (hw * c).max(1);
    // Images side by side as well as each image's chunks, as in the forward pass.
    dx[..n * hw * c]
        .par_chunks_mut(image)
        .zip(
            x[..n * hw * c]
                .par_chunks(image)
                .zip(dy[..n * hw * c].par_chunks(image)),
        )
        .enumerate()
        .for_each(|(img, (dxi, (xi, dyi)))| {
            let per_channel = |v: &[f32]| (0..c).map(|ch| v[img * groups + ch / cg]).collect();
            let k = Channels {
                mean: per_channel(&stats.mean),
                rstd: per_channel(&stats.rstd),
                gamma,
                beta,
            };
            let (s1, s2) = xi
                .par_chunks(chunk)
                .zip(dyi.par_chunks(chunk))
                .map(|(xc, dc)| {
                    // f32 sums over one chunk's pixels, then f64 across chunks.
                    let mut a = vec![0.0f32; c];
                    let mut b = vec![0.0f32; c];
                    if silu {
                        grad_sums::<true>(xc, dc, &k, &mut a, &mut b);
                    } else {
                        grad_sums::<false>(xc, dc, &k, &mut a, &mut b);
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
            let means = (&mg[..], &mgx[..]);
            dxi.par_chunks_mut(chunk)
                .zip(xi.par_chunks(chunk).zip(dyi.par_chunks(chunk)))
                .for_each(|(dxc, (xc, dc))| match (silu, accumulate) {
                    (true, true) => grad_rows::<true, true>(dxc, xc, dc, &k, means),
                    (true, false) => grad_rows::<true, false>(dxc, xc, dc, &k, means),
                    (false, true) => grad_rows::<false, true>(dxc, xc, dc, &k, means),
                    (false, false) => grad_rows::<false, false>(dxc, xc, dc, &k, means),
                });
        });
}

/// One image's per-channel constants for the backward pass: its group's mean and rstd, and the
/// affine parameters.
struct Channels<'a> {
    mean: Vec<f32>,
    rstd: Vec<f32>,
    gamma: &'a [f32],
    beta: &'a [f32],
}

impl Channels<'_> {
    /// The four slices cut to `c` channels, so that loops over `0..c` index them unchecked and
    /// vectorise.
    fn cut(&self, c: usize) -> [&[f32]; 4] {
        [
            &self.mean[..c],
            &self.rstd[..c],
            &self.gamma[..c],
            &self.beta[..c],
        ]
    }
}

/// `(g, xhat)` for one element of a channel with group mean `m`, rstd `r`, scale `ga` and
/// shift `be`: `g = dy silu'(z) ga` (`dy ga` without SiLU), `z = xhat ga + be`. Both passes
/// compute it alike, so the second gets the first's bits.
#[inline(always)]
fn grad_xhat<const SILU: bool>(m: f32, r: f32, ga: f32, be: f32, xv: f32, dv: f32) -> (f32, f32) {
    let xhat = (xv - m) * r;
    let mut v = dv;
    if SILU {
        v *= math::silu_grad(xhat.mul_add(ga, be));
    }
    (v * ga, xhat)
}

/// Adds `g` and `g * xhat` of every pixel row of `x` and `dy` into `a` and `b`, per channel.
fn grad_sums<const SILU: bool>(x: &[f32], dy: &[f32], k: &Channels, a: &mut [f32], b: &mut [f32]) {
    let c = a.len();
    let b = &mut b[..c];
    let [mean, rstd, gamma, beta] = k.cut(c);
    for (xr, dr) in x.chunks_exact(c).zip(dy.chunks_exact(c)) {
        for ch in 0..c {
            let (g, xhat) =
                grad_xhat::<SILU>(mean[ch], rstd[ch], gamma[ch], beta[ch], xr[ch], dr[ch]);
            a[ch] += g;
            b[ch] += g * xhat;
        }
    }
}

/// `dx (+)= rstd (g - mean(g) - xhat mean(g xhat))` over whole pixel rows, with the group means
/// per channel in `means`.
fn grad_rows<const SILU: bool, const ACC: bool>(
    dx: &mut [f32],
    x: &[f32],
    dy: &[f32],
    k: &Channels,
    (mg, mgx): (&[f32], &[f32]),
) {
    let c = mg.len();
    let mgx = &mgx[..c];
    let [mean, rstd, gamma, beta] = k.cut(c);
    for ((dr, xr), gr) in dx
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(dy.chunks_exact(c))
    {
        for ch in 0..c {
            let (g, xhat) =
                grad_xhat::<SILU>(mean[ch], rstd[ch], gamma[ch], beta[ch], xr[ch], gr[ch]);
            let v = rstd[ch] * (g - mg[ch] - xhat * mgx[ch]);
            dr[ch] = if ACC { dr[ch] + v } else { v };
        }
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

    /// Accumulating adds this pass's gradient to the old one, bit for bit (`old + v`), with
    /// SiLU and without.
    #[test]
    fn backward_accumulates_onto_the_old_gradient() {
        let d = Dims {
            n: 2,
            hw: 40,
            c: 24,
            groups: 4,
        };
        let len = d.n * d.hw * d.c;
        let x = rand(len, 5);
        let dy = rand(len, 6);
        let old = rand(len, 7);
        let gamma: Vec<f32> = rand(d.c, 8).iter().map(|v| 1.0 + 0.5 * v).collect();
        let beta = rand(d.c, 9);
        for silu in [false, true] {
            let mut y = vec![0.0; len];
            let stats = forward(&x, d, &gamma, &beta, 1e-6, silu, &mut y);
            let mut fresh = vec![0.0; len];
            backward(&x, d, &gamma, &beta, silu, &stats, &dy, &mut fresh, false);
            let mut acc = old.clone();
            backward(&x, d, &gamma, &beta, silu, &stats, &dy, &mut acc, true);
            for i in 0..len {
                assert_eq!(
                    acc[i].to_bits(),
                    (old[i] + fresh[i]).to_bits(),
                    "silu {silu} i {i}"
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
