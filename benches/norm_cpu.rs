//! GroupNorm (+SiLU) of google/ddpm-ema-celebahq-256 (32 groups) on the CPU: forward
//! and input gradient, fresh and accumulating, at each shape of the network (read from its
//! graph, so every one, in the order the forward pass meets them), with the rate of
//! the bytes each pass has to move and, beside it, this machine's copy rate over a tensor of the
//! same size (these passes are bound by memory, and the copy is what they could reach).
//!
//! Each line ends with a hash of the outputs' bits, so that a change meant to give the same
//! results can be checked by running this before and after it.
//!
//! `cargo bench --bench norm_cpu -- [--reps N] [--batch N] [SUBSTRING]` (batch 1 by default;
//! only the shapes whose label contains SUBSTRING).

use std::time::Instant;

use invdiff::config::UNetConfig;
use invdiff::cpu::norm::{backward, forward, Dims};
use invdiff::model::graph::{Graph, Op};

/// `(size, channels, SiLU)` of every distinct GroupNorm of the celebahq-256 network at 256x256,
/// in the order the forward pass meets them.
fn shapes() -> Vec<(usize, usize, bool)> {
    let g = Graph::build(&UNetConfig::celebahq_256()).expect("the built-in config is valid");
    let mut out = Vec::new();
    for op in &g.ops {
        if let Op::GroupNorm { x, silu, .. } = *op {
            let s = g.shape(x, 1, 256, 256);
            let shape = (s[1], s[3], silu);
            if !out.contains(&shape) {
                out.push(shape);
            }
        }
    }
    out
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    invdiff::rng::uniform_lcg(seed, n, -2.0, 2.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// FNV-1a over the bits of each value.
fn hash(values: &[&[f32]]) -> u64 {
    values
        .iter()
        .flat_map(|v| v.iter())
        .fold(0xcbf2_9ce4_8422_2325, |h, x| {
            (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
        })
}

/// Median seconds of `reps` calls of `f`, after one unmeasured call.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut t)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 9;
    let mut batch = 1;
    let mut filter = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {}
            "--reps" => reps = it.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--batch" => batch = it.next().and_then(|v| v.parse().ok()).expect("--batch N"),
            s => filter = Some(s.to_string()),
        }
    }
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9}  {:<16}",
        "shape", "fwd ms", "bwd ms", "bwd+= ms", "GB/s", "copy GB/s", "hash"
    );
    for (size, c, silu) in shapes() {
        let label = format!("{size}x{size} x {c}{}", if silu { " +SiLU" } else { "" });
        if filter.as_ref().is_some_and(|f| !label.contains(f.as_str())) {
            continue;
        }
        let d = Dims {
            n: batch,
            hw: size * size,
            c,
            groups: 32,
        };
        let len = batch * d.hw * c;
        let x = rand(len, 1);
        let dy = rand(len, 2);
        let gamma: Vec<f32> = rand(c, 3).iter().map(|v| 1.0 + 0.25 * v).collect();
        let beta = rand(c, 4);
        let mut y = vec![0.0; len];
        let mut dx = vec![0.0; len];
        let mut acc = rand(len, 5);

        let stats = forward(&x, d, &gamma, &beta, 1e-6, silu, &mut y);
        backward(&x, d, &gamma, &beta, silu, &stats, &dy, &mut dx, false);
        backward(&x, d, &gamma, &beta, silu, &stats, &dy, &mut acc, true);
        let bits = hash(&[&y, &dx, &acc]);

        let fwd = time(reps, || {
            forward(&x, d, &gamma, &beta, 1e-6, silu, &mut y);
        });
        let bwd = time(reps, || {
            backward(&x, d, &gamma, &beta, silu, &stats, &dy, &mut dx, false)
        });
        // Accumulating onto its own result each time: the values grow, the work does not.
        let bwd_acc = time(reps, || {
            backward(&x, d, &gamma, &beta, silu, &stats, &dy, &mut acc, true)
        });
        let copy = time(reps, || y.copy_from_slice(&x));

        // The least each pass moves: forward reads x twice (statistics, then the output) and
        // writes y; backward reads x and dy twice and writes dx (accumulating, reads it too).
        let bytes = (4 * len) as f64;
        let rate = (3.0 + 5.0 + 6.0) * bytes / (fwd + bwd + bwd_acc) / 1e9;
        println!(
            "{label:<22} {:>9.2} {:>9.2} {:>9.2} {rate:>9.1} {:>9.1}  {bits:016x}",
            fwd * 1e3,
            bwd * 1e3,
            bwd_acc * 1e3,
            2.0 * bytes / copy / 1e9,
        );
    }
}
