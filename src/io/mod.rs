//! File formats: safetensors, PyTorch `.bin`, `.npy` and images.
//!
//! Every reader takes the whole file as bytes and validates each length, offset and count
//! against it before slicing or allocating, so a truncated or hostile file yields an
//! [`Error::Format`] naming the file and the problem, never a panic or
//! an unbounded allocation. Each reader has a `from_bytes`-style entry point taking a display
//! path, which the file-based functions call and the fuzz targets drive directly.

/// PNG and JPEG images, and blur kernels from images or tensor files.
pub mod image;
/// `.npy` arrays (NumPy's own format), read into and written from f32 tensors.
pub mod npy;
/// safetensors files: the format diffusers prefers, read with every dtype converted to f32.
pub mod safetensors;
/// PyTorch `.bin` checkpoints (`torch.save` zip format), read without executing any pickle code.
pub mod torch_bin;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::{Error, Result};

/// Writes a file whole or not at all: `fill` writes `<path>.part` in the same folder, which is
/// renamed onto `path` once complete (and removed if `fill` fails). A process killed mid-write,
/// at a job's time limit say, so leaves no truncated file where a finished one is expected;
/// `restore --skip-existing` takes an existing output as done.
fn write_whole(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    let part: PathBuf = path.with_file_name(name);
    let file = File::create(&part).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::new(file);
    let filled = fill(&mut w).and_then(|()| w.flush().map_err(|e| Error::io(path, e)));
    drop(w);
    if let Err(e) = filled {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, path).map_err(|e| Error::io(path, e))
}

/// Element types the readers understand, shared by the three formats so that each converts to
/// f32 through the same code (and the same rounding) whatever file the tensor came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

/// Decodes one little-endian element of some dtype.
type Decode = fn(&[u8]) -> f32;

impl Dtype {
    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// The safetensors spelling, also used in messages about the other formats.
    fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U64 => "U64",
            Dtype::U32 => "U32",
            Dtype::U16 => "U16",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    /// The per-element decoder, for strided reads where elements are not contiguous.
    fn decoder(self) -> Decode {
        match self {
            Dtype::F64 => dec_f64,
            Dtype::F32 => dec_f32,
            Dtype::F16 => dec_f16,
            Dtype::BF16 => dec_bf16,
            Dtype::I64 => |c| i64::from_le_bytes(arr(c)) as f32,
            Dtype::I32 => |c| i32::from_le_bytes(arr(c)) as f32,
            Dtype::I16 => |c| i16::from_le_bytes(arr(c)) as f32,
            Dtype::I8 => |c| i8::from_le_bytes(arr(c)) as f32,
            Dtype::U64 => |c| u64::from_le_bytes(arr(c)) as f32,
            Dtype::U32 => |c| u32::from_le_bytes(arr(c)) as f32,
            Dtype::U16 => |c| u16::from_le_bytes(arr(c)) as f32,
            Dtype::U8 => |c| c[0] as f32,
            Dtype::Bool => |c| (c[0] != 0) as u8 as f32,
        }
    }

    /// Appends the elements of `bytes` (a whole number of elements, little-endian) as f32.
    fn extend_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Dtype::F64 => out.extend(bytes.chunks_exact(8).map(dec_f64)),
            Dtype::F32 => out.extend(bytes.chunks_exact(4).map(dec_f32)),
            Dtype::F16 => out.extend(bytes.chunks_exact(2).map(dec_f16)),
            Dtype::BF16 => out.extend(bytes.chunks_exact(2).map(dec_bf16)),
            // The rarer dtypes go through the per-element decoder; they are never bulk weights.
            other => {
                let f = other.decoder();
                out.extend(bytes.chunks_exact(other.size()).map(f));
            }
        }
    }

    /// One element as an exact integer: integer dtypes always (unless a u64 overflows i64),
    /// float dtypes only when the value is integral, so that a timestep stored as a float is
    /// accepted but 0.5 is not silently truncated.
    fn exact_i64(self, c: &[u8]) -> Option<i64> {
        match self {
            Dtype::I64 => Some(i64::from_le_bytes(arr(c))),
            Dtype::I32 => Some(i32::from_le_bytes(arr(c)).into()),
            Dtype::I16 => Some(i16::from_le_bytes(arr(c)).into()),
            Dtype::I8 => Some(i8::from_le_bytes(arr(c)).into()),
            Dtype::U64 => i64::try_from(u64::from_le_bytes(arr(c))).ok(),
            Dtype::U32 => Some(u32::from_le_bytes(arr(c)).into()),
            Dtype::U16 => Some(u16::from_le_bytes(arr(c)).into()),
            Dtype::U8 => Some(c[0].into()),
            Dtype::Bool => Some((c[0] != 0).into()),
            Dtype::F64 => integral(f64::from_le_bytes(arr(c))),
            Dtype::F32 => integral(f32::from_le_bytes(arr(c)).into()),
            Dtype::F16 => integral(f16::from_le_bytes(arr(c)).to_f64()),
            Dtype::BF16 => integral(bf16::from_le_bytes(arr(c)).to_f64()),
        }
    }
}

fn dec_f64(c: &[u8]) -> f32 {
    f64::from_le_bytes(arr(c)) as f32
}

fn dec_f32(c: &[u8]) -> f32 {
    f32::from_le_bytes(arr(c))
}

fn dec_f16(c: &[u8]) -> f32 {
    f16::from_le_bytes(arr(c)).to_f32()
}

fn dec_bf16(c: &[u8]) -> f32 {
    bf16::from_le_bytes(arr(c)).to_f32()
}

/// `v` as an i64 if it is a whole number inside i64's range.
fn integral(v: f64) -> Option<i64> {
    // -2^63 is in range, 2^63 is not: a half-open range.
    let limit = 2f64.powi(63);
    (v.fract() == 0.0 && (-limit..limit).contains(&v)).then_some(v as i64)
}

/// The first `N` bytes of `c` as an array. Callers pass `chunks_exact(N)` chunks or slices
/// they have bounds-checked, so the length always matches.
fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&c[..N]);
    a
}

/// The product of a shape's dimensions, or `None` if it overflows `usize`.
fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Appends, in row-major order, the elements of the strided view (`offset`, `shape` and
/// `strides` counted in elements) of the little-endian array `bytes`. This is how PyTorch's
/// non-contiguous tensors and NumPy's Fortran-order arrays are materialised. Callers check
/// the view's reach beforehand; an element out of range anyway gives `None`, never a panic.
fn extend_strided_f32(
    dtype: Dtype,
    bytes: &[u8],
    offset: usize,
    shape: &[usize],
    strides: &[usize],
    out: &mut Vec<f32>,
) -> Option<()> {
    if strides.len() != shape.len() {
        return None;
    }
    let numel = checked_numel(shape)?;
    let (size, decode) = (dtype.size(), dtype.decoder());
    let mut index = vec![0usize; shape.len()];
    let mut pos = offset;
    for _ in 0..numel {
        let start = pos.checked_mul(size)?;
        out.push(decode(bytes.get(start..start.checked_add(size)?)?));
        // Odometer step. Wrapping arithmetic is exact here: the position may pass the last
        // element by one stride before being wound back, and ends in range whenever it is read.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            pos = pos.wrapping_add(strides[d]);
            if index[d] < shape[d] {
                break;
            }
            pos = pos.wrapping_sub(strides[d].wrapping_mul(shape[d]));
            index[d] = 0;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails part-way leaves what was at the path (here a finished file) as it
    /// was, and no `.part` file; one that succeeds replaces it.
    #[test]
    fn files_are_written_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("invdiff-io-whole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, part) = (dir.join("x.png"), dir.join("x.png.part"));
        std::fs::write(&path, b"finished").unwrap();
        let failed = write_whole(&path, |w| {
            w.write_all(b"half").unwrap();
            Err(Error::input("cut short"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"finished");
        assert!(!part.exists());
        write_whole(&path, |w| {
            w.write_all(b"new").map_err(|e| Error::io(&path, e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!part.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
