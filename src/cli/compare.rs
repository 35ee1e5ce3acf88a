//! `invdiff compare`: how far two tensor files are apart, tensor by tensor.

use std::path::PathBuf;

use invdiff::io::safetensors;
use invdiff::tensor::{max_abs_diff, rel_l2};
use invdiff::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The file to check.
    got: PathBuf,
    /// The reference.
    want: PathBuf,
    /// Fail when a tensor's relative L2 error exceeds this.
    #[arg(long)]
    tolerance: Option<f64>,
}

pub fn run(a: Args) -> Result<bool> {
    let (got, want) = (safetensors::read(&a.got)?, safetensors::read(&a.want)?);
    let mut ok = true;
    let mut any = false;
    for name in want.names() {
        if !got.contains(name) {
            continue;
        }
        any = true;
        let (g, w) = (got.get(name)?, want.get(name)?);
        if g.shape() != w.shape() {
            return Err(Error::input(format!(
                "tensor `{name}`: shape {:?} in {} but {:?} in {}",
                g.shape(),
                a.got.display(),
                w.shape(),
                a.want.display()
            )));
        }
        let rel = rel_l2(g.data(), w.data());
        let pass = a.tolerance.is_none_or(|t| rel <= t);
        ok &= pass;
        println!(
            "{name:<16} rel L2 {rel:.3e}  max abs {:.3e}{}",
            max_abs_diff(g.data(), w.data()),
            if pass { "" } else { "  FAILED" }
        );
    }
    if !any {
        return Err(Error::input("the two files have no tensor name in common"));
    }
    Ok(ok)
}
