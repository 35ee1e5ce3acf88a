//! Checks every kernel, forward and backward, against the CPU function it replaces, on random
//! inputs of awkward shapes (odd sizes, batches of 1 and 3, both paddings, one and several
//! heads, accumulating and overwriting), then the whole network against
//! [`CpuUnet`](crate::cpu::CpuUnet) on small random-weight configurations at non-square sizes,
//! then the device sampler (its kernels and whole loops, see `sampler_selftest`). Last, the
//! tensor-core precisions: their convolutions at the shapes that matter (tolerances per
//! precision, [`tensor_core_tolerance`]) and whole networks, the celebahq architecture
//! included, against the same fp32 CPU results. Each row reports the relative L2 error and the
//! GPU time of the launch(es).
//!
//! One file per family of checks: `convolutions` (and `conv_variants`, the other forms a
//! tensor-core launch can take; `folded_upsampling`, an upsampling folded into its
//! convolution; `fused_shortcut`, a 1x1 shortcut fused into one; `staged_epilogue`, epilogues
//! through shared memory; `narrow_mma`, the few-output ones on tensor cores), `linears`,
//! `group_norms` (and `concat_grads`, a concatenation's gradients written by its GroupNorm's
//! backward pass), `attentions`, `data_movement` and `networks` (and `launch_options`,
//! launches scheduled or merged); this module holds the rows, the [`Tester`], and the
//! tolerances and row-naming helpers more than one family uses (the others sit with their
//! checks).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaStream;

use super::device::{cu, Gpu};
use super::kernels::{ConvKernel, ConvPtrs, DPtr, LaunchSwitches};
use super::precision::Precision;
use super::weights::DevBuf;
use crate::tensor::rel_l2;
use crate::{Error, Result};

mod attentions;
mod concat_grads;
mod conv_variants;
mod convolutions;
mod data_movement;
mod folded_upsampling;
mod fused_shortcut;
mod group_norms;
mod linears;
mod networks;
#[cfg(test)]
pub(crate) use networks::celebahq_candidate_cases;
mod launch_options;
mod narrow_mma;
mod staged_epilogue;
mod strided_tma;

/// Largest relative L2 error a row may have to pass (fp32 against the fp32 CPU reference).
pub const TOLERANCE: f64 = 1e-5;

/// The tensor-core precisions the selftest checks.
const TENSOR_CORE: [Precision; 3] = [Precision::Tf32, Precision::Bf16, Precision::Fp16];

/// Largest relative L2 error of one convolution at `precision` against the fp32 CPU result:
/// a few times the operands' rounding (tf32 and fp16 keep 10 mantissa bits, bf16 7).
pub fn tensor_core_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => TOLERANCE,
        Precision::Tf32 => 2e-3,
        Precision::Bf16 => 1e-2,
        Precision::Fp16 => 5e-3,
    }
}

/// One check: an op at one shape.
#[derive(Clone, Debug)]
pub struct SelftestRow {
    /// The op and the kernel path it took, e.g. "conv3x3 s2 input-grad [vec, 4 splits]".
    pub op: String,
    /// The shape, in words.
    pub shape: String,
    /// ‖gpu − cpu‖ / ‖cpu‖.
    pub rel_l2: f64,
    /// GPU time of the launch(es), milliseconds (one run, after a warm-up run).
    pub gpu_ms: f64,
    /// Largest passing `rel_l2`: [`TOLERANCE`], or looser for whole sampling loops (their
    /// rows say so).
    pub tolerance: f64,
}

impl SelftestRow {
    /// Whether the error is within the row's tolerance (NaN fails).
    pub fn passed(&self) -> bool {
        self.rel_l2 <= self.tolerance
    }

    /// The row comparing `got` with `want` (NaN, a failure, when their lengths differ).
    pub(super) fn compare(
        op: String,
        shape: String,
        got: &[f32],
        want: &[f32],
        gpu_ms: f64,
        tolerance: f64,
    ) -> SelftestRow {
        let rel_l2 = if got.len() == want.len() {
            rel_l2(got, want)
        } else {
            f64::NAN
        };
        SelftestRow {
            op,
            shape,
            rel_l2,
            gpu_ms,
            tolerance,
        }
    }
}

/// Milliseconds of one run of `run` on `st`, between two CUDA events.
pub(super) fn time_one_run(st: &CudaStream, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    let a = cu(
        st.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
        "recording an event",
    )?;
    run()?;
    let b = cu(
        st.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
        "recording an event",
    )?;
    cu(b.synchronize(), "running the check")?;
    Ok(f64::from(cu(a.elapsed_ms(&b), "reading the timer")?))
}

/// The groups of checks [`selftest`] runs, in its order.
pub const SELFTEST_GROUPS: [&str; 17] = [
    "convolutions",
    "linear layers",
    "group norms",
    "attention",
    "data movement",
    "whole networks",
    "device sampler",
    "tensor-core networks",
    "tensor-core convolutions",
    "fused shortcuts",
    "staged epilogue",
    "concatenation gradients",
    "residual gradients",
    "launch options",
    "narrow tensor cores",
    "strided TMA",
    "approximate SiLU",
];

/// Runs every check on GPU `ordinal`, or with `only`, the groups whose name
/// ([`SELFTEST_GROUPS`]) contains it. Errors when `only` matches no group, or when the GPU
/// cannot be used at all; numerical failures are rows with [`SelftestRow::passed`] false, and
/// so is a group of checks that stops on an error (a failed launch, say): the row names the
/// group and the error, and the other groups still run, so that one run on a GPU reports
/// everything it can.
pub fn selftest(ordinal: usize, only: Option<&str>) -> Result<Vec<SelftestRow>> {
    let wanted = |name: &str| only.is_none_or(|o| name.contains(o));
    if !SELFTEST_GROUPS.iter().any(|g| wanted(g)) {
        return Err(Error::input(format!(
            "no selftest group matches `{}`; the groups: {}",
            only.unwrap_or_default(),
            SELFTEST_GROUPS.join(", ")
        )));
    }
    let gpu = Gpu::open(ordinal)?;
    let mut t = Tester {
        gpu: &gpu,
        rows: Vec::new(),
        seed: 0x5EED,
    };
    type Group = fn(&mut Tester, usize) -> Result<()>;
    let groups: [(&str, Group); 17] = [
        ("convolutions", |t, _| t.convolutions()),
        ("linear layers", |t, _| t.linears()),
        ("group norms", |t, _| t.group_norms()),
        ("attention", |t, _| t.attentions()),
        ("data movement", |t, _| t.data_movement()),
        ("whole networks", |t, o| t.unets(o)),
        ("device sampler", |t, o| {
            let rows = super::sampler_selftest::run(t.gpu, o)?;
            t.rows.extend(rows);
            Ok(())
        }),
        // The networks before the kernels: the kernel group also runs every other form of each
        // launch (tiles, epilogues), and a faulting kernel leaves the context unusable for
        // every check after it.
        ("tensor-core networks", |t, o| t.tensor_core_unets(o)),
        ("tensor-core convolutions", |t, _| {
            t.tensor_core_convolutions()?;
            t.folded_upsamplings()
        }),
        // The newest kernels last (defaults since stop 26): a fault in them ends no other check.
        ("fused shortcuts", |t, o| {
            t.fused_shortcuts(false)?;
            t.fused_shortcut_unets(o)
        }),
        ("staged epilogue", |t, o| {
            t.staged_epilogues()?;
            t.fused_shortcuts(true)?;
            t.staged_epilogue_unets(o)?;
            t.half_output_unets(o)
        }),
        ("concatenation gradients", |t, o| {
            t.concat_gradient_splits()?;
            t.concat_gradient_split_unets(o)
        }),
        ("residual gradients", |t, o| t.residual_gradient_unets(o)),
        ("launch options", |t, o| {
            t.class_concurrency_unets(o)?;
            t.class_half_copy_unets(o)?;
            t.reduction_copy_kernels()?;
            t.reduction_copy_unets(o)?;
            t.reduction_norm_kernels()?;
            t.reduction_norm_unets(o)
        }),
        // The newest kernel (a candidate, stop 37).
        ("narrow tensor cores", |t, o| {
            t.narrow_tensor_convolutions()?;
            t.narrow_tensor_unets(o)
        }),
        // A candidate (stop 39): its kernels are the tensor-core convolutions' with
        // INVDIFF_TMA_STRIDED=1.
        ("strided TMA", |t, o| t.strided_tma_unets(o)),
        // A candidate (stop 40): its kernels are the GroupNorms', whose group holds them to
        // the CPU with the approximate SiLU too.
        ("approximate SiLU", |t, o| t.approx_silu_unets(o)),
    ];
    debug_assert!(groups.iter().map(|g| g.0).eq(SELFTEST_GROUPS));
    for (name, group) in groups.into_iter().filter(|g| wanted(g.0)) {
        if let Err(e) = group(&mut t, ordinal) {
            t.rows.push(SelftestRow {
                op: format!("{name}: stopped by an error"),
                shape: e.to_string(),
                rel_l2: f64::NAN,
                gpu_ms: f64::NAN,
                tolerance: 0.0,
            });
        }
    }
    Ok(t.rows)
}

struct Tester<'g> {
    gpu: &'g Gpu,
    rows: Vec<SelftestRow>,
    seed: u64,
}

/// `len` uniform values in [lo, hi) from a fresh stream of the generator whose state is
/// `seed` (a cheap LCG: test data, not statistics).
pub(super) fn uniform(seed: &mut u64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    *seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    crate::rng::uniform_lcg(*seed | 1, len, lo, hi)
}

/// `v` rounded to the nearest `precision` (bf16 or fp16) value, ties to even, as f32.
fn round_half(v: f32, precision: Precision) -> f32 {
    match precision {
        Precision::Fp16 => half::f16::from_f32(v).to_f32(),
        _ => half::bf16::from_f32(v).to_f32(),
    }
}

/// A 16-bit concatenation of `ca + cb` channels, as `values` (16-bit values widened), with only
/// the sides `placed` there (what their producers wrote, INVDIFF_CONCAT_FROM_PRODUCERS) and
/// zeros elsewhere: the words the concatenation step starts from.
fn placed_sides(
    values: &[f32],
    (ca, cb): (usize, usize),
    placed: [bool; 2],
    precision: Precision,
) -> Vec<f32> {
    let bits: Vec<u16> = values
        .chunks(ca + cb)
        .flat_map(|px| {
            px.iter().enumerate().map(move |(j, &v)| {
                if !placed[usize::from(j >= ca)] {
                    0
                } else if precision == Precision::Fp16 {
                    half::f16::from_f32(v).to_bits()
                } else {
                    half::bf16::from_f32(v).to_bits()
                }
            })
        })
        .collect();
    bits.chunks(2)
        .map(|w| f32::from_bits(u32::from(w[0]) | u32::from(*w.get(1).unwrap_or(&0)) << 16))
        .collect()
}

/// The first `len` 16-bit values (two per f32 word, the first in the low half) as f32.
fn unpack_half(words: &[f32], len: usize, precision: Precision) -> Vec<f32> {
    words
        .iter()
        .flat_map(|w| {
            let b = w.to_bits();
            [b as u16, (b >> 16) as u16]
        })
        .take(len)
        .map(|h| match precision {
            Precision::Fp16 => half::f16::from_bits(h).to_f32(),
            _ => half::bf16::from_bits(h).to_f32(),
        })
        .collect()
}

impl Tester<'_> {
    /// The launch choices in force with `set` applied, for rows that run a kernel both ways
    /// ([`Kernels::with_launch`](crate::cuda::kernels::Kernels::with_launch)).
    fn launch_with(&self, set: impl FnOnce(&mut LaunchSwitches)) -> LaunchSwitches {
        let mut l = self.gpu.kernels.launch_switches();
        set(&mut l);
        l
    }

    /// Uniform values in [lo, hi), from a fresh stream of the generator.
    fn rand(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        uniform(&mut self.seed, len, lo, hi)
    }

    /// What an input gradient of `len` values holds before a backward launch: values it adds
    /// onto when it accumulates, else zeros.
    fn grad_start(&mut self, len: usize, accumulate: bool) -> Vec<f32> {
        if accumulate {
            self.rand(len, -1.0, 1.0)
        } else {
            vec![0.0; len]
        }
    }

    fn up(&self, data: &[f32]) -> Result<DevBuf> {
        DevBuf::upload(&self.gpu.stream, data)
    }

    fn zeros(&self, len: usize) -> Result<DevBuf> {
        DevBuf::zeros(&self.gpu.stream, len)
    }

    /// The `len` fp32 values at `x` rounded to 16 bits (two per f32 slot), in a new buffer.
    fn half_copy(&self, x: DPtr, len: usize, precision: Precision) -> Result<DevBuf> {
        let copy = self.zeros(len.div_ceil(2))?;
        self.gpu
            .kernels
            .convert_half(&self.gpu.stream, x, copy.ptr, len, precision)?;
        Ok(copy)
    }

    fn timed(
        &self,
        mut reset: impl FnMut() -> Result<()>,
        mut run: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        reset()?;
        run()?;
        reset()?;
        time_one_run(&self.gpu.stream, run)
    }

    /// Rows for a kernel's 16-bit output in bf16 and fp16: `run(out, precision)` writes
    /// `want.len()` values into `out`, which must be within the format's unit roundoff u of the
    /// CPU's fp32 `want` (round to nearest: |error| <= u |value|).
    fn half_output_rows(
        &mut self,
        op: &str,
        shape: &str,
        want: &[f32],
        mut run: impl FnMut(DPtr, Precision) -> Result<()>,
    ) -> Result<()> {
        for (precision, u) in [
            (Precision::Bf16, 2f64.powi(-8)),
            (Precision::Fp16, 2f64.powi(-11)),
        ] {
            let out = self.zeros(want.len().div_ceil(2))?;
            let ms = self.timed(|| Ok(()), || run(out.ptr, precision))?;
            let got = unpack_half(&out.download(&self.gpu.stream)?, want.len(), precision);
            self.row_within(
                format!("{op}, {precision} output"),
                shape.to_string(),
                &got,
                want,
                ms,
                1.02 * u,
            );
        }
        Ok(())
    }

    /// Rows for a kernel's 16-bit copy of its fp32 output, in bf16 and fp16:
    /// `run(out, precision)` writes both and returns the fp32 output. That output must be
    /// `same` (the kernel's output without the copy) to the bit, and the copy must be it
    /// rounded to nearest even, as a conversion launch rounds it, to the bit.
    fn half_copy_rows(
        &mut self,
        op: &str,
        shape: &str,
        same: &[f32],
        mut run: impl FnMut(DPtr, Precision) -> Result<Vec<f32>>,
    ) -> Result<()> {
        for precision in [Precision::Bf16, Precision::Fp16] {
            let out = self.zeros(same.len().div_ceil(2))?;
            let fp32 = run(out.ptr, precision)?;
            let copy = unpack_half(&out.download(&self.gpu.stream)?, same.len(), precision);
            let rounded: Vec<f32> = fp32.iter().map(|&v| round_half(v, precision)).collect();
            let bits = format!("{shape}, bits");
            self.row_within(
                format!("{op}, its {precision} copy"),
                bits.clone(),
                &copy,
                &rounded,
                0.0,
                0.0,
            );
            self.row_within(
                format!("{op} beside its {precision} copy"),
                bits,
                &fp32,
                same,
                0.0,
                0.0,
            );
        }
        Ok(())
    }

    /// A row that passes when `holds`: a property of a plan, not a comparison of values.
    fn check_row(&mut self, op: String, shape: String, holds: bool) {
        self.rows.push(SelftestRow {
            op,
            shape,
            rel_l2: if holds { 0.0 } else { f64::NAN },
            gpu_ms: 0.0,
            tolerance: 0.0,
        });
    }

    /// A row holding `got` to `want` word for word (f64 sums as pairs of f32 words, say): its
    /// `rel_l2` the number of words whose bits differ, so that any difference fails it.
    fn same_words_row(&mut self, op: String, desc: &str, got: &[f32], want: &[f32], gpu_ms: f64) {
        let differ = differing_bits(got, want);
        self.rows.push(SelftestRow {
            op,
            shape: format!("{desc}: {differ} of {} words differ", want.len()),
            rel_l2: differ as f64,
            gpu_ms,
            tolerance: 0.0,
        });
    }

    /// A row showing that `got` is not `other` bit for bit (another kernel's arithmetic ran),
    /// with how many values differ and by how much.
    fn differs_row(&mut self, op: String, desc: &str, got: &[f32], other: &[f32]) {
        let differ = differing_bits(got, other);
        let shape = format!(
            "{desc}: {differ} of {} values differ, relative L2 {:.2e}",
            got.len(),
            crate::tensor::rel_l2(got, other)
        );
        self.check_row(op, shape, differ > 0);
    }

    fn row(&mut self, op: String, shape: String, got: &[f32], want: &[f32], gpu_ms: f64) {
        self.row_within(op, shape, got, want, gpu_ms, TOLERANCE);
    }

    fn row_within(
        &mut self,
        op: String,
        shape: String,
        got: &[f32],
        want: &[f32],
        gpu_ms: f64,
        tolerance: f64,
    ) {
        self.rows.push(SelftestRow::compare(
            op, shape, got, want, gpu_ms, tolerance,
        ));
    }
}

/// How many values of `a` differ from `b`'s in their bits (and in length, one each).
fn differing_bits(a: &[f32], b: &[f32]) -> usize {
    let pairs = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits());
    pairs.count() + a.len().abs_diff(b.len())
}

/// The epilogues a launch check runs under, each overwriting and then adding onto an output:
/// every term of `all` and a divisor of 2; then the branches without: a time embedding alone
/// (no bias: its sum starts at zero), no divisor; nothing at all. Each as (what, pointers,
/// divisor, accumulate).
fn epilogue_setups(all: ConvPtrs) -> impl Iterator<Item = (&'static str, ConvPtrs, f32, bool)> {
    let temb_alone = ConvPtrs {
        bias: 0,
        res: 0,
        ..all
    };
    let bare = ConvPtrs {
        temb: 0,
        ..temb_alone
    };
    [
        ("temb, residual, /2", all, 2.0),
        ("temb alone", temb_alone, 1.0),
        ("no epilogue terms", bare, 1.0),
    ]
    .into_iter()
    .flat_map(|(what, p, div)| [(what, p, div, false), (what, p, div, true)])
}

fn acc_name(accumulate: bool) -> &'static str {
    if accumulate {
        " (accumulate)"
    } else {
        ""
    }
}

fn path(k: ConvKernel, splits: usize) -> String {
    let name = match k {
        ConvKernel::Vec => "vec",
        ConvKernel::Any => "any",
        ConvKernel::Narrow => "narrow",
        ConvKernel::FewIn => "few-in",
        ConvKernel::Tensor(_) => "tc",
        ConvKernel::NarrowTensor(_) => "narrow tc",
        ConvKernel::FewInTensor => "few-in tc",
    };
    if splits > 1 {
        format!("{name}, {splits} splits")
    } else {
        name.to_string()
    }
}
