//! Runs the UNet graph on a GPU: weights uploaded once, one planned arena per (batch, height,
//! width, mode), the program of each shape captured as CUDA graphs and replayed.
//!
//! Per shape and mode, the first call lowers the graph ([`Program`]), places its buffers
//! ([`plan`]), allocates the arena and captures the forward (and, when recording,
//! the backward) launches as CUDA graphs on the backend's own stream. Every later call at that
//! shape only copies the input in, replays, and copies the result out: no allocation and no
//! synchronisation in between. `INVDIFF_NO_CUDA_GRAPH=1` runs the same launches uncaptured,
//! for debugging. [`CudaUnet::profile`] times the same launches one by one.
//!
//! Recording mode keeps, like the CPU backend, only what the backward pass reads (GroupNorm
//! inputs and statistics, the fused q/k/v and the attention probabilities); the plan's lifetimes
//! span both passes, so the tape lives in the arena between `forward_recording` and `vjp`.
//!
//! `steps` turns each step of a program into its kernel launches (for the captured graphs and
//! the profiler alike); `attention` composes an attention, forward and backward, from them.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaGraph, CudaStream, DevicePtr, DevicePtrMut};

use super::device::{cu, Gpu};
use super::kernels::{at, linear_batch_table, DPtr};
use super::plan::{self, Placement, PlanStats};
use super::precision::Precision;
use super::profile::Profile;
use super::program::{Buf, HalfGrads, KernelConfig, Program, Step, WKind};
use super::stalls::{Sampler, StallOptions, Stalls, StallsBuilder, StallsRun};
use super::streams::{dependencies, streams_wanted, PassSchedule, SideStreams, KEEP_ALIVE};
use super::trace::{Collector, Trace};
use super::weights::{DevBuf, DevWeights, GradLayouts};
use crate::model::{Graph, Model};
use crate::{ensure, switches, Error, Result, Tensor};

mod attention;
mod steps;

pub(crate) use attention::{attention_backward, attention_forward, Attn, AttnKernel};
use steps::{launch, launch_all};

/// One shape and mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    n: usize,
    h: usize,
    w: usize,
    record: bool,
}

/// A captured CUDA graph.
struct Captured(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised, which
// `&mut CudaUnet` guarantees; only its raw handles keep cudarc's type from being Send.
unsafe impl Send for Captured {}

/// Everything one shape needs: its program, the arena and the captured graphs.
struct ShapePlan {
    program: Program,
    placement: Placement,
    arena: DevBuf,
    forward: Option<Captured>,
    backward: Option<Captured>,
    /// With side streams: the forward and the backward pass spread over them.
    lanes: Option<(PassSchedule, PassSchedule)>,
}

impl ShapePlan {
    fn ptr(&self, b: Buf) -> DPtr {
        at(self.arena.ptr, self.placement.offsets[b.0])
    }

    fn range(&self, b: Buf) -> std::ops::Range<usize> {
        let o = self.placement.offsets[b.0];
        o..o + self.program.len(b)
    }

    /// Writes the batched linear layers' tables (their weights' and outputs' addresses) into
    /// the arena, once: the plan pins them for the whole program, so every pass and graph
    /// replay reads them without any copy of its own.
    fn write_tables(&mut self, st: &Arc<CudaStream>, wts: &DevWeights) -> Result<()> {
        for s in &self.program.steps {
            let Step::LinearBatch {
                ref layers, table, ..
            } = *s
            else {
                continue;
            };
            let layers = layers
                .iter()
                .map(|l| Ok((wts.ptr(l.w)?, wts.ptr(l.b)?, self.ptr(l.y), l.out)))
                .collect::<Result<Vec<_>>>()?;
            let words = linear_batch_table(&layers)?;
            let range = self.range(table);
            cu(
                st.memcpy_htod(&words, &mut self.arena.slice.slice_mut(range)),
                "copying a batched linear table to the GPU",
            )?;
        }
        Ok(())
    }
}

/// A UNet2DModel on a CUDA GPU: fp32, or the convolutions' products at a lower [`Precision`].
pub struct CudaUnet {
    gpu: Gpu,
    graph: Graph,
    precision: Precision,
    weights: DevWeights,
    plans: HashMap<Key, ShapePlan>,
    /// Shape of the recorded forward pass whose tape the arena holds, if any.
    tape: Option<(usize, usize, usize)>,
    use_graphs: bool,
    /// Launch every pass's kernels one by one instead of replaying its graph, so that a capture
    /// of the caller's (the device sampler's step) records them: a graph cannot be launched
    /// into a stream that is capturing.
    direct: bool,
    /// The kernels and launch forms the steps take: [`KernelConfig::tuned`], the choices an
    /// H200 timed fastest, unless a switch of src/switches.rs says otherwise (for
    /// comparisons, e.g. `INVDIFF_TC_PIPELINE=two`, `INVDIFF_WGMMA=0`).
    choice: KernelConfig,
    /// Streams beside the main one that independent steps run on (`INVDIFF_STREAMS`, see
    /// src/cuda/streams.rs); one by default.
    side: Option<SideStreams>,
}

// A sampler may build the network on one thread and run it on another.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<CudaUnet>();
};

impl CudaUnet {
    /// Uploads `model` to GPU `ordinal`, fp32. Fails with [`Error::Cuda`] when there is no
    /// driver or no such device, when this build has no kernels, or when they were not built for
    /// the device.
    pub fn new(model: &Model, ordinal: usize) -> Result<Self> {
        Self::with_precision(model, ordinal, Precision::Fp32)
    }

    /// Like [`new`](Self::new), with the convolutions at `precision` (bf16 and fp16 convert
    /// the weights once, here).
    pub fn with_precision(model: &Model, ordinal: usize, precision: Precision) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        let weights = DevWeights::upload(&gpu, &model.graph, &model.weights, precision)?;
        let use_graphs = !switches::is("INVDIFF_NO_CUDA_GRAPH", "1");
        let choice = KernelConfig::from_switches(gpu.kernels.capabilities(), precision);
        let side = match streams_wanted() {
            1 => None,
            n => Some(SideStreams::new(&gpu.ctx, n - 1)?),
        };
        Ok(CudaUnet {
            gpu,
            graph: model.graph.clone(),
            precision,
            weights,
            plans: HashMap::new(),
            tape: None,
            use_graphs,
            direct: false,
            choice,
            side,
        })
    }

    /// The kernel and launch choices in force, in words (`wgmma, one-pass GroupNorm, ...`),
    /// for reports: the switches of the README change the speed, and some the summation order.
    pub fn choices(&self) -> String {
        let side = self.side.as_ref().map(|s| format!("{} streams", s.total()));
        let launches = [
            (!self.use_graphs, "no CUDA graphs".to_string()),
            (side.is_some(), side.unwrap_or_default()),
        ];
        self.choice
            .describe()
            .into_iter()
            .chain(self.gpu.kernels.launch_switches().describe())
            .map(String::from)
            .chain(
                launches
                    .into_iter()
                    .filter_map(|(on, what)| on.then_some(what)),
            )
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether passes are captured as CUDA graphs (not when `INVDIFF_NO_CUDA_GRAPH=1`).
    pub(crate) fn uses_graphs(&self) -> bool {
        self.use_graphs
    }

    /// While `on`, the device-resident passes launch their kernels directly on the stream (see
    /// the `direct` field); the caller captures them into its own graph.
    pub(crate) fn set_direct_launches(&mut self, on: bool) {
        self.direct = on;
    }

    /// Runs `change` on the kernel choices, for comparisons, and drops every plan, which the
    /// new choices may lay out otherwise.
    fn change_choice(&mut self, change: impl FnOnce(&mut KernelConfig)) {
        change(&mut self.choice);
        self.plans.clear();
        self.tape = None;
    }

    /// Chooses the deep tensor-core pipelines (`on`) or the two-stage ones with fp32
    /// intermediates, for comparisons; drops every plan.
    pub(crate) fn set_deep_pipelines(&mut self, on: bool) {
        self.change_choice(|c| c.deep = on);
    }

    /// Plans every launch from one image's shape (`on`), so that an image's results are bit
    /// for bit the same in any batch, or for the whole batch (the default: fewer K splits at
    /// large batches); drops every plan.
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.change_choice(|c| c.batch_invariant = on);
    }

    /// Whether launches are planned per image ([`set_batch_invariant`](Self::set_batch_invariant)).
    pub fn batch_invariant(&self) -> bool {
        self.choice.batch_invariant
    }

    /// Turns the choices that only move values (defaults) on or off together
    /// ([`KernelConfig::half_copy`], [`KernelConfig::fused_half_copies`],
    /// [`KernelConfig::alias_residual_grads`]), for comparisons; drops every plan.
    pub(crate) fn set_moved_values(&mut self, on: bool) {
        self.change_choice(|c| {
            c.half_copy = on;
            c.fused_half_copies = on;
            c.alias_residual_grads = on;
        });
    }

    /// Takes the choices a new network would (the defaults, with the `INVDIFF_*` switches
    /// applied) again, after comparisons; drops every plan.
    pub(crate) fn reset_choices(&mut self) {
        let configured =
            KernelConfig::from_switches(self.gpu.kernels.capabilities(), self.precision);
        self.change_choice(|c| *c = configured);
    }

    /// Has convolutions and concatenations write the partial sums of the GroupNorms that read
    /// their outputs where the program can (`on`, [`KernelConfig::gn_producer_sums`]) or never, for
    /// comparisons; drops every plan.
    pub(crate) fn set_gn_producer_sums(&mut self, on: bool) {
        self.change_choice(|c| c.gn_producer_sums = on);
    }

    /// Stores the concatenations that only 16-bit readers read in 16 bits, in forwards that
    /// record nothing, where the program can (`on`, [`KernelConfig::half_gn_inputs`]) or never,
    /// for comparisons; drops every plan.
    pub(crate) fn set_half_gn_inputs(&mut self, on: bool) {
        self.change_choice(|c| c.half_gn_inputs = on);
    }

    /// With [`set_half_gn_inputs`](Self::set_half_gn_inputs) on: in recording forwards too
    /// (`on`, [`KernelConfig::half_gn_inputs_recording`]) or not, for comparisons; drops every
    /// plan.
    pub(crate) fn set_half_gn_inputs_recording(&mut self, on: bool) {
        self.change_choice(|c| c.half_gn_inputs_recording = on);
    }

    /// Finishes unsplit TMA convolutions through shared memory (`on`,
    /// [`KernelConfig::staged_epilogue`]) or not, and takes the tall tiles where they fill the
    /// machine (`tall`) or not, for comparisons; drops every plan. Keeps every split of K
    /// ([`KernelConfig::staged_unsplit`] off), so that staging changes only the epilogue, not
    /// the order of any sum, and writes no 16-bit outputs from the epilogues
    /// ([`set_epilogue_half_outputs`](Self::set_epilogue_half_outputs), which only staged
    /// epilogues write), so that it changes no other step.
    pub(crate) fn set_staged_epilogue_and_tall(&mut self, on: bool, tall: bool) {
        self.change_choice(|c| {
            c.staged_epilogue = on && c.wgmma;
            c.staged_unsplit = false;
            c.tall_tiles = tall;
            c.concat_from_producers = false;
            c.epilogue_half_copies = false;
            c.half_norm_grads = HalfGrads::Off;
        });
    }

    /// Has launches with staged epilogues write the 16-bit concatenation sides
    /// ([`KernelConfig::concat_from_producers`]) and copies
    /// ([`KernelConfig::epilogue_half_copies`]) of their outputs where they can, or never, for
    /// comparisons; drops every plan. The GroupNorm backward passes then read no 16-bit
    /// gradients ([`KernelConfig::half_norm_grads`], whose copies those epilogues write), so
    /// that the copies change nothing but which launch converts.
    pub(crate) fn set_epilogue_half_outputs(&mut self, sides: bool, copies: bool) {
        self.change_choice(|c| {
            c.concat_from_producers = sides;
            c.epilogue_half_copies = copies;
            c.half_norm_grads = HalfGrads::Off;
        });
    }

    /// Has the GroupNorm backward passes over concatenations write the concatenations' two
    /// gradients where the program can (`on`, [`KernelConfig::concat_grad_split`]) or never,
    /// for comparisons; drops every plan.
    pub(crate) fn set_concat_grad_split(&mut self, on: bool) {
        self.change_choice(|c| c.concat_grad_split = on);
    }

    /// Has the GroupNorm backward passes add the residual gradients just added onto what they
    /// add onto where the program can (`on`, [`KernelConfig::fold_residual_grads`]) or never,
    /// for comparisons; drops every plan.
    pub(crate) fn set_fold_residual_grads(&mut self, on: bool) {
        self.change_choice(|c| c.fold_residual_grads = on);
    }

    /// Fuses each residual block's 1x1 shortcut into its second convolution where the program
    /// can (`on`, [`KernelConfig::shortcut_fused`]) or never, for comparisons; drops every
    /// plan.
    pub(crate) fn set_shortcut_fused(&mut self, on: bool) {
        self.change_choice(|c| c.shortcut_fused = on);
    }

    /// Lets the parity-class launches of one convolution run side by side on the pass's
    /// streams (`on`, [`KernelConfig::class_concurrency`]) or not, for comparisons; drops every
    /// plan.
    pub(crate) fn set_class_concurrency(&mut self, on: bool) {
        self.change_choice(|c| c.class_concurrency = on);
    }

    /// Has the parity-class launches of a stride-2 input gradient write the gradient's 16-bit
    /// copy where every class stages its epilogue (`on`, [`KernelConfig::class_half_copies`])
    /// or a conversion launch make it, for comparisons; drops every plan.
    pub(crate) fn set_class_half_copies(&mut self, on: bool) {
        self.change_choice(|c| c.class_half_copies = on);
    }

    /// Has split launches' reductions write the 16-bit copies of their outputs that replace
    /// conversion launches (`on`, [`KernelConfig::reduce_half_copies`]) or not, for
    /// comparisons; drops every plan.
    pub(crate) fn set_reduce_half_copies(&mut self, on: bool) {
        self.change_choice(|c| c.reduce_half_copies = on);
    }

    /// Has split launches' reductions compute the one-pass GroupNorms of their outputs (`on`,
    /// [`KernelConfig::gn_from_reduction`]) or not, for comparisons; drops every plan.
    pub(crate) fn set_gn_from_reduction(&mut self, on: bool) {
        self.change_choice(|c| c.gn_from_reduction = on);
    }

    /// Runs the convolutions with at most 8 outputs on the tensor cores over 16-bit inputs
    /// (`on`, [`KernelConfig::narrow_mma`]) or on the fp32 direct kernels, for comparisons;
    /// drops every plan.
    pub(crate) fn set_narrow_mma(&mut self, on: bool) {
        self.change_choice(|c| c.narrow_mma = on);
    }

    /// Runs the convolutions with at most 8 inputs on the tensor cores (`on`,
    /// [`KernelConfig::few_in_mma`]) or on the fp32 direct kernels, for comparisons; drops
    /// every plan.
    pub(crate) fn set_few_in_mma(&mut self, on: bool) {
        self.change_choice(|c| c.few_in_mma = on);
    }

    /// Has the GroupNorms of bf16/fp16 programs take the approximate SiLU (`on`,
    /// [`KernelConfig::approx_silu`]) or the accurate one, for comparisons; drops every plan.
    pub(crate) fn set_approx_silu(&mut self, on: bool) {
        self.change_choice(|c| c.approx_silu = on);
    }

    /// Copies the slices of the wgmma launches at an input stride above 1 with the tensor memory
    /// accelerator where the TMA copies are on (`on`, [`KernelConfig::strided_tma`]) or on the
    /// lean loaders, for comparisons; drops every plan. Keeps every split of K
    /// ([`KernelConfig::staged_unsplit`] off), so that the copies change no sum's order.
    pub(crate) fn set_strided_tma(&mut self, on: bool) {
        self.change_choice(|c| {
            c.strided_tma = on && c.wgmma_tma;
            c.staged_unsplit = false;
        });
    }

    /// Folds upsamplings into the convolutions after them where the program can (`on`,
    /// [`KernelConfig::upsample_fold`]) or never, for comparisons; drops every plan.
    pub(crate) fn set_upsample_fold(&mut self, on: bool) {
        self.change_choice(|c| c.upsample_fold = on);
    }

    /// Chooses the wgmma kernel for 16-bit-input launches (`on`, where the device has it) or
    /// mma.sync, for comparisons; drops every plan. Returns whether wgmma is now in use.
    pub(crate) fn set_wgmma(&mut self, on: bool) -> bool {
        let here = self.gpu.kernels.has_wgmma();
        self.change_choice(|c| c.wgmma = on && here);
        self.choice.wgmma
    }

    /// Plans (allocates) the `n x h x w` forward, or recording pass, ahead of a capture that
    /// must not allocate.
    pub(crate) fn prepare(&mut self, n: usize, h: usize, w: usize, record: bool) -> Result<()> {
        self.graph.config.check_input_size(h, w)?;
        ensure!(n > 0, "sample: the batch is empty");
        self.ensure_plan(Key { n, h, w, record })
    }

    /// The graph this network runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The precision of the convolutions.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.gpu.info.name
    }

    /// Steps every buffer stays placed past its last use: with side streams, enough that
    /// neighbouring steps do not reuse each other's memory (see [`plan::plan`]).
    fn keep_alive(&self) -> usize {
        if self.side.is_some() {
            KEEP_ALIVE
        } else {
            0
        }
    }

    /// The stream every launch of this network goes to; device-side callers order their own
    /// work against it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.gpu.stream
    }

    /// The context of [`stream`](Self::stream).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.gpu.ctx
    }

    /// Device bytes taken by the parameters (both convolution layouts once a recording pass
    /// has been planned).
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// The memory plan at a batch of `n` images of `h x w`, forward only or with the
    /// vector-Jacobian product (`recording`); allocates nothing.
    pub fn plan_stats(&self, n: usize, h: usize, w: usize, recording: bool) -> Result<PlanStats> {
        let (p, pl) = self.own_plan(n, h, w, recording)?;
        Ok(plan::stats(&p, &pl))
    }

    /// The program and placement this network would plan at that shape (without keeping
    /// them).
    fn own_plan(
        &self,
        n: usize,
        h: usize,
        w: usize,
        recording: bool,
    ) -> Result<(Program, Placement)> {
        plan::plan(
            &self.graph,
            n,
            h,
            w,
            recording,
            self.gpu.sms(),
            self.precision,
            self.choice,
            self.keep_alive(),
        )
    }

    /// Pairs of steps that the stream schedule of the `n x h x w` program (forward + VJP where
    /// `recording`) must order, their memory conflicting, both passes together: fewer where
    /// more steps may run side by side ([`set_class_concurrency`](Self::set_class_concurrency)).
    pub(crate) fn ordered_pairs(
        &self,
        n: usize,
        h: usize,
        w: usize,
        recording: bool,
    ) -> Result<usize> {
        let (p, pl) = self.own_plan(n, h, w, recording)?;
        let range = |b: Buf| pl.offsets[b.0]..pl.offsets[b.0] + p.len(b);
        let (fwd, bwd) = p.steps.split_at(p.forward_steps);
        let classes = self.choice.class_concurrency;
        Ok([fwd, bwd]
            .into_iter()
            .map(|pass| {
                dependencies(pass, range, classes)
                    .iter()
                    .map(Vec::len)
                    .sum::<usize>()
            })
            .sum())
    }

    /// Frees every planned arena and captured graph (the next call at each shape plans again).
    pub fn release_plans(&mut self) {
        self.plans.clear();
        self.tape = None;
    }

    /// Predicted noise for `sample` (`[N, C, H, W]`) at per-image `timesteps` (length N, or 1
    /// for the whole batch), as [`CpuUnet::forward`](crate::cpu::CpuUnet::forward).
    pub fn forward(&mut self, sample: &Tensor, timesteps: &[f32]) -> Result<Tensor> {
        let (n, h, w, t) = self.check_input(sample, timesteps)?;
        let key = Key {
            n,
            h,
            w,
            record: false,
        };
        self.ensure_plan(key)?;
        self.write_inputs(key, sample.data(), &t)?;
        self.run(key, false)?;
        self.read_output(key, false)
    }

    /// Like [`forward`](Self::forward), and keeps on the device what [`vjp`](Self::vjp) needs
    /// (replacing any earlier tape).
    pub fn forward_recording(&mut self, sample: &Tensor, timesteps: &[f32]) -> Result<Tensor> {
        let (n, h, w, t) = self.check_input(sample, timesteps)?;
        let key = Key {
            n,
            h,
            w,
            record: true,
        };
        self.ensure_plan(key)?;
        self.tape = None;
        self.write_inputs(key, sample.data(), &t)?;
        self.run(key, false)?;
        let eps = self.read_output(key, false)?;
        self.tape = Some((n, h, w));
        Ok(eps)
    }

    /// `d/d sample of sum(eps * cotangent)` for the last [`forward_recording`](Self::forward_recording);
    /// consumes its tape.
    pub fn vjp(&mut self, cotangent: &Tensor) -> Result<Tensor> {
        let key = self.take_tape()?;
        self.graph.check_cotangent(cotangent, key.n, key.h, key.w)?;
        let plan = self.plans.get_mut(&key).expect("a tape implies its plan");
        let slot = plan
            .program
            .cotangent
            .expect("recording plans take a cotangent");
        let range = plan.range(slot);
        cu(
            self.gpu
                .stream
                .memcpy_htod(cotangent.data(), &mut plan.arena.slice.slice_mut(range)),
            "copying the cotangent to the GPU",
        )?;
        self.run(key, true)?;
        self.read_output(key, true)
    }

    /// Device-resident [`forward`](Self::forward): `x` is the sample in NCHW (`n x in_channels x
    /// h x w`), `t` the `n` timesteps, `out` receives eps in NCHW. Everything stays on the GPU and
    /// is ordered on [`stream`](Self::stream); nothing is validated that would need a
    /// synchronisation (values are not checked for NaN).
    pub fn forward_device<X, T, O>(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        x: &X,
        t: &T,
        out: &mut O,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        T: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        let key = Key {
            n,
            h,
            w,
            record: false,
        };
        self.device_pass(key, x, t, out)
    }

    /// Device-resident [`forward_recording`](Self::forward_recording); see
    /// [`forward_device`](Self::forward_device) for the layouts.
    pub fn forward_recording_device<X, T, O>(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        x: &X,
        t: &T,
        out: &mut O,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        T: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        let key = Key {
            n,
            h,
            w,
            record: true,
        };
        self.tape = None;
        self.device_pass(key, x, t, out)?;
        self.tape = Some((n, h, w));
        Ok(())
    }

    /// Device-resident [`vjp`](Self::vjp): `cotangent` and `grad` are NCHW, shaped like the
    /// output and the input of the recorded pass.
    pub fn vjp_device<C, G>(&mut self, cotangent: &C, grad: &mut G) -> Result<()>
    where
        C: DevicePtr<f32>,
        G: DevicePtrMut<f32>,
    {
        let key = self.take_tape()?;
        let cfg = &self.graph.config;
        let (cot_len, grad_len) = (
            key.n * cfg.out_channels * key.h * key.w,
            key.n * cfg.in_channels * key.h * key.w,
        );
        ensure!(
            cotangent.len() == cot_len,
            "cotangent: expected {cot_len} values, got {}",
            cotangent.len()
        );
        ensure!(
            grad.len() == grad_len,
            "gradient: expected room for {grad_len} values, got {}",
            grad.len()
        );
        let st = self.gpu.stream.clone();
        let plan = self.plans.get_mut(&key).expect("a tape implies its plan");
        let slot = plan
            .program
            .cotangent
            .expect("recording plans take a cotangent");
        let range = plan.range(slot);
        cu(
            st.memcpy_dtod(cotangent, &mut plan.arena.slice.slice_mut(range)),
            "copying the cotangent",
        )?;
        self.run(key, true)?;
        let plan = &self.plans[&key];
        let slot = plan
            .program
            .grad_input
            .expect("recording plans produce a gradient");
        cu(
            st.memcpy_dtod(&plan.arena.slice.slice(plan.range(slot)), grad),
            "copying the gradient out",
        )
    }

    /// Mean milliseconds per forward pass of a batch of `n` at `h x w`, data kept on the device,
    /// timed with CUDA events over `iters` replays after warm-up. Drops any pending tape.
    pub fn time_forward(&mut self, n: usize, h: usize, w: usize, iters: usize) -> Result<f64> {
        self.time(
            Key {
                n,
                h,
                w,
                record: false,
            },
            iters,
        )
    }

    /// Mean milliseconds per recording forward pass plus vector-Jacobian product, as
    /// [`time_forward`](Self::time_forward).
    pub fn time_forward_vjp(&mut self, n: usize, h: usize, w: usize, iters: usize) -> Result<f64> {
        self.time(
            Key {
                n,
                h,
                w,
                record: true,
            },
            iters,
        )
    }

    fn time(&mut self, key: Key, iters: usize) -> Result<f64> {
        let key = self.prepare_measuring(
            (key.n, key.h, key.w, key.record),
            iters,
            "timing",
            "iteration",
        )?;
        self.warm_up(key)?;
        let st = self.gpu.stream.clone();
        let start = cu(
            st.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)),
            "recording an event",
        )?;
        for _ in 0..iters {
            self.call(key)?;
        }
        let end = cu(
            st.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)),
            "recording an event",
        )?;
        cu(end.synchronize(), "waiting for the GPU")?;
        let ms = cu(start.elapsed_ms(&end), "reading the timer")?;
        Ok(ms as f64 / iters as f64)
    }

    /// One network call of a measurement: the forward pass and, when `key` records, the
    /// vector-Jacobian product after it.
    fn call(&mut self, key: Key) -> Result<()> {
        self.run(key, false)?;
        if key.record {
            self.run(key, true)?;
        }
        Ok(())
    }

    /// The calls every measurement makes first, so that what it measures finds the plan's
    /// graphs made and the GPU's clocks up.
    fn warm_up(&mut self, key: Key) -> Result<()> {
        for _ in 0..3 {
            self.call(key)?;
        }
        Ok(())
    }

    /// The key of a measurement of `times` calls of a batch of `n` `h x w` images (with `record`,
    /// forward + VJP), checked (`what` names the measurement, `unit` one of its calls) and
    /// prepared ([`prepare_timing`](Self::prepare_timing)).
    fn prepare_measuring(
        &mut self,
        (n, h, w, record): (usize, usize, usize, bool),
        times: usize,
        what: &str,
        unit: &str,
    ) -> Result<Key> {
        self.graph.config.check_input_size(h, w)?;
        ensure!(
            n > 0 && times > 0,
            "{what} needs a batch and at least one {unit}"
        );
        let key = Key { n, h, w, record };
        self.prepare_timing(key)?;
        Ok(key)
    }

    /// Plans `key` (dropping any pending tape) and writes the timing runs' pseudo-random
    /// sample, timesteps and, when recording, cotangent.
    fn prepare_timing(&mut self, key: Key) -> Result<()> {
        self.tape = None;
        self.ensure_plan(key)?;
        let (cin, cout) = (
            self.graph.config.in_channels,
            self.graph.config.out_channels,
        );
        let sample = pseudo_random(key.n * cin * key.h * key.w, 1);
        let t: Vec<f32> = (0..key.n).map(|i| (500 + 37 * i) as f32 % 1000.0).collect();
        self.write_inputs(key, &sample, &t)?;
        if key.record {
            let cot = pseudo_random(key.n * cout * key.h * key.w, 2);
            let plan = self.plans.get_mut(&key).expect("planned above");
            let range = plan.range(plan.program.cotangent.expect("recording plan"));
            cu(
                self.gpu
                    .stream
                    .memcpy_htod(&cot, &mut plan.arena.slice.slice_mut(range)),
                "copying the cotangent",
            )?;
        }
        Ok(())
    }

    /// Per-step GPU times of one network call on a batch of `n` images of `h x w`: the forward
    /// pass, and with `record` the vector-Jacobian product after it, on device-resident
    /// pseudo-random data (as [`time_forward`](Self::time_forward)). Drops any pending tape.
    ///
    /// After warm-up, the passes are first replayed as their CUDA graphs `iters` times, back to
    /// back, between CUDA events ([`Profile::graph_forward_ms`], [`Profile::graph_backward_ms`]:
    /// what [`time_forward`](Self::time_forward) measures). Then, `iters` times after one untimed
    /// iteration, the same steps are launched directly (not captured), with a CUDA event
    /// recorded between consecutive steps; each step's time is the mean over the iterations of
    /// the interval between its two events ([`StepTime`](super::StepTime): kind, label, FLOPs,
    /// ms). The steps go out in chunks of 128, each behind a hold kernel (kernels/timing.cu)
    /// that keeps the stream busy for 20 µs of device time per step (2 to 200 ms) while the host
    /// enqueues the chunk's launches and events, so that the steps then run back to back as in
    /// a graph replay instead of each waiting for the host's launch. A chunk whose hold had
    /// ended before the host finished enqueueing it is counted in [`Profile::late_chunks`] (its
    /// steps' times may include host launch latency) and gets twice the hold from then on.
    ///
    /// Caveat: the steps are separated by event records, not replayed as one graph, so each
    /// step's time includes the gap between consecutive launches on the device (a few µs per
    /// launch without a graph's scheduling, more for steps of several launches); the sum of the
    /// steps therefore exceeds the graph replay's total, by up to a few µs per step, and short
    /// element-wise steps are inflated the most in relative terms. Compare
    /// [`Profile::step_ms`] with [`Profile::graph_ms`] to see how much.
    pub fn profile(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        record: bool,
        iters: usize,
    ) -> Result<Profile> {
        let key = self.prepare_measuring((n, h, w, record), iters, "profiling", "iteration")?;
        let ctx = self.gpu.ctx.clone();
        let st = self.gpu.stream.clone();
        let event = || {
            cu(
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)),
                "creating a CUDA event",
            )
        };
        let elapsed = |a: &CudaEvent, b: &CudaEvent| -> Result<f64> {
            Ok(cu(a.elapsed_ms(b), "reading a CUDA event timer")? as f64)
        };

        // The passes as replayed graphs, after the same warm-up as `time`.
        self.warm_up(key)?;
        let marks = (0..=2 * iters)
            .map(|_| event())
            .collect::<Result<Vec<_>>>()?;
        cu(marks[0].record(&st), "recording an event")?;
        for i in 0..iters {
            self.run(key, false)?;
            cu(marks[2 * i + 1].record(&st), "recording an event")?;
            if record {
                self.run(key, true)?;
            }
            cu(marks[2 * i + 2].record(&st), "recording an event")?;
        }
        cu(marks[2 * iters].synchronize(), "waiting for the GPU")?;
        let (mut graph_fwd, mut graph_bwd) = (0.0, 0.0);
        for i in 0..iters {
            graph_fwd += elapsed(&marks[2 * i], &marks[2 * i + 1])?;
            graph_bwd += elapsed(&marks[2 * i + 1], &marks[2 * i + 2])?;
        }

        // Step by step, launched directly, in chunks each behind its own hold.
        let (gpu, weights, plan) = (&self.gpu, &self.weights, &self.plans[&key]);
        let steps = &plan.program.steps;
        let chunks: Vec<std::ops::Range<usize>> = (0..steps.len())
            .step_by(PROFILE_CHUNK)
            .map(|a| a..(a + PROFILE_CHUNK).min(steps.len()))
            .collect();
        // ends[i] after step i; starts[c] after chunk c's hold, before its first step.
        let ends = (0..steps.len())
            .map(|_| event())
            .collect::<Result<Vec<_>>>()?;
        let starts = (0..chunks.len())
            .map(|_| event())
            .collect::<Result<Vec<_>>>()?;
        let before_hold = (0..chunks.len())
            .map(|_| event())
            .collect::<Result<Vec<_>>>()?;
        let mut hold_ns: Vec<u64> = chunks
            .iter()
            .map(|c| (HOLD_NS_PER_STEP * c.len() as u64).clamp(HOLD_MIN_NS, HOLD_MAX_NS))
            .collect();
        let mut sums = vec![0f64; steps.len()];
        let (mut hold_asked, mut hold_took, mut late) = (0.0, 0.0, 0);
        for it in 0..=iters {
            let mut in_time = vec![true; chunks.len()];
            for (c, range) in chunks.iter().enumerate() {
                cu(before_hold[c].record(&st), "recording an event")?;
                gpu.kernels.hold(&st, hold_ns[c])?;
                cu(starts[c].record(&st), "recording an event")?;
                for i in range.clone() {
                    launch(&gpu.kernels, &st, weights, plan, &steps[i])?;
                    cu(ends[i].record(&st), "recording an event")?;
                }
                // Still holding once the chunk is enqueued: its steps run back to back.
                in_time[c] = !cu(starts[c].try_is_complete(), "querying a CUDA event")?;
            }
            cu(st.synchronize(), "waiting for the GPU")?;
            for (c, range) in chunks.iter().enumerate() {
                if it > 0 {
                    hold_asked += hold_ns[c] as f64 * 1e-6;
                    hold_took += elapsed(&before_hold[c], &starts[c])?;
                    for i in range.clone() {
                        let from = if i == range.start {
                            &starts[c]
                        } else {
                            &ends[i - 1]
                        };
                        sums[i] += elapsed(from, &ends[i])?;
                    }
                    late += usize::from(!in_time[c]);
                }
                if !in_time[c] {
                    hold_ns[c] = (2 * hold_ns[c]).min(HOLD_MAX_NS);
                }
            }
        }
        let per = |v: f64| v / iters as f64;
        let means: Vec<f64> = sums.into_iter().map(per).collect();
        let steps = plan.program.timed_steps(&means);
        Ok(Profile {
            device: gpu.info.name.clone(),
            precision: self.precision.name().to_string(),
            n,
            h,
            w,
            record,
            iters,
            steps,
            graph_forward_ms: per(graph_fwd),
            graph_backward_ms: record.then(|| per(graph_bwd)),
            graphs: self.use_graphs && !self.direct,
            hold_ms: per(hold_asked),
            hold_measured_ms: per(hold_took),
            late_chunks: late,
        })
    }

    /// Kernel timelines of `replays` graph replays of one network call on a batch of `n` images
    /// of `h x w` (the forward pass, and with `record` the vector-Jacobian product after it), as
    /// CUPTI records them (see [`Trace`]). Drops any pending tape.
    ///
    /// Under CUPTI: one iteration launched directly (to learn which kernel each launch runs),
    /// then the passes' graphs captured and instantiated again (so that CUPTI numbers their
    /// nodes as they are made), two warm-up replays, and the `replays` traced ones, back to
    /// back. The graphs made under CUPTI are dropped after, so later calls capture their own.
    pub fn trace(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        record: bool,
        replays: usize,
    ) -> Result<Trace> {
        ensure!(
            self.use_graphs,
            "--trace records graph replays, and CUDA graphs are off (INVDIFF_NO_CUDA_GRAPH=1)"
        );
        ensure!(
            !self.direct,
            "tracing needs the network's own graphs, and its launches are being captured into \
             another graph"
        );
        let key = self.prepare_measuring((n, h, w, record), replays, "tracing", "replay")?;
        let collector = Collector::start()?;
        let sync = |unet: &Self| cu(unet.gpu.stream.synchronize(), "waiting for the GPU");
        let ctx = self.gpu.ctx.cu_ctx();

        self.direct = true;
        let direct = self.call(key);
        self.direct = false;
        direct?;
        sync(self)?;
        let direct = collector.take(ctx)?;

        let plan = self.plans.get_mut(&key).expect("planned above");
        (plan.forward, plan.backward) = (None, None);
        for _ in 0..2 {
            self.call(key)?;
        }
        sync(self)?;
        collector.take(ctx)?;
        for _ in 0..replays {
            self.call(key)?;
        }
        sync(self)?;
        let replayed = collector.take(ctx)?;
        drop(collector);
        let plan = self.plans.get_mut(&key).expect("planned above");
        (plan.forward, plan.backward) = (None, None);

        let program = &plan.program;
        let names: &[&'static str] = if record {
            &["forward (recording)", "backward"]
        } else {
            &["forward"]
        };
        let steps = program.step_infos();
        let (passes, unmatched) = Trace::from_records(
            &steps,
            program.forward_steps,
            names,
            direct,
            replayed,
            replays,
        )?;
        Ok(Trace {
            device: self.gpu.info.name.clone(),
            precision: self.precision.name().to_string(),
            n,
            h,
            w,
            passes,
            unmatched,
            steps,
        })
    }

    /// Where the warps of each step of one network call wait, from CUPTI's PC sampling (see
    /// [`Stalls`]): a batch of `n` images of `h x w`, the forward pass and with `record` the
    /// vector-Jacobian product after it, every step launched directly and sampled on its own as
    /// `options` say; `progress(done, of)` after each step. Drops any pending tape. Attach CUPTI
    /// before the engine loads its kernels ([`attach_cupti`](super::attach_cupti)), so that it
    /// sees their modules load.
    pub fn stalls(
        &mut self,
        (n, h, w): (usize, usize, usize),
        record: bool,
        options: StallOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Stalls> {
        let key =
            self.prepare_measuring((n, h, w, record), options.iters, "sampling", "iteration")?;
        self.warm_up(key)?;
        // CUPTI starts sampling on an idle GPU; each step's range then ends with it idle.
        cu(self.gpu.ctx.synchronize(), "waiting for the GPU")?;
        let mut sampler = Sampler::start(self.gpu.ctx.cu_ctx(), options.period_log2)?;
        let st = self.gpu.stream.clone();
        let (gpu, weights, plan) = (&self.gpu, &self.weights, &self.plans[&key]);
        let steps = &plan.program.steps;
        let mut report = StallsBuilder::new(sampler.states.clone(), steps.len());
        let of = options.iters * steps.len();
        let t0 = std::time::Instant::now();
        'sampling: for it in 0..options.iters {
            for (i, step) in steps.iter().enumerate() {
                if options
                    .seconds
                    .is_some_and(|s| t0.elapsed().as_secs_f64() > s)
                {
                    break 'sampling;
                }
                let got = sampler.range(|| {
                    launch(&gpu.kernels, &st, weights, plan, step)?;
                    cu(st.synchronize(), "waiting for the GPU")
                })?;
                report.add(i, got);
                progress(it * steps.len() + i + 1, of);
                // Every step runs its kernels for thousands of cycles: none sampled means that
                // sampling does not work here, and the rest would take its time for nothing.
                if it == 0 && i + 1 == STALLS_CHECK_AFTER.min(steps.len()) {
                    let c = report.cupti();
                    ensure!(
                        report.samples() > 0,
                        "CUPTI's PC sampling gave no instruction samples for the first {} steps \
                         (its own counts: {} samples, {} of them in kernels it does not report, \
                         {} dropped)",
                        i + 1,
                        c.total,
                        c.non_user,
                        c.dropped
                    );
                }
            }
        }
        let reads = sampler.take_log();
        drop(sampler);
        let run = StallsRun {
            device: gpu.info.name.clone(),
            precision: self.precision.name().to_string(),
            n,
            h,
            w,
            record,
            options,
        };
        Ok(report.finish(
            &plan.program.step_infos(),
            plan.program.forward_steps,
            run,
            reads,
            of,
        ))
    }

    fn take_tape(&mut self) -> Result<Key> {
        let (n, h, w) = self.tape.take().ok_or_else(|| {
            Error::input(
                "vjp: no recorded forward pass to differentiate (call forward_recording first)",
            )
        })?;
        Ok(Key {
            n,
            h,
            w,
            record: true,
        })
    }

    /// The input checks every backend makes; returns the shape and one timestep per image.
    fn check_input(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
    ) -> Result<(usize, usize, usize, Vec<f32>)> {
        let ([n, _, h, w], t) = self.graph.check_input(sample, timesteps)?;
        Ok((n, h, w, t))
    }

    /// Plans `key` if it is new: the only place that allocates activations.
    fn ensure_plan(&mut self, key: Key) -> Result<()> {
        if self.plans.contains_key(&key) {
            return Ok(());
        }
        // The input-gradient layout: for the backward pass, and (its 16-bit copy alone) as
        // the K-major weights of forward wgmma launches.
        let layouts = GradLayouts::of(key.record, self.choice.wgmma && self.precision.is_half());
        self.weights.ensure_backward(&self.gpu, layouts)?;
        let (program, placement) = plan::plan(
            &self.graph,
            key.n,
            key.h,
            key.w,
            key.record,
            self.gpu.sms(),
            self.precision,
            self.choice,
            self.keep_alive(),
        )?;
        for s in &program.steps {
            if let Step::Conv(c) = s {
                if let Some(f) = c.shortcut {
                    self.weights
                        .ensure_bias_with_shortcut(&self.gpu, c.w.pid, f.w.pid)?;
                    self.weights.conv_ptr(f.w, &c.launch)?;
                }
            }
            for w in s.weights() {
                if matches!(w.kind, WKind::FoldForward | WKind::FoldBackward) {
                    self.weights.ensure_folded(&self.gpu, w.pid, layouts)?;
                }
                self.weights.ptr(w)?;
            }
            if let Step::Conv(c) = s {
                self.weights.conv_ptr(c.w, &c.launch)?;
            }
        }
        let arena = DevBuf::zeros(&self.gpu.stream, placement.len)?;
        let lanes = match &self.side {
            Some(side) => {
                let range = |b: Buf| {
                    let o = placement.offsets[b.0];
                    o..o + program.len(b)
                };
                let (fwd, bwd) = program.steps.split_at(program.forward_steps);
                let classes = self.choice.class_concurrency;
                let pass =
                    |steps| PassSchedule::new(&self.gpu.ctx, steps, range, side.total(), classes);
                Some((pass(fwd)?, pass(bwd)?))
            }
            None => None,
        };
        let mut plan = ShapePlan {
            program,
            placement,
            arena,
            forward: None,
            backward: None,
            lanes,
        };
        plan.write_tables(&self.gpu.stream, &self.weights)?;
        self.plans.insert(key, plan);
        Ok(())
    }

    fn write_inputs(&mut self, key: Key, sample: &[f32], t: &[f32]) -> Result<()> {
        let plan = self.plans.get_mut(&key).expect("planned before use");
        let st = &self.gpu.stream;
        let (rs, rt) = (
            plan.range(plan.program.sample),
            plan.range(plan.program.timesteps),
        );
        cu(
            st.memcpy_htod(sample, &mut plan.arena.slice.slice_mut(rs)),
            "copying the sample to the GPU",
        )?;
        cu(
            st.memcpy_htod(t, &mut plan.arena.slice.slice_mut(rt)),
            "copying the timesteps to the GPU",
        )
    }

    /// The output (or, after the backward pass, the input gradient) as an NCHW tensor.
    fn read_output(&self, key: Key, gradient: bool) -> Result<Tensor> {
        let plan = &self.plans[&key];
        let cfg = &self.graph.config;
        let (slot, c) = if gradient {
            (
                plan.program.grad_input.expect("recording plan"),
                cfg.in_channels,
            )
        } else {
            (plan.program.output, cfg.out_channels)
        };
        let st = &self.gpu.stream;
        let data = cu(
            st.clone_dtoh(&plan.arena.slice.slice(plan.range(slot))),
            "copying the result from the GPU",
        )?;
        cu(st.synchronize(), "running on the GPU")?;
        Tensor::new(vec![key.n, c, key.h, key.w], data)
    }

    fn device_pass<X, T, O>(&mut self, key: Key, x: &X, t: &T, out: &mut O) -> Result<()>
    where
        X: DevicePtr<f32>,
        T: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        let cfg = &self.graph.config;
        cfg.check_input_size(key.h, key.w)?;
        ensure!(key.n > 0, "sample: the batch is empty");
        let (x_len, y_len) = (
            key.n * cfg.in_channels * key.h * key.w,
            key.n * cfg.out_channels * key.h * key.w,
        );
        ensure!(
            x.len() == x_len,
            "sample: expected {x_len} values, got {}",
            x.len()
        );
        ensure!(
            t.len() == key.n,
            "timesteps: expected {} values, got {}",
            key.n,
            t.len()
        );
        ensure!(
            out.len() == y_len,
            "output: expected room for {y_len} values, got {}",
            out.len()
        );
        self.ensure_plan(key)?;
        let st = self.gpu.stream.clone();
        let plan = self.plans.get_mut(&key).expect("planned above");
        let (rs, rt) = (
            plan.range(plan.program.sample),
            plan.range(plan.program.timesteps),
        );
        cu(
            st.memcpy_dtod(x, &mut plan.arena.slice.slice_mut(rs)),
            "copying the sample",
        )?;
        cu(
            st.memcpy_dtod(t, &mut plan.arena.slice.slice_mut(rt)),
            "copying the timesteps",
        )?;
        self.run(key, false)?;
        let plan = &self.plans[&key];
        cu(
            st.memcpy_dtod(
                &plan.arena.slice.slice(plan.range(plan.program.output)),
                out,
            ),
            "copying the output",
        )
    }

    /// Runs the forward or the backward steps of `key`: replays its graph (capturing it the
    /// first time), or launches the steps directly when graphs are off.
    fn run(&mut self, key: Key, backward: bool) -> Result<()> {
        let Self {
            gpu,
            weights,
            plans,
            use_graphs,
            direct,
            side,
            ..
        } = self;
        let plan = plans.get_mut(&key).expect("planned before use");
        let steps = if backward {
            &plan.program.steps[plan.program.forward_steps..]
        } else {
            &plan.program.steps[..plan.program.forward_steps]
        };
        let st = &gpu.stream;
        let lanes = side
            .as_ref()
            .zip(plan.lanes.as_ref())
            .map(|(side, (f, b))| (side, if backward { b } else { f }));
        if !*use_graphs || *direct {
            return launch_all(&gpu.kernels, st, weights, plan, steps, lanes);
        }
        let captured = if backward {
            &plan.backward
        } else {
            &plan.forward
        };
        if captured.is_none() {
            cu(
                st.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                "starting a CUDA graph capture",
            )?;
            let launched = launch_all(&gpu.kernels, st, weights, plan, steps, lanes);
            let graph = st.end_capture(sys::CUgraphInstantiate_flags(0));
            launched?;
            let graph = cu(graph, "capturing the CUDA graph")?
                .ok_or_else(|| Error::Cuda("capturing the CUDA graph produced no graph".into()))?;
            let slot = if backward {
                &mut plan.backward
            } else {
                &mut plan.forward
            };
            *slot = Some(Captured(graph));
        }
        let captured = if backward {
            &plan.backward
        } else {
            &plan.forward
        };
        let graph = captured.as_ref().expect("captured above");
        cu(graph.0.launch(), "launching the CUDA graph")
    }
}

/// Steps a profiled iteration launches behind one hold kernel: few enough that their launches
/// and events (~3.5 commands per step) stay well inside a stream's queue of pending work, which
/// would otherwise block the host until the GPU drains it.
const PROFILE_CHUNK: usize = 128;

/// Device time a hold waits per step of its chunk, and its bounds.
const HOLD_NS_PER_STEP: u64 = 20_000;

const HOLD_MIN_NS: u64 = 2_000_000;

const HOLD_MAX_NS: u64 = 200_000_000;

/// Steps [`CudaUnet::stalls`] samples before it gives up on a sampler that returns nothing.
const STALLS_CHECK_AFTER: usize = 16;

/// Deterministic values in [-1, 1) for timing runs.
fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
    crate::rng::uniform_lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, len, -1.0, 1.0)
}
