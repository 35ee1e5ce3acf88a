//! `UNet2DModel` configuration (`config.json`), validated against what this engine implements.
//!
//! diffusers accepts many keys; this engine implements the block types of the DDPM family
//! (`DownBlock2D`, `AttnDownBlock2D`, `UpBlock2D`, `AttnUpBlock2D`, `UNetMidBlock2D`) with a
//! positional time embedding and SiLU. Any key or value outside that set is an error that names
//! the key and the value, rather than a silently different network.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// Most resolution levels (entries of `block_out_channels`) a configuration may have.
pub const MAX_LEVELS: usize = 16;
/// Largest channel count, time-embedding width, head size or sample side a configuration may
/// name: 2^20, far above any real model's, so that products of sizes stay inside 64 bits.
pub const MAX_WIDTH: usize = 1 << 20;
/// Most resnets per block (`layers_per_block`).
pub const MAX_LAYERS: usize = 1024;

/// The kind of a down or up block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Resnets only.
    Plain,
    /// Each resnet followed by a self-attention block.
    Attention,
}

/// A validated `UNet2DModel` configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// (height, width) the model was trained at; other sizes run if the network can take them.
    pub sample_size: (usize, usize),
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block_scale_factor: f32,
    /// 0: pad right and bottom by one, then a stride-2 conv without padding; 1: symmetric pad 1.
    pub downsample_padding: usize,
    /// `None`: one head per attention block; `Some(d)`: heads of size `d`.
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    /// Width of the time embedding (default `4 * block_out_channels[0]`).
    pub time_embedding_dim: usize,
    /// Whether the mid block has its attention layer.
    pub mid_attention: bool,
}

impl UNetConfig {
    /// The architecture of `google/ddpm-ema-celebahq-256` (and `ddpm-church-256`).
    pub fn celebahq_256() -> Self {
        use BlockKind::*;
        UNetConfig {
            in_channels: 3,
            out_channels: 3,
            sample_size: (256, 256),
            center_input_sample: false,
            flip_sin_to_cos: false,
            freq_shift: 1.0,
            down_blocks: vec![Plain, Plain, Plain, Plain, Attention, Plain],
            up_blocks: vec![Plain, Attention, Plain, Plain, Plain, Plain],
            block_out_channels: vec![128, 128, 256, 256, 512, 512],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 0,
            attention_head_dim: None,
            norm_num_groups: 32,
            norm_eps: 1e-6,
            time_embedding_dim: 512,
            mid_attention: true,
        }
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::format(path, "expected a JSON object"));
        };
        Parser {
            path: path.to_path_buf(),
            map,
        }
        .parse()
    }

    /// Number of stride-2 downsamplers, so inputs must be multiples of `2^levels`.
    pub fn downsample_count(&self) -> usize {
        self.block_out_channels.len() - 1
    }

    /// Checks that the network can take an `h x w` input; the error says which sizes work.
    pub fn check_input_size(&self, h: usize, w: usize) -> Result<()> {
        let m = 1usize << self.downsample_count();
        if h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            return Err(Error::input(format!(
                "input size {h}x{w} does not fit this network: it halves the resolution {} times, \
                 so height and width must be positive multiples of {m} (e.g. {}x{})",
                self.downsample_count(),
                (h.max(1)).div_ceil(m) * m,
                (w.max(1)).div_ceil(m) * m,
            )));
        }
        Ok(())
    }

    /// Number of attention heads and head size for a block of `channels` channels, as
    /// `UNet2DModel` builds them (`heads = channels // head_dim`, inner width `heads * head_dim`).
    pub fn attention_heads(&self, channels: usize) -> (usize, usize) {
        let d = self.attention_head_dim.unwrap_or(channels);
        (channels / d, d)
    }

    /// A short description in words, for `invdiff info`.
    pub fn describe(&self) -> String {
        let kind = |k: &BlockKind, down: bool| match (k, down) {
            (BlockKind::Plain, true) => "DownBlock2D",
            (BlockKind::Attention, true) => "AttnDownBlock2D",
            (BlockKind::Plain, false) => "UpBlock2D",
            (BlockKind::Attention, false) => "AttnUpBlock2D",
        };
        let downs: Vec<_> = self.down_blocks.iter().map(|k| kind(k, true)).collect();
        let ups: Vec<_> = self.up_blocks.iter().map(|k| kind(k, false)).collect();
        let heads = match self.attention_head_dim {
            None => "one head per attention block".to_string(),
            Some(d) => format!("attention heads of size {d}"),
        };
        format!(
            "UNet2DModel, {} -> {} channels, trained at {}x{}\n\
             levels: block_out_channels {:?}, {} resnets per down block\n\
             down: {}\n\
             mid:  UNetMidBlock2D ({}; scale factor {})\n\
             up:   {}\n\
             {heads}; GroupNorm {} groups, eps {:e}\n\
             time embedding: sinusoidal (flip_sin_to_cos {}, freq_shift {}) -> MLP of width {}\n\
             downsampling: stride-2 conv, padding {}; upsampling: nearest x2 + conv{}",
            self.in_channels,
            self.out_channels,
            self.sample_size.0,
            self.sample_size.1,
            self.block_out_channels,
            self.layers_per_block,
            downs.join(", "),
            if self.mid_attention {
                "resnet, attention, resnet"
            } else {
                "resnet, resnet"
            },
            self.mid_block_scale_factor,
            ups.join(", "),
            self.norm_num_groups,
            self.norm_eps,
            self.flip_sin_to_cos,
            self.freq_shift,
            self.time_embedding_dim,
            if self.downsample_padding == 0 {
                "0 (pad right/bottom by one)"
            } else {
                "1 (symmetric)"
            },
            if self.center_input_sample {
                "; input centred (2x - 1)"
            } else {
                ""
            },
        )
    }
}

/// Walks the JSON object once, consuming keys, so that anything left over is reported.
struct Parser {
    path: PathBuf,
    map: Map<String, Value>,
}

impl Parser {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.path, key, msg)
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn usize_or(&mut self, key: &str, default: usize) -> Result<usize> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn f32_or(&mut self, key: &str, default: f32) -> Result<f32> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    /// A string key that must take one of `allowed` values (the first is the default).
    fn one_of(&mut self, key: &str, allowed: &[&str]) -> Result<String> {
        match self.take(key) {
            None => Ok(allowed[0].to_string()),
            Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(s),
            Some(v) => Err(self.err(
                key,
                format!(
                    "value {v} is not supported by this engine (supported: {})",
                    allowed.join(", ")
                ),
            )),
        }
    }

    /// A list of strings, or `default` when the key is absent.
    fn strings(&mut self, key: &str, default: &[&str]) -> Result<Vec<String>> {
        let Some(v) = self.take(key) else {
            return Ok(default.iter().map(|s| s.to_string()).collect());
        };
        let list = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list of strings, got {v}")))?;
        list.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(key, format!("expected a string, got {x}")))
            })
            .collect()
    }

    fn blocks(
        &mut self,
        key: &str,
        plain: &str,
        attn: &str,
        default: &[&str],
    ) -> Result<Vec<BlockKind>> {
        let names = self.strings(key, default)?;
        names
            .iter()
            .map(|n| match n.as_str() {
                s if s == plain => Ok(BlockKind::Plain),
                s if s == attn => Ok(BlockKind::Attention),
                other => Err(self.err(
                    key,
                    format!("block type \"{other}\" is not supported (supported: {plain}, {attn})"),
                )),
            })
            .collect()
    }

    fn parse(mut self) -> Result<UNetConfig> {
        if let Some(v) = self.take("_class_name") {
            if v != "UNet2DModel" {
                return Err(self.err("_class_name", format!("expected \"UNet2DModel\", got {v}")));
            }
        }
        // Bookkeeping keys written by diffusers' ConfigMixin.
        self.map.retain(|k, _| !k.starts_with('_'));

        let block_out_channels: Vec<usize> = match self.take("block_out_channels") {
            None => vec![224, 448, 672, 896],
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    self.err(
                        "block_out_channels",
                        format!("expected a list of integers, got {v}"),
                    )
                })?,
        };
        // Defaults are UNet2DModel.__init__'s.
        let down_blocks = self.blocks(
            "down_block_types",
            "DownBlock2D",
            "AttnDownBlock2D",
            &[
                "DownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
            ],
        )?;
        let up_blocks = self.blocks(
            "up_block_types",
            "UpBlock2D",
            "AttnUpBlock2D",
            &[
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
            ],
        )?;
        let sample_size = match self.take("sample_size") {
            None => (256, 256),
            Some(v) => match (&v, v.as_u64()) {
                (_, Some(s)) => (s as usize, s as usize),
                (Value::Array(a), _) if a.len() == 2 => match (a[0].as_u64(), a[1].as_u64()) {
                    (Some(h), Some(w)) => (h as usize, w as usize),
                    _ => {
                        return Err(self.err(
                            "sample_size",
                            format!("expected an integer or [h, w], got {v}"),
                        ))
                    }
                },
                _ => {
                    return Err(self.err(
                        "sample_size",
                        format!("expected an integer or [h, w], got {v}"),
                    ))
                }
            },
        };
        let in_channels = self.usize_or("in_channels", 3)?;
        let out_channels = self.usize_or("out_channels", 3)?;
        let center_input_sample = self.bool_or("center_input_sample", false)?;
        self.one_of("time_embedding_type", &["positional"])?;
        let flip_sin_to_cos = self.bool_or("flip_sin_to_cos", true)?;
        let freq_shift = self.f32_or("freq_shift", 0.0)?;
        let layers_per_block = self.usize_or("layers_per_block", 2)?;
        let mid_block_scale_factor = self.f32_or("mid_block_scale_factor", 1.0)?;
        let downsample_padding = self.usize_or("downsample_padding", 1)?;
        self.one_of("downsample_type", &["conv"])?;
        self.one_of("upsample_type", &["conv"])?;
        // Dropout is inactive at inference, so any rate gives the same network.
        self.f32_or("dropout", 0.0)?;
        self.one_of("act_fn", &["silu", "swish"])?;
        // Absent means diffusers' default of 8; an explicit null means one head per block.
        let attention_head_dim = match self.map.remove("attention_head_dim") {
            None => Some(8),
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(
                    "attention_head_dim",
                    format!("expected null or a positive integer, got {v}"),
                )
            })?),
        };
        let norm_num_groups = self.usize_or("norm_num_groups", 32)?;
        let norm_eps = self.f32_or("norm_eps", 1e-5)?;
        self.one_of("resnet_time_scale_shift", &["default"])?;
        if self.map.get("mid_block_type") == Some(&Value::Null) {
            return Err(self.err("mid_block_type", "null (no mid block) is not supported"));
        }
        self.one_of("mid_block_type", &["UNetMidBlock2D"])?;
        let mid_attention = self.bool_or("add_attention", true)?;
        let time_embedding_dim = self.usize_or(
            "time_embedding_dim",
            // Saturating: a too-wide first block is an error of its own below.
            4usize.saturating_mul(block_out_channels.first().copied().unwrap_or(0)),
        )?;
        // Only read by the "learned" time embedding, which is rejected above.
        self.take("num_train_timesteps");
        for key in [
            "class_embed_type",
            "num_class_embeds",
            "attn_norm_num_groups",
        ] {
            if let Some(v) = self.take(key) {
                return Err(self.err(key, format!("value {v} is not supported (only null)")));
            }
        }
        if let Some(key) = self.map.keys().next() {
            let v = &self.map[key];
            return Err(self.err(key, format!("unknown or unsupported key (value {v})")));
        }

        let cfg = UNetConfig {
            in_channels,
            out_channels,
            sample_size,
            center_input_sample,
            flip_sin_to_cos,
            freq_shift,
            down_blocks,
            up_blocks,
            block_out_channels,
            layers_per_block,
            mid_block_scale_factor,
            downsample_padding,
            attention_head_dim,
            norm_num_groups,
            norm_eps,
            time_embedding_dim,
            mid_attention,
        };
        self.check(&cfg)?;
        Ok(cfg)
    }

    /// Structural checks that diffusers would fail on at construction or at the first forward,
    /// and bounds far above any real model's that keep every size product inside 64 bits (a
    /// layer count of 2^40 would otherwise build for ever, a width of 2^62 wrap to 0).
    fn check(&self, c: &UNetConfig) -> Result<()> {
        let levels = c.block_out_channels.len();
        if levels == 0 {
            return Err(self.err("block_out_channels", "must not be empty"));
        }
        if levels > MAX_LEVELS {
            return Err(self.err(
                "block_out_channels",
                format!("has {levels} levels; at most {MAX_LEVELS} are supported"),
            ));
        }
        let widths = [
            (
                "block_out_channels",
                c.block_out_channels.iter().max().copied(),
            ),
            ("in_channels", Some(c.in_channels)),
            ("out_channels", Some(c.out_channels)),
            ("time_embedding_dim", Some(c.time_embedding_dim)),
            ("attention_head_dim", c.attention_head_dim),
            ("sample_size", Some(c.sample_size.0.max(c.sample_size.1))),
        ];
        for (key, v) in widths {
            if let Some(v) = v.filter(|&v| v > MAX_WIDTH) {
                return Err(self.err(
                    key,
                    format!("{v} is larger than the {MAX_WIDTH} this engine supports"),
                ));
            }
        }
        if c.layers_per_block > MAX_LAYERS {
            return Err(self.err(
                "layers_per_block",
                format!(
                    "{} is larger than the {MAX_LAYERS} this engine supports",
                    c.layers_per_block
                ),
            ));
        }
        if c.down_blocks.len() != levels {
            return Err(self.err(
                "down_block_types",
                format!(
                    "has {} entries but block_out_channels has {levels}",
                    c.down_blocks.len()
                ),
            ));
        }
        if c.up_blocks.len() != levels {
            return Err(self.err(
                "up_block_types",
                format!(
                    "has {} entries but block_out_channels has {levels}",
                    c.up_blocks.len()
                ),
            ));
        }
        if c.layers_per_block == 0 {
            return Err(self.err("layers_per_block", "must be at least 1"));
        }
        if c.in_channels == 0 || c.out_channels == 0 {
            return Err(self.err("in_channels", "channel counts must be positive"));
        }
        if !(c.norm_eps > 0.0 && c.norm_eps.is_finite()) {
            return Err(self.err("norm_eps", format!("must be positive, got {}", c.norm_eps)));
        }
        if !(c.mid_block_scale_factor.is_finite() && c.mid_block_scale_factor != 0.0) {
            return Err(self.err(
                "mid_block_scale_factor",
                format!(
                    "must be a non-zero number, got {}",
                    c.mid_block_scale_factor
                ),
            ));
        }
        if c.downsample_padding > 1 {
            return Err(self.err(
                "downsample_padding",
                format!(
                    "value {} is not supported: 0 and 1 keep the resolution halving exact",
                    c.downsample_padding
                ),
            ));
        }
        let g = c.norm_num_groups;
        if g == 0 {
            return Err(self.err("norm_num_groups", "must be positive"));
        }
        for &ch in &c.block_out_channels {
            if ch == 0 || ch % g != 0 {
                return Err(self.err(
                    "norm_num_groups",
                    format!("{g} groups do not divide {ch} channels (block_out_channels)"),
                ));
            }
        }
        if c.attention_head_dim == Some(0) {
            return Err(self.err("attention_head_dim", "must be positive"));
        }
        if c.time_embedding_dim == 0 {
            return Err(self.err("time_embedding_dim", "must be positive"));
        }
        // Concatenated skip widths and head counts are checked when the graph is built, where
        // the channel counts are known; those errors name the block.
        Ok(())
    }
}
