//! `scripts/tune.sh`'s search, run against a stand-in for the binary whose timings and selftest
//! results are a function of the switches set: the script must keep only candidates that pass
//! the selftest and make the set faster, give a variable its last chosen value, and fall back
//! to the default when nothing wins.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A stand-in `invdiff`: `selftest` fails when `INVDIFF_WGMMA_TALL=1`; `bench` reports a DPS
/// step of `$FAKE_BASE` ms (default 10), 2 ms less with PDL, 1 ms less again with PDL and the
/// weight prefetch together, 0.5 ms less with one-pass GroupNorms, 3 ms less with tall tiles,
/// and 1 ms more with two streams.
const FAKE: &str = r#"#!/usr/bin/env bash
cmd=$1; shift
case $cmd in
selftest)
    if [ "${INVDIFF_WGMMA_TALL:-}" = 1 ]; then echo "9 checks, 1 failed"; exit 1; fi
    echo "9 checks, 0 failed" ;;
bench)
    json=""
    while [ $# -gt 0 ]; do [ "$1" = --json ] && json=$2; shift; done
    awk -v pdl="${INVDIFF_PDL:-}" -v pf="${INVDIFF_PREFETCH_WEIGHTS:-}" \
        -v gn="${INVDIFF_GN_ONE_PASS:-}" -v tall="${INVDIFF_WGMMA_TALL:-}" \
        -v st="${INVDIFF_STREAMS:-}" -v base="${FAKE_BASE:-10}" 'BEGIN {
        t = base
        if (pdl == "1") { t -= 2; if (pf == "1") t -= 1 }
        if (gn == "1") t -= 0.5
        if (tall == "1") t -= 3
        if (st == "2") t += 1
        printf "{\"ms_per_forward\": 4.0, \"ms_per_dps_step\": %.3f}\n", t
    }' > "$json" ;;
*) exit 3 ;;
esac
"#;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("invdiff-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the script with the stand-in; returns its output file and its stdout.
fn tune(dir: &Path, base_ms: &str) -> (String, String) {
    let fake = dir.join("invdiff");
    std::fs::write(&fake, FAKE).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("tuning.env");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tune.sh");
    let run = Command::new("bash")
        .arg(&script)
        .args(["--batch", "1", "--what", "dps", "--out"])
        .arg(&out)
        .env("INVDIFF_BIN", &fake)
        .env("REPEATS", "1")
        .env("FAKE_BASE", base_ms)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    (std::fs::read_to_string(out).unwrap(), stdout)
}

#[test]
fn tune_keeps_what_passes_and_helps() {
    let dir = scratch("keeps");
    let (env, log) = tune(&dir, "10");
    let exports: Vec<&str> = env.lines().filter(|l| !l.starts_with('#')).collect();
    // PDL with the prefetch wins alone (7 ms), one-pass GroupNorms add to it (6.5 ms); PDL
    // alone then brings nothing new; tall tiles are faster but fail the selftest; two streams
    // are slower.
    assert_eq!(
        exports,
        [
            "export INVDIFF_PDL=1",
            "export INVDIFF_PREFETCH_WEIGHTS=1",
            "export INVDIFF_GN_ONE_PASS=1"
        ],
        "{log}"
    );
    assert!(env.starts_with("# scripts/tune.sh"), "{env}");
    assert!(
        env.contains("default 10") && env.contains("these 6.5"),
        "{env}"
    );
    assert!(log.contains("tall: selftest failed, left out"), "{log}");
    assert!(!env.contains("STREAMS") && !env.contains("TALL"), "{env}");
}

#[test]
fn tune_sets_nothing_when_nothing_wins() {
    // At 1000 ms every gain above is under the 2% margin.
    let dir = scratch("none");
    let (env, _) = tune(&dir, "1000");
    assert_eq!(
        env.lines().filter(|l| !l.starts_with('#')).count(),
        0,
        "{env}"
    );
}

#[test]
fn tune_rejects_bad_arguments() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tune.sh");
    let run = Command::new("bash")
        .arg(&script)
        .args(["--what", "both"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("--what must be dps or forward"));
}
