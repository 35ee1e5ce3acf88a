//! `invdiff restore`'s report splits a run's time into its steps and the rest (model set-up,
//! on a GPU the loop's graph capture), so that a slow restoration says which part was slow.

use std::process::Command;

use invdiff::io::safetensors;
use invdiff::Tensor;

mod common;
use common::{fixture, TempDir};

#[test]
fn the_report_splits_steps_from_set_up() {
    let dir = TempDir::new("cli_restore", "report");
    let measurement = dir.join("y.safetensors");
    let y = Tensor::full(vec![1, 3, 32, 32], 0.25);
    let k = Tensor::full(vec![1, 1, 3, 3], 1.0 / 9.0);
    safetensors::write(&measurement, &[("measurement", &y), ("kernel", &k)], None).unwrap();
    let report = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_invdiff"))
        .args(["restore", "--model"])
        .arg(fixture("models/google_tiny"))
        .args(["--method", "dps", "--steps", "3", "--device", "cpu"])
        .arg("--measurement")
        .arg(&measurement)
        .arg("--output")
        .arg(dir.join("x.png"))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ms median step, the rest"), "{stderr}");

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let (total, steps) = (
        r["seconds"].as_f64().unwrap(),
        r["steps_seconds"].as_f64().unwrap(),
    );
    assert!(
        steps > 0.0 && steps <= total,
        "steps {steps} s of {total} s"
    );
    let image = &r["images"][0];
    let (median, setup) = (
        image["step_ms_median"].as_f64().unwrap(),
        image["setup_seconds"].as_f64().unwrap(),
    );
    // The median is one of the three steps: within their sum.
    assert!(
        median > 0.0 && median * 1e-3 <= steps,
        "median {median} ms of {steps} s"
    );
    assert!(setup >= 0.0 && setup <= image["seconds"].as_f64().unwrap());
}

/// `--skip-existing` restores only what an interrupted folder run did not write, and what it
/// writes is what the whole run wrote (each image's noise is keyed by its place in the set,
/// whatever the batch it lands in): a batch of two, cut short after its first image, is
/// finished by a batch of one.
#[test]
fn skip_existing_finishes_an_interrupted_run_as_one_run_would() {
    let dir = TempDir::new("cli_restore", "skip");
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_invdiff"))
            .args(["restore", "--model"])
            .arg(fixture("models/google_tiny"))
            .args(["--method", "dps", "--steps", "3", "--device", "cpu"])
            .args(["--batch", "2"])
            .arg("--measurement")
            .arg(fixture("trajectories/inputs.safetensors"))
            .arg("--output")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{stderr}");
        stderr
    };
    run(&[]);
    let (first, second) = (out.join("inputs_0.png"), out.join("inputs_1.png"));
    let whole_run = std::fs::read(&second).unwrap();
    // What is there counts as done, whatever it holds: a marker shows it is left alone.
    std::fs::write(&first, b"done").unwrap();
    std::fs::remove_file(&second).unwrap();

    let stderr = run(&["--skip-existing"]);
    assert!(
        stderr.contains("1 of 2 image(s) already written"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&second).unwrap(), whole_run);
    assert_eq!(std::fs::read(&first).unwrap(), b"done");

    let stderr = run(&["--skip-existing", "--strip"]);
    assert!(!stderr.contains("already written"), "{stderr}");
    assert!(out.join("inputs_0_strip.png").is_file());
    let stderr = run(&["--skip-existing", "--strip"]);
    assert!(
        stderr.contains("2 of 2 image(s) already written"),
        "{stderr}"
    );
    // Nothing is left half-written beside the outputs.
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
}
