//! The TMA copies at input stride 2 (`INVDIFF_TMA_STRIDED`, a candidate): whole networks with
//! the stride-2 launches on TMA against the same networks with them on the lean loaders, bit
//! for bit. The kernels themselves, against the cp.async forms, are the tensor-core
//! convolution group's rows, which try these forms only with the switch on
//! ([`tma_tried`](crate::cuda::kernels::tma_tried)): scripts/device_check.sh runs that group
//! so in a run of its own, as a faulting kernel ends every check after it.

use super::Tester;
use crate::cuda::profile::StepTime;
use crate::cuda::unet::CudaUnet;
use crate::{switches, Result};

impl Tester<'_> {
    /// The celebahq architecture (random weights) at 64x64 x 2 and 256x256 x 1, in bf16 and
    /// fp16, as configured but for the stride-2 launches (the downsamplings' forwards, the
    /// folded upsamplings' input gradients): on TMA, their forward and forward + VJP the same
    /// to the bit as on the lean loaders, where the program has such a launch on TMA. Every
    /// split of K stays (`set_strided_tma`), so that only the copies change. The candidate as
    /// it would run (a two-way split unsplit to stage) meets the CPU in the variant's network
    /// rows instead.
    pub(super) fn strided_tma_unets(&mut self, ordinal: usize) -> Result<()> {
        if switches::is("INVDIFF_WGMMA_TMA", "0") {
            let why = "not checked: no TMA copies (INVDIFF_WGMMA_TMA=0)";
            let op = "celebahq forward + vjp, TMA copies at stride 2";
            self.check_row(op.into(), why.into(), true);
            return Ok(());
        }
        let strided = |s: &StepTime| {
            let stride2 = s.kind == "conv 3x3 s2 fwd" || s.shape.contains(" row class ");
            stride2 && s.variant.contains("TMA loads")
        };
        let (op, what) = ("TMA copies at stride 2", "stride-2 launches on TMA");
        self.same_bits_where_present(ordinal, op, CudaUnet::set_strided_tma, what, strided)
    }
}
