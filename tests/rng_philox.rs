//! The counter-based normal generator: Philox known answers, determinism, statistics.

use invdiff::rng::{fill_normal, fill_normal_at, normal, normal_pair, philox4x32_10};

#[test]
fn philox_known_answers() {
    // Random123 `tests/kat_vectors`, "philox4x32 10" lines: counter, key -> output.
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0; 4],
            [0; 2],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, key, want) in kat {
        assert_eq!(
            philox4x32_10(ctr, key),
            want,
            "ctr {ctr:08x?} key {key:08x?}"
        );
    }
}

#[test]
fn counter_layout_and_box_muller() {
    let v: Vec<u32> = (0..6).map(|i| normal(42, 7, i).to_bits()).collect();
    let p = normal_pair(42, 7, 1);
    assert_eq!([p[0].to_bits(), p[1].to_bits()], [v[2], v[3]]);
    // Counter layout: pair in words 0-1, stream in 2-3; key = seed.
    let seed = 0x0123_4567_89ab_cdefu64;
    let (stream, pair) = (0x1111_2222_3333_4444u64, 0x5555_6666_7777_8888u64);
    let r = philox4x32_10(
        [0x7777_8888, 0x5555_6666, 0x3333_4444, 0x1111_2222],
        [0x89ab_cdef, 0x0123_4567],
    );
    let u1 = ((r[0] >> 9) as f32 + 0.5) / 8_388_608.0;
    let u2 = ((r[1] >> 9) as f32 + 0.5) / 8_388_608.0;
    let z = normal_pair(seed, stream, pair);
    let radius = (-2.0 * f64::from(u1).ln()).sqrt();
    let angle = 2.0 * std::f64::consts::PI * f64::from(u2);
    assert!((f64::from(z[0]) - radius * angle.cos()).abs() < 1e-5);
    assert!((f64::from(z[1]) - radius * angle.sin()).abs() < 1e-5);
}

#[test]
fn fill_matches_elementwise_and_any_offset() {
    let mut a = vec![0.0f32; 100_003];
    fill_normal(9, 3, &mut a);
    for i in [0usize, 1, 2, 16_383, 16_384, 16_385, 50_000, 100_002] {
        assert_eq!(
            a[i].to_bits(),
            normal(9, 3, i as u64).to_bits(),
            "index {i}"
        );
    }
    for first in [0u64, 1, 7, 16_385] {
        let mut b = vec![0.0f32; 40_001];
        fill_normal_at(9, 3, first, &mut b);
        let f = first as usize;
        assert_eq!(b, a[f..f + b.len()], "offset {first}");
    }
    let mut one = [0.0f32];
    fill_normal_at(9, 3, 5, &mut one);
    assert_eq!(one[0], a[5]);
    fill_normal_at(9, 3, 5, &mut []);
}

#[test]
fn independent_of_thread_count() {
    let mut a = vec![0.0f32; 3 * 256 * 256];
    fill_normal(1, 0, &mut a);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut b = vec![0.0f32; a.len()];
    pool.install(|| fill_normal(1, 0, &mut b));
    assert_eq!(a, b);
}

#[test]
fn streams_and_seeds_differ() {
    let mut a = vec![0.0f32; 64];
    let mut b = vec![0.0f32; 64];
    fill_normal(1, 0, &mut a);
    fill_normal(1, 1, &mut b);
    assert_ne!(a, b);
    fill_normal(2, 0, &mut b);
    assert_ne!(a, b);
}

#[test]
fn standard_normal_statistics() {
    let n = 2_000_000;
    let mut v = vec![0.0f32; n];
    fill_normal(12345, 0, &mut v);
    let nf = n as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / nf;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / nf;
    let skew = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(3))
        .sum::<f64>()
        / nf;
    let kurt = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(4))
        .sum::<f64>()
        / nf;
    let within1 = v.iter().filter(|x| x.abs() < 1.0).count() as f64 / nf;
    let within2 = v.iter().filter(|x| x.abs() < 2.0).count() as f64 / nf;
    // Standard errors at n = 2e6: mean 7e-4, var 1e-3, skew 1.7e-3, kurtosis 5.5e-3.
    assert!(mean.abs() < 4e-3, "mean {mean}");
    assert!((var - 1.0).abs() < 5e-3, "variance {var}");
    assert!(skew.abs() < 1e-2, "skewness {skew}");
    assert!((kurt - 3.0).abs() < 3e-2, "kurtosis {kurt}");
    assert!((within1 - 0.682_689).abs() < 2e-3, "P(|z|<1) {within1}");
    assert!((within2 - 0.954_500).abs() < 1e-3, "P(|z|<2) {within2}");
    // Even and odd elements (cos / sin branches) are each standard normal and uncorrelated.
    let corr = v
        .chunks(2)
        .map(|p| f64::from(p[0]) * f64::from(p[1]))
        .sum::<f64>()
        / (nf / 2.0);
    assert!(corr.abs() < 5e-3, "pair correlation {corr}");
    assert!(v.iter().all(|x| x.is_finite() && x.abs() < 5.8));
}

#[test]
fn independent_transcription_of_the_recipe() {
    // scripts/sched_reference.py implements the module doc's recipe in numpy f32 from scratch.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/sched/rng.json"
    ))
    .unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let num = |v: &serde_json::Value| v.as_str().unwrap().parse::<u64>().unwrap();
    for case in r["values"].as_array().unwrap() {
        let (seed, stream, first) = (num(&case[0]), num(&case[1]), num(&case[2]));
        for (i, want) in case[3].as_array().unwrap().iter().enumerate() {
            let want = u32::from_str_radix(want.as_str().unwrap(), 16).unwrap();
            let got = normal(seed, stream, first + i as u64);
            assert_eq!(
                got.to_bits(),
                want,
                "seed {seed} stream {stream} index {}",
                first + i as u64
            );
        }
    }
    let mut v = vec![0.0f32; 20_000];
    fill_normal(
        r["sweep_seed"].as_u64().unwrap(),
        r["sweep_stream"].as_u64().unwrap(),
        &mut v,
    );
    let mut h: u64 = 0xcbf29ce484222325;
    for b in v.iter().flat_map(|x| x.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    assert_eq!(format!("{h:016x}"), r["sweep"].as_str().unwrap());
}

#[test]
fn indices_near_the_end_of_the_stream() {
    let mut v = [0.0f32; 5];
    fill_normal_at(3, 4, u64::MAX - 2, &mut v);
    assert_eq!(v[0], normal(3, 4, u64::MAX - 2));
    assert_eq!(v[2], normal(3, 4, u64::MAX));
    assert_eq!(v[3], normal(3, 4, 0));
}
