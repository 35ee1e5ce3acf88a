//! Arbitrary bytes as a `.npy` file: the header parser and conversions must fail cleanly.
#![no_main]

use invdiff::io::npy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = npy::from_bytes(data, "fuzz.npy");
});
