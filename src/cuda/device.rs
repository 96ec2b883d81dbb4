//! The device: driver checks, context and stream, kernel modules (embedded PTX or NVRTC).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::{CudaError, DeviceInfo};
use crate::kernels::{KernelText, KERNELS};

/// Headers the kernels include, for NVRTC (which has no file system view of `kernels/`).
const HEADERS: &[(&str, &str)] = &[
    (
        "ottkv_format.h",
        include_str!("../../kernels/ottkv_format.h"),
    ),
    (
        "ottkv_launch.h",
        include_str!("../../kernels/ottkv_launch.h"),
    ),
    (
        "ottkv_device.cuh",
        include_str!("../../kernels/ottkv_device.cuh"),
    ),
    (
        "attend_common.cuh",
        include_str!("../../kernels/attend_common.cuh"),
    ),
];

pub(crate) fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
    let what = what.into();
    move |e| CudaError::Driver {
        what,
        err: e.to_string(),
    }
}

/// Checks that libcuda loads and reports at least one device.
fn device_count() -> Result<i32, CudaError> {
    // SAFETY: only tries to dlopen libcuda; cudarc panics on any later call if this is false.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NoLibcuda);
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) => Err(CudaError::NoDevice),
        Err(e) => Err(driver("cuInit / cuDeviceGetCount")(e)),
    }
}

pub(super) fn probe() -> Result<DeviceInfo, CudaError> {
    let n = device_count()?;
    let ctx = CudaContext::new(0).map_err(driver("creating a context on device 0"))?;
    info_of(&ctx, n)
}

fn info_of(ctx: &Arc<CudaContext>, n: i32) -> Result<DeviceInfo, CudaError> {
    let mut ver = 0i32;
    // SAFETY: cuDriverGetVersion writes one int; libcuda is loaded (checked by device_count).
    unsafe { sys::cuDriverGetVersion(&mut ver) }
        .result()
        .map_err(driver("cuDriverGetVersion"))?;
    // SAFETY: cu_device() is the context's own, valid device.
    let mem = unsafe { cudarc::driver::result::device::total_mem(ctx.cu_device()) }
        .map_err(driver("cuDeviceTotalMem"))?;
    Ok(DeviceInfo {
        name: ctx.name().map_err(driver("cuDeviceGetName"))?,
        compute_capability: ctx
            .compute_capability()
            .map_err(driver("compute capability"))?,
        total_memory_bytes: mem,
        device_count: n,
        driver_version: ver,
    })
}

/// One CUDA device with its stream and the kernel modules loaded so far.
pub struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Synchronize and check the error state after every launch (tests; off for benchmarks).
    checked: bool,
    sm_count: u32,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("checked", &self.checked)
            .finish()
    }
}

impl Device {
    /// Device 0, or why there is none. Launches are checked (synchronized) when
    /// `OTTKV_CUDA_SYNC=1` or in debug builds; see [`Self::set_checked`].
    pub fn new() -> Result<Arc<Self>, CudaError> {
        device_count()?;
        let ctx = CudaContext::new(0).map_err(driver("creating a context on device 0"))?;
        // One stream for everything: kernels and copies are ordered, so cudarc's per-buffer
        // event tracking (meant for several streams) is only overhead.
        // SAFETY: no other stream of this context ever touches our buffers.
        unsafe { ctx.disable_event_tracking() };
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("multiprocessor count"))?
            .max(1) as u32;
        let stream = ctx.default_stream();
        let checked =
            cfg!(debug_assertions) || std::env::var("OTTKV_CUDA_SYNC").as_deref() == Ok("1");
        Ok(Arc::new(Self {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            checked,
            sm_count,
        }))
    }

    /// Synchronize after every launch and report the first failing kernel by name.
    pub fn set_checked(self: &mut Arc<Self>, on: bool) {
        if let Some(d) = Arc::get_mut(self) {
            d.checked = on;
        }
    }

    pub fn checked(&self) -> bool {
        self.checked
    }

    pub fn info(&self) -> Result<DeviceInfo, CudaError> {
        info_of(&self.ctx, device_count()?)
    }

    pub(crate) fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(driver("synchronizing the stream"))
    }

    /// A kernel of an embedded module, loading (and for source, compiling) it once.
    pub(crate) fn function(
        &self,
        module: &'static str,
        kernel: &'static str,
    ) -> Result<CudaFunction, CudaError> {
        let m = {
            let mut mods = self
                .modules
                .lock()
                .map_err(|_| CudaError::MissingModule(format!("{module} (lock poisoned)")))?;
            match mods.get(module) {
                Some(m) => m.clone(),
                None => {
                    let m = self.load(module)?;
                    mods.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(kernel)
            .map_err(driver(format!("loading kernel {kernel} from {module}")))
    }

    fn load(&self, module: &'static str) -> Result<Arc<CudaModule>, CudaError> {
        let text = KERNELS
            .iter()
            .find(|(n, _)| *n == module)
            .map(|(_, t)| *t)
            .ok_or_else(|| CudaError::MissingModule(module.to_string()))?;
        let ptx = match text {
            KernelText::Ptx { text, .. } => Ptx::from_src(text),
            KernelText::Source(src) => self.compile(module, src)?,
        };
        self.ctx
            .load_module(ptx)
            .map_err(driver(format!("loading module {module}")))
    }

    /// NVRTC: the source with our headers pasted in (NVRTC sees no include directory, and has
    /// no `<stdint.h>`), compiled for this device's architecture.
    fn compile(&self, module: &str, src: &str) -> Result<Ptx, CudaError> {
        // SAFETY: only tries to dlopen libnvrtc; cudarc panics on use if it is absent.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::Nvrtc {
                module: module.to_string(),
                log: "libnvrtc not found (this build embeds kernel source: build with nvcc on \
                      PATH or OTTKV_NVCC set to embed PTX instead)"
                    .into(),
            });
        }
        let (major, minor) = self
            .ctx
            .compute_capability()
            .map_err(driver("compute capability"))?;
        let full = inline_headers(src);
        let opts = CompileOptions {
            options: vec![
                format!("--gpu-architecture=compute_{major}{minor}"),
                "-std=c++17".into(),
            ],
            name: Some(format!("{module}.cu")),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(full, opts).map_err(|e| CudaError::Nvrtc {
            module: module.to_string(),
            log: match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            },
        })
    }
}

/// Replaces `#include "x"` of our headers by their text (each once) and `<stdint.h>` by the
/// fixed-width typedefs it would give on every CUDA target.
pub(crate) fn inline_headers(src: &str) -> String {
    let mut done: Vec<&str> = Vec::new();
    let mut out = String::from(
        "typedef unsigned char uint8_t; typedef unsigned short uint16_t;\n\
         typedef unsigned int uint32_t; typedef unsigned long long uint64_t;\n\
         typedef signed char int8_t; typedef short int16_t; typedef int int32_t;\n\
         typedef long long int64_t;\n",
    );
    paste(src, &mut done, &mut out);
    out
}

fn paste<'a>(src: &'a str, done: &mut Vec<&'a str>, out: &mut String) {
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with("#include") && t.contains("<stdint.h>") {
            continue;
        }
        let quoted = t
            .strip_prefix("#include")
            .map(str::trim)
            .and_then(|r| r.strip_prefix('"'))
            .and_then(|r| r.split('"').next());
        if let Some(name) = quoted {
            if let Some((n, text)) = HEADERS.iter().find(|(n, _)| *n == name) {
                if !done.contains(n) {
                    done.push(n);
                    paste(text, done, out);
                }
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_pasted_once_and_stdint_replaced() {
        let s =
            inline_headers("#include \"ottkv_format.h\"\n#include \"ottkv_format.h\"\nint x;\n");
        assert_eq!(s.matches("#define OTTKV_FORMAT_H").count(), 1);
        assert!(!s.contains("<stdint.h>"));
        assert!(s.ends_with("int x;\n"));
    }

    /// NVRTC has no include path: every quoted include of every kernel must be one of ours.
    #[test]
    fn every_kernel_include_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cu") {
                let s = inline_headers(&std::fs::read_to_string(&p).unwrap());
                assert!(
                    !s.contains("#include"),
                    "{}: unresolved include",
                    p.display()
                );
            }
        }
    }
}
