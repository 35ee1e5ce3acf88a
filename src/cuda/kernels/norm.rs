//! GroupNorm (kernels/norm.cu): how each GroupNorm is cut into launches ([`NormSplit`]: three
//! passes over chunks of pixels, or one pass per group), and their launchers.

use cudarc::driver::{
    CudaFunction, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};

use super::{cfg, concat_outputs, half_kind, half_output, i32_of, need, DPtr, Kernels, BLOCK};
use crate::cuda::device::cu;
use crate::cuda::precision::Precision;
use crate::{Error, Result};

/// Threads of a GroupNorm finalize block (`FIN_THREADS` in kernels/norm.cu).
const GN_FIN_THREADS: u32 = 256;

/// How a GroupNorm runs: in three launches with `chunks` blocks of `chunk_px` pixels per
/// (image, 32 channels) for the partial sums, or, where `one_pass` gives a block size, in one
/// launch of a block per (image, group) (kernels/norm.cu `gn_one_pass`). With `ilp`, the
/// launches take the `_ilp` kernels where there are some (the element-wise passes, the
/// backward's partial sums, both one-pass kernels), which issue their loads ahead of the
/// arithmetic that would hold them back: the same bits. With `from_producer` (forward, three
/// launches), the step that wrote the input already wrote the partial sums, and `gn_partial`
/// does not run: a convolution's epilogue, a chunk of `chunk_px` pixels per tile
/// ([`ConvPtrs::gn_partial`](super::ConvPtrs)), or a concatenation
/// ([`Kernels::concat_with_norm_sums`], this split's chunks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NormSplit {
    pub chunks: usize,
    pub chunk_px: usize,
    pub one_pass: Option<u32>,
    pub ilp: bool,
    pub from_producer: bool,
}

/// The SiLU after a GroupNorm: which module's kernels run it ([`SiluNormFns`]) and whether
/// they apply it (their `silu` argument).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Silu {
    /// No SiLU.
    #[default]
    Off,
    /// SiLU and its derivative with the accurate exponential and division: the CPU's
    /// operations (kernels/norm.cu).
    Accurate,
    /// With the multifunction unit's approximate exponential and reciprocal instead
    /// (kernels/norm_approx.cu, `sigmoid_approx` in kernels/norm.cu: a sigmoid within about
    /// 2^-21 + 1.2 |x| 2^-24 relative of the accurate one); for bf16/fp16 programs with
    /// [`KernelConfig::approx_silu`](crate::cuda::program::KernelConfig).
    Approx,
}

impl Silu {
    /// SiLU where `on`, approximate where `approx` too.
    pub fn new(on: bool, approx: bool) -> Self {
        match (on, approx) {
            (false, _) => Silu::Off,
            (true, false) => Silu::Accurate,
            (true, true) => Silu::Approx,
        }
    }

    /// Whether a SiLU follows the GroupNorm.
    pub fn is_on(self) -> bool {
        self != Silu::Off
    }

    /// The kernels' `silu` argument: 1 where a SiLU follows.
    fn arg(self) -> i32 {
        self.is_on() as i32
    }
}

/// The kernels of kernels/norm.cu that take a `silu` argument (with or without a SiLU), as one
/// module holds them: `norm`, with the accurate SiLU, or `norm_approx` (kernels/norm_approx.cu:
/// the same source, names and arguments), with the approximate one ([`Silu::Approx`]).
#[derive(Clone)]
pub(super) struct SiluNormFns {
    apply: CudaFunction,
    apply_ilp: CudaFunction,
    apply_half: CudaFunction,
    apply_half_ilp: CudaFunction,
    apply_half_x16: CudaFunction,
    apply_half_x16_ilp: CudaFunction,
    one_pass: CudaFunction,
    one_pass_ilp: CudaFunction,
    one_pass_x16: CudaFunction,
    one_pass_x16_ilp: CudaFunction,
    /// The backward pass's forms, as [`Kernels::group_norm_backward`] indexes them.
    bwd: [NormBackwardFns; 6],
    /// `gn_bwd_partial_x16_dy16_pairs` ([`LaunchSwitches::gn_bwd_sums_pairs`](super::LaunchSwitches)).
    bwd_partial_pairs: CudaFunction,
    /// `conv_splitk_reduce_norm`, a split launch's reduction and the one-pass GroupNorm of its
    /// output.
    pub(super) reduce_norm: CudaFunction,
}

impl SiluNormFns {
    /// The two modules, in the order [`Kernels`] holds their kernels: accurate, approximate.
    pub(super) const MODULES: [&'static str; 2] = ["norm", "norm_approx"];

    /// The kernels each module has besides the backward pass's forms
    /// ([`NormBackwardFns::names`]), in the order of the fields.
    pub(super) const NAMES: [&'static str; 12] = [
        "gn_apply",
        "gn_apply_ilp",
        "gn_apply_half",
        "gn_apply_half_ilp",
        "gn_apply_half_x16",
        "gn_apply_half_x16_ilp",
        "gn_one_pass",
        "gn_one_pass_ilp",
        "gn_one_pass_x16",
        "gn_one_pass_x16_ilp",
        "gn_bwd_partial_x16_dy16_pairs",
        "conv_splitk_reduce_norm",
    ];

    /// `module`'s kernels, each looked up as `get(module, name)`.
    pub(super) fn load(
        get: &dyn Fn(&str, &str) -> Result<CudaFunction>,
        module: &str,
    ) -> Result<Self> {
        let fns = Self::NAMES
            .iter()
            .map(|name| get(module, name))
            .collect::<Result<Vec<_>>>()?;
        let [apply, apply_ilp, apply_half, apply_half_ilp, apply_half_x16, apply_half_x16_ilp, one_pass, one_pass_ilp, one_pass_x16, one_pass_x16_ilp, bwd_partial_pairs, reduce_norm] =
            <[CudaFunction; 12]>::try_from(fns)
                .map_err(|_| Error::Cuda("internal: GroupNorm kernel table".into()))?;
        Ok(SiluNormFns {
            apply,
            apply_ilp,
            apply_half,
            apply_half_ilp,
            apply_half_x16,
            apply_half_x16_ilp,
            one_pass,
            one_pass_ilp,
            one_pass_x16,
            one_pass_x16_ilp,
            bwd: NormBackwardFns::all(get, module)?,
            bwd_partial_pairs,
            reduce_norm,
        })
    }
}

/// What a GroupNorm backward pass ([`Kernels::group_norm_backward`]) reads: the forward's
/// input `x` (16-bit values of `x_half` where set), the output gradient `dy` (16-bit values of
/// `dy_half` where set), the scale and shift, the recorded statistics, and the SiLU that
/// followed the GroupNorm.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NormBackwardIn {
    pub x: DPtr,
    pub x_half: Option<Precision>,
    pub dy: DPtr,
    pub dy_half: Option<Precision>,
    pub gamma: DPtr,
    pub beta: DPtr,
    pub stats: DPtr,
    pub silu: Silu,
}

/// What a GroupNorm backward pass writes: its scratch (partial sums, group means), the input
/// gradient `dx` (added onto where `accumulate`, after `add` is added onto it where set; 16-bit
/// values of `half_out` where set), a 16-bit `copy` of it, or instead the two `sides` of the
/// concatenation it is the gradient of.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NormBackwardOut {
    pub partial: DPtr,
    pub means: DPtr,
    pub dx: DPtr,
    pub accumulate: bool,
    pub add: Option<DPtr>,
    pub half_out: Option<Precision>,
    pub copy: Option<(DPtr, Precision)>,
    pub sides: Option<GradSides>,
    /// Which of the three launches run (all but for the sweep's timing of each).
    pub launches: NormLaunches,
}

/// The launches of a three-launch GroupNorm backward pass that
/// [`Kernels::group_norm_backward`] issues: all of them, or one alone, so that the kernel sweep
/// (`kernels_cuda --sweep`) can time each (the others having run before, so that it reads what
/// they wrote). One pass is a single launch and takes `All` only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum NormLaunches {
    #[default]
    All,
    /// `gn_bwd_partial*`, the per-chunk sums.
    Sums,
    /// `gn_bwd_finalize`, the group means from the sums.
    Means,
    /// The element-wise pass (`gn_bwd_apply*`).
    Apply,
}

/// The two sides of a concatenation's gradient, which the GroupNorm backward pass over the
/// concatenation writes instead of its input gradient (the `_split` kernels of
/// kernels/norm.cu; [`KernelConfig::concat_grad_split`](crate::cuda::program::KernelConfig)):
/// the first `ca` channels of each pixel to `a`, the rest to `b`, each also in 16 bits where
/// it has a copy. `B` names a buffer: the program's [`Buf`](crate::cuda::program::Buf), or its
/// address for the launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GradSides<B = DPtr> {
    pub a: B,
    pub a16: Option<(B, Precision)>,
    pub b: B,
    pub b16: Option<(B, Precision)>,
    pub ca: usize,
}

impl<B: Copy> GradSides<B> {
    /// The same sides with each buffer `f` of its own (a program's buffers to addresses).
    pub fn map<C>(self, f: impl Fn(B) -> C) -> GradSides<C> {
        GradSides {
            a: f(self.a),
            a16: self.a16.map(|(b, p)| (f(b), p)),
            b: f(self.b),
            b16: self.b16.map(|(b, p)| (f(b), p)),
            ca: self.ca,
        }
    }

    /// The buffers written: both sides and their 16-bit copies.
    pub fn written(&self) -> impl Iterator<Item = B> {
        [self.a, self.b]
            .into_iter()
            .chain(self.a16.map(|(b, _)| b))
            .chain(self.b16.map(|(b, _)| b))
    }
}

/// GradSplit of kernels/norm.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GradSplitArgs {
    a: DPtr,
    a16: DPtr,
    b: DPtr,
    b16: DPtr,
    ca: i32,
    cb: i32,
}

const _: () = assert!(std::mem::size_of::<GradSplitArgs>() == 40);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for GradSplitArgs {}

impl GradSides {
    /// The kernel's argument for a pass of dimensions `d` (`io_aligned`: its x, dy and dx
    /// aligned for units of four; `whole`: it asks for a 16-bit input gradient or copy, which
    /// a split cannot give), and the 16-bit kind of the sides' copies; an error where the
    /// split does not fit the `_split` kernels.
    fn args(self, d: NormDims, io_aligned: bool, whole: bool) -> Result<(GradSplitArgs, i32)> {
        let cb = d.c.saturating_sub(self.ca);
        let (a16, b16) = (self.a16.map_or(0, |c| c.0), self.b16.map_or(0, |c| c.0));
        let aligned = io_aligned
            && [self.a, self.b].iter().all(|p| p % 16 == 0)
            && [a16, b16].iter().all(|p| p % 8 == 0);
        // One kind of rounding for both copies.
        let half = self.a16.or(self.b16).map(|c| c.1);
        let halves = [self.a16, self.b16]
            .iter()
            .flatten()
            .all(|c| Some(c.1) == half);
        if whole
            || d.split.one_pass.is_some()
            || self.ca == 0
            || cb == 0
            || self.ca % 4 != 0
            || cb % 4 != 0
            || !aligned
            || !halves
        {
            return Err(Error::Cuda(format!(
                "internal: a GroupNorm backward pass of {} channels split at {} (one pass {}, a \
                 16-bit input gradient or copy {whole}, aligned {aligned}, 16-bit copies {:?}): \
                 the split kernels are an element-wise launch (not one pass) over sides of whole \
                 units of four channels and aligned buffers",
                d.c,
                self.ca,
                d.split.one_pass.is_some(),
                (self.a16.map(|c| c.1), self.b16.map(|c| c.1))
            )));
        }
        need(self.a, "first side of the input gradient")?;
        need(self.b, "second side of the input gradient")?;
        let args = GradSplitArgs {
            a: self.a,
            a16,
            b: self.b,
            b16,
            ca: i32_of(self.ca, "first side's channels")?,
            cb: i32_of(cb, "second side's channels")?,
        };
        Ok((args, half.map_or(Ok(0), half_kind)?))
    }
}

/// Pixels of its group one thread of the one-pass GroupNorm holds (`ONE_PASS_PIXELS`).
const GN_ONE_PASS_PIXELS: usize = 8;

/// Threads of a one-pass GroupNorm block for groups of `cg` channels over `hw` pixels: `cg`
/// threads per pixel row, enough rows that each thread holds at most `GN_ONE_PASS_PIXELS`
/// pixels, rounded up to whole warps; `None` where that takes more than 1024 threads (a group
/// of more than 8192 elements when `cg` divides 1024), where three launches fill the device
/// better anyway.
pub(crate) fn one_pass_threads(hw: usize, cg: usize) -> Option<u32> {
    let rows = hw.div_ceil(GN_ONE_PASS_PIXELS);
    let threads = (cg.max(1) * rows).next_multiple_of(32);
    (threads <= 1024).then_some(threads as u32)
}

/// Enough blocks to fill every multiprocessor about eight times over (eight 256-thread blocks
/// are what one holds, and the partial sums are bound by bytes in flight), at least 8 pixels a
/// block; one pass instead where `one_pass` allows it and the groups are small enough; the
/// `_ilp` kernels with `ilp`.
pub(crate) fn plan_norm(
    n: usize,
    hw: usize,
    c: usize,
    groups: usize,
    sms: usize,
    one_pass: bool,
    ilp: bool,
) -> NormSplit {
    let per_chunk = n * c.div_ceil(32);
    let want = (8 * sms.max(1)).div_ceil(per_chunk.max(1));
    let chunks = want.clamp(1, hw.div_ceil(8).max(1));
    let chunk_px = hw.div_ceil(chunks).max(1);
    let one_pass = one_pass
        .then(|| one_pass_threads(hw, c / groups.max(1)))
        .flatten();
    NormSplit {
        chunks: hw.div_ceil(chunk_px).max(1),
        chunk_px,
        one_pass,
        ilp,
        from_producer: false,
    }
}

/// Most outputs a group may have for the reduction of a split launch to compute its one-pass
/// GroupNorm too (`conv_splitk_reduce_norm`): four a thread at 1024 threads. The kernel forms a
/// thread's outputs one after the other, a memory round trip each, so more would cost more
/// than the launch it saves.
const REDUCTION_NORM_OUTPUTS: usize = 4096;

/// Threads of a `conv_splitk_reduce_norm` block for groups of `cg` channels over `hw` pixels:
/// an output a thread up to 1024, never fewer than the one-pass block it reproduces; `None`
/// where the group is too large for it or for one pass.
pub(crate) fn reduction_norm_threads(hw: usize, cg: usize) -> Option<u32> {
    let one_pass = one_pass_threads(hw, cg)?;
    let outputs = cg * hw;
    (outputs <= REDUCTION_NORM_OUTPUTS)
        .then(|| (outputs.next_multiple_of(32).min(1024) as u32).max(one_pass))
}

/// The one-pass GroupNorm of a split launch's output that its reduction computes too
/// ([`KernelConfig::gn_from_reduction`](crate::cuda::program::KernelConfig)): the
/// GroupNorm's affine, its output (16-bit values of `half_out` where set) and statistics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReductionNorm {
    pub gamma: DPtr,
    pub beta: DPtr,
    pub y: DPtr,
    pub half_out: Option<Precision>,
    pub stats: DPtr,
    pub groups: usize,
    pub eps: f32,
    pub silu: Silu,
    /// The block of the `gn_one_pass` launch the GroupNorm stands for
    /// ([`NormSplit::one_pass`]), whose sums the kernel reproduces in its order.
    pub one_pass_threads: u32,
}

/// ReduceNormArgs of kernels/norm.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct ReduceNormArgs {
    gamma: DPtr,
    beta: DPtr,
    y: DPtr,
    stats: DPtr,
    groups: i32,
    silu: i32,
    kind: i32,
    one_pass_threads: i32,
    eps: f32,
    pad: i32,
}

const _: () = assert!(std::mem::size_of::<ReduceNormArgs>() == 56);

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for ReduceNormArgs {}

impl ReductionNorm {
    /// The kernel's argument block and its block size, for the output of a launch with `hw`
    /// pixels an image and `c` channels; an error where the GroupNorm cannot be taken so.
    pub(super) fn args(&self, hw: usize, c: usize) -> Result<(ReduceNormArgs, u32)> {
        for (p, what) in [
            (self.gamma, "GroupNorm scale"),
            (self.beta, "GroupNorm shift"),
            (self.y, "GroupNorm output"),
            (self.stats, "GroupNorm statistics"),
        ] {
            need(p, what)?;
        }
        let groups = self.groups;
        let cg = if groups > 0 && c % groups == 0 {
            c / groups
        } else {
            0
        };
        let threads = (cg > 0)
            .then(|| reduction_norm_threads(hw, cg))
            .flatten()
            .filter(|_| Some(self.one_pass_threads) == one_pass_threads(hw, cg))
            .ok_or_else(|| {
                Error::Cuda(format!(
                    "internal: a reduction asked for the GroupNorm of {c} channels in {groups} \
                     groups over {hw} pixels in place of a one-pass launch of {} threads: more \
                     values than it holds, or not the one-pass block of that GroupNorm",
                    self.one_pass_threads
                ))
            })?;
        Ok((
            ReduceNormArgs {
                gamma: self.gamma,
                beta: self.beta,
                y: self.y,
                stats: self.stats,
                groups: i32_of(groups, "GroupNorm groups")?,
                silu: self.silu.arg(),
                kind: self.half_out.map(half_kind).transpose()?.unwrap_or(0),
                one_pass_threads: i32_of(self.one_pass_threads as usize, "GroupNorm threads")?,
                eps: self.eps,
                pad: 0,
            },
            threads,
        ))
    }
}

/// The distinct ways a GroupNorm of these sizes can run, for the selftest and the sweep: three
/// launches, then one pass where the groups allow it, each without and with the `_ilp`
/// kernels.
pub(crate) fn norm_forms(
    n: usize,
    hw: usize,
    c: usize,
    groups: usize,
    sms: usize,
) -> Vec<NormSplit> {
    let mut out: Vec<NormSplit> = Vec::new();
    for (one_pass, ilp) in [(false, false), (false, true), (true, false), (true, true)] {
        let split = plan_norm(n, hw, c, groups, sms, one_pass, ilp);
        if (!one_pass || split.one_pass.is_some()) && !out.contains(&split) {
            out.push(split);
        }
    }
    out
}

impl NormSplit {
    /// The form in words, for the selftest, the sweep and the profile.
    pub fn form(&self) -> String {
        let form = match self.one_pass {
            Some(threads) => format!("one pass, {threads} threads"),
            None if self.from_producer => format!("{} chunks summed by the producer", self.chunks),
            None => format!("{} chunks", self.chunks),
        };
        if self.ilp {
            form + ", loads ahead"
        } else {
            form
        }
    }

    /// f32 elements of the f64 partial sums (sum and sum of squares per chunk and channel).
    pub fn partial_len(&self, n: usize, c: usize) -> usize {
        4 * n * self.chunks * c
    }

    /// What a scratch buffer of the three-launch form (partial sums, affine, backward means)
    /// of `len` f32 elements takes: nothing in one pass, which keeps its group in registers.
    pub fn scratch_len(&self, len: usize) -> usize {
        if self.one_pass.is_some() {
            0
        } else {
            len
        }
    }
}

/// The kernels of one form of the GroupNorm backward pass (kernels/norm.cu): over an fp32 or a
/// 16-bit `x` (`_x16`), plain or `_ilp`, from an fp32 or a 16-bit `dy` (`_dy16`, which only
/// the `_ilp` kernels have). A 16-bit x has no 16-bit-output kernel (`apply_half` is the fp32
/// x's, which the launcher refuses to run over one).
#[derive(Clone)]
pub(super) struct NormBackwardFns {
    partial: CudaFunction,
    apply: CudaFunction,
    apply_half: CudaFunction,
    apply_split: CudaFunction,
    one_pass: CudaFunction,
    /// The kernels' name suffix (`_x16_dy16_ilp`, say), for errors.
    suffix: String,
}

impl NormBackwardFns {
    /// Each form's kernel-name suffix (`_x16_dy16_ilp`, say) and kernels (partial sums,
    /// element pass: fp32, 16-bit output, split; one pass), in the order
    /// [`Kernels::group_norm_backward`] indexes them: three over an fp32 x, then three over a
    /// 16-bit one.
    pub(super) fn names() -> impl Iterator<Item = (String, [String; 5])> {
        (0..6).map(|i| {
            let x = if i >= 3 { "_x16" } else { "" };
            let f = ["", "_ilp", "_dy16_ilp"][i % 3];
            let kernels = [
                format!("gn_bwd_partial{x}{f}"),
                format!("gn_bwd_apply{x}{f}"),
                format!("gn_bwd_apply_half{f}"),
                format!("gn_bwd_apply{x}_split{f}"),
                format!("gn_bwd_one_pass{x}{f}"),
            ];
            (format!("{x}{f}"), kernels)
        })
    }

    /// The six forms, each kernel looked up as `get(module, name)`.
    pub(super) fn all(
        get: &dyn Fn(&str, &str) -> Result<CudaFunction>,
        module: &str,
    ) -> Result<[Self; 6]> {
        let forms = Self::names()
            .map(
                |(suffix, [partial, apply, apply_half, apply_split, one_pass])| {
                    let f = |name: &str| get(module, name);
                    Ok(NormBackwardFns {
                        partial: f(&partial)?,
                        apply: f(&apply)?,
                        apply_half: f(&apply_half)?,
                        apply_split: f(&apply_split)?,
                        one_pass: f(&one_pass)?,
                        suffix,
                    })
                },
            )
            .collect::<Result<Vec<_>>>()?;
        forms
            .try_into()
            .map_err(|_| Error::Cuda("internal: GroupNorm backward kernel table".into()))
    }
}

/// Shape of a GroupNorm call and its reduction split.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormDims {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub groups: usize,
    pub split: NormSplit,
}

impl NormDims {
    /// `(n, hw, c, groups, chunks, chunk pixels)` as the forward and backward kernels take them,
    /// after checking that the groups divide the channels and that every index fits an i32.
    fn kernel_args(&self) -> Result<(i32, i32, i32, i32, i32, i32)> {
        let NormDims {
            n,
            hw,
            c,
            groups,
            split,
        } = *self;
        if groups == 0 || c % groups != 0 {
            return Err(Error::Cuda(format!(
                "GroupNorm: {groups} groups do not divide {c} channels"
            )));
        }
        i32_of(n * hw * c, "GroupNorm elements")?;
        Ok((
            n as i32,
            hw as i32,
            c as i32,
            groups as i32,
            split.chunks as i32,
            i32_of(split.chunk_px, "chunk")?,
        ))
    }
}

/// A GroupNorm backward kernel's leading arguments: `x` (with its kind, for the `_x16` forms),
/// then `dy` (with its kind, for the `_dy16` forms).
fn backward_inputs<'a>(
    b: &mut LaunchArgs<'a>,
    x: &'a DPtr,
    xkind: &'a Option<i32>,
    dy: &'a DPtr,
    dykind: &'a Option<i32>,
) {
    b.arg(x);
    if let Some(k) = xkind {
        b.arg(k);
    }
    b.arg(dy);
    if let Some(k) = dykind {
        b.arg(k);
    }
}

/// The launch-name suffix of `pass`'s kernels for an `x` of 16-bit values (`x_half`: the
/// `_x16` ones) or fp32 (none), or an internal error naming what the `_x16` kernels cannot
/// take: `output` (an output they do not write), channels not in units of four, `unaligned`.
fn x16_suffix(
    pass: &str,
    x_half: Option<Precision>,
    c: usize,
    output: Option<String>,
    unaligned: Option<String>,
) -> Result<&'static str> {
    if x_half.is_none() {
        return Ok("");
    }
    let channels = (c % 4 != 0).then(|| format!("{c} channels, not a multiple of 4"));
    match output.or(channels).or(unaligned) {
        Some(why) => Err(Error::Cuda(format!(
            "internal: a {pass} of 16-bit input with {why}"
        ))),
        None => Ok("_x16"),
    }
}

impl Kernels {
    /// The element-wise GroupNorm passes (kernels/norm.cu `for_units`) of kernel `f`: a grid
    /// row per image, the `lanes` units of channels of a pixel across threadIdx.x, pixels
    /// across threadIdx.y and the row's blocks; about eight 256-thread blocks per
    /// multiprocessor in all, or, for the `_ilp` kernels (`whole_waves`), two waves of the
    /// blocks `f` keeps resident on one: their registers allow three to six, and a grid of
    /// eight a multiprocessor would leave its last wave part-full.
    fn norm_units(
        &self,
        st: &CudaStream,
        f: &CudaFunction,
        n: usize,
        hw: usize,
        lanes: usize,
        whole_waves: bool,
    ) -> Result<LaunchConfig> {
        if n > 65535 {
            return Err(Error::Cuda(format!(
                "GroupNorm too large for one launch: {n} images"
            )));
        }
        let bx = lanes.clamp(1, BLOCK as usize);
        let by = (BLOCK as usize / bx).max(1);
        let per_sm = if whole_waves {
            // cudarc's occupancy query does not make the context current itself. It is a
            // calculation with no stream work, so graph capture should not refuse it; should it
            // fail all the same, only the grid's size is at stake, so the plain rule stands in.
            cu(st.context().bind_to_thread(), "binding the CUDA context")?;
            f.occupancy_max_active_blocks_per_multiprocessor((bx * by) as u32, 0, None)
                .map_or(8, |resident| 2 * resident.max(1) as usize)
        } else {
            8
        };
        let per_image = (per_sm * self.sms as usize).div_ceil(n.max(1));
        let gx = hw.div_ceil(by).clamp(1, per_image.max(1));
        Ok(cfg((gx as u32, n as u32, 1), (bx as u32, by as u32, 1)))
    }

    /// The GroupNorm kernels that run `silu`: the approximate module's for [`Silu::Approx`].
    pub(super) fn silu_norm(&self, silu: Silu) -> &SiluNormFns {
        &self.silu_norms[usize::from(silu == Silu::Approx)]
    }

    fn norm_grid(&self, n: usize, c: usize, split: NormSplit) -> Result<LaunchConfig> {
        self.norm_grid_of(n, c, split, 32)
    }

    /// [`norm_grid`](Self::norm_grid) for blocks of `per_block` channels (64: the kernels that
    /// take two channels a thread).
    fn norm_grid_of(
        &self,
        n: usize,
        c: usize,
        split: NormSplit,
        per_block: usize,
    ) -> Result<LaunchConfig> {
        if n > 65535 || c.div_ceil(per_block) > 65535 {
            return Err(Error::Cuda(format!(
                "GroupNorm too large for one launch: {n} images, {c} channels"
            )));
        }
        Ok(cfg(
            (
                i32_of(split.chunks, "chunks")? as u32,
                c.div_ceil(per_block) as u32,
                n as u32,
            ),
            (32, 8, 1),
        ))
    }

    /// GroupNorm forward: statistics into `stats` (`[mean | rstd]`, n x groups each), the
    /// per-channel affine into `affine` (`[n][2][c]`), then `y`, in fp32, or with `half_out`
    /// in bf16/fp16 (two elements per f32 slot) for the tensor-core convolutions it feeds.
    /// With `x_half`, `x` holds 16-bit values of that precision (the `_x16` kernels; a 16-bit
    /// output only).
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        &self,
        st: &CudaStream,
        d: NormDims,
        x: DPtr,
        x_half: Option<Precision>,
        gamma: DPtr,
        beta: DPtr,
        y: DPtr,
        partial: DPtr,
        stats: DPtr,
        affine: DPtr,
        eps: f32,
        silu: Silu,
        half_out: Option<Precision>,
    ) -> Result<()> {
        for (p, what) in [
            (x, "input"),
            (gamma, "scale"),
            (beta, "shift"),
            (y, "output"),
            (partial, "partial sums"),
            (stats, "statistics"),
            (affine, "affine"),
        ] {
            need(p, what)?;
        }
        let NormDims {
            n,
            hw,
            c,
            groups,
            split,
        } = d;
        let (ni, hwi, ci, gi, chunks, cpx) = d.kernel_args()?;
        let silu_fns = self.silu_norm(silu);
        let silu = silu.arg();
        let kind = half_out.map_or(Ok(0), half_kind)?;
        let xkind = x_half.map_or(Ok(0), half_kind)?;
        if split.from_producer && split.one_pass.is_some() {
            return Err(Error::Cuda(
                "internal: a one-pass GroupNorm given its partial sums".into(),
            ));
        }
        let x16 = x16_suffix(
            "GroupNorm",
            x_half,
            c,
            half_out
                .is_none()
                .then(|| "an fp32 output (the `_x16` kernels write 16 bits)".into()),
            (x % 8 != 0).then(|| "an input not 8-byte aligned".into()),
        )?;
        if let Some(threads) = split.one_pass {
            let mut b = st.launch_builder(match (x_half.is_some(), split.ilp) {
                (false, false) => &silu_fns.one_pass,
                (false, true) => &silu_fns.one_pass_ilp,
                (true, false) => &silu_fns.one_pass_x16,
                (true, true) => &silu_fns.one_pass_x16_ilp,
            });
            b.arg(&x);
            if x_half.is_some() {
                b.arg(&xkind);
            }
            b.arg(&gamma)
                .arg(&beta)
                .arg(&y)
                .arg(&stats)
                .arg(&ni)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&eps)
                .arg(&silu)
                .arg(&kind);
            let one = cfg(((n * groups) as u32, 1, 1), (threads, 1, 1));
            // SAFETY: x is n x hw x c values (fp32, or of `xkind`), y room for as many values of
            // `kind`, stats for 2 n groups floats; the block holds every pixel of its group
            // (one_pass_threads).
            return cu(
                unsafe { b.launch(one) }.map(drop),
                &format!("launching gn_one_pass{x16}"),
            );
        }
        if !split.from_producer {
            let mut b = st.launch_builder(if x_half.is_some() {
                &self.gn_partial_x16
            } else {
                &self.gn_partial
            });
            b.arg(&x);
            if x_half.is_some() {
                b.arg(&xkind);
            }
            b.arg(&hwi).arg(&ci).arg(&cpx).arg(&partial);
            // SAFETY: x is n x hw x c; partial holds n x chunks x c pairs of doubles.
            cu(
                unsafe { b.launch(self.norm_grid(n, c, split)?) }.map(drop),
                &format!("launching gn_partial{x16}"),
            )?;
        }
        let mut b = st.launch_builder(&self.gn_finalize);
        b.arg(&partial)
            .arg(&ni)
            .arg(&hwi)
            .arg(&ci)
            .arg(&gi)
            .arg(&chunks)
            .arg(&eps)
            .arg(&gamma)
            .arg(&beta)
            .arg(&stats)
            .arg(&affine);
        let fin = cfg(((n * groups) as u32, 1, 1), (GN_FIN_THREADS, 1, 1));
        // SAFETY: stats holds 2 n groups floats, affine 2 n c.
        cu(unsafe { b.launch(fin) }.map(drop), "launching gn_finalize")?;
        if half_out.is_some() {
            // A 16-bit x was checked above (its unit of four values is 8 bytes).
            if c % 4 != 0 || (x_half.is_none() && x % 16 != 0) || affine % 16 != 0 || y % 8 != 0 {
                return Err(Error::Cuda(format!(
                    "internal: 16-bit GroupNorm output with {c} channels or unaligned buffers"
                )));
            }
            let (f, name) = match (x_half.is_some(), split.ilp) {
                (false, false) => (&silu_fns.apply_half, "gn_apply_half"),
                (false, true) => (&silu_fns.apply_half_ilp, "gn_apply_half_ilp"),
                (true, false) => (&silu_fns.apply_half_x16, "gn_apply_half_x16"),
                (true, true) => (&silu_fns.apply_half_x16_ilp, "gn_apply_half_x16_ilp"),
            };
            let grid = self.norm_units(st, f, n, hw, c / 4, split.ilp)?;
            let mut b = st.launch_builder(f);
            b.arg(&x);
            if x_half.is_some() {
                b.arg(&xkind);
            }
            b.arg(&affine)
                .arg(&y)
                .arg(&hwi)
                .arg(&ci)
                .arg(&silu)
                .arg(&kind);
            // SAFETY: x is n x hw x c values (fp32, or of `xkind`), y room for n x hw x c 16-bit
            // values.
            return cu(
                unsafe { b.launch(grid) }.map(drop),
                &format!("launching {name}"),
            );
        }
        let vec = c % 4 == 0 && [x, y, affine].iter().all(|p| p % 16 == 0);
        let vec4 = vec as i32;
        let f = if split.ilp {
            &silu_fns.apply_ilp
        } else {
            &silu_fns.apply
        };
        let lanes = if vec { c / 4 } else { c };
        let grid = self.norm_units(st, f, n, hw, lanes, split.ilp)?;
        let mut b = st.launch_builder(f);
        b.arg(&x)
            .arg(&affine)
            .arg(&y)
            .arg(&hwi)
            .arg(&ci)
            .arg(&silu)
            .arg(&vec4);
        // SAFETY: x and y are n x hw x c.
        cu(unsafe { b.launch(grid) }.map(drop), "launching gn_apply")
    }

    /// The concatenation `y = [a | b]` of `n` images of `hw` pixels, `ca` and `cb` channels
    /// (with its 16-bit copy where `half` gives one, or, with a `y` of 0, only that copy, as
    /// [`Kernels::concat`] writes them), and the partial sums of the GroupNorm (three
    /// launches, `split`) that reads `y` (or the copy alone), into `partial`: that GroupNorm's
    /// first launch, the same bits, without its read of `y`.
    #[allow(clippy::too_many_arguments)]
    pub fn concat_with_norm_sums(
        &self,
        st: &CudaStream,
        a: DPtr,
        b_: DPtr,
        y: DPtr,
        half: Option<(DPtr, Precision)>,
        n: usize,
        hw: usize,
        (ca, cb): (usize, usize),
        split: NormSplit,
        partial: DPtr,
    ) -> Result<()> {
        let (y16, kind) = concat_outputs(a, b_, y, half)?;
        need(partial, "partial sums")?;
        if split.one_pass.is_some() || !split.from_producer {
            return Err(Error::Cuda(
                "internal: GroupNorm sums from a concatenation for a GroupNorm that does not \
                 take them (one launch, or its own partial sums)"
                    .into(),
            ));
        }
        let c = ca + cb;
        i32_of(n * hw * c, "concatenated elements")?;
        let (hwi, cai, cbi) = (hw as i32, ca as i32, cb as i32);
        let cpx = i32_of(split.chunk_px, "chunk")?;
        // In 16 bits only, two channels a thread where the channels pair up and the pairs are
        // aligned (the same bits); only that kernel reads back a side already written.
        let pairs =
            y == 0 && ca % 2 == 0 && cb % 2 == 0 && a % 8 == 0 && b_ % 8 == 0 && y16 % 4 == 0;
        if !pairs && (a == 0 || b_ == 0) {
            return Err(Error::Cuda(format!(
                "internal: a concatenation of {ca}+{cb} channels with a side already written, \
                 but not in 16 bits only with even, aligned sides"
            )));
        }
        let mut grid = self.norm_grid(n, c, split)?;
        let (f, name) = if pairs {
            grid.grid_dim.1 = c.div_ceil(64) as u32;
            match self.launch.concat_sums_ahead {
                true => (
                    &self.gn_concat_partial_pairs_ahead,
                    "gn_concat_partial_pairs_ahead",
                ),
                false => (&self.gn_concat_partial_pairs, "gn_concat_partial_pairs"),
            }
        } else {
            (&self.gn_concat_partial, "gn_concat_partial")
        };
        let mut b = st.launch_builder(f);
        b.arg(&a).arg(&b_);
        if !pairs {
            b.arg(&y);
        }
        b.arg(&y16)
            .arg(&kind)
            .arg(&hwi)
            .arg(&cai)
            .arg(&cbi)
            .arg(&cpx)
            .arg(&partial);
        // SAFETY: a is n x hw x ca and b n x hw x cb (or 0: a side already in y16), y (when set)
        // n x hw x (ca + cb), y16 (when set) room for as many 16-bit values; partial holds n x
        // chunks x c pairs of doubles.
        cu(
            unsafe { b.launch(grid) }.map(drop),
            &format!("launching {name}"),
        )
    }

    /// GroupNorm input gradient from the forward's `stats`: `dx (+)= ...`; with `half_out`
    /// (overwriting only) in bf16/fp16 for the tensor-core input gradient that reads it; with
    /// `copy` (fp32 `dx` only), also the new `dx` in 16 bits at the given address, what a
    /// conversion launch would write. With `x_half`, `x` holds 16-bit values of that precision
    /// (the `_x16` kernels; an fp32 `dx` only). With `sides` (not in one pass, units of four,
    /// neither `half_out` nor `copy`), the new `dx` goes to the two sides of the concatenation
    /// whose gradient it is instead, `dx` only read where accumulating. (The names are fields
    /// of [`NormBackwardIn`] and [`NormBackwardOut`].)
    pub fn group_norm_backward(
        &self,
        st: &CudaStream,
        d: NormDims,
        inputs: NormBackwardIn,
        outputs: NormBackwardOut,
    ) -> Result<()> {
        let NormBackwardIn {
            x,
            x_half,
            dy,
            dy_half,
            gamma,
            beta,
            stats,
            silu,
        } = inputs;
        let NormBackwardOut {
            partial,
            means,
            dx,
            accumulate,
            add,
            half_out,
            copy,
            sides,
            launches,
        } = outputs;
        // A unit of four 16-bit values is 8 bytes, of fp32 16.
        let dy_unit = if dy_half.is_some() { 8 } else { 16 };
        // The three-launch pass writes a 16-bit gradient in units of four (gn_bwd_apply_half).
        let units_unaligned = d.split.one_pass.is_none() && (x % 16 != 0 || dy % dy_unit != 0);
        if half_out.is_some() && (accumulate || d.c % 4 != 0 || dx % 8 != 0 || units_unaligned) {
            return Err(Error::Cuda(format!(
                "internal: 16-bit GroupNorm input gradient accumulating, with {} channels or \
                 unaligned (input {x:#x}, output gradient {dy:#x}, input gradient {dx:#x})",
                d.c
            )));
        }
        if add.is_some() && !(accumulate && half_out.is_none() && sides.is_none()) {
            return Err(Error::Cuda(
                "internal: a gradient added onto a GroupNorm input gradient that is not an fp32 \
                 one accumulated whole"
                    .into(),
            ));
        }
        let add = add.unwrap_or(0);
        if copy.is_some() && half_out.is_some() {
            return Err(Error::Cuda(
                "internal: a 16-bit copy of a GroupNorm input gradient that is 16-bit itself"
                    .into(),
            ));
        }
        // The backward pass always sums its own input (no producer writes its sums).
        if d.split.from_producer {
            return Err(Error::Cuda(
                "internal: GroupNorm backward sums from a producer".into(),
            ));
        }
        let (dx16, kind16) = half_output(copy, "16-bit copy of the input gradient")?;
        let xkind = x_half.map_or(Ok(0), half_kind)?;
        let dykind = dy_half.map_or(Ok(0), half_kind)?;
        if dy_half.is_some() && !d.split.ilp {
            return Err(Error::Cuda(
                "internal: a GroupNorm backward pass of a 16-bit output gradient without the \
                 `_ilp` kernels (only they have `_dy16` forms)"
                    .into(),
            ));
        }
        for (p, what) in [
            (x, "input"),
            (dy, "output gradient"),
            (gamma, "scale"),
            (beta, "shift"),
            (stats, "statistics"),
            (partial, "partial sums"),
            (means, "group means"),
            (dx, "input gradient"),
        ] {
            need(p, what)?;
        }
        let NormDims {
            n,
            hw,
            c,
            groups,
            split,
        } = d;
        let (ni, hwi, ci, gi, chunks, cpx) = d.kernel_args()?;
        let silu_fns = self.silu_norm(silu);
        let silu = silu.arg();
        let kind = half_out.map_or(Ok(0), half_kind)?;
        let acc = accumulate as i32;
        let dy_aligned = dy % dy_unit == 0;
        let vec =
            c % 4 == 0 && dy_aligned && [x, dx, add].iter().all(|p| p % 16 == 0) && dx16 % 8 == 0;
        // The element pass over a 16-bit x takes units of four only (x 8-byte aligned).
        let unaligned = x % 8 != 0
            || (split.one_pass.is_none()
                && (!dy_aligned || dx % 16 != 0 || add % 16 != 0 || dx16 % 8 != 0));
        // What the `_x16` kernels cannot take.
        x16_suffix(
            "GroupNorm backward pass",
            x_half,
            c,
            half_out
                .is_some()
                .then(|| "a 16-bit input gradient (the `_x16` kernels write fp32)".into()),
            unaligned.then(|| {
                format!(
                    "unaligned buffers (input {x:#x}, output gradient {dy:#x}, input gradient \
                     {dx:#x}, its 16-bit copy {dx16:#x}, what it adds {add:#x})"
                )
            }),
        )?;
        // (Before the one-pass launch, which cannot split: GradSides::args refuses it.)
        let io_aligned =
            dy_aligned && dx % 16 == 0 && x % if x_half.is_some() { 8 } else { 16 } == 0;
        let sides = match sides {
            Some(g) => Some(g.args(d, io_aligned, half_out.is_some() || copy.is_some())?),
            None => None,
        };
        let fns = &silu_fns.bwd[3 * x_half.is_some() as usize
            + match (split.ilp, dy_half.is_some()) {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => 2,
            }];
        let form = &fns.suffix;
        // The kinds the `_x16` and `_dy16` forms take (no 16-bit x reaches `apply_half`:
        // refused above).
        let (xkind, dykind) = (x_half.map(|_| xkind), dy_half.map(|_| dykind));
        let runs = |l: NormLaunches| launches == NormLaunches::All || launches == l;
        if let Some(threads) = split.one_pass {
            if launches != NormLaunches::All {
                return Err(Error::Cuda(format!(
                    "internal: {launches:?} alone of a one-pass GroupNorm backward pass"
                )));
            }
            let mut b = st.launch_builder(&fns.one_pass);
            backward_inputs(&mut b, &x, &xkind, &dy, &dykind);
            b.arg(&stats)
                .arg(&gamma)
                .arg(&beta)
                .arg(&dx)
                .arg(&add)
                .arg(&dx16)
                .arg(&kind16)
                .arg(&ni)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&silu)
                .arg(&acc)
                .arg(&kind);
            let one = cfg(((n * groups) as u32, 1, 1), (threads, 1, 1));
            // SAFETY: as in the forward; dx holds n x hw x c values of `kind`, dx16 (when set)
            // room for as many 16-bit values.
            return cu(
                unsafe { b.launch(one) }.map(drop),
                &format!("launching gn_bwd_one_pass{form}"),
            );
        }
        if runs(NormLaunches::Sums) {
            // Over a 16-bit x and dy (c a multiple of four, both aligned: checked above), two
            // channels a thread where asked, the same sums.
            let pairs = self.launch.gn_bwd_sums_pairs && x_half.is_some() && dy_half.is_some();
            let (partial_fn, grid, name) = match pairs {
                true => (
                    &silu_fns.bwd_partial_pairs,
                    self.norm_grid_of(n, c, split, 64)?,
                    "gn_bwd_partial_x16_dy16_pairs".to_string(),
                ),
                false => (
                    &fns.partial,
                    self.norm_grid(n, c, split)?,
                    format!("gn_bwd_partial{form}"),
                ),
            };
            let mut b = st.launch_builder(partial_fn);
            backward_inputs(&mut b, &x, &xkind, &dy, &dykind);
            b.arg(&stats)
                .arg(&gamma)
                .arg(&beta)
                .arg(&ni)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&silu)
                .arg(&cpx)
                .arg(&partial);
            // SAFETY: as in the forward.
            cu(
                unsafe { b.launch(grid) }.map(drop),
                &format!("launching {name}"),
            )?;
        }
        if runs(NormLaunches::Means) {
            let mut b = st.launch_builder(&self.gn_bwd_finalize);
            b.arg(&partial)
                .arg(&ni)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&chunks)
                .arg(&means);
            let fin = cfg(((n * groups) as u32, 1, 1), (GN_FIN_THREADS, 1, 1));
            // SAFETY: means holds 2 n groups floats.
            cu(
                unsafe { b.launch(fin) }.map(drop),
                "launching gn_bwd_finalize",
            )?;
        }
        if !runs(NormLaunches::Apply) {
            return Ok(());
        }
        // The element-wise pass: 16-bit (`apply_half`), fp32 (`apply`) or the split
        // (`apply_split`). No 16-bit input gradient over a 16-bit x (refused above).
        if half_out.is_some() {
            let grid = self.norm_units(st, &fns.apply_half, n, hw, c / 4, split.ilp)?;
            let mut b = st.launch_builder(&fns.apply_half);
            backward_inputs(&mut b, &x, &xkind, &dy, &dykind);
            b.arg(&stats)
                .arg(&means)
                .arg(&gamma)
                .arg(&beta)
                .arg(&dx)
                .arg(&hwi)
                .arg(&ci)
                .arg(&gi)
                .arg(&silu)
                .arg(&kind);
            // SAFETY: x (and dy, unless 16-bit) are n x hw x c floats, dx room for as many
            // 16-bit values.
            return cu(
                unsafe { b.launch(grid) }.map(drop),
                &format!("launching gn_bwd_apply_half{form}"),
            );
        }
        // A 16-bit x is in units of four (checked above; its unit is 8 bytes), and so are the
        // sides of a split (GradSides::args checked them).
        let vec = vec || x_half.is_some() || sides.is_some();
        let vec4 = vec as i32;
        let lanes = if vec { c / 4 } else { c };
        let (apply_fn, kind16) = match sides {
            Some((_, kind)) => (&fns.apply_split, kind),
            None => (&fns.apply, kind16),
        };
        let grid = self.norm_units(st, apply_fn, n, hw, lanes, split.ilp)?;
        let mut b = st.launch_builder(apply_fn);
        backward_inputs(&mut b, &x, &xkind, &dy, &dykind);
        b.arg(&stats)
            .arg(&means)
            .arg(&gamma)
            .arg(&beta)
            .arg(&dx)
            .arg(&add)
            .arg(&dx16)
            .arg(&kind16)
            .arg(&hwi)
            .arg(&ci)
            .arg(&gi)
            .arg(&silu)
            .arg(&acc)
            .arg(&vec4);
        if let Some((g, _)) = &sides {
            b.arg(g);
        }
        let split_form = if sides.is_some() { " (split)" } else { "" };
        // SAFETY: x (fp32, or of `xkind`), dy (fp32, or of `dykind`) and dx are n x hw x c, dx16
        // (when set) room for as many 16-bit values; the sides (when set) n x hw x ca and
        // n x hw x cb, with their 16-bit copies.
        cu(
            unsafe { b.launch(grid) }.map(drop),
            &format!("launching gn_bwd_apply{form}{split_form}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A concatenation's gradient split takes the element-wise launch (not one pass), sides of
    /// whole units of four channels, aligned buffers and 16-bit copies of one 16-bit kind;
    /// anything else is a named error (which the launcher returns before any launch).
    #[test]
    fn grad_sides_refuse_what_the_split_kernels_cannot_take() {
        let split = plan_norm(1, 1024, 768, 32, 132, false, false);
        let d = NormDims {
            n: 1,
            hw: 1024,
            c: 768,
            groups: 32,
            split,
        };
        let bf16 = Precision::Bf16;
        let good = GradSides {
            a: 0x1000,
            a16: Some((0x2000, bf16)),
            b: 0x3000,
            b16: Some((0x4000, bf16)),
            ca: 512,
        };
        let (args, kind) = good.args(d, true, false).unwrap();
        assert_eq!((args.ca, args.cb, kind), (512, 256, 1));
        let one_pass = NormDims {
            split: NormSplit {
                one_pass: Some(256),
                ..split
            },
            ..d
        };
        let unaligned = |b| (GradSides { b, ..good }, d, true, false);
        let copy = |a16| (GradSides { a16, ..good }, d, true, false);
        for (sides, d, io_aligned, whole) in [
            (good, d, true, true),
            (good, one_pass, true, false),
            (good, d, false, false),
            (GradSides { ca: 510, ..good }, d, true, false),
            (GradSides { ca: 768, ..good }, d, true, false),
            (GradSides { ca: 0, ..good }, d, true, false),
            unaligned(0x3004),
            copy(Some((0x2004, bf16))),
            copy(Some((0x2000, Precision::Fp16))),
            copy(Some((0x2000, Precision::Fp32))),
        ] {
            match sides.args(d, io_aligned, whole) {
                Err(Error::Cuda(msg)) => assert!(msg.contains("split"), "{msg}"),
                other => panic!("{sides:?} {whole}: {other:?}"),
            }
        }
        let fp32 = GradSides {
            a16: None,
            b16: None,
            ..good
        };
        assert!(fp32.args(d, true, false).is_ok());
        let one_copy = GradSides { b16: None, ..good };
        assert_eq!(one_copy.args(d, true, false).unwrap().0.b16, 0);
    }

    #[test]
    fn norm_split_covers_every_pixel() {
        for (n, hw, c) in [(1, 65536, 128), (8, 64, 512), (3, 35, 96), (1, 1, 32)] {
            let s = plan_norm(n, hw, c, 32, 132, false, false);
            assert!(
                s.chunks * s.chunk_px >= hw && (s.chunks - 1) * s.chunk_px < hw,
                "{s:?}"
            );
            assert_eq!(s.one_pass, None);
        }
    }

    #[test]
    fn one_pass_groupnorm_takes_the_small_levels_only() {
        // celebahq-256 (32 groups): the 8x8 to 32x32 levels in one pass, not 64x64 and up.
        for (hw, c, want) in [
            (8 * 8, 512, Some(128)),
            (16 * 16, 512, Some(512)),
            (32 * 32, 256, Some(1024)),
            (64 * 64, 256, None),
            (256 * 256, 128, None),
        ] {
            assert_eq!(
                plan_norm(1, hw, c, 32, 132, true, false).one_pass,
                want,
                "{hw} {c}"
            );
            assert_eq!(plan_norm(8, hw, c, 32, 132, false, false).one_pass, None);
        }
        // Odd group widths: whole warps, every pixel row within the block.
        for (hw, cg) in [(35, 3), (1, 1), (15, 3), (100, 7)] {
            let t = one_pass_threads(hw, cg).unwrap() as usize;
            assert!(
                t % 32 == 0 && t / cg * GN_ONE_PASS_PIXELS >= hw,
                "{hw} {cg} {t}"
            );
        }
        assert_eq!(one_pass_threads(1, 2048), None);
    }
}
