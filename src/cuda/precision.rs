//! The arithmetic precision of the convolutions' products.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// What the convolutions (3x3 of both strides, 1x1, and the token-wise linear layers that run
/// as 1x1 convolutions) multiply in, forward and input gradient. Accumulation, GroupNorm,
/// attention, the sampler's state and every activation in memory stay fp32 whatever the choice;
/// shapes the tensor-core kernel does not take (the 3-channel image convolutions) run in fp32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// IEEE fp32 on the CUDA cores: agrees with the CPU backend to ~1e-6.
    #[default]
    Fp32,
    /// Tensor cores, operands rounded to tf32 (10-bit mantissa).
    Tf32,
    /// Tensor cores, operands rounded to bfloat16 (8-bit mantissa, fp32's range).
    Bf16,
    /// Tensor cores, operands rounded to IEEE half (11-bit mantissa, range ±65504).
    Fp16,
}

impl Precision {
    /// Every precision, fp32 first.
    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Tf32,
        Precision::Bf16,
        Precision::Fp16,
    ];

    /// The name `--precision` takes: fp32, tf32, bf16 or fp16.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// Whether the weights need a 16-bit copy (bf16 and fp16; tf32 reads the fp32 weights).
    pub(crate) fn is_half(self) -> bool {
        matches!(self, Precision::Bf16 | Precision::Fp16)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::input(format!(
                    "unknown precision `{s}` (expected fp32, tf32, bf16 or fp16)"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert!("fp64".parse::<Precision>().is_err());
        assert_eq!(Precision::default(), Precision::Fp32);
    }
}
