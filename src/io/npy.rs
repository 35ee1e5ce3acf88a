//! NumPy `.npy` files (format versions 1, 2 and 3): a magic string, a Python-literal header
//! `{'descr': ..., 'fortran_order': ..., 'shape': (...)}` and the raw array.
//!
//! Reading accepts little-endian (or single-byte) `f8 f4 f2 i8 i4 i2 i1 u8 u4 u2 u1 b1` and
//! converts to f32. Fortran-order arrays are transposed into the row-major order
//! [`Tensor`](crate::Tensor) uses, so the result has the array's logical shape and element
//! order either way. Big-endian, structured and object arrays are refused. Writing always produces version 1
//! (2 if the header needs it) `<f4` C-order files, which `numpy.load` reads directly.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::{arr, checked_numel, extend_strided_f32, Dtype};
use crate::{Error, Result, Tensor};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Reads the `.npy` file at `path` as an f32 tensor.
pub fn read(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path)
}

/// Parses `.npy` file contents; `path` only names the file in messages.
pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let bad = |msg: String| Error::format(path, msg);
    if !bytes.starts_with(MAGIC) {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    // Version 1 has a 16-bit header length, versions 2 and 3 a 32-bit one.
    let (header_start, header_len): (usize, Option<usize>) = match bytes.get(6..8) {
        Some(&[1, _]) => (
            10,
            bytes.get(8..10).map(|b| u16::from_le_bytes(arr(b)).into()),
        ),
        Some(&[2 | 3, _]) => (
            12,
            bytes
                .get(8..12)
                .and_then(|b| usize::try_from(u32::from_le_bytes(arr(b))).ok()),
        ),
        Some(&[major, minor]) => {
            return Err(bad(format!(
                "unsupported .npy format version {major}.{minor} (1, 2 and 3 are read)"
            )))
        }
        _ => (0, None),
    };
    let header_end = header_len
        .and_then(|n| header_start.checked_add(n))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "truncated: the header does not fit the {} bytes of the file",
                bytes.len()
            ))
        })?;
    let header = std::str::from_utf8(&bytes[header_start..header_end])
        .map_err(|_| bad("header is not text".into()))?;
    let header = Header::parse(header).map_err(|e| bad(format!("header {header:?}: {e}")))?;

    let dtype = npy_dtype(&header.descr).map_err(bad)?;
    let data = &bytes[header_end..];
    let needed = checked_numel(&header.shape).and_then(|n| n.checked_mul(dtype.size()));
    if needed != Some(data.len()) {
        return Err(bad(format!(
            "shape {:?} of {} needs {} bytes of data but the file has {}",
            header.shape,
            header.descr,
            needed.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
            data.len()
        )));
    }
    let mut values = Vec::with_capacity(data.len() / dtype.size());
    if header.fortran_order {
        // Column-major: the first index varies fastest.
        let strides: Vec<usize> = header
            .shape
            .iter()
            .scan(1usize, |acc, &n| {
                let s = *acc;
                *acc = acc.saturating_mul(n);
                Some(s)
            })
            .collect();
        extend_strided_f32(dtype, data, 0, &header.shape, &strides, &mut values)
            .ok_or_else(|| bad("Fortran-order data out of range".into()))?;
    } else {
        dtype.extend_f32(data, &mut values);
    }
    Tensor::new(header.shape, values)
}

/// Maps a NumPy type string to a dtype; `|` marks single-byte types, `<` little-endian ones.
fn npy_dtype(descr: &str) -> std::result::Result<Dtype, String> {
    let (order, kind) = descr.split_at_checked(1).unwrap_or(("", descr));
    let dtype = match kind {
        "f8" => Dtype::F64,
        "f4" => Dtype::F32,
        "f2" => Dtype::F16,
        "i8" => Dtype::I64,
        "i4" => Dtype::I32,
        "i2" => Dtype::I16,
        "i1" => Dtype::I8,
        "u8" => Dtype::U64,
        "u4" => Dtype::U32,
        "u2" => Dtype::U16,
        "u1" => Dtype::U8,
        "b1" => Dtype::Bool,
        _ => return Err(format!("unsupported dtype {descr:?}")),
    };
    match order {
        "<" | "|" => Ok(dtype),
        ">" if dtype.size() == 1 => Ok(dtype),
        ">" => Err(format!(
            "big-endian dtype {descr:?} is not supported; save a little-endian array"
        )),
        _ => Err(format!("unsupported dtype {descr:?}")),
    }
}

/// The three keys of a `.npy` header.
#[derive(Debug)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value of the header's Python dict literal.
enum Literal {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

impl Header {
    /// Parses the dict literal `numpy.save` writes; only the subset it emits is accepted.
    fn parse(text: &str) -> std::result::Result<Header, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        p.expect(b'{')?;
        while !p.eat(b'}') {
            let key = p.string()?;
            p.expect(b':')?;
            let value = p.literal()?;
            match (key.as_str(), value) {
                ("descr", Literal::Str(s)) => descr = Some(s),
                ("fortran_order", Literal::Bool(b)) => fortran_order = Some(b),
                ("shape", Literal::Tuple(t)) => shape = Some(t),
                (key, _) => return Err(format!("unexpected key or value for `{key}`")),
            }
            if !p.eat(b',') {
                p.expect(b'}')?;
                break;
            }
        }
        p.skip_ws();
        if p.i != p.s.len() {
            return Err("text after the dict".into());
        }
        Ok(Header {
            descr: descr.ok_or("no `descr`")?,
            fortran_order: fortran_order.ok_or("no `fortran_order`")?,
            shape: shape.ok_or("no `shape`")?,
        })
    }
}

struct Parser<'s> {
    s: &'s [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    /// Consumes `c` (after whitespace) if it comes next.
    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        let found = self.s.get(self.i) == Some(&c);
        self.i += usize::from(found);
        found
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.i))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        self.skip_ws();
        let quote = *self
            .s
            .get(self.i)
            .filter(|&&q| q == b'\'' || q == b'"')
            .ok_or_else(|| format!("expected a string at byte {}", self.i))?;
        let rest = &self.s[self.i + 1..];
        let n = rest
            .iter()
            .position(|&c| c == quote)
            .ok_or("unterminated string")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "string is not UTF-8")?;
        self.i += n + 2;
        Ok(s.to_string())
    }

    fn literal(&mut self) -> std::result::Result<Literal, String> {
        self.skip_ws();
        let rest = &self.s[self.i.min(self.s.len())..];
        if rest.starts_with(b"True") || rest.starts_with(b"False") {
            let value = rest[0] == b'T';
            self.i += if value { 4 } else { 5 };
            return Ok(Literal::Bool(value));
        }
        if self.eat(b'(') {
            let mut dims = Vec::new();
            while !self.eat(b')') {
                dims.push(self.integer()?);
                // Python allows a trailing comma, and requires one in a 1-tuple.
                if !self.eat(b',') {
                    self.expect(b')')?;
                    break;
                }
            }
            return Ok(Literal::Tuple(dims));
        }
        if rest.first() == Some(&b'[') {
            return Err("structured arrays are not supported".into());
        }
        self.string().map(Literal::Str)
    }

    fn integer(&mut self) -> std::result::Result<usize, String> {
        self.skip_ws();
        let start = self.i;
        while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default();
        let n = digits
            .parse()
            .map_err(|_| format!("expected a dimension at byte {start}"))?;
        // Python 2 wrote long integers with an `L` suffix.
        self.i += usize::from(self.s.get(self.i) == Some(&b'L'));
        Ok(n)
    }
}

/// Writes `tensor` as a C-order `<f4` `.npy` file.
pub fn write(path: &Path, tensor: &Tensor) -> Result<()> {
    let shape = match tensor.shape() {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // NumPy pads the header with spaces and a newline so the data starts 64-byte aligned;
    // version 1 (10-byte preamble) unless the padded header overflows its 16-bit length.
    let padded = |preamble: usize| (preamble + header.len() + 1).div_ceil(64) * 64 - preamble;
    let preamble = if padded(10) <= usize::from(u16::MAX) {
        10
    } else {
        12
    };
    let pad = padded(preamble) - header.len() - 1;
    header.push_str(&" ".repeat(pad));
    header.push('\n');

    let write_all = |w: &mut BufWriter<File>| -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        if preamble == 10 {
            w.write_all(&[1, 0])?;
            w.write_all(&(header.len() as u16).to_le_bytes())?;
        } else {
            w.write_all(&[2, 0])?;
            w.write_all(&(header.len() as u32).to_le_bytes())?;
        }
        w.write_all(header.as_bytes())?;
        if cfg!(target_endian = "little") {
            w.write_all(bytemuck::cast_slice(tensor.data()))?;
        } else {
            for v in tensor.data() {
                w.write_all(&v.to_le_bytes())?;
            }
        }
        Ok(())
    };
    super::write_whole(path, |w| write_all(w).map_err(|e| Error::io(path, e)))
}
