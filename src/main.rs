//! `invdiff`: the command-line face of the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("invdiff: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Lets `invdiff ... | head` end quietly, as Unix tools do, instead of panicking on a closed
/// pipe: Rust ignores SIGPIPE by default, which turns it into a write error in `println!`.
#[cfg(unix)]
fn restore_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: resetting a signal to its default disposition at start-up, before any thread
    // exists, has no preconditions.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}
