//! The K/V dump file: post-RoPE Q, K, V of every layer, captured from llama.cpp on a real text
//! (`ottkv dump-kv`), replayed through the caches by `ottkv kv-error`.
//!
//! It is a GGUF file (our writer, our zero-copy reader): tensors `blk.L.{q,k,v}` in f16, shaped
//! `[head_dim, heads, n_tokens]`, and `ottkv.dump.*` metadata naming the model and text.

use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use crate::llama::Captured;
use half::f16;
use std::path::Path;

/// A dump in memory, f32.
pub struct KvDump {
    pub model: String,
    pub text_sha256: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_tokens: usize,
    /// Per layer `[n_tokens][n_head][head_dim]`.
    pub q: Vec<Vec<f32>>,
    /// Per layer `[n_tokens][n_head_kv][head_dim]`.
    pub k: Vec<Vec<f32>>,
    /// Per layer `[n_tokens][n_head_kv][head_dim]`.
    pub v: Vec<Vec<f32>>,
}

impl KvDump {
    /// Rounds the captured activations to f16 (what llama.cpp's f16 cache holds).
    pub fn from_captured(c: Captured, model: String, text_sha256: String) -> Self {
        let round = |v: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            v.into_iter()
                .map(|l| l.into_iter().map(|x| f16::from_f32(x).to_f32()).collect())
                .collect()
        };
        Self {
            model,
            text_sha256,
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            n_tokens: c.n_tokens,
            q: round(c.q),
            k: round(c.k),
            v: round(c.v),
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", Value::String("ottkv-kvdump".into()))?;
        w.add_kv("ottkv.dump.model", Value::String(self.model.clone()))?;
        w.add_kv(
            "ottkv.dump.text_sha256",
            Value::String(self.text_sha256.clone()),
        )?;
        for (k, v) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_head_kv", self.n_head_kv),
            ("head_dim", self.head_dim),
            ("n_tokens", self.n_tokens),
        ] {
            w.add_kv(format!("ottkv.dump.{k}"), Value::U64(v as u64))?;
        }
        let hd = self.head_dim as u64;
        let n = self.n_tokens as u64;
        for l in 0..self.n_layer {
            for (name, data, heads) in [
                ("q", &self.q[l], self.n_head),
                ("k", &self.k[l], self.n_head_kv),
                ("v", &self.v[l], self.n_head_kv),
            ] {
                let bytes: Vec<u8> = data
                    .iter()
                    .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                    .collect();
                w.add_tensor(
                    format!("blk.{l}.{name}"),
                    &[hd, heads as u64, n],
                    GgmlType::F16,
                    bytes,
                )?;
            }
        }
        w.write_to(path)?;
        Ok(())
    }

    pub fn read(path: &Path) -> Result<Self> {
        let f = GgufFile::open(path)?;
        let g = f.gguf();
        if g.get_str_opt("general.architecture")? != Some("ottkv-kvdump") {
            return Err(dump_error(
                path,
                "not a K/V dump (write one with `ottkv dump-kv`)",
            ));
        }
        let dim = |k: &str| -> Result<usize> {
            let v = g.get_u64(&format!("ottkv.dump.{k}"))?;
            usize::try_from(v).map_err(|_| dump_error(path, format!("{k} = {v} is too large")))
        };
        let (n_layer, n_head, n_head_kv) = (dim("n_layer")?, dim("n_head")?, dim("n_head_kv")?);
        let (head_dim, n_tokens) = (dim("head_dim")?, dim("n_tokens")?);
        let mut d = KvDump {
            model: g.get_str("ottkv.dump.model")?.to_string(),
            text_sha256: g.get_str("ottkv.dump.text_sha256")?.to_string(),
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_tokens,
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
        };
        for l in 0..n_layer {
            for (name, heads) in [("q", n_head), ("k", n_head_kv), ("v", n_head_kv)] {
                let tname = format!("blk.{l}.{name}");
                let info = g
                    .tensor(&tname)
                    .ok_or_else(|| dump_error(path, format!("no tensor {tname}")))?;
                let want = [head_dim as u64, heads as u64, n_tokens as u64];
                if info.ggml_type != GgmlType::F16 || info.dims != want {
                    return Err(dump_error(
                        path,
                        format!(
                            "tensor {tname}: {:?} {:?}, expected f16 {want:?}",
                            info.ggml_type, info.dims
                        ),
                    ));
                }
                let vals: Vec<f32> = f
                    .tensor_data(&tname)?
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect();
                match name {
                    "q" => d.q.push(vals),
                    "k" => d.k.push(vals),
                    _ => d.v.push(vals),
                }
            }
        }
        Ok(d)
    }
}

fn dump_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::KvDump {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}
