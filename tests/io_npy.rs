//! `.npy` reader and writer: round trips, files written by NumPy, hand-built headers, and
//! malformed files.

use invdiff::io::npy;
use invdiff::Tensor;

mod common;
use common::{io_data, TempDir};

/// A version-1 `.npy` file from a header dict literal and raw data.
fn npy_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn round_trip_shapes() {
    let dir = TempDir::new("io-npy", "round_trip");
    let tensors = [
        Tensor::new([2, 3, 4], (0..24).map(|i| i as f32 * 0.5 - 3.0).collect()).unwrap(),
        Tensor::new([5], vec![1.0, f32::INFINITY, -0.0, 1e-40, f32::MAX]).unwrap(),
        Tensor::new([], vec![7.0]).unwrap(),
        Tensor::new([0, 3], vec![]).unwrap(),
    ];
    for (i, t) in tensors.iter().enumerate() {
        let path = dir.join(&format!("{i}.npy"));
        npy::write(&path, t).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x93NUMPY\x01\x00"));
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0, "data not 64-byte aligned");
        assert_eq!(bytes[10 + header_len - 1], b'\n');
        assert_eq!(&npy::read(&path).unwrap(), t);
    }
    let header = std::fs::read(dir.join("1.npy")).unwrap();
    let header = String::from_utf8_lossy(&header[10..74]);
    assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }"));
}

/// Written by `numpy.save` (see `tests/data/io/make_fixtures.py`).
#[test]
fn numpy_written_files() {
    // np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 3)
    let t = npy::read(&io_data("f64_fortran.npy")).unwrap();
    assert_eq!(t.shape(), [2, 3, 4]);
    let expected: Vec<f32> = (0..24).map(|i| (i as f64 / 3.0) as f32).collect();
    assert_eq!(t.data(), expected);
    let t = npy::read(&io_data("u8.npy")).unwrap();
    assert_eq!(t.shape(), [3, 2]);
    assert_eq!(t.data(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn dtypes_versions_and_fortran_order() {
    let ints: Vec<u8> = [1i64, -2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let t = npy::from_bytes(
        &npy_file(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
            &ints,
        ),
        "i8.npy",
    )
    .unwrap();
    assert_eq!(t.data(), [1.0, -2.0, 3.0]);

    let halves: Vec<u8> = [0.5f32, -2.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let t = npy::from_bytes(
        &npy_file(
            "{\"descr\": \"<f2\", \"shape\": (1, 2), \"fortran_order\": False}",
            &halves,
        ),
        "f2.npy",
    )
    .unwrap();
    assert_eq!((t.shape(), t.data()), (&[1, 2][..], &[0.5, -2.0][..]));

    let bools = npy_file(
        "{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }",
        &[0, 1],
    );
    assert_eq!(
        npy::from_bytes(&bools, "b1.npy").unwrap().data(),
        [0.0, 1.0]
    );

    // Fortran order, 2x3 f32: memory holds column after column.
    let cols: Vec<u8> = [1f32, 4., 2., 5., 3., 6.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let t = npy::from_bytes(
        &npy_file(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            &cols,
        ),
        "f.npy",
    )
    .unwrap();
    assert_eq!(t.data(), [1., 2., 3., 4., 5., 6.]);

    // Version 3 (32-bit header length, UTF-8 header).
    let header = "{'descr': '<i4', 'fortran_order': False, 'shape': (2L,), }\n";
    let mut v3 = b"\x93NUMPY\x03\x00".to_vec();
    v3.extend_from_slice(&(header.len() as u32).to_le_bytes());
    v3.extend_from_slice(header.as_bytes());
    v3.extend([7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(npy::from_bytes(&v3, "v3.npy").unwrap().data(), [7.0, -1.0]);
}

#[test]
fn malformed_files_name_the_file_and_the_problem() {
    let dir = TempDir::new("io-npy", "malformed");
    let f4 =
        |shape: &str| format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("magic.npy", b"PK\x03\x04".to_vec(), &["not a .npy file"]),
        ("short.npy", b"\x93NUMPY\x01".to_vec(), &["truncated"]),
        (
            "version.npy",
            b"\x93NUMPY\x04\x00\x00\x00".to_vec(),
            &["format version 4.0"],
        ),
        (
            "header_len.npy",
            npy_file(&f4("(1,)"), &[])[..20].to_vec(),
            &["truncated", "20 bytes"],
        ),
        (
            "data.npy",
            npy_file(&f4("(2, 2)"), &[0; 12]),
            &["shape [2, 2] of <f4 needs 16 bytes", "has 12"],
        ),
        (
            "trailing.npy",
            npy_file(&f4("(1,)"), &[0; 5]),
            &["needs 4 bytes"],
        ),
        (
            "overflow.npy",
            npy_file(&f4("(4294967296, 4294967296)"), &[]),
            &["more than 2^64"],
        ),
        (
            "big_endian.npy",
            npy_file(
                "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
                &[0; 4],
            ),
            &["big-endian"],
        ),
        (
            "complex.npy",
            npy_file(
                "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
                &[0; 8],
            ),
            &["unsupported dtype \"<c8\""],
        ),
        (
            "structured.npy",
            npy_file(
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                &[0; 4],
            ),
            &["structured"],
        ),
        (
            "no_shape.npy",
            npy_file("{'descr': '<f4', 'fortran_order': False}", &[]),
            &["no `shape`"],
        ),
        (
            "syntax.npy",
            npy_file("{'descr' '<f4'}", &[]),
            &["expected `:`"],
        ),
        (
            "negative.npy",
            npy_file(&f4("(-1,)"), &[]),
            &["expected a dimension"],
        ),
    ];
    for (file, bytes, needles) in cases {
        let path = dir.join(file);
        std::fs::write(&path, &bytes).unwrap();
        let msg = npy::read(&path).expect_err(file).to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "no path in: {msg}"
        );
        for n in needles {
            assert!(msg.contains(n), "`{n}` not in: {msg}");
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let dir = TempDir::new("io-npy", "truncation");
    let path = dir.join("t.npy");
    npy::write(&path, &Tensor::new([2], vec![1.0, 2.0]).unwrap()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for len in 0..bytes.len() {
        assert!(
            npy::from_bytes(&bytes[..len], "cut.npy").is_err(),
            "prefix {len} accepted"
        );
    }
}
