//! Kernel launches, optionally with Hopper's programmatic dependent launch (PDL).
//!
//! A batch-1 pass is ~500 dependent launches of short kernels, and even in a CUDA graph each
//! one starts only after the previous grid has drained, so the device idles between them. With
//! PDL (compute capability 9.0: `cuLaunchKernelEx` with programmatic stream serialisation) the
//! next grid may be launched as soon as every block of the previous one has signalled, so its
//! blocks are resident and waiting when the previous grid ends. The kernels keep this
//! correct on their side: each begins with `pdl_entry()` (kernels/common.cuh), which waits
//! until the grid before it has completed and its writes are visible, then signals that the
//! next may launch; nothing is read or written before the wait. A test checks that every
//! kernel in `kernels/` starts that way. Without the attribute, or before sm_90, the
//! instructions do nothing.
//!
//! Off unless `INVDIFF_PDL=1` until it has been timed on a GPU.

use std::ffi::c_void;
use std::marker::PhantomData;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::{sys, CudaFunction, CudaStream, DeviceRepr, LaunchConfig};

/// Whether launches on a device of compute capability `cc` use PDL: Hopper and later, when
/// `INVDIFF_PDL=1`.
pub(crate) fn pdl_wanted(cc: (u32, u32)) -> bool {
    cc.0 >= 9 && crate::switches::is("INVDIFF_PDL", "1")
}

/// One kernel launch being built: the arguments by reference, as the driver reads them at
/// launch time (like cudarc's `LaunchArgs`, which cannot pass launch attributes).
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    pdl: bool,
    args: Vec<*mut c_void>,
    _borrows: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    /// A launch of `func` on `stream`, with PDL when `pdl`.
    pub fn new(stream: &'a CudaStream, func: &'a CudaFunction, pdl: bool) -> Self {
        Launch {
            stream,
            func,
            pdl,
            args: Vec::new(),
            _borrows: PhantomData,
        }
    }

    /// Appends the next kernel argument; it must outlive the launch (the borrow says so).
    pub fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.args.push(v as *const T as *mut c_void);
        self
    }

    /// Enqueues the kernel: `cuLaunchKernel` as cudarc does, or `cuLaunchKernelEx` with the
    /// programmatic-serialisation attribute under PDL.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and every
    /// device address among them must be valid for what the kernel reads and writes.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        if !self.pdl {
            // SAFETY: as above.
            return unsafe {
                result::launch_kernel(
                    self.func.cu_function(),
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    self.stream.cu_stream(),
                    &mut self.args,
                )
            };
        }
        let mut attrs = [sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        }];
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: attrs.len() as u32,
        };
        // SAFETY: the caller vouches for the arguments; `config` and `attrs` live through the
        // call, which copies them.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The statements that may come before `pdl_entry();`: the convolutions' L2 prefetches of
    /// their weights (kernels/conv_common.cuh `prefetch_tap`), which load nothing and touch
    /// only weights, written by no launch.
    const PREFETCHES: [&str; 2] = [
        "wg_prefetch_weights<TILE>(a);",
        "tc_prefetch_weights<T>(a);",
    ];

    /// The kernels' half of PDL: every kernel's first statement is `pdl_entry();`, so none
    /// touches memory before the grid it depends on is complete; only a weight prefetch
    /// ([`PREFETCHES`]) may come first.
    #[test]
    fn every_kernel_waits_for_its_predecessor_first() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut kernels = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "cu") {
                continue;
            }
            let src = std::fs::read_to_string(&path).unwrap();
            for (at, _) in src.match_indices("__global__") {
                let body = at + src[at..].find('{').unwrap() + 1;
                let blank = |c: char| c.is_whitespace() || c == '\\';
                let mut first = src[body..].trim_start_matches(blank);
                for prefetch in PREFETCHES {
                    if let Some(rest) = first.strip_prefix(prefetch) {
                        first = rest.trim_start_matches(blank);
                    }
                }
                // The identifier before the parameter list (which holds no parentheses).
                let head = &src[at..body];
                let params = head.rfind('(').unwrap();
                let name = head[..params].split_whitespace().last().unwrap();
                assert!(
                    first.starts_with("pdl_entry();"),
                    "{}: `{name}` does not start with pdl_entry();",
                    path.display()
                );
                kernels += 1;
            }
        }
        assert!(
            kernels > 40,
            "found only {kernels} kernels in {}",
            dir.display()
        );
    }
}
