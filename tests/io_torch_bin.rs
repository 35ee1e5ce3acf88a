//! PyTorch `.bin` reader: files saved by real torch (fixtures), checkpoints assembled here byte
//! by byte (zip + pickle, so the tests need no Python), and malformed or hostile inputs.

use std::path::PathBuf;

use invdiff::io::{safetensors, torch_bin};
use invdiff::Tensor;

mod common;
use common::{assert_err, io_data, TempDir};

/// Writes `bytes` to `dir/file` and reads it back as a state dict.
fn read_written(
    dir: &TempDir,
    file: &str,
    bytes: &[u8],
) -> (PathBuf, invdiff::Result<Vec<(String, Tensor)>>) {
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    let result = torch_bin::read_state_dict(&path);
    (path, result)
}

// ---------------------------------------------------------------------------------------------
// Byte-level builders: a protocol-2 pickle as torch.save writes it, and a stored zip archive.
// ---------------------------------------------------------------------------------------------

struct Pickle(Vec<u8>);

/// Emits one value (a tensor) into a pickle.
type Emit<'a> = &'a dyn Fn(&mut Pickle);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }

    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }

    fn int(&mut self, i: i64) -> &mut Self {
        self.op(b"J").op(&(i as i32).to_le_bytes())
    }

    fn ints(&mut self, values: &[i64]) -> &mut Self {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t")
    }

    fn empty_ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b")R")
    }

    /// `_rebuild_tensor_v2((storage pid), offset, size, stride, False, OrderedDict())`.
    fn tensor(
        &mut self,
        storage: (&str, &str, i64),
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> &mut Self {
        let (kind, key, numel) = storage;
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(")
            .str("storage")
            .global("torch", kind)
            .str(key)
            .str("cpu")
            .int(numel);
        self.op(b"tQ")
            .int(offset)
            .ints(size)
            .ints(stride)
            .op(&[0x89]);
        self.empty_ordered_dict().op(b"tR")
    }

    /// An OrderedDict of the given tensors (each emitted by `emit`), then STOP.
    fn state_dict(mut self, items: &[(&str, Emit)]) -> Vec<u8> {
        self.empty_ordered_dict().op(b"(");
        for (name, emit) in items {
            self.str(name);
            emit(&mut self);
        }
        self.op(b"u.");
        self.0
    }
}

#[derive(Clone, Copy, Default)]
struct ZipOptions {
    /// Saturate every 32-bit field and carry the values in zip64 records, as torch does past
    /// 4 GiB.
    zip64: bool,
    /// Compression method recorded for every entry (0 = stored).
    method: u16,
}

fn zip(entries: &[(String, Vec<u8>)], opts: ZipOptions) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u64;
        let size = data.len() as u64;
        let put16 = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
        let put32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        // Local header, sizes left zero as torch does (it writes a data descriptor).
        put32(&mut out, 0x0403_4b50);
        for x in [20, 8, opts.method, 0, 0] {
            put16(&mut out, x);
        }
        for _ in 0..3 {
            put32(&mut out, 0);
        }
        put16(&mut out, name.len() as u16);
        put16(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);

        let (small_size, small_offset) = if opts.zip64 {
            (u32::MAX, u32::MAX)
        } else {
            (size as u32, offset as u32)
        };
        put32(&mut central, 0x0201_4b50);
        for x in [45, 45, 8, opts.method, 0, 0] {
            put16(&mut central, x);
        }
        put32(&mut central, 0); // crc
        put32(&mut central, small_size);
        put32(&mut central, small_size);
        put16(&mut central, name.len() as u16);
        put16(&mut central, if opts.zip64 { 28 } else { 0 });
        for _ in 0..3 {
            put16(&mut central, 0); // comment length, disk, internal attributes
        }
        put32(&mut central, 0); // external attributes
        put32(&mut central, small_offset);
        central.extend_from_slice(name.as_bytes());
        if opts.zip64 {
            put16(&mut central, 1);
            put16(&mut central, 24);
            for x in [size, size, offset] {
                central.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    let cd_offset = out.len() as u64;
    let cd_size = central.len() as u64;
    let count = entries.len() as u64;
    out.extend_from_slice(&central);
    if opts.zip64 {
        let eocd64 = out.len() as u64;
        out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
        out.extend_from_slice(&44u64.to_le_bytes());
        out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        for x in [count, count, cd_size, cd_offset] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&eocd64.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
    }
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    let (c16, s32, o32) = if opts.zip64 {
        (u16::MAX, u32::MAX, u32::MAX)
    } else {
        (count as u16, cd_size as u32, cd_offset as u32)
    };
    out.extend_from_slice(&c16.to_le_bytes());
    out.extend_from_slice(&c16.to_le_bytes());
    out.extend_from_slice(&s32.to_le_bytes());
    out.extend_from_slice(&o32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A torch.save-style archive: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>`.
fn checkpoint(
    pickle: &[u8],
    storages: &[(&str, Vec<u8>)],
    byteorder: &str,
    opts: ZipOptions,
) -> Vec<u8> {
    let mut entries = vec![
        ("archive/data.pkl".to_string(), pickle.to_vec()),
        (
            "archive/byteorder".to_string(),
            byteorder.as_bytes().to_vec(),
        ),
    ];
    for (key, data) in storages {
        entries.push((format!("archive/data/{key}"), data.clone()));
    }
    entries.push(("archive/version".to_string(), b"3\n".to_vec()));
    zip(&entries, opts)
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// Storage "0": 0..12 as f32; storage "1": four halves; storage "2": two i64.
fn storages() -> Vec<(&'static str, Vec<u8>)> {
    let halves = [0.5f32, -1.0, 2.0, 65504.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let longs = [7i64, -3].iter().flat_map(|v| v.to_le_bytes()).collect();
    vec![
        ("0", f32_bytes((0..12).map(|i| i as f32))),
        ("1", halves),
        ("2", longs),
    ]
}

/// A state dict exercising views: a 3x4 matrix (saved as a parameter), its transpose
/// (non-contiguous), an offset strided slice of the same storage (shared), a stride-0
/// broadcast, f16 and i64 storages.
fn handmade_pickle() -> Vec<u8> {
    let f = ("FloatStorage", "0", 12);
    Pickle::new().state_dict(&[
        ("m", &|p: &mut Pickle| {
            // As an nn.Parameter: _rebuild_parameter(tensor, requires_grad, OrderedDict()).
            p.global("torch._utils", "_rebuild_parameter").op(b"(");
            p.tensor(f, 0, &[3, 4], &[4, 1]).op(&[0x88]);
            p.empty_ordered_dict().op(b"tR");
        }),
        ("m.t", &|p: &mut Pickle| {
            p.tensor(f, 0, &[4, 3], &[1, 4]);
        }),
        ("m.slice", &|p: &mut Pickle| {
            p.tensor(f, 5, &[2, 2], &[4, 2]);
        }),
        ("broadcast", &|p: &mut Pickle| {
            p.tensor(f, 2, &[2, 3], &[0, 1]);
        }),
        ("half", &|p: &mut Pickle| {
            p.tensor(("HalfStorage", "1", 4), 0, &[4], &[1]);
        }),
        ("long", &|p: &mut Pickle| {
            p.tensor(("LongStorage", "2", 2), 1, &[], &[]);
        }),
    ])
}

fn expect_handmade(tensors: &[(String, Tensor)]) {
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["m", "m.t", "m.slice", "broadcast", "half", "long"]);
    let get = |i: usize| &tensors[i].1;
    assert_eq!(get(0).shape(), [3, 4]);
    assert_eq!(get(0).data(), (0..12).map(|i| i as f32).collect::<Vec<_>>());
    assert_eq!(get(1).shape(), [4, 3]);
    assert_eq!(
        get(1).data(),
        [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
    );
    assert_eq!(get(2).data(), [5., 7., 9., 11.]);
    assert_eq!(get(3).data(), [2., 3., 4., 2., 3., 4.]);
    assert_eq!(get(4).data(), [0.5, -1.0, 2.0, 65504.0]);
    assert_eq!(get(5).shape(), [] as [usize; 0]);
    assert_eq!(get(5).data(), [-3.0]);
}

#[test]
fn handmade_checkpoint_with_views_and_shared_storage() {
    let bytes = checkpoint(
        &handmade_pickle(),
        &storages(),
        "little",
        ZipOptions::default(),
    );
    let (_, result) = read_written(&TempDir::new("io-torch", "handmade"), "model.bin", &bytes);
    expect_handmade(&result.unwrap());
    // The in-memory entry point (used by the fuzz targets) agrees.
    expect_handmade(&torch_bin::from_bytes(&bytes, "mem.bin").unwrap());
}

#[test]
fn zip64_records_and_extra_fields() {
    let opts = ZipOptions {
        zip64: true,
        ..Default::default()
    };
    let bytes = checkpoint(&handmade_pickle(), &storages(), "little", opts);
    expect_handmade(&torch_bin::from_bytes(&bytes, "zip64.bin").unwrap());
}

#[test]
fn every_truncation_and_byte_flip_is_an_error_not_a_panic() {
    let bytes = checkpoint(
        &handmade_pickle(),
        &storages(),
        "little",
        ZipOptions::default(),
    );
    for len in 0..bytes.len() {
        assert!(
            torch_bin::from_bytes(&bytes[..len], "cut.bin").is_err(),
            "prefix {len} accepted"
        );
    }
    for at in 0..bytes.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut copy = bytes.clone();
            copy[at] ^= flip;
            // Some flips are harmless (a value, a CRC); only the absence of a panic matters.
            let _ = torch_bin::from_bytes(&copy, "flipped.bin");
        }
    }
}

#[test]
fn forbidden_global_is_refused_without_running_anything() {
    let dir = TempDir::new("io-torch", "forbidden");
    let marker = dir.join("pwned");
    let command = format!("touch {}", marker.display());
    let mut p = Pickle::new();
    p.global("os", "system").op(b"(").str(&command).op(b"tR.");
    let bytes = checkpoint(&p.0, &[], "little", ZipOptions::default());
    let (path, result) = read_written(&dir, "evil.bin", &bytes);
    assert_err(result, &path, &["os.system", "refusing"]);
    assert!(!marker.exists());

    // The same through protocol 4's STACK_GLOBAL, hidden inside a state dict value.
    let mut p = Pickle::new();
    p.empty_ordered_dict().str("w");
    p.op(&[0x8c, 8])
        .op(b"builtins")
        .op(&[0x8c, 4])
        .op(b"eval")
        .op(&[0x93]);
    p.op(b"(").str("1").op(b"tRs.");
    let bytes = checkpoint(&p.0, &[], "little", ZipOptions::default());
    let (path, result) = read_written(&dir, "evil4.bin", &bytes);
    assert_err(result, &path, &["builtins.eval"]);
}

#[test]
fn malformed_archives_name_the_file_and_the_problem() {
    let dir = TempDir::new("io-torch", "malformed");
    let good = handmade_pickle;
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "legacy.bin",
            vec![0x80, 0x02, 0x8a, 0x0a],
            &["legacy torch.save format", "torch>=1.6"],
        ),
        ("text.bin", b"hello world".to_vec(), &["not a zip archive"]),
        (
            "cut.bin",
            checkpoint(&good(), &storages(), "little", ZipOptions::default())[..200].to_vec(),
            &["truncated"],
        ),
        (
            "deflated.bin",
            checkpoint(
                &good(),
                &storages(),
                "little",
                ZipOptions {
                    method: 8,
                    ..Default::default()
                },
            ),
            &["compressed (method 8)"],
        ),
        (
            "big_endian.bin",
            checkpoint(&good(), &storages(), "big", ZipOptions::default()),
            &["little-endian"],
        ),
        (
            "no_storage.bin",
            checkpoint(&good(), &storages()[..2], "little", ZipOptions::default()),
            &["storage `2`", "data/2"],
        ),
        (
            "no_pickle.bin",
            zip(
                &[("archive/version".into(), b"3\n".to_vec())],
                ZipOptions::default(),
            ),
            &["data.pkl"],
        ),
        (
            "past_end.bin",
            checkpoint(
                &Pickle::new().state_dict(&[("w", &|p: &mut Pickle| {
                    p.tensor(("FloatStorage", "0", 12), 4, &[3, 3], &[3, 1]);
                })]),
                &storages(),
                "little",
                ZipOptions::default(),
            ),
            &["tensor `w`", "reaches past the end of storage `0`"],
        ),
        (
            "huge_broadcast.bin",
            checkpoint(
                &Pickle::new().state_dict(&[("w", &|p: &mut Pickle| {
                    p.tensor(("FloatStorage", "0", 12), 0, &[1 << 30, 1 << 20], &[0, 0]);
                })]),
                &storages(),
                "little",
                ZipOptions::default(),
            ),
            &["tensor `w`", "expands"],
        ),
        (
            "wrong_numel.bin",
            checkpoint(
                &Pickle::new().state_dict(&[("w", &|p: &mut Pickle| {
                    p.tensor(("FloatStorage", "0", 13), 0, &[1], &[1]);
                })]),
                &storages(),
                "little",
                ZipOptions::default(),
            ),
            &["storage `0` declares 13 F32 elements", "48 bytes"],
        ),
        (
            "no_stop.bin",
            checkpoint(
                &good()[..good().len() - 1],
                &storages(),
                "little",
                ZipOptions::default(),
            ),
            &["data.pkl", "without STOP"],
        ),
        (
            "list.bin",
            checkpoint(
                &Pickle::new().op(b"].").0,
                &[],
                "little",
                ZipOptions::default(),
            ),
            &["not a dict"],
        ),
        (
            "opcode.bin",
            checkpoint(
                &Pickle::new().op(b"I1\n.").0,
                &[],
                "little",
                ZipOptions::default(),
            ),
            &["unsupported pickle opcode", "at byte 2"],
        ),
    ];
    for (file, bytes, needles) in cases {
        let (path, result) = read_written(&dir, file, &bytes);
        assert_err(result, &path, needles);
    }
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = TempDir::new("io-torch", "missing");
    let path = dir.join("absent.bin");
    assert_err(torch_bin::read_state_dict(&path), &path, &[]);
}

/// `tiny_state_dict.bin` was written by `torch.save` (torch 2.x, see `make_fixtures.py`) from
/// a module's state dict plus f16, bf16, f64, i32, i64 tensors, views (transpose, offset slice
/// sharing the base's storage, stride-0 expand), a 0-d and an empty tensor. The same tensors,
/// made contiguous, were saved with the `safetensors` Python package: both readers must agree
/// exactly, in torch's order.
#[test]
fn real_torch_save_matches_safetensors_export() {
    let bin = torch_bin::read_state_dict(&io_data("tiny_state_dict.bin")).unwrap();
    let st = safetensors::read(&io_data("tiny_state_dict.safetensors")).unwrap();
    let names: Vec<&str> = bin.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..3], ["0.weight", "0.bias", "1.weight"]);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, st.names());
    for (name, tensor) in &bin {
        let expected = st.get(name).unwrap();
        assert_eq!(tensor, &expected, "{name}");
    }
    let by_name = |n: &str| &bin.iter().find(|(k, _)| k == n).unwrap().1;
    assert_eq!(by_name("view.slice").shape(), [3, 3]);
    assert_eq!(by_name("view.slice").data()[0], 8.0 / 7.0);
    assert_eq!(
        by_name("view.expand").data(),
        [1.5, 2.5, 1.5, 2.5, 1.5, 2.5]
    );
    assert_eq!(by_name("2.num_batches_tracked").data(), [0.0]);
}

/// `nested.bin`: `{"state_dict": {"w": base.t()}, "epoch": 3}` saved with pickle protocol 4
/// (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL).
#[test]
fn real_torch_save_nested_protocol_4() {
    let bin = torch_bin::read_state_dict(&io_data("nested.bin")).unwrap();
    assert_eq!(bin.len(), 1);
    let (name, w) = &bin[0];
    assert_eq!(name, "w");
    assert_eq!(w.shape(), [6, 5]);
    assert_eq!(&w.data()[..3], [0.0, 6.0 / 7.0, 12.0 / 7.0]);
}
