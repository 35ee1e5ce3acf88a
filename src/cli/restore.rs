//! `invdiff restore`: posterior sampling for deblurring (the notebook's section III).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use invdiff::config::UNetConfig;
use invdiff::inverse::{psnr_u8, ssim, CircularBlur, LinearOperator};
use invdiff::io::{image, safetensors};
use invdiff::sampler::{self, Guidance, Measurements, Noise};
use invdiff::{Error, Result, Tensor};
use serde_json::json;

use super::{save_result, scheduler, Progress, SchedulerKind};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// Diffusion posterior sampling (Chung et al. 2023).
    Dps,
    /// Pseudo-inverse guided diffusion (Song et al. 2023), as in the notebook.
    Pigdm,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum EtaSchedule {
    /// η_t = 1.
    Fixed,
    /// η_t = β_t / √α_t.
    Adaptive,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder (diffusers pipeline, UNet folder, or google's hub layout).
    #[arg(long)]
    model: PathBuf,
    /// Posterior sampler.
    #[arg(long, value_enum)]
    method: Method,
    /// Measurement(s) in [0, 1]: an image, a folder of images, or a safetensors file with
    /// `measurement` [B,C,H,W] or [C,H,W] (or the data set's `blurred`, whose `kernel`,
    /// `sigma` and `sharp` then serve as defaults).
    #[arg(long)]
    measurement: PathBuf,
    /// Blur kernel: PNG (normalised to sum 1), .npy or safetensors `kernel` (used as stored).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Sampling steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Guidance weight (default: DPS fixed 1, DPS adaptive 100, ΠGDM 1, as in the notebook).
    #[arg(long)]
    scale: Option<f32>,
    /// DPS step weight η_t.
    #[arg(long, value_enum, default_value_t = EtaSchedule::Fixed)]
    eta_schedule: EtaSchedule,
    /// Measurement noise level for ΠGDM (default: the measurement file's `sigma`, one value or
    /// one per image all alike, else 0.05); DPS reads none.
    #[arg(long)]
    sigma: Option<f32>,
    /// Reverse process.
    #[arg(long, value_enum, default_value_t = SchedulerKind::Ddpm)]
    scheduler: SchedulerKind,
    /// DDIM's eta.
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Seed; image k of the input set always uses the same noise, whatever the batch or shard.
    #[arg(long, default_value_t = 0, conflicts_with = "noise")]
    seed: u64,
    /// Noise file with `x_T` [B,C,H,W] and `z` [S,B,C,H,W], instead of a seed (one batch only).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Ground truth (image, folder, or safetensors `truth`/`sharp`): prints PSNR and SSIM.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Output: `.png`/`.jpg`/`.safetensors` for one image, a folder for several (`<name>.png`
    /// each; also for one image when it is a folder or ends in `/`).
    #[arg(long)]
    output: PathBuf,
    /// Also write measurement | restored | truth side by side (`<output>_strip.png`).
    #[arg(long)]
    strip: bool,
    /// Write settings, timings and metrics as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Images per network call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Process only part `i` of `n` of the inputs (`i/n`, 0-based), e.g. one Slurm array task.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Leave out the images whose output (and with --strip, strip) is already written, so that
    /// rerunning an interrupted run does the rest; its report lists only what it restored.
    /// Each image's noise is keyed by its place in the input set, so with the same inputs the
    /// results are those of one whole run (on a GPU with --batch above 1, to the bit only with
    /// --batch-invariant, as batches then hold other images).
    #[arg(long, conflicts_with = "noise")]
    skip_existing: bool,
    #[command(flatten)]
    backend: super::Backend,
}

fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("expected i/n with 0 <= i < n, got `{s}`");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// One image to restore.
struct Item {
    /// Index in the whole input set (keys its noise).
    index: usize,
    name: String,
    /// `[1, C, H, W]`.
    y: Tensor,
    truth: Option<Tensor>,
    kernel: Tensor,
}

/// Reads the inputs: measurements, with their kernels and truths, and the measurement file's
/// `sigma`, if it has one.
fn read_items(a: &Args) -> Result<(Vec<Item>, Option<Tensor>)> {
    let path = &a.measurement;
    let mut ys: Vec<(String, Tensor)> = Vec::new();
    let (mut file_kernel, mut file_sigma, mut file_truth) = (None, None, None);
    if path.is_dir() {
        for p in super::image_files(path)? {
            ys.push((super::stem(&p), image::load_image(&p)?));
        }
        if ys.is_empty() {
            return Err(Error::input(format!(
                "{}: no PNG or JPEG images in this folder",
                path.display()
            )));
        }
    } else if super::is_safetensors(path) {
        let f = safetensors::read(path)?;
        let name = if f.contains("measurement") {
            "measurement"
        } else {
            "blurred"
        };
        let y = super::as_batch(f.get(name)?, path, name)?;
        let stem = super::stem(path);
        for b in 0..y.shape()[0] {
            let n = if y.shape()[0] == 1 {
                stem.clone()
            } else {
                format!("{stem}_{b}")
            };
            ys.push((n, y.batch_item(b)));
        }
        file_kernel = f.contains("kernel").then(|| f.get("kernel")).transpose()?;
        file_sigma = f.contains("sigma").then(|| f.get("sigma")).transpose()?;
        for t in ["truth", "sharp"] {
            if file_truth.is_none() && f.contains(t) {
                file_truth = Some(super::as_batch(f.get(t)?, path, t)?);
            }
        }
    } else {
        ys.push((super::stem(path), image::load_image(path)?));
    }

    let kernel = match (&a.kernel, file_kernel) {
        (Some(k), _) => image::load_kernel(k)?,
        (None, Some(k)) => k,
        (None, None) => {
            return Err(Error::input(format!(
                "{}: no blur kernel: pass --kernel (PNG, .npy or safetensors `kernel`)",
                path.display()
            )))
        }
    };
    let truths: Option<Vec<Tensor>> = match &a.truth {
        Some(t) if t.is_dir() => Some(
            ys.iter()
                .map(|(n, _)| super::find_image(t, n).and_then(image::load_image))
                .collect::<Result<_>>()?,
        ),
        Some(t) => {
            let x = super::read_images(t, &["truth", "sharp"])?;
            Some((0..x.shape()[0]).map(|b| x.batch_item(b)).collect())
        }
        None => file_truth.map(|x| (0..x.shape()[0]).map(|b| x.batch_item(b)).collect()),
    };
    if let Some(t) = &truths {
        if t.len() != ys.len() {
            return Err(Error::input(format!(
                "{} measurements but {} ground-truth images",
                ys.len(),
                t.len()
            )));
        }
    }
    let items = ys
        .into_iter()
        .enumerate()
        .map(|(index, (name, y))| Item {
            index,
            name,
            y,
            truth: truths.as_ref().map(|t| t[index].clone()),
            kernel: kernel.clone(),
        })
        .collect();
    Ok((items, file_sigma))
}

/// ΠGDM's noise level, which every image of a run shares: --sigma, else the measurement file's
/// `sigma` (one value, or one per image all alike), else 0.05.
fn noise_level(a: &Args, file_sigma: Option<&Tensor>) -> Result<f32> {
    let path = &a.measurement;
    let sigma = match (a.sigma, file_sigma) {
        (Some(s), _) => s,
        (None, Some(s)) => match s.data() {
            [first, rest @ ..] if rest.iter().all(|v| v.to_bits() == first.to_bits()) => *first,
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `sigma` of shape {:?}: ΠGDM takes one noise level for every \
                         image, and these differ (pass --sigma, or restore them apart)",
                        s.shape()
                    ),
                ))
            }
        },
        (None, None) => 0.05,
    };
    if !(sigma.is_finite() && sigma >= 0.0) {
        let source = match a.sigma {
            Some(_) => "--sigma".to_string(),
            None => format!("{}'s `sigma`", path.display()),
        };
        return Err(Error::input(format!(
            "{source}: the noise level must be a finite number >= 0, got {sigma}"
        )));
    }
    Ok(sigma)
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 {
        return Err(Error::input("--batch must be at least 1"));
    }
    let (mut items, file_sigma) = read_items(&a)?;
    let scale = a.scale.unwrap_or(match (a.method, a.eta_schedule) {
        (Method::Dps, EtaSchedule::Adaptive) => 100.0,
        _ => 1.0,
    });
    // DPS reads no noise level, so it ignores the file's `sigma`, whatever its shape.
    let guidance = match a.method {
        Method::Dps => Guidance::Dps {
            scale,
            adaptive: a.eta_schedule == EtaSchedule::Adaptive,
        },
        Method::Pigdm => Guidance::Pigdm {
            scale,
            sigma: noise_level(&a, file_sigma.as_ref())?,
        },
    };
    guidance.check()?;
    let total = items.len();
    // Several inputs go to a folder, one to a file unless --output names a folder.
    let to_folder = total > 1 || a.output.is_dir() || ends_with_separator(&a.output);
    if to_folder {
        // `out.png` for several images is more likely a slip than a folder's name.
        if a.output.extension().is_some() && !a.output.is_dir() && !ends_with_separator(&a.output) {
            return Err(Error::input(format!(
                "{total} inputs: --output must be a folder, got {} (end it with / to make a \
                 folder of that name)",
                a.output.display()
            )));
        }
        check_unique_outputs(&a, &items)?;
        std::fs::create_dir_all(&a.output).map_err(|e| Error::io(&a.output, e))?;
    } else {
        super::check_output(&a.output, Some(super::RESULT_FORMATS))?;
    }
    // After the output folder is made: the report may go in it.
    if let Some(path) = &a.report {
        super::check_output(path, None)?;
    }
    if let Some((i, n)) = a.shard {
        items.retain(|it| it.index % n == i);
    }
    // Outputs are written whole or not at all (io::write_whole), so one that exists is done.
    let mut skipped = 0;
    if a.skip_existing {
        let before = items.len();
        items.retain(|it| {
            let out = output_path(&a, to_folder, it);
            !(out.exists() && (!a.strip || strip_path(&out).exists()))
        });
        skipped = before - items.len();
        if skipped > 0 {
            eprintln!(
                "invdiff restore: {skipped} of {before} image(s) already written to {}: skipped",
                a.output.display()
            );
        }
        if items.is_empty() {
            return Ok(());
        }
    }
    let mut model = super::load_model(Some(&a.model))?;
    let cfg = model.config().clone();
    let sched = scheduler(&model, a.scheduler, a.eta, a.steps)?;
    let noise_file = a.noise.as_ref().map(|p| Noise::from_file(p)).transpose()?;
    if noise_file.is_some() && items.len() > a.batch {
        return Err(Error::input(
            "--noise holds one batch: use --batch with all inputs in it",
        ));
    }
    // Every batch is checked before the first is restored. (Each batch's operators are made
    // again when it runs: kept, every image's kernel spectrum would live through the run.)
    for batch in items.chunks(a.batch) {
        blur_operators(batch, &cfg)?;
    }
    let mut engine = super::engine(&mut model, a.backend)?;
    eprintln!(
        "invdiff restore: {:?} ({} steps, scale {scale}) on {} image(s), {}",
        a.method,
        a.steps,
        items.len(),
        engine.device_name()
    );

    let mut reports = Vec::new();
    // Images whose batch diverged, and the first such error. (Their steps count in `steps_s`:
    // the time was spent, up to the diverging step on the CPU, every step on the GPU.)
    let (mut failed, mut first_failure) = (0, None);
    // The batches' summed step times (the GPU's, on the device loop), and each batch's median
    // step (printed: their median).
    let (mut steps_s, mut step_ms) = (0.0, Vec::new());
    let start_all = Instant::now();
    for batch in items.chunks(a.batch) {
        let first = &batch[0];
        let (shape, operators) = blur_operators(batch, &cfg)?;
        let y = Tensor::concat_batch(&batch.iter().map(|it| it.y.clone()).collect::<Vec<_>>())?;
        let noise = match &noise_file {
            Some(n) => n.clone(),
            None => Noise::seeded(a.seed, first.index as u64, batch.len()),
        };
        let noise = match noise {
            Noise::Seeded { seed, .. } => Noise::Seeded {
                seed,
                image_ids: batch.iter().map(|it| it.index as u64).collect(),
            },
            injected => injected,
        };
        let m = Measurements { operators, y };
        let bar = Progress::new(a.steps);
        let t0 = Instant::now();
        let run = sampler::sample(
            &mut engine,
            sched.as_ref(),
            guidance,
            Some(&m),
            &noise,
            shape,
            |r| bar.step(r),
        );
        let times = bar.finish();
        let seconds = t0.elapsed().as_secs_f64();
        steps_s += times.total_s;
        // A batch that diverges costs its own images, not the rest of a data set's: it is
        // reported, and the run goes on (and fails at the end).
        let x = match run {
            Err(e @ Error::Diverged { .. }) => {
                for it in batch {
                    if items.len() > 1 {
                        eprintln!("{}: not restored: {e}", it.name);
                    }
                    reports.push(json!({ "name": it.name, "error": e.to_string() }));
                }
                failed += batch.len();
                first_failure.get_or_insert(e);
                continue;
            }
            other => other?,
        };
        step_ms.push(times.median_ms);
        let restored = sampler::to_image(&x);
        for (b, it) in batch.iter().enumerate() {
            let out = output_path(&a, to_folder, it);
            let xb = x.batch_item(b);
            let img = restored.batch_item(b);
            save_result(&out, &xb)?;
            let mut rep = json!({
                "name": it.name,
                "output": out.display().to_string(),
                "seconds": seconds / batch.len() as f64,
                "step_ms_median": times.median_ms,
                "setup_seconds": (seconds - times.total_s) / batch.len() as f64,
            });
            if let Some(t) = &it.truth {
                let (p, s) = (psnr_u8(&img, t)?, ssim(&img, t)?);
                let p0 = psnr_u8(&it.y, t)?;
                eprintln!(
                    "{}: PSNR {p:.2} dB, SSIM {s:.4} (measurement: PSNR {p0:.2} dB)",
                    it.name
                );
                rep["psnr"] = p.into();
                rep["ssim"] = s.into();
                rep["psnr_measurement"] = p0.into();
            }
            if a.strip {
                let strip = strip_path(&out);
                let mut row = vec![&it.y, &img];
                row.extend(it.truth.as_ref());
                image::save_strip(&strip, &row, 4)?;
            }
            reports.push(rep);
        }
    }
    let total_s = start_all.elapsed().as_secs_f64();
    let median_ms = super::median(&mut step_ms);
    let restored = reports.len() - failed;
    if restored > 0 {
        eprintln!(
            "invdiff restore: {restored} image(s) in {total_s:.1} s ({:.3} s per step per batch: \
             steps {steps_s:.2} s, {median_ms:.2} ms median step, the rest {:.2} s), wrote {}",
            total_s / (a.steps * items.len().div_ceil(a.batch)) as f64,
            total_s - steps_s,
            a.output.display()
        );
    }
    if let Some(path) = &a.report {
        let report = json!({
            "settings": {
                "model": model.source,
                "method": format!("{:?}", a.method).to_lowercase(),
                "steps": a.steps,
                "scale": scale,
                "eta_schedule": format!("{:?}", a.eta_schedule).to_lowercase(),
                "sigma": match guidance {
                    Guidance::Pigdm { sigma, .. } => Some(sigma),
                    _ => None,
                },
                "scheduler": format!("{:?}", a.scheduler).to_lowercase(),
                "eta": a.eta,
                "seed": a.noise.is_none().then_some(a.seed),
                "noise_file": a.noise.as_ref().map(|p| p.display().to_string()),
                "batch": a.batch,
                "shard": a.shard.map(|(i, n)| format!("{i}/{n}")),
                "device": engine.device_name(),
                "precision": engine.precision().name(),
                "batch_invariant": engine.batch_invariant(),
                "choices": engine.choices(),
            },
            "images": reports,
            "failed": failed,
            "skipped": skipped,
            "seconds": total_s,
            "steps_seconds": steps_s,
            "version": env!("CARGO_PKG_VERSION"),
        });
        let text = serde_json::to_string_pretty(&report).expect("serialisable");
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))?;
    }
    match first_failure {
        None => Ok(()),
        Some(e) if items.len() == 1 => Err(e),
        Some(e) => Err(Error::input(format!(
            "{failed} of {} image(s) not restored (the first: {e})",
            items.len()
        ))),
    }
}

/// Where an image's result goes: `<output>/<name>.png` in a folder run, else `--output`.
fn output_path(a: &Args, to_folder: bool, it: &Item) -> PathBuf {
    if to_folder {
        a.output.join(format!("{}.png", it.name))
    } else {
        a.output.clone()
    }
}

/// One blur operator per image of a batch.
type Operators = Vec<Arc<dyn LinearOperator>>;

/// A batch's shape and blur operators, once its measurements are checked against the model and
/// each other (and their ground truths against them).
fn blur_operators(batch: &[Item], cfg: &UNetConfig) -> Result<([usize; 4], Operators)> {
    let first = &batch[0];
    let [_, c, h, w] = first.y.dims4("measurement")?;
    if c != cfg.in_channels {
        return Err(Error::input(format!(
            "{}: the model restores {}-channel images, this measurement has {c}",
            first.name, cfg.in_channels
        )));
    }
    cfg.check_input_size(h, w)
        .map_err(|e| Error::input(format!("{}: {e}", first.name)))?;
    let mut operators: Operators = Vec::new();
    for it in batch {
        if it.y.shape() != first.y.shape() {
            return Err(Error::input(format!(
                "{} and {} have different sizes: restore them in separate batches (--batch 1)",
                first.name, it.name
            )));
        }
        if let Some(t) = it.truth.as_ref().filter(|t| t.shape() != it.y.shape()) {
            return Err(Error::input(format!(
                "{}: the ground truth is {:?} and the measurement {:?}",
                it.name,
                t.shape(),
                it.y.shape()
            )));
        }
        let op = CircularBlur::new(&it.kernel, c, h, w)
            .map_err(|e| Error::input(format!("{}: {e}", it.name)))?;
        operators.push(Arc::new(op));
        if !it.y.all_finite() {
            return Err(Error::input(format!(
                "{}: the measurement holds NaN or infinite values",
                it.name
            )));
        }
    }
    Ok(([batch.len(), c, h, w], operators))
}

/// Whether `path` ends in a separator (`out/`): a folder, made if missing.
fn ends_with_separator(path: &Path) -> bool {
    path.as_os_str()
        .to_string_lossy()
        .ends_with(std::path::is_separator)
}

/// An error if two of the files a folder run writes (`<name>.png`, and with `--strip`
/// `<name>_strip.png`) would be one, over every shard's inputs, as shards share the folder.
/// Names are compared without case, as macOS and Windows file systems compare them.
fn check_unique_outputs(a: &Args, items: &[Item]) -> Result<()> {
    let mut written = std::collections::HashMap::new();
    for it in items {
        let out = output_path(a, true, it);
        let strip = a.strip.then(|| strip_path(&out));
        for file in [Some(out), strip].into_iter().flatten() {
            let key = file.to_string_lossy().to_lowercase();
            if let Some(other) = written.insert(key, it.name.clone()) {
                return Err(Error::input(format!(
                    "inputs {other} and {} would both be written to {}",
                    it.name,
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

/// `out.png` -> `out_strip.png`.
fn strip_path(out: &Path) -> PathBuf {
    let stem = super::stem(out);
    out.with_file_name(format!("{stem}_strip.png"))
}
