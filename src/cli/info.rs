//! `invdiff info`: a model in words.

use std::path::PathBuf;

use invdiff::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder; without it, the built-in google/ddpm-ema-celebahq-256 architecture.
    #[arg(long)]
    model: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let model = super::load_model(a.model.as_deref())?;
    let g = &model.graph;
    let cfg = model.config();
    let (h, w) = cfg.sample_size;
    println!("source: {}", model.source);
    println!("{}", cfg.describe());
    println!(
        "parameters: {} ({:.1} MB in fp32), {} tensors",
        g.parameter_count(),
        g.parameter_count() as f64 * 4.0 / 1e6,
        g.params.iter().map(|p| p.tensors().len()).sum::<usize>()
    );
    match cfg.check_input_size(h, w) {
        Ok(()) => println!(
            "work per image at {h}x{w}: forward {:.1} GFLOP, forward + input gradient (one DPS step) {:.1} GFLOP",
            g.forward_flops(1, h, w) / 1e9,
            g.forward_vjp_flops(1, h, w) / 1e9
        ),
        Err(e) => println!("work per image at the sample size: none ({e})"),
    }
    let m = 1usize << cfg.downsample_count();
    println!("input sizes: height and width multiples of {m}");
    if let Some(s) = &model.scheduler_config {
        println!("scheduler config: {}", s.display());
    }
    Ok(())
}
