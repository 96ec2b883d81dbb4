//! Kernel arguments (bindgen over `kernels/ottkv_launch.h`), checked launches, and device
//! buffers with guard regions.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::device::driver;
use super::{CudaError, Device};

pub(crate) mod sys {
    #![allow(non_camel_case_types, non_upper_case_globals, dead_code, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/ottkv_launch.rs"));
}

// SAFETY (all four): plain `repr(C)` structs of integers and floats that bindgen generated from
// the very header the kernels compile against, so host and device layouts are the same.
unsafe impl DeviceRepr for sys::ottkv_attend_args {}
unsafe impl DeviceRepr for sys::ottkv_f16_attend_args {}
unsafe impl DeviceRepr for sys::ottkv_merge_args {}
unsafe impl DeviceRepr for sys::ottkv_flush_args {}

/// Launches `module::kernel` with one by-value argument struct. With `dev.checked()` the
/// stream is synchronized afterwards so that a fault is reported against this kernel's name.
///
/// # Safety
/// Every device address inside `args` must point into a live allocation large enough for
/// what the kernel reads and writes with these arguments (the callers check shapes first).
pub(crate) unsafe fn launch<A: DeviceRepr>(
    dev: &Device,
    module: &'static str,
    kernel: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    shared_bytes: u32,
    args: &A,
) -> Result<(), CudaError> {
    let bad = |err: String| CudaError::Launch { kernel, err };
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || grid.1 > 65535 || grid.2 > 65535 {
        return Err(bad(format!("grid {grid:?} outside the device's limits")));
    }
    let f = dev.function(module, kernel)?;
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared_bytes,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(args);
    // SAFETY: the argument matches the kernel's one parameter (same header); the caller
    // guarantees the addresses inside it.
    unsafe { b.launch(cfg) }.map_err(|e| bad(e.to_string()))?;
    if dev.checked() {
        dev.stream.synchronize().map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

/// Device address of a buffer.
pub(crate) fn addr<T>(dev: &Device, s: &CudaSlice<T>) -> u64 {
    // The guard only records events, which are off (one stream, see Device::new).
    let (p, _sync) = s.device_ptr(&dev.stream);
    p
}

/// Elements of sentinel on each side of a guarded buffer.
pub(crate) const GUARD: usize = 64;

/// Element types of guarded buffers, with a sentinel a kernel never writes by chance.
pub(crate) trait Sentinel: DeviceRepr + Copy + Default + Unpin + 'static {
    fn sentinel() -> Self;
    fn same(a: Self, b: Self) -> bool;
}
impl Sentinel for u32 {
    fn sentinel() -> u32 {
        0xDEAD_BEEF
    }
    fn same(a: u32, b: u32) -> bool {
        a == b
    }
}
impl Sentinel for u16 {
    fn sentinel() -> u16 {
        0xDEAD
    }
    fn same(a: u16, b: u16) -> bool {
        a == b
    }
}
impl Sentinel for f32 {
    fn sentinel() -> f32 {
        f32::from_bits(0x7FC0_DEAD) // a NaN with a payload
    }
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits()
    }
}

/// A device buffer of `len` elements between two guard regions filled with a sentinel;
/// [`Guarded::check`] reports any write that landed in them.
pub(crate) struct Guarded<T: Sentinel> {
    buf: CudaSlice<T>,
    len: usize,
    what: &'static str,
}

impl<T: Sentinel> Guarded<T> {
    /// Zeroed payload, sentinel guards.
    pub(crate) fn new(dev: &Device, what: &'static str, len: usize) -> Result<Self, CudaError>
    where
        T: cudarc::driver::ValidAsZeroBits,
    {
        let mut buf = dev
            .stream
            .alloc_zeros::<T>(len + 2 * GUARD)
            .map_err(driver(format!("allocating {what} ({len} elements)")))?;
        let g = [T::sentinel(); GUARD];
        for at in [0, GUARD + len] {
            let mut view = buf.slice_mut(at..at + GUARD);
            dev.stream
                .memcpy_htod(&g[..], &mut view)
                .map_err(driver(format!("writing the guards of {what}")))?;
        }
        Ok(Self { buf, len, what })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// Device address of element `i` of the payload.
    pub(crate) fn addr_at(&self, dev: &Device, i: usize) -> u64 {
        debug_assert!(i <= self.len);
        addr(dev, &self.buf) + ((GUARD + i) * std::mem::size_of::<T>()) as u64
    }

    pub(crate) fn addr(&self, dev: &Device) -> u64 {
        self.addr_at(dev, 0)
    }

    /// Copies `src` to payload elements `at..at + src.len()`.
    pub(crate) fn upload(&mut self, dev: &Device, at: usize, src: &[T]) -> Result<(), CudaError> {
        if at + src.len() > self.len {
            return Err(CudaError::Shape(format!(
                "{}: upload of {} at {at} past {} elements",
                self.what,
                src.len(),
                self.len
            )));
        }
        let mut view = self.buf.slice_mut(GUARD + at..GUARD + at + src.len());
        dev.stream
            .memcpy_htod(src, &mut view)
            .map_err(driver(format!("uploading {}", self.what)))
    }

    /// Payload elements `range`.
    pub(crate) fn download(
        &self,
        dev: &Device,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<T>, CudaError> {
        if range.end > self.len || range.start > range.end {
            return Err(CudaError::Shape(format!(
                "{}: download of {range:?} past {} elements",
                self.what, self.len
            )));
        }
        if range.is_empty() {
            return Ok(Vec::new());
        }
        dev.stream
            .memcpy_dtov(&self.buf.slice(GUARD + range.start..GUARD + range.end))
            .map_err(driver(format!("downloading {}", self.what)))
    }

    /// Fails when anything was written into either guard region.
    pub(crate) fn check(&self, dev: &Device) -> Result<(), CudaError> {
        for (side, r) in [
            ("before", 0..GUARD),
            ("after", GUARD + self.len..2 * GUARD + self.len),
        ] {
            let g: Vec<T> = dev
                .stream
                .memcpy_dtov(&self.buf.slice(r))
                .map_err(driver(format!("downloading the guards of {}", self.what)))?;
            if let Some(i) = g.iter().position(|&x| !T::same(x, T::sentinel())) {
                return Err(CudaError::Launch {
                    kernel: "guard check",
                    err: format!(
                        "{}: element {i} of the guard {side} the buffer was overwritten",
                        self.what
                    ),
                });
            }
        }
        Ok(())
    }
}
