//! Scheduler configuration parsing, errors and the step helpers.

use invdiff::schedule::{
    step_slice, BetaSchedule, Ddim, Ddpm, Scheduler, SchedulerConfig, TimestepSpacing, VarianceType,
};
use invdiff::Error;

/// google/ddpm-ema-celebahq-256's `scheduler_config.json` (REFERENCE.md §1.2).
const GOOGLE: &str = r#"{
  "_class_name": "DDPMScheduler",
  "_diffusers_version": "0.1.1",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "clip_sample": true,
  "num_train_timesteps": 1000,
  "trained_betas": null,
  "variance_type": "fixed_small"
}"#;

fn parse(text: &str) -> invdiff::Result<SchedulerConfig> {
    SchedulerConfig::from_json(text, "scheduler_config.json")
}

fn config_error_key(text: &str) -> String {
    match parse(text) {
        Err(Error::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn google_config_equals_default() {
    let c = parse(GOOGLE).unwrap();
    let d = SchedulerConfig::default();
    assert_eq!(c.num_train_timesteps, d.num_train_timesteps);
    assert_eq!((c.beta_start, c.beta_end), (d.beta_start, d.beta_end));
    assert_eq!(c.beta_schedule, BetaSchedule::Linear);
    assert_eq!(c.variance_type, VarianceType::FixedSmall);
    assert_eq!(c.timestep_spacing, TimestepSpacing::Leading);
    assert_eq!((c.clip_sample, c.steps_offset), (true, 0));
    assert_eq!(c.clip(), Some(1.0));
    assert!(c.path().ends_with("scheduler_config.json"));
}

#[test]
fn from_file_names_the_file() {
    let dir = std::env::temp_dir().join(format!("invdiff-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("scheduler_config.json");
    std::fs::write(&p, GOOGLE).unwrap();
    assert_eq!(
        SchedulerConfig::from_file(&p).unwrap().num_train_timesteps,
        1000
    );
    let missing = dir.join("nope.json");
    let e = SchedulerConfig::from_file(&missing)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
    std::fs::write(&p, "{ not json").unwrap();
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("scheduler_config.json") && e.contains("JSON"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_diffusers_ddim_config_parses() {
    let c = parse(
        r#"{"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": false, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
            "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "rescale_betas_zero_snr": false, "sample_max_value": 1.0, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "thresholding": false,
            "timestep_spacing": "trailing", "trained_betas": null}"#,
    )
    .unwrap();
    assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!(c.timestep_spacing, TimestepSpacing::Trailing);
    assert_eq!((c.steps_offset, c.set_alpha_to_one), (1, false));
    assert_eq!(c.clip(), None);
}

#[test]
fn use_default_values_drops_listed_keys() {
    // diffusers drops keys listed in `_use_default_values` even when a value is present.
    let c = parse(r#"{"steps_offset": 5, "_use_default_values": ["steps_offset"]}"#).unwrap();
    assert_eq!(c.steps_offset, 0);
}

#[test]
fn unsupported_values_are_errors_naming_the_key() {
    assert_eq!(
        config_error_key(r#"{"prediction_type": "v_prediction"}"#),
        "prediction_type"
    );
    assert_eq!(
        config_error_key(r#"{"thresholding": true}"#),
        "thresholding"
    );
    assert_eq!(
        config_error_key(r#"{"rescale_betas_zero_snr": true}"#),
        "rescale_betas_zero_snr"
    );
    assert_eq!(
        config_error_key(r#"{"beta_schedule": "sigmoid"}"#),
        "beta_schedule"
    );
    assert_eq!(
        config_error_key(r#"{"timestep_spacing": "karras"}"#),
        "timestep_spacing"
    );
    assert_eq!(
        config_error_key(r#"{"clip_samples": true}"#),
        "clip_samples"
    );
    assert_eq!(
        config_error_key(r#"{"num_train_timesteps": 0}"#),
        "num_train_timesteps"
    );
    assert_eq!(
        config_error_key(r#"{"num_train_timesteps": "1000"}"#),
        "num_train_timesteps"
    );
    assert_eq!(
        config_error_key(r#"{"trained_betas": [0.1, 0.2]}"#),
        "trained_betas"
    );
    let e = parse(r#"{"prediction_type": "sample"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scheduler_config.json") && e.contains("`sample`"),
        "{e}"
    );
    assert!(parse("[1, 2]").is_err());
}

#[test]
fn variance_type_is_checked_by_ddpm_only() {
    let c = parse(r#"{"variance_type": "learned_range"}"#).unwrap();
    match Ddpm::new(c.clone()) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "variance_type"),
        other => panic!("{other:?}"),
    }
    assert!(Ddim::new(c, 0.0).is_ok());
}

#[test]
fn betas_outside_unit_interval_are_rejected() {
    let mut c = SchedulerConfig::default();
    c.beta_end = 1.5;
    assert!(Ddpm::new(c).is_err());
}

#[test]
fn set_timesteps_errors() {
    let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    assert_eq!(s.set_timesteps(1000).unwrap()[0], 999);
    let mut c = SchedulerConfig::default();
    c.steps_offset = 1;
    let mut s = Ddpm::new(c).unwrap();
    // leading + offset 1 with N = T would reach timestep T, outside the tables.
    assert!(s.set_timesteps(1000).is_err());
    assert_eq!(s.set_timesteps(100).unwrap()[0], 991);
}

#[test]
fn timesteps_examples_from_reference_md() {
    let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
    let ts = s.set_timesteps(100).unwrap();
    assert_eq!((ts[0], ts[1], ts[98], ts[99]), (990, 980, 10, 0));
    let ts = s.set_timesteps(7).unwrap();
    assert_eq!((ts[0], ts[1], ts[6]), (852, 710, 0));
    let mut d = Ddim::new(SchedulerConfig::default(), 0.0).unwrap();
    let ts = d.set_timesteps(50).unwrap();
    assert_eq!((ts[0], ts[1], ts[49]), (980, 960, 0));
}

#[test]
fn previous_timestep_rules() {
    let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
    // Before set_timesteps diffusers uses t - 1.
    assert_eq!(s.previous_timestep(500).unwrap(), 499);
    s.set_timesteps(100).unwrap();
    assert_eq!(s.previous_timestep(990).unwrap(), 980);
    assert_eq!(s.previous_timestep(0).unwrap(), -1);
    assert!(s.previous_timestep(995).is_err());
    assert!(s.step_coeffs(995).is_err());

    let mut d = Ddim::new(SchedulerConfig::default(), 0.0).unwrap();
    assert!(d.step_coeffs(999).is_err(), "DDIM steps need set_timesteps");
    d.set_timesteps(50).unwrap();
    assert_eq!(d.previous_timestep(980).unwrap(), 960);
    assert_eq!(d.previous_timestep(0).unwrap(), -20);
    assert!(d.step_coeffs(1000).is_err());
    assert!(d.step_coeffs(-1).is_err());
}

#[test]
fn noise_draw_rules() {
    let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
    s.set_timesteps(10).unwrap();
    assert!(s.step_coeffs(900).unwrap().uses_noise);
    assert!(!s.step_coeffs(0).unwrap().uses_noise);
    for eta in [0.0, 1.0] {
        let mut d = Ddim::new(SchedulerConfig::default(), eta).unwrap();
        d.set_timesteps(10).unwrap();
        // DDIM with eta > 0 draws at every step, the last included (its std is 0 there).
        let last = d.step_coeffs(0).unwrap();
        assert_eq!(last.uses_noise, eta > 0.0);
        assert_eq!(last.noise_std, 0.0);
        assert_eq!(d.step_coeffs(900).unwrap().uses_noise, eta > 0.0);
    }
    assert!(Ddim::new(SchedulerConfig::default(), -0.5).is_err());
    assert!(Ddim::new(SchedulerConfig::default(), f32::NAN).is_err());
}

#[test]
fn step_slice_checks_buffers_and_clamps() {
    let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
    s.set_timesteps(100).unwrap();
    let c = s.step_coeffs(990).unwrap();
    let x = [3.0f32, -3.0, 0.1, f32::NAN];
    let eps = [0.0f32; 4];
    let z = [0.5f32; 4];
    let (mut x0, mut prev) = ([0.0f32; 4], [0.0f32; 4]);
    assert!(step_slice(&c, &eps, &x, None, &mut x0, &mut prev).is_err());
    assert!(step_slice(&c, &eps[..3], &x, Some(&z), &mut x0, &mut prev).is_err());
    assert!(step_slice(&c, &eps, &x, Some(&z[..2]), &mut x0, &mut prev).is_err());
    step_slice(&c, &eps, &x, Some(&z), &mut x0, &mut prev).unwrap();
    assert_eq!(&x0[..2], &[1.0, -1.0]);
    assert!(x0[3].is_nan() && prev[3].is_nan());
    assert_eq!(prev[0], c.c_x0 * 1.0 + c.c_xt * 3.0 + c.noise_std * 0.5);
    // No noise at t = 0: the noise buffer may be omitted.
    let c0 = s.step_coeffs(0).unwrap();
    step_slice(&c0, &eps, &x, None, &mut x0, &mut prev).unwrap();
}

#[test]
fn guided_sampler_helpers() {
    let mut s = Ddpm::new(SchedulerConfig::default()).unwrap();
    s.set_timesteps(100).unwrap();
    let g = s.guidance_coeffs(500).unwrap();
    assert_eq!(g.dps_weight(100.0, true), 100.0 * g.dps_eta);
    assert_eq!(g.dps_weight(1.0, false), 1.0);
    assert_eq!(
        g.pigdm_update(0.25, 2.0, 1.0),
        0.25 + 2.0 * g.pigdm_r2 * g.pigdm_sqrt_alpha
    );
    assert_eq!(g.dps_eta, g.beta_t / g.alpha_t.sqrt());
}

#[test]
fn bad_beta_names_its_key() {
    let mut c = SchedulerConfig::default();
    c.beta_end = 1.5;
    match Ddpm::new(c) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "beta_end"),
        other => panic!("{other:?}"),
    }
}

/// DDIM's noise std η·√variance stays within √(1 − ᾱ_prev) for η ≤ 1 (in f32 too, where it
/// can round one ulp past it and the weight is then 0, not diffusers' NaN) at every step
/// count, spacing and beta schedule, so the predicted noise's weight is a number; past it,
/// where diffusers' step would return NaN, the step is an error that says why.
#[test]
fn ddim_eta_above_one_is_refused_where_its_weights_are_not_numbers() {
    use BetaSchedule::*;
    use TimestepSpacing::*;
    for beta_schedule in [Linear, ScaledLinear, SquaredcosCapV2] {
        for timestep_spacing in [Leading, Linspace, Trailing] {
            for set_alpha_to_one in [true, false] {
                let mut cfg = SchedulerConfig::default();
                cfg.beta_schedule = beta_schedule;
                cfg.timestep_spacing = timestep_spacing;
                cfg.set_alpha_to_one = set_alpha_to_one;
                for n in 1..=1000 {
                    let mut d = Ddim::new(cfg.clone(), 1.0).unwrap();
                    // (Trailing spacing refuses some counts, whose timesteps reach -1, as
                    // diffusers'.)
                    if d.set_timesteps(n).is_err() {
                        continue;
                    }
                    for t in d.timesteps().to_vec() {
                        let c = d.step_coeffs(t).unwrap_or_else(|e| {
                            panic!("{cfg:?}, {n} steps: {e}");
                        });
                        assert!(c.c_eps.is_finite() && c.noise_std.is_finite());
                    }
                }
            }
        }
    }
    // Where f32 puts std² one ulp above 1 − ᾱ_prev (ᾱ_t = 2.4e-9 here): the weight is 0.
    let mut cfg = SchedulerConfig::default();
    (cfg.beta_schedule, cfg.timestep_spacing) = (SquaredcosCapV2, Trailing);
    cfg.set_alpha_to_one = false;
    let mut d = Ddim::new(cfg, 1.0).unwrap();
    d.set_timesteps(1).unwrap();
    assert_eq!(d.step_coeffs(999).unwrap().c_eps, 0.0);

    let mut d = Ddim::new(SchedulerConfig::default(), 2.0).unwrap();
    d.set_timesteps(2).unwrap();
    let err = d.step_coeffs(500).unwrap_err().to_string();
    assert!(err.contains("eta 2") && err.contains("t = 500"), "{err}");
    // Betas of 0 make ᾱ_t = ᾱ_prev = 1 and the variance 0/0: NaN at any eta, an error too.
    let mut cfg = SchedulerConfig::default();
    cfg.trained_betas = Some([vec![0.0; 2], vec![0.01; 998]].concat());
    let mut d = Ddim::new(cfg, 0.5).unwrap();
    d.set_timesteps(1000).unwrap();
    let err = d.step_coeffs(1).unwrap_err().to_string();
    assert!(err.contains("eta 0.5") && err.contains("t = 1"), "{err}");
}
