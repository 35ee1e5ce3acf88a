//! Winograd F(2x2, 3x3) convolution on channels-last activations: the 3x3 stride-1 forward
//! convolution and its input gradient (the same convolution with the flipped, transposed kernel).
//!
//! Each 2x2 block of output pixels (a *tile*) is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, where `d` is the
//! 4x4 input window under the tile and `g` the 3x3 kernel: 16 multiplications per tile and
//! channel pair instead of 36, 2.25x fewer. Summed over input channels, the elementwise product
//! becomes 16 independent matrix products `M[ξ] = V[ξ] U[ξ]`, `V[ξ]` being `[tiles, cin]` and
//! `U[ξ] = (G g Gᵀ)[ξ]` being `[cin, cout]`.
//!
//! - Weights: `U` is computed once per convolution (in f64, rounded once) and packed for the
//!   products: for the AVX2 microkernel (`microkernel.rs`), `[ξ][cout / 16][cin][16]`, each
//!   16-wide row one cache line, so that the kernel streams a panel with aligned loads and
//!   nothing is packed per call; for the `gemm` crate (CPUs without AVX2/FMA), `[ξ][cin][cout]`.
//!   They take 16/9 of the direct kernel's memory.
//! - Blocks: the tiles of one image, in row-major order, are cut into blocks of about
//!   `TILE_BLOCK` tiles. Per block, the input transform writes `V` (`16 x tiles x cin`), the
//!   16 products write `M` (`16 x tiles x cout`), and the output transform reads `M` back and
//!   writes the output pixels through the fused epilogue. At 48 tiles and 128 channels `V` and
//!   `M` (384 KiB each) stay in the 1 MiB L2 (a Zen 4 core's) and only the weights, shared by
//!   all blocks, stream from L3: `16 cin cout` floats per block against `2 x 16 x 48 cin cout`
//!   FLOPs, 24 FLOPs per byte. Larger blocks spill `V`, smaller ones reread the weights more often; the
//!   time hardly moves between 36 and 96 tiles at these sizes. Larger weights get larger blocks,
//!   and small images a single block (see `Plan::new`).
//! - The products run at ~110 GFLOP/s a core on Zen 4, near its FMA peak; the rest of the time
//!   (10-15%) goes to the transforms, which read the input and write the output once each and
//!   are bound by that memory traffic (their arithmetic is ~`1/cout` of the products'). With
//!   the `gemm` crate in the microkernel's place (packing the weights on every call) the
//!   convolution is 3-10% slower at 32x32 and above, and 35-50% slower at 8x8.
//! - Parallelism: work items are (image, block, range of output channels), the channel split
//!   only for images too small to give `MIN_ITEMS` blocks (each range redoes the cheap input
//!   transform). The split depends on the image size alone, and with the microkernel each
//!   output value is computed by the same operations whichever block holds its tile, so results
//!   depend neither on the thread count nor on the other images in the batch.
//!
//! Accuracy: the transforms only add and halve, and the products sum over `cin` as the direct
//! convolution does. Against an f64 reference at the network's shapes, the relative L2 error is
//! 1.3-2.4x the direct path's (4e-7 to 1e-6 instead of 3e-7 to 4e-7).

#[cfg(target_arch = "x86_64")]
mod microkernel;

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm::{matmul, Mat};

/// Target number of tiles (2x2 output pixels) per block; see the module comment.
const TILE_BLOCK: usize = 48;
/// Work items an image is cut into at least, when it has enough output channels to split:
/// enough for two to eight threads to finish together within a few percent.
const MIN_ITEMS: usize = 16;
/// Output channels per panel, and the granularity of the output-channel split.
const PANEL: usize = 16;
/// Rows of the microkernel's register tile: blocks are padded to a multiple of it.
const MR: usize = 6;

/// 16 floats on one 64-byte cache line: the storage unit of the packed weights and scratch
/// buffers, so that panel rows and register-tile rows never straddle two lines.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([f32; 16]);

fn lines(floats: usize) -> Vec<Line> {
    vec![Line([0.0; 16]); floats.div_ceil(16)]
}

/// How the 16 products are computed: picked once per [`Weights`], as it fixes their layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// The 6x16 AVX2+FMA microkernel on panel-packed weights (checked to be supported).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The `gemm` crate on row-major weights.
    Gemm,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Gemm
    }

    /// Width of a weight panel for `cout` output channels.
    fn panel_width(self, cout: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => PANEL,
            Kernel::Gemm => cout,
        }
    }
}

/// A 3x3 kernel in the Winograd domain, packed for the products.
pub struct Weights {
    cin: usize,
    cout: usize,
    kernel: Kernel,
    /// Panel width (`nr`) and count: `u` is `[ξ][panel][cin][nr]`, zero beyond `cout`.
    nr: usize,
    panels: usize,
    u: Vec<Line>,
}

impl Weights {
    /// Transforms the kernel `g(tap, ci, co)` (tap = dy * 3 + dx, cross-correlation as in
    /// PyTorch) of a `cin -> cout` convolution.
    pub fn new(cin: usize, cout: usize, g: impl Fn(usize, usize, usize) -> f32 + Sync) -> Self {
        Self::with_kernel(Kernel::detect(), cin, cout, g)
    }

    fn with_kernel(
        kernel: Kernel,
        cin: usize,
        cout: usize,
        g: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Self {
        let nr = kernel.panel_width(cout).max(1);
        let panels = cout.div_ceil(nr);
        let slab = panels * cin * nr;
        let mut u = lines(16 * slab);
        let data: &mut [f32] = bytemuck::cast_slice_mut(&mut u);
        let shared = Shared {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        };
        // One task per input channel, each reading the 9 taps of a kernel once and writing its
        // 16 transformed values: the whole network's kernels take well under a second.
        (0..cin).into_par_iter().for_each(|ci| {
            for co in 0..cout {
                let u = transform_kernel(std::array::from_fn(|t| g(t, ci, co) as f64));
                for (xi, v) in u.into_iter().enumerate() {
                    let i = xi * slab + ((co / nr) * cin + ci) * nr + co % nr;
                    // SAFETY: the elements of input channel `ci` are written by this task alone.
                    unsafe { *shared.get::<1>(i) = [v as f32] };
                }
            }
        });
        Weights {
            cin,
            cout,
            kernel,
            nr,
            panels,
            u,
        }
    }

    fn data(&self) -> &[f32] {
        bytemuck::cast_slice(&self.u)
    }
}

/// What becomes of each convolution value `conv` at its output element `out`.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `out = (conv + bias + temb[image] + residual) / out_div`; `bias` is `[cout]`, `temb`
    /// `[n, cout]`, `residual` has the output's shape.
    Store {
        bias: Option<&'a [f32]>,
        temb: Option<&'a [f32]>,
        residual: Option<&'a [f32]>,
        out_div: f32,
    },
    /// `out += conv`.
    Accumulate,
}

impl Epilogue<'_> {
    /// The epilogue of an input gradient: add onto `out` when `accumulate`, else overwrite it.
    pub fn gradient(accumulate: bool) -> Self {
        if accumulate {
            Epilogue::Accumulate
        } else {
            Epilogue::Store {
                bias: None,
                temb: None,
                residual: None,
                out_div: 1.0,
            }
        }
    }
}

/// 3x3 convolution, stride 1, zero padding 1, of `x` (`[n, h, w, cin]`) into `out`
/// (`[n, h, w, cout]`) through the epilogue `ep`.
pub fn conv3x3(
    wt: &Weights,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    ep: Epilogue,
) {
    let (cin, cout) = (wt.cin, wt.cout);
    assert_eq!(x.len(), n * h * w * cin, "input shape");
    assert_eq!(out.len(), n * h * w * cout, "output shape");
    if let Epilogue::Store {
        bias,
        temb,
        residual,
        ..
    } = ep
    {
        assert!(bias.is_none_or(|b| b.len() == cout), "bias shape");
        assert!(temb.is_none_or(|t| t.len() == n * cout), "temb shape");
        assert!(
            residual.is_none_or(|r| r.len() == out.len()),
            "residual shape"
        );
    }
    if out.is_empty() {
        return;
    }
    let plan = Plan::new(h, w, wt);
    let items = plan.blocks * plan.chunks;
    let out = Shared {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    (0..n * items).into_par_iter().for_each(|i| {
        SCRATCH.with_borrow_mut(|s| {
            let (img, rest) = (i / items, i % items);
            let item = Item {
                img,
                block: rest / plan.chunks,
                chunk: rest % plan.chunks,
            };
            run_item(wt, &plan, item, x, &out, ep, s)
        })
    });
}

/// How one image is cut into work items.
struct Plan {
    h: usize,
    w: usize,
    /// Tiles per row of tiles, and tiles in all.
    tw: usize,
    tiles: usize,
    /// Tiles per block (a multiple of [`MR`]) and blocks per image.
    block: usize,
    blocks: usize,
    /// Output-channel ranges, in whole panels of [`PANEL`] channels.
    chunks: usize,
    chunk_panels: usize,
}

impl Plan {
    fn new(h: usize, w: usize, wt: &Weights) -> Plan {
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = th * tw;
        // Every block streams all the weights through the cache. Past 4 MiB (256 x 256
        // channels) they no longer stay in L3 beside the activations, and blocks twice as large
        // halve that traffic (8% faster at 64x64 512 -> 256, but 3% slower at 256 -> 256, where
        // the larger `V` spills from L2 for nothing). Small images (the 8x8 and 16x16 levels,
        // whose weights are the largest) make a single block, split over output channels.
        let target = if wt.cin * wt.cout > 256 * 256 {
            2 * TILE_BLOCK
        } else {
            TILE_BLOCK
        };
        // Equal blocks rather than full ones and a remnant.
        let blocks = if tiles <= 2 * target {
            1
        } else {
            tiles.div_ceil(target)
        };
        let block = tiles.div_ceil(blocks).next_multiple_of(MR);
        let blocks = tiles.div_ceil(block);
        let panels = wt.cout.div_ceil(PANEL);
        // A power of two, which divides the panel counts of the usual channel counts evenly.
        let chunks = MIN_ITEMS.div_ceil(blocks).next_power_of_two().min(panels);
        let chunk_panels = panels.div_ceil(chunks);
        Plan {
            h,
            w,
            tw,
            tiles,
            block,
            blocks,
            chunks: panels.div_ceil(chunk_panels),
            chunk_panels,
        }
    }
}

#[derive(Clone, Copy)]
struct Item {
    img: usize,
    block: usize,
    chunk: usize,
}

/// A buffer written concurrently by parallel tasks, each writing its own set of elements.
struct Shared {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the tasks write disjoint sets of elements (see `Shared::get`), and the exclusive borrow
// the pointer comes from outlives the parallel loop.
unsafe impl Sync for Shared {}

impl Shared {
    /// The `L` elements at `i`.
    ///
    /// # Safety
    /// No other thread may access these elements while the returned borrow lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get<const L: usize>(&self, i: usize) -> &mut [f32; L] {
        assert!(i + L <= self.len, "index out of bounds");
        // SAFETY: in bounds (checked above); exclusivity is the caller's promise.
        unsafe { &mut *(self.ptr.add(i) as *mut [f32; L]) }
    }
}

/// Per-thread buffers, kept between calls so that blocks cost no allocation or page faults.
#[derive(Default)]
struct Scratch {
    /// Transformed input tiles, `[ξ][block][cin]`.
    v: Vec<Line>,
    /// Products, `[ξ][block][chunk width]`.
    m: Vec<Line>,
    /// `cin` zeros: the padding outside the image.
    zeros: Vec<f32>,
    /// Bias plus time embedding for the item's channels.
    base: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Distance between the 16 matrices of a scratch buffer holding `floats` each: whole lines
/// plus one, so that the 16 rows a transform touches at once fall in 16 different L1 sets (at
/// a multiple of 4 KiB apart, which the usual block and channel counts give, they would all
/// compete for one set of 8 ways).
fn slab(floats: usize) -> usize {
    floats.next_multiple_of(16) + 16
}

fn grow(buf: &mut Vec<Line>, floats: usize) -> &mut [f32] {
    if buf.len() * 16 < floats {
        *buf = lines(floats);
    }
    &mut bytemuck::cast_slice_mut(buf)[..floats]
}

fn run_item(
    wt: &Weights,
    plan: &Plan,
    it: Item,
    x: &[f32],
    out: &Shared,
    ep: Epilogue,
    s: &mut Scratch,
) {
    let (cin, cout) = (wt.cin, wt.cout);
    let t0 = it.block * plan.block;
    let t1 = (t0 + plan.block).min(plan.tiles);
    let rows = (t1 - t0).next_multiple_of(MR);
    let p0 = it.chunk * plan.chunk_panels;
    let p1 = (p0 + plan.chunk_panels).min(cout.div_ceil(PANEL));
    let (c0, c1) = (p0 * PANEL, (p1 * PANEL).min(cout));
    let width = (p1 - p0) * PANEL;
    let image = &x[it.img * plan.h * plan.w * cin..(it.img + 1) * plan.h * plan.w * cin];

    if s.zeros.len() < cin {
        s.zeros = vec![0.0; cin];
    }
    let (vs, ms) = (slab(plan.block * cin), slab(plan.block * width));
    let v = grow(&mut s.v, 16 * vs);
    input_transform(plan, image, cin, t0..t1, &s.zeros[..cin], v, vs);

    let m = grow(&mut s.m, 16 * ms);
    for xi in 0..16 {
        let vx = &v[xi * vs..][..rows * cin];
        let mx = &mut m[xi * ms..][..rows * width];
        let ux = &wt.data()[xi * wt.panels * cin * wt.nr..][..wt.panels * cin * wt.nr];
        match wt.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                for p in p0..p1 {
                    let panel = &ux[p * cin * PANEL..(p + 1) * cin * PANEL];
                    for g in (0..rows).step_by(MR) {
                        // SAFETY: this kernel is only chosen when AVX2 and FMA are present;
                        // `vx` holds rows g..g + MR of cin floats, `panel` cin rows of PANEL
                        // floats starting on a 64-byte line (panels are whole lines), and `mx`
                        // rows g..g + MR of `width` floats, the last PANEL of which start at
                        // (p - p0) * PANEL.
                        unsafe {
                            microkernel::gemm_6x16(
                                cin,
                                vx[g * cin..].as_ptr(),
                                cin,
                                panel.as_ptr(),
                                mx[g * width + (p - p0) * PANEL
                                    ..(g + MR - 1) * width + (p - p0 + 1) * PANEL]
                                    .as_mut_ptr(),
                                width,
                            )
                        }
                    }
                }
            }
            Kernel::Gemm => matmul(
                t1 - t0,
                c1 - c0,
                cin,
                mx,
                width,
                Mat::rows(vx, cin),
                Mat::rows(&ux[c0..], cout),
                false,
                1,
            ),
        }
    }

    let base = &mut s.base;
    base.clear();
    base.resize(c1 - c0, 0.0);
    if let Epilogue::Store { bias, temb, .. } = ep {
        if let Some(b) = bias {
            base.copy_from_slice(&b[c0..c1]);
        }
        if let Some(t) = temb {
            for (v, e) in base
                .iter_mut()
                .zip(&t[it.img * cout + c0..it.img * cout + c1])
            {
                *v += e;
            }
        }
    }
    let m = &s.m;
    let m: &[f32] = &bytemuck::cast_slice(m)[..16 * ms];
    output_transform(
        plan,
        it.img,
        cout,
        t0..t1,
        c0..c1,
        m,
        width,
        ms,
        &s.base[..c1 - c0],
        out,
        ep,
    );
}

/// `G g Gᵀ` for one 3x3 kernel `g` (row-major taps), row-major 4x4;
/// G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
fn transform_kernel(g: [f64; 9]) -> [f64; 16] {
    let gv = |a: f64, b: f64, c: f64| [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
    let cols: [[f64; 4]; 3] = std::array::from_fn(|j| gv(g[j], g[3 + j], g[6 + j]));
    let mut u = [0.0; 16];
    for i in 0..4 {
        let row = gv(cols[0][i], cols[1][i], cols[2][i]);
        u[4 * i..4 * i + 4].copy_from_slice(&row);
    }
    u
}

/// `V[ξ][t - t0][c] = (Bᵀ d B)[ξ]` for tiles `t0..t1` of `image`, `V[ξ]` at `v[ξ * stride]`.
fn input_transform(
    plan: &Plan,
    image: &[f32],
    cin: usize,
    tiles: std::ops::Range<usize>,
    zeros: &[f32],
    v: &mut [f32],
    stride: usize,
) {
    assert_eq!(image.len(), plan.h * plan.w * cin);
    assert!(zeros.len() >= cin);
    assert!(tiles.is_empty() || 15 * stride + tiles.len() * cin <= v.len());
    for (r, t) in tiles.enumerate() {
        let (y0, x0) = (2 * (t / plan.tw), 2 * (t % plan.tw));
        // The 4x4 window starts one pixel above and left of the tile (zero padding 1).
        let src: [*const f32; 16] = std::array::from_fn(|q| {
            let (iy, ix) = ((y0 + q / 4).wrapping_sub(1), (x0 + q % 4).wrapping_sub(1));
            if iy < plan.h && ix < plan.w {
                image[(iy * plan.w + ix) * cin..].as_ptr()
            } else {
                zeros.as_ptr()
            }
        });
        // Raw pointers rather than 32 slices: with bounds checks and slice lengths the loop
        // spent more than half its instructions on spilled lengths and comparisons.
        let dst = v[r * cin..].as_mut_ptr();
        let mut c = 0;
        // SAFETY: every source points at `cin` floats (a pixel of `image`, or `zeros`), and
        // `dst + ξ * stride` at `cin` floats of `v` for ξ < 16 (asserted above); c + L <= cin.
        unsafe {
            while c + 8 <= cin {
                transform_in::<8>(&src, c, dst.add(c), stride);
                c += 8;
            }
            while c < cin {
                transform_in::<1>(&src, c, dst.add(c), stride);
                c += 1;
            }
        }
    }
}

/// Bᵀ d B on channels `c..c + L` of the 4x4 window `src`, written to `dst + ξ * stride`.
/// Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
///
/// # Safety
/// `src[q] + c` must be valid for reading `L` floats and `dst + ξ * stride` for writing `L`
/// floats, for q, ξ < 16.
#[inline(always)]
unsafe fn transform_in<const L: usize>(
    src: &[*const f32; 16],
    c: usize,
    dst: *mut f32,
    stride: usize,
) {
    // SAFETY: the caller's promise.
    let d: [[f32; L]; 16] =
        std::array::from_fn(|q| unsafe { src[q].add(c).cast::<[f32; L]>().read_unaligned() });
    let mut t = [[0.0f32; L]; 16];
    for j in 0..4 {
        for l in 0..L {
            let (d0, d1, d2, d3) = (d[j][l], d[4 + j][l], d[8 + j][l], d[12 + j][l]);
            t[j][l] = d0 - d2;
            t[4 + j][l] = d1 + d2;
            t[8 + j][l] = d2 - d1;
            t[12 + j][l] = d1 - d3;
        }
    }
    for i in 0..4 {
        let mut r = [[0.0f32; L]; 4];
        for l in 0..L {
            let (t0, t1, t2, t3) = (
                t[4 * i][l],
                t[4 * i + 1][l],
                t[4 * i + 2][l],
                t[4 * i + 3][l],
            );
            r[0][l] = t0 - t2;
            r[1][l] = t1 + t2;
            r[2][l] = t2 - t1;
            r[3][l] = t1 - t3;
        }
        for (j, r) in r.iter().enumerate() {
            // SAFETY: the caller's promise.
            unsafe {
                dst.add((4 * i + j) * stride)
                    .cast::<[f32; L]>()
                    .write_unaligned(*r)
            }
        }
    }
}

/// `Aᵀ M A` for tiles `t0..t1`, channels `c0..c1`, through the epilogue into `out`; `M[ξ]` is
/// at `m[ξ * stride]` with rows `width` apart, `base` is bias plus time embedding of `c0..c1`.
#[allow(clippy::too_many_arguments)]
fn output_transform(
    plan: &Plan,
    img: usize,
    cout: usize,
    tiles: std::ops::Range<usize>,
    chans: std::ops::Range<usize>,
    m: &[f32],
    width: usize,
    stride: usize,
    base: &[f32],
    out: &Shared,
    ep: Epilogue,
) {
    let nc = chans.len();
    assert_eq!(base.len(), nc);
    assert!(
        nc <= width
            && (tiles.is_empty() || 15 * stride + (tiles.len() - 1) * width + nc <= m.len())
    );
    for (r, t) in tiles.enumerate() {
        let (y0, x0) = (2 * (t / plan.tw), 2 * (t % plan.tw));
        // Where channel c0 of each output pixel of the tile is, for those inside the image
        // (the last row or column of tiles may hang over an odd-sized edge).
        let pix: [Option<usize>; 4] = std::array::from_fn(|q| {
            let (oy, ox) = (y0 + q / 2, x0 + q % 2);
            (oy < plan.h && ox < plan.w)
                .then(|| ((img * plan.h + oy) * plan.w + ox) * cout + chans.start)
        });
        let src = m[r * width..].as_ptr();
        let mut c = 0;
        // SAFETY: `src + ξ * stride` points at `nc` floats of `m` for ξ < 16 (asserted above),
        // c + L <= nc, and the items' tiles and channel ranges are disjoint.
        unsafe {
            while c + 8 <= nc {
                transform_out::<8>(src.add(c), stride, &pix, c, &base[c..c + 8], out, ep);
                c += 8;
            }
            while c < nc {
                transform_out::<1>(src.add(c), stride, &pix, c, &base[c..c + 1], out, ep);
                c += 1;
            }
        }
    }
}

/// Aᵀ M A on `L` channels, `M[ξ]` at `m + ξ * stride`, stored into channels `c..c + L` after
/// the offsets `pix` of the tile's pixels, `base` being the bias and time embedding there.
/// Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
///
/// # Safety
/// `m + ξ * stride` must be valid for reading `L` floats for ξ < 16, and no other thread may
/// access the output elements written.
#[inline(always)]
unsafe fn transform_out<const L: usize>(
    m: *const f32,
    stride: usize,
    pix: &[Option<usize>; 4],
    c: usize,
    base: &[f32],
    out: &Shared,
    ep: Epilogue,
) {
    // SAFETY: the caller's promise.
    let mv: [[f32; L]; 16] =
        std::array::from_fn(|q| unsafe { m.add(q * stride).cast::<[f32; L]>().read_unaligned() });
    let mut s = [[[0.0f32; L]; 4]; 2];
    for j in 0..4 {
        for l in 0..L {
            let (m0, m1, m2, m3) = (mv[j][l], mv[4 + j][l], mv[8 + j][l], mv[12 + j][l]);
            s[0][j][l] = m0 + m1 + m2;
            s[1][j][l] = m1 - m2 - m3;
        }
    }
    let mut y = [[0.0f32; L]; 4];
    for i in 0..2 {
        for l in 0..L {
            let s = &s[i];
            y[2 * i][l] = s[0][l] + s[1][l] + s[2][l];
            y[2 * i + 1][l] = s[1][l] - s[2][l] - s[3][l];
        }
    }
    let b: [f32; L] = base.try_into().unwrap();
    for (q, p) in pix.iter().enumerate() {
        let Some(p) = *p else { continue };
        let i = p + c;
        // SAFETY: the caller's promise.
        let o = unsafe { out.get::<L>(i) };
        match ep {
            Epilogue::Accumulate => {
                for l in 0..L {
                    o[l] += y[q][l];
                }
            }
            Epilogue::Store {
                residual, out_div, ..
            } => {
                let mut v = y[q];
                for l in 0..L {
                    v[l] += b[l];
                }
                if let Some(r) = residual {
                    for (v, r) in v.iter_mut().zip(&r[i..i + L]) {
                        *v += r;
                    }
                }
                if out_div != 1.0 {
                    for v in &mut v {
                        *v /= out_div;
                    }
                }
                *o = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::{backward_input_with, forward_with, Algorithm, ConvParams, Geometry};
    use crate::model::graph::Pad;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::uniform_lcg(seed, n, -0.5, 0.5)
    }

    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Gemm];
        if Kernel::detect() != Kernel::Gemm {
            k.push(Kernel::detect());
        }
        k
    }

    /// Max abs difference over max abs reference.
    fn rel_max(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        err / scale.max(1e-30)
    }

    /// Forward and backward against the direct path, for each kernel and epilogue.
    fn check(n: usize, h: usize, w: usize, cin: usize, cout: usize) {
        let wt = rand(cout * cin * 9, 1);
        let bias = rand(cout, 2);
        let x = rand(n * h * w * cin, 3);
        let temb = rand(n * cout, 4);
        let res = rand(n * h * w * cout, 5);
        let p = ConvParams::new(&wt, &bias, cout, cin, 3);
        let g = Geometry {
            n,
            h,
            w,
            stride: 1,
            pad: Pad::Symmetric,
        };
        let tol = 1e-5;
        for kernel in kernels() {
            let fwd =
                Weights::with_kernel(kernel, cin, cout, |t, ci, co| wt[(co * cin + ci) * 9 + t]);
            for (temb, res, div) in [(None, None, 1.0), (Some(&temb[..]), Some(&res[..]), 2.0)] {
                let mut want = vec![0.0; n * h * w * cout];
                forward_with(Algorithm::Direct, &p, &x, g, temb, res, div, &mut want);
                let mut got = vec![f32::NAN; want.len()];
                let ep = Epilogue::Store {
                    bias: Some(&bias),
                    temb,
                    residual: res,
                    out_div: div,
                };
                conv3x3(&fwd, &x, n, h, w, &mut got, ep);
                let e = rel_max(&got, &want);
                assert!(
                    e < tol,
                    "forward {n}x{h}x{w} {cin}->{cout} {kernel:?}: {e:e}"
                );
            }

            let bwd = Weights::with_kernel(kernel, cout, cin, |t, co, ci| {
                wt[(co * cin + ci) * 9 + 8 - t]
            });
            let dy = rand(n * h * w * cout, 6);
            for accumulate in [false, true] {
                let mut want = rand(n * h * w * cin, 7);
                let mut got = want.clone();
                backward_input_with(Algorithm::Direct, &p, &dy, g, &mut want, accumulate);
                let ep = Epilogue::gradient(accumulate);
                conv3x3(&bwd, &dy, n, h, w, &mut got, ep);
                let e = rel_max(&got, &want);
                assert!(
                    e < tol,
                    "backward {n}x{h}x{w} {cin}->{cout} {kernel:?} {accumulate}: {e:e}"
                );
            }
        }
    }

    #[test]
    fn agrees_with_the_direct_convolution() {
        check(1, 1, 1, 5, 7);
        check(1, 2, 2, 3, 16);
        check(3, 5, 7, 9, 20);
        check(2, 9, 6, 17, 33);
        check(1, 13, 16, 40, 48);
        check(2, 8, 8, 64, 32);
        // Several blocks of tiles, the last one short, and output channels in three ranges.
        check(2, 30, 21, 16, 40);
    }

    #[test]
    fn dispatch_goes_through_winograd() {
        // Same as above, through `conv`'s public entry points.
        let (n, h, w, cin, cout) = (2, 7, 10, 24, 32);
        let wt = rand(cout * cin * 9, 8);
        let p = ConvParams::new(&wt, &rand(cout, 9), cout, cin, 3);
        let g = Geometry {
            n,
            h,
            w,
            stride: 1,
            pad: Pad::Symmetric,
        };
        let x = rand(n * h * w * cin, 10);
        let mut a = vec![0.0; n * h * w * cout];
        let mut b = a.clone();
        forward_with(Algorithm::Direct, &p, &x, g, None, None, 1.0, &mut a);
        forward_with(Algorithm::Winograd, &p, &x, g, None, None, 1.0, &mut b);
        assert!(rel_max(&b, &a) < 1e-5);
        assert_ne!(
            a, b,
            "the Winograd path rounds differently, so it must have run"
        );
        let mut da = rand(x.len(), 11);
        let mut db = da.clone();
        backward_input_with(Algorithm::Direct, &p, &a, g, &mut da, true);
        backward_input_with(Algorithm::Winograd, &p, &a, g, &mut db, true);
        assert!(rel_max(&db, &da) < 1e-5);
        assert_ne!(da, db);
    }

    #[test]
    fn results_do_not_depend_on_threads_or_batch() {
        // Four blocks of tiles, three ranges of output channels.
        let (h, w, cin, cout) = (25, 23, 32, 48);
        let wt = rand(cout * cin * 9, 12);
        let bias = rand(cout, 13);
        let x = rand(3 * h * w * cin, 14);
        let temb = rand(3 * cout, 15);
        for kernel in kernels() {
            let u =
                Weights::with_kernel(kernel, cin, cout, |t, ci, co| wt[(co * cin + ci) * 9 + t]);
            let run = |n: usize, x: &[f32], temb: &[f32], threads: usize| {
                let mut y = vec![0.0; n * h * w * cout];
                let ep = Epilogue::Store {
                    bias: Some(&bias),
                    temb: Some(temb),
                    residual: None,
                    out_div: 1.0,
                };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| conv3x3(&u, x, n, h, w, &mut y, ep));
                y
            };
            let batch = run(3, &x, &temb, 3);
            assert_eq!(batch, run(3, &x, &temb, 1));
            let img = h * w * cin;
            let single = run(1, &x[img..2 * img], &temb[cout..2 * cout], 2);
            assert_eq!(&batch[h * w * cout..2 * h * w * cout], &single[..]);
        }
    }
}
