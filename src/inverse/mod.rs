//! Measurement operators, blur-kernel generators and image-quality metrics.
//!
//! Images here are single items, `C×H×W` f32 planes in row-major order (one batch item of an
//! NCHW tensor); samplers loop over the batch.

mod blur;
mod kernels;
mod metrics;
mod operator;

pub use blur::CircularBlur;
pub use kernels::{gaussian_kernel, motion_kernel};
pub use metrics::{psnr_u8, ssim, to_u8};
pub use operator::{
    clean_output, clean_output_derivative, clean_output_in_place, deblurring_guidance,
    LinearOperator,
};
