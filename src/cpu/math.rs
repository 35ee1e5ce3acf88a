//! Scalar functions written so that loops over slices vectorise (no libm calls).

/// `e^x` for f32, within about 2 ulp, branch-free (Cephes' polynomial after reducing by ln 2).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.33, 88.72);
    let n = (x * LOG2E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    // 2^n by building the exponent bits; n is in [-126, 128] after the clamp. The biased
    // exponent, a whole number in [1, 254], is read from the low mantissa bits of its sum with
    // 1.5 * 2^23, where `as i32` would not vectorise (its saturating conversion is lane by
    // lane: 2-3x slower GroupNorm+SiLU passes). The same bits.
    const MAGIC: f32 = 12_582_912.0;
    let biased = (n + 127.0).clamp(1.0, 254.0) + MAGIC;
    let scale = f32::from_bits((biased.to_bits() - MAGIC.to_bits()) << 23);
    let twice = if n > 127.0 { 2.0 } else { 1.0 };
    e * scale * twice
}

/// The logistic function.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// SiLU, `x * sigmoid(x)`, written as PyTorch does (`x / (1 + e^-x)`).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Derivative of SiLU at `x`: `s (1 + x (1 - s))` with `s = sigmoid(x)`.
#[inline(always)]
pub fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-200.0), exp(-87.33));
        assert!(exp(200.0).is_finite());
        // Every power of two the exponent bits can be built for, at the ends of the clamp too.
        for n in -125..=127 {
            let x = n as f32 * std::f32::consts::LN_2;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 3e-7, "e^{x}: {got} vs {want}");
        }
    }

    #[test]
    fn silu_and_its_derivative() {
        for &x in &[-30.0f32, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0] {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            assert!((silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1e-6));
            let h = 1e-3f64;
            let fd = ((x as f64 + h) / (1.0 + (-(x as f64 + h)).exp())
                - (x as f64 - h) / (1.0 + (-(x as f64 - h)).exp()))
                / (2.0 * h);
            assert!((silu_grad(x) as f64 - fd).abs() < 1e-5, "{x}");
        }
    }
}
