//! Presets, spec strings, validation and shape errors of the OTT cache.

use std::ops::Range;

use ottkv::cache::{CacheConfig, CacheError, CacheShape, OttCache, Score, PRESETS};

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
    c.reset();
    assert_eq!(c.len(), 0);
}
