//! Scheduler arithmetic against diffusers 0.42.1 / torch 2.15 (CPU), from the numbers
//! `scripts/sched_reference.py` stored in `tests/data/sched/schedule.json`.
//!
//! "exact" values are the script's numpy-f32 transcription of diffusers with correctly rounded
//! square roots (the transcription is asserted there to reproduce diffusers' `step` bit for bit
//! when given torch's sqrt); ours must equal them bit for bit. torch's own values are checked
//! within the per-field ulp bounds of `max_ulp` (torch's CPU sqrt is not correctly rounded).

use invdiff::schedule::{
    inference_timesteps, step_slice, BetaSchedule, Ddim, Ddpm, GuidanceCoeffs, NoiseSchedule,
    Scheduler, SchedulerConfig, StepCoeffs, TimestepSpacing, VarianceType,
};
use serde_json::Value;

mod common;
use common::{hex_f32, sched_reference};

const FNV_OFFSET: u64 = 0xcbf29ce484222325;

fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    h
}

fn hash_f32(v: &[f32]) -> String {
    format!(
        "{:016x}",
        fnv(v.iter().flat_map(|x| x.to_le_bytes()), FNV_OFFSET)
    )
}

fn hash_i64(v: &[i64]) -> String {
    format!(
        "{:016x}",
        fnv(v.iter().flat_map(|x| x.to_le_bytes()), FNV_OFFSET)
    )
}

fn reference() -> Value {
    sched_reference("schedule.json")
}

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i32).abs_diff(b.to_bits() as i32)
}

fn config(schedule: &str, spacing: &str) -> SchedulerConfig {
    let mut c = SchedulerConfig::default();
    match schedule {
        "linear" => {}
        "scaled_linear" => {
            c.beta_schedule = BetaSchedule::ScaledLinear;
            c.beta_start = 0.00085;
            c.beta_end = 0.012;
        }
        "squaredcos_cap_v2" => c.beta_schedule = BetaSchedule::SquaredcosCapV2,
        other => panic!("unknown schedule {other}"),
    }
    c.timestep_spacing = match spacing {
        "leading" => TimestepSpacing::Leading,
        "linspace" => TimestepSpacing::Linspace,
        "trailing" => TimestepSpacing::Trailing,
        other => panic!("unknown spacing {other}"),
    };
    c
}

/// The values in the order of the fixture's `fields`.
fn fields(s: &StepCoeffs, g: &GuidanceCoeffs) -> [f32; 17] {
    [
        s.alpha_prod_t,
        s.alpha_prod_t_prev,
        s.sqrt_alpha_prod,
        s.sqrt_one_minus_alpha_prod,
        s.c_x0,
        s.c_xt,
        s.c_eps,
        s.variance,
        s.noise_std,
        g.alpha_t,
        g.beta_t,
        g.dps_eta,
        g.pigdm_variance,
        g.pigdm_r,
        g.pigdm_r2,
        g.pigdm_alpha,
        g.pigdm_sqrt_alpha,
    ]
}

fn build(case: &[Value]) -> Box<dyn Scheduler> {
    let mut c = config(case[1].as_str().unwrap(), case[2].as_str().unwrap());
    c.steps_offset = case[5].as_i64().unwrap();
    c.variance_type = match case[6].as_str().unwrap() {
        "fixed_small" => VarianceType::FixedSmall,
        _ => VarianceType::FixedLarge,
    };
    c.set_alpha_to_one = case[7].as_bool().unwrap();
    let mut s: Box<dyn Scheduler> = match case[0].as_str().unwrap() {
        "ddpm" => Box::new(Ddpm::new(c).unwrap()),
        _ => Box::new(Ddim::new(c, case[4].as_f64().unwrap() as f32).unwrap()),
    };
    s.set_timesteps(case[3].as_u64().unwrap() as usize).unwrap();
    s
}

#[test]
fn tables_match_torch_bit_for_bit() {
    let r = reference();
    for name in ["linear", "scaled_linear", "squaredcos_cap_v2"] {
        let t = NoiseSchedule::new(&config(name, "leading")).unwrap();
        let want = &r["tables"][name];
        assert_eq!(hash_f32(&t.betas), want["betas"], "{name} betas");
        assert_eq!(hash_f32(&t.alphas), want["alphas"], "{name} alphas");
        assert_eq!(
            hash_f32(&t.alphas_cumprod),
            want["alphas_cumprod"],
            "{name} alphas_cumprod"
        );
        for a in want["anchors"].as_array().unwrap() {
            let i = a[0].as_u64().unwrap() as usize;
            assert_eq!(t.betas[i], hex_f32(&a[1]), "{name} beta[{i}]");
            assert_eq!(t.alphas_cumprod[i], hex_f32(&a[2]), "{name} ᾱ[{i}]");
        }
    }
    let tr = &r["tables"]["trained"];
    let mut c = SchedulerConfig::default();
    c.num_train_timesteps = 20;
    c.trained_betas = Some(
        tr["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect(),
    );
    let t = NoiseSchedule::new(&c).unwrap();
    assert_eq!(hash_f32(&t.betas), tr["betas"]);
    assert_eq!(hash_f32(&t.alphas_cumprod), tr["alphas_cumprod"]);
}

#[test]
fn reference_md_anchors() {
    // REFERENCE.md §3.1, printed as f64 of the f32 values.
    let t = NoiseSchedule::new(&SchedulerConfig::default()).unwrap();
    assert_eq!(f64::from(t.betas[0]), 9.999999747378752e-05);
    assert_eq!(f64::from(t.betas[1]), 1.1991991777904332e-04);
    assert_eq!(f64::from(t.betas[999]), 1.9999999552965164e-02);
    assert_eq!(f64::from(t.alphas_cumprod[0]), 0.9998999834060669);
    assert_eq!(f64::from(t.alphas_cumprod[99]), 0.8970179557800293);
    assert_eq!(f64::from(t.alphas_cumprod[499]), 0.07858723402023315);
    assert_eq!(f64::from(t.alphas_cumprod[990]), 4.837048618355766e-05);
    assert_eq!(f64::from(t.alphas_cumprod[999]), 4.035830352222547e-05);

    // §3.4 / §4.4, N = 100, printed to 9 significant digits: within 1 ulp of the decimal.
    let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
    s.set_timesteps(100).unwrap();
    let close = |a: f32, b: f64, what: &str| assert!(ulps(a, b as f32) <= 1, "{what}: {a} vs {b}");
    let c = s.step_coeffs(990).unwrap();
    close(c.c_x0, 0.00138835551, "c0(990)");
    close(c.c_xt, 0.905152082, "c1(990)");
    close(c.variance, 0.180680379, "var(990)");
    close(c.noise_std, 0.42506513, "std(990)");
    let g = s.guidance_coeffs(990).unwrap();
    close(g.pigdm_r, 0.391191423, "r(990)");
    close(g.pigdm_alpha, 0.846969247, "alpha(990)");
    let g = s.guidance_coeffs(500).unwrap();
    close(g.pigdm_variance, 0.0944990665, "var(500)");
    close(g.pigdm_r, 0.293836713, "r(500)");
    close(g.pigdm_alpha, 0.91365993, "alpha(500)");
    let c = s.step_coeffs(10).unwrap();
    close(c.c_x0, 0.954464316, "c0(10)");
    close(c.c_xt, 0.0455488302, "c1(10)");
    close(c.noise_std, 0.00977072399, "std(10)");
    let c = s.step_coeffs(0).unwrap();
    assert_eq!((c.prev_t, c.c_x0, c.c_xt), (-1, 1.0, 0.0));
    assert_eq!(c.variance, 1e-20);
    assert!(!c.uses_noise && c.noise_std == 0.0);
    assert_eq!(s.guidance_coeffs(0).unwrap().pigdm_r, 1e-10);
}

#[test]
fn every_n_every_spacing_timesteps() {
    let r = reference();
    for spacing in ["leading", "linspace", "trailing"] {
        let want = &r["all_n"][spacing];
        let errors: Vec<u64> = want["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let cfg = config("linear", spacing);
        let mut h = FNV_OFFSET;
        for n in 1..=1000usize {
            match inference_timesteps(&cfg, n) {
                Ok(ts) => {
                    assert!(!errors.contains(&(n as u64)), "{spacing} N={n} should fail");
                    assert_eq!(ts.len(), n, "{spacing} N={n}");
                    h = fnv((n as i64).to_le_bytes(), h);
                    h = fnv(ts.iter().flat_map(|x| x.to_le_bytes()), h);
                }
                Err(e) => assert!(errors.contains(&(n as u64)), "{spacing} N={n}: {e}"),
            }
        }
        assert_eq!(format!("{h:016x}"), want["hash"], "{spacing}");
    }
}

#[test]
fn step_and_guidance_coefficients_for_all_cases() {
    let r = reference();
    let cases = r["cases"].as_array().unwrap();
    let mut computed: Vec<Vec<(i64, StepCoeffs, GuidanceCoeffs)>> = Vec::new();
    for case in cases {
        let case = case.as_array().unwrap();
        let s = build(case);
        let ts = s.timesteps().to_vec();
        assert_eq!(hash_i64(&ts), case[8], "timesteps of {case:?}");
        let mut h = FNV_OFFSET;
        let mut steps = Vec::new();
        for &t in &ts {
            let c = s.step_coeffs(t).unwrap();
            let g = s.guidance_coeffs(t).unwrap();
            assert_eq!(c.prev_t, g.prev_t);
            assert_eq!(c.prev_t, s.previous_timestep(t).unwrap());
            assert_eq!(c.clip, Some(1.0));
            h = fnv([t, c.prev_t].iter().flat_map(|x| x.to_le_bytes()), h);
            let words = fields(&c, &g)
                .iter()
                .map(|x| x.to_bits())
                .chain([u32::from(c.uses_noise)])
                .collect::<Vec<_>>();
            h = fnv(words.iter().flat_map(|x| x.to_le_bytes()), h);
            steps.push((t, c, g));
        }
        assert_eq!(format!("{h:016x}"), case[9], "coefficients of {case:?}");
        computed.push(steps);
    }

    let names: Vec<&str> = r["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let details = r["details"].as_array().unwrap();
    assert!(details.len() >= 20);
    for d in details {
        let case = d[0].as_u64().unwrap() as usize;
        let t = d[1].as_i64().unwrap();
        let (_, c, g) = computed[case].iter().find(|(s, _, _)| *s == t).unwrap();
        assert_eq!(c.prev_t, d[2].as_i64().unwrap());
        assert_eq!(c.uses_noise, d[3].as_bool().unwrap());
        let ours = fields(c, g);
        for (i, name) in names.iter().enumerate() {
            let exact = hex_f32(&d[4][i]);
            let torch = hex_f32(&d[5][i]);
            let tol = r["max_ulp"][*name].as_u64().unwrap_or(0) as u32;
            assert_eq!(
                ours[i].to_bits(),
                exact.to_bits(),
                "{name} at t={t}, {:?}",
                cases[case]
            );
            assert!(
                ulps(ours[i], torch) <= tol,
                "{name} at t={t}: ours {} torch {torch} (> {tol} ulp)",
                ours[i]
            );
        }
    }
}

#[test]
fn elementwise_step_reproduces_diffusers_with_torch_coefficients() {
    let r = reference();
    let hexes = |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(hex_f32).collect() };
    for e in r["elementwise"].as_array().unwrap() {
        let kind = e["kind"].as_str().unwrap();
        let n = e["n"].as_u64().unwrap() as usize;
        let t = e["t"].as_i64().unwrap();
        let eta = e["eta"].as_f64().unwrap() as f32;
        let mut c = if kind == "ddpm" {
            let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
            s.set_timesteps(n).unwrap();
            s.step_coeffs(t).unwrap()
        } else {
            let mut s = Ddim::new(SchedulerConfig::default(), eta).unwrap();
            s.set_timesteps(n).unwrap();
            s.step_coeffs(t).unwrap()
        };
        // Substitute torch's coefficients: the formula itself must then be bit-exact.
        let k = &e["coeffs"];
        c.sqrt_alpha_prod = hex_f32(&k["sqrt_alpha_prod"]);
        c.sqrt_one_minus_alpha_prod = hex_f32(&k["sqrt_one_minus_alpha_prod"]);
        c.c_x0 = hex_f32(&k["c_x0"]);
        c.c_xt = hex_f32(&k["c_xt"]);
        c.c_eps = hex_f32(&k["c_eps"]);
        c.noise_std = hex_f32(&k["noise_std"]);
        let (x, eps, z) = (hexes(&e["x"]), hexes(&e["eps"]), hexes(&e["z"]));
        let mut x0 = vec![0.0; x.len()];
        let mut prev = vec![0.0; x.len()];
        step_slice(&c, &eps, &x, Some(&z), &mut x0, &mut prev).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&x0), bits(&hexes(&e["x0"])), "{kind} t={t} x0");
        assert_eq!(bits(&prev), bits(&hexes(&e["prev"])), "{kind} t={t} prev");
    }
}
