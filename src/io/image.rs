//! Images in and out (PNG, JPEG) and blur kernels from files.
//!
//! Loading follows KAIR's `imread_uint` + `uint2tensor4` (grey replicated to RGB, 8-bit
//! values / 255 in f32); saving follows `tensor2uint` (clamp, ×255, round half to even), so a
//! saved image is exactly what the notebook's PSNR sees.

use std::path::Path;

use ::image::codecs::jpeg::JpegEncoder;
use ::image::codecs::png::PngEncoder;
use ::image::{DynamicImage, ExtendedColorType, ImageEncoder, ImageError};

use crate::inverse::to_u8;
use crate::{Error, Result, Tensor};

/// Quality of saved JPEGs: high, since these are results to be inspected.
const JPEG_QUALITY: u8 = 95;

/// Reads a PNG or JPEG (detected from its bytes) as a `[1, 3, H, W]` tensor in [0, 1]: grey
/// is replicated to three channels, alpha is dropped, 16-bit images are reduced to 8 bits
/// first (as every value the notebook sees is 8-bit).
pub fn load_image(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let rgb = decode(path)?.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let raw = rgb.as_raw();
    let mut data = vec![0.0f32; 3 * h * w];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = f32::from(px[c]) / 255.0;
        }
    }
    Tensor::new([1, 3, h, w], data)
}

/// Writes `image` (`[1, 3, H, W]`, `[3, H, W]`, or grey `[1, 1, H, W]`, `[1, H, W]`, `[H, W]`)
/// as PNG or JPEG according to the extension (`.png`, `.jpg`, `.jpeg`), quantised like
/// `tensor2uint`.
pub fn save_image(path: impl AsRef<Path>, image: &Tensor) -> Result<()> {
    let path = path.as_ref();
    let (c, h, w) = image_dims(image)
        .map_err(|msg| Error::input(format!("cannot save {}: {msg}", path.display())))?;
    let plane = h * w;
    let data = image.data();
    let mut pixels = vec![0u8; c * plane];
    for i in 0..plane {
        for ch in 0..c {
            pixels[i * c + ch] = to_u8(data[ch * plane + i]);
        }
    }
    write_pixels(path, &pixels, w, h, c)
}

/// Writes `images` side by side (e.g. measurement | restored | truth) with `gap` white columns
/// between them. Heights may differ: shorter images are centred vertically on white. Grey
/// images are shown in grey on an RGB strip.
pub fn save_strip(path: impl AsRef<Path>, images: &[&Tensor], gap: usize) -> Result<()> {
    let path = path.as_ref();
    if images.is_empty() {
        return Err(Error::input(format!(
            "cannot save {}: no images for the strip",
            path.display()
        )));
    }
    let dims = images
        .iter()
        .enumerate()
        .map(|(i, t)| {
            image_dims(t).map_err(|msg| {
                Error::input(format!("cannot save {}: image {i}: {msg}", path.display()))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let height = dims.iter().map(|d| d.1).max().unwrap_or(0);
    let width = dims.iter().map(|d| d.2).sum::<usize>() + gap * (images.len() - 1);
    let mut pixels = vec![255u8; 3 * height * width];
    let mut x0 = 0;
    for (t, &(c, h, w)) in images.iter().zip(&dims) {
        let y0 = (height - h) / 2;
        let data = t.data();
        for y in 0..h {
            for x in 0..w {
                let dst = 3 * ((y0 + y) * width + x0 + x);
                for ch in 0..3 {
                    let src = if c == 1 { 0 } else { ch };
                    pixels[dst + ch] = to_u8(data[(src * h + y) * w + x]);
                }
            }
        }
        x0 += w + gap;
    }
    write_pixels(path, &pixels, width, height, 3)
}

/// Reads a blur kernel as a `[1, 1, h, w]` tensor:
/// - `.png` (or `.jpg`/`.jpeg`): grey levels / 255 (16-bit: / 65535; colour is converted to
///   luma), normalised to sum 1 since an image cannot store the kernel's scale;
/// - `.npy`: the array as stored, shape `[h, w]`, `[1, h, w]` or `[1, 1, h, w]`;
/// - `.safetensors`: the tensor named `kernel`, same shapes, as stored.
///
/// Array kernels are not renormalised: the notebook's kernels do not sum to exactly 1 and the
/// blur uses them as they are. Every value must be finite.
pub fn load_kernel(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let kernel = match extension(path).as_str() {
        "png" | "jpg" | "jpeg" => return image_kernel(path),
        "npy" => crate::io::npy::read(path)?,
        "safetensors" => crate::io::safetensors::read(path)?.get("kernel")?,
        other => {
            return Err(Error::format(
                path,
                format!(
                    "unknown kernel file extension `.{other}`: expected .png, .npy or .safetensors"
                ),
            ))
        }
    };
    let [h, w] = match *kernel.shape() {
        [h, w] | [1, h, w] | [1, 1, h, w] => [h, w],
        ref s => {
            return Err(Error::format(
                path,
                format!("kernel must have shape [h, w], [1, h, w] or [1, 1, h, w], got {s:?}"),
            ))
        }
    };
    if h == 0 || w == 0 {
        return Err(Error::format(path, "kernel is empty"));
    }
    if let Some(i) = kernel.data().iter().position(|v| !v.is_finite()) {
        return Err(Error::format(
            path,
            format!(
                "kernel value at row {}, column {} is {}",
                i / w,
                i % w,
                kernel.data()[i]
            ),
        ));
    }
    kernel.reshape([1, 1, h, w])
}

/// A grey image file as a kernel normalised to sum 1.
fn image_kernel(path: &Path) -> Result<Tensor> {
    let (w, h, values): (usize, usize, Vec<f64>) = match decode(path)? {
        DynamicImage::ImageLuma16(g) => (
            g.width() as usize,
            g.height() as usize,
            g.as_raw().iter().map(|&v| f64::from(v) / 65535.0).collect(),
        ),
        img => {
            let g = img.to_luma8();
            (
                g.width() as usize,
                g.height() as usize,
                g.as_raw().iter().map(|&v| f64::from(v) / 255.0).collect(),
            )
        }
    };
    let total: f64 = values.iter().sum();
    if total <= 0.0 {
        return Err(Error::format(path, "kernel image is entirely black"));
    }
    Tensor::new(
        [1, 1, h, w],
        values.iter().map(|v| (v / total) as f32).collect(),
    )
}

/// The decoded image, with I/O and format errors naming the file.
fn decode(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    ::image::load_from_memory(&bytes).map_err(|e| image_error(path, e))
}

fn image_error(path: &Path, e: ImageError) -> Error {
    match e {
        ImageError::IoError(io) => Error::io(path, io),
        other => Error::format(path, format!("not a readable PNG/JPEG image: {other}")),
    }
}

/// The lower-cased extension, or "" when there is none.
fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// `(channels, h, w)` of a savable image tensor, with 1 or 3 channels.
fn image_dims(t: &Tensor) -> std::result::Result<(usize, usize, usize), String> {
    let (c, h, w) = match *t.shape() {
        [1, c, h, w] | [c, h, w] => (c, h, w),
        [h, w] => (1, h, w),
        ref s => {
            return Err(format!(
                "expected [1, C, H, W], [C, H, W] or [H, W], got {s:?}"
            ))
        }
    };
    if c != 1 && c != 3 {
        return Err(format!(
            "expected 1 or 3 channels, got {c} (shape {:?})",
            t.shape()
        ));
    }
    if h == 0 || w == 0 {
        return Err(format!("empty image of shape {:?}", t.shape()));
    }
    Ok((c, h, w))
}

/// Encodes interleaved 8-bit pixels (`c` = 1 grey or 3 RGB) by the extension of `path`.
fn write_pixels(path: &Path, pixels: &[u8], w: usize, h: usize, c: usize) -> Result<()> {
    let color = if c == 1 {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    let ext = extension(path);
    if !matches!(ext.as_str(), "png" | "jpg" | "jpeg") {
        return Err(Error::format(
            path,
            format!("unknown image extension `.{ext}`: expected .png, .jpg or .jpeg"),
        ));
    }
    let (w32, h32) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(Error::format(
                path,
                format!("image of {w}×{h} is too large"),
            ))
        }
    };
    super::write_whole(path, |out| {
        let encoded = if ext == "png" {
            PngEncoder::new(out).write_image(pixels, w32, h32, color)
        } else {
            JpegEncoder::new_with_quality(out, JPEG_QUALITY).write_image(pixels, w32, h32, color)
        };
        encoded.map_err(|e| image_error(path, e))
    })
}
