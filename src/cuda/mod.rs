//! CUDA side of the cache (DESIGN.md §8): kernels in `kernels/*.cu`, host code here.
//!
//! This module always builds. Without the `cuda` feature it only reports why there is no
//! device ([`CudaError::NotCompiled`]), so callers and `ottkv info` need no `cfg` of their own.
//! With the feature, every driver call is preceded by `is_culib_present()` (cudarc panics when
//! libcuda is missing) and every failure comes back as a [`CudaError`], never as a panic.

#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
mod cache;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod f16_attend;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
mod ott_attend;
#[cfg(feature = "cuda")]
mod ott_flush;

#[cfg(feature = "cuda")]
pub use cache::{CudaHeadState, CudaOttCache};
#[cfg(feature = "cuda")]
pub use device::Device;
#[cfg(feature = "cuda")]
pub use f16_attend::{f16_attend_ref, F16Attention};

use serde::Serialize;

/// Why a CUDA operation failed. Every variant names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("ottkv was built without the `cuda` feature")]
    NotCompiled,
    #[error("libcuda not found (no NVIDIA driver on this machine)")]
    NoLibcuda,
    #[error("the CUDA driver reports no device")]
    NoDevice,
    #[error("CUDA driver: {what}: {err}")]
    Driver { what: String, err: String },
    #[error("NVRTC could not compile kernel module {module}: {log}")]
    Nvrtc { module: String, log: String },
    #[error("kernel module {0} is not embedded in this build")]
    MissingModule(String),
    #[error("kernel {kernel}: {err}")]
    Launch { kernel: &'static str, err: String },
    #[error("CUDA cache: {0}")]
    Shape(String),
    #[error("not supported by the CUDA cache yet: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// What `probe` found: the first device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    pub device_count: i32,
    pub driver_version: i32,
}

/// Looks for a CUDA device without ever panicking: the first device's facts, or exactly why
/// there is none.
pub fn probe() -> Result<DeviceInfo, CudaError> {
    #[cfg(feature = "cuda")]
    {
        device::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(CudaError::NotCompiled)
    }
}
