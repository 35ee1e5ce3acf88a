//! Whole networks against the CPU executor: small random-weight models and the celebahq
//! architecture, in fp32 and each tensor-core precision, and batch invariance.

use super::{Tester, TENSOR_CORE, TOLERANCE};
use crate::cpu::CpuUnet;
use crate::cuda::device::cu;
use crate::cuda::precision::Precision;
use crate::cuda::profile::StepTime;
use crate::cuda::unet::CudaUnet;
use crate::model::Model;
use crate::{Error, Result, Tensor};

/// The celebahq checks of a staged candidate: (batch, height, width, timesteps) at 64x64 x 2,
/// where every level runs, and at the full 256x256 x 1, where the accuracy targets apply.
pub(crate) fn celebahq_candidate_cases() -> [(usize, usize, usize, Vec<f32>); 2] {
    [(2, 64, 64, vec![10.0, 900.0]), (1, 256, 256, vec![500.0])]
}

/// The CPU's fp32 noise prediction for `sample` at timesteps `t`, and its VJP with `cot`: what
/// the network checks hold the GPU to.
pub(super) fn cpu_reference(
    model: &Model,
    sample: &Tensor,
    t: &[f32],
    cot: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cpu = CpuUnet::new(model);
    let (want, tape) = cpu.forward_recording(sample, t)?;
    let want_grad = cpu.vjp(tape, cot)?;
    Ok((want, want_grad))
}

/// One network of the staged candidates' checks: a [`celebahq_candidate_cases`] case's random
/// sample and cotangent, and (where asked) the CPU's eps and VJP for them ([`cpu_reference`]).
pub(super) struct CandidateNetwork {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub desc: String,
    pub sample: Tensor,
    pub t: Vec<f32>,
    pub cot: Tensor,
    pub want: Option<(Tensor, Tensor)>,
}

impl CandidateNetwork {
    pub fn io(&self) -> NetworkIo<'_> {
        NetworkIo {
            desc: &self.desc,
            sample: &self.sample,
            t: &self.t,
            cot: &self.cot,
        }
    }

    /// The CPU's eps and VJP as slices; empty where they were not asked for.
    pub fn want(&self) -> (&[f32], &[f32]) {
        self.want
            .as_ref()
            .map_or((&[], &[]), |(eps, grad)| (eps.data(), grad.data()))
    }
}

/// Whole networks below fp32: eps and the input gradient (which goes through the network twice).
pub(super) const NETWORK_TOLERANCE: (f64, f64) = (1e-2, 2e-2);

/// One network check's input: its description, sample, timesteps and cotangent.
pub(super) struct NetworkIo<'a> {
    pub desc: &'a str,
    pub sample: &'a Tensor,
    pub t: &'a [f32],
    pub cot: &'a Tensor,
}

/// What [`Tester::fewer_row`] counts in a network's program: its name in the row, and how
/// `gpu` counts it for the network (a forward + VJP where the flag says so, else a forward).
pub(super) type Count = (
    &'static str,
    fn(&CudaUnet, &CandidateNetwork, bool) -> Result<usize>,
);

/// Kernel launches.
pub(super) const LAUNCHES: Count = ("launches", |gpu, net, record| {
    Ok(gpu.plan_stats(net.n, net.h, net.w, record)?.launches)
});

/// Pairs of steps the stream schedule orders ([`CudaUnet::ordered_pairs`]).
pub(super) const ORDERED_PAIRS: Count = ("ordered step pairs", |gpu, net, record| {
    gpu.ordered_pairs(net.n, net.h, net.w, record)
});

impl Tester<'_> {
    /// The celebahq architecture (random weights) and the networks of its
    /// [`celebahq_candidate_cases`], each with (`cpu`) the CPU's results.
    pub(super) fn candidate_networks(
        &mut self,
        cpu: bool,
    ) -> Result<(Model, Vec<CandidateNetwork>)> {
        let model = Model::builtin_celebahq(11);
        let mut out = Vec::new();
        for (n, h, w, t) in celebahq_candidate_cases() {
            let (sample, cot) = self.random_io(&model, n, h, w)?;
            let want = match cpu {
                true => Some(cpu_reference(&model, &sample, &t, &cot)?),
                false => None,
            };
            out.push(CandidateNetwork {
                n,
                h,
                w,
                desc: format!("celebahq n{n} {h}x{w}"),
                sample,
                t,
                cot,
                want,
            });
        }
        Ok((model, out))
    }

    /// Runs `check` on each of the candidates' celebahq networks
    /// ([`Self::candidate_networks`], with the CPU's results where `cpu`) in bf16 and fp16,
    /// each time on a new [`CudaUnet`] as configured, where the device has wgmma (which every
    /// staged candidate's kernels are).
    pub(super) fn for_candidate_networks(
        &mut self,
        ordinal: usize,
        cpu: bool,
        mut check: impl FnMut(&mut Self, &CandidateNetwork, Precision, &mut CudaUnet) -> Result<()>,
    ) -> Result<()> {
        if !self.gpu.kernels.has_wgmma() {
            return Ok(());
        }
        let (model, networks) = self.candidate_networks(cpu)?;
        for net in &networks {
            for precision in [Precision::Bf16, Precision::Fp16] {
                let mut gpu = CudaUnet::with_precision(&model, ordinal, precision)?;
                check(self, net, precision, &mut gpu)?;
            }
        }
        Ok(())
    }

    /// `gpu`'s forward and forward + VJP of `net` as configured against the CPU's results
    /// within [`NETWORK_TOLERANCE`], in rows named "`label` forward, `what`" and "`label`
    /// forward + vjp, `what`".
    pub(super) fn cpu_network_rows(
        &mut self,
        gpu: &mut CudaUnet,
        net: &CandidateNetwork,
        label: &str,
        what: &str,
    ) -> Result<()> {
        self.network_rows(
            gpu,
            &net.io(),
            [
                format!("{label} forward, {what}"),
                format!("{label} forward + vjp, {what}"),
            ],
            net.want(),
            NETWORK_TOLERANCE,
        )?;
        Ok(())
    }

    /// A row showing that `set(gpu, true)` plans `net` with fewer of what `count` counts (in
    /// a forward + VJP where `record`, else a forward) than `set(gpu, false)`: that the
    /// candidate the rows after it check is in the program. Leaves the candidate on.
    pub(super) fn fewer_row(
        &mut self,
        gpu: &mut CudaUnet,
        net: &CandidateNetwork,
        record: bool,
        op: &str,
        set: fn(&mut CudaUnet, bool),
        count: Count,
    ) -> Result<()> {
        let mut counted = |on: bool| -> Result<usize> {
            set(gpu, on);
            (count.1)(gpu, net, record)
        };
        let (without, with) = (counted(false)?, counted(true)?);
        self.check_row(
            format!("{op}: {} {with}, {without} without", count.0),
            net.desc.clone(),
            with < without,
        );
        Ok(())
    }

    /// For each candidate network ([`Self::for_candidate_networks`]), as configured but for
    /// the choice `set` turns on or off: a DPS step with fewer of what `count` counts with it
    /// (`op` names it), and its forward + VJP the same to the bit as without.
    pub(super) fn same_bits_choice_unets(
        &mut self,
        ordinal: usize,
        op: &str,
        set: fn(&mut CudaUnet, bool),
        count: Count,
    ) -> Result<()> {
        self.for_candidate_networks(ordinal, false, |t, net, precision, gpu| {
            t.same_bits_choice_rows(gpu, net, precision, op, set, count)
        })
    }

    /// [`Self::same_bits_choice_unets`]'s rows for one network on `gpu`, in `precision`.
    pub(super) fn same_bits_choice_rows(
        &mut self,
        gpu: &mut CudaUnet,
        net: &CandidateNetwork,
        precision: Precision,
        op: &str,
        set: fn(&mut CudaUnet, bool),
        count: Count,
    ) -> Result<()> {
        set(gpu, false);
        let want = Self::network_outputs(gpu, net)?;
        let op = format!("celebahq {precision} forward + vjp, {op}");
        self.fewer_row(gpu, net, true, &op, set, count)?;
        let (eps, grad) = Self::network_outputs(gpu, net)?;
        let ms = gpu.time_forward_vjp(net.n, net.h, net.w, 5)?;
        for (what, got, want) in [("eps", &eps, &want.0), ("vjp", &grad, &want.1)] {
            self.row_within(
                format!("{op}, {what} vs without"),
                net.desc.clone(),
                got.data(),
                want.data(),
                ms,
                0.0,
            );
        }
        Ok(())
    }

    /// `gpu`'s eps and VJP of `net` as configured now, for rows that hold other
    /// configurations to them bit for bit ([`Self::same_network_rows`]).
    pub(super) fn network_outputs(
        gpu: &mut CudaUnet,
        net: &CandidateNetwork,
    ) -> Result<(Tensor, Tensor)> {
        let eps = gpu.forward(&net.sample, &net.t)?;
        gpu.forward_recording(&net.sample, &net.t)?;
        Ok((eps, gpu.vjp(&net.cot)?))
    }

    /// A row showing that `gpu`'s forward + VJP program for `net` has a step `has` names and
    /// finds (the choice the rows after it check is in it: with the shortcuts fused and every
    /// split of K kept, the staged epilogues at 64x64 x 2 are in the VJP only), then rows
    /// holding its forward and forward + VJP to `want` bit for bit, each with its time.
    pub(super) fn same_network_rows(
        &mut self,
        gpu: &mut CudaUnet,
        net: &CandidateNetwork,
        op: &str,
        has: (&str, &dyn Fn(&StepTime) -> bool),
        want: &(Tensor, Tensor),
    ) -> Result<()> {
        let (n, h, w, desc) = (net.n, net.h, net.w, &net.desc);
        let profile = gpu.profile(n, h, w, true, 1)?;
        let launches = gpu.plan_stats(n, h, w, true)?.launches;
        self.check_row(
            format!("{op}: the forward + VJP program has {}", has.0),
            format!("{desc}, {launches} launches"),
            profile.steps.iter().any(has.1),
        );
        let (eps, grad) = Self::network_outputs(gpu, net)?;
        let ms = gpu.time_forward(n, h, w, 5)?;
        let ms_vjp = gpu.time_forward_vjp(n, h, w, 5)?;
        for (what, got, want, ms) in [
            ("forward", &eps, &want.0, ms),
            ("forward + vjp", &grad, &want.1, ms_vjp),
        ] {
            self.row_within(
                format!("{op}, {what} vs without"),
                desc.clone(),
                got.data(),
                want.data(),
                ms,
                0.0,
            );
        }
        Ok(())
    }

    /// For each candidate network ([`Self::for_candidate_networks`]), as configured but for
    /// the choice `set` turns on or off, named `op`: where the program with it has a step
    /// `has` finds (`what`, in words), [`Self::same_network_rows`] against the network without
    /// it. Where none has one (the choice needs others that the switches turned off, or the device's
    /// multiprocessors split its launches otherwise), a "not checked" row says so: the program
    /// tests hold where it applies on 132 multiprocessors with the defaults.
    pub(super) fn same_bits_where_present(
        &mut self,
        ordinal: usize,
        op: &str,
        set: fn(&mut CudaUnet, bool),
        what: &str,
        has: impl Fn(&StepTime) -> bool,
    ) -> Result<()> {
        let has = (what, &has as &dyn Fn(&StepTime) -> bool);
        let mut found = Vec::new();
        self.for_candidate_networks(ordinal, false, |t, net, precision, gpu| {
            set(gpu, true);
            let profile = gpu.profile(net.n, net.h, net.w, true, 1)?;
            if !profile.steps.iter().any(has.1) {
                return Ok(());
            }
            found.push(format!("{precision} {}", net.desc));
            set(gpu, false);
            let want = Self::network_outputs(gpu, net)?;
            set(gpu, true);
            t.same_network_rows(gpu, net, &format!("celebahq {precision}, {op}"), has, &want)
        })?;
        if self.gpu.kernels.has_wgmma() && found.is_empty() {
            let why = format!(
                "not checked: no network's program has {} as configured",
                has.0
            );
            self.check_row(format!("celebahq forward + vjp, {op}"), why, true);
        }
        Ok(())
    }

    pub(super) fn unets(&mut self, ordinal: usize) -> Result<()> {
        for (model, n, h, w, t) in [
            (Model::tiny(false), 2, 24, 40, vec![10.0, 900.0]),
            (Model::tiny(true), 3, 20, 12, vec![0.0, 500.0, 999.0]),
        ] {
            let cfg = model.config().clone();
            let name = if cfg.center_input_sample {
                "unet B"
            } else {
                "unet A"
            };
            let desc = format!("n{n} {h}x{w} {:?}", cfg.block_out_channels);
            let (sample, cot) = self.random_io(&model, n, h, w)?;
            let cpu = CpuUnet::new(&model);
            let want = cpu.forward(&sample, &t)?;
            let (_, tape) = cpu.forward_recording(&sample, &t)?;
            let want_grad = cpu.vjp(tape, &cot)?;

            let mut gpu = CudaUnet::new(&model, ordinal)?;
            let got = gpu.forward(&sample, &t)?;
            let again = gpu.forward(&sample, &t)?;
            let ms = gpu.time_forward(n, h, w, 5)?;
            self.row(
                format!("{name} forward"),
                desc.clone(),
                got.data(),
                want.data(),
                ms,
            );
            self.row(
                format!("{name} forward replay = first"),
                desc.clone(),
                again.data(),
                got.data(),
                ms,
            );

            let eps = gpu.forward_recording(&sample, &t)?;
            let grad = gpu.vjp(&cot)?;
            let ms = gpu.time_forward_vjp(n, h, w, 5)?;
            self.row(
                format!("{name} recording forward"),
                desc.clone(),
                eps.data(),
                want.data(),
                ms,
            );
            self.row(
                format!("{name} forward + vjp"),
                desc.clone(),
                grad.data(),
                want_grad.data(),
                ms,
            );

            let st = gpu.stream().clone();
            let xd = cu(st.clone_htod(sample.data()), "uploading")?;
            let td = cu(st.clone_htod(&t), "uploading")?;
            let mut od = cu(st.alloc_zeros::<f32>(want.numel()), "allocating")?;
            gpu.forward_device(n, h, w, &xd, &td, &mut od)?;
            let dev_out = cu(st.clone_dtoh(&od), "downloading")?;
            gpu.forward_recording_device(n, h, w, &xd, &td, &mut od)?;
            let cd = cu(st.clone_htod(cot.data()), "uploading")?;
            let mut gd = cu(st.alloc_zeros::<f32>(sample.numel()), "allocating")?;
            gpu.vjp_device(&cd, &mut gd)?;
            let dev_grad = cu(st.clone_dtoh(&gd), "downloading")?;
            cu(st.synchronize(), "running on the GPU")?;
            self.row(
                format!("{name} forward_device"),
                desc.clone(),
                &dev_out,
                want.data(),
                0.0,
            );
            self.row(
                format!("{name} vjp_device"),
                desc,
                &dev_grad,
                want_grad.data(),
                0.0,
            );
        }
        Ok(())
    }
    /// The small networks and the celebahq architecture (random weights; 64x64 at batch 2,
    /// where every level down to 2x2 and both attention blocks run, and the full 256x256 at
    /// batch 1) at each tensor-core precision, eps and input gradient against the fp32 CPU
    /// results.
    pub(super) fn tensor_core_unets(&mut self, ordinal: usize) -> Result<()> {
        for (name, model, n, h, w, t) in [
            ("unet A", Model::tiny(false), 2, 24, 40, vec![10.0, 900.0]),
            (
                "unet B",
                Model::tiny(true),
                3,
                20,
                12,
                vec![0.0, 500.0, 999.0],
            ),
            (
                "celebahq",
                Model::builtin_celebahq(11),
                2,
                64,
                64,
                vec![10.0, 900.0],
            ),
            // Full size at batch 1: the accuracy targets (bf16 eps within 1e-2, VJP within 2e-2
            // of fp32) are for full-size images, which the 64x64 rows cannot show.
            (
                "celebahq",
                Model::builtin_celebahq(11),
                1,
                256,
                256,
                vec![500.0],
            ),
        ] {
            let desc = format!("n{n} {h}x{w} {:?}", model.config().block_out_channels);
            let (sample, cot) = self.random_io(&model, n, h, w)?;
            let (want, want_grad) = cpu_reference(&model, &sample, &t, &cot)?;
            let (eps_tol, grad_tol) = NETWORK_TOLERANCE;
            let io = NetworkIo {
                desc: &desc,
                sample: &sample,
                t: &t,
                cot: &cot,
            };
            for precision in TENSOR_CORE {
                let mut gpu = CudaUnet::with_precision(&model, ordinal, precision)?;
                let label = format!("{name} {precision}");
                // Whatever INVDIFF_TC_PIPELINE, INVDIFF_WGMMA, INVDIFF_HALF_COPY(_FUSED),
                // INVDIFF_ALIAS_GRADS, INVDIFF_UPSAMPLE_FOLD, INVDIFF_GN_PRODUCER_SUMS,
                // INVDIFF_GN_HALF_INPUT(_RECORDING) and INVDIFF_SHORTCUT_FUSED say: the rows
                // below compare each choice, and the last the network as configured (the fused
                // shortcuts are checked in a group of their own, fused_shortcut.rs). (The fold and the 16-bit concatenations take the
                // deep pipelines, so the two-stage rows could not match a program with either.)
                gpu.set_deep_pipelines(true);
                gpu.set_wgmma(false);
                gpu.set_moved_values(false);
                gpu.set_upsample_fold(false);
                gpu.set_gn_producer_sums(false);
                gpu.set_half_gn_inputs(false);
                gpu.set_half_gn_inputs_recording(false);
                gpu.set_shortcut_fused(false);
                let (got, grad) = self.network_rows(
                    &mut gpu,
                    &io,
                    [format!("{label} forward"), format!("{label} forward + vjp")],
                    (want.data(), want_grad.data()),
                    (eps_tol, grad_tol),
                )?;
                // The deep pipelines and 16-bit intermediates change no result
                // (Program::build_with): the two-stage kernels with fp32 intermediates. Not
                // held to 0 like the single convolutions: the 16-bit GroupNorm kernels share
                // their per-element code with the fp32 ones, but are separate compilations.
                gpu.set_deep_pipelines(false);
                self.network_rows(
                    &mut gpu,
                    &io,
                    [
                        format!("{label} forward, deep vs two-stage pipelines"),
                        format!("{label} vjp, deep vs two-stage pipelines"),
                    ],
                    (got.data(), grad.data()),
                    (TOLERANCE, TOLERANCE),
                )?;
                // Hopper's wgmma kernel for the 16-bit-input launches (compute capability 9.0):
                // a different summation order, so against the CPU like the first rows.
                gpu.set_deep_pipelines(true);
                if gpu.set_wgmma(true) {
                    self.network_rows(
                        &mut gpu,
                        &io,
                        [
                            format!("{label} forward, wgmma"),
                            format!("{label} forward + vjp, wgmma"),
                        ],
                        (want.data(), want_grad.data()),
                        (eps_tol, grad_tol),
                    )?;
                    // GroupNorm partial sums from the steps that write their inputs (the
                    // convolutions' only with the lean or TMA loaders, which the switches leave
                    // on): the f64 sums in another order, so against the CPU.
                    gpu.set_gn_producer_sums(true);
                    self.network_rows(
                        &mut gpu,
                        &io,
                        [
                            format!("{label} forward, wgmma, GroupNorm sums from producers"),
                            format!("{label} forward + vjp, wgmma, GroupNorm sums from producers"),
                        ],
                        (want.data(), want_grad.data()),
                        (eps_tol, grad_tol),
                    )?;
                    gpu.set_gn_producer_sums(false);
                    // Concatenations stored in 16 bits only, their GroupNorms reading them so:
                    // the forward's GroupNorms of rounded values, so against the CPU (the
                    // recording forward of the second row keeps fp32 values).
                    gpu.set_half_gn_inputs(true);
                    self.network_rows(
                        &mut gpu,
                        &io,
                        [
                            format!("{label} forward, wgmma, 16-bit GroupNorm inputs"),
                            format!("{label} forward + vjp, wgmma, 16-bit GroupNorm inputs"),
                        ],
                        (want.data(), want_grad.data()),
                        (eps_tol, grad_tol),
                    )?;
                    // In the recording forward too, the GroupNorms' backward passes reading the
                    // 16-bit values: its eps and the VJP of the rounded values, so against the
                    // CPU.
                    gpu.set_half_gn_inputs_recording(true);
                    self.recording_rows(
                        &mut gpu,
                        &io,
                        "wgmma, 16-bit GroupNorm inputs, recording too",
                        &label,
                        (want.data(), want_grad.data()),
                        (eps_tol, grad_tol),
                    )?;
                    gpu.set_half_gn_inputs_recording(false);
                    gpu.set_half_gn_inputs(false);
                }
                // 16-bit input copies and aliased residual gradients (at 64x64 x 2 the top
                // level's 2^20-value gradients are copied): on mma.sync the same sums in the
                // same order as the first rows, since a copy rounds as staging does; on wgmma
                // the copied launches change summation order, so against the CPU.
                gpu.set_moved_values(true);
                gpu.set_wgmma(false);
                self.network_rows(
                    &mut gpu,
                    &io,
                    [
                        format!("{label} forward, 16-bit copies + aliased gradients"),
                        format!("{label} vjp, 16-bit copies + aliased gradients"),
                    ],
                    (got.data(), grad.data()),
                    (0.0, 0.0),
                )?;
                if gpu.set_wgmma(true) {
                    self.network_rows(
                        &mut gpu,
                        &io,
                        [
                            format!("{label} forward, wgmma, 16-bit copies + aliased gradients"),
                            format!(
                                "{label} forward + vjp, wgmma, 16-bit copies + aliased gradients"
                            ),
                        ],
                        (want.data(), want_grad.data()),
                        (eps_tol, grad_tol),
                    )?;
                }
                gpu.set_moved_values(false);
                // Upsamplings folded into their convolutions (at 256x256 the 64x64 and 128x128
                // levels' two): summed weights round differently, so against the CPU.
                gpu.set_upsample_fold(true);
                self.network_rows(
                    &mut gpu,
                    &io,
                    [
                        format!("{label} forward, folded upsamplings"),
                        format!("{label} forward + vjp, folded upsamplings"),
                    ],
                    (want.data(), want_grad.data()),
                    (eps_tol, grad_tol),
                )?;
                // The network as configured (every default on, the switches applied), as users
                // run it: against the CPU.
                gpu.reset_choices();
                self.network_rows(
                    &mut gpu,
                    &io,
                    [
                        format!("{label} forward, defaults"),
                        format!("{label} forward + vjp, defaults"),
                    ],
                    (want.data(), want_grad.data()),
                    (eps_tol, grad_tol),
                )?;
                // Per-image plans with every choice that could depend on the batch on (the
                // 16-bit copies' threshold and the fold's count the batch's values; which
                // launches can write GroupNorm sums depends on their split).
                if n > 1 {
                    gpu.set_moved_values(true);
                    gpu.set_gn_producer_sums(true);
                    gpu.set_half_gn_inputs(true);
                    gpu.set_half_gn_inputs_recording(false);
                    self.batch_invariance_rows(&mut gpu, &io, &label)?;
                    // And with the default that changes the recording forward.
                    gpu.set_half_gn_inputs_recording(true);
                    let recording = format!("{label}, 16-bit GroupNorm inputs recording too,");
                    self.batch_invariance_rows(&mut gpu, &io, &recording)?;
                    gpu.set_moved_values(false);
                }
            }
        }
        Ok(())
    }

    /// A random sample and cotangent in [-1, 1) for `n` images of `h x w` of `model`.
    pub(super) fn random_io(
        &mut self,
        model: &Model,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = model.config();
        let sample = Tensor::new(
            vec![n, cfg.in_channels, h, w],
            self.rand(n * cfg.in_channels * h * w, -1.0, 1.0),
        )?;
        let cot = Tensor::new(
            vec![n, cfg.out_channels, h, w],
            self.rand(n * cfg.out_channels * h * w, -1.0, 1.0),
        )?;
        Ok((sample, cot))
    }

    /// Planned per image (`set_batch_invariant`), image 0's noise prediction and input
    /// gradient in `io`'s batch equal, bit for bit, its own alone.
    pub(super) fn batch_invariance_rows(
        &mut self,
        gpu: &mut CudaUnet,
        io: &NetworkIo,
        label: &str,
    ) -> Result<()> {
        gpu.set_batch_invariant(true);
        let got = gpu.forward(io.sample, io.t)?;
        gpu.forward_recording(io.sample, io.t)?;
        let grad = gpu.vjp(io.cot)?;
        let (sample, cot) = (io.sample.batch_item(0), io.cot.batch_item(0));
        let alone = gpu.forward(&sample, &io.t[..1])?;
        gpu.forward_recording(&sample, &io.t[..1])?;
        let alone_grad = gpu.vjp(&cot)?;
        gpu.set_batch_invariant(false);
        for (what, batch, one) in [("forward", got, alone), ("vjp", grad, alone_grad)] {
            self.row_within(
                format!("{label} {what}, per-image plans: image 0 of the batch vs alone"),
                io.desc.into(),
                &batch.data()[..one.data().len()],
                one.data(),
                0.0,
                0.0,
            );
        }
        Ok(())
    }
    /// `gpu`'s recording forward and its VJP on `io` as it is configured (`what`), both checked
    /// against `want` within `limits`: for a choice that changes the recording forward only,
    /// whose eps [`network_rows`](Self::network_rows) does not look at.
    pub(super) fn recording_rows(
        &mut self,
        gpu: &mut CudaUnet,
        io: &NetworkIo,
        what: &str,
        label: &str,
        want: (&[f32], &[f32]),
        limits: (f64, f64),
    ) -> Result<()> {
        let [n, _, h, w] = io.sample.shape()[..] else {
            return Err(Error::Cuda("internal: a network sample is not NCHW".into()));
        };
        let eps = gpu.forward_recording(io.sample, io.t)?;
        let grad = gpu.vjp(io.cot)?;
        let ms = gpu.time_forward_vjp(n, h, w, 5)?;
        let name = format!("{label} recording forward, {what}");
        self.row_within(name, io.desc.into(), eps.data(), want.0, ms, limits.0);
        let name = format!("{label} forward + vjp, {what}");
        self.row_within(name, io.desc.into(), grad.data(), want.1, ms, limits.1);
        Ok(())
    }

    /// `gpu`'s forward and forward + VJP on `io` as it is configured, each timed and checked
    /// against `want` within `limits` (rows named by `names`); the results, for the next
    /// configuration's comparison.
    pub(super) fn network_rows(
        &mut self,
        gpu: &mut CudaUnet,
        io: &NetworkIo,
        names: [String; 2],
        want: (&[f32], &[f32]),
        limits: (f64, f64),
    ) -> Result<(Tensor, Tensor)> {
        let [n, _, h, w] = io.sample.shape()[..] else {
            return Err(Error::Cuda("internal: a network sample is not NCHW".into()));
        };
        let [fwd_name, vjp_name] = names;
        let got = gpu.forward(io.sample, io.t)?;
        let ms = gpu.time_forward(n, h, w, 5)?;
        self.row_within(fwd_name, io.desc.into(), got.data(), want.0, ms, limits.0);
        gpu.forward_recording(io.sample, io.t)?;
        let grad = gpu.vjp(io.cot)?;
        let ms = gpu.time_forward_vjp(n, h, w, 5)?;
        self.row_within(vjp_name, io.desc.into(), grad.data(), want.1, ms, limits.1);
        Ok((got, grad))
    }
}
