//! Finding and reading model folders as people download them.
//!
//! Three layouts are accepted: a diffusers pipeline (`unet/` and `scheduler/` subfolders), a bare
//! model folder (`config.json` + weights), and google's hub layout where the UNet's and the
//! scheduler's files all sit at the root. Weights may be safetensors or PyTorch's `.bin`, which
//! is parsed without executing any of its pickle code.

use std::path::{Path, PathBuf};

use super::{Graph, Weights};
use crate::config::UNetConfig;
use crate::{io, Error, Result};

/// Weight file names tried in order.
const WEIGHT_FILES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
];

/// The files of a model folder.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The UNet's `config.json`.
    pub config: PathBuf,
    /// The UNet's weights.
    pub weights: PathBuf,
    /// `scheduler_config.json`, where the folder has one.
    pub scheduler_config: Option<PathBuf>,
}

impl ModelFiles {
    /// Locates the files in `dir`; the error says what was looked for.
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let (unet, scheduler_config) = if dir.join("unet/config.json").is_file() {
            (
                dir.join("unet"),
                dir.join("scheduler/scheduler_config.json"),
            )
        } else if dir.join("config.json").is_file() {
            // Google's layout keeps the scheduler config beside the UNet's; a `unet/` folder given
            // directly has it in `../scheduler/`.
            let beside = dir.join("scheduler_config.json");
            let sibling = dir.join("../scheduler/scheduler_config.json");
            (
                dir.to_path_buf(),
                if beside.is_file() { beside } else { sibling },
            )
        } else {
            return Err(Error::format(
                dir,
                "not a model folder: no config.json here nor in unet/ (expected a diffusers \
                 pipeline folder, a UNet folder, or google's hub layout)",
            ));
        };
        let weights = WEIGHT_FILES
            .iter()
            .map(|f| unet.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::format(
                    &unet,
                    format!("no weights found (looked for {})", WEIGHT_FILES.join(", ")),
                )
            })?;
        Ok(ModelFiles {
            config: unet.join("config.json"),
            weights,
            scheduler_config: scheduler_config.is_file().then_some(scheduler_config),
        })
    }
}

/// A network ready to hand to a backend: configuration, graph and weights.
#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Graph,
    pub weights: Weights,
    /// Where it came from, in words.
    pub source: String,
    /// The scheduler configuration that came with it, if any.
    pub scheduler_config: Option<PathBuf>,
}

impl Model {
    /// Loads a model folder (see the module documentation for the layouts).
    pub fn load(dir: &Path) -> Result<Model> {
        let files = ModelFiles::locate(dir)?;
        let config = UNetConfig::from_file(&files.config)?;
        let graph = Graph::build(&config).map_err(|e| match e {
            Error::Input(msg) => Error::config(&files.config, "block_out_channels", msg),
            other => other,
        })?;
        let path = &files.weights;
        let tensors = if path.extension().is_some_and(|e| e == "bin") {
            io::torch_bin::read_state_dict(path)?
        } else {
            let file = io::safetensors::read(path)?;
            file.names()
                .into_iter()
                .map(|n| Ok((n.to_string(), file.get(n)?)))
                .collect::<Result<Vec<_>>>()?
        };
        let weights = Weights::from_tensors(&graph, tensors, path)?;
        Ok(Model {
            graph,
            weights,
            source: dir.display().to_string(),
            scheduler_config: files.scheduler_config,
        })
    }

    /// The architecture of `google/ddpm-ema-celebahq-256` with deterministic random weights:
    /// runs anywhere, no download, same speed as the real weights.
    pub fn builtin_celebahq(seed: u64) -> Model {
        let graph =
            Graph::build(&UNetConfig::celebahq_256()).expect("the built-in config is valid");
        let weights = Weights::random(&graph, seed);
        Model {
            graph,
            weights,
            source: format!(
                "built-in google/ddpm-ema-celebahq-256 architecture, random weights (seed {seed})"
            ),
            scheduler_config: None,
        }
    }

    /// Small networks that still take every path: attention (one head, then several), both
    /// paddings, a centred input, a mid-block scale factor, 4 input channels (`variant_b`).
    /// Random weights; for the tests and the GPU selftest.
    pub(crate) fn tiny(variant_b: bool) -> Model {
        use crate::config::BlockKind::*;
        let mut c = UNetConfig::celebahq_256();
        if variant_b {
            c.in_channels = 4;
            c.block_out_channels = vec![16, 32, 48];
            c.down_blocks = vec![Plain, Attention, Attention];
            c.up_blocks = vec![Attention, Attention, Plain];
            c.layers_per_block = 2;
            c.norm_num_groups = 8;
            c.attention_head_dim = Some(8);
            c.downsample_padding = 1;
            c.time_embedding_dim = 64;
            c.flip_sin_to_cos = true;
            c.freq_shift = 0.0;
            c.center_input_sample = true;
            c.mid_block_scale_factor = 1.5;
        } else {
            c.block_out_channels = vec![32, 64, 64];
            c.down_blocks = vec![Plain, Attention, Plain];
            c.up_blocks = vec![Plain, Attention, Plain];
            c.layers_per_block = 1;
            c.norm_num_groups = 8;
            c.time_embedding_dim = 128;
        }
        let graph = Graph::build(&c).expect("the tiny configurations are valid");
        let weights = Weights::random(&graph, if variant_b { 7 } else { 3 });
        Model {
            graph,
            weights,
            source: "tiny".into(),
            scheduler_config: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.graph.config
    }
}
