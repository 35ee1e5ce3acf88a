//! A timeline of the network's CUDA graph replays, from CUPTI's kernel records (`invdiff bench
//! --trace FILE`).
//!
//! The per-step profile ([`CudaUnet::profile`](super::CudaUnet::profile)) launches the steps
//! one by one with events between them, so each step's time carries a launch gap that a graph
//! replay may or may not have, and the replay's own gaps between kernels stay unseen. CUPTI's
//! concurrent-kernel records give every kernel's start and end on the device as it ran inside
//! the replayed graph. From them: how long the GPU ran kernels and how long it ran none (the
//! gaps that launch overhead and dependencies leave), how many ran at once, and each step's
//! in-graph time. The file is Chrome's trace-event JSON, which Perfetto (ui.perfetto.dev) and
//! chrome://tracing draw.
//!
//! Kernels are matched to steps by order. One directly launched iteration (each launch its own
//! API call, so CUPTI's correlation ids follow the program's launch order) gives the kernel,
//! grid and block of every launch. The graphs are captured and instantiated again under CUPTI,
//! which numbers their nodes as they are made, in capture order (so it does in practice; NVIDIA
//! does not document the order), which is the program's. A replay's records in node order must
//! show the same kernel, grid and block launch for launch, or no step is named and the summary
//! says where the two differed.
//!
//! CUPTI (`libcupti.so`) is loaded only when a trace starts; without it the trace is an error
//! that says where to get it.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;
use std::ffi::CStr;
use std::mem::offset_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};

use cudarc::cupti::result::{activity, CuptiError};
use cudarc::cupti::sys;
use serde::Serialize;
use serde_json::{json, Value};

use super::profile::StepInfo;
use crate::{Error, Result};

/// One kernel as CUPTI saw it run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KernelRecord {
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The API call that launched it: a launch of its own, or the graph launch it ran in.
    pub correlation: u32,
    /// The graph node it ran as (0 outside graphs).
    pub graph_node: u64,
    pub grid: [i32; 3],
    pub block: [i32; 3],
}

/// The head of CUPTI's kernel record with every field as a plain integer (the bindings' enum
/// fields would make reading a value CUPTI added later undefined behaviour); the offsets are
/// checked against the bindings' record below.
#[repr(C)]
#[derive(Clone, Copy)]
struct RecordHead {
    kind: u32,
    cache_and_shared_config: [u8; 2],
    registers_per_thread: u16,
    partitioned_cache: [u32; 2],
    start: u64,
    end: u64,
    completed: u64,
    device_id: u32,
    context_id: u32,
    stream_id: u32,
    grid: [i32; 3],
    block: [i32; 3],
    shared_memory: [i32; 2],
    local_memory: [u32; 2],
    correlation_id: u32,
    grid_id: i64,
    name: *const std::ffi::c_char,
    reserved0: *mut std::ffi::c_void,
    queued: u64,
    submitted: u64,
    launch_flags: [u8; 4],
    shared_memory_executed: u32,
    graph_node_id: u64,
}

type Kernel10 = sys::CUpti_ActivityKernel10;
const _: () = {
    assert!(offset_of!(RecordHead, start) == offset_of!(Kernel10, start));
    assert!(offset_of!(RecordHead, end) == offset_of!(Kernel10, end));
    assert!(offset_of!(RecordHead, grid) == offset_of!(Kernel10, gridX));
    assert!(offset_of!(RecordHead, block) == offset_of!(Kernel10, blockX));
    assert!(offset_of!(RecordHead, correlation_id) == offset_of!(Kernel10, correlationId));
    assert!(offset_of!(RecordHead, name) == offset_of!(Kernel10, name));
    assert!(offset_of!(RecordHead, graph_node_id) == offset_of!(Kernel10, graphNodeId));
    assert!(std::mem::size_of::<RecordHead>() <= std::mem::size_of::<Kernel10>());
};

/// Records the buffer callback has read, not yet taken.
static DELIVERED: Mutex<Vec<KernelRecord>> = Mutex::new(Vec::new());

/// One collection at a time ([`claim_cupti`]).
static ACTIVE: Mutex<()> = Mutex::new(());

/// Whether the buffer callbacks are registered (once per process).
static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

const BUFFER_BYTES: usize = 8 << 20;

fn buffer_layout() -> Layout {
    Layout::from_size_align(BUFFER_BYTES, 8).expect("a valid layout")
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// CUPTI asks for a buffer to fill (freed by [`buffer_completed`]).
extern "C" fn buffer_requested(buffer: *mut *mut u8, size: *mut usize, max_records: *mut usize) {
    // SAFETY: CUPTI passes valid out-pointers; a null buffer of size 0 makes it drop records,
    // which `take` then reports.
    unsafe {
        let p = alloc(buffer_layout());
        *buffer = p;
        *size = if p.is_null() { 0 } else { BUFFER_BYTES };
        *max_records = 0;
    }
}

/// CUPTI hands back a buffer: its kernel records are copied out (names included, which CUPTI
/// owns) and the buffer freed. Runs on CUPTI's thread or inside a flush; must not unwind.
extern "C" fn buffer_completed(
    _ctx: cudarc::driver::sys::CUcontext,
    _stream: u32,
    buffer: *mut u8,
    _size: usize,
    valid: usize,
) {
    if buffer.is_null() {
        return;
    }
    let mut got = Vec::new();
    let mut rec: *mut sys::CUpti_Activity = std::ptr::null_mut();
    // SAFETY: `buffer` holds `valid` bytes of records CUPTI wrote; each record starts with its
    // kind, and a concurrent-kernel record is at least a `RecordHead` long.
    unsafe {
        while activity::get_next_record(buffer, valid, &mut rec).is_ok() {
            let kind = std::ptr::read_unaligned(rec.cast::<u32>());
            if kind != sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL as u32 {
                continue;
            }
            let k = std::ptr::read_unaligned(rec.cast::<RecordHead>());
            let name = if k.name.is_null() {
                String::from("?")
            } else {
                CStr::from_ptr(k.name).to_string_lossy().into_owned()
            };
            got.push(KernelRecord {
                name,
                start_ns: k.start,
                end_ns: k.end,
                correlation: k.correlation_id,
                graph_node: k.graph_node_id,
                grid: k.grid,
                block: k.block,
            });
        }
        dealloc(buffer, buffer_layout());
    }
    locked(&DELIVERED).extend(got);
}

/// Whether CUPTI (`libcupti.so`), which `bench --trace` needs, can be loaded here.
pub fn cupti_present() -> bool {
    // SAFETY: only tries to open the library.
    catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// CUPTI's kernel records being collected; stops collecting when dropped.
pub(crate) struct Collector {
    _one: MutexGuard<'static, ()>,
}

/// The error's code only: the bindings' `Debug` asks CUPTI for its text and panics if it fails.
pub(super) fn cupti_error(what: &str, e: CuptiError) -> Error {
    Error::Cuda(format!("CUPTI: {what}: {:?}", e.0))
}

/// The process's one CUPTI collection (a trace or PC sampling: CUPTI's switches are the
/// process's), for `flag`, once CUPTI is found; held until the guard drops.
pub(super) fn claim_cupti(flag: &str) -> Result<MutexGuard<'static, ()>> {
    // A collection that panicked left nothing behind that the next one does not reset.
    let one = match ACTIVE.try_lock() {
        Ok(one) => one,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return Err(Error::Cuda(format!(
                "{flag}: a CUPTI collection is already running in this process"
            )))
        }
    };
    if !cupti_present() {
        return Err(Error::Cuda(format!(
            "{flag} needs CUPTI, which was not found: put the folder holding libcupti.so.13 on \
             LD_LIBRARY_PATH (pip's nvidia-cuda-cupti package has it, under nvidia/cu13/lib; \
             scripts/prepare_device.sh carries one as out/lib)"
        )));
    }
    Ok(one)
}

impl Collector {
    /// Loads CUPTI and starts collecting the records of every kernel that runs from now on.
    pub fn start() -> Result<Collector> {
        let one = claim_cupti("--trace")?;
        // A library without the symbols cudarc expects makes it panic: an error here.
        let started = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
            REGISTERED
                .get_or_init(|| {
                    activity::register_callbacks(Some(buffer_requested), Some(buffer_completed))
                        .map_err(|e| format!("{:?}", e.0))
                })
                .clone()
                .map_err(|e| Error::Cuda(format!("CUPTI: registering buffers: {e}")))?;
            locked(&DELIVERED).clear();
            activity::enable(sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)
                .map_err(|e| cupti_error("enabling kernel records", e))
        }));
        match started {
            Ok(r) => r.map(|()| Collector { _one: one }),
            Err(_) => Err(Error::Cuda(
                "CUPTI: the library found lacks a function this build needs (it expects \
                 CUPTI 13)"
                    .into(),
            )),
        }
    }

    /// Every record CUPTI has for kernels that finished on `ctx` (call after synchronising);
    /// an error if CUPTI dropped any, or gave one without its times (an incomplete record).
    pub fn take(&self, ctx: cudarc::driver::sys::CUcontext) -> Result<Vec<KernelRecord>> {
        flush()?;
        let mut dropped = 0;
        for queue in [ctx, std::ptr::null_mut()] {
            let mut n = 0;
            // SAFETY: `ctx` is a live context (or null, CUPTI's global queue); `n` is written.
            unsafe { activity::get_num_dropped_records(queue, 0, &mut n) }
                .map_err(|e| cupti_error("counting dropped records", e))?;
            dropped += n;
        }
        let records = std::mem::take(&mut *locked(&DELIVERED));
        let untimed = records
            .iter()
            .filter(|k| k.start_ns == 0 || k.end_ns < k.start_ns)
            .count();
        if dropped > 0 || untimed > 0 {
            return Err(Error::Cuda(format!(
                "CUPTI dropped {dropped} kernel records and gave {untimed} of {} without their \
                 times",
                records.len()
            )));
        }
        Ok(records)
    }
}

fn flush() -> Result<()> {
    let forced = sys::CUpti_ActivityFlag::CUPTI_ACTIVITY_FLAG_FLUSH_FORCED as u32;
    activity::flush_all(forced).map_err(|e| cupti_error("flushing records", e))
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = activity::disable(sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
        let _ = flush();
        locked(&DELIVERED).clear();
    }
}

/// One kernel of a replay, on the replay's clock (ns from its first kernel's start).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Span {
    pub kernel: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub grid: [i32; 3],
    pub block: [i32; 3],
    /// The program step it belongs to, where kernels matched steps.
    pub step: Option<usize>,
}

/// The replays of one pass's graph.
#[derive(Clone, Debug)]
pub struct PassTrace {
    pub name: &'static str,
    pub replays: Vec<Vec<Span>>,
}

/// Kernel timelines of one network call's graph replays ([`CudaUnet::trace`](super::CudaUnet::trace)).
#[derive(Clone, Debug)]
pub struct Trace {
    pub device: String,
    pub precision: String,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// The forward pass, then (recording) the backward pass.
    pub passes: Vec<PassTrace>,
    /// Why kernels could not be matched to steps, if they could not.
    pub unmatched: Option<String>,
    pub(crate) steps: Vec<StepInfo>,
}

/// What a pass's replays spent, per replay (means over the replays).
#[derive(Clone, Debug, Serialize)]
pub struct PassSummary {
    pub pass: &'static str,
    pub replays: usize,
    pub kernels: usize,
    /// First kernel's start to the last one's end.
    pub span_ms: f64,
    /// Time during which at least one kernel ran.
    pub busy_ms: f64,
    /// The rest of the span, and the intervals it came in.
    pub idle_ms: f64,
    pub gaps: f64,
    /// Median idle interval over every replay's, and how many (per replay) were over 2 us.
    pub median_gap_us: f64,
    pub gaps_over_2us: f64,
    /// Sum of the kernels' own durations (over `busy_ms` where kernels overlap).
    pub kernel_ms: f64,
    /// In-graph kernel time by step kind where kernels matched steps, else by kernel name,
    /// largest first.
    pub by: Vec<(String, f64)>,
    /// The longest gaps (mean over the replays) with the kernels around them.
    pub largest_gaps: Vec<LargeGap>,
    /// Where kernels matched steps: each step's in-graph kernel time (its launches' summed
    /// durations, mean over the replays), in program order.
    pub steps: Vec<StepKernelTime>,
}

/// A step's kernels' time inside the replayed graph.
#[derive(Clone, Debug, Serialize)]
pub struct StepKernelTime {
    /// Index in the program (forward steps first).
    pub step: usize,
    pub kind: &'static str,
    pub label: String,
    pub ms: f64,
}

/// Gaps listed in a summary.
const LARGEST_GAPS: usize = 5;

/// A gap of a replay and the kernels around it: each named by its step where kernels matched
/// steps, else by its kernel.
#[derive(Clone, Debug, Serialize)]
pub struct LargeGap {
    /// Its length, the mean over the replays.
    pub us: f64,
    /// The kernel that ran up to it (the last to end before it).
    pub after: String,
    /// The kernel it waited for (the first to start after it).
    pub before: String,
}

impl Trace {
    /// Builds the trace from the records of one direct iteration (`direct`: every pass's
    /// launches, in order) and of `replays` replays of each pass's graph (`replayed`), the
    /// program's steps (`steps`; the first `forward_steps` forward) and pass names.
    pub(crate) fn from_records(
        steps: &[StepInfo],
        forward_steps: usize,
        names: &[&'static str],
        mut direct: Vec<KernelRecord>,
        replayed: Vec<KernelRecord>,
        replays: usize,
    ) -> Result<(Vec<PassTrace>, Option<String>)> {
        // Each pass's launches and the step of each.
        let ranges = [0..forward_steps, forward_steps..steps.len()];
        let launch_steps: Vec<Vec<usize>> = ranges[..names.len()]
            .iter()
            .map(|r| {
                r.clone()
                    .flat_map(|s| std::iter::repeat_n(s, steps[s].launches))
                    .collect()
            })
            .collect();

        // Graph launches in the order they were made (correlation ids count API calls): replay
        // r of pass p is group r * passes + p.
        let mut groups: BTreeMap<u32, Vec<KernelRecord>> = BTreeMap::new();
        for k in replayed {
            groups.entry(k.correlation).or_default().push(k);
        }
        let mut groups: Vec<Vec<KernelRecord>> = groups.into_values().collect();
        if groups.len() != replays * names.len() {
            return Err(Error::Cuda(format!(
                "CUPTI recorded {} graph launches, {} expected ({replays} replays of {} passes)",
                groups.len(),
                replays * names.len(),
                names.len()
            )));
        }
        for g in &mut groups {
            g.sort_by_key(|k| k.graph_node);
        }
        direct.sort_by_key(|k| k.correlation);
        let unmatched = mismatch(&groups, &direct, &launch_steps, names);

        let mut passes: Vec<PassTrace> = names
            .iter()
            .map(|&name| PassTrace {
                name,
                replays: Vec::new(),
            })
            .collect();
        for (i, g) in groups.into_iter().enumerate() {
            let p = i % names.len();
            let t0 = g.iter().map(|k| k.start_ns).min().unwrap_or(0);
            let spans = g
                .into_iter()
                .enumerate()
                .map(|(j, k)| Span {
                    kernel: k.name,
                    start_ns: k.start_ns.saturating_sub(t0),
                    end_ns: k.end_ns.saturating_sub(t0),
                    grid: k.grid,
                    block: k.block,
                    step: unmatched.is_none().then(|| launch_steps[p][j]),
                })
                .collect();
            passes[p].replays.push(spans);
        }
        Ok((passes, unmatched))
    }

    /// Each pass's figures.
    pub fn summaries(&self) -> Vec<PassSummary> {
        self.passes.iter().map(|p| self.summary(p)).collect()
    }

    fn summary(&self, p: &PassTrace) -> PassSummary {
        let r = p.replays.len().max(1) as f64;
        let (mut span, mut busy, mut kernel, mut over) = (0u64, 0u64, 0u64, 0usize);
        let mut gaps = Vec::new();
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        // Gaps by the kernels around them: their summed length over the replays, whose spans
        // are in node order, the same kernels at the same places (else the first replay's).
        let same_kernels = p.replays.iter().all(|r| r.len() == p.replays[0].len());
        let gap_replays = if same_kernels { p.replays.len() } else { 1 };
        let mut between: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        let mut per_step: BTreeMap<usize, u64> = BTreeMap::new();
        for (i, spans) in p.replays.iter().enumerate() {
            let idle = idle_intervals(spans);
            span += spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
            busy += busy_ns(spans, &idle);
            over += idle.iter().filter(|g| g.ns > 2_000).count();
            for g in idle.iter().filter(|_| i < gap_replays) {
                *between.entry((g.after, g.before)).or_default() += g.ns;
            }
            gaps.extend(idle.iter().map(|g| g.ns));
            for s in spans {
                let d = s.end_ns.saturating_sub(s.start_ns);
                kernel += d;
                let key = match s.step {
                    Some(i) => {
                        *per_step.entry(i).or_default() += d;
                        self.steps[i].kind.to_string()
                    }
                    None => s.kernel.clone(),
                };
                *by.entry(key).or_default() += d;
            }
        }
        gaps.sort_unstable();
        let ms = |ns: u64| ns as f64 * 1e-6 / r;
        let mut by: Vec<(String, f64)> = by.into_iter().map(|(k, ns)| (k, ms(ns))).collect();
        by.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut between: Vec<((usize, usize), u64)> = between.into_iter().collect();
        between.sort_by_key(|&(at, ns)| (std::cmp::Reverse(ns), at));
        let name = |i: usize| {
            let s = &p.replays[0][i];
            s.step
                .map_or_else(|| s.kernel.clone(), |k| self.steps[k].label())
        };
        let largest_gaps = between
            .into_iter()
            .take(LARGEST_GAPS)
            .map(|((a, b), ns)| LargeGap {
                us: ns as f64 * 1e-3 / gap_replays as f64,
                after: name(a),
                before: name(b),
            })
            .collect();
        PassSummary {
            pass: p.name,
            replays: p.replays.len(),
            kernels: p.replays.first().map_or(0, Vec::len),
            span_ms: ms(span),
            busy_ms: ms(busy),
            idle_ms: ms(span - busy),
            gaps: gaps.len() as f64 / r,
            median_gap_us: 1e-3 * median(&gaps),
            gaps_over_2us: over as f64 / r,
            kernel_ms: ms(kernel),
            by,
            largest_gaps,
            steps: per_step
                .into_iter()
                .map(|(i, ns)| StepKernelTime {
                    step: i,
                    kind: self.steps[i].kind,
                    label: self.steps[i].label(),
                    ms: ms(ns),
                })
                .collect(),
        }
    }

    /// The last replay of every pass as Chrome trace events: a process per pass (numbered from
    /// `pid`, named `label: pass`), each pass starting where the one before it ended, kernels
    /// that overlap on rows of their own, each named by its step where kernels matched steps.
    pub fn chrome_events(&self, label: &str, pid: usize) -> Vec<Value> {
        let (mut events, mut at_us) = (Vec::new(), 0.0);
        for (p, pid) in self.passes.iter().zip(pid..) {
            let Some(spans) = p.replays.last() else {
                continue;
            };
            let name = if label == p.name {
                label.to_string()
            } else {
                format!("{label}: {}", p.name)
            };
            events.push(json!({"name": "process_name", "ph": "M", "pid": pid,
                "args": {"name": format!("{name} (batch {}, {}x{}, {}, {})",
                    self.n, self.h, self.w, self.precision, self.device)}}));
            let offset = at_us;
            at_us += spans.iter().map(|s| s.end_ns).max().unwrap_or(0) as f64 * 1e-3;
            for (s, row) in spans.iter().zip(rows(spans)) {
                let (name, cat) = match s.step {
                    Some(i) => (self.steps[i].label(), self.steps[i].kind),
                    None => (s.kernel.clone(), "kernel"),
                };
                events.push(json!({
                    "name": name, "cat": cat, "ph": "X", "pid": pid, "tid": row,
                    "ts": offset + s.start_ns as f64 * 1e-3,
                    "dur": s.end_ns.saturating_sub(s.start_ns) as f64 * 1e-3,
                    "args": {"kernel": s.kernel, "grid": s.grid, "block": s.block, "step": s.step},
                }));
            }
        }
        events
    }
}

/// Why the replays' kernels (`groups`, each in node order) cannot be matched to the steps of
/// `launch_steps` through the direct iteration's kernels (`direct`, in launch order), if they
/// cannot: the counts differ, or a launch runs another kernel or shape.
fn mismatch(
    groups: &[Vec<KernelRecord>],
    direct: &[KernelRecord],
    launch_steps: &[Vec<usize>],
    names: &[&str],
) -> Option<String> {
    let total: usize = launch_steps.iter().map(Vec::len).sum();
    if direct.len() != total {
        return Some(format!(
            "the direct iteration recorded {} kernels for {total} launches",
            direct.len()
        ));
    }
    let mut at = 0;
    for (p, ls) in launch_steps.iter().enumerate() {
        let want = &direct[at..at + ls.len()];
        for g in groups.iter().skip(p).step_by(names.len()) {
            if g.len() != ls.len() {
                return Some(format!(
                    "a replay of the {} graph ran {} kernels, and its steps count {} launches",
                    names[p],
                    g.len(),
                    ls.len()
                ));
            }
            let same = |a: &KernelRecord, b: &KernelRecord| {
                (&a.name, a.grid, a.block) == (&b.name, b.grid, b.block)
            };
            if let Some(i) = g.iter().zip(want).position(|(a, b)| !same(a, b)) {
                let shown = |k: &KernelRecord| format!("{} {:?}x{:?}", k.name, k.grid, k.block);
                return Some(format!(
                    "launch {i} of the {} pass is {} in the graph and {} launched directly",
                    names[p],
                    shown(&g[i]),
                    shown(&want[i])
                ));
            }
        }
        at += ls.len();
    }
    None
}

/// The middle value of sorted `v` (the mean of the middle two for an even count; 0 if empty).
fn median(v: &[u64]) -> f64 {
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2] as f64,
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]) as f64,
    }
}

/// Time covered by at least one span, given their `idle` intervals.
fn busy_ns(spans: &[Span], idle: &[Gap]) -> u64 {
    let end = spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
    let start = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    (end - start) - idle.iter().map(|g| g.ns).sum::<u64>()
}

/// An interval during which no span runs: its length, the span that ended it began (the last
/// to end before it) and the one that ended it (the first to start after).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Gap {
    ns: u64,
    after: usize,
    before: usize,
}

/// The gaps between the first start and the last end.
fn idle_intervals(spans: &[Span]) -> Vec<Gap> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| (spans[i].start_ns, spans[i].end_ns));
    let mut idle = Vec::new();
    let Some(&first) = order.first() else {
        return idle;
    };
    let (mut reach, mut last) = (spans[first].start_ns, first);
    for i in order {
        let s = &spans[i];
        if s.start_ns > reach {
            idle.push(Gap {
                ns: s.start_ns - reach,
                after: last,
                before: i,
            });
        }
        if s.end_ns >= reach {
            (reach, last) = (s.end_ns, i);
        }
    }
    idle
}

/// A row for each span such that spans on one row do not overlap: each takes the first row
/// free by its start, in order of start.
fn rows(spans: &[Span]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| (spans[i].start_ns, i));
    let (mut free_at, mut row) = (Vec::<u64>::new(), vec![0; spans.len()]);
    for i in order {
        let s = &spans[i];
        let r = match free_at.iter().position(|&f| f <= s.start_ns) {
            Some(r) => r,
            None => {
                free_at.push(0);
                free_at.len() - 1
            }
        };
        free_at[r] = s.end_ns;
        row[i] = r;
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: &'static str, shape: &str, launches: usize) -> StepInfo {
        StepInfo {
            kind,
            shape: shape.into(),
            variant: String::new(),
            flops: 0.0,
            launches,
        }
    }

    /// Forward: a (1 launch), b (2), c (1); backward: d (1), e (1).
    fn steps() -> Vec<StepInfo> {
        vec![
            step("conv", "a", 1),
            step("norm", "b", 2),
            step("conv", "c", 1),
            step("norm bwd", "d", 1),
            step("conv bwd", "e", 1),
        ]
    }

    const KERNELS: [&str; 6] = ["ka", "kb1", "kb2", "kc", "kd", "ke"];

    fn rec(name: &str, start: u64, end: u64, correlation: u32, node: u64) -> KernelRecord {
        KernelRecord {
            name: name.into(),
            start_ns: start,
            end_ns: end,
            correlation,
            graph_node: node,
            grid: [1, 2, 3],
            block: [256, 1, 1],
        }
    }

    /// The direct iteration: a launch each, correlation ids in launch order (delivered out of
    /// order, as CUPTI's buffers may).
    fn direct() -> Vec<KernelRecord> {
        let mut d: Vec<_> = KERNELS
            .iter()
            .enumerate()
            .map(|(i, k)| rec(k, 1000 * i as u64, 1000 * i as u64 + 500, 10 + i as u32, 0))
            .collect();
        d.reverse();
        d
    }

    /// `replays` replays of both graphs from t = 1 ms: the forward's kb1 and kb2 run side by
    /// side (kb2's node first to start), the backward's in order; node ids in capture order.
    fn replayed(replays: usize) -> Vec<KernelRecord> {
        let mut out = Vec::new();
        for r in 0..replays as u64 {
            let (t, c) = (1_000_000 + 100_000 * r, 100 + 2 * r as u32);
            out.extend([
                rec("ka", t, t + 10_000, c, 1),
                rec("kb1", t + 12_000, t + 20_000, c, 2),
                rec("kb2", t + 11_000, t + 18_000, c, 3),
                rec("kc", t + 23_000, t + 30_000, c, 4),
            ]);
            let t = t + 40_000;
            out.extend([
                rec("kd", t, t + 5_000, c + 1, 5),
                rec("ke", t + 6_000, t + 9_000, c + 1, 6),
            ]);
        }
        out
    }

    const NAMES: [&str; 2] = ["forward (recording)", "backward"];

    fn trace(passes: Vec<PassTrace>, unmatched: Option<String>) -> Trace {
        Trace {
            device: "test".into(),
            precision: "bf16".into(),
            n: 1,
            h: 8,
            w: 8,
            passes,
            unmatched,
            steps: steps(),
        }
    }

    #[test]
    fn kernels_match_their_steps_in_node_order() {
        let (passes, unmatched) =
            Trace::from_records(&steps(), 3, &NAMES, direct(), replayed(2), 2).unwrap();
        assert_eq!(unmatched, None);
        assert_eq!(passes.len(), 2);
        assert!(passes.iter().all(|p| p.replays.len() == 2));
        let fwd = &passes[0].replays[1];
        let named: Vec<(&str, Option<usize>)> =
            fwd.iter().map(|s| (s.kernel.as_str(), s.step)).collect();
        assert_eq!(
            named,
            [
                ("ka", Some(0)),
                ("kb1", Some(1)),
                ("kb2", Some(1)),
                ("kc", Some(2))
            ]
        );
        // Each replay on its own clock.
        assert_eq!((fwd[0].start_ns, fwd[0].end_ns), (0, 10_000));
        assert_eq!((fwd[2].start_ns, fwd[2].end_ns), (11_000, 18_000));
        let bwd = &passes[1].replays[0];
        assert_eq!(
            bwd.iter().map(|s| s.step).collect::<Vec<_>>(),
            [Some(3), Some(4)]
        );
        assert_eq!(bwd[1].start_ns, 6_000);
    }

    #[test]
    fn other_kernels_leave_the_steps_unnamed_and_say_where() {
        let mut d = direct();
        d[2].name = "other".into(); // correlation 13: the forward's fourth launch
        let (passes, unmatched) =
            Trace::from_records(&steps(), 3, &NAMES, d, replayed(1), 1).unwrap();
        let why = unmatched.unwrap();
        assert!(
            why.contains("launch 3 of the forward (recording) pass"),
            "{why}"
        );
        assert!(why.contains("kc") && why.contains("other"), "{why}");
        assert!(passes
            .iter()
            .flat_map(|p| &p.replays[0])
            .all(|s| s.step.is_none()));
        // So does a launch of the same kernel on another grid.
        let mut d = direct();
        d[0].grid = [9, 2, 3]; // correlation 15: the backward's second launch
        let (_, unmatched) = Trace::from_records(&steps(), 3, &NAMES, d, replayed(1), 1).unwrap();
        let why = unmatched.unwrap();
        assert!(why.contains("launch 1 of the backward pass is ke [1, 2, 3]x[256, 1, 1] in the graph and ke [9, 2, 3]"), "{why}");
        // A direct iteration short of launches is said too.
        let (_, unmatched) =
            Trace::from_records(&steps(), 3, &NAMES, direct()[1..].to_vec(), replayed(1), 1)
                .unwrap();
        assert!(unmatched.unwrap().contains("5 kernels for 6 launches"));
    }

    #[test]
    fn missing_records_leave_the_steps_unnamed_or_are_errors() {
        let mut r = replayed(2);
        r.pop();
        let (passes, unmatched) = Trace::from_records(&steps(), 3, &NAMES, direct(), r, 2).unwrap();
        let why = unmatched.unwrap();
        assert!(
            why.contains("the backward graph ran 1 kernels, and its steps count 2"),
            "{why}"
        );
        assert_eq!(passes[1].replays[1].len(), 1);
        // Replays of different lengths: the gaps come from the first one alone.
        let s = trace(passes, Some(why)).summaries();
        let g = &s[1].largest_gaps;
        assert_eq!(g.len(), 1);
        assert!((g[0].us - 1.0).abs() < 1e-9 && g[0].after == "kd" && g[0].before == "ke");
        // Whole graph launches missing: the collection itself failed.
        let err = Trace::from_records(&steps(), 3, &NAMES, direct(), replayed(2), 3).unwrap_err();
        assert!(
            err.to_string().contains("4 graph launches, 6 expected"),
            "{err}"
        );
    }

    #[test]
    fn summary_counts_busy_idle_and_overlap() {
        let (passes, unmatched) =
            Trace::from_records(&steps(), 3, &NAMES, direct(), replayed(2), 2).unwrap();
        let s = trace(passes, unmatched).summaries();
        // Forward: ka 0-10, kb2 11-18 beside kb1 12-20, kc 23-30 (us).
        let f = &s[0];
        assert_eq!((f.replays, f.kernels), (2, 4));
        assert!((f.span_ms - 0.030).abs() < 1e-12);
        assert!((f.busy_ms - 0.026).abs() < 1e-12);
        assert!((f.idle_ms - 0.004).abs() < 1e-12);
        assert_eq!((f.gaps, f.gaps_over_2us), (2.0, 1.0));
        // Gaps of 1, 1, 3 and 3 us over the two replays.
        assert!((f.median_gap_us - 2.0).abs() < 1e-12);
        assert!((f.kernel_ms - 0.032).abs() < 1e-12);
        assert_eq!(f.by[0].0, "conv");
        assert!((f.by[0].1 - 0.017).abs() < 1e-12);
        assert!((f.by[1].1 - 0.015).abs() < 1e-12);
        // 3 us after kb1 (ended last, at 20) before kc; 1 us after ka before kb2.
        let g: Vec<(f64, &str, &str)> = f
            .largest_gaps
            .iter()
            .map(|g| (g.us, g.after.as_str(), g.before.as_str()))
            .collect();
        assert_eq!(g.len(), 2);
        assert!((g[0].0 - 3.0).abs() < 1e-9 && (g[1].0 - 1.0).abs() < 1e-9);
        assert_eq!((g[0].1, g[0].2, g[1].1, g[1].2), ("b", "c", "a", "b"));
        // Each step's kernels: b's two side by side count both.
        let per_step: Vec<(usize, &str, f64)> = f
            .steps
            .iter()
            .map(|t| (t.step, t.label.as_str(), t.ms))
            .collect();
        assert_eq!(per_step.len(), 3);
        assert_eq!((per_step[1].0, per_step[1].1), (1, "b"));
        assert!((per_step[1].2 - 0.015).abs() < 1e-12 && (per_step[2].2 - 0.007).abs() < 1e-12);
        // Unmatched kernels are summed by name.
        let mut p = trace(Vec::new(), Some("x".into()));
        p.passes = Trace::from_records(&steps(), 3, &NAMES, Vec::new(), replayed(1), 1)
            .unwrap()
            .0;
        assert_eq!(p.summaries()[1].by[0].0, "kd");
        assert!(p.summaries()[1].steps.is_empty());
    }

    /// Without CUPTI on the library path a trace is an error that says where to get it; with
    /// it (and no GPU, as in CI) starting is an error or works, never a panic.
    #[test]
    fn starting_without_cupti_says_where_to_find_it() {
        let present = cupti_present();
        match Collector::start() {
            Err(e) if !present => {
                let e = e.to_string();
                assert!(
                    e.contains("libcupti.so.13") && e.contains("LD_LIBRARY_PATH"),
                    "{e}"
                );
            }
            Err(e) => assert!(e.to_string().starts_with("CUDA: CUPTI"), "{e}"),
            Ok(c) => {
                assert!(present);
                assert!(c.take(std::ptr::null_mut()).is_ok());
            }
        }
    }

    #[test]
    fn overlapping_kernels_take_rows_of_their_own() {
        let span = |a: u64, b: u64| Span {
            kernel: "k".into(),
            start_ns: a,
            end_ns: b,
            grid: [1; 3],
            block: [1; 3],
            step: None,
        };
        let spans = [
            span(0, 10),
            span(5, 8),
            span(8, 12),
            span(10, 20),
            span(30, 40),
        ];
        assert_eq!(rows(&spans), [0, 1, 1, 0, 0]);
        // The gap after span(10, 20), the last to end, before span(30, 40).
        let gap = Gap {
            ns: 10,
            after: 3,
            before: 4,
        };
        assert_eq!(idle_intervals(&spans), [gap]);
        assert_eq!(busy_ns(&spans, &idle_intervals(&spans)), 30);
        assert_eq!(
            (median(&[1, 5, 9]), median(&[1, 4]), median(&[])),
            (5.0, 2.5, 0.0)
        );
        assert_eq!(idle_intervals(&[]), []);
    }

    #[test]
    fn chrome_events_name_steps_and_passes() {
        let (passes, unmatched) =
            Trace::from_records(&steps(), 3, &NAMES, direct(), replayed(2), 2).unwrap();
        let ev = trace(passes, unmatched).chrome_events("dps", 3);
        // A name per pass, then its last replay's kernels.
        assert_eq!(ev.len(), 2 + 6);
        assert_eq!(ev[0]["ph"], "M");
        assert_eq!(ev[0]["pid"], 3);
        let name = ev[0]["args"]["name"].as_str().unwrap();
        assert!(
            name.starts_with("dps: forward (recording) (batch 1, 8x8, bf16"),
            "{name}"
        );
        let kb2 = &ev[3];
        assert_eq!(
            (kb2["name"].as_str(), kb2["cat"].as_str()),
            (Some("b"), Some("norm"))
        );
        assert_eq!(
            (kb2["ts"].as_f64(), kb2["dur"].as_f64()),
            (Some(11.0), Some(7.0))
        );
        // kb2 starts first, on the row ka freed; kb1 beside it.
        assert_eq!(
            (kb2["tid"].as_u64(), ev[2]["tid"].as_u64()),
            (Some(0), Some(1))
        );
        assert_eq!(kb2["args"]["kernel"], "kb2");
        // The backward pass from the forward's end (30 us).
        assert_eq!(
            (ev[6]["pid"].as_u64(), ev[6]["ts"].as_f64()),
            (Some(4), Some(30.0))
        );
    }
}
