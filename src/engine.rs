//! One face for every backend: choose a device, run the network, take its input gradient.

use std::fmt;
use std::str::FromStr;

use crate::cpu::{CpuUnet, Tape};
use crate::cuda::{self, CudaUnet, Precision, Profile, StallOptions, Stalls, Trace};
use crate::model::Model;
use crate::{Error, Result, Tensor};

/// The device a user asked for (`--device auto|cpu|cuda[:N]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A GPU when one is usable, otherwise the CPU (with a notice).
    Auto,
    Cpu,
    /// CUDA device `N`; an error when it is not usable.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    Error::input(format!(
                        "unknown device `{s}` (expected auto, cpu, cuda or cuda:N)"
                    ))
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

enum Backend {
    Cpu {
        unet: Box<CpuUnet>,
        tape: Option<Tape>,
    },
    Cuda(Box<CudaUnet>),
}

/// A network on a device.
pub struct Engine {
    backend: Backend,
    /// Why `auto` did not pick a GPU, for a one-line notice.
    notice: Option<String>,
}

impl Engine {
    /// Puts `model` on the device `choice` resolves to, in fp32.
    pub fn new(model: &Model, choice: DeviceChoice) -> Result<Engine> {
        Self::with_precision(model, choice, Precision::Fp32)
    }

    /// Like [`new`](Self::new), with the convolutions at `precision`; anything but fp32 needs
    /// a GPU (an error on the CPU, or when `auto` finds no usable GPU).
    pub fn with_precision(
        model: &Model,
        choice: DeviceChoice,
        precision: Precision,
    ) -> Result<Engine> {
        let cpu = |notice: Option<String>| {
            if precision != Precision::Fp32 {
                let why = notice.map_or(String::new(), |n| format!(" ({n})"));
                return Err(Error::input(format!(
                    "precision {precision} runs only on a CUDA GPU; the CPU backend computes in fp32{why}"
                )));
            }
            Ok(Engine {
                backend: Backend::Cpu {
                    unet: Box::new(CpuUnet::new(model)),
                    tape: None,
                },
                notice,
            })
        };
        match choice {
            DeviceChoice::Cpu => cpu(None),
            DeviceChoice::Cuda(n) => Ok(Engine {
                backend: Backend::Cuda(Box::new(CudaUnet::with_precision(model, n, precision)?)),
                notice: None,
            }),
            DeviceChoice::Auto => {
                let why = if !cuda::kernels_compiled() {
                    "this build has no CUDA kernels (built without nvcc)".to_string()
                } else {
                    let p = cuda::probe();
                    if p.devices.is_empty() {
                        p.error
                            .unwrap_or_else(|| "no CUDA device found".to_string())
                    } else {
                        match CudaUnet::with_precision(model, 0, precision) {
                            Ok(u) => {
                                return Ok(Engine {
                                    backend: Backend::Cuda(Box::new(u)),
                                    notice: None,
                                })
                            }
                            Err(e) => e.to_string(),
                        }
                    }
                };
                cpu(Some(format!("{why}; running on the CPU")))
            }
        }
    }

    /// The device in words, e.g. `cpu (2 threads)`.
    pub fn device_name(&self) -> String {
        match &self.backend {
            Backend::Cpu { .. } => format!("cpu ({} threads)", rayon::current_num_threads()),
            Backend::Cuda(u) => u.device_name().to_string(),
        }
    }

    /// The precision of the convolutions (always fp32 on the CPU).
    pub fn precision(&self) -> Precision {
        match &self.backend {
            Backend::Cpu { .. } => Precision::Fp32,
            Backend::Cuda(u) => u.precision(),
        }
    }

    /// Makes every image's results independent of the batch it is in, bit for bit (`on`):
    /// the CPU always is; on a GPU this plans each launch from one image's shape, at some cost
    /// in throughput at large batches (see `--batch-invariant`).
    pub fn set_batch_invariant(&mut self, on: bool) {
        if let Backend::Cuda(u) = &mut self.backend {
            u.set_batch_invariant(on);
        }
    }

    /// The GPU's kernel and launch choices in words (see `CudaUnet::choices`); empty on the
    /// CPU.
    pub fn choices(&self) -> String {
        match &self.backend {
            Backend::Cpu { .. } => String::new(),
            Backend::Cuda(u) => u.choices(),
        }
    }

    /// Whether every image's results are independent of its batch, bit for bit.
    pub fn batch_invariant(&self) -> bool {
        match &self.backend {
            Backend::Cpu { .. } => true,
            Backend::Cuda(u) => u.batch_invariant(),
        }
    }

    /// Whether this engine runs on the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self.backend, Backend::Cpu { .. })
    }

    /// The GPU network, when this engine runs on CUDA: the device sampling loop drives it
    /// directly.
    pub fn cuda_mut(&mut self) -> Option<&mut CudaUnet> {
        match &mut self.backend {
            Backend::Cpu { .. } => None,
            Backend::Cuda(u) => Some(u),
        }
    }

    /// The reason `auto` fell back to the CPU, if it did.
    pub fn notice(&self) -> Option<&str> {
        self.notice.as_deref()
    }

    /// The predicted noise for `sample` at per-image `timesteps`.
    pub fn forward(&mut self, sample: &Tensor, timesteps: &[f32]) -> Result<Tensor> {
        match &mut self.backend {
            Backend::Cpu { unet, .. } => unet.forward(sample, timesteps),
            Backend::Cuda(u) => u.forward(sample, timesteps),
        }
    }

    /// The predicted noise, keeping what [`vjp`](Self::vjp) needs.
    pub fn forward_recording(&mut self, sample: &Tensor, timesteps: &[f32]) -> Result<Tensor> {
        match &mut self.backend {
            Backend::Cpu { unet, tape } => {
                let (eps, t) = unet.forward_recording(sample, timesteps)?;
                *tape = Some(t);
                Ok(eps)
            }
            Backend::Cuda(u) => u.forward_recording(sample, timesteps),
        }
    }

    /// `d/d sample of sum(eps * cotangent)` for the last recorded forward pass.
    pub fn vjp(&mut self, cotangent: &Tensor) -> Result<Tensor> {
        match &mut self.backend {
            Backend::Cpu { unet, tape } => {
                let t = tape.take().ok_or_else(|| {
                    Error::input("vjp: no recorded forward pass to differentiate")
                })?;
                unet.vjp(t, cotangent)
            }
            Backend::Cuda(u) => u.vjp(cotangent),
        }
    }

    /// Milliseconds per forward (and, with `vjp`, per forward + input gradient) of a batch of
    /// `n` `h x w` images kept on the device, timed with device events: only for GPU engines,
    /// whose host-tensor calls would also time the transfers.
    pub fn time_on_device(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        iters: usize,
        vjp: bool,
    ) -> Option<Result<f64>> {
        match &mut self.backend {
            Backend::Cpu { .. } => None,
            Backend::Cuda(u) if vjp => Some(u.time_forward_vjp(n, h, w, iters)),
            Backend::Cuda(u) => Some(u.time_forward(n, h, w, iters)),
        }
    }

    /// Per-step GPU times of one forward (and, with `vjp`, forward + input gradient) call of a
    /// batch of `n` `h x w` images kept on the device, with the graph replay of the same passes
    /// beside them ([`CudaUnet::profile`]): only for GPU engines (`None` on the CPU, whose
    /// per-op times `INVDIFF_PROFILE=1` prints).
    pub fn profile_on_device(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        iters: usize,
        vjp: bool,
    ) -> Option<Result<Profile>> {
        match &mut self.backend {
            Backend::Cpu { .. } => None,
            Backend::Cuda(u) => Some(u.profile(n, h, w, vjp, iters)),
        }
    }

    /// Kernel timelines of `replays` graph replays of the forward pass (with `vjp`, a DPS
    /// step's forward and backward passes) as CUPTI records them ([`CudaUnet::trace`]): only
    /// for GPU engines (`None` on the CPU).
    pub fn trace_on_device(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        replays: usize,
        vjp: bool,
    ) -> Option<Result<Trace>> {
        match &mut self.backend {
            Backend::Cpu { .. } => None,
            Backend::Cuda(u) => Some(u.trace(n, h, w, vjp, replays)),
        }
    }

    /// What the warps of each step of a forward pass (with `vjp`, a DPS step's forward and
    /// backward passes) wait on, from CUPTI's PC sampling, each step sampled on its own as
    /// `options` say, `progress(done, of)` after each step ([`CudaUnet::stalls`]): only for GPU
    /// engines (`None` on the CPU).
    pub fn stalls_on_device(
        &mut self,
        (n, h, w): (usize, usize, usize),
        vjp: bool,
        options: StallOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Option<Result<Stalls>> {
        match &mut self.backend {
            Backend::Cpu { .. } => None,
            Backend::Cuda(u) => Some(u.stalls((n, h, w), vjp, options, progress)),
        }
    }
}
