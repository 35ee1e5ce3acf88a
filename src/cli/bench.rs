//! `invdiff bench`: how fast the network runs here.
//!
//! Times the forward pass and one DPS step's network work (forward + input gradient) on random
//! inputs (on the CPU the median over `--steps` calls after one warm-up call; on a GPU the mean
//! of `--steps` device-event-timed calls on device-resident data after warm-up), and reports ms per call,
//! images/s and achieved GFLOP/s (FLOPs as PyTorch counts them: matrix products only).
//! `--precision tf32|bf16|fp16` runs the convolutions on tensor cores (GPU only).

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use invdiff::cuda::Precision;
use invdiff::engine::{DeviceChoice, Engine};
use invdiff::{Error, Result, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder; without it, the built-in google/ddpm-ema-celebahq-256 architecture with
    /// deterministic random weights (same speed as the real ones, no download).
    #[arg(long)]
    model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = super::parse_device)]
    device: DeviceChoice,
    /// Images per call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed calls per measurement (after one warm-up call).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Input size HxW or S (default: the model's sample size).
    #[arg(long)]
    size: Option<String>,
    /// What to time.
    #[arg(long, value_enum, default_value_t = What::Both)]
    what: What,
    /// Precision of the convolutions: fp32, or tf32, bf16, fp16 (tensor cores, GPU only;
    /// accumulation and everything else stay fp32).
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    precision: Precision,
    /// Also write the figures as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    Forward,
    Dps,
    Both,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

/// Parses `HxW` or `S`.
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::input(format!("--size: expected HxW or S, got `{s}`"));
    match s.split_once('x') {
        Some((h, w)) => Ok((h.parse().map_err(|_| bad())?, w.parse().map_err(|_| bad())?)),
        None => {
            let v = s.parse().map_err(|_| bad())?;
            Ok((v, v))
        }
    }
}

/// Median of per-call times (ms) of `f` over `steps` calls after one warm-up call.
fn time<F: FnMut() -> Result<()>>(label: &str, steps: usize, mut f: F) -> Result<f64> {
    let bar = ProgressBar::new(steps as u64 + 1).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    f()?;
    bar.inc(1);
    let mut ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        bar.inc(1);
    }
    bar.finish_and_clear();
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Peak resident memory of this process so far, in bytes (Linux), if known.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 || a.steps == 0 {
        return Err(Error::input("--batch and --steps must be at least 1"));
    }
    let mut model = super::load_model(a.model.as_deref())?;
    let cfg = model.config().clone();
    let (h, w) = match &a.size {
        Some(s) => parse_size(s)?,
        None => cfg.sample_size,
    };
    cfg.check_input_size(h, w)?;
    let mut engine = Engine::with_precision(&model, a.device, a.precision)?;
    model.weights = Default::default();
    if let Some(n) = engine.notice() {
        eprintln!("invdiff: {n}");
    }
    let n = a.batch;
    let shape = [n, cfg.in_channels, h, w];
    let count: usize = shape.iter().product();
    // A fixed, cheap pseudo-random input: speed does not depend on the values.
    let noise: Vec<f32> = (0..count)
        .map(|i| ((i as u64).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let sample = Tensor::new(shape.to_vec(), noise)?;
    let cot = Tensor::full(vec![n, cfg.out_channels, h, w], 0.01);
    let t = vec![500.0f32; n];

    let g = &model.graph;
    println!(
        "invdiff bench: {} | {h}x{w}, batch {n}, {}, {}",
        model.source,
        engine.device_name(),
        engine.precision()
    );
    let mut json = serde_json::json!({
        "model": model.source,
        "device": engine.device_name(),
        "precision": a.precision.name(),
        "batch": n,
        "height": h,
        "width": w,
        "steps": a.steps,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let on_cpu = engine.is_cpu();
    let report = |label: &str, ms: f64, flops: f64| {
        let rate = if on_cpu {
            format!("{:>9.1} GFLOP/s", flops / ms / 1e6)
        } else {
            format!("{:>9.2} TFLOP/s", flops / ms / 1e9)
        };
        println!(
            "{label:<24} {ms:>10.2} ms/call {:>9.3} images/s {rate}",
            n as f64 * 1e3 / ms
        );
    };
    if a.what != What::Dps {
        let ms = match engine.time_on_device(n, h, w, a.steps, false) {
            Some(ms) => ms?,
            None => time("forward", a.steps, || engine.forward(&sample, &t).map(drop))?,
        };
        let flops = g.forward_flops(n, h, w);
        report("forward", ms, flops);
        json["ms_per_forward"] = ms.into();
        json["images_per_s"] = (n as f64 * 1e3 / ms).into();
        json["gflops_per_s"] = (flops / ms / 1e6).into();
        if let (true, Some(p)) = (engine.is_cpu(), peak_rss()) {
            json["peak_rss_bytes_forward"] = p.into();
        }
    }
    if a.what != What::Forward {
        let ms = match engine.time_on_device(n, h, w, a.steps, true) {
            Some(ms) => ms?,
            None => time("dps step", a.steps, || {
                engine.forward_recording(&sample, &t)?;
                engine.vjp(&cot).map(drop)
            })?,
        };
        let flops = g.forward_vjp_flops(n, h, w);
        report("dps step (fwd + vjp)", ms, flops);
        json["ms_per_dps_step"] = ms.into();
        json["dps_gflops_per_s"] = (flops / ms / 1e6).into();
    }
    if let (true, Some(p)) = (engine.is_cpu(), peak_rss()) {
        println!("peak resident memory: {:.2} GB", p as f64 / 1e9);
        json["peak_rss_bytes"] = p.into();
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&json).expect("serialisable");
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
