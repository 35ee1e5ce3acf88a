//! The notebook's image metrics: KAIR's `calculate_psnr` / `calculate_ssim` on the 8-bit
//! images `tensor2uint` makes of [0, 1] tensors.

use crate::{Error, Result, Tensor};

/// KAIR's `tensor2uint` of one value: clamp to [0, 1], multiply by 255 in f32, round half to
/// even (`numpy.round`), convert to u8. NaN becomes 0 (NumPy's cast is platform-defined there).
#[inline]
pub fn to_u8(x: f32) -> u8 {
    let c = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    (c * 255.0).round_ties_even() as u8
}

/// The notebook's `calculate_psnr(tensor2uint(a), tensor2uint(b))` in dB: MSE in f64 over every
/// channel and pixel of the two 8-bit images, `20·log10(255/√MSE)`, +∞ when they are equal.
/// `a` and `b` must have the same shape (any layout: the MSE does not depend on it).
pub fn psnr_u8(a: &Tensor, b: &Tensor) -> Result<f64> {
    same_shape("PSNR", a, b)?;
    if a.numel() == 0 {
        return Err(Error::input("PSNR of empty images"));
    }
    // Squared differences of 8-bit values are integers, so this sum is exact in any order,
    // which makes the result identical to NumPy's pairwise `mean`.
    let sum: f64 = a
        .data()
        .iter()
        .zip(b.data())
        .map(|(&x, &y)| (f64::from(to_u8(x)) - f64::from(to_u8(y))).powi(2))
        .sum();
    let mse = sum / a.numel() as f64;
    if mse == 0.0 {
        return Ok(f64::INFINITY);
    }
    Ok(20.0 * (255.0 / mse.sqrt()).log10())
}

/// KAIR's `calculate_ssim(tensor2uint(a), tensor2uint(b))`: per channel, SSIM with an 11×11
/// Gaussian window (σ = 1.5, OpenCV's `getGaussianKernel`) over the 'valid' region,
/// `C1 = (0.01·255)²`, `C2 = (0.03·255)²`, the mean of the SSIM map; then the mean over
/// channels. Accepts `[1, C, H, W]`, `[C, H, W]` or `[H, W]` with H, W ≥ 11 (KAIR itself only
/// handles 1 or 3 channels; any C is averaged the same way here).
pub fn ssim(a: &Tensor, b: &Tensor) -> Result<f64> {
    same_shape("SSIM", a, b)?;
    let (c, h, w) = match *a.shape() {
        [1, c, h, w] | [c, h, w] => (c, h, w),
        [h, w] => (1, h, w),
        ref s => {
            return Err(Error::input(format!(
                "SSIM needs images of shape [1, C, H, W], [C, H, W] or [H, W], got {s:?}"
            )))
        }
    };
    if h < WINDOW || w < WINDOW || c == 0 {
        return Err(Error::input(format!(
            "SSIM needs at least {WINDOW}×{WINDOW} pixels and one channel, got {c}×{h}×{w}"
        )));
    }
    let g = gaussian_window();
    let plane = h * w;
    let total: f64 = (0..c)
        .map(|ch| {
            let to_f64 = |t: &Tensor| -> Vec<f64> {
                t.data()[ch * plane..(ch + 1) * plane]
                    .iter()
                    .map(|&v| f64::from(to_u8(v)))
                    .collect()
            };
            ssim_plane(&to_f64(a), &to_f64(b), h, w, &g)
        })
        .sum();
    Ok(total / c as f64)
}

/// Side of the SSIM window.
const WINDOW: usize = 11;

/// `cv2.getGaussianKernel(11, 1.5)`: `exp(-0.5·x²/σ²)` for x = i − 5, times 1/Σ.
fn gaussian_window() -> [f64; WINDOW] {
    let scale2 = -0.5 / (1.5f64 * 1.5);
    let mut g = [0.0; WINDOW];
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - (WINDOW - 1) as f64 * 0.5;
        *v = (scale2 * x * x).exp();
    }
    let inv = 1.0 / g.iter().sum::<f64>();
    g.map(|v| v * inv)
}

/// KAIR's `ssim(img1, img2)` on one f64 plane.
fn ssim_plane(x: &[f64], y: &[f64], h: usize, w: usize, g: &[f64; WINDOW]) -> f64 {
    let c1 = (0.01f64 * 255.0).powi(2);
    let c2 = (0.03f64 * 255.0).powi(2);
    let filter = |img: &[f64]| valid_filter(img, h, w, g);
    let mu1 = filter(x);
    let mu2 = filter(y);
    let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
    let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
    let xy: Vec<f64> = x.iter().zip(y).map(|(a, b)| a * b).collect();
    let (sxx, syy, sxy) = (filter(&xx), filter(&yy), filter(&xy));
    let n = mu1.len();
    let sum: f64 = (0..n)
        .map(|i| {
            let (m1, m2) = (mu1[i], mu2[i]);
            let (m1s, m2s, m12) = (m1 * m1, m2 * m2, m1 * m2);
            let (s1, s2, s12) = (sxx[i] - m1s, syy[i] - m2s, sxy[i] - m12);
            ((2.0 * m12 + c1) * (2.0 * s12 + c2)) / ((m1s + m2s + c1) * (s1 + s2 + c2))
        })
        .sum();
    sum / n as f64
}

/// The 11×11 separable window applied over the 'valid' region: `(h−10)×(w−10)` values.
fn valid_filter(img: &[f64], h: usize, w: usize, g: &[f64; WINDOW]) -> Vec<f64> {
    let (vh, vw) = (h - WINDOW + 1, w - WINDOW + 1);
    let mut rows = vec![0.0; h * vw];
    for y in 0..h {
        for x in 0..vw {
            rows[y * vw + x] = (0..WINDOW).map(|k| g[k] * img[y * w + x + k]).sum();
        }
    }
    let mut out = vec![0.0; vh * vw];
    for y in 0..vh {
        for x in 0..vw {
            out[y * vw + x] = (0..WINDOW).map(|k| g[k] * rows[(y + k) * vw + x]).sum();
        }
    }
    out
}

fn same_shape(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::input(format!(
            "{what}: images must have the same shape, got {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    }
    Ok(())
}
