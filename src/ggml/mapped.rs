//! A model file's tensors as ggml tensors over its memory map: the context and the mapping in
//! one owner, so no tensor can outlive the bytes it points into.

use super::{Context, TensorId};
use crate::error::Result;
use crate::gguf::GgufFile;

pub struct MappedWeights {
    // Declared before `file`: the tensors point into the mapping, so the context goes first.
    ctx: Context,
    file: GgufFile,
}

// SAFETY: binding needs `&mut self`; through `&self` the tensors are only read (ggml reads
// weights, never writes them) and the mapping is read-only, so sharing between threads is
// sound. Context alone is not Sync because it allocates through `&self`, which this type
// never does.
unsafe impl Sync for MappedWeights {}

impl MappedWeights {
    /// Room for `n_tensors` tensors over `file`.
    pub fn new(file: GgufFile, n_tensors: usize) -> Result<Self> {
        Ok(Self {
            ctx: Context::new(Context::overhead(n_tensors + 8, 0), true)?,
            file,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Binds tensor `name` of the file (type and shape from its header) over its bytes in the
    /// mapping; `None` when the file has no such tensor.
    pub fn bind(&mut self, name: &str) -> Result<Option<TensorId>> {
        let Some(info) = self.file.gguf().tensor(name) else {
            return Ok(None);
        };
        let ne: Vec<i64> = info.dims.iter().map(|&d| d as i64).collect();
        let t = self.ctx.new_tensor(info.ggml_type.id(), &ne)?;
        let data = self.file.tensor_data(name)?;
        // SAFETY: the slice is exactly the tensor's bytes (the parser checked sizes and
        // `bind_external` checks the length again), lives in the mapping `self` owns past the
        // context (field order), and nothing writes weights.
        unsafe { t.bind_external(data)? };
        Ok(Some(t.id()))
    }
}
