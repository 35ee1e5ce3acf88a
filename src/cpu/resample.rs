//! Data movement: layout changes, nearest upsampling, channel concatenation, and the sinusoidal
//! timestep embedding. Each backward sits next to its forward.

use rayon::prelude::*;

/// NCHW (PyTorch's layout) to channels-last NHWC.
pub fn nchw_to_nhwc(x: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    y.par_chunks_mut(h * w * c)
        .enumerate()
        .for_each(|(img, yi)| {
            let xi = &x[img * c * h * w..(img + 1) * c * h * w];
            for (p, yr) in yi.chunks_exact_mut(c).enumerate() {
                for (ch, v) in yr.iter_mut().enumerate() {
                    *v = xi[ch * h * w + p];
                }
            }
        });
    y
}

/// Channels-last NHWC back to NCHW.
pub fn nhwc_to_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * c * h * w];
    y.par_chunks_mut(h * w).enumerate().for_each(|(plane, yp)| {
        let (img, ch) = (plane / c, plane % c);
        let xi = &x[img * h * w * c..(img + 1) * h * w * c];
        for (p, v) in yp.iter_mut().enumerate() {
            *v = xi[p * c + ch];
        }
    });
    y
}

/// Nearest 2x upsampling: `y[2i + a, 2j + b] = x[i, j]`; `x` is `[n, h, w, c]`.
pub fn upsample2x(x: &[f32], h: usize, w: usize, c: usize, y: &mut [f32]) {
    assert_eq!(y.len(), 4 * x.len());
    y.par_chunks_mut(2 * w * c)
        .enumerate()
        .for_each(|(row, yr)| {
            let (img, oy) = (row / (2 * h), row % (2 * h));
            let src = &x[(img * h + oy / 2) * w * c..(img * h + oy / 2 + 1) * w * c];
            for (ox, px) in yr.chunks_exact_mut(c).enumerate() {
                px.copy_from_slice(&src[(ox / 2) * c..(ox / 2 + 1) * c]);
            }
        });
}

/// Adjoint of [`upsample2x`]: each input pixel receives the sum of its 2x2 block.
pub fn upsample2x_backward(
    dy: &[f32],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(dy.len(), 4 * n * h * w * c);
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, dr)| {
        let (img, iy) = (row / h, row % h);
        let r0 = &dy[(img * 2 * h + 2 * iy) * 2 * w * c..][..2 * w * c];
        let r1 = &dy[(img * 2 * h + 2 * iy + 1) * 2 * w * c..][..2 * w * c];
        for (ix, px) in dr.chunks_exact_mut(c).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                let a = 2 * ix * c + ch;
                let s = r0[a] + r0[a + c] + r1[a] + r1[a + c];
                *v = if accumulate { *v + s } else { s };
            }
        }
    });
}

/// `y = [a | b]` along channels, per pixel.
pub fn concat(a: &[f32], ca: usize, b: &[f32], cb: usize, y: &mut [f32]) {
    let c = ca + cb;
    y.par_chunks_mut(c * 256).enumerate().for_each(|(blk, yc)| {
        for (i, px) in yc.chunks_exact_mut(c).enumerate() {
            let p = blk * 256 + i;
            px[..ca].copy_from_slice(&a[p * ca..(p + 1) * ca]);
            px[ca..].copy_from_slice(&b[p * cb..(p + 1) * cb]);
        }
    });
}

/// Adjoint of [`concat()`] for one side: `d (+)= dy[.., offset .. offset + width]`.
pub fn concat_backward(
    dy: &[f32],
    c: usize,
    offset: usize,
    width: usize,
    d: &mut [f32],
    accumulate: bool,
) {
    d.par_chunks_mut(width * 256)
        .enumerate()
        .for_each(|(blk, dc)| {
            for (i, px) in dc.chunks_exact_mut(width).enumerate() {
                let p = blk * 256 + i;
                let src = &dy[p * c + offset..p * c + offset + width];
                if accumulate {
                    px.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                } else {
                    px.copy_from_slice(src);
                }
            }
        });
}

/// diffusers' `get_timestep_embedding` for float timesteps: `[n] -> [n, dim]`.
///
/// Like diffusers it works in f32: the exponents are f32 products, the frequencies and the
/// sines are the f32 roundings of the exact values (diffusers' own f32 `exp`, `sin` and `cos`
/// are at most one ulp away).
pub fn timestep_embedding(t: &[f32], dim: usize, flip_sin_to_cos: bool, shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let e = (log_period * i as f32) / (half as f32 - shift);
            (e as f64).exp() as f32
        })
        .collect();
    let mut out = vec![0.0; t.len() * dim];
    for (row, &tv) in out.chunks_exact_mut(dim).zip(t) {
        for (i, &f) in freqs.iter().enumerate() {
            let arg = (tv * f) as f64;
            let (s, c) = (arg.sin() as f32, arg.cos() as f32);
            let (first, second) = if flip_sin_to_cos { (c, s) } else { (s, c) };
            row[i] = first;
            row[half + i] = second;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trip_and_adjoints() {
        let (n, c, h, w) = (2, 3, 4, 5);
        let x: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
        let y = nchw_to_nhwc(&x, c, h, w);
        assert_eq!(y[1], x[h * w]);
        assert_eq!(nhwc_to_nchw(&y, n, c, h, w), x);

        let mut up = vec![0.0; 4 * y.len()];
        upsample2x(&y, h, w, c, &mut up);
        let v: Vec<f32> = (0..up.len()).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut dx = vec![0.0; y.len()];
        upsample2x_backward(&v, n, h, w, c, &mut dx, false);
        let lhs: f32 = up.iter().zip(&v).map(|(a, b)| a * b).sum();
        let rhs: f32 = y.iter().zip(&dx).map(|(a, b)| a * b).sum();
        assert_eq!(lhs, rhs);

        let (a, b) = (vec![1.0; 6 * 2], vec![2.0; 6 * 3]);
        let mut cat = vec![0.0; 6 * 5];
        concat(&a, 2, &b, 3, &mut cat);
        assert_eq!(&cat[..5], &[1.0, 1.0, 2.0, 2.0, 2.0]);
        let mut db = vec![1.0; 18];
        concat_backward(&cat, 5, 2, 3, &mut db, true);
        assert!(db.iter().all(|&v| v == 3.0));
    }

    #[test]
    fn timestep_embedding_layout() {
        let e = timestep_embedding(&[0.0, 10.0], 8, false, 1.0);
        assert_eq!(&e[..8], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        assert!((e[8] - 10f32.sin()).abs() < 1e-7);
        let f = timestep_embedding(&[10.0], 8, true, 1.0);
        assert_eq!(f[0], e[12]);
    }
}
