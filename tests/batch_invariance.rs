//! An image's result does not depend on the batch it is run in: the network, the guidance and
//! the seeded noise are all per image.

use std::sync::Arc;

use invdiff::engine::{DeviceChoice, Engine};
use invdiff::inverse::{CircularBlur, LinearOperator};
use invdiff::io::safetensors;
use invdiff::model::Model;
use invdiff::sampler::{self, Guidance, Measurements, Noise};
use invdiff::schedule::{Ddpm, Scheduler, SchedulerConfig};
use invdiff::Tensor;

mod common;
use common::fixture;

#[test]
fn an_image_restored_alone_or_in_a_batch_is_the_same() {
    let model = Model::load(&fixture("models/google_tiny")).unwrap();
    let mut engine = Engine::new(&model, DeviceChoice::Cpu).unwrap();
    let inputs = safetensors::read(&fixture("trajectories/inputs.safetensors")).unwrap();
    let y = inputs.get("measurement").unwrap();
    let kernel = inputs.get("kernel").unwrap();
    let op: Arc<dyn LinearOperator> = Arc::new(CircularBlur::new(&kernel, 3, 32, 32).unwrap());
    let mut sched = Ddpm::new(SchedulerConfig::default()).unwrap();
    sched.set_timesteps(6).unwrap();
    for guidance in [
        Guidance::Dps {
            scale: 1.0,
            adaptive: false,
        },
        Guidance::Pigdm {
            scale: 1.0,
            sigma: 0.05,
        },
    ] {
        // Both images together (data-set indices 0 and 1)...
        let both = Measurements {
            operators: vec![op.clone(), op.clone()],
            y: y.clone(),
        };
        let noise = Noise::seeded(7, 0, 2);
        let x2 = sampler::sample(
            &mut engine,
            &sched,
            guidance,
            Some(&both),
            &noise,
            [2, 3, 32, 32],
            |_| {},
        )
        .unwrap();
        // ...and image 1 alone, keyed by its index.
        let alone = Measurements {
            operators: vec![op.clone()],
            y: y.batch_item(1),
        };
        let noise = Noise::seeded(7, 1, 1);
        let x1 = sampler::sample(
            &mut engine,
            &sched,
            guidance,
            Some(&alone),
            &noise,
            [1, 3, 32, 32],
            |_| {},
        )
        .unwrap();
        assert_eq!(
            x2.batch_item(1).data(),
            x1.data(),
            "{guidance:?}: batch changed the result"
        );
        assert_ne!(x2.batch_item(0).data(), x1.data());
    }
}

#[test]
fn the_network_is_batch_invariant_bit_for_bit() {
    let model = Model::load(&fixture("models/google_tiny")).unwrap();
    let unet = invdiff::cpu::CpuUnet::new(&model);
    let io = safetensors::read(&fixture("models/google_tiny/io.safetensors")).unwrap();
    let x = io.get("sample").unwrap();
    let (eps, tape) = unet.forward_recording(&x, &[999.0, 10.0]).unwrap();
    let g = unet
        .vjp(tape, &Tensor::full(vec![2, 3, 32, 32], 0.1))
        .unwrap();
    let (eps1, tape) = unet.forward_recording(&x.batch_item(1), &[10.0]).unwrap();
    let g1 = unet
        .vjp(tape, &Tensor::full(vec![1, 3, 32, 32], 0.1))
        .unwrap();
    assert_eq!(eps.batch_item(1).data(), eps1.data());
    assert_eq!(g.batch_item(1).data(), g1.data());
}

/// The CPU is batch-invariant whatever is asked (`--batch-invariant` matters on a GPU only),
/// and `bench` records which way it ran.
#[test]
fn the_cpu_engine_is_always_batch_invariant() {
    let model = Model::load(&fixture("models/google_tiny")).unwrap();
    let mut engine = Engine::new(&model, DeviceChoice::Cpu).unwrap();
    assert!(engine.batch_invariant());
    engine.set_batch_invariant(false);
    assert!(engine.batch_invariant());

    let dir = common::TempDir::new("batch_invariance", "bench_flag");
    let json = dir.join("bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_invdiff"))
        .args(["bench", "--model"])
        .arg(fixture("models/google_tiny"))
        .args([
            "--device",
            "cpu",
            "--batch-invariant",
            "--steps",
            "1",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["batch_invariant"], serde_json::Value::Bool(true));
}
