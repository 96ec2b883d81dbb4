//! GGUF v2/v3 parser over a byte slice.
//!
//! Rules follow llama.cpp's ggml/src/gguf.cpp (`gguf_init_from_file_impl`).
//! Every count is checked against both a fixed cap and the bytes actually
//! left before anything is allocated for it, and every offset/size is
//! computed with checked arithmetic, so hostile input yields an error, never
//! a panic or an oversized allocation.
//!
//! Deliberate difference from gguf.cpp: gguf.cpp insists that tensor data is
//! packed in tensor-info order with no gaps; here any aligned, in-bounds,
//! non-overlapping layout is accepted (it is just as safe to read).

use std::collections::HashMap;

use super::error::{GgufError, Result};
use super::header::{Gguf, TensorInfo};
use super::types::GgmlType;
use super::value::{Array, Value, ValueType};

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u32 = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// gguf.cpp's `GGUF_MAX_STRING_LENGTH`.
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// gguf.cpp's `GGUF_MAX_ARRAY_ELEMENTS`.
pub const MAX_ARRAY_LEN: u64 = 1 << 30;
/// Nested arrays recurse; the cap bounds stack depth. gguf.cpp allows no
/// nesting at all.
pub const MAX_ARRAY_DEPTH: u32 = 8;
/// `GGML_MAX_NAME` is 64 including the NUL terminator.
pub const MAX_TENSOR_NAME_LEN: u64 = 63;
/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Fixed caps on the header counts. gguf.cpp only bounds these by address
/// space; real models have well under 10^4 of either.
pub const MAX_TENSORS: u64 = 1 << 20;
pub const MAX_KV: u64 = 1 << 20;
/// Counts only bound capacity up to here; beyond it vectors grow by push,
/// so memory tracks bytes actually decoded rather than a claimed count
/// (the remaining-bytes bound alone would allow gigabytes in a large file).
const PREALLOC_LIMIT: u64 = 1 << 16;

fn prealloc(n: u64) -> usize {
    n.min(PREALLOC_LIMIT) as usize
}

/// Smallest possible encoding of one KV pair: key length (8) + a 1-byte key
/// (empty keys are rejected) + value type (4) + a 1-byte value.
const MIN_KV_SIZE: u64 = 8 + 1 + 4 + 1;
/// Smallest possible tensor info: name length (8) + n_dims (4) + type (4) +
/// offset (8), with an empty name and zero dims.
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

/// Parse and fully validate a GGUF file held in memory.
pub fn parse(bytes: &[u8]) -> Result<Gguf> {
    let mut r = Reader { buf: bytes, pos: 0 };

    let magic = r.array::<4>(&|| "magic".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = u32::from_le_bytes(r.array::<4>(&|| "version".into())?);
    check_version(version)?;

    let n_tensors_off = r.offset();
    let n_tensors = r.u64(&|| "tensor count".into())?;
    let n_kv_off = r.offset();
    let n_kv = r.u64(&|| "metadata kv count".into())?;
    // Bound both counts by what the rest of the file could possibly encode.
    let tensors_limit = MAX_TENSORS.min(r.remaining() / MIN_TENSOR_INFO_SIZE);
    if n_tensors > tensors_limit {
        return Err(GgufError::CountTooLarge {
            what: "tensor".into(),
            count: n_tensors,
            limit: tensors_limit,
            offset: n_tensors_off,
        });
    }
    let kv_limit = MAX_KV.min((r.remaining() - n_tensors * MIN_TENSOR_INFO_SIZE) / MIN_KV_SIZE);
    if n_kv > kv_limit {
        return Err(GgufError::CountTooLarge {
            what: "metadata kv".into(),
            count: n_kv,
            limit: kv_limit,
            offset: n_kv_off,
        });
    }

    let (kvs, key_index) = read_metadata(&mut r, n_kv)?;
    let alignment = alignment_from(&kvs, &key_index)?;
    let (tensors, tensor_index) = read_tensor_infos(&mut r, n_tensors)?;

    // gguf.cpp only seeks past the padding when there are tensors; with none,
    // the data section starts right after the header.
    let data_offset = if n_tensors > 0 {
        let pos = r.offset();
        let aligned = align_up(pos, alignment).ok_or_else(|| GgufError::Truncated {
            what: "padding before the data section".into(),
            offset: pos,
            needed: u64::from(alignment),
            available: r.remaining(),
        })?;
        let pad = aligned - pos;
        r.take(pad, &|| "padding before the data section".into())?;
        aligned
    } else {
        r.offset()
    };

    let file_size = bytes.len() as u64;
    check_tensor_layout(&tensors, alignment, data_offset, file_size)?;

    Ok(Gguf {
        version,
        alignment,
        data_offset,
        file_size,
        kvs,
        key_index,
        tensors,
        tensor_index,
    })
}

fn check_version(version: u32) -> Result<()> {
    match version {
        2 | 3 => Ok(()),
        // A little-endian reader sees v2/v3 written big-endian as
        // 0x02000000/0x03000000: low half zero, high half small.
        v if v != 0 && v & 0xFFFF == 0 => Err(GgufError::BigEndian { raw: v }),
        v => Err(GgufError::UnsupportedVersion { version: v }),
    }
}

type KvList = (Vec<(String, Value)>, HashMap<String, usize>);

fn read_metadata(r: &mut Reader<'_>, n_kv: u64) -> Result<KvList> {
    let cap = prealloc(n_kv);
    let mut kvs: Vec<(String, Value)> = Vec::with_capacity(cap);
    let mut index: HashMap<String, usize> = HashMap::with_capacity(cap);
    for i in 0..n_kv {
        let key_off = r.offset();
        let key = r.string(&|| format!("key of metadata kv #{i}"))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey {
                index: i,
                offset: key_off,
            });
        }
        if index.contains_key(&key) {
            return Err(GgufError::DuplicateKey {
                key,
                offset: key_off,
            });
        }
        let vt = r.value_type(&key)?;
        let value = r.value(vt, &key)?;
        index.insert(key.clone(), kvs.len());
        kvs.push((key, value));
    }
    Ok((kvs, index))
}

fn alignment_from(kvs: &[(String, Value)], index: &HashMap<String, usize>) -> Result<u32> {
    let Some(&i) = index.get(ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match kvs.get(i).map(|(_, v)| v) {
        Some(Value::U32(a)) => check_alignment(*a),
        Some(other) => Err(GgufError::BadAlignment {
            reason: format!(
                "'{ALIGNMENT_KEY}' has type {}, must be u32",
                other.value_type()
            ),
        }),
        None => Ok(DEFAULT_ALIGNMENT),
    }
}

pub(crate) fn check_alignment(a: u32) -> Result<u32> {
    if a.is_power_of_two() {
        Ok(a)
    } else {
        Err(GgufError::BadAlignment {
            reason: format!("'{ALIGNMENT_KEY}' = {a} is not a non-zero power of two"),
        })
    }
}

pub(crate) fn align_up(pos: u64, alignment: u32) -> Option<u64> {
    let a = u64::from(alignment);
    pos.checked_add(a - 1).map(|p| p / a * a)
}

type TensorList = (Vec<TensorInfo>, HashMap<String, usize>);

fn read_tensor_infos(r: &mut Reader<'_>, n_tensors: u64) -> Result<TensorList> {
    let cap = prealloc(n_tensors);
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(cap);
    let mut index: HashMap<String, usize> = HashMap::with_capacity(cap);
    for i in 0..n_tensors {
        let name_off = r.offset();
        let name = r.string(&|| format!("name of tensor #{i}"))?;
        if name.len() as u64 > MAX_TENSOR_NAME_LEN {
            return Err(GgufError::TensorNameTooLong {
                len: name.len() as u64,
                name,
                limit: MAX_TENSOR_NAME_LEN,
                offset: name_off,
            });
        }
        if index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor {
                name,
                offset: name_off,
            });
        }

        let n_dims_off = r.offset();
        let n_dims = r.u32(&|| format!("n_dims of tensor '{name}'"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name,
                n_dims,
                offset: n_dims_off,
            });
        }
        // [n_dims] ne, innermost first
        let mut dims: Vec<u64> = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&|| format!("dim {d} of tensor '{name}'"))?);
        }
        let n_elements = element_count(&dims).ok_or_else(|| GgufError::DimsOverflow {
            tensor: name.clone(),
            dims: dims.clone(),
        })?;

        let type_off = r.offset();
        let type_id = r.u32(&|| format!("type of tensor '{name}'"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.clone(),
            type_id,
            offset: type_off,
        })?;
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % ggml_type.block_size() != 0 {
            return Err(GgufError::RowNotBlockMultiple {
                tensor: name,
                ggml_type,
                ne0,
                block_size: ggml_type.block_size(),
            });
        }
        // ne0 is a block multiple, so n_elements is too; only overflow remains.
        let n_bytes = ggml_type
            .bytes_for(n_elements)
            .ok_or_else(|| GgufError::DimsOverflow {
                tensor: name.clone(),
                dims: dims.clone(),
            })?;
        let offset = r.u64(&|| format!("data offset of tensor '{name}'"))?;

        index.insert(name.clone(), tensors.len());
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        });
    }
    Ok((tensors, index))
}

/// Element count, or `None` if any dim or the product exceeds `i64::MAX`
/// (ggml stores `ne` as int64_t).
pub(crate) fn element_count(dims: &[u64]) -> Option<u64> {
    let max = i64::MAX as u64;
    let mut n: u64 = 1;
    for &d in dims {
        if d > max {
            return None;
        }
        n = n.checked_mul(d).filter(|&p| p <= max)?;
    }
    Some(n)
}

fn check_tensor_layout(
    tensors: &[TensorInfo],
    alignment: u32,
    data_offset: u64,
    file_size: u64,
) -> Result<()> {
    for t in tensors {
        if t.offset % u64::from(alignment) != 0 {
            return Err(GgufError::TensorOffsetMisaligned {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(_), Some(e)) if e <= file_size => {}
            _ => {
                return Err(GgufError::TensorDataPastEof {
                    tensor: t.name.clone(),
                    start: data_offset.saturating_add(t.offset),
                    end: data_offset
                        .saturating_add(t.offset)
                        .saturating_add(t.n_bytes),
                    file_size,
                })
            }
        }
    }

    // Empty tensors occupy no bytes, so they cannot overlap anything.
    // [n_nonempty] indices into `tensors`, sorted by offset
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].n_bytes > 0)
        .collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for pair in order.windows(2) {
        let (a, b) = (&tensors[pair[0]], &tensors[pair[1]]);
        // Offsets were bounds-checked above, so these sums cannot overflow.
        let a_end = a.offset + a.n_bytes;
        if b.offset < a_end {
            return Err(GgufError::TensorOverlap {
                a: a.name.clone(),
                a_start: a.offset,
                a_end,
                b: b.name.clone(),
                b_start: b.offset,
                b_end: b.offset + b.n_bytes,
            });
        }
    }
    Ok(())
}

/// Cursor over the input. `what` closures name the item being read for error
/// messages; they only run on failure.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type What<'w> = &'w dyn Fn() -> String;

impl<'a> Reader<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: What<'_>) -> Result<&'a [u8]> {
        let available = self.remaining();
        if n > available {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.offset(),
                needed: n,
                available,
            });
        }
        // n <= remaining, so neither the cast nor the sum can wrap.
        let end = self.pos + n as usize;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| GgufError::Truncated {
                what: what(),
                offset: self.offset(),
                needed: n,
                available,
            })?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: What<'_>) -> Result<String> {
        let len_off = self.offset();
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                what: what(),
                len,
                limit: MAX_STRING_LEN,
                offset: len_off,
            });
        }
        let start = self.offset();
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset: start + e.valid_up_to() as u64,
            }),
        }
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType> {
        let offset = self.offset();
        let type_id = self.u32(&|| format!("value type of key '{key}'"))?;
        ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.to_owned(),
            type_id,
            offset,
        })
    }

    fn value(&mut self, vt: ValueType, key: &str) -> Result<Value> {
        let what = || format!("value of key '{key}'");
        Ok(match vt {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(&what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(&what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            // gguf.cpp reads an int8 and treats any non-zero byte as true.
            ValueType::Bool => Value::Bool(self.array::<1>(&what)?[0] != 0),
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => Value::Array(self.array_value(key, 1)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
        })
    }

    fn array_value(&mut self, key: &str, depth: u32) -> Result<Array> {
        let type_off = self.offset();
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                key: key.to_owned(),
                limit: MAX_ARRAY_DEPTH,
                offset: type_off,
            });
        }
        let elem = self.value_type(key)?;
        let n_off = self.offset();
        let n = self.u64(&|| format!("array length of key '{key}'"))?;
        let limit = MAX_ARRAY_LEN.min(self.remaining() / elem.min_encoded_size());
        if n > limit {
            return Err(GgufError::CountTooLarge {
                what: format!("array element (key '{key}', type {elem})"),
                count: n,
                limit,
                offset: n_off,
            });
        }
        let what = || format!("array data of key '{key}'");

        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const SZ: usize = std::mem::size_of::<$t>();
                let raw = self.take(n * SZ as u64, &what)?;
                Array::$variant(
                    raw.chunks_exact(SZ)
                        .map(|c| {
                            let mut b = [0u8; SZ];
                            b.copy_from_slice(c);
                            <$t>::from_le_bytes(b)
                        })
                        .collect(),
                )
            }};
        }

        Ok(match elem {
            ValueType::U8 => Array::U8(self.take(n, &what)?.to_vec()),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => Array::Bool(self.take(n, &what)?.iter().map(|&b| b != 0).collect()),
            ValueType::String => {
                // [n] strings
                let mut v: Vec<String> = Vec::with_capacity(prealloc(n));
                for j in 0..n {
                    v.push(self.string(&|| format!("string #{j} of array key '{key}'"))?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                // [n] nested arrays
                let mut v: Vec<Array> = Vec::with_capacity(prealloc(n));
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}
