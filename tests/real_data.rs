//! The vendored real samples (`tests/data/ffhq-deblur`, FFHQ faces blurred by camera-shake
//! kernels) agree with our blur operator: `blurred - k * sharp` is the added Gaussian noise,
//! whose standard deviation is the file's `sigma`.

use std::path::Path;

use invdiff::inverse::{psnr_u8, CircularBlur, LinearOperator};
use invdiff::io::safetensors;

#[test]
fn measurements_are_the_blurred_truth_plus_noise_of_level_sigma() {
    for i in 0..3 {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/data/ffhq-deblur/{i}.safetensors"));
        let f = safetensors::read(&path).unwrap();
        let (x, y, k) = (
            f.get("sharp").unwrap(),
            f.get("blurred").unwrap(),
            f.get("kernel").unwrap(),
        );
        let sigma = f.get("sigma").unwrap().data()[0] as f64;
        let op = CircularBlur::new(&k, 3, 256, 256).unwrap();
        let mut ax = vec![0.0f32; x.numel()];
        op.forward(x.data(), &mut ax).unwrap();
        let n = ax.len() as f64;
        let resid: Vec<f64> = y
            .data()
            .iter()
            .zip(&ax)
            .map(|(a, b)| (*a - *b) as f64)
            .collect();
        let mean = resid.iter().sum::<f64>() / n;
        let std = (resid.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
        println!("sample {i}: noise std {std:.5} vs sigma {sigma:.5}, mean {mean:.1e}");
        assert!(
            (std / sigma - 1.0).abs() < 0.01,
            "sample {i}: {std} vs {sigma}"
        );
        assert!(mean.abs() < 3.0 * sigma / n.sqrt() * 10.0);
        // The measurement is a poor image of the truth: what a restoration has to beat.
        assert!(psnr_u8(&y, &x).unwrap() < 27.0);
    }
}
