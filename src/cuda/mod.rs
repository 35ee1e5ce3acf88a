//! The CUDA backend: the same graph as [`crate::cpu`], run by hand-written kernels
//! (`kernels/*.cu`, compiled by `build.rs` into fatbins embedded in the binary) through cudarc.
//!
//! fp32 throughout, except the convolutions' products at a lower [`Precision`] when asked
//! (tensor cores; accumulation stays fp32); activations are channels-last like the CPU
//! backend's. Modules:
//! - [`device`](self::probe): driver and GPU discovery that never panics, module loading;
//! - `kernels`: typed launchers, one per kernel family, with their launch shapes;
//! - `program`: the graph lowered to a list of launches at one shape (forward, and the
//!   vector-Jacobian product after it when recording);
//! - `plan`: liveness and packing of every buffer into one arena per shape; `streams`: which
//!   steps may run side by side, on several streams inside the captured graph (two by default);
//! - `profile`: what each step is (kind, shape label, FLOPs) and the per-step timings of
//!   [`CudaUnet::profile`]; `trace`: the kernels of the graph replays as CUPTI records them
//!   ([`CudaUnet::trace`]); `stalls`: what each step's warps wait on, from CUPTI's PC sampling
//!   ([`CudaUnet::stalls`]);
//! - `weights`: the parameters in the kernels' layouts;
//! - [`CudaUnet`]: the executor (CUDA graphs, host and device-resident entry points, timing);
//! - `sampler`: the whole sampling loop on the device (network, VJP, scheduler step, guidance),
//!   one captured graph replayed per step; `sampler_kernels` launches its kernels and `blur`
//!   runs [`CircularBlur`](crate::inverse::CircularBlur) by FFT;
//! - [`selftest()`]: every kernel against its CPU counterpart, and the whole network;
//! - [`sweep_convolutions`]: every tensor-core launch of a program timed under each pipeline
//!   and split of K.
//!
//! On a machine without a GPU or driver everything here returns [`Error::Cuda`](crate::Error::Cuda)
//! values (or, for [`probe`], reports it) and never panics.

mod blur;
mod device;
mod kernels;
mod plan;
mod precision;
mod profile;
mod program;
mod sampler;
mod sampler_kernels;
mod sampler_selftest;
mod selftest;
mod stalls;
mod streams;
mod sweep;
mod trace;
mod unet;
mod weights;

pub use device::{compiled_targets, kernels_compiled, kernels_run_on, probe, DeviceInfo, Probe};
pub use plan::{plan_stats, PlanStats};
pub use precision::Precision;
pub use profile::{
    measured_bf16_peak, peak_rate, planned_steps, Pass, PeakRate, Profile, StepGroup, StepTime,
};
pub use selftest::{selftest, SelftestRow, SELFTEST_GROUPS, TOLERANCE};
pub use stalls::{
    attach_cupti, counted_once, CuptiCounts, KernelStalls, PcCount, ReadLog, StallGroup,
    StallOptions, Stalls, StallsRun, StateCount, StepStalls,
};
pub use streams::{model_streams, PassModel};
pub use sweep::{
    sweep_convolutions, sweep_group_norms, NormForm, NormPart, NormSweepRow, SweepRow, SweepVariant,
};
pub use trace::{cupti_present, LargeGap, PassSummary, PassTrace, Span, StepKernelTime, Trace};
pub use unet::CudaUnet;

pub(crate) use sampler::{
    sample as sample_on_device, supports_blur as device_blur_fits, DeviceJob,
};
