//! The network's parameters on the device, in the layouts the kernels read, uploaded once.
//!
//! Convolutions: `[(tap, ci), co]` for the forward product (the CPU's layout too), and
//! `[(tap, co), ci]` for the input gradient, built on the device from the former the first time
//! a recording pass is planned (inference never pays for it); for a 3x3 convolution whose
//! upsampled input a program folds into it (`KernelConfig::upsample_fold`), the same layouts of
//! its 16 folded taps, summed on the host the first time such a program is planned. Linear
//! layers: PyTorch's `[out, inp]` (input gradient, and the few-row kernel) and its transpose
//! `[inp, out]` (the forward product over tokens); q, k and v are fused into one `[3 inner, c]`
//! matrix.
//!
//! In bf16 or fp16 every array a tensor-core convolution reads (both convolution layouts and
//! both linear layouts) also gets a 16-bit copy, rounded on the device from the fp32 one when
//! that is made; the fp32 arrays stay for the convolutions that fall back to fp32 and for the
//! few-row linear kernel. tf32 rounds the fp32 weights as it loads them.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::device::{cu, Gpu};
use super::kernels::{fold_upsampled_weights, ConvKernel, ConvLaunch, DPtr};
use super::precision::Precision;
use super::program::{WKind, W};
use crate::model::graph::{Graph, ParamKind};
use crate::model::Weights;
use crate::{Error, Result};

/// A device array with its address, which launches take raw.
pub(crate) struct DevBuf {
    pub slice: CudaSlice<f32>,
    pub ptr: DPtr,
}

impl DevBuf {
    fn wrap(slice: CudaSlice<f32>, stream: &CudaStream) -> DevBuf {
        // Event tracking is off for the context (see Gpu::open), so the guard records nothing.
        let ptr = {
            let (ptr, _guard) = slice.device_ptr(stream);
            ptr
        };
        DevBuf { slice, ptr }
    }

    /// A copy of `data` on the device. Like [`zeros`](Self::zeros), an empty `data` still gets
    /// one element: a zero-length allocation has a null address, which launches refuse even
    /// where they read nothing (a product with no K).
    pub fn upload(stream: &std::sync::Arc<CudaStream>, data: &[f32]) -> Result<DevBuf> {
        if data.is_empty() {
            return Self::zeros(stream, 0);
        }
        let slice = cu(stream.clone_htod(data), "uploading to the GPU")?;
        Ok(Self::wrap(slice, stream))
    }

    /// `len` zeros on the device.
    pub fn zeros(stream: &std::sync::Arc<CudaStream>, len: usize) -> Result<DevBuf> {
        let slice = cu(
            stream.alloc_zeros::<f32>(len.max(1)),
            &format!("allocating {} MiB on the GPU", (4 * len) >> 20),
        )?;
        Ok(Self::wrap(slice, stream))
    }

    /// Overwrites the array with `data` (same length).
    pub fn write(&mut self, stream: &std::sync::Arc<CudaStream>, data: &[f32]) -> Result<()> {
        let mut view = self.slice.slice_mut(..data.len());
        cu(stream.memcpy_htod(data, &mut view), "copying to the GPU")
    }

    /// The array's contents (waits for the stream).
    pub fn download(&self, stream: &std::sync::Arc<CudaStream>) -> Result<Vec<f32>> {
        let v = cu(stream.clone_dtoh(&self.slice), "copying from the GPU")?;
        cu(stream.synchronize(), "waiting for the GPU")?;
        Ok(v)
    }

    /// Length in f32 elements.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// A bf16 or fp16 copy of this array's first `len` values, packed two per f32 slot.
    pub fn to_half(&self, gpu: &Gpu, len: usize, precision: Precision) -> Result<DevBuf> {
        let h = DevBuf::zeros(&gpu.stream, len.div_ceil(2))?;
        gpu.kernels
            .convert_half(&gpu.stream, self.ptr, h.ptr, len, precision)?;
        Ok(h)
    }
}

/// The 16-bit copy of `buf` at `precision`, if it takes one.
fn half_of(gpu: &Gpu, buf: &DevBuf, precision: Precision) -> Result<Option<DevBuf>> {
    precision
        .is_half()
        .then(|| buf.to_half(gpu, buf.len(), precision))
        .transpose()
}

/// `[cout, cin, k, k]` (PyTorch) to `[(tap, ci), co]`.
pub(crate) fn conv_forward_layout(weight: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let taps = k * k;
    let mut out = vec![0.0; weight.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..taps {
                out[(t * cin + ci) * cout + co] = weight[(co * cin + ci) * taps + t];
            }
        }
    }
    out
}

/// Transpose of a row-major `rows x cols` matrix.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// Which input-gradient layouts of its convolutions a program reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GradLayouts {
    None,
    /// Only the 16-bit copy, which forward wgmma launches read as their K-major weights.
    HalfOnly,
    /// Both copies, for a backward pass.
    Both,
}

impl GradLayouts {
    /// A recording program's, or (`k_major_half`: wgmma in bf16/fp16) a forward one's.
    pub fn of(record: bool, k_major_half: bool) -> Self {
        match (record, k_major_half) {
            (true, _) => GradLayouts::Both,
            (false, true) => GradLayouts::HalfOnly,
            (false, false) => GradLayouts::None,
        }
    }
}

/// The forward layout of a convolution and, once needed, the input-gradient layout, each with
/// its 16-bit copy in bf16 or fp16; for a 3x3 convolution after an upsampling, once needed,
/// the same of its folded form.
pub(crate) struct DevConv {
    pub forward: DevBuf,
    pub backward: Option<DevBuf>,
    pub forward_half: Option<DevBuf>,
    pub backward_half: Option<DevBuf>,
    pub bias: DevBuf,
    pub cin: usize,
    pub cout: usize,
    pub taps: usize,
    pub precision: Precision,
    /// The 16-tap convolution of the low-resolution input that computes this one on its
    /// nearest 2x upsampling ([`fold_upsampled_weights`]), with the same bias.
    pub folded: Option<Box<DevConv>>,
    /// For a residual block's second convolution with its 1x1 shortcut fused into it
    /// ([`WKind::BiasWithShortcut`]): that shortcut's parameter group, and the two biases
    /// summed in f32.
    pub bias_with_shortcut: Option<(usize, DevBuf)>,
}

impl DevConv {
    /// Uploads a PyTorch-layout `[cout, cin, k, k]` weight and its bias, for convolutions at
    /// `precision`.
    pub fn upload(
        gpu: &Gpu,
        weight: &[f32],
        bias: &[f32],
        cout: usize,
        cin: usize,
        k: usize,
        precision: Precision,
    ) -> Result<DevConv> {
        let forward = conv_forward_layout(weight, cout, cin, k);
        Self::from_forward_layout(gpu, &forward, bias, cout, cin, k * k, precision)
    }

    /// A convolution of `taps` taps from its forward layout `[(tap, ci), co]`.
    fn from_forward_layout(
        gpu: &Gpu,
        forward: &[f32],
        bias: &[f32],
        cout: usize,
        cin: usize,
        taps: usize,
        precision: Precision,
    ) -> Result<DevConv> {
        let forward = DevBuf::upload(&gpu.stream, forward)?;
        Ok(DevConv {
            forward_half: half_of(gpu, &forward, precision)?,
            forward,
            backward: None,
            backward_half: None,
            bias: DevBuf::upload(&gpu.stream, bias)?,
            cin,
            cout,
            taps,
            precision,
            folded: None,
            bias_with_shortcut: None,
        })
    }

    /// Builds the folded form of this 3x3 convolution ([`DevConv::folded`]) if it is not there
    /// yet, from the forward weights on the device (a copy to the host and back, once).
    pub fn ensure_folded(&mut self, gpu: &Gpu) -> Result<&mut DevConv> {
        if self.folded.is_none() {
            if self.taps != 9 {
                return Err(Error::Cuda(format!(
                    "internal: an upsampling folded into a {}-tap convolution ({}->{})",
                    self.taps, self.cin, self.cout
                )));
            }
            let forward = self.forward.download(&gpu.stream)?;
            let bias = self.bias.download(&gpu.stream)?;
            let folded = fold_upsampled_weights(&forward, self.cin, self.cout);
            self.folded = Some(Box::new(Self::from_forward_layout(
                gpu,
                &folded,
                &bias,
                self.cout,
                self.cin,
                16,
                self.precision,
            )?));
        }
        Ok(self.folded.as_deref_mut().expect("built above"))
    }

    /// The forward (or input-gradient, `backward`) weights as `kernel` reads them: the 16-bit
    /// copy for a bf16 or fp16 tensor-core launch, the fp32 array otherwise.
    pub fn weights_for(&self, kernel: ConvKernel, backward: bool) -> Result<DPtr> {
        let (f32s, halves) = if backward {
            (self.backward.as_ref(), self.backward_half.as_ref())
        } else {
            (Some(&self.forward), self.forward_half.as_ref())
        };
        let buf = match kernel {
            ConvKernel::Tensor(p) | ConvKernel::NarrowTensor(p) if p.is_half() => {
                halves.filter(|_| p == self.precision)
            }
            _ => f32s,
        };
        buf.map(|b| b.ptr).ok_or_else(|| {
            Error::Cuda(format!(
                "internal: a {}x{} convolution has no {} weights for {kernel:?}{}",
                self.cin,
                self.cout,
                self.precision,
                if backward { " (input gradient)" } else { "" }
            ))
        })
    }

    /// Builds the input-gradient layout on the device, and its 16-bit copy, if they are not
    /// there yet.
    pub fn ensure_backward(&mut self, gpu: &Gpu) -> Result<()> {
        if self.backward.is_none() {
            let b = self.transposed(gpu)?;
            if self.backward_half.is_none() {
                self.backward_half = half_of(gpu, &b, self.precision)?;
            }
            self.backward = Some(b);
        }
        Ok(())
    }

    /// Builds the input-gradient layouts `which` asks for, if they are not there yet.
    pub fn ensure_grad_layouts(&mut self, gpu: &Gpu, which: GradLayouts) -> Result<()> {
        match which {
            GradLayouts::None => Ok(()),
            GradLayouts::HalfOnly => self.ensure_backward_half(gpu),
            GradLayouts::Both => self.ensure_backward(gpu),
        }
    }

    /// Builds only the 16-bit copy of the input-gradient layout, which forward wgmma launches
    /// read as their K-major weights: a forward-only program needs no fp32 copy of it, so the
    /// transpose it is made from is dropped.
    pub fn ensure_backward_half(&mut self, gpu: &Gpu) -> Result<()> {
        if self.backward_half.is_none() {
            self.backward_half = match &self.backward {
                Some(b) => half_of(gpu, b, self.precision)?,
                None => half_of(gpu, &self.transposed(gpu)?, self.precision)?,
            };
        }
        Ok(())
    }

    /// f32 slots the arrays take, the folded form's included.
    fn slots(&self) -> usize {
        let len = |b: &Option<DevBuf>| b.as_ref().map_or(0, DevBuf::len);
        self.forward.len()
            + len(&self.backward)
            + len(&self.forward_half)
            + len(&self.backward_half)
            + self.bias.len()
            + self.bias_with_shortcut.as_ref().map_or(0, |(_, b)| b.len())
            + self.folded.as_ref().map_or(0, |f| f.slots())
    }

    /// The forward weights transposed per tap: the input-gradient layout, in fp32.
    fn transposed(&self, gpu: &Gpu) -> Result<DevBuf> {
        let b = DevBuf::zeros(&gpu.stream, self.forward.len())?;
        gpu.kernels.weight_transpose(
            &gpu.stream,
            self.forward.ptr,
            b.ptr,
            self.taps,
            self.cin,
            self.cout,
        )?;
        Ok(b)
    }
}

enum DevParam {
    Conv(DevConv),
    Linear {
        w: DevBuf,
        wt: DevBuf,
        bias: DevBuf,
        w_half: Option<DevBuf>,
        wt_half: Option<DevBuf>,
    },
    Norm {
        gamma: DevBuf,
        beta: DevBuf,
    },
}

/// Every parameter group of a graph on the device, indexed like `Graph::params`.
pub(crate) struct DevWeights {
    params: Vec<DevParam>,
    precision: Precision,
}

impl DevWeights {
    /// Uploads `weights` (already checked against `graph`) for convolutions at `precision`.
    pub fn upload(
        gpu: &Gpu,
        graph: &Graph,
        weights: &Weights,
        precision: Precision,
    ) -> Result<DevWeights> {
        let mut params = Vec::with_capacity(graph.params.len());
        for p in &graph.params {
            let t = |suffix: &str| weights.get(&format!("{}.{suffix}", p.name)).data();
            params.push(match p.kind {
                ParamKind::Conv { cout, cin, k } => DevParam::Conv(DevConv::upload(
                    gpu,
                    t("weight"),
                    t("bias"),
                    cout,
                    cin,
                    k,
                    precision,
                )?),
                ParamKind::Linear { out, inp } => {
                    linear(gpu, t("weight"), t("bias"), out, inp, precision)?
                }
                ParamKind::Qkv { inner, c } => {
                    let w = [t("to_q.weight"), t("to_k.weight"), t("to_v.weight")].concat();
                    let b = [t("to_q.bias"), t("to_k.bias"), t("to_v.bias")].concat();
                    linear(gpu, &w, &b, 3 * inner, c, precision)?
                }
                ParamKind::Norm { .. } => DevParam::Norm {
                    gamma: DevBuf::upload(&gpu.stream, t("weight"))?,
                    beta: DevBuf::upload(&gpu.stream, t("bias"))?,
                },
            });
        }
        Ok(DevWeights { params, precision })
    }

    /// Builds every convolution's input-gradient layouts `which` asks for (once).
    pub fn ensure_backward(&mut self, gpu: &Gpu, which: GradLayouts) -> Result<()> {
        for p in &mut self.params {
            if let DevParam::Conv(c) = p {
                c.ensure_grad_layouts(gpu, which)?;
            }
        }
        Ok(())
    }

    /// Builds the folded form of convolution `pid` ([`DevConv::folded`]) with the
    /// input-gradient layouts `which` asks for, as [`ensure_backward`](Self::ensure_backward)
    /// does for every convolution.
    pub fn ensure_folded(&mut self, gpu: &Gpu, pid: usize, which: GradLayouts) -> Result<()> {
        let Some(DevParam::Conv(c)) = self.params.get_mut(pid) else {
            return Err(Error::Cuda(format!(
                "internal: parameter group {pid} is not a convolution to fold"
            )));
        };
        c.ensure_folded(gpu)?.ensure_grad_layouts(gpu, which)
    }

    /// Sums the bias of convolution `pid` and that of `shortcut`, its residual block's 1x1
    /// shortcut, into [`DevConv::bias_with_shortcut`] if that is not there yet (a copy of both
    /// to the host and back, once): the bias of the launch that fuses the two.
    pub fn ensure_bias_with_shortcut(
        &mut self,
        gpu: &Gpu,
        pid: usize,
        shortcut: usize,
    ) -> Result<()> {
        let bias_of = |p: Option<&DevParam>, what: &str| match p {
            Some(DevParam::Conv(c)) => Ok((c.cout, c.bias.download(&gpu.stream)?)),
            _ => Err(Error::Cuda(format!(
                "internal: parameter group {what} is not a convolution"
            ))),
        };
        if let Some(DevParam::Conv(c)) = self.params.get(pid) {
            match &c.bias_with_shortcut {
                Some((s, _)) if *s == shortcut => return Ok(()),
                Some((s, _)) => {
                    return Err(Error::Cuda(format!(
                        "internal: convolution {pid} fused with shortcut {shortcut}, and before \
                         with {s}"
                    )))
                }
                None => {}
            }
        }
        let (cout, own) = bias_of(self.params.get(pid), &pid.to_string())?;
        let (cout2, other) = bias_of(self.params.get(shortcut), &shortcut.to_string())?;
        if cout != cout2 {
            return Err(Error::Cuda(format!(
                "internal: a {cout}-channel convolution fused with a {cout2}-channel shortcut"
            )));
        }
        let sum: Vec<f32> = own.iter().zip(&other).map(|(a, b)| a + b).collect();
        let buf = DevBuf::upload(&gpu.stream, &sum)?;
        if let Some(DevParam::Conv(c)) = self.params.get_mut(pid) {
            c.bias_with_shortcut = Some((shortcut, buf));
        }
        Ok(())
    }

    /// The device address of array `w`.
    pub fn ptr(&self, w: W) -> Result<DPtr> {
        let missing = || {
            Error::Cuda(format!(
                "internal: parameter group {} has no {:?} array",
                w.pid, w.kind
            ))
        };
        let p = self.params.get(w.pid).ok_or_else(missing)?;
        let buf = match (p, w.kind) {
            (DevParam::Conv(c), WKind::ConvForward) => &c.forward,
            (DevParam::Conv(c), WKind::ConvBackward) => c.backward.as_ref().ok_or_else(missing)?,
            (DevParam::Conv(c), WKind::FoldForward) => {
                &c.folded.as_ref().ok_or_else(missing)?.forward
            }
            (DevParam::Conv(c), WKind::FoldBackward) => c
                .folded
                .as_ref()
                .and_then(|f| f.backward.as_ref())
                .ok_or_else(missing)?,
            (DevParam::Conv(c), WKind::Bias) => &c.bias,
            (DevParam::Conv(c), WKind::BiasWithShortcut) => {
                &c.bias_with_shortcut.as_ref().ok_or_else(missing)?.1
            }
            (DevParam::Linear { w, .. }, WKind::Linear) => w,
            (DevParam::Linear { wt, .. }, WKind::LinearT) => wt,
            (DevParam::Linear { bias, .. }, WKind::Bias) => bias,
            (DevParam::Norm { gamma, .. }, WKind::Gamma) => gamma,
            (DevParam::Norm { beta, .. }, WKind::Beta) => beta,
            _ => return Err(missing()),
        };
        Ok(buf.ptr)
    }

    /// The address of array `w` as `launch` reads it: the 16-bit copy for a bf16 or fp16
    /// tensor-core launch (the few-output kernel's too), the fp32 array otherwise; K-major
    /// ([`W::k_major`]) for wgmma.
    pub fn conv_ptr(&self, w: W, launch: &ConvLaunch) -> Result<DPtr> {
        let kernel = launch.kernel;
        let w = if launch.wgmma { w.k_major() } else { w };
        let precision = match kernel {
            ConvKernel::Tensor(p) | ConvKernel::NarrowTensor(p) if p.is_half() => p,
            _ => return self.ptr(w),
        };
        let missing = || {
            Error::Cuda(format!(
                "internal: parameter group {} has no {precision} copy of its {:?} array",
                w.pid, w.kind
            ))
        };
        let p = self.params.get(w.pid).ok_or_else(missing)?;
        let buf = match (p, w.kind) {
            (DevParam::Conv(c), WKind::ConvForward) => return c.weights_for(kernel, false),
            (DevParam::Conv(c), WKind::ConvBackward) => return c.weights_for(kernel, true),
            (DevParam::Conv(c), WKind::FoldForward | WKind::FoldBackward) => {
                let folded = c.folded.as_ref().ok_or_else(missing)?;
                return folded.weights_for(kernel, w.kind == WKind::FoldBackward);
            }
            (DevParam::Linear { w_half, .. }, WKind::Linear) => w_half.as_ref(),
            (DevParam::Linear { wt_half, .. }, WKind::LinearT) => wt_half.as_ref(),
            _ => None,
        };
        if precision != self.precision {
            return Err(missing());
        }
        Ok(buf.ok_or_else(missing)?.ptr)
    }

    /// Device bytes the parameters take, in every layout uploaded so far.
    pub fn bytes(&self) -> usize {
        let len = |b: &Option<DevBuf>| b.as_ref().map_or(0, DevBuf::len);
        let n: usize = self
            .params
            .iter()
            .map(|p| match p {
                DevParam::Conv(c) => c.slots(),
                DevParam::Linear {
                    w,
                    wt,
                    bias,
                    w_half,
                    wt_half,
                } => w.len() + wt.len() + bias.len() + len(w_half) + len(wt_half),
                DevParam::Norm { gamma, beta } => gamma.len() + beta.len(),
            })
            .sum();
        4 * n
    }
}

fn linear(
    gpu: &Gpu,
    w: &[f32],
    b: &[f32],
    out: usize,
    inp: usize,
    precision: Precision,
) -> Result<DevParam> {
    let wt = DevBuf::upload(&gpu.stream, &transpose(w, out, inp))?;
    let w = DevBuf::upload(&gpu.stream, w)?;
    Ok(DevParam::Linear {
        w_half: half_of(gpu, &w, precision)?,
        wt_half: half_of(gpu, &wt, precision)?,
        w,
        wt,
        bias: DevBuf::upload(&gpu.stream, b)?,
    })
}
