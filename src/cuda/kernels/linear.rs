//! Linear layers on few rows (kernels/linear.cu): the time-embedding MLP, one launch per layer
//! or one for a table of them.

use cudarc::driver::{CudaStream, PushKernelArg};

use super::{i32_of, need, DPtr, Kernels};
use crate::cuda::device::cu;
use crate::{Error, Result};

/// Layers one `linear_batch` launch computes at most (kernels/linear.cu caches their table in
/// shared memory).
pub(crate) const LINEAR_BATCH_MAX: usize = 64;

/// LinearItem of kernels/linear.cu, field for field: one layer of a `linear_batch` launch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct LinearItem {
    w: DPtr,
    bias: DPtr,
    y: DPtr,
    out: i32,
    start: i32,
}

const _: () = assert!(std::mem::size_of::<LinearItem>() == 32);

/// f32 slots one layer takes in a `linear_batch` table.
pub(crate) const LINEAR_ITEM_WORDS: usize = std::mem::size_of::<LinearItem>() / 4;

/// The table a `linear_batch` launch reads, as the f32 words of the buffer that holds it: per
/// layer `(w, bias, y, out)`, its weights `[out, inp]`, bias `[out]` and output `[rows, out]`.
pub(crate) fn linear_batch_table(layers: &[(DPtr, DPtr, DPtr, usize)]) -> Result<Vec<f32>> {
    if layers.is_empty() || layers.len() > LINEAR_BATCH_MAX {
        return Err(Error::Cuda(format!(
            "internal: a batched linear launch of {} layers (1 to {LINEAR_BATCH_MAX})",
            layers.len()
        )));
    }
    let mut start = 0;
    let mut items = Vec::with_capacity(layers.len());
    for &(w, bias, y, out) in layers {
        for (p, what) in [(w, "weights"), (bias, "bias"), (y, "output")] {
            need(p, what)?;
        }
        items.push(LinearItem {
            w,
            bias,
            y,
            out: i32_of(out, "outputs")?,
            start: i32_of(start, "batched outputs")?,
        });
        start += out;
    }
    Ok(bytemuck::cast_slice(&items).to_vec())
}

/// `rows`, `inp` and `out` of a few-row linear launch as the kernels' 32-bit sizes, checked
/// together with every index they form.
fn linear_sizes(rows: usize, inp: usize, out: usize) -> Result<(i32, i32, i32)> {
    i32_of(rows * out.max(inp), "rows x width")?;
    Ok((
        i32_of(rows, "rows")?,
        i32_of(inp, "inputs")?,
        i32_of(out, "outputs")?,
    ))
}

impl Kernels {
    /// `y = (f(x) Wᵀ + b + res) / out_div` over few rows; `w` is `[out, inp]`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_rows(
        &self,
        st: &CudaStream,
        x: DPtr,
        w: DPtr,
        bias: DPtr,
        res: DPtr,
        y: DPtr,
        rows: usize,
        inp: usize,
        out: usize,
        silu_in: bool,
        out_div: f32,
    ) -> Result<()> {
        for (p, what) in [(x, "input"), (w, "weights"), (bias, "bias"), (y, "output")] {
            need(p, what)?;
        }
        let (r, i, o) = linear_sizes(rows, inp, out)?;
        let silu = silu_in as i32;
        let mut b = st.launch_builder(&self.linear_rows);
        b.arg(&x)
            .arg(&w)
            .arg(&bias)
            .arg(&res)
            .arg(&y)
            .arg(&r)
            .arg(&i)
            .arg(&o)
            .arg(&silu)
            .arg(&out_div);
        // SAFETY: x is rows x inp, w out x inp, y (and res if set) rows x out.
        cu(
            unsafe { b.launch(self.warps(rows * out)) }.map(drop),
            "launching linear_rows",
        )
    }

    /// [`linear_rows`](Self::linear_rows) (no residual) of several layers reading the same
    /// `x` in one launch: `table` ([`linear_batch_table`]) lists `layers` layers whose widths
    /// add up to `total_out`, each writing its own output.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_batch(
        &self,
        st: &CudaStream,
        x: DPtr,
        table: DPtr,
        layers: usize,
        total_out: usize,
        rows: usize,
        inp: usize,
        silu_in: bool,
        out_div: f32,
    ) -> Result<()> {
        need(x, "input")?;
        need(table, "layer table")?;
        if layers == 0 || layers > LINEAR_BATCH_MAX {
            return Err(Error::Cuda(format!(
                "internal: a batched linear launch of {layers} layers (1 to {LINEAR_BATCH_MAX})"
            )));
        }
        let l = i32_of(layers, "layers")?;
        let (r, i, o) = linear_sizes(rows, inp, total_out)?;
        let silu = silu_in as i32;
        let mut b = st.launch_builder(&self.linear_batch);
        b.arg(&x)
            .arg(&table)
            .arg(&l)
            .arg(&r)
            .arg(&i)
            .arg(&o)
            .arg(&silu)
            .arg(&out_div);
        // SAFETY: x is rows x inp; the table holds `layers` items whose widths add up to
        // total_out, each with weights out x inp, a bias of out and an output of rows x out
        // (the kernel skips outputs past an item's width).
        cu(
            unsafe { b.launch(self.warps(rows * total_out)) }.map(drop),
            "launching linear_batch",
        )
    }
}
