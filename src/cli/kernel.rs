//! `invdiff kernel`: blur kernels for experiments (Gaussian, or random camera shake).

use std::path::{Path, PathBuf};

use invdiff::inverse::{gaussian_kernel, motion_kernel};
use invdiff::io::{image, npy, safetensors};
use invdiff::{Result, Tensor};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Kind {
    Gaussian,
    Motion,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Gaussian blur or a random camera-shake trajectory.
    #[arg(long, value_enum)]
    kind: Kind,
    /// Kernel width and height in pixels, 1 to 2048 (a larger kernel can still be loaded from
    /// a file).
    #[arg(long, default_value_t = 33)]
    size: usize,
    /// Gaussian: standard deviation in pixels (default 3). Motion: shake intensity in [0, 1]
    /// (default 0.5, as the DPS experiments).
    #[arg(long)]
    intensity: Option<f64>,
    /// Seed of the motion trajectory.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output: `.safetensors` (tensor `kernel` [1,1,n,n]), `.npy`, or `.png` (a preview scaled
    /// to its maximum; it loads back normalised to sum 1).
    #[arg(long)]
    output: PathBuf,
}

/// What `kernel` writes.
const KERNEL_FORMATS: &[&str] = &["safetensors", "npy", "png"];

pub fn run(a: Args) -> Result<()> {
    super::check_output(&a.output, Some(KERNEL_FORMATS))?;
    let k = match a.kind {
        Kind::Gaussian => gaussian_kernel(a.size, a.intensity.unwrap_or(3.0))?,
        Kind::Motion => motion_kernel(a.size, a.intensity.unwrap_or(0.5), a.seed)?,
    };
    write_kernel(&a.output, &k)?;
    eprintln!("invdiff kernel: wrote {}", a.output.display());
    Ok(())
}

/// Writes a `[1, 1, h, w]` kernel by extension.
fn write_kernel(path: &Path, k: &Tensor) -> Result<()> {
    match super::output_format(path, KERNEL_FORMATS)?.as_str() {
        "safetensors" => safetensors::write(path, &[("kernel", k)], None),
        "npy" => npy::write(path, k),
        _ => {
            let max = k
                .data()
                .iter()
                .fold(0f32, |m, &v| m.max(v))
                .max(f32::MIN_POSITIVE);
            let data = k.data().iter().map(|v| v / max).collect();
            image::save_image(path, &Tensor::new(k.shape().to_vec(), data)?)
        }
    }
}
