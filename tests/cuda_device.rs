//! Checks that need a GPU; each returns early (passing) on a machine without one.
//!
//! - `selftest_passes`: every kernel against the CPU, and small networks end to end;
//! - `celebahq_matches_cpu`: the real architecture at 256x256 (random weights), forward and
//!   input gradient against the CPU backend, which takes every full-size kernel path;
//! - `celebahq_timings`: forward at batch 1 and 8, forward + VJP at batch 1, CUDA-event timed.
//!
//! Run them one at a time (`-- --test-threads=1`): they share the GPU. On a GPU machine without
//! a Rust toolchain, build the binary here (`cargo test --test cuda_device --no-run` with NVCC
//! set), carry it over and run `cuda_device --test-threads=1 --nocapture`; add
//! `compute-sanitizer --tool memcheck` in front for an out-of-bounds check of every kernel.

use invdiff::cpu::CpuUnet;
use invdiff::cuda::{probe, selftest, CudaUnet, TOLERANCE};
use invdiff::model::Model;
use invdiff::tensor::rel_l2;
use invdiff::Tensor;

fn gpu() -> bool {
    let p = probe();
    if p.devices.is_empty() {
        println!("no GPU ({}): skipped", p.error.unwrap_or_default());
        return false;
    }
    println!("{:?}", p.devices);
    true
}

fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn selftest_passes() {
    if !gpu() {
        return;
    }
    let rows = selftest(0).unwrap();
    println!(
        "{:<58} {:<36} {:>10} {:>9}",
        "op", "shape", "rel L2", "GPU ms"
    );
    for r in &rows {
        println!(
            "{:<58} {:<36} {:>10.2e} {:>9.3} {}",
            r.op,
            r.shape,
            r.rel_l2,
            r.gpu_ms,
            if r.passed() { "" } else { "FAIL" }
        );
    }
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| format!("{} ({})", r.op, r.shape))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} checks above {TOLERANCE:e}: {failed:?}",
        failed.len(),
        rows.len()
    );
}

#[test]
fn celebahq_matches_cpu() {
    if !gpu() {
        return;
    }
    let model = Model::builtin_celebahq(1);
    let (n, h, w) = (1, 256, 256);
    let sample = Tensor::new(vec![n, 3, h, w], noise(n * 3 * h * w, 5)).unwrap();
    let cot = Tensor::new(vec![n, 3, h, w], noise(n * 3 * h * w, 6)).unwrap();
    let t = [617.0f32];
    let cpu = CpuUnet::new(&model);
    let start = std::time::Instant::now();
    let (want, tape) = cpu.forward_recording(&sample, &t).unwrap();
    let want_grad = tape.vjp(&cot).unwrap();
    println!("CPU forward + vjp: {:.1} s", start.elapsed().as_secs_f64());
    let mut gpu = CudaUnet::new(&model, 0).unwrap();
    let got = gpu.forward(&sample, &t).unwrap();
    let eps = gpu.forward_recording(&sample, &t).unwrap();
    let grad = gpu.vjp(&cot).unwrap();
    let (e1, e2, e3) = (
        rel_l2(got.data(), want.data()),
        rel_l2(eps.data(), want.data()),
        rel_l2(grad.data(), want_grad.data()),
    );
    println!("celebahq 256x256: forward rel L2 {e1:.2e}, recording forward {e2:.2e}, input gradient {e3:.2e}");
    assert!(e1 <= TOLERANCE && e2 <= TOLERANCE && e3 <= TOLERANCE);
}

#[test]
fn celebahq_timings() {
    if !gpu() {
        return;
    }
    let model = Model::builtin_celebahq(2);
    let mut gpu = CudaUnet::new(&model, 0).unwrap();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    for (n, iters) in [(1, 20), (8, 5)] {
        let ms = gpu.time_forward(n, 256, 256, iters).unwrap();
        let s = gpu.plan_stats(n, 256, 256, false).unwrap();
        let tflops = 497.0 * n as f64 / ms;
        println!(
            "forward batch {n}: {ms:.2} ms ({tflops:.1} TFLOP/s), arena {:.0} MiB",
            mib(s.arena_bytes)
        );
    }
    gpu.release_plans();
    let ms = gpu.time_forward_vjp(1, 256, 256, 10).unwrap();
    let s = gpu.plan_stats(1, 256, 256, true).unwrap();
    println!(
        "forward + vjp batch 1: {ms:.2} ms, arena {:.0} MiB, weights {:.0} MiB",
        mib(s.arena_bytes),
        mib(gpu.weight_bytes())
    );
}
