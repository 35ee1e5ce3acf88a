//! Helpers shared by the integration tests (each test file that needs them says `mod common;`).

// Each test crate compiles its own copy and uses only some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `tests/fixtures/p`: the reference tensors scripts/make_fixtures.py wrote with diffusers.
pub fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// `tests/data/io/name`: files written by NumPy, PyTorch and the safetensors package.
pub fn io_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/io")
        .join(name)
}

/// Asserts that `result` failed with a message naming `path` and containing every `needles`.
pub fn assert_err<T: std::fmt::Debug>(result: invdiff::Result<T>, path: &Path, needles: &[&str]) {
    let msg = result
        .expect_err("malformed input was accepted")
        .to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "no path in: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }
}

/// A directory for one test's files, removed (with them) when the test ends. `suite` and
/// `test` name it, with the process id, so that parallel tests and runs never share one.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(suite: &str, test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("invdiff-{suite}-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

/// The directory's path, so that a `TempDir` goes where a `&Path` does.
impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tests/data/sched/file`, JSON written by scripts/sched_reference.py.
pub fn sched_reference(file: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/sched")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An f32 the reference scripts wrote as the hex string of its bits.
pub fn hex_f32(v: &serde_json::Value) -> f32 {
    f32::from_bits(u32::from_str_radix(v.as_str().unwrap(), 16).unwrap())
}

/// An array of such hex strings.
pub fn hexes(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(hex_f32).collect()
}

/// An array of non-negative integers (a shape).
pub fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}
