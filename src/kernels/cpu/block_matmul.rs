//! `C = A · B` for the blocks of prompt attention, where the depth is short (scores: the head
//! dimension) or `B`'s rows are its natural layout (values): a 6×16 register-blocked micro-kernel
//! that broadcasts elements of `A` against 16-wide rows of `B` (AVX2/FMA, portable fallback), so
//! there is no horizontal sum per output and nothing to pack. The `gemm` tiles need a long depth to
//! pay for their per-output lane sums; at depth 64 they ran attention at a fraction of their speed.

/// Rows of `A` (and `C`) per micro-tile.
pub(crate) const MR: usize = 6;
/// Columns of `B` (and `C`) per micro-tile.
pub(crate) const NR: usize = 16;

/// One micro-tile: `C[MR × NR] = A[MR × k] · B[k × NR]` (rows `lda`, `ldb`, `ldc` apart).
type Kernel = unsafe fn(k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize);

/// SAFETY (callers): `a` has MR rows and `b` k rows of the extents above; `c` MR rows of NR.
unsafe fn kernel_portable(k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..k {
        let bp = std::slice::from_raw_parts(b.add(p * ldb), NR);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = *a.add(r * lda + p);
            row.iter_mut().zip(bp).for_each(|(x, &bv)| *x += av * bv);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        std::slice::from_raw_parts_mut(c.add(r * ldc), NR).copy_from_slice(row);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::MR;
    use std::arch::x86_64::*;

    /// SAFETY (callers): the CPU has AVX2 and FMA; otherwise as `kernel_portable`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..k {
            let (b0, b1) = (_mm256_loadu_ps(b.add(p * ldb)), _mm256_loadu_ps(b.add(p * ldb + 8)));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r * lda + p));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), row[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
        }
    }
}

fn kernel(portable: bool) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if !portable && super::has_avx2_fma() {
        return avx2::kernel;
    }
    let _ = portable;
    kernel_portable
}

/// `C = A · B` on this thread: `a` `[m, k]`, `b` `[k, n]`, `c` `[m, n]`, row-major with rows
/// `lda`, `ldb`, `ldc` apart. `m` must be a multiple of MR and `n` of NR: callers pad with zeros.
#[allow(clippy::too_many_arguments)] // BLAS-style operands: each matrix with its leading dimension
pub(crate) fn block_matmul(a: &[f32], lda: usize, m: usize, k: usize, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize) {
    block_matmul_with(kernel(false), a, lda, m, k, b, ldb, n, c, ldc)
}

#[allow(clippy::too_many_arguments)] // BLAS-style operands: each matrix with its leading dimension
fn block_matmul_with(kern: Kernel, a: &[f32], lda: usize, m: usize, k: usize, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize) {
    let fits = |len: usize, rows: usize, ld: usize, cols: usize| rows == 0 || len >= (rows - 1) * ld + cols;
    assert!(m.is_multiple_of(MR) && n.is_multiple_of(NR), "block_matmul: {m}×{n} is not made of whole {MR}×{NR} tiles");
    assert!(fits(a.len(), m, lda, k) && fits(b.len(), k, ldb, n) && fits(c.len(), m, ldc, n), "block_matmul: operand too small");
    for i in (0..m).step_by(MR) {
        for j in (0..n).step_by(NR) {
            // SAFETY: rows i.. +MR of a hold k values, rows 0..k of b columns j.. +NR, and rows
            // i.. +MR of c columns j.. +NR: all inside the slices (checked above).
            unsafe { kern(k, a.as_ptr().add(i * lda), lda, b.as_ptr().add(j), ldb, c.as_mut_ptr().add(i * ldc + j), ldc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{rand_tensor, rng, to_vec_f32};
    use candle_core::{DType, Device};

    /// Both micro-kernels against an f64 product, with row strides wider than the rows.
    #[test]
    fn block_matmul_matches_f64_reference() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("block_matmul_matches_f64_reference");
        #[allow(unused_mut)] // the vector kernel is x86's
        let mut kernels = vec![kernel_portable as Kernel];
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::has_avx2_fma() {
            kernels.push(kernel(false));
        }
        for (m, k, n) in [(6, 1, 16), (12, 64, 48), (96, 200, 64)] {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let a = to_vec_f32(&rand_tensor(&mut rng, &[m * lda], 1.0, DType::F32, &Device::Cpu));
            let b = to_vec_f32(&rand_tensor(&mut rng, &[k * ldb], 1.0, DType::F32, &Device::Cpu));
            for &kern in &kernels {
                let mut c = vec![f32::NAN; m * ldc];
                block_matmul_with(kern, &a, lda, m, k, &b, ldb, n, &mut c, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let prods = (0..k).map(|p| a[i * lda + p] as f64 * b[p * ldb + j] as f64);
                        let (want, mag) = prods.fold((0.0, 0.0), |(s, t), v| (s + v, t + v.abs()));
                        assert!((c[i * ldc + j] as f64 - want).abs() <= mag * 1e-6, "{m}x{k}x{n} [{i},{j}]: {} vs {want}", c[i * ldc + j]);
                    }
                    assert!(c[i * ldc + n..][..ldc - n].iter().all(|v| v.is_nan()), "row {i}: wrote past column n");
                }
            }
        }
    }
}
