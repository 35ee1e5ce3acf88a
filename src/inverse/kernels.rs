//! Blur-kernel generators: isotropic Gaussian and random camera-shake (motion) kernels.
//!
//! Both are centred where [`super::CircularBlur`]'s `p2o` puts the origin, index
//! `floor(size/2)` on each axis, so that blurring does not shift the image (for an even size
//! the Gaussian is therefore not symmetric about the array's middle). Both return
//! `[1, 1, size, size]` tensors summing to 1, the notebook's kernel layout.

use std::f64::consts::PI;

use crate::rng::SplitMix64;
use crate::{Error, Result, Tensor};

/// Largest kernel side the generators make: a blur kernel is smaller than the image it blurs,
/// and the motion kernel's supersampled trajectory grid is four times its area.
pub const MAX_KERNEL_SIZE: usize = 2048;

/// A `size×size` Gaussian of standard deviation `std` pixels, centred at `floor(size/2)`,
/// normalised to sum 1 (computed in f64); `size` in `1..=MAX_KERNEL_SIZE`.
pub fn gaussian_kernel(size: usize, std: f64) -> Result<Tensor> {
    if !(1..=MAX_KERNEL_SIZE).contains(&size) {
        return Err(Error::input(format!(
            "Gaussian kernel size must be in 1..={MAX_KERNEL_SIZE}, got {size}"
        )));
    }
    if !(std.is_finite() && std > 0.0) {
        return Err(Error::input(format!(
            "Gaussian kernel std must be a finite number > 0, got {std}"
        )));
    }
    let c = (size / 2) as f64;
    let g: Vec<f64> = (0..size)
        .map(|i| (-(i as f64 - c).powi(2) / (2.0 * std * std)).exp())
        .collect();
    let total: f64 = g.iter().sum::<f64>().powi(2);
    let data = (0..size * size)
        .map(|i| (g[i / size] * g[i % size] / total) as f32)
        .collect();
    Tensor::new([1, 1, size, size], data)
}

/// Caps the rejection loop for path steps (a near-zero path length rejects most draws); far
/// beyond what any seed needs in practice, it only bounds the worst case.
const MAX_STEP_DRAWS: usize = 1_000_000;

/// A random camera-shake kernel in the manner of `LeviBorodenko/motionblur`'s
/// `Kernel(size, intensity)` (the DPS paper's motion blur), `intensity` ∈ [0, 1].
///
/// Same construction on a canvas of twice the size (diagonal D): a path of steps of length
/// `Beta(1, 30)·(1 − I + 0.1)·D` until the total reaches `0.75·D·(U + U·I²)`; angles starting
/// uniform in ±M (`M = U·I·π`), then triangular(0, I·M, M + 0.1) with the sign of the previous
/// angle flipped with probability `Beta(2, 20)`; the path is centred and rotated by `U·π`. It is then drawn as an anti-aliased line of width `max(1, floor(D/150))`
/// with saturating intensity (like Pillow's white line), blurred by a Gaussian of σ =
/// `max(1, floor(0.01·D))`, reduced to `size×size` with a Lanczos-3 filter, clipped at 0 and
/// normalised to sum 1; `size` in `1..=MAX_KERNEL_SIZE`.
///
/// Differences from the Python original, which bit parity would require re-implementing
/// NumPy's legacy MT19937 samplers and Pillow's rasteriser, blur and resampler: the random
/// draws come from our own seeded SplitMix64 (so results are deterministic per `seed` but not
/// numpy's), the path is centred on the centre of mass of the drawn line rather than on the
/// mean of its vertices (so the kernel does not shift the image by a few pixels), the line is
/// drawn by bilinear splatting, the blur is an exact Gaussian rather than Pillow's box
/// approximation, and the result is not quantised to 8 bits before normalising.
pub fn motion_kernel(size: usize, intensity: f64, seed: u64) -> Result<Tensor> {
    if !(1..=MAX_KERNEL_SIZE).contains(&size) {
        return Err(Error::input(format!(
            "motion kernel size must be in 1..={MAX_KERNEL_SIZE}, got {size}"
        )));
    }
    if !(0.0..=1.0).contains(&intensity) {
        return Err(Error::input(format!(
            "motion kernel intensity must be in [0, 1], got {intensity}"
        )));
    }
    let mut rng = SplitMix64::new(seed);
    let big = 2 * size;
    let diagonal = (2.0 * (big * big) as f64).sqrt();
    let path = camera_path(&mut rng, intensity, diagonal);

    // Centre of mass at canvas coordinate 2·floor(size/2) + 0.5, which the 2:1 reduction maps
    // to output pixel floor(size/2), p2o's origin.
    let centre = 2.0 * (size / 2) as f64 + 0.5;
    let width = ((diagonal / 150.0).floor() as usize).max(1);
    let mut canvas = vec![0.0f64; big * big];
    draw_polyline(&mut canvas, big, &path, centre, width);
    for v in &mut canvas {
        *v = v.min(1.0);
    }
    let sigma = (diagonal * 0.01).floor().max(1.0);
    let blurred = separable(&canvas, big, big, &gaussian_taps(sigma));
    let small = lanczos_halve(&blurred, big, size);
    let total: f64 = small.iter().map(|v| v.max(0.0)).sum();
    if !(total > 0.0 && total.is_finite()) {
        return Err(Error::input(format!(
            "motion kernel (size {size}, intensity {intensity}, seed {seed}) came out empty"
        )));
    }
    let data = small.iter().map(|v| (v.max(0.0) / total) as f32).collect();
    Tensor::new([1, 1, size, size], data)
}

/// The camera trajectory, centred on its centre of mass, as (x, y) points.
fn camera_path(rng: &mut SplitMix64, intensity: f64, diagonal: f64) -> Vec<(f64, f64)> {
    const EPS: f64 = 0.1;
    let max_len = 0.75 * diagonal * (rng.uniform() + rng.uniform() * intensity * intensity);
    let mut steps = Vec::new();
    let mut total = 0.0;
    for _ in 0..MAX_STEP_DRAWS {
        if total >= max_len {
            break;
        }
        let step = rng.beta_1_b(30.0) * (1.0 - intensity + EPS) * diagonal;
        if step < max_len {
            steps.push(step);
            total += step;
        }
    }
    if steps.is_empty() {
        steps.push(max_len);
    }

    let max_angle = rng.uniform() * intensity * PI;
    let jitter = rng.beta_int(2, 20);
    let mut angles = vec![(2.0 * rng.uniform() - 1.0) * max_angle];
    while angles.len() < steps.len() {
        let a = rng.triangular(0.0, intensity * max_angle, max_angle + EPS);
        let prev_sign = signum0(angles[angles.len() - 1]);
        let sign = if rng.uniform() < jitter {
            -prev_sign
        } else {
            prev_sign
        };
        angles.push(a * sign);
    }

    let (mut x, mut y) = (0.0, 0.0);
    let mut path: Vec<(f64, f64)> = steps
        .iter()
        .zip(&angles)
        .map(|(s, a)| {
            x += s * a.cos();
            y += s * a.sin();
            (x, y)
        })
        .collect();
    let (mx, my) = line_centroid(&path);
    let rot = rng.uniform() * PI;
    let (s, c) = rot.sin_cos();
    for p in &mut path {
        let (dx, dy) = (p.0 - mx, p.1 - my);
        *p = (dx * c - dy * s, dx * s + dy * c);
    }
    path
}

/// The centre of mass of the polyline drawn as a uniform line (segment midpoints weighted by
/// length), or of the points when it has no length. The original centres on the mean of the
/// points, which leaves uneven trajectories off-centre by a few pixels.
fn line_centroid(path: &[(f64, f64)]) -> (f64, f64) {
    let (mut sx, mut sy, mut total) = (0.0, 0.0, 0.0);
    for seg in path.windows(2) {
        let ((x0, y0), (x1, y1)) = (seg[0], seg[1]);
        let len = (x1 - x0).hypot(y1 - y0);
        sx += len * (x0 + x1) / 2.0;
        sy += len * (y0 + y1) / 2.0;
        total += len;
    }
    if total > 0.0 {
        return (sx / total, sy / total);
    }
    let n = path.len() as f64;
    path.iter()
        .fold((0.0, 0.0), |(ax, ay), (px, py)| (ax + px / n, ay + py / n))
}

/// NumPy's `sign`: 0 for 0, which makes every later angle 0 as in the original.
fn signum0(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Adds the polyline `path + centre` to `canvas` (`n×n`, pixel centres at integers) by
/// bilinear splats every ≤ 0.25 px, one unit of intensity per pixel of length, on `width`
/// parallel offsets.
fn draw_polyline(canvas: &mut [f64], n: usize, path: &[(f64, f64)], centre: f64, width: usize) {
    let offsets: Vec<f64> = (0..width)
        .map(|k| k as f64 - (width - 1) as f64 / 2.0)
        .collect();
    let mut splat = |x: f64, y: f64, wgt: f64| {
        let (fx, fy) = (x.floor(), y.floor());
        let (tx, ty) = (x - fx, y - fy);
        for (dy, wy) in [(0, 1.0 - ty), (1, ty)] {
            for (dx, wx) in [(0, 1.0 - tx), (1, tx)] {
                let (px, py) = (fx as i64 + dx, fy as i64 + dy);
                if (0..n as i64).contains(&px) && (0..n as i64).contains(&py) {
                    canvas[py as usize * n + px as usize] += wgt * wx * wy;
                }
            }
        }
    };
    if path.len() == 1 {
        splat(path[0].0 + centre, path[0].1 + centre, 1.0);
        return;
    }
    for seg in path.windows(2) {
        let ((x0, y0), (x1, y1)) = (seg[0], seg[1]);
        let len = (x1 - x0).hypot(y1 - y0);
        if len == 0.0 {
            continue;
        }
        let (nx, ny) = (-(y1 - y0) / len, (x1 - x0) / len);
        let samples = (len / 0.25).ceil().max(1.0) as usize;
        let w = len / samples as f64;
        for j in 0..samples {
            let t = (j as f64 + 0.5) / samples as f64;
            let (x, y) = (x0 + t * (x1 - x0) + centre, y0 + t * (y1 - y0) + centre);
            for o in &offsets {
                splat(x + o * nx, y + o * ny, w);
            }
        }
    }
}

/// Normalised taps of a Gaussian of standard deviation `sigma`, radius `ceil(3σ)`.
fn gaussian_taps(sigma: f64) -> Vec<f64> {
    let r = (3.0 * sigma).ceil() as i64;
    let taps: Vec<f64> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = taps.iter().sum();
    taps.into_iter().map(|t| t / s).collect()
}

/// Correlates the `rows×cols` image with `taps` along both axes (zero outside).
fn separable(img: &[f64], rows: usize, cols: usize, taps: &[f64]) -> Vec<f64> {
    let r = (taps.len() / 2) as i64;
    let pass = |src: &[f64], along_rows: bool| -> Vec<f64> {
        let mut dst = vec![0.0; rows * cols];
        for y in 0..rows as i64 {
            for x in 0..cols as i64 {
                let mut acc = 0.0;
                for (k, t) in taps.iter().enumerate() {
                    let d = k as i64 - r;
                    let (sy, sx) = if along_rows { (y, x + d) } else { (y + d, x) };
                    if (0..rows as i64).contains(&sy) && (0..cols as i64).contains(&sx) {
                        acc += t * src[sy as usize * cols + sx as usize];
                    }
                }
                dst[y as usize * cols + x as usize] = acc;
            }
        }
        dst
    };
    let h = pass(img, true);
    pass(&h, false)
}

/// Halves a `2s×2s` image to `s×s` with a Lanczos-3 filter stretched by 2 (Pillow's LANCZOS
/// downscaling), weights normalised per output pixel.
fn lanczos_halve(img: &[f64], big: usize, s: usize) -> Vec<f64> {
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            (PI * x).sin() / (PI * x)
        }
    };
    let lanczos3 = |x: f64| {
        if x.abs() < 3.0 {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    };
    // Output pixel o covers input [2o, 2o + 2): centre 2o + 0.5 in pixel-centre coordinates.
    let weights: Vec<Vec<(usize, f64)>> = (0..s)
        .map(|o| {
            let centre = 2.0 * o as f64 + 0.5;
            let lo = (centre - 6.0).ceil().max(0.0) as usize;
            let hi = ((centre + 6.0).floor() as usize).min(big - 1);
            let w: Vec<(usize, f64)> = (lo..=hi)
                .map(|i| (i, lanczos3((i as f64 - centre) / 2.0)))
                .collect();
            let total: f64 = w.iter().map(|p| p.1).sum();
            w.into_iter().map(|(i, v)| (i, v / total)).collect()
        })
        .collect();
    let mut half_rows = vec![0.0; s * big];
    for y in 0..big {
        for (ox, w) in weights.iter().enumerate() {
            half_rows[ox * big + y] = w.iter().map(|&(i, v)| v * img[y * big + i]).sum();
        }
    }
    let mut out = vec![0.0; s * s];
    for ox in 0..s {
        for (oy, w) in weights.iter().enumerate() {
            out[oy * s + ox] = w.iter().map(|&(i, v)| v * half_rows[ox * big + i]).sum();
        }
    }
    out
}

/// The kernel generator's distributions, drawn from the seeded SplitMix64 (its few hundred
/// draws need nothing stronger).
impl SplitMix64 {
    /// Beta(1, b) by inversion: `1 − (1 − U)^(1/b)`.
    fn beta_1_b(&mut self, b: f64) -> f64 {
        1.0 - (1.0 - self.uniform()).powf(1.0 / b)
    }

    /// Beta(a, b) for integer shapes, as `G_a / (G_a + G_b)` with Gamma(k) = −Σ ln U.
    fn beta_int(&mut self, a: u32, b: u32) -> f64 {
        let mut gamma = |k: u32| -> f64 { (0..k).map(|_| -(1.0 - self.uniform()).ln()).sum() };
        let ga = gamma(a);
        let gb = gamma(b);
        ga / (ga + gb)
    }

    /// NumPy's triangular(left, mode, right) by inversion.
    fn triangular(&mut self, left: f64, mode: f64, right: f64) -> f64 {
        let u = self.uniform();
        let base = right - left;
        let left_base = mode - left;
        if u <= left_base / base {
            left + (u * left_base * base).sqrt()
        } else {
            right - ((1.0 - u) * (right - mode) * base).sqrt()
        }
    }
}
