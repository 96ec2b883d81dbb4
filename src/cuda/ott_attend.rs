//! Host side of `kernels/ott_attend.cu`, `f16_attend.cu` and `attend_merge.cu`: split plan,
//! checked launches, guarded scratch.

use super::launch::{launch, sys, Guarded};
use super::{CudaError, Device};

/// How the sequence is split over blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SplitPlan {
    pub n_split: u32,
    pub split_len: u32,
}

/// Splits `max_tokens` visible tokens so that the grid has about two blocks per SM, with
/// splits of 64..=OTTKV_ATTEND_MAX_SPLIT tokens, a multiple of 16 (whole 2-bit key words).
pub(crate) fn plan_splits(dev: &Device, max_tokens: usize, other_blocks: usize) -> SplitPlan {
    let want = (2 * dev.sm_count() as usize)
        .div_ceil(other_blocks.max(1))
        .max(1);
    let per = max_tokens.max(1).div_ceil(want).next_multiple_of(16);
    let split_len = per.clamp(64, sys::OTTKV_ATTEND_MAX_SPLIT as usize);
    SplitPlan {
        n_split: max_tokens.max(1).div_ceil(split_len) as u32,
        split_len: split_len as u32,
    }
}

/// Dynamic shared memory of an attention block.
pub(crate) fn attend_shared_bytes(head_dim: usize, split_len: u32) -> u32 {
    (sys::OTTKV_ATTEND_ROWS as usize * (head_dim + split_len as usize) * 4) as u32
}

/// Blocks along y: kv heads times row blocks of at most OTTKV_ATTEND_ROWS query heads.
pub(crate) fn row_blocks(n_head: usize, n_head_kv: usize) -> usize {
    n_head_kv * (n_head / n_head_kv).div_ceil(sys::OTTKV_ATTEND_ROWS as usize)
}

/// Per-call buffers of split attention: partial results and the merged output.
pub(crate) struct SplitScratch {
    pub part_o: Guarded<f32>,
    pub part_ml: Guarded<f32>,
    pub out: Guarded<f32>,
}

impl SplitScratch {
    pub(crate) fn new(
        dev: &Device,
        rows: usize,
        plan: SplitPlan,
        head_dim: usize,
    ) -> Result<Self, CudaError> {
        let ns = plan.n_split as usize;
        Ok(Self {
            part_o: Guarded::new(dev, "attention partial outputs", rows * ns * head_dim)?,
            part_ml: Guarded::new(dev, "attention partial max/sum", rows * ns * 2)?,
            out: Guarded::new(dev, "attention output", rows * head_dim)?,
        })
    }

    pub(crate) fn check(&self, dev: &Device) -> Result<(), CudaError> {
        self.part_o.check(dev)?;
        self.part_ml.check(dev)?;
        self.out.check(dev)
    }
}

/// Runs `attend_merge` over `rows` query rows.
pub(crate) fn merge(
    dev: &Device,
    s: &SplitScratch,
    rows: usize,
    plan: SplitPlan,
    head_dim: usize,
) -> Result<(), CudaError> {
    let ns = plan.n_split as usize;
    if s.part_o.len() != rows * ns * head_dim
        || s.part_ml.len() != rows * ns * 2
        || s.out.len() != rows * head_dim
    {
        return Err(CudaError::Shape(
            "attend_merge: scratch does not match rows/splits".into(),
        ));
    }
    let args = sys::ottkv_merge_args {
        part_o: s.part_o.addr(dev),
        part_ml: s.part_ml.addr(dev),
        out: s.out.addr(dev),
        n_rows: rows as u32,
        n_split: plan.n_split,
        head_dim: head_dim as u32,
    };
    // SAFETY: the three buffers have exactly the sizes the kernel indexes (checked above).
    unsafe {
        launch(
            dev,
            "attend_merge",
            "attend_merge",
            (rows as u32, 1, 1),
            128,
            0,
            &args,
        )
    }
}

/// Runs `ott_attend` with fully built arguments. The caller has checked every buffer in
/// `args.c` against `args.d` (sizes for `args.n_seq` sequences) and `q` / scratch sizes.
///
/// # Safety
/// As [`launch`]: the addresses in `args` must cover what the kernel indexes.
pub(crate) unsafe fn ott_attend(
    dev: &Device,
    args: &sys::ottkv_attend_args,
) -> Result<(), CudaError> {
    let hd = args.d.geo.head_dim as usize;
    let grid = (
        args.n_split,
        row_blocks(args.n_head as usize, args.d.n_head_kv as usize) as u32,
        args.n_seq * args.n_q,
    );
    // SAFETY: forwarded from the caller.
    unsafe {
        launch(
            dev,
            "ott_attend",
            "ott_attend",
            grid,
            sys::OTTKV_ATTEND_THREADS,
            attend_shared_bytes(hd, args.split_len),
            args,
        )
    }
}

/// Checks the attention limits the kernels have beyond the CPU cache's: head_dim even and at
/// most OTTKV_ATTEND_MAX_HEAD_DIM (channels per thread live in registers).
pub(crate) fn check_head_dim(head_dim: usize) -> Result<(), CudaError> {
    let max = sys::OTTKV_ATTEND_MAX_HEAD_DIM as usize;
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > max {
        return Err(CudaError::Shape(format!(
            "head_dim {head_dim}: the CUDA attention takes even head sizes up to {max}"
        )));
    }
    Ok(())
}
