//! Runs a [`Graph`] on the CPU: the forward pass, and the forward pass that records what the
//! vector-Jacobian product needs.
//!
//! Memory: every activation is freed right after its last reader. A recording run keeps, in
//! addition, only what some backward op reads (GroupNorm inputs, the fused q/k/v and the
//! attention probabilities); the backward pass frees each of them as soon as its op is done, and
//! frees each gradient once it has been propagated.

use super::attention;
use super::conv::{self, ConvParams, Geometry};
use super::linear::{self, LinearParams};
use super::norm::{self, Stats};
use super::resample;
use crate::model::graph::{Graph, Op, Pad, ParamKind, Space, Tid};
use crate::model::{Model, Weights};
use crate::{ensure, Result, Tensor};

/// A parameter group in the CPU's layouts.
enum Param {
    Conv(ConvParams),
    Linear(LinearParams),
    Norm { gamma: Vec<f32>, beta: Vec<f32> },
}

/// What an op's backward needs besides its saved inputs.
enum Aux {
    None,
    Stats(Stats),
    Probs(Vec<f32>),
}

/// What a forward pass leaves for the backward pass: every tensor's value (only the saved ones
/// are present) and each op's aux data.
type Recorded = (Vec<Option<Vec<f32>>>, Vec<Aux>);

/// A UNet2DModel on the CPU.
pub struct CpuUnet {
    graph: Graph,
    params: Vec<Param>,
    /// `saved[t]`: some backward op reads the value of tensor `t`.
    saved: Vec<bool>,
    /// `last_read[t]`: index of the last forward op that reads tensor `t`.
    last_read: Vec<Option<usize>>,
    /// Identifies this network's tapes.
    id: u64,
    /// Freed activation and gradient buffers, reused by later ops and calls.
    pool: Pool,
}

impl CpuUnet {
    /// Prepares `model`'s weights in the CPU's layouts.
    pub fn new(model: &Model) -> Self {
        Self::from_parts(model.graph.clone(), &model.weights)
    }

    /// Prepares `weights` (already checked against `graph`).
    pub fn from_parts(graph: Graph, weights: &Weights) -> Self {
        let params = graph
            .params
            .iter()
            .map(|p| {
                let t = |suffix: &str| weights.get(&format!("{}.{suffix}", p.name)).data().to_vec();
                match p.kind {
                    ParamKind::Conv { cout, cin, k } => {
                        Param::Conv(ConvParams::new(&t("weight"), &t("bias"), cout, cin, k))
                    }
                    ParamKind::Linear { out, inp } => {
                        Param::Linear(LinearParams::new(t("weight"), t("bias"), out, inp))
                    }
                    ParamKind::Norm { .. } => Param::Norm {
                        gamma: t("weight"),
                        beta: t("bias"),
                    },
                    ParamKind::Qkv { inner, c } => {
                        let w = [t("to_q.weight"), t("to_k.weight"), t("to_v.weight")].concat();
                        let b = [t("to_q.bias"), t("to_k.bias"), t("to_v.bias")].concat();
                        Param::Linear(LinearParams::new(w, b, 3 * inner, c))
                    }
                }
            })
            .collect();
        let mut saved = vec![false; graph.tensors.len()];
        let mut last_read = vec![None; graph.tensors.len()];
        for (i, op) in graph.ops.iter().enumerate() {
            for t in op.inputs() {
                last_read[t] = Some(i);
            }
            if graph.tensors[op.output()].on_input_path {
                for t in op.saved_for_backward() {
                    saved[t] = true;
                }
            }
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        CpuUnet {
            graph,
            params,
            saved,
            last_read,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            pool: Pool::default(),
        }
    }

    /// The graph this network runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Predicted noise for `sample` (`[N, C, H, W]`) at per-image `timesteps` (length N, or 1
    /// for the whole batch).
    pub fn forward(&self, sample: &Tensor, timesteps: &[f32]) -> Result<Tensor> {
        let (x, dims, t) = self.stage_input(sample, timesteps, false)?;
        let (out, _) = self.run(x, dims, &t, false);
        Ok(self.unstage_output(&out, dims))
    }

    /// Like [`forward`](Self::forward), and also returns the tape for [`vjp`](Self::vjp).
    pub fn forward_recording(&self, sample: &Tensor, timesteps: &[f32]) -> Result<(Tensor, Tape)> {
        let (x, dims, t) = self.stage_input(sample, timesteps, true)?;
        let (out, (values, aux)) = self.run(x, dims, &t, true);
        let eps = self.unstage_output(&out, dims);
        Ok((
            eps,
            Tape {
                network: self.id,
                dims,
                values,
                aux,
            },
        ))
    }

    /// `d/d sample of sum(eps * cotangent)` for the pass recorded in `tape`: the input gradient
    /// for a cotangent shaped like the output. Consumes the tape, freeing what it kept as it
    /// goes.
    pub fn vjp(&self, tape: Tape, cotangent: &Tensor) -> Result<Tensor> {
        ensure!(
            tape.network == self.id,
            "vjp: the tape was recorded by a different network"
        );
        tape.run_backward(self, cotangent)
    }

    /// Validates the input and converts it to channels-last.
    /// With `record`, for a recording pass (memory is checked for it and its backward pass).
    fn stage_input(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        record: bool,
    ) -> Result<(Vec<f32>, Dims, Vec<f32>)> {
        let cfg = &self.graph.config;
        let ([n, c, h, w], t) = self.graph.check_input(sample, timesteps)?;
        self.check_memory(Dims { n, h, w }, record, crate::host::memory_limit())?;
        let mut x = resample::nchw_to_nhwc(sample.data(), c, h, w);
        if cfg.center_input_sample {
            x.iter_mut().for_each(|v| *v = 2.0 * *v - 1.0);
        }
        Ok((x, Dims { n, h, w }, t))
    }

    /// An error, rather than an allocation failure or the kernel's out-of-memory killer part of
    /// the way through, when a pass at `d` (with `record`, and its backward pass) needs more
    /// than the `limit` bytes this process can ever hold (unknown: no check). Only what can
    /// never fit is refused: the estimate is a lower bound (the pool and the weights' lazily
    /// built layouts come on top), and what other processes use comes and goes.
    fn check_memory(&self, d: Dims, record: bool, limit: Option<u64>) -> Result<()> {
        match crate::host::over_limit(self.peak_bytes(d, record), limit) {
            Some(why) => Err(crate::Error::input(format!(
                "a pass over {} image(s) of {}x{} (its activations and, recording, the values \
                 the input gradient reads and the attention scores) needs {why}",
                d.n, d.h, d.w
            ))),
            None => Ok(()),
        }
    }

    /// Bytes of the most buffers a pass at `d` holds at once, as [`run`](Self::run) allocates
    /// and frees them: each activation from its op to its last reader, attention scores during
    /// their op. With `record`, the values a backward op reads and the scores are kept to the
    /// end, and the backward pass adds on top of that tape the gradients of an op's output and
    /// inputs beside it and an attention's score gradients.
    fn peak_bytes(&self, d: Dims, record: bool) -> u64 {
        let g = &self.graph;
        // Saturating throughout: an image of any size a file can hold gives u64::MAX, refused,
        // rather than a product that wraps.
        let bytes = |t: Tid| crate::host::f32_bytes(&g.shape(t, d.n, d.h, d.w), 1);
        let scores = |op: &Op| match *op {
            Op::Attention { y, heads, .. } => {
                let (h, w) = d.hw(g, y);
                let tokens = h.saturating_mul(w);
                crate::host::f32_bytes(&[d.n, heads, tokens, tokens], 1)
            }
            _ => 0,
        };
        let (mut live, mut peak) = (bytes(g.input), 0u64);
        for (i, op) in g.ops.iter().enumerate() {
            live = live
                .saturating_add(bytes(op.output()))
                .saturating_add(scores(op));
            peak = peak.max(live);
            if !record {
                live = live.saturating_sub(scores(op));
            }
            for input in op.inputs() {
                if self.last_read[input] == Some(i) && !(record && self.saved[input]) {
                    live = live.saturating_sub(bytes(input));
                }
            }
        }
        if !record {
            return peak;
        }
        let backward = g
            .ops
            .iter()
            .map(|op| {
                op.inputs()
                    .iter()
                    .fold(bytes(op.output()).saturating_add(scores(op)), |a, &t| {
                        a.saturating_add(bytes(t))
                    })
            })
            .max()
            .unwrap_or(0);
        peak.max(live.saturating_add(backward))
    }

    fn unstage_output(&self, out: &[f32], d: Dims) -> Tensor {
        let c = self.graph.config.out_channels;
        let data = resample::nhwc_to_nchw(out, d.n, c, d.h, d.w);
        Tensor::new(vec![d.n, c, d.h, d.w], data).expect("output shape")
    }

    /// The forward pass. With `record`, returns the values and aux data the backward pass needs.
    fn run(&self, x: Vec<f32>, d: Dims, t: &[f32], record: bool) -> (Vec<f32>, Recorded) {
        let g = &self.graph;
        let mut values: Vec<Option<Vec<f32>>> = vec![None; g.tensors.len()];
        let mut aux: Vec<Aux> = Vec::with_capacity(g.ops.len());
        let mut profile = Profile::from_env();
        values[g.input] = Some(x);
        for (i, op) in g.ops.iter().enumerate() {
            let keep_aux = record && g.tensors[op.output()].on_input_path;
            let start = std::time::Instant::now();
            let (y, a) = self.exec(op, &values, d, t, keep_aux);
            profile.add(op, start);
            values[op.output()] = Some(y);
            aux.push(a);
            for input in op.inputs() {
                if self.last_read[input] == Some(i) && !(record && self.saved[input]) {
                    self.pool.give(values[input].take());
                }
            }
        }
        let out = values[g.output]
            .take()
            .expect("the graph computes its output");
        profile.print("forward");
        (out, (values, aux))
    }

    fn conv_geometry(&self, x: Tid, stride: usize, pad: Pad, d: Dims) -> Geometry {
        let (h, w) = d.hw(&self.graph, x);
        Geometry {
            n: d.n,
            h,
            w,
            stride,
            pad,
        }
    }

    fn exec(
        &self,
        op: &Op,
        values: &[Option<Vec<f32>>],
        d: Dims,
        t: &[f32],
        keep_aux: bool,
    ) -> (Vec<f32>, Aux) {
        let g = &self.graph;
        let val = |t: Tid| {
            values[t]
                .as_deref()
                .expect("inputs are computed before use")
        };
        let len = |t: Tid| g.shape(t, d.n, d.h, d.w).iter().product::<usize>();
        let mut y = self.pool.take(len(op.output()));
        let mut aux = Aux::None;
        match *op {
            Op::TimeEmbedding {
                dim,
                flip_sin_to_cos,
                freq_shift,
                ..
            } => {
                y = resample::timestep_embedding(t, dim, flip_sin_to_cos, freq_shift);
            }
            Op::Linear {
                x,
                p,
                silu_in,
                residual,
                out_div,
                ..
            } => {
                let (h, w) = d.hw(g, x);
                let (lp, r) = (self.linear(p), residual.map(val));
                linear::forward(lp, val(x), silu_in, r, out_div, &mut y, h * w);
            }
            Op::Conv {
                x,
                p,
                stride,
                pad,
                temb,
                residual,
                out_div,
                ..
            } => {
                let geo = self.conv_geometry(x, stride, pad, d);
                conv::forward(
                    self.conv(p),
                    val(x),
                    geo,
                    temb.map(val),
                    residual.map(val),
                    out_div,
                    &mut y,
                );
            }
            Op::GroupNorm {
                x,
                p,
                groups,
                eps,
                silu,
                ..
            } => {
                let (gamma, beta) = self.norm(p);
                let dims = self.norm_dims(x, groups, d);
                let stats = norm::forward(val(x), dims, gamma, beta, eps, silu, &mut y);
                if keep_aux {
                    aux = Aux::Stats(stats);
                }
            }
            Op::Attention {
                qkv,
                heads,
                head_dim,
                ..
            } => {
                let dims = self.attention_dims(qkv, heads, head_dim, d);
                if let Some(p) = attention::forward(val(qkv), dims, &mut y, keep_aux) {
                    aux = Aux::Probs(p);
                }
            }
            Op::Upsample { x, .. } => {
                let (h, w) = d.hw(g, x);
                resample::upsample2x(val(x), h, w, g.tensors[x].channels, &mut y);
            }
            Op::Concat { a, b, .. } => {
                let (ca, cb) = (g.tensors[a].channels, g.tensors[b].channels);
                resample::concat(val(a), ca, val(b), cb, &mut y);
            }
        }
        (y, aux)
    }

    fn linear(&self, p: usize) -> &LinearParams {
        match &self.params[p] {
            Param::Linear(l) => l,
            _ => unreachable!("parameter {p} is not a linear layer"),
        }
    }

    fn conv(&self, p: usize) -> &ConvParams {
        match &self.params[p] {
            Param::Conv(c) => c,
            _ => unreachable!("parameter {p} is not a convolution"),
        }
    }

    fn norm(&self, p: usize) -> (&[f32], &[f32]) {
        match &self.params[p] {
            Param::Norm { gamma, beta } => (gamma, beta),
            _ => unreachable!("parameter {p} is not a norm"),
        }
    }

    fn norm_dims(&self, x: Tid, groups: usize, d: Dims) -> norm::Dims {
        let (h, w) = d.hw(&self.graph, x);
        norm::Dims {
            n: d.n,
            hw: h * w,
            c: self.graph.tensors[x].channels,
            groups,
        }
    }

    fn attention_dims(&self, qkv: Tid, heads: usize, head_dim: usize, d: Dims) -> attention::Dims {
        let (h, w) = d.hw(&self.graph, qkv);
        attention::Dims {
            n: d.n,
            tokens: h * w,
            heads,
            head_dim,
        }
    }
}

/// Batch size and input resolution of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    h: usize,
    w: usize,
}

impl Dims {
    /// Height and width of tensor `t` (1 x 1 for per-image vectors).
    fn hw(&self, g: &Graph, t: Tid) -> (usize, usize) {
        match g.tensors[t].space {
            Space::Vector => (1, 1),
            Space::Image { level } => (self.h >> level, self.w >> level),
        }
    }
}

/// What a recording forward pass kept for one vector-Jacobian product.
pub struct Tape {
    network: u64,
    dims: Dims,
    values: Vec<Option<Vec<f32>>>,
    aux: Vec<Aux>,
}

impl Tape {
    fn run_backward(mut self, u: &CpuUnet, cotangent: &Tensor) -> Result<Tensor> {
        let g = &u.graph;
        let d = self.dims;
        let cfg = &g.config;
        g.check_cotangent(cotangent, d.n, d.h, d.w)?;
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; g.tensors.len()];
        grads[g.output] = Some(resample::nchw_to_nhwc(
            cotangent.data(),
            cfg.out_channels,
            d.h,
            d.w,
        ));
        let mut profile = Profile::from_env();
        for (i, op) in g.ops.iter().enumerate().rev() {
            let y = op.output();
            if !g.tensors[y].on_input_path {
                continue;
            }
            let Some(dy) = grads[y].take() else { continue };
            let start = std::time::Instant::now();
            let spent = self.backward_op(u, i, op, dy, &mut grads);
            u.pool.give(spent);
            profile.add(op, start);
            for s in op.saved_for_backward() {
                u.pool.give(self.values[s].take());
            }
        }
        profile.print("backward");
        let mut gx = grads[g.input]
            .take()
            .expect("the output depends on the input");
        if cfg.center_input_sample {
            gx.iter_mut().for_each(|v| *v *= 2.0);
        }
        let data = resample::nhwc_to_nchw(&gx, d.n, cfg.in_channels, d.h, d.w);
        Tensor::new(vec![d.n, cfg.in_channels, d.h, d.w], data)
    }

    fn backward_op(
        &mut self,
        u: &CpuUnet,
        i: usize,
        op: &Op,
        mut dy: Vec<f32>,
        grads: &mut [Option<Vec<f32>>],
    ) -> Option<Vec<f32>> {
        let g = &u.graph;
        let d = self.dims;
        let on_path = |t: Tid| g.tensors[t].on_input_path;
        let len = |t: Tid| g.shape(t, d.n, d.h, d.w).iter().product::<usize>();
        // The gradient buffer of `t` and whether it already holds contributions to add onto.
        fn slot<'g>(
            grads: &'g mut [Option<Vec<f32>>],
            t: Tid,
            len: usize,
            pool: &Pool,
        ) -> (&'g mut Vec<f32>, bool) {
            let acc = grads[t].is_some();
            (grads[t].get_or_insert_with(|| pool.take(len)), acc)
        }
        // Adds `dy` into the residual's gradient, moving it when it is the first contribution;
        // returns it when it was not moved.
        let add_residual =
            |grads: &mut [Option<Vec<f32>>], r: Tid, dy: Vec<f32>| match &mut grads[r] {
                Some(gr) => {
                    gr.iter_mut().zip(&dy).for_each(|(a, b)| *a += b);
                    Some(dy)
                }
                None => {
                    grads[r] = Some(dy);
                    None
                }
            };
        let leftover = match *op {
            Op::TimeEmbedding { .. } => {
                unreachable!("the time embedding does not depend on the input")
            }
            Op::Linear {
                x,
                p,
                silu_in,
                residual,
                out_div,
                ..
            } => {
                debug_assert!(
                    !silu_in,
                    "SiLU-input linears only act on the time embedding"
                );
                if out_div != 1.0 {
                    dy.iter_mut().for_each(|v| *v /= out_div);
                }
                if on_path(x) {
                    let (h, w) = d.hw(g, x);
                    let (gx, acc) = slot(grads, x, len(x), &u.pool);
                    linear::backward_input(u.linear(p), &dy, gx, acc, h * w);
                }
                match residual.filter(|&r| on_path(r)) {
                    Some(r) => add_residual(grads, r, dy),
                    None => Some(dy),
                }
            }
            Op::Conv {
                x,
                p,
                stride,
                pad,
                residual,
                out_div,
                ..
            } => {
                if out_div != 1.0 {
                    dy.iter_mut().for_each(|v| *v /= out_div);
                }
                if on_path(x) {
                    let geo = u.conv_geometry(x, stride, pad, d);
                    let (gx, acc) = slot(grads, x, len(x), &u.pool);
                    conv::backward_input(u.conv(p), &dy, geo, gx, acc);
                }
                match residual.filter(|&r| on_path(r)) {
                    Some(r) => add_residual(grads, r, dy),
                    None => Some(dy),
                }
            }
            Op::GroupNorm {
                x, p, groups, silu, ..
            } => {
                let Aux::Stats(stats) = &self.aux[i] else {
                    unreachable!("GroupNorm on the input path records its statistics")
                };
                let (gamma, beta) = u.norm(p);
                let dims = u.norm_dims(x, groups, d);
                let xv = self.values[x]
                    .as_deref()
                    .expect("GroupNorm input was saved");
                let (gx, acc) = slot(grads, x, len(x), &u.pool);
                norm::backward(xv, dims, gamma, beta, silu, stats, &dy, gx, acc);
                Some(dy)
            }
            Op::Attention {
                qkv,
                heads,
                head_dim,
                ..
            } => {
                let Aux::Probs(probs) = &self.aux[i] else {
                    unreachable!("attention on the input path records its probabilities")
                };
                let dims = u.attention_dims(qkv, heads, head_dim, d);
                let qv = self.values[qkv].as_deref().expect("q/k/v were saved");
                let (gq, acc) = slot(grads, qkv, len(qkv), &u.pool);
                attention::backward(qv, probs, dims, &dy, gq, acc);
                Some(dy)
            }
            Op::Upsample { x, .. } => {
                let (h, w) = d.hw(g, x);
                let (gx, acc) = slot(grads, x, len(x), &u.pool);
                resample::upsample2x_backward(&dy, d.n, h, w, g.tensors[x].channels, gx, acc);
                Some(dy)
            }
            Op::Concat { a, b, .. } => {
                let (ca, cb) = (g.tensors[a].channels, g.tensors[b].channels);
                for (t, off, width) in [(a, 0, ca), (b, ca, cb)] {
                    if on_path(t) {
                        let (gt, acc) = slot(grads, t, len(t), &u.pool);
                        resample::concat_backward(&dy, ca + cb, off, width, gt, acc);
                    }
                }
                Some(dy)
            }
        };
        self.aux[i] = Aux::None;
        leftover
    }
}

/// Time per op kind, printed to stderr after each pass when `INVDIFF_PROFILE` is set: where a
/// pass spends its time, without a profiler.
struct Profile(Option<Vec<(&'static str, f64)>>);

impl Profile {
    fn from_env() -> Self {
        Profile(crate::switches::value("INVDIFF_PROFILE").map(|_| Vec::new()))
    }

    fn add(&mut self, op: &Op, start: std::time::Instant) {
        let Some(rows) = &mut self.0 else { return };
        let kind = match op {
            Op::Conv { kernel: 1, .. } => "conv 1x1",
            Op::Conv { stride: 2, .. } => "conv 3x3 stride 2",
            Op::Conv { .. } => "conv 3x3",
            Op::GroupNorm { .. } => "group norm",
            Op::Attention { .. } => "attention",
            Op::Linear { .. } => "linear",
            Op::Upsample { .. } => "upsample",
            Op::Concat { .. } => "concat",
            Op::TimeEmbedding { .. } => "time embedding",
        };
        let ms = start.elapsed().as_secs_f64() * 1e3;
        match rows.iter_mut().find(|(k, _)| *k == kind) {
            Some(r) => r.1 += ms,
            None => rows.push((kind, ms)),
        }
    }

    fn print(&self, pass: &str) {
        let Some(rows) = &self.0 else { return };
        let total: f64 = rows.iter().map(|r| r.1).sum();
        eprintln!("INVDIFF_PROFILE {pass}: {total:.1} ms");
        for (k, ms) in rows {
            eprintln!("  {k:<18} {ms:>9.1} ms {:>5.1}%", 100.0 * ms / total);
        }
    }
}

/// Freed activation and gradient buffers, kept for the next request of the same length.
///
/// Activations at full resolution are tens of megabytes; allocated fresh for every op, each is
/// mapped anew by the allocator and page-faulted in (a quarter of a 100-step restoration's CPU
/// time went to that). Shapes repeat from op to op and from call to call, so exact-length reuse
/// hits nearly always. A reused buffer comes back holding its last user's values: every op
/// writes its whole output, and a gradient is added onto only once written, so none reads
/// them (`ops_never_read_a_pooled_buffer_before_writing_it`). Zeroing them cost 140-200 ms of a
/// 3 s DPS step at 256x256 on two cores, on one thread and evicting the cache.
#[derive(Default)]
struct Pool(
    std::sync::Mutex<std::collections::HashMap<usize, Vec<Vec<f32>>>>,
    /// Tests: every buffer handed out, fresh or reused, is first filled with NaN.
    #[cfg(test)]
    std::sync::atomic::AtomicBool,
);

impl Pool {
    /// Buffers of one length kept at most: the most any pass has alive at once is far below.
    const PER_LENGTH: usize = 16;

    fn take(&self, len: usize) -> Vec<f32> {
        let reused = self.0.lock().ok().and_then(|mut m| m.get_mut(&len)?.pop());
        let v = reused.unwrap_or_else(|| vec![0.0; len]);
        #[cfg(test)]
        let v = self.poisoned(v);
        v
    }

    /// `v`, filled with NaN when the test asks for it.
    #[cfg(test)]
    fn poisoned(&self, mut v: Vec<f32>) -> Vec<f32> {
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            v.fill(f32::NAN);
        }
        v
    }

    fn give(&self, buf: Option<Vec<f32>>) {
        let Some(v) = buf else { return };
        if let Ok(mut m) = self.0.lock() {
            let list = m.entry(v.len()).or_default();
            if list.len() < Self::PER_LENGTH {
                list.push(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recording pass and its input gradient, then the same with every buffer the pool hands
    /// out (fresh or reused) filled with NaN first: the same bits, so no op reads such a buffer
    /// before writing it, nor adds onto a gradient it has not written.
    #[test]
    fn ops_never_read_a_pooled_buffer_before_writing_it() {
        for variant_b in [false, true] {
            let model = Model::tiny(variant_b);
            let unet = CpuUnet::new(&model);
            let random = |c: usize, seed| {
                let len = 2 * c * 24 * 16;
                let values = crate::rng::uniform_lcg(seed, len, -1.0, 1.0);
                Tensor::new(vec![2, c, 24, 16], values).unwrap()
            };
            let sample = random(model.config().in_channels, 1);
            let cot = random(model.config().out_channels, 2);
            let pass = || {
                let (eps, tape) = unet.forward_recording(&sample, &[10.0, 900.0]).unwrap();
                let grad = unet.vjp(tape, &cot).unwrap();
                let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                (bits(&eps), bits(&grad))
            };
            let first = pass();
            unet.pool
                .1
                .store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(
                first == pass(),
                "variant_b {variant_b}: a pooled buffer was read unwritten"
            );
        }
    }

    /// The celebahq-256 network at 256x256, batch 1: about what the GPU plans for the same
    /// passes (PERF.md: arenas of 225 MiB forward and 740 MiB forward + VJP), and an image too
    /// large for any machine refused by name.
    #[test]
    fn memory_is_estimated_and_checked_before_a_pass() {
        let model = Model::builtin_celebahq(0);
        let unet = CpuUnet::new(&model);
        let d = |n, s| Dims { n, h: s, w: s };
        let (fwd, rec) = (
            unet.peak_bytes(d(1, 256), false),
            unet.peak_bytes(d(1, 256), true),
        );
        assert!(fwd < rec, "{fwd} {rec}");
        assert!((0.2e9..0.3e9).contains(&(fwd as f64)), "forward {fwd}");
        assert!((0.7e9..1.0e9).contains(&(rec as f64)), "recording {rec}");
        // Linear in the batch, at least.
        assert!(unet.peak_bytes(d(4, 256), true) >= 4 * rec - 4 * 4 * 3 * 256 * 256);
        // At 4096x4096 the 16x16-level attention has 65536 tokens: 17 GB of scores alone.
        let msg = unet
            .check_memory(d(1, 4096), false, Some(16 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("4096x4096") && msg.contains("GB this machine"),
            "{msg}"
        );
        assert!(unet.check_memory(d(1, 256), true, Some(64 << 30)).is_ok());
        assert!(unet.check_memory(d(1, 4096), true, None).is_ok());
        // Sizes no memory holds saturate instead of wrapping.
        let huge = d(1 << 20, 1 << 24);
        assert_eq!(unet.peak_bytes(huge, true), u64::MAX);
        assert!(unet.check_memory(huge, false, Some(u64::MAX - 1)).is_err());
    }
}
