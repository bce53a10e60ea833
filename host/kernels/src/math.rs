//! Element-wise kernels for attention and activations: a causal softmax
//! that never exponentiates masked positions, and the gated activations
//! (SiLU, GELU) of feed-forward blocks, both on a vector `exp`.
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

/// Whether the AVX2 paths (for CPUs without AVX-512) run here.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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

/// [`exp16`] eight lanes wide, with AVX2: the same operations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_MIN));
    let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(C[4]);
    for c in C[..4].iter().rev() {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let er = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    let e = _mm256_mul_ps(er, _mm256_castsi256_ps(bits));
    _mm256_andnot_ps(under, e)
}

/// The sum of eight lanes, folded in halves: the 128-bit halves, then
/// that vector's halves, then its two lanes (the order [`dot16`] folds in
/// from `s = 4` down).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
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
    let avx2 = avx2();
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
            softmax_row_on(seen, avx2);
        }
    });
}

/// One row's softmax without AVX-512: with AVX2 where `avx2` says so
/// ([`softmax_row_avx2`]), else in plain Rust. Prompt passes and decode
/// steps both come here, so a position's probabilities are the same
/// either way.
fn softmax_row_on(row: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 and FMA checked by the caller.
        unsafe { softmax_row_avx2(row) };
        return;
    }
    let _ = avx2;
    softmax_row(row);
}

/// [`softmax_row_avx512`] eight lanes wide: the maximum, the exponentials
/// of [`exp8`] summed in eight lanes (a tail padded with exact zeros),
/// then scaled by the inverse of their sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let full = n / 8 * 8;
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let (mx, p) = (_mm256_set1_ps(max), row.as_mut_ptr());
    let mut s = _mm256_setzero_ps();
    // SAFETY: full-width accesses are below `full`.
    for i in (0..full).step_by(8) {
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mx));
            _mm256_storeu_ps(p.add(i), e);
            s = _mm256_add_ps(s, e);
        }
    }
    let mut tail = [0f32; 8];
    tail[..n - full].copy_from_slice(&row[full..]);
    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mx));
    let keep = _mm256_cmp_ps::<_CMP_LT_OQ>(
        _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
        _mm256_set1_ps((n - full) as f32),
    );
    let e = _mm256_and_ps(e, keep);
    _mm256_storeu_ps(tail.as_mut_ptr(), e);
    row[full..].copy_from_slice(&tail[..n - full]);
    s = _mm256_add_ps(s, e);
    let sum = hsum8(s);
    let inv = _mm256_set1_ps(1.0 / sum);
    for i in (0..full).step_by(8) {
        // SAFETY: below `full`.
        unsafe { _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv)) };
    }
    let inv = 1.0 / sum;
    row[full..].iter_mut().for_each(|v| *v *= inv);
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

/// Values per partial sum of [`exp_shifted`].
pub const EXP_BLOCK: usize = 256;

/// `x[i] = e^((x[i] - shift) * scale)` in place; `sums` receives the sum
/// of each [`EXP_BLOCK`] values in turn, and the total (the block sums
/// added in order) is returned. A sampler's weights at a temperature
/// (`shift`: the largest logit, `scale`: 1 / temperature) over a whole
/// vocabulary, sixteen lanes at a time where AVX-512 runs; the block sums
/// let a draw find its token without adding every weight again. candle's
/// sampler spent about a millisecond per token on Gemma's 262,144 logits
/// in scalar `expf`, copies and a cumulative table. One thread: a row is
/// too small to be worth waking the pool.
pub fn exp_shifted(x: &mut [f32], shift: f32, scale: f32, sums: &mut Vec<f32>) -> f32 {
    sums.clear();
    let vector = vector();
    let avx2 = avx2();
    for block in x.chunks_mut(EXP_BLOCK) {
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: AVX-512F checked.
            sums.push(unsafe { exp_shifted_avx512(block, shift, scale) });
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and FMA checked.
            sums.push(unsafe { exp_shifted_avx2(block, shift, scale) });
            continue;
        }
        let _ = (vector, avx2);
        let mut sum = 0.0;
        for v in block.iter_mut() {
            *v = exp((*v - shift) * scale);
            sum += *v;
        }
        sums.push(sum);
    }
    sums.iter().sum()
}

/// [`exp_shifted_avx512`]'s block with AVX2: eight lanes, then the last
/// values (fewer than eight) one at a time on the plain `exp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(x: &mut [f32], shift: f32, scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let full = x.len() / 8 * 8;
    let p = x.as_mut_ptr();
    let (sh, sc) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    let mut acc = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        // SAFETY: below `full`.
        unsafe {
            let e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh), sc));
            acc = _mm256_add_ps(acc, e);
            _mm256_storeu_ps(p.add(i), e);
        }
    }
    let mut sum = hsum8(acc);
    for v in x[full..].iter_mut() {
        *v = exp((*v - shift) * scale);
        sum += *v;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(x: &mut [f32], shift: f32, scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    let (sh, sc) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let left = (n - i).min(16);
        let mask: __mmask16 = ((1u32 << left) - 1) as __mmask16;
        // SAFETY: masked to the slice's length; masked-off lanes add 0.
        unsafe {
            let v = _mm512_mask_loadu_ps(_mm512_setzero_ps(), mask, p.add(i));
            let e = exp16(_mm512_mul_ps(_mm512_sub_ps(v, sh), sc));
            let e = _mm512_maskz_mov_ps(mask, e);
            acc = _mm512_add_ps(acc, e);
            _mm512_mask_storeu_ps(p.add(i), mask, e);
        }
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}

/// The largest value of `x` and the index of its first occurrence;
/// `Err(i)` if `x[i]` is NaN (the first found), `Ok(None)` if `x` is empty.
/// Sixteen lanes at a time where AVX-512 runs.
pub fn max_index(x: &[f32]) -> Result<Option<(usize, f32)>, usize> {
    let mut max = f32::NEG_INFINITY;
    #[cfg(target_arch = "x86_64")]
    if vector() {
        // SAFETY: AVX-512F checked.
        match unsafe { max_avx512(x) } {
            Some(m) => max = m,
            None => return Err(x.iter().position(|v| v.is_nan()).unwrap_or(0)),
        }
        return Ok(x.iter().position(|v| *v == max).map(|i| (i, max)));
    }
    let mut at = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            return Err(i);
        }
        if at.is_none() || v > max {
            max = v;
            at = Some(i);
        }
    }
    Ok(at.map(|i| (i, max)))
}

/// The maximum of `x` (negative infinity if empty), or `None` if any value
/// is NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_avx512(x: &[f32]) -> Option<f32> {
    use std::arch::x86_64::*;
    let n = x.len();
    let p = x.as_ptr();
    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut nan: __mmask16 = 0;
    let mut i = 0;
    while i < n {
        let left = (n - i).min(16);
        let mask: __mmask16 = ((1u32 << left) - 1) as __mmask16;
        // SAFETY: masked to the slice's length.
        unsafe {
            let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, p.add(i));
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            acc = _mm512_max_ps(acc, v);
        }
        i += 16;
    }
    (nan == 0).then(|| _mm512_reduce_max_ps(acc))
}

/// The activation of a gated feed-forward block ([`gated`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// `x * sigmoid(x)` (Llama, Qwen2, SmolLM2).
    Silu,
    /// GELU, tanh approximation (Gemma):
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed as the
    /// identical `x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))` so that it
    /// needs one vector `exp` and no `tanh`.
    GeluTanh,
}

/// `2 sqrt(2/pi)`: GELU's tanh argument doubled, as its sigmoid form takes it.
const GELU_2K: f32 = 1.595_769_2;
const GELU_CUBIC: f32 = 0.044_715;

impl Gate {
    /// The activation of one value (the portable path).
    pub fn apply(self, x: f32) -> f32 {
        let z = match self {
            Gate::Silu => x,
            Gate::GeluTanh => GELU_2K * (GELU_CUBIC * x * x).mul_add(x, x),
        };
        x / (1.0 + exp(-z))
    }
}

/// `act(gate) * up` in place on `gate`, the middle of a gated
/// feed-forward block, in one pass over both (spread over candle's thread
/// pool). Profiling a Gemma prompt put libm's scalar `tanhf` and the
/// `expm1f` it calls (candle's GELU, one value at a time) at a fifth of
/// all prompt time; here both activations cost one vector `exp` per
/// value, and the product with `up` no longer makes a third tensor.
///
/// # Panics
/// If the slices differ in length.
pub fn gated(gate: &mut [f32], up: &[f32], act: Gate) {
    assert_eq!(gate.len(), up.len(), "gated: gate and up differ in length");
    const CHUNK: usize = 4096;
    let chunks = gate.len().div_ceil(CHUNK);
    let (at, len) = (gate.as_mut_ptr() as usize, gate.len());
    let vector = vector();
    let avx2 = avx2();
    candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
        for c in range {
            let start = c * CHUNK;
            let end = (start + CHUNK).min(len);
            // SAFETY: chunks are disjoint between workers and within `gate`.
            let part = unsafe { std::slice::from_raw_parts_mut((at as *mut f32).add(start), end - start) };
            let ups = &up[start..end];
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: AVX-512F checked.
                unsafe { gated_avx512(part, ups, act) };
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA checked.
                unsafe { gated_avx2(part, ups, act) };
                continue;
            }
            let _ = (vector, avx2);
            for (g, u) in part.iter_mut().zip(ups) {
                *g = act.apply(*g) * u;
            }
        }
    });
}

/// [`gated_avx512`] with AVX2: eight lanes, then the last values (fewer
/// than eight) one at a time on [`Gate::apply`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_avx2(gate: &mut [f32], up: &[f32], act: Gate) {
    use std::arch::x86_64::*;
    let n = gate.len().min(up.len());
    let full = n / 8 * 8;
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let (k2, cubic) = (_mm256_set1_ps(GELU_2K), _mm256_set1_ps(GELU_CUBIC));
    for i in (0..full).step_by(8) {
        // SAFETY: below `full`, within both slices.
        unsafe {
            let x = _mm256_loadu_ps(g.add(i));
            let z = match act {
                Gate::Silu => x,
                Gate::GeluTanh => _mm256_mul_ps(k2, _mm256_fmadd_ps(_mm256_mul_ps(cubic, _mm256_mul_ps(x, x)), x, x)),
            };
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
            let y = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(g.add(i), _mm256_mul_ps(y, _mm256_loadu_ps(u.add(i))));
        }
    }
    for (x, u) in gate[full..n].iter_mut().zip(&up[full..n]) {
        *x = act.apply(*x) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gated_avx512(gate: &mut [f32], up: &[f32], act: Gate) {
    use std::arch::x86_64::*;
    let n = gate.len().min(up.len());
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm512_set1_ps(1.0);
    let (k2, cubic) = (_mm512_set1_ps(GELU_2K), _mm512_set1_ps(GELU_CUBIC));
    let mut i = 0;
    while i < n {
        let left = (n - i).min(16);
        let mask: __mmask16 = ((1u32 << left) - 1) as __mmask16;
        // SAFETY: masked to the slices' common length.
        unsafe {
            let x = _mm512_mask_loadu_ps(_mm512_setzero_ps(), mask, g.add(i));
            let z = match act {
                Gate::Silu => x,
                Gate::GeluTanh => _mm512_mul_ps(k2, _mm512_fmadd_ps(_mm512_mul_ps(cubic, _mm512_mul_ps(x, x)), x, x)),
            };
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), z));
            let y = _mm512_div_ps(x, _mm512_add_ps(one, e));
            let y = _mm512_mul_ps(y, _mm512_mask_loadu_ps(_mm512_setzero_ps(), mask, u.add(i)));
            _mm512_mask_storeu_ps(g.add(i), mask, y);
        }
        i += 16;
    }
}

/// The shape of an attention-weighted sum of values ([`attend_values`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValuesShape {
    /// Sequences (the leading dimension of both inputs).
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention: `heads` is a multiple).
    pub kv_heads: usize,
    /// Keys (cached and new) each query row spans.
    pub keys: usize,
    /// Values per head.
    pub dim: usize,
}

/// Attention's second product, `probs · values`, for probabilities
/// `[batch, heads, queries, keys]` (rows as [`softmax_causal`] leaves them)
/// and values `[batch, kv_heads, keys, dim]`, both contiguous; returns
/// `[batch, queries, heads, dim]`, the layout the output projection reads
/// (no transpose, no copy of the values per query head).
///
/// Why not a matmul: a general matrix product splits long sums into blocks
/// whose size depends on how many rows it is given, so a query's output
/// changed (in the last bits) with the number of queries computed beside
/// it: the prefix cache, which computes a prompt's last rows without its
/// first, could not promise the same numbers. Here every output row is
/// summed over its visible keys in ascending order, whatever else is
/// computed, so a row depends only on its own probabilities and the values;
/// keys a query cannot see are skipped (their probabilities are 0, and
/// adding 0 changes no sum). Rows are spread over candle's thread pool.
///
/// # Panics
/// If the slices do not have the sizes the shape says.
pub fn attend_values(probs: &[f32], values: &[f32], shape: ValuesShape, causal: Causal) -> Vec<f32> {
    attend_values_in(probs, values, shape, causal, shape.keys)
}

/// [`attend_values`] over values that sit in a buffer with room for
/// `capacity >= keys` positions per head (`[batch, kv_heads, capacity,
/// dim]`, of which each head's first `keys` rows are read): a KV cache that
/// grows in place is read without being copied to its exact length first.
///
/// # Panics
/// If the slices do not have the sizes the shape and capacity say.
pub fn attend_values_in(
    probs: &[f32],
    values: &[f32],
    shape: ValuesShape,
    causal: Causal,
    capacity: usize,
) -> Vec<f32> {
    let ValuesShape {
        batch,
        heads,
        kv_heads,
        keys,
        dim,
    } = shape;
    let queries = causal.queries;
    assert_eq!(probs.len(), batch * heads * queries * keys, "attend_values: probs");
    assert!(capacity >= keys, "attend_values: capacity");
    assert_eq!(values.len(), batch * kv_heads * capacity * dim, "attend_values: values");
    let rep = (heads / kv_heads.max(1)).max(1);
    let mut out = vec![0f32; batch * queries * heads * dim];
    let at = out.as_mut_ptr() as usize;
    let vector = vector() && dim % 16 == 0;
    let avx2 = avx2();
    candle_core::utils::barrier_pool().execute_chunked(batch * heads * queries, |range| {
        let mut row = range.start;
        while row < range.end {
            // `row` walks the probabilities' rows: (sequence, head, query).
            let (bh, q) = (row / queries.max(1), row % queries.max(1));
            let (b, h) = (bh / heads, bh % heads);
            let kv = b * kv_heads + h / rep;
            let v = &values[kv * capacity * dim..(kv * capacity + keys) * dim];
            #[cfg(target_arch = "x86_64")]
            if vector {
                // Up to GROUP queries of this head that follow each other
                // share every value load.
                let n = GROUP.min(range.end - row).min(queries.max(1) - q);
                let vis: [(usize, usize); GROUP] = std::array::from_fn(|r| causal.visible(q + r.min(n - 1), keys));
                let ps: [&[f32]; GROUP] = std::array::from_fn(|r| {
                    let at = row + r.min(n - 1);
                    &probs[at * keys..(at + 1) * keys]
                });
                // The output rows of queries `q..q + n` of this head,
                // written by this worker only.
                let outs: [*mut f32; GROUP] =
                    std::array::from_fn(|r| (at as *mut f32).wrapping_add(((b * queries + q + r) * heads + h) * dim));
                // SAFETY: AVX-512F checked, `dim` a multiple of 16, `v`
                // holds `keys` rows of `dim`, each probability row `keys`
                // values, and the first `n` outputs `dim` values within
                // `out`; only those are written.
                unsafe { weighted_sum_group_avx512(&ps, v, dim, &vis, n, &outs) };
                row += n;
                continue;
            }
            let p = &probs[row * keys..(row + 1) * keys];
            let (lo, hi) = causal.visible(q, keys);
            // SAFETY: each (sequence, query, head) output row is written by
            // one worker only, and lies within `out`.
            let o = unsafe {
                std::slice::from_raw_parts_mut((at as *mut f32).add(((b * queries + q) * heads + h) * dim), dim)
            };
            let _ = vector;
            weighted_sum_on(&p[lo..hi], &v[lo * dim..hi * dim], o, avx2);
            row += 1;
        }
    });
    out
}

/// [`weighted_sum_avx512`] for `n <= GROUP` queries at once (probability
/// rows `ps[r]` over all keys, query `r` seeing keys `vis[r]`, output row
/// at `outs[r]`; entries from `n` on are computed but never written), 64
/// coordinates at a time: each value row is loaded once for all queries,
/// so the multiply-adds rather than the loads bound the loop. Keys are
/// walked in ascending order over the union of the queries' ranges, and a
/// key a query does not see adds `0 * v`, which leaves its sum as it was;
/// so every output equals [`weighted_sum_avx512`]'s over the query's own
/// range bit for bit (up to the sign of an exact zero), whatever rows run
/// beside it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_group_avx512(
    ps: &[&[f32]; GROUP],
    v: &[f32],
    dim: usize,
    vis: &[(usize, usize); GROUP],
    n: usize,
    outs: &[*mut f32; GROUP],
) {
    use std::arch::x86_64::*;
    let lo = vis[..n].iter().map(|x| x.0).min().unwrap_or(0);
    let hi = vis[..n].iter().map(|x| x.1).max().unwrap_or(0);
    let vp = v.as_ptr();
    let mut d0 = 0;
    while d0 < dim {
        // Four vectors of 16 (fewer at the end of an odd width).
        let width = ((dim - d0) / LANES).min(4);
        let mut acc = [[_mm512_setzero_ps(); 4]; GROUP];
        // `j` indexes four probability rows and the value rows at once.
        #[allow(clippy::needless_range_loop)]
        for j in lo..hi {
            let w: [f32; GROUP] = std::array::from_fn(|r| {
                let (a, z) = vis[r];
                if j >= a && j < z {
                    ps[r][j]
                } else {
                    0.0
                }
            });
            // SAFETY: key `j < hi <= keys` has a row of `dim` values in `v`,
            // and `d0 + 16 * width <= dim`.
            unsafe {
                let r0 = vp.add(j * dim + d0);
                let vs: [__m512; 4] = std::array::from_fn(|x| {
                    if x < width {
                        _mm512_loadu_ps(r0.add(x * LANES))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for r in 0..GROUP {
                    let s = _mm512_set1_ps(w[r]);
                    for x in 0..4 {
                        acc[r][x] = _mm512_fmadd_ps(s, vs[x], acc[r][x]);
                    }
                }
            }
        }
        for r in 0..n {
            for (x, a) in acc[r].iter().enumerate().take(width) {
                // SAFETY: output row `r` holds `dim` values (the caller's
                // promise) and `d0 + 16 * x + 16 <= dim`.
                unsafe { _mm512_storeu_ps(outs[r].add(d0 + x * LANES), *a) };
            }
        }
        d0 += width * LANES;
    }
}

/// Attention's first product, the scores `q · kᵀ` of queries `[batch,
/// heads, queries, dim]` (rotated and scaled) against keys `[batch,
/// kv_heads, keys, dim]`, both contiguous; returns `[batch, heads, queries,
/// keys]`. Only the keys a query may see ([`Causal`]) are computed (the
/// rest are left 0 for [`softmax_causal`], which ignores them).
///
/// Each score is summed in one fixed order ([`dot16`]): sixteen partial
/// sums (lane `l` takes coordinates `l, l + 16, ...` one fused
/// multiply-add at a time), then folded in halves. So a query's scores do
/// not depend on how many queries are computed with it (candle's matmul
/// takes another path for one row than for several, and for small shapes
/// than for large), which the prefix cache relies on ([`attend_values`]
/// says why), and the vector path gives the fallback's numbers to the bit.
///
/// The vector path folds sixteen keys' partial sums together
/// ([`fold16_avx512`]: four rounds of two lane permutations and one add)
/// instead of reducing each key's vector alone, which took as long as all
/// of a prompt's matrix products on SmolLM2.
///
/// # Panics
/// If the slices do not have the sizes the shape says.
pub fn attend_scores(q: &[f32], k: &[f32], shape: ValuesShape, causal: Causal) -> Vec<f32> {
    attend_scores_in(q, k, shape, causal, shape.keys)
}

/// [`attend_scores`] over keys in a buffer with room for `capacity >=
/// keys` positions per head (`[batch, kv_heads, capacity, dim]`; each
/// head's first `keys` rows are read), as [`attend_values_in`] reads values.
///
/// # Panics
/// If the slices do not have the sizes the shape and capacity say.
pub fn attend_scores_in(q: &[f32], k: &[f32], shape: ValuesShape, causal: Causal, capacity: usize) -> Vec<f32> {
    let ValuesShape {
        batch,
        heads,
        kv_heads,
        keys,
        dim,
    } = shape;
    let queries = causal.queries;
    assert_eq!(q.len(), batch * heads * queries * dim, "attend_scores: queries");
    assert!(capacity >= keys, "attend_scores: capacity");
    assert_eq!(k.len(), batch * kv_heads * capacity * dim, "attend_scores: keys");
    let rep = (heads / kv_heads.max(1)).max(1);
    let mut out = vec![0f32; batch * heads * queries * keys];
    let at = out.as_mut_ptr() as usize;
    let vector = vector() && dim % LANES == 0;
    let avx2 = avx2();
    candle_core::utils::barrier_pool().execute_chunked(batch * heads * queries, |range| {
        let mut row = range.start;
        while row < range.end {
            let (bh, qi) = (row / queries.max(1), row % queries.max(1));
            let (b, h) = (bh / heads, bh % heads);
            let kv = b * kv_heads + h / rep;
            let kh = &k[kv * capacity * dim..(kv * capacity + keys) * dim];
            #[cfg(target_arch = "x86_64")]
            if vector {
                // Up to GROUP queries of this head that follow each other
                // share every key load.
                let n = GROUP.min(range.end - row).min(queries.max(1) - qi);
                let vis: [(usize, usize); GROUP] = std::array::from_fn(|r| causal.visible(qi + r.min(n - 1), keys));
                let rows: [&[f32]; GROUP] = std::array::from_fn(|r| {
                    let at = row + r.min(n - 1);
                    &q[at * dim..(at + 1) * dim]
                });
                // Rows `row..row + n` of scores, written by this worker only.
                let outs: [*mut f32; GROUP] = std::array::from_fn(|r| (at as *mut f32).wrapping_add((row + r) * keys));
                // SAFETY: AVX-512F checked, `dim` a multiple of 16, `kh`
                // holds `keys` rows of `dim`, and the first `n` outputs each
                // hold `keys` scores within `out`; only those are written.
                unsafe { scores_group_avx512(&rows, kh, &vis, n, &outs) };
                row += n;
                continue;
            }
            let _ = vector;
            let qr = &q[row * dim..(row + 1) * dim];
            let (lo, hi) = causal.visible(qi, keys);
            // SAFETY: each row of scores is written by one worker only.
            let o = unsafe { std::slice::from_raw_parts_mut((at as *mut f32).add(row * keys), keys) };
            scores_row(qr, kh, lo, hi, o, avx2);
            row += 1;
        }
    });
    out
}

/// Queries whose scores one call of [`scores_group_avx512`] computes.
const GROUP: usize = 4;

/// [`scores_avx512`] for `n <= GROUP` queries at once (`qs[r]`, each
/// seeing keys `vis[r]`, writing the row at `outs[r]`; entries from `n` on
/// are computed but never written): four queries times four keys per pass over the width, so a
/// key's values are loaded once for all queries and the multiply-adds
/// rather than the loads bound the loop (one query alone loads two
/// operands per multiply-add). Each score is still one accumulator per
/// (query, key) summed in width order and folded by [`fold16_avx512`], so
/// every value equals [`scores_avx512`]'s bit for bit: a row's scores do
/// not depend on the rows computed beside it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_group_avx512(
    qs: &[&[f32]; GROUP],
    kh: &[f32],
    vis: &[(usize, usize); GROUP],
    n: usize,
    outs: &[*mut f32; GROUP],
) {
    use std::arch::x86_64::*;
    let dim = qs[0].len();
    let lo = vis[..n].iter().map(|v| v.0).min().unwrap_or(0);
    let hi = vis[..n].iter().map(|v| v.1).max().unwrap_or(0);
    if lo >= hi {
        return;
    }
    let mut first = lo / LANES * LANES;
    while first < hi {
        let (jlo, jhi) = (first.max(lo), (first + LANES).min(hi));
        let mut p = [[_mm512_setzero_ps(); LANES]; GROUP];
        let mut j = jlo;
        while j < jhi {
            // Four keys; past `jhi` the last one again (its sums unused).
            let ks: [usize; 4] = std::array::from_fn(|x| (j + x).min(jhi - 1));
            // SAFETY (loop body): keys below `hi` have rows in `kh`; every
            // query row holds `dim` values, a multiple of 16.
            unsafe {
                let kp = ks.map(|x| kh.as_ptr().add(x * dim));
                let qp = qs.map(|q| q.as_ptr());
                let mut acc = [[_mm512_setzero_ps(); 4]; GROUP];
                for c in (0..dim).step_by(LANES) {
                    let kv = kp.map(|k| _mm512_loadu_ps(k.add(c)));
                    for r in 0..GROUP {
                        let qv = _mm512_loadu_ps(qp[r].add(c));
                        for x in 0..4 {
                            acc[r][x] = _mm512_fmadd_ps(qv, kv[x], acc[r][x]);
                        }
                    }
                }
                for r in 0..GROUP {
                    for x in 0..4.min(jhi - j) {
                        p[r][ks[x] - first] = acc[r][x];
                    }
                }
            }
            j += 4;
        }
        for r in 0..n {
            let (a, z) = vis[r];
            let mut mask: u16 = 0;
            for l in 0..LANES {
                let key = first + l;
                if key >= a && key < z {
                    mask |= 1 << l;
                }
            }
            if mask != 0 {
                // SAFETY: the store is masked to keys this query sees, all
                // below the length of its output row (the caller's promise).
                unsafe { _mm512_mask_storeu_ps(outs[r].add(first), mask, fold16_avx512(p[r])) };
            }
        }
        first += LANES;
    }
}

/// Key and value buffers `[kv_heads, capacity, dim]` of a KV cache.
#[derive(Clone, Copy, Debug)]
pub struct KvBuffers<'a> {
    /// Key buffer, `kv_heads * capacity * dim` values.
    pub keys: &'a [f32],
    /// Value buffer, the same size.
    pub values: &'a [f32],
    /// Positions per head.
    pub capacity: usize,
}

impl<'a> KvBuffers<'a> {
    /// Checks the sizes against the shapes, and that `held` positions fit.
    fn check(&self, kv_heads: usize, dim: usize, held: usize, what: &str) {
        assert!(self.capacity >= held, "attend_decode: {what} capacity");
        assert_eq!(
            self.keys.len(),
            kv_heads * self.capacity * dim,
            "attend_decode: {what} keys"
        );
        assert_eq!(
            self.values.len(),
            kv_heads * self.capacity * dim,
            "attend_decode: {what} values"
        );
    }

    /// Key head `kv`'s first `n` positions: its keys and values.
    fn head(&self, kv: usize, n: usize, dim: usize) -> (&'a [f32], &'a [f32]) {
        let at = kv * self.capacity * dim;
        (&self.keys[at..at + n * dim], &self.values[at..at + n * dim])
    }
}

/// One sequence's part in [`attend_decode`]: its KV cache (this step's key
/// and value already appended), of which `len` positions are held, and its
/// query's position and window. With `shared`, the first `shared.len`
/// positions are read from the shared buffers and `own` holds the rest
/// (position `p` at own index `p - shared.len`).
#[derive(Clone, Copy, Debug)]
pub struct DecodeKv<'a> {
    /// The sequence's own buffers.
    pub own: KvBuffers<'a>,
    /// Positions held in all (the query attends to the last of them and
    /// before), those of `shared` included.
    pub len: usize,
    /// A sliding window, as [`Causal::window`].
    pub window: Option<usize>,
    /// The first positions, read from buffers other sequences read too (a
    /// prompt several continuations share).
    pub shared: Option<SharedKv<'a>>,
}

/// The positions a sequence shares: the first `len` positions per head of
/// `buffers` precede the sequence's own.
#[derive(Clone, Copy, Debug)]
pub struct SharedKv<'a> {
    /// Where they are.
    pub buffers: KvBuffers<'a>,
    /// Positions taken from them.
    pub len: usize,
}

/// One decode step of attention for several sequences at once, each over
/// its own cache: queries `q` are `[n, heads, dim]` (rotated and scaled),
/// one row per sequence; returns `[n, heads, dim]`.
///
/// Every row gets exactly the numbers [`attend_scores_in`], the causal
/// softmax and [`attend_values_in`] give it in a one-query call over one
/// buffer holding all its positions (the same summation orders, the same
/// vector code; a shared part and an own part are two runs of the same
/// loops, the second continuing the first's sums): a sequence's logits do
/// not depend on its batch. What changes is the dispatch: all `n * heads`
/// rows go to the thread pool at once, where a batch of sixteen sequences
/// took three pool dispatches per sequence and layer; and the order: rows
/// go key head by key head, sequence by sequence, so the query heads of a
/// group read their key head while it is in cache, and so do sequences
/// that share their first positions (continuations of one prompt read it
/// from memory once per step, not once each).
///
/// # Panics
/// If a slice does not have the size the shapes say, or `q` does not hold
/// one row per sequence.
pub fn attend_decode(q: &[f32], seqs: &[DecodeKv<'_>], heads: usize, kv_heads: usize, dim: usize) -> Vec<f32> {
    let n = seqs.len();
    assert_eq!(q.len(), n * heads * dim, "attend_decode: queries");
    for s in seqs {
        let base = s.shared.map_or(0, |p| p.len);
        assert!(base <= s.len, "attend_decode: shared positions");
        s.own.check(kv_heads, dim, s.len - base, "own");
        if let Some(p) = s.shared {
            p.buffers.check(kv_heads, dim, p.len, "shared");
        }
    }
    let rep = (heads / kv_heads.max(1)).max(1);
    let mut out = vec![0f32; n * heads * dim];
    let at = out.as_mut_ptr() as usize;
    // The choices the one-query calls make: the softmax's by the CPU alone,
    // the products' also by the head width.
    let vector_softmax = vector();
    let vector = vector_softmax && dim.is_multiple_of(LANES);
    let avx2 = avx2();
    let widest = seqs.iter().map(|s| s.len).max().unwrap_or(0);
    candle_core::utils::barrier_pool().execute_chunked(n * heads, |range| {
        let mut scratch = vec![0f32; widest];
        for r in range {
            // Key head, then sequence, then the query heads of the group.
            let (kv, rest) = (r / (n * rep), r % (n * rep));
            let (b, h) = (rest / rep, kv * rep + rest % rep);
            let row = b * heads + h;
            let s = &seqs[b];
            let keys = s.len;
            let qr = &q[row * dim..(row + 1) * dim];
            // The positions as runs: (first position, keys, values), the
            // buffers indexed from that position.
            let base = s.shared.map_or(0, |p| p.len);
            let own = {
                let (k, v) = s.own.head(kv, keys - base, dim);
                (base, k, v)
            };
            let shared = s.shared.map(|p| {
                let (k, v) = p.buffers.head(kv, p.len, dim);
                (0, k, v)
            });
            let runs = shared.into_iter().chain(std::iter::once(own));
            let causal = Causal {
                queries: 1,
                pos: keys.saturating_sub(1),
                window: s.window,
            };
            let (lo, hi) = causal.visible(0, keys);
            let p = &mut scratch[..keys];
            // SAFETY: each output row is written by one worker only, and
            // lies within `out`.
            let o = unsafe { std::slice::from_raw_parts_mut((at as *mut f32).add(row * dim), dim) };
            if lo == hi {
                continue;
            }
            // The part of `lo..hi` in a run starting at `first` with `n`
            // positions, as indices into that run.
            let part = |first: usize, n: usize| (lo.max(first) - first, hi.min(first + n).max(first) - first);
            for (first, kh, _) in runs.clone() {
                let (a, z) = part(first, kh.len() / dim);
                if a >= z {
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if vector {
                    // SAFETY: AVX-512F checked, `dim` a multiple of 16; `kh`
                    // holds the run's rows of `dim`, `p` from `first` on
                    // holds a score for each.
                    unsafe { scores_avx512(qr, kh, a, z, &mut p[first..]) };
                    continue;
                }
                scores_row(qr, kh, a, z, &mut p[first..], avx2);
            }
            #[cfg(target_arch = "x86_64")]
            if vector_softmax {
                // SAFETY: AVX-512F checked.
                unsafe { softmax_row_avx512(&mut p[lo..hi]) };
            } else {
                softmax_row_on(&mut p[lo..hi], avx2);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = vector_softmax;
                softmax_row_on(&mut p[lo..hi], avx2);
            }
            let mut started = false;
            for (first, _, vh) in runs {
                let (a, z) = part(first, vh.len() / dim);
                if a >= z {
                    continue;
                }
                let w = &p[first + a..first + z];
                #[cfg(target_arch = "x86_64")]
                if vector {
                    // SAFETY: AVX-512F checked, `dim` a multiple of 16; `vh`
                    // holds the run's rows, `w` one weight for each of
                    // rows `a..z`.
                    unsafe { weighted_sum_avx512(w, &vh[a * dim..z * dim], o, started) };
                    started = true;
                    continue;
                }
                weighted_sum_on(w, &vh[a * dim..z * dim], o, avx2);
                started = true;
            }
            let _ = (started, vector);
        }
    });
    out
}

/// Lanes of one 512-bit vector of f32.
const LANES: usize = 16;

/// One query's scores against keys `lo..hi` (rows of `kh`) into
/// `o[lo..hi]`, each summed in [`dot16`]'s order: with AVX2 (`avx2`, and a
/// width that is a multiple of 16) by [`scores_avx2`], else by [`dot16`].
fn scores_row(qr: &[f32], kh: &[f32], lo: usize, hi: usize, o: &mut [f32], avx2: bool) {
    let dim = qr.len();
    #[cfg(target_arch = "x86_64")]
    if avx2 && dim.is_multiple_of(LANES) {
        // SAFETY: AVX2 and FMA checked by the caller, `dim` a multiple of
        // 16; `kh` holds rows up to `hi` and `o` an entry for each.
        unsafe { scores_avx2(qr, &kh[..hi * dim], lo, hi, &mut o[..hi]) };
        return;
    }
    let _ = avx2;
    for j in lo..hi {
        o[j] = dot16(qr, &kh[j * dim..(j + 1) * dim]);
    }
}

/// [`dot16`] for keys `lo..hi` with AVX2: the sixteen partial sums are two
/// 8-lane accumulators (lanes 0-7, 8-15), and the fold in halves is their
/// sum (`s = 8`), the sum of its 128-bit halves (`s = 4`), then of that
/// vector's halves (`s = 2`) and its two lanes (`s = 1`): the same
/// additions in the same order, so the same scores to the bit. Four keys
/// at a time share each load of the query and keep eight independent sums
/// in flight (one key alone waits on its multiply-adds' latency).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(qr: &[f32], kh: &[f32], lo: usize, hi: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    let dim = qr.len();
    let fold = |a: __m256, b: __m256| hsum8(_mm256_add_ps(a, b));
    let (q, k) = (qr.as_ptr(), kh.as_ptr());
    let mut j = lo;
    while j + 4 <= hi {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for c in (0..dim).step_by(LANES) {
            // SAFETY (loop body): rows `j..j + 4 <= hi` of `dim` values lie
            // in `kh`, and `c + 16 <= dim`.
            unsafe {
                let (q0, q1) = (_mm256_loadu_ps(q.add(c)), _mm256_loadu_ps(q.add(c + 8)));
                for (x, acc) in acc.iter_mut().enumerate() {
                    let kr = k.add((j + x) * dim + c);
                    acc[0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kr), acc[0]);
                    acc[1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kr.add(8)), acc[1]);
                }
            }
        }
        for (x, acc) in acc.iter().enumerate() {
            o[j + x] = fold(acc[0], acc[1]);
        }
        j += 4;
    }
    while j < hi {
        let mut acc = [_mm256_setzero_ps(); 2];
        for c in (0..dim).step_by(LANES) {
            // SAFETY: row `j < hi` lies in `kh`, and `c + 16 <= dim`.
            unsafe {
                let kr = k.add(j * dim + c);
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), _mm256_loadu_ps(kr), acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c + 8)), _mm256_loadu_ps(kr.add(8)), acc[1]);
            }
        }
        o[j] = fold(acc[0], acc[1]);
        j += 1;
    }
}

/// `a · b` in the order every score is summed: lane `l` of sixteen partial
/// sums takes `a[i] * b[i]` for `i = l, l + 16, ...` by fused multiply-add
/// from 0, then the lanes fold in halves (`p[l] += p[l + s]` for `s = 8, 4,
/// 2, 1`). [`fold16_avx512`] does the same for sixteen keys at once.
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut p = [0f32; LANES];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        p[i % LANES] = x.mul_add(y, p[i % LANES]);
    }
    for s in [8, 4, 2, 1] {
        for l in 0..s {
            p[l] += p[l + s];
        }
    }
    p[0]
}

/// One query's scores against keys `lo..hi` of one head (`kh`, rows of
/// `dim`, a multiple of 16), written to `o[lo..hi]`, sixteen keys at a
/// time; keys of a block outside `lo..hi` are neither read nor written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(qr: &[f32], kh: &[f32], lo: usize, hi: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    let dim = qr.len();
    let mut first = lo / LANES * LANES;
    while first < hi {
        // SAFETY (loop body): keys in `lo..hi` have rows in `kh`; the store
        // is masked to them, and they lie in `o`.
        unsafe {
            let mut p = [_mm512_setzero_ps(); LANES];
            let mut mask: u16 = 0;
            for (l, pl) in p.iter_mut().enumerate() {
                let j = first + l;
                if j < lo || j >= hi {
                    continue;
                }
                mask |= 1 << l;
                let kr = kh.as_ptr().add(j * dim);
                let mut acc = _mm512_setzero_ps();
                for c in (0..dim).step_by(LANES) {
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr.as_ptr().add(c)), _mm512_loadu_ps(kr.add(c)), acc);
                }
                *pl = acc;
            }
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(first), mask, fold16_avx512(p));
        }
        first += LANES;
    }
}

/// Lane indices for one round of [`fold16_avx512`]: with groups of `2s`
/// lanes, output group `2g` is the first input's group `g` and output
/// group `2g + 1` the second input's, each folded (its first `s` lanes, or
/// with `second` its last `s`).
const fn fold_lanes(s: usize, second: bool) -> [i32; 16] {
    let mut idx = [0i32; 16];
    let mut l = 0;
    while l < 16 {
        let (g, from_b, off) = (l / (2 * s), (l / s) % 2 == 1, l % s);
        let lane = 2 * s * g + off + if second { s } else { 0 };
        idx[l] = (lane + if from_b { 16 } else { 0 }) as i32;
        l += 1;
    }
    idx
}

/// Sixteen keys' partial-sum vectors `p[j]` folded into one vector whose
/// lane `j` is key `j`'s sum, each key's lanes added in [`dot16`]'s order:
/// round `s` pairs `p[j]` with `p[j + s]` and halves every key's group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fold16_avx512(mut p: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const ROUNDS: [[[i32; 16]; 2]; 4] = [
        [fold_lanes(8, false), fold_lanes(8, true)],
        [fold_lanes(4, false), fold_lanes(4, true)],
        [fold_lanes(2, false), fold_lanes(2, true)],
        [fold_lanes(1, false), fold_lanes(1, true)],
    ];
    for (round, [first, second]) in ROUNDS.iter().enumerate() {
        let s = 8 >> round;
        // SAFETY: each index array is 16 i32s, one 512-bit load.
        let (first, second) = unsafe {
            (
                _mm512_loadu_si512(first.as_ptr().cast()),
                _mm512_loadu_si512(second.as_ptr().cast()),
            )
        };
        for j in 0..s {
            let (a, b) = (p[j], p[j + s]);
            p[j] = _mm512_add_ps(
                _mm512_permutex2var_ps(a, first, b),
                _mm512_permutex2var_ps(a, second, b),
            );
        }
    }
    p[0]
}

/// `out += Σ_j w[j] · v[j]` over rows `v` as wide as `out`, each
/// coordinate one fused multiply-add per row in ascending `j` from its
/// value in `out`: with AVX2 where `avx2` says so and the width is a
/// multiple of 8 ([`weighted_sum_avx2`], which keeps 32 coordinates in
/// registers instead of storing every coordinate after every row), else in
/// plain Rust. Both give the same numbers.
fn weighted_sum_on(w: &[f32], v: &[f32], out: &mut [f32], avx2: bool) {
    let dim = out.len();
    #[cfg(target_arch = "x86_64")]
    if avx2 && dim.is_multiple_of(8) {
        // SAFETY: AVX2 and FMA checked by the caller; `v` holds `w.len()`
        // rows of `dim`.
        unsafe { weighted_sum_avx2(w, &v[..w.len() * dim], out) };
        return;
    }
    let _ = avx2;
    for (j, &x) in w.iter().enumerate() {
        let vr = &v[j * dim..(j + 1) * dim];
        for (y, &v) in out.iter_mut().zip(vr) {
            *y = x.mul_add(v, *y);
        }
    }
}

/// [`weighted_sum_on`] with AVX2: 32 coordinates of `out` held in four
/// registers over all rows, then 8 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(w: &[f32], v: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let dim = out.len();
    let (vp, op) = (v.as_ptr(), out.as_mut_ptr());
    let mut d0 = 0;
    // SAFETY (whole body): every access is below `w.len()` rows of `dim`
    // values of `v` and within `out`; `dim` is a multiple of 8.
    unsafe {
        while d0 + 32 <= dim {
            let mut a: [__m256; 4] = std::array::from_fn(|x| _mm256_loadu_ps(op.add(d0 + 8 * x)));
            for (j, &x) in w.iter().enumerate() {
                let s = _mm256_set1_ps(x);
                let r = vp.add(j * dim + d0);
                for (i, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(s, _mm256_loadu_ps(r.add(8 * i)), *a);
                }
            }
            for (i, a) in a.iter().enumerate() {
                _mm256_storeu_ps(op.add(d0 + 8 * i), *a);
            }
            d0 += 32;
        }
        while d0 < dim {
            let mut a = _mm256_loadu_ps(op.add(d0));
            for (j, &x) in w.iter().enumerate() {
                a = _mm256_fmadd_ps(_mm256_set1_ps(x), _mm256_loadu_ps(vp.add(j * dim + d0)), a);
            }
            _mm256_storeu_ps(op.add(d0), a);
            d0 += 8;
        }
    }
}

/// `out = Σ_j w[j] · v[j]` over `dim`-wide rows `v`, in ascending `j`,
/// 64 values of `out` held in registers at a time; with `accumulate` the
/// sums start from `out` instead of 0, so two calls over consecutive runs
/// of rows give the numbers of one call over both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_avx512(w: &[f32], v: &[f32], out: &mut [f32], accumulate: bool) {
    use std::arch::x86_64::*;
    let dim = out.len();
    let vp = v.as_ptr();
    let op = out.as_mut_ptr();
    let mut d0 = 0;
    // SAFETY (whole body): every access is below `w.len()` rows of `dim`
    // values of `v` and within `out`; `dim` is a multiple of 16.
    unsafe {
        while d0 + 64 <= dim {
            let (mut a0, mut a1, mut a2, mut a3) = if accumulate {
                (
                    _mm512_loadu_ps(op.add(d0)),
                    _mm512_loadu_ps(op.add(d0 + 16)),
                    _mm512_loadu_ps(op.add(d0 + 32)),
                    _mm512_loadu_ps(op.add(d0 + 48)),
                )
            } else {
                (
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                )
            };
            for (j, &x) in w.iter().enumerate() {
                let s = _mm512_set1_ps(x);
                let r = vp.add(j * dim + d0);
                a0 = _mm512_fmadd_ps(s, _mm512_loadu_ps(r), a0);
                a1 = _mm512_fmadd_ps(s, _mm512_loadu_ps(r.add(16)), a1);
                a2 = _mm512_fmadd_ps(s, _mm512_loadu_ps(r.add(32)), a2);
                a3 = _mm512_fmadd_ps(s, _mm512_loadu_ps(r.add(48)), a3);
            }
            _mm512_storeu_ps(op.add(d0), a0);
            _mm512_storeu_ps(op.add(d0 + 16), a1);
            _mm512_storeu_ps(op.add(d0 + 32), a2);
            _mm512_storeu_ps(op.add(d0 + 48), a3);
            d0 += 64;
        }
        while d0 < dim {
            let mut a = if accumulate {
                _mm512_loadu_ps(op.add(d0))
            } else {
                _mm512_setzero_ps()
            };
            for (j, &x) in w.iter().enumerate() {
                a = _mm512_fmadd_ps(_mm512_set1_ps(x), _mm512_loadu_ps(vp.add(j * dim + d0)), a);
            }
            _mm512_storeu_ps(op.add(d0), a);
            d0 += 16;
        }
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
    fn shifted_exponentials_match_their_definition() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 900.0) / 13.0).collect();
        let mut got = x.clone();
        let mut sums = Vec::new();
        let sum = exp_shifted(&mut got, 8.0, 1.0 / 0.7, &mut sums);
        assert_eq!(sums.len(), x.len().div_ceil(EXP_BLOCK));
        for (b, s) in got.chunks(EXP_BLOCK).zip(&sums) {
            let direct: f32 = b.iter().sum();
            assert!(
                (direct - s).abs() <= 1e-5 * direct.max(1e-30),
                "block sum {s}, want {direct}"
            );
        }
        let mut want_sum = 0.0f64;
        for (g, v) in got.iter().zip(&x) {
            let want = ((v - 8.0) / 0.7).exp();
            want_sum += want as f64;
            assert!(
                (g - want).abs() <= 1e-6 * (1.0 + want),
                "e^(({v} - 8) / 0.7) = {g}, want {want}"
            );
        }
        assert!(
            ((sum as f64) - want_sum).abs() <= 1e-5 * want_sum,
            "sum {sum}, want {want_sum}"
        );
    }

    #[test]
    fn the_maximum_is_found_first_and_nan_refused() {
        let mut x: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32).collect();
        assert_eq!(max_index(&x), Ok(Some((30, 100.0))));
        x[1001] = 200.0;
        assert_eq!(max_index(&x), Ok(Some((1001, 200.0))));
        x[17] = f32::NAN;
        assert_eq!(max_index(&x), Err(17));
        assert_eq!(max_index(&[]), Ok(None));
        assert_eq!(max_index(&[f32::NEG_INFINITY; 3]), Ok(Some((0, f32::NEG_INFINITY))));
    }

    /// The grouped prompt kernels give each query the numbers of the
    /// one-query kernels (the decode step's) to the bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn grouped_attention_kernels_equal_the_one_query_kernels() {
        if !vector() {
            return;
        }
        for dim in [48, 256] {
            let keys = 75;
            let kh = noise(keys * dim, 21);
            let qs = noise(GROUP * dim, 23);
            let probs = noise(GROUP * keys, 25);
            let vis = [(0, 70), (3, 71), (40, 72), (0, 0)];
            for n in 1..=GROUP {
                let rows: [&[f32]; GROUP] = std::array::from_fn(|r| &qs[r * dim..(r + 1) * dim]);
                let ps: [&[f32]; GROUP] = std::array::from_fn(|r| &probs[r * keys..(r + 1) * keys]);
                let mut scores = vec![0f32; GROUP * keys];
                let mut sums = vec![0f32; GROUP * dim];
                let so: [*mut f32; GROUP] = std::array::from_fn(|r| scores.as_mut_ptr().wrapping_add(r * keys));
                let vo: [*mut f32; GROUP] = std::array::from_fn(|r| sums.as_mut_ptr().wrapping_add(r * dim));
                // SAFETY: AVX-512F checked; every row is in bounds.
                unsafe {
                    scores_group_avx512(&rows, &kh, &vis, n, &so);
                    weighted_sum_group_avx512(&ps, &kh, dim, &vis, n, &vo);
                }
                for r in 0..n {
                    let (a, z) = vis[r];
                    let mut one = vec![0f32; keys];
                    let mut sum = vec![0f32; dim];
                    // SAFETY: as above.
                    unsafe {
                        scores_avx512(rows[r], &kh, a, z, &mut one);
                        weighted_sum_avx512(&ps[r][a..z], &kh[a * dim..z * dim], &mut sum, false);
                    }
                    assert_eq!(
                        &scores[r * keys..(r + 1) * keys],
                        &one[..],
                        "scores: dim {dim}, {n} rows, row {r}"
                    );
                    assert_eq!(
                        &sums[r * dim..(r + 1) * dim],
                        &sum[..],
                        "values: dim {dim}, {n} rows, row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn gated_activations_match_their_definitions_on_both_paths() {
        // 1003 values: whole vectors and a masked tail.
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) / 37.0).collect();
        let up: Vec<f32> = (0..1003).map(|i| 1.0 + (i % 7) as f32 / 3.0).collect();
        for act in [Gate::Silu, Gate::GeluTanh] {
            let mut got = x.clone();
            gated(&mut got, &up, act);
            for ((g, v), u) in got.iter().zip(&x).zip(&up) {
                let a = match act {
                    Gate::Silu => v / (1.0 + (-v).exp()),
                    Gate::GeluTanh => {
                        0.5 * v * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
                    }
                };
                let want = a * u;
                assert!(
                    (g - want).abs() <= 2e-6 * (1.0 + want.abs()),
                    "{act:?}({v}) * {u} = {g}, want {want}"
                );
                // The portable path, which runs where AVX-512 does not.
                let portable = act.apply(*v) * u;
                assert!(
                    (g - portable).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{act:?}({v}): vector {g}, portable {portable}"
                );
            }
        }
    }

    /// The values product: equal to the plain sum (within float
    /// reassociation), and each row independent of how many rows run.
    #[test]
    fn attention_values_rows_stand_alone() {
        // 80: the portable loop; 64 and 256: the vector one where it runs.
        for dim in [80, 64, 256] {
            values_rows_stand_alone(dim);
        }
    }

    fn values_rows_stand_alone(dim: usize) {
        let shape = ValuesShape {
            batch: 1,
            heads: 4,
            kv_heads: 2,
            keys: 700,
            dim,
        };
        let (t, pos) = (40, 660);
        let causal = Causal {
            queries: t,
            pos,
            window: Some(500),
        };
        let mut probs = noise(shape.heads * t * shape.keys, 1);
        softmax_causal(&mut probs, shape.keys, causal);
        let values = noise(shape.kv_heads * shape.keys * shape.dim, 7);
        let all = attend_values(&probs, &values, shape, causal);
        // The last 5 queries alone.
        let mut tail = Vec::new();
        for h in 0..shape.heads {
            let start = (h * t + t - 5) * shape.keys;
            tail.extend_from_slice(&probs[start..start + 5 * shape.keys]);
        }
        let alone = attend_values(
            &tail,
            &values,
            shape,
            Causal {
                queries: 5,
                pos: pos + t - 5,
                window: Some(500),
            },
        );
        let per_query = shape.heads * shape.dim;
        assert_eq!(&all[(t - 5) * per_query..], &alone[..]);
        // Against the plain sum.
        for (q, h) in [(0, 0), (17, 3), (39, 2)] {
            for d in [0, 33, dim - 1] {
                let kv = h / 2;
                let want: f64 = (0..shape.keys)
                    .map(|j| {
                        probs[(h * t + q) * shape.keys + j] as f64
                            * values[(kv * shape.keys + j) * shape.dim + d] as f64
                    })
                    .sum();
                let got = all[(q * shape.heads + h) * shape.dim + d] as f64;
                assert!((want - got).abs() < 1e-5, "q{q} h{h} d{d}: {want} vs {got}");
            }
        }
    }

    /// The scores product: a query's scores are the same alone as among
    /// others, and equal the plain dot products.
    #[test]
    fn attention_scores_rows_stand_alone() {
        for dim in [80, 64, 256] {
            let shape = ValuesShape {
                batch: 1,
                heads: 4,
                kv_heads: 2,
                keys: 90,
                dim,
            };
            let (t, pos) = (30, 60);
            let causal = Causal {
                queries: t,
                pos,
                window: None,
            };
            let q = noise(shape.heads * t * dim, 3);
            let k = noise(shape.kv_heads * shape.keys * dim, 5);
            let all = attend_scores(&q, &k, shape, causal);
            let mut last = Vec::new();
            for h in 0..shape.heads {
                last.extend_from_slice(&q[(h * t + t - 1) * dim..(h * t + t) * dim]);
            }
            let one = Causal {
                queries: 1,
                pos: pos + t - 1,
                window: None,
            };
            let alone = attend_scores(&last, &k, shape, one);
            for h in 0..shape.heads {
                let row = &all[(h * t + t - 1) * shape.keys..(h * t + t) * shape.keys];
                assert_eq!(row, &alone[h * shape.keys..(h + 1) * shape.keys], "dim {dim} head {h}");
                let want: f64 = (0..dim)
                    .map(|d| q[(h * t + 5) * dim + d] as f64 * k[((h / 2) * shape.keys + 7) * dim + d] as f64)
                    .sum();
                let got = all[(h * t + 5) * shape.keys + 7] as f64;
                assert!((want - got).abs() < 1e-5, "dim {dim}: {want} vs {got}");
            }
        }
    }

    /// Keys and values read from a buffer with spare positions per head
    /// (a KV cache grown in place) give exactly the numbers of the same
    /// keys and values packed to their length.
    #[test]
    fn attention_reads_a_buffer_with_room_as_a_packed_one() {
        for (dim, keys, spare) in [(64, 37, 91), (256, 5, 1), (24, 129, 128)] {
            let shape = ValuesShape {
                batch: 2,
                heads: 4,
                kv_heads: 2,
                keys,
                dim,
            };
            let t = keys.min(3);
            let causal = Causal {
                queries: t,
                pos: keys - t,
                window: Some(100),
            };
            let cap = keys + spare;
            let heads = shape.batch * shape.kv_heads;
            let packed = noise(heads * keys * dim, 7);
            // The same rows with `spare` positions of junk after each head.
            let mut roomy = noise(heads * cap * dim, 9);
            for h in 0..heads {
                roomy[h * cap * dim..(h * cap + keys) * dim]
                    .copy_from_slice(&packed[h * keys * dim..(h + 1) * keys * dim]);
            }
            let q = noise(shape.batch * shape.heads * t * dim, 3);
            let scores = attend_scores(&q, &packed, shape, causal);
            assert_eq!(
                scores,
                attend_scores_in(&q, &roomy, shape, causal, cap),
                "scores, dim {dim}"
            );
            let probs = noise(shape.batch * shape.heads * t * keys, 5);
            assert_eq!(
                attend_values(&probs, &packed, shape, causal),
                attend_values_in(&probs, &roomy, shape, causal, cap),
                "values, dim {dim}"
            );
        }
    }

    /// Deterministic values in [-0.5, 0.5).
    fn noise(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
            .collect()
    }

    /// One sequence's decode query `q` (`[heads, dim]`) attended alone, by
    /// the one-query calls: scores, causal softmax and values over one
    /// buffer pair `[kv_heads, capacity, dim]` holding its `len` positions.
    fn decode_alone(
        q: &[f32],
        (keys, values): (&[f32], &[f32]),
        len: usize,
        capacity: usize,
        window: Option<usize>,
        (heads, kv_heads, dim): (usize, usize, usize),
    ) -> Vec<f32> {
        let shape = ValuesShape {
            batch: 1,
            heads,
            kv_heads,
            keys: len,
            dim,
        };
        let causal = Causal {
            queries: 1,
            pos: len - 1,
            window,
        };
        let mut probs = attend_scores_in(q, keys, shape, causal, capacity);
        softmax_causal(&mut probs, len, causal);
        attend_values_in(&probs, values, shape, causal, capacity)
    }

    /// A decode step of several sequences in one call gives every row the
    /// numbers of its own one-query calls (scores, causal softmax, values),
    /// to the bit: sequences of different lengths, windows, room in their
    /// buffers, grouped heads and head widths that take either path.
    #[test]
    fn a_batched_decode_step_attends_as_each_sequence_alone() {
        for dim in [64, 24] {
            let (heads, kv_heads) = (6, 2);
            let lens = [1usize, 17, 300, 40];
            let windows = [None, Some(8), Some(512), Some(40)];
            let caps: Vec<usize> = lens.iter().map(|l| l + 5).collect();
            let bufs: Vec<(Vec<f32>, Vec<f32>)> = lens
                .iter()
                .zip(&caps)
                .enumerate()
                .map(|(i, (_, &c))| {
                    (
                        noise(kv_heads * c * dim, 10 + i as u32),
                        noise(kv_heads * c * dim, 20 + i as u32),
                    )
                })
                .collect();
            let q = noise(lens.len() * heads * dim, 1);
            let seqs: Vec<DecodeKv<'_>> = (0..lens.len())
                .map(|i| DecodeKv {
                    own: KvBuffers {
                        keys: &bufs[i].0,
                        values: &bufs[i].1,
                        capacity: caps[i],
                    },
                    len: lens[i],
                    window: windows[i],
                    shared: None,
                })
                .collect();
            let together = attend_decode(&q, &seqs, heads, kv_heads, dim);
            for (i, s) in seqs.iter().enumerate() {
                let qi = &q[i * heads * dim..(i + 1) * heads * dim];
                let alone = decode_alone(
                    qi,
                    (s.own.keys, s.own.values),
                    s.len,
                    s.own.capacity,
                    s.window,
                    (heads, kv_heads, dim),
                );
                assert_eq!(
                    &together[i * heads * dim..(i + 1) * heads * dim],
                    &alone[..],
                    "dim {dim} sequence {i}"
                );
            }
        }
    }

    /// Continuations of one prompt read it from one shared buffer and their
    /// own tokens from their own: every row gets the numbers of a one-query
    /// call over a single buffer holding all its positions, to the bit
    /// (tails shorter and longer than a block of sixteen keys, a window
    /// that starts inside the shared part and one that starts after it).
    #[test]
    fn continuations_sharing_a_prompt_attend_as_with_their_own_copy() {
        for dim in [64, 24] {
            let (heads, kv_heads) = (6, 2);
            let (prompt, prompt_cap) = (150usize, 170usize);
            let (pk, pv) = (
                noise(kv_heads * prompt_cap * dim, 3),
                noise(kv_heads * prompt_cap * dim, 4),
            );
            let tails = [1usize, 20, 60];
            let windows = [None, Some(100), Some(30)];
            // Each continuation's own buffers, and a single buffer holding
            // the prompt then its tail (the copy it used to make).
            let room = 7;
            let own: Vec<(Vec<f32>, Vec<f32>)> = tails
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    let c = t + room;
                    (
                        noise(kv_heads * c * dim, 40 + i as u32),
                        noise(kv_heads * c * dim, 50 + i as u32),
                    )
                })
                .collect();
            let whole = |shared: &[f32], tail: &[f32], t: usize| -> Vec<f32> {
                let c = t + room;
                let mut w = Vec::new();
                for h in 0..kv_heads {
                    w.extend_from_slice(&shared[h * prompt_cap * dim..(h * prompt_cap + prompt) * dim]);
                    w.extend_from_slice(&tail[h * c * dim..(h * c + t) * dim]);
                }
                w
            };
            let copies: Vec<(Vec<f32>, Vec<f32>)> = tails
                .iter()
                .zip(&own)
                .map(|(&t, (k, v))| (whole(&pk, k, t), whole(&pv, v, t)))
                .collect();
            let q = noise(tails.len() * heads * dim, 9);
            let seqs: Vec<DecodeKv<'_>> = (0..tails.len())
                .map(|i| DecodeKv {
                    own: KvBuffers {
                        keys: &own[i].0,
                        values: &own[i].1,
                        capacity: tails[i] + room,
                    },
                    len: prompt + tails[i],
                    window: windows[i],
                    shared: Some(SharedKv {
                        buffers: KvBuffers {
                            keys: &pk,
                            values: &pv,
                            capacity: prompt_cap,
                        },
                        len: prompt,
                    }),
                })
                .collect();
            let together = attend_decode(&q, &seqs, heads, kv_heads, dim);
            for (i, s) in seqs.iter().enumerate() {
                let qi = &q[i * heads * dim..(i + 1) * heads * dim];
                let alone = decode_alone(
                    qi,
                    (&copies[i].0, &copies[i].1),
                    s.len,
                    s.len,
                    s.window,
                    (heads, kv_heads, dim),
                );
                assert_eq!(
                    &together[i * heads * dim..(i + 1) * heads * dim],
                    &alone[..],
                    "dim {dim} continuation {i}"
                );
            }
        }
    }

    /// Every score is summed in the documented order (sixteen lanes of
    /// fused multiply-adds, folded in halves), on the vector path as on the
    /// fallback, to the bit: with full and partial blocks of keys, windows,
    /// several sequences and grouped heads; keys a query cannot see stay 0.
    #[test]
    fn attention_scores_are_summed_in_one_documented_order() {
        let noise = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_246_822_519).wrapping_add(seed) >> 8) as f32 / 8_388_608.0 - 1.0)
                .collect()
        };
        for (dim, keys, window) in [
            (64, 1, None),
            (64, 37, None),
            (256, 70, Some(20)),
            (80, 16, None),
            (24, 129, Some(64)),
            (32, 90, Some(40)),
        ] {
            let shape = ValuesShape {
                batch: 2,
                heads: 6,
                kv_heads: 2,
                keys,
                dim,
            };
            // Eleven queries: groups of four, four and three on the vector
            // path (and a group cut where the thread pool splits rows).
            let t = keys.min(11);
            let causal = Causal {
                queries: t,
                pos: keys - t,
                window,
            };
            let q = noise(shape.batch * shape.heads * t * dim, 11);
            let k = noise(shape.batch * shape.kv_heads * keys * dim, 13);
            let got = attend_scores(&q, &k, shape, causal);
            let mut want = vec![0f32; got.len()];
            for row in 0..shape.batch * shape.heads * t {
                let (bh, qi) = (row / t, row % t);
                let kv = (bh / shape.heads) * shape.kv_heads + (bh % shape.heads) / 3;
                let (lo, hi) = causal.visible(qi, keys);
                for j in lo..hi {
                    let kr = &k[(kv * keys + j) * dim..(kv * keys + j + 1) * dim];
                    let qr = &q[row * dim..(row + 1) * dim];
                    let mut p = [0f32; 16];
                    for (i, (&x, &y)) in qr.iter().zip(kr).enumerate() {
                        p[i % 16] = x.mul_add(y, p[i % 16]);
                    }
                    want[row * keys + j] = (((p[0] + p[8]) + (p[4] + p[12])) + ((p[2] + p[10]) + (p[6] + p[14])))
                        + (((p[1] + p[9]) + (p[5] + p[13])) + ((p[3] + p[11]) + (p[7] + p[15])));
                }
            }
            assert_eq!(got, want, "dim {dim}, {keys} keys, window {window:?}");
        }
    }
}
