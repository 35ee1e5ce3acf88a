//! safetensors: an 8-byte little-endian header length, a JSON header mapping each tensor name
//! to its dtype, shape and byte range, then the raw little-endian data.
//!
//! The parser is our own (on `serde_json`) rather than the `safetensors` crate's, so that each
//! malformed case gets a message naming the tensor and the numbers involved. It accepts what
//! that crate accepts: byte ranges must tile the data section exactly, with no overlap, hole
//! or trailing byte.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{checked_numel, Dtype};
use crate::{Error, Result, Tensor};

/// The key safetensors reserves for the free-form string metadata.
const METADATA_KEY: &str = "__metadata__";

/// A safetensors file held in memory with its header validated; tensors are converted to f32
/// only when asked for, so reading a file and taking a few tensors costs one copy of those.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    entries: BTreeMap<String, Entry>,
    metadata: Option<HashMap<String, String>>,
}

/// One tensor's header entry, with its byte range made absolute within the file.
#[derive(Debug)]
struct Entry {
    dtype: Dtype,
    /// The dtype as the file spells it, for `dtype_name`.
    dtype_name: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Reads and validates the safetensors file at `path`.
pub fn read(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(bytes, path)
}

/// Validates the safetensors file contents `bytes`; `path` only names the file in messages.
pub fn from_bytes(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    let bad = |msg: String| Error::format(path, msg);
    let len = bytes.len();
    let Some(&len_bytes) = bytes.first_chunk::<8>() else {
        return Err(bad(format!(
            "truncated: {len} bytes, too short for the 8-byte header length of a safetensors file"
        )));
    };
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = match usize::try_from(header_len).ok().and_then(|n| n.checked_add(8)) {
        Some(end) if end <= len => end,
        _ => {
            return Err(bad(format!(
                "header length {header_len} is larger than the file ({len} bytes): truncated or not a safetensors file"
            )))
        }
    };
    let header = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| bad(format!("header is not valid UTF-8: {e}")))?;
    let header: Value =
        serde_json::from_str(header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(header) = header else {
        return Err(bad("header is not a JSON object".into()));
    };

    let data_len = len - data_start;
    let mut entries = BTreeMap::new();
    let mut metadata = None;
    for (name, value) in header {
        if name == METADATA_KEY {
            metadata = Some(parse_metadata(value).map_err(bad)?);
        } else {
            let entry = parse_entry(&name, value, data_start, data_len).map_err(bad)?;
            entries.insert(name, entry);
        }
    }
    check_tiling(&entries, data_start, len).map_err(bad)?;
    Ok(TensorFile {
        path: path.to_path_buf(),
        bytes,
        entries,
        metadata,
    })
}

fn parse_metadata(value: Value) -> std::result::Result<HashMap<String, String>, String> {
    let not_strings = || format!("`{METADATA_KEY}` must map strings to strings");
    let Value::Object(map) = value else {
        return Err(not_strings());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(not_strings()),
        })
        .collect()
}

/// Validates one header entry against the data section (`data_len` bytes from `data_start`).
fn parse_entry(
    name: &str,
    value: Value,
    data_start: usize,
    data_len: usize,
) -> std::result::Result<Entry, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "tensor `{name}`: header entry is not a JSON object"
        ));
    };
    let field = |key: &str| {
        map.get(key)
            .ok_or_else(|| format!("tensor `{name}`: header entry has no `{key}`"))
    };
    let dtype_name = field("dtype")?
        .as_str()
        .ok_or_else(|| format!("tensor `{name}`: `dtype` is not a string"))?;
    let dtype = parse_dtype(dtype_name).ok_or_else(|| {
        format!(
            "tensor `{name}`: unsupported dtype {dtype_name} (invdiff reads F64, F32, F16, BF16, \
             I64, I32, I16, I8, U64, U32, U16, U8 and BOOL)"
        )
    })?;
    let shape = usizes(field("shape")?)
        .ok_or_else(|| format!("tensor `{name}`: `shape` is not a list of sizes"))?;
    let offsets = usizes(field("data_offsets")?);
    let Some(&[begin, end]) = offsets.as_deref() else {
        return Err(format!(
            "tensor `{name}`: `data_offsets` is not a pair of byte offsets"
        ));
    };
    if begin > end || end > data_len {
        return Err(format!(
            "tensor `{name}`: data_offsets [{begin}, {end}] out of range (the data section is {data_len} bytes)"
        ));
    }
    let nbytes = checked_numel(&shape).and_then(|n| n.checked_mul(dtype.size()));
    if nbytes != Some(end - begin) {
        return Err(format!(
            "tensor `{name}`: shape {shape:?} of {dtype_name} needs {} bytes but data_offsets [{begin}, {end}] span {}",
            nbytes.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
            end - begin
        ));
    }
    Ok(Entry {
        dtype,
        dtype_name: dtype_name.to_string(),
        shape,
        start: data_start + begin,
        end: data_start + end,
    })
}

fn parse_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "F64" => Dtype::F64,
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I64" => Dtype::I64,
        "I32" => Dtype::I32,
        "I16" => Dtype::I16,
        "I8" => Dtype::I8,
        "U64" => Dtype::U64,
        "U32" => Dtype::U32,
        "U16" => Dtype::U16,
        "U8" => Dtype::U8,
        "BOOL" => Dtype::Bool,
        _ => return None,
    })
}

/// A JSON array of non-negative integers that fit `usize`.
fn usizes(value: &Value) -> Option<Vec<usize>> {
    value
        .as_array()?
        .iter()
        .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
        .collect()
}

/// Checks that the tensors' byte ranges cover `data_start..file_len` exactly once, the
/// format's rule, which also guarantees no two tensors alias the same bytes.
fn check_tiling(
    entries: &BTreeMap<String, Entry>,
    data_start: usize,
    file_len: usize,
) -> std::result::Result<(), String> {
    let mut ranges: Vec<(usize, usize, &str)> = entries
        .iter()
        .map(|(name, e)| (e.start, e.end, name.as_str()))
        .collect();
    ranges.sort_unstable();
    let mut covered = data_start;
    let mut last = None;
    for (start, end, name) in ranges {
        let rel = |o: usize| o - data_start;
        if start < covered {
            return Err(format!(
                "tensors `{}` and `{name}` overlap (data_offsets end at {} but the next begin at {})",
                last.unwrap_or(name),
                rel(covered),
                rel(start)
            ));
        }
        if start > covered {
            return Err(format!(
                "bytes {}..{} of the data section belong to no tensor",
                rel(covered),
                rel(start)
            ));
        }
        covered = end;
        last = Some(name);
    }
    if covered < file_len {
        return Err(format!(
            "{} bytes after the last tensor's data belong to no tensor",
            file_len - covered
        ));
    }
    Ok(())
}

impl TensorFile {
    /// The file this was read from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The dtype of tensor `name` as the file spells it (`"F32"`, `"BF16"`...), if present.
    pub fn dtype_name(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(|e| e.dtype_name.as_str())
    }

    /// The `__metadata__` string map, if the file has one.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Tensor `name` converted to f32 (integers and halves exactly, f64 rounded).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let bytes = &self.bytes[e.start..e.end];
        let mut data = Vec::with_capacity(bytes.len() / e.dtype.size());
        e.dtype.extend_f32(bytes, &mut data);
        Tensor::new(e.shape.clone(), data)
    }

    /// Tensor `name` as exact integers, flattened: integer dtypes as they are, float dtypes
    /// only if every value is integral (a timestep saved as a float), otherwise an error.
    pub fn get_i64(&self, name: &str) -> Result<Vec<i64>> {
        let e = self.entry(name)?;
        self.bytes[e.start..e.end]
            .chunks_exact(e.dtype.size())
            .enumerate()
            .map(|(i, c)| {
                e.dtype.exact_i64(c).ok_or_else(|| {
                    Error::format(
                        &self.path,
                        format!(
                            "tensor `{name}` ({}): element {i} is not an integer in i64's range",
                            e.dtype_name
                        ),
                    )
                })
            })
            .collect()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            Error::weights(
                &self.path,
                format!(
                    "no tensor `{name}` in this file of {} tensors; closest names: {}",
                    self.entries.len(),
                    closest_names(self.entries.keys(), name).join(", ")
                ),
            )
        })
    }
}

/// Up to five names sharing the longest prefix with `wanted`, which is what tells a renamed
/// layer (`to_q` vs `query`) from a missing one.
fn closest_names<'a>(names: impl Iterator<Item = &'a String>, wanted: &str) -> Vec<&'a str> {
    let common = |n: &str| {
        n.bytes()
            .zip(wanted.bytes())
            .take_while(|(a, b)| a == b)
            .count()
    };
    let mut scored: Vec<(usize, &str)> = names.map(|n| (common(n), n.as_str())).collect();
    // Longest common prefix first, then alphabetical: stable, readable suggestions.
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    scored.into_iter().take(5).map(|(_, n)| n).collect()
}

/// What [`write_tensors`] can store: f32 tensors, and integer tensors such as a timestep.
#[derive(Clone, Copy, Debug)]
pub enum WriteTensor<'a> {
    /// Stored as F32.
    F32(&'a Tensor),
    /// Stored as I64, row-major `values` of the given `shape`.
    I64 {
        /// The tensor's shape; its product must equal `values.len()`.
        shape: &'a [usize],
        /// The elements, row-major.
        values: &'a [i64],
    },
}

impl WriteTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            WriteTensor::F32(_) => Dtype::F32,
            WriteTensor::I64 { .. } => Dtype::I64,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            WriteTensor::F32(t) => t.shape(),
            WriteTensor::I64 { shape, .. } => shape,
        }
    }

    fn numel(&self) -> usize {
        match self {
            WriteTensor::F32(t) => t.numel(),
            WriteTensor::I64 { values, .. } => values.len(),
        }
    }

    fn write_data(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            WriteTensor::F32(t) => write_le(w, t.data(), |v| v.to_le_bytes()),
            WriteTensor::I64 { values, .. } => write_le(w, values, |v| v.to_le_bytes()),
        }
    }
}

/// Writes `values` little-endian: straight from memory on little-endian hosts (one copy of a
/// large tensor is what makes saving as fast as the disk), element by element otherwise.
fn write_le<T: bytemuck::Pod, const N: usize>(
    w: &mut impl Write,
    values: &[T],
    le: impl Fn(&T) -> [u8; N],
) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        w.write_all(bytemuck::cast_slice(values))
    } else {
        values.iter().try_for_each(|v| w.write_all(&le(v)))
    }
}

/// Writes f32 tensors to a safetensors file, with optional string metadata.
pub fn write(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let tensors: Vec<_> = tensors
        .iter()
        .map(|&(name, t)| (name, WriteTensor::F32(t)))
        .collect();
    write_tensors(path, &tensors, metadata)
}

/// Writes tensors of mixed dtypes to a safetensors file, with optional string metadata.
///
/// Wider dtypes are laid out first so that every tensor is aligned to its element size, which
/// zero-copy readers (mmap in PyTorch) rely on.
pub fn write_tensors(
    path: &Path,
    tensors: &[(&str, WriteTensor<'_>)],
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let mut order: Vec<&(&str, WriteTensor<'_>)> = tensors.iter().collect();
    order.sort_by(|a, b| {
        b.1.dtype()
            .size()
            .cmp(&a.1.dtype().size())
            .then(a.0.cmp(b.0))
    });

    let mut header = Map::new();
    if let Some(meta) = metadata {
        header.insert(METADATA_KEY.into(), json!(meta));
    }
    let mut offset = 0usize;
    for (name, t) in &order {
        if *name == METADATA_KEY || header.contains_key(*name) {
            return Err(Error::input(format!(
                "{}: cannot write two tensors named `{name}` (or one named `{METADATA_KEY}`)",
                path.display()
            )));
        }
        if checked_numel(t.shape()) != Some(t.numel()) {
            return Err(Error::input(format!(
                "{}: tensor `{name}` has shape {:?} but {} values",
                path.display(),
                t.shape(),
                t.numel()
            )));
        }
        let end = offset + t.numel() * t.dtype().size();
        header.insert(
            (*name).to_string(),
            json!({"dtype": t.dtype().name(), "shape": t.shape(), "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_string(&header)
        .map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
    // Pad with spaces (valid JSON whitespace) so the data section starts 8-byte aligned.
    header.push_str(&" ".repeat((8 - header.len() % 8) % 8));

    super::write_whole(path, |w| {
        let write_all = |w: &mut BufWriter<File>| -> std::io::Result<()> {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(header.as_bytes())?;
            for (_, t) in &order {
                t.write_data(w)?;
            }
            Ok(())
        };
        write_all(w).map_err(|e| Error::io(path, e))
    })
}
