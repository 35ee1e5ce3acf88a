//! Image and kernel files (`io::image`).

use std::path::PathBuf;

use invdiff::inverse::to_u8;
use invdiff::io::image::{load_image, load_kernel, save_image, save_strip};
use invdiff::{Error, Tensor};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("invdiff-image-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn ramp(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    // Includes out-of-range values, which saving clamps.
    let data = (0..n)
        .map(|i| (i as f32 * 0.37).sin() * 0.7 + 0.45)
        .collect();
    Tensor::new(shape, data).unwrap()
}

#[test]
fn png_round_trip_is_tensor2uint() {
    let t = ramp(&[1, 3, 5, 7]);
    let p = scratch("rgb.png");
    save_image(&p, &t).unwrap();
    let back = load_image(&p).unwrap();
    assert_eq!(back.shape(), &[1, 3, 5, 7]);
    for (a, b) in t.data().iter().zip(back.data()) {
        assert_eq!(*b, f32::from(to_u8(*a)) / 255.0);
    }
    // [3, H, W] saves the same image.
    let p3 = scratch("rgb3.png");
    save_image(&p3, &t.clone().reshape([3, 5, 7]).unwrap()).unwrap();
    assert_eq!(load_image(&p3).unwrap(), back);
}

#[test]
fn grey_images_load_as_three_equal_channels() {
    let g = ramp(&[1, 1, 4, 6]);
    let p = scratch("grey.png");
    save_image(&p, &g).unwrap();
    let back = load_image(&p).unwrap();
    assert_eq!(back.shape(), &[1, 3, 4, 6]);
    let plane = 24;
    for i in 0..plane {
        let want = f32::from(to_u8(g.data()[i])) / 255.0;
        for c in 0..3 {
            assert_eq!(back.data()[c * plane + i], want);
        }
    }
}

#[test]
fn jpeg_round_trip_is_close() {
    let t = Tensor::full([1, 3, 16, 16], 0.5);
    let p = scratch("flat.JPG");
    save_image(&p, &t).unwrap();
    let back = load_image(&p).unwrap();
    assert!(back.data().iter().all(|v| (v - 0.5).abs() < 3.0 / 255.0));
}

#[test]
fn strip_places_images_side_by_side() {
    let a = Tensor::full([1, 3, 4, 5], 0.0);
    let b = Tensor::full([1, 1, 2, 3], 1.0);
    let p = scratch("strip.png");
    save_strip(&p, &[&a, &b], 2).unwrap();
    let s = load_image(&p).unwrap();
    assert_eq!(s.shape(), &[1, 3, 4, 10]);
    let at = |c: usize, y: usize, x: usize| s.data()[(c * 4 + y) * 10 + x];
    assert_eq!(at(0, 0, 0), 0.0); // a
    assert_eq!(at(1, 3, 5), 1.0); // gap (white)
    assert_eq!(at(2, 0, 8), 1.0); // padding above b (white)
    assert_eq!(at(0, 1, 7), 1.0); // b, centred vertically at rows 1..3
    assert!(save_strip(&p, &[], 2).is_err());
}

#[test]
fn errors_name_the_file() {
    let t = ramp(&[1, 3, 2, 2]);
    let bad = scratch("out.bmp");
    let e = save_image(&bad, &t).unwrap_err();
    assert!(
        matches!(e, Error::Format { .. }) && e.to_string().contains("out.bmp"),
        "{e}"
    );
    let e = save_image(scratch("x.png"), &Tensor::zeros([1, 2, 3, 3])).unwrap_err();
    assert!(
        e.to_string().contains("x.png") && e.to_string().contains("channels"),
        "{e}"
    );
    let missing = scratch("missing.png");
    let e = load_image(&missing).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("missing.png"),
        "{e}"
    );
    let junk = scratch("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let e = load_image(&junk).unwrap_err();
    assert!(
        matches!(e, Error::Format { .. }) && e.to_string().contains("junk.png"),
        "{e}"
    );
    let e = save_image(scratch("no_dir/x.png"), &t).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn png_kernels_are_normalised() {
    let mut k = Tensor::zeros([1, 1, 3, 3]);
    k.data_mut()[4] = 1.0;
    k.data_mut()[1] = 0.5;
    let p = scratch("kernel.png");
    save_image(&p, &k).unwrap();
    let back = load_kernel(&p).unwrap();
    assert_eq!(back.shape(), &[1, 1, 3, 3]);
    let sum: f32 = back.data().iter().sum();
    assert!((sum - 1.0).abs() < 1e-6);
    let ratio = back.data()[1] / back.data()[4];
    assert!((ratio - 128.0 / 255.0).abs() < 1e-6, "{ratio}");
    let black = scratch("black.png");
    save_image(&black, &Tensor::zeros([1, 1, 3, 3])).unwrap();
    assert!(load_kernel(&black).is_err());
    let e = load_kernel(scratch("k.mat")).unwrap_err().to_string();
    assert!(e.contains("k.mat") && e.contains(".npy"), "{e}");
}
