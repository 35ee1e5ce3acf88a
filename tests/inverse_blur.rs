//! The FFT blur operator against the notebook's torch code (`tests/data/sched/inverse.json`,
//! from `scripts/sched_reference.py`) and against its definition.

use invdiff::inverse::{deblurring_guidance, CircularBlur, LinearOperator};
use invdiff::rng::fill_normal;
use invdiff::{Result, Tensor};
use serde_json::Value;

mod common;
use common::{hexes, sched_reference, usizes};

fn reference() -> Value {
    sched_reference("inverse.json")
}

/// Max |a − b| relative to max |b| (torch's complex64 FFT carries ~1e-7 relative error).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| {
        m.max((f64::from(x) - f64::from(y)).abs())
    });
    diff / scale
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    fill_normal(seed, 0, &mut v);
    v
}

#[test]
fn matches_the_notebook_torch_code() {
    let r = reference();
    for case in r["blur"].as_array().unwrap() {
        let ks: Vec<usize> = usizes(&case["kernel_shape"]);
        let k = Tensor::new([1, 1, ks[0], ks[1]], hexes(&case["k"])).unwrap();
        let op = CircularBlur::new(&k, 3, 8, 6).unwrap();
        let (x, y) = (hexes(&case["x"]), hexes(&case["y"]));
        let rr = hexes(&Value::Array(vec![case["r"].clone()]))[0];
        let sigma = hexes(&Value::Array(vec![case["sigma"].clone()]))[0];
        let mut out = vec![0.0f32; x.len()];
        let check = |name: &str, out: &[f32], tol: f64| {
            let e = rel_err(out, &hexes(&case[name]));
            assert!(e < tol, "{name} for kernel {ks:?}: relative error {e:e}");
        };
        op.forward(&x, &mut out).unwrap();
        check("forward", &out, 1e-6);
        op.adjoint(&y, &mut out).unwrap();
        check("adjoint", &out, 1e-6);
        op.pseudo_inverse(&y, rr, sigma, &mut out).unwrap();
        check("pinv", &out, 5e-6);
        deblurring_guidance(&op, &y, &x, rr, sigma, &mut out).unwrap();
        check("guidance", &out, 5e-6);
        deblurring_guidance(&op, &y, &x, 0.5, 0.0, &mut out).unwrap();
        check("guidance_sigma0_r05", &out, 1e-5);
    }
}

#[test]
fn forward_is_the_circular_convolution_of_the_notebook() {
    let (c, h, w, kh, kw) = (3, 20, 17, 5, 4);
    let x = random(c * h * w, 1);
    let k = random(kh * kw, 2);
    let op = CircularBlur::from_slice(&k, kh, kw, c, h, w).unwrap();
    let mut out = vec![0.0f32; x.len()];
    op.forward(&x, &mut out).unwrap();
    let mut want = vec![0.0f32; x.len()];
    for ch in 0..c {
        for i in 0..h {
            for j in 0..w {
                let mut acc = 0.0f64;
                for a in 0..kh {
                    for b in 0..kw {
                        let si = (i + h + kh / 2 - a) % h;
                        let sj = (j + w + kw / 2 - b) % w;
                        acc += f64::from(k[a * kw + b]) * f64::from(x[(ch * h + si) * w + sj]);
                    }
                }
                want[(ch * h + i) * w + j] = acc as f32;
            }
        }
    }
    assert!(rel_err(&out, &want) < 1e-6);
    // A centred delta kernel is the identity (the blur does not shift).
    let mut delta = vec![0.0f32; 9 * 6];
    delta[4 * 6 + 3] = 1.0;
    let id = CircularBlur::from_slice(&delta, 9, 6, c, h, w).unwrap();
    id.forward(&x, &mut out).unwrap();
    assert!(rel_err(&out, &x) < 1e-6);
}

#[test]
fn adjoint_identity() {
    let (c, h, w) = (3, 64, 48);
    let x = random(c * h * w, 3);
    let y = random(c * h * w, 4);
    let k = Tensor::new([9, 7], random(63, 5)).unwrap();
    let op = CircularBlur::new(&k, c, h, w).unwrap();
    let (mut ax, mut aty) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
    op.forward(&x, &mut ax).unwrap();
    op.adjoint(&y, &mut aty).unwrap();
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(&p, &q)| f64::from(p) * f64::from(q))
            .sum::<f64>()
    };
    let (lhs, rhs) = (dot(&ax, &y), dot(&x, &aty));
    let scale = dot(&ax, &ax).sqrt() * dot(&y, &y).sqrt();
    assert!(
        (lhs - rhs).abs() < 1e-6 * scale,
        "<Ax,y> = {lhs}, <x,Aᵀy> = {rhs}"
    );
}

#[test]
fn odd_and_single_channel_counts() {
    // Channels are paired inside the FFT; an odd count leaves one alone.
    for c in [1, 2, 5] {
        let (h, w) = (10, 12);
        let x = random(c * h * w, 6);
        let k = random(9, 7);
        let op = CircularBlur::from_slice(&k, 3, 3, c, h, w).unwrap();
        let mut out = vec![0.0f32; x.len()];
        op.forward(&x, &mut out).unwrap();
        let one = CircularBlur::from_slice(&k, 3, 3, 1, h, w).unwrap();
        for ch in 0..c {
            let mut o1 = vec![0.0f32; h * w];
            one.forward(&x[ch * h * w..(ch + 1) * h * w], &mut o1)
                .unwrap();
            assert!(
                rel_err(&out[ch * h * w..(ch + 1) * h * w], &o1) < 1e-6,
                "C={c}, channel {ch}"
            );
        }
    }
}

/// Only forward/adjoint/pseudo-inverse: exercises the trait's default `pinv_residual`.
struct Plain(CircularBlur);

impl LinearOperator for Plain {
    fn input_shape(&self) -> [usize; 3] {
        self.0.input_shape()
    }
    fn output_shape(&self) -> [usize; 3] {
        self.0.output_shape()
    }
    fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        self.0.forward(x, out)
    }
    fn adjoint(&self, y: &[f32], out: &mut [f32]) -> Result<()> {
        self.0.adjoint(y, out)
    }
    fn pseudo_inverse(&self, y: &[f32], r: f32, s: f32, out: &mut [f32]) -> Result<()> {
        self.0.pseudo_inverse(y, r, s, out)
    }
}

/// Only forward/adjoint: the pseudo-inverse is not supported.
struct NoInverse(CircularBlur);

impl LinearOperator for NoInverse {
    fn input_shape(&self) -> [usize; 3] {
        self.0.input_shape()
    }
    fn output_shape(&self) -> [usize; 3] {
        self.0.output_shape()
    }
    fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        self.0.forward(x, out)
    }
    fn adjoint(&self, y: &[f32], out: &mut [f32]) -> Result<()> {
        self.0.adjoint(y, out)
    }
}

#[test]
fn fused_guidance_equals_the_literal_one() {
    let (c, h, w) = (3, 32, 24);
    let k: Vec<f32> = random(25, 8).iter().map(|v| v.abs() / 20.0).collect();
    let x = random(c * h * w, 9);
    let y = random(c * h * w, 10);
    let op = CircularBlur::from_slice(&k, 5, 5, c, h, w).unwrap();
    let (mut fused, mut literal) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
    deblurring_guidance(&op, &y, &x, 0.3, 0.04, &mut fused).unwrap();
    let plain = Plain(CircularBlur::from_slice(&k, 5, 5, c, h, w).unwrap());
    deblurring_guidance(&plain, &y, &x, 0.3, 0.04, &mut literal).unwrap();
    assert!(rel_err(&fused, &literal) < 1e-5);

    let none = NoInverse(CircularBlur::from_slice(&k, 5, 5, c, h, w).unwrap());
    let e = deblurring_guidance(&none, &y, &x, 0.3, 0.04, &mut literal).unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
}

#[test]
fn invalid_kernels_and_buffers_are_errors() {
    let big = Tensor::zeros([1, 1, 9, 3]);
    let e = CircularBlur::new(&big, 3, 8, 8).err().unwrap().to_string();
    assert!(e.contains("larger than"), "{e}");
    assert!(CircularBlur::new(&Tensor::zeros([1, 1, 3, 9]), 3, 8, 8).is_err());
    assert!(CircularBlur::new(&Tensor::zeros([0, 3]), 3, 8, 8).is_err());
    assert!(CircularBlur::new(&Tensor::zeros([2, 1, 3, 3]), 3, 8, 8).is_err());
    assert!(CircularBlur::new(&Tensor::zeros([3, 3]), 0, 8, 8).is_err());
    let nan = Tensor::new([2, 2], vec![0.0, f32::NAN, 0.0, 0.0]).unwrap();
    let e = CircularBlur::new(&nan, 3, 8, 8).err().unwrap().to_string();
    assert!(e.contains("NaN"), "{e}");
    assert!(CircularBlur::from_slice(&[1.0; 5], 2, 3, 1, 4, 4).is_err());

    let op = CircularBlur::new(&Tensor::full([3, 3], 1.0 / 9.0), 3, 8, 8).unwrap();
    assert_eq!(op.kernel_shape(), [3, 3]);
    assert_eq!(op.input_shape(), [3, 8, 8]);
    let x = vec![0.0f32; 3 * 64];
    let mut short = vec![0.0f32; 3 * 63];
    assert!(op.forward(&x, &mut short).is_err());
    assert!(op.adjoint(&x[..10], &mut vec![0.0; 3 * 64]).is_err());
    let mut out = vec![0.0f32; 3 * 64];
    assert!(op.pseudo_inverse(&x, 0.5, 0.0, &mut out).is_err());
    assert!(op.pseudo_inverse(&x, f32::NAN, 0.1, &mut out).is_err());
    assert!(deblurring_guidance(&op, &x, &x[..5], 0.5, 0.1, &mut out).is_err());
}
