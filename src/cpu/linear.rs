//! Fully connected layers over rows (per-image vectors, or the tokens of an activation), forward
//! and the gradient with respect to the input.

use super::gemm::{matmul_rows, Mat};
use super::math;

/// Weights of one linear layer, `y = x Wᵀ + b`.
pub struct LinearParams {
    pub out: usize,
    pub inp: usize,
    /// `[out, inp]`, PyTorch's layout: the backward product `dy W`.
    w: Vec<f32>,
    /// `[inp, out]`: the forward product `x Wᵀ`.
    wt: Vec<f32>,
    bias: Vec<f32>,
}

impl LinearParams {
    /// From a `[out, inp]` weight and an `[out]` bias.
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, out: usize, inp: usize) -> Self {
        assert_eq!(weight.len(), out * inp);
        assert_eq!(bias.len(), out);
        let mut wt = vec![0.0; out * inp];
        for o in 0..out {
            for i in 0..inp {
                wt[i * out + o] = weight[o * inp + i];
            }
        }
        LinearParams {
            out,
            inp,
            w: weight,
            wt,
            bias,
        }
    }
}

/// `y = (f(x) Wᵀ + b + residual) / out_div` for `x [rows, inp]`, `f` = SiLU when `silu_in`;
/// every `rows_per_image` rows belong to one image (1 for per-image vectors).
pub fn forward(
    p: &LinearParams,
    x: &[f32],
    silu_in: bool,
    residual: Option<&[f32]>,
    out_div: f32,
    y: &mut [f32],
    rows_per_image: usize,
) {
    let rows = x.len() / p.inp;
    assert_eq!(y.len(), rows * p.out);
    for (i, yr) in y.chunks_exact_mut(p.out).enumerate() {
        yr.copy_from_slice(&p.bias);
        if let Some(r) = residual {
            yr.iter_mut()
                .zip(&r[i * p.out..(i + 1) * p.out])
                .for_each(|(a, b)| *a += b);
        }
    }
    let activated: Vec<f32>;
    let a = if silu_in {
        activated = x.iter().map(|&v| math::silu(v)).collect();
        &activated
    } else {
        x
    };
    matmul_rows(
        a,
        p.inp,
        Mat::rows(&p.wt, p.out),
        p.out,
        y,
        true,
        rows_per_image,
    );
    if out_div != 1.0 {
        y.iter_mut().for_each(|v| *v /= out_div);
    }
}

/// `dx (+)= dy W` (the layer without its input activation, which never lies on the input path).
pub fn backward_input(
    p: &LinearParams,
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    rows_per_image: usize,
) {
    let b = Mat::rows(&p.w, p.inp);
    matmul_rows(dy, p.out, b, p.inp, dx, accumulate, rows_per_image);
}
