//! Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matrix products at (nearly)
//! their own width, for decoding and, without AMX, for prompts.
//!
//! Decoding one token reads every weight once and does little arithmetic
//! with it, so its speed is the memory's: bytes per weight are what count.
//! The default pool's files keep many matrices in these formats (SmolLM2 is
//! Q4_1 throughout, its output matrix included; Qwen and Gemma use Q5_0 for
//! many), and candle has only scalar code for them, so they used to be
//! re-encoded as Q8_0 at load: 8.5 bits per weight read at every step
//! instead of 5-6. This kernel multiplies them as stored:
//!
//! * Weights are repacked once into tiles of 16 output rows by one 32-value
//!   block, like [`crate::vnni`]'s: `[group of 4 inputs][row][input]`, so
//!   one 64-byte register holds 4 inputs of all 16 rows. The 4-bit quants of
//!   groups 0-3 sit in the low nibbles and those of groups 4-7 in the high
//!   nibbles of the same 256 bytes; a Q5 format's fifth bits are 64 more
//!   bytes, one bit per byte lane of a group (loaded as a mask and spread
//!   with `vpmovm2b`); the rows' block scale and offset stay f16, beside
//!   the tiles (5 bits per weight for Q4_1, 6 for Q5_x, against 8.5 for
//!   the Q8_0 copy).
//! * Every format is read as `w = d q + m` with `q` in 0..32: Q5_0's
//!   `d (q - 16)` is `m = -16 d`, exact in f16.
//! * Activations are quantized per 32 values as [`crate::vnni`] does (Q8_0
//!   with the quant sum); `vpdpbusd` multiplies the unsigned quants of the
//!   weights by the signed ones of the activations exactly, and each block
//!   adds `d_w d_x sum(q a) + m_w d_x sum(a)`, llama.cpp's arithmetic for
//!   these formats against Q8_1 activations.
//! * Up to four activation rows share every weight load, and tiles are
//!   spread over candle's thread pool. Without AVX-512 VNNI the same
//!   arithmetic runs on AVX2 (`vpmaddubsw`, 8 outputs per register), and
//!   without that in plain Rust ([`portable`]), all with the same results.
//! * Q4_K and Q5_K (Gemma's and the 1.5B monolith's files) are Q4_1 and
//!   Q5_1 blocks with extra steps: every 32-value sub-block of a
//!   256-value super-block has its own 6-bit scale and min under the
//!   super-block's two f16 factors. They are rewritten once, at packing,
//!   as those blocks, so they take the same tiles and paths; each block's
//!   scale and offset are made exactly in f32 from the file's factors as
//!   the kernel runs (see [`Format::Q4K`]), and activations are quantized
//!   per 256 as llama.cpp does for these formats ([`activations`]).
//! * Q6_K (the 1.5B's output matrix and some `ffn_down`) has a scale per
//!   16 values and 6-bit quants: each 32 values are one tile block with a
//!   second bit plane, and the kernels sum each half of a block apart and
//!   weigh the halves in integers, once per super-block in floats
//!   ([`Format::Q6K`]).
//! * On AVX2, a prompt's product (more than four rows) unpacks each tile
//!   column's quants to bytes once and runs every row group over them
//!   ([`predecoded_avx2`]): unpacking nibbles and fifth bits was a third
//!   of the instructions per row group, repeated for every group.

use crate::vnni::{self, Act, Simd, BLOCK, TILE};

/// The stored formats this kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `d q + m`, 4-bit `q`: 20 bytes per block (f16 d, f16 m, 16 bytes).
    Q4_1,
    /// `d (q - 16)`, 5-bit `q`: 22 bytes (f16 d, 4 bytes of fifth bits, 16).
    Q5_0,
    /// `d q + m`, 5-bit `q`: 24 bytes (f16 d, f16 m, 4, 16).
    Q5_1,
    /// GGML's Q4_K: super-blocks of 256 values in 144 bytes (f16 `d` and
    /// `dmin`, twelve bytes of 6-bit scales and mins for the eight 32-value
    /// sub-blocks, 128 bytes of nibbles), value `d sc q - dmin m`. Each
    /// sub-block is Q4_1's `d' q + m'` with `d' = d sc` and `m' = -dmin m`,
    /// both made exactly in f32 as the kernels run: a tile keeps each row's
    /// 6-bit `sc` and `m` where the other formats keep their f16 scale, and
    /// each row's `d` and `-dmin` sit beside the tiles, once per super-block
    /// ([`Packed`]'s `k_factors`). Not f16 products: a K-quant's offsets
    /// are large against its values (`m'` up to about 0.9 where weights are
    /// about 0.05 in Gemma-3-270M), and f16's rounding of them moved one of
    /// Gemma's next-token log-probs by 0.5 nats. 4.75 bits per weight read
    /// instead of 4.5 (no offsets are kept: they are made from `sc|m`).
    Q4K,
    /// GGML's Q5_K: as [`Format::Q4K`] with 32 bytes of fifth bits (176
    /// bytes per 256 values), each sub-block a Q5_1 block the same way.
    Q5K,
    /// GGML's Q6_K: super-blocks of 256 values in 210 bytes (128 bytes of
    /// low nibbles, 64 of high bit pairs, sixteen signed 8-bit scales, one
    /// f16 `d`), value `d sc (q - 32)` with 6-bit `q` and a scale `sc` per
    /// 16 values. Each 32 values become one tile block: the nibbles and a
    /// fifth-bit plane as Q5's, a sixth-bit plane beside them, and the
    /// block's two scales where the other formats keep their f16 scale;
    /// each row's `d` sits beside the tiles once per super-block. The
    /// kernels keep a separate integer sum for each half of a block (its
    /// low and high nibbles are inputs 0-15 and 16-31), subtract `32` times
    /// the activations' half sums, weigh the halves by their scales in
    /// integers and apply `d` once per super-block, as llama.cpp does
    /// against Q8_K activations. 6.75 bits per weight read for 6.5625
    /// stored; candle multiplied these in a loop per activation row (and
    /// one row as two, see `quant.rs`), so a decode step read them twice.
    Q6K,
}

/// Values in a K-quant super-block.
const SUPER: usize = 256;
/// 32-value blocks in a super-block.
const SUBS: usize = SUPER / BLOCK;

impl Format {
    /// Bytes of one 32-value block as the tiles are made from it: the
    /// file's own for Q4_1/Q5_x, and the Q4_1/Q5_1 block a K-quant's
    /// sub-block is rewritten as ([`k_quant_blocks`]).
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 | Format::Q4K => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 | Format::Q5K => 24,
            Format::Q6K => 28,
        }
    }

    /// Bytes of a K-quant's 256-value super-block; `None` for the others.
    fn super_bytes(self) -> Option<usize> {
        match self {
            Format::Q4K => Some(144),
            Format::Q5K => Some(176),
            Format::Q6K => Some(210),
            _ => None,
        }
    }

    /// Whether the quants have a fifth bit (a plane beside the nibbles).
    fn five(self) -> bool {
        !matches!(self, Format::Q4_1 | Format::Q4K)
    }

    /// Whether they have a sixth (Q6_K's second plane).
    fn six(self) -> bool {
        self == Format::Q6K
    }
}

/// Sub-block `j`'s 6-bit scale and min from a K-quant's twelve scale bytes
/// (GGML's packing: the first four of each in the low six bits of bytes
/// 0-3 and 4-7, the last four split between bytes 8-11 and the top bits
/// of bytes 0-7).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// A Q4_K/Q5_K matrix's super-blocks rewritten as the Q4_1/Q5_1 blocks of
/// their sub-blocks, in order (see [`Format::Q4K`]), with the sub-block's
/// `sc | m << 8` where those blocks keep their f16 scale (and 0 for the
/// offset); and each super-block's `(d, -dmin)`, in order. In a
/// super-block, sub-blocks `2c` and `2c + 1` share 32 bytes of quants (low
/// and high nibbles), and Q5_K's fifth bit of value `i` of sub-block `j`
/// is bit `j` of `qh[i]`.
fn k_quant_blocks(format: Format, bytes: &[u8], super_bytes: usize) -> (Vec<u8>, Vec<(f32, f32)>) {
    if format == Format::Q6K {
        return q6_k_blocks(bytes);
    }
    let five = format.five();
    let mut out = Vec::with_capacity(bytes.len() / super_bytes * SUBS * format.block_bytes());
    let mut factors = Vec::with_capacity(bytes.len() / super_bytes);
    for block in bytes.chunks_exact(super_bytes) {
        let f16_at = |i: usize| half::f16::from_bits(u16::from_le_bytes([block[i], block[i + 1]])).to_f32();
        let (d, dmin, scales) = (f16_at(0), f16_at(2), &block[4..16]);
        factors.push((d, -dmin));
        let (qh, qs) = if five {
            (&block[16..48], &block[48..176])
        } else {
            (&block[..0], &block[16..144])
        };
        for sub in 0..SUBS {
            let (sc, m) = scale_min(sub, scales);
            let chunk = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
            let q = |i: usize| if sub % 2 == 0 { chunk[i] & 0x0F } else { chunk[i] >> 4 };
            out.extend_from_slice(&[sc, m, 0, 0]);
            if five {
                let bits = (0..BLOCK).fold(0u32, |acc, i| acc | (u32::from((qh[i] >> sub) & 1) << i));
                out.extend_from_slice(&bits.to_le_bytes());
            }
            out.extend((0..16).map(|i| q(i) | (q(i + 16) << 4)));
        }
    }
    (out, factors)
}

/// A Q6_K matrix's super-blocks as 28-byte blocks of 32 values, in order:
/// the two 16-value scales (as bytes), two zero bytes, the fifth and the
/// sixth bits of the 32 quants (bit `i` for value `i`, four bytes each)
/// and their nibbles as GGML's other formats keep them (byte `i` holds
/// values `i` and `i + 16`); and each super-block's `(d, 0)`. GGML's
/// layout: a super-block is two halves of 128 values; value `32 j + l` of
/// half `n` (`j` < 4, `l` < 32) has its low four bits in the low (`j` < 2)
/// or high nibble of `ql[64 n + 32 (j % 2) + l]`, its top two in bits
/// `2 j, 2 j + 1` of `qh[32 n + l]`, and its scale is `scales[v / 16]`.
fn q6_k_blocks(bytes: &[u8]) -> (Vec<u8>, Vec<(f32, f32)>) {
    let mut out = Vec::with_capacity(bytes.len() / 210 * SUBS * Format::Q6K.block_bytes());
    let mut factors = Vec::with_capacity(bytes.len() / 210);
    for block in bytes.chunks_exact(210) {
        let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
        let d = half::f16::from_bits(u16::from_le_bytes([block[208], block[209]])).to_f32();
        factors.push((d, 0.0));
        let quant = |v: usize| {
            let (n, j, l) = (v / 128, (v % 128) / 32, v % 32);
            let byte = ql[64 * n + 32 * (j % 2) + l];
            let low = if j < 2 { byte & 0x0F } else { byte >> 4 };
            low | (((qh[32 * n + l] >> (2 * j)) & 3) << 4)
        };
        for sub in 0..SUBS {
            let q: [u8; BLOCK] = std::array::from_fn(|i| quant(sub * BLOCK + i));
            let plane = |bit: u8| (0..BLOCK).fold(0u32, |acc, i| acc | (u32::from((q[i] >> bit) & 1) << i));
            out.extend_from_slice(&[scales[2 * sub], scales[2 * sub + 1], 0, 0]);
            out.extend_from_slice(&plane(4).to_le_bytes());
            out.extend_from_slice(&plane(5).to_le_bytes());
            out.extend((0..16).map(|i| (q[i] & 0x0F) | (q[i + 16] << 4)));
        }
    }
    (out, factors)
}

/// The nibbles of one 32-input block of 16 output rows (256 bytes, four
/// cache lines): `[group 0-3][row][input in group]`, low nibble the quant
/// of that input, high nibble that of the same place in group `+ 4`.
#[repr(C, align(64))]
#[derive(Clone)]
pub(crate) struct Tile {
    lo: [u8; 256],
}

/// One block of `format` as the tiles are made from it: its scale and
/// offset (f16 bits; a K-quant's 8-bit scales), its fifth and sixth bits
/// (0 where the format has none) and its 16 bytes of nibbles.
fn block_parts(format: Format, block: &[u8]) -> (u16, u16, u32, u32, &[u8]) {
    let d = u16::from_le_bytes([block[0], block[1]]);
    let word = |i: usize| u32::from_le_bytes([block[i], block[i + 1], block[i + 2], block[i + 3]]);
    match format {
        Format::Q4_1 | Format::Q4K => (d, u16::from_le_bytes([block[2], block[3]]), 0, 0, &block[4..20]),
        Format::Q5_0 => (d, minus_16_times(d), word(2), 0, &block[6..22]),
        Format::Q5_1 | Format::Q5K => (d, u16::from_le_bytes([block[2], block[3]]), word(4), 0, &block[8..24]),
        Format::Q6K => (d, 0, word(4), word(8), &block[12..28]),
    }
}

/// Q5_0's offset, `-16 d`, as f16 bits: exact, since 16 is a power of two.
/// For a normal `d` whose exponent has room that is the sign flipped and
/// the exponent raised by 4; zero, subnormals and values near the top of
/// the range go through f32 (the f16 rounding of the exact product).
fn minus_16_times(d: u16) -> u16 {
    let exponent = (d >> 10) & 0x1F;
    if (1..=26).contains(&exponent) {
        (d ^ 0x8000) + (4 << 10)
    } else {
        half::f16::from_f32(-16.0 * half::f16::from_bits(d).to_f32()).to_bits()
    }
}

/// A Q4_1/Q5_0/Q5_1 weight matrix (`n` rows of `k` inputs) repacked for
/// [`matmul`].
pub struct Packed {
    n: usize,
    k: usize,
    format: Format,
    /// `[tile (n / 16)][block (k / 32)]`.
    tiles: Vec<Tile>,
    /// Per tile-block, each row's block scale (f16 bits; a K-quant's
    /// 8-bit scales, see `k_factors`). Beside the tiles rather than in
    /// them so that a format without `offsets` reads no bytes for them.
    scales: Vec<[u16; TILE]>,
    /// Per tile-block, each row's block offset (f16 bits). Empty for the
    /// K-quants, whose offsets are made from `scales` and `k_factors`.
    offsets: Vec<[u16; TILE]>,
    /// Q5 formats: per tile, per group of 4 inputs, bit `row * 4 + input`
    /// is the fifth bit of that quant. Empty for Q4_1.
    fifth: Vec<[u64; 8]>,
    /// Q6_K: the sixth bits, laid out as `fifth`. Empty for the others.
    sixth: Vec<[u64; 8]>,
    /// K-quants: per tile, per super-block (`[tile][k / 256]`), the 16
    /// rows' `d` then their `-dmin`; the tiles' `d` hold each row's
    /// `sc | m << 8` in `scales` (see [`Format::Q4K`]). Q6_K holds the
    /// two signed scales of the block's halves there, and its factors'
    /// second half is zero. Empty for the other formats.
    k_factors: Vec<[f32; 2 * TILE]>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lowbit::Packed({:?}, {}x{})", self.format, self.n, self.k)
    }
}

impl Packed {
    /// Repacks GGML data of `format` (`n * k / 32` blocks, or `n * k / 256`
    /// super-blocks for the K-quants, row-major) into tiles. `None` if the
    /// shape does not fit the tiles ([`vnni::fits`], and a width of whole
    /// super-blocks for the K-quants) or the data is not that many blocks.
    pub fn new(format: Format, bytes: &[u8], n: usize, k: usize) -> Option<Packed> {
        let (rewritten, factors);
        let bytes = match format.super_bytes() {
            Some(sb) => {
                if !k.is_multiple_of(SUPER) || bytes.len() != n * (k / SUPER) * sb {
                    return None;
                }
                (rewritten, factors) = k_quant_blocks(format, bytes, sb);
                &rewritten[..]
            }
            None => {
                factors = Vec::new();
                bytes
            }
        };
        let (bb, kb) = (format.block_bytes(), k / BLOCK);
        if !vnni::fits(n, k) || bytes.len() != n * kb * bb {
            return None;
        }
        let mut tiles = Vec::with_capacity(n / TILE * kb);
        let mut scales = Vec::with_capacity(n / TILE * kb);
        let k_quant = format.super_bytes().is_some();
        let mut offsets = Vec::with_capacity(if k_quant { 0 } else { n / TILE * kb });
        let mut fifth = Vec::with_capacity(if format.five() { n / TILE * kb } else { 0 });
        let mut sixth = Vec::with_capacity(if format.six() { n / TILE * kb } else { 0 });
        let mut k_factors = Vec::with_capacity(if factors.is_empty() { 0 } else { n / TILE * kb / SUBS });
        for t in 0..n / TILE {
            for b in 0..kb {
                let mut tile = Tile { lo: [0; 256] };
                let (mut d_rows, mut m_rows) = ([0u16; TILE], [0u16; TILE]);
                let (mut bits, mut bits6) = ([0u64; 8], [0u64; 8]);
                for r in 0..TILE {
                    let at = ((t * TILE + r) * kb + b) * bb;
                    let (d, m, qh, qh6, qs) = block_parts(format, &bytes[at..at + bb]);
                    (d_rows[r], m_rows[r]) = (d, m);
                    // GGML: byte j holds input j (low nibble) and input
                    // j + 16 (high nibble), and the tile's byte for input j
                    // of a row holds the same two nibbles: group j / 4 in
                    // its low half, group j / 4 + 4 in its high half, at the
                    // same place. So the quants move four bytes at a time.
                    for g in 0..4 {
                        let to = (g * TILE + r) * 4;
                        tile.lo[to..to + 4].copy_from_slice(&qs[g * 4..g * 4 + 4]);
                    }
                    // Bit i of qh is input i's fifth; group g's four lanes
                    // go to bits 4r..4r + 4 of its word.
                    for (g, (five, six)) in bits.iter_mut().zip(&mut bits6).enumerate() {
                        *five |= u64::from((qh >> (g * 4)) & 0xF) << (r * 4);
                        *six |= u64::from((qh6 >> (g * 4)) & 0xF) << (r * 4);
                    }
                }
                tiles.push(tile);
                scales.push(d_rows);
                if !k_quant {
                    offsets.push(m_rows);
                }
                if format.five() {
                    fifth.push(bits);
                }
                if format.six() {
                    sixth.push(bits6);
                }
                if !factors.is_empty() && b.is_multiple_of(SUBS) {
                    let mut both = [0f32; 2 * TILE];
                    for r in 0..TILE {
                        (both[r], both[TILE + r]) = factors[((t * TILE + r) * kb + b) / SUBS];
                    }
                    k_factors.push(both);
                }
            }
        }
        Some(Packed {
            n,
            k,
            format,
            tiles,
            scales,
            offsets,
            fifth,
            sixth,
            k_factors,
        })
    }

    /// Output width (rows of the weight matrix).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The stored format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes the packed weights take (what a decode step reads).
    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
            + (self.scales.len() + self.offsets.len()) * std::mem::size_of::<[u16; TILE]>()
            + (self.fifth.len() + self.sixth.len()) * 64
            + self.k_factors.len() * std::mem::size_of::<[f32; 2 * TILE]>()
    }

    /// A K-quant's `d` and `-dmin` of every row of tile `t` for its block
    /// `b`; `None` for the other formats. (Taken as `t` and `b`, not as
    /// their tile-block: dividing that by the width in the kernels' inner
    /// loop cost a third of a prompt's speed.)
    #[inline]
    fn k_factors(&self, t: usize, b: usize) -> Option<&[f32; 2 * TILE]> {
        self.k_factors.get(t * (self.k / SUPER) + b / SUBS)
    }

    /// Row `r`'s scale and offset in tile-block `tb`, as the kernels make
    /// them.
    fn scale(&self, tb: usize, r: usize) -> (f32, f32) {
        let kb = self.k / BLOCK;
        match self.k_factors(tb / kb, tb % kb) {
            Some(f) => {
                let [sc, m] = self.scales[tb][r].to_le_bytes();
                (f[r] * f32::from(sc), f[TILE + r] * f32::from(m))
            }
            None => (
                half::f16::from_bits(self.scales[tb][r]).to_f32(),
                half::f16::from_bits(self.offsets[tb][r]).to_f32(),
            ),
        }
    }

    /// Quant `i` (0..32) of row `r` of tile `t`, block `b`.
    fn quant(&self, tb: usize, r: usize, i: usize) -> u8 {
        let (group, lane) = (i / 4, i % 4);
        let byte = self.tiles[tb].lo[((group % 4) * TILE + r) * 4 + lane];
        let low = if group < 4 { byte & 0x0F } else { byte >> 4 };
        let bit = |plane: &[[u64; 8]]| match plane.get(tb) {
            Some(bits) => ((bits[group] >> (r * 4 + lane)) & 1) as u8,
            None => 0,
        };
        low | bit(&self.fifth) << 4 | bit(&self.sixth) << 5
    }

    /// Q6_K: row `r`'s signed scales of the two halves of tile-block `tb`.
    fn half_scales(&self, tb: usize, r: usize) -> (i32, i32) {
        let [lo, hi] = self.scales[tb][r].to_le_bytes();
        (i32::from(lo as i8), i32::from(hi as i8))
    }
}

/// `x (m x k) -> x W^T (m x n)`, row-major, on the best [`Simd`] this CPU
/// has. On a CPU with neither AVX-512 VNNI nor AVX2 the same arithmetic
/// runs in plain Rust, slowly but with the same results, so calling it is
/// always sound.
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
    assert_eq!(x.len(), m * w.k, "lowbit::matmul: expected {m} rows of {} values", w.k);
    let acts = activations(w.format, x);
    let halves = match w.format {
        Format::Q6K => half_sums(&acts),
        _ => Vec::new(),
    };
    let simd = simd.or_portable();
    if simd == Simd::Portable {
        return match w.format {
            Format::Q6K => portable_q6(w, &acts, &halves, m),
            _ => portable(w, &acts, m),
        };
    }
    let (kb, acts, halves) = (w.k / BLOCK, &acts, &halves[..]);
    if simd == Simd::Avx2 && m > PREDECODE_ROWS && w.format != Format::Q6K {
        return predecoded_avx2(w, acts, m);
    }
    if simd == Simd::Avx512Vnni && m > PREDECODE_ROWS && w.format == Format::Q6K {
        return predecoded_q6(w, acts, halves, m);
    }
    vnni::by_tiles(m, w.n, |t, row, take, dst| {
        let at = Rows {
            w,
            acts,
            halves,
            unpacked: &[],
            kb,
            t,
            row,
            dst,
        };
        if w.format == Format::Q6K {
            // SAFETY: as below.
            unsafe {
                match (simd, take) {
                    (Simd::Avx512Vnni, 4) => at.run_q6::<4, false>(),
                    (Simd::Avx512Vnni, 3) => at.run_q6::<3, false>(),
                    (Simd::Avx512Vnni, 2) => at.run_q6::<2, false>(),
                    (Simd::Avx512Vnni, _) => at.run_q6::<1, false>(),
                    (_, 4) => at.run_q6_avx2::<4>(),
                    (_, 3) => at.run_q6_avx2::<3>(),
                    (_, 2) => at.run_q6_avx2::<2>(),
                    (_, _) => at.run_q6_avx2::<1>(),
                }
            }
            return;
        }
        // SAFETY: `or_portable` left only a set this CPU has; `by_tiles`
        // gives rows < m and this tile's columns of its m x n output.
        unsafe {
            match (simd, take, w.format.five()) {
                (Simd::Avx512Vnni, 4, false) => at.run::<4, false>(),
                (Simd::Avx512Vnni, 3, false) => at.run::<3, false>(),
                (Simd::Avx512Vnni, 2, false) => at.run::<2, false>(),
                (Simd::Avx512Vnni, _, false) => at.run::<1, false>(),
                (Simd::Avx512Vnni, 4, true) => at.run::<4, true>(),
                (Simd::Avx512Vnni, 3, true) => at.run::<3, true>(),
                (Simd::Avx512Vnni, 2, true) => at.run::<2, true>(),
                (Simd::Avx512Vnni, _, true) => at.run::<1, true>(),
                (_, 4, false) => at.run_avx2::<4, false>(),
                (_, 3, false) => at.run_avx2::<3, false>(),
                (_, 2, false) => at.run_avx2::<2, false>(),
                (_, _, false) => at.run_avx2::<1, false>(),
                (_, 4, true) => at.run_avx2::<4, true>(),
                (_, 3, true) => at.run_avx2::<3, true>(),
                (_, 2, true) => at.run_avx2::<2, true>(),
                (_, _, true) => at.run_avx2::<1, true>(),
            }
        }
    })
}

/// `x` quantized as llama.cpp quantizes what it multiplies `format` by:
/// per 32 values (Q8_0/Q8_1) for Q4_1/Q5_x, per 256 (Q8_K) for the
/// K-quants ([`vnni::quantize_grouped`]).
pub(crate) fn activations(format: Format, x: &[f32]) -> Vec<Act> {
    match format.super_bytes() {
        Some(_) => vnni::quantize_grouped(x, SUPER),
        None => vnni::quantize(x),
    }
}

/// Q6_K: each activation block's sums over its two halves (inputs 0-15
/// and 16-31) times 32, what the weights' `- 32` takes off a half's
/// product (kept multiplied so that the kernels broadcast it from memory).
fn half_sums(acts: &[Act]) -> Vec<[i32; 2]> {
    let sum = |qs: &[i8]| 32 * qs.iter().map(|&q| i32::from(q)).sum::<i32>();
    acts.iter().map(|a| [sum(&a.qs[..16]), sum(&a.qs[16..])]).collect()
}

/// Q6_K's quants of group `g` (low nibbles: inputs `4g..4g + 4`) and `g +
/// 4` (high nibbles) of tile-block `tb` as bytes of 16 rows: the nibbles,
/// plus 16 and 32 under the fifth- and sixth-bit masks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn q6_quants(
    w: &Packed,
    tb: usize,
    g: usize,
    (nibble, bit4, bit5): (
        std::arch::x86_64::__m512i,
        std::arch::x86_64::__m512i,
        std::arch::x86_64::__m512i,
    ),
) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
    use std::arch::x86_64::*;
    let (five, six) = (&w.fifth[tb], &w.sixth[tb]);
    // SAFETY: `lo` holds 4 groups of 64 bytes.
    let raw = unsafe { _mm512_loadu_si512(w.tiles[tb].lo.as_ptr().add(g * 64) as *const _) };
    let low = _mm512_and_si512(raw, nibble);
    let low = _mm512_mask_add_epi8(low, five[g], low, bit4);
    let low = _mm512_mask_add_epi8(low, six[g], low, bit5);
    let high = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble);
    let high = _mm512_mask_add_epi8(high, five[g + 4], high, bit4);
    let high = _mm512_mask_add_epi8(high, six[g + 4], high, bit5);
    (low, high)
}

/// Tile column `t`'s Q6_K quants as bytes, two tiles per block: the four
/// low registers [`q6_quants`] makes, then the four high ones.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_q6(w: &Packed, t: usize, into: &mut [Tile]) {
    use std::arch::x86_64::*;
    let kb = w.k / BLOCK;
    let consts = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10), _mm512_set1_epi8(0x20));
    for b in 0..kb {
        for g in 0..4 {
            let (low, high) = q6_quants(w, t * kb + b, g, consts);
            // SAFETY: `into` holds two 64-byte-aligned tiles per block.
            unsafe {
                _mm512_store_si512(into[2 * b].lo.as_mut_ptr().add(g * 64) as *mut _, low);
                _mm512_store_si512(into[2 * b + 1].lo.as_mut_ptr().add(g * 64) as *mut _, high);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn unpack_q6(_: &Packed, _: usize, _: &mut [Tile]) {
    unreachable!("lowbit::matmul runs SIMD only where Simd::runs_here holds")
}

/// Q6_K prompts on AVX-512: each worker unpacks a tile column's quants
/// once ([`unpack_q6`], `k` bytes per 16 outputs) and runs every 4-row
/// group over them ([`Rows::run_q6`] reading bytes): unpacking six-bit
/// quants is a third of the kernel's instructions per row group, which a
/// prompt's many groups would otherwise repeat. The same sums in the same
/// order, so the same numbers.
fn predecoded_q6(w: &Packed, acts: &[Act], halves: &[[i32; 2]], m: usize) -> Vec<f32> {
    let kb = w.k / BLOCK;
    let mut out = vec![0f32; m * w.n];
    let out_at = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(w.n / TILE, |range| {
        let mut unpacked = vec![Tile { lo: [0; 256] }; 2 * kb];
        for t in range {
            // SAFETY: only called where `Simd::Avx512Vnni` runs here; the
            // buffer holds two tiles per block.
            unsafe { unpack_q6(w, t, &mut unpacked) };
            let mut row = 0;
            while row < m {
                let take = (m - row).min(4);
                let at = Rows {
                    w,
                    acts,
                    halves,
                    unpacked: &unpacked,
                    kb,
                    t,
                    row,
                    // `out` outlives the pool call; tile columns are the
                    // workers' own.
                    dst: out_at as *mut f32,
                };
                // SAFETY: as above; rows < m and this tile's columns.
                unsafe {
                    match take {
                        4 => at.run_q6::<4, true>(),
                        3 => at.run_q6::<3, true>(),
                        2 => at.run_q6::<2, true>(),
                        _ => at.run_q6::<1, true>(),
                    }
                }
                row += take;
            }
        }
    });
    out
}

/// Above this many rows the AVX2 path unpacks each tile column's quants
/// once into bytes and reuses them for every row group ([`predecoded_avx2`]);
/// at or below it (decoding) every row group unpacks its own, which costs
/// nothing extra for one group and keeps the weights' 5-6 bits the only
/// bytes read.
const PREDECODE_ROWS: usize = 4;

/// Bytes of one block of one tile column, unpacked: 32 quants of 16 rows.
const UNPACKED: usize = BLOCK * TILE;

/// The AVX2 product for prompts. Unpacking the quants (nibbles, fifth bits)
/// is a third of [`Rows::run_avx2`]'s instructions per row group for the
/// Q5 formats; a prompt's many row groups share it here instead. Each
/// worker unpacks one tile column at a time into a buffer of `k / 2` bytes
/// per 16 outputs (L1 or L2-sized for the default pool's widths), in the
/// order [`Rows::run_avx2`] reads its registers, then runs every row group
/// over it with the same integer sums and the same float operations in the
/// same order, so the numbers are those of every other path.
fn predecoded_avx2(w: &Packed, acts: &[Act], m: usize) -> Vec<f32> {
    let kb = w.k / BLOCK;
    let mut out = vec![0f32; m * w.n];
    let out_at = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(w.n / TILE, |range| {
        let mut unpacked = vec![0u8; kb * UNPACKED];
        for t in range {
            // SAFETY: only called where `Simd::Avx2` runs here; the buffer
            // holds `kb` unpacked blocks.
            unsafe { unpack_avx2(w, t, &mut unpacked) };
            let mut row = 0;
            while row < m {
                let take = (m - row).min(4);
                let at = Unpacked {
                    w,
                    acts,
                    kb,
                    t,
                    row,
                    q: &unpacked,
                    // `out` outlives the pool call; tile columns are the
                    // workers' own.
                    dst: out_at as *mut f32,
                };
                // SAFETY: as above; rows < m and this tile's columns.
                unsafe {
                    match take {
                        4 => at.run::<4>(),
                        3 => at.run::<3>(),
                        2 => at.run::<2>(),
                        _ => at.run::<1>(),
                    }
                }
                row += take;
            }
        }
    });
    out
}

/// What both AVX2 paths need to unpack quants to bytes, made once per call
/// (the decode kernel per row group, prompts once per tile column) so that
/// no loop builds its constants again.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Unpack {
    nibble: std::arch::x86_64::__m256i,
    bit4: std::arch::x86_64::__m256i,
    /// Q6_K's sixth bit, 32 in every byte.
    bit5: std::arch::x86_64::__m256i,
    /// Byte i of a half takes byte i / 8 of a fifth-bit mask...
    spread: std::arch::x86_64::__m256i,
    /// ...then its bit i % 8.
    select: std::arch::x86_64::__m256i,
}

#[cfg(target_arch = "x86_64")]
impl Unpack {
    #[target_feature(enable = "avx2")]
    fn new() -> Unpack {
        use std::arch::x86_64::*;
        Unpack {
            nibble: _mm256_set1_epi8(0x0F),
            bit4: _mm256_set1_epi8(0x10),
            bit5: _mm256_set1_epi8(0x20),
            spread: _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            ),
            select: _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64),
        }
    }

    /// Quants of tile-block `tb` as bytes: group `g`'s (low nibbles) and
    /// group `g + 4`'s (high nibbles) for outputs `8h..8h + 8`, with the Q5
    /// formats' fifth bits (`five`) spread from a 32-bit mask to 32 bytes
    /// by a byte shuffle and a compare against each byte's bit.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn quants(
        &self,
        w: &Packed,
        tb: usize,
        g: usize,
        h: usize,
        five: bool,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        // SAFETY: `lo` holds 4 groups of 64 bytes: outputs 0-7, then 8-15.
        let raw = unsafe { _mm256_loadu_si256(w.tiles[tb].lo.as_ptr().add(g * 64 + h * 32) as *const _) };
        let low = _mm256_and_si256(raw, self.nibble);
        let high = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), self.nibble);
        if !five {
            return (low, high);
        }
        self.add_plane((low, high), &w.fifth[tb], g, h, self.bit4)
    }

    /// `(low, high)` with a bit plane's bits of groups `g` and `g + 4`
    /// (outputs `8h..8h + 8`) set as `bit` in their bytes: each 32-bit
    /// mask spread to 32 bytes by a byte shuffle and a compare against
    /// each byte's bit.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn add_plane(
        &self,
        (low, high): (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i),
        plane: &[u64; 8],
        g: usize,
        h: usize,
        bit: std::arch::x86_64::__m256i,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        let spread = |mask: u64| {
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(mask as u32 as i32), self.spread);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, self.select), self.select);
            _mm256_and_si256(set, bit)
        };
        (
            _mm256_or_si256(low, spread(plane[g] >> (32 * h))),
            _mm256_or_si256(high, spread(plane[g + 4] >> (32 * h))),
        )
    }

    /// [`Unpack::quants`] for Q6_K: with the fifth bits and the sixth.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn quants6(
        &self,
        w: &Packed,
        tb: usize,
        g: usize,
        h: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        self.add_plane(self.quants(w, tb, g, h, true), &w.sixth[tb], g, h, self.bit5)
    }
}

/// Outputs `8h..8h + 8`'s block scales and offsets in tile `t`, block `b`,
/// as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn scales_avx2(w: &Packed, t: usize, b: usize, h: usize) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let tb = t * (w.k / BLOCK) + b;
    let d = &w.scales[tb];
    if let Some(f) = w.k_factors(t, b) {
        // SAFETY: `d` holds 16 u16 (`sc | m << 8`), 8 of them from `8h`;
        // `f` 16 `d` then 16 `-dmin`.
        return unsafe {
            let both = _mm256_cvtepu16_epi32(_mm_loadu_si128(d.as_ptr().add(h * 8) as *const _));
            let sc = _mm256_cvtepi32_ps(_mm256_and_si256(both, _mm256_set1_epi32(0xFF)));
            let m = _mm256_cvtepi32_ps(_mm256_srli_epi32::<8>(both));
            (
                _mm256_mul_ps(_mm256_loadu_ps(f.as_ptr().add(h * 8)), sc),
                _mm256_mul_ps(_mm256_loadu_ps(f.as_ptr().add(TILE + h * 8)), m),
            )
        };
    }
    // SAFETY: `d` and `m` hold 16 f16 each; 8 of them are 16 bytes.
    unsafe {
        (
            _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(h * 8) as *const _)),
            _mm256_cvtph_ps(_mm_loadu_si128(w.offsets[tb].as_ptr().add(h * 8) as *const _)),
        )
    }
}

/// `sum` plus one block of activation row `a` against eight outputs: the
/// exact integer sums `acc` times both scales (`dw`), then the offsets
/// (`mw`) times the row's scaled quant sum, as [`portable`] adds them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn add_block_avx2(
    sum: std::arch::x86_64::__m256,
    acc: std::arch::x86_64::__m256i,
    (dw, mw): (std::arch::x86_64::__m256, std::arch::x86_64::__m256),
    a: &Act,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
    let sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, sum);
    _mm256_fmadd_ps(mw, _mm256_set1_ps(a.d * a.sum as f32), sum)
}

/// `acc` plus the exact sums of quant registers `q` (groups `pair`,
/// `pair + 4`, `pair + 1`, `pair + 5`) times activation row `a`'s quants of
/// the same groups, broadcast: four `vpmaddubsw` added in 16 bits (quants
/// below 32 cannot overflow there), then one `vpmaddwd` by ones widens
/// them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn dot4_avx2(
    acc: std::arch::x86_64::__m256i,
    q: &[std::arch::x86_64::__m256i; 4],
    a: &[i8; BLOCK],
    pair: usize,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: g < 8, so g * 4 + 4 <= 32; 4 quants read as one lane.
    let act = |g: usize| _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(a.as_ptr().add(g * 4) as *const i32) });
    let s = _mm256_add_epi16(
        _mm256_add_epi16(
            _mm256_maddubs_epi16(q[0], act(pair)),
            _mm256_maddubs_epi16(q[1], act(pair + 4)),
        ),
        _mm256_add_epi16(
            _mm256_maddubs_epi16(q[2], act(pair + 1)),
            _mm256_maddubs_epi16(q[3], act(pair + 5)),
        ),
    );
    _mm256_add_epi32(acc, _mm256_madd_epi16(s, _mm256_set1_epi16(1)))
}

/// Tile column `t`'s quants as bytes: per block, per half of the outputs
/// (`h`), per pair of groups, the four registers [`Rows::run_avx2`] builds
/// (groups `pair`, `pair + 4`, `pair + 1`, `pair + 5`: the order its sums
/// use them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_avx2(w: &Packed, t: usize, into: &mut [u8]) {
    use std::arch::x86_64::*;
    let kb = w.k / BLOCK;
    let five = w.format.five();
    let unpack = Unpack::new();
    for b in 0..kb {
        let tb = t * kb + b;
        let mut at = b * UNPACKED;
        for h in 0..2 {
            for pair in [0, 2] {
                for g in [pair, pair + 1] {
                    let (low, high) = unpack.quants(w, tb, g, h, five);
                    // SAFETY: `at + 64 <= (b + 1) * UNPACKED <= into.len()`.
                    unsafe {
                        _mm256_storeu_si256(into.as_mut_ptr().add(at) as *mut _, low);
                        _mm256_storeu_si256(into.as_mut_ptr().add(at + 32) as *mut _, high);
                    }
                    at += 64;
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn unpack_avx2(_: &Packed, _: usize, _: &mut [u8]) {
    unreachable!("lowbit::matmul runs SIMD only where Simd::runs_here holds")
}

/// Up to four activation rows from `row` against tile column `t`, its
/// quants already unpacked into `q` ([`unpack_avx2`]).
struct Unpacked<'a> {
    w: &'a Packed,
    acts: &'a [Act],
    kb: usize,
    t: usize,
    row: usize,
    q: &'a [u8],
    dst: *mut f32,
}

impl Unpacked<'_> {
    /// [`Rows::run_avx2`] over unpacked quants: the same sums in the same
    /// order. Writes `dst[(row + r) * n + 16 t .. + 16]`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let (w, kb) = (self.w, self.kb);
        for h in 0..2 {
            let mut sums = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                let mut acc = [_mm256_setzero_si256(); R];
                for (p, pair) in [0, 2].into_iter().enumerate() {
                    // SAFETY: block b's unpacked bytes are
                    // `b * UNPACKED .. + UNPACKED`; half h, pair p take 128.
                    let q = unsafe {
                        let at = self.q.as_ptr().add(b * UNPACKED + h * 256 + p * 128);
                        [0, 1, 2, 3].map(|i| _mm256_loadu_si256(at.add(32 * i) as *const _))
                    };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = dot4_avx2(*acc, &q, &self.acts[(self.row + r) * kb + b].qs, pair);
                    }
                }
                let scales = scales_avx2(w, self.t, b, h);
                for (r, acc) in acc.iter().enumerate() {
                    sums[r] = add_block_avx2(sums[r], *acc, scales, &self.acts[(self.row + r) * kb + b]);
                }
            }
            for (r, s) in sums.iter().enumerate() {
                // SAFETY: the caller gives rows < m and 16 t + 16 <= n of an
                // m x n buffer.
                unsafe { _mm256_storeu_ps(self.dst.add((self.row + r) * w.n + self.t * TILE + h * 8), *s) };
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run<const R: usize>(&self) {
        unreachable!("lowbit::matmul runs SIMD only where Simd::runs_here holds")
    }
}

/// The kernel's arithmetic without SIMD: exact integer block sums, then the
/// same fused multiply-adds in the same order, so the results are identical.
pub(crate) fn portable(w: &Packed, acts: &[Act], m: usize) -> Vec<f32> {
    let kb = w.k / BLOCK;
    let mut out = vec![0f32; m * w.n];
    for (i, row) in out.chunks_exact_mut(w.n).enumerate() {
        for (t, cols) in row.chunks_exact_mut(TILE).enumerate() {
            for b in 0..kb {
                let tb = t * kb + b;
                let a = &acts[i * kb + b];
                for (r, y) in cols.iter_mut().enumerate() {
                    let dot: i32 = (0..BLOCK).map(|j| w.quant(tb, r, j) as i32 * a.qs[j] as i32).sum();
                    let (d, m) = w.scale(tb, r);
                    *y = (dot as f32).mul_add(d * a.d, *y);
                    *y = m.mul_add(a.d * a.sum as f32, *y);
                }
            }
        }
    }
    out
}

/// Q6_K's arithmetic without SIMD (see [`Format::Q6K`]): per super-block
/// an exact integer sum, each half of each block weighed by its scale,
/// then one fused multiply-add by the row's `d` times the activations'
/// scale; the SIMD paths make the same sums and the same float operations.
pub(crate) fn portable_q6(w: &Packed, acts: &[Act], halves: &[[i32; 2]], m: usize) -> Vec<f32> {
    let kb = w.k / BLOCK;
    let mut out = vec![0f32; m * w.n];
    for (i, row) in out.chunks_exact_mut(w.n).enumerate() {
        for (t, cols) in row.chunks_exact_mut(TILE).enumerate() {
            for (r, y) in cols.iter_mut().enumerate() {
                for s in (0..kb).step_by(SUBS) {
                    let mut sum = 0i32;
                    for b in s..s + SUBS {
                        let (tb, a, [h0, h1]) = (t * kb + b, &acts[i * kb + b], halves[i * kb + b]);
                        let dot = |js: std::ops::Range<usize>| -> i32 {
                            js.map(|j| i32::from(w.quant(tb, r, j)) * i32::from(a.qs[j])).sum()
                        };
                        let (s0, s1) = w.half_scales(tb, r);
                        sum += s0 * (dot(0..16) - h0) + s1 * (dot(16..32) - h1);
                    }
                    let d = w.k_factors(t, s).map_or(0.0, |f| f[r]);
                    *y = (sum as f32).mul_add(d * acts[i * kb + s].d, *y);
                }
            }
        }
    }
    out
}

/// Up to four activation rows from `row` against tile column `t`.
struct Rows<'a> {
    w: &'a Packed,
    acts: &'a [Act],
    /// Q6_K: [`half_sums`] of `acts`; empty for the other formats.
    halves: &'a [[i32; 2]],
    /// Q6_K prompts on AVX-512: tile column `t`'s quants as bytes, two
    /// tiles per block (its low then its high registers; [`unpack_q6`]);
    /// empty where [`Rows::run_q6`] unpacks them itself.
    unpacked: &'a [Tile],
    kb: usize,
    t: usize,
    row: usize,
    dst: *mut f32,
}

impl Rows<'_> {
    /// `R` rows; `FIVE` for the Q5 formats. Writes
    /// `dst[(row + r) * n + 16 t .. + 16]`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run<const R: usize, const FIVE: bool>(&self) {
        use std::arch::x86_64::*;
        let (w, kb) = (self.w, self.kb);
        let nibble = _mm512_set1_epi8(0x0F);
        let bit4 = _mm512_set1_epi8(0x10);
        let mut sums = [_mm512_setzero_ps(); R];
        for b in 0..kb {
            let tb = self.t * kb + b;
            let tile = &w.tiles[tb];
            let mut acc = [_mm512_setzero_si512(); R];
            for g in 0..4 {
                // SAFETY: `lo` holds 4 groups of 64 bytes.
                let raw = unsafe { _mm512_loadu_si512(tile.lo.as_ptr().add(g * 64) as *const _) };
                let mut low = _mm512_and_si512(raw, nibble);
                let mut high = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble);
                if FIVE {
                    let bits = &w.fifth[tb];
                    low = _mm512_or_si512(low, _mm512_and_si512(_mm512_movm_epi8(bits[g]), bit4));
                    high = _mm512_or_si512(high, _mm512_and_si512(_mm512_movm_epi8(bits[g + 4]), bit4));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = &self.acts[(self.row + r) * kb + b].qs;
                    // SAFETY: (g + 4) * 4 + 4 <= 32; 4 quants read as one lane.
                    let (a_low, a_high) = unsafe {
                        (
                            std::ptr::read_unaligned(a.as_ptr().add(g * 4) as *const i32),
                            std::ptr::read_unaligned(a.as_ptr().add((g + 4) * 4) as *const i32),
                        )
                    };
                    *acc = _mm512_dpbusd_epi32(*acc, low, _mm512_set1_epi32(a_low));
                    *acc = _mm512_dpbusd_epi32(*acc, high, _mm512_set1_epi32(a_high));
                }
            }
            // SAFETY: `d` and `m` hold 16 u16 each (32 bytes): f16 scales
            // and offsets, or a K-quant's `sc | m << 8`, whose factors hold
            // 16 `d` then 16 `-dmin`.
            let (dw, mw) = unsafe {
                match w.k_factors(self.t, b) {
                    Some(f) => {
                        let both = _mm512_cvtepu16_epi32(_mm256_loadu_si256(w.scales[tb].as_ptr() as *const _));
                        let sc = _mm512_cvtepi32_ps(_mm512_and_si512(both, _mm512_set1_epi32(0xFF)));
                        let m = _mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(both));
                        (
                            _mm512_mul_ps(_mm512_loadu_ps(f.as_ptr()), sc),
                            _mm512_mul_ps(_mm512_loadu_ps(f.as_ptr().add(TILE)), m),
                        )
                    }
                    None => (
                        _mm512_cvtph_ps(_mm256_loadu_si256(w.scales[tb].as_ptr() as *const _)),
                        _mm512_cvtph_ps(_mm256_loadu_si256(w.offsets[tb].as_ptr() as *const _)),
                    ),
                }
            };
            for (r, acc) in acc.iter().enumerate() {
                let a = &self.acts[(self.row + r) * kb + b];
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(a.d));
                sums[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*acc), scale, sums[r]);
                sums[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.d * a.sum as f32), sums[r]);
            }
        }
        for (r, s) in sums.iter().enumerate() {
            // SAFETY: the caller gives rows < m and 16 t + 16 <= n of an
            // m x n buffer.
            unsafe { _mm512_storeu_ps(self.dst.add((self.row + r) * w.n + self.t * TILE), *s) };
        }
    }

    /// [`Rows::run`] with AVX2. The weights' quants are unsigned and below
    /// 32, so `vpmaddubsw`'s 16-bit pair sums are at most 2 x 31 x 127 =
    /// 7,874 and four of them add up in 16 bits without overflow: each
    /// `vpmaddwd` by ones then widens 16 inputs' worth of exact sums, a
    /// quarter of the widening instructions one per product would cost. The
    /// block's integer sums are exact either way, so the results equal
    /// [`Rows::run`]'s. Fifth bits are spread from a 32-bit mask to 32
    /// bytes by a byte shuffle and a compare against each byte's bit.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2<const R: usize, const FIVE: bool>(&self) {
        use std::arch::x86_64::*;
        let (w, kb) = (self.w, self.kb);
        let unpack = Unpack::new();
        // [row][half of the tile's 16 outputs]
        let mut sums = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..kb {
            let tb = self.t * kb + b;
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for h in 0..2 {
                for pair in [0, 2] {
                    // Groups `pair`, `pair + 1` (low nibbles) and the same
                    // plus 4 (high nibbles) of outputs 8h..8h + 8.
                    let (q0, q1) = unpack.quants(w, tb, pair, h, FIVE);
                    let (q2, q3) = unpack.quants(w, tb, pair + 1, h, FIVE);
                    let q = [q0, q1, q2, q3];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        acc[h] = dot4_avx2(acc[h], &q, &self.acts[(self.row + r) * kb + b].qs, pair);
                    }
                }
            }
            for h in 0..2 {
                let scales = scales_avx2(w, self.t, b, h);
                for (r, acc) in acc.iter().enumerate() {
                    sums[r][h] = add_block_avx2(sums[r][h], acc[h], scales, &self.acts[(self.row + r) * kb + b]);
                }
            }
        }
        for (r, s) in sums.iter().enumerate() {
            for (h, s) in s.iter().enumerate() {
                // SAFETY: the caller gives rows < m and 16 t + 16 <= n of an
                // m x n buffer.
                unsafe { _mm256_storeu_ps(self.dst.add((self.row + r) * w.n + self.t * TILE + h * 8), *s) };
            }
        }
    }

    /// Q6_K's product for `R` rows (see [`Format::Q6K`] and
    /// [`portable_q6`]): each block's low and high nibbles (inputs 0-15 and
    /// 16-31) go to their own `vpdpbusd` sums, the fifth and sixth bits
    /// added to their bytes under their masks (with `PRE`, read as bytes
    /// from `unpacked` instead, [`predecoded_q6`]). The sums stay exact: a
    /// half's `sum((q - 32) a)` is at most 16 x 32 x 127 in size, times a
    /// scale of at most 128, sixteen halves a super-block: under 2^28.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_q6<const R: usize, const PRE: bool>(&self) {
        use std::arch::x86_64::*;
        let (w, kb) = (self.w, self.kb);
        let (nibble, bit4, bit5) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10), _mm512_set1_epi8(0x20));
        let mut sums = [_mm512_setzero_ps(); R];
        let mut exact = [_mm512_setzero_si512(); R];
        for b in 0..kb {
            let tb = self.t * kb + b;
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            for g in 0..4 {
                let (low, high) = if PRE {
                    // SAFETY: two tiles per block, each 4 groups of 64 bytes.
                    unsafe {
                        (
                            _mm512_load_si512(self.unpacked[2 * b].lo.as_ptr().add(g * 64) as *const _),
                            _mm512_load_si512(self.unpacked[2 * b + 1].lo.as_ptr().add(g * 64) as *const _),
                        )
                    }
                } else {
                    q6_quants(w, tb, g, (nibble, bit4, bit5))
                };
                for r in 0..R {
                    let a = &self.acts[(self.row + r) * kb + b].qs;
                    // SAFETY: (g + 4) * 4 + 4 <= 32; 4 quants read as one lane.
                    let (a_low, a_high) = unsafe {
                        (
                            std::ptr::read_unaligned(a.as_ptr().add(g * 4) as *const i32),
                            std::ptr::read_unaligned(a.as_ptr().add((g + 4) * 4) as *const i32),
                        )
                    };
                    lo[r] = _mm512_dpbusd_epi32(lo[r], low, _mm512_set1_epi32(a_low));
                    hi[r] = _mm512_dpbusd_epi32(hi[r], high, _mm512_set1_epi32(a_high));
                }
            }
            // SAFETY: `d` holds 16 u16: each row's two signed scales.
            let both = unsafe { _mm512_cvtepi16_epi32(_mm256_loadu_si256(w.scales[tb].as_ptr() as *const _)) };
            let (s0, s1) = (
                _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(both)),
                _mm512_srai_epi32::<8>(both),
            );
            for r in 0..R {
                let [h0, h1] = self.halves[(self.row + r) * kb + b];
                let lo = _mm512_mullo_epi32(_mm512_sub_epi32(lo[r], _mm512_set1_epi32(h0)), s0);
                let hi = _mm512_mullo_epi32(_mm512_sub_epi32(hi[r], _mm512_set1_epi32(h1)), s1);
                exact[r] = _mm512_add_epi32(exact[r], _mm512_add_epi32(lo, hi));
            }
            if (b + 1) % SUBS == 0 {
                if let Some(f) = w.k_factors(self.t, b) {
                    // SAFETY: `f` holds 16 `d` first.
                    let d = unsafe { _mm512_loadu_ps(f.as_ptr()) };
                    for r in 0..R {
                        let a = &self.acts[(self.row + r) * kb + b + 1 - SUBS];
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
                        sums[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact[r]), scale, sums[r]);
                        exact[r] = _mm512_setzero_si512();
                    }
                }
            }
        }
        for (r, s) in sums.iter().enumerate() {
            // SAFETY: the caller gives rows < m and 16 t + 16 <= n of an
            // m x n buffer.
            unsafe { _mm512_storeu_ps(self.dst.add((self.row + r) * w.n + self.t * TILE), *s) };
        }
    }

    /// [`Rows::run_q6`] with AVX2, 8 outputs per register. Six-bit quants
    /// against activations up to 127 make `vpmaddubsw` pair sums up to
    /// 16,002, so only two of them add up in 16 bits before `vpmaddwd`
    /// widens them (the Q4/Q5 kernel adds four).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_q6_avx2<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let (w, kb) = (self.w, self.kb);
        let unpack = Unpack::new();
        let ones = _mm256_set1_epi16(1);
        // [row][half of the tile's 16 outputs]
        let mut sums = [[_mm256_setzero_ps(); 2]; R];
        // [half of the outputs][row]
        let mut exact = [[_mm256_setzero_si256(); R]; 2];
        for b in 0..kb {
            let tb = self.t * kb + b;
            for (h, exact) in exact.iter_mut().enumerate() {
                let mut lo = [_mm256_setzero_si256(); R];
                let mut hi = [_mm256_setzero_si256(); R];
                for pair in [0, 2] {
                    let (q0, q1) = unpack.quants6(w, tb, pair, h);
                    let (q2, q3) = unpack.quants6(w, tb, pair + 1, h);
                    for r in 0..R {
                        let a = &self.acts[(self.row + r) * kb + b].qs;
                        // SAFETY: g < 8, so g * 4 + 4 <= 32; 4 quants read
                        // as one lane.
                        let act = |g: usize| {
                            _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(a.as_ptr().add(g * 4) as *const i32) })
                        };
                        let l = _mm256_add_epi16(
                            _mm256_maddubs_epi16(q0, act(pair)),
                            _mm256_maddubs_epi16(q2, act(pair + 1)),
                        );
                        let u = _mm256_add_epi16(
                            _mm256_maddubs_epi16(q1, act(pair + 4)),
                            _mm256_maddubs_epi16(q3, act(pair + 5)),
                        );
                        lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(l, ones));
                        hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(u, ones));
                    }
                }
                // SAFETY: `d` holds 16 u16, 8 of them from `8h`.
                let both =
                    unsafe { _mm256_cvtepi16_epi32(_mm_loadu_si128(w.scales[tb].as_ptr().add(h * 8) as *const _)) };
                let (s0, s1) = (
                    _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(both)),
                    _mm256_srai_epi32::<8>(both),
                );
                for r in 0..R {
                    let [h0, h1] = self.halves[(self.row + r) * kb + b];
                    let lo = _mm256_mullo_epi32(_mm256_sub_epi32(lo[r], _mm256_set1_epi32(h0)), s0);
                    let hi = _mm256_mullo_epi32(_mm256_sub_epi32(hi[r], _mm256_set1_epi32(h1)), s1);
                    exact[r] = _mm256_add_epi32(exact[r], _mm256_add_epi32(lo, hi));
                }
            }
            if (b + 1) % SUBS == 0 {
                if let Some(f) = w.k_factors(self.t, b) {
                    for (h, exact) in exact.iter_mut().enumerate() {
                        // SAFETY: `f` holds 16 `d` first.
                        let d = unsafe { _mm256_loadu_ps(f.as_ptr().add(h * 8)) };
                        for r in 0..R {
                            let a = &self.acts[(self.row + r) * kb + b + 1 - SUBS];
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                            sums[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact[r]), scale, sums[r][h]);
                            exact[r] = _mm256_setzero_si256();
                        }
                    }
                }
            }
        }
        for (r, s) in sums.iter().enumerate() {
            for (h, s) in s.iter().enumerate() {
                // SAFETY: the caller gives rows < m and 16 t + 16 <= n of an
                // m x n buffer.
                unsafe { _mm256_storeu_ps(self.dst.add((self.row + r) * w.n + self.t * TILE + h * 8), *s) };
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_q6<const R: usize, const PRE: bool>(&self) {
        unreachable!("lowbit::matmul runs SIMD only where Simd::runs_here holds")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_q6_avx2<const R: usize>(&self) {
        unreachable!("lowbit::matmul runs SIMD only where Simd::runs_here holds")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run<const R: usize, const FIVE: bool>(&self) {
        unreachable!("lowbit::matmul runs SIMD only where Simd::runs_here holds")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_avx2<const R: usize, const FIVE: bool>(&self) {
        unreachable!("lowbit::matmul runs SIMD only where Simd::runs_here holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn format_of(dtype: GgmlDType) -> Format {
        match dtype {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            _ => Format::Q5_1,
        }
    }

    fn rows(m: usize, k: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
            .expect("randn")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec")
    }

    /// Against candle's own (scalar) kernels for each format, on odd widths
    /// and 1-9 rows; and the packing reads back every quant of the file.
    #[test]
    fn matches_candle_for_every_format_and_row_count() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            for (n, k) in [(48, 576), (16, 32), (32, 896)] {
                let (qt, packed, exact) = random_packed(dtype, format_of(dtype), n, k);
                // Dequantized from the tiles equals candle's dequantization.
                let kb = k / BLOCK;
                for row in 0..n {
                    for i in 0..k {
                        let (t, r, b, j) = (row / TILE, row % TILE, i / BLOCK, i % BLOCK);
                        let d = half::f16::from_bits(packed.scales[t * kb + b][r]).to_f32();
                        let m = half::f16::from_bits(packed.offsets[t * kb + b][r]).to_f32();
                        let v = d * packed.quant(t * kb + b, r, j) as f32 + m;
                        let want = exact[row * k + i];
                        assert!(
                            (v - want).abs() <= 1e-6 * want.abs().max(1.0),
                            "{dtype:?} [{row},{i}]: {v} vs {want}"
                        );
                    }
                }
                // Activations as Q8_0 here, Q8_1 in candle: ~1e-3.
                agrees_with_candle(&packed, qt, &[1, 2, 3, 4, 5, 9, 18], 3e-3);
            }
        }
    }

    /// A random `n x k` matrix quantized as `dtype`, packed as `format`, and
    /// candle's dequantization of it.
    fn random_packed(dtype: GgmlDType, format: Format, n: usize, k: usize) -> (QTensor, Packed, Vec<f32>) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("randn");
        let qt = QTensor::quantize(&w, dtype).expect("quantizes");
        let packed = Packed::new(format, &qt.data().expect("data"), n, k).expect("packs");
        let exact = qt
            .dequantize(&dev)
            .expect("dequantizes")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        (qt, packed, exact)
    }

    /// `packed`'s products against candle's kernel for `qt` (the same
    /// matrix) within `tol` of the largest output, for each row count in
    /// `ms`; and every path's products equal the portable one's, to the
    /// bit.
    fn agrees_with_candle(packed: &Packed, qt: QTensor, ms: &[usize], tol: f32) {
        let (dev, (n, k), format) = (Device::Cpu, (packed.n, packed.k), packed.format);
        let reference = QMatMul::from_qtensor(qt).expect("qmatmul");
        for &m in ms {
            let x = rows(m, k);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).expect("tensor");
            let want: Vec<f32> = reference
                .forward(&xt)
                .expect("forward")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let got = matmul(packed, &x, m);
            let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= tol * scale,
                    "{format:?} {n}x{k} m={m} [{i}]: {g} vs {w}"
                );
            }
            let acts = activations(format, &x);
            let slow = match format {
                Format::Q6K => portable_q6(packed, &acts, &half_sums(&acts), m),
                _ => portable(packed, &acts, m),
            };
            for simd in Simd::here() {
                assert_eq!(slow, matmul_on(simd, packed, &x, m), "{simd:?} {format:?} m={m}");
            }
        }
    }

    /// Q4_K and Q5_K: every value read back from the tiles is candle's
    /// dequantization (to f32 rounding); products agree with candle's
    /// K-quant kernels; every path gives the portable numbers.
    #[test]
    fn k_quants_are_read_as_their_sub_blocks() {
        for (dtype, format) in [(GgmlDType::Q4K, Format::Q4K), (GgmlDType::Q5K, Format::Q5K)] {
            for (n, k) in [(16, 256), (48, 768)] {
                let (qt, packed, exact) = random_packed(dtype, format, n, k);
                assert_eq!(packed.format(), format);
                let kb = k / BLOCK;
                for row in 0..n {
                    for b in 0..kb {
                        let (t, r) = (row / TILE, row % TILE);
                        let (d, m) = packed.scale(t * kb + b, r);
                        // f32 products of the same factors as candle's.
                        let bound = (d.abs() * 31.0 + m.abs()) * 1e-6;
                        for j in 0..BLOCK {
                            let v = d * packed.quant(t * kb + b, r, j) as f32 + m;
                            let want = exact[row * k + b * BLOCK + j];
                            assert!(
                                (v - want).abs() <= bound,
                                "{dtype:?} [{row},{}]: {v} vs {want}",
                                b * BLOCK + j
                            );
                        }
                    }
                }
                // Activations per 256 on both sides (Q8_K in candle): only
                // the summation order differs.
                agrees_with_candle(&packed, qt, &[1, 3, 4, 7], 2e-3);
            }
            // A width of part of a super-block, or short data, is refused.
            assert!(Packed::new(format, &[0; 176 * 2 * 16], 16, 288).is_none());
            let sb = if format == Format::Q4K { 144 } else { 176 };
            assert!(Packed::new(format, &vec![0; sb * 16 - 1], 16, 256).is_none());
        }
    }

    /// Q6_K: every value read back from the tiles (`d sc (q - 32)`) is
    /// candle's dequantization; products agree with candle's Q6_K kernel
    /// for 1-7 rows; every path gives the portable numbers; short data and
    /// partial super-blocks are refused.
    #[test]
    fn q6_k_is_read_as_its_halves() {
        for (n, k) in [(16, 256), (48, 768)] {
            let (qt, packed, exact) = random_packed(GgmlDType::Q6K, Format::Q6K, n, k);
            let kb = k / BLOCK;
            for row in 0..n {
                let (t, r) = (row / TILE, row % TILE);
                for b in 0..kb {
                    let d = packed.k_factors(t, b).expect("factors")[r];
                    let (s0, s1) = packed.half_scales(t * kb + b, r);
                    for j in 0..BLOCK {
                        let sc = if j < 16 { s0 } else { s1 };
                        let q = i32::from(packed.quant(t * kb + b, r, j)) - 32;
                        let v = d * (sc * q) as f32;
                        let want = exact[row * k + b * BLOCK + j];
                        assert!(
                            (v - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "[{row},{}]: {v} vs {want}",
                            b * BLOCK + j
                        );
                    }
                }
            }
            agrees_with_candle(&packed, qt, &[1, 2, 3, 4, 5, 7], 2e-3);
        }
        assert!(Packed::new(Format::Q6K, &[0; 210 * 2 * 16], 16, 288).is_none());
        assert!(Packed::new(Format::Q6K, &vec![0; 210 * 16 - 1], 16, 256).is_none());
        let ok = Packed::new(Format::Q6K, &vec![0; 210 * 16], 16, 256).expect("fits");
        assert_eq!(ok.bytes(), 8 * (256 + 32 + 128) + 128);
    }

    /// Q6_K's largest quants (63) against +-127 in every lane, where the
    /// AVX2 path's 16-bit sums are at their bound, and its smallest (0,
    /// that is -32), under the largest scales of both signs: every path
    /// gives the portable numbers.
    #[test]
    fn extreme_q6_k_quants_give_the_same_numbers_on_every_path() {
        let (n, k) = (32, 512);
        // Even rows' quants all 63, odd rows' all 0; scales -128 and 127 in
        // turn; d about 1e-3.
        let mut bytes = Vec::with_capacity(n * k / SUPER * 210);
        for row in 0..n {
            let fill = if row % 2 == 0 { 0xFF } else { 0x00 };
            for _ in 0..k / SUPER {
                bytes.extend_from_slice(&[fill; 192]);
                bytes.extend((0..16).map(|i| if i % 2 == 0 { 0x80 } else { 0x7F }));
                bytes.extend_from_slice(&0x1400u16.to_le_bytes());
            }
        }
        let packed = Packed::new(Format::Q6K, &bytes, n, k).expect("packs");
        assert_eq!(packed.quant(0, 0, 5), 63);
        assert_eq!(packed.half_scales(0, 1), (-128, 127));
        let x: Vec<f32> = (0..6 * k).map(|i| if (i / 16) % 3 == 0 { 1.0 } else { -1.0 }).collect();
        for m in 1..=6 {
            let x = &x[..m * k];
            let acts = activations(Format::Q6K, x);
            let slow = portable_q6(&packed, &acts, &half_sums(&acts), m);
            for simd in Simd::here() {
                assert_eq!(slow, matmul_on(simd, &packed, x, m), "{simd:?} m={m}");
            }
        }
    }

    /// A row's result does not depend on the rows beside it (batched
    /// decoding promises each sequence its logits alone).
    #[test]
    fn rows_do_not_depend_on_their_batch() {
        let (n, k) = (64, 640);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn");
        let qt = QTensor::quantize(&w, GgmlDType::Q5_0).expect("quantizes");
        let packed = Packed::new(Format::Q5_0, &qt.data().expect("data"), n, k).expect("packs");
        let x = rows(7, k);
        for simd in Simd::here() {
            let all = matmul_on(simd, &packed, &x, 7);
            for r in 0..7 {
                assert_eq!(
                    matmul_on(simd, &packed, &x[r * k..(r + 1) * k], 1),
                    all[r * n..(r + 1) * n],
                    "{simd:?} row {r}"
                );
            }
        }
    }

    /// The largest quants on both sides (31 or 15 against +-127 in every
    /// lane: the 16-bit sums of the AVX2 path at their bound) give the
    /// portable numbers on every path.
    #[test]
    fn extreme_quants_give_the_same_numbers_on_every_path() {
        let (n, k) = (32, 256);
        // One 0 per block and the rest at the block's maximum: every other
        // quant is the format's largest.
        let w: Vec<f32> = (0..n * k).map(|i| if i % 32 == 0 { 0.0 } else { 1.0 }).collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
        // Blocks of +1 and of -1 quantize to +-127 throughout.
        let x: Vec<f32> = (0..6 * k).map(|i| if (i / 32) % 2 == 0 { 1.0 } else { -1.0 }).collect();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            let qt = QTensor::quantize(&w, dtype).expect("quantizes");
            let packed = Packed::new(format_of(dtype), &qt.data().expect("data"), n, k).expect("packs");
            // Past 4 rows the AVX2 path unpacks the quants first.
            for m in 1..=6 {
                let x = &x[..m * k];
                let slow = portable(&packed, &vnni::quantize(x), m);
                for simd in Simd::here() {
                    assert_eq!(slow, matmul_on(simd, &packed, x, m), "{simd:?} {dtype:?} m={m}");
                }
            }
        }
    }

    /// `-16 d` in bits equals the f32 route for every f16 but NaNs.
    #[test]
    fn q5_0_offset_is_exact_for_every_scale() {
        for d in 0..=u16::MAX {
            let h = half::f16::from_bits(d);
            if h.is_nan() {
                continue;
            }
            let want = half::f16::from_f32(-16.0 * h.to_f32()).to_bits();
            assert_eq!(minus_16_times(d), want, "d = {d:#06x}");
        }
    }

    /// The packing puts every quant where one-at-a-time placement (the
    /// layout's definition) puts it, fifth bits included.
    #[test]
    fn packing_places_every_quant_by_the_layout() {
        let (n, k) = (32, 96);
        for format in [Format::Q4_1, Format::Q5_0, Format::Q5_1] {
            let bb = format.block_bytes();
            // Noise bytes, with scales kept finite.
            let mut bytes: Vec<u8> = (0..n * k / BLOCK * bb)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            for block in bytes.chunks_mut(bb) {
                block[1] &= 0x3B;
                if format != Format::Q5_0 {
                    block[3] &= 0x3B;
                }
            }
            let packed = Packed::new(format, &bytes, n, k).expect("packs");
            let kb = k / BLOCK;
            for row in 0..n {
                for b in 0..kb {
                    let block = &bytes[(row * kb + b) * bb..(row * kb + b + 1) * bb];
                    let (_, _, qh, _, qs) = block_parts(format, block);
                    for i in 0..BLOCK {
                        let nibble = if i < 16 { qs[i] & 0x0F } else { qs[i - 16] >> 4 };
                        let fifth = if format.five() { ((qh >> i) & 1) as u8 } else { 0 };
                        let (t, r) = (row / TILE, row % TILE);
                        assert_eq!(
                            packed.quant(t * kb + b, r, i),
                            nibble | fifth << 4,
                            "{format:?} row {row} block {b} input {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_shapes_and_data_that_do_not_fit() {
        assert!(
            Packed::new(Format::Q4_1, &[0; 20 * 18 * 8], 8, 576).is_none(),
            "8 rows is not a tile"
        );
        assert!(
            Packed::new(Format::Q5_0, &[0; 22 * 18 * 16 - 1], 16, 576).is_none(),
            "short data"
        );
        let ok = Packed::new(Format::Q5_1, &[0; 24 * 18 * 16], 16, 576).expect("fits");
        assert_eq!(ok.bytes(), 18 * (320 + 64));
    }
}
