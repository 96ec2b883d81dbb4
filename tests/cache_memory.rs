//! Memory accounting: reported bytes (Vec capacities) equal the closed form at every length.

use ottkv::cache::{expected_memory, f16_bytes, CacheConfig, CacheShape, MemoryStats, OttCache};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// OTT.md §6 at G = 128, b = 2, head_dim 128: 2 code bits + 2·16/128 param bits per element.
const QUANT_BITS_G128_B2: f64 = 2.25;
/// OTT.md §6 expects ≈4.7× / ≈6.3× / ≈6.9× less than f16 at 2k / 8k / 32k tokens (head_dim 128),
/// counting the allocated window (R + G tokens) and pools (P + E). Closed form gives 4.76 /
/// 6.32 / 6.89; the ranges are the paper's figures ± ~5%.
const RATIO_2K: (f64, f64) = (4.2, 4.9);
const RATIO_8K: (f64, f64) = (5.9, 6.6);
const RATIO_32K: (f64, f64) = (6.6, 7.1);

fn fill(c: &mut OttCache, n: usize, rng: &mut StdRng) {
    let s = *c.shape();
    let m = n * s.n_head_kv * s.head_dim;
    let k: Vec<f32> = (0..m).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let v: Vec<f32> = (0..m).map(|_| rng.gen_range(-1.0..1.0)).collect();
    for l in 0..s.n_layer {
        c.append(l, &k, &v, n).unwrap();
    }
}

#[test]
fn reported_memory_matches_closed_form_at_all_lengths() {
    let mut rng = StdRng::seed_from_u64(2);
    for spec in [
        "ott2",
        "kivi2",
        "ottk4v2",
        "ott:k=3,v=3,g=32,r=8,p=2,e=4,t=1,p@2=0",
        "ott3",
        "ott3c",
        "ott:k=3,g=64,r=16,rot=1,sink=40,p@2=0",
        "ott2-p0:sink=4",
        "ott3:g=32,r=8,k@0=2,v@1-2=3",
        "ott3:g=32,r=8,p=2,e=3,wb=8",
        "ott3:g=48,r=8,va=c,k@1=2,v@2=4",
        "ott3:g=48,r=8,va=c,vp=8,v@2=4",
        "ott:k=3,v=3,g=32,r=8,gv=16,vp=8,vf=ls,kf=ls",
    ] {
        let config: CacheConfig = spec.parse().unwrap();
        let shape = CacheShape {
            n_layer: 3,
            n_head_kv: 2,
            head_dim: 64,
            max_tokens: 8192,
        };
        let mut c = OttCache::new(config.clone(), shape).unwrap();
        let (g, r) = (config.group as usize, config.residual as usize);
        let mut len = 0;
        for target in [
            0,
            10,
            r + g - 1,
            r + g,
            r + g + 1,
            2 * g + r,
            2 * g + r + 5,
            8192,
        ] {
            fill(&mut c, target - len, &mut rng);
            len = target;
            let got = c.memory();
            let want = expected_memory(&config, &shape, len).unwrap();
            assert_eq!(got, want, "{spec} at {len}");
            if len < r + g {
                assert_eq!(
                    (got.codes, got.params),
                    (0, 0),
                    "{spec}: nothing compressed below R + G"
                );
            } else {
                assert!(got.codes > 0);
            }
        }
    }
}

#[test]
fn quantized_part_is_2_25_bits_and_ratios_match_the_paper() {
    let config = CacheConfig::default();
    let shape = CacheShape {
        n_layer: 1,
        n_head_kv: 1,
        head_dim: 128,
        max_tokens: 32768,
    };
    let mut c = OttCache::new(config.clone(), shape).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    fill(&mut c, 160, &mut rng); // exactly one flush
    let m = c.memory();
    let elems = 128 * 128 * 2; // one group of K and V
    assert_eq!(m.quantized_bits_per_element(elems), QUANT_BITS_G128_B2);
    for (n, (lo, hi)) in [(2048, RATIO_2K), (8192, RATIO_8K), (32768, RATIO_32K)] {
        let e: MemoryStats = expected_memory(&config, &shape, n).unwrap();
        let ratio = f16_bytes(&shape, n) as f64 / e.total as f64;
        println!(
            "ott2 head_dim 128 at {n}: {:.1} bytes/token, {ratio:.2}x less than f16",
            e.bytes_per_token(n)
        );
        assert!(ratio > lo && ratio < hi, "{n}: {ratio}");
    }
    fill(&mut c, 8192 - 160, &mut rng);
    assert_eq!(c.memory(), expected_memory(&config, &shape, 8192).unwrap());
    c.reset().unwrap();
    assert_eq!(c.memory(), expected_memory(&config, &shape, 0).unwrap());
}
