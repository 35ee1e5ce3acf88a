//! Which kernels a program's steps run ([`KernelConfig`]): the defaults, and the choices the
//! `INVDIFF_*` switches ask for.

use crate::cuda::kernels::Capabilities;
use crate::cuda::Precision;
use crate::switches;
// What the documentation of the choices links to.
#[cfg(doc)]
use {
    super::Program,
    crate::cuda::kernels::{
        flash_fits, im2col_box, one_pass_threads, rows_fits, ConvLaunch, ConvShape, Gemm,
        NormSplit, Silu, WgmmaTile,
    },
    crate::cuda::unet::AttnKernel,
};

/// Which kernels a program's steps run. The tensor-core pipeline choices compute the same
/// results bit for bit; wgmma sums the same products in another order, the one-pass GroupNorm
/// and the convolutions' GroupNorm sums add their f64 sums in another order, the folded
/// upsamplings round their summed weights, and the 16-bit GroupNorm inputs round the values
/// their GroupNorms read. [`KernelConfig::tuned`] holds the defaults; the switches turn each
/// on or off, for comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelConfig {
    /// The deep pipelines, and in bf16/fp16 16-bit intermediates
    /// ([`Program::build_with`]), rather than the two-stage kernels with fp32 intermediates.
    pub deep: bool,
    /// With `deep`: launches with 16-bit inputs on Hopper's wgmma kernel (only where the
    /// device has it, compute capability 9.0).
    pub wgmma: bool,
    /// GroupNorms whose groups are small enough ([`one_pass_threads`]) in one launch
    /// (`gn_one_pass`, `gn_bwd_one_pass` in kernels/norm.cu) instead of three.
    pub gn_one_pass: bool,
    /// A three-launch forward GroupNorm takes its partial sums from the step that wrote its
    /// input and skips its own pass over it (`gn_partial`): one launch and one read of the
    /// activation less. From a lean or TMA wgmma launch (unsplit, images of whole tiles), whose
    /// epilogue stages the tile's finished values in its idle stages and sums each column over
    /// the tile's rows (`wg_stats` in kernels/conv_wgmma.cu; the f64 sums in another order), or
    /// from a concatenation, which then runs as the GroupNorm's first launch
    /// (`gn_concat_partial` in kernels/norm.cu; the same bits). The convolutions' half needs
    /// wgmma's lean or TMA launches; the concatenations' runs on any device.
    pub gn_producer_sums: bool,
    /// A three-launch GroupNorm backward pass over a concatenation writes the concatenation's
    /// two gradients itself, with the 16-bit copies its two adjoint steps wrote, where those
    /// steps would only copy them out of its input gradient (the `_split` kernels of
    /// kernels/norm.cu): two launches and a read and write of the whole gradient less, the same
    /// bits.
    pub concat_grad_split: bool,
    /// In a forward that records nothing (bf16/fp16 with `deep`, and `half_concat`; a recording
    /// one with `half_gn_inputs_recording`), the up path's concatenations, whose readers all
    /// take 16 bits at no loss of their own (a GroupNorm with a 16-bit output, through the
    /// `_x16` kernels in kernels/norm.cu; the main input of a tensor-core launch), are stored
    /// in 16 bits only (`concat_channels_half` in kernels/resample.cu). Their GroupNorms' statistics and outputs then come from the
    /// rounded values; no fp32 concatenation is written, and the GroupNorms read half the
    /// bytes. With `gn_producer_sums` the concatenation sums the values it rounds.
    pub half_gn_inputs: bool,
    /// With `half_gn_inputs`: in a recording forward (a DPS or ΠGDM step) too, its
    /// GroupNorms' backward passes reading the 16-bit values through their `_x16` kernels
    /// (kernels/norm.cu), so that their statistics, output and gradient all come from the
    /// rounded values.
    pub half_gn_inputs_recording: bool,
    /// GroupNorms take the `_ilp` kernels, which issue the loads of several pixels before their
    /// arithmetic ([`NormSplit`]'s `ilp`): the same bits.
    pub gn_ilp: bool,
    /// In bf16/fp16 with `deep`: concatenations also write a 16-bit copy for the tensor-core
    /// convolutions that read them (the residual blocks' 1x1 shortcuts), which then take the
    /// 16-bit input path (wgmma on Hopper) instead of staging the fp32 values; the copy is
    /// rounded as staging would round, so only wgmma's order of summation changes.
    pub half_concat: bool,
    /// In bf16/fp16 with `deep`: a tensor-core launch whose main input is stored in fp32 and
    /// holds at least [`HALF_COPY_MIN`] values (the stride-2 downsampling convolutions, the
    /// input gradients of the convolutions that end a residual block) first converts it to
    /// 16 bits in a launch of its own, shared by every such reader, and then takes the
    /// 16-bit input path (wgmma on Hopper) instead of staging the fp32 values. The copy
    /// rounds as staging would, so only wgmma's order of summation changes.
    pub half_copy: bool,
    /// With `half_copy`: fp32 inputs of every size are converted, not only from
    /// [`HALF_COPY_MIN`] values; the launches that read them then take wgmma (and TMA) too.
    /// A default where the device has wgmma, whose TMA kernels run the small input gradients
    /// of the low-resolution levels 1.2-1.9x faster than mma.sync (the H200 sweep of
    /// 2026-11-27), more than a conversion costs.
    pub half_copy_small: bool,
    /// A 16-bit copy of a buffer that a concatenation's adjoint or a GroupNorm's backward pass
    /// wrote last is written by that step itself, beside its fp32 values, instead of by a
    /// conversion launch after it: the same bits, one launch and one read of the buffer less.
    pub fused_half_copies: bool,
    /// In the backward pass, a residual's gradient that would start as a copy of the block
    /// output's gradient (its first contribution) is that buffer itself, which later
    /// contributions then add onto: no copy launch, the same sums.
    pub alias_residual_grads: bool,
    /// Deep tensor-core launches (mma.sync and wgmma) finish their rows with the loads of
    /// four output pairs issued before their stores ([`ConvLaunch::row_epilogue`]): the same
    /// arithmetic.
    pub row_epilogue: bool,
    /// Below fp32 (the convolutions in bf16, fp16 or tf32): the attention products on the
    /// tf32 tensor cores ([`Gemm::tf32`]) instead of fp32 FMAs; the softmax stays fp32.
    pub attention_tf32: bool,
    /// Below fp32: attentions whose heads are whole 64-column chunks ([`flash_fits`]) run fused
    /// ([`AttnKernel::Flash`], tf32 tensor cores, no P in memory; three launches per forward
    /// and backward pair instead of eight). Ahead of `attention_tf32` where both apply.
    pub attention_flash: bool,
    /// Below fp32: attention in rows of 16 queries ([`AttnKernel::Rows`]: split-bf16
    /// tensor-core products, about 17 significant bits; two launches forward instead of three,
    /// two backward instead of five, P in memory as unfused), for heads [`rows_fits`] takes,
    /// everywhere or where its split launch is one wave. After `attention_flash`, ahead of
    /// `attention_tf32`.
    pub attention_rows: AttentionRows,
    /// wgmma launches with the row epilogue take the lean loaders
    /// ([`ConvLaunch::lean_loads`]): the same copies, half the instructions a K slice.
    pub wgmma_lean: bool,
    /// wgmma launches with the row epilogue whose shape the TMA kernels take ([`im2col_box`])
    /// copy their slices with the tensor memory accelerator ([`ConvLaunch::tma_loads`], with
    /// the lean loaders' epilogue): no copy instructions in any thread but one, the same bits.
    /// At input stride 1 only, unless `strided_tma`.
    pub wgmma_tma: bool,
    /// With `wgmma_tma`: launches at an input stride above 1 (celebahq's five stride-2
    /// downsampling convolutions, the folded upsamplings' input gradients) copy through maps
    /// whose walk steps that stride too, instead of on the lean loaders; then, unsplit, they
    /// also stage their epilogue. The same bits, but where `staged_unsplit` then runs a launch
    /// unsplit that the lean loaders ran in two splits (another order of that sum).
    pub strided_tma: bool,
    /// Unsplit lean and TMA launches whose epilogue reads a residual or the output it adds
    /// onto ask L2 for those rows before their products ([`ConvLaunch::prefetch`]): the same
    /// bits.
    pub epilogue_prefetch: bool,
    /// Unsplit wgmma launches with at least a wave of them take 256-row tiles
    /// ([`WgmmaTile::Tall`]): the same sums in the same order.
    pub tall_tiles: bool,
    /// Unsplit TMA launches (with a fused shortcut too) finish their rows through shared
    /// memory ([`ConvLaunch::staged_epilogue`]), each warp whole rows with 16-byte accesses:
    /// the same arithmetic per value, the same bits.
    pub staged_epilogue: bool,
    /// With `staged_epilogue`: a TMA launch that the split rule gives two splits of K, K at
    /// most [`STAGED_UNSPLIT_MAX_K`], runs unsplit, so that it stages its epilogue (split
    /// launches do not) and needs no reduction: the sum of its products in one order instead
    /// of two partial sums added.
    pub staged_unsplit: bool,
    /// A nearest 2x upsampling whose only reader is a 3x3 convolution is folded into it
    /// ([`ConvShape::upsampled_forward`]): four launches, one per parity class of the output
    /// pixel, of a 2x2 convolution of the low-resolution input (a 16-bit copy of it in
    /// bf16/fp16) with summed weights, and two for its input gradient; 4 instead of 9
    /// products per output pixel and no upsampled tensor. Only where the input has at least
    /// [`FOLD_MIN_ROWS`] pixels over the batch, and in bf16/fp16 where every launch runs on
    /// the tensor cores with `deep`. The folded weights are summed in f32 (and rounded once
    /// below it), so the results differ from the unfolded ones by rounding.
    pub upsample_fold: bool,
    /// A residual block's 1x1 shortcut whose input is stored in 16 bits (the up path's
    /// concatenations) or has a 16-bit copy, fused into the block's second convolution where
    /// that runs on the lean or TMA wgmma kernels ([`ConvShape::with_shortcut`]): its products
    /// appended to that launch's K in the same accumulators, one bias of the two summed, and no
    /// shortcut launch, output or residual read. The products are summed in another order.
    pub shortcut_fused: bool,
    /// With `half_gn_inputs`: each side of a 16-bit concatenation whose value the staged
    /// epilogue of unsplit TMA launches wrote, whole (a residual block's second convolution, an
    /// upsampling's folded classes), is written into the concatenation by those launches,
    /// rounded as the concatenation rounds it (`wg_epilogue_staged`'s second output in
    /// kernels/conv_wgmma.cu), and the concatenation only sums it for its GroupNorm or, with
    /// both sides so written and no sums to make, goes; where nothing else reads that side's
    /// fp32 value (the up path's), those launches write none. The same bits.
    pub concat_from_producers: bool,
    /// A 16-bit copy of a buffer that an unsplit TMA launch with a staged epilogue wrote last,
    /// whole, is written by that epilogue beside its fp32 values (`wg_epilogue_staged`'s
    /// copy in kernels/conv_wgmma.cu) instead of by a conversion launch after it; where only
    /// 16-bit outputs of such a launch are read (a down path's block output that the
    /// downsampling reads through its copy and the concatenation takes from the launch), it
    /// writes no fp32 values. The same bits.
    pub epilogue_half_copies: bool,
    /// Where [`gn_ilp`](Self::gn_ilp) and the step that writes a GroupNorm backward pass's
    /// output gradient can write a 16-bit copy of it beside its values (an unsplit TMA
    /// input gradient's staged epilogue, with `epilogue_half_copies`), the passes this names
    /// read that copy (the `_dy16` kernels of kernels/norm.cu), and the launch then writes no
    /// fp32 values: two reads of the gradient at half the bytes, and a write of it less. Not
    /// the same bits: the gradient carries a rounding to 16 bits before the GroupNorm (the
    /// tensor-core kernels already round it so where they read it).
    pub half_norm_grads: HalfGrads,
    /// A residual's gradient added onto a gradient just before an accumulating GroupNorm
    /// backward pass adds onto it (a residual block's input: the identity shortcut's share,
    /// then the block's first GroupNorm's) is added by that pass, before its own values
    /// (`add` of the backward kernels in kernels/norm.cu), instead of by a launch of its own
    /// (`add_into`): (old + r) + v, the same bits, a launch and a read and write of the
    /// gradient less.
    pub fold_residual_grads: bool,
    /// The parity-class launches of one convolution (an upsampling's folded convolution, a
    /// stride-2 convolution's input gradient: each writes its own quarter of the output's
    /// pixels) may run side by side on the pass's streams, where the stream schedule would
    /// otherwise order them for writing one array (src/cuda/streams.rs). The same launches,
    /// so the same bits.
    pub class_concurrency: bool,
    /// With `epilogue_half_copies`: where every parity-class launch of a stride-2 input
    /// gradient stages its epilogue (the first downsampling's at batch 1), each writes its own
    /// pixels' share of the 16-bit copy the next input gradient reads, instead of a conversion
    /// launch after them. The same bits.
    pub class_half_copies: bool,
    /// With `epilogue_half_copies`: a split bf16/fp16 tensor-core launch whose output a
    /// tensor-core launch reads in 16 bits has its reduction write that copy too
    /// (`conv_splitk_reduce_copy`), instead of a conversion launch after it: the 8x8 to 64x64
    /// levels' split launches (five conversions of a batch-1 forward). The same bits.
    pub reduce_half_copies: bool,
    /// A one-pass forward GroupNorm of a split launch's output (the 8x8 and 16x16 levels at
    /// batch 1) computed by the launch's reduction (kernels/norm.cu `conv_splitk_reduce_norm`)
    /// instead of a launch of its own: the same outputs bit for bit, a dependent launch less.
    pub gn_from_reduction: bool,
    /// The convolutions with at most 8 outputs (celebahq's conv_out forward and conv_in's
    /// input gradient) on the tensor cores in bf16/fp16 (`conv_narrow_mma_*`,
    /// [`ConvKernel::NarrowTensor`](crate::cuda::kernels::ConvKernel)) instead of fp32 FMAs: over
    /// a 16-bit input (the GroupNorm before conv_out writes its output in 16 bits, conv_in's
    /// output gradient gets a 16-bit copy) and 16-bit weights, as the other convolutions, so
    /// another rounding.
    pub narrow_mma: bool,
    /// The convolutions with at most 8 inputs (celebahq's conv_in forward and conv_out's input
    /// gradient) on the tensor cores in bf16/fp16 programs (`conv_few_in_mma_<sc>`,
    /// [`ConvKernel::FewInTensor`](crate::cuda::kernels::ConvKernel)) instead of fp32 FMAs, over
    /// the same fp32 input and weights, each split into a bf16 pair (about 4e-6 from fp32 in a numpy model).
    pub few_in_mma: bool,
    /// In bf16/fp16 programs: the GroupNorms' SiLU (forward) and its derivative (backward)
    /// with the multifunction unit's approximate exponential and reciprocal
    /// ([`Silu::Approx`], the kernels of kernels/norm_approx.cu: a sigmoid within about 2^-20
    /// relative of the accurate one for |x| up to 16) instead of an accurate exponential and
    /// an IEEE division: 4 instructions a sigmoid instead of about 20, where a GroupNorm
    /// backward pass evaluates one per element in each of its two passes. Another rounding,
    /// far below that of the bf16/fp16 convolutions around these GroupNorms.
    pub approx_silu: bool,
    /// Every choice that changes the order of a sum (the split of K, GroupNorm's chunks, which
    /// kernel an attention product takes: the attention steps' `per_image`) made from one
    /// image's shape, so that an image's results are bit for bit the same in any batch;
    /// otherwise they are made for the whole batch, which fills the device better.
    pub batch_invariant: bool,
}

/// Where attention runs in rows ([`KernelConfig::attention_rows`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum AttentionRows {
    /// Nowhere.
    #[default]
    Off,
    /// Where its split launch (a block per 16 queries and 32 keys of an image and head) has at
    /// most a block per multiprocessor, counted over one image with `batch_invariant`: batch
    /// 1 at celebahq's sizes, where its blocks hold 184.5 KB of shared memory each and a second
    /// wave would wait out the first.
    OneWave,
    /// Every attention whose heads it takes.
    Everywhere,
}

/// Which GroupNorm backward passes read a 16-bit output gradient
/// ([`KernelConfig::half_norm_grads`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum HalfGrads {
    /// None.
    #[default]
    Off,
    /// Those over a 16-bit input (the concatenations of the up path,
    /// [`KernelConfig::half_gn_inputs_recording`]), where every operand but the scale and
    /// shift is then 16 bits.
    OverHalfInputs,
    /// Every one whose gradient's writer can write the copy.
    Everywhere,
}

impl Default for KernelConfig {
    /// The plain program: deep pipelines, mma.sync, three-launch GroupNorms, every other choice
    /// off. Not what a [`CudaUnet`](crate::cuda::CudaUnet) runs by default
    /// ([`KernelConfig::tuned`]); the base that tests and comparisons turn single choices on in.
    fn default() -> Self {
        KernelConfig {
            deep: true,
            wgmma: false,
            gn_one_pass: false,
            gn_producer_sums: false,
            concat_grad_split: false,
            half_gn_inputs: false,
            half_gn_inputs_recording: false,
            gn_ilp: false,
            half_concat: false,
            half_copy: false,
            half_copy_small: false,
            fused_half_copies: false,
            alias_residual_grads: false,
            row_epilogue: false,
            attention_tf32: false,
            attention_flash: false,
            attention_rows: AttentionRows::Off,
            wgmma_lean: false,
            wgmma_tma: false,
            strided_tma: false,
            epilogue_prefetch: false,
            tall_tiles: false,
            staged_epilogue: false,
            staged_unsplit: false,
            upsample_fold: false,
            shortcut_fused: false,
            concat_from_producers: false,
            epilogue_half_copies: false,
            half_norm_grads: HalfGrads::Off,
            fold_residual_grads: false,
            class_concurrency: false,
            class_half_copies: false,
            reduce_half_copies: false,
            gn_from_reduction: false,
            narrow_mma: false,
            few_in_mma: false,
            approx_silu: false,
            batch_invariant: false,
        }
    }
}

impl KernelConfig {
    /// The defaults at `precision`, each kernel that not every device runs only where this one
    /// does (`here`): the choices an H200 timed faster (PERF.md). v0.5 (2026-11-26), alone
    /// against v0.4's defaults, bf16 at batch 1 / 8 / 32: row epilogue with tall tiles
    /// -14% / -14% / -12%; one-pass GroupNorms, 16-bit concatenation copies, aliased gradients
    /// and tf32 attention 0.5-2% each, 16-bit input copies 3.9% off the DPS step; together,
    /// with the launch choices outside this struct (small product tiles, two streams), -20% /
    /// -17% / -14%, and -22% off the DPS step at batch 1. The upsampling fold took 2% more
    /// off at batch 32 in bf16; in fp32 it took 3% off, but it moves fp32 results by rounding
    /// and strict parity against diffusers was not rerun with it, so it stays off there.
    /// v0.6 (2026-11-27), against v0.5's defaults in the same run, batch 1 forward / DPS step /
    /// batch 8 / batch 32: TMA copies -19% / -16% / -23% / -20%, lean loaders (which TMA's
    /// epilogue builds on) -11% / -9% / -13% / -12%, GroupNorm loads ahead 5% off the DPS
    /// step; the three together -20% / -22% / -23% / -20%. A second run against those three:
    /// small 16-bit copies with the epilogue prefetch -1.7% off the DPS step and -1.0% / -0.5%
    /// at batch 8 / 32 (the copies alone -1.9% off the DPS step); fp32 attention products
    /// -2.2% / -2.4% at batch 1, +0.5% / +0.6% at batch 8 / 32, and exact to fp32, so tf32
    /// attention is off. The last two were timed each against the same defaults, not together.
    /// Stop 22 (2026-11-27), each alone against those defaults, batch 1 forward / DPS step /
    /// batch 8 / batch 32: 16-bit concatenations for the GroupNorms -3.1% / 0 / -6.1% / -6.8%,
    /// GroupNorm sums from their producers -2.2% / -1.0% / -4.1% / -5.3%, 16-bit copies by
    /// their writers 0 / -1.2% / 0 / 0.
    /// Stop 26 (2026-11-27, H200), against those defaults in the same run, batch 1 forward /
    /// DPS step / batch 8 / batch 32, each alone: staged epilogues -7.4% / -4.3% / -10.1% /
    /// -8.1%, fused 1x1 shortcuts -5.0% / -2.2% / -8.2% / -8.1%, concatenation gradients from
    /// their GroupNorms 0 / -1.7% / 0 / 0, 16-bit GroupNorm inputs in recording forwards 0 /
    /// -0.5% / 0 / -0.4%; the four together (a second run) -12.1% / -8.8% / -16.8% / -14.5%.
    /// Tall tiles stayed: off with the four, +0.3% / -0.3% / +1.7% / +2.6%. A third run, against
    /// those: two-way splits unsplit to stage -1.3% / -0.9% / -0.5% / -0.2%.
    /// Stop 27 (2026-11-27, H200), against those defaults in the same run, batch 1 forward /
    /// DPS step / batch 8 / batch 32: concatenation sides from their producers -0.7% / -0.3% /
    /// -2.7% / -2.8%, 16-bit copies by staged epilogues -0.6% / -0.3% / -1.5% / -0.9%, the two
    /// together -1.7% / -0.8% / -4.6% / -4.3%; as defaults, against v0.8's program in a third
    /// run, -2.3% / -0.9% / -4.6% / -5.0%.
    /// Stop 28 (2026-11-27, H200), against those defaults in the same run: residual gradients
    /// added by the GroupNorm backward passes -0.6% off the DPS step (the forwards do not
    /// change); a second run, against those with them: 16-bit output gradients for the
    /// GroupNorm backward passes over 16-bit inputs -1.0% off the DPS step, for every pass
    /// that can -0.8% (those over fp32 inputs got slower, 753 -> 777 us in all).
    /// Stop 34 (2026-11-28, H200), against those defaults in the same run, batch 1 forward /
    /// DPS step / batch 8 / batch 32: parity classes side by side -1.6% / -1.8% / -0.4% /
    /// -0.4%; with the launch choices of [`LaunchSwitches`](crate::cuda::kernels::LaunchSwitches)
    /// that became defaults then (warp-split attention products, concatenation sums eight
    /// pixels ahead) -3.2% / -3.5% / -0.5% / -0.4%.
    pub fn tuned(here: Capabilities, precision: Precision) -> Self {
        KernelConfig {
            deep: true,
            wgmma: here.wgmma,
            gn_one_pass: true,
            gn_producer_sums: true,
            concat_grad_split: true,
            half_gn_inputs: true,
            half_gn_inputs_recording: true,
            gn_ilp: true,
            half_concat: true,
            half_copy: true,
            half_copy_small: here.wgmma,
            fused_half_copies: true,
            alias_residual_grads: true,
            row_epilogue: true,
            attention_tf32: false,
            attention_flash: false,
            attention_rows: AttentionRows::Off,
            wgmma_lean: here.wgmma,
            wgmma_tma: here.wgmma,
            strided_tma: false,
            epilogue_prefetch: here.wgmma,
            tall_tiles: true,
            staged_epilogue: here.wgmma,
            staged_unsplit: here.wgmma,
            upsample_fold: precision.is_half(),
            shortcut_fused: here.wgmma,
            concat_from_producers: here.wgmma,
            epilogue_half_copies: here.wgmma,
            half_norm_grads: match here.wgmma && precision.is_half() {
                true => HalfGrads::OverHalfInputs,
                false => HalfGrads::Off,
            },
            fold_residual_grads: true,
            class_concurrency: true,
            class_half_copies: false,
            reduce_half_copies: false,
            gn_from_reduction: false,
            narrow_mma: false,
            few_in_mma: false,
            approx_silu: false,
            batch_invariant: false,
        }
    }

    /// [`tuned`](Self::tuned) with what the `INVDIFF_*` switches ask for (src/switches.rs):
    /// `0` turns a default off, `1` a candidate (or the fold in every precision) on.
    pub fn from_switches(here: Capabilities, precision: Precision) -> Self {
        let tuned = Self::tuned(here, precision);
        let on = |name| switches::is(name, "1");
        // A default stays on unless its switch says 0.
        let kept = |name, default: bool| match switches::value(name).as_deref() {
            Some("0") => false,
            Some("1") => true,
            _ => default,
        };
        // The defaults that only serve the wgmma kernels go with them.
        let wgmma = tuned.wgmma && !switches::is("INVDIFF_WGMMA", "0");
        KernelConfig {
            deep: !switches::is("INVDIFF_TC_PIPELINE", "two"),
            wgmma,
            gn_one_pass: kept("INVDIFF_GN_ONE_PASS", tuned.gn_one_pass),
            gn_producer_sums: kept("INVDIFF_GN_PRODUCER_SUMS", tuned.gn_producer_sums),
            concat_grad_split: kept("INVDIFF_CONCAT_GRAD_SPLIT", tuned.concat_grad_split),
            half_gn_inputs: kept("INVDIFF_GN_HALF_INPUT", tuned.half_gn_inputs),
            half_gn_inputs_recording: kept(
                "INVDIFF_GN_HALF_INPUT_RECORDING",
                tuned.half_gn_inputs_recording,
            ),
            gn_ilp: kept("INVDIFF_GN_ILP", tuned.gn_ilp),
            half_concat: kept("INVDIFF_HALF_CONCAT", tuned.half_concat),
            half_copy: kept("INVDIFF_HALF_COPY", tuned.half_copy),
            half_copy_small: kept("INVDIFF_HALF_COPY_SMALL", tuned.half_copy_small && wgmma),
            fused_half_copies: kept("INVDIFF_HALF_COPY_FUSED", tuned.fused_half_copies),
            alias_residual_grads: kept("INVDIFF_ALIAS_GRADS", tuned.alias_residual_grads),
            row_epilogue: kept("INVDIFF_ROW_EPILOGUE", tuned.row_epilogue),
            attention_tf32: kept("INVDIFF_ATTN_TF32", tuned.attention_tf32),
            attention_flash: here.flash && on("INVDIFF_ATTN_FLASH"),
            attention_rows: match switches::value("INVDIFF_ATTN_ROWS").as_deref() {
                _ if !here.rows => AttentionRows::Off,
                Some("1") => AttentionRows::Everywhere,
                Some("wave") => AttentionRows::OneWave,
                _ => AttentionRows::Off,
            },
            wgmma_lean: kept("INVDIFF_WGMMA_LEAN", tuned.wgmma_lean && wgmma),
            wgmma_tma: kept("INVDIFF_WGMMA_TMA", tuned.wgmma_tma && wgmma),
            strided_tma: on("INVDIFF_TMA_STRIDED"),
            epilogue_prefetch: kept("INVDIFF_EPI_PREFETCH", tuned.epilogue_prefetch && wgmma),
            tall_tiles: kept("INVDIFF_WGMMA_TALL", tuned.tall_tiles),
            staged_epilogue: wgmma && kept("INVDIFF_EPI_STAGED", tuned.staged_epilogue),
            staged_unsplit: wgmma && kept("INVDIFF_STAGED_UNSPLIT", tuned.staged_unsplit),
            upsample_fold: kept("INVDIFF_UPSAMPLE_FOLD", tuned.upsample_fold),
            shortcut_fused: wgmma && kept("INVDIFF_SHORTCUT_FUSED", tuned.shortcut_fused),
            concat_from_producers: wgmma
                && kept("INVDIFF_CONCAT_FROM_PRODUCERS", tuned.concat_from_producers),
            epilogue_half_copies: wgmma
                && kept("INVDIFF_EPI_HALF_COPIES", tuned.epilogue_half_copies),
            half_norm_grads: match switches::value("INVDIFF_GN_HALF_DY").as_deref() {
                _ if !wgmma => HalfGrads::Off,
                Some("0") => HalfGrads::Off,
                Some("1") => HalfGrads::Everywhere,
                Some("x16") => HalfGrads::OverHalfInputs,
                _ => tuned.half_norm_grads,
            },
            fold_residual_grads: kept("INVDIFF_GN_ADD_RESIDUAL", tuned.fold_residual_grads),
            class_concurrency: kept("INVDIFF_CLASS_CONCURRENCY", tuned.class_concurrency),
            class_half_copies: on("INVDIFF_CLASS_HALF_COPIES"),
            reduce_half_copies: on("INVDIFF_REDUCE_HALF_COPIES"),
            gn_from_reduction: on("INVDIFF_GN_FROM_REDUCTION"),
            narrow_mma: on("INVDIFF_NARROW_MMA"),
            few_in_mma: on("INVDIFF_FEW_IN_MMA"),
            approx_silu: on("INVDIFF_APPROX_SILU"),
            batch_invariant: false,
        }
    }

    /// The choices that differ from the plain mma.sync program, in words, for reports (the
    /// switches change the speed, and some the order of sums or a rounding).
    pub fn describe(&self) -> Vec<&'static str> {
        [
            (!self.deep, "two-stage pipelines"),
            (self.wgmma, "wgmma"),
            (self.gn_one_pass, "one-pass GroupNorm"),
            (self.gn_producer_sums, "GroupNorm sums from their producers"),
            (
                self.concat_grad_split,
                "concatenation gradients from their GroupNorms",
            ),
            (self.half_gn_inputs, "16-bit GroupNorm inputs"),
            (
                self.half_gn_inputs && self.half_gn_inputs_recording,
                "16-bit GroupNorm inputs in recording forwards",
            ),
            (self.gn_ilp, "GroupNorm loads ahead"),
            (self.half_concat, "16-bit concatenation copies"),
            (self.half_copy, "16-bit input copies"),
            (
                self.half_copy && self.half_copy_small,
                "small 16-bit input copies",
            ),
            (
                self.half_copy && self.fused_half_copies,
                "16-bit copies by their writers",
            ),
            (self.alias_residual_grads, "aliased residual gradients"),
            (self.row_epilogue, "row epilogue"),
            (self.attention_tf32, "tf32 attention"),
            (self.attention_flash, "fused attention"),
            (
                self.attention_rows == AttentionRows::Everywhere,
                "attention in rows",
            ),
            (
                self.attention_rows == AttentionRows::OneWave,
                "attention in rows where one wave",
            ),
            (self.wgmma_lean, "lean wgmma loaders"),
            (self.wgmma_tma, "TMA wgmma loads"),
            (self.wgmma_tma && self.strided_tma, "TMA copies at stride 2"),
            (self.epilogue_prefetch, "epilogue reads prefetched"),
            (self.tall_tiles, "tall wgmma tiles"),
            (self.staged_epilogue, "staged wgmma epilogues"),
            (
                self.staged_epilogue && self.staged_unsplit,
                "two-way splits unsplit to stage",
            ),
            (self.upsample_fold, "upsamplings folded into convolutions"),
            (self.shortcut_fused, "1x1 shortcuts fused into convolutions"),
            (
                self.half_gn_inputs && self.concat_from_producers,
                "concatenations written by their producers",
            ),
            (
                self.half_copy && self.epilogue_half_copies,
                "16-bit copies by staged epilogues",
            ),
            (
                self.half_norm_grads == HalfGrads::Everywhere,
                "16-bit GroupNorm output gradients",
            ),
            (
                self.half_norm_grads == HalfGrads::OverHalfInputs,
                "16-bit GroupNorm output gradients over 16-bit inputs",
            ),
            (
                self.fold_residual_grads,
                "residual gradients added by GroupNorms",
            ),
            (self.class_concurrency, "parity classes side by side"),
            (
                self.half_copy && self.epilogue_half_copies && self.class_half_copies,
                "16-bit copies by parity-class launches",
            ),
            (
                self.half_copy && self.epilogue_half_copies && self.reduce_half_copies,
                "16-bit copies by split reductions",
            ),
            (
                self.gn_from_reduction,
                "GroupNorms computed by split reductions",
            ),
            (self.narrow_mma, "few-output convolutions on tensor cores"),
            (self.few_in_mma, "few-input convolutions on tensor cores"),
            (self.approx_silu, "approximate SiLU in bf16/fp16"),
            (self.batch_invariant, "per-image plans"),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect()
    }
}

/// Most K (products per output value) of a launch that [`KernelConfig::staged_unsplit`] runs
/// unsplit: 3x3 over 256 channels. In the H200 sweep of stop 26 (each TMA launch of the
/// celebahq network timed in every form, batch 1 with the VJP and batch 8), every two-way split
/// up to this K ran 3-49% slower than the same launch unsplit with its epilogue staged (the 3x3
/// 256->256 launches at 64x64, batch 1: 26.3 against 23.1 us; the attention's 512->512 linear at
/// batch 8: 19.5 against 10.0 us), and every one from 4608 up 4-41% faster; 3456 was a tie.
pub(crate) const STAGED_UNSPLIT_MAX_K: usize = 2304;

/// Fewest values of an fp32 input that [`KernelConfig::half_copy`] converts without
/// [`KernelConfig::half_copy_small`] (devices without wgmma): at batch 1, the 64x64 x 256
/// level and above. In the v0.4 profile (H200, bf16, batch 1) the 16-bit path
/// ran 12-60 us faster per launch there, against a conversion estimated at 3-16 us (its bytes
/// at the card's bandwidth, plus a launch); below, the gain was under the estimate.
pub(crate) const HALF_COPY_MIN: usize = 1 << 20;

/// Fewest input pixels (over the batch) of an upsampling that [`KernelConfig::upsample_fold`]
/// folds: at batch 1, the 64x64 and 128x128 levels. A guess, to be fitted on a GPU: the fold
/// replaces an upsampling and one launch by a conversion and four launches (two and two in
/// the backward pass), which the v0.4 b1 profile's 7-16 us fixed cost of a launch makes a loss
/// at the 8x8 and 16x16 levels, where 5/9 of the products are a few microseconds.
pub(crate) const FOLD_MIN_ROWS: usize = 4096;
