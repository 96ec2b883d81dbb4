//! ggml's own row quantizers, so simulations of llama.cpp's quantized caches round exactly as
//! llama.cpp does (`ggml_set_rows` into a q4_0/q8_0 cache uses the CPU `from_float`).

use super::sys;
use crate::error::{Error, Result};

/// `x` in `ty`'s blocks, by ggml's CPU row quantizer (what a model file stores).
/// `x.len()` must be a whole number of the type's blocks.
pub fn quantize(ty: sys::ggml_type, x: &[f32]) -> Result<Vec<u8>> {
    Ok(quantize_with_traits(ty, x)?.0)
}

/// Quantizes `x` to `ty` with ggml's CPU row quantizer and dequantizes it back.
/// `x.len()` must be a whole number of the type's blocks.
pub fn roundtrip(ty: sys::ggml_type, x: &[f32]) -> Result<Vec<f32>> {
    let (q, to_float) = quantize_with_traits(ty, x)?;
    let mut y = vec![0f32; x.len()];
    // SAFETY: q holds exactly the bytes x.len() elements of ty take (quantize_with_traits
    // sized it); y holds x.len() floats.
    unsafe { to_float(q.as_ptr() as *const _, y.as_mut_ptr(), x.len() as i64) };
    Ok(y)
}

type ToFloat = unsafe extern "C" fn(*const std::ffi::c_void, *mut f32, i64);

fn quantize_with_traits(ty: sys::ggml_type, x: &[f32]) -> Result<(Vec<u8>, ToFloat)> {
    if ty >= sys::GGML_TYPE_COUNT {
        return Err(Error::Ggml(format!("unknown ggml type {ty}")));
    }
    // SAFETY: ty < GGML_TYPE_COUNT: these read ggml's static type tables.
    let (traits, cpu, blck, tsize) = unsafe {
        crate::ggml::log::install();
        sys::ggml_cpu_init();
        (
            &*sys::ggml_get_type_traits(ty),
            &*sys::ggml_get_type_traits_cpu(ty),
            sys::ggml_blck_size(ty) as usize,
            sys::ggml_type_size(ty),
        )
    };
    let (Some(to_float), Some(from_float)) = (traits.to_float, cpu.from_float) else {
        return Err(Error::Ggml(format!(
            "ggml type {ty} has no CPU row quantizer"
        )));
    };
    if blck == 0 || x.len() % blck != 0 {
        return Err(Error::Ggml(format!(
            "{} values are not whole blocks of {blck}",
            x.len()
        )));
    }
    // [x.len() / blck] blocks of tsize bytes
    let mut q = vec![0u8; x.len() / blck * tsize];
    // SAFETY: q holds exactly the bytes x.len() elements of ty take.
    unsafe { from_float(x.as_ptr(), q.as_mut_ptr() as *mut _, x.len() as i64) };
    Ok((q, to_float))
}
