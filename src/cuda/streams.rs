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
use super::program::{Buf, Step};
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
/// own (`range` maps a buffer to its arena range).
pub(crate) fn dependencies(steps: &[Step], range: impl Fn(Buf) -> Range<usize>) -> Vec<Vec<usize>> {
    // Per step: the arena ranges it reads, and those it writes.
    type Ranges = Vec<Range<usize>>;
    let io: Vec<(Ranges, Ranges)> = steps
        .iter()
        .map(|s| {
            let (r, w) = s.io();
            (
                r.into_iter().map(&range).collect(),
                w.into_iter().map(&range).collect(),
            )
        })
        .collect();
    let overlap = |a: &[Range<usize>], b: &[Range<usize>]| {
        a.iter()
            .any(|x| b.iter().any(|y| x.start < y.end && y.start < x.end))
    };
    (0..steps.len())
        .map(|i| {
            let (ri, wi) = &io[i];
            (0..i)
                .filter(|&j| {
                    let (rj, wj) = &io[j];
                    overlap(wi, rj) || overlap(wi, wj) || overlap(ri, wj)
                })
                .collect()
        })
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
    /// The schedule of `steps` over `streams` streams, with an event for each step another
    /// stream waits for.
    pub fn new(
        ctx: &Arc<CudaContext>,
        steps: &[Step],
        range: impl Fn(Buf) -> Range<usize>,
        streams: usize,
    ) -> Result<PassSchedule> {
        let slots = schedule(&dependencies(steps, range), streams);
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
    use crate::cuda::kernels::Capabilities;
    use crate::cuda::plan::plan;
    use crate::cuda::precision::Precision;
    use crate::cuda::program::KernelConfig;
    use crate::model::graph::Graph;

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

    /// Finish time of the last step when every step takes one unit (stream order and waits
    /// respected).
    fn makespan(slots: &[Slot], streams: usize) -> usize {
        let (mut free, mut fin) = (vec![0; streams], vec![0; slots.len()]);
        for (i, s) in slots.iter().enumerate() {
            let start = s
                .waits
                .iter()
                .map(|&j| fin[j])
                .fold(free[s.stream], usize::max);
            fin[i] = start + 1;
            free[s.stream] = fin[i];
        }
        free.into_iter().max().unwrap_or(0)
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
            let (p, pl) = plan(
                &g,
                n,
                size,
                size,
                true,
                132,
                Precision::Bf16,
                kc,
                KEEP_ALIVE,
            )
            .unwrap();
            for pass in [&p.steps[..p.forward_steps], &p.steps[p.forward_steps..]] {
                let deps = dependencies(pass, |b| {
                    let o = pl.offsets[b.0];
                    o..o + p.len(b)
                });
                for streams in 2..=MAX_STREAMS {
                    let slots = check(&deps, streams);
                    let span = makespan(&slots, streams);
                    assert!(span < pass.len(), "{span} of {} steps", pass.len());
                }
            }
        }
    }
}
