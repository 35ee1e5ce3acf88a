//! `invdiff`: the command-line face of the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("invdiff: error: {e}");
            ExitCode::FAILURE
        }
    }
}
