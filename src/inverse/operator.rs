//! The linear-operator interface of the samplers, and the notebook's small helpers around it.

use super::CircularBlur;
use crate::{Error, Result};

/// A linear measurement operator `A` acting on one image (`C×H×W` f32, row-major planes).
///
/// Implementations must be usable from several threads (the samplers parallelise over batch
/// items). Every method checks buffer lengths and returns [`Error::Input`] on a mismatch.
pub trait LinearOperator: Send + Sync {
    /// `[C, H, W]` of the images `A` is applied to.
    fn input_shape(&self) -> [usize; 3];

    /// `[C, H, W]` of the measurements `A x`.
    fn output_shape(&self) -> [usize; 3];

    /// `out = A x`.
    fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()>;

    /// `out = Aᵀ y` (the vector-Jacobian product of `forward`, what DPS back-propagates).
    fn adjoint(&self, y: &[f32], out: &mut [f32]) -> Result<()>;

    /// ΠGDM's regularised pseudo-inverse `out = Aᵀ (r² A Aᵀ + σ² I)⁻¹ y`; `r` is the per-step
    /// scalar of [`crate::schedule::GuidanceCoeffs::pigdm_r`], `sigma` > 0 the measurement
    /// noise level. Operators without a cheap inverse keep this default, an error.
    fn pseudo_inverse(&self, y: &[f32], r: f32, sigma: f32, out: &mut [f32]) -> Result<()> {
        let _ = (y, r, sigma, out);
        Err(Error::input(
            "pseudo_inverse is not supported by this operator",
        ))
    }

    /// `out = pseudo_inverse(y − A x)`, ΠGDM's guidance vector. The notebook computes
    /// `pinv(y) − pinv(A x)`; the operator is linear so this is the same quantity, and an
    /// implementation may fuse the two (the default evaluates it literally via `forward`).
    fn pinv_residual(
        &self,
        y: &[f32],
        x: &[f32],
        r: f32,
        sigma: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let mut ax = vec![0.0f32; y.len()];
        self.forward(x, &mut ax)?;
        for (a, &b) in ax.iter_mut().zip(y) {
            *a = b - *a;
        }
        self.pseudo_inverse(&ax, r, sigma, out)
    }

    /// This operator as a [`CircularBlur`], when it is one: backends with their own blur (the
    /// CUDA sampler) recognise it by this and read its kernel.
    fn as_circular_blur(&self) -> Option<&CircularBlur> {
        None
    }
}

/// The notebook's `deblurring_guidance(y, x, k, sigma, r)` on any operator:
/// `pinv(y) − pinv(A x)` with `sigma = 0` replaced by 1e-8 as the notebook does.
pub fn deblurring_guidance(
    op: &dyn LinearOperator,
    y: &[f32],
    x0_hat: &[f32],
    r: f32,
    sigma: f32,
    out: &mut [f32],
) -> Result<()> {
    let sigma = if sigma == 0.0 { 1e-8 } else { sigma };
    op.pinv_residual(y, x0_hat, r, sigma, out)
}

/// The notebook's `clean_output` of one value: `(clamp(x, −1, 1) + 1) / 2`, mapping the
/// model's [−1, 1] range to [0, 1] (NaN stays NaN, as with torch's clamp).
#[inline]
pub fn clean_output(x: f32) -> f32 {
    (x.clamp(-1.0, 1.0) + 1.0) / 2.0
}

/// [`clean_output`] over a buffer, in place.
pub fn clean_output_in_place(buf: &mut [f32]) {
    for v in buf {
        *v = clean_output(*v);
    }
}

/// d clean_output / dx as torch's autograd computes it: 0.5 strictly inside (−1, 1), 0 at and
/// beyond the bounds (torch's clamp backward passes gradient only where `min < x < max`).
#[inline]
pub fn clean_output_derivative(x: f32) -> f32 {
    if x > -1.0 && x < 1.0 {
        0.5
    } else {
        0.0
    }
}

/// Fails unless `buf` holds exactly `shape`'s elements; `what` names the buffer.
pub(crate) fn check_len(what: &str, buf: usize, shape: [usize; 3]) -> Result<()> {
    let n = shape[0] * shape[1] * shape[2];
    if buf != n {
        return Err(Error::input(format!(
            "{what} has {buf} values, expected {n} for an image of shape {shape:?}"
        )));
    }
    Ok(())
}
