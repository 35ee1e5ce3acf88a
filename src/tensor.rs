//! A plain host tensor: a shape and a row-major `Vec<f32>`.
//!
//! This is the currency of the public API and of file I/O (NCHW, as PyTorch writes it). The
//! engines keep their own internal layouts (channels-last) and convert at the boundary.

use crate::{Error, Result};

/// Row-major f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data`; fails if its length is not the product of `shape`.
    pub fn new(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Result<Self> {
        let shape = shape.into();
        // Checked: a wrapped product could match a short `data` for a shape it cannot hold.
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let Some(n) = n else {
            return Err(Error::input(format!(
                "tensor of shape {shape:?} has more values than memory can address"
            )));
        };
        if n != data.len() {
            return Err(Error::input(format!(
                "tensor of shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>) -> Self {
        let shape = shape.into();
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    /// A tensor whose every element is `value`.
    pub fn full(shape: impl Into<Vec<usize>>, value: f32) -> Self {
        let mut t = Self::zeros(shape);
        t.data.fill(value);
        t
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: impl Into<Vec<usize>>) -> Result<Self> {
        let shape = shape.into();
        let n: usize = shape.iter().product();
        if n != self.data.len() {
            return Err(Error::input(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        self.shape = shape;
        Ok(self)
    }

    /// The four dimensions of an NCHW tensor, or an error naming `what` and the shape found.
    pub fn dims4(&self, what: &str) -> Result<[usize; 4]> {
        match self.shape[..] {
            [n, c, h, w] => Ok([n, c, h, w]),
            _ => Err(Error::input(format!(
                "{what}: expected a 4-d tensor [N,C,H,W], got shape {:?}",
                self.shape
            ))),
        }
    }

    /// Image `i` of a batch (the first dimension), as a tensor with a batch of one.
    pub fn batch_item(&self, i: usize) -> Tensor {
        let per: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = 1;
        Tensor {
            shape,
            data: self.data[i * per..(i + 1) * per].to_vec(),
        }
    }

    /// Stacks tensors of identical shape `[1, ...]` or `[...]` along a new or the first dimension.
    pub fn concat_batch(items: &[Tensor]) -> Result<Tensor> {
        let first = items
            .first()
            .ok_or_else(|| Error::input("cannot stack an empty list of tensors"))?;
        let inner = &first.shape[1..];
        let mut data = Vec::with_capacity(first.numel() * items.len());
        let mut n = 0;
        for t in items {
            if &t.shape[1..] != inner {
                return Err(Error::input(format!(
                    "cannot batch tensors of shapes {:?} and {:?}",
                    first.shape, t.shape
                )));
            }
            n += t.shape[0];
            data.extend_from_slice(&t.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = n;
        Ok(Tensor { shape, data })
    }

    /// True if every element is finite.
    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }
}

/// Relative L2 error ||a - b|| / ||b|| (b is the reference), computed in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_l2 of slices of different lengths");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Largest absolute difference between two slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
