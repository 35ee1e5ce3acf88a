//! How the launches are scheduled or merged, each way against the other, bit for bit: a
//! convolution's parity-class launches side by side on the streams
//! (`INVDIFF_CLASS_CONCURRENCY`), and GroupNorms computed by the reductions of the split
//! launches before them (`INVDIFF_GN_FROM_REDUCTION`), whole networks against the programs
//! without.

use super::networks::{LAUNCHES, ORDERED_PAIRS};
use super::Tester;
use crate::cuda::precision::Precision;
use crate::cuda::streams::streams_wanted;
use crate::cuda::unet::CudaUnet;
use crate::{switches, Result};

impl Tester<'_> {
    /// The celebahq architecture (random weights) at 64x64 x 2 and 256x256 x 1, in bf16 and
    /// fp16, as configured but with each convolution's parity-class launches side by side on
    /// the streams: a DPS step's schedule orders fewer pairs of steps, and its forward + VJP
    /// is the same to the bit as with the classes in order (the same launches, on disjoint
    /// pixels: a difference would mean an order lost that some other array needed). With one
    /// stream (`INVDIFF_STREAMS=1`) nothing runs side by side, and a row says so instead.
    pub(super) fn class_concurrency_unets(&mut self, ordinal: usize) -> Result<()> {
        let op = "parity classes side by side";
        if streams_wanted() == 1 {
            let why = "not checked: one stream (INVDIFF_STREAMS=1)";
            self.check_row(format!("celebahq forward + vjp, {op}"), why.into(), true);
            return Ok(());
        }
        let set = CudaUnet::set_class_concurrency;
        self.same_bits_choice_unets(ordinal, op, set, ORDERED_PAIRS)
    }

    /// The same networks as configured but with the one-pass GroupNorms after split launches
    /// computed by those launches' reductions (kernels/norm.cu `conv_splitk_reduce_norm`; at
    /// 256x256 x 1 the 8x8 and 16x16 levels' 24, fewer at 64x64 x 2): fewer launches, and the
    /// forward + VJP the same to the bit as with the reduction and the GroupNorm apart (the
    /// same reduction, then gn_one_pass's sums in its order).
    /// In fp32 too (the fp32 kernels' split launches, an fp32 GroupNorm output). Without
    /// one-pass GroupNorms (`INVDIFF_GN_ONE_PASS=0`) there is nothing to fuse, and a row says so.
    pub(super) fn reduction_norm_unets(&mut self, ordinal: usize) -> Result<()> {
        let op = "GroupNorms computed by split reductions";
        if switches::is("INVDIFF_GN_ONE_PASS", "0") {
            let why = "not checked: no one-pass GroupNorms (INVDIFF_GN_ONE_PASS=0)";
            self.check_row(format!("celebahq forward + vjp, {op}"), why.into(), true);
            return Ok(());
        }
        let set = CudaUnet::set_gn_from_reduction;
        self.same_bits_choice_unets(ordinal, op, set, LAUNCHES)?;
        let (model, networks) = self.candidate_networks(false)?;
        for net in &networks {
            let mut gpu = CudaUnet::with_precision(&model, ordinal, Precision::Fp32)?;
            self.same_bits_choice_rows(&mut gpu, net, Precision::Fp32, op, set, LAUNCHES)?;
        }
        Ok(())
    }
}
