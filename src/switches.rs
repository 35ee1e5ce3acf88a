//! The `INVDIFF_*` environment variables invdiff reads, in one list, so that `invdiff doctor`
//! can show which are set and point out a misspelt one (which would otherwise be ignored in
//! silence). A test keeps the list complete against the sources.

/// One environment variable: its name, what it does, and the values it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    pub name: &'static str,
    pub what: &'static str,
    /// The values that mean something; any other leaves the default in place (`doctor`
    /// warns). Empty: any value (a path, a list, a flag whose presence counts).
    pub values: &'static [&'static str],
}

const fn switch(name: &'static str, what: &'static str) -> Switch {
    Switch {
        name,
        what,
        values: &[],
    }
}

/// A switch that reads only `values`.
const fn choice(name: &'static str, values: &'static [&'static str], what: &'static str) -> Switch {
    Switch { name, what, values }
}

const ON_OFF: &[&str] = &["0", "1"];

/// Every `INVDIFF_*` variable, build time and run time.
pub const SWITCHES: &[Switch] = &[
    switch("INVDIFF_CUDA_ARCHS", "build: extra GPU targets, e.g. 80,89"),
    switch(
        "INVDIFF_REQUIRE_KERNELS",
        "tests: fail if the build has no CUDA kernels",
    ),
    switch(
        "INVDIFF_BIN",
        "scripts/tune.sh: the binary to tune (default target/release/invdiff)",
    ),
    choice(
        "INVDIFF_CONV",
        &["direct"],
        "CPU: `direct` instead of Winograd 3x3 convolutions",
    ),
    switch(
        "INVDIFF_PROFILE",
        "CPU: print the time per kind of op after each pass",
    ),
    choice(
        "INVDIFF_NO_CUDA_GRAPH",
        &["1"],
        "GPU: `1` launches every step directly",
    ),
    choice(
        "INVDIFF_TC_PIPELINE",
        &["two"],
        "GPU: `two` selects the two-stage tensor-core kernels",
    ),
    choice("INVDIFF_WGMMA", &["0"], "GPU: `0` turns Hopper's wgmma kernels off"),
    choice(
        "INVDIFF_GN_ONE_PASS",
        ON_OFF,
        "GPU default: `0` runs every GroupNorm in three launches",
    ),
    choice(
        "INVDIFF_GN_PRODUCER_SUMS",
        ON_OFF,
        "GPU default: `0` has every GroupNorm sum its own input, not the convolution or concatenation that wrote it",
    ),
    choice(
        "INVDIFF_GN_HALF_INPUT",
        ON_OFF,
        "GPU default: `0` keeps fp32 concatenations in bf16/fp16 forwards, recording or not (by default only 16-bit ones, which their GroupNorms read)",
    ),
    choice(
        "INVDIFF_GN_HALF_INPUT_RECORDING",
        ON_OFF,
        "GPU default: `0` keeps fp32 concatenations in recording forwards (DPS, ΠGDM; by default 16-bit ones there too, their GroupNorms' backward passes reading 16 bits)",
    ),
    choice(
        "INVDIFF_GEMM_WARP_K",
        ON_OFF,
        "GPU default: `0` has the small fp32 attention products (those the 32-wide tiles would take; nothing with INVDIFF_GEMM_SMALL_TILES=0) run the 32-wide tiles instead of 16 x 32 tiles whose eight warps each multiply an eighth of K, their partial sums added in warp order (another rounding)",
    ),
    choice(
        "INVDIFF_CLASS_CONCURRENCY",
        ON_OFF,
        "GPU default: `0` keeps the parity-class launches of one convolution (an upsampling's folded convolution, a stride-2 convolution's input gradient) in order instead of side by side on the pass's streams (the same bits)",
    ),
    choice(
        "INVDIFF_GN_FROM_REDUCTION",
        ON_OFF,
        "GPU candidate: `1` has the reduction of a split convolution compute the one-pass GroupNorm of its output too, instead of a launch of its own (the 8x8 and 16x16 levels at batch 1; the same bits)",
    ),
    choice(
        "INVDIFF_NARROW_MMA",
        ON_OFF,
        "GPU candidate: `1` runs the convolutions with at most 8 outputs (conv_out's forward, conv_in's input gradient) on tensor cores over 16-bit inputs in bf16/fp16 instead of fp32 FMAs (another rounding)",
    ),
    choice(
        "INVDIFF_FEW_IN_MMA",
        ON_OFF,
        "GPU candidate: `1` runs the convolutions with at most 8 inputs (conv_in's forward, conv_out's input gradient) in bf16/fp16 programs on tensor cores, their fp32 operands split into bf16 pairs (about 4e-6 from fp32 in a numpy model), instead of fp32 FMAs",
    ),
    choice(
        "INVDIFF_TMA_STRIDED",
        ON_OFF,
        "GPU candidate: `1` has the wgmma convolutions at input stride 2 (the downsamplings, the folded upsamplings' input gradients) copy their slices with the tensor memory accelerator, through maps that step two pixels, instead of the lean loaders (the same bits, but where a launch split in two on the lean loaders then runs unsplit to stage its epilogue: another order of one sum)",
    ),
    choice(
        "INVDIFF_CLASS_HALF_COPIES",
        ON_OFF,
        "GPU candidate: `1` has the parity-class launches of a stride-2 input gradient, where each stages its epilogue, write the 16-bit copy of the gradient each at its own pixels instead of a conversion launch after them (the same bits)",
    ),
    choice(
        "INVDIFF_REDUCE_HALF_COPIES",
        ON_OFF,
        "GPU candidate: `1` has the reduction of a split bf16/fp16 convolution or linear write the 16-bit copy of its output that tensor-core launches read, instead of a conversion launch after it (the same bits)",
    ),
    choice(
        "INVDIFF_APPROX_SILU",
        ON_OFF,
        "GPU candidate: `1` has the GroupNorms of bf16/fp16 programs compute SiLU and its derivative with the approximate exponential and reciprocal of the multifunction unit (a sigmoid within about 2^-20 of the accurate one for |x| up to 16) instead of an accurate exponential and an IEEE division (another rounding)",
    ),
    choice(
        "INVDIFF_GN_BWD_SUMS_PAIRS",
        ON_OFF,
        "GPU candidate: `1` has the sums of the GroupNorm backward passes over a 16-bit input and output gradient (the up path's concatenations) take two channels a thread, 4-byte loads instead of 2-byte ones (the same bits)",
    ),
    choice(
        "INVDIFF_CONCAT_SUMS_AHEAD",
        ON_OFF,
        "GPU default: `0` has a 16-bit concatenation's GroupNorm sums over a side already written keep four pixels' loads ahead instead of eight (the same bits)",
    ),
    choice(
        "INVDIFF_GN_ADD_RESIDUAL",
        ON_OFF,
        "GPU default: `0` adds the identity shortcut's share of a residual block's input gradient in a launch of its own, instead of the GroupNorm backward pass that next adds onto that gradient (the same bits)",
    ),
    choice(
        "INVDIFF_GN_HALF_DY",
        &["0", "1", "x16"],
        "GPU default: `0` has the GroupNorm backward passes over 16-bit inputs read their output gradient in fp32 instead of as a 16-bit copy that the unsplit TMA convolution writing it writes instead of fp32 values (wgmma, bf16/fp16; the gradient carries that rounding); `1` every pass that can, `x16` the default",
    ),
    choice(
        "INVDIFF_EPI_STAGED",
        ON_OFF,
        "GPU default: `0` has unsplit TMA convolutions finish their rows from their accumulator fragments instead of through shared memory with 16-byte accesses (wgmma); also keeps INVDIFF_STAGED_UNSPLIT's two-way splits",
    ),
    choice(
        "INVDIFF_STAGED_UNSPLIT",
        ON_OFF,
        "GPU default: `0` keeps the two-way split of K of TMA convolutions (K up to 2304) instead of running them unsplit with a staged epilogue (wgmma)",
    ),
    choice(
        "INVDIFF_CONCAT_GRAD_SPLIT",
        ON_OFF,
        "GPU default: `0` has the concatenations' two adjoint launches copy their gradients out of their GroupNorm backward pass's input gradient, instead of that pass writing them",
    ),
    choice(
        "INVDIFF_SHORTCUT_FUSED",
        ON_OFF,
        "GPU default: `0` runs each residual block's 1x1 shortcut in a launch of its own instead of inside its second convolution (wgmma, bf16/fp16)",
    ),
    choice(
        "INVDIFF_GN_ILP",
        ON_OFF,
        "GPU default: `0` runs GroupNorms without loads issued ahead",
    ),
    choice(
        "INVDIFF_HALF_CONCAT",
        ON_OFF,
        "GPU default: `0` gives concatenations no 16-bit copy",
    ),
    choice(
        "INVDIFF_HALF_COPY",
        ON_OFF,
        "GPU default: `0` stages large fp32 inputs of tensor-core launches instead of converting them",
    ),
    choice(
        "INVDIFF_HALF_COPY_SMALL",
        ON_OFF,
        "GPU default: `0` converts only large fp32 inputs of tensor-core launches",
    ),
    choice(
        "INVDIFF_HALF_COPY_FUSED",
        ON_OFF,
        "GPU default: `0` converts concatenation and GroupNorm adjoints' outputs to 16 bits in launches of their own",
    ),
    choice(
        "INVDIFF_ALIAS_GRADS",
        ON_OFF,
        "GPU default: `0` copies a block's output gradient for its residual",
    ),
    choice(
        "INVDIFF_ROW_EPILOGUE",
        ON_OFF,
        "GPU default: `0` finishes tensor-core tiles without batching loads before stores",
    ),
    choice(
        "INVDIFF_ATTN_TF32",
        ON_OFF,
        "GPU candidate: `1` runs attention products on tf32 tensor cores below fp32",
    ),
    choice(
        "INVDIFF_ATTN_FLASH",
        ON_OFF,
        "GPU candidate: `1` runs attention fused (no probabilities in memory) below fp32",
    ),
    choice(
        "INVDIFF_ATTN_ROWS",
        &["0", "1", "wave"],
        "GPU candidate: `1` runs the attention below fp32 in two launches each way over rows of 16 queries instead of three forward and five backward, on tensor cores over operands split into bf16 pairs (about 17 significant bits); `wave` only where its first launch is one wave (batch 1 at celebahq's sizes)",
    ),
    choice(
        "INVDIFF_CONCAT_FROM_PRODUCERS",
        ON_OFF,
        "GPU default: `0` has the 16-bit concatenations read their sides' fp32 values instead of the unsplit TMA convolutions that produce them writing their sides themselves (wgmma, bf16/fp16)",
    ),
    choice(
        "INVDIFF_EPI_HALF_COPIES",
        ON_OFF,
        "GPU default: `0` converts the outputs of unsplit TMA convolutions that other convolutions read in 16 bits in launches of their own, instead of the convolutions writing the copies (wgmma, bf16/fp16)",
    ),
    choice(
        "INVDIFF_WGMMA_LEAN",
        ON_OFF,
        "GPU default: `0` gives the wgmma launches TMA does not take loaders of twice the instructions",
    ),
    choice(
        "INVDIFF_WGMMA_TMA",
        ON_OFF,
        "GPU default: `0` copies wgmma slices with the threads' own copies instead of the \
         tensor memory accelerator, and leaves the TMA kernels out of the selftest and the sweep",
    ),
    choice(
        "INVDIFF_EPI_PREFETCH",
        ON_OFF,
        "GPU default: `0` has wgmma launches not ask L2 for their epilogue's reads first",
    ),
    choice(
        "INVDIFF_WGMMA_TALL",
        ON_OFF,
        "GPU default: `0` gives large wgmma launches no 256-row tiles",
    ),
    choice(
        "INVDIFF_GEMM_SMALL_TILES",
        ON_OFF,
        "GPU default: `0` gives the attention products no tiles smaller than 64 x 64 (neither 32-wide nor the warp-split ones)",
    ),
    choice(
        "INVDIFF_UPSAMPLE_FOLD",
        ON_OFF,
        "GPU default: `0` never folds upsamplings into convolutions, `1` also in fp32/tf32",
    ),
    choice(
        "INVDIFF_STREAMS",
        &["1", "2", "3", "4"],
        "GPU default: independent steps on 2 streams; `1` to `4` sets the count",
    ),
];

impl Switch {
    /// Whether `value` means something to this switch (else the default stays in place).
    pub fn reads(&self, value: &str) -> bool {
        self.values.is_empty() || self.values.contains(&value)
    }
}

/// The value of switch `name` (one of [`SWITCHES`]), if set.
pub fn value(name: &str) -> Option<String> {
    debug_assert!(
        SWITCHES.iter().any(|s| s.name == name),
        "{name} is not in SWITCHES"
    );
    std::env::var(name).ok()
}

/// Whether switch `name` is set to `v`.
pub fn is(name: &str, v: &str) -> bool {
    value(name).is_some_and(|x| x == v)
}

/// The `INVDIFF_*` variables set in this process's environment: the known ones with their
/// values, and the names of unknown ones.
pub fn from_env() -> (Vec<(Switch, String)>, Vec<String>) {
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with("INVDIFF_")) else {
            continue;
        };
        match SWITCHES.iter().find(|s| s.name == name) {
            Some(s) => known.push((*s, value.to_string_lossy().into_owned())),
            None => unknown.push(name.to_string()),
        }
    }
    known.sort_by_key(|(s, _)| s.name);
    unknown.sort();
    (known, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every `"INVDIFF_..."` literal in the sources, build script and tests is in [`SWITCHES`],
    /// and every entry is read somewhere (tests/errors.rs sets misspelt names on purpose).
    #[test]
    fn the_list_matches_the_sources() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut found = std::collections::BTreeSet::new();
        let mut stack = vec![root.join("src"), root.join("tests"), root.join("build.rs")];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if p.extension().is_none_or(|e| e != "rs")
                || p.ends_with("switches.rs")
                || p.ends_with("tests/errors.rs")
            {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for (at, _) in text.match_indices("\"INVDIFF_") {
                let name: String = text[at + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                // A bare prefix is a search for the variables, not one of them.
                if name != "INVDIFF_" {
                    found.insert(name);
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            SWITCHES.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(found, listed);
    }

    /// The GPU defaults and candidates read `0` and `1` (the stream count 1 to 4, the 16-bit
    /// GroupNorm gradients `x16` too, attention in rows `wave`), as
    /// `KernelConfig::from_switches` and the launch choices do.
    #[test]
    fn defaults_and_candidates_read_zero_and_one() {
        for s in SWITCHES
            .iter()
            .filter(|s| s.what.starts_with("GPU default") || s.what.starts_with("GPU candidate"))
        {
            if s.name == "INVDIFF_STREAMS" {
                assert!(s.reads("1") && s.reads("4") && !s.reads("0") && !s.reads("5"));
            } else if s.name == "INVDIFF_GN_HALF_DY" {
                assert_eq!(s.values, ["0", "1", "x16"]);
            } else if s.name == "INVDIFF_ATTN_ROWS" {
                assert_eq!(s.values, ["0", "1", "wave"]);
            } else {
                assert_eq!(s.values, ON_OFF, "{}", s.name);
            }
        }
        let profile = SWITCHES
            .iter()
            .find(|s| s.name == "INVDIFF_PROFILE")
            .unwrap();
        assert!(profile.reads("anything"));
    }

    /// Every GPU candidate and every default is timed by the next device session and can be
    /// chosen by scripts/tune.sh: scripts/candidates.sh, which both read, has each alone (a
    /// default turned off), and scripts/device_check.sh turns every candidate on in its
    /// all-together variant (`ALL=`) and every default off in its v0.4 one (`V04=`).
    #[test]
    fn device_check_times_every_candidate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = std::fs::read_to_string(root.join("scripts/device_check.sh")).unwrap();
        let line = |start: &str| {
            script
                .lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start} line in device_check.sh"))
        };
        let (all, v04) = (line("ALL="), line("V04="));
        // CANDIDATES=( name:VAR=1,VAR=1 ... ), one entry a line.
        let list = std::fs::read_to_string(root.join("scripts/candidates.sh")).unwrap();
        let entries: Vec<&str> = list
            .lines()
            .map(str::trim)
            .skip_while(|l| !l.starts_with("CANDIDATES=("))
            .skip(1)
            .take_while(|l| *l != ")")
            .collect();
        assert!(
            !entries.is_empty() && entries.iter().all(|e| e.contains(':') && e.contains('=')),
            "{entries:?}"
        );
        for s in SWITCHES.iter().filter(|s| s.what.starts_with("GPU ")) {
            let set = format!("{}=", s.name);
            let alone = entries
                .iter()
                .filter(|v| v.contains(&set))
                .any(|v| v.matches('=').count() == 1);
            if s.what.starts_with("GPU candidate") {
                assert!(all.contains(&set), "{} is not in ALL", s.name);
                assert!(alone, "{} is not a candidate of its own", s.name);
            } else if s.what.starts_with("GPU default") {
                assert!(v04.contains(&set), "{} is not in V04", s.name);
                assert!(alone, "{} is not an entry of its own", s.name);
            }
        }
    }
}
