//! Per-kernel benchmark of google/ddpm-ema-celebahq-256 on a GPU: every step of one network call
//! timed with CUDA events ([`CudaUnet::profile`]), one row per distinct convolution shape and
//! direction (identical launches summed, with their count; token-wise linear layers run on the
//! same kernels and are listed with them), then the other kinds of step, each with ms, TFLOP/s
//! and the fraction of the card's dense bf16 rate.
//!
//! ```text
//! cargo bench --bench kernels_cuda -- [--batch N] [--precision fp32|tf32|bf16|fp16] [--record]
//!     [--iters N] [--save FILE.json] [--baseline FILE.json] [--peak-tflops X]
//!     [--dry-run [--sms N]] [--sweep [--norms-only]]
//! ```
//!
//! Defaults: batch 8, bf16, forward only, 20 iterations. `--record` profiles forward + the
//! input gradient (one DPS step). `--save` writes the rows as JSON; `--baseline` reads such a
//! file, or the JSON of `invdiff bench --profile --json` (scripts/device_check.sh saves those),
//! taken by another build on the same card, and prints each row's time beside the baseline's
//! with the ratio (below 1: faster now), so that every kernel change is measured. `--peak-tflops`
//! is the card's measured dense bf16 rate (`scripts/torch_baseline.py --matmul-peak`); without
//! it, the measured figure this build knows for the card, if any. `--dry-run` needs no GPU:
//! it lists the same rows with their kernel choices and FLOPs, times 0, as planned for a Hopper
//! GPU of `--sms` multiprocessors (default 132, an H100 SXM or H200) with the `INVDIFF_*`
//! switches set, beside `--baseline`'s times if given (a way to read a saved profile by shape
//! without a GPU). With a profile as the baseline it then models the stream schedule
//! ([`cuda::model_streams`]): each pass's steps at the profile's times per kind and shape, less
//! a per-step overhead fitted so that the defaults' schedule takes the profile's graph time,
//! laid out on the schedule of the program as configured: what a change to the schedule (a
//! switch, or the stream count) could gain at most.
//!
//! `--sweep` times each distinct tensor-core launch alone under every pipeline and split of K
//! it could take ([`cuda::sweep_convolutions`]) and prints, per launch, the planner's choice
//! beside the fastest variant, and what the whole call would save with the fastest everywhere
//! (`--save` then writes those rows): the data for choosing pipelines and splits per shape.
//! Under each row, where the cycles of the planned and of the fastest wgmma launch go (set-up,
//! waiting for copies, the barrier, issuing copies, the products, drain, epilogue), from the
//! kernel's own cycle counters. Then each distinct GroupNorm under each form it can take
//! ([`cuda::sweep_group_norms`]: three launches, one pass; a backward pass's three launches
//! also one at a time). `--norms-only` sweeps the GroupNorms alone (seconds, where the
//! convolutions' sweep takes minutes).
//!
//! Without a GPU, or in a build without CUDA kernels, it prints one line and exits 0 so that
//! `cargo bench` passes on machines without one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use invdiff::cuda::{self, peak_rate, CudaUnet, PeakRate, Precision, Profile, StepGroup};
use invdiff::model::Model;
use serde_json::{json, Value};

struct Args {
    batch: usize,
    precision: Precision,
    record: bool,
    iters: usize,
    save: Option<PathBuf>,
    baseline: Option<PathBuf>,
    peak_tflops: Option<f64>,
    dry_run: bool,
    sms: usize,
    sweep: bool,
    norms_only: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        batch: 8,
        precision: Precision::Bf16,
        record: false,
        iters: 20,
        save: None,
        baseline: None,
        peak_tflops: None,
        dry_run: false,
        sms: 132,
        sweep: false,
        norms_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--batch" => {
                a.batch = value("--batch")?
                    .parse()
                    .map_err(|_| "--batch: expected a positive integer".to_string())?
            }
            "--precision" => {
                a.precision = value("--precision")?
                    .parse()
                    .map_err(|e: invdiff::Error| e.to_string())?
            }
            "--record" => a.record = true,
            "--iters" => {
                a.iters = value("--iters")?
                    .parse()
                    .map_err(|_| "--iters: expected a positive integer".to_string())?
            }
            "--save" => a.save = Some(value("--save")?.into()),
            "--baseline" => a.baseline = Some(value("--baseline")?.into()),
            "--peak-tflops" => {
                a.peak_tflops = Some(
                    value("--peak-tflops")?
                        .parse()
                        .map_err(|_| "--peak-tflops: expected a number".to_string())?,
                )
            }
            "--dry-run" => a.dry_run = true,
            "--sweep" => a.sweep = true,
            "--norms-only" => a.norms_only = true,
            "--sms" => {
                a.sms = value("--sms")?
                    .parse()
                    .map_err(|_| "--sms: expected a positive integer".to_string())?
            }
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.norms_only && !a.sweep {
        return Err("--norms-only is an option of --sweep".into());
    }
    if a.batch == 0 || a.iters == 0 || a.sms == 0 {
        return Err("--batch, --iters and --sms must be at least 1".into());
    }
    if let Some(t) = a.peak_tflops.filter(|t| !(t.is_finite() && *t > 0.0)) {
        return Err(format!("--peak-tflops {t} is not a positive rate"));
    }
    Ok(a)
}

/// Matrix-product steps that run on the convolution kernels.
fn on_conv_kernels(kind: &str) -> bool {
    kind.starts_with("conv") || kind.starts_with("linear")
}

/// A saved run: its rows by (kind, shape) and its header; from a profile also, for the stream
/// model, how many steps each row adds up, the steps' time and count by (kind, label), and each
/// pass's graph time (forward, then backward).
struct Baseline {
    header: Value,
    rows: HashMap<(String, String), f64>,
    kinds: HashMap<String, f64>,
    total_ms: Option<f64>,
    counts: HashMap<(String, String), usize>,
    labels: HashMap<(String, String), (f64, usize)>,
    pass_ms: Vec<f64>,
}

/// Reads a file written by `--save`, or the JSON of `invdiff bench --profile --json` (its
/// `profile_forward` or, with `record`, `profile_dps`), or a bare [`Profile`].
fn load_baseline(path: &PathBuf, record: bool) -> Result<Baseline, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let bad = || {
        format!(
            "{}: neither a file written by --save nor a profile of `invdiff bench --profile \
             --json`",
            path.display()
        )
    };
    let mut rows = HashMap::new();
    let mut kinds = HashMap::new();
    if let Some(saved) = v["rows"].as_array() {
        for r in saved {
            let (Some(kind), Some(shape), Some(ms)) =
                (r["kind"].as_str(), r["shape"].as_str(), r["ms"].as_f64())
            else {
                return Err(bad());
            };
            rows.insert((kind.to_string(), shape.to_string()), ms);
        }
        for r in v["kinds"].as_array().ok_or_else(bad)? {
            if let (Some(kind), Some(ms)) = (r["kind"].as_str(), r["ms"].as_f64()) {
                kinds.insert(kind.to_string(), ms);
            }
        }
        return Ok(Baseline {
            total_ms: v["graph_ms"].as_f64(),
            header: v,
            rows,
            kinds,
            counts: HashMap::new(),
            labels: HashMap::new(),
            pass_ms: Vec::new(),
        });
    }
    let p = if v["steps"].is_array() {
        &v
    } else {
        &v[if record {
            "profile_dps"
        } else {
            "profile_forward"
        }]
    };
    let (mut counts, mut labels) = (HashMap::new(), HashMap::new());
    for s in p["steps"].as_array().ok_or_else(bad)? {
        let (Some(kind), Some(shape), Some(ms)) =
            (s["kind"].as_str(), s["shape"].as_str(), s["ms"].as_f64())
        else {
            return Err(bad());
        };
        let key = (kind.to_string(), shape.to_string());
        *rows.entry(key.clone()).or_insert(0.0) += ms;
        *counts.entry(key).or_insert(0) += 1;
        if let Some(label) = s["label"].as_str() {
            let e = labels
                .entry((kind.to_string(), label.to_string()))
                .or_insert((0.0, 0));
            *e = (e.0 + ms, e.1 + 1);
        }
        *kinds.entry(kind.to_string()).or_insert(0.0) += ms;
    }
    let pass_ms: Vec<f64> = ["graph_forward_ms", "graph_backward_ms"]
        .iter()
        .map_while(|k| p[*k].as_f64())
        .collect();
    let total_ms = (!pass_ms.is_empty()).then(|| pass_ms.iter().sum());
    Ok(Baseline {
        header: json!({
            "device": p["device"],
            "precision": p["precision"],
            "batch": p["n"],
            "record": p["record"],
            "h": p["h"],
            "w": p["w"],
        }),
        rows,
        kinds,
        total_ms,
        counts,
        labels,
        pass_ms,
    })
}

/// `baseline ms, ratio` columns, or blanks.
fn versus(now: f64, then: Option<f64>) -> String {
    match then {
        Some(b) if b > 0.0 && now > 0.0 => format!("{b:>10.3} {:>6.2}x", now / b),
        Some(b) => format!("{b:>10.3} {:>7}", ""),
        None => format!("{:>10} {:>7}", "-", ""),
    }
}

fn pct_peak(tflops: f64, peak: Option<&PeakRate>) -> String {
    match peak {
        Some(p) if tflops > 0.0 => format!("{:>6.1}%", 100.0 * tflops / p.tflops),
        _ => format!("{:>7}", "-"),
    }
}

fn rate(g: &StepGroup) -> String {
    let t = g.tflops();
    if t > 0.0 {
        format!("{t:>8.1}")
    } else {
        format!("{:>8}", "-")
    }
}

fn report(p: &Profile, peak: Option<&PeakRate>, base: Option<&Baseline>) {
    let total = p.step_ms();
    let graph = p.graph_ms();
    let flops = p.flops();
    println!(
        "kernels_cuda: {} | celebahq-256 {}x{}, batch {}, {}, {}, {} iterations",
        p.device,
        p.h,
        p.w,
        p.n,
        p.precision,
        if p.record { "forward + vjp" } else { "forward" },
        p.iters
    );
    if let Some(pk) = peak {
        println!("peak: {:.0} TFLOP/s ({})", pk.tflops, pk.source);
    }
    if graph > 0.0 {
        println!(
            "{}: {graph:.3} ms/call = {:.1} TFLOP/s ({} of peak), {:.2} images/s; sum of the {} \
             steps timed one by one: {total:.3} ms ({:+.1}%); late chunks: {}",
            if p.graphs {
                "graph replay"
            } else {
                "direct launches"
            },
            flops / graph / 1e9,
            pct_peak(flops / graph / 1e9, peak).trim(),
            p.n as f64 * 1e3 / graph,
            p.steps.len(),
            100.0 * (total / graph - 1.0),
            p.late_chunks
        );
    } else {
        println!(
            "not run: {} steps, {:.1} GFLOP per call",
            p.steps.len(),
            flops / 1e9
        );
    }
    if let Some(b) = base {
        let h = &b.header;
        println!(
            "baseline: {} | {}, batch {}, {}: {} ms/call{}",
            h["device"].as_str().unwrap_or("?"),
            h["precision"].as_str().unwrap_or("?"),
            h["batch"],
            if h["record"].as_bool() == Some(true) {
                "forward + vjp"
            } else {
                "forward"
            },
            b.total_ms.map_or("?".into(), |t| format!("{t:.3}")),
            match b.total_ms {
                Some(t) if t > 0.0 && graph > 0.0 => format!(" (now {:.2}x)", graph / t),
                _ => String::new(),
            }
        );
        let same = h["device"].as_str() == Some(p.device.as_str())
            && h["precision"].as_str() == Some(p.precision.as_str())
            && h["batch"].as_u64() == Some(p.n as u64)
            && h["record"].as_bool() == Some(p.record);
        if !same {
            println!(
                "  (the baseline was taken on another card, precision, batch or pass: ratios \
                 compare unlike runs)"
            );
        }
    }
    let base_cols = if base.is_some() {
        format!(" {:>10} {:>7}", "base ms", "ratio")
    } else {
        String::new()
    };
    println!();
    println!(
        "{:<24} {:<40} {:<20} {:>5} {:>8} {:>9} {:>9} {:>8} {:>7}{base_cols}",
        "kind", "shape", "kernel", "count", "GFLOP", "ms", "ms each", "TFLOP/s", "of peak"
    );
    let groups = p.by_label();
    for g in groups.iter().filter(|g| on_conv_kernels(g.kind)) {
        let then = base.map(|b| b.rows.get(&(g.kind.to_string(), g.shape.clone())).copied());
        println!(
            "{:<24} {:<40} {:<20} {:>5} {:>8.1} {:>9.3} {:>9.4} {} {}{}",
            g.kind,
            g.shape,
            g.variant,
            g.calls,
            g.flops / 1e9,
            g.ms,
            g.ms / g.calls as f64,
            rate(g),
            pct_peak(g.tflops(), peak),
            then.map_or(String::new(), |t| format!(" {}", versus(g.ms, t)))
        );
    }
    println!();
    println!(
        "{:<24} {:>5} {:>9} {:>8} {:>8} {:>7}{base_cols}",
        "kind", "steps", "ms", "% steps", "TFLOP/s", "of peak"
    );
    for g in p.by_kind() {
        let then = base.map(|b| b.kinds.get(g.kind).copied());
        println!(
            "{:<24} {:>5} {:>9.3} {:>7.1}% {} {}{}",
            g.kind,
            g.calls,
            g.ms,
            if total > 0.0 {
                100.0 * g.ms / total
            } else {
                0.0
            },
            rate(&g),
            pct_peak(g.tflops(), peak),
            then.map_or(String::new(), |t| format!(" {}", versus(g.ms, t)))
        );
    }
}

fn saved(a: &Args, p: &Profile, peak: Option<&PeakRate>) -> Value {
    json!({
        "device": p.device,
        "precision": p.precision,
        "batch": p.n,
        "height": p.h,
        "width": p.w,
        "record": p.record,
        "iters": a.iters,
        "graph_ms": p.graph_ms(),
        "step_ms": p.step_ms(),
        "flops": p.flops(),
        "tflops_per_s": p.flops() / p.graph_ms() / 1e9,
        "peak_tflops": peak.map(|x| x.tflops),
        "peak_source": peak.map(|x| x.source.clone()),
        "rows": p.by_label(),
        "kinds": p.by_kind(),
        "profile": p,
    })
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kernels_cuda: {e}");
            return ExitCode::from(2);
        }
    };
    let base = match a
        .baseline
        .as_ref()
        .map(|p| load_baseline(p, a.record))
        .transpose()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kernels_cuda: --baseline {e}");
            return ExitCode::from(2);
        }
    };
    if a.dry_run {
        let model = Model::builtin_celebahq(0);
        let (h, w) = model.config().sample_size;
        let planned =
            cuda::planned_steps(&model.graph, a.batch, h, w, a.record, a.sms, a.precision);
        return match planned {
            Ok(p) => {
                let peak = a.peak_tflops.and_then(|t| peak_rate(Some(t), "").ok());
                let done = finish(&a, &p, peak.as_ref(), base.as_ref());
                match base.as_ref().filter(|b| !b.pass_ms.is_empty()) {
                    Some(b) if !stream_model(&a, &model, b) => ExitCode::FAILURE,
                    _ => done,
                }
            }
            Err(e) => {
                eprintln!("kernels_cuda: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !cuda::kernels_compiled() {
        println!(
            "kernels_cuda: skipped: this build has no CUDA kernels (nvcc was not found at build \
             time; set NVCC, e.g. to the path scripts/install_nvcc.sh prints, and rebuild)"
        );
        return ExitCode::SUCCESS;
    }
    let probe = cuda::probe();
    if probe.devices.is_empty() {
        println!(
            "kernels_cuda: skipped: no CUDA GPU here ({})",
            probe
                .error
                .unwrap_or_else(|| "the driver reports no device".into())
        );
        return ExitCode::SUCCESS;
    }
    if a.sweep {
        return sweep(&a);
    }
    let run = || -> invdiff::Result<(Profile, Option<PeakRate>)> {
        let mut model = Model::builtin_celebahq(0);
        let mut unet = CudaUnet::with_precision(&model, 0, a.precision)?;
        model.weights = Default::default();
        let (h, w) = model.config().sample_size;
        let p = unet.profile(a.batch, h, w, a.record, a.iters)?;
        let peak = match peak_rate(a.peak_tflops, unet.device_name()) {
            Ok(pk) => Some(pk),
            Err(why) => {
                println!("fraction of peak: not reported ({why})");
                None
            }
        };
        Ok((p, peak))
    };
    let (p, peak) = match run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kernels_cuda: {e}");
            return ExitCode::FAILURE;
        }
    };
    finish(&a, &p, peak.as_ref(), base.as_ref())
}

/// `--dry-run` with a profile as `--baseline`: the stream schedule's model
/// ([`cuda::model_streams`]) of the program the `INVDIFF_*` switches configure, beside the
/// defaults' (fitted to the baseline's graph time). Whether it could.
fn stream_model(a: &Args, model: &Model, b: &Baseline) -> bool {
    let (h, w) = model.config().sample_size;
    let hd = &b.header;
    let same = hd["precision"].as_str() == Some(a.precision.name())
        && hd["batch"].as_u64() == Some(a.batch as u64)
        && hd["record"].as_bool() == Some(a.record)
        && (hd["h"].as_u64(), hd["w"].as_u64()) == (Some(h as u64), Some(w as u64));
    if !same {
        println!(
            "stream model: not run (the baseline is {} batch {} {}x{}{}, the dry run {} batch {} \
             {h}x{w}{})",
            hd["precision"].as_str().unwrap_or("?"),
            hd["batch"],
            hd["h"],
            hd["w"],
            if hd["record"].as_bool() == Some(true) {
                " + vjp"
            } else {
                ""
            },
            a.precision.name(),
            a.batch,
            if a.record { " + vjp" } else { "" },
        );
        return true;
    }
    // A step of the same kernel choices where the baseline has one, else its kind and shape.
    let step_ms = |kind: &str, label: &str, shape: &str| {
        if let Some((ms, n)) = b.labels.get(&(kind.to_string(), label.to_string())) {
            return Some(ms / *n as f64);
        }
        let key = (kind.to_string(), shape.to_string());
        Some(b.rows.get(&key)? / *b.counts.get(&key)? as f64)
    };
    let (n, rec, sms, p) = (a.batch, a.record, a.sms, a.precision);
    let modelled = cuda::model_streams(&model.graph, n, h, w, rec, sms, p, &step_ms, &b.pass_ms);
    let (passes, unmatched) = match modelled {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kernels_cuda: {e}");
            return false;
        }
    };
    println!(
        "stream model (each step the baseline's time for its kind and kernels, else its kind and \
         shape, less an overhead fitted to the baseline's graph; steps side by side not slowing \
         each other, so gains are upper bounds; {unmatched} steps not in the baseline, counted \
         as 0):"
    );
    for (name, m) in ["forward", "backward"].iter().zip(&passes) {
        println!(
            "  {name}: defaults {:.3} ms (fitted: {:.2} us a step), as configured {:.3} ms \
             ({:+.1}%), one stream {:.3} ms",
            m.defaults_ms,
            m.overhead_us,
            m.configured_ms,
            100.0 * (m.configured_ms / m.defaults_ms - 1.0),
            m.one_stream_ms
        );
    }
    true
}

/// `--sweep`: every tensor-core launch under each pipeline and split, planned against best.
fn sweep(a: &Args) -> ExitCode {
    let model = Model::builtin_celebahq(0);
    let (h, w) = model.config().sample_size;
    let fail = |e: invdiff::Error| {
        eprintln!("kernels_cuda: {e}");
        ExitCode::FAILURE
    };
    let (n, rec, p, it) = (a.batch, a.record, a.precision, a.iters);
    let rows = match a.norms_only {
        true => Vec::new(),
        false => match cuda::sweep_convolutions(0, &model.graph, n, h, w, rec, p, it) {
            Ok(r) => r,
            Err(e) => return fail(e),
        },
    };
    println!(
        "kernels_cuda --sweep: celebahq-256 {h}x{w}, batch {}, {}, {}, {} iterations per \
         variant{}",
        a.batch,
        a.precision,
        if a.record { "forward + vjp" } else { "forward" },
        a.iters,
        if a.norms_only {
            ", GroupNorms only"
        } else {
            ""
        }
    );
    let totals = (!a.norms_only).then(|| conv_table(&rows));
    // The GroupNorms: each form (three launches, one pass) per distinct shape.
    let norms = match cuda::sweep_group_norms(0, &model.graph, n, h, w, rec, p, it) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    norm_table(&norms);
    if let Some(path) = &a.save {
        let mut v = json!({
            "precision": a.precision.name(),
            "batch": a.batch,
            "record": a.record,
            "iters": a.iters,
            "norms": norms,
        });
        // (No convolution fields when only the GroupNorms were swept.)
        if let Some((planned, best)) = totals {
            v["planned_ms"] = json!(planned);
            v["best_ms"] = json!(best);
            v["sweep"] = json!(rows);
        }
        let text = serde_json::to_string_pretty(&v).expect("serialisable");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("kernels_cuda: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("saved {}", path.display());
    }
    ExitCode::SUCCESS
}

/// The convolution sweep's rows: planned against fastest, with where their cycles go. Returns
/// the call's milliseconds in those launches as planned and with the fastest of each.
fn conv_table(rows: &[cuda::SweepRow]) -> (f64, f64) {
    println!(
        "{:<24} {:<40} {:>5} {:>36} {:>36} {:>6}",
        "kind", "shape", "count", "planned (ms)", "fastest (ms)", "gain"
    );
    let (mut planned, mut best) = (0.0, 0.0);
    let variant = |v: &cuda::SweepVariant| format!("{}/{} {:.4}", v.pipeline, v.splits, v.ms);
    for r in rows {
        let b = r.best();
        planned += r.count as f64 * r.planned.ms;
        best += r.count as f64 * b.ms;
        println!(
            "{:<24} {:<40} {:>5} {:>36} {:>36} {:>5.2}x",
            r.kind,
            r.shape,
            r.count,
            variant(&r.planned),
            variant(b),
            r.planned.ms / b.ms
        );
        // Where the cycles of the planned launch, and of the fastest wgmma one, go.
        let fastest_wgmma = r
            .variants
            .iter()
            .filter(|v| v.cycles.is_some())
            .min_by(|a, b| a.ms.total_cmp(&b.ms));
        let mut shown = vec![&r.planned];
        if let Some(f) = fastest_wgmma {
            if (f.pipeline.as_str(), f.splits) != (r.planned.pipeline.as_str(), r.planned.splits) {
                shown.push(f);
            }
        }
        for v in shown {
            if let Some(c) = &v.cycles {
                println!("    cycles of {}: {}", variant(v), c.summary());
            }
        }
    }
    println!(
        "tensor-core launches per call: {planned:.3} ms as planned, {best:.3} ms with the fastest \
         variant of each"
    );
    (planned, best)
}

/// The GroupNorm sweep's rows: each form's time, a backward pass's launches alone beside it.
fn norm_table(norms: &[cuda::NormSweepRow]) {
    println!("{:<24} {:<40} {:>5}  forms (ms)", "kind", "shape", "count");
    let (mut three, mut fastest) = (0.0, 0.0);
    for r in norms {
        let forms: Vec<String> = r
            .forms
            .iter()
            .map(|f| {
                let parts: Vec<String> = f
                    .parts
                    .iter()
                    .map(|p| format!("{} {:.4}", p.launch, p.ms))
                    .collect();
                if parts.is_empty() {
                    format!("{} {:.4}", f.form, f.ms)
                } else {
                    format!("{} {:.4} ({})", f.form, f.ms, parts.join(", "))
                }
            })
            .collect();
        three += r.count as f64 * r.forms[0].ms;
        fastest += r.count as f64 * r.forms.iter().map(|f| f.ms).fold(f64::INFINITY, f64::min);
        println!(
            "{:<24} {:<40} {:>5}  {}",
            r.kind,
            r.shape,
            r.count,
            forms.join("; ")
        );
    }
    println!(
        "GroupNorms per call: {three:.3} ms in three launches, {fastest:.3} ms with the fastest \
         form of each"
    );
}

/// Prints the report and writes `--save`.
fn finish(a: &Args, p: &Profile, peak: Option<&PeakRate>, base: Option<&Baseline>) -> ExitCode {
    report(p, peak, base);
    if let Some(path) = &a.save {
        let text = serde_json::to_string_pretty(&saved(a, p, peak)).expect("serialisable");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("kernels_cuda: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("saved {}", path.display());
    }
    ExitCode::SUCCESS
}
