//! The lowering's contracts, checked on the programs themselves (no GPU): what every choice
//! computes, symbolically, against the default program; where each fused or alternative
//! step may appear; and that every buffer is written before it is read.

use super::*;
use crate::config::UNetConfig;
use crate::cuda::kernels::{
    gn_partial_fits, im2col_box, wgmma_kernel_exists, Capabilities, ConvKernel, ConvShape,
    WgmmaTile, LINEAR_ITEM_WORDS, WGMMA_SLICE,
};
use crate::model::graph::{Op, Pad};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// The steps `step` stands for: itself, or where it is a GroupNorm backward pass that adds a
/// residual's gradient (its `add`) or writes a concatenation's two gradients (its `sides`),
/// the AddInto adding that gradient first, the pass writing its whole input gradient, and the
/// concatenation's two adjoint steps copying the sides out of it.
fn unsplit(step: &Step, n: usize) -> Vec<Step> {
    // A split launch whose reduction computes a GroupNorm stands for the launch, then the
    // GroupNorm.
    if let Step::Conv(c) = step {
        if let Some(norm) = &c.norm {
            let conv = Step::Conv(ConvStep {
                norm: None,
                ..c.clone()
            });
            return vec![conv, (**norm).clone()];
        }
    }
    let Step::GroupNormBackward {
        dx,
        hw,
        c,
        add,
        sides,
        ..
    } = *step
    else {
        return vec![step.clone()];
    };
    let mut whole = step.clone();
    if let Step::GroupNormBackward { sides, add, .. } = &mut whole {
        *sides = None;
        *add = None;
    }
    let side = |d, d16, offset, width| Step::ConcatBackward {
        dy: dx,
        d,
        d16,
        pixels: n * hw,
        c,
        offset,
        width,
        accumulate: false,
    };
    let added = add.map(|src| Step::AddInto {
        dst: dx,
        src,
        len: n * hw * c,
        accumulate: true,
    });
    let sides = sides
        .into_iter()
        .flat_map(|g| [side(g.a, g.a16, 0, g.ca), side(g.b, g.b16, g.ca, c - g.ca)]);
    added
        .into_iter()
        .chain(std::iter::once(whole))
        .chain(sides)
        .collect()
}

/// `tc` without the staged epilogues' 16-bit outputs ([`KernelConfig::concat_from_producers`],
/// [`KernelConfig::epilogue_half_copies`]), which change the steps around the launches whose
/// choices the tests that compare programs step by step turn off.
fn without_half_outputs(tc: KernelConfig) -> KernelConfig {
    KernelConfig {
        concat_from_producers: false,
        epilogue_half_copies: false,
        ..tc
    }
}

/// `tc` with each of the staged epilogues' 16-bit outputs alone: the concatenations' sides,
/// then the copies.
fn each_half_output(tc: KernelConfig) -> [KernelConfig; 2] {
    let none = without_half_outputs(tc);
    [
        KernelConfig {
            concat_from_producers: true,
            ..none
        },
        KernelConfig {
            epilogue_half_copies: true,
            ..none
        },
    ]
}

/// `tc` with stop 28's GroupNorm backward choices the other way from their defaults: every
/// pass that can reading a 16-bit output gradient, and the residual gradients added in
/// launches of their own.
fn backward_choices(tc: KernelConfig) -> [KernelConfig; 2] {
    [
        KernelConfig {
            half_norm_grads: HalfGrads::Everywhere,
            ..tc
        },
        KernelConfig {
            fold_residual_grads: false,
            ..tc
        },
    ]
}

/// What the program computes, symbolically: each buffer holds a hash of the expression
/// that wrote it (operation, weights and the hashes it read), a copy holds its source's
/// hash, and a 16-bit value `half(v)` whoever rounded it (a 16-bit copy, a GroupNorm's
/// 16-bit output, or the tensor-core kernel staging an fp32 input). Two programs that
/// compute the same sums from the same values give the output and input gradient the same
/// hashes, whatever buffers, copies and kernels they use.
///
/// An upsampling folded into its convolution ([`KernelConfig::upsample_fold`]) computes
/// the same sums as the upsampling and convolution it replaces, in another form: its launches
/// are given the value of those two steps of the default program (forward, and the
/// convolution's input gradient followed by the upsampling's adjoint), from the values they
/// read, so that the rest of the program is checked as for any other switch. So is a 1x1
/// shortcut fused into its block's second convolution ([`KernelConfig::shortcut_fused`]):
/// the shortcut's launch, then the convolution with its output as the residual.
fn symbolic(p: &Program) -> (u64, Option<u64>) {
    symbolic_with(p, false)
}

/// [`symbolic`], with the fp32 direct kernels for few outputs ([`ConvKernel::Narrow`]) taken
/// to round their input to 16 bits (`narrow_rounds`) as the tensor-core kernel that replaces
/// them does ([`KernelConfig::narrow_mma`]): the one change of a program's values the
/// switches make on purpose.
fn symbolic_with(p: &Program, narrow_rounds: bool) -> (u64, Option<u64>) {
    fn h(parts: &[&dyn Fn(&mut DefaultHasher)]) -> u64 {
        let mut s = DefaultHasher::new();
        for f in parts {
            f(&mut s);
        }
        s.finish()
    }
    // A step's operation: its kind and shape (not its kernel) and the weights it reads.
    let op_of = |step: &Step| {
        let info = step.info(p.n, p.h, p.w);
        let weights: Vec<(usize, String)> = step
            .weights()
            .iter()
            .map(|w| (w.pid, format!("{:?}", w.kind)))
            .collect();
        move |s: &mut DefaultHasher| {
            info.kind.hash(s);
            info.shape.hash(s);
            weights.hash(s);
        }
    };
    let half = |v: u64| h(&[&|s| "half".hash(s), &|s| v.hash(s)]);
    // A convolution launch's value: its operation, the value of its main input (as the
    // kernel reads it), those its epilogue adds, the output it adds onto or fills in part of,
    // and its divisor.
    let conv_value = |conv: &Step, main: u64, extra: &[u64], old: Option<u64>, div: f32| {
        h(&[
            &op_of(conv),
            &|s| main.hash(s),
            &|s| extra.hash(s),
            &|s| old.hash(s),
            &|s| div.to_bits().hash(s),
        ])
    };
    let epilogue_inputs = |c: &ConvStep, val: &[u64]| -> Vec<u64> {
        c.temb
            .into_iter()
            .chain(c.residual)
            .map(|b| val[b.0])
            .collect()
    };
    // How a launch reads its main input: the tensor-core kernels round an fp32 input they
    // stage to 16 bits.
    let staged = |c: &ConvStep| {
        !c.launch.half_input && matches!(c.launch.kernel, ConvKernel::Tensor(q) if q.is_half())
            || narrow_rounds && c.launch.kernel == ConvKernel::Narrow
    };
    let mut val = vec![0u64; p.bufs.len()];
    // The value each 16-bit conversion was made from.
    let mut converted = std::collections::HashMap::new();
    // Per folded convolution's output: the value its class launches compute (each must
    // compute the same), and how many there were; per folded input gradient: the value of the
    // gradient its first launch reads, and whether the second, adding, launch read it too.
    let mut classes: std::collections::HashMap<Buf, (u64, usize)> = Default::default();
    let mut halves: std::collections::HashMap<Buf, (u64, bool)> = Default::default();
    // Per concatenation side its producers wrote (concat_from_producers), at (buffer, channel
    // offset): the value they computed, and its channels.
    let mut sides: std::collections::HashMap<(Buf, usize), (u64, usize)> = Default::default();
    val[p.sample.0] = h(&[&|s| "sample".hash(s)]);
    val[p.timesteps.0] = h(&[&|s| "timesteps".hash(s)]);
    // A GroupNorm backward pass that writes a concatenation's two gradients
    // (concat_grad_split) stands for the pass writing its input gradient and the
    // concatenation's two adjoint steps copying them out of it.
    let steps: Vec<(usize, Step)> = p
        .steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| unsplit(s, p.n).into_iter().map(move |s| (i, s)))
        .collect();
    for &(i, ref step) in &steps {
        if i == p.forward_steps {
            if let Some(c) = p.cotangent {
                val[c.0] = h(&[&|s| "cotangent".hash(s)]);
            }
        }
        let op = op_of(step);
        let (reads, writes) = step.io();
        match step {
            Step::AddInto {
                dst,
                src,
                accumulate: false,
                ..
            } => val[dst.0] = val[src.0],
            Step::ToHalf { x, y, .. } => {
                converted.insert(*y, val[x.0]);
                val[y.0] = half(val[x.0]);
            }
            Step::Conv(c) if c.w.kind == WKind::FoldForward => {
                // Upsampling (to 16 bits below fp32 and tf32) then the 3x3 convolution, as
                // the default lowers them; the folded launch reads the upsampling's input, or
                // a 16-bit copy of it.
                let (n, h2, w2, cin, cout) =
                    (c.shape.n, c.shape.yh, c.shape.yw, c.shape.sc, c.shape.ncols);
                let src = converted.get(&c.x).copied().unwrap_or(val[c.x.0]);
                let up = Step::Upsample {
                    x: c.x,
                    y: c.x,
                    h: h2 / 2,
                    w: w2 / 2,
                    c: cin,
                    half_out: None,
                };
                let up = h(&[&op_of(&up), &|s| [src].hash(s), &|s| 0usize.hash(s)]);
                let main = if c.launch.half_input { half(up) } else { up };
                let conv = Step::Conv(ConvStep {
                    shape: ConvShape::forward(n, h2, w2, cin, cout, 3, 1, Pad::Symmetric),
                    w: W {
                        kind: WKind::ConvForward,
                        ..c.w
                    },
                    ..c.clone()
                });
                let extra = epilogue_inputs(c, &val);
                let v = conv_value(&conv, main, &extra, None, c.out_div);
                let seen = classes.entry(c.y).or_insert((v, 0));
                assert_eq!(
                    seen.0, v,
                    "step {i}: a class launch computes another convolution"
                );
                seen.1 += 1;
                val[c.y.0] = v;
            }
            // The first of the two launches stands for both: the convolution's input gradient
            // into a fresh gradient of the upsampled tensor, then the upsampling's adjoint. The
            // second must read the same gradient and add onto the first; a 16-bit copy its
            // epilogue writes (below) is of that value.
            Step::Conv(c) if c.w.kind == WKind::FoldBackward && c.shape.taps[0].dy != 2 => {
                let main = if staged(c) {
                    half(val[c.x.0])
                } else {
                    val[c.x.0]
                };
                let first = halves.get_mut(&c.y).expect("the first gradient launch ran");
                assert!(c.accumulate && first.0 == main && !first.1, "step {i}");
                first.1 = true;
            }
            Step::Conv(c) if c.w.kind == WKind::FoldBackward => {
                let main = if staged(c) {
                    half(val[c.x.0])
                } else {
                    val[c.x.0]
                };
                halves.insert(c.y, (main, false));
                let (n, lh, lw, cin, cout) =
                    (c.shape.n, c.shape.mh, c.shape.mw, c.shape.ncols, c.shape.sc);
                let mut shapes =
                    ConvShape::backward(n, 2 * lh, 2 * lw, cin, cout, 3, 1, Pad::Symmetric);
                let dgrad = Step::Conv(ConvStep {
                    shape: shapes.remove(0),
                    w: W {
                        kind: WKind::ConvBackward,
                        ..c.w
                    },
                    bias: None,
                    ..c.clone()
                });
                let dup = conv_value(&dgrad, main, &[], None, 1.0);
                let adjoint = Step::UpsampleBackward {
                    dy: c.x,
                    dx: c.y,
                    h: lh,
                    w: lw,
                    c: cin,
                    accumulate: c.accumulate,
                };
                let r: Vec<u64> = std::iter::once(dup)
                    .chain(c.accumulate.then(|| val[c.y.0]))
                    .collect();
                val[c.y.0] = h(&[&op_of(&adjoint), &|s| r.hash(s), &|s| 0usize.hash(s)]);
            }
            Step::Conv(c) if c.shortcut.is_some() => {
                let f = c.shortcut.expect("matched");
                let shortcut = Step::Conv(ConvStep {
                    shape: c.shape.shortcut().expect("a fused shortcut's shape"),
                    x: f.x,
                    w: f.w,
                    bias: Some(W {
                        kind: WKind::Bias,
                        ..f.w
                    }),
                    temb: None,
                    residual: None,
                    accumulate: false,
                    out_div: 1.0,
                    shortcut: None,
                    ..c.clone()
                });
                // Its input is 16-bit, as every fused launch's.
                let shortcut = conv_value(&shortcut, val[f.x.0], &[], None, 1.0);
                let conv = Step::Conv(ConvStep {
                    shape: ConvShape {
                        shortcut_sc: 0,
                        ..c.shape.clone()
                    },
                    bias: Some(W {
                        kind: WKind::Bias,
                        ..c.w
                    }),
                    shortcut: None,
                    ..c.clone()
                });
                let main = if staged(c) {
                    half(val[c.x.0])
                } else {
                    val[c.x.0]
                };
                let mut extra = epilogue_inputs(c, &val);
                extra.push(shortcut);
                let old = c.accumulate.then(|| val[c.y.0]);
                val[c.y.0] = conv_value(&conv, main, &extra, old, c.out_div);
            }
            Step::GroupNorm {
                x,
                x_half,
                y,
                half_out,
                partial,
                stats,
                affine,
                ..
            } => {
                // The generic rule below, with the same slot for each buffer whether or not
                // the one-launch form writes it (it writes no partial sums or affine). A
                // GroupNorm of a 16-bit input (half_gn_inputs) stands for the same GroupNorm
                // of the values before their rounding: the check follows the wiring; the
                // rounding is the choice's own, which the GPU selftest holds to the CPU path.
                let r = [match x_half {
                    Some(_) => converted[x],
                    None => val[x.0],
                }];
                let out = |j: usize| h(&[&op, &|s| r.hash(s), &|s| j.hash(s)]);
                val[y.0] = if half_out.is_some() {
                    half(out(0))
                } else {
                    out(0)
                };
                for (j, b) in [partial, stats, affine].into_iter().enumerate() {
                    val[b.0] = out(j + 1);
                }
            }
            Step::Conv(c) => {
                let main = if staged(c) {
                    half(val[c.x.0])
                } else {
                    val[c.x.0]
                };
                let extra = epilogue_inputs(c, &val);
                let old = (c.accumulate || c.shape.out_stride > 1).then(|| val[c.y.0]);
                val[c.y.0] = conv_value(step, main, &extra, old, c.out_div);
            }
            _ => {
                // The fused attention backward also reads the forward's output, a function
                // of q/k/v, which it already reads.
                let derived = match *step {
                    Step::AttentionBackward { y, .. } => y,
                    _ => None,
                };
                // A GroupNorm backward pass of a 16-bit input (half_gn_inputs_recording) or
                // output gradient (half_norm_grads) stands for the same pass over the values
                // before their rounding, as its forward does.
                let widened: Vec<Buf> = match *step {
                    Step::GroupNormBackward {
                        x,
                        x_half,
                        dy,
                        dy_half,
                        ..
                    } => [(x, x_half), (dy, dy_half)]
                        .into_iter()
                        .filter_map(|(b, half)| half.map(|_| b))
                        .collect(),
                    _ => vec![],
                };
                let r: Vec<u64> = match *step {
                    // A side its producers wrote stands for that side read.
                    Step::Concat {
                        a,
                        b,
                        y,
                        ca,
                        placed,
                        ..
                    } => [(a, 0, placed[0]), (b, ca, placed[1])]
                        .into_iter()
                        .map(|(t, offset, placed)| match placed {
                            true => sides[&(y, offset)].0,
                            false => val[t.0],
                        })
                        .collect(),
                    _ => reads
                        .iter()
                        .filter(|&&b| Some(b) != derived)
                        .map(|&b| match widened.contains(&b) {
                            true => converted[&b],
                            false => val[b.0],
                        })
                        .collect(),
                };
                let halves: Vec<Buf> = match *step {
                    Step::Upsample {
                        y,
                        half_out: Some(_),
                        ..
                    }
                    | Step::Concat {
                        y,
                        half_out: Some(_),
                        ..
                    } => vec![y],
                    Step::GroupNormBackward {
                        dx,
                        half_out: Some(_),
                        ..
                    } => vec![dx],
                    _ => vec![],
                };
                for (j, w) in writes.iter().enumerate() {
                    val[w.0] = h(&[&op, &|s| r.hash(s), &|s| j.hash(s)]);
                }
                if let Step::Concat {
                    y,
                    y16: Some((c, _)),
                    ..
                }
                | Step::ConcatBackward {
                    d: y,
                    d16: Some((c, _)),
                    ..
                }
                | Step::GroupNormBackward {
                    dx: y,
                    dx16: Some((c, _)),
                    ..
                }
                | Step::Attention {
                    y,
                    y16: Some((c, _)),
                    ..
                }
                | Step::AttentionBackward {
                    dqkv: y,
                    dqkv16: Some((c, _)),
                    ..
                } = *step
                {
                    val[c.0] = half(val[y.0]);
                    converted.insert(c, val[y.0]);
                }
                for b in halves {
                    converted.insert(b, val[b.0]);
                    val[b.0] = half(val[b.0]);
                }
            }
        }
        // A 16-bit copy written by a launch's epilogue, as a conversion would write it.
        if let Step::Conv(ConvStep {
            copy16: Some(copy),
            y,
            ..
        }) = step
        {
            converted.insert(*copy, val[y.0]);
            val[copy.0] = half(val[y.0]);
        }
        // A concatenation side written by its producers: once both are, the concatenation's
        // value, rounded, as the concatenation step computes it (which the lowering drops
        // where it would have nothing else to do).
        if let Step::Conv(ConvStep {
            side16: Some(o),
            shape,
            y,
            ..
        }) = step
        {
            sides.insert((o.buf, o.offset), (val[y.0], shape.ncols));
            let first = sides.get(&(o.buf, 0)).copied();
            let second = first.and_then(|(_, ca)| sides.get(&(o.buf, ca)).copied());
            if let (Some((a, ca)), Some((b, cb))) = (first, second) {
                if ca + cb == o.width {
                    let concat = Step::Concat {
                        a: o.buf,
                        b: o.buf,
                        y: o.buf,
                        y16: None,
                        pixels: shape.n * shape.yh * shape.yw,
                        ca,
                        cb,
                        sums: None,
                        half_out: Some(Precision::Bf16),
                        placed: [true; 2],
                    };
                    let v = h(&[&op_of(&concat), &|s| [a, b].hash(s), &|s| 0usize.hash(s)]);
                    converted.insert(o.buf, v);
                    val[o.buf.0] = half(v);
                }
            }
        }
    }
    assert!(
        classes.values().all(|&(_, k)| k == 4),
        "a folded convolution lacks a class"
    );
    assert!(
        halves.values().all(|&(_, second)| second),
        "a folded gradient lacks a launch"
    );
    (val[p.output.0], p.grad_input.map(|g| val[g.0]))
}

/// Over every combination of the passes that move work between steps (one-pass GroupNorms,
/// 16-bit copies, aliased gradients, tall tiles, copies written by their writers), with wgmma,
/// 16-bit concatenations and fused attention or attention in rows on: a step reads and writes
/// one buffer only where it adds onto it element by element.
#[test]
fn fused_steps_keep_their_contracts() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for (n, size) in [(1, 256), (2, 64)] {
        for bits in 0..64u32 {
            let tc = KernelConfig {
                wgmma: true,
                half_concat: true,
                attention_flash: bits & 32 == 0,
                attention_rows: match bits & 32 != 0 {
                    true => AttentionRows::Everywhere,
                    false => AttentionRows::Off,
                },
                gn_one_pass: bits & 1 != 0,
                half_copy: bits & 2 != 0,
                alias_residual_grads: bits & 4 != 0,
                tall_tiles: bits & 8 != 0,
                fused_half_copies: bits & 16 != 0,
                ..KernelConfig::default()
            };
            let p = Program::build_with(&g, n, size, size, true, 132, Precision::Bf16, tc).unwrap();
            for (i, s) in p.steps.iter().enumerate() {
                let (reads, writes) = s.io();
                for b in writes.iter().filter(|b| reads.contains(b)) {
                    let adds_onto = match *s {
                        Step::Conv(ref c) => c.accumulate && c.y == *b && c.x != *b,
                        Step::GroupNormBackward { dx, accumulate, .. }
                        | Step::UpsampleBackward { dx, accumulate, .. } => accumulate && dx == *b,
                        Step::AddInto {
                            dst, accumulate, ..
                        } => accumulate && dst == *b,
                        Step::ConcatBackward { d, accumulate, .. } => accumulate && d == *b,
                        Step::AttentionBackward {
                            dqkv, accumulate, ..
                        } => accumulate && dqkv == *b,
                        Step::Divide { .. } => true,
                        _ => false,
                    };
                    assert!(adds_onto, "step {i} reads and writes {b:?}: {s:?} ({tc:?})");
                }
            }
        }
    }
}

/// Reads only ever see values some earlier step (or the host) wrote, in both modes.
#[test]
fn every_buffer_is_written_before_it_is_read() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let mut programs: Vec<(bool, Program)> = [
        (false, Precision::Fp32),
        (true, Precision::Fp32),
        (true, Precision::Bf16),
    ]
    .into_iter()
    .map(|(record, precision)| {
        let p = Program::build(&g, 2, 64, 32, record, 132, precision).unwrap();
        (record, p)
    })
    .collect();
    // With 16-bit input copies, which need full-size inputs to appear, and with those that
    // their writers can write written by them.
    for fused_half_copies in [false, true] {
        let copies = KernelConfig {
            half_copy: true,
            fused_half_copies,
            ..KernelConfig::default()
        };
        let p = Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, copies).unwrap();
        assert!(p.steps.iter().any(|s| matches!(s, Step::ToHalf { .. })));
        programs.push((true, p));
    }
    // The defaults: GroupNorm partial sums written by the steps before them, concatenations in
    // 16 bits only (in recording forwards too), the 1x1 shortcuts fused into convolutions, the
    // concatenations' gradients written by their GroupNorms; and each of the last three off.
    let tuned = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
    assert!(tuned.gn_producer_sums && tuned.half_gn_inputs && tuned.half_gn_inputs_recording);
    assert!(tuned.shortcut_fused && tuned.concat_grad_split);
    assert!(tuned.concat_from_producers && tuned.epilogue_half_copies);
    let fp32_recording = KernelConfig {
        half_gn_inputs_recording: false,
        ..tuned
    };
    let unfused = KernelConfig {
        shortcut_fused: false,
        ..tuned
    };
    let whole_grads = KernelConfig {
        concat_grad_split: false,
        ..tuned
    };
    // And the 16-bit outputs of staged epilogues each alone (both are defaults):
    // concatenations' sides, which a concatenation then reads back for its sums, and copies.
    let [sides, copies] = each_half_output(tuned);
    let [half_dy, adds] = backward_choices(tuned);
    // Attention in rows, which writes its 16-bit copies itself (a candidate).
    let rows = KernelConfig {
        attention_rows: AttentionRows::Everywhere,
        ..tuned
    };
    for (record, choice) in [
        (true, tuned),
        (false, tuned),
        (true, rows),
        (false, rows),
        (true, fp32_recording),
        (true, unfused),
        (false, unfused),
        (true, whole_grads),
        (true, sides),
        (false, sides),
        (true, copies),
        (true, half_dy),
        (true, adds),
    ] {
        let p = Program::build_with(&g, 1, 256, 256, record, 132, Precision::Bf16, choice).unwrap();
        programs.push((record, p));
    }
    // With upsamplings folded, whose class launches each write a quarter of their output.
    let fold = KernelConfig {
        upsample_fold: true,
        ..KernelConfig::default()
    };
    let p = Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, fold).unwrap();
    programs.push((true, p));
    for (record, p) in programs {
        let mut written = vec![false; p.bufs.len()];
        written[p.sample.0] = true;
        written[p.timesteps.0] = true;
        // The batched linear layers' tables: written when the plan is made.
        for s in &p.steps {
            if let Step::LinearBatch { table, .. } = s {
                written[table.0] = true;
            }
        }
        for (i, s) in p.steps.iter().enumerate() {
            if i == p.forward_steps {
                written[p.cotangent.unwrap().0] = true;
            }
            let (reads, writes) = s.io();
            for r in reads {
                assert!(
                    written[r.0],
                    "step {i} reads `{}` before anything wrote it",
                    p.bufs[r.0].what
                );
            }
            for w in writes {
                written[w.0] = true;
            }
        }
        assert!(written[p.output.0]);
        if record {
            assert!(written[p.grad_input.unwrap().0]);
        }
    }
}

/// Every resnet's projection of the time embedding (one per convolution that adds it) is
/// in one batched launch, before any reader of its output, whose table lives over the
/// whole program; the time-embedding MLP's two layers stay separate launches.
#[test]
fn time_embedding_projections_are_one_launch() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let projections = g
        .ops
        .iter()
        .filter(|op| matches!(op, Op::Conv { temb: Some(_), .. }))
        .count();
    assert!(projections > 1);
    for (record, precision) in [(false, Precision::Fp32), (true, Precision::Bf16)] {
        let p = Program::build(&g, 1, 64, 32, record, 132, precision).unwrap();
        let batches: Vec<usize> = (0..p.steps.len())
            .filter(|&i| matches!(p.steps[i], Step::LinearBatch { .. }))
            .collect();
        assert_eq!(batches.len(), 1, "{batches:?}");
        let at = batches[0];
        assert!(at < p.forward_steps);
        let Step::LinearBatch {
            x,
            inp,
            silu_in,
            out_div,
            ref layers,
            table,
        } = p.steps[at]
        else {
            unreachable!()
        };
        assert_eq!(layers.len(), projections);
        assert!(silu_in && out_div == 1.0);
        assert_eq!(inp, g.config.time_embedding_dim);
        assert_eq!(p.bufs[table.0].len, projections * LINEAR_ITEM_WORDS);
        assert_eq!(p.lifetimes()[table.0], (0, p.steps.len() - 1));
        // What is left: the MLP's two layers, neither reading the embedding `x`.
        let rows: Vec<&Step> = p
            .steps
            .iter()
            .filter(|s| matches!(s, Step::LinearRows { .. }))
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|s| matches!(**s, Step::LinearRows { x: rx, .. } if rx != x)));
        for l in layers {
            let first_read = p.steps.iter().position(|s| s.io().0.contains(&l.y));
            assert!(first_read.is_some_and(|r| r > at), "{}", p.bufs[l.y.0].what);
            let writers = p.steps.iter().filter(|s| s.io().1.contains(&l.y)).count();
            assert_eq!(writers, 1);
        }
    }
}

/// With per-image plans, every launch and GroupNorm that sums sums in the same order in any
/// batch as for one image alone, in the plain program and with the defaults, and the
/// attention steps choose their products' kernels for one image (`Kernels::gemm`'s
/// `per_image`; the choice itself is tested in src/cuda/kernels/attention.rs).
#[test]
fn batch_invariant_programs_plan_every_image_alike() {
    // What a step sums in which order: its launch's split of K, its GroupNorm's split, or
    // whether its attention products' kernels are chosen for one image.
    fn orders(p: &Program) -> Vec<String> {
        p.steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv(c) => Some(format!("{:?}", c.launch)),
                Step::GroupNorm { split, .. } | Step::GroupNormBackward { split, .. } => {
                    Some(format!("{split:?}"))
                }
                Step::Attention { per_image, .. } | Step::AttentionBackward { per_image, .. } => {
                    Some(format!("attention per image: {per_image}"))
                }
                _ => None,
            })
            .collect()
    }
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Fp32, Precision::Bf16] {
        let plain = KernelConfig {
            wgmma: true,
            ..KernelConfig::default()
        };
        let one_pass = KernelConfig {
            gn_one_pass: true,
            ..plain
        };
        for base in [
            plain,
            one_pass,
            KernelConfig::tuned(Capabilities::HOPPER, precision),
        ] {
            let choice = |batch_invariant| KernelConfig {
                batch_invariant,
                ..base
            };
            let build = |n, inv| {
                Program::build_with(&g, n, 128, 128, true, 132, precision, choice(inv)).unwrap()
            };
            let one = orders(&build(1, true));
            for n in [2, 3, 8] {
                let other = orders(&build(n, true));
                assert_eq!(other.len(), one.len());
                for (i, (a, b)) in other.iter().zip(&one).enumerate() {
                    assert_eq!(a, b, "{precision}, batch {n}, step {i} of those that sum");
                }
            }
            // Planned for the batch, the splits do change with it.
            assert_ne!(orders(&build(8, false)), orders(&build(1, false)));
            // celebahq's six attentions, forward and backward.
            for inv in [true, false] {
                let attentions: Vec<String> = orders(&build(2, inv))
                    .into_iter()
                    .filter(|o| o.starts_with("attention"))
                    .collect();
                assert_eq!(attentions, vec![format!("attention per image: {inv}"); 12]);
            }
        }
    }
}

/// In bf16 and fp16, exactly the GroupNorm and upsampling outputs that only feed
/// tensor-core launches, and the gradients GroupNorms pass back to such launches, are
/// 16-bit, at half the length, and only those launches read 16-bit inputs (as their main
/// input, or as the input of a shortcut fused into them).
#[test]
fn sixteen_bit_values_feed_only_tensor_core_launches() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [
        Precision::Fp32,
        Precision::Tf32,
        Precision::Bf16,
        Precision::Fp16,
    ] {
        for (deep, half_concat, fused) in [
            (true, false, false),
            (false, false, false),
            (true, true, false),
            (false, true, false),
            (true, true, true),
        ] {
            // The fused shortcuts take the lean wgmma kernels.
            let tc = KernelConfig {
                deep,
                half_concat,
                wgmma: fused,
                row_epilogue: fused,
                wgmma_lean: fused,
                shortcut_fused: fused,
                ..KernelConfig::default()
            };
            let p = Program::build_with(&g, 2, 64, 32, true, 132, precision, tc).unwrap();
            let expect_half = deep && matches!(precision, Precision::Bf16 | Precision::Fp16);
            // Which buffers a GroupNorm (or a concatenation's copy) wrote in 16 bits, and
            // who reads them.
            let mut half = vec![false; p.bufs.len()];
            let (mut norms, mut upsamplings, mut half_grads, mut copies) = (0, 0, 0, 0);
            for s in &p.steps {
                let (y, half_out, len) = match *s {
                    Step::Concat {
                        y16: Some((y, hp)),
                        pixels,
                        ca,
                        cb,
                        ..
                    } => {
                        copies += 1;
                        (y, Some(hp), pixels * (ca + cb))
                    }
                    Step::GroupNorm {
                        y, half_out, hw, c, ..
                    } => {
                        norms += 1;
                        (y, half_out, p.n * hw * c)
                    }
                    Step::Upsample {
                        y,
                        half_out,
                        h,
                        w,
                        c,
                        ..
                    } => {
                        upsamplings += 1;
                        (y, half_out, p.n * 4 * h * w * c)
                    }
                    Step::GroupNormBackward {
                        dx,
                        half_out,
                        accumulate,
                        hw,
                        c,
                        ..
                    } => {
                        if half_out.is_some() {
                            assert!(!accumulate);
                            half_grads += 1;
                        }
                        (dx, half_out, p.n * hw * c)
                    }
                    _ => continue,
                };
                if let Some(hp) = half_out {
                    assert!(expect_half && hp == precision);
                    assert_eq!(p.bufs[y.0].len, len.div_ceil(2));
                    half[y.0] = true;
                }
            }
            let mut readers = 0;
            for s in &p.steps {
                let (reads, _) = s.io();
                for r in reads.iter().filter(|r| half[r.0]) {
                    let Step::Conv(c) = s else {
                        panic!("`{}` read by {s:?}", p.bufs[r.0].what)
                    };
                    assert!(
                        c.x == *r || c.shortcut.map(|f| f.x) == Some(*r),
                        "a 16-bit buffer read as a residual or embedding"
                    );
                    assert!(c.launch.half_input);
                    assert_eq!(c.launch.kernel, ConvKernel::Tensor(precision));
                    readers += 1;
                }
                if let Step::Conv(c) = s {
                    assert_eq!(c.launch.half_input, half[c.x.0]);
                    let tensor = matches!(c.launch.kernel, ConvKernel::Tensor(_));
                    assert_eq!(c.launch.deep, deep && tensor);
                }
            }
            let halves = half.iter().filter(|&&h| h).count();
            if expect_half {
                // Every GroupNorm of this architecture feeds a 3x3 convolution or the
                // attention's q/k/v product on tensor cores, except the last, which feeds
                // the 3-channel output convolution (fp32 kernel); every upsampling feeds
                // its block's convolution.
                // Backward: the gradient of each residual block's first convolution (32
                // blocks), which only its second GroupNorm reads. With half_concat, the
                // 18 concatenations of the up blocks, each read by its block's shortcut.
                assert_eq!(upsamplings, 5);
                assert_eq!(half_grads, 32);
                assert_eq!(copies, if half_concat { 18 } else { 0 });
                assert_eq!(
                    halves,
                    norms - 1 + upsamplings + half_grads + copies,
                    "{precision}"
                );
                assert_eq!(readers, halves);
                let shortcuts = p
                    .steps
                    .iter()
                    .filter(|s| matches!(s, Step::Conv(c) if c.shortcut.is_some()))
                    .count();
                // The up path's 18, whose concatenations have 16-bit copies; the down path's
                // 2 read fp32 values, which only half_copy would convert.
                assert_eq!(shortcuts, if fused { 18 } else { 0 }, "{precision}");
            } else {
                assert_eq!(halves, 0);
            }
        }
    }
}
/// With half_copy, every large fp32 main input of a tensor-core launch is converted once
/// to 16 bits, and the copies feed only 16-bit-input tensor-core launches; with
/// fused_half_copies, the concatenations' adjoints and the GroupNorms' backward passes write
/// those of the buffers they wrote last, and as many buffers are copied (the symbolic test
/// holds their values).
#[test]
fn half_copies_feed_only_tensor_core_launches() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Tf32, Precision::Bf16, Precision::Fp16] {
        for (half_concat, fused) in [(false, false), (true, false), (true, true)] {
            let tc = KernelConfig {
                half_copy: true,
                half_concat,
                fused_half_copies: fused,
                ..KernelConfig::default()
            };
            let p = Program::build_with(&g, 1, 256, 256, true, 132, precision, tc).unwrap();
            let mut copy = vec![false; p.bufs.len()];
            let mut readers = vec![0; p.bufs.len()];
            let (mut forward, mut backward, mut by_writers) = (0, 0, 0);
            for (i, s) in p.steps.iter().enumerate() {
                let copied = match *s {
                    Step::ToHalf {
                        y,
                        len,
                        precision: hp,
                        ..
                    } => Some((y, len, hp)),
                    Step::ConcatBackward {
                        d16: Some((y, hp)),
                        pixels,
                        width,
                        ..
                    } => {
                        by_writers += 1;
                        Some((y, pixels * width, hp))
                    }
                    Step::GroupNormBackward {
                        dx16: Some((y, hp)),
                        hw,
                        c,
                        ..
                    } => {
                        by_writers += 1;
                        Some((y, p.n * hw * c, hp))
                    }
                    _ => None,
                };
                if let Some((y, len, hp)) = copied {
                    assert!(precision.is_half() && hp == precision);
                    assert!(len >= HALF_COPY_MIN);
                    assert_eq!(p.bufs[y.0].len, len.div_ceil(2));
                    copy[y.0] = true;
                    if i < p.forward_steps {
                        forward += 1;
                    } else {
                        backward += 1;
                    }
                }
            }
            for s in &p.steps {
                let (reads, _) = s.io();
                for r in reads.iter().filter(|r| copy[r.0]) {
                    let Step::Conv(c) = s else {
                        panic!("`{}` read by {s:?}", p.bufs[r.0].what)
                    };
                    assert_eq!(c.x, *r, "a 16-bit copy read as a residual or embedding");
                    assert!(c.launch.half_input);
                    assert_eq!(c.launch.kernel, ConvKernel::Tensor(precision));
                    readers[r.0] += 1;
                }
                // What is left staged from fp32 is small.
                if let Step::Conv(c) = s {
                    if precision.is_half()
                        && c.launch.kernel == ConvKernel::Tensor(precision)
                        && !c.launch.half_input
                    {
                        let sh = &c.shape;
                        assert!(sh.n * sh.sh * sh.sw * sh.sc < HALF_COPY_MIN, "{s:?}");
                    }
                }
            }
            assert!(copy.iter().zip(&readers).all(|(&c, &r)| !c || r > 0));
            if precision.is_half() {
                // The selftest's celebahq rows (2 x 64 x 64) copy too, at their top level.
                let small = Program::build_with(&g, 2, 64, 64, true, 132, precision, tc).unwrap();
                assert!(small.steps.iter().any(|s| matches!(s, Step::ToHalf { .. })));
            }
            if precision.is_half() {
                // Forward: the inputs of the stride-2 downsampling convolutions at the
                // 256x256 to 64x64 levels, plus, without the concatenations' own copies,
                // the 9 concatenations of the up blocks at those levels. Backward: the
                // gradients read by the input gradients of the residual blocks' second
                // convolutions and 1x1 shortcuts (each its own copy without aliasing),
                // the upsamplers' and the first downsampler's convolutions at those
                // levels.
                assert_eq!(forward, if half_concat { 3 } else { 12 });
                assert_eq!(backward, 29);
                // Of those, the gradients whose last contribution is a concatenation's
                // adjoint or a GroupNorm's backward (at batch 1, 38 with the small copies:
                // census in profile.rs).
                assert_eq!(by_writers, if fused { 14 } else { 0 });
            } else {
                assert_eq!(forward + backward, 0);
            }
        }
    }
}

/// With staged_epilogue, exactly the unsplit TMA launches finish through shared memory,
/// forward and backward, on both tiles, also where they fuse a shortcut; the program is
/// otherwise the one without it.
#[test]
fn staged_epilogues_take_the_unsplit_tma_launches() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    // (The splits it undoes are two_way_splits_unsplit_to_stage's.)
    let tuned = KernelConfig {
        staged_unsplit: false,
        ..without_half_outputs(KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16))
    };
    assert!(tuned.shortcut_fused);
    let unfused = KernelConfig {
        shortcut_fused: false,
        ..tuned
    };
    for (n, record) in [(1, true), (8, false)] {
        for others in [
            tuned,
            unfused,
            KernelConfig {
                tall_tiles: false,
                ..tuned
            },
        ] {
            let build = |tc| {
                Program::build_with(&g, n, 256, 256, record, 132, Precision::Bf16, tc).unwrap()
            };
            let base = build(KernelConfig {
                staged_epilogue: false,
                ..others
            });
            let p = build(KernelConfig {
                staged_epilogue: true,
                ..others
            });
            assert_eq!(base.steps.len(), p.steps.len());
            // Staged launches: all, on the tall tile, fusing a shortcut.
            let mut staged = [0; 3];
            for (a, b) in base.steps.iter().zip(&p.steps) {
                let (Step::Conv(a), Step::Conv(b)) = (a, b) else {
                    assert_eq!(format!("{a:?}"), format!("{b:?}"));
                    continue;
                };
                let l = b.launch;
                let fits = l.tma_loads && l.splits == 1;
                assert_eq!(l.staged_epilogue, fits, "{b:?}");
                let unstaged = ConvStep {
                    launch: ConvLaunch {
                        staged_epilogue: false,
                        ..l
                    },
                    ..b.clone()
                };
                assert_eq!(format!("{unstaged:?}"), format!("{a:?}"));
                let kinds = [true, l.tile == WgmmaTile::Tall, b.shortcut.is_some()];
                for (count, kind) in staged.iter_mut().zip(kinds) {
                    *count += usize::from(fits && kind);
                }
            }
            let [all, tall, fused] = staged;
            assert!(all > 0, "batch {n}");
            assert_eq!(tall > 0, others.tall_tiles, "batch {n}");
            if others.shortcut_fused {
                assert!(fused > 0, "batch {n}: {staged:?}");
            }
        }
    }
}

/// Every wgmma launch of the celebahq programs finds a kernel, at the defaults (with the tall
/// tiles on and off), and with the staged epilogue, the fused shortcuts or both off: the
/// planner's rules (which launches stage or fuse a shortcut) and the kernels compiled agree.
#[test]
fn every_planned_wgmma_launch_has_a_kernel() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let tuned = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
    assert!(tuned.shortcut_fused && tuned.staged_epilogue && tuned.staged_unsplit);
    let unstaged = KernelConfig {
        staged_epilogue: false,
        ..tuned
    };
    let configs = [
        tuned,
        KernelConfig {
            tall_tiles: false,
            ..tuned
        },
        unstaged,
        KernelConfig {
            shortcut_fused: false,
            ..tuned
        },
        KernelConfig {
            shortcut_fused: false,
            ..unstaged
        },
    ];
    for (n, h, record) in [(1, 256, true), (8, 256, false), (2, 64, true)] {
        for tc in configs {
            let p = Program::build_with(&g, n, h, h, record, 132, Precision::Bf16, tc).unwrap();
            for s in &p.steps {
                let Step::Conv(c) = s else { continue };
                if c.launch.wgmma {
                    let fused = c.shape.shortcut_sc > 0;
                    assert!(wgmma_kernel_exists(&c.launch, fused), "{c:?}");
                }
            }
        }
    }
}

/// With concat_grad_split, every concatenation's pair of adjoint steps that only copies the
/// input gradient of the GroupNorm backward pass right before it goes, that pass writing the
/// two sides (with the same 16-bit copies) and no longer its whole input gradient, which
/// nothing reads after it; the rest of the program is unchanged. In celebahq's DPS step 12 of
/// the up path's 18 concatenations (those whose GroupNorms run in three launches: 32x32 and
/// above), in every precision; none in a forward.
#[test]
fn concat_gradients_come_from_their_groupnorms() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in Precision::ALL {
        let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
        for (n, record) in [(1, true), (2, true), (1, false)] {
            let build =
                |tc| Program::build_with(&g, n, 256, 256, record, 132, precision, tc).unwrap();
            let base = build(KernelConfig {
                concat_grad_split: false,
                ..tuned
            });
            let p = build(KernelConfig {
                concat_grad_split: true,
                ..tuned
            });
            let mut taken = 0;
            let mut j = 0;
            for (i, s) in p.steps.iter().enumerate() {
                let Step::GroupNormBackward {
                    dx,
                    sides: Some(sides),
                    ..
                } = *s
                else {
                    assert_eq!(format!("{s:?}"), format!("{:?}", base.steps[j]), "step {i}");
                    j += 1;
                    continue;
                };
                taken += 1;
                // The pass, then the two adjoint steps it stands for, in the program without.
                let whole = unsplit(s, n);
                for (k, w) in whole.iter().enumerate() {
                    assert_eq!(
                        format!("{w:?}"),
                        format!("{:?}", base.steps[j + k]),
                        "step {i}"
                    );
                }
                j += whole.len();
                assert!(!s.io().1.contains(&dx), "step {i} writes its dx");
                assert!(
                    p.steps[i + 1..].iter().all(|t| !t.buffers().contains(&dx)),
                    "step {i}: dx read later"
                );
                assert_eq!(sides.a16.is_some(), precision.is_half(), "step {i}");
            }
            assert_eq!(j, base.steps.len());
            // (The 16x16 and 8x8 levels' GroupNorms run in one pass.)
            assert_eq!(taken, if record { 12 } else { 0 }, "{precision} n{n}");
            assert_eq!(p.steps.len() + 2 * taken, base.steps.len());
        }
    }
}

/// With gn_producer_sums, a three-launch forward GroupNorm takes its partial sums from the
/// step that wrote all of its input last exactly where that step can write them: a
/// concatenation (the GroupNorm's own chunks), or a convolution launch that can (lean or TMA
/// wgmma, unsplit, images of whole tiles: one chunk per tile, in a buffer sized for them); the
/// program is otherwise the tuned one without it.
#[test]
fn groupnorm_sums_come_from_the_steps_that_can_write_them() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for (n, record) in [(1, true), (8, false)] {
        let sums = without_half_outputs(KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16));
        assert!(sums.gn_producer_sums);
        let own = KernelConfig {
            gn_producer_sums: false,
            ..sums
        };
        let build = |tc| Program::build_with(&g, n, 256, 256, record, 132, Precision::Bf16, tc);
        let (base, p) = (build(own).unwrap(), build(sums).unwrap());
        assert_eq!(base.steps.len(), p.steps.len());
        let mut taken = 0;
        for (i, s) in p.steps.iter().enumerate() {
            let Step::GroupNorm {
                x,
                hw,
                c,
                split,
                partial,
                ..
            } = *s
            else {
                continue;
            };
            let writer = (0..i).rev().find(|&j| p.steps[j].io().1.contains(&x));
            if let Some(Step::Concat { y, sums, .. }) = writer.map(|j| &p.steps[j]) {
                assert_eq!(*y, x);
                let can = split.one_pass.is_none();
                assert_eq!(split.from_producer, can, "step {i}: {s:?}");
                if can {
                    // The GroupNorm's own chunks, and its own partial buffer.
                    assert_eq!(*sums, Some((partial, split)));
                    let own = match base.steps[i] {
                        Step::GroupNorm { split, .. } => split,
                        _ => unreachable!("the same steps"),
                    };
                    assert_eq!(
                        split,
                        NormSplit {
                            from_producer: true,
                            ..own
                        }
                    );
                    assert_eq!(p.bufs[partial.0].len, 4 * n * split.chunks * c);
                    taken += 1;
                } else {
                    assert_eq!(*sums, None);
                }
                continue;
            }
            let conv = match writer.map(|j| &p.steps[j]) {
                Some(Step::Conv(conv)) => Some(conv),
                _ => None,
            };
            let fits = conv.and_then(|c| gn_partial_fits(&c.shape, &c.launch));
            let can = split.one_pass.is_none() && fits.is_some() && conv.unwrap().y == x;
            assert_eq!(split.from_producer, can, "step {i}: {s:?}");
            if !can {
                continue;
            }
            taken += 1;
            let conv = conv.unwrap();
            assert_eq!(conv.gn_partial, Some(partial));
            assert_eq!(
                (split.chunks, split.chunks * split.chunk_px),
                (fits.unwrap(), hw)
            );
            assert_eq!(split.chunk_px, conv.launch.tile.rows());
            assert_eq!(p.bufs[partial.0].len, 4 * n * split.chunks * c);
        }
        // Every Conv outside those pairs as in the tuned program.
        for (a, b) in base.steps.iter().zip(&p.steps) {
            if let (Step::Conv(a), Step::Conv(b)) = (a, b) {
                assert_eq!(a.launch, b.launch);
                assert_eq!(a.gn_partial, None);
            }
        }
        let fewer = base.launches() - p.launches();
        assert_eq!(fewer, taken);
        // After a convolution: at batch 1 the 256x256 and 128x128 levels' GroupNorms (7 each)
        // and two of the 64x64 level's (after the two launches there that run unsplit to stage;
        // the others split K), at batch 8 the 64x64 level's too (21); after a concatenation,
        // the three-launch ones (12 at batch 1).
        assert_eq!((n, taken), if n == 1 { (1, 28) } else { (8, 33) });
    }
}

/// With half_gn_inputs, in a forward that records nothing, a concatenation is written in 16
/// bits only exactly where every reader takes it so: its GroupNorm (16-bit output, reading it
/// through the `_x16` kernels, its partial sums from the concatenation where producer sums
/// gave them before) and its 1x1 shortcut (16-bit input, in a launch of its own or fused into
/// the block's second convolution); every other step as in the
/// tuned program, and the same launches. A recording forward keeps every
/// concatenation in fp32 unless half_gn_inputs_recording asks otherwise, and fp32 always does.
#[test]
fn concatenations_read_only_in_16_bits_are_written_so() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    // (batch, precision, producer sums, per-image plans, deep pipelines, 16-bit concat copies)
    let cases = [
        (1, Precision::Bf16, true, false, true, true),
        (8, Precision::Fp16, true, false, true, true),
        (2, Precision::Bf16, false, true, true, true),
        (1, Precision::Fp32, true, false, true, true),
        (1, Precision::Tf32, false, false, true, true),
        (1, Precision::Bf16, false, false, false, true),
        (1, Precision::Bf16, false, false, true, false),
    ];
    for (n, precision, sums, batch_invariant, deep, half_concat) in cases {
        let tuned = without_half_outputs(KernelConfig::tuned(Capabilities::HOPPER, precision));
        let on = KernelConfig {
            half_gn_inputs: true,
            half_gn_inputs_recording: false,
            gn_producer_sums: sums,
            batch_invariant,
            deep,
            half_concat,
            ..tuned
        };
        let build = |record, tc| Program::build_with(&g, n, 256, 256, record, 132, precision, tc);
        let recording = build(true, on).unwrap();
        assert!(!recording.steps.iter().any(|s| matches!(
            s,
            Step::Concat {
                half_out: Some(_),
                ..
            } | Step::GroupNorm {
                x_half: Some(_),
                ..
            }
        )));
        let base = build(
            false,
            KernelConfig {
                half_gn_inputs: false,
                ..on
            },
        )
        .unwrap();
        let p = build(false, on).unwrap();
        assert_eq!(base.steps.len(), p.steps.len());
        assert_eq!(base.launches(), p.launches());
        let mut taken = 0;
        for (i, (a, s)) in base.steps.iter().zip(&p.steps).enumerate() {
            let Step::Concat {
                y,
                y16,
                half_out: Some(q),
                sums,
                pixels,
                ca,
                cb,
                ..
            } = *s
            else {
                // Their GroupNorms' forms say "16-bit input" (checked below).
                if !matches!(
                    s,
                    Step::GroupNorm {
                        x_half: Some(_),
                        ..
                    }
                ) {
                    assert_eq!(
                        a.info(n, 256, 256).label(),
                        s.info(n, 256, 256).label(),
                        "step {i}"
                    );
                }
                continue;
            };
            taken += 1;
            assert_eq!((q, y16), (precision, None));
            // With producer sums, the three-launch GroupNorms' (the concatenation sums the
            // values it rounds).
            let own = match a {
                Step::Concat { sums, .. } => sums,
                _ => panic!("step {i}: the same steps"),
            };
            assert_eq!(sums.is_some(), own.is_some(), "step {i}");
            assert_eq!(p.bufs[y.0].len, (pixels * (ca + cb)).div_ceil(2));
            let readers: Vec<&Step> = p.steps.iter().filter(|r| r.io().0.contains(&y)).collect();
            assert_eq!(readers.len(), 2, "step {i}");
            for r in readers {
                match r {
                    Step::GroupNorm {
                        x_half,
                        half_out,
                        split,
                        ..
                    } => {
                        assert_eq!((*x_half, *half_out), (Some(precision), Some(precision)));
                        assert_eq!(split.from_producer, sums.is_some());
                    }
                    // Its 1x1 shortcut, in a launch of its own or fused into the block's
                    // second convolution.
                    Step::Conv(c) => assert!(
                        c.launch.half_input && (c.shape.taps.len() == 1 || c.shortcut.is_some())
                    ),
                    other => panic!("step {i} read by {other:?}"),
                }
            }
        }
        // The up path's 18 concatenations, each read by a residual block's first GroupNorm
        // and 1x1 shortcut; none in fp32 or tf32, nor without the deep pipelines or the
        // 16-bit copies.
        let want = if precision.is_half() && deep && half_concat {
            18
        } else {
            0
        };
        assert_eq!(
            taken, want,
            "{precision} b{n}, deep {deep}, copies {half_concat}"
        );
        // With half_gn_inputs_recording, the recording forward stores the same
        // concatenations in 16 bits only, with the same launches, and the backward pass of
        // each one's GroupNorm (the only step of the backward pass that reads it) reads the
        // 16-bit values; nothing else changes.
        let with = KernelConfig {
            half_gn_inputs_recording: true,
            ..on
        };
        let rec = build(true, with).unwrap();
        assert_eq!(rec.launches(), recording.launches());
        assert_eq!(rec.steps.len(), recording.steps.len());
        let mut backward = 0;
        for (i, (a, s)) in recording.steps.iter().zip(&rec.steps).enumerate() {
            match *s {
                Step::Concat {
                    y,
                    half_out: Some(q),
                    ..
                } => {
                    assert_eq!(q, precision);
                    let readers: Vec<&Step> =
                        rec.steps.iter().filter(|r| r.io().0.contains(&y)).collect();
                    for r in &readers {
                        match r {
                            Step::GroupNorm { x_half, .. }
                            | Step::GroupNormBackward { x_half, .. } => {
                                assert_eq!(*x_half, Some(precision), "step {i}")
                            }
                            Step::Conv(c) => assert!(c.launch.half_input, "step {i}"),
                            other => panic!("step {i} read by {other:?}"),
                        }
                    }
                    backward += readers
                        .iter()
                        .filter(|r| matches!(r, Step::GroupNormBackward { .. }))
                        .count();
                }
                Step::GroupNorm {
                    x_half: Some(_), ..
                }
                | Step::GroupNormBackward {
                    x_half: Some(_), ..
                } => {}
                _ => assert_eq!(
                    a.info(n, 256, 256).label(),
                    s.info(n, 256, 256).label(),
                    "step {i}"
                ),
            }
        }
        assert_eq!(backward, want, "{precision} b{n}");
    }
}

/// With half_copy_small (a default on Hopper), no tensor-core launch of the bf16/fp16 program
/// stages an fp32 input, at any size, and every one runs on wgmma.
#[test]
fn small_half_copies_leave_no_staged_launch() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Bf16, Precision::Fp16] {
        let tc = KernelConfig::tuned(Capabilities::HOPPER, precision);
        assert!(tc.half_copy && tc.half_copy_small);
        let p = Program::build_with(&g, 1, 256, 256, true, 132, precision, tc).unwrap();
        let tensor: Vec<&ConvStep> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv(c) if c.launch.kernel == ConvKernel::Tensor(precision) => Some(c),
                _ => None,
            })
            .collect();
        assert!(!tensor.is_empty());
        for c in tensor {
            assert!(c.launch.half_input && c.launch.wgmma, "{c:?}");
        }
    }
}
/// Copies, aliases, 16-bit inputs, fused attention and folded upsamplings change where values
/// live and which kernel reads them, never what is computed: every combination of the switches
/// computes the default program's output and input gradient (symbolically, [`symbolic`]), and
/// so does the
/// two-stage pipeline, which stages every input from fp32; a program missing one
/// accumulation does not.
#[test]
fn switches_compute_what_the_default_program_computes() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    // At batch 32 the middle block's 8x8 gradients are large enough to be copied, and
    // its attention's residual gradient, aliased, is then added onto after a copy of it
    // was made: the copy must not be reused.
    for (n, h, w) in [(1, 256, 256), (2, 64, 32), (32, 256, 256)] {
        for precision in [Precision::Bf16, Precision::Fp16] {
            let build = |tc: KernelConfig| {
                Program::build_with(&g, n, h, w, true, 132, precision, tc).unwrap()
            };
            let base = build(KernelConfig::default());
            let want = symbolic(&base);
            assert!(want.1.is_some());
            for bits in 0..128 {
                let tc = KernelConfig {
                    half_copy: bits & 1 != 0,
                    alias_residual_grads: bits & 2 != 0,
                    half_concat: bits & 4 != 0,
                    attention_flash: bits & 8 != 0,
                    upsample_fold: bits & 16 != 0,
                    half_copy_small: bits & 32 != 0,
                    fused_half_copies: bits & 64 != 0,
                    ..KernelConfig::default()
                };
                assert_eq!(symbolic(&build(tc)), want, "{precision} {n}x{h}x{w} {tc:?}");
            }
            let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
            assert_eq!(symbolic(&build(tuned)), want, "{precision} {n}x{h}x{w}");
            // What the defaults have in the program, else the rest would check nothing.
            let p = build(tuned);
            assert!(p.steps.iter().any(|s| matches!(
                s,
                Step::GroupNormBackward {
                    x_half: Some(_),
                    sides: Some(_),
                    ..
                }
            )));
            assert!(p
                .steps
                .iter()
                .any(|s| matches!(s, Step::Conv(c) if c.shortcut.is_some())));
            // (At 64x32 no launch of a concatenation's producers is staged.)
            assert_eq!(
                p.steps.iter().any(|s| matches!(
                    s,
                    Step::Conv(c) if c.side16.is_some() && c.copy16.is_some() && !c.fp32_out
                )),
                h == 256
            );
            // v0.8's to v0.10's defaults each turned off, and all of them.
            let v08: [fn(&mut KernelConfig); 8] = [
                |c| c.fold_residual_grads = false,
                |c| c.concat_from_producers = false,
                |c| c.epilogue_half_copies = false,
                |c| c.half_gn_inputs_recording = false,
                |c| c.shortcut_fused = false,
                |c| c.staged_epilogue = false,
                |c| c.concat_grad_split = false,
                |c| c.staged_unsplit = false,
            ];
            let mut v07 = tuned;
            for off in v08 {
                let mut one = tuned;
                off(&mut one);
                off(&mut v07);
                assert_eq!(
                    symbolic(&build(one)),
                    want,
                    "{precision} {n}x{h}x{w} {one:?}"
                );
            }
            assert_eq!(symbolic(&build(v07)), want, "{precision} {n}x{h}x{w}");
            // The GroupNorms that split launches' reductions compute (a candidate), where the
            // levels at batch 1 split their launches.
            let fused = build(KernelConfig {
                gn_from_reduction: true,
                ..tuned
            });
            assert_eq!(
                symbolic(&fused),
                want,
                "{precision} {n}x{h}x{w} fused norms"
            );
            if n == 1 && h == 256 {
                assert!(fused
                    .steps
                    .iter()
                    .any(|s| matches!(s, Step::Conv(c) if c.norm.is_some())));
            }
            // The TMA copies at input stride 2 (a candidate): the same launches but for a split
            // left out where the TMA launch runs unsplit to stage its epilogue; and the 16-bit
            // copies by parity-class launches (a candidate), alone and with them.
            for (strided_tma, class_half_copies, reduce_half_copies, gn_from_reduction) in [
                (true, false, false, false),
                (false, true, false, false),
                (false, false, true, false),
                (false, false, true, true),
                (true, true, true, false),
            ] {
                let tc = KernelConfig {
                    strided_tma,
                    class_half_copies,
                    reduce_half_copies,
                    gn_from_reduction,
                    ..tuned
                };
                assert_eq!(symbolic(&build(tc)), want, "{precision} {n}x{h}x{w} {tc:?}");
            }
            // The attention in rows (a candidate) computes what the default does, and writes the
            // 16-bit copies of the attentions' outputs and input gradients the projections
            // read, instead of their conversion launches.
            let rows = build(KernelConfig {
                attention_rows: AttentionRows::Everywhere,
                ..tuned
            });
            assert_eq!(symbolic(&rows), want, "{precision} {n}x{h}x{w} rows");
            let copies = |p: &Program| {
                p.steps
                    .iter()
                    .filter(|s| matches!(s, Step::ToHalf { .. }))
                    .count()
            };
            let by_rows = rows
                .steps
                .iter()
                .filter(|s| {
                    matches!(
                        s,
                        Step::Attention { y16: Some(_), .. }
                            | Step::AttentionBackward {
                                dqkv16: Some(_),
                                ..
                            }
                    )
                })
                .count();
            assert_eq!(copies(&rows) + by_rows, copies(&build(tuned)));
            if n == 1 && h == 256 {
                assert_eq!(by_rows, 12, "{precision}: six attentions, both ways");
            }
            // The 3-channel convolutions on the tensor cores (a candidate) compute what the
            // default does over inputs rounded to 16 bits where they have few outputs (conv_out's
            // forward over the GroupNorm's 16-bit output, conv_in's input gradient over a 16-bit
            // copy), and over the same fp32 inputs where they have few inputs.
            let narrow = build(KernelConfig {
                narrow_mma: true,
                few_in_mma: true,
                ..tuned
            });
            assert_eq!(
                symbolic(&narrow),
                symbolic_with(&base, true),
                "{precision} {n}x{h}x{w} narrow tensor cores"
            );
            assert_ne!(symbolic_with(&base, true), want);
            for kernel in [ConvKernel::NarrowTensor(precision), ConvKernel::FewInTensor] {
                let on_tc = narrow
                    .steps
                    .iter()
                    .filter(|s| matches!(s, Step::Conv(c) if c.launch.kernel == kernel));
                assert_eq!(on_tc.count(), 2, "{precision} {n}x{h}x{w} {kernel:?}");
            }
            // The candidates: GroupNorm backward passes reading 16-bit output gradients, and
            // adding residuals' gradients; each, and both.
            for (half_norm_grads, fold_residual_grads) in [
                (HalfGrads::Everywhere, false),
                (HalfGrads::OverHalfInputs, false),
                (HalfGrads::Off, true),
                (HalfGrads::Everywhere, true),
            ] {
                let tc = KernelConfig {
                    half_norm_grads,
                    fold_residual_grads,
                    ..tuned
                };
                assert_eq!(symbolic(&build(tc)), want, "{precision} {n}x{h}x{w} {tc:?}");
            }
            // A forward that records nothing, where 16-bit GroupNorm inputs apply.
            let forward = |tc| {
                symbolic(&Program::build_with(&g, n, h, w, false, 132, precision, tc).unwrap())
            };
            assert_eq!(
                forward(tuned),
                forward(KernelConfig::default()),
                "{precision} {n}x{h}x{w}"
            );
            assert_eq!(
                forward(v07),
                forward(KernelConfig::default()),
                "{precision} {n}x{h}x{w}"
            );
            let two_stage = KernelConfig {
                deep: false,
                ..KernelConfig::default()
            };
            assert_eq!(symbolic(&build(two_stage)), want);
            let mut broken = base;
            let last_add = broken
                .steps
                .iter()
                .rposition(|s| {
                    matches!(
                        s,
                        Step::AddInto {
                            accumulate: true,
                            ..
                        }
                    )
                })
                .unwrap();
            broken.steps.remove(last_add);
            assert_ne!(symbolic(&broken).1, want.1);
        }
    }
}

/// With alias_residual_grads no gradient starts as a copy: every residual's first
/// contribution is its block output's gradient buffer.
#[test]
fn aliased_residual_gradients_leave_no_copies() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let copies = |alias: bool| {
        let tc = KernelConfig {
            alias_residual_grads: alias,
            ..KernelConfig::default()
        };
        let p = Program::build_with(&g, 1, 64, 64, true, 132, Precision::Bf16, tc).unwrap();
        let adds = |acc: bool| {
            p.steps
                .iter()
                .filter(|s| matches!(s, Step::AddInto { accumulate, .. } if *accumulate == acc))
                .count()
        };
        (adds(false), adds(true))
    };
    let (plain, accumulating) = copies(false);
    // One per residual block and attention block of the architecture whose residual's
    // gradient starts there.
    assert!(plain > 20, "{plain}");
    assert_eq!(copies(true), (0, accumulating));
}
/// attention_tf32 and attention_flash put the attention on tf32 tensor cores below fp32,
/// forward and backward alike, and never in fp32; fused attention, where both are asked,
/// saves each query's log-sum-exp instead of P, and its backward reads the forward's
/// output; heads the fused kernels cannot take keep the products. attention_rows runs the
/// attention in rows below fp32 where flash does not take it (heads of 16 channels and more,
/// up to 512), the forward with scratch of its own, saving P in a recording forward only, the
/// backward reading the forward's output.
#[test]
fn tensor_core_attention_only_below_fp32() {
    use AttnKernel::*;
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let mut narrow = UNetConfig::celebahq_256();
    narrow.attention_head_dim = Some(32);
    let g_narrow = Graph::build(&narrow).unwrap();
    let mut thin = UNetConfig::celebahq_256();
    thin.attention_head_dim = Some(8);
    let g_thin = Graph::build(&thin).unwrap();
    for precision in Precision::ALL {
        for bits in 0..8 {
            let (tf32, flash, rows) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
            let tc = KernelConfig {
                attention_tf32: tf32,
                attention_flash: flash,
                attention_rows: match rows {
                    true => AttentionRows::Everywhere,
                    false => AttentionRows::Off,
                },
                ..KernelConfig::default()
            };
            // (graph, heads the fused kernels take, heads the rows kernels take)
            for (graph, fits, rows_fit) in [
                (&g, true, true),
                (&g_narrow, false, true),
                (&g_thin, false, false),
            ] {
                for record in [false, true] {
                    let p =
                        Program::build_with(graph, 1, 64, 64, record, 132, precision, tc).unwrap();
                    let mut forward = Vec::new();
                    let mut backward = Vec::new();
                    for s in &p.steps {
                        match *s {
                            Step::Attention {
                                kernel,
                                saved,
                                saves,
                                scratch,
                                tokens,
                                heads,
                                head_dim,
                                ..
                            } => {
                                // (A rows forward that saves nothing has no P.)
                                let saved_len = match kernel {
                                    Rows if !record => 1,
                                    _ => heads * kernel.saved_len(tokens),
                                };
                                assert_eq!(p.bufs[saved.0].len, saved_len);
                                assert_eq!(saves, record);
                                let len = heads * kernel.forward_scratch_len(tokens, head_dim);
                                assert_eq!(
                                    scratch.map(|b| p.bufs[b.0].len),
                                    (len > 0).then_some(len)
                                );
                                assert_eq!(len > 0, kernel == Rows);
                                forward.push(kernel);
                            }
                            Step::AttentionBackward { kernel, y, .. } => {
                                assert_eq!(y.is_some(), kernel == Flash || kernel == Rows);
                                backward.push(kernel);
                            }
                            _ => {}
                        }
                    }
                    assert_eq!(forward.len(), 6, "six attentions");
                    assert_eq!(backward.len(), if record { 6 } else { 0 });
                    let want = match (precision, flash && fits, rows && rows_fit, tf32) {
                        (Precision::Fp32, ..) => Products,
                        (_, true, ..) => Flash,
                        (_, false, true, _) => Rows,
                        (_, false, false, true) => Tf32Products,
                        (_, false, false, false) => Products,
                    };
                    assert!(
                        forward.iter().chain(&backward).all(|&k| k == want),
                        "{precision} tf32 {tf32} flash {flash} rows {rows} fits {fits} {rows_fit}: \
                         {forward:?} {backward:?}"
                    );
                }
            }
        }
    }
}
/// AttentionRows::OneWave runs attention in rows where its split launch is one wave on the
/// device: celebahq's at batch 1 (128 blocks of 132 at 256 tokens, 8 at 64), at batch 8 only the
/// 64-token one (64 blocks; 1024 at 256 tokens), and with batch_invariant, which counts one
/// image's blocks, every one at any batch, so that an image's attention is the same kernel
/// whatever its batch.
#[test]
fn attention_in_rows_where_one_wave() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    // (batch, batch_invariant, tokens that run in rows)
    for (n, batch_invariant, rows) in [
        (1, false, &[64, 256][..]),
        (8, false, &[64][..]),
        (8, true, &[64, 256][..]),
    ] {
        let tc = KernelConfig {
            attention_rows: AttentionRows::OneWave,
            batch_invariant,
            ..KernelConfig::default()
        };
        let p = Program::build_with(&g, n, 256, 256, true, 132, Precision::Bf16, tc).unwrap();
        let mut seen = 0;
        for s in &p.steps {
            if let Step::Attention { kernel, tokens, .. }
            | Step::AttentionBackward { kernel, tokens, .. } = *s
            {
                let want = match rows.contains(&tokens) {
                    true => AttnKernel::Rows,
                    false => AttnKernel::Products,
                };
                assert_eq!(
                    kernel, want,
                    "batch {n}, invariant {batch_invariant}, {tokens} tokens"
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 12);
    }
}

/// tall_tiles gives 256-row tiles to the unsplit wgmma launches that fill the machine with
/// them: the 256x256 level at batch 1, most launches at batch 8; never without wgmma.
#[test]
fn tall_tiles_where_they_fill_the_machine() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let tall = |n: usize, wgmma: bool| -> (usize, usize) {
        let tc = KernelConfig {
            wgmma,
            tall_tiles: true,
            ..KernelConfig::default()
        };
        let p = Program::build_with(&g, n, 256, 256, false, 132, Precision::Bf16, tc).unwrap();
        let (mut tall, mut wg) = (0, 0);
        for s in &p.steps {
            if let Step::Conv(c) = s {
                if c.launch.wgmma {
                    wg += 1;
                }
                if c.launch.tile == WgmmaTile::Tall {
                    assert!(c.launch.wgmma && c.launch.splits == 1);
                    assert!(c.shape.rows().div_ceil(256) * c.shape.ncols.div_ceil(128) >= 132);
                    tall += 1;
                }
            }
        }
        (tall, wg)
    };
    let (b1, wg1) = tall(1, true);
    let (b8, wg8) = tall(8, true);
    assert!(b1 > 0 && b1 < wg1, "{b1} of {wg1}");
    assert!(b8 > b1 && b8 <= wg8, "{b8} of {wg8}");
    assert_eq!(tall(8, false).0, 0);
}

/// upsample_fold replaces the upsamplings of at least FOLD_MIN_ROWS input pixels (at batch 1
/// the 64x64 and 128x128 levels, at batch 8 the 32x32 one too, and with batch_invariant
/// batch 1's at any batch), and their convolutions' launches: four class launches from a
/// 16-bit copy of the upsampling's input (in bf16; in fp32 and tf32 the input itself) with
/// 4/9 of the products, and two input-gradient launches into that input's gradient, the
/// second adding; computing, symbolically, what the default program computes.
#[test]
fn upsamplings_fold_where_large() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let build = |n, precision, fold, batch_invariant| {
        let tc = KernelConfig {
            wgmma: true,
            upsample_fold: fold,
            batch_invariant,
            ..KernelConfig::default()
        };
        Program::build_with(&g, n, 256, 256, true, 132, precision, tc).unwrap()
    };
    let count = |p: &Program, f: &dyn Fn(&Step) -> bool| p.steps.iter().filter(|s| f(s)).count();
    let upsamplings = |p: &Program| {
        count(p, &|s| matches!(s, Step::Upsample { .. }))
            + count(p, &|s| matches!(s, Step::UpsampleBackward { .. }))
    };
    let fold_kind = |s: &Step, kind: WKind| matches!(s, Step::Conv(c) if c.w.kind == kind);
    let cases = [(1, false, 2), (8, false, 3), (8, true, 2)];
    let precisions = [Precision::Bf16, Precision::Fp32, Precision::Tf32];
    for ((n, batch_invariant, folds), precision) in
        cases.into_iter().flat_map(|c| precisions.map(|p| (c, p)))
    {
        let base = build(n, precision, false, batch_invariant);
        let p = build(n, precision, true, batch_invariant);
        assert_eq!(symbolic(&p), symbolic(&base), "{precision} batch {n}");
        assert_eq!(upsamplings(&base), 10);
        assert_eq!(upsamplings(&p), 10 - 2 * folds, "batch {n}");
        assert_eq!(count(&p, &|s| fold_kind(s, WKind::FoldForward)), 4 * folds);
        assert_eq!(count(&p, &|s| fold_kind(s, WKind::FoldBackward)), 2 * folds);
        let flops = |p: &Program| p.step_infos().iter().map(|i| i.flops).sum::<f64>();
        // The folded convolutions' products, forward and input gradient: 4/9 of theirs.
        let folded: f64 = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv(c) if matches!(c.w.kind, WKind::FoldForward | WKind::FoldBackward) => {
                    Some(2.0 * (c.shape.rows() * c.shape.ncols * c.shape.k()) as f64)
                }
                _ => None,
            })
            .sum();
        assert!((flops(&base) - flops(&p) - 1.25 * folded).abs() < 1.0);
        let (mut converted, mut classes) = (Vec::new(), Vec::new());
        for (i, s) in p.steps.iter().enumerate() {
            match s {
                Step::ToHalf { y, .. } => converted.push(*y),
                Step::Conv(c) if c.w.kind == WKind::FoldForward => {
                    // In bf16 from a 16-bit copy on wgmma, below it from the input itself.
                    let half = precision.is_half();
                    assert_eq!((c.launch.half_input, c.launch.wgmma), (half, half));
                    assert_eq!(converted.contains(&c.x), half, "step {i}");
                    assert_eq!((c.shape.out_stride, c.shape.taps.len()), (2, 4));
                    classes.push((c.y, (c.shape.out_oy, c.shape.out_ox)));
                }
                Step::Conv(c) if c.w.kind == WKind::FoldBackward => {
                    assert_eq!((c.shape.in_stride, c.shape.taps.len()), (2, 8));
                }
                _ => {}
            }
        }
        for four in classes.chunks(4) {
            assert!(four.iter().all(|c| c.0 == four[0].0));
            let mut seen: Vec<_> = four.iter().map(|c| c.1).collect();
            seen.sort();
            assert_eq!(seen, [(0, 0), (0, 1), (1, 0), (1, 1)]);
        }
        let backward: Vec<&ConvStep> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv(c) if c.w.kind == WKind::FoldBackward => Some(c),
                _ => None,
            })
            .collect();
        for pair in backward.chunks(2) {
            assert_eq!((pair[0].y, pair[0].x), (pair[1].y, pair[1].x));
            assert!(pair[1].accumulate);
        }
    }
}

/// Reports name every choice that is on, and none that is off.
#[test]
fn every_choice_has_a_name() {
    assert!(KernelConfig::default().describe().is_empty());
    let flags: [fn(&mut KernelConfig); 22] = [
        |c| c.deep = false,
        |c| c.wgmma = true,
        |c| c.gn_one_pass = true,
        |c| c.half_concat = true,
        |c| c.half_copy = true,
        |c| c.alias_residual_grads = true,
        |c| c.row_epilogue = true,
        |c| c.attention_tf32 = true,
        |c| c.attention_flash = true,
        |c| c.attention_rows = AttentionRows::Everywhere,
        |c| c.tall_tiles = true,
        |c| c.upsample_fold = true,
        |c| c.shortcut_fused = true,
        |c| c.staged_epilogue = true,
        |c| c.batch_invariant = true,
        |c| c.half_norm_grads = HalfGrads::Everywhere,
        |c| c.fold_residual_grads = true,
        |c| c.class_concurrency = true,
        |c| c.gn_from_reduction = true,
        |c| c.narrow_mma = true,
        |c| c.few_in_mma = true,
        |c| c.approx_silu = true,
    ];
    let mut all = KernelConfig::default();
    for set in flags {
        let mut one = KernelConfig::default();
        set(&mut one);
        assert_eq!(one.describe().len(), 1, "{one:?}");
        set(&mut all);
    }
    assert_eq!(all.describe().len(), flags.len());
    let over_half = KernelConfig {
        half_norm_grads: HalfGrads::OverHalfInputs,
        ..KernelConfig::default()
    };
    assert_eq!(over_half.describe().len(), 1);
    let one_wave = KernelConfig {
        attention_rows: AttentionRows::OneWave,
        ..KernelConfig::default()
    };
    assert_eq!(one_wave.describe().len(), 1);
    // Choices named only beside the ones they refine.
    let placed = KernelConfig {
        half_gn_inputs: true,
        concat_from_producers: true,
        ..KernelConfig::default()
    };
    assert_eq!(
        placed.describe(),
        [
            "16-bit GroupNorm inputs",
            "concatenations written by their producers"
        ]
    );
    let copies = KernelConfig {
        half_copy: true,
        epilogue_half_copies: true,
        ..KernelConfig::default()
    };
    assert_eq!(
        copies.describe(),
        ["16-bit input copies", "16-bit copies by staged epilogues"]
    );
    let unsplit = KernelConfig {
        staged_epilogue: true,
        staged_unsplit: true,
        ..KernelConfig::default()
    };
    assert_eq!(
        unsplit.describe(),
        ["staged wgmma epilogues", "two-way splits unsplit to stage"]
    );
}

/// Every buffer a program gives room in the arena is read or written by some step: the
/// lowering allocates nothing it does not use (a one-pass GroupNorm, say, no scratch of the
/// three-launch form, beyond the one element every buffer has).
#[test]
fn every_buffer_with_room_is_used() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Fp32, Precision::Bf16] {
        let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
        let flash = KernelConfig {
            attention_flash: true,
            ..tuned
        };
        // v0.6's defaults: conversion launches, a GroupNorm's own partial sums, fp32
        // concatenations.
        let v06 = KernelConfig {
            fused_half_copies: false,
            gn_producer_sums: false,
            half_gn_inputs: false,
            ..tuned
        };
        let fused = KernelConfig {
            shortcut_fused: true,
            ..tuned
        };
        let split = KernelConfig {
            concat_grad_split: true,
            ..tuned
        };
        let [sides, copies] = each_half_output(tuned);
        let [half_dy, adds] = backward_choices(tuned);
        let rows = KernelConfig {
            attention_rows: AttentionRows::Everywhere,
            ..tuned
        };
        for choice in [
            KernelConfig::default(),
            tuned,
            flash,
            rows,
            v06,
            fused,
            split,
            sides,
            copies,
            half_dy,
            adds,
        ] {
            for (n, record) in [(1, false), (1, true), (2, true)] {
                let p =
                    Program::build_with(&g, n, 256, 256, record, 132, precision, choice).unwrap();
                let mut used = vec![false; p.bufs.len()];
                for b in p.steps.iter().flat_map(|s| s.buffers()) {
                    used[b.0] = true;
                }
                for (b, used) in p.bufs.iter().zip(used) {
                    assert!(used || b.len == 1, "{precision} {choice:?}: {}", b.what);
                }
            }
        }
    }
}

/// With wgmma_tma, every wgmma launch with the row epilogue whose shape the TMA kernels take
/// copies through the tensor memory accelerator, with the lean epilogue, and no other launch
/// does; at batch 1 that is 206 of the DPS step's 215, and with strided_tma all 215 (the five
/// stride-2 forwards and the four input-gradient launches of the folded upsamplings too). With
/// epilogue_prefetch, exactly the unsplit lean launches whose epilogue reads a residual or
/// the output it adds onto prefetch (14 at batch 1: the fused shortcuts read no residual; 15
/// with strided_tma, whose TMA copies let the second input-gradient launch of the upsampling
/// to 128x128, which adds onto the first, run unsplit). With strided_tma the second launches
/// of both folded upsamplings' input gradients stage their epilogues and write the 16-bit
/// copies that two conversion launches made (27 -> 25).
#[test]
fn tma_loads_take_every_launch_they_fit() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for (strided_tma, want) in [(false, (206, 215, 14, 27)), (true, (215, 215, 15, 25))] {
        let tc = KernelConfig {
            wgmma_tma: true,
            strided_tma,
            epilogue_prefetch: true,
            ..KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16)
        };
        let p = Program::build_with(&g, 1, 256, 256, true, 132, Precision::Bf16, tc).unwrap();
        let (mut wgmma, mut tma) = (0, 0);
        for s in &p.steps {
            let Step::Conv(c) = s else { continue };
            let l = c.launch;
            let stride_ok = c.shape.in_stride == 1 || strided_tma;
            let fits = l.wgmma && l.row_epilogue && im2col_box(&c.shape).is_some() && stride_ok;
            assert_eq!(l.tma_loads, fits, "{s:?}");
            assert!(!l.tma_loads || l.lean_loads, "{s:?}");
            let reads = c.residual.is_some() || c.accumulate;
            assert_eq!(l.prefetch, l.lean_loads && l.splits == 1 && reads, "{s:?}");
            wgmma += usize::from(l.wgmma);
            tma += usize::from(l.tma_loads);
        }
        let count = |f: &dyn Fn(&Step) -> bool| p.steps.iter().filter(|s| f(s)).count();
        let prefetch = count(&|s| matches!(s, Step::Conv(c) if c.launch.prefetch));
        let conversions = count(&|s| matches!(s, Step::ToHalf { .. }));
        assert_eq!(
            (tma, wgmma, prefetch, conversions),
            want,
            "strided_tma {strided_tma}"
        );
    }
}

/// With class_half_copies, the four parity-class launches of a stride-2 input gradient whose
/// epilogues all stage write the 16-bit copy of the gradient, each at its own pixels, instead
/// of a conversion launch: at batch 1 the first downsampling's (a 256x256 x 128 gradient, 8.4 M
/// values), one conversion of a DPS step's 27; none in a forward, and none without staged
/// epilogues' copies.
#[test]
fn parity_classes_write_the_copy_where_every_class_stages() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let tuned = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
    let build = |tc: KernelConfig, record| {
        Program::build_with(&g, 1, 256, 256, record, 132, Precision::Bf16, tc).unwrap()
    };
    let conversions = |p: &Program| {
        p.steps
            .iter()
            .filter(|s| matches!(s, Step::ToHalf { .. }))
            .count()
    };
    let on = KernelConfig {
        class_half_copies: true,
        ..tuned
    };
    let p = build(on, true);
    assert_eq!(
        (conversions(&build(tuned, true)), conversions(&p)),
        (27, 26)
    );
    let writers: Vec<&ConvStep> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Conv(c) if c.shape.out_stride > 1 && c.copy16.is_some() => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(writers.len(), 4);
    for c in &writers {
        assert_eq!(c.copy16, writers[0].copy16);
        assert_eq!(c.y, writers[0].y);
        assert!(c.launch.staged_epilogue, "{c:?}");
        assert_eq!((c.shape.yh, c.shape.yw, c.shape.ncols), (256, 256, 128));
    }
    assert_eq!(
        conversions(&build(on, false)),
        conversions(&build(tuned, false))
    );
    let no_epilogue_copies = KernelConfig {
        epilogue_half_copies: false,
        ..on
    };
    assert_eq!(
        conversions(&build(no_epilogue_copies, true)),
        conversions(&build(
            KernelConfig {
                epilogue_half_copies: false,
                ..tuned
            },
            true
        ))
    );
}

/// With reduce_half_copies, a split bf16 launch whose output a conversion launch would round for
/// a tensor-core reader writes that copy in its reduction instead: 6 of a batch-1 DPS step's 27
/// conversions, 5 of a forward's 11, 1 of a batch-8 forward's 8. Never for a GroupNorm backward
/// pass, which would read the copy instead of the fp32 gradient (another rounding): as many of
/// those read 16 bits as without. Every such launch is a bf16 tensor-core launch whose
/// reduction computes no GroupNorm.
#[test]
fn split_reductions_write_the_copies_conversions_made() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let tuned = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
    let on = KernelConfig {
        reduce_half_copies: true,
        ..tuned
    };
    for (n, record, conversions) in [(1, true, (27, 21)), (1, false, (11, 6)), (8, false, (8, 7))] {
        let build = |tc| Program::build_with(&g, n, 256, 256, record, 132, Precision::Bf16, tc);
        let (before, after) = (build(tuned).unwrap(), build(on).unwrap());
        let count =
            |p: &Program, f: &dyn Fn(&Step) -> bool| p.steps.iter().filter(|s| f(s)).count();
        let halves = |s: &Step| matches!(s, Step::ToHalf { .. });
        assert_eq!(
            (count(&before, &halves), count(&after, &halves)),
            conversions,
            "n{n}"
        );
        let dy16 = |s: &Step| {
            matches!(
                s,
                Step::GroupNormBackward {
                    dy_half: Some(_),
                    ..
                }
            )
        };
        assert_eq!(count(&before, &dy16), count(&after, &dy16), "n{n}");
        for s in &after.steps {
            if let Step::Conv(c) = s {
                if c.launch.splits > 1 && c.copy16.is_some() {
                    assert_eq!(
                        c.launch.kernel,
                        ConvKernel::Tensor(Precision::Bf16),
                        "{c:?}"
                    );
                    assert!(c.norm.is_none() && c.side16.is_none(), "{c:?}");
                }
            }
        }
    }
}

/// With shortcut_fused in bf16 on Hopper, every residual block's 1x1 shortcut (the up path's 18
/// and the down path's 2) runs inside its block's second convolution: one lean or TMA wgmma
/// launch of both problems, its K the two summed, its bias the two summed, no residual; the
/// shortcut's own launch and output are gone, in forwards and recording ones, at batch 1 and
/// 8. Without wgmma, and in fp32, nothing is fused.
#[test]
fn shortcuts_fuse_into_their_blocks_second_convolutions() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let shortcuts: Vec<(usize, usize)> = g
        .ops
        .iter()
        .filter_map(|op| match *op {
            Op::Conv {
                x, p, kernel: 1, ..
            } => Some((p, g.tensors[x].channels)),
            _ => None,
        })
        .collect();
    assert_eq!(shortcuts.len(), 20);
    let tuned = KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16);
    let fused = KernelConfig {
        shortcut_fused: true,
        ..tuned
    };
    let convs = |p: &Program| {
        p.steps
            .iter()
            .filter(|s| matches!(s, Step::Conv(_)))
            .count()
    };
    for (n, record) in [(1, false), (1, true), (8, false)] {
        let build = |tc, precision| {
            Program::build_with(&g, n, 256, 256, record, 132, precision, tc).unwrap()
        };
        let p = build(fused, Precision::Bf16);
        let mut seen = Vec::new();
        for s in &p.steps[..p.forward_steps] {
            let Step::Conv(c) = s else { continue };
            assert!(
                !shortcuts.iter().any(|&(pid, _)| pid == c.w.pid),
                "a shortcut's own launch: {s:?}"
            );
            let Some(f) = c.shortcut else { continue };
            let &(_, sc) = shortcuts
                .iter()
                .find(|&&(pid, _)| pid == f.w.pid)
                .expect("a shortcut's weights");
            assert_eq!(c.shape.shortcut_sc, sc, "{s:?}");
            assert_eq!(c.shape.taps.len(), 9, "{s:?}");
            assert!(c.launch.lean_loads && c.residual.is_none(), "{s:?}");
            assert_eq!(c.bias.map(|b| b.kind), Some(WKind::BiasWithShortcut));
            seen.push(f.w.pid);
        }
        seen.sort_unstable();
        let mut want: Vec<usize> = shortcuts.iter().map(|&(pid, _)| pid).collect();
        want.sort_unstable();
        assert_eq!(seen, want, "batch {n}, recording {record}");
        // 20 launches fewer in the forward pass; the backward pass keeps its own.
        let unfused = KernelConfig {
            shortcut_fused: false,
            ..tuned
        };
        assert_eq!(convs(&build(unfused, Precision::Bf16)), convs(&p) + 20);
        for other in [
            build(
                KernelConfig {
                    wgmma: false,
                    ..fused
                },
                Precision::Bf16,
            ),
            build(fused, Precision::Fp32),
        ] {
            assert!(other
                .steps
                .iter()
                .all(|s| !matches!(s, Step::Conv(c) if c.shortcut.is_some())));
        }
    }
}

/// With staged_unsplit, exactly the TMA launches that the split rule gives two splits and K at
/// most STAGED_UNSPLIT_MAX_K run unsplit and staged, on the plain tile, without a workspace;
/// every other step is the same as without it, but for the GroupNorms that can now take their
/// sums from such a launch. In celebahq's batch-1 DPS step that is 21 launches (the 64x64
/// level's 3x3 launches of K up to 2304, forward and input gradient, the folded upsampling's
/// classes, some 1x1 and stride-2 input gradients), 7 in a batch-8 forward.
#[test]
fn two_way_splits_unsplit_to_stage() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let tuned = without_half_outputs(KernelConfig::tuned(Capabilities::HOPPER, Precision::Bf16));
    for (n, record) in [(1, true), (8, false)] {
        let build = |tc| Program::build_with(&g, n, 256, 256, record, 132, Precision::Bf16, tc);
        let base = build(KernelConfig {
            staged_unsplit: false,
            ..tuned
        })
        .unwrap();
        let p = build(tuned).unwrap();
        assert_eq!(base.steps.len(), p.steps.len());
        let mut taken = 0;
        for (a, b) in base.steps.iter().zip(&p.steps) {
            // (Buffer numbers move: the unsplit launches need no workspace.) A GroupNorm after
            // an unsplit launch may take its sums from it now.
            let (Step::Conv(a), Step::Conv(b)) = (a, b) else {
                let (la, lb) = (a.info(n, 256, 256).label(), b.info(n, 256, 256).label());
                assert!(
                    la == lb || lb.contains("summed by the producer"),
                    "{la} / {lb}"
                );
                continue;
            };
            let (la, lb) = (a.launch, b.launch);
            let fits = la.tma_loads && la.splits == 2 && a.shape.k() <= STAGED_UNSPLIT_MAX_K;
            if !fits {
                assert_eq!(format!("{la:?}"), format!("{lb:?}"));
                continue;
            }
            taken += 1;
            assert_eq!(
                (lb.splits, lb.staged_epilogue, lb.tile, b.workspace),
                (1, true, WgmmaTile::Plain, None),
                "{b:?}"
            );
            assert!(lb.k_per_split >= b.shape.k() && lb.k_per_split % WGMMA_SLICE == 0);
            // Unsplit, it also prefetches the rows its epilogue reads.
            let back = ConvLaunch {
                splits: 2,
                k_per_split: la.k_per_split,
                staged_epilogue: false,
                prefetch: la.prefetch,
                ..lb
            };
            assert_eq!(format!("{back:?}"), format!("{la:?}"));
        }
        assert_eq!((n, taken), if n == 1 { (1, 21) } else { (8, 7) });
        // Off without the staged epilogue.
        let plain = KernelConfig {
            staged_epilogue: false,
            ..tuned
        };
        let off = build(KernelConfig {
            staged_unsplit: true,
            ..plain
        })
        .unwrap();
        assert_eq!(
            format!("{:?}", off.steps),
            format!("{:?}", build(plain).unwrap().steps)
        );
    }
}

/// The staged-epilogue selftest's networks (`celebahq_candidate_cases`), configured as it
/// configures them (the defaults, every split of K kept, the tall tiles on and off; bf16 and
/// fp16), have staged launches in their forward + VJP programs, and staging changes nothing
/// else in them: else its rows "the same to the bit as without" would hold nothing, or would
/// compare two orders of summation. (With the shortcuts fused, the 64x64 x 2 forward splits
/// every launch's K, so there only the VJP stages: the stop-26 selftest's check of the forward
/// program failed on that.)
#[test]
fn the_staged_epilogue_selftest_networks_stage() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Bf16, Precision::Fp16] {
        // (As set_staged_epilogue_and_tall sets them.)
        let tuned = without_half_outputs(KernelConfig::tuned(Capabilities::HOPPER, precision));
        for tall_tiles in [true, false] {
            for (n, h, w, _) in crate::cuda::selftest::celebahq_candidate_cases() {
                let build = |staged_epilogue| {
                    let tc = KernelConfig {
                        staged_epilogue,
                        staged_unsplit: false,
                        tall_tiles,
                        ..tuned
                    };
                    Program::build_with(&g, n, h, w, true, 132, precision, tc).unwrap()
                };
                let (base, p) = (build(false), build(true));
                let what = format!("{precision} n{n} {h}x{w}, tall {tall_tiles}");
                assert_eq!(base.steps.len(), p.steps.len(), "{what}");
                let mut staged = 0;
                for (a, b) in base.steps.iter().zip(&p.steps) {
                    let mut b = b.clone();
                    if let Step::Conv(c) = &mut b {
                        staged += usize::from(c.launch.staged_epilogue);
                        c.launch.staged_epilogue = false;
                    }
                    assert_eq!(format!("{a:?}"), format!("{b:?}"), "{what}");
                }
                assert!(staged > 0, "{what}");
            }
        }
    }
}

/// With concat_from_producers, a 16-bit concatenation's side is written by its producers
/// exactly where they can write all of it: every launch that wrote the side's value (one, or
/// an upsampling's four folded classes) has a staged epilogue, overwrites, and writes that
/// side's channels, their pixels adding up to the whole; the concatenation then only sums the
/// side (and goes where it sums nothing). With epilogue_half_copies, a conversion goes where
/// the launch that wrote its source last, whole, has a staged epilogue, which writes the copy.
/// Either way a launch writes no fp32 output exactly where no step reads it, and that buffer
/// keeps one element; without the switches no launch writes 16-bit outputs.
#[test]
fn staged_epilogues_write_the_16_bit_outputs_they_can() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Bf16, Precision::Fp16] {
        // Without the 16-bit GroupNorm gradients, whose copies replace no conversion (the
        // test of half_norm_grads counts those).
        let tuned = KernelConfig {
            half_norm_grads: HalfGrads::Off,
            ..KernelConfig::tuned(Capabilities::HOPPER, precision)
        };
        // (batch, size, recording): for the concatenations (sides placed, launches writing
        // them, concatenations dropped), for the copies (launches writing them), and launches
        // without fp32 output, with both switches on.
        for (n, size, record, counts) in [
            (1, 256, true, (12, 18, 0, 4, 17)),
            (8, 256, false, (24, 33, 1, 8, 31)),
            (32, 256, false, (25, 37, 2, 9, 36)),
            (2, 64, true, (5, 5, 0, 1, 4)),
        ] {
            let build = |concat_from_producers, epilogue_half_copies| {
                let tc = KernelConfig {
                    concat_from_producers,
                    epilogue_half_copies,
                    ..tuned
                };
                Program::build_with(&g, n, size, size, record, 132, precision, tc).unwrap()
            };
            let off = build(false, false);
            let (placed_p, copies_p, both) =
                (build(true, false), build(false, true), build(true, true));
            let halves = |p: &Program| {
                p.steps
                    .iter()
                    .filter(
                        |s| matches!(s, Step::Conv(c) if c.side16.is_some() || c.copy16.is_some()),
                    )
                    .count()
            };
            assert_eq!(halves(&off), 0);
            let count =
                |p: &Program, f: &dyn Fn(&Step) -> bool| p.steps.iter().filter(|s| f(s)).count();
            let concats = |p: &Program| count(p, &|s| matches!(s, Step::Concat { .. }));
            let conversions = |p: &Program| count(p, &|s| matches!(s, Step::ToHalf { .. }));
            let copies = count(
                &copies_p,
                &|s| matches!(s, Step::Conv(c) if c.copy16.is_some()),
            );
            assert_eq!(conversions(&off) - conversions(&copies_p), copies);
            assert_eq!(conversions(&both), conversions(&copies_p));
            let mut sides = 0;
            for p in [&placed_p, &copies_p, &both] {
                let mut used = vec![false; p.bufs.len()];
                for b in p.steps.iter().flat_map(|s| s.buffers()) {
                    used[b.0] = true;
                }
                let reads: std::collections::HashSet<Buf> =
                    p.steps.iter().flat_map(|s| s.io().0).collect();
                for (i, s) in p.steps.iter().enumerate() {
                    let Step::Conv(c) = s else { continue };
                    let halves = c.side16.is_some() || c.copy16.is_some();
                    assert_eq!(c.fp32_out, !halves || reads.contains(&c.y), "step {i}");
                    assert_eq!(c.fp32_out, used[c.y.0], "step {i}");
                    assert_eq!(p.bufs[c.y.0].len == 1, !c.fp32_out, "step {i}");
                    if halves {
                        assert!(c.launch.staged_epilogue && !c.accumulate, "step {i}");
                    }
                    // A copy of the whole output (the only launch that writes it).
                    if let Some(copy) = c.copy16 {
                        let len = c.shape.n * c.shape.yh * c.shape.yw * c.shape.ncols;
                        assert!(c.shape.out_stride == 1 && c.shape.rows() * c.shape.ncols == len);
                        assert_eq!(p.bufs[copy.0].len, len.div_ceil(2));
                    }
                }
                let writers = |y: Buf, offset: usize| -> Vec<(usize, &ConvStep)> {
                    p.steps
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| match s {
                            Step::Conv(c)
                                if c.side16.is_some_and(|o| o.buf == y && o.offset == offset) =>
                            {
                                Some((i, c))
                            }
                            _ => None,
                        })
                        .collect()
                };
                sides = 0;
                for (i, s) in p.steps.iter().enumerate() {
                    let Step::Concat {
                        a,
                        b,
                        y,
                        pixels,
                        ca,
                        cb,
                        half_out,
                        placed,
                        ..
                    } = *s
                    else {
                        continue;
                    };
                    for (t, offset, width, placed) in
                        [(a, 0, ca, placed[0]), (b, ca, cb, placed[1])]
                    {
                        let w = writers(y, offset);
                        assert_eq!(placed, !w.is_empty(), "step {i}");
                        if !placed {
                            continue;
                        }
                        sides += 1;
                        assert_eq!(half_out, Some(precision));
                        assert_eq!(w.iter().map(|(_, c)| c.shape.rows()).sum::<usize>(), pixels);
                        for (j, c) in w {
                            assert!(j < i && c.y == t, "step {j}");
                            assert_eq!(c.shape.ncols, width);
                            assert_eq!(c.side16.expect("a writer").width, ca + cb);
                        }
                    }
                }
            }
            let dropped = concats(&off) - concats(&both);
            assert_eq!(concats(&placed_p), concats(&both));
            let no_fp32 = count(&both, &|s| matches!(s, Step::Conv(c) if !c.fp32_out));
            let placing = count(&both, &|s| matches!(s, Step::Conv(c) if c.side16.is_some()));
            assert_eq!(
                (sides + 2 * dropped, placing, dropped, copies, no_fp32),
                counts,
                "{precision} {n}x{size} record {record}"
            );
            assert_eq!(both.steps.len() + dropped + copies, off.steps.len());
        }
    }
}

/// With half_norm_grads, a GroupNorm backward pass it names reads its output gradient in 16
/// bits exactly where the launch that wrote the gradient last is staged and wrote all of it: that
/// launch writes the copy, and no fp32 values where nothing else reads them; never in fp32,
/// nor without the `_ilp` kernels (only they have `_dy16` forms). At batch 1, 30 of the 71
/// passes: the others' gradients come from split launches (the levels from 32x32 down) and
/// from the output convolution's input gradient, which is not on the tensor cores; 10 of them
/// are over a 16-bit input (the up path's concatenations).
#[test]
fn groupnorm_backward_passes_read_16_bit_gradients_their_writers_copy() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Bf16, Precision::Fp32] {
        let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
        for (n, size, gn_ilp, policy, count) in [
            (1, 256, true, HalfGrads::Everywhere, 30),
            (8, 256, true, HalfGrads::Everywhere, 48),
            (2, 64, true, HalfGrads::Everywhere, 11),
            (1, 256, false, HalfGrads::Everywhere, 0),
            (1, 256, true, HalfGrads::OverHalfInputs, 10),
        ] {
            let tc = KernelConfig {
                half_norm_grads: policy,
                gn_ilp,
                ..tuned
            };
            let defaults =
                Program::build_with(&g, n, size, size, true, 132, precision, tuned).unwrap();
            let p = Program::build_with(&g, n, size, size, true, 132, precision, tc).unwrap();
            let mut halves = 0;
            for (i, s) in p.steps.iter().enumerate() {
                let Step::GroupNormBackward {
                    x_half,
                    dy,
                    dy_half,
                    split,
                    ..
                } = *s
                else {
                    continue;
                };
                let asked = policy == HalfGrads::Everywhere || x_half.is_some();
                let writer = p.steps[..i]
                    .iter()
                    .rposition(|w| w.io().1.contains(&dy))
                    .expect("a writer");
                match (dy_half, &p.steps[writer]) {
                    (Some(h), Step::Conv(c)) => {
                        assert!(asked, "step {i}");
                        assert_eq!(h, precision);
                        assert!(split.ilp && c.launch.staged_epilogue, "step {i}");
                        assert_eq!(c.copy16, Some(dy), "step {i}");
                        let readers = p.steps.iter().filter(|r| r.io().0.contains(&c.y));
                        assert_eq!(c.fp32_out, readers.count() > 0, "step {i}");
                        halves += 1;
                    }
                    (None, Step::Conv(c)) => assert!(
                        !(asked && c.launch.staged_epilogue && split.ilp && precision.is_half()),
                        "step {i}: {c:?}"
                    ),
                    (None, _) => {}
                    (Some(_), w) => panic!("step {i}: a 16-bit gradient from {w:?}"),
                }
            }
            let want = if precision.is_half() { count } else { 0 };
            assert_eq!(halves, want, "{precision} {n}x{size}");
            // The same steps, some reading a copy instead.
            assert_eq!(p.steps.len(), defaults.steps.len());
        }
    }
}

/// With fold_residual_grads (a default), every residual gradient added onto a block input's
/// gradient (11 at celebahq's size: the identity shortcuts) is added by the accumulating
/// GroupNorm backward pass that next touches that gradient, and its AddInto goes; no other
/// step changes.
#[test]
fn residual_gradients_are_added_by_the_groupnorms_after_them() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Bf16, Precision::Fp32] {
        let fold = KernelConfig::tuned(Capabilities::HOPPER, precision);
        assert!(fold.fold_residual_grads);
        let tuned = KernelConfig {
            fold_residual_grads: false,
            ..fold
        };
        for (n, size) in [(1, 256), (2, 64)] {
            let build = |tc| Program::build_with(&g, n, size, size, true, 132, precision, tc);
            let (off, p) = (build(tuned).unwrap(), build(fold).unwrap());
            let adds = |p: &Program| {
                let is_add = |s: &&Step| {
                    matches!(
                        s,
                        Step::AddInto {
                            accumulate: true,
                            ..
                        }
                    )
                };
                p.steps.iter().filter(is_add).count()
            };
            assert_eq!((adds(&off), adds(&p)), (11, 0), "{precision} {n}x{size}");
            assert_eq!(p.steps.len(), off.steps.len() - 11);
            let folded = p.steps.iter().filter(|s| {
                matches!(s, Step::GroupNormBackward { add: Some(_), accumulate, .. } if *accumulate)
            });
            assert_eq!(folded.count(), 11);
        }
    }
}

/// With gn_from_reduction, exactly the one-pass forward GroupNorms whose input a split launch
/// wrote whole, and whose group the fused kernel holds, go into that launch's reduction: on
/// 132 multiprocessors the 8x8 and 16x16 levels' (the 32x32 level's groups, 8192 outputs, are
/// too large), 24 of them at batch 1 recording or not, and some at batch 8, where those levels
/// still split. The step count drops by as many, and a fused launch keeps its fp32 output
/// exactly where something besides the GroupNorm reads it.
#[test]
fn reductions_compute_the_groupnorms_after_split_launches() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [Precision::Bf16, Precision::Fp16, Precision::Fp32] {
        // (The selftest's candidate networks are the first two: its rows need a fusion in
        // each.)
        for (n, size, record) in [
            (2, 64, true),
            (1, 256, true),
            (1, 256, false),
            (8, 256, false),
        ] {
            let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
            let build = |tc| Program::build_with(&g, n, size, size, record, 132, precision, tc);
            let base = build(tuned).unwrap();
            let p = build(KernelConfig {
                gn_from_reduction: true,
                ..tuned
            })
            .unwrap();
            let fused: Vec<&ConvStep> = p
                .steps
                .iter()
                .filter_map(|s| match s {
                    Step::Conv(c) if c.norm.is_some() => Some(c),
                    _ => None,
                })
                .collect();
            assert_eq!(p.steps.len() + fused.len(), base.steps.len());
            for c in &fused {
                let Some(Step::GroupNorm {
                    x,
                    x_half: None,
                    hw,
                    c: ch,
                    groups,
                    split,
                    ..
                }) = c.norm.as_deref()
                else {
                    panic!("{c:?}")
                };
                assert_eq!(*x, c.y);
                assert!(split.one_pass.is_some() && c.launch.splits > 1 && !c.accumulate);
                assert!(crate::cuda::kernels::reduction_norm_threads(*hw, ch / groups).is_some());
                // Its fp32 output goes where only the GroupNorm read it (never when recording:
                // the GroupNorm's backward pass reads it).
                let read = p.steps.iter().any(|s| s.io().0.contains(&c.y));
                assert_eq!(c.fp32_out, read, "{c:?}");
                assert!(c.fp32_out || !record);
            }
            if n == 1 {
                assert_eq!(fused.len(), 24, "{precision} record {record}");
            } else {
                assert!(!fused.is_empty(), "{precision} n{n} {size}x{size}");
            }
        }
    }
}

/// With narrow_mma and few_in_mma, the convolutions with at most 8 outputs or inputs run on the
/// tensor cores exactly in bf16 and fp16: celebahq's conv_out forward over the 16-bit output
/// its GroupNorm now writes, and (recording) conv_in's input gradient over a 16-bit copy of its
/// output gradient; conv_in's forward and (recording) conv_out's input gradient over their
/// fp32 inputs; the fp32 direct kernels everywhere else, and without the switches.
#[test]
fn narrow_convolutions_run_on_tensor_cores_over_16_bit_inputs() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    for precision in [
        Precision::Bf16,
        Precision::Fp16,
        Precision::Tf32,
        Precision::Fp32,
    ] {
        for (n, record) in [(1, true), (1, false), (8, false)] {
            let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
            let build = |tc| Program::build_with(&g, n, 256, 256, record, 132, precision, tc);
            // The launches with few outputs, and those with few inputs.
            let kernels = |p: &Program| -> [Vec<ConvKernel>; 2] {
                let few = |f: fn(&ConvShape) -> bool| {
                    p.steps
                        .iter()
                        .filter_map(|s| match s {
                            Step::Conv(c) if f(&c.shape) => Some(c.launch.kernel),
                            _ => None,
                        })
                        .collect()
                };
                [few(|s| s.ncols <= 8), few(|s| s.sc <= 8)]
            };
            let launches = if record { 2 } else { 1 };
            assert_eq!(
                kernels(&build(tuned).unwrap()),
                [
                    vec![ConvKernel::Narrow; launches],
                    vec![ConvKernel::FewIn; launches]
                ]
            );
            for batch_invariant in [false, true] {
                let p = build(KernelConfig {
                    narrow_mma: true,
                    few_in_mma: true,
                    batch_invariant,
                    ..tuned
                })
                .unwrap();
                let want = match precision.is_half() {
                    true => [ConvKernel::NarrowTensor(precision), ConvKernel::FewInTensor],
                    false => [ConvKernel::Narrow, ConvKernel::FewIn],
                };
                assert_eq!(
                    kernels(&p),
                    want.map(|k| vec![k; launches]),
                    "{precision} n{n}"
                );
                for (i, s) in p.steps.iter().enumerate() {
                    let Step::Conv(c) = s else { continue };
                    let writer = p.steps[..i].iter().rev().find(|w| w.io().1.contains(&c.x));
                    if c.launch.kernel == ConvKernel::FewInTensor {
                        assert!(!c.launch.half_input && c.launch.splits == 1, "{c:?}");
                        // Its input is fp32 as stored: no 16-bit writer wrote it.
                        let half = matches!(
                            writer,
                            Some(
                                Step::ToHalf { .. }
                                    | Step::GroupNorm {
                                        half_out: Some(_),
                                        ..
                                    }
                                    | Step::GroupNormBackward {
                                        half_out: Some(_),
                                        ..
                                    }
                            )
                        );
                        assert!(!half, "{precision} n{n}: {c:?} reads what {writer:?} wrote");
                    }
                    if c.launch.kernel != want[0] || !precision.is_half() {
                        continue;
                    }
                    assert!(c.launch.half_input && c.launch.splits == 1, "{c:?}");
                    // Whoever wrote the input wrote it in 16 bits: the GroupNorm before
                    // conv_out, or a copy of conv_in's output gradient.
                    match writer {
                        Some(Step::GroupNorm { half_out, .. }) => {
                            assert_eq!(*half_out, Some(precision))
                        }
                        Some(Step::ToHalf { .. }) => {}
                        Some(Step::GroupNormBackward { dx16, .. }) => {
                            assert_eq!(dx16.map(|(b, q)| (b == c.x, q)), Some((true, precision)))
                        }
                        w => panic!("{precision} n{n}: {c:?} reads what {w:?} wrote"),
                    }
                }
            }
        }
    }
}

/// The few-input tensor-core kernel reads fp32 only: an 8-channel image (8 -> 128 and back),
/// whose convolutions a bf16/fp16 program runs on the tensor-core GEMM, over 16-bit inputs
/// where it has them, keeps them there with few_in_mma; no launch of it reads 16 bits.
#[test]
fn few_input_tensor_cores_never_read_16_bit_inputs() {
    let mut cfg = UNetConfig::celebahq_256();
    cfg.in_channels = 8;
    cfg.out_channels = 8;
    let g = Graph::build(&cfg).unwrap();
    for precision in [Precision::Bf16, Precision::Fp16] {
        let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
        let p = Program::build_with(
            &g,
            1,
            64,
            64,
            true,
            132,
            precision,
            KernelConfig {
                few_in_mma: true,
                narrow_mma: true,
                ..tuned
            },
        )
        .unwrap();
        let few_in: Vec<&ConvStep> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv(c) if c.shape.sc == 8 => Some(c),
                _ => None,
            })
            .collect();
        // conv_in's forward and conv_out's input gradient.
        assert_eq!(few_in.len(), 2, "{precision}");
        for c in few_in {
            assert_eq!(c.launch.kernel, ConvKernel::Tensor(precision), "{c:?}");
        }
        assert!(!p
            .steps
            .iter()
            .any(|s| matches!(s, Step::Conv(c) if c.launch.kernel == ConvKernel::FewInTensor)));
    }
}

/// The approximate SiLU ([`KernelConfig::approx_silu`]) is taken by every GroupNorm step with a
/// SiLU of a bf16 or fp16 program, forward and backward, those that split launches' reductions
/// compute included, and by nothing else: the program is otherwise the one without it, and fp32
/// and tf32 programs keep the accurate SiLU. (The symbolic check hashes operations, not their
/// rounding, so it cannot tell the two apart: these are the checks.)
#[test]
fn approximate_silu_only_in_16_bit_programs() {
    let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
    let silu_of = |s: &Step| match *s {
        Step::GroupNorm { silu, .. } | Step::GroupNormBackward { silu, .. } => Some(silu),
        _ => None,
    };
    for precision in [
        Precision::Fp32,
        Precision::Tf32,
        Precision::Bf16,
        Precision::Fp16,
    ] {
        let tuned = KernelConfig::tuned(Capabilities::HOPPER, precision);
        let build = |approx_silu| {
            let tc = KernelConfig {
                approx_silu,
                ..tuned
            };
            Program::build_with(&g, 1, 64, 64, true, 132, precision, tc).unwrap()
        };
        let (accurate, approx) = (build(false), build(true));
        assert_eq!(accurate.steps.len(), approx.steps.len(), "{precision}");
        let mut taken = 0;
        for (a, b) in accurate.steps.iter().zip(&approx.steps) {
            match (silu_of(a), silu_of(b)) {
                (Some(Silu::Accurate), Some(got)) => {
                    let want = match precision.is_half() {
                        true => Silu::Approx,
                        false => Silu::Accurate,
                    };
                    assert_eq!(got, want, "{precision} {b:?}");
                    taken += usize::from(got == Silu::Approx);
                    let mut same = b.clone();
                    if let Step::GroupNorm { silu, .. } | Step::GroupNormBackward { silu, .. } =
                        &mut same
                    {
                        *silu = Silu::Accurate;
                    }
                    assert_eq!(format!("{same:?}"), format!("{a:?}"), "{precision}");
                }
                _ => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{precision}"),
            }
        }
        // celebahq's 65 GroupNorms with SiLU (all but the six attentions'), forward and backward.
        let with_silu = accurate
            .steps
            .iter()
            .filter_map(silu_of)
            .filter(|s| s.is_on());
        assert_eq!(with_silu.count(), 2 * 65, "{precision}");
        assert_eq!(taken, if precision.is_half() { 2 * 65 } else { 0 });
        // The GroupNorms that split launches' reductions compute.
        let fused = Program::build_with(
            &g,
            1,
            256,
            256,
            true,
            132,
            precision,
            KernelConfig {
                approx_silu: true,
                gn_from_reduction: true,
                ..tuned
            },
        )
        .unwrap();
        let in_reductions: Vec<Silu> = fused
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv(c) => c.norm.as_deref().and_then(silu_of),
                _ => None,
            })
            .filter(|s| s.is_on())
            .collect();
        assert!(!in_reductions.is_empty(), "{precision}");
        let want = Silu::new(true, precision.is_half());
        assert!(in_reductions.iter().all(|&s| s == want), "{precision}");
    }
}
