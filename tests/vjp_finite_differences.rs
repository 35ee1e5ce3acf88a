//! The whole network's input gradient against central finite differences of its forward pass:
//! `<grad, d>` must match `(L(x + h d) - L(x - h d)) / 2h` for `L(x) = sum(eps(x) * v)`, along
//! several random directions. Everything runs in f32, so the tolerance matches f32 rounding:
//! with h = 1e-2 the truncation error is O(h²) and the rounding error ~1e-7 |L| / h.

use std::path::Path;

use invdiff::config::UNetConfig;
use invdiff::cpu::CpuUnet;
use invdiff::model::{Graph, Weights};
use invdiff::{rng, Tensor};

fn random(shape: &[usize], stream: u64) -> Tensor {
    let mut t = Tensor::zeros(shape.to_vec());
    rng::fill_normal(11, stream, t.data_mut());
    t
}

#[test]
fn input_gradient_matches_finite_differences() {
    // A tiny network with every block type: attention down and up, both kinds of resnet,
    // a stride-2 conv with google's padding, upsampling, concatenation, a mid block.
    let cfg = r#"{"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
        "norm_num_groups": 4, "attention_head_dim": 8, "downsample_padding": 0,
        "in_channels": 3, "out_channels": 3, "sample_size": 8}"#;
    let cfg = UNetConfig::from_json(cfg, Path::new("tiny")).unwrap();
    let graph = Graph::build(&cfg).unwrap();
    let weights = Weights::random(&graph, 5);
    let unet = CpuUnet::from_parts(graph, &weights);
    let x = random(&[2, 3, 8, 8], 1);
    let v = random(&[2, 3, 8, 8], 2);
    let t = [37.0, 512.0];
    let (_, tape) = unet.forward_recording(&x, &t).unwrap();
    let grad = unet.vjp(tape, &v).unwrap();
    let loss = |x: &Tensor| -> f64 {
        let eps = unet.forward(x, &t).unwrap();
        eps.data()
            .iter()
            .zip(v.data())
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let h = 1e-2f32;
    for k in 0..4 {
        let d = random(&[2, 3, 8, 8], 10 + k);
        let shifted = |s: f32| {
            let data = x
                .data()
                .iter()
                .zip(d.data())
                .map(|(a, b)| a + s * b)
                .collect();
            Tensor::new(x.shape().to_vec(), data).unwrap()
        };
        let fd = (loss(&shifted(h)) - loss(&shifted(-h))) / (2.0 * h as f64);
        let an: f64 = grad
            .data()
            .iter()
            .zip(d.data())
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let rel = (fd - an).abs() / an.abs().max(1e-3);
        println!("direction {k}: finite difference {fd:.6}, <grad, d> {an:.6}, relative {rel:.1e}");
        assert!(rel < 2e-3, "direction {k}: {fd} vs {an}");
    }
}
