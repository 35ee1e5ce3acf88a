//! Arbitrary bytes as a safetensors file: reading must fail cleanly or yield tensors that
//! convert without panicking.
#![no_main]

use invdiff::io::safetensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = safetensors::from_bytes(data.to_vec(), "fuzz.safetensors") {
        for name in file.names() {
            let _ = file.get(name);
            let _ = file.get_i64(name);
        }
        let _ = file.get("not a tensor");
    }
});
