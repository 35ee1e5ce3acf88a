//! `invdiff selftest`: every GPU kernel, and the whole network, against the CPU path.

use invdiff::engine::DeviceChoice;
use invdiff::{cuda, Error, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GPU to check (cuda or cuda:N).
    #[arg(long, default_value = "cuda", value_parser = super::parse_device)]
    device: DeviceChoice,
    /// Only the groups of checks whose name contains TEXT: convolutions, linear layers, group
    /// norms, attention, data movement, whole networks, device sampler, tensor-core networks,
    /// tensor-core convolutions, fused shortcuts, staged epilogue, concatenation gradients,
    /// residual gradients, launch options, narrow tensor cores, strided TMA, approximate SiLU
    /// (e.g. `--only networks` for the two network groups).
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
}

pub fn run(a: Args) -> Result<bool> {
    let ordinal = match a.device {
        DeviceChoice::Cuda(n) => n,
        other => {
            return Err(Error::input(format!(
                "selftest checks a GPU against the CPU: use --device cuda[:N], not {other}"
            )))
        }
    };
    let rows = cuda::selftest(ordinal, a.only.as_deref())?;
    println!(
        "{:<44} {:<40} {:>10} {:>8} {:>9}  result",
        "op", "shape", "rel L2", "limit", "ms"
    );
    let mut failed = 0;
    for r in &rows {
        let ok = r.passed();
        failed += usize::from(!ok);
        println!(
            "{:<44} {:<40} {:>10.2e} {:>8.0e} {:>9.3}  {}",
            r.op,
            r.shape,
            r.rel_l2,
            r.tolerance,
            r.gpu_ms,
            if ok { "ok" } else { "FAILED" }
        );
    }
    println!(
        "{} checks, {failed} failed (relative L2 against the CPU path, each within its row's limit)",
        rows.len()
    );
    Ok(failed == 0)
}
