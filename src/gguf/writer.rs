//! In-memory GGUF builder producing files with gguf.cpp's layout: header,
//! KV pairs, tensor infos, zero padding to the alignment, then each tensor's
//! data zero-padded to the alignment, packed in insertion order (the only
//! layout gguf.cpp accepts).
//!
//! Everything `parse` would reject is rejected at `add_*` time, so output
//! always parses. Nested arrays are encodable (GGUF allows them) but
//! llama.cpp refuses to load them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::error::{GgufError, Result};
use super::header::Gguf;
use super::parse::{
    align_up, check_alignment, element_count, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS, MAX_KV, MAX_STRING_LEN, MAX_TENSORS,
    MAX_TENSOR_NAME_LEN,
};
use super::types::GgmlType;
use super::value::{Array, Value};

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    alignment: u32,
    kvs: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor>,
    tensor_index: HashMap<String, usize>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// Version 3, alignment 32, no metadata, no tensors.
    pub fn new() -> GgufWriter {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            kvs: Vec::new(),
            key_index: HashMap::new(),
            tensors: Vec::new(),
            tensor_index: HashMap::new(),
        }
    }

    /// 2 or 3; the two encode identically for little-endian files.
    pub fn set_version(&mut self, version: u32) -> Result<()> {
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        self.version = version;
        Ok(())
    }

    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Sets the alignment and records it as the `general.alignment` u32 key
    /// (replacing any earlier value), since readers learn it only from there.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<()> {
        self.alignment = check_alignment(alignment)?;
        let value = Value::U32(alignment);
        match self.key_index.get(ALIGNMENT_KEY) {
            Some(&i) => {
                if let Some(slot) = self.kvs.get_mut(i) {
                    slot.1 = value;
                }
            }
            None => self.push_kv(ALIGNMENT_KEY.to_owned(), value),
        }
        Ok(())
    }

    /// Adds a metadata pair. Adding `general.alignment` also sets the
    /// alignment, so it must be a u32 power of two.
    pub fn add_kv(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Result<()> {
        let key = key.into();
        let value = value.into();
        let invalid = |reason: String| GgufError::InvalidValue {
            key: key.clone(),
            reason,
        };
        if key.is_empty() {
            return Err(invalid("empty key".into()));
        }
        if key.len() as u64 > MAX_STRING_LEN {
            return Err(invalid(format!("key longer than {MAX_STRING_LEN} bytes")));
        }
        if self.key_index.contains_key(&key) {
            return Err(invalid("duplicate key".into()));
        }
        if self.kvs.len() as u64 >= MAX_KV {
            return Err(invalid(format!("more than {MAX_KV} keys")));
        }
        check_value(&value).map_err(invalid)?;
        if key == ALIGNMENT_KEY {
            match value {
                Value::U32(a) => self.alignment = check_alignment(a)?,
                ref other => {
                    return Err(GgufError::BadAlignment {
                        reason: format!(
                            "'{ALIGNMENT_KEY}' has type {}, must be u32",
                            other.value_type()
                        ),
                    })
                }
            }
        }
        self.push_kv(key, value);
        Ok(())
    }

    /// Replaces the value of `key` in place (keeping its position in the file), or adds it.
    pub fn set_kv(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Result<()> {
        let key = key.into();
        let Some(&i) = self.key_index.get(&key) else {
            return self.add_kv(key, value);
        };
        let value = value.into();
        check_value(&value).map_err(|reason| GgufError::InvalidValue {
            key: key.clone(),
            reason,
        })?;
        if key == ALIGNMENT_KEY {
            match value {
                Value::U32(a) => self.alignment = check_alignment(a)?,
                ref other => {
                    return Err(GgufError::BadAlignment {
                        reason: format!(
                            "'{ALIGNMENT_KEY}' has type {}, must be u32",
                            other.value_type()
                        ),
                    })
                }
            }
        }
        if let Some(slot) = self.kvs.get_mut(i) {
            slot.1 = value;
        }
        Ok(())
    }

    /// Removes `key`; whether it was there. Removing `general.alignment` restores the default.
    pub fn remove_kv(&mut self, key: &str) -> bool {
        let Some(i) = self.key_index.remove(key) else {
            return false;
        };
        self.kvs.remove(i);
        for (k, v) in self.key_index.iter_mut() {
            if *v > i {
                *v -= 1;
            }
            debug_assert!(self.kvs[*v].0 == *k);
        }
        if key == ALIGNMENT_KEY {
            self.alignment = DEFAULT_ALIGNMENT;
        }
        true
    }

    /// The value of `key`, if added.
    pub fn kv(&self, key: &str) -> Option<&Value> {
        self.key_index
            .get(key)
            .and_then(|&i| self.kvs.get(i))
            .map(|(_, v)| v)
    }

    /// Names of the tensors, in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Replaces a tensor's shape, type and data, keeping its name and position; the same
    /// checks as [`Self::add_tensor`].
    pub fn replace_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: GgmlType,
        data: impl Into<Vec<u8>>,
    ) -> Result<()> {
        let i = *self
            .tensor_index
            .get(name)
            .ok_or_else(|| GgufError::TensorNotFound {
                name: name.to_owned(),
            })?;
        // Validate through add_tensor on an empty writer so the rules live in one place.
        let mut probe = GgufWriter::new();
        probe.add_tensor(name, dims, ggml_type, data)?;
        let t = probe
            .tensors
            .pop()
            .ok_or_else(|| GgufError::TensorNotFound {
                name: name.to_owned(),
            })?;
        self.tensors[i] = t;
        Ok(())
    }

    /// Removes a tensor; whether it was there.
    pub fn remove_tensor(&mut self, name: &str) -> bool {
        let Some(i) = self.tensor_index.remove(name) else {
            return false;
        };
        self.tensors.remove(i);
        for v in self.tensor_index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        true
    }

    /// A writer holding everything `g` (parsed from `bytes`) holds: version, alignment,
    /// metadata in order and tensors with their data, laid out anew in gguf.cpp's packing.
    pub fn from_gguf(g: &Gguf, bytes: &[u8]) -> Result<GgufWriter> {
        let mut w = GgufWriter::new();
        w.set_version(g.version())?;
        for (k, v) in g.metadata() {
            w.add_kv(k, v.clone())?;
        }
        for t in g.tensors() {
            w.add_tensor(
                &t.name,
                &t.dims,
                t.ggml_type,
                g.tensor_data(bytes, &t.name)?,
            )?;
        }
        Ok(w)
    }

    fn push_kv(&mut self, key: String, value: Value) {
        self.key_index.insert(key.clone(), self.kvs.len());
        self.kvs.push((key, value));
    }

    /// Adds a tensor; `dims` is ne, innermost first (0 to 4 entries), and
    /// `data` must be exactly the size the shape and type imply.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
        data: impl Into<Vec<u8>>,
    ) -> Result<()> {
        let name = name.into();
        let invalid = |reason: String| GgufError::InvalidValue {
            key: format!("tensor '{name}'"),
            reason,
        };
        if name.len() as u64 > MAX_TENSOR_NAME_LEN {
            return Err(invalid(format!(
                "name is {} bytes, limit is {MAX_TENSOR_NAME_LEN}",
                name.len()
            )));
        }
        if self.tensor_index.contains_key(&name) {
            return Err(invalid("duplicate tensor name".into()));
        }
        if self.tensors.len() as u64 >= MAX_TENSORS {
            return Err(invalid(format!("more than {MAX_TENSORS} tensors")));
        }
        if dims.len() > MAX_DIMS as usize {
            return Err(invalid(format!(
                "{} dimensions, at most {MAX_DIMS} allowed",
                dims.len()
            )));
        }
        let overflow = || GgufError::DimsOverflow {
            tensor: name.clone(),
            dims: dims.to_vec(),
        };
        let n_elements = element_count(dims).ok_or_else(overflow)?;
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % ggml_type.block_size() != 0 {
            return Err(GgufError::RowNotBlockMultiple {
                tensor: name,
                ggml_type,
                ne0,
                block_size: ggml_type.block_size(),
            });
        }
        let expected = ggml_type.bytes_for(n_elements).ok_or_else(overflow)?;
        let data = data.into();
        if data.len() as u64 != expected {
            return Err(GgufError::DataSizeMismatch {
                tensor: name,
                expected,
                actual: data.len() as u64,
            });
        }
        self.tensor_index.insert(name.clone(), self.tensors.len());
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        Ok(())
    }

    /// Data-section offsets of each tensor, in insertion order.
    fn tensor_offsets(&self) -> Vec<u64> {
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut next: u64 = 0;
        for t in &self.tensors {
            offsets.push(next);
            // In-memory sizes are far below u64::MAX, so saturation never
            // actually happens; it only keeps this function panic-free.
            let padded = align_up(t.data.len() as u64, self.alignment).unwrap_or(u64::MAX);
            next = next.saturating_add(padded);
        }
        offsets
    }

    /// Everything before the data section, padding included.
    fn header_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::new();
        out.extend_from_slice(&MAGIC);
        put_u32(&mut out, self.version);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            put_u32(&mut out, value.value_type().id());
            put_value(&mut out, value);
        }
        for (t, offset) in self.tensors.iter().zip(self.tensor_offsets()) {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.ggml_type.id());
            put_u64(&mut out, offset);
        }
        pad_to(&mut out, self.alignment);
        out
    }

    fn padding_after(&self, len: usize) -> usize {
        let a = self.alignment as usize;
        (a - len % a) % a
    }

    /// The complete file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.header_bytes();
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(out.len() + self.padding_after(t.data.len()), 0);
        }
        out
    }

    /// Streams the file to `w` without building it in memory.
    pub fn write_into<W: Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.header_bytes())?;
        // [alignment] zeros, reused for every tensor's tail padding
        let zeros = vec![0u8; self.alignment as usize];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(&zeros[..self.padding_after(t.data.len())])?;
        }
        w.flush()
    }

    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        let mut w = BufWriter::new(file);
        self.write_into(&mut w).map_err(io)?;
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)
    }
}

/// Rejects what the parser would: over-long strings and arrays, too-deep
/// nesting.
fn check_value(value: &Value) -> std::result::Result<(), String> {
    match value {
        Value::String(s) => check_str(s),
        Value::Array(a) => {
            if a.depth() > MAX_ARRAY_DEPTH {
                return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
            }
            check_array(a)
        }
        _ => Ok(()),
    }
}

fn check_str(s: &str) -> std::result::Result<(), String> {
    if s.len() as u64 > MAX_STRING_LEN {
        return Err(format!("string longer than {MAX_STRING_LEN} bytes"));
    }
    Ok(())
}

fn check_array(a: &Array) -> std::result::Result<(), String> {
    if a.len() as u64 > MAX_ARRAY_LEN {
        return Err(format!("array longer than {MAX_ARRAY_LEN} elements"));
    }
    match a {
        Array::String(v) => v.iter().try_for_each(|s| check_str(s)),
        Array::Array(v) => v.iter().try_for_each(check_array),
        _ => Ok(()),
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn pad_to(out: &mut Vec<u8>, alignment: u32) {
    let a = alignment as usize;
    let pad = (a - out.len() % a) % a;
    out.resize(out.len() + pad, 0);
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// Element type, count, elements. Nested arrays repeat this per element.
fn put_array(out: &mut Vec<u8>, a: &Array) {
    put_u32(out, a.elem_type().id());
    put_u64(out, a.len() as u64);
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
    }
}
