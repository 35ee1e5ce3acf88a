//! Command definitions; one module per command.

mod bench;
mod compare;
mod degrade;
mod doctor;
mod eps;
mod info;
mod kernel;
mod restore;
mod sample;
mod selftest;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use invdiff::cuda::Precision;
use invdiff::engine::{DeviceChoice, Engine};
use invdiff::io::{image, safetensors};
use invdiff::model::Model;
use invdiff::sampler::{to_image, StepReport};
use invdiff::schedule::{Ddim, Ddpm, Scheduler, SchedulerConfig};
use invdiff::{Error, Result, Tensor};

/// Diffusion models for image inverse problems: diffusers' UNet2DModel, DDPM/DDIM, DPS and
/// ΠGDM deblurring, on the CPU and on NVIDIA GPUs.
#[derive(Parser, Debug)]
#[command(name = "invdiff", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the network once: predicted noise (and, with a cotangent, the input gradient).
    Eps(eps::Args),
    /// Describe a model: configuration, parameter count, FLOPs.
    Info(info::Args),
    /// Time the network (forward, and forward + input gradient = one DPS step).
    Bench(bench::Args),
    /// What this build contains and what this machine offers.
    Doctor,
    /// Draw images from the model (unconditional DDPM or DDIM sampling).
    Sample(sample::Args),
    /// Deblur images with DPS or ΠGDM.
    Restore(restore::Args),
    /// Blur and add noise to a sharp image: y = k * x + n.
    Degrade(degrade::Args),
    /// Make a blur kernel (Gaussian or random camera shake).
    Kernel(kernel::Args),
    /// Check every GPU kernel and the whole network against the CPU path.
    Selftest(selftest::Args),
    /// Compare the tensors two safetensors files share (relative L2, max abs).
    Compare(compare::Args),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let ok = |r: Result<bool>| {
        r.map(|passed| {
            if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        })
    };
    match cli.command {
        Command::Selftest(a) => return ok(selftest::run(a)),
        Command::Compare(a) => return ok(compare::run(a)),
        Command::Eps(a) => eps::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Doctor => doctor::run(),
        Command::Sample(a) => sample::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Degrade(a) => degrade::run(a),
        Command::Kernel(a) => kernel::run(a),
    }
    .map(|()| ExitCode::SUCCESS)
}

/// Loads `--model DIR`, or the built-in celebahq-256 architecture with random weights.
fn load_model(dir: Option<&Path>) -> Result<Model> {
    match dir {
        Some(d) => Model::load(d),
        None => Ok(Model::builtin_celebahq(0)),
    }
}

/// Puts the model on the requested device, printing the one-line notice of an `auto` fallback.
/// The engine keeps the weights in its own layouts, so the model's host copy is freed.
/// Where a command runs the network: `--device` and `--precision`.
#[derive(clap::Args, Clone, Copy, Debug)]
struct Backend {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: DeviceChoice,
    /// Precision of the network's convolutions: fp32, or tf32, bf16, fp16 (tensor cores, GPU
    /// only; accumulation, normalisation statistics and the sampler state stay fp32).
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    precision: Precision,
    /// On a GPU, plan every launch from one image's shape, so that each image's result is bit
    /// for bit the same in any batch or shard (the CPU always is). Costs throughput at large
    /// batches, where fewer splits of the convolutions' sums, and larger tiles for the
    /// attention products, would fill the device.
    #[arg(long)]
    batch_invariant: bool,
}

impl Backend {
    /// The engine this asks for, on `model`.
    fn open(&self, model: &Model) -> Result<Engine> {
        let mut e = Engine::with_precision(model, self.device, self.precision)?;
        e.set_batch_invariant(self.batch_invariant);
        Ok(e)
    }
}

fn engine(model: &mut Model, backend: Backend) -> Result<Engine> {
    let e = backend.open(model)?;
    model.weights = Default::default();
    if let Some(n) = e.notice() {
        eprintln!("invdiff: {n}");
    }
    Ok(e)
}

/// `--precision` parser for clap.
fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse().map_err(|e: invdiff::Error| e.to_string())
}

/// `--device` parser for clap.
fn parse_device(s: &str) -> std::result::Result<DeviceChoice, String> {
    s.parse().map_err(|e: invdiff::Error| e.to_string())
}

/// A path argument's display form.
fn show(p: &Path) -> String {
    PathBuf::from(p).display().to_string()
}

/// The reverse process to run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SchedulerKind {
    Ddpm,
    Ddim,
}

/// The model's scheduler configuration (google's DDPM values when it has none), as DDPM or
/// DDIM, with `steps` timesteps set.
fn scheduler(
    model: &Model,
    kind: SchedulerKind,
    eta: f32,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let cfg = match &model.scheduler_config {
        Some(p) => SchedulerConfig::from_file(p)?,
        None => SchedulerConfig::default(),
    };
    let mut s: Box<dyn Scheduler> = match kind {
        SchedulerKind::Ddpm => Box::new(Ddpm::new(cfg)?),
        SchedulerKind::Ddim => Box::new(Ddim::new(cfg, eta)?),
    };
    s.set_timesteps(steps)?;
    // Every step's coefficients now, so that a setting no step can take (DDIM's eta > 1) fails
    // before the network is loaded onto a device.
    for &t in s.timesteps() {
        s.step_coeffs(t)?;
    }
    Ok(s)
}

/// A progress bar over sampling steps, with steps/s, which also keeps each step's time (the
/// GPU's own, on the device loop) so that a run's time can be split into its steps and the rest.
struct Progress {
    bar: ProgressBar,
    seconds: RefCell<Vec<f64>>,
}

/// The middle value of `v` (the mean of the middle two for an even count; 0 if empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// A loop's step times: their sum and median.
struct StepTimes {
    total_s: f64,
    median_ms: f64,
}

impl Progress {
    fn new(steps: usize) -> Self {
        let bar = ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template(
                "{spinner} step {pos}/{len} [{bar:30}] {per_sec} eta {eta} (t = {msg})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Progress {
            bar,
            seconds: RefCell::new(Vec::with_capacity(steps)),
        }
    }

    fn step(&self, r: &StepReport) {
        self.seconds.borrow_mut().push(r.seconds);
        self.bar.set_message(r.timestep.to_string());
        self.bar.inc(1);
    }

    fn finish(&self) -> StepTimes {
        self.bar.finish_and_clear();
        let mut s = self.seconds.take();
        StepTimes {
            total_s: s.iter().sum(),
            median_ms: 1e3 * median(&mut s),
        }
    }
}

/// The extensions (lower case) of the file formats [`save_result`] writes, and `degrade`.
const RESULT_FORMATS: &[&str] = &["png", "jpg", "jpeg", "safetensors"];

/// Whether `path` names a safetensors file (its extension in any case).
fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// The output's format: its extension, lower-cased, if it is one of `formats` (lower case).
fn output_format(path: &Path, formats: &[&str]) -> Result<String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if formats.contains(&ext.as_str()) {
        return Ok(ext);
    }
    let dotted: Vec<String> = formats.iter().map(|e| format!(".{e}")).collect();
    let hint = match dotted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(Error::input(format!(
        "{}: unknown output format (use {hint})",
        path.display()
    )))
}

/// Checks, before any work, that `path` names a file (of one of `formats`, when given) in a
/// folder that exists: a run of minutes or hours should not end on a typo in its output's
/// name. (Permissions and free space are left to the write.)
fn check_output(path: &Path, formats: Option<&[&str]>) -> Result<()> {
    if let Some(f) = formats {
        output_format(path, f)?;
    }
    if path.is_dir() {
        return Err(Error::input(format!(
            "{}: is a folder, and a file name was expected",
            path.display()
        )));
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(Error::input(format!(
            "{}: the folder {} does not exist",
            path.display(),
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Writes a final sample: `.safetensors` holds `sample` (model space) and `image` (in [0, 1]);
/// an image file shows the batch side by side.
fn save_result(path: &Path, x: &Tensor) -> Result<()> {
    let img = to_image(x);
    if output_format(path, RESULT_FORMATS)? == "safetensors" {
        return safetensors::write(path, &[("sample", x), ("image", &img)], None);
    }
    let items: Vec<Tensor> = (0..img.shape()[0]).map(|b| img.batch_item(b)).collect();
    if items.len() == 1 {
        image::save_image(path, &items[0])
    } else {
        image::save_strip(path, &items.iter().collect::<Vec<_>>(), 4)
    }
}

/// Images from a PNG/JPEG file, or a `[B,C,H,W]` / `[C,H,W]` tensor under one of `names` in a
/// safetensors file, as `[B, C, H, W]`.
fn read_images(path: &Path, names: &[&str]) -> Result<Tensor> {
    if is_safetensors(path) {
        let f = safetensors::read(path)?;
        let name = names.iter().find(|n| f.contains(n)).ok_or_else(|| {
            Error::format(path, format!("no tensor named {}", names.join(" or ")))
        })?;
        as_batch(f.get(name)?, path, name)
    } else {
        image::load_image(path)
    }
}

/// `[C,H,W]` -> `[1,C,H,W]`; `[B,C,H,W]` as is; anything else names the file and tensor.
fn as_batch(t: Tensor, path: &Path, name: &str) -> Result<Tensor> {
    match t.shape().len() {
        4 => Ok(t),
        3 => {
            let s = [1, t.shape()[0], t.shape()[1], t.shape()[2]];
            t.reshape(s.to_vec())
        }
        _ => Err(Error::format(
            path,
            format!(
                "tensor `{name}`: expected [B,C,H,W] or [C,H,W], got {:?}",
                t.shape()
            ),
        )),
    }
}

/// PNG and JPEG files in a folder, sorted by name.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The image in `dir` whose stem is `stem`.
fn find_image(dir: &Path, stem: &str) -> Result<PathBuf> {
    image_files(dir)?
        .into_iter()
        .find(|p| self::stem(p) == stem)
        .ok_or_else(|| {
            Error::input(format!(
                "{}: no image named {stem}.png or .jpg",
                dir.display()
            ))
        })
}

/// A file's name without its extension.
fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
