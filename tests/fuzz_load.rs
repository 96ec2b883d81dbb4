//! Fuzzes the whole load path with mutated model files: each mutant goes through the `ottkv`
//! binary in a child process — `generate` (our parser, hyperparameters, the vocabulary check,
//! libllama's vocabulary load and tokenizer, the weights bound into ggml, one token of our
//! engine) and, alternately, `perplexity` with llama.cpp's own engine (libllama's full load
//! and a decode) or `inspect` — so an abort inside llama.cpp or ggml is caught as the signal
//! that ended the child and counted, instead of ending the run.
//!
//! It fails on any child that was killed by a signal, panicked, exited with a status other
//! than 0, 1 or 2, or outlived its timeout, and on an exit 0 from `generate`/`perplexity` for
//! a mutant built to be refused (a duplicate token, a tokenizer libllama cannot run, a non-f32
//! norm weight, an absurd block count, ...).
//!
//! Bases: random-weight models from our GGUF writer (a SentencePiece llama and a byte-level
//! BPE qwen2), and stories260K when it is found (`OTTKV_MODEL_DIR`). The default is the
//! bounded CI run (fixed seed, 3000 mutants, about half a minute on 2 cores); a longer local run:
//!
//! ```sh
//! OTTKV_FUZZ_MUTANTS=50000 OTTKV_FUZZ_SEED=7 cargo test --release --test fuzz_load
//! ```
//!
//! Other knobs: `OTTKV_FUZZ_JOBS` (children at once, default min(2, cores)),
//! `OTTKV_FUZZ_TIMEOUT_S` (per child, default 30), `OTTKV_FUZZ_ONLY=N` (rerun mutant N of a
//! seed alone, printing its commands' output), `OTTKV_FUZZ_KEEP=DIR` (where failing mutants
//! are kept; default `target/tmp/fuzz-failures`), `OTTKV_FUZZ_WRITE_BASES=DIR` (write the
//! unmutated bases there too), `OTTKV_FUZZ_BIN` (another `ottkv` binary to fuzz, e.g. an
//! older build).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ottkv::gguf::{parse, Array, GgmlType, Gguf, GgufWriter, Value};
use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec, SyntheticVocab};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_MUTANTS: usize = 3000;
const DEFAULT_SEED: u64 = 0x0771_f022;
const PROMPT: &str = "Once upon a time, the little cat";
const TEXT: &str = "One day, a little girl named Lily found a needle in her room. She knew it \
    was difficult to play with it because it was sharp. Lily wanted to share the needle with \
    her mom, so she could sew a button on her shirt. She went to her mom and said, Mom, I \
    found this needle. Can you share it with me and sew my shirt? Her mom smiled and said, \
    Yes, Lily, we can share the needle and fix your shirt.";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// A seed in decimal or `0x` hex (the form failures are reported in).
fn seed_from_env(default: u64) -> u64 {
    match std::env::var("OTTKV_FUZZ_SEED") {
        Ok(v) => match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => v.parse(),
        }
        .unwrap_or_else(|_| panic!("OTTKV_FUZZ_SEED={v:?} is not a number")),
        Err(_) => default,
    }
}

// ---- Bases ----------------------------------------------------------------------------------

struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    gguf: Gguf,
}

impl Base {
    fn new(name: &'static str, bytes: Vec<u8>) -> Base {
        let gguf = parse(&bytes).unwrap_or_else(|e| panic!("base {name} does not parse: {e}"));
        Base { name, bytes, gguf }
    }

    fn writer(&self) -> GgufWriter {
        GgufWriter::from_gguf(&self.gguf, &self.bytes).expect("a parsed base re-serialises")
    }
}

fn tiny_spec(arch: Arch, vocab: SyntheticVocab) -> SyntheticSpec {
    SyntheticSpec {
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        n_ff: 128,
        n_vocab: 300,
        n_ctx_train: 256,
        vocab,
        ..SyntheticSpec::small(arch)
    }
}

fn bases() -> Vec<Base> {
    let mut out = vec![
        Base::new(
            "synthetic-llama-spm",
            synthetic_model(&tiny_spec(Arch::Llama, SyntheticVocab::Spm))
                .unwrap()
                .to_bytes(),
        ),
        Base::new("synthetic-qwen2-bpe-f16-tied", {
            let mut s = tiny_spec(Arch::Qwen2, SyntheticVocab::Bpe);
            s.weight_type = GgmlType::F16;
            s.tied_embeddings = true;
            s.n_vocab = 400;
            synthetic_model(&s).unwrap().to_bytes()
        }),
    ];
    // A real converted model when one is at hand; the synthetic ones stand in otherwise.
    if let Some(p) = ottkv::paths::find_model("stories260K.gguf") {
        out.push(Base::new("stories260K", std::fs::read(p).unwrap()));
    } else {
        println!(
            "note: stories260K.gguf not found in {:?}: fuzzing the synthetic models only",
            ottkv::paths::model_dirs()
        );
    }
    out
}

// ---- The header's fields, for targeted edits ------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// n_tensors, n_kv, string and array lengths: u64 counts the parser bounds.
    Count,
    /// Value types, array element types, n_dims, tensor types: u32 tags.
    Tag,
    /// A tensor dimension (u64).
    Dim,
    /// A tensor's data offset (u64).
    Offset,
}

/// (position, width, kind) of every count, tag, dim and offset in a valid file's header.
fn header_fields(b: &[u8]) -> Vec<(usize, usize, Field)> {
    struct W<'a> {
        b: &'a [u8],
        p: usize,
        out: Vec<(usize, usize, Field)>,
    }
    impl W<'_> {
        fn u32(&mut self, f: Option<Field>) -> u32 {
            let v = u32::from_le_bytes(self.b[self.p..self.p + 4].try_into().unwrap());
            if let Some(f) = f {
                self.out.push((self.p, 4, f));
            }
            self.p += 4;
            v
        }
        fn u64(&mut self, f: Option<Field>) -> u64 {
            let v = u64::from_le_bytes(self.b[self.p..self.p + 8].try_into().unwrap());
            if let Some(f) = f {
                self.out.push((self.p, 8, f));
            }
            self.p += 8;
            v
        }
        fn string(&mut self) {
            let n = self.u64(Some(Field::Count)) as usize;
            self.p += n;
        }
        fn value(&mut self, ty: u32) {
            match ty {
                0 | 1 | 7 => self.p += 1,
                2 | 3 => self.p += 2,
                4..=6 => self.p += 4,
                10..=12 => self.p += 8,
                8 => self.string(),
                9 => {
                    let et = self.u32(Some(Field::Tag));
                    let n = self.u64(Some(Field::Count));
                    for _ in 0..n {
                        self.value(et);
                    }
                }
                _ => unreachable!("valid base files only"),
            }
        }
    }
    let mut w = W {
        b,
        p: 8,
        out: Vec::new(),
    };
    let n_tensors = w.u64(Some(Field::Count));
    let n_kv = w.u64(Some(Field::Count));
    for _ in 0..n_kv {
        w.string();
        let ty = w.u32(Some(Field::Tag));
        w.value(ty);
    }
    for _ in 0..n_tensors {
        w.string();
        let nd = w.u32(Some(Field::Tag));
        for _ in 0..nd {
            w.u64(Some(Field::Dim));
        }
        w.u32(Some(Field::Tag));
        w.u64(Some(Field::Offset));
    }
    // Array elements of long arrays would swamp the list; counts and tags are what matter.
    w.out
}

// ---- Mutants --------------------------------------------------------------------------------

/// What a mutant's `generate` / `perplexity` may do: anything but crash, or (for mutants built
/// to be invalid) anything but crash or succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Any,
    Refused,
}

struct Mutant {
    what: String,
    bytes: Vec<u8>,
    expect: Expect,
}

const CLASSES: &[&str] = &[
    "byte-flip",
    "truncate",
    "huge-count",
    "bad-offset",
    "tensor-edit",
    "nan-inf-data",
    "metadata-edit",
    "vocab-edit",
];

const BOUNDARY_U64: &[u64] = &[
    0,
    1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];
const BOUNDARY_U32: &[u32] = &[
    0,
    1,
    2,
    4,
    5,
    13,
    42,
    43,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX,
];

fn mutate(base: &Base, class: &'static str, rng: &mut StdRng) -> Mutant {
    let header_len = base.gguf.data_offset() as usize;
    let mut bytes = base.bytes.clone();
    let any = |what: String, bytes: Vec<u8>| Mutant {
        what,
        bytes,
        expect: Expect::Any,
    };
    match class {
        "byte-flip" => {
            let n = rng.gen_range(1..=8);
            let in_header = rng.gen_bool(0.8);
            let mut at = Vec::new();
            for _ in 0..n {
                let p = rng.gen_range(0..if in_header { header_len } else { bytes.len() });
                bytes[p] = match rng.gen_range(0..4) {
                    0 => bytes[p] ^ (1 << rng.gen_range(0..8)),
                    1 => [0x00, 0xff, 0x7f, 0x80][rng.gen_range(0..4)],
                    _ => rng.gen(),
                };
                at.push(p);
            }
            any(format!("bytes at {at:?}"), bytes)
        }
        "truncate" => {
            let len = if rng.gen_bool(0.7) {
                rng.gen_range(0..header_len)
            } else {
                rng.gen_range(header_len..bytes.len())
            };
            bytes.truncate(len);
            any(format!("cut to {len} bytes"), bytes)
        }
        "huge-count" | "bad-offset" => {
            let fields = header_fields(&bytes);
            let want = |f: Field| match class {
                "huge-count" => f == Field::Count || f == Field::Tag || f == Field::Dim,
                _ => f == Field::Offset,
            };
            let pick: Vec<_> = fields.iter().filter(|f| want(f.2)).collect();
            let &&(pos, width, kind) = &pick[rng.gen_range(0..pick.len())];
            let old = if width == 8 {
                u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap())
            } else {
                u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as u64
            };
            let new = match rng.gen_range(0..5) {
                0 if width == 4 => BOUNDARY_U32[rng.gen_range(0..BOUNDARY_U32.len())] as u64,
                0 | 1 => BOUNDARY_U64[rng.gen_range(0..BOUNDARY_U64.len())],
                2 => old.wrapping_add(rng.gen_range(1..64)),
                3 => old.wrapping_sub(rng.gen_range(1..64)),
                _ => old.wrapping_mul(rng.gen_range(2..1 << 20)),
            };
            if width == 8 {
                bytes[pos..pos + 8].copy_from_slice(&new.to_le_bytes());
            } else {
                bytes[pos..pos + 4].copy_from_slice(&(new as u32).to_le_bytes());
            }
            any(format!("{kind:?} at {pos}: {old} -> {new}"), bytes)
        }
        "nan-inf-data" => nan_inf(base, bytes, rng),
        "tensor-edit" => tensor_edit(base, rng),
        "metadata-edit" => metadata_edit(base, rng),
        "vocab-edit" => vocab_edit(base, rng),
        _ => unreachable!(),
    }
}

fn nan_inf(base: &Base, mut bytes: Vec<u8>, rng: &mut StdRng) -> Mutant {
    let floats: Vec<_> = base
        .gguf
        .tensors()
        .iter()
        .filter(|t| matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16) && t.n_elements > 0)
        .collect();
    let t = floats[rng.gen_range(0..floats.len())];
    let start = (base.gguf.data_offset() + t.offset) as usize;
    let n = rng.gen_range(1..=16);
    for _ in 0..n {
        let i = rng.gen_range(0..t.n_elements as usize);
        if t.ggml_type == GgmlType::F32 {
            let v =
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e30][rng.gen_range(0..5)];
            bytes[start + 4 * i..start + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        } else {
            // f16 NaN, +inf, -inf, max
            let v: u16 = [0x7e00, 0x7c00, 0xfc00, 0x7bff][rng.gen_range(0..4)];
            bytes[start + 2 * i..start + 2 * i + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    Mutant {
        what: format!("{n} values of {}", t.name),
        bytes,
        expect: Expect::Any,
    }
}

fn random_data(rng: &mut StdRng, ty: GgmlType, dims: &[u64]) -> Option<Vec<u8>> {
    let n: u64 = dims.iter().product();
    let size = ty.bytes_for(n)?;
    if size > 16 << 20 {
        return None;
    }
    let mut v = vec![0u8; size as usize];
    // Small random values in f32 form are plausible weights; for other types random bytes.
    if ty == GgmlType::F32 {
        for c in v.chunks_exact_mut(4) {
            c.copy_from_slice(&(rng.gen_range(-1.0f32..1.0)).to_le_bytes());
        }
    } else {
        rng.fill(&mut v[..]);
    }
    Some(v)
}

fn tensor_edit(base: &Base, rng: &mut StdRng) -> Mutant {
    let mut w = base.writer();
    let tensors = base.gguf.tensors();
    let t = &tensors[rng.gen_range(0..tensors.len())];
    let (what, expect) = loop {
        match rng.gen_range(0..6) {
            // Another type, with data of that type's size.
            0 | 1 => {
                let ty = GgmlType::ALL[rng.gen_range(0..GgmlType::ALL.len())];
                if ty == t.ggml_type || t.dims.first().is_some_and(|&d| d % ty.block_size() != 0) {
                    continue;
                }
                let Some(data) = random_data(rng, ty, &t.dims) else {
                    continue;
                };
                w.replace_tensor(&t.name, &t.dims, ty, data).unwrap();
                let vector = t.dims.len() == 1;
                let refused =
                    (vector && ty != GgmlType::F32) || !ottkv::model::check::cpu_can_multiply(ty);
                break (
                    format!("{} {} -> {ty}", t.name, t.ggml_type),
                    if refused {
                        Expect::Refused
                    } else {
                        Expect::Any
                    },
                );
            }
            // Another shape.
            2 | 3 => {
                let mut dims = t.dims.clone();
                match rng.gen_range(0..5) {
                    0 => dims.reverse(),
                    1 => dims.push(rng.gen_range(1..4)),
                    2 => {
                        dims.pop();
                    }
                    3 => {
                        let i = rng.gen_range(0..dims.len().max(1));
                        if let Some(d) = dims.get_mut(i) {
                            *d = (*d / 2).max(1);
                        }
                    }
                    _ => {
                        if let Some(d) = dims.first_mut() {
                            *d += t.ggml_type.block_size();
                        }
                    }
                }
                if dims == t.dims
                    || dims
                        .first()
                        .is_some_and(|&d| d % t.ggml_type.block_size() != 0)
                {
                    continue;
                }
                let Some(data) = random_data(rng, t.ggml_type, &dims) else {
                    continue;
                };
                w.replace_tensor(&t.name, &dims, t.ggml_type, data).unwrap();
                break (
                    format!("{} {:?} -> {dims:?}", t.name, t.dims),
                    Expect::Refused,
                );
            }
            // Renamed, removed, or one more tensor.
            4 => {
                let name = match rng.gen_range(0..4) {
                    0 => "rope_freqs.weight".to_string(),
                    1 => t.name.replacen("blk.0.", "blk.99.", 1),
                    2 => format!("{}x", t.name),
                    _ => t.name.replacen(".weight", ".bias", 1),
                };
                if name == t.name || base.gguf.tensor(&name).is_some() {
                    continue;
                }
                let data = base
                    .gguf
                    .tensor_data(&base.bytes, &t.name)
                    .unwrap()
                    .to_vec();
                w.remove_tensor(&t.name);
                w.add_tensor(&name, &t.dims, t.ggml_type, data).unwrap();
                // Even where the old name was optional, the new one is a tensor neither engine
                // would use the same way.
                break (format!("{} renamed {name}", t.name), Expect::Refused);
            }
            _ => {
                if rng.gen_bool(0.5) {
                    w.remove_tensor(&t.name);
                    let expect = if t.name == "output.weight" {
                        Expect::Any
                    } else {
                        Expect::Refused
                    };
                    break (format!("{} removed", t.name), expect);
                }
                let data = random_data(rng, GgmlType::F32, &[16]).unwrap();
                w.add_tensor("blk.0.attn_qkv.weight", &[16], GgmlType::F32, data)
                    .unwrap();
                break ("extra tensor blk.0.attn_qkv.weight".into(), Expect::Refused);
            }
        }
    };
    Mutant {
        what,
        bytes: w.to_bytes(),
        expect,
    }
}

fn arch(base: &Base) -> String {
    base.gguf.architecture().unwrap().to_string()
}

fn metadata_edit(base: &Base, rng: &mut StdRng) -> Mutant {
    let mut w = base.writer();
    let a = arch(base);
    let k = |s: &str| format!("{a}.{s}");
    let n_layer = base.gguf.get_u32(&k("block_count")).unwrap();
    let (what, expect) = match rng.gen_range(0..10) {
        0 | 1 => {
            let v = [0, 0x8000_0000, u32::MAX, 513, n_layer + 1, n_layer - 1][rng.gen_range(0..6)];
            w.set_kv(k("block_count"), v).unwrap();
            (format!("block_count {v}"), Expect::Refused)
        }
        2 => {
            let key = [
                "attention.head_count",
                "attention.head_count_kv",
                "embedding_length",
                "feed_forward_length",
                "attention.key_length",
                "attention.value_length",
                "rope.dimension_count",
            ][rng.gen_range(0..7)];
            let old = base.gguf.get_u32(&k(key)).unwrap_or(0);
            let v = [0, 1, 3, old * 2, old + 1, 0x8000_0000, u32::MAX][rng.gen_range(0..7)];
            w.set_kv(k(key), v).unwrap();
            let expect = if v == old {
                Expect::Any
            } else {
                Expect::Refused
            };
            (format!("{key} {old} -> {v}"), expect)
        }
        3 => {
            let v = [0u32, 1, 7, u32::MAX][rng.gen_range(0..4)];
            w.set_kv(k("context_length"), v).unwrap();
            let expect = if v == 0 { Expect::Refused } else { Expect::Any };
            (format!("context_length {v}"), expect)
        }
        4 => {
            let (key, v) = [
                ("attention.layer_norm_rms_epsilon", f32::NAN),
                ("attention.layer_norm_rms_epsilon", -1.0),
                ("attention.layer_norm_rms_epsilon", 0.0),
                ("rope.freq_base", f32::INFINITY),
                ("rope.freq_base", 0.0),
            ][rng.gen_range(0..5)];
            w.set_kv(k(key), v).unwrap();
            (format!("{key} {v}"), Expect::Refused)
        }
        5 => {
            let (key, v, expect): (&str, Value, Expect) = [
                ("expert_count", Value::U32(8), Expect::Refused),
                ("expert_used_count", Value::U32(2), Expect::Refused),
                ("nextn_predict_layers", Value::U32(4), Expect::Refused),
                (
                    "rope.scaling.type",
                    Value::String("wavy".into()),
                    Expect::Refused,
                ),
                (
                    "rope.scaling.type",
                    Value::String("yarn".into()),
                    Expect::Any,
                ),
                ("rope.scaling.factor", Value::F32(f32::NAN), Expect::Refused),
            ][rng.gen_range(0..6)]
            .clone();
            w.set_kv(k(key), v.clone()).unwrap();
            (format!("{key} = {v:?}"), expect)
        }
        6 => {
            // A count stored as another type.
            let key = ["block_count", "embedding_length", "context_length"][rng.gen_range(0..3)];
            let old = base.gguf.get_u32(&k(key)).unwrap();
            let v = match rng.gen_range(0..4) {
                0 => Value::String(old.to_string()),
                1 => Value::F32(old as f32),
                2 => Value::Array(Array::U32(vec![old; 3])),
                _ => Value::U64(old as u64),
            };
            let expect = if matches!(v, Value::U64(_)) {
                Expect::Any
            } else {
                Expect::Refused
            };
            w.set_kv(k(key), v.clone()).unwrap();
            (format!("{key} as {:?}", v.value_type()), expect)
        }
        7 => {
            let keys: Vec<String> = base.gguf.metadata().map(|(k, _)| k.to_string()).collect();
            let key = &keys[rng.gen_range(0..keys.len())];
            w.remove_kv(key);
            (format!("removed {key}"), Expect::Any)
        }
        8 => {
            let v = [1u32, 8, 64, 4096, 1 << 16][rng.gen_range(0..5)];
            w.set_kv("general.alignment", v).unwrap();
            (format!("alignment {v}"), Expect::Any)
        }
        _ => {
            let v = [f32::NAN, 2.5, -1.0][rng.gen_range(0..3)];
            w.set_kv(
                "general.architecture",
                ["llama", "qwen2", "gpt2", "bert", ""][rng.gen_range(0..5)],
            )
            .unwrap();
            w.set_kv("general.name", Value::F32(v)).unwrap();
            (
                "architecture swapped, name not a string".into(),
                Expect::Any,
            )
        }
    };
    Mutant {
        what,
        bytes: w.to_bytes(),
        expect,
    }
}

fn vocab_edit(base: &Base, rng: &mut StdRng) -> Mutant {
    let mut w = base.writer();
    let tokens = base
        .gguf
        .get_array("tokenizer.ggml.tokens")
        .unwrap()
        .as_strings()
        .unwrap()
        .to_vec();
    let n = tokens.len();
    let model = base
        .gguf
        .get_str("tokenizer.ggml.model")
        .unwrap()
        .to_string();
    let set_tokens = |w: &mut GgufWriter, t: Vec<String>| {
        w.set_kv("tokenizer.ggml.tokens", Array::String(t)).unwrap()
    };
    let (what, expect) = match rng.gen_range(0..9) {
        0 | 1 => {
            // Two tokens with one text: one flipped byte of the vocabulary suffices in practice,
            // a NUL too (llama.cpp reads tokens as C strings).
            let (i, j) = (rng.gen_range(0..n), rng.gen_range(0..n));
            if i == j {
                return vocab_edit(base, rng);
            }
            let mut t = tokens.clone();
            let nul = rng.gen_bool(0.3);
            t[i] = if nul {
                format!("{}\0{}", t[j], rng.gen_range(0..1000))
            } else {
                t[j].clone()
            };
            set_tokens(&mut w, t);
            let how = if nul { " before a NUL" } else { "" };
            (
                format!("token {i} = token {j} {:?}{how}", tokens[j]),
                Expect::Refused,
            )
        }
        2 => {
            let m = [
                "none", "no_vocab", "bert", "t5", "rwkv", "plamo2", "", "LLAMA",
            ][rng.gen_range(0..8)];
            w.set_kv("tokenizer.ggml.model", m).unwrap();
            (format!("tokenizer model {m:?}"), Expect::Refused)
        }
        3 => {
            let other = if model == "llama" { "gpt2" } else { "llama" };
            w.set_kv("tokenizer.ggml.model", other).unwrap();
            // llama -> gpt2 lacks merges; gpt2 -> llama lacks <0xXX> byte tokens.
            (
                format!("tokenizer model {model} -> {other}"),
                Expect::Refused,
            )
        }
        4 => {
            let key = [
                "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges",
            ][rng.gen_range(0..3)];
            let v = match rng.gen_range(0..3) {
                0 => Value::Array(Array::I32(vec![1; n / 2])),
                1 => Value::Array(Array::F64(vec![0.0; n])),
                _ => Value::U32(7),
            };
            w.set_kv(key, v).unwrap();
            let expect = if key.ends_with("merges") && model == "llama" {
                Expect::Any
            } else {
                Expect::Refused
            };
            (format!("{key} replaced"), expect)
        }
        5 => {
            let key = [
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id",
            ][rng.gen_range(0..4)];
            let (v, expect) = match rng.gen_range(0..3) {
                0 => (Value::U32(n as u32), Expect::Any),
                1 => (Value::U32(u32::MAX), Expect::Any),
                _ => (Value::I32(-1), Expect::Refused),
            };
            w.set_kv(key, v.clone()).unwrap();
            (format!("{key} = {v:?}"), expect)
        }
        6 => {
            let (key, v, expect) = [
                (
                    "tokenizer.ggml.add_bos_token",
                    Value::U8(1),
                    Expect::Refused,
                ),
                (
                    "tokenizer.ggml.add_eos_token",
                    Value::Bool(true),
                    Expect::Any,
                ),
                (
                    "tokenizer.ggml.add_bos_token",
                    Value::Bool(false),
                    Expect::Any,
                ),
            ][rng.gen_range(0..3)]
            .clone();
            w.set_kv(key, v.clone()).unwrap();
            (format!("{key} = {v:?}"), expect)
        }
        7 => {
            let mut t = tokens.clone();
            let i = rng.gen_range(0..n);
            let (desc, expect) = match rng.gen_range(0..4) {
                0 => {
                    t[i] = String::new();
                    ("empty", Expect::Any)
                }
                1 => {
                    t[i] = "x".repeat(rng.gen_range(100..100_000));
                    ("very long", Expect::Any)
                }
                2 => {
                    t.pop();
                    ("last removed", Expect::Refused)
                }
                _ => {
                    t.push("<extra>".into());
                    ("one more", Expect::Refused)
                }
            };
            set_tokens(&mut w, t);
            // An edited byte token of a SentencePiece vocabulary loses its byte fallback,
            // unless the byte is ASCII and also a one-character token.
            let byte = tokens[i]
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            let lost_byte = model == "llama"
                && desc != "one more"
                && byte.is_some_and(|b| !(b < 0x80 && tokens.iter().any(|t| t.as_bytes() == [b])));
            let expect = if lost_byte { Expect::Refused } else { expect };
            (format!("token {i} {desc}"), expect)
        }
        _ => {
            w.remove_kv("tokenizer.ggml.tokens");
            ("tokens removed".into(), Expect::Refused)
        }
    };
    Mutant {
        what,
        bytes: w.to_bytes(),
        expect,
    }
}

// ---- Running the children -------------------------------------------------------------------

#[derive(Debug)]
enum Outcome {
    Exit(i32),
    Signal(i32),
    Timeout,
}

struct Run {
    outcome: Outcome,
    stderr: String,
}

fn run_child(args: &[String], timeout: Duration) -> Run {
    let bin = std::env::var_os("OTTKV_FUZZ_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ottkv")));
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "off")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ottkv");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    // Drained on a thread so a chatty child never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status: Option<ExitStatus> = loop {
        match child.try_wait().expect("waiting for ottkv") {
            Some(st) => break Some(st),
            None if t0.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let stderr = reader.join().unwrap_or_default();
    let outcome = match status {
        None => Outcome::Timeout,
        Some(st) => match st.code() {
            Some(c) => Outcome::Exit(c),
            None => {
                Outcome::Signal(std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(-1))
            }
        },
    };
    Run { outcome, stderr }
}

/// Kinds of failure, for the summary.
const KINDS: [&str; 5] = [
    "abort (signal)",
    "panic",
    "hang",
    "bad exit",
    "accepted invalid",
];

/// Why a child's end is a failure, if it is one: (index into KINDS, message).
fn verdict(run: &Run, expect: Expect, validating: bool) -> Option<(usize, String)> {
    match run.outcome {
        Outcome::Signal(s) => Some((0, format!("killed by signal {s}"))),
        Outcome::Timeout => Some((2, "timed out".into())),
        Outcome::Exit(101) => Some((1, "panicked (exit 101)".into())),
        _ if run.stderr.contains("internal error") => {
            Some((1, "internal error (a caught panic)".into()))
        }
        Outcome::Exit(0) if validating && expect == Expect::Refused => {
            Some((4, "exit 0 for a file that must be refused".into()))
        }
        Outcome::Exit(0) => None,
        Outcome::Exit(c @ (1 | 2)) => {
            if run.stderr.lines().any(|l| l.starts_with("error: ")) {
                None
            } else {
                Some((3, format!("exit {c} without an `error:` line")))
            }
        }
        Outcome::Exit(c) => Some((3, format!("exit status {c}"))),
    }
}

fn commands(i: usize, file: &Path, text: &Path) -> Vec<(Vec<String>, bool)> {
    let f = file.display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cache = if i % 2 == 0 { "f16" } else { "ott2" };
    let mut out = vec![(
        s(&[
            "generate", "-m", &f, "-p", PROMPT, "-n", "1", "-c", "64", "-t", "1", "--cache", cache,
        ]),
        true,
    )];
    if i % 2 == 0 {
        let t = text.display().to_string();
        out.push((
            s(&[
                "perplexity",
                "-m",
                &f,
                "-f",
                &t,
                "-c",
                "16",
                "--chunks",
                "1",
                "-t",
                "1",
                "--cache",
                "llama:f16",
            ]),
            true,
        ));
    } else {
        out.push((s(&["inspect", &f, "--json"]), false));
    }
    out
}

struct Failure {
    mutant: usize,
    base: &'static str,
    class: &'static str,
    what: String,
    command: String,
    kind: usize,
    why: String,
    stderr_tail: String,
    kept: Option<PathBuf>,
}

#[derive(Default)]
struct Tally {
    /// (base, class) -> [exit 0, exit 1, exit 2]
    exits: BTreeMap<(String, String), [usize; 3]>,
    children: usize,
    failures: Vec<Failure>,
}

fn main() {
    let n_mutants: usize = env_or("OTTKV_FUZZ_MUTANTS", DEFAULT_MUTANTS);
    let seed = seed_from_env(DEFAULT_SEED);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs: usize = env_or("OTTKV_FUZZ_JOBS", cores.min(2)).max(1);
    let timeout = Duration::from_secs(env_or("OTTKV_FUZZ_TIMEOUT_S", 30));
    let only: Option<usize> = std::env::var("OTTKV_FUZZ_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    let keep_dir = std::env::var_os("OTTKV_FUZZ_KEEP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures"));

    let bases = bases();
    if let Some(dir) = std::env::var_os("OTTKV_FUZZ_WRITE_BASES").map(PathBuf::from) {
        std::fs::create_dir_all(&dir).unwrap();
        for b in &bases {
            std::fs::write(dir.join(format!("{}.gguf", b.name)), &b.bytes).unwrap();
        }
        println!("wrote the bases to {}", dir.display());
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, TEXT.repeat(4)).unwrap();
    let n_mutants = if only.is_some() { 1 } else { n_mutants };
    println!(
        "fuzz_load: {n_mutants} mutants (seed {seed:#x}) of {} over {} classes, {jobs} at a time, timeout {timeout:?}",
        bases.iter().map(|b| b.name).collect::<Vec<_>>().join(", "),
        CLASSES.len()
    );

    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let tally = Mutex::new(Tally::default());
    let range: Vec<usize> = match only {
        Some(i) => vec![i],
        None => (0..n_mutants).collect(),
    };
    std::thread::scope(|sc| {
        for job in 0..jobs {
            let (bases, range, next, tally, tmp, text, keep_dir) =
                (&bases, &range, &next, &tally, tmp.path(), &text, &keep_dir);
            sc.spawn(move || {
                let file = tmp.join(format!("mutant-{job}.gguf"));
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = range.get(k) else { break };
                    let base = &bases[i % bases.len()];
                    let class = CLASSES[(i / bases.len()) % CLASSES.len()];
                    let mut rng = StdRng::seed_from_u64(
                        seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    let m = mutate(base, class, &mut rng);
                    std::fs::write(&file, &m.bytes).unwrap();
                    for (args, validating) in commands(i, &file, text) {
                        let run = run_child(&args, timeout);
                        if only.is_some() {
                            println!(
                                "mutant {i} ({} {class}: {}), expect {:?}\n$ ottkv {}\n-> {:?}\n{}",
                                base.name,
                                m.what,
                                m.expect,
                                args.join(" "),
                                run.outcome,
                                run.stderr
                            );
                        }
                        let mut t = tally.lock().unwrap();
                        t.children += 1;
                        if let (Outcome::Exit(c @ 0..=2), true) = (&run.outcome, validating) {
                            t.exits
                                .entry((base.name.to_string(), class.to_string()))
                                .or_default()[*c as usize] += 1;
                        }
                        if let Some((kind, why)) = verdict(&run, m.expect, validating) {
                            let kept = std::fs::create_dir_all(keep_dir).ok().and_then(|_| {
                                let p = keep_dir.join(format!("mutant-{seed:x}-{i}.gguf"));
                                std::fs::write(&p, &m.bytes).ok().map(|_| p)
                            });
                            // ggml prints a gdb backtrace after its assert: show the assert.
                            let key = run.stderr.lines().find(|l| {
                                l.contains("GGML_ASSERT")
                                    || l.contains("GGML_ABORT")
                                    || l.contains("terminate called")
                                    || l.contains("what():")
                                    || l.starts_with("error:")
                                    || l.contains("panicked")
                            });
                            let tail: Vec<&str> = match key {
                                Some(l) => vec![l],
                                None => run.stderr.lines().rev().take(4).collect(),
                            };
                            t.failures.push(Failure {
                                mutant: i,
                                base: base.name,
                                class,
                                what: m.what.clone(),
                                command: args[0].clone(),
                                kind,
                                why,
                                stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                                kept,
                            });
                        }
                    }
                }
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let t = tally.into_inner().unwrap();
    println!(
        "{:<30} {:<14} {:>7} {:>7} {:>7}",
        "base", "class", "exit 0", "exit 1", "exit 2"
    );
    for ((b, c), e) in &t.exits {
        println!("{b:<30} {c:<14} {:>7} {:>7} {:>7}", e[0], e[1], e[2]);
    }
    let by_kind: Vec<String> = KINDS
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let n = t.failures.iter().filter(|f| f.kind == k).count();
            format!("{n} {name}")
        })
        .collect();
    println!(
        "fuzz_load: {} mutants, {} children in {secs:.1} s: {} failures ({})",
        range.len(),
        t.children,
        t.failures.len(),
        by_kind.join(", ")
    );
    for f in t.failures.iter().take(40) {
        println!(
            "FAIL mutant {} [{} {}] {}: `ottkv {}` {}{}\n    {}",
            f.mutant,
            f.base,
            f.class,
            f.what,
            f.command,
            f.why,
            f.kept
                .as_ref()
                .map(|p| format!(" (kept: {})", p.display()))
                .unwrap_or_default(),
            f.stderr_tail.replace('\n', "\n    ")
        );
    }
    if !t.failures.is_empty() {
        println!("rerun one: OTTKV_FUZZ_SEED={seed:#x} OTTKV_FUZZ_ONLY=<mutant> cargo test --release --test fuzz_load");
        std::process::exit(1);
    }
}
