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
//! Each step is launched directly, alone between `cuptiPCSamplingStart` and `Stop` with the GPU
//! idle before the start and after the step, and its samples are read out before the next: a
//! sample belongs to the step it was taken in, not to a kernel name (one kernel serves many
//! steps). CUPTI numbers its ranges; samples read under the number of an earlier range are
//! counted (they would mean that it delivers late, or that its numbers do not follow the
//! ranges), and stay with the range they were read in. A step alone has the memory system to
//! itself, which a graph replay's overlapping steps do not: its time, and its share of waits on
//! memory, can differ from a replay's; the instructions it waits at are its own.
//!
//! CUPTI (`libcupti.so`) is loaded only for sampling; it loads NVIDIA's `libnvperf_host.so` by
//! name (so from the library path), and needs a driver that lets the user read the GPU's
//! performance counters. Where CUPTI is missing sampling is an error that says so; where it
//! cannot start (no `libnvperf_host.so`, no permission), the error carries CUPTI's code.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_void, CStr};
use std::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{null_mut, NonNull};
use std::sync::{MutexGuard, OnceLock};
use std::time::Duration;

use cudarc::cupti::sys;
use cudarc::driver::sys::CUcontext;
use serde::Serialize;

use super::profile::{Pass, StepInfo};
use super::trace::{claim_cupti, cupti_error, cupti_present};
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
/// The first CUPTI whose `CUpti_PCSamplingPCData` has the `correlationId` field the bindings
/// (and so the buffers here) have: CUPTI 12.4's API version. An older one would write its
/// records at another stride.
const MIN_CUPTI_VERSION: u32 = 22;
/// Prefix of every state name CUPTI reports.
const STATE_PREFIX: &str = "smsp__pcsamp_warps_issue_stalled_";
/// Suffix of the states that count only the samples of a cycle in which the warp's scheduler
/// issued no instruction (a subset of the state of the same name without it).
const NOT_ISSUED: &str = "_not_issued";

/// Whether a state's samples count towards totals: the `_not_issued` states repeat samples of
/// another state, so that each sample is counted once without them.
pub fn counted_once(state: &str) -> bool {
    !state.ends_with(NOT_ISSUED)
}
/// Instructions listed per step, the most sampled first.
const HOTTEST: usize = 12;

/// One sampled instruction: its kernel (name and CUPTI's CRC of the module's code, which tells
/// apart kernels of one name in two modules), its offset in the kernel's code, and its samples
/// per state (positions in [`Sampler::states`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PcSamples {
    pub kernel: String,
    pub cubin_crc: u64,
    pub offset: u64,
    pub counts: Vec<(usize, u64)>,
}

/// CUPTI's own counts of a range's samples (the largest its reads gave).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CuptiCounts {
    /// Every sample taken: ours, those of kernels CUPTI does not report (its own), and the
    /// dropped ones.
    pub total: u64,
    /// Samples the hardware dropped (back-pressure or overflow).
    pub dropped: u64,
    /// Samples in kernels CUPTI gives no instructions for.
    pub non_user: u64,
}

impl CuptiCounts {
    fn max(self, o: CuptiCounts) -> CuptiCounts {
        CuptiCounts {
            total: self.total.max(o.total),
            dropped: self.dropped.max(o.dropped),
            non_user: self.non_user.max(o.non_user),
        }
    }

    fn add(&mut self, o: CuptiCounts) {
        self.total += o.total;
        self.dropped += o.dropped;
        self.non_user += o.non_user;
    }
}

/// What one range's read-out gave: its instructions, CUPTI's counts, how many of the samples
/// came under the number CUPTI gave an earlier range, and what was lost.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RangeSamples {
    pub pcs: Vec<PcSamples>,
    pub counts: CuptiCounts,
    pub late: u64,
    /// CUPTI's hardware buffer filled up: the range's samples are lost.
    pub lost: bool,
    /// Samples in states CUPTI had not listed (left out).
    pub unlisted: u64,
}

/// One `cuptiPCSamplingGetData` call as CUPTI answered it, logged for the first ranges: what
/// its range numbers and counts mean (per read, per range, or since sampling began) is not
/// pinned down by NVIDIA's documentation, and a run shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReadLog {
    /// The range (in the order run) and the read within it.
    pub range: usize,
    pub read: usize,
    pub range_id: u64,
    pub pcs: usize,
    pub remaining: usize,
    pub total: u64,
    pub dropped: u64,
    pub non_user: u64,
}

/// Ranges whose reads are logged.
const LOGGED_RANGES: usize = 48;
/// Reads that give nothing in a row before a range is taken to have nothing more (CUPTI's
/// workers decode the hardware buffer every [`WORKER_SLEEP_MS`]; a read does not wait for
/// them).
const EMPTY_READS: usize = 4;

/// A `CUpti_PCSamplingData` with room for [`PCS_PER_READ`] instructions of every state. CUPTI
/// holds pointers into it: the header is a leaked box, freed on drop, and reached only through
/// its pointer; the vectors are never resized, so that nothing moves.
struct PcBuffer {
    data: NonNull<sys::CUpti_PCSamplingData>,
    _pcs: Vec<sys::CUpti_PCSamplingPCData>,
    _counts: Vec<Vec<sys::CUpti_PCSamplingStallReason>>,
}

impl PcBuffer {
    fn new(states: usize) -> PcBuffer {
        let zero = sys::CUpti_PCSamplingStallReason {
            pcSamplingStallReasonIndex: 0,
            samples: 0,
        };
        let mut counts: Vec<Vec<_>> = (0..PCS_PER_READ).map(|_| vec![zero; states]).collect();
        let mut pcs: Vec<_> = counts
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
        let data = Box::new(sys::CUpti_PCSamplingData {
            size: size_of::<sys::CUpti_PCSamplingData>(),
            collectNumPcs: PCS_PER_READ,
            totalSamples: 0,
            droppedSamples: 0,
            totalNumPcs: 0,
            remainingNumPcs: 0,
            rangeId: 0,
            pPcData: pcs.as_mut_ptr(),
            nonUsrKernelsTotalSamples: 0,
            hardwareBufferFull: 0,
        });
        PcBuffer {
            data: NonNull::from(Box::leak(data)),
            _pcs: pcs,
            _counts: counts,
        }
    }

    fn as_ptr(&self) -> *mut c_void {
        self.data.as_ptr().cast()
    }

    /// The header as CUPTI last wrote it.
    fn header(&self) -> sys::CUpti_PCSamplingData {
        // SAFETY: a live, initialised header (packed: read whole, by value).
        unsafe { std::ptr::read(self.data.as_ptr()) }
    }

    /// Zeroes every field CUPTI writes, so that a read that writes nothing leaves nothing
    /// behind from the one before.
    fn clear(&mut self) {
        let mut h = self.header();
        h.totalSamples = 0;
        h.droppedSamples = 0;
        h.totalNumPcs = 0;
        h.remainingNumPcs = 0;
        h.rangeId = 0;
        h.nonUsrKernelsTotalSamples = 0;
        h.hardwareBufferFull = 0;
        // SAFETY: as in `header`.
        unsafe { std::ptr::write(self.data.as_ptr(), h) }
    }
}

impl Drop for PcBuffer {
    fn drop(&mut self) {
        // SAFETY: leaked in `new`, freed once; CUPTI no longer holds it (sampling is disabled
        // before a sampler's buffers drop).
        unsafe { drop(Box::from_raw(self.data.as_ptr())) }
    }
}

/// PC sampling enabled on a context: disabled when dropped.
struct Enabled(CUcontext);

impl Drop for Enabled {
    fn drop(&mut self) {
        let mut p = sys::CUpti_PCSamplingDisableParams {
            size: sys::PCSamplingDisableParamsSize as usize,
            pPriv: null_mut(),
            ctx: self.0,
        };
        // SAFETY: sampling was enabled on this live context. Nothing to do if disabling fails.
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
            sys::cuptiPCSamplingDisable(&mut p)
        }));
    }
}

/// PC sampling enabled and configured on a context, with the buffers CUPTI writes into.
pub(crate) struct Sampler {
    /// First, so that it drops first: sampling is disabled (and CUPTI has done with the
    /// buffers below, which it may fill as it disables) before they are freed.
    enabled: Enabled,
    /// Short state names ([`short_state`]) by position; `index_of` maps CUPTI's indices to it.
    pub states: Vec<String>,
    index_of: BTreeMap<u32, usize>,
    /// The range (by count) each range id CUPTI has reported was first read in.
    range_of: HashMap<u64, usize>,
    /// Ranges run.
    ranges: usize,
    log: Vec<ReadLog>,
    /// The buffer given to CUPTI at configuration, which it fills itself (when sampling is
    /// disabled); never read here.
    _configured: PcBuffer,
    /// The buffer reads fill.
    reads: PcBuffer,
    // CUPTI keeps pointers into these until sampling is disabled.
    _indices: Vec<u32>,
    _config: Vec<sys::CUpti_PCSamplingConfigurationInfo>,
    _one: MutexGuard<'static, ()>,
}

/// A CUPTI call's result as ours.
fn check(what: &str, r: sys::CUptiResult) -> Result<()> {
    checked(what, r, false)
}

/// [`check`] for the calls that set sampling up, which fail when CUPTI cannot load the perf
/// library it needs: their errors name it.
fn check_setup(what: &str, r: sys::CUptiResult) -> Result<()> {
    checked(what, r, true)
}

fn checked(what: &str, r: sys::CUptiResult, setup: bool) -> Result<()> {
    r.result().map_err(|e| match e.0 {
        sys::CUptiResult::CUPTI_ERROR_INSUFFICIENT_PRIVILEGES => Error::Cuda(format!(
            "CUPTI: {what}: the driver lets only administrators read the GPU's performance \
             counters (NVreg_RestrictProfilingToAdminUsers=1 on the host): run with \
             CAP_SYS_ADMIN (in a container: --cap-add=SYS_ADMIN) or, from driver R565, \
             CAP_PERFMON, or have the host load the nvidia module with \
             NVreg_RestrictProfilingToAdminUsers=0"
        )),
        _ if setup => Error::Cuda(format!(
            "{}; PC sampling also needs NVIDIA's libnvperf_host.so on the library path \
             (LD_LIBRARY_PATH; pip's nvidia-cuda-cupti package has it beside libcupti.so.13)",
            cupti_error(what, e)
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

/// Does nothing: the subscriber [`attach_cupti`] makes only has to exist.
unsafe extern "C" fn ignore_callback(
    _: *mut c_void,
    _: sys::CUpti_CallbackDomain,
    _: sys::CUpti_CallbackId,
    _: *const c_void,
) {
}

/// CUPTI attached to the driver, for the process's life.
static ATTACHED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Attaches CUPTI to the CUDA driver (a subscriber to its resource callbacks) before the engine
/// creates its context and loads its kernels, so that CUPTI sees every module load, as it does in
/// the public tools that sample kernels of modules loaded before sampling starts (NVIDIA does not
/// say whether it needs to). Call before opening a GPU engine that will be sampled; without
/// CUPTI, does nothing (sampling then says what is missing).
pub fn attach_cupti() -> Result<()> {
    if !cupti_present() {
        return Ok(());
    }
    let attached = catch_unwind(|| {
        ATTACHED
            .get_or_init(|| {
                let mut subscriber: sys::CUpti_SubscriberHandle = null_mut();
                // SAFETY: a callback that touches nothing; the handle is written.
                let r = unsafe {
                    sys::cuptiSubscribe(&mut subscriber, Some(ignore_callback), null_mut())
                };
                r.result().map_err(|e| format!("subscribing: {:?}", e.0))?;
                // SAFETY: the subscriber just made, never unsubscribed.
                let r = unsafe {
                    sys::cuptiEnableDomain(
                        1,
                        subscriber,
                        sys::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_RESOURCE,
                    )
                };
                r.result()
                    .map_err(|e| format!("enabling resource callbacks: {:?}", e.0))
            })
            .clone()
    });
    match attached {
        Ok(r) => r.map_err(|e| Error::Cuda(format!("CUPTI: {e}"))),
        Err(_) => Err(Error::Cuda(
            "CUPTI: the library found lacks a function this build needs (it expects CUPTI 13)"
                .into(),
        )),
    }
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
        let mut version = 0u32;
        // SAFETY: writes the version.
        check("reading its version", unsafe {
            sys::cuptiGetVersion(&mut version)
        })?;
        if version < MIN_CUPTI_VERSION {
            return Err(Error::Cuda(format!(
                "CUPTI: the library loaded has API version {version}; PC sampling here needs \
                 CUPTI 12.4 or later (version {MIN_CUPTI_VERSION}; CUPTI 13.0 is 130001), whose \
                 records it reads: put libcupti.so.13 first on LD_LIBRARY_PATH"
            )));
        }
        let mut p = sys::CUpti_PCSamplingEnableParams {
            size: sys::PCSamplingEnableParamsSize as usize,
            pPriv: null_mut(),
            ctx,
        };
        // SAFETY: `ctx` is a live context; the parameters are complete.
        check_setup("enabling PC sampling", unsafe {
            sys::cuptiPCSamplingEnable(&mut p)
        })?;
        // From here on, dropping `enabled` disables sampling again, on every error path too.
        let enabled = Enabled(ctx);

        let mut count = 0usize;
        let mut p = sys::CUpti_PCSamplingGetNumStallReasonsParams {
            size: sys::PCSamplingGetNumStallReasonsParamsSize as usize,
            pPriv: null_mut(),
            ctx,
            numStallReasons: &mut count,
        };
        // SAFETY: sampling is enabled on `ctx`; `count` is written.
        check_setup("counting the sampled states", unsafe {
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
        let states: Vec<String> = names
            .iter_mut()
            .map(|name| {
                name[NAME_BYTES - 1] = 0;
                // SAFETY: terminated just above.
                let full = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
                short_state(&full).to_string()
            })
            .collect();
        let index_of = indices.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        let mut s = Sampler {
            enabled,
            states,
            index_of,
            range_of: HashMap::new(),
            ranges: 0,
            log: Vec::new(),
            _configured: PcBuffer::new(count),
            reads: PcBuffer::new(count),
            _indices: indices,
            _config: Vec::new(),
            _one: one,
        };

        use sys::CUpti_PCSamplingCollectionMode as Mode;
        use sys::CUpti_PCSamplingConfigurationAttributeType as A;
        let data_ptr = s._configured.as_ptr();
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
                        Mode::CUPTI_PC_SAMPLING_COLLECTION_MODE_CONTINUOUS
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

    /// Samples while `run` runs (the GPU must be idle when it is called, and `run` must leave it
    /// idle), then reads out every sampled instruction. A read that gives nothing, while none
    /// has or CUPTI says more remain, is tried again a few times after a pause, as CUPTI's
    /// workers may not have decoded the range yet.
    pub fn range(&mut self, run: impl FnOnce() -> Result<()>) -> Result<RangeSamples> {
        let this = self.ranges;
        self.ranges += 1;
        let mut p = sys::CUpti_PCSamplingStartParams {
            size: sys::PCSamplingStartParamsSize as usize,
            pPriv: null_mut(),
            ctx: self.enabled.0,
        };
        // SAFETY: sampling is enabled and configured on the context.
        check_setup("starting PC sampling", unsafe {
            sys::cuptiPCSamplingStart(&mut p)
        })?;
        let ran = run();
        let mut p = sys::CUpti_PCSamplingStopParams {
            size: sys::PCSamplingStopParamsSize as usize,
            pPriv: null_mut(),
            ctx: self.enabled.0,
        };
        // SAFETY: as above; stopped whether `run` failed or not.
        let stopped = check("stopping PC sampling", unsafe {
            sys::cuptiPCSamplingStop(&mut p)
        });
        ran?;
        stopped?;

        // Read into our own buffer (the configured one is CUPTI's) until nothing remains.
        let mut got = RangeSamples::default();
        let mut empty = 0;
        for read in 0..MAX_READS {
            self.reads.clear();
            let mut p = sys::CUpti_PCSamplingGetDataParams {
                size: size_of::<sys::CUpti_PCSamplingGetDataParams>(),
                pPriv: null_mut(),
                ctx: self.enabled.0,
                pcSamplingData: self.reads.as_ptr(),
            };
            // SAFETY: a complete buffer with room for PCS_PER_READ instructions of every state.
            let r = unsafe { sys::cuptiPCSamplingGetData(&mut p) };
            let d = self.reads.header();
            if r == sys::CUptiResult::CUPTI_ERROR_OUT_OF_MEMORY || d.hardwareBufferFull != 0 {
                got.lost = true;
                return Ok(got);
            }
            check("reading PC samples", r)?;
            if this < LOGGED_RANGES {
                self.log.push(ReadLog {
                    range: this,
                    read,
                    range_id: d.rangeId,
                    pcs: d.totalNumPcs,
                    remaining: d.remainingNumPcs,
                    total: d.totalSamples,
                    dropped: d.droppedSamples,
                    non_user: d.nonUsrKernelsTotalSamples,
                });
            }
            got.counts = got.counts.max(CuptiCounts {
                total: d.totalSamples,
                dropped: d.droppedSamples,
                non_user: d.nonUsrKernelsTotalSamples,
            });
            if d.totalNumPcs > 0 {
                empty = 0;
                let first_read_in = *self.range_of.entry(d.rangeId).or_insert(this);
                let pcs = self.take_reads(d.totalNumPcs, &mut got.unlisted)?;
                if first_read_in != this {
                    got.late += pcs.iter().map(|pc| self.once(pc)).sum::<u64>();
                }
                got.pcs.extend(pcs);
                if d.remainingNumPcs == 0 {
                    return Ok(got);
                }
            } else {
                empty += 1;
                if !(got.pcs.is_empty() || d.remainingNumPcs > 0) || empty == EMPTY_READS {
                    return Ok(got);
                }
                std::thread::sleep(Duration::from_millis(2 * u64::from(WORKER_SLEEP_MS)));
            }
        }
        Err(Error::Cuda(format!(
            "CUPTI: still reporting PC samples to read after {MAX_READS} reads"
        )))
    }

    /// The reads logged so far ([`ReadLog`]).
    pub fn take_log(&mut self) -> Vec<ReadLog> {
        std::mem::take(&mut self.log)
    }

    /// An instruction's samples, each counted once (the `_not_issued` states left out).
    fn once(&self, pc: &PcSamples) -> u64 {
        samples_once(&self.states, &pc.counts)
    }

    /// The `filled` instructions the last read put in the read buffer; samples in states CUPTI
    /// did not list are added to `unlisted` and left out.
    fn take_reads(&self, filled: usize, unlisted: &mut u64) -> Result<Vec<PcSamples>> {
        if filled > PCS_PER_READ {
            return Err(Error::Cuda(format!(
                "CUPTI: {filled} sampled instructions in a buffer of {PCS_PER_READ}"
            )));
        }
        let slots = self.reads.header().pPcData;
        let mut out = Vec::with_capacity(filled);
        for i in 0..filled {
            // SAFETY: CUPTI wrote `filled` slots of the buffer it was given (read by value: the
            // struct is packed); each slot's state counts point into its own vector of
            // `states.len()` entries.
            let (kernel, cubin_crc, offset, counts) = unsafe {
                let pc = std::ptr::read(slots.add(i));
                let kernel = if pc.functionName.is_null() {
                    "?".to_string()
                } else {
                    // CUPTI's string, shared between its records: copied, and not freed (NVIDIA's
                    // sample frees them only at the end; a few hundred bytes a kernel).
                    CStr::from_ptr(pc.functionName)
                        .to_string_lossy()
                        .into_owned()
                };
                let n = pc.stallReasonCount.min(self.states.len());
                let counts = std::slice::from_raw_parts(pc.stallReason, n).to_vec();
                (kernel, pc.cubinCrc, pc.pcOffset, counts)
            };
            let mut by_state = Vec::with_capacity(counts.len());
            for c in counts {
                match self.index_of.get(&c.pcSamplingStallReasonIndex) {
                    Some(&position) if c.samples > 0 => {
                        by_state.push((position, u64::from(c.samples)))
                    }
                    Some(_) => {}
                    None => *unlisted += u64::from(c.samples),
                }
            }
            out.push(PcSamples {
                kernel,
                cubin_crc,
                offset,
                counts: by_state,
            });
        }
        Ok(out)
    }
}

/// Samples in one state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateCount {
    /// CUPTI's state name without its `smsp__pcsamp_warps_issue_stalled_` prefix: `selected` (the
    /// warp issued), `long_scoreboard`, `barrier`, ...; names ending `_not_issued` count the
    /// samples of that state in a cycle in which the warp's scheduler issued no instruction.
    pub state: String,
    pub samples: u64,
}

/// Samples of one instruction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PcCount {
    pub kernel: String,
    /// CUPTI's CRC of the kernel's module (two modules may hold kernels of one name).
    pub cubin_crc: u64,
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
    /// Times the step was sampled (fewer than the iterations when the time ran out).
    pub ranges: usize,
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
    /// CUPTI's CRC of the kernel's module: kernels of one name in two modules (`norm` and
    /// `norm_approx`) are two entries.
    pub cubin_crc: u64,
    pub samples: u64,
    pub states: Vec<StateCount>,
    /// Every sampled instruction in offset order, as `[offset, state, samples]` rows (`state`
    /// a position in [`Stalls::states`]; the `_not_issued` states left out).
    pub pcs: Vec<[u64; 3]>,
}

/// How [`CudaUnet::stalls`](super::CudaUnet::stalls) samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StallOptions {
    /// Times each step is sampled (its samples summed over them).
    pub iters: usize,
    /// Cycles between a multiprocessor's samples: 2^period_log2 (5 to 31).
    pub period_log2: u32,
    /// Starts no range after this many seconds of sampling (the steps not reached keep no
    /// samples, and [`Stalls::ranges`] says how many ran).
    pub seconds: Option<f64>,
}

/// The call that was sampled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StallsRun {
    pub device: String,
    pub precision: String,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Forward + vector-Jacobian product (true) or forward only.
    pub record: bool,
    #[serde(flatten)]
    pub options: StallOptions,
}

/// Where the warps of each step waited ([`CudaUnet::stalls`](super::CudaUnet::stalls)).
#[derive(Clone, Debug, Serialize)]
pub struct Stalls {
    #[serde(flatten)]
    pub run: StallsRun,
    /// Ranges run (a step each), of the iterations' steps: fewer when the time ran out.
    pub ranges: usize,
    pub of: usize,
    /// Ranges whose samples CUPTI's hardware buffer had no room for (lost), and ranges that
    /// gave no sample at all (every step runs for thousands of cycles, so 0 is expected).
    pub lost_ranges: usize,
    pub empty_ranges: usize,
    /// Samples in states CUPTI had not listed (left out; 0 expected).
    pub unlisted: u64,
    /// CUPTI's answers to the first ranges' reads ([`ReadLog`]).
    pub reads: Vec<ReadLog>,
    /// CUPTI's own counts, summed over the ranges: every sample taken (`total`), the dropped
    /// ones (0 when the hardware kept up) and those in kernels it reports no instructions for
    /// (`non_user`). `total` less those two is about what the steps here add up to.
    pub cupti: CuptiCounts,
    /// Samples read under the number CUPTI gave an earlier range (0 expected: otherwise CUPTI
    /// delivered them late, or its numbers do not follow the ranges), counted with the step
    /// they were read for.
    pub late: u64,
    /// Every state CUPTI sampled, short names.
    pub states: Vec<String>,
    pub steps: Vec<StepStalls>,
    /// The kernels, the most sampled first.
    pub kernels: Vec<KernelStalls>,
}

/// Samples counted once: the `_not_issued` states, subsets of others, left out.
fn samples_once(states: &[String], counts: &[(usize, u64)]) -> u64 {
    counts
        .iter()
        .filter(|&&(s, _)| counted_once(&states[s]))
        .map(|&(_, c)| c)
        .sum()
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
        .filter(|c| counted_once(&c.state))
        .map(|c| c.samples)
        .sum();
    (total, v)
}

/// An instruction's key: kernel name, module CRC, offset.
type PcKey = (String, u64, u64);

/// Accumulates ranges into a [`Stalls`] report.
pub(crate) struct StallsBuilder {
    states: Vec<String>,
    /// Per step: instruction -> state -> samples.
    steps: Vec<BTreeMap<PcKey, BTreeMap<usize, u64>>>,
    /// Per step: ranges run.
    ranges: Vec<usize>,
    cupti: CuptiCounts,
    samples: u64,
    late: u64,
    lost: usize,
    empty: usize,
    unlisted: u64,
}

impl StallsBuilder {
    pub fn new(states: Vec<String>, steps: usize) -> StallsBuilder {
        StallsBuilder {
            states,
            steps: vec![BTreeMap::new(); steps],
            ranges: vec![0; steps],
            cupti: CuptiCounts::default(),
            samples: 0,
            late: 0,
            lost: 0,
            empty: 0,
            unlisted: 0,
        }
    }

    /// Samples added so far (each once, as the steps' totals count them).
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// CUPTI's counts of the ranges added so far.
    pub fn cupti(&self) -> CuptiCounts {
        self.cupti
    }

    /// Adds the samples of a range run for step `index`.
    pub fn add(&mut self, index: usize, range: RangeSamples) {
        self.cupti.add(range.counts);
        self.late += range.late;
        self.ranges[index] += 1;
        self.lost += usize::from(range.lost);
        self.empty += usize::from(!range.lost && range.pcs.is_empty());
        self.unlisted += range.unlisted;
        for pc in range.pcs {
            self.samples += samples_once(&self.states, &pc.counts);
            let at = self.steps[index]
                .entry((pc.kernel, pc.cubin_crc, pc.offset))
                .or_default();
            for (state, samples) in pc.counts {
                *at.entry(state).or_default() += samples;
            }
        }
    }

    /// The report: `infos` and `forward_steps` describe the program's steps, `reads` are the
    /// sampler's log, `of` the ranges the run meant to run.
    pub fn finish(
        self,
        infos: &[StepInfo],
        forward_steps: usize,
        run: StallsRun,
        reads: Vec<ReadLog>,
        of: usize,
    ) -> Stalls {
        let ranges = self.ranges;
        let states = self.states;
        let mut kernels: BTreeMap<(String, u64), BTreeMap<u64, BTreeMap<usize, u64>>> =
            BTreeMap::new();
        let mut steps = Vec::with_capacity(self.steps.len());
        for (index, (pcs, info)) in self.steps.into_iter().zip(infos).enumerate() {
            let mut by_state: BTreeMap<usize, u64> = BTreeMap::new();
            let mut hottest = Vec::with_capacity(pcs.len());
            for ((kernel, cubin_crc, offset), counts) in pcs {
                let into = kernels
                    .entry((kernel.clone(), cubin_crc))
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
                    cubin_crc,
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
                ranges: ranges[index],
                samples,
                states: by_state,
                hottest,
            });
        }
        let mut kernels: Vec<KernelStalls> = kernels
            .into_iter()
            .map(|((kernel, cubin_crc), pcs)| {
                let mut by_state: BTreeMap<usize, u64> = BTreeMap::new();
                let mut rows = Vec::new();
                for (offset, counts) in pcs {
                    for (s, c) in counts {
                        *by_state.entry(s).or_default() += c;
                        // Not-issued counts are a subset of another row's: left out here.
                        if counted_once(&states[s]) {
                            rows.push([offset, s as u64, c]);
                        }
                    }
                }
                let (samples, states) = ranked(&states, &by_state);
                KernelStalls {
                    kernel,
                    cubin_crc,
                    samples,
                    states,
                    pcs: rows,
                }
            })
            .collect();
        kernels.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.kernel.cmp(&b.kernel)));
        Stalls {
            run,
            ranges: ranges.iter().sum(),
            of,
            lost_ranges: self.lost,
            empty_ranges: self.empty,
            unlisted: self.unlisted,
            reads,
            cupti: self.cupti,
            late: self.late,
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

    /// An instruction of `kernel` in module `crc`.
    fn pc((kernel, crc): (&str, u64), offset: u64, counts: &[(usize, u64)]) -> PcSamples {
        PcSamples {
            kernel: kernel.into(),
            cubin_crc: crc,
            offset,
            counts: counts.to_vec(),
        }
    }

    fn counts(total: u64, dropped: u64) -> CuptiCounts {
        CuptiCounts {
            total,
            dropped,
            non_user: 1,
        }
    }

    /// A period CUPTI does not take is refused before CUPTI is touched (there is no context
    /// here), naming the flag and the range.
    #[test]
    fn sampling_periods_outside_5_to_31_are_refused() {
        for bad in [0, 4, 32] {
            let err = Sampler::start(null_mut(), bad)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                err.contains("--stall-period") && err.contains("2^5 to 2^31"),
                "{err}"
            );
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

    /// Ranges add up per step and per kernel (one name in two modules is two kernels), late
    /// samples are counted, the not-issued states stay out of the totals, and the orders are by
    /// samples.
    #[test]
    fn ranges_add_up_by_step_kernel_and_state() {
        let states: Vec<String> = ["selected", "long_scoreboard", "long_scoreboard_not_issued"]
            .map(String::from)
            .to_vec();
        let (gn, gn_approx, conv) = (("gn", 7), ("gn", 9), ("conv", 7));
        let mut b = StallsBuilder::new(states, 3);
        b.add(
            0,
            RangeSamples {
                pcs: vec![
                    pc(gn, 0x10, &[(0, 2), (1, 5), (2, 4)]),
                    pc(gn, 0x20, &[(0, 1)]),
                ],
                counts: counts(10, 0),
                late: 0,
                ..Default::default()
            },
        );
        // The same step again (a second iteration).
        b.add(
            0,
            RangeSamples {
                pcs: vec![pc(gn, 0x10, &[(1, 3)])],
                counts: counts(3, 2),
                late: 0,
                ..Default::default()
            },
        );
        b.add(
            1,
            RangeSamples {
                pcs: vec![pc(gn_approx, 0x20, &[(1, 6)])],
                counts: counts(7, 0),
                late: 6,
                ..Default::default()
            },
        );
        b.add(
            2,
            RangeSamples {
                pcs: vec![pc(conv, 0x40, &[(0, 20)]), pc(gn, 0x20, &[(1, 1)])],
                counts: counts(23, 1),
                ..Default::default()
            },
        );
        // A range lost to a full buffer, and one that gave only states CUPTI had not listed.
        b.add(
            1,
            RangeSamples {
                lost: true,
                ..Default::default()
            },
        );
        b.add(
            2,
            RangeSamples {
                unlisted: 5,
                ..Default::default()
            },
        );
        assert_eq!(b.samples(), 11 + 6 + 21);
        let infos = [
            info("groupnorm", "a"),
            info("groupnorm", "b"),
            info("conv 3x3 fwd", "c"),
        ];
        let run = StallsRun {
            device: "card".into(),
            precision: "bf16".into(),
            n: 1,
            h: 8,
            w: 8,
            record: true,
            options: StallOptions {
                iters: 2,
                period_log2: 10,
                seconds: None,
            },
        };
        let s = b.finish(&infos, 2, run, Vec::new(), 6);
        assert_eq!((s.ranges, s.of), (6, 6));
        assert_eq!((s.lost_ranges, s.empty_ranges, s.unlisted), (1, 1, 5));
        assert_eq!(
            s.steps.iter().map(|st| st.ranges).collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        assert_eq!(
            s.cupti,
            CuptiCounts {
                total: 43,
                dropped: 3,
                non_user: 4
            }
        );
        assert_eq!(s.late, 6);
        assert_eq!(s.samples(), 11 + 6 + 21);
        let step0 = &s.steps[0];
        assert_eq!((step0.samples, step0.pass), (11, Pass::Forward));
        assert_eq!(step0.states[0].state, "long_scoreboard");
        assert_eq!(step0.states[0].samples, 8);
        assert_eq!(step0.hottest[0].offset, 0x10);
        assert_eq!(step0.hottest[0].samples, 10);
        assert_eq!(s.steps[1].samples, 6);
        assert_eq!(s.steps[1].hottest[0].cubin_crc, 9);
        assert_eq!(s.steps[2].pass, Pass::Backward);
        assert_eq!((s.steps[2].label.as_str(), s.steps[2].samples), ("c", 21));
        // Kernels over every step: conv 20, gn (module 7) 11 + 1, gn (module 9) 6.
        assert_eq!(
            s.kernels
                .iter()
                .map(|k| (k.kernel.as_str(), k.cubin_crc, k.samples))
                .collect::<Vec<_>>(),
            vec![("conv", 7, 20), ("gn", 7, 12), ("gn", 9, 6)]
        );
        assert_eq!(
            s.kernels[1].pcs,
            vec![[0x10, 0, 2], [0x10, 1, 8], [0x20, 0, 1], [0x20, 1, 1]]
        );
        let kinds = s.by_kind();
        assert_eq!(kinds[0].kind, "conv 3x3 fwd");
        assert_eq!(
            (kinds[1].kind, kinds[1].steps, kinds[1].samples),
            ("groupnorm", 2, 17)
        );
        assert_eq!(kinds[1].states[0].state, "long_scoreboard");
    }
}
