//! The CPU backend: the reference for every other backend, parallel with rayon.
//!
//! One file per op family, each with its forward and its input-gradient side by side;
//! [`unet`] runs the graph with them.

pub mod attention;
pub mod conv;
pub mod gemm;
pub mod linear;
pub mod math;
pub mod norm;
pub mod resample;
pub mod unet;
pub mod winograd;

pub use unet::{CpuUnet, Tape};
