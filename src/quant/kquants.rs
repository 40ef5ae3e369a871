//! Q4_K, Q5_K and Q6_K quantizers ported from ggml-quants.c (`quantize_row_q{4,5,6}_K_ref`, what
//! `llama-quantize` runs without an importance matrix), written out in ggml's block layouts. They exist
//! because candle 0.11.1's K-quant quantizers predate ggml's current ones (`make_qkx1_quants`, the old
//! `make_qx_quants`, `f32::round`), and llama.cpp's bytes are the reference expanse quantizes to.
//!
//! Bytes must match, so the C is followed operation for operation: f32 arithmetic in the same order
//! and loop order (Rust never contracts `a * b + c` into a fused multiply-add), ggml's `nearest_int`
//! (ties to even, not `f32::round`'s away from zero) and C's integer narrowing (`as u8`/`as i8` wrap
//! as two's complement conversions do).

use half::f16;

/// Values per super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;
/// Bytes of a `block_q4_K`: d, dmin (f16), scales[12], qs[128].
pub const Q4K_BYTES: usize = 144;
/// Bytes of a `block_q5_K`: d, dmin (f16), scales[12], qh[32], qs[128].
pub const Q5K_BYTES: usize = 176;
/// Bytes of a `block_q6_K`: ql[128], qh[64], scales[16] (i8), d (f16).
pub const Q6K_BYTES: usize = 210;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it is quantized as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: adding 1.5·2²³ leaves the integer in the mantissa, rounded by the FPU's
/// round-to-nearest-even (valid for |x| ≤ 2²² − 1, as ggml asserts).
#[inline]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    ((val.to_bits() as i32) & 0x007f_ffff) - 0x0040_0000
}

/// The value of largest magnitude (the first of equals, sign kept) and that magnitude, as ggml's
/// loops find them (`if (ax > amax) { amax = ax; max = x; }`).
fn signed_absmax(xs: impl IntoIterator<Item = f32>) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for x in xs {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    (max, amax)
}

/// `GGML_FP32_TO_FP16` (round to nearest even, as F16C's `_cvtss_sh(x, 0)` and ggml's software path).
#[inline]
fn fp16_bits(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[inline]
fn fp16_value(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
}

/// ggml's `make_qkx2_quants` (weighted scale-and-min fit of one group to `0..=nmax`): the scale, with
/// the (positive) min written to `the_min` and the levels to `l`.
#[allow(clippy::too_many_arguments)] // the C signature, kept so the port reads against it
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], l: &mut [u8], the_min: &mut f32, laux: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> f32 {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    // The min is clamped before the constant-group test: a constant positive group keeps its value
    // as the scale's job (scale 0 only when the group is all zero or all equal and ≤ 0).
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        *the_min = -min;
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        let diff = diff * diff;
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        *the_min = -min;
        return scale;
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = diff * diff;
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    scale
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (weights x²): a symmetric
/// scale for one group, levels (offset by `nmax`) into `l`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let n = x.len();
    let (max, amax) = signed_absmax(x.iter().copied());
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for i in 0..n {
        let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (li + nmax) as i8;
        let w = x[i] * x[i];
        let lf = li as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let li = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = xi * xi;
            let lf = li as f32;
            sumlx += w * xi * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l[i] = (nmax + li) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min from the 12 packed bytes.
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The shared first half of Q4_K and Q5_K: each 32-value sub-block fitted with `make_qkx2_quants`,
/// scales and mins packed into `scales` (12 bytes), d and dmin returned as f16 bytes, and the levels
/// (`0..=nmax`) re-derived from the stored scales into `l`.
fn scale_min_super_block(x: &[f32], nmax: i32, rmin: f32, nstep: i32, scales_out: &mut [u8; 12], l: &mut [u8; QK_K]) -> ([u8; 2], [u8; 2]) {
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; QK_K / 32];
    let mut scales = [0f32; QK_K / 32];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        scales[j] = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], &mut mins[j], &mut laux, rmin, 0.1, nstep);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    *scales_out = [0; 12];
    for j in 0..QK_K / 32 {
        // C stores nearest_int's int in a uint8_t (wrapping) before clamping to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            scales_out[j] = ls;
            scales_out[j + 4] = lm;
        } else {
            scales_out[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            scales_out[j - 4] |= (ls >> 4) << 6;
            scales_out[j] |= (lm >> 4) << 6;
        }
    }
    let d = fp16_bits(max_scale / 63.0);
    let dmin = fp16_bits(max_min / 63.0);
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales_out);
        let dj = fp16_value(d) * sc as f32;
        // A zero scale keeps the fit's levels (they read back as the min either way).
        if dj == 0.0 {
            continue;
        }
        let dm = fp16_value(dmin) * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin)
}

/// `quantize_row_q4_K_ref`: one 256-value super-block into a 144-byte `block_q4_K`.
fn q4k_block(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0u8; 12];
    let (d, dmin) = scale_min_super_block(x, 15, -1.0, 20, &mut scales, &mut l);
    out[0..2].copy_from_slice(&d);
    out[2..4].copy_from_slice(&dmin);
    out[4..16].copy_from_slice(&scales);
    let qs = &mut out[16..144];
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            qs[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// `quantize_row_q5_K_ref`: one 256-value super-block into a 176-byte `block_q5_K`.
fn q5k_block(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0u8; 12];
    let (d, dmin) = scale_min_super_block(x, 31, -0.5, 15, &mut scales, &mut l);
    out[0..2].copy_from_slice(&d);
    out[2..4].copy_from_slice(&dmin);
    out[4..16].copy_from_slice(&scales);
    let (qh, ql) = out[16..176].split_at_mut(QK_K / 8);
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (c, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// `quantize_row_q6_K_ref`: one 256-value super-block into a 210-byte `block_q6_K`.
fn q6k_block(x: &[f32], out: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    for ib in 0..QK_K / 16 {
        scales[ib] = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
    }
    let (max_scale, max_abs_scale) = signed_absmax(scales);
    if max_abs_scale < GROUP_MAX_EPS {
        // All zero, d = +0.0 (an inverse scale would give -0.0).
        out[..Q6K_BYTES].fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = fp16_bits(1.0 / iscale);
    let mut sc = [0i8; QK_K / 16];
    for ib in 0..QK_K / 16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let dj = fp16_value(d) * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let li = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            l[16 * j + ii] = (li + 32) as i8;
        }
    }
    let (ql, rest) = out[..Q6K_BYTES].split_at_mut(QK_K / 2);
    let (qh, rest) = rest.split_at_mut(QK_K / 4);
    let (scales_out, d_out) = rest.split_at_mut(QK_K / 16);
    let l = l.map(|v| v as u8);
    for (c, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * c..64 * c + 64], &mut qh[32 * c..32 * c + 32]);
        for i in 0..32 {
            let q1 = l[j + i] & 0xF;
            let q2 = l[j + i + 32] & 0xF;
            let q3 = l[j + i + 64] & 0xF;
            let q4 = l[j + i + 96] & 0xF;
            ql[i] = q1 | (q3 << 4);
            ql[i + 32] = q2 | (q4 << 4);
            qh[i] = (l[j + i] >> 4) | ((l[j + i + 32] >> 4) << 2) | ((l[j + i + 64] >> 4) << 4) | ((l[j + i + 96] >> 4) << 6);
        }
    }
    for (o, s) in scales_out.iter_mut().zip(sc) {
        *o = s as u8;
    }
    d_out.copy_from_slice(&d);
}

/// Which K-quant to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KQuant {
    Q4K,
    Q5K,
    Q6K,
}

impl KQuant {
    /// Bytes per 256-value block.
    pub fn block_bytes(self) -> usize {
        match self {
            KQuant::Q4K => Q4K_BYTES,
            KQuant::Q5K => Q5K_BYTES,
            KQuant::Q6K => Q6K_BYTES,
        }
    }
}

/// `x` (a whole number of 256-value super-blocks; the caller checks) quantized as llama-quantize
/// does without an importance matrix, appended to `out` block after block.
pub fn quantize_into(q: KQuant, x: &[f32], out: &mut Vec<u8>) {
    let n = q.block_bytes();
    let start = out.len();
    out.resize(start + x.len() / QK_K * n, 0);
    for (xs, block) in x.chunks_exact(QK_K).zip(out[start..].chunks_exact_mut(n)) {
        match q {
            KQuant::Q4K => q4k_block(xs, block),
            KQuant::Q5K => q5k_block(xs, block),
            KQuant::Q6K => q6k_block(xs, block),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_halves_to_even() {
        let cases = [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (-2.5, -2), (0.49, 0), (0.51, 1), (-0.0, 0), (14.5, 14), (15.5, 16), (-31.7, -32)];
        for (x, want) in cases {
            assert_eq!(nearest_int(x), want, "nearest_int({x})");
        }
    }

    /// An all-zero super-block is all zero bytes in every type: no -0.0 scale, and the Q4_K/Q5_K
    /// levels of a constant group are 0.
    #[test]
    fn all_zero_blocks_are_zero_bytes() {
        for q in [KQuant::Q4K, KQuant::Q5K, KQuant::Q6K] {
            let mut out = Vec::new();
            quantize_into(q, &[0.0; 2 * QK_K], &mut out);
            assert_eq!(out.len(), 2 * q.block_bytes());
            assert!(out.iter().all(|&b| b == 0), "{q:?}: {:?}", &out[..16]);
            // Below GROUP_MAX_EPS counts as zero for Q6_K.
            if q == KQuant::Q6K {
                let mut out = Vec::new();
                quantize_into(q, &[1e-16; QK_K], &mut out);
                assert!(out.iter().all(|&b| b == 0), "{:?}", &out[..16]);
            }
        }
    }

    /// A constant positive group is not read as zero (the min is clamped to 0 before ggml's
    /// max == min test): the scale carries it.
    #[test]
    fn constant_positive_block_keeps_its_value() {
        for q in [KQuant::Q4K, KQuant::Q5K] {
            let mut out = Vec::new();
            quantize_into(q, &[0.25; QK_K], &mut out);
            let d = fp16_value([out[0], out[1]]);
            assert!(d > 0.0, "{q:?}: d {d}");
        }
    }
}
