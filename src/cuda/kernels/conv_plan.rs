//! Convolution planning: the implicit-GEMM problem of each convolution launch ([`ConvShape`]),
//! which kernel, tile and split of K runs it ([`ConvLaunch`]), and the rules that choose them.

use super::BLOCK;
use crate::cuda::precision::Precision;
use crate::model::graph::Pad;
use crate::switches;

/// One tap of an implicit-GEMM convolution: source offset and weight block (see conv.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tap {
    pub dy: i32,
    pub dx: i32,
    pub w: i32,
}

/// The geometry of one implicit-GEMM launch (kernels/conv.cu explains each field).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConvShape {
    pub n: usize,
    pub mh: usize,
    pub mw: usize,
    pub sh: usize,
    pub sw: usize,
    pub sc: usize,
    pub ncols: usize,
    pub in_stride: usize,
    pub yh: usize,
    pub yw: usize,
    pub out_stride: usize,
    pub out_oy: usize,
    pub out_ox: usize,
    pub taps: Vec<Tap>,
    /// Channels of a second source at the same pixels, read at each output's own pixel and
    /// appended to K: a residual block's 1x1 shortcut fused into its second convolution
    /// ([`ConvShape::with_shortcut`]); 0 for none.
    pub shortcut_sc: usize,
}

/// Zero rows above / columns left of the input of a 3x3 convolution.
fn pad_before(pad: Pad) -> i32 {
    match pad {
        Pad::Symmetric => 1,
        Pad::RightBottom => 0,
    }
}

impl ConvShape {
    /// GEMM rows (output pixels of this launch).
    pub fn rows(&self) -> usize {
        self.n * self.mh * self.mw
    }

    /// Whether every output pixel is written by this launch, GEMM row r to output pixel r:
    /// stride 1, no offset, the output grid the launch's (not one parity class of several).
    pub fn rows_are_pixels(&self) -> bool {
        self.out_stride == 1
            && (self.out_oy, self.out_ox) == (0, 0)
            && (self.yh, self.yw) == (self.mh, self.mw)
    }

    /// Reduction length, taps x source channels (and the fused shortcut's channels).
    pub fn k(&self) -> usize {
        self.taps.len() * self.sc + self.shortcut_sc
    }

    /// This forward convolution with the 1x1 convolution of a second source of `sc` channels
    /// at the same pixels added to it (a residual block's second convolution and its
    /// shortcut, [`KernelConfig::shortcut_fused`](crate::cuda::program::KernelConfig)), or
    /// `None` where the wgmma kernels cannot fuse them: input stride 1 with the output grid
    /// the source's, every output pixel written by this launch at its own index, taps that
    /// reach the pixel itself or before it on both axes (the TMA kernels copy the shortcut's
    /// source at offset (-dx0, -dy0) from the smallest tap offsets), and both sources' channels
    /// whole K slices, so that no slice reads both.
    pub fn with_shortcut(&self, sc: usize) -> Option<ConvShape> {
        let lowest = |d: fn(&Tap) -> i32| self.taps.iter().map(d).min().is_some_and(|v| v <= 0);
        let fits = self.in_stride == 1
            && self.rows_are_pixels()
            && (self.mh, self.mw) == (self.sh, self.sw)
            && lowest(|t| t.dy)
            && lowest(|t| t.dx)
            && self.shortcut_sc == 0
            && sc > 0
            && self.sc % WGMMA_SLICE == 0
            && sc % WGMMA_SLICE == 0;
        fits.then(|| ConvShape {
            shortcut_sc: sc,
            ..self.clone()
        })
    }

    /// The fused shortcut's own problem: its 1x1 convolution of the second source alone (the
    /// launch the fusion replaces), or `None` without one.
    pub fn shortcut(&self) -> Option<ConvShape> {
        (self.shortcut_sc > 0).then(|| {
            ConvShape::forward(
                self.n,
                self.sh,
                self.sw,
                self.shortcut_sc,
                self.ncols,
                1,
                1,
                Pad::Symmetric,
            )
        })
    }

    /// Forward convolution of an `h x w` input of `cin` channels into `cout` (k = 1 or 3); the
    /// weights are the forward layout `[(tap, ci), co]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        n: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: Pad,
    ) -> Self {
        let (oh, ow) = (h / stride, w / stride);
        let taps = if k == 1 {
            vec![Tap { dy: 0, dx: 0, w: 0 }]
        } else {
            let p = pad_before(pad);
            (0..9)
                .map(|t| Tap {
                    dy: t / 3 - p,
                    dx: t % 3 - p,
                    w: t,
                })
                .collect()
        };
        ConvShape {
            n,
            mh: oh,
            mw: ow,
            sh: h,
            sw: w,
            sc: cin,
            ncols: cout,
            in_stride: stride,
            yh: oh,
            yw: ow,
            out_stride: 1,
            out_oy: 0,
            out_ox: 0,
            taps,
            shortcut_sc: 0,
        }
    }

    /// The input-gradient launches of the same convolution (weights in the layout
    /// `[(tap, co), ci]`): one for stride 1 and 1x1; one per parity class of the input pixel
    /// for stride 2, each with only the taps that reach that class.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        n: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: Pad,
    ) -> Vec<Self> {
        let (oh, ow) = (h / stride, w / stride);
        let base = ConvShape {
            n,
            mh: h,
            mw: w,
            sh: oh,
            sw: ow,
            sc: cout,
            ncols: cin,
            in_stride: 1,
            yh: h,
            yw: w,
            out_stride: 1,
            out_oy: 0,
            out_ox: 0,
            taps: vec![Tap { dy: 0, dx: 0, w: 0 }],
            shortcut_sc: 0,
        };
        if k == 1 {
            return vec![base];
        }
        if stride == 1 {
            // dx[i] = sum_t dy[i + 1 - d_t] W_t.
            let taps = (0..9)
                .map(|t| Tap {
                    dy: 1 - t / 3,
                    dx: 1 - t % 3,
                    w: t,
                })
                .collect();
            return vec![ConvShape { taps, ..base }];
        }
        // Input row iy = 2j + py receives tap row d when iy + p - d is even, from output row
        // (iy + p - d) / 2 = j + (py + p - d) / 2; likewise for columns.
        let p = pad_before(pad);
        let mut classes = Vec::new();
        for py in 0..2i32 {
            for px in 0..2i32 {
                let rows: Vec<i32> = (0..3).filter(|d| (py + p - d) % 2 == 0).collect();
                let cols: Vec<i32> = (0..3).filter(|d| (px + p - d) % 2 == 0).collect();
                let mut taps = Vec::new();
                for &dy in &rows {
                    for &dx in &cols {
                        taps.push(Tap {
                            dy: (py + p - dy).div_euclid(2),
                            dx: (px + p - dx).div_euclid(2),
                            w: dy * 3 + dx,
                        });
                    }
                }
                let mh = (h + 1 - py as usize) / 2;
                let mw = (w + 1 - px as usize) / 2;
                if mh == 0 || mw == 0 {
                    continue;
                }
                classes.push(ConvShape {
                    mh,
                    mw,
                    out_stride: 2,
                    out_oy: py as usize,
                    out_ox: px as usize,
                    taps,
                    ..base.clone()
                });
            }
        }
        classes
    }

    /// The launches of a 3x3 convolution (padding 1) of the nearest 2x upsampling of an
    /// `h x w` input, folded: one per parity class (a, b) of the output pixel (2i + a, 2j + b),
    /// each a 2x2 convolution of the input itself at source offsets (a - 1 + r, b - 1 + s),
    /// r, s in {0, 1}, with the folded weights of tap (2a + r) * 4 + 2b + s
    /// ([`fold_upsampled_weights`]). 4 products per output pixel instead of 9, and no
    /// upsampled tensor.
    pub fn upsampled_forward(n: usize, h: usize, w: usize, cin: usize, cout: usize) -> Vec<Self> {
        let mut classes = Vec::new();
        for a in 0..2i32 {
            for b in 0..2i32 {
                let mut taps = Vec::new();
                for r in 0..2i32 {
                    for s in 0..2i32 {
                        taps.push(Tap {
                            dy: a - 1 + r,
                            dx: b - 1 + s,
                            w: (2 * a + r) * 4 + 2 * b + s,
                        });
                    }
                }
                classes.push(ConvShape {
                    n,
                    mh: h,
                    mw: w,
                    sh: h,
                    sw: w,
                    sc: cin,
                    ncols: cout,
                    in_stride: 1,
                    yh: 2 * h,
                    yw: 2 * w,
                    out_stride: 2,
                    out_oy: a as usize,
                    out_ox: b as usize,
                    taps,
                    shortcut_sc: 0,
                });
            }
        }
        classes
    }

    /// The input-gradient launches of [`upsampled_forward`](Self::upsampled_forward) (weights
    /// in the layout `[(tap, co), ci]`): input pixel i receives class a's offset r from output
    /// row 2(i - (a - 1 + r)) + a = 2i + 2 - a - 2r, a stride-2 gather of sixteen taps over the
    /// output gradient. A launch takes at most nine taps, so there are two, one per row class
    /// a; the second adds onto the first.
    pub fn upsampled_backward(n: usize, h: usize, w: usize, cin: usize, cout: usize) -> Vec<Self> {
        (0..2i32)
            .map(|a| {
                let mut taps = Vec::new();
                for r in 0..2i32 {
                    for b in 0..2i32 {
                        for s in 0..2i32 {
                            taps.push(Tap {
                                dy: 2 - a - 2 * r,
                                dx: 2 - b - 2 * s,
                                w: (2 * a + r) * 4 + 2 * b + s,
                            });
                        }
                    }
                }
                ConvShape {
                    n,
                    mh: h,
                    mw: w,
                    sh: 2 * h,
                    sw: 2 * w,
                    sc: cout,
                    ncols: cin,
                    in_stride: 2,
                    yh: h,
                    yw: w,
                    out_stride: 1,
                    out_oy: 0,
                    out_ox: 0,
                    taps,
                    shortcut_sc: 0,
                }
            })
            .collect()
    }

    /// A linear layer over `tokens` rows of each of `n` images as a one-tap product; `inp` is
    /// the reduction width.
    pub fn linear(n: usize, tokens: usize, inp: usize, out: usize) -> Self {
        ConvShape {
            n,
            mh: 1,
            mw: tokens,
            sh: 1,
            sw: tokens,
            sc: inp,
            ncols: out,
            in_stride: 1,
            yh: 1,
            yw: tokens,
            out_stride: 1,
            out_oy: 0,
            out_ox: 0,
            taps: vec![Tap { dy: 0, dx: 0, w: 0 }],
            shortcut_sc: 0,
        }
    }
}

/// Kernel rows of a 3x3 convolution that fold onto source row offset a - 1 + r of an
/// upsampled input's parity class a, as `FOLD_ROWS[a][r]` (columns likewise): output row 2i + a
/// reads upsampled row 2i + a + u - 1, which is source row i + (a + u - 1) div 2.
const FOLD_ROWS: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];

/// The weights of [`ConvShape::upsampled_forward`] in the forward layout `[(tap, ci), co]`, 16
/// taps, from a 3x3 convolution's `[(tap, ci), co]`: each folded tap the sum of the kernel taps
/// that read the same source pixel, summed in f32 and rounded once to the launch's precision.
pub(crate) fn fold_upsampled_weights(forward: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let plane = cin * cout;
    assert_eq!(forward.len(), 9 * plane, "3x3 weights");
    let mut folded = vec![0.0; 16 * plane];
    for (a, row_class) in FOLD_ROWS.iter().enumerate() {
        for (r, rows) in row_class.iter().enumerate() {
            for (b, col_class) in FOLD_ROWS.iter().enumerate() {
                for (s, cols) in col_class.iter().enumerate() {
                    let t = (2 * a + r) * 4 + 2 * b + s;
                    let dst = &mut folded[t * plane..(t + 1) * plane];
                    for &u in *rows {
                        for &v in *cols {
                            let src = &forward[(u * 3 + v) * plane..(u * 3 + v + 1) * plane];
                            dst.iter_mut().zip(src).for_each(|(d, &x)| *d += x);
                        }
                    }
                }
            }
        }
    }
    folded
}

/// Which implicit-GEMM kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConvKernel {
    /// 16-byte loads; needs sc % 8 == 0, ncols % 4 == 0 and aligned pointers.
    Vec,
    /// Scalar loads, any sizes.
    Any,
    /// Direct, few outputs: ncols <= 8, in_stride 1, taps in a 3x3 window
    /// (`conv_narrow_<ncols>`: a halo tile of activations in shared memory).
    Narrow,
    /// Direct, few inputs: sc <= 8, in_stride 1, taps in a 3x3 window (`conv_few_in_<sc>`:
    /// the weights in shared memory, a run of pixels x 4 columns per thread).
    FewIn,
    /// Direct, few outputs, on tensor cores over 16-bit activations in bf16 or fp16
    /// (`conv_narrow_mma_*` in kernels/conv_tc.cu, [`KernelConfig::narrow_mma`]): where
    /// [`narrow_mma_fits`], one split, always with [`ConvLaunch::half_input`]. Reads the
    /// weights in that precision's layout, as [`ConvKernel::Tensor`] does.
    ///
    /// [`KernelConfig::narrow_mma`]: crate::cuda::program::KernelConfig::narrow_mma
    NarrowTensor(Precision),
    /// Direct, few inputs, on tensor cores over the fp32 input and weights, each operand split
    /// into a bf16 pair (`conv_few_in_mma_<sc>` in kernels/conv_tc.cu,
    /// [`KernelConfig::few_in_mma`] in bf16/fp16 programs): where [`ConvKernel::FewIn`] could
    /// run ([`few_in_mma_fits`]), one split, an fp32 input.
    ///
    /// [`KernelConfig::few_in_mma`]: crate::cuda::program::KernelConfig::few_in_mma
    FewInTensor,
    /// Tensor cores (kernels/conv_tc.cu) in tf32, bf16 or fp16 (never fp32); needs sc % 8 == 0,
    /// ncols % 8 == 0 and aligned pointers. Reads the weights in that precision's layout (see
    /// `DevWeights::conv_ptr`).
    Tensor(Precision),
}

/// How one implicit-GEMM launch is split (decided when the program is built, because the
/// split-K workspace is part of the memory plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvLaunch {
    pub kernel: ConvKernel,
    pub splits: usize,
    pub k_per_split: usize,
    /// Tensor cores only: the deeper pipeline (kernels/conv_tc.cu: ASYNC for tf32 and 16-bit
    /// inputs, STAGED for fp32 inputs into bf16/fp16) instead of the two-stage one. Same
    /// results either way.
    pub deep: bool,
    /// The input is already in the tensor-core kernel's 16-bit precision (two elements per
    /// f32 slot), written so by the op before it; only with `ConvKernel::Tensor` in bf16 or
    /// fp16 and `deep`. Set by the lowering, which knows where each input comes from.
    pub half_input: bool,
    /// Hopper's warpgroup products (kernels/conv_wgmma.cu) instead of mma.sync: only with
    /// `half_input`, K split in multiples of [`WGMMA_SLICE`], and the weights read K-major
    /// (the other direction's layout, [`crate::cuda::program::W::k_major`]).
    pub wgmma: bool,
    /// Tensor cores with `deep` (mma.sync or wgmma): the epilogue that issues each row's
    /// loads (bias, time embedding, residual) four pairs at a time before storing them
    /// (`ROWS` in kernels/conv_tc.cu and conv_wgmma.cu, the `_rows` kernels) instead of pair
    /// by pair; the same arithmetic.
    pub row_epilogue: bool,
    /// With `wgmma` and `row_epilogue`: loaders that form a K slice's addresses from one
    /// offset per slice and test bounds without branches, and an epilogue that skips the
    /// division by an `out_div` of 1 (`LEAN` in kernels/conv_wgmma.cu, the `_lean` kernels):
    /// about half the instructions a slice, the same bits.
    pub lean_loads: bool,
    /// With `lean_loads`: the A and B slices copied by the tensor memory accelerator, one
    /// thread issuing an im2col and a tiled bulk copy per slice (`TMA` in
    /// kernels/conv_wgmma.cu, the `_tma` kernels): no copy instructions in the other threads,
    /// the same bits. Only where [`im2col_box`] takes the shape.
    pub tma_loads: bool,
    /// With `lean_loads`: each block first asks L2 for the rows of the residual and of the
    /// output it adds onto (when accumulating) that its epilogue will read
    /// (`ConvArgs::prefetch`), so that those reads overlap its products; unsplit launches
    /// that read either only (the program sets it). The same bits.
    pub prefetch: bool,
    /// With `wgmma`: its tile.
    pub tile: WgmmaTile,
    /// With `tma_loads`, unsplit: the epilogue through shared memory (`STAGED` in
    /// kernels/conv_wgmma.cu, the `_st` kernels, also with a fused shortcut), each warp
    /// finishing whole rows with 16-byte accesses instead of each thread its fragment's 8-byte
    /// pairs; the same arithmetic per value, so the same bits.
    pub staged_epilogue: bool,
}

/// The forms of a wgmma kernel of one tile and precision as `(row_epilogue, lean_loads,
/// tma_loads)`, in the order of [`Kernels`](super::Kernels)' tables (conv.rs `WGMMA_FORM_NAMES`
/// names them): each form adds one choice to the one before.
pub(crate) const WGMMA_FORMS: [(bool, bool, bool); 4] = [
    (false, false, false),
    (true, false, false),
    (true, true, false),
    (true, true, true),
];

/// The tile of a wgmma launch (kernels/conv_wgmma.cu `WgTile`): for a given split of K each
/// computes the same sums in the same order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum WgmmaTile {
    /// 128 rows, three stages, two blocks per multiprocessor (`PlainTile`).
    #[default]
    Plain,
    /// 256 rows of four warpgroups, one block per multiprocessor (`TallTile`, the `_tall`
    /// kernels): half the weight traffic per product.
    Tall,
}

impl WgmmaTile {
    /// In the order of [`Kernels`](super::Kernels)' wgmma tables, with each one's kernel name suffix.
    pub(crate) const ALL: [(WgmmaTile, &'static str); 2] =
        [(WgmmaTile::Plain, ""), (WgmmaTile::Tall, "_tall")];

    /// "wgmma" and the tile in words, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            WgmmaTile::Plain => "wgmma",
            WgmmaTile::Tall => "wgmma, tall",
        }
    }

    /// Output rows of one block.
    pub fn rows(self) -> usize {
        match self {
            WgmmaTile::Tall => 256,
            _ => TILE,
        }
    }

    pub(super) fn threads(self) -> u32 {
        match self {
            WgmmaTile::Tall => 512,
            _ => BLOCK,
        }
    }

    /// Dynamic shared memory: three stages of two 16 KB operand tiles, or four of a 32 KB and
    /// a 16 KB tile, plus 1 KB to align them.
    pub(super) fn smem(self) -> u32 {
        match self {
            WgmmaTile::Plain => 99_328,
            WgmmaTile::Tall => 197_632,
        }
    }
}

/// Wgmma launch `l` moved to `tile`, with the same split; `None` for a launch without wgmma.
pub(crate) fn on_tile(l: ConvLaunch, tile: WgmmaTile) -> Option<ConvLaunch> {
    l.wgmma.then_some(ConvLaunch { tile, ..l })
}

/// Block tile of the GEMM kernels, and the K slice.
pub(super) const TILE: usize = 128;
const BK: usize = 8;

/// K slice of the tensor-core kernel: 64 bytes of a row.
pub(super) fn tc_slice(p: Precision) -> usize {
    if p == Precision::Tf32 {
        16
    } else {
        32
    }
}

/// K slice of the wgmma convolutions: 64 16-bit values, one 128-byte swizzled row.
pub(crate) const WGMMA_SLICE: usize = 64;

/// A wgmma launch of `s` (16-bit input, bf16 or fp16 products): the tensor-core split-K rule
/// over its 64-deep K slices, with a wave of one block per multiprocessor. Counting two, the
/// rule split launches that run faster whole with one block per multiprocessor: in the H200
/// sweep of 2026-11-26 (bf16, the row-epilogue launches every wgmma launch now takes), the
/// 128x128 level at batch 1 (128 blocks) took 0.030 ms unsplit against 0.042 ms in two
/// splits. Over that sweep's per-launch times (batch 1 forward + VJP, batch 8 forward), the
/// launches this rule plans take 6.14 ms at batch 1 (6.34 counting two; 6.07 with the fastest
/// split of each) and 14.67 ms at batch 8 (14.68; 14.45). `None` where the kernel's channel
/// and precision conditions fail.
pub(crate) fn plan_wgmma(s: &ConvShape, sms: usize, precision: Precision) -> Option<ConvLaunch> {
    if !precision.is_half() || s.ncols <= 8 || s.sc % 8 != 0 || s.ncols % 8 != 0 {
        return None;
    }
    let kernel = ConvKernel::Tensor(precision);
    let mut l = split_k_on(s, kernel, WGMMA_SLICE, sms, 1);
    l.deep = true;
    l.half_input = true;
    l.wgmma = true;
    Some(l)
}

/// The pixel box of the im2col tensor map that [`ConvLaunch::tma_loads`] copies `s`'s A rows
/// through: its lower and upper corners, width first, or `None` where the TMA kernels cannot
/// take `s`. The box's lower corner is the smallest tap offsets, so a tap's im2col offsets (its
/// offsets less the corner) are never negative; its upper corner makes the walk over its
/// filter bases, which steps `in_stride` pixels (the map's traversal stride), take `mw` bases
/// a row and `mh` rows, so that the walk, row by row and image by image, visits the GEMM rows
/// in order (PTX ISA, "Tensor im2col mode"). Needs an input stride of at most
/// [`TMA_MAX_STRIDE`], K slices that are whole taps (`sc` a multiple of [`WGMMA_SLICE`]), a
/// full 128-row box of weights, and the four-dimensional map's limits: corners in
/// [-128, 127], offsets in [0, 255]. Whether a launch at a stride above 1 takes it is the
/// caller's choice ([`tma_tried`], [`KernelConfig::strided_tma`]).
///
/// [`KernelConfig::strided_tma`]: crate::cuda::program::KernelConfig::strided_tma
pub(crate) fn im2col_box(s: &ConvShape) -> Option<([i32; 2], [i32; 2])> {
    if !(1..=TMA_MAX_STRIDE).contains(&s.in_stride)
        || s.sc % WGMMA_SLICE != 0
        || s.ncols < 128
        || s.mh == 0
        || s.mw == 0
    {
        return None;
    }
    let dy = s.taps.iter().map(|t| t.dy);
    let dx = s.taps.iter().map(|t| t.dx);
    let (dy0, dy1) = (dy.clone().min()?, dy.max()?);
    let (dx0, dx1) = (dx.clone().min()?, dx.max()?);
    // The walk's last base in a row is d0 + stride (m - 1), the upper corner's last base
    // src - 1 + upper: the two equal (at stride 1, the box as wide as the output grid).
    let extent = |m: usize, src: usize, d0: i32| -> Option<i32> {
        let last = i64::try_from((m - 1) * s.in_stride).ok()?;
        let upper = last + 1 - i64::try_from(src).ok()? + i64::from(d0);
        i32::try_from(upper).ok()
    };
    let lower = [dx0, dy0];
    let upper = [extent(s.mw, s.sw, dx0)?, extent(s.mh, s.sh, dy0)?];
    let corner_ok = |c: i32| (-128..=127).contains(&c);
    let offsets_ok = dy1 - dy0 <= 255 && dx1 - dx0 <= 255;
    (lower.iter().chain(&upper).all(|&c| corner_ok(c)) && offsets_ok).then_some((lower, upper))
}

/// Where launch `plan` of `s` can also write the GroupNorm partial sums of its output
/// ([`ConvPtrs::gn_partial`](super::ConvPtrs)): the chunks per image, one per tile, or `None`.
/// The lean and TMA kernels' row epilogue, unsplit, with every output row the pixel of the same
/// index and each image whole tiles, so that a tile's rows are one chunk of one image.
pub(crate) fn gn_partial_fits(s: &ConvShape, plan: &ConvLaunch) -> Option<usize> {
    let per = s.mh * s.mw;
    let rows = plan.tile.rows();
    let fits =
        plan.lean_loads && plan.splits == 1 && s.rows_are_pixels() && per > 0 && per % rows == 0;
    fits.then_some(per / rows)
}

/// The largest input stride the TMA kernels take: the driver's limit on a tensor map's
/// traversal stride.
pub(crate) const TMA_MAX_STRIDE: usize = 8;

/// Whether the selftest and the sweep try the TMA kernels on `s`: where [`im2col_box`] takes
/// it, unless `INVDIFF_WGMMA_TMA=0` keeps them out (a faulting kernel ends the checks after it,
/// so scripts/device_check.sh runs the TMA kernels' checks on their own first), and at an input
/// stride above 1 only with `INVDIFF_TMA_STRIDED=1` (a candidate, checked in a run of its own).
pub(crate) fn tma_tried(s: &ConvShape) -> bool {
    im2col_box(s).is_some()
        && !switches::is("INVDIFF_WGMMA_TMA", "0")
        && (s.in_stride == 1 || switches::is("INVDIFF_TMA_STRIDED", "1"))
}

/// Most output channels of [`ConvKernel::Narrow`] and source channels of [`ConvKernel::FewIn`]:
/// kernels/conv.cu has one kernel per count.
pub(super) const DIRECT_MAX: usize = 8;

/// Whether the direct kernels (kernels/conv.cu, `conv_narrow_*` and `conv_few_in_*`) can
/// compute `s`: in_stride 1, and 1 to 9 taps at distinct offsets inside one 3x3 window (which
/// every stride-1 or 1x1 forward and every input gradient has).
pub(super) fn direct_fits(s: &ConvShape) -> bool {
    let (Some(dy0), Some(dx0)) = (
        s.taps.iter().map(|t| t.dy).min(),
        s.taps.iter().map(|t| t.dx).min(),
    ) else {
        return false;
    };
    let mut seen = [false; 9];
    s.in_stride == 1
        && s.taps.len() <= 9
        && s.taps.iter().all(|t| {
            let (ry, rx) = (t.dy - dy0, t.dx - dx0);
            let fits = ry <= 2 && rx <= 2;
            let cell = (3 * ry + rx) as usize;
            fits && !std::mem::replace(&mut seen[cell], true)
        })
}

/// Most source channels of [`ConvKernel::NarrowTensor`] (kernels/conv_tc.cu
/// `conv_narrow_mma_*`): its blocks stage every weight of the launch, 144 bytes a source
/// channel, in the shared memory the launcher allows for this many.
pub(crate) const NARROW_MMA_MAX_SC: usize = 256;

/// Whether [`ConvKernel::NarrowTensor`] can compute `s` at `precision`: bf16 or fp16, at most
/// [`DIRECT_MAX`] outputs, a direct kernel's taps ([`direct_fits`]), and whole 16-channel steps
/// of up to [`NARROW_MMA_MAX_SC`] source channels.
pub(crate) fn narrow_mma_fits(s: &ConvShape, precision: Precision) -> bool {
    precision.is_half()
        && s.ncols <= DIRECT_MAX
        && s.shortcut_sc == 0
        && s.sc % 16 == 0
        && (16..=NARROW_MMA_MAX_SC).contains(&s.sc)
        && direct_fits(s)
}

/// Whether [`ConvKernel::FewInTensor`] can compute `s`: at most [`DIRECT_MAX`] source
/// channels and a direct kernel's taps ([`direct_fits`]); any number of outputs.
pub(crate) fn few_in_mma_fits(s: &ConvShape) -> bool {
    s.sc <= DIRECT_MAX && s.shortcut_sc == 0 && direct_fits(s)
}

/// Chooses the kernel and the split of K for `s` on a device with `sms` multiprocessors.
///
/// Few output or few source channels (the 3-channel image convolutions) take the direct
/// kernels where they fit. Otherwise the GEMM: two 256-thread blocks fit on a multiprocessor
/// (128 registers per thread). When the tile grid alone leaves slots empty, K is split so as to
/// minimise waves per unit of work (ties go to fewer splits, which cost a workspace round
/// trip), keeping at least 8 K slices per split.
pub(crate) fn plan_conv(s: &ConvShape, sms: usize) -> ConvLaunch {
    if direct_fits(s) && (s.ncols <= DIRECT_MAX || s.sc <= DIRECT_MAX) {
        let kernel = if s.ncols <= DIRECT_MAX {
            ConvKernel::Narrow
        } else {
            ConvKernel::FewIn
        };
        return ConvLaunch::new(kernel, 1, s.k());
    }
    let kernel = if s.sc % 8 == 0 && s.ncols % 4 == 0 {
        ConvKernel::Vec
    } else {
        ConvKernel::Any
    };
    split_k(s, kernel, BK, sms)
}

/// [`plan_conv`] at `precision`: the tensor-core kernel wherever its preconditions hold (the
/// same split-K rule over its longer K slices), the fp32 kernels elsewhere and for fp32.
pub(crate) fn plan_conv_at(s: &ConvShape, sms: usize, precision: Precision) -> ConvLaunch {
    if precision == Precision::Fp32 || s.ncols <= 8 || s.sc % 8 != 0 || s.ncols % 8 != 0 {
        return plan_conv(s, sms);
    }
    split_k(s, ConvKernel::Tensor(precision), tc_slice(precision), sms)
}

/// The launch a program plans for `s` before its tile and epilogue are chosen: on wgmma where
/// `wgmma` asks and the input holds 16-bit values (`half_input`), else [`plan_conv_at`]'s
/// kernel, a tensor-core one on its deep pipeline where `deep`.
pub(crate) fn plan_launch(
    s: &ConvShape,
    sms: usize,
    precision: Precision,
    half_input: bool,
    wgmma: bool,
    deep: bool,
) -> ConvLaunch {
    plan_wgmma(s, sms, precision)
        .filter(|_| half_input && wgmma)
        .unwrap_or_else(|| {
            let l = plan_conv_at(s, sms, precision);
            ConvLaunch {
                deep: deep && matches!(l.kernel, ConvKernel::Tensor(_)),
                half_input,
                ..l
            }
        })
}

/// The split of K for `kernel` with K slices of `bk`, two blocks a multiprocessor a wave.
fn split_k(s: &ConvShape, kernel: ConvKernel, bk: usize, sms: usize) -> ConvLaunch {
    split_k_on(s, kernel, bk, sms, 2)
}

/// [`split_k`] counting `per_sm` blocks a multiprocessor as a wave.
fn split_k_on(
    s: &ConvShape,
    kernel: ConvKernel,
    bk: usize,
    sms: usize,
    per_sm: usize,
) -> ConvLaunch {
    let sms = sms.max(1);
    let tiles = s.rows().div_ceil(TILE) * s.ncols.div_ceil(TILE);
    let ktiles = s.k().div_ceil(bk).max(1);
    let splits = match kernel {
        ConvKernel::Tensor(_) => tc_splits(tiles, ktiles, per_sm * sms, sms),
        _ => simt_splits(tiles, ktiles, per_sm * sms),
    };
    ConvLaunch::new(kernel, 1, s.k()).with_splits(s, bk, splits)
}

/// The fp32 kernels: the fewest waves of blocks per split, each split at least 8 K slices, a
/// further split only for a 5% gain.
fn simt_splits(tiles: usize, ktiles: usize, slots: usize) -> usize {
    let max_splits = (ktiles / 8).clamp(1, 64);
    let mut best = (1usize, f64::INFINITY);
    for splits in 1..=max_splits {
        let waves = (tiles * splits).div_ceil(slots) as f64;
        let cost = waves / splits as f64;
        if cost < best.1 * 0.95 {
            best = (splits, cost);
        }
    }
    best.0
}

/// What a block's partial sums cost when K is split, in K slices per two blocks a
/// multiprocessor (fitted, below): the workspace round trip and the reduction launch.
const SPLIT_SLICES: f64 = 8.0;

/// The tensor-core kernels: a cost in K slices, fitted to every launch of the celebahq network
/// timed under every split on an H200 (`kernels_cuda --sweep`, batch 1 and 8, 2026-11-26): each
/// wave of blocks costs its slices plus about 4 more (prologue, pipeline fill, epilogue), and
/// splitting costs about 8 slices per block's worth of partial sums (the workspace round trip
/// and the reduction). Against the former rule (the SIMT one) it took the tensor-core launches
/// of a batch-1 forward + VJP from 9.89 to 9.37 ms and left batch 8 unchanged (23.90 / 23.87 ms):
/// the small low-resolution launches were latency-bound and wanted more, shorter splits.
/// A wave is `slots` blocks; the partial sums cost the same whatever the wave ([`SPLIT_SLICES`]
/// per two blocks of each of the `sms` multiprocessors).
fn tc_splits(tiles: usize, ktiles: usize, slots: usize, sms: usize) -> usize {
    const WAVE_SLICES: f64 = 4.0;
    let mut best = (1usize, f64::INFINITY);
    for want in 1..=ktiles.min(64) {
        // The split a per-split length of ceil(ktiles / want) slices really gives.
        let per = ktiles.div_ceil(want);
        let splits = ktiles.div_ceil(per);
        let waves = (tiles * splits).div_ceil(slots) as f64;
        let mut cost = waves * (per as f64 + WAVE_SLICES);
        if splits > 1 {
            cost += SPLIT_SLICES * (splits * tiles) as f64 / (2 * sms) as f64;
        }
        if cost < best.1 {
            best = (splits, cost);
        }
    }
    best.0
}

impl ConvLaunch {
    /// How a wgmma launch copies its slices and readies its epilogue, for reports: `, TMA
    /// loads` or `, lean loads`, then `, prefetch` and `, staged epilogue`; empty for the plain
    /// loaders.
    pub fn loads_described(&self) -> String {
        let loads = if self.tma_loads {
            ", TMA loads"
        } else if self.lean_loads {
            ", lean loads"
        } else {
            ""
        };
        let prefetch = if self.prefetch { ", prefetch" } else { "" };
        let staged = if self.staged_epilogue {
            ", staged epilogue"
        } else {
            ""
        };
        format!("{loads}{prefetch}{staged}")
    }

    /// The launch of `s` on [`ConvKernel::FewInTensor`], over its fp32 input; None where
    /// [`few_in_mma_fits`] does not hold.
    pub(crate) fn few_in_mma(s: &ConvShape) -> Option<Self> {
        few_in_mma_fits(s).then(|| Self::new(ConvKernel::FewInTensor, 1, s.k()))
    }

    /// The launch of `s` on [`ConvKernel::NarrowTensor`] in `precision`, over its 16-bit
    /// input; None where [`narrow_mma_fits`] does not hold.
    pub(crate) fn narrow_mma(s: &ConvShape, precision: Precision) -> Option<Self> {
        narrow_mma_fits(s, precision).then(|| ConvLaunch {
            half_input: true,
            ..Self::new(ConvKernel::NarrowTensor(precision), 1, s.k())
        })
    }

    /// `kernel` over `splits` splits of `k_per_split`, with every pipeline choice off.
    fn new(kernel: ConvKernel, splits: usize, k_per_split: usize) -> Self {
        ConvLaunch {
            kernel,
            splits,
            k_per_split,
            deep: false,
            half_input: false,
            wgmma: false,
            row_epilogue: false,
            lean_loads: false,
            tma_loads: false,
            prefetch: false,
            tile: WgmmaTile::Plain,
            staged_epilogue: false,
        }
    }

    /// This launch with `s`'s K cut into `splits` shares of whole `slice`-deep K slices (fewer
    /// where the last shares would be empty; at least one).
    pub(crate) fn with_splits(self, s: &ConvShape, slice: usize, splits: usize) -> ConvLaunch {
        let k = s.k();
        let per = k.div_ceil(slice).max(1).div_ceil(splits.max(1)) * slice;
        ConvLaunch {
            splits: k.div_ceil(per).max(1),
            k_per_split: per,
            ..self
        }
    }

    /// f32 elements of split-K workspace the launch needs.
    pub fn workspace_len(&self, s: &ConvShape) -> usize {
        if self.splits > 1 {
            self.splits * s.rows() * s.ncols
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input pixel of a stride-2 convolution falls in exactly one parity class, and each
    /// class's taps are exactly the forward taps that reach it.
    #[test]
    fn stride2_backward_classes_cover_the_adjoint() {
        for pad in [Pad::Symmetric, Pad::RightBottom] {
            let (h, w) = (6, 10);
            let classes = ConvShape::backward(1, h, w, 1, 1, 3, 2, pad);
            assert_eq!(classes.len(), 4);
            let total: usize = classes.iter().map(|c| c.rows()).sum();
            assert_eq!(total, h * w);
            let p = pad_before(pad);
            for c in &classes {
                for j in 0..c.mh {
                    for i in 0..c.mw {
                        let (iy, ix) = ((j * 2 + c.out_oy) as i32, (i * 2 + c.out_ox) as i32);
                        let mut want: Vec<(i32, i32, i32)> = Vec::new();
                        for t in 0..9 {
                            let (dy, dx) = (t / 3, t % 3);
                            let (ny, nx) = (iy + p - dy, ix + p - dx);
                            if ny % 2 == 0
                                && nx % 2 == 0
                                && ny >= 0
                                && nx >= 0
                                && ny / 2 < (h / 2) as i32
                                && nx / 2 < (w / 2) as i32
                            {
                                want.push((ny / 2, nx / 2, t));
                            }
                        }
                        let mut got: Vec<(i32, i32, i32)> = c
                            .taps
                            .iter()
                            .map(|t| (j as i32 + t.dy, i as i32 + t.dx, t.w))
                            .filter(|&(y, x, _)| {
                                y >= 0 && x >= 0 && y < (h / 2) as i32 && x < (w / 2) as i32
                            })
                            .collect();
                        want.sort();
                        got.sort();
                        assert_eq!(got, want, "{pad:?} pixel ({iy}, {ix})");
                    }
                }
            }
        }
    }

    /// What a launch of shape `s` computes (kernels/conv.cu's definition), in f64: `x` is
    /// `[n, sh, sw, sc]`, `wt` `[(tap, sc), ncols]`, `y` `[n, yh, yw, ncols]`.
    fn run_launch(s: &ConvShape, x: &[f32], wt: &[f32], y: &mut [f64]) {
        for img in 0..s.n {
            for my in 0..s.mh {
                for mx in 0..s.mw {
                    let oy = my * s.out_stride + s.out_oy;
                    let ox = mx * s.out_stride + s.out_ox;
                    let out = ((img * s.yh + oy) * s.yw + ox) * s.ncols;
                    for t in &s.taps {
                        let iy = (my * s.in_stride) as i32 + t.dy;
                        let ix = (mx * s.in_stride) as i32 + t.dx;
                        if iy < 0 || ix < 0 || iy >= s.sh as i32 || ix >= s.sw as i32 {
                            continue;
                        }
                        let src = ((img * s.sh + iy as usize) * s.sw + ix as usize) * s.sc;
                        for k in 0..s.sc {
                            let row = (t.w as usize * s.sc + k) * s.ncols;
                            for c in 0..s.ncols {
                                y[out + c] += x[src + k] as f64 * wt[row + c] as f64;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Relative L2 distance between a result and a reference.
    fn rel(got: &[f64], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    }

    /// The folded launches compute nearest upsampling followed by the 3x3 convolution, and
    /// their input-gradient launches that pair's adjoint (both checked against direct loops,
    /// odd sizes included, so that every border of every class is exercised).
    #[test]
    fn upsampled_convolutions_fold_into_four_classes() {
        use crate::cuda::weights::{conv_forward_layout, transpose};
        let (n, h, w, cin, cout) = (2, 3, 5, 3, 4);
        let x = crate::rng::uniform_lcg(1, n * h * w * cin, -1.0, 1.0);
        let wt = crate::rng::uniform_lcg(2, cout * cin * 9, -1.0, 1.0);
        let dy = crate::rng::uniform_lcg(3, n * 4 * h * w * cout, -1.0, 1.0);
        let (uh, uw) = (2 * h, 2 * w);
        let up = |img: usize, p: i32, q: i32, ci: usize| -> f64 {
            if p < 0 || q < 0 || p >= uh as i32 || q >= uw as i32 {
                return 0.0;
            }
            x[((img * h + p as usize / 2) * w + q as usize / 2) * cin + ci] as f64
        };
        let kernel =
            |co: usize, ci: usize, u: usize, v: usize| wt[((co * cin + ci) * 3 + u) * 3 + v] as f64;
        // Forward: y[p, q] = sum_{u, v} W[u, v] up[p + u - 1, q + v - 1].
        let mut want = vec![0.0f64; n * uh * uw * cout];
        let mut dx_want = vec![0.0f64; n * h * w * cin];
        for img in 0..n {
            for p in 0..uh {
                for q in 0..uw {
                    for co in 0..cout {
                        let o = ((img * uh + p) * uw + q) * cout + co;
                        for u in 0..3 {
                            for v in 0..3 {
                                let (sp, sq) = (p as i32 + u as i32 - 1, q as i32 + v as i32 - 1);
                                for ci in 0..cin {
                                    want[o] += kernel(co, ci, u, v) * up(img, sp, sq, ci);
                                    // The adjoint, through the same index map.
                                    if sp >= 0 && sq >= 0 && sp < uh as i32 && sq < uw as i32 {
                                        let s = ((img * h + sp as usize / 2) * w + sq as usize / 2)
                                            * cin
                                            + ci;
                                        dx_want[s] += kernel(co, ci, u, v) * dy[o] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let folded = fold_upsampled_weights(&conv_forward_layout(&wt, cout, cin, 3), cin, cout);
        let mut got = vec![0.0f64; want.len()];
        let classes = ConvShape::upsampled_forward(n, h, w, cin, cout);
        assert_eq!(
            classes.iter().map(ConvShape::rows).sum::<usize>(),
            n * uh * uw
        );
        for s in &classes {
            assert_eq!(s.k(), 4 * cin);
            run_launch(s, &x, &folded, &mut got);
        }
        assert!(rel(&got, &want) < 1e-6, "forward {}", rel(&got, &want));
        let back: Vec<f32> = folded
            .chunks(cin * cout)
            .flat_map(|tap| transpose(tap, cin, cout))
            .collect();
        let mut dx = vec![0.0f64; dx_want.len()];
        for s in &ConvShape::upsampled_backward(n, h, w, cin, cout) {
            assert_eq!(s.taps.len(), 8);
            run_launch(s, &dy, &back, &mut dx);
        }
        assert!(rel(&dx, &dx_want) < 1e-6, "backward {}", rel(&dx, &dx_want));
    }

    #[test]
    fn split_k_fills_the_machine_only_when_needed() {
        let big = ConvShape::forward(1, 256, 256, 128, 128, 3, 1, Pad::Symmetric);
        assert_eq!(plan_conv(&big, 132).splits, 1);
        assert_eq!(plan_conv(&big, 132).kernel, ConvKernel::Vec);
        let small = ConvShape::forward(1, 8, 8, 1024, 512, 3, 1, Pad::Symmetric);
        let p = plan_conv(&small, 132);
        assert!(p.splits > 16, "{p:?}");
        assert!(
            p.splits * p.k_per_split >= small.k() && (p.splits - 1) * p.k_per_split < small.k()
        );
        assert_eq!(p.k_per_split % BK, 0);
    }

    /// The 3-channel image convolutions, both directions, on the direct kernels; shapes they
    /// cannot compute (stride 2, taps outside a 3x3 window, many channels both sides) on the
    /// GEMM.
    #[test]
    fn few_channels_take_the_direct_kernels() {
        use Pad::*;
        let kernels = |cin, cout, stride, pad| {
            let f = plan_conv(
                &ConvShape::forward(2, 256, 256, cin, cout, 3, stride, pad),
                132,
            );
            let b: Vec<_> = ConvShape::backward(2, 256, 256, cin, cout, 3, stride, pad)
                .iter()
                .map(|s| plan_conv(s, 132).kernel)
                .collect();
            assert!(b.iter().all(|&k| k == b[0]));
            assert_eq!(f.splits, 1);
            (f.kernel, b[0])
        };
        use ConvKernel::{Any, FewIn, Narrow};
        assert_eq!(kernels(128, 3, 1, Symmetric), (Narrow, FewIn));
        assert_eq!(kernels(3, 128, 1, Symmetric), (FewIn, Narrow));
        assert_eq!(kernels(8, 8, 1, Symmetric), (Narrow, Narrow));
        assert_eq!(kernels(9, 9, 1, Symmetric), (Any, Any));
        // Stride 2: the forward on the GEMM, its parity-class gradients direct.
        assert_eq!(kernels(3, 128, 2, Symmetric), (Any, Narrow));
        assert_eq!(kernels(128, 4, 2, RightBottom), (ConvKernel::Vec, FewIn));
        // 1x1 and linear layers.
        let one = ConvShape::forward(1, 16, 16, 3, 64, 1, 1, Symmetric);
        assert_eq!(plan_conv(&one, 132).kernel, FewIn);
        assert_eq!(
            plan_conv(&ConvShape::linear(1, 100, 64, 3), 132).kernel,
            Narrow
        );
        // Taps beyond one 3x3 window, or two at one offset.
        let mut wide = ConvShape::forward(1, 16, 16, 64, 3, 3, 1, Symmetric);
        wide.taps[0].dx = -2;
        assert_eq!(plan_conv(&wide, 132).kernel, Any);
        let mut twice = ConvShape::forward(1, 16, 16, 64, 3, 3, 1, Symmetric);
        twice.taps[1] = twice.taps[0];
        assert_eq!(plan_conv(&twice, 132).kernel, Any);
        assert!(direct_fits(&ConvShape::forward(
            1,
            16,
            16,
            64,
            3,
            3,
            1,
            RightBottom
        )));
    }

    /// Tensor cores wherever channels allow, the fp32 kernels elsewhere and for fp32, and the
    /// split of K in whole tensor-core slices.
    #[test]
    fn precision_picks_the_kernel() {
        let big = ConvShape::forward(8, 256, 256, 128, 128, 3, 1, Pad::Symmetric);
        for p in [Precision::Tf32, Precision::Bf16, Precision::Fp16] {
            assert_eq!(plan_conv_at(&big, 132, p).kernel, ConvKernel::Tensor(p));
            assert_eq!(plan_conv_at(&big, 132, p).splits, 1);
            let small = ConvShape::forward(1, 8, 8, 512, 512, 3, 1, Pad::Symmetric);
            let l = plan_conv_at(&small, 132, p);
            assert!(l.splits > 1 && l.k_per_split % tc_slice(p) == 0, "{l:?}");
            assert!(l.splits * l.k_per_split >= small.k());
            for s in [
                ConvShape::forward(1, 256, 256, 3, 128, 3, 1, Pad::Symmetric),
                ConvShape::forward(1, 256, 256, 128, 3, 3, 1, Pad::Symmetric),
                ConvShape::forward(1, 16, 16, 20, 36, 3, 1, Pad::Symmetric),
            ] {
                assert_eq!(plan_conv_at(&s, 132, p), plan_conv(&s, 132));
            }
        }
        assert_eq!(
            plan_conv_at(&big, 132, Precision::Fp32),
            plan_conv(&big, 132)
        );
    }

    /// The source pixel (image, y, x) of GEMM row `m` at tap `t` as the cp.async loaders gather
    /// it (kernels/conv_wgmma.cu `load_plain`); None for a zero row.
    fn gathered(s: &ConvShape, m: usize, t: &Tap) -> Option<(usize, i32, i32)> {
        if m >= s.rows() {
            return None;
        }
        let (img, rem) = (m / (s.mh * s.mw), m % (s.mh * s.mw));
        let y = (rem / s.mw * s.in_stride) as i32 + t.dy;
        let x = (rem % s.mw * s.in_stride) as i32 + t.dx;
        let inside = (0..s.sh as i32).contains(&y) && (0..s.sw as i32).contains(&x);
        inside.then_some((img, y, x))
    }

    /// The rows an im2col copy of `rows` pixels loads, by the PTX ISA's description of the
    /// walk ("Tensor im2col mode"): filter bases from (w, h) of image n across the box
    /// [lower, dim - 1 + upper], `in_stride` apart (the map's traversal stride, as
    /// tma::im2col_map sets it), row by row and image by image, each shifted by the offsets;
    /// zeros outside the image and past the batch.
    fn walked(
        s: &ConvShape,
        (lower, upper): ([i32; 2], [i32; 2]),
        (mut w, mut h, mut n): (i32, i32, usize),
        (ow, oh): (i32, i32),
        rows: usize,
    ) -> Vec<Option<(usize, i32, i32)>> {
        let (w_hi, h_hi) = (s.sw as i32 - 1 + upper[0], s.sh as i32 - 1 + upper[1]);
        let mut out = Vec::with_capacity(rows);
        for _ in 0..rows {
            let (y, x) = (h + oh, w + ow);
            let inside = n < s.n && (0..s.sh as i32).contains(&y) && (0..s.sw as i32).contains(&x);
            out.push(inside.then_some((n, y, x)));
            w += s.in_stride as i32;
            if w > w_hi {
                w = lower[0];
                h += s.in_stride as i32;
                if h > h_hi {
                    h = lower[1];
                    n += 1;
                }
            }
        }
        out
    }

    /// Every wgmma launch at celebahq's levels (forward, stride-2 forwards, input gradients
    /// with their stride-2 parity classes, folded upsamplings and their stride-2 input
    /// gradients, linear layers) and the stride-2 forwards of odd sizes takes an im2col box,
    /// and at both tiles the rows each tile's im2col copy loads for each tap, with the
    /// kernel's start and offsets (`load_tma`), are the rows the cp.async loaders gather.
    #[test]
    fn tma_im2col_walk_gathers_the_loaders_rows() {
        let mut shapes = Vec::new();
        for n in [1, 2] {
            for (h, c) in [(256, 128), (64, 256), (16, 512), (8, 512)] {
                shapes.push(ConvShape::forward(n, h, h, c, c, 3, 1, Pad::Symmetric));
                shapes.push(ConvShape::forward(n, h, h, c, c, 3, 2, Pad::Symmetric));
                shapes.push(ConvShape::forward(n, h, h, c, c, 3, 2, Pad::RightBottom));
                shapes.push(ConvShape::forward(n, h, h, 2 * c, c, 1, 1, Pad::Symmetric));
                shapes.extend(ConvShape::backward(n, h, h, c, c, 3, 1, Pad::Symmetric));
                shapes.extend(ConvShape::backward(n, h, h, c, c, 3, 2, Pad::RightBottom));
                shapes.extend(ConvShape::upsampled_forward(n, h / 2, h / 2, c, c));
                shapes.extend(ConvShape::upsampled_backward(n, h / 2, h / 2, c, c));
            }
            shapes.push(ConvShape::linear(n, 256, 512, 1536));
            for pad in [Pad::Symmetric, Pad::RightBottom] {
                shapes.push(ConvShape::forward(n, 13, 9, 64, 128, 3, 2, pad));
                shapes.push(ConvShape::forward(n, 7, 12, 128, 192, 3, 2, pad));
            }
        }
        let mut strided = 0;
        for s in &shapes {
            let bx = im2col_box(s).unwrap_or_else(|| panic!("no box for {s:?}"));
            strided += usize::from(s.in_stride > 1);
            let (dy0, dx0) = (bx.0[1], bx.0[0]);
            for tile in [128, 256] {
                let tiles = s.rows().div_ceil(tile);
                for m0 in (0..tiles)
                    .filter(|&i| i < 3 || i + 2 >= tiles)
                    .map(|i| i * tile)
                {
                    let (img, rem) = (m0 / (s.mh * s.mw), m0 % (s.mh * s.mw));
                    let start = (
                        (rem % s.mw * s.in_stride) as i32 + dx0,
                        (rem / s.mw * s.in_stride) as i32 + dy0,
                        img,
                    );
                    for t in &s.taps {
                        let offsets = (t.dx - dx0, t.dy - dy0);
                        assert!((0..=255).contains(&offsets.0) && (0..=255).contains(&offsets.1));
                        let want: Vec<_> = (m0..m0 + tile).map(|m| gathered(s, m, t)).collect();
                        assert_eq!(
                            walked(s, bx, start, offsets, tile),
                            want,
                            "{s:?} at row {m0}"
                        );
                    }
                }
            }
        }
        assert_eq!((shapes.len(), strided), (130, 40));
        let same = ConvShape::forward(1, 64, 64, 256, 256, 3, 1, Pad::Symmetric);
        assert_eq!(im2col_box(&same), Some(([-1, -1], [-1, -1])));
        // Stride 2: the walk's last base in a row, -1 + 2 x 31 = 61, is 64 - 1 + upper.
        let stride2 = ConvShape::forward(1, 64, 64, 256, 256, 3, 2, Pad::Symmetric);
        assert_eq!(im2col_box(&stride2), Some(([-1, -1], [-2, -2])));
        let too_far = ConvShape {
            in_stride: TMA_MAX_STRIDE + 1,
            ..stride2
        };
        assert_eq!(im2col_box(&too_far), None);
    }

    /// A 1x1 shortcut fuses into a stride-1 convolution over the same grid whose channels and
    /// its own are whole wgmma slices: K the two summed, the shortcut's own problem the 1x1
    /// forward, and the TMA kernels' copy of its source through the main source's pixel box at
    /// offsets (-dx0, -dy0) the rows the 1x1's loaders gather. Nothing else fuses.
    #[test]
    fn shortcuts_fuse_where_the_kernels_take_them() {
        use Pad::Symmetric;
        let main = ConvShape::forward(2, 16, 24, 128, 256, 3, 1, Symmetric);
        let fused = main.with_shortcut(384).unwrap();
        assert_eq!(fused.k(), 9 * 128 + 384);
        let one = fused.shortcut().unwrap();
        assert_eq!(
            one,
            ConvShape::forward(2, 16, 24, 384, 256, 1, 1, Symmetric)
        );
        assert_eq!(main.shortcut(), None);
        let bx = im2col_box(&main).unwrap();
        let source = ConvShape {
            sc: 384,
            ..main.clone()
        };
        assert_eq!(im2col_box(&source), Some(bx));
        let offsets = (-bx.0[0], -bx.0[1]);
        for tile in [128, 256] {
            for m0 in (0..one.rows()).step_by(tile) {
                let (img, rem) = (m0 / (one.mh * one.mw), m0 % (one.mh * one.mw));
                let start = (
                    (rem % one.mw) as i32 + bx.0[0],
                    (rem / one.mw) as i32 + bx.0[1],
                    img,
                );
                let want: Vec<_> = (m0..m0 + tile)
                    .map(|m| gathered(&one, m, &one.taps[0]))
                    .collect();
                assert_eq!(walked(&source, bx, start, offsets, tile), want, "row {m0}");
            }
        }
        let stride2 = ConvShape::forward(1, 16, 16, 128, 256, 3, 2, Symmetric);
        assert_eq!(stride2.with_shortcut(128), None);
        for class in ConvShape::upsampled_forward(1, 8, 8, 128, 128) {
            assert_eq!(class.with_shortcut(128), None);
        }
        assert_eq!(main.with_shortcut(96), None);
        assert_eq!(main.with_shortcut(0), None);
        let narrow = ConvShape::forward(1, 16, 16, 96, 256, 3, 1, Symmetric);
        assert_eq!(narrow.with_shortcut(128), None);
        assert_eq!(fused.with_shortcut(128), None);
        // Taps that all lie past the pixel itself: the TMA copy's offset would be negative.
        let mut past = main.clone();
        past.taps.iter_mut().for_each(|t| t.dx += 2);
        assert_eq!(past.with_shortcut(128), None);
        past.taps.iter_mut().for_each(|t| t.dx -= 1);
        assert!(past.with_shortcut(128).is_some());
    }
}
