//! `invdiff doctor`: what this build contains and what this machine offers.

use invdiff::Result;

pub fn run() -> Result<()> {
    println!("invdiff {}", env!("CARGO_PKG_VERSION"));
    println!("CPU threads: {}", rayon::current_num_threads());
    Ok(())
}
