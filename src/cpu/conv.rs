//! Convolutions on channels-last activations (3x3 with stride 1 or 2, and 1x1), forward and the
//! gradient with respect to the input.
//!
//! Forward: output rows are cut into tiles of a few hundred pixels; each tile gathers its
//! receptive fields into a small im2col block (it stays in L2) and multiplies it by the weights
//! laid out as `[(tap, ci), co]`. Bias, time embedding and residual are written into the output
//! first and the product accumulates onto them, so the epilogue costs no extra pass.
//!
//! Backward (stride 1) is the same convolution of the output gradient with the kernel flipped
//! and transposed, `[(tap, co), ci]`. Backward of stride 2 avoids the zero-stuffed gradient:
//! each input pixel receives contributions from a fixed subset of taps that depends only on the
//! parity of its coordinates, so every (input row, tap) pair is one product over contiguous
//! output-gradient pixels written into every other input pixel.
//!
//! 3x3 stride-1 convolutions, forward and backward, go to the Winograd F(2x2, 3x3) path
//! ([`super::winograd`]) unless `INVDIFF_CONV=direct` asks for the direct path above (for
//! comparing numerics), or they sum over too few channels for it to pay ([`Algorithm`]).

use std::sync::{LazyLock, OnceLock};

use rayon::prelude::*;

use super::gemm::{matmul, matmul_rows, Mat};
use super::winograd::{self, Epilogue};
use crate::model::graph::Pad;

/// Weights of one convolution in the layouts the products want.
pub struct ConvParams {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    /// `[(tap, ci), co]`, tap = dy * k + dx.
    fwd: Vec<f32>,
    /// `[(tap, co), ci]`, built on the first backward pass (inference never needs it).
    bwd: OnceLock<Vec<f32>>,
    /// Winograd transforms of the forward and of the backward kernel (3x3 only), each built on
    /// first use.
    wino_fwd: OnceLock<winograd::Weights>,
    wino_bwd: OnceLock<winograd::Weights>,
    bias: Vec<f32>,
}

impl ConvParams {
    /// From PyTorch's `[cout, cin, k, k]` weight and `[cout]` bias.
    pub fn new(weight: &[f32], bias: &[f32], cout: usize, cin: usize, k: usize) -> Self {
        assert_eq!(weight.len(), cout * cin * k * k);
        assert_eq!(bias.len(), cout);
        let taps = k * k;
        let mut fwd = vec![0.0; taps * cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for t in 0..taps {
                    fwd[(t * cin + ci) * cout + co] = weight[(co * cin + ci) * taps + t];
                }
            }
        }
        ConvParams {
            cin,
            cout,
            k,
            fwd,
            bwd: OnceLock::new(),
            wino_fwd: OnceLock::new(),
            wino_bwd: OnceLock::new(),
            bias: bias.to_vec(),
        }
    }

    fn bwd(&self) -> &[f32] {
        self.bwd.get_or_init(|| {
            let (cin, cout, taps) = (self.cin, self.cout, self.k * self.k);
            let mut b = vec![0.0; taps * cout * cin];
            for t in 0..taps {
                for ci in 0..cin {
                    for co in 0..cout {
                        b[(t * cout + co) * cin + ci] = self.fwd[(t * cin + ci) * cout + co];
                    }
                }
            }
            b
        })
    }

    fn wino_fwd(&self) -> &winograd::Weights {
        self.wino_fwd.get_or_init(|| {
            let (cin, cout) = (self.cin, self.cout);
            winograd::Weights::new(cin, cout, |t, ci, co| self.fwd[(t * cin + ci) * cout + co])
        })
    }

    /// The flipped, transposed kernel: `cout -> cin`, tap `t` reading forward tap `8 - t`.
    fn wino_bwd(&self) -> &winograd::Weights {
        self.wino_bwd.get_or_init(|| {
            let (cin, cout) = (self.cin, self.cout);
            winograd::Weights::new(cout, cin, |t, co, ci| {
                self.fwd[((8 - t) * cin + ci) * cout + co]
            })
        })
    }
}

/// How 3x3 stride-1 convolutions are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// im2col and a matrix product: the reference.
    Direct,
    /// Winograd F(2x2, 3x3) where the channels are enough for it to pay, direct otherwise.
    Winograd,
}

impl Algorithm {
    /// `Direct` when the environment variable `INVDIFF_CONV` is `direct` (read once), else
    /// `Winograd`.
    pub fn from_env() -> Algorithm {
        static ALGO: LazyLock<Algorithm> =
            LazyLock::new(|| match crate::switches::value("INVDIFF_CONV") {
                Some(v) if v == "direct" => Algorithm::Direct,
                _ => Algorithm::Winograd,
            });
        *ALGO
    }

    /// Whether a 3x3 convolution summing over `reduced` channels (`cin` forward, `cout`
    /// backward) goes to Winograd.
    fn winograd(self, p: &ConvParams, g: Geometry, reduced: usize) -> bool {
        self == Algorithm::Winograd
            && p.k == 3
            && g.stride == 1
            && matches!(g.pad, Pad::Symmetric)
            && reduced >= WINOGRAD_MIN_REDUCED
    }
}

/// Fewest summed channels for which Winograd pays. With 3 (the network's RGB input and the
/// output conv's backward) its products are too short for anything but writing the 16
/// transformed matrices, which then cost more than the direct path; a few output channels, on
/// the other hand, are fine (1.7x faster at 128 -> 3).
const WINOGRAD_MIN_REDUCED: usize = 16;

/// Spatial geometry of one convolution call.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub n: usize,
    /// Input height and width.
    pub h: usize,
    pub w: usize,
    pub stride: usize,
    pub pad: Pad,
}

impl Geometry {
    fn out_hw(&self) -> (usize, usize) {
        (self.h / self.stride, self.w / self.stride)
    }

    /// Zero rows above / columns left of the input, for a 3x3 kernel.
    fn pad_before(&self) -> usize {
        match self.pad {
            Pad::Symmetric => 1,
            Pad::RightBottom => 0,
        }
    }
}

/// Target number of output pixels per tile: enough rows for an efficient product, small enough
/// for the im2col block to stay in cache.
const TILE_PIXELS: usize = 512;

/// Rows per tile: the largest divisor of `rows` that keeps a tile under [`TILE_PIXELS`] and
/// leaves at least two tiles per image (so a small layer at batch 1 still uses two cores).
///
/// The tiling depends on the image's size only, never on the batch or the thread count, and
/// each tile is one single-threaded product: an image's result is then bit-for-bit the same
/// whatever batch it is in and however many threads run.
fn rows_per_tile(rows: usize, width: usize) -> usize {
    let cap = (TILE_PIXELS / width.max(1)).max(1).min((rows / 2).max(1));
    (1..=rows.min(cap))
        .rev()
        .find(|r| rows % r == 0)
        .unwrap_or(1)
}

/// Gathers the 3x3 receptive fields of output rows `oy0..oy0 + rows` of one image into
/// `col[(pixel), (tap, c)]`. With `flip`, tap `t` goes to column block `8 - t` (the flipped
/// kernel of the stride-1 backward pass).
#[allow(clippy::too_many_arguments)]
fn im2col3(
    src: &[f32],
    h: usize,
    w: usize,
    c: usize,
    oy0: usize,
    rows: usize,
    ow: usize,
    stride: usize,
    pad: usize,
    flip: bool,
    col: &mut [f32],
) {
    let kc = 9 * c;
    for r in 0..rows {
        let oy = oy0 + r;
        for ox in 0..ow {
            let dst = &mut col[(r * ow + ox) * kc..(r * ow + ox + 1) * kc];
            for dy in 0..3 {
                let iy = (oy * stride + dy) as isize - pad as isize;
                for dx in 0..3 {
                    let ix = (ox * stride + dx) as isize - pad as isize;
                    let t = dy * 3 + dx;
                    let blk = if flip { 8 - t } else { t };
                    let d = &mut dst[blk * c..(blk + 1) * c];
                    if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                        d.fill(0.0);
                    } else {
                        let s = (iy as usize * w + ix as usize) * c;
                        d.copy_from_slice(&src[s..s + c]);
                    }
                }
            }
        }
    }
}

/// Forward convolution: `y = (conv(x) + bias + temb[n] + residual) / out_div`.
///
/// `x` is `[n, h, w, cin]`, `y` is `[n, h/s, w/s, cout]`, `temb` is `[n, cout]`, `residual` has
/// the shape of `y`. The algorithm is [`Algorithm::from_env`].
pub fn forward(
    p: &ConvParams,
    x: &[f32],
    g: Geometry,
    temb: Option<&[f32]>,
    residual: Option<&[f32]>,
    out_div: f32,
    y: &mut [f32],
) {
    forward_with(Algorithm::from_env(), p, x, g, temb, residual, out_div, y)
}

/// [`forward`] with the given algorithm.
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    algo: Algorithm,
    p: &ConvParams,
    x: &[f32],
    g: Geometry,
    temb: Option<&[f32]>,
    residual: Option<&[f32]>,
    out_div: f32,
    y: &mut [f32],
) {
    let (oh, ow) = g.out_hw();
    let (cin, cout) = (p.cin, p.cout);
    assert_eq!(x.len(), g.n * g.h * g.w * cin);
    assert_eq!(y.len(), g.n * oh * ow * cout);
    if algo.winograd(p, g, cin) {
        let ep = Epilogue::Store {
            bias: Some(&p.bias),
            temb,
            residual,
            out_div,
        };
        return winograd::conv3x3(p.wino_fwd(), x, g.n, g.h, g.w, y, ep);
    }
    let rpt = rows_per_tile(oh, ow);
    let tile_len = rpt * ow * cout;
    let kc = p.k * p.k * cin;

    let run_tile = |col: &mut Vec<f32>, ti: usize, yt: &mut [f32]| {
        let img = ti * rpt / oh;
        let oy0 = ti * rpt % oh;
        let pix0 = ti * rpt * ow;
        let m = rpt * ow;
        // Epilogue first: the product accumulates onto bias + temb + residual.
        for (i, yrow) in yt.chunks_exact_mut(cout).enumerate() {
            yrow.copy_from_slice(&p.bias);
            if let Some(t) = temb {
                for (v, e) in yrow.iter_mut().zip(&t[img * cout..(img + 1) * cout]) {
                    *v += e;
                }
            }
            if let Some(r) = residual {
                let rrow = &r[(pix0 + i) * cout..(pix0 + i + 1) * cout];
                for (v, e) in yrow.iter_mut().zip(rrow) {
                    *v += e;
                }
            }
        }
        let a = if p.k == 1 {
            Mat::rows(&x[pix0 * cin..(pix0 + m) * cin], cin)
        } else {
            col.resize(m * kc, 0.0);
            let src = &x[img * g.h * g.w * cin..(img + 1) * g.h * g.w * cin];
            let pad = g.pad_before();
            im2col3(src, g.h, g.w, cin, oy0, rpt, ow, g.stride, pad, false, col);
            Mat::rows(col, kc)
        };
        matmul(m, cout, kc, yt, cout, a, Mat::rows(&p.fwd, cout), true, 1);
        if out_div != 1.0 {
            yt.iter_mut().for_each(|v| *v /= out_div);
        }
    };
    y.par_chunks_mut(tile_len)
        .enumerate()
        .for_each_init(Vec::new, |col, (ti, yt)| run_tile(col, ti, yt));
}

/// Gradient with respect to the input: `dx (+)= conv^T(dy)`. `g` is the forward geometry
/// (input sizes), `dy` is `[n, h/s, w/s, cout]`, `dx` is `[n, h, w, cin]`. The algorithm is
/// [`Algorithm::from_env`].
pub fn backward_input(p: &ConvParams, dy: &[f32], g: Geometry, dx: &mut [f32], accumulate: bool) {
    backward_input_with(Algorithm::from_env(), p, dy, g, dx, accumulate)
}

/// [`backward_input`] with the given algorithm.
pub fn backward_input_with(
    algo: Algorithm,
    p: &ConvParams,
    dy: &[f32],
    g: Geometry,
    dx: &mut [f32],
    accumulate: bool,
) {
    let (oh, ow) = g.out_hw();
    let (cin, cout) = (p.cin, p.cout);
    assert_eq!(dy.len(), g.n * oh * ow * cout);
    assert_eq!(dx.len(), g.n * g.h * g.w * cin);
    if p.k == 1 {
        return matmul_rows(
            dy,
            cout,
            Mat::rows(p.bwd(), cin),
            cin,
            dx,
            accumulate,
            g.h * g.w,
        );
    }
    if g.stride == 1 {
        return backward_stride1(algo, p, dy, g, dx, accumulate);
    }
    backward_stride2(p, p.bwd(), dy, g, dx, accumulate)
}

fn backward_stride1(
    algo: Algorithm,
    p: &ConvParams,
    dy: &[f32],
    g: Geometry,
    dx: &mut [f32],
    accumulate: bool,
) {
    if algo.winograd(p, g, p.cout) {
        let ep = Epilogue::gradient(accumulate);
        // The backward's bwd-layout copy is never built on this path: it would cost as much
        // memory as the forward weights for nothing.
        return winograd::conv3x3(p.wino_bwd(), dy, g.n, g.h, g.w, dx, ep);
    }
    let wb = p.bwd();
    let (h, w, cin, cout) = (g.h, g.w, p.cin, p.cout);
    let rpt = rows_per_tile(h, w);
    let tile_len = rpt * w * cin;
    let kc = 9 * cout;
    let run_tile = |col: &mut Vec<f32>, ti: usize, dxt: &mut [f32]| {
        let img = ti * rpt / h;
        let y0 = ti * rpt % h;
        let m = rpt * w;
        col.resize(m * kc, 0.0);
        let src = &dy[img * h * w * cout..(img + 1) * h * w * cout];
        im2col3(src, h, w, cout, y0, rpt, w, 1, 1, true, col);
        let (a, b) = (Mat::rows(col, kc), Mat::rows(wb, cin));
        matmul(m, cin, kc, dxt, cin, a, b, accumulate, 1);
    };
    dx.par_chunks_mut(tile_len)
        .enumerate()
        .for_each_init(Vec::new, |col, (ti, t)| run_tile(col, ti, t));
}

fn backward_stride2(
    p: &ConvParams,
    wb: &[f32],
    dy: &[f32],
    g: Geometry,
    dx: &mut [f32],
    accumulate: bool,
) {
    let (h, w, cin, cout) = (g.h, g.w, p.cin, p.cout);
    let (oh, ow) = g.out_hw();
    let pad = g.pad_before();
    let run_row = |row: usize, dxr: &mut [f32]| {
        let img = row / h;
        let iy = row % h;
        if !accumulate {
            dxr.fill(0.0);
        }
        for dy_ in 0..3 {
            // Output row feeding input row iy through tap row dy_: oy * 2 + dy_ - pad = iy.
            let num = iy + pad;
            if num < dy_ || (num - dy_) % 2 != 0 || (num - dy_) / 2 >= oh {
                continue;
            }
            let oy = (num - dy_) / 2;
            let dyrow = &dy[(img * oh + oy) * ow * cout..(img * oh + oy + 1) * ow * cout];
            for px in 0..2 {
                for dx_ in 0..3 {
                    // Input column ix = 2 j + px reads output column ox = j + (px + pad - dx_) / 2
                    // when that difference is even; j stops where ix or ox leaves its image.
                    let s = (px + pad) as isize - dx_ as isize;
                    if s % 2 != 0 {
                        continue;
                    }
                    let off = s / 2;
                    let j0 = (-off).max(0);
                    let j1 = (ow as isize - off).min((w - px).div_ceil(2) as isize);
                    if j1 <= j0 {
                        continue;
                    }
                    let (j0, j1) = (j0 as usize, j1 as usize);
                    let ox0 = (j0 as isize + off) as usize;
                    let m = j1 - j0;
                    let t = dy_ * 3 + dx_;
                    let a = Mat::rows(&dyrow[ox0 * cout..(ox0 + m) * cout], cout);
                    let b = Mat::rows(&wb[t * cout * cin..(t + 1) * cout * cin], cin);
                    let c = &mut dxr[(2 * j0 + px) * cin..];
                    matmul(m, cin, cout, c, 2 * cin, a, b, true, 1);
                }
            }
        }
    };
    dx.par_chunks_mut(w * cin)
        .enumerate()
        .for_each(|(row, dxr)| run_row(row, dxr));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution in f64 (NHWC), PyTorch semantics, for checking.
    fn naive(
        x: &[f32],
        wt: &[f32],
        b: &[f32],
        g: Geometry,
        cin: usize,
        cout: usize,
        k: usize,
    ) -> Vec<f64> {
        let (oh, ow) = g.out_hw();
        let pad = if k == 1 { 0 } else { g.pad_before() } as isize;
        let mut y = vec![0.0f64; g.n * oh * ow * cout];
        for n in 0..g.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..cout {
                        let mut acc = b[co] as f64;
                        for dy in 0..k {
                            for dx in 0..k {
                                let iy = (oy * g.stride + dy) as isize - pad;
                                let ix = (ox * g.stride + dx) as isize - pad;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                for ci in 0..cin {
                                    let xv =
                                        x[((n * g.h + iy as usize) * g.w + ix as usize) * cin + ci];
                                    acc +=
                                        xv as f64 * wt[((co * cin + ci) * k + dy) * k + dx] as f64;
                                }
                            }
                        }
                        y[((n * oh + oy) * ow + ox) * cout + co] = acc;
                    }
                }
            }
        }
        y
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::uniform_lcg(seed, n, -0.5, 0.5)
    }

    fn check(k: usize, stride: usize, pad: Pad, h: usize, w: usize) {
        let (n, cin, cout) = (2, 5, 7);
        let g = Geometry {
            n,
            h,
            w,
            stride,
            pad,
        };
        let x = rand(n * h * w * cin, 1);
        let wt = rand(cout * cin * k * k, 2);
        let b = rand(cout, 3);
        let p = ConvParams::new(&wt, &b, cout, cin, k);
        let (oh, ow) = g.out_hw();
        let mut y = vec![0.0; n * oh * ow * cout];
        forward(&p, &x, g, None, None, 1.0, &mut y);
        let want = naive(&x, &wt, &b, g, cin, cout, k);
        for (a, b) in y.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "{k} {stride} {pad:?}: {a} vs {b}"
            );
        }
        // <conv(x) - b, v> = <x, conv^T(v)> checks the backward against the forward.
        let v = rand(y.len(), 4);
        let mut dx = vec![0.0; x.len()];
        backward_input(&p, &v, g, &mut dx, false);
        let lhs: f64 = y
            .iter()
            .enumerate()
            .map(|(i, &yv)| (yv - b[i % cout]) as f64 * v[i] as f64)
            .sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{lhs} {rhs}");
        // Accumulation adds onto what is there.
        let mut dx2 = vec![1.0; x.len()];
        backward_input(&p, &v, g, &mut dx2, true);
        for (a, b) in dx.iter().zip(&dx2) {
            assert!((a + 1.0 - b).abs() < 1e-5);
        }
    }

    #[test]
    fn forward_and_backward_agree_with_the_definition() {
        check(3, 1, Pad::Symmetric, 6, 10);
        check(1, 1, Pad::Symmetric, 4, 6);
        check(3, 2, Pad::Symmetric, 8, 6);
        check(3, 2, Pad::RightBottom, 8, 6);
        check(3, 2, Pad::RightBottom, 2, 2);
        check(3, 1, Pad::Symmetric, 1, 1);
    }

    #[test]
    fn epilogue_adds_temb_and_residual_then_divides() {
        let (n, h, w, cin, cout) = (2, 4, 4, 3, 4);
        let g = Geometry {
            n,
            h,
            w,
            stride: 1,
            pad: Pad::Symmetric,
        };
        let x = rand(n * h * w * cin, 5);
        let wt = rand(cout * cin * 9, 6);
        let b = rand(cout, 7);
        let p = ConvParams::new(&wt, &b, cout, cin, 3);
        let temb = rand(n * cout, 8);
        let res = rand(n * h * w * cout, 9);
        let mut plain = vec![0.0; res.len()];
        forward(&p, &x, g, None, None, 1.0, &mut plain);
        let mut y = vec![0.0; res.len()];
        forward(&p, &x, g, Some(&temb), Some(&res), 2.0, &mut y);
        for i in 0..y.len() {
            let img = i / (h * w * cout);
            let want = (plain[i] + temb[img * cout + i % cout] + res[i]) / 2.0;
            assert!((y[i] - want).abs() < 1e-6);
        }
    }
}
