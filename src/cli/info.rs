//! `ottkv info [--json]`: the build facts a bug report needs, and whether CUDA works here.

use serde::Serialize;

use crate::error::Result;
use crate::kernels::{KernelText, KERNELS};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Kernel {
    module: &'static str,
    /// "ptx" (compiled by nvcc at build time) or "nvrtc-source" (compiled at run time).
    embedded: &'static str,
    /// The PTX `.version` (ISA) line; absent for NVRTC source.
    ptx_isa: Option<&'static str>,
}

#[derive(Serialize)]
struct Cuda {
    available: bool,
    /// Why not, when not available.
    reason: Option<String>,
    device: Option<crate::cuda::DeviceInfo>,
}

#[derive(Serialize)]
struct Report {
    version: &'static str,
    ggml_version: String,
    features: Vec<&'static str>,
    format_version: u32,
    /// How the CUDA kernels are embedded; "none" without the `cuda` feature.
    kernels_embedded: &'static str,
    kernels: Vec<Kernel>,
    cuda: Cuda,
}

fn report() -> Report {
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "serve") {
        features.push("serve");
    }
    let kernels: Vec<Kernel> = KERNELS
        .iter()
        .map(|(name, k)| match k {
            KernelText::Ptx { isa, .. } => Kernel {
                module: name,
                embedded: "ptx",
                ptx_isa: Some(isa),
            },
            KernelText::Source(_) => Kernel {
                module: name,
                embedded: "nvrtc-source",
                ptx_isa: None,
            },
        })
        .collect();
    let kernels_embedded = match (kernels.first(), kernels.iter().all(|k| k.embedded == "ptx")) {
        (None, _) => "none",
        (Some(_), true) => "ptx",
        (Some(_), false) if kernels.iter().all(|k| k.embedded == "nvrtc-source") => "nvrtc-source",
        _ => "mixed",
    };
    let cuda = match crate::cuda::probe() {
        Ok(d) => Cuda {
            available: true,
            reason: None,
            device: Some(d),
        },
        Err(e) => Cuda {
            available: false,
            reason: Some(e.to_string()),
            device: None,
        },
    };
    Report {
        version: env!("CARGO_PKG_VERSION"),
        ggml_version: crate::ggml::version(),
        features,
        format_version: crate::format::FORMAT_VERSION,
        kernels_embedded,
        kernels,
        cuda,
    }
}

pub fn run(a: &Args) -> Result<()> {
    let r = report();
    if a.json {
        let s = serde_json::to_string_pretty(&r).map_err(|source| crate::Error::Json {
            what: "the report",
            source,
        })?;
        println!("{s}");
        return Ok(());
    }
    println!("ottkv {}", r.version);
    println!("ggml {}", r.ggml_version);
    let feats = if r.features.is_empty() {
        "(none)".to_string()
    } else {
        r.features.join(", ")
    };
    println!("features: {feats}");
    println!("cache format version: {}", r.format_version);
    println!("kernels: {}", r.kernels_embedded);
    for k in &r.kernels {
        match k.ptx_isa {
            Some(isa) => println!("  {}: PTX, ISA {isa}", k.module),
            None => println!("  {}: source, compiled by NVRTC at run time", k.module),
        }
    }
    match (&r.cuda.device, &r.cuda.reason) {
        (Some(d), _) => println!(
            "cuda: {} (compute {}.{}, {:.1} GiB, {} device(s), driver {}.{})",
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.total_memory_bytes as f64 / (1u64 << 30) as f64,
            d.device_count,
            d.driver_version / 1000,
            d.driver_version % 1000 / 10
        ),
        (None, Some(why)) => println!("cuda: not available: {why}"),
        (None, None) => println!("cuda: not available"),
    }
    Ok(())
}
