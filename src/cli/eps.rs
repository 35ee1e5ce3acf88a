//! `invdiff eps`: one network evaluation from a safetensors file to another.

use std::path::PathBuf;

use invdiff::io::safetensors;
use invdiff::{Error, Result, Tensor};

/// What `eps` writes.
const TENSOR_FORMATS: &[&str] = &["safetensors"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder (diffusers pipeline, UNet folder, or google's hub layout).
    #[arg(long)]
    model: PathBuf,
    /// Input: `sample` f32 [N,C,H,W], `timestep` [N] (int64, int32 or f32), and optionally
    /// `cotangent` f32 shaped like the output.
    #[arg(long)]
    input: PathBuf,
    /// Output: `eps` f32 [N,C,H,W]; with a cotangent also `grad` = d/d sample of sum(eps * cotangent).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    backend: super::Backend,
}

pub fn run(a: Args) -> Result<()> {
    super::check_output(&a.output, Some(TENSOR_FORMATS))?;
    let mut model = super::load_model(Some(&a.model))?;
    let file = safetensors::read(&a.input)?;
    let sample = file.get("sample")?;
    let timesteps = file.get("timestep")?;
    let ctx = |e: Error| match e {
        Error::Input(m) => Error::format(&a.input, m),
        other => other,
    };
    let n = sample.shape().first().copied().unwrap_or(0);
    if timesteps.numel() != n && timesteps.numel() != 1 {
        return Err(Error::format(
            &a.input,
            format!(
                "tensor `timestep`: expected {n} values (one per image) or 1, got shape {:?}",
                timesteps.shape()
            ),
        ));
    }
    let cotangent = file
        .contains("cotangent")
        .then(|| file.get("cotangent"))
        .transpose()?;
    let mut engine = super::engine(&mut model, a.backend)?;
    let mut out: Vec<(&str, Tensor)> = Vec::new();
    match cotangent {
        None => out.push((
            "eps",
            engine.forward(&sample, timesteps.data()).map_err(ctx)?,
        )),
        Some(v) => {
            let eps = engine
                .forward_recording(&sample, timesteps.data())
                .map_err(ctx)?;
            let grad = engine.vjp(&v).map_err(ctx)?;
            out.push(("eps", eps));
            out.push(("grad", grad));
        }
    }
    let refs: Vec<(&str, &Tensor)> = out.iter().map(|(k, t)| (*k, t)).collect();
    safetensors::write(&a.output, &refs, None)?;
    eprintln!(
        "invdiff eps: wrote {} ({}) on {}",
        super::show(&a.output),
        out.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
        engine.device_name()
    );
    Ok(())
}
