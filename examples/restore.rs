//! Restore a blurred image with DPS, as a library user would.
//!
//! ```text
//! cargo run --release --example restore -- weights/ddpm-ema-celebahq-256 \
//!     tests/data/ffhq-deblur/0.safetensors restored.png
//! ```
//! The measurement file is one of the vendored real samples (`blurred`, `kernel`, `sharp`).

use std::sync::Arc;

use invdiff::engine::{DeviceChoice, Engine};
use invdiff::inverse::{psnr_u8, CircularBlur, LinearOperator};
use invdiff::io::{image, safetensors};
use invdiff::model::Model;
use invdiff::sampler::{self, Guidance, Measurements, Noise};
use invdiff::schedule::{Ddpm, Scheduler, SchedulerConfig};

fn main() -> invdiff::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_dir, sample, output] = args.as_slice() else {
        eprintln!("usage: restore MODEL_DIR SAMPLE.safetensors OUTPUT.png");
        std::process::exit(2);
    };

    // The network and its scheduler (google's DDPM settings when the folder has none).
    let model = Model::load(model_dir.as_ref())?;
    let mut engine = Engine::new(&model, DeviceChoice::Auto)?;
    let config = match &model.scheduler_config {
        Some(p) => SchedulerConfig::from_file(p)?,
        None => SchedulerConfig::default(),
    };
    let mut scheduler = Ddpm::new(config)?;
    scheduler.set_timesteps(100)?;

    // The measurement y = k * x + n and its blur operator.
    let file = safetensors::read(sample.as_ref())?;
    let y = file.get("blurred")?;
    let [_, c, h, w] = y.dims4("blurred")?;
    let blur: Arc<dyn LinearOperator> = Arc::new(CircularBlur::new(&file.get("kernel")?, c, h, w)?);
    let measurements = Measurements {
        operators: vec![blur],
        y,
    };

    // DPS with the notebook's fixed step weight; seeded noise makes the run reproducible.
    let guidance = Guidance::Dps {
        scale: 1.0,
        adaptive: false,
    };
    let x = sampler::sample(
        &mut engine,
        &scheduler,
        guidance,
        Some(&measurements),
        &Noise::seeded(0, 0, 1),
        [1, c, h, w],
        |step| eprint!("\rstep {} (t = {})", step.index + 1, step.timestep),
    )?;
    let restored = sampler::to_image(&x);
    image::save_image(output, &restored)?;
    eprintln!("\nPSNR {:.2} dB", psnr_u8(&restored, &file.get("sharp")?)?);
    Ok(())
}
