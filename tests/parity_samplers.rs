//! Sampling loops against the notebook's own code run with diffusers (fixtures written by
//! `scripts/make_fixtures.py`: 10 steps on `google_tiny`, batch 2, injected noise).
//!
//! Two checks per trajectory:
//! - step by step: each step is started from the reference's own state and must land on the
//!   reference's next state within `max(5 x f64 gap of that step, 2e-5)` relative L2 (the gap
//!   is how far PyTorch's own f32 and f64 runs of that step are apart);
//! - end to end from x_T, where the trajectory is smooth (its f32/f64 gap is under 1e-5):
//!   relative L2 at most 1e-4 on the final sample. The guided loops with large weights
//!   (adaptive DPS, ΠGDM) amplify rounding chaotically with random weights: PyTorch's own f32
//!   and f64 runs end 1e-2 and 1e-1 apart, so for them only the step-by-step check is meaningful.

use std::path::Path;
use std::sync::Arc;

use invdiff::engine::{DeviceChoice, Engine};
use invdiff::inverse::{CircularBlur, LinearOperator};
use invdiff::io::safetensors::{self, TensorFile};
use invdiff::model::Model;
use invdiff::sampler::{self, Guidance, Measurements, Noise};
use invdiff::schedule::{Ddim, Ddpm, Scheduler, SchedulerConfig};
use invdiff::tensor::rel_l2;
use invdiff::Tensor;

mod common;
use common::fixture;

fn meta<'a>(f: &'a TensorFile, key: &str) -> &'a str {
    f.metadata()
        .and_then(|m| m.get(key))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("metadata {key}"))
}

fn floats(s: &str) -> Vec<f64> {
    s.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|v| v.trim().parse().unwrap())
        .collect()
}

fn slice(t: &Tensor, i: usize) -> Tensor {
    let per: usize = t.shape()[1..].iter().product();
    Tensor::new(
        t.shape()[1..].to_vec(),
        t.data()[i * per..(i + 1) * per].to_vec(),
    )
    .unwrap()
}

fn check(name: &str) {
    let traj = safetensors::read(&fixture(&format!("trajectories/{name}.safetensors"))).unwrap();
    let inputs = safetensors::read(&fixture("trajectories/inputs.safetensors")).unwrap();
    let model = Model::load(&fixture("models/google_tiny")).unwrap();
    let mut engine = Engine::new(&model, DeviceChoice::Cpu).unwrap();

    let cfg =
        SchedulerConfig::from_json(meta(&traj, "scheduler_config"), Path::new("fixture")).unwrap();
    let steps: usize = meta(&traj, "steps").parse().unwrap();
    let mut sched: Box<dyn Scheduler> = match meta(&traj, "scheduler") {
        "DDIMScheduler" => Box::new(Ddim::new(cfg, meta(&traj, "eta").parse().unwrap()).unwrap()),
        _ => Box::new(Ddpm::new(cfg).unwrap()),
    };
    sched.set_timesteps(steps).unwrap();
    let scale: f32 = traj
        .metadata()
        .unwrap()
        .get("scale")
        .map_or(1.0, |s| s.parse().unwrap());
    let guidance = match meta(&traj, "method") {
        "dps" => Guidance::Dps {
            scale,
            adaptive: meta(&traj, "eta_schedule") != "1",
        },
        "pigdm" => Guidance::Pigdm {
            scale,
            sigma: inputs.get("sigma").unwrap().data()[0],
        },
        _ => Guidance::None,
    };
    let x_t = inputs.get("x_T").unwrap();
    let shape: [usize; 4] = x_t.shape().try_into().unwrap();
    let kernel = inputs.get("kernel").unwrap();
    let op: Arc<dyn LinearOperator> =
        Arc::new(CircularBlur::new(&kernel, shape[1], shape[2], shape[3]).unwrap());
    let m = Measurements {
        operators: vec![op.clone(), op],
        y: inputs.get("measurement").unwrap(),
    };
    let noise = Noise::Injected {
        x_t: x_t.clone(),
        z: Some(inputs.get("z").unwrap()),
    };

    let states = traj.get("states").unwrap();
    let gaps = floats(meta(&traj, "f64_gap_onestep"));
    for (i, gap) in gaps.iter().enumerate().take(steps) {
        let x = slice(&states, i);
        let got = sampler::sample_steps(
            &mut engine,
            sched.as_ref(),
            guidance,
            Some(&m),
            &noise,
            x,
            i..i + 1,
            |_| {},
        )
        .unwrap();
        let want = slice(&states, i + 1);
        let rel = rel_l2(got.data(), want.data());
        let tol = (5.0 * gap).max(2e-5);
        println!(
            "{name} step {i}: rel L2 {rel:.2e} (tolerance {tol:.1e}, torch f32/f64 gap {:.1e})",
            gaps[i]
        );
        assert!(rel <= tol, "{name} step {i}: {rel:e} > {tol:e}");
    }

    let gap: f64 = meta(&traj, "f64_gap").parse().unwrap();
    if gap < 1e-5 {
        let got = sampler::sample(
            &mut engine,
            sched.as_ref(),
            guidance,
            Some(&m),
            &noise,
            shape,
            |_| {},
        )
        .unwrap();
        let rel = rel_l2(got.data(), traj.get("sample").unwrap().data());
        println!("{name} end to end: rel L2 {rel:.2e} (torch f32/f64 gap {gap:.1e})");
        assert!(rel <= 1e-4, "{name}: final sample {rel:e} > 1e-4");
    }
}

#[test]
fn ddpm() {
    check("ddpm");
}

#[test]
fn ddim_eta_half() {
    check("ddim_eta05");
}

#[test]
fn dps_fixed_weight() {
    check("dps_fixed");
}

#[test]
fn dps_adaptive_weight() {
    check("dps_adaptive");
}

#[test]
fn pigdm() {
    check("pigdm");
}
