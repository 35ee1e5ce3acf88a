//! PSNR / SSIM / tensor2uint against KAIR's code run by `scripts/sched_reference.py`.

use invdiff::inverse::{psnr_u8, ssim, to_u8};
use invdiff::Tensor;
use serde_json::Value;

mod common;
use common::{sched_reference, usizes};

fn reference() -> Value {
    sched_reference("inverse.json")
}

/// The script's `test_image`: an integer-valued 8-bit image, noisy when `salt != 0`.
fn test_image(c: usize, h: usize, w: usize, salt: u64) -> Tensor {
    let mut data = Vec::with_capacity(c * h * w);
    for ch in 0..c as u64 {
        for y in 0..h as u64 {
            for x in 0..w as u64 {
                let v = (x * 7 + y * 13 + ch * 50 + ((x * y) % 17) * 3) % 256;
                let noise =
                    (((ch * 1000003 + y * 7919 + x * 104729 + salt * 15485863) * 2654435761) >> 7)
                        % 41;
                let noisy = v as i64 + if salt != 0 { noise as i64 - 20 } else { 0 };
                data.push(noisy.clamp(0, 255) as f32 / 255.0);
            }
        }
    }
    Tensor::new([1, c, h, w], data).unwrap()
}

#[test]
fn psnr_and_ssim_match_kair() {
    let r = reference();
    for m in r["metrics"].as_array().unwrap() {
        let s: Vec<usize> = usizes(&m["shape"]);
        let a = test_image(s[1], s[2], s[3], 0);
        let b = test_image(s[1], s[2], s[3], 1);
        let p = psnr_u8(&a, &b).unwrap();
        let want = m["psnr"].as_f64().unwrap();
        assert!((p - want).abs() < 1e-12, "PSNR {p} vs {want}");
        let q = ssim(&a, &b).unwrap();
        let want = m["ssim"].as_f64().unwrap();
        assert!((q - want).abs() < 1e-12, "SSIM {q} vs {want}");
    }
}

#[test]
fn tensor2uint_rounds_half_to_even_and_clamps() {
    let r = reference();
    let t = &r["to_u8"];
    let inputs = t[0].as_array().unwrap();
    let outputs = t[1].as_array().unwrap();
    for (i, o) in inputs.iter().zip(outputs) {
        let x = f32::from_bits(u32::from_str_radix(i.as_str().unwrap(), 16).unwrap());
        assert_eq!(u64::from(to_u8(x)), o.as_u64().unwrap(), "tensor2uint({x})");
    }
    assert_eq!(to_u8(f32::NAN), 0);
    assert_eq!(to_u8(f32::INFINITY), 255);
    assert_eq!(to_u8(f32::NEG_INFINITY), 0);
}

#[test]
fn identical_images_and_errors() {
    let a = test_image(3, 16, 16, 0);
    assert_eq!(psnr_u8(&a, &a).unwrap(), f64::INFINITY);
    assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
    // Quantisation first: differences below half a level do not count.
    let b = Tensor::new(a.shape(), a.data().iter().map(|v| v + 0.001).collect()).unwrap();
    assert_eq!(psnr_u8(&a, &b).unwrap(), f64::INFINITY);
    let other = test_image(3, 16, 17, 0);
    assert!(psnr_u8(&a, &other).is_err());
    assert!(ssim(&a, &other).is_err());
    let small = test_image(1, 10, 16, 0);
    assert!(ssim(&small, &small).is_err());
    let grey = Tensor::new([16, 16], test_image(1, 16, 16, 0).into_data()).unwrap();
    let grey_noisy = Tensor::new([16, 16], test_image(1, 16, 16, 1).into_data()).unwrap();
    let four_d = ssim(&test_image(1, 16, 16, 0), &test_image(1, 16, 16, 1)).unwrap();
    assert_eq!(ssim(&grey, &grey_noisy).unwrap(), four_d);
    assert!(psnr_u8(&Tensor::zeros([0]), &Tensor::zeros([0])).is_err());
    assert!(ssim(
        &Tensor::zeros([2, 3, 16, 16]),
        &Tensor::zeros([2, 3, 16, 16])
    )
    .is_err());
}
