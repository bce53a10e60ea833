//! Element-wise kernels for attention and activations: a causal softmax
//! that never exponentiates masked positions, and SiLU, both on a vector
//! `exp`.
//!
//! Profiling a 412-token prompt after the tile kernels landed put libm's
//! scalar `expf` (called by candle's softmax and SiLU one value at a time)
//! at a tenth of all prompt time, and the additive causal mask (built,
//! broadcast and added before every softmax) at another twentieth, half of
//! whose exponentials are of `-inf`. These kernels take the mask as
//! arithmetic (which keys a query row may see) and compute `exp` sixteen
//! lanes at a time with AVX-512F where the CPU has it.
//!
//! `exp` here: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6
//! polynomial for `e^r`, and `2^n` put into the exponent bits; relative
//! error below 3e-7 over the range that does not underflow (tested against
//! `f32::exp`). The portable path computes the same polynomial one value at
//! a time, so both paths give the same numbers up to fused multiply-add
//! rounding.

/// Inputs below this give 0 (e^-87.3 is the smallest normal f32).
const EXP_MIN: f32 = -87.3;
/// Inputs above this saturate (e^88.7 is near f32::MAX).
const EXP_MAX: f32 = 88.7;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Taylor coefficients 1/k! for k = 2..6.
const C: [f32; 5] = [0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0];

/// `e^x` (the portable form of the vector kernel).
pub fn exp(x: f32) -> f32 {
    if x < EXP_MIN {
        return 0.0;
    }
    let x = x.min(EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = C[4];
    for c in C[..4].iter().rev() {
        p = p.mul_add(r, *c);
    }
    let er = (p * r).mul_add(r, r) + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Whether the AVX-512 paths run here.
fn vector() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_MIN));
    let x = _mm512_min_ps(x, _mm512_set1_ps(EXP_MAX));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(C[4]);
    for c in C[..4].iter().rev() {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let er = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
    let e = _mm512_mul_ps(er, _mm512_castsi512_ps(bits));
    _mm512_mask_mov_ps(e, under, _mm512_setzero_ps())
}

/// Which keys of a row of attention scores a query may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Causal {
    /// Rows (queries) per head: the query of row `r` is query `r % queries`.
    pub queries: usize,
    /// Position of the first query (the keys before it are cached ones).
    pub pos: usize,
    /// A sliding window: a query at `p` sees keys `p + 1 - window ..= p`.
    pub window: Option<usize>,
}

impl Causal {
    /// The keys `lo..hi` visible to row `r` of rows `width` wide.
    fn visible(&self, r: usize, width: usize) -> (usize, usize) {
        let p = self.pos + r % self.queries.max(1);
        let hi = (p + 1).min(width);
        let lo = self.window.map_or(0, |w| (p + 1).saturating_sub(w)).min(hi);
        (lo, hi)
    }
}

/// Softmax of each `width`-wide row of `x` in place, over the keys the
/// row's query may see ([`Causal`]); the others become 0 without being
/// exponentiated. A row that sees no key becomes all zeros. Rows are
/// spread over candle's thread pool.
pub fn softmax_causal(x: &mut [f32], width: usize, causal: Causal) {
    if width == 0 {
        return;
    }
    let rows = x.len() / width;
    let at = x.as_mut_ptr() as usize;
    let vector = vector();
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for r in range {
            // SAFETY: rows are disjoint between workers and within `x`.
            let row = unsafe { std::slice::from_raw_parts_mut((at as *mut f32).add(r * width), width) };
            let (lo, hi) = causal.visible(r, width);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let seen = &mut row[lo..hi];
            if seen.is_empty() {
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: AVX-512F checked.
                unsafe { softmax_row_avx512(seen) };
                continue;
            }
            let _ = vector;
            softmax_row(seen);
        }
    });
}

fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let full = n / 16 * 16;
    let tail: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
    let p = row.as_mut_ptr();
    // SAFETY (whole body): full-width accesses are below `full`, the tail
    // is masked to the row's length.
    unsafe {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(16) {
            m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
        }
        m = _mm512_max_ps(
            m,
            _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, p.add(full)),
        );
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut s = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
            _mm512_storeu_ps(p.add(i), e);
            s = _mm512_add_ps(s, e);
        }
        if tail != 0 {
            let v = _mm512_mask_loadu_ps(max, tail, p.add(full));
            let e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(v, max)));
            _mm512_mask_storeu_ps(p.add(full), tail, e);
            s = _mm512_add_ps(s, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(s));
        for i in (0..full).step_by(16) {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        }
        if tail != 0 {
            let v = _mm512_mask_loadu_ps(_mm512_setzero_ps(), tail, p.add(full));
            _mm512_mask_storeu_ps(p.add(full), tail, _mm512_mul_ps(v, inv));
        }
    }
}

/// `x * sigmoid(x)` in place, spread over candle's thread pool.
pub fn silu(x: &mut [f32]) {
    const CHUNK: usize = 4096;
    let chunks = x.len().div_ceil(CHUNK);
    let (at, len) = (x.as_mut_ptr() as usize, x.len());
    let vector = vector();
    candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
        for c in range {
            let start = c * CHUNK;
            let end = (start + CHUNK).min(len);
            // SAFETY: chunks are disjoint between workers and within `x`.
            let part = unsafe { std::slice::from_raw_parts_mut((at as *mut f32).add(start), end - start) };
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: AVX-512F checked.
                unsafe { silu_avx512(part) };
                continue;
            }
            let _ = vector;
            for v in part.iter_mut() {
                *v /= 1.0 + exp(-*v);
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let left = (n - i).min(16);
        let mask: __mmask16 = ((1u32 << left) - 1) as __mmask16;
        // SAFETY: masked to the slice's length.
        unsafe {
            let v = _mm512_mask_loadu_ps(_mm512_setzero_ps(), mask, p.add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
            let y = _mm512_div_ps(v, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(p.add(i), mask, y);
        }
        i += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    fn reference(row: &[f32], lo: usize, hi: usize) -> Vec<f32> {
        let max = row[lo..hi].iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let sum: f64 = row[lo..hi].iter().map(|v| ((v - max) as f64).exp()).sum();
        (0..row.len())
            .map(|i| match (lo..hi).contains(&i) {
                true => (((row[i] - max) as f64).exp() / sum) as f32,
                false => 0.0,
            })
            .collect()
    }

    /// Every row's visible keys: causal, cached prefix, sliding window,
    /// widths off multiples of 16; the vector and portable paths agree
    /// with an f64 reference.
    #[test]
    fn causal_softmax_matches_a_reference() {
        for (queries, pos, window, width) in [
            (5, 0, None, 5),
            (7, 10, None, 17),
            (40, 0, Some(16), 40),
            (1, 33, Some(8), 34),
        ] {
            let heads = 3;
            let x: Vec<f32> = (0..heads * queries * width)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let causal = Causal { queries, pos, window };
            let mut got = x.clone();
            softmax_causal(&mut got, width, causal);
            for (r, row) in x.chunks(width).enumerate() {
                let (lo, hi) = causal.visible(r, width);
                let want = reference(row, lo, hi);
                let mut portable = row.to_vec();
                softmax_row(&mut portable[lo..hi]);
                for i in 0..width {
                    let g = got[r * width + i];
                    assert!((g - want[i]).abs() < 2e-6, "row {r} [{i}]: {g} vs {}", want[i]);
                    if (lo..hi).contains(&i) {
                        assert!((portable[i] - want[i]).abs() < 2e-6);
                    }
                }
            }
        }
    }

    #[test]
    fn silu_matches_its_definition() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 37.0).collect();
        let mut got = x.clone();
        silu(&mut got);
        for (g, v) in got.iter().zip(&x) {
            let want = v / (1.0 + (-v).exp());
            assert!(
                (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu({v}) = {g}, want {want}"
            );
        }
    }
}
