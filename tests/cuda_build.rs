//! The CUDA backend on any machine: kernels embedded when CI asks for them, and a clean
//! `Error::Cuda` (never a panic) where there is no GPU.

use invdiff::cuda::{compiled_targets, kernels_compiled, plan_stats, probe, CudaUnet};
use invdiff::model::{Graph, Model};
use invdiff::Error;

/// CI sets INVDIFF_REQUIRE_KERNELS=1 after installing nvcc (scripts/install_nvcc.sh).
#[test]
fn kernels_are_embedded_when_required() {
    let targets = compiled_targets();
    println!(
        "kernels compiled: {}, targets {targets:?}",
        kernels_compiled()
    );
    if std::env::var("INVDIFF_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        assert!(
            kernels_compiled(),
            "INVDIFF_REQUIRE_KERNELS=1 but the build embedded no kernels"
        );
        for t in ["sm_90", "sm_90a", "compute_90"] {
            assert!(
                targets.iter().any(|x| x == t),
                "target {t} missing from {targets:?}"
            );
        }
    }
    assert_eq!(kernels_compiled(), !targets.is_empty());
}

#[test]
fn probe_reports_a_missing_gpu_gracefully() {
    let p = probe();
    println!("{p:?}");
    if p.devices.is_empty() {
        assert!(p.error.is_some(), "no device and no reason given: {p:?}");
    }
    if !p.driver_present {
        assert!(p.devices.is_empty() && p.driver_version.is_none());
    }
}

#[test]
fn new_fails_cleanly_without_a_gpu() {
    if !probe().devices.is_empty() {
        return;
    }
    let model = Model::builtin_celebahq(0);
    match CudaUnet::new(&model, 0) {
        Err(Error::Cuda(msg)) => {
            println!("{msg}");
            assert!(msg.contains("no GPU available"), "{msg}");
        }
        Err(other) => panic!("expected Error::Cuda, got {other:?}"),
        Ok(_) => panic!("CudaUnet::new succeeded on a machine without a GPU"),
    }
}

/// The memory plan of the real network, which needs no GPU: forward and forward + VJP peaks
/// at batch 1, 256x256 (PyTorch needs ~3.6 GB for forward + input gradient).
#[test]
fn celebahq_memory_plan() {
    let g = Graph::build(&invdiff::config::UNetConfig::celebahq_256()).unwrap();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    for (n, recording) in [(1, false), (1, true), (8, false), (8, true)] {
        let s = plan_stats(&g, n, 256, 256, recording, 132).unwrap();
        println!(
            "batch {n} {}: arena {:.1} MiB (at least {:.1} MiB live at once), {} buffers, {} steps, \
             {} launches",
            if recording { "forward+vjp" } else { "forward" },
            mib(s.arena_bytes),
            mib(s.live_peak_bytes),
            s.buffers,
            s.steps,
            s.launches
        );
        assert!(s.arena_bytes >= s.live_peak_bytes);
        assert!(s.launches > s.steps, "{s:?}");
        if n == 1 {
            let limit = if recording { 1536 } else { 256 };
            assert!(mib(s.arena_bytes) < limit as f64, "{s:?}");
        }
    }
}
