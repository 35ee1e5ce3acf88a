//! Checks every kernel, forward and backward, against the CPU function it replaces, on random
//! inputs of awkward shapes (odd sizes, batches of 1 and 3, both paddings, one and several
//! heads, accumulating and overwriting), then the whole network against [`CpuUnet`] on small
//! random-weight configurations at non-square sizes, then the device sampler (its kernels and
//! whole loops, see `sampler_selftest`). Last, the tensor-core precisions: their convolutions at
//! the shapes that matter (tolerances per precision, [`tensor_core_tolerance`]) and whole
//! networks, the celebahq architecture included, against the same fp32 CPU results. Each row
//! reports the relative L2 error and the GPU time of the launch(es).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaStream;

use super::device::{cu, Gpu};
use super::kernels::{
    at, flash_fits, gn_partial_fits, linear_batch_table, norm_forms, on_tile, plan_conv,
    plan_conv_at, plan_norm, plan_wgmma, ConvKernel, ConvLaunch, ConvPtrs, ConvShape, DPtr, Gemm,
    NormDims, NormInput, OnePass, ProbeCounters, WgmmaTile, WGMMA_PROBE_PHASES, WGMMA_SLICE,
};
use super::precision::Precision;
use super::unet::{attention_backward, attention_forward, Attn, AttnKernel, CudaUnet};
use super::weights::{transpose, DevBuf, DevConv};
use crate::config::{BlockKind, UNetConfig};
use crate::cpu::conv::{self, ConvParams, Geometry};
use crate::cpu::linear::{self, LinearParams};
use crate::cpu::{attention, norm, resample, CpuUnet};
use crate::model::graph::Pad;
use crate::model::{Graph, Model, Weights};
use crate::tensor::rel_l2;
use crate::{Error, Result, Tensor};

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

/// The attention input gradient with its four products on tf32 tensor cores, against the
/// fp32 CPU result.
const ATTENTION_TF32_GRAD: f64 = 5e-3;

/// Whole networks below fp32: eps and the input gradient (which goes through the network twice).
const NETWORK_TOLERANCE: (f64, f64) = (1e-2, 2e-2);

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
pub const SELFTEST_GROUPS: [&str; 9] = [
    "convolutions",
    "linear layers",
    "group norms",
    "attention",
    "data movement",
    "whole networks",
    "device sampler",
    "tensor-core networks",
    "tensor-core convolutions",
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
    let groups: [(&str, Group); 9] = [
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
        // The networks before the kernels: the kernel group also runs the candidate forms
        // (tiles not yet timed, PERF.md), and a faulting kernel leaves the context unusable
        // for every check after it.
        ("tensor-core networks", |t, o| t.tensor_core_unets(o)),
        ("tensor-core convolutions", |t, _| {
            t.tensor_core_convolutions()
        }),
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

/// The inputs and CPU results of one convolution check.
struct ConvData<'a> {
    x: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    temb: Option<&'a [f32]>,
    res: Option<&'a [f32]>,
    want: &'a [f32],
    dy: &'a [f32],
    dx0: &'a [f32],
    want_dx: &'a [f32],
}

/// A convolution check.
struct ConvCase {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: Pad,
    temb: bool,
    res: bool,
    out_div: f32,
    accumulate: bool,
}

#[allow(clippy::too_many_arguments)]
fn cc(
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: Pad,
) -> ConvCase {
    ConvCase {
        n,
        h,
        w,
        cin,
        cout,
        k,
        stride,
        pad,
        temb: false,
        res: false,
        out_div: 1.0,
        accumulate: false,
    }
}

/// `len` uniform values in [lo, hi) from a fresh stream of the generator whose state is
/// `seed` (a cheap LCG: test data, not statistics).
pub(super) fn uniform(seed: &mut u64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    *seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    crate::rng::uniform_lcg(*seed | 1, len, lo, hi)
}

impl Tester<'_> {
    /// Uniform values in [lo, hi), from a fresh stream of the generator.
    fn rand(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        uniform(&mut self.seed, len, lo, hi)
    }

    fn up(&self, data: &[f32]) -> Result<DevBuf> {
        DevBuf::upload(&self.gpu.stream, data)
    }

    fn zeros(&self, len: usize) -> Result<DevBuf> {
        DevBuf::zeros(&self.gpu.stream, len)
    }

    /// Runs `run` once to warm up, resets its output with `reset`, then times one run.
    /// Launch `plan` of `shape` with `ptrs` into a fresh zeroed output of `len` values, not
    /// accumulating: the output and the launch's time.
    fn conv_output(
        &self,
        shape: &ConvShape,
        plan: &ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        len: usize,
    ) -> Result<(Vec<f32>, f64)> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let y = self.zeros(len)?;
        let p = ConvPtrs { y: y.ptr, ..ptrs };
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv(st, shape, plan, p, out_div, false),
        )?;
        Ok((y.download(st)?, ms))
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

    fn convolutions(&mut self) -> Result<()> {
        use Pad::*;
        let cases = vec![
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                ..cc(1, 7, 5, 16, 24, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(3, 9, 6, 3, 20, 3, 1, Symmetric)
            },
            cc(2, 10, 6, 32, 12, 3, 2, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 10, 6, 32, 12, 3, 2, RightBottom)
            },
            cc(1, 6, 14, 20, 36, 3, 2, RightBottom),
            ConvCase {
                res: true,
                accumulate: true,
                ..cc(3, 5, 7, 24, 40, 1, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(1, 9, 7, 40, 3, 3, 1, Symmetric)
            },
            ConvCase {
                temb: true,
                ..cc(1, 64, 48, 128, 128, 3, 1, Symmetric)
            },
            cc(1, 8, 8, 256, 256, 3, 1, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 32, 32, 64, 64, 3, 2, Symmetric)
            },
            // Full size: celebahq's first level (19.3 GFLOP), for a realistic time.
            ConvCase {
                temb: true,
                ..cc(1, 256, 256, 128, 128, 3, 1, Symmetric)
            },
            // The 3-channel image convolutions at celebahq's size, on the direct kernels:
            // conv_out 128->3 (forward narrow, input gradient few-in) and conv_in 3->128
            // (forward few-in, input gradient narrow), with the network's epilogues (a bias
            // forward, a fresh input gradient) at batch 1, accumulating at batch 2.
            cc(1, 256, 256, 128, 3, 3, 1, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 256, 256, 128, 3, 3, 1, Symmetric)
            },
            cc(1, 256, 256, 3, 128, 3, 1, Symmetric),
            ConvCase {
                accumulate: true,
                ..cc(2, 256, 256, 3, 128, 3, 1, Symmetric)
            },
            // The direct kernels at odd sizes: partial tiles and runs, channel counts not
            // multiples of 4 (4-byte copies, partial column quads, scalar stores), every
            // epilogue term; the parity classes of a stride-2 gradient (taps filling part of
            // the window, output stride 2); 1x1.
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                accumulate: true,
                ..cc(2, 24, 20, 13, 5, 3, 1, Symmetric)
            },
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                accumulate: true,
                ..cc(3, 24, 20, 5, 13, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(1, 12, 10, 6, 16, 3, 2, RightBottom)
            },
            ConvCase {
                res: true,
                ..cc(2, 7, 9, 12, 3, 1, 1, Symmetric)
            },
        ];
        for c in cases {
            self.conv_case(c, &[Precision::Fp32])?;
        }
        self.direct_batch_invariance()
    }

    /// The direct kernels compute an image's outputs from that image alone: the first image's
    /// result in a batch of 2 equals, bit for bit, its result alone (forward and input
    /// gradient of 128->3 and 3->128).
    fn direct_batch_invariance(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (h, w) = (40, 72);
        for (cin, cout) in [(128, 3), (3, 128)] {
            let bound = 1.0 / ((cin * 9) as f32).sqrt();
            let wt = self.rand(cout * cin * 9, -bound, bound);
            let b = self.rand(cout, -1.0, 1.0);
            let mut dev = DevConv::upload(gpu, &wt, &b, cout, cin, 3, Precision::Fp32)?;
            dev.ensure_backward(gpu)?;
            for backward in [false, true] {
                let (src_c, out_c) = if backward { (cout, cin) } else { (cin, cout) };
                let src = self.rand(2 * h * w * src_c, -1.0, 1.0);
                let xd = self.up(&src)?;
                let mut outs = Vec::new();
                let mut paths = Vec::new();
                let mut ms = 0.0;
                for n in [2, 1] {
                    let shape = if backward {
                        ConvShape::backward(n, h, w, cin, cout, 3, 1, Pad::Symmetric).remove(0)
                    } else {
                        ConvShape::forward(n, h, w, cin, cout, 3, 1, Pad::Symmetric)
                    };
                    let plan = plan_conv(&shape, gpu.sms());
                    let yd = self.zeros(n * h * w * out_c)?;
                    let ptrs = ConvPtrs {
                        x: xd.ptr,
                        w: dev.weights_for(plan.kernel, backward)?,
                        y: yd.ptr,
                        bias: if backward { 0 } else { dev.bias.ptr },
                        ..ConvPtrs::default()
                    };
                    ms = self.timed(
                        || Ok(()),
                        || gpu.kernels.conv(st, &shape, &plan, ptrs, 1.0, false),
                    )?;
                    outs.push(yd.download(st)?);
                    paths.push(path(plan.kernel, plan.splits));
                }
                let alone = &outs[1];
                self.row_within(
                    format!(
                        "conv3x3 s1 {} [{}] image 1 of 2 vs alone",
                        if backward { "input-grad" } else { "forward" },
                        paths.join(" vs ")
                    ),
                    format!("{h}x{w} {cin}->{cout}"),
                    &outs[0][..alone.len()],
                    alone,
                    ms,
                    0.0,
                );
            }
        }
        Ok(())
    }

    /// Every tensor-core precision at celebahq's shapes (the largest and the smallest level,
    /// split-K, both stride-2 paddings, 1x1) and at odd sizes, epilogue and accumulation
    /// included; channels not multiples of 8 take the fp32 path (the row's path says so).
    fn tensor_core_convolutions(&mut self) -> Result<()> {
        use Pad::*;
        let cases = vec![
            ConvCase {
                temb: true,
                ..cc(1, 256, 256, 128, 128, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(1, 8, 8, 512, 512, 3, 1, Symmetric)
            },
            // Rows of 64 (the halo tile's two-row tiles), a partial column tile both ways.
            ConvCase {
                temb: true,
                res: true,
                accumulate: true,
                ..cc(2, 64, 64, 96, 160, 3, 1, Symmetric)
            },
            ConvCase {
                accumulate: true,
                ..cc(2, 32, 32, 64, 64, 3, 2, Symmetric)
            },
            cc(2, 10, 6, 32, 16, 3, 2, RightBottom),
            ConvCase {
                res: true,
                accumulate: true,
                ..cc(3, 5, 7, 24, 40, 1, 1, Symmetric)
            },
            ConvCase {
                temb: true,
                res: true,
                out_div: 2.0,
                ..cc(1, 7, 5, 16, 24, 3, 1, Symmetric)
            },
            cc(3, 9, 6, 3, 20, 3, 1, Symmetric),
            // 72 outputs (40 back, in the input gradient): the columns end inside a warp's 32
            // (mma.sync) and inside the 128 of a wgmma tile; 99 rows, K not a whole number of
            // slices.
            ConvCase {
                res: true,
                ..cc(1, 9, 11, 40, 72, 3, 1, Symmetric)
            },
        ];
        for c in cases {
            self.conv_case(c, &TENSOR_CORE)?;
        }
        Ok(())
    }

    /// Checks one convolution, forward and input gradient, at each of `precisions` against
    /// the same CPU results.
    fn conv_case(&mut self, c: ConvCase, precisions: &[Precision]) -> Result<()> {
        let ConvCase {
            n,
            h,
            w,
            cin,
            cout,
            k,
            stride,
            pad,
            out_div,
            accumulate,
            ..
        } = c;
        let geo = Geometry {
            n,
            h,
            w,
            stride,
            pad,
        };
        let (oh, ow) = (h / stride, w / stride);
        let bound = 1.0 / ((cin * k * k) as f32).sqrt();
        let x = self.rand(n * h * w * cin, -1.0, 1.0);
        let wt = self.rand(cout * cin * k * k, -bound, bound);
        let b = self.rand(cout, -1.0, 1.0);
        let temb = if c.temb {
            Some(self.rand(n * cout, -1.0, 1.0))
        } else {
            None
        };
        let res = if c.res {
            Some(self.rand(n * oh * ow * cout, -1.0, 1.0))
        } else {
            None
        };
        let cpu = ConvParams::new(&wt, &b, cout, cin, k);
        let mut want = vec![0.0; n * oh * ow * cout];
        conv::forward(
            &cpu,
            &x,
            geo,
            temb.as_deref(),
            res.as_deref(),
            out_div,
            &mut want,
        );
        let dy = self.rand(want.len(), -1.0, 1.0);
        let dx0 = if accumulate {
            self.rand(x.len(), -1.0, 1.0)
        } else {
            vec![0.0; x.len()]
        };
        let mut want_dx = dx0.clone();
        conv::backward_input(&cpu, &dy, geo, &mut want_dx, accumulate);
        for &precision in precisions {
            self.conv_on_gpu(
                &c,
                precision,
                ConvData {
                    x: &x,
                    w: &wt,
                    b: &b,
                    temb: temb.as_deref(),
                    res: res.as_deref(),
                    want: &want,
                    dy: &dy,
                    dx0: &dx0,
                    want_dx: &want_dx,
                },
            )?;
        }
        Ok(())
    }

    /// The GPU half of [`conv_case`](Self::conv_case) at one precision.
    fn conv_on_gpu(&mut self, c: &ConvCase, precision: Precision, d: ConvData) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let &ConvCase {
            n,
            h,
            w,
            cin,
            cout,
            k,
            stride,
            pad,
            out_div,
            accumulate,
            ..
        } = c;
        let ConvData {
            x,
            w: wt,
            b,
            temb,
            res,
            want,
            dy,
            dx0,
            want_dx,
        } = d;
        let tolerance = tensor_core_tolerance(precision);
        let named = |op: String| {
            if precision == Precision::Fp32 {
                op
            } else {
                format!("{precision} {op}")
            }
        };
        let mut dev = DevConv::upload(gpu, wt, b, cout, cin, k, precision)?;
        let xd = self.up(x)?;
        let td = temb.map(|t| self.up(t)).transpose()?;
        let rd = res.map(|r| self.up(r)).transpose()?;
        let yd = self.zeros(want.len())?;
        let shape = ConvShape::forward(n, h, w, cin, cout, k, stride, pad);
        let plan = plan_conv_at(&shape, gpu.sms(), precision);
        let ws = self.zeros(plan.workspace_len(&shape))?;
        let ptrs = ConvPtrs {
            x: xd.ptr,
            w: dev.weights_for(plan.kernel, false)?,
            y: yd.ptr,
            bias: dev.bias.ptr,
            temb: td.as_ref().map_or(0, |d| d.ptr),
            res: rd.as_ref().map_or(0, |d| d.ptr),
            ws: ws.ptr,
            norm: 0,
            gn_partial: 0,
        };
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv(st, &shape, &plan, ptrs, out_div, false),
        )?;
        let got = yd.download(st)?;
        let desc = format!("n{n} {h}x{w} {cin}->{cout}{}", pad_name(k, stride, pad));
        let epi = [(c.temb, "+temb"), (c.res, "+res"), (out_div != 1.0, "/div")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, s)| *s)
            .collect::<String>();
        self.row_within(
            named(format!(
                "conv{k}x{k} s{stride} forward{epi} [{}]",
                path(plan.kernel, plan.splits)
            )),
            desc.clone(),
            &got,
            want,
            ms,
            tolerance,
        );
        // The deep pipelines, from fp32 and (bf16/fp16) from the input already rounded to 16
        // bits in memory, as a GroupNorm before a convolution writes it: the same schedule of
        // roundings and sums, so the same result as the two-stage kernel's.
        for (deep, copy) in self.deep_variants(plan, xd.ptr, x.len())? {
            let xin = copy.as_ref().map_or(xd.ptr, |c| c.ptr);
            let p = ConvPtrs { x: xin, ..ptrs };
            let (out, ms) = self.conv_output(&shape, &deep, p, out_div, want.len())?;
            self.row_within(
                named(format!(
                    "conv{k}x{k} s{stride} forward{epi} [{}] vs two-stage",
                    deep_path(&deep)
                )),
                desc.clone(),
                &out,
                &got,
                ms,
                0.0,
            );
        }
        // Hopper's wgmma kernel, on the 16-bit input and the K-major weights (the
        // input-gradient layout): the same products as mma.sync, summed in another order.
        dev.ensure_backward(gpu)?;
        if let Some((wp, copy)) = self.wgmma_variant(&shape, precision, xd.ptr, x.len())? {
            let ws = self.zeros(wp.workspace_len(&shape))?;
            let ptrs = ConvPtrs {
                x: copy.ptr,
                w: dev.weights_for(wp.kernel, true)?,
                ws: ws.ptr,
                ..ptrs
            };
            let (wg_out, ms) = self.conv_output(&shape, &wp, ptrs, out_div, want.len())?;
            self.row_within(
                named(format!(
                    "conv{k}x{k} s{stride} forward{epi} [{}] vs mma.sync",
                    wgmma_path(&wp)
                )),
                desc.clone(),
                &wg_out,
                &got,
                ms,
                WGMMA_VS_MMA,
            );
            let label = named(format!("conv{k}x{k} s{stride} forward{epi}"));
            // The row epilogue, the tall and six-stage tiles: the same products summed in the
            // same order and the same epilogue arithmetic, so the same bits; the halo tile sums
            // them in another order.
            for (v, tolerance) in std::iter::once((wp, 0.0)).chain(wgmma_forms(wp, &shape)) {
                if v != wp {
                    let (out, ms) = self.conv_output(&shape, &v, ptrs, out_div, want.len())?;
                    self.row_within(
                        format!("{label} [{}] vs plain wgmma", wgmma_path(&v)),
                        desc.clone(),
                        &out,
                        &wg_out,
                        ms,
                        tolerance,
                    );
                }
                // (The prefetch happens before the counted phases: no probe of its own.)
                if out_div == 1.0 && !v.prefetch_weights {
                    self.probe_row(&shape, v, ptrs, &wg_out, &label, &desc)?;
                }
            }
            self.cluster_rows(&shape, wp, ptrs, out_div, want.len(), &label, &desc)?;
            if let Some(halo) = on_tile(wp, &shape, WgmmaTile::Halo) {
                let (img, len) = (x.len(), want.len());
                self.halo_norm_row(&shape, halo, ptrs, xd.ptr, img, out_div, len, &label, &desc)?;
                self.halo_stats_row(&shape, halo, ptrs, out_div, len, &label, &desc)?;
            }
        }
        let dyd = self.up(dy)?;
        let mut dxd = self.up(dx0)?;
        let dx_ptr = dxd.ptr;
        let shapes = ConvShape::backward(n, h, w, cin, cout, k, stride, pad);
        let plans: Vec<_> = shapes
            .iter()
            .map(|s| plan_conv_at(s, gpu.sms(), precision))
            .collect();
        let ws_len = shapes
            .iter()
            .zip(&plans)
            .map(|(s, p)| p.workspace_len(s))
            .max()
            .unwrap_or(0);
        let ws = self.zeros(ws_len)?;
        let input_grad = |plans: &[ConvLaunch], dy: DPtr| -> Result<()> {
            for (s, p) in shapes.iter().zip(plans) {
                let ptrs = ConvPtrs {
                    x: dy,
                    w: dev.weights_for(p.kernel, true)?,
                    y: dx_ptr,
                    ws: ws.ptr,
                    ..ConvPtrs::default()
                };
                gpu.kernels.conv(st, s, p, ptrs, 1.0, accumulate)?;
            }
            Ok(())
        };
        let ms = self.timed(|| dxd.write(st, dx0), || input_grad(&plans, dyd.ptr))?;
        let got = dxd.download(st)?;
        let paths: Vec<String> = plans.iter().map(|p| path(p.kernel, p.splits)).collect();
        self.row_within(
            named(format!(
                "conv{k}x{k} s{stride} input-grad{} [{}]",
                acc_name(accumulate),
                paths.join(", ")
            )),
            desc.clone(),
            &got,
            want_dx,
            ms,
            tolerance,
        );
        // Deep pipelines for the input gradient (the 16-bit dy: what a GroupNorm's backward
        // writes for the first convolution of a residual block), against the two-stage result.
        // The parity classes of a stride-2 gradient share their channels, hence their kernel.
        debug_assert!(plans
            .iter()
            .all(|p| Some(p.kernel) == plans.first().map(|f| f.kernel)));
        if let Some(&first) = plans.first() {
            for (deep, copy) in self.deep_variants(first, dyd.ptr, dy.len())? {
                let dyin = copy.as_ref().map_or(dyd.ptr, |c| c.ptr);
                let deep_plans: Vec<ConvLaunch> = plans
                    .iter()
                    .map(|p| ConvLaunch {
                        deep: deep.deep,
                        half_input: deep.half_input,
                        row_epilogue: deep.row_epilogue,
                        prefetch_weights: deep.prefetch_weights,
                        ..*p
                    })
                    .collect();
                let ms = self.timed(|| dxd.write(st, dx0), || input_grad(&deep_plans, dyin))?;
                self.row_within(
                    named(format!(
                        "conv{k}x{k} s{stride} input-grad{} [{}] vs two-stage",
                        acc_name(accumulate),
                        deep_path(&deep)
                    )),
                    desc.clone(),
                    &dxd.download(st)?,
                    &got,
                    ms,
                    0.0,
                );
            }
        }
        // wgmma for the input gradient: K-major weights are the forward layout.
        let wg_plans: Option<Vec<ConvLaunch>> = shapes
            .iter()
            .map(|s| plan_wgmma(s, gpu.sms(), precision))
            .collect();
        if let (Some(wg_plans), Some(first)) = (wg_plans, shapes.first()) {
            if let Some((_, copy)) = self.wgmma_variant(first, precision, dyd.ptr, dy.len())? {
                let ws_len = shapes
                    .iter()
                    .zip(&wg_plans)
                    .map(|(s, p)| p.workspace_len(s))
                    .max()
                    .unwrap_or(0);
                let ws = self.zeros(ws_len)?;
                let run = |plans: &[ConvLaunch]| -> Result<()> {
                    for (s, p) in shapes.iter().zip(plans) {
                        let ptrs = ConvPtrs {
                            x: copy.ptr,
                            w: dev.weights_for(p.kernel, false)?,
                            y: dx_ptr,
                            ws: ws.ptr,
                            ..ConvPtrs::default()
                        };
                        gpu.kernels.conv(st, s, p, ptrs, 1.0, accumulate)?;
                    }
                    Ok(())
                };
                let ms = self.timed(|| dxd.write(st, dx0), || run(&wg_plans))?;
                let paths: Vec<String> = wg_plans.iter().map(wgmma_path).collect();
                let wg_got = dxd.download(st)?;
                self.row_within(
                    named(format!(
                        "conv{k}x{k} s{stride} input-grad{} [{}] vs mma.sync",
                        acc_name(accumulate),
                        paths.join(", ")
                    )),
                    desc.clone(),
                    &wg_got,
                    &got,
                    ms,
                    WGMMA_VS_MMA,
                );
                // The row epilogue (accumulating too), the tall and six-stage tiles: the same
                // bits; the halo tile where it takes the launch (the plain one elsewhere).
                for (form, tolerance) in wgmma_forms(wg_plans[0], &shapes[0]) {
                    let v: Vec<ConvLaunch> = wg_plans
                        .iter()
                        .zip(&shapes)
                        .map(|(p, s)| ConvLaunch {
                            row_epilogue: form.row_epilogue,
                            prefetch_weights: form.prefetch_weights,
                            ..on_tile(*p, s, form.tile).unwrap_or(*p)
                        })
                        .collect();
                    let ms = self.timed(|| dxd.write(st, dx0), || run(&v))?;
                    let paths: Vec<String> = v.iter().map(wgmma_path).collect();
                    self.row_within(
                        named(format!(
                            "conv{k}x{k} s{stride} input-grad{} [{}] vs plain wgmma",
                            acc_name(accumulate),
                            paths.join(", ")
                        )),
                        desc.clone(),
                        &dxd.download(st)?,
                        &wg_got,
                        ms,
                        tolerance,
                    );
                }
            }
        }
        Ok(())
    }

    /// wgmma launch `wp` of `shape` through its cycle-counting kernel (`ptrs` as for `want`,
    /// the plain kernel's output): the same outputs to the bit, and counters that add up (two
    /// warpgroups per block, four in a tall one, each with its split's K slices).
    fn probe_row(
        &mut self,
        shape: &ConvShape,
        wp: ConvLaunch,
        ptrs: ConvPtrs,
        want: &[f32],
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let y = self.zeros(want.len())?;
        let ws = self.zeros(wp.workspace_len(shape))?;
        let p = ConvPtrs {
            y: y.ptr,
            ws: ws.ptr,
            ..ptrs
        };
        let counters = ProbeCounters::new(st)?;
        let ms = self.timed(
            || Ok(()),
            || gpu.kernels.conv_probe(st, shape, &wp, p, &counters),
        )?;
        let c = counters.read(st)?;
        // Two warpgroups per block, four in a tall one.
        let per_block = wp.tile.rows() as u64 / 64;
        let tiles = (shape.rows().div_ceil(wp.tile.rows()) * shape.ncols.div_ceil(128)) as u64;
        let slices = shape.k().div_ceil(wp.tile.k_step()) as u64;
        let warpgroups = per_block * tiles * wp.splits as u64;
        let phases = WGMMA_PROBE_PHASES.len();
        // `timed` runs the launch twice (warm-up, then timed): whole multiples of one launch's
        // counts. The splits of a tile share its slices.
        let runs = c[phases] / warpgroups.max(1);
        let counted = runs > 0
            && c[phases] == runs * warpgroups
            && c[phases + 1] == runs * per_block * tiles * slices
            && c[..phases].iter().all(|&v| v > 0);
        let op = format!("{label} [{}] cycle probe vs plain", wgmma_path(&wp));
        if counted {
            self.row_within(op, desc.into(), &y.download(st)?, want, ms, 0.0);
        } else {
            self.rows.push(SelftestRow {
                op,
                shape: format!(
                    "{desc}: counters {c:?} for {warpgroups} warpgroups, {slices} slices"
                ),
                rel_l2: f64::NAN,
                gpu_ms: ms,
                tolerance: 0.0,
            });
        }
        Ok(())
    }

    /// Halo launch `halo` of `shape` applying a GroupNorm (+SiLU) to the fp32 input at `x`
    /// (`len` values) as it loads it, against the same launch reading that GroupNorm's 16-bit
    /// output: the same bits (the same fma, SiLU and rounding). `ptrs` as for the plain
    /// launch; the output has `out_len` values.
    #[allow(clippy::too_many_arguments)]
    fn halo_norm_row(
        &mut self,
        shape: &ConvShape,
        halo: ConvLaunch,
        ptrs: ConvPtrs,
        x: DPtr,
        len: usize,
        out_div: f32,
        out_len: usize,
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let ConvKernel::Tensor(precision) = halo.kernel else {
            return Ok(());
        };
        let (c, groups) = (shape.sc, 32);
        let hw = shape.sh * shape.sw;
        let split = plan_norm(shape.n, hw, c, groups, gpu.sms(), 0);
        let nd = NormDims {
            n: shape.n,
            hw,
            c,
            groups,
            split,
        };
        let (gamma, beta) = (self.rand(c, 0.5, 1.5), self.rand(c, -0.5, 0.5));
        let (gamma, beta) = (self.up(&gamma)?, self.up(&beta)?);
        let y16 = self.zeros(len.div_ceil(2))?;
        let partial = self.zeros(split.partial_len(shape.n, c))?;
        let stats = self.zeros(2 * shape.n * groups)?;
        let affine = self.zeros(2 * shape.n * c)?;
        gpu.kernels.group_norm(
            st,
            nd,
            x,
            gamma.ptr,
            beta.ptr,
            y16.ptr,
            partial.ptr,
            stats.ptr,
            affine.ptr,
            1e-6,
            true,
            Some(precision),
        )?;
        let mut outs = Vec::new();
        let mut ms = 0.0;
        let fused = ConvLaunch {
            norm_input: NormInput::AffineSilu,
            ..halo
        };
        for (plan, p) in [
            (halo, ConvPtrs { x: y16.ptr, ..ptrs }),
            (
                fused,
                ConvPtrs {
                    x,
                    norm: affine.ptr,
                    ..ptrs
                },
            ),
        ] {
            let (out, t) = self.conv_output(shape, &plan, p, out_div, out_len)?;
            outs.push(out);
            ms = t;
        }
        self.row_within(
            format!(
                "{label} [{}, GroupNorm+SiLU in the loads] vs on its output",
                wgmma_path(&halo)
            ),
            desc.into(),
            &outs[1],
            &outs[0],
            ms,
            0.0,
        );
        Ok(())
    }

    /// Halo launch `halo` of `shape` writing the GroupNorm partial sums of its output
    /// (ConvPtrs::gn_partial): its output held to 0 against the launch without them, and the
    /// sums (f64, one chunk per tile) against the host's over that output. `ptrs` as for the
    /// plain launch; the output has `out_len` values.
    #[allow(clippy::too_many_arguments)]
    fn halo_stats_row(
        &mut self,
        shape: &ConvShape,
        halo: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        out_len: usize,
        label: &str,
        desc: &str,
    ) -> Result<()> {
        if !gn_partial_fits(shape, &halo) {
            return Ok(());
        }
        let st = &self.gpu.stream;
        let (rows, c) = (halo.tile.rows(), shape.ncols);
        let per = shape.mh * shape.mw;
        let chunks = per / rows;
        let partial = self.zeros(4 * shape.n * chunks * c)?;
        let mut outs = Vec::new();
        let mut ms = 0.0;
        for gn_partial in [0, partial.ptr] {
            let p = ConvPtrs { gn_partial, ..ptrs };
            let (out, t) = self.conv_output(shape, &halo, p, out_div, out_len)?;
            outs.push(out);
            ms = t;
        }
        let path = format!("{}, GroupNorm sums in the epilogue", wgmma_path(&halo));
        self.row_within(
            format!("{label} [{path}] output vs without"),
            desc.into(),
            &outs[1],
            &outs[0],
            ms,
            0.0,
        );
        // The device's f64 pairs, and the host's sums over the same rows, both as f32.
        let words = partial.download(st)?;
        let got: Vec<f32> = words
            .chunks_exact(2)
            .map(|w| {
                f64::from_bits(u64::from(w[0].to_bits()) | u64::from(w[1].to_bits()) << 32) as f32
            })
            .collect();
        let y = &outs[1];
        let mut want = vec![0f32; got.len()];
        for img in 0..shape.n {
            for chunk in 0..chunks {
                for ch in 0..c {
                    let (mut s, mut q) = (0f64, 0f64);
                    for r in 0..rows {
                        let v = f64::from(y[(img * per + chunk * rows + r) * c + ch]);
                        s += v;
                        q += v * v;
                    }
                    let at = ((img * chunks + chunk) * c + ch) * 2;
                    want[at] = s as f32;
                    want[at + 1] = q as f32;
                }
            }
        }
        self.row_within(
            format!("{label} [{path}] sums vs the host's"),
            desc.into(),
            &got,
            &want,
            ms,
            1e-6,
        );
        Ok(())
    }

    /// wgmma launches `wp` of `shape` split 2, 3 and 8 ways (as far as K allows), each reduced
    /// through the workspace and within a thread-block cluster: held to 0 against each other
    /// (the same sums in the same order); the same for the halo tile where it takes `shape`
    /// (split by channel slices). `ptrs` hold the 16-bit input and K-major weights; the output
    /// has `len` values.
    #[allow(clippy::too_many_arguments)]
    fn cluster_rows(
        &mut self,
        shape: &ConvShape,
        wp: ConvLaunch,
        ptrs: ConvPtrs,
        out_div: f32,
        len: usize,
        label: &str,
        desc: &str,
    ) -> Result<()> {
        let k = shape.k();
        let slices = k.div_ceil(WGMMA_SLICE);
        let mut tried = Vec::new();
        for want in [2, 3, 8] {
            let per = slices.div_ceil(want) * WGMMA_SLICE;
            let plain = ConvLaunch {
                splits: k.div_ceil(per),
                k_per_split: per,
                cluster: false,
                ..wp
            };
            for tile in [WgmmaTile::Plain, WgmmaTile::Halo] {
                let Some(via_workspace) = on_tile(plain, shape, tile) else {
                    continue;
                };
                let splits = via_workspace.splits;
                if splits < 2 || tried.contains(&(tile, splits)) {
                    continue;
                }
                tried.push((tile, splits));
                let in_cluster = ConvLaunch {
                    cluster: true,
                    ..via_workspace
                };
                let op = format!(
                    "{label} [{}] cluster vs workspace",
                    wgmma_path(&via_workspace)
                );
                let run = |t: &Self| -> Result<(Vec<Vec<f32>>, f64)> {
                    let ws = t.zeros(via_workspace.workspace_len(shape))?;
                    let p = ConvPtrs { ws: ws.ptr, ..ptrs };
                    let (by_workspace, _) =
                        t.conv_output(shape, &via_workspace, p, out_div, len)?;
                    let (by_cluster, ms) = t.conv_output(shape, &in_cluster, p, out_div, len)?;
                    Ok((vec![by_workspace, by_cluster], ms))
                };
                // A cluster launch the device refuses is this row's failure, not the group's
                // end.
                match run(self) {
                    Ok((outs, ms)) => self.row_within(op, desc.into(), &outs[1], &outs[0], ms, 0.0),
                    Err(e) => self.rows.push(SelftestRow {
                        op,
                        shape: format!("{desc}: {e}"),
                        rel_l2: f64::NAN,
                        gpu_ms: f64::NAN,
                        tolerance: 0.0,
                    }),
                }
            }
        }
        Ok(())
    }

    /// Where the device has Hopper's wgmma kernel and `shape` suits it at `precision`: its
    /// launch, and a 16-bit copy of the `len` fp32 values at `x` for it to read.
    fn wgmma_variant(
        &self,
        shape: &ConvShape,
        precision: Precision,
        x: DPtr,
        len: usize,
    ) -> Result<Option<(ConvLaunch, DevBuf)>> {
        let plan = plan_wgmma(shape, self.gpu.sms(), precision);
        let Some(plan) = plan.filter(|_| self.gpu.kernels.has_wgmma()) else {
            return Ok(None);
        };
        let copy = self.zeros(len.div_ceil(2))?;
        self.gpu
            .kernels
            .convert_half(&self.gpu.stream, x, copy.ptr, len, precision)?;
        Ok(Some((plan, copy)))
    }

    /// For a two-stage tensor-core launch `plan` reading `len` fp32 values at `x`: the deep
    /// launch of the same problem on the same input (None: read `x`), and in bf16/fp16 the one
    /// reading a 16-bit copy of it, made here; each with either epilogue. Nothing for other
    /// kernels.
    fn deep_variants(
        &self,
        plan: ConvLaunch,
        x: DPtr,
        len: usize,
    ) -> Result<Vec<(ConvLaunch, Option<DevBuf>)>> {
        let ConvKernel::Tensor(precision) = plan.kernel else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        // Each pipeline with both epilogues (the row epilogue computes the same, in the same
        // order), and with the weight prefetch (a hint: the same bits).
        for (row_epilogue, prefetch_weights) in [(false, false), (true, false), (false, true)] {
            let deep = ConvLaunch {
                deep: true,
                row_epilogue,
                prefetch_weights,
                ..plan
            };
            out.push((deep, None));
            if precision != Precision::Tf32 {
                let copy = self.zeros(len.div_ceil(2))?;
                self.gpu
                    .kernels
                    .convert_half(&self.gpu.stream, x, copy.ptr, len, precision)?;
                let half_input = ConvLaunch {
                    half_input: true,
                    ..deep
                };
                out.push((half_input, Some(copy)));
            }
        }
        Ok(out)
    }

    fn linears(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        // Few rows (the time-embedding MLP): the warp-per-output kernel.
        for (rows, inp, out, silu_in, with_res, out_div) in [
            (3, 40, 24, true, true, 1.5f32),
            (1, 128, 512, false, false, 1.0),
        ] {
            let x = self.rand(rows * inp, -2.0, 2.0);
            let bound = 1.0 / (inp as f32).sqrt();
            let wt = self.rand(out * inp, -bound, bound);
            let b = self.rand(out, -1.0, 1.0);
            let res = if with_res {
                Some(self.rand(rows * out, -1.0, 1.0))
            } else {
                None
            };
            let p = LinearParams::new(wt.clone(), b.clone(), out, inp);
            let mut want = vec![0.0; rows * out];
            linear::forward(&p, &x, silu_in, res.as_deref(), out_div, &mut want, 1);
            let (xd, wd, bd) = (self.up(&x)?, self.up(&wt)?, self.up(&b)?);
            let rd = res.as_deref().map(|r| self.up(r)).transpose()?;
            let yd = self.zeros(want.len())?;
            let res_ptr = rd.as_ref().map_or(0, |d| d.ptr);
            let ms = self.timed(
                || Ok(()),
                || {
                    gpu.kernels.linear_rows(
                        st, xd.ptr, wd.ptr, bd.ptr, res_ptr, yd.ptr, rows, inp, out, silu_in,
                        out_div,
                    )
                },
            )?;
            let got = yd.download(st)?;
            let op = format!(
                "linear rows{}{}",
                if silu_in { " silu-in" } else { "" },
                if with_res { " +res /div" } else { "" }
            );
            self.row(op, format!("{rows} x {inp}->{out}"), &got, &want, ms);
        }
        // Several few-row layers on the same input in one launch (every resnet's projection of
        // the time embedding): bit for bit what linear_rows computes for each, and the CPU's.
        for (rows, inp) in [(1, 512), (3, 72)] {
            let outs = [128, 256, 512, 24];
            let x = self.rand(rows * inp, -2.0, 2.0);
            let bound = 1.0 / (inp as f32).sqrt();
            let total: usize = outs.iter().sum();
            let xd = self.up(&x)?;
            let (single, batched) = (self.zeros(rows * total)?, self.zeros(rows * total)?);
            let (mut layers, mut devs, mut want) = (Vec::new(), Vec::new(), Vec::new());
            let mut at_out = 0;
            for &out in &outs {
                let wt = self.rand(out * inp, -bound, bound);
                let b = self.rand(out, -1.0, 1.0);
                let p = LinearParams::new(wt.clone(), b.clone(), out, inp);
                let mut y = vec![0.0; rows * out];
                linear::forward(&p, &x, true, None, 1.0, &mut y, 1);
                want.extend(y);
                let (wd, bd) = (self.up(&wt)?, self.up(&b)?);
                layers.push((wd.ptr, bd.ptr, at(batched.ptr, at_out), out));
                gpu.kernels.linear_rows(
                    st,
                    xd.ptr,
                    wd.ptr,
                    bd.ptr,
                    0,
                    at(single.ptr, at_out),
                    rows,
                    inp,
                    out,
                    true,
                    1.0,
                )?;
                devs.push((wd, bd));
                at_out += rows * out;
            }
            let table = self.up(&linear_batch_table(&layers)?)?;
            let ms = self.timed(
                || Ok(()),
                || {
                    gpu.kernels.linear_batch(
                        st,
                        xd.ptr,
                        table.ptr,
                        outs.len(),
                        total,
                        rows,
                        inp,
                        true,
                        1.0,
                    )
                },
            )?;
            let got = batched.download(st)?;
            let shape = format!("{rows} x {inp}->{outs:?}");
            self.row_within(
                "linear batch silu-in, bits of linear_rows".into(),
                shape.clone(),
                &got,
                &single.download(st)?,
                ms,
                0.0,
            );
            self.row("linear batch silu-in".into(), shape, &got, &want, ms);
        }
        // Token-wise (q/k/v, attention output): the implicit GEMM with one tap.
        for (rows, inp, out, accumulate) in [(37, 48, 144, false), (256, 512, 1536, true)] {
            let x = self.rand(rows * inp, -1.0, 1.0);
            let bound = 1.0 / (inp as f32).sqrt();
            let wt = self.rand(out * inp, -bound, bound);
            let b = self.rand(out, -1.0, 1.0);
            let res = self.rand(rows * out, -1.0, 1.0);
            let p = LinearParams::new(wt.clone(), b.clone(), out, inp);
            let mut want = vec![0.0; rows * out];
            linear::forward(&p, &x, false, Some(&res), 1.25, &mut want, rows);
            let (xd, wtd, wd, bd, rd) = (
                self.up(&x)?,
                self.up(&transpose(&wt, out, inp))?,
                self.up(&wt)?,
                self.up(&b)?,
                self.up(&res)?,
            );
            let yd = self.zeros(want.len())?;
            let shape = ConvShape::linear(1, rows, inp, out);
            let plan = plan_conv(&shape, gpu.sms());
            let ws = self.zeros(plan.workspace_len(&shape))?;
            let ptrs = ConvPtrs {
                x: xd.ptr,
                w: wtd.ptr,
                y: yd.ptr,
                bias: bd.ptr,
                res: rd.ptr,
                ws: ws.ptr,
                temb: 0,
                norm: 0,
                gn_partial: 0,
            };
            let ms = self.timed(
                || Ok(()),
                || gpu.kernels.conv(st, &shape, &plan, ptrs, 1.25, false),
            )?;
            let got = yd.download(st)?;
            let desc = format!("{rows} x {inp}->{out}");
            self.row(
                format!(
                    "linear tokens +res /div [{}]",
                    path(plan.kernel, plan.splits)
                ),
                desc.clone(),
                &got,
                &want,
                ms,
            );

            let dy = self.rand(rows * out, -1.0, 1.0);
            let dx0 = if accumulate {
                self.rand(rows * inp, -1.0, 1.0)
            } else {
                vec![0.0; rows * inp]
            };
            let mut want_dx = dx0.clone();
            linear::backward_input(&p, &dy, &mut want_dx, accumulate, rows);
            let dyd = self.up(&dy)?;
            let mut dxd = self.up(&dx0)?;
            let dx_ptr = dxd.ptr;
            let shape = ConvShape::linear(1, rows, out, inp);
            let plan = plan_conv(&shape, gpu.sms());
            let ws = self.zeros(plan.workspace_len(&shape))?;
            let ptrs = ConvPtrs {
                x: dyd.ptr,
                w: wd.ptr,
                y: dx_ptr,
                ws: ws.ptr,
                ..ConvPtrs::default()
            };
            let ms = self.timed(
                || dxd.write(st, &dx0),
                || gpu.kernels.conv(st, &shape, &plan, ptrs, 1.0, accumulate),
            )?;
            let got = dxd.download(st)?;
            self.row(
                format!(
                    "linear tokens input-grad{} [{}]",
                    acc_name(accumulate),
                    path(plan.kernel, plan.splits)
                ),
                desc,
                &got,
                &want_dx,
                ms,
            );
        }
        Ok(())
    }

    fn group_norms(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        for (n, h, w, c, groups, silu, accumulate) in [
            (1, 7, 5, 64, 32, true, false),
            (3, 6, 6, 96, 32, false, true),
            (2, 64, 64, 128, 32, true, true),
            (1, 5, 3, 3, 1, false, false),
            (1, 32, 32, 256, 32, true, true),
            // Clusters of 4 (an odd group width, rows that do not fill the last block) and 8.
            (1, 100, 100, 96, 32, false, true),
            (1, 128, 128, 128, 32, true, false),
        ] {
            let hw = h * w;
            let d = norm::Dims { n, hw, c, groups };
            // An offset mean, so that E[x²] - E[x]² is tested away from zero mean.
            let x = self.rand(n * hw * c, -1.0, 3.0);
            let gamma = self.rand(c, 0.5, 1.5);
            let beta = self.rand(c, -0.5, 0.5);
            let eps = 1e-6;
            let mut want = vec![0.0; x.len()];
            let stats = norm::forward(&x, d, &gamma, &beta, eps, silu, &mut want);
            // Three launches; one pass where the groups are small enough, in one block a
            // group, then in a cluster of several (Hopper) where one block is not enough.
            let most = gpu.kernels.capabilities().one_pass_blocks();
            for split in norm_forms(n, hw, c, groups, gpu.sms(), most) {
                let nd = NormDims {
                    n,
                    hw,
                    c,
                    groups,
                    split,
                };
                let (xd, gd, bd) = (self.up(&x)?, self.up(&gamma)?, self.up(&beta)?);
                let yd = self.zeros(x.len())?;
                let partial = self.zeros(split.partial_len(n, c))?;
                let sd = self.zeros(2 * n * groups)?;
                let affine = self.zeros(2 * n * c)?;
                let forward = |y, half_out| {
                    gpu.kernels.group_norm(
                        st,
                        nd,
                        xd.ptr,
                        gd.ptr,
                        bd.ptr,
                        y,
                        partial.ptr,
                        sd.ptr,
                        affine.ptr,
                        eps,
                        silu,
                        half_out,
                    )
                };
                let ms = self.timed(|| Ok(()), || forward(yd.ptr, None))?;
                let got = yd.download(st)?;
                let desc = match split.one_pass {
                    Some(OnePass { threads, blocks }) => format!(
                        "n{n} {h}x{w} c{c} g{groups} (one pass, {blocks} x {threads} threads)"
                    ),
                    None => format!("n{n} {h}x{w} c{c} g{groups} ({} chunks)", split.chunks),
                };
                let s = if silu { "+silu" } else { "" };
                self.row(
                    format!("groupnorm{s} forward"),
                    desc.clone(),
                    &got,
                    &want,
                    ms,
                );
                // The 16-bit output that feeds tensor-core convolutions.
                if c % 4 == 0 {
                    self.half_output_rows(
                        &format!("groupnorm{s} forward"),
                        &desc,
                        &want,
                        |out, precision| forward(out, Some(precision)),
                    )?;
                }

                let dy = self.rand(x.len(), -1.0, 1.0);
                let dx0 = if accumulate {
                    self.rand(x.len(), -1.0, 1.0)
                } else {
                    vec![0.0; x.len()]
                };
                let mut want_dx = dx0.clone();
                norm::backward(
                    &x,
                    d,
                    &gamma,
                    &beta,
                    silu,
                    &stats,
                    &dy,
                    &mut want_dx,
                    accumulate,
                );
                let dyd = self.up(&dy)?;
                let mut dxd = self.up(&dx0)?;
                let dx_ptr = dxd.ptr;
                let means = self.zeros(2 * n * groups)?;
                let backward = |dx, accumulate, half_out| {
                    gpu.kernels.group_norm_backward(
                        st,
                        nd,
                        xd.ptr,
                        dyd.ptr,
                        gd.ptr,
                        bd.ptr,
                        sd.ptr,
                        partial.ptr,
                        means.ptr,
                        dx,
                        silu,
                        accumulate,
                        half_out,
                    )
                };
                let ms = self.timed(
                    || dxd.write(st, &dx0),
                    || backward(dx_ptr, accumulate, None),
                )?;
                let got = dxd.download(st)?;
                self.row(
                    format!("groupnorm{s} input-grad{}", acc_name(accumulate)),
                    desc.clone(),
                    &got,
                    &want_dx,
                    ms,
                );
                // The 16-bit input gradient (overwriting) that feeds a tensor-core input gradient.
                if c % 4 == 0 {
                    let mut want = vec![0.0; x.len()];
                    norm::backward(&x, d, &gamma, &beta, silu, &stats, &dy, &mut want, false);
                    self.half_output_rows(
                        &format!("groupnorm{s} input-grad"),
                        &desc,
                        &want,
                        |out, precision| backward(out, false, Some(precision)),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The attention products' kernel in both tile sizes: a strided batch (A read with its
    /// rows strided, B with its columns), scaled and accumulated, against the CPU, and the
    /// 32-wide tiles against the 64-wide ones, held to 0 (each output sums its products in
    /// the same order).
    fn batched_products(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let (m, n, k, outer, inner, alpha) = (100, 70, 130, 2, 3, 0.5f32);
        let batch = outer * inner;
        let a = self.rand(batch * m * k, -1.0, 1.0);
        let b = self.rand(batch * k * n, -1.0, 1.0);
        let c0 = self.rand(batch * m * n, -1.0, 1.0);
        // A(i, kk) of batch z at a[z m k + kk m + i] (column-major), B(kk, j) at b[z k n + kk n + j].
        let mut want = c0.clone();
        for z in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|kk| {
                            f64::from(a[z * m * k + kk * m + i])
                                * f64::from(b[z * k * n + kk * n + j])
                        })
                        .sum();
                    want[z * m * n + i * n + j] += (f64::from(alpha) * dot) as f32;
                }
            }
        }
        let (ad, bd) = (self.up(&a)?, self.up(&b)?);
        let mut cd = self.up(&c0)?;
        let g = Gemm {
            a: ad.ptr,
            b: bd.ptr,
            c: cd.ptr,
            m,
            n,
            k,
            a_rs: 1,
            a_cs: m,
            b_rs: n,
            b_cs: 1,
            c_rs: n,
            outer,
            inner,
            a_bo: inner * m * k,
            a_bi: m * k,
            b_bo: inner * k * n,
            b_bi: k * n,
            c_bo: inner * m * n,
            c_bi: m * n,
            alpha,
            accumulate: true,
            tf32: false,
        };
        let desc = format!("{batch} x {m}x{k} . {k}x{n}, accumulating");
        let mut got = Vec::new();
        for tile in [64, 32] {
            let ms = self.timed(
                || cd.write(st, &c0),
                || gpu.kernels.gemm_tiled(st, &g, tile),
            )?;
            got.push(cd.download(st)?);
            self.row(
                format!("batched product, {tile}-wide tiles"),
                desc.clone(),
                &got[got.len() - 1],
                &want,
                ms,
            );
        }
        self.row_within(
            "batched product, 32- vs 64-wide tiles".into(),
            desc.clone(),
            &got[1],
            &got[0],
            0.0,
            0.0,
        );
        // On the tf32 tensor cores: operands rounded to tf32.
        let tf32 = Gemm { tf32: true, ..g };
        let ms = self.timed(|| cd.write(st, &c0), || gpu.kernels.gemm(st, &tf32))?;
        self.row_within(
            "batched product, tf32 tensor cores".into(),
            desc,
            &cd.download(st)?,
            &want,
            ms,
            tensor_core_tolerance(Precision::Tf32),
        );
        Ok(())
    }

    fn attentions(&mut self) -> Result<()> {
        self.batched_products()?;
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        // The last two: the fused kernels' shapes (heads of 64-column chunks), with a partial
        // row tile and two chunks of head width; the celebahq attention itself (1 x 512 at 256
        // tokens).
        for (n, tokens, heads, head_dim, accumulate) in [
            (1, 37, 1, 16, false),
            (3, 64, 4, 8, true),
            (2, 256, 1, 64, false),
            (2, 100, 2, 128, true),
            (1, 256, 1, 512, false),
        ] {
            let inner = heads * head_dim;
            let d = attention::Dims {
                n,
                tokens,
                heads,
                head_dim,
            };
            let qkv = self.rand(n * tokens * 3 * inner, -1.5, 1.5);
            let mut want = vec![0.0; n * tokens * inner];
            let probs =
                attention::forward(&qkv, d, &mut want, true).expect("asked for the probabilities");
            let dout = self.rand(want.len(), -1.0, 1.0);
            let g0 = if accumulate {
                self.rand(qkv.len(), -1.0, 1.0)
            } else {
                vec![0.0; qkv.len()]
            };
            let mut want_g = g0.clone();
            attention::backward(&qkv, &probs, d, &dout, &mut want_g, accumulate);
            let desc = format!("n{n} L{tokens} {heads}x{head_dim}");
            let qd = self.up(&qkv)?;
            let dd = self.up(&dout)?;
            // The products in fp32, then on the tf32 tensor cores (INVDIFF_ATTN_TF32), then
            // fused (INVDIFF_ATTN_FLASH, tf32, where the head width allows) against the same
            // fp32 CPU results: each product within tf32's rounding, the gradient's four
            // (through the softmax's subtraction) within a few times that.
            let tf32_limits = (tensor_core_tolerance(Precision::Tf32), ATTENTION_TF32_GRAD);
            let mut kernels = vec![
                (AttnKernel::Products, "", (TOLERANCE, TOLERANCE)),
                (AttnKernel::Tf32Products, ", tf32 products", tf32_limits),
            ];
            if flash_fits(head_dim) && gpu.kernels.capabilities().flash {
                kernels.push((AttnKernel::Flash, ", fused", tf32_limits));
            }
            for (kernel, mode, limits) in kernels {
                let a = Attn {
                    n,
                    tokens,
                    heads,
                    head_dim,
                    kernel,
                };
                let pd = self.zeros(n * heads * kernel.saved_len(tokens))?;
                let od = self.zeros(want.len())?;
                let ms = self.timed(
                    || Ok(()),
                    || attention_forward(&gpu.kernels, st, a, qd.ptr, pd.ptr, od.ptr),
                )?;
                self.row_within(
                    format!("attention forward{mode}"),
                    desc.clone(),
                    &od.download(st)?,
                    &want,
                    ms,
                    limits.0,
                );
                let mut gd = self.up(&g0)?;
                let g_ptr = gd.ptr;
                let scratch = self.zeros(n * heads * kernel.saved_len(tokens))?;
                let ms = self.timed(
                    || gd.write(st, &g0),
                    || {
                        attention_backward(
                            &gpu.kernels,
                            st,
                            a,
                            qd.ptr,
                            pd.ptr,
                            od.ptr,
                            dd.ptr,
                            g_ptr,
                            scratch.ptr,
                            accumulate,
                        )
                    },
                )?;
                self.row_within(
                    format!("attention input-grad{}{mode}", acc_name(accumulate)),
                    desc.clone(),
                    &gd.download(st)?,
                    &want_g,
                    ms,
                    limits.1,
                );
            }
        }
        Ok(())
    }

    fn data_movement(&mut self) -> Result<()> {
        let (gpu, st) = (self.gpu, &self.gpu.stream);
        let k = &gpu.kernels;
        let (n, h, w, c) = (2, 5, 3, 6);
        let x = self.rand(n * h * w * c, -1.0, 1.0);
        let mut want = vec![0.0; 4 * x.len()];
        resample::upsample2x(&x, h, w, c, &mut want);
        let (xd, yd) = (self.up(&x)?, self.zeros(want.len())?);
        let ms = self.timed(
            || Ok(()),
            || k.upsample(st, xd.ptr, yd.ptr, n, h, w, c, None),
        )?;
        let got = yd.download(st)?;
        let desc = format!("n{n} {h}x{w} c{c}");
        self.row("upsample2x forward".into(), desc.clone(), &got, &want, ms);
        // Into 16 bits (for a tensor-core convolution): each value rounded once, as the
        // host rounds it.
        {
            let c = 16;
            let x = self.rand(n * h * w * c, -1.0, 1.0);
            let mut up = vec![0.0; 4 * x.len()];
            resample::upsample2x(&x, h, w, c, &mut up);
            let xd = self.up(&x)?;
            for precision in [Precision::Bf16, Precision::Fp16] {
                let want: Vec<f32> = up.iter().map(|&v| round_half(v, precision)).collect();
                let yd = self.zeros(up.len().div_ceil(2))?;
                let ms = self.timed(
                    || Ok(()),
                    || k.upsample(st, xd.ptr, yd.ptr, n, h, w, c, Some(precision)),
                )?;
                let got = unpack_half(&yd.download(st)?, up.len(), precision);
                self.row(
                    format!("upsample2x forward, {precision} output"),
                    format!("n{n} {h}x{w} c{c}"),
                    &got,
                    &want,
                    ms,
                );
            }
        }
        for accumulate in [false, true] {
            let dy = self.rand(4 * x.len(), -1.0, 1.0);
            let dx0 = if accumulate {
                self.rand(x.len(), -1.0, 1.0)
            } else {
                vec![0.0; x.len()]
            };
            let mut want = dx0.clone();
            resample::upsample2x_backward(&dy, n, h, w, c, &mut want, accumulate);
            let dyd = self.up(&dy)?;
            let mut dxd = self.up(&dx0)?;
            let p = dxd.ptr;
            let ms = self.timed(
                || dxd.write(st, &dx0),
                || k.upsample_backward(st, dyd.ptr, p, n, h, w, c, accumulate),
            )?;
            let got = dxd.download(st)?;
            self.row(
                format!("upsample2x adjoint{}", acc_name(accumulate)),
                desc.clone(),
                &got,
                &want,
                ms,
            );
        }

        // Channel counts that are, and are not, multiples of four: the kernels' float4 and
        // scalar paths.
        for (pixels, ca, cb) in [(37, 5, 11), (37, 8, 12)] {
            let a = self.rand(pixels * ca, -1.0, 1.0);
            let b = self.rand(pixels * cb, -1.0, 1.0);
            let mut want = vec![0.0; pixels * (ca + cb)];
            resample::concat(&a, ca, &b, cb, &mut want);
            let (ad, bd, mut yd) = (self.up(&a)?, self.up(&b)?, self.zeros(want.len())?);
            let ms = self.timed(
                || Ok(()),
                || k.concat(st, ad.ptr, bd.ptr, yd.ptr, None, pixels, ca, cb),
            )?;
            let got = yd.download(st)?;
            let desc = format!("{pixels} px, {ca}+{cb}");
            self.row("concat forward".into(), desc.clone(), &got, &want, ms);
            // With the 16-bit copy for tensor-core readers: the copy, then y again.
            yd.write(st, &vec![0.0; want.len()])?;
            self.half_output_rows(
                "concat forward, 16-bit copy",
                &desc,
                &want,
                |out, precision| {
                    k.concat(
                        st,
                        ad.ptr,
                        bd.ptr,
                        yd.ptr,
                        Some((out, precision)),
                        pixels,
                        ca,
                        cb,
                    )
                },
            )?;
            let got = yd.download(st)?;
            self.row(
                "concat forward beside its 16-bit copy".into(),
                desc.clone(),
                &got,
                &want,
                ms,
            );
            let dy = self.rand(want.len(), -1.0, 1.0);
            for (offset, width, accumulate) in [(0, ca, true), (ca, cb, false)] {
                let d0 = if accumulate {
                    self.rand(pixels * width, -1.0, 1.0)
                } else {
                    vec![0.0; pixels * width]
                };
                let mut want = d0.clone();
                resample::concat_backward(&dy, ca + cb, offset, width, &mut want, accumulate);
                let dyd = self.up(&dy)?;
                let mut dd = self.up(&d0)?;
                let p = dd.ptr;
                let ms = self.timed(
                    || dd.write(st, &d0),
                    || {
                        k.concat_backward(
                            st,
                            dyd.ptr,
                            p,
                            pixels,
                            ca + cb,
                            offset,
                            width,
                            accumulate,
                        )
                    },
                )?;
                let got = dd.download(st)?;
                self.row(
                    format!(
                        "concat adjoint ch {offset}..{}{}",
                        offset + width,
                        acc_name(accumulate)
                    ),
                    desc.clone(),
                    &got,
                    &want,
                    ms,
                );
            }
        }

        let (n, c, h, w) = (3, 4, 5, 7);
        let x = self.rand(n * c * h * w, -1.0, 1.0);
        let want: Vec<f32> = resample::nchw_to_nhwc(&x, c, h, w)
            .iter()
            .map(|v| 2.0 * v - 1.0)
            .collect();
        let (xd, yd) = (self.up(&x)?, self.zeros(x.len())?);
        let ms = self.timed(
            || Ok(()),
            || k.to_nhwc(st, xd.ptr, yd.ptr, n, c, h, w, 2.0, -1.0),
        )?;
        let got = yd.download(st)?;
        self.row(
            "nchw->nhwc (2x - 1)".into(),
            format!("n{n} c{c} {h}x{w}"),
            &got,
            &want,
            ms,
        );
        let want: Vec<f32> = resample::nhwc_to_nchw(&x, n, c, h, w)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let ms = self.timed(|| Ok(()), || k.to_nchw(st, xd.ptr, yd.ptr, n, c, h, w, 2.0))?;
        let got = yd.download(st)?;
        self.row(
            "nhwc->nchw (x2)".into(),
            format!("n{n} c{c} {h}x{w}"),
            &got,
            &want,
            ms,
        );

        for (dim, flip, shift) in [(128, false, 1.0f32), (33, true, 0.0)] {
            let t = vec![0.0, 1.0, 999.0, 500.5];
            let want = resample::timestep_embedding(&t, dim, flip, shift);
            let (td, yd) = (self.up(&t)?, self.up(&vec![f32::NAN; want.len()])?);
            let ms = self.timed(
                || Ok(()),
                || k.timestep_embedding(st, td.ptr, yd.ptr, t.len(), dim, flip, shift),
            )?;
            let got = yd.download(st)?;
            self.row(
                "timestep embedding".into(),
                format!("{} x {dim}, flip {flip}, shift {shift}", t.len()),
                &got,
                &want,
                ms,
            );
        }

        // A length that is, and one that is not, a multiple of four: the float4 and scalar paths.
        for len in [1001, 1024] {
            let a = self.rand(len, -1.0, 1.0);
            let b = self.rand(len, -1.0, 1.0);
            for accumulate in [false, true] {
                let want: Vec<f32> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| if accumulate { x + y } else { *y })
                    .collect();
                let mut ad = self.up(&a)?;
                let bd = self.up(&b)?;
                let p = ad.ptr;
                let ms = self.timed(
                    || ad.write(st, &a),
                    || k.add_into(st, p, bd.ptr, len, accumulate),
                )?;
                let got = ad.download(st)?;
                self.row(
                    format!("add into{}", acc_name(accumulate)),
                    format!("{len}"),
                    &got,
                    &want,
                    ms,
                );
            }
        }
        let len = 1001;
        let a = self.rand(len, -1.0, 1.0);
        let want: Vec<f32> = a.iter().map(|x| x / 1.7).collect();
        let mut ad = self.up(&a)?;
        let p = ad.ptr;
        let ms = self.timed(|| ad.write(st, &a), || k.divide(st, p, len, 1.7))?;
        let got = ad.download(st)?;
        self.row("divide".into(), format!("{len}"), &got, &want, ms);
        Ok(())
    }

    fn unets(&mut self, ordinal: usize) -> Result<()> {
        for (model, n, h, w, t) in [
            (tiny_model(false), 2, 24, 40, vec![10.0, 900.0]),
            (tiny_model(true), 3, 20, 12, vec![0.0, 500.0, 999.0]),
        ] {
            let cfg = model.config().clone();
            let name = if cfg.center_input_sample {
                "unet B"
            } else {
                "unet A"
            };
            let desc = format!("n{n} {h}x{w} {:?}", cfg.block_out_channels);
            let sample = Tensor::new(
                vec![n, cfg.in_channels, h, w],
                self.rand(n * cfg.in_channels * h * w, -1.0, 1.0),
            )?;
            let cot = Tensor::new(
                vec![n, cfg.out_channels, h, w],
                self.rand(n * cfg.out_channels * h * w, -1.0, 1.0),
            )?;
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
}

impl Tester<'_> {
    /// The small networks and the celebahq architecture (random weights; 64x64 at batch 2,
    /// where every level down to 2x2 and both attention blocks run, and the full 256x256 at
    /// batch 1) at each tensor-core precision, eps and input gradient against the fp32 CPU
    /// results.
    fn tensor_core_unets(&mut self, ordinal: usize) -> Result<()> {
        for (name, model, n, h, w, t) in [
            ("unet A", tiny_model(false), 2, 24, 40, vec![10.0, 900.0]),
            (
                "unet B",
                tiny_model(true),
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
            // Full size at batch 1: the 256x256 level's launches are unsplit, which the halo
            // tiles' GroupNorm sums need (INVDIFF_HALO_STATS in device_check's last variant).
            (
                "celebahq",
                Model::builtin_celebahq(11),
                1,
                256,
                256,
                vec![500.0],
            ),
        ] {
            let cfg = model.config().clone();
            let desc = format!("n{n} {h}x{w} {:?}", cfg.block_out_channels);
            let sample = Tensor::new(
                vec![n, cfg.in_channels, h, w],
                self.rand(n * cfg.in_channels * h * w, -1.0, 1.0),
            )?;
            let cot = Tensor::new(
                vec![n, cfg.out_channels, h, w],
                self.rand(n * cfg.out_channels * h * w, -1.0, 1.0),
            )?;
            let cpu = CpuUnet::new(&model);
            let (want, tape) = cpu.forward_recording(&sample, &t)?;
            let want_grad = cpu.vjp(tape, &cot)?;
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
                // Whatever INVDIFF_TC_PIPELINE, INVDIFF_WGMMA, INVDIFF_HALF_COPY and
                // INVDIFF_ALIAS_GRADS say: the rows below compare each choice.
                gpu.set_deep_pipelines(true);
                gpu.set_wgmma(false);
                gpu.set_moved_values(false);
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
                if n > 1 {
                    self.batch_invariance_rows(&mut gpu, &io, &label)?;
                }
            }
        }
        Ok(())
    }

    /// Planned per image (`set_batch_invariant`), image 0's noise prediction and input
    /// gradient in `io`'s batch equal, bit for bit, its own alone.
    fn batch_invariance_rows(
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
}

/// One network check's input: its description, sample, timesteps and cotangent.
struct NetworkIo<'a> {
    desc: &'a str,
    sample: &'a Tensor,
    t: &'a [f32],
    cot: &'a Tensor,
}

impl Tester<'_> {
    /// `gpu`'s forward and forward + VJP on `io` as it is configured, each timed and checked
    /// against `want` within `limits` (rows named by `names`); the results, for the next
    /// configuration's comparison.
    fn network_rows(
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

/// `v` rounded to the nearest `precision` (bf16 or fp16) value, as f32.
fn round_half(v: f32, precision: Precision) -> f32 {
    match precision {
        Precision::Fp16 => half::f16::from_f32(v).to_f32(),
        _ => half::bf16::from_f32(v).to_f32(),
    }
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

/// Small networks that still take every path: attention (one head, then several), both
/// paddings, a centred input, a mid-block scale factor, 4 input channels.
pub(super) fn tiny_model(variant_b: bool) -> Model {
    use BlockKind::*;
    let mut c = UNetConfig::celebahq_256();
    if variant_b {
        c.in_channels = 4;
        c.block_out_channels = vec![16, 32, 48];
        c.down_blocks = vec![Plain, Attention, Attention];
        c.up_blocks = vec![Attention, Attention, Plain];
        c.layers_per_block = 2;
        c.norm_num_groups = 8;
        c.attention_head_dim = Some(8);
        c.downsample_padding = 1;
        c.time_embedding_dim = 64;
        c.flip_sin_to_cos = true;
        c.freq_shift = 0.0;
        c.center_input_sample = true;
        c.mid_block_scale_factor = 1.5;
    } else {
        c.block_out_channels = vec![32, 64, 64];
        c.down_blocks = vec![Plain, Attention, Plain];
        c.up_blocks = vec![Plain, Attention, Plain];
        c.layers_per_block = 1;
        c.norm_num_groups = 8;
        c.time_embedding_dim = 128;
    }
    let graph = Graph::build(&c).expect("the selftest configurations are valid");
    let weights = Weights::random(&graph, if variant_b { 7 } else { 3 });
    Model {
        graph,
        weights,
        source: "selftest".into(),
        scheduler_config: None,
    }
}

/// Relative L2 allowed between the wgmma and mma.sync kernels: the same bf16/fp16 products in
/// fp32, added in a different order.
const WGMMA_VS_MMA: f64 = 1e-5;

/// Every other form of wgmma launch `p` of `shape` ([`on_tile`]), each tile with each
/// epilogue and with the weight prefetch, and how far it may be from `p`'s result: 0 (the same
/// sums in the same order), or [`WGMMA_VS_MMA`] for the halo tiles (channel slices outer),
/// where they take the launch.
fn wgmma_forms(p: ConvLaunch, shape: &ConvShape) -> Vec<(ConvLaunch, f64)> {
    let mut out = Vec::new();
    for (tile, _) in WgmmaTile::ALL {
        let Some(v) = on_tile(p, shape, tile) else {
            continue;
        };
        let tolerance = if tile.is_halo() { WGMMA_VS_MMA } else { 0.0 };
        for (row_epilogue, prefetch_weights) in [(false, false), (true, false), (false, true)] {
            let v = ConvLaunch {
                row_epilogue,
                prefetch_weights,
                ..v
            };
            if v != p {
                out.push((v, tolerance));
            }
        }
    }
    out
}

fn wgmma_path(p: &ConvLaunch) -> String {
    let mut s = String::from(p.tile.describe());
    if p.splits > 1 {
        s += &format!(", {} splits", p.splits);
    }
    if p.row_epilogue {
        s += ", row epilogue";
    }
    if p.prefetch_weights {
        s += ", weight prefetch";
    }
    s
}

/// The deep pipeline a launch takes and its input, for row names.
fn deep_path(p: &ConvLaunch) -> String {
    let pipe = match (p.kernel, p.half_input) {
        (ConvKernel::Tensor(Precision::Tf32), _) => "async",
        (_, true) => "async, 16-bit input",
        _ => "staged",
    };
    let rows = if p.row_epilogue { ", row epilogue" } else { "" };
    let prefetch = if p.prefetch_weights {
        ", weight prefetch"
    } else {
        ""
    };
    format!("{}, {pipe}{rows}{prefetch}", path(p.kernel, p.splits))
}

fn path(k: ConvKernel, splits: usize) -> String {
    let name = match k {
        ConvKernel::Vec => "vec",
        ConvKernel::Any => "any",
        ConvKernel::Narrow => "narrow",
        ConvKernel::FewIn => "few-in",
        ConvKernel::Tensor(_) => "tc",
    };
    if splits > 1 {
        format!("{name}, {splits} splits")
    } else {
        name.to_string()
    }
}

fn pad_name(k: usize, stride: usize, pad: Pad) -> &'static str {
    match (k, stride, pad) {
        (3, 2, Pad::Symmetric) => " pad 1",
        (3, 2, Pad::RightBottom) => " pad right/bottom",
        _ => "",
    }
}

fn acc_name(accumulate: bool) -> &'static str {
    if accumulate {
        " (accumulate)"
    } else {
        ""
    }
}
