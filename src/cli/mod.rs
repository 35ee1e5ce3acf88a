//! Command definitions; one module per command.

mod bench;
mod doctor;
mod eps;
mod info;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use invdiff::engine::{DeviceChoice, Engine};
use invdiff::model::Model;
use invdiff::Result;

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
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Eps(a) => eps::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Doctor => doctor::run(),
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
fn engine(model: &Model, device: DeviceChoice) -> Result<Engine> {
    let e = Engine::new(model, device)?;
    if let Some(n) = e.notice() {
        eprintln!("invdiff: {n}");
    }
    Ok(e)
}

/// `--device` parser for clap.
fn parse_device(s: &str) -> std::result::Result<DeviceChoice, String> {
    s.parse().map_err(|e: invdiff::Error| e.to_string())
}

/// A path argument's display form.
fn show(p: &Path) -> String {
    PathBuf::from(p).display().to_string()
}
