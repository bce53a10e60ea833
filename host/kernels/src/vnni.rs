//! Q8_0 matrix products with AVX-512 VNNI or AVX2, for any input width.
//!
//! candle multiplies quantized weights with `vpdpbusd` only when the input
//! width is a multiple of 256, and then quantizes each activation row with one
//! scale per 256 values. The default pool's hidden sizes (576, 640, 896) miss
//! the first condition, so most of their matrices ran on a one-row-at-a-time
//! AVX2 dot product; padding them to 768/1024 met it but lost too much
//! precision (one scale per 256 activations moved SmolLM2's next-token
//! log-probs by over a nat against llama.cpp, which quantizes activations per
//! 32 values like the weights).
//!
//! This kernel keeps llama.cpp's numerics and takes the fast instruction:
//!
//! * Weights are repacked once at load into tiles of 16 output rows by one
//!   32-value block: the 16 rows' block scales as f32, then the quants stored
//!   as `q + 128` (unsigned, as `vpdpbusd` wants its first operand), grouped
//!   by 4 consecutive inputs so that one 64-byte load holds 4 inputs of all 16
//!   rows.
//! * Each activation row is quantized per 32 values (scale = max |x| / 127,
//!   as Q8_0), keeping the sum of its quants.
//! * One `vpdpbusd` multiplies 4 inputs, broadcast, into 16 rows at once;
//!   after a block's 8 groups the `+128` is taken back out with the block's
//!   quant sum (`sum((q+128) a) - 128 sum(a)`), and the integer result is
//!   scaled by the weight scales and the activation scale into 16 f32
//!   accumulators.
//! * Up to four activation rows share every weight load (prefill, scoring,
//!   batched decoding), and tiles are spread over candle's thread pool, so the
//!   thread budget is the one the rest of inference uses.
//!
//! * Without AVX-512 (AMD before Zen 4, Intel client cores) the same
//!   packing runs on AVX2, 8 outputs per register ([`Simd::Avx2`]), with
//!   the same integer sums and so the same results.
//!
//! Results equal candle's AVX2 Q8_0 path up to the activation scale's
//! precision (f32 here, f16 there) and float summation order.

/// Output rows per tile: one 512-bit register of i32/f32 lanes.
pub(crate) const TILE: usize = 16;
/// Values per quantization block (Q8_0's block size).
pub(crate) const BLOCK: usize = 32;

/// One 32-input block of 16 output rows.
#[repr(C, align(64))]
#[derive(Clone)]
pub(crate) struct Tile {
    /// Quants + 128: `[group of 4 inputs (8)][row (16)][input in group (4)]`.
    /// This is also the layout of an AMX `B` tile of 8 rows by 64 bytes, so
    /// the [`crate::amx`] kernel reads the same packing.
    pub(crate) qs: [u8; BLOCK * TILE],
    /// Each row's block scale.
    pub(crate) d: [f32; TILE],
}

/// A Q8_0 weight matrix (`n` rows of `k` inputs) repacked for [`matmul`].
pub struct Packed {
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// `[tile (n / 16)][block (k / 32)]`.
    pub(crate) tiles: Vec<Tile>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vnni::Packed({}x{})", self.n, self.k)
    }
}

/// The instruction sets the packed kernels ([`matmul`],
/// [`crate::lowbit::matmul`]) run on, best first. Every one gives the same
/// numbers: the integer block sums are exact on each, and the floating-point
/// steps after them are the same operations in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512 with VNNI: `vpdpbusd` on 16 outputs at a time.
    Avx512Vnni,
    /// AVX2 with FMA, for CPUs without AVX-512 (AMD before Zen 4, Intel
    /// client cores): `vpmaddubsw` then `vpmaddwd` on 8 outputs at a time.
    Avx2,
    /// Plain Rust, for every other CPU.
    Portable,
}

impl Simd {
    /// The best set this CPU has (the standard library caches the CPUID
    /// answers).
    pub fn best() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Simd::Avx512Vnni;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// Whether this CPU has the set. A kernel asked for a set it lacks runs
    /// [`Simd::Portable`] instead, so no caller can reach an instruction
    /// the CPU does not have.
    pub fn runs_here(self) -> bool {
        match (self, Simd::best()) {
            (Simd::Portable, _) => true,
            (Simd::Avx2, best) => best != Simd::Portable,
            (Simd::Avx512Vnni, best) => best == Simd::Avx512Vnni,
        }
    }

    /// Every set this CPU has, the portable path first (tests and benches
    /// run each).
    pub fn here() -> Vec<Simd> {
        [Simd::Portable, Simd::Avx2, Simd::Avx512Vnni]
            .into_iter()
            .filter(|s| s.runs_here())
            .collect()
    }

    /// `self` where this CPU has it, else [`Simd::Portable`].
    pub(crate) fn or_portable(self) -> Simd {
        if self.runs_here() {
            self
        } else {
            Simd::Portable
        }
    }
}

static ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Allows or forbids the packed kernels for this process (default:
/// allowed). With `false`, [`available`] says no, so models loaded from
/// then on multiply on candle's kernels: benches compare both on one
/// machine with it.
pub fn set_allowed(allowed: bool) {
    ALLOWED.store(allowed, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this CPU runs the packed kernels with SIMD (AVX-512 VNNI or
/// AVX2) and they are allowed ([`set_allowed`]); where the CPU has
/// neither they still give the same numbers, slowly.
pub fn available() -> bool {
    ALLOWED.load(std::sync::atomic::Ordering::Relaxed) && Simd::best() != Simd::Portable
}

/// Whether a `n x k` matrix fits the tile layout.
pub fn fits(n: usize, k: usize) -> bool {
    n > 0 && k > 0 && n.is_multiple_of(TILE) && k.is_multiple_of(BLOCK)
}

impl Packed {
    /// Repacks GGML Q8_0 data (`n * k / 32` blocks of an f16 scale and 32
    /// i8 quants, row-major) into tiles. `None` if the shape does not fit or
    /// the data is not that many blocks.
    pub fn from_q8_0(bytes: &[u8], n: usize, k: usize) -> Option<Packed> {
        const BLOCK_BYTES: usize = 2 + BLOCK;
        let kb = k / BLOCK;
        if !fits(n, k) || bytes.len() != n * kb * BLOCK_BYTES {
            return None;
        }
        let mut tiles = Vec::with_capacity(n / TILE * kb);
        for t in 0..n / TILE {
            for b in 0..kb {
                let mut tile = Tile {
                    qs: [0; BLOCK * TILE],
                    d: [0.0; TILE],
                };
                for r in 0..TILE {
                    let at = ((t * TILE + r) * kb + b) * BLOCK_BYTES;
                    let block = &bytes[at..at + BLOCK_BYTES];
                    tile.d[r] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                    for (i, &q) in block[2..].iter().enumerate() {
                        let (group, lane) = (i / 4, i % 4);
                        tile.qs[(group * TILE + r) * 4 + lane] = (q as i8 as i16 + 128) as u8;
                    }
                }
                tiles.push(tile);
            }
        }
        Some(Packed { n, k, tiles })
    }

    /// Output width (rows of the weight matrix).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }
}

/// One activation block quantized as Q8_0, with its quant sum. `repr(C)`
/// so that a row's blocks sit at a fixed stride (the AMX kernel loads 16
/// rows' quants of one block as a tile with that stride).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Act {
    pub(crate) d: f32,
    pub(crate) sum: i32,
    pub(crate) qs: [i8; BLOCK],
}

impl Act {
    /// A padding row's block: contributes nothing.
    pub(crate) const ZERO: Act = Act {
        d: 0.0,
        sum: 0,
        qs: [0; BLOCK],
    };
}

/// Quantizes rows of whole 32-value blocks, block by block: with AVX2
/// where the CPU has it ([`quantize_avx2`], the same numbers), spread over
/// candle's thread pool for a prompt's many rows. Every kernel quantizes
/// its input, and in plain Rust this took a tenth of a SmolLM2 prompt on
/// a CPU without AVX-512, on one core while the other waited.
pub(crate) fn quantize(x: &[f32]) -> Vec<Act> {
    quantize_grouped(x, BLOCK)
}

/// [`quantize`] with every `group` values (a multiple of 32 that divides
/// the rows' width) sharing one scale, `max |x| / 127` over the group: 256
/// is llama.cpp's Q8_K, the activations it multiplies K-quant weights by,
/// so that our K-quant products follow the arithmetic of the engine the
/// parity fixtures come from.
pub(crate) fn quantize_grouped(x: &[f32], group: usize) -> Vec<Act> {
    /// Blocks per job: below two jobs' worth one thread does it all. A
    /// multiple of every group's blocks, so that no group spans two jobs.
    const CHUNK: usize = 512;
    let blocks = x.len() / BLOCK;
    let avx2 = Simd::best() != Simd::Portable;
    let mut acts = vec![Act::ZERO; blocks];
    let one = |xs: &[f32], out: &mut [Act], amax: Option<f32>| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `Simd::best` found AVX2 (it is not `Portable` on an
            // x86 CPU without it); `out` has a block for each 32 values.
            unsafe { quantize_avx2(xs, out, amax) };
            return;
        }
        let _ = avx2;
        quantize_portable(xs, out, amax);
    };
    let run = |xs: &[f32], out: &mut [Act]| {
        if group <= BLOCK {
            return one(xs, out, None);
        }
        for (xs, out) in xs.chunks(group).zip(out.chunks_mut(group / BLOCK)) {
            one(xs, out, Some(xs.iter().fold(0f32, |a, v| a.max(v.abs()))));
        }
    };
    if blocks < 2 * CHUNK {
        run(&x[..blocks * BLOCK], &mut acts);
        return acts;
    }
    let at = acts.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(blocks.div_ceil(CHUNK), |range| {
        for c in range {
            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(blocks));
            // SAFETY: jobs take disjoint block ranges of `acts`, which
            // outlives the pool call.
            let out = unsafe { std::slice::from_raw_parts_mut((at as *mut Act).add(lo), hi - lo) };
            run(&x[lo * BLOCK..hi * BLOCK], out);
        }
    });
    acts
}

/// One block's quantization in plain Rust, the definition the vector path
/// follows: `d = max |x| / 127` (over the block, or `shared_amax`, its
/// group's), quants `round(x / d)` (halves away from zero) within +-127.
fn quantize_portable(x: &[f32], out: &mut [Act], shared_amax: Option<f32>) {
    for (xs, act) in x.chunks_exact(BLOCK).zip(out) {
        let amax = shared_amax.unwrap_or_else(|| xs.iter().fold(0f32, |a, v| a.max(v.abs())));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; BLOCK];
        for (q, v) in qs.iter_mut().zip(xs) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        let sum = qs.iter().map(|&q| q as i32).sum();
        *act = Act { d, sum, qs };
    }
}

/// [`quantize_portable`] with AVX2: the maximum is order-free, `d` and its
/// inverse are the same scalar operations, and `round` (halves away from
/// zero, which the vector rounding modes lack) is the truncation plus one
/// unit towards the value's sign where the exact fraction is at least a
/// half. A NaN becomes 0, as Rust's cast makes it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], out: &mut [Act], shared_amax: Option<f32>) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let (half, one, top) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0), _mm256_set1_ps(127.0));
    // packs interleave 128-bit lanes: this puts the 32 bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xs, act) in x.chunks_exact(BLOCK).zip(out) {
        // SAFETY: `xs` holds 32 values.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) });
        // A group's shared maximum makes the block's own unneeded.
        let amax = shared_amax.unwrap_or_else(|| {
            // `max(|x|, acc)` keeps `acc` where `x` is NaN, as `f32::max` does.
            let m = v.iter().fold(_mm256_setzero_ps(), |acc, &x| {
                _mm256_max_ps(_mm256_andnot_ps(sign, x), acc)
            });
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
        });
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let q: [__m256i; 4] = v.map(|x| {
            let y = _mm256_mul_ps(x, inv);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_andnot_ps(sign, _mm256_sub_ps(y, t)), half);
            let step = _mm256_and_ps(away, _mm256_or_ps(one, _mm256_and_ps(sign, y)));
            let r = _mm256_min_ps(
                _mm256_max_ps(_mm256_add_ps(t, step), _mm256_sub_ps(_mm256_setzero_ps(), top)),
                top,
            );
            // NaN compares unordered with itself: zero it.
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
            _mm256_cvttps_epi32(r)
        });
        let sum = q.iter().fold(_mm256_setzero_si256(), |a, &x| _mm256_add_epi32(a, x));
        let s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        let mut qs = [0i8; BLOCK];
        // SAFETY: `qs` is 32 bytes.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr() as *mut _, bytes) };
        *act = Act {
            d,
            sum: _mm_cvtsi128_si32(s),
            qs,
        };
    }
}

/// `x (m x k) -> x W^T (m x n)`, row-major, for a matrix packed by
/// [`Packed::from_q8_0`], on the best [`Simd`] this CPU has. On a CPU with
/// neither AVX-512 VNNI nor AVX2 the same arithmetic runs in plain Rust,
/// slowly but with the same results, so calling it is always sound.
///
/// # Panics
/// If `x` is not `m` rows of the matrix's input width.
pub fn matmul(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    matmul_on(Simd::best(), w, x, m)
}

/// [`matmul`] on `simd` where this CPU has it ([`Simd::runs_here`]), else
/// in plain Rust: tests and benches compare the paths with it.
///
/// # Panics
/// If `x` is not `m` rows of the matrix's input width.
pub fn matmul_on(simd: Simd, w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k, "vnni::matmul: expected {m} rows of {} values", w.k);
    let acts = quantize(x);
    let simd = simd.or_portable();
    if simd == Simd::Portable {
        return portable(w, &acts, m);
    }
    let kb = w.k / BLOCK;
    let (n, tiles, acts) = (w.n, &w.tiles, &acts);
    by_tiles(m, n, |t, row, take, dst| {
        let blocks = &tiles[t * kb..(t + 1) * kb];
        let at: At<'_> = (blocks, acts.as_slice(), kb, row, dst, n, t * TILE);
        // SAFETY: `or_portable` left only a set this CPU has; `by_tiles`
        // gives rows < m and this tile's columns of its m x n output.
        unsafe {
            match (simd, take) {
                (Simd::Avx512Vnni, 4) => rows::<4>(at),
                (Simd::Avx512Vnni, 3) => rows::<3>(at),
                (Simd::Avx512Vnni, 2) => rows::<2>(at),
                (Simd::Avx512Vnni, _) => rows::<1>(at),
                (_, 4) => rows_avx2::<4>(at),
                (_, 3) => rows_avx2::<3>(at),
                (_, 2) => rows_avx2::<2>(at),
                (_, _) => rows_avx2::<1>(at),
            }
        }
    })
}

/// An `m x n` output computed tile column by tile column (16 outputs),
/// the columns spread over candle's thread pool, each run over the rows in
/// groups of up to four that share its weight loads: `f(tile, first row,
/// rows, output)` writes those rows' 16 columns of the tile and nothing
/// else, so workers never write the same element. Both decode kernels
/// ([`matmul`], [`crate::lowbit::matmul`]) run this way.
pub(crate) fn by_tiles(m: usize, n: usize, f: impl Fn(usize, usize, usize, *mut f32) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let out_at = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n / TILE, |range| {
        for t in range {
            let mut row = 0;
            while row < m {
                let take = (m - row).min(4);
                // `out` outlives the pool call.
                f(t, row, take, out_at as *mut f32);
                row += take;
            }
        }
    });
    out
}

/// The kernel's arithmetic without SIMD: exact integer block sums, then the
/// same fused multiply-adds in the same order, so the results are identical.
pub(crate) fn portable(w: &Packed, acts: &[Act], m: usize) -> Vec<f32> {
    let kb = w.k / BLOCK;
    let mut out = vec![0f32; m * w.n];
    for (i, row) in out.chunks_exact_mut(w.n).enumerate() {
        for (t, cols) in row.chunks_exact_mut(TILE).enumerate() {
            for (b, tile) in w.tiles[t * kb..(t + 1) * kb].iter().enumerate() {
                let a = &acts[i * kb + b];
                for (r, y) in cols.iter_mut().enumerate() {
                    let mut dot = 0i32;
                    for (j, &q) in a.qs.iter().enumerate() {
                        dot += tile.qs[((j / 4) * TILE + r) * 4 + j % 4] as i32 * q as i32;
                    }
                    let exact = dot - 128 * a.sum;
                    *y = (exact as f32).mul_add(tile.d[r] * a.d, *y);
                }
            }
        }
    }
    out
}

/// Where a row group's products go: the tile column's blocks, the
/// activations, blocks per row, the first row, the output, its width and
/// the tile's first column.
type At<'a> = (&'a [Tile], &'a [Act], usize, usize, *mut f32, usize, usize);

/// `R` activation rows from `row` against one tile column: writes
/// `dst[(row + r) * n + col .. + 16]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn rows<const R: usize>((blocks, acts, kb, row, dst, n, col): At<'_>) {
    use std::arch::x86_64::*;
    let mut sums = [_mm512_setzero_ps(); R];
    for (b, tile) in blocks.iter().enumerate() {
        let mut acc = [_mm512_setzero_si512(); R];
        for g in 0..BLOCK / 4 {
            // SAFETY: qs holds 8 groups of 64 bytes.
            let w = unsafe { _mm512_loadu_si512(tile.qs.as_ptr().add(g * 64) as *const _) };
            for r in 0..R {
                let a = &acts[(row + r) * kb + b].qs;
                // SAFETY: g * 4 + 4 <= 32; the 4 quants are read as one lane.
                let a4 = _mm512_set1_epi32(unsafe { std::ptr::read_unaligned(a.as_ptr().add(g * 4) as *const i32) });
                acc[r] = _mm512_dpbusd_epi32(acc[r], w, a4);
            }
        }
        // SAFETY: d holds 16 f32.
        let dw = unsafe { _mm512_loadu_ps(tile.d.as_ptr()) };
        for r in 0..R {
            let a = &acts[(row + r) * kb + b];
            let exact = _mm512_sub_epi32(acc[r], _mm512_set1_epi32(128 * a.sum));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(a.d));
            sums[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, sums[r]);
        }
    }
    for (r, s) in sums.iter().enumerate() {
        // SAFETY: the caller gives rows < m and col + 16 <= n of an m x n buffer.
        unsafe { _mm512_storeu_ps(dst.add((row + r) * n + col), *s) };
    }
}

/// [`rows`] with AVX2. `vpmaddubsw` multiplies unsigned bytes by signed
/// ones into saturating 16-bit pair sums, so the stored `q + 128` (up to
/// 255, times a quant of up to 127, twice: 64,770) would saturate; instead
/// the weights go back to signed `q` and take the activation's sign, and the
/// activation its absolute value (as llama.cpp does without VNNI): pairs
/// then stay within 2 x 127 x 127. `vpmaddwd` by ones widens the pairs to
/// the same 4-input sums `vpdpbusd` makes, which are exact, so the results
/// equal [`rows`]'s. (A weight quant of -128, which GGML's quantizer never
/// writes, would come out as +128 here.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const R: usize>((blocks, acts, kb, row, dst, n, col): At<'_>) {
    use std::arch::x86_64::*;
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    // [row][half of the tile's 16 outputs]
    let mut sums = [[_mm256_setzero_ps(); 2]; R];
    for (b, tile) in blocks.iter().enumerate() {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..BLOCK / 4 {
            // SAFETY: qs holds 8 groups of 64 bytes: outputs 0-7, then 8-15.
            let (w0, w1) = unsafe {
                let at = tile.qs.as_ptr().add(g * 64);
                (
                    _mm256_xor_si256(_mm256_loadu_si256(at as *const _), flip),
                    _mm256_xor_si256(_mm256_loadu_si256(at.add(32) as *const _), flip),
                )
            };
            for r in 0..R {
                let a = &acts[(row + r) * kb + b].qs;
                // SAFETY: g * 4 + 4 <= 32; the 4 quants are read as one lane.
                let a4 = _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(a.as_ptr().add(g * 4) as *const i32) });
                let mag = _mm256_sign_epi8(a4, a4);
                let p0 = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w0, a4));
                let p1 = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w1, a4));
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
            }
        }
        for h in 0..2 {
            // SAFETY: d holds 16 f32.
            let dw = unsafe { _mm256_loadu_ps(tile.d.as_ptr().add(h * 8)) };
            for r in 0..R {
                let a = &acts[(row + r) * kb + b];
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                sums[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), scale, sums[r][h]);
            }
        }
    }
    for (r, s) in sums.iter().enumerate() {
        for (h, s) in s.iter().enumerate() {
            // SAFETY: the caller gives rows < m and col + 16 <= n of an m x n buffer.
            unsafe { _mm256_storeu_ps(dst.add((row + r) * n + col + h * 8), *s) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows<const R: usize>(_: At<'_>) {
    unreachable!("vnni::matmul runs SIMD only where Simd::runs_here holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows_avx2<const R: usize>(_: At<'_>) {
    unreachable!("vnni::matmul runs SIMD only where Simd::runs_here holds")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// The vector quantizer gives the plain one's blocks bit for bit: on
    /// noise, on exact halves (rounded away from zero), at the clamp, and
    /// on zeros, infinities and NaNs; and a prompt-sized input split over
    /// the thread pool equals its blocks done one by one.
    #[test]
    fn the_vector_quantizer_equals_the_plain_one() {
        let mut x: Vec<f32> = (0..4096u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 8_388_608.0 - 1.0) * 3.0)
            .collect();
        // Block 1: quants at exact halves (max 127 sets d = 1).
        let halves = [
            127.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            126.5,
            -126.5,
            0.49999997,
            -0.49999997,
        ];
        x[32..32 + halves.len()].copy_from_slice(&halves);
        // Block 2: zeros; block 3: an infinity; block 4: a NaN.
        x[64..96].fill(0.0);
        x[100] = f32::INFINITY;
        x[130] = f32::NAN;
        let mut want = vec![Act::ZERO; x.len() / BLOCK];
        quantize_portable(&x, &mut want, None);
        let same = |a: &[Act], b: &[Act]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| a.d.to_bits() == b.d.to_bits() && a.sum == b.sum && a.qs == b.qs)
        };
        assert_eq!(want[1].qs[..halves.len()], [127, 1, -1, 2, -2, 3, -3, 127, -127, 0, 0]);
        #[cfg(target_arch = "x86_64")]
        if Simd::best() != Simd::Portable {
            let mut got = vec![Act::ZERO; want.len()];
            // SAFETY: AVX2 checked just above.
            unsafe { quantize_avx2(&x, &mut got, None) };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    same(&[*g], &[*w]),
                    "block {i}: {:?} {} vs {:?} {}",
                    g.qs,
                    g.d,
                    w.qs,
                    w.d
                );
            }
        }
        let big: Vec<f32> = x.iter().cycle().take(x.len() * 40).copied().collect();
        let mut one_by_one = vec![Act::ZERO; big.len() / BLOCK];
        quantize_portable(&big, &mut one_by_one, None);
        assert!(same(&quantize(&big), &one_by_one));
        // Groups of 256 share the group's scale; the big input is 40 of
        // them, so both the threaded and the single-thread paths run.
        let grouped = quantize_grouped(&big, 256);
        for (g, (xs, acts)) in big.chunks(256).zip(grouped.chunks(8)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let mut want = vec![Act::ZERO; 8];
            quantize_portable(xs, &mut want, Some(amax));
            assert!(same(acts, &want), "group {g}");
            assert!(
                acts.iter().all(|a| a.d.to_bits() == (amax / 127.0).to_bits()),
                "group {g}"
            );
        }
        assert!(same(&quantize_grouped(&big, BLOCK), &one_by_one));
    }

    /// The same product through candle's own Q8_0 kernels and through ours,
    /// on every path this CPU runs. Widths are kept off multiples of 256,
    /// where candle itself switches to its VNNI path with coarser activation
    /// scales.
    #[test]
    fn matches_candle_on_odd_widths_and_row_counts() {
        let dev = Device::Cpu;
        for (n, k) in [(48, 576), (16, 32), (64, 896), (32, 1568)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("randn");
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantizes");
            let packed = Packed::from_q8_0(&qt.data().expect("data"), n, k).expect("packs");
            let reference = QMatMul::from_qtensor(qt).expect("qmatmul");
            for m in [1, 2, 3, 4, 5, 9] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("randn");
                let want = reference.forward(&x).expect("forward").flatten_all().expect("flat");
                let want: Vec<f32> = want.to_vec1().expect("vec");
                let xs: Vec<f32> = x.flatten_all().expect("flat").to_vec1().expect("vec");
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                for simd in Simd::here() {
                    let got = matmul_on(simd, &packed, &xs, m);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        // f16 vs f32 activation scales: ~1e-3 relative.
                        assert!(
                            (g - w).abs() <= 2e-3 * scale,
                            "{simd:?} {n}x{k} m={m} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Every path gives the portable path's numbers exactly, for every row
    /// count a tile column takes at once, and extreme quants on both sides.
    #[test]
    fn every_path_gives_the_same_numbers() {
        let dev = Device::Cpu;
        let (n, k) = (32, 576);
        let mut w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("randn");
        // Whole blocks of one sign reach quants of +-127 everywhere.
        let sign: Vec<f32> = (0..n * k).map(|i| if (i / 32) % 3 == 0 { 4.0 } else { 1.0 }).collect();
        w = (w.abs().expect("abs") * Tensor::from_vec(sign, (n, k), &dev).expect("t")).expect("mul");
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantizes");
        let packed = Packed::from_q8_0(&qt.data().expect("data"), n, k).expect("packs");
        for m in 1..=9 {
            let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)
                .expect("randn")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            // Blocks of -1 and +1 reach -127 and 127; zeros stay zero.
            for (i, v) in x.iter_mut().enumerate() {
                match (i / 32) % 5 {
                    1 => *v = -1.0,
                    2 => *v = 1.0,
                    3 => *v = 0.0,
                    _ => {}
                }
            }
            let slow = portable(&packed, &quantize(&x), m);
            for simd in Simd::here() {
                assert_eq!(slow, matmul_on(simd, &packed, &x, m), "{simd:?} m={m}");
            }
        }
    }

    /// A path this CPU lacks is never executed: asking for it gives the
    /// portable numbers.
    #[test]
    fn a_missing_instruction_set_falls_back() {
        assert!(Simd::Portable.runs_here());
        assert_eq!(Simd::best().or_portable(), Simd::best());
        for simd in [Simd::Avx2, Simd::Avx512Vnni] {
            if !simd.runs_here() {
                assert_eq!(simd.or_portable(), Simd::Portable);
            }
        }
    }

    #[test]
    fn refuses_shapes_and_data_that_do_not_fit() {
        assert!(
            Packed::from_q8_0(&[0; 34 * 18], 8, 576).is_none(),
            "8 rows is not a tile"
        );
        assert!(
            Packed::from_q8_0(&[0; 34 * 18 * 16], 16, 570).is_none(),
            "570 is not whole blocks"
        );
        assert!(
            Packed::from_q8_0(&[0; 34 * 18 * 16 - 1], 16, 576).is_none(),
            "short data"
        );
        assert!(Packed::from_q8_0(&[0; 34 * 18 * 16], 16, 576).is_some());
    }
}
