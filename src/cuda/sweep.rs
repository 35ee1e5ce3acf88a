//! Every tensor-core launch of a network's program, timed alone under each pipeline and split
//! of K it could take: the data a per-shape choice of kernel and split-K needs, gathered in one
//! GPU run (the GPU machines cannot rebuild, so the variants are all compiled in and chosen
//! here at run time).
//!
//! For each distinct tensor-core convolution or token-wise linear launch of the program at one
//! batch, size and precision (forward, and the input gradient when recording), the same problem
//! on random data is launched with the two-stage kernel, the deep pipeline from fp32 input and,
//! in bf16/fp16, the deep pipeline from a 16-bit input, and on Hopper the wgmma kernel from a
//! 16-bit input (every tile that takes the launch; the deep ones and wgmma with either epilogue),
//! each at several splits of K: 1, and those that keep the grid within four waves of the
//! machine. The mma.sync variants compute the same sums in the same order for a given split
//! (the selftest holds them to it), wgmma the same products in another order, so only the time
//! differs. The planned launch is what `CudaUnet` runs by default (wgmma where the device has
//! it). Times are means of CUDA-event-timed repetitions after a warm-up.
//!
//! Each wgmma variant is also launched once through its cycle-counting kernel
//! ([`CycleProbe`]): where a warpgroup's cycles go, which the GPU machines have no profiler
//! to show.

use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::CudaStream;
use serde::Serialize;

use super::device::{cu, Gpu};
use super::kernels::{
    norm_forms, on_tile, plan_norm, tma_tried, ConvKernel, ConvLaunch, ConvPtrs, ConvShape,
    NormBackwardIn, NormBackwardOut, NormDims, NormLaunches, ProbeCounters, Silu, WgmmaTile,
    WGMMA_FORMS, WGMMA_PROBE_COUNTERS, WGMMA_PROBE_PHASES, WGMMA_SLICE,
};
use super::plan;
use super::precision::Precision;
use super::program::{KernelConfig, Program, Step};
use super::selftest::uniform;
use super::weights::{DevBuf, DevConv};
use crate::model::Graph;
use crate::{ensure, Error, Result};

/// One variant of one launch and its time.
#[derive(Clone, Debug, Serialize)]
pub struct SweepVariant {
    /// `two-stage`, `deep` (fp32 input), `deep, 16-bit input`, or `wgmma` (16-bit input) with
    /// its tile (`wgmma, tall`, ...), with `, row epilogue` when the epilogue loads four output
    /// pairs before storing them.
    pub pipeline: String,
    pub splits: usize,
    /// Mean milliseconds per launch (with the split-K reduction when split).
    pub ms: f64,
    /// Where the cycles of a wgmma launch go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycles: Option<CycleProbe>,
}

/// Where the warpgroups of one wgmma launch spent their cycles (kernels/conv_wgmma.cu `Probe`):
/// the multiprocessor's cycle counter read at the borders of the kernel's phases.
#[derive(Clone, Debug, Serialize)]
pub struct CycleProbe {
    pub warpgroups: u64,
    /// K slices each warpgroup multiplied, on average.
    pub slices: f64,
    /// Cycles from a warpgroup's start to its end, on average.
    pub cycles: f64,
    /// Each phase's share of those cycles, in the kernel's order.
    pub phases: Vec<PhaseShare>,
}

/// One phase of a [`CycleProbe`].
#[derive(Clone, Debug, Serialize)]
pub struct PhaseShare {
    pub phase: &'static str,
    pub share: f64,
}

impl CycleProbe {
    fn from_counters(c: &[u64; WGMMA_PROBE_COUNTERS]) -> Option<CycleProbe> {
        let phases = WGMMA_PROBE_PHASES.len();
        let warpgroups = c[phases];
        let total: u64 = c[..phases].iter().sum();
        if warpgroups == 0 || total == 0 {
            return None;
        }
        Some(CycleProbe {
            warpgroups,
            slices: c[phases + 1] as f64 / warpgroups as f64,
            cycles: total as f64 / warpgroups as f64,
            phases: WGMMA_PROBE_PHASES
                .iter()
                .zip(c)
                .map(|(&phase, &v)| PhaseShare {
                    phase,
                    share: v as f64 / total as f64,
                })
                .collect(),
        })
    }

    /// One line: cycles per slice and each phase's share.
    pub fn summary(&self) -> String {
        let shares: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {:.0}%", p.phase, 100.0 * p.share))
            .collect();
        format!(
            "{:.0} cycles per warpgroup over {:.1} slices ({:.0} per slice): {}",
            self.cycles,
            self.slices,
            self.cycles / self.slices.max(1.0),
            shares.join(", ")
        )
    }
}

/// One distinct tensor-core launch of the program and its variants.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// The step's kind and shape (as in the profile, e.g. `conv 3x3 fwd`,
    /// `3x3 s1 128->128 out 256x256`).
    pub kind: String,
    pub shape: String,
    /// How many launches of the program have this shape.
    pub count: usize,
    pub flops: f64,
    /// The pipeline and split the planner chose, and its time.
    pub planned: SweepVariant,
    /// Every variant timed, the planned one included.
    pub variants: Vec<SweepVariant>,
}

impl SweepRow {
    /// The fastest variant.
    pub fn best(&self) -> &SweepVariant {
        self.variants
            .iter()
            .min_by(|a, b| a.ms.total_cmp(&b.ms))
            .unwrap_or(&self.planned)
    }
}

/// Largest tile grid, in waves of two blocks per multiprocessor, that a split may make.
const MAX_WAVES: usize = 4;
/// The splits tried (those that fit `MAX_WAVES` and the reduction length).
const SPLITS: [usize; 10] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32];

/// Times every variant of every distinct tensor-core launch of `graph`'s program for a batch of
/// `n` images of `h x w` at `precision` (bf16, fp16 or tf32), the input gradient too when
/// `record`, on GPU `ordinal`, `iters` repetitions each.
#[allow(clippy::too_many_arguments)]
pub fn sweep_convolutions(
    ordinal: usize,
    graph: &Graph,
    n: usize,
    h: usize,
    w: usize,
    record: bool,
    precision: Precision,
    iters: usize,
) -> Result<Vec<SweepRow>> {
    ensure!(
        precision != Precision::Fp32,
        "the sweep covers tensor-core launches: use --precision tf32, bf16 or fp16"
    );
    let (gpu, program) = open_and_plan(ordinal, graph, n, h, w, record, precision, iters)?;
    // Distinct launches, in program order, with their counts.
    let mut launches: Vec<(ConvShape, ConvLaunch, String, String, f64, usize)> = Vec::new();
    for s in &program.steps {
        let Step::Conv(c) = s else { continue };
        if !matches!(c.launch.kernel, ConvKernel::Tensor(_)) {
            continue;
        }
        let info = s.info(n, h, w);
        match launches
            .iter_mut()
            .find(|l| l.0 == c.shape && l.1 == c.launch && l.2 == info.kind)
        {
            Some(l) => l.5 += 1,
            None => launches.push((
                c.shape.clone(),
                c.launch,
                info.kind.to_string(),
                info.shape,
                info.flops,
                1,
            )),
        }
    }
    let mut seed = 0x5_7EE9;
    let mut rows = Vec::with_capacity(launches.len());
    for (shape, planned, kind, label, flops, count) in launches {
        rows.push(sweep_one(
            &gpu, &shape, planned, kind, label, flops, count, iters, &mut seed,
        )?);
    }
    Ok(rows)
}

/// The variants of tensor-core launch `planned` of `shape` worth timing on a GPU of `sms`
/// multiprocessors: each split of [`SPLITS`] that leaves a K slice per split and keeps the grid
/// within [`MAX_WAVES`] waves (1 always), under each pipeline (16-bit input in bf16/fp16 only), the
/// wgmma kernel (bf16/fp16, where `wgmma`: the device has it) over 64-deep slices, and the planned
/// launch itself; unsplit TMA launches also with the staged epilogue
/// ([`ConvLaunch::staged_epilogue`], which the sweep's light epilogue, with no residual, may
/// favour less than the program's launches do). No variant prefetches the epilogue's reads
/// ([`ConvLaunch::prefetch`]): the
/// sweep's launches read no residual and do not accumulate, so it would time nothing (a planned
/// launch keeps its own, which reads nothing here either).
fn candidates(shape: &ConvShape, planned: ConvLaunch, sms: usize, wgmma: bool) -> Vec<ConvLaunch> {
    let ConvKernel::Tensor(precision) = planned.kernel else {
        return vec![planned];
    };
    let slice = if precision == Precision::Tf32 { 16 } else { 32 };
    let k = shape.k();
    let ktiles = k.div_ceil(slice);
    let tiles = shape.rows().div_ceil(128) * shape.ncols.div_ceil(128);
    let mut out: Vec<ConvLaunch> = Vec::new();
    for &s in SPLITS
        .iter()
        .filter(|&&s| s == 1 || (s <= ktiles && tiles * s <= MAX_WAVES * 2 * sms))
    {
        // Not wgmma: the plain tile and loaders whatever the planned launch's (Kernels::conv
        // rejects a tall tile or lean loaders without wgmma).
        let base = ConvLaunch {
            wgmma: false,
            lean_loads: false,
            tma_loads: false,
            prefetch: false,
            tile: WgmmaTile::Plain,
            staged_epilogue: false,
            ..planned.with_splits(shape, slice, s)
        };
        let mut pipes = vec![(false, false), (true, false)];
        if precision.is_half() {
            pipes.push((true, true));
        }
        for (deep, half_input) in pipes {
            for row_epilogue in [false, deep] {
                let c = ConvLaunch {
                    deep,
                    half_input,
                    row_epilogue,
                    ..base
                };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    if wgmma && precision.is_half() {
        let ktiles = k.div_ceil(WGMMA_SLICE);
        for &s in SPLITS
            .iter()
            .filter(|&&s| s == 1 || (s <= ktiles && tiles * s <= MAX_WAVES * 2 * sms))
        {
            let c = ConvLaunch {
                deep: true,
                half_input: true,
                wgmma: true,
                prefetch: false,
                staged_epilogue: false,
                ..planned.with_splits(shape, WGMMA_SLICE, s)
            };
            let tma = tma_tried(shape);
            for (row_epilogue, lean_loads, tma_loads) in WGMMA_FORMS {
                if tma_loads && !tma {
                    continue;
                }
                for (tile, _) in WgmmaTile::ALL {
                    let form = ConvLaunch {
                        row_epilogue,
                        lean_loads,
                        tma_loads,
                        ..c
                    };
                    let Some(c) = on_tile(form, tile) else {
                        continue;
                    };
                    // Unsplit TMA launches also with the staged epilogue.
                    let staged = (c.tma_loads && c.splits == 1).then_some(ConvLaunch {
                        staged_epilogue: true,
                        ..c
                    });
                    for c in std::iter::once(c).chain(staged) {
                        if !out.contains(&c) {
                            out.push(c);
                        }
                    }
                }
            }
        }
    }
    // A fused shortcut (INVDIFF_SHORTCUT_FUSED) runs on the lean and TMA kernels only.
    if shape.shortcut_sc > 0 {
        out.retain(|c| c.lean_loads);
    }
    // The planned launch, whose split may be none of the above.
    if !out.contains(&planned) {
        out.push(planned);
    }
    out
}

fn pipeline_name(l: &ConvLaunch) -> String {
    let kernel = match (l.wgmma, l.deep, l.half_input) {
        (true, ..) => l.tile.describe(),
        (false, false, _) => "two-stage",
        (false, true, false) => "deep",
        (false, true, true) => "deep, 16-bit input",
    };
    let mut name = kernel.to_string();
    if l.row_epilogue {
        name += ", row epilogue";
    }
    name += &l.loads_described();
    name
}

#[allow(clippy::too_many_arguments)]
fn sweep_one(
    gpu: &Gpu,
    shape: &ConvShape,
    planned: ConvLaunch,
    kind: String,
    label: String,
    flops: f64,
    count: usize,
    iters: usize,
    seed: &mut u64,
) -> Result<SweepRow> {
    let ConvKernel::Tensor(precision) = planned.kernel else {
        return Err(Error::Cuda("internal: sweep of a non-tensor launch".into()));
    };
    let st = &gpu.stream;
    let k = shape.k();
    // Random operands of the launch's sizes; the weights as a k x k convolution whose forward
    // layout has room for every tap index the launch names (16 for a folded upsampling's).
    let last_tap = shape.taps.iter().map(|t| t.w as usize).max().unwrap_or(0);
    let kk = (1..)
        .find(|k| k * k > last_tap)
        .expect("a square above any tap index");
    let x_len = shape.n * shape.sh * shape.sw * shape.sc;
    let x = DevBuf::upload(st, &uniform(seed, x_len, -1.0, 1.0))?;
    let x_half = if precision.is_half() {
        let h = DevBuf::zeros(st, x_len.div_ceil(2))?;
        gpu.kernels
            .convert_half(st, x.ptr, h.ptr, x_len, precision)?;
        Some(h)
    } else {
        None
    };
    let bound = 1.0 / (k as f32).sqrt();
    let mut wts = DevConv::upload(
        gpu,
        &uniform(seed, shape.ncols * shape.sc * kk * kk, -bound, bound),
        &uniform(seed, shape.ncols, -0.1, 0.1),
        shape.ncols,
        shape.sc,
        kk,
        precision,
    )?;
    let y = DevBuf::zeros(st, shape.yh * shape.yw * shape.n * shape.ncols)?;

    let wgmma = gpu.kernels.has_wgmma();
    if wgmma {
        // The K-major weights the wgmma kernel reads.
        wts.ensure_backward_half(gpu)?;
    }
    // A fused shortcut's second source and weights, 16-bit and K-major as the kernels read
    // them.
    let shortcut = match shape.shortcut() {
        Some(one) if wgmma && precision.is_half() => {
            let len = one.n * one.sh * one.sw * one.sc;
            // The fp32 values kept beside their copy, as `x` is, so that the conversion
            // queued on the stream reads live memory.
            let x2_f32 = DevBuf::upload(st, &uniform(seed, len, -1.0, 1.0))?;
            let x2 = x2_f32.to_half(gpu, len, precision)?;
            let mut w2 = DevConv::upload(
                gpu,
                &uniform(seed, one.ncols * one.sc, -bound, bound),
                &uniform(seed, one.ncols, -0.1, 0.1),
                one.ncols,
                one.sc,
                1,
                precision,
            )?;
            w2.ensure_backward_half(gpu)?;
            Some((x2, w2, x2_f32))
        }
        _ => None,
    };
    let candidates = candidates(shape, planned, gpu.sms(), wgmma);
    let ws_len = candidates
        .iter()
        .map(|c| c.workspace_len(shape))
        .max()
        .unwrap_or(0);
    let ws = DevBuf::zeros(st, ws_len)?;

    let mut variants = Vec::with_capacity(candidates.len());
    let mut planned_v = None;
    for c in &candidates {
        let ptrs = ConvPtrs {
            x: match &x_half {
                Some(h) if c.half_input => h.ptr,
                _ => x.ptr,
            },
            w: wts.weights_for(c.kernel, c.wgmma)?,
            y: y.ptr,
            bias: wts.bias.ptr,
            ws: ws.ptr,
            x2: shortcut.as_ref().map_or(0, |s| s.0.ptr),
            w2: match &shortcut {
                Some((_, w2, _)) => w2.weights_for(c.kernel, true)?,
                None => 0,
            },
            ..ConvPtrs::default()
        };
        let launch = || gpu.kernels.conv(st, shape, c, ptrs, 1.0, false);
        launch()?;
        let ms = mean_ms(st, iters, launch)?;
        // The fused-shortcut and staged-epilogue kernels have no cycle-counting forms.
        let cycles = if c.wgmma && shortcut.is_none() && !c.staged_epilogue {
            probe(gpu, shape, c, ptrs)?
        } else {
            None
        };
        let v = SweepVariant {
            pipeline: pipeline_name(c),
            splits: c.splits,
            ms,
            cycles,
        };
        if c == &planned {
            planned_v = Some(v.clone());
        }
        variants.push(v);
    }
    let planned = planned_v
        .ok_or_else(|| Error::Cuda("internal: the planned launch was not timed".into()))?;
    Ok(SweepRow {
        kind,
        shape: label,
        count,
        flops,
        planned,
        variants,
    })
}

/// One launch of wgmma variant `c` through its cycle-counting kernel.
fn probe(
    gpu: &Gpu,
    shape: &ConvShape,
    c: &ConvLaunch,
    ptrs: ConvPtrs,
) -> Result<Option<CycleProbe>> {
    let st = &gpu.stream;
    let counters = ProbeCounters::new(st)?;
    gpu.kernels.conv_probe(st, shape, c, ptrs, &counters)?;
    Ok(CycleProbe::from_counters(&counters.read(st)?))
}

/// One distinct GroupNorm of a program (direction, shape, SiLU, output format) and the time of
/// each form it can take.
#[derive(Clone, Debug, Serialize)]
pub struct NormSweepRow {
    /// `groupnorm` or `groupnorm bwd`, and the shape in the profile's words.
    pub kind: String,
    pub shape: String,
    /// How many GroupNorms of the program have this shape.
    pub count: usize,
    /// The three-launch form (`N chunks`, first) and one pass (`one pass, T threads`, where
    /// the groups allow it), each also `, loads ahead` (the `_ilp` kernels), with its mean
    /// milliseconds.
    pub forms: Vec<NormForm>,
}

/// One form of a [`NormSweepRow`].
#[derive(Clone, Debug, Serialize)]
pub struct NormForm {
    pub form: String,
    pub ms: f64,
    /// A three-launch backward pass's launches timed alone (`sums`, `means`, `apply`): where
    /// its time goes.
    pub parts: Vec<NormPart>,
}

/// One launch of a [`NormForm`] timed alone.
#[derive(Clone, Debug, Serialize)]
pub struct NormPart {
    pub launch: String,
    pub ms: f64,
}

/// Times each form of every distinct GroupNorm of `graph`'s program (as
/// [`sweep_convolutions`] plans it), forward and, when `record`, backward: the three-launch
/// form, and one pass in one block a group where the groups are small enough, each also with
/// the `_ilp` kernels; a GroupNorm of 16-bit input (`INVDIFF_GN_HALF_INPUT`, and for a
/// backward pass `INVDIFF_GN_HALF_INPUT_RECORDING`) from a 16-bit copy, and a backward pass of
/// 16-bit output gradient (`INVDIFF_GN_HALF_DY`, the `_ilp` forms only) from a 16-bit copy
/// of it, one that adds a residual's gradient (`INVDIFF_GN_ADD_RESIDUAL`) adding one. The
/// forms compute the same statistics up to the order of the f64 sums. A backward pass's
/// three-launch forms also time each launch alone ([`NormForm::parts`]).
#[allow(clippy::too_many_arguments)]
pub fn sweep_group_norms(
    ordinal: usize,
    graph: &Graph,
    n: usize,
    h: usize,
    w: usize,
    record: bool,
    precision: Precision,
    iters: usize,
) -> Result<Vec<NormSweepRow>> {
    let (gpu, program) = open_and_plan(ordinal, graph, n, h, w, record, precision, iters)?;
    let norms = distinct_norms(&program.steps, n, h, w);
    let st = &gpu.stream;
    let mut seed = 0x6_7EE9;
    let mut rows = Vec::new();
    for (key, kind, shape, count) in norms {
        let NormKey {
            backward,
            hw,
            c,
            groups,
            silu,
            half_out,
            accumulate,
            x_half,
            dy_half,
            adds,
        } = key;
        let len = n * hw * c;
        // `src`'s 16-bit copy in `half`'s precision, where set.
        let copy_of = |src: &DevBuf, half: Option<Precision>| -> Result<Option<DevBuf>> {
            let Some(p) = half else { return Ok(None) };
            let copy = DevBuf::zeros(st, len.div_ceil(2))?;
            gpu.kernels.convert_half(st, src.ptr, copy.ptr, len, p)?;
            Ok(Some(copy))
        };
        let x = DevBuf::upload(st, &uniform(&mut seed, len, -1.0, 3.0))?;
        // A GroupNorm of 16-bit input (KernelConfig::half_gn_inputs, and for a backward pass
        // half_gn_inputs_recording) reads a 16-bit copy of x.
        let x16 = copy_of(&x, x_half)?;
        let x_in = x16.as_ref().map_or(x.ptr, |c| c.ptr);
        let dy = DevBuf::upload(st, &uniform(&mut seed, len, -1.0, 1.0))?;
        // A 16-bit output gradient (KernelConfig::half_norm_grads) is a 16-bit copy of dy; a
        // second gradient (fold_residual_grads), another buffer.
        let dy16 = copy_of(&dy, dy_half)?;
        let dy_in = dy16.as_ref().map_or(dy.ptr, |c| c.ptr);
        let second = match adds {
            true => Some(DevBuf::upload(st, &uniform(&mut seed, len, -1.0, 1.0))?),
            false => None,
        };
        let gamma = DevBuf::upload(st, &uniform(&mut seed, c, 0.5, 1.5))?;
        let beta = DevBuf::upload(st, &uniform(&mut seed, c, -0.5, 0.5))?;
        let out = DevBuf::zeros(st, len)?;
        let stats = DevBuf::zeros(st, 2 * n * groups)?;
        let affine = DevBuf::zeros(st, 2 * n * c)?;
        let three = plan_norm(n, hw, c, groups, gpu.sms(), false, false);
        let partial = DevBuf::zeros(st, three.partial_len(n, c))?;
        let mut forms = Vec::new();
        for split in norm_forms(n, hw, c, groups, gpu.sms()) {
            // Only the `_ilp` kernels read a 16-bit gradient.
            if dy_half.is_some() && !split.ilp {
                continue;
            }
            let d = NormDims {
                n,
                hw,
                c,
                groups,
                split,
            };
            // The forward once first: the backward reads its statistics (a backward row's
            // 16-bit formats are its gradient's and input's; its forward reads and writes fp32,
            // which the `_x16` forward kernels do not).
            let (forward_out, forward_x) = if backward {
                (None, (x.ptr, None))
            } else {
                (half_out, (x_in, x_half))
            };
            let forward = || {
                gpu.kernels.group_norm(
                    st,
                    d,
                    forward_x.0,
                    forward_x.1,
                    gamma.ptr,
                    beta.ptr,
                    out.ptr,
                    partial.ptr,
                    stats.ptr,
                    affine.ptr,
                    1e-6,
                    silu,
                    forward_out,
                )
            };
            let run = |launches: NormLaunches| {
                if backward {
                    gpu.kernels.group_norm_backward(
                        st,
                        d,
                        NormBackwardIn {
                            x: x_in,
                            x_half,
                            dy: dy_in,
                            dy_half,
                            gamma: gamma.ptr,
                            beta: beta.ptr,
                            stats: stats.ptr,
                            silu,
                        },
                        NormBackwardOut {
                            partial: partial.ptr,
                            means: affine.ptr,
                            dx: out.ptr,
                            accumulate,
                            add: second.as_ref().map(|b| b.ptr),
                            half_out,
                            launches,
                            ..NormBackwardOut::default()
                        },
                    )
                } else {
                    forward()
                }
            };
            forward()?;
            let ms = mean_ms(st, iters, || run(NormLaunches::All))?;
            // A backward pass's three launches also one at a time, each after the whole pass
            // (which wrote what it reads).
            let mut parts = Vec::new();
            if backward && split.one_pass.is_none() {
                for (launches, name) in [
                    (NormLaunches::Sums, "sums"),
                    (NormLaunches::Means, "means"),
                    (NormLaunches::Apply, "apply"),
                ] {
                    parts.push(NormPart {
                        launch: name.into(),
                        ms: mean_ms(st, iters, || run(launches))?,
                    });
                }
            }
            forms.push(NormForm {
                form: split.form(),
                ms,
                parts,
            });
        }
        // The same shape may also come with an fp32 input or output gradient, or add nothing.
        let shape = match x_half {
            Some(p) => format!("{shape}, {p} input"),
            None => shape,
        };
        let shape = match dy_half {
            Some(p) => format!("{shape}, {p} output gradient"),
            None => shape,
        };
        let shape = match adds {
            true => format!("{shape}, adding a residual's gradient"),
            false => shape,
        };
        rows.push(NormSweepRow {
            kind,
            shape,
            count,
            forms,
        });
    }
    Ok(rows)
}

/// GPU `ordinal` and the program a sweep reads its launches from: what `CudaUnet` runs by
/// default there ([`KernelConfig::tuned`]).
#[allow(clippy::too_many_arguments)]
fn open_and_plan(
    ordinal: usize,
    graph: &Graph,
    n: usize,
    h: usize,
    w: usize,
    record: bool,
    precision: Precision,
    iters: usize,
) -> Result<(Gpu, Program)> {
    ensure!(iters > 0, "the sweep needs at least one repetition");
    let gpu = Gpu::open(ordinal)?;
    // What the switches ask for, as `bench` plans: INVDIFF_WGMMA_TMA=0 must keep the TMA
    // kernels out of the planned launches too.
    let choice = KernelConfig::from_switches(gpu.kernels.capabilities(), precision);
    let (program, _) = plan::plan(graph, n, h, w, record, gpu.sms(), precision, choice, 0)?;
    Ok((gpu, program))
}

/// Mean milliseconds of `run` over `iters` runs on `st` after one more to warm up, between two
/// CUDA events.
fn mean_ms(st: &CudaStream, iters: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    let start = cu(
        st.record_event(Some(CU_EVENT_DEFAULT)),
        "recording an event",
    )?;
    for _ in 0..iters {
        run()?;
    }
    let end = cu(
        st.record_event(Some(CU_EVENT_DEFAULT)),
        "recording an event",
    )?;
    cu(end.synchronize(), "waiting for the GPU")?;
    Ok(f64::from(cu(start.elapsed_ms(&end), "reading a CUDA event timer")?) / iters as f64)
}

/// What tells two GroupNorms apart for the sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
struct NormKey {
    backward: bool,
    hw: usize,
    c: usize,
    groups: usize,
    silu: Silu,
    half_out: Option<Precision>,
    accumulate: bool,
    /// 16-bit input, and (backward) output gradient.
    x_half: Option<Precision>,
    dy_half: Option<Precision>,
    /// (Backward) a second gradient added onto the input gradient first.
    adds: bool,
}

/// The distinct GroupNorms of `steps` in program order: key, kind, shape label, count.
fn distinct_norms(
    steps: &[Step],
    n: usize,
    h: usize,
    w: usize,
) -> Vec<(NormKey, String, String, usize)> {
    let mut norms: Vec<(NormKey, String, String, usize)> = Vec::new();
    for s in steps {
        let key = match *s {
            Step::GroupNorm {
                hw,
                c,
                groups,
                silu,
                half_out,
                x_half,
                ..
            } => NormKey {
                backward: false,
                hw,
                c,
                groups,
                silu,
                half_out,
                accumulate: false,
                x_half,
                dy_half: None,
                adds: false,
            },
            Step::GroupNormBackward {
                hw,
                c,
                groups,
                silu,
                half_out,
                accumulate,
                x_half,
                dy_half,
                add,
                ..
            } => NormKey {
                backward: true,
                hw,
                c,
                groups,
                silu,
                half_out,
                accumulate,
                x_half,
                dy_half,
                adds: add.is_some(),
            },
            _ => continue,
        };
        match norms.iter_mut().find(|r| r.0 == key) {
            Some(r) => r.3 += 1,
            None => {
                let info = s.info(n, h, w);
                norms.push((key, info.kind.to_string(), info.shape, 1));
            }
        }
    }
    norms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::{im2col_box, plan_conv_at, plan_wgmma, Capabilities};
    use crate::model::graph::Pad;

    /// The GroupNorm sweep's rows cover every GroupNorm of the program once: celebahq's 71 in
    /// each direction, in fewer distinct shapes.
    #[test]
    fn distinct_norms_cover_the_program() {
        use crate::config::UNetConfig;
        use crate::cuda::program::Program;
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let p = Program::build(&g, 1, 256, 256, true, 132, Precision::Bf16).unwrap();
        let rows = distinct_norms(&p.steps, 1, 256, 256);
        for backward in [false, true] {
            let mine: Vec<_> = rows.iter().filter(|r| r.0.backward == backward).collect();
            assert_eq!(mine.iter().map(|r| r.3).sum::<usize>(), 71);
            assert!(mine.len() < 40, "{}", mine.len());
            let kind = if backward {
                "groupnorm bwd"
            } else {
                "groupnorm"
            };
            assert!(mine.iter().all(|r| r.1 == kind));
        }
        // With 16-bit GroupNorm inputs (a default), those GroupNorms are rows of their own.
        let tc = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
        assert!(tc.half_gn_inputs);
        let p = Program::build_with(&g, 1, 256, 256, false, 132, Precision::Bf16, tc).unwrap();
        let rows = distinct_norms(&p.steps, 1, 256, 256);
        assert_eq!(rows.iter().map(|r| r.3).sum::<usize>(), 71);
        let x16: usize = rows
            .iter()
            .filter(|r| r.0.x_half.is_some())
            .map(|r| r.3)
            .sum();
        assert_eq!(x16, 18);
        // In a DPS step, the backward passes that read 16-bit gradients (10) and those that
        // add residuals' gradients (11, defaults both) are rows of their own too.
        let p = Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, tc).unwrap();
        let rows = distinct_norms(&p.steps, 1, 256, 256);
        let count = |f: &dyn Fn(&NormKey) -> bool| -> usize {
            rows.iter().filter(|r| f(&r.0)).map(|r| r.3).sum()
        };
        assert_eq!(count(&|k| k.dy_half.is_some()), 10);
        assert_eq!(count(&|k| k.adds), 11);
    }

    /// The probe's counters become per-warpgroup means and shares that add up to one; a launch
    /// that counted nothing gives none.
    #[test]
    fn cycle_probe_reads_its_counters() {
        let p = CycleProbe::from_counters(&[100, 150, 50, 300, 400, 50, 150, 4, 72]).unwrap();
        assert_eq!(p.warpgroups, 4);
        assert_eq!(p.slices, 18.0);
        assert_eq!(p.cycles, 300.0);
        assert_eq!(p.phases.len(), WGMMA_PROBE_PHASES.len());
        assert!((p.phases.iter().map(|s| s.share).sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(p.phases[4].phase, "products + batch wait");
        assert!((p.phases[4].share - 400.0 / 1200.0).abs() < 1e-12);
        assert!(p
            .summary()
            .starts_with("300 cycles per warpgroup over 18.0 slices (17 per slice)"));
        assert!(CycleProbe::from_counters(&[0; WGMMA_PROBE_COUNTERS]).is_none());
    }

    /// Every candidate is a launch the kernels accept: whole K slices per split, splits that
    /// cover K, a workspace of at most four waves of tiles, 16-bit inputs only with the deep
    /// pipeline in bf16/fp16; the planned launch is among them.
    #[test]
    fn candidates_are_valid_launches() {
        let shapes = [
            ConvShape::forward(1, 8, 8, 512, 512, 3, 1, Pad::Symmetric),
            ConvShape::forward(8, 256, 256, 128, 128, 3, 1, Pad::Symmetric),
            ConvShape::forward(1, 128, 128, 128, 128, 3, 1, Pad::Symmetric),
            ConvShape::forward(2, 32, 32, 256, 256, 3, 2, Pad::RightBottom),
            ConvShape::linear(1, 256, 512, 1536),
        ];
        for precision in [Precision::Tf32, Precision::Bf16, Precision::Fp16] {
            for shape in &shapes {
                let mut planned = plan_conv_at(shape, 132, precision);
                planned.deep = true;
                let c = candidates(shape, planned, 132, true);
                assert!(c.contains(&planned));
                let slice = if precision == Precision::Tf32 { 16 } else { 32 };
                let tiles = shape.rows().div_ceil(128) * shape.ncols.div_ceil(128);
                for l in &c {
                    assert_eq!(l.kernel, planned.kernel);
                    assert!(!l.row_epilogue || l.deep);
                    if l.wgmma {
                        assert!(precision.is_half() && l.half_input && l.deep);
                        assert_eq!(l.k_per_split % WGMMA_SLICE, 0);
                        continue;
                    }
                    assert_eq!(l.k_per_split % slice, 0);
                    assert!(l.splits * l.k_per_split >= shape.k());
                    assert!((l.splits - 1) * l.k_per_split < shape.k());
                    assert!(l.splits == 1 || tiles * l.splits <= MAX_WAVES * 2 * 132 + tiles);
                    assert!(!l.half_input || (l.deep && precision.is_half()));
                }
                // A planned tall launch with TMA loads (and, unsplit, the prefetch): the
                // non-wgmma variants take none of them, only shapes the TMA kernels take get TMA
                // variants, and only the planned launch itself prefetches.
                if precision.is_half() {
                    if let Some(tall) = on_tile(
                        ConvLaunch {
                            row_epilogue: true,
                            lean_loads: true,
                            tma_loads: im2col_box(shape).is_some(),
                            prefetch: plan_wgmma(shape, 132, precision).unwrap().splits == 1,
                            ..plan_wgmma(shape, 132, precision).unwrap()
                        },
                        WgmmaTile::Tall,
                    ) {
                        let c = candidates(shape, tall, 132, true);
                        // No launch is timed twice.
                        for (i, l) in c.iter().enumerate() {
                            assert!(!c[..i].contains(l), "{l:?} twice");
                        }
                        for l in c {
                            assert!(
                                l.wgmma
                                    || (l.tile == WgmmaTile::Plain
                                        && !l.lean_loads
                                        && !l.tma_loads),
                                "{l:?}"
                            );
                            assert!(!l.tma_loads || im2col_box(shape).is_some(), "{l:?}");
                            assert!(!l.prefetch || l == tall, "{l:?}");
                            assert!(
                                !l.staged_epilogue || (l.tma_loads && l.splits == 1),
                                "{l:?}"
                            );
                        }
                    }
                }
                let pipes = if precision.is_half() { 3 } else { 2 };
                assert!(c.iter().filter(|l| l.splits == 1).count() >= pipes);
            }
        }
        // A fused shortcut: only the lean and TMA wgmma forms, each split covering the summed K.
        let fused = ConvShape::forward(1, 32, 32, 256, 256, 3, 1, Pad::Symmetric)
            .with_shortcut(512)
            .unwrap();
        let planned = ConvLaunch {
            row_epilogue: true,
            lean_loads: true,
            tma_loads: true,
            ..plan_wgmma(&fused, 132, Precision::Bf16).unwrap()
        };
        let c = candidates(&fused, planned, 132, true);
        assert!(c.len() > 2 && c.contains(&planned));
        assert!(c.iter().any(|l| l.staged_epilogue));
        for l in c {
            assert!(l.wgmma && l.lean_loads, "{l:?}");
            assert!(l.splits * l.k_per_split >= fused.k(), "{l:?}");
        }
    }
}
