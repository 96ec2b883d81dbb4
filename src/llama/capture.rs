//! Captures post-RoPE Q, K and V of every layer while llama.cpp runs a model, through its graph
//! evaluation callback: the real activations the cache will be fed.

use super::context::{LlamaContext, LlamaContextParams};
use super::model::{LlamaModel, Token};
use crate::error::{Error, Result};
use crate::ggml::sys;
use std::ffi::{c_void, CStr};

/// Q/K/V of every layer for a run of tokens, f32.
pub struct Captured {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_tokens: usize,
    /// Per layer: `[n_tokens][n_head][head_dim]`.
    pub q: Vec<Vec<f32>>,
    /// Per layer: `[n_tokens][n_head_kv][head_dim]`.
    pub k: Vec<Vec<f32>>,
    /// Per layer: `[n_tokens][n_head_kv][head_dim]`.
    pub v: Vec<Vec<f32>>,
    /// Per layer, when asked for: llama.cpp's attention output before the output projection
    /// (`kqv_out`), `[n_tokens][n_head][head_dim]` — a check on what Q/K/V mean.
    pub attn_out: Vec<Vec<f32>>,
}

/// What the callback fills during one `llama_decode`: the latest tensor seen per name, so
/// the post-RoPE `Qcur-L`/`Kcur-L` (named after the pre-RoPE ones) win.
struct State {
    n_layer: usize,
    head_dim: usize,
    n_head: usize,
    want_attn_out: bool,
    /// (kind 0=q 1=k 2=v 3=kqv_out, layer) → `[head_dim, n_heads, n_tokens]` as ggml lays it out.
    latest: Vec<Option<(usize, Vec<f32>)>>,
    error: Option<String>,
}

fn parse_name(name: &str, n_layer: usize) -> Option<(usize, usize)> {
    let (kind, layer) = name.split_once('-')?;
    let kind = match kind {
        "Qcur" => 0,
        "Kcur" => 1,
        "Vcur" => 2,
        "kqv_out" => 3,
        _ => return None,
    };
    let layer: usize = layer.parse().ok()?;
    (layer < n_layer).then_some((kind, layer))
}

unsafe extern "C" fn eval_cb(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: user is the &mut State that `capture` keeps alive across llama_decode, and
        // llama.cpp calls this callback from one thread at a time (the scheduler's).
        let st = unsafe { &mut *(user as *mut State) };
        // SAFETY: t is a live graph node; its name is a NUL-terminated array.
        let tr = unsafe { &*t };
        let name = unsafe { CStr::from_ptr(sys::ggml_get_name(t)) }.to_string_lossy();
        let Some((kind, layer)) = parse_name(&name, st.n_layer) else {
            return !ask;
        };
        // Only the 3-D [head_dim, heads, tokens] f32 tensors are the per-head activations
        // (the 2-D projections before the reshape share the name).
        let wanted = tr.type_ == sys::GGML_TYPE_F32
            && tr.ne[3] == 1
            && tr.nb[0] == 4
            && if kind == 3 {
                st.want_attn_out && tr.ne[0] as usize == st.head_dim * st.n_head && tr.ne[2] == 1
            } else {
                tr.ne[0] as usize == st.head_dim
            };
        if ask {
            return wanted;
        }
        if wanted {
            let (d, heads, toks) = if kind == 3 {
                // [n_head * head_dim, tokens] seen as [head_dim, n_head, tokens]
                (st.head_dim, st.n_head, tr.ne[1] as usize)
            } else {
                (tr.ne[0] as usize, tr.ne[1] as usize, tr.ne[2] as usize)
            };
            // [toks][heads][d], gathered row by row: fused-QKV models give strided views.
            let mut buf = vec![0f32; d * heads * toks];
            for (r, row) in buf.chunks_exact_mut(d).enumerate() {
                let off = if kind == 3 {
                    (r % heads) * d * 4 + (r / heads) * tr.nb[1]
                } else {
                    (r % heads) * tr.nb[1] + (r / heads) * tr.nb[2]
                };
                // SAFETY: row r = (head r % heads, token r / heads) lies inside the tensor's
                // data (ggml's strides), rows of d f32 are contiguous (nb[0] == 4), and `row`
                // has room for d floats.
                unsafe {
                    sys::ggml_backend_tensor_get(t, row.as_mut_ptr() as *mut c_void, off, d * 4)
                };
            }
            st.latest[kind * st.n_layer + layer] = Some((heads, buf));
        }
        true
    }));
    match run {
        Ok(b) => b,
        Err(_) => {
            // SAFETY: as above; record the failure and let llama.cpp continue.
            let st = unsafe { &mut *(user as *mut State) };
            st.error = Some("panic inside the evaluation callback".into());
            !ask
        }
    }
}

/// Runs `tokens` through llama.cpp (f16 cache) in ubatches of `n_batch`, returning Q/K/V
/// (and llama.cpp's attention output with `attn_out`).
pub fn capture_qkv(
    model: &LlamaModel,
    tokens: &[Token],
    n_batch: u32,
    threads: usize,
    attn_out: bool,
) -> Result<Captured> {
    let g = crate::gguf::GgufFile::open(model.path())?;
    let h = crate::gguf::ModelHparams::from_gguf(g.gguf())?;
    let (n_layer, head_dim) = (h.n_layer as usize, h.head_dim_k as usize);
    let (n_head, n_head_kv) = (h.n_head as usize, h.n_head_kv as usize);
    let mut st = Box::new(State {
        n_layer,
        head_dim,
        n_head,
        want_attn_out: attn_out,
        latest: vec![None; 4 * n_layer],
        error: None,
    });
    let p = LlamaContextParams {
        n_ctx: tokens.len().max(1) as u32,
        n_batch,
        threads,
        ..Default::default()
    };
    let user = &mut *st as *mut State as *mut c_void;
    // SAFETY: `st` is boxed (stable address) and outlives `ctx`, which is dropped at the end of
    // this function; eval_cb catches panics.
    let mut ctx = unsafe { LlamaContext::with_eval_callback(model, &p, Some(eval_cb), user)? };
    let mut out = Captured {
        n_layer,
        n_head,
        n_head_kv,
        head_dim,
        n_tokens: tokens.len(),
        q: vec![Vec::with_capacity(tokens.len() * n_head * head_dim); n_layer],
        k: vec![Vec::with_capacity(tokens.len() * n_head_kv * head_dim); n_layer],
        v: vec![Vec::with_capacity(tokens.len() * n_head_kv * head_dim); n_layer],
        attn_out: vec![Vec::new(); if attn_out { n_layer } else { 0 }],
    };
    for chunk in tokens.chunks(ctx_batch(&p)) {
        ctx.decode(chunk, false)?;
        // The callback wrote through `user` during decode; read it back through the box.
        if let Some(e) = st.error.take() {
            return Err(Error::Llama(e));
        }
        for kind in 0..if attn_out { 4 } else { 3 } {
            for layer in 0..n_layer {
                let (heads, data) = st.latest[kind * n_layer + layer].take().ok_or_else(|| {
                    Error::Llama(format!(
                        "layer {layer}: no {} tensor seen in llama.cpp's graph",
                        ["Qcur", "Kcur", "Vcur", "kqv_out"][kind]
                    ))
                })?;
                let want = if kind == 0 || kind == 3 {
                    n_head
                } else {
                    n_head_kv
                };
                if heads != want || data.len() != chunk.len() * want * head_dim {
                    return Err(Error::Llama(format!(
                        "layer {layer}: captured {} heads x {} values, expected {want} x {}",
                        heads,
                        data.len(),
                        chunk.len() * want * head_dim
                    )));
                }
                // ggml's [head_dim, heads, tokens] is row-major [tokens][heads][head_dim].
                [&mut out.q, &mut out.k, &mut out.v, &mut out.attn_out][kind][layer]
                    .extend_from_slice(&data);
            }
        }
    }
    drop(ctx);
    Ok(out)
}

fn ctx_batch(p: &LlamaContextParams) -> usize {
    p.n_batch.min(p.n_ctx).max(1) as usize
}
