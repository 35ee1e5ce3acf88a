//! The one error type of the crate.
//!
//! Every message names what was wrong (the file, the tensor, the config key) and what was
//! expected, because the people who read them are debugging someone else's checkpoint.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in invdiff, with enough context to act on. (More kinds may
/// come: match with a wildcard arm.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are malformed (truncated, bad header, wrong dtype...).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A model configuration uses a key or value this engine does not implement.
    #[error("{}: config key `{key}`: {msg}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// A checkpoint's tensors do not match the configuration (missing, extra, mis-shaped).
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    /// An argument or input tensor is unusable (shape, size, value).
    #[error("{0}")]
    Input(String),
    /// The CUDA backend is unavailable or failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// Sampling left NaN or infinite values in the state: a property of the run's numbers (a
    /// guidance scale too large, a measurement out of range), not of the machine, so a data
    /// set's other images can go on. The GPU's loop runs every step before it reports the first
    /// such one; the CPU's stops there.
    #[error(
        "sampling diverged at step {step} (t = {t}): the state holds NaN or infinite values; \
         try a smaller guidance scale"
    )]
    Diverged {
        /// The loop step (0 = the first, noisiest) whose result was not finite.
        step: usize,
        /// Its timestep.
        t: i64,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn config(path: impl AsRef<Path>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            key: key.into(),
            msg: msg.into(),
        }
    }

    pub fn weights(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Weights {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
}

/// `bail!(Input, "...")`-style early return, used where a check reads better on one line.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::Input(format!($($fmt)+)));
        }
    };
}
