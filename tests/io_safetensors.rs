//! safetensors reader and writer: round trips, files from the Python package, and every kind
//! of malformed header.

use std::collections::HashMap;
use std::path::Path;

use invdiff::io::safetensors::{self, WriteTensor};
use invdiff::Tensor;

mod common;
use common::{assert_err, TempDir};

/// A safetensors file from a raw header string and data section.
fn raw_file(header: impl AsRef<[u8]>, data: &[u8]) -> Vec<u8> {
    let header = header.as_ref();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

#[test]
fn round_trip_f32_i64_and_metadata() {
    let dir = TempDir::new("io-st", "round_trip");
    let path = dir.join("t.safetensors");
    let x = Tensor::new(
        [2, 3],
        vec![1.0, -2.5, 3.0, f32::MAX, f32::MIN_POSITIVE, 0.0],
    )
    .unwrap();
    let scalar = Tensor::new([], vec![42.0]).unwrap();
    let empty = Tensor::new([0, 4], vec![]).unwrap();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let timestep = [999i64, -1, 1 << 40];
    safetensors::write_tensors(
        &path,
        &[
            ("x", WriteTensor::F32(&x)),
            (
                "timestep",
                WriteTensor::I64 {
                    shape: &[3],
                    values: &timestep,
                },
            ),
            ("scalar", WriteTensor::F32(&scalar)),
            ("empty", WriteTensor::F32(&empty)),
        ],
        Some(&meta),
    )
    .unwrap();

    let f = safetensors::read(&path).unwrap();
    assert_eq!(f.path(), path);
    assert_eq!(f.names(), ["empty", "scalar", "timestep", "x"]);
    assert!(f.contains("x") && !f.contains("y"));
    assert_eq!(f.shape("x"), Some(&[2, 3][..]));
    assert_eq!(f.dtype_name("x"), Some("F32"));
    assert_eq!(f.dtype_name("timestep"), Some("I64"));
    assert_eq!(f.metadata(), Some(&meta));
    assert_eq!(f.get("x").unwrap(), x);
    assert_eq!(f.get("scalar").unwrap(), scalar);
    assert_eq!(f.get("empty").unwrap(), empty);
    assert_eq!(f.get_i64("timestep").unwrap(), timestep);
    assert_eq!(
        f.get("timestep").unwrap().data(),
        [999.0, -1.0, (1u64 << 40) as f32]
    );
    assert_eq!(f.get_i64("scalar").unwrap(), [42]);

    // The reference implementation accepts what we write, alignment included.
    let bytes = std::fs::read(&path).unwrap();
    let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 4);
    assert_eq!(
        st.tensor("timestep").unwrap().data().as_ptr() as usize % 8,
        bytes.as_ptr() as usize % 8
    );

    // The plain f32 writer, without metadata.
    let path2 = path.with_file_name("plain.safetensors");
    safetensors::write(&path2, &[("b", &x), ("a", &scalar)], None).unwrap();
    let f = safetensors::read(&path2).unwrap();
    assert_eq!(f.names(), ["a", "b"]);
    assert_eq!(f.metadata(), None);
    assert_eq!(f.get("b").unwrap(), x);
}

#[test]
fn every_dtype_converts_to_f32() {
    let header = r#"{"f64":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},
        "f16":{"dtype":"F16","shape":[1],"data_offsets":[8,10]},
        "bf16":{"dtype":"BF16","shape":[1],"data_offsets":[10,12]},
        "i32":{"dtype":"I32","shape":[1],"data_offsets":[12,16]},
        "i16":{"dtype":"I16","shape":[1],"data_offsets":[16,18]},
        "i8":{"dtype":"I8","shape":[1],"data_offsets":[18,19]},
        "u8":{"dtype":"U8","shape":[1],"data_offsets":[19,20]},
        "bool":{"dtype":"BOOL","shape":[2],"data_offsets":[20,22]}}"#;
    let mut data = 0.25f64.to_le_bytes().to_vec();
    data.extend(half::f16::from_f32(-1.5).to_le_bytes());
    data.extend(half::bf16::from_f32(3.0).to_le_bytes());
    data.extend((-7i32).to_le_bytes());
    data.extend((-300i16).to_le_bytes());
    data.extend((-5i8).to_le_bytes());
    data.extend([200u8, 0, 3]);
    let f = safetensors::from_bytes(raw_file(header, &data), "mem.safetensors").unwrap();
    let one = |n: &str| f.get(n).unwrap().data().to_vec();
    assert_eq!(one("f64"), [0.25]);
    assert_eq!(one("f16"), [-1.5]);
    assert_eq!(one("bf16"), [3.0]);
    assert_eq!(one("i32"), [-7.0]);
    assert_eq!(one("i16"), [-300.0]);
    assert_eq!(one("i8"), [-5.0]);
    assert_eq!(one("u8"), [200.0]);
    assert_eq!(one("bool"), [0.0, 1.0]);
    assert_eq!(f.get_i64("i16").unwrap(), [-300]);
    assert_eq!(f.get_i64("bf16").unwrap(), [3]);
    let err = f.get_i64("f64").unwrap_err().to_string();
    assert!(
        err.contains("mem.safetensors") && err.contains("`f64`") && err.contains("not an integer"),
        "{err}"
    );
}

/// Written by the Python `safetensors` package (see `tests/data/io/make_fixtures.py`).
#[test]
fn python_written_file() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/io/tiny_state_dict.safetensors");
    let f = safetensors::read(&path).unwrap();
    assert_eq!(f.dtype_name("half"), Some("F16"));
    assert_eq!(f.dtype_name("bf16"), Some("BF16"));
    assert_eq!(f.dtype_name("2.num_batches_tracked"), Some("I64"));
    assert_eq!(f.get_i64("int").unwrap(), [1, -2, 3, 4]);
    assert_eq!(f.shape("scalar"), Some(&[][..]));
    assert_eq!(f.get("scalar").unwrap().data(), [3.25]);
    assert_eq!(f.get("view.t").unwrap().shape(), [6, 5]);
}

#[test]
fn missing_tensor_lists_close_names() {
    let dir = TempDir::new("io-st", "missing");
    let path = dir.join("w.safetensors");
    let t = Tensor::zeros([1]);
    let names = [
        "mid.attn.query.weight",
        "mid.attn.key.weight",
        "mid.attn.value.weight",
        "conv_in.weight",
    ];
    let tensors: Vec<(&str, &Tensor)> = names.iter().map(|&n| (n, &t)).collect();
    safetensors::write(&path, &tensors, None).unwrap();
    let f = safetensors::read(&path).unwrap();
    let result = f.get("mid.attn.to_q.weight");
    assert_err(
        result,
        &path,
        &[
            "`mid.attn.to_q.weight`",
            "mid.attn.key.weight",
            "mid.attn.query.weight",
        ],
    );
    assert_err(f.get_i64("nope"), &path, &["`nope`"]);
}

#[test]
fn malformed_files_name_the_file_and_the_problem() {
    let dir = TempDir::new("io-st", "malformed");
    let f32x2 = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "short.safetensors",
            vec![1, 2, 3],
            &["truncated", "3 bytes"],
        ),
        (
            "long_header.safetensors",
            raw_file(f32x2, &[0; 8])[..20].to_vec(),
            &["header length", "larger than the file"],
        ),
        (
            "huge_header.safetensors",
            u64::MAX.to_le_bytes().to_vec(),
            &["header length 18446744073709551615"],
        ),
        (
            "json.safetensors",
            raw_file("{\"a\": ", &[]),
            &["not valid JSON"],
        ),
        (
            "utf8.safetensors",
            raw_file([b'{', 0xff], &[]),
            &["not valid UTF-8"],
        ),
        (
            "array.safetensors",
            raw_file("[1, 2]", &[]),
            &["not a JSON object"],
        ),
        (
            "range.safetensors",
            raw_file(f32x2, &[0; 4]),
            &["tensor `a`", "data_offsets [0, 8] out of range", "4 bytes"],
        ),
        (
            "reversed.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
                &[0; 8],
            ),
            &["tensor `a`", "out of range"],
        ),
        (
            "overlap.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
            &["`a` and `b` overlap"],
        ),
        (
            "hole.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
            &["bytes 0..4", "belong to no tensor"],
        ),
        (
            "trailing.safetensors",
            raw_file(f32x2, &[0; 9]),
            &["1 bytes after the last tensor"],
        ),
        (
            "size.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            &["tensor `a`", "needs 16 bytes", "span 8"],
        ),
        (
            "overflow.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            &["tensor `a`", "more than 2^64"],
        ),
        (
            "dtype.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            &["tensor `a`", "unsupported dtype F8_E4M3"],
        ),
        (
            "no_shape.safetensors",
            raw_file(r#"{"a":{"dtype":"F32","data_offsets":[0,8]}}"#, &[0; 8]),
            &["tensor `a`", "no `shape`"],
        ),
        (
            "neg_shape.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            &["`shape` is not a list of sizes"],
        ),
        (
            "offsets.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
                &[0; 8],
            ),
            &["`data_offsets` is not a pair"],
        ),
        (
            "metadata.safetensors",
            raw_file(r#"{"__metadata__":{"k":1}}"#, &[]),
            &["`__metadata__` must map strings to strings"],
        ),
    ];
    for (file, bytes, needles) in cases {
        let path = dir.join(file);
        std::fs::write(&path, &bytes).unwrap();
        assert_err(safetensors::read(&path), &path, needles);
    }
    let absent = dir.join("absent.safetensors");
    assert_err(safetensors::read(&absent), &absent, &[]);
}

#[test]
fn every_truncation_is_an_error() {
    let dir = TempDir::new("io-st", "truncation");
    let path = dir.join("t.safetensors");
    let t = Tensor::new([3], vec![1.0, 2.0, 3.0]).unwrap();
    safetensors::write(&path, &[("t", &t), ("u", &t)], None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for len in 0..bytes.len() {
        assert!(
            safetensors::from_bytes(bytes[..len].to_vec(), "cut").is_err(),
            "prefix {len} accepted"
        );
    }
}

#[test]
fn writer_rejects_bad_input() {
    let dir = TempDir::new("io-st", "writer");
    let path = dir.join("w.safetensors");
    let t = Tensor::zeros([2]);
    assert!(safetensors::write(&path, &[("a", &t), ("a", &t)], None).is_err());
    assert!(safetensors::write(&path, &[("__metadata__", &t)], None).is_err());
    let bad = [WriteTensor::I64 {
        shape: &[3],
        values: &[1, 2],
    }];
    assert!(safetensors::write_tensors(&path, &[("i", bad[0])], None).is_err());
}
