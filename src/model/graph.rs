//! The `UNet2DModel` forward graph, built once from a configuration and run by every backend.
//!
//! The graph is a flat list of ops over numbered tensors, in execution order. Activations are
//! channels-last (`[N, H, W, C]`): a token sequence for attention is then the activation itself,
//! and a 1x1 convolution is a matrix product, so neither needs a transpose. Per-image vectors
//! (the time embedding and each resnet's projection of it) are `[N, C]`.
//!
//! Reverse mode walks the same list backwards. Only tensors that depend on the input sample take
//! part (the time-embedding branch is constant with respect to it), and each op's backward needs
//! at most its own input (GroupNorm), its saved attention probabilities, and its weights.

use crate::config::{BlockKind, UNetConfig};
use crate::{ensure, Error, Result, Tensor};

/// Index of a tensor in [`Graph::tensors`].
pub type Tid = usize;
/// Index of a parameter group in [`Graph::params`].
pub type Pid = usize;

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// One vector per image: `[N, C]`.
    Vector,
    /// An activation at `level` halvings of the input resolution: `[N, H >> level, W >> level, C]`.
    Image { level: u32 },
}

/// A tensor of the graph: its name (for messages and debugging), width and space.
#[derive(Clone, Debug)]
pub struct TensorDesc {
    pub name: String,
    pub channels: usize,
    pub space: Space,
    /// Whether the tensor depends on the input sample (and so carries a gradient).
    pub on_input_path: bool,
}

/// Zero padding of a stride-2 3x3 convolution (`downsample_padding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pad {
    /// One pixel on every side (`downsample_padding = 1`, and every stride-1 3x3 conv).
    Symmetric,
    /// One column on the right and one row at the bottom (`downsample_padding = 0`).
    RightBottom,
}

/// One operation. Inputs come first, then the output `y`.
#[derive(Clone, Debug)]
pub enum Op {
    /// Sinusoidal embedding of the per-image timesteps, `[N] -> [N, dim]`, in f32 as diffusers.
    TimeEmbedding {
        y: Tid,
        dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f32,
    },
    /// `y = (f(x) W^T + b + residual) / out_div` over rows (tokens or images), `f` = SiLU or id.
    Linear {
        x: Tid,
        y: Tid,
        p: Pid,
        silu_in: bool,
        residual: Option<Tid>,
        out_div: f32,
    },
    /// 3x3 (stride 1 or 2) or 1x1 convolution,
    /// `y = (conv(x) + b + temb[n] + residual) / out_div`.
    Conv {
        x: Tid,
        y: Tid,
        p: Pid,
        kernel: usize,
        stride: usize,
        pad: Pad,
        temb: Option<Tid>,
        residual: Option<Tid>,
        out_div: f32,
    },
    /// GroupNorm over groups of consecutive channels, optionally followed by SiLU.
    GroupNorm {
        x: Tid,
        y: Tid,
        p: Pid,
        groups: usize,
        eps: f32,
        silu: bool,
    },
    /// Multi-head scaled dot-product attention over the tokens of one image; `qkv` holds
    /// `[q | k | v]` along channels, each `heads * head_dim` wide.
    Attention {
        qkv: Tid,
        y: Tid,
        heads: usize,
        head_dim: usize,
    },
    /// Nearest-neighbour 2x upsampling.
    Upsample { x: Tid, y: Tid },
    /// Channel concatenation `[a | b]` (current hidden state first, skip second).
    Concat { a: Tid, b: Tid, y: Tid },
}

impl Op {
    /// The tensor this op writes.
    pub fn output(&self) -> Tid {
        match *self {
            Op::TimeEmbedding { y, .. }
            | Op::Linear { y, .. }
            | Op::Conv { y, .. }
            | Op::GroupNorm { y, .. }
            | Op::Attention { y, .. }
            | Op::Upsample { y, .. }
            | Op::Concat { y, .. } => y,
        }
    }

    /// The tensors this op reads, in a fixed order.
    pub fn inputs(&self) -> Vec<Tid> {
        match *self {
            Op::TimeEmbedding { .. } => vec![],
            Op::Linear { x, residual, .. } => std::iter::once(x).chain(residual).collect(),
            Op::Conv {
                x, temb, residual, ..
            } => std::iter::once(x).chain(temb).chain(residual).collect(),
            Op::GroupNorm { x, .. } | Op::Upsample { x, .. } => vec![x],
            Op::Attention { qkv, .. } => vec![qkv],
            Op::Concat { a, b, .. } => vec![a, b],
        }
    }

    /// The inputs whose values the backward pass reads (not just their shapes).
    pub fn saved_for_backward(&self) -> Vec<Tid> {
        match *self {
            Op::GroupNorm { x, .. } => vec![x],
            Op::Attention { qkv, .. } => vec![qkv],
            _ => vec![],
        }
    }
}

/// A group of parameters as stored in a checkpoint under one name prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// `{name}.weight [cout, cin, k, k]`, `{name}.bias [cout]`.
    Conv { cout: usize, cin: usize, k: usize },
    /// `{name}.weight [out, inp]`, `{name}.bias [out]`.
    Linear { out: usize, inp: usize },
    /// GroupNorm affine: `{name}.weight [c]`, `{name}.bias [c]`.
    Norm { c: usize },
    /// Attention projections `{name}.to_q/to_k/to_v.{weight [inner, c], bias [inner]}`, which
    /// backends fuse into one `[3 * inner, c]` matrix.
    Qkv { inner: usize, c: usize },
}

/// A parameter group of the graph.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
}

impl ParamSpec {
    /// The checkpoint tensors of this group, with their shapes, in diffusers' current names.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let n = &self.name;
        match self.kind {
            ParamKind::Conv { cout, cin, k } => vec![
                (format!("{n}.weight"), vec![cout, cin, k, k]),
                (format!("{n}.bias"), vec![cout]),
            ],
            ParamKind::Linear { out, inp } => vec![
                (format!("{n}.weight"), vec![out, inp]),
                (format!("{n}.bias"), vec![out]),
            ],
            ParamKind::Norm { c } => vec![
                (format!("{n}.weight"), vec![c]),
                (format!("{n}.bias"), vec![c]),
            ],
            ParamKind::Qkv { inner, c } => ["to_q", "to_k", "to_v"]
                .iter()
                .flat_map(|p| {
                    [
                        (format!("{n}.{p}.weight"), vec![inner, c]),
                        (format!("{n}.{p}.bias"), vec![inner]),
                    ]
                })
                .collect(),
        }
    }

    /// Number of scalars in the group.
    pub fn numel(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The whole network as data.
#[derive(Clone, Debug)]
pub struct Graph {
    pub config: UNetConfig,
    pub tensors: Vec<TensorDesc>,
    pub ops: Vec<Op>,
    pub params: Vec<ParamSpec>,
    /// The input sample, channels-last, after `center_input_sample`.
    pub input: Tid,
    /// The predicted noise, channels-last.
    pub output: Tid,
}

impl Graph {
    /// Builds the graph of `config`; errors name the block whose widths do not fit.
    pub fn build(config: &UNetConfig) -> Result<Graph> {
        let mut b = Builder {
            cfg: config.clone(),
            tensors: Vec::new(),
            ops: Vec::new(),
            params: Vec::new(),
        };
        let input = b.tensor(
            "sample",
            config.in_channels,
            Space::Image { level: 0 },
            true,
        );
        let output = b.unet(input)?;
        Ok(Graph {
            config: config.clone(),
            tensors: b.tensors,
            ops: b.ops,
            params: b.params,
            input,
            output,
        })
    }

    /// Checks a network input as every backend needs it (a finite `[N, C, H, W]` sample the
    /// network can take, and one finite timestep per image or one for all) and returns its
    /// dimensions with one timestep per image.
    pub fn check_input(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
    ) -> Result<([usize; 4], Vec<f32>)> {
        let cfg = &self.config;
        let [n, c, h, w] = sample.dims4("sample")?;
        ensure!(
            c == cfg.in_channels,
            "sample: the model takes {} input channels, got {c} (shape {:?})",
            cfg.in_channels,
            sample.shape()
        );
        ensure!(n > 0, "sample: the batch is empty");
        cfg.check_input_size(h, w)?;
        ensure!(sample.all_finite(), "sample: holds NaN or infinite values");
        let t = match timesteps.len() {
            1 => vec![timesteps[0]; n],
            len if len == n => timesteps.to_vec(),
            len => {
                return Err(Error::input(format!(
                    "timestep: expected one value or one per image ({n}), got {len}"
                )))
            }
        };
        ensure!(
            t.iter().all(|v| v.is_finite()),
            "timestep: holds NaN or infinite values"
        );
        Ok(([n, c, h, w], t))
    }

    /// Checks the cotangent of a vector-Jacobian product after a forward pass of `n` images of
    /// `h x w`, as every backend needs it: finite, and shaped like that pass's output.
    pub fn check_cotangent(&self, cotangent: &Tensor, n: usize, h: usize, w: usize) -> Result<()> {
        let want = [n, self.config.out_channels, h, w];
        ensure!(
            cotangent.shape() == want,
            "cotangent: expected shape {want:?} (the output's), got {:?}",
            cotangent.shape()
        );
        ensure!(
            cotangent.all_finite(),
            "cotangent: holds NaN or infinite values"
        );
        Ok(())
    }

    /// Total number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(ParamSpec::numel).sum()
    }

    /// Shape `[N, H, W, C]` or `[N, C]` of tensor `t` for an `h x w` input batch of `n`.
    pub fn shape(&self, t: Tid, n: usize, h: usize, w: usize) -> Vec<usize> {
        let d = &self.tensors[t];
        match d.space {
            Space::Vector => vec![n, d.channels],
            Space::Image { level } => vec![n, h >> level, w >> level, d.channels],
        }
    }

    /// Floating-point operations of one forward pass (a multiply-add counts 2), matrix
    /// products only, as PyTorch's FLOP counter reports them.
    pub fn forward_flops(&self, n: usize, h: usize, w: usize) -> f64 {
        self.ops.iter().map(|op| self.op_flops(op, n, h, w)).sum()
    }

    /// Floating-point operations of a forward pass plus the input gradient (one DPS step's
    /// network work): every op on the input path runs its products again backwards, attention
    /// twice over (four products against two).
    pub fn forward_vjp_flops(&self, n: usize, h: usize, w: usize) -> f64 {
        let backward: f64 = self
            .ops
            .iter()
            .filter(|op| self.tensors[op.output()].on_input_path)
            .map(|op| {
                let f = self.op_flops(op, n, h, w);
                if matches!(op, Op::Attention { .. }) {
                    2.0 * f
                } else {
                    f
                }
            })
            .sum();
        self.forward_flops(n, h, w) + backward
    }

    fn op_flops(&self, op: &Op, n: usize, h: usize, w: usize) -> f64 {
        let pixels = |t: Tid| -> f64 {
            match self.tensors[t].space {
                Space::Vector => n as f64,
                Space::Image { level } => (n * (h >> level) * (w >> level)) as f64,
            }
        };
        match *op {
            Op::Conv { y, p, .. } => match self.params[p].kind {
                ParamKind::Conv { cout, cin, k } => 2.0 * pixels(y) * (cout * cin * k * k) as f64,
                _ => unreachable!("conv op with a non-conv parameter"),
            },
            Op::Linear { y, p, .. } => match self.params[p].kind {
                ParamKind::Linear { out, inp } => 2.0 * pixels(y) * (out * inp) as f64,
                ParamKind::Qkv { inner, c } => 2.0 * pixels(y) * (3 * inner * c) as f64,
                _ => unreachable!("linear op with a non-linear parameter"),
            },
            Op::Attention {
                y, heads, head_dim, ..
            } => {
                let tokens = pixels(y) / n as f64;
                // q kᵀ and p v, per head.
                4.0 * n as f64 * tokens * tokens * (heads * head_dim) as f64
            }
            _ => 0.0,
        }
    }
}

struct Builder {
    cfg: UNetConfig,
    tensors: Vec<TensorDesc>,
    ops: Vec<Op>,
    params: Vec<ParamSpec>,
}

impl Builder {
    fn tensor(&mut self, name: &str, channels: usize, space: Space, on_input_path: bool) -> Tid {
        self.tensors.push(TensorDesc {
            name: name.to_string(),
            channels,
            space,
            on_input_path,
        });
        self.tensors.len() - 1
    }

    /// A new tensor named `name` computed from `from` (which decide its dependence on the input).
    fn derived(&mut self, name: &str, channels: usize, space: Space, from: &[Tid]) -> Tid {
        let dep = from.iter().any(|&t| self.tensors[t].on_input_path);
        self.tensor(name, channels, space, dep)
    }

    fn param(&mut self, name: String, kind: ParamKind) -> Pid {
        self.params.push(ParamSpec { name, kind });
        self.params.len() - 1
    }

    fn ch(&self, t: Tid) -> usize {
        self.tensors[t].channels
    }

    fn space(&self, t: Tid) -> Space {
        self.tensors[t].space
    }

    fn linear(&mut self, name: &str, x: Tid, out: usize, silu_in: bool) -> Tid {
        let inp = self.ch(x);
        let p = self.param(name.to_string(), ParamKind::Linear { out, inp });
        let y = self.derived(name, out, self.space(x), &[x]);
        self.ops.push(Op::Linear {
            x,
            y,
            p,
            silu_in,
            residual: None,
            out_div: 1.0,
        });
        y
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        x: Tid,
        cout: usize,
        kernel: usize,
        stride: usize,
        temb: Option<Tid>,
        residual: Option<Tid>,
        out_div: f32,
    ) -> Tid {
        let cin = self.ch(x);
        let p = self.param(
            name.to_string(),
            ParamKind::Conv {
                cout,
                cin,
                k: kernel,
            },
        );
        let Space::Image { level } = self.space(x) else {
            unreachable!("convolution of a vector")
        };
        let level = if stride == 2 { level + 1 } else { level };
        let pad = if stride == 2 && self.cfg.downsample_padding == 0 {
            Pad::RightBottom
        } else {
            Pad::Symmetric
        };
        let from: Vec<Tid> = std::iter::once(x).chain(temb).chain(residual).collect();
        let y = self.derived(name, cout, Space::Image { level }, &from);
        self.ops.push(Op::Conv {
            x,
            y,
            p,
            kernel,
            stride,
            pad,
            temb,
            residual,
            out_div,
        });
        y
    }

    fn group_norm(&mut self, name: &str, x: Tid, silu: bool) -> Result<Tid> {
        let c = self.ch(x);
        let groups = self.cfg.norm_num_groups;
        if c % groups != 0 {
            return Err(Error::input(format!(
                "{name}: {groups} groups (norm_num_groups) do not divide its {c} input channels; \
                 diffusers cannot build this network either"
            )));
        }
        let p = self.param(name.to_string(), ParamKind::Norm { c });
        let y = self.derived(&format!("{name}.out"), c, self.space(x), &[x]);
        self.ops.push(Op::GroupNorm {
            x,
            y,
            p,
            groups,
            eps: self.cfg.norm_eps,
            silu,
        });
        Ok(y)
    }

    /// `ResnetBlock2D` with the default time-embedding handling (added after conv1).
    fn resnet(&mut self, prefix: &str, x: Tid, emb: Tid, cout: usize, out_div: f32) -> Result<Tid> {
        let cin = self.ch(x);
        let a = self.group_norm(&format!("{prefix}.norm1"), x, true)?;
        let t = self.linear(&format!("{prefix}.time_emb_proj"), emb, cout, true);
        let h = self.conv(
            &format!("{prefix}.conv1"),
            a,
            cout,
            3,
            1,
            Some(t),
            None,
            1.0,
        );
        let b = self.group_norm(&format!("{prefix}.norm2"), h, true)?;
        let shortcut = if cin != cout {
            self.conv(
                &format!("{prefix}.conv_shortcut"),
                x,
                cout,
                1,
                1,
                None,
                None,
                1.0,
            )
        } else {
            x
        };
        Ok(self.conv(
            &format!("{prefix}.conv2"),
            b,
            cout,
            3,
            1,
            None,
            Some(shortcut),
            out_div,
        ))
    }

    /// diffusers' `Attention` as UNet2DModel builds it: GroupNorm, q/k/v, SDPA, out, residual.
    fn attention(&mut self, prefix: &str, x: Tid, out_div: f32) -> Result<Tid> {
        let c = self.ch(x);
        let (heads, head_dim) = self.cfg.attention_heads(c);
        if heads == 0 {
            return Err(Error::input(format!(
                "{prefix}: attention_head_dim {head_dim} is larger than the block's {c} channels"
            )));
        }
        let inner = heads * head_dim;
        let hn = self.group_norm(&format!("{prefix}.group_norm"), x, false)?;
        let p = self.param(prefix.to_string(), ParamKind::Qkv { inner, c });
        let space = self.space(x);
        let qkv = self.derived(&format!("{prefix}.qkv"), 3 * inner, space, &[hn]);
        self.ops.push(Op::Linear {
            x: hn,
            y: qkv,
            p,
            silu_in: false,
            residual: None,
            out_div: 1.0,
        });
        let o = self.derived(&format!("{prefix}.sdpa"), inner, space, &[qkv]);
        self.ops.push(Op::Attention {
            qkv,
            y: o,
            heads,
            head_dim,
        });
        let name = format!("{prefix}.to_out.0");
        let p = self.param(name.clone(), ParamKind::Linear { out: c, inp: inner });
        let y = self.derived(&name, c, space, &[o, x]);
        self.ops.push(Op::Linear {
            x: o,
            y,
            p,
            silu_in: false,
            residual: Some(x),
            out_div,
        });
        Ok(y)
    }

    fn unet(&mut self, sample: Tid) -> Result<Tid> {
        let cfg = self.cfg.clone();
        let boc = &cfg.block_out_channels;
        let levels = boc.len();

        let t0 = self.tensor("time_proj", boc[0], Space::Vector, false);
        self.ops.push(Op::TimeEmbedding {
            y: t0,
            dim: boc[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
        });
        let t1 = self.linear("time_embedding.linear_1", t0, cfg.time_embedding_dim, false);
        let emb = self.linear("time_embedding.linear_2", t1, cfg.time_embedding_dim, true);

        let mut h = self.conv("conv_in", sample, boc[0], 3, 1, None, None, 1.0);
        let mut skips = vec![h];
        for (i, kind) in cfg.down_blocks.iter().enumerate() {
            for j in 0..cfg.layers_per_block {
                h = self.resnet(&format!("down_blocks.{i}.resnets.{j}"), h, emb, boc[i], 1.0)?;
                if *kind == BlockKind::Attention {
                    h = self.attention(&format!("down_blocks.{i}.attentions.{j}"), h, 1.0)?;
                }
                skips.push(h);
            }
            if i + 1 < levels {
                let name = format!("down_blocks.{i}.downsamplers.0.conv");
                h = self.conv(&name, h, boc[i], 3, 2, None, None, 1.0);
                skips.push(h);
            }
        }

        let msf = cfg.mid_block_scale_factor;
        let c = boc[levels - 1];
        h = self.resnet("mid_block.resnets.0", h, emb, c, msf)?;
        if cfg.mid_attention {
            h = self.attention("mid_block.attentions.0", h, msf)?;
        }
        h = self.resnet("mid_block.resnets.1", h, emb, c, msf)?;

        for (i, kind) in cfg.up_blocks.iter().enumerate() {
            let cout = boc[levels - 1 - i];
            for j in 0..=cfg.layers_per_block {
                let s = skips.pop().expect("one skip per up-block resnet");
                let name = format!("up_blocks.{i}.resnets.{j}");
                let cat = self.derived(
                    &format!("{name}.concat"),
                    self.ch(h) + self.ch(s),
                    self.space(h),
                    &[h, s],
                );
                self.ops.push(Op::Concat { a: h, b: s, y: cat });
                h = self.resnet(&name, cat, emb, cout, 1.0)?;
                if *kind == BlockKind::Attention {
                    h = self.attention(&format!("up_blocks.{i}.attentions.{j}"), h, 1.0)?;
                }
            }
            if i + 1 < levels {
                let Space::Image { level } = self.space(h) else {
                    unreachable!()
                };
                let name = format!("up_blocks.{i}.upsamplers.0.conv");
                let up = self.derived(
                    &format!("{name}.upsample"),
                    cout,
                    Space::Image { level: level - 1 },
                    &[h],
                );
                self.ops.push(Op::Upsample { x: h, y: up });
                h = self.conv(&name, up, cout, 3, 1, None, None, 1.0);
            }
        }
        debug_assert!(skips.is_empty());

        let n = self.group_norm("conv_norm_out", h, true)?;
        Ok(self.conv("conv_out", n, cfg.out_channels, 3, 1, None, None, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celebahq_matches_the_published_state_dict() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        // 113,673,219 parameters and 450 tensors (REFERENCE.md §1.3, ANCHORS.md).
        assert_eq!(g.parameter_count(), 113_673_219);
        let tensors: usize = g.params.iter().map(|p| p.tensors().len()).sum();
        assert_eq!(tensors, 450);
        // 497.0 GFLOP per image at 256x256 (PyTorch's FLOP counter, ANCHORS.md).
        let gflop = g.forward_flops(1, 256, 256) / 1e9;
        assert!((gflop - 497.0).abs() < 0.5, "{gflop}");
        // 995.1 GFLOP for forward + input gradient: ours leaves out the weight-free products
        // PyTorch's counter also counts in the backward of the first layers.
        let both = g.forward_vjp_flops(1, 256, 256) / 1e9;
        assert!((both - 995.1).abs() < 5.0, "{both}");
    }

    #[test]
    fn state_dict_names_and_shapes_match_the_listing() {
        let listing = include_str!("../../tests/data/celebahq-unet-state-dict.tsv");
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let mut ours: Vec<(String, Vec<usize>)> =
            g.params.iter().flat_map(ParamSpec::tensors).collect();
        let mut theirs: Vec<(String, Vec<usize>)> = listing
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, shape) = l.split_once('\t').unwrap();
                let shape = shape
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .map(|s| s.trim().parse().unwrap())
                    .collect();
                (name.to_string(), shape)
            })
            .collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
    }
}
