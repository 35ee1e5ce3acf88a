//! What each step of a lowered [`Program`] is (a kind, a label naming its shape and kernel, its
//! FLOPs), the per-step timings [`CudaUnet::profile`](super::CudaUnet::profile) measures, and the
//! measured bf16 rates that achieved throughput is compared with.
//!
//! FLOPs are counted as PyTorch's FLOP counter counts them, so that per-step figures add up to
//! [`Graph::forward_flops`](crate::model::Graph::forward_flops) and
//! [`Graph::forward_vjp_flops`](crate::model::Graph::forward_vjp_flops): 2 per multiply-add, matrix
//! products only (convolutions as implicit GEMMs, linear layers, attention's two batched
//! products forward and four backward); normalisation, softmax, element-wise work and the
//! split-K reduction count 0.

use serde::Serialize;

use super::kernels::{Capabilities, ConvKernel, Silu};
use super::precision::Precision;
use super::program::{ConvStep, KernelConfig, Program, Step, WKind};
use super::unet::AttnKernel;
use crate::model::Graph;
use crate::Result;

/// What one step of a program is.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StepInfo {
    /// The kind of work, e.g. `conv 3x3 fwd`, `groupnorm bwd`.
    pub kind: &'static str,
    /// The shape, in the forward operation's terms, e.g. `3x3 s1 128->128 out 256x256`
    /// (per image; the batch is the program's).
    pub shape: String,
    /// How it runs where there is a choice: the convolution kernel and split-K count, the
    /// GroupNorm chunking; empty otherwise.
    pub variant: String,
    /// Floating-point operations as PyTorch counts them.
    pub flops: f64,
    /// Kernel launches the step makes.
    pub launches: usize,
}

impl StepInfo {
    /// `shape [variant]`.
    pub fn label(&self) -> String {
        if self.variant.is_empty() {
            self.shape.clone()
        } else {
            format!("{} [{}]", self.shape, self.variant)
        }
    }
}

/// `HxW` of a per-image pixel count `hw` at some level of an `h x w` input, or `N px` when no
/// level matches.
fn size(hw: usize, h: usize, w: usize) -> String {
    (0..usize::BITS)
        .map(|l| (h >> l, w >> l))
        .take_while(|&(a, b)| a > 0 && b > 0)
        .find(|&(a, b)| a * b == hw)
        .map_or_else(|| format!("{hw} px"), |(a, b)| format!("{a}x{b}"))
}

fn kernel_name(k: ConvKernel) -> String {
    match k {
        ConvKernel::Vec => "vec".into(),
        ConvKernel::Any => "any".into(),
        ConvKernel::Narrow => "narrow".into(),
        ConvKernel::FewIn => "few-in".into(),
        ConvKernel::Tensor(p) => format!("tc-{}", p.name()),
        ConvKernel::NarrowTensor(p) => format!("narrow tc-{}", p.name()),
        ConvKernel::FewInTensor => "few-in tc-bf16x3".into(),
    }
}

fn conv_info(c: &ConvStep, n: usize) -> StepInfo {
    let s = &c.shape;
    let flops = 2.0 * (s.rows() * s.ncols * s.k()) as f64;
    let mut variant = kernel_name(c.launch.kernel);
    if c.launch.half_input {
        variant += ", 16-bit input";
    } else if c.launch.deep {
        variant += match c.launch.kernel {
            ConvKernel::Tensor(Precision::Tf32) => ", async",
            _ => ", staged",
        };
    }
    if c.launch.wgmma {
        variant += ", ";
        variant += c.launch.tile.describe();
        variant += &c.launch.loads_described();
    }
    if c.launch.splits > 1 {
        variant += &format!(", split-K {}", c.launch.splits);
    }
    if c.side16.is_some() {
        variant += ", concatenation side";
    }
    if c.copy16.is_some() {
        variant += ", 16-bit copy";
    }
    if !c.fp32_out {
        variant += ", no fp32 output";
    }
    if c.norm.is_some() {
        variant += ", GroupNorm in the reduction";
    }
    let launches = 1 + usize::from(c.launch.splits > 1);
    let (kind, shape) = match c.w.kind {
        // Token-wise linear layers: one-tap products over n * tokens rows.
        WKind::LinearT | WKind::Linear => {
            let forward = c.w.kind == WKind::LinearT;
            // The input gradient multiplies by W: reduction over the forward's outputs.
            let (inp, out) = if forward {
                (s.sc, s.ncols)
            } else {
                (s.ncols, s.sc)
            };
            (
                if forward {
                    "linear fwd"
                } else {
                    "linear input-grad"
                },
                format!("linear {inp}->{out} x {} tokens", s.rows() / n.max(1)),
            )
        }
        WKind::ConvForward => {
            let k = if s.taps.len() == 9 { 3 } else { 1 };
            let kind = match (k, s.in_stride, s.shortcut_sc) {
                // A 1x1 shortcut fused in: its products counted here, not as a 3x3's.
                (_, _, 1..) => "conv 3x3 fwd + shortcut",
                (3, 1, _) => "conv 3x3 fwd",
                (3, ..) => "conv 3x3 s2 fwd",
                _ => "conv 1x1 fwd",
            };
            let mut shape = format!(
                "{k}x{k} s{} {}->{} out {}x{}",
                s.in_stride, s.sc, s.ncols, s.mh, s.mw
            );
            if s.shortcut_sc > 0 {
                shape += &format!(" + 1x1 {}->{}", s.shortcut_sc, s.ncols);
            }
            (kind, shape)
        }
        // An upsampling folded into the convolution after it: per parity class of the output
        // pixel forward, per row class backward (reading dy at the output's resolution).
        WKind::FoldForward => (
            "conv 3x3 fwd",
            format!(
                "3x3 s1 upsampled {}->{} out {}x{} class ({},{})",
                s.sc, s.ncols, s.yh, s.yw, s.out_oy, s.out_ox
            ),
        ),
        WKind::FoldBackward => (
            "conv 3x3 input-grad",
            format!(
                "3x3 s1 upsampled {}->{} out {}x{} row class {}",
                s.ncols,
                s.sc,
                s.sh,
                s.sw,
                2 - s.taps[0].dy
            ),
        ),
        // Input gradient: the launch reads dy (the forward's output, `sh x sw`, `sc` channels)
        // and writes dx (its input, `yh x yw`, `ncols` channels); stride-2 gradients run as one
        // launch per parity class of the input pixel.
        _ => {
            let stride = s.out_stride;
            let k = if stride == 2 || s.taps.len() == 9 {
                3
            } else {
                1
            };
            let kind = match (k, stride) {
                (3, 1) => "conv 3x3 input-grad",
                (3, _) => "conv 3x3 s2 input-grad",
                _ => "conv 1x1 input-grad",
            };
            let mut shape = format!(
                "{k}x{k} s{stride} {}->{} out {}x{}",
                s.ncols, s.sc, s.sh, s.sw
            );
            if stride > 1 {
                shape += &format!(" class ({},{})", s.out_oy, s.out_ox);
            }
            (kind, shape)
        }
    };
    StepInfo {
        kind,
        shape,
        variant,
        flops,
        launches,
    }
}

impl Step {
    /// The step's kind, shape label and FLOPs in a program of `n` images of `h x w`.
    pub(crate) fn info(&self, n: usize, h: usize, w: usize) -> StepInfo {
        use Step::*;
        let px = |pixels: usize| size(pixels / n.max(1), h, w);
        let plain = |kind: &'static str, shape: String, launches: usize| StepInfo {
            kind,
            shape,
            variant: String::new(),
            flops: 0.0,
            launches,
        };
        match self {
            Conv(c) => conv_info(c, n),
            ToNhwc { c, .. } => plain("layout", format!("NCHW->NHWC {h}x{w} x {c} ch"), 1),
            ToNchw { c, .. } => plain("layout", format!("NHWC->NCHW {h}x{w} x {c} ch"), 1),
            TimeEmbedding { dim, .. } => plain("time embedding", format!("sinusoidal {dim}"), 1),
            LinearRows {
                inp, out, silu_in, ..
            } => StepInfo {
                flops: 2.0 * (n * inp * out) as f64,
                ..plain(
                    "time embedding",
                    format!(
                        "linear {inp}->{out}{}",
                        if *silu_in { " (SiLU input)" } else { "" }
                    ),
                    1,
                )
            },
            LinearBatch {
                inp,
                silu_in,
                layers,
                ..
            } => {
                let outs = layers.iter().map(|l| l.out);
                let (lo, hi) = (outs.clone().min(), outs.clone().max());
                let widths = match (lo, hi) {
                    (Some(lo), Some(hi)) if lo < hi => format!("{lo}..{hi}"),
                    _ => hi.unwrap_or(0).to_string(),
                };
                StepInfo {
                    flops: outs.map(|out| 2.0 * (n * inp * out) as f64).sum(),
                    ..plain(
                        "time embedding",
                        format!(
                            "{} linear {inp}->{widths}{}",
                            layers.len(),
                            if *silu_in { " (SiLU input)" } else { "" }
                        ),
                        1,
                    )
                }
            }
            GroupNorm {
                hw,
                c,
                groups,
                split,
                silu,
                ..
            }
            | GroupNormBackward {
                hw,
                c,
                groups,
                split,
                silu,
                ..
            } => {
                let (kind, half_out, copy, x_half) = match self {
                    GroupNorm {
                        half_out, x_half, ..
                    } => ("groupnorm", half_out, &None, *x_half),
                    GroupNormBackward {
                        half_out,
                        dx16,
                        x_half,
                        ..
                    } => ("groupnorm bwd", half_out, dx16, *x_half),
                    _ => unreachable!("matched above"),
                };
                let split_sides = matches!(self, GroupNormBackward { sides: Some(_), .. });
                let (dy_half, adds) = match self {
                    GroupNormBackward { dy_half, add, .. } => (*dy_half, add.is_some()),
                    _ => (None, false),
                };
                let launches = match split.one_pass {
                    Some(_) => 1,
                    None => 3 - usize::from(split.from_producer),
                };
                let mut layout = split.form();
                if let Some(p) = x_half {
                    layout += &format!(", {p} input");
                }
                if let Some(p) = dy_half {
                    layout += &format!(", {p} output gradient");
                }
                if split_sides {
                    layout += ", concatenation sides";
                }
                if adds {
                    layout += ", adding a residual's gradient";
                }
                if *silu == Silu::Approx {
                    layout += ", approximate SiLU";
                }
                StepInfo {
                    variant: match (half_out, copy) {
                        (Some(p), _) => format!("{layout}, {p} output"),
                        (None, Some((_, p))) => format!("{layout}, {p} copy"),
                        (None, None) => layout,
                    },
                    ..plain(
                        kind,
                        format!(
                            "{} x {c} ch, {groups} groups{}",
                            size(*hw, h, w),
                            if silu.is_on() { " + SiLU" } else { "" }
                        ),
                        launches,
                    )
                }
            }
            Attention {
                tokens,
                heads,
                head_dim,
                kernel,
                ..
            }
            | AttentionBackward {
                tokens,
                heads,
                head_dim,
                kernel,
                ..
            } => {
                let forward = matches!(self, Attention { .. });
                // Q Kᵀ and P V forward; dV, dP, dQ and dK backward: 2 L² d each per head (the
                // fused kernels' recomputed scores are not counted).
                let products = if forward { 2.0 } else { 4.0 };
                // Unfused: three launches forward, five backward.
                let unfused = if forward { 3 } else { 5 };
                let (variant, launches) = match kernel {
                    AttnKernel::Products => ("", unfused),
                    AttnKernel::Rows => ("in rows", 2),
                    AttnKernel::Tf32Products => ("tf32 products", unfused),
                    AttnKernel::Flash => ("fused", if forward { 1 } else { 2 }),
                };
                let copy = match self {
                    Attention { y16, .. } => y16,
                    AttentionBackward { dqkv16, .. } => dqkv16,
                    _ => &None,
                };
                StepInfo {
                    flops: products * 2.0 * (n * heads * tokens * tokens * head_dim) as f64,
                    variant: match copy {
                        Some((_, p)) => format!("{variant}, {p} copy"),
                        None => variant.to_string(),
                    },
                    ..plain(
                        if forward {
                            "attention"
                        } else {
                            "attention bwd"
                        },
                        format!(
                            "{} ({tokens} tokens), {heads} x {head_dim}",
                            size(*tokens, h, w)
                        ),
                        launches,
                    )
                }
            }
            Upsample {
                h: uh,
                w: uw,
                c,
                half_out,
                ..
            } => StepInfo {
                variant: half_out.map_or_else(String::new, |p| format!("{p} output")),
                ..plain(
                    "upsample",
                    format!("{uh}x{uw} -> {}x{} x {c} ch", 2 * uh, 2 * uw),
                    1,
                )
            },
            UpsampleBackward {
                h: uh, w: uw, c, ..
            } => plain(
                "upsample bwd",
                format!("{}x{} -> {uh}x{uw} x {c} ch", 2 * uh, 2 * uw),
                1,
            ),
            Concat {
                pixels,
                ca,
                cb,
                y16,
                sums,
                half_out,
                placed,
                ..
            } => StepInfo {
                variant: [
                    y16.map(|(_, p)| format!("{p} copy")),
                    half_out.map(|p| format!("{p} only")),
                    sums.map(|_| "GroupNorm sums".to_string()),
                    match placed {
                        [true, true] => Some("both sides placed".to_string()),
                        [true, false] => Some("first side placed".to_string()),
                        [false, true] => Some("second side placed".to_string()),
                        [false, false] => None,
                    },
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", "),
                ..plain("concat", format!("{} x {ca}+{cb} ch", px(*pixels)), 1)
            },
            ConcatBackward {
                pixels,
                c,
                offset,
                width,
                d16,
                ..
            } => StepInfo {
                variant: d16.map_or_else(String::new, |(_, p)| format!("{p} copy")),
                ..plain(
                    "concat bwd",
                    format!("{} x ch {offset}..{} of {c}", px(*pixels), offset + width),
                    1,
                )
            },
            AddInto {
                len, accumulate, ..
            } => plain(
                "elementwise",
                format!("{} {len} floats", if *accumulate { "add" } else { "copy" }),
                1,
            ),
            Divide { len, div, .. } => {
                plain("elementwise", format!("divide {len} floats by {div}"), 1)
            }
            ToHalf { len, precision, .. } => {
                plain("16-bit copy", format!("{len} floats to {precision}"), 1)
            }
        }
    }
}

impl Program {
    /// [`Step::info`] of every step, in order.
    pub(crate) fn step_infos(&self) -> Vec<StepInfo> {
        self.steps
            .iter()
            .map(|s| s.info(self.n, self.h, self.w))
            .collect()
    }

    /// Kernel launches the program makes per call.
    pub(crate) fn launches(&self) -> usize {
        self.step_infos().iter().map(|i| i.launches).sum()
    }

    /// Every step with its mean time `ms[i]`.
    pub(crate) fn timed_steps(&self, ms: &[f64]) -> Vec<StepTime> {
        self.step_infos()
            .into_iter()
            .zip(ms)
            .enumerate()
            .map(|(index, (info, &ms))| StepTime {
                index,
                pass: if index < self.forward_steps {
                    Pass::Forward
                } else {
                    Pass::Backward
                },
                kind: info.kind,
                label: info.label(),
                shape: info.shape,
                variant: info.variant,
                flops: info.flops,
                launches: info.launches,
                ms,
            })
            .collect()
    }
}

/// Which pass of a network call a step belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// The forward pass (of a recording call too).
    Forward,
    /// The vector-Jacobian product after a recording forward pass.
    Backward,
}

/// One step of a profiled program and its measured time.
#[derive(Clone, Debug, Serialize)]
pub struct StepTime {
    /// Position in the program (forward steps first).
    pub index: usize,
    pub pass: Pass,
    /// The kind of work: `conv 3x3 fwd`, `conv 3x3 s2 fwd`, `conv 1x1 fwd`, `conv 3x3
    /// input-grad`, `conv 3x3 s2 input-grad`, `conv 1x1 input-grad`, `linear fwd`, `linear
    /// input-grad`, `time embedding`, `groupnorm`, `groupnorm bwd`, `attention`, `attention bwd`,
    /// `upsample`, `upsample bwd`, `concat`, `concat bwd`, `elementwise` or `layout`.
    pub kind: &'static str,
    /// The shape in the forward operation's terms, per image (e.g. `3x3 s1 128->256 out
    /// 64x64`; input gradients name the convolution they differentiate).
    pub shape: String,
    /// The kernel and its split where there is a choice (`tc-bf16, split-K 4`, `vec`,
    /// `8 chunks`); empty otherwise.
    pub variant: String,
    /// `shape [variant]`.
    pub label: String,
    /// FLOPs as PyTorch counts them (matrix products only).
    pub flops: f64,
    /// Kernel launches inside the step (e.g. 2 for a split-K convolution, 3 for GroupNorm).
    pub launches: usize,
    /// Mean milliseconds over the profiled iterations.
    pub ms: f64,
}

impl StepTime {
    /// Achieved TFLOP/s (0 for steps without matrix products).
    pub fn tflops(&self) -> f64 {
        tflops(self.flops, self.ms)
    }
}

fn tflops(flops: f64, ms: f64) -> f64 {
    if ms > 0.0 {
        flops / ms / 1e9
    } else {
        0.0
    }
}

/// The per-step profile of one network call (see [`CudaUnet::profile`](super::CudaUnet::profile)).
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub device: String,
    pub precision: String,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Forward + vector-Jacobian product (true) or forward only.
    pub record: bool,
    /// Timed iterations (after one untimed one).
    pub iters: usize,
    /// Every step, in program order.
    pub steps: Vec<StepTime>,
    /// Mean ms of the forward pass replayed as its CUDA graph (launched directly when
    /// `INVDIFF_NO_CUDA_GRAPH=1`), back to back, same shape and data.
    pub graph_forward_ms: f64,
    /// Likewise for the backward pass of a recording call.
    pub graph_backward_ms: Option<f64>,
    /// Whether the reference passes were CUDA graph replays.
    pub graphs: bool,
    /// Device time the hold kernels were asked to wait per iteration (summed over its chunks),
    /// and what they took.
    pub hold_ms: f64,
    pub hold_measured_ms: f64,
    /// Chunks of steps, over all timed iterations, whose hold had ended before the host
    /// finished enqueueing them (so that host launch latency may be in some of their steps'
    /// times); 0 is the good case.
    pub late_chunks: usize,
}

/// Steps summed by kind, or by kind and label.
#[derive(Clone, Debug, Serialize)]
pub struct StepGroup {
    pub kind: &'static str,
    /// Empty for a group of a whole kind.
    pub shape: String,
    pub variant: String,
    pub label: String,
    /// Steps in the group (per network call).
    pub calls: usize,
    /// Milliseconds per network call, summed over the group.
    pub ms: f64,
    pub flops: f64,
}

impl StepGroup {
    /// Achieved TFLOP/s (0 for groups without matrix products).
    pub fn tflops(&self) -> f64 {
        tflops(self.flops, self.ms)
    }
}

impl Profile {
    /// Sum of the steps' mean times (ms per call).
    pub fn step_ms(&self) -> f64 {
        self.steps.iter().map(|s| s.ms).sum()
    }

    /// The graph replays' total (forward, plus backward when recording), ms per call.
    pub fn graph_ms(&self) -> f64 {
        self.graph_forward_ms + self.graph_backward_ms.unwrap_or(0.0)
    }

    /// Sum of the steps' FLOPs.
    pub fn flops(&self) -> f64 {
        self.steps.iter().map(|s| s.flops).sum()
    }

    /// Steps summed by kind, most expensive first.
    pub fn by_kind(&self) -> Vec<StepGroup> {
        self.group(|_| String::new())
    }

    /// Steps summed by kind and label (identical launches together), most expensive first.
    pub fn by_label(&self) -> Vec<StepGroup> {
        self.group(|s| s.label.clone())
    }

    /// The `count` most expensive single steps, most expensive first.
    pub fn top_steps(&self, count: usize) -> Vec<&StepTime> {
        let mut v: Vec<&StepTime> = self.steps.iter().collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v.truncate(count);
        v
    }

    fn group(&self, key: impl Fn(&StepTime) -> String) -> Vec<StepGroup> {
        let mut groups: Vec<StepGroup> = Vec::new();
        for s in &self.steps {
            let label = key(s);
            let whole_kind = label.is_empty();
            match groups
                .iter_mut()
                .find(|g| g.kind == s.kind && g.label == label)
            {
                Some(g) => {
                    g.calls += 1;
                    g.ms += s.ms;
                    g.flops += s.flops;
                }
                None => groups.push(StepGroup {
                    kind: s.kind,
                    shape: if whole_kind {
                        String::new()
                    } else {
                        s.shape.clone()
                    },
                    variant: if whole_kind {
                        String::new()
                    } else {
                        s.variant.clone()
                    },
                    label,
                    calls: 1,
                    ms: s.ms,
                    flops: s.flops,
                }),
            }
        }
        groups.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        groups
    }
}

/// The steps of one network call of `graph` on `n` images of `h x w` (forward, and with
/// `record` the vector-Jacobian product after it) as the CUDA backend lowers them for a GPU of
/// `multiprocessors` SMs at `precision` with the choices of a Hopper card (wgmma; its defaults,
/// with what the `INVDIFF_*` switches set): kinds, labels, kernel choices and FLOPs, with every
/// time 0.
/// Needs no GPU: what [`CudaUnet::profile`](super::CudaUnet::profile) will time there.
pub fn planned_steps(
    graph: &Graph,
    n: usize,
    h: usize,
    w: usize,
    record: bool,
    multiprocessors: usize,
    precision: Precision,
) -> Result<Profile> {
    let choice = KernelConfig::from_switches(Capabilities::HOPPER, precision);
    let p = Program::build_with(graph, n, h, w, record, multiprocessors, precision, choice)?;
    Ok(Profile {
        device: format!("(planned for {multiprocessors} multiprocessors, not run)"),
        precision: precision.name().to_string(),
        n,
        h,
        w,
        record,
        iters: 0,
        steps: p.timed_steps(&vec![0.0; p.steps.len()]),
        graph_forward_ms: 0.0,
        graph_backward_ms: record.then_some(0.0),
        graphs: false,
        hold_ms: 0.0,
        hold_measured_ms: 0.0,
        late_chunks: 0,
    })
}

/// A dense bf16 matrix-product rate that achieved throughput is reported against.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeakRate {
    pub tflops: f64,
    /// Where the figure comes from.
    pub source: String,
}

/// Dense bf16 rates measured on these cards, by the name the driver reports. Only figures that
/// were measured go here, each with its source.
const MEASURED_BF16: &[(&str, f64, &str)] = &[(
    "NVIDIA H100 80GB HBM3",
    764.0,
    "PyTorch bf16 8192^3 matmul on an H100 80GB HBM3, measured 2026-11-26 (shared/ANCHORS.md)",
)];

/// The measured dense bf16 rate of `device` (its driver name), if this build knows one.
pub fn measured_bf16_peak(device: &str) -> Option<PeakRate> {
    MEASURED_BF16
        .iter()
        .find(|(name, _, _)| *name == device)
        .map(|&(_, tflops, source)| PeakRate {
            tflops,
            source: source.to_string(),
        })
}

/// The peak to report against: `flag` (a figure the user measured) when given, else the
/// measured rate of `device`; otherwise why there is none.
pub fn peak_rate(flag: Option<f64>, device: &str) -> std::result::Result<PeakRate, String> {
    match flag {
        Some(t) if t.is_finite() && t > 0.0 => Ok(PeakRate {
            tflops: t,
            source: "--peak-tflops".into(),
        }),
        Some(t) => Err(format!("--peak-tflops {t} is not a positive rate")),
        None => measured_bf16_peak(device).ok_or_else(|| {
            format!(
                "no measured bf16 rate for `{device}` in this build; pass --peak-tflops X (e.g. \
                 the TFLOP/s of `scripts/torch_baseline.py --matmul-peak` on this card) for the \
                 fraction of peak"
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UNetConfig;

    /// The steps' FLOPs add up to the graph's own counts: forward, and forward + VJP (whose
    /// backward is every input-path op's products again, attention's twice over, which is what
    /// the backward steps launch: the stride-2 input gradients' parity classes cover each
    /// output pixel's 9 taps exactly once, and split-K only divides the same products).
    #[test]
    fn step_flops_add_up_to_the_graph_counts() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        for n in [1, 2] {
            for (sms, precision) in [
                (132, Precision::Fp32),
                (132, Precision::Bf16),
                (114, Precision::Tf32),
            ] {
                let fwd = Program::build(&g, n, 256, 256, false, sms, precision).unwrap();
                let sum: f64 = fwd.step_infos().iter().map(|i| i.flops).sum();
                assert_eq!(sum, g.forward_flops(n, 256, 256), "batch {n} {precision}");
                let rec = Program::build(&g, n, 256, 256, true, sms, precision).unwrap();
                let infos = rec.step_infos();
                let fwd_part: f64 = infos[..rec.forward_steps].iter().map(|i| i.flops).sum();
                assert_eq!(fwd_part, g.forward_flops(n, 256, 256));
                let sum: f64 = infos.iter().map(|i| i.flops).sum();
                assert_eq!(
                    sum,
                    g.forward_vjp_flops(n, 256, 256),
                    "batch {n} {precision}"
                );
            }
        }
    }

    /// Every step has a kind and a shape; convolutions name their kernel and input gradients
    /// their direction; the kinds a celebahq call needs are all there.
    #[test]
    fn labels_name_shapes_kernels_and_directions() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let p = Program::build(&g, 2, 256, 256, true, 132, Precision::Bf16).unwrap();
        let infos = p.step_infos();
        for i in &infos {
            assert!(!i.kind.is_empty() && !i.shape.is_empty(), "{i:?}");
            if i.kind.starts_with("conv") || i.kind.starts_with("linear") {
                assert!(!i.variant.is_empty(), "{i:?}");
                assert!(i.flops > 0.0, "{i:?}");
            }
        }
        let kinds: Vec<&str> = infos.iter().map(|i| i.kind).collect();
        for k in [
            "conv 3x3 fwd",
            "conv 3x3 s2 fwd",
            "conv 1x1 fwd",
            "conv 3x3 input-grad",
            "conv 3x3 s2 input-grad",
            "conv 1x1 input-grad",
            "linear fwd",
            "linear input-grad",
            "time embedding",
            "groupnorm",
            "groupnorm bwd",
            "attention",
            "attention bwd",
            "upsample",
            "upsample bwd",
            "concat",
            "concat bwd",
            "elementwise",
            "layout",
        ] {
            assert!(kinds.contains(&k), "no step of kind {k}");
        }
        let has =
            |kind: &str, label: &str| infos.iter().any(|i| i.kind == kind && i.label() == label);
        // The first level's 3x3 convolution, both directions, on tensor cores: forward from
        // 16-bit GroupNorm outputs, backward from the fp32 block gradient (second convolution)
        // or the 16-bit gradient of the second GroupNorm (first convolution).
        assert!(has(
            "conv 3x3 fwd",
            "3x3 s1 128->128 out 256x256 [tc-bf16, 16-bit input]"
        ));
        assert!(has(
            "conv 3x3 input-grad",
            "3x3 s1 128->128 out 256x256 [tc-bf16, staged]"
        ));
        assert!(has(
            "conv 3x3 input-grad",
            "3x3 s1 128->128 out 256x256 [tc-bf16, 16-bit input]"
        ));
        // The 3-channel image convolutions stay fp32, on the direct kernels.
        assert!(has("conv 3x3 fwd", "3x3 s1 3->128 out 256x256 [few-in]"));
        assert!(has("conv 3x3 fwd", "3x3 s1 128->3 out 256x256 [narrow]"));
        // Their input gradients: conv_out's reads the 3-channel dy (few inputs), conv_in's
        // writes the 3-channel dx (few outputs).
        assert!(has(
            "conv 3x3 input-grad",
            "3x3 s1 128->3 out 256x256 [few-in]"
        ));
        assert!(has(
            "conv 3x3 input-grad",
            "3x3 s1 3->128 out 256x256 [narrow]"
        ));
        // The first downsampling's input gradient: four parity classes.
        let classes = infos
            .iter()
            .filter(|i| i.shape.starts_with("3x3 s2 128->128 out 128x128 class"))
            .count();
        assert_eq!(classes, 4);
        // Small levels split K.
        assert!(
            infos.iter().any(|i| i.variant.contains("split-K")),
            "no split-K launch at batch 2"
        );
        assert!(infos
            .iter()
            .any(|i| i.kind == "attention" && i.shape.starts_with("16x16 (256 tokens)")));
    }

    #[test]
    fn planned_steps_match_the_program() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let p = planned_steps(&g, 2, 64, 64, true, 132, Precision::Fp16).unwrap();
        // What planned_steps plans: the Hopper defaults with the switches set for this run.
        let choice = KernelConfig::from_switches(Capabilities::HOPPER, Precision::Fp16);
        let prog = Program::build_with(&g, 2, 64, 64, true, 132, Precision::Fp16, choice).unwrap();
        assert_eq!(p.steps.len(), prog.steps.len());
        assert_eq!(p.flops(), g.forward_vjp_flops(2, 64, 64));
        let first_backward = p.steps.iter().position(|s| s.pass == Pass::Backward);
        assert_eq!(first_backward, Some(prog.forward_steps));
        assert!(p.steps.iter().all(|s| s.ms == 0.0 && !s.label.is_empty()));
        assert!(p.steps.iter().any(|s| s.variant.starts_with("tc-fp16")));
        assert!(planned_steps(&g, 0, 64, 64, false, 132, Precision::Fp32).is_err());
    }

    #[test]
    fn profile_groups_sum_their_steps() {
        let step = |index: usize, kind: &'static str, shape: &str, ms: f64, flops: f64| StepTime {
            index,
            pass: Pass::Forward,
            kind,
            shape: shape.into(),
            variant: "vec".into(),
            label: format!("{shape} [vec]"),
            flops,
            launches: 1,
            ms,
        };
        let p = Profile {
            device: "test".into(),
            precision: "fp32".into(),
            n: 1,
            h: 8,
            w: 8,
            record: false,
            iters: 1,
            steps: vec![
                step(0, "conv 3x3 fwd", "a", 1.0, 2e9),
                step(1, "groupnorm", "g", 0.5, 0.0),
                step(2, "conv 3x3 fwd", "a", 1.0, 2e9),
                step(3, "conv 3x3 fwd", "b", 3.0, 3e9),
            ],
            graph_forward_ms: 5.0,
            graph_backward_ms: None,
            graphs: true,
            hold_ms: 1.0,
            hold_measured_ms: 1.0,
            late_chunks: 0,
        };
        assert_eq!(p.step_ms(), 5.5);
        let k = p.by_kind();
        assert_eq!(k.len(), 2);
        assert_eq!((k[0].kind, k[0].calls, k[0].ms), ("conv 3x3 fwd", 3, 5.0));
        assert!((k[0].tflops() - 7e9 / 5.0 / 1e9).abs() < 1e-12);
        let l = p.by_label();
        assert_eq!(l.len(), 3);
        assert_eq!((l[0].shape.as_str(), l[0].calls), ("b", 1));
        assert_eq!((l[1].shape.as_str(), l[1].calls, l[1].ms), ("a", 2, 2.0));
        assert_eq!(p.top_steps(2)[0].index, 3);
        assert_eq!(p.top_steps(9).len(), 4);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["steps"][0]["pass"], "forward");
        assert_eq!(json["steps"][3]["label"], "b [vec]");
    }

    /// Launches per batch-1 program (bf16, wgmma, 132 multiprocessors), PERF.md's census. The
    /// H200 runs counted v0.4's defaults at 455 per forward and 996 per DPS step, and the
    /// defaults of that time at 393 and 855, both before the wgmma split rule of
    /// one block per multiprocessor a wave (`plan_wgmma` in src/cuda/kernels/conv_plan.rs),
    /// whose fewer splits take 10-23 reductions off.
    #[test]
    fn launch_census_of_the_batch_1_programs() {
        use crate::cuda::kernels::Capabilities;
        use crate::cuda::program::KernelConfig;
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let count = |tc: KernelConfig| {
            [false, true].map(|record| {
                Program::build_with(&g, 1, 256, 256, record, 132, Precision::Bf16, tc)
                    .unwrap()
                    .launches()
            })
        };
        let base = KernelConfig {
            wgmma: true,
            ..KernelConfig::default()
        };
        assert_eq!(count(base), [445, 981]);
        let fewer = KernelConfig {
            gn_one_pass: true,
            attention_flash: true,
            alias_residual_grads: true,
            half_copy: true,
            ..base
        };
        assert_eq!(count(fewer), [369, 799]);
        // Folding the two large upsamplings adds launches: per fold a conversion and four class
        // launches for an upsampling and one, and two for two backward (with their splits).
        let fold = KernelConfig {
            upsample_fold: true,
            ..base
        };
        assert_eq!(count(fold), [455, 995]);
        // v0.6's defaults. The 16-bit copies of small fp32 inputs add 10 launches to the
        // forward and 43 to forward + VJP (the counts the H200 run of 2026-11-27 reported with
        // INVDIFF_HALF_COPY_SMALL=1).
        let tuned = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
        let v09 = KernelConfig {
            fold_residual_grads: false,
            ..tuned
        };
        let v08 = KernelConfig {
            concat_from_producers: false,
            epilogue_half_copies: false,
            ..v09
        };
        let v07 = KernelConfig {
            staged_unsplit: false,
            staged_epilogue: false,
            shortcut_fused: false,
            concat_grad_split: false,
            half_gn_inputs_recording: false,
            ..v08
        };
        let v06 = KernelConfig {
            fused_half_copies: false,
            gn_producer_sums: false,
            half_gn_inputs: false,
            ..v07
        };
        assert_eq!(count(v06), [392, 875]);
        // The concatenations' adjoints write 18 of those copies themselves, the GroupNorms'
        // backward passes 20.
        let fused = KernelConfig {
            fused_half_copies: true,
            ..v06
        };
        assert_eq!(count(fused), [392, 837]);
        // Partial sums from the convolution epilogues and concatenations: 26 GroupNorms of
        // the forward skip their partial-sum launch.
        let sums = KernelConfig {
            gn_producer_sums: true,
            ..v06
        };
        assert_eq!(count(sums), [366, 849]);
        // Stop 22's defaults: both, and 16-bit concatenations, which change no launch.
        assert_eq!(count(v07), [366, 811]);
        // Fused shortcuts take 32 launches off the forward and 32 off forward + VJP, and the
        // concatenations' gradients split by their GroupNorms 24 more (the counts the H200 run
        // of stop 26 reported).
        let four = KernelConfig {
            staged_unsplit: false,
            ..v08
        };
        assert_eq!(count(four), [334, 755]);
        // Stop 26's defaults: the launches unsplit to stage need no reductions (10 and 23
        // fewer, as the stop-26 run reported).
        assert_eq!(count(v08), [324, 732]);
        // Stop 27's defaults: the staged epilogues write 4 of the forward's 16-bit copies (the
        // concatenations their producers write keep their launches at batch 1; the counts
        // the stop-27 run reported).
        assert_eq!(count(v09), [320, 728]);
        // The defaults: the GroupNorm backward passes add the 11 residual gradients (the
        // counts the stop-28 run reported).
        assert_eq!(count(tuned), [320, 717]);
    }

    #[test]
    fn peak_comes_from_the_flag_or_a_measured_figure() {
        let h100 = peak_rate(None, "NVIDIA H100 80GB HBM3").unwrap();
        assert_eq!(h100.tflops, 764.0);
        assert!(h100.source.contains("8192"), "{}", h100.source);
        let why = peak_rate(None, "Some Other GPU").unwrap_err();
        assert!(
            why.contains("--peak-tflops") && why.contains("Some Other GPU"),
            "{why}"
        );
        let flag = peak_rate(Some(790.0), "NVIDIA H100 80GB HBM3").unwrap();
        assert_eq!(
            (flag.tflops, flag.source.as_str()),
            (790.0, "--peak-tflops")
        );
        assert!(peak_rate(Some(0.0), "x").is_err());
        assert!(peak_rate(Some(f64::NAN), "x").is_err());
    }
}
