//! Independent steps of a pass on concurrent streams, inside the captured graph.
//!
//! At batch 1 most launches fill only part of the device, and a UNet pass has side branches
//! that need not wait for the main chain: a residual block's 1x1 shortcut, the time embedding
//! beside the first convolutions, the skip half of a concatenation's gradient. Two steps
//! conflict when one writes memory the other reads or writes (their arena ranges overlap:
//! the placement reuses memory, so distinct buffers can conflict too); every other order is
//! free. [`schedule`] puts each step on one of a few streams and says which earlier steps it
//! must wait for across streams; captured, those waits become the graph's edges. Steps keep
//! their program order within a stream.
//!
//! Two streams by default: on an H200 (2026-11-26, bf16) they took 2.3% off a batch-1 forward
//! and 3.2% off a DPS step, and changed nothing at batch 8 and 32, where launches fill the
//! device. `INVDIFF_STREAMS` sets 1 to 4.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::device::cu;
use super::kernels::{Capabilities, ConvShape};
use super::plan::plan;
use super::precision::Precision;
use super::program::{Buf, ConvStep, KernelConfig, Step};
use crate::model::Graph;
use crate::Result;

/// How many streams a pass uses: `INVDIFF_STREAMS` (1 to 4), else [`DEFAULT_STREAMS`] (also
/// for any other value, which `invdiff doctor` points out).
pub(crate) fn streams_wanted() -> usize {
    crate::switches::value("INVDIFF_STREAMS")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=MAX_STREAMS).contains(n))
        .unwrap_or(DEFAULT_STREAMS)
}

/// Streams a pass uses unless `INVDIFF_STREAMS` says otherwise.
pub(crate) const DEFAULT_STREAMS: usize = 2;

/// The most streams a pass is spread over.
pub(crate) const MAX_STREAMS: usize = 4;

/// Steps a buffer stays placed past its last use when passes run on several streams (see
/// `plan::plan`): on the celebahq-256 DPS step at batch 1, 2 lets the schedule find all the
/// concurrency that unshared memory would (critical path 12% shorter forward, 13% backward,
/// by the per-step times of an H200 profile) for 6% more arena; with 0, memory reuse
/// between neighbours leaves 2-5%.
pub(crate) const KEEP_ALIVE: usize = 2;

/// Where one step runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Stream index; 0 is the stream the pass is launched on.
    pub stream: usize,
    /// Earlier steps (indices within the pass) on other streams to wait for before launching.
    pub waits: Vec<usize>,
    /// Whether a later step waits for this one (an event is recorded after it).
    pub record: bool,
}

/// The steps each of `steps` must follow: those before it whose memory conflicts with its
/// own (`range` maps a buffer to its arena range). With `classes`
/// ([`KernelConfig::class_concurrency`](super::program::KernelConfig::class_concurrency)),
/// two launches of one convolution's parity classes do not conflict over the arrays both
/// touch only at their own output pixels ([`other_class`]).
pub(crate) fn dependencies(
    steps: &[Step],
    range: impl Fn(Buf) -> Range<usize>,
    classes: bool,
) -> Vec<Vec<usize>> {
    // Per step: the buffers it reads, and those it writes, each with its arena range.
    type Ranges = Vec<(Buf, Range<usize>)>;
    let io: Vec<(Ranges, Ranges)> = steps
        .iter()
        .map(|s| {
            let (r, w) = s.io();
            let with = |b: Buf| (b, range(b));
            (
                r.into_iter().map(with).collect(),
                w.into_iter().map(with).collect(),
            )
        })
        .collect();
    // Whether accesses a (of step i) and b (of step j) may touch the same bytes: their ranges
    // overlap, and they are not the same array touched by two classes at their own pixels.
    let overlap = |a: &Ranges, b: &Ranges, apart: &[Buf]| {
        a.iter().any(|(ba, x)| {
            b.iter().any(|(bb, y)| {
                x.start < y.end && y.start < x.end && !(ba == bb && apart.contains(ba))
            })
        })
    };
    (0..steps.len())
        .map(|i| {
            let (ri, wi) = &io[i];
            (0..i)
                .filter(|&j| {
                    let (rj, wj) = &io[j];
                    let apart = match classes {
                        true => other_class(&steps[i], &steps[j]),
                        false => Vec::new(),
                    };
                    overlap(wi, rj, &apart) || overlap(wi, wj, &apart) || overlap(ri, wj, &apart)
                })
                .collect()
        })
        .collect()
}

/// The arrays that two launches of one convolution's parity classes share but touch only at
/// their own output pixels, or none where `a` and `b` are not such launches. A class launch
/// (an upsampling's folded convolution, a stride-2 convolution's input gradient) writes the
/// output pixels (my * s + oy, mx * s + ox), oy and ox below s, of a yh x yw grid: two
/// launches of one convolution (input, weights, grid, stride) with different offsets have no
/// output pixel in common. The arrays indexed by output pixel are its output (which it may
/// also read, accumulating), that output's 16-bit copy and concatenation side, and the
/// residual it adds; its input, read at the taps' offsets, and its workspace and GroupNorm
/// sums are not. An array is exempt only where it has the same role in both launches, with
/// the same per-pixel layout (columns, side offset and width), and no other role in either.
/// Every store of the epilogues stays inside one pixel's values (at most 16 bytes: four
/// fp32 or four 16-bit values); the rule also asks each pixel's values to fill whole 16-byte
/// units, so that even a 16-byte store at a 16-byte boundary could not reach another pixel.
fn other_class(a: &Step, b: &Step) -> Vec<Buf> {
    let (Step::Conv(a), Step::Conv(b)) = (a, b) else {
        return Vec::new();
    };
    let (sa, sb) = (&a.shape, &b.shape);
    let whole_units = |c: &ConvStep| {
        c.shape.ncols % 8 == 0
            && c.side16
                .is_none_or(|s| s.offset % 8 == 0 && s.width % 8 == 0)
    };
    let grid = |s: &ConvShape| (s.n, s.yh, s.yw, s.out_stride, s.ncols);
    let classes = sa.out_stride >= 2
        && grid(sa) == grid(sb)
        && sa.out_oy.max(sa.out_ox).max(sb.out_oy).max(sb.out_ox) < sa.out_stride
        && (sa.out_oy, sa.out_ox) != (sb.out_oy, sb.out_ox)
        && (a.x, a.w.pid, a.accumulate, a.side16) == (b.x, b.w.pid, b.accumulate, b.side16)
        && whole_units(a)
        && whole_units(b);
    if !classes {
        return Vec::new();
    }
    // Each array a launch touches at its pixels, by role: output, copy, side, residual; and
    // those it touches elsewhere.
    let roles = |c: &ConvStep| [Some(c.y), c.copy16, c.side16.map(|o| o.buf), c.residual];
    let elsewhere = |c: &ConvStep| {
        [
            Some(c.x),
            c.workspace,
            c.gn_partial,
            c.temb,
            c.shortcut.map(|f| f.x),
        ]
    };
    let (ra, rb) = (roles(a), roles(b));
    let (ea, eb) = (elsewhere(a), elsewhere(b));
    let once = |x: Buf, r: &[Option<Buf>; 4], e: &[Option<Buf>; 5]| {
        r.iter().filter(|b| **b == Some(x)).count() == 1 && !e.contains(&Some(x))
    };
    ra.iter()
        .zip(&rb)
        .filter_map(|(x, y)| x.filter(|x| Some(*x) == *y))
        .filter(|&x| once(x, &ra, &ea) && once(x, &rb, &eb))
        .collect()
}

/// Puts each step on one of `streams` streams: a step goes on the stream whose last step it
/// depends on (the latest such), so chains stay on one stream; a step that depends on no
/// stream's last step goes on the stream idle longest. It then waits for its latest
/// dependency on each other stream, unless that stream's wait already covers it.
pub(crate) fn schedule(deps: &[Vec<usize>], streams: usize) -> Vec<Slot> {
    let streams = streams.clamp(1, MAX_STREAMS);
    let mut slots: Vec<Slot> = vec![Slot::default(); deps.len()];
    let mut tail: Vec<Option<usize>> = vec![None; streams];
    // waited[s][t]: the latest step of stream t that stream s has waited for.
    let mut waited = vec![vec![None::<usize>; streams]; streams];
    for (i, d) in deps.iter().enumerate() {
        let s = (0..streams)
            .filter(|&s| tail[s].is_some_and(|t| d.contains(&t)))
            .max_by_key(|&s| tail[s])
            .unwrap_or_else(|| (0..streams).min_by_key(|&s| tail[s]).unwrap_or(0));
        for t in (0..streams).filter(|&t| t != s) {
            let latest = d.iter().copied().filter(|&j| slots[j].stream == t).max();
            if let Some(j) = latest {
                if waited[s][t].is_none_or(|w| w < j) {
                    slots[i].waits.push(j);
                    waited[s][t] = Some(j);
                    slots[j].record = true;
                }
            }
        }
        slots[i].stream = s;
        tail[s] = Some(i);
    }
    slots
}

/// When the last step of `slots` finishes if step i takes `ms[i]`, each starting once its
/// stream's previous step and its waits have finished (the makespan of the schedule).
pub(crate) fn makespan(slots: &[Slot], ms: &[f64]) -> f64 {
    let streams = slots.iter().map(|s| s.stream + 1).max().unwrap_or(1);
    let (mut free, mut fin) = (vec![0.0f64; streams], vec![0.0f64; slots.len()]);
    for (i, s) in slots.iter().enumerate() {
        let start = s
            .waits
            .iter()
            .map(|&j| fin[j])
            .fold(free[s.stream], f64::max);
        fin[i] = start + ms[i];
        free[s.stream] = fin[i];
    }
    free.into_iter().fold(0.0, f64::max)
}

/// One pass's time by [`model_streams`], in ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassModel {
    /// The steps of the defaults' program on their schedule: the baseline's graph time, to
    /// which the overhead is fitted (to 0.1%), or, where no overhead in 0 to 20 us reaches it,
    /// the nearest the model comes.
    pub defaults_ms: f64,
    /// The steps of the program the `INVDIFF_*` switches configure, on their schedule.
    pub configured_ms: f64,
    /// The configured program's steps one after another.
    pub one_stream_ms: f64,
    /// What the fit took off each step's time (a launch measured alone carries costs that
    /// a captured graph's launches overlap), in us.
    pub overhead_us: f64,
}

/// A model of the stream schedule, for judging a change to it without a GPU: each step of a
/// celebahq-style program (`graph` on `n` images of `h x w`, with the VJP where `record`, on
/// a Hopper card of `sms` multiprocessors at `precision`) takes its time in a baseline profile
/// (`step_ms` by kind, label and shape: a profile's step of that kind and label, kernel choices
/// included, else the mean of its steps of that kind and shape) less
/// a per-step overhead fitted so that the defaults' schedule takes the baseline's graph time
/// (`graph_ms`, per pass); steps on different streams do not slow each other, which makes
/// the gain of running more side by side an upper bound. The defaults' schedule is laid out on
/// the default two streams (the baseline's), the configured one on `INVDIFF_STREAMS`.
/// Returns the forward pass's model, then the backward's where recording, and how many steps
/// the baseline had no time for (counted as 0; the more of the two programs').
#[allow(clippy::too_many_arguments)]
pub fn model_streams(
    graph: &Graph,
    n: usize,
    h: usize,
    w: usize,
    record: bool,
    sms: usize,
    precision: Precision,
    step_ms: &dyn Fn(&str, &str, &str) -> Option<f64>,
    graph_ms: &[f64],
) -> Result<(Vec<PassModel>, usize)> {
    let choices = [
        KernelConfig::tuned(Capabilities::HOPPER, precision),
        KernelConfig::from_switches(Capabilities::HOPPER, precision),
    ];
    let shape = (n, h, w, record, sms, precision);
    let streams = [DEFAULT_STREAMS, streams_wanted()];
    model_choices(graph, shape, choices, streams, step_ms, graph_ms)
}

/// [`model_streams`] of the defaults' program and another (`choices`), each on its number of
/// `streams`.
fn model_choices(
    graph: &Graph,
    (n, h, w, record, sms, precision): (usize, usize, usize, bool, usize, Precision),
    choices: [KernelConfig; 2],
    streams: [usize; 2],
    step_ms: &dyn Fn(&str, &str, &str) -> Option<f64>,
    graph_ms: &[f64],
) -> Result<(Vec<PassModel>, usize)> {
    // Per pass of a program as `choice` configures it: its schedule and baseline step times;
    // and how many steps had no time.
    type Passes = (Vec<(Vec<Slot>, Vec<f64>)>, usize);
    let passes = |choice: KernelConfig, streams: usize| -> Result<Passes> {
        let (p, pl) = plan(graph, n, h, w, record, sms, precision, choice, KEEP_ALIVE)?;
        let range = |b: Buf| pl.offsets[b.0]..pl.offsets[b.0] + p.len(b);
        let (fwd, bwd) = p.steps.split_at(p.forward_steps);
        let (mut out, mut unmatched) = (Vec::new(), 0);
        for pass in [fwd, bwd].into_iter().filter(|s| !s.is_empty()) {
            let deps = dependencies(pass, range, choice.class_concurrency);
            let ms = pass
                .iter()
                .map(|s| {
                    let info = s.info(n, h, w);
                    step_ms(info.kind, &info.label(), &info.shape).unwrap_or_else(|| {
                        unmatched += 1;
                        0.0
                    })
                })
                .collect();
            out.push((schedule(&deps, streams), ms));
        }
        Ok((out, unmatched))
    };
    let (defaults, unmatched_defaults) = passes(choices[0], streams[0])?;
    let (configured, unmatched) = passes(choices[1], streams[1])?;
    let mut models = Vec::new();
    for ((d, c), &target) in defaults.iter().zip(&configured).zip(graph_ms) {
        // Each step's time less `o` ms, at least 0.5 us.
        let less = |ms: &[f64], o: f64| ms.iter().map(|t| (t - o).max(5e-4)).collect::<Vec<_>>();
        let at = |o: f64| makespan(&d.0, &less(&d.1, o));
        // The makespan falls as the overhead grows: bisect for the baseline's time.
        let (mut lo, mut hi) = (0.0, 0.02);
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if at(mid) > target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let o = 0.5 * (lo + hi);
        let steps = less(&c.1, o);
        models.push(PassModel {
            defaults_ms: at(o),
            configured_ms: makespan(&c.0, &steps),
            one_stream_ms: steps.iter().sum(),
            overhead_us: 1e3 * o,
        });
    }
    Ok((models, unmatched.max(unmatched_defaults)))
}

/// The streams beside the one a pass is launched on, and the events that fork them from it
/// and join them back at the end of every pass (a capture must end with every stream it
/// forked joined).
pub(crate) struct SideStreams {
    streams: Vec<Arc<CudaStream>>,
    fork: CudaEvent,
    joins: Vec<CudaEvent>,
}

impl SideStreams {
    /// `count` streams of `ctx` besides the main one.
    pub fn new(ctx: &Arc<CudaContext>, count: usize) -> Result<SideStreams> {
        let stream = || cu(ctx.new_stream(), "creating a side stream");
        let event = || cu(ctx.new_event(None), "creating an event");
        Ok(SideStreams {
            streams: (0..count).map(|_| stream()).collect::<Result<_>>()?,
            fork: event()?,
            joins: (0..count).map(|_| event()).collect::<Result<_>>()?,
        })
    }

    /// Streams in all, the main one included.
    pub fn total(&self) -> usize {
        self.streams.len() + 1
    }
}

/// One pass's [`schedule`] and the events its waits need.
pub(crate) struct PassSchedule {
    slots: Vec<Slot>,
    events: Vec<Option<CudaEvent>>,
}

impl PassSchedule {
    /// The schedule of `steps` over `streams` streams (with `classes`, class launches apart:
    /// [`dependencies`]), with an event for each step another stream waits for.
    pub fn new(
        ctx: &Arc<CudaContext>,
        steps: &[Step],
        range: impl Fn(Buf) -> Range<usize>,
        streams: usize,
        classes: bool,
    ) -> Result<PassSchedule> {
        let slots = schedule(&dependencies(steps, range, classes), streams);
        let events = slots
            .iter()
            .map(|s| {
                s.record
                    .then(|| cu(ctx.new_event(None), "creating an event"))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(PassSchedule { slots, events })
    }

    /// Launches every step (`launch(index, stream)`) on its stream after its waits, forking
    /// the side streams from `main` first and joining them into it at the end.
    pub fn run(
        &self,
        main: &CudaStream,
        side: &SideStreams,
        mut launch: impl FnMut(usize, &CudaStream) -> Result<()>,
    ) -> Result<()> {
        let wait = |st: &CudaStream, e: &CudaEvent| cu(st.wait(e), "waiting on another stream");
        cu(side.fork.record(main), "forking the side streams")?;
        let mut forked = [false; MAX_STREAMS];
        for (i, slot) in self.slots.iter().enumerate() {
            let st = match slot.stream {
                0 => main,
                s => {
                    let st = &side.streams[s - 1];
                    if !forked[s] {
                        wait(st, &side.fork)?;
                        forked[s] = true;
                    }
                    st
                }
            };
            for &j in &slot.waits {
                wait(
                    st,
                    self.events[j]
                        .as_ref()
                        .expect("schedule: waited-for step records"),
                )?;
            }
            launch(i, st)?;
            if let Some(e) = &self.events[i] {
                cu(e.record(st), "recording a step's event")?;
            }
        }
        for (s, st) in side.streams.iter().enumerate() {
            if forked[s + 1] {
                cu(side.joins[s].record(st), "joining a side stream")?;
                wait(main, &side.joins[s])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UNetConfig;
    use crate::cuda::plan::Placement;
    use crate::cuda::program::Program;

    /// For every step, the latest step of each stream known complete when it launches (a
    /// vector clock), following stream order and the waits.
    fn clocks(slots: &[Slot], streams: usize) -> Vec<Vec<Option<usize>>> {
        let mut at_stream = vec![vec![None::<usize>; streams]; streams];
        let mut after: Vec<Vec<Option<usize>>> = Vec::new();
        let mut before = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            let mut c = at_stream[slot.stream].clone();
            for &j in &slot.waits {
                assert!(
                    slots[j].record,
                    "step {i} waits for {j}, which records no event"
                );
                for (x, y) in c.iter_mut().zip(&after[j]) {
                    *x = (*x).max(*y);
                }
            }
            before.push(c.clone());
            c[slot.stream] = Some(i);
            at_stream[slot.stream] = c.clone();
            after.push(c);
        }
        before
    }

    fn check(deps: &[Vec<usize>], streams: usize) -> Vec<Slot> {
        let slots = schedule(deps, streams);
        let before = clocks(&slots, streams);
        for (i, d) in deps.iter().enumerate() {
            for &j in d {
                let known = before[i][slots[j].stream];
                assert!(
                    known.is_some_and(|k| k >= j),
                    "step {i} may start before step {j} it depends on ({slots:?})"
                );
            }
        }
        slots
    }

    #[test]
    fn independent_chains_run_side_by_side() {
        // 0 -> 1 -> 2 and 0 -> 3 -> 4, joined by 5.
        let deps = vec![vec![], vec![0], vec![1], vec![0], vec![3], vec![2, 4]];
        let slots = check(&deps, 2);
        assert_eq!(slots[1].stream, slots[2].stream);
        assert_eq!(slots[3].stream, slots[4].stream);
        assert_ne!(slots[2].stream, slots[4].stream);
        // One stream: program order, no waits.
        let one = check(&deps, 1);
        assert!(one.iter().all(|s| s.stream == 0 && s.waits.is_empty()));
    }

    /// The celebahq-style recording program of `g` on `n` images of `size x size` in bf16 on
    /// 132 multiprocessors, placed for side streams.
    fn bf16_plan(g: &Graph, n: usize, size: usize, kc: KernelConfig) -> (Program, Placement) {
        plan(g, n, size, size, true, 132, Precision::Bf16, kc, KEEP_ALIVE).unwrap()
    }

    /// The class launches that [`dependencies`] lets run side by side touch no element in
    /// common: in the celebahq-256 programs (forward and backward, batch 1 and 2, bf16 with
    /// the Hopper defaults, with the parity classes writing 16-bit copies too, and the plain
    /// program), each pair's output pixels (conv_common.cuh's index) are disjoint, neither's
    /// input, workspace, GroupNorm sums or time embedding is an array the pair shares at its
    /// pixels, and with two streams some pairs do run apart; with the classes' copies, some
    /// pairs share a copy at their pixels.
    #[test]
    fn class_launches_side_by_side_touch_disjoint_pixels() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let tuned = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
        let mut kinds = std::collections::HashSet::new();
        let class_copies = KernelConfig {
            class_half_copies: true,
            ..tuned
        };
        for (n, kc, size) in [
            (1, tuned, 256),
            (1, class_copies, 256),
            (2, tuned, 128),
            (1, KernelConfig::default(), 64),
        ] {
            let (p, pl) = bf16_plan(&g, n, size, kc);
            let mut copies_shared = 0;
            let pixels = |c: &ConvStep| -> std::collections::HashSet<usize> {
                let s = &c.shape;
                let mut set = std::collections::HashSet::new();
                for img in 0..s.n {
                    for my in 0..s.mh {
                        for mx in 0..s.mw {
                            let (y, x) =
                                (my * s.out_stride + s.out_oy, mx * s.out_stride + s.out_ox);
                            assert!(y < s.yh && x < s.yw, "a class pixel outside its grid");
                            set.insert((img * s.yh + y) * s.yw + x);
                        }
                    }
                }
                set
            };
            for pass in [&p.steps[..p.forward_steps], &p.steps[p.forward_steps..]] {
                let mut apart = Vec::new();
                for (i, a) in pass.iter().enumerate() {
                    for (j, b) in pass[..i].iter().enumerate() {
                        let shared = other_class(a, b);
                        let (Step::Conv(ca), Step::Conv(cb)) = (a, b) else {
                            assert!(shared.is_empty());
                            continue;
                        };
                        if shared.is_empty() {
                            continue;
                        }
                        assert!(
                            pixels(ca).is_disjoint(&pixels(cb)),
                            "{ca:?} and {cb:?} share pixels"
                        );
                        for c in [ca, cb] {
                            let elsewhere = [c.x]
                                .into_iter()
                                .chain(c.workspace)
                                .chain(c.gn_partial)
                                .chain(c.temb)
                                .chain(c.shortcut.map(|f| f.x));
                            for buf in elsewhere {
                                assert!(
                                    !shared.contains(&buf),
                                    "{buf:?} is read away from the pixels"
                                );
                            }
                        }
                        kinds.insert(a.info(p.n, p.h, p.w).kind);
                        copies_shared +=
                            usize::from(ca.copy16.is_some_and(|c| shared.contains(&c)));
                        apart.push((i, j));
                    }
                }
                let range = |b: Buf| {
                    let o = pl.offsets[b.0];
                    o..o + p.len(b)
                };
                // The pairs the two-stream schedule leaves unordered: step j is not known
                // complete when step i starts, nor (on another stream) ordered before it.
                let slots = check(&dependencies(pass, range, true), 2);
                let before = clocks(&slots, 2);
                let unordered = apart
                    .iter()
                    .filter(|&&(i, j)| before[i][slots[j].stream].is_none_or(|k| k < j))
                    .count();
                assert_eq!(
                    apart.is_empty(),
                    unordered == 0,
                    "{} pairs, {unordered} unordered",
                    apart.len()
                );
            }
            assert_eq!(copies_shared > 0, kc.class_half_copies, "{kc:?}");
        }
        // Both kinds of class launch: an upsampling's folded classes, a stride-2 input gradient's.
        assert!(kinds.len() >= 2, "{kinds:?}");
    }

    /// The stream model on the committed batch-1 DPS profile (benches/baselines/): the fit
    /// reproduces each pass's graph time with an overhead of a few microseconds a step, and
    /// the class launches side by side come out shorter than in order, both shorter than one
    /// stream.
    #[test]
    fn stream_model_fits_the_baseline() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/baselines/h200_f31698e_bf16_b1_dps.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let p = &v["profile_dps"];
        let mut per_shape = std::collections::HashMap::<(String, String), (f64, f64)>::new();
        for s in p["steps"].as_array().unwrap() {
            let key = (
                s["kind"].as_str().unwrap().into(),
                s["shape"].as_str().unwrap().into(),
            );
            let e = per_shape.entry(key).or_default();
            *e = (e.0 + s["ms"].as_f64().unwrap(), e.1 + 1.0);
        }
        let step_ms = |kind: &str, _label: &str, shape: &str| {
            per_shape
                .get(&(kind.to_string(), shape.to_string()))
                .map(|(ms, n)| ms / n)
        };
        let graph_ms: Vec<f64> = ["graph_forward_ms", "graph_backward_ms"]
            .iter()
            .map(|k| p[*k].as_f64().unwrap())
            .collect();
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        // The baseline's program ordered the classes (side by side is the default since stop 34).
        let apart = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
        let ordered = KernelConfig {
            class_concurrency: false,
            ..apart
        };
        let shape = (1, 256, 256, true, 132, Precision::Bf16);
        let (passes, _) = model_choices(
            &g,
            shape,
            [ordered, apart],
            [DEFAULT_STREAMS; 2],
            &step_ms,
            &graph_ms,
        )
        .unwrap();
        assert_eq!(passes.len(), 2);
        for (m, want) in passes.iter().zip(&graph_ms) {
            assert!(
                (m.defaults_ms / want - 1.0).abs() < 1e-3,
                "{m:?} against {want}"
            );
            assert!(m.overhead_us > 0.0 && m.overhead_us < 20.0, "{m:?}");
            assert!(
                m.configured_ms < m.defaults_ms && m.defaults_ms < m.one_stream_ms,
                "{m:?}"
            );
        }
    }

    /// The real network: every conflict of the celebahq-256 program (forward and backward,
    /// batch 1 and 2, memory placed as with side streams) is ordered by the schedule, at 2 to
    /// 4 streams, and the passes get shorter than their step counts; with the plain program
    /// at 64x64, and at 128x128 with the defaults and the fused attention (16-bit copies,
    /// aliased gradients).
    #[test]
    fn every_conflict_of_the_unet_is_ordered() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let every = KernelConfig {
            attention_flash: true,
            ..KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16)
        };
        for (n, kc, size) in [
            (1, KernelConfig::default(), 64),
            (2, KernelConfig::default(), 64),
            (1, every, 128),
            (2, every, 128),
        ] {
            let (p, pl) = bf16_plan(&g, n, size, kc);
            for pass in [&p.steps[..p.forward_steps], &p.steps[p.forward_steps..]] {
                for classes in [false, true] {
                    let deps = dependencies(
                        pass,
                        |b| {
                            let o = pl.offsets[b.0];
                            o..o + p.len(b)
                        },
                        classes,
                    );
                    for streams in 2..=MAX_STREAMS {
                        let slots = check(&deps, streams);
                        // Every step one unit long: the schedule beats one stream.
                        let span = makespan(&slots, &vec![1.0; pass.len()]);
                        assert!(span < pass.len() as f64, "{span} of {} steps", pass.len());
                    }
                }
            }
        }
    }
}
