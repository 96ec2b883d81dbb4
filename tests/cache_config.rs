//! Presets, spec strings, validation and shape errors of the OTT cache.

use std::ops::Range;

use ottkv::cache::{CacheConfig, CacheError, CacheShape, Fit, OttCache, Score, PRESETS};

fn shape(head_dim: usize) -> CacheShape {
    CacheShape {
        n_layer: 2,
        n_head_kv: 2,
        head_dim,
        max_tokens: 64,
    }
}

#[test]
fn presets_have_the_documented_settings() {
    let c = CacheConfig::preset("ott2").unwrap();
    assert_eq!(
        (
            c.key_bits,
            c.value_bits,
            c.group,
            c.residual,
            c.pool,
            c.extra
        ),
        (2, 2, 128, 32, 3, 32)
    );
    assert_eq!(
        (c.untraced_layers, c.score, c.value_group),
        (2, Score::L1, None)
    );
    assert_eq!(c, CacheConfig::default());
    let c = CacheConfig::preset("ottk4v2").unwrap();
    assert_eq!((c.key_bits, c.value_bits), (4, 2));
    let c = CacheConfig::preset("ott4").unwrap();
    assert_eq!((c.key_bits, c.value_bits, c.pool), (4, 4, 3));
    let c = CacheConfig::preset("ott2-p0").unwrap();
    assert_eq!((c.pool, c.group, c.residual), (0, 128, 32));
    for (name, bits) in [("kivi2", 2), ("kivi4", 4)] {
        let c = CacheConfig::preset(name).unwrap();
        assert_eq!(
            (c.key_bits, c.value_bits, c.group, c.residual, c.pool),
            (bits, bits, 32, 128, 0)
        );
    }
    let c = CacheConfig::preset("ott3c").unwrap();
    assert_eq!(
        (
            c.key_bits,
            c.value_bits,
            c.window_bits,
            c.residual,
            c.pool,
            c.extra,
            c.sink
        ),
        (3, 2, 8, 24, 12, 16, 4)
    );
    assert_eq!(
        (c.bits_for(0), c.bits_for(1), c.bits_for(2)),
        ((2, 2), (2, 2), (3, 2))
    );
    assert!(c.values_per_channel(8) && !c.values_per_channel(64));
    // The adaptive presets fit their value grids by least squares and store value pairs in 8
    // bits; the older ones keep min/max grids and f16 pairs (their measured numbers stay valid).
    for name in ["ott3a", "ott4a", "recommended"] {
        let c = CacheConfig::preset(name).unwrap();
        assert_eq!(
            (c.value_param_bits, c.value_fit, c.key_fit),
            (8, Fit::LeastSquares, Fit::MinMax),
            "{name}"
        );
    }
    for name in ["ott2", "ott3", "ott3c", "ottk4v2", "kivi2"] {
        let c = CacheConfig::preset(name).unwrap();
        assert_eq!(
            (c.value_param_bits, c.value_fit, c.key_fit),
            (16, Fit::MinMax, Fit::MinMax),
            "{name}"
        );
    }
    for p in PRESETS {
        let c: CacheConfig = p.parse().unwrap();
        c.validate().unwrap();
        let back: CacheConfig = c.to_string().parse().unwrap();
        assert_eq!(back, c, "{p}");
    }
}

#[test]
fn spec_strings_parse_and_round_trip() {
    let c: CacheConfig = "ott:k=2,v=2,g=128,r=32,p=3,e=32,t=2".parse().unwrap();
    assert_eq!(c, CacheConfig::preset("ott2").unwrap());
    let c: CacheConfig = "kivi2:p=2, s=l2, gv=16, p@3=0, e@3=4, e@1=7"
        .parse()
        .unwrap();
    assert_eq!(
        (c.group, c.pool, c.score, c.value_group),
        (32, 2, Score::L2, Some(16))
    );
    assert_eq!(
        c.pools_for(3),
        (0, 0),
        "pool 0 override means no extra pool either"
    );
    assert_eq!(
        c.pools_for(1),
        (0, 0),
        "untraced layer without a pool override"
    );
    assert_eq!(c.pools_for(2), (2, 32));
    let d: CacheConfig = "ott:t=0,p@1=5,e@1=7".parse().unwrap();
    assert_eq!(d.pools_for(1), (5, 7));
    for spec in [
        c.clone(),
        d,
        CacheConfig::preset("ottk4v2").unwrap(),
        CacheConfig::default(),
    ] {
        let text = spec.to_string();
        let back: CacheConfig = text.parse().unwrap();
        assert_eq!(back, spec, "{text}");
    }
    // An explicit pool override wins over untraced_layers.
    let e: CacheConfig = "ott2:p@0=1".parse().unwrap();
    assert_eq!((e.pools_for(0), e.pools_for(1)), ((1, 32), (0, 0)));
    // Per-layer bits, over a range, merged with other per-layer fields of the same layer.
    let f: CacheConfig = "ott3:k@2-4=2,v@3=4,p@3=1".parse().unwrap();
    assert_eq!(
        (0..6).map(|l| f.bits_for(l)).collect::<Vec<_>>(),
        [(3, 2), (3, 2), (2, 2), (2, 4), (2, 2), (3, 2)]
    );
    assert_eq!(f.pools_for(3), (1, 32));
    assert_eq!(f.overrides.len(), 3);
    let back: CacheConfig = f.to_string().parse().unwrap();
    assert_eq!(back, f, "{f}");
    // Grid fits and 8-bit value pairs, each on its own.
    let g: CacheConfig = "ott3:vp=8,kf=ls".parse().unwrap();
    assert_eq!(
        (g.value_param_bits, g.value_fit, g.key_fit),
        (8, Fit::MinMax, Fit::LeastSquares)
    );
    assert!(g.to_string().ends_with(",vp=8,kf=ls"), "{g}");
    assert_eq!(g.to_string().parse::<CacheConfig>().unwrap(), g);
    let h: CacheConfig = "ott3a:vp=16,vf=mm,kf=minmax".parse().unwrap();
    assert_eq!(
        (h.value_param_bits, h.value_fit, h.key_fit),
        (16, Fit::MinMax, Fit::MinMax)
    );
    assert_eq!(h.to_string().parse::<CacheConfig>().unwrap(), h);
}

#[test]
fn spec_errors_name_the_field() {
    for (spec, field) in [
        ("ott:k=5", "key_bits"),
        ("ott:v=1", "value_bits"),
        ("ott:g=100", "group"),
        ("ott:g=0", "group"),
        ("ott:g=x", "g"),
        ("ott:q=1", "q"),
        ("ott:s=l3", "s"),
        ("ott:p=99999", "pool"),
        ("ott:gv=0", "value_group"),
        ("ott:p@x=1", "p@x"),
        ("ott:k@3=5", "key_bits"),
        ("ott:v@1=1", "value_bits"),
        ("ott:k@4-2=3", "k@4-2"),
        ("ott:k@0-99999=3", "k@0-99999"),
        ("ott:q@1=3", "q@1"),
        ("ott:wb=4", "window_bits"),
        ("ott:va=x", "va"),
        ("ott:vp=12", "value_param_bits"),
        ("ott:vp=x", "vp"),
        ("ott:vf=l2", "vf"),
        ("ott:kf=", "kf"),
        ("ott:k", "k"),
        ("nope", "preset"),
    ] {
        match spec.parse::<CacheConfig>() {
            Err(CacheError::Parse { field: f, .. }) => assert_eq!(f, field, "{spec}"),
            other => panic!("{spec}: expected a parse error naming {field}, got {other:?}"),
        }
    }
}

#[test]
fn shape_is_validated() {
    let ott2 = CacheConfig::default();
    // Gv = min(128, 8) = 8 for stories260K, 64 for SmolLM2: both fine.
    OttCache::new(ott2.clone(), shape(8)).unwrap();
    OttCache::new(ott2.clone(), shape(64)).unwrap();
    let gv48: CacheConfig = "ott:gv=48".parse().unwrap();
    assert!(matches!(
        OttCache::new(gv48, shape(64)),
        Err(CacheError::Shape(_))
    ));
    for bad in [
        CacheShape {
            n_layer: 0,
            ..shape(8)
        },
        CacheShape {
            n_head_kv: 0,
            ..shape(8)
        },
        CacheShape {
            head_dim: 0,
            ..shape(8)
        },
        CacheShape {
            max_tokens: 0,
            ..shape(8)
        },
        CacheShape {
            max_tokens: usize::MAX,
            ..shape(8)
        },
    ] {
        assert!(
            matches!(OttCache::new(ott2.clone(), bad), Err(CacheError::Shape(_))),
            "{bad:?}"
        );
    }
    let over: CacheConfig = "ott:p@5=1".parse().unwrap();
    assert!(matches!(
        OttCache::new(over, shape(8)),
        Err(CacheError::Shape(_))
    ));
    let bad_bits = CacheConfig {
        key_bits: 8,
        ..Default::default()
    };
    assert!(matches!(
        OttCache::new(bad_bits, shape(8)),
        Err(CacheError::Config {
            field: "key_bits",
            ..
        })
    ));
}

#[test]
fn forward_rejects_bad_calls_without_panicking() {
    let hd = 8;
    let mut c = OttCache::new(
        "ott:g=16,r=4".parse().unwrap(),
        CacheShape {
            n_layer: 1,
            n_head_kv: 2,
            head_dim: hd,
            max_tokens: 10,
        },
    )
    .unwrap();
    let (n, nh) = (3, 4);
    let q = vec![0.5f32; n * nh * hd];
    let kv = vec![0.25f32; n * 2 * hd];
    let mut out = vec![0f32; n * nh * hd];
    let s = 0.35;
    assert!(matches!(
        c.forward(0, &q[1..], &kv, &kv, n, nh, s, &mut out, 1),
        Err(CacheError::Length { .. })
    ));
    assert!(matches!(
        c.forward(0, &q, &kv[1..], &kv, n, nh, s, &mut out, 1),
        Err(CacheError::Length { .. })
    ));
    assert!(matches!(
        c.forward(0, &q, &kv, &kv, n, nh, s, &mut out[1..], 1),
        Err(CacheError::Length { .. })
    ));
    assert!(matches!(
        c.forward(0, &q, &kv, &kv, n, 3, s, &mut out, 1),
        Err(CacheError::Heads { .. })
    ));
    assert!(matches!(
        c.forward(0, &q, &kv, &kv, n, 0, s, &mut out, 1),
        Err(CacheError::Heads { .. })
    ));
    assert!(matches!(
        c.forward(1, &q, &kv, &kv, n, nh, s, &mut out, 1),
        Err(CacheError::Layer { .. })
    ));
    let mut nan = kv.clone();
    nan[2 * hd + 3] = f32::NAN;
    match c.forward(0, &q, &kv, &nan, n, nh, s, &mut out, 1) {
        Err(CacheError::NonFinite {
            tensor: "v",
            token: 1,
            head: 0,
            channel: 3,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let mut big = kv.clone();
    big[0] = 1e6; // overflows f16
    assert!(matches!(
        c.forward(0, &q, &big, &kv, n, nh, s, &mut out, 1),
        Err(CacheError::NonFinite { tensor: "k", .. })
    ));
    assert_eq!(c.len(), 0, "rejected calls change nothing");
    for _ in 0..3 {
        c.forward(0, &q, &kv, &kv, n, nh, s, &mut out, 2).unwrap();
    }
    assert_eq!(c.len(), 9);
    assert!(matches!(
        c.forward(0, &q, &kv, &kv, n, nh, s, &mut out, 1),
        Err(CacheError::Overflow {
            len: 9,
            n: 3,
            max_tokens: 10,
            ..
        })
    ));
    assert!(matches!(
        c.attend(0, &q, n, nh, s, 0..99, &mut out),
        Err(CacheError::Rows { .. })
    ));
    assert!(matches!(
        c.attend(0, &q, n, nh, s, Range { start: 2, end: 1 }, &mut out),
        Err(CacheError::Rows { .. })
    ));
    // Out of a constant cache comes the constant value.
    assert!(out.iter().all(|&o| (o - 0.25).abs() < 1e-6));
    c.reset().unwrap();
    assert_eq!(c.len(), 0);
}

#[test]
fn duplicate_and_empty_fields_are_refused() {
    let field_of = |spec: &str| match spec.parse::<CacheConfig>() {
        Err(CacheError::Parse { field, reason, .. }) => (field, reason),
        other => panic!("{spec}: expected a parse error, got {other:?}"),
    };
    let (f, r) = field_of("ott2:k=3,k=4");
    assert_eq!(f, "k");
    assert!(r.contains("twice"), "{r}");
    // `s=<number>` is the sink count, so it collides with `sink`, not with the score `s=l2`.
    assert!(field_of("ott2:s=4,sink=2")
        .1
        .contains("s and sink both set sink"));
    "ott2:s=l2,sink=2".parse::<CacheConfig>().unwrap();
    assert_eq!(field_of("ott2:").0, "fields");
    assert_eq!(field_of("ott2: ").0, "fields");
    assert!(field_of("ott2:k=3,,v=2").1.contains("empty field"));
    assert!(field_of("ott2:k=3,").1.contains("empty field"));
    // The same layer twice for one per-layer field, directly or through a range.
    assert!(field_of("ott2:p@1=2,p@1=3")
        .1
        .contains("layer 1 given twice"));
    assert!(field_of("ott2:p@1=2,p@0-3=4")
        .1
        .contains("layer 1 given twice"));
    // Different fields of one layer, and disjoint ranges, are fine.
    let c: CacheConfig = "ott2:p@1=2,e@1=4,k@0-4=3,p@2-3=5".parse().unwrap();
    assert_eq!(c.overrides.len(), 5);
    assert_eq!(c.pools_for(1), (2, 4));
    assert_eq!(c.bits_for(4), (3, 2));
    // What Display writes parses back to the same config.
    assert_eq!(c.to_string().parse::<CacheConfig>().unwrap(), c);
}

#[test]
fn long_specs_parse_in_near_linear_time_or_are_refused() {
    // 60000 per-layer fields: a quadratic merge (a search and a sort per field) takes minutes
    // here; the sorted map takes milliseconds. The bound leaves room for a loaded machine.
    let spec = format!(
        "ott2:{}",
        (0..60_000)
            .map(|i| format!("p@{i}=2"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let t0 = std::time::Instant::now();
    let c: CacheConfig = spec.parse().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(c.overrides.len(), 60_000);
    assert!(secs < 10.0, "60000 fields took {secs:.1} s");
    // Past the cap (a bound on what parsing can cost) the spec is refused, naming the field.
    let spec = format!(
        "ott2:{}",
        (0..100_000)
            .map(|i| format!("p@{i}=2"))
            .collect::<Vec<_>>()
            .join(",")
    );
    match spec.parse::<CacheConfig>() {
        Err(CacheError::Parse { field, reason, .. }) => {
            assert_eq!(
                field,
                format!("p@{}", ottkv::cache::config::MAX_LAYER_SETTINGS)
            );
            assert!(reason.contains("per-layer settings"), "{reason}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    // Ranges count every layer they name.
    let spec = format!(
        "ott2:{}",
        (0..17)
            .map(|i| format!("p@{}-{}=2", i * 4096, i * 4096 + 4095))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(spec.parse::<CacheConfig>().is_err());
}

/// The old per-token walk of the plan, kept as the reference of the closed form.
fn plan_ref(window_len: usize, residual: usize, group: usize, n: usize) -> Vec<Range<usize>> {
    let trigger = residual + group;
    let (mut wl, mut out, mut start) = (window_len, Vec::new(), 0);
    for j in 0..n {
        wl += 1;
        if wl == trigger {
            if j > start {
                out.push(start..j);
                start = j;
            }
            wl = residual;
        }
    }
    if n > start {
        out.push(start..n);
    }
    out
}

#[test]
fn plan_closed_form_matches_the_per_token_walk() {
    for (g, r) in [(16u32, 0u32), (16, 16), (32, 8), (16, 40)] {
        let config: CacheConfig = format!("ott2:g={g},r={r}").parse().unwrap();
        let mut cache = OttCache::new(config, shape(16)).unwrap();
        let kv = vec![0.5f32; 2 * 16];
        // Every window length a layer can have, then every batch size up to the room left.
        for filled in 0..(g + r) as usize + 3 {
            let wl = cache.head(0, 0).unwrap().window_len();
            let room = 64 - cache.layer_len(0).unwrap();
            for n in 0..=room {
                let got = cache.plan_subbatches(0, n).unwrap();
                assert_eq!(
                    got,
                    plan_ref(wl, r as usize, g as usize, n),
                    "g {g} r {r} filled {filled} n {n}"
                );
                assert_eq!(cache.subbatch_starts(0, n).unwrap().len(), got.len());
            }
            if room == 0 {
                break;
            }
            cache.append(0, &kv, &kv, 1).unwrap();
        }
    }
}

#[test]
fn plan_past_the_room_left_is_an_overflow_at_once() {
    let cache = OttCache::new(CacheConfig::default(), shape(16)).unwrap();
    // A walk over usize::MAX tokens would never end; the room check answers at once.
    for n in [65, usize::MAX / 2, usize::MAX] {
        assert!(matches!(
            cache.plan_subbatches(0, n),
            Err(CacheError::Overflow { n: got, max_tokens: 64, .. }) if got == n
        ));
    }
    assert_eq!(cache.plan_subbatches(0, 64).unwrap().len(), 1);
}

#[test]
fn shapes_beyond_memory_are_alloc_errors() {
    // 2^32 heads: the windows alone would take terabytes.
    let huge = CacheShape {
        n_layer: 65536,
        n_head_kv: 65536,
        head_dim: 16,
        max_tokens: 1 << 20,
    };
    match OttCache::new(CacheConfig::default(), huge) {
        Err(CacheError::Alloc { what, detail }) => {
            assert_eq!(what, "the cache");
            assert!(detail.contains("bytes"), "{detail}");
        }
        other => panic!("expected an allocation error, got {:?}", other.map(|_| ())),
    }
    // Reset keeps what was allocated and needs nothing new.
    let mut c = OttCache::new(CacheConfig::default(), shape(16)).unwrap();
    let before = c.memory();
    let kv = vec![0.25f32; 200 * 2 * 16];
    let mut c64 = OttCache::new(
        CacheConfig::default(),
        CacheShape {
            max_tokens: 256,
            ..shape(16)
        },
    )
    .unwrap();
    c64.append(0, &kv, &kv, 200).unwrap();
    assert!(c64.memory().codes > 0);
    c64.reset().unwrap();
    assert_eq!((c64.len(), c64.memory().codes), (0, 0));
    c.reset().unwrap();
    assert_eq!(c.memory(), before);
}
