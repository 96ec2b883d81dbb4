//! How a cache is named, parsed once: llama.cpp's block types (`f16`, `q8_0`, `q4_0`, `q2_0`,
//! with `-norot`), or our cache (a preset or a spec string); the `llama:` prefix that makes
//! llama.cpp itself run a row; and lists of them. Every command, the C library and the JSON
//! name caches through this module.

use crate::cache::{CacheConfig, CacheError};
use crate::gguf::GgmlType;
use std::fmt;
use std::str::FromStr;

/// llama.cpp's KV-cache element types (ggml block types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockType {
    F16,
    Q8_0,
    Q4_0,
    Q2_0,
}

impl BlockType {
    pub const ALL: [BlockType; 4] = [Self::F16, Self::Q8_0, Self::Q4_0, Self::Q2_0];

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q2_0 => "q2_0",
        }
    }

    /// The GGUF/ggml type id of this block type.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            Self::F16 => GgmlType::F16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q2_0 => GgmlType::Q2_0,
        }
    }

    /// Bits per element.
    pub fn bits(self) -> f64 {
        let t = self.ggml_type();
        8.0 * t.type_size() as f64 / t.block_size() as f64
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl fmt::Display for BlockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a cache name was refused.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    #[error("`-norot` applies to llama.cpp's block types (f16, q8_0, q4_0, q2_0), not {base:?}")]
    NoRot { base: String },
    #[error("llama.cpp runs its own cache types only (f16, q8_0, q4_0, q2_0), not {name:?}")]
    NotLlama { name: String },
    #[error("no cache named in {list:?}")]
    EmptyList { list: String },
    #[error(transparent)]
    Spec(#[from] CacheError),
}

/// A cache: one of llama.cpp's block types as ggml tensors, or ours.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheKind {
    /// `rotate`: llama.cpp's Hadamard rotation of quantized caches (on by default, as in
    /// llama.cpp; `-norot` turns it off; f16 is never rotated).
    Block { ty: BlockType, rotate: bool },
    /// Our cache: any preset or spec string.
    Ott(CacheConfig),
}

impl CacheKind {
    /// KV bytes this cache allocates for a sequence of up to `n_tokens` tokens, from the
    /// closed forms: ggml caches hold whole 256-cell pads, as llama.cpp's; ours is
    /// `expected_memory` (with its window rings), which equals what the cache reports
    /// (tested). Where our cache chooses row precision itself, this prices the f16 rows it
    /// starts with.
    pub fn bytes_at(
        &self,
        hp: &crate::gguf::ModelHparams,
        n_tokens: usize,
    ) -> crate::Result<usize> {
        if n_tokens == 0 {
            return Err(crate::Error::InvalidArgument(
                "bytes_at: zero tokens".into(),
            ));
        }
        Ok(match self {
            CacheKind::Block { ty, .. } => {
                crate::model::kv::ggml_cache_bytes(ty.ggml_type(), hp, n_tokens)
            }
            CacheKind::Ott(c) => crate::model::kv::ott_expected_bytes(c, hp, n_tokens)?,
        })
    }
}

impl FromStr for CacheKind {
    type Err = KindError;
    fn from_str(name: &str) -> Result<Self, KindError> {
        let name = name.trim();
        let (base, rotate) = match name.strip_suffix("-norot") {
            Some(b) => (b, false),
            None => (name, true),
        };
        match BlockType::parse(base) {
            Some(ty) => Ok(CacheKind::Block {
                ty,
                rotate: rotate && ty != BlockType::F16,
            }),
            None if !rotate => Err(KindError::NoRot { base: base.into() }),
            None => Ok(CacheKind::Ott(name.parse()?)),
        }
    }
}

impl fmt::Display for CacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheKind::Block { ty, rotate } => {
                let norot = !rotate && *ty != BlockType::F16;
                write!(f, "{ty}{}", if norot { "-norot" } else { "" })
            }
            CacheKind::Ott(c) => write!(f, "{c}"),
        }
    }
}

/// Which engine runs a row of an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Engine {
    #[serde(rename = "llama.cpp")]
    Llama,
    #[serde(rename = "ottkv")]
    Ours,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Llama => "llama.cpp",
            Engine::Ours => "ottkv",
        }
    }
}

/// An engine and a cache: `llama:q4_0` / `llama.cpp:q4_0` (llama.cpp with its own cache) or a
/// plain cache name (our engine). `name` is the cache as written (`recommended`, `ott3a`),
/// kept for labels; `kind` is what it stands for.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheRow {
    pub engine: Engine,
    pub name: String,
    pub kind: CacheKind,
}

impl CacheRow {
    pub fn label(&self) -> String {
        format!("{} {}", self.engine.name(), self.name)
    }

    /// KV bits per cached element (K and V, all layers) this row allocates for a sequence of
    /// `n_tokens` tokens ([`CacheKind::bytes_at`] per element).
    pub fn bits_at(&self, hp: &crate::gguf::ModelHparams, n_tokens: usize) -> crate::Result<f64> {
        let elems = 2.0 * hp.n_layer as f64 * hp.n_head_kv as f64 * hp.head_dim_k as f64;
        let bytes = self.kind.bytes_at(hp, n_tokens)?;
        Ok(bytes as f64 * 8.0 / (elems * n_tokens as f64))
    }

    /// The llama.cpp block type of a `llama:` row.
    pub fn llama_type(&self) -> Option<BlockType> {
        match (self.engine, &self.kind) {
            (Engine::Llama, CacheKind::Block { ty, .. }) => Some(*ty),
            _ => None,
        }
    }
}

impl FromStr for CacheRow {
    type Err = KindError;
    fn from_str(s: &str) -> Result<Self, KindError> {
        let s = s.trim();
        for prefix in ["llama.cpp:", "llama:"] {
            if let Some(c) = s.strip_prefix(prefix) {
                let c = c.trim();
                return match BlockType::parse(c) {
                    Some(ty) => Ok(CacheRow {
                        engine: Engine::Llama,
                        name: c.into(),
                        kind: CacheKind::Block {
                            ty,
                            rotate: ty != BlockType::F16,
                        },
                    }),
                    None => Err(KindError::NotLlama { name: c.into() }),
                };
            }
        }
        Ok(CacheRow {
            engine: Engine::Ours,
            name: s.into(),
            kind: s.parse()?,
        })
    }
}

/// Splits a list of cache names. `;` separates them when present (a spec's own fields use
/// commas: `ott3a:r=8,e=8;q4_0`); otherwise commas do, a part with `=` and no `:` continuing
/// the previous spec (the older form, kept working).
pub fn split_cache_list(list: &str) -> Vec<String> {
    let parts = |sep| list.split(sep).map(str::trim).filter(|p| !p.is_empty());
    if list.contains(';') {
        return parts(';').map(String::from).collect();
    }
    let mut out: Vec<String> = Vec::new();
    for part in parts(',') {
        match out.last_mut() {
            Some(prev) if part.contains('=') && !part.contains(':') && prev.contains(':') => {
                prev.push(',');
                prev.push_str(part);
            }
            _ => out.push(part.to_string()),
        }
    }
    out
}

/// Every row named in `lists` (each a list as [`split_cache_list`] reads it: a repeated
/// option gives several), parsed; an empty result is an error.
pub fn parse_rows<T: FromStr<Err = KindError>>(
    lists: &[String],
) -> Result<Vec<(String, T)>, KindError> {
    let names: Vec<String> = lists.iter().flat_map(|l| split_cache_list(l)).collect();
    if names.is_empty() {
        return Err(KindError::EmptyList {
            list: lists.join(" "),
        });
    }
    names
        .into_iter()
        .map(|n| {
            let k = n.parse()?;
            Ok((n, k))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_keep_spec_fields_together() {
        assert_eq!(
            split_cache_list("f16,ott2:k=3,v=2,g=64,q4_0, kivi2 ,ott:p=0"),
            ["f16", "ott2:k=3,v=2,g=64", "q4_0", "kivi2", "ott:p=0"]
        );
        assert_eq!(
            split_cache_list("ott3a:r=8,e=8; q4_0;;llama:f16"),
            ["ott3a:r=8,e=8", "q4_0", "llama:f16"]
        );
        assert!(split_cache_list(" , ").is_empty());
        assert!(matches!(
            parse_rows::<CacheKind>(&[" ; ".into()]),
            Err(KindError::EmptyList { .. })
        ));
    }

    #[test]
    fn names_round_trip() {
        for name in ["f16", "q8_0", "q4_0", "q2_0", "q4_0-norot", "q8_0-norot"] {
            let k: CacheKind = name.parse().unwrap();
            assert_eq!(k.to_string(), name);
        }
        assert_eq!(
            "f16-norot".parse::<CacheKind>().unwrap(),
            CacheKind::Block {
                ty: BlockType::F16,
                rotate: false
            }
        );
        let r: CacheKind = "recommended".parse().unwrap();
        let CacheKind::Ott(c) = &r else {
            panic!("{r:?}")
        };
        assert_eq!(r.to_string().parse::<CacheKind>().unwrap(), r, "{c}");
        assert!(matches!(
            "ott3a-norot".parse::<CacheKind>(),
            Err(KindError::NoRot { .. })
        ));
        assert!(matches!(
            "nope".parse::<CacheKind>(),
            Err(KindError::Spec(CacheError::Parse { .. }))
        ));
    }

    #[test]
    fn rows_name_their_engine() {
        let r: CacheRow = "llama.cpp:q4_0".parse().unwrap();
        assert_eq!(
            (r.engine, r.llama_type()),
            (Engine::Llama, Some(BlockType::Q4_0))
        );
        assert_eq!(r.label(), "llama.cpp q4_0");
        let o: CacheRow = " ott4a ".parse().unwrap();
        assert_eq!((o.engine, o.name.as_str()), (Engine::Ours, "ott4a"));
        assert_eq!(o.llama_type(), None);
        for bad in ["llama:ott3a", "llama:q4_0-norot", "llama:"] {
            assert!(
                matches!(bad.parse::<CacheRow>(), Err(KindError::NotLlama { .. })),
                "{bad}"
            );
        }
    }
}
