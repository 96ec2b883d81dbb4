//! `ottkv info --json`: every field a bug report needs is present and agrees with how this
//! test binary itself was built (features, embedded kernels).

use std::process::Command;

fn info() -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .args(["info", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn info_json_matches_the_build() {
    let j = info();
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(j["ggml_version"], ottkv::ggml::version());
    assert_eq!(j["format_version"], ottkv::format::FORMAT_VERSION);
    let features: Vec<&str> = j["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features.contains(&"cuda"), cfg!(feature = "cuda"));

    let kernels = j["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), ottkv::kernels::KERNELS.len());
    let cuda = &j["cuda"];
    if cfg!(feature = "cuda") {
        // One module per kernels/*.cu, each either PTX with an ISA version or NVRTC source.
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "cu")
            })
            .count();
        assert_eq!(kernels.len(), on_disk);
        for k in kernels {
            match k["embedded"].as_str().unwrap() {
                "ptx" => {
                    let isa = k["ptx_isa"].as_str().unwrap();
                    let (maj, min) = isa.split_once('.').unwrap();
                    assert!(
                        maj.parse::<u32>().is_ok() && min.parse::<u32>().is_ok(),
                        "{isa}"
                    );
                }
                "nvrtc-source" => assert!(k["ptx_isa"].is_null()),
                other => panic!("unknown embedding {other}"),
            }
        }
        assert_eq!(j["kernels_embedded"] == "none", on_disk == 0);
    } else {
        assert_eq!(j["kernels_embedded"], "none");
        assert_eq!(cuda["available"], false);
        assert_eq!(cuda["reason"], "ottkv was built without the `cuda` feature");
    }
    // Either a device with its facts, or a reason; never both, never neither.
    match cuda["available"].as_bool().unwrap() {
        true => {
            assert!(cuda["reason"].is_null());
            let d = &cuda["device"];
            assert!(!d["name"].as_str().unwrap().is_empty());
            assert!(d["total_memory_bytes"].as_u64().unwrap() > 0);
            assert!(d["compute_capability"][0].as_i64().unwrap() > 0);
        }
        false => {
            assert!(cuda["device"].is_null());
            assert!(!cuda["reason"].as_str().unwrap().is_empty());
            if std::env::var("OTTKV_REQUIRE_CUDA").as_deref() == Ok("1") {
                panic!("OTTKV_REQUIRE_CUDA=1 but: {}", cuda["reason"]);
            }
        }
    }
}

#[test]
fn info_text_names_the_cuda_state() {
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .arg("info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with(&format!("ottkv {}", env!("CARGO_PKG_VERSION"))),
        "{s}"
    );
    assert!(s.lines().any(|l| l.starts_with("cuda: ")), "{s}");
}
