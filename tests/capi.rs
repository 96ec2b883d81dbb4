//! The C ABI: the C examples compiled against include/ottkv.h and the built static library,
//! the header's struct layouts against Rust's, and misuse through the extern "C" functions.
//!
//! The C parts need `cc` and the staticlib of this profile (target/<profile>/libottkv.a, which
//! cargo builds with the lib before any test; ottkv.pc beside it comes from build.rs). Without
//! `cc` they print `skipping: <why>`; with OTTKV_REQUIRE_CC=1 that is a failure.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};

use ottkv::capi::ottkv_status::{self, *};
use ottkv::capi::*;

// ---- C side ---------------------------------------------------------------------------------

/// target/<profile>/ of this test binary (it lives in target/<profile>/deps/).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// (cflags, libs) from ottkv.pc, the way a user's build gets them; None after `skipping:`.
fn c_toolchain(test: &str) -> Option<(Vec<String>, Vec<String>)> {
    let skip = |why: String| {
        if std::env::var("OTTKV_REQUIRE_CC").as_deref() == Ok("1") {
            panic!("{test}: {why}");
        }
        println!("skipping: {test}: {why}");
        None
    };
    if Command::new("cc").arg("--version").output().is_err() {
        return skip("no C compiler `cc` on PATH (scripts/setup.sh installs one)".into());
    }
    let dir = profile_dir();
    let lib = dir.join("libottkv.a");
    if !lib.is_file() {
        return skip(format!("{} not built", lib.display()));
    }
    let pc = dir.join("ottkv.pc");
    let text = std::fs::read_to_string(&pc).unwrap_or_else(|e| panic!("{}: {e}", pc.display()));
    // Read the .pc ourselves (pkg-config may be absent); it only uses ${libdir}.
    let libdir = text
        .lines()
        .find_map(|l| l.strip_prefix("libdir="))
        .expect("libdir in ottkv.pc");
    let field = |name: &str| -> Vec<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in ottkv.pc"))
            .replace("${libdir}", libdir)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let (cflags, libs) = (field("Cflags:"), field("Libs:"));
    assert!(
        cflags.iter().any(|f| f.ends_with("/include")),
        "ottkv.pc Cflags lack include/: {cflags:?}"
    );
    assert!(
        libs.iter().any(|l| Path::new(l) == lib),
        "ottkv.pc Libs do not name {}: {libs:?}",
        lib.display()
    );
    Some((cflags, libs))
}

/// Compiles `src` (strict warnings) against the header and the static library, runs it.
fn build_and_run(src: &Path, cflags: &[String], libs: &[String]) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = tmp.path().join(src.file_stem().unwrap());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("cc")
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(repo.join("examples/c"))
        .arg(src)
        .args(cflags)
        .args(libs)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running cc");
    assert!(
        out.status.success(),
        "cc {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("running the example");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{stdout}");
    assert!(
        run.status.success(),
        "{} failed ({}):\n{stdout}\n{}",
        src.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

#[test]
fn c_example_cache_api() {
    let Some((cflags, libs)) = c_toolchain("c_example_cache_api") else {
        return;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c/cache_api.c");
    let out = build_and_run(&src, &cflags, &libs);
    assert!(out.contains("PASSED") && !out.contains("FAIL "), "{out}");
}

#[test]
fn c_example_ggml_op() {
    let Some((cflags, libs)) = c_toolchain("c_example_ggml_op") else {
        return;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c/ggml_op.c");
    let out = build_and_run(&src, &cflags, &libs);
    assert!(out.contains("PASSED") && !out.contains("FAIL "), "{out}");
}

/// Every misuse of the API through C, compiled with AddressSanitizer and UBSan: each call is
/// a status code, and none reads, writes or leaks what it should not.
#[test]
fn c_misuse_under_sanitizers() {
    let Some((cflags, libs)) = c_toolchain("c_misuse_under_sanitizers") else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = repo.join("examples/c/misuse.c");
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = tmp.path().join("misuse");
    let san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"];
    let out = Command::new("cc")
        .args(["-std=c11", "-O1", "-g", "-fno-omit-frame-pointer"])
        .args(["-Wall", "-Wextra", "-Werror"])
        .args(san)
        .arg(&src)
        .args(&cflags)
        .args(&libs)
        .args(san)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running cc");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // A compiler without the sanitizer runtimes (libasan/libubsan) cannot run this check.
        if err.contains("cannot find -lasan") || err.contains("cannot find -lubsan") {
            let why = format!("cc has no sanitizer runtime: {}", err.trim());
            if std::env::var("OTTKV_REQUIRE_CC").as_deref() == Ok("1") {
                panic!("c_misuse_under_sanitizers: {why}");
            }
            println!("skipping: c_misuse_under_sanitizers: {why}");
            return;
        }
        panic!("cc {} failed:\n{err}", src.display());
    }
    let run = Command::new(&exe)
        // Leaks are findings too; any sanitizer report fails the run.
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:abort_on_error=0:exitcode=23",
        )
        .env(
            "UBSAN_OPTIONS",
            "print_stacktrace=1:halt_on_error=1:exitcode=24",
        )
        .output()
        .expect("running misuse");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(
        run.status.success() && stdout.contains("PASSED") && !stdout.contains("FAIL "),
        "misuse.c ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(
        !stderr.contains("Sanitizer") && !stderr.contains("runtime error"),
        "{stderr}"
    );
}

/// The header's structs, as the C compiler lays them out, equal Rust's `repr(C)` mirrors.
#[test]
fn c_header_layouts_match_rust() {
    let Some((cflags, libs)) = c_toolchain("c_header_layouts_match_rust") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("layout.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <stddef.h>
#include "ottkv.h"
#define F(T, f) printf(#T "." #f " %zu\n", offsetof(T, f))
int main(void) {
    printf("config %zu\nshape %zu\nstats %zu\noverride %zu\nstatus %zu\n",
           sizeof(ottkv_cache_config), sizeof(ottkv_cache_shape), sizeof(ottkv_memory_stats),
           sizeof(ottkv_layer_override), sizeof(ottkv_status));
    F(ottkv_cache_config, value_group); F(ottkv_cache_config, rotate);
    F(ottkv_cache_config, sink); F(ottkv_cache_config, overrides);
    F(ottkv_cache_config, n_overrides); F(ottkv_cache_shape, max_tokens);
    F(ottkv_memory_stats, total);
    printf("abi %d\nggml %s\n", OTTKV_ABI_VERSION, OTTKV_GGML_VERSION);
    return 0;
}
"#,
    )
    .unwrap();
    let out = build_and_run(&src, &cflags, &libs);
    use std::mem::{offset_of, size_of};
    let want = format!(
        "config {}\nshape {}\nstats {}\noverride {}\nstatus {}\n\
         ottkv_cache_config.value_group {}\nottkv_cache_config.rotate {}\n\
         ottkv_cache_config.sink {}\nottkv_cache_config.overrides {}\n\
         ottkv_cache_config.n_overrides {}\nottkv_cache_shape.max_tokens {}\n\
         ottkv_memory_stats.total {}\nabi {}\nggml {}\n",
        size_of::<ottkv_cache_config>(),
        size_of::<ottkv_cache_shape>(),
        size_of::<ottkv_memory_stats>(),
        size_of::<ottkv_layer_override>(),
        size_of::<ottkv_status>(),
        offset_of!(ottkv_cache_config, value_group),
        offset_of!(ottkv_cache_config, rotate),
        offset_of!(ottkv_cache_config, sink),
        offset_of!(ottkv_cache_config, overrides),
        offset_of!(ottkv_cache_config, n_overrides),
        offset_of!(ottkv_cache_shape, max_tokens),
        offset_of!(ottkv_memory_stats, total),
        ABI_VERSION,
        GGML_VERSION,
    );
    assert_eq!(out, want);
}

// ---- Misuse through the extern "C" functions -----------------------------------------------

const HD: usize = 16;
const NKV: usize = 2;
const NH: usize = 4;

fn last_error() -> String {
    // SAFETY: ottkv_last_error never returns NULL; the string lives until our next call.
    unsafe { CStr::from_ptr(ottkv_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts an error status with a non-empty message naming `needle`.
#[track_caller]
fn expect_err(st: ottkv_status, want: ottkv_status, needle: &str) {
    let msg = last_error();
    assert_eq!(st, want, "message: {msg}");
    assert!(!msg.is_empty(), "{want:?} without a message");
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

fn config(spec: &str) -> ottkv_cache_config {
    let mut c = std::mem::MaybeUninit::<ottkv_cache_config>::uninit();
    let s = CString::new(spec).unwrap();
    // SAFETY: valid spec string and out pointer; no overrides expected.
    let st = unsafe { ottkv_cache_config_from_spec(s.as_ptr(), c.as_mut_ptr(), null_mut(), 0) };
    assert_eq!(st, OTTKV_OK, "{}", last_error());
    // SAFETY: written on OTTKV_OK.
    unsafe { c.assume_init() }
}

fn shape(max_tokens: u64) -> ottkv_cache_shape {
    ottkv_cache_shape {
        n_layer: 2,
        n_head_kv: NKV as u32,
        head_dim: HD as u32,
        max_tokens,
    }
}

fn create(spec: &str, max_tokens: u64) -> *mut ottkv_cache {
    let (c, s) = (config(spec), shape(max_tokens));
    let mut h = null_mut();
    // SAFETY: valid config, shape and out pointer.
    let st = unsafe { ottkv_cache_create(&c, &s, &mut h) };
    assert_eq!(st, OTTKV_OK, "{}", last_error());
    assert!(!h.is_null());
    h
}

fn data(n: usize, salt: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
}

/// `ottkv_cache_forward` of n tokens on layer 0 (k = v = kv), 1 thread.
fn forward(h: *mut ottkv_cache, n: usize, q: &[f32], kv: &[f32], out: &mut [f32]) -> ottkv_status {
    // SAFETY: every pointer comes with its slice's true length.
    unsafe {
        ottkv_cache_forward(
            h,
            0,
            n,
            NH as u32,
            0.25,
            q.as_ptr(),
            q.len(),
            kv.as_ptr(),
            kv.len(),
            kv.as_ptr(),
            kv.len(),
            out.as_mut_ptr(),
            out.len(),
            1,
        )
    }
}

#[test]
fn version_and_status_names() {
    // SAFETY: static strings.
    let v = unsafe { CStr::from_ptr(ottkv_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(ottkv_abi_version(), ABI_VERSION);
    // SAFETY: static string.
    let g = unsafe { CStr::from_ptr(ottkv_ggml_version()) }
        .to_str()
        .unwrap();
    assert_eq!(
        g, GGML_VERSION,
        "OTTKV_GGML_VERSION is stale: bump the header and capi"
    );
    let name = |s: i32| {
        // SAFETY: static strings.
        unsafe { CStr::from_ptr(ottkv_status_name(s)) }
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(name(OTTKV_ERR_SHAPE as i32), "OTTKV_ERR_SHAPE");
    assert_eq!(name(OTTKV_ERR_VERSION as i32), "OTTKV_ERR_VERSION");
    assert_eq!(name(-1), "unknown");
    assert_eq!(name(99), "unknown");
}

#[test]
fn cuda_unavailable_says_why() {
    if ottkv_cuda_available() == 0 {
        assert!(!last_error().is_empty());
    } else {
        println!("a CUDA device is present");
    }
}

#[test]
fn null_pointers_are_errors() {
    let c = config("ott2");
    let s = shape(64);
    let mut h = null_mut();
    // SAFETY (all calls below): every pointer is NULL or valid; NULLs are what is tested.
    unsafe {
        expect_err(
            ottkv_cache_create(null(), &s, &mut h),
            OTTKV_ERR_NULL,
            "NULL",
        );
        expect_err(
            ottkv_cache_create(&c, null(), &mut h),
            OTTKV_ERR_NULL,
            "NULL",
        );
        expect_err(
            ottkv_cache_create(&c, &s, null_mut()),
            OTTKV_ERR_NULL,
            "NULL",
        );
        expect_err(
            ottkv_cache_config_default(null_mut()),
            OTTKV_ERR_NULL,
            "out",
        );
        let mut cc = c;
        expect_err(
            ottkv_cache_config_from_spec(null(), &mut cc, null_mut(), 0),
            OTTKV_ERR_NULL,
            "spec",
        );
        expect_err(ottkv_cache_reset(null_mut()), OTTKV_ERR_NULL, "handle");
        let mut len = 0u64;
        expect_err(
            ottkv_cache_len(null_mut(), 0, &mut len),
            OTTKV_ERR_NULL,
            "handle",
        );
        expect_err(ottkv_ggml_check(null_mut()), OTTKV_ERR_NULL, "handle");
        assert_eq!(
            ottkv_cache_free(null_mut()),
            OTTKV_OK,
            "free(NULL) is a no-op"
        );

        let h = create("ott2", 64);
        expect_err(ottkv_cache_len(h, 0, null_mut()), OTTKV_ERR_NULL, "out_len");
        expect_err(ottkv_cache_memory(h, null_mut()), OTTKV_ERR_NULL, "out");
        let mut out = vec![0f32; NH * HD];
        let kv = data(NKV * HD, 1.0);
        // q NULL with a non-zero length.
        let st = ottkv_cache_forward(
            h,
            0,
            1,
            NH as u32,
            0.25,
            null(),
            NH * HD,
            kv.as_ptr(),
            kv.len(),
            kv.as_ptr(),
            kv.len(),
            out.as_mut_ptr(),
            out.len(),
            1,
        );
        expect_err(st, OTTKV_ERR_NULL, "q is NULL");
        expect_err(
            ottkv_cache_append(h, 0, 1, kv.as_ptr(), kv.len(), null(), kv.len()),
            OTTKV_ERR_NULL,
            "v is NULL",
        );
        let mut n_sub = 0usize;
        expect_err(
            ottkv_cache_plan(h, 0, 5, null_mut(), 4, &mut n_sub),
            OTTKV_ERR_NULL,
            "starts",
        );
        let ctx = null_mut();
        let t = ottkv_ggml_attention(h, ctx, 0, null_mut(), null_mut(), null_mut(), 1.0);
        assert!(t.is_null());
        assert!(last_error().contains("NULL"), "{}", last_error());
        assert_eq!(ottkv_cache_free(h), OTTKV_OK);
    }
}

#[test]
fn wrong_sizes_shapes_and_ranges_are_errors_and_change_nothing() {
    let h = create("ott2:g=16,r=16", 40);
    let q = data(NH * HD, 0.5);
    let kv = data(NKV * HD, 1.5);
    let mut out = vec![0f32; NH * HD];
    // Too short q, k; too long out.
    expect_err(
        forward(h, 1, &q[1..], &kv, &mut out),
        OTTKV_ERR_SHAPE,
        "q [n][n_head][head_dim]",
    );
    expect_err(
        forward(h, 1, &q, &kv[1..], &mut out),
        OTTKV_ERR_SHAPE,
        "expected length",
    );
    let mut long = vec![0f32; NH * HD + 1];
    expect_err(forward(h, 1, &q, &kv, &mut long), OTTKV_ERR_SHAPE, "out");
    // n_head not a multiple of n_head_kv.
    // SAFETY: true lengths.
    let st = unsafe {
        ottkv_cache_forward(
            h,
            0,
            1,
            3,
            0.25,
            q.as_ptr(),
            3 * HD,
            kv.as_ptr(),
            kv.len(),
            kv.as_ptr(),
            kv.len(),
            out.as_mut_ptr(),
            3 * HD,
            1,
        )
    };
    expect_err(st, OTTKV_ERR_SHAPE, "n_head 3");
    // Layer out of range, on every call that takes one.
    let mut len = 0u64;
    // SAFETY: valid pointers.
    unsafe {
        expect_err(ottkv_cache_len(h, 2, &mut len), OTTKV_ERR_RANGE, "layer 2");
        expect_err(
            ottkv_cache_append(h, 7, 1, kv.as_ptr(), kv.len(), kv.as_ptr(), kv.len()),
            OTTKV_ERR_RANGE,
            "layer 7",
        );
        // Rows past the batch.
        expect_err(
            ottkv_cache_attend(
                h,
                0,
                0,
                NH as u32,
                0.25,
                q.as_ptr(),
                0,
                0,
                1,
                out.as_mut_ptr(),
                HD,
            ),
            OTTKV_ERR_RANGE,
            "row range",
        );
    }
    // Non-finite K, non-finite scale.
    let mut bad = kv.clone();
    bad[3] = f32::NAN;
    expect_err(
        forward(h, 1, &q, &bad, &mut out),
        OTTKV_ERR_NON_FINITE,
        "not a finite f16",
    );
    bad[3] = 1e6; // overflows f16
    expect_err(
        forward(h, 1, &q, &bad, &mut out),
        OTTKV_ERR_NON_FINITE,
        "not a finite f16",
    );
    // SAFETY: true lengths.
    let st = unsafe {
        ottkv_cache_attend(
            h,
            0,
            1,
            NH as u32,
            f32::NAN,
            q.as_ptr(),
            q.len(),
            0,
            NH,
            out.as_mut_ptr(),
            out.len(),
        )
    };
    expect_err(st, OTTKV_ERR_INVALID_ARGUMENT, "scale");
    // Output overlapping an input.
    let mut buf = data(NH * HD, 0.1);
    let p = buf.as_mut_ptr();
    // SAFETY: true lengths; out aliases q on purpose (the call must refuse it).
    let st = unsafe {
        ottkv_cache_forward(
            h,
            0,
            1,
            NH as u32,
            0.25,
            p,
            NH * HD,
            kv.as_ptr(),
            kv.len(),
            kv.as_ptr(),
            kv.len(),
            p,
            NH * HD,
            1,
        )
    };
    expect_err(st, OTTKV_ERR_INVALID_ARGUMENT, "overlaps q");
    // Misaligned float pointer.
    let raw = vec![0u8; (NH * HD + 1) * 4];
    // SAFETY: true lengths; the pointer is misaligned on purpose (checked before any read).
    let st = unsafe {
        ottkv_cache_forward(
            h,
            0,
            1,
            NH as u32,
            0.25,
            raw.as_ptr().add(1).cast(),
            NH * HD,
            kv.as_ptr(),
            kv.len(),
            kv.as_ptr(),
            kv.len(),
            out.as_mut_ptr(),
            out.len(),
            1,
        )
    };
    expect_err(st, OTTKV_ERR_INVALID_ARGUMENT, "aligned");
    // None of that appended anything.
    // SAFETY: valid pointer.
    assert_eq!(unsafe { ottkv_cache_len(h, 0, &mut len) }, OTTKV_OK);
    assert_eq!(len, 0);
    assert_eq!(last_error(), "", "success clears the last error");

    // Overflow: 40 tokens fit, 41 do not, and the failed call appends nothing.
    let n = 41;
    let (q41, kv41) = (data(n * NH * HD, 0.2), data(n * NKV * HD, 0.3));
    let mut o41 = vec![0f32; n * NH * HD];
    expect_err(
        forward(h, n, &q41, &kv41, &mut o41),
        OTTKV_ERR_OVERFLOW,
        "max_tokens 40",
    );
    let m = 40;
    let st = forward(
        h,
        m,
        &q41[..m * NH * HD],
        &kv41[..m * NKV * HD],
        &mut o41[..m * NH * HD],
    );
    assert_eq!(st, OTTKV_OK, "{}", last_error());
    expect_err(
        forward(h, 1, &q, &kv, &mut out),
        OTTKV_ERR_OVERFLOW,
        "exceed",
    );

    // attend over tokens that straddle a flush: SUBBATCH; plan says how to split (room for
    // the 40 planned after the 40 appended).
    let h2 = create("ott2:g=16,r=16", 128);
    let kv40 = data(40 * NKV * HD, 0.7);
    let q40 = data(40 * NH * HD, 0.8);
    let mut o40 = vec![0f32; 40 * NH * HD];
    // SAFETY: true lengths.
    unsafe {
        let st = ottkv_cache_append(
            h2,
            0,
            40,
            kv40.as_ptr(),
            kv40.len(),
            kv40.as_ptr(),
            kv40.len(),
        );
        assert_eq!(st, OTTKV_OK, "{}", last_error());
        let st = ottkv_cache_attend(
            h2,
            0,
            40,
            NH as u32,
            0.25,
            q40.as_ptr(),
            q40.len(),
            0,
            40 * NH,
            o40.as_mut_ptr(),
            o40.len(),
        );
        expect_err(st, OTTKV_ERR_SUBBATCH, "plan");
        let (mut starts, mut n_sub) = ([0usize; 1], 0usize);
        let st = ottkv_cache_plan(h2, 0, 40, starts.as_mut_ptr(), 1, &mut n_sub);
        expect_err(st, OTTKV_ERR_OVERFLOW, "cap is 1");
        // Window 24 after 40 tokens; it reaches R + G = 32 after 8, 24 and 40 more tokens.
        assert_eq!(n_sub, 4);
        let mut all = [0usize; 4];
        let st = ottkv_cache_plan(h2, 0, 40, all.as_mut_ptr(), 4, &mut n_sub);
        assert_eq!(st, OTTKV_OK, "{}", last_error());
        assert_eq!(all, [0, 7, 23, 39]);
    }
    // SAFETY: valid handles.
    unsafe {
        assert_eq!(ottkv_cache_free(h), OTTKV_OK);
        assert_eq!(ottkv_cache_free(h2), OTTKV_OK);
    }
}

#[test]
fn bad_configs_and_specs_are_errors() {
    let s = shape(64);
    let mut h = null_mut();
    let mut c = config("ott2");
    c.group = 17;
    // SAFETY (all below): valid pointers.
    unsafe {
        expect_err(
            ottkv_cache_create(&c, &s, &mut h),
            OTTKV_ERR_INVALID_ARGUMENT,
            "group",
        );
        c = config("ott2");
        c.score = 7;
        expect_err(
            ottkv_cache_create(&c, &s, &mut h),
            OTTKV_ERR_INVALID_ARGUMENT,
            "score",
        );
        c = config("ott2");
        c.n_overrides = 2;
        expect_err(
            ottkv_cache_create(&c, &s, &mut h),
            OTTKV_ERR_NULL,
            "overrides",
        );
        let dup = [
            ottkv_layer_override {
                layer: 1,
                pool: 4,
                extra: -1,
                key_bits: -1,
                value_bits: -1,
            },
            ottkv_layer_override {
                layer: 1,
                pool: 5,
                extra: -1,
                key_bits: -1,
                value_bits: -1,
            },
        ];
        c.overrides = dup.as_ptr();
        expect_err(
            ottkv_cache_create(&c, &s, &mut h),
            OTTKV_ERR_INVALID_ARGUMENT,
            "overrides",
        );
        let beyond = [ottkv_layer_override {
            layer: 9,
            pool: 4,
            extra: -1,
            key_bits: -1,
            value_bits: -1,
        }];
        c.overrides = beyond.as_ptr();
        c.n_overrides = 1;
        expect_err(
            ottkv_cache_create(&c, &s, &mut h),
            OTTKV_ERR_SHAPE,
            "layer 9",
        );
        c = config("ott2");
        let mut bad_shape = s;
        bad_shape.head_dim = 0;
        expect_err(
            ottkv_cache_create(&c, &bad_shape, &mut h),
            OTTKV_ERR_SHAPE,
            "positive",
        );
        assert!(h.is_null(), "no handle on failure");

        let mut out = c;
        let spec = CString::new("ott2:q=1").unwrap();
        let st = ottkv_cache_config_from_spec(spec.as_ptr(), &mut out, null_mut(), 0);
        expect_err(st, OTTKV_ERR_INVALID_ARGUMENT, "unknown field");
        let spec = CString::new("nope").unwrap();
        let st = ottkv_cache_config_from_spec(spec.as_ptr(), &mut out, null_mut(), 0);
        expect_err(st, OTTKV_ERR_INVALID_ARGUMENT, "preset");
        // Overrides: too small an array says how many are needed; then it fits.
        let spec = CString::new("ott2:p@1=8,e@0=4").unwrap();
        let mut ov = [ottkv_layer_override::default(); 2];
        let st = ottkv_cache_config_from_spec(spec.as_ptr(), &mut out, ov.as_mut_ptr(), 1);
        expect_err(st, OTTKV_ERR_OVERFLOW, "overrides_cap is 1");
        assert_eq!(out.n_overrides, 2);
        let st = ottkv_cache_config_from_spec(spec.as_ptr(), &mut out, ov.as_mut_ptr(), 2);
        assert_eq!(st, OTTKV_OK, "{}", last_error());
        assert_eq!(out.overrides, ov.as_ptr());
        assert_eq!(
            ov[0],
            ottkv_layer_override {
                layer: 0,
                pool: -1,
                extra: 4,
                key_bits: -1,
                value_bits: -1,
            }
        );
        assert_eq!(
            ov[1],
            ottkv_layer_override {
                layer: 1,
                pool: 8,
                extra: -1,
                key_bits: -1,
                value_bits: -1,
            }
        );
        assert_eq!(
            ottkv_cache_create(&out, &s, &mut h),
            OTTKV_OK,
            "{}",
            last_error()
        );
        assert_eq!(ottkv_cache_free(h), OTTKV_OK);
        // The default is the ott2 preset.
        let mut d = std::mem::MaybeUninit::uninit();
        assert_eq!(ottkv_cache_config_default(d.as_mut_ptr()), OTTKV_OK);
        let d = d.assume_init();
        let o = config("ott2");
        assert_eq!(
            (
                d.key_bits,
                d.value_bits,
                d.group,
                d.residual,
                d.pool,
                d.extra,
                d.untraced_layers
            ),
            (
                o.key_bits,
                o.value_bits,
                o.group,
                o.residual,
                o.pool,
                o.extra,
                o.untraced_layers
            )
        );
    }
}

#[test]
fn use_after_free_and_double_free_are_errors() {
    let h = create("ott4", 32);
    let mut len = 0u64;
    let mut m = ottkv_memory_stats::default();
    // SAFETY (all below): valid pointers; the handle is only ever looked up.
    unsafe {
        assert_eq!(ottkv_cache_memory(h, &mut m), OTTKV_OK);
        assert!(
            m.total > 0 && m.total == m.codes + m.params + m.window + m.pools + m.masks_positions
        );
        assert_eq!(ottkv_cache_free(h), OTTKV_OK);
        expect_err(ottkv_cache_free(h), OTTKV_ERR_HANDLE, "freed");
        expect_err(ottkv_cache_len(h, 0, &mut len), OTTKV_ERR_HANDLE, "freed");
        expect_err(ottkv_cache_memory(h, &mut m), OTTKV_ERR_HANDLE, "freed");
        expect_err(ottkv_cache_reset(h), OTTKV_ERR_HANDLE, "freed");
        expect_err(ottkv_ggml_check(h), OTTKV_ERR_HANDLE, "freed");
        let q = data(NH * HD, 0.0);
        let kv = data(NKV * HD, 0.0);
        let mut out = vec![0f32; NH * HD];
        expect_err(forward(h, 1, &q, &kv, &mut out), OTTKV_ERR_HANDLE, "freed");
        // A forged token is no better than a freed one.
        let forged = 0xdead_beef_usize as *mut ottkv_cache;
        expect_err(ottkv_cache_reset(forged), OTTKV_ERR_HANDLE, "never created");
        // A new cache never reuses the old token.
        let h2 = create("ott4", 32);
        assert_ne!(h2, h);
        expect_err(ottkv_cache_len(h, 0, &mut len), OTTKV_ERR_HANDLE, "freed");
        assert_eq!(ottkv_cache_free(h2), OTTKV_OK);
    }
}

#[test]
fn last_error_is_per_thread() {
    // SAFETY: valid (NULL) handle.
    let st = unsafe { ottkv_cache_reset(null_mut()) };
    assert_eq!(st, OTTKV_ERR_NULL);
    let here = last_error();
    let there = std::thread::spawn(last_error).join().unwrap();
    assert!(!here.is_empty());
    assert_eq!(there, "", "another thread's last error is its own");
    let p: *const c_char = ottkv_last_error();
    assert!(!p.is_null());
}

#[test]
fn capi_forward_matches_rust_cache() {
    // The C entry point is a thin shell: same numbers as the Rust cache on the same input.
    for spec in ["ott2:g=16,r=8,t=0", "recommended:g=16,r=8,t=0"] {
        forward_matches_rust(spec);
    }
    // The alias reaches the C spec parser, adaptive fields and all.
    let c = config("recommended");
    assert_eq!(
        (
            c.rotate,
            c.window_bits,
            c.key_bits,
            c.value_param_bits,
            c.value_fit
        ),
        (2, 0, 3, 8, 1)
    );
}

fn forward_matches_rust(spec: &str) {
    let h = create(spec, 64);
    let mut rust = ottkv::cache::OttCache::new(
        spec.parse().unwrap(),
        ottkv::cache::CacheShape {
            n_layer: 2,
            n_head_kv: NKV,
            head_dim: HD,
            max_tokens: 64,
        },
    )
    .unwrap();
    let n = 50;
    let (q, kv) = (data(n * NH * HD, 0.9), data(n * NKV * HD, 0.4));
    let (mut a, mut b) = (vec![0f32; n * NH * HD], vec![0f32; n * NH * HD]);
    assert_eq!(forward(h, n, &q, &kv, &mut a), OTTKV_OK, "{}", last_error());
    rust.forward(0, &q, &kv, &kv, n, NH, 0.25, &mut b, 1)
        .unwrap();
    assert_eq!(a, b);
    // SAFETY: valid handle.
    assert_eq!(unsafe { ottkv_cache_free(h) }, OTTKV_OK);
}

#[test]
fn storage_that_cannot_be_had_is_an_alloc_status() {
    let c = config("ott2");
    // 2^32 heads: the windows alone would take terabytes. Before, the failed allocation
    // aborted the process.
    let s = ottkv_cache_shape {
        n_layer: 65536,
        n_head_kv: 65536,
        head_dim: 16,
        max_tokens: 1 << 20,
    };
    let mut h = null_mut();
    // SAFETY: valid pointers.
    unsafe {
        expect_err(
            ottkv_cache_create(&c, &s, &mut h),
            OTTKV_ERR_ALLOC,
            "bytes of memory",
        );
    }
    assert!(h.is_null(), "a failed create wrote a handle");
    let name = |st: i32| {
        // SAFETY: static strings.
        unsafe { CStr::from_ptr(ottkv_status_name(st)) }
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(name(OTTKV_ERR_ALLOC as i32), "OTTKV_ERR_ALLOC");
}

#[test]
fn plan_over_more_tokens_than_fit_answers_at_once() {
    let h = create("ott2:g=16,r=16", 64);
    let mut n_sub = 7usize;
    // SAFETY: valid pointers; starts may be NULL with cap 0.
    unsafe {
        // It used to walk all SIZE_MAX tokens, pushing a range per flush until memory ran out.
        for n in [usize::MAX, usize::MAX / 16, 65] {
            expect_err(
                ottkv_cache_plan(h, 0, n, null_mut(), 0, &mut n_sub),
                OTTKV_ERR_OVERFLOW,
                "exceed max_tokens 64",
            );
            assert_eq!(n_sub, 7, "n_sub written for a refused plan");
        }
        // Every token that fits: the count is known before anything is written.
        expect_err(
            ottkv_cache_plan(h, 0, 64, null_mut(), 0, &mut n_sub),
            OTTKV_ERR_OVERFLOW,
            "cap is 0",
        );
        // Empty window: the 32nd token flushes (R + G), then every 16th: tokens 31, 47, 63.
        assert_eq!(n_sub, 4);
        let mut starts = [0usize; 4];
        let st = ottkv_cache_plan(h, 0, 64, starts.as_mut_ptr(), 4, &mut n_sub);
        assert_eq!(st, OTTKV_OK, "{}", last_error());
        assert_eq!(starts, [0, 31, 47, 63]);
        assert_eq!(ottkv_cache_free(h), OTTKV_OK);
    }
}

#[test]
fn thread_counts_beyond_the_cores_are_clamped() {
    let h = create("ott2:g=16,r=16", 64);
    let q = data(NH * HD, 0.5);
    let kv = data(NKV * HD, 1.5);
    let mut out = vec![0f32; NH * HD];
    // SAFETY: true lengths.
    let st = unsafe {
        ottkv_cache_forward(
            h,
            0,
            1,
            NH as u32,
            0.25,
            q.as_ptr(),
            q.len(),
            kv.as_ptr(),
            kv.len(),
            kv.as_ptr(),
            kv.len(),
            out.as_mut_ptr(),
            out.len(),
            u32::MAX,
        )
    };
    assert_eq!(st, OTTKV_OK, "{}", last_error());
    assert!(out.iter().all(|x| x.is_finite()));
    // SAFETY: valid handle.
    assert_eq!(unsafe { ottkv_cache_free(h) }, OTTKV_OK);
}
