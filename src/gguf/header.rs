//! The parsed, validated GGUF header and its typed accessors.

use std::collections::HashMap;
use std::ops::Range;

use super::error::{GgufError, Result};
use super::types::GgmlType;
use super::value::{Array, Value};

/// One tensor's description. `offset` is relative to the data section;
/// `parse` has checked that `[offset, offset + n_bytes)` lies inside the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ne, innermost (contiguous) dimension first; 0 to 4 entries.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// `ne` padded with 1s to ggml's 4 dimensions.
    pub fn ne4(&self) -> [u64; 4] {
        let mut ne = [1u64; 4];
        for (slot, &d) in ne.iter_mut().zip(&self.dims) {
            *slot = d;
        }
        ne
    }
}

/// A parsed GGUF header: metadata in file order plus tensor infos.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub(crate) version: u32,
    pub(crate) alignment: u32,
    pub(crate) data_offset: u64,
    pub(crate) file_size: u64,
    pub(crate) kvs: Vec<(String, Value)>,
    pub(crate) key_index: HashMap<String, usize>,
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) tensor_index: HashMap<String, usize>,
}

impl Gguf {
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Absolute file offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the byte slice this header was parsed from.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.kvs.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn kv_count(&self) -> usize {
        self.kvs.len()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index
            .get(key)
            .and_then(|&i| self.kvs.get(i))
            .map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.key_index.contains_key(key)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// Absolute byte range of a tensor's data.
    pub fn tensor_range(&self, name: &str) -> Result<Range<usize>> {
        let t = self.tensor(name).ok_or_else(|| GgufError::TensorNotFound {
            name: name.to_owned(),
        })?;
        let past_eof = || GgufError::TensorDataPastEof {
            tensor: name.to_owned(),
            start: self.data_offset.saturating_add(t.offset),
            end: self
                .data_offset
                .saturating_add(t.offset)
                .saturating_add(t.n_bytes),
            file_size: self.file_size,
        };
        // parse() already proved these fit; recheck instead of trusting it so
        // a Gguf paired with the wrong buffer still cannot cause a panic.
        let start = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(past_eof)?;
        let end = usize::try_from(t.n_bytes)
            .ok()
            .and_then(|n| start.checked_add(n))
            .ok_or_else(past_eof)?;
        Ok(start..end)
    }

    /// A tensor's data inside `bytes`, the buffer this header was parsed from.
    pub fn tensor_data<'a>(&self, bytes: &'a [u8], name: &str) -> Result<&'a [u8]> {
        let range = self.tensor_range(name)?;
        bytes
            .get(range.clone())
            .ok_or(GgufError::TensorDataPastEof {
                tensor: name.to_owned(),
                start: range.start as u64,
                end: range.end as u64,
                file_size: bytes.len() as u64,
            })
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_owned(),
        })
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        to_u32(key, self.require(key)?)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        to_u64(key, self.require(key)?)
    }

    pub fn get_i64(&self, key: &str) -> Result<i64> {
        to_i64(key, self.require(key)?)
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        to_f32(key, self.require(key)?)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        to_str(key, self.require(key)?)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| wrong_type(key, "bool", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&Array> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "array", v))
    }

    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| to_u32(key, v)).transpose()
    }

    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| to_u64(key, v)).transpose()
    }

    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>> {
        self.get(key).map(|v| to_f32(key, v)).transpose()
    }

    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| to_str(key, v)).transpose()
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }
}

fn wrong_type(key: &str, expected: &'static str, v: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
        found: v.value_type().name(),
    }
}

fn integer(key: &str, v: &Value) -> Result<i128> {
    v.as_integer()
        .ok_or_else(|| wrong_type(key, "an integer", v))
}

fn out_of_range(key: &str, expected: &'static str, i: i128) -> GgufError {
    GgufError::ValueOutOfRange {
        key: key.to_owned(),
        expected,
        value: i.to_string(),
    }
}

fn to_u32(key: &str, v: &Value) -> Result<u32> {
    let i = integer(key, v)?;
    u32::try_from(i).map_err(|_| out_of_range(key, "u32", i))
}

fn to_u64(key: &str, v: &Value) -> Result<u64> {
    let i = integer(key, v)?;
    u64::try_from(i).map_err(|_| out_of_range(key, "u64", i))
}

fn to_i64(key: &str, v: &Value) -> Result<i64> {
    let i = integer(key, v)?;
    i64::try_from(i).map_err(|_| out_of_range(key, "i64", i))
}

fn to_f32(key: &str, v: &Value) -> Result<f32> {
    v.as_f32().ok_or_else(|| wrong_type(key, "f32", v))
}

fn to_str<'v>(key: &str, v: &'v Value) -> Result<&'v str> {
    v.as_str().ok_or_else(|| wrong_type(key, "string", v))
}
