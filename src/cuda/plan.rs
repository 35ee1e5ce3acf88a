//! Memory planning: every activation, gradient and workspace of a program gets an offset in one
//! arena, such that buffers alive at the same step never overlap.
//!
//! Lifetimes come from [`Program::lifetimes`]. Placement is greedy by size (largest first, each
//! at the lowest offset that clears every already-placed buffer whose lifetime intersects its
//! own), the usual heuristic for offline interval packing; it lands close to the lower bound,
//! the largest total of buffers alive at any one step, which [`PlanStats`] reports beside it.

use super::precision::Precision;
use super::program::{KernelConfig, Program};
use crate::model::Graph;
use crate::{Error, Result};

/// Alignment of every buffer, in f32 elements (256 bytes: 16-byte vector loads, and f64
/// partial sums, are always aligned).
pub(crate) const ALIGN: usize = 64;

/// Arena offsets (in f32 elements) of a program's buffers.
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub offsets: Vec<usize>,
    /// Arena length in f32 elements.
    pub len: usize,
}

/// Sizes of a memory plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanStats {
    /// Bytes of the arena holding every activation, gradient and workspace (weights excluded).
    pub arena_bytes: usize,
    /// The most bytes alive at any one step: no placement can use less.
    pub live_peak_bytes: usize,
    /// Number of buffers the program uses.
    pub buffers: usize,
    /// Number of steps (launch groups) of the program.
    pub steps: usize,
    /// Kernel launches the steps make (a split-K convolution's reduction, a GroupNorm's three
    /// passes each count).
    pub launches: usize,
}

/// Places `lens[i]` (f32 elements, alive over steps `life[i].0 ..= life[i].1`) in one arena.
pub(crate) fn place(lens: &[usize], life: &[(usize, usize)]) -> Placement {
    let size = |i: usize| lens[i].div_ceil(ALIGN) * ALIGN;
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(size(i)), life[i].0, i));
    let mut offsets = vec![0usize; lens.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(lens.len());
    let mut len = 0;
    for &i in &order {
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| life[j].0 <= life[i].1 && life[i].0 <= life[j].1)
            .map(|&j| (offsets[j], offsets[j] + size(j)))
            .collect();
        busy.sort_unstable();
        let mut at = 0;
        for (start, end) in busy {
            if start >= at + size(i) {
                break;
            }
            at = at.max(end);
        }
        offsets[i] = at;
        len = len.max(at + size(i));
        placed.push(i);
    }
    Placement { offsets, len }
}

/// Checks that no two buffers alive at the same step overlap; the message names the pair.
pub(crate) fn check(p: &Program, pl: &Placement) -> Result<()> {
    let life = p.lifetimes();
    let lens = p.arena_lens();
    let span = |i: usize| (pl.offsets[i], pl.offsets[i] + lens[i]);
    let mut by_start: Vec<usize> = (0..p.bufs.len()).collect();
    by_start.sort_by_key(|&i| life[i].0);
    for (k, &i) in by_start.iter().enumerate() {
        for &j in &by_start[k + 1..] {
            if life[j].0 > life[i].1 {
                break;
            }
            let (a, b) = (span(i), span(j));
            if a.0 < b.1 && b.0 < a.1 {
                return Err(Error::Cuda(format!(
                    "internal: memory plan overlaps `{}` (steps {:?}) and `{}` (steps {:?})",
                    p.bufs[i].what, life[i], p.bufs[j].what, life[j]
                )));
            }
        }
        if span(i).1 > pl.len {
            return Err(Error::Cuda(format!(
                "internal: `{}` ends past the arena",
                p.bufs[i].what
            )));
        }
    }
    Ok(())
}

/// Sizes of the plan of `p` placed as `pl`.
pub(crate) fn stats(p: &Program, pl: &Placement) -> PlanStats {
    let life = p.lifetimes();
    let mut delta = vec![0isize; p.steps.len() + 1];
    for (i, len) in p.arena_lens().into_iter().enumerate() {
        let sz = (len.div_ceil(ALIGN) * ALIGN) as isize;
        delta[life[i].0] += sz;
        delta[life[i].1 + 1] -= sz;
    }
    let (mut live, mut peak) = (0isize, 0isize);
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    PlanStats {
        arena_bytes: 4 * pl.len,
        live_peak_bytes: 4 * peak as usize,
        buffers: p.bufs.len(),
        steps: p.steps.len(),
        launches: p.launches(),
    }
}

/// The memory plan of `graph` for a batch of `n` images of `h x w`, forward only or forward +
/// vector-Jacobian product (`recording`), as the CUDA backend would lay out the plain program
/// (every kernel choice off, one stream) in fp32 on a GPU with `multiprocessors` SMs (132 on
/// an H100 SXM; split-K workspaces depend on it). Needs no GPU. With the defaults' second
/// stream buffers stay placed two steps past their last use, which enlarges the arena;
/// [`CudaUnet::plan_stats`](super::CudaUnet::plan_stats) gives a network's own plan.
pub fn plan_stats(
    graph: &Graph,
    n: usize,
    h: usize,
    w: usize,
    recording: bool,
    multiprocessors: usize,
) -> Result<PlanStats> {
    let p = Program::build(graph, n, h, w, recording, multiprocessors, Precision::Fp32)?;
    let pl = place(&p.arena_lens(), &p.lifetimes());
    check(&p, &pl)?;
    Ok(stats(&p, &pl))
}

/// Builds (see [`Program::build_with`]) and places the program of one shape. With `keep` > 0
/// every buffer stays placed `keep` steps past its last use, so that a step launched beside
/// its neighbours on another stream (src/cuda/streams.rs) does not find its memory taken by
/// the next buffer: reuse that close would order the steps again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan(
    graph: &Graph,
    n: usize,
    h: usize,
    w: usize,
    recording: bool,
    sms: usize,
    precision: Precision,
    choice: KernelConfig,
    keep: usize,
) -> Result<(Program, Placement)> {
    let p = Program::build_with(graph, n, h, w, recording, sms, precision, choice)?;
    let last = p.steps.len().saturating_sub(1);
    let life: Vec<(usize, usize)> = p
        .lifetimes()
        .into_iter()
        .map(|(a, b)| (a, (b + keep).min(last)))
        .collect();
    let pl = place(&p.arena_lens(), &life);
    check(&p, &pl)?;
    Ok((p, pl))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UNetConfig;

    #[test]
    fn packing_respects_lifetimes_and_reuses_memory() {
        let lens = [100, 64, 64, 200, 10];
        let life = [(0, 1), (1, 2), (3, 4), (2, 3), (0, 4)];
        let pl = place(&lens, &life);
        for i in 0..lens.len() {
            for j in i + 1..lens.len() {
                let overlap_t = life[i].0 <= life[j].1 && life[j].0 <= life[i].1;
                let (a, b) = (
                    (pl.offsets[i], pl.offsets[i] + lens[i]),
                    (pl.offsets[j], pl.offsets[j] + lens[j]),
                );
                assert!(
                    !(overlap_t && a.0 < b.1 && b.0 < a.1),
                    "{i} and {j} overlap"
                );
            }
        }
        // Buffers 1 and 2 never live together and fit in one slot.
        assert!(
            pl.len
                < lens
                    .iter()
                    .map(|l| l.div_ceil(ALIGN) * ALIGN)
                    .sum::<usize>()
        );
    }

    /// The planner on the real network: no overlap, and peaks far under PyTorch's ~3.6 GB for
    /// forward + gradient at batch 1, 256x256.
    #[test]
    fn celebahq_plan_is_compact() {
        let g = Graph::build(&UNetConfig::celebahq_256()).unwrap();
        let fwd = plan_stats(&g, 1, 256, 256, false, 132).unwrap();
        let rec = plan_stats(&g, 1, 256, 256, true, 132).unwrap();
        let mb = |b: usize| b as f64 / (1 << 20) as f64;
        println!(
            "celebahq 256x256 batch 1: forward arena {:.1} MiB (live peak {:.1}), forward+vjp arena {:.1} MiB \
             (live peak {:.1}), {} buffers / {} steps",
            mb(fwd.arena_bytes),
            mb(fwd.live_peak_bytes),
            mb(rec.arena_bytes),
            mb(rec.live_peak_bytes),
            rec.buffers,
            rec.steps
        );
        assert!(fwd.arena_bytes >= fwd.live_peak_bytes && rec.arena_bytes >= rec.live_peak_bytes);
        assert!(fwd.arena_bytes < 256 << 20, "{fwd:?}");
        assert!(rec.arena_bytes < 2 << 30, "{rec:?}");
        assert!(
            (rec.arena_bytes as f64) < 1.25 * rec.live_peak_bytes as f64,
            "{rec:?}"
        );
    }
}
