//! Host side of `kernels/ott_flush.cu`: one group flush of one layer, all kv heads.

use super::cache::{FlushScratch, LayerBufs, LayerState};
use super::launch::{launch, sys};
use super::{CudaError, Device};
use crate::cache::{CacheConfig, Score};

pub(crate) fn run(
    dev: &Device,
    b: &LayerBufs,
    st: &LayerState,
    s: &FlushScratch,
    n_sink: usize,
    config: &CacheConfig,
    rot: usize,
) -> Result<(), CudaError> {
    let d = &b.dims;
    let (hd, g) = (d.geo.head_dim as usize, d.geo.key_group as usize);
    let h = d.n_head_kv as usize;
    let pmax = s.pool_slots.len() / (2 * h);
    // The scratch must hold this layer's pool and the group, for every head.
    let fits = st.n_groups < d.max_groups as usize
        && st.win_len == d.win_cap as usize
        && st.sink_len + n_sink <= d.sink_cap as usize
        && st.pool_cap as usize <= pmax
        && d.pool_cap as usize <= pmax
        && s.kv.len() == h * 2 * g * hd
        && s.cand.len() >= h * (d.pool_cap as usize + g) * hd
        && s.score.len() >= h * (d.pool_cap as usize + g)
        && s.sel.len() == h * g;
    if !fits {
        return Err(CudaError::Shape(format!(
            "ott_flush: state {st:?} does not fit the layer's buffers {d:?}"
        )));
    }
    let args = sys::ottkv_flush_args {
        c: b.ptrs(dev),
        d: *d,
        pool_slots: b.pool_slots.addr(dev),
        extra_slots: b.extra_slots.addr(dev),
        stopped_at: b.stopped_at.addr(dev),
        scratch_kv: s.kv.addr(dev),
        scratch_cand: s.cand.addr(dev),
        scratch_score: s.score.addr(dev),
        scratch_rank: s.rank.addr(dev),
        scratch_sel: s.sel.addr(dev),
        scratch_pool_slots: s.pool_slots.addr(dev),
        scratch_pool_kv: s.pool_kv.addr(dev),
        group: st.n_groups as u32,
        win_start: st.win_start as u32,
        sink_len: st.sink_len as u32,
        n_sink: n_sink as u32,
        pool_cap: st.pool_cap,
        extra_cap: st.extra_cap,
        score: match config.score {
            Score::L1 => sys::OTTKV_SCORE_L1,
            Score::L2 => sys::OTTKV_SCORE_L2,
        },
        rot: rot as u32,
    };
    // SAFETY: the layer buffers were allocated from `d`; the scratch sizes were checked above
    // against what the kernel indexes per head (pool rows + G candidates, G slots).
    unsafe {
        launch(
            dev,
            "ott_flush",
            "ott_flush",
            (h as u32, 1, 1),
            sys::OTTKV_FLUSH_THREADS,
            0,
            &args,
        )
    }
}
