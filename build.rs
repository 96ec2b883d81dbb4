//! Build script: bindgen over the cache layout header, and (feature `cuda`) the kernels.
//!
//! It reruns only when the header, a kernel, this file or the nvcc choice changes, so the
//! expensive llama.cpp build of `llama-cpp-sys-2` never reruns because of us.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const FORMAT_HEADER: &str = "kernels/ottkv_format.h";
/// Kernel argument structs (feature `cuda`), shared by the kernels and src/cuda.
const LAUNCH_HEADER: &str = "kernels/ottkv_launch.h";
/// The GPU machines run driver 580 (CUDA 13.0): PTX newer than ISA 9.0 will not load there.
const PTX_ARCH: &str = "compute_90";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={FORMAT_HEADER}");
    println!("cargo:rerun-if-env-changed=OTTKV_NVCC");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    bindgen::Builder::default()
        .header(FORMAT_HEADER)
        .allowlist_type("ottkv_.*")
        .allowlist_var("OTTKV_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {FORMAT_HEADER}: {e} (is libclang installed? run scripts/setup.sh)"))
        .write_to_file(out.join("ottkv_format.rs"))
        .expect("writing ottkv_format.rs");

    let kernels = kernel_sources();
    for k in &kernels {
        println!("cargo:rerun-if-changed={}", k.display());
    }
    let embedded = if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rerun-if-changed={LAUNCH_HEADER}");
        bindgen::Builder::default()
            .header(LAUNCH_HEADER)
            .clang_arg("-Ikernels")
            .allowlist_type("ottkv_.*_args")
            .allowlist_var("OTTKV_.*")
            .derive_default(true)
            .layout_tests(false)
            .generate()
            .unwrap_or_else(|e| panic!("bindgen failed on {LAUNCH_HEADER}: {e}"))
            .write_to_file(out.join("ottkv_launch.rs"))
            .expect("writing ottkv_launch.rs");
        embed_kernels(&kernels, &out)
    } else {
        Vec::new()
    };
    write_kernel_table(&embedded, &out);
    write_pkg_config(&out);
}

/// `ottkv.pc` beside the built libraries (target/<profile>/), so that C programs build with
/// `PKG_CONFIG_PATH=target/release cc prog.c $(pkg-config --cflags --libs ottkv)`.
///
/// Cflags: the repo's include/ (ottkv.h) and the ggml headers that llama-cpp-sys-2 installed
/// into its OUT_DIR (it declares `links = "llama"` and prints `cargo:root=<its OUT_DIR>`, which
/// reaches us as DEP_LLAMA_ROOT; nothing is copied). Libs: the static library by full path
/// (`-lottkv` would pick the cdylib, which does not export ggml), then what it needs from the
/// system: libstdc++ for ggml/llama.cpp, and Rust std's usual set (gcc_s, util, rt, pthread, m,
/// dl, c). Written only when its text changes, so nothing downstream sees a new mtime.
fn write_pkg_config(out: &Path) {
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let Some(profile_dir) = out.ancestors().nth(3) else {
        println!(
            "cargo:warning=ottkv: unexpected OUT_DIR {}; no ottkv.pc",
            out.display()
        );
        return;
    };
    let repo = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let mut cflags = format!("-I{}", repo.join("include").display());
    match env::var_os("DEP_LLAMA_ROOT").map(|r| PathBuf::from(r).join("include")) {
        Some(inc) if inc.join("ggml.h").is_file() => {
            cflags.push_str(&format!(" -I{}", inc.display()));
        }
        _ => println!(
            "cargo:warning=ottkv: ggml headers not found under DEP_LLAMA_ROOT; ottkv.pc has no ggml include dir"
        ),
    }
    let text = format!(
        "# Written by ottkv's build.rs; points into this checkout's target/ dir.\n\
         libdir={lib}\n\n\
         Name: ottkv\n\
         Description: 2-bit KV cache with outlier-token tracing (C ABI, bundles ggml {ggml})\n\
         Version: {ver}\n\
         Cflags: {cflags}\n\
         Libs: ${{libdir}}/libottkv.a -lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc\n",
        lib = profile_dir.display(),
        ggml = "0.26.0",
        ver = env::var("CARGO_PKG_VERSION").unwrap_or_default(),
    );
    let pc = profile_dir.join("ottkv.pc");
    if fs::read_to_string(&pc).ok().as_deref() != Some(text.as_str()) {
        if let Err(e) = fs::write(&pc, text) {
            println!("cargo:warning=ottkv: writing {}: {e}", pc.display());
        }
    }
}

/// `kernels/*.cu`, sorted so the generated table is stable.
fn kernel_sources() -> Vec<PathBuf> {
    println!("cargo:rerun-if-changed=kernels");
    let mut v: Vec<PathBuf> = fs::read_dir("kernels")
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                // Headers included by the kernels count as kernel changes too.
                .inspect(|p| println!("cargo:rerun-if-changed={}", p.display()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

enum Embedded {
    Ptx {
        name: String,
        file: PathBuf,
        isa: String,
    },
    Source {
        name: String,
        file: PathBuf,
    },
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("OTTKV_NVCC") {
        return Some(PathBuf::from(p));
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

fn embed_kernels(kernels: &[PathBuf], out: &Path) -> Vec<Embedded> {
    let nvcc = find_nvcc();
    match &nvcc {
        Some(n) => println!(
            "cargo:warning=ottkv: compiling {} CUDA kernel(s) to PTX ({PTX_ARCH}) with {}",
            kernels.len(),
            n.display()
        ),
        None => println!(
            "cargo:warning=ottkv: nvcc not found (set OTTKV_NVCC or put nvcc on PATH); embedding {} kernel source(s) for NVRTC at run time",
            kernels.len()
        ),
    }
    let include = fs::canonicalize("kernels").expect("kernels/ exists");
    kernels
        .iter()
        .map(|src| {
            let name = src.file_stem().unwrap().to_string_lossy().into_owned();
            let src_abs = fs::canonicalize(src).expect("kernel path");
            let Some(nvcc) = &nvcc else {
                return Embedded::Source {
                    name,
                    file: src_abs,
                };
            };
            let ptx = out.join(format!("{name}.ptx"));
            let status = Command::new(nvcc)
                .args(["--ptx", "-O3", "-std=c++17"])
                .arg(format!("-arch={PTX_ARCH}"))
                .arg("-I")
                .arg(&include)
                .arg("-o")
                .arg(&ptx)
                .arg(&src_abs)
                .status()
                .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
            assert!(status.success(), "nvcc failed on {}", src.display());
            let text = fs::read_to_string(&ptx).expect("reading PTX");
            let isa = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(".version "))
                .unwrap_or("unknown")
                .trim()
                .to_string();
            Embedded::Ptx {
                name,
                file: ptx,
                isa,
            }
        })
        .collect()
}

/// `kernels.rs`: the table `src/cuda` loads modules from.
fn write_kernel_table(embedded: &[Embedded], out: &Path) {
    let mut s = String::from(
        "/// Kernels embedded at build time: (module name, how, text).\n\
         pub const KERNELS: &[(&str, KernelText)] = &[\n",
    );
    for e in embedded {
        match e {
            Embedded::Ptx { name, file, isa } => s.push_str(&format!(
                "    ({name:?}, KernelText::Ptx {{ isa: {isa:?}, text: include_str!({:?}) }}),\n",
                file.display().to_string()
            )),
            Embedded::Source { name, file } => s.push_str(&format!(
                "    ({name:?}, KernelText::Source(include_str!({:?}))),\n",
                file.display().to_string()
            )),
        }
    }
    s.push_str("];\n");
    fs::write(out.join("kernels.rs"), s).expect("writing kernels.rs");
}
