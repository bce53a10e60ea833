//! Q8_0 matrix products on Intel AMX tiles, for many activation rows.
//!
//! The VNNI kernel ([`crate::vnni`]) multiplies 16 output rows by one
//! broadcast group of 4 inputs per instruction; that is a small part of what
//! a core with AMX can do. An AMX `tdpbsud` multiplies a 16 x 32 tile of
//! signed bytes by a 32 x 16 tile of unsigned bytes into 16 x 16 i32 sums in
//! one instruction, and the CPU has eight tile registers. This kernel uses
//! them for every product with at least [`MIN_ROWS`] activation rows
//! (prefill, option scoring, wide batched decoding) and keeps the VNNI
//! kernel's numbers exactly:
//!
//! * **Same packing.** A [`vnni::Packed`] tile (16 output rows by one
//!   32-input block, quants + 128 grouped by four inputs) is byte for byte an
//!   AMX `B` tile of 8 rows of 64 bytes, so weights are packed once at load
//!   for both kernels and no memory is added.
//! * **Same activation quantization.** Rows are quantized per 32 values as
//!   Q8_0 (as llama.cpp does), padded with zero rows to a multiple of 16; one
//!   block of 16 rows is an `A` tile loaded with the row stride.
//! * **Same arithmetic.** Each block's product is exact in i32 on the tiles;
//!   the tiles are stored, the `+128` is taken back out with the activation
//!   block's quant sum, and the result is scaled by the weight and activation
//!   scales and added to f32 accumulators with the same fused multiply-add,
//!   block after block in the same order as the VNNI and portable paths. The
//!   three paths give bit-identical results, so which one serves a call
//!   (decided by its row count) never changes a logit, and a row's product
//!   does not depend on the rows it is batched with.
//!
//! Per-block scales mean the i32 tiles must leave the tile registers after
//! every 32 inputs; that store and the f32 epilogue, not the tile multiply,
//! bound the kernel. Two `A` and two `B` tiles feed four accumulator tiles
//! (32 x 32 outputs) to amortise the loads.
//!
//! **Safety.** Tile instructions fault unless the CPU has AMX and the kernel
//! has granted this process the tile data state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+).
//! [`available`] checks CPUID, the OS-enabled XSAVE state and that
//! permission once; [`matmul`] falls back to the VNNI kernel (which itself
//! falls back to portable code) when it is false, so no safe call can execute
//! an instruction this machine lacks. Each worker loads its tile
//! configuration at the start of its share and puts back the one it found at
//! the end (see [`enter`]: other code in the process uses the tiles too).

use crate::vnni::{self, Act, Packed, BLOCK, TILE};

/// Fewest activation rows that go to the tiles: below one full `A` tile
/// the padding costs more than the VNNI kernel does.
pub const MIN_ROWS: usize = 16;

/// What this CPU and OS allow, checked once.
#[derive(Clone, Copy, Debug, Default)]
struct Support {
    int8: bool,
    bf16: bool,
}

fn support() -> Support {
    static STATE: std::sync::OnceLock<Support> = std::sync::OnceLock::new();
    *STATE.get_or_init(|| {
        let edx = cpuid7_edx();
        if !tiles_usable(edx) {
            return Support::default();
        }
        Support {
            int8: edx & (1 << 25) != 0,
            bf16: edx & (1 << 22) != 0 && bf16_helpers(),
        }
    })
}

static ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Allows or forbids the tile kernels for this process (default: allowed
/// where the CPU has them). With `false` every call takes the fallback,
/// which is how tests and benches compare both paths on one machine.
pub fn set_allowed(allowed: bool) {
    ALLOWED.store(allowed, std::sync::atomic::Ordering::Relaxed);
}

fn allowed() -> bool {
    ALLOWED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the int8 tile kernel ([`matmul`]) runs on the tiles here.
pub fn available() -> bool {
    allowed() && support().int8
}

/// Whether the bf16 tile kernel ([`matmul_bf16`]) runs on the tiles here.
pub fn bf16_available() -> bool {
    allowed() && support().bf16
}

#[cfg(target_arch = "x86_64")]
fn cpuid7_edx() -> u32 {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return 0;
    }
    __cpuid_count(7, 0).edx
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid7_edx() -> u32 {
    0
}

/// The AVX-512 instructions the bf16 kernel's conversions use.
#[cfg(target_arch = "x86_64")]
fn bf16_helpers() -> bool {
    is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512vbmi")
}

#[cfg(not(target_arch = "x86_64"))]
fn bf16_helpers() -> bool {
    false
}

/// AMX-TILE present (bit 24 of CPUID leaf 7's `edx`), its state enabled
/// by the OS and granted to us.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn tiles_usable(leaf7_edx: u32) -> bool {
    use std::arch::x86_64::{__cpuid, _xgetbv};
    if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("xsave") {
        return false;
    }
    let amx_tile = leaf7_edx & (1 << 24) != 0;
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if !(amx_tile && osxsave) {
        return false;
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS manages tile state.
    // SAFETY: OSXSAVE is set, so XGETBV is enabled.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    request_tile_permission()
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn tiles_usable(_: u32) -> bool {
    false
}

/// Asks Linux for this process's permission to use the tile data state, and
/// checks it was granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes only reads its integer arguments
    // (and, for GET, writes one u64 to the pointer we pass).
    unsafe {
        if libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0 {
            return false;
        }
        let mut granted: u64 = 0;
        if libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut granted as *mut u64) != 0 {
            return false;
        }
        granted & (1 << XFEATURE_XTILEDATA) != 0
    }
}

/// `x (m x k) -> x W^T (m x n)`, row-major, for a matrix packed by
/// [`Packed::from_q8_0`]: on the tiles where [`available`] holds, otherwise
/// on [`vnni::matmul`]; the results are the same either way.
///
/// # Panics
/// If `x` is not `m` rows of the matrix's input width.
pub fn matmul(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k, "amx::matmul: expected {m} rows of {} values", w.k);
    if !available() {
        return vnni::matmul(w, x, m);
    }
    let kb = w.k / BLOCK;
    let padded = m.div_ceil(TILE) * TILE;
    let mut acts = vnni::quantize(x);
    acts.resize(padded * kb, Act::ZERO);
    let mut out = vec![0f32; m * w.n];
    let out_at = out.as_mut_ptr() as usize;
    let (n, acts) = (w.n, &acts);
    // Work is shared out in pairs of 16-column tiles (the last may be single).
    let pairs = (w.n / TILE).div_ceil(2);
    candle_core::utils::barrier_pool().execute_chunked(pairs, |range| {
        // SAFETY: `available()` holds (checked above); every worker loads
        // the tile configuration before its first tile instruction; each
        // writes only the columns of its own tiles, for rows < m, of an
        // `m x n` buffer that outlives the pool call.
        unsafe { share(w, acts, kb, m, padded, range, out_at as *mut f32, n) }
    });
    out
}

/// Calls `f(t, two_cols, row, two_rows)` for every block of a worker's
/// share of column-tile pairs: per pair (first column tile `t`, and whether
/// a second one follows), every 16- or 32-row block of the `padded` rows,
/// so that the pair's weights stay in cache while the activations stream.
fn walk(pairs: std::ops::Range<usize>, tiles_n: usize, padded: usize, mut f: impl FnMut(usize, bool, usize, bool)) {
    for p in pairs {
        let t = p * 2;
        let two_cols = t + 1 < tiles_n;
        let mut row = 0;
        while row < padded {
            let two_rows = row + TILE < padded;
            f(t, two_cols, row, two_rows);
            row += TILE * if two_rows { 2 } else { 1 };
        }
    }
}

/// A tile configuration block (`ldtilecfg`'s 64-byte operand).
///
/// The tile palette of [`matmul`]: tiles 0-1 hold activations (16 rows x 32 bytes), 2-3
/// weights (8 rows x 64 bytes), 4-7 i32 sums (16 rows x 64 bytes).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads `config` on this thread and returns the configuration it replaces.
///
/// Other code in the process may use the tiles too and keep its own
/// configuration loaded between calls (candle's AMX Q4_K kernel configures
/// each thread once and then assumes the configuration stays), so a worker
/// leaves the tiles as it found them ([`leave`]) instead of releasing them:
/// releasing them made candle's next tile instruction fault.
///
/// # Safety
/// The CPU must support AMX and this process must hold the tile permission.
#[cfg(target_arch = "x86_64")]
unsafe fn enter(config: &TileConfig) -> TileConfig {
    let mut saved = TileConfig {
        palette: 0,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    // SAFETY: both operands are 64-byte configuration blocks.
    unsafe {
        std::arch::asm!("sttilecfg [{}]", in(reg) &mut saved as *mut TileConfig, options(nostack));
        std::arch::asm!("ldtilecfg [{}]", in(reg) config as *const TileConfig, options(nostack));
    }
    saved
}

/// Restores the configuration [`enter`] saved: none (the tiles are
/// released) or another user's.
///
/// # Safety
/// As for [`enter`]; `saved` must come from it on this thread.
#[cfg(target_arch = "x86_64")]
unsafe fn leave(saved: &TileConfig) {
    // SAFETY: `saved` is either all zeros (tiles were not configured) or a
    // configuration the CPU accepted before.
    unsafe {
        if saved.palette == 0 {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        } else {
            std::arch::asm!("ldtilecfg [{}]", in(reg) saved as *const TileConfig, options(nostack));
        }
    }
}

const CONFIG: TileConfig = TileConfig::palette1([
    (BLOCK as u16, TILE as u8),
    (BLOCK as u16, TILE as u8),
    (64, (BLOCK / 4) as u8),
    (64, (BLOCK / 4) as u8),
    (64, TILE as u8),
    (64, TILE as u8),
    (64, TILE as u8),
    (64, TILE as u8),
]);

impl TileConfig {
    /// Palette 1 with tiles 0-7 of the given (bytes per row, rows).
    const fn palette1(shapes: [(u16, u8); 8]) -> TileConfig {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut t = 0;
        while t < 8 {
            (colsb[t], rows[t]) = shapes[t];
            t += 1;
        }
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb,
            rows,
        }
    }
}

/// One worker's share of column-tile pairs: loads the tile configuration,
/// walks every 16- or 32-row block of activations against each pair (the
/// pair's weights stay in L1 while the activations stream), then restores
/// the thread's previous tile configuration.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn share(
    w: &Packed,
    acts: &[Act],
    kb: usize,
    m: usize,
    padded: usize,
    pairs: std::ops::Range<usize>,
    dst: *mut f32,
    n: usize,
) {
    let tiles_n = w.n / TILE;
    // SAFETY: CONFIG is a valid palette-1 configuration (the caller checked
    // the CPU supports it).
    let saved = unsafe { enter(&CONFIG) };
    walk(pairs, tiles_n, padded, |t, two_cols, row, two_rows| {
        // SAFETY: forwarded from the caller; `row` and `t` are in range.
        unsafe {
            match (two_rows, two_cols) {
                (true, true) => block::<2, 2>(w, acts, kb, m, row, t, dst, n),
                (true, false) => block::<2, 1>(w, acts, kb, m, row, t, dst, n),
                (false, true) => block::<1, 2>(w, acts, kb, m, row, t, dst, n),
                (false, false) => block::<1, 1>(w, acts, kb, m, row, t, dst, n),
            }
        }
    });
    // SAFETY: restores the configuration `enter` saved.
    unsafe { leave(&saved) };
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn share(_: &Packed, _: &[Act], _: usize, _: usize, _: usize, _: std::ops::Range<usize>, _: *mut f32, _: usize) {
    unreachable!("amx::matmul is only called where amx::available() holds")
}

/// `RA` 16-row activation blocks from `row` against `RB` column tiles from
/// `t`: every 32-input block through the tiles, then the exact epilogue.
/// Writes `dst[r * n + c]` for rows `r < m` of the block and its columns.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn block<const RA: usize, const RB: usize>(
    w: &Packed,
    acts: &[Act],
    kb: usize,
    m: usize,
    row: usize,
    t: usize,
    dst: *mut f32,
    n: usize,
) {
    use std::arch::asm;
    use std::arch::x86_64::*;
    /// The i32 sums of one block: `[ra][rb][row][col]`.
    #[repr(C, align(64))]
    struct Sums([[[[i32; TILE]; TILE]; 2]; 2]);
    let mut sums = Sums([[[[0; TILE]; TILE]; 2]; 2]);
    let mut acc = [[[_mm512_setzero_ps(); TILE]; RB]; RA];
    let stride = kb * std::mem::size_of::<Act>();
    let out_sums = &mut sums.0 as *mut _ as *mut i32;
    for b in 0..kb {
        let a0 = acts[row * kb + b].qs.as_ptr();
        let w0 = w.tiles[t * kb + b].qs.as_ptr();
        // SAFETY: tiles 0-7 are configured by `share`; the A tiles read 16
        // rows of 32 bytes at `stride` (rows < padded), the B tiles 512
        // bytes of one packed tile; the stores write 1 KiB each into `sums`.
        unsafe {
            asm!(
                "tilezero tmm4",
                "tileloadd tmm0, [{a} + {s}*1]",
                "tileloadd tmm2, [{w} + {ws}*1]",
                "tdpbsud tmm4, tmm0, tmm2",
                "tilestored [{o} + {ws}*1], tmm4",
                a = in(reg) a0, s = in(reg) stride, w = in(reg) w0, ws = in(reg) 64usize,
                o = in(reg) out_sums, options(nostack),
            );
            if RB == 2 {
                let w1 = w.tiles[(t + 1) * kb + b].qs.as_ptr();
                asm!(
                    "tilezero tmm5",
                    "tileloadd tmm3, [{w} + {ws}*1]",
                    "tdpbsud tmm5, tmm0, tmm3",
                    "tilestored [{o} + {ws}*1], tmm5",
                    w = in(reg) w1, ws = in(reg) 64usize, o = in(reg) out_sums.add(TILE * TILE), options(nostack),
                );
            }
            if RA == 2 {
                let a1 = acts[(row + TILE) * kb + b].qs.as_ptr();
                asm!(
                    "tilezero tmm6",
                    "tileloadd tmm1, [{a} + {s}*1]",
                    "tdpbsud tmm6, tmm1, tmm2",
                    "tilestored [{o} + {ws}*1], tmm6",
                    a = in(reg) a1, s = in(reg) stride, ws = in(reg) 64usize,
                    o = in(reg) out_sums.add(2 * TILE * TILE), options(nostack),
                );
                if RB == 2 {
                    asm!(
                        "tilezero tmm7",
                        "tdpbsud tmm7, tmm1, tmm3",
                        "tilestored [{o} + {ws}*1], tmm7",
                        ws = in(reg) 64usize, o = in(reg) out_sums.add(3 * TILE * TILE), options(nostack),
                    );
                }
            }
        }
        for (ra, acc_ra) in acc.iter_mut().enumerate() {
            for (rb, acc_rb) in acc_ra.iter_mut().enumerate() {
                // SAFETY: a packed tile holds 16 f32 scales.
                let dw = unsafe { _mm512_loadu_ps(w.tiles[(t + rb) * kb + b].d.as_ptr()) };
                for (r, v) in acc_rb.iter_mut().enumerate() {
                    let a = &acts[(row + ra * TILE + r) * kb + b];
                    // SAFETY: in bounds of `sums`.
                    let dot = unsafe { _mm512_load_si512(sums.0[ra][rb][r].as_ptr() as *const _) };
                    let exact = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * a.sum));
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(a.d));
                    *v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, *v);
                }
            }
        }
    }
    for (ra, acc_ra) in acc.iter().enumerate() {
        for (rb, acc_rb) in acc_ra.iter().enumerate() {
            for (r, v) in acc_rb.iter().enumerate() {
                let at = row + ra * TILE + r;
                if at < m {
                    // SAFETY: at < m and the tile's 16 columns are < n.
                    unsafe { _mm512_storeu_ps(dst.add(at * n + (t + rb) * TILE), *v) };
                }
            }
        }
    }
}

/// A weight matrix (`n` rows of `k` inputs) as bf16 `B` tiles for
/// [`matmul_bf16`]: `[column tile (n / 16)][block (k / 32)]`, each tile 16
/// rows of input pairs by 16 columns x 2 values.
///
/// Made once at load, beside the decode kernel's packing: dequantizing
/// the weights on every prompt pass cost as much as the tile products for
/// prompts of about a hundred tokens. Two bytes per weight.
pub struct Bf16Packed {
    n: usize,
    k: usize,
    tiles: Vec<[u16; B_TILE]>,
}

impl std::fmt::Debug for Bf16Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "amx::Bf16Packed({}x{})", self.n, self.k)
    }
}

impl Bf16Packed {
    /// The Q8_0 matrix `w` dequantized (each weight `q * d`, rounded to
    /// bf16). `None` where [`bf16_available`] is false (the tiles would
    /// never run).
    pub fn from_packed(w: &Packed) -> Option<Bf16Packed> {
        if !bf16_available() {
            return None;
        }
        let tiles = w
            .tiles
            .iter()
            .map(|tile| {
                let mut b = [0u16; B_TILE];
                // SAFETY: bf16_available() implies the instructions used.
                unsafe { dequantize_tile(tile, &mut b) };
                b
            })
            .collect();
        Some(Bf16Packed { n: w.n, k: w.k, tiles })
    }

    /// Dense row-major f32 weights (`n` rows of `k`) rounded to bf16. `None`
    /// where the shape does not fit ([`vnni::fits`]), the data is not
    /// `n * k` values, or [`bf16_available`] is false.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Option<Bf16Packed> {
        if !bf16_available() || !vnni::fits(n, k) || w.len() != n * k {
            return None;
        }
        let kb = k / BLOCK;
        let mut tiles = vec![[0u16; B_TILE]; n / TILE * kb];
        for (i, tile) in tiles.iter_mut().enumerate() {
            let (t, b) = (i / kb, i % kb);
            for (j, v) in tile.iter_mut().enumerate() {
                // Row `pair` of the tile holds inputs 2 pair, 2 pair + 1 of
                // each of its 16 columns.
                let (pair, c, e) = (j / (2 * TILE), (j / 2) % TILE, j % 2);
                let x = w[(t * TILE + c) * k + b * BLOCK + 2 * pair + e];
                *v = half::bf16::from_f32(x).to_bits();
            }
        }
        Some(Bf16Packed { n, k, tiles })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }
}

/// `x (m x k) -> x W^T (m x n)` on bf16 tiles: the activations are rounded
/// to bf16 once and `tdpbf16ps` accumulates in f32 over the whole input
/// width, so the tiles leave the registers once per output tile rather than
/// once per 32 inputs as in [`matmul`] (whose per-block scales force that,
/// and which therefore ran no faster than the VNNI kernel). Each output
/// element depends only on its own activation row (the tile hardware's
/// summation order is fixed by the input width), so a row's result does not
/// depend on the rows it is batched with.
///
/// The numbers differ from the int8 kernels' (bf16 keeps 8 significant bits
/// of every activation where Q8_0 keeps 8 bits of each 32-value block's
/// largest); callers use one kernel per phase (the backends: prompts here,
/// decode steps on [`vnni`]) so that a phase's results never depend on row
/// counts. Where [`bf16_available`] is false (tiles forbidden after the
/// weights were prepared) the same product runs in portable code.
///
/// # Panics
/// If `x` is not `m` rows of the matrix's input width.
pub fn matmul_bf16(w: &Bf16Packed, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        m * w.k,
        "amx::matmul_bf16: expected {m} rows of {} values",
        w.k
    );
    if !bf16_available() {
        return portable_bf16(w, x, m);
    }
    let (kb, padded) = (w.k / BLOCK, m.div_ceil(TILE) * TILE);
    // Activations in tile order, `[row block][input block][16 rows][32]`,
    // so that each A tile is one contiguous KiB: strided rows from L2 ran
    // the tiles at a third of the speed of contiguous ones.
    let mut xb = vec![0u16; padded * w.k];
    {
        let xb_at = xb.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(padded / TILE, |blocks| {
            for rb in blocks {
                for r in rb * TILE..(rb * TILE + TILE).min(m) {
                    for b in 0..kb {
                        let at = ((rb * kb + b) * TILE + r % TILE) * BLOCK;
                        // SAFETY: bf16_available() implies AVX-512F/BF16;
                        // row blocks are disjoint between workers and every
                        // write is within `xb`.
                        unsafe {
                            let dst = std::slice::from_raw_parts_mut((xb_at as *mut u16).add(at), BLOCK);
                            round_to_bf16(&x[(r * kb + b) * BLOCK..(r * kb + b + 1) * BLOCK], dst);
                        }
                    }
                }
            }
        });
    }
    // Every element of rows < m is written below, so the output is not
    // zeroed first (that was a tenth of the time, on one thread).
    let mut out: Vec<f32> = Vec::with_capacity(m * w.n);
    let out_at = out.spare_capacity_mut().as_mut_ptr() as usize;
    let (n, xb) = (w.n, &xb);
    let pairs = (w.n / TILE).div_ceil(2);
    candle_core::utils::barrier_pool().execute_chunked(pairs, |range| {
        // SAFETY: as in `matmul`: the CPU support was checked, each worker
        // configures its tiles first and writes only its own columns of
        // rows < m.
        unsafe { share_bf16(w, xb, m, padded, range, out_at as *mut f32, n) }
    });
    // SAFETY: the column pairs cover all n columns and every worker wrote
    // all rows < m of its columns.
    unsafe { out.set_len(m * w.n) };
    out
}

/// [`matmul_bf16`]'s arithmetic without tiles: bf16 operands, f32 sums.
fn portable_bf16(w: &Bf16Packed, x: &[f32], m: usize) -> Vec<f32> {
    let kb = w.k / BLOCK;
    let mut out = vec![0f32; m * w.n];
    for (i, row) in out.chunks_exact_mut(w.n).enumerate() {
        let xs = &x[i * w.k..(i + 1) * w.k];
        for (c, y) in row.iter_mut().enumerate() {
            let (t, col) = (c / TILE, c % TILE);
            for b in 0..kb {
                let tile = &w.tiles[t * kb + b];
                for j in 0..BLOCK {
                    let wv = half::bf16::from_bits(tile[(j / 2) * 2 * TILE + col * 2 + j % 2]).to_f32();
                    let xv = half::bf16::from_f32(xs[b * BLOCK + j]).to_f32();
                    *y = xv.mul_add(wv, *y);
                }
            }
        }
    }
    out
}

/// Rounds f32 values to bf16 (nearest even), 32 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_to_bf16(x: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    for (xs, ds) in x.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
        // SAFETY: each chunk holds 32 values.
        unsafe {
            let lo = _mm512_loadu_ps(xs.as_ptr());
            let hi = _mm512_loadu_ps(xs.as_ptr().add(16));
            let b = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(ds.as_mut_ptr() as *mut _, std::mem::transmute::<__m512bh, __m512i>(b));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn round_to_bf16(_: &[f32], _: &mut [u16]) {
    unreachable!("only called where amx::bf16_available() holds")
}

/// bf16 `B` tiles of one packed tile: 16 rows (pairs of inputs) of 16
/// columns x 2 values, 512 u16.
const B_TILE: usize = TILE * BLOCK;

/// Dequantizes one packed tile (16 columns x 32 inputs) into a bf16 `B`
/// tile: row `2g + h` holds inputs `4g + 2h` and `4g + 2h + 1` of every
/// column, which are lanes `2h, 2h + 1` of the packed group `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vbmi")]
unsafe fn dequantize_tile(tile: &vnni::Tile, dst: &mut [u16; B_TILE]) {
    use std::arch::x86_64::*;
    let mut pick = [0u8; 64];
    for (p, v) in pick.iter_mut().enumerate() {
        let (h, q) = (p / 32, p % 32);
        *v = ((q / 2) * 4 + 2 * h + q % 2) as u8;
    }
    let mut pairs = [[0u32; 16]; 2];
    for (j, half) in pairs.iter_mut().enumerate() {
        for (i, v) in half.iter_mut().enumerate() {
            *v = (j * 8 + i / 2) as u32;
        }
    }
    // SAFETY: all loads and stores below are within `tile` and `dst`.
    unsafe {
        let pick = _mm512_loadu_si512(pick.as_ptr() as *const _);
        let d = _mm512_loadu_ps(tile.d.as_ptr());
        let scale = [
            _mm512_permutexvar_ps(_mm512_loadu_si512(pairs[0].as_ptr() as *const _), d),
            _mm512_permutexvar_ps(_mm512_loadu_si512(pairs[1].as_ptr() as *const _), d),
        ];
        let bias = _mm512_set1_epi32(128);
        for g in 0..BLOCK / 4 {
            let v = _mm512_loadu_si512(tile.qs.as_ptr().add(g * 64) as *const _);
            let rows = _mm512_permutexvar_epi8(pick, v);
            for h in 0..2 {
                let row = if h == 0 {
                    _mm512_castsi512_si256(rows)
                } else {
                    _mm512_extracti64x4_epi64::<1>(rows)
                };
                let mut f = [_mm512_setzero_ps(); 2];
                for (j, fj) in f.iter_mut().enumerate() {
                    let bytes = if j == 0 {
                        _mm256_castsi256_si128(row)
                    } else {
                        _mm256_extracti128_si256::<1>(row)
                    };
                    let q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), bias);
                    *fj = _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale[j]);
                }
                let b = _mm512_cvtne2ps_pbh(f[1], f[0]);
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add((2 * g + h) * 32) as *mut _,
                    std::mem::transmute::<__m512bh, __m512i>(b),
                );
            }
        }
    }
}

/// The bf16 palette: every tile 16 rows x 64 bytes (A: 16 rows x 32
/// inputs; B: 16 input pairs x 16 columns; C: 16 x 16 f32).
const CONFIG_BF16: TileConfig = TileConfig::palette1([(64, TILE as u8); 8]);

/// One worker's share of column-tile pairs for [`matmul_bf16`]: every 16-
/// or 32-row block of activations runs against each pair's weights (which
/// stay in L1/L2 meanwhile).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16,avx512vbmi")]
unsafe fn share_bf16(
    w: &Bf16Packed,
    xb: &[u16],
    m: usize,
    padded: usize,
    pairs: std::ops::Range<usize>,
    dst: *mut f32,
    n: usize,
) {
    let (tiles_n, kb) = (w.n / TILE, w.k / BLOCK);
    // SAFETY: CONFIG_BF16 is a valid palette-1 configuration.
    let saved = unsafe { enter(&CONFIG_BF16) };
    walk(pairs, tiles_n, padded, |t, two_cols, row, two_rows| {
        let at = Bf16Block {
            xb,
            k: w.k,
            b_tiles: &w.tiles[t * kb..(t + 1 + two_cols as usize) * kb],
            m,
            row,
            col: t * TILE,
            dst,
            n,
        };
        // SAFETY: forwarded from the caller; rows and columns in range.
        unsafe {
            match (two_rows, two_cols) {
                (true, true) => at.run::<2, 2>(),
                (true, false) => at.run::<2, 1>(),
                (false, true) => at.run::<1, 2>(),
                (false, false) => at.run::<1, 1>(),
            }
        }
    });
    // SAFETY: restores the configuration `enter` saved.
    unsafe { leave(&saved) };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn share_bf16(_: &Bf16Packed, _: &[u16], _: usize, _: usize, _: std::ops::Range<usize>, _: *mut f32, _: usize) {
    unreachable!("only called where amx::bf16_available() holds")
}

/// One block of output for [`share_bf16`]: rows from `row`, columns from
/// `col`, against `b_tiles` (`[column tile (1 or 2)][block]`).
struct Bf16Block<'a> {
    xb: &'a [u16],
    k: usize,
    b_tiles: &'a [[u16; B_TILE]],
    m: usize,
    row: usize,
    col: usize,
    dst: *mut f32,
    n: usize,
}

impl Bf16Block<'_> {
    /// `RA` 16-row blocks against `RB` column tiles, accumulated over the
    /// whole input width in tiles 4-7, then stored.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const RA: usize, const RB: usize>(&self) {
        use std::arch::asm;
        let (stride, kb) = (64usize, self.k / BLOCK);
        let a_at = |ra: usize, b: usize| self.xb[(((self.row / TILE + ra) * kb + b) * TILE) * BLOCK..].as_ptr();
        // SAFETY (whole body): tiles are configured by `share_bf16`; A
        // loads read one contiguous KiB of `xb` (row blocks < padded); B loads read one 1 KiB buffer tile; stores go to rows
        // < m of the output or to `scratch`.
        unsafe {
            asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem)
            );
            for b in 0..self.k / BLOCK {
                asm!(
                    "tileloadd tmm0, [{a} + {s}*1]",
                    "tileloadd tmm2, [{w} + {ws}*1]",
                    "tdpbf16ps tmm4, tmm0, tmm2",
                    a = in(reg) a_at(0, b), s = in(reg) stride,
                    w = in(reg) self.b_tiles[b].as_ptr(), ws = in(reg) 64usize, options(nostack),
                );
                if RB == 2 {
                    asm!(
                        "tileloadd tmm3, [{w} + {ws}*1]",
                        "tdpbf16ps tmm5, tmm0, tmm3",
                        w = in(reg) self.b_tiles[kb + b].as_ptr(), ws = in(reg) 64usize, options(nostack),
                    );
                }
                if RA == 2 {
                    asm!(
                        "tileloadd tmm1, [{a} + {s}*1]",
                        "tdpbf16ps tmm6, tmm1, tmm2",
                        a = in(reg) a_at(1, b), s = in(reg) stride, options(nostack),
                    );
                    if RB == 2 {
                        asm!("tdpbf16ps tmm7, tmm1, tmm3", options(nostack, nomem));
                    }
                }
            }
            #[repr(C, align(64))]
            struct Scratch([[f32; TILE]; TILE]);
            let mut scratch = Scratch([[0.0; TILE]; TILE]);
            for ra in 0..RA {
                for rb in 0..RB {
                    let first = self.row + ra * TILE;
                    let col = self.col + rb * TILE;
                    let full = first + TILE <= self.m;
                    let (to, stride) = if full {
                        (self.dst.add(first * self.n + col), self.n * 4)
                    } else {
                        (scratch.0.as_mut_ptr() as *mut f32, 64)
                    };
                    match ra * 2 + rb {
                        0 => {
                            asm!("tilestored [{p} + {s}*1], tmm4", p = in(reg) to, s = in(reg) stride, options(nostack))
                        }
                        1 => {
                            asm!("tilestored [{p} + {s}*1], tmm5", p = in(reg) to, s = in(reg) stride, options(nostack))
                        }
                        2 => {
                            asm!("tilestored [{p} + {s}*1], tmm6", p = in(reg) to, s = in(reg) stride, options(nostack))
                        }
                        _ => {
                            asm!("tilestored [{p} + {s}*1], tmm7", p = in(reg) to, s = in(reg) stride, options(nostack))
                        }
                    }
                    if !full {
                        for (r, values) in scratch.0.iter().enumerate().take(self.m.saturating_sub(first)) {
                            std::ptr::copy_nonoverlapping(
                                values.as_ptr(),
                                self.dst.add((first + r) * self.n + col),
                                TILE,
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn packed(n: usize, k: usize) -> Packed {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn");
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantizes");
        Packed::from_q8_0(&qt.data().expect("data"), n, k).expect("packs")
    }

    fn rows(m: usize, k: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
            .expect("randn")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec")
    }

    /// The tiles, the VNNI kernel and the portable code agree bit for bit
    /// on odd shapes (single and paired column tiles, odd row counts) and
    /// every row count from 1 to 64.
    #[test]
    fn equals_the_vnni_and_portable_paths_bit_for_bit() {
        if !available() {
            eprintln!("no AMX here (or no permission): only the fallback is exercised");
        }
        for (n, k) in [(16, 32), (48, 576), (64, 896), (80, 1568)] {
            let w = packed(n, k);
            for m in 1..=64 {
                if n == 80 && m % 7 != 0 {
                    continue;
                }
                let x = rows(m, k);
                let tiles = matmul(&w, &x, m);
                let slow = vnni::portable(&w, &vnni::quantize(&x), m);
                assert_eq!(tiles, slow, "{n}x{k} m={m}: tiles vs portable");
                assert_eq!(tiles, vnni::matmul(&w, &x, m), "{n}x{k} m={m}: tiles vs vnni");
            }
        }
    }

    /// A row's result does not depend on the rows padded or batched with it.
    #[test]
    fn rows_do_not_depend_on_their_batch() {
        let (n, k) = (48, 640);
        let w = packed(n, k);
        let x = rows(37, k);
        let together = matmul(&w, &x, 37);
        for i in [0, 15, 16, 31, 36] {
            let alone = vnni::matmul(&w, &x[i * k..(i + 1) * k], 1);
            assert_eq!(&together[i * n..(i + 1) * n], &alone[..], "row {i}");
        }
    }

    /// The bf16 tiles against an f64 product of the same bf16-rounded
    /// operands: the only differences are f32 accumulation order.
    #[test]
    fn bf16_tiles_match_a_reference_on_odd_shapes_and_row_counts() {
        if !bf16_available() {
            eprintln!("no AMX-BF16 here: only the fallback is exercised");
        }
        let bf = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        for (n, k) in [(16, 32), (48, 576), (80, 896)] {
            let w = packed(n, k);
            let dense: Vec<f64> = (0..n * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    let tile = &w.tiles[(r / TILE) * (k / BLOCK) + c / BLOCK];
                    let j = c % BLOCK;
                    let q = tile.qs[((j / 4) * TILE + r % TILE) * 4 + j % 4] as f64 - 128.0;
                    bf((q * tile.d[r % TILE] as f64) as f32)
                })
                .collect();
            let Some(wb) = Bf16Packed::from_packed(&w) else {
                continue;
            };
            let from_dense: Vec<f32> = dense.iter().map(|v| *v as f32).collect();
            let wd = Bf16Packed::from_f32(&from_dense, n, k).expect("dense packs");
            for m in [1, 5, 16, 17, 31, 32, 33, 64] {
                let x = rows(m, k);
                let got = matmul_bf16(&wb, &x, m);
                assert_eq!(got, matmul_bf16(&wd, &x, m), "from dense = from Q8_0");
                let slow = portable_bf16(&wb, &x, m);
                for i in 0..m {
                    for c in 0..n {
                        let want: f64 = (0..k).map(|j| bf(x[i * k + j]) * dense[c * k + j]).sum();
                        let (g, p) = (got[i * n + c] as f64, slow[i * n + c] as f64);
                        let tol = 1e-4 * (1.0 + want.abs()) * (k as f64).sqrt();
                        assert!((g - want).abs() <= tol, "{n}x{k} m={m} [{i},{c}]: {g} vs {want}");
                        assert!(
                            (p - want).abs() <= tol,
                            "portable {n}x{k} m={m} [{i},{c}]: {p} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A row's bf16 result is the same alone as in any batch.
    #[test]
    fn bf16_rows_do_not_depend_on_their_batch() {
        let (n, k) = (48, 640);
        let Some(w) = Bf16Packed::from_packed(&packed(n, k)) else {
            return;
        };
        let x = rows(37, k);
        let together = matmul_bf16(&w, &x, 37);
        for i in [0, 15, 16, 31, 36] {
            let alone = matmul_bf16(&w, &x[i * k..(i + 1) * k], 1);
            assert_eq!(&together[i * n..(i + 1) * n], &alone[..], "row {i}");
        }
    }

    /// candle's own AMX Q4_K kernel keeps its tile configuration loaded
    /// between calls; ours must leave it in place. Alternating the two on
    /// the same worker threads used to end in SIGILL.
    #[test]
    fn coexists_with_candles_tile_kernel() {
        use candle_core::quantized::QMatMul;
        use candle_core::Module;
        let dev = Device::Cpu;
        let (n, k, m) = (64, 512, 40);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("randn");
        let q4k = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).expect("q4k")).expect("qmatmul");
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("randn");
        let candle = || -> Vec<f32> {
            let y = q4k.forward(&x).expect("forward");
            y.flatten_all().expect("flat").to_vec1().expect("vec")
        };
        let first = candle();
        let ours = packed(n, k);
        let xs = rows(m, k);
        let ours_bf16 = Bf16Packed::from_packed(&ours);
        for _ in 0..3 {
            if let Some(w) = &ours_bf16 {
                let _ = matmul_bf16(w, &xs, m);
            }
            let _ = matmul(&ours, &xs, m);
            assert_eq!(first, candle());
        }
    }

    #[test]
    fn detection_is_stable_and_cheap() {
        let first = available();
        for _ in 0..1000 {
            assert_eq!(available(), first);
        }
    }
}
