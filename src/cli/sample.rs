//! `invdiff sample`: unconditional sampling (the notebook's section II).

use std::path::PathBuf;

use invdiff::sampler::{self, Guidance, Noise};
use invdiff::{Error, Result};

use super::{save_result, scheduler, Progress, SchedulerKind};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder (diffusers pipeline, UNet folder, or google's hub layout).
    #[arg(long)]
    model: PathBuf,
    /// Reverse process.
    #[arg(long, value_enum, default_value_t = SchedulerKind::Ddpm)]
    scheduler: SchedulerKind,
    /// Number of sampling steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// DDIM's eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Images to draw.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seed of the noise (image k uses its own streams, so a batch of 4 holds the first 4
    /// images of any larger batch with the same seed).
    #[arg(long, default_value_t = 0, conflicts_with = "noise")]
    seed: u64,
    /// Noise file with `x_T` [B,C,H,W] and `z` [S,B,C,H,W], instead of a seed.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Output: `.png`/`.jpg` (a row of images) or `.safetensors` (`sample`, `image`).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    backend: super::Backend,
}

pub fn run(a: Args) -> Result<()> {
    super::check_output(&a.output, Some(super::RESULT_FORMATS))?;
    let mut model = super::load_model(Some(&a.model))?;
    let sched = scheduler(&model, a.scheduler, a.eta, a.steps)?;
    let cfg = model.config();
    let (h, w) = cfg.sample_size;
    let noise = match &a.noise {
        Some(p) => Noise::from_file(p)?,
        None => {
            // Before the seeded noise lists the batch's image ids: a batch no memory holds is
            // an error. (With a noise file the batch is the file's.)
            invdiff::host::check_fits(
                invdiff::host::f32_bytes(&[a.batch, cfg.in_channels, h, w], 4),
                &format!("the sampler's arrays for a batch of {}", a.batch),
            )?;
            Noise::seeded(a.seed, 0, a.batch)
        }
    };
    let shape = match &noise {
        Noise::Injected { x_t, .. } => x_t.dims4("x_T")?,
        Noise::Seeded { .. } => [a.batch, cfg.in_channels, h, w],
    };
    if shape[0] == 0 {
        return Err(Error::input("--batch must be at least 1"));
    }
    let mut engine = super::engine(&mut model, a.backend)?;
    eprintln!(
        "invdiff sample: {} steps of {:?} on {}, batch {}",
        a.steps,
        a.scheduler,
        engine.device_name(),
        shape[0]
    );
    let bar = Progress::new(a.steps);
    let x = sampler::sample(
        &mut engine,
        sched.as_ref(),
        Guidance::None,
        None,
        &noise,
        shape,
        |r| bar.step(r),
    );
    let times = bar.finish();
    let x = x?;
    save_result(&a.output, &x)?;
    eprintln!(
        "invdiff sample: wrote {} ({:.1} ms a step, median)",
        a.output.display(),
        times.median_ms
    );
    Ok(())
}
