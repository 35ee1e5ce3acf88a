//! What the host offers a pass: the memory this process can ever hold, so that inputs and
//! passes that cannot fit are refused by name instead of aborting on an allocation.

use std::path::Path;
use std::sync::OnceLock;

use crate::{Error, Result};

/// Bytes of memory this process can ever hold: the machine's RAM (`MemTotal`; swap, which
/// would only make a pass crawl, is not counted), capped by the limit of every cgroup it is in,
/// up to the root (v2 `memory.max`, v1 `memory.limit_in_bytes`); `None` where nothing can be
/// read. Read once: the CPU checks it before every pass, a sampling loop's steps included.
pub fn memory_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(read_memory_limit)
}

fn read_memory_limit() -> Option<u64> {
    let read_u64 =
        |path: &Path| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let total = meminfo.as_deref().and_then(|m| {
        let kb = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
        kb.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?
            .checked_mul(1024)
    });
    let mut cgroups = Vec::new();
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in membership.lines() {
        // "0::/path" (v2), or "N:memory:/path" (v1); v2's "max" does not parse and v1's
        // "unlimited" (2^63 less a page) is above any machine's total: neither caps.
        let mut parts = line.splitn(3, ':').skip(1);
        let (Some(controllers), Some(path)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (root, file) = match controllers {
            "" => ("/sys/fs/cgroup", "memory.max"),
            c if c.split(',').any(|c| c == "memory") => {
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            }
            _ => continue,
        };
        let mut dir = Some(Path::new(path.trim_start_matches('/')));
        while let Some(d) = dir {
            cgroups.extend(read_u64(&Path::new(root).join(d).join(file)));
            dir = d.parent();
        }
    }
    total.into_iter().chain(cgroups).min()
}

/// Bytes of `copies` f32 arrays of `shape`, saturating at `u64::MAX` where the product would
/// not fit (a shape no memory holds).
pub fn f32_bytes(shape: &[usize], copies: u64) -> u64 {
    shape.iter().fold(4u64.saturating_mul(copies), |a, &x| {
        a.saturating_mul(x as u64)
    })
}

/// An error naming `what` when its `bytes` exceed what this machine (or the cgroup this process
/// runs in) has, or, where that is unknown, what any allocation can take (`isize::MAX`).
pub fn check_fits(bytes: u64, what: &str) -> Result<()> {
    match over_limit(bytes, memory_limit().or(Some(isize::MAX as u64))) {
        Some(why) => Err(Error::input(format!("{what} need {why}"))),
        None => Ok(()),
    }
}

/// Where `bytes` exceed `limit` (`None`: unknown, no check), the end of the error that says so
/// ("at least ... GB of memory, more than ..."), for the caller to put after what needs them.
pub fn over_limit(bytes: u64, limit: Option<u64>) -> Option<String> {
    let have = limit.filter(|&have| bytes > have)?;
    Some(format!(
        "at least {:.1} GB of memory, more than the {:.1} GB this machine (or the cgroup this \
         process runs in) has: use smaller images or batches",
        bytes as f64 / 1e9,
        have as f64 / 1e9
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn limits_and_sizes() {
        // This machine has a limit, and it is not below a gigabyte.
        assert!(memory_limit().is_some_and(|l| l > 1 << 30));
        assert_eq!(f32_bytes(&[2, 3, 4], 2), 192);
        assert_eq!(f32_bytes(&[1 << 40, 1 << 40], 1), u64::MAX);
        assert!(check_fits(1 << 20, "a megabyte").is_ok());
        let msg = check_fits(u64::MAX, "the inputs").unwrap_err().to_string();
        assert!(msg.starts_with("the inputs need at least"), "{msg}");
    }
}
