//! Counter-based normal random numbers: Philox4x32-10 and Box–Muller, with every step specified
//! so that a GPU kernel produces the same bits.
//!
//! Element `index` of the stream `(seed, stream)` is a pure function of those three numbers, so a
//! buffer can be filled in any order, by any number of threads or on a GPU, with identical
//! results. Recipe (all f32 operations are single IEEE-754 round-to-nearest operations, in the
//! order written, never contracted into FMAs — CUDA: `__fmul_rn`/`__fadd_rn`/`__fdiv_rn` or
//! `--fmad=false`; `sqrtf` and `/` must be the IEEE ones, which they are by default):
//!
//! 1. `pair = index >> 1`; key `k = [seed as u32, (seed >> 32) as u32]`; counter
//!    `c = [pair as u32, (pair >> 32) as u32, stream as u32, (stream >> 32) as u32]`.
//! 2. `[r0, r1, _, _] = philox4x32_10(c, k)` (Random123's Philox4x32 with 10 rounds; see
//!    [`philox4x32_10`]).
//! 3. `u1 = ((r0 >> 9) as f32 + 0.5) * 2^-23`, `u2` likewise from `r1`: exact values
//!    `(2m + 1)·2^-24` in (0, 1), never 0 (so the log is finite) and never 1. (Keeping 23 bits
//!    rather than 24 is what makes `+ 0.5` exact in f32.)
//! 4. `radius = sqrt(-2 * ln(u1))` with the `ln` below (`-2 * ln` is one multiply).
//! 5. `(s, c) = sincos(2π·u2)` with the reduction below.
//! 6. Even `index`: `radius * c`; odd `index`: `radius * s`.
//!
//! `ln(x)` (musl's `logf`, < 1 ulp): `ix = bits(x) + (0x3f800000 - 0x3f3504f3)`;
//! `k = (ix >> 23) as i32 - 0x7f`; `m = from_bits((ix & 0x007fffff) + 0x3f3504f3)` (so
//! m ∈ [√2/2, √2)); `f = m - 1`; `s = f / (2 + f)`; `z = s*s`; `w = z*z`;
//! `t1 = w*(LG2 + w*LG4)`; `t2 = z*(LG1 + w*LG3)`; `r = t2 + t1`; `hfsq = 0.5*f*f`
//! (`(0.5*f)*f`); `dk = k as f32`; result `s*(hfsq + r) + dk*LN2_LO - hfsq + f + dk*LN2_HI`
//! (left to right).
//!
//! `sincos(2π·u)` for u ∈ (0, 1): `q = round(4u)` (no ties are possible for our u), `r = u - q*0.25`
//! (exact), `x = r * TWO_PI` with `TWO_PI = 6.2831855f32`, `z = x*x`; then Cephes' minimax
//! polynomials on |x| ≤ π/4: `sin x = ((S3*z + S2)*z + S1)*z*x + x` and
//! `cos x = ((C3*z + C2)*z + C1)*z*z - 0.5*z + 1` (left to right: `(((C3*z + C2)*z + C1)*z)*z`,
//! minus `0.5*z`, plus 1); finally rotate by the quadrant `q mod 4`:
//! 0 → (sin x, cos x), 1 → (cos x, −sin x), 2 → (−sin x, −cos x), 3 → (−cos x, sin x).
//!
//! Constants (f32 bit patterns): LN2_HI `0x3f317180`, LN2_LO `0x3717f7d1`, LG1 `0x3f2aaaaa`,
//! LG2 `0x3eccce13`, LG3 `0x3e91e9ee`, LG4 `0x3e789e26`, TWO_PI `0x40c90fdb`, S1 `0xbe2aaaa3`,
//! S2 `0x3c08839e`, S3 `0xb94ca1f9`, C1 `0x3d2aaaa5`, C2 `0xbab6061a`, C3 `0x37ccf5ce`.
//!
//! The outputs are standard normal to within f32 accuracy; they are not torch's `randn` stream
//! (REFERENCE.md §6.7: parity runs inject torch's noise instead).

use rayon::prelude::*;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// 2^-23, the spacing of the 23-bit uniforms.
const TWO_POW_M23: f32 = 1.0 / 8_388_608.0;
// Constants as bit patterns (listed in the module doc), so that a mirror cannot mis-round them.
/// musl `logf` constants.
const LN2_HI: f32 = f32::from_bits(0x3f31_7180);
const LN2_LO: f32 = f32::from_bits(0x3717_f7d1);
const LG1: f32 = f32::from_bits(0x3f2a_aaaa);
const LG2: f32 = f32::from_bits(0x3ecc_ce13);
const LG3: f32 = f32::from_bits(0x3e91_e9ee);
const LG4: f32 = f32::from_bits(0x3e78_9e26);
/// 2π rounded to f32.
const TWO_PI: f32 = f32::from_bits(0x40c9_0fdb);
/// Cephes `sinf` / `cosf` minimax coefficients for |x| ≤ π/4.
const S1: f32 = f32::from_bits(0xbe2a_aaa3);
const S2: f32 = f32::from_bits(0x3c08_839e);
const S3: f32 = f32::from_bits(0xb94c_a1f9);
const C1: f32 = f32::from_bits(0x3d2a_aaa5);
const C2: f32 = f32::from_bits(0xbab6_061a);
const C3: f32 = f32::from_bits(0x37cc_f5ce);

/// Elements per rayon task in [`fill_normal`]: large enough to amortise scheduling, small
/// enough to balance a 3×256×256 buffer over a few cores. Even, so pairs never straddle tasks.
const CHUNK: usize = 16 * 1024;

/// SplitMix64 (Steele et al. 2014): a tiny seeded generator of independent-looking 64-bit
/// words, for deterministic weights and blur kernels (not the samplers' noise: Philox).
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// `len` values spread uniformly over [lo, hi) by a 64-bit LCG (Knuth's MMIX constants) from
/// state `seed`: cheap, deterministic data for tests, benchmarks and timing runs. Not for the
/// samplers' noise, which is Philox ([`fill_normal`]).
pub fn uniform_lcg(seed: u64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// The Philox4x32 block function with 10 rounds (Salmon et al. 2011, Random123): counter `ctr`,
/// key `key`, four output words.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// Both normals of pair `pair` (elements `2·pair` and `2·pair + 1`) of stream `(seed, stream)`.
pub fn normal_pair(seed: u64, stream: u64, pair: u64) -> [f32; 2] {
    let r = philox4x32_10(
        [
            pair as u32,
            (pair >> 32) as u32,
            stream as u32,
            (stream >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    let u1 = unit_open(r[0]);
    let u2 = unit_open(r[1]);
    let radius = (-2.0 * ln(u1)).sqrt();
    let (s, c) = sincos_2pi(u2);
    [radius * c, radius * s]
}

/// Element `index` of stream `(seed, stream)`.
pub fn normal(seed: u64, stream: u64, index: u64) -> f32 {
    normal_pair(seed, stream, index >> 1)[(index & 1) as usize]
}

/// Fills `out` with elements `0..out.len()` of stream `(seed, stream)`, in parallel; the result
/// does not depend on the number of threads.
pub fn fill_normal(seed: u64, stream: u64, out: &mut [f32]) {
    fill_normal_at(seed, stream, 0, out);
}

/// Fills `out` with elements `first..first + out.len()` of stream `(seed, stream)` (to draw part
/// of a larger tensor, e.g. one batch item).
pub fn fill_normal_at(seed: u64, stream: u64, first: u64, out: &mut [f32]) {
    // Align tasks to even element indices so each task computes whole pairs.
    let head = (first & 1) as usize;
    let (lead, rest) = out.split_at_mut(head.min(out.len()));
    if let Some(v) = lead.first_mut() {
        *v = normal(seed, stream, first);
    }
    // Indices wrap past u64::MAX rather than overflow: the stream is periodic there anyway.
    let base = first.wrapping_add(head as u64);
    rest.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let start = base.wrapping_add((ci * CHUNK) as u64);
            for (j, out) in chunk.chunks_mut(2).enumerate() {
                // Pair numbers of u64 indices live in 0..2^63: wrap there too.
                let pair = (start >> 1).wrapping_add(j as u64) & (u64::MAX >> 1);
                let z = normal_pair(seed, stream, pair);
                out.copy_from_slice(&z[..out.len()]);
            }
        });
}

/// A 32-bit word mapped to `(2m + 1)·2^-24` with `m = r >> 9`: exact, in (0, 1).
fn unit_open(r: u32) -> f32 {
    ((r >> 9) as f32 + 0.5) * TWO_POW_M23
}

/// Natural log of a positive normal f32 (musl's `logf` without its special cases, which the
/// uniforms never hit).
fn ln(x: f32) -> f32 {
    let ix = x.to_bits().wrapping_add(0x3f80_0000 - 0x3f35_04f3);
    let k = (ix >> 23) as i32 - 0x7f;
    let m = f32::from_bits((ix & 0x007f_ffff) + 0x3f35_04f3);
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * LG4);
    let t2 = z * (LG1 + w * LG3);
    let r = t2 + t1;
    let hfsq = 0.5 * f * f;
    let dk = k as f32;
    s * (hfsq + r) + dk * LN2_LO - hfsq + f + dk * LN2_HI
}

/// `(sin 2πu, cos 2πu)` for u ∈ (0, 1), by quadrant reduction (exact for our dyadic u) and
/// Cephes' polynomials on [−π/4, π/4].
fn sincos_2pi(u: f32) -> (f32, f32) {
    let q = (u * 4.0).round();
    let x = (u - q * 0.25) * TWO_PI;
    let z = x * x;
    let s = ((S3 * z + S2) * z + S1) * z * x + x;
    let c = ((C3 * z + C2) * z + C1) * z * z - 0.5 * z + 1.0;
    match (q as i32) & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_is_within_an_ulp_or_two() {
        let mut worst = 0.0f64;
        for i in 0..200_000u32 {
            let x = unit_open(i.wrapping_mul(2_654_435_761));
            let want = f64::from(x).ln();
            let err = (f64::from(ln(x)) - want).abs() / f64::from(f32::EPSILON) / want.abs();
            worst = worst.max(err);
        }
        assert!(worst < 2.0, "worst ln error {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn sincos_matches_f64_to_f32_accuracy() {
        let mut worst = 0.0f64;
        for i in 0..200_000u32 {
            let u = unit_open(i.wrapping_mul(2_654_435_761));
            let (s, c) = sincos_2pi(u);
            let a = 2.0 * std::f64::consts::PI * f64::from(u);
            worst = worst
                .max((f64::from(s) - a.sin()).abs())
                .max((f64::from(c) - a.cos()).abs());
        }
        assert!(worst < 3e-7, "worst sincos error {worst}");
    }

    #[test]
    fn uniforms_stay_inside_the_open_interval() {
        assert_eq!(unit_open(0), 2f32.powi(-24));
        assert_eq!(unit_open(u32::MAX), 1.0 - 2f32.powi(-24));
    }
}
