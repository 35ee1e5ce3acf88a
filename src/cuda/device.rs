//! The driver, the GPUs and the embedded kernels: probing without panicking, opening a context
//! with its stream, and loading the fatbins that `build.rs` compiled.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::kernels::Kernels;
use crate::{Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}

/// The fatbins embedded in this build: (module name, image).
pub(crate) fn fatbins() -> &'static [(&'static str, &'static [u8])] {
    embedded::FATBINS
}

/// The fatbins that hold `sm_90a` machine code alone (Hopper's wgmma kernels), for compute
/// capability 9.0 only.
pub(crate) fn sm90a_fatbins() -> &'static [(&'static str, &'static [u8])] {
    embedded::SM90A_FATBINS
}

/// Every embedded module's kernel entry points, read from its PTX at build time: (module,
/// names). Empty without kernels.
#[cfg(test)]
pub(crate) fn kernel_entries() -> &'static [(&'static str, &'static [&'static str])] {
    embedded::ENTRIES
}

/// Whether this build embeds the CUDA kernels (false when nvcc was missing at build time).
pub fn kernels_compiled() -> bool {
    !embedded::FATBINS.is_empty()
}

/// The GPU targets the embedded kernels were compiled for, e.g. `["sm_90", "sm_90a", "compute_90"]`
/// (`sm_*`: machine code, `compute_*`: PTX); empty without kernels.
pub fn compiled_targets() -> Vec<String> {
    embedded::TARGETS.iter().map(|s| s.to_string()).collect()
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Index to pass to [`CudaUnet::new`](super::CudaUnet::new).
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (u32, u32),
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// Number of streaming multiprocessors.
    pub multiprocessors: u32,
    /// Most shared memory one block may ask for, in bytes (227 KB on Hopper, 99 KB on
    /// sm_86/89): kernels that need more are not loaded.
    pub max_block_smem: u32,
}

/// What the machine offers the CUDA backend.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probe {
    /// Whether the driver library (libcuda) could be loaded.
    pub driver_present: bool,
    /// The driver's CUDA version as the driver encodes it (13000 for 13.0), when it answered.
    pub driver_version: Option<i32>,
    /// The GPUs found; empty when there is no driver or no device.
    pub devices: Vec<DeviceInfo>,
    /// Why the driver or a device could not be queried, when something failed.
    pub error: Option<String>,
}

/// Asks the driver for its GPUs. Never panics: a missing or broken driver is reported in
/// [`Probe::error`].
pub fn probe() -> Probe {
    match catch_unwind(probe_inner) {
        Ok(p) => p,
        Err(panic) => Probe {
            driver_present: true,
            error: Some(format!(
                "the CUDA driver could not be used: {}",
                panic_message(&panic)
            )),
            ..Probe::default()
        },
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn probe_inner() -> Probe {
    // SAFETY: only tries to open the driver library; no driver function is called.
    if !unsafe { sys::is_culib_present() } {
        return Probe {
            error: Some(
                "no CUDA driver: libcuda could not be loaded (no NVIDIA driver on this machine, or it is \
                 not on the library path)"
                    .into(),
            ),
            ..Probe::default()
        };
    }
    let mut probe = Probe {
        driver_present: true,
        ..Probe::default()
    };
    if let Err(e) = result::init() {
        probe.error = Some(format!("the CUDA driver did not initialise (cuInit): {e}"));
        return probe;
    }
    let mut version = 0i32;
    // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
    if unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .is_ok()
    {
        probe.driver_version = Some(version);
    }
    let count = match result::device::get_count() {
        Ok(c) => c,
        Err(e) => {
            probe.error = Some(format!("the CUDA driver could not count its devices: {e}"));
            return probe;
        }
    };
    for ordinal in 0..count.max(0) as usize {
        match device_info(ordinal) {
            Ok(d) => probe.devices.push(d),
            Err(e) => {
                probe.error = Some(format!("CUDA device {ordinal} could not be queried: {e}"));
            }
        }
    }
    probe
}

fn device_info(ordinal: usize) -> std::result::Result<DeviceInfo, result::DriverError> {
    use sys::CUdevice_attribute_enum::*;
    let dev = result::device::get(ordinal as i32)?;
    // SAFETY: `dev` is a valid device handle from cuDeviceGet.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) };
    Ok(DeviceInfo {
        ordinal,
        name: result::device::get_name(dev)?,
        compute_capability: (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        ),
        // SAFETY: as above.
        total_memory: unsafe { result::device::total_mem(dev)? },
        multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        max_block_smem: attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32,
    })
}

/// Whether this build's kernels run on a device of compute capability `cc` (what
/// [`CudaUnet`](super::CudaUnet) checks before using one).
pub fn kernels_run_on(cc: (u32, u32)) -> bool {
    kernels_compiled() && targets_run_on(&compiled_targets(), cc)
}

/// Whether code built for `targets` runs on a device of compute capability `cc`: machine code
/// for the same major version and a minor version not above the device's (`sm_90a` only on
/// exactly 9.0), or PTX for a capability not above the device's (the driver compiles it).
pub(crate) fn targets_run_on(targets: &[String], cc: (u32, u32)) -> bool {
    let dev = cc.0 * 10 + cc.1;
    targets.iter().any(|t| {
        let (ptx, rest) = match (t.strip_prefix("sm_"), t.strip_prefix("compute_")) {
            (Some(r), _) => (false, r),
            (_, Some(r)) => (true, r),
            _ => return false,
        };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let specific = rest.len() > digits.len();
        let Ok(v) = digits.parse::<u32>() else {
            return false;
        };
        if specific {
            !ptx && v == dev
        } else if ptx {
            v <= dev
        } else {
            v / 10 == cc.0 && v <= dev
        }
    })
}

/// Turns a driver error into the crate's error, saying what was being done.
pub(crate) fn cu<T>(r: std::result::Result<T, result::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| Error::Cuda(format!("{what}: {e}")))
}

/// An open GPU: context, the stream passes are launched on (their side streams fork from it),
/// and the kernels.
pub(crate) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Kernels,
    pub info: DeviceInfo,
}

impl Gpu {
    /// Opens device `ordinal`; every reason it cannot is an [`Error::Cuda`] that says what to do.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let p = probe();
        if !p.driver_present || p.devices.is_empty() {
            let why = p
                .error
                .unwrap_or_else(|| "the driver reports no CUDA device".into());
            return Err(Error::Cuda(format!("no GPU available: {why}")));
        }
        let Some(info) = p.devices.get(ordinal).cloned() else {
            return Err(Error::Cuda(format!(
                "there is no CUDA device {ordinal}: the driver reports {} ({})",
                p.devices.len(),
                p.devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if !kernels_compiled() {
            return Err(Error::Cuda(
                "this build of invdiff has no CUDA kernels: nvcc was not found when it was compiled. \
                 Install one (scripts/install_nvcc.sh prints its path), set NVCC to it and rebuild"
                    .into(),
            ));
        }
        let targets = compiled_targets();
        let (major, minor) = info.compute_capability;
        if !targets_run_on(&targets, info.compute_capability) {
            return Err(Error::Cuda(format!(
                "{} (device {ordinal}) has compute capability {major}.{minor}, but the kernels in this \
                 build are for {}; rebuild with INVDIFF_CUDA_ARCHS={major}{minor}",
                info.name,
                targets.join(", ")
            )));
        }
        let opened = catch_unwind(AssertUnwindSafe(|| -> Result<Gpu> {
            let ctx = cu(CudaContext::new(ordinal), "creating a context")?;
            // CUDA graphs cannot capture the per-buffer events cudarc records by default; this
            // must precede every allocation.
            // SAFETY: no buffer exists yet; work goes to the stream below, and the side streams
            // of a pass (src/cuda/streams.rs) fork from it, wait on explicit events for every
            // step whose memory they share, and join it again before the pass ends.
            unsafe { ctx.disable_event_tracking() };
            let stream = cu(ctx.new_stream(), "creating a stream")?;
            let kernels = Kernels::load(&ctx, &info)?;
            Ok(Gpu {
                ctx,
                stream,
                kernels,
                info: info.clone(),
            })
        }));
        opened.unwrap_or_else(|panic| {
            Err(Error::Cuda(format!(
                "the CUDA driver failed: {}",
                panic_message(&panic)
            )))
        })
    }

    /// Number of multiprocessors, which sizes grids and split-K decisions.
    pub fn sms(&self) -> usize {
        self.info.multiprocessors as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_compatibility() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hopper = t(&["sm_90", "sm_90a", "compute_90"]);
        assert!(targets_run_on(&hopper, (9, 0)));
        assert!(targets_run_on(&hopper, (10, 0)), "PTX runs on later chips");
        assert!(!targets_run_on(&hopper, (8, 9)));
        assert!(targets_run_on(&t(&["sm_80"]), (8, 6)));
        assert!(!targets_run_on(&t(&["sm_86"]), (8, 0)));
        assert!(!targets_run_on(&t(&["sm_90a"]), (9, 1)));
        assert!(!targets_run_on(&[], (9, 0)));
    }

    #[test]
    fn probe_never_panics() {
        let p = probe();
        if !p.driver_present {
            assert!(p.devices.is_empty());
            assert!(p.error.is_some());
        }
    }
}
