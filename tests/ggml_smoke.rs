//! The ggml FFI layer computes a real graph on the CPU backend, and refuses bad shapes with an
//! error instead of letting ggml abort.

use ottkv::ggml::Context;

#[test]
fn matmul_plus_bias_on_cpu_backend() {
    let ctx = Context::new(16 << 20, false).unwrap();
    // a: [k=3, m=2] (two rows of 3), b: [k=3, n=2], bias: [m=2, n=2]
    let a = ctx.new_f32(&[3, 2]).unwrap();
    let b = ctx.new_f32(&[3, 2]).unwrap();
    let bias = ctx.new_f32(&[2, 2]).unwrap();
    a.set_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    b.set_f32(&[1.0, 0.0, -1.0, 0.5, 0.5, 0.5]).unwrap();
    bias.set_f32(&[10.0, 20.0, 30.0, 40.0]).unwrap();
    let mm = ctx.mul_mat(a, b).unwrap();
    let out = ctx.add(mm, bias).unwrap();
    for threads in [1, 2] {
        ctx.compute(out, threads).unwrap();
        // out[m, n] = sum_k a[m][k] * b[n][k] + bias
        let want = [
            1.0 - 3.0 + 10.0,
            4.0 - 6.0 + 20.0,
            0.5 * 6.0 + 30.0,
            0.5 * 15.0 + 40.0,
        ];
        assert_eq!(out.ne(), [2, 2, 1, 1]);
        assert_eq!(out.to_vec_f32().unwrap(), want);
    }
}

#[test]
fn mismatched_shapes_are_errors_not_aborts() {
    let ctx = Context::new(1 << 20, false).unwrap();
    let a = ctx.new_f32(&[3, 2]).unwrap();
    let b = ctx.new_f32(&[4, 2]).unwrap();
    assert!(ctx.mul_mat(a, b).is_err());
    let c = ctx.new_f32(&[3, 3]).unwrap();
    assert!(ctx.add(a, c).is_err());
    assert!(a.set_f32(&[1.0; 5]).is_err());
    assert!(ctx.new_f32(&[0, 2]).is_err());
    assert!(ctx.new_f32(&[1, 1, 1, 1, 1]).is_err());
    // A quantized row must be a whole number of blocks (q4_0: 32).
    assert!(ctx
        .new_tensor(ottkv::ggml::sys::GGML_TYPE_Q4_0, &[33])
        .is_err());
}

#[test]
fn arena_exhaustion_is_an_error() {
    let ctx = Context::new(64 * 1024, false).unwrap();
    assert!(ctx.new_f32(&[1 << 20]).is_err());
}

#[test]
fn version_is_reported() {
    let v = ottkv::ggml::version();
    assert!(v.split('.').count() >= 2, "ggml version {v:?}");
}
