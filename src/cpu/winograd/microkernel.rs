//! The 6x16 register-tile product behind the Winograd convolution's 16 small matrix products.
//!
//! `C[6, 16] = A[6, k] B[k, 16]` with `A` read row by row in place (the transformed input tiles,
//! six rows `lda` apart) and `B` a pre-packed weight panel whose 16-float rows are each one cache
//! line. Per step of `k`: two 8-wide loads of `B`, six broadcasts of `A` and twelve FMAs into
//! twelve accumulators; with the two `B` vectors and one broadcast that is 15 of AVX2's 16
//! registers, and twelve independent FMA chains cover the FMA latency (4 cycles x 2 ports). The
//! loads per FMA stay well under what the load ports sustain, so the loop runs at the FMA
//! ports' rate whether `B` comes from L1 (`k` up to ~500) or L2.
//!
//! `C` is overwritten, never accumulated into, so nothing is read back from memory; and each row
//! of `C` is a sequential sum over `k` that depends on its own row of `A` only, so a tile's
//! result does not depend on which other tiles share its block.

use std::arch::x86_64::*;

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile: the width of a packed weight panel.
pub const NR: usize = 16;

/// `c[i * ldc + j] = Σ_p a[i * lda + p] b[p * NR + j]` for `i < MR`, `j < NR`, `p < k`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `a` must be valid for reads of `MR` rows of `k` floats
/// `lda` apart, `b` for reads of `k * NR` floats and 32-byte aligned, and `c` valid for writes
/// of `MR` rows of `NR` floats `ldc` apart.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemm_6x16(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..k {
        // SAFETY: p < k, so both halves of row p of the panel are in bounds and 32-byte aligned.
        let (b0, b1) = unsafe {
            (
                _mm256_load_ps(b.add(p * NR)),
                _mm256_load_ps(b.add(p * NR + 8)),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r < MR of `a` holds k floats.
            let av = unsafe { _mm256_broadcast_ss(&*a.add(r * lda + p)) };
            acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r < MR of `c` holds NR floats.
        unsafe {
            _mm256_storeu_ps(c.add(r * ldc), acc[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
        }
    }
}
