//! Tensor maps for the `_tma` wgmma kernels (kernels/conv_wgmma.cu, `TMA`): the descriptors the
//! tensor memory accelerator copies a launch's A rows (im2col) and B rows (tiled) through,
//! encoded on the host by the driver for each launch and passed by value as kernel parameters
//! (a captured graph keeps its copy). cudarc looks the encoders up in the driver on first use
//! and panics if they are missing, but they are there from CUDA 12.0 on, and a driver that old
//! cannot load these kernels (built by CUDA 13) in the first place.

use std::ffi::c_void;

use cudarc::driver::{sys, DeviceRepr};

use super::conv_plan::{im2col_box, ConvShape, WGMMA_SLICE};
use super::DPtr;
use crate::cuda::precision::Precision;
use crate::{Error, Result};

/// cuda.h's `CUtensorMap` (kernels/conv_wgmma.cu `TmaMap`): 128 opaque bytes, 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct TensorMap([u64; 16]);

const _: () = assert!(std::mem::size_of::<TensorMap>() == 128);

// SAFETY: plain-old-data with the layout of the kernels' `const __grid_constant__ TmaMap`.
unsafe impl DeviceRepr for TensorMap {}

/// Output channels of one weight box: a wgmma block's 128 columns.
const BOX_COLS: u32 = 128;

fn data_type(precision: Precision) -> Result<sys::CUtensorMapDataType> {
    use sys::CUtensorMapDataType::*;
    match precision {
        Precision::Bf16 => Ok(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16),
        Precision::Fp16 => Ok(CU_TENSOR_MAP_DATA_TYPE_FLOAT16),
        p => Err(Error::Cuda(format!(
            "internal: a TMA convolution in {}, which has no 16-bit operands",
            p.name()
        ))),
    }
}

/// Encodes a map with `encode` (a driver call that fills the map it is given), naming the
/// map by `what` if the driver refuses it.
fn encoded(
    what: impl FnOnce() -> String,
    encode: impl FnOnce(*mut sys::CUtensorMap) -> sys::CUresult,
) -> Result<TensorMap> {
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let r = encode(&mut map);
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(TensorMap(map.opaque))
    } else {
        Err(Error::Cuda(format!("encoding {}: {r:?}", what())))
    }
}

// What both maps share: no interleave, the 128-byte swizzle the wgmma descriptors read,
// 128-byte L2 promotion, and zeros (not NaNs) outside the tensor.
const INTERLEAVE: sys::CUtensorMapInterleave =
    sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE;
const SWIZZLE: sys::CUtensorMapSwizzle = sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B;
const L2: sys::CUtensorMapL2promotion =
    sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
const ZEROS: sys::CUtensorMapFloatOOBfill =
    sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE;

/// The im2col map of `s`'s 16-bit input at `x` (`[n, sh, sw, sc]`): 64 channels of `rows` pixels
/// a copy, zeros outside the image and past the batch; its pixel box from [`im2col_box`], its
/// walk stepping `in_stride` pixels across and down (the traversal stride).
pub(super) fn im2col_map(
    precision: Precision,
    x: DPtr,
    s: &ConvShape,
    rows: usize,
) -> Result<TensorMap> {
    let shape = || {
        format!(
            "the im2col tensor map of a {}x{}x{} input (batch {}, output grid {}x{})",
            s.sh, s.sw, s.sc, s.n, s.mh, s.mw
        )
    };
    let (lower, upper) = im2col_box(s)
        .ok_or_else(|| Error::Cuda(format!("internal: no TMA copies for {}", shape())))?;
    let dtype = data_type(precision)?;
    let dims = [s.sc, s.sw, s.sh, s.n].map(|d| d as u64);
    // Bytes between consecutive pixels, rows and images; the channel stride is the element's.
    let strides = [s.sc * 2, s.sc * 2 * s.sw, s.sc * 2 * s.sw * s.sh].map(|d| d as u64);
    let stride = s.in_stride as u32;
    let element_strides = [1, stride, stride, 1];
    encoded(shape, |map| {
        // SAFETY: every array has the length the rank (4) asks for and outlives the call,
        // which only writes `map`.
        unsafe {
            sys::cuTensorMapEncodeIm2col(
                map,
                dtype,
                4,
                x as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                lower.as_ptr(),
                upper.as_ptr(),
                WGMMA_SLICE as u32,
                rows as u32,
                element_strides.as_ptr(),
                INTERLEAVE,
                SWIZZLE,
                L2,
                ZEROS,
            )
        }
    })
}

/// The tiled map of `s`'s K-major weights at `w` (`[blocks, ncols, sc]`, a block per distinct
/// tap weight): boxes of 64 channels x 128 columns of one block, zeros past `ncols`.
pub(super) fn weight_map(precision: Precision, w: DPtr, s: &ConvShape) -> Result<TensorMap> {
    let blocks = s.taps.iter().map(|t| t.w).max().unwrap_or(0) as usize + 1;
    let shape = || {
        format!(
            "the weight tensor map of a {}->{} convolution ({blocks} weight blocks)",
            s.sc, s.ncols
        )
    };
    let dtype = data_type(precision)?;
    let dims = [s.sc, s.ncols, blocks].map(|d| d as u64);
    let strides = [s.sc * 2, s.sc * 2 * s.ncols].map(|d| d as u64);
    let boxes = [WGMMA_SLICE as u32, BOX_COLS, 1];
    let element_strides = [1u32; 3];
    encoded(shape, |map| {
        // SAFETY: as in im2col_map, for rank 3.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                map,
                dtype,
                3,
                w as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                INTERLEAVE,
                SWIZZLE,
                L2,
                ZEROS,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::graph::Pad;

    /// A launch the TMA kernels cannot take, or a precision without 16-bit operands, is an error
    /// that names the map and the shape, found before the driver is asked.
    #[test]
    fn unsuitable_launches_are_named_errors() {
        let partial = ConvShape::forward(1, 64, 64, 96, 256, 3, 1, Pad::Symmetric);
        let e = im2col_map(Precision::Bf16, 0x1000, &partial, 128)
            .err()
            .expect("96 channels are no whole number of K slices")
            .to_string();
        assert!(e.contains("no TMA copies") && e.contains("64x64x96"), "{e}");
        let same = ConvShape::forward(1, 64, 64, 256, 256, 3, 1, Pad::Symmetric);
        let e = weight_map(Precision::Fp32, 0x1000, &same)
            .err()
            .expect("fp32 has no 16-bit operands")
            .to_string();
        assert!(e.contains("fp32") && e.contains("16-bit"), "{e}");
    }
}
