//! Where the warps of each step wait, from CUPTI's PC sampling (`invdiff bench --stalls FILE`).
//!
//! The per-step profile ([`CudaUnet::profile`](super::CudaUnet::profile)) and the kernel
//! timelines ([`Trace`](super::Trace)) say how long a step takes, not why. PC sampling does:
//! every 2^k cycles each multiprocessor's sampler picks one of its warps and records the
//! instruction it is at and its state, issued (`selected`) or stalled and on what
//! (`long_scoreboard`: a global or local memory load it needs; `math_pipe_throttle`: a busy
//! pipe; `barrier`; `wait`: a fixed latency; ...). Over a step's kernels the counts give the mix
//! of states, and the sampled offsets the instructions, which the build's SASS names
//! (`cuobjdump -sass` of the fatbins; offsets are the `/*0a30*/` column of a function).
//!
//! Each step is launched directly, alone between `cuptiPCSamplingStart` and `Stop` with a
//! synchronisation before the stop, and its samples are read out before the next: samples belong
//! to a step by when they were taken, not by kernel name (one kernel serves many steps). So a
//! step runs without the overlap a graph replay gives it, which changes its time but not what its
//! kernels wait on.
//!
//! CUPTI (`libcupti.so`) is loaded only when sampling starts; without it, or where the driver
//! refuses sampling (GPU performance counters restricted to administrators), sampling is an
//! error that says so.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::null_mut;
use std::sync::MutexGuard;

use cudarc::cupti::sys;
use cudarc::driver::sys::CUcontext;
use serde::Serialize;

use super::profile::{Pass, StepInfo};
use super::trace::{claim_cupti, cupti_error};
use crate::{Error, Result};

/// CUPTI's room for a state's name, terminator included (`CUPTI_STALL_REASON_STRING_SIZE`).
const NAME_BYTES: usize = 128;
/// Instructions read out of CUPTI per call.
const PCS_PER_READ: usize = 4096;
/// CUPTI's buffer for decoded samples (its default, 1 MB, holds about 5,500 instructions; a
/// convolution kernel has a few thousand).
const SCRATCH_BYTES: usize = 64 << 20;
/// How often CUPTI's workers decode the hardware buffer, in ms (default 100).
const WORKER_SLEEP_MS: u32 = 1;
/// Reads of one range before giving up on CUPTI's count of what remains.
const MAX_READS: usize = 100_000;
/// Prefix of every state name CUPTI reports.
const STATE_PREFIX: &str = "smsp__pcsamp_warps_issue_stalled_";
/// Suffix of the states that count only the samples whose warp issued nothing that cycle.
pub const NOT_ISSUED: &str = "_not_issued";
/// Instructions listed per step, the most sampled first.
const HOTTEST: usize = 12;

/// One sampled instruction of a range: its kernel, its offset in the kernel's code, and its
/// samples per state (positions in [`Sampler::states`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PcSamples {
    pub kernel: String,
    pub offset: u64,
    pub counts: Vec<(usize, u64)>,
}

/// What one range's read-out gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RangeSamples {
    pub pcs: Vec<PcSamples>,
    /// Samples the hardware dropped, as CUPTI counts them (summed over the range's reads).
    pub dropped: u64,
}

/// PC sampling enabled on a context, with the buffers CUPTI writes into; disabled when dropped.
pub(crate) struct Sampler {
    ctx: CUcontext,
    /// Short state names ([`short_state`]) by position; `index_of` maps CUPTI's indices to it.
    pub states: Vec<String>,
    index_of: BTreeMap<u32, usize>,
    // CUPTI holds pointers into everything below until sampling is disabled: boxed or in vectors
    // that are never resized, so that none moves.
    data: Box<sys::CUpti_PCSamplingData>,
    _pcs: Vec<sys::CUpti_PCSamplingPCData>,
    _counts: Vec<Vec<sys::CUpti_PCSamplingStallReason>>,
    _indices: Vec<u32>,
    _config: Vec<sys::CUpti_PCSamplingConfigurationInfo>,
    _one: MutexGuard<'static, ()>,
}

/// A CUPTI call's result as ours.
fn check(what: &str, r: sys::CUptiResult) -> Result<()> {
    r.result().map_err(|e| match e.0 {
        sys::CUptiResult::CUPTI_ERROR_INSUFFICIENT_PRIVILEGES => Error::Cuda(format!(
            "CUPTI: {what}: the driver allows PC sampling to administrators only (GPU \
             performance counters restricted: run as root, or load the nvidia module with \
             NVreg_RestrictProfilingToAdminUsers=0)"
        )),
        sys::CUptiResult::CUPTI_ERROR_NOT_SUPPORTED => Error::Cuda(format!(
            "CUPTI: {what}: PC sampling is not supported on this device or driver"
        )),
        _ => cupti_error(what, e),
    })
}

/// `long_scoreboard` for `smsp__pcsamp_warps_issue_stalled_long_scoreboard`.
pub fn short_state(name: &str) -> &str {
    name.strip_prefix(STATE_PREFIX).unwrap_or(name)
}

/// A configuration entry of `kind`, its data set by `set`.
fn attribute(
    kind: sys::CUpti_PCSamplingConfigurationAttributeType,
    set: impl FnOnce(&mut sys::CUpti_PCSamplingConfigurationInfo__bindgen_ty_1),
) -> sys::CUpti_PCSamplingConfigurationInfo {
    // SAFETY: a plain C struct, for which all zeroes is valid (the attribute type INVALID and the
    // status SUCCESS are both 0).
    let mut info: sys::CUpti_PCSamplingConfigurationInfo = unsafe { std::mem::zeroed() };
    info.attributeType = kind;
    set(&mut info.attributeData);
    info
}

impl Sampler {
    /// Loads CUPTI, enables PC sampling on `ctx` with a sample every 2^`period_log2` cycles of
    /// each multiprocessor (5 to 31), every state collected, and sampling off until
    /// [`range`](Self::range) starts it.
    pub fn start(ctx: CUcontext, period_log2: u32) -> Result<Sampler> {
        if !(5..=31).contains(&period_log2) {
            return Err(Error::input(format!(
                "--stall-period: CUPTI samples every 2^5 to 2^31 cycles; got 2^{period_log2}"
            )));
        }
        let one = claim_cupti("--stalls")?;
        // A library without the symbols cudarc expects makes it panic: an error here.
        catch_unwind(AssertUnwindSafe(|| Self::enable(ctx, period_log2, one))).unwrap_or_else(
            |_| {
                Err(Error::Cuda(
                    "CUPTI: the library found lacks a PC sampling function this build needs (it \
                     expects CUPTI 13)"
                        .into(),
                ))
            },
        )
    }

    fn enable(ctx: CUcontext, period_log2: u32, one: MutexGuard<'static, ()>) -> Result<Sampler> {
        let mut p = sys::CUpti_PCSamplingEnableParams {
            size: sys::PCSamplingEnableParamsSize as usize,
            pPriv: null_mut(),
            ctx,
        };
        // SAFETY: `ctx` is a live context; the parameters are complete.
        check("enabling PC sampling", unsafe {
            sys::cuptiPCSamplingEnable(&mut p)
        })?;
        // From here on, dropping the sampler disables sampling again, on every error path too.
        let mut s = Sampler {
            ctx,
            states: Vec::new(),
            index_of: BTreeMap::new(),
            data: Box::new(sys::CUpti_PCSamplingData {
                size: size_of::<sys::CUpti_PCSamplingData>(),
                collectNumPcs: 0,
                totalSamples: 0,
                droppedSamples: 0,
                totalNumPcs: 0,
                remainingNumPcs: 0,
                rangeId: 0,
                pPcData: null_mut(),
                nonUsrKernelsTotalSamples: 0,
                hardwareBufferFull: 0,
            }),
            _pcs: Vec::new(),
            _counts: Vec::new(),
            _indices: Vec::new(),
            _config: Vec::new(),
            _one: one,
        };

        let mut count = 0usize;
        let mut p = sys::CUpti_PCSamplingGetNumStallReasonsParams {
            size: sys::PCSamplingGetNumStallReasonsParamsSize as usize,
            pPriv: null_mut(),
            ctx,
            numStallReasons: &mut count,
        };
        // SAFETY: sampling is enabled on `ctx`; `count` is written.
        check("counting the sampled states", unsafe {
            sys::cuptiPCSamplingGetNumStallReasons(&mut p)
        })?;
        if count == 0 {
            return Err(Error::Cuda(
                "CUPTI: PC sampling reports no states to sample on this device".into(),
            ));
        }
        let mut indices = vec![0u32; count];
        let mut names = vec![[0 as c_char; NAME_BYTES]; count];
        let mut name_ptrs: Vec<*mut c_char> = names.iter_mut().map(|n| n.as_mut_ptr()).collect();
        let mut p = sys::CUpti_PCSamplingGetStallReasonsParams {
            size: sys::PCSamplingGetStallReasonsParamsSize as usize,
            pPriv: null_mut(),
            ctx,
            numStallReasons: count,
            stallReasonIndex: indices.as_mut_ptr(),
            stallReasons: name_ptrs.as_mut_ptr(),
        };
        // SAFETY: `count` indices and `count` name buffers of NAME_BYTES each, as CUPTI writes.
        check("naming the sampled states", unsafe {
            sys::cuptiPCSamplingGetStallReasons(&mut p)
        })?;
        for (position, (name, &index)) in names.iter_mut().zip(&indices).enumerate() {
            name[NAME_BYTES - 1] = 0;
            // SAFETY: terminated just above.
            let full = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
            s.states.push(short_state(&full).to_string());
            s.index_of.insert(index, position);
        }

        // Every instruction slot with room for every state.
        s._counts = (0..PCS_PER_READ)
            .map(|_| {
                vec![
                    sys::CUpti_PCSamplingStallReason {
                        pcSamplingStallReasonIndex: 0,
                        samples: 0,
                    };
                    count
                ]
            })
            .collect();
        s._pcs = s
            ._counts
            .iter_mut()
            .map(|c| sys::CUpti_PCSamplingPCData {
                size: size_of::<sys::CUpti_PCSamplingPCData>(),
                cubinCrc: 0,
                pcOffset: 0,
                functionIndex: 0,
                pad: 0,
                functionName: null_mut(),
                stallReasonCount: 0,
                stallReason: c.as_mut_ptr(),
                correlationId: 0,
            })
            .collect();
        s.data.collectNumPcs = PCS_PER_READ;
        s.data.pPcData = s._pcs.as_mut_ptr();
        s._indices = indices;

        use sys::CUpti_PCSamplingConfigurationAttributeType as A;
        let data_ptr: *mut c_void = (&mut *s.data as *mut sys::CUpti_PCSamplingData).cast();
        let (state_count, state_ptr) = (s._indices.len(), s._indices.as_mut_ptr());
        s._config = vec![
            attribute(
                A::CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SAMPLING_PERIOD,
                |d| d.samplingPeriodData.samplingPeriod = period_log2,
            ),
            attribute(
                A::CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_STALL_REASON,
                |d| {
                    d.stallReasonData.stallReasonCount = state_count;
                    d.stallReasonData.pStallReasonIndex = state_ptr;
                },
            ),
            attribute(
                A::CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SCRATCH_BUFFER_SIZE,
                |d| d.scratchBufferSizeData.scratchBufferSize = SCRATCH_BYTES,
            ),
            attribute(
                A::CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_COLLECTION_MODE,
                |d| {
                    d.collectionModeData.collectionMode =
                        sys::CUpti_PCSamplingCollectionMode::CUPTI_PC_SAMPLING_COLLECTION_MODE_CONTINUOUS
                },
            ),
            attribute(
                A::CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_ENABLE_START_STOP_CONTROL,
                |d| d.enableStartStopControlData.enableStartStopControl = 1,
            ),
            attribute(
                A::CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SAMPLING_DATA_BUFFER,
                |d| d.samplingDataBufferData.samplingDataBuffer = data_ptr,
            ),
            attribute(
                A::CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_WORKER_THREAD_PERIODIC_SLEEP_SPAN,
                |d| {
                    d.workerThreadPeriodicSleepSpanData
                        .workerThreadPeriodicSleepSpan = WORKER_SLEEP_MS
                },
            ),
        ];
        let mut p = sys::CUpti_PCSamplingConfigurationInfoParams {
            size: sys::PCSamplingConfigurationInfoParamsSize as usize,
            pPriv: null_mut(),
            ctx,
            numAttributes: s._config.len(),
            pPCSamplingConfigurationInfo: s._config.as_mut_ptr(),
        };
        // SAFETY: every attribute's data is set and what it points to lives in `s`.
        let configured = check("configuring PC sampling", unsafe {
            sys::cuptiPCSamplingSetConfigurationAttribute(&mut p)
        });
        if let Err(e) = configured {
            let refused: Vec<String> = s
                ._config
                .iter()
                .filter(|i| i.attributeStatus != sys::CUptiResult::CUPTI_SUCCESS)
                .map(|i| format!("{:?} ({:?})", i.attributeType, i.attributeStatus))
                .collect();
            return Err(Error::Cuda(format!("{e}; refused: {}", refused.join(", "))));
        }
        Ok(s)
    }

    /// Samples while `run` runs (it must leave the GPU idle when it returns), then reads out
    /// every sampled instruction.
    pub fn range(&mut self, run: impl FnOnce() -> Result<()>) -> Result<RangeSamples> {
        self.data.totalNumPcs = 0;
        self.data.remainingNumPcs = 0;
        let mut p = sys::CUpti_PCSamplingStartParams {
            size: sys::PCSamplingStartParamsSize as usize,
            pPriv: null_mut(),
            ctx: self.ctx,
        };
        // SAFETY: sampling is enabled and configured on the context.
        check("starting PC sampling", unsafe {
            sys::cuptiPCSamplingStart(&mut p)
        })?;
        let ran = run();
        let mut p = sys::CUpti_PCSamplingStopParams {
            size: sys::PCSamplingStopParamsSize as usize,
            pPriv: null_mut(),
            ctx: self.ctx,
        };
        // SAFETY: as above; stopped whether `run` failed or not.
        let stopped = check("stopping PC sampling", unsafe {
            sys::cuptiPCSamplingStop(&mut p)
        });
        ran?;
        stopped?;

        // The stop may already have filled the buffer; then read until CUPTI has nothing left.
        let mut got = RangeSamples::default();
        let mut read = false;
        for _ in 0..MAX_READS {
            self.take_buffer(&mut got.pcs)?;
            if read && self.data.remainingNumPcs == 0 {
                return Ok(got);
            }
            let mut p = sys::CUpti_PCSamplingGetDataParams {
                size: size_of::<sys::CUpti_PCSamplingGetDataParams>(),
                pPriv: null_mut(),
                ctx: self.ctx,
                pcSamplingData: (&mut *self.data as *mut sys::CUpti_PCSamplingData).cast(),
            };
            // SAFETY: the data buffer is the configured one, with room for PCS_PER_READ slots.
            let r = unsafe { sys::cuptiPCSamplingGetData(&mut p) };
            if r == sys::CUptiResult::CUPTI_ERROR_OUT_OF_MEMORY || self.data.hardwareBufferFull != 0
            {
                return Err(Error::Cuda(
                    "CUPTI: the PC sampling hardware buffer filled up: sample less often \
                     (a larger --stall-period)"
                        .into(),
                ));
            }
            check("reading PC samples", r)?;
            got.dropped += self.data.droppedSamples;
            read = true;
        }
        Err(Error::Cuda(format!(
            "CUPTI: still reporting PC samples to read after {MAX_READS} reads"
        )))
    }

    /// Copies out the instructions the buffer holds and marks it empty.
    fn take_buffer(&mut self, into: &mut Vec<PcSamples>) -> Result<()> {
        let filled = self.data.totalNumPcs;
        if filled > PCS_PER_READ {
            return Err(Error::Cuda(format!(
                "CUPTI: {filled} sampled instructions in a buffer of {PCS_PER_READ}"
            )));
        }
        for i in 0..filled {
            // SAFETY: CUPTI wrote `filled` slots of the buffer it was given (read through the
            // pointer it holds, by value: the struct is packed); each slot's state counts point
            // into its own vector of `states.len()` entries.
            let (kernel, offset, counts) = unsafe {
                let pc = std::ptr::read(self.data.pPcData.add(i));
                let kernel = if pc.functionName.is_null() {
                    "?".to_string()
                } else {
                    // CUPTI's string, which its other records may share: copied, never freed.
                    CStr::from_ptr(pc.functionName)
                        .to_string_lossy()
                        .into_owned()
                };
                let n = pc.stallReasonCount.min(self.states.len());
                let counts = std::slice::from_raw_parts(pc.stallReason, n).to_vec();
                (kernel, pc.pcOffset, counts)
            };
            let mut by_state = Vec::with_capacity(counts.len());
            for c in counts {
                let index = c.pcSamplingStallReasonIndex;
                let Some(&position) = self.index_of.get(&index) else {
                    return Err(Error::Cuda(format!(
                        "CUPTI: a sample in state {index}, which it did not list"
                    )));
                };
                if c.samples > 0 {
                    by_state.push((position, u64::from(c.samples)));
                }
            }
            into.push(PcSamples {
                kernel,
                offset,
                counts: by_state,
            });
        }
        self.data.totalNumPcs = 0;
        Ok(())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        let mut p = sys::CUpti_PCSamplingDisableParams {
            size: sys::PCSamplingDisableParamsSize as usize,
            pPriv: null_mut(),
            ctx: self.ctx,
        };
        // SAFETY: sampling was enabled on this live context; nothing to do if disabling fails.
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
            sys::cuptiPCSamplingDisable(&mut p)
        }));
    }
}

/// Samples in one state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateCount {
    /// CUPTI's state name without its `smsp__pcsamp_warps_issue_stalled_` prefix: `selected` (the
    /// warp issued), `long_scoreboard`, `barrier`, ...; names ending `_not_issued` count the
    /// samples of that state in which the warp's scheduler issued nothing.
    pub state: String,
    pub samples: u64,
}

/// Samples of one instruction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PcCount {
    pub kernel: String,
    /// Byte offset in the kernel's code, as cuobjdump's `/*offset*/` column numbers it.
    pub offset: u64,
    pub samples: u64,
    pub states: Vec<StateCount>,
}

/// One step's samples.
#[derive(Clone, Debug, Serialize)]
pub struct StepStalls {
    /// Position in the program (forward steps first).
    pub index: usize,
    pub pass: Pass,
    /// The step's kind and label, as in the per-step profile.
    pub kind: &'static str,
    pub label: String,
    /// Every sample of the step's kernels (each counted once, in its state without
    /// `_not_issued`).
    pub samples: u64,
    /// By state, the most sampled first.
    pub states: Vec<StateCount>,
    /// The most sampled instructions, at most 12.
    pub hottest: Vec<PcCount>,
}

/// One kernel's samples over every step, instruction by instruction.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStalls {
    pub kernel: String,
    pub samples: u64,
    pub states: Vec<StateCount>,
    /// Every sampled instruction in offset order, as `[offset, state, samples]` rows (`state`
    /// a position in [`Stalls::states`]; the `_not_issued` states left out).
    pub pcs: Vec<[u64; 3]>,
}

/// Where the warps of each step waited ([`CudaUnet::stalls`](super::CudaUnet::stalls)).
#[derive(Clone, Debug, Serialize)]
pub struct Stalls {
    pub device: String,
    pub precision: String,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub record: bool,
    /// Times each step was sampled (its samples summed over them).
    pub iters: usize,
    /// Cycles between a multiprocessor's samples: 2^period_log2.
    pub period_log2: u32,
    /// Samples the hardware dropped, as CUPTI counted them: 0 when every sample is here.
    pub dropped: u64,
    /// Every state CUPTI sampled, short names.
    pub states: Vec<String>,
    pub steps: Vec<StepStalls>,
    /// The kernels, the most sampled first.
    pub kernels: Vec<KernelStalls>,
}

/// Samples summed by state, the most first (ties by name); `_not_issued` states are kept apart
/// from the total, which counts each sample once.
fn ranked(states: &[String], counts: &BTreeMap<usize, u64>) -> (u64, Vec<StateCount>) {
    let mut v: Vec<StateCount> = counts
        .iter()
        .map(|(&s, &samples)| StateCount {
            state: states[s].clone(),
            samples,
        })
        .collect();
    v.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.state.cmp(&b.state)));
    let total = v
        .iter()
        .filter(|c| !c.state.ends_with(NOT_ISSUED))
        .map(|c| c.samples)
        .sum();
    (total, v)
}

/// Accumulates ranges into a [`Stalls`] report.
pub(crate) struct StallsBuilder {
    states: Vec<String>,
    /// Per step: (kernel, offset) -> state -> samples.
    steps: Vec<BTreeMap<(String, u64), BTreeMap<usize, u64>>>,
    dropped: u64,
}

impl StallsBuilder {
    pub fn new(states: Vec<String>, steps: usize) -> StallsBuilder {
        StallsBuilder {
            states,
            steps: vec![BTreeMap::new(); steps],
            dropped: 0,
        }
    }

    /// Samples added so far.
    pub fn samples(&self) -> u64 {
        self.steps
            .iter()
            .flat_map(|step| step.values())
            .flat_map(|counts| counts.iter())
            .filter(|(&s, _)| !self.states[s].ends_with(NOT_ISSUED))
            .map(|(_, &c)| c)
            .sum()
    }

    /// Adds a range's samples to step `index`.
    pub fn add(&mut self, index: usize, range: RangeSamples) {
        self.dropped += range.dropped;
        let step = &mut self.steps[index];
        for pc in range.pcs {
            let at = step.entry((pc.kernel, pc.offset)).or_default();
            for (state, samples) in pc.counts {
                *at.entry(state).or_default() += samples;
            }
        }
    }

    /// The report: `infos` and `forward_steps` describe the program's steps; the rest is the
    /// run's description.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        self,
        infos: &[StepInfo],
        forward_steps: usize,
        device: String,
        precision: String,
        (n, h, w): (usize, usize, usize),
        record: bool,
        iters: usize,
        period_log2: u32,
    ) -> Stalls {
        let states = self.states;
        let mut kernels: BTreeMap<String, BTreeMap<u64, BTreeMap<usize, u64>>> = BTreeMap::new();
        let mut steps = Vec::with_capacity(self.steps.len());
        for (index, (pcs, info)) in self.steps.into_iter().zip(infos).enumerate() {
            let mut by_state: BTreeMap<usize, u64> = BTreeMap::new();
            let mut hottest = Vec::with_capacity(pcs.len());
            for ((kernel, offset), counts) in pcs {
                let into = kernels
                    .entry(kernel.clone())
                    .or_default()
                    .entry(offset)
                    .or_default();
                for (&s, &c) in &counts {
                    *by_state.entry(s).or_default() += c;
                    *into.entry(s).or_default() += c;
                }
                let (samples, states) = ranked(&states, &counts);
                hottest.push(PcCount {
                    kernel,
                    offset,
                    samples,
                    states,
                });
            }
            hottest.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.offset.cmp(&b.offset)));
            hottest.truncate(HOTTEST);
            let (samples, by_state) = ranked(&states, &by_state);
            steps.push(StepStalls {
                index,
                pass: if index < forward_steps {
                    Pass::Forward
                } else {
                    Pass::Backward
                },
                kind: info.kind,
                label: info.label(),
                samples,
                states: by_state,
                hottest,
            });
        }
        let mut kernels: Vec<KernelStalls> = kernels
            .into_iter()
            .map(|(kernel, pcs)| {
                let mut by_state: BTreeMap<usize, u64> = BTreeMap::new();
                let mut rows = Vec::new();
                for (offset, counts) in pcs {
                    for (s, c) in counts {
                        *by_state.entry(s).or_default() += c;
                        // Not-issued counts are a subset of another row's: left out here.
                        if !states[s].ends_with(NOT_ISSUED) {
                            rows.push([offset, s as u64, c]);
                        }
                    }
                }
                let (samples, states) = ranked(&states, &by_state);
                KernelStalls {
                    kernel,
                    samples,
                    states,
                    pcs: rows,
                }
            })
            .collect();
        kernels.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.kernel.cmp(&b.kernel)));
        Stalls {
            device,
            precision,
            n,
            h,
            w,
            record,
            iters,
            period_log2,
            dropped: self.dropped,
            states,
            steps,
            kernels,
        }
    }
}

/// Samples of a group of steps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StallGroup {
    pub kind: &'static str,
    pub steps: usize,
    pub samples: u64,
    pub states: Vec<StateCount>,
}

impl Stalls {
    /// Every sample of every step.
    pub fn samples(&self) -> u64 {
        self.steps.iter().map(|s| s.samples).sum()
    }

    /// The steps grouped by kind, the most sampled kind first.
    pub fn by_kind(&self) -> Vec<StallGroup> {
        let mut groups: BTreeMap<&'static str, (usize, BTreeMap<String, u64>)> = BTreeMap::new();
        for s in &self.steps {
            let g = groups.entry(s.kind).or_default();
            g.0 += 1;
            for c in &s.states {
                *g.1.entry(c.state.clone()).or_default() += c.samples;
            }
        }
        let mut v: Vec<StallGroup> = groups
            .into_iter()
            .map(|(kind, (steps, counts))| {
                let names: Vec<String> = counts.keys().cloned().collect();
                let positions = counts.values().copied().enumerate().collect();
                let (samples, states) = ranked(&names, &positions);
                StallGroup {
                    kind,
                    steps,
                    samples,
                    states,
                }
            })
            .collect();
        v.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.kind.cmp(b.kind)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: &'static str, shape: &str) -> StepInfo {
        StepInfo {
            kind,
            shape: shape.into(),
            variant: String::new(),
            flops: 0.0,
            launches: 1,
        }
    }

    fn pc(kernel: &str, offset: u64, counts: &[(usize, u64)]) -> PcSamples {
        PcSamples {
            kernel: kernel.into(),
            offset,
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn state_names_lose_cuptis_prefix() {
        assert_eq!(
            short_state("smsp__pcsamp_warps_issue_stalled_long_scoreboard"),
            "long_scoreboard"
        );
        assert_eq!(
            short_state("smsp__pcsamp_warps_issue_stalled_barrier_not_issued"),
            "barrier_not_issued"
        );
        assert_eq!(short_state("something_else"), "something_else");
    }

    /// Ranges add up per step and per kernel, the not-issued states stay out of the totals, and
    /// the orders are by samples.
    #[test]
    fn ranges_add_up_by_step_kernel_and_state() {
        let states: Vec<String> = ["selected", "long_scoreboard", "long_scoreboard_not_issued"]
            .map(String::from)
            .to_vec();
        let mut b = StallsBuilder::new(states, 3);
        b.add(
            0,
            RangeSamples {
                pcs: vec![
                    pc("gn", 0x10, &[(0, 2), (1, 5), (2, 4)]),
                    pc("gn", 0x20, &[(0, 1)]),
                ],
                dropped: 0,
            },
        );
        // The same step again (a second iteration) and another step with the same kernel.
        b.add(
            0,
            RangeSamples {
                pcs: vec![pc("gn", 0x10, &[(1, 3)])],
                dropped: 2,
            },
        );
        b.add(
            2,
            RangeSamples {
                pcs: vec![pc("conv", 0x40, &[(0, 20)]), pc("gn", 0x20, &[(1, 1)])],
                dropped: 1,
            },
        );
        assert_eq!(b.samples(), 11 + 21);
        let infos = [
            info("groupnorm", "a"),
            info("groupnorm", "b"),
            info("conv 3x3 fwd", "c"),
        ];
        let s = b.finish(
            &infos,
            2,
            "card".into(),
            "bf16".into(),
            (1, 8, 8),
            true,
            2,
            10,
        );
        assert_eq!(s.dropped, 3);
        assert_eq!(s.samples(), 11 + 21);
        let step0 = &s.steps[0];
        assert_eq!((step0.samples, step0.pass), (11, Pass::Forward));
        assert_eq!(step0.states[0].state, "long_scoreboard");
        assert_eq!(step0.states[0].samples, 8);
        assert_eq!(step0.hottest[0].offset, 0x10);
        assert_eq!(step0.hottest[0].samples, 10);
        assert_eq!(s.steps[1].samples, 0);
        assert!(s.steps[1].hottest.is_empty());
        assert_eq!(s.steps[2].pass, Pass::Backward);
        assert_eq!(s.steps[2].label, "c");
        // Kernels over every step: conv 20, gn 11 + 1.
        assert_eq!(s.kernels[0].kernel, "conv");
        assert_eq!(
            (s.kernels[1].kernel.as_str(), s.kernels[1].samples),
            ("gn", 12)
        );
        assert_eq!(
            s.kernels[1].pcs,
            vec![[0x10, 0, 2], [0x10, 1, 8], [0x20, 0, 1], [0x20, 1, 1]]
        );
        let kinds = s.by_kind();
        assert_eq!(kinds[0].kind, "conv 3x3 fwd");
        assert_eq!(
            (kinds[1].kind, kinds[1].steps, kinds[1].samples),
            ("groupnorm", 2, 11)
        );
        assert_eq!(kinds[1].states[0].state, "long_scoreboard");
    }
}
