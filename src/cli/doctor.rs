//! `invdiff doctor`: what this build contains and what this machine offers.

use invdiff::{cuda, switches, Result};

pub fn run() -> Result<()> {
    println!("invdiff {}", env!("CARGO_PKG_VERSION"));
    println!("CPU threads: {}", rayon::current_num_threads());
    if cuda::kernels_compiled() {
        println!(
            "CUDA kernels: compiled in for {}",
            cuda::compiled_targets().join(", ")
        );
    } else {
        println!(
            "CUDA kernels: not compiled in (built without nvcc; `export NVCC=$(scripts/install_nvcc.sh)` and rebuild)"
        );
    }
    let p = cuda::probe();
    match (p.driver_present, p.driver_version) {
        (false, _) => println!("CUDA driver: not found"),
        (true, Some(v)) => println!(
            "CUDA driver: present, CUDA {}.{}",
            v / 1000,
            (v % 1000) / 10
        ),
        (true, None) => println!("CUDA driver: present"),
    }
    for d in &p.devices {
        println!(
            "GPU {}: {} (compute capability {}.{}, {} multiprocessors, {:.1} GiB, {} KB of \
             shared memory a block)",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.multiprocessors,
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.max_block_smem / 1024
        );
    }
    if let Some(e) = &p.error {
        println!("CUDA: {e}");
    }
    println!(
        "CUPTI (for bench --trace): {}",
        if cuda::cupti_present() {
            "found (it expects CUPTI 13)"
        } else {
            "not found (libcupti.so.13 on LD_LIBRARY_PATH: pip's nvidia-cuda-cupti has it)"
        }
    );
    let (set, unknown) = switches::from_env();
    if set.is_empty() {
        println!("INVDIFF_* switches: none set (defaults)");
    }
    for (s, value) in &set {
        println!("{}={value}: {}", s.name, s.what);
        if !s.reads(value) {
            println!(
                "warning: {}={value} means nothing to invdiff, so the default applies (it reads {})",
                s.name,
                s.values.join(", ")
            );
        }
    }
    for name in &unknown {
        let known: Vec<&str> = switches::SWITCHES.iter().map(|s| s.name).collect();
        println!(
            "warning: {name} is set but invdiff reads no such variable (known: {})",
            known.join(", ")
        );
    }
    // As `--device auto` decides: GPU 0, if this build has code for it.
    let auto = match p.devices.first() {
        Some(d) if cuda::kernels_run_on(d.compute_capability) => "cuda:0".to_string(),
        Some(d) if cuda::kernels_compiled() => format!(
            "the CPU (GPU 0 has compute capability {}.{}, which this build's kernels, for {}, \
             do not run on; rebuild with INVDIFF_CUDA_ARCHS={}{})",
            d.compute_capability.0,
            d.compute_capability.1,
            cuda::compiled_targets().join(", "),
            d.compute_capability.0,
            d.compute_capability.1
        ),
        _ => "the CPU".to_string(),
    };
    println!("--device auto will use: {auto}");
    Ok(())
}
