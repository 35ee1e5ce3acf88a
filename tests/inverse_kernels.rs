//! Blur-kernel generators and the notebook's `clean_output`.

use invdiff::inverse::{
    clean_output, clean_output_derivative, clean_output_in_place, gaussian_kernel, motion_kernel,
    CircularBlur, LinearOperator,
};
use invdiff::Tensor;

fn centre_of_mass(k: &Tensor) -> (f64, f64) {
    let s = k.shape()[3];
    let mut m = (0.0, 0.0);
    for (i, &v) in k.data().iter().enumerate() {
        m.0 += (i / s) as f64 * f64::from(v);
        m.1 += (i % s) as f64 * f64::from(v);
    }
    let total: f64 = k.data().iter().map(|&v| f64::from(v)).sum();
    (m.0 / total, m.1 / total)
}

fn sum(k: &Tensor) -> f64 {
    k.data().iter().map(|&v| f64::from(v)).sum()
}

#[test]
fn gaussian_is_normalised_and_centred_where_p2o_expects() {
    for size in [1usize, 4, 5, 33] {
        let k = gaussian_kernel(size, 1.3).unwrap();
        assert_eq!(k.shape(), &[1, 1, size, size]);
        assert!((sum(&k) - 1.0).abs() < 1e-6);
        let c = size / 2;
        let at = |i: usize, j: usize| k.data()[i * size + j];
        // Symmetric about index floor(size/2) wherever both sides exist.
        for d in 1..=c.min(size - 1 - c) {
            assert_eq!(at(c + d, c), at(c - d, c));
            assert_eq!(at(c, c + d), at(c, c - d));
        }
        let max = k.data().iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(at(c, c), max);
    }
    // Blurring a delta does not move it (even kernel size included).
    for size in [6usize, 7] {
        let k = gaussian_kernel(size, 1.0).unwrap();
        let (h, w) = (16, 16);
        let mut x = vec![0.0f32; h * w];
        x[5 * w + 9] = 1.0;
        let op = CircularBlur::new(&k, 1, h, w).unwrap();
        let mut y = vec![0.0f32; h * w];
        op.forward(&x, &mut y).unwrap();
        let (mut cy, mut cx, mut t) = (0.0f64, 0.0f64, 0.0f64);
        for (i, &v) in y.iter().enumerate() {
            let v = f64::from(v);
            cy += (i / w) as f64 * v;
            cx += (i % w) as f64 * v;
            t += v;
        }
        // An even-size Gaussian centred at size/2 is truncated on one side: allow that skew.
        assert!(
            (cy / t - 5.0).abs() < 0.1 && (cx / t - 9.0).abs() < 0.1,
            "size {size}"
        );
    }
    assert!(gaussian_kernel(0, 1.0).is_err());
    assert!(gaussian_kernel(5, 0.0).is_err());
    assert!(gaussian_kernel(5, f64::NAN).is_err());
}

#[test]
fn motion_kernels_are_deterministic_normalised_and_centred() {
    for size in [33usize, 61] {
        for seed in 0..8u64 {
            let k = motion_kernel(size, 0.5, seed).unwrap();
            assert_eq!(k.shape(), &[1, 1, size, size]);
            assert_eq!(k, motion_kernel(size, 0.5, seed).unwrap(), "seed {seed}");
            assert!(k.data().iter().all(|&v| v >= 0.0 && v.is_finite()));
            assert!((sum(&k) - 1.0).abs() < 1e-5, "sum {}", sum(&k));
            let (cy, cx) = centre_of_mass(&k);
            let c = (size / 2) as f64;
            assert!(
                (cy - c).abs() < 2.0 && (cx - c).abs() < 2.0,
                "size {size} seed {seed}: centre of mass ({cy:.2}, {cx:.2})"
            );
            // A shake, not a point: mass is spread over many pixels.
            let support = k.data().iter().filter(|&&v| v > 1e-4).count();
            assert!(support > 9, "size {size} seed {seed}: support {support}");
        }
        assert_ne!(
            motion_kernel(size, 0.5, 1).unwrap(),
            motion_kernel(size, 0.5, 2).unwrap()
        );
    }
    for intensity in [0.0, 1.0] {
        let k = motion_kernel(17, intensity, 3).unwrap();
        assert!((sum(&k) - 1.0).abs() < 1e-5);
    }
    let one = motion_kernel(1, 0.5, 0).unwrap();
    assert_eq!(one.data(), &[1.0]);
    assert!(motion_kernel(0, 0.5, 0).is_err());
    assert!(motion_kernel(33, 1.5, 0).is_err());
    assert!(motion_kernel(33, f64::NAN, 0).is_err());
}

#[test]
fn clean_output_as_the_notebook() {
    assert_eq!(clean_output(-2.0), 0.0);
    assert_eq!(clean_output(2.0), 1.0);
    assert_eq!(clean_output(0.0), 0.5);
    assert_eq!(clean_output(-0.5), 0.25);
    assert!(clean_output(f32::NAN).is_nan());
    let mut v = [-1.5f32, 0.5, 1.5];
    clean_output_in_place(&mut v);
    assert_eq!(v, [0.0, 0.75, 1.0]);
    // torch's clamp backward is zero at the bounds themselves.
    assert_eq!(clean_output_derivative(0.3), 0.5);
    assert_eq!(clean_output_derivative(1.0), 0.0);
    assert_eq!(clean_output_derivative(-1.0), 0.0);
    assert_eq!(clean_output_derivative(-3.0), 0.0);
}
