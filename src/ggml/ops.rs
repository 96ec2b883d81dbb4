//! The ggml operations the engine builds its graphs from. Each checks what ggml would
//! `GGML_ASSERT` (which aborts the process) and returns `Error::Ggml` instead.

use super::context::{Context, Tensor};
use super::sys;
use crate::error::{Error, Result};

fn bad<T>(op: &str, msg: String) -> Result<T> {
    Err(Error::Ggml(format!("{op}: {msg}")))
}

/// ggml's RoPE modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs rotate (llama).
    Normal,
    /// Halves rotate (GPT-NeoX, qwen2).
    Neox,
}

/// RoPE parameters as llama.cpp passes them to `ggml_rope_ext`.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    pub n_dims: i32,
    pub mode: RopeMode,
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

impl Context {
    fn wrap<'c>(&'c self, raw: *mut sys::ggml_tensor) -> Result<Tensor<'c>> {
        Tensor::from_raw(raw)
    }

    /// `a * b`, b repeated over a.
    pub fn mul<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        let (na, nb) = (a.ne(), b.ne());
        if (0..4).any(|i| na[i] % nb[i] != 0) {
            return bad("mul", format!("{nb:?} cannot repeat over {na:?}"));
        }
        // SAFETY: shapes checked; tensors from this context.
        self.wrap(unsafe { sys::ggml_mul(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    pub fn rms_norm<'c>(&'c self, a: Tensor<'c>, eps: f32) -> Result<Tensor<'c>> {
        // SAFETY: any f32 tensor is accepted.
        self.wrap(unsafe { sys::ggml_rms_norm(self.as_ptr(), a.as_ptr(), eps) })
    }

    /// `silu(a) * b` in one op, as llama.cpp's gated FFN.
    pub fn swiglu_split<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        if a.ne() != b.ne() {
            return bad("swiglu", format!("{:?} vs {:?}", a.ne(), b.ne()));
        }
        // SAFETY: equal shapes.
        self.wrap(unsafe { sys::ggml_swiglu_split(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    /// `gelu(a) * b` in one op, as llama.cpp's GELU-gated FFN (gemma3).
    pub fn geglu_split<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        if a.ne() != b.ne() {
            return bad("geglu", format!("{:?} vs {:?}", a.ne(), b.ne()));
        }
        // SAFETY: equal shapes.
        self.wrap(unsafe { sys::ggml_geglu_split(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    /// `a * s`.
    pub fn scale<'c>(&'c self, a: Tensor<'c>, s: f32) -> Result<Tensor<'c>> {
        // SAFETY: any f32 tensor is accepted.
        self.wrap(unsafe { sys::ggml_scale(self.as_ptr(), a.as_ptr(), s) })
    }

    pub fn tanh<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: any f32 tensor is accepted.
        self.wrap(unsafe { sys::ggml_tanh(self.as_ptr(), a.as_ptr()) })
    }

    /// Rows `ids` (i32, `[n]`) of `a [k, rows]` → `[k, n]` f32.
    pub fn get_rows<'c>(&'c self, a: Tensor<'c>, ids: Tensor<'c>) -> Result<Tensor<'c>> {
        if ids.ty() != sys::GGML_TYPE_I32 || ids.ne()[1] != 1 || a.ne()[2] != 1 {
            return bad(
                "get_rows",
                format!("a {:?} ids {:?} (type {})", a.ne(), ids.ne(), ids.ty()),
            );
        }
        // SAFETY: checked as ggml asserts.
        self.wrap(unsafe { sys::ggml_get_rows(self.as_ptr(), a.as_ptr(), ids.as_ptr()) })
    }

    /// `a` and `b` (f32, same shape but in `dim`) joined along `dim`.
    pub fn concat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>, dim: usize) -> Result<Tensor<'c>> {
        let (ea, eb) = (a.ne(), b.ne());
        let alike = (0..4).all(|d| d == dim || ea[d] == eb[d]);
        if dim > 3 || !alike || a.ty() != sys::GGML_TYPE_F32 || b.ty() != sys::GGML_TYPE_F32 {
            return bad("concat", format!("{ea:?} and {eb:?} along {dim}"));
        }
        // SAFETY: shapes and types checked as ggml asserts.
        self.wrap(unsafe { sys::ggml_concat(self.as_ptr(), a.as_ptr(), b.as_ptr(), dim as i32) })
    }

    /// Writes rows of `src [k, n]` (f32) into rows `ids` (i64 `[n]`) of `dst [k, rows]`
    /// (converted to dst's type); returns a view of `dst` to order later reads after it.
    pub fn set_rows<'c>(
        &'c self,
        dst: Tensor<'c>,
        src: Tensor<'c>,
        ids: Tensor<'c>,
    ) -> Result<Tensor<'c>> {
        let (nd, ns, ni) = (dst.ne(), src.ne(), ids.ne());
        if ids.ty() != sys::GGML_TYPE_I64
            || nd[0] != ns[0]
            || ni[0] != ns[1]
            || ns[2] != 1
            || nd[2] != 1
        {
            return bad("set_rows", format!("dst {nd:?} src {ns:?} ids {ni:?}"));
        }
        // SAFETY: checked as ggml asserts.
        self.wrap(unsafe {
            sys::ggml_set_rows(self.as_ptr(), dst.as_ptr(), src.as_ptr(), ids.as_ptr())
        })
    }

    pub fn reshape_2d<'c>(&'c self, a: Tensor<'c>, ne0: i64, ne1: i64) -> Result<Tensor<'c>> {
        self.check_reshape(a, ne0 * ne1)?;
        // SAFETY: contiguous with the same element count.
        self.wrap(unsafe { sys::ggml_reshape_2d(self.as_ptr(), a.as_ptr(), ne0, ne1) })
    }

    pub fn reshape_3d<'c>(
        &'c self,
        a: Tensor<'c>,
        ne0: i64,
        ne1: i64,
        ne2: i64,
    ) -> Result<Tensor<'c>> {
        self.check_reshape(a, ne0 * ne1 * ne2)?;
        // SAFETY: contiguous with the same element count.
        self.wrap(unsafe { sys::ggml_reshape_3d(self.as_ptr(), a.as_ptr(), ne0, ne1, ne2) })
    }

    fn check_reshape(&self, a: Tensor<'_>, n: i64) -> Result<()> {
        // SAFETY: valid tensor.
        let contig = unsafe { sys::ggml_is_contiguous(a.as_ptr()) };
        if !contig || a.n_elements() as i64 != n {
            return bad(
                "reshape",
                format!("{:?} (contiguous: {contig}) to {n} elements", a.ne()),
            );
        }
        Ok(())
    }

    /// A 3-D view of `a` with byte strides `nb1`, `nb2` at byte `offset`.
    #[allow(clippy::too_many_arguments)]
    pub fn view_3d<'c>(
        &'c self,
        a: Tensor<'c>,
        ne: [i64; 3],
        nb1: usize,
        nb2: usize,
        offset: usize,
    ) -> Result<Tensor<'c>> {
        // SAFETY: valid tensor.
        let total = unsafe { sys::ggml_nbytes(a.as_ptr()) };
        let row = a.row_bytes(ne[0]);
        let last = offset + (ne[2] as usize - 1) * nb2 + (ne[1] as usize - 1) * nb1 + row;
        if ne.iter().any(|&d| d <= 0) || last > total {
            return bad(
                "view_3d",
                format!(
                    "{ne:?} nb {nb1}/{nb2} at {offset} past {total} bytes of {:?}",
                    a.ne()
                ),
            );
        }
        // SAFETY: the view lies inside a (checked).
        self.wrap(unsafe {
            sys::ggml_view_3d(
                self.as_ptr(),
                a.as_ptr(),
                ne[0],
                ne[1],
                ne[2],
                nb1,
                nb2,
                offset,
            )
        })
    }

    pub fn permute<'c>(&'c self, a: Tensor<'c>, axes: [i32; 4]) -> Result<Tensor<'c>> {
        let mut seen = [false; 4];
        for &x in &axes {
            if !(0..4).contains(&x) || seen[x as usize] {
                return bad("permute", format!("axes {axes:?}"));
            }
            seen[x as usize] = true;
        }
        // SAFETY: axes are a permutation of 0..4.
        self.wrap(unsafe {
            sys::ggml_permute(
                self.as_ptr(),
                a.as_ptr(),
                axes[0],
                axes[1],
                axes[2],
                axes[3],
            )
        })
    }

    pub fn cont<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: any tensor.
        self.wrap(unsafe { sys::ggml_cont(self.as_ptr(), a.as_ptr()) })
    }

    /// RoPE over `a [head_dim, heads, n]` at positions `pos` (i32 `[n]`).
    /// RoPE of `a [head_dim, heads, n]` at positions `pos` (i32 `[n]`); `freq_factors` (f32,
    /// at least `n_dims / 2`) divide each frequency, as Llama 3's `rope_freqs`.
    pub fn rope<'c>(
        &'c self,
        a: Tensor<'c>,
        pos: Tensor<'c>,
        freq_factors: Option<Tensor<'c>>,
        p: &RopeParams,
    ) -> Result<Tensor<'c>> {
        let na = a.ne();
        if pos.ty() != sys::GGML_TYPE_I32
            || pos.ne()[0] != na[2]
            || p.n_dims > na[0] as i32
            || p.n_dims % 2 != 0
        {
            return bad(
                "rope",
                format!("a {na:?} pos {:?} n_dims {}", pos.ne(), p.n_dims),
            );
        }
        if let Some(f) = freq_factors {
            if f.ty() != sys::GGML_TYPE_F32 || f.ne()[0] < i64::from(p.n_dims / 2) {
                return bad(
                    "rope",
                    format!("freq factors {:?} for n_dims {}", f.ne(), p.n_dims),
                );
            }
        }
        let ff = freq_factors.map_or(std::ptr::null_mut(), |f| f.as_ptr());
        let mode = match p.mode {
            RopeMode::Normal => 0,
            RopeMode::Neox => 2,
        };
        // SAFETY: checked as ggml asserts (the factors' type and length included).
        self.wrap(unsafe {
            sys::ggml_rope_ext(
                self.as_ptr(),
                a.as_ptr(),
                pos.as_ptr(),
                ff,
                p.n_dims,
                mode,
                p.n_ctx_orig,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            )
        })
    }

    /// A custom op computing `out [ne]` (f32) from `args` with `fun`, on `n_tasks` threads
    /// (-1: all of them).
    ///
    /// # Safety
    /// `fun` must not unwind, must only read the args and write `dst`'s data, and `userdata`
    /// must stay valid (and safe to share between ggml's threads) until every graph holding
    /// the op has been computed for the last time.
    pub unsafe fn custom_4d<'c>(
        &'c self,
        ne: [i64; 4],
        args: &[Tensor<'c>],
        fun: sys::ggml_custom_op_t,
        n_tasks: i32,
        userdata: *mut std::ffi::c_void,
    ) -> Result<Tensor<'c>> {
        if ne.iter().any(|&d| d <= 0) || args.len() > 10 {
            return bad("custom_4d", format!("ne {ne:?}, {} args", args.len()));
        }
        let mut raw: Vec<*mut sys::ggml_tensor> = args.iter().map(|t| t.as_ptr()).collect();
        // SAFETY: args are tensors of this context; the caller upholds fun/userdata.
        self.wrap(unsafe {
            sys::ggml_custom_4d(
                self.as_ptr(),
                sys::GGML_TYPE_F32,
                ne[0],
                ne[1],
                ne[2],
                ne[3],
                raw.as_mut_ptr(),
                raw.len() as i32,
                fun,
                n_tasks,
                userdata,
            )
        })
    }
}
