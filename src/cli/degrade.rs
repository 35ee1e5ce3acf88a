//! `invdiff degrade`: make a blurred, noisy measurement `y = k * x + n` from a sharp image.

use std::collections::HashMap;
use std::path::PathBuf;

use invdiff::inverse::{CircularBlur, LinearOperator};
use invdiff::io::{image, safetensors};
use invdiff::{rng, Error, Result, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sharp image (PNG/JPEG, or a safetensors tensor `truth` or `sharp`), in [0, 1].
    #[arg(long)]
    image: PathBuf,
    /// The blur kernel (PNG, .npy, or safetensors tensor `kernel`); used as stored.
    #[arg(long)]
    kernel: PathBuf,
    /// Standard deviation of the added Gaussian noise, in [0, 1] image units.
    #[arg(long, default_value_t = 0.05)]
    sigma: f32,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `.safetensors` (tensors `measurement`, `truth`, `kernel`, `sigma`: everything `restore`
    /// needs, unclipped) or `.png`/`.jpg` (clipped to [0, 1] and quantised to 8 bits).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let format = super::output_format(&a.output, super::RESULT_FORMATS)?;
    super::check_output(&a.output, None)?;
    if !(a.sigma.is_finite() && a.sigma >= 0.0) {
        return Err(Error::input(format!(
            "--sigma must be a non-negative number, got {}",
            a.sigma
        )));
    }
    let x = super::read_images(&a.image, &["truth", "sharp"])?;
    let kernel = image::load_kernel(&a.kernel)?;
    let [n, c, h, w] = x.dims4("image")?;
    let op = CircularBlur::new(&kernel, c, h, w)?;
    let per = c * h * w;
    let mut y = vec![0.0f32; n * per];
    for (b, yb) in y.chunks_exact_mut(per).enumerate() {
        op.forward(&x.data()[b * per..(b + 1) * per], yb)?;
        let mut noise = vec![0.0f32; per];
        rng::fill_normal(a.seed, b as u64, &mut noise);
        yb.iter_mut()
            .zip(&noise)
            .for_each(|(v, z)| *v += a.sigma * z);
    }
    let y = Tensor::new(vec![n, c, h, w], y)?;
    match format.as_str() {
        "safetensors" => {
            let sigma = Tensor::new(vec![1], vec![a.sigma])?;
            let meta = HashMap::from([
                ("kernel_file".to_string(), a.kernel.display().to_string()),
                ("seed".to_string(), a.seed.to_string()),
            ]);
            safetensors::write(
                &a.output,
                &[
                    ("measurement", &y),
                    ("truth", &x),
                    ("kernel", &kernel),
                    ("sigma", &sigma),
                ],
                Some(&meta),
            )?
        }
        _ => image::save_image(&a.output, &y.batch_item(0))?,
    }
    eprintln!("invdiff degrade: wrote {}", a.output.display());
    Ok(())
}
