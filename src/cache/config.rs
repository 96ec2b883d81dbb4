//! Cache configuration: presets, spec strings and validation.
//!
//! Spec grammar: `<base>` or `<base>:<field>=<value>,...` where `<base>` is a preset name or
//! `ott` (= `ott2`), fields override the base: `k` key bits, `v` value bits, `g` group, `r`
//! residual window, `p` pool, `e` extra pool, `t` untraced leading layers, `s` score (`l1`|`l2`),
//! `gv` value group (`auto` = min(G, head_dim)), `p@L` / `e@L` / `k@L` / `v@L` pool, extra
//! pool, key bits and value bits of layer L (`L` may be a range `A-B`, both ends included),
//! `rot` Hadamard rotation (`0`|`1`|`auto`: keys per head), `sink` exact leading tokens, `wb` bits (16|8) of the
//! window, sinks and pools, `va` value axis (`t` per token over Gv channels, `c` per channel
//! over G tokens), `vp` bits (16|8) of each value group's (scale, min), `vf` / `kf`
//! how value / key grids are fitted (`mm` min/max, `ls` least squares). `s` given a number
//! (`s=4`) means `sink` (scores are only ever `l1`/`l2`, so the two cannot be confused).
//! `Display` writes the fully explicit `ott:` form, which parses back to an equal config; `rot`
//! and `sink` appear only when set, so the pre-existing presets print as they always did.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use super::CacheError;
use crate::format::{
    DEFAULT_EXTRA, DEFAULT_GROUP, DEFAULT_POOL, DEFAULT_RESIDUAL, DEFAULT_UNTRACED_LAYERS,
    KIVI_GROUP, KIVI_RESIDUAL, MAX_BITS, MIN_BITS,
};

/// Upper bounds that keep a hostile spec from asking for absurd allocations.
pub const MAX_GROUP: u32 = 1 << 16;
pub const MAX_RESIDUAL: u32 = 1 << 20;
pub const MAX_POOL: u32 = 1 << 12;
pub const MAX_EXTRA: u32 = 1 << 16;
/// Key groups must be a multiple of this many tokens: a whole number of 2-bit (16 codes) and
/// 4-bit (8 codes) words per channel, so those fast paths never see a partial word.
pub const GROUP_MULTIPLE: u32 = 16;
/// Most layers one `field@A-B` range may name (keeps hostile specs from allocating much).
pub const MAX_LAYER_RANGE: u32 = 4096;
/// Most per-layer settings (one layer of one `field@L`) a spec may make: far above any
/// model's layers times the four per-layer fields, and a bound on what parsing costs.
pub const MAX_LAYER_SETTINGS: usize = 1 << 16;
/// Most leading tokens that [`CacheConfig::sink`] may keep exact (allocated up front).
pub const MAX_SINK: u32 = 1 << 12;

/// How outlier candidates are scored (smallest score wins a pool slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Score {
    /// `Σ|k_c|` over head_dim (OTT.md default).
    #[default]
    L1,
    /// `sqrt(Σ k_c²)`.
    L2,
}

/// Settings of one layer that replace the global ones (`None` keeps the global value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerOverride {
    pub layer: u32,
    pub pool: Option<u32>,
    pub extra: Option<u32>,
    pub key_bits: Option<u32>,
    pub value_bits: Option<u32>,
}

/// Settings of the OTT cache (OTT.md §1–§4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    pub key_bits: u32,
    pub value_bits: u32,
    /// Tokens per key group (G); also the flush size.
    pub group: u32,
    /// Tokens that always stay f16 after a flush (R); the window flushes at R + G.
    pub residual: u32,
    /// Outlier pool capacity (P); 0 turns tracing off.
    pub pool: u32,
    /// Extra pool capacity (E).
    pub extra: u32,
    /// Tracing is off in layers `< untraced_layers`.
    pub untraced_layers: u32,
    pub score: Score,
    /// Channels per value group (Gv); `None` = `min(G, head_dim)`.
    pub value_group: Option<u32>,
    /// Per-layer pool sizes, sorted by layer, one entry per layer.
    pub overrides: Vec<LayerOverride>,
    /// Rotate keys and values by the orthonormal Walsh–Hadamard transform (blocks of the
    /// largest power of two dividing head_dim) before they are stored; the query is rotated
    /// alike and the output rotated back, so callers never see it. Default off.
    pub rotate: Rotation,
    /// The first `sink` tokens of the sequence stay exact in f16 forever (attention sinks): they
    /// are masked out of their quantized group like pool tokens, leave the group's min/max, and
    /// never compete for the outlier pool. Default 0.
    pub sink: u32,
    /// Bits of the tokens kept outside quantized groups (window, sinks, pools): 16 = f16 (the
    /// method's full precision), 8 = llama.cpp's q8_0 blocks, [`WINDOW_BITS_AUTO`] = q8_0
    /// blocks unless a (layer, kv head)'s first group shows its keys dominated by a few
    /// channels ([`DOMINANT_BELOW`]; then f16). Default 16.
    pub window_bits: u32,
    /// How values are grouped (default: per token).
    pub value_axis: ValueAxis,
    /// Key bits in the untraced layers (`< untraced_layers`) unless a per-layer override says
    /// otherwise; `None` = `key_bits`.
    pub untraced_key_bits: Option<u32>,
    /// Bits of a value group's (scale, min) pair: 16 = two f16, 8 = two bytes under one f16
    /// pair per value-group column of a key group (see [`crate::quant::encode_params8`]).
    /// Default 16.
    pub value_param_bits: u32,
    /// How each value group's grid is chosen. Default min/max.
    pub value_fit: Fit,
    /// How each key channel's grid over a group is chosen. Default min/max.
    pub key_fit: Fit,
}

/// How a quantization group's grid (min, scale) is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fit {
    /// Spanning the group's extremes (KIVI, OTT): nothing clips, the step is widest.
    #[default]
    MinMax,
    /// The grid with the least squared error found ([`crate::quant::least_squares_range`]):
    /// it may clip a group's tails to narrow its step.
    LeastSquares,
}

/// Walsh–Hadamard rotation of the stored rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rotation {
    /// Neither keys nor values.
    #[default]
    Off,
    /// Keys and values. Spreads a key channel's outlier tokens over its block, which makes
    /// per-channel 3-bit keys hold on SmolLM2 and Qwen2.5-Coder-1.5B, and evens out the
    /// per-token value groups.
    On,
    /// Values always; keys per (layer, kv head), whichever form gives the queries attended
    /// before its first flush the smaller attention error with its first group stored that
    /// way (with no queries seen: rotated unless a few channels dominate its keys, see
    /// [`DOMINANT_BELOW`]). Rotation evens out tokens that stretch a channel's range but
    /// spreads a dominant channel over every channel of its block: on Qwen2.5-Coder-0.5B
    /// rotating layer 0's keys cost 5–10× the attention error, and plain keys win on most of
    /// its heads, while SmolLM2 and Qwen2.5-Coder-1.5B have heads of both kinds.
    Auto,
}

/// `window_bits` value that lets each (layer, kv head) choose q8_0 or f16 rows at its first
/// flush.
pub const WINDOW_BITS_AUTO: u32 = 0;

/// A head's keys count as dominated by a few channels when q8_0 rows of its first group err
/// more than this fraction of the squared error of that group's per-channel codes; such a head
/// keeps f16 rows (`wb=auto`), and plain keys (`rot=auto`) if no query was seen. q8_0 scales a block of 32 channels
/// by its largest value: on heads with a massive channel (Qwen2.5-Coder-0.5B layers 0, 1, 2, 4,
/// 8: |k| up to 214) the other channels of the block lose their precision, and q8_0 rows err as
/// much as 3-bit per-channel codes (ratio 0.06–2.1, against ≤ 0.015 on every other head of
/// that model and on every head of SmolLM2); those heads' attention error went 0.15 → 0.47
/// with q8_0 rows.
pub const DOMINANT_BELOW: f64 = 0.05;

/// Grouping of value quantization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueAxis {
    /// Per token over Gv channels (KIVI, OTT): errors do not line up across tokens, but the
    /// (scale, min) pair costs 32 bits per Gv values: 4 bits per element at head_dim 8.
    #[default]
    Token,
    /// Per channel over the G tokens of a group, as keys: 32 bits per G values whatever the
    /// head size, but its errors are shared by a channel's tokens and add up in the output
    /// (attention error 0.16 vs 0.07 per token on SmolLM2 with 2-bit values).
    Channel,
    /// Per token when head_dim ≥ [`AUTO_CHANNEL_BELOW`], else per channel.
    Auto,
}

/// Head sizes below which `ValueAxis::Auto` groups values per channel: there per-token
/// (scale, min) pairs would cost more than a bit per element.
pub const AUTO_CHANNEL_BELOW: u32 = 32;

impl Default for CacheConfig {
    fn default() -> Self {
        Self::ott(2, 2)
    }
}

/// Names accepted by [`CacheConfig::preset`].
pub const PRESETS: &[&str] = &[
    "recommended",
    "ott3a",
    "ott4a",
    "ott2",
    "ott4",
    "ottk4v2",
    "ottk2v4",
    "ott2-p0",
    "kivi2",
    "kivi4",
    "ott3",
    "ott3c",
];

/// The preset `recommended` stands for (a stable name for scripts while the choice moves).
pub const RECOMMENDED: &str = "ott3a";

impl CacheConfig {
    fn ott(key_bits: u32, value_bits: u32) -> Self {
        Self {
            key_bits,
            value_bits,
            group: DEFAULT_GROUP,
            residual: DEFAULT_RESIDUAL,
            pool: DEFAULT_POOL,
            extra: DEFAULT_EXTRA,
            untraced_layers: DEFAULT_UNTRACED_LAYERS,
            score: Score::L1,
            value_group: None,
            overrides: Vec::new(),
            rotate: Rotation::Off,
            sink: 0,
            window_bits: 16,
            value_axis: ValueAxis::Token,
            untraced_key_bits: None,
            value_param_bits: 16,
            value_fit: Fit::MinMax,
            key_fit: Fit::MinMax,
        }
    }

    fn kivi(bits: u32) -> Self {
        Self {
            group: KIVI_GROUP,
            residual: KIVI_RESIDUAL,
            pool: 0,
            ..Self::ott(bits, bits)
        }
    }

    /// `ott3`: quality first at 2.875 bits per quantized element. Keys and values
    /// Hadamard-rotated; keys 3-bit per channel over G = 128 tokens (12 words + f16 scale/min
    /// per channel: 3.25 bits), values 2-bit per token over Gv = min(128, head_dim) channels
    /// (2.5 bits at head_dim 64); the first 4 tokens exact; outlier pool P = 12 (E = 32,
    /// R = 32, untraced layers 0–1 as `ott2`); window and pools f16. Measured with `kv-error`
    /// on SmolLM2 (wikitext / Hamlet, 2048 tokens) against P = 3: attention error 0.069 / 0.062
    /// vs 0.091 / 0.071. 3.24 bits per element allocated at 8192 tokens on SmolLM2.
    fn ott3() -> Self {
        Self {
            rotate: Rotation::On,
            sink: 4,
            pool: 12,
            ..Self::ott(3, 2)
        }
    }

    /// `ott3c`: `ott3` within 3.0 bits per element allocated at 8192 tokens. Window, sinks
    /// and pools in q8_0 blocks (attention error 0.069 → 0.072 on SmolLM2, half their memory),
    /// R = 24, E = 16, 2-bit keys in the two untraced layers, values per channel below
    /// head_dim 32 (`va=auto`). 2.996 bits at 8192 tokens on SmolLM2, 2.79 on stories260K
    /// (where `kt=3` keeps 3-bit keys everywhere for 2.99 bits and less error).
    fn ott3c() -> Self {
        Self {
            window_bits: 8,
            residual: 24,
            extra: 16,
            untraced_key_bits: Some(2),
            value_axis: ValueAxis::Auto,
            ..Self::ott3()
        }
    }

    /// `ott3a`: 3-bit keys and 2-bit values that adapt to the model. As `ott3c` with the
    /// choices it fixed left to each (layer, kv head) at its first flush: values always
    /// rotated; keys rotated where that serves the queries seen so far better (`rot=auto`);
    /// rows in f16 where a few channels dominate the head's keys, else q8_0 (`wb=auto`); and
    /// 3-bit keys in the untraced layers too (Qwen2.5-Coder-0.5B's layer 0 is where its
    /// attention error is largest). Value grids fitted by least squares (`vf=ls`: the value
    /// error halves; mean KLD 0.057 → 0.044 on Qwen2.5-Coder-0.5B / wikitext-2) and their
    /// pairs in 8 bits (`vp=8`). Key grids stay min/max: fitted ones (`kf=ls`) lowered the
    /// attention error of every model's dump but raised SmolLM2's KLD (0.034 → 0.038) and
    /// changed nothing on Qwen2.5-Coder-0.5B. 2.91 bits per element at 8192 tokens at
    /// head_dim 64. The recommended preset: below llama.cpp's q4_0 in ΔPPL and mean KLD on
    /// SmolLM2 (2048 and 8192 tokens) and within +0.3% / KLD 0.045 of f16 on both
    /// Qwen2.5-Coder models (wikitext-2 and Hamlet, 2048 × 2).
    fn ott3a() -> Self {
        Self {
            rotate: Rotation::Auto,
            window_bits: WINDOW_BITS_AUTO,
            untraced_key_bits: None,
            value_param_bits: 8,
            value_fit: Fit::LeastSquares,
            ..Self::ott3c()
        }
    }

    /// `ott4a`: `ott3a` with 4-bit keys: 3.41 bits per element at 8192 tokens at head_dim 64.
    /// The safer preset: mean KLD ≤ 0.024 against f16 on SmolLM2, both Qwen2.5-Coder models
    /// and Gemma 3 270M (wikitext-2 and Hamlet, 2048 × 2).
    fn ott4a() -> Self {
        Self {
            key_bits: 4,
            ..Self::ott3a()
        }
    }

    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self, CacheError> {
        Ok(match name {
            "recommended" => return Self::preset(RECOMMENDED),
            "ott3a" => Self::ott3a(),
            "ott4a" => Self::ott4a(),
            "ott" | "ott2" => Self::ott(2, 2),
            "ott4" => Self::ott(4, 4),
            "ottk4v2" => Self::ott(4, 2),
            "ottk2v4" => Self::ott(2, 4),
            "ott2-p0" => Self {
                pool: 0,
                ..Self::ott(2, 2)
            },
            "kivi2" => Self::kivi(2),
            "kivi4" => Self::kivi(4),
            "ott3" => Self::ott3(),
            "ott3c" => Self::ott3c(),
            _ => {
                return Err(CacheError::Parse {
                    spec: quoted_spec(name),
                    field: "preset".into(),
                    reason: format!("unknown preset; known: ott, {}", PRESETS.join(", ")),
                })
            }
        })
    }

    /// Checks everything that does not depend on the model's shape.
    pub fn validate(&self) -> Result<(), CacheError> {
        let bad = |field, reason: String| Err(CacheError::Config { field, reason });
        for (field, b) in [("key_bits", self.key_bits), ("value_bits", self.value_bits)] {
            if !(MIN_BITS..=MAX_BITS).contains(&b) {
                return bad(field, format!("{b} not in {MIN_BITS}..={MAX_BITS}"));
            }
        }
        if self.group == 0 || self.group % GROUP_MULTIPLE != 0 || self.group > MAX_GROUP {
            return bad(
                "group",
                format!(
                    "{} must be a positive multiple of {GROUP_MULTIPLE} up to {MAX_GROUP}",
                    self.group
                ),
            );
        }
        if self.residual > MAX_RESIDUAL {
            return bad(
                "residual",
                format!("{} above {MAX_RESIDUAL}", self.residual),
            );
        }
        if ![16, 8, WINDOW_BITS_AUTO].contains(&self.window_bits) {
            return bad(
                "window_bits",
                format!("{} is not 16, 8 or auto (0)", self.window_bits),
            );
        }
        if ![16, 8].contains(&self.value_param_bits) {
            return bad(
                "value_param_bits",
                format!("{} is not 16 or 8", self.value_param_bits),
            );
        }
        if self.sink > MAX_SINK {
            return bad("sink", format!("{} above {MAX_SINK}", self.sink));
        }
        if self.value_group == Some(0) {
            return bad("value_group", "must be positive".into());
        }
        if let Some(b) = self
            .untraced_key_bits
            .filter(|b| !(MIN_BITS..=MAX_BITS).contains(b))
        {
            return bad(
                "untraced_key_bits",
                format!("{b} not in {MIN_BITS}..={MAX_BITS}"),
            );
        }
        for o in &self.overrides {
            for (field, b) in [("key_bits", o.key_bits), ("value_bits", o.value_bits)] {
                if let Some(b) = b.filter(|b| !(MIN_BITS..=MAX_BITS).contains(b)) {
                    return bad(
                        field,
                        format!("{b} (layer {}) not in {MIN_BITS}..={MAX_BITS}", o.layer),
                    );
                }
            }
        }
        let mut last = None;
        for o in std::iter::once((self.pool, self.extra)).chain(
            self.overrides
                .iter()
                .map(|o| (o.pool.unwrap_or(self.pool), o.extra.unwrap_or(self.extra))),
        ) {
            if o.0 > MAX_POOL {
                return bad("pool", format!("{} above {MAX_POOL}", o.0));
            }
            if o.1 > MAX_EXTRA {
                return bad("extra", format!("{} above {MAX_EXTRA}", o.1));
            }
        }
        for o in &self.overrides {
            if last.is_some_and(|l| l >= o.layer) {
                return bad("overrides", "layers must be strictly increasing".into());
            }
            last = Some(o.layer);
        }
        Ok(())
    }

    /// Hadamard block for a head size when rotation is on (the largest power of two dividing
    /// head_dim, so one rotation never straddles two heads), else 0.
    pub fn rotation_block(&self, head_dim: u32) -> u32 {
        match self.rotate {
            Rotation::Off => 0,
            Rotation::On | Rotation::Auto => head_dim & head_dim.wrapping_neg(),
        }
    }

    /// Precision of a head's rows when it is created: the configured one, or f16 for rows
    /// chosen per head (`wb=auto`), which is also the most they can take.
    pub(crate) fn initial_row_precision(&self, head_dim: usize) -> super::RowPrecision {
        let bits = match self.window_bits {
            WINDOW_BITS_AUTO => 16,
            b => b,
        };
        super::RowPrecision::new(bits, head_dim)
    }

    /// Value group for a head size: the configured one or `min(G, head_dim)`.
    pub fn value_group_for(&self, head_dim: u32) -> u32 {
        self.value_group.unwrap_or(self.group.min(head_dim))
    }

    /// The override of `layer` (overrides are sorted by layer, which `validate` checks): a
    /// binary search, as a cache of many layers asks for every one.
    fn override_of(&self, layer: u32) -> Option<&LayerOverride> {
        self.overrides
            .binary_search_by_key(&layer, |o| o.layer)
            .ok()
            .map(|i| &self.overrides[i])
    }

    /// Effective (pool, extra) of a layer: an override's pool, else 0 in untraced layers, else P.
    pub fn pools_for(&self, layer: u32) -> (u32, u32) {
        let o = self.override_of(layer);
        // An explicit per-layer pool wins over the untraced-layers default.
        let pool = match o.and_then(|o| o.pool) {
            Some(p) => p,
            None if layer < self.untraced_layers => 0,
            None => self.pool,
        };
        let extra = o.and_then(|o| o.extra).unwrap_or(self.extra);
        // Without a pool nothing is ever evicted, so an extra pool would only be dead memory.
        if pool == 0 {
            (0, 0)
        } else {
            (pool, extra)
        }
    }

    /// Effective (key bits, value bits) of a layer: a per-layer override, else `kt` in the
    /// untraced layers, else the global bits.
    pub fn bits_for(&self, layer: u32) -> (u32, u32) {
        let o = self.override_of(layer);
        let untraced = self
            .untraced_key_bits
            .filter(|_| layer < self.untraced_layers);
        (
            o.and_then(|o| o.key_bits)
                .or(untraced)
                .unwrap_or(self.key_bits),
            o.and_then(|o| o.value_bits).unwrap_or(self.value_bits),
        )
    }

    /// Whether values are grouped per channel at this head size.
    pub fn values_per_channel(&self, head_dim: u32) -> bool {
        match self.value_axis {
            ValueAxis::Token => false,
            ValueAxis::Channel => true,
            ValueAxis::Auto => head_dim < AUTO_CHANNEL_BELOW,
        }
    }
}

/// A spec as error messages show it: at most 80 characters (a hostile spec can be megabytes).
fn quoted_spec(spec: &str) -> String {
    match spec.char_indices().nth(80) {
        Some((cut, _)) => format!("{}... ({} bytes)", &spec[..cut], spec.len()),
        None => spec.to_string(),
    }
}

impl FromStr for CacheConfig {
    type Err = CacheError;

    fn from_str(spec: &str) -> Result<Self, CacheError> {
        let spec_t = spec.trim();
        let (base, fields) = match spec_t.split_once(':') {
            Some((b, f)) => (b, Some(f)),
            None => (spec_t, None),
        };
        let mut c = Self::preset(base).map_err(|_| CacheError::Parse {
            spec: quoted_spec(spec),
            field: "preset".into(),
            reason: format!("unknown base {base:?}; known: ott, {}", PRESETS.join(", ")),
        })?;
        let err = |field: &str, reason: String| CacheError::Parse {
            spec: quoted_spec(spec),
            field: field.to_string(),
            reason,
        };
        if fields.is_some_and(|f| f.trim().is_empty()) {
            return Err(err(
                "fields",
                format!("nothing after '{base}:' (give fields, or the name alone)"),
            ));
        }
        // Per-layer settings by (layer, field), merged into `c.overrides` at the end: one
        // sorted map keeps a long spec linear-logarithmic instead of quadratic.
        let mut per_layer: BTreeMap<u32, LayerOverride> =
            c.overrides.iter().map(|o| (o.layer, *o)).collect();
        let mut layer_settings = 0usize;
        // Fields set so far, and the name each was set by (a later `k=` would silently undo
        // an earlier one); per-layer ones as `p@5`.
        let mut fields_seen: HashMap<&str, &str> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::new();
        for item in fields.into_iter().flat_map(|f| f.split(',')).map(str::trim) {
            if item.is_empty() {
                return Err(err("fields", "empty field (two commas in a row?)".into()));
            }
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| err(item, "expected field=value".into()))?;
            let (key, val) = (key.trim(), val.trim());
            // `s=<number>` is `sink`; per-layer fields are checked per layer below.
            let canonical = match key {
                "s" if val.parse::<u32>().is_ok() => "sink",
                "sink" => "sink",
                "s" => "score",
                k => k,
            };
            if !key.contains('@') {
                if let Some(first) = fields_seen.insert(canonical, key) {
                    let how = if first == key {
                        String::new()
                    } else {
                        format!(" ({first} and {key} both set {canonical})")
                    };
                    return Err(err(key, format!("given twice{how}")));
                }
            }
            let num = || {
                val.parse::<u32>()
                    .map_err(|e| err(key, format!("{val:?} is not a non-negative integer: {e}")))
            };
            match key {
                "k" => c.key_bits = num()?,
                "v" => c.value_bits = num()?,
                "g" => c.group = num()?,
                "r" => c.residual = num()?,
                "p" => c.pool = num()?,
                "e" => c.extra = num()?,
                "t" => c.untraced_layers = num()?,
                "s" if val.parse::<u32>().is_ok() => c.sink = num()?,
                "s" => {
                    c.score = match val {
                        "l1" | "L1" => Score::L1,
                        "l2" | "L2" => Score::L2,
                        _ => {
                            return Err(err(key, format!("{val:?} is not l1, l2 or a sink count")))
                        }
                    }
                }
                "sink" => c.sink = num()?,
                "wb" if val == "auto" => c.window_bits = WINDOW_BITS_AUTO,
                "wb" => c.window_bits = num()?,
                "va" => {
                    c.value_axis = match val {
                        "t" | "token" => ValueAxis::Token,
                        "c" | "channel" => ValueAxis::Channel,
                        "auto" => ValueAxis::Auto,
                        _ => {
                            return Err(err(
                                key,
                                format!("{val:?} is not t(oken), c(hannel) or auto"),
                            ))
                        }
                    }
                }
                "kt" => c.untraced_key_bits = Some(num()?),
                "vp" => c.value_param_bits = num()?,
                "vf" | "kf" => {
                    let fit = match val {
                        "mm" | "minmax" => Fit::MinMax,
                        "ls" | "lsq" => Fit::LeastSquares,
                        _ => return Err(err(key, format!("{val:?} is not mm or ls"))),
                    };
                    if key == "vf" {
                        c.value_fit = fit;
                    } else {
                        c.key_fit = fit;
                    }
                }
                "rot" => {
                    c.rotate = match val {
                        "0" | "false" | "off" => Rotation::Off,
                        "1" | "true" | "on" => Rotation::On,
                        "auto" => Rotation::Auto,
                        _ => return Err(err(key, format!("{val:?} is not 0, 1 or auto"))),
                    }
                }
                "gv" => c.value_group = if val == "auto" { None } else { Some(num()?) },
                _ => {
                    let (what, layer) = key.split_once('@').ok_or_else(|| {
                        err(
                            key,
                            "unknown field (k v g r p e t s gv rot sink wb va kt vp vf kf p@L e@L k@L v@L)"
                                .into(),
                        )
                    })?;
                    let layer_num = |s: &str| {
                        s.parse::<u32>()
                            .map_err(|e| err(key, format!("layer {s:?}: {e}")))
                    };
                    let (first, last) = match layer.split_once('-') {
                        Some((a, b)) => (layer_num(a)?, layer_num(b)?),
                        None => (layer_num(layer)?, layer_num(layer)?),
                    };
                    if first > last || last - first >= MAX_LAYER_RANGE {
                        return Err(err(
                            key,
                            format!("layer range {layer:?} is empty or too long"),
                        ));
                    }
                    if !matches!(what, "p" | "e" | "k" | "v") {
                        return Err(err(
                            key,
                            "unknown per-layer field (p@L, e@L, k@L, v@L)".into(),
                        ));
                    }
                    layer_settings += (last - first) as usize + 1;
                    if layer_settings > MAX_LAYER_SETTINGS {
                        return Err(err(
                            key,
                            format!("more than {MAX_LAYER_SETTINGS} per-layer settings"),
                        ));
                    }
                    let v = num()?;
                    for layer in first..=last {
                        let o = per_layer.entry(layer).or_insert(LayerOverride {
                            layer,
                            ..Default::default()
                        });
                        let slot = match what {
                            "p" => &mut o.pool,
                            "e" => &mut o.extra,
                            "k" => &mut o.key_bits,
                            _ => &mut o.value_bits,
                        };
                        if seen.contains(&format!("{what}@{layer}")) {
                            return Err(err(key, format!("layer {layer} given twice for {what}@")));
                        }
                        *slot = Some(v);
                    }
                    // Recorded after the loop so a range's own layers do not collide.
                    for layer in first..=last {
                        seen.insert(format!("{what}@{layer}"));
                    }
                }
            }
        }
        c.overrides = per_layer.into_values().collect();
        // Name the field that fails validation, as a parse error, so users see their input.
        c.validate().map_err(|e| match e {
            CacheError::Config { field, reason } => err(field, reason),
            other => other,
        })?;
        Ok(c)
    }
}

impl fmt::Display for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ott:k={},v={},g={},r={},p={},e={},t={},s={}",
            self.key_bits,
            self.value_bits,
            self.group,
            self.residual,
            self.pool,
            self.extra,
            self.untraced_layers,
            match self.score {
                Score::L1 => "l1",
                Score::L2 => "l2",
            }
        )?;
        if let Some(gv) = self.value_group {
            write!(f, ",gv={gv}")?;
        }
        match self.rotate {
            Rotation::Off => {}
            Rotation::On => write!(f, ",rot=1")?,
            Rotation::Auto => write!(f, ",rot=auto")?,
        }
        if self.sink > 0 {
            write!(f, ",sink={}", self.sink)?;
        }
        match self.window_bits {
            16 => {}
            WINDOW_BITS_AUTO => write!(f, ",wb=auto")?,
            b => write!(f, ",wb={b}")?,
        }
        match self.value_axis {
            ValueAxis::Token => {}
            ValueAxis::Channel => write!(f, ",va=c")?,
            ValueAxis::Auto => write!(f, ",va=auto")?,
        }
        if let Some(kt) = self.untraced_key_bits {
            write!(f, ",kt={kt}")?;
        }
        if self.value_param_bits != 16 {
            write!(f, ",vp={}", self.value_param_bits)?;
        }
        if self.value_fit == Fit::LeastSquares {
            write!(f, ",vf=ls")?;
        }
        if self.key_fit == Fit::LeastSquares {
            write!(f, ",kf=ls")?;
        }
        for o in &self.overrides {
            if let Some(p) = o.pool {
                write!(f, ",p@{}={p}", o.layer)?;
            }
            if let Some(e) = o.extra {
                write!(f, ",e@{}={e}", o.layer)?;
            }
            if let Some(k) = o.key_bits {
                write!(f, ",k@{}={k}", o.layer)?;
            }
            if let Some(v) = o.value_bits {
                write!(f, ",v@{}={v}", o.layer)?;
            }
        }
        Ok(())
    }
}
