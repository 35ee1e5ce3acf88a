//! Arbitrary bytes as a PyTorch `.bin` checkpoint: zip parsing, the pickle machine and tensor
//! materialisation must fail cleanly, within bounded memory.
#![no_main]

use invdiff::io::torch_bin;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = torch_bin::from_bytes(data, "fuzz.bin");
});
