//! PyTorch checkpoints written by `torch.save` (PyTorch >= 1.6): a zip archive holding
//! `<prefix>/data.pkl`, the pickled object, and one `<prefix>/data/<key>` record per storage.
//!
//! The pickle is never executed. A small stack machine interprets the opcodes `torch.save`
//! emits and recognises a fixed set of globals by name (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the typed storage
//! classes); any other global is refused before anything else happens, so a hostile file can
//! at worst produce an error. Tensors are materialised from their storages with offset, shape
//! and strides, so views, shared storages and non-contiguous tensors come out as PyTorch sees
//! them, converted to f32.
//!
//! Every length, offset and count is checked against the file before use, the machine holds
//! at most a few objects per pickle byte, and the tensors produced may not expand to more than
//! a small multiple of the file size (`MAX_EXPANSION`), so a malformed file costs bounded
//! time and memory.

use std::collections::HashMap;
use std::path::Path;

use super::{checked_numel, extend_strided_f32, Dtype};
use crate::{Error, Result, Tensor};

/// The most f32 values the tensors of a file may expand to, per byte of file (plus a fixed
/// allowance). Views of one storage and stride-0 broadcasts legitimately produce more values
/// than the file holds, but a tiny file claiming a huge broadcast tensor must not make us
/// allocate gigabytes.
const MAX_EXPANSION: usize = 2;
const EXPANSION_ALLOWANCE: usize = 1 << 24;

/// The most objects, stack slots, marks and memo entries the pickle machine may hold at once:
/// a state dict needs about fifteen per tensor, so this allows some 250,000 tensors while
/// keeping a hostile pickle's memory use to a few hundred MiB.
const MAX_PICKLE_ITEMS: usize = 1 << 22;

/// Reads every tensor of the state dict saved at `path`, in the order they were pickled.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path)
}

/// Reads every tensor of the state dict whose file contents are `bytes`; `path` only names the
/// file in messages.
///
/// The pickled object must be a dict (or `OrderedDict`) whose tensor values are returned
/// (non-tensor values such as an epoch counter are skipped), or, if it holds no tensor, a dict
/// with such a dict under `state_dict`, `model` or `module`, the usual training-checkpoint
/// layouts.
pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let bad = |msg: String| Error::format(path, msg);
    let archive = Archive::open(bytes).map_err(bad)?;
    let mut vm = Machine::new(&archive);
    let root = vm
        .run(archive.pickle)
        .map_err(|e| bad(format!("data.pkl: {e}")))?;
    let items = vm.state_dict(root).map_err(bad)?;

    let mut budget = bytes
        .len()
        .saturating_mul(MAX_EXPANSION)
        .saturating_add(EXPANSION_ALLOWANCE);
    let mut out = Vec::with_capacity(items.len());
    for (name, tensor) in items {
        let t = vm
            .materialise(tensor, &mut budget)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        out.push((name, t));
    }
    Ok(out)
}

type Msg<T> = std::result::Result<T, String>;

// ---------------------------------------------------------------------------------------------
// Zip container
// ---------------------------------------------------------------------------------------------

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD_LEN: usize = 22;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;

/// The parts of a torch zip archive the reader needs, borrowed from the file bytes.
struct Archive<'a> {
    pickle: &'a [u8],
    /// Storage records by key (`<prefix>/data/<key>`).
    storages: HashMap<&'a str, &'a [u8]>,
}

impl<'a> Archive<'a> {
    fn open(bytes: &'a [u8]) -> Msg<Self> {
        if !bytes.starts_with(b"PK") {
            // Pre-1.6 torch.save wrote a bare pickle stream (protocol 2 starts with 0x80) or a
            // tar archive; both need arbitrary unpickling we do not do.
            let legacy = bytes.first() == Some(&0x80) || bytes.get(257..262) == Some(&b"ustar"[..]);
            return Err(if legacy {
                "legacy torch.save format (before PyTorch 1.6); re-save it with torch>=1.6".into()
            } else {
                "not a zip archive, so not a PyTorch checkpoint (torch.save writes zip archives since PyTorch 1.6)".into()
            });
        }
        let entries = zip_entries(bytes)?;
        let (prefix, pickle) = entries
            .iter()
            .find_map(|&(name, data)| {
                let prefix = name.strip_suffix("/data.pkl")?;
                (!prefix.contains('/')).then_some((prefix, data))
            })
            .ok_or("zip archive has no `<name>/data.pkl` record: not a torch.save checkpoint")?;
        let byteorder = format!("{prefix}/byteorder");
        if let Some(&(_, order)) = entries.iter().find(|(n, _)| *n == byteorder) {
            if order != b"little" {
                return Err(format!(
                    "byteorder record says {:?}; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&order[..order.len().min(16)])
                ));
            }
        }
        let data_dir = format!("{prefix}/data/");
        let storages = entries
            .iter()
            .filter_map(|&(name, data)| Some((name.strip_prefix(data_dir.as_str())?, data)))
            .collect();
        Ok(Archive { pickle, storages })
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(*b.get(at..)?.first_chunk()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*b.get(at..)?.first_chunk()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(*b.get(at..)?.first_chunk()?))
}

/// A zip offset or size as `usize`, `None` if it does not fit (it then exceeds the file).
fn size(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

/// The (name, data) of every entry, from the central directory. Only stored (uncompressed)
/// entries are accepted: `torch.save` never compresses, and storages must be read in place.
/// CRCs are not verified: torch does not verify them either, and truncation is caught by the
/// bounds checks.
fn zip_entries(bytes: &[u8]) -> Msg<Vec<(&str, &[u8])>> {
    let truncated = |what: &str| format!("truncated or corrupt zip archive: {what}");
    let len = bytes.len();
    // The end-of-central-directory record is the last 22 bytes, unless a comment (at most
    // 65535 bytes) follows it; scan back for a signature whose comment length fits.
    let eocd = (0..=len.saturating_sub(EOCD_LEN))
        .rev()
        .take(1 << 16)
        .find(|&at| {
            u32_at(bytes, at) == Some(EOCD_SIG)
                && u16_at(bytes, at + 20).is_some_and(|c| at + EOCD_LEN + usize::from(c) == len)
        })
        .ok_or_else(|| truncated("no end-of-central-directory record"))?;
    let field16 = |at| u16_at(bytes, eocd + at).map(u64::from).unwrap_or(0);
    let field32 = |at| u32_at(bytes, eocd + at).map(u64::from).unwrap_or(0);
    let (mut count, mut cd_size, mut cd_offset) = (field16(10), field32(12), field32(16));

    // Zip64: torch always writes the zip64 end records; their fields supersede the 16/32-bit
    // ones, which saturate for archives over 4 GiB.
    if eocd >= 20 && u32_at(bytes, eocd - 20) == Some(EOCD64_LOCATOR_SIG) {
        let at = u64_at(bytes, eocd - 12)
            .and_then(size)
            .filter(|&at| u32_at(bytes, at) == Some(EOCD64_SIG))
            .ok_or_else(|| truncated("zip64 end record missing"))?;
        let field = |off| u64_at(bytes, at + off).ok_or_else(|| truncated("zip64 end record"));
        (count, cd_size, cd_offset) = (field(32)?, field(40)?, field(48)?);
    }
    let cd_start = size(cd_offset)
        .filter(|&o| o <= len)
        .ok_or_else(|| truncated("central directory offset past the end"))?;
    let cd_end = size(cd_size)
        .and_then(|s| cd_start.checked_add(s))
        .filter(|&e| e <= len)
        .ok_or_else(|| truncated("central directory past the end"))?;
    if count > ((cd_end - cd_start) / CENTRAL_LEN) as u64 {
        return Err(truncated(&format!(
            "{count} entries cannot fit a {cd_size}-byte central directory"
        )));
    }

    let mut entries = Vec::with_capacity(count as usize);
    let mut at = cd_start;
    for _ in 0..count {
        let header = bytes
            .get(at..cd_end)
            .filter(|h| h.len() >= CENTRAL_LEN && u32_at(h, 0) == Some(CENTRAL_SIG))
            .ok_or_else(|| truncated("bad central directory entry"))?;
        let h16 = |o| u16_at(header, o).map_or(0, usize::from);
        let h32 = |o| u32_at(header, o).unwrap_or(0);
        let (flags, method) = (h16(8), h16(10));
        let (name_len, extra_len, comment_len) = (h16(28), h16(30), h16(32));
        let name = header
            .get(CENTRAL_LEN..CENTRAL_LEN + name_len)
            .ok_or_else(|| truncated("entry name past the central directory"))?;
        let name = std::str::from_utf8(name).map_err(|_| truncated("entry name is not UTF-8"))?;
        let extra = header
            .get(CENTRAL_LEN + name_len..CENTRAL_LEN + name_len + extra_len)
            .ok_or_else(|| truncated("entry extra field past the central directory"))?;
        let (mut stored, mut csize, mut local) =
            (u64::from(h32(24)), u64::from(h32(20)), u64::from(h32(42)));
        zip64_extra(extra, &mut stored, &mut csize, &mut local)
            .ok_or_else(|| truncated(&format!("entry `{name}`: bad zip64 extra field")))?;

        if flags & 1 != 0 {
            return Err(format!("zip entry `{name}` is encrypted"));
        }
        if method != 0 || stored != csize {
            return Err(format!(
                "zip entry `{name}` is compressed (method {method}); only stored entries can be \
                 read, as torch.save writes them"
            ));
        }
        let local = size(local)
            .filter(|&l| l < len)
            .ok_or_else(|| truncated(&format!("entry `{name}`: local header past the end")))?;
        let local_header = bytes
            .get(local..local + LOCAL_LEN)
            .filter(|h| u32_at(h, 0) == Some(LOCAL_SIG))
            .ok_or_else(|| truncated(&format!("entry `{name}`: bad local header")))?;
        let data_start = local
            + LOCAL_LEN
            + u16_at(local_header, 26).map_or(0, usize::from)
            + u16_at(local_header, 28).map_or(0, usize::from);
        let data = size(csize)
            .and_then(|n| data_start.checked_add(n))
            .and_then(|end| bytes.get(data_start..end))
            .ok_or_else(|| truncated(&format!("entry `{name}`: data past the end")))?;
        entries.push((name, data));
        at += CENTRAL_LEN + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// Applies a zip64 extended-information field: each 64-bit value present replaces the 32-bit
/// field that saturated, in the order the zip spec fixes. `None` if the field is truncated.
fn zip64_extra(extra: &[u8], stored: &mut u64, csize: &mut u64, local: &mut u64) -> Option<()> {
    let mut rest = extra;
    while rest.len() >= 4 {
        let (id, len) = (u16_at(rest, 0)?, usize::from(u16_at(rest, 2)?));
        let body = rest.get(4..4 + len)?;
        if id == 1 {
            let mut at = 0;
            for field in [stored, csize, local] {
                if *field == u64::from(u32::MAX) {
                    *field = u64_at(body, at)?;
                    at += 8;
                }
            }
            return Some(());
        }
        rest = &rest[4 + len..];
    }
    Some(())
}

// ---------------------------------------------------------------------------------------------
// Pickle machine
// ---------------------------------------------------------------------------------------------

/// A pickle value. Everything with contents lives in the machine's arena and is referred to by
/// index, so copying a value (memo gets, DUP) is O(1) whatever it holds, containers alias as in
/// Python, and no drop or walk recurses through nested objects.
#[derive(Clone, Copy, Debug)]
enum Value {
    /// None, a boolean or a float: pushed and stored like any value, never inspected.
    Scalar,
    Int(i64),
    Obj(usize),
}

#[derive(Debug)]
enum Obj<'a> {
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Entries in insertion order; a key set twice appears twice and the last value wins when
    /// the dict is read, as in Python.
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage {
        dtype: Dtype,
        key: String,
        bytes: &'a [u8],
    },
    Tensor(TensorView),
}

/// The only globals a checkpoint may reference.
#[derive(Clone, Copy, Debug)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Dtype),
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", storage) => Global::Storage(match storage {
                "FloatStorage" => Dtype::F32,
                "HalfStorage" => Dtype::F16,
                "BFloat16Storage" => Dtype::BF16,
                "DoubleStorage" => Dtype::F64,
                "LongStorage" => Dtype::I64,
                "IntStorage" => Dtype::I32,
                "ShortStorage" => Dtype::I16,
                "CharStorage" => Dtype::I8,
                "ByteStorage" => Dtype::U8,
                "BoolStorage" => Dtype::Bool,
                _ => return None,
            }),
            _ => return None,
        })
    }
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view into a storage (an arena index).
#[derive(Clone, Debug)]
struct TensorView {
    storage: usize,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

struct Machine<'a> {
    archive: &'a Archive<'a>,
    arena: Vec<Obj<'a>>,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

/// Reads the pickle byte stream, with the position for messages.
struct Cursor<'p> {
    bytes: &'p [u8],
    pos: usize,
}

impl<'p> Cursor<'p> {
    fn take(&mut self, n: usize) -> Msg<&'p [u8]> {
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| format!("truncated pickle: {n} bytes wanted at byte {}", self.pos))?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Msg<[u8; N]> {
        Ok(super::arr(self.take(N)?))
    }

    fn u8(&mut self) -> Msg<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Msg<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len32(&mut self) -> Msg<usize> {
        size(u64::from(self.u32()?)).ok_or_else(|| "length overflows".into())
    }

    fn line(&mut self) -> Msg<&'p str> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("truncated pickle: unterminated GLOBAL")?;
        let line = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(line)
    }

    fn utf8(&mut self, n: usize) -> Msg<String> {
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| format!("string at byte {at} is not UTF-8"))
    }
}

impl<'a> Machine<'a> {
    fn new(archive: &'a Archive<'a>) -> Self {
        Machine {
            archive,
            arena: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn alloc(&mut self, obj: Obj<'a>) -> Value {
        self.arena.push(obj);
        Value::Obj(self.arena.len() - 1)
    }

    fn pop(&mut self) -> Msg<Value> {
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Msg<Value> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| "stack underflow".into())
    }

    /// The values pushed since the last MARK, removing them and the mark.
    fn pop_mark(&mut self) -> Msg<Vec<Value>> {
        let mark = self.marks.pop().ok_or("MARK missing")?;
        if mark > self.stack.len() {
            return Err("MARK above the stack".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn obj(&self, v: Value) -> Option<&Obj<'a>> {
        match v {
            Value::Obj(i) => self.arena.get(i),
            _ => None,
        }
    }

    fn str(&self, v: Value) -> Option<&str> {
        match self.obj(v) {
            Some(Obj::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn tuple(&self, v: Value) -> Option<&[Value]> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) => Some(t),
            _ => None,
        }
    }

    fn usize(v: Value, what: &str) -> Msg<usize> {
        match v {
            Value::Int(i) => usize::try_from(i).map_err(|_| format!("{what} {i} is negative")),
            _ => Err(format!("{what} is not an integer")),
        }
    }

    fn usizes(&self, v: Value, what: &str) -> Msg<Vec<usize>> {
        self.tuple(v)
            .ok_or_else(|| format!("{what} is not a tuple"))?
            .iter()
            .map(|&x| Self::usize(x, what))
            .collect()
    }

    /// Interprets the pickle program and returns the object it builds.
    fn run(&mut self, pickle: &[u8]) -> Msg<Value> {
        let mut cur = Cursor {
            bytes: pickle,
            pos: 0,
        };
        loop {
            let at = cur.pos;
            let op = cur.u8().map_err(|_| "pickle ends without STOP")?;
            self.step(op, &mut cur)
                .map_err(|e| format!("{e} (opcode {:?} at byte {at})", op as char))?;
            // Each opcode adds at most two items, so checking after each bounds them exactly.
            let items = self.arena.len() + self.stack.len() + self.marks.len() + self.memo.len();
            if items > MAX_PICKLE_ITEMS {
                return Err(format!(
                    "pickle builds more than {MAX_PICKLE_ITEMS} objects by byte {}; not a state dict",
                    cur.pos
                ));
            }
            if op == b'.' {
                return self.pop();
            }
        }
    }

    fn step(&mut self, op: u8, cur: &mut Cursor) -> Msg<()> {
        let push_int = |m: &mut Self, i: i64| m.stack.push(Value::Int(i));
        match op {
            0x80 => {
                // PROTO: any protocol is fine, only the opcodes matter.
                cur.u8()?;
            }
            0x95 => {
                // FRAME (protocol 4): a length hint for buffering.
                cur.take(8)?;
            }
            b'.' => {} // STOP, handled by `run`
            b'(' => self.marks.push(self.stack.len()),
            b'N' | 0x88 | 0x89 => self.stack.push(Value::Scalar), // NONE, NEWTRUE, NEWFALSE
            b'J' => push_int(self, i32::from_le_bytes(cur.array()?).into()),
            b'K' => push_int(self, cur.u8()?.into()),
            b'M' => push_int(self, u16::from_le_bytes(cur.array()?).into()),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes; pickle uses it past 2^31.
                let n = usize::from(cur.u8()?);
                let digits = cur.take(n)?;
                if n > 8 {
                    return Err(format!("integer of {n} bytes does not fit 64 bits"));
                }
                let negative = digits.last().is_some_and(|&b| b & 0x80 != 0);
                let mut le = [if negative { 0xff } else { 0 }; 8];
                le[..n].copy_from_slice(digits);
                push_int(self, i64::from_le_bytes(le));
            }
            b'G' => {
                // BINFLOAT
                cur.take(8)?;
                self.stack.push(Value::Scalar);
            }
            b'X' => {
                let n = cur.len32()?;
                let s = cur.utf8(n)?;
                let v = self.alloc(Obj::Str(s));
                self.stack.push(v);
            }
            0x8c => {
                let n = usize::from(cur.u8()?);
                let s = cur.utf8(n)?;
                let v = self.alloc(Obj::Str(s));
                self.stack.push(v);
            }
            b')' => {
                let v = self.alloc(Obj::Tuple(Vec::new()));
                self.stack.push(v);
            }
            b']' => {
                let v = self.alloc(Obj::List(Vec::new()));
                self.stack.push(v);
            }
            b'}' => {
                let v = self.alloc(Obj::Dict(Vec::new()));
                self.stack.push(v);
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.alloc(Obj::Tuple(items));
                self.stack.push(v);
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let items = self
                    .stack
                    .len()
                    .checked_sub(n)
                    .map(|at| self.stack.split_off(at))
                    .ok_or("stack underflow")?;
                let v = self.alloc(Obj::Tuple(items));
                self.stack.push(v);
            }
            b'l' => {
                let items = self.pop_mark()?;
                let v = self.alloc(Obj::List(items));
                self.stack.push(v);
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                let v = self.alloc(Obj::Dict(pairs));
                self.stack.push(v);
            }
            b'a' => {
                let item = self.pop()?;
                self.append(vec![item])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.set_items(vec![(key, value)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(pairs(items)?)?;
            }
            b'q' => {
                let i = cur.u8()?.into();
                self.memo.insert(i, self.top()?);
            }
            b'r' => {
                let i = cur.u32()?;
                self.memo.insert(i, self.top()?);
            }
            0x94 => {
                // MEMOIZE (protocol 4): the next free index.
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
                self.memo.insert(i, self.top()?);
            }
            b'h' => {
                let i = cur.u8()?.into();
                self.get_memo(i)?;
            }
            b'j' => {
                let i = cur.u32()?;
                self.get_memo(i)?;
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?;
                self.stack.push(v);
            }
            b'c' => {
                let module = cur.line()?;
                let name = cur.line()?;
                self.global(module, name)?;
            }
            0x93 => {
                // STACK_GLOBAL (protocol 4): module and name as strings on the stack.
                let name = self.pop()?;
                let module = self.pop()?;
                let (module, name) = self
                    .str(module)
                    .zip(self.str(name))
                    .map(|(m, n)| (m.to_string(), n.to_string()))
                    .ok_or("STACK_GLOBAL operands are not strings")?;
                self.global(&module, &name)?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.storage(pid)?;
                let v = self.alloc(storage);
                self.stack.push(v);
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.reduce(callable, args)?;
                self.stack.push(v);
            }
            b'b' => {
                // BUILD sets instance state; torch uses it for a state dict's `_metadata`
                // (per-module versions), which a plain tensor reader does not need.
                self.pop()?;
                if !matches!(self.obj(self.top()?), Some(Obj::Dict(_))) {
                    return Err("BUILD on something other than a dict".into());
                }
            }
            _ => return Err("unsupported pickle opcode".into()),
        }
        Ok(())
    }

    fn get_memo(&mut self, i: u32) -> Msg<()> {
        let v = *self
            .memo
            .get(&i)
            .ok_or_else(|| format!("memo entry {i} read before it was written"))?;
        self.stack.push(v);
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Msg<()> {
        match self.top()? {
            Value::Obj(i) => match self.arena.get_mut(i) {
                Some(Obj::List(list)) => {
                    list.extend(items);
                    Ok(())
                }
                _ => Err("APPEND to something other than a list".into()),
            },
            _ => Err("APPEND to something other than a list".into()),
        }
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>) -> Msg<()> {
        match self.top()? {
            Value::Obj(i) => match self.arena.get_mut(i) {
                Some(Obj::Dict(dict)) => {
                    dict.extend(items);
                    Ok(())
                }
                _ => Err("SETITEM on something other than a dict".into()),
            },
            _ => Err("SETITEM on something other than a dict".into()),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Msg<()> {
        let g = Global::lookup(module, name).ok_or_else(|| {
            format!(
                "refusing global `{module}.{name}`: a checkpoint may only reference tensors, \
                 storages and OrderedDict, and nothing in this pickle is executed"
            )
        })?;
        let v = self.alloc(Obj::Global(g));
        self.stack.push(v);
        Ok(())
    }

    /// Resolves a persistent id `('storage', StorageType, key, location, numel)` to its record.
    fn storage(&self, pid: Value) -> Msg<Obj<'a>> {
        let bad = || "persistent id is not ('storage', type, key, location, numel)".to_string();
        let &[tag, kind, key, _location, numel] = self.tuple(pid).ok_or_else(bad)? else {
            return Err(bad());
        };
        if self.str(tag) != Some("storage") {
            return Err(bad());
        }
        let Some(Obj::Global(Global::Storage(dtype))) = self.obj(kind) else {
            return Err(bad());
        };
        let key = self.str(key).ok_or_else(bad)?;
        let numel = Self::usize(numel, "storage size")?;
        let bytes =
            *self.archive.storages.get(key).ok_or_else(|| {
                format!("storage `{key}` has no `data/{key}` record in the archive")
            })?;
        if numel.checked_mul(dtype.size()) != Some(bytes.len()) {
            return Err(format!(
                "storage `{key}` declares {numel} {} elements but its record holds {} bytes",
                dtype.name(),
                bytes.len()
            ));
        }
        Ok(Obj::Storage {
            dtype: *dtype,
            key: key.to_string(),
            bytes,
        })
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Msg<Value> {
        let Some(&Obj::Global(g)) = self.obj(callable) else {
            return Err("REDUCE of something that is not a recognised global".into());
        };
        let args = self.tuple(args).ok_or("REDUCE arguments are not a tuple")?;
        match g {
            Global::OrderedDict if args.is_empty() => Ok(self.alloc(Obj::Dict(Vec::new()))),
            Global::RebuildTensorV2 => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                let (&[storage, offset, shape, strides, ..], 6 | 7) = (args, args.len()) else {
                    return Err("_rebuild_tensor_v2 takes 6 or 7 arguments".into());
                };
                let (Value::Obj(storage), Some(Obj::Storage { .. })) = (storage, self.obj(storage))
                else {
                    return Err("_rebuild_tensor_v2's first argument is not a storage".into());
                };
                let view = TensorView {
                    storage,
                    offset: Self::usize(offset, "storage offset")?,
                    shape: self.usizes(shape, "size")?,
                    strides: self.usizes(strides, "stride")?,
                };
                if view.shape.len() != view.strides.len() {
                    return Err(format!(
                        "size {:?} and stride {:?} differ in length",
                        view.shape, view.strides
                    ));
                }
                Ok(self.alloc(Obj::Tensor(view)))
            }
            Global::RebuildParameter => match args {
                // (data, requires_grad, backward_hooks): a parameter is its data here.
                &[data, _, _] if matches!(self.obj(data), Some(Obj::Tensor(_))) => Ok(data),
                _ => Err("_rebuild_parameter takes (tensor, requires_grad, hooks)".into()),
            },
            Global::OrderedDict => Err("OrderedDict called with arguments".into()),
            Global::Storage(_) => Err("storage types cannot be called".into()),
        }
    }

    /// The named tensors of the unpickled object (see [`from_bytes`] for the layouts accepted).
    fn state_dict(&self, root: Value) -> Msg<Vec<(String, TensorView)>> {
        let Some(Obj::Dict(entries)) = self.obj(root) else {
            return Err("the pickled object is not a dict of tensors".into());
        };
        let tensors = self.tensors_of(entries);
        if !tensors.is_empty() {
            return Ok(tensors);
        }
        for key in ["state_dict", "model", "module"] {
            let nested = entries
                .iter()
                .rev()
                .find(|(k, _)| self.str(*k) == Some(key))
                .and_then(|(_, v)| match self.obj(*v) {
                    Some(Obj::Dict(d)) => Some(self.tensors_of(d)),
                    _ => None,
                });
            if let Some(tensors) = nested.filter(|t| !t.is_empty()) {
                return Ok(tensors);
            }
        }
        let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| self.str(*k)).collect();
        Err(format!(
            "the pickled dict holds no tensors, directly or under `state_dict`, `model` or `module` (keys: {})",
            keys[..keys.len().min(10)].join(", ")
        ))
    }

    /// The string-keyed tensor entries of a dict in insertion order, later values replacing
    /// earlier ones for a repeated key, as Python's dict does.
    fn tensors_of(&self, entries: &[(Value, Value)]) -> Vec<(String, TensorView)> {
        let mut out: Vec<(String, TensorView)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for &(k, v) in entries {
            let (Some(name), Some(Obj::Tensor(t))) = (self.str(k), self.obj(v)) else {
                continue;
            };
            match index.get(name) {
                Some(&i) => out[i].1 = t.clone(),
                None => {
                    index.insert(name, out.len());
                    out.push((name.to_string(), t.clone()));
                }
            }
        }
        out
    }

    /// Copies a tensor view out of its storage as a row-major f32 tensor, charging its size to
    /// `budget` (f32 values left to produce for this file).
    fn materialise(&self, view: TensorView, budget: &mut usize) -> Msg<Tensor> {
        let Some(Obj::Storage { dtype, key, bytes }) = self.arena.get(view.storage) else {
            return Err("tensor without a storage".into());
        };
        let (dtype, bytes) = (*dtype, *bytes);
        let elements = bytes.len() / dtype.size();
        let numel = checked_numel(&view.shape)
            .filter(|&n| n <= *budget)
            .ok_or_else(|| {
                format!(
                    "size {:?} expands to more values than this file could legitimately hold",
                    view.shape
                )
            })?;
        *budget -= numel;
        let mut data = Vec::with_capacity(numel);
        if numel > 0 {
            // The furthest element the view reaches must lie inside the storage.
            let last = view
                .shape
                .iter()
                .zip(&view.strides)
                .try_fold(view.offset, |acc, (&n, &s)| {
                    (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d))
                })
                .filter(|&last| last < elements)
                .ok_or_else(|| {
                    format!(
                        "view (offset {}, size {:?}, stride {:?}) reaches past the end of storage `{key}` ({elements} elements)",
                        view.offset, view.shape, view.strides
                    )
                })?;
            if is_contiguous(&view.shape, &view.strides) {
                let size = dtype.size();
                // A contiguous view spans offset..=last, which the check above keeps in range.
                let span = bytes
                    .get(view.offset * size..(last + 1) * size)
                    .ok_or("contiguous view out of range")?;
                dtype.extend_f32(span, &mut data);
            } else {
                extend_strided_f32(
                    dtype,
                    bytes,
                    view.offset,
                    &view.shape,
                    &view.strides,
                    &mut data,
                )
                .ok_or("strided view out of range")?;
            }
        }
        Tensor::new(view.shape, data).map_err(|e| e.to_string())
    }
}

/// Whether a view with these sizes and strides is row-major contiguous (dimensions of size 1
/// may have any stride, as in PyTorch).
fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// Pairs up the alternating keys and values pushed for SETITEMS or DICT.
fn pairs(items: Vec<Value>) -> Msg<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        return Err("odd number of items for a dict".into());
    }
    Ok(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
}
