//! `invdiff bench`: how fast the network runs here.
//!
//! Times the forward pass and one DPS step's network work (forward + input gradient) on random
//! inputs (on the CPU the median over `--steps` calls after one warm-up call; on a GPU the mean
//! of `--steps` device-event-timed calls on device-resident data after warm-up), and reports ms
//! per call, images/s and achieved GFLOP/s or TFLOP/s (FLOPs as PyTorch counts them: matrix
//! products only), and on a GPU the fraction of the card's measured dense bf16 rate
//! (`--peak-tflops`, or the measured figure this build knows for the card).
//! `--precision tf32|bf16|fp16` runs the convolutions on tensor cores (GPU only).
//! `--profile` (GPU only) then times every step of the same passes
//! ([`CudaUnet::profile`](invdiff::cuda::CudaUnet::profile)) and prints them by kind and the
//! most expensive single steps. `--stalls FILE` (GPU only) samples each step's warps with
//! CUPTI ([`CudaUnet::stalls`](invdiff::cuda::CudaUnet::stalls)) and prints what they waited
//! on by kind and for the most sampled steps.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use invdiff::cuda::{
    counted_once, peak_rate, PassSummary, PeakRate, Profile, StallOptions, Stalls, Trace,
};
use invdiff::{Error, Result, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder; without it, the built-in google/ddpm-ema-celebahq-256 architecture with
    /// deterministic random weights (same speed as the real ones, no download).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    backend: super::Backend,
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
    /// Also write the figures as one JSON object to this file (with `--profile`, every step).
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the timings, time every step of the same passes on the GPU (CUDA events between
    /// directly launched steps, `--steps` iterations) and print them by kind and the 15 most
    /// expensive steps. GPU only: on the CPU, INVDIFF_PROFILE=1 prints time per op kind.
    #[arg(long)]
    profile: bool,
    /// After the timings, replay the same passes' CUDA graphs `--steps` times under CUPTI, print
    /// how long the GPU ran kernels and how long it ran none, and write the last replay of each
    /// pass, every kernel's start and end on the device named by its step, as a Chrome trace to
    /// this file (open it in ui.perfetto.dev or chrome://tracing). GPU only; needs CUPTI
    /// (libcupti.so.13) on LD_LIBRARY_PATH.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// After the timings, launch every step of the same passes on its own under CUPTI's PC
    /// sampling (`--steps` times), print what the warps waited on (long_scoreboard: a memory
    /// load; math_pipe_throttle: a busy pipe; barrier; ...) by kind and for the most sampled
    /// steps, and write every step's states and hottest instructions and every kernel's sampled
    /// SASS offsets as JSON to this file. GPU only; needs CUPTI (libcupti.so.13, and
    /// libnvperf_host.so from the same package) on LD_LIBRARY_PATH and a driver that lets this
    /// user read the GPU's performance counters.
    #[arg(long)]
    stalls: Option<PathBuf>,
    /// With --stalls: a sample every 2^N cycles of each multiprocessor (5 to 31).
    #[arg(long, default_value_t = 10, value_name = "N",
          value_parser = clap::value_parser!(u32).range(5..=31))]
    stall_period: u32,
    /// With --stalls: start no step's sampling after this many seconds of a pass's sampling
    /// (the report then covers the steps reached; default: no limit).
    #[arg(long, value_name = "S")]
    stall_seconds: Option<f64>,
    /// The card's dense bf16 rate in TFLOP/s (e.g. from `scripts/torch_baseline.py
    /// --matmul-peak`), for the fraction of peak; default: the measured figure this build knows
    /// for the card, if any.
    #[arg(long)]
    peak_tflops: Option<f64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    Forward,
    Dps,
    Both,
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
    if a.stall_seconds.is_some_and(|s| s.is_nan() || s <= 0.0) {
        return Err(Error::input("--stall-seconds must be positive"));
    }
    for path in [&a.json, &a.trace, &a.stalls].into_iter().flatten() {
        super::check_output(path, None)?;
    }
    let mut model = super::load_model(a.model.as_deref())?;
    let cfg = model.config().clone();
    let (h, w) = match &a.size {
        Some(s) => parse_size(s)?,
        None => cfg.sample_size,
    };
    cfg.check_input_size(h, w)?;
    if a.stalls.is_some() && a.backend.device != invdiff::engine::DeviceChoice::Cpu {
        // Before the engine loads its kernels, so that CUPTI sees them load.
        if let Err(e) = invdiff::cuda::attach_cupti() {
            eprintln!("invdiff: {e}; --stalls goes on without it");
        }
    }
    let mut engine = a.backend.open(&model)?;
    model.weights = Default::default();
    if let Some(n) = engine.notice() {
        eprintln!("invdiff: {n}");
    }
    if a.profile && engine.is_cpu() {
        return Err(Error::input(
            "--profile times each GPU launch and needs a CUDA device, but this bench runs on \
             the CPU; there, INVDIFF_PROFILE=1 prints time per op kind after each pass",
        ));
    }
    if a.trace.is_some() && engine.is_cpu() {
        return Err(Error::input(
            "--trace records the kernels of CUDA graph replays and needs a CUDA device, but \
             this bench runs on the CPU",
        ));
    }
    if a.stalls.is_some() && engine.is_cpu() {
        return Err(Error::input(
            "--stalls samples the warps of GPU kernels and needs a CUDA device, but this bench \
             runs on the CPU",
        ));
    }
    // The rate to report fractions of: the flag, or on a GPU a measured figure for the card.
    let (peak, no_peak): (Option<PeakRate>, Option<String>) = match (engine.is_cpu(), a.peak_tflops)
    {
        (true, None) => (None, None),
        (_, flag) => match peak_rate(flag, &engine.device_name()) {
            Ok(p) => (Some(p), None),
            Err(why) if flag.is_some() => return Err(Error::input(why)),
            Err(why) => (None, Some(why)),
        },
    };
    let n = a.batch;
    let shape = [n, cfg.in_channels, h, w];
    // The input, the cotangent and the outputs, before any of them is made.
    invdiff::host::check_fits(
        invdiff::host::f32_bytes(&shape, 4),
        &format!("bench's inputs and outputs for a batch of {n} at {h}x{w}"),
    )?;
    let count: usize = shape.iter().product();
    // A fixed, cheap pseudo-random input: speed does not depend on the values.
    let noise: Vec<f32> = (0..count)
        .map(|i| ((i as u64).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let sample = Tensor::new(shape.to_vec(), noise)?;
    let cot = Tensor::full(vec![n, cfg.out_channels, h, w], 0.01);
    let t = vec![500.0f32; n];

    let g = &model.graph;
    let choices = engine.choices();
    println!(
        "invdiff bench: {} | {h}x{w}, batch {n}, {}, {}{}",
        model.source,
        engine.device_name(),
        engine.precision(),
        if choices.is_empty() {
            String::new()
        } else {
            format!(" ({choices})")
        }
    );
    let mut json = serde_json::json!({
        "model": model.source,
        "device": engine.device_name(),
        "precision": a.backend.precision.name(),
        "choices": choices,
        "batch_invariant": engine.batch_invariant(),
        "batch": n,
        "height": h,
        "width": w,
        "steps": a.steps,
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(p) = &peak {
        println!("peak: {:.0} TFLOP/s ({})", p.tflops, p.source);
        json["peak_tflops"] = p.tflops.into();
        json["peak_source"] = p.source.clone().into();
    }
    if let Some(why) = &no_peak {
        println!("fraction of peak: not reported ({why})");
        json["peak_note"] = why.clone().into();
    }
    let on_cpu = engine.is_cpu();
    let fraction = |flops: f64, ms: f64| peak.as_ref().map(|p| flops / ms / 1e9 / p.tflops);
    let report = |label: &str, ms: f64, flops: f64| {
        let rate = if on_cpu {
            format!("{:>9.1} GFLOP/s", flops / ms / 1e6)
        } else {
            format!("{:>9.2} TFLOP/s", flops / ms / 1e9)
        };
        let of_peak =
            fraction(flops, ms).map_or(String::new(), |f| format!(" {:>6.1}% of peak", 100.0 * f));
        println!(
            "{label:<24} {ms:>10.2} ms/call {:>9.3} images/s {rate}{of_peak}",
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
        if let Some(u) = engine.cuda_mut() {
            let launches = u.plan_stats(n, h, w, false)?.launches;
            println!("{:<24} {launches:>10} kernel launches per call", "");
            json["launches_per_forward"] = launches.into();
        }
        json["images_per_s"] = (n as f64 * 1e3 / ms).into();
        json["gflops_per_s"] = (flops / ms / 1e6).into();
        json["tflops_per_s"] = (flops / ms / 1e9).into();
        json["fraction_of_peak"] = fraction(flops, ms).into();
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
        if let Some(u) = engine.cuda_mut() {
            let launches = u.plan_stats(n, h, w, true)?.launches;
            println!("{:<24} {launches:>10} kernel launches per call", "");
            json["launches_per_dps_step"] = launches.into();
        }
        json["dps_images_per_s"] = (n as f64 * 1e3 / ms).into();
        json["dps_gflops_per_s"] = (flops / ms / 1e6).into();
        json["dps_tflops_per_s"] = (flops / ms / 1e9).into();
        json["dps_fraction_of_peak"] = fraction(flops, ms).into();
    }
    if a.profile {
        for (vjp, name) in passes(a.what) {
            let p = engine
                .profile_on_device(n, h, w, a.steps, vjp)
                .expect("a GPU engine (checked above)")?;
            print_profile(&p, peak.as_ref());
            let mut v = serde_json::to_value(&p).expect("serialisable");
            v["by_kind"] = serde_json::to_value(p.by_kind()).expect("serialisable");
            json[format!("profile_{name}")] = v;
        }
    }
    if let Some(path) = &a.trace {
        let mut events: Vec<serde_json::Value> = Vec::new();
        for (vjp, name) in passes(a.what) {
            let t = engine
                .trace_on_device(n, h, w, a.steps, vjp)
                .expect("a GPU engine (checked above)")?;
            let summaries = t.summaries();
            print_trace(&t, name, &summaries);
            json[format!("trace_{name}")] = serde_json::to_value(&summaries).expect("serialisable");
            // Process ids from 1, a pass each.
            let pid = 1 + events.iter().filter(|e| e["ph"] == "M").count();
            events.extend(t.chrome_events(name, pid));
        }
        let text = serde_json::to_string(&serde_json::json!({ "traceEvents": events }))
            .expect("serialisable");
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))?;
        println!(
            "trace: wrote {} (open it in ui.perfetto.dev or chrome://tracing)",
            path.display()
        );
    }
    if let Some(path) = &a.stalls {
        let mut all = serde_json::Map::new();
        for (vjp, name) in passes(a.what) {
            let t0 = Instant::now();
            // Plain lines, a tenth of the way each, for logs that a progress bar would not reach.
            let mut tenth = 0;
            let mut progress = |done: usize, of: usize| {
                if done * 10 >= (tenth + 1) * of {
                    tenth = done * 10 / of;
                    eprintln!(
                        "stalls ({name}): {done}/{of} steps sampled, {:.1} s",
                        t0.elapsed().as_secs_f64()
                    );
                }
            };
            let options = StallOptions {
                iters: a.steps,
                period_log2: a.stall_period,
                seconds: a.stall_seconds,
            };
            let s = engine
                .stalls_on_device((n, h, w), vjp, options, &mut progress)
                .expect("a GPU engine (checked above)")?;
            print_stalls(&s, name, t0.elapsed().as_secs_f64());
            all.insert(name.into(), serde_json::to_value(&s).expect("serialisable"));
        }
        let text = serde_json::to_string(&all).expect("serialisable");
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))?;
        println!("stalls: wrote {}", path.display());
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

/// The calls `--what` asks for, as (with the VJP, name): the forward pass, a DPS step, or both.
fn passes(what: What) -> impl Iterator<Item = (bool, &'static str)> {
    [(false, "forward"), (true, "dps")]
        .into_iter()
        .filter(move |&(vjp, _)| what == What::Both || vjp == (what == What::Dps))
}

/// Kinds (or kernels) named in a trace's summary line.
const TRACE_TOP: usize = 8;

/// A trace's figures per pass: span, busy and idle time, gaps, and where kernel time went.
fn print_trace(t: &Trace, name: &str, summaries: &[PassSummary]) {
    println!(
        "trace ({name}, CUPTI): batch {}, {}x{}, {}, {} replays; {}",
        t.n,
        t.h,
        t.w,
        t.precision,
        summaries.first().map_or(0, |s| s.replays),
        match &t.unmatched {
            None => "kernels matched to their steps".to_string(),
            Some(why) => format!("kernels not matched to steps: {why}"),
        }
    );
    for s in summaries {
        let pct = |ms: f64| 100.0 * ms / s.span_ms.max(1e-12);
        println!(
            "  {}: {} kernels, {:.3} ms from the first start to the last end; kernels running \
             {:.3} ms ({:.1}%), none {:.3} ms ({:.1}%) in {:.0} gaps (median {:.2} us, {:.0} \
             over 2 us); kernel time {:.3} ms ({:.2} at a time)",
            s.pass,
            s.kernels,
            s.span_ms,
            s.busy_ms,
            pct(s.busy_ms),
            s.idle_ms,
            pct(s.idle_ms),
            s.gaps,
            s.median_gap_us,
            s.gaps_over_2us,
            s.kernel_ms,
            s.kernel_ms / s.busy_ms.max(1e-12),
        );
        let top: Vec<String> =
            s.by.iter()
                .take(TRACE_TOP)
                .map(|(k, ms)| {
                    format!(
                        "{k} {ms:.3} ms ({:.1}%)",
                        100.0 * ms / s.kernel_ms.max(1e-12)
                    )
                })
                .collect();
        println!("    in-graph kernel time: {}", top.join(", "));
        for g in &s.largest_gaps {
            println!(
                "    gap of {:.2} us after {} before {}",
                g.us, g.after, g.before
            );
        }
    }
}

/// Steps shown individually after the table by kind.
const TOP_STEPS: usize = 15;

/// States named per line of the stall summary.
const TOP_STATES: usize = 5;

/// `state pct%, ...` for the most sampled states that count every sample once.
fn state_mix(states: &[invdiff::cuda::StateCount], total: u64) -> String {
    states
        .iter()
        .filter(|c| counted_once(&c.state))
        .take(TOP_STATES)
        .map(|c| {
            format!(
                "{} {:.0}%",
                c.state,
                100.0 * c.samples as f64 / total.max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sampled states by kind, then the most sampled steps with their hottest instruction.
fn print_stalls(s: &Stalls, name: &str, secs: f64) {
    let total = s.samples();
    println!();
    let r = &s.run;
    println!(
        "stalls ({name}, CUPTI PC sampling): batch {}, {}x{}, {}, a sample every 2^{} cycles; \
         {}/{} steps sampled in {secs:.1} s; {total} samples in them",
        r.n, r.h, r.w, r.precision, r.options.period_log2, s.ranges, s.of
    );
    println!(
        "  CUPTI counted {} samples, {} dropped, {} in kernels it does not report; {} read under \
         an earlier step's range; {} ranges lost to a full buffer, {} empty; {} samples in \
         unlisted states",
        s.cupti.total,
        s.cupti.dropped,
        s.cupti.non_user,
        s.late,
        s.lost_ranges,
        s.empty_ranges,
        s.unlisted
    );
    println!(
        "  {:<26} {:>6} {:>9} {:>7}  states",
        "kind", "steps", "samples", "share"
    );
    for g in s.by_kind() {
        println!(
            "  {:<26} {:>6} {:>9} {:>6.1}%  {}",
            g.kind,
            g.steps,
            g.samples,
            100.0 * g.samples as f64 / total.max(1) as f64,
            state_mix(&g.states, g.samples)
        );
    }
    let mut top: Vec<_> = s.steps.iter().collect();
    top.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.index.cmp(&b.index)));
    for st in top.into_iter().take(TOP_STEPS) {
        println!(
            "  #{} {} {} ({} samples): {}",
            st.index,
            st.kind,
            st.label,
            st.samples,
            state_mix(&st.states, st.samples)
        );
        if let Some(pc) = st.hottest.first() {
            println!(
                "      hottest: {} +0x{:x}, {} samples: {}",
                pc.kernel,
                pc.offset,
                pc.samples,
                state_mix(&pc.states, pc.samples)
            );
        }
    }
}

/// The profile by kind (ms per network call, % of the steps' total, TFLOP/s), then the most
/// expensive single steps with their labels.
fn print_profile(p: &Profile, peak: Option<&PeakRate>) {
    let total = p.step_ms();
    let pass = if p.record { "forward + vjp" } else { "forward" };
    let replay = if p.graphs {
        "graph replay"
    } else {
        "direct launches"
    };
    println!();
    println!(
        "profile: {pass}, batch {}, {}x{}, {}, {} iterations, {} steps",
        p.n,
        p.h,
        p.w,
        p.precision,
        p.iters,
        p.steps.len()
    );
    let graph = p.graph_ms();
    let split = p.graph_backward_ms.map_or(String::new(), |b| {
        format!(" (forward {:.3} + backward {b:.3})", p.graph_forward_ms)
    });
    println!(
        "  {replay}: {graph:.3} ms/call{split}; sum of steps: {total:.3} ms ({:+.1}%: the gaps \
         between directly launched steps)",
        100.0 * (total / graph - 1.0)
    );
    println!(
        "  holds per iteration: {:.2} ms asked, {:.2} ms measured; chunks of steps the host \
         enqueued late (0 is good): {}",
        p.hold_ms, p.hold_measured_ms, p.late_chunks
    );
    let pct_peak = |t: f64| match peak {
        Some(pk) if t > 0.0 => format!("{:>7.1}%", 100.0 * t / pk.tflops),
        _ => format!("{:>8}", ""),
    };
    println!(
        "  {:<26} {:>6} {:>10} {:>8} {:>9} {:>8}",
        "kind", "steps", "ms/call", "% total", "TFLOP/s", "of peak"
    );
    for g in p.by_kind() {
        let t = g.tflops();
        println!(
            "  {:<26} {:>6} {:>10.3} {:>7.1}% {:>9} {}",
            g.kind,
            g.calls,
            g.ms,
            100.0 * g.ms / total,
            if t > 0.0 {
                format!("{t:.1}")
            } else {
                "-".into()
            },
            pct_peak(t)
        );
    }
    println!("  the {TOP_STEPS} most expensive steps:");
    println!(
        "  {:>5} {:<8} {:<24} {:>8} {:>9}  label",
        "step", "pass", "kind", "ms", "TFLOP/s"
    );
    for s in p.top_steps(TOP_STEPS) {
        let t = s.tflops();
        println!(
            "  {:>5} {:<8} {:<24} {:>8.3} {:>9}  {}",
            s.index,
            if s.pass == invdiff::cuda::Pass::Forward {
                "forward"
            } else {
                "backward"
            },
            s.kind,
            s.ms,
            if t > 0.0 {
                format!("{t:.1}")
            } else {
                "-".into()
            },
            s.label
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use invdiff::cuda::{planned_steps, Precision};
    use invdiff::model::Model;

    #[test]
    fn what_picks_the_passes() {
        let names = |w| passes(w).map(|(_, n)| n).collect::<Vec<_>>();
        assert_eq!(names(What::Forward), ["forward"]);
        assert_eq!(names(What::Dps), ["dps"]);
        assert_eq!(names(What::Both), ["forward", "dps"]);
        assert!(passes(What::Dps).all(|(vjp, _)| vjp));
    }

    /// The profile report on a planned program with made-up times: every line formats (no GPU).
    #[test]
    fn profile_report_formats() {
        let model = Model::builtin_celebahq(0);
        let mut p = planned_steps(&model.graph, 1, 64, 64, true, 132, Precision::Bf16).unwrap();
        for (i, s) in p.steps.iter_mut().enumerate() {
            s.ms = 0.001 * (1 + i % 7) as f64;
        }
        p.graph_forward_ms = 0.2;
        p.graph_backward_ms = Some(0.4);
        let peak = PeakRate {
            tflops: 790.0,
            source: "test".into(),
        };
        print_profile(&p, Some(&peak));
        print_profile(&p, None);
        assert_eq!(p.top_steps(TOP_STEPS).len(), TOP_STEPS);
    }
}
