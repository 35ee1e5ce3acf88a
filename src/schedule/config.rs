//! `scheduler_config.json`: the keys of diffusers' `DDPMScheduler` / `DDIMScheduler`.
//!
//! Parsing follows diffusers' `ConfigMixin.extract_init_dict`: keys named in
//! `_use_default_values` are dropped (so their default applies even if a value is present), keys
//! starting with `_` are metadata. Unlike diffusers, a key we do not know is an error rather than a
//! warning: a misspelt `clip_sample` would otherwise silently change every sample.
//!
//! Keys accepted but ignored, because they cannot change results with the values we require:
//! - `dynamic_thresholding_ratio`, `sample_max_value`: read by diffusers only when
//!   `thresholding` is true, which is rejected;
//! - `skip_prk_steps`: a `PNDMScheduler` key that hub configs of compatible schedulers carry and
//!   that diffusers drops when building a DDPM/DDIM scheduler from them.
//!
//! `variance_type` is used only by DDPM and `set_alpha_to_one` only by DDIM, as in diffusers; an
//! unsupported `variance_type` is therefore reported when a DDPM scheduler is built, not here.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// Largest `num_train_timesteps` accepted: far above any published model, small enough that the
/// per-timestep tables can never exhaust memory because of a corrupt file.
const MAX_TRAIN_TIMESTEPS: usize = 1 << 20;

/// Keys read by diffusers only in modes we reject (see the module doc).
const IGNORED_KEYS: [&str; 3] = [
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "skip_prk_steps",
];

/// How the training betas are laid out over `num_train_timesteps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, T)` in f32.
    Linear,
    /// `torch.linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2` (latent-diffusion models).
    ScaledLinear,
    /// GLIDE's cosine schedule, diffusers' `betas_for_alpha_bar` with `max_beta = 0.999`.
    SquaredcosCapV2,
}

/// DDPM's posterior variance choice (diffusers' `variance_type`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VarianceType {
    /// `(1 - ᾱ_prev) / (1 - ᾱ_t) · β_t`, clamped at 1e-20: the DDPM paper's β̃_t.
    FixedSmall,
    /// `β_t = 1 - ᾱ_t / ᾱ_prev`.
    FixedLarge,
    /// Any other value diffusers knows (`learned_range`...); DDIM ignores the key, DDPM refuses it.
    Unsupported(String),
}

/// How `set_timesteps(N)` picks the N inference timesteps (diffusers' `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `(0..N) * (T / N)` reversed, plus `steps_offset` (integer ratio).
    Leading,
    /// `round(linspace(0, T - 1, N))` reversed.
    Linspace,
    /// `round(arange(T, 0, -T / N)) - 1` (float ratio).
    Trailing,
}

/// A diffusers DDPM/DDIM scheduler configuration, restricted to epsilon prediction.
///
/// Fields are public so that a program can start from [`Default`] (google's DDPM values) and
/// change some; the values are validated when a scheduler is built from them.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Number of training timesteps T.
    pub num_train_timesteps: usize,
    /// First beta of the `linear` / `scaled_linear` schedules (a Python float).
    pub beta_start: f64,
    /// Last beta of the `linear` / `scaled_linear` schedules.
    pub beta_end: f64,
    /// The beta schedule, unless `trained_betas` is given.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas (as Python floats, rounded to f32 like `torch.tensor(.., float32)`).
    pub trained_betas: Option<Vec<f64>>,
    /// DDPM's noise variance.
    pub variance_type: VarianceType,
    /// Whether the predicted x0 is clamped to `±clip_sample_range`.
    pub clip_sample: bool,
    /// Clamp bound for x0, used when `clip_sample` is true.
    pub clip_sample_range: f64,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to the `leading` timesteps (ignored by the other spacings, as in diffusers).
    pub steps_offset: i64,
    /// DDIM: whether ᾱ before the first training step is 1 (true) or ᾱ_0 (false).
    pub set_alpha_to_one: bool,
    path: PathBuf,
}

impl Default for SchedulerConfig {
    /// google/ddpm-* values: linear 1e-4..0.02 over 1000 steps, clipped x0, fixed_small
    /// variance, epsilon prediction, leading spacing without offset.
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            set_alpha_to_one: true,
            path: PathBuf::from("<default scheduler config>"),
        }
    }
}

impl SchedulerConfig {
    /// Reads and validates a `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `scheduler_config.json`; `path` only names it in messages.
    pub fn from_json(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::format(
                path,
                "expected a JSON object at the top level",
            ));
        };
        let reader = Reader { map: &map, path };
        let mut cfg = SchedulerConfig {
            path: path.to_path_buf(),
            ..SchedulerConfig::default()
        };
        let defaults = reader.use_default_values()?;
        for (key, value) in &map {
            if key.starts_with('_') || defaults.contains(&key.as_str()) {
                continue;
            }
            reader.apply(&mut cfg, key, value)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The file this configuration came from (a placeholder for [`Default`]), for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The x0 clamp bound as the f32 scalar torch's `clamp` uses, or `None` when not clipping.
    pub fn clip(&self) -> Option<f32> {
        self.clip_sample.then_some(self.clip_sample_range as f32)
    }

    /// Checks the values that do not depend on the scheduler kind.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config(&self.path, key, msg));
        let t = self.num_train_timesteps;
        if t == 0 || t > MAX_TRAIN_TIMESTEPS {
            return bad(
                "num_train_timesteps",
                format!("expected 1..={MAX_TRAIN_TIMESTEPS}, got {t}"),
            );
        }
        for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !v.is_finite() || v < 0.0 {
                return bad(key, format!("expected a finite number >= 0, got {v}"));
            }
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != t {
                return bad(
                    "trained_betas",
                    format!("has {} values but num_train_timesteps is {t}", b.len()),
                );
            }
        }
        if self.clip_sample && !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0)
        {
            return bad(
                "clip_sample_range",
                format!(
                    "expected a finite number > 0, got {}",
                    self.clip_sample_range
                ),
            );
        }
        Ok(())
    }
}

/// Typed access to the JSON object, with errors naming the key and the file.
struct Reader<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.path, key, msg)
    }

    /// The keys diffusers recorded as "default used", which it drops before reading.
    fn use_default_values(&self) -> Result<Vec<&str>> {
        match self.map.get("_use_default_values") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        self.err("_use_default_values", format!("expected strings, got {v}"))
                    })
                })
                .collect(),
            Some(v) => Err(self.err(
                "_use_default_values",
                format!("expected a list of key names, got {v}"),
            )),
        }
    }

    fn apply(&self, cfg: &mut SchedulerConfig, key: &str, v: &Value) -> Result<()> {
        match key {
            "num_train_timesteps" => cfg.num_train_timesteps = self.uint(key, v)?,
            "beta_start" => cfg.beta_start = self.float(key, v)?,
            "beta_end" => cfg.beta_end = self.float(key, v)?,
            "beta_schedule" => {
                cfg.beta_schedule = match self.string(key, v)? {
                    "linear" => BetaSchedule::Linear,
                    "scaled_linear" => BetaSchedule::ScaledLinear,
                    "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
                    other => {
                        return Err(self.err(
                            key,
                            format!(
                                "`{other}` is not implemented (expected linear, scaled_linear \
                                 or squaredcos_cap_v2)"
                            ),
                        ))
                    }
                }
            }
            "trained_betas" => {
                cfg.trained_betas = match v {
                    Value::Null => None,
                    Value::Array(items) => Some(
                        items
                            .iter()
                            .map(|x| self.float(key, x))
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    _ => return Err(self.err(key, format!("expected null or a list, got {v}"))),
                }
            }
            "variance_type" => {
                cfg.variance_type = match self.string(key, v)? {
                    "fixed_small" => VarianceType::FixedSmall,
                    "fixed_large" => VarianceType::FixedLarge,
                    other => VarianceType::Unsupported(other.to_string()),
                }
            }
            "clip_sample" => cfg.clip_sample = self.boolean(key, v)?,
            "clip_sample_range" => cfg.clip_sample_range = self.float(key, v)?,
            "prediction_type" => {
                let p = self.string(key, v)?;
                if p != "epsilon" {
                    return Err(self.err(
                        key,
                        format!("`{p}` is not implemented; only `epsilon` is supported"),
                    ));
                }
            }
            "timestep_spacing" => {
                cfg.timestep_spacing = match self.string(key, v)? {
                    "leading" => TimestepSpacing::Leading,
                    "linspace" => TimestepSpacing::Linspace,
                    "trailing" => TimestepSpacing::Trailing,
                    other => {
                        return Err(self.err(
                            key,
                            format!("`{other}` is not one of leading, linspace, trailing"),
                        ))
                    }
                }
            }
            "steps_offset" => cfg.steps_offset = self.int(key, v)?,
            "set_alpha_to_one" => cfg.set_alpha_to_one = self.boolean(key, v)?,
            "thresholding" | "rescale_betas_zero_snr" => {
                if self.boolean(key, v)? {
                    return Err(
                        self.err(key, "`true` is not implemented; only `false` is supported")
                    );
                }
            }
            k if IGNORED_KEYS.contains(&k) => {}
            _ => {
                return Err(self.err(
                    key,
                    "unknown key for a DDPM/DDIM scheduler (diffusers would ignore it with a \
                     warning; remove it if that is what you want)",
                ))
            }
        }
        Ok(())
    }

    fn float(&self, key: &str, v: &Value) -> Result<f64> {
        v.as_f64()
            .ok_or_else(|| self.err(key, format!("expected a number, got {v}")))
    }

    fn int(&self, key: &str, v: &Value) -> Result<i64> {
        v.as_i64()
            .ok_or_else(|| self.err(key, format!("expected an integer, got {v}")))
    }

    fn uint(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}")))
    }

    fn boolean(&self, key: &str, v: &Value) -> Result<bool> {
        v.as_bool()
            .ok_or_else(|| self.err(key, format!("expected true or false, got {v}")))
    }

    fn string<'v>(&self, key: &str, v: &'v Value) -> Result<&'v str> {
        v.as_str()
            .ok_or_else(|| self.err(key, format!("expected a string, got {v}")))
    }
}
