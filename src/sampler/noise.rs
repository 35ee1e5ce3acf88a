//! Where a sampler's randomness comes from: a seed, or tensors written by another
//! implementation (so that runs can be compared step by step).

use crate::io::safetensors;
use crate::{rng, Error, Result, Tensor};
use std::path::Path;

/// The initial noise x_T and the per-step draws z_i of a sampling run.
#[derive(Clone, Debug)]
pub enum Noise {
    /// Counter-based normals: image `k` of the data set draws x_T from stream `k << 32` and the
    /// z of loop step `i` from stream `(k << 32) | (i + 1)` of `seed`. An image's noise depends
    /// only on the seed, its index and the step, never on the batch it is run in.
    Seeded { seed: u64, image_ids: Vec<u64> },
    /// `x_T` `[B, C, H, W]` and `z` `[S, B, C, H, W]` (`z[i]` is the draw of loop step i, i = 0
    /// the first and noisiest step, used only at steps that add noise).
    Injected { x_t: Tensor, z: Option<Tensor> },
}

impl Noise {
    /// Seeded noise for images `first, first + 1, ...` (their indices in the data set).
    pub fn seeded(seed: u64, first: u64, count: usize) -> Self {
        Noise::Seeded {
            seed,
            // Saturating: ids past u64::MAX do not exist, and `check` then counts too few.
            image_ids: (first..first.saturating_add(count as u64)).collect(),
        }
    }

    /// Reads a NOISE file (`x_T`, and `z` when the run adds noise).
    pub fn from_file(path: &Path) -> Result<Self> {
        let f = safetensors::read(path)?;
        let x_t = f.get("x_T")?;
        x_t.dims4("x_T")
            .map_err(|e| Error::format(path, e.to_string()))?;
        let z = f.contains("z").then(|| f.get("z")).transpose()?;
        Ok(Noise::Injected { x_t, z })
    }

    /// Checks that this noise fits a run of `steps` steps on `[B, C, H, W]` images, naming
    /// what does not fit.
    pub fn check(&self, shape: [usize; 4], steps: usize, needs_z: bool) -> Result<()> {
        match self {
            Noise::Seeded { image_ids, .. } => {
                if image_ids.len() != shape[0] {
                    return Err(Error::input(format!(
                        "noise: {} image ids for a batch of {}",
                        image_ids.len(),
                        shape[0]
                    )));
                }
            }
            Noise::Injected { x_t, z } => {
                if x_t.shape() != shape {
                    return Err(Error::input(format!(
                        "noise file: `x_T` has shape {:?}, the run needs {shape:?}",
                        x_t.shape()
                    )));
                }
                match z {
                    None if needs_z => return Err(Error::input(
                        "noise file: no `z` tensor, but this scheduler adds noise at some steps",
                    )),
                    Some(z) if needs_z => {
                        let want = [steps, shape[0], shape[1], shape[2], shape[3]];
                        if z.shape().len() != 5
                            || z.shape()[0] < steps
                            || z.shape()[1..] != want[1..]
                        {
                            return Err(Error::input(format!(
                                "noise file: `z` has shape {:?}, the run needs {want:?}",
                                z.shape()
                            )));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// x_T.
    pub fn initial(&self, shape: [usize; 4]) -> Tensor {
        match self {
            Noise::Seeded { seed, image_ids } => draw(*seed, image_ids, 0, shape),
            Noise::Injected { x_t, .. } => x_t.clone(),
        }
    }

    /// z of loop step `step` (only called at steps that add noise; [`check`](Self::check)
    /// made sure it exists).
    pub fn step(&self, step: usize, shape: [usize; 4]) -> Tensor {
        match self {
            Noise::Seeded { seed, image_ids } => draw(*seed, image_ids, step as u64 + 1, shape),
            Noise::Injected { z, .. } => {
                let z = z
                    .as_ref()
                    .expect("checked: z is present when steps add noise");
                let per: usize = shape.iter().product();
                let data = z.data()[step * per..(step + 1) * per].to_vec();
                Tensor::new(shape.to_vec(), data).expect("checked shape")
            }
        }
    }
}

fn draw(seed: u64, image_ids: &[u64], slot: u64, shape: [usize; 4]) -> Tensor {
    let per: usize = shape[1..].iter().product();
    let mut t = Tensor::zeros(shape.to_vec());
    for (chunk, &id) in t.data_mut().chunks_exact_mut(per).zip(image_ids) {
        rng::fill_normal(seed, (id << 32) | slot, chunk);
    }
    t
}
