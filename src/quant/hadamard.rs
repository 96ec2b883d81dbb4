//! The orthonormal Walsh–Hadamard rotation llama.cpp applies to quantized caches (Sylvester
//! order, scaled by 1/√n, so H = Hᵀ = H⁻¹): rotating spreads a channel outlier over the block.

/// Rotates `x` in place, block by block: `x[b*n..(b+1)*n] ← H_n · x[b*n..(b+1)*n]`.
/// `n` must be a power of two dividing `x.len()` (checked by the caller; debug-asserted here).
pub fn hadamard_blocks(x: &mut [f32], n: usize) {
    debug_assert!(n.is_power_of_two() && x.len() % n == 0);
    let scale = 1.0 / (n as f32).sqrt();
    for blk in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (blk[j], blk[j + h]);
                    blk[j] = a + b;
                    blk[j + h] = a - b;
                }
            }
            h *= 2;
        }
        blk.iter_mut().for_each(|v| *v *= scale);
    }
}

/// The rotation block sizes (K, V) llama.cpp's KV cache uses for quantized types at this head
/// size, 0 meaning no rotation: K rotates over the largest power of two (from 64) dividing
/// head_dim, V over 64-channel blocks; head sizes not a multiple of 64 are not rotated.
pub fn llama_rotation_blocks(head_dim: usize) -> (usize, usize) {
    if head_dim % 64 != 0 {
        return (0, 0);
    }
    let mut nk = 64;
    while head_dim % (2 * nk) == 0 {
        nk *= 2;
    }
    (nk, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matrix llama.cpp builds (ggml_gen_hadamard): Sylvester doubling from 1/√n.
    fn sylvester(n: usize) -> Vec<f32> {
        let mut m = vec![0f32; n * n];
        m[0] = 1.0 / (n as f32).sqrt();
        let mut s = 1;
        while s < n {
            for i in 0..s {
                for j in 0..s {
                    let v = m[i * n + j];
                    m[(i + s) * n + j] = v;
                    m[i * n + j + s] = v;
                    m[(i + s) * n + j + s] = -v;
                }
            }
            s *= 2;
        }
        m
    }

    #[test]
    fn rotation_blocks_follow_llama_cpp() {
        assert_eq!(llama_rotation_blocks(64), (64, 64));
        assert_eq!(llama_rotation_blocks(128), (128, 64));
        assert_eq!(llama_rotation_blocks(192), (64, 64));
        assert_eq!(llama_rotation_blocks(8), (0, 0));
    }

    #[test]
    fn matches_llama_cpp_matrix_and_is_an_involution() {
        for n in [1usize, 2, 8, 64, 128] {
            let h = sylvester(n);
            let x: Vec<f32> = (0..2 * n)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
                .collect();
            let mut y = x.clone();
            hadamard_blocks(&mut y, n);
            for b in 0..2 {
                for i in 0..n {
                    let want: f32 = (0..n).map(|j| h[i * n + j] * x[b * n + j]).sum();
                    assert!((y[b * n + i] - want).abs() < 1e-5, "n {n} row {i}");
                }
            }
            hadamard_blocks(&mut y, n);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }
}
