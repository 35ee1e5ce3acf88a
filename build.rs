//! Compiles `kernels/*.cu` into fatbins embedded in the crate, and writes
//! `$OUT_DIR/cuda_kernels.rs` listing them and the targets they hold.
//!
//! The targets are fixed, never read off a GPU (a build machine usually has none): SASS for
//! `sm_90` and `sm_90a` plus `compute_90` PTX for later chips, and more SASS targets from
//! `INVDIFF_CUDA_ARCHS` (e.g. `80,89`). nvcc is looked for in `NVCC`, `$CUDA_HOME/bin`,
//! `$CUDA_PATH/bin`, then `PATH`. Without nvcc the crate builds CPU-only, with a warning that
//! says how to get one (`scripts/install_nvcc.sh`). A kernel that fails to compile fails the
//! build with nvcc's message.
//!
//! Modules in [`SM90A_ONLY`] use Hopper's arch-specific instructions (wgmma): they are compiled
//! for `sm_90a` alone and listed apart (`SM90A_FATBINS`), for the host to load on compute
//! capability 9.0 only.
//!
//! Flags: `-O3`, no `--use_fast_math` (it would swap expf, division and sqrt for approximations
//! and flush denormals, moving results further from the CPU reference than a few ulp); nvcc's
//! default FMA contraction stays on. `-lineinfo` costs nothing at run time and lets profilers
//! map samples to source lines.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

/// Kernel modules (file stems) that only exist as `sm_90a` machine code.
const SM90A_ONLY: &[&str] = &["conv_wgmma"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "INVDIFF_CUDA_ARCHS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));

    let mut sources: Vec<PathBuf> = fs::read_dir(manifest.join("kernels"))
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();

    let (gencode, targets) = targets();
    let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned());
    let (sm90a, portable): (Vec<PathBuf>, Vec<PathBuf>) = sources
        .into_iter()
        .partition(|p| stem(p).is_some_and(|s| SM90A_ONLY.contains(&s.as_str())));
    let (compiled, compiled_sm90a) = match find_nvcc() {
        Some(nvcc) => (
            compile_all(&nvcc, &portable, &gencode, &out_dir),
            compile_all(
                &nvcc,
                &sm90a,
                &["arch=compute_90a,code=sm_90a".to_string()],
                &out_dir,
            ),
        ),
        None => {
            println!(
                "cargo:warning=invdiff: nvcc not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH): \
                 building CPU-only. To build the CUDA kernels without a GPU, run scripts/install_nvcc.sh and \
                 set NVCC to the path it prints."
            );
            (Vec::new(), Vec::new())
        }
    };

    let list = |items: &[Module]| -> String {
        items
            .iter()
            .map(|m| {
                format!(
                    "    ({:?}, include_bytes!({:?})),\n",
                    m.name,
                    m.fatbin.display().to_string()
                )
            })
            .collect()
    };
    let mut code = String::from(
        "/// Embedded fatbins, one per `kernels/*.cu`: (module name, image).\n\
         pub static FATBINS: &[(&str, &[u8])] = &[\n",
    );
    code += &list(&compiled);
    code += "];\n\n/// Fatbins holding `sm_90a` machine code only (build.rs `SM90A_ONLY`).\n\
             pub static SM90A_FATBINS: &[(&str, &[u8])] = &[\n";
    code += &list(&compiled_sm90a);
    code +=
        "];\n\n/// GPU targets in every fatbin: `sm_XY` (machine code) and `compute_XY` (PTX).\n";
    if compiled.is_empty() {
        code += "pub const TARGETS: &[&str] = &[];\n";
    } else {
        code += &format!("pub const TARGETS: &[&str] = &{targets:?};\n");
    }
    code += "\n/// Every module's kernel entry points, as its PTX declares them: (module name, names).\n\
             #[cfg(test)]\n\
             pub static ENTRIES: &[(&str, &[&str])] = &[\n";
    for m in compiled.iter().chain(&compiled_sm90a) {
        code += &format!("    ({:?}, &{:?}),\n", m.name, m.entries);
    }
    code += "];\n";
    fs::write(out_dir.join("cuda_kernels.rs"), code).expect("write cuda_kernels.rs");
}

/// nvcc's `-gencode` arguments and the target names they produce.
fn targets() -> (Vec<String>, Vec<String>) {
    let mut gencode = vec![
        "arch=compute_90,code=sm_90".to_string(),
        "arch=compute_90a,code=sm_90a".to_string(),
        "arch=compute_90,code=compute_90".to_string(),
    ];
    let mut names = vec![
        "sm_90".to_string(),
        "sm_90a".to_string(),
        "compute_90".to_string(),
    ];
    if let Ok(extra) = env::var("INVDIFF_CUDA_ARCHS") {
        for arch in extra.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let arch = arch
                .trim_start_matches("sm_")
                .trim_start_matches("compute_");
            let valid = arch.len() >= 2
                && arch.chars().take(2).all(|c| c.is_ascii_digit())
                && arch[2..].chars().all(|c| c.is_ascii_lowercase());
            if !valid {
                panic!(
                    "INVDIFF_CUDA_ARCHS: `{arch}` is not a compute capability like 80, 89 or 90a"
                );
            }
            let name = format!("sm_{arch}");
            if !names.contains(&name) {
                gencode.push(format!("arch=compute_{arch},code=sm_{arch}"));
                names.push(name);
            }
        }
    }
    (gencode, names)
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        println!(
            "cargo:warning=invdiff: NVCC={} is not a file; looking for nvcc elsewhere",
            p.display()
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = Path::new(&root).join("bin").join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
    })
}

/// One compiled module: its name, its fatbin, and its kernels' entry points.
struct Module {
    name: String,
    fatbin: PathBuf,
    entries: Vec<String>,
}

/// Compiles the sources, a few at a time; panics (failing the build) with nvcc's output on error.
/// nvcc keeps its intermediate files for each module in a folder of its own, from whose PTX the
/// module's entry points are read (the fatbins are compressed, so the names cannot be read
/// there), then the folder is removed.
fn compile_all(
    nvcc: &Path,
    sources: &[PathBuf],
    gencode: &[String],
    out_dir: &Path,
) -> Vec<Module> {
    let parallel = thread::available_parallelism().map_or(1, |n| n.get());
    let mut compiled = Vec::new();
    for group in sources.chunks(parallel) {
        let jobs: Vec<_> = group
            .iter()
            .map(|src| {
                let name = src
                    .file_stem()
                    .expect("a .cu file has a stem")
                    .to_string_lossy()
                    .into_owned();
                let out = out_dir.join(format!("{name}.fatbin"));
                let keep = out_dir.join(format!("keep-{name}"));
                let _ = fs::remove_dir_all(&keep);
                fs::create_dir_all(&keep).expect("create nvcc's keep folder");
                let mut cmd = Command::new(nvcc);
                cmd.args([
                    "-fatbin",
                    "-O3",
                    "-std=c++17",
                    "-lineinfo",
                    "--keep",
                    "--keep-dir",
                ]);
                cmd.arg(&keep);
                for g in gencode {
                    cmd.arg("-gencode").arg(g);
                }
                cmd.arg("-o").arg(&out).arg(src);
                (name, out, keep, src, thread::spawn(move || cmd.output()))
            })
            .collect();
        for (name, fatbin, keep, src, handle) in jobs {
            match handle.join().expect("nvcc thread") {
                Ok(o) if o.status.success() => {
                    let entries = ptx_entries(&keep);
                    let _ = fs::remove_dir_all(&keep);
                    compiled.push(Module {
                        name,
                        fatbin,
                        entries,
                    })
                }
                Ok(o) => panic!(
                    "nvcc failed on {}:\n{}{}",
                    src.display(),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => panic!("could not run nvcc ({}): {e}", nvcc.display()),
            }
        }
    }
    compiled
}

/// The entry points declared in the PTX files of `dir` (`.entry name(`), sorted, each once.
fn ptx_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
        .flat_map(|p| {
            let text = fs::read_to_string(&p).unwrap_or_default();
            text.lines()
                .filter_map(|l| {
                    let rest = &l[l.find(".entry ")? + ".entry ".len()..];
                    Some(rest[..rest.find('(')?].trim().to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
