//! 3x3 stride-1 convolutions of google/ddpm-ema-celebahq-256 (batch 1): direct vs Winograd,
//! forward and input gradient, timed interleaved (median of the repetitions, so that load from
//! other processes hits both alike), with their errors against an f64 reference on sampled
//! output pixels (relative L2, "d" direct and "w" Winograd), and the largest difference between
//! the two over the whole output, relative to its largest value.
//!
//! `cargo bench --bench conv_cpu -- [--reps N] [SUBSTRING]` (only the shapes whose label contains
//! SUBSTRING). GFLOP/s count the direct convolution's 2·H·W·9·cin·cout for both algorithms.

use std::time::Instant;

use invdiff::cpu::conv::{backward_input_with, forward_with, Algorithm, ConvParams, Geometry};
use invdiff::model::graph::Pad;

/// (size, cin, cout) of each 3x3 stride-1 convolution shape in the network. The 3-channel
/// passes (the first's forward, the last's backward) sum over too few channels for Winograd and
/// stay on the direct path.
const SHAPES: [(usize, usize, usize); 12] = [
    (256, 3, 128),
    (256, 128, 128),
    (256, 256, 128),
    (128, 128, 128),
    (128, 256, 128),
    (64, 256, 256),
    (64, 512, 256),
    (32, 256, 256),
    (16, 512, 512),
    (8, 512, 512),
    (8, 1024, 512),
    (256, 128, 3),
];

/// Pixels sampled for the f64 reference.
const SAMPLES: usize = 64;

fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    invdiff::rng::uniform_lcg(seed, n, -0.5 * scale, 0.5 * scale)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `conv(x)[pixel]` in f64 for a 3x3 kernel `k(tap, ci, co)`, zero padding 1.
fn reference(
    x: &[f32],
    s: usize,
    cin: usize,
    cout: usize,
    k: impl Fn(usize, usize, usize) -> f32,
    pixel: usize,
) -> Vec<f64> {
    let (oy, ox) = (pixel / s, pixel % s);
    let mut acc = vec![0.0f64; cout];
    for t in 0..9 {
        let (iy, ix) = ((oy + t / 3).wrapping_sub(1), (ox + t % 3).wrapping_sub(1));
        if iy >= s || ix >= s {
            continue;
        }
        for ci in 0..cin {
            let xv = x[(iy * s + ix) * cin + ci] as f64;
            for (co, a) in acc.iter_mut().enumerate() {
                *a += xv * k(t, ci, co) as f64;
            }
        }
    }
    acc
}

/// Relative L2 errors of `direct` and `wino` against the f64 reference on sampled pixels.
fn errors(
    direct: &[f32],
    wino: &[f32],
    c: usize,
    pixels: usize,
    reference: impl Fn(usize) -> Vec<f64>,
) -> (f64, f64) {
    let (mut ed, mut ew, mut norm) = (0.0, 0.0, 0.0);
    for i in 0..SAMPLES.min(pixels) {
        let p = i * pixels / SAMPLES.min(pixels);
        for (co, r) in reference(p).into_iter().enumerate() {
            ed += (direct[p * c + co] as f64 - r).powi(2);
            ew += (wino[p * c + co] as f64 - r).powi(2);
            norm += r * r;
        }
    }
    ((ed / norm).sqrt(), (ew / norm).sqrt())
}

/// `max |got - want| / max |want|`.
fn max_rel_diff(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (diff / scale) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 5;
    let mut filter = String::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => reps = it.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--bench" => {}
            s => filter = s.to_string(),
        }
    }
    println!(
        "conv 3x3 stride 1, batch 1, {} threads, median of {reps} interleaved runs",
        rayon::current_num_threads()
    );
    println!(
        "{:<18} | {:>21} {:>21} {:>5} | {:>21} {:>21} {:>5} | {:>17} {:>17} | {:>17}",
        "shape",
        "fwd direct",
        "fwd winograd",
        "x",
        "bwd direct",
        "bwd winograd",
        "x",
        "fwd rel L2 d / w",
        "bwd rel L2 d / w",
        "max|w-d| fwd/bwd"
    );
    for (s, cin, cout) in SHAPES {
        let label = format!("{s}x{s} {cin}->{cout}");
        if !label.contains(&filter) {
            continue;
        }
        let wt = rand(cout * cin * 9, 1, 2.0 / (9.0 * cin as f32).sqrt());
        let bias = rand(cout, 2, 0.1);
        let p = ConvParams::new(&wt, &bias, cout, cin, 3);
        let g = Geometry {
            n: 1,
            h: s,
            w: s,
            stride: 1,
            pad: Pad::Symmetric,
        };
        let x = rand(s * s * cin, 3, 2.0);
        let dy = rand(s * s * cout, 4, 2.0);
        let (mut y, mut dx) = (
            [vec![0.0; s * s * cout], vec![0.0; s * s * cout]],
            [vec![0.0; s * s * cin], vec![0.0; s * s * cin]],
        );
        let algos = [Algorithm::Direct, Algorithm::Winograd];
        let mut times = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        // One untimed round builds the lazily transformed weights.
        for rep in 0..=reps {
            for (a, &algo) in algos.iter().enumerate() {
                let t = Instant::now();
                forward_with(algo, &p, &x, g, None, None, 1.0, &mut y[a]);
                let tf = t.elapsed().as_secs_f64();
                let t = Instant::now();
                backward_input_with(algo, &p, &dy, g, &mut dx[a], false);
                let tb = t.elapsed().as_secs_f64();
                if rep > 0 {
                    times[0][a].push(tf);
                    times[1][a].push(tb);
                }
            }
        }
        let flop = 2.0 * (s * s * 9 * cin * cout) as f64;
        let mut cols = Vec::new();
        for pass in &mut times {
            let [d, w] = pass.each_mut().map(|t| median(t));
            for t in [d, w] {
                cols.push(format!("{:>8.2} ms {:>6.0} GF/s", t * 1e3, flop / t / 1e9));
            }
            cols.push(format!("{:>5.2}", d / w));
        }
        let fwd_k = |t: usize, ci: usize, co: usize| wt[(co * cin + ci) * 9 + t];
        let (fd, fw) = errors(&y[0], &y[1], cout, s * s, |px| {
            let mut r = reference(&x, s, cin, cout, fwd_k, px);
            r.iter_mut().zip(&bias).for_each(|(r, b)| *r += *b as f64);
            r
        });
        let bwd_k = |t: usize, co: usize, ci: usize| wt[(co * cin + ci) * 9 + 8 - t];
        let (bd, bw) = errors(&dx[0], &dx[1], cin, s * s, |px| {
            reference(&dy, s, cout, cin, bwd_k, px)
        });
        let (fm, bm) = (max_rel_diff(&y[1], &y[0]), max_rel_diff(&dx[1], &dx[0]));
        println!(
            "{label:<18} | {} {} {} | {} {} {} | {fd:>8.1e} {fw:>8.1e} {bd:>8.1e} {bw:>8.1e} | \
             {fm:>8.1e} {bm:>8.1e}",
            cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]
        );
    }
}
