//! The UNet forward pass and its input gradient against diffusers' own outputs.
//!
//! Fixtures: `tests/fixtures/models/*` (written by `scripts/make_fixtures.py`, see its README).
//! Tolerances (issues 2 and 3): relative L2 at most 1e-5, and max abs error at most
//! 1e-4 x max(1, max|ref|). diffusers' own f32 output is ~1e-6 away from its f64 output.

use invdiff::cpu::CpuUnet;
use invdiff::io::safetensors;
use invdiff::model::Model;
use invdiff::tensor::{max_abs_diff, rel_l2};

mod common;
use common::fixture;

fn assert_close(what: &str, got: &[f32], want: &[f32], rel_tol: f64) {
    let rel = rel_l2(got, want);
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let abs = max_abs_diff(got, want);
    println!("{what}: rel L2 {rel:.2e}, max abs {abs:.2e} (max |ref| {max_ref:.2})");
    assert!(
        rel <= rel_tol,
        "{what}: relative L2 error {rel:e} > {rel_tol:e}"
    );
    assert!(
        abs <= 1e-4 * max_ref.max(1.0),
        "{what}: max abs error {abs:e} > 1e-4 x max(1, {max_ref})"
    );
}

/// Checks eps and the input gradient of the model in `dir` against `io`.
fn check_model(dir: &str, io: &str) {
    let model = Model::load(&fixture(dir)).unwrap();
    let io = safetensors::read(&fixture(io)).unwrap();
    let sample = io.get("sample").unwrap();
    let t: Vec<f32> = io
        .get_i64("timestep")
        .unwrap()
        .iter()
        .map(|&v| v as f32)
        .collect();
    let unet = CpuUnet::new(&model);
    let eps = unet.forward(&sample, &t).unwrap();
    assert_close(
        &format!("{dir} eps"),
        eps.data(),
        io.get("eps").unwrap().data(),
        1e-5,
    );

    let (eps2, tape) = unet.forward_recording(&sample, &t).unwrap();
    assert_eq!(
        eps.data(),
        eps2.data(),
        "recording changes nothing in the forward pass"
    );
    let grad = unet.vjp(tape, &io.get("cotangent").unwrap()).unwrap();
    assert_close(
        &format!("{dir} grad"),
        grad.data(),
        io.get("grad").unwrap().data(),
        1e-5,
    );
}

#[test]
fn google_tiny() {
    check_model("models/google_tiny", "models/google_tiny/io.safetensors");
}

#[test]
fn google_tiny_from_legacy_bin() {
    check_model(
        "models/google_tiny_bin",
        "models/google_tiny/io.safetensors",
    );
}

#[test]
fn diffusers_tiny_pipeline_folder() {
    check_model(
        "models/diffusers_tiny",
        "models/diffusers_tiny/unet/io.safetensors",
    );
}

#[test]
fn holdout_a() {
    check_model("models/holdout_a", "models/holdout_a/io.safetensors");
}

#[test]
fn holdout_b_fp16_checkpoint() {
    check_model("models/holdout_b", "models/holdout_b/io.safetensors");
}
