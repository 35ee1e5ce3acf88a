//! The CPU backend: the reference for every other backend, parallel with rayon.

pub mod conv;
pub mod gemm;
pub mod math;
