//! invdiff: image inverse problems (deblurring first) solved with pretrained diffusion models.
//!
//! The crate reproduces diffusers' `UNet2DModel` exactly, its DDPM and DDIM schedulers, and the
//! posterior samplers DPS and ΠGDM, on the CPU (rayon) and on NVIDIA GPUs (hand-written CUDA
//! kernels driven by cudarc).
//!
//! Layout:
//! - [`config`], [`model`]: the network's configuration, its weights, and the graph built from them
//!   once, which every backend executes;
//! - [`cpu`]: the reference backend, forward and reverse mode;
//! - [`io`]: safetensors, PyTorch `.bin` (read without executing pickle code), `.npy`, images;
//! - [`schedule`]: DDPM and DDIM with diffusers' arithmetic;
//! - [`inverse`]: measurement operators (FFT blur), blur-kernel generators, metrics;
//! - [`rng`]: the counter-based normal generator shared by every backend;
//! - [`switches`]: the `INVDIFF_*` environment variables, in one list.

pub mod config;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod host;
pub mod inverse;
pub mod io;
pub mod model;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod switches;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::Tensor;
