//! Hostile-input tests for `ottkv::gguf`: every malformed file must produce
//! a specific error, never a panic; plus writer round-trips, hparams
//! extraction, and seeded mutation fuzzing over real and synthetic headers.

use std::path::PathBuf;

use ottkv::gguf::{
    parse, Array, GgmlType, Gguf, GgufError, GgufFile, GgufWriter, ModelHparams, RopeType, Value,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------
// Byte builder for hand-made (often deliberately broken) files.
// ---------------------------------------------------------------------------

const T_U32: u32 = 4;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const F32_ID: u32 = 0;

#[derive(Clone, Default)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        B::default()
            .raw(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn raw(mut self, b: &[u8]) -> B {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(mut self, v: u8) -> B {
        self.0.push(v);
        self
    }
    fn u32(self, v: u32) -> B {
        self.raw(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> B {
        self.raw(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> B {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn kv_u32(self, key: &str, v: u32) -> B {
        self.str(key).u32(T_U32).u32(v)
    }
    fn kv_str(self, key: &str, v: &str) -> B {
        self.str(key).u32(T_STRING).str(v)
    }
    fn tensor(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> B {
        let mut b = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            b = b.u64(d);
        }
        b.u32(type_id).u64(offset)
    }
    fn pad(mut self, align: usize) -> B {
        while self.0.len() % align != 0 {
            self.0.push(0);
        }
        self
    }
    fn zeros(mut self, n: usize) -> B {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn parse(&self) -> Result<Gguf, GgufError> {
        parse(&self.0)
    }
}

/// A valid one-kv, one-tensor file: the base most hostile cases tweak.
fn tiny() -> B {
    B::header(3, 1, 1)
        .kv_u32("a", 1)
        .tensor("t", &[4], F32_ID, 0)
        .pad(32)
        .zeros(16)
}

fn err(r: Result<Gguf, GgufError>) -> GgufError {
    match r {
        Ok(_) => panic!("expected an error, parse succeeded"),
        Err(e) => {
            // Every error must render without panicking and say something.
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

// ---------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------

#[test]
fn tiny_file_parses() {
    let g = tiny().parse().expect("tiny file");
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset() % 32, 0);
    assert_eq!(g.tensors().len(), 1);
    let t = g.tensor("t").expect("tensor t");
    assert_eq!((t.n_elements, t.n_bytes), (4, 16));
}

#[test]
fn bad_magic() {
    let mut b = tiny();
    b.0[..4].copy_from_slice(b"GGML");
    assert!(matches!(
        err(b.parse()),
        GgufError::BadMagic { found } if &found == b"GGML"
    ));
    assert!(matches!(
        err(parse(b"")),
        GgufError::Truncated { offset: 0, .. }
    ));
}

#[test]
fn versions() {
    for v in [0u32, 1, 4, 0xFFFF_FFFF] {
        let mut b = tiny();
        b.0[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(
            matches!(err(b.parse()), GgufError::UnsupportedVersion { version } if version == v),
            "version {v}"
        );
    }
    let mut b = tiny();
    b.0[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(b.parse().expect("v2").version(), 2);
}

#[test]
fn big_endian_rejected() {
    let mut b = tiny();
    b.0[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(matches!(
        err(b.parse()),
        GgufError::BigEndian { raw: 0x0300_0000 }
    ));
}

#[test]
fn truncation_at_every_length() {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").expect("kv");
    w.add_kv("n", 7u32).expect("kv");
    w.add_kv("f", 0.5f32).expect("kv");
    w.add_kv(
        "strs",
        Array::String(vec!["ab".into(), String::new(), "cde".into()]),
    )
    .expect("kv");
    w.add_kv(
        "nested",
        Array::Array(vec![Array::U8(vec![1, 2]), Array::I64(vec![-1])]),
    )
    .expect("kv");
    w.add_tensor("a", &[8, 2], GgmlType::F32, vec![1u8; 64])
        .expect("t");
    w.add_tensor("b", &[32], GgmlType::Q8_0, vec![2u8; 34])
        .expect("t");
    w.add_tensor("c", &[3], GgmlType::F16, vec![3u8; 6])
        .expect("t");
    let bytes = w.to_bytes();
    let g = parse(&bytes).expect("full file");
    let data_end = g
        .tensors()
        .iter()
        .map(|t| g.data_offset() + t.offset + t.n_bytes)
        .max()
        .expect("tensors") as usize;
    for len in 0..bytes.len() {
        let r = parse(&bytes[..len]);
        if len < data_end {
            let e = err(r);
            assert!(
                matches!(
                    e,
                    GgufError::Truncated { .. }
                        | GgufError::CountTooLarge { .. }
                        | GgufError::TensorDataPastEof { .. }
                ),
                "len {len}: unexpected {e:?}"
            );
        } else {
            // Only trailing padding is missing: still a complete file.
            assert!(r.is_ok(), "len {len}");
        }
    }
}

#[test]
fn truncated_padding_before_data() {
    let b = B::header(3, 1, 0).tensor("t", &[0], F32_ID, 0);
    assert!(b.0.len() % 32 != 0);
    assert!(
        matches!(err(b.parse()), GgufError::Truncated { what, .. } if what.contains("padding"))
    );
}

#[test]
fn no_tensors_no_padding_needed() {
    let b = B::header(3, 0, 1).kv_u32("k", 1);
    let g = b.parse().expect("no tensors");
    assert_eq!(g.data_offset(), b.0.len() as u64);
}

// ---------------------------------------------------------------------------
// Counts and strings
// ---------------------------------------------------------------------------

#[test]
fn huge_tensor_count() {
    for n in [u64::MAX, 1 << 40, 1000] {
        let b = B::header(3, n, 0).zeros(64);
        assert!(matches!(
            err(b.parse()),
            GgufError::CountTooLarge { count, offset: 8, .. } if count == n
        ));
    }
}

#[test]
fn huge_kv_count() {
    for n in [u64::MAX, 1 << 40, 100] {
        let b = B::header(3, 0, n).kv_u32("a", 1);
        assert!(matches!(
            err(b.parse()),
            GgufError::CountTooLarge { count, offset: 16, .. } if count == n
        ));
    }
}

#[test]
fn huge_array_length() {
    for n in [u64::MAX, 1 << 31, 5] {
        // 5 u32s need 20 bytes, only 8 follow.
        let b = B::header(3, 0, 1)
            .str("arr")
            .u32(T_ARRAY)
            .u32(T_U32)
            .u64(n)
            .zeros(8);
        assert!(matches!(
            err(b.parse()),
            GgufError::CountTooLarge { count, what, .. } if count == n && what.contains("arr")
        ));
    }
    // A string array needs at least 8 bytes per element.
    let b = B::header(3, 0, 1)
        .str("s")
        .u32(T_ARRAY)
        .u32(T_STRING)
        .u64(3)
        .zeros(16);
    assert!(matches!(err(b.parse()), GgufError::CountTooLarge { .. }));
}

#[test]
fn huge_string_lengths() {
    // Key length.
    let b = B::header(3, 0, 1).u64(u64::MAX).zeros(16);
    assert!(matches!(
        err(b.parse()),
        GgufError::StringTooLong {
            len: u64::MAX,
            offset: 24,
            ..
        }
    ));
    // String value length.
    let b = B::header(3, 0, 1)
        .str("k")
        .u32(T_STRING)
        .u64(u64::MAX)
        .zeros(4);
    assert!(matches!(
        err(b.parse()),
        GgufError::StringTooLong { what, .. } if what.contains("'k'")
    ));
    // Under the cap but past EOF.
    let b = B::header(3, 0, 1).str("k").u32(T_STRING).u64(1000).zeros(4);
    assert!(matches!(
        err(b.parse()),
        GgufError::Truncated {
            needed: 1000,
            available: 4,
            ..
        }
    ));
    // Tensor name length.
    let b = B::header(3, 1, 0).u64(u64::MAX).zeros(32);
    assert!(matches!(err(b.parse()), GgufError::StringTooLong { .. }));
}

#[test]
fn invalid_utf8_and_empty_key() {
    let b = B::header(3, 0, 1)
        .u64(2)
        .raw(&[0xC3, 0x28])
        .u32(T_U32)
        .u32(0);
    assert!(matches!(
        err(b.parse()),
        GgufError::InvalidUtf8 { offset: 32, .. }
    ));
    let b = B::header(3, 0, 1).str("").u32(T_U32).u32(0).zeros(8);
    assert!(matches!(
        err(b.parse()),
        GgufError::EmptyKey { index: 0, .. }
    ));
}

// ---------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------

#[test]
fn unknown_value_type() {
    for ty in [13u32, 9999, u32::MAX] {
        let b = B::header(3, 0, 1).str("key").u32(ty).zeros(8);
        assert!(matches!(
            err(b.parse()),
            GgufError::UnknownValueType { key, type_id, offset: 35 } if key == "key" && type_id == ty
        ));
    }
    // Unknown element type inside an array.
    let b = B::header(3, 0, 1).str("key").u32(T_ARRAY).u32(42).u64(0);
    assert!(matches!(
        err(b.parse()),
        GgufError::UnknownValueType { type_id: 42, .. }
    ));
}

#[test]
fn bool_follows_gguf_cpp() {
    // gguf.cpp reads bools as int8 and treats any non-zero byte as true.
    let b = B::header(3, 0, 2)
        .str("t")
        .u32(7)
        .u8(2)
        .str("f")
        .u32(7)
        .u8(0);
    let g = b.parse().expect("bools");
    assert_eq!(g.get("t"), Some(&Value::Bool(true)));
    assert!(!g.get_bool("f").expect("f"));
}

#[test]
fn duplicate_keys() {
    let b = B::header(3, 0, 2).kv_u32("x", 1).kv_str("x", "again");
    assert!(matches!(
        err(b.parse()),
        GgufError::DuplicateKey { key, .. } if key == "x"
    ));
}

#[test]
fn nesting_too_deep() {
    let mut b = B::header(3, 0, 1).str("deep").u32(T_ARRAY);
    for _ in 0..20 {
        b = b.u32(T_ARRAY).u64(1);
    }
    let b = b.u32(T_U32).u64(0);
    assert!(matches!(
        err(b.parse()),
        GgufError::NestingTooDeep { key, .. } if key == "deep"
    ));
}

#[test]
fn alignment_rules() {
    for a in [0u32, 3, 48, u32::MAX] {
        let b = B::header(3, 0, 1).kv_u32("general.alignment", a);
        assert!(
            matches!(err(b.parse()), GgufError::BadAlignment { .. }),
            "alignment {a}"
        );
    }
    let b = B::header(3, 0, 1).kv_str("general.alignment", "32");
    assert!(matches!(
        err(b.parse()),
        GgufError::BadAlignment { reason } if reason.contains("string")
    ));
    let b = B::header(3, 0, 1)
        .str("general.alignment")
        .u32(10) // u64
        .u64(32);
    assert!(matches!(err(b.parse()), GgufError::BadAlignment { .. }));

    let b = B::header(3, 1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[4], F32_ID, 0)
        .pad(64)
        .zeros(16);
    let g = b.parse().expect("alignment 64");
    assert_eq!((g.alignment(), g.data_offset()), (64, 128));
}

// ---------------------------------------------------------------------------
// Tensor infos and layout
// ---------------------------------------------------------------------------

#[test]
fn unknown_tensor_type() {
    for id in [4u32, 5, 31, 33, 36, 38, 43, u32::MAX] {
        let b = B::header(3, 1, 0)
            .tensor("w", &[32], id, 0)
            .pad(32)
            .zeros(256);
        assert!(
            matches!(
                err(b.parse()),
                GgufError::UnknownTensorType { tensor, type_id, .. } if tensor == "w" && type_id == id
            ),
            "type {id}"
        );
    }
}

#[test]
fn too_many_dims() {
    let b = B::header(3, 1, 0)
        .tensor("t", &[1, 1, 1, 1, 1], F32_ID, 0)
        .pad(32)
        .zeros(4);
    assert!(matches!(
        err(b.parse()),
        GgufError::TooManyDims { tensor, n_dims: 5, .. } if tensor == "t"
    ));
    let b = B::header(3, 1, 0).str("t").u32(u32::MAX).zeros(64);
    assert!(matches!(err(b.parse()), GgufError::TooManyDims { .. }));
}

#[test]
fn dims_overflow() {
    let cases: [&[u64]; 4] = [
        &[1 << 32, 1 << 32],
        &[u64::MAX],
        &[1 << 63],
        &[2, 2, 1 << 62],
    ];
    for dims in cases {
        let b = B::header(3, 1, 0).tensor("big", dims, F32_ID, 0).pad(32);
        assert!(
            matches!(
                err(b.parse()),
                GgufError::DimsOverflow { tensor, .. } if tensor == "big"
            ),
            "dims {dims:?}"
        );
    }
    // Element count fits in i64 but the byte size does not fit in u64.
    let b = B::header(3, 1, 0)
        .tensor("big", &[1 << 62], F32_ID, 0)
        .pad(32);
    assert!(matches!(err(b.parse()), GgufError::DimsOverflow { .. }));
}

#[test]
fn zero_dims_are_empty_tensors() {
    // gguf.cpp accepts ne = 0 (and n_dims = 0, a scalar).
    let b = B::header(3, 2, 0)
        .tensor("empty", &[0, 5], F32_ID, 0)
        .tensor("scalar", &[], F32_ID, 0)
        .pad(32)
        .zeros(4);
    let g = b.parse().expect("zero dims");
    let e = g.tensor("empty").expect("empty");
    assert_eq!((e.n_elements, e.n_bytes), (0, 0));
    let s = g.tensor("scalar").expect("scalar");
    assert_eq!((s.n_elements, s.n_bytes), (1, 4));
}

#[test]
fn row_not_block_multiple() {
    let b = B::header(3, 1, 0)
        .tensor("q", &[16, 2], GgmlType::Q4_0.id(), 0)
        .pad(32)
        .zeros(64);
    assert!(matches!(
        err(b.parse()),
        GgufError::RowNotBlockMultiple { tensor, ne0: 16, block_size: 32, .. } if tensor == "q"
    ));
}

#[test]
fn duplicate_tensor_names() {
    let b = B::header(3, 2, 0)
        .tensor("w", &[4], F32_ID, 0)
        .tensor("w", &[4], F32_ID, 32)
        .pad(32)
        .zeros(64);
    assert!(matches!(
        err(b.parse()),
        GgufError::DuplicateTensor { name, .. } if name == "w"
    ));
}

#[test]
fn tensor_name_too_long() {
    let name = "n".repeat(64);
    let b = B::header(3, 1, 0)
        .tensor(&name, &[4], F32_ID, 0)
        .pad(32)
        .zeros(16);
    assert!(matches!(
        err(b.parse()),
        GgufError::TensorNameTooLong { len: 64, .. }
    ));
}

#[test]
fn tensor_data_past_eof() {
    let b = B::header(3, 1, 0)
        .tensor("w", &[8], F32_ID, 0)
        .pad(32)
        .zeros(16);
    assert!(matches!(
        err(b.parse()),
        GgufError::TensorDataPastEof { tensor, .. } if tensor == "w"
    ));
    // Offset so large that data_offset + offset overflows u64.
    let b = B::header(3, 1, 0)
        .tensor("w", &[4], F32_ID, u64::MAX - 31)
        .pad(32)
        .zeros(16);
    assert!(matches!(
        err(b.parse()),
        GgufError::TensorDataPastEof { .. }
    ));
}

#[test]
fn overlapping_tensors() {
    let b = B::header(3, 2, 0)
        .tensor("a", &[16], F32_ID, 0)
        .tensor("b", &[16], F32_ID, 32)
        .pad(32)
        .zeros(128);
    assert!(matches!(
        err(b.parse()),
        GgufError::TensorOverlap { a, b, a_end: 64, b_start: 32, .. } if a == "a" && b == "b"
    ));
    // Same offset, listed in reverse order.
    let b = B::header(3, 2, 0)
        .tensor("x", &[4], F32_ID, 32)
        .tensor("y", &[4], F32_ID, 32)
        .pad(32)
        .zeros(64);
    assert!(matches!(err(b.parse()), GgufError::TensorOverlap { .. }));
}

#[test]
fn misaligned_tensor_offset() {
    let b = B::header(3, 1, 0)
        .tensor("w", &[4], F32_ID, 4)
        .pad(32)
        .zeros(64);
    assert!(matches!(
        err(b.parse()),
        GgufError::TensorOffsetMisaligned { tensor, offset: 4, alignment: 32 } if tensor == "w"
    ));
}

// ---------------------------------------------------------------------------
// Typed getters
// ---------------------------------------------------------------------------

#[test]
fn typed_getters() {
    let mut w = GgufWriter::new();
    w.add_kv("u8", 200u8).expect("kv");
    w.add_kv("i32", 7i32).expect("kv");
    w.add_kv("neg", -1i32).expect("kv");
    w.add_kv("big", u64::MAX).expect("kv");
    w.add_kv("f", 1.5f32).expect("kv");
    w.add_kv("d", 2.5f64).expect("kv");
    w.add_kv("s", "hi").expect("kv");
    w.add_kv("b", true).expect("kv");
    w.add_kv("arr", Array::F32(vec![1.0, 2.0])).expect("kv");
    let g = parse(&w.to_bytes()).expect("parse");

    assert_eq!(g.get_u32("u8").expect("u8"), 200);
    assert_eq!(g.get_u32("i32").expect("i32"), 7);
    assert_eq!(g.get_u64("i32").expect("i32"), 7);
    assert_eq!(g.get_u64("big").expect("big"), u64::MAX);
    assert_eq!(g.get_i64("neg").expect("neg"), -1);
    assert_eq!(g.get_f32("f").expect("f"), 1.5);
    assert_eq!(g.get_f32("d").expect("d"), 2.5);
    assert_eq!(g.get_str("s").expect("s"), "hi");
    assert!(g.get_bool("b").expect("b"));
    assert_eq!(g.get_array("arr").expect("arr").len(), 2);
    assert_eq!(g.get_u32_opt("nope").expect("opt"), None);
    assert_eq!(g.get_str_opt("s").expect("opt"), Some("hi"));
    assert_eq!(g.get_f32_opt("f").expect("opt"), Some(1.5));

    assert!(matches!(g.get_u32("nope"), Err(GgufError::MissingKey { key }) if key == "nope"));
    assert!(matches!(
        g.get_u32("s"),
        Err(GgufError::WrongType { key, found: "string", .. }) if key == "s"
    ));
    assert!(matches!(g.get_str("f"), Err(GgufError::WrongType { .. })));
    assert!(matches!(
        g.get_u32_opt("f"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        g.get_u32("neg"),
        Err(GgufError::ValueOutOfRange { key, .. }) if key == "neg"
    ));
    assert!(matches!(
        g.get_u32("big"),
        Err(GgufError::ValueOutOfRange { .. })
    ));
    let keys: Vec<&str> = g.metadata().map(|(k, _)| k).collect();
    assert_eq!(keys, ["u8", "i32", "neg", "big", "f", "d", "s", "b", "arr"]);
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

fn all_value_kinds() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::from("llama")),
        ("v.u8", Value::U8(0xAB)),
        ("v.i8", Value::I8(-5)),
        ("v.u16", Value::U16(0xBEEF)),
        ("v.i16", Value::I16(-300)),
        ("v.u32", Value::U32(123_456)),
        ("v.i32", Value::I32(-123_456)),
        ("v.f32", Value::F32(3.25)),
        ("v.bool.t", Value::Bool(true)),
        ("v.bool.f", Value::Bool(false)),
        ("v.string", Value::from("héllo, wörld")),
        ("v.string.empty", Value::from("")),
        ("v.u64", Value::U64(u64::MAX - 1)),
        ("v.i64", Value::I64(i64::MIN)),
        ("v.f64", Value::F64(-1.0e300)),
        ("a.u8", Array::U8(vec![0, 1, 255]).into()),
        ("a.i8", Array::I8(vec![-128, 127]).into()),
        ("a.u16", Array::U16(vec![1, 65535]).into()),
        ("a.i16", Array::I16(vec![-1, 2]).into()),
        ("a.u32", Array::U32(vec![]).into()),
        ("a.i32", Array::I32(vec![-7, 0, 7]).into()),
        ("a.f32", Array::F32(vec![0.5, -0.25, 1e-3]).into()),
        ("a.bool", Array::Bool(vec![true, false, true]).into()),
        (
            "a.string",
            Array::String(vec!["a".into(), String::new(), "ünïcode".into()]).into(),
        ),
        ("a.u64", Array::U64(vec![u64::MAX]).into()),
        ("a.i64", Array::I64(vec![i64::MIN, i64::MAX]).into()),
        ("a.f64", Array::F64(vec![1.5, -2.5]).into()),
        (
            "a.nested",
            Array::Array(vec![
                Array::U32(vec![1, 2, 3]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::F32(vec![9.0]), Array::Bool(vec![])]),
                Array::I8(vec![]),
            ])
            .into(),
        ),
    ]
}

#[test]
fn writer_round_trip() {
    let mut w = GgufWriter::new();
    w.set_alignment(64).expect("alignment");
    for (k, v) in all_value_kinds() {
        w.add_kv(k, v).expect("add_kv");
    }
    let mut rng = StdRng::seed_from_u64(7);
    let mut expected_tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> = Vec::new();
    let specs: [(&str, &[u64], GgmlType, usize); 6] = [
        ("f32", &[3, 5], GgmlType::F32, 3 * 5 * 4),
        ("f16", &[7], GgmlType::F16, 7 * 2),
        ("q4_0", &[64, 3], GgmlType::Q4_0, 2 * 3 * 18),
        ("q8_0", &[32, 2, 2], GgmlType::Q8_0, 4 * 34),
        ("q4_k", &[256, 1, 1, 2], GgmlType::Q4_K, 2 * 144),
        ("empty", &[0, 4], GgmlType::F32, 0),
    ];
    for (name, dims, ty, n_bytes) in specs {
        let data: Vec<u8> = (0..n_bytes).map(|_| rng.gen()).collect();
        w.add_tensor(name, dims, ty, data.as_slice())
            .expect("add_tensor");
        expected_tensors.push((name.into(), dims.to_vec(), ty, data));
    }
    let bytes = w.to_bytes();
    assert_eq!(bytes.len() % 64, 0, "file ends on an aligned boundary");

    let g = parse(&bytes).expect("round trip parse");
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    assert_eq!(g.tensors().len(), expected_tensors.len());
    let mut expected_kvs = vec![("general.alignment", Value::U32(64))];
    expected_kvs.extend(all_value_kinds());
    let got: Vec<(&str, &Value)> = g.metadata().collect();
    assert_eq!(got.len(), expected_kvs.len());
    for ((gk, gv), (ek, ev)) in got.iter().zip(&expected_kvs) {
        assert_eq!(gk, ek);
        assert_eq!(*gv, ev, "key {ek}");
    }
    let mut prev_end = 0u64;
    for (t, (name, dims, ty, data)) in g.tensors().iter().zip(&expected_tensors) {
        assert_eq!(&t.name, name);
        assert_eq!(&t.dims, dims);
        assert_eq!(t.ggml_type, *ty);
        assert_eq!(t.n_bytes, data.len() as u64);
        assert_eq!(t.offset % 64, 0);
        // gguf.cpp's layout: packed in order, each padded to the alignment.
        assert_eq!(t.offset, prev_end);
        prev_end = t.offset + t.n_bytes.div_ceil(64) * 64;
        assert_eq!(g.tensor_data(&bytes, name).expect("data"), data.as_slice());
        let start = (g.data_offset() + t.offset + t.n_bytes) as usize;
        let pad_end = (g.data_offset() + prev_end) as usize;
        assert!(
            bytes[start..pad_end].iter().all(|&b| b == 0),
            "tensor padding zeroed"
        );
    }

    // write_to + GgufFile give the same bytes and zero-copy data.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rt.gguf");
    w.write_to(&path).expect("write_to");
    let f = GgufFile::open(&path).expect("open");
    assert_eq!(f.bytes(), bytes.as_slice());
    assert_eq!(f.file_size(), bytes.len() as u64);
    assert_eq!(f.path(), path.as_path());
    for (name, _, _, data) in &expected_tensors {
        assert_eq!(f.tensor_data(name).expect("data"), data.as_slice());
    }
    assert!(matches!(
        f.tensor_data("missing"),
        Err(GgufError::TensorNotFound { .. })
    ));
}

#[test]
fn writer_header_padding_is_zero_and_v2() {
    let mut w = GgufWriter::new();
    w.set_version(2).expect("v2");
    w.add_kv("k", "v").expect("kv");
    w.add_tensor("t", &[1], GgmlType::F32, vec![0xFF; 4])
        .expect("t");
    let bytes = w.to_bytes();
    let g = parse(&bytes).expect("parse");
    assert_eq!(g.version(), 2);
    // The tensor-info section ends at 4+4+8+8 + (8+1+4+8+1) + (8+1+4+8+4+8) = 79.
    assert!(bytes[79..g.data_offset() as usize].iter().all(|&b| b == 0));
    assert!(matches!(
        w.set_version(1),
        Err(GgufError::UnsupportedVersion { version: 1 })
    ));
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    assert!(matches!(
        w.add_tensor("t", &[32], GgmlType::Q4_0, vec![0u8; 17]),
        Err(GgufError::DataSizeMismatch {
            expected: 18,
            actual: 17,
            ..
        })
    ));
    assert!(matches!(
        w.add_tensor("t", &[16], GgmlType::Q4_0, vec![0u8; 9]),
        Err(GgufError::RowNotBlockMultiple { .. })
    ));
    assert!(matches!(
        w.add_tensor("t", &[u64::MAX], GgmlType::F32, vec![]),
        Err(GgufError::DimsOverflow { .. })
    ));
    assert!(w
        .add_tensor("t", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])
        .is_err());
    w.add_tensor("t", &[1], GgmlType::F32, vec![0; 4])
        .expect("ok");
    assert!(w.add_tensor("t", &[1], GgmlType::F32, vec![0; 4]).is_err());
    assert!(matches!(
        w.set_alignment(0),
        Err(GgufError::BadAlignment { .. })
    ));
    assert!(matches!(
        w.set_alignment(24),
        Err(GgufError::BadAlignment { .. })
    ));
    assert!(matches!(
        w.add_kv("general.alignment", "64"),
        Err(GgufError::BadAlignment { .. })
    ));
    w.add_kv("x", 1u32).expect("kv");
    assert!(w.add_kv("x", 2u32).is_err());
    assert!(w.add_kv("", 2u32).is_err());
    let mut deep = Array::U8(vec![]);
    for _ in 0..10 {
        deep = Array::Array(vec![deep]);
    }
    assert!(w.add_kv("deep", deep).is_err());
    parse(&w.to_bytes()).expect("writer output stays valid after rejected adds");
}

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

#[test]
fn ggml_type_table() {
    let expect = [
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q8_1, 9, 32, 36),
        (GgmlType::Q2_K, 10, 256, 84),
        (GgmlType::Q3_K, 11, 256, 110),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q5_K, 13, 256, 176),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::Q8_K, 15, 256, 292),
        (GgmlType::IQ2_XXS, 16, 256, 66),
        (GgmlType::IQ2_XS, 17, 256, 74),
        (GgmlType::IQ3_XXS, 18, 256, 98),
        (GgmlType::IQ1_S, 19, 256, 50),
        (GgmlType::IQ4_NL, 20, 32, 18),
        (GgmlType::IQ3_S, 21, 256, 110),
        (GgmlType::IQ2_S, 22, 256, 82),
        (GgmlType::IQ4_XS, 23, 256, 136),
        (GgmlType::I8, 24, 1, 1),
        (GgmlType::I16, 25, 1, 2),
        (GgmlType::I32, 26, 1, 4),
        (GgmlType::I64, 27, 1, 8),
        (GgmlType::F64, 28, 1, 8),
        (GgmlType::IQ1_M, 29, 256, 56),
        (GgmlType::BF16, 30, 1, 2),
        (GgmlType::TQ1_0, 34, 256, 54),
        (GgmlType::TQ2_0, 35, 256, 66),
        (GgmlType::MXFP4, 39, 32, 17),
        (GgmlType::NVFP4, 40, 64, 36),
        (GgmlType::Q1_0, 41, 128, 18),
        (GgmlType::Q2_0, 42, 64, 18),
    ];
    assert_eq!(GgmlType::ALL.len(), expect.len());
    for (ty, id, blck, size) in expect {
        assert_eq!(ty.id(), id);
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!((ty.block_size(), ty.type_size()), (blck, size), "{ty}");
    }
    for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, 1000] {
        assert_eq!(GgmlType::from_id(removed), None);
    }
    assert_eq!(GgmlType::Q2_K.name(), "q2_K");
}

// ---------------------------------------------------------------------------
// Hyperparameters
// ---------------------------------------------------------------------------

fn base_hparams(arch: &str) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", arch).expect("kv");
    w.add_kv("tokenizer.ggml.model", "gpt2").expect("kv");
    w.add_kv(
        "tokenizer.ggml.tokens",
        Array::String((0..10).map(|i| i.to_string()).collect()),
    )
    .expect("kv");
    for (k, v) in [
        ("block_count", 2u32),
        ("embedding_length", 64),
        ("feed_forward_length", 128),
        ("context_length", 256),
        ("attention.head_count", 4),
    ] {
        w.add_kv(format!("{arch}.{k}"), v).expect("kv");
    }
    w
}

fn hp(w: &GgufWriter) -> Result<ModelHparams, GgufError> {
    ModelHparams::from_gguf(&parse(&w.to_bytes()).expect("parse"))
}

#[test]
fn hparams_defaults_and_rope() {
    let h = hp(&base_hparams("qwen2")).expect("qwen2");
    assert_eq!(h.rope_type, RopeType::Neox);
    assert_eq!(
        (h.n_head, h.n_head_kv, h.head_dim_k, h.head_dim_v),
        (4, 4, 16, 16)
    );
    assert_eq!(h.rope_dim, 16);
    assert_eq!(h.rope_freq_base, 10000.0);
    assert_eq!(h.rope_freq_scale, 1.0);
    assert_eq!(h.rms_norm_eps, 1e-5);
    assert_eq!(h.vocab_size, 10);
    assert_eq!(h.name, None);
    assert_eq!(h.tokenizer_pre, None);

    let mut w = base_hparams("llama");
    w.add_kv("llama.rope.scaling.type", "linear").expect("kv");
    w.add_kv("llama.rope.scaling.factor", 4.0f32).expect("kv");
    w.add_kv("llama.attention.head_count_kv", 2u32).expect("kv");
    w.add_kv("llama.attention.key_length", 32u32).expect("kv");
    let h = hp(&w).expect("llama");
    assert_eq!(h.rope_type, RopeType::Norm);
    assert_eq!(h.rope_freq_scale, 0.25);
    assert_eq!(
        (h.n_head_kv, h.head_dim_k, h.head_dim_v, h.n_gqa()),
        (2, 32, 16, 2)
    );

    let mut w = base_hparams("llama");
    w.add_kv("llama.rope.scaling.type", "yarn").expect("kv");
    w.add_kv("llama.rope.scaling.factor", 4.0f32).expect("kv");
    assert_eq!(hp(&w).expect("yarn").rope_freq_scale, 1.0);
}

#[test]
fn hparams_errors() {
    assert!(matches!(
        hp(&base_hparams("gpt2")),
        Err(GgufError::UnsupportedArchitecture(a)) if a == "gpt2"
    ));

    let mut w = base_hparams("llama");
    w.add_kv("llama.attention.head_count_kv", 3u32).expect("kv");
    assert!(matches!(
        hp(&w),
        Err(GgufError::InvalidHparam { key, .. }) if key == "llama.attention.head_count_kv"
    ));

    let mut w = base_hparams("llama");
    w.add_kv("llama.attention.head_count_kv", Array::U32(vec![2, 2]))
        .expect("kv");
    assert!(matches!(
        hp(&w),
        Err(GgufError::InvalidHparam { reason, .. }) if reason.contains("per-layer head counts unsupported")
    ));

    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").expect("kv");
    w.add_kv("llama.block_count", 0u32).expect("kv");
    assert!(matches!(
        hp(&w),
        Err(GgufError::InvalidHparam { key, .. }) if key == "llama.block_count"
    ));

    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").expect("kv");
    assert!(matches!(
        hp(&w),
        Err(GgufError::MissingKey { key }) if key == "llama.block_count"
    ));

    let mut w = base_hparams("llama");
    w.add_kv("llama.attention.head_count_kv", -1i32)
        .expect("kv");
    assert!(matches!(hp(&w), Err(GgufError::ValueOutOfRange { .. })));

    // 64 is not divisible by 6 heads, and no key_length says otherwise.
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").expect("kv");
    for (k, v) in [
        ("block_count", 1u32),
        ("embedding_length", 64),
        ("feed_forward_length", 1),
        ("context_length", 1),
        ("attention.head_count", 6),
    ] {
        w.add_kv(format!("llama.{k}"), v).expect("kv");
    }
    assert!(matches!(
        hp(&w),
        Err(GgufError::InvalidHparam { key, .. }) if key == "llama.embedding_length"
    ));
}

// ---------------------------------------------------------------------------
// Real models and mutation fuzzing
// ---------------------------------------------------------------------------

fn model_path(file: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("OTTKV_MODEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models"),
    };
    let p = dir.join(file);
    p.is_file().then_some(p)
}

/// Overwrites 1-4 random header bytes with random or boundary values, parses,
/// restores. Ok and Err are both fine; a panic fails the test.
fn mutate_header(bytes: &mut [u8], header_len: usize, iterations: usize, seed: u64) -> usize {
    const BOUNDARY: [u8; 6] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n_ok = 0;
    for _ in 0..iterations {
        let n_edits = rng.gen_range(1..=4);
        let mut saved: Vec<(usize, u8)> = Vec::with_capacity(n_edits);
        for _ in 0..n_edits {
            let pos = rng.gen_range(0..header_len);
            saved.push((pos, bytes[pos]));
            bytes[pos] = if rng.gen_bool(0.5) {
                BOUNDARY[rng.gen_range(0..BOUNDARY.len())]
            } else {
                rng.gen()
            };
        }
        match parse(bytes) {
            Ok(_) => n_ok += 1,
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        for (pos, b) in saved.into_iter().rev() {
            bytes[pos] = b;
        }
    }
    n_ok
}

fn synthetic_model() -> Vec<u8> {
    let mut w = base_hparams("llama");
    w.add_kv("tokenizer.ggml.scores", Array::F32(vec![0.0; 10]))
        .expect("kv");
    w.add_kv(
        "nested",
        Array::Array(vec![
            Array::U16(vec![1, 2]),
            Array::String(vec!["s".into()]),
        ]),
    )
    .expect("kv");
    for (i, ty) in [GgmlType::F32, GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::F16]
        .into_iter()
        .enumerate()
    {
        let n = ty.bytes_for(64 * 2).expect("size") as usize;
        w.add_tensor(format!("blk.{i}.w"), &[64, 2], ty, vec![i as u8; n])
            .expect("tensor");
    }
    w.to_bytes()
}

#[test]
fn mutation_synthetic_model() {
    let mut bytes = synthetic_model();
    let header_len = parse(&bytes).expect("synthetic").data_offset() as usize;
    let n_ok = mutate_header(&mut bytes, header_len, 5000, 0x5eed);
    assert!(n_ok < 5000, "mutations should break at least some parses");
    parse(&bytes).expect("bytes restored after mutation");
}

#[test]
fn mutation_stories260k() {
    let Some(path) = model_path("stories260K.gguf") else {
        println!("skipping: stories260K.gguf not found (set OTTKV_MODEL_DIR)");
        return;
    };
    let mut bytes = std::fs::read(&path).expect("read model");
    let header_len = parse(&bytes).expect("real model").data_offset() as usize;
    let n_ok = mutate_header(&mut bytes, header_len, 5000, 260);
    println!("stories260K: {n_ok}/5000 mutated headers still parsed");
    parse(&bytes).expect("bytes restored after mutation");
}

#[test]
fn real_stories260k() {
    let Some(path) = model_path("stories260K.gguf") else {
        println!("skipping: stories260K.gguf not found (set OTTKV_MODEL_DIR)");
        return;
    };
    let f = GgufFile::open(&path).expect("open");
    let h = ModelHparams::from_gguf(&f).expect("hparams");
    assert_eq!(h.arch, "llama");
    assert_eq!(
        (h.n_layer, h.n_head, h.n_head_kv, h.head_dim_k),
        (5, 8, 4, 8)
    );
    assert_eq!(h.vocab_size, 512);
    assert_eq!(h.tokenizer_model, "llama");
    let t = f.tensor("token_embd.weight").expect("token_embd");
    assert_eq!(t.dims, [64, 512]);
    assert_eq!(
        f.tensor_data("token_embd.weight").expect("data").len(),
        64 * 512 * 4
    );
    for t in f.tensors() {
        assert_eq!(
            f.tensor_data(&t.name).expect("data").len() as u64,
            t.n_bytes
        );
    }
}

#[test]
fn real_smollm2() {
    let Some(path) = model_path("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        println!("skipping: SmolLM2-135M-Instruct.Q4_1.gguf not found (set OTTKV_MODEL_DIR)");
        return;
    };
    let f = GgufFile::open(&path).expect("open");
    let h = ModelHparams::from_gguf(f.gguf()).expect("hparams");
    assert_eq!(h.arch, "llama");
    assert_eq!(
        (h.n_layer, h.n_head, h.n_head_kv, h.head_dim_k),
        (30, 9, 3, 64)
    );
    assert_eq!(h.vocab_size, 49152);
    assert_eq!(h.tokenizer_pre.as_deref(), Some("smollm"));
    assert!(f.tensors().iter().any(|t| t.ggml_type == GgmlType::Q4_1));
}

#[test]
fn error_is_wrappable() {
    // The crate-level error wraps GgufError with #[from]; that needs these.
    fn check<T: std::error::Error + Send + Sync + 'static>() {}
    check::<GgufError>();
}

#[test]
fn open_missing_file_is_io_error() {
    let e = GgufFile::open("/nonexistent/dir/model.gguf").expect_err("missing");
    assert!(matches!(e, GgufError::Io { path, .. } if path.ends_with("model.gguf")));
}

// ---------------------------------------------------------------------------
// Tokenizer metadata as libllama would read it
// ---------------------------------------------------------------------------

fn vocab_file(model: &str, tokens: Vec<String>) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", model).expect("kv");
    w.add_kv("tokenizer.ggml.tokens", Array::String(tokens))
        .expect("kv");
    w
}

/// A SentencePiece vocabulary with every byte token, then `extra`.
fn spm_tokens(extra: &[&str]) -> Vec<String> {
    let mut t: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    t.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    t.extend(extra.iter().map(|s| s.to_string()));
    t
}

fn vocab_err(w: &GgufWriter) -> (String, String) {
    match ottkv::gguf::check_vocab(&parse(&w.to_bytes()).expect("parse")) {
        Err(GgufError::Vocab { key, reason }) => (key, reason),
        other => panic!("expected a vocabulary error, got {other:?}"),
    }
}

#[test]
fn vocab_checks_follow_libllama() {
    let ok = vocab_file("llama", spm_tokens(&["a", "b"]));
    let v = ottkv::gguf::check_vocab(&parse(&ok.to_bytes()).unwrap()).unwrap();
    assert_eq!(v.n_tokens, 261);

    // An empty token is "[EMPTY_<id>]" to llama.cpp: it collides with that very text.
    let mut t = spm_tokens(&["", "x"]);
    let empty_id = t.len() - 2;
    t[empty_id + 1] = format!("[EMPTY_{empty_id}]");
    let (key, reason) = vocab_err(&vocab_file("llama", t));
    assert_eq!(key, "tokenizer.ggml.tokens");
    assert!(
        reason.contains(&format!("repeats token #{empty_id}")),
        "{reason}"
    );

    // Tokens are C strings to llama.cpp: "ab\0c" is "ab".
    let (_, reason) = vocab_err(&vocab_file("llama", spm_tokens(&["ab", "ab\0c"])));
    assert!(reason.contains("NUL"), "{reason}");

    // A lone NUL is no byte token for 0x00, whatever its text.
    let mut t = spm_tokens(&["\0"]);
    t[3] = "<none>".into();
    let (_, reason) = vocab_err(&vocab_file("llama", t));
    assert!(reason.contains("<0x00>"), "{reason}");
    // Lower-case hex is not what llama.cpp looks up.
    let mut t = spm_tokens(&[]);
    t[3 + 0xAB] = "<0xab>".into();
    assert!(vocab_err(&vocab_file("llama", t)).1.contains("<0xAB>"));

    // BOS added by tokenization must exist: a 2-token vocabulary has no default id 2 or 11.
    let mut w = vocab_file("gpt2", vec!["a".into(), "b".into()]);
    w.add_kv("tokenizer.ggml.merges", Array::String(vec![]))
        .unwrap();
    assert_eq!(vocab_err(&w).0, "tokenizer.ggml.bos_token_id");
    w.add_kv("tokenizer.ggml.add_bos_token", false).unwrap();
    ottkv::gguf::check_vocab(&parse(&w.to_bytes()).unwrap()).unwrap();
    w.add_kv("tokenizer.ggml.add_eos_token", true).unwrap();
    assert_eq!(vocab_err(&w).0, "tokenizer.ggml.eos_token_id");
    // An id outside the vocabulary falls back to the default, as in llama.cpp...
    let mut w = ok.clone();
    w.add_kv("tokenizer.ggml.bos_token_id", 99_999u32).unwrap();
    ottkv::gguf::check_vocab(&parse(&w.to_bytes()).unwrap()).unwrap();
    // ... but an id of another type fails llama.cpp's load: refused here.
    let mut w = ok.clone();
    w.add_kv("tokenizer.ggml.bos_token_id", -1i32).unwrap();
    assert_eq!(vocab_err(&w).0, "tokenizer.ggml.bos_token_id");

    // Per-token arrays must cover every token, with llama.cpp's element types.
    let mut w = ok.clone();
    w.add_kv("tokenizer.ggml.scores", Array::F32(vec![0.0; 10]))
        .unwrap();
    assert!(vocab_err(&w).1.contains("10 entries for 261 tokens"));
    let mut w = ok.clone();
    w.add_kv("tokenizer.ggml.token_type", Array::U8(vec![1; 261]))
        .unwrap();
    assert_eq!(vocab_err(&w).0, "tokenizer.ggml.token_type");

    for m in ["none", "no_vocab", "bert", "t5", "llama\0"] {
        let (key, _) = vocab_err(&vocab_file(m, spm_tokens(&[])));
        assert_eq!(key, "tokenizer.ggml.model", "{m:?}");
    }
}

#[test]
fn hparams_have_sane_maxima() {
    for (key, v) in [
        ("block_count", 513u32),
        ("block_count", u32::MAX),
        ("attention.head_count", 1 << 13),
        ("embedding_length", 1 << 19),
        ("feed_forward_length", 1 << 21),
        ("attention.key_length", 1 << 15),
    ] {
        let mut w = base_hparams("llama");
        w.set_kv(format!("llama.{key}"), v).unwrap();
        let k = format!("llama.{key}");
        assert!(
            matches!(hp(&w), Err(GgufError::InvalidHparam { key, reason }) if key == k && reason.contains("limit")),
            "{k} = {v}"
        );
    }
}

#[test]
fn writer_edits_in_place() {
    let mut w = base_hparams("llama");
    w.add_tensor("t", &[4], GgmlType::F32, vec![0u8; 16])
        .unwrap();
    w.add_tensor("u", &[32], GgmlType::F32, vec![0u8; 128])
        .unwrap();
    let order = |w: &GgufWriter| {
        parse(&w.to_bytes())
            .unwrap()
            .metadata()
            .map(|(k, _)| k.to_string())
            .collect::<Vec<_>>()
    };
    let before = order(&w);
    w.set_kv("llama.block_count", 7u32).unwrap();
    assert_eq!(order(&w), before, "set_kv keeps the key's place");
    assert_eq!(w.kv("llama.block_count"), Some(&Value::U32(7)));
    assert!(w.remove_kv("llama.block_count"));
    assert!(!w.remove_kv("llama.block_count"));
    w.replace_tensor("t", &[32], GgmlType::Q8_0, vec![0u8; 34])
        .unwrap();
    assert!(w
        .replace_tensor("t", &[32], GgmlType::Q8_0, vec![0u8; 33])
        .is_err());
    assert!(w.remove_tensor("u"));
    let g = parse(&w.to_bytes()).unwrap();
    assert_eq!(g.tensors().len(), 1);
    assert_eq!(g.tensor("t").unwrap().ggml_type, GgmlType::Q8_0);
    // from_gguf reproduces a parsed file byte for byte (our writer's layout).
    let bytes = w.to_bytes();
    assert_eq!(GgufWriter::from_gguf(&g, &bytes).unwrap().to_bytes(), bytes);
}
